#!/usr/bin/env bash
# Build the CPU images with podman on the Debian base of scripts/podman-base.sh (no registry needed):
#   scripts/podman-build.sh server   -> localhost/lsgpt-triton-server:cpu   (docker/Dockerfile)
#   scripts/podman-build.sh train    -> localhost/lsgpt-triton-train:cpu    (docker/Dockerfile.train, FROM the server image)
# torch: the CPU build. Where $PIP_FIND_LINKS names a folder holding a torch wheel (our machines: /opt/wheels),
# that folder is mounted into the build and pip takes the wheel from it; elsewhere from PyTorch's CPU index.
# Layers are cached by podman: a rebuild with nothing changed takes seconds. Extra arguments go to podman build.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
what="${1:?usage: scripts/podman-build.sh server|train [podman build options]}"
shift
case "$what" in
    server) file=docker/Dockerfile ;;
    train) file=docker/Dockerfile.train ;;
    *) echo "scripts/podman-build.sh: server or train, not '$what'" >&2; exit 2 ;;
esac
base="$(scripts/podman-base.sh | tail -n 1)"
if [ "$what" = train ]; then
    # the training image starts from the CPU server image: its torch layer (1.5 GB, minutes to build) is shared
    "$0" server >/dev/null
    base=localhost/lsgpt-triton-server:cpu
fi
args=(--build-arg "BASE=$base")
wheels="${PIP_FIND_LINKS:-}"
if [ -n "$wheels" ] && [ -d "$wheels" ] && compgen -G "$wheels/torch-*.whl" >/dev/null; then
    args+=(--volume "$wheels:/wheels:ro" --build-arg PIP_FIND_LINKS=/wheels --build-arg TORCH_INDEX=)
else
    args+=(--build-arg TORCH_INDEX=https://download.pytorch.org/whl/cpu)
fi
# a proxy that re-signs TLS (pip's cert setting here): its CA, mounted, for pip inside the build
ca="${PIP_CERT:-${SSL_CERT_FILE:-}}"
if [ -n "$ca" ] && [ -f "$ca" ]; then
    args+=(--volume "$ca:/run/host-ca.crt:ro" --build-arg CA_BUNDLE=/run/host-ca.crt)
fi
# --format docker keeps HEALTHCHECK (OCI images have no such field); the ignore file sits beside the Dockerfile
exec podman build --format docker --layers -f "$file" --ignorefile "$file.dockerignore" "${args[@]}" \
    -t "localhost/lsgpt-triton-$what:cpu" "$@" .
