"""lsgpt.format.read_hdf5 / Engine.load on corrupt, truncated and incomplete files (docs/format.md §1: every dataset
is required, sizes are checked by element count): always a FormatError naming the dataset or the problem,
never a crash. Reads run in a child process so that a crash in the HDF5 library is a failure, not the end
of the test session.

The valid starting files are written by the independent LightSeq-style writer (tests/oracles), so this
test does not depend on the exporter.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from oracles import reference_int8 as R
from oracles import tiny

ROOT = Path(__file__).resolve().parents[1]
NL, NH, MAX_STEP = 2, 4, 64

_CHILD = r"""
import json, sys
from lsgpt.format import FormatError, read_hdf5
for p in sys.argv[1:]:
    try:
        read_hdf5(p)
        r = {"path": p, "ok": True}
    except FormatError as e:
        r = {"path": p, "ok": False, "format_error": True, "type": type(e).__name__, "msg": str(e)}
    except BaseException as e:
        r = {"path": p, "ok": False, "format_error": False, "type": type(e).__name__, "msg": str(e)}
    print(json.dumps(r), flush=True)
"""


def read_in_child(paths: list[Path]) -> dict[str, dict]:
    proc = subprocess.run([sys.executable, "-c", _CHILD, *map(str, paths)], capture_output=True, cwd=ROOT,
                          text=True, timeout=120)
    results = {}
    for line in proc.stdout.splitlines():
        if line.startswith("{"):
            r = json.loads(line)
            results[Path(r["path"]).name] = r
    assert proc.returncode == 0, f"reader process died (rc={proc.returncode}) after {list(results)}:\n{proc.stderr[-3000:]}"
    assert len(results) == len(paths), proc.stderr[-3000:]
    return results


def write_good(d: Path) -> dict[str, Path]:
    """The valid starting files: fp16 and int8, written the way LightSeq's own exporters write them."""
    m = tiny.make_model(seed=5)
    ls = R.hf_to_ls(tiny.state_dict_np(m), NL, MAX_STEP)
    conf = dict(n_layer=NL, n_head=NH, pad_id=tiny.PAD_ID, eos_id=tiny.EOS_ID)
    clips = {"emb_clip_max": 0.1, "output_ln_clip_max": 4.0,
             "layers": [{n: 2.0 for n in R.LAYER_CLIPS} for _ in range(NL)]}
    return {"fp16": R.write_ls_fp16(d / "good16.hdf5", ls, **conf),
            "int8": R.write_ls_int8(d / "good8.hdf5", ls, clips, **conf)}


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    return write_good(tmp_path_factory.mktemp("good"))


def _edit(src: Path, dst: Path, fn) -> Path:
    import h5py

    shutil.copy(src, dst)
    with h5py.File(dst, "a") as f:
        fn(f)
    return dst


def _replace(name, data):
    def fn(f):
        del f[name]
        f.create_dataset(name, data=data)
    return fn


def _set_element(name, value, index=0):
    def fn(f):
        a = np.array(f[name][()])
        a.reshape(-1)[index] = value
        del f[name]
        f.create_dataset(name, data=a)
    return fn


def _delete(name):
    def fn(f):
        del f[name]
    return fn


# (file id, base kind, edit, words the message must contain (any of each tuple))
CASES = [
    ("del_layer_bias", "fp16", _delete("encoder_stack/1/ffn_first_bias"), [("encoder_stack/1/ffn_first_bias",)]),
    ("del_extra_decode", "int8", _delete("model_conf/extra_decode_length"), [("model_conf/extra_decode_length",)]),
    ("del_act_clip", "int8", _delete("encoder_stack/1/self_qkv_bias_out_clip_max"),
     [("encoder_stack/1/self_qkv_bias_out_clip_max",)]),
    ("del_kernel_clip", "int8", _delete("encoder_stack/0/ffn_second_kernel_clip_max"),
     [("encoder_stack/0/ffn_second_kernel_clip_max",)]),
    ("del_logits_clip", "int8", _delete("src_embedding/logits_clip_max"), [("src_embedding/logits_clip_max",)]),
    ("del_ln_f", "fp16", _delete("src_embedding/norm_bias"), [("src_embedding/norm_bias",)]),
    ("short_ln", "fp16", _replace("encoder_stack/0/multihead_norm_bias", np.zeros(63)),
     [("encoder_stack/0/multihead_norm_bias",), ("63",)]),
    ("short_qkv", "fp16", _replace("encoder_stack/1/multihead_project_kernel_qkv", np.zeros(64 * 64 * 3 - 2)),
     [("encoder_stack/1/multihead_project_kernel_qkv",)]),
    ("short_kernel_i8", "int8", _replace("encoder_stack/1/ffn_second_kernel", np.zeros((255, 64), np.uint8)),
     [("encoder_stack/1/ffn_second_kernel",)]),
    ("pos_not_multiple", "fp16", _replace("src_embedding/position_embedding", np.zeros(64 * 10 + 5, np.float32)),
     [("position_embedding",)]),
    ("float_kernel_in_int8", "int8",
     _replace("encoder_stack/0/multihead_project_kernel_output", np.zeros((64, 64), np.float32)),
     [("encoder_stack/0/multihead_project_kernel_output",), ("uint8", "dtype")]),
    ("u8_kernel_in_fp16", "fp16", _replace("encoder_stack/1/ffn_first_kernel", np.zeros(64 * 256, np.uint8)),
     [("encoder_stack/1/ffn_first_kernel",), ("float", "dtype", "uint8")]),
    ("string_scale", "fp16", _replace("encoder_stack/0/ffn_norm_scale", np.array([b"x" * 8] * 64)),
     [("encoder_stack/0/ffn_norm_scale",)]),
    ("nan_kernel", "fp16", _set_element("encoder_stack/1/ffn_second_kernel", np.nan, 17),
     [("encoder_stack/1/ffn_second_kernel",), ("nan", "NaN", "finite")]),
    ("inf_pos", "fp16", _set_element("src_embedding/position_embedding", np.inf, 3),
     [("src_embedding/position_embedding",), ("inf", "Inf", "finite")]),
    ("nan_bias_i8", "int8", _set_element("encoder_stack/0/multihead_project_bias_qkv", np.nan, 5),
     [("encoder_stack/0/multihead_project_bias_qkv",), ("nan", "NaN", "finite")]),
    ("nan_clip", "int8", _replace("encoder_stack/0/ffn_ln_clip_max", np.float64(np.nan)),
     [("encoder_stack/0/ffn_ln_clip_max",)]),
    ("zero_clip", "int8", _replace("src_embedding/emb_clip_max", np.float32(0.0)), [("src_embedding/emb_clip_max",)]),
    ("bad_method", "fp16", _replace("model_conf/sampling_method", np.frombuffer(b"beam_search", np.int8)),
     [("sampling_method", "beam_search")]),
    ("bad_topk", "fp16", _replace("model_conf/topk", np.int32(3)), [("topk",)]),
    ("eos_zero", "fp16", _replace("model_conf/eos_id", np.int32(0)), [("eos",)]),
    ("heads_5", "fp16", _replace("model_conf/head_num", np.int32(5)), [("head",)]),
    ("group_not_dataset", "fp16",
     lambda f: (f.__delitem__("src_embedding/norm_scale"), f.create_group("src_embedding/norm_scale")),
     [("src_embedding/norm_scale",)]),
]


