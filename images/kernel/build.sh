#!/usr/bin/env bash
# images/kernel/build.sh OUT_DIR
# Builds kindling's guest kernel from Debian's linux-source-6.1: x86_64 defconfig +
# kvm_guest.config + our fragment images/kernel/kindling.config, bzImage only.
#   OUT_DIR/bzImage   the kernel kindling boots
#   OUT_DIR/vmlinux   the same kernel as an ELF image
#   OUT_DIR/config    its .config
#   OUT_DIR/VERSION   the source package version
# No caching here: `kindling images build` caches OUT_DIR by a hash of this folder,
# the source package version and the compiler version.
set -euo pipefail
out=${1:?usage: images/kernel/build.sh OUT_DIR}
here=$(cd "$(dirname "$0")" && pwd)
src_tar=/usr/src/linux-source-6.1.tar.xz
[ -f "$src_tar" ] || { echo "kernel: $src_tar missing; install it with: apt-get install linux-source-6.1" >&2; exit 1; }
for tool in make gcc bc flex bison; do
  command -v "$tool" >/dev/null || { echo "kernel: '$tool' missing; run scripts/setup first" >&2; exit 1; }
done
work=$(mktemp -d "${TMPDIR:-/tmp}/kindling-kernel.XXXXXX")
trap 'rm -rf "$work"' EXIT
log="$work/build.log"
t0=$(date +%s)
phase() { echo "kernel: $1 (+$(( $(date +%s) - t0 ))s)" >&2; }
fail() { echo "kernel: step '$1' failed; last lines of its log:" >&2; tail -n 30 "$log" >&2; exit 1; }
phase "unpacking $src_tar"
tar -C "$work" -xf "$src_tar" || fail unpack
cd "$work"/linux-source-6.1
phase "configuring (defconfig + kvm_guest.config + kindling.config)"
{ make defconfig && make kvm_guest.config &&
  scripts/kconfig/merge_config.sh -m .config "$here/kindling.config" &&
  make olddefconfig; } >>"$log" 2>&1 || fail configure
# merge_config warns about every option that did not stick; fail on the ones we rely on.
for opt in VIRTIO_MMIO_CMDLINE_DEVICES VIRTIO_BLK VIRTIO_NET VIRTIO_VSOCKETS EXT4_FS OVERLAY_FS BRIDGE VETH VXLAN PVH VMGENID FUSE_FS VIRTIO_FS PSI; do
  grep -q "^CONFIG_$opt=y" .config || { echo "kernel: CONFIG_$opt did not end up built in" >&2; exit 1; }
done
for opt in VSOCKETS_LOOPBACK; do
  ! grep -q "^CONFIG_$opt=[ym]" .config || { echo "kernel: CONFIG_$opt is set but must be off (kindling.config)" >&2; exit 1; }
done
jobs=$(( $(nproc) + 1 ))
phase "compiling bzImage with -j$jobs (about 7-14 minutes on 2 cores)"
make -j"$jobs" bzImage >>"$log" 2>&1 || fail compile
cp arch/x86/boot/bzImage vmlinux "$out"/
cp .config "$out/config"
dpkg-query -W -f='${Version}\n' linux-source-6.1 > "$out/VERSION" 2>/dev/null || echo unknown > "$out/VERSION"
phase "done: bzImage $(du -h "$out/bzImage" | cut -f1)"
