# shellcheck shell=bash
# Shared by the ops job scripts (snapshot, backup, verify-restore, scrub, usage-collector, data-sync); sourced
# after lib.sh. Gives: textfile metrics written atomically at exit (outcome + timestamps of the task), restic/rclone
# environment from root-only files.
#
# Metrics of task T go to $TS_TEXTFILE_DIR/train_server_T.prom:
#   train_server_task_success{task="T"}                         1 = last run succeeded, 0 = failed
#   train_server_task_last_run_timestamp_seconds{task="T"}      end of the last run
#   train_server_task_last_success_timestamp_seconds{task="T"}  end of the last successful run (kept across failures)
#   train_server_task_duration_seconds{task="T"}
# plus what the task adds with `metric`. (Label `task`, not `job`: `job` is Prometheus' own target label.)
# A metric named *_total is typed counter (the Prometheus naming rule), every other one gauge.

OPS_TASK=
OPS_STARTED=0
OPS_SCRATCH= # a scratch directory ops_finish removes
declare -a OPS_METRIC_NAMES=()
declare -A OPS_METRIC_LINES=()

# metric NAME LABELS VALUE: one sample (LABELS like 'user="alice",dir="home"', may be empty).
metric() {
  local name=$1 labels=$2 value=$3
  if [[ -z ${OPS_METRIC_LINES[$name]+x} ]]; then
    OPS_METRIC_NAMES+=("$name")
    OPS_METRIC_LINES[$name]=
  fi
  OPS_METRIC_LINES[$name]+="${name}{${labels}} ${value}"$'\n'
}

# ops_collector_only ACTION: a collector only has `apply`; for check and destroy it reports nothing to do and exits.
ops_collector_only() {
  case $1 in
    check | destroy)
      log "nothing to $1 (a collector: run with apply)"
      finish
      exit 0
      ;;
  esac
}

# ops_start TASK: from here on, the task's outcome is written on exit (success = exit status 0).
ops_start() {
  OPS_TASK=$1
  OPS_STARTED=$(date +%s)
  require_env TS_TEXTFILE_DIR
  trap ops_finish EXIT
}

ops_write_metrics() {
  local file=$TS_TEXTFILE_DIR/train_server_${OPS_TASK}.prom tmp name type
  mkdir -p "$TS_TEXTFILE_DIR"
  tmp=$(mktemp "$TS_TEXTFILE_DIR/.train_server_${OPS_TASK}.XXXXXX")
  {
    for name in "${OPS_METRIC_NAMES[@]}"; do
      type=gauge
      [[ $name == *_total ]] && type=counter
      printf '# HELP %s train-server ops metric (host-scripts/ops-lib.sh).\n# TYPE %s %s\n' "$name" "$name" "$type"
      printf '%s' "${OPS_METRIC_LINES[$name]}"
    done
  } >"$tmp"
  chmod 0644 "$tmp"
  mv -f "$tmp" "$file"
}

ops_finish() {
  local rc=$? now last_success=0 file=$TS_TEXTFILE_DIR/train_server_${OPS_TASK}.prom
  trap - EXIT
  [[ -n $OPS_SCRATCH && -d $OPS_SCRATCH ]] && rm -rf "$OPS_SCRATCH"
  now=$(date +%s)
  if [[ -f $file ]]; then
    last_success=$(awk '/^train_server_task_last_success_timestamp_seconds\{/ {print $2}' "$file" | head -n1)
    [[ $last_success =~ ^[0-9]+$ ]] || last_success=0
  fi
  local ok=0
  if [[ $rc == 0 ]]; then ok=1; last_success=$now; fi
  local l="task=\"$OPS_TASK\""
  metric train_server_task_success "$l" "$ok"
  metric train_server_task_last_run_timestamp_seconds "$l" "$now"
  metric train_server_task_last_success_timestamp_seconds "$l" "$last_success"
  metric train_server_task_duration_seconds "$l" "$((now - OPS_STARTED))"
  ops_write_metrics || log "could not write metrics to $TS_TEXTFILE_DIR"
  if [[ $rc == 0 ]]; then log "$OPS_TASK succeeded"; else log "$OPS_TASK FAILED (exit $rc)"; fi
  exit "$rc"
}

# ops_secret_file PATH: a root-only (no group/other access) regular file, or die.
ops_secret_file() {
  local f=$1
  [[ -f $f ]] || die "secret file $f is missing (ops-install.sh writes it from the stack's secrets)"
  [[ $(stat -c '%a' "$f") =~ ^[0-7]00$ ]] || die "secret file $f is readable by group/other (chmod 600 $f)"
}

# ops_restic_env: export restic's and rclone's settings (the password and rclone config stay in their files).
ops_restic_env() {
  require_env TS_RESTIC_REPOSITORY TS_RESTIC_PASSWORD_FILE TS_RCLONE_CONFIG
  ops_secret_file "$TS_RESTIC_PASSWORD_FILE"
  ops_secret_file "$TS_RCLONE_CONFIG"
  export RESTIC_REPOSITORY=$TS_RESTIC_REPOSITORY RESTIC_PASSWORD_FILE=$TS_RESTIC_PASSWORD_FILE
  export RCLONE_CONFIG=$TS_RCLONE_CONFIG
  export RESTIC_CACHE_DIR=${TS_STATE_DIR:-/var/lib/train-server/ops}/restic-cache
}

# ops_staging_dir: where backup.sh keeps the read-only snapshot it backed up last (verify-restore compares to it).
ops_staging_dir() { printf '%s/.snapshots/.backup' "$TS_MOUNTPOINT"; }
