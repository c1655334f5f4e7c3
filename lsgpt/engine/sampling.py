"""Decode semantics, once for ``Engine`` and ``Scheduler``: a request's parameters and their validation, the
penalties, sampling, and the rule that ends a row.

Semantics follow LightSeq (docs/format.md §8): the output is prompt + continuation, a row's total length is at
most min(max_step, prompt + extra_decode_length) (extra_decode_length <= 0: max_step), capped by
max_new_tokens, and a row ends at eos_id (unless ignore_eos) or right after one of its stop sequences.
A row's draw depends only on its seed and the position of the token it draws (a counter-based generator), so its
output does not depend on its batch-mates, and every sampled row of a step is drawn in one batched pass.
"""

from __future__ import annotations

import operator
import os
from collections.abc import Sequence
from dataclasses import dataclass, replace
from functools import lru_cache

import torch

from lsgpt.contract import PARAMS, matched_stop, param_error, stop_error
from lsgpt.format import GptConfig, max_output_len


class RequestError(ValueError):
    """A request the engine refuses; the message names the problem (INVALID_ARGUMENT on the server)."""


@dataclass(frozen=True)
class SamplingParams:
    """Per-request generation settings; None takes the model file's value."""

    max_new_tokens: int | None = None
    top_k: int | None = None  # 0: no top-k filter; 1: greedy
    top_p: float | None = None  # 1.0: no nucleus filter
    temperature: float = 1.0  # 0: greedy
    seed: int | None = None  # None: a fresh random seed
    ignore_eos: bool = False  # benchmark mode: always generate to the length limit
    # Penalties, applied to the logits before temperature / top-k / top-p (as HF's and vLLM's samplers do):
    repetition_penalty: float = 1.0  # HF: a token of the prompt or output so far: logit / p if > 0, else logit * p
    presence_penalty: float = 0.0  # OpenAI: minus this once for every token already generated
    frequency_penalty: float = 0.0  # OpenAI: minus this times how often the token was generated
    # Stop sequences (token ids): the row ends right after generating one of them, which is kept in the output
    # (like EOS; HF's stop_strings do the same). Matched against the generated tokens only, not the prompt.
    stop: tuple[tuple[int, ...], ...] = ()
    # Token ids never generated (their logits set to -inf before sampling). None: the engine's default, the
    # vocabulary's non-text special tokens ([PAD], [UNK], [CLS], [MASK]; lsgpt.text.non_text_ids); (): none.
    suppress: tuple[int, ...] | None = None
    # Refuse (RequestError naming the limit) a max_new_tokens beyond what the model allows after the prompt,
    # instead of lowering it to that (LightSeq's, and the default): the OpenAI API's behaviour.
    strict_length: bool = False

    def stops(self, generated: Sequence[int]) -> bool:
        """Does `generated` (the continuation so far) end with one of the stop sequences?"""
        return matched_stop(generated, self.stop) is not None

    @property
    def penalized(self) -> bool:
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0

    def resolved(self, cfg: GptConfig, suppress: tuple[int, ...] = ()) -> SamplingParams:
        """Fill the file's defaults (sampling_method topk -> its topk; topp -> its topp) and the engine's
        `suppress` (when the request has none of its own)."""
        top_k, top_p = self.top_k, self.top_p
        if top_k is None:
            top_k = cfg.topk if cfg.sampling_method == "topk" else 0
        if top_p is None:
            top_p = cfg.topp if cfg.sampling_method == "topp" else 1.0
        seed = self.seed if self.seed is not None else int.from_bytes(os.urandom(6), "little")
        suppress = tuple(suppress) if self.suppress is None else tuple(map(int, self.suppress))
        return replace(self, top_k=top_k, top_p=top_p, seed=seed, suppress=suppress)

    def length_limit(self, cfg: GptConfig, prompt_len: int) -> int:
        """Total length (prompt + continuation) at which the row stops: LightSeq's limit, capped by max_new_tokens."""
        limit = max_output_len(cfg, prompt_len)
        return limit if self.max_new_tokens is None else min(limit, prompt_len + self.max_new_tokens)

    @property
    def greedy(self) -> bool:
        return self.top_k == 1 or self.temperature == 0


