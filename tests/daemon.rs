//! The provisioner daemon (`kindling daemon`), end to end: a real daemon process on a
//! temporary socket and state directory, real `kindling boot` VMs (Debian's stock kernel
//! and a busybox initramfs), driven through the client module the CLI uses; and a check
//! of the running server against kindling/openapi.yaml.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use kindling::daemon::api::{StartRequest, VmSpec, VmStatus};
use kindling::daemon::client::{Client, ClientError, RawResponse};
use kindling::daemon::vm_process;
use serde_json::Value;

/// One busybox initramfs for the whole test binary (the tests run in parallel, and the
/// script writes a fixed path per process).
fn initramfs() -> PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    static LOCK: Mutex<()> = Mutex::new(());
    let _g = LOCK.lock().unwrap_or_else(|p| p.into_inner());
    PATH.get_or_init(common::busybox_initramfs).clone()
}

/// A `kindling daemon` process; killed (SIGKILL, like a crash) when dropped.
struct Daemon {
    child: Child,
    socket: PathBuf,
    log: PathBuf,
}

impl Daemon {
    fn start(state: &Path, socket: &Path) -> Self {
        let log = unique(state.to_path_buf());
        let f = std::fs::File::create(&log).unwrap();
        let child = common::kindling()
            .arg("daemon")
            .arg("--socket")
            .arg(socket)
            .env("KINDLING_STATE_DIR", state)
            .env_remove("KINDLING_SOCKET")
            .stdin(Stdio::null())
            .stdout(f.try_clone().unwrap())
            .stderr(f)
            .spawn()
            .expect("start kindling daemon");
        let d = Daemon { child, socket: socket.to_path_buf(), log };
        let client = d.client();
        let t0 = Instant::now();
        loop {
            match client.version() {
                Ok(v) => {
                    assert_eq!(v.state_dir, state);
                    break;
                }
                Err(e) if t0.elapsed() > Duration::from_secs(15) => {
                    panic!("the daemon does not answer: {e}\n{}", d.log_text())
                }
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        }
        d
    }

    fn client(&self) -> Client {
        Client::new(&self.socket)
    }

    fn log_text(&self) -> String {
        format!("--- daemon log ---\n{}", std::fs::read_to_string(&self.log).unwrap_or_default())
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill();
    }
}

fn unique(p: PathBuf) -> PathBuf {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    p.with_extension(format!("daemon-{n}.log"))
}

/// Kills the sessions of VM processes a failed test leaves behind.
#[derive(Default)]
struct VmReaper(Mutex<Vec<u32>>);

impl VmReaper {
    fn watch(&self, pid: Option<u32>) {
        if let Some(p) = pid {
            self.0.lock().unwrap().push(p);
        }
    }
}

impl Drop for VmReaper {
    fn drop(&mut self) {
        for sid in self.0.lock().unwrap().iter() {
            for p in vm_process::session_members(*sid) {
                let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(p as i32), nix::sys::signal::Signal::SIGKILL);
            }
        }
    }
}

fn api_status<T: std::fmt::Debug>(r: Result<T, ClientError>) -> (u16, String) {
    match r {
        Err(ClientError::Api { status, message }) => (status, message),
        other => panic!("expected an API error, got {other:?}"),
    }
}

fn sleeping_vm(name: &str) -> VmSpec {
    let mut spec = VmSpec::new(name, common::debian_kernel());
    spec.initrd = Some(initramfs());
    // The initramfs's /init runs kindling.run= ('+' for spaces), then powers off.
    // earlyprintk: should the guest ever stall before its console is up, its console
    // log shows how far it got.
    spec.cmdline = Some("console=ttyS0 earlyprintk=ttyS0 panic=1 kindling.run=sleep+600".into());
    spec.memory_mib = 256;
    spec
}

