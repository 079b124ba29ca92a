#!/usr/bin/env bash
# Create .venv in the project root and install lastkd into it.
#
# Idempotent: a second run reuses the venv and, when pyproject.toml, the extras and the pinned
# torch are unchanged since the last successful install (stamp in .venv/.lastkd-setup), installs
# nothing. torch is installed first, pinned, so that pip never pulls a different build later.
# LASTKD_EXTRAS=bench adds extras beyond dev (comma separated); PYTHON picks the interpreter.
set -euo pipefail
cd "$(dirname "$0")/.."

TORCH_VERSION=2.14.1
TORCHVISION_VERSION=0.29.1
EXTRAS="dev${LASTKD_EXTRAS:+,$LASTKD_EXTRAS}"
STAMP=.venv/.lastkd-setup

pick_python() {
    for candidate in "${PYTHON:-}" python3 python3.12 python3.11; do
        [ -n "$candidate" ] || continue
        if command -v "$candidate" >/dev/null 2>&1 &&
            "$candidate" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' 2>/dev/null; then
            echo "$candidate"
            return 0
        fi
    done
    echo "setup: Python >= 3.11 not found (set PYTHON=/path/to/python3.11)" >&2
    return 1
}

if [ ! -x .venv/bin/python ]; then
    "$(pick_python)" -m venv .venv
    .venv/bin/python -m pip install -q --upgrade pip
fi

# What the last successful install was made from; equal means there is nothing to do.
wanted_stamp="$(
    {
        sha256sum pyproject.toml
        echo "extras=$EXTRAS torch=$TORCH_VERSION torchvision=$TORCHVISION_VERSION"
        .venv/bin/python -c 'import sys; print(sys.version)'
    } | sha256sum | cut -d' ' -f1
)"
# The editable install must point at this checkout (a venv copied from elsewhere does not).
installed_here() {
    local root="$PWD"
    [ -x .venv/bin/lastkd ] &&
        [ "$(cd / && "$root/.venv/bin/python" -c 'import lastkd.services as s; print(s.__path__[0])' 2>/dev/null)" = "$root/services" ]
}
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$wanted_stamp" ] && installed_here; then
    echo "setup: .venv up to date (nothing to install)"
    exit 0
fi
rm -f "$STAMP"

if ! .venv/bin/python - <<PY 2>/dev/null
import torch, torchvision
assert torch.__version__.split("+")[0] == "$TORCH_VERSION", torch.__version__
assert torchvision.__version__.split("+")[0] == "$TORCHVISION_VERSION", torchvision.__version__
PY
then
    .venv/bin/python -m pip install -q "torch==$TORCH_VERSION" "torchvision==$TORCHVISION_VERSION"
fi

.venv/bin/python -m pip install -q -e ".[$EXTRAS]"
installed_here || { echo "setup: the install of lastkd into .venv did not take" >&2; exit 1; }
echo "$wanted_stamp" > "$STAMP"
echo "setup: .venv ready ($(.venv/bin/python -c 'import torch; print("torch", torch.__version__)'))"
