//! The user's kubeconfig: `kindling start` merges a cluster, a user and a context named
//! after the cluster into it, and `kindling delete` removes exactly those three.
//!
//! The file is `$KUBECONFIG` (its first path when it lists several, as kubectl writes
//! there too), else `~/.kube/config`. Every other entry and every field kindling does not
//! know is kept (the document is handled as a generic YAML value); comments are not.
//! Writes are atomic (a temporary file beside it, fsync, rename) and leave mode 0600,
//! since the file holds client keys.

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde_yaml_ng::{Mapping, Value};

/// Sections whose entries are `{name: ..., <kind>: {...}}`.
const SECTIONS: [(&str, &str); 3] = [("clusters", "cluster"), ("users", "user"), ("contexts", "context")];

/// The kubeconfig kindling reads and writes.
pub fn default_path() -> PathBuf {
    path_from(std::env::var_os("KUBECONFIG").as_deref(), Some(crate::util::home_dir().as_os_str()))
}

fn path_from(kubeconfig: Option<&std::ffi::OsStr>, home: Option<&std::ffi::OsStr>) -> PathBuf {
    if let Some(first) = kubeconfig.and_then(|k| k.to_str()).and_then(|k| k.split(':').find(|p| !p.is_empty())) {
        return PathBuf::from(first);
    }
    let home = home.filter(|h| !h.is_empty()).map(PathBuf::from).unwrap_or_else(|| PathBuf::from("/root"));
    home.join(".kube").join("config")
}

/// Our entries: a cluster, a user and a context, all three named `name`.
#[derive(Clone, Debug, PartialEq)]
pub struct Entries {
    pub name: String,
    pub cluster: Value,
    pub user: Value,
}

/// The most a credential field read from a node may hold.
const MAX_CREDENTIAL: usize = 64 * 1024;

fn b64(data: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(data)
}

impl Entries {
    /// Entries for the API server at `server` with client certificate credentials, from
    /// PEM text: the CA that signed the server's certificate, the client's certificate
    /// and its key. Nothing else goes in: no exec plugin, no token, no auth provider.
    pub fn from_pems(name: &str, server: &str, ca: &str, cert: &str, key: &str) -> Result<Self> {
        let mut cluster = Mapping::new();
        cluster.insert("server".into(), server.into());
        cluster.insert("certificate-authority-data".into(), b64(ca.as_bytes()).into());
        let mut user = Mapping::new();
        user.insert("client-certificate-data".into(), b64(cert.as_bytes()).into());
        user.insert("client-key-data".into(), b64(key.as_bytes()).into());
        Ok(Self { name: name.to_string(), cluster: Value::Mapping(cluster), user: Value::Mapping(user) })
    }

    /// Entries from a kubeconfig a node wrote (`kindling kubeconfig --vsock`, for a VM
    /// booted by hand, whose CA the host does not have). The text is untrusted: only
    /// the three credential fields are read, each must decode to PEM of the expected
    /// kind and be at most 64 KiB, and the entries are built afresh from them
    /// ([`Self::from_pems`]), pointing at `server`.
    pub fn from_untrusted_kubeconfig(name: &str, text: &str, server: &str) -> Result<Self> {
        use base64::Engine;
        if text.len() > 4 * MAX_CREDENTIAL {
            bail!("the node's kubeconfig is {} bytes, more than a kubeconfig holds; not using it", text.len());
        }
        let doc: Value = serde_yaml_ng::from_str(text).context("the node's kubeconfig is not YAML")?;
        let field = |section: &str, kind: &str, key: &str, pem_kinds: &[&str]| -> Result<String> {
            let raw = doc
                .get(section)
                .and_then(Value::as_sequence)
                .and_then(|s| s.first())
                .and_then(|e| e.get(kind))
                .and_then(|b| b.get(key))
                .and_then(Value::as_str)
                .with_context(|| format!("the node's kubeconfig has no {section}[0].{kind}.{key}"))?;
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(raw.trim())
                .ok()
                .filter(|b| b.len() <= MAX_CREDENTIAL)
                .with_context(|| format!("the node's kubeconfig: {key} is not base64 of at most 64 KiB"))?;
            let pem = String::from_utf8(bytes).ok().filter(|p| {
                let t = p.trim();
                pem_kinds.iter().any(|k| {
                    t.starts_with(&format!("-----BEGIN {k}-----")) && t.ends_with(&format!("-----END {k}-----"))
                }) && t.bytes().all(|b| b == b'\n' || b == b'\r' || (0x20..0x7f).contains(&b))
            });
            pem.with_context(|| format!("the node's kubeconfig: {key} is not a PEM {}", pem_kinds.join(" or ")))
        };
        let ca = field("clusters", "cluster", "certificate-authority-data", &["CERTIFICATE"])?;
        let cert = field("users", "user", "client-certificate-data", &["CERTIFICATE"])?;
        let key = field("users", "user", "client-key-data", &["PRIVATE KEY", "RSA PRIVATE KEY", "EC PRIVATE KEY"])?;
        Self::from_pems(name, server, &ca, &cert, &key)
    }
}

