"""Extract, from LightSeq 3.0.1's C++ HDF5 loaders, every dataset they read, with the element count the
loader checks and the HDF5 memory type it reads into.

The sources (``lightseq/inference/proto/gpt_weight.cc`` and ``quant_gpt_weight.cc``) ship in the PyPI wheel.
They are parsed with a small C++-call parser: every ``read_hdf5_dataset_data(...)``,
``read_hdf5_dataset_scalar(...)`` and ``get_hdf5_dataset_size(...)`` call whose first argument is
``hdf5_file`` is collected; its name expression (string literals, ``dataset_prefix``) is evaluated; its size
predicate (``[=](int size) { return size != EXPR; }``) is turned into a Python expression over the
loader's derived sizes (``_hidden_size`` ...).

The loaders themselves are also compiled and run on our files (``oracles/lightseq_loader.py``). This parser
stays because it still catches what the running loader does not: a dataset LightSeq never reads (the loader
ignores extra datasets; ``test_exported_dataset_names_are_exactly_lightseqs``), and a dataset of the wrong
stored type (the loader lets HDF5 convert: a float kernel in an int8 file loads as unsigned char, an int8 file's
uint8 kernels load into ``GptWeight`` as floats; ``check_against_loader``'s type rules come from the read types
parsed here). It needs no compiler, so it runs where the loader build is skipped.
"""

from __future__ import annotations

import importlib.util
import re
from dataclasses import dataclass
from pathlib import Path

LOADERS = {"fp16": "gpt_weight.cc", "int8": "quant_gpt_weight.cc"}


def lightseq_proto_dir() -> Path | None:
    spec = importlib.util.find_spec("lightseq")
    if spec is None or not spec.submodule_search_locations:
        return None
    for loc in spec.submodule_search_locations:
        d = Path(loc) / "inference" / "proto"
        if (d / "gpt_weight.cc").is_file():
            return d
    return None


@dataclass
class LoaderRead:
    name: str  # may contain "{layer}"
    func: str  # read_hdf5_dataset_data | read_hdf5_dataset_scalar | get_hdf5_dataset_size
    h5type: str | None  # H5T_NATIVE_FLOAT / UCHAR / INT / CHAR, None for get_hdf5_dataset_size
    size_expr: str | None  # python expression; None = any size
    max_size: int | None = None  # for "size > N" predicates

    @property
    def per_layer(self) -> bool:
        return "{layer}" in self.name

    def expected_size(self, dims: dict) -> int | None:
        if self.size_expr is None:
            return None
        return int(eval(self.size_expr, {"__builtins__": {}}, dict(dims)))


def _strip_comments(src: str) -> str:
    src = re.sub(r"/\*.*?\*/", " ", src, flags=re.S)
    return re.sub(r"//[^\n]*", "", src)


def _call_args(src: str, open_idx: int) -> tuple[list[str], int]:
    """Split the argument list starting at src[open_idx] == '(' into top-level arguments."""
    assert src[open_idx] == "("
    depth, i, start, args = 0, open_idx, open_idx + 1, []
    in_str = False
    while i < len(src):
        c = src[i]
        if in_str:
            if c == "\\":
                i += 2
                continue
            if c == '"':
                in_str = False
        elif c == '"':
            in_str = True
        elif c in "([{":
            depth += 1
        elif c in ")]}":
            depth -= 1
            if depth == 0:
                args.append(src[start:i].strip())
                return args, i
        elif c == "," and depth == 1:
            args.append(src[start:i].strip())
            start = i + 1
        i += 1
    raise ValueError("unbalanced call")


def _eval_name(expr: str, prefix: str | None) -> str:
    parts = [p.strip() for p in re.split(r"\+(?=(?:[^\"]*\"[^\"]*\")*[^\"]*$)", expr)]
    out = ""
    for p in parts:
        if p.startswith('"') and p.endswith('"'):
            out += p[1:-1]
        elif p == "dataset_prefix":
            if prefix is None:
                raise ValueError(f"dataset_prefix used before assignment in {expr!r}")
            out += prefix
        else:
            raise ValueError(f"cannot evaluate dataset name part {p!r} of {expr!r}")
    return out


def _eval_prefix(expr: str) -> str:
    expr = expr.strip()
    m = re.fullmatch(r'"([^"]*)"\s*\+\s*std::to_string\(\s*\w+\s*\)', expr)
    if m:
        return m.group(1) + "{layer}"
    m = re.fullmatch(r'"([^"]*)"', expr)
    if m:
        return m.group(1)
    raise ValueError(f"cannot evaluate dataset_prefix = {expr!r}")


def _size_predicate(arg: str) -> tuple[str | None, int | None]:
    m = re.search(r"return\s+size\s*!=\s*(.+?)\s*;", arg, flags=re.S)
    if m:
        expr = re.sub(r"\(\s*(size_t|int|long)\s*\)", "", m.group(1))
        expr = " ".join(expr.split())
        if not re.fullmatch(r"[\w\s\*\+\-\(\)/]+", expr):
            raise ValueError(f"unexpected size expression {expr!r}")
        return expr, None
    m = re.search(r"return\s+size\s*>\s*(\d+)\s*;", arg)
    if m:
        return None, int(m.group(1))
    raise ValueError(f"unexpected size predicate {arg!r}")


def hdf5_reads(source: str) -> list[LoaderRead]:
    """Every HDF5 read of the loader source, in source order (duplicates removed)."""
    src = _strip_comments(source)
    # dataset_prefix assignments, by position
    prefixes = [
        (m.start(), _eval_prefix(m.group(1)))
        for m in re.finditer(r"std::string\s+dataset_prefix\s*=\s*([^;]+);", src)
    ]
    reads: list[LoaderRead] = []
    seen = set()
    for m in re.finditer(r"\b(read_hdf5_dataset_data|read_hdf5_dataset_scalar|get_hdf5_dataset_size)\s*\(", src):
        args, _ = _call_args(src, m.end() - 1)
        if not args or args[0] != "hdf5_file":
            continue  # a definition or an unrelated overload
        before = [p for pos, p in prefixes if pos < m.start()]
        prefix = before[-1] if before else None
        name = _eval_name(args[1], prefix)
        func = m.group(1)
        if func == "get_hdf5_dataset_size":
            rd = LoaderRead(name, func, None, None)
        elif func == "read_hdf5_dataset_scalar":
            rd = LoaderRead(name, func, args[2], "1")  # util.cc.cu: size != 1 -> error
        else:
            size_expr, max_size = _size_predicate(args[4])
            rd = LoaderRead(name, func, args[2], size_expr, max_size)
        key = (rd.name, rd.func)
        if key not in seen:
            seen.add(key)
            reads.append(rd)
    return reads


def loader_reads(kind: str) -> list[LoaderRead]:
    d = lightseq_proto_dir()
    if d is None:
        raise FileNotFoundError("lightseq is not installed")
    return hdf5_reads((d / LOADERS[kind]).read_text())


def expand(reads: list[LoaderRead], n_layer: int) -> list[tuple[str, LoaderRead]]:
    out = []
    for r in reads:
        if r.per_layer:
            out += [(r.name.format(layer=i), r) for i in range(n_layer)]
        else:
            out.append((r.name, r))
    return out
