#!/bin/bash
# /init of the test VM (see vm-build.sh, tests/helpers/vm.ts). Runs as PID 1 from the initramfs:
#   1. mounts /proc /sys /dev /run /tmp, loads the block/bcache/btrfs modules;
#   2. with ts.udev=1 starts systemd-udevd and replays the boot's uevents, as a real host's boot does (so bcache
#      devices are registered by bcache-tools' udev rule and /dev/disk/by-* links exist);
#   3. waits for the disks named in ts.disks=vda,vdb,nvme0n1 to appear;
#   4. runs /ts/run.sh (put into the initramfs per run by vm.ts) with the variables of /ts/env, under a timeout;
#   5. writes its exit code, stdout and stderr base64-encoded between markers on the second serial port (ttyS1),
#      unmounts what the script left mounted, syncs and powers off.
export PATH=/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8 HOME=/root TERM=dumb
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /dev/shm /run /tmp
mount -t devpts devpts /dev/pts
ln -sfn /proc/self/fd /dev/fd # what udev/systemd provide on a real host (bash process substitution needs it)
ln -sf /proc/self/fd/0 /dev/stdin
ln -sf /proc/self/fd/1 /dev/stdout
ln -sf /proc/self/fd/2 /dev/stderr
mount -t tmpfs -o mode=0755 tmpfs /run
mount -t tmpfs tmpfs /dev/shm
ln -sf /proc/self/mounts /etc/mtab

param() { # param NAME DEFAULT: value of NAME= on the kernel command line
  local w words
  read -r -a words </proc/cmdline
  for w in "${words[@]}"; do
    if [[ $w == "$1="* ]]; then printf '%s' "${w#*=}"; return; fi
  done
  printf '%s' "$2"
}
say() { echo "ts-init: $*" >/dev/console; }

for m in virtio_pci virtio_blk nvme bcache btrfs loop; do
  modprobe "$m" || say "modprobe $m failed"
done

if [[ $(param ts.udev 1) == 1 ]]; then
  /lib/systemd/systemd-udevd --daemon --resolve-names=never
  udevadm trigger --type=subsystems --action=add
  udevadm trigger --type=devices --action=add
  udevadm settle --timeout=60 || say "udevadm settle timed out"
fi

IFS=, read -r -a disks <<<"$(param ts.disks '')"
for d in "${disks[@]}"; do
  for _ in $(seq 300); do [[ -e /sys/class/block/$d ]] && break; sleep 0.1; done
  [[ -e /sys/class/block/$d ]] || say "disk $d did not appear"
done
if [[ $(param ts.udev 1) == 1 ]]; then udevadm settle --timeout=60; fi

say "running /ts/run.sh"
rc=0
(
  set -a
  # shellcheck disable=SC1091
  [[ -f /ts/env ]] && . /ts/env
  set +a
  cd /ts && exec timeout --kill-after=5 "$(param ts.timeout 600)" bash /ts/run.sh
) >/ts/stdout 2>/ts/stderr </dev/null || rc=$?
say "run.sh exited $rc"

out=/dev/ttyS1
stty -F "$out" raw -echo 2>/dev/null
{
  echo "==TS-RESULT-BEGIN=="
  echo "exit=$rc"
  echo "==TS-STDOUT=="
  base64 -w 76 /ts/stdout
  echo "==TS-STDERR=="
  base64 -w 76 /ts/stderr
  echo "==TS-RESULT-END=="
} >"$out"

# Clean shutdown: leave nothing mounted, flush every device, stop udevd, power off.
findmnt -rn -o TARGET -t btrfs,ext4,ext2,vfat,xfs | sort -r | while read -r m; do umount "$m" || umount -l "$m"; done
if [[ $(param ts.udev 1) == 1 ]]; then udevadm control --exit 2>/dev/null; fi
sync
say "powering off"
echo o >/proc/sysrq-trigger
sleep 30
