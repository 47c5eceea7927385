#!/usr/bin/env bash
# images/coredns/build.sh OUT_DIR
#
# Builds CoreDNS with only the plugins of the default Kubernetes Corefile (see
# main.go) at the github.com/coredns/coredns version pinned in go.mod:
#   OUT_DIR/bin/coredns              static, stripped, CGO_ENABLED=0
#   OUT_DIR/VERSION                  e.g. 1.11.3
# The OCI step (images/oci) packs it into the coredns image.
# No caching here: the orchestrator caches OUT_DIR by a hash of this directory.
set -euo pipefail
step=coredns
here=$(cd "$(dirname "$0")" && pwd)
out=${1:?usage: images/coredns/build.sh OUT_DIR}
out=$(cd "$out" && pwd)
. "$here/../lib/step.sh"
log=$(mktemp "${TMPDIR:-/tmp}/kindling-$step.XXXXXX.log")
trap 'rm -f "$log"' EXIT
use_go
cd "$here"
mver=$(go list -m -f '{{.Version}}' github.com/coredns/coredns) || { go list -m github.com/coredns/coredns >"$log" 2>&1; fail "read pinned version"; }
version=${mver#v}
ldflags="-s -w -X github.com/coredns/coredns/coremain.GitCommit=module-$mver"

progress "downloading modules for CoreDNS $mver (Go module cache)"
go mod download >"$log" 2>&1 || fail "go mod download"
progress "compiling coredns $mver with $gov (about 2-4 minutes on 2 cores when Go's build cache is cold)"
go build -trimpath -ldflags "$ldflags" -o "$out/bin/coredns" . >"$log" 2>&1 || fail "go build"
echo "$version" >"$out/VERSION"

progress "checking coredns reports $version and has exactly the expected plugins"
"$out/bin/coredns" -version >"$log" 2>&1 || fail "coredns -version"
grep -qx "CoreDNS-$version" "$log" || fail "coredns -version (expected 'CoreDNS-$version')"
"$out/bin/coredns" -plugins >"$log" 2>&1 || fail "coredns -plugins"
# main.go's imports plus what forward and kubernetes link in themselves.
want="cache debug dnstap errors forward health kubernetes loadbalance log loop metadata prometheus ready reload transfer whoami"
got=$(sed -n 's/^  dns\.//p' "$log" | sort | xargs)
[ "$got" = "$want" ] || { echo "expected plugins: $want" >>"$log"; fail "coredns -plugins (unexpected plugin set: $got)"; }

progress "done: $out/bin/coredns $version ($(du -h "$out/bin/coredns" | cut -f1))"
