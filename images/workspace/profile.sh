# shellcheck shell=sh
# /etc/profile.d/train-server.sh: the shared cache locations for login shells (see /etc/train-server/cache.env).
set -a
# shellcheck source-path=SCRIPTDIR source=cache.env
. /etc/train-server/cache.env
set +a
# a workspace update waiting for this user (written by the host's rollout guard): say so at every login
if [ -f "$HOME/.train-server/rollout-pending" ] && [ ! -f "$HOME/.train-server/rollout-ready" ]; then
  printf '\n*** %s\n    (rollout-ready --help)\n\n' "$(head -n 1 "$HOME/.train-server/rollout-pending")" >&2
fi
