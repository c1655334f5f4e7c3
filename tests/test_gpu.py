"""CUDA paths of the engine (skipped without a GPU): fp16 against HF transformers, int8 integer GEMMs
against the CPU's exact integer path, CUDA-graph decode against eager decode."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.fixture(scope="module")
def peaky_model():
    """A random GPT-2 whose logits have clear margins (scaled embedding), so fp16 rounding rarely flips argmax."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    m = GPT2LMHeadModel(GPT2Config(n_layer=4, n_embd=256, n_head=8, n_positions=256, vocab_size=4096)).eval()
    with torch.no_grad():
        m.transformer.wte.weight.mul_(8)
    return m


@pytest.fixture(scope="module")
def files(peaky_model, tmp_path_factory):
    from lsgpt.export import calibrate, export_model, float_arrays, gpt_config, load_checkpoint, quantize_arrays
    from lsgpt.format import write_hdf5

    d = tmp_path_factory.mktemp("gpu")
    fp = export_model(peaky_model, d / "fp.hdf5", max_step=256)
    config, sd, _ = load_checkpoint(peaky_model)
    cfg = gpt_config(config, 256, True)
    fa = float_arrays(cfg, sd)
    rows = torch.randint(0, 4096, (4, 64), generator=torch.Generator().manual_seed(1)).tolist()
    q = write_hdf5(d / "q.hdf5", cfg, quantize_arrays(cfg, fa, calibrate(cfg, fa, rows)))
    return fp, q


def test_fp16_matches_hf(peaky_model, files):
    from lsgpt.generate import Engine, SamplingParams

    eng = Engine.load(files[0], "cuda")
    x = torch.randint(0, 4096, (2, 40), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = peaky_model(x).logits
    err = (eng.logits(x) - ref).abs().max().item()
    scale = ref.abs().max().item()
    print(f"fp16 CUDA max logit error {err:.4f} (logit range ±{scale:.1f})")
    assert err < 2e-3 * scale + 0.05
    prompt = x[0, :6].tolist()
    hf = peaky_model.generate(torch.tensor([prompt]), max_new_tokens=50, do_sample=False, eos_token_id=None, pad_token_id=0)
    ours = eng.generate([prompt], SamplingParams(max_new_tokens=50, top_k=1, ignore_eos=True))[0]
    agree = sum(a == b for a, b in zip(ours, hf[0].tolist()))
    print(f"fp16 CUDA greedy: {agree}/{len(ours)} tokens equal HF fp32")
    assert ours[:30] == hf[0].tolist()[:30]


def test_int8_cuda_matches_cpu_integer_path(files):
    from lsgpt.generate import Engine

    gpu, cpu = Engine.load(files[1], "cuda"), Engine.load(files[1], "cpu")
    assert gpu.model.layers[0]["ffn_first_kernel"].backend == "cuda_int_mm"
    x = torch.randint(0, 4096, (3, 50), generator=torch.Generator().manual_seed(3))
    lg, lc = gpu.logits(x), cpu.logits(x)
    step = 16 / 127
    frac = ((lg - lc).abs() <= step + 1e-4).float().mean().item()
    print(f"int8 CUDA vs CPU: {frac:.4%} of logits within one quantization step; max diff {(lg - lc).abs().max():.3f}")
    assert frac > 0.99


@pytest.mark.parametrize("which", [0, 1])
def test_cuda_graph_decode_equals_eager(files, which):
    from lsgpt.generate import Engine, SamplingParams

    graphed = Engine.load(files[which], "cuda")
    eager = Engine(graphed.config, graphed.model, graphed.device, cuda_graphs=False)
    prompts = [[5, 6, 7], [9] * 11, [100, 200]]
    sp = SamplingParams(max_new_tokens=40, top_k=1, ignore_eos=True)
    a, b = graphed.generate(prompts, sp), eager.generate(prompts, sp)
    assert a == b
    # and again, reusing the captured graph for a new batch of the same size
    assert graphed.generate(prompts[::-1], sp) == eager.generate(prompts[::-1], sp)


def test_compiled_decode_equals_eager(files):
    from lsgpt.generate import Engine, SamplingParams

    for path in files:
        compiled = Engine.load(path, "cuda", compile=True)
        eager = Engine(compiled.config, compiled.model, compiled.device, cuda_graphs=False)
        prompts = [[5, 6, 7], [9] * 11]
        sp = SamplingParams(max_new_tokens=30, top_k=1, ignore_eos=True)
        a, b = compiled.generate(prompts, sp), eager.generate(prompts, sp)
        agree = sum(x == y for ra, rb in zip(a, b) for x, y in zip(ra, rb)) / sum(map(len, a))
        print(f"{path.name}: compiled vs eager token agreement {agree:.2%}")
        assert a[0][:15] == b[0][:15] and agree > 0.9  # fusion may reorder fp16 rounding
