#!/usr/bin/env bash
# The prepared GPU check on an OFFLINE GPU node that has its own Python 3.12 and torch:
#
#     bash benchmarks/gpu_run.sh [--install-only] [gpu_check.py arguments]
#
# (from the repository root, with .gpu-bundle/ from `make gpu-bundle` beside it). Installs the
# bundle without network into .gpu-venv/, a venv that sees the node's own packages after its own
# and holds only what the node lacks (or has too old for the bundle: typing-extensions,
# packaging): torch and every package of the node stay as they are, untouched on disk. datasets
# only where the node's packages meet its requirements (else a warning). The repository is
# importable there through a .pth file. Prints the versions, then runs
# benchmarks/gpu_check.py with that interpreter and exits with its status (--install-only: stops
# after the versions).
#
# Environment: PYTHON, the node's interpreter (default python3); GPU_VENV, the venv (default
# .gpu-venv in the repository root; remade whenever the bundle, the interpreter or the path change).
set -euo pipefail

die() { echo "gpu_run.sh: error: $*" >&2; exit 2; }

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO"
BUNDLE="$REPO/.gpu-bundle"
VENV="${GPU_VENV:-$REPO/.gpu-venv}"
NODE_PYTHON="${PYTHON:-python3}"

[ -f "$BUNDLE/SHA256SUMS" ] || \
    die ".gpu-bundle/ is missing: run make gpu-bundle on a machine with the registry first"
(cd "$BUNDLE" && sha256sum --quiet --strict -c SHA256SUMS >/dev/null 2>&1) || \
    die ".gpu-bundle/ does not match its SHA256SUMS: run make gpu-bundle again and copy it whole"
command -v "$NODE_PYTHON" >/dev/null 2>&1 || die "no Python interpreter '$NODE_PYTHON' (set PYTHON=)"

# The node's interpreter: CPython 3.12 (the bundle's wheels are cp312), torch importable, and
# the site directories it imports from (its venv's, or the system's), in its own order.
NODE_INFO=$("$NODE_PYTHON" - <<'EOF'
import os, platform, sys
if sys.implementation.name != "cpython" or sys.version_info[:2] != (3, 12):
    sys.exit(f"the bundle is for CPython 3.12; {sys.executable} is "
             f"{sys.implementation.name} {platform.python_version()}")
try:
    import torch  # noqa: F401
except Exception as error:
    sys.exit(f"{sys.executable} cannot import torch ({type(error).__name__}: {error})")
print(os.path.abspath(sys.executable))
print(platform.python_version())
for entry in sys.path:
    if entry and os.path.basename(entry.rstrip("/")) in ("site-packages", "dist-packages") \
            and os.path.isdir(entry):
        print(os.path.realpath(entry))
EOF
) || die "$NODE_PYTHON is not the node's CPython 3.12 with torch (above)"
NODE_EXE=$(printf '%s\n' "$NODE_INFO" | sed -n 1p)
NODE_SITES=$(printf '%s\n' "$NODE_INFO" | sed -n '3,$p')
[ -n "$NODE_SITES" ] || die "$NODE_EXE has no site-packages directory on its sys.path"

