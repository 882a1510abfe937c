/**
 * The browser desktop's last mile for real: guacd connects to a workspace's VNC server and receives a frame.
 *
 * A private dockerd (btrfs data root, its own bridge, no iptables of its own), one private network like the services
 * network, and two containers made from cached debootstrap rootfs:
 *   - a stand-in workspace (bookworm + TigerVNC): its VNC password arrives exactly as components/workspace.ts
 *     delivers it (a root-only 0400 file at WORKSPACE_VNC_PASSWORD_FILE, never an environment variable), is turned
 *     into the VncAuth file with `vncpasswd -f` as the image does, and `Xvnc :1` listens on WORKSPACE_PORTS.vnc
 *     with `-SecurityTypes VncAuth`, not published on the host; its root window is painted a known colour;
 *   - guacd (Debian's guacd 1.3.0 with libguac-client-vnc: bookworm has no guacd, bullseye's is the newest Debian
 *     package; production runs the pinned guacamole/guacd image, which this machine cannot pull).
 * tests/helpers/guacamole-client.ts speaks the Guacamole protocol to guacd as the web app would, with the connection
 * parameters renderGuacamoleSql gives that user's connection. Proves: the right password gives `ready` and a frame
 * of the desktop's size whose pixels are the painted colour; a wrong password gives no frame; the password is in no
 * container's environment or command line; the host network is left as it was.
 */
import { spawnSync } from "child_process";
import * as crypto from "crypto";
import * as fs from "fs";
import * as path from "path";
import { WORKSPACE_PORTS, WORKSPACE_VNC_PASSWORD_FILE } from "../../components/render/workspace-image";
import { guacamoleConnectionParams, VNC_PASSWORD_LENGTH } from "../../components/render/guacamole";
import { ensureDebootstrapRootfs, GUACD_ROOTFS, HostNetState, hostNetState, PrivateDockerd, RootfsSpec } from "../helpers/docker";
import { framePixel, guacFrame, GuacFrameResult } from "../helpers/guacamole-client";
import { Scratch, sh } from "../helpers/host";

jest.setTimeout(20 * 60_000);

const MIRROR = "http://deb.debian.org/debian";
/** The stand-in workspace: TigerVNC's Xvnc and vncpasswd (the packages the workspace image installs) + xsetroot. */
const VNC_ROOTFS: RootfsSpec = { suite: "bookworm", variant: "minbase", mirror: MIRROR, include: ["tigervnc-standalone-server", "tigervnc-tools", "x11-xserver-utils"] };
const SCREEN = { width: 1280, height: 800 };
/** The stand-in's root window: a grid (xsetroot -mod) of these two colours, so the frame has structure to check. */
const PAINT = [0x33, 0x66, 0x99];
const GRID = [0xff, 0xcc, 0x00];
const hex = (c: number[]): string => `#${c.map((v) => v.toString(16).padStart(2, "0")).join("")}`;
const USER = "alice";
const WS = `workspace-${USER}`;

/** The stand-in's start: VncAuth file from the password file (vncpasswd -f, as the image does), Xvnc, the paint. */
const VNC_START = `set -eu
umask 077
vncpasswd -f <${WORKSPACE_VNC_PASSWORD_FILE} >/run/vncauth
Xvnc :1 -rfbport ${WORKSPACE_PORTS.vnc} -SecurityTypes VncAuth -rfbauth /run/vncauth -geometry ${SCREEN.width}x${SCREEN.height} -depth 24 -nolisten tcp &
for i in $(seq 1 100); do [ -S /tmp/.X11-unix/X1 ] && break; sleep 0.1; done
DISPLAY=:1 xsetroot -mod 16 16 -bg '${hex(PAINT)}' -fg '${hex(GRID)}'
echo painted
wait
`;

