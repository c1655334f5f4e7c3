"""export/export.py (the article's CLI) and lsgpt.export.convert.export_model: output naming, inputs, bad inputs,
option validation and atomic writes.

Oracles: the article / docs/format.md §9.1 (`-m DIR/pytorch_model.bin -l N` writes DIR/pytorch_model.hdf5), LightSeq's
loader-source dataset names (tests/oracles/lightseq_src.py) and HF's own checkpoint writers
(torch.save'd state dict, save_pretrained -> model.safetensors).
Most CLI runs are in-process (runpy, same argv, exit code from SystemExit/return) to keep the suite fast;
the article's command form also runs as a real subprocess.
"""

from __future__ import annotations

import contextlib
import io
import runpy
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from oracles import lightseq_src as LS
from oracles import reference_int8 as R
from oracles import tiny

torch = pytest.importorskip("torch")

ROOT = Path(__file__).resolve().parents[1]
CLI = ROOT / "export" / "export.py"
NL, NH, H = 2, 4, 64


def run_cli(*args) -> tuple[int, str, str]:
    """export.py in this process: (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    old = sys.argv
    sys.argv = [str(CLI), *map(str, args)]
    code = 0
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            runpy.run_path(str(CLI), run_name="__main__")
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        sys.argv = old
    return code, out.getvalue(), err.getvalue()


def h5_names(path) -> set[str]:
    import h5py

    names = set()
    with h5py.File(path, "r") as f:
        f.visititems(lambda n, o: names.add(n) if isinstance(o, h5py.Dataset) else None)
    return names


def h5_get(path, name):
    import h5py

    with h5py.File(path, "r") as f:
        return np.asarray(f[name][()])


def lightseq_names(kind: str) -> set[str]:
    if LS.lightseq_proto_dir() is None:
        pytest.skip("lightseq==3.0.1 not installed (its loader sources are the oracle for dataset names)")
    return {n for n, _ in LS.expand(LS.loader_reads(kind), NL)}


def temp_leftovers(folder: Path, keep: set[str]) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name not in keep)



@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    yield from tiny.one_torch_thread()


@pytest.fixture(scope="module")
def model():
    return tiny.make_model(seed=21)


@pytest.fixture(scope="module")
def qat_model():
    m = tiny.make_model(seed=22, wide=True)
    layers = [{n: 4.0 + i for n in tiny.LAYER_CLIP_NAMES} for i in range(NL)]
    return tiny.attach_clips(m, layers, emb_clip=0.95, output_ln_clip=5.0)


@pytest.fixture()
def bin_ckpt(model, tmp_path):
    return tiny.save_bin_checkpoint(model, tmp_path / "fp16")


# ------------------------------------------------------------------------------------------------------------
# the article's command and the accepted inputs


def test_article_command_writes_beside_the_weights(bin_ckpt):
    """`python export/export.py -m DIR/pytorch_model.bin -l 100` -> DIR/pytorch_model.hdf5 (real process)."""
    proc = subprocess.run([sys.executable, str(CLI), "-m", str(bin_ckpt), "-l", "100"], capture_output=True,
                          text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = bin_ckpt.with_suffix(".hdf5")
    assert out.name == "pytorch_model.hdf5" and out.is_file()
    assert h5_names(out) == lightseq_names("fp16"), "fp16 datasets must be exactly LightSeq's"
    assert h5_get(out, "src_embedding/position_embedding").size == 100 * H, "-l 100 keeps 100 wpe rows"
    assert int(h5_get(out, "model_conf/n_encoder_stack")) == NL and int(h5_get(out, "model_conf/head_num")) == NH
    assert temp_leftovers(bin_ckpt.parent, {"config.json", "pytorch_model.bin", "pytorch_model.hdf5"}) == []


def test_folder_with_safetensors(model, tmp_path):
    folder = tiny.save_safetensors_checkpoint(model, tmp_path / "st")
    assert not (folder / "pytorch_model.bin").exists()
    code, _, err = run_cli("-m", folder, "-l", 100)
    assert code == 0, err
    out = folder / "pytorch_model.hdf5"
    assert out.is_file()
    sd = tiny.state_dict_np(model)
    np.testing.assert_allclose(h5_get(out, "src_embedding/token_embedding").reshape(-1, H),
                               sd["transformer.wte.weight"], rtol=2.0**-11, atol=1e-7)
    np.testing.assert_allclose(h5_get(out, "encoder_stack/1/multihead_project_kernel_qkv").reshape(H, 3 * H),
                               sd["transformer.h.1.attn.c_attn.weight"], rtol=2.0**-11, atol=1e-7)


def test_article_bin_path_on_a_trainer_folder_takes_its_safetensors(model, tmp_path):
    """HF's Trainer writes model.safetensors; the article's `-m DIR/pytorch_model.bin` must still work."""
    folder = tiny.save_safetensors_checkpoint(model, tmp_path / "st")
    code, _, err = run_cli("-m", folder / "pytorch_model.bin", "-l", 64)
    assert code == 0, err
    assert h5_get(folder / "pytorch_model.hdf5", "src_embedding/position_embedding").size == 64 * H
    code, _, err = run_cli("-m", tmp_path / "nowhere" / "pytorch_model.bin")
    assert code == 2 and "not found" in err and "Traceback" not in err


def test_max_step_defaults_to_the_model_and_is_lowered_to_it(bin_ckpt):
    """No -l: every position the model has (tiny: 128). -l above that (the article's 500 on a small model):
    lowered to it with a note, not an error."""
    code, _, err = run_cli("-m", bin_ckpt)
    assert code == 0, err
    out = bin_ckpt.with_suffix(".hdf5")
    assert h5_get(out, "src_embedding/position_embedding").size == 128 * H
    code, _, err = run_cli("-m", bin_ckpt, "-l", 500)
    assert code == 0 and "using -l 128" in err, err
    assert h5_get(out, "src_embedding/position_embedding").size == 128 * H


def test_post_training_int8_keeps_the_fp16_export(model, tmp_path):
    """`-m model/fp16 -q --calibrate TEXT` next to model/fp16/pytorch_model.hdf5 (fp16) writes
    pytorch_model_int8.hdf5 and leaves the fp16 file byte for byte; long paragraphs are chunked silently."""
    import hashlib

    folder = tiny.save_bin_checkpoint(model, tmp_path / "fp16").parent
    (folder / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *"我今天很开心"]) + "\n")
    text = tmp_path / "calib.txt"
    text.write_text("我今天很开心" * 60 + "\n今天\n")  # 360 characters: longer than the 128 positions
    assert run_cli("-m", folder, "-l", 64)[0] == 0
    fp16 = folder / "pytorch_model.hdf5"
    digest = hashlib.sha256(fp16.read_bytes()).hexdigest()
    code, out, err = run_cli("-m", folder, "-l", 64, "-q", "--calibrate", text)
    assert code == 0, err
    assert hashlib.sha256(fp16.read_bytes()).hexdigest() == digest, "the fp16 export was replaced"
    assert "emb_clip_max" in " ".join(h5_names(folder / "pytorch_model_int8.hdf5")), "int8 file beside it"
    assert "longer than" not in err, err
    # asked explicitly: -o overwrites what it names
    assert run_cli("-m", folder, "-l", 64, "-q", "--calibrate", text, "-o", fp16)[0] == 0
    assert hashlib.sha256(fp16.read_bytes()).hexdigest() != digest


def test_weights_file_path_replaces_extension(model, tmp_path):
    folder = tiny.save_safetensors_checkpoint(model, tmp_path / "st2")
    code, _, err = run_cli("-m", folder / "model.safetensors", "-l", 64)
    assert code == 0, err
    assert (folder / "model.hdf5").is_file()


def test_int8_cli_from_qat_checkpoint_writes_extra_decode_length(qat_model, tmp_path):
    """The demo's int8 export omitted model_conf/extra_decode_length (docs/format.md §9.2): ours must write it."""
    ckpt = tiny.save_bin_checkpoint(qat_model, tmp_path / "int8")
    code, _, err = run_cli("-m", ckpt, "-l", 100, "-q", "--extra-decode-length", 7)
    assert code == 0, err
    out = ckpt.with_suffix(".hdf5")
    assert h5_names(out) == lightseq_names("int8")
    assert int(h5_get(out, "model_conf/extra_decode_length")) == 7
    assert h5_get(out, "src_embedding/token_embedding").dtype == np.uint8
    assert float(h5_get(out, "encoder_stack/1/ffn_ln_clip_max")) == pytest.approx(5.0)
    assert float(h5_get(out, "src_embedding/emb_clip_max")) == pytest.approx(0.95)


def test_options_are_written_to_model_conf(bin_ckpt, tmp_path):
    out = tmp_path / "opts.hdf5"
    code, _, err = run_cli("-m", bin_ckpt, "-l", 90, "--output", out, "--topk", 4, "--topp", 0.9,
                           "--sampling-method", "topp", "--eos-id", 7, "--extra-decode-length", 12)
    assert code == 0, err
    assert int(h5_get(out, "model_conf/topk")) == 4
    assert float(h5_get(out, "model_conf/topp")) == pytest.approx(0.9)
    sm = h5_get(out, "model_conf/sampling_method")
    assert sm.dtype == np.int8 and sm.tobytes() == b"topp", "int8 ASCII array, no NUL (docs/format.md §2)"
    assert int(h5_get(out, "model_conf/eos_id")) == 7
    assert int(h5_get(out, "model_conf/extra_decode_length")) == 12
    assert h5_get(out, "src_embedding/position_embedding").size == 90 * H


def test_default_eos_is_config_eos_token_id(bin_ckpt, tmp_path):
    out = tmp_path / "eos.hdf5"
    code, _, err = run_cli("-m", bin_ckpt, "-l", 64, "--output", out)
    assert code == 0, err
    assert int(h5_get(out, "model_conf/eos_id")) == tiny.EOS_ID


# ------------------------------------------------------------------------------------------------------------
# bad inputs: non-zero exit, a clear message (no traceback), no output, no temp files left


def _bad_bin(model, folder: Path, mutate) -> Path:
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    mutate(sd)
    folder.mkdir(parents=True, exist_ok=True)
    model.config.to_json_file(folder / "config.json")
    torch.save(sd, folder / "pytorch_model.bin")
    return folder / "pytorch_model.bin"


def _not_gpt2(tmp_path):
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    m = BertModel(BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                             intermediate_size=64))
    m.save_pretrained(tmp_path / "bert")
    return tmp_path / "bert"


