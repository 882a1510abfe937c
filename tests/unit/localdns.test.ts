/**
 * The local-DNS bypass renderers: a hosts-file block and a dnsmasq snippet mapping every route hostname to
 * the server's LAN address.
 */
import { parseConfig } from "../../components/config";
import { publishedRoutes } from "../../components/edge";
import { LocalDnsParams, renderDnsmasq, renderHostsBlock } from "../../components/render/localdns";
import { WORKSPACE_ROUTE_SUFFIXES } from "../../components/routes";
import { stackRaw } from "../helpers/program";

const params: LocalDnsParams = {
  address: "192.168.1.50",
  hostnames: ["grafana.example.com", "alice-code.example.com", "health.example.com"],
  label: "example.com",
};

describe("hosts block", () => {
  it("maps each hostname to the LAN address, one per line, sorted, between markers", () => {
    expect(renderHostsBlock(params)).toBe(
      [
        "# BEGIN train-server example.com (managed by Pulumi: replace this whole block when routes change)",
        "192.168.1.50    alice-code.example.com",
        "192.168.1.50    grafana.example.com",
        "192.168.1.50    health.example.com",
        "# END train-server example.com",
        "",
      ].join("\n"),
    );
  });
  it("every non-comment line is `address hostname` (what /etc/hosts parses)", () => {
    const lines = renderHostsBlock(params).split("\n").filter((l) => l && !l.startsWith("#"));
    expect(lines).toHaveLength(3);
    for (const l of lines) expect(l).toMatch(/^192\.168\.1\.50 +[a-z0-9.-]+$/);
  });
});

describe("dnsmasq snippet", () => {
  it("makes dnsmasq authoritative for exactly each name and gives it the LAN address", () => {
    const lines = renderDnsmasq(params).split("\n").filter((l) => l && !l.startsWith("#"));
    expect(lines).toEqual([
      "local=/alice-code.example.com/",
      "host-record=alice-code.example.com,192.168.1.50",
      "local=/grafana.example.com/",
      "host-record=grafana.example.com,192.168.1.50",
      "local=/health.example.com/",
      "host-record=health.example.com,192.168.1.50",
    ]);
  });
  it("never uses address=/…/ (it would also answer every subdomain)", () => {
    expect(renderDnsmasq(params)).not.toMatch(/^address=/m);
  });
});

describe("notes", () => {
  it("are comment lines under the header of both outputs, never records", () => {
    const p = { ...params, notes: ["admin hostnames are tunnel-only"] };
    expect(renderHostsBlock(p).split("\n").slice(0, 2)).toEqual([
      "# BEGIN train-server example.com (managed by Pulumi: replace this whole block when routes change)",
      "# admin hostnames are tunnel-only",
    ]);
    expect(renderDnsmasq(p).split("\n")[1]).toBe("# admin hostnames are tunnel-only");
    expect(renderHostsBlock(p).split("\n").filter((l) => l && !l.startsWith("#"))).toHaveLength(3);
  });
  it("must be one printable line each", () => {
    expect(() => renderHostsBlock({ ...params, notes: ["x\naddress=/#/1.2.3.4"] })).toThrow(/note .* one line of printable ASCII/);
    expect(() => renderDnsmasq({ ...params, notes: ["tab\there"] })).toThrow(/printable/);
  });
});

describe("input checks (nothing unvalidated reaches a resolver file)", () => {
  it.each([
    [{ ...params, address: "192.168.1.300" }, /address "192.168.1.300"/],
    [{ ...params, address: "::1" }, /not an IPv4/],
    [{ ...params, hostnames: ["Grafana.example.com"] }, /Grafana/],
    [{ ...params, hostnames: ["a_b-code.example.com"] }, /a_b-code/],
    [{ ...params, hostnames: ["grafana"] }, /grafana/],
    [{ ...params, hostnames: ["x.example.com\naddress=/#/1.2.3.4"] }, /not a lowercase fully qualified name/],
    [{ ...params, hostnames: ["a.example.com", "a.example.com"] }, /listed twice/],
    [{ ...params, label: "x y" }, /label/],
  ])("rejects %j", (p, msg) => {
    expect(() => renderHostsBlock(p as LocalDnsParams)).toThrow(msg);
    expect(() => renderDnsmasq(p as LocalDnsParams)).toThrow(msg);
  });
});

describe("prod", () => {
  const config = parseConfig(stackRaw("prod"));
  it("lists every published route hostname once, at host.lanAddress", () => {
    const p = { address: config.host.lanAddress, hostnames: publishedRoutes(config).map((r) => r.hostname), label: config.domain };
    const hosts = renderHostsBlock(p).split("\n").filter((l) => l && !l.startsWith("#"));
    expect(hosts).toHaveLength(9 + WORKSPACE_ROUTE_SUFFIXES.length * 5);
    expect(hosts.map((l) => l.split(/ +/)[1]).sort()).toEqual([...p.hostnames].sort());
    expect(new Set(hosts.map((l) => l.split(/ +/)[0]))).toEqual(new Set(["192.168.1.50"]));
    expect(renderDnsmasq(p).match(/^host-record=/gm)).toHaveLength(9 + WORKSPACE_ROUTE_SUFFIXES.length * 5);
  });
});
