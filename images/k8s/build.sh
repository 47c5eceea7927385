#!/usr/bin/env bash
# images/k8s/build.sh OUT_DIR
#
# Builds kindling's multi-call Kubernetes binary from the Go module in this
# directory (the release is the k8s.io/kubernetes version pinned in go.mod) and
# writes:
#   OUT_DIR/bin/kubernetes                      static, stripped, CGO_ENABLED=0
#   OUT_DIR/bin/{kube-apiserver,kube-controller-manager,kube-scheduler,
#               kubelet,kube-proxy,kubectl} -> kubernetes   (relative symlinks)
#   OUT_DIR/VERSION                             e.g. v1.30.14
# No caching here: the orchestrator caches OUT_DIR by a hash of this directory.
# Go's own build and module caches are used as usual, so a re-run is quick.
set -euo pipefail
step=k8s
here=$(cd "$(dirname "$0")" && pwd)
out=${1:?usage: images/k8s/build.sh OUT_DIR}
out=$(cd "$out" && pwd)
. "$here/../lib/step.sh"
log=$(mktemp "${TMPDIR:-/tmp}/kindling-$step.XXXXXX.log")
trap 'rm -f "$log"' EXIT
use_go
cd "$here"
version=$(go list -m -f '{{.Version}}' k8s.io/kubernetes) || { go list -m k8s.io/kubernetes >"$log" 2>&1; fail "read pinned version"; }
reldate=$(go list -m -f '{{with .Time}}{{.UTC.Format "2006-01-02T15:04:05Z"}}{{end}}' k8s.io/kubernetes 2>/dev/null || true)
major=${version#v}; major=${major%%.*}
minor=${version#v*.}; minor=${minor%%.*}
# The same -X variables as upstream's hack/lib/version.sh. There is no git
# checkout, so the commit is empty (instead of the "$Format:%H$" placeholder),
# the tree state is "archive" (upstream's value for source tarballs) and the
# build date is the release's own date, so the build is reproducible.
ldflags="-s -w"
for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
  ldflags+=" -X $pkg.gitVersion=$version -X $pkg.gitMajor=$major -X $pkg.gitMinor=$minor"
  ldflags+=" -X $pkg.gitTreeState=archive -X $pkg.gitCommit="
  if [ -n "$reldate" ]; then ldflags+=" -X $pkg.buildDate=$reldate"; fi
done
# providerless: leave out the in-tree cloud providers and their SDKs (kindling
# runs no cloud provider; upstream disables them by default since 1.29).
tags=providerless

progress "downloading modules for Kubernetes $version (Go module cache)"
go mod download >"$log" 2>&1 || fail "go mod download"
progress "compiling kubernetes $version with $gov (about 8-12 minutes on 2 cores when Go's build cache is cold, seconds when warm)"
go build -trimpath -tags "$tags" -ldflags "$ldflags" -o "$out/bin/kubernetes" . >"$log" 2>&1 || fail "go build"

for c in kube-apiserver kube-controller-manager kube-scheduler kubelet kube-proxy kubectl; do
  ln -sfn kubernetes "$out/bin/$c"
done
echo "$version" >"$out/VERSION"

# --- smoke test: every component must answer with the pinned version ---------
progress "checking each component reports $version"
for c in kube-apiserver kube-controller-manager kube-scheduler kubelet kube-proxy; do
  "$out/bin/$c" --version >"$log" 2>&1 || fail "$c --version"
  grep -qx "Kubernetes $version" "$log" || fail "$c --version (expected 'Kubernetes $version')"
done
"$out/bin/kubectl" version --client >"$log" 2>&1 || fail "kubectl version --client"
grep -qx "Client Version: $version" "$log" || fail "kubectl version --client (expected 'Client Version: $version')"

progress "done: $out/bin/kubernetes $version ($(du -h "$out/bin/kubernetes" | cut -f1))"
