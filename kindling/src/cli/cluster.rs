//! The cluster commands: `kindling start`, `status`, `list`, `stop`, `delete`, `logs`,
//! `kubectl`, `exec`, `ip`, `image load`, `service`, `ingress`. The work is in [`crate::cluster`];
//! this is the command line and the output.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Subcommand, ValueEnum};
use serde::Serialize;

use crate::cluster::{self, ClusterStatus, Say, DEFAULT_NAME};
use crate::runner::{self, RunnerKind};

/// `--output`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum Output {
    /// Lines for people.
    #[default]
    Text,
    /// One JSON document on stdout (progress goes to stderr).
    Json,
}

#[derive(Debug, Clone, Args)]
pub struct NameArg {
    /// The cluster (also its kubeconfig context and its node's hostname).
    #[arg(long, value_name = "NAME", default_value = DEFAULT_NAME, env = "KINDLING_CLUSTER")]
    pub name: String,
}

#[derive(Debug, Clone, Args)]
pub struct OutputArg {
    /// Output format.
    #[arg(long, short = 'o', value_enum, default_value_t = Output::Text)]
    pub output: Output,
}

/// The cluster commands (flattened into the top-level `kindling` commands).
#[derive(Debug, Subcommand)]
pub enum ClusterCommand {
    /// Create or start a Kubernetes cluster and wait until its node is Ready; merges a
    /// context named after it into your kubeconfig.
    ///
    /// The first start builds (or reuses) the guest kernel and root disk, copies the root
    /// disk for the cluster and boots it as a microVM through the kindling daemon (started
    /// on demand). Starting a stopped cluster keeps its data; starting a running one says
    /// so. The API server is forwarded to 127.0.0.1:<port from 16443>, and NodePorts
    /// 30000-32767 to the same host ports (shifted for a second cluster).
    Start(StartArgs),
    /// Show a cluster: VM state, node phases, API server URL, resources.
    Status(StatusArgs),
    /// List the clusters.
    List(ListArgs),
    /// Stop a cluster: suspend it to a snapshot (`start` resumes it in seconds), or with
    /// --shutdown power it off in order; its data is kept either way.
    Stop(StopArgs),
    /// Delete a cluster: its VM, its disk and its kubeconfig context, cluster and user.
    Delete(DeleteArgs),
    /// Show the VM's console, or with COMPONENT a node component's log (containerd,
    /// etcd, kube-apiserver, kube-controller-manager, kube-scheduler, kubelet, kube-proxy).
    Logs(LogsArgs),
    /// Run the host's kubectl against a cluster: `kindling kubectl -- get pods -A`.
    Kubectl(KubectlArgs),
    /// Run a command in the node (through its agent): `kindling exec -- crictl ps`.
    /// Exits with the command's exit code.
    Exec(ExecArgs),
    /// Print the node's IP address (as the node sees it).
    Ip(IpArgs),
    /// Images in the node's containerd.
    #[command(subcommand)]
    Image(ImageCommand),
    /// Print the host URL of a service: `kindling service web --url` (a LoadBalancer's
    /// host port on 127.0.0.1, else its NodePort's).
    Service(ServiceArgs),
    /// Print the host URLs of the ingress add-on (Traefik): `kindling ingress --url`
    /// (http://127.0.0.1:8080 and https://127.0.0.1:8443, ports 80 and 443 of the node's
    /// Ingresses); `curl -H 'Host: web.localhost' http://127.0.0.1:8080` reaches an
    /// Ingress for web.localhost.
    Ingress(UrlsArgs),
    /// Print a kubeconfig for a cluster (like `kind get kubeconfig`), or, with --vsock and
    /// --server, for a VM you booted yourself from kindling's root disk:
    /// `kindling boot ... --vsock /tmp/node.sock --forward 16443:6443`, then
    /// `kindling kubeconfig --vsock /tmp/node.sock --server https://127.0.0.1:16443 > kc`.
    Kubeconfig(KubeconfigArgs),
    /// The cluster's add-ons (storage-provisioner, ...): `kindling addons list`,
    /// `kindling addons disable storage-provisioner`. Remembered per cluster across stop
    /// and start.
    #[command(subcommand)]
    Addons(AddonsCommand),
}

