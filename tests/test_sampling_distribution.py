"""The sampler against its distribution, not just its support.

Oracle: HF transformers' logits for the prompt (on the weights stored in the file), turned into the target
distribution in float64 here — softmax(logits / T), then top-k, renormalize, then the smallest nucleus whose
mass reaches top-p (the order the engine documents). The engine draws the first new token of N rows, each with
its own seed; a chi-square test accepts when the draws fit (false alarm p < 1e-6). Power is shown in the same
test: the draws must *reject* the distributions a plausible bug would produce (temperature ignored, uniform inside
the kept set, greedy, top-p or top-k ignored), so a sampler with any of those bugs fails here.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from oracles import tiny

torch = pytest.importorskip("torch")

PROMPT = [5, 17, 300, 42]
N = 3000  # draws per case: the expected counts of the kept tokens are in the tens to hundreds


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    yield from tiny.one_torch_thread()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from lsgpt.convert import export_model
    from lsgpt.engine import Engine

    model = tiny.make_model(seed=4, wide=True)  # wide: logits span several units, so T, k and p matter
    path = export_model(model, tmp_path_factory.mktemp("samp") / "m.hdf5", max_step=64, eos_id=tiny.EOS_ID)
    engine = Engine.load(path, device="cpu")
    # HF on the file's own (fp16-rounded) weights: the logits the engine should be sampling from
    from test_engine_fp16 import hf_from_file, hf_logits

    hf = hf_from_file(path, model)
    logits = hf_logits(hf, [PROMPT])[0][-1].astype(np.float64)
    return engine, logits, hf


def target(logits: np.ndarray, temperature: float, top_k: int, top_p: float) -> np.ndarray:
    z = logits / temperature
    p = np.exp(z - z.max())
    p /= p.sum()
    if 0 < top_k < len(p):
        kth = np.sort(p)[-top_k]
        p = np.where(p >= kth, p, 0.0)
        p /= p.sum()
    if top_p < 1.0:
        order = np.argsort(-p, kind="stable")
        before = np.cumsum(p[order]) - p[order]  # mass of the tokens ranked above each one
        keep = np.zeros_like(p, dtype=bool)
        keep[order[before < top_p]] = True
        p = np.where(keep, p, 0.0)
        p /= p.sum()
    return p


def chi2_critical(df: int, z: float = 4.75) -> float:
    """Wilson–Hilferty: the chi-square quantile at the normal quantile z (4.75 -> upper tail ~1e-6)."""
    a = 2.0 / (9.0 * df)
    return df * (1.0 - a + z * math.sqrt(a)) ** 3


def chi2(counts: np.ndarray, p: np.ndarray, bins_from: np.ndarray | None = None) -> tuple[float, int]:
    """Pearson chi-square of counts against p. Bins: each token whose expected count under `bins_from`
    (default p) is at least 5, and one bin pooling the rest. A drawn token with p == 0 gives inf."""
    n = counts.sum()
    if counts[p == 0].sum() > 0:
        return math.inf, 1
    ref = p if bins_from is None else bins_from
    big = ref * n >= 5
    obs = np.append(counts[big], counts[~big].sum()).astype(float)
    exp = np.append(p[big], p[~big].sum()) * n
    if obs[-1] == 0 and exp[-1] < 1e-12:
        obs, exp = obs[:-1], exp[:-1]
    if np.any((exp == 0) & (obs > 0)):
        return math.inf, 1
    nz = exp > 0
    return float(((obs[nz] - exp[nz]) ** 2 / exp[nz]).sum()), max(1, int(nz.sum()) - 1)


def draw(engine, temperature: float, top_k: int, top_p: float) -> np.ndarray:
    from lsgpt.engine import SamplingParams

    counts = np.zeros(engine.config.vocab, dtype=np.int64)
    rows = 500
    for start in range(0, N, rows):
        params = [SamplingParams(max_new_tokens=1, temperature=temperature, top_k=top_k, top_p=top_p, seed=s)
                  for s in range(start, start + rows)]
        for out in engine.generate([PROMPT] * rows, params):
            counts[out[-1]] += 1
    return counts


CASES = {  # (temperature, top_k, top_p)
    "temperature_0.6": (0.6, 0, 1.0),
    "temperature_1.7_top_k_6": (1.7, 6, 1.0),
    "top_p_0.8": (1.0, 0, 0.8),
    "all_three": (2.0, 12, 0.9),
}


@pytest.mark.parametrize("case", CASES)
def test_first_token_follows_the_target_distribution(setup, case):
    engine, logits, _ = setup
    t, k, p = CASES[case]
    counts = draw(engine, t, k, p)
    want = target(logits, t, k, p)
    stat, df = chi2(counts, want)
    crit = chi2_critical(df)
    kept = int((want > 0).sum())
    print(f"{case}: chi2 {stat:.1f} on {df} df (critical {crit:.1f}), {kept} tokens kept")
    assert stat < crit, f"{case}: draws do not fit the target distribution (chi2 {stat:.1f} >= {crit:.1f})"

    # power: the same draws must reject what a plausible bug would sample from
    support = want > 0
    bugs = {
        "temperature ignored": target(logits, 1.0, k, p),
        "uniform inside the kept set": support / support.sum(),
        "greedy": np.eye(len(want))[int(np.argmax(logits))],
        "top-k ignored": target(logits, t, 0, p),
        "top-p ignored": target(logits, t, k, 1.0),
    }
    for name, alt in bugs.items():
        if np.abs(alt - want).sum() < 0.05:  # this case does not exercise that bug
            continue
        s_alt, df_alt = chi2(counts, alt, bins_from=want)
        print(f"  rejects '{name}': chi2 {s_alt:.1f} on {df_alt} df")
        assert s_alt >= chi2_critical(df_alt), f"{case}: the draws do not reject '{name}' (chi2 {s_alt:.1f})"


def test_rows_of_one_batch_are_independent_draws(setup):
    """Per-row generators: two rows with different seeds in one batch are not the same draw sequence."""
    from lsgpt.engine import SamplingParams

    engine, _, _ = setup
    params = [SamplingParams(max_new_tokens=20, temperature=1.0, top_k=0, seed=s) for s in (11, 12)]
    a, b = engine.generate([PROMPT, PROMPT], params)
    assert a != b
    assert engine.generate([PROMPT], params[1])[0] == b, "row 1 alone must give what it gave beside row 0"


# ---------------------------------------------------------------------------------------------------------
# Penalties (HF repetition_penalty; OpenAI presence / frequency), against logits penalized here from HF's


def penalize(logits: np.ndarray, prompt: list[int], generated: list[int], rep: float, pres: float, freq: float):
    lg = logits.astype(np.float64).copy()
    for t in set(prompt) | set(generated):
        lg[t] = lg[t] / rep if lg[t] > 0 else lg[t] * rep
    for t in set(generated):
        lg[t] -= pres + freq * generated.count(t)
    return lg


@pytest.mark.parametrize("rep,pres,freq", [(1.8, 0.0, 0.0), (1.0, 1.5, 0.0), (1.0, 0.0, 0.7), (1.0, 0.0, -0.6), (1.3, 0.5, 0.4)])
def test_greedy_with_penalties_follows_the_penalized_argmax(setup, rep, pres, freq):
    """Every greedy step is the argmax of HF's logits penalized (in float64, here) by the prompt and the tokens
    generated so far: a penalty applied to the wrong tokens, with the wrong sign or the wrong count fails."""
    from test_engine_fp16 import hf_logits

    from lsgpt.engine import SamplingParams

    engine, _, hf = setup
    sp = SamplingParams(max_new_tokens=20, top_k=1, repetition_penalty=rep, presence_penalty=pres,
                        frequency_penalty=freq, ignore_eos=True)
    out = engine.generate([PROMPT], sp)[0]
    plain = engine.generate([PROMPT], SamplingParams(max_new_tokens=20, top_k=1, ignore_eos=True))[0]
    assert out != plain, "test premise: the penalty changes the greedy continuation"
    lg = hf_logits(hf, [out])[0]
    for j in range(len(PROMPT), len(out)):
        if tiny.PAD_ID in out[:j]:  # LightSeq's engine embeds the padding id as zeros, HF does not: stop comparing
            break
        want = penalize(lg[j - 1], PROMPT, out[len(PROMPT):j], rep, pres, freq)
        top = np.sort(want)[-2:]
        if top[1] - top[0] < 1e-3:  # a near-tie in fp32 vs fp64: either token is right
            continue
        assert out[j] == int(np.argmax(want)), f"step {j}: {out[j]} is not the penalized argmax {int(np.argmax(want))}"


def test_repetition_penalty_first_token_distribution(setup):
    """Sampling with a repetition penalty: the prompt's tokens are penalized before temperature (chi-square)."""
    from lsgpt.engine import SamplingParams

    engine, logits, _ = setup
    want_lg = penalize(logits, PROMPT, [], 3.0, 0.0, 0.0)
    counts = np.zeros(engine.config.vocab, dtype=np.int64)
    for start in range(0, N, 500):
        params = [SamplingParams(max_new_tokens=1, temperature=0.6, top_k=0, repetition_penalty=3.0, seed=s)
                  for s in range(start, start + 500)]
        for out in engine.generate([PROMPT] * 500, params):
            counts[out[-1]] += 1
    want = target(want_lg, 0.6, 0, 1.0)
    stat, df = chi2(counts, want)
    assert stat < chi2_critical(df), stat
    unpenalized = target(logits, 0.6, 0, 1.0)
    if np.abs(unpenalized - want).sum() > 0.05:
        s_alt, df_alt = chi2(counts, unpenalized, bins_from=want)
        assert s_alt >= chi2_critical(df_alt), "the draws do not reject the unpenalized distribution"


@pytest.mark.parametrize("kw", [dict(repetition_penalty=0.0), dict(repetition_penalty=float("nan")),
                                dict(presence_penalty=2.5), dict(frequency_penalty=-3.0)])
def test_bad_penalties_are_request_errors(setup, kw):
    from lsgpt.engine import RequestError, SamplingParams

    with pytest.raises(RequestError, match=next(iter(kw))):
        setup[0].generate([PROMPT], SamplingParams(**kw))
