#!/usr/bin/env bash
# End to end on this machine: build the image, make certificates with it, run a server and
# three clients with docker/compose.yaml to the end of a short run, check the result, clean up.
#
#   sudo docker/e2e.sh                 # exit status 0 when the federation finished
#
# Needs root (it installs docker.io, docker-compose and debootstrap with apt-get when they are
# missing and starts dockerd when no daemon answers: with overlay2 where this kernel can mount
# overlayfs here, else with vfs, which works anywhere but copies the whole 1.5 GB image for
# every build step and container, many times slower). Without a
# registry it builds the base image with docker/build-local-base.sh; set FEDLAB_BASE to use
# another base (python:3.11-slim where a registry is reachable). Environment:
#   PYTHON        Python that builds the wheels (default: python3; needs pip and fedlab's
#                 build requirements, and must match the image's Python version)
#   FEDLAB_BASE   base image (default: fedlab-base:bookworm, built here when missing)
#   E2E_ROUNDS    versions to run (default: 3)
#   E2E_TIMEOUT   seconds the run may take once the containers are up (default: 600)
#   DOCKER_STORAGE  storage driver for a dockerd started here (default: overlay2, else vfs)
#   E2E_KEEP=1    keep the work folder (certificates, run directory, logs) for inspection
#   E2E_SKIP_UNAVAILABLE=1  exit 0 with a SKIPPED line when docker itself cannot be installed
#                 or started here (CI uses it; a failing build or federation still fails)
set -euo pipefail

repo="$(cd "$(dirname "$0")/.." && pwd)"
python="${PYTHON:-python3}"
base="${FEDLAB_BASE:-fedlab-base:bookworm}"
rounds="${E2E_ROUNDS:-3}"
timeout_s="${E2E_TIMEOUT:-600}"
image="fedlab:e2e"
project="fedlab-e2e-$$"
work="$(mktemp -d /tmp/fedlab-e2e.XXXXXX)"
compose=(docker-compose --project-name "$project" --file "$repo/docker/compose.yaml")
step() { printf '\n== %s (%ss)\n' "$*" "$SECONDS"; }

cleanup() {
    local status=$?
    if [[ $status != 0 ]] && docker info >/dev/null 2>&1; then
        echo "== failed; container logs:"
        "${compose[@]}" logs --no-color --tail 60 2>/dev/null || true
    fi
    "${compose[@]}" down --volumes --remove-orphans --timeout 5 >/dev/null 2>&1 || true
    if [[ "${E2E_KEEP:-0}" == 1 ]]; then echo "kept $work"; else rm -rf "$work"; fi
    exit $status
}
trap cleanup EXIT

step "docker"
missing=()
command -v docker >/dev/null || missing+=(docker.io)
command -v dockerd >/dev/null || missing+=(docker.io)
command -v docker-compose >/dev/null || missing+=(docker-compose)
if [[ $base == fedlab-base:bookworm ]]; then command -v debootstrap >/dev/null || missing+=(debootstrap); fi
unavailable() {
    if [[ "${E2E_SKIP_UNAVAILABLE:-0}" == 1 ]]; then
        echo "SKIPPED docker end-to-end test: $*" >&2
        trap - EXIT
        rm -rf "$work"
        exit 0
    fi
    echo "docker unavailable: $*" >&2
    exit 1
}
if [[ ${#missing[@]} -gt 0 ]]; then
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null; } \
        || unavailable "could not install ${missing[*]} with apt-get"
fi
storage_driver() {
    local d
    d="$(mktemp -d)"
    mkdir -p "$d/l" "$d/u" "$d/w" "$d/m"
    if mount -t overlay overlay -o "lowerdir=$d/l,upperdir=$d/u,workdir=$d/w" "$d/m" 2>/dev/null
    then
        umount "$d/m"
        echo overlay2
    else
        echo vfs
    fi
    rm -rf "$d"
}
if ! docker info >/dev/null 2>&1; then
    driver="${DOCKER_STORAGE:-$(storage_driver)}"
    echo "starting dockerd --storage-driver=$driver"
    nohup dockerd --storage-driver="$driver" >/var/log/fedlab-e2e-dockerd.log 2>&1 &
    # dockerd takes seconds alone, minutes on a loaded machine: poll, bounded.
    for _ in $(seq 180); do docker info >/dev/null 2>&1 && break; sleep 1; done
    docker info >/dev/null 2>&1 || unavailable "dockerd did not start (see /var/log/fedlab-e2e-dockerd.log)"
fi

step "base image $base"
if [[ $base == fedlab-base:bookworm ]]; then "$repo/docker/build-local-base.sh" "$base"; fi

step "wheels"
"$repo/docker/build-wheels.sh" --python "$python" | tail -n 1

step "image $image"
docker build --quiet --tag "$image" --build-arg BASE="$base" "$repo/docker" 2>&1 \
    | grep -v -e DEPRECATED -e 'legacy builder' -e buildx -e '^ *$' || true
docker image inspect "$image" >/dev/null

step "certificates"
mkdir -p "$work/certs" "$work/runs"
# Made by the image itself, so the certificate tool inside it is exercised too.
docker run --rm --user 0:0 -v "$work/certs:/out" "$image" \
    certs --out /out --server-name server --clients 3
# The containers run as the image's unprivileged user, which must read its keys and write
# the run directory.
chown -R 10001:10001 "$work/certs" "$work/runs"

cat >"$work/run.toml" <<EOF
strategy = "fedavg"
workload = "synthetic"
clients = 3
fraction = 1.0
rounds = $rounds
local_steps = 5
seed = 7
EOF

step "docker-compose up: a server and three clients"
export FEDLAB_IMAGE="$image" FEDLAB_CERTS="$work/certs" FEDLAB_RUNS="$work/runs" \
    FEDLAB_CONFIG="$work/run.toml" FEDLAB_MIN_CLIENTS=3 FEDLAB_RUN=e2e FEDLAB_DEVICE=cpu
# Publish on a port the kernel picks, so a run never collides with anything on the host.
export FEDLAB_PORT=0
"${compose[@]}" up --detach --no-build
server="$("${compose[@]}" ps -q server)"
if ! code="$(timeout "$timeout_s" docker wait "$server")"; then
    echo "the server did not finish within ${timeout_s}s" >&2
    exit 1
fi
"${compose[@]}" logs --no-color server | tail -n 25
[[ $code == 0 ]] || { echo "server exited with $code" >&2; exit 1; }

step "clients"
for c in client-0 client-1 client-2; do
    id="$("${compose[@]}" ps -q "$c")"
    code="$(timeout 300 docker wait "$id")" || { echo "$c did not exit" >&2; exit 1; }
    echo "$c exited with $code"
    [[ $code == 0 ]] || exit 1
done

step "result"
summary="$work/runs/e2e/summary.json"
"$python" - "$summary" "$rounds" <<'EOF'
import json
import sys

summary = json.load(open(sys.argv[1]))
print(json.dumps(summary, indent=2))
assert summary["versions"] == int(sys.argv[2]), "the run stopped early"
assert summary["updates_received"] >= 3 * int(sys.argv[2]), "updates are missing"
EOF
step "passed"