fn entry(name: &str, kind: &str, body: Value) -> Value {
    let mut m = Mapping::new();
    m.insert("name".into(), name.into());
    m.insert(kind.into(), body);
    Value::Mapping(m)
}

fn empty_config() -> Value {
    let mut m = Mapping::new();
    m.insert("apiVersion".into(), "v1".into());
    m.insert("kind".into(), "Config".into());
    m.insert("preferences".into(), Value::Mapping(Mapping::new()));
    for (section, _) in SECTIONS {
        m.insert(section.into(), Value::Sequence(Vec::new()));
    }
    m.insert("current-context".into(), "".into());
    Value::Mapping(m)
}

/// Parses a kubeconfig's text; an empty file is an empty config.
pub fn parse(text: &str) -> Result<Value> {
    if text.trim().is_empty() {
        return Ok(empty_config());
    }
    let v: Value = serde_yaml_ng::from_str(text)?;
    match v {
        Value::Mapping(_) => Ok(v),
        Value::Null => Ok(empty_config()),
        _ => bail!("it is not a YAML mapping"),
    }
}

/// The sequence `section` of `doc`, created when absent or null.
fn section_mut<'a>(doc: &'a mut Value, section: &str) -> Result<&'a mut Vec<Value>> {
    let m = doc.as_mapping_mut().context("not a mapping")?;
    let slot = m.entry(section.into()).or_insert(Value::Sequence(Vec::new()));
    if slot.is_null() {
        *slot = Value::Sequence(Vec::new());
    }
    slot.as_sequence_mut().with_context(|| format!("its \"{section}\" is not a list"))
}

fn named(v: &Value, name: &str) -> bool {
    v.get("name").and_then(Value::as_str) == Some(name)
}

/// Puts our cluster, user and context into `doc` (replacing entries of the same name,
/// keeping everything else) and makes the context current.
pub fn merge(doc: &mut Value, e: &Entries) -> Result<()> {
    let mut context = Mapping::new();
    context.insert("cluster".into(), e.name.as_str().into());
    context.insert("user".into(), e.name.as_str().into());
    let bodies = [e.cluster.clone(), e.user.clone(), Value::Mapping(context)];
    for ((section, kind), body) in SECTIONS.iter().zip(bodies) {
        let list = section_mut(doc, section)?;
        match list.iter_mut().find(|v| named(v, &e.name)) {
            Some(existing) => *existing = entry(&e.name, kind, body),
            None => list.push(entry(&e.name, kind, body)),
        }
    }
    let m = doc.as_mapping_mut().context("not a mapping")?;
    m.insert("current-context".into(), e.name.as_str().into());
    Ok(())
}

/// A kubeconfig holding only `e` (its context current), as YAML text.
pub fn standalone(e: &Entries) -> Result<String> {
    let mut doc = empty_config();
    merge(&mut doc, e)?;
    Ok(serde_yaml_ng::to_string(&doc)?)
}

/// Removes the cluster, user and context named `name` (only those); a current context
/// of that name becomes empty. Returns whether anything was removed.
pub fn remove(doc: &mut Value, name: &str) -> Result<bool> {
    let mut changed = false;
    for (section, _) in SECTIONS {
        let Some(list) = doc.get_mut(section).and_then(Value::as_sequence_mut) else { continue };
        let before = list.len();
        list.retain(|v| !named(v, name));
        changed |= list.len() != before;
    }
    if doc.get("current-context").and_then(Value::as_str) == Some(name) {
        doc.as_mapping_mut().context("not a mapping")?.insert("current-context".into(), "".into());
        changed = true;
    }
    Ok(changed)
}

/// Whether `doc` has a context named `name`.
pub fn has_context(doc: &Value, name: &str) -> bool {
    doc.get("contexts").and_then(Value::as_sequence).is_some_and(|l| l.iter().any(|v| named(v, name)))
}

/// The file to write: the target of a symlink, so that a linked kubeconfig stays linked.
fn resolve(path: &Path) -> PathBuf {
    std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf())
}

