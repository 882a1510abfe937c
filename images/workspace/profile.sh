# shellcheck shell=sh
# /etc/profile.d/train-server.sh: the shared cache locations for login shells (see /etc/train-server/cache.env).
set -a
# shellcheck source-path=SCRIPTDIR source=cache.env
. /etc/train-server/cache.env
set +a
