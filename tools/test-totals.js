#!/usr/bin/env node
// Sums jest --json result files into the one line CI reads: `N passed, N failed`.
// A missing or unreadable result file counts as one failure (a suite that did not run is not a pass);
// --tsc-ok=0 counts the type check as one failure, --tsc-ok=1 as one pass.
"use strict";
const fs = require("fs");
let passed = 0;
let failed = 0;
for (const arg of process.argv.slice(2)) {
  const tsc = /^--tsc-ok=(\d)$/.exec(arg);
  if (tsc) {
    if (tsc[1] === "1") passed += 1; else failed += 1;
    continue;
  }
  try {
    const r = JSON.parse(fs.readFileSync(arg, "utf8"));
    passed += r.numPassedTests;
    failed += r.numFailedTests + r.numRuntimeErrorTestSuites;
    // pending/todo tests are not allowed to hide: count them as failures
    failed += (r.numPendingTests || 0) + (r.numTodoTests || 0);
  } catch (e) {
    console.error(`test-totals: cannot read ${arg}: ${e.message}`);
    failed += 1;
  }
}
console.log(`${passed} passed, ${failed} failed`);
