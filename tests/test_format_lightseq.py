"""HDF5 format vs LightSeq's own loaders (docs/format.md §1–§4; LightSeq 3.0.1 gpt_weight.cc / quant_gpt_weight.cc).

Oracle: the dataset names, element counts and HDF5 read types are extracted at test time from the C++
loader sources shipped in the lightseq==3.0.1 wheel (tests/oracles/lightseq_src.py), not from lsgpt.format.
Files checked: our exporter's fp16 and int8 output, and - as a self-test of the checker - files written the
way LightSeq's own Python exporters write them (tests/oracles/reference_int8.py).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import test_format_corrupt as C

from oracles import lightseq_loader as LL
from oracles import lightseq_src as LS
from oracles import reference_int8 as R
from oracles import tiny

H, INNER, V, NL, NH = 64, 256, 1000, 2, 4
MAX_STEP = 100
VALID_TOPK = {1, 2, 4, 8, 16, 32}  # ker_topk_sample_launcher (docs/format.md §2)
METHODS = {"topk", "topp", "ppl"}  # kSamplingMethods (gpt_encoder.h)


def _reads(kind: str):
    if LS.lightseq_proto_dir() is None:
        pytest.skip("lightseq==3.0.1 is not installed: its C++ loader sources are the oracle of this test")
    return LS.loader_reads(kind)



@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    yield from tiny.one_torch_thread()


@pytest.fixture(scope="module")
def model():
    return tiny.make_model(seed=3, wide=True)


@pytest.fixture(scope="module")
def clips(model):
    ls = R.hf_to_ls(tiny.state_dict_np(model), NL, MAX_STEP)
    rng = np.random.default_rng(3)
    return R.calibrate_clips(ls, [rng.integers(1, 990, 48) for _ in range(3)], NH, NL)


@pytest.fixture(scope="module")
def files(model, clips, tmp_path_factory):
    """kind -> {origin -> path}: our exporter's files and LightSeq-style reference files."""
    d = tmp_path_factory.mktemp("fmt")
    ls = R.hf_to_ls(tiny.state_dict_np(model), NL, MAX_STEP)
    conf = dict(n_layer=NL, n_head=NH, pad_id=tiny.PAD_ID, eos_id=tiny.EOS_ID)
    out = {
        "fp16": {"lightseq_style": R.write_ls_fp16(d / "ref16.hdf5", ls, **conf)},
        "int8": {"lightseq_style": R.write_ls_int8(d / "ref8.hdf5", ls, clips, **conf)},
    }
    from lsgpt.export.convert import export_model

    out["fp16"]["exported"] = export_model(model, d / "ours16.hdf5", max_step=MAX_STEP)
    qmodel = tiny.attach_clips(tiny.make_model(seed=3, wide=True), clips["layers"], clips["emb_clip_max"],
                               clips["output_ln_clip_max"])
    out["int8"]["exported"] = export_model(qmodel, d / "ours8.hdf5", max_step=MAX_STEP, quantize=True)
    return out


