#!/usr/bin/env bash
# Makes a Debian base image with Debian's own Python, for building the images where no registry can be reached
# (the Dockerfiles' default bases come from Docker Hub). debootstrap writes a minimal Debian root from the Debian
# mirror apt already uses; the engine imports it as an image.
#
#   docker/base-image.sh [TAG]        (default localhost/debian-python:bookworm)
#   podman build -f Dockerfile.cpu --build-arg PYTHON_IMAGE=localhost/debian-python:bookworm ...
#
# Environment:
#   SUITE     Debian release (default bookworm)
#   MIRROR    Debian mirror (default: the one in this machine's apt sources, else http://deb.debian.org/debian)
#   PACKAGES  what to add to minbase (default: python3 python3-venv ca-certificates, i.e. what python:3.x-slim has)
#   ENGINE    podman or docker (default: podman when installed)
#   FORCE=1   make it again even when TAG exists
set -euo pipefail

TAG=${1:-localhost/debian-python:bookworm}
SUITE=${SUITE:-bookworm}
PACKAGES=${PACKAGES:-python3 python3-venv ca-certificates}
ENGINE=${ENGINE:-$(command -v podman >/dev/null 2>&1 && echo podman || echo docker)}

if [ "${FORCE:-0}" != 1 ] && "$ENGINE" image exists "$TAG" 2>/dev/null; then
  echo "base-image.sh: $TAG exists (FORCE=1 makes it again)"
  exit 0
fi

if [ -z "${MIRROR:-}" ]; then
  # deb822 (URIs: ...) or one-line (deb [opts] URI suite ...) sources; the first URI that ends in /debian
  MIRROR=$(cat /etc/apt/sources.list /etc/apt/sources.list.d/*.sources /etc/apt/sources.list.d/*.list 2>/dev/null \
    | grep -oE '(https?|file)://[^ ]+/debian/?( |$)' | head -n 1 | tr -d ' ' || true)
  MIRROR=${MIRROR:-http://deb.debian.org/debian}
fi

root=$(mktemp -d /var/tmp/base-image.XXXXXX)
trap 'rm -rf "$root"' EXIT
start=$(date +%s)
echo "base-image.sh: debootstrap $SUITE from $MIRROR with ${PACKAGES// /,}"
debootstrap --variant=minbase --include="${PACKAGES// /,}" "$SUITE" "$root" "$MIRROR" >"$root.log" 2>&1 \
  || { tail -n 30 "$root.log" >&2; exit 1; }
rm -f "$root.log"
# What slim images leave out: downloaded packages, package lists, docs.
rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/* "$root"/usr/share/doc/* "$root"/usr/share/man/*
tar -C "$root" --numeric-owner -c . | "$ENGINE" import --quiet \
  --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
  --change 'ENV LANG=C.UTF-8' \
  --change 'CMD ["/bin/bash"]' - "$TAG" >/dev/null
echo "base-image.sh: $TAG in $(( $(date +%s) - start )) s"
