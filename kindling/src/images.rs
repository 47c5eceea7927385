//! `kindling images build`: builds the guest kernel and root disk from the recipes in
//! `images/` (embedded in this binary), step by step, each cached under
//! `<cache>/images/<step>-<key>/` where the key hashes the step's recipe files, the
//! keys of the steps it consumes, and the versions of the tools it runs. A step whose
//! key is cached is skipped; a failed step names itself, shows the tail of its log and
//! leaves nothing in the cache.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use crate::cache;

mod recipes {
    include!(concat!(env!("OUT_DIR"), "/recipes.rs"));
}

/// A build step: `images/<name>/build.sh OUT_DIR [dependency outputs...]`.
pub struct Step {
    pub name: &'static str,
    /// Steps whose output directories are passed as arguments, in order.
    pub deps: &'static [&'static str],
    /// Commands whose output is part of the key (toolchain and source versions).
    pub probes: &'static [&'static [&'static str]],
    /// The artifact `images path <step>` prints, relative to the output directory.
    pub artifact: &'static str,
    /// Folders of images/ besides its own that the recipe sources (part of its key).
    pub shared: &'static [&'static str],
    /// The recipe needs root (mmdebstrap's root mode, file ownership in the image): an
    /// ordinary user's build runs it with `sudo -n`, as scripts/setup installs packages,
    /// and takes its output back.
    pub root: bool,
}

/// In dependency order. `agent` is not a recipe: it is the kindling-agent binary.
pub const STEPS: &[Step] = &[
    Step {
        name: "kernel",
        deps: &[],
        probes: &[&["dpkg-query", "-W", "linux-source-6.1"], &["gcc", "--version"]],
        artifact: "bzImage",
        shared: &[],
        root: false,
    },
    Step { name: "k8s", deps: &[], probes: &[GO_VERSION], artifact: "bin", shared: &["lib"], root: false },
    Step { name: "etcd", deps: &[], probes: &[GO_VERSION], artifact: "bin", shared: &["lib"], root: false },
    Step { name: "coredns", deps: &[], probes: &[GO_VERSION], artifact: "bin", shared: &["lib"], root: false },
    Step {
        name: "local-path-provisioner",
        deps: &[],
        probes: &[GO_VERSION],
        artifact: "bin",
        shared: &["lib"],
        root: false,
    },
    Step { name: "metrics-server", deps: &[], probes: &[GO_VERSION], artifact: "bin", shared: &["lib"], root: false },
    Step { name: "traefik", deps: &[], probes: &[GO_VERSION], artifact: "bin", shared: &["lib"], root: false },
    Step {
        name: "oci",
        deps: &["coredns", "local-path-provisioner", "metrics-server", "traefik"],
        probes: &[&["gcc", "--version"], &["dpkg-query", "-W", "busybox-static"]],
        artifact: "images.txt",
        shared: &["lib"],
        root: false,
    },
    Step {
        name: "rootfs",
        deps: &["k8s", "etcd", "oci", "agent"],
        probes: &[],
        artifact: "rootfs.ext4",
        shared: &["lib"],
        root: true,
    },
];

/// The recipes also find Go in /usr/local/go/bin; so does the key.
const GO_VERSION: &[&str] = &["sh", "-c", "PATH=$PATH:/usr/local/go/bin go version"];

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("unknown image step '{0}'; steps are: kernel, k8s, etcd, coredns, local-path-provisioner, metrics-server, traefik, oci, rootfs")]
    UnknownStep(String),
    #[error("step '{step}' failed ({status}); last lines of {log}:\n{tail}")]
    StepFailed { step: String, status: String, log: String, tail: String },
    #[error("the guest agent binary (kindling-agent) was not found beside {0} nor on PATH; build it with `cargo build --release -p kindling-agent` (scripts/setup does) or name it with KINDLING_AGENT=PATH")]
    NoAgent(PathBuf),
    #[error("step '{0}' has not been built yet; run `kindling images build {0}`")]
    NotBuilt(String),
    #[error("images: {what}: {err}")]
    Io { what: String, err: std::io::Error },
    #[error("step '{0}' needs root (mmdebstrap's root mode) and runs itself with sudo for an ordinary user, but `sudo -n` cannot run here: run `sudo -v` first (sudo then asks for your password once), or build the images as root")]
    NeedsRoot(String),
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> ImageError {
    let what = what.into();
    move |err| ImageError::Io { what, err }
}

fn step(name: &str) -> Result<&'static Step, ImageError> {
    STEPS.iter().find(|s| s.name == name).ok_or_else(|| ImageError::UnknownStep(name.into()))
}

/// The recipe files of one step (path relative to images/, content).
fn recipe_files(step: &str) -> impl Iterator<Item = (&'static str, &'static [u8])> + '_ {
    let prefix = format!("{step}/");
    recipes::RECIPE_FILES.iter().copied().filter(move |(p, _)| p.starts_with(&prefix))
}

