//! The cluster's PKI, generated at first boot and kept on the root disk: a cluster CA,
//! the API server's serving certificate, client certificates for every component, the
//! kubelet's serving certificate, the service-account key pair, and kubeconfigs; for the
//! aggregation layer, a front-proxy CA of its own and the API server's client certificate
//! from it, and the metrics-server add-on's serving certificate.
//! Keys are written 0600. A later boot reuses everything that exists; only the API
//! server and kubelet serving certificates are re-issued when the node's addresses change.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use kindling_proto::seed;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
};

/// The node's identity as certificates need it.
#[derive(Clone, Debug)]
pub struct NodeIdentity {
    pub hostname: String,
    /// The node's IP addresses (besides 127.0.0.1).
    pub addresses: Vec<String>,
    /// First IP of the service range: the in-cluster `kubernetes` service address.
    pub service_ip: String,
}

/// A client identity: file stem, CN (user), O (groups).
pub struct Client {
    pub name: &'static str,
    pub user: String,
    pub groups: Vec<&'static str>,
}

pub fn clients(node: &NodeIdentity) -> Vec<Client> {
    vec![
        Client { name: "admin", user: "kubernetes-admin".into(), groups: vec!["system:masters"] },
        // The controllers run with the controller manager's own credentials
        // (`--use-service-account-credentials=false`): minting a service account and a
        // token for each of its ~35 controllers, one after another, took 5-15 s each under
        // emulation and held CoreDNS's Deployment for minutes after node-ready. Those
        // credentials then need every controller's rights; the controller manager holds
        // the CA's key (it signs CSRs) and the service-account signing key, so
        // system:masters gives it nothing it could not mint already.
        Client {
            name: "controller-manager",
            user: "system:kube-controller-manager".into(),
            groups: vec!["system:masters"],
        },
        Client { name: "scheduler", user: "system:kube-scheduler".into(), groups: vec![] },
        Client { name: "kube-proxy", user: "system:kube-proxy".into(), groups: vec![] },
        Client { name: "kubelet", user: format!("system:node:{}", node.hostname), groups: vec!["system:nodes"] },
        Client {
            name: "apiserver-kubelet-client",
            user: "kube-apiserver-kubelet-client".into(),
            groups: vec!["system:masters"],
        },
    ]
}

pub struct Pki {
    pub dir: PathBuf,
}

impl Pki {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// Installs a CA made elsewhere (the host's, whose subject is the same
    /// [`seed::CA_COMMON_NAME`] this agent issues under): its certificate and key, checked
    /// to be a PEM certificate and a PEM key.
    pub fn install_ca(&self, cert: &[u8], key: &[u8]) -> Result<()> {
        fs::create_dir_all(&self.dir).with_context(|| format!("creating {}", self.dir.display()))?;
        fs::set_permissions(&self.dir, fs::Permissions::from_mode(0o700))?;
        let key_pem = std::str::from_utf8(key).context("the CA key is not text")?;
        KeyPair::from_pem(key_pem).context("the CA key is not a PEM key")?;
        let cert_pem = std::str::from_utf8(cert).context("the CA certificate is not text")?;
        anyhow::ensure!(
            cert_pem.trim_start().starts_with("-----BEGIN CERTIFICATE-----"),
            "the CA certificate is not PEM"
        );
        write(&self.path("ca.key"), key, 0o600)?;
        write(&self.path("ca.crt"), cert, 0o644)
    }

