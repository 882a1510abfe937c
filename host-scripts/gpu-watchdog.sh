#!/usr/bin/env bash
# GPU watchdog: can each running workspace still reach the GPUs the config gives it? Run by ts-gpu-watchdog.timer
# (every minute, GPU hosts only).
# Inputs: TS_GPU_WORKSPACES ("user:container:expected ...": the workspace container of every user with GPUs and how
#   many GPUs the config gives it; rendered by components/render/ops.ts), TS_TEXTFILE_DIR.
#
# Per workspace: `docker exec <container> nvidia-smi -L` (20 s at most), counting its `GPU <n>: ...` lines. The classic
# failure is a container whose GPUs came from the NVIDIA runtime hook only and lost them on a `systemctl
# daemon-reload` (NVIDIA/nvidia-container-toolkit#48): nvidia-smi then prints "Failed to initialize NVML: Unknown
# Error" and lists nothing. A stopped workspace is not probed.
# Metrics (textfile train_server_gpu-watchdog.prom, plus the task metrics of ops-lib.sh):
#   train_server_workspace_running{user}        1 running, 0 not (stopped, missing)
#   train_server_workspace_gpus_expected{user}  GPUs the config gives the workspace
#   train_server_workspace_gpus_visible{user}   GPUs nvidia-smi -L lists inside it (running workspaces only)
#   train_server_workspace_gpu_reachable{user}  1 when nvidia-smi succeeds and lists exactly the expected number
source "${BASH_SOURCE[0]%/*}/lib.sh"
source "${BASH_SOURCE[0]%/*}/ops-lib.sh"
action=$(ts_action "${1:-}")
require_env 'TS_GPU_WORKSPACES?' TS_TEXTFILE_DIR

ops_collector_only "$action"

ops_start gpu-watchdog
command -v docker >/dev/null || die "docker is not installed"
docker info --format '{{.ServerVersion}}' >/dev/null 2>&1 || die "the Docker daemon does not answer (docker info)"

unreachable=0
for entry in ${TS_GPU_WORKSPACES:-}; do
  IFS=: read -r user container expected <<<"$entry"
  [[ $user =~ ^[a-z_][a-z0-9_-]*$ && $container =~ ^[A-Za-z0-9][A-Za-z0-9_.-]*$ && $expected =~ ^[1-9][0-9]*$ ]] \
    || die "TS_GPU_WORKSPACES entry '$entry' is not user:container:count"
  l="user=\"$user\""
  metric train_server_workspace_gpus_expected "$l" "$expected"
  if [[ $(docker inspect -f '{{.State.Running}}' "$container" 2>/dev/null) != true ]]; then
    metric train_server_workspace_running "$l" 0
    result "gpu.$user" not-running
    continue
  fi
  metric train_server_workspace_running "$l" 1
  rc=0
  out=$(timeout 20 docker exec "$container" nvidia-smi -L 2>&1) || rc=$?
  visible=$(grep -cE '^GPU [0-9]+: ' <<<"$out" || true)
  reachable=0
  if ((rc == 0 && visible == expected)); then reachable=1; fi
  metric train_server_workspace_gpus_visible "$l" "$visible"
  metric train_server_workspace_gpu_reachable "$l" "$reachable"
  result "gpu.$user" "$visible/$expected"
  if ((!reachable)); then
    unreachable=$((unreachable + 1))
    log "$user: $container sees $visible of $expected GPUs (nvidia-smi exit $rc: $(head -n 1 <<<"$out"))"
  fi
done
result unreachable "$unreachable"
finish
