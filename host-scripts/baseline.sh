#!/usr/bin/env bash
# baseline.sh: the host's baseline — sshd hardening, UFW, fail2ban, Docker on the array (+ NVIDIA toolkit),
# shared cache directories, the workspaces' slice (their memory protection). Runs after storage.sh (the array is mounted) and users.sh.
#
# Inputs (environment):
#   TS_MOUNTPOINT       the mounted btrfs array
#   TS_SSH_PORT         the host's sshd port (must equal the Port in sshd.conf: a guard against a stale render)
#   TS_SSH_ADMIN_USER   the admin's login: it must have a non-empty ~/.ssh/authorized_keys, or the script refuses
#                       (keys-only sshd + firewall would lock the admin out)
#   TS_GPU_COUNT        > 0: install the NVIDIA container toolkit (NVIDIA's apt repository)
#   TS_SHARED_GROUP     group owning the shared caches (default mlusers), TS_SHARED_GID its gid (default 2000)
#   TS_FILES_DIR        files rendered by components/render/baseline.ts: sshd.conf fail2ban-jail.conf daemon.json
#                       docker-service.conf ufw-rules ufw-docker-user.rules trainws.slice subid-dockremap
#                       apparmor-train-server-workspace
#                       [GPU hosts: nvidia-container-toolkit.list nvidia-dev-char.rules ts-nvidia-dev-char.service]
#   (the LAN CIDR and the users' ports reach the host only through the rendered ufw files)
#   TS_ALLOW_WIPE=1     lets `destroy` remove the files this script installed (test rigs)
#
# UFW is owned by train-server: rules in ufw-rules are added, any other UFW rule is deleted. Workspace ports are
# published by Docker, whose DNAT bypasses UFW's INPUT rules: they are filtered in DOCKER-USER by a block in
# /etc/ufw/after.rules. Docker's data-root (from daemon.json) is a btrfs subvolume created here when missing.
# Services are reloaded/restarted only when their files changed, after validation.
# trainws.slice (every workspace's cgroupParent) carries MemoryLow = the users' pool: a changed value is applied to
# the running slice with `systemctl set-property --runtime` (nothing restarts). Guarantees need cgroup v2 with
# memory_recursiveprot (systemd >= 248 mounts it so); apply remounts /sys/fs/cgroup with it when missing.
# GPU hosts: /dev/char links of the NVIDIA device nodes (nvidia-ctk), made before anything here runs a
# daemon-reload, again by a udev rule whenever the driver binds and by ts-nvidia-dev-char.service at boot: with them
# a daemon-reload keeps the workspaces' GPUs (NVIDIA/nvidia-container-toolkit#48).
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "${BASH_SOURCE[0]%/*}/lib.sh"

ACTION=$(ts_action "${1:-}")
require_env TS_MOUNTPOINT TS_SSH_PORT TS_SSH_ADMIN_USER TS_FILES_DIR 'TS_GPU_COUNT?'
MP=${TS_MOUNTPOINT%/}
F=${TS_FILES_DIR%/}
GPU=${TS_GPU_COUNT:-0}
SHARED_GROUP=${TS_SHARED_GROUP:-mlusers}
SHARED_GID=${TS_SHARED_GID:-2000}
CACHES=(pip conda huggingface torch apt go npm docker)
export DEBIAN_FRONTEND=noninteractive

