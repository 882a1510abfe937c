/**
 * Prometheus alert rules and the Alertmanager (0.25) configuration of the Operations area. Pure functions;
 * YAML through the `yaml` library.
 *
 * Metric sources:
 *   - the ops jobs' textfile metrics (host-scripts/ops-lib.sh): train_server_task_success{task},
 *     train_server_task_last_success_timestamp_seconds{task}, train_server_task_last_run_timestamp_seconds{task},
 *     train_server_btrfs_scrub_errors{type}, train_server_btrfs_device_errors{device,type},
 *     train_server_btrfs_devices_missing{mountpoint}, train_server_mount_up{mountpoint},
 *     train_server_user_usage_bytes{user,dir}, train_server_user_quota_bytes{user},
 *     train_server_drift{step,item}, train_server_drift_check_success{step} (host-scripts/drift-check.sh)
 *     (label `task`, not `job`: `job` is Prometheus' own target label);
 *   - SMART: Debian/Ubuntu prometheus-node-exporter-collectors' smartmon.sh (smartmon_device_smart_healthy{disk});
 *   - GPU: NVIDIA's dcgm-exporter (DCGM_FI_DEV_GPU_TEMP{gpu,UUID}, degrees C);
 *   - node-exporter: node_vmstat_oom_kill, node_filesystem_{avail,size}_bytes;
 *   - on GPU hosts, the GPU ledger (host-scripts/gpu-ledger.sh): its rules and idle notices are in ./gpu.ts;
 *   - on GPU hosts, the GPU watchdog (host-scripts/gpu-watchdog.sh): train_server_workspace_gpu_reachable{user},
 *     train_server_workspace_gpus_visible{user}, train_server_workspace_gpus_expected{user}.
 */
import YAML from "yaml";
import { collectorFailingRule, GpuAlertParams, gpuNoticeRouting, gpuRules } from "./gpu";

export interface AlertParams {
  /** GPU temperature threshold, degrees C (alert after 5 minutes above). */
  gpuTempC: number;
  /** Filesystem used-space threshold, percent. */
  fsUsedPercent: number;
  /** Backup older than this many hours -> critical. */
  backupMaxAgeHours: number;
  /** Quota warning threshold, percent (critical at 100). */
  quotaWarnPercent: number;
  telegramChatId: number;
  /** Secret. Alertmanager 0.25 has no bot_token_file: the token is written into alertmanager.yml (0640). */
  telegramBotToken: string;
  /** Telegram API base URL (tests point it at a local fake). Default Alertmanager's https://api.telegram.org. */
  telegramApiUrl?: string;
  /** Array mountpoint (for the device/degraded alerts' labels). */
  mountpoint: string;
  /** Drive mountpoint (for DriveMountDown). */
  driveMountpoint: string;
  /** Whether the data sync job exists (its alert is rendered only then). Default true. */
  dataSyncEnabled?: boolean;
  /** GPU hosts: the GPU watchdog's alerts (WorkspaceGpuUnreachable, GpuWatchdogFailing). Default false. */
  gpuWatchdog?: boolean;
  /** GPU hosts: the ledger's rules, the idle notices and their routes (omit on a host without GPUs). */
  gpu?: GpuAlertParams;
}

export interface AlertRule {
  alert: string;
  expr: string;
  for?: string;
  /** `info`: a notice (idle GPUs), never paged as a problem. */
  labels: { severity: "critical" | "warning" | "info"; family: string };
  annotations: { summary: string; description: string };
}

