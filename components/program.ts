/**
 * The program: load and validate the stack config, build one TrainServer, return the stack outputs.
 * `index.ts` exports these; the tests, the offline plan and the benchmarks call `buildProgram` directly.
 */
import { loadConfig } from "./config";
import { TrainServer } from "./server";

export function buildProgram() {
  const { config, secrets } = loadConfig();
  const server = new TrainServer("server", { config, secrets });
  return {
    server,
    outputs: {
      mountpoint: server.storage.mountpoint,
      storageUuid: server.storage.uuid,
      users: server.userOutputs,
      tunnelId: server.edge.tunnelId,
      hostnames: server.edge.hostnames,
      accessTable: server.accessTable,
      localDnsHosts: server.edge.localDns.hosts,
      localDnsDnsmasq: server.edge.localDns.dnsmasq,
      resticPassword: server.operations.resticPassword,
      grafanaAdminPassword: server.services.grafanaPassword,
      driveCacheSizeGb: server.operations.driveCacheSizeGb,
      // CI's SSH route (cloudflare.ciSsh): hostname, and the service token for the CF_ACCESS_CLIENT_* secrets
      ciSsh: server.edge.ciSsh,
    },
  };
}
