#!/usr/bin/env bash
# Daily bucket -> Drive data sync with rclone at a bandwidth limit. Run by ts-data-sync.timer.
# Inputs: TS_SYNC_SOURCE, TS_SYNC_DESTINATION (rclone remote:path), TS_SYNC_BWLIMIT (rclone --bwlimit, bytes/s
#   units, e.g. "20M"), TS_SYNC_MODE ("copy": never deletes at the destination; "sync": mirrors, deleting
#   files the source no longer has), TS_RCLONE_CONFIG (root-only file), TS_TEXTFILE_DIR.
source "${BASH_SOURCE[0]%/*}/lib.sh"
source "${BASH_SOURCE[0]%/*}/ops-lib.sh"
action=$(ts_action "${1:-}")
require_env TS_SYNC_SOURCE TS_SYNC_DESTINATION TS_SYNC_BWLIMIT TS_SYNC_MODE TS_RCLONE_CONFIG TS_TEXTFILE_DIR
# from here on a failed apply (a missing rclone config included) is recorded in the metrics (DataSyncFailed)
if [[ $action == apply ]]; then ops_start data-sync; fi
ops_secret_file "$TS_RCLONE_CONFIG"
export RCLONE_CONFIG=$TS_RCLONE_CONFIG
case $TS_SYNC_MODE in copy | sync) ;; *) die "TS_SYNC_MODE must be copy or sync (got '$TS_SYNC_MODE')" ;; esac

case $action in
  check)
    if rclone check --one-way "$TS_SYNC_SOURCE" "$TS_SYNC_DESTINATION" >&2; then result in_sync 1; else result in_sync 0; fi
    ;;
  destroy)
    log "nothing to destroy (the data stays in the Drive)"
    ;;
  apply)
    rclone "$TS_SYNC_MODE" "$TS_SYNC_SOURCE" "$TS_SYNC_DESTINATION" --bwlimit "$TS_SYNC_BWLIMIT" \
      --stats-one-line --stats 0 -v >&2 || die "rclone $TS_SYNC_MODE failed (exit $?)"
    changed "rclone $TS_SYNC_MODE $TS_SYNC_SOURCE -> $TS_SYNC_DESTINATION"
    ;;
esac
finish