/** `family` groups alerts about the same thing: a critical inhibits a warning of the same family and labels. */
export function alertRules(p: AlertParams): AlertRule[] {
  const num = (name: string, v: number) => {
    if (!Number.isFinite(v) || v <= 0) throw new Error(`alerts.${name} must be a positive number (got ${v})`);
    return v;
  };
  const task = (t: string) => `task="${t}"`;
  const drive = JSON.stringify(p.driveMountpoint);
  const rules: AlertRule[] = [
    {
      alert: "SmartDeviceUnhealthy",
      expr: "smartmon_device_smart_healthy == 0",
      labels: { severity: "critical", family: "disk" },
      annotations: { summary: "SMART health check failed on {{ $labels.disk }}", description: "smartctl reports the overall health of {{ $labels.disk }} as FAILED: replace the disk." },
    },
    {
      alert: "GpuTemperatureHigh",
      expr: `DCGM_FI_DEV_GPU_TEMP > ${num("gpuTempC", p.gpuTempC)}`,
      for: "5m",
      labels: { severity: "warning", family: "gpu" },
      annotations: { summary: "GPU {{ $labels.gpu }} at {{ $value }} °C", description: `GPU {{ $labels.gpu }} has been above ${p.gpuTempC} °C for 5 minutes (cooling, airflow, fan).` },
    },
    {
      alert: "BtrfsDeviceErrors",
      expr: "train_server_btrfs_device_errors > 0",
      labels: { severity: "critical", family: "btrfs" },
      annotations: { summary: "btrfs {{ $labels.type }} on {{ $labels.device }}: {{ $value }}", description: "`btrfs device stats` counts errors on {{ $labels.device }}; check the disk and `btrfs device stats -z` after repair." },
    },
    {
      alert: "BtrfsArrayDegraded",
      expr: "train_server_btrfs_devices_missing > 0",
      labels: { severity: "critical", family: "btrfs" },
      annotations: { summary: "btrfs array {{ $labels.mountpoint }} is missing {{ $value }} device(s)", description: "The array runs degraded: replace the device (`btrfs replace`) before another one fails." },
    },
    {
      alert: "OomKill",
      expr: "increase(node_vmstat_oom_kill[10m]) > 0",
      labels: { severity: "warning", family: "memory" },
      annotations: { summary: "The kernel OOM-killed {{ $value }} process(es)", description: "A process was killed for lack of memory in the last 10 minutes (a workspace over its memory limit?)." },
    },
    {
      alert: "UserQuotaWarning",
      expr: `sum by (user) (train_server_user_usage_bytes) / on (user) train_server_user_quota_bytes > ${num("quotaWarnPercent", p.quotaWarnPercent) / 100}`,
      labels: { severity: "warning", family: "quota" },
      annotations: { summary: "{{ $labels.user }} uses {{ $value | humanizePercentage }} of their quota", description: `Home + workspace + docker volumes of {{ $labels.user }} are above ${p.quotaWarnPercent} % of the quota.` },
    },
    {
      alert: "UserQuotaExceeded",
      expr: "sum by (user) (train_server_user_usage_bytes) / on (user) train_server_user_quota_bytes > 1",
      labels: { severity: "critical", family: "quota" },
      annotations: { summary: "{{ $labels.user }} is over quota ({{ $value | humanizePercentage }})", description: "Home + workspace + docker volumes of {{ $labels.user }} exceed the quota: ask them to clean up." },
    },
    {
      alert: "FilesystemAlmostFull",
      expr:
        `100 * (1 - node_filesystem_avail_bytes{fstype!~"tmpfs|ramfs|overlay|squashfs|fuse.*"} / node_filesystem_size_bytes{fstype!~"tmpfs|ramfs|overlay|squashfs|fuse.*"}) > ` +
        num("fsUsedPercent", p.fsUsedPercent),
      for: "10m",
      labels: { severity: "critical", family: "filesystem" },
      annotations: { summary: "{{ $labels.mountpoint }} is {{ $value | humanize }} % full", description: `Above ${p.fsUsedPercent} % used for 10 minutes; btrfs slows down and can fail writes when full.` },
    },
    {
      alert: "BackupTooOld",
      expr: `time() - train_server_task_last_success_timestamp_seconds{${task("backup")}} > ${num("backupMaxAgeHours", p.backupMaxAgeHours) * 3600}`,
      labels: { severity: "critical", family: "backup" },
      annotations: { summary: "Last successful restic backup is {{ $value | humanizeDuration }} old", description: `No successful backup in ${p.backupMaxAgeHours} hours: \`journalctl -u ts-backup\`.` },
    },
    {
      // a server that never backed up has no timestamp at all: BackupTooOld alone would stay silent forever
      alert: "BackupNeverSucceeded",
      expr: `absent(train_server_task_last_success_timestamp_seconds{${task("backup")}})`,
      for: `${num("backupMaxAgeHours", p.backupMaxAgeHours)}h`,
      labels: { severity: "critical", family: "backup" },
      annotations: { summary: "No restic backup has ever succeeded", description: `No successful backup recorded for ${p.backupMaxAgeHours} hours since the metrics began: \`journalctl -u ts-backup\`, \`systemctl list-timers ts-backup.timer\`.` },
    },
    {
      alert: "BackupFailed",
      expr: `train_server_task_success{${task("backup")}} == 0`,
      labels: { severity: "critical", family: "backup" },
      annotations: { summary: "The last restic backup failed", description: "`journalctl -u ts-backup` tells why; the next run is tomorrow (or `systemctl start ts-backup`)." },
    },
    {
      alert: "RestoreVerificationFailed",
      expr: `train_server_task_success{${task("verify-restore")}} == 0`,
      labels: { severity: "critical", family: "restore" },
      annotations: { summary: "The monthly restore verification failed", description: "Restored files differ from the snapshot or `restic check` found damage: `journalctl -u ts-verify-restore`." },
    },
    {
      alert: "BtrfsScrubErrors",
      expr: "train_server_btrfs_scrub_errors > 0",
      labels: { severity: "critical", family: "scrub" },
      annotations: { summary: "btrfs scrub found {{ $value }} {{ $labels.type }} error(s)", description: "The last scrub found errors (corrected ones too mean a disk is going bad): `btrfs scrub status`, `btrfs device stats`." },
    },
    {
      alert: "ScrubFailed",
      expr: `train_server_task_success{${task("scrub")}} == 0`,
      labels: { severity: "warning", family: "scrub" },
      annotations: { summary: "The monthly btrfs scrub did not complete cleanly", description: "`journalctl -u ts-scrub`." },
    },
    {
      alert: "SnapshotFailed",
      expr: `train_server_task_success{${task("snapshot")}} == 0 or (time() - train_server_task_last_success_timestamp_seconds{${task("snapshot")}}) > 3 * 3600`,
      labels: { severity: "critical", family: "snapshot" },
      annotations: { summary: "Hourly btrfs snapshots are failing", description: "No successful btrbk run in the last hours: `journalctl -u ts-snapshot`." },
    },
    {
      alert: "DriveMountDown",
      expr: `train_server_mount_up{mountpoint=${drive}} == 0`,
      for: "5m",
      labels: { severity: "critical", family: "drive" },
      annotations: { summary: `Google Drive is not mounted at ${p.driveMountpoint}`, description: "`systemctl status ts-drive-mount` and `journalctl -u ts-drive-mount`." },
    },
    {
      alert: "OpsMetricsStale",
      expr: `time() - train_server_task_last_run_timestamp_seconds{${task("usage-collector")}} > 3600`,
      labels: { severity: "warning", family: "ops" },
      annotations: { summary: "The usage/health collector has not run for an hour", description: "Quota, btrfs device and Drive mount metrics are stale: `systemctl status ts-usage-collector.timer`." },
    },
    {
      // the daily drift check (host-scripts/drift-check.sh): a step's own `check` found a hand edit
      alert: "HostDrift",
      expr: "train_server_drift == 1",
      labels: { severity: "warning", family: "drift" },
      annotations: {
        summary: "{{ $labels.step }}: {{ $labels.item }} differs from the declared state",
        description:
          "The daily check of step {{ $labels.step }} found {{ $labels.item }} changed on the host (a hand edit?): re-apply the step to restore it (`pulumi up --replace` the {{ $labels.step }}-apply command: a plain `pulumi up` re-runs a step only when its inputs change), or put the change into the program. What differs: /var/log/train-server/{{ $labels.step }}.log.",
      },
    },
    {
      alert: "DriftCheckFailing",
      expr: `train_server_drift_check_success == 0 or (time() - train_server_task_last_success_timestamp_seconds{${task("drift-check")}}) > 2 * 86400`,
      labels: { severity: "warning", family: "drift" },
      annotations: {
        summary: "{{ if $labels.step }}The drift check of {{ $labels.step }} failed{{ else }}The drift check has not succeeded for {{ $value | humanizeDuration }}{{ end }}",
        description:
          "{{ if $labels.step }}`check` of step {{ $labels.step }} failed or timed out, so its drift is unknown: /var/log/train-server/{{ $labels.step }}.log{{ else }}No successful ts-drift-check run in 2 days: `systemctl status ts-drift-check.timer`, `journalctl -u ts-drift-check`{{ end }}.",
      },
    },
  ];
  if (p.dataSyncEnabled !== false) {
    rules.push({
      alert: "DataSyncFailed",
      expr: `train_server_task_success{${task("data-sync")}} == 0`,
      labels: { severity: "warning", family: "data-sync" },
      annotations: { summary: "The daily bucket to Drive data sync failed", description: "`journalctl -u ts-data-sync`." },
    });
  }
  if (p.gpuWatchdog) rules.push(...gpuWatchdogRules());
  return rules;
}

