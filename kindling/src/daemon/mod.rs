//! The provisioner daemon, `kindling daemon`: a JSON REST API on a UNIX socket that
//! creates, starts, stops, deletes, lists and inspects microVMs. Each VM is its own
//! `kindling boot` process, in its own session, so VMs outlive the daemon and a
//! restarted daemon re-attaches to them.
//!
//! - [`api`]: the request and response types (documented in kindling/openapi.yaml).
//! - [`state`]: the state directory, VM name rules, spec validation, `vm.json` records.
//! - [`vm_process`]: spawning, recognizing (pid + start time) and stopping VM processes.
//! - [`server`]: the HTTP routes (axum on tokio).
//! - [`client`]: the blocking client the CLI uses, which can start the daemon on demand.
//!
//! Files: `<state>/vms/<name>/{vm.json, console.log, vsock.sock, tmp/}`, where `<state>` is
//! `$KINDLING_STATE_DIR`, else `$XDG_STATE_HOME/kindling`, else
//! `~/.local/state/kindling`. The socket is `$XDG_RUNTIME_DIR/kindling/daemon.sock`, else
//! `<state>/daemon.sock` (`--socket`, or `KINDLING_SOCKET`, overrides it).

pub use kindling_proto::api;
pub mod client;
pub mod server;
pub mod state;
pub mod vm_process;

use std::path::PathBuf;

use clap::Args;

#[derive(Debug, Clone, Args)]
pub struct DaemonArgs {
    /// UNIX socket to serve the API on [default: $XDG_RUNTIME_DIR/kindling/daemon.sock,
    /// or <state dir>/daemon.sock without XDG_RUNTIME_DIR].
    #[arg(long, value_name = "PATH", env = "KINDLING_SOCKET")]
    pub socket: Option<PathBuf>,
}

/// `kindling daemon`: serves the API in the foreground until SIGTERM or SIGINT (VMs keep
/// running after it exits).
pub fn run(args: &DaemonArgs) -> anyhow::Result<i32> {
    let paths = state::Paths::from_env();
    let socket = match &args.socket {
        Some(s) => std::path::absolute(s)?,
        None => state::default_socket(&paths.state_dir),
    };
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(server::serve(paths, socket))?;
    Ok(0)
}