    /// Creates whatever is missing; returns the names of the files it (re)wrote.
    pub fn ensure(&self, node: &NodeIdentity) -> Result<Vec<String>> {
        fs::create_dir_all(&self.dir).with_context(|| format!("creating {}", self.dir.display()))?;
        fs::set_permissions(&self.dir, fs::Permissions::from_mode(0o700))?;
        let mut written = Vec::new();

        let ca_key = self.key("ca.key", &mut written)?;
        let ca_params = ca_params();
        if !self.path("ca.crt").exists() {
            write(&self.path("ca.crt"), ca_params.self_signed(&ca_key)?.pem().as_bytes(), 0o644)?;
            written.push("ca.crt".into());
        }
        let ca = Issuer::new(ca_params, ca_key);

        let sans = apiserver_sans(node);
        let stamp = sans.join(",");
        if self.reissue("apiserver", &stamp) {
            let key = self.key("apiserver.key", &mut written)?;
            let mut p = leaf_params("kube-apiserver", &[], sans)?;
            p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
            self.write_cert("apiserver", &p, &key, &ca, &stamp, &mut written)?;
        }
        let kubelet_sans: Vec<String> =
            [node.hostname.clone(), "127.0.0.1".into()].into_iter().chain(node.addresses.clone()).collect();
        let kstamp = kubelet_sans.join(",");
        if self.reissue("kubelet-serving", &kstamp) {
            let key = self.key("kubelet-serving.key", &mut written)?;
            let mut p = leaf_params(&format!("system:node:{}", node.hostname), &["system:nodes"], kubelet_sans)?;
            p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
            self.write_cert("kubelet-serving", &p, &key, &ca, &kstamp, &mut written)?;
        }
        // The aggregation layer (`--requestheader-*`, `--proxy-client-*`): the API server
        // proxies to an extension API server (metrics-server) with a client certificate
        // of a CA of its own, as kubeadm's front-proxy-ca, so that no other holder of a
        // cluster-CA certificate can claim a user through the X-Remote-* headers.
        let fp_key = self.key("front-proxy-ca.key", &mut written)?;
        let fp_params = front_proxy_ca_params();
        if !self.path("front-proxy-ca.crt").exists() {
            write(&self.path("front-proxy-ca.crt"), fp_params.self_signed(&fp_key)?.pem().as_bytes(), 0o644)?;
            written.push("front-proxy-ca.crt".into());
        }
        let fp = Issuer::new(fp_params, fp_key);
        if self.reissue("front-proxy-client", FRONT_PROXY_CLIENT) {
            let key = self.key("front-proxy-client.key", &mut written)?;
            let mut p = leaf_params(FRONT_PROXY_CLIENT, &[], vec![])?;
            p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
            self.write_cert("front-proxy-client", &p, &key, &fp, FRONT_PROXY_CLIENT, &mut written)?;
        }
        // metrics-server's serving certificate, from the cluster CA: its APIService
        // carries that CA, so the API server verifies whom it proxies to.
        let ms_sans = service_sans(METRICS_SERVER_SERVICE);
        let ms_stamp = ms_sans.join(",");
        if self.reissue("metrics-server", &ms_stamp) {
            let key = self.key("metrics-server.key", &mut written)?;
            let mut p = leaf_params(&ms_sans[0], &[], ms_sans.clone())?;
            p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
            self.write_cert("metrics-server", &p, &key, &ca, &ms_stamp, &mut written)?;
        }
        for c in clients(node) {
            // Re-issued when the identity changed (a disk from a kindling that gave it
            // other groups); the key stays.
            let stamp = format!("{}|{}", c.user, c.groups.join(","));
            if self.reissue(c.name, &stamp) {
                let key = self.key(&format!("{}.key", c.name), &mut written)?;
                let mut p = leaf_params(&c.user, &c.groups, vec![])?;
                p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
                self.write_cert(c.name, &p, &key, &ca, &stamp, &mut written)?;
            }
        }
        // Service accounts: the API server signs tokens with sa.key and verifies with sa.pub.
        let sa = self.key("sa.key", &mut written)?;
        if !self.path("sa.pub").exists() {
            write(&self.path("sa.pub"), sa.public_key_pem().as_bytes(), 0o644)?;
            written.push("sa.pub".into());
        }
        Ok(written)
    }

    /// Loads `name` or generates and writes a new key (0600).
    fn key(&self, name: &str, written: &mut Vec<String>) -> Result<KeyPair> {
        let path = self.path(name);
        if let Ok(pem) = fs::read_to_string(&path) {
            return KeyPair::from_pem(&pem).with_context(|| format!("reading key {}", path.display()));
        }
        let key = KeyPair::generate()?;
        write(&path, key.serialize_pem().as_bytes(), 0o600)?;
        written.push(name.into());
        Ok(key)
    }

