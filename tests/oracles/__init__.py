"""Independent oracles for the format / exporter / engine tests.

Nothing here imports ``lsgpt``: every formula and dataset name is re-derived from LightSeq's own loader
sources (read at test time from the installed ``lightseq==3.0.1`` wheel), from
``docs/format.md`` §1–§4 or from HF transformers' GPT-2.
"""