# -------------------------------------------------------------------------------------------------
# Validation: the one check of a request on its way in


def _integer(t) -> bool:
    """An integer token id: int, a numpy integer, an integer 0-d tensor; not a bool, a float or a string."""
    if isinstance(t, bool):
        return False
    try:
        operator.index(t)
    except TypeError:
        return False
    return True


def _token_error(tokens, vocab: int) -> str | None:
    """Why a token-id sequence is not one (a non-integer, an id outside 0..vocab-1), or None."""
    for j, t in enumerate(tokens):
        if not _integer(t):
            return f"token id {t!r} at position {j} is not an integer"
        if not 0 <= int(t) < vocab:
            return f"token id {int(t)} at position {j} outside the vocabulary 0..{vocab - 1}"
    return None


def check_generates(cfg: GptConfig) -> None:
    """RequestError unless the model generates (a sampling_method=ppl export only scores)."""
    if cfg.sampling_method == "ppl":
        raise RequestError("this model was exported with sampling_method=ppl: it scores, it does not generate")


def validate_request(cfg: GptConfig, prompt: Sequence[int], params: SamplingParams, row: int = 0,
                     suppress: tuple[int, ...] = ()) -> SamplingParams:
    """Raise RequestError naming the first problem of one request (prompt `row` of its batch); return its params
    resolved (the file's defaults filled in, the seed fixed, `suppress`: the engine's default banned ids)."""
    check_generates(cfg)
    if not isinstance(params, SamplingParams):
        raise RequestError(f"sampling settings must be SamplingParams, got {type(params).__name__}")
    if isinstance(prompt, (str, bytes)) or not hasattr(prompt, "__len__"):
        raise RequestError(f"prompt {row} must be a sequence of token ids, got {type(prompt).__name__}")
    if len(prompt) == 0:
        raise RequestError(f"prompt {row} is empty")
    if len(prompt) >= cfg.max_step:
        raise RequestError(f"prompt too long: {len(prompt)} tokens (prompt {row}), the model's max_step is "
                           f"{cfg.max_step} (prompt + new tokens must fit in it)")
    why = _token_error(prompt, cfg.vocab)
    if why:
        raise RequestError(f"prompt {row}: {why}")
    for name in PARAMS:
        why = param_error(name, getattr(params, name))
        if why:
            raise RequestError(why)
    why = _stop_sequences_error(params.stop, cfg.vocab)
    if why:
        raise RequestError(why)
    if params.suppress is not None:
        why = _token_error(params.suppress, cfg.vocab)
        if why:
            raise RequestError(f"suppress: {why}")
    _check_length(cfg, len(prompt), params)
    return params.resolved(cfg, suppress)


def validate_batch(cfg: GptConfig, prompts: Sequence[Sequence[int]],
                   params: SamplingParams | Sequence[SamplingParams], suppress: tuple[int, ...] = (),
                   max_batch_size: int | None = None) -> list[SamplingParams]:
    """A request of several rows: RequestError naming the first problem (the batch's, then each row's by
    validate_request); the per-row resolved params."""
    if len(prompts) == 0:
        check_generates(cfg)  # a ppl model's refusal comes first
        raise RequestError("empty batch: give at least one prompt")
    if max_batch_size and len(prompts) > max_batch_size:
        raise RequestError(f"batch of {len(prompts)} prompts exceeds max_batch_size={max_batch_size}")
    plist = [params] * len(prompts) if isinstance(params, SamplingParams) else list(params)
    if len(plist) != len(prompts):
        raise RequestError(f"{len(plist)} sampling settings for {len(prompts)} prompts")
    return [validate_request(cfg, p, sp, i, suppress) for i, (p, sp) in enumerate(zip(prompts, plist))]