SSHD_DROPIN=/etc/ssh/sshd_config.d/10-train-server.conf
F2B_JAIL=/etc/fail2ban/jail.d/train-server.conf
DAEMON_JSON=/etc/docker/daemon.json
DOCKER_DROPIN=/etc/systemd/system/docker.service.d/10-train-server.conf
UFW_AFTER=/etc/ufw/after.rules
SLICE=trainws.slice
SLICE_UNIT=/etc/systemd/system/$SLICE
CGROUP=/sys/fs/cgroup
NV_LIST=/etc/apt/sources.list.d/nvidia-container-toolkit.list
NV_KEYRING=/usr/share/keyrings/nvidia-container-toolkit-keyring.gpg
NV_RULE=/etc/udev/rules.d/71-nvidia-dev-char.rules
NV_UNIT=/etc/systemd/system/ts-nvidia-dev-char.service
REMAP_USER=dockremap
AA_PROFILE=train-server-workspace
AA_FILE=/etc/apparmor.d/$AA_PROFILE
BEGIN_MARK='# BEGIN train-server DOCKER-USER'
END_MARK='# END train-server DOCKER-USER'

slice_low() { sed -n 's/^MemoryLow=//p' "$1"; }
cgroup2() { [[ $(stat -fc %T "$CGROUP" 2>/dev/null) == cgroup2fs ]]; }
recursiveprot() { findmnt -n -o OPTIONS "$CGROUP" | tr , '\n' | grep -qx memory_recursiveprot; }
# the slice's MemoryLow as the kernel has it (cgroup v2) or as systemd has it (no v2 memory controller)
live_low() {
  if [[ -r $CGROUP/$SLICE/memory.low ]]; then
    local v
    v=$(cat "$CGROUP/$SLICE/memory.low")
    if [[ $v == max ]]; then echo infinity; else echo "$v"; fi
  else
    systemctl show -p MemoryLow --value "$SLICE"
  fi
}
installed() { [[ $(dpkg-query -W -f='${db:Status-Status}' "$1" 2>/dev/null) == installed ]]; }
data_root() { python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["data-root"])' "$F/daemon.json"; }
# install_tracked SRC DEST MODE: install_file; returns 0 when it wrote (changed), 1 when already identical
install_tracked() {
  local before=$TS_CHANGES
  install_file "$1" "$2" "$3"
  ((TS_CHANGES > before))
}
# restore DEST BACKUP: put back the previous content (or remove DEST when there was none)
restore() { if [[ -f $2 ]]; then cp -p "$2" "$1"; else rm -f "$1"; fi; }

