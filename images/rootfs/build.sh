#!/usr/bin/env bash
# images/rootfs/build.sh OUT_DIR K8S_DIR ETCD_DIR OCI_DIR AGENT_BINARY
#
# Builds kindling's guest root filesystem, OUT_DIR/rootfs.ext4 (label
# kindling-root, sparse), without mounting anything:
#   1. mmdebstrap --variant=minbase a Debian bookworm tree with containerd,
#      runc, the CNI plugins, iptables (legacy backend), conntrack, ethtool,
#      iproute2, ca-certificates, netbase; no docs (copyright files kept), man
#      pages, locales, apt lists or caches;
#   2. installs K8S_DIR/bin/* and ETCD_DIR/bin/* in /usr/local/bin, AGENT_BINARY as
#      /sbin/kindling-agent with /sbin/init -> kindling-agent,
#      /etc/kindling/versions.env, and /etc/containerd/config.toml (Debian's
#      plus sandbox_image = the oci step's PAUSE_IMAGE);
#   3. imports OCI_DIR's image archives into the tree's containerd store
#      (/var/lib/containerd, namespace k8s.io), unpacked for the overlayfs
#      snapshotter, with the tree's own containerd: the node finds every preloaded
#      image ready, with nothing to import or unpack at boot or when an add-on is
#      enabled. The archives stay out of the image; their index (images.env,
#      images.txt) goes to /var/lib/kindling/images/;
#   4. mkfs.ext4 -d the tree into an image of (content + 2 GiB) for container
#      layers, etcd data and logs.
# Also writes OUT_DIR/versions.env (same as /etc/kindling/versions.env) and
# OUT_DIR/packages.txt (the Debian packages in the image, with versions).
#
# Debian packages come from the host's apt sources for bookworm
# (/etc/apt/sources.list.d/debian.sources or /etc/apt/sources.list), or from
# $KINDLING_DEBIAN_SOURCES (a one-line or deb822 sources file) if set.
# Needs root (mmdebstrap's root mode; file ownership in the image).
# No caching here: the orchestrator caches OUT_DIR by a hash of this directory
# and the inputs.
set -euo pipefail
step=rootfs
usage="usage: images/rootfs/build.sh OUT_DIR K8S_DIR ETCD_DIR OCI_DIR AGENT_BINARY"
[ $# -eq 5 ] || { echo "$usage" >&2; exit 2; }
out=$(cd "$1" && pwd)
k8s_dir=$(cd "$2" && pwd)
etcd_dir=$(cd "$3" && pwd)
oci_dir=$(cd "$4" && pwd)
agent=$(realpath "$5")
here=${here:-$(cd "$(dirname "$0")" && pwd)}
. "$here/../lib/step.sh"
# The tree is staged next to OUT_DIR (same filesystem as the cache) rather than
# in /tmp, which may be a small tmpfs.
work=$(mktemp -d "$out/.work.XXXXXX")
cleanup() {
  # Should mmdebstrap die hard, its chroot mounts (proc, sys, dev...) may still
  # be there: unmount them, and never let rm cross into another filesystem.
  awk -v w="$work/" 'index($2, w) == 1 {print $2}' /proc/mounts | sort -r | xargs -r -n1 umount -l 2>/dev/null || true
  rm -rf --one-file-system "$work"
}
trap cleanup EXIT
log=$work/log

suite=bookworm
headroom_mib=2048
packages=(
  containerd runc                # container runtime (CRI v1, cgroup v2)
  containernetworking-plugins    # bridge, host-local, loopback, portmap ... in /usr/lib/cni
  iptables                       # kube-proxy, portmap, kubelet; legacy backend, see below
  conntrack                      # kube-proxy flushes stale UDP conntrack entries with it
  ethtool iproute2               # CNI bridge/veth set-up, debugging
  ca-certificates                # TLS to anything outside the cluster
  netbase                        # /etc/protocols, /etc/services
  e2fsprogs                      # resize2fs: the agent grows / online into a grown disk
)

# --- tools and inputs ---------------------------------------------------------
[ "$(id -u)" = 0 ] || { echo "$step: must run as root (mmdebstrap root mode, file ownership)" >&2; exit 1; }
need() { command -v "$1" >/dev/null || { echo "$step: '$1' not found; install it with: apt-get install $2" >&2; exit 1; }; }
need mmdebstrap mmdebstrap
need mkfs.ext4 e2fsprogs
need debugfs e2fsprogs
need e2fsck e2fsprogs
need truncate coreutils
mke2fs_ver=$(mkfs.ext4 -V 2>&1 | awk 'NR==1{print $2}')
case "$mke2fs_ver" in 1.4[3-9]*|1.[5-9]*) ;; *) echo "$step: mke2fs $mke2fs_ver has no usable -d; need e2fsprogs >= 1.43" >&2; exit 1 ;; esac
for f in "$k8s_dir/bin/kubernetes" "$k8s_dir/bin/kubelet" "$etcd_dir/bin/etcd" "$oci_dir/images.env"; do
  [ -e "$f" ] || { echo "$step: $f missing ($usage)" >&2; exit 1; }
