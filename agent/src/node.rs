//! The Kubernetes node: what runs (containerd, etcd, the control plane, kubelet,
//! kube-proxy, CoreDNS, then the add-ons of `addons.rs`), with which flags and files, in
//! which order, and how readiness is decided. Everything is relative to a root directory so the same code runs in the
//! VM (root `/`) and in host tests.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use kindling_proto::seed;

use crate::kube::Api;
use crate::paths::{versions, Paths};
use crate::phase;
use crate::pki::{NodeIdentity, Pki};
use crate::supervisor::{Component, Reaper, Spec};

pub const SERVICE_CIDR: &str = "10.96.0.0/12";
pub const SERVICE_IP: &str = "10.96.0.1";
pub const DNS_IP: &str = "10.96.0.10";
pub const CLUSTER_CIDR: &str = "10.244.0.0/16";
pub const NODE_POD_CIDR: &str = "10.244.0.0/24";
pub const DEFAULT_IP: &str = "10.0.2.15/24";
/// The seed disk: the second virtio disk (`kindling_proto::seed`).
pub const SEED_DEVICE: &str = "/dev/vdb";

/// Settings from the kernel command line (`kindling.*=`).
#[derive(Clone, Debug)]
pub struct NodeConfig {
    pub hostname: String,
    /// Node address with prefix length, e.g. 10.0.2.15/24.
    pub ip: String,
    pub gateway: Option<String>,
    pub dns: String,
    /// Components whose output is also shown on the console ("all" for every one).
    pub console: Vec<String>,
    /// Run the in-guest checks after node-ready, then power off.
    pub selftest: bool,
    /// Stop bringing the node up after this phase (`kindling.until=apiserver-ready`):
    /// a control plane without kubelet, e.g. where cgroups are not the node's own.
    pub until: Option<String>,
    /// Guest TCP ports offered on vsock (`kindling.expose=6443,30000-32767`).
    pub expose: String,
    /// The add-ons to run (`kindling.addons=a,b`); None: each add-on's default.
    pub addons: Option<String>,
}

impl NodeConfig {
    pub fn from_cmdline(cmdline: &str) -> Self {
        let params: HashMap<&str, &str> = kindling_proto::cmdline::params(cmdline).collect();
        let get = |k: &str| params.get(k).map(|v| v.to_string());
        use kindling_proto::cmdline as p;
        Self {
            hostname: get(p::HOSTNAME).unwrap_or_else(|| "kindling".into()),
            ip: get(p::IP).unwrap_or_else(|| DEFAULT_IP.into()),
            gateway: get(p::GW),
            dns: get(p::DNS).unwrap_or_else(|| "10.0.2.3".into()),
            console: get(p::CONSOLE).map(|v| v.split(',').map(str::to_owned).collect()).unwrap_or_default(),
            selftest: get(p::SELFTEST).is_some_and(|v| v == "1"),
            until: get(p::UNTIL),
            expose: get(p::EXPOSE).unwrap_or_else(|| crate::ports::DEFAULT_EXPOSE.into()),
            addons: get(p::ADDONS),
        }
    }

    pub fn address(&self) -> &str {
        self.ip.split('/').next().unwrap_or(&self.ip)
    }

    fn shows(&self, component: &str) -> bool {
        self.console.iter().any(|c| c == "all" || c == component)
    }
}

