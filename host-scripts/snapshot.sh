#!/usr/bin/env bash
# Hourly read-only btrfs snapshots with btrbk (retention 24 hourly / 7 daily / 4 weekly lives in btrbk.conf,
# rendered by components/render/ops.ts). Run by ts-snapshot.timer.
# Inputs: TS_BTRBK_CONF (path), TS_MOUNTPOINT, TS_TEXTFILE_DIR.
# apply: `btrbk run` (create + retention); check: `btrbk dryrun`, changes nothing; destroy: nothing (snapshots
# are data: delete them by hand with `btrbk clean`/`btrfs subvolume delete` if you really mean it).
# Each user's home goes to a directory of its own (.snapshots/homes/<user>/, bind-mounted read-only into that user's
# workspace); a listed subvolume that does not exist yet is skipped; snapshots of the older shared layout are moved in.
source "${BASH_SOURCE[0]%/*}/lib.sh"
source "${BASH_SOURCE[0]%/*}/ops-lib.sh"
action=$(ts_action "${1:-}")
require_env TS_BTRBK_CONF TS_MOUNTPOINT TS_TEXTFILE_DIR
[[ -f $TS_BTRBK_CONF ]] || die "btrbk config $TS_BTRBK_CONF is missing (ops-install.sh writes it)"

# effective_conf: btrbk.conf without the subvolumes (no wildcard) that do not exist yet: a user's home listed before
# users.sh made it (the ops step runs first) is skipped, not an error that fails every other snapshot's run
effective_conf() { # FILE: where to write it
  awk -v mp="$TS_MOUNTPOINT" '
    $1 == "subvolume" { skip = ($2 !~ /\*/ && system("test -d \"" mp "/" $2 "\"") != 0); if (skip) print "skipped " $2 > "/dev/stderr" }
    $1 == "volume" { skip = 0 }
    !skip' "$TS_BTRBK_CONF" >"$1"
}

case $action in
  check)
    tmp=$(mktemp -d)
    effective_conf "$tmp/btrbk.conf"
    btrbk -c "$tmp/btrbk.conf" dryrun >&2 || { rm -rf "$tmp"; exit 1; }
    rm -rf "$tmp"
    ;;
  destroy)
    log "snapshots are kept (they are data); nothing to do"
    ;;
  apply)
    ops_start snapshot
    mountpoint -q "$TS_MOUNTPOINT" || die "$TS_MOUNTPOINT is not mounted: no snapshot taken"
    # btrbk does not create its snapshot_dir (relative to the volume): without it every source is skipped. Made
    # root-only (users.sh gives a user's own directory, .snapshots/homes/<user>, to that user's group).
    # A per-user dir (`subvolume homes/alice` -> `snapshot_dir .snapshots/homes/alice`) takes over the snapshots
    # btrbk made before in the group's dir (.snapshots/homes/alice.<stamp>, read-only): moved, never deleted.
    while read -r sub dir; do
      [[ $dir != /* && $dir != *..* ]] || die "snapshot_dir '$dir' in $TS_BTRBK_CONF must be relative to the volume"
      [[ -d $TS_MOUNTPOINT/$dir ]] || { (umask 077 && mkdir -p "$TS_MOUNTPOINT/$dir"); changed "created $TS_MOUNTPOINT/$dir"; }
      base=${sub##*/}
      [[ $sub != *'*'* && ${dir##*/} == "$base" ]] || continue
      for old in "$TS_MOUNTPOINT/${dir%/*}/$base".*; do
        [[ ${old##*/} =~ ^${base//./\.}\.[0-9]{8}T[0-9]{4}(_[0-9]+)?$ && -d $old && ! -L $old ]] || continue
        [[ $(stat -c %i "$old") == 256 && $(btrfs property get -ts "$old" ro) == ro=true ]] || continue
        # a read-only subvolume cannot change its parent directory (its '..'): writable for the move only
        [[ ! -e $TS_MOUNTPOINT/$dir/${old##*/} ]] || die "both $old and $TS_MOUNTPOINT/$dir/${old##*/} exist: move one aside"
        if ! { btrfs property set -ts "$old" ro false && mv -n "$old" "$TS_MOUNTPOINT/$dir/" &&
          btrfs property set -ts "$TS_MOUNTPOINT/$dir/${old##*/}" ro true; }; then
          die "could not move $old into $dir/ read-only"
        fi
        changed "moved ${old##*/} into $dir/"
      done
    done < <(awk '$1 == "subvolume" {s = $2} $1 == "snapshot_dir" {print s, $2}' "$TS_BTRBK_CONF")
    OPS_SCRATCH=$(mktemp -d) # removed by ops_finish
    effective_conf "$OPS_SCRATCH/btrbk.conf"
    btrbk -c "$OPS_SCRATCH/btrbk.conf" -q run >&2
    changed "btrbk run"
    for dir in "$TS_MOUNTPOINT"/.snapshots/*/; do
      [[ -d $dir && $(basename "$dir") != .* ]] || continue
      # snapshots (subvolume roots, inode 256) in the group's dir or in its per-user dirs
      n=$(find "$dir" -mindepth 1 -maxdepth 2 -type d -inum 256 -prune -print | wc -l)
      metric train_server_snapshots "group=\"$(basename "$dir")\"" "$n"
      result "snapshots.$(basename "$dir")" "$n"
    done
    ;;
esac
finish
