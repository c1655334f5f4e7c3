"""Train GPT-2 (fp16, then int8 QAT) with the article's run_clm command line: python training/train.py --help

The command users run by path; its code is `lsgpt.training.train` (installed as `lsgpt-train`)."""

from lsgpt.training.train import cli

if __name__ == "__main__":
    raise SystemExit(cli())