/// Reads the kubeconfig at `path` (an empty config when it does not exist).
pub fn load(path: &Path) -> Result<Value> {
    match std::fs::read_to_string(path) {
        Ok(text) => parse(&text).with_context(|| {
            format!("kubeconfig {}: cannot parse it; fix or move it away, then run the command again", path.display())
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(empty_config()),
        Err(e) => Err(e).with_context(|| format!("kubeconfig {}: cannot read it", path.display())),
    }
}

/// Writes `doc` to `path` atomically with mode 0600, creating its directory.
pub fn save(path: &Path, doc: &Value) -> Result<()> {
    let target = resolve(path);
    let dir = target.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("kubeconfig: cannot create the directory {}", dir.display()))?;
    let text = serde_yaml_ng::to_string(doc).context("kubeconfig: cannot serialize it")?;
    let file_name = target.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "config".into());
    let tmp = dir.join(format!(".{file_name}.kindling-{}.tmp", std::process::id()));
    let write = || -> std::io::Result<()> {
        let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&tmp)?;
        f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
        f.write_all(text.as_bytes())?;
        f.sync_all()?;
        std::fs::rename(&tmp, &target)?;
        crate::util::sync_dir(dir);
        Ok(())
    };
    write().map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        match e.raw_os_error() {
            Some(libc::ENOSPC) => {
                super::disk::disk_full(&format!("writing the kubeconfig {}", target.display()), dir, None)
            }
            _ => anyhow::Error::new(e).context(format!("kubeconfig: cannot write {}", target.display())),
        }
    })
}

/// How long a change waits for another writer's `<file>.lock`.
const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// kubectl's (client-go's) lock on a kubeconfig: `<file>.lock`, created exclusively and
/// removed when done, so that concurrent writers (kubectl, another kindling) do not lose
/// each other's changes. Removed when dropped.
struct FileLock(PathBuf);

impl FileLock {
    fn acquire(path: &Path) -> Result<Self> {
        let target = resolve(path);
        let mut lock = target.clone().into_os_string();
        lock.push(".lock");
        let lock = PathBuf::from(lock);
        if let Some(dir) = lock.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir).ok();
        }
        let t0 = std::time::Instant::now();
        loop {
            match std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&lock) {
                Ok(_) => return Ok(Self(lock)),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && t0.elapsed() < LOCK_WAIT => {
                    std::thread::sleep(std::time::Duration::from_millis(100));
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => bail!(
                    "kubeconfig {}: {} has been held for {} s by another writer (kubectl or kindling); \
                     if none runs, remove it and try again",
                    target.display(),
                    lock.display(),
                    LOCK_WAIT.as_secs()
                ),
                Err(e) => {
                    return Err(e).with_context(|| format!("kubeconfig: cannot create the lock {}", lock.display()))
                }
            }
        }
    }
}