    /// A certificate is re-issued when missing or issued for something else than
    /// `stamp` (a serving certificate's addresses, a client's user and groups), as
    /// recorded in `<stem>.sans` beside it.
    fn reissue(&self, stem: &str, stamp: &str) -> bool {
        let have = fs::read_to_string(self.path(&format!("{stem}.sans"))).unwrap_or_default();
        !self.path(&format!("{stem}.crt")).exists() || have != stamp
    }

    fn write_cert(
        &self,
        stem: &str,
        params: &CertificateParams,
        key: &KeyPair,
        ca: &Issuer<'_, KeyPair>,
        stamp: &str,
        written: &mut Vec<String>,
    ) -> Result<()> {
        let cert = params.signed_by(key, ca)?;
        write(&self.path(&format!("{stem}.crt")), cert.pem().as_bytes(), 0o644)?;
        if !stamp.is_empty() {
            write(&self.path(&format!("{stem}.sans")), stamp.as_bytes(), 0o644)?;
        }
        written.push(format!("{stem}.crt"));
        Ok(())
    }

    /// A kubeconfig for client `name` against `server`, with embedded credentials (0600).
    pub fn write_kubeconfig(&self, dest: &Path, name: &str, user: &str, server: &str, cluster: &str) -> Result<()> {
        let b64 = |f: &str| -> Result<String> { Ok(base64(&fs::read(self.path(f))?)) };
        let text = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: {cluster}\n  cluster:\n    server: {server}\n    certificate-authority-data: {ca}\n\
             users:\n- name: {user}\n  user:\n    client-certificate-data: {crt}\n    client-key-data: {key}\n\
             contexts:\n- name: {cluster}\n  context:\n    cluster: {cluster}\n    user: {user}\ncurrent-context: {cluster}\n",
            ca = b64("ca.crt")?,
            crt = b64(&format!("{name}.crt"))?,
            key = b64(&format!("{name}.key"))?,
        );
        write(dest, text.as_bytes(), 0o600)
    }
}

/// The user of the API server's front-proxy client certificate
/// (`--requestheader-allowed-names`).
pub const FRONT_PROXY_CLIENT: &str = "front-proxy-client";

/// The metrics-server add-on's Service (namespace, name).
pub const METRICS_SERVER_SERVICE: (&str, &str) = ("kube-system", "metrics-server");

/// The names a Service's TLS server answers to; the API server's aggregator asks for
/// `NAME.NAMESPACE.svc`, the first.
pub fn service_sans((namespace, name): (&str, &str)) -> Vec<String> {
    vec![
        format!("{name}.{namespace}.svc"),
        format!("{name}.{namespace}.svc.cluster.local"),
        format!("{name}.{namespace}"),
        name.to_string(),
    ]
}

fn front_proxy_ca_params() -> CertificateParams {
    let mut p = ca_params();
    p.distinguished_name = rcgen::DistinguishedName::new();
    p.distinguished_name.push(DnType::CommonName, "kindling-front-proxy-ca");
    p
}

fn ca_params() -> CertificateParams {
    let mut p = CertificateParams::default();
    p.distinguished_name.push(DnType::CommonName, seed::CA_COMMON_NAME);
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    p
}

fn leaf_params(cn: &str, groups: &[&str], sans: Vec<String>) -> Result<CertificateParams> {
    let mut p = CertificateParams::new(sans)?;
    p.distinguished_name.push(DnType::CommonName, cn);
    for g in groups {
        p.distinguished_name.push(DnType::OrganizationName, *g);
    }
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
    p.use_authority_key_identifier_extension = true;
    Ok(p)
}

/// Names the API server must answer to.
pub fn apiserver_sans(node: &NodeIdentity) -> Vec<String> {
    let mut sans: Vec<String> = [
        "kubernetes",
        "kubernetes.default",
        "kubernetes.default.svc",
        "kubernetes.default.svc.cluster.local",
        "localhost",
        "127.0.0.1",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    sans.push(node.hostname.clone());
    sans.push(node.service_ip.clone());
    sans.extend(node.addresses.iter().cloned());
    sans.dedup();
    sans
}

fn write(path: &Path, data: &[u8], mode: u32) -> Result<()> {
    let tmp = path.with_extension("tmp");
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)
        .with_context(|| format!("writing {}", tmp.display()))?;
    f.write_all(data)?;
    f.sync_all()?;
    fs::set_permissions(&tmp, fs::Permissions::from_mode(mode))?;
    fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))
}

