#!/usr/bin/env python3
"""Write a single-layer OCI image-layout tarball, deterministically.

The archive is what `ctr -n k8s.io images import ARCHIVE` (containerd >= 1.6)
and `skopeo copy oci-archive:ARCHIVE ...` accept:

    oci-layout                  {"imageLayoutVersion":"1.0.0"}
    index.json                  one manifest descriptor per --name, each with
                                  io.containerd.image.name = the full reference
                                  org.opencontainers.image.ref.name = its tag
    blobs/sha256/<manifest>     application/vnd.oci.image.manifest.v1+json
    blobs/sha256/<config>       application/vnd.oci.image.config.v1+json
    blobs/sha256/<layer>        application/vnd.oci.image.layer.v1.tar+gzip

Determinism: every tar entry (layer and archive) is sorted by path, owned by
0:0 with empty user/group names, and stamped with one fixed mtime (--mtime,
else $SOURCE_DATE_EPOCH, else 0); gzip carries no name and mtime 0; JSON is
written with sorted keys and no whitespace. The same inputs give the same bytes.

Only the Python 3 standard library is used.
"""
import argparse
import gzip
import hashlib
import io
import json
import os
import stat
import struct
import sys
import tarfile
import time

MT_INDEX = "application/vnd.oci.image.index.v1+json"
MT_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MT_CONFIG = "application/vnd.oci.image.config.v1+json"
MT_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"

# Linux capability numbers (include/uapi/linux/capability.h) for --cap.
CAPS = {"chown": 0, "dac_override": 1, "fowner": 3, "kill": 5, "setgid": 6,
        "setuid": 7, "net_bind_service": 10, "net_admin": 12, "net_raw": 13,
        "sys_chroot": 18, "sys_admin": 21}


def die(msg):
    print(f"mkoci: {msg}", file=sys.stderr)
    sys.exit(1)


def split_ref(ref):
    """'registry.k8s.io/pause:3.9' -> tag '3.9' (the part after the last ':' of
    the last path element); a reference without a tag gets 'latest'."""
    if "@" in ref:
        die(f"{ref}: digest references cannot name an image")
    last = ref.rsplit("/", 1)[-1]
    if ":" in last:
        return last.rsplit(":", 1)[1]
    return "latest"


def vfs_cap_data(names):
    """security.capability xattr value for `setcap CAPS=+ep` (VFS_CAP_REVISION_2)."""
    lo = hi = 0
    for n in names:
        n = n.lower().removeprefix("cap_")
        if n not in CAPS:
            die(f"unknown capability {n!r} (known: {', '.join(sorted(CAPS))})")
        bit = CAPS[n]
        if bit < 32:
            lo |= 1 << bit
        else:
            hi |= 1 << (bit - 32)
    magic = 0x02000000 | 0x000001  # VFS_CAP_REVISION_2 | VFS_CAP_FLAGS_EFFECTIVE
    return struct.pack("<IIIII", magic, lo, 0, hi, 0)


class Layer:
    """The file tree of the image's single layer, keyed by path without a leading '/'."""

    def __init__(self):
        self.entries = {}  # path -> (kind, data, mode, extra)

    def _parents(self, path):
        parts = path.split("/")[:-1]
        for i in range(1, len(parts) + 1):
            p = "/".join(parts[:i])
            self.entries.setdefault(p, ("dir", None, 0o755, None))

    @staticmethod
    def norm(path):
        p = os.path.normpath("/" + path).lstrip("/")
        if not p or p == ".":
            die(f"bad path in image: {path!r}")
        return p

    def add_dir(self, path, mode=0o755):
        path = self.norm(path)
        self._parents(path)
        self.entries[path] = ("dir", None, mode, None)

    def add_file(self, src, path, mode=None):
        path = self.norm(path)
        try:
            with open(src, "rb") as f:
                data = f.read()
            st = os.stat(src)
        except OSError as e:
            die(f"reading {src}: {e}")
        if mode is None:
            mode = 0o755 if st.st_mode & 0o111 else 0o644
        self._parents(path)
        self.entries[path] = ("file", data, mode, {})

    def add_symlink(self, path, target):
        path = self.norm(path)
        self._parents(path)
        self.entries[path] = ("symlink", target, 0o777, None)

    def set_caps(self, path, caps):
        path = self.norm(path)
        e = self.entries.get(path)
        if not e or e[0] != "file":
            die(f"--cap {path}: no regular file at that path (add it first)")
        # tarfile writes PAX values as UTF-8; every byte of a vfs_cap_data for
        # capabilities below 32 is < 0x80, and surrogateescape covers the rest.
        e[3]["SCHILY.xattr.security.capability"] = vfs_cap_data(caps).decode("utf-8", "surrogateescape")

    def tar(self, mtime):
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
            for path in sorted(self.entries):
                kind, data, mode, extra = self.entries[path]
                ti = tarfile.TarInfo(path)
                ti.mtime, ti.uid, ti.gid, ti.uname, ti.gname = mtime, 0, 0, "", ""
                ti.mode = mode
                if kind == "dir":
                    ti.type = tarfile.DIRTYPE
                    tf.addfile(ti)
                elif kind == "symlink":
                    ti.type, ti.linkname = tarfile.SYMTYPE, data
                    tf.addfile(ti)
                else:
                    ti.type, ti.size = tarfile.REGTYPE, len(data)
                    if extra:
                        ti.pax_headers = dict(extra)
                    tf.addfile(ti, io.BytesIO(data))
        return buf.getvalue()