def _check_length(cfg: GptConfig, prompt_len: int, params: SamplingParams) -> None:
    """With strict_length: RequestError unless max_new_tokens fits what the model allows after the prompt."""
    allowed = max_output_len(cfg, prompt_len) - prompt_len
    if params.strict_length and params.max_new_tokens is not None and params.max_new_tokens > allowed:
        raise RequestError(f"max_new_tokens={params.max_new_tokens} is more than this model allows: at most "
                           f"{allowed} new tokens after this {prompt_len}-token prompt (max_step {cfg.max_step}"
                           + (f", extra_decode_length {cfg.extra_decode_length})" if cfg.extra_decode_length > 0
                              else ")"))


def _stop_sequences_error(stop, vocab: int) -> str | None:
    """Why `stop` is not a set of stop sequences (token-id sequences within the vocabulary), or None."""
    def seq(x) -> bool:
        return not isinstance(x, (str, bytes)) and isinstance(x, Sequence)

    if not seq(stop) or not all(seq(s) for s in stop):
        return f"stop must be a sequence of token-id sequences, got {stop!r}"
    bad = [t for s in stop for t in s if not _integer(t)]
    if bad:
        return f"stop sequence token id {bad[0]!r} is not an integer"
    return stop_error(stop, vocab)


# -------------------------------------------------------------------------------------------------
# The end of a row


def row_finished(sp: SamplingParams, eos_id: int, tok: int, length: int, limit: int,
                 tokens: Sequence[int], prompt_len: int) -> bool:
    """Does a row end with `tok`, the token that just made it `length` long (`tokens`: the row so far, prompt
    and continuation, or at least its continuation's stop-sequence tail after `prompt_len`)? EOS (unless
    ignore_eos), the length limit, or a stop sequence matched within the continuation."""
    return (tok == eos_id and not sp.ignore_eos) or length >= limit or (
        bool(sp.stop) and sp.stops(tokens[prompt_len:]))


# -------------------------------------------------------------------------------------------------
# Penalties


@dataclass
class Penalties:
    """Per-row token statistics on the device: seen (prompt + output) for the repetition penalty, output counts
    for presence / frequency. Kept only when some row asks for a penalty."""

    rep: torch.Tensor  # [B, 1]
    presence: torch.Tensor  # [B, 1]
    frequency: torch.Tensor  # [B, 1]
    seen: torch.Tensor  # [B, V] bool
    counts: torch.Tensor  # [B, V] float32

    @classmethod
    def start(cls, rows: Sequence[SamplingParams], tokens: torch.Tensor, lens, vocab: int) -> Penalties:
        """The rows' settings, with the prompts tokens [B, P] (right-padded; `lens` their lengths) seen."""
        dev, B = tokens.device, len(rows)
        col = lambda name: torch.tensor([[getattr(sp, name)] for sp in rows], dtype=torch.float32, device=dev)  # noqa: E731
        seen = torch.zeros(B, vocab, dtype=torch.bool, device=dev)
        real = torch.arange(tokens.shape[1], device=dev)[None] < torch.as_tensor(lens, device=dev)[:, None]
        seen.scatter_(1, torch.where(real, tokens, tokens[:, :1]), True)  # prompt tokens (padding -> first token)
        counts = torch.zeros(B, vocab, dtype=torch.float32, device=dev)
        return cls(col("repetition_penalty"), col("presence_penalty"), col("frequency_penalty"), seen, counts)

    @classmethod
    def neutral(cls, rows: int, vocab: int, device: torch.device) -> Penalties:
        """`rows` rows that penalize nothing (a scheduler's free slots)."""
        return cls(torch.ones(rows, 1, device=device), torch.zeros(rows, 1, device=device),
                   torch.zeros(rows, 1, device=device), torch.zeros(rows, vocab, dtype=torch.bool, device=device),
                   torch.zeros(rows, vocab, device=device))

    def assign(self, index: torch.Tensor, new: Penalties) -> None:
        """Rows `index` take `new`'s settings and statistics."""
        self.rep[index], self.presence[index], self.frequency[index] = new.rep, new.presence, new.frequency
        self.counts[index] = new.counts
        self.seen[index] = new.seen

    def clear(self, row: int) -> None:
        """Row `row` penalizes nothing from now on (its statistics stay until the row is assigned again)."""
        self.rep[row], self.presence[row], self.frequency[row] = 1.0, 0.0, 0.0

    def select(self, index) -> Penalties:
        """The rows `index` (a slice: views that update in place; an index tensor: a copy)."""
        return Penalties(self.rep[index], self.presence[index], self.frequency[index], self.seen[index],
                         self.counts[index])

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        lg = logits.float()
        lg = torch.where(self.seen, torch.where(lg > 0, lg / self.rep, lg * self.rep), lg)
        return lg - self.presence * (self.counts > 0) - self.frequency * self.counts

    def update(self, nxt: torch.Tensor, rows: torch.Tensor | None = None) -> None:
        """Count the sampled tokens nxt [R]: of every row (rows None), or of rows `rows` (distinct)."""
        if rows is None:
            self.counts.scatter_add_(1, nxt[:, None], torch.ones_like(nxt[:, None], dtype=torch.float32))
            self.seen.scatter_(1, nxt[:, None], True)
        else:
            self.counts[rows, nxt] += 1
            self.seen[rows, nxt] = True


