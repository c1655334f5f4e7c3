"""Data-parallel QAT (issue 16): 2 gloo ranks x batch N give the gradients and the first AdamW step of one process
x the concatenated batch 2N, for the weights and the learned PACT clips, fp16 model (quantizers off) and int8 QAT.

The ranks run in spawned processes with their own `init_process_group("gloo")`, the model wrapped in
DistributedDataParallel as the Trainer wraps it (train.py through torchrun: tests/test_train.py
::test_torchrun_int8_qat_matches_one_process). fp32, no dropout, the same weights and data on both sides.
"""

from __future__ import annotations

import os
import socket

import pytest
import torch

N, T, V = 4, 32, 300  # per-rank batch, block, vocabulary
LR = 1e-3


def tiny_qat(quant: bool):
    """A 2-layer QuantGPT2LMHeadModel, dropout 0; int8: every learned clip active, fp16: clips frozen as train.py
    freezes them."""
    from transformers import GPT2Config

    from lsgpt.training.qat import QuantGPT2LMHeadModel
    from lsgpt.training.train import plain_fp16_checkpoint

    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=2, n_embd=64, n_head=4, n_positions=64, vocab_size=V, resid_pdrop=0.0,
                     embd_pdrop=0.0, attn_pdrop=0.0, activation_function="gelu_new", bos_token_id=0,
                     eos_token_id=0)
    model = QuantGPT2LMHeadModel(cfg).set_quant(quant)
    model.loss_type = "ForCausalLM"
    if quant:
        set_active_clips(model, batch()[:2])
    else:
        plain_fp16_checkpoint(model)
    return model


def set_active_clips(model, input_ids: torch.Tensor, frac: float = 0.7) -> None:
    """Set every learned clip to `frac` x the largest |input| it quantizes on `input_ids`, so that PACT's clip
    gradients are not zero (at their init of 16 a small model's activations never reach them)."""
    seen: dict[int, float] = {}
    q = model._q

    def record(x, amax):
        if isinstance(amax, torch.Tensor) and amax.requires_grad:
            seen[id(amax)] = max(seen.get(id(amax), 0.0), x.detach().abs().max().item())
        return q(x, amax)

    tr = model.transformer
    model._q = record
    hook = tr.ln_f.register_forward_hook(lambda m, i, o: seen.__setitem__(id(tr.ln_f), o.abs().max().item()))
    try:
        with torch.no_grad():
            model(input_ids=input_ids)
    finally:
        hook.remove()
        del model._q
    with torch.no_grad():
        for block in tr.h:
            for p in block.ls_clips.values():
                if p.requires_grad:
                    p.fill_(frac * seen[id(p)])
        tr.ls_clips["emb_clip_max"].fill_(frac * tr.wte.weight.abs().max().item())
        tr.ls_clips["output_ln_clip_max"].fill_(frac * seen[id(tr.ln_f)])


def batch() -> torch.Tensor:
    return torch.randint(0, V, (2 * N, T), generator=torch.Generator().manual_seed(1))


def step(model, forward, ids: torch.Tensor) -> tuple[dict, dict]:
    """One forward/backward on `ids` and one AdamW step (the Trainer's optimizer, its defaults): gradients,
    parameters after the step."""
    out = forward(input_ids=ids, labels=ids)
    out.loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR, weight_decay=0.0)
    opt.step()
    return grads, {n: p.detach().clone() for n, p in model.named_parameters()}


def _rank(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2)
    try:
        res = {}
        for quant in (False, True):
            model = tiny_qat(quant)
            ddp = torch.nn.parallel.DistributedDataParallel(model)
            res[quant] = step(model, ddp, batch()[rank * N:(rank + 1) * N])
        torch.save(res, os.path.join(out, f"rank{rank}.pt"))
    finally:
        torch.distributed.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("ddp")
    torch.multiprocessing.spawn(_rank, args=(_free_port(), str(out)), nprocs=2)
    return [torch.load(out / f"rank{r}.pt") for r in range(2)]


