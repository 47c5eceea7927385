//! Commands that reach into a running node: `exec`, `logs`, `ip`, `image load`,
//! `service`, and `kubectl` on the host with the cluster's context.

use std::io::{Read, Write};
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use super::*;

/// Writes agent output to stdout as it comes, byte for byte.
pub(super) fn print_out(b: &[u8]) {
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(b);
    let _ = out.flush();
}

pub(super) fn agent_error(e: AgentError, name: &str) -> anyhow::Error {
    match e {
        AgentError::Refused(m) if m.contains("unknown variant") => anyhow::anyhow!(
            "the node's agent does not know this request ({m}): the cluster's root disk predates this kindling; \
             rebuild it with `kindling images build`, then `{}` and `{}`",
            command_for("delete", name),
            command_for("start", name)
        ),
        e => anyhow::anyhow!("{e}; check that the node is up with `{}`", command_for("status", name)),
    }
}

/// `kindling exec -- CMD...`: runs in the guest, output streamed; returns its exit code.
pub fn exec(name: &str, argv: &[String]) -> Result<i32> {
    let ctx = Ctx::connect()?;
    let (_, _, agent) = ctx.running(name)?;
    agent.exec(argv, &mut |s| print_out(s)).map_err(|e| agent_error(e, name))
}

/// `kindling logs`: the console (no component), or a component's log from the agent.
pub fn logs(name: &str, component: Option<&str>, follow: bool) -> Result<i32> {
    let ctx = Ctx::connect()?;
    if let Some(c) = component {
        let (_, _, agent) = ctx.running(name)?;
        return agent.logs(c, follow, &mut |s| print_out(s)).map_err(|e| match e {
            AgentError::Refused(m) if m.starts_with("no component") => {
                anyhow::anyhow!("{m}; components: containerd, etcd, kube-apiserver, kube-controller-manager, kube-scheduler, kubelet, kube-proxy")
            }
            e => agent_error(e, name),
        });
    }
    let (_, vm) = ctx.cluster(name)?;
    let vm = vm.ok_or_else(|| not_running(name, "its VM does not exist"))?;
    if !follow {
        print_out(ctx.client.console(name, None)?.as_bytes());
        return Ok(0);
    }
    // Follow: read the console file from its start, then what is appended, until the VM
    // has stopped and everything is shown.
    let mut f = std::fs::File::open(&vm.console_log)
        .with_context(|| format!("cannot read the console log {}", vm.console_log.display()))?;
    let mut buf = vec![0u8; 64 * 1024];
    let mut last_check = Instant::now();
    let mut running = true;
    loop {
        let n = f.read(&mut buf)?;
        if n > 0 {
            let mut out = std::io::stdout().lock();
            if out.write_all(&buf[..n]).and_then(|_| out.flush()).is_err() {
                return Ok(0); // stdout closed (e.g. piped to head)
            }
            continue;
        }
        if !running {
            return Ok(0);
        }
        // At the end of the file: the VM process may have rotated it (console.log.1 is
        // what we read; a new console.log continues it).
        if let (Ok(now), Ok(ours)) = (std::fs::metadata(&vm.console_log), f.metadata()) {
            use std::os::unix::fs::MetadataExt;
            if now.ino() != ours.ino() {
                f = std::fs::File::open(&vm.console_log)?;
                continue;
            }
        }
        std::thread::sleep(Duration::from_millis(250));
        if last_check.elapsed() > Duration::from_secs(2) {
            last_check = Instant::now();
            running = ctx.client.get(name)?.status == VmStatus::Running;
        }
    }
}

/// Picks the node's address from `ip -4 -o addr show`: eth0's, else a non-loopback
/// address on another interface than the pod bridge, else one on lo outside 127/8 (the
/// agent puts the node address there when the VM has no network device).
pub fn node_ip_from(ip_output: &str) -> Option<String> {
    let addrs: Vec<(String, String)> = ip_output
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let i = f.iter().position(|w| *w == "inet")?;
            let ifname = f.get(1)?.trim_end_matches(':').split('@').next()?.to_string();
            let addr = f.get(i + 1)?.split('/').next()?.to_string();
            Some((ifname, addr))
        })
        .filter(|(_, a)| !a.starts_with("127."))
        .collect();
    let pick = |pred: &dyn Fn(&str) -> bool| addrs.iter().find(|(i, _)| pred(i)).map(|(_, a)| a.clone());
    pick(&|i| i == "eth0")
        .or_else(|| pick(&|i| i != "lo" && i != "cni0" && !i.starts_with("veth") && !i.starts_with("kube-")))
        .or_else(|| pick(&|i| i == "lo"))
}

/// The node address the command line gives (kindling.ip=ADDR/PREFIX), else the default.
pub fn node_ip_from_cmdline(cmdline: Option<&str>) -> String {
    use kindling_proto::cmdline::{params, IP};
    params(cmdline.unwrap_or(""))
        .find(|(k, _)| *k == IP)
        .map(|(_, v)| v.split('/').next().unwrap_or(v).to_string())
        .unwrap_or_else(|| DEFAULT_NODE_IP.to_string())
}

