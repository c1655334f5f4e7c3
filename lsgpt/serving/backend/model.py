"""The Python-based Triton backend "lsgpt": model configs say `backend: "lsgpt"` and Triton runs this file
(installed by the launcher as <backend-directory>/lsgpt/model.py) through its Python backend for every such
model. Version folders hold data only (model.hdf5, vocab.txt); the implementation is lsgpt/serving/triton_model.py.

The backend stub starts an isolated interpreter: the launcher (lsgpt/serving/launcher.py) hands over the virtual
environment's site-packages in LSGPT_SITE_PACKAGES and the repository root in LSGPT_ROOT. This file is the one
place outside the tests that edits sys.path, because nothing else can.
"""

import os
import site
import sys

_before = list(sys.path)
for _p in filter(None, os.environ.get("LSGPT_SITE_PACKAGES", "").split(os.pathsep)):
    site.addsitedir(_p)  # also runs the .pth files (editable installs)
# Our environment's packages win over anything the linked interpreter's own prefix provides.
sys.path[:] = [os.environ.get("LSGPT_ROOT", "")] + [p for p in sys.path if p not in _before] + _before
sys.path[:] = [p for p in sys.path if p]

import threading  # noqa: E402

from lsgpt.serving.triton_model import TritonPythonModel as _Model  # noqa: E402


class TritonPythonModel(_Model):
    """The served model, plus the launcher's drain: when $LSGPT_DRAIN_FILE appears (the drain's grace is over),
    the requests still running or queued end at once with UNAVAILABLE (the scheduler's ShuttingDown), so the
    model unloads and tritonserver exits with no request inside a model."""

    def initialize(self, args):
        super().initialize(args)
        self._lsgpt_unloaded = threading.Event()
        path = os.environ.get("LSGPT_DRAIN_FILE")
        if path:
            threading.Thread(target=self._end_at_drain, args=(path,), name="lsgpt-drain", daemon=True).start()

    def _end_at_drain(self, path):
        while not self._lsgpt_unloaded.wait(0.25):
            if os.path.exists(path):
                self.scheduler.close()
                return

    def finalize(self):
        if getattr(self, "_lsgpt_unloaded", None) is not None:
            self._lsgpt_unloaded.set()
        super().finalize()
