"""Every command the documents give keeps its word: README.md, model_repository/README.md, docker/README.md
(fenced bash blocks and inline `code` that starts like a command) and every CLI's --help text.

Each extracted command gets exactly one verdict, or the test fails (a new command cannot go unchecked):
- run: as written, in a throw-away copy of the checkout (git status there is clean before and after): the
  replot, perf_analyzer and curl against a real tritonserver (a tiny random GPT-2 over the real vocabulary;
  localhost:8000/8001/8002 mapped to its free ports), and every CLI's --help;
- parsed: the argv parsed by the CLI's own argparse parser (options repeated are refused: a later `--model`
  silently replaces `-m`), `make` through the Makefile (`make -n`, each variable one the Makefile reads, each
  recipe command parsed in turn), gpu.sh's modes and variables, paths named that exist or the demo makes;
- allowed: ALLOWED below, each with its reason (a GPU, a cluster, Docker, the network, minutes of run); their
  files and flags are still checked where a checker exists.
"""

from __future__ import annotations

import argparse
import contextlib
import fnmatch
import functools
import importlib
import importlib.util
import io
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parents[1]
DOCS = ("README.md", "model_repository/README.md", "docker/README.md")
COMMAND_WORDS = {"python", "python3", "make", "docker", "podman", "torchrun", "bash", "curl", "kubectl",
                 "perf_analyzer", "tritonserver", "gpu.sh"}
SCRIPTS = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
# what `make demo` (scripts/demo.py) leaves in an ignored folder, as the README's "What it makes" lists it
DEMO_OUTPUTS = ("data/train.txt", "data/tokenizer", "model/fp16", "model/int8", "model/subset",
                "model/*/pytorch_model.bin", "model/*/pytorch_model.hdf5", "model/*/pytorch_model_int8.hdf5",
                "results/demo/*", "results/tmp/*")
USER_FILES = ("my.txt",)  # the user's own text in "train on your own text"
PATH_ROOTS = ("model/", "data/", "results/", "docker/", "model_repository/", "benchmarks/", "scripts/", "export/",
              "client/", "training/", "tests/", "docs/")
OUTPUT_FLAGS = {"--out", "-o", "--output", "--output_dir"}
ACCEPT_EXTRA = {"lsgpt.serving.launcher"}  # passes unknown flags on to tritonserver
ALLOWED = {  # first words -> why it does not run here (its files and flags are still checked)
    "docker": "no Docker engine on our machines; the compose file is validated by tests/test_docker.py",
    "kubectl": "no cluster; the manifests are rendered and schema-checked by tests/test_k8s.py",
    "torchrun": "the article's pretraining: 8 GPUs and the Hugging Face hub",
    "benchmarks/gpu.sh": "needs a GPU machine (minutes)",
    "gpu.sh": "needs a GPU machine (minutes)",
    "scripts/setup.sh": "installs packages (network); every test runs in the environment it made",
    "placeholder": "a form with '…', not a command (e.g. `.venv/bin/python …`)",
    "podman": "root and a build: tests/test_container.py runs these images with the same flags",
}
RUN_BY_NAME = {"perf_analyzer", ".venv/bin/perf_analyzer", "curl"}  # run against the live server


@dataclass(frozen=True)
class Command:
    where: str  # file:line, or "<cli> --help"
    text: str


# ---- extraction ---------------------------------------------------------------------------------------------


def head_word(text: str) -> str | None:
    """The command word after leading VAR=value assignments, if the text starts like a command."""
    try:
        words = shlex.split(text, comments=True)
    except ValueError:
        words = text.split()
    words = [w for w in words if w != "…"] if words[-1:] == ["…"] else words
    while words and re.fullmatch(r"[A-Z_][A-Z0-9_]*=\S*", words[0]):
        words = words[1:]
    if not words:
        return None
    w = words[0]
    if w in COMMAND_WORDS or w.startswith((".venv/bin/", "lsgpt-")) or (w.startswith(("scripts/", "benchmarks/")) and w.endswith(".sh")):
        return w
    return None


