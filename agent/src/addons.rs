//! The add-ons the agent deploys once the node is Ready (`kindling_proto::addon`), so
//! they never delay node-ready. Each add-on's objects are generated here, as JSON values
//! (serde_json, so every string, including the files inside a ConfigMap, is quoted
//! correctly), written under /etc/kindling/addons/ with the other configuration files,
//! and applied with the node's kubectl from a thread of their own after node-ready;
//! applying is idempotent, so every boot applies them again. Their image archives are
//! imported into containerd in that thread too (bring-up skips [`ARCHIVES`]).
//!
//! storage-provisioner: Rancher's local-path-provisioner in `local-path-storage`, and
//! the default StorageClass `standard`. A volume is a directory under [`STORAGE_DIR`]
//! on the node's root disk, which is the cluster's own disk and survives stop and
//! start; the provisioner's helper pods (busybox, preloaded) create and remove them.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Result;
use serde_json::{json, Value};

use crate::paths::{versions, Paths};
use crate::phase;
use crate::supervisor::Reaper;

pub use kindling_proto::addon::STORAGE_PROVISIONER;

/// Where local-path volumes live on the node: on the root disk (not a tmpfs).
pub const STORAGE_DIR: &str = "/var/lib/kindling/storage";
pub const STORAGE_NAMESPACE: &str = "local-path-storage";
pub const STORAGE_CLASS: &str = "standard";
pub const STORAGE_PROVISIONER_NAME: &str = "rancher.io/local-path";
const STORAGE_SA: &str = "local-path-provisioner-service-account";
const STORAGE_DEPLOYMENT: &str = "local-path-provisioner";
/// The storage add-on's image archive in /var/lib/kindling/images (the oci step's).
const STORAGE_ARCHIVE: &str = "local-path-provisioner.oci.tar";
/// The add-ons' archives: the node's bring-up leaves them to the add-ons, which import
/// them after node-ready, so they do not delay it.
pub const ARCHIVES: &[&str] = &[STORAGE_ARCHIVE];

/// How long the agent keeps trying to apply an add-on, and then waits for it to be
/// available, before it says so on the console and gives up (until the next boot).
const APPLY_LIMIT: Duration = Duration::from_secs(15 * 60);
const READY_LIMIT: Duration = Duration::from_secs(20 * 60);

/// The images the add-ons run, from /etc/kindling/versions.env (the oci step's names).
#[derive(Clone, Debug)]
pub struct Images {
    pub provisioner: String,
    pub busybox: String,
}

impl Images {
    pub fn from_versions(paths: &Paths) -> Self {
        let v = versions(paths);
        let get = |k: &str, default: &str| v.get(k).cloned().unwrap_or_else(|| default.to_string());
        Self {
            provisioner: get("LOCAL_PATH_PROVISIONER_IMAGE", "kindling.local/local-path-provisioner:v0.0.30"),
            busybox: get("BUSYBOX_IMAGE", "kindling.local/busybox:1.35"),
        }
    }
}

/// The add-on's manifest file on the node.
pub fn manifest_path(paths: &Paths, addon: &str) -> PathBuf {
    paths.config().join("addons").join(format!("{addon}.json"))
}

/// Writes every add-on's manifest (one `List` each).
pub fn write_manifests(paths: &Paths) -> Result<()> {
    let images = Images::from_versions(paths);
    let path = manifest_path(paths, STORAGE_PROVISIONER);
    if let Some(d) = path.parent() {
        std::fs::create_dir_all(d)?;
    }
    let text = serde_json::to_string_pretty(&storage_manifest(&images))?;
    std::fs::write(&path, text).map_err(|e| anyhow::anyhow!("writing {}: {e}", path.display()))
}