#[test]
fn vm_lifecycle_through_the_daemon_survives_a_daemon_restart() {
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("state");
    let socket = tmp.path().join("d.sock");
    let reaper = VmReaper::default();
    let mut daemon = Daemon::start(&state, &socket);
    let c = daemon.client();
    assert!(c.list().unwrap().is_empty());

    // Bad input: a missing kernel is refused, naming the path.
    let mut bad = sleeping_vm("vm1");
    bad.kernel = tmp.path().join("no-such-vmlinuz");
    let (status, msg) = api_status(c.create(&bad));
    assert_eq!(status, 400, "{msg}");
    assert!(msg.contains(&bad.kernel.display().to_string()) && msg.contains("not found"), "{msg}");
    let (status, msg) = api_status(c.create(&VmSpec::new("Bad_Name", common::debian_kernel())));
    assert_eq!(status, 400);
    assert!(msg.contains("lowercase letters"), "{msg}");

    let spec = sleeping_vm("vm1");
    let vm = c.create(&spec).unwrap();
    assert_eq!((vm.status, vm.pid), (VmStatus::Created, None));
    assert_eq!(vm.dir, state.join("vms/vm1"));
    assert!(vm.dir.join("vm.json").is_file());
    let (status, msg) = api_status(c.create(&spec));
    assert_eq!(status, 409, "{msg}");
    assert!(msg.contains("already exists"), "{msg}");

    let vm = c.start("vm1").unwrap();
    reaper.watch(vm.pid);
    assert_eq!(vm.status, VmStatus::Running);
    let pid = vm.pid.expect("a running VM has a pid");
    assert_eq!(api_status(c.start("vm1")).0, 409, "starting a running VM");

    // The guest boots (the emulated runner takes 15-30 s here) and runs its sleep.
    let t0 = Instant::now();
    loop {
        let console = c.console("vm1", None).unwrap();
        if console.contains("KINDLING-INIT-OK") {
            break;
        }
        let vm = c.get("vm1").unwrap();
        assert_eq!(
            vm.status,
            VmStatus::Running,
            "the VM stopped before its init ran\n{console}\n{}",
            daemon.log_text()
        );
        assert!(
            t0.elapsed() < Duration::from_secs(300),
            "no KINDLING-INIT-OK after 5 minutes\n{console}\n{}",
            daemon.log_text()
        );
        std::thread::sleep(Duration::from_secs(1));
    }
    eprintln!("guest init ran {:.1}s after start", t0.elapsed().as_secs_f64());
    assert!(vm.dir.join("tmp").is_dir(), "the VM process has its TMPDIR in the VM directory");
    let tail = c.console("vm1", Some(1)).unwrap();
    assert_eq!(tail.trim_end().lines().count(), 1, "{tail:?}");

    // The daemon dies and comes back: the VM is still running and re-attached.
    daemon.kill();
    let daemon = Daemon::start(&state, &socket);
    let c = daemon.client();
    let vm = c.get("vm1").unwrap();
    assert_eq!((vm.status, vm.pid), (VmStatus::Running, Some(pid)), "{}", daemon.log_text());
    assert!(daemon.log_text().contains("re-attached"), "{}", daemon.log_text());
    assert_eq!(c.list().unwrap().len(), 1);

    // Suspend: the VMM writes a snapshot and ends; the VM is suspended with it.
    let t0 = Instant::now();
    let vm = c.snapshot("vm1", Some(Duration::from_secs(300))).unwrap();
    eprintln!("snapshot written and the VM ended {:.1}s after the request", t0.elapsed().as_secs_f64());
    assert_eq!(vm.status, VmStatus::Suspended, "{}", daemon.log_text());
    let snap = vm.snapshot.clone().expect("a suspended VM reports its snapshot");
    assert_eq!(snap.memory_mib, 256);
    assert!(snap.path.starts_with(&vm.dir) && snap.path.is_file(), "{snap:?}");
    assert!(snap.disk_bytes > 0 && snap.disk_bytes < 256 << 20, "sparse: {snap:?}");
    assert!(vm_process::session_members(pid).is_empty(), "the VM process has ended");
    assert_eq!(api_status(c.stop("vm1", None)).0, 409, "stopping a suspended VM");
    assert_eq!(api_status(c.snapshot("vm1", None)).0, 409, "snapshotting a suspended VM");
    // Resume: the same guest goes on (its init ran before; it is not run again).
    let offset = c.console("vm1", None).unwrap().len();
    let vm = c.start("vm1").unwrap();
    reaper.watch(vm.pid);
    assert!(vm.resumed && vm.status == VmStatus::Running && vm.snapshot.is_none(), "{vm:?}");
    let t0 = Instant::now();
    loop {
        let console = c.console("vm1", None).unwrap();
        let new = console.get(offset..).unwrap_or_default();
        if new.contains("microVM restored from") {
            assert!(!new.contains("KINDLING-INIT-OK"), "the resumed guest booted again\n{new}");
            break;
        }
        assert_eq!(c.get("vm1").unwrap().status, VmStatus::Running, "the resumed VM ended\n{new}");
        assert!(t0.elapsed() < Duration::from_secs(300), "no restore after 5 minutes\n{new}");
        std::thread::sleep(Duration::from_millis(500));
    }
    eprintln!("resumed {:.1}s after start", t0.elapsed().as_secs_f64());
    assert!(!vm.dir.join("snapshot.snap").exists(), "the snapshot is used up by the resume");
    // A cold start drops a snapshot instead of resuming from it.
    c.snapshot("vm1", Some(Duration::from_secs(300))).unwrap();
    let vm = c.start_with("vm1", &StartRequest { cold: true, ..Default::default() }).unwrap();
    reaper.watch(vm.pid);
    assert!(!vm.resumed && vm.snapshot.is_none() && !vm.dir.join("snapshot.snap").exists(), "{vm:?}");
    let pid = vm.pid.expect("a running VM has a pid");

    let t0 = Instant::now();
    let vm = c.stop("vm1", Some(Duration::from_secs(60))).unwrap();
    assert_eq!(vm.status, VmStatus::Stopped, "{}", daemon.log_text());
    assert!(t0.elapsed() < Duration::from_secs(75));
    assert!(vm_process::session_members(pid).is_empty(), "processes of the VM's session are left");
    assert!(vm.stopped_at.is_some());
    assert!(!vm.dir.join("tmp").exists(), "the VM process's TMPDIR is removed once it stopped");
    assert_eq!(api_status(c.stop("vm1", None)).0, 409, "stopping a stopped VM");

    let dir = vm.dir.clone();
    let deleted = c.delete("vm1").unwrap();
    assert!(deleted.removed.contains(&dir), "{deleted:?}");
    assert!(!dir.exists(), "the VM directory is gone");
    assert!(c.list().unwrap().is_empty());
    assert_eq!(api_status(c.get("vm1")).0, 404);
    assert!(common::debian_kernel().exists() && initramfs().exists(), "the VM's files outside its directory are kept");
}

