#!/usr/bin/env bash
# Data directories of the shared services, with the owner each container runs as.
# TS_DIRS: newline-separated records `path uid:gid mode` (paths under the array's docker-volumes).
# Never removes anything: a service's data outlives its container. check: drift.<directory name>=yes|no per record.
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "${BASH_SOURCE[0]%/*}/lib.sh"
action=$(ts_action "$@")
require_env TS_DIRS

if [[ $action == destroy ]]; then
  log "service data is kept (nothing to undo)"
  finish
  exit 0
fi

while read -r path owner mode; do
  [[ -n $path ]] || continue
  [[ $path == /* && $owner =~ ^[0-9]+:[0-9]+$ && $mode =~ ^[0-7]{3,4}$ ]] || die "bad TS_DIRS record: '$path $owner $mode'"
  parent=${path%/*}
  [[ -d $parent ]] || refuse "$parent does not exist: the array must be mounted before the services' data directories are made"
  if [[ $action == check ]]; then
    if [[ -d $path && $(stat -c '%a' "$path") == "${mode#0}" && $(stat -c '%u:%g' "$path") == "$owner" ]]; then
      drift "${path##*/}" no
    else
      log "would make $path $owner $mode"
      drift "${path##*/}" yes
    fi
    continue
  fi
  ensure_dir "$path" "$mode" "$owner"
done <<<"$TS_DIRS"
finish