BAD = {
    # id: (builder(model, tmp_path) -> (path, extra args), words the message must contain (any))
    "missing_config": (lambda m, t: ((tiny.save_bin_checkpoint(m, t / "c"), (t / "c" / "config.json").unlink())[0], []),
                       ("config.json",)),
    "l_zero": (lambda m, t: (tiny.save_bin_checkpoint(m, t / "c"), ["-l", 0]), ("max_step", "-l")),
    "heads_not_dividing": (lambda m, t: (tiny.save_bin_checkpoint(m, t / "c"),
                                         tiny.patch_config(t / "c", n_head=5))[0:1] + ([],), ("head",)),
    "not_gpt2": (lambda m, t: (_not_gpt2(t), []), ("gpt2", "gpt-2")),
    "odd_head_dim": (lambda m, t: (tiny.save_bin_checkpoint(m, t / "c"),
                                   tiny.patch_config(t / "c", n_head=64))[0:1] + ([],), ("head",)),
    "odd_inner_size": (lambda m, t: (tiny.save_bin_checkpoint(tiny.make_model(seed=1, n_inner=254 + 1), t / "c"), []),
                       ("inner", "255")),
    "config_hidden_mismatch": (lambda m, t: (tiny.save_bin_checkpoint(m, t / "c"),
                                             tiny.patch_config(t / "c", n_embd=32, n_head=4))[0:1] + ([],),
                               ("shape",)),
    "transposed_kernel": (lambda m, t: (_bad_bin(m, t / "c", lambda sd: sd.__setitem__(
        "transformer.h.1.mlp.c_fc.weight", sd["transformer.h.1.mlp.c_fc.weight"].T.contiguous())), []),
        ("transformer.h.1.mlp.c_fc.weight", "h.1.mlp.c_fc")),
    "missing_weight": (lambda m, t: (_bad_bin(m, t / "c", lambda sd: sd.pop("transformer.h.1.ln_2.bias")), []),
                       ("ln_2.bias",)),
    "more_layers_in_config": (lambda m, t: (tiny.save_bin_checkpoint(m, t / "c"),
                                            tiny.patch_config(t / "c", n_layer=3))[0:1] + ([],),
                              ("h.2", "layer", "missing")),
    "no_such_path": (lambda m, t: (t / "nope" / "pytorch_model.bin", []), ("not found", "no such", "nope")),
    "nan_weight": (lambda m, t: (_bad_bin(m, t / "c", lambda sd: sd["transformer.h.0.mlp.c_proj.bias"].__setitem__(
        3, float("nan"))), []), ("nan", "finite")),
    "int8_without_clips": (lambda m, t: (tiny.save_bin_checkpoint(m, t / "c"), ["-q"]), ("clip",)),
    "topk_3": (lambda m, t: (tiny.save_bin_checkpoint(m, t / "c"), ["--topk", 3]), ("topk",)),
    "eos_0": (lambda m, t: (tiny.save_bin_checkpoint(m, t / "c"), ["--eos-id", 0]), ("eos",)),
    "beam_search": (lambda m, t: (tiny.save_bin_checkpoint(m, t / "c"), ["--sampling-method", "beam_search"]),
                    ("sampling-method", "sampling_method", "beam_search")),
    "topp_above_1": (lambda m, t: (tiny.save_bin_checkpoint(m, t / "c"), ["--topp", 1.5]), ("topp",)),
}