/// Applies the add-ons after node-ready, in a thread of its own: bounded retries, then
/// a bounded wait for the Deployment, with the time each took on the console.
pub fn deploy_after_ready(paths: &Paths, reaper: std::sync::Arc<Reaper>) {
    let kubectl = paths.bin("kubectl");
    let admin = paths.kubeconfig("admin").display().to_string();
    let manifest = manifest_path(paths, STORAGE_PROVISIONER);
    let (ctr, sock) = (paths.bin("ctr"), paths.containerd_socket().display().to_string());
    let (archive, image) = (paths.images().join(STORAGE_ARCHIVE), Images::from_versions(paths).provisioner);
    let ready_at = Instant::now();
    std::thread::spawn(move || {
        let imported = (|| {
            let (_, have) = reaper.run(&[&ctr, "--address", &sock, "-n", "k8s.io", "images", "ls", "-q"])?;
            if !have.lines().any(|l| l.trim() == image) {
                crate::images::import_archive(&reaper, &ctr, &sock, &archive)?;
            }
            anyhow::Ok(())
        })();
        if let Err(e) = imported.and_then(|()| deploy_storage(&reaper, &kubectl, &admin, &manifest, ready_at)) {
            phase::log(format!("add-on {STORAGE_PROVISIONER}: {e:#}"));
        }
    });
}

/// `t0`: when the node became Ready (the times on the console count from there).
fn deploy_storage(reaper: &Reaper, kubectl: &str, admin: &str, manifest: &Path, t0: Instant) -> Result<()> {
    let file = manifest.display().to_string();
    for attempt in 1.. {
        let last = match reaper.run(&[kubectl, "--kubeconfig", admin, "apply", "-f", &file]) {
            Ok((0, _)) => break,
            Ok((code, out)) => format!("exit {code}: {}", out.trim()),
            Err(e) => format!("{e:#}"),
        };
        if attempt == 1 {
            phase::log(format!("add-on {STORAGE_PROVISIONER}: kubectl apply failed ({last}); retrying every 2s"));
        }
        anyhow::ensure!(
            t0.elapsed() < APPLY_LIMIT,
            "kubectl apply -f {file} still fails after {}s ({last}); it is applied again at the next boot",
            t0.elapsed().as_secs()
        );
        std::thread::sleep(Duration::from_secs(2));
    }
    phase::log(format!("add-on {STORAGE_PROVISIONER}: applied {:.1}s after node-ready", t0.elapsed().as_secs_f64()));
    loop {
        let available = reaper
            .run(&[
                kubectl,
                "--kubeconfig",
                admin,
                "-n",
                STORAGE_NAMESPACE,
                "get",
                "deploy",
                STORAGE_DEPLOYMENT,
                "-o=jsonpath={.status.availableReplicas}",
            ])
            .is_ok_and(|(c, o)| c == 0 && o.trim().parse::<u32>().unwrap_or(0) >= 1);
        if available {
            break;
        }
        anyhow::ensure!(
            t0.elapsed() < READY_LIMIT,
            "deployment {STORAGE_NAMESPACE}/{STORAGE_DEPLOYMENT} is not available after {}s; see `kubectl -n {STORAGE_NAMESPACE} describe pods`",
            t0.elapsed().as_secs()
        );
        std::thread::sleep(Duration::from_secs(2));
    }
    phase::log(format!(
        "add-on {STORAGE_PROVISIONER}: ready {:.1}s after node-ready (StorageClass {STORAGE_CLASS}, volumes in {STORAGE_DIR})",
        t0.elapsed().as_secs_f64()
    ));
    Ok(())
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
        json!({
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
            "metadata": {"name": bind, "namespace": ns},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": role},
            "subjects": sa_subject
        }),
        json!({
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
            "metadata": {"name": bind},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": role},
            "subjects": sa_subject
        }),
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

#[cfg(test)]
mod tests {
    use super::*;

    fn images() -> Images {
        Images {
            provisioner: "kindling.local/local-path-provisioner:v9".into(),
            busybox: "kindling.local/busybox:1.2".into(),
        }
    }

    fn item<'a>(list: &'a Value, kind: &str) -> &'a Value {
        list["items"].as_array().unwrap().iter().find(|i| i["kind"] == kind).unwrap_or_else(|| panic!("no {kind}"))
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
        write_manifests(&paths).unwrap();
        let text = std::fs::read_to_string(manifest_path(&paths, STORAGE_PROVISIONER)).unwrap();
        assert!(text.contains("x/lpp:v1") && text.contains("\"kind\": \"List\""), "{text}");
    }
}