preflight() {
  local f
  for f in sshd.conf fail2ban-jail.conf daemon.json docker-service.conf ufw-rules ufw-docker-user.rules $SLICE subid-$REMAP_USER apparmor-$AA_PROFILE; do
    [[ -f $F/$f ]] || die "rendered file $F/$f is missing (components/render/baseline.ts renders it)"
  done
  if ((GPU > 0)); then
    for f in nvidia-container-toolkit.list nvidia-dev-char.rules ts-nvidia-dev-char.service; do
      [[ -f $F/$f ]] || die "rendered file $F/$f is missing"
    done
  fi
  grep -qx "Port $TS_SSH_PORT" "$F/sshd.conf" || die "sshd.conf does not set Port $TS_SSH_PORT (TS_SSH_PORT): stale render"
  grep -q "port $TS_SSH_PORT proto tcp\$" "$F/ufw-rules" \
    || refuse "ufw-rules does not allow the SSH port $TS_SSH_PORT; enabling the firewall would lock everyone out — fix the render"
  if grep -q "['\"]" "$F/ufw-rules"; then die "ufw-rules must not contain quotes (one plain ufw rule per line)"; fi
  if ! mountpoint -q "$MP" || [[ $(findmnt -n -o FSTYPE --target "$MP") != btrfs ]]; then
    refuse "$MP is not a mounted btrfs array; run storage.sh first (Docker's data and the caches live there)"
  fi
  local root keys low ram
  low=$(slice_low "$F/$SLICE")
  [[ $low =~ ^[0-9]+$ ]] || die "$SLICE has no MemoryLow=<bytes>: stale render"
  ram=$(($(awk '$1 == "MemTotal:" { print $2 }' /proc/meminfo) * 1024))
  ((low <= ram)) || refuse "the workspace slice would protect $low bytes but this host has $ram bytes of RAM: host.ramGb - host.reservedRamGb is more than the host has; set host.ramGb to the host's RAM"
  root=$(data_root) || die "daemon.json has no data-root"
  [[ $root == "$MP"/* ]] || refuse "Docker's data-root $root is not on the array $MP; fix the render"
  [[ $TS_SSH_ADMIN_USER != root ]] || refuse "TS_SSH_ADMIN_USER is root, but root login is disabled; name the admin's own account"
  getent passwd "$TS_SSH_ADMIN_USER" >/dev/null \
    || refuse "admin account $TS_SSH_ADMIN_USER does not exist; create it with a key before locking sshd down to keys only"
  keys=$(getent passwd "$TS_SSH_ADMIN_USER" | cut -d: -f6)/.ssh/authorized_keys
  grep -qE '^(ssh-|ecdsa-|sk-)' "$keys" 2>/dev/null \
    || refuse "$keys has no key; sshd will accept keys only — add the admin's public key first"
}

packages() {
  local want=(openssh-server ufw fail2ban python3-systemd acl iptables) missing=() p
  # apparmor_parser loads the workspaces' profile (apparmor_profile)
  if apparmor_enabled; then want+=(apparmor); fi
  installed docker.io || installed docker-ce || want+=(docker.io)
  if ((GPU > 0)); then want+=(curl gpg ca-certificates); fi
  for p in "${want[@]}"; do installed "$p" || missing+=("$p"); done
  if ((${#missing[@]})); then
    log "installing ${missing[*]}"
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
    changed "installed ${missing[*]}"
  fi
  if ((GPU > 0)); then
    if [[ ! -s $NV_KEYRING ]]; then
      curl -fsSL https://nvidia.github.io/libnvidia-container/gpgkey | gpg --dearmor --yes -o "$NV_KEYRING"
      changed "NVIDIA apt keyring $NV_KEYRING"
    fi
    install_file "$F/nvidia-container-toolkit.list" "$NV_LIST" 644
    if ! installed nvidia-container-toolkit; then
      apt-get update -qq
      apt-get install -y -qq --no-install-recommends nvidia-container-toolkit >&2
      changed "installed nvidia-container-toolkit"
    fi
    command -v nvidia-container-runtime >/dev/null || die "nvidia-container-runtime is missing after installing the toolkit"
  fi
}

sshd_baseline() {
  local backup out
  backup=$(mktemp)
  if [[ -f $SSHD_DROPIN ]]; then cp -p "$SSHD_DROPIN" "$backup"; else rm -f "$backup"; fi
  mkdir -p /run/sshd
  if install_tracked "$F/sshd.conf" "$SSHD_DROPIN" 644; then
    if ! out=$(sshd -t 2>&1); then
      restore "$SSHD_DROPIN" "$backup"
      die "sshd rejects the new configuration (previous one restored; sshd not reloaded): $out"
    fi
    local effective want
    effective=$(sshd -T)
    for want in "port $TS_SSH_PORT" "passwordauthentication no" "permitrootlogin no" "kbdinteractiveauthentication no"; do
      grep -qx "$want" <<<"$effective" || {
        restore "$SSHD_DROPIN" "$backup"
        die "sshd's effective setting is not '$want': a file read earlier (sshd_config or sshd_config.d/0*) overrides it; remove that line"
      }
    done
    if systemctl is-enabled -q ssh.socket 2>/dev/null; then
      # Ubuntu 24.04: socket-activated; the port comes from a generator that reads sshd_config
      systemctl daemon-reload
      systemctl restart ssh.socket
    else
      systemctl reload-or-restart ssh
    fi
    log "sshd reloaded"
  fi
  rm -f "$backup"
  if ! systemctl is-enabled -q ssh.socket 2>/dev/null && ! systemctl is-enabled -q ssh 2>/dev/null; then
    systemctl enable --now ssh
    changed "enabled ssh"
  fi
}

fail2ban_baseline() {
  local backup
  backup=$(mktemp)
  if [[ -f $F2B_JAIL ]]; then cp -p "$F2B_JAIL" "$backup"; else rm -f "$backup"; fi
  if install_tracked "$F/fail2ban-jail.conf" "$F2B_JAIL" 644; then
    if ! fail2ban-client -t >&2; then
      restore "$F2B_JAIL" "$backup"
      die "fail2ban rejects the new jail (previous one restored)"
    fi
    systemctl restart fail2ban
    log "fail2ban restarted"
  elif ! systemctl is-active -q fail2ban; then
    systemctl restart fail2ban
    changed "started fail2ban"
  fi
  rm -f "$backup"
  if ! systemctl is-enabled -q fail2ban; then systemctl enable fail2ban; changed "enabled fail2ban"; fi
}

# the remap user's lines in /etc/subuid or /etc/subgid, or nothing
subid_lines() { grep "^$REMAP_USER:" "$1" 2>/dev/null || true; }
apparmor_enabled() { [[ $(cat /sys/module/apparmor/parameters/enabled 2>/dev/null) == Y ]]; }

# The workspaces' AppArmor profile (components/render/workspace-security.ts); Docker refuses to start a workspace
# naming it on an AppArmor host where it is not loaded. Without AppArmor there is nothing to load.
apparmor_profile() {
  if ! apparmor_enabled; then
    log "AppArmor is not enabled on this host: profile $AA_PROFILE not loaded (the workspaces rely on the user-namespace remapping and seccomp)"
    return 0
  fi
  apparmor_parser -Q -K "$F/apparmor-$AA_PROFILE" || die "apparmor_parser rejects apparmor-$AA_PROFILE"
  if install_tracked "$F/apparmor-$AA_PROFILE" "$AA_FILE" 644 || ! grep -q "^$AA_PROFILE (enforce)" /sys/kernel/security/apparmor/profiles; then
    apparmor_parser -r -W "$AA_FILE"
    changed "loaded AppArmor profile $AA_PROFILE"
  fi
}

docker_baseline() {
  local root restart=0 tmp f
  root=$(data_root)
  # userns-remap (daemon.json): the remap user and exactly its subordinate ids, before dockerd reads them at start
  if ! getent passwd "$REMAP_USER" >/dev/null; then
    useradd -r -M -s /usr/sbin/nologin "$REMAP_USER"
    changed "created user $REMAP_USER (Docker's user-namespace remapping)"
  fi
  for f in /etc/subuid /etc/subgid; do
    if [[ $(subid_lines "$f") != "$(cat "$F/subid-$REMAP_USER")" ]]; then
      tmp=$(mktemp)
      { grep -v "^$REMAP_USER:" "$f" 2>/dev/null || true; cat "$F/subid-$REMAP_USER"; } >"$tmp"
      install_file "$tmp" "$f" 644
      rm -f "$tmp"
      restart=1
    fi
  done
  if [[ ! -e $root ]]; then
    btrfs -q subvolume create "$root" >/dev/null
    chmod 710 "$root"
    changed "created subvolume $root (Docker's data-root)"
  fi
  # (with userns-remap dockerd itself gives the remapped root's group access to it; its parents are 755)
  if dockerd --help 2>&1 | grep -q -- '--validate'; then
    dockerd --validate --config-file "$F/daemon.json" >&2 || die "dockerd rejects daemon.json"
  else
    python3 -m json.tool "$F/daemon.json" >/dev/null || die "daemon.json is not JSON"
  fi
  if install_tracked "$F/docker-service.conf" "$DOCKER_DROPIN" 644; then
    systemctl daemon-reload
    restart=1
  fi
  # turning userns-remap on moves Docker to a new data root: running containers would be orphaned by live-restore;
  # they are stopped first (with the workspaces' grace) and the next `up` recreates them from the new root
  if [[ -f $DAEMON_JSON ]] && ! grep -q '"userns-remap"' "$DAEMON_JSON" && grep -q '"userns-remap"' "$F/daemon.json" \
    && systemctl is-active -q docker; then
    log "enabling userns-remap: stopping every container before Docker moves to its remapped data root"
    docker ps -q | xargs -r docker stop -t 120 >&2
  fi
  if install_tracked "$F/daemon.json" "$DAEMON_JSON" 644; then restart=1; fi
  if ((restart)) || ! systemctl is-active -q docker; then
    # live-restore (daemon.json) keeps the workspaces running across this restart
    systemctl restart docker
    log "docker restarted"
    ((restart)) || changed "started docker"
  fi
  if ! systemctl is-enabled -q docker; then systemctl enable docker; changed "enabled docker"; fi
  tmp=$(docker info --format '{{.Driver}} {{.DockerRootDir}}')
  # with userns-remap the daemon keeps its data in <data-root>/<uid>.<gid> of the remapped root
  [[ $tmp == "btrfs $root" || $tmp =~ ^btrfs\ $root/[0-9]+\.[0-9]+$ ]] || die "docker runs with '$tmp', expected 'btrfs $root'"
  # the program's Docker provider (ssh://admin@host) talks to the daemon's socket as the admin
  if ! id -nG "$TS_SSH_ADMIN_USER" | tr ' ' '\n' | grep -qx docker; then
    usermod -aG docker "$TS_SSH_ADMIN_USER"
    changed "added $TS_SSH_ADMIN_USER to the docker group (the Docker provider connects as it)"
  fi
}

nvidia_dev_char() {
  ((GPU > 0)) || return 0
  local before after
  # the links first: the daemon-reloads below must not be the one that strips a running workspace's GPUs
  before=$(find /dev/char -maxdepth 1 -type l 2>/dev/null | sort)
  nvidia-ctk system create-dev-char-symlinks --create-all >&2 || die "nvidia-ctk could not create the /dev/char links of the NVIDIA devices (is the driver loaded? nvidia-smi)"
  after=$(find /dev/char -maxdepth 1 -type l 2>/dev/null | sort)
  if [[ $before != "$after" ]]; then changed "created the /dev/char links of the NVIDIA device nodes"; fi
  if install_tracked "$F/nvidia-dev-char.rules" "$NV_RULE" 644; then udevadm control --reload; fi
  if install_tracked "$F/ts-nvidia-dev-char.service" "$NV_UNIT" 644; then systemctl daemon-reload; fi
  if ! systemctl is-enabled -q ts-nvidia-dev-char.service; then systemctl enable ts-nvidia-dev-char.service; changed "enabled ts-nvidia-dev-char.service"; fi
}

workspace_slice() {
  local low
  low=$(slice_low "$F/$SLICE")
  local wrote=0
  if install_tracked "$F/$SLICE" "$SLICE_UNIT" 644; then systemctl daemon-reload; wrote=1; fi
  if ! systemctl is-active -q "$SLICE"; then systemctl start "$SLICE"; changed "started $SLICE"; fi
  if ((wrote)) || [[ $(live_low) != "$low" ]]; then
    # the running slice takes the value now (the unit file keeps it for the next boot); nothing restarts, and
    # every workspace keeps its own memory.low
    systemctl set-property --runtime "$SLICE" MemoryLow="$low"
    [[ $(live_low) == "$low" ]] || die "$SLICE has MemoryLow=$(live_low) after set-property, expected $low"
    changed "$SLICE MemoryLow=$low (applied live)"
  fi
  if ! cgroup2; then
    log "warning: $CGROUP is not a cgroup v2 hierarchy: memory guarantees are not enforced on this host"
  elif ! recursiveprot; then
    # processes in a workspace's child cgroups (its own init, nested containers) are protected only with it
    mount -o remount,memory_recursiveprot "$CGROUP" \
      || refuse "cannot remount $CGROUP with memory_recursiveprot (needed for the workspaces' guarantees); boot with systemd >= 248"
    changed "remounted $CGROUP with memory_recursiveprot"
  fi
}

# the DOCKER-USER block in after.rules, or nothing
current_block() { sed -n "\\|^$BEGIN_MARK\$|,\\|^$END_MARK\$|p" "$UFW_AFTER"; }

ufw_baseline() {
  local reload=0 rule tmp
  if ! grep -qx 'DEFAULT_INPUT_POLICY="DROP"' /etc/default/ufw; then ufw default deny incoming >&2; changed "ufw: deny incoming"; fi
  if ! grep -qx 'DEFAULT_OUTPUT_POLICY="ACCEPT"' /etc/default/ufw; then ufw default allow outgoing >&2; changed "ufw: allow outgoing"; fi

  if [[ $(current_block) != "$(cat "$F/ufw-docker-user.rules")" ]]; then
    iptables-restore --test --noflush <"$F/ufw-docker-user.rules" || die "iptables rejects ufw-docker-user.rules"
    tmp=$(mktemp)
    sed "\\|^$BEGIN_MARK\$|,\\|^$END_MARK\$|d" "$UFW_AFTER" >"$tmp"
    cat "$F/ufw-docker-user.rules" >>"$tmp"
    install_file "$tmp" "$UFW_AFTER" 640
    rm -f "$tmp"
    reload=1
  fi

  local -A want_rule=() have_rule=()
  while IFS= read -r rule; do [[ -n $rule ]] && want_rule[$rule]=1; done <"$F/ufw-rules"
  while IFS= read -r rule; do have_rule[$rule]=1; done < <(ufw show added | sed -n 's/^ufw //p')
  for rule in "${!want_rule[@]}"; do
    if [[ -z ${have_rule[$rule]+x} ]]; then
      # shellcheck disable=SC2086 # a rule is plain words (checked in preflight)
      ufw $rule >&2
      changed "ufw: $rule"
    fi
  done
  for rule in "${!have_rule[@]}"; do
    if [[ -z ${want_rule[$rule]+x} ]]; then
      # shellcheck disable=SC2086
      ufw delete $rule >&2
      changed "ufw: removed '$rule' (not in the configuration)"
    fi
  done

  if ! ufw status | grep -qx 'Status: active'; then
    ufw --force enable >&2
    changed "ufw enabled"
  elif ((reload)); then
    ufw reload >&2
  fi
  if ! systemctl is-enabled -q ufw; then systemctl enable ufw; changed "enabled ufw"; fi
}

caches() {
  if ! getent group "$SHARED_GROUP" >/dev/null; then groupadd -g "$SHARED_GID" "$SHARED_GROUP"; changed "created group $SHARED_GROUP"; fi
  [[ $(getent group "$SHARED_GROUP" | cut -d: -f3) == "$SHARED_GID" ]] \
    || refuse "group $SHARED_GROUP has gid $(getent group "$SHARED_GROUP" | cut -d: -f3), not $SHARED_GID; set TS_SHARED_GID to it"
  ensure_dir "$MP/cache" 755 root:root
  local c d acl="group:$SHARED_GROUP:rwx"
  for c in "${CACHES[@]}"; do
    d=$MP/cache/$c
    ensure_dir "$d" 2775 "root:$SHARED_GROUP"
    # default ACL: what one user puts in the cache stays writable for the others whatever their umask
    if ! getfacl -cpd "$d" 2>/dev/null | grep -qx "$acl" || ! getfacl -cp "$d" 2>/dev/null | grep -qx "$acl"; then
      setfacl -m "g:$SHARED_GROUP:rwx,d:u::rwx,d:g::rwx,d:g:$SHARED_GROUP:rwx,d:m::rwx,d:o::rx" "$d"
      changed "shared-cache ACL on $d"
    fi
  done
}

check() {
  local pair src dest
  local pairs=("sshd.conf:$SSHD_DROPIN" "fail2ban-jail.conf:$F2B_JAIL" "daemon.json:$DAEMON_JSON" "docker-service.conf:$DOCKER_DROPIN" "$SLICE:$SLICE_UNIT")
  if ((GPU > 0)); then pairs+=("nvidia-dev-char.rules:$NV_RULE" "ts-nvidia-dev-char.service:$NV_UNIT"); fi
  for pair in "${pairs[@]}"; do
    src=$F/${pair%%:*} dest=${pair#*:}
    if cmp -s "$src" "$dest"; then result "drift.${pair%%:*}" no; else result "drift.${pair%%:*}" yes; fi
  done
  if [[ $(live_low) == "$(slice_low "$F/$SLICE")" ]]; then result drift.slice-memory-low no; else result drift.slice-memory-low yes; fi
  if cgroup2 && ! recursiveprot; then result drift.memory-recursiveprot yes; else result drift.memory-recursiveprot no; fi
  if [[ $(current_block) == "$(cat "$F/ufw-docker-user.rules")" ]]; then result drift.ufw-docker-user.rules no; else result drift.ufw-docker-user.rules yes; fi
  if [[ $(ufw show added | sed -n 's/^ufw //p' | sort) == "$(sed '/^$/d' "$F/ufw-rules" | sort)" ]]; then result drift.ufw-rules no; else result drift.ufw-rules yes; fi
  if [[ $(subid_lines /etc/subuid) == "$(cat "$F/subid-$REMAP_USER")" && $(subid_lines /etc/subgid) == "$(cat "$F/subid-$REMAP_USER")" ]]; then
    result "drift.subid-$REMAP_USER" no
  else result "drift.subid-$REMAP_USER" yes; fi
  if ! apparmor_enabled || cmp -s "$F/apparmor-$AA_PROFILE" "$AA_FILE"; then result "drift.apparmor-$AA_PROFILE" no; else result "drift.apparmor-$AA_PROFILE" yes; fi
}

destroy() {
  [[ ${TS_ALLOW_WIPE:-0} == 1 ]] || refuse "the baseline keeps the host reachable and safe; it is only removed on a test-rig stack (rig: true)"
  local f
  if [[ -f $NV_UNIT ]]; then systemctl disable ts-nvidia-dev-char.service; fi
  for f in "$SSHD_DROPIN" "$F2B_JAIL" "$DOCKER_DROPIN" "$DAEMON_JSON" "$SLICE_UNIT" "/run/systemd/system.control/$SLICE.d/50-MemoryLow.conf" "$NV_RULE" "$NV_UNIT"; do
    if [[ -f $f ]]; then rm -f "$f"; changed "removed $f"; fi
  done
  if [[ -f $AA_FILE ]]; then
    if apparmor_enabled; then apparmor_parser -R "$AA_FILE" || true; fi
    rm -f "$AA_FILE"
    changed "removed $AA_FILE"
  fi
  for f in /etc/subuid /etc/subgid; do
    if [[ -n $(subid_lines "$f") ]]; then sed -i "/^$REMAP_USER:/d" "$f"; changed "removed $REMAP_USER's lines from $f"; fi
  done
  if [[ -n $(current_block) ]]; then sed -i "\\|^$BEGIN_MARK\$|,\\|^$END_MARK\$|d" "$UFW_AFTER"; changed "removed the DOCKER-USER block"; fi
  systemctl daemon-reload
  systemctl reload-or-restart ssh fail2ban
  systemctl restart docker
  if ufw status | grep -qx 'Status: active'; then ufw reload >&2; fi
}

case $ACTION in
  apply)
    preflight
    packages
    sshd_baseline
    fail2ban_baseline
    nvidia_dev_char
    caches
    workspace_slice
    apparmor_profile
    docker_baseline
    ufw_baseline
    ;;
  check) preflight; check ;;
  destroy) destroy ;;
esac
finish
