//! The add-ons of `kindling_proto::addon`: which the node runs ([`Addons`], from
//! `kindling.addons=` at boot and `{"op":"addon"}` requests after it), their objects, and
//! deploying or removing them. Nothing here runs before node-ready, so an add-on never
//! delays it.
//!
//! Each add-on's objects are generated here, as JSON values (serde_json, so every string,
//! including the files inside a ConfigMap, is quoted correctly), written under
//! /etc/kindling/addons/ with the other configuration files at every boot. After
//! node-ready a thread of its own brings every add-on to what is asked: an enabled one
//! (whose image the root disk's build put in containerd's store, unpacked) is applied
//! object by object with server-side apply through the agent's own API client
//! (`kube.rs`; no kubectl is spawned), then waited for; a disabled one's objects are
//! deleted and waited for until gone, so one disabled while the node was stopped goes
//! at the next boot. The files under /etc/kindling/addons/ are the same manifests, for
//! a person to read or `kubectl apply`.
//! Applying and deleting are idempotent, so every boot does it again. One operation on
//! the add-ons runs at a time ([`Addons::op`]); a request that comes before node-ready is
//! recorded and done by that thread.
//!
//! Removing takes away exactly what the manifest holds (namespace, RBAC, ConfigMap,
//! Deployment, StorageClass). The storage add-on's PersistentVolumes are not in it: they
//! stay, bound, and so does their data under [`STORAGE_DIR`] (as minikube keeps it); a
//! pod can still mount them, a new claim waits until the add-on is back, and a claim
//! deleted meanwhile leaves its volume until the provisioner returns and removes it.
//!
//! storage-provisioner: Rancher's local-path-provisioner in `local-path-storage`, and
//! the default StorageClass `standard`. A volume is a directory under [`STORAGE_DIR`]
//! on the node's root disk, which is the cluster's own disk and survives stop and
//! start; the provisioner's helper pods (busybox, preloaded) create and remove them.
//!
//! metrics-server: upstream's manifests (v0.8.0) in `kube-system`, verified TLS both
//! ways and nothing insecure. It scrapes each kubelet checking the kubelet's serving
//! certificate against the cluster CA (which signs it, `pki.rs`), not with
//! `--kubelet-insecure-tls`; it serves with a certificate from the cluster CA (a
//! Secret in its manifest, so the manifest file is 0600), and its APIService carries
//! that CA as `caBundle` instead of upstream's `insecureSkipTLSVerify`. The API server
//! reaches it through the aggregation layer (`node.rs`: `--requestheader-*`,
//! `--proxy-client-*`). Disabling it deletes its APIService first of all (the manifest's
//! order), so `metrics.k8s.io` goes with it rather than answering 503.
//!
//! ingress: Traefik (v3.6) as the Ingress controller in `ingress`, with the default
//! IngressClass `traefik` and a LoadBalancer Service, so `loadbalancer.rs` puts its ports
//! 80 and 443 on the host's loopback as 8080 and 8443 ([`ingress_manifest`]).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::Result;
use kindling_proto::addon::{self, AddonState};
use serde_json::{json, Value};

use crate::kube::Api;
use crate::paths::{versions, Paths};
use crate::phase;
use crate::pki::Pki;
use crate::supervisor::Reaper;

pub use kindling_proto::addon::{INGRESS, INGRESS_NAMESPACE, INGRESS_SERVICE, METRICS_SERVER, STORAGE_PROVISIONER};

/// Where local-path volumes live on the node: on the root disk (not a tmpfs).
pub const STORAGE_DIR: &str = "/var/lib/kindling/storage";
pub const STORAGE_NAMESPACE: &str = "local-path-storage";
pub const STORAGE_CLASS: &str = "standard";
pub const STORAGE_PROVISIONER_NAME: &str = "rancher.io/local-path";
const STORAGE_SA: &str = "local-path-provisioner-service-account";
const STORAGE_DEPLOYMENT: &str = "local-path-provisioner";
const METRICS_NAMESPACE: &str = "kube-system";
const METRICS_NAME: &str = "metrics-server";
const METRICS_TLS_SECRET: &str = "metrics-server-tls";
/// Where metrics-server's port is (in its pod; upstream's choice).
const METRICS_PORT: u16 = 10250;
/// The IngressClass the ingress add-on serves (the cluster's default one).
pub const INGRESS_CLASS: &str = "traefik";
/// Traefik's entry points in its pod (unprivileged: it runs as 65532), which the
/// Service's ports 80 and 443 lead to, and its own one for `/ping`.
const INGRESS_WEB_PORT: u16 = 8000;
const INGRESS_WEBSECURE_PORT: u16 = 8443;
const INGRESS_PING_PORT: u16 = 8080;

/// How long the agent keeps trying to apply an add-on, and then waits for it to be
/// available, before it says so on the console and gives up (until the next boot).
const APPLY_LIMIT: Duration = Duration::from_secs(15 * 60);
const READY_LIMIT: Duration = Duration::from_secs(20 * 60);
/// How long a removal waits for its objects to be gone (a namespace's contents first).
const DELETE_LIMIT: Duration = Duration::from_secs(10 * 60);
/// How long an `{"op":"addon"}` request keeps retrying a failing apply or delete.
const REQUEST_LIMIT: Duration = Duration::from_secs(3 * 60);

/// The images the add-ons run, from /etc/kindling/versions.env (the oci step's names).
#[derive(Clone, Debug)]
pub struct Images {
    pub provisioner: String,
    pub busybox: String,
    pub metrics_server: String,
    pub traefik: String,
}

impl Images {
    pub fn from_versions(paths: &Paths) -> Self {
        let v = versions(paths);
        let get = |k: &str, default: &str| v.get(k).cloned().unwrap_or_else(|| default.to_string());
        Self {
            provisioner: get("LOCAL_PATH_PROVISIONER_IMAGE", "kindling.local/local-path-provisioner:v0.0.30"),
            busybox: get("BUSYBOX_IMAGE", "kindling.local/busybox:1.35"),
            metrics_server: get("METRICS_SERVER_IMAGE", "kindling.local/metrics-server:v0.8.0"),
            traefik: get("TRAEFIK_IMAGE", "kindling.local/traefik:v3.6.12"),
        }
    }
}

