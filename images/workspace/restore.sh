#!/usr/bin/env bash
# restore: bring back a file or directory of your home from a snapshot (hourly/daily/weekly, read-only in
# /snapshots) or, for older dates, from the host's daily/weekly backups (restic, asked through the restore spool).
# Installed as /usr/local/bin/restore in the workspace image; runs as the user, needs no admin and no secret.
# Environment (defaults are the workspace's contract, components/render/workspace-image.ts):
#   RESTORE_SNAPSHOTS (/snapshots), RESTORE_SPOOL (/run/train-server-restore), HOME, USER.
set -euo pipefail

SNAPS=${RESTORE_SNAPSHOTS:-/snapshots}
SPOOL=${RESTORE_SPOOL:-/run/train-server-restore}
HOME_DIR=${HOME:?HOME is not set}
HOME_DIR=${HOME_DIR%/}
STAMP_RE='^[0-9]{8}T[0-9]{4}(_[0-9]+)?$'

usage() {
  cat <<USAGE
Usage:
  restore --list [PATH]       your home's snapshots, newest first (with PATH: only those holding it)
  restore --backups           the host's daily/weekly backups, newest first (older than the snapshots)
  restore PATH --from WHEN [--in-place] [--wait SECONDS]
                              bring PATH (a file or directory of your home) back from WHEN:
                                a snapshot as --list shows it, e.g. 20261201T1400 (instant, from $SNAPS)
                                a backup: latest, 2026-11-03 (the newest of that day or before), 2026-11-03T14:00
                              into ~/restored/<WHEN>/PATH: nothing of yours is overwritten. With --in-place it goes
                              back to PATH itself, and what is there now is first moved to PATH.before-restore-<time>.
                              A backup restore is done by the host (up to a few minutes; --wait, default 900 s).
  restore --help

Only your own home: your snapshots are the only ones in $SNAPS, and the host restores only your files.
Exit status: 0 done, 1 failed, 2 usage, 3 refused (the message says why), 4 no answer from the host yet.
USAGE
}

die() { printf 'restore: %s\n' "$*" >&2; exit "${2:-1}"; }
usage_error() { printf 'restore: %s (see restore --help)\n' "$*" >&2; exit 2; }

