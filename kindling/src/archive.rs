//! newc cpio archives, written with the `cpio` crate: the emulated runner's level-1
//! initramfs, the net benchmark's guest initrd and a cluster node's seed disk.

use std::io::Write;
use std::path::Path;

/// A newc cpio archive being written.
pub struct Archive<W: Write> {
    out: W,
    ino: u32,
}

impl<W: Write> Archive<W> {
    pub fn new(out: W) -> Self {
        Self { out, ino: 1 }
    }

    pub fn entry(&mut self, name: &str, mode: u32, data: &[u8]) -> std::io::Result<()> {
        self.ino += 1;
        let mut w = cpio::newc::Builder::new(name)
            .ino(self.ino)
            .mode(mode)
            .nlink(1)
            .write(&mut self.out, u32::try_from(data.len()).map_err(std::io::Error::other)?);
        w.write_all(data)?;
        w.finish()?;
        Ok(())
    }

    pub fn dir(&mut self, name: &str) -> std::io::Result<()> {
        self.entry(name, 0o040755, &[])
    }

    pub fn file(&mut self, name: &str, mode: u32, src: &Path) -> std::io::Result<()> {
        let data = std::fs::read(src)?;
        self.entry(name, 0o100000 | mode, &data)
    }

    pub fn finish(mut self) -> std::io::Result<W> {
        cpio::newc::trailer(&mut self.out)?;
        Ok(self.out)
    }
}
