"""HF checkpoint -> LightSeq HDF5 (fp16 or int8): `convert` (the library), `cli` (export/export.py)."""