/// What the manifests are made of: the images, and the PEM files of the node's PKI that
/// an add-on serves with (metrics-server's certificate and key, and the cluster CA that
/// clients verify it with).
#[derive(Clone, Debug)]
pub struct Inputs {
    pub images: Images,
    pub ca_crt: String,
    pub metrics_crt: String,
    pub metrics_key: String,
}

impl Inputs {
    /// From versions.env and the node's PKI (which bring-up has made by then).
    pub fn read(paths: &Paths) -> Result<Self> {
        let pki = Pki::new(paths.pki());
        let pem = |f: &str| {
            let path = pki.path(f);
            std::fs::read_to_string(&path).map_err(|e| anyhow::anyhow!("reading {}: {e}", path.display()))
        };
        Ok(Self {
            images: Images::from_versions(paths),
            ca_crt: pem("ca.crt")?,
            metrics_crt: pem("metrics-server.crt")?,
            metrics_key: pem("metrics-server.key")?,
        })
    }
}

/// How the agent runs one add-on of the catalogue.
struct Deployable {
    name: &'static str,
    /// Its Deployment, whose availability says it runs.
    namespace: &'static str,
    deployment: &'static str,
    /// The image it runs (in containerd's store from the root disk's build on).
    image: fn(&Images) -> String,
    manifest: fn(&Inputs) -> Value,
    /// What the console says once it runs.
    ready_note: &'static str,
}

const DEPLOYABLE: &[Deployable] = &[
    Deployable {
        name: STORAGE_PROVISIONER,
        namespace: STORAGE_NAMESPACE,
        deployment: STORAGE_DEPLOYMENT,
        image: |i| i.provisioner.clone(),
        manifest: |i| storage_manifest(&i.images),
        ready_note: "StorageClass standard, volumes in /var/lib/kindling/storage",
    },
    Deployable {
        name: METRICS_SERVER,
        namespace: METRICS_NAMESPACE,
        deployment: METRICS_NAME,
        image: |i| i.metrics_server.clone(),
        manifest: metrics_manifest,
        ready_note: "metrics.k8s.io served: `kubectl top` answers once it has scraped the kubelet",
    },
    Deployable {
        name: INGRESS,
        namespace: INGRESS_NAMESPACE,
        deployment: INGRESS_SERVICE,
        image: |i| i.traefik.clone(),
        manifest: |i| ingress_manifest(&i.images),
        ready_note: "IngressClass traefik (the default); `kindling ingress --url` prints its host URLs",
    },
];

fn deployable(name: &str) -> Option<&'static Deployable> {
    DEPLOYABLE.iter().find(|d| d.name == name)
}

/// The add-on's manifest file on the node.
pub fn manifest_path(paths: &Paths, addon: &str) -> PathBuf {
    paths.config().join("addons").join(format!("{addon}.json"))
}

/// Writes every add-on's manifest (one `List` each), enabled or not: removing one
/// deletes what its manifest names. Mode 0600: metrics-server's holds its key.
pub fn write_manifests(paths: &Paths) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let inputs = Inputs::read(paths)?;
    for d in DEPLOYABLE {
        let path = manifest_path(paths, d.name);
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
        }
        let text = serde_json::to_string_pretty(&(d.manifest)(&inputs))?;
        let write = || -> std::io::Result<()> {
            let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&path)?;
            f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
            f.write_all(text.as_bytes())
        };
        write().map_err(|e| anyhow::anyhow!("writing {}: {e}", path.display()))?;
    }
    Ok(())
}

/// The add-ons `kindling.addons=` names (`None`: the parameter is absent, so each
/// add-on's default); names this agent does not know are said on the console and skipped.
pub fn enabled_at_boot(param: Option<&str>) -> BTreeMap<&'static str, bool> {
    let named: Option<Vec<&str>> = param.map(|v| v.split(',').map(str::trim).filter(|n| !n.is_empty()).collect());
    if let Some(names) = &named {
        for n in names.iter().filter(|n| deployable(n).is_none()) {
            phase::log(format!("kindling.addons: no add-on named {n:?} in this node image; skipped"));
        }
    }
    addon::ALL
        .iter()
        .filter(|a| deployable(a.name).is_some())
        .map(|a| (a.name, named.as_ref().map_or(a.default_on, |n| n.contains(&a.name))))
        .collect()
}

/// Which add-ons the node runs, and the one operation on them at a time.
pub struct Addons {
    paths: Paths,
    reaper: Arc<Reaper>,
    wanted: Mutex<BTreeMap<&'static str, bool>>,
    /// Node-ready was reached: requests act at once (before, the boot thread does).
    ready: AtomicBool,
    /// Held while an add-on is applied or deleted.
    op: Mutex<()>,
    /// The API client for polls, made on first use (the PKI exists from bring-up on).
    api: OnceLock<Api>,
}

/// How far an add-on got when it was enabled or disabled.
#[derive(Debug, PartialEq, Eq)]
enum Done {
    Applied,
    Removed,
}

impl Addons {
    pub fn new(paths: Paths, reaper: Arc<Reaper>, wanted: BTreeMap<&'static str, bool>) -> Arc<Self> {
        Arc::new(Self {
            paths,
            reaper,
            wanted: Mutex::new(wanted),
            ready: AtomicBool::new(false),
            op: Mutex::new(()),
            api: OnceLock::new(),
        })
    }

    fn wanted(&self, name: &str) -> bool {
        self.wanted.lock().unwrap_or_else(|e| e.into_inner()).get(name).copied().unwrap_or(false)
    }

