//! Supervision of the node's components: each runs as a child of the agent with its
//! output in /var/log/kindling/<name>.log (and, when asked on the kernel command line
//! with `kindling.console=<name>|all`, prefixed on the console). A component that exits
//! is restarted with exponential backoff (1 s doubling to 30 s), and the exit is logged.
//!
//! PID 1 reaps every process in the VM, so one reaper thread owns waitpid(-1) and hands
//! the statuses of supervised children to their watchers.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::phase;

/// How to run one component.
#[derive(Clone, Debug)]
pub struct Spec {
    pub name: &'static str,
    pub argv: Vec<String>,
    pub env: Vec<(String, String)>,
}

type Waiters = Arc<Mutex<HashMap<i32, Sender<i32>>>>;

/// Reaps every child of PID 1; forwards supervised children's exit codes.
pub struct Reaper {
    waiters: Waiters,
}

impl Reaper {
    /// A reaper without its reaping thread, for tests that run no command through it
    /// (a reaping thread would reap the test process's other children).
    #[cfg(test)]
    pub fn idle() -> Arc<Self> {
        Arc::new(Self { waiters: Arc::default() })
    }

    pub fn start() -> Arc<Self> {
        let waiters: Waiters = Arc::default();
        let w = waiters.clone();
        std::thread::Builder::new()
            .name("reaper".into())
            .spawn(move || loop {
                let mut status = 0;
                // SAFETY: waitpid with a valid status pointer.
                let pid = unsafe { libc::waitpid(-1, &mut status, 0) };
                if pid < 0 {
                    std::thread::sleep(Duration::from_millis(200)); // no children yet
                    continue;
                }
                let code =
                    if libc::WIFEXITED(status) { libc::WEXITSTATUS(status) } else { 128 + libc::WTERMSIG(status) };
                if let Some(tx) = w.lock().unwrap().remove(&pid) {
                    let _ = tx.send(code);
                }
            })
            .expect("reaper thread");
        Arc::new(Self { waiters })
    }

    /// Spawns `cmd` and returns its pid and a receiver for its exit code. The map lock
    /// is held across the spawn so the reaper cannot reap the child before it is known.
    fn spawn(&self, cmd: &mut Command) -> std::io::Result<(i32, Receiver<i32>)> {
        let mut map = self.waiters.lock().unwrap();
        let child = cmd.spawn()?;
        let pid = child.id() as i32;
        let (tx, rx) = channel();
        map.insert(pid, tx);
        std::mem::forget(child); // reaped by the reaper thread, not by Child::wait
        Ok((pid, rx))
    }

    /// Runs a command to completion (for short helper commands such as kubectl).
    pub fn run(&self, argv: &[&str]) -> std::io::Result<(i32, String)> {
        let mut cmd = Command::new(argv[0]);
        cmd.args(&argv[1..]).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut map = self.waiters.lock().unwrap();
        let mut child = cmd.spawn()?;
        let pid = child.id() as i32;
        let (tx, rx) = channel();
        map.insert(pid, tx);
        drop(map);
        // Drain stderr on its own thread so neither pipe can fill up and stall the child.
        let err_thread = child.stderr.take().map(|mut e| {
            std::thread::spawn(move || {
                let mut err = String::new();
                let _ = std::io::Read::read_to_string(&mut e, &mut err);
                err
            })
        });
        let mut out = String::new();
        if let Some(mut o) = child.stdout.take() {
            let _ = std::io::Read::read_to_string(&mut o, &mut out);
        }
        let err = err_thread.and_then(|t| t.join().ok()).unwrap_or_default();
        std::mem::forget(child);
        let code = rx.recv().unwrap_or(-1);
        if code != 0 {
            out.push_str(&err);
        }
        Ok((code, out))
    }
}

impl Reaper {
    /// Runs a command to completion, handing its output (stdout and stderr, merged) to
    /// `on_output` as it comes. If `on_output` fails (its reader went away), the
    /// command is killed. Returns the exit code.
    pub fn run_streaming(
        &self,
        argv: &[&str],
        on_output: &mut dyn FnMut(&[u8]) -> std::io::Result<()>,
    ) -> std::io::Result<i32> {
        let (mut reader, writer) = std::io::pipe()?;
        let mut cmd = Command::new(argv[0]);
        cmd.args(&argv[1..]).stdin(Stdio::null()).stdout(writer.try_clone()?).stderr(writer).process_group(0);
        let (pid, exited) = self.spawn(&mut cmd)?;
        drop(cmd); // close our copies of the pipe's write end
        let mut buf = vec![0; 32 * 1024];
        loop {
            match std::io::Read::read(&mut reader, &mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if on_output(&buf[..n]).is_err() {
                        // SAFETY: killing the process group of a child we started.
                        unsafe { libc::kill(-pid, libc::SIGKILL) };
                        break;
                    }
                }
            }
        }
        Ok(exited.recv().unwrap_or(-1))
    }
}

