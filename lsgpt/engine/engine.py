"""Engine: load a LightSeq GPT HDF5 file (fp16 ``Gpt`` or int8 ``QuantGpt``) and generate from it.

Decode semantics (LightSeq's lengths and EOS, stop sequences, penalties, per-row seeds) are in
``lsgpt.engine.sampling``; beyond LightSeq, prompts of different lengths share a batch (each row gets what it gets
alone). The public forward seams (``prefill``, ``decode``, ``capture_decode``) are what ``Scheduler`` runs.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch

from lsgpt.contract import NON_TEXT_IDS, TOKENIZER_FILE, VOCAB_SIZE
from lsgpt.engine.fused import FusedForward
from lsgpt.engine.fused import available as fused_available
from lsgpt.engine.int8 import QuantGPT
from lsgpt.engine.model import GPT
from lsgpt.engine.sampling import (  # noqa: F401 - Penalties, argmax_rows: importable from here as before
    Penalties,
    RequestError,
    SamplingParams,
    argmax_rows,
    check_generates,
    row_finished,
    sample,
    validate_batch,
    validate_request,
)
from lsgpt.format import GptConfig, read_hdf5
from lsgpt.text import non_text_ids


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


def prefill_views(b: torch.Tensor, k: int, T: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A prefill's inputs in one buffer, tokens [k·T] | slots [k] | last rows [k] | lengths [k], as
    (tokens [k, T], slots [k], last [k], lengths [k])."""
    return b[: k * T].view(k, T), b[k * T: k * T + k], b[k * T + k: k * T + 2 * k], b[k * T + 2 * k:]


class GraphedPrefill:
    """k prompts padded to T tokens prefilled into a scratch cache, whose rows then go to the rows `slots` of a
    running cache, captured as one CUDA graph (one launch instead of ~65 kernels and 2·n_layer copies: a prefill
    of a few short prompts is launch-bound, ~5 ms of host work on the H100 while the running rows wait).

    Its inputs are one device buffer, filled by one copy: tokens [k·T] | slots [k] | last rows [k] | the prompts'
    lengths [k] (not read by the graph; there for the caller's next kernels). A group of fewer than k prompts fills
    the spare rows with `sink`, a cache row no decode reads, so the graph's fixed shape never touches a live row.
    Graphs of one pool share their scratch memory: replayed one after another on one stream, a graph's scratch
    is dead once the next starts, and only its logits (kept referenced) outlive it.
    """

    def __init__(self, prefill: Callable, cache, k: int, T: int, sink: int, device: torch.device, pool=None):
        self.k, self.T, self.cache = k, T, cache
        self._prefill = prefill
        self.inputs = torch.zeros(k * T + 3 * k, dtype=torch.long, device=device)
        self.inputs[k * T: k * T + k] = sink  # warm-up and capture write only the sink row
        self.inputs[k * T + k: k * T + 2 * k] = torch.arange(k, device=device) * T
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            self._run()  # compiles this shape's kernel variants outside the graph
        torch.cuda.current_stream(device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool):
            self.logits = self._run()

    def _run(self) -> torch.Tensor:
        tokens, slots, last, _ = prefill_views(self.inputs, self.k, self.T)
        logits, scratch = self._prefill(tokens, last)
        for mine, new in zip(self.cache.k + self.cache.v, scratch.k + scratch.v):
            mine[slots, : self.T] = new
        return logits

    def __call__(self, host: torch.Tensor) -> torch.Tensor:
        """Replay on the inputs `host` (pinned, laid out as ``inputs``): logits [k, V] of each row's last token."""
        self.inputs.copy_(host, non_blocking=True)
        self.graph.replay()
        return self.logits


