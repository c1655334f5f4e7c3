"""The Python-based backend "lsgpt_drain": the launcher's readiness marker during a drain (installed as
<backend-directory>/lsgpt_drain/model.py; lsgpt/serving/launcher.py, TritonServer.drain).

tritonserver 2.51 has no way to say "not ready" for a model that is loaded and finishing its requests: an unloading
model refuses new requests with NOT_FOUND, and a loaded one is ready. A model that is *loading* makes
/v2/health/ready false (strict readiness: every live model must be ready). So the drain loads this one, whose
initialize waits until the drain is over ($LSGPT_DRAIN_FILE appears) and then fails: the server reads not ready for
the whole drain while the real models stay loaded and finish what they run. It never serves a request.
Standard library only: it runs in the stub's bare interpreter.
"""

import os
import time


class TritonPythonModel:
    def initialize(self, args):
        path = os.environ.get("LSGPT_DRAIN_FILE", "")
        deadline = time.monotonic() + 3600  # a bound for a launcher that died without ending the drain
        while path and not os.path.exists(path) and time.monotonic() < deadline:
            time.sleep(0.1)
        raise RuntimeError("the server is shutting down: this marker keeps /v2/health/ready false during the "
                           "drain and is never loaded")

    def execute(self, requests):
        return None