/// `kindling ip`: the node's address as the node sees it.
pub fn ip(name: &str) -> Result<String> {
    let ctx = Ctx::connect()?;
    let (_, vm, agent) = ctx.running(name)?;
    match agent.exec_capture(&["ip", "-4", "-o", "addr", "show"], CAPTURE_DEADLINE) {
        Ok((0, out)) => Ok(node_ip_from(&out).unwrap_or_else(|| node_ip_from_cmdline(vm.spec.cmdline.as_deref()))),
        Ok((code, out)) => bail!("`ip -4 -o addr show` failed in the node (exit {code}): {}", out.trim()),
        Err(e) => Err(agent_error(e, name)),
    }
}

/// `kindling image load ARCHIVE`: into the node's containerd (namespace k8s.io).
pub fn image_load(name: &str, archive: &Path, say: &Say) -> Result<i32> {
    let mut f =
        std::fs::File::open(archive).with_context(|| format!("image archive {}: cannot open it", archive.display()))?;
    let meta = f.metadata()?;
    if !meta.is_file() || meta.len() == 0 {
        bail!(
            "image archive {}: not a non-empty file; give an OCI or docker archive (`docker save -o app.tar IMAGE`)",
            archive.display()
        );
    }
    let ctx = Ctx::connect()?;
    let (_, _, agent) = ctx.running(name)?;
    let t0 = Instant::now();
    say.line(format!(
        "loading {} ({:.1} MiB) into cluster {name:?}",
        archive.display(),
        meta.len() as f64 / (1 << 20) as f64
    ));
    let code = agent.import(&mut f, meta.len(), &mut |s| print_out(s)).map_err(|e| agent_error(e, name))?;
    if code == 0 {
        say.line(format!(
            "loaded in {:.1} s; pods can use its image names with imagePullPolicy: IfNotPresent (or Never)",
            t0.elapsed().as_secs_f64()
        ));
    }
    Ok(code)
}

/// `kindling service NAME --url`: host URLs of a service: a LoadBalancer's on the host
/// ports the node's controller gave it, else its NodePorts'.
pub fn service_urls(name: &str, service: &str, namespace: &str) -> Result<Vec<String>> {
    let ctx = Ctx::connect()?;
    let (r, _, agent) = ctx.running(name)?;
    urls_of(&r, &agent, service, namespace)
}

fn urls_of(r: &ClusterRecord, agent: &Agent, service: &str, namespace: &str) -> Result<Vec<String>> {
    let name = r.name.as_str();
    let jsonpath = r#"jsonpath={.spec.type}{"|"}{.spec.ports[*].nodePort}{"|"}{.spec.ports[*].port}{"|"}{.spec.ports[*].protocol}{"|"}{.status.loadBalancer.ingress[*].ip}"#;
    let (code, out) = agent
        .exec_capture(
            &["kubectl", "--kubeconfig", ADMIN_CONF, "-n", namespace, "get", "service", service, "-o", jsonpath],
            CAPTURE_DEADLINE,
        )
        .map_err(|e| agent_error(e, name))?;
    if code != 0 {
        bail!(
            "{} (list the services with `kindling kubectl{} -- get services -A`)",
            out.trim(),
            if name == DEFAULT_NAME { String::new() } else { format!(" --name {name}") }
        );
    }
    service_urls_from(&out, r, service, namespace)
}

/// `kindling ingress --url`: the host URLs of the ingress add-on's Traefik (its
/// LoadBalancer Service, `http://127.0.0.1:8080` and `https://127.0.0.1:8443`); an error
/// with the command that enables it when the cluster does not run it.
pub fn ingress_urls(name: &str) -> Result<Vec<String>> {
    use kindling_proto::addon;
    let ctx = Ctx::connect()?;
    let (r, _, agent) = ctx.running(name)?;
    let ingress = addon::find(addon::INGRESS).expect("in the catalogue");
    if !r.addon_enabled(ingress) {
        bail!(
            "cluster {name:?} does not run the ingress add-on; enable it with `kindling addons enable {}{}`",
            addon::INGRESS,
            if name == DEFAULT_NAME { String::new() } else { format!(" --name {name}") }
        );
    }
    urls_of(&r, &agent, addon::INGRESS_SERVICE, addon::INGRESS_NAMESPACE)
}

