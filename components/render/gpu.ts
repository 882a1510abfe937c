/**
 * The GPU ledger's Prometheus rules and idle notices (pure). The ledger (host-scripts/gpu-ledger.sh) writes per-GPU
 * and per-user busy seconds, memory, the users' pinned GPUs (train_server_gpu_reservation{user,gpu}) and the host's
 * UTC offset; the rules here turn them into who-uses-what series for the dashboard and the digest, the working
 * hours in the host's local time, and one alert:
 *
 *   GpuReservationIdle{user}: every GPU pinned to the user (an index list in users[i].gpus; `all` is the shared pool,
 *   not a reservation, and `none` has nothing) has been idle — below 5 % busy over 15 minutes — for `idleHours`
 *   in a row, all of them inside working hours. Outside working hours the expression is false, so the count
 *   restarts each working day: idle evenings and weekends never count. Severity `info`: the user gets a Telegram
 *   notice in their own chat (users[i].telegramChatId), the admin chat one summary; nothing is ever stopped.
 */
import type { AlertRule } from "./alerts";

/** Days as PromQL's day_of_week() numbers them (0 = Sunday). */
const DAY_NUMBER: Record<string, number> = { sunday: 0, monday: 1, tuesday: 2, wednesday: 3, thursday: 4, friday: 5, saturday: 6 };

export interface WorkingHours {
  /** Lowercase weekday names, e.g. ["monday", ..., "friday"]. */
  days: string[];
  /** "HH:MM", local time of the host. */
  start: string;
  /** "HH:MM", after start. */
  end: string;
}

export interface GpuAlertParams {
  /** Working hours in a row the pinned GPUs may idle before the notice (default 4). */
  idleHours: number;
  workingHours: WorkingHours;
  /** Users with their own Telegram chat for the notice (the admin chat gets every notice anyway). */
  userChats: Array<{ user: string; chatId: number }>;
}

export interface RecordingRule {
  record: string;
  expr: string;
}

/** A GPU counts as idle below this busy share (over 15 minutes). */
export const GPU_IDLE_BELOW = 0.05;

function minutesOfDay(hhmm: string, what: string): number {
  const m = /^([01]\d|2[0-3]):([0-5]\d)$/.exec(hhmm);
  if (!m) throw new Error(`alerts.workingHours.${what}: "${hhmm}" is not a time like "09:00"`);
  return Number(m[1]) * 60 + Number(m[2]);
}

/** The working hours as [from, to) minute-of-week ranges (Sunday 00:00 = 0), in the order of `days`. */
export function workingRanges(w: WorkingHours): Array<[number, number]> {
  const start = minutesOfDay(w.start, "start");
  const end = minutesOfDay(w.end, "end");
  if (end <= start) throw new Error(`alerts.workingHours.end ${w.end} is not after alerts.workingHours.start ${w.start}`);
  if (w.days.length === 0) throw new Error("alerts.workingHours.days is empty");
  return w.days.map((d) => {
    const n = DAY_NUMBER[d];
    if (n === undefined) throw new Error(`alerts.workingHours.days: "${d}" is not a day of the week`);
    return [n * 1440 + start, n * 1440 + end];
  });
}

/** `for:` of a number of hours (fractions as minutes). */
function forHours(h: number): string {
  if (!(h > 0)) throw new Error(`alerts.gpuIdleHours must be a positive number (got ${h})`);
  return Number.isInteger(h) ? `${h}h` : `${Math.round(h * 60)}m`;
}

const fmtDays = (days: string[]) => days.map((d) => d.slice(0, 3).replace(/^./, (c) => c.toUpperCase())).join(", ");

/** A GPU collector (a minutely task) failed its last run or has not run for `staleAfterS`: a warning after 10 min. */
export function collectorFailingRule(p: { alert: string; task: string; staleAfterS: number; summary: string; description: string }): AlertRule {
  return {
    alert: p.alert,
    expr: `train_server_task_success{task="${p.task}"} == 0 or time() - train_server_task_last_run_timestamp_seconds{task="${p.task}"} > ${p.staleAfterS}`,
    for: "10m",
    labels: { severity: "warning", family: "gpu" },
    annotations: { summary: p.summary, description: p.description },
  };
}

/**
 * Recording rules (one group, evaluated in order: later rules read earlier ones of the same evaluation) and the
 * alerts of the GPU ledger.
 */