/// The guest agent binary packed into the root disk: `$KINDLING_AGENT`, else
/// `kindling-agent` beside this executable (same build), else on PATH.
pub fn agent_binary() -> Result<PathBuf, ImageError> {
    if let Some(p) = std::env::var_os("KINDLING_AGENT") {
        return Ok(PathBuf::from(p));
    }
    let exe = std::env::current_exe().map_err(io("locating the kindling executable"))?;
    let beside = exe.with_file_name("kindling-agent");
    if beside.is_file() {
        return Ok(beside);
    }
    crate::util::which("kindling-agent").ok_or(ImageError::NoAgent(exe))
}

/// Computes every step's key (dependencies first).
fn keys(need_agent: bool) -> Result<Vec<(&'static str, String)>, ImageError> {
    let mut keys: Vec<(&'static str, String)> = Vec::new();
    if need_agent {
        let agent = agent_binary()?;
        let mut k = cache::Key::new("agent");
        k.add_file(&agent).map_err(io(format!("reading {}", agent.display())))?;
        keys.push(("agent", k.finish()));
    }
    for s in STEPS {
        let mut k = cache::Key::new(s.name);
        for dir in std::iter::once(s.name).chain(s.shared.iter().copied()) {
            for (path, data) in recipe_files(dir) {
                k.add(path.as_bytes()).add(data);
            }
        }
        for d in s.deps {
            match keys.iter().find(|(n, _)| n == d) {
                Some((_, dk)) => k.add(dk.as_bytes()),
                None => k.add(b"-"),
            };
        }
        for probe in s.probes {
            let out = Command::new(probe[0]).args(&probe[1..]).output();
            k.add(&out.map(|o| o.stdout).unwrap_or_default());
        }
        keys.push((s.name, k.finish()));
    }
    Ok(keys)
}

fn out_dir(name: &str, key: &str) -> PathBuf {
    cache::dir().join("images").join(format!("{name}-{key}"))
}

/// The steps `targets` need, in build order.
fn plan(targets: &[String]) -> Result<Vec<&'static Step>, ImageError> {
    let mut wanted: Vec<&str> = Vec::new();
    fn add<'a>(name: &'a str, wanted: &mut Vec<&'a str>) -> Result<(), ImageError> {
        if name == "agent" || wanted.contains(&name) {
            return Ok(());
        }
        for d in step(name)?.deps {
            add(d, wanted)?;
        }
        wanted.push(name);
        Ok(())
    }
    let all: Vec<String> = STEPS.iter().map(|s| s.name.to_string()).collect();
    for t in if targets.is_empty() { &all } else { targets } {
        add(t, &mut wanted)?;
    }
    Ok(STEPS.iter().filter(|s| wanted.contains(&s.name)).collect())
}

/// Builds what `targets` need (everything when empty); returns the steps' output dirs.
pub fn build(targets: &[String]) -> Result<Vec<(&'static str, PathBuf)>, ImageError> {
    let t0 = Instant::now();
    let plan = plan(targets)?;
    let _lock = BuildLock::acquire()?;
    let keys = keys(plan.iter().any(|s| s.deps.contains(&"agent")))?;
    let key_of = |n: &str| keys.iter().find(|(k, _)| *k == n).map(|(_, v)| v.clone()).unwrap_or_default();
    let mut outputs: Vec<(&'static str, PathBuf)> = Vec::new();
    for (i, s) in plan.iter().enumerate() {
        let started = Instant::now();
        let out = out_dir(s.name, &key_of(s.name));
        let label = format!("images: [{}/{}] {}", i + 1, plan.len(), s.name);
        if out.is_dir() {
            eprintln!("{label}: cached ({})", out.display());
        } else {
            eprintln!("{label}: building");
            let dep_dirs: Vec<PathBuf> = s
                .deps
                .iter()
                .map(|d| {
                    if *d == "agent" {
                        agent_binary()
                    } else {
                        Ok(outputs.iter().find(|(n, _)| n == d).map(|(_, p)| p.clone()).expect("planned before"))
                    }
                })
                .collect::<Result<_, _>>()?;
            run_step(s, &out, &dep_dirs)?;
            eprintln!("{label}: built in {:.0}s ({})", started.elapsed().as_secs_f64(), out.display());
            prune(s.name, &out);
        }
        outputs.push((s.name, out));
    }
    eprintln!("images: done in {:.1}s", t0.elapsed().as_secs_f64());
    Ok(outputs)
}

/// Keeps the cache bounded: besides the output just built, only the most recent other
/// build of the same step stays (root disks are hundreds of MiB each).
fn prune(step: &str, keep: &Path) {
    let Some(dir) = keep.parent() else { return };
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    let prefix = format!("{step}-");
    let mut others: Vec<(std::time::SystemTime, PathBuf)> = entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| p != keep && p.is_dir())
        .filter(|p| {
            let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
            // <step>-<32 hex digits>: never another step whose name starts the same.
            name.strip_prefix(&prefix).is_some_and(|k| k.len() == 32 && k.bytes().all(|b| b.is_ascii_hexdigit()))
        })
        .filter_map(|p| Some((std::fs::metadata(&p).ok()?.modified().ok()?, p)))
        .collect();
    others.sort();
    others.pop(); // the most recent previous build stays
    for (_, p) in others {
        if let Err(e) = std::fs::remove_dir_all(&p) {
            eprintln!("images: could not prune {}: {e}", p.display());
        }
    }
}