// ---------------------------------------------------------------------------------
// OpenAPI conformance
// ---------------------------------------------------------------------------------

const METHODS: &[&str] = &["get", "post", "put", "patch", "delete"];

struct Spec {
    doc: Value,
}

impl Spec {
    fn load() -> Self {
        let path = common::repo().join("kindling/openapi.yaml");
        let text = std::fs::read_to_string(&path).unwrap();
        let doc: Value = serde_yaml_ng::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert!(doc["openapi"].as_str().unwrap_or_default().starts_with("3.0"), "an OpenAPI 3.0 document");
        Spec { doc }
    }

    /// Follows a local `$ref`.
    fn resolve<'a>(&'a self, v: &'a Value) -> &'a Value {
        match v.get("$ref").and_then(Value::as_str) {
            Some(r) => {
                let ptr = r.strip_prefix('#').unwrap_or_else(|| panic!("only local refs: {r}"));
                let target = self.doc.pointer(ptr).unwrap_or_else(|| panic!("dangling $ref {r}"));
                self.resolve(target)
            }
            None => v,
        }
    }

    /// Every documented operation, as (METHOD, path).
    fn operations(&self) -> BTreeSet<(String, String)> {
        let mut ops = BTreeSet::new();
        for (path, item) in self.doc["paths"].as_object().expect("paths") {
            for m in METHODS {
                if item.get(*m).is_some() {
                    ops.insert((m.to_uppercase(), path.clone()));
                }
            }
        }
        ops
    }

    fn operation(&self, method: &str, path: &str) -> &Value {
        &self.doc["paths"][path][method.to_lowercase()]
    }