/// A running, supervised component.
pub struct Component {
    pub name: &'static str,
    pub log: PathBuf,
    pid: Arc<Mutex<Option<i32>>>,
    stopping: Arc<AtomicBool>,
    done: Receiver<()>,
}

impl Component {
    pub fn start(spec: Spec, reaper: Arc<Reaper>, log_dir: &Path, console: bool) -> std::io::Result<Self> {
        std::fs::create_dir_all(log_dir)?;
        let log = log_dir.join(format!("{}.log", spec.name));
        let pid = Arc::new(Mutex::new(None));
        let stopping = Arc::new(AtomicBool::new(false));
        let (done_tx, done) = channel();
        let name = spec.name;
        let (p, s, l) = (pid.clone(), stopping.clone(), log.clone());
        std::thread::Builder::new().name(format!("sup-{}", spec.name)).spawn(move || {
            let mut backoff = Duration::from_secs(1);
            while !s.load(Ordering::SeqCst) {
                let started = Instant::now();
                match run_once(&spec, &reaper, &l, console, &p) {
                    Ok(code) if s.load(Ordering::SeqCst) => phase::log(format!("{} stopped (exit {code})", spec.name)),
                    Ok(code) => phase::log(format!(
                        "{} exited with {code}; restarting in {}s; last errors in {}:\n{}",
                        spec.name,
                        backoff.as_secs(),
                        l.display(),
                        last_errors(&l, 5)
                    )),
                    Err(e) => {
                        phase::log(format!("{} could not start: {e}; retrying in {}s", spec.name, backoff.as_secs()))
                    }
                }
                *p.lock().unwrap() = None;
                if s.load(Ordering::SeqCst) {
                    break;
                }
                if started.elapsed() > Duration::from_secs(60) {
                    backoff = Duration::from_secs(1); // it ran fine for a while: start over
                }
                std::thread::sleep(backoff);
                backoff = (backoff * 2).min(Duration::from_secs(30));
            }
            let _ = done_tx.send(());
        })?;
        Ok(Self { name, log, pid, stopping, done })
    }

    /// SIGTERM, then SIGKILL after `grace`.
    pub fn stop(&self, grace: Duration) {
        self.stopping.store(true, Ordering::SeqCst);
        if let Some(pid) = *self.pid.lock().unwrap() {
            // SAFETY: signalling a child we started.
            unsafe { libc::kill(pid, libc::SIGTERM) };
        }
        if self.done.recv_timeout(grace).is_err() {
            if let Some(pid) = *self.pid.lock().unwrap() {
                // SAFETY: as above.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
            let _ = self.done.recv_timeout(Duration::from_secs(5));
        }
    }

    /// The last `n` lines of the component's log.
    pub fn tail(&self, n: usize) -> String {
        tail(&self.log, n)
    }
}

/// The last `n` error or fatal lines (klog's `E`/`F` prefixes, or "error" anywhere) of a
/// log, or its last `n` lines when it has none: what explains an exit.
pub fn last_errors(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let errors: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with('E') || l.starts_with('F') || l.to_ascii_lowercase().contains("error"))
        .collect();
    if errors.is_empty() {
        return tail(path, n);
    }
    errors[errors.len().saturating_sub(n)..].join("\n")
}

/// The last `n` lines of a file.
pub fn tail(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

fn run_once(
    spec: &Spec,
    reaper: &Reaper,
    log: &Path,
    console: bool,
    pid_slot: &Mutex<Option<i32>>,
) -> std::io::Result<i32> {
    let mut file = std::fs::OpenOptions::new().create(true).append(true).open(log)?;
    writeln!(file, "--- kindling-agent: starting {} at {:.2}s: {}", spec.name, phase::uptime(), spec.argv.join(" "))?;
    let (reader, writer) = std::io::pipe()?;
    let mut cmd = Command::new(&spec.argv[0]);
    cmd.args(&spec.argv[1..])
        .envs(spec.env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(writer.try_clone()?)
        .stderr(writer)
        .process_group(0);
    let (pid, exited) = reaper.spawn(&mut cmd)?;
    drop(cmd); // close our copies of the pipe's write end
    *pid_slot.lock().unwrap() = Some(pid);
    let name = spec.name;
    for line in BufReader::new(reader).lines().map_while(Result::ok) {
        let _ = writeln!(file, "{line}");
        if console {
            println!("[{name}] {line}");
        }
    }
    Ok(exited.recv().unwrap_or(-1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn last_errors_prefers_klog_errors_over_noise() {
        let d = tempfile::tempdir().unwrap();
        let log = d.path().join("x.log");
        std::fs::write(
            &log,
            "I0101 started\nE0101 etcd: context deadline exceeded\nTrace[1]: noise\nTrace[1]: more noise\n",
        )
        .unwrap();
        assert_eq!(last_errors(&log, 5), "E0101 etcd: context deadline exceeded");
        std::fs::write(&log, "a\nb\nc\n").unwrap();
        assert_eq!(last_errors(&log, 2), "b\nc");
    }
}