@pytest.mark.slow
@pytest.mark.parametrize("quant", [False, True], ids=["fp16-model", "int8-qat"])
def test_ddp_gradients_and_step_match_one_process(two_ranks, quant):
    model = tiny_qat(quant)
    grads, params = step(model, model, batch())
    (g0, p0), (g1, p1) = two_ranks[0][quant], two_ranks[1][quant]
    assert set(g0) == set(grads)
    clips = [n for n in grads if ".ls_clips." in n]
    if quant:
        assert len(clips) == 2 * 7 + 2  # 7 learned clips per layer (self_qkv_bias_out frozen), 2 embedding clips
        assert sum(grads[n].item() != 0 for n in clips) >= len(clips) - 2  # PACT gradients really flow
    else:
        assert not clips  # frozen in the fp16 model
    for n, g in grads.items():
        # both ranks hold the same all-reduced (averaged) gradient, bit for bit
        assert torch.equal(g0[n], g1[n]), n
        # Tolerance: the only difference allowed is fp32 summation order. DDP averages two sums over N*T positions,
        # one process sums 2N*T positions in another GEMM blocking; measured 1e-6 of the tensor's largest
        # gradient for weights and <= 6e-6 for clips (a clip's gradient is a sum of +g and -g terms that partly
        # cancel), the same as one process fed the batch in another row order. A rank-local, summed or per-rank
        # normalized gradient is off by O(1) of the gradient (a sum is 2x; unsynchronized ranks measured 0.8-1.2).
        tol = 1e-4 * g.abs().max().item() + 1e-12
        err = (g0[n] - g).abs().max().item()
        assert err <= tol, f"{n}: |DDP - 1 process| = {err:.3g} > {tol:.3g} (max |g| {g.abs().max().item():.3g})"
    # The step. AdamW's first step (m = (1-b1) g, v = (1-b2) g^2, both bias-corrected) is exactly
    # p - lr * g / (|g| + eps) with eps = 1e-8 and no weight decay: each rank's parameters must equal that formula
    # applied to its own all-reduced gradient, up to fp32 rounding of the expression (a few ulps of the step, which
    # is <= lr, plus half an ulp of p). This holds on any CPU and thread count: both sides of the comparison come
    # from the same gradient. Comparing DDP's parameters with the one-process ones instead is not rounding-safe:
    # where |g| is near eps the step's slope is up to lr / eps, so a 1e-12 gradient difference moves it by 1e-4 lr,
    # and an element whose gradient is exactly 0 in one process can be 1e-12 under DDP (a key bias's gradient is
    # rounding-sized by design) and move by 1e-4 lr. Together with the gradient check above this pins the DDP step
    # to the one-process one wherever the step is not rounding-sized.
    init = dict(tiny_qat(quant).named_parameters())
    for n, p in params.items():
        assert torch.equal(p0[n], p1[n]), n  # the ranks stay identical after the step
        p_init = init[n].detach().double()
        if n not in g0:  # frozen (the fp16 model's clips): never moves
            assert torch.equal(p0[n], init[n].detach()), n
            continue
        g = g0[n].double()
        expected = p_init - LR * g / (g.abs() + 1e-8)
        bound = 1e-5 * LR + 2.0**-23 * p_init.abs()
        err = (p0[n].double() - expected).abs() - bound
        assert err.max().item() <= 0, f"{n}: DDP step off AdamW's formula by {err.max().item():.3g} past the bound"
        # Exactly zero on both sides (e.g. positions past the block): not moved, bit for bit.
        still = (g0[n] == 0) & (grads[n] == 0)
        assert torch.equal(p0[n][still], init[n].detach()[still]), n
        assert torch.equal(p[still], init[n].detach()[still]), n
    # Positions past the block take no gradient on either side, so the no-move check above has elements to check.
    assert (g0["transformer.wpe.weight"][T:] == 0).all() and (grads["transformer.wpe.weight"][T:] == 0).all()