#[derive(Debug, Subcommand)]
pub enum AddonsCommand {
    /// List the add-ons: name, version, whether the cluster runs them, what the node says
    /// of them (running, deploying, ...; when it runs), what they give.
    List(AddonsListArgs),
    /// Enable an add-on for the cluster: deployed now if it runs, else at its next start.
    Enable(AddonSetArgs),
    /// Disable an add-on: removes what enabling it added (now if the cluster runs, else at
    /// its next start). The storage add-on's volumes and their data are kept.
    Disable(AddonSetArgs),
}

#[derive(Debug, Clone, Args)]
pub struct AddonSetArgs {
    /// The add-on (see `kindling addons list`).
    #[arg(value_name = "ADDON")]
    pub addon: String,
    #[command(flatten)]
    pub name: NameArg,
    #[command(flatten)]
    pub output: OutputArg,
}

#[derive(Debug, Clone, Args)]
pub struct AddonsListArgs {
    #[command(flatten)]
    pub name: NameArg,
    #[command(flatten)]
    pub output: OutputArg,
}

#[derive(Debug, Clone, Args)]
pub struct KubeconfigArgs {
    #[command(flatten)]
    pub name: NameArg,
    /// The vsock socket of a VM started with `kindling boot --vsock PATH` (not a cluster).
    #[arg(long, value_name = "PATH", requires = "server")]
    pub vsock: Option<PathBuf>,
    /// With --vsock: the API server's URL on this host (its --forward), e.g.
    /// https://127.0.0.1:16443.
    #[arg(long, value_name = "URL", requires = "vsock")]
    pub server: Option<String>,
    /// Merge it into your kubeconfig ($KUBECONFIG or ~/.kube/config) as context NAME
    /// instead of printing it.
    #[arg(long)]
    pub merge: bool,
}

#[derive(Debug, Clone, Args)]
pub struct StartArgs {
    #[command(flatten)]
    pub name: NameArg,
    /// vCPUs of the node [default: 2; a restart keeps the cluster's]. The emulated runner
    /// gives the node 1 (KINDLING_EMULATED_SMP=1 keeps more).
    #[arg(long, value_name = "N")]
    pub cpus: Option<u32>,
    /// Memory of the node in MiB [default: 4096; a restart keeps the cluster's].
    #[arg(long, value_name = "MIB")]
    pub memory: Option<u64>,
    /// Size of the node's disk in GiB, allocated as it fills [default: 20]; a larger
    /// size on a restart grows the disk.
    #[arg(long = "disk-size", value_name = "GIB")]
    pub disk_size: Option<u64>,
    /// Where the VM runs: auto picks KVM when it can boot a stock kernel here, the
    /// emulated runner (much slower) otherwise [default: auto; a restart keeps the
    /// cluster's].
    #[arg(long, value_parser = runner::runner_arg())]
    pub runner: Option<RunnerKind>,
    /// How long to wait for the node to be Ready, in seconds [default: 2700].
    #[arg(long, value_name = "SECS")]
    pub wait: Option<u64>,
    /// (testing) Bring the node up only to PHASE (one of `kindling_proto::phase::ALL`:
    /// agent-start, etcd-ready, containerd-ready, images-ready, apiserver-ready,
    /// kubelet-registered, node-ready, coredns-running, dns-ready) and wait for it.
    #[arg(long, value_name = "PHASE", hide = true)]
    pub until: Option<String>,
    /// Add-ons to enable, comma-separated: on a new cluster in addition to the default
    /// ones; on an existing cluster in addition to those it has (remembered; deployed now
    /// if it is running). It never disables one: `kindling addons disable` does.
    #[arg(long, value_name = "ADDON[,ADDON]", value_delimiter = ',')]
    pub addons: Vec<String>,
    /// A new cluster cloned from the suspended cluster BASE (`kindling stop --name BASE`
    /// suspends it): a copy of its disk, its memory snapshot shared with it, its
    /// credentials and node; its own host ports. Back in seconds instead of a boot.
    #[arg(long, value_name = "BASE", conflicts_with_all = ["cpus", "memory", "disk_size", "runner", "until"])]
    pub from: Option<String>,
    #[command(flatten)]
    pub output: OutputArg,
}

#[derive(Debug, Clone, Args)]
pub struct StatusArgs {
    #[command(flatten)]
    pub name: NameArg,
    #[command(flatten)]
    pub output: OutputArg,
}

#[derive(Debug, Clone, Args)]
pub struct ListArgs {
    #[command(flatten)]
    pub output: OutputArg,
}

