#!/usr/bin/env bash
# Self-service restore from restic, for the users' `restore` command (images/workspace/restore.sh): the restic
# password and rclone config are root's and never enter a workspace, so a root job on the host answers requests.
# Run every minute by ts-restore.timer.
# Inputs: TS_MOUNTPOINT, TS_RESTORE_SPOOL, TS_RESTORE_USERS ("name:uid ..."), TS_RESTORE_MAX_MB, TS_RESTORE_TIMEOUT_S,
#   TS_RESTIC_REPOSITORY, TS_RESTIC_PASSWORD_FILE, TS_RCLONE_CONFIG, TS_STATE_DIR, TS_TEXTFILE_DIR.
#
# Spool (users.sh makes it; only <spool>/<name> is mounted into <name>'s workspace):
#   <spool>/<name>/requests/<id>.req   written by the user: key=value lines, at most 4 KiB
#       action=list                      the daily/weekly backups (time and id), newest first
#       action=restore                   path=<file or directory, relative to the home>
#                                        from=latest | YYYY-MM-DD | YYYY-MM-DDTHH:MM | YYYYMMDDTHHMM (the newest backup
#                                        at or before it, the host's local time)   in_place=0|1 (default 0)
#   <spool>/<name>/results/<id>.result  written here (root:<name> 0640): status=ok|refused|failed, message=..., and
#       restored=<path relative to the home>, bytes, snapshot, time; or backup=<time> <id> lines
# A request is taken out of the user's reach first (renamed into root's <spool>/<name>/.claimed/), then must be a
# regular file of the user with one link; the user's identity is the spool's, never a field. Only <home>/<path> of
# that user's backed-up home is restored (no '..', '.', '//', glob characters or control characters; at most
# TS_RESTORE_MAX_MB, within TS_RESTORE_TIMEOUT_S): restic writes into a root-only scratch directory on the array,
# the copy is handed to the user (owner, no setuid/setgid) and copied into the home AS THE USER (setpriv), into
# ~/restored/<backup time>/<path>, never over anything; with in_place=1 the current <path> is first moved aside to
# <path>.before-restore-<UTC>. A symlink on the way in the home is refused.
source "${BASH_SOURCE[0]%/*}/lib.sh"
source "${BASH_SOURCE[0]%/*}/ops-lib.sh"
action=$(ts_action "${1:-}")
ops_collector_only "$action"
require_env TS_MOUNTPOINT TS_RESTORE_SPOOL 'TS_RESTORE_USERS?' TS_RESTORE_MAX_MB TS_RESTORE_TIMEOUT_S TS_STATE_DIR TS_TEXTFILE_DIR
[[ $TS_RESTORE_MAX_MB =~ ^[1-9][0-9]*$ && $TS_RESTORE_TIMEOUT_S =~ ^[1-9][0-9]*$ ]] || die "TS_RESTORE_MAX_MB and TS_RESTORE_TIMEOUT_S must be whole numbers >= 1"
ops_start restore-broker
mkdir -p "$TS_STATE_DIR"
exec 9>"$TS_STATE_DIR/restore-broker.lock"
flock -n 9 || { log "another broker run is busy"; finish; exit 0; }
SPOOL=${TS_RESTORE_SPOOL%/}
STAGING=$(ops_staging_dir)
MAX_BYTES=$((TS_RESTORE_MAX_MB * 1024 * 1024))

# respond DIR ID LINES...: the answer, written atomically, readable by the user's group only
respond() {
  local dir=$1 id=$2 tmp
  shift 2
  tmp=$(mktemp "$dir/results/.$id.XXXXXX")
  printf '%s\n' "$@" >"$tmp"
  chown "root:$GID_" "$tmp"
  chmod 0640 "$tmp"
  mv -f "$tmp" "$dir/results/$id.result"
  log "$NAME_ request $id: ${1#status=}: ${2#message=}"
}

# valid_path P: a plain relative path inside the home (what restic's --include takes literally)
valid_path() {
  local p=$1 part
  [[ -n $p && ${#p} -le 1024 && $p != /* && $p != */ && $p != *//* ]] || return 1
  [[ $p != *[[:cntrl:]]* && $p != *[][*?\\]* ]] || return 1
  local IFS=/
  for part in $p; do [[ $part != . && $part != .. ]] || return 1; done
}

# cutoff FROM: the epoch second a backup must not be newer than ("" for latest)
cutoff() {
  case $1 in
    latest) printf '' ;;
    [0-9][0-9][0-9][0-9]-[0-9][0-9]-[0-9][0-9]) date -d "$1 23:59:59" +%s ;;
    [0-9][0-9][0-9][0-9]-[0-9][0-9]-[0-9][0-9]T[0-9][0-9]:[0-9][0-9]) date -d "${1/T/ }:59" +%s ;;
    [0-9][0-9][0-9][0-9][0-9][0-9][0-9][0-9]T[0-9][0-9][0-9][0-9])
      date -d "${1:0:4}-${1:4:2}-${1:6:2} ${1:9:2}:${1:11:2}:59" +%s ;;
    *) return 1 ;;
  esac
}