def _lower_any(msg: str, words) -> bool:
    return any(w.lower() in msg.lower() for w in words)


BYTE_CASES = ["trunc_0.0003", "trunc_0.3", "trunc_0.7", "trunc_0.999", "empty", "text", "zeros", "missing"]


def write_damaged(good: dict[str, Path], tmp_path: Path) -> list[Path]:
    """Every damaged file: `{case id}.hdf5` for CASES (from `good[kind]`), `{BYTE_CASES name}.hdf5` (no file for
    "missing")."""
    paths = [_edit(good[kind], tmp_path / f"{cid}.hdf5", fn) for cid, kind, fn, _ in CASES]
    raw = good["fp16"].read_bytes()
    for frac in (0.0003, 0.3, 0.7, 0.999):
        p = tmp_path / f"trunc_{frac}.hdf5"
        p.write_bytes(raw[: max(1, int(len(raw) * frac))])
        paths.append(p)
    (tmp_path / "empty.hdf5").write_bytes(b"")
    (tmp_path / "text.hdf5").write_text("this is a text file renamed to .hdf5\n" * 50)
    (tmp_path / "zeros.hdf5").write_bytes(bytes(4096))
    return paths + [tmp_path / "empty.hdf5", tmp_path / "text.hdf5", tmp_path / "zeros.hdf5", tmp_path / "missing.hdf5"]


@pytest.fixture(scope="module")
def results(good, tmp_path_factory):
    """Build every damaged file, then read them all in one child process."""
    paths = write_damaged(good, tmp_path_factory.mktemp("bad"))
    paths += [good["fp16"], good["int8"]]  # must still read: the harness is not rejecting everything
    res = read_in_child(paths)
    for r in res.values():
        print(Path(r["path"]).name, "->", r.get("type"), r.get("msg", "")[:160])
    return res


def test_reference_files_read(results):
    assert results["good16.hdf5"]["ok"] and results["good8.hdf5"]["ok"], (results["good16.hdf5"], results["good8.hdf5"])


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_damaged_dataset_gives_format_error_naming_it(results, case):
    cid, _, _, words = case
    r = results[f"{cid}.hdf5"]
    assert not r["ok"], f"{cid}: read_hdf5 accepted a damaged file"
    assert r["format_error"], f"{cid}: {r['type']} instead of FormatError: {r['msg']}"
    for w in words:
        assert _lower_any(r["msg"], w), f"{cid}: message does not name {w}: {r['msg']!r}"


@pytest.mark.parametrize("name", BYTE_CASES)
def test_damaged_bytes_give_format_error(results, name):
    r = results[f"{name}.hdf5"]
    assert not r["ok"] and r["format_error"] and r["msg"], r


def test_format_error_is_a_value_error():
    from lsgpt.format import FormatError

    assert issubclass(FormatError, ValueError)


def test_engine_load_rejects_incomplete_file(good, tmp_path):
    from lsgpt.engine.engine import Engine
    from lsgpt.format import FormatError

    p = _edit(good["int8"], tmp_path / "noclip.hdf5", _delete("encoder_stack/0/multihead_ln_clip_max"))
    with pytest.raises(FormatError, match="encoder_stack/0/multihead_ln_clip_max"):
        Engine.load(p, device="cpu")
    t = tmp_path / "trunc.hdf5"
    t.write_bytes(good["fp16"].read_bytes()[:5000])
    with pytest.raises(FormatError):
        Engine.load(t, device="cpu")