#[derive(Debug, Clone, Args)]
pub struct StopArgs {
    #[command(flatten)]
    pub name: NameArg,
    /// Seconds to wait for the node to power off before its VM process is stopped.
    #[arg(long, value_name = "SECS", default_value_t = cluster::DEFAULT_STOP_WAIT_SECS)]
    pub wait: u64,
    /// Power the node off in order instead of suspending it to a snapshot (the next
    /// start then boots it, which takes minutes rather than seconds).
    #[arg(long)]
    pub shutdown: bool,
    #[command(flatten)]
    pub output: OutputArg,
}

#[derive(Debug, Clone, Args)]
pub struct DeleteArgs {
    #[command(flatten)]
    pub name: NameArg,
    #[command(flatten)]
    pub output: OutputArg,
}

#[derive(Debug, Clone, Args)]
pub struct LogsArgs {
    /// A node component; without it, the VM's console.
    pub component: Option<String>,
    /// Keep printing what is appended (until Ctrl-C, or until the VM stops).
    #[arg(long, short = 'f')]
    pub follow: bool,
    #[command(flatten)]
    pub name: NameArg,
}

#[derive(Debug, Clone, Args)]
pub struct KubectlArgs {
    #[command(flatten)]
    pub name: NameArg,
    /// kubectl's arguments (after `--`).
    #[arg(trailing_var_arg = true, allow_hyphen_values = true, value_name = "ARGS")]
    pub args: Vec<String>,
}

#[derive(Debug, Clone, Args)]
pub struct ExecArgs {
    #[command(flatten)]
    pub name: NameArg,
    /// The command and its arguments (after `--`).
    #[arg(trailing_var_arg = true, allow_hyphen_values = true, required = true, value_name = "CMD")]
    pub argv: Vec<String>,
}

#[derive(Debug, Clone, Args)]
pub struct IpArgs {
    #[command(flatten)]
    pub name: NameArg,
    #[command(flatten)]
    pub output: OutputArg,
}

#[derive(Debug, Subcommand)]
pub enum ImageCommand {
    /// Load an image archive (OCI, or docker's `docker save` format) into the node's
    /// containerd, so pods can run it without a registry (imagePullPolicy: IfNotPresent).
    Load(ImageLoadArgs),
}

#[derive(Debug, Clone, Args)]
pub struct ImageLoadArgs {
    /// The archive, e.g. from `docker save -o app.tar app:dev`.
    #[arg(value_name = "ARCHIVE")]
    pub archive: PathBuf,
    #[command(flatten)]
    pub name: NameArg,
}

#[derive(Debug, Clone, Args)]
pub struct ServiceArgs {
    /// The service.
    #[arg(value_name = "SERVICE")]
    pub service: String,
    /// Its namespace.
    #[arg(long, short = 'n', default_value = "default")]
    pub namespace: String,
    #[command(flatten)]
    pub urls: UrlsArgs,
}

/// What `service` and `ingress` share.
#[derive(Debug, Clone, Args)]
pub struct UrlsArgs {
    /// Print the URLs (what the command does; accepted for minikube's habit).
    #[arg(long)]
    pub url: bool,
    #[command(flatten)]
    pub name: NameArg,
    #[command(flatten)]
    pub output: OutputArg,
}

fn say(output: Output) -> Say {
    Say { to_stderr: output == Output::Json }
}

fn print_json(v: &impl Serialize) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

