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
t0=$(date +%s)
progress() { echo "$step: $1 (+$(( $(date +%s) - t0 ))s)" >&2; }
log=$(mktemp "${TMPDIR:-/tmp}/kindling-$step.XXXXXX.log")
trap 'rm -f "$log"' EXIT
fail() {
  echo "$step: sub-step '$1' failed; last lines of its log:" >&2
  tail -n 40 "$log" | awk '{print "    " $0}' >&2
  echo "$step: FAILED at sub-step '$1'" >&2
  exit 1
}

export PATH=$PATH:/usr/local/go/bin
command -v go >/dev/null || {
  echo "$step: 'go' (>= 1.22) not found; Debian bookworm's golang-go (1.19) is too old: install Go >= 1.22 into /usr/local/go (scripts/setup does)" >&2
  exit 1
}
gov=$(go env GOVERSION)
case "$gov" in
  go1.2[2-9]*|go1.[3-9][0-9]*) ;;
  *) echo "$step: $gov is too old, this module needs Go >= 1.22" >&2; exit 1 ;;
esac

cd "$here"
# -buildvcs=false: do not stamp the kindling repo's commit into the binary (it would
# change the binary on every commit, and fails where git is missing).
export GOTOOLCHAIN=local GOFLAGS="-mod=readonly -buildvcs=false" CGO_ENABLED=0
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