describe("guacd → a workspace's VNC desktop (real guacd, real Xvnc)", () => {
  const scratch = new Scratch("ts-guac-");
  let netBefore: HostNetState;
  let d: PrivateDockerd;
  let guacdIp: string;
  let password: string;
  const timings: Record<string, number> = {};
  let t0 = Date.now();
  /** Seconds since the last mark, recorded under `what`. */
  const mark = (what: string): void => {
    timings[what] = (Date.now() - t0) / 1000;
    t0 = Date.now();
  };
  const frame = (pw: string): Promise<GuacFrameResult> => {
    const p = guacamoleConnectionParams({ container: WS, password: pw });
    return guacFrame({ host: guacdIp, port: 4822, vncHost: p.hostname, vncPort: Number(p.port), password: p.password, timeoutMs: 30_000, ...SCREEN });
  };

  beforeAll(() => {
    netBefore = hostNetState();
    t0 = Date.now();
    d = PrivateDockerd.start(scratch, { dataRootMb: 4096 });
    mark("dockerd start");
    const guacdRootfs = ensureDebootstrapRootfs(GUACD_ROOTFS);
    const vncRootfs = ensureDebootstrapRootfs(VNC_ROOTFS);
    mark("debootstrap rootfs (cached after the first run)");
    d.importRootfs(guacdRootfs, "local/guacd");
    d.importRootfs(vncRootfs, "local/vnc");
    mark("docker import");
    // a network like the services network, on a subnet of ours
    let n = 0;
    const used = sh("ip", ["-4", "-o", "addr"]);
    for (let tries = 0; tries < 20; tries++) {
      n = 1 + crypto.randomInt(250);
      if (!used.includes(`10.233.${n}.`)) break;
    }
    const bridge = `tsgu${crypto.randomBytes(4).toString("hex")}`;
    d.dockerOk(["network", "create", "--driver", "bridge", "--subnet", `10.233.${n}.0/24`, "--gateway", `10.233.${n}.1`, "-o", `com.docker.network.bridge.name=${bridge}`, "services"]);
    scratch.onCleanup(() => void spawnSync("ip", ["link", "del", bridge]));
    // bridged frames pass iptables' FORWARD (br_netfilter): let ours through if the policy is not ACCEPT
    if (!/^-P FORWARD ACCEPT$/m.test(sh("iptables", ["-S", "FORWARD"]))) {
      sh("iptables", ["-I", "FORWARD", "1", "-i", bridge, "-o", bridge, "-j", "ACCEPT"]);
      scratch.onCleanup(() => void spawnSync("iptables", ["-D", "FORWARD", "-i", bridge, "-o", bridge, "-j", "ACCEPT"]));
    }

    // the VNC password: 8 random characters, a root-only host file, as the program makes it
    password = crypto.randomBytes(16).toString("base64").replace(/[^A-Za-z0-9]/g, "").slice(0, VNC_PASSWORD_LENGTH);
    expect(password).toHaveLength(VNC_PASSWORD_LENGTH);
    const pwFile = path.join(scratch.dir, "vnc-password");
    fs.writeFileSync(pwFile, password + "\n", { mode: 0o400 });
    fs.writeFileSync(path.join(scratch.dir, "vnc-start.sh"), VNC_START);
    d.dockerOk([
      "run", "-d", "--name", WS, "--network", "services", "--network-alias", WS,
      "-v", `${pwFile}:${WORKSPACE_VNC_PASSWORD_FILE}:ro`, "-v", `${path.join(scratch.dir, "vnc-start.sh")}:/vnc-start.sh:ro`,
      "local/vnc", "bash", "/vnc-start.sh",
    ]);
    d.dockerOk(["run", "-d", "--name", "guacd", "--network", "services", "local/guacd", "guacd", "-f", "-b", "0.0.0.0", "-l", "4822", "-L", "debug"]);
    guacdIp = d.dockerOk(["inspect", "-f", "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}", "guacd"]).trim();
    const deadline = Date.now() + 30_000;
    while (Date.now() < deadline && !d.docker(["logs", WS]).stdout.includes("painted")) spawnSync("sleep", ["0.2"]);
    const logs = d.docker(["logs", WS]);
    if (!logs.stdout.includes("painted")) throw new Error(`the stand-in workspace did not start Xvnc: ${logs.stdout}${logs.stderr}`);
    while (Date.now() < deadline && !/Guacamole proxy daemon \(guacd\) version .* started|Listening on host/.test(d.docker(["logs", "guacd"]).stderr)) spawnSync("sleep", ["0.2"]);
  });

  afterAll(() => {
    process.stderr.write(`guacamole timings (s): ${JSON.stringify(timings)}\n`);
    scratch.cleanup();
    expect(hostNetState()).toEqual(netBefore);
  });

  test("the right password: ready, then a frame of the desktop's size with the desktop's pixels", async () => {
    const r = await frame(password);
    const pngs = r.images.filter((i) => i.layer === 0 && i.png);
    process.stderr.write(
      `guacamole frame: guacd ${r.version}, screen ${JSON.stringify(r.screen)}, ${r.images.length} image(s) ` +
        `${JSON.stringify(r.images.map((i) => ({ layer: i.layer, at: [i.x, i.y], size: i.png ? [i.png.width, i.png.height] : null, colorType: i.png?.colorType, bytes: i.bytes })))}, ` +
        `${r.msToFirstFrame} ms to first frame\n`,
    );
    expect(r.errors).toEqual([]);
    expect(r.images.map((i) => i.decodeError).filter(Boolean)).toEqual([]);
    expect(r.version).toMatch(/^VERSION_1_\d+_\d+$/);
    expect(r.argNames).toEqual(expect.arrayContaining(["hostname", "port", "password"]));
    expect(r.connectionId).toMatch(/^\$/);
    expect(r.ended).toBe("frame");
    expect(r.screen).toEqual(SCREEN);
    expect(pngs.length).toBeGreaterThan(0);
    // the frame covers the screen, and its pixels are the desktop's: the two colours of the grid, and only them
    const area = pngs.reduce((s, i) => s + i.png!.width * i.png!.height, 0);
    expect(area).toBeGreaterThanOrEqual(SCREEN.width * SCREEN.height);
    const counts = new Map<string, number>();
    for (let y = 0; y < SCREEN.height; y += 3) {
      for (let x = 0; x < SCREEN.width; x += 3) {
        const p = framePixel(r.images, x, y);
        const k = p ? hex(p.slice(0, 3)) : "undrawn";
        counts.set(k, (counts.get(k) ?? 0) + 1);
      }
    }
    process.stderr.write(`guacamole frame colours (every 3rd pixel): ${JSON.stringify(Object.fromEntries(counts))}\n`);
    expect([...counts.keys()].sort()).toEqual([hex(GRID), hex(PAINT)].sort());
    // a grid of lines every 16 pixels: mostly background, the lines a real share of it
    const share = counts.get(hex(GRID))! / (counts.get(hex(GRID))! + counts.get(hex(PAINT))!);
    expect(share).toBeGreaterThan(0.02);
    expect(share).toBeLessThan(0.5);
  });

  test("a wrong password: no frame, guacd reports the failure and closes", async () => {
    const wrong = password.split("").reverse().join("") === password ? "x" + password.slice(1) : password.split("").reverse().join("");
    const r = await frame(wrong);
    process.stderr.write(`guacamole wrong password: ended ${r.ended}, errors ${JSON.stringify(r.errors)}\n`);
    expect(r.images).toEqual([]);
    expect(r.ended).toBe("closed");
    expect(r.errors.length).toBeGreaterThan(0);
    // and the right one still works afterwards (no lock-out from one failure)
    expect((await frame(password)).ended).toBe("frame");
  });

  test("the password is in no container's environment or command line, and the file is root-only read-only", () => {
    for (const c of [WS, "guacd"]) {
      const inspect = d.dockerOk(["inspect", c]);
      expect(inspect).not.toContain(password);
    }
    expect(d.dockerOk(["exec", WS, "stat", "-c", "%a %U:%G", WORKSPACE_VNC_PASSWORD_FILE]).trim()).toBe("400 root:root");
    expect(d.docker(["exec", WS, "sh", "-c", `echo x >>${WORKSPACE_VNC_PASSWORD_FILE}`]).status).not.toBe(0);
    expect(d.dockerOk(["exec", WS, "sh", "-c", "cat /proc/[0-9]*/cmdline | tr '\\0' ' '"])).not.toContain(password);
    expect(d.dockerOk(["exec", WS, "sh", "-c", "cat /proc/[0-9]*/environ | tr '\\0' '\\n'"])).not.toContain(password);
    // guacd at debug level logs the connection's parameter names, never the password itself
    const guacdLog = d.docker(["logs", "guacd"]);
    expect(guacdLog.stderr).toMatch(/password/i);
    expect(guacdLog.stdout + guacdLog.stderr).not.toContain(password);
  });
});