def canonical_json(obj):
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def sha256(data):
    return "sha256:" + hashlib.sha256(data).hexdigest()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out", help="archive to write (e.g. pause.oci.tar)")
    ap.add_argument("--name", action="append", required=True,
                    help="full image reference, e.g. registry.k8s.io/pause:3.9 (repeatable: one index entry each)")
    ap.add_argument("--file", action="append", default=[], metavar="SRC:DST[:MODE]",
                    help="regular file SRC from the host at DST in the image, octal MODE (default 0755 if SRC is executable, else 0644)")
    ap.add_argument("--symlink", action="append", default=[], metavar="DST:TARGET")
    ap.add_argument("--dir", action="append", default=[], metavar="DST[:MODE]")
    ap.add_argument("--cap", action="append", default=[], metavar="DST:CAP[,CAP...]",
                    help="file capabilities as `setcap CAP=+ep DST` would set them")
    ap.add_argument("--entrypoint", help="JSON array")
    ap.add_argument("--cmd", help="JSON array")
    ap.add_argument("--user")
    ap.add_argument("--workdir")
    ap.add_argument("--env", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--expose", action="append", default=[], metavar="PORT/PROTO")
    ap.add_argument("--label", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--arch", default="amd64")
    ap.add_argument("--mtime", type=int, default=int(os.environ.get("SOURCE_DATE_EPOCH", "0")),
                    help="timestamp for every entry and the image's created time (default $SOURCE_DATE_EPOCH or 0)")
    a = ap.parse_args()

    layer = Layer()
    for spec in a.dir:
        path, _, mode = spec.partition(":")
        layer.add_dir(path, int(mode, 8) if mode else 0o755)
    for spec in a.file:
        parts = spec.split(":")
        if len(parts) not in (2, 3):
            die(f"--file {spec}: want SRC:DST[:MODE]")
        layer.add_file(parts[0], parts[1], int(parts[2], 8) if len(parts) == 3 else None)
    for spec in a.symlink:
        path, sep, target = spec.partition(":")
        if not sep or not target:
            die(f"--symlink {spec}: want DST:TARGET")
        layer.add_symlink(path, target)
    for spec in a.cap:
        path, sep, caps = spec.partition(":")
        if not sep:
            die(f"--cap {spec}: want DST:CAP[,CAP...]")
        layer.set_caps(path, caps.split(","))

    layer_tar = layer.tar(a.mtime)
    gz = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=gz, mtime=0, compresslevel=9) as g:
        g.write(layer_tar)
    layer_gz = gz.getvalue()

    created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(a.mtime))
    cfg = {}
    if a.entrypoint:
        cfg["Entrypoint"] = json.loads(a.entrypoint)
    if a.cmd:
        cfg["Cmd"] = json.loads(a.cmd)
    if a.user:
        cfg["User"] = a.user
    if a.workdir:
        cfg["WorkingDir"] = a.workdir
    if a.env:
        cfg["Env"] = a.env
    if a.expose:
        cfg["ExposedPorts"] = {p: {} for p in a.expose}
    if a.label:
        cfg["Labels"] = dict(l.split("=", 1) for l in a.label)
    config = {
        "created": created,
        "architecture": a.arch,
        "os": "linux",
        "config": cfg,
        "rootfs": {"type": "layers", "diff_ids": [sha256(layer_tar)]},
        "history": [{"created": created, "created_by": "kindling images/oci/mkoci.py"}],
    }
    config_b = canonical_json(config)
    manifest = {
        "schemaVersion": 2,
        "mediaType": MT_MANIFEST,
        "config": {"mediaType": MT_CONFIG, "digest": sha256(config_b), "size": len(config_b)},
        "layers": [{"mediaType": MT_LAYER, "digest": sha256(layer_gz), "size": len(layer_gz)}],
    }
    manifest_b = canonical_json(manifest)
    index = {
        "schemaVersion": 2,
        "mediaType": MT_INDEX,
        "manifests": [{
            "mediaType": MT_MANIFEST,
            "digest": sha256(manifest_b),
            "size": len(manifest_b),
            "platform": {"architecture": a.arch, "os": "linux"},
            "annotations": {
                "io.containerd.image.name": name,
                "org.opencontainers.image.ref.name": split_ref(name),
            },
        } for name in a.name],
    }

    files = {
        "oci-layout": canonical_json({"imageLayoutVersion": "1.0.0"}),
        "index.json": canonical_json(index),
    }
    for blob in (layer_gz, config_b, manifest_b):
        files["blobs/sha256/" + sha256(blob).split(":", 1)[1]] = blob

    tmp = a.out + ".tmp"
    with open(tmp, "wb") as f, tarfile.open(fileobj=f, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for d in ("blobs", "blobs/sha256"):
            ti = tarfile.TarInfo(d)
            ti.type, ti.mode, ti.mtime, ti.uname, ti.gname = tarfile.DIRTYPE, 0o755, a.mtime, "", ""
            tf.addfile(ti)
        for path in sorted(files):
            ti = tarfile.TarInfo(path)
            ti.size, ti.mode, ti.mtime, ti.uname, ti.gname = len(files[path]), 0o644, a.mtime, "", ""
            tf.addfile(ti, io.BytesIO(files[path]))
    os.replace(tmp, a.out)
    print(f"mkoci: {a.out}: {', '.join(a.name)} manifest {sha256(manifest_b)}"
          f" layer {len(layer_gz)} bytes ({len(layer.entries)} entries)", file=sys.stderr)


if __name__ == "__main__":
    main()