/**
 * The GPU watchdog's alerts: a running workspace that cannot reach its GPUs (nvidia-smi fails inside it, or lists
 * fewer than the config gives it) for two runs in a row; and the watchdog itself not running.
 */
export function gpuWatchdogRules(): AlertRule[] {
  return [
    {
      alert: "WorkspaceGpuUnreachable",
      expr: "train_server_workspace_gpu_reachable == 0",
      for: "2m",
      labels: { severity: "critical", family: "gpu" },
      annotations: {
        summary: "{{ $labels.user }}'s workspace cannot reach its GPUs",
        description:
          "nvidia-smi -L inside workspace-{{ $labels.user }} fails or lists fewer GPUs than the config gives it (train_server_workspace_gpus_visible vs _expected). " +
          "After a `systemctl daemon-reload` or a toolkit update this is NVIDIA/nvidia-container-toolkit#48: `docker restart workspace-{{ $labels.user }}` " +
          "(the user's running jobs stop: tell them first), then `journalctl -u ts-gpu-watchdog`.",
      },
    },
    collectorFailingRule({
      alert: "GpuWatchdogFailing",
      task: "gpu-watchdog",
      staleAfterS: 600,
      summary: "The GPU watchdog is not checking the workspaces",
      description: "Whether the workspaces still reach their GPUs is unknown: `systemctl status ts-gpu-watchdog.timer`, `journalctl -u ts-gpu-watchdog`.",
    }),
  ];
}

