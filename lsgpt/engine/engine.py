"""Engine: load a LightSeq GPT HDF5 file (fp16 ``Gpt`` or int8 ``QuantGpt``) and generate from it.

Semantics follow LightSeq (docs/format.md §8): the output is prompt + continuation, a row's total length is at
most min(max_step, prompt + extra_decode_length) (extra_decode_length <= 0: max_step), and a row ends at
eos_id. Beyond LightSeq: prompts of different lengths in one batch (each row gets what it gets alone),
per-request max_new_tokens / top_k / top_p / temperature / seed, and reproducible sampling: each row
draws from its own generator seeded by its seed, so its output does not depend on its batch-mates.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace

import torch

from lsgpt.contract import PARAMS, matched_stop, param_error, stop_error
from lsgpt.engine.fused import FusedForward
from lsgpt.engine.fused import available as fused_available
from lsgpt.engine.int8 import QuantGPT
from lsgpt.engine.model import GPT
from lsgpt.format import GptConfig, max_output_len, read_hdf5


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

    def stops(self, generated: Sequence[int]) -> bool:
        """Does `generated` (the continuation so far) end with one of the stop sequences?"""
        return matched_stop(generated, self.stop) is not None

    @property
    def penalized(self) -> bool:
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0

    def resolved(self, cfg: GptConfig) -> SamplingParams:
        """Fill the file's defaults (sampling_method topk -> its topk; topp -> its topp)."""
        top_k, top_p = self.top_k, self.top_p
        if top_k is None:
            top_k = cfg.topk if cfg.sampling_method == "topk" else 0
        if top_p is None:
            top_p = cfg.topp if cfg.sampling_method == "topp" else 1.0
        seed = self.seed if self.seed is not None else int.from_bytes(os.urandom(6), "little")
        return replace(self, top_k=top_k, top_p=top_p, seed=seed)

    def length_limit(self, cfg: GptConfig, prompt_len: int) -> int:
        """Total length (prompt + continuation) at which the row stops: LightSeq's limit, capped by max_new_tokens."""
        limit = max_output_len(cfg, prompt_len)
        return limit if self.max_new_tokens is None else min(limit, prompt_len + self.max_new_tokens)

    @property
    def greedy(self) -> bool:
        return self.top_k == 1 or self.temperature == 0


