#!/usr/bin/env bash
# One-command set-up on a fresh Debian 12 machine (run as root). Idempotent:
# installs only what is missing, then runs every scripts/setup.d/*.sh step.
set -euo pipefail
cd "$(dirname "$0")/.."

PACKAGES=(
  # engines
  crun runc runsc catatonit
  # images
  busybox-static umoci skopeo debootstrap
  # the standard seccomp profile Docker and Podman apply
  golang-github-containers-common
  # host tools tierbox drives
  util-linux iproute2 e2fsprogs procps
  # Python
  python3 python3-venv python3-dev
  # tests compile small static attack programs
  gcc libc6-dev
)
# setup.d steps list their own Debian packages in scripts/setup.d/*.packages
for f in scripts/setup.d/*.packages; do
  [ -e "$f" ] || continue
  while read -r pkg _; do
    case "$pkg" in ''|'#'*) ;; *) PACKAGES+=("$pkg") ;; esac
  done < "$f"
done

missing=()
for pkg in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing Debian packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating the virtualenv .venv"
  "$PYTHON" -m venv .venv
fi
PY=.venv/bin/python
if ! "$PY" -c 'import tierbox, typer, rich, pytest' 2>/dev/null || [ pyproject.toml -nt .venv/.installed ]; then
  echo "setup: installing tierbox and its Python dependencies"
  "$PY" -m pip install -q --upgrade pip >/dev/null
  "$PY" -m pip install -q -e '.[dev]'
  touch .venv/.installed
fi

export PY
for step in scripts/setup.d/*.sh; do
  [ -e "$step" ] || continue
  echo "setup: $(basename "$step")"
  bash "$step"
done
echo "setup: done"
