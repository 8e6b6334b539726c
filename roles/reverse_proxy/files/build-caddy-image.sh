#!/usr/bin/env bash
# Build a minimal Caddy container image from Debian's `caddy` package, with no registry.
#
# Shipped by the reverse_proxy role (reverse_proxy__image_source: debian) and run on the
# target host. Why: no image registry is reachable from the test machines, but Debian's
# archive is. The image holds /usr/bin/caddy, the shared libraries `ldd` reports, the CA
# bundle, /etc/passwd+group, /data and /config, and runs
# `caddy run --config /etc/caddy/Caddyfile --adapter caddyfile` like the upstream image.
# Like the upstream (Alpine) image it has a shell and the usual tools, from Debian's
# busybox-static, so `docker exec caddy cat ...` / `sh` work for checks and debugging.
# Debian's caddy has NO DNS provider modules (no gandi): images built here are for
# `tls internal` (tests) and HTTP-01, never for DNS-01 production certificates.
#
# Usage: build-caddy-image.sh IMAGE:TAG [CADDY_VERSION]
#   IMAGE:TAG      reference to create (the role keys the tag by the caddy version)
#   CADDY_VERSION  exact Debian version to download (default: apt's candidate)
# Env:   TMPDIR   work dir parent (default /var/tmp; must allow exec, ldd runs the loader)
# Exit:  0 built or already present ("already built" on stdout), 2 usage, 3 missing tool,
#        4 download/assembly failed.
set -euo pipefail

die() { echo "build-caddy-image: $2" >&2; exit "$1"; }

{ [ $# -ge 1 ] && [ $# -le 2 ]; } || die 2 "usage: build-caddy-image.sh IMAGE:TAG [CADDY_VERSION]"
ref="$1"
version="${2:-}"

for tool in apt-get dpkg-deb ldd docker tar; do
  command -v "$tool" >/dev/null || die 3 "$tool missing on this host"
done
ca_bundle=/etc/ssl/certs/ca-certificates.crt
[ -s "$ca_bundle" ] || die 3 "$ca_bundle missing (apt-get install ca-certificates)"
docker info >/dev/null 2>&1 || die 3 "no Docker engine answers"

if docker image inspect "$ref" >/dev/null 2>&1; then
  echo "already built $ref"
  exit 0
fi

work=$(mktemp -d -p "${TMPDIR:-/var/tmp}" build-caddy-image.XXXXXX)
trap 'rm -rf "$work"' EXIT
cd "$work"

# apt-get download keeps the host's package state untouched (no install, no service).
# APT::Sandbox::User=root: the temp dir is root-only, _apt could not write into it.
apt-get -q -o APT::Sandbox::User=root download "caddy${version:+=$version}" busybox-static >&2 \
  || die 4 "apt-get download caddy${version:+=$version} busybox-static failed"
deb=$(ls caddy_*.deb)
got=$(dpkg-deb -f "$deb" Version)
[ -z "$version" ] || [ "$got" = "$version" ] || die 4 "downloaded caddy $got, wanted $version"
dpkg-deb -x "$deb" pkg
dpkg-deb -x busybox-static_*.deb bb
busybox=""
for candidate in bb/bin/busybox bb/usr/bin/busybox; do
  [ -x "$candidate" ] && { busybox=$candidate; break; }
done
[ -n "$busybox" ] || die 4 "no bin/busybox in busybox-static"

root="$work/rootfs"
mkdir -p "$root"/{bin,usr/bin,etc/caddy,etc/ssl/certs,data,config,srv,root,tmp}
chmod 1777 "$root/tmp"
install -m 0755 pkg/usr/bin/caddy "$root/usr/bin/caddy"
# busybox is static: one file, plus a symlink per applet it lists (sh, cat, ls, wget...).
install -m 0755 "$busybox" "$root/bin/busybox"
{ applets=$("$root/bin/busybox" --list) && [ -n "$applets" ]; } || die 4 "busybox --list failed"
for applet in $applets; do
  [ -e "$root/bin/$applet" ] || ln -s busybox "$root/bin/$applet"
done
install -m 0644 "$ca_bundle" "$root/etc/ssl/certs/ca-certificates.crt"
# The stock config Debian ships, so `docker run IMAGE` without a mount still starts.
install -m 0644 pkg/etc/caddy/Caddyfile "$root/etc/caddy/Caddyfile"
[ ! -f /etc/mime.types ] || install -m 0644 /etc/mime.types "$root/etc/mime.types"

# Every library the dynamic linker resolves, plus the linker itself, at the same path
# (Debian builds caddy with cgo: libc, libzstd). ldd runs the loader on the binary, so
# the work dir must not be on a noexec mount (Docker's --tmpfs /tmp is): /var/tmp.
ldd_out=$(ldd pkg/usr/bin/caddy 2>&1) || die 4 "ldd failed on caddy (noexec work dir $work?): $ldd_out"
libs=$(awk '/=> \//{print $3} /^\t\//{print $1}' <<<"$ldd_out")
[ -n "$libs" ] || die 4 "ldd listed no library paths for caddy: $ldd_out"
for lib in $libs; do
  mkdir -p "$root$(dirname "$lib")"
  cp -L "$lib" "$root$lib"
done

cat >"$root/etc/passwd" <<'PASSWD'
root:x:0:0:root:/root:/usr/sbin/nologin
nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin
PASSWD
cat >"$root/etc/group" <<'GROUP'
root:x:0:
nogroup:x:65534:
GROUP
printf 'hosts: files dns\n' >"$root/etc/nsswitch.conf"

# Numeric root ownership: the files belong to the image, not to this host's users.
tar --numeric-owner --owner=0 --group=0 -C "$root" -cf rootfs.tar .
docker import \
  -c 'CMD ["caddy", "run", "--config", "/etc/caddy/Caddyfile", "--adapter", "caddyfile"]' \
  -c 'ENV PATH=/usr/bin:/bin XDG_DATA_HOME=/data XDG_CONFIG_HOME=/config HOME=/root' \
  -c 'WORKDIR /srv' \
  -c 'EXPOSE 80 443 443/udp 2019' \
  -c "LABEL org.opencontainers.image.title=boma-caddy-debian org.opencontainers.image.version=$got" \
  -m "caddy $got from Debian's archive (build-caddy-image.sh)" \
  rootfs.tar "$ref" >/dev/null || die 4 "docker import failed"
echo "built $ref (caddy $got)"
