#!/usr/bin/env bash
# Monthly btrfs scrub of the array. `btrfs scrub start -B` exits 0 even after correcting errors, so the outcome
# is read from its raw counters and from `btrfs device stats -c` (exit 64 on any error counter).
# Run by ts-scrub.timer. Inputs: TS_MOUNTPOINT, TS_TEXTFILE_DIR.
# Metrics: train_server_btrfs_scrub_errors{type} (read, csum, verify, super, uncorrectable, corrected).
# Outcome: fails (task_success 0) when this scrub found any error, corrected ones included (a disk going bad),
# or when `btrfs device stats` counts any error. Those counters are cumulative and this job never resets them:
# after an error every later run fails too (while its scrub_errors go back to 0) until the admin has checked the
# disk and run `btrfs device stats -z <mountpoint>`.
source "${BASH_SOURCE[0]%/*}/lib.sh"
source "${BASH_SOURCE[0]%/*}/ops-lib.sh"
action=$(ts_action "${1:-}")
require_env TS_MOUNTPOINT TS_TEXTFILE_DIR

case $action in
  check)
    btrfs scrub status "$TS_MOUNTPOINT" >&2
    ;;
  destroy)
    log "nothing to destroy"
    ;;
  apply)
    ops_start scrub
    mountpoint -q "$TS_MOUNTPOINT" || die "$TS_MOUNTPOINT is not mounted"
    rc=0
    out=$(btrfs scrub start -B -R "$TS_MOUNTPOINT" 2>&1) || rc=$?
    printf '%s\n' "$out" >&2
    total=0
    for type in read csum verify super uncorrectable corrected; do
      n=$(awk -v k="${type}_errors:" '$1 == k {s += $2} END {print s + 0}' <<<"$out")
      metric train_server_btrfs_scrub_errors "type=\"$type\"" "$n"
      result "scrub_${type}_errors" "$n"
      total=$((total + n))
    done
    stats_rc=0
    btrfs device stats -c "$TS_MOUNTPOINT" >&2 || stats_rc=$?
    result device_stats_rc "$stats_rc"
    ((rc == 0)) || die "btrfs scrub exited $rc"
    ((total == 0)) || die "scrub found $total error(s) (see train_server_btrfs_scrub_errors)"
    ((stats_rc == 0)) || die "btrfs device stats reports errors (exit $stats_rc); once the disk is checked: btrfs device stats -z $TS_MOUNTPOINT"
    ;;
esac
finish
