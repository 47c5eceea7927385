//! The agent's own client of the local API server, for the readiness polls of bring-up,
//! the add-ons and the selftest: HTTPS GETs with the admin client certificate, verified
//! against the cluster CA. Each poll used to spawn `kubectl` (the 115 MB Kubernetes
//! multi-call binary), about a second of CPU under emulation, every second, on the one
//! vCPU the API server itself needs; a GET over a kept-alive connection costs a few
//! milliseconds. CoreDNS's and the add-ons' objects are applied here too (server-side
//! apply, field manager `kindling`) and the add-ons' deleted here, where each apply or
//! delete used to spawn kubectl; the LoadBalancer controller's status patch is the
//! other write.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use serde_json::Value;
use ureq::tls::{Certificate, ClientCert, PrivateKey, RootCerts, TlsConfig};

/// The API server as the node's own processes reach it.
pub const LOCAL_SERVER: &str = "https://127.0.0.1:6443";
/// The most of a response body read: a node or a Deployment is a few KiB.
const BODY_LIMIT: u64 = 4 << 20;
/// An OpenAPI document: a few MiB for Kubernetes 1.30; the first build of one, under
/// emulation, takes a minute or more.
const OPENAPI_LIMIT: u64 = 64 << 20;
const OPENAPI_PATIENCE: Duration = Duration::from_secs(5 * 60);

/// A clone shares the TLS configuration and the connection pool.
#[derive(Clone)]
pub struct Api {
    agent: ureq::Agent,
    base: String,
}

impl Api {
    /// A client of `base` that trusts `ca.crt` of `pki` and presents `admin.crt`/`admin.key`.
    pub fn from_pki(pki: &Path, base: &str) -> Result<Self> {
        let read = |name: &str| {
            let p = pki.join(name);
            std::fs::read(&p).with_context(|| format!("reading {}", p.display()))
        };
        let (ca, crt, key) = (read("ca.crt")?, read("admin.crt")?, read("admin.key")?);
        let ca = Certificate::from_pem(&ca).context("ca.crt is not a PEM certificate")?;
        let crt = Certificate::from_pem(&crt).context("admin.crt is not a PEM certificate")?;
        let key = PrivateKey::from_pem(&key).context("admin.key is not a PEM key")?;
        let tls = TlsConfig::builder()
            .root_certs(RootCerts::Specific(Arc::new(vec![ca])))
            .client_cert(Some(ClientCert::new_with_certs(&[crt], key)))
            .build();
        let agent = ureq::Agent::config_builder()
            .tls_config(tls)
            .http_status_as_error(false)
            // A local connection: never through a proxy from the environment.
            .proxy(None)
            .timeout_global(Some(Duration::from_secs(20)))
            .build()
            .into();
        Ok(Self { agent, base: base.trim_end_matches('/').to_string() })
    }

    /// GET `path`: the status and the body (bounded).
    fn get(&self, path: &str) -> Result<(u16, String)> {
        let url = format!("{}{path}", self.base);
        let mut resp = self.agent.get(&url).call().with_context(|| format!("GET {url}"))?;
        let status = resp.status().as_u16();
        let body = resp
            .body_mut()
            .with_config()
            .limit(BODY_LIMIT)
            .read_to_string()
            .with_context(|| format!("reading the answer to GET {url}"))?;
        Ok((status, body))
    }

    /// GETs one of the API server's OpenAPI documents (`path`: `/openapi/v2`,
    /// `/openapi/v3/api/v1`, ...) the way kubectl does (protobuf) and discards it;
    /// returns its size. The API server builds each document on its first request and
    /// keeps it; under emulation the first build of `/openapi/v3/api/v1` or of
    /// `/openapi/v2` took longer than the 32 s kubectl waits (and than the API server's
    /// own 60 s, which answers 504 while the build goes on), so a user's first
    /// `kubectl apply` right after `kindling start` failed its validation ("failed to
    /// download openapi"). Bounded in time and size.
    pub fn openapi(&self, path: &str) -> Result<u64> {
        let url = format!("{}{path}", self.base);
        let version = if path.starts_with("/openapi/v2") { "v2" } else { "v3" };
        let mut resp = self
            .agent
            .get(&url)
            .header("Accept", format!("application/com.github.proto-openapi.spec.{version}@v1.0+protobuf"))
            .config()
            .timeout_global(Some(OPENAPI_PATIENCE))
            .build()
            .call()
            .with_context(|| format!("GET {url}"))?;
        let status = resp.status().as_u16();
        anyhow::ensure!(status == 200, "GET {url}: HTTP {status}");
        let mut body = resp.body_mut().with_config().limit(OPENAPI_LIMIT).reader();
        std::io::copy(&mut body, &mut std::io::sink()).with_context(|| format!("reading the answer to GET {url}"))
    }

