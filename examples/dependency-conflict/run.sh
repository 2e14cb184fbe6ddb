#!/usr/bin/env bash
# "It works on my machine", solved: two apps that need two incompatible versions
# of one library (packaging 21.3 and 24.2), which cannot be installed side by
# side on one host, each built into its own image with tierbox and run side by
# side on the container tier and in microVMs.
#
#   bash run.sh                 the whole demonstration
#   bash run.sh prepare DIR     only copy the two build contexts into DIR and
#                               fetch their wheels (the build benchmark uses this)
#
# Environment: PYTHON (the python with tierbox and pip; default: the repository's
# .venv), TIERS (default "container microvm"), WORK (a work directory; default
# a fresh temporary one). Wheels come from PyPI through pip on the host; the
# image builds themselves are offline.
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
PYTHON=${PYTHON:-$REPO/.venv/bin/python}
TIERS=${TIERS:-container microvm}
PIP_VERSION=24.2
APPS=(legacy-app modern-app)

prepare() {
    local dir=$1
    mkdir -p "$dir/wheels"
    for app in "${APPS[@]}"; do
        rm -rf "${dir:?}/$app"
        cp -r "$HERE/$app" "$dir/$app"
        "$PYTHON" -m pip download --quiet --only-binary=:all: --dest "$dir/$app/wheels" \
            -r "$HERE/$app/requirements.txt" "pip==$PIP_VERSION"
        cp "$dir/$app/wheels/"*.whl "$dir/wheels/"
    done
}

if [ "${1:-}" = prepare ]; then
    prepare "${2:?usage: run.sh prepare DIR}"
    exit 0
fi

WORK=${WORK:-$(mktemp -d)}
tierbox() { "$PYTHON" -m tierbox.cli "$@"; }

echo "== fetching the wheels of both apps (pip download, on the host)"
prepare "$WORK"

echo "== one host, both apps: pip cannot install their requirements together"
if "$PYTHON" -m pip install --dry-run --quiet --no-index --find-links "$WORK/wheels" \
        --target "$WORK/one-host" -r "$HERE/legacy-app/requirements.txt" \
        -r "$HERE/modern-app/requirements.txt" 2> "$WORK/conflict.txt"; then
    echo "unexpected: pip found one set of packages for both apps" >&2
    exit 1
fi
grep -m1 -i "conflict\|cannot install" "$WORK/conflict.txt" || true
echo "packaging==21.3 and packaging==24.2 cannot be installed side by side on one host"

echo "== building both images with tierbox (offline, cached layers)"
for app in "${APPS[@]}"; do
    tierbox image build --lint --fail-on high -t "depconflict/$app:1" "$WORK/$app" \
        > /dev/null 2> "$WORK/build-$app.log" || { cat "$WORK/build-$app.log" >&2; exit 1; }
    grep -E "resolves to|RUN steps use" "$WORK/build-$app.log" | sort -u
    echo "built depconflict/$app:1"
done

for tier in $TIERS; do
    echo "== $tier: both apps at the same time"
    pids=()
    for app in "${APPS[@]}"; do
        tierbox run --tier "$tier" --memory 256m "depconflict/$app:1" -- python3 /app/app.py \
            > "$WORK/$tier-$app.out" &
        pids+=($!)
    done
    for pid in "${pids[@]}"; do wait "$pid"; done
    for app in "${APPS[@]}"; do
        sed "s/^/[$tier] /" "$WORK/$tier-$app.out"
    done
done
