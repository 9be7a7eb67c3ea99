#!/usr/bin/env bash
# Builds qemu-system-x86_64 >= 10.2 from Debian's source package into the
# prefix given as $1. Called by `cargo xtask qemu`, which keys the cache on a
# hash of this file, so any change to the recipe rebuilds.
#
# Why from source: bookworm ships QEMU 7.2 and bookworm-backports 10.0, and
# neither can create a user-made generic vhost-user device; Debian unstable's
# source package (10.2+) can. The Debian patch series is applied because it
# removes the firmware-blob steps that the +ds tarball cannot satisfy.
set -euo pipefail

prefix=${1:?usage: build-qemu.sh PREFIX}
work="$prefix.work"
rm -rf "$work"
mkdir -p "$work"

step() { printf '[qemu] %s\n' "$*"; }
here=$(cd "$(dirname "$0")" && pwd)

# Two apt sources on the machine's own Debian mirror, both documented in
# docs/qemu.md: bookworm-backports stays (meson >= 1.5 and pycotap come from
# it; backports never upgrade installed packages on their own), the unstable
# deb-src entry is removed again as soon as the source is downloaded.
backports=/etc/apt/sources.list.d/balloon-backports.sources
src_list=/etc/apt/sources.list.d/balloon-qemu-src.sources
if [ ! -f "$backports" ]; then
  added=$(bash "$here/apt-source.sh" "$backports" deb bookworm-backports)
  step "added $added (meson, pycotap)"
fi
trap 'rm -f "$src_list"' EXIT
added=$(bash "$here/apt-source.sh" "$src_list" deb-src unstable)
step "added $added (removed after the download)"
apt-get update -qq

step "installing build dependencies (Debian packages only)"
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
  libglib2.0-dev ninja-build pkg-config flex bison libpixman-1-dev zlib1g-dev \
  libfdt-dev seabios qemu-system-data dpkg-dev xz-utils patch \
  python3 python3-venv >/dev/null
# QEMU 10.2 wants meson >= 1.5; bookworm has 1.0, bookworm-backports 1.7.
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
  -t bookworm-backports meson python3-pycotap >/dev/null
# Debian's python3 is the one that sees Debian's meson; another python3
# earlier on PATH (pyenv, a venv) would not.
debian_python=/usr/bin/python3

step "fetching the qemu source package"
cd "$work"
# The index can list versions the mirror no longer serves: try each one of
# 10.2 or newer, newest first, until one downloads.
fetched=""
for version in $(apt-cache showsrc qemu | awk '/^Version:/ { print $2 }' | sort -rV); do
  if dpkg --compare-versions "$version" lt 1:10.2; then continue; fi
  if apt-get source -d -qq "qemu=$version" >/dev/null 2>&1; then fetched=$version; break; fi
  step "qemu $version is listed but not served; trying an older one"
  rm -f qemu_*
done
if [ -z "$fetched" ]; then
  echo "build-qemu: no qemu >= 10.2 source package could be downloaded" >&2
  exit 1
fi
step "using qemu $fetched"
rm -f "$src_list"
dsc=$(ls qemu_*.dsc | head -n 1)
dpkg-source -x "$dsc" src >/dev/null
# Our own fixes on top of Debian's series (see each patch's header). A QEMU
# newer than the one a patch was written for must fail here, by name, not
# later in the compiler.
patches_dir="$here/../qemu-patches"
for patch_file in "$patches_dir"/*.patch; do
  step "applying $(basename "$patch_file")"
  if ! patch -d src -p1 --dry-run --quiet < "$patch_file" >"$work/patch.log" 2>&1; then
    echo "build-qemu: xtask/qemu-patches/$(basename "$patch_file") does not apply to qemu $fetched" >&2
    echo "build-qemu: it was written for the QEMU named in its header; update the patch for $fetched" >&2
    sed 's/^/build-qemu:   /' "$work/patch.log" >&2
    exit 1
  fi
  patch -d src -p1 --quiet < "$patch_file"
done

step "configuring"
mkdir -p src/build
cd src/build
../configure --python="$debian_python" --target-list=x86_64-softmmu --without-default-features \
  --enable-kvm --enable-tcg --enable-vhost-user --enable-vhost-kernel \
  --enable-pixman --disable-docs --disable-werror --disable-download \
  --disable-install-blobs >configure.log 2>&1 || { tail -n 40 configure.log >&2; exit 1; }

step "compiling qemu-system-x86_64 (about 4 minutes on 2 cores)"
ninja qemu-system-x86_64 | awk 'NR % 200 == 0 { print "[qemu]   " $0; fflush() }'

mkdir -p "$prefix/bin"
cp qemu-system-x86_64 "$prefix/bin/"
"$prefix/bin/qemu-system-x86_64" --version | head -n 1
cd /
rm -rf "$work"
step "done: $prefix/bin/qemu-system-x86_64"
