/**
 * baseline.sh for real, in a booted systemd container (systemd-nspawn, own network namespace) with a btrfs array
 * (loop device) bound at /mnt/storage: packages present, sshd/fail2ban/docker/ufw really reloaded and running.
 * Also: the rendered files through their real validators on this host (sshd -t, fail2ban-client -t, iptables-restore).
 */
import * as fs from "fs";
import * as path from "path";
import { renderBaselineFiles, BaselineParams } from "../../components/render/baseline";
import { REMAPPED_ROOT_UID, renderDockerRemapSubIds } from "../../components/render/workspace-security";
import { bash, Scratch, sh } from "../helpers/host";
import { BASELINE_PACKAGES, ensureRootfs, NspawnContainer } from "../helpers/nspawn";

jest.setTimeout(600_000);

const MP = "/mnt/storage";
const params: BaselineParams = {
  sshPort: 22,
  lanCidr: "10.42.0.0/16",
  userPortRange: { from: 2222, to: 62999 },
  adminUser: "tsadmin",
  dataRoot: `${MP}/docker-data`,
  ramGb: 8,
  reservedRamGb: 2,
  gpuCount: 0,
};
const ADMIN_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOo0Lw6bWi1BQ2ZrWSRnAqdl2m1N9c3uEo2Szj4xq8Za admin@laptop";
const MANAGED = [
  "/etc/ssh/sshd_config.d/10-train-server.conf",
  "/etc/fail2ban/jail.d/train-server.conf",
  "/etc/docker/daemon.json",
  "/etc/systemd/system/docker.service.d/10-train-server.conf",
  "/etc/ufw/after.rules",
  "/etc/ufw/user.rules",
  "/etc/default/ufw",
  "/etc/systemd/system/trainws.slice",
];
const GIB = 1024 ** 3;

function writeFiles(dir: string, files: Record<string, string>): void {
  fs.rmSync(dir, { recursive: true, force: true });
  fs.mkdirSync(dir, { recursive: true });
  for (const [name, content] of Object.entries(files)) fs.writeFileSync(path.join(dir, name), content);
}

describe("rendered baseline files pass their real validators", () => {
  const scratch = new Scratch("ts-baseline-validate-");
  afterAll(() => scratch.cleanup());
  const files = renderBaselineFiles({ ...params, sshPort: 2022 });

  test("sshd -t accepts the drop-in and sshd -T shows it in effect", () => {
    const key = path.join(scratch.dir, "hostkey");
    sh("ssh-keygen", ["-q", "-t", "ed25519", "-N", "", "-f", key]);
    const dropIn = path.join(scratch.dir, "10-train-server.conf");
    fs.writeFileSync(dropIn, files["sshd.conf"]);
    const main = path.join(scratch.dir, "sshd_config");
    fs.writeFileSync(main, `Include ${dropIn}\nHostKey ${key}\nPasswordAuthentication yes\nPort 22\n`);
    fs.mkdirSync("/run/sshd", { recursive: true });
    expect(bash(`sshd -t -f ${main}`)).toMatchObject({ status: 0, stderr: "" });
    const effective = sh("sshd", ["-T", "-f", main]).split("\n");
    for (const want of ["port 2022", "passwordauthentication no", "permitrootlogin no", "kbdinteractiveauthentication no", "authenticationmethods publickey", "usepam yes"]) {
      expect(effective).toContain(want);
    }
    // the validator is not vacuous
    fs.writeFileSync(dropIn, files["sshd.conf"] + "NoSuchKeyword yes\n");
    expect(bash(`sshd -t -f ${main}`).status).not.toBe(0);
  });

  test("fail2ban-client -t accepts the jail", () => {
    const conf = path.join(scratch.dir, "fail2ban");
    fs.cpSync("/etc/fail2ban", conf, { recursive: true });
    fs.writeFileSync(path.join(conf, "jail.d/train-server.conf"), files["fail2ban-jail.conf"]);
    const ok = bash(`fail2ban-client -c ${conf} -t`);
    expect(ok.status).toBe(0);
    expect(ok.stdout + ok.stderr).toMatch(/OK: configuration test is successful/);
    fs.writeFileSync(path.join(conf, "jail.d/train-server.conf"), files["fail2ban-jail.conf"].replace("backend = systemd", "backend = nosuchbackend"));
    expect(bash(`fail2ban-client -c ${conf} -t`).status).not.toBe(0);
  });

  test("systemd-analyze verify accepts the workspace slice and the NVIDIA /dev/char unit (and rejects a missing binary)", () => {
    // a scratch root with systemd's own units (the dependencies of a unit with default dependencies) and a stub of
    // the toolkit's CLI: the real one is on GPU hosts only
    const root = path.join(scratch.dir, "sysroot");
    fs.mkdirSync(path.join(root, "usr/lib/systemd"), { recursive: true });
    fs.cpSync("/usr/lib/systemd/system", path.join(root, "usr/lib/systemd/system"), { recursive: true, verbatimSymlinks: true });
    fs.mkdirSync(path.join(root, "etc/systemd/system"), { recursive: true });
    fs.mkdirSync(path.join(root, "usr/bin"), { recursive: true });
    const gpu = renderBaselineFiles({ ...params, gpuCount: 1 });
    for (const unit of ["trainws.slice", "ts-nvidia-dev-char.service"]) fs.writeFileSync(path.join(root, "etc/systemd/system", unit), gpu[unit]);
    const verify = () => bash(`systemd-analyze verify --root=${root} /etc/systemd/system/trainws.slice /etc/systemd/system/ts-nvidia-dev-char.service`);
    const missing = verify();
    expect(missing.status).not.toBe(0);
    expect(missing.stderr).toMatch(/ts-nvidia-dev-char\.service: Command \/usr\/bin\/nvidia-ctk is not executable/);
    fs.writeFileSync(path.join(root, "usr/bin/nvidia-ctk"), "#!/bin/sh\n", { mode: 0o755 });
    expect(verify()).toMatchObject({ status: 0, stderr: "" });
  });

  test("iptables-restore accepts the DOCKER-USER block (in a scratch network namespace)", () => {
    const file = path.join(scratch.dir, "docker-user.rules");
    fs.writeFileSync(file, files["ufw-docker-user.rules"]);
    expect(bash(`unshare -n iptables-restore --test --noflush < ${file}`)).toMatchObject({ status: 0 });
    fs.writeFileSync(file, files["ufw-docker-user.rules"].replace("--ctorigdstport", "--no-such-option"));
    expect(bash(`unshare -n iptables-restore --test --noflush < ${file}`).status).not.toBe(0);
  });
});

