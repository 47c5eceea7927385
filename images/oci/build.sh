#!/usr/bin/env bash
# images/oci/build.sh OUT_DIR COREDNS_DIR LOCAL_PATH_PROVISIONER_DIR METRICS_SERVER_DIR TRAEFIK_DIR
#
# Builds the guest's preloaded container images as OCI image-layout tarballs
# (what `ctr -n k8s.io images import FILE` takes), with images/oci/mkoci.py:
#   OUT_DIR/pause.oci.tar     registry.k8s.io/pause:3.9 (+ :3.6, see below)
#                             static C program from pause.c
#   OUT_DIR/busybox.oci.tar   kindling.local/busybox:<major.minor> and :latest
#                             Debian's busybox-static + one symlink per applet
#   OUT_DIR/coredns.oci.tar   registry.k8s.io/coredns/coredns:v<version>
#                             COREDNS_DIR/bin/coredns (images/coredns step)
#   OUT_DIR/local-path-provisioner.oci.tar
#                             kindling.local/local-path-provisioner:<version>
#                             LOCAL_PATH_PROVISIONER_DIR/bin/local-path-provisioner
#                             (images/local-path-provisioner step; the storage add-on)
#   OUT_DIR/metrics-server.oci.tar
#                             kindling.local/metrics-server:<version>
#                             METRICS_SERVER_DIR/bin/metrics-server
#                             (images/metrics-server step; the metrics-server add-on)
#   OUT_DIR/traefik.oci.tar   kindling.local/traefik:<version>
#                             TRAEFIK_DIR/bin/traefik (images/traefik step; the ingress add-on)
#   OUT_DIR/images.env        PAUSE_IMAGE=... BUSYBOX_IMAGE=... COREDNS_IMAGE=...
#                             LOCAL_PATH_PROVISIONER_IMAGE=... METRICS_SERVER_IMAGE=...
#                             TRAEFIK_IMAGE=...
#   OUT_DIR/images.txt        "<archive> <image name>" per name
# The archives are byte-for-byte reproducible from the same inputs.
# No caching here: the orchestrator caches OUT_DIR by a hash of this directory
# and the inputs.
set -euo pipefail
step=oci
here=$(cd "$(dirname "$0")" && pwd)
usage="usage: images/oci/build.sh OUT_DIR COREDNS_DIR LOCAL_PATH_PROVISIONER_DIR METRICS_SERVER_DIR TRAEFIK_DIR"
out=${1:?$usage}
coredns_dir=${2:?$usage}
lpp_dir=${3:?$usage}
ms_dir=${4:?$usage}
traefik_dir=${5:?$usage}
out=$(cd "$out" && pwd)
here=${here:-$(cd "$(dirname "$0")" && pwd)}
. "$here/../lib/step.sh"
work=$(mktemp -d "${TMPDIR:-/tmp}/kindling-$step.XXXXXX")
trap 'rm -rf "$work"' EXIT
log=$work/log

# The sandbox ("pause") image of the pinned Kubernetes release: kubelet's
# default --pod-infra-container-image and kubeadm's PauseVersion for v1.30 are
# registry.k8s.io/pause:3.9. The agent must set containerd's CRI
# sandbox_image to PAUSE_IMAGE; the rootfs step checks the kubelet agrees.
# The archive also carries the tag containerd 1.6 uses when sandbox_image is
# not configured (registry.k8s.io/pause:3.6), so a missing setting can never
# make the guest try to pull from a registry it cannot reach.
pause_version=3.9
pause_image=registry.k8s.io/pause:$pause_version
pause_fallback=registry.k8s.io/pause:3.6
# All entries and the image "created" times: the epoch (reproducible builds).
export SOURCE_DATE_EPOCH=0

# --- tools -------------------------------------------------------------------
need() { command -v "$1" >/dev/null || { echo "$step: '$1' not found; install it with: apt-get install $2" >&2; exit 1; }; }
need python3 python3
need gcc gcc
[ -f "$(gcc -print-file-name=libc.a)" ] || { echo "$step: static libc.a not found; install it with: apt-get install libc6-dev" >&2; exit 1; }
[ "$(dpkg-query -W -f='${Status}' busybox-static 2>/dev/null)" = "install ok installed" ] && [ -x /bin/busybox ] ||
  { echo "$step: Debian's static busybox not found; install it with: apt-get install busybox-static" >&2; exit 1; }
