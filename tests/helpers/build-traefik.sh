#!/usr/bin/env bash
# Build Traefik from its Go module (the Go module proxy; no container registry needed) once, and cache it.
#
#   bash tests/helpers/build-traefik.sh v3.1.6      # prints the binary's path on stdout
#
# The binary is cached at /var/cache/train-server-test/traefik-<version>/traefik and rebuilt only when it is
# missing or does not report <version>. Module and build caches: /var/cache/train-server-test/go/{mod,build}.
# Built as Traefik's Makefile builds it (CGO_ENABLED=0, -ldflags "-s -w -X …/version.Version=…"), plus -trimpath.
# The module zip carries webui/static with a placeholder file only (the built web UI is not in it), which is
# enough for `//go:embed static`: the dashboard is not built here (nothing in the tests needs it).
# Progress and timings go to stderr and to build.log next to the binary.
set -euo pipefail

version=${1:?usage: build-traefik.sh <version, e.g. v3.1.6>}
[[ $version =~ ^v[0-9]+\.[0-9]+\.[0-9]+$ ]] || { echo "build-traefik: version must look like v3.1.6, got '$version'" >&2; exit 2; }
major=${version%%.*}
module=github.com/traefik/traefik/${major}
cache=${TS_TEST_CACHE:-/var/cache/train-server-test}
out_dir=$cache/traefik-$version
bin=$out_dir/traefik

export GOMODCACHE=$cache/go/mod
export GOCACHE=$cache/go/build
export GOTOOLCHAIN=local
export GOFLAGS="-modcacherw -buildvcs=false"
export CGO_ENABLED=0

reports_version() {
  [[ -x $1 ]] && "$1" version 2>/dev/null | grep -Eq "^Version:[[:space:]]+${version//./\\.}\$"
}

if reports_version "$bin"; then
  echo "$bin"
  exit 0
fi

command -v go >/dev/null || { echo "build-traefik: no go toolchain on PATH (needed to build $module@$version)" >&2; exit 1; }
mkdir -p "$out_dir" "$GOMODCACHE" "$GOCACHE"
# one build at a time; a second caller waits and then finds the binary
exec 9>"$out_dir/.lock"
flock 9
if reports_version "$bin"; then
  echo "$bin"
  exit 0
fi

log=$out_dir/build.log
work=$(mktemp -d "$out_dir/build.XXXXXX")
trap 'rm -rf "$work"' EXIT
start=$SECONDS
exec 3>&1 > >(tee -a "$log" >&2) 2>&1 # stdout is the binary's path only; progress to stderr and the log
echo "building $module@$version with $(go version) at $(date -u +%FT%TZ)"

# 1. the module itself
if ! json=$(cd "$work" && go mod download -json "$module@$version" 2>&1); then
  echo "build-traefik: could not fetch $module@$version from $(go env GOPROXY): $json" >&2
  exit 1
fi
dir=$(sed -n 's/^[[:space:]]*"Dir": "\(.*\)",$/\1/p' <<<"$json")
[[ -n $dir && -f $dir/go.mod ]] || { echo "build-traefik: go mod download gave no module dir for $module@$version: $json" >&2; exit 1; }
[[ -d $dir/webui/static ]] || { echo "build-traefik: $module@$version has no webui/static (needed by //go:embed static)" >&2; exit 1; }

# 2. a writable copy (the module cache is read-only), then every dependency its go.sum names
cp -r "$dir" "$work/src"
chmod -R u+w "$work/src"
cd "$work/src"
if ! deps=$(go mod download 2>&1); then
  echo "build-traefik: could not fetch the dependencies of $module@$version from $(go env GOPROXY):" >&2
  echo "$deps" >&2
  exit 1
fi
echo "modules fetched after $((SECONDS - start)) s"

# 3. the build
go build -trimpath -ldflags "-s -w -X $module/pkg/version.Version=$version -X $module/pkg/version.BuildDate=reproducible" \
  -o "$work/traefik" ./cmd/traefik
reports_version "$work/traefik" || { echo "build-traefik: the built binary does not report Version: $version" >&2; exit 1; }
mv -f "$work/traefik" "$bin"
echo "built $bin in $((SECONDS - start)) s"
echo "$bin" >&3
