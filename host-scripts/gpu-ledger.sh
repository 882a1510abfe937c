#!/usr/bin/env bash
# Per-user GPU ledger: who uses which GPU, as textfile metrics. Run by ts-gpu-ledger.timer (every minute).
# Inputs: TS_GPU_USERS ("name:uid:gpus ...", gpus = all | none | 0,2: the stack's users[i].gpus), TS_TEXTFILE_DIR,
#   TS_STATE_DIR (the busy-seconds counters survive restarts in <dir>/gpu-ledger.state), TS_GPU_LEDGER_MAX_GAP
#   (seconds, default 180: a longer pause since the last run counts as this long).
#
# nvidia-smi, in the CSV forms documented by its own help (`nvidia-smi -h`: "--format= csv, noheader - skip the first
# line with column headers, nounits - don't print units"; `--help-query-gpu`, `--help-query-compute-apps`; driver
# 590.48.01 as recorded in utkuozdemir/nvidia_gpu_exporter internal/captures/linux-x86_64__nvidia-h100-80gb-hbm3__
# 590.48.01.txt, and the nvidia-smi(1) man page): fields separated by ", ", memory in MiB, one line per GPU/process,
# no output at all when no process holds a compute context:
#   --query-gpu=index,uuid,utilization.gpu,memory.used,memory.total   0, GPU-5c2a…, 87, 30421, 81559
#   --query-compute-apps=gpu_uuid,pid,used_memory                     GPU-5c2a…, 4242, 30000
# utilization.gpu is the "percent of time over the past sample period (1/6 s to 1 s) during which one or more
# kernels was executing": one sample per run, taken as the GPU's busy share since the last run.
#
# Owner of a process: the first (outermost) Docker container id in /proc/<pid>/cgroup, the cgroup v2 line first —
# systemd cgroup driver `/system.slice/docker-<id>.scope`, cgroupfs driver `/docker/<id>`; a container started by
# Docker-in-Docker inside a workspace sits below the workspace's id — named by `docker ps`; `workspace-<user>` of a
# configured user is that user's. Not in a container, or in another container (a service): "host". In a container
# Docker does not name (daemon down): the process's uid, if it is a user's stable uid, else "unknown"; a process gone
# before it could be looked up: "unknown".
#
# Attribution: a GPU's busy seconds (utilization x time since the last run) are split among the owners of its compute
# processes in proportion to the memory they hold (equally per process when none reports memory); busy time with
# no compute process on the GPU goes to "unknown". So the users' seconds of a GPU add up to the GPU's own.
#
# Metrics (gpu = index, uuid = the GPU's stable id; the state is keyed by uuid, indexes can change at boot):
#   train_server_gpu_busy_seconds_total{gpu,uuid}              counter: utilization x time
#   train_server_gpu_utilization_ratio{gpu,uuid}               the last sample, 0..1
#   train_server_gpu_memory_used_bytes{gpu,uuid}, train_server_gpu_memory_total_bytes{gpu,uuid}
#   train_server_gpu_user_busy_seconds_total{gpu,uuid,user}    counter: the owner's share of the GPU's busy seconds
#   train_server_gpu_user_memory_bytes{gpu,uuid,user}          memory the owner's processes hold now
#   train_server_gpu_user_processes{gpu,uuid,user}             how many compute processes the owner has on it
#   train_server_gpu_reservation{gpu,user}                     1 for each GPU pinned to a user (an index list)
#   train_server_utc_offset_seconds                            the host's local time offset (working hours)
source "${BASH_SOURCE[0]%/*}/lib.sh"
source "${BASH_SOURCE[0]%/*}/ops-lib.sh"
action=$(ts_action "${1:-}")
require_env 'TS_GPU_USERS?' TS_TEXTFILE_DIR TS_STATE_DIR

ops_collector_only "$action"

ops_start gpu-ledger
max_gap=${TS_GPU_LEDGER_MAX_GAP:-180}
[[ $max_gap =~ ^[0-9]+$ ]] || die "TS_GPU_LEDGER_MAX_GAP '$max_gap' is not a number of seconds"

