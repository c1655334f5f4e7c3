"""Triton Python-backend entry point; the implementation is lsgpt/triton_model.py.

The backend stub starts an isolated interpreter: the launcher (lsgpt/triton.py) hands over the virtual
environment's site-packages in LSGPT_SITE_PACKAGES and the repository root in LSGPT_ROOT.
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

from lsgpt.triton_model import TritonPythonModel  # noqa: E402,F401
