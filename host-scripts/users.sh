#!/usr/bin/env bash
# users.sh: the users' host accounts and their storage on the array (run after storage.sh).
#
# Inputs (environment):
#   TS_MOUNTPOINT    the mounted btrfs array, with subvolumes homes workspaces docker-volumes shared snapshots
#   TS_USERS         newline-separated records `name|uid|admin|quota_gb|authorized_keys_base64`
#                    (gid = uid; admin 0|1; quota_gb is soft: reported, never enforced; keys = base64 of the
#                    authorized_keys file, may be empty for "no key")
#   TS_STATE_DIR     where the list of accounts this script manages is kept (default /var/lib/train-server/state)
#   TS_SHARED_GROUP  group of the shared caches (default mlusers); TS_SHARED_GID its gid (default 2000)
#   TS_ALLOW_WIPE    1 lets `destroy` delete the accounts (test rigs); homes are never deleted by this script
#   TS_HOME_SNAPSHOTS_DIR  where btrbk keeps each user's home snapshots, one directory per user (default
#                    $TS_MOUNTPOINT/.snapshots/homes; components/render/ops.ts homeSnapshotDir)
#   TS_RESTORE_SPOOL the self-service restore's spool (default /var/lib/train-server/restore; restore-broker.sh)
#
# Per user: primary group <name> with gid=uid; account uid, shell /bin/bash, home $TS_MOUNTPOINT/homes/<name>
# (a subvolume, created once, 750), password field '*' (no password can ever match: key-only login, and unlike
# '!' it does not read as "locked" to an sshd running without PAM), groups docker + shared group (+ sudo if
# admin=1; removed when admin=0: users get sudo inside their workspace container, host sudo is for admins),
# ~/.ssh 700 and authorized_keys 600 with exactly the given keys, subvolumes workspaces/<name> and
# docker-volumes/<name> (750), $TS_MOUNTPOINT/shared/tensorboard/<name> (not chowned on a FUSE mount), and
# a level-1 qgroup 1/<uid> holding the three subvolumes (per-user totals in `btrfs qgroup show`, no limit).
# A user dropped from TS_USERS is archived: a read-only snapshot of the home in snapshots/archive/<name>-<UTC>,
# account locked + expired + nologin, out of docker/sudo/shared group, ~/.ssh/authorized_keys removed (the program
# wrote it; the archive keeps it). Nothing else is deleted; re-adding unlocks and writes the keys again.
# Each user's own snapshot directory <snapshots>/<name> (root:<name> 0750, under 0711 parents: reachable by path, never
# listed) and restore spool <spool>/<name> (root:<name> 0750) with requests/ (root:<name> 0770, the user writes) and
# results/ (root:<name> 0750, the broker writes): both are bind-mounted into that user's workspace, and no other user
# can list or open them, neither on the host nor from their own workspace.
# Accounts not in the state file are never changed; a name/uid clash with one is refused.
# Results: user.<name>.uid / .qgroup / .quota_gb / .status, archive.<name>=<path>, changes=N; check also
# drift.user.<name>.account / drift.user.<name>.authorized_keys = yes|no (the account or its keys differ from the config).
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "${BASH_SOURCE[0]%/*}/lib.sh"

ACTION=$(ts_action "${1:-}")
require_env TS_MOUNTPOINT 'TS_USERS?'
STATE_DIR=${TS_STATE_DIR:-/var/lib/train-server/state}
STATE=$STATE_DIR/users
SHARED_GROUP=${TS_SHARED_GROUP:-mlusers}
SHARED_GID=${TS_SHARED_GID:-2000}
MP=${TS_MOUNTPOINT%/}
NOLOGIN=$(command -v nologin || echo /usr/sbin/nologin)
SNAPS=${TS_HOME_SNAPSHOTS_DIR:-$MP/.snapshots/homes}
SPOOL=${TS_RESTORE_SPOOL:-/var/lib/train-server/restore}