/// Writes PKI, kubeconfigs, kubelet/CNI configuration and the CoreDNS add-on.
///
/// The kubelet's `runtimeRequestTimeout` is 10 minutes, not 2: a pod's first
/// CreateContainer unpacks its image's layers, and under emulation, beside other
/// unpacks, that can take longer than 2 minutes; the kubelet then cancels it and the
/// retry starts over, so CoreDNS and the add-ons' pods could wait in
/// CreateContainerError for good (seen with three images unpacking at once).
pub fn write_configs(cfg: &NodeConfig, paths: &Paths) -> Result<()> {
    let pki = Pki::new(paths.pki());
    if !pki.path("ca.key").exists() {
        match crate::seed::read(&paths.at(SEED_DEVICE)) {
            Ok(Some(files)) => {
                match (crate::seed::file(&files, seed::CA_CERT), crate::seed::file(&files, seed::CA_KEY)) {
                    (Some(cert), Some(key)) => {
                        pki.install_ca(cert, key).context("installing the cluster CA from the seed disk")?;
                        phase::log("PKI: the cluster CA comes from the seed disk");
                    }
                    _ => phase::log("PKI: the seed disk has no CA; making one"),
                }
            }
            Ok(None) => {}
            Err(e) => phase::log(format!("PKI: ignoring the seed disk: {e:#}")),
        }
    }
    let node = NodeIdentity {
        hostname: cfg.hostname.clone(),
        addresses: vec![cfg.address().to_string()],
        service_ip: SERVICE_IP.into(),
    };
    let written = pki.ensure(&node).context("generating the cluster PKI")?;
    if !written.is_empty() {
        phase::log(format!("PKI: wrote {}", written.join(" ")));
    }
    std::fs::create_dir_all(paths.config())?;
    let server = "https://127.0.0.1:6443";
    for (name, user) in [
        ("admin", "kubernetes-admin".to_string()),
        ("controller-manager", "system:kube-controller-manager".into()),
        ("scheduler", "system:kube-scheduler".into()),
        ("kube-proxy", "system:kube-proxy".into()),
        ("kubelet", format!("system:node:{}", cfg.hostname)),
    ] {
        pki.write_kubeconfig(&paths.kubeconfig(name), name, &user, server, "kindling")?;
    }
    let p = |f: &str| pki.path(f).display().to_string();
    write_file(&paths.config().join("kubelet.yaml"), &format!(
        "apiVersion: kubelet.config.k8s.io/v1beta1\nkind: KubeletConfiguration\n\
         authentication:\n  anonymous:\n    enabled: false\n  webhook:\n    enabled: true\n  x509:\n    clientCAFile: {ca}\n\
         authorization:\n  mode: Webhook\n\
         cgroupDriver: cgroupfs\nclusterDNS: [{DNS_IP}]\nclusterDomain: cluster.local\n\
         containerRuntimeEndpoint: unix://{sock}\nfailSwapOn: false\n\
         tlsCertFile: {crt}\ntlsPrivateKeyFile: {key}\nresolvConf: {resolv}\n\
         serializeImagePulls: false\nimageGCHighThresholdPercent: 100\nimageGCLowThresholdPercent: 99\n\
         evictionHard:\n  memory.available: 50Mi\n  nodefs.available: 2%\n  imagefs.available: 2%\n\
         podCIDR: {NODE_POD_CIDR}\nsyncFrequency: 10s\nnodeStatusReportFrequency: 10s\n\
         runtimeRequestTimeout: 10m\n\
         seccompDefault: true\n",
        ca = p("ca.crt"),
        sock = paths.containerd_socket().display(),
        crt = p("kubelet-serving.crt"),
        key = p("kubelet-serving.key"),
        resolv = paths.at("/etc/resolv.conf").display(),
    ))?;
    let cni = paths.at("/etc/cni/net.d");
    std::fs::create_dir_all(&cni)?;
    write_file(
        &cni.join("10-kindling.conflist"),
        &format!(
            r#"{{"cniVersion":"1.0.0","name":"kindling","plugins":[{{"type":"bridge","bridge":"cni0","isGateway":true,"ipMasq":true,"hairpinMode":true,"ipam":{{"type":"host-local","ranges":[[{{"subnet":"{NODE_POD_CIDR}"}}]],"routes":[{{"dst":"0.0.0.0/0"}}]}}}},{{"type":"portmap","capabilities":{{"portMappings":true}}}}]}}"#
        ),
    )?;
    let coredns = coredns_manifest(&coredns_image(paths));
    write_file(&paths.config().join("coredns.json"), &serde_json::to_string_pretty(&coredns)?)?;
    crate::addons::write_manifests(paths).context("writing the add-ons' manifests")?;
    Ok(())
}

fn write_file(path: &Path, text: &str) -> Result<()> {
    if let Some(d) = path.parent() {
        std::fs::create_dir_all(d)?;
    }
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}

