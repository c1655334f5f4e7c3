"""Install exported HDF5 files into the Triton model repository without disturbing a running server.

    publish("model/int8/pytorch_model.hdf5", "model_repository", "gpt2_int8")
      -> model_repository/gpt2_int8/<N+1>/{model.hdf5, vocab.txt}   (portable model: a new version folder)
         model_repository/gpt2_lightseq_int8/model.hdf5            (LightSeq's backend reads the model root)

A new version folder is assembled under a dot-name (Triton ignores non-numeric folders) and renamed
into place in one step, so a server polling the repository never sees half a version; it loads N+1
and then retires N (version_policy latest 1). The LightSeq root file is replaced by temp file + rename.
Exporting to "gpt2" (or "gpt2_int8") also publishes its streaming twin gpt2_stream (gpt2_int8_stream), same
file, hard-linked.
This module needs only the standard library and h5py.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from lsgpt.contract import MODEL_FILE, STREAM_SUFFIX, TOKENIZER_FILE


@dataclass(frozen=True)
class ModelKind:
    quantized: bool
    lightseq: str  # the LightSeq-backend model that serves the same file from its root
    also: tuple[str, ...] = field(default=())  # portable models that share the file


MODELS: dict[str, ModelKind] = {
    "gpt2": ModelKind(False, "gpt2_lightseq", ("gpt2" + STREAM_SUFFIX,)),
    "gpt2_int8": ModelKind(True, "gpt2_lightseq_int8", ("gpt2_int8" + STREAM_SUFFIX,)),
}


@dataclass
class Published:
    versions: dict[str, Path]  # portable model -> new version folder
    lightseq: Path | None  # LightSeq model root file


def _is_quantized(path: Path) -> bool:
    import h5py
    import numpy as np

    with h5py.File(path, "r") as f:
        return f["src_embedding/token_embedding"].dtype == np.uint8


def versions(model_dir: Path) -> list[int]:
    """Numeric version folders that hold a model file, ascending."""
    if not model_dir.is_dir():
        return []
    return sorted(
        int(p.name)
        for p in model_dir.iterdir()
        if p.is_dir() and p.name.isdigit() and not p.name.startswith("0") and (p / MODEL_FILE).is_file()
    )


def _place(src: Path, dst: Path, link: bool) -> None:
    if link:
        try:
            os.link(src, dst)
            return
        except OSError:
            pass  # another file system: copy
    shutil.copyfile(src, dst)


def _add_version(model_dir: Path, hdf5: Path, tokenizer: Path | None, keep: int, link: bool) -> Path:
    model_dir.mkdir(parents=True, exist_ok=True)
    new = max([0, *versions(model_dir)]) + 1
    target = model_dir / str(new)
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=model_dir))
    try:
        if tokenizer is not None:
            shutil.copyfile(tokenizer, staging / TOKENIZER_FILE)
        _place(hdf5, staging / MODEL_FILE, link)
        os.chmod(staging, 0o755)
        if target.exists():
            shutil.rmtree(target)  # a version folder without a model file (an export that never finished)
        os.rename(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    _prune(model_dir, keep)
    return target


def _prune(model_dir: Path, keep: int) -> None:
    """Drop the model files of all but the newest `keep` versions (a loaded model has read its file)."""
    if keep <= 0:
        return
    for v in versions(model_dir)[:-keep]:
        shutil.rmtree(model_dir / str(v), ignore_errors=True)


def _replace_file(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dst.name}.", suffix=".tmp", dir=dst.parent)
    os.close(fd)
    try:
        shutil.copyfile(src, tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, dst)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _vocab_file(tokenizer: str | os.PathLike | None) -> Path | None:
    if tokenizer is None:
        return None
    p = Path(tokenizer)
    p = p / TOKENIZER_FILE if p.is_dir() else p
    if not p.is_file():
        raise FileNotFoundError(f"tokenizer vocab not found: {p} (give a vocab.txt or a folder holding one)")
    return p


def publish(
    hdf5_path: str | os.PathLike,
    repository: str | os.PathLike,
    model: str,
    *,
    tokenizer: str | os.PathLike | None = None,
    lightseq: bool = True,
    keep: int = 3,
) -> Published:
    """Install `hdf5_path` as the next version of `model` (gpt2 or gpt2_int8) and of the models sharing it.

    tokenizer: a vocab.txt (or its folder) copied beside the file, so the streaming twins can send text.
    lightseq:  also replace the matching LightSeq model's root file.
    keep:      versions whose model file is kept per model (older ones are removed; 0 keeps all).
    """
    src = Path(hdf5_path)
    repo = Path(repository)
    if model not in MODELS:
        raise ValueError(f"unknown model {model!r}: publish to one of {sorted(MODELS)}")
    if not src.is_file():
        raise FileNotFoundError(f"model file not found: {src}")
    kind = MODELS[model]
    if _is_quantized(src) != kind.quantized:
        want = "an int8 (QuantGpt)" if kind.quantized else "an fp16 (Gpt)"
        flag = "with" if kind.quantized else "without"
        raise ValueError(f"{model} serves {want} file; {src} is not one (export {flag} -q)")
    vocab = _vocab_file(tokenizer)
    first = _add_version(repo / model, src, vocab, keep, link=False)
    done = {model: first}
    for other in kind.also:  # share the bytes just written (same file system)
        done[other] = _add_version(repo / other, first / MODEL_FILE, vocab, keep, link=True)
    root = None
    if lightseq:
        root = repo / kind.lightseq / MODEL_FILE
        _replace_file(src, root)
    return Published(done, root)


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(description="Publish an exported HDF5 file into a Triton model repository")
    ap.add_argument("hdf5")
    ap.add_argument("--repository", default="model_repository")
    ap.add_argument("--model", required=True, choices=sorted(MODELS))
    ap.add_argument("--tokenizer", default=None, help="vocab.txt or its folder (the streaming models' text output)")
    ap.add_argument("--keep", type=int, default=3)
    a = ap.parse_args(argv)
    res = publish(a.hdf5, a.repository, a.model, tokenizer=a.tokenizer, keep=a.keep)
    for name, path in res.versions.items():
        print(f"{name}: version {path.name} at {path}")
    if res.lightseq:
        print(f"LightSeq root file: {res.lightseq}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
