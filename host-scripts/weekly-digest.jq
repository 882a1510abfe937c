# The weekly digest's text, a pure function of Prometheus query results (run by weekly-digest.sh; tests run it on
# recorded data: `jq -r -f weekly-digest.jq data.json`). Input: {now, warn_percent, <query name>: <the query's
# .data.result vector>} with the queries of weekly-digest.sh. Dates in the local time of the host (TZ). Plain text
# (no parse mode), at most 4000 characters (Telegram's limit is 4096).

def num: .value[1] | tonumber;
def f1: (. * 10 | round) as $n | "\($n / 10 | floor).\($n % 10)";
def spaces($n): [range(0; $n)] | map(" ") | join("");
def rpad($n): tostring | . + spaces($n - length);
def lpad($n): tostring | spaces($n - length) + .;
def gib: . / 1073741824;
def when: localtime | strftime("%a %Y-%m-%d %H:%M");
def ago($now): ($now - .) / 3600 | if . < 48 then "\(f1) h ago" else "\(. / 24 | f1) days ago" end;
def scalar($r): ($r // []) | if length == 0 then null else (.[0] | num) end;

.now as $now
| .warn_percent as $warn
| (scalar(.working_hours) // 0) as $wh
| [(.gpu_hours // [])[] | {user: .metric.user, gpu: .metric.gpu, h: num}] as $gh
| ([(.gpu_peak_bytes // [])[] | {key: .metric.user, value: num}] | from_entries) as $peak
| [(.idle_hours // [])[] | {user: .metric.user, gpu: .metric.gpu, h: num} | select(.h > 0)] as $idle
| ([(.quota_bytes // [])[] | {key: .metric.user, value: num}] | from_entries) as $quota
| ([(.quota_used_bytes // [])[] | {key: .metric.user, value: num}] | from_entries) as $used
| ((.gpus // []) | length > 0) as $gpuhost
| ([$gh[].user] + ($quota | keys) | unique) as $users
| [
    "train-server weekly digest (7 days to \($now | when))",
    "",
    (if $gpuhost | not then "GPU hours: no GPU ledger data this week"
     else
       "GPU hours per user (busy time; a shared GPU is split by the memory each user holds)",
       ($users
         | map(. as $u | {user: $u, rows: [$gh[] | select(.user == $u)]})
         | map(. + {total: ([.rows[].h] | add // 0)})
         | sort_by(-.total, .user)
         | .[]
         | "  \(.user | rpad(10)) \(.total | f1 | lpad(6)) h"
           + (if (.rows | length) > 1 then "  (" + (.rows | sort_by(.gpu) | map("GPU \(.gpu) \(.h | f1)") | join(", ")) + ")"
              elif (.rows | length) == 1 then "  (GPU \(.rows[0].gpu))" else "" end)
           + (if $peak[.user] then "  peak \($peak[.user] | gib | f1) GiB" else "" end)),
       "",
       "Idle reservations: pinned GPUs idle in working hours (\($wh | f1) working hours this week)",
       (if ($idle | length) == 0 then "  none" else ($idle | sort_by(-.h, .user, .gpu) | .[] | "  \(.user | rpad(10)) GPU \(.gpu | rpad(3)) idle \(.h | f1) h") end)
     end),
    "",
    "Quota (home + workspace + docker volumes)",
    (if ($quota | length) == 0 then "  no quota data"
     else
       ($quota | keys | map({user: ., used: ($used[.] // 0), quota: $quota[.]}) | map(. + {pct: (100 * .used / .quota)})
         | sort_by(-.pct, .user) | .[]
         | "  \(.user | rpad(10)) \(.used | gib | round | tostring | lpad(6)) of \(.quota | gib | round) GiB  \(.pct | round | tostring | lpad(3)) %"
           + (if .pct >= 100 then "  OVER QUOTA" elif .pct >= $warn then "  over \($warn) %" else "" end))
     end),
    "",
    "Backups",
    (scalar(.backup_last_success) as $t
     | if $t == null or $t == 0 then "  NO SUCCESSFUL BACKUP RECORDED"
       else "  last success \($t | when) (\($t | ago($now)))" end),
    (scalar(.backup_ok) as $ok | if $ok == null then empty elif $ok == 1 then "  last run ok" else "  LAST RUN FAILED: journalctl -u ts-backup" end),
    (scalar(.verify_last_success) as $t | if $t == null or $t == 0 then "  restore verification: never succeeded" else "  restore verified \($t | when)" end)
  ]
| join("\n")
| if length > 4000 then .[:3990] + "\n[…]" else . end