# ---- state: lines `name|uid|status` (status active|archived) --------------------------------------------------
declare -A ST_UID=() ST_STATUS=()
load_state() {
  [[ -f $STATE ]] || return 0
  local name uid status
  # (|| [[ -n $name ]]: a last line without its newline, e.g. the adoption line added by hand, still counts)
  while IFS='|' read -r name uid status || [[ -n $name ]]; do
    [[ -n $name ]] || continue
    ST_UID[$name]=$uid
    ST_STATUS[$name]=$status
  done <"$STATE"
}
save_state() {
  local name tmp
  mkdir -p "$STATE_DIR"
  tmp=$(mktemp "$STATE_DIR/.users.XXXXXX")
  for name in "${!ST_UID[@]}"; do printf '%s|%s|%s\n' "$name" "${ST_UID[$name]}" "${ST_STATUS[$name]}"; done | sort >"$tmp"
  if cmp -s "$tmp" "$STATE"; then rm -f "$tmp"; else mv -f "$tmp" "$STATE"; fi
}

# ---- inputs -----------------------------------------------------------------------------------------------------
declare -a NAMES=()
declare -A U_UID=() U_ADMIN=() U_QUOTA=() U_KEYS=()
parse_users() {
  local line name uid admin quota keys rest
  declare -A seen_uid=()
  while IFS= read -r line; do
    line=${line%$'\r'}
    [[ -n ${line//[[:space:]]/} ]] || continue
    IFS='|' read -r name uid admin quota keys rest <<<"$line"
    [[ -z $rest ]] || die "TS_USERS: too many fields in the record for '$name' (want name|uid|admin|quota_gb|keys_base64)"
    [[ $name =~ ^[a-z_][a-z0-9_-]{0,31}$ ]] || die "TS_USERS: '$name' is not a valid login name"
    if ! [[ $uid =~ ^[0-9]{4,10}$ ]] || ((uid < 1000 || uid >= 4294967294 || uid == 65534)); then
      die "TS_USERS: uid '$uid' of $name must be a number >= 1000 (and not 65534)"
    fi
    [[ $admin == 0 || $admin == 1 ]] || die "TS_USERS: admin flag of $name must be 0 or 1 (got '$admin')"
    [[ $quota =~ ^[0-9]+$ ]] || die "TS_USERS: quota_gb of $name must be a whole number (got '$quota')"
    [[ -z ${U_UID[$name]+x} ]] || die "TS_USERS: user $name is listed twice"
    [[ -z ${seen_uid[$uid]+x} ]] || die "TS_USERS: uid $uid is given to both ${seen_uid[$uid]} and $name"
    printf '%s' "$keys" | base64 -d >/dev/null 2>&1 || die "TS_USERS: the authorized_keys of $name are not valid base64"
    seen_uid[$uid]=$name
    NAMES+=("$name")
    U_UID[$name]=$uid
    U_ADMIN[$name]=$admin
    U_QUOTA[$name]=$quota
    U_KEYS[$name]=$keys
  done <<<"$TS_USERS"
}

# ---- looking at the machine ---------------------------------------------------------------------------------------
is_subvolume() { [[ -d $1 && $(stat -f -c %T "$1") == btrfs && $(stat -c %i "$1") == 256 ]]; }
subvol_id() { btrfs inspect-internal rootid "$1"; }
passwd_field() { getent passwd "$1" | cut -d: -f"$2"; }
shadow_field() { getent shadow "$1" | cut -d: -f"$2"; }
in_group() { id -nG "$1" 2>/dev/null | tr ' ' '\n' | grep -qxF "$2"; }
# group_members GID [EXCEPT]: the supplementary members of a group but EXCEPT (comma-separated, may be empty)
group_members() { { getent group "$1" || true; } | cut -d: -f4 | tr ',' '\n' | { grep -vxF -e "${2:-}" -e '' || true; } | paste -sd, -; }
# qgroup_parents QGROUPID: the parents of a qgroup (comma-separated), from `btrfs qgroup show -p`
qgroup_parents() { btrfs qgroup show -p --raw "$MP" | awk -v q="$1" '$1 == q { print $4 }'; }
qgroup_exists() { btrfs qgroup show --raw "$MP" | awk -v q="$1" '$1 == q { f = 1 } END { exit !f }'; }

preflight() {
  mountpoint -q "$MP" || refuse "$MP is not mounted; run storage.sh first (users' homes live on the array)"
  [[ $(findmnt -n -o FSTYPE --target "$MP") == btrfs ]] || refuse "$MP is not btrfs; run storage.sh first"
  local sub
  for sub in homes workspaces docker-volumes shared snapshots; do
    [[ -d $MP/$sub ]] || refuse "$MP/$sub is missing; storage.sh creates it (run storage.sh apply)"
  done
  local name uid owner gowner path members others
  for name in "${NAMES[@]}"; do
    uid=${U_UID[$name]}
    if [[ -n ${ST_UID[$name]+x} && ${ST_UID[$name]} != "$uid" ]]; then
      refuse "user $name was created with uid ${ST_UID[$name]} but TS_USERS now says $uid; a uid change would orphan the files — keep uid ${ST_UID[$name]} in the config"
    fi
    owner=$(getent passwd "$uid" | cut -d: -f1 || true)
    if [[ -n $owner && $owner != "$name" ]]; then
      refuse "uid $uid of $name already belongs to account $owner; give $name another uid (slot) or remove $owner"
    fi
    if getent passwd "$name" >/dev/null; then
      [[ $(passwd_field "$name" 3) == "$uid" ]] \
        || refuse "account $name exists with uid $(passwd_field "$name" 3), not $uid; set uid $(passwd_field "$name" 3) for $name in the config or remove the account"
      [[ -n ${ST_UID[$name]+x} ]] \
        || refuse "account $name (uid $uid) exists but was not created by train-server; remove it, or adopt it by adding the line '$name|$uid|active' to $STATE"
    fi
    gowner=$(getent group "$uid" | cut -d: -f1 || true)
    if [[ -n $gowner && $gowner != "$name" ]]; then
      refuse "gid $uid (primary group of $name) already belongs to group $gowner; remove group $gowner or give $name another uid"
    fi
    if getent group "$name" >/dev/null && [[ $(getent group "$name" | cut -d: -f3) != "$uid" ]]; then
      refuse "group $name exists with gid $(getent group "$name" | cut -d: -f3), not $uid; remove group $name or give $name uid $(getent group "$name" | cut -d: -f3)"
    fi
    # the private group (gid = uid) owns the home (750): nobody else may be in it, or have it as primary group
    members=$(group_members "$uid" "$name")
    if [[ -n $gowner && -z ${ST_UID[$name]+x} ]]; then
      refuse "group $name (gid $uid) exists but was not created by train-server${members:+ (members: $members)}; it would become the private group of $name, which owns the home: remove it (groupdel $name) if it is a leftover, or give $name another name"
    fi
    if [[ -n $members ]]; then
      refuse "group $name (gid $uid, the private group that owns $name's home) has other members: $members; they would read $name's files: remove them (gpasswd -d <member> $name)"
    fi
    others=$(getent passwd | awk -F: -v g="$uid" -v n="$name" '$4 == g && $1 != n {print $1}' | paste -sd, -)
    if [[ -n $others ]]; then
      refuse "account(s) $others have gid $uid (the private group of $name, which owns the home) as primary group; they would read $name's files: give them another group (usermod -g <group> <account>)"
    fi
    for path in "$MP/homes/$name" "$MP/workspaces/$name" "$MP/docker-volumes/$name"; do
      if [[ -e $path || -L $path ]] && ! is_subvolume "$path"; then
        refuse "$path exists but is not a btrfs subvolume; move it aside (mv $path $path.old), rerun, then copy the data back (cp -a --reflink=always)"
      fi
      # a home left by someone else (another uid) is not adopted by a new account: it would get their files
      if [[ -e $path && -z ${ST_UID[$name]+x} && $(stat -c %u "$path") != "$uid" ]]; then
        refuse "$path exists, owned by uid $(stat -c %u "$path"), but $name (uid $uid) is not a train-server account yet: it holds someone else's data; move it aside, or give $name uid $(stat -c %u "$path") if it is theirs"
      fi
    done
    if [[ -L $MP/homes/$name/.ssh || (-e $MP/homes/$name/.ssh && ! -d $MP/homes/$name/.ssh) ]]; then
      refuse "$MP/homes/$name/.ssh is not a directory (a symlink?); remove it so that train-server can write the keys"
    fi
  done
  if getent group "$SHARED_GROUP" >/dev/null && [[ $(getent group "$SHARED_GROUP" | cut -d: -f3) != "$SHARED_GID" ]]; then
    refuse "group $SHARED_GROUP exists with gid $(getent group "$SHARED_GROUP" | cut -d: -f3), not $SHARED_GID; set TS_SHARED_GID to it"
  fi
}

# ---- converging -----------------------------------------------------------------------------------------------------
ensure_group() { # NAME [GID]
  getent group "$1" >/dev/null && return 0
  if [[ -n ${2:-} ]]; then groupadd -g "$2" "$1"; else groupadd -r "$1"; fi
  changed "created group $1"
}

ensure_subvolume() { # PATH MODE OWNER
  if [[ ! -e $1 ]]; then
    btrfs -q subvolume create "$1" >/dev/null
    changed "created subvolume $1"
  fi
  ensure_dir "$1" "$2" "$3"
}

ensure_qgroup() { # NAME UID
  local qg=1/$2 path id parents
  if ! qgroup_exists "$qg"; then
    btrfs qgroup create "$qg" "$MP"
    changed "created qgroup $qg for $1"
  fi
  for path in "$MP/homes/$1" "$MP/workspaces/$1" "$MP/docker-volumes/$1"; do
    id=$(subvol_id "$path")
    parents=$(qgroup_parents "0/$id")
    if [[ ",$parents," != *",$qg,"* ]]; then
      btrfs qgroup assign "0/$id" "$qg" "$MP" >&2
      changed "assigned $path (0/$id) to qgroup $qg"
    fi
  done
}

ensure_account() { # NAME
  local name=$1 uid=${U_UID[$1]} home=$MP/homes/$1 want_groups
  want_groups="docker,$SHARED_GROUP"
  if [[ ${U_ADMIN[$name]} == 1 ]]; then want_groups+=",sudo"; fi
  ensure_group "$name" "$uid"
  if ! getent passwd "$name" >/dev/null; then
    # no subordinate ids on the host: Docker's userns-remap (baseline.sh) holds 1000.. for the workspaces, so
    # useradd could not find a free range; a user's rootless Docker gets its range inside the workspace
    useradd -K SUB_UID_COUNT=0 -K SUB_GID_COUNT=0 -u "$uid" -g "$uid" -M -d "$home" -s /bin/bash -p '*' -G "$want_groups" "$name"
    changed "created account $name (uid $uid)"
  fi
  if [[ $(passwd_field "$name" 6) != "$home" ]]; then usermod -d "$home" "$name"; changed "home of $name"; fi
  if [[ $(passwd_field "$name" 7) != /bin/bash ]]; then usermod -s /bin/bash "$name"; changed "shell of $name"; fi
  if [[ $(passwd_field "$name" 4) != "$uid" ]]; then usermod -g "$uid" "$name"; changed "primary group of $name"; fi
  if [[ $(shadow_field "$name" 2) != '*' ]]; then usermod -p '*' "$name"; changed "no password for $name (key-only)"; fi
  if [[ -n $(shadow_field "$name" 8) ]]; then usermod -e '' "$name"; changed "unexpired $name"; fi
  local g
  for g in docker "$SHARED_GROUP"; do
    if ! in_group "$name" "$g"; then gpasswd -a "$name" "$g" >/dev/null; changed "$name joined $g"; fi
  done
  if [[ ${U_ADMIN[$name]} == 1 ]] && ! in_group "$name" sudo; then
    gpasswd -a "$name" sudo >/dev/null; changed "$name joined sudo (admin)"
  elif [[ ${U_ADMIN[$name]} == 0 ]] && in_group "$name" sudo; then
    gpasswd -d "$name" sudo >/dev/null; changed "$name left sudo (not an admin)"
  fi
}

ensure_keys() { # NAME
  local name=$1 home=$MP/homes/$1 keys
  ensure_dir "$home/.ssh" 700 "$name:$name"
  keys=$(mktemp)
  printf '%s' "${U_KEYS[$name]}" | base64 -d >"$keys"
  install_file "$keys" "$home/.ssh/authorized_keys" 600 "$name:$name"
  rm -f "$keys"
}

ensure_tensorboard() { # NAME
  local dir=$MP/shared/tensorboard fstype
  fstype=$(findmnt -n -o FSTYPE --target "$MP/shared")
  if [[ $fstype == fuse* ]]; then
    # rclone presents every file with one fixed owner: create, never chown/chmod
    if [[ ! -d $dir/$1 ]]; then mkdir -p "$dir/$1"; changed "created $dir/$1 (on $fstype)"; fi
  else
    ensure_dir "$dir" 755 root:root
    ensure_dir "$dir/$1" 755 "$1:$1"
  fi
}

ensure_own_dirs() { # NAME: the user's snapshot directory and restore spool (see the header)
  local name=$1 parent
  for parent in "$(dirname "$SNAPS")" "$SNAPS" "$SPOOL"; do
    [[ ! -L $parent ]] || refuse "$parent is a symlink; remove it (train-server keeps a directory there)"
    ensure_dir "$parent" 711 root:root
  done
  ensure_dir "$SNAPS/$name" 750 "root:$name"
  ensure_dir "$SPOOL/$name" 750 "root:$name"
  ensure_dir "$SPOOL/$name/requests" 770 "root:$name"
  ensure_dir "$SPOOL/$name/results" 750 "root:$name"
}

activate() { # NAME
  local name=$1 uid=${U_UID[$1]}
  if [[ ${ST_STATUS[$name]:-} != active ]]; then
    # recorded BEFORE the account exists, so that a run cut short still knows the account is ours
    ST_UID[$name]=$uid
    ST_STATUS[$name]=active
    save_state
  fi
  ensure_account "$name"
  ensure_subvolume "$MP/homes/$name" 750 "$name:$name"
  ensure_subvolume "$MP/workspaces/$name" 750 "$name:$name"
  ensure_subvolume "$MP/docker-volumes/$name" 750 "$name:$name"
  ensure_keys "$name"
  ensure_own_dirs "$name"
  ensure_tensorboard "$name"
  ensure_qgroup "$name" "$uid"
  result "user.$name.uid" "$uid"
  result "user.$name.qgroup" "1/$uid"
  result "user.$name.quota_gb" "${U_QUOTA[$name]}"
  result "user.$name.status" active
}

archive() { # NAME: snapshot the home once, lock the account; deletes nothing
  local name=$1 home=$MP/homes/$1 snap
  if [[ ${ST_STATUS[$name]} == active && -d $home ]]; then
    ensure_dir "$MP/snapshots/archive" 700 root:root
    snap=$MP/snapshots/archive/$name-$(date -u +%Y%m%dT%H%M%SZ)
    btrfs -q subvolume snapshot -r "$home" "$snap" >/dev/null
    changed "archived $home as read-only snapshot $snap"
    result "archive.$name" "$snap"
  fi
  if [[ ${ST_STATUS[$name]} != archived ]]; then
    ST_STATUS[$name]=archived
    save_state
  fi
  # the keys the program wrote go (the archive snapshot keeps the file; re-adding the user writes them again);
  # unlink never follows the last component, and a symlinked ~/.ssh is not entered
  local keys=$home/.ssh/authorized_keys
  if [[ -d $home/.ssh && ! -L $home/.ssh && ( -e $keys || -L $keys ) ]]; then
    rm -f "$keys"
    changed "removed the SSH keys of $name ($keys)"
  fi
  if getent passwd "$name" >/dev/null; then
    if [[ $(shadow_field "$name" 2) != '!'* ]]; then usermod -L "$name"; changed "locked $name"; fi
    if [[ $(shadow_field "$name" 8) != 1 ]]; then usermod -e 1 "$name"; changed "expired $name"; fi
    if [[ $(passwd_field "$name" 7) != "$NOLOGIN" ]]; then usermod -s "$NOLOGIN" "$name"; changed "shell of $name: nologin"; fi
    local g
    for g in docker sudo "$SHARED_GROUP"; do
      if in_group "$name" "$g"; then gpasswd -d "$name" "$g" >/dev/null; changed "$name left $g"; fi
    done
  fi
  result "user.$name.status" archived
}

# ---- check: what apply would change for an active user, named (drift.user.<name>.account / .authorized_keys) ------
account_as_declared() { # NAME: the account is what ensure_account makes
  local name=$1 uid=${U_UID[$1]} g sudo=0
  getent passwd "$name" >/dev/null || return 1
  [[ $(passwd_field "$name" 3) == "$uid" && $(passwd_field "$name" 4) == "$uid" && $(passwd_field "$name" 6) == "$MP/homes/$name" ]] || return 1
  [[ $(passwd_field "$name" 7) == /bin/bash && $(shadow_field "$name" 2) == '*' && -z $(shadow_field "$name" 8) ]] || return 1
  for g in docker "$SHARED_GROUP"; do in_group "$name" "$g" || return 1; done
  if in_group "$name" sudo; then sudo=1; fi
  [[ $sudo == "${U_ADMIN[$name]}" ]]
}
keys_as_declared() { # NAME: authorized_keys holds exactly the configured keys, 600, owned by the user
  local f=$MP/homes/$1/.ssh/authorized_keys
  [[ -f $f && $(stat -c '%a %U' "$f") == "600 $1" ]] && cmp -s "$f" <(printf '%s' "${U_KEYS[$1]}" | base64 -d)
}
check_user() { # NAME
  local name=$1 v
  v=no; account_as_declared "$name" || { v=yes; log "differs: account $name"; }
  drift "user.$name.account" "$v"
  v=no; keys_as_declared "$name" || { v=yes; log "differs: $MP/homes/$name/.ssh/authorized_keys"; }
  drift "user.$name.authorized_keys" "$v"
}

# ---- main -------------------------------------------------------------------------------------------------------------
mkdir -p "$STATE_DIR"
exec 9>"$STATE_DIR/.users.lock"
flock -w 60 9 || die "another users.sh run holds $STATE_DIR/.users.lock"
load_state
parse_users

case $ACTION in
  check)
    preflight
    for name in "${NAMES[@]}"; do
      if getent passwd "$name" >/dev/null; then result "user.$name.status" "${ST_STATUS[$name]:-unknown}"; else result "user.$name.status" missing; fi
      check_user "$name"
    done
    ;;
  apply)
    preflight
    ensure_group docker
    ensure_group "$SHARED_GROUP" "$SHARED_GID"
    if ! btrfs qgroup show "$MP" >/dev/null 2>&1; then
      btrfs quota enable "$MP"
      changed "enabled btrfs quotas on $MP (per-user usage reporting)"
    fi
    declare -A wanted=()
    for name in "${NAMES[@]}"; do wanted[$name]=1; activate "$name"; done
    for name in "${!ST_UID[@]}"; do
      [[ -n ${wanted[$name]+x} ]] || archive "$name"
    done
    ;;
  destroy)
    [[ ${TS_ALLOW_WIPE:-0} == 1 ]] \
      || refuse "users are never deleted by train-server (their homes hold their work); remove a user from the config to archive it, or use a test-rig stack (rig: true)"
    for name in "${!ST_UID[@]}"; do
      if getent passwd "$name" >/dev/null; then userdel "$name"; changed "deleted account $name (home kept on the array)"; fi
      if getent group "$name" >/dev/null; then groupdel "$name"; changed "deleted group $name"; fi
      unset "ST_UID[$name]" "ST_STATUS[$name]"
    done
    rm -f "$STATE"
    ;;
esac
finish
