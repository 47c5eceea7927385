//! A benchmark's own cluster: `kindling` commands of one executable on a state
//! directory, kubeconfig and daemon of their own, so a benchmark never touches the
//! user's clusters. Dropping it deletes the cluster and stops that daemon.

use std::path::PathBuf;
use std::process::{Command, Stdio};

use super::BenchArgs;

/// The cluster every benchmark makes (in its own state directory).
pub const NAME: &str = "bench";

/// A clone of it (`start --from bench`), where a benchmark makes one.
pub const CLONE: &str = "bench-clone";

pub struct Cluster {
    exe: PathBuf,
    dir: tempfile::TempDir,
}

impl Cluster {
    /// A cluster of `--kindling-exe` (else this executable) in a new temporary directory
    /// named after `workload`.
    pub fn new(args: &BenchArgs, workload: &str) -> anyhow::Result<Self> {
        let exe = match &args.kindling_exe {
            Some(exe) => exe.clone(),
            None => std::env::current_exe()?,
        };
        Ok(Self { exe, dir: tempfile::Builder::new().prefix(&format!("kindling-bench-{workload}-")).tempdir()? })
    }

    /// Builds (or finds cached) the kernel and root disk, so no timed start includes them.
    pub fn build_images(&self) -> anyhow::Result<()> {
        eprintln!("kindling bench: the kernel and root disk first (cached after one build; not timed)");
        self.text(&["images", "build"]).map(drop)
    }

    fn command(&self, args: &[&str]) -> Command {
        let state = self.dir.path().join("state");
        let mut cmd = Command::new(&self.exe);
        cmd.args(args)
            .env("KINDLING_STATE_DIR", &state)
            .env("KINDLING_SOCKET", state.join("daemon.sock"))
            .env("KUBECONFIG", self.dir.path().join("kubeconfig"))
            .stdin(Stdio::null())
            .stderr(Stdio::inherit());
        cmd
    }

    /// Runs `kindling ARGS --name bench --output json`; its JSON report.
    pub fn run(&self, args: &[&str]) -> anyhow::Result<serde_json::Value> {
        self.run_as(NAME, args)
    }

    /// Runs `kindling ARGS --name NAME --output json`; its JSON report.
    pub fn run_as(&self, name: &str, args: &[&str]) -> anyhow::Result<serde_json::Value> {
        let out = self.command(args).args(["--name", name, "--output", "json"]).output()?;
        anyhow::ensure!(out.status.success(), "`kindling {}` failed ({})", args.join(" "), out.status);
        Ok(serde_json::from_slice(&out.stdout)?)
    }

    /// Runs `kindling ARGS` as given (the caller names the cluster); its stdout. Its
    /// stderr is kept for the error.
    pub fn text(&self, args: &[&str]) -> anyhow::Result<String> {
        let out = self.command(args).stderr(Stdio::piped()).output()?;
        anyhow::ensure!(
            out.status.success(),
            "`kindling {}` failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if self.dir.path().join("state").join("clusters").join(format!("{CLONE}.json")).exists() {
            let _ = self.run_as(CLONE, &["delete"]);
        }
        let _ = self.run(&["delete"]);
        // The daemon the commands started on demand (its pid is in its lock file).
        let lock = self.dir.path().join("state").join("daemon.lock");
        if let Some(pid) = std::fs::read_to_string(lock).ok().and_then(|p| p.trim().parse::<i32>().ok()) {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGTERM);
        }
    }
}

/// The `seconds` of a command's JSON report.
pub fn seconds(v: &serde_json::Value) -> anyhow::Result<f64> {
    v["seconds"].as_f64().ok_or_else(|| anyhow::anyhow!("no \"seconds\" in {v}"))
}
