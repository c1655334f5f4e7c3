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
    from lsgpt.engine.engine import Engine
    from lsgpt.export.convert import export_model

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
    from lsgpt.engine.engine import SamplingParams

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
    from lsgpt.engine.engine import SamplingParams

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

    from lsgpt.engine.engine import SamplingParams

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
    from lsgpt.engine.engine import SamplingParams

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
    sp = SamplingParams(temperature=0.6, top_k=0, top_p=1.0, repetition_penalty=3.0)
    assert np.allclose(penalized_target(logits, PROMPT, [], sp), want, atol=1e-12), "HF's processor agrees"
    rejected = 0
    for bug in ("penalties ignored", "repetition: branches swapped", "repetition: sign of the logit ignored"):
        alt = penalized_target(logits, PROMPT, [], sp, bug)
        if np.abs(alt - want).sum() < 0.05:  # no visible effect on this prompt (e.g. a seen token far below)
            continue
        s_alt, df_alt = chi2(counts, alt, bins_from=want)
        assert s_alt >= chi2_critical(df_alt), f"the draws do not reject '{bug}'"
        rejected += 1
    # On this model the prompt's tokens carry < 1% of the mass at T = 0.6, so only the swapped branches (which
    # boost them to the top) move it visibly; the controlled model below has the power against the other bugs.
    assert rejected >= 1, "test premise: a plausible bug visibly moves this distribution"


@pytest.mark.parametrize("kw", [dict(repetition_penalty=0.0), dict(repetition_penalty=float("nan")),
                                dict(presence_penalty=2.5), dict(frequency_penalty=-3.0)])
def test_bad_penalties_are_request_errors(setup, kw):
    from lsgpt.engine.engine import RequestError, SamplingParams

    with pytest.raises(RequestError, match=next(iter(kw))):
        setup[0].generate([PROMPT], SamplingParams(**kw))


# ---------------------------------------------------------------------------------------------------------
# Penalties at every step of a known history: the distribution of each new token given the tokens generated so
# far. The model is built so that the tokens that matter have logits of both signs near the top: its final
# LayerNorm has weight 0 and bias b, so every position's hidden state is b and the logits are wte @ b. Seven
# "live" tokens get logits in [-1, 2] and all others -60 (never drawn: < 1e-10 per draw at T <= 2). Context
# cannot move the logits, so the history only acts through the penalties. Each row of the engine generates 3
# tokens with its own seed; rows are grouped by (step, exact history so far), and each group's tokens are
# chi-square tested against the target computed here from HF's logits for that very sequence: HF's own
# RepetitionPenaltyLogitsProcessor (HF semantics: the prompt and the output so far, logit / p if > 0 else * p),
# then OpenAI's presence / frequency rule (logit - presence·[count > 0] - frequency·count over the generated
# tokens only), then temperature, top-k, top-p (HF's order: processors before warpers). Per-group statistics are
# summed (the groups' draws are independent given the histories): false alarm < 1e-6 per case.

LIVE = {11: 2.0, 22: 1.6, 33: 1.2, 44: 0.6, 55: -0.3, 66: -0.6, 77: -1.0}
PEN_PROMPT = [55, 44, 66, 900, 901]  # seen before any output: logits +0.6, -0.3, -0.6 and two dead tokens
PEN_ROWS = 8000  # the weakest bug (presence and frequency swapped) then scores ~4x its critical value's excess
MIN_GROUP = 150  # a (step, history) group with fewer rows is left out (selection on the past only: no bias)


@pytest.fixture(scope="module")
def controlled(tmp_path_factory):
    from test_engine_fp16 import hf_from_file

    from lsgpt.engine.engine import Engine
    from lsgpt.export.convert import export_model

    model = tiny.make_model(seed=5, wide=True)
    h = model.config.n_embd
    with torch.no_grad():
        model.transformer.ln_f.weight.zero_()
        model.transformer.ln_f.bias.copy_(torch.zeros(h))
        model.transformer.ln_f.bias[0] = 10.0
        model.transformer.wte.weight[:, 0] = -6.0  # dead: logit -60
        for t, v in LIVE.items():
            model.transformer.wte.weight[t, 0] = v / 10.0
    path = export_model(model, tmp_path_factory.mktemp("pen") / "m.hdf5", max_step=64, eos_id=tiny.EOS_ID)
    return Engine.load(path, device="cpu"), hf_from_file(path, model)


