#!/usr/bin/env bash
# Put the wheels the image installs into docker/wheels/: fedlab's own wheel in
# docker/wheels/fedlab/ and all its dependencies in docker/wheels/deps/ (the default), or
# fedlab's wheel only (--fedlab-only, for images whose pip reaches a package index or whose
# base already has torch). Two folders, so that the image rebuilds only its last layer when
# only fedlab changed.
#
#   docker/build-wheels.sh [--fedlab-only] [--python PYTHON]
#
# PYTHON (default: python3) must match the image's Python version and platform, since
# compiled wheels (torch, numpy, grpcio...) are picked for it: python:3.11-slim and the
# Debian bookworm base of docker/build-local-base.sh are CPython 3.11 on Linux.
# The image gets the torch build that PYTHON has installed, if it has one (so a CPU-only torch
# stays CPU-only instead of pulling the CUDA libraries in); without one, pip's choice.
# Extra arguments after "--" go to `pip wheel` (e.g. an index URL that serves CPU-only torch).
set -euo pipefail

repo="$(cd "$(dirname "$0")/.." && pwd)"
python=python3
deps=1
pip_args=()
while [[ $# -gt 0 ]]; do
    case "$1" in
        --fedlab-only) deps=0 ;;
        --python) python="$2"; shift ;;
        --) shift; pip_args=("$@"); break ;;
        *) echo "unknown argument: $1" >&2; exit 2 ;;
    esac
    shift
done

out="$repo/docker/wheels"
rm -rf "$out"
mkdir -p "$out"
if [[ $deps == 1 ]]; then
    torch="$("$python" -c 'import torch; print(torch.__version__)' 2>/dev/null || true)"
    if [[ -n $torch ]]; then
        echo "torch==$torch" > "$out/.constraints.txt"
        pip_args+=(--constraint "$out/.constraints.txt")
    fi
    "$python" -m pip wheel --quiet --wheel-dir "$out/deps" "${pip_args[@]}" "$repo"
    rm -f "$out/.constraints.txt"
else
    "$python" -m pip wheel --quiet --no-deps --wheel-dir "$out/deps" "${pip_args[@]}" "$repo"
fi
mkdir -p "$out/fedlab"
mv "$out"/deps/fedlab-*.whl "$out/fedlab/"
# pip leaves its build tree behind when building from a source folder; the repository must
# stay clean.
rm -rf "$repo/build"
echo "wheels in $out: $(ls "$out/fedlab") and $(ls "$out/deps" | wc -l) dependencies"
