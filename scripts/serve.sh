#!/usr/bin/env bash
# Serve model_repository/ with a real tritonserver, in the foreground (Ctrl-C / SIGTERM stops it cleanly).
#   scripts/serve.sh [--model-repository DIR] [--grpc-port 8001] [--http-port 8000] [--metrics-port 8002]
#                    [--host 127.0.0.1] [--models gpt2,gpt2_int8] [--device cpu] [extra tritonserver flags]
# Also the Docker entrypoint. Uses the project's .venv when there is one (native), else python3 (container).
# Everything else (finding tritonserver, backend folder, LD_LIBRARY_PATH, repository view) is lsgpt/serving/launcher.py.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python3}"
if [ -x "$ROOT/.venv/bin/python" ] && [ -z "${PYTHON:-}" ]; then
    PY="$ROOT/.venv/bin/python"
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
# exec: the launcher gets the signals itself (PID 1 in a container).
exec "$PY" -m lsgpt.serving.launcher "$@"
