"""Generate text in process from an HDF5 file or through a served model: python client/generate.py --help

The command users run by path; its code is `lsgpt.client.generate` (installed as `lsgpt-generate`)."""

from lsgpt.client.generate import main

if __name__ == "__main__":
    raise SystemExit(main())
