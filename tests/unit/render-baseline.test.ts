/** The baseline renderers: exact directives, LAN-only exposure, parameter validation. (Real validators: tests/host/baseline.test.ts.) */
import {
  BaselineParams,
  renderBaselineFiles,
  renderDockerDaemonJson,
  renderDockerServiceDropIn,
  renderFail2banJail,
  renderSshdConfig,
  renderUfwDockerUserRules,
  renderUfwRules,
} from "../../components/render/baseline";
import { cgroupMemoryFiles, WORKSPACE_SLICE } from "../../components/render/workspace-slice";

const params: BaselineParams = {
  sshPort: 22,
  lanCidr: "192.168.1.0/24",
  userPortRange: { from: 2222, to: 62999 },
  adminUser: "admin",
  dataRoot: "/mnt/storage/docker-data",
  ramGb: 8,
  reservedRamGb: 2,
  gpuCount: 0,
};
/** Non-comment, non-blank lines. */
const directives = (text: string): string[] => text.split("\n").filter((l) => l.trim() && !l.startsWith("#"));

describe("renderSshdConfig", () => {
  test("keys only, no root, no passwords, the given port", () => {
    expect(directives(renderSshdConfig({ ...params, sshPort: 2022 }))).toEqual([
      "Port 2022",
      "PermitRootLogin no",
      "PubkeyAuthentication yes",
      "AuthenticationMethods publickey",
      "PasswordAuthentication no",
      "KbdInteractiveAuthentication no",
      "PermitEmptyPasswords no",
      "UsePAM yes",
      "X11Forwarding no",
      "MaxAuthTries 3",
      "LoginGraceTime 30",
      "MaxStartups 64:30:128",
      "ClientAliveInterval 300",
      "ClientAliveCountMax 3",
    ]);
  });
});

describe("renderFail2banJail", () => {
  test("sshd jail on the journal, on the ssh port, banning with iptables (not ufw)", () => {
    const text = renderFail2banJail({ ...params, sshPort: 2022, maxRetry: 4, banTime: "2h" });
    expect(directives(text)).toEqual([
      "[DEFAULT]",
      "ignoreip = 127.0.0.1/8 ::1",
      "banaction = iptables-multiport",
      "banaction_allports = iptables-allports",
      "[sshd]",
      "enabled = true",
      "backend = systemd",
      "mode = normal",
      "port = 2022",
      "maxretry = 4",
      "findtime = 10m",
      "bantime = 2h",
    ]);
  });
});

describe("renderDockerDaemonJson", () => {
  test("data on the array, btrfs driver, rotated logs, live-restore, user-namespace remapping; no nvidia runtime without GPUs", () => {
    expect(JSON.parse(renderDockerDaemonJson(params))).toEqual({
      "data-root": "/mnt/storage/docker-data",
      "storage-driver": "btrfs",
      "log-driver": "json-file",
      "log-opts": { "max-size": "50m", "max-file": "5" },
      "live-restore": true,
      "exec-opts": ["native.cgroupdriver=systemd"],
      "userns-remap": "dockremap",
    });
  });
  test("adds the nvidia runtime when there are GPUs", () => {
    const config = JSON.parse(renderDockerDaemonJson({ ...params, gpuCount: 2, logMaxSize: "10m", logMaxFiles: 3 }));
    expect(config.runtimes).toEqual({ nvidia: { path: "nvidia-container-runtime", args: [] } });
    expect(config["log-opts"]).toEqual({ "max-size": "10m", "max-file": "3" });
  });
  test("docker.service waits for the array", () => {
    expect(directives(renderDockerServiceDropIn(params))).toEqual(["[Unit]", "RequiresMountsFor=/mnt/storage"]);
    expect(directives(renderDockerServiceDropIn({ ...params, mountpoint: "/srv/array" }))).toEqual(["[Unit]", "RequiresMountsFor=/srv/array"]);
  });
});

describe("firewall", () => {
  test("UFW opens only the host's SSH port, only from the LAN", () => {
    expect(renderUfwRules(params)).toBe("allow from 192.168.1.0/24 to any port 22 proto tcp\n");
  });
  test("every port of the user range is dropped in DOCKER-USER unless it comes from the LAN", () => {
    const rules = directives(renderUfwDockerUserRules(params));
    expect(rules).toEqual([
      "*filter",
      ":DOCKER-USER - [0:0]",
      "-A DOCKER-USER -p tcp -m conntrack --ctstate DNAT --ctorigdstport 2222:62999 --ctdir ORIGINAL ! -s 192.168.1.0/24 -j DROP",
      "-A DOCKER-USER -j RETURN",
      "COMMIT",
    ]);
    // every line that names a port also restricts its source to the LAN (nothing opened to the world)
    for (const line of [...rules, ...directives(renderUfwRules(params))].filter((l) => /port \d+|dstport/.test(l))) {
      expect(line).toMatch(/192\.168\.1\.0\/24/);
    }
  });
});

