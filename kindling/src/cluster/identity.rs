//! The cluster's identity, owned by the host: a cluster CA and an admin client
//! certificate signed by it, created with rcgen when a cluster is first started and
//! kept in `<state>/clusters/<name>.pki/` (0700; keys 0600).
//!
//! The node gets the CA on its seed disk ([`kindling_proto::seed`]) and issues its
//! components' certificates from it. Every kubeconfig kindling writes is built from
//! these files alone: nothing the guest writes (its root, or a pod that broke out to
//! it) reaches the user's kubeconfig, and `kindling kubeconfig` works while the node is
//! down.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use kindling_proto::seed;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
};

use crate::archive::Archive;

/// The admin user's name and group, as kubeadm names them.
const ADMIN_USER: &str = "kubernetes-admin";
const ADMIN_GROUP: &str = "system:masters";

/// A cluster's identity files.
#[derive(Clone, Debug)]
pub struct Identity {
    pub dir: PathBuf,
}

impl Identity {
    /// The identity kept in `dir`.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// True when the CA and the admin credentials exist.
    pub fn exists(&self) -> bool {
        ["ca.crt", "ca.key", "admin.crt", "admin.key"].iter().all(|f| self.path(f).is_file())
    }

    /// Creates what is missing: the CA (a new one only when there is no CA key), and
    /// the admin client certificate.
    pub fn ensure(&self) -> Result<()> {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.dir)
            .with_context(|| format!("cannot create {}", self.dir.display()))?;
        let ca_key = match fs::read_to_string(self.path("ca.key")) {
            Ok(pem) => {
                KeyPair::from_pem(&pem).with_context(|| format!("{}: not a key", self.path("ca.key").display()))?
            }
            Err(_) => {
                let key = KeyPair::generate()?;
                write_private(&self.path("ca.key"), key.serialize_pem().as_bytes(), 0o600)?;
                let _ = fs::remove_file(self.path("ca.crt"));
                let _ = fs::remove_file(self.path("admin.crt"));
                key
            }
        };
        let ca_params = ca_params();
        if !self.path("ca.crt").is_file() {
            write_private(&self.path("ca.crt"), ca_params.self_signed(&ca_key)?.pem().as_bytes(), 0o644)?;
        }
        if !self.path("admin.crt").is_file() || !self.path("admin.key").is_file() {
            let ca = Issuer::new(ca_params, ca_key);
            let key = KeyPair::generate()?;
            let mut p = CertificateParams::new(Vec::<String>::new())?;
            p.distinguished_name.push(DnType::CommonName, ADMIN_USER);
            p.distinguished_name.push(DnType::OrganizationName, ADMIN_GROUP);
            p.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
            p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
            p.use_authority_key_identifier_extension = true;
            let cert = p.signed_by(&key, &ca)?;
            write_private(&self.path("admin.key"), key.serialize_pem().as_bytes(), 0o600)?;
            write_private(&self.path("admin.crt"), cert.pem().as_bytes(), 0o644)?;
        }
        crate::util::sync_dir(&self.dir);
        Ok(())
    }

    fn read(&self, name: &str) -> Result<String> {
        fs::read_to_string(self.path(name)).with_context(|| {
            format!("cannot read the cluster's {name} ({}); delete the cluster and start it again", self.dir.display())
        })
    }

    /// The kubeconfig entries named `name` for the API server at `server`, from the
    /// host's files only.
    pub fn entries(&self, name: &str, server: &str) -> Result<super::kubeconfig::Entries> {
        super::kubeconfig::Entries::from_pems(
            name,
            server,
            &self.read("ca.crt")?,
            &self.read("admin.crt")?,
            &self.read("admin.key")?,
        )
    }

    /// Writes the seed disk image for the node: the CA, as [`seed`] describes. The
    /// image is padded to whole sectors.
    pub fn write_seed(&self, dest: &Path) -> Result<()> {
        let tmp = dest.with_extension("tmp");
        let write = || -> Result<()> {
            let f = fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&tmp)?;
            let mut a = Archive::new(std::io::BufWriter::new(f));
            a.entry(seed::MARKER, 0o100644, seed::VERSION.as_bytes())?;
            a.dir("pki")?;
            a.entry(seed::CA_CERT, 0o100644, self.read("ca.crt")?.as_bytes())?;
            a.entry(seed::CA_KEY, 0o100600, self.read("ca.key")?.as_bytes())?;
            let mut f = a.finish()?.into_inner().map_err(|e| e.into_error())?;
            let len = f.metadata()?.len();
            f.write_all(&vec![0u8; (len.next_multiple_of(512) - len) as usize])?;
            f.sync_all()?;
            fs::rename(&tmp, dest)?;
            Ok(())
        };
        write().with_context(|| format!("cannot write the seed disk {}", dest.display())).inspect_err(|_| {
            let _ = fs::remove_file(&tmp);
        })
    }

    /// The SHA-256 fingerprint of the CA certificate's PEM text, to check that a node
    /// uses this identity.
    pub fn ca_fingerprint(&self) -> Result<String> {
        use sha2::Digest;
        Ok(hex::encode(sha2::Sha256::digest(self.read("ca.crt")?.as_bytes())))
    }
}

