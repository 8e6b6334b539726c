#!/usr/bin/env bash
# Build the systemd-capable Debian image Molecule's docker driver runs the roles in.
#
# Why not `docker pull`: no image registry is reachable from these machines, so the
# image is built from Debian's archive with mmdebstrap and loaded with `docker import`.
# The tag is keyed by this script's content, so an edit here produces a new image and
# an unchanged script reuses the one already loaded (a rebuild takes ~1 minute).
#
# Usage: scripts/build-molecule-image.sh [SUITE]   (default: trixie)
# Env:   MOLECULE_IMAGE   image name (default boma/molecule-debian13)
#        DEBIAN_MIRROR    archive to build from (default http://deb.debian.org/debian)
set -euo pipefail

suite="${1:-trixie}"
image="${MOLECULE_IMAGE:-boma/molecule-debian13}"
mirror="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"

# Packages a role test needs before Ansible runs: systemd as PID 1, Python for the
# modules, sudo/become, and the apt tooling package_facts uses.
packages="systemd,systemd-sysv,dbus,python3,python3-apt,sudo,ca-certificates,iproute2,procps,gnupg"

if ! command -v mmdebstrap >/dev/null; then
  [ "$(id -u)" -eq 0 ] || { echo "build-molecule-image: mmdebstrap is missing — run: sudo apt-get install mmdebstrap" >&2; exit 3; }
  echo "build-molecule-image: installing Debian's mmdebstrap (it builds the image)" >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends mmdebstrap >/dev/null \
    || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends mmdebstrap >/dev/null; }
fi
docker info >/dev/null 2>&1 || { echo "build-molecule-image: no Docker engine answers — run: make docker-engine" >&2; exit 3; }

key=$(sha256sum <"$0" | cut -c1-12)
tag="${image}:${suite}-${key}"
if docker image inspect "$tag" >/dev/null 2>&1; then
  docker tag "$tag" "${image}:latest"
  echo "molecule image ${tag} already built"
  exit 0
fi

workdir=$(mktemp -d)
trap 'rm -rf "$workdir"' EXIT
echo "building ${tag} from ${mirror} (${suite})" >&2
# --customize-hook: systemd in a container must not try to remount or rename the
# network; an empty machine-id lets systemd generate one per container.
# --skip=cleanup/apt/lists: keep the package lists, so a role's apt task with
# cache_valid_time finds packages without an update (an empty lists dir with a fresh
# mtime would make apt skip the update and find nothing).
# The hooks are single-quoted on purpose: mmdebstrap runs them with "$1" = the rootfs.
# shellcheck disable=SC2016
mmdebstrap --variant=minbase --include="$packages" --skip=cleanup/apt/lists \
  --customize-hook='rm -f "$1"/etc/machine-id; touch "$1"/etc/machine-id' \
  --customize-hook='chroot "$1" systemctl mask systemd-remount-fs.service getty@tty1.service console-getty.service' \
  "$suite" "$workdir/rootfs.tar" "$mirror" >&2
docker import -c 'CMD ["/lib/systemd/systemd"]' -c 'ENV container=docker' \
  "$workdir/rootfs.tar" "$tag" >/dev/null
docker tag "$tag" "${image}:latest"
echo "built ${tag}"
