#!/usr/bin/env bash
# doctor-probe.sh: the read-only look at the server behind `npm run doctor` (tools/doctor.ts). It travels on the
# stdin of ONE ssh session, after lib.sh and its inputs (components/doctor.ts renderProbe), runs as the admin
# account (what needs root goes through `sudo -n`, see priv) and prints FACTS on stdout as key=value lines (lib.sh
# `result`); components/doctor.ts turns them into ok/warn/fail lines. It judges nothing and CHANGES NOTHING: no file
# is written, no counter reset (`btrfs device stats` without -z), no lock taken (`restic --no-lock --no-cache`),
# every HTTP request a GET — except with TS_SEND_TEST_ALERT=1, which POSTs one test alert to Alertmanager.
#
# Inputs (environment; lines are newline-separated, fields space-separated):
#   TS_MOUNTPOINT TS_LABEL TS_DEVICES (space-separated) TS_CACHE_MODE (none|writeback|writethrough)
#   TS_TEXTFILE_DIR (the ops jobs' metrics) TS_OPS_ENV (ops.env: restic repository and secret file paths)
#   TS_DRIVE_MOUNTPOINT TS_GPU_COUNT TS_NETWORK (the services' Docker network) TS_LAN_ADDRESS
#   TS_CONTAINERS    "name image" lines: every container the config implies
#   TS_WORKSPACES    "user container ssh-port" lines
#   TS_ROUTES        "id hostname" lines: asked through Traefik on TS_LAN_ADDRESS:80
#   TS_UNITS         systemd units that must be active (the ops timers, the Drive mount)
#   TS_SEND_TEST_ALERT 0|1, TS_TEST_ALERT (the alert's JSON), TS_ALERT_WAIT_S (how long to watch its delivery)
#   TS_HTTP_TIMEOUT  seconds per HTTP request (default 5)
# Facts (all optional but probe.end; absent = could not be read): see components/doctor.ts, FACTS.
# shellcheck source=lib.sh
[[ $(type -t result) == function ]] || source "${BASH_SOURCE[0]%/*}/lib.sh"
# A probe reports what it finds: one failing look must not stop the others (lib.sh's -e is for scripts that change).
set +e
export LC_ALL=C
require_env TS_MOUNTPOINT TS_LABEL 'TS_DEVICES?' TS_CACHE_MODE TS_TEXTFILE_DIR TS_OPS_ENV 'TS_DRIVE_MOUNTPOINT?' \
  TS_GPU_COUNT TS_NETWORK TS_LAN_ADDRESS 'TS_CONTAINERS?' 'TS_WORKSPACES?' 'TS_ROUTES?' 'TS_UNITS?' \
  'TS_SEND_TEST_ALERT?' 'TS_TEST_ALERT?' 'TS_ALERT_WAIT_S?'
HTTP_TIMEOUT=${TS_HTTP_TIMEOUT:-5}
MP=$TS_MOUNTPOINT