# backups: "epoch id time" of the daily/weekly backups (tag train-server), newest first
backups() {
  local id time
  restic snapshots --tag train-server --json | jq -r '.[] | "\(.short_id) \(.time)"' | while read -r id time; do
    printf '%s %s %s\n' "$(date -d "$time" +%s)" "$id" "$time"
  done | sort -rn
}

# as_user CMD...: run a command as the requesting user (their own permissions in their own home)
as_user() { timeout "$TS_RESTORE_TIMEOUT_S" setpriv --reuid="$UID_" --regid="$GID_" --clear-groups -- "$@"; }

do_restore() { # DIR ID PATH FROM IN_PLACE
  local dir=$1 id=$2 rel=$3 from=$4 in_place=$5 limit snap epoch time src bytes nodes scratch dest aside p stamp
  local home=$TS_MOUNTPOINT/homes/$NAME_
  limit=$(cutoff "$from") || { respond "$dir" "$id" status=refused "message=from '$from' is not latest, YYYY-MM-DD, YYYY-MM-DDTHH:MM or YYYYMMDDTHHMM"; return; }
  local list
  list=$(backups) || { respond "$dir" "$id" status=failed "message=the backup repository cannot be read now; try again later or ask an admin"; return; }
  while read -r epoch snap time; do
    [[ -n $epoch ]] || continue
    if [[ -z $limit ]] || ((epoch <= limit)); then break; fi
    snap=
  done <<<"$list"
  [[ -n ${snap:-} ]] || { respond "$dir" "$id" status=refused "message=no backup at or before $from (oldest: $(tail -n1 <<<"$list" | cut -d' ' -f3))"; return; }
  src=$STAGING/homes/$NAME_/$rel
  read -r nodes bytes < <(restic ls --json --recursive "$snap" "$src" |
    jq -rs '[.[] | select(.struct_type == "node")] | "\(length) \(map(select(.type == "file") | .size) | add // 0)"')
  ((${nodes:-0} > 0)) || { respond "$dir" "$id" status=refused "message=$rel is not in the backup of $time"; return; }
  ((bytes <= MAX_BYTES)) || { respond "$dir" "$id" status=refused "message=$rel is $bytes bytes in that backup, more than the $TS_RESTORE_MAX_MB MB a self-service restore may bring back; ask an admin"; return; }
  stamp=$(date -d "$time" +%Y%m%dT%H%M)
  if [[ $in_place == 1 ]]; then dest=$rel; else dest=restored/$stamp/$rel; fi
  # nothing on the way to the destination may be a symlink (the copy runs as the user anyway)
  p=$home
  [[ -d $home && ! -L $home ]] || { respond "$dir" "$id" status=failed "message=your home is not on the array; ask an admin"; return; }
  local part IFS=/
  for part in ${dest%/*}; do
    [[ $dest == */* ]] || break
    p+=/$part
    if [[ -L $p ]]; then unset IFS; respond "$dir" "$id" status=refused "message=${p#"$home"/} is a symlink; restore refuses to write through it"; return; fi
  done
  unset IFS
  if [[ -L $home/$dest ]] || { [[ $in_place == 0 && -e $home/$dest ]]; }; then
    respond "$dir" "$id" status=refused "message=~/$dest exists already; move it away and ask again"; return
  fi
  scratch=$(mktemp -d "$TS_MOUNTPOINT/.snapshots/.restore.XXXXXX") # root-only while restic writes
  if ! timeout "$TS_RESTORE_TIMEOUT_S" restic restore "$snap" --target "$scratch" --include "$src" >&2 || [[ ! -e $scratch$src && ! -L $scratch$src ]]; then
    rm -rf "$scratch"
    respond "$dir" "$id" status=failed "message=restic could not restore $rel from $time (or took longer than $TS_RESTORE_TIMEOUT_S s)"; return
  fi
  mv "$scratch$src" "$scratch/item"
  chown -hR "$UID_:$GID_" "$scratch/item"
  find "$scratch/item" -type f -perm /6000 -exec chmod ug-s {} +
  chmod -R u+rX "$scratch/item"
  chown "root:$GID_" "$scratch" && chmod 0750 "$scratch"
  aside=
  if [[ $in_place == 1 ]] && [[ -e $home/$dest || -L $home/$dest ]]; then
    aside=$dest.before-restore-$(date -u +%Y%m%dT%H%M%SZ)
    as_user mv -n -- "$home/$dest" "$home/$aside" || { rm -rf "$scratch"; respond "$dir" "$id" status=failed "message=could not move ~/$dest aside"; return; }
  fi
  # shellcheck disable=SC2016 # $1/$2 are expanded by the user's bash
  if ! as_user bash -c 'mkdir -p -- "${2%/*}" && cp -a --reflink=auto -- "$1" "$2"' restore "$scratch/item" "$home/$dest"; then
    rm -rf "$scratch"
    respond "$dir" "$id" status=failed "message=copying into ~/$dest failed (quota, permissions or time)"; return
  fi
  rm -rf "$scratch"
  changed "restored $NAME_'s $rel from $time ($snap) into ~/$dest"
  respond "$dir" "$id" status=ok "message=restored $rel from the backup of $time into ~/$dest${aside:+ (the previous one is ~/$aside)}" \
    "restored=$dest" "bytes=$bytes" "snapshot=$snap" "time=$time" ${aside:+"aside=$aside"}
}

