#!/usr/bin/env bash
# Image store: make sure umoci/skopeo/debootstrap/busybox-static are present, then
# build the built-in busybox:latest image (seconds, no network) and warm its rootfs
# cache. Idempotent: a second run only checks. $PY is the virtualenv's python.
set -euo pipefail

PY=${PY:-python3}

missing=()
for pkg in umoci skopeo debootstrap busybox-static; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "ok installed" || missing+=("$pkg")
done
if ((${#missing[@]})); then
    echo "20-images: installing ${missing[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${missing[@]}"
fi

"$PY" -m tierbox.images.builtin