export function gpuRules(p: GpuAlertParams): { recording: RecordingRule[]; alerts: AlertRule[] } {
  const L = "train_server:local_time_seconds";
  const M = "train_server:local_minute_of_week";
  const inRange = workingRanges(p.workingHours).map(([a, b]) => `${M} >= ${a} < ${b}`);
  const recording: RecordingRule[] = [
    // the host's wall clock (the ledger reports its UTC offset, so summer time follows the host)
    { record: L, expr: "time() + max by (instance) (train_server_utc_offset_seconds)" },
    { record: M, expr: `day_of_week(${L}) * 1440 + hour(${L}) * 60 + minute(${L})` },
    // 1 inside working hours, 0 outside
    { record: "train_server:working_hours", expr: `(${inRange.join(" or ")}) * 0 + 1 or ${M} * 0` },
    { record: "train_server:gpu_busy_ratio:rate15m", expr: "rate(train_server_gpu_busy_seconds_total[15m])" },
    { record: "train_server:gpu_user_busy_ratio:rate5m", expr: "sum by (instance, gpu, user) (rate(train_server_gpu_user_busy_seconds_total[5m]))" },
    { record: "train_server:gpu_user_memory_peak_bytes:max1h", expr: "max by (instance, gpu, user) (max_over_time(train_server_gpu_user_memory_bytes[1h]))" },
    // per pinned GPU: 1 idle, 0 busy
    {
      record: "train_server:gpu_reservation_idle",
      expr: `train_server_gpu_reservation * on (instance, gpu) group_left () (train_server:gpu_busy_ratio:rate15m < bool ${GPU_IDLE_BELOW})`,
    },
    // per pinned GPU: 1 when idle inside working hours (the digest sums it)
    { record: "train_server:gpu_reservation_idle_working", expr: "train_server:gpu_reservation_idle * on (instance) group_left () train_server:working_hours" },
    // per user: 1 when every pinned GPU is idle
    { record: "train_server:user_gpus_idle", expr: "min by (instance, user) (train_server:gpu_reservation_idle)" },
  ];
  const w = p.workingHours;
  const hours = `${p.idleHours} h`;
  const alerts: AlertRule[] = [
    {
      alert: "GpuReservationIdle",
      expr: "train_server:user_gpus_idle == 1 and on (instance) train_server:working_hours == 1",
      for: forHours(p.idleHours),
      labels: { severity: "info", family: "gpu-idle" },
      annotations: {
        summary: `{{ $labels.user }}: pinned GPUs idle for ${hours} of working hours`,
        description:
          `The GPUs pinned to {{ $labels.user }} have been idle (under ${GPU_IDLE_BELOW * 100} % busy) for ${hours} in a row during working hours ` +
          `(${fmtDays(w.days)} ${w.start}-${w.end}). Nothing was stopped. If you no longer need them, ask the admin to release them (users[i].gpus) for the team.`,
      },
    },
    collectorFailingRule({
      alert: "GpuLedgerFailing",
      task: "gpu-ledger",
      staleAfterS: 900,
      summary: "The GPU ledger is not counting",
      description: "GPU hours per user and idle notices are stale: `systemctl status ts-gpu-ledger.timer`, `journalctl -u ts-gpu-ledger`.",
    }),
  ];
  return { recording, alerts };
}

/** Receiver name of a user's own Telegram chat. */
export const userReceiver = (user: string) => `telegram-user-${user}`;

/**
 * Alertmanager routes and receivers of the idle notices: the user's own chat first (continue), then the admin chat
 * with one summary of all notices; neither says "resolved" when the working day ends.
 */
export function gpuNoticeRouting(p: GpuAlertParams, telegram: Record<string, unknown>): { routes: object[]; receivers: object[] } {
  const seen = new Set<string>();
  for (const u of p.userChats) {
    if (!/^[a-z_][a-z0-9_-]*$/.test(u.user) || seen.has(u.user)) throw new Error(`users: bad or duplicate user "${u.user}" for an idle notice chat`);
    if (!Number.isInteger(u.chatId)) throw new Error(`users[${u.user}].telegramChatId must be an integer`);
    seen.add(u.user);
  }
  const notice = { ...telegram, send_resolved: false };
  return {
    routes: [
      ...p.userChats.map((u) => ({
        receiver: userReceiver(u.user),
        matchers: ['alertname="GpuReservationIdle"', `user="${u.user}"`],
        group_by: ["alertname", "user"],
        repeat_interval: "24h",
        continue: true,
      })),
      { receiver: "telegram-notices", matchers: ['severity="info"'], repeat_interval: "24h" },
    ],
    receivers: [
      { name: "telegram-notices", telegram_configs: [{ ...notice, message: '{{ range .Alerts.Firing }}{{ .Annotations.summary }}{{ "\\n" }}{{ end }}(nothing was stopped)' }] },
      ...p.userChats.map((u) => ({
        name: userReceiver(u.user),
        telegram_configs: [{ ...notice, chat_id: u.chatId, message: "{{ range .Alerts.Firing }}{{ .Annotations.description }}{{ end }}" }],
      })),
    ],
  };
}

/** TS_GPU_USERS of gpu-ledger.sh: "name:uid:gpus" with gpus all, none or indexes ("0,2"). */
export function gpuUsersEnv(users: Array<{ name: string; uid: number; gpus?: "all" | number[] }>): string {
  return users
    .map((u) => {
      const g = u.gpus ?? "all";
      if (Array.isArray(g) && g.some((i) => !Number.isInteger(i) || i < 0)) throw new Error(`user ${u.name}: gpus must be GPU indexes`);
      return `${u.name}:${u.uid}:${g === "all" ? "all" : g.length === 0 ? "none" : [...g].sort((a, b) => a - b).join(",")}`;
    })
    .join(" ");
}