# fact KEY VALUE: one fact, on one line (newlines become " | ", carriage returns go).
fact() {
  local v=${2-}
  v=${v//$'\r'/}
  v=${v//$'\n'/ | }
  result "$1" "$v"
}

# priv CMD...: CMD as root (sudo -n: never a password prompt; fails instead).
priv() { if ((EUID == 0)); then "$@"; else sudo -n "$@"; fi; }

# http METHOD HOST PORT PATH [VHOST] [BODY]: one HTTP/1.0 request over bash's /dev/tcp (no curl needed); prints the
# raw response (status line, headers, body). Exit 1 when nothing answered within HTTP_TIMEOUT.
http() {
  # shellcheck disable=SC2016 # expanded by the inner bash (its own timeout-bounded process)
  timeout "$HTTP_TIMEOUT" bash -c '
    exec 3<>"/dev/tcp/$1/$2" || exit 1
    printf "%s %s HTTP/1.0\r\nHost: %s\r\nUser-Agent: train-server-doctor\r\nAccept: */*\r\nConnection: close\r\n" "$3" "$4" "$5" >&3
    if [[ $3 == POST ]]; then printf "Content-Type: application/json\r\nContent-Length: %s\r\n" "${#6}" >&3; fi
    printf "\r\n%s" "$6" >&3
    cat <&3' _ "$2" "$3" "$1" "$4" "${5:-$2}" "${6-}" 2>/dev/null
}
http_status() { head -n1 <<<"$1" | awk '{print $2}'; }
http_body() { sed '1,/^\r\{0,1\}$/d' <<<"$1"; }

# container_ip NAME: the container's address on the services network (empty when absent or not attached).
container_ip() {
  priv docker inspect --format "{{with index .NetworkSettings.Networks \"$TS_NETWORK\"}}{{.IPAddress}}{{end}}" "$1" 2>/dev/null
}

# kname DEV: kernel name of a block device (sdb, loop3).
kname() { basename "$(readlink -f "$1")"; }

probe_host() {
  fact probe.version 1
  fact probe.host "$(hostname 2>/dev/null)"
  fact probe.user "$(id -un)"
  fact time.now "$(date +%s)"
  if priv true 2>/dev/null; then fact sudo ok; else fact sudo fail; fi
  if command -v jq >/dev/null; then fact tool.jq 1; else fact tool.jq 0; fi
}

probe_storage() {
  local show uuid dev i=0 k f d missing=0 df stats
  if mountpoint -q "$MP" 2>/dev/null; then fact storage.mounted 1; else fact storage.mounted 0; fi
  fact storage.mount "$(findmnt -n -M "$MP" -o FSTYPE,SOURCE,OPTIONS 2>/dev/null | head -n1)"
  fact storage.fstab "$(awk -v mp="$MP" '$1 !~ /^#/ && $2 == mp {print $1; exit}' /etc/fstab 2>/dev/null)"
  for dev in $TS_DEVICES; do
    if [[ -b $dev ]]; then
      k=$(kname "$dev")
      fact "storage.device.$i" "present $(($(cat "/sys/class/block/$k/size" 2>/dev/null || echo 0) * 512)) $k"
      if [[ $TS_CACHE_MODE != none ]]; then
        f=/sys/class/block/$k/bcache
        if [[ -d $f ]]; then
          fact "bcache.$i" "$(sed -n 's/.*\[\([a-z]*\)\].*/\1/p' "$f/cache_mode" 2>/dev/null) $(cat "$f/state" 2>/dev/null) $(cat "$f/dirty_data" 2>/dev/null)"
        else
          fact "bcache.$i" "none"
        fi
      fi
    else
      fact "storage.device.$i" "absent"
    fi
    i=$((i + 1))
  done
  mountpoint -q "$MP" 2>/dev/null || return 0
  show=$(priv btrfs filesystem show "$MP" 2>/dev/null)
  uuid=$(awk '/uuid:/ {print $NF; exit}' <<<"$show")
  fact storage.uuid "$uuid"
  fact storage.label "$(sed -n "s/^Label: '\(.*\)'  uuid: .*/\1/p" <<<"$show" | head -n1)"
  fact storage.total_devices "$(awk '/Total devices/ {print $3; exit}' <<<"$show")"
  fact storage.fs_devices "$(awk '$1 == "devid" && !/MISSING|missing/ {print $NF}' <<<"$show" | paste -sd' ' -)"
  grep -q 'Some devices missing' <<<"$show" && fact storage.show_missing 1
  if [[ -n $uuid && -d /sys/fs/btrfs/$uuid/devinfo ]]; then
    for f in /sys/fs/btrfs/"$uuid"/devinfo/*/missing; do
      [[ -f $f ]] || continue
      d=${f%/missing}
      if [[ $(cat "$f") == 1 ]]; then missing=$((missing + 1)); fact "storage.missing_devid.${d##*/}" 1; fi
    done
    fact storage.devices_missing "$missing"
  fi
  df=$(priv btrfs filesystem df "$MP" 2>/dev/null)
  fact storage.data_profile "$(awk '$1 == "Data," {sub(/:$/, "", $2); print tolower($2)}' <<<"$df" | sort -u | paste -sd, -)"
  fact storage.metadata_profile "$(awk '$1 == "Metadata," || $1 == "System," {sub(/:$/, "", $2); print tolower($2)}' <<<"$df" | sort -u | paste -sd, -)"
  stats=$(priv btrfs device stats "$MP" 2>/dev/null)
  if [[ -n $stats ]]; then
    fact storage.device_errors "$(awk '{s += $2} END {print s + 0}' <<<"$stats")"
    fact storage.device_errors_detail "$(awk '$2 != 0 {print $1 "=" $2}' <<<"$stats" | paste -sd' ' -)"
  fi
  fact storage.space "$(df -B1 --output=size,avail "$MP" 2>/dev/null | tail -n1)"
  fact storage.scrub_status "$(priv btrfs scrub status "$MP" 2>/dev/null | grep -E '^(Status|Scrub started|Error summary):' | sed 's/  */ /g')"
  if [[ -n ${TS_DRIVE_MOUNTPOINT:-} ]]; then
    fact drive.mount "$(findmnt -n -M "$TS_DRIVE_MOUNTPOINT" -o FSTYPE,SOURCE 2>/dev/null | head -n1)"
    if timeout 10 stat -t "$TS_DRIVE_MOUNTPOINT/." >/dev/null 2>&1; then fact drive.readable 1; else fact drive.readable 0; fi
  fi
}

# The ops jobs' textfile metrics (ops-lib.sh), every sample line; components/doctor.ts parses them.
probe_metrics() {
  local f line n=0
  for f in "$TS_TEXTFILE_DIR"/train_server_*.prom; do
    [[ -f $f ]] || continue
    while IFS= read -r line; do
      [[ -z $line || $line == '#'* ]] && continue
      fact "metric.$n" "$line"
      n=$((n + 1))
    done < <(priv cat "$f" 2>/dev/null)
  done
  fact metric.count "$n"
}

# ops_env KEY: a value of ops.env (read, never sourced; its directory is root's).
ops_env() { priv cat "$TS_OPS_ENV" 2>/dev/null | sed -n "s/^$1=\"\(.*\)\"$/\1/p" | head -n1; }

probe_backups() {
  local snaps
  # btrbk's snapshot groups under .snapshots/ (not .backup, .verify.*): count and newest creation (birth) time of the
  # snapshots (subvolume roots: inode 256), in a group's dir or one level down (homes/<user>/)
  priv find "$MP/.snapshots" -mindepth 2 -maxdepth 3 -not -path "$MP/.snapshots/.*" -type d -inum 256 -prune -exec stat -c '%W %n' {} + 2>/dev/null |
    awk -v root="$MP/.snapshots/" '{
        p = substr($0, index($0, " ") + 1 + length(root)); sub("/.*", "", p)
        n[p]++; if ($1 > t[p]) t[p] = $1
      }
      END {for (g in n) print g, n[g], t[g] + 0}' | sort | while read -r g count newest; do fact "snapshots.$g" "$count $newest"; done
  priv test -f "$TS_OPS_ENV" || { fact restic.error "no $TS_OPS_ENV (Operations not installed)"; return 0; }
  command -v jq >/dev/null || { fact restic.error "jq is not installed"; return 0; }
  snaps=$(priv env RESTIC_REPOSITORY="$(ops_env TS_RESTIC_REPOSITORY)" RESTIC_PASSWORD_FILE="$(ops_env TS_RESTIC_PASSWORD_FILE)" \
    RCLONE_CONFIG="$(ops_env TS_RCLONE_CONFIG)" timeout 120 restic snapshots --no-lock --no-cache --json --tag train-server 2>&1)
  fact restic.rc "$?"
  if jq -e 'type == "array"' >/dev/null 2>&1 <<<"$snaps"; then
    fact restic.snapshots "$(jq -r '"\(length) \(map(.time) | max // "")"' <<<"$snaps")"
  else
    fact restic.error "$(tail -n3 <<<"$snaps" | cut -c1-300)"
  fi
}

probe_gpu() {
  local out user container _port
  ((TS_GPU_COUNT > 0)) || return 0
  if ! command -v nvidia-smi >/dev/null; then fact gpu.host "absent"; return 0; fi
  out=$(timeout 20 nvidia-smi --query-gpu=index,uuid,name,temperature.gpu --format=csv,noheader 2>&1)
  fact gpu.rc "$?"
  fact gpu.host "$out"
  while read -r user container _port; do
    [[ -n $user ]] || continue
    [[ $(priv docker inspect --format '{{.State.Running}}' "$container" 2>/dev/null) == true ]] || continue
    out=$(priv timeout 20 docker exec "$container" nvidia-smi --query-gpu=uuid --format=csv,noheader 2>&1)
    fact "gpu.ws.$user" "$? $(paste -sd, - <<<"$out")"
  done <<<"${TS_WORKSPACES:-}"
}

probe_docker() {
  local name image info fmt rc
  info=$(priv docker info --format '{{.ServerVersion}} {{.Driver}} {{.DockerRootDir}}' 2>&1)
  rc=$?
  fact docker.rc "$rc"
  # a daemon that does not answer: its client's own words (info's --format only says its template failed)
  ((rc == 0)) || info=$(priv docker version 2>&1 | grep -m1 -iE 'cannot connect|error|denied' || grep -m1 . <<<"$info")
  fact docker.info "$(grep -m1 . <<<"$info")"
  # a daemon that does not answer knows no container: say nothing rather than "absent"
  ((rc == 0)) || return 0
  fmt='{{.State.Status}}	{{if .State.Health}}{{.State.Health.Status}}{{else}}none{{end}}	{{.Config.Image}}	{{.Image}}	{{.RestartCount}}	{{.State.ExitCode}}	{{.State.StartedAt}}	{{.State.FinishedAt}}'
  while read -r name image; do
    [[ -n $name ]] || continue
    if info=$(priv docker inspect --format "$fmt" "$name" 2>/dev/null); then
      fact "container.$name" "$info"
      fact "container.$name.expected_id" "$(priv docker image inspect --format '{{.Id}}' "$image" 2>/dev/null)"
      if [[ $info == *$'\t'unhealthy$'\t'* ]] && command -v jq >/dev/null; then
        fact "container.$name.health_log" "$(priv docker inspect --format '{{json .State.Health}}' "$name" | jq -r '.Log[-1].Output // ""' | tail -n3 | cut -c1-300)"
      fi
    else
      fact "container.$name" "absent"
    fi
  done <<<"${TS_CONTAINERS:-}"
}

probe_network() {
  local r id host status
  r=$(http GET 127.0.0.1 2000 /metrics)
  if [[ -n $r ]]; then
    fact tunnel.metrics "$(http_status "$r")"
    fact tunnel.ha_connections "$(http_body "$r" | awk '$1 == "cloudflared_tunnel_ha_connections" {print $2; exit}')"
  else
    fact tunnel.metrics none
  fi
  while read -r id host; do
    [[ -n $id ]] || continue
    if r=$(http GET "$TS_LAN_ADDRESS" 80 / "$host") && [[ -n $r ]]; then
      status=$(http_status "$r")
      fact "route.$id" "$status	$(http_body "$r" | head -c 200 | head -n1)"
    else
      fact "route.$id" "none"
    fi
  done <<<"${TS_ROUTES:-}"
}

probe_monitoring() {
  local ip r
  command -v jq >/dev/null || return 0
  ip=$(container_ip prometheus)
  if [[ -n $ip ]] && r=$(http GET "$ip" 9090 /api/v1/targets?state=active) && [[ -n $r ]]; then
    fact prom.status "$(http_status "$r")"
    http_body "$r" | jq -r '.data.activeTargets[] | [.labels.job, .health, .scrapeUrl, (.lastError // "")] | @tsv' 2>/dev/null |
      awk '{print NR - 1 "\t" $0}' | while IFS=$'\t' read -r n rest; do fact "prom.target.$n" "$rest"; done
  else
    fact prom.status "${ip:+none}${ip:-no-ip}"
  fi
  ip=$(container_ip grafana)
  if [[ -n $ip ]] && r=$(http GET "$ip" 3000 /api/health) && [[ -n $r ]]; then
    fact grafana.status "$(http_status "$r")"
    fact grafana.health "$(http_body "$r" | jq -r '"\(.database // "?") \(.version // "?")"' 2>/dev/null)"
  else
    fact grafana.status "${ip:+none}${ip:-no-ip}"
  fi
  ip=$(container_ip alertmanager)
  if [[ -n $ip ]] && r=$(http GET "$ip" 9093 /api/v2/status) && [[ -n $r ]]; then
    fact am.status "$(http_status "$r")"
    fact am.version "$(http_body "$r" | jq -r '.versionInfo.version // ""' 2>/dev/null)"
    fact am.config_b64 "$(http_body "$r" | jq -r '.config.original // ""' 2>/dev/null | base64 -w0)"
    r=$(http GET "$ip" 9093 '/api/v2/alerts?active=true&silenced=false&inhibited=false')
    http_body "$r" | jq -r '.[] | [.labels.alertname, (.labels.severity // ""), .startsAt] | @tsv' 2>/dev/null |
      awk '{print NR - 1 "\t" $0}' | while IFS=$'\t' read -r n rest; do fact "am.alert.$n" "$rest"; done
    [[ ${TS_SEND_TEST_ALERT:-0} == 1 ]] && send_test_alert "$ip"
  else
    fact am.status "${ip:+none}${ip:-no-ip}"
  fi
}

# am_notifications IP: "<attempts> <failures>" of Alertmanager's Telegram integration so far.
am_notifications() {
  http_body "$(http GET "$1" 9093 /metrics)" | awk '
    /^alertmanager_notifications_total\{.*integration="telegram"/ {t += $NF}
    /^alertmanager_notifications_failed_total\{.*integration="telegram"/ {f += $NF}
    END {print t + 0, f + 0}'
}

# send_test_alert IP: the one write of the probe (only when asked): POST a test alert, then watch Alertmanager's
# Telegram counters until it has tried to deliver it (group_wait) or TS_ALERT_WAIT_S passed.
send_test_alert() {
  local ip=$1 before after r waited=0
  before=$(am_notifications "$ip")
  fact am.notify_before "$before"
  r=$(http POST "$ip" 9093 /api/v2/alerts "$ip" "$TS_TEST_ALERT")
  fact am.test_alert "$(http_status "$r")"
  [[ $(http_status "$r") == 200 ]] || return 0
  while ((waited < ${TS_ALERT_WAIT_S:-60})); do
    sleep 3
    waited=$((waited + 3))
    after=$(am_notifications "$ip")
    [[ ${after%% *} != "${before%% *}" ]] && break
  done
  fact am.notify_after "$after"
  fact am.notify_waited "$waited"
}

probe_users() {
  local user _container port banner
  while read -r user _container port; do
    [[ -n $user ]] || continue
    # shellcheck disable=SC2016 # expanded by the inner bash
    banner=$(timeout "$HTTP_TIMEOUT" bash -c 'exec 3<>"/dev/tcp/$1/$2" && head -c 100 <&3 | head -n1' _ "$TS_LAN_ADDRESS" "$port" 2>/dev/null)
    fact "user.$user.ssh" "${banner:-none}"
  done <<<"${TS_WORKSPACES:-}"
}

probe_units() {
  local unit
  for unit in ${TS_UNITS:-}; do
    fact "unit.$unit" "$(systemctl is-active "$unit" 2>/dev/null)"
  done
}

probe_host
probe_storage
probe_metrics
probe_backups
probe_gpu
probe_docker
probe_network
probe_monitoring
probe_users
probe_units
fact probe.end 1