def default_suppress(cfg: GptConfig, path, vocab=None) -> tuple[int, ...]:
    """The ids an engine of this file suppresses by default (see Engine.load)."""
    if vocab is None and (Path(path).parent / TOKENIZER_FILE).is_file():
        vocab = Path(path).parent / TOKENIZER_FILE
    if vocab is not None:
        return non_text_ids(vocab)
    return NON_TEXT_IDS if cfg.vocab == VOCAB_SIZE else ()


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
        suppress: Sequence[int] = (),
    ):
        self.config, self.model, self.device = cfg, model, device
        # token ids no request generates unless it says otherwise (SamplingParams.suppress): the vocabulary's
        # non-text special tokens, see load()
        self.suppress = tuple(sorted({int(t) for t in suppress if 0 <= int(t) < cfg.vocab}))
        self.max_batch_size = max_batch_size
        self.cuda_graphs = cuda_graphs and device.type == "cuda"
        # the fused Triton kernels (lsgpt.engine.fused) on CUDA unless fused=False or LSGPT_FUSED=0
        use_fused = fused_available(device) if fused is None else fused
        self.fused = None
        if use_fused:
            try:
                self.fused = self._checked_fused(model)
            except Exception as e:  # noqa: BLE001 - e.g. no writable Triton cache, a GPU Triton cannot target
                if fused:  # asked for explicitly: fail loudly
                    raise
                warnings.warn(f"lsgpt: fused GPU kernels unavailable ({type(e).__name__}: {e}); "
                              "serving with the reference path", stacklevel=2)
                self.fused = None
        self.compile = compile and self.cuda_graphs and self.fused is None
        self._graphs: dict[int, GraphedDecode] = {}  # batch size -> captured decode step (and its cache)

    def _checked_fused(self, model) -> FusedForward:
        """The fused forward, checked against the reference path; if opt-in variants are on and fail (cannot
        compile, disagree), a warning and the fused path without them: a variant costs only itself."""
        f = FusedForward(model)
        try:
            f.check_against(self._reference_logits)
            return f
        except Exception as e:  # noqa: BLE001 - retried below without the variants, or raised
            if not f.variants:
                raise
            warnings.warn(f"lsgpt: the opt-in fused variants {', '.join(f.variants)} failed their load check "
                          f"({type(e).__name__}: {e}); serving with the fused path without them", stacklevel=3)
        f = FusedForward(model, variants=False)
        f.check_against(self._reference_logits)
        return f

    @classmethod
    def load(
        cls,
        path: str | os.PathLike,
        device: str | torch.device | None = None,
        max_batch_size: int | None = None,
        compile: bool = False,
        fused: bool | None = None,
        vocab=None,
    ) -> Engine:
        """Read and validate the file, then build the fp16 or int8 model on `device` (default: CUDA if present).

        vocab (a tokenizer, a vocab.txt or a folder with one; None: the vocab.txt beside the file, if any) names
        the non-text special tokens ([PAD], [UNK], [CLS], [MASK]) that are never generated by default. Without a
        vocabulary: the article's standard ids (lsgpt.contract.NON_TEXT_IDS) for its 21128-token vocabulary,
        else none."""
        cfg, arrays = read_hdf5(path)
        dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        dtype = torch.float16 if dev.type == "cuda" else torch.float32
        model = (QuantGPT if cfg.quantized else GPT)(cfg, arrays, dev, dtype)
        return cls(cfg, model, dev, max_batch_size, compile=compile, fused=fused,
                   suppress=default_suppress(cfg, path, vocab))

    @property
    def backend(self) -> str:
        """What runs the forward: the fused Triton kernels, or the reference path (and its int8 GEMM backend)."""
        if self.fused is not None:
            return "triton-fused"
        if self.config.quantized:
            return "reference/" + self.model.layers[0]["ffn_first_kernel"].backend
        return "reference"

    def forward_logits(self, tokens, positions, cache, last: torch.Tensor | None = None, static: bool = False):
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
        return self.forward_logits(tok, pos, cache, static=True)

    # ---------------------------------------------------------------------------------------------
    # Forward seams: what Engine.generate and Scheduler run

    def prefill(self, tokens: torch.Tensor, last: torch.Tensor, cache=None) -> tuple[torch.Tensor, object]:
        """Prompts tokens [k, P] (right-padded) at positions 0..P-1 of `cache` (None: a scratch cache of length P,
        on which the attention split depends); the logits of the flat rows `last` (each prompt's last token), and
        the cache."""
        k, P = tokens.shape
        if cache is None:
            cache = self.model.new_cache(k, P)
        positions = torch.arange(P, device=self.device).expand(k, P)
        return self.forward_logits(tokens, positions, cache, last=last), cache

    def decode(self, tok: torch.Tensor, pos: torch.Tensor, cache) -> torch.Tensor:
        """One decode step, eagerly: tokens and positions [B, 1] -> logits [B, V]."""
        return self.forward_logits(tok, pos, cache)

    def capture_decode(self, cache, batch: int) -> GraphedDecode:
        """The decode step over `batch` rows of `cache` captured as a CUDA graph (torch.compile'd if asked)."""
        return GraphedDecode(self._decode_fn, cache, batch, self.device, self.compile)

    def capture_prefill(self, cache, k: int, T: int, sink: int, pool=None) -> GraphedPrefill:
        """A prefill of up to k prompts of up to T tokens into rows of `cache` captured as a CUDA graph (rows
        padding the group go to row `sink`); graphs given one `pool` share their scratch memory."""
        return GraphedPrefill(self.prefill, cache, k, T, sink, self.device, pool)

    # ---------------------------------------------------------------------------------------------
    # Validation

    def validate(self, prompts: Sequence[Sequence[int]], params: SamplingParams | Sequence[SamplingParams]) -> list:
        """Raise RequestError naming the first problem; return the per-row resolved params."""
        return validate_batch(self.config, prompts, params, self.suppress, self.max_batch_size)

    # ---------------------------------------------------------------------------------------------
    # Generation

    def generate(
        self, prompts: Sequence[Sequence[int]], params: SamplingParams | Sequence[SamplingParams] = SamplingParams()  # noqa: B008 (frozen)
    ) -> list[list[int]]:
        """Prompt + continuation per row (EOS kept if generated; rows may differ in length)."""
        rows = self.validate(prompts, params)
        out = [list(map(int, p)) for p in prompts]
        for step in self._steps(prompts, rows, sync_every=32):
            for row, tok in step:
                out[row].append(tok)
        return out

    def stream(self, prompt: Sequence[int], params: SamplingParams = SamplingParams()  # noqa: B008 (frozen)
               ) -> Iterator[int]:
        """New token ids of one prompt, as they are generated."""
        for step in self._steps([prompt], self.validate([prompt], params)):
            for _, tok in step:
                yield tok

    def _decode_cache(self, B: int, S: int, P: int):
        """The cache of a generate call, and its captured decode step (CUDA graphs) or None."""
        if not self.cuda_graphs:
            return self.model.new_cache(B, max(S, P)), None
        if B not in self._graphs:
            self._graphs[B] = self.capture_decode(self.model.new_cache(B, self.config.max_step), B)
        return self._graphs[B].cache, self._graphs[B]

    @torch.inference_mode()
    def _steps(self, prompts, rows: list[SamplingParams], sync_every: int = 1) -> Iterator[list[tuple[int, int]]]:
        """Yield, per decoding step, the (row, token) pairs of rows still running (`rows`: the validated params).

        The host reads sampled tokens back only every few steps (1, 2, 4, .. up to `sync_every`), so the GPU runs
        ahead without a synchronisation per token; rows that finished in between run on harmlessly.
        """
        c, dev = self.config, self.device
        lens = [len(p) for p in prompts]
        limits = [sp.length_limit(c, n) for n, sp in zip(lens, rows)]
        B, P, S = len(prompts), max(lens), max(limits)
        if all(lim <= n for lim, n in zip(limits, lens)):
            return
        tokens = torch.zeros(B, P, dtype=torch.long)
        for b, p in enumerate(prompts):
            tokens[b, : len(p)] = torch.as_tensor(list(map(int, p)))
        tokens = tokens.to(dev)
        cache, graph = self._decode_cache(B, S, P)
        cur = torch.as_tensor(lens, device=dev)
        logits, _ = self.prefill(tokens, torch.arange(B, device=dev) * P + cur - 1, cache)
        length = list(lens)
        generated: list[list[int]] = [[] for _ in range(B)]  # kept only for rows with stop sequences
        done = [n >= lim for n, lim in zip(lens, limits)]
        left = max(lim - n for lim, n in zip(limits, lens))  # steps until every row reaches its length limit
        penalties = Penalties.start(rows, tokens, lens, c.vocab) if any(sp.penalized for sp in rows) else None
        pending: list[torch.Tensor] = []
        chunk = 1
        while True:
            nxt = sample(logits if penalties is None else penalties.apply(logits), rows, cur)  # cur: each row's new position
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
                        done[b] = row_finished(rows[b], c.eos_id, toks[b], length[b], limits[b], generated[b], 0)
                    yield step
                    if all(done):
                        return
                pending, chunk = [], min(2 * chunk, sync_every)
            pos = cur.clamp(max=cache.k[0].shape[1] - 1)  # finished rows keep running harmlessly
            if graph is not None:
                logits = graph(nxt[:, None], pos[:, None])
            else:
                logits = self.decode(nxt[:, None], pos[:, None], cache)
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
        logits = self.forward_logits(tokens, torch.arange(T, device=self.device).expand(B, T), cache)
        return logits.view(B, T, -1).float().cpu()

    def ppl(self, prompts: Sequence[Sequence[int]]) -> list[float]:
        """LightSeq's ppl: mean negative log-likelihood (natural log) of each row's tokens after the first."""
        out = []
        for p in prompts:  # one row at a time: no padding to get wrong
            t = torch.as_tensor([list(map(int, p))])
            logp = torch.log_softmax(self.logits(t)[0, :-1], -1)
            out.append(float(-logp.gather(1, t[0, 1:, None]).mean()))
        return out