    /// Brings `d` to what is wanted now (one attempt): applies it (its image must be in
    /// containerd's store), or deletes its objects.
    fn reconcile(&self, d: &Deployable) -> Result<Done> {
        let _op = self.op.lock().unwrap_or_else(|e| e.into_inner());
        let inputs = Inputs::read(&self.paths)?;
        let manifest = (d.manifest)(&inputs);
        let items = manifest["items"].as_array().cloned().unwrap_or_default();
        let api = self.api()?;
        if self.wanted(d.name) {
            let (ctr, sock) = (self.paths.bin("ctr"), self.paths.containerd_socket().display().to_string());
            let image = (d.image)(&inputs.images);
            let (_, have) = self.reaper.run(&[&ctr, "--address", &sock, "-n", "k8s.io", "images", "ls", "-q"])?;
            anyhow::ensure!(
                crate::images::missing(std::slice::from_ref(&image), &have).is_empty(),
                "its image {image} is not in containerd's store (the root disk's build puts it there); \
                 `kindling image load ARCHIVE` can load it"
            );
            // Our own manifests, checked by unit tests, applied in their order.
            for item in &items {
                api.apply(item)?;
            }
            Ok(Done::Applied)
        } else {
            for item in &items {
                api.delete(item)?;
            }
            // As `kubectl delete --wait`: done when every object is gone (a namespace
            // once its contents are).
            let t0 = Instant::now();
            while let Some(left) = items.iter().find(|i| api.exists(i).unwrap_or(true)) {
                anyhow::ensure!(
                    t0.elapsed() < DELETE_LIMIT,
                    "{} {} is still there {}s after its deletion",
                    left["kind"].as_str().unwrap_or("?"),
                    left["metadata"]["name"].as_str().unwrap_or("?"),
                    t0.elapsed().as_secs()
                );
                std::thread::sleep(Duration::from_secs(1));
            }
            Ok(Done::Removed)
        }
    }

    /// [`Self::reconcile`] again every 2 s while it fails, for up to `limit` from `t0`;
    /// `say` gets the first failure.
    fn reconcile_patiently(
        &self,
        d: &Deployable,
        t0: Instant,
        limit: Duration,
        say: &mut dyn FnMut(&str),
    ) -> Result<Done> {
        for attempt in 1.. {
            let last = match self.reconcile(d) {
                Ok(done) => return Ok(done),
                Err(e) => format!("{e:#}"),
            };
            if attempt == 1 {
                say(&format!("add-on {}: {last}; retrying every 2s", d.name));
            }
            anyhow::ensure!(
                t0.elapsed() < limit,
                "still failing after {}s ({last}); it is done again at the next boot",
                t0.elapsed().as_secs()
            );
            std::thread::sleep(Duration::from_secs(2));
        }
        unreachable!("the loop returns")
    }

    fn api(&self) -> Result<&Api> {
        if let Some(api) = self.api.get() {
            return Ok(api);
        }
        let api = Api::from_pki(&self.paths.pki(), crate::kube::LOCAL_SERVER)?;
        Ok(self.api.get_or_init(|| api))
    }

    /// Whether `d`'s Deployment exists, and whether it has an available replica; None
    /// when the API server does not answer.
    fn deployment(&self, d: &Deployable) -> Option<(bool, bool)> {
        self.api().and_then(|api| api.deployment(d.namespace, d.deployment)).ok()
    }

    /// Waits (bounded) for `d` to run, while it is still wanted; says when it does.
    fn wait_running(&self, d: &Deployable, t0: Instant, since: &str) {
        while self.wanted(d.name) {
            if let Some((_, true)) = self.deployment(d) {
                phase::log(format!(
                    "add-on {}: ready {:.1}s after {since} ({})",
                    d.name,
                    t0.elapsed().as_secs_f64(),
                    d.ready_note
                ));
                return;
            }
            if t0.elapsed() > READY_LIMIT {
                phase::log(format!(
                    "add-on {}: deployment {}/{} is not available after {}s; see `kubectl -n {} describe pods`",
                    d.name,
                    d.namespace,
                    d.deployment,
                    t0.elapsed().as_secs(),
                    d.namespace
                ));
                return;
            }
            std::thread::sleep(Duration::from_secs(2));
        }
    }

    /// After node-ready: brings every add-on to what is wanted, in a thread of its own,
    /// with the time each took on the console (counted from node-ready).
    pub fn deploy_after_ready(self: &Arc<Self>) {
        self.ready.store(true, Ordering::SeqCst);
        let this = self.clone();
        std::thread::spawn(move || {
            let t0 = Instant::now();
            let mut waits = Vec::new();
            for d in DEPLOYABLE {
                match this.reconcile_patiently(d, t0, APPLY_LIMIT, &mut |s| phase::log(s)) {
                    Ok(Done::Applied) => {
                        phase::log(format!(
                            "add-on {}: applied {:.1}s after node-ready",
                            d.name,
                            t0.elapsed().as_secs_f64()
                        ));
                        waits.push(d);
                    }
                    Ok(Done::Removed) => {
                        phase::log(format!("add-on {}: disabled; its objects are not in the cluster", d.name))
                    }
                    Err(e) => phase::log(format!("add-on {}: {e:#}", d.name)),
                }
            }
            for d in waits {
                this.wait_running(d, t0, "node-ready");
            }
        });
    }

    /// `{"op":"addon"}`: enables or disables `name` now (before node-ready: records it
    /// for the boot thread); progress goes to `say`. An error says why it was not done.
    pub fn set(self: &Arc<Self>, name: &str, enable: bool, say: &mut dyn FnMut(&str)) -> Result<()> {
        let d = deployable(name).ok_or_else(|| {
            let known: Vec<&str> = DEPLOYABLE.iter().map(|d| d.name).collect();
            anyhow::anyhow!("no add-on named {name:?} in this node image; it has {}", known.join(", "))
        })?;
        self.wanted.lock().unwrap_or_else(|e| e.into_inner()).insert(d.name, enable);
        let verb = if enable { "enabled" } else { "disabled" };
        phase::log(format!("add-on {name}: {verb} by request"));
        if !self.ready.load(Ordering::SeqCst) {
            say(&format!("the node is not Ready yet: {name} is {verb} once it is (after node-ready)"));
            return Ok(());
        }
        let t0 = Instant::now();
        say(&format!("{} {name}", if enable { "applying" } else { "removing" }));
        match self.reconcile_patiently(d, t0, REQUEST_LIMIT, say)? {
            Done::Applied => {
                say(&format!("applied {name} in {:.1}s", t0.elapsed().as_secs_f64()));
                let this = self.clone();
                std::thread::spawn(move || this.wait_running(d, t0, "it was enabled"));
            }
            Done::Removed => say(&format!("removed {name} in {:.1}s", t0.elapsed().as_secs_f64())),
        }
        Ok(())
    }

