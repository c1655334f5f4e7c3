"""The benchmarks: not installed; run from the repository root as `python -m benchmarks.<name> --help`."""
