import YAML from "yaml";
import {
  btrbkPreserve, driveCacheSizeGb, mbitToKiBps, mbitToRcloneBwlimit, opsEnabledUnits, opsFilesDir, OpsScripts,
  OPS_JOB_SCRIPTS, renderBtrbkConf, renderOperations, renderOpsEnv, toOnCalendar,
} from "../../components/render/ops";
import { alertRules, renderAlertmanagerConfig } from "../../components/render/alerts";
import { exampleOpsParams, TELEGRAM_TOKEN } from "../helpers/ops";

const scripts = Object.fromEntries(OPS_JOB_SCRIPTS.map((n) => [n, `#!/bin/bash\n# ${n}\n`])) as OpsScripts;
const files = renderOperations(exampleOpsParams(), scripts);
const unit = (name: string) => files[`/etc/systemd/system/${name}`].content;

describe("bandwidth conversions", () => {
  it("100 Mbit/s is 12207 KiB/s for restic --limit-upload (12.5 MB/s)", () => {
    expect(mbitToKiBps(100)).toBe(12207);
  });
  it("rclone --bwlimit takes bytes/s: 100 Mbit/s -> 12207k, not 100M (which would be 100 MiB/s)", () => {
    expect(mbitToRcloneBwlimit(100)).toBe("12207k");
  });
  it("ops.env passes the KiB/s value to backup.sh", () => {
    expect(renderOpsEnv(exampleOpsParams())).toContain('TS_BACKUP_LIMIT_UPLOAD_KIB="12207"');
  });
  it("the data sync passes its rclone --bwlimit through and defaults to copy (never deletes in the Drive)", () => {
    const env = renderOpsEnv(exampleOpsParams());
    expect(env).toContain('TS_SYNC_BWLIMIT="20M"');
    expect(env).toContain('TS_SYNC_MODE="copy"');
    expect(() => renderOpsEnv(exampleOpsParams({ dataSync: { source: "a:b", destination: "c:d", schedule: "04:00", bandwidthLimit: "20M; rm -rf /" } }))).toThrow(/bandwidthLimit/);
  });
});

describe("schedules", () => {
  it("HH:MM becomes a daily OnCalendar; full expressions pass through", () => {
    expect(toOnCalendar("06:00")).toBe("*-*-* 06:00:00");
    expect(toOnCalendar("4:30")).toBe("*-*-* 04:30:00");
    expect(toOnCalendar("*-*-01 08:00:00")).toBe("*-*-01 08:00:00");
    expect(() => toOnCalendar("25:00")).toThrow();
  });
  it("timers carry the configured schedules", () => {
    expect(unit("ts-snapshot.timer")).toMatch(/^OnCalendar=hourly$/m);
    expect(unit("ts-backup.timer")).toMatch(/^OnCalendar=\*-\*-\* 06:00:00$/m);
    expect(unit("ts-verify-restore.timer")).toMatch(/^OnCalendar=\*-\*-01 08:00:00$/m);
    expect(unit("ts-scrub.timer")).toMatch(/^OnCalendar=\*-\*-15 03:00:00$/m);
    expect(unit("ts-data-sync.timer")).toMatch(/^OnCalendar=\*-\*-\* 04:00:00$/m);
    for (const t of ["ts-snapshot", "ts-backup", "ts-verify-restore", "ts-scrub", "ts-data-sync", "ts-usage-collector"]) {
      expect(unit(`${t}.timer`)).toMatch(/^Persistent=true$/m);
      expect(unit(`${t}.service`)).toMatch(/^EnvironmentFile=\/etc\/train-server\/ops\/ops.env$/m);
    }
  });
  it("no data sync unit when dataSync is omitted", () => {
    const f = renderOperations(exampleOpsParams({ dataSync: undefined }), scripts);
    expect(Object.keys(f).some((k) => k.includes("data-sync.timer"))).toBe(false);
    expect(opsEnabledUnits({})).not.toContain("ts-data-sync.timer");
    expect(alertRules({ ...exampleOpsParams().alerts, mountpoint: "/m", driveMountpoint: "/d", quotaWarnPercent: 80, dataSyncEnabled: false }).map((r) => r.alert)).not.toContain("DataSyncFailed");
  });
});