    /// `{"op":"addons"}`: every add-on's state.
    pub fn states(&self) -> Vec<AddonState> {
        let ready = self.ready.load(Ordering::SeqCst);
        DEPLOYABLE
            .iter()
            .map(|d| {
                let dep = if ready { self.deployment(d) } else { None };
                AddonState {
                    name: d.name.to_string(),
                    enabled: self.wanted(d.name),
                    deployed: dep.map(|(e, _)| e),
                    running: dep.map(|(_, r)| r),
                }
            })
            .collect()
    }
}

/// The provisioner's configuration: every node keeps its volumes in [`STORAGE_DIR`].
fn provisioner_config() -> Value {
    json!({"nodePathMap": [{"node": "DEFAULT_PATH_FOR_NON_LISTED_NODES", "paths": [STORAGE_DIR]}]})
}

/// The helper pod the provisioner starts on the node to create or remove a volume's
/// directory (it adds the command, the volumes and the node itself). Preloaded busybox,
/// never pulled.
fn helper_pod(busybox: &str) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "helper-pod"},
        "spec": {
            "priorityClassName": "system-node-critical",
            "tolerations": [{"key": "node.kubernetes.io/disk-pressure", "operator": "Exists", "effect": "NoSchedule"}],
            "containers": [{"name": "helper-pod", "image": busybox, "imagePullPolicy": "IfNotPresent"}]
        }
    })
}

/// The security context of an add-on's container that needs no privilege: user and
/// group 65532 (upstream's nonroot), no capabilities, no privilege escalation, a
/// read-only root filesystem, seccomp's RuntimeDefault profile.
fn unprivileged() -> Value {
    json!({
        "readOnlyRootFilesystem": true,
        "runAsNonRoot": true,
        "runAsUser": 65532,
        "runAsGroup": 65532,
        "allowPrivilegeEscalation": false,
        "seccompProfile": {"type": "RuntimeDefault"},
        "capabilities": {"drop": ["ALL"]}
    })
}

/// An RBAC (Cluster)RoleBinding of `role` to `subjects`.
fn binding(kind: &str, metadata: Value, role_kind: &str, role: &str, subjects: &Value) -> Value {
    json!({
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": kind, "metadata": metadata,
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": role_kind, "name": role},
        "subjects": subjects
    })
}

/// Upstream's deploy/local-path-storage.yaml (v0.0.30), with kindling's images, path
/// and StorageClass.
pub fn storage_manifest(images: &Images) -> Value {
    let ns = STORAGE_NAMESPACE;
    let role = "local-path-provisioner-role";
    let bind = "local-path-provisioner-bind";
    let sa_subject = json!([{"kind": "ServiceAccount", "name": STORAGE_SA, "namespace": ns}]);
    let items = vec![
        json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}}),
        json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": STORAGE_SA, "namespace": ns}}),
        json!({
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
            "metadata": {"name": role, "namespace": ns},
            "rules": [{"apiGroups": [""], "resources": ["pods"],
                       "verbs": ["get", "list", "watch", "create", "patch", "update", "delete"]}]
        }),
        json!({
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
            "metadata": {"name": role},
            "rules": [
                {"apiGroups": [""], "resources": ["nodes", "persistentvolumeclaims", "configmaps", "pods", "pods/log"],
                 "verbs": ["get", "list", "watch"]},
                {"apiGroups": [""], "resources": ["persistentvolumes"],
                 "verbs": ["get", "list", "watch", "create", "patch", "update", "delete"]},
                {"apiGroups": [""], "resources": ["events"], "verbs": ["create", "patch"]},
                {"apiGroups": ["storage.k8s.io"], "resources": ["storageclasses"], "verbs": ["get", "list", "watch"]}
            ]
        }),
        binding("RoleBinding", json!({"name": bind, "namespace": ns}), "Role", role, &sa_subject),
        binding("ClusterRoleBinding", json!({"name": bind}), "ClusterRole", role, &sa_subject),
        json!({
            "apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": "local-path-config", "namespace": ns},
            "data": {
                "config.json": serde_json::to_string_pretty(&provisioner_config()).expect("serializable"),
                "setup": "#!/bin/sh\nset -eu\nmkdir -m 0777 -p \"$VOL_DIR\"\n",
                "teardown": "#!/bin/sh\nset -eu\nrm -rf \"$VOL_DIR\"\n",
                "helperPod.yaml": serde_json::to_string_pretty(&helper_pod(&images.busybox)).expect("serializable")
            }
        }),
        json!({
            "apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": STORAGE_DEPLOYMENT, "namespace": ns, "labels": {"app": STORAGE_DEPLOYMENT}},
            "spec": {
                "replicas": 1,
                "selector": {"matchLabels": {"app": STORAGE_DEPLOYMENT}},
                "template": {
                    "metadata": {"labels": {"app": STORAGE_DEPLOYMENT}},
                    "spec": {
                        "serviceAccountName": STORAGE_SA,
                        "priorityClassName": "system-node-critical",
                        "tolerations": [
                            {"key": "CriticalAddonsOnly", "operator": "Exists"},
                            {"key": "node-role.kubernetes.io/control-plane", "effect": "NoSchedule"}
                        ],
                        "containers": [{
                            "name": STORAGE_DEPLOYMENT,
                            "image": images.provisioner,
                            "imagePullPolicy": "IfNotPresent",
                            "command": ["local-path-provisioner", "--debug", "start",
                                        "--config", "/etc/config/config.json",
                                        "--helper-image", images.busybox,
                                        "--provisioner-name", STORAGE_PROVISIONER_NAME],
                            "volumeMounts": [{"name": "config-volume", "mountPath": "/etc/config/"}],
                            "env": [
                                {"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
                                {"name": "CONFIG_MOUNT_PATH", "value": "/etc/config/"}
                            ]
                        }],
                        "volumes": [{"name": "config-volume", "configMap": {"name": "local-path-config"}}]
                    }
                }
            }
        }),
        json!({
            "apiVersion": "storage.k8s.io/v1", "kind": "StorageClass",
            "metadata": {
                "name": STORAGE_CLASS,
                "annotations": {"storageclass.kubernetes.io/is-default-class": "true"}
            },
            "provisioner": STORAGE_PROVISIONER_NAME,
            "volumeBindingMode": "WaitForFirstConsumer",
            "reclaimPolicy": "Delete"
        }),
    ];
    json!({"apiVersion": "v1", "kind": "List", "items": items})
}

