#!/usr/bin/env bash
# Build a Python base image without a container registry: debootstrap a minimal Debian
# bookworm (its python3 is 3.11, like python:3.11-slim) and import it into the local docker.
#
#   docker/build-local-base.sh [IMAGE]            # default IMAGE: fedlab-base:bookworm
#   docker build --build-arg BASE=fedlab-base:bookworm ...
#
# Needs root, debootstrap and a reachable Debian mirror (MIRROR, default deb.debian.org).
# Does nothing when IMAGE already exists (FORCE=1 rebuilds it).
set -euo pipefail

IMAGE="${1:-fedlab-base:bookworm}"
MIRROR="${MIRROR:-http://deb.debian.org/debian}"

if [[ "${FORCE:-0}" != 1 ]] && docker image inspect "$IMAGE" >/dev/null 2>&1; then
    echo "base image $IMAGE already present"
    exit 0
fi
command -v debootstrap >/dev/null || {
    echo "debootstrap is missing: apt-get install -y debootstrap" >&2
    exit 1
}

root="$(mktemp -d /tmp/fedlab-base.XXXXXX)"
trap 'rm -rf "$root"' EXIT
# mktemp makes the folder 0700, and it becomes the image's "/": non-root users could not
# reach anything.
chmod 755 "$root"
# python3-venv brings ensurepip, so the image can make the virtual environment the
# Dockerfile installs into; ca-certificates lets users of the image reach their own index.
debootstrap --variant=minbase --include=python3,python3-venv,python3-pip,ca-certificates \
    bookworm "$root" "$MIRROR"
# Keep the image small: package lists and caches are not needed at run time.
rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin "$root"/var/cache/apt/archives/*.deb
tar -C "$root" -c . | docker import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' \
    --change 'CMD ["python3"]' \
    - "$IMAGE"
echo "built base image $IMAGE"
