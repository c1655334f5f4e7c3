"""benchmarks.pyspy: the summary of py-spy's collapsed stacks (hand-counted oracle), and a real recording when
py-spy is installed (it is not in the set-up: the GPU machine gets it in its site tarball)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from benchmarks import pyspy

RAW = """\
thread (11): lsgpt-scheduler;Thread.run (threading.py:982);Scheduler._loop (/x/lsgpt/engine/scheduler.py:336);Scheduler._step (/x/lsgpt/engine/scheduler.py:512) 6
thread (11): lsgpt-scheduler;Thread.run (threading.py:982);Scheduler._loop (/x/lsgpt/engine/scheduler.py:340) 2
thread (12): lsgpt-cancel-gpt2;Thread.run (threading.py:982);CancelWatch._run (/x/lsgpt/serving/cancel.py:111);Watched.poll (/x/lsgpt/serving/cancel.py:38) 2
not a sample line
"""


def test_summary_counts_threads_and_our_functions_inclusively():
    s = pyspy.summarize(RAW)
    assert s["samples"] == 10
    assert s["threads"] == {"lsgpt-scheduler": 0.8, "lsgpt-cancel-gpt2": 0.2}
    got = dict(s["lsgpt"])
    # _loop is on the stack of 6 + 2 samples (two lines of it merged); the stdlib frame is not ours
    assert got == {"Scheduler._loop (engine/scheduler.py)": 0.8, "Scheduler._step (engine/scheduler.py)": 0.6,
                   "CancelWatch._run (serving/cancel.py)": 0.2, "Watched.poll (serving/cancel.py)": 0.2}


@pytest.mark.skipif(pyspy.binary() is None, reason="py-spy is not installed (pip install py-spy; PY_SPY=path)")
def test_a_real_recording_finds_the_busy_function(tmp_path):
    # py-spy names files relative to sys.path, as it does the real lsgpt/...: a package of that name in cwd
    (tmp_path / "lsgpt").mkdir()
    (tmp_path / "lsgpt" / "__init__.py").write_text("")
    (tmp_path / "lsgpt" / "busy.py").write_text(textwrap.dedent("""\
        import time
        def spin(seconds):
            end = time.time() + seconds
            while time.time() < end:
                sum(range(100))
        spin(6)
        """))
    proc = subprocess.Popen([sys.executable, "-m", "lsgpt.busy"], cwd=tmp_path, env={"PATH": os.environ["PATH"]})
    try:
        s = pyspy.Recording(proc.pid, 1.5, delay=0.5).summary()
    finally:
        proc.kill()
    if "error" in s and "ermission" in s["error"]:
        pytest.skip(f"py-spy may not attach here: {s['error']}")
    assert s["samples"] > 50 and list(s["threads"].values()) == [1.0]  # one thread (unnamed: no threading import)
    assert dict(s["lsgpt"]).get("spin (busy.py)") == 1.0, s


def test_serving_refuses_a_negative_or_unavailable_py_spy_before_starting_anything(monkeypatch, capsys):
    from benchmarks import serving

    with pytest.raises(SystemExit) as e:
        serving.parse_args(["--py-spy", "-1"])
    assert e.value.code == 2 and "--py-spy: seconds must be >= 0" in capsys.readouterr().err
    monkeypatch.setattr(pyspy, "binary", lambda: None)
    with pytest.raises(SystemExit) as e:
        serving.parse_args(["--py-spy", "2"])
    assert e.value.code == 2 and "py-spy not found" in capsys.readouterr().err
    assert serving.parse_args(["--py-spy", "0"]).py_spy == 0  # off needs no py-spy


def test_the_engine_child_of_a_stub_is_found_by_parent_and_command():
    """py-spy also records a model's engine process (LSGPT_ENGINE_PROCESS=1): the child of that pid whose command
    runs lsgpt.serving.engine_process, and no other."""
    import os
    import subprocess
    import sys

    from benchmarks.pyspy import engine_child

    assert engine_child(os.getpid()) is None
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)", "x"])
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)", "lsgpt.serving.engine_process"])
    try:
        assert engine_child(os.getpid()) == child.pid
        assert engine_child(other.pid) is None
    finally:
        for p in (other, child):
            p.kill()
            p.wait()
