#!/usr/bin/env bash
# restic with the server's own repository settings, for an admin by hand (not a job: it takes restic's arguments):
#   sudo /usr/local/lib/train-server/ops/restic-admin.sh snapshots --tag train-server-archive
#   sudo /usr/local/lib/train-server/ops/restic-admin.sh restore latest --tag train-server-archive,user=alice --target <dir>
# Reads the repository and the paths of the root-only secret files from ops.env (TS_OPS_ENV, default
# /etc/train-server/ops/ops.env); the password and the rclone config stay in their files.
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "${BASH_SOURCE[0]%/*}/lib.sh"
# shellcheck source-path=SCRIPTDIR source=ops-lib.sh
source "${BASH_SOURCE[0]%/*}/ops-lib.sh"
env_file=${TS_OPS_ENV:-/etc/train-server/ops/ops.env}
[[ -f $env_file ]] || die "$env_file is missing (the ops step installs it); run as root on the server"
set -a
# shellcheck disable=SC1090
. "$env_file"
set +a
ops_restic_env
(($#)) || die "usage: $0 <restic command and arguments> (e.g. snapshots --tag train-server-archive)"
exec restic "$@"
