#!/usr/bin/env bash
# Daily restic backup to the Drive, from a fresh read-only btrfs snapshot, then retention (forget --prune).
# Run by ts-backup.timer.
# Inputs: TS_MOUNTPOINT, TS_SNAPSHOT_SOURCES (space-separated, relative to the mountpoint, "*" allowed last, e.g.
#   "homes/* docker-volumes/*"), TS_RESTIC_REPOSITORY, TS_RESTIC_PASSWORD_FILE, TS_RCLONE_CONFIG (root-only files),
#   TS_BACKUP_LIMIT_UPLOAD_KIB (restic --limit-upload, KiB/s, 0 = unlimited), TS_BACKUP_KEEP_DAILY,
#   TS_BACKUP_KEEP_WEEKLY, TS_BACKUP_ARCHIVE_KEEP_YEARS (0 = forever), TS_STATE_DIR, TS_TEXTFILE_DIR.
# The snapshot backed up stays at <mountpoint>/.snapshots/.backup until the next backup (a stable path, so restic
# finds its parent snapshot and only reads changed files; verify-restore.sh compares restored files with it).
# The first run initialises the repository, but only when it provably does not exist yet.
# Archived homes (users.sh: <mountpoint>/snapshots/archive/<name>-<UTC>, read-only) are uploaded once each, with
# their own tags `train-server-archive` and `user=<name>` and the archive's time: the daily `forget --tag
# train-server` selects only snapshots tagged train-server, so it never sees them; they are forgotten only when
# older than TS_BACKUP_ARCHIVE_KEEP_YEARS (0: never). Their tree is the home itself (backed up as `.`), so
# `restic restore <id> --target <new home>` gives the home back.
source "${BASH_SOURCE[0]%/*}/lib.sh"
source "${BASH_SOURCE[0]%/*}/ops-lib.sh"
action=$(ts_action "${1:-}")
require_env TS_MOUNTPOINT TS_SNAPSHOT_SOURCES TS_BACKUP_LIMIT_UPLOAD_KIB TS_BACKUP_KEEP_DAILY TS_BACKUP_KEEP_WEEKLY \
  TS_BACKUP_ARCHIVE_KEEP_YEARS TS_STATE_DIR TS_TEXTFILE_DIR
[[ $TS_BACKUP_ARCHIVE_KEEP_YEARS =~ ^[0-9]+$ ]] || die "TS_BACKUP_ARCHIVE_KEEP_YEARS must be a whole number of years (0 = forever)"
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

ARCHIVE_TAG=train-server-archive
# archives: the archive snapshots of removed users' homes (name<TAB>path), read-only subvolumes only
archives() {
  local sv base
  shopt -s nullglob
  for sv in "$TS_MOUNTPOINT"/snapshots/archive/*; do
    base=${sv##*/}
    [[ $base =~ ^([a-z_][a-z0-9_-]*)-[0-9]{8}T[0-9]{6}Z$ ]] || continue
    [[ -d $sv && $(btrfs property get -ts "$sv" ro 2>/dev/null) == ro=true ]] || continue
    printf '%s\t%s\n' "${BASH_REMATCH[1]}" "$sv"
  done
  shopt -u nullglob
}

# upload_archives: every archive not in the repository yet, tagged with its user, at the time it was archived
upload_archives() {
  local have name sv stamp n=0
  have=$(restic snapshots --tag "$ARCHIVE_TAG" --json | jq -r '.[].paths[]')
  while IFS=$'\t' read -r name sv; do
    grep -qxF "$sv" <<<"$have" && continue
    stamp=${sv##*-}
    (cd "$sv" && restic backup --tag "$ARCHIVE_TAG" --tag "user=$name" \
      --time "${stamp:0:4}-${stamp:4:2}-${stamp:6:2} ${stamp:9:2}:${stamp:11:2}:${stamp:13:2}" . >&2) \
      || die "restic backup of the archive $sv failed"
    changed "archive of $name ($sv) uploaded to restic"
    n=$((n + 1))
  done < <(archives)
  result archives_uploaded "$n"
}

# expire_archives: forget archive snapshots older than TS_BACKUP_ARCHIVE_KEEP_YEARS (by their own time; never with 0)
expire_archives() {
  ((TS_BACKUP_ARCHIVE_KEEP_YEARS > 0)) || return 0
  local cutoff id time old=()
  cutoff=$(date -d "-$TS_BACKUP_ARCHIVE_KEEP_YEARS years" +%s)
  while read -r id time; do
    (($(date -d "$time" +%s) < cutoff)) && old+=("$id")
  done < <(restic snapshots --tag "$ARCHIVE_TAG" --json | jq -r '.[] | "\(.id) \(.time)"')
  if ((${#old[@]})); then
    restic forget "${old[@]}" >&2
    changed "forgot ${#old[@]} archive snapshot(s) older than $TS_BACKUP_ARCHIVE_KEEP_YEARS years"
  fi
}

case $action in
  check)
    result repository "$(repository_state)"
    result sources "$(sources | wc -l)"
    result archives "$(archives | wc -l)"
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

    upload_archives
    expire_archives
    # --tag train-server: only the daily backups (never the archives, tagged train-server-archive)
    restic forget --tag train-server --keep-daily "$TS_BACKUP_KEEP_DAILY" --keep-weekly "$TS_BACKUP_KEEP_WEEKLY" --prune >&2
    metric train_server_backup_snapshots "" "$(restic snapshots --tag train-server --json | jq length)"
    metric train_server_backup_archives "" "$(restic snapshots --tag "$ARCHIVE_TAG" --json | jq length)"
    ;;
esac
finish