/// Command lines of every component.
pub fn specs(cfg: &NodeConfig, paths: &Paths) -> HashMap<&'static str, Spec> {
    let pki = Pki::new(paths.pki());
    let p = |f: &str| pki.path(f).display().to_string();
    let kc = |n: &str| paths.kubeconfig(n).display().to_string();
    let spec = |name: &'static str, bin: &str, args: Vec<String>| {
        let mut argv = vec![paths.bin(bin)];
        argv.extend(args);
        (name, Spec { name, argv, env: vec![] })
    };
    let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
    let addr = cfg.address().to_string();
    HashMap::from([
        spec(
            "containerd",
            "containerd",
            s(&["--config", &paths.at("/etc/containerd/config.toml").display().to_string()]),
        ),
        spec(
            "etcd",
            "etcd",
            vec![
                "--name=kindling".into(),
                format!("--data-dir={}", paths.etcd_data().display()),
                "--listen-client-urls=http://127.0.0.1:2379".into(),
                "--advertise-client-urls=http://127.0.0.1:2379".into(),
                "--listen-peer-urls=http://127.0.0.1:2380".into(),
                "--initial-advertise-peer-urls=http://127.0.0.1:2380".into(),
                "--initial-cluster=kindling=http://127.0.0.1:2380".into(),
                "--listen-metrics-urls=http://127.0.0.1:2381".into(),
                "--snapshot-count=10000".into(),
                "--quota-backend-bytes=1073741824".into(),
            ],
        ),
        spec(
            "kube-apiserver",
            "kube-apiserver",
            vec![
                format!("--advertise-address={addr}"),
                "--etcd-servers=http://127.0.0.1:2379".into(),
                "--secure-port=6443".into(),
                format!("--service-cluster-ip-range={SERVICE_CIDR}"),
                format!("--tls-cert-file={}", p("apiserver.crt")),
                format!("--tls-private-key-file={}", p("apiserver.key")),
                format!("--client-ca-file={}", p("ca.crt")),
                format!("--kubelet-client-certificate={}", p("apiserver-kubelet-client.crt")),
                format!("--kubelet-client-key={}", p("apiserver-kubelet-client.key")),
                format!("--kubelet-certificate-authority={}", p("ca.crt")),
                format!("--service-account-key-file={}", p("sa.pub")),
                format!("--service-account-signing-key-file={}", p("sa.key")),
                "--service-account-issuer=https://kubernetes.default.svc.cluster.local".into(),
                "--authorization-mode=Node,RBAC".into(),
                "--enable-admission-plugins=NodeRestriction".into(),
                "--allow-privileged=true".into(),
                "--kubelet-preferred-address-types=InternalIP,Hostname".into(),
                "--endpoint-reconciler-type=lease".into(),
                // The aggregation layer, for extension API servers (the metrics-server
                // add-on), as kubeadm sets it up; requests reach them at their pods'
                // addresses (their Endpoints), not through the Service's virtual IP.
                format!("--requestheader-client-ca-file={}", p("front-proxy-ca.crt")),
                format!("--requestheader-allowed-names={}", crate::pki::FRONT_PROXY_CLIENT),
                "--requestheader-extra-headers-prefix=X-Remote-Extra-".into(),
                "--requestheader-group-headers=X-Remote-Group".into(),
                "--requestheader-username-headers=X-Remote-User".into(),
                format!("--proxy-client-cert-file={}", p("front-proxy-client.crt")),
                format!("--proxy-client-key-file={}", p("front-proxy-client.key")),
                "--enable-aggregator-routing=true".into(),
            ],
        ),
        spec(
            "kube-controller-manager",
            "kube-controller-manager",
            vec![
                format!("--kubeconfig={}", kc("controller-manager")),
                format!("--authentication-kubeconfig={}", kc("controller-manager")),
                format!("--authorization-kubeconfig={}", kc("controller-manager")),
                format!("--cluster-signing-cert-file={}", p("ca.crt")),
                format!("--cluster-signing-key-file={}", p("ca.key")),
                format!("--root-ca-file={}", p("ca.crt")),
                format!("--service-account-private-key-file={}", p("sa.key")),
                // One identity for every controller (see pki::clients): no service
                // account and token to mint per controller before it starts.
                "--use-service-account-credentials=false".into(),
                format!("--service-cluster-ip-range={SERVICE_CIDR}"),
                format!("--cluster-cidr={CLUSTER_CIDR}"),
                "--leader-elect=false".into(),
                "--bind-address=127.0.0.1".into(),
            ],
        ),
        spec(
            "kube-scheduler",
            "kube-scheduler",
            vec![
                format!("--kubeconfig={}", kc("scheduler")),
                format!("--authentication-kubeconfig={}", kc("scheduler")),
                format!("--authorization-kubeconfig={}", kc("scheduler")),
                "--leader-elect=false".into(),
                "--bind-address=127.0.0.1".into(),
            ],
        ),
        spec(
            "kubelet",
            "kubelet",
            vec![
                format!("--config={}", paths.config().join("kubelet.yaml").display()),
                format!("--kubeconfig={}", kc("kubelet")),
                format!("--hostname-override={}", cfg.hostname),
                format!("--node-ip={addr}"),
            ],
        ),
        spec(
            "kube-proxy",
            "kube-proxy",
            vec![
                format!("--kubeconfig={}", kc("kube-proxy")),
                format!("--hostname-override={}", cfg.hostname),
                format!("--cluster-cidr={CLUSTER_CIDR}"),
                "--proxy-mode=iptables".into(),
                "--conntrack-max-per-core=0".into(),
            ],
        ),
    ])
}

