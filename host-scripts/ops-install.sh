#!/usr/bin/env bash
# Installs the Operations area's host files (units, timers, btrbk.conf, ops.env, secret files, job scripts, alert
# rules, alertmanager.yml) and enables the timers and the Drive mount.
# Inputs: TS_FILES_DIR with `manifest` (lines `<name> <mode> <owner> <absolute path>`, the file <name> beside it)
#   and `units` (one unit per line to enable), both rendered by opsFilesDir() in components/render/ops.ts;
#   TS_ROOT (optional, default /): install into this root instead (an image, a test); units are then only
#   enabled (symlinks), not started; TS_OPS_PACKAGES (optional): Debian packages to install when missing
#   (only when TS_ROOT is /), default "btrbk restic rclone fuse3 jq smartmontools prometheus-node-exporter-collectors";
#   TS_RELOAD (optional): lines `<path prefix> <container>`: when apply changed a file under the prefix and the
#   container runs, it gets SIGHUP (Prometheus reloads its rules, Alertmanager its config, without a restart).
# apply: writes what differs, enables what is not enabled; with a running systemd also daemon-reload, starts the
#   timers and (re)starts the Drive mount when its unit or the rclone config changed.
# check: reports drift (drift.<file name>=yes per file differing, drift.<unit>.enabled=yes per unit not enabled,
#   drift=N) and changes nothing.
# destroy: disables the units and removes the installed files; snapshots, the restic repository and the state
#   directory are never touched.
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "${BASH_SOURCE[0]%/*}/lib.sh"
action=$(ts_action "${1:-}")
require_env TS_FILES_DIR
root=${TS_ROOT:-/}
root=${root%/}
packages=${TS_OPS_PACKAGES-btrbk restic rclone fuse3 jq smartmontools prometheus-node-exporter-collectors}
manifest=$TS_FILES_DIR/manifest
[[ -f $manifest && -f $TS_FILES_DIR/units ]] || die "$TS_FILES_DIR has no manifest/units (render them with opsFilesDir)"

