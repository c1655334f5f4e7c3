"""Export an HF GPT-2 checkpoint to LightSeq's HDF5 (fp16, or int8 with -q), optionally into a Triton repository: python export/export.py --help

The command users run by path; its code is `lsgpt.export.cli` (installed as `lsgpt-export`)."""

from lsgpt.export.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