/// Upstream's manifests/base (v0.8.0) with kindling's image, verified TLS both ways
/// (see the module's notes), and probes patient enough for a node under emulation. The
/// APIService comes first: a delete removes the API before its server.
pub fn metrics_manifest(inputs: &Inputs) -> Value {
    use base64::Engine;
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s.as_bytes());
    let (ns, name) = (METRICS_NAMESPACE, METRICS_NAME);
    let labels = json!({"k8s-app": name});
    let sa_subject = json!([{"kind": "ServiceAccount", "name": name, "namespace": ns}]);
    let tls_dir = "/etc/metrics-server/tls";
    let probe = |path: &str, initial: u32, failures: u32| {
        json!({
            "httpGet": {"path": path, "port": "https", "scheme": "HTTPS"},
            "initialDelaySeconds": initial, "periodSeconds": 10, "timeoutSeconds": 5,
            "failureThreshold": failures
        })
    };
    let items = vec![
        json!({
            "apiVersion": "apiregistration.k8s.io/v1", "kind": "APIService",
            "metadata": {"name": "v1beta1.metrics.k8s.io", "labels": labels},
            "spec": {
                "service": {"name": name, "namespace": ns, "port": 443},
                "group": "metrics.k8s.io", "version": "v1beta1",
                "caBundle": b64(&inputs.ca_crt),
                "groupPriorityMinimum": 100, "versionPriority": 100
            }
        }),
        json!({
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
            "metadata": {"name": "system:aggregated-metrics-reader", "labels": {
                "k8s-app": name,
                "rbac.authorization.k8s.io/aggregate-to-view": "true",
                "rbac.authorization.k8s.io/aggregate-to-edit": "true",
                "rbac.authorization.k8s.io/aggregate-to-admin": "true"
            }},
            "rules": [{"apiGroups": ["metrics.k8s.io"], "resources": ["pods", "nodes"], "verbs": ["get", "list", "watch"]}]
        }),
        json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": name, "namespace": ns, "labels": labels}}),
        binding(
            "RoleBinding",
            json!({"name": "metrics-server-auth-reader", "namespace": ns, "labels": labels}),
            "Role",
            "extension-apiserver-authentication-reader",
            &sa_subject,
        ),
        binding(
            "ClusterRoleBinding",
            json!({"name": "metrics-server:system:auth-delegator", "labels": labels}),
            "ClusterRole",
            "system:auth-delegator",
            &sa_subject,
        ),
        json!({
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
            "metadata": {"name": "system:metrics-server", "labels": labels},
            "rules": [
                {"apiGroups": [""], "resources": ["nodes/metrics"], "verbs": ["get"]},
                {"apiGroups": [""], "resources": ["pods", "nodes"], "verbs": ["get", "list", "watch"]}
            ]
        }),
        binding(
            "ClusterRoleBinding",
            json!({"name": "system:metrics-server", "labels": labels}),
            "ClusterRole",
            "system:metrics-server",
            &sa_subject,
        ),
        json!({
            "apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/tls",
            "metadata": {"name": METRICS_TLS_SECRET, "namespace": ns, "labels": labels},
            "data": {
                "tls.crt": b64(&inputs.metrics_crt),
                "tls.key": b64(&inputs.metrics_key),
                "ca.crt": b64(&inputs.ca_crt)
            }
        }),
        json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": name, "namespace": ns, "labels": labels},
            "spec": {
                "selector": labels,
                "ports": [{"name": "https", "port": 443, "protocol": "TCP", "targetPort": "https", "appProtocol": "https"}]
            }
        }),
        json!({
            "apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": name, "namespace": ns, "labels": labels},
            "spec": {
                "replicas": 1,
                "selector": {"matchLabels": labels},
                "strategy": {"rollingUpdate": {"maxUnavailable": 0}},
                "template": {
                    "metadata": {"labels": labels},
                    "spec": {
                        "serviceAccountName": name,
                        "priorityClassName": "system-cluster-critical",
                        "nodeSelector": {"kubernetes.io/os": "linux"},
                        "containers": [{
                            "name": name,
                            "image": inputs.images.metrics_server,
                            "imagePullPolicy": "IfNotPresent",
                            "args": [
                                "--cert-dir=/tmp",
                                format!("--secure-port={METRICS_PORT}"),
                                format!("--tls-cert-file={tls_dir}/tls.crt"),
                                format!("--tls-private-key-file={tls_dir}/tls.key"),
                                // The kubelet's serving certificate is the cluster CA's.
                                format!("--kubelet-certificate-authority={tls_dir}/ca.crt"),
                                "--kubelet-preferred-address-types=InternalIP,Hostname",
                                "--kubelet-use-node-status-port",
                                "--metric-resolution=15s"
                            ],
                            "ports": [{"name": "https", "containerPort": METRICS_PORT, "protocol": "TCP"}],
                            "resources": {"requests": {"cpu": "100m", "memory": "200Mi"}},
                            // Upstream's, with room for a first start on one emulated vCPU.
                            "readinessProbe": probe("/readyz", 10, 3),
                            "livenessProbe": probe("/livez", 120, 6),
                            "securityContext": unprivileged(),
                            "volumeMounts": [
                                {"name": "tmp-dir", "mountPath": "/tmp"},
                                {"name": "tls", "mountPath": tls_dir, "readOnly": true}
                            ]
                        }],
                        "volumes": [
                            {"name": "tmp-dir", "emptyDir": {}},
                            {"name": "tls", "secret": {"secretName": METRICS_TLS_SECRET, "defaultMode": 0o440}}
                        ],
                        "securityContext": {"fsGroup": 65532}
                    }
                }
            }
        }),
    ];
    json!({"apiVersion": "v1", "kind": "List", "items": items})
}