fn ca_params() -> CertificateParams {
    let mut p = CertificateParams::default();
    p.distinguished_name.push(DnType::CommonName, seed::CA_COMMON_NAME);
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    p
}

/// Writes one of the identity's files atomically with `mode`.
fn write_private(path: &Path, data: &[u8], mode: u32) -> Result<()> {
    crate::util::write_atomic(path, &path.with_extension("tmp"), data, mode)
        .with_context(|| format!("cannot write {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;
    use std::process::Command;

    fn openssl(args: &[&str]) -> String {
        let out = Command::new("openssl").args(args).output().expect("openssl");
        assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    #[test]
    fn the_host_creates_a_ca_and_admin_credentials_once() {
        let d = tempfile::tempdir().unwrap();
        let id = Identity::new(d.path().join("c.pki"));
        assert!(!id.exists());
        id.ensure().unwrap();
        assert!(id.exists());
        let p = |f: &str| id.path(f).to_str().unwrap().to_string();
        assert!(openssl(&["verify", "-CAfile", &p("ca.crt"), &p("admin.crt")]).contains(": OK"));
        let subject = openssl(&["x509", "-noout", "-subject", "-in", &p("admin.crt")]);
        assert!(subject.contains("O = system:masters") && subject.contains("CN = kubernetes-admin"), "{subject}");
        for (f, mode) in [("ca.key", 0o600), ("admin.key", 0o600)] {
            assert_eq!(fs::metadata(id.path(f)).unwrap().permissions().mode() & 0o777, mode, "{f}");
        }
        assert_eq!(fs::metadata(&id.dir).unwrap().permissions().mode() & 0o777, 0o700);
        let fp = id.ca_fingerprint().unwrap();
        id.ensure().unwrap();
        assert_eq!(id.ca_fingerprint().unwrap(), fp, "a second ensure keeps the CA");
        let e = id.entries("dev", "https://127.0.0.1:16443").unwrap();
        let text = crate::cluster::kubeconfig::standalone(&e).unwrap();
        assert!(text.contains("server: https://127.0.0.1:16443") && text.contains("client-key-data"), "{text}");
    }

    #[test]
    fn the_seed_is_a_cpio_archive_with_the_ca() {
        let d = tempfile::tempdir().unwrap();
        let id = Identity::new(d.path().join("c.pki"));
        id.ensure().unwrap();
        let img = d.path().join("seed.img");
        id.write_seed(&img).unwrap();
        let bytes = fs::read(&img).unwrap();
        assert_eq!(bytes.len() % 512, 0);
        let mut r = &bytes[..];
        let mut names = Vec::new();
        loop {
            let mut entry = cpio::NewcReader::new(r).unwrap();
            if entry.entry().is_trailer() {
                break;
            }
            names.push(entry.entry().name().to_string());
            let mut data = Vec::new();
            std::io::Read::read_to_end(&mut entry, &mut data).unwrap();
            if names.last().unwrap() == seed::CA_KEY {
                assert_eq!(data, fs::read(id.path("ca.key")).unwrap());
            }
            r = entry.finish().unwrap();
        }
        assert_eq!(names, [seed::MARKER, "pki", seed::CA_CERT, seed::CA_KEY]);
    }
}
