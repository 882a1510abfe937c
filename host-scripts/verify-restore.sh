#!/usr/bin/env bash
# Monthly restore verification: restore a random sample of files of the last backup into a scratch directory,
# compare their sha256 with the read-only snapshot that was backed up (kept by backup.sh), then
# `restic check --read-data-subset`. Any difference or damage -> exit 1 and train_server_task_success 0.
# Run by ts-verify-restore.timer.
# Inputs: TS_MOUNTPOINT, TS_RESTIC_REPOSITORY, TS_RESTIC_PASSWORD_FILE, TS_RCLONE_CONFIG, TS_STATE_DIR,
#   TS_TEXTFILE_DIR, TS_VERIFY_SAMPLE_FILES (number), TS_VERIFY_READ_DATA_SUBSET (e.g. "5%", "1/12", "100%").
source "${BASH_SOURCE[0]%/*}/lib.sh"
source "${BASH_SOURCE[0]%/*}/ops-lib.sh"
action=$(ts_action "${1:-}")
require_env TS_MOUNTPOINT TS_STATE_DIR TS_TEXTFILE_DIR TS_VERIFY_SAMPLE_FILES TS_VERIFY_READ_DATA_SUBSET
ops_restic_env
staging=$(ops_staging_dir)

case $action in
  check | destroy)
    log "nothing to $action (verification is a job: run with apply)"
    ;;
  apply)
    ops_start verify-restore
    id=$(cat "$TS_STATE_DIR/backup-last-snapshot" 2>/dev/null) || die "no backup recorded in $TS_STATE_DIR: run backup.sh first"
    [[ -d $staging ]] || die "the backed-up snapshot $staging is missing"
    # A sample of regular files whose names are safe as restic --include patterns (no glob characters).
    mapfile -d '' -t sample < <(find "$staging" -type f -print0 | grep -zv '[][*?\\]' |
      shuf -z -n "$TS_VERIFY_SAMPLE_FILES" || true)
    ((${#sample[@]})) || die "no file to verify in $staging"
    scratch=$(mktemp -d "$TS_MOUNTPOINT/.snapshots/.verify.XXXXXX")
    OPS_SCRATCH=$scratch # removed by ops_finish
    includes=()
    for f in "${sample[@]}"; do includes+=(--include "$f"); done
    restic restore "$id" --target "$scratch" "${includes[@]}" >&2
    mismatches=0
    for f in "${sample[@]}"; do
      if [[ ! -f $scratch$f ]] || [[ $(sha256sum <"$scratch$f") != "$(sha256sum <"$f")" ]]; then
        mismatches=$((mismatches + 1))
        log "MISMATCH: $f"
      fi
    done
    metric train_server_verify_files_compared "" "${#sample[@]}"
    metric train_server_verify_mismatches "" "$mismatches"
    result compared "${#sample[@]}"
    result mismatches "$mismatches"
    check_ok=1
    restic check --read-data-subset "$TS_VERIFY_READ_DATA_SUBSET" >&2 || check_ok=0
    metric train_server_verify_repository_ok "" "$check_ok"
    result repository_ok "$check_ok"
    ((mismatches == 0)) || die "$mismatches restored file(s) differ from snapshot $id"
    ((check_ok == 1)) || die "restic check found damage in $RESTIC_REPOSITORY"
    ;;
esac
finish
