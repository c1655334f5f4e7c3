#!/usr/bin/env python3
"""Export a GPT-2 checkpoint to LightSeq's HDF5 format (the article's `export.py`, fixed and extended).

    python3 export/export.py -m model/fp16/pytorch_model.bin -l 500          # -> model/fp16/pytorch_model.hdf5 (Gpt)
    python3 export/export.py -m model/int8/pytorch_model.bin -l 500 -q       # -> QuantGpt, from a QAT checkpoint
    python3 export/export.py -m model/int8 -q --repository model_repository --model-name gpt2_int8   # publish to Triton
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from lsgpt.format import SAMPLING_METHODS, VALID_TOPK, FormatError


def default_output(src: Path, quant: bool) -> Path:
    """The article's rule: the input path with its extension replaced by .hdf5 (a folder: pytorch_model.hdf5).
    An export of the other precision already there is kept: the new file gets a _int8 / _fp16 suffix instead
    (e.g. post-training int8 from the fp16 folder beside its fp16 export). -o overwrites whatever it names."""
    from lsgpt.format import stored_precision

    out = src / "pytorch_model.hdf5" if src.is_dir() else src.with_suffix(".hdf5")
    want = "int8" if quant else "fp16"
    have = stored_precision(out) if out.is_file() else None
    return out if have in (None, want) else out.with_name(f"{out.stem}_{want}.hdf5")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-m", "--model", dest="model", required=True, help="checkpoint folder, pytorch_model.bin or model.safetensors")
    p.add_argument("-l", "--max-step", type=int, default=None,
                   help="max total length; position embedding rows kept (default: all the model has, at most 1024; "
                        "a larger value is lowered to that with a note)")
    p.add_argument("-q", "--quant", action="store_true", help="write an int8 QuantGpt file (needs QAT clips or --calibrate)")
    p.add_argument("-o", "--output", type=Path, help="output .hdf5 path (default: beside the weights)")
    p.add_argument("--repository", type=Path, help="publish into this Triton model repository instead of --output")
    p.add_argument("--model-name", "--served-model", dest="served_model", help="model in --repository (default gpt2 / gpt2_int8)")
    p.add_argument("--sampling-method", default="topk", choices=SAMPLING_METHODS)
    p.add_argument("--topk", type=int, default=1, help=f"default top-k, one of {VALID_TOPK} (default 1: greedy)")
    p.add_argument("--topp", type=float, default=0.75, help="default top-p in (0, 1] (default 0.75)")
    p.add_argument("--eos-id", type=int, help="EOS token id (default: config.json's eos_token_id)")
    p.add_argument("--extra-decode-length", type=int, default=0, help="max new tokens; <= 0: up to max_step")
    p.add_argument("--calibrate", type=Path, metavar="TEXTFILE", help="int8 without QAT: calibrate clips on this text")
    p.add_argument("-p", "--tokenizer", help="tokenizer folder / vocab.txt / hub id for --calibrate (default: the checkpoint's)")
    args = p.parse_args(argv)
    if args.topk not in VALID_TOPK:
        p.error(f"--topk {args.topk}: LightSeq accepts only {VALID_TOPK}")
    if not 0 < args.topp <= 1:
        p.error(f"--topp {args.topp}: must be in (0, 1]")
    if args.eos_id is not None and args.eos_id <= 0:
        p.error("--eos-id must be a positive token id (LightSeq reads 0 as 'not assigned')")
    if args.served_model and not args.repository:
        p.error("--model-name needs --repository")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from lsgpt.export.convert import export_model, max_step_that_fits

    src = Path(args.model)
    max_step = args.max_step
    fits = max_step_that_fits(src)
    if fits is not None:
        if max_step is None:
            max_step = fits
        elif max_step > fits:
            print(f"export.py: note: -l {max_step} is more than the model's {fits} positions; using -l {fits}",
                  file=sys.stderr)
            max_step = fits
    kwargs = dict(
        max_step=max_step if max_step is not None else 500,
        quantize=args.quant,
        sampling_method=args.sampling_method,
        topk=args.topk,
        topp=args.topp,
        eos_id=args.eos_id,
        extra_decode_length=args.extra_decode_length,
        calibrate_text=args.calibrate,
        tokenizer=args.tokenizer,
    )
    try:
        if args.repository:
            from lsgpt.repository import publish

            name = args.served_model or ("gpt2_int8" if args.quant else "gpt2")
            if not args.repository.is_dir():
                raise FileNotFoundError(f"model repository not found: {args.repository}")
            tok = args.tokenizer or (src if src.is_dir() else src.parent)
            tok = tok if Path(tok, "vocab.txt").is_file() or Path(tok).is_file() else None
            # a dot-folder: Triton ignores it while it polls the repository
            with tempfile.TemporaryDirectory(prefix=".export-", dir=args.repository) as tmp:
                path = export_model(src, Path(tmp) / "model.hdf5", **kwargs)
                done = publish(path, args.repository, name, tokenizer=tok)
            for model, folder in done.versions.items():
                print(f"published {model} version {folder.name}: {folder}")
            if done.lightseq:
                print(f"published LightSeq backend file {done.lightseq}")
        else:
            out = args.output or default_output(src, args.quant)
            path = export_model(src, out, **kwargs)
            print(f"wrote {'int8 QuantGpt' if args.quant else 'fp16 Gpt'} model {path} ({path.stat().st_size / 1e6:.1f} MB)")
    except (FormatError, ValueError, OSError) as e:  # bad checkpoint / options / paths: say what, exit 2
        print(f"export.py: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