fn base64(data: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(data)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    fn node() -> NodeIdentity {
        NodeIdentity {
            hostname: "kindling".into(),
            addresses: vec!["10.0.2.15".into()],
            service_ip: "10.96.0.1".into(),
        }
    }

    fn openssl(args: &[&str]) -> String {
        let out = Command::new("openssl").args(args).output().expect("openssl");
        assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    #[test]
    fn pki_verifies_with_openssl_keys_are_private_and_is_reused() {
        let d = tempfile::tempdir().unwrap();
        let pki = Pki::new(d.path().join("pki"));
        let first = pki.ensure(&node()).unwrap();
        assert!(first.contains(&"ca.key".to_string()) && first.contains(&"apiserver.crt".to_string()));
        let ca = pki.path("ca.crt");
        for c in ["apiserver", "kubelet-serving", "admin", "kubelet", "controller-manager", "scheduler", "kube-proxy"] {
            let crt = pki.path(&format!("{c}.crt"));
            assert!(
                openssl(&["verify", "-CAfile", ca.to_str().unwrap(), crt.to_str().unwrap()]).contains(": OK"),
                "{c}"
            );
            let mode = fs::metadata(pki.path(&format!("{c}.key"))).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{c}.key");
        }
        let text = openssl(&["x509", "-noout", "-text", "-in", pki.path("apiserver.crt").to_str().unwrap()]);
        for san in [
            "DNS:kubernetes.default.svc.cluster.local",
            "DNS:localhost",
            "IP Address:127.0.0.1",
            "IP Address:10.0.2.15",
            "IP Address:10.96.0.1",
        ] {
            assert!(text.contains(san), "apiserver SAN {san} missing:\n{text}");
        }
        let admin = openssl(&["x509", "-noout", "-subject", "-in", pki.path("admin.crt").to_str().unwrap()]);
        assert!(admin.contains("O = system:masters") && admin.contains("CN = kubernetes-admin"), "{admin}");

        // Second boot: nothing is rewritten.
        assert!(pki.ensure(&node()).unwrap().is_empty());
        // New address: only the serving certificates are re-issued, by the same CA.
        let mut moved = node();
        moved.addresses = vec!["192.168.7.2".into()];
        let again = pki.ensure(&moved).unwrap();
        assert_eq!(again, vec!["apiserver.crt".to_string(), "kubelet-serving.crt".to_string()]);
        assert!(openssl(&["verify", "-CAfile", ca.to_str().unwrap(), pki.path("apiserver.crt").to_str().unwrap()])
            .contains(": OK"));

        // The controller manager runs every controller with its own credentials.
        let subject = |c: &str| openssl(&["x509", "-noout", "-subject", "-in", pki.path(c).to_str().unwrap()]);
        assert!(subject("controller-manager.crt").contains("O = system:masters"));
        // A disk from before that (a client certificate without its stamp, as every
        // earlier kindling wrote them): the clients are re-issued once, keys kept.
        let key_before = fs::read(pki.path("controller-manager.key")).unwrap();
        for c in ["admin", "controller-manager", "scheduler", "kube-proxy", "kubelet", "apiserver-kubelet-client"] {
            fs::remove_file(pki.path(&format!("{c}.sans"))).unwrap();
        }
        let upgraded = pki.ensure(&moved).unwrap();
        assert!(upgraded.contains(&"controller-manager.crt".to_string()), "{upgraded:?}");
        assert!(!upgraded.iter().any(|f| f.ends_with(".key")), "no key is replaced: {upgraded:?}");
        assert_eq!(fs::read(pki.path("controller-manager.key")).unwrap(), key_before);
        assert!(pki.ensure(&moved).unwrap().is_empty());
    }

    /// A CA made elsewhere (as the host makes it) is installed and everything the node
    /// issues chains to it.
    /// The aggregation layer's certificates: the front-proxy client from its own CA (not
    /// the cluster CA, whose other holders must not pass for the API server's proxy), and
    /// metrics-server's serving certificate from the cluster CA, for the name the API
    /// server's aggregator verifies.
    #[test]
    fn the_aggregation_layer_has_a_ca_of_its_own() {
        let d = tempfile::tempdir().unwrap();
        let pki = Pki::new(d.path().join("pki"));
        pki.ensure(&node()).unwrap();
        let path = |f: &str| pki.path(f).to_str().unwrap().to_string();
        let verify = |ca: &str, crt: &str| {
            let out = Command::new("openssl").args(["verify", "-CAfile", &path(ca), &path(crt)]).output().unwrap();
            out.status.success() && String::from_utf8_lossy(&out.stdout).contains(": OK")
        };
        assert!(verify("front-proxy-ca.crt", "front-proxy-client.crt"));
        assert!(!verify("ca.crt", "front-proxy-client.crt"), "the cluster CA must not vouch for the proxy");
        assert!(!verify("front-proxy-ca.crt", "admin.crt"), "the proxy's CA must not vouch for cluster users");
        let fp = openssl(&["x509", "-noout", "-text", "-in", &path("front-proxy-client.crt")]);
        assert!(fp.contains("CN = front-proxy-client") && fp.contains("TLS Web Client Authentication"), "{fp}");
        assert!(verify("ca.crt", "metrics-server.crt"));
        let ms = openssl(&["x509", "-noout", "-text", "-in", &path("metrics-server.crt")]);
        assert!(
            ms.contains("DNS:metrics-server.kube-system.svc") && ms.contains("TLS Web Server Authentication"),
            "{ms}"
        );
        for k in ["front-proxy-ca.key", "front-proxy-client.key", "metrics-server.key"] {
            assert_eq!(fs::metadata(pki.path(k)).unwrap().permissions().mode() & 0o777, 0o600, "{k}");
        }
        let fp_ca = fs::read(pki.path("front-proxy-ca.crt")).unwrap();
        assert!(pki.ensure(&node()).unwrap().is_empty(), "a second boot rewrites nothing");
        assert_eq!(fs::read(pki.path("front-proxy-ca.crt")).unwrap(), fp_ca);
    }

    #[test]
    fn an_installed_ca_signs_the_node_certificates() {
        let d = tempfile::tempdir().unwrap();
        let key = KeyPair::generate().unwrap();
        let cert = ca_params().self_signed(&key).unwrap().pem();
        let pki = Pki::new(d.path().join("pki"));
        assert!(pki.install_ca(cert.as_bytes(), b"not a key").is_err());
        assert!(pki.install_ca(b"not a cert", key.serialize_pem().as_bytes()).is_err());
        pki.install_ca(cert.as_bytes(), key.serialize_pem().as_bytes()).unwrap();
        let written = pki.ensure(&node()).unwrap();
        assert!(!written.contains(&"ca.key".to_string()) && !written.contains(&"ca.crt".to_string()), "{written:?}");
        let host_ca = d.path().join("host-ca.crt");
        fs::write(&host_ca, &cert).unwrap();
        for c in ["apiserver", "kubelet-serving", "admin", "kubelet"] {
            let crt = pki.path(&format!("{c}.crt"));
            assert!(
                openssl(&["verify", "-CAfile", host_ca.to_str().unwrap(), crt.to_str().unwrap()]).contains(": OK"),
                "{c}"
            );
        }
    }

    #[test]
    fn kubeconfig_embeds_credentials() {
        let d = tempfile::tempdir().unwrap();
        let pki = Pki::new(d.path().join("pki"));
        pki.ensure(&node()).unwrap();
        let kc = d.path().join("admin.conf");
        pki.write_kubeconfig(&kc, "admin", "kubernetes-admin", "https://127.0.0.1:6443", "kindling").unwrap();
        let text = fs::read_to_string(&kc).unwrap();
        assert!(text.contains("server: https://127.0.0.1:6443") && text.contains("client-key-data: "));
        assert_eq!(fs::metadata(&kc).unwrap().permissions().mode() & 0o777, 0o600);
        assert_eq!(base64(b"hello"), "aGVsbG8=");
        assert_eq!(base64(b"hi!"), "aGkh");
    }
}
