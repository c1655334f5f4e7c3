"""The package's shape (issue 27): floors that only import downward, one installed package, no sys.path edits,
short functions, benchmarks that stay a minor part of the code. Read from the source with `ast`; nothing runs."""

from __future__ import annotations

import ast
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]
MAX_FUNCTION_LINES = 80

# The floors: what each area of lsgpt may import from lsgpt (itself included).
CORE = {"lsgpt", "lsgpt.contract", "lsgpt.format", "lsgpt.text", "lsgpt.repository"}
ALLOWED = {
    "core": {"core"},
    "client": {"core", "client"},
    "engine": {"core", "engine"},
    "export": {"core", "engine", "export"},
    "training": {"core", "engine", "export", "training"},
    "serving": {"core", "client", "engine", "serving"},
    # client/generate.py, the command: through a server (the client library) or in process (the engine, imported
    # only for a local file); the library itself stays torch-free (tests/test_client.py)
    "client.generate": {"core", "client", "engine"},
}


def area(module: str) -> str:
    if module in CORE:
        return "core"
    if module == "lsgpt.client.generate":
        return "client.generate"
    parts = module.split(".")
    assert parts[0] == "lsgpt" and len(parts) > 1 and parts[1] in ALLOWED, f"{module}: not in any floor"
    return parts[1]


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def lsgpt_imports(tree: ast.AST, module: str) -> set[str]:
    """Every lsgpt module `tree` imports, at any depth (function-level imports included)."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this package
                pkg = module.split(".")[: -node.level] if not module.endswith("__init__") else module.split(".")
                base = ".".join(pkg + ([base] if base else []))
            found.add(base)
            found |= {f"{base}.{a.name}" for a in node.names}
    return {m for m in found if m.split(".")[0] == "lsgpt" and (ROOT / (m.replace(".", "/") + ".py")).exists()
            or (ROOT / m.replace(".", "/") / "__init__.py").exists() and m.startswith("lsgpt")}


def sources(*folders: str) -> list[Path]:
    return sorted(p for f in folders for p in (ROOT / f).rglob("*.py"))


def test_each_floor_imports_only_downward():
    bad = []
    for path in sources("lsgpt"):
        if path.parent.name == "backend":
            continue  # what tritonserver runs; it imports the served model by name
        mod = module_name(path)
        allowed = ALLOWED[area(mod)]
        for imp in sorted(lsgpt_imports(ast.parse(path.read_text()), mod)):
            if area(imp) not in allowed:
                bad.append(f"{mod} imports {imp} ({area(mod)} may import {sorted(allowed)})")
    assert not bad, "\n".join(bad)


def test_one_installed_package():
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())
    st = cfg["tool"]["setuptools"]
    assert st["packages"] == {"find": {"include": ["lsgpt", "lsgpt.*"]}}, "lsgpt alone is installed"
    targets = cfg["project"]["scripts"].values()
    assert all(t.startswith("lsgpt.") for t in targets), list(targets)


def _is_sys_path(node: ast.AST) -> bool:
    if isinstance(node, ast.Subscript):
        node = node.value
    return isinstance(node, ast.Attribute) and node.attr == "path" and getattr(node.value, "id", "") == "sys"


def _edits_sys_path(node: ast.AST) -> bool:
    """sys.path.insert/append/extend/remove(...), or sys.path[...] = / sys.path = / sys.path += ..."""
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and _is_sys_path(node.func.value):
        return node.func.attr in {"insert", "append", "extend", "remove", "pop", "clear"}
    if isinstance(node, ast.Assign | ast.AugAssign):
        targets = node.targets if isinstance(node, ast.Assign) else [node.target]
        return any(_is_sys_path(t) for t in targets)
    return False


def test_no_sys_path_edits():
    """Imports resolve through the installed package or `python -m` from the root; the backend shim is the one
    place that must set the stub's path (tritonserver starts it with an isolated one)."""
    offenders = []
    for path in sources("lsgpt", "benchmarks", "training", "export", "client", "scripts", "tests"):
        if path == ROOT / "lsgpt/serving/backend/model.py" or path == Path(__file__).resolve():
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if _edits_sys_path(node):
                offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not offenders, offenders


def test_functions_are_short():
    long = []
    for path in sources("lsgpt", "training", "export", "client", "scripts", "benchmarks"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({n} lines)")
    assert not long, "\n".join(long)


def _lines(paths: list[Path]) -> int:
    return sum(len(p.read_text().splitlines()) for p in paths)


def test_benchmarks_are_at_most_a_quarter_of_the_code():
    bench = _lines(sources("benchmarks"))
    rest = _lines(sources("lsgpt", "training", "export", "client", "scripts"))
    assert bench <= 0.25 * (bench + rest), f"benchmarks {bench} lines of {bench + rest}"
