import { ConfigError, MIN_DEVICES, parseConfig, parseCpuset, defaultMetadataProfile, PROFILES, RESERVED_USERNAMES } from "../../components/config";
import { SERVICE_DATA, SERVICE_STOP_GRACE_S } from "../../components/services";
import { clone, stackRaw } from "../helpers/program";

function issuesOf(raw: unknown): Array<{ path: string; message: string }> {
  try {
    parseConfig(raw);
  } catch (e) {
    if (e instanceof ConfigError) return e.issues;
    throw e;
  }
  return [];
}

const prod = stackRaw("prod");

type Case = [string, (c: any) => void, string, RegExp];
/** [what, mutation of the prod stack, expected path, expected message]. */
const BAD: Case[] = [
  ["user name with uppercase", (c) => (c.users[2].name = "Charlie"), "users[2].name", /POSIX/],
  ["user name starting with a digit", (c) => (c.users[1].name = "1bob"), "users[1].name", /POSIX/],
  ["user name too long", (c) => (c.users[0].name = "a".repeat(40)), "users[0].name", /POSIX/],
  ["reserved user name root", (c) => (c.users[3].name = "root"), "users[3].name", /reserved/],
  ["reserved user name docker", (c) => (c.users[3].name = "docker"), "users[3].name", /reserved/],
  ["user named like the ssh admin", (c) => (c.users[4].name = c.host.sshUser), "users[4].name", /host\.sshUser/],
  ["duplicate user names", (c) => (c.users[4].name = "alice"), "users[4].name", /duplicates users\[0\]\.name/],
  ["duplicate uids", (c) => (c.users[3].uid = 1001), "users[3].uid", /duplicates users\[1\]\.uid/],
  ["uid below 1000", (c) => (c.users[0].uid = 999), "users[0].uid", /outside 1000\.\.59999/],
  ["uid above range", (c) => (c.users[0].uid = 70000), "users[0].uid", /outside/],
  ["duplicate emails (case-insensitive)", (c) => (c.users[2].email = "ALICE@example.com"), "users[2].email", /duplicates users\[0\]\.email/],
  ["email outside the allowed domains", (c) => (c.users[1].email = "bob@gmail.com"), "users[1].email", /allowedDomains/],
  ["invalid email", (c) => (c.users[1].email = "bob-at-example"), "users[1].email", /e-mail/],
  ["no ssh keys", (c) => (c.users[0].sshKeys = []), "users[0].sshKeys", /at least one SSH public key/],
  ["garbage ssh key", (c) => (c.users[0].sshKeys = ["not a key"]), "users[0].sshKeys[0]", /OpenSSH public key/],
  ["short RSA key", (c) => (c.users[0].sshKeys = ["ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAAAgQC7 x@y"]), "users[0].sshKeys[0]", /shorter than 2048/],
  ["uid whose ssh port hits another user's desktop port", (c) => (c.users[4].uid = 1000 + (4000 - 2222)), "users[4].uid", /port 4000, already used by users\[0\] desktop/],
  ["host SSH port equal to a user's desktop port", (c) => (c.host.sshPort = 4001), "users[1].uid", /desktop port 4001, already used by host\.sshPort/],
  ["unknown key in a user (typo)", (c) => (c.users[0].memoryLimitGB = 10), "users[0].memoryLimitGB", /unknown key "memoryLimitGB"/],
  ["unknown top-level key", (c) => (c.storrage = {}), "storrage", /unknown key "storrage"/],
  ["guarantee greater than limit", (c) => Object.assign(c.users[1], { memoryGuaranteeGb: 64, memoryLimitGb: 48 }), "users[1].memoryGuaranteeGb", /exceeds the limit/],
  ["limit above host RAM", (c) => (c.users[1].memoryLimitGb = 512), "users[1].memoryLimitGb", /exceeds host\.ramGb/],
  ["guarantees summing past host RAM", (c) => (c.resources.memoryGuaranteeGb = 40), "users", /sum to 200 GB but only 184 GB/],
  ["overlapping cpusets", (c) => (c.users[1].cpuset = "6-9"), "users[1].cpuset", /also in users\[0\]\.cpuset/],
  ["cpuset beyond the host's cores", (c) => (c.users[4].cpuset = "26-33"), "users[4].cpuset", /CPU 32 is out of range/],
  ["malformed cpuset", (c) => (c.users[4].cpuset = "26..31"), "users[4].cpuset", /cpuset like/],
  ["reversed cpuset range", (c) => (c.users[4].cpuset = "31-26"), "users[4].cpuset", /reversed/],
  ["cpus more than the cpuset holds", (c) => (c.users[0].cpus = 8), "users[0].cpus", /cannot fit in cpuset/],
  ["GPU index beyond the host's GPUs", (c) => (c.users[0].gpus = [1]), "users[0].gpus", /GPU 1 does not exist/],
  ["GPUs named on a host without GPUs", (c) => { c.host.gpu.count = 0; c.users[0].gpus = [0]; }, "users[0].gpus", /host\.gpu\.count is 0/],
  ["archive retention as a word", (c) => (c.backup.archiveKeepYears = "never"), "backup.archiveKeepYears", /"forever" or a whole number of years/],
  ["archive retention of 0 years", (c) => (c.backup.archiveKeepYears = 0), "backup.archiveKeepYears", /"forever" or a whole number of years/],
  ["raid10 over 3 devices", (c) => (c.storage.devices = ["/dev/sda", "/dev/sdb", "/dev/sdc"]), "storage.dataProfile", /raid10 needs at least 4 devices/],
  ["raid1c3 over 2 devices", (c) => Object.assign(c.storage, { devices: ["/dev/sda", "/dev/sdb"], dataProfile: "raid1c3", metadataProfile: "raid1c3" }), "storage.dataProfile", /raid1c3 needs at least 3/],
  ["raid6 over 3 devices", (c) => Object.assign(c.storage, { devices: ["/dev/sda", "/dev/sdb", "/dev/sdc"], dataProfile: "raid6", metadataProfile: "raid1c3" }), "storage.dataProfile", /raid6 needs at least 4/],
  ["metadata profile needing more devices than given", (c) => Object.assign(c.storage, { devices: ["/dev/sda", "/dev/sdb"], dataProfile: "raid1", metadataProfile: "raid1c3" }), "storage.metadataProfile", /raid1c3 needs at least 3/],
  ["raid5 metadata", (c) => (c.storage.metadataProfile = "raid5"), "storage.metadataProfile", /not safe for metadata/],
  ["unknown RAID level", (c) => (c.storage.dataProfile = "raid7"), "storage.dataProfile", /raid10|Invalid option/],
  ["duplicate device", (c) => (c.storage.devices[3] = "/dev/sda"), "storage.devices[3]", /duplicates storage\.devices\[0\]/],
  ["partition of a listed disk", (c) => (c.storage.devices[3] = "/dev/sda1"), "storage.devices[3]", /partition of storage\.devices\[0\]/],
  ["device not under /dev", (c) => (c.storage.devices[0] = "sda"), "storage.devices[0]", /under \/dev\//],
  ["cache device is one of the HDDs", (c) => (c.storage.cache.device = "/dev/sdb"), "storage.cache.device", /separate NVMe\/SSD/],
  ["cache device is a partition of an HDD", (c) => (c.storage.cache.device = "/dev/sdc2"), "storage.cache.device", /separate NVMe\/SSD/],
  ["cache device with mode none", (c) => (c.storage.cache.mode = "none"), "storage.cache.mode", /remove storage\.cache/],
  ["unknown cache mode", (c) => (c.storage.cache.mode = "writearound"), "storage.cache.mode", /writeback|Invalid option/],
  ["mountpoint over a system directory", (c) => (c.storage.mountpoint = "/var"), "storage.mountpoint", /system directory/],
  ["relative mountpoint", (c) => (c.storage.mountpoint = "mnt/storage"), "storage.mountpoint", /absolute path/],
  ["bad filesystem label", (c) => (c.storage.label = "my storage!"), "storage.label", /letters, digits/],
  ["invalid domain", (c) => (c.domain = "Example_COM"), "domain", /domain like example\.com/],
  ["service hostname not a DNS label", (c) => (c.hostnames = { grafana: "Graf ana" }), "hostnames.grafana", /not a DNS label/],
  ["two services on one hostname", (c) => (c.hostnames = { grafana: "health" }), "hostnames.grafana", /also used by hostnames\.netdata/],
  ["service hostname colliding with a user route", (c) => (c.hostnames = { filebrowser: "bob-code" }), "users[1].name", /collides with hostnames\.filebrowser/],
  ["service hostname colliding with a user's TensorBoard route", (c) => (c.hostnames = { grafana: "bob-tensorboard" }), "users[1].name", /route bob-tensorboard\.example\.com collides with hostnames\.grafana/],
  ["LAN address outside the LAN", (c) => (c.host.lanAddress = "10.0.0.5"), "host.lanAddress", /not inside host\.lanCidr/],
  ["LAN address not IPv4", (c) => (c.host.lanAddress = "192.168.1.300"), "host.lanAddress", /IPv4/],
  ["admin source without a prefix", (c) => (c.host.adminSources = ["192.168.1.10"]), "host.adminSources[0]", /must be an IPv4 CIDR like "192\.168\.1\.10\/32"/],
  ["admin source octet out of range", (c) => (c.host.adminSources = ["192.168.1.300/32"]), "host.adminSources[0]", /must be an IPv4 CIDR/],
  ["admin source prefix above 32", (c) => (c.host.adminSources = ["192.168.1.10/33"]), "host.adminSources[0]", /must be an IPv4 CIDR/],
  ["admin source with host bits", (c) => (c.host.adminSources = ["192.168.1.10/24"]), "host.adminSources[0]", /host bits set; write the network 192\.168\.1\.0\/24, or 192\.168\.1\.10\/32 for one machine/],
  ["admin source outside the LAN", (c) => (c.host.adminSources = ["192.168.1.10/32", "10.0.0.5/32"]), "host.adminSources[1]", /10\.0\.0\.5\/32 is not inside host\.lanCidr 192\.168\.1\.0\/24/],
  ["admin source wider than the LAN", (c) => (c.host.adminSources = ["192.168.0.0/16"]), "host.adminSources[0]", /not inside host\.lanCidr/],
  ["admin source listed twice", (c) => (c.host.adminSources = ["192.168.1.10/32", "192.168.1.10/32"]), "host.adminSources[1]", /duplicates host\.adminSources\[0\]/],
  ["admin sources not a list", (c) => (c.host.adminSources = "192.168.1.10/32"), "host.adminSources", /array|expected/],
  ["reserved RAM above host RAM", (c) => (c.host.reservedRamGb = 256), "host.reservedRamGb", /leaves nothing/],
  ["missing host section", (c) => delete c.host, "host", /required/],
  ["quota warning percent out of range", (c) => (c.resources.quotaWarnPercent = 120), "resources.quotaWarnPercent", /100|99/],
  ["negative quota", (c) => (c.resources.quotaGb = -5), "resources.quotaGb", /at least 1 GB/],
  ["no admin user", (c) => c.users.forEach((u: any) => (u.admin = false)), "users", /at least one admin/],
  ["nobody admitted by Access", (c) => Object.assign(c.cloudflare, { allowedDomains: [], allowedEmails: [] }), "cloudflare.allowedDomains", /nobody is admitted/],
  ["cloudflare account id not 32 hex", (c) => (c.cloudflare.accountId = "abc"), "cloudflare.accountId", /32-hex-digit/],
  ["backup time not HH:MM", (c) => (c.backup.schedule = "6am"), "backup.schedule", /time like/],
  ["backup at the data sync's time", (c) => (c.backup.schedule = "04:00"), "backup.schedule", /same time as dataSync\.schedule/],
  ["user name with an underscore (invalid in hostnames)", (c) => (c.users[1].name = "bob_x"), "users[1].name", /not allowed in its route hostnames/],
  ["Access session longer than 720h", (c) => (c.cloudflare.sessionDuration = "1000h"), "cloudflare.sessionDuration", /at most 720h/],
  ["snapshot day-start hour out of range", (c) => (c.snapshots = { dailyHour: 24 }), "snapshots.dailyHour", /23/],
  ["backup repository on another remote than the Drive", (c) => (c.backup.repository = "rclone:other:restic"), "backup.repository", /drive\.remote/],
  ["zero hourly snapshots", (c) => (c.snapshots.hourly = 0), "snapshots.hourly", /1/],
  ["telegram chat id not numeric", (c) => (c.alerts.telegramChatId = "@mychannel"), "alerts.telegramChatId", /numeric Telegram chat id/],
  ["data sync source not an rclone path", (c) => (c.dataSync.source = "/data"), "dataSync.source", /rclone path/],
  ["drive cache size zero", (c) => (c.drive.cacheSizeGb = 0), "drive.cacheSizeGb", /auto|0|positive|Invalid/],
  ["the removed snapshot reserve of the cache size", (c) => (c.drive.snapshotReservePercent = 50), "drive.snapshotReservePercent", /was removed.*delete this key/],
  ["no host key on a production stack", (c) => delete c.host.hostKey, "host.hostKey", /is required.*ssh-keyscan -t ed25519 -p 22 192\.168\.1\.50/],
  ["a host key in ssh-keyscan's format (with the host name)", (c) => (c.host.hostKey = `192.168.1.50 ${c.host.hostKey}`), "host.hostKey", /drop it/],
  ["an RSA host key (verified with SHA-1 by the Go client)", (c) => (c.host.hostKey = "ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAABAQC7"), "host.hostKey", /RSA.*ed25519/],
  ["a truncated host key", (c) => (c.host.hostKey = c.host.hostKey.slice(0, 60)), "host.hostKey", /not 32 bytes|not a ssh-ed25519 key/],
  ["a host key whose blob is of another type", (c) => (c.host.hostKey = `ecdsa-sha2-nistp256 ${c.host.hostKey.split(" ")[1]}`), "host.hostKey", /not a ecdsa-sha2-nistp256 key/],
  ["a host key that is a user's public key type name only", (c) => (c.host.hostKey = "ssh-ed25519"), "host.hostKey", /no base64 key/],
  ["GPU idle hours not positive", (c) => (c.alerts.gpuIdleHours = 0), "alerts.gpuIdleHours", /0|positive|Too small/],
  ["GPU idle hours longer than the working day", (c) => (c.alerts.gpuIdleHours = 10), "alerts.gpuIdleHours", /does not fit in a working day of 9 h/],
  ["working hours ending before they start", (c) => (c.alerts.workingHours = { start: "18:00", end: "09:00" }), "alerts.workingHours.end", /not after alerts\.workingHours\.start/],
  ["working hours start not HH:MM", (c) => (c.alerts.workingHours = { start: "9am" }), "alerts.workingHours.start", /time like/],
  ["working day misspelt", (c) => (c.alerts.workingHours = { days: ["monday", "tusday"] }), "alerts.workingHours.days[1]", /monday|Invalid option/],
  ["working day listed twice", (c) => (c.alerts.workingHours = { days: ["monday", "monday"] }), "alerts.workingHours.days[1]", /duplicates alerts\.workingHours\.days\[0\]/],
  ["no working days", (c) => (c.alerts.workingHours = { days: [] }), "alerts.workingHours.days", /at least one day/],
  ["digest day not a weekday", (c) => (c.alerts.digestDay = "mon"), "alerts.digestDay", /monday|Invalid option/],
  ["user's telegram chat id not numeric", (c) => (c.users[1].telegramChatId = "@bob"), "users[1].telegramChatId", /numeric Telegram chat id/],
];

describe("config: bad values are rejected with the field's path and a fix", () => {
  test(`the table has at least 30 distinct cases (${BAD.length})`, () => {
    expect(BAD.length).toBeGreaterThanOrEqual(30);
    expect(new Set(BAD.map((b) => b[0])).size).toBe(BAD.length);
  });
  test("the prod stack itself is valid (so each case below fails only for its own change)", () => {
    expect(issuesOf(clone(prod))).toEqual([]);
  });
  test.each(BAD)("%s", (_what, mutate, path, message) => {
    const c = clone(prod);
    mutate(c);
    const issues = issuesOf(c);
    const hit = issues.find((i) => i.path === path);
    expect(issues.length).toBeGreaterThan(0);
    expect({ path: hit?.path, issues }).toEqual(expect.objectContaining({ path }));
    expect(hit!.message).toMatch(message);
  });
});

describe("config: names a user cannot have", () => {
  // a user's state subvolume is docker-volumes/<name>, and a service's data is docker-volumes/<service>: a user named
  // like a service would own (and mount into the workspace) the service's data, and the two steps would chown it
  // back and forth on every up
  test("every shared service's container and data directory name is reserved", () => {
    const services = [...Object.keys(SERVICE_STOP_GRACE_S), ...Object.keys(SERVICE_DATA)];
    expect(services.filter((s) => !RESERVED_USERNAMES.has(s))).toEqual([]);
    for (const name of services) {
      const c = clone(prod);
      c.users[3].name = name;
      expect(issuesOf(c)).toEqual(expect.arrayContaining([expect.objectContaining({ path: "users[3].name", message: expect.stringMatching(/reserved/) })]));
    }
  });
});

describe("config: host.hostKey", () => {
  test("normalized to `<type> <base64>` (a comment dropped), and optional on a rig only", () => {
    const c = clone(prod);
    const key = c.host.hostKey;
    c.host.hostKey = `  ${key}   root@server  `;
    expect(parseConfig(c).host.hostKey).toBe(key);
    const rig = clone(prod);
    delete rig.host.hostKey;
    rig.rig = true;
    expect(parseConfig(rig).host.hostKey).toBeUndefined();
  });
});

describe("config: host.adminSources", () => {
  test("defaults to [] (admin routes through the tunnel only)", () => {
    expect(parseConfig(clone(prod)).host.adminSources).toEqual([]);
  });
  test("office machines and subnets inside host.lanCidr are accepted as written, the whole LAN too", () => {
    const c = clone(prod);
    c.host.adminSources = ["192.168.1.10/32", "192.168.1.128/25", "192.168.1.0/24"];
    expect(parseConfig(c).host.adminSources).toEqual(["192.168.1.10/32", "192.168.1.128/25", "192.168.1.0/24"]);
  });
});

describe("config: every problem is reported at once", () => {
  test("three independent problems give three issues, each with its path", () => {
    const c = clone(prod);
    c.users[0].name = "Alice";
    c.storage.devices = ["/dev/sda", "/dev/sdb"];
    c.users[1].cpuset = "2-3";
    const paths = issuesOf(c).map((i) => i.path);
    expect(paths).toEqual(expect.arrayContaining(["users[0].name", "storage.dataProfile", "users[1].cpuset"]));
  });
  test("schema errors in different sections are all listed", () => {
    const c = clone(prod);
    c.host.cpuCores = "many";
    c.domain = 5;
    c.users[2].uid = "x";
    const paths = issuesOf(c).map((i) => i.path);
    expect(paths).toEqual(expect.arrayContaining(["host.cpuCores", "domain", "users[2].uid"]));
  });
  test("the error message lists every issue on its own line", () => {
    const c = clone(prod);
    c.users[0].name = "Alice";
    c.users[1].uid = 5;
    expect(() => parseConfig(c)).toThrow(/2 problems:\n {2}- users\[0\]\.name: .*\n {2}- users\[1\]\.uid: /);
  });
});

describe("config: the example stacks", () => {
  test.each(["prod", "minimal", "large"])("%s is accepted", (stack) => {
    expect(issuesOf(stackRaw(stack))).toEqual([]);
  });
  test("prod is the seeds' original spec", () => {
    const c = parseConfig(stackRaw("prod"));
    expect(c.users.map((u) => u.name)).toEqual(["alice", "bob", "charlie", "dave", "eve"]);
    expect(c.storage.devices).toHaveLength(4);
    expect(c.storage.dataProfile).toBe("raid10");
    expect(c.storage.cache).toEqual({ device: "/dev/nvme0n1p4", mode: "writeback" });
  });
  test("minimal: 2 users, 2 disks raid1, no cache", () => {
    const c = parseConfig(stackRaw("minimal"));
    expect(c.users).toHaveLength(2);
    expect(c.storage.devices).toHaveLength(2);
    expect([c.storage.dataProfile, c.storage.metadataProfile]).toEqual(["raid1", "raid1"]);
    expect(c.storage.cache).toBeUndefined();
  });
  test("large: 10 users, 6 disks raid10, 16 GB / 64 GB per user", () => {
    const c = parseConfig(stackRaw("large"));
    expect(c.users).toHaveLength(10);
    expect(c.storage.devices).toHaveLength(6);
    expect(c.storage.dataProfile).toBe("raid10");
    expect(new Set(c.users.map((u) => `${u.memoryGuaranteeGb}/${u.memoryLimitGb}`))).toEqual(new Set(["16/64"]));
  });
});

describe("config: defaults live in the schema", () => {
  const minimal = parseConfig(stackRaw("minimal"));
  const bare = (() => {
    const c = clone(stackRaw("prod"));
    delete c.resources;
    return parseConfig(c);
  })();
  test("resource defaults: 32 GB guarantee, 100 GB limit, 50 GB swap, 1000 GB quota, warn at 80%", () => {
    expect(bare.resources).toMatchObject({ memoryGuaranteeGb: 32, memoryLimitGb: 100, swapGb: 50, quotaGb: 1000, quotaWarnPercent: 80 });
    expect(bare.users[1]).toMatchObject({ memoryGuaranteeGb: 32, memoryLimitGb: 100, swapGb: 50, quotaGb: 1000 });
  });
  test("backup and snapshot defaults: 06:00, 100 Mbit/s, 7 daily / 52 weekly, snapshots 24/7/4", () => {
    expect(minimal.backup).toMatchObject({ schedule: "06:00", uploadLimitMbit: 100, keepDaily: 7, keepWeekly: 52 });
    expect(minimal.snapshots).toMatchObject({ hourly: 24, daily: 7, weekly: 4 });
    expect(minimal.backup.archiveKeepYears).toBe("forever");
  });
  test("storage defaults: /mnt/storage, label, and metadata profile derived from the data profile", () => {
    expect(minimal.storage).toMatchObject({ mountpoint: "/mnt/storage", label: "train-storage", metadataProfile: "raid1" });
    expect(defaultMetadataProfile("raid5", 4)).toBe("raid1");
    expect(defaultMetadataProfile("raid6", 5)).toBe("raid1c3");
    expect(defaultMetadataProfile("single", 1)).toBe("dup");
    expect(defaultMetadataProfile("raid10", 4)).toBe("raid10");
  });
  test("slot, ports and GPU access come from the uid, never from list order", () => {
    const c = clone(stackRaw("prod"));
    c.users.reverse();
    const reversed = parseConfig(c);
    const eve = reversed.users.find((u) => u.name === "eve")!;
    expect(eve).toMatchObject({ uid: 1004, slot: 4, sshPort: 2226, desktopPort: 4004, gpus: "all" });
  });
  test("GPU idle notices and the digest: 4 working hours, Mon-Fri 09:00-18:00, digest Monday 09:00", () => {
    expect(minimal.alerts).toMatchObject({
      gpuIdleHours: 4,
      workingHours: { days: ["monday", "tuesday", "wednesday", "thursday", "friday"], start: "09:00", end: "18:00" },
      digestDay: "monday",
      digestAt: "09:00",
    });
    const c = clone(stackRaw("prod"));
    c.users[1].telegramChatId = "123456789";
    const parsed = parseConfig(c);
    expect(parsed.users[1].telegramChatId).toBe("123456789");
    expect(parsed.users[0]).not.toHaveProperty("telegramChatId");
  });
  test("every profile has a documented minimum device count", () => {
    for (const p of PROFILES) expect(MIN_DEVICES[p]).toBeGreaterThanOrEqual(1);
  });
  test("parseCpuset expands ranges", () => {
    expect(parseCpuset("0-3,8,10-11")).toEqual([0, 1, 2, 3, 8, 10, 11]);
  });
  test("the parsed config is frozen", () => {
    expect(Object.isFrozen(minimal.users[0])).toBe(true);
    expect(() => {
      (minimal.users[0] as any).uid = 5;
    }).toThrow();
  });
});