done
ls "$oci_dir"/*.oci.tar >/dev/null 2>&1 || { echo "$step: no *.oci.tar in $oci_dir" >&2; exit 1; }
[ -f "$agent" ] && [ -x "$agent" ] || { echo "$step: agent binary $5 is not an executable file" >&2; exit 1; }

# The sandbox image the oci step tagged must be the one this kubelet expects.
# shellcheck disable=SC1091
. "$oci_dir/images.env"
kubelet_pause=$("$k8s_dir/bin/kubelet" --help 2>&1 | sed -n 's/.*--pod-infra-container-image.*(default "\([^"]*\)").*/\1/p' | head -1)
[ "$kubelet_pause" = "$PAUSE_IMAGE" ] || {
  echo "kubelet default sandbox image: '$kubelet_pause'; oci step's PAUSE_IMAGE: '$PAUSE_IMAGE'" >"$log"
  fail "check pause image tag matches the kubelet (change pause_version in images/oci/build.sh)"
}
k8s_version=$(cat "$k8s_dir/VERSION")
etcd_version=$(cat "$etcd_dir/VERSION")

# --- apt sources ---------------------------------------------------------------
if [ -n "${KINDLING_DEBIAN_SOURCES:-}" ]; then
  sources=$KINDLING_DEBIAN_SOURCES
elif [ -f /etc/apt/sources.list.d/debian.sources ] && grep -q "^Suites:.*\b$suite\b" /etc/apt/sources.list.d/debian.sources; then
  sources=/etc/apt/sources.list.d/debian.sources
elif [ -f /etc/apt/sources.list ] && grep -q "^deb .* $suite " /etc/apt/sources.list; then
  sources=$work/sources.list
  grep -E "^deb .* $suite(-updates|-security)? " /etc/apt/sources.list >"$sources"
else
  echo "$step: no apt source for Debian $suite on this host; set KINDLING_DEBIAN_SOURCES to a sources.list file" >&2
  exit 1
fi