impl Drop for FileLock {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Merges our entries into the kubeconfig at `path`, under its lock.
pub fn merge_into(path: &Path, e: &Entries) -> Result<()> {
    let _lock = FileLock::acquire(path)?;
    let mut doc = load(path)?;
    merge(&mut doc, e).with_context(|| format!("kubeconfig {}: unexpected layout", path.display()))?;
    save(path, &doc)
}

/// Removes the entries named `name` from the kubeconfig at `path`; returns whether it
/// had any (a missing file has none and is not created).
pub fn remove_from(path: &Path, name: &str) -> Result<bool> {
    if !path.exists() {
        return Ok(false);
    }
    let _lock = FileLock::acquire(path)?;
    let mut doc = load(path)?;
    let changed =
        remove(&mut doc, name).with_context(|| format!("kubeconfig {}: unexpected layout", path.display()))?;
    if changed {
        save(path, &doc)?;
    }
    Ok(changed)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Our entries for cluster `name` at `server`, with stand-in credentials.
    fn ours(name: &str, server: &str) -> Entries {
        Entries::from_pems(name, server, "CA", "CRT", "KEY").unwrap()
    }

    const OTHER: &str = "apiVersion: v1\nkind: Config\npreferences: {colors: true}\nclusters:\n- name: prod\n  cluster:\n    server: https://prod:443\n    extensions: [{name: x, extension: {a: 1}}]\n\
users:\n- name: prod-admin\n  user:\n    exec: {command: aws, apiVersion: client.authentication.k8s.io/v1beta1}\n\
contexts:\n- name: prod\n  context: {cluster: prod, user: prod-admin, namespace: web}\ncurrent-context: prod\nx-custom-field: keep me\n";

    fn names(doc: &Value, section: &str) -> Vec<String> {
        doc[section].as_sequence().unwrap().iter().map(|v| v["name"].as_str().unwrap().to_string()).collect()
    }

    /// Writers that merge at the same time (two clusters starting at once) lose none
    /// of each other's entries, and a lock another writer holds is waited for.
    #[test]
    fn concurrent_merges_keep_every_entry() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("config");
        let threads: Vec<_> = (0..8)
            .map(|i| {
                let path = path.clone();
                std::thread::spawn(move || merge_into(&path, &ours(&format!("c{i}"), "https://127.0.0.1:1")).unwrap())
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let mut got = names(&load(&path).unwrap(), "contexts");
        got.sort();
        assert_eq!(got, (0..8).map(|i| format!("c{i}")).collect::<Vec<_>>());
        assert!(!d.path().join("config.lock").exists(), "the lock is gone");
        // A stale lock is reported, naming it.
        std::fs::write(d.path().join("config.lock"), "").unwrap();
        let t0 = std::time::Instant::now();
        let e = merge_into(&path, &ours("late", "https://x")).unwrap_err().to_string();
        assert!(e.contains("config.lock") && e.contains("remove it") && t0.elapsed() >= LOCK_WAIT, "{e}");
    }

    #[test]
    fn entries_from_a_node_keep_only_checked_credentials() {
        use base64::Engine;
        let enc = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
        let (ca, crt, key) = (
            "-----BEGIN CERTIFICATE-----\nQ0E=\n-----END CERTIFICATE-----\n",
            "-----BEGIN CERTIFICATE-----\nQ1JU\n-----END CERTIFICATE-----\n",
            "-----BEGIN PRIVATE KEY-----\nS0VZ\n-----END PRIVATE KEY-----\n",
        );
        // A hostile node adds an exec plugin, a token and its own server; none of it
        // may reach the user's kubeconfig.
        let hostile = format!(
            "apiVersion: v1\nclusters:\n- name: kindling\n  cluster:\n    server: https://evil:1\n    certificate-authority-data: {}\n    insecure-skip-tls-verify: true\n\
             users:\n- name: admin\n  user:\n    client-certificate-data: {}\n    client-key-data: {}\n    token: stolen\n    exec:\n      command: /bin/sh\n      args: [-c, 'touch /tmp/pwned']\n",
            enc(ca),
            enc(crt),
            enc(key)
        );
        let e = Entries::from_untrusted_kubeconfig("dev", &hostile, "https://127.0.0.1:16443").unwrap();
        assert_eq!(e, Entries::from_pems("dev", "https://127.0.0.1:16443", ca, crt, key).unwrap());
        let text = standalone(&e).unwrap();
        for bad in ["exec", "token", "evil", "insecure", "/bin/sh"] {
            assert!(!text.contains(bad), "{bad} in\n{text}");
        }
        // Not PEM, the wrong PEM, not base64: refused.
        for (field, value) in [
            ("client-key-data: ", enc("echo hi")),
            ("client-key-data: ", enc(crt)),
            ("client-key-data: ", "%%%".to_string()),
        ] {
            let t = hostile.replace(&format!("{field}{}", enc(key)), &format!("{field}{value}"));
            assert!(Entries::from_untrusted_kubeconfig("dev", &t, "https://x").is_err(), "{value}");
        }
    }

    #[test]
    fn merge_keeps_other_entries_and_unknown_fields_and_replaces_our_own() {
        let mut doc = parse(OTHER).unwrap();
        let e = ours("kindling", "https://127.0.0.1:16443");
        merge(&mut doc, &e).unwrap();
        assert_eq!(names(&doc, "clusters"), ["prod", "kindling"]);
        assert_eq!(names(&doc, "users"), ["prod-admin", "kindling"]);
        assert_eq!(names(&doc, "contexts"), ["prod", "kindling"]);
        assert_eq!(doc["current-context"].as_str(), Some("kindling"));
        assert_eq!(doc["contexts"][1]["context"]["user"].as_str(), Some("kindling"));
        // What kindling does not know is kept as it was.
        assert_eq!(doc["x-custom-field"].as_str(), Some("keep me"));
        assert_eq!(doc["preferences"]["colors"].as_bool(), Some(true));
        assert_eq!(doc["clusters"][0]["cluster"]["extensions"][0]["extension"]["a"].as_i64(), Some(1));
        assert_eq!(doc["users"][0]["user"]["exec"]["command"].as_str(), Some("aws"));
        assert_eq!(doc["contexts"][0]["context"]["namespace"].as_str(), Some("web"));

        // A second start (new port, new credentials) replaces, never duplicates.
        let mut e2 = ours("kindling", "https://127.0.0.1:16450");
        e2.user = serde_yaml_ng::from_str("{token: abc}").unwrap();
        merge(&mut doc, &e2).unwrap();
        assert_eq!(names(&doc, "clusters"), ["prod", "kindling"]);
        assert_eq!(doc["clusters"][1]["cluster"]["server"].as_str(), Some("https://127.0.0.1:16450"));
        assert_eq!(doc["users"][1]["user"]["token"].as_str(), Some("abc"));
        assert!(doc["users"][1]["user"].get("client-key-data").is_none());
    }

    #[test]
    fn remove_takes_out_only_our_three_entries() {
        let mut doc = parse(OTHER).unwrap();
        // Another cluster's entries whose names merely start like ours stay.
        let other = ours("kindling-2", "https://127.0.0.1:16444");
        merge(&mut doc, &other).unwrap();
        let e = ours("kindling", "https://127.0.0.1:16443");
        merge(&mut doc, &e).unwrap();
        assert!(remove(&mut doc, "kindling").unwrap());
        assert_eq!(names(&doc, "clusters"), ["prod", "kindling-2"]);
        assert_eq!(names(&doc, "users"), ["prod-admin", "kindling-2"]);
        assert_eq!(names(&doc, "contexts"), ["prod", "kindling-2"]);
        assert_eq!(doc["current-context"].as_str(), Some(""), "the deleted context is no longer current");
        assert_eq!(doc["x-custom-field"].as_str(), Some("keep me"));
        assert!(!remove(&mut doc, "kindling").unwrap(), "nothing left to remove");
        // A current context that is not ours stays current.
        let mut doc = parse(OTHER).unwrap();
        merge(&mut doc, &e).unwrap();
        doc.as_mapping_mut().unwrap().insert("current-context".into(), "prod".into());
        remove(&mut doc, "kindling").unwrap();
        assert_eq!(doc["current-context"].as_str(), Some("prod"));
    }

    #[test]
    fn files_are_written_atomically_with_mode_0600_through_symlinks() {
        let d = tempfile::tempdir().unwrap();
        let e = ours("kindling", "https://127.0.0.1:16443");
        // No file yet, no directory either.
        let path = d.path().join("kube/config");
        merge_into(&path, &e).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let doc = load(&path).unwrap();
        assert!(has_context(&doc, "kindling"));
        assert_eq!(doc["kind"].as_str(), Some("Config"));
        // An existing world-readable file becomes 0600, and nothing else is left around.
        std::fs::write(&path, OTHER).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        merge_into(&path, &e).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        let files: Vec<_> =
            std::fs::read_dir(path.parent().unwrap()).unwrap().flatten().map(|f| f.file_name()).collect();
        assert_eq!(files, vec![std::ffi::OsString::from("config")]);
        assert!(has_context(&load(&path).unwrap(), "prod"));
        // A symlinked kubeconfig stays a symlink; its target is updated.
        let link = d.path().join("link-config");
        std::os::unix::fs::symlink(&path, &link).unwrap();
        assert!(remove_from(&link, "kindling").unwrap());
        assert!(std::fs::symlink_metadata(&link).unwrap().file_type().is_symlink());
        assert!(!has_context(&load(&path).unwrap(), "kindling"));
        assert!(!remove_from(&d.path().join("missing"), "kindling").unwrap());
        assert!(!d.path().join("missing").exists());
        // A file that is not a kubeconfig is refused, not overwritten.
        std::fs::write(&path, "- just\n- a list\n").unwrap();
        let err = merge_into(&path, &e).unwrap_err();
        assert!(format!("{err:#}").contains("cannot parse it"), "{err:#}");
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "- just\n- a list\n");
    }

    #[test]
    fn the_path_is_kubeconfig_first_entry_else_home() {
        use std::ffi::OsStr;
        assert_eq!(path_from(Some(OsStr::new("/a/one:/b/two")), Some(OsStr::new("/h"))), PathBuf::from("/a/one"));
        assert_eq!(path_from(Some(OsStr::new(":/b/two")), None), PathBuf::from("/b/two"));
        assert_eq!(path_from(Some(OsStr::new("")), Some(OsStr::new("/h"))), PathBuf::from("/h/.kube/config"));
        assert_eq!(path_from(None, Some(OsStr::new("/h"))), PathBuf::from("/h/.kube/config"));
    }
}
