#!/bin/sh
# /init of the test guest. Loads the virtio modules, reports what the balloon
# driver negotiated, then either runs /scenarios/NAME.sh for a kernel
# command line `balloon.scenario=NAME`, or serves an interactive shell on the
# serial console that the host-side tests drive (one command per line, each
# answered between `@@B<id>` and `@@E<id> <status>` markers).
export PATH=/bin:/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/shm /mnt/data
# A tmpfs that may take all of RAM: tests fill it to make guest memory busy.
mount -t tmpfs -o size=100% tmpfs /mnt/data
mount -t cgroup2 none /sys/fs/cgroup 2>/dev/null
dmesg -n 1

for m in virtio_ring virtio virtio_pci_legacy_dev virtio_pci_modern_dev virtio_pci virtio_balloon virtio_console virtio_blk; do
  [ -f "/lib/modules/$m.ko" ] && insmod "/lib/modules/$m.ko"
done

echo "@@GUEST kernel=$(uname -r)"
for dev in /sys/bus/virtio/devices/*; do
  [ -e "$dev/device" ] || continue
  if [ "$(cat "$dev/device")" = "0x0005" ]; then
    echo "@@BALLOON driver=$(basename "$(readlink "$dev/driver")") features=$(cat "$dev/features")"
  fi
done

# The guest agent, when the image has one and QEMU gave it a port.
if [ -x /bin/guest-agent ] && grep -qs org.balloon.agent.0 /sys/class/virtio-ports/*/name; then
  guest-agent --interval 2 >/tmp/guest-agent.log 2>&1 &
  echo "@@AGENT started"
fi

scenario=$(sed -n 's/.*balloon\.scenario=\([^ ]*\).*/\1/p' /proc/cmdline)
if [ -n "$scenario" ] && [ -x "/scenarios/$scenario.sh" ]; then
  "/scenarios/$scenario.sh"
  echo "@@SCENARIO-DONE $scenario status=$?"
  poweroff -f
fi

stty -echo 2>/dev/null
echo "@@READY"
while IFS= read -r line; do
  id=${line%% *}
  cmd=${line#* }
  echo "@@B$id"
  sh -c "$cmd" 2>&1
  echo "@@E$id $?"
done
poweroff -f
