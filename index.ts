// train-server: one Pulumi program that converges one shared ML training server.
// See README.md; the graph is built in components/program.ts.
import { buildProgram } from "./components/program";

const { outputs } = buildProgram();

export const mountpoint = outputs.mountpoint;
export const storageUuid = outputs.storageUuid;
export const users = outputs.users;