    /// Checks `value` against a schema (the subset openapi.yaml uses).
    fn validate(&self, schema: &Value, value: &Value, at: &str) -> Result<(), String> {
        let schema = self.resolve(schema);
        if value.is_null() {
            return if schema["nullable"].as_bool() == Some(true) {
                Ok(())
            } else {
                Err(format!("{at}: null but not nullable"))
            };
        }
        if let Some(allowed) = schema["enum"].as_array() {
            if !allowed.contains(value) {
                return Err(format!("{at}: {value} is not one of {allowed:?}"));
            }
        }
        match schema["type"].as_str() {
            Some("object") => {
                let obj = value.as_object().ok_or_else(|| format!("{at}: not an object: {value}"))?;
                for req in schema["required"].as_array().into_iter().flatten() {
                    let k = req.as_str().unwrap();
                    if !obj.contains_key(k) {
                        return Err(format!("{at}: required property {k:?} missing in {value}"));
                    }
                }
                let props = schema["properties"].as_object();
                for (k, v) in obj {
                    match props.and_then(|p| p.get(k)) {
                        Some(s) => self.validate(s, v, &format!("{at}.{k}"))?,
                        None if schema["additionalProperties"] == Value::Bool(false) => {
                            return Err(format!("{at}: property {k:?} is not documented"))
                        }
                        None => {}
                    }
                }
                Ok(())
            }
            Some("array") => {
                let items = value.as_array().ok_or_else(|| format!("{at}: not an array: {value}"))?;
                for (i, it) in items.iter().enumerate() {
                    self.validate(&schema["items"], it, &format!("{at}[{i}]"))?;
                }
                Ok(())
            }
            Some("string") => value.is_string().then_some(()).ok_or_else(|| format!("{at}: not a string: {value}")),
            Some("boolean") => value.is_boolean().then_some(()).ok_or_else(|| format!("{at}: not a boolean: {value}")),
            Some("integer") => {
                let n = value.as_i64().ok_or_else(|| format!("{at}: not an integer: {value}"))?;
                if schema["minimum"].as_i64().is_some_and(|min| n < min)
                    || schema["maximum"].as_i64().is_some_and(|max| n > max)
                {
                    return Err(format!("{at}: {n} is out of the documented range"));
                }
                Ok(())
            }
            Some(t) => Err(format!("{at}: schema type {t} not handled by this checker")),
            None => Ok(()),
        }
    }
}

/// Calls the live server and checks every answer against the document.
struct Checker<'a> {
    spec: &'a Spec,
    client: Client,
    /// (METHOD, documented path) -> statuses seen.
    seen: BTreeMap<(String, String), BTreeSet<u16>>,
}

impl Checker<'_> {
    fn call(&mut self, method: &str, template: &str, path: &str, body: Option<&str>) -> (u16, Value) {
        let r = self.client.request(method, path, body.map(str::as_bytes), Duration::from_secs(120)).unwrap();
        self.check(method, template, &r).unwrap_or_else(|e| {
            panic!("{method} {path} -> {}: {e}\nbody: {}", r.status, String::from_utf8_lossy(&r.body))
        });
        self.seen.entry((method.into(), template.into())).or_default().insert(r.status);
        let json = serde_json::from_slice(&r.body).unwrap_or(Value::String(String::from_utf8_lossy(&r.body).into()));
        (r.status, json)
    }

    fn expect(&mut self, method: &str, template: &str, path: &str, body: Option<&str>, status: u16) -> Value {
        let (got, json) = self.call(method, template, path, body);
        assert_eq!(got, status, "{method} {path}: {json}");
        json
    }

    fn check(&self, method: &str, template: &str, r: &RawResponse) -> Result<(), String> {
        let op = self.spec.operation(method, template);
        if op.is_null() {
            return Err(format!("{method} {template} is not documented"));
        }
        let responses = op["responses"].as_object().ok_or("no responses documented")?;
        let resp = responses.get(&r.status.to_string()).ok_or_else(|| {
            format!("status {} is not documented (documented: {:?})", r.status, responses.keys().collect::<Vec<_>>())
        })?;
        let resp = self.spec.resolve(resp);
        let Some(content) = resp["content"].as_object() else {
            return if r.body.is_empty() { Ok(()) } else { Err("a body where none is documented".into()) };
        };
        let ct = r.content_type.as_deref().unwrap_or_default();
        let (media, media_schema) = content.iter().find(|(m, _)| ct.starts_with(m.as_str())).ok_or_else(|| {
            format!("content type {ct:?} is not documented ({:?})", content.keys().collect::<Vec<_>>())
        })?;
        if media == "application/json" {
            let v: Value = serde_json::from_slice(&r.body).map_err(|e| format!("not JSON: {e}"))?;
            self.spec.validate(&media_schema["schema"], &v, "body")?;
        }
        Ok(())
    }
}