[ -x "$coredns_dir/bin/coredns" ] && [ -f "$coredns_dir/VERSION" ] ||
  { echo "$step: $coredns_dir/bin/coredns or VERSION missing: pass the output directory of images/coredns/build.sh" >&2; exit 1; }
[ -x "$lpp_dir/bin/local-path-provisioner" ] && [ -f "$lpp_dir/VERSION" ] ||
  { echo "$step: $lpp_dir/bin/local-path-provisioner or VERSION missing: pass the output directory of images/local-path-provisioner/build.sh" >&2; exit 1; }
[ -x "$ms_dir/bin/metrics-server" ] && [ -f "$ms_dir/VERSION" ] ||
  { echo "$step: $ms_dir/bin/metrics-server or VERSION missing: pass the output directory of images/metrics-server/build.sh" >&2; exit 1; }
[ -x "$traefik_dir/bin/traefik" ] && [ -f "$traefik_dir/VERSION" ] ||
  { echo "$step: $traefik_dir/bin/traefik or VERSION missing: pass the output directory of images/traefik/build.sh" >&2; exit 1; }
mkoci() { python3 "$here/mkoci.py" "$@"; }

# --- pause ---------------------------------------------------------------------
progress "compiling pause.c (static)"
gcc -Os -static -s -Wall -Werror -DPAUSE_VERSION="\"$pause_version\"" -Wl,--build-id=none \
  -o "$work/pause" "$here/pause.c" >"$log" 2>&1 || fail "compile pause.c"
"$work/pause" -v >"$log" 2>&1 || fail "run pause -v"
progress "packing $pause_image"
mkoci "$out/pause.oci.tar" --name "$pause_image" --name "$pause_fallback" \
  --file "$work/pause:/pause:0755" --entrypoint '["/pause"]' --user 65535:65535 \
  --label "org.opencontainers.image.version=$pause_version" >"$log" 2>&1 || fail "pack pause image"

