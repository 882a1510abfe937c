#!/usr/bin/env bash
# Workspace container entrypoint: make the user, set the password, prepare the programs, exec supervisord.
#
# Inputs (container environment; none secret; names mirror components/render/workspace-image.ts):
#   WORKSPACE_USER          login name (required)
#   WORKSPACE_UID           the user's stable host uid, 1000..59999 (required)
#   WORKSPACE_GID           primary gid (default: WORKSPACE_UID)
#   WORKSPACE_SHARED_GROUP  group of the shared /cache mounts (default mlusers), WORKSPACE_SHARED_GID (default 2000)
#   WORKSPACE_DESKTOP       the browser desktop's session: kde (default) or xfce (full image only)
# Mounts: /home/$WORKSPACE_USER (the user's home, owned by the uid), /var/lib/workspace (state: the user's rootless
#   Docker data root and SSH host keys), /run/secrets/workspace-password (0400/0600, one line), /workspace and /cache/* (optional);
#   the full image (it has the browser desktop) also needs /run/secrets/vnc-password (the same rules).
#
# The home is the user's: this script never writes, chowns or creates anything in it (no skeleton files either;
# shell defaults come from /etc/bash.bashrc and /etc/profile.d, so an empty home works). It refuses to start when
# the home or the state dir is not a mount (work would land in the container layer and be lost on replacement)
# or when the home belongs to another uid (a wrong mapping would show one user another's files).
# Idempotent: a restart (same container) or a replacement (new container, same mounts) gives the same result.
# The password is read from the file only, passed on stdin, never printed.
set -euo pipefail

PASSWORD_FILE=/run/secrets/workspace-password
VNC_PASSWORD_FILE=/run/secrets/vnc-password
DESKTOP_BIN=/usr/local/bin/workspace-desktop
STATE_DIR=/var/lib/workspace
RUN_DIR=/run/train-server

log() { printf '[workspace-entrypoint] %s\n' "$*" >&2; }
refuse() { printf '[workspace-entrypoint] REFUSED: %s\n' "$*" >&2; exit 3; }

# in_range N MIN MAX: N is a decimal integer (no sign, no leading zero) within MIN..MAX.
in_range() { [[ $1 =~ ^[1-9][0-9]{0,8}$ ]] && (($1 >= $2 && $1 <= $3)); }

check_inputs() {
  USER_NAME=${WORKSPACE_USER:-}
  USER_UID=${WORKSPACE_UID:-}
  USER_GID=${WORKSPACE_GID:-$USER_UID}
  SHARED_GROUP=${WORKSPACE_SHARED_GROUP:-mlusers}
  SHARED_GID=${WORKSPACE_SHARED_GID:-2000}
  HOME_DIR=/home/$USER_NAME
  [[ $USER_NAME =~ ^[a-z_][a-z0-9_-]{0,31}$ && $USER_NAME != root ]] \
    || refuse "WORKSPACE_USER '${USER_NAME}' is not a valid non-root login; set it to the user's name"
  if ! in_range "$USER_UID" 1000 59999; then
    refuse "WORKSPACE_UID '${USER_UID}' is not a uid in 1000..59999; set it to the user's host uid"
  fi
  in_range "$USER_GID" 1000 59999 || refuse "WORKSPACE_GID '${USER_GID}' is not a gid in 1000..59999"
  [[ $SHARED_GROUP =~ ^[a-z_][a-z0-9_-]{0,31}$ ]] || refuse "WORKSPACE_SHARED_GROUP '${SHARED_GROUP}' is not a group name"
  if ! in_range "$SHARED_GID" 100 59999 || [[ $SHARED_GID == "$USER_GID" ]]; then
    refuse "WORKSPACE_SHARED_GID '${SHARED_GID}' must be a gid in 100..59999 other than the user's"
  fi

  if [[ ! -d $HOME_DIR || -L $HOME_DIR ]] || ! mountpoint -q "$HOME_DIR"; then
    refuse "$HOME_DIR is not a mounted directory; bind-mount the user's home subvolume there"
  fi
  local owner
  owner=$(stat -c %u "$HOME_DIR")
  [[ $owner == "$USER_UID" ]] \
    || refuse "$HOME_DIR belongs to uid $owner, not WORKSPACE_UID $USER_UID; mount this user's own home or fix WORKSPACE_UID"
  if [[ ! -d $STATE_DIR ]] || ! mountpoint -q "$STATE_DIR"; then
    refuse "$STATE_DIR is not mounted; bind-mount the user's state volume there (docker data and SSH host keys)"
  fi

  check_secret_file "$PASSWORD_FILE" "the user's password file"
  if [[ -x $DESKTOP_BIN ]]; then
    [[ ${WORKSPACE_DESKTOP:-kde} =~ ^(kde|xfce)$ ]] \
      || refuse "WORKSPACE_DESKTOP '${WORKSPACE_DESKTOP}' is not kde or xfce; set stack config workspace.desktop"
    check_secret_file "$VNC_PASSWORD_FILE" "the user's VNC password file (browser desktop)"
  fi
}