#[test]
fn the_server_matches_openapi_yaml() {
    let spec = Spec::load();

    // The document and the router have the same routes.
    let documented = spec.operations();
    let served: BTreeSet<(String, String)> =
        kindling::daemon::server::ROUTES.iter().map(|(m, p)| (m.to_string(), p.to_string())).collect();
    assert_eq!(documented, served, "openapi.yaml and server::ROUTES differ");
    // The documented schemas are the API types: serialized defaults validate.
    let example = serde_json::to_value(VmSpec::new("x", "/k")).unwrap();
    spec.validate(&serde_json::json!({"$ref": "#/components/schemas/VmSpec"}), &example, "VmSpec").unwrap();

    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("state");
    let daemon = Daemon::start(&state, &tmp.path().join("d.sock"));
    let reaper = VmReaper::default();
    let mut ck = Checker { spec: &spec, client: daemon.client(), seen: BTreeMap::new() };

    ck.expect("GET", "/v1/version", "/v1/version", None, 200);
    let list = ck.expect("GET", "/v1/vms", "/v1/vms", None, 200);
    assert_eq!(list, serde_json::json!([]));

    // Create: bad inputs, then a VM whose "kernel" is junk behind an ELF header (the
    // spec passes, the VM exits at once), then one that boots for real.
    let junk = tmp.path().join("junk-kernel");
    let mut bytes = vec![0x42u8; 4096];
    bytes[..4].copy_from_slice(b"\x7fELF");
    std::fs::write(&junk, bytes).unwrap();
    let body = |v: Value| v.to_string();
    ck.expect("POST", "/v1/vms", "/v1/vms", Some("{not json"), 400);
    ck.expect(
        "POST",
        "/v1/vms",
        "/v1/vms",
        Some(&body(serde_json::json!({"name": "j", "kernel": "/nonexistent/k"}))),
        400,
    );
    ck.expect(
        "POST",
        "/v1/vms",
        "/v1/vms",
        Some(&body(serde_json::json!({"name": "j", "kernel": junk, "cpus": 0}))),
        400,
    );
    ck.expect(
        "POST",
        "/v1/vms",
        "/v1/vms",
        Some(&body(serde_json::json!({"name": "j", "kernel": junk, "memri": 1}))),
        400,
    );
    let j =
        ck.expect("POST", "/v1/vms", "/v1/vms", Some(&body(serde_json::json!({"name": "junk", "kernel": junk}))), 201);
    assert_eq!(j["status"], "created");
    ck.expect("POST", "/v1/vms", "/v1/vms", Some(&body(serde_json::json!({"name": "junk", "kernel": junk}))), 409);
    let real = serde_json::to_string(&sleeping_vm("real")).unwrap();
    ck.expect("POST", "/v1/vms", "/v1/vms", Some(&real), 201);
    ck.expect("GET", "/v1/vms", "/v1/vms", None, 200);

    ck.expect("GET", "/v1/vms/{name}", "/v1/vms/junk", None, 200);
    ck.expect("GET", "/v1/vms/{name}", "/v1/vms/nope", None, 404);
    ck.expect("GET", "/v1/vms/{name}/console", "/v1/vms/junk/console", None, 200);
    ck.expect("GET", "/v1/vms/{name}/console", "/v1/vms/junk/console?tail=x", None, 400);
    ck.expect("GET", "/v1/vms/{name}/console", "/v1/vms/nope/console", None, 404);
    ck.expect("POST", "/v1/vms/{name}/start", "/v1/vms/nope/start", None, 404);
    ck.expect("POST", "/v1/vms/{name}/stop", "/v1/vms/nope/stop", None, 404);
    ck.expect("DELETE", "/v1/vms/{name}", "/v1/vms/nope", None, 404);

    // The junk VM starts, its `kindling boot` refuses the kernel, and the daemon records
    // the exit code it saw.
    let v = ck.expect("POST", "/v1/vms/{name}/start", "/v1/vms/junk/start", None, 200);
    reaper.watch(v["pid"].as_u64().map(|p| p as u32));
    let t0 = Instant::now();
    let v = loop {
        let v = ck.expect("GET", "/v1/vms/{name}", "/v1/vms/junk", None, 200);
        if v["status"] == "stopped" && !v["exit_code"].is_null() {
            break v;
        }
        assert!(t0.elapsed() < Duration::from_secs(30), "the junk VM still runs: {v}");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(v["exit_code"], 1, "{v}");
    let console = ck.expect("GET", "/v1/vms/{name}/console", "/v1/vms/junk/console", None, 200);
    // The error names the file and what a kernel must be (an ELF header over junk fails
    // in the ELF loader, so the words are the loader's).
    let text = console.as_str().unwrap();
    assert!(text.contains("junk-kernel") && text.contains("bzImage"), "{console}");
    ck.expect("POST", "/v1/vms/{name}/stop", "/v1/vms/junk/stop", None, 409);

    // The real VM: start, start again (409), stop with a bad body (400), stop (200).
    let v = ck.expect("POST", "/v1/vms/{name}/start", "/v1/vms/real/start", None, 200);
    reaper.watch(v["pid"].as_u64().map(|p| p as u32));
    ck.expect("POST", "/v1/vms/{name}/start", "/v1/vms/real/start", None, 409);
    ck.expect("POST", "/v1/vms/{name}/stop", "/v1/vms/real/stop", Some(r#"{"timeout_secs": "soon"}"#), 400);
    // Snapshot: bad bodies and VMs (400, 404, 409), then a suspend once the guest runs,
    // and a resume from it.
    ck.expect("POST", "/v1/vms/{name}/snapshot", "/v1/vms/real/snapshot", Some(r#"{"timeout_secs": 99999}"#), 400);
    ck.expect("POST", "/v1/vms/{name}/snapshot", "/v1/vms/nope/snapshot", None, 404);
    ck.expect("POST", "/v1/vms/{name}/snapshot", "/v1/vms/junk/snapshot", None, 409);
    ck.expect("POST", "/v1/vms/{name}/start", "/v1/vms/real/start", Some(r#"{"cold": "yes"}"#), 400);
    let t0 = Instant::now();
    while !ck.client.console("real", None).unwrap().contains("KINDLING-INIT-OK") {
        assert!(t0.elapsed() < Duration::from_secs(300), "the real VM's init did not run");
        std::thread::sleep(Duration::from_millis(500));
    }
    let v =
        ck.expect("POST", "/v1/vms/{name}/snapshot", "/v1/vms/real/snapshot", Some(r#"{"timeout_secs": 300}"#), 200);
    assert_eq!(v["status"], "suspended", "{v}");
    assert_eq!(v["snapshot"]["memory_mib"], 256, "{v}");
    let v = ck.expect("POST", "/v1/vms/{name}/start", "/v1/vms/real/start", Some(r#"{"cold": false}"#), 200);
    reaper.watch(v["pid"].as_u64().map(|p| p as u32));
    assert_eq!((&v["status"], &v["resumed"]), (&serde_json::json!("running"), &serde_json::json!(true)), "{v}");
    let v = ck.expect("POST", "/v1/vms/{name}/stop", "/v1/vms/real/stop", Some(r#"{"timeout_secs": 30}"#), 200);
    assert_eq!(v["status"], "stopped");

    let d = ck.expect("DELETE", "/v1/vms/{name}", "/v1/vms/junk", None, 200);
    assert!(!state.join("vms/junk").exists(), "{d}");
    ck.expect("DELETE", "/v1/vms/{name}", "/v1/vms/real", None, 200);
    assert!(junk.exists(), "a kernel outside the VM directory is kept");

    // Every documented operation was exercised.
    let missing: Vec<_> = documented.iter().filter(|op| !ck.seen.contains_key(*op)).collect();
    assert!(missing.is_empty(), "operations not exercised: {missing:?}");

    // Nothing undocumented answers: other methods on documented paths are 405, other
    // paths 404, both with an Error body.
    let error_schema = serde_json::json!({"$ref": "#/components/schemas/Error"});
    let paths: BTreeSet<&String> = documented.iter().map(|(_, p)| p).collect();
    for p in paths {
        let concrete = p.replace("{name}", "junk");
        for m in METHODS.iter().map(|m| m.to_uppercase()) {
            if documented.contains(&(m.clone(), p.clone())) {
                continue;
            }
            let r = ck.client.request(&m, &concrete, None, Duration::from_secs(10)).unwrap();
            assert_eq!(r.status, 405, "{m} {concrete} must not be served");
            let v: Value = serde_json::from_slice(&r.body).unwrap();
            spec.validate(&error_schema, &v, "405 body").unwrap();
        }
    }
    for p in ["/", "/v1", "/v2/vms", "/v1/vms/junk/restart", "/v1/vms/a/b/c"] {
        let r = ck.client.request("GET", p, None, Duration::from_secs(10)).unwrap();
        assert_eq!(r.status, 404, "GET {p}");
        let v: Value = serde_json::from_slice(&r.body).unwrap();
        spec.validate(&error_schema, &v, "404 body").unwrap();
    }
    drop(daemon);
}

#[test]
fn the_client_starts_the_daemon_on_demand_and_says_why_it_cannot() {
    use kindling::daemon::state::Paths;
    let tmp = tempfile::tempdir().unwrap();
    let paths = Paths::new(tmp.path().join("state"));
    let bin = common::kindling_bin();
    let exe = bin.as_path();
    let socket = tmp.path().join("run/d.sock");
    let c = Client::new(&socket);
    let v = c.ensure_daemon(exe, &paths).unwrap();
    let _reap = scopeguard(v.pid);
    assert_eq!((v.state_dir.as_path(), v.socket.as_path()), (paths.state_dir.as_path(), socket.as_path()));
    let log = std::fs::read_to_string(paths.daemon_log()).unwrap();
    assert!(log.contains("listening on"), "{log}");
    // A second call finds it running.
    assert_eq!(c.ensure_daemon(exe, &paths).unwrap().pid, v.pid);
    // kindling reinstalled (another file at another path, as `install` makes one): the
    // running daemon is another build, so it is replaced by one of the new file.
    let reinstalled = tmp.path().join("bin/kindling");
    std::fs::create_dir_all(reinstalled.parent().unwrap()).unwrap();
    std::fs::copy(exe, &reinstalled).unwrap();
    let w = c.ensure_daemon(&reinstalled, &paths).unwrap();
    let _reap_new = scopeguard(w.pid);
    assert_ne!(w.pid, v.pid, "the daemon of the old build still answers");
    assert_eq!(w.build, kindling::util::exe_identity(&reinstalled));
    assert!(
        !vm_process::start_time(v.pid).is_some_and(|t| vm_process::is_alive(v.pid, t)),
        "the old daemon still runs"
    );
    let v = w;
    // SIGTERM: it exits and removes its socket.
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(v.pid as i32), nix::sys::signal::Signal::SIGTERM).unwrap();
    let t0 = Instant::now();
    while socket.exists() && t0.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(!socket.exists(), "the daemon removes its socket when it exits");

    // A daemon that cannot start: the error names the socket, the reason and the log.
    let long = tmp.path().join("x".repeat(120)).join("d.sock");
    let e = Client::new(&long).ensure_daemon(exe, &paths).unwrap_err().to_string();
    assert!(e.starts_with(&format!("daemon not reachable at {}: ", long.display())), "{e}");
    assert!(e.contains("too long for a UNIX socket"), "{e}");
    assert!(
        e.contains(&format!("start it with `kindling daemon` and see its log at {}", paths.daemon_log().display())),
        "{e}"
    );
}

/// SIGKILLs a process when dropped (a daemon started by the client under test).
fn scopeguard(pid: u32) -> impl Drop {
    struct Guard(u32, Option<u64>);
    impl Drop for Guard {
        fn drop(&mut self) {
            if self.1.is_some_and(|t| vm_process::is_alive(self.0, t)) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(self.0 as i32),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
    }
    Guard(pid, vm_process::start_time(pid))
}
