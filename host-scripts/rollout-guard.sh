#!/usr/bin/env bash
# Rollout guard of one user's workspace: runs right before `pulumi up` replaces it (its bundle carries the hash of
# the workspace's container spec, so the step re-runs exactly when that spec changes: a new image, new limits,
# GPUs, mounts or routes). It lets the replacement go on when the workspace
#   - does not exist or is not running, or already runs this spec (its label TS_SPEC_LABEL equals TS_SPEC);
#   - is released: the admin's rolloutNow on the user (TS_FORCE=1), the maintenance window (TS_WINDOW, server time),
#     or the user's own `rollout-ready` in the workspace (the marker ~/.train-server/rollout-ready in their home,
#     younger than TS_READY_MAX_AGE_S; consumed here);
#   - or is idle: no GPU compute process of its own, CPU below TS_BUSY_CPU_PERCENT (100 = one core) over
#     TS_CPU_SAMPLE_S seconds, no SSH or desktop session.
# Otherwise it refuses (exit 3, nothing changed) naming the user, what runs and how to proceed: the engine then skips
# that workspace's replacement (it depends on this step), and with `pulumi up --continue-on-error` every other user's
# rollout goes on. The step's failed update is retried by the next `up`, which replaces the workspace once it is free.
# While it waits, ~/.train-server/rollout-pending tells the user (their login shell prints it). Files in the home are
# written and removed as the user (setpriv), never as root: a symlink planted there reaches nothing of anyone else's.
# Inputs: TS_USER, TS_UID, TS_HOME (the home's host path), TS_CONTAINER, TS_SPEC (sha256), TS_SPEC_LABEL, TS_FORCE (0|1), TS_WINDOW ("" or "<days 1-7> HH:MM-HH:MM", days
#   comma-separated), TS_WINDOW_TEXT (for messages), TS_READY_MAX_AGE_S, TS_BUSY_CPU_PERCENT, TS_CPU_SAMPLE_S.
# Results: rollout.decision=go|hold, rollout.reason=<text>.
# check: the same verdict, without waiting for a CPU sample or consuming the marker; never refuses. destroy: nothing.
source "${BASH_SOURCE[0]%/*}/lib.sh"
action=$(ts_action "${1:-}")
require_env TS_USER TS_UID TS_HOME TS_CONTAINER TS_SPEC TS_SPEC_LABEL TS_FORCE 'TS_WINDOW?' 'TS_WINDOW_TEXT?' \
  TS_READY_MAX_AGE_S TS_BUSY_CPU_PERCENT TS_CPU_SAMPLE_S
[[ $TS_FORCE == 0 || $TS_FORCE == 1 ]] || die "TS_FORCE '$TS_FORCE' must be 0 or 1"
for n in TS_UID TS_READY_MAX_AGE_S TS_BUSY_CPU_PERCENT TS_CPU_SAMPLE_S; do
  [[ ${!n} =~ ^[0-9]+$ ]] || die "$n '${!n}' is not a whole number"
done
[[ -z $TS_WINDOW || $TS_WINDOW =~ ^[1-7](,[1-7])*\ [0-2][0-9]:[0-5][0-9]-[0-2][0-9]:[0-5][0-9]$ ]] \
  || die "TS_WINDOW '$TS_WINDOW' is not '<days 1-7> HH:MM-HH:MM'"

if [[ $action == destroy ]]; then
  log "nothing to undo (the guard only looks)"
  finish
  exit 0
fi

marker_dir=$TS_HOME/.train-server
READY=$marker_dir/rollout-ready
PENDING=$marker_dir/rollout-pending
join() { local sep=$1 out=${2:-}; shift 2 || true; local x; for x in "$@"; do out+=$sep$x; done; printf '%s' "$out"; }
as_user() { setpriv --reuid="$TS_UID" --regid="$TS_UID" --clear-groups -- "$@"; }

decide() { # DECISION REASON: print the verdict; a hold refuses on apply
  result rollout.decision "$1"
  result rollout.reason "$2"
  if [[ $action == apply && -d $TS_HOME ]]; then
    if [[ $1 == go ]]; then
      as_user rm -f -- "$PENDING" 2>/dev/null || true
    else
      as_user mkdir -p -- "$marker_dir" 2>/dev/null || true
      printf 'A workspace update is waiting (%s). Run rollout-ready when your work is saved.\n%s\n' "$(date '+%F %H:%M')" "$2" \
        | as_user tee -- "$PENDING" >/dev/null 2>&1 || log "could not leave the notice in $PENDING"
    fi
  fi
  if [[ $1 == go ]]; then
    log "$TS_USER: $2"
    finish
    exit 0
  fi
  if [[ $action == check ]]; then
    log "$TS_USER: a rollout would wait: $2"
    finish
    exit 0
  fi
  refuse "$2"
}

