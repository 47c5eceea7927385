//! The seed disk the host hands the node (`kindling_proto::seed`): a read-only virtio
//! disk after the root disk holding a newc cpio archive with the cluster CA. At its
//! first boot the node takes the CA from it, so the host's copy of the cluster identity
//! is the one the node's certificates chain to. A node booted without a seed (by hand,
//! from the root disk alone) makes its own CA, as before.

use std::io::Read;
use std::path::Path;

use anyhow::{bail, Context, Result};
use kindling_proto::seed;

/// The files of a seed: (name, contents).
pub type Files = Vec<(String, Vec<u8>)>;

/// Reads the seed from `dev` when it is one: Ok(None) when there is no such device or
/// it holds no seed (another disk).
pub fn read(dev: &Path) -> Result<Option<Files>> {
    let Ok(f) = std::fs::File::open(dev) else { return Ok(None) };
    let mut raw = Vec::new();
    f.take(seed::MAX_SIZE).read_to_end(&mut raw).with_context(|| format!("reading {}", dev.display()))?;
    parse(&raw)
}

/// Parses a seed image; Ok(None) when it does not start with the seed marker.
pub fn parse(raw: &[u8]) -> Result<Option<Files>> {
    let mut rest = raw;
    let mut files = Vec::new();
    for i in 0..=seed::MAX_ENTRIES {
        let Ok(mut entry) = cpio::NewcReader::new(rest) else {
            if i == 0 {
                return Ok(None);
            }
            bail!("the seed disk's archive is cut or damaged after {i} entries");
        };
        if entry.entry().is_trailer() {
            return Ok(Some(files));
        }
        let name = entry.entry().name().to_string();
        let mut data = Vec::new();
        entry.read_to_end(&mut data).context("reading the seed disk")?;
        if i == 0 {
            if name != seed::MARKER {
                return Ok(None);
            }
            if data != seed::VERSION.as_bytes() {
                bail!(
                    "the seed disk has format {:?}; this agent reads {:?}",
                    String::from_utf8_lossy(&data),
                    seed::VERSION
                );
            }
        } else if entry.entry().mode() & 0o170000 == 0o100000 {
            files.push((name, data));
        }
        rest = entry.finish().context("reading the seed disk")?;
    }
    bail!("the seed disk has more than {} entries", seed::MAX_ENTRIES)
}

/// The contents of file `name` in a seed.
pub fn file<'a>(files: &'a Files, name: &str) -> Option<&'a [u8]> {
    files.iter().find(|(n, _)| n == name).map(|(_, d)| d.as_slice())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn archive(entries: &[(&str, u32, &[u8])]) -> Vec<u8> {
        let mut out = Vec::new();
        for (i, (name, mode, data)) in entries.iter().enumerate() {
            let mut w = cpio::newc::Builder::new(name).ino(i as u32 + 1).mode(*mode).write(&mut out, data.len() as u32);
            std::io::Write::write_all(&mut w, data).unwrap();
            w.finish().unwrap();
        }
        cpio::newc::trailer(&mut out).unwrap();
        out.resize(out.len().next_multiple_of(512), 0);
        out
    }

    #[test]
    fn a_seed_parses_and_other_disks_are_not_seeds() {
        let raw = archive(&[
            (seed::MARKER, 0o100644, b"1"),
            ("pki", 0o040755, b""),
            (seed::CA_CERT, 0o100644, b"CERT"),
            (seed::CA_KEY, 0o100600, b"KEY"),
        ]);
        let files = parse(&raw).unwrap().unwrap();
        assert_eq!(file(&files, seed::CA_CERT), Some(&b"CERT"[..]));
        assert_eq!(file(&files, seed::CA_KEY), Some(&b"KEY"[..]));
        assert_eq!(file(&files, "pki"), None, "directories are not files");
        assert!(parse(&[0u8; 4096]).unwrap().is_none(), "zeros: not a seed");
        assert!(parse(&archive(&[("etc", 0o040755, b"")])).unwrap().is_none(), "a cpio without the marker");
        let e = parse(&archive(&[(seed::MARKER, 0o100644, b"9")])).unwrap_err().to_string();
        assert!(e.contains("format \"9\""), "{e}");
        let cut = &raw[..raw.len() / 2];
        assert!(parse(cut).is_err(), "a damaged archive is an error, not a seed");
        assert!(read(Path::new("/nonexistent/vdb")).unwrap().is_none());
    }
}