/** The rule file (promtool check rules): the ops alerts, and on GPU hosts the ledger's group. */
export function renderAlertRules(p: AlertParams): string {
  const groups: object[] = [{ name: "train-server-ops", rules: alertRules(p) }];
  if (p.gpu) {
    const g = gpuRules(p.gpu);
    groups.push({ name: "train-server-gpu", rules: [...g.recording, ...g.alerts] });
  }
  return "# Rendered by train-server (components/render/alerts.ts).\n" + YAML.stringify({ groups }, { lineWidth: 0 });
}

/** Labels that identify "the same thing" for inhibition (absent on both sides counts as equal). */
export const INHIBIT_EQUAL = ["family", "instance", "user", "mountpoint", "device", "disk", "gpu"];

/**
 * alertmanager.yml: everything to Telegram, grouped by alertname; critical repeats every 4 h, warning every 24 h; on
 * GPU hosts idle notices (severity info) also go to the user's own chat (see gpuNoticeRouting).
 */
export function renderAlertmanagerConfig(p: AlertParams): string {
  if (!Number.isInteger(p.telegramChatId)) throw new Error("alerts.telegramChatId must be an integer");
  if (!/^\d+:[A-Za-z0-9_-]+$/.test(p.telegramBotToken)) throw new Error("alerts.telegramBotToken does not look like <id>:<secret>");
  const telegram: Record<string, unknown> = {
    bot_token: p.telegramBotToken,
    chat_id: p.telegramChatId,
    parse_mode: "HTML",
    send_resolved: true,
  };
  if (p.telegramApiUrl) telegram.api_url = p.telegramApiUrl;
  const notices = p.gpu ? gpuNoticeRouting(p.gpu, telegram) : { routes: [], receivers: [] };
  const cfg = {
    route: {
      receiver: "telegram",
      group_by: ["alertname"],
      group_wait: "30s",
      group_interval: "5m",
      repeat_interval: "24h",
      routes: [
        ...notices.routes,
        { receiver: "telegram", matchers: ['severity="critical"'], repeat_interval: "4h" },
        { receiver: "telegram", matchers: ['severity="warning"'], repeat_interval: "24h" },
      ],
    },
    inhibit_rules: [{ source_matchers: ['severity="critical"'], target_matchers: ['severity="warning"'], equal: INHIBIT_EQUAL }],
    receivers: [{ name: "telegram", telegram_configs: [telegram] }, ...notices.receivers],
  };
  return "# Rendered by train-server (components/render/alerts.ts). Holds the bot token: keep 0640.\n" + YAML.stringify(cfg, { lineWidth: 0 });
}