/// One `images build` at a time per cache: a second waits instead of racing the first.
struct BuildLock {
    _file: std::fs::File,
}

impl BuildLock {
    fn acquire() -> Result<Self, ImageError> {
        let dir = cache::dir().join("images");
        std::fs::create_dir_all(&dir).map_err(io(format!("creating {}", dir.display())))?;
        let file = std::fs::File::create(dir.join("build.lock")).map_err(io("creating the build lock"))?;
        let lock = |wait| crate::util::lock_exclusive(&file, wait).map_err(io("locking the image cache"));
        if !lock(false)? {
            eprintln!("images: another `kindling images build` is running; waiting for it");
            lock(true)?;
        }
        Ok(Self { _file: file })
    }
}

/// Runs one recipe into `<out>.tmp-<pid>`, streaming its progress lines, then renames.
fn run_step(s: &Step, out: &Path, deps: &[PathBuf]) -> Result<(), ImageError> {
    let parent = out.parent().expect("cache dir");
    std::fs::create_dir_all(parent).map_err(io(format!("creating {}", parent.display())))?;
    let tmp = out.with_extension(format!("tmp-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).map_err(io(format!("creating {}", tmp.display())))?;
    let cleanup = |e: ImageError| {
        let _ = std::fs::remove_dir_all(&tmp);
        e
    };
    // The recipe runs from a private copy of images/, extracted from this binary.
    let recipes =
        tempfile::Builder::new().prefix("kindling-recipes-").tempdir().map_err(io("creating a temporary directory"))?;
    for (path, data) in recipes::RECIPE_FILES {
        let dest = recipes.path().join(path);
        std::fs::create_dir_all(dest.parent().unwrap()).map_err(io("extracting recipes"))?;
        std::fs::write(&dest, data).map_err(io("extracting recipes"))?;
        if path.ends_with(".sh") || path.ends_with(".py") {
            std::fs::set_permissions(&dest, std::os::unix::fs::PermissionsExt::from_mode(0o755))
                .map_err(io("extracting recipes"))?;
        }
    }
    let log_path = parent.join(format!("{}.log", s.name));
    let mut log = std::fs::File::create(&log_path).map_err(io(format!("creating {}", log_path.display())))?;
    let script = recipes.path().join(s.name).join("build.sh");
    // SAFETY: geteuid has no preconditions.
    let sudo = s.root && unsafe { libc::geteuid() } != 0;
    let mut cmd = if sudo {
        let can = Command::new("sudo").args(["-n", "true"]).stdin(Stdio::null()).stderr(Stdio::null()).status();
        if !can.is_ok_and(|st| st.success()) {
            return Err(cleanup(ImageError::NeedsRoot(s.name.into())));
        }
        eprintln!("    {}: needs root (mmdebstrap): running it with sudo", s.name);
        let keep: Vec<String> = std::env::vars_os()
            .filter_map(|(k, _)| k.into_string().ok())
            .filter(|k| k.starts_with("KINDLING_"))
            .collect();
        let mut c = Command::new("sudo");
        c.arg("-n");
        if !keep.is_empty() {
            c.arg(format!("--preserve-env={}", keep.join(",")));
        }
        c.arg("bash");
        c
    } else {
        Command::new("bash")
    };
    let mut child = cmd
        .arg(&script)
        .arg(&tmp)
        .args(deps)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| cleanup(io(format!("starting {}", script.display()))(e)))?;
    // Progress lines (stderr) go to the terminal and the log; stdout only to the log.
    let stdout = child.stdout.take().expect("piped");
    let mut log2 = log.try_clone().map_err(io("log"))?;
    let out_thread = std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = writeln!(log2, "{line}");
        }
    });
    for line in BufReader::new(child.stderr.take().expect("piped")).lines().map_while(Result::ok) {
        let _ = writeln!(log, "{line}");
        eprintln!("    {line}");
    }
    let _ = out_thread.join();
    let status = child.wait().map_err(|e| cleanup(io("waiting for the step")(e)))?;
    if sudo {
        // Root wrote the output: give it back to this user, whatever the outcome, so that
        // the cache (and a failed step's leftovers) stay this user's.
        let owner = format!("{}:{}", nix::unistd::getuid(), nix::unistd::getgid());
        let back = Command::new("sudo").args(["-n", "chown", "-R", &owner]).arg(&tmp).stdin(Stdio::null()).status();
        if !back.is_ok_and(|st| st.success()) {
            return Err(cleanup(ImageError::Io {
                what: format!("giving {} back to this user after the root step", tmp.display()),
                err: std::io::Error::other("sudo chown failed"),
            }));
        }
    }
    if !status.success() {
        let text = std::fs::read_to_string(&log_path).unwrap_or_default();
        let tail: Vec<&str> = text.lines().rev().take(30).collect::<Vec<_>>().into_iter().rev().collect();
        return Err(cleanup(ImageError::StepFailed {
            step: s.name.into(),
            status: status.to_string(),
            log: log_path.display().to_string(),
            tail: tail.join("\n"),
        }));
    }
    std::fs::rename(&tmp, out).map_err(|e| cleanup(io(format!("moving the output to {}", out.display()))(e)))
}

