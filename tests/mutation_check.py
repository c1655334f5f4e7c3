"""Mutation check of the main oracles and tolerances (issue 15): not a test module (pytest does not collect it).

Each mutation is a plausible bug written as a text substitution in the library. For each one this script
copies the repository's code (lsgpt/, tests/, the CLIs' folders, pyproject.toml) to a temporary folder,
applies the substitution there (never in the working tree), runs the named tests with pytest in that copy and
reports KILLED (a test failed) or SURVIVED (all passed: a test too weak to see that bug). The unmutated copy is
run first: a mutation only counts against tests that pass without it. A few rows run a bug against a test
known to be blind to it (expected SURVIVED, the reason in the row) next to the row with the test that kills it.

    .venv/bin/python tests/mutation_check.py                 # all mutations (about 5 minutes on 2 cores)
    .venv/bin/python tests/mutation_check.py gelu_erf top_p  # those whose name contains one of the words
    .venv/bin/python tests/mutation_check.py --list          # names, places and tests, nothing run
    .venv/bin/python tests/mutation_check.py --markdown      # the result table as markdown (results/cpu/mutation/)

Exit status 1 when an outcome differs from the expected one or the baseline fails.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
COPY = ["lsgpt", "tests", "training", "export", "client", "benchmarks", "scripts", "pyproject.toml"]
SD = "tests/test_sampling_distribution.py"


@dataclass(frozen=True)
class Mutation:
    name: str
    what: str  # the bug it stands for
    path: str
    old: str
    new: str
    tests: tuple[str, ...]
    expect: str = "KILLED"  # "SURVIVED": a row recording that the test named is blind to this bug (see `what`)


MUTATIONS = [
    Mutation("gelu_erf", "erf GELU instead of GPT-2's tanh approximation", "lsgpt/engine/model.py",
             'return F.gelu(x, approximate="tanh")', "return F.gelu(x)",
             ("tests/test_engine_fp16.py::test_logits_match_hf",)),
    Mutation("attention_scale_1_over_d", "attention scaled by 1/head_dim instead of 1/sqrt(head_dim)", "lsgpt/engine/model.py",
             "attn_mask=causal_mask(positions, k.shape[2]))",
             "attn_mask=causal_mask(positions, k.shape[2]), scale=1.0 / q.shape[-1])",
             ("tests/test_engine_fp16.py::test_logits_match_hf",)),
    Mutation("layernorm_eps_1e-12", "LayerNorm epsilon 1e-12 (LightSeq's kernels) instead of HF GPT-2's 1e-5",
             "lsgpt/format.py", "layer_norm_eps: float = 1e-5", "layer_norm_eps: float = 1e-12",
             ("tests/test_engine_fp16.py::test_layernorm_epsilon_is_hf_gpt2s",)),
    Mutation("layernorm_eps_1e-12_vs_logits", "the same, against the wide-model logits test only (its LayerNorm "
             "inputs vary far more than 1e-5, so epsilon cannot show there)", "lsgpt/format.py",
             "layer_norm_eps: float = 1e-5", "layer_norm_eps: float = 1e-12",
             ("tests/test_engine_fp16.py::test_logits_match_hf",), expect="SURVIVED"),
    Mutation("temperature_ignored", "sampling ignores temperature", "lsgpt/engine/sampling.py",
             "lg = logits[b].float() / sp.temperature", "lg = logits[b].float()",
             (f"{SD}::test_first_token_follows_the_target_distribution",)),
    Mutation("top_p_one_token_short", "nucleus stops one token before its mass reaches top_p", "lsgpt/engine/sampling.py",
             "drop = probs.cumsum(-1) - probs >= sp.top_p", "drop = probs.cumsum(-1) >= sp.top_p",
             (f"{SD}::test_first_token_follows_the_target_distribution",)),
    Mutation("top_k_one_token_short", "top-k keeps k-1 tokens", "lsgpt/engine/sampling.py",
             'lg = lg.masked_fill(lg < kth, float("-inf"))', 'lg = lg.masked_fill(lg <= kth, float("-inf"))',
             (f"{SD}::test_first_token_follows_the_target_distribution",)),
    Mutation("requant_floor", "int8 requantize rounds down instead of half up", "lsgpt/engine/int8.py",
             "return torch.floor(acc * alpha + 0.5)", "return torch.floor(acc * alpha)",
             ("tests/test_engine_int8.py::test_int8_logits_bit_exact_at_engine_layernorm_eps",)),
    Mutation("requant_half_even_vs_logits", "int8 requantize rounds half to even (torch.round), against the "
             "bit-exact logits test only (real sums never land on a tie: an equivalent mutant there)",
             "lsgpt/engine/int8.py", "return torch.floor(acc * alpha + 0.5)", "return torch.round(acc * alpha)",
             ("tests/test_engine_int8.py::test_int8_logits_bit_exact_at_engine_layernorm_eps",), expect="SURVIVED"),
    Mutation("requant_half_even", "int8 requantize rounds half to even (torch.round)", "lsgpt/engine/int8.py",
             "return torch.floor(acc * alpha + 0.5)", "return torch.round(acc * alpha)",
             ("tests/test_engine_int8.py::test_quantizers_round_half_up_at_exact_ties",)),
    Mutation("repetition_branches_swapped", "repetition penalty multiplies positive logits, divides negative ones",
             "lsgpt/engine/sampling.py", "torch.where(lg > 0, lg / self.rep, lg * self.rep)",
             "torch.where(lg > 0, lg * self.rep, lg / self.rep)",
             (f"{SD}::test_penalized_sampling_follows_the_target_given_the_history[repetition]",)),
    Mutation("repetition_sign_ignored", "repetition penalty divides every seen logit, negative ones too",
             "lsgpt/engine/sampling.py", "torch.where(lg > 0, lg / self.rep, lg * self.rep)", "lg / self.rep",
             (f"{SD}::test_penalized_sampling_follows_the_target_given_the_history[repetition]",)),
    Mutation("repetition_sign_ignored_vs_greedy", "the same, against the greedy penalty tests only (a seen token "
             "with a negative logit never becomes the argmax)",
             "lsgpt/engine/sampling.py", "torch.where(lg > 0, lg / self.rep, lg * self.rep)", "lg / self.rep",
             (f"{SD}::test_greedy_with_penalties_follows_the_penalized_argmax",), expect="SURVIVED"),
    Mutation("presence_frequency_swapped", "presence penalty per occurrence, frequency penalty once",
             "lsgpt/engine/sampling.py", "lg - self.presence * (self.counts > 0) - self.frequency * self.counts",
             "lg - self.frequency * (self.counts > 0) - self.presence * self.counts",
             (f"{SD}::test_penalized_sampling_follows_the_target_given_the_history[presence_frequency]",)),
    Mutation("presence_frequency_swapped_vs_greedy", "the same, against the greedy penalty tests only",
             "lsgpt/engine/sampling.py", "lg - self.presence * (self.counts > 0) - self.frequency * self.counts",
             "lg - self.frequency * (self.counts > 0) - self.presence * self.counts",
             (f"{SD}::test_greedy_with_penalties_follows_the_penalized_argmax",)),
    Mutation("presence_sign_flipped", "presence penalty added instead of subtracted", "lsgpt/engine/sampling.py",
             "lg - self.presence * (self.counts > 0)", "lg + self.presence * (self.counts > 0)",
             (f"{SD}::test_penalized_sampling_follows_the_target_given_the_history[presence_frequency]",)),
    Mutation("stop_last_token_only", "a stop sequence matches on its last token alone", "lsgpt/contract.py",
             "len(s) <= n and tuple(generated[n - len(s):]) == tuple(s)", "n and generated[-1] == s[-1]",
             (f"{SD}::test_sampled_rows_end_at_their_first_stop_sequence",)),
    Mutation("int_mm_no_pad_at_16", "16 rows reach torch._int_mm unpadded (CUDA needs more than 16)",
             "lsgpt/engine/int8.py", "if m <= 16:", "if m < 16:",
             ("tests/test_gpu_logic_cpu.py::test_int_mm_backend_pads_small_batches_and_is_exact",)),
    Mutation("graph_step_not_static", "the captured decode step reads the cache prefix its positions imply",
             "lsgpt/engine/engine.py", "return self.forward_logits(tok, pos, cache, static=True)",
             "return self.forward_logits(tok, pos, cache, static=False)",
             ("tests/test_gpu_logic_cpu.py::test_graphed_decode_equals_eager_decode",)),
    Mutation("finished_rows_unclamped", "finished rows' positions run past the graph's max_step cache",
             "lsgpt/engine/engine.py", "pos = cur.clamp(max=cache.k[0].shape[1] - 1)", "pos = cur",
             ("tests/test_gpu_logic_cpu.py::test_graphed_decode_equals_eager_decode",)),
]


def place(m: Mutation) -> str:
    text = (ROOT / m.path).read_text()
    n = text.count(m.old)
    if n != 1:
        raise SystemExit(f"{m.name}: the text to replace occurs {n} times in {m.path} (the code moved?)")
    return f"{m.path}:{text[: text.index(m.old)].count(chr(10)) + 1}"


def make_copy(dst: Path) -> None:
    for name in COPY:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, dst / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        elif src.exists():
            shutil.copy2(src, dst / name)


def pytest_run(copy: Path, tests: tuple[str, ...], timeout: int) -> tuple[int, float, str]:
    env = dict(os.environ, PYTHONPATH=str(copy), PYTHONDONTWRITEBYTECODE="1")
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests]
    t0 = time.monotonic()
    try:
        p = subprocess.run(cmd, cwd=copy, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return 124, time.monotonic() - t0, "timeout"
    tail = [ln for ln in p.stdout.splitlines() if ln.strip()][-1:] or [p.stderr.strip()[-200:]]
    return p.returncode, time.monotonic() - t0, tail[0]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("only", nargs="*", help="run the mutations whose name contains one of these")
    ap.add_argument("--list", action="store_true")
    ap.add_argument("--markdown", action="store_true", help="print the table as markdown at the end")
    ap.add_argument("--timeout", type=int, default=600, help="seconds per pytest run")
    a = ap.parse_args()
    todo = [m for m in MUTATIONS if not a.only or any(w in m.name for w in a.only)]
    if a.list:
        for m in todo:
            print(f"{m.name:38} {place(m):24} {' '.join(m.tests)}")
        return 0
    rows, bad = [], 0
    with tempfile.TemporaryDirectory(prefix="lsgpt-mutation-") as tmp:
        base = Path(tmp) / "base"
        make_copy(base)
        probe = subprocess.run([sys.executable, "-c", "import lsgpt; print(lsgpt.__file__)"], cwd=base,
                               env=dict(os.environ, PYTHONPATH=str(base)), capture_output=True, text=True)
        if not probe.stdout.startswith(str(base)):
            raise SystemExit(f"the copy's lsgpt is not the one imported: {probe.stdout or probe.stderr}")
        tests = tuple(dict.fromkeys(t for m in todo for t in m.tests))
        rc, dt, tail = pytest_run(base, tests, a.timeout)
        print(f"baseline (unmutated copy): rc {rc} in {dt:.0f} s: {tail}", flush=True)
        if rc != 0:
            print("the tests fail without any mutation: fix that first")
            return 1
        for m in todo:
            where = place(m)
            work = Path(tmp) / m.name
            make_copy(work)
            f = work / m.path
            f.write_text(f.read_text().replace(m.old, m.new, 1))
            rc, dt, tail = pytest_run(work, m.tests, a.timeout)
            outcome = "KILLED" if rc == 1 else "SURVIVED" if rc == 0 else f"ERROR rc={rc}"
            bad += outcome != m.expect
            rows.append((m, where, outcome, dt, tail))
            note = "" if outcome == m.expect else "   <-- UNEXPECTED"
            print(f"{outcome:9} {m.name:38} {where:24} {dt:5.0f} s  {tail}{note}", flush=True)
            shutil.rmtree(work)
    if a.markdown:
        print("\n| mutation (the bug) | changed | test(s) run | outcome | expected |\n|---|---|---|---|---|")
        for m, where, outcome, _, _ in rows:
            tests = "<br>".join(f"`{t.removeprefix('tests/')}`" for t in m.tests)
            print(f"| `{m.name}`: {m.what}; `{m.old}` → `{m.new}` | `{where}` | {tests} | {outcome} | {m.expect} |")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