# --- busybox ---------------------------------------------------------------------
bb_deb=$(dpkg-query -W -f='${Version}' busybox-static)   # e.g. 1:1.35.0-4+deb12u1+b1
bb_ver=${bb_deb#*:}; bb_ver=${bb_ver%%-*}                # 1.35.0
bb_tag=$(echo "$bb_ver" | cut -d. -f1,2)                 # 1.35
busybox_image=kindling.local/busybox:$bb_tag
progress "packing $busybox_image (Debian busybox-static $bb_deb)"
mkdir -p "$work/bb"
printf '%s\n' 'root:x:0:0:root:/root:/bin/sh' 'nobody:x:65534:65534:nobody:/nonexistent:/bin/false' >"$work/bb/passwd"
printf '%s\n' 'root:x:0:' 'nogroup:x:65534:' >"$work/bb/group"
args=()
/bin/busybox --list >"$work/bb/applets" 2>"$log" || fail "busybox --list"
while read -r applet; do
  [ -n "$applet" ] && [ "$applet" != busybox ] && args+=(--symlink "/bin/$applet:busybox")
done <"$work/bb/applets"
[ ${#args[@]} -gt 100 ] || { echo "only ${#args[@]} applets listed" >"$log"; fail "busybox --list"; }
mkoci "$out/busybox.oci.tar" --name "$busybox_image" --name kindling.local/busybox:latest \
  --file /bin/busybox:/bin/busybox:0755 "${args[@]}" \
  --file "$work/bb/passwd:/etc/passwd:0644" --file "$work/bb/group:/etc/group:0644" \
  --dir /tmp:1777 --dir /root:0700 --dir /home --dir /var \
  --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin --cmd '["sh"]' \
  --label "org.opencontainers.image.version=$bb_deb" >"$log" 2>&1 || fail "pack busybox image"

# --- coredns ---------------------------------------------------------------------
cd_ver=$(cat "$coredns_dir/VERSION")
coredns_image=registry.k8s.io/coredns/coredns:v$cd_ver
progress "packing $coredns_image"
# Like upstream's image: runs as nonroot (65532) and binds :53 through the
# file capability cap_net_bind_service=+ep (kubeadm's Deployment adds
# NET_BIND_SERVICE and sets allowPrivilegeEscalation: false).
printf '%s\n' 'root:x:0:0:root:/root:/sbin/nologin' 'nonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin' >"$work/cd-passwd"
printf '%s\n' 'root:x:0:' 'nonroot:x:65532:' >"$work/cd-group"
mkoci "$out/coredns.oci.tar" --name "$coredns_image" \
  --file "$coredns_dir/bin/coredns:/coredns:0755" --cap /coredns:net_bind_service \
  --file "$work/cd-passwd:/etc/passwd:0644" --file "$work/cd-group:/etc/group:0644" \
  --dir /tmp:1777 \
  --user 65532:65532 --expose 53/tcp --expose 53/udp --entrypoint '["/coredns"]' \
  --label "org.opencontainers.image.version=v$cd_ver" >"$log" 2>&1 || fail "pack coredns image"

# --- local-path-provisioner (the storage-provisioner add-on) -----------------------
lpp_ver=$(cat "$lpp_dir/VERSION")
lpp_image=kindling.local/local-path-provisioner:$lpp_ver
progress "packing $lpp_image"
# Like upstream's image, minus its Alpine base: the binary as /usr/bin/... run as root
# (it only talks to the API server; the helper pods it starts, from the busybox image,
# create and remove the volume directories on the node). /tmp for klog's files.
mkoci "$out/local-path-provisioner.oci.tar" --name "$lpp_image" \
  --file "$lpp_dir/bin/local-path-provisioner:/usr/bin/local-path-provisioner:0755" \
  --dir /tmp:1777 --dir /etc/config \
  --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
  --cmd '["local-path-provisioner"]' \
  --label "org.opencontainers.image.version=$lpp_ver" >"$log" 2>&1 || fail "pack local-path-provisioner image"

# --- metrics-server (the metrics-server add-on) -------------------------------------
ms_ver=$(cat "$ms_dir/VERSION")
ms_image=kindling.local/metrics-server:$ms_ver
progress "packing $ms_image"
# Like upstream's image (distroless static, nonroot): the binary as /metrics-server, run
# as 65532 (the Deployment asks for a non-root user, a read-only root filesystem and an
# emptyDir on /tmp).
printf '%s\n' 'root:x:0:0:root:/root:/sbin/nologin' 'nonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin' >"$work/ms-passwd"
printf '%s\n' 'root:x:0:' 'nonroot:x:65532:' >"$work/ms-group"
mkoci "$out/metrics-server.oci.tar" --name "$ms_image" \
  --file "$ms_dir/bin/metrics-server:/metrics-server:0755" \
  --file "$work/ms-passwd:/etc/passwd:0644" --file "$work/ms-group:/etc/group:0644" \
  --dir /tmp:1777 --user 65532:65532 --expose 10250/tcp --entrypoint '["/metrics-server"]' \
  --label "org.opencontainers.image.version=$ms_ver" >"$log" 2>&1 || fail "pack metrics-server image"

# --- traefik (the ingress add-on) ----------------------------------------------------
tk_ver=$(cat "$traefik_dir/VERSION")
tk_image=kindling.local/traefik:$tk_ver
progress "packing $tk_image"
# Like upstream's image minus its Alpine base: the binary as /traefik, here run as 65532
# on unprivileged ports (8000, 8443; the Service maps 80 and 443 to them).
mkoci "$out/traefik.oci.tar" --name "$tk_image" \
  --file "$traefik_dir/bin/traefik:/traefik:0755" \
  --file "$work/ms-passwd:/etc/passwd:0644" --file "$work/ms-group:/etc/group:0644" \
  --dir /tmp:1777 --user 65532:65532 --expose 8000/tcp --expose 8443/tcp --entrypoint '["/traefik"]' \
  --label "org.opencontainers.image.version=$tk_ver" >"$log" 2>&1 || fail "pack traefik image"

# --- index for the rootfs and the agent ------------------------------------------
cat >"$out/images.env" <<EOF
PAUSE_IMAGE=$pause_image
BUSYBOX_IMAGE=$busybox_image
COREDNS_IMAGE=$coredns_image
LOCAL_PATH_PROVISIONER_IMAGE=$lpp_image
METRICS_SERVER_IMAGE=$ms_image
TRAEFIK_IMAGE=$tk_image
EOF
printf '%s\n' "pause.oci.tar $pause_image" "pause.oci.tar $pause_fallback" \
  "busybox.oci.tar $busybox_image" "busybox.oci.tar kindling.local/busybox:latest" \
  "coredns.oci.tar $coredns_image" "local-path-provisioner.oci.tar $lpp_image" \
  "metrics-server.oci.tar $ms_image" "traefik.oci.tar $tk_image" >"$out/images.txt"

progress "done: $(cd "$out" && du -h ./*.oci.tar | awk '{printf "%s %s  ", $2, $1}')"
