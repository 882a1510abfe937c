#!/usr/bin/env bash
# storage.sh: build or adopt the data array: (optional bcache) -> btrfs RAID -> mount by UUID -> subvolumes,
# quotas and the fstab line. Usage: storage.sh apply|check|destroy (contract in lib.sh).
#
# Inputs (environment):
#   TS_DEVICES           space-separated HDD device paths (1..N), e.g. "/dev/sdb /dev/sdc /dev/sdd /dev/sde"
#   TS_DATA_PROFILE      single|dup|raid0|raid1|raid1c3|raid1c4|raid10|raid5|raid6
#   TS_METADATA_PROFILE  same set
#   TS_CACHE_DEVICE      empty, or the NVMe partition that caches the HDDs through bcache
#   TS_CACHE_MODE        none|writeback|writethrough (bcache is used when a cache device is set and mode != none)
#   TS_MOUNTPOINT        absolute path, e.g. /mnt/storage
#   TS_LABEL             btrfs label that marks the array as ours, e.g. train-storage
#   TS_MOUNT_OPTIONS     e.g. noatime,compress=zstd:3,space_cache=v2
#   TS_SUBVOLUMES        space-separated paths relative to the mountpoint, parents before children (may be empty)
#   TS_ALLOW_WIPE        0|1; 1 only on test rigs: foreign signatures may be wiped, destroy may wipe the array
#   TS_CONVERT_PROFILE   0|1; 1 = convert an adopted array whose profiles differ (btrfs balance ... convert)
#   TS_FSTAB             fstab to reconcile (default /etc/fstab)
# Results (stdout): uuid, label, mountpoint, data_profile, metadata_profile, devices, device_bytes, fs_devices
#   [, cache_device, cache_set, cache_mode], for check also pending=N (changes apply would make) and
#   drift.<item>=yes|no for each of array mount fstab subvolumes quotas profile (where those changes are), then changes=N.
#
# Identity: the array is ours when the btrfs labelled TS_LABEL spans exactly the listed devices (or, with
# bcache, exactly the bcache devices backed by them, attached to the cache set on TS_CACHE_DEVICE). It is then
# adopted, never re-made. Anything else on a listed device is refused before anything is written.
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "${BASH_SOURCE[0]%/*}/lib.sh"

ACTION=$(ts_action "$@")
require_env TS_DEVICES TS_DATA_PROFILE TS_METADATA_PROFILE 'TS_CACHE_DEVICE?' TS_CACHE_MODE TS_MOUNTPOINT \
  TS_LABEL TS_MOUNT_OPTIONS 'TS_SUBVOLUMES?' TS_ALLOW_WIPE TS_CONVERT_PROFILE
FSTAB=${TS_FSTAB:-/etc/fstab}
for tool in blkid wipefs findmnt blockdev mountpoint btrfs mkfs.btrfs perl numfmt; do
  command -v "$tool" >/dev/null || die "$tool not found (needs util-linux, btrfs-progs, perl-base, coreutils)"
done
MP=${TS_MOUNTPOINT%/}
LABEL=$TS_LABEL
OPTS=$TS_MOUNT_OPTIONS
WANT_D=$TS_DATA_PROFILE
WANT_M=$TS_METADATA_PROFILE
read -r -a HDDS <<<"$TS_DEVICES"
read -r -a SUBVOLS <<<"${TS_SUBVOLUMES:-}"
CACHE_DEV=""
[[ -n $TS_CACHE_DEVICE && $TS_CACHE_MODE != none ]] && CACHE_DEV=$TS_CACHE_DEVICE
MIN_BYTES=$((256 * 1024 * 1024)) # smallest device accepted (btrfs RAID needs ~110 MiB per device)
PENDING=0                        # check: changes apply would make
DRIFT_ITEMS=(array mount fstab subvolumes quotas profile) # check: what a pending change is filed under (drift.<item>)
declare -A DRIFT_SEEN=()
PROBLEMS=()                      # refusal reasons, collected so that one run names all of them

# ---------------------------------------------------------------------------------------------- inputs
min_devices() {
  case $1 in
    single | dup | raid0) echo 1 ;;
    raid1 | raid10 | raid5) echo 2 ;;
    raid1c3 | raid6) echo 3 ;;
    raid1c4) echo 4 ;;
    *) die "unknown btrfs profile '$1' (single|dup|raid0|raid1|raid1c3|raid1c4|raid10|raid5|raid6)" ;;
  esac
}

