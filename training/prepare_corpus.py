"""Build the demo corpus (data/train.txt) and its tokenizer: python training/prepare_corpus.py --help

The command users run by path; its code is `lsgpt.training.corpus` (installed as `python -m lsgpt.training.corpus`)."""

from lsgpt.training.corpus import main

if __name__ == "__main__":
    raise SystemExit(main())
