#!/usr/bin/env bash
# The weekly Telegram digest: GPU hours per user, idle reservations, quota standings, backup status. Run by
# ts-weekly-digest.timer. Asks Prometheus' HTTP API (/api/v1/query) for last week's figures, renders them with
# weekly-digest.jq (a pure function of the query results: tests feed it recorded data) and sends the text to the
# admin chat through the Telegram bot API (sendMessage; the token stays in its root-only file and off every
# command line).
# Inputs: TS_TELEGRAM_CHAT_ID, TS_TELEGRAM_BOT_TOKEN_FILE, TS_TELEGRAM_API_URL (e.g. https://api.telegram.org),
#   TS_PROMETHEUS_URL (may be empty: the `prometheus` container's address on its Docker network, port 9090),
#   TS_QUOTA_WARN_PERCENT.
# apply: query, render, send. check: query and render to stdout, send nothing.
source "${BASH_SOURCE[0]%/*}/lib.sh"
source "${BASH_SOURCE[0]%/*}/ops-lib.sh"
action=$(ts_action "${1:-}")
require_env TS_TELEGRAM_CHAT_ID TS_TELEGRAM_BOT_TOKEN_FILE TS_TELEGRAM_API_URL 'TS_PROMETHEUS_URL?' TS_QUOTA_WARN_PERCENT
renderer=${BASH_SOURCE[0]%/*}/weekly-digest.jq

case $action in
  destroy)
    log "nothing to destroy"
    finish
    exit 0
    ;;
  apply) ops_start weekly-digest ;;
esac
for tool in curl jq; do command -v "$tool" >/dev/null || die "$tool is missing (apt-get install $tool)"; done
[[ -f $renderer ]] || die "$renderer is missing (ops-install.sh installs it beside this script)"
[[ $TS_TELEGRAM_CHAT_ID =~ ^-?[0-9]+$ ]] || die "TS_TELEGRAM_CHAT_ID '$TS_TELEGRAM_CHAT_ID' is not a chat id"
[[ $TS_QUOTA_WARN_PERCENT =~ ^[0-9]+$ ]] || die "TS_QUOTA_WARN_PERCENT '$TS_QUOTA_WARN_PERCENT' is not a percentage"

prom=$TS_PROMETHEUS_URL
if [[ -z $prom ]]; then
  ip=$(docker inspect -f '{{range .NetworkSettings.Networks}}{{.IPAddress}} {{end}}' prometheus 2>/dev/null | awk '{print $1}') ||
    die "the prometheus container is not running (docker inspect prometheus)"
  [[ -n $ip ]] || die "the prometheus container has no network address"
  prom=http://$ip:9090
fi

OPS_SCRATCH=$(mktemp -d)
[[ $action == apply ]] || trap 'rm -rf "$OPS_SCRATCH"' EXIT # apply: ops_finish removes it
now=$(date +%s)
# name -> PromQL over the week before now; *_hours of pinned idle GPUs and working hours count 5-minute steps
declare -A queries=(
  [gpu_hours]='sum by (user, gpu) (increase(train_server_gpu_user_busy_seconds_total[7d])) / 3600'
  [gpu_peak_bytes]='max by (user) (max_over_time(train_server_gpu_user_memory_bytes[7d]))'
  [gpus]='count(max_over_time(train_server_gpu_memory_total_bytes[7d]))'
  [idle_hours]='sum by (user, gpu) (sum_over_time(train_server:gpu_reservation_idle_working[7d:5m])) * 300 / 3600'
  [working_hours]='max(sum_over_time(train_server:working_hours[7d:5m])) * 300 / 3600'
  [quota_used_bytes]='sum by (user) (train_server_user_usage_bytes)'
  [quota_bytes]='max by (user) (train_server_user_quota_bytes)'
  [backup_last_success]='max(train_server_task_last_success_timestamp_seconds{task="backup"})'
  [backup_ok]='min(train_server_task_success{task="backup"})'
  [verify_last_success]='max(train_server_task_last_success_timestamp_seconds{task="verify-restore"})'
)
for name in "${!queries[@]}"; do
  curl -fsS --max-time 60 -G "$prom/api/v1/query" --data-urlencode "query=${queries[$name]}" --data-urlencode "time=$now" \
    -o "$OPS_SCRATCH/$name.json" || die "Prometheus at $prom did not answer the $name query"
  jq -e '.status == "success"' "$OPS_SCRATCH/$name.json" >/dev/null || die "Prometheus refused the $name query: $(cat "$OPS_SCRATCH/$name.json")"
done
jq -n --argjson now "$now" --argjson warn "$TS_QUOTA_WARN_PERCENT" \
  '{now: $now, warn_percent: $warn} + ([inputs | {(input_filename | sub(".*/"; "") | sub("\\.json$"; "")): .data.result}] | add)' \
  "$OPS_SCRATCH"/*.json >"$OPS_SCRATCH/data.json"
jq -r -f "$renderer" "$OPS_SCRATCH/data.json" >"$OPS_SCRATCH/digest.txt"

if [[ $action == check ]]; then
  cat "$OPS_SCRATCH/digest.txt"
  finish
  exit 0
fi

ops_secret_file "$TS_TELEGRAM_BOT_TOKEN_FILE"
token=$(<"$TS_TELEGRAM_BOT_TOKEN_FILE")
[[ $token =~ ^[0-9]+:[A-Za-z0-9_-]+$ ]] || die "$TS_TELEGRAM_BOT_TOKEN_FILE does not hold a bot token (<id>:<secret>)"
# the URL (with the token) reaches curl through its config on stdin, never through argv
printf 'url = "%s/bot%s/sendMessage"\n' "${TS_TELEGRAM_API_URL%/}" "$token" |
  curl -sS --max-time 60 -K - --data-urlencode "chat_id=$TS_TELEGRAM_CHAT_ID" --data-urlencode "text@$OPS_SCRATCH/digest.txt" \
    -o "$OPS_SCRATCH/sent.json" || die "the Telegram API did not answer"
jq -e '.ok == true' "$OPS_SCRATCH/sent.json" >/dev/null || die "Telegram refused the digest: $(jq -c '{error_code, description}' "$OPS_SCRATCH/sent.json" 2>/dev/null)"
result sent "$(wc -c <"$OPS_SCRATCH/digest.txt")"
finish