def markdown_commands(rel: str) -> list[Command]:
    out, fence = [], None
    for n, line in enumerate((ROOT / rel).read_text(encoding="utf-8").splitlines(), 1):
        if line.lstrip().startswith("```"):
            fence = None if fence is not None else line.strip()[3:].strip()
            continue
        if fence is not None:
            if fence in ("bash", "sh", "shell") and line.strip() and not line.lstrip().startswith("#"):
                out.append(Command(f"{rel}:{n}", line.strip()))
            continue
        for span in re.findall(r"`([^`\n]+)`", line):
            if head_word(span) and not is_mention(span):
                out.append(Command(f"{rel}:{n}", span.strip()))
    return out


def is_mention(span: str) -> bool:
    """A lone name (`lsgpt-train`, `.venv/bin/perf_analyzer`): named, not a command to run."""
    words = span.split()
    return len(words) == 1 and (words[0] in SCRIPTS or (ROOT / words[0]).exists() or words[0] in COMMAND_WORDS)


def cli_entries() -> dict[str, tuple[str, str]]:
    """How a command names each CLI -> (module, function). Every script with a __main__ is here."""
    found = {}
    for py in sorted([*ROOT.glob("benchmarks/*.py"), *ROOT.glob("training/*.py"), *ROOT.glob("export/*.py"),
                      *ROOT.glob("client/*.py"), *ROOT.glob("scripts/*.py")]):
        text = py.read_text(encoding="utf-8")
        if "__main__" not in text:
            continue
        rel = py.relative_to(ROOT).as_posix()
        m = re.search(r"^from (lsgpt[\w.]*) import (\w+)$", text, re.M)
        found[rel] = (m.group(1), m.group(2)) if m and len(text) < 600 else (rel, "main")
        if rel.startswith("benchmarks/"):
            found[f"-m benchmarks.{py.stem}"] = (f"benchmarks.{py.stem}", "main")
    for name, target in SCRIPTS.items():
        module, func = target.split(":")
        found[name] = (module, func)
        found[f"-m {module}"] = (module, "main")
    return found


def load(module: str, func: str):
    if module.endswith(".py"):
        name = f"_cmd_{Path(module).stem}"
        if name not in sys.modules:  # registered first: a dataclass looks its module up while it is made
            spec = importlib.util.spec_from_file_location(name, ROOT / module)
            sys.modules[name] = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(sys.modules[name])
        mod = sys.modules[name]
    else:
        mod = importlib.import_module(module)
    return getattr(mod, func)


def help_text(module: str, func: str) -> str:
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), pytest.raises(SystemExit) as e:
        load(module, func)(["--help"])
    assert e.value.code in (0, None), f"{module} --help exited {e.value.code}"
    assert "usage:" in buf.getvalue(), module
    return buf.getvalue()


def help_commands() -> list[Command]:
    out, seen = [], set()
    for name, (module, func) in cli_entries().items():
        if (module, func) in seen or name.startswith("-m "):
            continue
        seen.add((module, func))
        for line in help_text(module, func).splitlines():
            indent = len(line) - len(line.lstrip())  # examples: 2..8; deeper lines continue an option's help
            if 2 <= indent <= 8 and head_word(line.strip()) and not is_mention(line.strip()):
                out.append(Command(f"{name} --help", line.strip()))
    return out


def all_commands() -> list[Command]:
    return [c for rel in DOCS for c in markdown_commands(rel)] + help_commands()


# ---- static checks ------------------------------------------------------------------------------------------


class _Parsed(Exception):
    def __init__(self, parser, args):
        self.parser, self.args = parser, args


