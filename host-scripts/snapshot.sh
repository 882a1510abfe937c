#!/usr/bin/env bash
# Hourly read-only btrfs snapshots with btrbk (retention 24 hourly / 7 daily / 4 weekly lives in btrbk.conf,
# rendered by components/render/ops.ts). Run by ts-snapshot.timer.
# Inputs: TS_BTRBK_CONF (path), TS_MOUNTPOINT, TS_TEXTFILE_DIR.
# apply: `btrbk run` (create + retention); check: `btrbk dryrun`, changes nothing; destroy: nothing (snapshots
# are data: delete them by hand with `btrbk clean`/`btrfs subvolume delete` if you really mean it).
source "${BASH_SOURCE[0]%/*}/lib.sh"
source "${BASH_SOURCE[0]%/*}/ops-lib.sh"
action=$(ts_action "${1:-}")
require_env TS_BTRBK_CONF TS_MOUNTPOINT TS_TEXTFILE_DIR
[[ -f $TS_BTRBK_CONF ]] || die "btrbk config $TS_BTRBK_CONF is missing (ops-install.sh writes it)"

case $action in
  check)
    btrbk -c "$TS_BTRBK_CONF" dryrun >&2
    ;;
  destroy)
    log "snapshots are kept (they are data); nothing to do"
    ;;
  apply)
    ops_start snapshot
    mountpoint -q "$TS_MOUNTPOINT" || die "$TS_MOUNTPOINT is not mounted: no snapshot taken"
    # btrbk does not create its snapshot_dir (relative to the volume): without it every source is skipped
    while read -r dir; do
      [[ $dir != /* && $dir != *..* ]] || die "snapshot_dir '$dir' in $TS_BTRBK_CONF must be relative to the volume"
      [[ -d $TS_MOUNTPOINT/$dir ]] || { mkdir -p "$TS_MOUNTPOINT/$dir"; changed "created $TS_MOUNTPOINT/$dir"; }
    done < <(awk '$1 == "snapshot_dir" {print $2}' "$TS_BTRBK_CONF")
    btrbk -c "$TS_BTRBK_CONF" -q run >&2
    changed "btrbk run"
    for dir in "$TS_MOUNTPOINT"/.snapshots/*/; do
      [[ -d $dir && $(basename "$dir") != .* ]] || continue
      n=$(find "$dir" -mindepth 1 -maxdepth 1 -type d | wc -l)
      metric train_server_snapshots "group=\"$(basename "$dir")\"" "$n"
      result "snapshots.$(basename "$dir")" "$n"
    done
    ;;
esac
finish