/// Traefik as the Ingress controller, from its documentation's Kubernetes Ingress
/// provider setup (RBAC of v3.1 and later: EndpointSlices and Nodes), in namespace
/// `ingress`: the default IngressClass `traefik`, and a LoadBalancer Service whose ports
/// 80 and 443 the node's LoadBalancer controller puts on the host's loopback (shifted to
/// 8080 and 8443, `kindling_proto::forward::host_port_for_service`). Each Ingress gets
/// that address in its status (`publishedService`). Nothing is pulled, no version check
/// or usage report goes out, the pod runs as 65532 without capabilities on a read-only
/// root filesystem; HTTPS on 443 uses Traefik's own default certificate unless an
/// Ingress names a TLS Secret.
pub fn ingress_manifest(images: &Images) -> Value {
    let (ns, name) = (INGRESS_NAMESPACE, INGRESS_SERVICE);
    let labels = json!({"app.kubernetes.io/name": name, "app.kubernetes.io/instance": "kindling-ingress"});
    let sa_subject = json!([{"kind": "ServiceAccount", "name": name, "namespace": ns}]);
    let read = json!(["get", "list", "watch"]);
    let probe = |initial: u32, failures: u32| {
        json!({
            "httpGet": {"path": "/ping", "port": "traefik", "scheme": "HTTP"},
            "initialDelaySeconds": initial, "periodSeconds": 10, "timeoutSeconds": 5,
            "failureThreshold": failures
        })
    };
    let items = vec![
        json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}}),
        json!({
            "apiVersion": "networking.k8s.io/v1", "kind": "IngressClass",
            "metadata": {"name": INGRESS_CLASS, "labels": labels,
                         "annotations": {"ingressclass.kubernetes.io/is-default-class": "true"}},
            "spec": {"controller": "traefik.io/ingress-controller"}
        }),
        json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": name, "namespace": ns, "labels": labels}}),
        json!({
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
            "metadata": {"name": "kindling-ingress-traefik", "labels": labels},
            "rules": [
                {"apiGroups": [""], "resources": ["services", "secrets", "nodes"], "verbs": read},
                {"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"], "verbs": ["list", "watch"]},
                {"apiGroups": ["networking.k8s.io"], "resources": ["ingresses", "ingressclasses"], "verbs": read},
                {"apiGroups": ["networking.k8s.io"], "resources": ["ingresses/status"], "verbs": ["update"]}
            ]
        }),
        binding(
            "ClusterRoleBinding",
            json!({"name": "kindling-ingress-traefik", "labels": labels}),
            "ClusterRole",
            "kindling-ingress-traefik",
            &sa_subject,
        ),
        json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": name, "namespace": ns, "labels": labels},
            "spec": {
                "type": "LoadBalancer",
                "selector": labels,
                "ports": [
                    {"name": "web", "port": 80, "protocol": "TCP", "targetPort": "web"},
                    {"name": "websecure", "port": 443, "protocol": "TCP", "targetPort": "websecure"}
                ]
            }
        }),
        json!({
            "apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": name, "namespace": ns, "labels": labels},
            "spec": {
                "replicas": 1,
                "selector": {"matchLabels": labels},
                "template": {
                    "metadata": {"labels": labels},
                    "spec": {
                        "serviceAccountName": name,
                        "priorityClassName": "system-cluster-critical",
                        "terminationGracePeriodSeconds": 30,
                        "containers": [{
                            "name": name,
                            "image": images.traefik,
                            "imagePullPolicy": "IfNotPresent",
                            "args": [
                                format!("--entryPoints.web.address=:{INGRESS_WEB_PORT}"),
                                format!("--entryPoints.websecure.address=:{INGRESS_WEBSECURE_PORT}"),
                                "--entryPoints.websecure.http.tls=true",
                                format!("--entryPoints.traefik.address=:{INGRESS_PING_PORT}"),
                                "--ping=true",
                                "--providers.kubernetesingress=true",
                                format!("--providers.kubernetesingress.ingressendpoint.publishedservice={ns}/{name}"),
                                "--global.checkNewVersion=false",
                                "--global.sendAnonymousUsage=false",
                                "--log.level=INFO"
                            ],
                            "ports": [
                                {"name": "web", "containerPort": INGRESS_WEB_PORT, "protocol": "TCP"},
                                {"name": "websecure", "containerPort": INGRESS_WEBSECURE_PORT, "protocol": "TCP"},
                                {"name": "traefik", "containerPort": INGRESS_PING_PORT, "protocol": "TCP"}
                            ],
                            "resources": {"requests": {"cpu": "100m", "memory": "50Mi"}},
                            // Room for a first start on one emulated vCPU.
                            "readinessProbe": probe(2, 3),
                            "livenessProbe": probe(120, 6),
                            "securityContext": unprivileged(),
                            "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}]
                        }],
                        "volumes": [{"name": "tmp", "emptyDir": {}}]
                    }
                }
            }
        }),
    ];
    json!({"apiVersion": "v1", "kind": "List", "items": items})
}

#[cfg(test)]
mod tests {
    use super::*;

    fn images() -> Images {
        Images {
            provisioner: "kindling.local/local-path-provisioner:v9".into(),
            busybox: "kindling.local/busybox:1.2".into(),
            metrics_server: "kindling.local/metrics-server:v8".into(),
            traefik: "kindling.local/traefik:v3".into(),
        }
    }

    /// A node's PKI in `paths`, as bring-up makes it.
    fn make_pki(paths: &Paths) {
        let node = crate::pki::NodeIdentity {
            hostname: "kindling".into(),
            addresses: vec!["10.0.2.15".into()],
            service_ip: "10.96.0.1".into(),
        };
        Pki::new(paths.pki()).ensure(&node).unwrap();
    }

