#!/usr/bin/env bash
# Daily restic backup to the Drive, from a fresh read-only btrfs snapshot, then retention (forget --prune).
# Run by ts-backup.timer.
# Inputs: TS_MOUNTPOINT, TS_SNAPSHOT_SOURCES (space-separated, relative to the mountpoint, "*" allowed last, e.g.
#   "homes/* docker-volumes/*"), TS_RESTIC_REPOSITORY, TS_RESTIC_PASSWORD_FILE, TS_RCLONE_CONFIG (root-only files),
#   TS_BACKUP_LIMIT_UPLOAD_KIB (restic --limit-upload, KiB/s, 0 = unlimited), TS_BACKUP_KEEP_DAILY,
#   TS_BACKUP_KEEP_WEEKLY, TS_STATE_DIR, TS_TEXTFILE_DIR.
# The snapshot backed up stays at <mountpoint>/.snapshots/.backup until the next backup (a stable path, so restic
# finds its parent snapshot and only reads changed files; verify-restore.sh compares restored files with it).
# The first run initialises the repository, but only when it provably does not exist yet.
source "${BASH_SOURCE[0]%/*}/lib.sh"
source "${BASH_SOURCE[0]%/*}/ops-lib.sh"
action=$(ts_action "${1:-}")
require_env TS_MOUNTPOINT TS_SNAPSHOT_SOURCES TS_BACKUP_LIMIT_UPLOAD_KIB TS_BACKUP_KEEP_DAILY TS_BACKUP_KEEP_WEEKLY \
  TS_STATE_DIR TS_TEXTFILE_DIR
ops_restic_env
staging=$(ops_staging_dir)

# repository_state: "ok" (restic opens it), "absent" (its location provably does not exist), else "unknown".
repository_state() {
  if restic cat config >/dev/null 2>&1; then echo ok; return; fi
  local rc=0
  if [[ $RESTIC_REPOSITORY == rclone:* ]]; then
    rclone lsf --max-depth 1 "${RESTIC_REPOSITORY#rclone:}" >/dev/null 2>&1 || rc=$?
    if [[ $rc == 3 ]]; then echo absent; else echo unknown; fi # rclone exit 3 = directory not found
  elif [[ $RESTIC_REPOSITORY == /* && ! -e $RESTIC_REPOSITORY ]]; then
    echo absent
  else
    echo unknown
  fi
}

# The subvolumes to back up: each source pattern expanded under the mountpoint.
sources() {
  local pattern p patterns
  read -ra patterns <<<"$TS_SNAPSHOT_SOURCES" # split without globbing against the current directory
  shopt -s nullglob
  for pattern in "${patterns[@]}"; do
    for p in "$TS_MOUNTPOINT"/$pattern; do
      [[ -d $p ]] && btrfs subvolume show "$p" >/dev/null 2>&1 && printf '%s\n' "${p#"$TS_MOUNTPOINT"/}"
    done
  done
  shopt -u nullglob
}

case $action in
  check)
    result repository "$(repository_state)"
    result sources "$(sources | wc -l)"
    ;;
  destroy)
    log "the repository and its snapshots are kept; nothing to do"
    ;;
  apply)
    ops_start backup
    mountpoint -q "$TS_MOUNTPOINT" || die "$TS_MOUNTPOINT is not mounted"
    mkdir -p "$TS_STATE_DIR"
    case $(repository_state) in
      ok) ;;
      absent)
        restic init >&2
        changed "initialised restic repository $RESTIC_REPOSITORY"
        ;;
      *) die "cannot open restic repository $RESTIC_REPOSITORY (and it is not provably absent): not initialising" ;;
    esac
    mapfile -t subvols < <(sources)
    ((${#subvols[@]})) || die "no subvolume matches TS_SNAPSHOT_SOURCES='$TS_SNAPSHOT_SOURCES' under $TS_MOUNTPOINT"

    # Replace the previous staging snapshots (only read-only snapshots under the staging dir are deleted).
    if [[ -d $staging ]]; then
      # subvolume roots have inode 256 on btrfs; -prune: do not walk the snapshots' contents
      while IFS= read -r -d '' sv; do
        [[ $(btrfs property get -ts "$sv" ro) == ro=true ]] || die "$sv is not a read-only snapshot: not deleting it"
        btrfs subvolume delete -c "$sv" >&2
      done < <(find "$staging" -mindepth 1 -type d -inum 256 -prune -print0)
      find "$staging" -mindepth 1 -depth -type d -empty -delete
    fi
    for sv in "${subvols[@]}"; do
      mkdir -p "$(dirname "$staging/$sv")"
      btrfs subvolume snapshot -r "$TS_MOUNTPOINT/$sv" "$staging/$sv" >&2
    done
    changed "read-only snapshot of ${#subvols[@]} subvolume(s) at $staging"

    limit=()
    ((TS_BACKUP_LIMIT_UPLOAD_KIB > 0)) && limit=(--limit-upload "$TS_BACKUP_LIMIT_UPLOAD_KIB")
    summary=$(cd "$staging" && restic backup "${limit[@]}" --tag train-server --json "$staging" |
      jq -c 'select(.message_type == "summary")') || die "restic backup failed (exit $?; 3 = some files could not be read)"
    [[ -n $summary ]] || die "restic printed no summary"
    id=$(jq -r .snapshot_id <<<"$summary")
    printf '%s\n' "$id" >"$TS_STATE_DIR/backup-last-snapshot"
    changed "restic snapshot $id"
    for k in files_new files_changed files_unmodified data_added total_files_processed total_bytes_processed total_duration; do
      v=$(jq -r ".$k" <<<"$summary")
      metric "train_server_backup_${k}" "" "$v"
      result "$k" "$v"
    done
    result snapshot_id "$id"

    restic forget --tag train-server --keep-daily "$TS_BACKUP_KEEP_DAILY" --keep-weekly "$TS_BACKUP_KEEP_WEEKLY" --prune >&2
    metric train_server_backup_snapshots "" "$(restic snapshots --tag train-server --json | jq length)"
    ;;
esac
finish