def penalized_target(logits, prompt, generated, sp, bug: str | None = None) -> np.ndarray:
    """The distribution of the next token (float64). `bug` names a plausible wrong implementation instead."""
    from transformers import RepetitionPenaltyLogitsProcessor

    lg = np.asarray(logits, dtype=np.float64).copy()
    rep, pres, freq = sp.repetition_penalty, sp.presence_penalty, sp.frequency_penalty
    t, k, p = sp.temperature, sp.top_k, sp.top_p
    if bug == "penalties ignored":
        return target(lg, t, k, p)
    if bug == "repetition: branches swapped":
        for tok in set(prompt) | set(generated):
            lg[tok] = lg[tok] * rep if lg[tok] > 0 else lg[tok] / rep
    elif bug == "repetition: sign of the logit ignored":
        for tok in set(prompt) | set(generated):
            lg[tok] /= rep
    elif bug == "repetition: prompt not counted":
        for tok in set(generated):
            lg[tok] = lg[tok] / rep if lg[tok] > 0 else lg[tok] * rep
    elif bug == "repetition: output not counted":
        for tok in set(prompt):
            lg[tok] = lg[tok] / rep if lg[tok] > 0 else lg[tok] * rep
    else:
        ids = torch.tensor([list(prompt) + list(generated)])
        lg = RepetitionPenaltyLogitsProcessor(penalty=rep)(ids, torch.tensor(lg)[None])[0].numpy()
    counts = {tok: generated.count(tok) for tok in set(generated)}
    if bug == "presence/frequency: prompt counted":
        counts = {tok: (list(prompt) + list(generated)).count(tok) for tok in set(prompt) | set(generated)}
    for tok, c in counts.items():
        if bug == "presence/frequency: swapped":
            pen = freq + pres * c
        elif bug == "presence/frequency: sign flipped":
            pen = -(pres + freq * c)
        else:
            pen = pres + freq * c
        if bug != "presence/frequency: after temperature":
            lg[tok] -= pen
    if bug == "presence/frequency: after temperature":  # logits / T, then the penalties
        z = lg / t
        for tok, c in counts.items():
            z[tok] -= pres + freq * c
        return target(z, 1.0, k, p)
    if bug == "penalties after top-k":  # the kept set chosen from the unpenalized logits
        keep = target(np.asarray(logits, dtype=np.float64), t, k, 1.0) > 0
        return target(np.where(keep, lg, -np.inf), t, 0, p)
    return target(lg, t, k, p)


PEN_CASES = {  # SamplingParams fields; the bugs each case must reject
    "repetition": (dict(repetition_penalty=2.5, temperature=1.0),
                   ["penalties ignored", "repetition: branches swapped", "repetition: sign of the logit ignored",
                    "repetition: prompt not counted", "repetition: output not counted"]),
    "presence_frequency": (dict(presence_penalty=1.8, frequency_penalty=-0.6, temperature=1.5),
                           ["penalties ignored", "presence/frequency: swapped", "presence/frequency: sign flipped",
                            "presence/frequency: after temperature", "presence/frequency: prompt counted"]),
    "frequency_top_k": (dict(frequency_penalty=1.2, temperature=0.8, top_k=3),
                        ["penalties ignored", "presence/frequency: after temperature", "penalties after top-k",
                         "presence/frequency: sign flipped"]),
    "all_three_top_p": (dict(repetition_penalty=1.5, presence_penalty=0.6, frequency_penalty=0.5, temperature=1.3,
                             top_p=0.9),
                        ["penalties ignored", "repetition: output not counted", "presence/frequency: prompt counted",
                         "presence/frequency: after temperature"]),
}