def test_nan_weights_would_make_an_unloadable_file(model, tmp_path):
    """Why nan_weight above must fail at export time: read_hdf5 refuses NaN, so such a file cannot be served."""
    import shutil

    from lsgpt.format import FormatError, read_hdf5

    good = tmp_path / "g.hdf5"
    code, _, err = run_cli("-m", tiny.save_bin_checkpoint(model, tmp_path / "c"), "-l", 64, "--output", good)
    assert code == 0, err
    bad = tmp_path / "b.hdf5"
    shutil.copy(good, bad)
    import h5py

    with h5py.File(bad, "a") as f:
        a = np.array(f["encoder_stack/0/ffn_second_bias"][()])
        a.reshape(-1)[3] = np.nan
        del f["encoder_stack/0/ffn_second_bias"]
        f.create_dataset("encoder_stack/0/ffn_second_bias", data=a)
    with pytest.raises(FormatError):
        read_hdf5(bad)


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_fails_cleanly(model, tmp_path, case):
    build, words = BAD[case]
    src, extra = build(model, tmp_path)
    out = tmp_path / "out" / "model.hdf5"
    out.parent.mkdir()
    code, stdout, err = run_cli("-m", src, "-l", extra[1] if extra[:1] == ["-l"] else 64, "--output", out,
                                *(extra[2:] if extra[:1] == ["-l"] else extra))
    print(f"{case}: exit {code}: {err.strip()[-300:]}")
    assert code != 0, f"{case}: exit code 0 on bad input (stdout: {stdout[-300:]})"
    assert "Traceback" not in err, f"{case}: a traceback instead of a message:\n{err[-2000:]}"
    assert any(w.lower() in err.lower() for w in words), f"{case}: message does not mention {words}: {err!r}"
    assert not out.exists(), f"{case}: output written despite the error"
    assert temp_leftovers(out.parent, set()) == [], f"{case}: temporary files left behind"


