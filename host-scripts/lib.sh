# shellcheck shell=bash
# Shared helpers for train-server host scripts. Sourced, never run.
#
# Contract of every host script (see components/host.ts, which ships and runs them):
#   - invoked as `bash <script>.sh <action>` with action `apply` (converge), `check` (look, change nothing)
#     or `destroy` (undo what the script made, only where the stack allows it); `check` names what differs from
#     the declared state with `drift ITEM yes|no` (the daily drift check, host-scripts/drift-check.sh, exports it);
#   - inputs only from environment variables named TS_*; files rendered by the program arrive in
#     $TS_FILES_DIR (one file per rendered name);
#   - human-readable progress on stderr; machine-readable results on stdout as `key=value` lines, always
#     ending with `changes=N` (N = number of changes made; a second run of the same inputs prints 0);
#   - refusal = exit code 3 with a message naming the object and the fix, before anything is written.

set -euo pipefail

TS_CHANGES=0
TS_SCRIPT_NAME=${TS_SCRIPT_NAME:-$(basename "${BASH_SOURCE[1]:-$0}" .sh)}

log() { printf '[%s] %s\n' "$TS_SCRIPT_NAME" "$*" >&2; }

# die MESSAGE: a failure that is not a refusal (exit 1).
die() { printf '[%s] ERROR: %s\n' "$TS_SCRIPT_NAME" "$*" >&2; exit 1; }

# refuse MESSAGE: going on could lose data or break the host; nothing has been changed (exit 3).
refuse() { printf '[%s] REFUSED: %s\n' "$TS_SCRIPT_NAME" "$*" >&2; exit 3; }

# changed DESCRIPTION: record (and log) one change made to the host.
changed() { TS_CHANGES=$((TS_CHANGES + 1)); log "changed: $*"; }

# result KEY VALUE: one machine-readable result line on stdout.
result() { printf '%s=%s\n' "$1" "$2"; }

# drift ITEM yes|no: a check's verdict on one declared object (a rendered file, a line, a unit), as the result
# `drift.ITEM=yes|no` (yes = it differs from the declared state). ITEM names the file or object (A-Z a-z 0-9 . _ -,
# e.g. sshd.conf, fstab); host-scripts/drift-check.sh exports it as train_server_drift{step,item}.
drift() { result "drift.$1" "$2"; }

# finish: print the change count; call last.
finish() { result changes "$TS_CHANGES"; }

# require_env NAME...: every named variable must be set (may be empty only if listed with a trailing '?').
require_env() {
  local name optional
  for name in "$@"; do
    optional=0
    if [[ $name == *'?' ]]; then optional=1; name=${name%'?'}; fi
    if [[ -z ${!name+x} ]]; then
      die "environment variable $name is not set (the program passes it; when running by hand, export it)"
    fi
    if [[ $optional == 0 && -z ${!name} ]]; then
      die "environment variable $name is empty"
    fi
  done
}

# install_file SRC DEST MODE [OWNER[:GROUP]]: copy SRC to DEST only when the content, mode or owner differ.
# Writes atomically (temp file + rename). Returns 0; counts a change when it wrote.
install_file() {
  local src=$1 dest=$2 mode=$3 owner=${4:-root:root} tmp
  if [[ -f $dest ]] && cmp -s "$src" "$dest" \
    && [[ $(stat -c '%a' "$dest") == "${mode#0}" ]] \
    && [[ $(stat -c '%U:%G' "$dest") == "$owner" || $(stat -c '%u:%g' "$dest") == "$owner" ]]; then
    return 0
  fi
  mkdir -p "$(dirname "$dest")"
  tmp=$(mktemp "$(dirname "$dest")/.ts-install.XXXXXX")
  cat "$src" >"$tmp"
  chmod "$mode" "$tmp"
  chown "$owner" "$tmp"
  mv -f "$tmp" "$dest"
  changed "wrote $dest"
}

# install_content DEST MODE OWNER <<<CONTENT: like install_file, from stdin.
install_content() {
  local dest=$1 mode=$2 owner=${3:-root:root} src
  src=$(mktemp)
  cat >"$src"
  install_file "$src" "$dest" "$mode" "$owner"
  rm -f "$src"
}

# ensure_dir PATH MODE OWNER[:GROUP]: directory exists with exactly this mode and owner.
ensure_dir() {
  local path=$1 mode=$2 owner=$3
  if [[ ! -d $path ]]; then
    mkdir -p "$path"
    changed "created directory $path"
  fi
  if [[ $(stat -c '%a' "$path") != "${mode#0}" ]]; then
    chmod "$mode" "$path"
    changed "mode $mode on $path"
  fi
  if [[ $(stat -c '%u:%g' "$path") != "$owner" && $(stat -c '%U:%G' "$path") != "$owner" ]]; then
    chown "$owner" "$path"
    changed "owner $owner on $path"
  fi
}

# ts_action "$@": the action argument, validated.
ts_action() {
  local action=${1:-}
  case $action in
    apply | check | destroy) printf '%s' "$action" ;;
    *) die "usage: $0 apply|check|destroy (got '${action}')" ;;
  esac
}
