#!/usr/bin/env bash
# images/etcd/build.sh OUT_DIR
#
# Builds etcd (server + etcdctl in one multi-call binary) from the Go module in
# this directory, at the go.etcd.io/etcd/server/v3 version pinned in go.mod:
#   OUT_DIR/bin/etcd                 static, stripped, CGO_ENABLED=0
#   OUT_DIR/bin/etcdctl -> etcd
#   OUT_DIR/VERSION                  e.g. 3.5.15
# No caching here: the orchestrator caches OUT_DIR by a hash of this directory.
set -euo pipefail
step=etcd
here=$(cd "$(dirname "$0")" && pwd)
out=${1:?usage: images/etcd/build.sh OUT_DIR}
out=$(cd "$out" && pwd)
. "$here/../lib/step.sh"
log=$(mktemp "${TMPDIR:-/tmp}/kindling-$step.XXXXXX.log")
trap 'rm -f "$log"' EXIT
use_go
cd "$here"
mver=$(go list -m -f '{{.Version}}' go.etcd.io/etcd/server/v3) || { go list -m go.etcd.io/etcd/server/v3 >"$log" 2>&1; fail "read pinned version"; }
version=${mver#v}
# etcd's version string is a constant in go.etcd.io/etcd/api/v3/version; only
# the git SHA is an -X variable, and a module build has no checkout.
ldflags="-s -w -X go.etcd.io/etcd/api/v3/version.GitSHA=module-$mver"

progress "downloading modules for etcd $mver (Go module cache)"
go mod download >"$log" 2>&1 || fail "go mod download"
progress "compiling etcd + etcdctl $mver with $gov (about 1-2 minutes on 2 cores when Go's build cache is cold)"
go build -trimpath -ldflags "$ldflags" -o "$out/bin/etcd" . >"$log" 2>&1 || fail "go build"
ln -sfn etcd "$out/bin/etcdctl"
echo "$version" >"$out/VERSION"

progress "checking etcd and etcdctl report $version"
"$out/bin/etcd" --version >"$log" 2>&1 || fail "etcd --version"
grep -qx "etcd Version: $version" "$log" || fail "etcd --version (expected 'etcd Version: $version')"
"$out/bin/etcdctl" version >"$log" 2>&1 || fail "etcdctl version"
grep -qx "etcdctl version: $version" "$log" || fail "etcdctl version (expected 'etcdctl version: $version')"

progress "done: $out/bin/etcd $version ($(du -h "$out/bin/etcd" | cut -f1))"