def test_failed_export_leaves_previous_file_untouched(model, qat_model, tmp_path):
    """Atomic write: a failing export (early or late failure) never damages the existing output."""
    ckpt = tiny.save_bin_checkpoint(model, tmp_path / "c")
    out = tmp_path / "served" / "model.hdf5"
    out.parent.mkdir()
    code, _, err = run_cli("-m", ckpt, "-l", 100, "--output", out)
    assert code == 0, err
    before = out.read_bytes()
    failing = [
        ["-m", ckpt, "-l", 0, "--output", out],  # validation failure
        ["-m", ckpt, "-l", 100, "-q", "--output", out],  # int8 without clips: fails after loading weights
    ]
    for args in failing:
        code, _, err = run_cli(*args)
        assert code != 0, f"{args}: succeeded"
        assert out.read_bytes() == before, f"{args}: previous output modified"
    assert temp_leftovers(out.parent, {"model.hdf5"}) == []


# ------------------------------------------------------------------------------------------------------------
# API-level validation (export_model raises FormatError)


@pytest.mark.parametrize(
    "kw",
    [dict(topk=3), dict(topk=0), dict(eos_id=0), dict(sampling_method="beam_search"), dict(topp=0.0),
     dict(topp=1.5), dict(max_step=129), dict(max_step=0), dict(eos_id=1000)],
    ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()),
)
def test_export_model_rejects_bad_options(model, tmp_path, kw):
    from lsgpt.export.convert import export_model
    from lsgpt.format import FormatError

    out = tmp_path / "x.hdf5"
    kw = {"max_step": 64, **kw}
    with pytest.raises(FormatError):
        export_model(model, out, **kw)
    assert not out.exists()


