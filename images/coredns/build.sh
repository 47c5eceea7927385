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
