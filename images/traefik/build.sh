#!/usr/bin/env bash
# images/traefik/build.sh OUT_DIR
#
# Builds Traefik (the ingress add-on: an Ingress controller, the one k3s ships) from its
# Go module github.com/traefik/traefik/v3 at the version pinned below:
#   OUT_DIR/bin/traefik   static, stripped, CGO_ENABLED=0
#   OUT_DIR/VERSION       e.g. v3.6.12
# The OCI step (images/oci) packs it into the kindling.local/traefik image.
#
# Traefik's go.mod replaces some modules with its own forks, which Go honours only in
# the main module; so this builds inside the module itself (its own go.mod and go.sum,
# read-only), as upstream's Makefile does, rather than from a module that imports it.
# The module's zip is checked against the hash pinned here. v3.6 is the newest line the
# proxy serves whole: v3.7's go.mod replaces a nested module with a local directory the
# module zip does not carry (github.com/traefik/traefik/dynamic/ext).
# No caching here: the orchestrator caches OUT_DIR by a hash of this directory.
set -euo pipefail
step=traefik
here=$(cd "$(dirname "$0")" && pwd)
out=${1:?usage: images/traefik/build.sh OUT_DIR}
out=$(cd "$out" && pwd)
. "$here/../lib/step.sh"
work=$(mktemp -d "${TMPDIR:-/tmp}/kindling-$step.XXXXXX")
trap 'chmod -R u+w "$work" 2>/dev/null; rm -rf "$work"' EXIT
log=$work/log
use_go

module=github.com/traefik/traefik/v3
version=v3.6.12
sum=h1:6pe4s7aaDTQs+AsF7KP3sM/xnq7zOVvibRQe5tw9eFo=

progress "downloading $module@$version (Go module proxy)"
go mod download -json "$module@$version" >"$work/mod.json" 2>"$log" || { cat "$work/mod.json" >>"$log"; fail "go mod download $module@$version"; }
field() { python3 -c 'import json,sys; print(json.load(open(sys.argv[1])).get(sys.argv[2], ""))' "$work/mod.json" "$1"; }
got=$(field Sum)
[ "$got" = "$sum" ] || { echo "module hash $got, pinned $sum" >"$log"; fail "check $module@$version's hash"; }
cp -r "$(field Dir)" "$work/src"
chmod -R u+w "$work/src"
cd "$work/src"

progress "downloading Traefik's dependencies (Go module cache)"
go mod download >"$log" 2>&1 || fail "go mod download"
# Upstream's Makefile stamps the version the same way (pkg/version).
vpkg=$module/pkg/version
ldflags="-s -w -X $vpkg.Version=$version -X $vpkg.Codename=kindling -X $vpkg.BuildDate=1970-01-01T00:00:00Z"
progress "compiling traefik $version with $gov (about 8-15 minutes on 2 cores when Go's build cache is cold)"
go build -trimpath -ldflags "$ldflags" -o "$out/bin/traefik" ./cmd/traefik >"$log" 2>&1 || fail "go build"
echo "$version" >"$out/VERSION"

progress "checking traefik reports $version and is static"
"$out/bin/traefik" version >"$log" 2>&1 || fail "traefik version"
grep -q "Version: *$version\$" "$log" || fail "traefik version (expected '$version')"
if command -v file >/dev/null; then
  file "$out/bin/traefik" >"$log" 2>&1
  grep -q 'statically linked' "$log" || fail "static link check (file(1) does not say 'statically linked')"
fi

progress "done: $out/bin/traefik $version ($(du -h "$out/bin/traefik" | cut -f1))"
