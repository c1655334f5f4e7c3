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
    """The served model, plus the launcher's drain, in two steps:
    - $LSGPT_DRAIN_START_FILE appears (SIGTERM): the scheduler stops admitting, so new requests get UNAVAILABLE
      ("the server is shutting down"), while the running and queued ones go on;
    - $LSGPT_DRAIN_FILE appears (the grace is over): what still runs or waits ends at once with UNAVAILABLE (the
      scheduler's ShuttingDown), so the model unloads and tritonserver exits with no request inside a model."""

    def initialize(self, args):
        super().initialize(args)
        self._lsgpt_unloaded = threading.Event()
        start, end = os.environ.get("LSGPT_DRAIN_START_FILE"), os.environ.get("LSGPT_DRAIN_FILE")
        if start or end:
            threading.Thread(target=self._watch_drain, args=(start, end), name="lsgpt-drain", daemon=True).start()

    def _watch_drain(self, start, end):
        admitting = True
        while not self._lsgpt_unloaded.wait(0.1):
            if admitting and start and os.path.exists(start):
                self.scheduler.stop_admitting()
                admitting = False
            if end and os.path.exists(end):
                self.scheduler.close()
                return

    def finalize(self):
        if getattr(self, "_lsgpt_unloaded", None) is not None:
            self._lsgpt_unloaded.set()
        super().finalize()