    /// A JSON merge patch of `path` (an object or its status); an error names the
    /// answer when it is not 200.
    pub fn merge_patch(&self, path: &str, patch: &Value) -> Result<()> {
        self.patch(path, "", "application/merge-patch+json", patch).map_err(|(status, body)| match status {
            Some(status) => anyhow::anyhow!("PATCH {path}: HTTP {status}: {}", first_line(&body)),
            None => anyhow::anyhow!("{body}"),
        })
    }

    /// PATCH `path` + `query` with `body` as `content_type`: Ok on a 2xx answer, else
    /// (the status, the answer's body) or (None, the error).
    fn patch(&self, path: &str, query: &str, content_type: &str, body: &Value) -> Result<(), (Option<u16>, String)> {
        let url = format!("{}{path}{query}", self.base);
        let mut resp = self
            .agent
            .patch(&url)
            .header("Content-Type", content_type)
            .send(body.to_string())
            .map_err(|e| (None, format!("PATCH {url}: {e}")))?;
        let status = resp.status().as_u16();
        if (200..300).contains(&status) {
            return Ok(());
        }
        Err((Some(status), resp.body_mut().with_config().limit(BODY_LIMIT).read_to_string().unwrap_or_default()))
    }

    /// Server-side apply of one manifest object (`kubectl apply --server-side
    /// --force-conflicts` with field manager `kindling`): creates it or brings the
    /// fields kindling owns to the manifest's.
    pub fn apply(&self, obj: &Value) -> Result<()> {
        let path = object_path(obj)?;
        self.patch(&path, "?fieldManager=kindling&force=true", "application/apply-patch+yaml", obj).map_err(
            |(status, body)| match status {
                Some(status) => anyhow::anyhow!("applying {path}: HTTP {status}: {}", message(&body)),
                None => anyhow::anyhow!("{body}"),
            },
        )
    }

    /// Deletes one manifest object (its dependents in the background, as kubectl
    /// does); false when it was not there.
    pub fn delete(&self, obj: &Value) -> Result<bool> {
        let path = object_path(obj)?;
        let url = format!("{}{path}?propagationPolicy=Background", self.base);
        let mut resp = self.agent.delete(&url).call().with_context(|| format!("DELETE {url}"))?;
        match resp.status().as_u16() {
            200 | 202 => Ok(true),
            404 => Ok(false),
            status => {
                let body = resp.body_mut().with_config().limit(BODY_LIMIT).read_to_string().unwrap_or_default();
                anyhow::bail!("deleting {path}: HTTP {status}: {}", message(&body))
            }
        }
    }

    /// Whether a manifest object exists.
    pub fn exists(&self, obj: &Value) -> Result<bool> {
        Ok(self.object(&object_path(obj)?)?.is_some())
    }

    /// An object: None when it does not exist (404); an error when the server does not
    /// answer or answers otherwise.
    pub fn object(&self, path: &str) -> Result<Option<Value>> {
        match self.get(path)? {
            (200, body) => Ok(Some(serde_json::from_str(&body).with_context(|| format!("GET {path}: not JSON"))?)),
            (404, _) => Ok(None),
            (code, body) => anyhow::bail!("GET {path}: HTTP {code}: {}", first_line(&body)),
        }
    }

    /// `/readyz` answers `ok`.
    pub fn ready(&self) -> bool {
        self.get("/readyz").is_ok_and(|(code, body)| code == 200 && body.trim() == "ok")
    }

    /// The kubelet of this boot has posted the node's status: a condition's heartbeat is
    /// from `since` on. (On a restart the Node and its old status are there before the
    /// kubelet runs.)
    pub fn node_posted(&self, node: &str, since: SystemTime) -> bool {
        self.object(&format!("/api/v1/nodes/{node}"))
            .ok()
            .flatten()
            .is_some_and(|n| conditions(&n).any(|c| heartbeat(c).is_some_and(|t| t >= since)))
    }

    /// The node's Ready condition is True, as posted from `since` on (not a Ready left
    /// from before a restart).
    pub fn node_ready(&self, node: &str, since: SystemTime) -> bool {
        self.object(&format!("/api/v1/nodes/{node}")).ok().flatten().is_some_and(|n| node_is_ready(&n, since))
    }

    /// Whether Deployment `ns/name` exists, and whether it has an available replica.
    pub fn deployment(&self, ns: &str, name: &str) -> Result<(bool, bool)> {
        Ok(match self.object(&format!("/apis/apps/v1/namespaces/{ns}/deployments/{name}"))? {
            None => (false, false),
            Some(d) => (true, d["status"]["availableReplicas"].as_u64().unwrap_or(0) >= 1),
        })
    }

