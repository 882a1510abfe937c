#!/usr/bin/env bash
# Per-user disk usage against the quota, btrfs device health and the Drive mount, as textfile metrics.
# Run by ts-usage-collector.timer (every 15 minutes).
# Inputs: TS_MOUNTPOINT, TS_USERS ("name:quotaBytes name:quotaBytes ..."), TS_USAGE_DIRS (space-separated, relative
#   to the mountpoint, "{user}" replaced, e.g. "homes/{user} workspaces/{user} docker-volumes/{user}"),
#   TS_DRIVE_MOUNTPOINT (may be empty: no mount metric), TS_TEXTFILE_DIR.
# Usage of a directory: the btrfs qgroup's referenced bytes (`btrfs qgroup show --raw`) when it is a subvolume and
# quotas are on, else `du`. Metrics: train_server_user_usage_bytes{user,dir,method}, train_server_user_quota_bytes
# {user}, train_server_btrfs_device_errors{device,type}, train_server_btrfs_devices_missing{mountpoint},
# train_server_mount_up{mountpoint}.
source "${BASH_SOURCE[0]%/*}/lib.sh"
source "${BASH_SOURCE[0]%/*}/ops-lib.sh"
action=$(ts_action "${1:-}")
require_env TS_MOUNTPOINT TS_USERS TS_USAGE_DIRS 'TS_DRIVE_MOUNTPOINT?' TS_TEXTFILE_DIR

ops_collector_only "$action"

ops_start usage-collector
mountpoint -q "$TS_MOUNTPOINT" || die "$TS_MOUNTPOINT is not mounted"

# qgroup referenced bytes by subvolume id (empty when quotas are off).
declare -A rfer=()
if qgroups=$(btrfs qgroup show --raw "$TS_MOUNTPOINT" 2>/dev/null); then
  while read -r id r _; do
    [[ $id == 0/* && $r =~ ^[0-9]+$ ]] && rfer[${id#0/}]=$r
  done <<<"$qgroups"
fi

for entry in $TS_USERS; do
  user=${entry%%:*} quota=${entry#*:}
  [[ $user =~ ^[a-z_][a-z0-9_-]*$ && $quota =~ ^[0-9]+$ ]] || die "TS_USERS entry '$entry' is not name:bytes"
  metric train_server_user_quota_bytes "user=\"$user\"" "$quota"
  total=0
  for tmpl in $TS_USAGE_DIRS; do
    rel=${tmpl//\{user\}/$user}
    dir=$TS_MOUNTPOINT/$rel
    [[ -d $dir ]] || continue
    bytes='' method=du
    if ((${#rfer[@]})) && [[ $(stat -c %i "$dir") == 256 ]]; then
      id=$(btrfs inspect-internal rootid "$dir")
      if [[ -n ${rfer[$id]:-} ]]; then bytes=${rfer[$id]} method=qgroup; fi
    fi
    [[ -n $bytes ]] || bytes=$(du -sxB1 "$dir" | cut -f1)
    metric train_server_user_usage_bytes "user=\"$user\",dir=\"${tmpl%%/*}\",method=\"$method\"" "$bytes"
    total=$((total + bytes))
  done
  result "usage.$user" "$total"
done

# btrfs device error counters and missing devices.
while read -r key value; do
  if [[ $key =~ ^\[(.+)\]\.([a-z_]+)$ ]]; then
    metric train_server_btrfs_device_errors "device=\"${BASH_REMATCH[1]}\",type=\"${BASH_REMATCH[2]}\"" "$value"
  fi
done < <(btrfs device stats "$TS_MOUNTPOINT")
fsid=$(btrfs filesystem show "$TS_MOUNTPOINT" | awk '/uuid:/ {print $NF; exit}')
missing=0
for f in /sys/fs/btrfs/"$fsid"/devinfo/*/missing; do
  [[ -f $f ]] && missing=$((missing + $(cat "$f")))
done
metric train_server_btrfs_devices_missing "mountpoint=\"$TS_MOUNTPOINT\"" "$missing"
result devices_missing "$missing"

if [[ -n $TS_DRIVE_MOUNTPOINT ]]; then
  up=0
  # a hung FUSE mount must not hang the collector
  timeout 10 mountpoint -q "$TS_DRIVE_MOUNTPOINT" && timeout 10 stat -t "$TS_DRIVE_MOUNTPOINT/." >/dev/null && up=1
  metric train_server_mount_up "mountpoint=\"$TS_DRIVE_MOUNTPOINT\"" "$up"
  result drive_mount_up "$up"
fi
finish