def words_of(text: str) -> tuple[dict[str, str], list[str]]:
    """(leading VAR=value assignments, argv) of one command; '.venv/bin/python' and 'python3' read as python."""
    words = shlex.split(re.sub(r"\$\([^)]*\)", "1", text), comments=True)  # $(…): a value the shell computes
    env = {}
    while words and re.fullmatch(r"[A-Z_][A-Z0-9_]*=\S*", words[0]):
        k, _, v = words.pop(0).partition("=")
        env[k] = v
    if words and words[0] in (".venv/bin/python", "python3"):
        words[0] = "python"
    return env, words


@functools.cache
def documented_outputs() -> tuple[str, ...]:
    """What the documented commands themselves write (--output_dir model/mine, ...): a later row may read it."""
    outs = set()
    for cmd in all_commands():
        try:
            argv = words_of(cmd.text)[1]
        except ValueError:
            continue
        outs |= {w.rstrip("/") for prev, w in zip(["", *argv], argv) if prev in OUTPUT_FLAGS}
    return tuple(sorted(outs))


def check_paths(argv: list[str]) -> list[str]:
    problems = []
    for prev, w in zip(["", *argv], argv):
        if prev in OUTPUT_FLAGS or not w.startswith(PATH_ROOTS) or (ROOT / w).exists():
            continue
        made = DEMO_OUTPUTS + documented_outputs() + tuple(o + "/*" for o in documented_outputs())
        if not any(fnmatch.fnmatch(w.rstrip("/"), pat) for pat in made):
            problems.append(f"{w}: neither in the repository nor something `make demo` or a documented command makes")
    return problems


def parse_with_cli(entry: tuple[str, str], argv: list[str]) -> list[str]:
    """Problems of argv under the CLI's own parser (nothing runs: parsing is intercepted)."""
    module, func = entry
    original = argparse.ArgumentParser.parse_known_args

    def intercept(self, args=None, namespace=None):
        raise _Parsed(self, list(args if args is not None else []))

    argparse.ArgumentParser.parse_known_args = intercept
    try:
        load(module, func)(argv)
    except _Parsed as p:
        parser, args = p.parser, p.args
    else:
        return [f"{module}.{func} returned without parsing its arguments"]
    finally:
        argparse.ArgumentParser.parse_known_args = original
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            _, extra = original(parser, args)
        except SystemExit:
            return [err.getvalue().strip().splitlines()[-1]]
    problems = [f"unknown arguments {extra}"] if extra and module not in ACCEPT_EXTRA else []
    given = [parser._option_string_actions[w.split("=")[0]] for w in args if w.split("=")[0] in parser._option_string_actions]
    repeated = {a.dest for a in given if given.count(a) > 1 and not isinstance(a, argparse._AppendAction)}
    problems += [f"option given twice (the later silently wins): {d}" for d in sorted(repeated)]
    return problems + check_paths(argv)


def check_python(argv: list[str], clis: dict) -> list[str]:
    """python -m X ... / python path.py ... / lsgpt-X ..."""
    if argv[0] == "python":
        key = f"-m {argv[2]}" if argv[1] == "-m" else argv[1]
        rest = argv[3:] if argv[1] == "-m" else argv[2:]
        if argv[1] == "-m" and argv[2] in ("ruff", "pytest"):
            return []  # the tools `make test` runs
    else:
        key, rest = argv[0], argv[1:]
    if key not in clis:
        return [f"{key}: no such CLI"]
    return parse_with_cli(clis[key], rest)


