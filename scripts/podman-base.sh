#!/usr/bin/env bash
# Containers without a registry: podman (with runc) and the Debian base image the CPU images build FROM, made
# from Debian's mirror by debootstrap. Idempotent; prints the base image's name on its last line.
#   scripts/podman-base.sh            -> localhost/lsgpt-debian:bookworm
# As root on Debian it installs podman, runc and debootstrap and writes /etc/containers/containers.conf (when
# that file does not exist) with the two settings podman needs on hosts like ours: runc (crun cannot set rlimits
# without CAP_SYS_RESOURCE on hybrid cgroups) and no default ulimits. Not root, or without podman, runc and
# debootstrap on a system without apt: exits 77 with one line saying why (tests/test_container.py skips with it).
set -euo pipefail
BASE="${LSGPT_BASE_IMAGE:-localhost/lsgpt-debian:bookworm}"
SUITE="${DEBIAN_SUITE:-bookworm}"
MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"

root_on_debian() { [ "$(id -u)" = 0 ] && [ -f /etc/debian_version ] && command -v apt-get >/dev/null; }
if [ "$(id -u)" != 0 ]; then
    echo "podman-base: needs root (rootful podman; debootstrap makes the base image)" >&2
    exit 77
fi

missing=""
for tool in podman runc debootstrap; do command -v "$tool" >/dev/null || missing="$missing $tool"; done
if [ -n "$missing" ]; then
    if ! root_on_debian; then
        echo "podman-base: needs${missing} (installed automatically only as root on Debian)" >&2
        exit 77
    fi
    echo "[podman-base] apt-get install podman runc debootstrap" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -q podman runc debootstrap >/dev/null 2>&1 \
        || { apt-get update -q >/dev/null && apt-get install -y -q podman runc debootstrap >/dev/null; }
fi
if [ ! -f /etc/containers/containers.conf ]; then
    mkdir -p /etc/containers
    printf '%s\n' '# written by lsgpt scripts/podman-base.sh' '[containers]' 'default_ulimits = []' '' \
        '[engine]' 'runtime = "runc"' > /etc/containers/containers.conf
fi

if ! podman image exists "$BASE"; then
    ROOTFS="$(mktemp -d /var/tmp/lsgpt-rootfs.XXXXXX)"
    trap 'rm -rf "$ROOTFS"' EXIT
    echo "[podman-base] debootstrap --variant=minbase $SUITE (from $MIRROR)" >&2
    debootstrap --variant=minbase "$SUITE" "$ROOTFS" "$MIRROR" >/dev/null
    rm -rf "$ROOTFS"/var/cache/apt/archives/*.deb "$ROOTFS"/var/lib/apt/lists/*
    tar -C "$ROOTFS" -c . | podman import --quiet - "$BASE" >/dev/null
fi
echo "$BASE"