describe("snapshot retention (btrbk)", () => {
  it("keeps exactly 24/7/4: btrbk keeps N back plus the current one, so it is told 23h 6d 3w", () => {
    expect(btrbkPreserve({ hourly: 24, daily: 7, weekly: 4 })).toBe("23h 6d 3w");
    const conf = renderBtrbkConf(exampleOpsParams());
    expect(conf).toMatch(/^snapshot_preserve_min\s+latest$/m);
    expect(conf).toMatch(/^snapshot_preserve\s+23h 6d 3w$/m);
    expect(conf).toMatch(/^preserve_hour_of_day\s+2$/m);
    expect(conf).toMatch(/^preserve_day_of_week\s+sunday$/m);
    // each user's home into a directory of their own (what their workspace mounts at /snapshots), by uid
    expect(conf).toContain("  subvolume homes/alice\n    snapshot_dir .snapshots/homes/alice\n  subvolume homes/bob\n    snapshot_dir .snapshots/homes/bob\n");
    expect(conf).toContain("  subvolume docker-volumes/*\n    snapshot_dir .snapshots/docker-volumes\n");
  });
  it("refuses 0 or duplicate groups or unsafe paths", () => {
    expect(() => btrbkPreserve({ hourly: 0, daily: 7, weekly: 4 })).toThrow(/hourly/);
    const s = exampleOpsParams().snapshots;
    expect(() => renderBtrbkConf(exampleOpsParams({ snapshots: { ...s, sources: ["homes/*", "homes"] } }))).toThrow(/duplicates/);
    expect(() => renderBtrbkConf(exampleOpsParams({ snapshots: { ...s, sources: ["../etc"] } }))).toThrow(/unsafe/);
  });
});

describe("restic backup settings", () => {
  it("retention and repository reach the backup job", () => {
    const env = renderOpsEnv(exampleOpsParams());
    expect(env).toContain('TS_BACKUP_KEEP_DAILY="7"');
    expect(env).toContain('TS_BACKUP_KEEP_WEEKLY="52"');
    expect(env).toContain('TS_BACKUP_ARCHIVE_KEEP_YEARS="0"'); // forever
    expect(renderOpsEnv(exampleOpsParams({ backup: { ...exampleOpsParams().backup, archiveKeepYears: 3 } }))).toContain('TS_BACKUP_ARCHIVE_KEEP_YEARS="3"');
    expect(() => renderOpsEnv(exampleOpsParams({ backup: { ...exampleOpsParams().backup, archiveKeepYears: 1.5 } }))).toThrow(/archiveKeepYears/);
    // the restore broker: the users by uid, its spool, size (MB) and time guards
    expect(env).toContain('TS_RESTORE_USERS="alice:2001 bob:2002"');
    expect(env).toContain('TS_RESTORE_SPOOL="/var/lib/train-server/restore"');
    expect(env).toContain('TS_RESTORE_MAX_MB="102400"');
    expect(env).toContain('TS_RESTORE_TIMEOUT_S="7200"');
    // backup.sh still backs up every home (removed users' too), not only the listed ones
    expect(env).toContain('TS_SNAPSHOT_SOURCES="homes/* docker-volumes/*"');
    expect(env).toContain('TS_RESTIC_REPOSITORY="rclone:gdrive:train-server/restic"');
    expect(env).toContain('TS_USERS="alice:1073741824000 bob:1073741824000"'); // quota bytes (GiB)
  });
  it("secrets go to root-only files, marked secret, never into ops.env or unit files", () => {
    expect(files["/etc/train-server/ops/restic-password"]).toMatchObject({ mode: "0600", owner: "root:root", secret: true });
    expect(files["/etc/train-server/ops/rclone.conf"]).toMatchObject({ mode: "0600", secret: true });
    expect(files["/etc/train-server/alertmanager/alertmanager.yml"]).toMatchObject({ mode: "0640", secret: true });
    for (const [p, f] of Object.entries(files)) {
      if (f.secret) continue;
      expect([p, f.content.includes("restic-secret-pw") || f.content.includes(TELEGRAM_TOKEN)]).toEqual([p, false]);
    }
  });
});

