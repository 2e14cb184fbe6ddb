#!/usr/bin/env bash
# Image store (umoci, skopeo, debootstrap, busybox-static come from setup.sh):
# build the built-in busybox:latest image (seconds, no network) and warm its rootfs
# cache. Idempotent: a second run only checks. $PY is the virtualenv's python.
set -euo pipefail

PY=${PY:-python3}

# Debian packages: listed in scripts/setup.d/*.packages, installed by scripts/setup.sh.

"$PY" -m tierbox.images
