/** host-scripts/service-dirs.sh for real: data dirs with owners and modes, idempotent, never deletes. */
import * as fs from "fs";
import * as path from "path";
import { runScript, Scratch } from "../helpers/host";

describe("service-dirs.sh", () => {
  const s = new Scratch("ts-svcdirs-");
  afterAll(() => s.cleanup());
  const root = path.join(s.dir, "docker-volumes");
  const env = () => ({ TS_DIRS: [`${root}/prometheus 65534:65534 0750`, `${root}/grafana 472:0 0750`].join("\n") });

  test("refuses while the parent (the array) is missing, creating nothing", () => {
    const r = runScript("service-dirs", "apply", env());
    expect(r.status).toBe(3);
    expect(r.stderr).toMatch(/docker-volumes does not exist/);
    expect(fs.existsSync(root)).toBe(false);
  });

  test("creates the dirs with owner and mode; a second run changes nothing; data is kept", () => {
    fs.mkdirSync(root);
    const first = runScript("service-dirs", "apply", env());
    expect(first.status).toBe(0);
    expect(first.changes).toBeGreaterThanOrEqual(2);
    const st = fs.statSync(`${root}/prometheus`);
    expect([st.uid, st.gid, st.mode & 0o7777]).toEqual([65534, 65534, 0o750]);
    fs.writeFileSync(`${root}/grafana/grafana.db`, "data");
    const second = runScript("service-dirs", "apply", env());
    expect([second.status, second.changes]).toEqual([0, 0]);
    fs.chmodSync(`${root}/grafana`, 0o777);
    const third = runScript("service-dirs", "apply", env());
    expect(third.changes).toBe(1);
    expect(fs.statSync(`${root}/grafana`).mode & 0o7777).toBe(0o750);
    expect(runScript("service-dirs", "destroy", env()).status).toBe(0);
    expect(fs.readFileSync(`${root}/grafana/grafana.db`, "utf8")).toBe("data");
  });

  test("a malformed record is an error", () => {
    const r = runScript("service-dirs", "apply", { TS_DIRS: "relative/path 1:1 0750" });
    expect(r.status).toBe(1);
    expect(r.stderr).toMatch(/bad TS_DIRS record/);
  });
});
