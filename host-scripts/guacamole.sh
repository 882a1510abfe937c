#!/usr/bin/env bash
# Guacamole's database: the schema once, then the users, connections and permissions of config.
# TS_DB_CONTAINER, TS_DB_NAME, TS_DB_USER: the PostgreSQL container (running) and the database/role in it.
# TS_WEB_IMAGE: the guacamole/guacamole image whose /opt/guacamole/bin/initdb.sh --postgresql prints the schema.
# $TS_FILES_DIR/provision.sql: the provisioning SQL (components/render/guacamole.ts; secrets: never printed).
# The schema is loaded only into a database without it (guacamole_entity absent), in one transaction; the
# provisioning SQL is idempotent (a second run updates no row). Results: schema=created|present, rows=<changed rows>.
# check: drift.schema=yes|no, drift.provision=yes|no (the SQL run in a transaction that is rolled back).
# destroy: the database is kept (its data directory is under the array's docker-volumes).
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "${BASH_SOURCE[0]%/*}/lib.sh"
action=$(ts_action "$@")
require_env TS_DB_CONTAINER TS_DB_NAME TS_DB_USER TS_WEB_IMAGE

if [[ $action == destroy ]]; then
  log "Guacamole's database is kept (nothing to undo)"
  finish
  exit 0
fi
sql=$TS_FILES_DIR/provision.sql
[[ -f $sql ]] || die "$sql is missing"

psql_db() { docker exec -i "$TS_DB_CONTAINER" psql -X -q -v ON_ERROR_STOP=1 -U "$TS_DB_USER" -d "$TS_DB_NAME" "$@"; }

# the database answers (the container's health check may lag behind a fresh start)
for _ in $(seq 1 120); do
  docker exec "$TS_DB_CONTAINER" pg_isready -q -U "$TS_DB_USER" -d "$TS_DB_NAME" && break
  sleep 1
done
docker exec "$TS_DB_CONTAINER" pg_isready -q -U "$TS_DB_USER" -d "$TS_DB_NAME" || die "$TS_DB_CONTAINER does not accept connections"

schema=$(psql_db -tA -c "SELECT to_regclass('public.guacamole_entity') IS NOT NULL")
# the count of rows the SQL would change: every statement's row count, summed (psql prints them with ECHO none)
count_rows() { awk '/^(INSERT [0-9]+ |UPDATE |DELETE )[0-9]+$/ { n += $NF } END { print n + 0 }'; }

if [[ $action == check ]]; then
  if [[ $schema == t ]]; then
    drift schema no
    rows=$( { echo "BEGIN;"; cat "$sql"; echo "ROLLBACK;"; } | docker exec -i "$TS_DB_CONTAINER" psql -X -v ON_ERROR_STOP=1 -U "$TS_DB_USER" -d "$TS_DB_NAME" 2>/dev/null | count_rows)
    drift provision "$([[ $rows == 0 ]] && echo no || echo yes)"
  else
    drift schema yes
    drift provision yes
  fi
  finish
  exit 0
fi

if [[ $schema != t ]]; then
  log "loading Guacamole's schema from $TS_WEB_IMAGE into $TS_DB_NAME"
  docker run --rm --network none --entrypoint /opt/guacamole/bin/initdb.sh "$TS_WEB_IMAGE" --postgresql | psql_db -1 >/dev/null \
    || die "loading the schema failed"
  changed "schema loaded"
  result schema created
else
  result schema present
fi
rows=$(docker exec -i "$TS_DB_CONTAINER" psql -X -1 -v ON_ERROR_STOP=1 -U "$TS_DB_USER" -d "$TS_DB_NAME" <"$sql" | count_rows) \
  || die "provisioning failed"
[[ $rows == 0 ]] || changed "$rows rows provisioned"
result rows "$rows"
finish