@pytest.mark.parametrize("case", PEN_CASES)
def test_penalized_sampling_follows_the_target_given_the_history(controlled, case):
    from test_engine_fp16 import hf_logits

    from lsgpt.engine.engine import SamplingParams

    engine, hf = controlled
    kw, bugs = PEN_CASES[case]
    kw = dict(top_k=0, top_p=1.0) | kw
    n_new, P = 3, len(PEN_PROMPT)
    outs = []
    for start in range(0, PEN_ROWS, 1000):
        params = [SamplingParams(max_new_tokens=n_new, ignore_eos=True, seed=s, **kw)
                  for s in range(start, start + 1000)]
        outs += engine.generate([PEN_PROMPT] * 1000, params)
    groups: dict[tuple[int, ...], np.ndarray] = {}
    for out in outs:
        assert len(out) == P + n_new
        for j in range(n_new):
            key = tuple(out[P:P + j])
            groups.setdefault(key, np.zeros(engine.config.vocab, dtype=np.int64))[out[P + j]] += 1
    sp = SamplingParams(**kw)
    stat, df, alt_stats, used = 0.0, 0, dict.fromkeys(bugs, 0.0), 0
    alt_df = dict.fromkeys(bugs, 0)
    for hist, counts in groups.items():
        if counts.sum() < MIN_GROUP:
            continue
        used += int(counts.sum())
        lg = hf_logits(hf, [PEN_PROMPT + list(hist)])[0][-1]
        want = penalized_target(lg, PEN_PROMPT, list(hist), sp)
        s, d = chi2(counts, want)
        stat, df = stat + s, df + d
        for bug in bugs:
            s_alt, d_alt = chi2(counts, penalized_target(lg, PEN_PROMPT, list(hist), sp, bug), bins_from=want)
            alt_stats[bug] += s_alt
            alt_df[bug] += d_alt
    crit = chi2_critical(df)
    print(f"{case}: {used} draws in {sum(c.sum() >= MIN_GROUP for c in groups.values())} (step, history) groups, "
          f"chi2 {stat:.1f} on {df} df (critical {crit:.1f})")
    assert used >= 0.8 * PEN_ROWS * n_new, "test premise: most draws fall in groups large enough to test"
    assert stat < crit, f"{case}: the draws do not fit the penalized target (chi2 {stat:.1f} >= {crit:.1f})"
    for bug in bugs:
        print(f"  rejects '{bug}': chi2 {alt_stats[bug]:.1f} on {alt_df[bug]} df "
              f"(critical {chi2_critical(alt_df[bug]):.1f})")
        assert alt_stats[bug] >= chi2_critical(alt_df[bug]), f"{case}: the draws do not reject '{bug}'"


# ---------------------------------------------------------------------------------------------------------
# Stop sequences while sampling: each row is what the same seed gives without stops, cut right after the first
# place where one of them has just been generated (tests/test_scheduler.py checks the greedy case against HF).


def _cut_after_first_stop(new: list[int], stops: list[tuple[int, ...]]) -> tuple[list[int], tuple[int, ...] | None]:
    for end in range(1, len(new) + 1):
        for s in stops:
            if end >= len(s) and tuple(new[end - len(s):end]) == s:
                return new[:end], s
    return new, None


def test_sampled_rows_end_at_their_first_stop_sequence(setup):
    from collections import Counter

    from lsgpt.engine.engine import SamplingParams

    engine = setup[0]
    n, seeds = 30, list(range(100, 132))
    base = dict(max_new_tokens=n, temperature=1.0, top_k=4, ignore_eos=True)
    free = [out[len(PROMPT):] for out in
            engine.generate([PROMPT] * len(seeds), [SamplingParams(seed=s, **base) for s in seeds])]
    bigrams = Counter(tuple(r[i:i + 2]) for r in free for i in range(2, n - 1))
    singles = Counter(t for r in free for t in r[5:])
    pair = bigrams.most_common(1)[0][0]
    single = next(t for t, _ in singles.most_common() if t not in pair)
    stops = [pair, (single,), (997, 996, 995)]  # the last one is never generated (top-4 of a 1000-token vocab)
    want = [_cut_after_first_stop(r, stops) for r in free]
    ended_by = Counter(s for _, s in want)
    print(f"stops {stops}: rows ended by {dict(ended_by)}")
    assert ended_by[pair] >= 2 and ended_by[(single,)] >= 2, "test premise: both stops end some rows"
    # a row where the pair's first token came earlier without its second: a partial match must not end it
    assert any(pair[0] in cut[:-2] for cut, s in want if s == pair) or any(
        pair[0] in cut[:-1] for cut, s in want if s == (single,)), "test premise: a partial match occurs first"
    got = engine.generate([PROMPT] * len(seeds), [SamplingParams(seed=s, stop=tuple(stops), **base) for s in seeds])
    assert [g[len(PROMPT):] for g in got] == [cut for cut, _ in want]
    k = seeds.index(next(s for s, (_, why) in zip(seeds, want) if why == pair))
    assert list(engine.stream(PROMPT, SamplingParams(seed=seeds[k], stop=tuple(stops), **base))) == want[k][0]


