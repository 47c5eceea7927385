//! Where kindling keeps built artifacts: `$KINDLING_CACHE`, else
//! `$XDG_CACHE_HOME/kindling`, else `~/.cache/kindling`. Entries are keyed by a hash of
//! their inputs and written atomically (build in `<key>.tmp-<pid>`, then rename), so a
//! failed build never leaves a half-written artifact behind.

use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

pub fn dir() -> PathBuf {
    if let Some(d) = std::env::var_os("KINDLING_CACHE") {
        return PathBuf::from(d);
    }
    if let Some(d) = std::env::var_os("XDG_CACHE_HOME") {
        return PathBuf::from(d).join("kindling");
    }
    crate::util::home_dir().join(".cache").join("kindling")
}

/// Hex SHA-256 (first 16 bytes) over a sequence of labelled inputs.
#[derive(Default)]
pub struct Key(Sha256);

impl Key {
    pub fn new(kind: &str) -> Self {
        let mut k = Self(Sha256::new());
        k.add(kind.as_bytes());
        k
    }

    pub fn add(&mut self, bytes: &[u8]) -> &mut Self {
        self.0.update((bytes.len() as u64).to_le_bytes());
        self.0.update(bytes);
        self
    }

    pub fn add_file(&mut self, path: &Path) -> std::io::Result<&mut Self> {
        let data = std::fs::read(path)?;
        Ok(self.add(&data))
    }

    pub fn finish(&self) -> String {
        hex::encode(&self.0.clone().finalize()[..16])
    }
}

/// Writes `path` atomically: `fill` writes a temporary sibling, which is renamed over.
pub fn write_atomic(path: &Path, fill: impl FnOnce(&Path) -> std::io::Result<()>) -> std::io::Result<()> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    let tmp = path.with_extension(format!("tmp-{}", std::process::id()));
    match fill(&tmp).and_then(|()| std::fs::rename(&tmp, path)) {
        Ok(()) => {
            if let Some(parent) = path.parent() {
                crate::util::sync_dir(parent);
            }
            Ok(())
        }
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            Err(e)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_depends_on_every_input_and_its_boundaries() {
        let k = |parts: &[&[u8]]| {
            let mut k = Key::new("t");
            parts.iter().for_each(|p| {
                k.add(p);
            });
            k.finish()
        };
        assert_eq!(k(&[b"a", b"b"]), k(&[b"a", b"b"]));
        assert_ne!(k(&[b"ab"]), k(&[b"a", b"b"]));
    }

    #[test]
    fn failed_atomic_write_leaves_nothing() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("x/y");
        let err = write_atomic(&p, |tmp| {
            std::fs::write(tmp, b"half")?;
            Err(std::io::Error::other("boom"))
        });
        assert!(err.is_err());
        assert_eq!(std::fs::read_dir(d.path().join("x")).unwrap().count(), 0);
        write_atomic(&p, |tmp| std::fs::write(tmp, b"whole")).unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"whole");
    }
}