# --- 1. Debian tree -------------------------------------------------------------
root=$work/root
progress "mmdebstrap $suite minbase + ${#packages[@]} packages from $sources (about 1-2 minutes)"
include=$(printf '%s\n' "${packages[@]}" | sed 's/#.*//' | xargs | tr ' ' ',')
# hooks/merged-usr: merged /usr the way debootstrap does it (symlinks and the
# usr-is-merged package) instead of apt picking the usrmerge package, which
# pulls in perl (about 25 MiB). The two legacy containerd shims are left out:
# the CRI plugin only uses io.containerd.runc.v2.
mmdebstrap --mode=root --variant=minbase --include="$include" --format=directory \
  --hook-dir=/usr/share/mmdebstrap/hooks/merged-usr \
  --dpkgopt='path-exclude=/usr/bin/containerd-shim' --dpkgopt='path-exclude=/usr/bin/containerd-shim-runc-v1' \
  --aptopt='Acquire::Languages "none"' \
  --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-include=/usr/share/doc/*/copyright' \
  --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/info/*' \
  --dpkgopt='path-exclude=/usr/share/locale/*' --dpkgopt='path-include=/usr/share/locale/locale.alias' \
  --dpkgopt='path-exclude=/usr/share/lintian/*' --dpkgopt='path-exclude=/usr/share/linda/*' \
  --customize-hook='chroot "$1" update-alternatives --set iptables /usr/sbin/iptables-legacy' \
  --customize-hook='chroot "$1" update-alternatives --set ip6tables /usr/sbin/ip6tables-legacy' \
  --customize-hook='chroot "$1" dpkg-query -W -f "\${Package} \${Version}\n" >"$1/.kindling-packages"' \
  "$suite" "$root" "$sources" >"$log" 2>&1 || fail "mmdebstrap"
mv "$root/.kindling-packages" "$out/packages.txt"

progress "trimming the tree"
rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/* "$root"/var/cache/debconf/*-old \
  "$root"/var/lib/dpkg/*-old "$root"/var/log/* "$root"/usr/share/bash-completion \
  "$root"/etc/machine-id "$root"/var/lib/dbus/machine-id
mkdir -p "$root/var/log"
# mmdebstrap leaves the build host's name and resolver here.
echo kindling >"$root/etc/hostname"
echo "# written by kindling-agent at boot" >"$root/etc/resolv.conf"

# --- 2. kindling files ----------------------------------------------------------
progress "installing Kubernetes $k8s_version, etcd $etcd_version, images, agent"
install -d -m 0755 "$root/usr/local/bin" "$root/var/lib/kindling/images" "$root/etc/kindling" \
  "$root/etc/cni/net.d" "$root/opt/cni" "$root/var/lib/etcd" "$root/etc/kubernetes/manifests"
chmod 0700 "$root/var/lib/etcd"
cp -a "$k8s_dir"/bin/. "$etcd_dir"/bin/. "$root/usr/local/bin/"
cp "$oci_dir/images.env" "$oci_dir/images.txt" "$root/var/lib/kindling/images/"
# containerd's CRI plugin looks for CNI plugins in /opt/cni/bin by default;
# Debian installs them in /usr/lib/cni.
ln -sfn /usr/lib/cni "$root/opt/cni/bin"
# With merged /usr, /sbin is a symlink to usr/sbin; install under usr/sbin
# so nothing follows a symlink out of the tree.
sbin=$root/sbin; [ -L "$sbin" ] && sbin=$root/usr/sbin
[ ! -e "$sbin/init" ] || { ls -l "$sbin/init" >"$log"; fail "/sbin/init already exists in the Debian tree"; }
install -m 0755 "$agent" "$sbin/kindling-agent"
ln -s kindling-agent "$sbin/init"
# Debian's containerd defaults (CNI plugins in /usr/lib/cni) plus the sandbox
# image. runc's default cgroup driver here is cgroupfs, which the kubelet must
# use too (cgroupDriver: cgroupfs; there is no systemd in the guest). The agent
# may replace this file.
grep -q 'bin_dir = "/usr/lib/cni"' "$root/etc/containerd/config.toml" 2>/dev/null || {
  cat "$root/etc/containerd/config.toml" >"$log" 2>&1 || true
  fail "Debian's /etc/containerd/config.toml is not what this script expects: review the rewrite below"
}
cat >"$root/etc/containerd/config.toml" <<EOF
version = 2
# Debian's defaults plus kindling's sandbox image (images/rootfs/build.sh).

[plugins]
  [plugins."io.containerd.grpc.v1.cri"]
    sandbox_image = "$PAUSE_IMAGE"
    [plugins."io.containerd.grpc.v1.cri".cni]
      bin_dir = "/usr/lib/cni"
      conf_dir = "/etc/cni/net.d"
  [plugins."io.containerd.internal.v1.opt"]
    path = "/var/lib/containerd/opt"
EOF
{
  echo "KUBERNETES_VERSION=$k8s_version"
  echo "ETCD_VERSION=$etcd_version"
  cat "$oci_dir/images.env"
  echo "CONTAINERD_VERSION=$(awk '$1=="containerd"{print $2}' "$out/packages.txt")"
  echo "RUNC_VERSION=$(awk '$1=="runc"{print $2}' "$out/packages.txt")"
  echo "CNI_BIN_DIR=/usr/lib/cni"
  echo "IPTABLES_BACKEND=legacy"
} >"$root/etc/kindling/versions.env"
cp "$root/etc/kindling/versions.env" "$out/versions.env"

# --- 3. the preloaded images, unpacked in containerd's store --------------------
# The tree's own containerd and ctr (the version the node runs, so the store is in
# its format) on a private socket, with only what an import needs: no CRI plugin,
# no other snapshotter. Its root is the tree's /var/lib/containerd, the node's;
# socket and state are in a short private directory (a UNIX socket path has at
# most 107 bytes).
containerd_version=$(awk '$1=="containerd"{print $2}' "$out/packages.txt")
ctr_run=$(mktemp -d /tmp/kindling-ctr.XXXXXX)
ctr_pid=
store=$root/var/lib/containerd
stop_containerd() {
  if [ -n "$ctr_pid" ]; then kill "$ctr_pid" 2>/dev/null || true; wait "$ctr_pid" 2>/dev/null || true; fi
  ctr_pid=
  # Only mounts the import made (under the store or the private directory).
  awk -v a="$store/" -v b="$ctr_run/" 'index($2, a) == 1 || index($2, b) == 1 {print $2}' /proc/mounts |
    sort -r | xargs -r -n1 umount -l 2>/dev/null || true
}
trap 'stop_containerd; rm -rf --one-file-system "$ctr_run"; cleanup' EXIT
cat >"$ctr_run/config.toml" <<EOF
version = 2
root = "$store"
state = "$ctr_run/state"
disabled_plugins = ["io.containerd.grpc.v1.cri", "io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.native"]
[grpc]
  address = "$ctr_run/containerd.sock"
EOF
progress "importing the preloaded images into containerd $containerd_version's store, unpacked (about 1 minute)"
"$root/usr/bin/containerd" --config "$ctr_run/config.toml" >"$ctr_run/containerd.log" 2>&1 &
ctr_pid=$!
for _ in $(seq 100); do [ -S "$ctr_run/containerd.sock" ] && break; sleep 0.1; done
[ -S "$ctr_run/containerd.sock" ] || { cp "$ctr_run/containerd.log" "$log"; fail "start the tree's containerd"; }
in_store() { "$root/usr/bin/ctr" --address "$ctr_run/containerd.sock" -n k8s.io "$@"; }
for a in "$oci_dir"/*.oci.tar; do
  in_store images import --snapshotter overlayfs "$a" >"$log" 2>&1 || fail "ctr images import $(basename "$a")"
done
in_store images ls -q >"$ctr_run/names" 2>"$log" || fail "ctr images ls"
while read -r archive name; do
  grep -qxF "$name" "$ctr_run/names" || { echo "$name (from $archive) is not in the store" >"$log"; fail "check the imported images"; }
done <"$oci_dir/images.txt"
# Every image complete and unpacked (ctr's STATUS and UNPACKED columns).
in_store images check --snapshotter overlayfs >"$ctr_run/check" 2>"$log" || fail "ctr images check"
if awk 'NR > 1 && !($0 ~ / complete / && $NF == "true") {bad = 1} END {exit !bad}' "$ctr_run/check"; then
  cp "$ctr_run/check" "$log"; fail "check the imported images are complete and unpacked"
fi
stop_containerd
rm -rf "$store/tmpmounts"

# --- 4. ext4 image --------------------------------------------------------------
content_mib=$(du -s --block-size=1M "$root" | cut -f1)
inodes=$(find "$root" -xdev | wc -l)
size_mib=$(( content_mib + content_mib / 10 + headroom_mib ))
progress "mkfs.ext4 -d: ${content_mib} MiB in $inodes files -> ${size_mib} MiB image"
img=$work/rootfs.ext4
truncate -s "${size_mib}M" "$img"
# -m 0: no blocks reserved for root (everything in the guest runs as root).
mkfs.ext4 -q -F -L kindling-root -m 0 -E root_owner=0:0 -d "$root" "$img" >"$log" 2>&1 || fail "mkfs.ext4 -d"
e2fsck -fn "$img" >"$log" 2>&1 || fail "e2fsck -fn (image check)"
debugfs -R 'stat /sbin/init' "$img" >"$log" 2>&1 || fail "debugfs stat /sbin/init"
mv "$img" "$out/rootfs.ext4"

progress "done: $out/rootfs.ext4 (${size_mib} MiB apparent, $(du -h "$out/rootfs.ext4" | cut -f1) on disk)"
