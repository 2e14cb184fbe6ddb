#!/usr/bin/env bash
# Static C helpers tierbox builds for itself (src/tierbox/host/helpers/*.c),
# compiled once into the cache; the process tier spawns through dropexec.
set -euo pipefail
PY=${PY:-python3}
"$PY" -m tierbox.host.helpers
