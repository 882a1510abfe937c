/** Two projects: `unit` runs the Pulumi program under mocks (parallel); `host` runs real host code
 * (loop devices, btrfs, systemd-analyze, promtool...) and must run in band, as root. */
// transpile only (isolatedModules is set in tsconfig.json); type errors are tsc's job (npm run build)
const tsJest = ["ts-jest", { diagnostics: false }];
module.exports = {
  projects: [
    {
      displayName: "unit",
      testEnvironment: "node",
      roots: ["<rootDir>/tests/unit"],
      transform: { "^.+\\.ts$": tsJest },
      testMatch: ["**/*.test.ts"],
    },
    {
      displayName: "host",
      testEnvironment: "node",
      roots: ["<rootDir>/tests/host"],
      transform: { "^.+\\.ts$": tsJest },
      testMatch: ["**/*.test.ts"],
    },
  ],
};
