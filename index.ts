// train-server: one Pulumi program that converges one shared ML training server.
// See README.md; the graph is built in components/program.ts.
import { buildProgram } from "./components/program";

const { outputs } = buildProgram();

export const mountpoint = outputs.mountpoint;
export const storageUuid = outputs.storageUuid;
/** Per user: uid, ports, URLs, and the (secret) password of the desktop, code-server and Jupyter. */
export const users = outputs.users;
export const tunnelId = outputs.tunnelId;
export const hostnames = outputs.hostnames;
/** hostname -> backend -> who may enter (Cloudflare Access). */
export const accessTable = outputs.accessTable;
/** For office users: paste into /etc/hosts, or the dnsmasq snippet into the router's DNS. */
export const localDnsHosts = outputs.localDnsHosts;
export const localDnsDnsmasq = outputs.localDnsDnsmasq;
/** Keep offline: without it the restic backups cannot be read. `pulumi stack output --show-secrets resticPassword` */
export const resticPassword = outputs.resticPassword;
export const grafanaAdminPassword = outputs.grafanaAdminPassword;
export const driveCacheSizeGb = outputs.driveCacheSizeGb;
/** CI's SSH route (cloudflare.ciSsh): hostname and the service token (`--show-secrets`) for the CI secrets. */
export const ciSsh = outputs.ciSsh;