# Validate the whole manifest before touching anything.
declare -a names=() modes=() owners=() paths=()
while read -r name mode owner path; do
  [[ -n $name ]] || continue
  [[ $name =~ ^[A-Za-z0-9_.-]+$ && -f $TS_FILES_DIR/$name ]] || die "manifest: no file '$name' in $TS_FILES_DIR"
  [[ $mode =~ ^0?[0-7]{3,4}$ ]] || die "manifest: bad mode '$mode' for $path"
  [[ $owner =~ ^[A-Za-z0-9_.-]+:[A-Za-z0-9_.-]+$ ]] || die "manifest: bad owner '$owner' for $path"
  [[ $path == /* && $path != *..* ]] || die "manifest: '$path' is not a plain absolute path"
  names+=("$name") modes+=("$mode") owners+=("$owner") paths+=("$path")
done <"$manifest"
mapfile -t units < <(grep -v '^\s*$' "$TS_FILES_DIR/units")
for u in "${units[@]}"; do [[ $u =~ ^[A-Za-z0-9@_.-]+\.(service|timer)$ ]] || die "units: bad unit name '$u'"; done

live=0
[[ -z $root && -d /run/systemd/system ]] && live=1
sctl() { if [[ -z $root ]]; then systemctl "$@"; else systemctl --root="$root" "$@"; fi; }

# numeric_owner USER:GROUP -> UID:GID (names resolved on this host; numbers kept).
numeric_owner() {
  local u=${1%%:*} g=${1#*:}
  [[ $u =~ ^[0-9]+$ ]] || u=$(id -u "$u") || die "no user ${1%%:*}"
  [[ $g =~ ^[0-9]+$ ]] || g=$(getent group "$g" | cut -d: -f3)
  [[ -n $g ]] || die "no group ${1#*:}"
  printf '%s:%s' "$u" "$g"
}

differs() { # differs INDEX: the installed file differs from the rendered one (content, mode or owner)
  local i=$1 dest=$root${paths[$1]}
  [[ -f $dest ]] && cmp -s "$TS_FILES_DIR/${names[$i]}" "$dest" && [[ $(stat -c '%a' "$dest") == "${modes[$i]#0}" ]] &&
    [[ $(stat -c '%u:%g' "$dest") == "$(numeric_owner "${owners[$i]}")" ]] && return 1
  return 0
}

case $action in
  check)
    # each differing file as drift.<its file name> (names are unique across the manifest), each unit not enabled
    # as drift.<unit>.enabled; drift=N counts them
    count=0
    for i in "${!paths[@]}"; do
      if differs "$i"; then count=$((count + 1)); log "differs: ${paths[$i]}"; drift "${paths[$i]##*/}" yes; fi
    done
    for u in "${units[@]}"; do
      [[ $(sctl is-enabled "$u" 2>/dev/null) == enabled ]] || { count=$((count + 1)); log "not enabled: $u"; drift "$u.enabled" yes; }
    done
    result drift "$count"
    ;;
  apply)
    if [[ -z $root && -n $packages ]]; then
      missing=()
      for p in $packages; do dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'ok installed' || missing+=("$p"); done
      if ((${#missing[@]})); then
        DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${missing[@]}" >&2
        changed "installed ${missing[*]}"
      fi
    fi
    units_changed=0 drive_changed=0 changed_paths=()
    for i in "${!paths[@]}"; do
      differs "$i" || continue
      install_file "$TS_FILES_DIR/${names[$i]}" "$root${paths[$i]}" "${modes[$i]}" "${owners[$i]}"
      changed_paths+=("${paths[$i]}")
      case ${paths[$i]} in
        /etc/systemd/system/*) units_changed=1 ;;
      esac
      case ${paths[$i]} in */ts-drive-mount.service | */rclone.conf) drive_changed=1 ;; esac
    done
    if ((live && units_changed)); then systemctl daemon-reload; fi
    for u in "${units[@]}"; do
      if [[ $(sctl is-enabled "$u" 2>/dev/null) != enabled ]]; then
        sctl enable "$u" >&2
        changed "enabled $u"
      fi
      if ((live)); then
        if [[ $u == ts-drive-mount.service ]] && ((drive_changed)) && systemctl is-active -q "$u"; then
          systemctl restart "$u"
          changed "restarted $u"
        elif ! systemctl is-active -q "$u"; then
          systemctl start "$u"
          changed "started $u"
        fi
      fi
    done
    ((live)) || log "no running systemd for this root: units enabled, not started"
    # containers that read what changed reload it (on the first run Docker may not be installed yet: nothing runs)
    while read -r prefix container; do
      [[ -n $prefix && ${#changed_paths[@]} -gt 0 ]] || continue
      printf '%s\n' "${changed_paths[@]}" | grep -q "^$prefix" || continue
      command -v docker >/dev/null || continue
      [[ $(docker inspect -f '{{.State.Running}}' "$container" 2>/dev/null) == true ]] || continue
      docker kill --signal=HUP "$container" >/dev/null
      changed "sent SIGHUP to $container (its configuration under $prefix changed)"
    done <<<"${TS_RELOAD:-}"
    ;;
  destroy)
    for u in "${units[@]}"; do
      if ((live)) && systemctl is-active -q "$u"; then systemctl stop "$u"; changed "stopped $u"; fi
      if [[ $(sctl is-enabled "$u" 2>/dev/null) == enabled ]]; then sctl disable "$u" >&2; changed "disabled $u"; fi
    done
    for i in "${!paths[@]}"; do
      if [[ -e $root${paths[$i]} ]]; then rm -f "$root${paths[$i]}"; changed "removed ${paths[$i]}"; fi
    done
    ((live)) && systemctl daemon-reload
    ;;
esac
finish
