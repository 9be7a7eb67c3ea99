#!/usr/bin/env bash
# Builds the test guest into the directory given as $1: `vmlinuz` (Debian's
# cloud kernel, 6.12 from bookworm-backports when the mirror has it, else
# bookworm's 6.1) and `initramfs.gz` (busybox-static, the virtio_balloon
# module, /init from guest/init.sh and, when $2 names one, the static
# guest-agent binary). Called by `cargo xtask guest`, which keys the cache on
# a hash of this file, guest/init.sh and the agent binary.
set -euo pipefail

out=${1:?usage: build-guest.sh OUTDIR [GUEST_AGENT_BINARY]}
agent=${2:-}
here=$(cd "$(dirname "$0")" && pwd)
work="$out.work"
rm -rf "$work"
mkdir -p "$work/debs" "$work/root"

step() { printf '[guest] %s\n' "$*"; }

backports=/etc/apt/sources.list.d/balloon-backports.sources
if [ ! -f "$backports" ]; then
  added=$(bash "$here/apt-source.sh" "$backports" deb bookworm-backports)
  step "added $added (for the 6.12 kernel)"
  apt-get update -qq
fi
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
  busybox-static cpio xz-utils >/dev/null

# Newest 6.12 cloud kernel first; bookworm's 6.1 when backports lacks one.
kernel_pkg=""
for pattern in '^linux-image-6\.12\.[0-9.+~a-z-]*-cloud-amd64$' '^linux-image-6\.1\.[0-9.+~a-z-]*-cloud-amd64$'; do
  for candidate in $(apt-cache search --names-only "$pattern" | awk '{ print $1 }' | grep -v unsigned | sort -rV); do
    if (cd "$work/debs" && apt-get download -qq "$candidate" >/dev/null 2>&1); then
      kernel_pkg=$candidate
      break 2
    fi
  done
done
if [ -z "$kernel_pkg" ]; then
  echo "build-guest: no linux-image-*-cloud-amd64 package could be downloaded" >&2
  exit 1
fi
step "kernel package: $kernel_pkg"
dpkg-deb -x "$work"/debs/*.deb "$work/kernel"
kver=${kernel_pkg#linux-image-}
cp "$work/kernel/boot/vmlinuz-$kver" "$out.vmlinuz.tmp"

root="$work/root"
mkdir -p "$root"/{bin,sbin,dev,proc,sys,tmp,run,lib/modules,mnt}
cp /bin/busybox "$root/bin/busybox"
for applet in $("$root/bin/busybox" --list); do
  [ -e "$root/bin/$applet" ] || ln -s busybox "$root/bin/$applet"
done
# Modules the balloon needs that this kernel did not build in, in load order.
moddir="$work/kernel/lib/modules/$kver/kernel/drivers"
for mod in virtio/virtio_ring virtio/virtio virtio/virtio_pci_legacy_dev \
           virtio/virtio_pci_modern_dev virtio/virtio_pci virtio/virtio_balloon \
           char/virtio_console block/virtio_blk; do
  name=$(basename "$mod")
  if [ -f "$moddir/$mod.ko.xz" ]; then
    xz -dc "$moddir/$mod.ko.xz" > "$root/lib/modules/$name.ko"
  elif [ -f "$moddir/$mod.ko" ]; then
    cp "$moddir/$mod.ko" "$root/lib/modules/$name.ko"
  fi
done
[ -f "$root/lib/modules/virtio_balloon.ko" ] || { echo "build-guest: virtio_balloon module missing in $kernel_pkg" >&2; exit 1; }
ls "$root/lib/modules" | sed 's/^/[guest]   module /'
cp "$here/../guest/init.sh" "$root/init"
chmod +x "$root/init"
if [ -n "$agent" ]; then
  cp "$agent" "$root/bin/guest-agent"
fi
(cd "$root" && find . | cpio -o -H newc --quiet | gzip -1) > "$out.initramfs.tmp"

mkdir -p "$out"
mv "$out.vmlinuz.tmp" "$out/vmlinuz"
mv "$out.initramfs.tmp" "$out/initramfs.gz"
echo "$kernel_pkg" > "$out/kernel-package"
rm -rf "$work"
step "done: $out"
