/**
 * Local-DNS bypass for office users: the route hostnames Traefik's LAN entrypoint serves → the server's LAN
 * address, as
 *   (a) a block for /etc/hosts (one machine), or
 *   (b) a dnsmasq snippet (the office resolver: a router running dnsmasq, Pi-hole, or dnsmasq itself).
 * Both are stack outputs; the admin pastes them where the office resolves names.
 *
 * TRADE-OFF, chosen by the seeds' design: a LAN user who resolves these names locally talks to Traefik
 * directly and never passes Cloudflare Access. LAN users are trusted with the team and user routes (the office
 * network is the boundary, the firewall opens nothing else to it), and the per-user web apps (code-server,
 * Jupyter) keep their own passwords. The admin routes are not: the LAN entrypoint serves them only to
 * host.adminSources (and not at all by default), so which names are listed is decided by the caller
 * (components/edge.ts localDnsParams). Remote users always go through the tunnel, where every hostname has its
 * own Access application.
 */

const IPV4 = /^((25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\.){3}(25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)$/;
/** A fully qualified, lowercase hostname: labels of [a-z0-9-], no leading/trailing '-', at least two labels. */
const HOSTNAME = /^(?=.{1,253}$)((?!-)[a-z0-9-]{1,63}(?<!-)\.)+[a-z]{2,63}$/;

export interface LocalDnsParams {
  /** IPv4 address every name resolves to on the LAN (config.host.lanAddress). */
  address: string;
  /** The route hostnames (fully qualified, lowercase). */
  hostnames: string[];
  /** Names this block in its marker comments, e.g. the domain; letters, digits, '.', '_' and '-'. */
  label: string;
  /** Comment lines written under the header (printable ASCII, one line each). */
  notes?: string[];
}

function check(p: LocalDnsParams): string[] {
  const problems: string[] = [];
  if (!IPV4.test(p.address)) problems.push(`address "${p.address}" is not an IPv4 address`);
  for (const h of p.hostnames) if (!HOSTNAME.test(h)) problems.push(`hostname "${h}" is not a lowercase fully qualified name`);
  if (!/^[A-Za-z0-9._-]{1,100}$/.test(p.label)) problems.push(`label "${p.label}" may only hold letters, digits, '.', '_' and '-'`);
  for (const n of p.notes ?? []) if (!/^[\x20-\x7e]*$/.test(n)) problems.push(`note ${JSON.stringify(n)} must be one line of printable ASCII`);
  const dup = p.hostnames.find((h, i) => p.hostnames.indexOf(h) !== i);
  if (dup) problems.push(`hostname "${dup}" is listed twice`);
  if (problems.length) throw new Error(`local DNS: ${problems.join("; ")}`);
  return [...p.hostnames].sort();
}

function notesOf(p: LocalDnsParams): string[] {
  return (p.notes ?? []).map((n) => `# ${n}`);
}

/**
 * A marked block for /etc/hosts (or C:\Windows\System32\drivers\etc\hosts): one name per line, since some
 * resolvers cap the names per line. Replace the whole block between the markers when routes change.
 */
export function renderHostsBlock(p: LocalDnsParams): string {
  const names = check(p);
  const width = Math.max(p.address.length, 15);
  return [
    `# BEGIN train-server ${p.label} (managed by Pulumi: replace this whole block when routes change)`,
    ...notesOf(p),
    ...names.map((h) => `${p.address.padEnd(width)} ${h}`),
    `# END train-server ${p.label}`,
    "",
  ].join("\n");
}

/**
 * A dnsmasq snippet (e.g. /etc/dnsmasq.d/train-server.conf). Per name, `local=/name/` makes dnsmasq the
 * authority for exactly that name and `host-record` gives it the LAN address. Checked against dnsmasq 2.90:
 * A → the LAN address; AAAA and HTTPS (type 65) → an empty answer instead of being forwarded (forwarded, they
 * would return Cloudflare's public IPv6 address and ipv6hint, and a dual-stack browser would leave the LAN);
 * subdomains of a route → NXDOMAIN (unlike `address=/name/ip`, which also answers every subdomain).
 */
export function renderDnsmasq(p: LocalDnsParams): string {
  const names = check(p);
  return [
    `# train-server ${p.label}: route hostnames resolve to the server on the LAN (managed by Pulumi)`,
    ...notesOf(p),
    ...names.flatMap((h) => [`local=/${h}/`, `host-record=${h},${p.address}`]),
    "",
  ].join("\n");
}