# check_secret_file FILE WHAT: FILE is a non-empty one-line file no group or other can read.
check_secret_file() {
  local file=$1 what=$2 mode
  [[ -f $file && -s $file ]] || refuse "$file is missing or empty; mount $what there (read-only, mode 0400)"
  mode=$(stat -L -c %a "$file")
  (((8#$mode & 8#077) == 0)) || refuse "$file has mode $mode; make the host file 0400 (no group/other access)"
  (($(wc -l <"$file") <= 1)) || refuse "$file holds more than one line; it must hold only the password"
}

# ensure_group NAME GID: the group exists with exactly this gid.
ensure_group() {
  local name=$1 gid=$2 by_gid
  by_gid=$(getent group "$gid" | cut -d: -f1 || true)
  if getent group "$name" >/dev/null; then
    [[ $(getent group "$name" | cut -d: -f3) == "$gid" ]] \
      || refuse "group $name exists in the image with gid $(getent group "$name" | cut -d: -f3), not $gid; rename it in the Dockerfile"
  elif [[ -n $by_gid ]]; then
    refuse "gid $gid is group $by_gid in the image; it is needed for group $name (remove $by_gid from the image)"
  else
    groupadd -g "$gid" "$name"
    log "created group $name ($gid)"
  fi
}

ensure_user() {
  ensure_group "$USER_NAME" "$USER_GID"
  ensure_group "$SHARED_GROUP" "$SHARED_GID"
  # no docker group: the user's Docker daemon is their own rootless one (its socket is theirs)
  local groups=sudo,$SHARED_GROUP by_uid
  if getent passwd "$USER_NAME" >/dev/null; then
    [[ $(id -u "$USER_NAME") == "$USER_UID" ]] \
      || refuse "user $USER_NAME exists in the image with uid $(id -u "$USER_NAME"), not $USER_UID"
    [[ $(id -g "$USER_NAME") == "$USER_GID" ]] || usermod -g "$USER_GID" "$USER_NAME"
    usermod -a -G "$groups" "$USER_NAME"
  else
    by_uid=$(getent passwd "$USER_UID" | cut -d: -f1 || true)
    [[ -z $by_uid ]] || refuse "uid $USER_UID is account $by_uid in the image; remove it from the image"
    # -M: never create or populate the home (it is the user's mounted subvolume)
    useradd -M -d "$HOME_DIR" -s /bin/bash -u "$USER_UID" -g "$USER_GID" -G "$groups" "$USER_NAME"
    log "created user $USER_NAME ($USER_UID:$USER_GID), groups $groups"
  fi
}

set_password() {
  local pw
  pw=$(<"$PASSWORD_FILE")
  pw=${pw%$'\r'}
  [[ -n $pw ]] || refuse "$PASSWORD_FILE holds an empty password"
  # chpasswd reads user:password on stdin (printf is a builtin: nothing on any command line)
  printf '%s:%s\n' "$USER_NAME" "$pw" | chpasswd
  install -d -m 0755 "$RUN_DIR"
  if [[ -x /usr/bin/code-server ]]; then
    # code-server reads the password from its own config file (0600, the user's), not from the environment
    (umask 077 && printf 'auth: password\npassword: "%s"\ncert: false\n' "$(yaml_escape "$pw")" >"$RUN_DIR/code-server.yaml")
    chown "$USER_UID:$USER_GID" "$RUN_DIR/code-server.yaml"
  fi
  if [[ -x /opt/jupyter/bin/python ]]; then
    local hashed
    hashed=$(printf '%s' "$pw" | /opt/jupyter/bin/python -c 'import sys; from jupyter_server.auth import passwd; print(passwd(sys.stdin.read()))')
    (umask 077 && printf '{"PasswordIdentityProvider": {"hashed_password": "%s", "password_required": true}}\n' "$hashed" \
      >"$RUN_DIR/jupyter_server_config.json")
    chown "$USER_UID:$USER_GID" "$RUN_DIR/jupyter_server_config.json"
  fi
  log "password of $USER_NAME set from $PASSWORD_FILE"
}

# The browser desktop's VNC password, in the form Xvnc reads (-rfbauth), the user's own 0600 file outside the home.
set_vnc_password() {
  [[ -x $DESKTOP_BIN ]] || return 0
  (umask 077 && vncpasswd -f <"$VNC_PASSWORD_FILE" >"$RUN_DIR/vnc.passwd")
  chown "$USER_UID:$USER_GID" "$RUN_DIR/vnc.passwd"
  log "VNC password of $USER_NAME's browser desktop set from $VNC_PASSWORD_FILE"
}

# yaml_escape STRING: escape for a double-quoted YAML scalar.
yaml_escape() {
  local s=$1
  s=${s//\\/\\\\}
  s=${s//\"/\\\"}
  printf '%s' "$s"
}

# The user's subordinate ids for the rootless Docker daemon: 65536 ids from uid*65536 (uid 1000..59999 gives
# 65536000..3932159999): distinct for every user, above every real account, so the nested containers of two users
# never share a host id. The files are rewritten whole (the user is the only account with a range).
prepare_subids() {
  local start=$((USER_UID * 65536))
  printf '%s:%s:65536\n' "$USER_NAME" "$start" >/etc/subuid
  printf '%s:%s:65536\n' "$USER_NAME" "$start" >/etc/subgid
  chmod 0644 /etc/subuid /etc/subgid
}

# DOCKER_HOST=the user's rootless daemon, for every SSH/X2Go session (pam_env reads /etc/environment) and login shell.
docker_host_env() {
  local line="DOCKER_HOST=unix:///run/user/$USER_UID/docker.sock"
  grep -qx "$line" /etc/environment && return 0
  sed -i '/^DOCKER_HOST=/d' /etc/environment
  printf '%s\n' "$line" >>/etc/environment
}

prepare_state() {
  # the rootless daemon's data root is the user's; an older rootful data root (docker/) is left as it is
  install -d -o "$USER_UID" -g "$USER_GID" -m 0700 "$STATE_DIR/docker-rootless"
  install -d -o "$USER_UID" -g "$USER_GID" -m 0700 "$STATE_DIR/docker-rootless/config"
  # runtime state only (socket, pidfile, rootlesskit's dir): a restart starts clean, never from a stale pidfile
  rm -rf "/run/user/$USER_UID"
  install -d -m 0755 /run/user
  install -d -o "$USER_UID" -g "$USER_GID" -m 0700 "/run/user/$USER_UID"
  install -d -m 0700 "$STATE_DIR/ssh"
  local type
  for type in ed25519 rsa; do
    if [[ ! -s $STATE_DIR/ssh/ssh_host_${type}_key ]]; then
      rm -f "$STATE_DIR/ssh/ssh_host_${type}_key" "$STATE_DIR/ssh/ssh_host_${type}_key.pub"
      ssh-keygen -q -t "$type" -N '' -C "workspace-$USER_NAME" -f "$STATE_DIR/ssh/ssh_host_${type}_key"
      log "created SSH host key ($type) in $STATE_DIR/ssh"
    fi
  done
  install -d -m 0755 /run/sshd
}

main() {
  check_inputs
  ensure_user
  set_password
  set_vnc_password
  prepare_subids
  docker_host_env
  prepare_state
  set -a
  # shellcheck source-path=SCRIPTDIR source=cache.env
  . /etc/train-server/cache.env
  set +a
  export WORKSPACE_USER=$USER_NAME WORKSPACE_UID=$USER_UID DOCKER_HOST=unix:///run/user/$USER_UID/docker.sock
  log "starting supervisord for $USER_NAME"
  exec /usr/bin/supervisord -n -c /etc/supervisor/supervisord.conf
}

main "$@"