    /// Some pod in `ns` matching the label `selector` (`key=value`) is Running.
    pub fn pods_running(&self, ns: &str, selector: &str) -> bool {
        let path = format!("/api/v1/namespaces/{ns}/pods?labelSelector={}", selector.replace('=', "%3D"));
        self.object(&path).ok().flatten().is_some_and(|list| {
            list["items"].as_array().is_some_and(|pods| pods.iter().any(|p| p["status"]["phase"] == "Running"))
        })
    }

    /// The phase of pod `ns/name` (`Pending`, `Running`, `Succeeded`, `Failed`), None
    /// when it does not exist.
    pub fn pod_phase(&self, ns: &str, name: &str) -> Result<Option<String>> {
        Ok(self
            .object(&format!("/api/v1/namespaces/{ns}/pods/{name}"))?
            .map(|p| p["status"]["phase"].as_str().unwrap_or("Pending").to_string()))
    }
}

/// The resources of the kinds the add-ons' manifests hold: (apiVersion, kind) ->
/// (plural, namespaced).
const KINDS: &[(&str, &str, &str, bool)] = &[
    ("v1", "Namespace", "namespaces", false),
    ("v1", "ServiceAccount", "serviceaccounts", true),
    ("v1", "ConfigMap", "configmaps", true),
    ("v1", "Secret", "secrets", true),
    ("v1", "Service", "services", true),
    ("apps/v1", "Deployment", "deployments", true),
    ("rbac.authorization.k8s.io/v1", "Role", "roles", true),
    ("rbac.authorization.k8s.io/v1", "RoleBinding", "rolebindings", true),
    ("rbac.authorization.k8s.io/v1", "ClusterRole", "clusterroles", false),
    ("rbac.authorization.k8s.io/v1", "ClusterRoleBinding", "clusterrolebindings", false),
    ("storage.k8s.io/v1", "StorageClass", "storageclasses", false),
    ("apiregistration.k8s.io/v1", "APIService", "apiservices", false),
    ("networking.k8s.io/v1", "IngressClass", "ingressclasses", false),
];

/// The API path of a manifest object, from its `apiVersion`, `kind`,
/// `metadata.namespace` and `metadata.name`; an error for a kind not in [`KINDS`], a
/// namespaced object without a namespace, or a name that is not a DNS subdomain.
pub fn object_path(obj: &Value) -> Result<String> {
    let (version, kind) = (obj["apiVersion"].as_str().unwrap_or(""), obj["kind"].as_str().unwrap_or(""));
    let &(_, _, plural, namespaced) = KINDS
        .iter()
        .find(|(v, k, _, _)| *v == version && *k == kind)
        .ok_or_else(|| anyhow::anyhow!("no API path known for {version} {kind}"))?;
    let dns = |s: &str| {
        !s.is_empty()
            && s.len() <= 253
            && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.' || b == b':')
    };
    let name = obj["metadata"]["name"].as_str().unwrap_or("");
    anyhow::ensure!(dns(name), "{kind} has no valid name: {name:?}");
    let base = if version.contains('/') { format!("/apis/{version}") } else { format!("/api/{version}") };
    if namespaced {
        let ns = obj["metadata"]["namespace"].as_str().unwrap_or("");
        anyhow::ensure!(dns(ns) && !ns.contains(':'), "{kind} {name} has no valid namespace: {ns:?}");
        Ok(format!("{base}/namespaces/{ns}/{plural}/{name}"))
    } else {
        Ok(format!("{base}/{plural}/{name}"))
    }
}

/// The `message` of a Kubernetes Status body, else its first line.
fn message(body: &str) -> String {
    serde_json::from_str::<Value>(body)
        .ok()
        .and_then(|v| v["message"].as_str().map(|m| first_line(m).to_string()))
        .unwrap_or_else(|| first_line(body).to_string())
}

fn conditions(node: &Value) -> impl Iterator<Item = &Value> {
    node["status"]["conditions"].as_array().into_iter().flatten()
}

/// A condition's `lastHeartbeatTime` (RFC 3339, whole seconds).
fn heartbeat(c: &Value) -> Option<SystemTime> {
    humantime::parse_rfc3339(c["lastHeartbeatTime"].as_str()?).ok()
}

fn node_is_ready(node: &Value, since: SystemTime) -> bool {
    conditions(node).any(|c| c["type"] == "Ready" && c["status"] == "True" && heartbeat(c).is_some_and(|t| t >= since))
}