do_list() { # DIR ID
  local list lines=() epoch id time
  list=$(backups) || { respond "$1" "$2" status=failed "message=the backup repository cannot be read now"; return; }
  while read -r epoch id time; do [[ -n $epoch ]] && lines+=("backup=$time $id"); done <<<"$list"
  respond "$1" "$2" status=ok "message=${#lines[@]} backup(s), newest first" "${lines[@]}"
}

handle() { # DIR FILE (a claimed request)
  local dir=$1 f=$2 id line key value action='' rel='' from='' in_place=0
  id=${f##*/}
  id=${id%.req}
  if [[ ! -f $f || -L $f || $(stat -c '%u %h' "$f") != "$UID_ 1" || $(stat -c %s "$f") -gt 4096 ]]; then
    respond "$dir" "$id" status=refused "message=a request must be a regular file of yours, at most 4 KiB"; return
  fi
  declare -A seen=()
  while IFS= read -r line || [[ -n $line ]]; do
    [[ -n $line ]] || continue
    key=${line%%=*} value=${line#*=}
    [[ $line == *=* && -z ${seen[$key]+x} ]] || { respond "$dir" "$id" status=refused "message=bad or repeated line in the request"; return; }
    seen[$key]=1
    case $key in
      action) action=$value ;;
      path) rel=$value ;;
      from) from=$value ;;
      in_place) in_place=$value ;;
      *) respond "$dir" "$id" status=refused "message=unknown field in the request (action, path, from, in_place)"; return ;;
    esac
  done <"$f"
  case $action in
    list) do_list "$dir" "$id" ;;
    restore)
      valid_path "$rel" || { respond "$dir" "$id" status=refused "message=path must be a file or directory inside your home, relative to it, without '.', '..', '//', '*?[]\\' or control characters"; return; }
      [[ $in_place == 0 || $in_place == 1 ]] || { respond "$dir" "$id" status=refused "message=in_place must be 0 or 1"; return; }
      do_restore "$dir" "$id" "$rel" "${from:-latest}" "$in_place"
      ;;
    *) respond "$dir" "$id" status=refused "message=action must be list or restore" ;;
  esac
}

ops_restic_env
read -ra entries <<<"${TS_RESTORE_USERS:-}"
handled=0
for entry in "${entries[@]}"; do
  NAME_=${entry%%:*} UID_=${entry#*:} GID_=${entry#*:}
  [[ $NAME_ =~ ^[a-z_][a-z0-9_-]{0,31}$ && $UID_ =~ ^[0-9]+$ ]] || die "TS_RESTORE_USERS: bad entry '$entry' (want name:uid)"
  dir=$SPOOL/$NAME_
  [[ -d $dir/requests && ! -L $dir && ! -L $dir/requests && -d $dir/results && ! -L $dir/results ]] || continue
  [[ $(stat -c %u "$dir") == 0 && $(stat -c %u "$dir/results") == 0 ]] || { log "$dir is not root's: skipped"; continue; }
  find "$dir/results" -maxdepth 1 -type f -name '*.result' -mtime +7 -delete
  for req in "$dir"/requests/*.req; do
    name=${req##*/}
    [[ $name =~ ^[A-Za-z0-9_-]{1,64}\.req$ ]] || continue
    [[ -e $req || -L $req ]] || continue
    install -d -m 0700 -o root -g root "$dir/.claimed"
    rm -rf "${dir:?}/.claimed/$name"
    mv -f "$req" "$dir/.claimed/$name" || continue # out of the user's reach from here on
    handle "$dir" "$dir/.claimed/$name"
    rm -rf "${dir:?}/.claimed/$name"
    handled=$((handled + 1))
  done
done
metric train_server_restore_requests "" "$handled"
result requests "$handled"
finish
