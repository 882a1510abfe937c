#!/bin/bash
# build-code-server DIR: finish code-server's npm package unpacked in DIR (image build only). The package's own
# postinstall runs nested `npm install`s that need downloads outside the npm registry (ripgrep from GitHub)
# and break under a global install; this does the same steps: install each dependency tree exactly as its
# npm-shrinkwrap.json pins it (integrity-checked), use the distribution's ripgrep, then build the native modules
# against the local Node.js headers (npm_config_nodedir).
set -euo pipefail
dir=$1
: "${npm_config_nodedir:?set npm_config_nodedir to the Node.js headers}"

# npm install, not npm ci: the top-level shrinkwrap misses a dependency (npm ci refuses it); the pinned entries hold
npm_ci() { npm install --omit=dev --ignore-scripts --no-save --no-audit --no-fund; }

# rebuild_native: run the install scripts of every dependency that has one (never the root package's own).
rebuild_native() {
  local pkgs
  pkgs=$(node -e '
    const fs = require("fs"), path = require("path"), out = new Set();
    const walk = (d) => {
      if (!fs.existsSync(d)) return;
      for (const e of fs.readdirSync(d)) {
        if (e.startsWith(".")) continue;
        const f = path.join(d, e);
        if (e.startsWith("@")) { walk(f); continue; }
        try {
          const j = JSON.parse(fs.readFileSync(path.join(f, "package.json"), "utf8")), s = j.scripts || {};
          if (s.preinstall || s.install || s.postinstall || fs.existsSync(path.join(f, "binding.gyp"))) out.add(j.name);
        } catch {}
        walk(path.join(f, "node_modules"));
      }
    };
    walk("node_modules");
    console.log([...out].join(" "));')
  # shellcheck disable=SC2086 # a list of package names
  [[ -z $pkgs ]] || npm rebuild --no-audit --no-fund $pkgs
}

cd "$dir"
npm_ci
rebuild_native
cd lib/vscode
npm_ci
mkdir -p node_modules/@vscode/ripgrep/bin
ln -sf /usr/bin/rg node_modules/@vscode/ripgrep/bin/rg # its postinstall downloads rg unless bin/ exists
rebuild_native
ln -sfn node_modules node_modules.asar
ln -sf code-linux.sh bin/remote-cli/code-server
ln -sf browser-linux.sh bin/helpers/browser.sh
cd extensions
npm_ci
rebuild_native