# -------------------------------------------------------------------------------------------------
# Sampling


def argmax_rows(logits: torch.Tensor) -> torch.Tensor:
    """Each row's largest logit's index, as torch.argmax gives it (the first on ties; a NaN counts as the
    largest). On the CPU, numpy's argmax, which agrees with torch's on ties, NaN and infinities
    (tests/test_engine_fp16.py) and is much faster there (docs/decisions.md)."""
    if logits.device.type == "cpu" and logits.dtype == torch.float32:
        return torch.from_numpy(logits.numpy().argmax(-1))
    return logits.argmax(-1)


@lru_cache(maxsize=16)
def _id_tensor(ids: tuple[int, ...], device: torch.device) -> torch.Tensor:
    return torch.tensor(ids, dtype=torch.long, device=device)


def suppressed(logits: torch.Tensor, rows: Sequence[SamplingParams], common: tuple[int, ...] | None = None
               ) -> torch.Tensor:
    """`logits` [B, V] with each row's suppress ids at -inf, in place: a step's logits are its own scratch (a copy
    of [B, V] every step cost more than the fill on the CPU). `common`: the one set every row has, when the
    caller keeps track of it (the scheduler), instead of a check of every row."""
    first = (rows[0].suppress or ()) if common is None else common
    # the usual case: one set for the whole batch, the engine's own tuple in every row (an identity check per row:
    # this runs every decode step, on the host)
    if common is not None or all(sp.suppress is first for sp in rows) or all((sp.suppress or ()) == first for sp in rows):
        return logits.index_fill_(1, _id_tensor(first, logits.device), float("-inf")) if first else logits
    for b, sp in enumerate(rows):
        if sp.suppress:
            logits[b, _id_tensor(sp.suppress, logits.device)] = float("-inf")
    return logits


_M31 = 0x7FFFFFFF  # the generator works on 31-bit words: every product below stays under 2**62, exact in int64


def _mix31(x: torch.Tensor) -> torch.Tensor:
    """An integer hash of 31-bit words (xor-shift / multiply rounds): each output bit depends on every input bit."""
    for _ in range(2):
        x = ((x >> 16) ^ x) & _M31
        x = (x * 0x45D9F3B) & _M31
    return ((x >> 16) ^ x) & _M31