describe("Drive mount", () => {
  it("rclone mount with a full VFS cache on the array, size and age limits, allow-other, uid/gid", () => {
    const u = unit("ts-drive-mount.service").replace(/ \\\n\s+/g, " ");
    for (const flag of ["--vfs-cache-mode full", "--cache-dir /mnt/storage/cache/gdrive", "--vfs-cache-max-size 2000G",
      "--vfs-cache-max-age 720h", "--allow-other", "--uid 0", "--gid 3000", "--config /etc/train-server/ops/rclone.conf"]) {
      expect(u).toContain(flag);
    }
    expect(u).toMatch(/^ExecStart=\/usr\/bin\/rclone mount gdrive: \/mnt\/storage\/shared/m);
    expect(u).toMatch(/^Type=notify$/m);
    expect(u).toMatch(/^RequiresMountsFor=\/mnt\/storage \/mnt\/storage\/cache\/gdrive$/m);
  });
  it("cache size: 20 % of the array's usable space, never a function of the users (reference example: 2000 GB)", () => {
    expect(driveCacheSizeGb({ arrayUsableGb: 10000 })).toBe(2000);
    expect(driveCacheSizeGb({ arrayUsableGb: 40000 })).toBe(8000);
    expect(driveCacheSizeGb({ arrayUsableGb: 9 })).toBe(1);
  });
});

describe("alerting", () => {
  it("alertmanager.yml routes to Telegram, grouped by alertname, 4h critical / 24h warning, critical inhibits warning", () => {
    const am = YAML.parse(files["/etc/train-server/alertmanager/alertmanager.yml"].content);
    expect(am.route.group_by).toEqual(["alertname"]);
    expect(am.route.routes).toEqual([
      { receiver: "telegram", matchers: ['severity="critical"'], repeat_interval: "4h" },
      { receiver: "telegram", matchers: ['severity="warning"'], repeat_interval: "24h" },
    ]);
    expect(am.receivers[0].telegram_configs[0]).toMatchObject({ bot_token: TELEGRAM_TOKEN, chat_id: -100123456 });
    expect(am.inhibit_rules[0].equal).toContain("family");
  });
  it("rejects a malformed bot token or chat id", () => {
    const a = { ...exampleOpsParams().alerts, mountpoint: "/m", driveMountpoint: "/d", quotaWarnPercent: 80 };
    expect(() => renderAlertmanagerConfig({ ...a, telegramBotToken: "x\ny: 1" })).toThrow(/telegramBotToken/);
    expect(() => renderAlertmanagerConfig({ ...a, telegramChatId: 1.5 })).toThrow(/telegramChatId/);
  });
  it("thresholds come from the params", () => {
    const rules = Object.fromEntries(alertRules({ ...exampleOpsParams().alerts, gpuTempC: 83, mountpoint: "/m", driveMountpoint: "/d", quotaWarnPercent: 75 }).map((r) => [r.alert, r.expr]));
    expect(rules.GpuTemperatureHigh).toBe("DCGM_FI_DEV_GPU_TEMP > 83");
    expect(rules.UserQuotaWarning).toMatch(/> 0.75$/);
    expect(rules.BackupTooOld).toMatch(/> 93600$/);
    expect(rules.FilesystemAlmostFull).toMatch(/> 90$/);
  });
});

describe("files for ops-install.sh", () => {
  it("manifest lists every file with mode, owner and path; job scripts are executable", () => {
    const dir = opsFilesDir(files, opsEnabledUnits(exampleOpsParams()));
    const lines = dir.manifest.trim().split("\n");
    expect(lines).toHaveLength(Object.keys(files).length);
    for (const l of lines) {
      const [name, mode, owner, p] = l.split(" ");
      expect(dir[name]).toBe(files[p].content);
      expect(mode).toBe(files[p].mode);
      expect(owner).toBe(files[p].owner);
    }
    expect(files["/usr/local/lib/train-server/ops/backup.sh"].mode).toBe("0755");
    expect(files["/usr/local/lib/train-server/ops/lib.sh"].mode).toBe("0644");
    expect(dir.units.trim().split("\n")).toEqual(["ts-drive-mount.service", "ts-snapshot.timer", "ts-backup.timer",
      "ts-verify-restore.timer", "ts-scrub.timer", "ts-usage-collector.timer", "ts-drift-check.timer", "ts-restore.timer", "ts-data-sync.timer", "ts-weekly-digest.timer"]);
  });
});