/// The node's components, shared between bring-up (which adds them as it goes) and
/// shutdown (which may come at any time).
#[derive(Clone, Default)]
pub struct Node {
    components: Arc<Mutex<Vec<Component>>>,
}

impl Node {
    fn add(&self, c: Component) {
        self.components.lock().unwrap().push(c);
    }

    fn with<T>(&self, name: &str, f: impl FnOnce(&Component) -> T) -> Option<T> {
        self.components.lock().unwrap().iter().find(|c| c.name == name).map(f)
    }

    /// Orderly shutdown: kubelet and kube-proxy, the control plane, etcd, then containerd.
    pub fn stop(&self) {
        let comps = self.components.lock().unwrap();
        for group in [
            &["kubelet", "kube-proxy"][..],
            &["kube-scheduler", "kube-controller-manager", "kube-apiserver"],
            &["etcd"],
            &["containerd"],
        ] {
            for c in comps.iter().filter(|c| group.contains(&c.name)) {
                c.stop(Duration::from_secs(10));
            }
        }
    }
}

/// Whether bring-up went all the way or stopped where `kindling.until` said.
#[derive(Debug, PartialEq, Eq)]
pub enum BringUp {
    Complete,
    StoppedAfter(String),
}

/// The OpenAPI documents bring-up has the API server build (see [`bring_up`]).
const OPENAPI_WARM: &[&str] = &["/openapi/v3/api/v1", "/openapi/v3/apis/apps/v1", "/openapi/v2"];
/// How often each is asked for before bring-up gives up on it.
const OPENAPI_TRIES: usize = 6;