/// Runs a cluster command; returns the process exit code.
pub fn run(cmd: ClusterCommand) -> anyhow::Result<i32> {
    match cmd {
        ClusterCommand::Start(a) => start(&a),
        ClusterCommand::Status(a) => {
            let s = cluster::status(&a.name.name)?;
            match a.output.output {
                Output::Json => print_json(&s)?,
                Output::Text => print_status(&s),
            }
            Ok(0)
        }
        ClusterCommand::List(a) => {
            let all = cluster::list()?;
            match a.output.output {
                Output::Json => print_json(&all)?,
                Output::Text => print_list(&all),
            }
            Ok(0)
        }
        ClusterCommand::Stop(a) => {
            let r = cluster::stop(&a.name.name, Duration::from_secs(a.wait), a.shutdown, &say(a.output.output))?;
            if a.output.output == Output::Json {
                print_json(&r)?;
            }
            Ok(0)
        }
        ClusterCommand::Delete(a) => {
            let r = cluster::delete(&a.name.name, &say(a.output.output))?;
            if a.output.output == Output::Json {
                print_json(&r)?;
            }
            Ok(0)
        }
        ClusterCommand::Logs(a) => cluster::logs(&a.name.name, a.component.as_deref(), a.follow),
        ClusterCommand::Kubectl(a) => cluster::kubectl(&a.name.name, &a.args),
        ClusterCommand::Exec(a) => cluster::exec(&a.name.name, &a.argv),
        ClusterCommand::Ip(a) => {
            let ip = cluster::ip(&a.name.name)?;
            match a.output.output {
                Output::Json => print_json(&serde_json::json!({ "name": a.name.name, "ip": ip }))?,
                Output::Text => println!("{ip}"),
            }
            Ok(0)
        }
        ClusterCommand::Kubeconfig(a) => {
            let source = match (&a.vsock, &a.server) {
                (Some(path), Some(server)) => {
                    cluster::KubeconfigSource::Vsock { path: path.clone(), server: server.clone() }
                }
                _ => cluster::KubeconfigSource::Cluster,
            };
            match cluster::kubeconfig(&a.name.name, &source, a.merge)? {
                (_, Some(path)) => eprintln!("merged context {:?} into {}", a.name.name, path.display()),
                (text, None) => print!("{text}"),
            }
            Ok(0)
        }
        ClusterCommand::Image(ImageCommand::Load(a)) => {
            cluster::image_load(&a.name.name, &a.archive, &Say { to_stderr: true })
        }
        ClusterCommand::Addons(AddonsCommand::List(a)) => {
            let all = cluster::addons(&a.name.name)?;
            match a.output.output {
                Output::Json => print_json(&all)?,
                Output::Text => {
                    println!("{:<20} {:<9} {:<9} {:<13} WHAT IT GIVES", "NAME", "VERSION", "STATUS", "ON THE NODE");
                    for s in &all {
                        let status = if s.enabled { "enabled" } else { "disabled" };
                        println!("{:<20} {:<9} {:<9} {:<13} {}", s.name, s.version, status, s.state(), s.gives);
                    }
                }
            }
            Ok(0)
        }
        ClusterCommand::Addons(AddonsCommand::Enable(a)) => addon_set(&a, true),
        ClusterCommand::Addons(AddonsCommand::Disable(a)) => addon_set(&a, false),
        ClusterCommand::Service(a) => {
            let urls = cluster::service_urls(&a.urls.name.name, &a.service, &a.namespace)?;
            match a.urls.output.output {
                Output::Json => {
                    print_json(&serde_json::json!({ "service": a.service, "namespace": a.namespace, "urls": urls }))?
                }
                Output::Text => urls.iter().for_each(|u| println!("{u}")),
            }
            Ok(0)
        }
        ClusterCommand::Ingress(a) => {
            let urls = cluster::ingress_urls(&a.name.name)?;
            match a.output.output {
                Output::Json => print_json(&serde_json::json!({ "urls": urls }))?,
                Output::Text => urls.iter().for_each(|u| println!("{u}")),
            }
            Ok(0)
        }
    }
}

fn addon_set(a: &AddonSetArgs, enable: bool) -> anyhow::Result<i32> {
    let r = cluster::set_addon(&a.name.name, &a.addon, enable, &say(a.output.output))?;
    if a.output.output == Output::Json {
        print_json(&r)?;
    }
    Ok(0)
}