def uniform(seeds: torch.Tensor, counters: torch.Tensor) -> torch.Tensor:
    """One draw in (0, 1) per row from its seed (int64, [0, 2**63)) and counter (the position of the token it
    draws): a counter-based generator, so a row's draws are the same alone or in any batch, on any device.
    Float32 on a grid of 2**-23: never 0 or 1."""
    h = _mix31(seeds & _M31)
    h = _mix31(h ^ ((seeds >> 31) & _M31))
    h = _mix31(h ^ (seeds >> 62) ^ 0x2545F491)
    h = _mix31(h ^ (counters & _M31))
    return ((h >> 8).float() + 0.5) * 2.0**-23


def _draw(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
          u: torch.Tensor, k_max: int, nucleus: bool) -> torch.Tensor:
    """Rows [S, V] (float32) -> one token each: temperature, then top-k (ties with the k-th kept), then top-p
    over what is left, then the token whose cumulative probability first passes u. k_max > 0: every row has a
    top-k of at most k_max, so its k_max best logits are all that is sorted."""
    V = logits.shape[-1]
    lg = logits / temperature[:, None]
    if 0 < k_max < V:
        vals, ids = torch.topk(lg, k_max, dim=-1)  # sorted, best first
    else:
        vals, ids = torch.sort(lg, dim=-1, descending=True)
    n = vals.shape[-1]
    k = torch.where((top_k > 0) & (top_k < n), top_k, n)
    vals = vals.masked_fill(vals < vals.gather(1, (k - 1)[:, None]), float("-inf"))
    probs = torch.softmax(vals, dim=-1)
    if nucleus:  # keep the smallest prefix whose mass reaches top_p (always the top token)
        drop = (probs.cumsum(-1) - probs >= top_p[:, None]) & (top_p < 1.0)[:, None]
        probs = probs.masked_fill(drop, 0.0)
    cdf = probs.cumsum(-1)
    j = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True)
    last = (probs > 0).sum(-1, keepdim=True) - 1  # the kept tokens are a prefix: never past them (rounding)
    return ids.gather(1, torch.minimum(j, last))[:, 0]


def sample(logits: torch.Tensor, rows: Sequence[SamplingParams], counters: torch.Tensor,
           drawn: Sequence[int] | None = None, suppress: tuple[int, ...] | None = None) -> torch.Tensor:
    """Next token per row: the suppressed ids removed, then greedy rows take the argmax and the others draw
    (temperature, top-k, top-p) all at once; `counters` [B] (on the logits' device): the position of the token
    each row draws. No host synchronisation: the sampled rows' parameters go up in two copies from pinned memory.
    A caller that keeps them (the scheduler, every step) may pass `drawn`, the rows that do not sample greedily,
    and `suppress`, the one suppress set of every row, instead of a pass over the rows to find them."""
    logits = suppressed(logits, rows, suppress)
    greedy = argmax_rows(logits)
    if drawn is None:
        drawn = [b for b, sp in enumerate(rows) if not sp.greedy]
    if not drawn:
        return greedy
    sps = [rows[b] for b in drawn]
    ints = torch.tensor([drawn, [sp.seed or 0 for sp in sps], [sp.top_k or 0 for sp in sps]], dtype=torch.long)
    floats = torch.tensor([[sp.temperature for sp in sps], [1.0 if sp.top_p is None else sp.top_p for sp in sps]],
                          dtype=torch.float32)
    if logits.is_cuda:
        ints, floats = (t.pin_memory().to(logits.device, non_blocking=True) for t in (ints, floats))
    idx, seeds, top_k = ints
    k_max = 0 if any(not sp.top_k for sp in sps) else max(sp.top_k for sp in sps)
    nucleus = any(sp.top_p is not None and sp.top_p < 1.0 for sp in sps)
    tok = _draw(logits[idx].float(), floats[0], top_k, floats[1], uniform(seeds, counters[idx]), k_max, nucleus)
    out = greedy.clone()
    out[idx] = tok
    return out
