#!/usr/bin/env bash
# images/oci/verify-import.sh OCI_OUT_DIR
#
# Manual/CI check of the oci step's output on the build host (not run by the
# image build): starts a throwaway containerd (own root, state and socket in a
# temporary directory, CRI plugin off), imports every *.oci.tar with
# `ctr -n k8s.io images import`, checks each name in images.txt is there, runs
# the busybox image, checks pause exits 0 on SIGTERM and reaps orphans, checks
# /coredns carries cap_net_bind_service, then stops containerd and removes everything.
# Needs root and: apt-get install containerd runc libcap2-bin util-linux procps
set -euo pipefail
dir=$(cd "${1:?usage: images/oci/verify-import.sh OCI_OUT_DIR}" && pwd)
for t in containerd ctr runc getcap unshare nsenter pgrep; do
  command -v "$t" >/dev/null || { echo "verify: '$t' not found; apt-get install containerd runc libcap2-bin util-linux procps" >&2; exit 1; }
done
tmp=$(mktemp -d /tmp/kindling-ctrd.XXXXXX)
sock=$tmp/containerd.sock
cat >"$tmp/config.toml" <<EOF
version = 2
root = "$tmp/root"
state = "$tmp/state"
disabled_plugins = ["io.containerd.grpc.v1.cri"]
[grpc]
  address = "$sock"
[ttrpc]
  address = "$sock.ttrpc"
EOF
containerd --config "$tmp/config.toml" >"$tmp/containerd.log" 2>&1 &
cpid=$!
cleanup() {
  ctr -a "$sock" -n k8s.io task kill -s SIGKILL kindling-pause >/dev/null 2>&1 || true
  for m in "$tmp"/mnt-*; do ctr -a "$sock" -n k8s.io images unmount "$m" >/dev/null 2>&1 || true; done
  kill "$cpid" 2>/dev/null && wait "$cpid" 2>/dev/null || true
  # overlay snapshots may still be mounted if a test failed half-way
  grep -o "$tmp/[^ ]*" /proc/mounts | sort -r | xargs -r -n1 umount -l 2>/dev/null || true
  rm -rf "$tmp"
}
trap cleanup EXIT
for _ in $(seq 50); do [ -S "$sock" ] && break; sleep 0.1; done
[ -S "$sock" ] || { echo "verify: containerd did not start:" >&2; tail -20 "$tmp/containerd.log" >&2; exit 1; }
c() { ctr -a "$sock" -n k8s.io "$@"; }
echo "verify: containerd $(containerd --version | awk '{print $3}') on $sock" >&2

for a in "$dir"/*.oci.tar; do
  echo "verify: ctr -n k8s.io images import $(basename "$a")" >&2
  c images import "$a" >&2
done
c images ls >"$tmp/ls"
cat "$tmp/ls" >&2
while read -r file name; do
  grep -q "^$name " "$tmp/ls" || { echo "verify: $name (from $file) is missing after import" >&2; exit 1; }
done <"$dir/images.txt"
c images check >&2

. "$dir/images.env"
echo "verify: running $BUSYBOX_IMAGE" >&2
out=$(c run --rm "$BUSYBOX_IMAGE" kindling-bb sh -c 'echo hello from $(busybox | head -1 | cut -d" " -f1-2); ls /bin | wc -l')
echo "$out" >&2
echo "$out" | grep -q '^hello from BusyBox' || { echo "verify: busybox container did not run" >&2; exit 1; }

echo "verify: running $PAUSE_IMAGE, then SIGTERM must stop it with status 0" >&2
c run --rm "$PAUSE_IMAGE" kindling-pause &
rp=$!
for _ in $(seq 50); do c task ls 2>/dev/null | grep -q 'kindling-pause.*RUNNING' && break; sleep 0.1; done
c task ls | grep -q 'kindling-pause.*RUNNING' || { echo "verify: pause is not running" >&2; exit 1; }
c task kill -s SIGTERM kindling-pause
status=0; wait "$rp" || status=$?
[ "$status" = 0 ] || { echo "verify: pause exited with status $status on SIGTERM" >&2; exit 1; }
echo "verify: pause exited with status 0 on SIGTERM" >&2

# Reaping: run the image's /pause as PID 1 of a fresh PID namespace and orphan
# two processes into it; neither may be left a zombie. (Inside containerd this
# cannot be shown with ctr: a container's leftover processes are killed with it.)
echo "verify: /pause from $PAUSE_IMAGE reaps orphans as PID 1 of a PID namespace" >&2
mkdir -p "$tmp/mnt-pause"
c images mount "$PAUSE_IMAGE" "$tmp/mnt-pause" >/dev/null
cp "$tmp/mnt-pause/pause" "$tmp/pause"
c images unmount "$tmp/mnt-pause" >/dev/null
unshare --pid --fork --kill-child "$tmp/pause" &
upid=$!
up=""
for _ in $(seq 50); do up=$(pgrep -x -f "$tmp/pause" | head -1); [ -n "$up" ] && break; sleep 0.1; done
[ -n "$up" ] || { echo "verify: /pause did not start under unshare" >&2; exit 1; }
nsenter -t "$up" -p -- sh -c 'sleep 0.1 & sleep 0.2 & exit 0'
sleep 1
zombies=$(ps -o stat= --ppid "$up" | grep -c '^Z' || true)
kill -TERM "$up"; wait "$upid" || true
[ "$zombies" = 0 ] || { echo "verify: pause left $zombies zombie(s) unreaped" >&2; exit 1; }
echo "verify: no zombies left" >&2

echo "verify: file capability of /coredns in $COREDNS_IMAGE" >&2
mnt=$tmp/mnt-coredns; mkdir -p "$mnt"
c images mount "$COREDNS_IMAGE" "$mnt" >/dev/null
caps=$(getcap "$mnt/coredns")
c images unmount "$mnt" >/dev/null
echo "verify: $caps" >&2
echo "$caps" | grep -q 'cap_net_bind_service[=+]ep\|cap_net_bind_service=ep' || { echo "verify: /coredns lacks cap_net_bind_service+ep" >&2; exit 1; }
echo "verify: OK" >&2