/// Starts everything into `node`, reporting phases; returns once the node is Ready and
/// cluster DNS is available (or after the `until` phase).
pub fn bring_up(
    cfg: &NodeConfig,
    paths: &Paths,
    reaper: Arc<Reaper>,
    node: &Node,
    addons: &Arc<crate::addons::Addons>,
) -> Result<BringUp> {
    if let Some(u) = &cfg.until {
        anyhow::ensure!(phase::is_known(u), "kindling.until={u} is not a phase; use one of {}", phase::ALL.join(", "));
    }
    if cfg.until.as_deref() == Some(phase::AGENT_START) {
        return Ok(BringUp::StoppedAfter(phase::AGENT_START.into()));
    }
    // Reports a phase; true when bring-up is to stop there.
    let reached = |name: &str| {
        phase::report(name);
        cfg.until.as_deref() == Some(name)
    };
    write_configs(cfg, paths)?;
    let mut specs = specs(cfg, paths);
    let mut start = |name: &'static str| -> Result<()> {
        let spec = specs.remove(name).expect("known component");
        node.add(
            Component::start(spec, reaper.clone(), &paths.logs(), cfg.shows(name))
                .with_context(|| format!("starting {name}"))?,
        );
        Ok(())
    };
    let comps = node;
    // containerd and etcd depend on nothing: start both at once.
    start("containerd")?;
    start("etcd")?;
    let ctr = paths.bin("ctr");
    let sock = paths.containerd_socket().display().to_string();

    wait_for("etcd", comps, etcd_healthy);
    if reached("etcd-ready") {
        return Ok(BringUp::StoppedAfter("etcd-ready".into()));
    }
    start("kube-apiserver")?;

    wait_for("containerd", comps, || reaper.run(&[&ctr, "--address", &sock, "version"]).is_ok_and(|(c, _)| c == 0));
    if reached("containerd-ready") {
        return Ok(BringUp::StoppedAfter("containerd-ready".into()));
    }
    // The root disk's build unpacked every preloaded image into containerd's store.
    crate::images::check_preloaded(&reaper, &ctr, &sock, &paths.images())?;
    if reached("images-ready") {
        return Ok(BringUp::StoppedAfter("images-ready".into()));
    }

    let api = Api::from_pki(&paths.pki(), crate::kube::LOCAL_SERVER)?;
    wait_for("kube-apiserver", comps, || api.ready());
    if reached("apiserver-ready") {
        return Ok(BringUp::StoppedAfter("apiserver-ready".into()));
    }
    // The API server builds each OpenAPI document on the first request for it; have
    // kubectl's (core/v1 and apps/v1 in v3, then v2, its fallback) built now, while the
    // node comes up, so that a user's first `kubectl apply` after `kindling start` does
    // not wait past kubectl's 32 s for them and fail validating. A 504 (the API server's
    // own 60 s) leaves the build going on: ask again.
    std::thread::spawn({
        let api = api.clone();
        move || {
            for path in OPENAPI_WARM {
                let t0 = std::time::Instant::now();
                let mut last = String::new();
                let got = (0..OPENAPI_TRIES).find_map(|_| match api.openapi(path) {
                    Ok(n) => Some(n),
                    Err(e) => {
                        last = format!("{e:#}");
                        std::thread::sleep(Duration::from_secs(2));
                        None
                    }
                });
                match got {
                    Some(n) => phase::log(format!(
                        "openapi: {path} built ({} KiB, {:.1}s)",
                        n >> 10,
                        t0.elapsed().as_secs_f64()
                    )),
                    None => phase::log(format!("openapi: {path}: {last}; kubectl has it built on first use")),
                }
            }
        }
    });
    // Everything else talks to the API server. Started earlier, they only retry, and on
    // a slow (emulated) CPU their retries starve the API server's own bootstrap.
    // The node's status counts from here on: on a restart the Node is there already,
    // Ready as its last kubelet left it.
    let kubelet_started = crate::kube::whole_second(std::time::SystemTime::now());
    start("kubelet")?;
    start("kube-proxy")?;
    start("kube-controller-manager")?;
    start("kube-scheduler")?;
    // CoreDNS is applied beside the wait for the node, not before it: node-ready does
    // not depend on it. Server-side apply through the agent's own client, object by
    // object: one `kubectl apply` (a 115 MB process, discovery, then a request per
    // object) took minutes on a loaded emulated node.
    let coredns_applied = {
        let api = api.clone();
        let coredns = coredns_manifest(&coredns_image(paths));
        std::thread::spawn(move || {
            let items = coredns["items"].as_array().cloned().unwrap_or_default();
            while !items.iter().all(|item| api.apply(item).is_ok()) {
                std::thread::sleep(Duration::from_secs(2));
            }
        })
    };
    wait_for("kubelet", comps, || api.node_posted(&cfg.hostname, kubelet_started));
    if reached("kubelet-registered") {
        return Ok(BringUp::StoppedAfter("kubelet-registered".into()));
    }
    wait_for("kubelet", comps, || api.node_ready(&cfg.hostname, kubelet_started));
    if reached(phase::NODE_READY) {
        return Ok(BringUp::StoppedAfter(phase::NODE_READY.into()));
    }
    // The add-ons deploy after node-ready, beside the wait for DNS, never before it.
    addons.deploy_after_ready();
    crate::loadbalancer::start(api.clone());
    wait_for("coredns", comps, || coredns_applied.is_finished() && api.pods_running("kube-system", "k8s-app=kube-dns"));
    if reached("coredns-running") {
        return Ok(BringUp::StoppedAfter("coredns-running".into()));
    }
    wait_for("coredns", comps, || api.deployment("kube-system", "coredns").is_ok_and(|(_, available)| available));
    phase::report("dns-ready");
    Ok(BringUp::Complete)
}