def check_make(argv: list[str], env: dict, clis: dict, work: Path) -> list[str]:
    makefile = (ROOT / "Makefile").read_text()
    targets = [a for a in argv[1:] if "=" not in a]
    variables = dict(a.split("=", 1) for a in argv[1:] if "=" in a)
    problems = [f"make: no variable {v} in the Makefile (nothing reads it)" for v in {**env, **variables}
                if f"$({v})" not in makefile]
    problems += [f"make: no target {t}" for t in targets if not re.search(rf"^{re.escape(t)}:", makefile, re.M)]
    if problems:
        return problems
    # as a user's shell runs it: not as a sub-make of `make test` (MAKELEVEL would add "make[1]: Entering ..." lines)
    clean = {k: v for k, v in os.environ.items() if k not in ("MAKELEVEL", "MAKEFLAGS", "MFLAGS", "MAKEOVERRIDES")}
    dry = subprocess.run(["make", "-n", "--no-print-directory", *argv[1:]], cwd=work, capture_output=True,
                         text=True, timeout=60, env=clean)
    if dry.returncode:
        return [f"make -n: {dry.stderr.strip()[-300:]}"]
    for line in dry.stdout.splitlines():
        if line.strip() and not line.startswith("scripts/setup.sh"):
            problems += [f"recipe `{line}`: {p}" for p in check_static(line, clis, work)]
    return problems


def check_shell_script(env: dict, argv: list[str], clis: dict) -> list[str]:
    if argv[0] == "scripts/serve.sh":
        return parse_with_cli(("lsgpt.serving.launcher", "main"), argv[1:])
    path = ROOT / ("benchmarks/gpu.sh" if argv[0] == "gpu.sh" else argv[0])
    if not path.is_file():
        return [f"{argv[0]}: no such script"]
    text = path.read_text()
    problems = [f"{argv[0]}: no variable {v}" for v in env if not re.search(rf"\${{?{v}\b", text)]
    if argv[0].endswith("gpu.sh"):
        modes = re.findall(r"^([a-z][\w-]*)\)", text, re.M)
        problems += [f"gpu.sh: no mode {argv[1]} (has {modes})" for _ in [0] if len(argv) < 2 or argv[1] not in modes]
    return problems


def check_static(text: str, clis: dict, work: Path) -> list[str]:
    env, argv = words_of(text)
    if argv[0] == "make":
        return check_make(argv, env, clis, work)
    if argv[0] == "python" or argv[0].startswith("lsgpt-"):
        return check_python(argv, clis)
    if argv[0].endswith(".sh"):
        return check_shell_script(env, argv, clis)
    if argv[0] == "torchrun":
        script = next(i for i, w in enumerate(argv) if w.endswith(".py"))
        return check_python(["python", *argv[script:]], clis)
    if argv[0] == "docker":
        compose = argv[argv.index("-f") + 1] if "-f" in argv else None
        return [f"{compose}: missing"] if compose and not (ROOT / compose).is_file() else []
    if argv[0] == "podman":  # the images tests/test_container.py builds; no other image is pulled here
        return [f"{w}: not one of our images" for w in argv if w.startswith("localhost/")
                and w not in ("localhost/lsgpt-triton-server:cpu", "localhost/lsgpt-triton-train:cpu")]
    if argv[0] == "kubectl":
        return [f"{w}: missing" for w in argv if w.startswith("docker/") and not (ROOT / w).exists()]
    return [f"no checker for `{argv[0]}`: run it in this test, or give ALLOWED a reason"]


# ---- the copy, the live server, the verdicts ----------------------------------------------------------------


def git(work: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=work, capture_output=True, text=True, check=True).stdout


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    """The checkout's files (tracked, or new and not ignored), committed in a fresh git repository."""
    dst = tmp_path_factory.mktemp("checkout")
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, check=True).stdout.decode().split("\0")
    for rel in filter(None, listed):
        if (ROOT / rel).is_file():
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, dst / rel)
    (dst / ".venv").symlink_to(Path(sys.executable).resolve().parents[1] if not (ROOT / ".venv").exists()
                               else (ROOT / ".venv").resolve())
    git(dst, "init", "-q")
    git(dst, "add", "-A")
    git(dst, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "copy")
    assert git(dst, "status", "--porcelain") == ""
    return dst