/// `t` as a heartbeat can show it: heartbeats are whole seconds, so a status posted in
/// the second `t` falls in shows as that second's start.
pub fn whole_second(t: SystemTime) -> SystemTime {
    let secs = t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    UNIX_EPOCH + Duration::from_secs(secs)
}

fn first_line(s: &str) -> &str {
    let line = s.lines().next().unwrap_or("");
    let end = line.char_indices().map(|(i, c)| i + c.len_utf8()).take_while(|&e| e <= 200).last().unwrap_or(0);
    &line[..end]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pki::{NodeIdentity, Pki};

    #[test]
    fn manifest_objects_have_api_paths_and_bad_ones_are_refused() {
        use serde_json::json;
        let p = |v: Value| object_path(&v);
        assert_eq!(
            p(json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "d", "namespace": "n"}}))
                .unwrap(),
            "/apis/apps/v1/namespaces/n/deployments/d"
        );
        assert_eq!(
            p(json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "n"}})).unwrap(),
            "/api/v1/namespaces/n"
        );
        assert_eq!(
            p(json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole", "metadata": {"name": "system:x"}}))
                .unwrap(),
            "/apis/rbac.authorization.k8s.io/v1/clusterroles/system:x"
        );
        let e = p(json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "x", "namespace": "n"}})).unwrap_err();
        assert!(e.to_string().contains("no API path known for v1 Pod"), "{e}");
        let e = p(json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "x"}})).unwrap_err();
        assert!(e.to_string().contains("no valid namespace"), "{e}");
        for bad in ["", "../x", "a/b", "A", "x?y"] {
            assert!(p(json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": bad}})).is_err(), "{bad:?}");
        }
        assert_eq!(message(r#"{"kind":"Status","message":"no way\nmore"}"#), "no way");
        assert_eq!(message("plain\ntext"), "plain");
    }

    #[test]
    fn the_client_loads_the_pki_the_agent_writes() {
        let d = node_pki();
        Api::from_pki(d.path(), LOCAL_SERVER).unwrap();
    }

    #[test]
    fn a_missing_or_damaged_file_is_named() {
        let d = tempfile::tempdir().unwrap();
        let e = Api::from_pki(d.path(), LOCAL_SERVER).err().unwrap();
        assert!(format!("{e:#}").contains("ca.crt"), "{e:#}");
        let d = node_pki();
        std::fs::write(d.path().join("admin.key"), "not a key").unwrap();
        let e = Api::from_pki(d.path(), LOCAL_SERVER).err().unwrap();
        assert!(format!("{e:#}").contains("admin.key"), "{e:#}");
    }

    #[test]
    fn a_node_is_ready_only_with_a_true_ready_condition_posted_since_the_boot() {
        let node = |status: &str, beat: &str| {
            serde_json::json!({"status": {"conditions": [
                {"type": "MemoryPressure", "status": "False", "lastHeartbeatTime": beat},
                {"type": "Ready", "status": status, "lastHeartbeatTime": beat}
            ]}})
        };
        let boot = humantime::parse_rfc3339("2026-12-01T22:34:44Z").unwrap();
        assert!(node_is_ready(&node("True", "2026-12-01T22:34:44Z"), boot));
        assert!(node_is_ready(&node("True", "2026-12-01T22:35:10Z"), boot));
        assert!(!node_is_ready(&node("True", "2026-12-01T22:30:00Z"), boot), "a Ready left from before the restart");
        assert!(!node_is_ready(&node("False", "2026-12-01T22:35:10Z"), boot));
        assert!(!node_is_ready(&node("Unknown", "2026-12-01T22:35:10Z"), boot));
        assert!(!node_is_ready(&node("True", "not a time"), boot));
        assert!(!node_is_ready(&serde_json::json!({"status": {}}), boot));
        let within = boot + Duration::from_millis(700);
        assert_eq!(whole_second(within), boot, "a heartbeat in the kubelet's first second counts");
    }

    #[test]
    fn an_error_body_is_quoted_short() {
        let long = "é".repeat(300);
        assert!(first_line(&long).len() <= 200);
        assert_eq!(first_line("one\ntwo"), "one");
    }

    /// A TLS server with the API server's certificate from `pki` that asks for a client
    /// certificate signed by the CA and answers every request with `status` and `body`
    /// (one connection); returns its URL and, once served, the client's CN was seen.
    fn serve_once(pki: &Path, status: &'static str, body: &'static str) -> (String, std::thread::JoinHandle<bool>) {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        use std::io::{BufRead, BufReader, Write};
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut roots = rustls::RootCertStore::empty();
        roots.add(CertificateDer::from_pem_file(pki.join("ca.crt")).unwrap()).unwrap();
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
            .build()
            .unwrap();
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_client_cert_verifier(verifier)
            .with_single_cert(
                vec![CertificateDer::from_pem_file(pki.join("apiserver.crt")).unwrap()],
                PrivateKeyDer::from_pem_file(pki.join("apiserver.key")).unwrap(),
            )
            .unwrap();
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("https://127.0.0.1:{}", l.local_addr().unwrap().port());
        let t = std::thread::spawn(move || {
            let (tcp, _) = l.accept().unwrap();
            let conn = rustls::ServerConnection::new(Arc::new(config)).unwrap();
            let mut tls = rustls::StreamOwned::new(conn, tcp);
            let mut reader = BufReader::new(&mut tls);
            let mut line = String::new();
            while reader.read_line(&mut line).is_ok_and(|n| n > 2) {
                line.clear();
            }
            let client = tls.conn.peer_certificates().is_some_and(|c| !c.is_empty());
            let reply =
                format!("HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len());
            let _ = tls.write_all(reply.as_bytes());
            let _ = tls.flush();
            tls.conn.send_close_notify();
            let _ = tls.flush();
            client
        });
        (url, t)
    }

    fn node_pki() -> tempfile::TempDir {
        let d = tempfile::tempdir().unwrap();
        let node = NodeIdentity { hostname: "n".into(), addresses: vec![], service_ip: "10.96.0.1".into() };
        Pki::new(d.path()).ensure(&node).unwrap();
        d
    }

    #[test]
    fn polls_speak_tls_with_the_admin_certificate_to_a_server_of_the_cluster_ca() {
        let d = node_pki();
        let (url, served) = serve_once(d.path(), "200 OK", "ok");
        assert!(Api::from_pki(d.path(), &url).unwrap().ready());
        assert!(served.join().unwrap(), "the client presented no certificate");

        let body = r#"{"status": {"availableReplicas": 1}}"#;
        let (url, _) = serve_once(d.path(), "200 OK", body);
        assert_eq!(Api::from_pki(d.path(), &url).unwrap().deployment("kube-system", "coredns").unwrap(), (true, true));
        let (url, _) = serve_once(d.path(), "404 Not Found", "{}");
        assert_eq!(
            Api::from_pki(d.path(), &url).unwrap().deployment("kube-system", "coredns").unwrap(),
            (false, false)
        );
        let pods = r#"{"items": [{"status": {"phase": "Pending"}}, {"status": {"phase": "Running"}}]}"#;
        let (url, _) = serve_once(d.path(), "200 OK", pods);
        assert!(Api::from_pki(d.path(), &url).unwrap().pods_running("kube-system", "k8s-app=kube-dns"));
        let (url, _) = serve_once(d.path(), "200 OK", r#"{"items": [{"status": {"phase": "Pending"}}]}"#);
        assert!(!Api::from_pki(d.path(), &url).unwrap().pods_running("kube-system", "k8s-app=kube-dns"));
        let (url, _) = serve_once(d.path(), "403 Forbidden", "forbidden: nope\nmore");
        let e = Api::from_pki(d.path(), &url).unwrap().pod_phase("default", "p").unwrap_err();
        assert!(format!("{e:#}").contains("HTTP 403: forbidden: nope"), "{e:#}");
        // The OpenAPI document is read to its end and counted, not kept.
        let (url, _) = serve_once(d.path(), "200 OK", "0123456789");
        assert_eq!(Api::from_pki(d.path(), &url).unwrap().openapi("/openapi/v3/api/v1").unwrap(), 10);
        let (url, _) = serve_once(d.path(), "504 Gateway Timeout", "not yet");
        let e = Api::from_pki(d.path(), &url).unwrap().openapi("/openapi/v2").unwrap_err();
        assert!(format!("{e:#}").contains("/openapi/v2: HTTP 504"), "{e:#}");
    }

    #[test]
    fn a_server_of_another_ca_is_not_trusted() {
        let (ours, theirs) = (node_pki(), node_pki());
        let (url, _) = serve_once(theirs.path(), "200 OK", "ok");
        assert!(!Api::from_pki(ours.path(), &url).unwrap().ready());
    }

    #[test]
    fn a_server_that_does_not_answer_is_an_error_not_a_hang() {
        // A port nothing listens on: connection refused at once.
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        drop(l);
        let d = node_pki();
        let api = Api::from_pki(d.path(), &format!("https://127.0.0.1:{port}")).unwrap();
        assert!(!api.ready());
        assert!(api.deployment("kube-system", "coredns").is_err());
    }
}