fn start(a: &StartArgs) -> anyhow::Result<i32> {
    let out = a.output.output;
    let s = say(out);
    let opts = cluster::StartOptions {
        name: a.name.name.clone(),
        cpus: a.cpus,
        memory_mib: a.memory,
        disk_size_gib: a.disk_size,
        runner: a.runner,
        wait: a.wait.map(Duration::from_secs),
        until: a.until.clone(),
        addons: a.addons.clone(),
        from: a.from.clone(),
    };
    let r = cluster::start(&opts, &s)?;
    if out == Output::Json {
        print_json(&r)?;
        return Ok(0);
    }
    if r.already_running {
        return Ok(0);
    }
    let name = &r.name;
    let reached = r.phases.iter().find(|p| p.name == r.target_phase).map(|p| p.seconds).unwrap_or(0.0);
    println!();
    let state = if r.target_phase == cluster::READY_PHASE {
        "is Ready".to_string()
    } else {
        format!("reached {}", r.target_phase)
    };
    if r.resumed {
        println!("cluster {name:?} {state}: resumed from its snapshot; `kindling start` took {}", human(r.seconds));
    } else {
        println!(
            "cluster {name:?} {state}: the node took {reached:.1} s from kernel start; `kindling start` took {}",
            human(r.seconds)
        );
    }
    println!("  API server  {}", r.api_server);
    println!("  NodePorts   {} (node ports 30000-32767)", r.node_ports);
    if let Some(k) = &r.kubeconfig {
        println!("  kubeconfig  {} (context {name:?}, now the current context)", k.display());
    }
    println!();
    println!("Use it:");
    println!("  kubectl --context {name} get nodes");
    let flag = if name == DEFAULT_NAME { String::new() } else { format!(" --name {name}") };
    println!("  kindling kubectl{flag} -- get pods -A");
    println!("  kindling service{flag} SERVICE --url     # host URL of a NodePort or LoadBalancer service");
    println!("  {}", cluster::command_for("stop", name));
    Ok(0)
}

fn human(secs: f64) -> String {
    let s = secs.round() as u64;
    if s >= 60 {
        format!("{}m {:02}s", s / 60, s % 60)
    } else {
        format!("{secs:.1} s")
    }
}

/// A duration in words: "42 s", "5 min", "3 h", "2 days".
fn ago_text(secs: u64) -> String {
    match secs {
        0..120 => format!("{secs} s"),
        120..7200 => format!("{} min", secs / 60),
        7200..172_800 => format!("{} h", secs / 3600),
        _ => format!("{} days", secs / 86_400),
    }
}

fn print_status(s: &ClusterStatus) {
    let resumed = if s.resumed == Some(true) { ", resumed from a snapshot" } else { "" };
    let state = match s.ready {
        Some(true) => format!("{} (node Ready{resumed})", s.status),
        Some(false) => format!("{} (node not Ready yet{resumed})", s.status),
        None => s.status.clone(),
    };
    println!("cluster     {}", s.name);
    println!("status      {state}");
    if let Some(base) = &s.cloned_from {
        println!("clone of    {base} (its node {:?}, CA and credentials)", s.node);
    }
    println!("API server  {}", s.api_server);
    println!("NodePorts   {} (node ports 30000-32767)", s.node_ports);
    if let (Some(c), Some(m)) = (s.cpus, s.memory_mib) {
        let used = s
            .disk_allocated_bytes
            .map(|b| format!(", {:.1} GiB used", b as f64 / (1u64 << 30) as f64))
            .unwrap_or_default();
        println!("resources   {c} vCPU{}, {m} MiB, disk {} GiB{used}", if c == 1 { "" } else { "s" }, s.disk_size_gib);
    }
    if let Some(b) = s.snapshot_bytes {
        println!(
            "snapshot    {:.0} MiB on disk{}; `{}` resumes it",
            b as f64 / (1u64 << 20) as f64,
            s.snapshot_taken_at
                .and_then(|t| crate::daemon::state::now_secs().checked_sub(t))
                .map(|ago| format!(", taken {} ago", ago_text(ago)))
                .unwrap_or_default(),
            cluster::command_for("start", &s.name)
        );
    }
    if let Some(r) = &s.runner {
        println!("runner      {r}");
    }
    match &s.context {
        Some(c) => println!("kubeconfig  context {c:?} in {}", s.kubeconfig.display()),
        None => println!(
            "kubeconfig  no context {:?} in {} (`{}` writes it)",
            s.name,
            s.kubeconfig.display(),
            cluster::command_for("start", &s.name)
        ),
    }
    if let Some(p) = &s.phases {
        let list: Vec<String> = p.iter().map(|p| format!("{} {:.1} s", p.name, p.seconds)).collect();
        println!("phases      {}", if list.is_empty() { "none yet".to_string() } else { list.join(", ") });
    }
    if let Some(e) = &s.agent_error {
        println!("agent       {e}");
    }
    if let Some(c) = &s.console_log {
        println!("console     {}", c.display());
    }
    if s.status == "missing" {
        println!("its VM is gone; `{}` creates it again", cluster::command_for("start", &s.name));
    }
}