# relpath PATH: PATH relative to the home (as typed, or inside a snapshot), lexically; refuses anything else
relpath() {
  local abs
  abs=$(realpath -ms -- "$1")
  if [[ $abs == "$SNAPS"/* ]]; then # a path inside a snapshot means the same path in the home
    abs=${abs#"$SNAPS"/}
    [[ $abs == */* ]] || usage_error "name a file or directory inside the snapshot, not the snapshot itself"
    abs=$HOME_DIR/${abs#*/}
  fi
  [[ $abs == "$HOME_DIR"/* ]] || usage_error "$1 is not inside your home ($HOME_DIR)"
  printf '%s' "${abs#"$HOME_DIR"/}"
}

# snapshots: the stamps of your snapshots, newest first
snapshots() {
  local s
  [[ -d $SNAPS ]] || return 0
  for s in "$SNAPS"/*; do
    s=${s##*/}
    [[ ${s#*.} =~ $STAMP_RE ]] && printf '%s\n' "${s#*.}"
  done | sort -r
}
snapshot_dir() { # STAMP: its directory (there is one per stamp in your own snapshot dir)
  local d
  for d in "$SNAPS"/*."$1"; do [[ -d $d ]] && { printf '%s' "$d"; return 0; }; done
  return 1
}
pretty() { printf '%s-%s-%s %s:%s' "${1:0:4}" "${1:4:2}" "${1:6:2}" "${1:9:2}" "${1:11:2}"; }

list() { # [REL]
  local s n=0
  while read -r s; do
    [[ -n $s ]] || continue
    if [[ -n ${1:-} ]]; then
      local d
      d=$(snapshot_dir "$s")
      [[ -e $d/$1 || -L $d/$1 ]] || continue
    fi
    printf '%s  %s\n' "$s" "$(pretty "$s")"
    n=$((n + 1))
  done < <(snapshots)
  ((n)) || printf 'no snapshot%s in %s (older dates: restore --backups)\n' "${1:+ holds $1}" "$SNAPS" >&2
}

# ask ACTION [KEY=VALUE...]: write a request into the spool, wait for the host's answer, print it
ask() {
  [[ -d $SPOOL/requests && -w $SPOOL/requests ]] || die "the restore spool $SPOOL is not mounted in this workspace; ask an admin"
  local id tmp result waited=0 status
  id=$(date -u +%Y%m%dT%H%M%S)-$$-$RANDOM
  tmp=$SPOOL/requests/.$id.tmp
  printf '%s\n' "action=$1" "${@:2}" >"$tmp"
  mv -f "$tmp" "$SPOOL/requests/$id.req"
  result=$SPOOL/results/$id.result
  printf 'restore: asked the host (request %s); waiting up to %s s...\n' "$id" "$WAIT" >&2
  while [[ ! -f $result ]]; do
    ((waited < WAIT)) || die "no answer yet from the host; it will be in $result (the host answers every minute)" 4
    sleep 2
    waited=$((waited + 2))
  done
  status=$(sed -n 's/^status=//p' "$result")
  sed -n 's/^message=//p' "$result"
  sed -n 's/^backup=/  /p' "$result"
  case $status in ok) return 0 ;; refused) exit 3 ;; *) exit 1 ;; esac
}

from_snapshot() { # REL STAMP IN_PLACE
  local rel=$1 stamp=$2 src dest aside
  src=$(snapshot_dir "$stamp")/$rel
  [[ -e $src || -L $src ]] || die "$rel is not in snapshot $stamp (restore --list $rel shows the snapshots that hold it)" 3
  if [[ $3 == 1 ]]; then dest=$HOME_DIR/$rel; else dest=$HOME_DIR/restored/$stamp/$rel; fi
  if [[ $3 == 1 && ( -e $dest || -L $dest ) ]]; then
    aside=$dest.before-restore-$(date -u +%Y%m%dT%H%M%SZ)
    mv -n -- "$dest" "$aside"
  elif [[ -e $dest || -L $dest ]]; then
    die "${dest/#"$HOME_DIR"/\~} exists already; move it away and run restore again" 3
  fi
  mkdir -p -- "$(dirname -- "$dest")"
  cp -a --reflink=auto -- "$src" "$dest"
  printf 'restored %s from snapshot %s into %s%s\n' "$rel" "$(pretty "$stamp")" "${dest/#"$HOME_DIR"/\~}" "${aside:+ (the previous one is ${aside/#"$HOME_DIR"/\~})}"
}

WAIT=900
action='' path='' from='' in_place=0
while (($#)); do
  case $1 in
    -h | --help) usage; exit 0 ;;
    --list) action=list ;;
    --backups) action=backups ;;
    --from) [[ $# -ge 2 ]] || usage_error "--from needs a time"; from=$2; shift ;;
    --in-place) in_place=1 ;;
    --wait) [[ ${2:-} =~ ^[0-9]+$ ]] || usage_error "--wait needs a number of seconds"; WAIT=$2; shift ;;
    -*) usage_error "unknown option $1" ;;
    *) [[ -z $path ]] || usage_error "one PATH at a time"; path=$1 ;;
  esac
  shift
done

case $action in
  list) list "${path:+$(relpath "$path")}" ;;
  backups) ask list ;;
  '')
    [[ -n $path ]] || { usage >&2; exit 2; }
    [[ -n $from ]] || usage_error "say from when: --from <snapshot or date> (restore --list, restore --backups)"
    rel=$(relpath "$path")
    if [[ $from =~ $STAMP_RE ]] && snapshot_dir "$from" >/dev/null; then
      from_snapshot "$rel" "$from" "$in_place"
    else
      ask restore "path=$rel" "from=$from" "in_place=$in_place"
    fi
    ;;
esac