STAMP=$( { cat "$BUNDLE/SHA256SUMS"; printf '%s\n' "$NODE_INFO" "$VENV"; } | sha256sum | cut -c1-64)
if [ "$(cat "$VENV/.gpu-bundle-stamp" 2>/dev/null)" != "$STAMP" ] || \
        ! "$VENV/bin/python" -c "" 2>/dev/null; then
    echo "# installing .gpu-bundle/ into $VENV (offline) for $NODE_EXE" >&2
    rm -rf "$VENV"
    "$NODE_PYTHON" -m venv --without-pip "$VENV" || die "cannot make a venv with $NODE_EXE"
    SITE=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
    # The node's site directories after the venv's own (their .pth files processed too).
    while IFS= read -r dir; do
        printf 'import site; site.addsitedir(%s)\n' \
            "$("$VENV/bin/python" -c 'import sys; print(repr(sys.argv[1]))' "$dir")"
    done <<<"$NODE_SITES" > "$SITE/_gpu_node_site.pth"
    PIP_WHL=$(ls "$BUNDLE"/pip-*-py3-none-any.whl 2>/dev/null | head -n 1)
    [ -n "$PIP_WHL" ] || die ".gpu-bundle/ has no pip wheel: run make gpu-bundle again"
    pins=()
    for name in megatron_core deepspeed; do
        wheel=$(ls "$BUNDLE/$name"-*.whl 2>/dev/null | head -n 1)
        [ -n "$wheel" ] || die ".gpu-bundle/ has no $name wheel: run make gpu-bundle again"
        version=$(basename "$wheel" | cut -d- -f2)
        pins+=("${name//_/-}==$version")
    done
    # Offline: only the bundle; what the node has and satisfies stays the node's.
    export PIP_NO_INDEX=1 PIP_CONFIG_FILE=/dev/null PIP_DISABLE_PIP_VERSION_CHECK=1 \
        PIP_NO_INPUT=1 PIP_NO_CACHE_DIR=1
    unset PIP_FIND_LINKS PIP_INDEX_URL PIP_EXTRA_INDEX_URL PIP_CONSTRAINT PIP_REQUIRE_VIRTUALENV
    # pip runs from its wheel (whatever pip the node has or lacks), into the venv only.
    "$VENV/bin/python" "$PIP_WHL/pip" install --quiet --no-index --find-links "$BUNDLE" "${pins[@]}" || \
        die "the offline install of ${pins[*]} failed (above): the node lacks a requirement the bundle does not carry"
    # datasets (read .jsonl corpora; the dataset fixture of tests/test_gpu.py): where it fits.
    wheel=$(ls "$BUNDLE"/datasets-*.whl 2>/dev/null | head -n 1)
    if [ -n "$wheel" ] && ! "$VENV/bin/python" "$PIP_WHL/pip" install --quiet --no-index \
            --find-links "$BUNDLE" "datasets==$(basename "$wheel" | cut -d- -f2)"; then
        echo "gpu_run.sh: warning: datasets does not fit the node's packages (above): not" \
             "installed; the tests that use the dataset fixture will fail" >&2
    fi
    echo "$STAMP" > "$VENV/.gpu-bundle-stamp"
fi
SITE=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
printf '%s\n' "$REPO" > "$SITE/_megatron_hypermoe_repo.pth"

# The venv's scripts (deepspeed), then the node's (torchrun, ninja) on PATH.
export PATH="$VENV/bin:$(dirname "$NODE_EXE"):$PATH"

"$VENV/bin/python" - <<'EOF' || die "the bundle's packages do not import (above)"
import os, platform, sysconfig
from importlib import metadata

import torch
import megatron.core  # noqa: F401
import deepspeed  # noqa: F401
import transformers  # noqa: F401
import megatron_hypermoe  # noqa: F401

venv_site = sysconfig.get_paths()["purelib"]
from_bundle = sorted(d.metadata["Name"] for d in metadata.distributions(path=[venv_site])
                     if d.metadata["Name"] != "pip")
print(f"python {platform.python_version()}, torch {torch.__version__} (CUDA {torch.version.cuda}, "
      f"GPU available: {torch.cuda.is_available()}), megatron-core {metadata.version('megatron-core')}, "
      f"deepspeed {metadata.version('deepspeed')}, transformers {metadata.version('transformers')}")
print(f"from .gpu-bundle: {', '.join(from_bundle)}; megatron_hypermoe from "
      f"{os.path.dirname(os.path.dirname(megatron_hypermoe.__file__))}")
EOF

if [ "${1:-}" = "--install-only" ]; then
    exit 0
fi
exec "$VENV/bin/python" benchmarks/gpu_check.py "$@"