validate_inputs() {
  local p n sv parent seen=" "
  for p in "$WANT_D" "$WANT_M"; do
    n=$(min_devices "$p")
    ((${#HDDS[@]} >= n)) || die "profile $p needs at least $n devices, TS_DEVICES lists ${#HDDS[@]}"
  done
  [[ $WANT_M == raid5 || $WANT_M == raid6 ]] && log "WARNING: metadata on $WANT_M is not recommended (use raid1/raid1c3)"
  ((${#HDDS[@]} > 0)) || die "TS_DEVICES lists no device"
  for p in "${HDDS[@]}" "$TS_CACHE_DEVICE"; do
    # udev's /dev/disk/by-id and by-path names use letters, digits and # + - . : = @ _
    [[ -z $p || ($p =~ ^/dev(/[A-Za-z0-9#+.:=@_-]+)+$ && /$p/ != */./* && /$p/ != */../*) ]] \
      || die "device path '$p' must be a plain absolute /dev path (no '.', '..' or '//' components)"
  done
  [[ $MP =~ ^(/[A-Za-z0-9._-]+)+$ && /$MP/ != */../* && /$MP/ != */./* ]] \
    || die "TS_MOUNTPOINT '$TS_MOUNTPOINT' must be a plain absolute path (no '.', '..' or '//' components, no spaces), not /"
  [[ $LABEL =~ ^[A-Za-z0-9._-]{1,64}$ ]] || die "TS_LABEL '$LABEL' must be 1-64 characters of A-Z a-z 0-9 . _ -"
  [[ $OPTS =~ ^[A-Za-z0-9._:=,/+-]+$ ]] || die "TS_MOUNT_OPTIONS '$OPTS' must be a comma-separated option list without spaces"
  [[ ,$OPTS, != *,subvol=* && ,$OPTS, != *,subvolid=* ]] || die "TS_MOUNT_OPTIONS must not select a subvolume (the top level is mounted)"
  [[ $TS_ALLOW_WIPE =~ ^[01]$ ]] || die "TS_ALLOW_WIPE must be 0 or 1"
  [[ $TS_CONVERT_PROFILE =~ ^[01]$ ]] || die "TS_CONVERT_PROFILE must be 0 or 1"
  case $TS_CACHE_MODE in none | writeback | writethrough) ;; *) die "TS_CACHE_MODE must be none|writeback|writethrough" ;; esac
  [[ $TS_CACHE_MODE == none || -n $TS_CACHE_DEVICE ]] || die "TS_CACHE_MODE=$TS_CACHE_MODE needs TS_CACHE_DEVICE"
  [[ -n $TS_CACHE_DEVICE && $TS_CACHE_MODE == none ]] && log "cache mode none: TS_CACHE_DEVICE $TS_CACHE_DEVICE is not used"
  for sv in "${SUBVOLS[@]}"; do
    [[ $sv =~ ^[A-Za-z0-9._-]+(/[A-Za-z0-9._-]+)*$ && /$sv/ != */./* && /$sv/ != */../* ]] \
      || die "subvolume '$sv' must be a relative path of A-Z a-z 0-9 . _ - components"
    parent=$(dirname "$sv")
    [[ $parent == . || $seen == *" $parent "* ]] || die "subvolume '$sv' is listed before its parent '$parent'"
    seen+="$sv "
  done
}

# ------------------------------------------------------------------------------------- looking at devices
declare -A KIND DESC FSID FSLABEL DEVID NUMDEV SIZE KNAME USES MOUNTED_FSID

human() { numfmt --to=iec --suffix=B "$1"; }

# kname DEV: kernel name (sdb, nvme0n1p2, loop3, bcache0) of a block device.
kname() {
  local t
  t=$(stat -L -c '%t:%T' "$1")
  basename "$(readlink -f "/sys/dev/block/$((16#${t%:*})):$((16#${t#*:}))")"
}

# probe DEV: signature on DEV -> KIND (blank|btrfs|bcache|other), DESC, and for btrfs FSID/DEVID/NUMDEV.
probe() {
  local dev=$1 out rc=0 k v type="" label="" uuid="" pttype="" sigs
  out=$(blkid -p -o export "$dev" 2>/dev/null) || rc=$?
  sigs=$(wipefs --noheadings -O TYPE,OFFSET "$dev" 2>/dev/null | tr -s ' \n' ' ' | sed 's/ $//') || true
  # blank: no signature at all (rc 2), or — on a partition — only the partition-entry lines (rc 0, no TYPE/PTTYPE)
  if [[ -z $sigs && ($rc == 2 || ($rc == 0 && ! $out =~ (^|$'\n')(TYPE|PTTYPE)=)) ]]; then
    KIND[$dev]=blank; DESC[$dev]=blank; return 0
  fi
  while IFS='=' read -r k v; do
    case $k in TYPE) type=$v ;; LABEL) label=$v ;; UUID) uuid=$v ;; PTTYPE) pttype=$v ;; esac
  done <<<"$out"
  if [[ $rc == 0 && $type == btrfs ]]; then
    KIND[$dev]=btrfs
    FSID[$dev]=$uuid
    FSLABEL[$dev]=$label
    DEVID[$dev]=$(btrfs inspect-internal dump-super "$dev" | awk '$1 == "dev_item.devid" {print $2}')
    NUMDEV[$dev]=$(btrfs inspect-internal dump-super "$dev" | awk '$1 == "num_devices" {print $2}')
    DESC[$dev]="btrfs filesystem (label '$label', UUID $uuid, device ${DEVID[$dev]} of ${NUMDEV[$dev]})"
  elif [[ $rc == 0 && $type == bcache ]]; then
    KIND[$dev]=bcache
    DESC[$dev]="bcache superblock ($(bcache_sb "$dev" sb.version | sed 's/^[0-9]* //'), cache set $(bcache_sb "$dev" cset.uuid))"
  elif [[ $rc == 0 && -n $type ]]; then
    KIND[$dev]=other
    DESC[$dev]="$type signature${label:+ (label \"$label\")}${uuid:+ (UUID $uuid)}"
    case $type in
      LVM2_member) DESC[$dev]+=" (LVM physical volume)" ;;
      linux_raid_member) DESC[$dev]+=" (md RAID member)" ;;
    esac
  elif [[ $rc == 0 && -n $pttype ]]; then
    KIND[$dev]=other
    DESC[$dev]="$pttype partition table"
  else
    KIND[$dev]=other
    DESC[$dev]="signatures: ${sigs:-unreadable (blkid exit $rc)}"
  fi
}

# bcache_sb DEV FIELD: one field of the bcache superblock (bcache-super-show), e.g. cset.uuid, sb.version.
bcache_sb() { bcache-super-show "$1" 2>/dev/null | awk -v f="$2" '$1 == f {$1 = ""; sub(/^[ \t]+/, ""); print; exit}'; }

# uses DEV: what holds DEV (mounts, swap, holders, mounted btrfs, partitions) -> USES (text), MOUNTED_FSID.
uses() {
  local dev=$1 name=${KNAME[$1]} u=() f p pn t
  MOUNTED_FSID[$dev]=""
  for f in /sys/fs/btrfs/*/devices/"$name"; do
    [[ -e $f ]] || continue
    t=${f#/sys/fs/btrfs/}
    MOUNTED_FSID[$dev]=${t%%/*}
  done
  for p in "/sys/class/block/$name" "/sys/class/block/$name"/"$name"*; do
    [[ -e $p/dev ]] || continue
    pn=$(basename "$p")
    while read -r t f; do
      [[ $f == btrfs && -n ${MOUNTED_FSID[$dev]} ]] || u+=("/dev/$pn is mounted at $t")
    done < <(findmnt -rn -S "/dev/$pn" -o TARGET,FSTYPE 2>/dev/null || true)
    awk -v d="/dev/$pn" '$1 == d {found = 1} END {exit !found}' /proc/swaps && u+=("/dev/$pn is used as swap")
    for f in "$p"/holders/*; do [[ -e $f ]] && u+=("/dev/$pn is held by $(basename "$f")"); done
    # a bcache device itself also has a bcache/ link (to its backing device): that is not a use of it
    [[ -e $p/bcache && $pn != bcache[0-9]* ]] && u+=("/dev/$pn is registered with bcache")
  done
  [[ -n ${MOUNTED_FSID[$dev]} ]] && u+=("member of the mounted btrfs ${MOUNTED_FSID[$dev]}")
  if ((${#u[@]} == 0)) && ! perl -MFcntl -e 'sysopen(my $f, $ARGV[0], O_RDONLY | O_EXCL) or exit 1' "$dev"; then
    u+=("open exclusively by the kernel (device busy)")
  fi
  USES[$dev]=$(IFS=';'; echo "${u[*]}")
  USES[$dev]=${USES[$dev]//;/; }
}

# survey ROLE DEV...: existence, size, duplicates, signature and users of each device; problems -> PROBLEMS.
survey() {
  local role=$1 dev id
  shift
  declare -A seen=()
  for dev in "$@"; do
    if [[ ! -e $dev ]]; then PROBLEMS+=("$role device $dev does not exist"); KIND[$dev]=missing; continue; fi
    if [[ ! -b $dev ]]; then PROBLEMS+=("$role device $dev is not a block device"); KIND[$dev]=missing; continue; fi
    KNAME[$dev]=$(kname "$dev")
    id=${KNAME[$dev]}
    if [[ -n ${seen[$id]:-} ]]; then PROBLEMS+=("$dev and ${seen[$id]} are the same device ($id)"); fi
    seen[$id]=$dev
    SIZE[$dev]=$(blockdev --getsize64 "$dev")
    if ((SIZE[$dev] < MIN_BYTES)); then
      PROBLEMS+=("$role device $dev has $(human "${SIZE[$dev]}"), less than $(human "$MIN_BYTES") (missing disk, detached or no medium?)")
      KIND[$dev]=missing
      continue
    fi
    probe "$dev"
    uses "$dev"
    log "$role device $dev ($id): $(human "${SIZE[$dev]}"), ${DESC[$dev]}${USES[$dev]:+, in use: ${USES[$dev]}}"
  done
}

# warn_sizes DEV...: RAID over disks of different sizes leaves part of the larger ones unused.
warn_sizes() {
  local dev min="" max=0
  for dev in "$@"; do
    [[ -n ${SIZE[$dev]:-} ]] || continue
    ((SIZE[$dev] > max)) && max=${SIZE[$dev]}
    [[ -z $min ]] || ((SIZE[$dev] < min)) && min=${SIZE[$dev]}
  done
  if [[ -n $min ]] && ((max > min + min / 10)); then
    log "WARNING: device sizes differ ($(human "$min") to $(human "$max")): part of the larger disks may stay unused"
  fi
}

refuse_if_problems() {
  ((${#PROBLEMS[@]} == 0)) && return 0
  local msg p
  msg="storage array '$LABEL' at $MP: nothing was written:"
  for p in "${PROBLEMS[@]}"; do msg+=$'\n'"  - $p"; done
  refuse "$msg"
}

# ------------------------------------------------------------------------------------------------ steps
# step DESCRIPTION CMD...: apply runs CMD and counts a change; check only reports what apply would do.
# layout_mode SUBVOLUME: the mode train-server keeps on a top directory of the layout ("" = not managed here)
layout_mode() {
  case $1 in
    homes | workspaces | docker-volumes) echo 711 ;;
    snapshots) echo 700 ;;
    cache) echo 755 ;;
  esac
}

# make_subvolume PATH MODE: a new subvolume, with MODE if given
make_subvolume() {
  btrfs -q subvolume create "$1" && if [[ -n $2 ]]; then chmod "$2" "$1"; fi
}

# With ITEM=<name> before it (`ITEM=fstab step ...`), check files the pending change under that drift item
# (default: array, the array itself is not what the config says); see DRIFT_ITEMS.
step() {
  local desc=$1
  shift
  if [[ $ACTION == check ]]; then
    log "would: $desc"
    PENDING=$((PENDING + 1))
    DRIFT_SEEN[${ITEM:-array}]=1
    return 0
  fi
  log "$desc ..."
  "$@" >&2 # stdout carries only results
  changed "$desc"
}

wipe() { wipefs -q -a "$1"; btrfs device scan --forget "$1" >/dev/null 2>&1 || true; }

# ------------------------------------------------------------------------------------------ btrfs layer
# decide_fs DEV...: from the survey of the filesystem devices, FS_STATE=create|adopt and FS_UUID, or problems.
# Foreign devices go to WIPE_DEVS (only kept when TS_ALLOW_WIPE=1).
FS_STATE=""
FS_UUID=""
WIPE_DEVS=()
decide_fs() {
  local dev ours=() fsids=() foreign=() f n devids=" " missing="" i
  for dev in "$@"; do
    [[ ${KIND[$dev]} == btrfs && ${FSLABEL[$dev]} == "$LABEL" ]] || continue
    ours+=("$dev")
    [[ " ${fsids[*]} " == *" ${FSID[$dev]} "* ]] || fsids+=("${FSID[$dev]}")
  done
  if ((${#fsids[@]} > 1)); then
    PROBLEMS+=("several btrfs filesystems labelled '$LABEL' on the devices (UUIDs ${fsids[*]}): decide by hand which one is the array")
    return 0
  fi
  for dev in "$@"; do
    if [[ ${KIND[$dev]} != blank && ${KIND[$dev]} != missing && " ${ours[*]} " != *" $dev "* ]]; then
      foreign+=("$dev")
    fi
    if [[ -n ${USES[$dev]:-} && " ${ours[*]} " != *" $dev "* ]]; then
      PROBLEMS+=("$dev is in use: ${USES[$dev]} (free it first; nothing is wiped while in use)")
    elif [[ -n ${USES[$dev]:-} && ${MOUNTED_FSID[$dev]} != "${fsids[0]:-}" ]]; then
      PROBLEMS+=("$dev is in use: ${USES[$dev]}")
    fi
  done
  if ((${#fsids[@]} == 1)); then
    FS_UUID=${fsids[0]}
    n=${NUMDEV[${ours[0]}]}
    for dev in "${ours[@]}"; do devids+="${DEVID[$dev]} "; done
    if ((${#ours[@]} == $# && n == $#)); then
      FS_STATE=adopt
      log "adopting the array '$LABEL' (UUID $FS_UUID) on $*"
      return 0
    fi
    for ((i = 1; i <= n; i++)); do [[ $devids == *" $i "* ]] || missing+=" $i"; done
    f="the array '$LABEL' (UUID $FS_UUID) has $n devices; found on:"
    for dev in "${ours[@]}"; do f+=" $dev (device ${DEVID[$dev]})"; done
    [[ -n $missing ]] && f+="; MISSING device id(s):$missing"
    for dev in "$@"; do
      [[ " ${ours[*]} " == *" $dev "* ]] || f+="; $dev listed in the devices is not part of it (${DESC[$dev]:-unavailable})"
    done
    PROBLEMS+=("$f. A degraded, replaced or added disk is an admin decision (btrfs replace / device add / remove by hand, then list exactly the array's devices); it is not mounted degraded automatically")
    return 0
  fi
  if ((${#foreign[@]})); then
    if [[ $TS_ALLOW_WIPE == 1 ]]; then
      for dev in "${foreign[@]}"; do log "TS_ALLOW_WIPE=1: will wipe $dev: ${DESC[$dev]}"; done
      WIPE_DEVS=("${foreign[@]}")
    else
      for dev in "${foreign[@]}"; do
        PROBLEMS+=("$dev: ${DESC[$dev]} found, not ours: refusing to overwrite it (check it, then wipe it by hand with 'wipefs -a $dev' or remove it from storage.devices; a test rig (stack config rig: true) may wipe it)")
      done
      return 0
    fi
  fi
  FS_STATE=create
}

# mountpoint and fstab: refusals that must come before any write.
MP_MOUNTED=0
preflight_mount() {
  local fsid src root opts real
  real=$(realpath -m "$MP")
  if [[ $real != "$MP" ]]; then
    # mount would follow the link, the fstab line would not: the array would be at one place now, another at boot
    PROBLEMS+=("$MP is (or goes through) a symlink to $real: give the real path as storage.mountpoint, or remove the link")
  elif mountpoint -q "$MP" 2>/dev/null; then
    fsid=$(mounted_fsid "$MP")
    # the mount that is visible at MP is the last one listed for it
    root=$(findmnt -rn -M "$MP" -o FSROOT | tail -1)
    opts=$(findmnt -rn -M "$MP" -o OPTIONS | tail -1)
    if [[ -n $FS_UUID && $fsid == "$FS_UUID" && $root != / ]]; then
      PROBLEMS+=("$MP has $root of the array '$LABEL' mounted (a subvolume or a bind mount of a directory), not its top level: the subvolumes would be made inside it. Unmount $MP (umount $MP) and run again")
    elif [[ -n $FS_UUID && $fsid == "$FS_UUID" && ,$opts, == *,ro,* ]]; then
      PROBLEMS+=("the array '$LABEL' is mounted read-only at $MP (btrfs does this after an error: see dmesg); fix the cause and remount it read-write, then run again")
    elif [[ -n $FS_UUID && $fsid == "$FS_UUID" ]]; then
      MP_MOUNTED=1
      default_subvolume_problem
    else
      src=$(findmnt -rn -M "$MP" -o SOURCE,FSTYPE | tail -1)
      PROBLEMS+=("$MP already has another filesystem mounted ($src): unmount it or choose another storage.mountpoint")
    fi
  elif [[ -e $MP && ! -d $MP ]]; then
    PROBLEMS+=("$MP exists and is not a directory")
  elif [[ -d $MP && -n $(find "$MP" -mindepth 1 -maxdepth 1 -print -quit) ]]; then
    PROBLEMS+=("$MP is not empty and not mounted: mounting the array would hide its files; move them away first")
  fi
  if [[ -f $FSTAB ]]; then
    while read -r src; do
      fstab_source_is_ours "$src" && continue
      if [[ $TS_ALLOW_WIPE == 1 ]]; then
        log "TS_ALLOW_WIPE=1: the $FSTAB line mounting $src at $MP will be replaced"
      else
        PROBLEMS+=("$FSTAB already mounts $src at $MP: remove that line (or choose another storage.mountpoint)")
      fi
    done < <(awk -v mp="$MP" "$AWK_NORM"' $1 !~ /^#/ && norm($2) == mp {print $1}' "$FSTAB")
  fi
}

# an awk function: a path as the kernel sees it (no repeated or trailing slashes): /mnt//storage/ is /mnt/storage
AWK_NORM='function norm(p) { gsub(/\/+/, "/", p); if (length(p) > 1) sub(/\/$/, "", p); return p }'

# fstab_unquote SOURCE: UUID="x" and LABEL='x' as libmount reads them
fstab_unquote() {
  local s=$1
  [[ $s =~ ^([A-Z]+=)[\"\'](.*)[\"\']$ ]] && s=${BASH_REMATCH[1]}${BASH_REMATCH[2]}
  printf '%s' "$s"
}

# mounted_fsid DIR: UUID of the btrfs mounted at DIR; empty for another filesystem (btrfs fails there: not an error)
mounted_fsid() { { btrfs filesystem show "$1" 2>/dev/null || true; } | awk '/uuid:/ {print $NF; exit}'; }

# default_subvolume_problem: the array (mounted at MP) must have the top level as its default subvolume, or the fstab
# line (no subvolid) would mount another subvolume at boot and everything would land inside it
default_subvolume_problem() {
  local id
  id=$(btrfs subvolume get-default "$MP" | awk '{print $2}')
  [[ $id == 5 ]] && return 0
  PROBLEMS+=("the array '$LABEL' has subvolume ID $id as its default (btrfs subvolume set-default): at boot its $FSTAB line would mount that subvolume at $MP instead of the top level; reset it with 'btrfs subvolume set-default 5 $MP' and run again")
}

fstab_source_is_ours() {
  local src dev real
  src=$(fstab_unquote "$1")
  [[ -n $FS_UUID && ($src == "UUID=$FS_UUID" || $src == "/dev/disk/by-uuid/$FS_UUID") ]] && return 0
  [[ $src == "LABEL=$LABEL" || $src == "/dev/disk/by-label/$LABEL" ]] && return 0
  # a member device by any of its names (/dev/sdb, a /dev/disk/by-id link to it, ...)
  [[ $src == /dev/* ]] || return 1
  real=$(readlink -f "$src" 2>/dev/null) || return 1
  for dev in "${FS_DEVS[@]}"; do [[ $src == "$dev" || $real == "$(readlink -f "$dev")" ]] && return 0; done
  return 1
}

# fstab_render: FSTAB with our line at MP (replacing the first line for MP in place, dropping the others).
fstab_render() {
  local line="UUID=$FS_UUID $MP btrfs $OPTS 0 0"
  if [[ -f $FSTAB ]]; then
    awk -v mp="$MP" -v line="$line" "$AWK_NORM"'
      $1 !~ /^#/ && norm($2) == mp { if (!done) print line; done = 1; next }
      { print }
      END { if (!done) print line }' "$FSTAB"
  else
    printf '%s\n' "$line"
  fi
}

# profiles MP KIND...: lowercase profiles of the named chunk kinds (Data, Metadata, System) in use.
profiles() {
  local mp=$1
  shift
  btrfs filesystem df "$mp" | awk -v kinds=" $* " '
    { k = $1; sub(/,$/, "", k); p = $2; sub(/:$/, "", p) }
    index(kinds, " " k " ") { print tolower(p) }' | sort -u | paste -sd, -
}

fs_converge() {
  local dev mkfs_opts=() desired cur_d cur_m sv p tmp convert=() want_line cur_line
  # 1. wipe foreign signatures (test rigs only) and make the filesystem
  for dev in "${WIPE_DEVS[@]}"; do step "wipe $dev (${DESC[$dev]})" wipe "$dev"; done
  if [[ $FS_STATE == create ]]; then
    mkfs_opts=(-q -L "$LABEL" -d "$WANT_D" -m "$WANT_M")
    step "mkfs.btrfs -L $LABEL -d $WANT_D -m $WANT_M ${FS_DEVS[*]}" mkfs.btrfs "${mkfs_opts[@]}" "${FS_DEVS[@]}"
    if [[ $ACTION == check ]]; then
      step "mount the new array at $MP, add its $FSTAB line, create ${#SUBVOLS[@]} subvolume(s), enable quotas" true
      return 0
    fi
    FS_UUID=$(blkid -p -s UUID -o value "${FS_DEVS[0]}")
  fi
  # 2. mount (the kernel must know every device of a multi-device filesystem first: no udev here)
  if [[ $ACTION == apply ]]; then btrfs device scan "${FS_DEVS[@]}" >/dev/null; fi
  [[ -d $MP ]] || ITEM=mount step "create mountpoint $MP" mkdir -p "$MP"
  want_line="UUID=$FS_UUID $MP btrfs $OPTS 0 0"
  cur_line=""
  if [[ -f $FSTAB ]]; then
    cur_line=$(awk -v mp="$MP" "$AWK_NORM"' $1 !~ /^#/ && norm($2) == mp {print $1, $2, $3, $4, $5, $6; exit}' "$FSTAB")
  fi
  if ((MP_MOUNTED == 0)); then
    # the top level explicitly (subvolid=5), whatever the array's default subvolume is
    ITEM=mount step "mount UUID=$FS_UUID at $MP ($OPTS)" mount -t btrfs -o "$OPTS,subvolid=5" "UUID=$FS_UUID" "$MP"
    if [[ $ACTION == check ]]; then
      step "then reconcile profiles, $FSTAB, subvolumes and quotas of the mounted array" true
      return 0
    fi
    default_subvolume_problem
    if ((${#PROBLEMS[@]})); then
      umount "$MP" && changed "unmounted $MP again"
      refuse_if_problems
    fi
  fi
  # 3. look at the mounted array before changing anything else in it
  for sv in "${SUBVOLS[@]}"; do
    p=$MP/$sv
    if [[ -e $p ]] && ! is_subvolume "$p"; then
      refuse "$p exists but is not a btrfs subvolume: move it aside (its files stay yours), then run again"
    fi
  done
  cur_d=$(profiles "$MP" Data)
  cur_m=$(profiles "$MP" Metadata System)
  [[ $cur_d == "$WANT_D" ]] || convert+=("-dconvert=$WANT_D,soft")
  [[ $cur_m == "$WANT_M" ]] || convert+=("-mconvert=$WANT_M,soft")
  if ((${#convert[@]})) && [[ $TS_CONVERT_PROFILE != 1 ]]; then
    refuse "the array '$LABEL' (UUID $FS_UUID) has data profile $cur_d and metadata profile $cur_m, the config wants $WANT_D and $WANT_M: converting rewrites every chunk (hours on large disks). Set storage.convertProfile: true in the stack config to convert, or revert the profiles to $cur_d/$cur_m"
  fi
  if ((${#convert[@]})) && ! btrfs balance status "$MP" >/dev/null 2>&1; then
    refuse "a balance is already running or paused on $MP (btrfs balance status $MP): let it finish or cancel it, then run again"
  fi
  # changed mount options on the mounted array: remount (some options only take effect at the next mount)
  if ((MP_MOUNTED)) && [[ -n $cur_line && $(awk '{print $4}' <<<"$cur_line") != "$OPTS" ]]; then
    # the fstab line's options differ (the live mount follows the line): filed under the fstab
    ITEM=fstab step "remount $MP with $OPTS" remount
  fi
  # 4. fstab line by UUID
  desired=$(fstab_render)
  if [[ ! -f $FSTAB ]] || [[ $desired != "$(cat "$FSTAB")" ]]; then
    if [[ $ACTION == check ]]; then
      ITEM=fstab step "write the line '$want_line' to $FSTAB" true
    else
      tmp=$(mktemp)
      printf '%s\n' "$desired" >"$tmp"
      if [[ -f $FSTAB ]]; then
        install_file "$tmp" "$FSTAB" "$(stat -c %a "$FSTAB")" "$(stat -c %U:%G "$FSTAB")"
      else
        install_file "$tmp" "$FSTAB" 0644 root:root
      fi
      rm -f "$tmp"
      [[ $FSTAB == /etc/fstab && -d /run/systemd/system ]] && systemctl daemon-reload
    fi
  fi
  # 5. subvolumes (never deleted here: an unlisted one is kept with its data) and quotas
  # with the modes of the layout's top directories set explicitly (the step runs under umask 077, and an adopted
  # array may differ): each user must traverse into their own home and workspace (sshd reads ~/.ssh as the user)
  # without listing the others' (0711); snapshots are root's; the cache parent is readable (children: baseline.sh)
  for sv in "${SUBVOLS[@]}"; do
    want=$(layout_mode "$sv")
    if [[ ! -e $MP/$sv ]]; then
      ITEM=subvolumes step "create subvolume $MP/$sv${want:+ (mode $want)}" make_subvolume "$MP/$sv" "$want"
    elif [[ -n $want && $(stat -c %a "$MP/$sv") != "$want" ]]; then
      ITEM=subvolumes step "mode $want on $MP/$sv" chmod "$want" "$MP/$sv"
    fi
  done
  btrfs qgroup show "$MP" >/dev/null 2>&1 || ITEM=quotas step "enable quotas on $MP" btrfs quota enable "$MP"
  # 6. profile conversion, last: it can take hours, and the array is usable meanwhile
  if ((${#convert[@]})); then
    ITEM=profile step "convert $MP from $cur_d/$cur_m to $WANT_D/$WANT_M (btrfs balance start --force ${convert[*]})" \
      btrfs balance start --force "${convert[@]}" "$MP"
    if [[ $ACTION == apply ]]; then
      cur_d=$(profiles "$MP" Data)
      cur_m=$(profiles "$MP" Metadata System)
      [[ $cur_d == "$WANT_D" && $cur_m == "$WANT_M" ]] || die "after the balance the profiles are $cur_d/$cur_m, not $WANT_D/$WANT_M"
    fi
  fi
}

remount() {
  if ! mount -o "remount,$OPTS" "$MP"; then
    log "WARNING: remounting $MP with $OPTS failed; the options take effect at the next mount"
  fi
}

# is_subvolume PATH: PATH (under MP) is a subvolume of the array — also when another filesystem is mounted over
# it (the Drive's FUSE mount on shared/): then it is looked up in the array's subvolume list.
is_subvolume() {
  [[ $(stat -f -c %T "$1") == btrfs && $(stat -c %i "$1") == 256 ]] && return 0
  mountpoint -q "$1" && btrfs subvolume list "$MP" | awk -v p="${1#"$MP"/}" '$NF == p {f = 1} END {exit !f}'
}

# ----------------------------------------------------------------------------------------- bcache layer
BCACHE_SET=""
require_bcache() {
  local tool
  for tool in make-bcache bcache-super-show; do
    command -v "$tool" >/dev/null || die "$tool not found: install bcache-tools"
  done
  [[ -e /sys/fs/bcache/register ]] && return 0
  if [[ $ACTION == apply ]]; then modprobe bcache 2>/dev/null || true; fi
  [[ -e /sys/fs/bcache/register ]] && return 0
  [[ $ACTION == check ]] && modprobe -n bcache 2>/dev/null && { log "would: load the bcache kernel module"; return 0; }
  die "bcache is not available on this kernel (/sys/fs/bcache missing, modprobe bcache failed): install the kernel's modules package or remove storage.cache from the stack config"
}

# decide_bcache: BCACHE_STATE=create|adopt from the survey of the cache device and the HDDs.
BCACHE_STATE=""
decide_bcache() {
  local dev cset="" n_ours=0 foreign=() n=$((${#HDDS[@]} + 1)) rest="" use
  if [[ ${KIND[$CACHE_DEV]} == bcache && $(bcache_sb "$CACHE_DEV" sb.version) == *"[cache device]"* ]]; then
    cset=$(bcache_sb "$CACHE_DEV" cset.uuid)
  fi
  for dev in "$CACHE_DEV" "${HDDS[@]}"; do
    rest+="$dev: ${DESC[$dev]:-unavailable}; "
    if [[ ${KIND[$dev]} == blank ]]; then
      continue
    elif [[ -n $cset && ${KIND[$dev]} == bcache && $(bcache_sb "$dev" cset.uuid) == "$cset" ]] \
      && [[ $dev == "$CACHE_DEV" || $(bcache_sb "$dev" sb.version) == *"[backing device]"* ]]; then
      n_ours=$((n_ours + 1))
      # ours may be registered (held by its bcache device), nothing else
      use=${USES[$dev]:-}
      use=${use//"/dev/${KNAME[$dev]} is registered with bcache"/}
      use=$(sed -E 's#/dev/[^ ]+ is held by bcache[0-9]+##g; s/^[; ]+//; s/[; ]+$//' <<<"$use")
      [[ -z $use ]] || PROBLEMS+=("$dev is in use: $use")
      continue
    else
      foreign+=("$dev")
    fi
    [[ -z ${USES[$dev]:-} ]] || PROBLEMS+=("$dev is in use: ${USES[$dev]} (free it first; nothing is wiped while in use)")
  done
  if ((n_ours == n)); then BCACHE_STATE=adopt; BCACHE_SET=$cset; return 0; fi
  if ((n_ours > 0)); then
    PROBLEMS+=("the bcache set $cset covers only $n_ours of the $n devices (${rest% }). Attaching or replacing a disk is an admin decision")
    return 0
  fi
  if ((${#foreign[@]})) && [[ $TS_ALLOW_WIPE != 1 ]]; then
    for dev in "${foreign[@]}"; do
      PROBLEMS+=("$dev: ${DESC[$dev]} found, not ours: refusing to overwrite it (check it, then wipe it by hand with 'wipefs -a $dev' or remove it from the config; a test rig (stack config rig: true) may wipe it)")
    done
    return 0
  fi
  WIPE_DEVS=("${foreign[@]}")
  BCACHE_STATE=create
}

# wait_path present|absent PATH: wait up to 10 s for a sysfs entry to appear or go.
wait_path() {
  local i
  for ((i = 0; i < 100; i++)); do
    if [[ $1 == present && -e $2 ]] || [[ $1 == absent && ! -e $2 ]]; then return 0; fi
    sleep 0.1
  done
  return 1
}

sysblk() { echo "/sys/class/block/$(kname "$1")"; }

# write_sys FILE VALUE: write one value to a sysfs attribute.
write_sys() { printf '%s\n' "$2" >"$1"; }
make_bcache() { make-bcache "$@" >&2; }

# bcache_converge: make/register/attach/mode; sets FS_DEVS to the bcache devices (in HDD order).
bcache_converge() {
  local dev mode_opt=() b cur
  for dev in "${WIPE_DEVS[@]}"; do step "wipe $dev (${DESC[$dev]})" wipe "$dev"; done
  WIPE_DEVS=()
  if [[ $BCACHE_STATE == create ]]; then
    [[ $TS_CACHE_MODE == writeback ]] && mode_opt=(--writeback)
    # make-bcache reports on stdout; stdout is for results only
    step "make-bcache -C $CACHE_DEV -B ${HDDS[*]}" make_bcache "${mode_opt[@]}" -C "$CACHE_DEV" -B "${HDDS[@]}"
    # udev (on a real host) registers the new devices by itself: let it finish before we look
    if [[ $ACTION == apply ]] && command -v udevadm >/dev/null; then udevadm settle || true; fi
    if [[ $ACTION == check ]]; then
      step "register the cache set and backing devices, set cache mode $TS_CACHE_MODE, mkfs.btrfs -d $WANT_D -m $WANT_M on the bcache devices, mount, fstab, subvolumes, quotas" true
      FS_STATE=planned
      return 0
    fi
    BCACHE_SET=$(bcache_sb "$CACHE_DEV" cset.uuid)
  fi
  # no udev here: register the cache first, then the backing devices (they attach to their set by its UUID)
  for dev in "$CACHE_DEV" "${HDDS[@]}"; do
    if [[ ! -e $(sysblk "$dev")/bcache ]]; then
      # register_quiet: no error when udev registered it in the meantime
      step "register $dev with bcache" write_sys /sys/fs/bcache/register_quiet "$dev"
      [[ $ACTION == check ]] && FS_STATE=planned
    fi
  done
  if [[ $FS_STATE == planned ]]; then
    step "then reconcile cache mode, the btrfs on the bcache devices, mount, fstab, subvolumes, quotas" true
    return 0
  fi
  wait_path present "/sys/fs/bcache/$BCACHE_SET" || die "cache set $BCACHE_SET did not appear after registering $CACHE_DEV"
  FS_DEVS=()
  for dev in "${HDDS[@]}"; do
    b=$(sysblk "$dev")/bcache
    wait_path present "$b" || die "$dev did not register with bcache ($b missing)"
    if [[ ! -e $b/cache ]]; then
      step "attach $dev to cache set $BCACHE_SET" write_sys "$b/attach" "$BCACHE_SET"
    fi
    if [[ $ACTION == check && ! -e $b/dev ]]; then
      step "then reconcile the btrfs on the bcache devices, mount, fstab, subvolumes, quotas" true
      FS_STATE=planned
      return 0
    fi
    wait_path present "$b/dev" || die "the bcache device of $dev did not appear ($b/dev)"
    cur=$(sed -n 's/.*\[\([a-z]*\)\].*/\1/p' "$b/cache_mode")
    if [[ $cur != "$TS_CACHE_MODE" ]]; then
      step "set cache mode of $dev from $cur to $TS_CACHE_MODE" write_sys "$b/cache_mode" "$TS_CACHE_MODE"
    fi
    [[ $ACTION == apply ]] && blockdev --flushbufs "$dev" # the kernel writes the superblock around the page cache
    if [[ $ACTION == apply ]] && [[ $(bcache_sb "$dev" dev.data.cache_mode) != *"[$TS_CACHE_MODE]"* ]]; then
      die "the bcache superblock of $dev does not record cache mode $TS_CACHE_MODE ($(bcache_sb "$dev" dev.data.cache_mode)): it would be lost at reboot"
    fi
    FS_DEVS+=("/dev/$(basename "$(readlink -f "$b/dev")")")
  done
}

# --------------------------------------------------------------------------------------------- actions
apply_or_check() {
  validate_inputs
  FS_DEVS=("${HDDS[@]}")
  if [[ -n $CACHE_DEV ]]; then
    require_bcache
    survey cache "$CACHE_DEV"
    survey data "${HDDS[@]}"
    warn_sizes "${HDDS[@]}"
    [[ " ${HDDS[*]} " != *" $CACHE_DEV "* ]] || PROBLEMS+=("the cache device $CACHE_DEV is also listed as a data device")
    refuse_if_problems
    decide_bcache
    refuse_if_problems
    bcache_converge
    if [[ $FS_STATE != planned ]]; then
      survey "bcache" "${FS_DEVS[@]}"
      decide_fs "${FS_DEVS[@]}"
    fi
  else
    survey data "${HDDS[@]}"
    warn_sizes "${HDDS[@]}"
    decide_fs "${FS_DEVS[@]}"
  fi
  [[ $FS_STATE == planned ]] || preflight_mount
  refuse_if_problems
  [[ $FS_STATE == planned ]] || fs_converge
  result uuid "${FS_UUID:-}"
  result label "$LABEL"
  result mountpoint "$MP"
  if [[ $ACTION == apply ]]; then
    result data_profile "$(profiles "$MP" Data)"
    result metadata_profile "$(profiles "$MP" Metadata System)"
  else
    result data_profile "$WANT_D"
    result metadata_profile "$WANT_M"
  fi
  result devices "${HDDS[*]}"
  result device_bytes "$(for dev in "${HDDS[@]}"; do printf '%s ' "${SIZE[$dev]:-0}"; done | sed 's/ $//')"
  result fs_devices "${FS_DEVS[*]}"
  if [[ -n $CACHE_DEV ]]; then
    result cache_device "$CACHE_DEV"
    result cache_set "$BCACHE_SET"
    result cache_mode "$TS_CACHE_MODE"
  fi
  if [[ $ACTION == check ]]; then
    result pending "$PENDING"
    for item in "${DRIFT_ITEMS[@]}"; do drift "$item" "$([[ -n ${DRIFT_SEEN[$item]:-} ]] && echo yes || echo no)"; done
  fi
  finish
}

destroy() {
  local dev fsids=() f src tmp b cset="" ours_hdds=()
  validate_inputs
  if [[ $TS_ALLOW_WIPE != 1 ]]; then
    refuse "storage is kept: the array '$LABEL' mounted at $MP and the data on devices ${HDDS[*]}${CACHE_DEV:+ (cache $CACHE_DEV)} are untouched. Wiping needs a test-rig stack (rig: true); to retire the array by hand: umount $MP, remove its $FSTAB line, wipefs -a the devices"
  fi
  FS_DEVS=()
  for dev in "${HDDS[@]}" ${CACHE_DEV:+"$CACHE_DEV"}; do
    if [[ ! -b $dev ]] || (($(blockdev --getsize64 "$dev") == 0)); then log "$dev is not present: skipped"; continue; fi
    KNAME[$dev]=$(kname "$dev")
    probe "$dev"
  done
  # bcache: our set = the cache device's set; its backing devices among ours carry the filesystem
  if [[ -n $CACHE_DEV && ${KIND[$CACHE_DEV]:-} == bcache ]]; then
    cset=$(bcache_sb "$CACHE_DEV" cset.uuid)
    for dev in "${HDDS[@]}"; do
      [[ ${KIND[$dev]:-} == bcache && $(bcache_sb "$dev" cset.uuid) == "$cset" ]] || continue
      ours_hdds+=("$dev")
      b=/sys/class/block/${KNAME[$dev]}/bcache/dev
      if [[ -e $b ]]; then
        FS_DEVS+=("/dev/$(basename "$(readlink -f "$b")")")
        KNAME[${FS_DEVS[-1]}]=$(basename "$(readlink -f "$b")")
        probe "${FS_DEVS[-1]}"
      fi
    done
    for dev in "${FS_DEVS[@]}"; do
      if [[ ${KIND[$dev]} != blank && ! (${KIND[$dev]} == btrfs && ${FSLABEL[$dev]} == "$LABEL") ]]; then
        refuse "the bcache device $dev of cache set $cset carries ${DESC[$dev]}, not the array '$LABEL': nothing was wiped"
      fi
    done
  else
    FS_DEVS=("${HDDS[@]}")
  fi
  for dev in "${FS_DEVS[@]}"; do
    [[ ${KIND[$dev]:-} == btrfs && ${FSLABEL[$dev]} == "$LABEL" ]] || continue
    [[ " ${fsids[*]} " == *" ${FSID[$dev]} "* ]] || fsids+=("${FSID[$dev]}")
  done
  # 1. unmount
  if mountpoint -q "$MP" 2>/dev/null && [[ " ${fsids[*]} " == *" $(mounted_fsid "$MP") "* ]]; then
    step "unmount $MP" umount "$MP"
  fi
  for f in "${fsids[@]}"; do
    [[ ! -e /sys/fs/btrfs/$f ]] || die "the array $f is still mounted elsewhere ($(findmnt -rn -t btrfs -o TARGET | paste -sd' ' -)): unmount it first; nothing was wiped"
  done
  # 2. fstab: our line at MP and every line mounting the array (it would fail at boot once wiped)
  if [[ -f $FSTAB ]]; then
    tmp=$(mktemp)
    awk -v mp="$MP" -v ids=" ${fsids[*]} " -v n="${#fsids[@]}" -v label="$LABEL" "$AWK_NORM"'
      NF && $1 !~ /^#/ {
        src = $1; gsub(/["\047]/, "", src); sub(/^UUID=/, "", src); sub(/^\/dev\/disk\/by-uuid\//, "", src)
        if ((n > 0 && index(ids, " " src " ")) || (norm($2) == mp && (src == "LABEL=" label))) next
      }
      { print }' "$FSTAB" >"$tmp"
    while read -r src; do
      [[ " ${fsids[*]} " == *" ${src#UUID=} "* ]] || log "keeping $FSTAB line for $src at $MP (not our array)"
    done < <(awk -v mp="$MP" "$AWK_NORM"' $1 !~ /^#/ && norm($2) == mp {print $1}' "$tmp")
    if ! cmp -s "$tmp" "$FSTAB"; then
      install_file "$tmp" "$FSTAB" "$(stat -c %a "$FSTAB")" "$(stat -c %U:%G "$FSTAB")"
      [[ $FSTAB == /etc/fstab && -d /run/systemd/system ]] && systemctl daemon-reload
    fi
    rm -f "$tmp"
  fi
  # 3. wipe the filesystem signatures, then (bcache) stop the devices and wipe their superblocks
  for dev in "${FS_DEVS[@]}"; do
    [[ ${KIND[$dev]:-} == btrfs && " ${fsids[*]} " == *" ${FSID[$dev]} "* ]] || continue
    step "wipe $dev (${DESC[$dev]})" wipe "$dev"
  done
  if [[ -n $cset ]]; then
    for dev in "${ours_hdds[@]}"; do
      b=/sys/class/block/${KNAME[$dev]}/bcache
      if [[ -e $b/stop ]]; then
        step "stop the bcache device of $dev" write_sys "$b/stop" 1
        wait_path absent "$b/stop" || die "the bcache device of $dev did not stop (is it still open?)"
      fi
    done
    if [[ -e /sys/fs/bcache/$cset/unregister ]]; then
      step "unregister cache set $cset" write_sys "/sys/fs/bcache/$cset/unregister" 1
      wait_path absent "/sys/fs/bcache/$cset" || die "cache set $cset did not unregister"
    fi
    for dev in "${ours_hdds[@]}" "$CACHE_DEV"; do step "wipe $dev (${DESC[$dev]})" wipe "$dev"; done
  fi
  result mountpoint "$MP"
  result devices "${HDDS[*]}"
  finish
}

case $ACTION in
  apply | check) apply_or_check ;;
  destroy) destroy ;;
esac
if [[ $ACTION == check ]] && ((PENDING == 0)); then log "nothing to do"; fi