def check_against_loader(path: Path, kind: str) -> list[str]:
    """Every problem LightSeq's loader (or its check()) would have with `path`, plus our dtype rules."""
    import h5py

    reads = _reads(kind)
    expect = {"_hidden_size": H, "_inner_size": INNER, "_src_vocab_size": V, "_max_step": MAX_STEP}
    derived_from = {
        "src_embedding/norm_scale": ("_hidden_size", lambda n: n),
        "encoder_stack/0/ffn_first_kernel": ("_inner_size", lambda n: n // H),
        "src_embedding/position_embedding": ("_max_step", lambda n: n // H),
        "src_embedding/token_embedding": ("_src_vocab_size", lambda n: n // H),
    }
    problems = []
    with h5py.File(path, "r") as f:
        n_layer = int(np.asarray(f["model_conf/n_encoder_stack"][()]).reshape(-1)[0]) \
            if "model_conf/n_encoder_stack" in f else NL
        if n_layer != NL:
            problems.append(f"model_conf/n_encoder_stack={n_layer}, model has {NL} layers")
        for name, rd in LS.expand(reads, n_layer):
            obj = f.get(name)
            if obj is None or not isinstance(obj, h5py.Dataset):
                problems.append(f"{name}: missing (LightSeq throws '{name} Not Found in HDF5 File')")
                continue
            size = int(obj.size) if obj.shape != () else 1
            if rd.func == "get_hdf5_dataset_size":
                key, fn = derived_from[name]
                if fn(size) != expect[key] or size % H:
                    problems.append(f"{name}: {size} elements gives {key}={fn(size)}, expected {expect[key]}")
                continue
            want = rd.expected_size(expect)
            if want is not None and size != want:
                problems.append(f"{name}: {size} elements, loader expects {rd.size_expr} = {want}")
            if rd.max_size is not None and size > rd.max_size:
                problems.append(f"{name}: {size} elements > {rd.max_size}")
            dt = obj.dtype
            if rd.h5type == "H5T_NATIVE_UCHAR" and dt != np.uint8:
                problems.append(f"{name}: dtype {dt}, int8 format stores uint8 (zero point 127)")
            elif rd.h5type == "H5T_NATIVE_FLOAT" and dt.kind != "f":
                problems.append(f"{name}: dtype {dt}, loader reads float")
            elif rd.h5type == "H5T_NATIVE_INT" and dt.kind not in "iu":
                problems.append(f"{name}: dtype {dt}, loader reads int")
            elif rd.h5type == "H5T_NATIVE_CHAR" and not (dt.kind in "iu" and dt.itemsize == 1):
                problems.append(f"{name}: dtype {dt}, loader reads an int8 char array")
        # values the loader / GptEncoder::check / the sampling kernels insist on
        conf = {k: np.asarray(v[()]) for k, v in f["model_conf"].items()} if "model_conf" in f else {}
        if "head_num" in conf:
            nh = int(conf["head_num"].reshape(-1)[0])
            if nh != NH or H % nh or (H // nh) % 2:
                problems.append(f"model_conf/head_num={nh}: expected {NH} (hidden {H} % head_num == 0, even head dim)")
        if "sampling_method" in conf:
            sm = bytes(conf["sampling_method"].astype(np.uint8).reshape(-1).tolist()).decode("ascii", "replace")
            if sm not in METHODS:  # LightSeq takes the whole buffer: a trailing NUL breaks the lookup
                problems.append(f"model_conf/sampling_method={sm!r} not one of {sorted(METHODS)}")
        if "topk" in conf and int(conf["topk"].reshape(-1)[0]) not in VALID_TOPK:
            problems.append(f"model_conf/topk={conf['topk']} not in {sorted(VALID_TOPK)}")
        if "eos_id" in conf and not 0 < int(conf["eos_id"].reshape(-1)[0]) < V:
            problems.append(f"model_conf/eos_id={conf['eos_id']}: must be a non-zero id inside the vocabulary")
        if INNER % 2:
            problems.append("inner size odd")
    return problems


# ------------------------------------------------------------------------------------------------------------
# The oracle itself


@pytest.mark.parametrize("kind", ["fp16", "int8"])
def test_loader_parser_finds_everything(kind):
    """Guard against a parser that silently finds nothing: the counts docs/format.md §2–§4 gives."""
    reads = _reads(kind)
    names = {r.name for r in reads}
    conf = {"n_encoder_stack", "head_num", "src_padding_id", "sampling_method", "topk", "topp", "eos_id",
            "extra_decode_length"}
    assert {f"model_conf/{n}" for n in conf} <= names, sorted(names)
    per_layer = [r for r in reads if r.per_layer]
    emb = [r for r in reads if r.name.startswith("src_embedding/") and r.func != "get_hdf5_dataset_size"]
    if kind == "fp16":
        assert len(per_layer) == 12 and len(emb) == 4
    else:
        assert len(per_layer) == 12 + 4 + 8 and len(emb) == 7
        assert {f"encoder_stack/{{layer}}/{n}" for n in R.LAYER_CLIPS} <= names
        assert all(r.h5type == "H5T_NATIVE_UCHAR" for r in per_layer if r.name.split("/")[-1] in R.KERNELS)
    for r in reads:
        if r.func == "read_hdf5_dataset_data" and r.size_expr:
            assert r.expected_size({"_hidden_size": 2, "_inner_size": 3, "_src_vocab_size": 5, "_max_step": 7}) > 0


@pytest.mark.parametrize("kind", ["fp16", "int8"])
def test_lightseq_style_files_pass_the_checker(files, kind):
    """Self-test: files written exactly as LightSeq's exporters write them satisfy the loader checker."""
    assert check_against_loader(files[kind]["lightseq_style"], kind) == []


@pytest.mark.parametrize("kind", ["fp16", "int8"])
def test_checker_catches_a_broken_file(files, kind, tmp_path):
    import shutil

    import h5py

    p = tmp_path / "broken.hdf5"
    shutil.copy(files[kind]["lightseq_style"], p)
    with h5py.File(p, "a") as f:
        del f["encoder_stack/1/ffn_second_bias"]
        del f["model_conf/extra_decode_length"]
    probs = check_against_loader(p, kind)
    assert any("encoder_stack/1/ffn_second_bias" in x for x in probs)
    assert any("model_conf/extra_decode_length" in x for x in probs)


# ------------------------------------------------------------------------------------------------------------
# Our files


@pytest.mark.parametrize("kind", ["fp16", "int8"])
def test_exported_file_satisfies_lightseq_loader(files, kind):
    problems = check_against_loader(files[kind]["exported"], kind)
    assert problems == [], "\n".join(problems)


@pytest.mark.parametrize("kind", ["fp16", "int8"])
def test_exported_dataset_names_are_exactly_lightseqs(files, kind):
    """The contract: exactly what the 3.0.1 loader reads (which includes model_conf/extra_decode_length)."""
    import h5py

    want = {n for n, _ in LS.expand(_reads(kind), NL)}
    got = set()
    with h5py.File(files[kind]["exported"], "r") as f:
        f.visititems(lambda n, o: got.add(n) if isinstance(o, h5py.Dataset) else None)
    assert not (want - got), f"missing: {sorted(want - got)}"
    assert not (got - want), f"datasets LightSeq never reads: {sorted(got - want)}"


def test_int8_stored_layouts(files):
    """docs/format.md §4: token_embedding uint8 [H, V] (transposed), kernels uint8 [in, out], kernel clips 1.0, logits clip 16."""
    import h5py

    with h5py.File(files["int8"]["exported"], "r") as f:
        emb = f["src_embedding/token_embedding"]
        assert emb.dtype == np.uint8 and emb.size == H * V
        if emb.ndim == 2:
            assert emb.shape == (H, V)
        u = np.asarray(emb[()]).reshape(-1)
        assert u.max() <= 254, "uint8 zero point 127, narrow range: values 0..254"
        for i in range(NL):
            for k in R.KERNELS:
                assert float(f[f"encoder_stack/{i}/{k}_clip_max"][()]) == 1.0
                assert np.asarray(f[f"encoder_stack/{i}/{k}"][()]).max() <= 254
        assert float(f["src_embedding/logits_clip_max"][()]) == 16.0


# ------------------------------------------------------------------------------------------------------------
# lsgpt.format.read_hdf5 accepts LightSeq-written files


@pytest.mark.parametrize("kind", ["fp16", "int8"])
def test_read_hdf5_accepts_lightseq_written_files(files, kind, model):
    from lsgpt.format import read_hdf5

    cfg, arrays = read_hdf5(files[kind]["lightseq_style"])
    assert (cfg.n_layer, cfg.n_head, cfg.hidden, cfg.inner, cfg.vocab, cfg.max_step) == (NL, NH, H, INNER, V, MAX_STEP)
    assert (cfg.eos_id, cfg.pad_id, cfg.extra_decode_length) == (tiny.EOS_ID, tiny.PAD_ID, 0)
    assert cfg.sampling_method == "topk" and cfg.topk == 1 and abs(cfg.topp - 0.75) < 1e-6
    assert cfg.quantized == (kind == "int8")
    sd = tiny.state_dict_np(model)
    ln_bias = np.asarray(arrays["encoder_stack/1/ffn_norm_bias"], dtype=np.float64).reshape(-1)
    np.testing.assert_allclose(ln_bias, sd["transformer.h.1.ln_2.bias"], rtol=1e-6, atol=1e-7)


# ------------------------------------------------------------------------------------------------------------
# lsgpt.format's int8 formulas are the ones written out in the reference (docs/format.md §5.2)


def test_int8_formulas_match_the_reference():
    from lsgpt.format import dequant_scale, int32_out_scale, quantize_u8, requant_alpha, u8_to_i8

    rng = np.random.default_rng(0)
    x = rng.normal(0, 0.6, 4096)
    for c in (1.0, 0.37, 16.0):
        u = quantize_u8(x, c)
        assert np.array_equal(u, R.quant_u8(x, c))
        np.testing.assert_allclose(u8_to_i8(u) * dequant_scale(c), R.dequant_u8(u, c), rtol=1e-12, atol=0)
    cw, ci, co = 1.0, 3.25, 11.5
    # the reference spells each GEMM's scale out inline, in this order (reference_int8.Int8Model.forward)
    assert requant_alpha(cw, ci, co) == cw * ci / (co * R.QMAX)
    assert int32_out_scale(cw, ci) == cw * ci / (R.QMAX * R.QMAX)
    assert requant_alpha(cw, ci, co) == pytest.approx(dequant_scale(cw) * dequant_scale(ci) / dequant_scale(co))


# ------------------------------------------------------------------------------------------------------------
# LightSeq's own loaders, compiled from the wheel's C++ and run on every kind of file we write (issue 31;
# tests/lightseq_loader/, tests/oracles/lightseq_loader.py). What the loader holds is compared with what
# lsgpt.format.read_hdf5 reads, after LightSeq's conversions applied here independently.

DEMO_VOCAB = 21128  # the demo trains over a vocabulary subset, then expands to the full Chinese BERT vocabulary
CLS, SEP = 101, 102


@pytest.fixture(scope="module")
def loader():
    miss = LL.missing()
    if miss:
        pytest.skip(f"LightSeq's C++ loaders cannot be built here: missing {', '.join(miss)} "
                    "(scripts/setup.sh installs them when run as root)")
    b = LL.build()
    print(f"\nLightSeq loader driver {'found cached' if b.cached else 'built'} in {b.seconds:.1f}s: {b.binary}")
    return b.binary


def lightseq_holds(arrays: dict, name: str) -> np.ndarray:
    """The __half values GptWeight<FP16> / QuantGptWeight<FP16> keep for dataset `name`: HDF5 converts the
    stored numbers to float (H5T_NATIVE_FLOAT; uint8 kernels to unsigned char), int8 kernels and the token
    embedding go through util.cc.cu's dequantize(u, 127, clip) = (float(u) - 127) * clip / 127 in float
    arithmetic, clips read as float, and every value becomes fp16 by __float2half_rn (round to nearest even)."""
    a = arrays[name]
    if a.dtype == np.uint8:
        clip = "src_embedding/emb_clip_max" if name == "src_embedding/token_embedding" else name + "_clip_max"
        f = (a.astype(np.float32) - np.float32(127)) * np.float32(arrays[clip]) / np.float32(127)
    else:
        f = np.asarray(a, dtype=np.float32)
    assert f.dtype == np.float32
    return f.astype(np.float16)


def checksum(h: np.ndarray) -> tuple[int, int, float, float, int]:
    """The driver's per-weight line: count, non-finite count, sum and sum of squares of the finite values in
    double, and sum((i+1) * fp16 bits[i]) mod 2**64 (exact and position-sensitive)."""
    bits = h.reshape(-1).view(np.uint16).astype(np.uint64)
    bitsum = int((np.arange(1, bits.size + 1, dtype=np.uint64) * bits).sum(dtype=np.uint64))
    v = h.reshape(-1).astype(np.float64)
    fin = np.isfinite(v)
    return v.size, int((~fin).sum()), float(v[fin].sum()), float((v[fin] ** 2).sum()), bitsum


def expected_conf(cfg) -> dict[str, int]:
    """GptWeight's int fields, from our reader's config (hdf5_get_model_config's rules)."""
    return {"hidden_size": cfg.hidden, "inner_size": cfg.inner, "max_step": cfg.max_step,
            "src_vocab_size": cfg.vocab, "n_enc_layer": cfg.n_layer, "head_num": cfg.n_head,
            "dim_per_head": cfg.hidden // cfg.n_head, "weight_per_enc_layer": 12, "padding_id": cfg.pad_id,
            "eos_id": cfg.eos_id, "topk": cfg.topk,  # read_hdf5 applies LightSeq's "0 keeps 4" already
            "extra_decode_length": cfg.extra_decode_length if cfg.extra_decode_length > 0 else cfg.max_step}


def assert_loader_reads_what_we_read(got: LL.Loaded, path: Path) -> None:
    from lsgpt.format import read_hdf5

    assert got.ok, f"LightSeq's loader refused {path.name}: {got.error}\n{got.stdout[-2000:]}\n{got.stderr[-2000:]}"
    cfg, arrays = read_hdf5(path)
    want = expected_conf(cfg)
    assert {k: got.conf_int(k) for k in want} == want
    assert got.conf_float("topp") == float(np.float32(cfg.topp))
    assert got.sampling_method() == cfg.sampling_method.encode("ascii")
    weights = {n for n, a in arrays.items() if np.ndim(a) == 1}
    assert set(got.weights) == weights
    for name in sorted(weights):
        n, nonfinite, s, sq, bits = checksum(lightseq_holds(arrays, name))
        gn, gnonfinite, gs, gsq, gbits = got.weights[name]
        assert (gn, gnonfinite, gbits) == (n, nonfinite, bits), f"{path.name}: {name} differs"
        # same values, summed in another order (numpy's pairwise sum vs the driver's loop): rounding only
        tol = 1e-12 * n * (1.0 + sq)
        assert abs(gs - s) <= tol and abs(gsq - sq) <= tol, (name, gs, s, gsq, sq)
    clips = {n: float(np.float32(a)) for n, a in arrays.items() if n.endswith("_clip_max")}
    assert got.clips == clips  # float32 values, exact; {} for fp16
    if cfg.quantized:
        assert got.conf_float("quant_range") == 127.0


def _demo_files(d: Path) -> dict[str, tuple[Path, str]]:
    """The demo's models, exported by the demo's command (export/export.py -m CKPT -l BLOCK [-q]): its two sizes
    (scripts/demo.py SIZES), the full vocabulary, QAT clips for int8; random weights stand in for training."""
    from lsgpt.export.cli import main as export_cli
    from scripts.demo import SIZES

    out = {}
    for size, s in SIZES.items():
        over = dict(n_layer=s["layers"], n_embd=s["hidden"], n_head=s["heads"], n_positions=s["block"],
                    vocab_size=DEMO_VOCAB, eos_token_id=SEP, bos_token_id=CLS, pad_token_id=0)
        for kind in ("fp16", "int8"):
            m = tiny.make_model(seed=7, wide=True, **over)
            if kind == "int8":
                layer = {n: 2.5 + 0.1 * j for j, n in enumerate(tiny.LAYER_CLIP_NAMES)}
                tiny.attach_clips(m, [layer] * s["layers"], 0.9, 5.0)
            ckpt = tiny.save_bin_checkpoint(m, d / f"demo_{size}_{kind}")
            assert export_cli(["-m", str(ckpt), "-l", str(s["block"])] + (["-q"] if kind == "int8" else [])) == 0
            out[f"demo {size} {kind}"] = (ckpt.with_suffix(".hdf5"), kind)
    return out


def _calibrated_file(d: Path) -> Path:
    """int8 by post-training calibration (export/export.py -q --calibrate TEXT -p VOCAB)."""
    from lsgpt.export.convert import export_model

    toks = ["[PAD]"] + [f"[unused{i}]" for i in range(1, 100)] + ["[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    (d / "vocab.txt").write_text("\n".join(toks + [f"w{i}" for i in range(104, V)]) + "\n")
    rng = np.random.default_rng(31)
    (d / "calib.txt").write_text("\n".join(" ".join(f"w{i}" for i in rng.integers(104, V, 40)) for _ in range(8)))
    ckpt = tiny.save_bin_checkpoint(tiny.make_model(seed=31, wide=True), d / "calib_ckpt")
    return export_model(ckpt, d / "calib8.hdf5", max_step=MAX_STEP, quantize=True, calibrate_text=d / "calib.txt",
                        tokenizer=d / "vocab.txt")


@pytest.fixture(scope="module")
def written(files, model, clips, tmp_path_factory) -> dict[str, tuple[Path, str]]:
    """label -> (path, kind): every kind of file we write, and LightSeq-style files as a control."""
    from lsgpt.export.convert import export_model

    d = tmp_path_factory.mktemp("loader")
    out = {f"{kind} {origin}": (p, kind) for kind, by in files.items() for origin, p in by.items()}
    out["int8 calibrated"] = (_calibrated_file(d), "int8")
    conf = dict(max_step=MAX_STEP, extra_decode_length=17, sampling_method="topp", topp=0.9, topk=8)
    out["fp16 extra_decode_length"] = (export_model(model, d / "edl16.hdf5", **conf), "fp16")
    qmodel = tiny.attach_clips(tiny.make_model(seed=3, wide=True), clips["layers"], clips["emb_clip_max"],
                               clips["output_ln_clip_max"])
    out["int8 extra_decode_length"] = (export_model(qmodel, d / "edl8.hdf5", quantize=True, **conf), "int8")
    out.update(_demo_files(d))
    out["fp16 lightseq_defaults"] = (_with_defaults(files["fp16"]["lightseq_style"], d / "defaults16.hdf5"), "fp16")
    return out


def _with_defaults(src: Path, dst: Path) -> Path:
    """A LightSeq-style file leaving the sampling settings to LightSeq's defaults: topk 0 (-> 4), topp 0
    (-> 0.75), an empty sampling_method (-> "topk")."""
    import shutil

    import h5py

    shutil.copy(src, dst)
    with h5py.File(dst, "a") as f:
        for name, data in (("topk", np.int32(0)), ("topp", np.float32(0)), ("sampling_method", np.zeros(0, np.int8))):
            del f[f"model_conf/{name}"]
            f.create_dataset(f"model_conf/{name}", data=data)
    return dst


WRITTEN = ["fp16 exported", "int8 exported", "fp16 lightseq_style", "int8 lightseq_style", "int8 calibrated",
           "fp16 extra_decode_length", "int8 extra_decode_length", "demo default fp16", "demo default int8",
           "demo quick fp16", "demo quick int8", "fp16 lightseq_defaults"]


def test_every_written_kind_is_covered(written):
    assert sorted(written) == sorted(WRITTEN)


@pytest.mark.parametrize("label", WRITTEN)
def test_lightseq_loader_reads_what_we_read(loader, written, label):
    path, kind = written[label]
    got = LL.load(loader, path, kind)
    assert_loader_reads_what_we_read(got, path)
    if "extra_decode_length" in label:
        assert got.conf_int("extra_decode_length") == 17 and got.sampling_method() == b"topp"
        assert got.conf_int("topk") == 8 and got.conf_float("topp") == float(np.float32(0.9))
    if "defaults" in label:
        assert (got.conf_int("topk"), got.conf_float("topp"), got.sampling_method()) == (4, 0.75, b"topk")


@pytest.mark.parametrize("kind", ["fp16", "int8"])
def test_lightseq_loader_refuses_the_other_precision(loader, files, kind):
    """An fp16 file given to QuantGptWeight (and int8 to GptWeight): the control that the driver can fail."""
    other = "int8" if kind == "fp16" else "fp16"
    got = LL.load(loader, files[kind]["exported"], other)
    if other == "int8":
        assert not got.ok and got.error == "src_embedding/emb_clip_max Not Found in HDF5 File", got.error
    else:  # GptWeight reads uint8 kernels as float without complaint: H5T converts; only the values are wrong
        assert got.ok


# ------------------------------------------------------------------------------------------------------------
# The corrupt files of tests/test_format_corrupt.py, given to LightSeq's loader. lsgpt.format.read_hdf5 refuses
# every one of them (that test); LightSeq's loader refuses those below with its own message, and loads the rest.


def _not_found(name):
    return f"{name} Not Found in HDF5 File"


LOADER_REFUSES = {  # case -> LightSeq's exception text (util.cc.cu / the loaders), exactly
    "del_layer_bias": _not_found("encoder_stack/1/ffn_first_bias"),
    "del_extra_decode": _not_found("model_conf/extra_decode_length"),
    "del_act_clip": _not_found("encoder_stack/1/self_qkv_bias_out_clip_max"),
    "del_kernel_clip": _not_found("encoder_stack/0/ffn_second_kernel_clip_max"),
    "del_logits_clip": _not_found("src_embedding/logits_clip_max"),
    "del_ln_f": _not_found("src_embedding/norm_bias"),
    "short_ln": "Invalid shape 63. Wrong multihead_norm_bias_size !",
    "short_qkv": "Invalid shape 12286. Wrong multihead_project_kernel_qkv_size !",
    "short_kernel_i8": "Invalid shape 16320. Wrong ffn_second_kernel_size !",
    "pos_not_multiple": "Invalid shape 645. Wrong position_embedding_size !",  # max_step = 645 // 64 = 10
    "string_scale": "Failed to read HDF5 dataset: encoder_stack/0/ffn_norm_scale",  # no string -> float conversion
    "group_not_dataset": "Failed to open HDF5 dataset: src_embedding/norm_scale",
    # the byte-level damage: H5Fopen fails; initializing() returns "Unable to read HDF5 file from PATH"
    **{name: "Unable to read HDF5 file from " for name in C.BYTE_CASES},
}
# case -> what LightSeq does with the file it loaded (only our reader refuses these at load time)
LOADER_ACCEPTS = {
    "float_kernel_in_int8": "H5T converts float 0.0 to unsigned char 0: the kernel dequantizes to -clip everywhere",
    "u8_kernel_in_fp16": "H5T converts uint8 to float: the kernel loads as its integer values",
    "nan_kernel": "NaN loaded as is", "inf_pos": "Inf loaded as is", "nan_bias_i8": "NaN loaded as is",
    "nan_clip": "a NaN clip is stored", "zero_clip": "a 0 emb clip: the token embedding dequantizes to zeros",
    "bad_method": "GptEncoder::check() refuses it later: 'unsupported sampling_method: beam_search'",
    "bad_topk": "refused only at the first generation: 'topk argument should be in [1,2,4,8,16,32]'",
    "eos_zero": "eos_id 0 leaves GptWeight::_eos_id unassigned (the driver value-initialises it to 0)",
    "heads_5": "no head_num check on the HDF5 path (the .pb path has one): dim_per_head 64 // 5 = 12, even, "
               "so GptEncoder::check() passes too and attention runs on a wrong split",
}


@pytest.fixture(scope="module")
def corrupt(loader, tmp_path_factory) -> dict[str, LL.Loaded]:
    d = tmp_path_factory.mktemp("corrupt")
    kinds = {cid: kind for cid, kind, _, _ in C.CASES}
    out = {}
    for p in C.write_damaged(C.write_good(d), d):
        out[p.stem] = LL.load(loader, p, kinds.get(p.stem, "fp16"))
        print(f"{p.stem:22s} -> {'loaded' if out[p.stem].ok else out[p.stem].error}")
    return out


def test_corrupt_cases_are_all_classified():
    cases = [c[0] for c in C.CASES] + list(C.BYTE_CASES)
    assert not set(LOADER_REFUSES) & set(LOADER_ACCEPTS)
    assert sorted([*LOADER_REFUSES, *LOADER_ACCEPTS]) == sorted(cases)


@pytest.mark.parametrize("case", sorted(LOADER_REFUSES))
def test_lightseq_loader_refuses_corrupt_file(corrupt, case):
    got = corrupt[case]
    assert not got.ok and got.rc == 2, f"{case}: LightSeq's loader accepted it (rc={got.rc})\n{got.stdout[-1500:]}"
    assert got.error.startswith(LOADER_REFUSES[case]), (case, got.error)
    assert not got.weights, "an error is reported before anything is printed"


@pytest.mark.parametrize("case", sorted(LOADER_ACCEPTS))
def test_lightseq_loader_loads_what_only_our_reader_refuses(corrupt, case):
    """Recorded, not endorsed: what LightSeq's loader does with a file lsgpt.format.read_hdf5 refuses."""
    got = corrupt[case]
    assert got.ok, f"{case}: now refused by LightSeq's loader: {got.error} (move it to LOADER_REFUSES)"
    w, nonfinite = got.weights, {n: v[1] for n, v in got.weights.items() if v[1]}
    expect = {
        "float_kernel_in_int8": lambda: w["encoder_stack/0/multihead_project_kernel_output"][2:4] == (-64 * 64, 64 * 64),
        "u8_kernel_in_fp16": lambda: w["encoder_stack/1/ffn_first_kernel"][2:4] == (0.0, 0.0),
        "nan_kernel": lambda: nonfinite == {"encoder_stack/1/ffn_second_kernel": 1},
        "inf_pos": lambda: nonfinite == {"src_embedding/position_embedding": 1},
        "nan_bias_i8": lambda: nonfinite == {"encoder_stack/0/multihead_project_bias_qkv": 1},
        "nan_clip": lambda: np.isnan(got.clips["encoder_stack/0/ffn_ln_clip_max"]),
        "zero_clip": lambda: got.clips["src_embedding/emb_clip_max"] == 0 and w["src_embedding/token_embedding"][3] == 0,
        "bad_method": lambda: got.sampling_method() == b"beam_search",
        "bad_topk": lambda: got.conf_int("topk") == 3,
        "eos_zero": lambda: got.conf_int("eos_id") == 0,
        "heads_5": lambda: (got.conf_int("head_num"), got.conf_int("dim_per_head")) == (5, 12),
    }[case]
    assert expect(), (case, LOADER_ACCEPTS[case])
