#!/usr/bin/env bash
# rollout-ready: let the waiting workspace update (a new image or new limits) replace this workspace at the admin's
# next `pulumi up`, although you are logged in or running work. Your home, /workspace, /shared, your inner Docker
# images and volumes and your SSH host keys stay; running processes get SIGTERM and up to 50 s to save, then the
# container is replaced. The release is good for 24 hours (then the update waits again for a quiet workspace).
#   rollout-ready            release the update
#   rollout-ready --status   show whether an update is waiting and whether you released it
#   rollout-ready --cancel   take the release back
set -euo pipefail
dir=$HOME/.train-server
ready=$dir/rollout-ready
pending=$dir/rollout-pending
case ${1:-} in
  "")
    mkdir -p "$dir"
    date '+released %F %H:%M' >"$ready"
    echo "Released: the next pulumi up may replace this workspace (within 24 h). Save your work; running processes get SIGTERM first."
    ;;
  --cancel)
    rm -f "$ready"
    echo "Release taken back: an update waits until this workspace is quiet."
    ;;
  --status)
    if [[ -f $pending ]]; then cat "$pending"; else echo "No workspace update is waiting."; fi
    if [[ -f $ready ]]; then echo "You released it: $(cat "$ready")"; fi
    ;;
  -h | --help)
    sed -n '2,8s/^# \{0,1\}//p' "$0"
    ;;
  *)
    echo "rollout-ready: unknown option '$1' (try --help)" >&2
    exit 2
    ;;
esac