/// Path of a built step's artifact (kernel -> bzImage, rootfs -> rootfs.ext4, ...).
pub fn artifact_path(name: &str) -> Result<PathBuf, ImageError> {
    let s = step(name)?;
    let keys = keys(s.name == "rootfs")?;
    let key = keys.iter().find(|(n, _)| *n == s.name).map(|(_, k)| k.clone()).unwrap_or_default();
    let dir = out_dir(s.name, &key);
    dir.is_dir().then(|| dir.join(s.artifact)).ok_or_else(|| ImageError::NotBuilt(name.into()))
}

/// Human-readable size of a file or directory tree.
pub fn size_of(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => {
            std::fs::read_dir(path).map(|rd| rd.flatten().map(|e| size_of(&e.path())).sum()).unwrap_or(0)
        }
        Ok(m) if m.is_file() => m.blocks() * 512,
        _ => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plan_pulls_in_dependencies_in_order() {
        let names = |t: &[&str]| {
            plan(&t.iter().map(|s| s.to_string()).collect::<Vec<_>>())
                .unwrap()
                .iter()
                .map(|s| s.name)
                .collect::<Vec<_>>()
        };
        assert_eq!(names(&["oci"]), ["coredns", "local-path-provisioner", "metrics-server", "traefik", "oci"]);
        assert_eq!(
            names(&["rootfs"]),
            ["k8s", "etcd", "coredns", "local-path-provisioner", "metrics-server", "traefik", "oci", "rootfs"]
        );
        assert_eq!(names(&[]).len(), STEPS.len());
        assert!(matches!(plan(&["nope".into()]), Err(ImageError::UnknownStep(_))));
    }

    #[test]
    fn every_step_has_an_embedded_recipe() {
        for s in STEPS {
            assert!(recipe_files(s.name).any(|(p, _)| p.ends_with("/build.sh")), "{} has no build.sh", s.name);
        }
    }

    #[test]
    fn prune_keeps_the_new_build_and_one_previous() {
        let d = tempfile::tempdir().unwrap();
        let key = |i: u32| format!("{i:032x}");
        for i in 0..4 {
            std::fs::create_dir(d.path().join(format!("rootfs-{}", key(i)))).unwrap();
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        std::fs::create_dir(d.path().join(format!("rootfsx-{}", key(9)))).unwrap();
        let keep = d.path().join(format!("rootfs-{}", key(3)));
        prune("rootfs", &keep);
        let mut left: Vec<String> =
            std::fs::read_dir(d.path()).unwrap().flatten().map(|e| e.file_name().into_string().unwrap()).collect();
        left.sort();
        assert_eq!(
            left,
            vec![format!("rootfs-{}", key(2)), format!("rootfs-{}", key(3)), format!("rootfsx-{}", key(9))]
        );
    }

    #[test]
    fn a_failing_step_leaves_nothing_in_the_cache() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("images/no-such-step-key");
        // A step without a recipe: bash fails to run it, as any failing recipe would.
        let failing = Step { name: "no-such-step", deps: &[], probes: &[], artifact: "x", shared: &[], root: false };
        let err = run_step(&failing, &out, &[]).unwrap_err();
        assert!(matches!(err, ImageError::StepFailed { .. }), "{err}");
        assert!(!out.exists());
        let leftovers: Vec<_> =
            std::fs::read_dir(dir.path().join("images")).unwrap().flatten().map(|e| e.file_name()).collect();
        assert_eq!(leftovers, vec![std::ffi::OsString::from("no-such-step.log")], "only the log stays");
    }
}
