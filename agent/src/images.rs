//! The preloaded images: the root disk's build imported and unpacked them into
//! containerd's store (`images/rootfs/build.sh`), so the node has nothing to import or
//! unpack, at boot or when an add-on is enabled. Here bring-up checks they are there,
//! from the index the build left (`images.txt`: `<archive> <image name>` per line).

use std::path::Path;
use std::time::Instant;

use anyhow::Result;

use crate::phase;
use crate::supervisor::Reaper;

/// The most names the index may hold, and its most bytes (the root disk is the
/// cluster's own, which a guest wrote; bounded all the same).
const MAX_NAMES: usize = 256;
const MAX_INDEX_BYTES: u64 = 64 * 1024;

/// The image names of the index `images.txt` in `dir` (the second word of each line),
/// each once, at most [`MAX_NAMES`]; None when there is no index.
pub fn preloaded_names(dir: &Path) -> Result<Option<Vec<String>>> {
    let path = dir.join("images.txt");
    let meta = match std::fs::metadata(&path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => anyhow::bail!("reading {}: {e}", path.display()),
    };
    anyhow::ensure!(meta.len() <= MAX_INDEX_BYTES, "{} is over {MAX_INDEX_BYTES} bytes", path.display());
    let text = std::fs::read_to_string(&path).map_err(|e| anyhow::anyhow!("reading {}: {e}", path.display()))?;
    let mut names: Vec<String> = Vec::new();
    for name in text.lines().filter_map(|l| l.split_whitespace().nth(1)) {
        if !names.iter().any(|n| n == name) {
            names.push(name.to_string());
        }
    }
    anyhow::ensure!(names.len() <= MAX_NAMES, "{} names over {MAX_NAMES} images", path.display());
    Ok(Some(names))
}

/// The names of `want` that `have` (`ctr images ls -q`) lacks.
pub fn missing<'a>(want: &'a [String], have: &str) -> Vec<&'a str> {
    want.iter().map(String::as_str).filter(|w| !have.lines().any(|l| l.trim() == *w)).collect()
}

/// Checks that every preloaded image is in containerd's k8s.io namespace; says on the
/// console how many, or which are missing (and how to get them back). A missing image
/// is not fatal here: the pods that need it say so (ErrImagePull) and the rest run.
pub fn check_preloaded(reaper: &Reaper, ctr: &str, sock: &str, dir: &Path) -> Result<()> {
    let t = Instant::now();
    let Some(want) = preloaded_names(dir)? else {
        phase::log(format!("no preloaded image index in {}", dir.display()));
        return Ok(());
    };
    let (code, have) = reaper.run(&[ctr, "--address", sock, "-n", "k8s.io", "images", "ls", "-q"])?;
    anyhow::ensure!(code == 0, "ctr images ls: {}", have.trim());
    let gone = missing(&want, &have);
    if gone.is_empty() {
        phase::log(format!(
            "{} preloaded images in containerd's store, unpacked ({:.1}s to check)",
            want.len(),
            t.elapsed().as_secs_f64()
        ));
    } else {
        phase::log(format!(
            "preloaded images missing from containerd's store: {}; `kindling image load ARCHIVE` loads one \
             (a new cluster gets them from its root disk)",
            gone.join(", ")
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_index_names_each_image_once_and_is_bounded() {
        let d = tempfile::tempdir().unwrap();
        assert_eq!(preloaded_names(d.path()).unwrap(), None);
        std::fs::write(
            d.path().join("images.txt"),
            "pause.oci.tar registry.k8s.io/pause:3.9\npause.oci.tar registry.k8s.io/pause:3.6\n\nbusybox.oci.tar b:1\nbusybox.oci.tar b:1\n",
        )
        .unwrap();
        let names = preloaded_names(d.path()).unwrap().unwrap();
        assert_eq!(names, ["registry.k8s.io/pause:3.9", "registry.k8s.io/pause:3.6", "b:1"]);
        assert_eq!(missing(&names, "b:1\nregistry.k8s.io/pause:3.9\n"), ["registry.k8s.io/pause:3.6"]);
        assert!(missing(&names, " registry.k8s.io/pause:3.6\nregistry.k8s.io/pause:3.9\nb:1").is_empty());
        let many: String = (0..=MAX_NAMES).map(|i| format!("a.tar x/{i}\n")).collect();
        std::fs::write(d.path().join("images.txt"), many).unwrap();
        assert!(preloaded_names(d.path()).unwrap_err().to_string().contains("over 256 images"));
        std::fs::write(d.path().join("images.txt"), vec![b'a'; MAX_INDEX_BYTES as usize + 1]).unwrap();
        assert!(preloaded_names(d.path()).unwrap_err().to_string().contains("bytes"));
    }
}