@pytest.fixture(scope="module")
def live(work, tmp_path_factory):
    """tritonserver on free ports serving a tiny random GPT-2 over the real 21128-entry vocabulary (the ids of
    docker/perf/token_ids.json), fp + int8 and the int8 twin, tokenizer published beside them."""
    from benchmarks import common
    from lsgpt.serving.launcher import LaunchError, TritonServer, find_tritonserver, free_port

    try:
        find_tritonserver()
        common.find_perf_analyzer()
    except (LaunchError, common.BenchError) as e:
        pytest.skip(str(e))
    tmp = tmp_path_factory.mktemp("served")
    repo, *_ = common.prepare(work / "model_repository", tmp, hdf5=None, tokenizer=None,
                              models=["gpt2", "gpt2_int8"], tiny_shape="2,64,4,128")
    server = TritonServer(repo, grpc_port=free_port(), http_port=free_port(), metrics_port=free_port(),
                          models=["gpt2", "gpt2_int8", "gpt2_int8_stream"])
    server.start()
    try:
        server.wait_ready()
        yield server, {}
    finally:
        server.stop()


def run_live(cmd: Command, work: Path, live) -> list[str]:
    server, outputs = live
    text = cmd.text
    for port, real in (("8000", server.http_port), ("8001", server.grpc_port), ("8002", server.metrics_port)):
        text = re.sub(rf"\b(localhost|127\.0\.0\.1):{port}\b", f"127.0.0.1:{real}", text)
    if "perf_analyzer" in text:  # documented options first; these only make the windows short
        text += " --measurement-mode count_windows --measurement-request-count 8 --stability-percentage 900 --max-trials 3"
    env = dict(os.environ, PATH=f"{work / '.venv' / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}")
    proc = subprocess.run(["bash", "-c", text], cwd=work, env=env, capture_output=True, text=True, timeout=300)
    outputs[cmd.text] = proc.stdout
    if proc.returncode or '"error"' in proc.stdout:
        return [f"exit {proc.returncode}: {(proc.stdout + proc.stderr)[-600:]}"]
    return []


def run_here(cmd: Command, work: Path) -> list[str]:
    env = dict(os.environ, PYTHONPATH=str(work))
    argv = words_of(cmd.text)[1]
    proc = subprocess.run([sys.executable, *argv[1:]], cwd=work, env=env, capture_output=True, text=True, timeout=300)
    return [f"exit {proc.returncode}: {proc.stderr[-600:]}"] if proc.returncode else []


def verdict(cmd: Command, clis: dict, work: Path, live) -> tuple[str, list[str]]:
    if "…" in cmd.text or "..." in cmd.text:
        return "allowed: placeholder", []
    env, argv = words_of(cmd.text.split(" | ")[0])
    if argv[0] in ALLOWED:
        return f"allowed: {argv[0]}", check_static(cmd.text.split(" | ")[0], clis, work)
    if argv[0] in RUN_BY_NAME:
        return "run", run_live(cmd, work, live)
    if "--replot" in argv:  # reads a committed JSON and writes a figure: cheap
        return "run", check_static(cmd.text, clis, work) or run_here(cmd, work)
    return "parsed", check_static(cmd.text, clis, work)


@pytest.mark.timeout(900)
def test_every_documented_command_keeps_its_word(work, live):
    clis = cli_entries()
    commands = all_commands()
    assert len(commands) > 40, "the extraction found too few commands: is it reading the documents?"
    tally, problems = {}, []
    for cmd in commands:
        kind, bad = verdict(cmd, clis, work, live)
        tally[kind.split(":")[0]] = tally.get(kind.split(":")[0], 0) + 1
        problems += [f"{cmd.where}: `{cmd.text}`: {p}" for p in bad]
    print(f"{len(commands)} commands:", tally)
    assert not problems, "\n".join(problems)
    assert git(work, "status", "--porcelain") == "", "a documented command changed the checkout"
    for needed in ("perf_analyzer", "curl"):
        assert any(needed in c.text for c in commands), f"the documents lost their {needed} command"