class GraphedDecode:
    """One decode step (B rows, one token each) captured as a CUDA graph over a fixed cache of max_step slots.

    Replaying it costs one launch instead of dozens of kernels: at batch 1 decode is launch-bound.
    Capture runs the step on zeros, which scribbles on cache slot 0; that is why it happens before prefill.
    """

    def __init__(self, step: Callable, cache, batch: int, device: torch.device, compile: bool = False):
        self.cache = cache
        # torch.compile fuses the reference int8 path's many small elementwise kernels (quantize, requantize, bias)
        self._fn = torch.compile(step, dynamic=False) if compile else step
        self.tok = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.pos = torch.zeros(batch, 1, dtype=torch.long, device=device)
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(2):  # warm-up outside the graph (lazy init, kernel compilation, cuBLAS workspaces)
                self._step()
        torch.cuda.current_stream(device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = self._step()

    def _step(self) -> torch.Tensor:
        return self._fn(self.tok, self.pos, self.cache)

    def __call__(self, tok: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        self.tok.copy_(tok)
        self.pos.copy_(pos)
        self.graph.replay()
        return self.logits


class Engine:
    def __init__(
        self,
        cfg: GptConfig,
        model,
        device: torch.device,
        max_batch_size: int | None = None,
        cuda_graphs: bool = True,
        compile: bool = False,
        fused: bool | None = None,
    ):
        self.config, self.model, self.device = cfg, model, device
        self.max_batch_size = max_batch_size
        self.cuda_graphs = cuda_graphs and device.type == "cuda"
        # the fused Triton kernels (lsgpt.engine.fused) on CUDA unless fused=False or LSGPT_FUSED=0
        use_fused = fused_available(device) if fused is None else fused
        self.fused = None
        if use_fused:
            try:
                self.fused = FusedForward(model)
                self.fused.check_against(self._reference_logits)
            except Exception as e:  # noqa: BLE001 - e.g. no writable Triton cache, a GPU Triton cannot target
                if fused:  # asked for explicitly: fail loudly
                    raise
                warnings.warn(f"lsgpt: fused GPU kernels unavailable ({type(e).__name__}: {e}); "
                              "serving with the reference path", stacklevel=2)
                self.fused = None
        self.compile = compile and self.cuda_graphs and self.fused is None
        self._graphs: dict[int, GraphedDecode] = {}  # batch size -> captured decode step (and its cache)

    @classmethod
    def load(
        cls,
        path: str | os.PathLike,
        device: str | torch.device | None = None,
        max_batch_size: int | None = None,
        compile: bool = False,
        fused: bool | None = None,
    ) -> Engine:
        """Read and validate the file, then build the fp16 or int8 model on `device` (default: CUDA if present)."""
        cfg, arrays = read_hdf5(path)
        dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        dtype = torch.float16 if dev.type == "cuda" else torch.float32
        model = (QuantGPT if cfg.quantized else GPT)(cfg, arrays, dev, dtype)
        return cls(cfg, model, dev, max_batch_size, compile=compile, fused=fused)

    @property
    def backend(self) -> str:
        """What runs the forward: the fused Triton kernels, or the reference path (and its int8 GEMM backend)."""
        if self.fused is not None:
            return "triton-fused"
        if self.config.quantized:
            return "reference/" + self.model.layers[0]["ffn_first_kernel"].backend
        return "reference"

    def _forward_logits(self, tokens, positions, cache, last: torch.Tensor | None = None, static: bool = False):
        """fp32 logits [R, V] of the flat rows `last` (None: all B·T rows) after a forward over tokens [B, T]."""
        if self.fused is not None:
            return self.fused(tokens, positions, cache, last)
        return self._reference_logits(tokens, positions, cache, last, static)

    def _reference_logits(self, tokens, positions, cache, last: torch.Tensor | None = None, static: bool = False):
        """The same through the reference path (lsgpt.engine.model / lsgpt.engine.int8)."""
        m = self.model
        hidden = m.forward(tokens, positions, cache, static=static)
        hidden = hidden.reshape(-1, hidden.shape[-1])
        return m.logits(hidden if last is None else hidden[last])

    def _decode_fn(self, tok: torch.Tensor, pos: torch.Tensor, cache) -> torch.Tensor:
        return self._forward_logits(tok, pos, cache, static=True)

    # ---------------------------------------------------------------------------------------------
    # Validation

    def validate(self, prompts: Sequence[Sequence[int]], params: SamplingParams | Sequence[SamplingParams]) -> list:
        """Raise RequestError naming the first problem; return the per-row resolved params."""
        c = self.config
        if c.sampling_method == "ppl":
            raise RequestError("this model was exported with sampling_method=ppl: it scores, it does not generate")
        if len(prompts) == 0:
            raise RequestError("empty batch: give at least one prompt")
        if self.max_batch_size and len(prompts) > self.max_batch_size:
            raise RequestError(f"batch of {len(prompts)} prompts exceeds max_batch_size={self.max_batch_size}")
        plist = [params] * len(prompts) if isinstance(params, SamplingParams) else list(params)
        if len(plist) != len(prompts):
            raise RequestError(f"{len(plist)} sampling settings for {len(prompts)} prompts")
        for i, p in enumerate(prompts):
            if len(p) == 0:
                raise RequestError(f"prompt {i} is empty")
            if len(p) >= c.max_step:
                raise RequestError(f"prompt {i} has {len(p)} tokens; it must be shorter than max_step={c.max_step}")
            bad = [t for t in p if not 0 <= int(t) < c.vocab]
            if bad:
                raise RequestError(f"prompt {i}: token id {bad[0]} outside the vocabulary 0..{c.vocab - 1}")
        for sp in plist:
            for name in PARAMS:
                why = param_error(name, getattr(sp, name))
                if why:
                    raise RequestError(why)
            why = stop_error(sp.stop, c.vocab)
            if why:
                raise RequestError(why)
        return [sp.resolved(c) for sp in plist]

    # ---------------------------------------------------------------------------------------------
    # Generation

    def generate(
        self, prompts: Sequence[Sequence[int]], params: SamplingParams | Sequence[SamplingParams] = SamplingParams()
    ) -> list[list[int]]:
        """Prompt + continuation per row (EOS kept if generated; rows may differ in length)."""
        out = [list(map(int, p)) for p in prompts]
        for step in self._steps(prompts, params, sync_every=32):
            for row, tok in step:
                out[row].append(tok)
        return out

    def stream(self, prompt: Sequence[int], params: SamplingParams = SamplingParams()) -> Iterator[int]:
        """New token ids of one prompt, as they are generated."""
        for step in self._steps([prompt], params):
            for _, tok in step:
                yield tok

    @torch.inference_mode()
    def _steps(self, prompts, params, sync_every: int = 1) -> Iterator[list[tuple[int, int]]]:
        """Yield, per decoding step, the (row, token) pairs of rows still running.

        The host reads sampled tokens back only every few steps (1, 2, 4, .. up to `sync_every`), so the GPU runs
        ahead without a synchronisation per token; rows that finished in between run on harmlessly.
        """
        rows = self.validate(prompts, params)
        c, m, dev = self.config, self.model, self.device
        lens = [len(p) for p in prompts]
        limits = [sp.length_limit(c, n) for n, sp in zip(lens, rows)]
        B, P, S = len(prompts), max(lens), max(limits)
        if all(lim <= n for lim, n in zip(limits, lens)):
            return
        tokens = torch.zeros(B, P, dtype=torch.long)
        for b, p in enumerate(prompts):
            tokens[b, : len(p)] = torch.as_tensor(list(map(int, p)))
        tokens = tokens.to(dev)
        graph = None
        if self.cuda_graphs:
            if B not in self._graphs:
                self._graphs[B] = GraphedDecode(self._decode_fn, m.new_cache(B, c.max_step), B, dev, self.compile)
            graph = self._graphs[B]
            cache = graph.cache
        else:
            cache = m.new_cache(B, max(S, P))
        positions = torch.arange(P, device=dev).expand(B, P)
        cur = torch.as_tensor(lens, device=dev)
        logits = self._forward_logits(tokens, positions, cache, last=torch.arange(B, device=dev) * P + cur - 1)
        gens = [torch.Generator(device=dev).manual_seed(sp.seed) for sp in rows]
        length = list(lens)
        generated: list[list[int]] = [[] for _ in range(B)]  # kept only for rows with stop sequences
        done = [n >= lim for n, lim in zip(lens, limits)]
        left = max(lim - n for lim, n in zip(limits, lens))  # steps until every row reaches its length limit
        penalties = Penalties.start(rows, tokens, lens, c.vocab) if any(sp.penalized for sp in rows) else None
        pending: list[torch.Tensor] = []
        chunk = 1
        while True:
            nxt = sample(logits if penalties is None else penalties.apply(logits), rows, gens)
            if penalties is not None:
                penalties.update(nxt)
            pending.append(nxt)
            left -= 1
            if len(pending) >= chunk or left <= 0:
                for toks in torch.stack(pending).tolist():  # the one host synchronisation of the chunk
                    step = []
                    for b in range(B):
                        if done[b]:
                            continue
                        step.append((b, toks[b]))
                        length[b] += 1
                        if rows[b].stop:
                            generated[b].append(toks[b])
                        if (toks[b] == c.eos_id and not rows[b].ignore_eos) or length[b] >= limits[b] or (
                            rows[b].stop and rows[b].stops(generated[b])
                        ):
                            done[b] = True
                    yield step
                    if all(done):
                        return
                pending, chunk = [], min(2 * chunk, sync_every)
            pos = cur.clamp(max=cache.k[0].shape[1] - 1)  # finished rows keep running harmlessly
            if graph is not None:
                logits = graph(nxt[:, None], pos[:, None])
            else:
                logits = self._forward_logits(nxt[:, None], pos[:, None], cache)
            cur = cur + 1

    # ---------------------------------------------------------------------------------------------
    # Scoring (full-sequence forward)

    @torch.inference_mode()
    def logits(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [B, T] -> float32 logits [B, T, V] on the CPU."""
        tokens = torch.as_tensor(tokens, dtype=torch.long).to(self.device)
        B, T = tokens.shape
        if T > self.config.max_step:
            raise RequestError(f"sequence of {T} tokens exceeds max_step={self.config.max_step}")
        cache = self.model.new_cache(B, T)
        logits = self._forward_logits(tokens, torch.arange(T, device=self.device).expand(B, T), cache)
        return logits.view(B, T, -1).float().cpu()

    def ppl(self, prompts: Sequence[Sequence[int]]) -> list[float]:
        """LightSeq's ppl: mean negative log-likelihood (natural log) of each row's tokens after the first."""
        out = []
        for p in prompts:  # one row at a time: no padding to get wrong
            t = torch.as_tensor([list(map(int, p))])
            logp = torch.log_softmax(self.logits(t)[0, :-1], -1)
            out.append(float(-logp.gather(1, t[0, 1:, None]).mean()))
        return out


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
    def start(cls, rows: Sequence[SamplingParams], tokens: torch.Tensor, lens: Sequence[int], vocab: int) -> Penalties:
        dev, B = tokens.device, len(rows)
        col = lambda name: torch.tensor([[getattr(sp, name)] for sp in rows], dtype=torch.float32, device=dev)  # noqa: E731
        seen = torch.zeros(B, vocab, dtype=torch.bool, device=dev)
        real = torch.arange(tokens.shape[1], device=dev)[None] < torch.as_tensor(lens, device=dev)[:, None]
        seen.scatter_(1, torch.where(real, tokens, tokens[:, :1]), True)  # prompt tokens (padding -> first token)
        counts = torch.zeros(B, vocab, dtype=torch.float32, device=dev)
        return cls(col("repetition_penalty"), col("presence_penalty"), col("frequency_penalty"), seen, counts)

    def select(self, index) -> Penalties:
        """The rows `index` (a slice: views that update in place; an index tensor: a copy)."""
        return Penalties(self.rep[index], self.presence[index], self.frequency[index], self.seen[index],
                         self.counts[index])

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        lg = logits.float()
        lg = torch.where(self.seen, torch.where(lg > 0, lg / self.rep, lg * self.rep), lg)
        return lg - self.presence * (self.counts > 0) - self.frequency * self.counts

    def update(self, nxt: torch.Tensor) -> None:
        self.counts.scatter_add_(1, nxt[:, None], torch.ones_like(nxt[:, None], dtype=torch.float32))
        self.seen.scatter_(1, nxt[:, None], True)


def argmax_rows(logits: torch.Tensor) -> torch.Tensor:
    """Each row's largest logit's index, as torch.argmax gives it (the first on ties; a NaN counts as the
    largest). On the CPU, numpy's argmax, which agrees with torch's on ties, NaN and infinities
    (tests/test_engine_fp16.py): torch's CPU argmax took 1.5 ms for 32 x 21128 float32 logits against numpy's
    0.1 ms on our CPU box, a fifth of a served decode step of the demo model."""
    if logits.device.type == "cpu" and logits.dtype == torch.float32:
        return torch.from_numpy(logits.numpy().argmax(-1))
    return logits.argmax(-1)


def sample(logits: torch.Tensor, rows: Sequence[SamplingParams], gens: Sequence[torch.Generator]) -> torch.Tensor:
    """Next token per row: temperature, then top-k, then top-p, each row with its own generator."""
    greedy = argmax_rows(logits)
    if all(sp.greedy for sp in rows):
        return greedy
    out = greedy.clone()
    for b, sp in enumerate(rows):
        if sp.greedy:
            continue
        lg = logits[b].float() / sp.temperature
        if 0 < sp.top_k < lg.numel():
            kth = torch.topk(lg, sp.top_k).values[-1]
            lg = lg.masked_fill(lg < kth, float("-inf"))
        if sp.top_p < 1.0:
            sorted_lg, idx = torch.sort(lg, descending=True)
            probs = torch.softmax(sorted_lg, -1)
            # keep the smallest prefix whose mass reaches top_p (always at least the top token)
            drop = probs.cumsum(-1) - probs >= sp.top_p
            lg = lg.scatter(0, idx[drop], float("-inf"))
        probs = torch.softmax(lg, -1)
        out[b] = torch.multinomial(probs, 1, generator=gens[b])[0]
    return out
