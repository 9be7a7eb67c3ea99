#!/usr/bin/env bash
# Builds the test guest into the directory given as $1: `vmlinuz` (a Debian
# cloud kernel) and `initramfs.gz` (busybox-static, the virtio modules the
# kernel did not build in, /init from guest/init.sh and the static programs
# named after $2, copied to /bin: guest-agent, guest-workload and
# guest-verifier). Called by `cargo xtask guest`, which keys the cache on a
# hash of this file, guest/init.sh, the programs and $2.
#
# $2 picks the kernel's suite: bullseye (5.10), bookworm (6.1),
# bookworm-backports (6.12) or unstable (newest). Those are fetched with a
# private apt state in the work directory, so the host's apt sources are not
# changed. With $2 empty: 6.12 from bookworm-backports when the mirror has it,
# else bookworm's 6.1, through the host's apt (adding bookworm-backports).
set -euo pipefail

out=${1:?usage: build-guest.sh OUTDIR [SUITE] [STATIC_PROGRAM...]}
suite=${2:-}
shift $(( $# < 2 ? $# : 2 ))
here=$(cd "$(dirname "$0")" && pwd)
work="$out.work"
rm -rf "$work"
mkdir -p "$work/debs" "$work/root"

step() { printf '[guest] %s\n' "$*"; }

DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
  busybox-static cpio xz-utils zstd >/dev/null

apt_opts=()
case "$suite" in
  "")
    backports=/etc/apt/sources.list.d/balloon-backports.sources
    if [ ! -f "$backports" ]; then
      added=$(bash "$here/apt-source.sh" "$backports" deb bookworm-backports)
      step "added $added (for the 6.12 kernel)"
      apt-get update -qq
    fi
    patterns=('^linux-image-6\.12\.[0-9.+~a-z-]*-cloud-amd64$' '^linux-image-6\.1\.[0-9.+~a-z-]*-cloud-amd64$')
    ;;
  bullseye|bookworm|bookworm-backports|unstable)
    apt_dir="$work/apt"
    mkdir -p "$apt_dir/parts" "$apt_dir/state/lists/partial" "$apt_dir/cache/archives/partial"
    added=$(bash "$here/apt-source.sh" "$apt_dir/parts/$suite.sources" deb "$suite")
    step "private apt state: $added"
    # Root downloads into the private state itself (apt's _apt user could
    # not write there).
    apt_opts=(-o Dir::Etc::SourceList=/dev/null -o "Dir::Etc::SourceParts=$apt_dir/parts"
              -o "Dir::State=$apt_dir/state" -o "Dir::Cache=$apt_dir/cache"
              -o APT::Sandbox::User=root)
    apt-get "${apt_opts[@]}" update -qq
    # Only this suite is known to the private state: its newest cloud kernel.
    patterns=('^linux-image-[0-9][0-9]*\.[0-9][0-9.+~a-z-]*-cloud-amd64$')
    ;;
  *)
    echo "build-guest: unknown kernel suite '$suite' (bullseye, bookworm, bookworm-backports or unstable)" >&2
    exit 2
    ;;
esac

# The kernel: linux-image-VERSION, which in newer Debian kernels is only a
# meta package over linux-binary-VERSION (vmlinuz under /usr/lib/modules)
# and linux-modules-VERSION.
kernel_pkg=""
for pattern in "${patterns[@]}"; do
  for candidate in $(apt-cache "${apt_opts[@]}" search --names-only "$pattern" | awk '{ print $1 }' | grep -v unsigned | sort -rV); do
    if (cd "$work/debs" && apt-get "${apt_opts[@]}" download -qq "$candidate" >/dev/null 2>&1); then
      kernel_pkg=$candidate
      break 2
    fi
  done
done
if [ -z "$kernel_pkg" ]; then
  echo "build-guest: no linux-image-*-cloud-amd64 package could be downloaded${suite:+ from $suite}" >&2
  exit 1
fi
kver=${kernel_pkg#linux-image-}
for part in "linux-binary-$kver" "linux-modules-$kver"; do
  if (cd "$work/debs" && apt-get "${apt_opts[@]}" download -qq "$part" >/dev/null 2>&1); then
    step "kernel part: $part"
  fi
done
step "kernel package: $kernel_pkg"
for deb in "$work"/debs/*.deb; do
  dpkg-deb -x "$deb" "$work/kernel"
done
vmlinuz=""
for candidate in "$work/kernel/boot/vmlinuz-$kver" "$work/kernel/usr/lib/modules/$kver/vmlinuz" \
                 "$work/kernel/lib/modules/$kver/vmlinuz"; do
  if [ -f "$candidate" ]; then vmlinuz=$candidate; break; fi
done
[ -n "$vmlinuz" ] || { echo "build-guest: no vmlinuz in $kernel_pkg or its parts" >&2; exit 1; }
cp "$vmlinuz" "$out.vmlinuz.tmp"
moddir=""
for candidate in "$work/kernel/lib/modules/$kver" "$work/kernel/usr/lib/modules/$kver"; do
  if [ -d "$candidate/kernel" ]; then moddir="$candidate/kernel/drivers"; break; fi
done
[ -n "$moddir" ] || { echo "build-guest: no modules directory in $kernel_pkg or its parts" >&2; exit 1; }

root="$work/root"
mkdir -p "$root"/{bin,sbin,dev,proc,sys,tmp,run,lib/modules,mnt}
cp /bin/busybox "$root/bin/busybox"
for applet in $("$root/bin/busybox" --list); do
  [ -e "$root/bin/$applet" ] || ln -s busybox "$root/bin/$applet"
done
# Modules the balloon needs that this kernel did not build in, in load order
# (older kernels have no virtio_pci_*_dev; it is skipped when absent).
for mod in virtio/virtio_ring virtio/virtio virtio/virtio_pci_legacy_dev \
           virtio/virtio_pci_modern_dev virtio/virtio_pci virtio/virtio_balloon \
           char/virtio_console block/virtio_blk; do
  name=$(basename "$mod")
  if [ -f "$moddir/$mod.ko.xz" ]; then
    xz -dc "$moddir/$mod.ko.xz" > "$root/lib/modules/$name.ko"
  elif [ -f "$moddir/$mod.ko.zst" ]; then
    zstd -qdc "$moddir/$mod.ko.zst" > "$root/lib/modules/$name.ko"
  elif [ -f "$moddir/$mod.ko" ]; then
    cp "$moddir/$mod.ko" "$root/lib/modules/$name.ko"
  fi
done
[ -f "$root/lib/modules/virtio_balloon.ko" ] || { echo "build-guest: virtio_balloon module missing in $kernel_pkg" >&2; exit 1; }
ls "$root/lib/modules" | sed 's/^/[guest]   module /'
cp "$here/../guest/init.sh" "$root/init"
chmod +x "$root/init"
for program in "$@"; do
  cp "$program" "$root/bin/$(basename "$program")"
done
(cd "$root" && find . | cpio -o -H newc --quiet | gzip -1) > "$out.initramfs.tmp"

mkdir -p "$out"
mv "$out.vmlinuz.tmp" "$out/vmlinuz"
mv "$out.initramfs.tmp" "$out/initramfs.gz"
echo "$kernel_pkg" > "$out/kernel-package"
rm -rf "$work"
step "done: $out"
