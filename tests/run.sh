#!/usr/bin/env bash
# The full test run (README's test command calls this through `npm test`):
#   1. installs the Debian tools the host tests need (only those missing),
#   2. strict type check (tsc --noEmit),
#   3. unit tests: the Pulumi program under mocks (parallel),
#   4. host tests: real scripts on loop devices, real validators (in band, as root),
# and ends with one line `N passed, N failed`.
set -euo pipefail
cd "$(dirname "$0")/.."

# tool -> Debian package that provides it
declare -A NEED=(
  [btrfs]=btrfs-progs [restic]=restic [rclone]=rclone [promtool]=prometheus [amtool]=prometheus-alertmanager
  [prometheus-node-exporter]=prometheus-node-exporter [shellcheck]=shellcheck [bats]=bats
  [debootstrap]=debootstrap [dockerd]=docker.io [systemd-nspawn]=systemd-container [sshd]=openssh-server
  [make-bcache]=bcache-tools [fusermount3]=fuse3 [systemd-analyze]=systemd [wipefs]=util-linux
  [mkfs.ext4]=e2fsprogs [ssh]=openssh-client [setfacl]=acl [ufw]=ufw [fail2ban-client]=fail2ban [jq]=jq [sfdisk]=fdisk
  [btrbk]=btrbk [faketime]=faketime [qemu-system-x86_64]=qemu-system-x86 [cpio]=cpio [zstd]=zstd
  [iptables]=iptables [unshare]=util-linux [ssh-keygen]=openssh-client [curl]=curl [apparmor_parser]=apparmor
  [pg_ctlcluster]=postgresql
)
missing=()
for tool in "${!NEED[@]}"; do
  command -v "$tool" >/dev/null 2>&1 || [[ -x /usr/sbin/$tool || -x /usr/bin/$tool ]] || missing+=("${NEED[$tool]}")
done
# the bcache test boots Debian's kernel in qemu (this machine's kernel has no bcache module)
compgen -G '/boot/vmlinuz-*-amd64' >/dev/null || missing+=(linux-image-amd64)
if ((${#missing[@]})); then
  if [[ $(id -u) != 0 ]]; then
    echo "tests/run.sh: the host tests run as root (loop devices, mounts); missing packages: ${missing[*]}" >&2
    exit 1
  fi
  echo "tests/run.sh: installing ${missing[*]}" >&2
  # keep services from starting on install (no init system here; and dockerd/sshd would change the host)
  if [[ ! -e /usr/sbin/policy-rc.d ]]; then printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d; chmod +x /usr/sbin/policy-rc.d; fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  mapfile -t packages < <(printf '%s\n' "${missing[@]}" | sort -u)
  apt-get install -y -qq --no-install-recommends "${packages[@]}" >/dev/null
fi

mkdir -p .test-results
rm -f .test-results/*

echo "== type check (tsc --noEmit, strict)" >&2
tsc_ok=1
npx tsc --noEmit -p tsconfig.json || tsc_ok=0

status=0
echo "== unit tests (program under mocks)" >&2
npx jest --selectProjects unit --json --outputFile=.test-results/unit.json || status=1
echo "== host tests (real devices and tools)" >&2
npx jest --selectProjects host --runInBand --json --outputFile=.test-results/host.json || status=1

# the GPU check needs an NVIDIA GPU and running workspaces (the server); anywhere else it says why it did not run
echo "== GPU check (tests/gpu/check.sh)" >&2
if nvidia-smi -L >/dev/null 2>&1; then
  gpu_rc=0
  bash tests/gpu/check.sh || gpu_rc=$?
  if ((gpu_rc == 3)); then echo "GPU check NOT RUN: an NVIDIA GPU is present but no workspace is running here" >&2
  elif ((gpu_rc != 0)); then status=1; fi
else
  echo "GPU check NOT RUN: no NVIDIA GPU on this machine (nvidia-smi -L fails); run tests/gpu/check.sh on the server" >&2
fi

node tools/test-totals.js .test-results/unit.json .test-results/host.json --tsc-ok="$tsc_ok" | tee .test-results/totals.txt
[[ $tsc_ok == 1 ]] || status=1
exit "$status"