declare -A uid_user=() user_uid=()
reservations=()
for entry in $TS_GPU_USERS; do
  IFS=: read -r user uid gpus <<<"$entry"
  [[ $user =~ ^[a-z_][a-z0-9_-]*$ && $uid =~ ^[0-9]+$ && $gpus =~ ^(all|none|[0-9]+(,[0-9]+)*)$ ]] ||
    die "TS_GPU_USERS entry '$entry' is not name:uid:gpus (gpus all, none or 0,1)"
  uid_user[$uid]=$user user_uid[$user]=$uid
  if [[ $gpus != all && $gpus != none ]]; then
    for g in ${gpus//,/ }; do reservations+=("$user $g"); done
  fi
done

mkdir -p "$TS_STATE_DIR"
state=$TS_STATE_DIR/gpu-ledger.state
exec 9>"$state.lock"
flock -w 30 9 || die "another gpu-ledger run holds $state.lock"
if [[ -f $state ]]; then
  awk '!/^(last [0-9]+|gpu [^ ]+ [0-9]+ [0-9.]+|user [^ ]+ [a-z_][a-z0-9_-]* [0-9.]+)$/ {bad = 1} END {exit bad}' "$state" ||
    die "$state is malformed; move it away to start the counters from zero"
fi
OPS_SCRATCH=$(mktemp -d)

# container_of PID: the outermost Docker container id of the process ("" = none); fails when the process is gone.
container_of() {
  local cg line
  cg=$(cat "/proc/$1/cgroup" 2>/dev/null) || return 1
  while IFS= read -r line; do
    if [[ $line =~ /docker[-/]([0-9a-f]{64})(\.scope)?(/|$) ]]; then
      printf '%s' "${BASH_REMATCH[1]}"
      return 0
    fi
  done < <(grep '^0::' <<<"$cg"; grep -v '^0::' <<<"$cg")
}

# GPUs ("G index uuid util% usedMiB totalMiB") and compute processes ("P uuid owner usedMiB"), for the ledger below.
input=$OPS_SCRATCH/input
query_ok=1 nprocs=0
: >"$input"
if gpus=$(nvidia-smi --query-gpu=index,uuid,utilization.gpu,memory.used,memory.total --format=csv,noheader,nounits) &&
  apps=$(nvidia-smi --query-compute-apps=gpu_uuid,pid,used_memory --format=csv,noheader,nounits); then
  while IFS=, read -r index uuid util used total; do
    index=${index// /} uuid=${uuid// /} util=${util// /} used=${used// /} total=${total// /}
    [[ -n $index ]] || continue
    [[ $index =~ ^[0-9]+$ && $uuid =~ ^[A-Za-z0-9-]+$ ]] || die "nvidia-smi --query-gpu printed an unexpected line: $index, $uuid, ..."
    [[ $util =~ ^[0-9]+$ ]] || { log "GPU $index: utilization '$util' not reported, counted as 0"; util=0; }
    [[ $used =~ ^[0-9]+$ ]] || used=0
    [[ $total =~ ^[0-9]+$ ]] || total=0
    printf 'G %s %s %s %s %s\n' "$index" "$uuid" "$util" "$used" "$total" >>"$input"
  done <<<"$gpus"
  # owners: container ids first, then one `docker ps` for the names (only when a process is in a container)
  declare -a app_uuid=() app_pid=() app_mem=() app_cid=()
  while IFS=, read -r uuid pid used; do
    uuid=${uuid// /} pid=${pid// /} used=${used// /}
    [[ -n $uuid ]] || continue
    [[ $pid =~ ^[0-9]+$ ]] || { log "compute process '$pid' on $uuid unreadable: skipped"; continue; }
    [[ $used =~ ^[0-9]+$ ]] || used=0 # [N/A] (WDDM) or [Insufficient Permissions]
    cid=$(container_of "$pid") || cid=gone
    app_uuid+=("$uuid") app_pid+=("$pid") app_mem+=("$used") app_cid+=("$cid")
  done <<<"$apps"
  declare -A container_name=()
  if printf '%s\n' "${app_cid[@]}" | grep -qE '^[0-9a-f]{64}$'; then
    if names=$(docker ps --no-trunc --format '{{.ID}} {{.Names}}'); then
      while read -r cid cname; do [[ -n $cid ]] && container_name[$cid]=$cname; done <<<"$names"
    else
      log "docker ps failed: processes in containers are told apart by their uid"
    fi
  fi
  for i in "${!app_pid[@]}"; do
    pid=${app_pid[$i]} cid=${app_cid[$i]}
    uid=$(awk '/^Uid:/ {print $2}' "/proc/$pid/status" 2>/dev/null) || true
    [[ -n $uid ]] || uid=none
    name=
    [[ $cid =~ ^[0-9a-f]{64}$ ]] && name=${container_name[$cid]:-}
    if [[ $cid == gone ]]; then
      owner=unknown
    elif [[ -z $cid ]]; then
      owner=host
    elif [[ -z $name ]]; then
      owner=${uid_user[$uid]:-unknown} # Docker did not name the container
    elif [[ $name == workspace-* && -n ${user_uid[${name#workspace-}]:-} ]]; then
      owner=${name#workspace-}
      [[ $uid == 0 || $uid == "${user_uid[$owner]}" ]] || log "pid $pid in $name runs as uid $uid, not $owner's: counted for $owner"
    else
      owner=host # a service container
    fi
    printf 'P %s %s %s\n' "${app_uuid[$i]}" "$owner" "${app_mem[$i]}" >>"$input"
    nprocs=$((nprocs + 1))
  done
else
  query_ok=0
fi

now=$(date +%s)
offset=$(date +%z)
offset_s=$(((10#${offset:1:2} * 3600 + 10#${offset:3:2} * 60) * ${offset:0:1}1))
# The ledger: the new state into $OPS_SCRATCH/state, metric lines "name labels value" on stdout.
ledger() {
  awk -v now="$now" -v max_gap="$max_gap" -v query_ok="$query_ok" -v statefile="$OPS_SCRATCH/state" '
    FILENAME == ARGV[1] {
      if ($1 == "last") last = $2
      if ($1 == "gpu") { gbusy[$2] = $4; gidx[$2] = $3 }
      if ($1 == "user") ubusy[$2 SUBSEP $3] = $4
      next
    }
    $1 == "G" { gidx[$3] = $2; util[$3] = $4; used[$3] = $5; total[$3] = $6; seen[$3] = 1; if (!($3 in gbusy)) gbusy[$3] = 0 }
    $1 == "P" { k = $2 SUBSEP $3; mem[k] += $4; procs[k]++; gmem[$2] += $4; gprocs[$2]++ }
    END {
      dt = (last == "" || !query_ok) ? 0 : now - last
      if (dt < 0) dt = 0
      if (dt > max_gap) dt = max_gap
      # a new owner starts at 0, so that Prometheus sees its first increase
      for (k in procs) if (!(k in ubusy)) ubusy[k] = 0
      for (g in seen) {
        busy = util[g] / 100 * dt
        gbusy[g] += busy
        if (!gprocs[g] && util[g] > 0) ubusy[g SUBSEP "unknown"] += busy
        if (busy == 0 || !gprocs[g]) continue
        for (k in procs) {
          split(k, p, SUBSEP)
          if (p[1] == g) ubusy[k] += busy * (gmem[g] > 0 ? mem[k] / gmem[g] : procs[k] / gprocs[g])
        }
      }
      print "last", now > statefile
      for (g in gbusy) {
        l = "gpu=\"" gidx[g] "\",uuid=\"" g "\""
        printf "gpu %s %s %.3f\n", g, gidx[g], gbusy[g] > statefile
        printf "train_server_gpu_busy_seconds_total %s %.3f\n", l, gbusy[g]
        if (!(g in seen)) continue
        printf "train_server_gpu_utilization_ratio %s %.2f\n", l, util[g] / 100
        printf "train_server_gpu_memory_used_bytes %s %.0f\n", l, used[g] * 1048576
        printf "train_server_gpu_memory_total_bytes %s %.0f\n", l, total[g] * 1048576
      }
      for (k in ubusy) {
        split(k, p, SUBSEP)
        l = "gpu=\"" gidx[p[1]] "\",uuid=\"" p[1] "\",user=\"" p[2] "\""
        printf "user %s %s %.3f\n", p[1], p[2], ubusy[k] > statefile
        printf "train_server_gpu_user_busy_seconds_total %s %.3f\n", l, ubusy[k]
      }
      for (k in procs) {
        split(k, p, SUBSEP)
        l = "gpu=\"" gidx[p[1]] "\",uuid=\"" p[1] "\",user=\"" p[2] "\""
        printf "train_server_gpu_user_memory_bytes %s %.0f\n", l, mem[k] * 1048576
        printf "train_server_gpu_user_processes %s %d\n", l, procs[k]
      }
    }' <(cat "$state" 2>/dev/null) "$input"
}
ledger | sort >"$OPS_SCRATCH/metrics"
while read -r name labels value; do metric "$name" "$labels" "$value"; done <"$OPS_SCRATCH/metrics"
for r in "${reservations[@]}"; do
  read -r user g <<<"$r"
  metric train_server_gpu_reservation "gpu=\"$g\",user=\"$user\"" 1
done
metric train_server_utc_offset_seconds "" "$offset_s"
((query_ok)) || die "nvidia-smi failed: GPU usage not counted this run (the counters are kept)"

sort "$OPS_SCRATCH/state" >"$state.tmp"
mv -f "$state.tmp" "$state"
result gpus "$(grep -c '^G ' "$input" || true)"
result processes "$nprocs"
finish
