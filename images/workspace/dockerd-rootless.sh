#!/usr/bin/env bash
# supervisord program `dockerd` (images/workspace/supervisor/dockerd.conf), run as the workspace's user: the user's
# own rootless Docker daemon. rootlesskit puts dockerd in a user namespace where the user is root and the user's
# subordinate ids (/etc/subuid, /etc/subgid: written by the entrypoint) are the other ids; slirp4netns gives it a
# network (/dev/net/tun). The container itself is not privileged: nothing this daemon runs has more rights on the
# host than the user, and nested containers stay in the workspace's cgroup (its cpuset, memory and GPU limits).
#   data root  --data-root from supervisor/dockerd.conf: on the user's state subvolume (survives image updates)
#   socket     $XDG_RUNTIME_DIR/docker.sock = /run/user/<uid>/docker.sock (DOCKER_HOST in /etc/environment)
# The user's home is not written (no ~/.local/share/docker; XDG_CONFIG_HOME moves ~/.config/docker to the state
# mount: the user's own daemon.json goes to /var/lib/workspace/docker-rootless/config/docker/daemon.json).
set -euo pipefail
: "${XDG_RUNTIME_DIR:?XDG_RUNTIME_DIR is not set (supervisor/dockerd.conf sets it)}"
[[ $(id -u) != 0 ]] || { echo "workspace-dockerd: must run as the workspace's user, not root" >&2; exit 2; }
# Debian/Ubuntu's docker.io ships the rootless launcher with its contrib scripts; Docker's own packages put it on PATH
for launcher in /usr/share/docker.io/contrib/dockerd-rootless.sh /usr/bin/dockerd-rootless.sh; do
  [[ -x $launcher ]] && break
done
[[ -x $launcher ]] || { echo "workspace-dockerd: dockerd-rootless.sh not found (package docker.io)" >&2; exit 2; }
export PATH=/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin
exec "$launcher" --host="unix://$XDG_RUNTIME_DIR/docker.sock" "$@"
