#!/usr/bin/env bash
# supervisord program `graceful-stop` (images/workspace/supervisor/graceful-stop.conf): idle while the workspace
# runs. When the container stops (a replace, an image roll, a destroy: `docker stop` with the container's stop
# timeout), supervisord stops it FIRST (highest priority), and it sends SIGTERM to every process of the workspace's
# user: SSH and desktop sessions, tmux and screen, nohup'd training runs, code-server terminals, Jupyter and its
# kernels, and the user's rootless dockerd, which stops the nested containers gracefully (their processes that run
# as the user get the SIGTERM directly too). It waits until they are all gone, at most WORKSPACE_USER_STOP_GRACE_S
# (default 50), and returns; then supervisord stops the rest (sshd). Without it
# those processes were SIGKILLed when supervisord, PID 1, exited.
set -u
user=${WORKSPACE_USER:?WORKSPACE_USER is not set}
grace=${WORKSPACE_USER_STOP_GRACE_S:-50}
[[ $grace =~ ^[0-9]+$ ]] || { echo "graceful-stop: WORKSPACE_USER_STOP_GRACE_S=$grace is not a number of seconds" >&2; exit 2; }

stop() {
  local n
  n=$(pgrep -c -u "$user" || true)
  echo "graceful-stop: SIGTERM to ${n:-0} processes of $user, waiting up to ${grace}s" >&2
  pkill -TERM -u "$user" || true
  for ((i = 0; i < grace * 10; i++)); do
    pgrep -u "$user" >/dev/null || { echo "graceful-stop: every process of $user ended after $((i / 10))s" >&2; exit 0; }
    sleep 0.1
  done
  echo "graceful-stop: $(pgrep -c -u "$user") processes of $user still running after ${grace}s; they get SIGKILL" >&2
  exit 0
}
trap stop TERM INT
while :; do
  sleep 3600 &
  wait $!
done
