#!/usr/bin/env bash
# images/metrics-server/build.sh OUT_DIR
#
# Builds metrics-server (the metrics-server add-on: the resource metrics API behind
# `kubectl top`) at the sigs.k8s.io/metrics-server version pinned in go.mod:
#   OUT_DIR/bin/metrics-server   static, stripped, CGO_ENABLED=0
#   OUT_DIR/VERSION              e.g. v0.8.0
# The OCI step (images/oci) packs it into the kindling.local/metrics-server image.
# Upstream's Makefile stamps the version into client-go's version package the same way.
# No caching here: the orchestrator caches OUT_DIR by a hash of this directory.
set -euo pipefail
step=metrics-server
here=$(cd "$(dirname "$0")" && pwd)
out=${1:?usage: images/metrics-server/build.sh OUT_DIR}
out=$(cd "$out" && pwd)
. "$here/../lib/step.sh"
log=$(mktemp "${TMPDIR:-/tmp}/kindling-$step.XXXXXX.log")
trap 'rm -f "$log"' EXIT
use_go
cd "$here"
pkg=sigs.k8s.io/metrics-server
version=$(go list -m -f '{{.Version}}' "$pkg") || { go list -m "$pkg" >"$log" 2>&1; fail "read pinned version"; }
vpkg=k8s.io/client-go/pkg/version
ldflags="-s -w -X $vpkg.gitVersion=$version -X $vpkg.buildDate=1970-01-01T00:00:00Z"

progress "downloading modules for metrics-server $version (Go module cache)"
go mod download >"$log" 2>&1 || fail "go mod download"
progress "compiling metrics-server $version with $gov (about 2-4 minutes on 2 cores when Go's build cache is cold)"
go build -trimpath -ldflags "$ldflags" -o "$out/bin/metrics-server" "$pkg/cmd/metrics-server" >"$log" 2>&1 || fail "go build"
echo "$version" >"$out/VERSION"

progress "checking metrics-server reports $version and is static"
"$out/bin/metrics-server" --version >"$log" 2>&1 || fail "metrics-server --version"
grep -qx "$version" "$log" || fail "metrics-server --version (expected '$version')"
if command -v file >/dev/null; then
  file "$out/bin/metrics-server" >"$log" 2>&1
  grep -q 'statically linked' "$log" || fail "static link check (file(1) does not say 'statically linked')"
fi

progress "done: $out/bin/metrics-server $version ($(du -h "$out/bin/metrics-server" | cut -f1))"