    fn item<'a>(list: &'a Value, kind: &str) -> &'a Value {
        list["items"].as_array().unwrap().iter().find(|i| i["kind"] == kind).unwrap_or_else(|| panic!("no {kind}"))
    }

    /// The ingress add-on: the default IngressClass is Traefik's; its Service is a
    /// LoadBalancer whose ports 80 and 443 lead to Traefik's entry points; Ingress status
    /// shows that Service's address; nothing is pulled and no call goes out; the pod has
    /// no privilege; every namespaced object is in `ingress`.
    #[test]
    fn ingress_is_traefik_behind_a_load_balancer() {
        let m = ingress_manifest(&images());
        let class = item(&m, "IngressClass");
        assert_eq!(class["metadata"]["name"], INGRESS_CLASS);
        assert_eq!(class["metadata"]["annotations"]["ingressclass.kubernetes.io/is-default-class"], "true");
        assert_eq!(class["spec"]["controller"], "traefik.io/ingress-controller");
        let svc = item(&m, "Service");
        assert_eq!(
            (svc["metadata"]["name"].as_str(), svc["spec"]["type"].as_str()),
            (Some("traefik"), Some("LoadBalancer"))
        );
        let ports: Vec<(u64, &str)> = svc["spec"]["ports"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| (p["port"].as_u64().unwrap(), p["targetPort"].as_str().unwrap()))
            .collect();
        assert_eq!(ports, [(80, "web"), (443, "websecure")]);
        for p in [80, 443] {
            assert!(kindling_proto::forward::host_port_for_service(p).is_some(), "port {p} reaches the host");
        }
        let spec = &item(&m, "Deployment")["spec"]["template"]["spec"];
        let c = &spec["containers"][0];
        assert_eq!(
            (c["image"].as_str(), c["imagePullPolicy"].as_str()),
            (Some("kindling.local/traefik:v3"), Some("IfNotPresent"))
        );
        let named: Vec<&str> = c["ports"].as_array().unwrap().iter().map(|p| p["name"].as_str().unwrap()).collect();
        assert!(named.contains(&"web") && named.contains(&"websecure") && named.contains(&"traefik"), "{named:?}");
        let args: Vec<&str> = c["args"].as_array().unwrap().iter().map(|a| a.as_str().unwrap()).collect();
        for want in [
            "--providers.kubernetesingress=true",
            "--providers.kubernetesingress.ingressendpoint.publishedservice=ingress/traefik",
            "--global.checkNewVersion=false",
            "--global.sendAnonymousUsage=false",
            "--entryPoints.web.address=:8000",
        ] {
            assert!(args.contains(&want), "{want} missing from {args:?}");
        }
        assert_eq!(c["securityContext"]["capabilities"]["drop"][0], "ALL");
        assert_eq!(c["securityContext"]["runAsNonRoot"], true);
        let rules = item(&m, "ClusterRole")["rules"].to_string();
        assert!(rules.contains("endpointslices") && rules.contains("ingresses/status"), "{rules}");
        assert!(
            !rules.contains("\"create\"") && !rules.contains("\"delete\""),
            "read-only but for Ingress status: {rules}"
        );
        for i in m["items"].as_array().unwrap() {
            if let Some(ns) = i["metadata"]["namespace"].as_str() {
                assert_eq!(ns, INGRESS_NAMESPACE, "{i}");
            }
        }
    }

    /// Every object of every add-on has an API path the agent applies and deletes it at.
    #[test]
    fn every_manifest_object_has_an_api_path() {
        let d = tempfile::tempdir().unwrap();
        let paths = Paths::new(d.path());
        make_pki(&paths);
        let mut inputs = Inputs::read(&paths).unwrap();
        inputs.images = images();
        for dep in DEPLOYABLE {
            let m = (dep.manifest)(&inputs);
            let items = m["items"].as_array().unwrap();
            assert!(items.len() >= 5, "{}", dep.name);
            let mut seen = std::collections::BTreeSet::new();
            for i in items {
                let path = crate::kube::object_path(i).unwrap_or_else(|e| panic!("{}: {e:#}", dep.name));
                assert!(seen.insert(path.clone()), "{}: {path} twice", dep.name);
            }
            let deployment = format!("/apis/apps/v1/namespaces/{}/deployments/{}", dep.namespace, dep.deployment);
            assert!(seen.contains(&deployment), "{}: {deployment} not in {seen:?}", dep.name);
        }
    }

    #[test]
    fn the_storage_class_is_the_default_and_waits_for_a_consumer() {
        let m = storage_manifest(&images());
        let sc = item(&m, "StorageClass");
        assert_eq!(sc["metadata"]["name"], "standard");
        assert_eq!(sc["metadata"]["annotations"]["storageclass.kubernetes.io/is-default-class"], "true");
        assert_eq!(sc["provisioner"], "rancher.io/local-path");
        assert_eq!(sc["volumeBindingMode"], "WaitForFirstConsumer");
        assert_eq!(sc["reclaimPolicy"], "Delete");
    }

    #[test]
    fn nothing_is_pulled_and_volumes_live_on_the_root_disk() {
        let m = storage_manifest(&images());
        let c = &item(&m, "Deployment")["spec"]["template"]["spec"]["containers"][0];
        assert_eq!(
            (c["image"].as_str(), c["imagePullPolicy"].as_str()),
            (Some("kindling.local/local-path-provisioner:v9"), Some("IfNotPresent"))
        );
        let data = &item(&m, "ConfigMap")["data"];
        // The files inside the ConfigMap parse back (YAML is a superset of JSON).
        let helper: Value = serde_json::from_str(data["helperPod.yaml"].as_str().unwrap()).unwrap();
        let hc = &helper["spec"]["containers"][0];
        assert_eq!(
            (hc["image"].as_str(), hc["imagePullPolicy"].as_str()),
            (Some("kindling.local/busybox:1.2"), Some("IfNotPresent"))
        );
        let config: Value = serde_json::from_str(data["config.json"].as_str().unwrap()).unwrap();
        assert_eq!(config["nodePathMap"][0]["paths"][0], STORAGE_DIR);
        assert!(STORAGE_DIR.starts_with("/var/lib/"), "not on a tmpfs (/run, /tmp)");
        // Every namespaced object is in the add-on's namespace.
        for i in m["items"].as_array().unwrap() {
            if let Some(ns) = i["metadata"]["namespace"].as_str() {
                assert_eq!(ns, STORAGE_NAMESPACE, "{i}");
            }
        }
    }

    #[test]
    fn every_addon_of_the_catalogue_is_deployable_and_boot_parameters_choose_them() {
        for a in addon::ALL {
            assert!(deployable(a.name).is_some(), "the agent cannot deploy {}", a.name);
        }
        assert!(DEPLOYABLE.iter().all(|d| addon::find(d.name).is_some()));
        let defaults = enabled_at_boot(None);
        assert_eq!(defaults.get(STORAGE_PROVISIONER), Some(&true));
        assert_eq!(enabled_at_boot(Some("")).get(STORAGE_PROVISIONER), Some(&false), "empty: none");
        let named = enabled_at_boot(Some("nope,storage-provisioner"));
        assert_eq!(named.get(STORAGE_PROVISIONER), Some(&true));
        assert_eq!(named.get(METRICS_SERVER), Some(&false));
        assert_eq!(defaults.get(METRICS_SERVER), Some(&false), "off unless asked, as in minikube");
        assert_eq!(named.len(), addon::ALL.len(), "unknown names are skipped");
        assert_eq!(
            deployable(STORAGE_PROVISIONER).unwrap().ready_note,
            format!("StorageClass {STORAGE_CLASS}, volumes in {STORAGE_DIR}")
        );
    }

    /// Before node-ready a request is recorded (for the boot thread), runs no command,
    /// and an unknown name is refused with the known ones.
    #[test]
    fn requests_before_node_ready_are_recorded() {
        let d = tempfile::tempdir().unwrap();
        let a = Addons::new(Paths::new(d.path()), Reaper::idle(), enabled_at_boot(None));
        let mut said = Vec::new();
        a.set(STORAGE_PROVISIONER, false, &mut |s| said.push(s.to_string())).unwrap();
        assert!(said[0].contains("not Ready yet"), "{said:?}");
        let s = a.states();
        assert_eq!((s[0].enabled, s[0].deployed, s[0].running), (false, None, None));
        let e = a.set("dashbord", true, &mut |_| {}).unwrap_err().to_string();
        assert!(e.contains("no add-on named \"dashbord\"") && e.contains(STORAGE_PROVISIONER), "{e}");
    }

    #[test]
    fn images_come_from_versions_env() {
        let d = tempfile::tempdir().unwrap();
        let paths = Paths::new(d.path());
        std::fs::create_dir_all(paths.config()).unwrap();
        std::fs::write(
            paths.config().join("versions.env"),
            "BUSYBOX_IMAGE=kindling.local/busybox:7.7\nLOCAL_PATH_PROVISIONER_IMAGE=\"x/lpp:v1\"\n",
        )
        .unwrap();
        let i = Images::from_versions(&paths);
        assert_eq!((i.provisioner.as_str(), i.busybox.as_str()), ("x/lpp:v1", "kindling.local/busybox:7.7"));
        assert_eq!(i.metrics_server, "kindling.local/metrics-server:v0.8.0", "the default");
        assert_eq!(i.traefik, "kindling.local/traefik:v3.6.12", "the default");
        let e = write_manifests(&paths).unwrap_err().to_string();
        assert!(e.contains("ca.crt"), "without the PKI it says what is missing: {e}");
        make_pki(&paths);
        write_manifests(&paths).unwrap();
        let text = std::fs::read_to_string(manifest_path(&paths, STORAGE_PROVISIONER)).unwrap();
        assert!(text.contains("x/lpp:v1") && text.contains("\"kind\": \"List\""), "{text}");
        use std::os::unix::fs::PermissionsExt;
        for d in DEPLOYABLE {
            let mode = std::fs::metadata(manifest_path(&paths, d.name)).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{}: metrics-server's holds a private key", d.name);
        }
    }

    /// metrics-server verifies the kubelet with the cluster CA and is verified by the API
    /// server with it: no `--kubelet-insecure-tls`, no `insecureSkipTLSVerify`; its
    /// Secret holds the PKI's certificate and key; nothing is pulled; no Namespace object
    /// (a disable would delete kube-system); the APIService goes first.
    #[test]
    fn metrics_server_verifies_tls_both_ways() {
        let d = tempfile::tempdir().unwrap();
        let paths = Paths::new(d.path());
        make_pki(&paths);
        let mut inputs = Inputs::read(&paths).unwrap();
        inputs.images = images();
        let m = metrics_manifest(&inputs);
        let text = m.to_string();
        assert!(!text.contains("insecure"), "{text}");
        let items = m["items"].as_array().unwrap();
        assert_eq!(items[0]["kind"], "APIService");
        assert!(items.iter().all(|i| i["kind"] != "Namespace"));
        let api = item(&m, "APIService");
        use base64::Engine;
        let unb64 = |v: &Value| {
            String::from_utf8(base64::engine::general_purpose::STANDARD.decode(v.as_str().unwrap()).unwrap()).unwrap()
        };
        assert_eq!(unb64(&api["spec"]["caBundle"]), inputs.ca_crt);
        assert_eq!(api["spec"]["service"]["name"], "metrics-server");
        let secret = item(&m, "Secret");
        assert_eq!(unb64(&secret["data"]["tls.key"]), inputs.metrics_key);
        assert_eq!(unb64(&secret["data"]["tls.crt"]), inputs.metrics_crt);
        assert_eq!(unb64(&secret["data"]["ca.crt"]), inputs.ca_crt);
        let spec = &item(&m, "Deployment")["spec"]["template"]["spec"];
        let c = &spec["containers"][0];
        assert_eq!(
            (c["image"].as_str(), c["imagePullPolicy"].as_str()),
            (Some("kindling.local/metrics-server:v8"), Some("IfNotPresent"))
        );
        let args: Vec<&str> = c["args"].as_array().unwrap().iter().map(|a| a.as_str().unwrap()).collect();
        assert!(args.contains(&"--kubelet-certificate-authority=/etc/metrics-server/tls/ca.crt"), "{args:?}");
        assert!(args.contains(&"--tls-private-key-file=/etc/metrics-server/tls/tls.key"), "{args:?}");
        assert_eq!(spec["volumes"][1]["secret"]["secretName"], secret["metadata"]["name"]);
        for i in items {
            if let Some(ns) = i["metadata"]["namespace"].as_str() {
                assert_eq!(ns, "kube-system", "{i}");
            }
        }
    }
}