# in_window: the server's local time is inside TS_WINDOW.
in_window() {
  [[ -n $TS_WINDOW ]] || return 1
  local days=${TS_WINDOW% *} span=${TS_WINDOW#* } dow now start end
  dow=$(date +%u)
  now=$(date +%H%M)
  start=${span%-*} end=${span#*-}
  [[ ,$days, == *,$dow,* ]] && ((10#$now >= 10#${start/:/} && 10#$now < 10#${end/:/}))
}

state=$(docker inspect -f "{{.State.Running}} {{.State.Pid}} {{index .Config.Labels \"$TS_SPEC_LABEL\"}}" "$TS_CONTAINER" 2>/dev/null) \
  || decide go "no container $TS_CONTAINER yet: nothing to keep"
read -r running pid spec <<<"$state"
[[ $running == true ]] || decide go "$TS_CONTAINER is not running: nothing to keep"
[[ $spec != "$TS_SPEC" ]] || decide go "$TS_CONTAINER already runs this spec: no replacement"
((TS_FORCE == 0)) || decide go "released by the admin (rolloutNow: true on $TS_USER in the stack config)"
! in_window || decide go "inside the maintenance window (${TS_WINDOW_TEXT})"

# the user's marker, written by `rollout-ready` inside the workspace: looked at as the user (a symlink to a file the
# user cannot read is no marker), consumed as the user
if mtime=$(as_user stat -L -c %Y -- "$READY" 2>/dev/null); then
  age=$(($(date +%s) - mtime))
  if ((age >= -60 && age <= TS_READY_MAX_AGE_S)); then
    [[ $action == check ]] || as_user rm -f -- "$READY" || log "could not remove $READY"
    decide go "released by $TS_USER (rollout-ready, $(((age < 0 ? 0 : age) / 60)) min ago)"
  fi
  log "ignoring $READY: $((age / 3600)) h old (older than $((TS_READY_MAX_AGE_S / 3600)) h)"
fi

busy=()
# the container's processes, as host pids (what nvidia-smi reports) with their owner and command line
procs=$(docker top "$TS_CONTAINER" -eo pid,user,etimes,args 2>/dev/null | tail -n +2) || procs=""

# GPU compute processes of this workspace (nested containers included: they are its descendants)
if command -v nvidia-smi >/dev/null; then
  apps=$(nvidia-smi --query-compute-apps=pid,process_name,used_memory --format=csv,noheader,nounits 2>/dev/null) || apps=""
  gpu=()
  while IFS=', ' read -r apid aname amem; do
    [[ $apid =~ ^[0-9]+$ ]] || continue
    if awk -v p="$apid" '$1 == p {found = 1} END {exit !found}' <<<"$procs"; then gpu+=("pid $apid ${aname##*/} ${amem} MiB"); fi
  done <<<"$apps"
  ((${#gpu[@]} == 0)) || busy+=("${#gpu[@]} GPU process(es): $(join ', ' "${gpu[@]}")")
fi

# CPU: the container's cgroup usage over the sample (cgroup v2 cpu.stat, or v1 cpuacct)
cpu_usage_us() {
  local line path
  line=$(grep -m1 '^0::' "/proc/$pid/cgroup" 2>/dev/null || true)
  path=${line#0::}
  if [[ -n $line && -f /sys/fs/cgroup$path/cpu.stat ]]; then
    awk '$1 == "usage_usec" {print $2}' "/sys/fs/cgroup$path/cpu.stat"
    return
  fi
  line=$(grep -m1 -E '^[0-9]+:([^:]*,)?cpuacct(,[^:]*)?:' "/proc/$pid/cgroup" 2>/dev/null || true)
  path=${line#*:*:}
  local dir
  for dir in /sys/fs/cgroup/cpuacct /sys/fs/cgroup/cpu,cpuacct /sys/fs/cgroup/cpuacct,cpu; do
    if [[ -n $line && -f $dir$path/cpuacct.usage ]]; then
      echo $(($(<"$dir$path/cpuacct.usage") / 1000))
      return
    fi
  done
  return 1
}
if [[ $action == apply ]] && ((TS_CPU_SAMPLE_S > 0)); then
  if before=$(cpu_usage_us); then
    t0=$(date +%s%N)
    sleep "$TS_CPU_SAMPLE_S"
    after=$(cpu_usage_us) || after=$before
    t1=$(date +%s%N)
    percent=$(((after - before) * 100000 / ((t1 - t0) / 1000 + 1) / 1000))
    if ((percent >= TS_BUSY_CPU_PERCENT)); then
      busy+=("CPU $(awk -v p="$percent" 'BEGIN {printf "%.1f", p / 100}') cores busy over ${TS_CPU_SAMPLE_S} s")
    fi
  else
    log "no CPU figures for $TS_CONTAINER (its cgroup was not found): judged by its processes only"
  fi
fi

# sessions: SSH logins (sshd's per-session process is titled "sshd: <user>@<tty|notty>") and X2Go desktops
ssh_sessions=$(awk '$4 == "sshd:" && $5 ~ /@/ {n++} END {print n + 0}' <<<"$procs")
desktops=$(awk '$4 ~ /(^|\/)x2goagent$/ {n++} END {print n + 0}' <<<"$procs")
((ssh_sessions == 0)) || busy+=("$ssh_sessions SSH session(s)")
((desktops == 0)) || busy+=("$desktops desktop session(s)")

((${#busy[@]} > 0)) || decide go "$TS_CONTAINER is idle: replaced now"

what=$(join '; ' "${busy[@]}")
how="$TS_USER runs rollout-ready in the workspace when their work is saved (their processes then get SIGTERM and time to stop), or the admin sets rolloutNow: true on $TS_USER in the stack config (users[])"
[[ -z $TS_WINDOW_TEXT ]] || how+=", or it happens in the maintenance window (${TS_WINDOW_TEXT})"
decide hold "$TS_USER's workspace is busy ($what), so its replacement waits and nothing of theirs was touched; other users' rollouts go on (pulumi up --continue-on-error). To proceed: $how; then pulumi up again."
