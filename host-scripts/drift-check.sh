#!/usr/bin/env bash
# Drift check: every installed host step's own `check` (look, change nothing), and what differs from the declared
# state as textfile metrics. Run by ts-drift-check.timer (daily).
# Inputs: TS_TEXTFILE_DIR; TS_STEPS_DIR (optional, default /var/lib/train-server/steps: where the program's bundles
#   install each step, components/host.ts); TS_DRIFT_TIMEOUT (optional, seconds per step's check, default 600);
#   TS_LOG_DIR (optional, default /var/log/train-server: each check's stderr is appended to <step>.log, root only,
#   like the step's apply output).
# A step is a directory <steps>/<step>/ holding script.sh, lib.sh, env and files/ (anything else is skipped). Its
# check runs as the step's teardown runs its destroy: `set -a; . env; set +a` in an otherwise empty environment
# (none of this job's TS_* reaches it), stdin from /dev/null, under `timeout`.
# A check's verdicts are its stdout lines `drift.<item>=yes|no` (lib.sh's `drift`); a check that only reports a
# count of pending changes (`pending=N` or `drift=N`, N > 0) without naming one is reported as item "unnamed".
# Metrics: train_server_drift{step,item} (1 = differs, 0 = named by the check and equal),
# train_server_drift_items{step} (how many differ; only for a check that ran to the end),
# train_server_drift_check_success{step} (0 = the check failed or timed out: its verdicts are unknown),
# train_server_drift_check_duration_seconds{step}. The job itself fails only when it cannot check at all.
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "${BASH_SOURCE[0]%/*}/lib.sh"
# shellcheck source=ops-lib.sh
source "${BASH_SOURCE[0]%/*}/ops-lib.sh"
action=$(ts_action "${1:-}")
require_env TS_TEXTFILE_DIR
steps_dir=${TS_STEPS_DIR:-/var/lib/train-server/steps}
log_dir=${TS_LOG_DIR:-/var/log/train-server}
timeout_s=${TS_DRIFT_TIMEOUT:-600}
[[ $timeout_s =~ ^[1-9][0-9]*$ ]] || die "TS_DRIFT_TIMEOUT must be a whole number of seconds (got '$timeout_s')"

ops_collector_only "$action"

ops_start drift-check
[[ -d $steps_dir ]] || die "$steps_dir does not exist: no step of the program is installed here"
mkdir -p "$log_dir"
chmod 700 "$log_dir"

# check_step DIR: run the step's installed check; its stdout on ours, its stderr into the step's log
check_step() {
  local d=$1 log=$log_dir/${1##*/}.log
  touch "$log" && chmod 600 "$log"
  printf '[drift-check] %s: check\n' "$(date -u +%FT%TZ)" >>"$log"
  # shellcheck disable=SC2016 # expanded by the inner bash, from its arguments
  timeout --kill-after=10 "$timeout_s" env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8 HOME=/root \
    bash -c 'set -a; . "$1/env"; set +a; exec bash "$1/script.sh" check' drift-check "$d" </dev/null 2>>"$log"
}

checked=0 failed=0 differing=0
for d in "$steps_dir"/*/; do
  d=${d%/}
  step=${d##*/}
  [[ -d $d ]] || continue
  if ! [[ $step =~ ^[a-z0-9][a-z0-9-]*$ && -f $d/script.sh && -f $d/lib.sh && -f $d/env && -d $d/files ]]; then
    log "skipped $d: not a complete step (script.sh, lib.sh, env, files/)"
    continue
  fi
  checked=$((checked + 1))
  start=$(date +%s) rc=0
  out=$(check_step "$d") || rc=$?
  l="step=\"$step\""
  metric train_server_drift_check_duration_seconds "$l" "$(($(date +%s) - start))"
  if ((rc != 0)); then
    failed=$((failed + 1))
    metric train_server_drift_check_success "$l" 0
    if ((rc == 124 || rc == 137)); then why="timed out after ${timeout_s}s"; else why="failed (exit $rc)"; fi
    log "$step: check $why: its verdicts are unknown (see $log_dir/$step.log)"
    result "drift_check.$step" failed
    continue
  fi
  metric train_server_drift_check_success "$l" 1
  n=0 named=() pending=0
  while IFS='=' read -r key value; do
    if [[ $key =~ ^drift\.[A-Za-z0-9_.-]+$ && ($value == yes || $value == no) ]]; then
      item=${key#drift.}
      if [[ $value == yes ]]; then
        metric train_server_drift "$l,item=\"$item\"" 1
        n=$((n + 1)) named+=("$item")
      else
        metric train_server_drift "$l,item=\"$item\"" 0
      fi
    elif [[ $key =~ ^(pending|drift)$ && $value =~ ^[0-9]+$ ]]; then
      pending=$((pending + value))
    fi
  done <<<"$out"
  if ((n == 0 && pending > 0)); then
    metric train_server_drift "$l,item=\"unnamed\"" 1
    n=1 named=("unnamed ($pending pending change(s))")
  fi
  metric train_server_drift_items "$l" "$n"
  result "drift_items.$step" "$n"
  if ((n)); then
    differing=$((differing + 1))
    log "$step: differs from the declared state: ${named[*]} (details: $log_dir/$step.log; \`pulumi up\` restores it)"
  else
    log "$step: as declared"
  fi
done
((checked)) || die "no complete step under $steps_dir"
result steps_checked "$checked"
result steps_failed "$failed"
result steps_differing "$differing"
finish
