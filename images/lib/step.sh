# Shared by the image recipes (sourced; `step` must be set). Progress lines, and a
# failure that names the sub-step and shows the tail of its log ($log).
# `kindling images build` includes this file in the cache key of every step that uses it.
t0=$(date +%s)
progress() { echo "$step: $1 (+$(( $(date +%s) - t0 ))s)" >&2; }
fail() {
  echo "$step: sub-step '$1' failed; last lines of its log:" >&2
  tail -n 40 "$log" | awk '{print "    " $0}' >&2
  echo "$step: FAILED at sub-step '$1'" >&2
  exit 1
}

# A Go toolchain >= 1.22 (Debian bookworm's golang-go is 1.19, too old), building
# static, reproducible binaries from the module in the current directory.
use_go() {
  export PATH=$PATH:/usr/local/go/bin
  command -v go >/dev/null || {
    echo "$step: 'go' (>= 1.22) not found; Debian bookworm's golang-go (1.19) is too old: install Go >= 1.22 into /usr/local/go" >&2
    exit 1
  }
  gov=$(go env GOVERSION) # also used in the recipes' progress lines
  case "$gov" in
    go1.2[2-9]*|go1.[3-9][0-9]*) ;;
    *) echo "$step: $gov is too old, this module needs Go >= 1.22" >&2; exit 1 ;;
  esac
  # -buildvcs=false: do not stamp the kindling repo's commit into the binary (it would
  # change the binary on every commit, and fails where git is missing).
  export GOTOOLCHAIN=local GOFLAGS="-mod=readonly -buildvcs=false" CGO_ENABLED=0
}