fn print_list(all: &[ClusterStatus]) {
    if all.is_empty() {
        println!("no clusters; create one with `kindling start`");
        return;
    }
    println!("{:<20} {:<10} {:>5} {:>10} {:>9}  API SERVER", "NAME", "STATUS", "CPUS", "MEMORY", "DISK");
    for s in all {
        println!(
            "{:<20} {:<10} {:>5} {:>10} {:>9}  {}",
            s.name,
            s.status,
            s.cpus.map(|c| c.to_string()).unwrap_or_else(|| "-".into()),
            s.memory_mib.map(|m| format!("{m} MiB")).unwrap_or_else(|| "-".into()),
            format!("{} GiB", s.disk_size_gib),
            s.api_server
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::{Cli, Command};
    use clap::Parser;

    fn parse(args: &[&str]) -> ClusterCommand {
        let cli = Cli::try_parse_from(std::iter::once("kindling").chain(args.iter().copied()))
            .unwrap_or_else(|e| panic!("{args:?}: {e}"));
        match cli.command {
            Command::Cluster(c) => c,
            other => panic!("{args:?} parsed as {other:?}"),
        }
    }

    fn parse_err(args: &[&str]) -> String {
        Cli::try_parse_from(std::iter::once("kindling").chain(args.iter().copied())).unwrap_err().to_string()
    }

    #[test]
    fn start_defaults_and_options() {
        // Defaults are applied by `start` itself, so that a restart can tell "not given".
        let ClusterCommand::Start(a) = parse(&["start"]) else { panic!() };
        assert_eq!(a.name.name, "kindling");
        assert_eq!((a.cpus, a.memory, a.disk_size, a.runner, a.wait), (None, None, None, None, None));
        assert_eq!(a.output.output, Output::Text);
        let ClusterCommand::Start(a) = parse(&[
            "start",
            "--name",
            "dev",
            "--cpus",
            "4",
            "--memory",
            "8192",
            "--disk-size",
            "40",
            "--runner",
            "emulated",
            "--wait",
            "60",
            "-o",
            "json",
        ]) else {
            panic!()
        };
        assert_eq!(a.name.name, "dev");
        assert_eq!(
            (a.cpus, a.memory, a.disk_size, a.runner, a.wait),
            (Some(4), Some(8192), Some(40), Some(RunnerKind::Emulated), Some(60))
        );
        assert_eq!(a.output.output, Output::Json);
        assert!(a.addons.is_empty());
        let ClusterCommand::Start(a) = parse(&["start", "--addons", "storage-provisioner,x", "--addons", "y"]) else {
            panic!()
        };
        assert_eq!(a.addons, ["storage-provisioner", "x", "y"], "names are checked by `start`, against the catalogue");
        assert!(parse_err(&["start", "--runner", "xen"]).contains("invalid value 'xen'"));
        assert!(parse_err(&["start", "--cpus", "two"]).contains("invalid value 'two'"));
        let ClusterCommand::Start(a) = parse(&["start", "--name", "ci-7", "--from", "base"]) else { panic!() };
        assert_eq!((a.name.name.as_str(), a.from.as_deref()), ("ci-7", Some("base")));
        for fixed in [&["--cpus", "2"][..], &["--memory", "2048"], &["--disk-size", "30"], &["--runner", "kvm"]] {
            let e = parse_err(&[&["start", "--from", "base"][..], fixed].concat());
            assert!(e.contains("cannot be used with"), "--from with {fixed:?}: {e}");
        }
    }

    #[test]
    fn kubectl_and_exec_take_everything_after_the_separator() {
        let ClusterCommand::Kubectl(a) = parse(&["kubectl", "--", "get", "pods", "-A"]) else { panic!() };
        assert_eq!(
            (a.name.name.as_str(), a.args.as_slice()),
            ("kindling", &["get".to_string(), "pods".into(), "-A".into()][..])
        );
        let ClusterCommand::Kubectl(a) = parse(&["kubectl", "--name", "dev", "--", "--context", "x", "get", "ns"])
        else {
            panic!()
        };
        assert_eq!(a.name.name, "dev");
        assert_eq!(a.args, ["--context", "x", "get", "ns"]);
        let ClusterCommand::Kubectl(a) = parse(&["kubectl", "get", "nodes", "-o", "wide"]) else { panic!() };
        assert_eq!(a.args, ["get", "nodes", "-o", "wide"]);
        let ClusterCommand::Exec(a) = parse(&["exec", "--name", "dev", "--", "ls", "-l", "/"]) else { panic!() };
        assert_eq!(
            (a.name.name.as_str(), a.argv.as_slice()),
            ("dev", &["ls".to_string(), "-l".into(), "/".into()][..])
        );
        assert!(parse_err(&["exec"]).contains("required"));
    }

    #[test]
    fn the_other_commands() {
        let ClusterCommand::Logs(a) = parse(&["logs", "kubelet", "-f", "--name", "dev"]) else { panic!() };
        assert_eq!((a.component.as_deref(), a.follow, a.name.name.as_str()), (Some("kubelet"), true, "dev"));
        let ClusterCommand::Logs(a) = parse(&["logs"]) else { panic!() };
        assert_eq!((a.component, a.follow), (None, false));
        let ClusterCommand::Image(ImageCommand::Load(a)) = parse(&["image", "load", "app.tar"]) else { panic!() };
        assert_eq!(a.archive, PathBuf::from("app.tar"));
        let ClusterCommand::Service(a) = parse(&["service", "web", "--url", "-n", "apps"]) else { panic!() };
        assert_eq!((a.service.as_str(), a.namespace.as_str(), a.urls.url), ("web", "apps", true));
        let ClusterCommand::Service(a) = parse(&["service", "web"]) else { panic!() };
        assert_eq!(a.namespace, "default");
        let ClusterCommand::Ingress(a) = parse(&["ingress", "--url", "-o", "json"]) else { panic!() };
        assert!(a.url && a.output.output == Output::Json);
        let ClusterCommand::Stop(a) = parse(&["stop"]) else { panic!() };
        assert_eq!(a.wait, 120);
        let ClusterCommand::Status(a) = parse(&["status", "-o", "json"]) else { panic!() };
        assert_eq!(a.output.output, Output::Json);
        assert!(matches!(
            parse(&["list", "--output", "json"]),
            ClusterCommand::List(ListArgs { output: OutputArg { output: Output::Json } })
        ));
        assert!(matches!(parse(&["delete", "--name", "x"]), ClusterCommand::Delete(_)));
        assert!(matches!(parse(&["ip"]), ClusterCommand::Ip(_)));
        let ClusterCommand::Addons(AddonsCommand::List(a)) = parse(&["addons", "list", "-o", "json", "--name", "x"])
        else {
            panic!()
        };
        assert_eq!((a.name.name.as_str(), a.output.output), ("x", Output::Json));
        let ClusterCommand::Addons(AddonsCommand::Disable(a)) =
            parse(&["addons", "disable", "storage-provisioner", "--name", "x", "-o", "json"])
        else {
            panic!()
        };
        assert_eq!(
            (a.addon.as_str(), a.name.name.as_str(), a.output.output),
            ("storage-provisioner", "x", Output::Json)
        );
        let ClusterCommand::Addons(AddonsCommand::Enable(a)) = parse(&["addons", "enable", "storage-provisioner"])
        else {
            panic!()
        };
        assert_eq!((a.addon.as_str(), a.name.name.as_str()), ("storage-provisioner", "kindling"));
        assert!(parse_err(&["addons", "enable"]).contains("ADDON"));
        assert!(parse_err(&["image", "load"]).contains("ARCHIVE"));
        assert!(parse_err(&["service"]).contains("SERVICE"));
    }

    #[test]
    fn every_command_has_help() {
        use clap::CommandFactory;
        let cmd = Cli::command();
        for name in [
            "start",
            "status",
            "list",
            "stop",
            "delete",
            "logs",
            "kubectl",
            "exec",
            "ip",
            "image",
            "service",
            "kubeconfig",
            "addons",
        ] {
            let sub = cmd.find_subcommand(name).unwrap_or_else(|| panic!("no subcommand {name}"));
            assert!(sub.get_about().is_some_and(|a| !a.to_string().is_empty()), "{name} has no help");
        }
        let help = parse_err(&["start", "--help"]);
        for flag in
            ["--name", "--cpus", "--memory", "--disk-size", "--runner", "--wait", "--addons", "--from", "--output"]
        {
            assert!(help.contains(flag), "start --help lacks {flag}:\n{help}");
        }
    }

    #[test]
    fn durations_read_well() {
        assert_eq!(human(12.34), "12.3 s");
        assert_eq!(human(754.0), "12m 34s");
    }
}
