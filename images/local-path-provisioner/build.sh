#!/usr/bin/env bash
# images/local-path-provisioner/build.sh OUT_DIR
#
# Builds Rancher's local-path-provisioner (the storage-provisioner add-on: a default
# StorageClass whose volumes are directories on the node's disk) at the
# github.com/rancher/local-path-provisioner version pinned in go.mod:
#   OUT_DIR/bin/local-path-provisioner   static, stripped, CGO_ENABLED=0
#   OUT_DIR/VERSION                      e.g. v0.0.30
# The OCI step (images/oci) packs it into the kindling.local/local-path-provisioner
# image. Upstream's scripts/build sets main.VERSION the same way.
# No caching here: the orchestrator caches OUT_DIR by a hash of this directory.
set -euo pipefail
step=local-path-provisioner
here=$(cd "$(dirname "$0")" && pwd)
out=${1:?usage: images/local-path-provisioner/build.sh OUT_DIR}
out=$(cd "$out" && pwd)
. "$here/../lib/step.sh"
log=$(mktemp "${TMPDIR:-/tmp}/kindling-$step.XXXXXX.log")
trap 'rm -f "$log"' EXIT
use_go
cd "$here"
pkg=github.com/rancher/local-path-provisioner
version=$(go list -m -f '{{.Version}}' "$pkg") || { go list -m "$pkg" >"$log" 2>&1; fail "read pinned version"; }
ldflags="-s -w -X main.VERSION=$version"

progress "downloading modules for local-path-provisioner $version (Go module cache)"
go mod download >"$log" 2>&1 || fail "go mod download"
progress "compiling local-path-provisioner $version with $gov (about 1-3 minutes on 2 cores when Go's build cache is cold)"
go build -trimpath -ldflags "$ldflags" -o "$out/bin/local-path-provisioner" "$pkg" >"$log" 2>&1 || fail "go build"
echo "$version" >"$out/VERSION"

progress "checking local-path-provisioner reports $version and is static"
"$out/bin/local-path-provisioner" --version >"$log" 2>&1 || fail "local-path-provisioner --version"
grep -q "version $version\$" "$log" || fail "local-path-provisioner --version (expected 'version $version')"
if command -v file >/dev/null; then
  file "$out/bin/local-path-provisioner" >"$log" 2>&1
  grep -q 'statically linked' "$log" || fail "static link check (file(1) does not say 'statically linked')"
fi

progress "done: $out/bin/local-path-provisioner $version ($(du -h "$out/bin/local-path-provisioner" | cut -f1))"
