#!/usr/bin/env bash
# Build kindling's guest kernel from Debian's linux-source-6.1 with our config fragment.
# Output: $KINDLING_CACHE/kernel/<input-hash>/{bzImage,vmlinux,config}; prints the bzImage path.
# The hash covers the source package version, the compiler, this script and the fragment,
# so an unchanged input is never rebuilt, and a failed build leaves nothing in the cache.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
cache=${KINDLING_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/kindling}
src_tar=/usr/src/linux-source-6.1.tar.xz
[ -f "$src_tar" ] || { echo "kernel: $src_tar missing; install it with: apt-get install linux-source-6.1" >&2; exit 1; }
for tool in make gcc bc flex bison; do
  command -v "$tool" >/dev/null || { echo "kernel: '$tool' missing; run scripts/setup first" >&2; exit 1; }
done
srcver=$(dpkg-query -W -f='${Version}' linux-source-6.1 2>/dev/null || stat -c %s "$src_tar")
key=$( { echo "$srcver"; gcc --version | head -1; cat "$0" "$here/kindling.config"; } | sha256sum | cut -c1-16)
out="$cache/kernel/$key"
if [ -f "$out/bzImage" ]; then echo "$out/bzImage"; exit 0; fi

work=$(mktemp -d "${TMPDIR:-/tmp}/kindling-kernel.XXXXXX")
trap 'rm -rf "$work"' EXIT
log="$work/build.log"
t0=$(date +%s)
phase() { echo "kernel: $1 (+$(( $(date +%s) - t0 ))s)" >&2; }
fail() { echo "kernel: step '$1' failed; last lines of $log:" >&2; tail -n 30 "$log" >&2; exit 1; }
phase "unpacking $src_tar"
tar -C "$work" -xf "$src_tar" || fail unpack
cd "$work"/linux-source-6.1
phase "configuring (defconfig + kvm_guest.config + images/kernel/kindling.config)"
{ make defconfig && make kvm_guest.config &&
  scripts/kconfig/merge_config.sh -m .config "$here/kindling.config" &&
  make olddefconfig; } >>"$log" 2>&1 || fail configure
# merge_config warns about every option that did not stick; fail on the ones we rely on.
for opt in VIRTIO_MMIO_CMDLINE_DEVICES VIRTIO_BLK VIRTIO_NET VIRTIO_VSOCKETS EXT4_FS OVERLAY_FS BRIDGE VETH PVH; do
  grep -q "^CONFIG_$opt=y" .config || { echo "kernel: CONFIG_$opt did not end up built in" >&2; exit 1; }
done
jobs=$(( $(nproc) + 1 ))
phase "compiling bzImage with -j$jobs (about 7-10 minutes on 2 cores)"
make -j"$jobs" bzImage >>"$log" 2>&1 || fail compile
mkdir -p "$out.tmp"
cp arch/x86/boot/bzImage vmlinux .config "$out.tmp"/
mv "$out.tmp/.config" "$out.tmp/config"
rm -rf "$out"; mv "$out.tmp" "$out"
phase "done: $out/bzImage ($(du -h "$out/bzImage" | cut -f1))"
echo "$out/bzImage"