def test_triton_statistics_are_what_the_readme_says(work, live):
    """model_repository/README.md: Triton's compute time is the hand-over to our decode loop, far below what the
    client waits; our histograms see the tokens."""
    import json
    import urllib.request

    server, outputs = live
    pa = next((out for text, out in outputs.items() if "perf_analyzer" in text), None)
    if pa is None:
        pytest.skip("the perf_analyzer command did not run (the test above failed or was deselected)")
    client_us = float(re.search(r"Avg latency: (\d+) usec", pa).group(1))
    stats = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{server.http_port}/v2/models/gpt2/stats",
                                              timeout=10).read())["model_stats"][0]["inference_stats"]
    compute_us = int(stats["compute_infer"]["ns"]) / max(1, int(stats["compute_infer"]["count"])) / 1000
    assert int(stats["success"]["count"]) > 0
    assert compute_us * 5 < client_us, (compute_us, client_us)
    metrics = urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10).read().decode()
    assert "lsgpt_time_to_first_token_seconds_count" in metrics
    readme = (ROOT / "model_repository" / "README.md").read_text(encoding="utf-8")
    assert "What Triton's statistics mean here" in readme and "lsgpt_time_to_first_token_seconds" in readme


# ---- the checker itself, and the fixes it keeps --------------------------------------------------------------


@pytest.mark.parametrize("text", [
    "python3 export/export.py -m model/int8 -q --repository model_repository --model gpt2_int8",  # -m replaced
    "make serve GRPC_PORT=9001 HOST=0.0.0.0",  # make reads TRITON_HOST
    "python -m benchmarks.bench --sections overhead",  # bench has no such section
    "python client/generate.py -m model/fp16/model.hdf5 -p data/tokenizer",  # the demo writes pytorch_model.hdf5
    "python -m benchmarks.soak --minits 4",
    "gpu.sh nosuchmode",
])
def test_the_checker_catches_broken_commands(text, work):
    assert check_static(text, cli_entries(), work), text


def test_a_new_command_is_extracted():
    for text in ("make serve", "python -m benchmarks.x", ".venv/bin/perf_analyzer -m gpt2", "OUT=/o benchmarks/gpu.sh all",
                 "lsgpt-export -m x", "curl -s localhost:8000"):
        assert head_word(text), text
    assert not head_word("docs/security.md") and is_mention("lsgpt-train")


@pytest.mark.parametrize("module", ["generation", "serving", "soak", "bench"])
def test_replot_of_a_missing_file_is_one_error_line(module, capsys):
    main = importlib.import_module(f"benchmarks.{module}").main
    with pytest.raises(SystemExit) as e:
        main(["--replot", "results/h100/generation/generation.json"])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1 and "no such file" in err, err


@pytest.mark.parametrize("module,good", [("bench", "generation,train"), ("serving", "overhead,inflight")])
def test_unknown_sections_are_refused(module, good, capsys):
    main = importlib.import_module(f"benchmarks.{module}").main
    with pytest.raises(SystemExit) as e:
        main(["--sections", "overhed"])
    assert e.value.code == 2 and "overhed" in capsys.readouterr().err
    assert not parse_with_cli((f"benchmarks.{module}", "main"), ["--sections", good])


def test_benchmarks_write_into_ignored_results_unless_record(work):
    """Every benchmark's default output is results/tmp/ (git-ignored); train_throughput ran for real."""
    for py in (ROOT / "benchmarks").glob("*.py"):
        for call in re.findall(r"results_dir\(([^)]*)\)", py.read_text()):
            assert "record" in call or py.name == "common.py", f"{py.name}: results_dir({call}) ignores --record"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.train_throughput", "--modes", "hf-fp32", "--steps", "1",
                           "--warmup", "0", "--n_layer", "1", "--n_embd", "32", "--n_head", "2", "--block", "16",
                           "--batch", "2", "--vocab", "64"], cwd=work, env=dict(os.environ, PYTHONPATH=str(work)),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert list((work / "results" / "tmp").glob("*/train/train_throughput.json"))
    assert git(work, "status", "--porcelain") == ""