def test_export_model_returns_path_and_accepts_all_sources(model, tmp_path):
    from lsgpt.export.convert import export_model

    ckpt = tiny.save_bin_checkpoint(model, tmp_path / "c")
    a = export_model(model, tmp_path / "a.hdf5", max_step=64)
    b = export_model(ckpt.parent, tmp_path / "b.hdf5", max_step=64)
    c = export_model(ckpt, tmp_path / "c.hdf5", max_step=64)
    assert Path(a) == tmp_path / "a.hdf5"
    _, A = R.read_ls(a)
    _, B = R.read_ls(b)
    _, C = R.read_ls(c)
    for k in A:
        assert np.array_equal(A[k], B[k]) and np.array_equal(A[k], C[k]), k


def test_write_failure_midway_leaves_previous_file_untouched(model, tmp_path, monkeypatch):
    """An I/O error in the middle of writing (simulated: the 20th dataset write fails) must leave the
    previous output byte-identical and no temporary file behind."""
    import h5py

    from lsgpt.export.convert import export_model

    out = tmp_path / "served" / "model.hdf5"
    export_model(model, out, max_step=64)
    before = out.read_bytes()
    real = h5py.Group.create_dataset
    calls = {"n": 0}

    def flaky(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 20:
            raise OSError(28, "No space left on device (simulated)")
        return real(self, *a, **k)

    monkeypatch.setattr(h5py.Group, "create_dataset", flaky)
    with pytest.raises(OSError):
        export_model(model, out, max_step=100)
    monkeypatch.setattr(h5py.Group, "create_dataset", real)
    assert calls["n"] >= 20, "the simulated failure never triggered"
    assert out.read_bytes() == before
    assert temp_leftovers(out.parent, {"model.hdf5"}) == []