/// The URLs from kubectl's `type|nodePorts|ports|protocols|ingress IPs` of a service.
pub(super) fn service_urls_from(out: &str, r: &ClusterRecord, service: &str, namespace: &str) -> Result<Vec<String>> {
    let fields: Vec<&str> = out.trim().split('|').collect();
    let field = |i: usize| fields.get(i).copied().unwrap_or("").split_whitespace();
    let kind = fields.first().copied().unwrap_or("").trim();
    let node_ports: Vec<u16> = field(1).filter_map(|w| w.parse().ok()).collect();
    if kind == "LoadBalancer" && field(4).any(|ip| ip == "127.0.0.1") {
        let urls: Vec<String> = field(2)
            .zip(field(3))
            .filter(|(_, proto)| *proto == "TCP")
            .filter_map(|(port, _)| {
                let port: u16 = port.parse().ok()?;
                let scheme = if port == 443 { "https" } else { "http" };
                Some(format!("{scheme}://127.0.0.1:{}", kindling_proto::forward::host_port_for_service(port)?))
            })
            .collect();
        if !urls.is_empty() {
            return Ok(urls);
        }
    }
    if node_ports.is_empty() {
        bail!(
            "service {service:?} in namespace {namespace:?} is of type {kind} and has no NodePort; make it one with \
             `kubectl --context {} -n {namespace} patch service {service} -p '{{\"spec\":{{\"type\":\"NodePort\"}}}}'`",
            r.name
        );
    }
    node_ports
        .iter()
        .map(|&np| {
            ports::host_port_for(np, r.node_port_base)
                .map(|hp| format!("http://127.0.0.1:{hp}"))
                .with_context(|| format!("NodePort {np} is outside 30000-32767, the range forwarded to the host"))
        })
        .collect()
}

/// `kindling kubectl -- ARGS`: the host's kubectl with `--context <name>`.
pub fn kubectl(name: &str, args: &[String]) -> Result<i32> {
    check_name(name)?;
    let Some(kubectl) = crate::util::which("kubectl") else {
        bail!("kubectl is not on your PATH; install it with scripts/setup (it installs kubectl), or put a kubectl on PATH");
    };
    let path = kubeconfig::default_path();
    let doc = kubeconfig::load(&path)?;
    if !kubeconfig::has_context(&doc, name) {
        bail!(
            "the kubeconfig {} has no context {name:?}; `{}` writes it (a running cluster keeps it)",
            path.display(),
            command_for("start", name)
        );
    }
    let status = std::process::Command::new(&kubectl)
        .arg("--context")
        .arg(name)
        .args(args)
        .status()
        .with_context(|| format!("cannot run {}", kubectl.display()))?;
    Ok(status.code().unwrap_or_else(|| 128 + std::os::unix::process::ExitStatusExt::signal(&status).unwrap_or(0)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_address_from_ip_output() {
        let with_eth0 = "1: lo    inet 127.0.0.1/8 scope host lo\\       valid_lft forever preferred_lft forever\n\
                         2: eth0    inet 10.0.2.15/24 brd 10.0.2.255 scope global eth0\\       valid_lft forever\n\
                         3: cni0    inet 10.244.0.1/24 brd 10.244.0.255 scope global cni0\\       valid_lft forever\n";
        assert_eq!(node_ip_from(with_eth0).as_deref(), Some("10.0.2.15"));
        let on_lo = "1: lo    inet 127.0.0.1/8 scope host lo\n1: lo    inet 10.0.2.15/32 scope global lo\n3: cni0    inet 10.244.0.1/24 scope global cni0\n";
        assert_eq!(node_ip_from(on_lo).as_deref(), Some("10.0.2.15"));
        assert_eq!(node_ip_from("1: lo    inet 127.0.0.1/8 scope host lo\n"), None);
        assert_eq!(node_ip_from_cmdline(Some("console=ttyS0 kindling.ip=192.168.7.2/24")), "192.168.7.2");
        assert_eq!(node_ip_from_cmdline(None), "10.0.2.15");
    }

    #[test]
    fn service_urls_map_node_ports_to_host_ports() {
        let r = ClusterRecord {
            name: "dev".into(),
            api_port: 16443,
            node_port_base: 20000,
            disk_size_gib: 20,
            created_at: 0,
            addons: Default::default(),
            node: None,
            cloned_from: None,
        };
        assert_eq!(
            service_urls_from("NodePort|30080 31000|8080 9000|TCP TCP|", &r, "web", "default").unwrap(),
            ["http://127.0.0.1:20080", "http://127.0.0.1:21000"]
        );
        // A LoadBalancer the node serves: its own ports (a privileged one shifted by
        // 8000), UDP left out; while pending, its NodePorts.
        assert_eq!(
            service_urls_from("LoadBalancer|31000 31001 31002|80 9000 53|TCP TCP UDP|127.0.0.1", &r, "web", "default")
                .unwrap(),
            ["http://127.0.0.1:8080", "http://127.0.0.1:9000"]
        );
        // Port 443 (the ingress add-on's websecure) is HTTPS.
        assert_eq!(
            service_urls_from("LoadBalancer|31000 31001|80 443|TCP TCP|127.0.0.1", &r, "traefik", "ingress").unwrap(),
            ["http://127.0.0.1:8080", "https://127.0.0.1:8443"]
        );
        assert_eq!(
            service_urls_from("LoadBalancer|31000|80|TCP|", &r, "web", "default").unwrap(),
            ["http://127.0.0.1:21000"]
        );
        let e = service_urls_from("ClusterIP||8080|TCP|", &r, "web", "default").unwrap_err().to_string();
        assert!(e.contains("type ClusterIP and has no NodePort") && e.contains("--context dev"), "{e}");
    }
}