describe("renderBaselineFiles", () => {
  test("the file names baseline.sh reads; the NVIDIA apt source only with GPUs", () => {
    expect(Object.keys(renderBaselineFiles(params)).sort()).toEqual(
      ["apparmor-train-server-workspace", "daemon.json", "docker-service.conf", "fail2ban-jail.conf", "sshd.conf", "subid-dockremap", "trainws.slice", "ufw-docker-user.rules", "ufw-rules"],
    );
    const gpu = renderBaselineFiles({ ...params, gpuCount: 1 });
    expect(Object.keys(gpu).filter((k) => !(k in renderBaselineFiles(params))).sort()).toEqual(["nvidia-container-toolkit.list", "nvidia-dev-char.rules", "ts-nvidia-dev-char.service"]);
    // NVIDIA's workaround for GPUs lost on daemon-reload: /dev/char links whenever the driver binds, and at boot before Docker
    expect(gpu["nvidia-dev-char.rules"]).toMatch(/^ACTION=="add", DEVPATH=="\/bus\/pci\/drivers\/nvidia", RUN\+="\/usr\/bin\/nvidia-ctk system create-dev-char-symlinks --create-all"$/m);
    expect(gpu["ts-nvidia-dev-char.service"]).toMatch(/^ExecStart=\/usr\/bin\/nvidia-ctk system create-dev-char-symlinks --create-all$/m);
    expect(gpu["ts-nvidia-dev-char.service"]).toMatch(/^Before=docker\.service$/m);
    expect(gpu["nvidia-container-toolkit.list"]).toContain(
      "deb [signed-by=/usr/share/keyrings/nvidia-container-toolkit-keyring.gpg] https://nvidia.github.io/libnvidia-container/stable/deb/$(ARCH) /",
    );
  });

  test.each([
    ["a CIDR with host bits", { lanCidr: "192.168.1.5/24" }, /host bits/],
    ["a non-CIDR", { lanCidr: "0.0.0.0/0" }, /lanCidr/],
    ["a hostname in the CIDR", { lanCidr: "lan.example/24" }, /lanCidr/],
    ["an out-of-range port", { sshPort: 70000 }, /sshPort/],
    ["a reversed user port range", { userPortRange: { from: 4000, to: 2222 } }, /reversed/],
    ["an out-of-range user port", { userPortRange: { from: 2222, to: 70000 } }, /userPortRange.to/],
    ["root as admin", { adminUser: "root" }, /adminUser/],
    ["a relative data root", { dataRoot: "docker" }, /dataRoot/],
    ["a data root with a newline", { dataRoot: "/mnt/x\n/y" }, /dataRoot/],
    ["a bad ban time", { banTime: "1 hour" }, /banTime/],
    ["a reserve of all the RAM", { ramGb: 8, reservedRamGb: 8 }, /host.reservedRamGb 8 GB must be below host.ramGb 8 GB/],
  ])("rejects %s", (_what, patch, message) => {
    expect(() => renderBaselineFiles({ ...params, ...patch } as BaselineParams)).toThrow(message);
  });
});

describe("the workspace slice and Docker's cgroup driver", () => {
  test("trainws.slice protects the users' pool, host.ramGb - host.reservedRamGb, in bytes", () => {
    const unit = renderBaselineFiles({ ...params, ramGb: 256, reservedRamGb: 16 })["trainws.slice"];
    expect(unit).toMatch(/^\[Slice\]$/m);
    expect(unit).toMatch(/^MemoryAccounting=yes$/m);
    expect(/^MemoryLow=(\d+)$/m.exec(unit)![1]).toBe(String(240 * 1024 ** 3));
    // independent of the users: the same host config renders the same file
    expect(renderBaselineFiles({ ...params, ramGb: 256, reservedRamGb: 16, sshPort: 2022 })["trainws.slice"]).toBe(unit);
  });

  test("the slice is top-level (no '-' in its name, which systemd reads as a parent slice)", () => {
    expect(WORKSPACE_SLICE).toMatch(/^[a-z0-9_]+\.slice$/);
  });

  test("daemon.json pins the systemd cgroup driver (containers become scopes under the slice)", () => {
    expect(JSON.parse(renderDockerDaemonJson(params))["exec-opts"]).toEqual(["native.cgroupdriver=systemd"]);
  });

  test("runc's cgroup v2 files for Docker's memory settings", () => {
    expect(cgroupMemoryFiles({ memory: 100 * 1024, memoryReservation: 32 * 1024, memorySwap: 150 * 1024 })).toEqual({
      "memory.low": 32 * 1024 ** 3,
      "memory.max": 100 * 1024 ** 3,
      "memory.swap.max": 50 * 1024 ** 3,
    });
  });
});