# ---------------------------------------------------------------------------------------------------------
# The batched sampler's parts: its counter-based draws, and its pick against the inverse-CDF formula


def test_counter_draws_are_uniform_and_unrelated_across_seeds_and_positions():
    """A row's draw comes from (seed, position) alone. Oracle: the uniform distribution — chi-square over 64
    equal bins for consecutive seeds at one position and for one seed over consecutive positions (the two ways
    the engine walks the generator), and no correlation between a position's draw and the next one's."""
    from lsgpt.engine.sampling import uniform

    n = 64_000
    seeds = torch.arange(n, dtype=torch.long)
    by_seed = uniform(seeds, torch.full((n,), 7, dtype=torch.long)).double().numpy()
    by_pos = uniform(torch.full((n,), 12345, dtype=torch.long), torch.arange(n, dtype=torch.long)).double().numpy()
    big = uniform(seeds * 0x9E3779B97F4A7 % 2**63, torch.zeros(n, dtype=torch.long)).double().numpy()  # high bits
    for name, u in (("seeds", by_seed), ("positions", by_pos), ("large seeds", big)):
        assert 0.0 < u.min() and u.max() < 1.0, name
        counts = np.histogram(u, bins=64, range=(0.0, 1.0))[0]
        stat = float(((counts - n / 64) ** 2 / (n / 64)).sum())
        assert stat < chi2_critical(63), f"{name}: not uniform (chi2 {stat:.1f} on 63 df)"
        r = np.corrcoef(u[:-1], u[1:])[0, 1]
        assert abs(r) < 0.02, f"{name}: neighbouring draws correlate ({r:.4f})"
    # a row's draws do not depend on its batch: the same (seed, position) alone gives the same number
    alone = uniform(torch.tensor([41]), torch.tensor([9]))
    assert alone.item() == uniform(torch.tensor([3, 41, 5]), torch.tensor([9, 9, 9]))[1].item()


@pytest.mark.parametrize("case", CASES)
def test_the_batched_pick_is_the_inverse_cdf_of_the_target(setup, case):
    """Given the same uniform number u, the batched sampler must pick the token the target distribution's
    inverse CDF gives (tokens ranked by probability, the first whose cumulative mass exceeds u). Oracle: the
    float64 target of HF's logits above; rows of one call carry different (temperature, top-k, top-p) and
    greedy rows, so the per-row parameters must not leak between rows."""
    from lsgpt.engine.sampling import SamplingParams, sample, uniform

    _, logits, _ = setup
    t, k, p = CASES[case]
    rows, want, counters = [], [], []
    for i in range(200):
        if i % 7 == 3:  # greedy rows mixed in
            rows.append(SamplingParams(top_k=1, top_p=1.0, temperature=1.0, seed=i, suppress=()))
            want.append(int(np.argmax(logits)))
        else:
            tt, kk, pp = (t, k, p) if i % 2 else (1.0, 0, 1.0)  # half the rows plain temperature-1 sampling
            rows.append(SamplingParams(top_k=kk, top_p=pp, temperature=tt, seed=i, suppress=()))
            tgt = target(logits, tt, kk, pp)
            order = np.argsort(-tgt, kind="stable")
            u = uniform(torch.tensor([i]), torch.tensor([len(PROMPT)])).double().item()
            want.append(int(order[np.searchsorted(np.cumsum(tgt[order]), u * tgt.sum(), side="right")]))
        counters.append(len(PROMPT))
    lg = torch.tensor(np.tile(logits, (len(rows), 1)), dtype=torch.float32)
    got = sample(lg, rows, torch.tensor(counters)).tolist()
    agree = sum(g == w for g, w in zip(got, want))
    # float32 against float64 may move a u that falls within rounding of a cumulative boundary: at most one row
    assert agree >= len(rows) - 1, f"{case}: {agree}/{len(rows)} picks agree"
