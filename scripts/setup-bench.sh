#!/usr/bin/env bash
# Extra set-up for `make bench`: podman, as the comparison point for the
# container tier, with the built-in busybox image copied into its storage.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v podman >/dev/null; then
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends podman >/dev/null
fi
store=${TIERBOX_HOME:-$HOME/.local/share/tierbox}/images/oci
if ! podman image exists busybox; then
  skopeo copy --quiet --insecure-policy "oci:$store:busybox:latest" \
    containers-storage:docker.io/library/busybox:latest
fi
