#!/usr/bin/env bash
# Build (or reuse) the boot image of the test VM used where this machine's kernel cannot do the job itself
# (bcache: no module here). Prints the image directory on stdout; it holds:
#   vmlinuz         Debian's linux-image-amd64 kernel
#   initrd.img      zstd cpio: a Debian bookworm minbase rootfs (bash, coreutils, util-linux, kmod, udev,
#                   btrfs-progs, bcache-tools, fdisk, e2fsprogs) + the kernel modules the tests need
#                   (vm.ts appends /init = vm-init.sh and the run's files as a second archive at each boot)
#   kver            kernel version
# Cached under /var/cache/train-server-test/vm-<hash of the inputs>; a second call returns at once.
# Installs missing Debian packages (qemu-system-x86 linux-image-amd64 debootstrap cpio zstd) on a fresh machine.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
cache_root=${TS_VM_CACHE:-/var/cache/train-server-test}
packages=(btrfs-progs bcache-tools util-linux fdisk kmod udev e2fsprogs procps)
modules=(virtio_pci virtio_blk nvme bcache btrfs loop)
log() { printf '[vm-build] %s\n' "$*" >&2; }

[[ $(id -u) == 0 ]] || { log "must run as root (debootstrap, device nodes)"; exit 1; }

need=()
command -v qemu-system-x86_64 >/dev/null || need+=(qemu-system-x86)
command -v debootstrap >/dev/null || need+=(debootstrap)
command -v cpio >/dev/null || need+=(cpio)
command -v zstd >/dev/null || need+=(zstd)
compgen -G '/boot/vmlinuz-*-amd64' >/dev/null || need+=(linux-image-amd64)
if ((${#need[@]})); then
  log "installing ${need[*]}"
  if [[ ! -e /usr/sbin/policy-rc.d ]]; then printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d; chmod +x /usr/sbin/policy-rc.d; fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >&2 \
    || { apt-get update -qq >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >&2; }
fi

vmlinuz=$(find /boot -maxdepth 1 -name 'vmlinuz-*-amd64' | sort -V | tail -n 1)
kver=${vmlinuz#/boot/vmlinuz-}
kpkg_version=$(dpkg-query -W -f='${Version}' "linux-image-$kver")
# shellcheck disable=SC1091
codename=$(. /etc/os-release && echo "$VERSION_CODENAME")

key=$( {
  cat "$here/vm-build.sh"
  echo "$kver $kpkg_version $codename ${packages[*]} ${modules[*]}"
} | sha256sum | cut -c1-16)
out=$cache_root/vm-$key
if [[ -s $out/initrd.img && -s $out/vmlinuz ]]; then
  echo "$out"
  exit 0
fi

mkdir -p "$cache_root"
exec 9>"$cache_root/.vm-build.lock"
flock 9 # one build at a time; a waiting caller then finds the finished image
if [[ -s $out/initrd.img && -s $out/vmlinuz ]]; then
  echo "$out"
  exit 0
fi

start=$SECONDS
work=$(mktemp -d "$cache_root/.build-$key.XXXXXX")
trap 'rm -rf "$work"' EXIT
trap 'exit 1' INT TERM HUP
root=$work/rootfs

# The archive the host's own apt uses for its release (no mirror name written here).
# shellcheck disable=SC2016 # $(SITE) is apt's format syntax, not a shell expansion
mirror=$(apt-get indextargets --format '$(SITE) $(RELEASE)' 2>/dev/null | awk -v r="$codename" '$2 == r { print $1; exit }')
# shellcheck disable=SC2016
[[ -n $mirror ]] || mirror=$(apt-get indextargets --format '$(SITE) $(RELEASE)' 2>/dev/null | awk '$1 !~ /security/ { print $1; exit }')
[[ -n $mirror ]] || { log "no Debian archive found in the host's apt configuration (run apt-get update)"; exit 1; }

log "debootstrap $codename minbase + ${packages[*]} (from the host's apt archive)"
debootstrap --variant=minbase --include="$(IFS=,; echo "${packages[*]}")" "$codename" "$root" "$mirror" >"$work/debootstrap.log" 2>&1 \
  || { tail -n 30 "$work/debootstrap.log" >&2; exit 1; }

# Trim what a test VM never reads.
rm -rf "$root"/usr/share/{doc,man,info,locale,lintian,zoneinfo} "$root"/var/cache/apt/* "$root"/var/lib/apt/lists/* \
  "$root"/var/cache/debconf/*-old "$root"/var/log/*

# Kernel modules: the dependency closure of what the tests load, then depmod so modprobe works in the VM.
for m in "${modules[@]}"; do
  modprobe -S "$kver" --show-depends "$m" | awk '$1 == "insmod" { print $2 }'
done | sort -u | while read -r ko; do
  mkdir -p "$root$(dirname "$ko")"
  cp "$ko" "$root$ko"
done
cp "/lib/modules/$kver/modules.order" "/lib/modules/$kver/modules.builtin"* "$root/lib/modules/$kver/"
depmod -b "$root" "$kver"

echo ts-vm >"$root/etc/hostname"
: >"$root/etc/fstab"

log "packing the initramfs"
(cd "$root" && find . -print0 | cpio --null -o -H newc --quiet) | zstd -q -T0 -6 >"$work/initrd.img"
cp "$vmlinuz" "$work/vmlinuz"
echo "$kver" >"$work/kver"
rm -rf "$root"
trap - EXIT
mv "$work" "$out"
# images of older inputs are never used again
find "$cache_root" -mindepth 1 -maxdepth 1 -type d -name 'vm-*' ! -path "$out" -exec rm -rf {} +
log "built $out in $((SECONDS - start)) s ($(du -h "$out/initrd.img" | cut -f1) initrd)"
echo "$out"