fn etcd_healthy() -> bool {
    let Ok(mut s) = TcpStream::connect_timeout(&"127.0.0.1:2379".parse().unwrap(), Duration::from_secs(2)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    if s.write_all(b"GET /health HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").is_err() {
        return false;
    }
    let mut body = String::new();
    let _ = s.read_to_string(&mut body);
    body.contains("\"health\":\"true\"")
}

/// Polls `check` every second. Every two minutes without success, says what it waits
/// for and shows the last lines of that component's log, so a stuck node explains itself.
fn wait_for(what: &str, node: &Node, mut check: impl FnMut() -> bool) -> Duration {
    let t0 = Instant::now();
    let mut next_report = Duration::from_secs(120);
    while !check() {
        std::thread::sleep(Duration::from_secs(1));
        if t0.elapsed() >= next_report {
            next_report += Duration::from_secs(120);
            phase::log(format!("still waiting for {what} after {}s", t0.elapsed().as_secs()));
            if let Some(text) = node.with(what, |c| format!("last lines of {}:\n{}", c.log.display(), c.tail(15))) {
                phase::log(text);
            }
        }
    }
    t0.elapsed()
}

/// The CoreDNS image the oci step preloaded (versions.env).
fn coredns_image(paths: &Paths) -> String {
    versions(paths).get("COREDNS_IMAGE").cloned().unwrap_or_else(|| "registry.k8s.io/coredns/coredns:v1.11.3".into())
}

/// CoreDNS (kubeadm's objects for it), as a `List` the agent applies object by object.
fn coredns_manifest(image: &str) -> serde_json::Value {
    use serde_json::json;
    let labels = json!({"k8s-app": "kube-dns"});
    let corefile = "\
.:53 {
    errors
    health {
        lameduck 5s
    }
    ready
    kubernetes cluster.local in-addr.arpa ip6.arpa {
        pods insecure
        fallthrough in-addr.arpa ip6.arpa
        ttl 30
    }
    forward . /etc/resolv.conf
    cache 30
    reload
    loadbalance
}
";
    let items = vec![
        json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "coredns", "namespace": "kube-system"}}),
        json!({
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
            "metadata": {"name": "system:coredns"},
            "rules": [
                {"apiGroups": [""], "resources": ["endpoints", "services", "pods", "namespaces"], "verbs": ["list", "watch"]},
                {"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"], "verbs": ["list", "watch"]}
            ]
        }),
        json!({
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
            "metadata": {"name": "system:coredns"},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "system:coredns"},
            "subjects": [{"kind": "ServiceAccount", "name": "coredns", "namespace": "kube-system"}]
        }),
        json!({
            "apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": "coredns", "namespace": "kube-system"},
            "data": {"Corefile": corefile}
        }),
        json!({
            "apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": "coredns", "namespace": "kube-system", "labels": labels},
            "spec": {
                "replicas": 1,
                "selector": {"matchLabels": labels},
                "template": {
                    "metadata": {"labels": labels},
                    "spec": {
                        "serviceAccountName": "coredns",
                        "dnsPolicy": "Default",
                        "priorityClassName": "system-cluster-critical",
                        "tolerations": [
                            {"key": "CriticalAddonsOnly", "operator": "Exists"},
                            {"key": "node-role.kubernetes.io/control-plane", "effect": "NoSchedule"}
                        ],
                        "containers": [{
                            "name": "coredns",
                            "image": image,
                            "imagePullPolicy": "IfNotPresent",
                            "args": ["-conf", "/etc/coredns/Corefile"],
                            "volumeMounts": [{"name": "config", "mountPath": "/etc/coredns", "readOnly": true}],
                            "ports": [
                                {"containerPort": 53, "name": "dns", "protocol": "UDP"},
                                {"containerPort": 53, "name": "dns-tcp", "protocol": "TCP"}
                            ],
                            "readinessProbe": {"httpGet": {"path": "/ready", "port": 8181}, "periodSeconds": 2},
                            "livenessProbe": {"httpGet": {"path": "/health", "port": 8080},
                                              "initialDelaySeconds": 60, "timeoutSeconds": 5},
                            "securityContext": {"capabilities": {"add": ["NET_BIND_SERVICE"], "drop": ["ALL"]}}
                        }],
                        "volumes": [{"name": "config",
                                     "configMap": {"name": "coredns", "items": [{"key": "Corefile", "path": "Corefile"}]}}]
                    }
                }
            }
        }),
        json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "kube-dns", "namespace": "kube-system", "labels": labels},
            "spec": {
                "selector": labels,
                "clusterIP": DNS_IP,
                "ports": [
                    {"name": "dns", "port": 53, "protocol": "UDP"},
                    {"name": "dns-tcp", "port": 53, "protocol": "TCP"}
                ]
            }
        }),
    ];
    json!({"apiVersion": "v1", "kind": "List", "items": items})
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cmdline_parsing() {
        let c = NodeConfig::from_cmdline("console=ttyS0 kindling.ip=192.168.7.2/24 kindling.gw=192.168.7.1 kindling.console=etcd,kubelet kindling.selftest=1 kindling.until=etcd-ready");
        assert_eq!((c.address(), c.gateway.as_deref(), c.selftest), ("192.168.7.2", Some("192.168.7.1"), true));
        assert_eq!(c.until.as_deref(), Some("etcd-ready"));
        assert!(c.shows("etcd") && !c.shows("kube-apiserver"));
        let d = NodeConfig::from_cmdline("console=ttyS0");
        assert_eq!((d.hostname.as_str(), d.address(), d.selftest), ("kindling", "10.0.2.15", false));
    }

    #[test]
    fn configs_and_flags_point_at_files_that_exist() {
        let d = tempfile::tempdir().unwrap();
        let paths = Paths::new(d.path());
        let cfg = NodeConfig::from_cmdline("");
        write_configs(&cfg, &paths).unwrap();
        let specs = specs(&cfg, &paths);
        assert_eq!(specs.len(), 7);
        for (name, spec) in &specs {
            for arg in &spec.argv[1..] {
                let value = arg.split_once('=').map(|(_, v)| v).unwrap_or(arg);
                if value.starts_with(d.path().to_str().unwrap())
                    && !value.contains("/etcd")
                    && !value.contains("/containerd/")
                {
                    assert!(Path::new(value).exists(), "{name}: {arg} does not exist");
                }
            }
        }
        let cni = std::fs::read_to_string(d.path().join("etc/cni/net.d/10-kindling.conflist")).unwrap();
        assert!(cni.contains("\"bridge\"") && cni.contains(NODE_POD_CIDR));
        let coredns = std::fs::read_to_string(paths.config().join("coredns.json")).unwrap();
        let coredns: serde_json::Value = serde_json::from_str(&coredns).unwrap();
        let items = coredns["items"].as_array().unwrap();
        assert_eq!(items[5]["spec"]["clusterIP"], DNS_IP);
        for i in items {
            crate::kube::object_path(i).unwrap();
        }
        let corefile = items[3]["data"]["Corefile"].as_str().unwrap();
        assert!(
            corefile.starts_with(".:53 {\n    errors\n") && corefile.ends_with("    loadbalance\n}\n"),
            "{corefile}"
        );
        let storage = crate::addons::manifest_path(&paths, crate::addons::STORAGE_PROVISIONER);
        assert!(std::fs::read_to_string(storage).unwrap().contains("\"standard\""));
        let kubelet = std::fs::read_to_string(paths.config().join("kubelet.yaml")).unwrap();
        assert!(kubelet.contains("runtimeRequestTimeout: 10m\n"), "unpacking under emulation: {kubelet}");
    }
}