describe("baseline.sh in a booted systemd container", () => {
  const scratch = new Scratch("ts-baseline-");
  let c: NspawnContainer;
  const filesDir = "/root/ts-files";
  const env = (): Record<string, string> => ({
    TS_MOUNTPOINT: MP,
    TS_SSH_PORT: "22",
    TS_SSH_ADMIN_USER: params.adminUser,
    TS_GPU_COUNT: "0",
    TS_FILES_DIR: filesDir,
  });
  const write = (p: BaselineParams): void => writeFiles(path.join(c.root, filesDir), renderBaselineFiles(p));
  /** Checksums, modes and owners of the files baseline.sh manages (a missing file shows as missing). */
  const sums = (): string =>
    c.exec(["bash", "-c", `for f in ${MANAGED.join(" ")}; do [[ -e $f ]] && sha256sum "$f" && stat -c '%n %a %U:%G' "$f" || echo "$f missing"; done`]).stdout;
  /** The live firewall (packet counters and iptables-save's timestamp comments stripped). */
  const firewall = (): string => c.run(["iptables-save"]).replace(/\[\d+:\d+\]/g, "").replace(/^#.*\n/gm, "");
  /** When each service last (re)started: unchanged = not restarted. */
  const starts = (): string =>
    c.run(["systemctl", "show", "-p", "ExecMainStartTimestampMonotonic", "-p", "MainPID", "ssh", "fail2ban", "docker"]);

  beforeAll(() => {
    const rootfs = ensureRootfs("baseline-bookworm", BASELINE_PACKAGES);
    const array = scratch.btrfsArray({ sizeMb: 2048, name: "array", subvolumes: ["homes", "workspaces", "shared", "docker-volumes", "cache", "snapshots"] });
    c = NspawnContainer.start(scratch, rootfs, [`${array}:${MP}`]);
    c.run(["useradd", "-m", "-s", "/bin/bash", params.adminUser]);
    write(params);
  });
  afterAll(() => scratch.cleanup());

  test("refuses while the admin has no SSH key, before changing anything", () => {
    const before = sums();
    expect(before).toContain("/etc/ssh/sshd_config.d/10-train-server.conf missing");
    const r = c.runScript("baseline", "apply", env());
    expect(r.status).toBe(3);
    expect(r.stderr).toMatch(/authorized_keys has no key; sshd will accept keys only/);
    expect(fs.existsSync(path.join(c.root, "etc/ssh/sshd_config.d/10-train-server.conf"))).toBe(false);
    expect(sums()).toBe(before);
  });

  test("apply: hardened sshd, fail2ban jail, docker on the array, LAN-only firewall, shared caches", () => {
    c.run(["bash", "-c", `install -d -m 700 -o ${params.adminUser} ~${params.adminUser}/.ssh && echo '${ADMIN_KEY}' > ~${params.adminUser}/.ssh/authorized_keys`]);
    const r = c.runScript("baseline", "apply", env());
    expect(r.stderr).not.toMatch(/ERROR|REFUSED/);
    expect(r.status).toBe(0);
    expect(r.changes).toBeGreaterThan(5);

    for (const svc of ["ssh", "fail2ban", "docker", "ufw"]) expect(c.exec(["systemctl", "is-active", svc]).stdout.trim()).toBe("active");
    const sshd = c.run(["sshd", "-T"]).split("\n");
    for (const want of ["passwordauthentication no", "permitrootlogin no", "authenticationmethods publickey", "port 22"]) expect(sshd).toContain(want);
    expect(c.run(["fail2ban-client", "status", "sshd"])).toMatch(/Journal matches:\s+_SYSTEMD_UNIT=sshd.service/);
    expect(c.run(["docker", "info", "--format", "{{.Driver}} {{.DockerRootDir}} {{.LoggingDriver}}"]).trim()).toBe(`btrfs ${MP}/docker-data/${REMAPPED_ROOT_UID}.${REMAPPED_ROOT_UID} json-file`);
    // userns-remap: the remap user and exactly its subordinate ids
    expect(c.run(["grep", "^dockremap:", "/etc/subuid"])).toBe(renderDockerRemapSubIds());
    expect(c.run(["grep", "^dockremap:", "/etc/subgid"])).toBe(renderDockerRemapSubIds());
    // the Docker provider connects over ssh as the admin: the admin reaches the daemon without sudo
    expect(c.run(["id", "-nG", params.adminUser]).trim().split(" ")).toContain("docker");
    expect(c.run(["btrfs", "subvolume", "show", `${MP}/docker-data`])).toContain("Subvolume ID");
    // the workspaces' slice: running, protecting host.ramGb - host.reservedRamGb; Docker's cgroup driver is systemd
    expect(c.exec(["systemctl", "is-active", "trainws.slice"]).stdout.trim()).toBe("active");
    expect(c.run(["systemctl", "show", "-p", "MemoryLow", "--value", "trainws.slice"]).trim()).toBe(String(6 * GIB));
    expect(c.run(["docker", "info", "--format", "{{.CgroupDriver}}"]).trim()).toBe("systemd");

    const ufw = c.run(["ufw", "status", "verbose"]);
    expect(ufw).toMatch(/Status: active/);
    expect(ufw).toMatch(/Default: deny \(incoming\), allow \(outgoing\)/);
    const rules = ufw.split("\n").filter((l) => /ALLOW|DENY/.test(l));
    expect(rules.map((l) => l.trim().split(/\s{2,}/))).toEqual([["22/tcp", "ALLOW IN", "10.42.0.0/16"]]);
    const dockerUser = c.run(["iptables", "-S", "DOCKER-USER"]);
    expect(dockerUser).toContain("-A DOCKER-USER ! -s 10.42.0.0/16 -p tcp -m conntrack --ctstate DNAT --ctorigdstport 2222:62999 --ctdir ORIGINAL -j DROP");

    for (const cache of ["pip", "conda", "huggingface", "torch", "apt", "go", "npm", "docker"]) {
      expect(c.run(["stat", "-c", "%a %U:%G", `${MP}/cache/${cache}`]).trim()).toBe("2775 root:mlusers");
      expect(c.run(["getfacl", "-cpd", `${MP}/cache/${cache}`])).toContain("group:mlusers:rwx");
    }
  });

  test("a second run changes nothing and restarts nothing", () => {
    const before = { sums: sums(), starts: starts(), firewall: firewall() };
    const t0 = Date.now();
    const r = c.runScript("baseline", "apply", env());
    const ms = Date.now() - t0;
    expect(r.status).toBe(0);
    expect({ changes: r.changes, log: r.stderr.split("\n").filter((l) => l.includes("changed:")) }).toEqual({ changes: 0, log: [] });
    expect(sums()).toBe(before.sums);
    expect(starts()).toBe(before.starts);
    expect(firewall()).toBe(before.firewall);
    console.log(`baseline.sh second run in the container: ${ms} ms, changes=0`);
    const check = c.runScript("baseline", "check", env());
    expect(check.status).toBe(0);
    expect(Object.entries(check.results).filter(([k, v]) => k.startsWith("drift.") && v !== "no")).toEqual([]);
  });

  test("a new RAM pool reaches the running slice live: nothing restarts, a unit in the slice keeps running", () => {
    // what runc's systemd driver does for a workspace (a transient unit with Slice=trainws.slice and MemoryLow=the
    // guarantee). Not a real container: runc cannot create cgroups in this container (the v1 controllers of this
    // hybrid host are read-only in it); tests/host/workspace-memory.test.ts proves the protection on cgroup v2.
    const unit = "ts-ws-probe.service";
    c.run(["systemd-run", "--unit", unit, "--slice", "trainws.slice", "-p", "MemoryLow=64M", "/bin/sleep", "1000"]);
    expect(c.run(["systemctl", "show", "-p", "Slice", "--value", unit]).trim()).toBe("trainws.slice");
    expect(c.run(["systemctl", "show", "-p", "ControlGroup", "--value", unit]).trim()).toBe(`/trainws.slice/${unit}`);
    const pid = c.run(["systemctl", "show", "-p", "MainPID", "--value", unit]).trim();

    const before = { starts: starts() };
    write({ ...params, ramGb: 12 });
    const drift = c.runScript("baseline", "check", env());
    expect(drift.results["drift.trainws.slice"]).toBe("yes");
    expect(drift.results["drift.slice-memory-low"]).toBe("yes");
    const r = c.runScript("baseline", "apply", env());
    expect(r.status).toBe(0);
    expect(r.stderr).toMatch(/trainws\.slice MemoryLow=10737418240 \(applied live\)/);
    expect(c.run(["systemctl", "show", "-p", "MemoryLow", "--value", "trainws.slice"]).trim()).toBe(String(10 * GIB));
    expect(starts()).toBe(before.starts);
    expect(c.run(["systemctl", "show", "-p", "MainPID", "--value", unit]).trim()).toBe(pid);
    expect(c.exec(["systemctl", "is-active", unit]).stdout.trim()).toBe("active");
    expect(c.runScript("baseline", "apply", env()).changes).toBe(0);
    c.run(["systemctl", "stop", unit]);
    write(params);
    expect(c.runScript("baseline", "apply", env()).status).toBe(0);
  });

  test("refuses a pool larger than the host's RAM, before changing anything", () => {
    const before = sums();
    write({ ...params, ramGb: 100000, reservedRamGb: 2 });
    const r = c.runScript("baseline", "apply", env());
    expect(r.status).toBe(3);
    expect(r.stderr).toMatch(/host.ramGb - host.reservedRamGb is more than the host has; set host.ramGb to the host's RAM/);
    expect(sums()).toBe(before);
    write(params);
  });

  test("a rule added by hand is removed and a new LAN converges both firewalls", () => {
    c.run(["ufw", "allow", "80/tcp"]);
    write({ ...params, lanCidr: "10.43.0.0/16" });
    const drift = c.runScript("baseline", "check", env());
    expect(drift.results["drift.ufw-rules"]).toBe("yes");
    const r = c.runScript("baseline", "apply", env());
    expect(r.status).toBe(0);
    const rules = c.run(["ufw", "status", "verbose"]).split("\n").filter((l) => /ALLOW|DENY/.test(l));
    expect(rules.map((l) => l.trim().split(/\s{2,}/))).toEqual([["22/tcp", "ALLOW IN", "10.43.0.0/16"]]);
    const dockerUser = c.run(["iptables", "-S", "DOCKER-USER"]);
    expect(dockerUser).not.toContain("10.42.0.0/16");
    expect(dockerUser).toContain("! -s 10.43.0.0/16 -p tcp -m conntrack --ctstate DNAT --ctorigdstport 2222:62999");
    expect(c.runScript("baseline", "apply", env()).changes).toBe(0);
  });

  test("an sshd drop-in that sshd rejects is rolled back and sshd is not reloaded", () => {
    const dropIn = path.join(c.root, "etc/ssh/sshd_config.d/10-train-server.conf");
    const good = fs.readFileSync(dropIn, "utf8");
    const startsBefore = starts();
    const files = renderBaselineFiles({ ...params, lanCidr: "10.43.0.0/16" });
    writeFiles(path.join(c.root, filesDir), { ...files, "sshd.conf": files["sshd.conf"] + "NoSuchKeyword yes\n" });
    const r = c.runScript("baseline", "apply", env());
    expect(r.status).toBe(1);
    expect(r.stderr).toMatch(/sshd rejects the new configuration \(previous one restored/);
    expect(fs.readFileSync(dropIn, "utf8")).toBe(good);
    expect(starts()).toBe(startsBefore);
    expect(c.exec(["systemctl", "is-active", "ssh"]).stdout.trim()).toBe("active");
  });
});
