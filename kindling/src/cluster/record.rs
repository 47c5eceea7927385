//! A cluster's record, `<state>/clusters/<name>.json` (what must stay stable across
//! restarts: the host ports of its API server and NodePort range, its disk size, the
//! add-ons enabled or disabled for it), the paths beside it, and the locks that serialize
//! commands on one cluster.

use std::collections::BTreeMap;
use std::os::unix::fs::DirBuilderExt;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use super::*;

/// What a cluster keeps besides its VM: `<state>/clusters/<name>.json`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterRecord {
    pub name: String,
    /// Host port forwarded to the API server (127.0.0.1).
    pub api_port: u16,
    /// Host port of NodePort 30000; the range continues from it (30000: 1:1).
    pub node_port_base: u16,
    pub disk_size_gib: u64,
    /// Seconds since the Unix epoch.
    pub created_at: u64,
    /// The add-ons enabled (true) or disabled (false) for this cluster by `kindling addons
    /// enable|disable` and `start --addons`; one not named here has its default, so a
    /// record from before add-ons had a choice reads as the defaults.
    #[serde(default)]
    pub addons: BTreeMap<String, bool>,
    /// The Kubernetes node's name when it is not the cluster's: a clone
    /// (`start --from BASE`) runs its base's node, named when the base first booted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// The cluster this one was cloned from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cloned_from: Option<String>,
}

impl ClusterRecord {
    /// Whether the cluster runs `a`: its choice, else the add-on's default.
    pub fn addon_enabled(&self, a: &kindling_proto::addon::Addon) -> bool {
        self.addons.get(a.name).copied().unwrap_or(a.default_on)
    }

    /// The add-ons the cluster runs, in the catalogue's order (what `kindling.addons=`
    /// tells its node). A name in the record that this kindling does not know (written by
    /// another version) is ignored.
    pub fn enabled_addons(&self) -> Vec<&'static str> {
        kindling_proto::addon::ALL.iter().filter(|a| self.addon_enabled(a)).map(|a| a.name).collect()
    }

    /// Records the choice for `a`; true when it changes whether the cluster runs it.
    pub fn set_addon(&mut self, a: &kindling_proto::addon::Addon, enabled: bool) -> bool {
        let changed = self.addon_enabled(a) != enabled;
        self.addons.insert(a.name.to_string(), enabled);
        changed
    }

    /// The name of the cluster's Kubernetes node (its hostname).
    pub fn node_name(&self) -> &str {
        self.node.as_deref().unwrap_or(&self.name)
    }

    pub fn api_url(&self) -> String {
        format!("https://127.0.0.1:{}", self.api_port)
    }
    pub fn node_port_range(&self) -> String {
        format!("127.0.0.1:{}-{}", self.node_port_base, self.node_port_base + (ports::NODE_PORT_COUNT - 1))
    }
}

/// Where the cluster records live.
pub fn clusters_dir(paths: &Paths) -> PathBuf {
    paths.state_dir.join("clusters")
}

pub(super) fn record_path(paths: &Paths, name: &str) -> PathBuf {
    clusters_dir(paths).join(format!("{name}.json"))
}

/// Where `start` parks a disk while it recreates the VM (to change its spec).
pub(super) fn parked_disk(paths: &Paths, name: &str) -> PathBuf {
    clusters_dir(paths).join(format!("{name}.{DISK_FILE}"))
}

pub(super) fn disk_path(paths: &Paths, name: &str) -> PathBuf {
    paths.vm_dir(name).join(DISK_FILE)
}

/// The cluster's identity on the host: its CA and admin credentials (0700).
pub(super) fn identity_dir(paths: &Paths, name: &str) -> PathBuf {
    clusters_dir(paths).join(format!("{name}.pki"))
}

/// The seed disk the node boots with (read-only; see `kindling_proto::seed`). In the
/// VM directory, so the daemon's delete removes it.
pub(super) fn seed_path(paths: &Paths, name: &str) -> PathBuf {
    paths.vm_dir(name).join(SEED_FILE)
}

pub fn load_record(paths: &Paths, name: &str) -> Result<Option<ClusterRecord>> {
    let p = record_path(paths, name);
    match std::fs::read(&p) {
        Ok(raw) => serde_json::from_slice(&raw).map(Some).with_context(|| {
            format!("{}: not a valid cluster record; move it away to forget the cluster", p.display())
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("cannot read {}", p.display())),
    }
}

pub(super) fn save_record(paths: &Paths, r: &ClusterRecord) -> Result<()> {
    let dir = clusters_dir(paths);
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&dir)
        .with_context(|| format!("cannot create {}", dir.display()))?;
    let p = record_path(paths, &r.name);
    let mut text = serde_json::to_vec_pretty(r)?;
    text.push(b'\n');
    crate::util::write_atomic(&p, &p.with_extension("json.tmp"), &text, 0o600).map_err(|e| match e.raw_os_error() {
        Some(libc::ENOSPC) => disk::disk_full("writing the cluster record", &dir, None),
        _ => anyhow::Error::new(e).context(format!("cannot write {}", p.display())),
    })
}

/// Every cluster record, by name.
pub fn all_records(paths: &Paths) -> Vec<ClusterRecord> {
    let mut out: Vec<ClusterRecord> = std::fs::read_dir(clusters_dir(paths))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_str()?.strip_suffix(".json")?.to_string();
            load_record(paths, &name).ok().flatten().filter(|r| r.name == name)
        })
        .collect();
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

/// An exclusive lock (flock) on a file, released when dropped.
pub(super) struct Lock {
    file: std::fs::File,
    path: PathBuf,
}

impl Lock {
    pub(super) fn acquire(path: PathBuf, busy: impl FnOnce() -> String, wait: bool) -> Result<Self> {
        if let Some(dir) = path.parent() {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
        }
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .with_context(|| format!("cannot open the lock {}", path.display()))?;
        if !crate::util::lock_exclusive(&file, wait).with_context(|| format!("cannot lock {}", path.display()))? {
            bail!("{}", busy());
        }
        Ok(Self { file, path })
    }

    /// The lock of one cluster: start, stop, delete and `addons enable|disable` take it.
    pub(super) fn cluster(paths: &Paths, name: &str) -> Result<Self> {
        let path = clusters_dir(paths).join(format!("{name}.lock"));
        Self::acquire(
            path,
            || {
                format!("another kindling command (start, stop, delete or addons) is working on cluster {name:?} right now; wait for it to finish, then try again")
            },
            false,
        )
    }

    /// Serializes the choice of host ports between clusters.
    pub(super) fn ports(paths: &Paths) -> Result<Self> {
        Self::acquire(clusters_dir(paths).join(".ports.lock"), String::new, true)
    }

    /// Removes the lock file (delete: nothing of the cluster stays).
    pub(super) fn remove(self) {
        let _ = std::fs::remove_file(&self.path);
        drop(self.file);
    }
}

/// Chooses the host ports of a new cluster, avoiding those of the other clusters.
pub(super) fn new_record(paths: &Paths, name: &str, disk_size_gib: u64) -> Result<ClusterRecord> {
    let others: Vec<ClusterRecord> = all_records(paths).into_iter().filter(|r| r.name != name).collect();
    let api_ports: Vec<u16> = others.iter().map(|r| r.api_port).collect();
    let bases: Vec<u16> = others.iter().map(|r| r.node_port_base).collect();
    let api_port = ports::choose_api_port(ports::FIRST_API_PORT, &api_ports).with_context(|| {
        format!(
            "no free host port for the API server between {} and {}; free one of them (see `ss -ltn`)",
            ports::FIRST_API_PORT,
            ports::FIRST_API_PORT + 999
        )
    })?;
    let mut reserved_ports = api_ports.clone();
    reserved_ports.push(api_port);
    let node_port_base = match ports::choose_node_port_base(&ports::NODE_PORT_BASES, &bases, &reserved_ports) {
        Some(b) => b,
        // Every candidate has a busy port: take the first one no cluster holds; the busy
        // ports are skipped by the forward (and reported before the start).
        None => ports::NODE_PORT_BASES
            .iter()
            .copied()
            .find(|b| !bases.iter().any(|o| o == b))
            .context("every host range for NodePorts is taken by other clusters; delete one of them")?,
    };
    Ok(ClusterRecord {
        name: name.to_string(),
        api_port,
        node_port_base,
        disk_size_gib,
        created_at: state::now_secs(),
        addons: BTreeMap::new(),
        node: None,
        cloned_from: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_and_list_in_order() {
        let d = tempfile::tempdir().unwrap();
        let paths = Paths::new(d.path());
        assert_eq!(load_record(&paths, "a").unwrap(), None);
        let r = |name: &str, port| ClusterRecord {
            name: name.into(),
            api_port: port,
            node_port_base: 30000,
            disk_size_gib: 20,
            created_at: 1,
            addons: BTreeMap::new(),
            node: None,
            cloned_from: None,
        };
        save_record(&paths, &r("b", 16444)).unwrap();
        save_record(&paths, &r("a", 16443)).unwrap();
        std::fs::write(clusters_dir(&paths).join("junk.json"), "{").unwrap();
        std::fs::write(clusters_dir(&paths).join("b.lock"), "").unwrap();
        assert_eq!(load_record(&paths, "a").unwrap(), Some(r("a", 16443)));
        assert_eq!(all_records(&paths), vec![r("a", 16443), r("b", 16444)]);
        assert!(load_record(&paths, "junk").unwrap_err().to_string().contains("not a valid cluster record"));
        assert_eq!(r("a", 16443).api_url(), "https://127.0.0.1:16443");
        assert_eq!(r("a", 16443).node_port_range(), "127.0.0.1:30000-32767");
    }

    /// A record written before add-ons had a choice reads as the defaults; a choice is
    /// kept across a save and load; a name this kindling does not know is ignored.
    #[test]
    fn add_on_choices_are_remembered_and_old_records_have_the_defaults() {
        use kindling_proto::addon::{self, STORAGE_PROVISIONER};
        let d = tempfile::tempdir().unwrap();
        let paths = Paths::new(d.path());
        std::fs::create_dir_all(clusters_dir(&paths)).unwrap();
        std::fs::write(
            record_path(&paths, "old"),
            r#"{"name":"old","api_port":16443,"node_port_base":30000,"disk_size_gib":20,"created_at":1}"#,
        )
        .unwrap();
        let mut r = load_record(&paths, "old").unwrap().unwrap();
        let defaults: Vec<&str> = addon::ALL.iter().filter(|a| a.default_on).map(|a| a.name).collect();
        assert_eq!(r.enabled_addons(), defaults);
        let storage = addon::find(STORAGE_PROVISIONER).unwrap();
        assert!(r.set_addon(storage, false), "a change");
        assert!(!r.set_addon(storage, false), "no change the second time");
        r.addons.insert("from-a-newer-kindling".into(), true);
        save_record(&paths, &r).unwrap();
        let back = load_record(&paths, "old").unwrap().unwrap();
        assert_eq!(back, r);
        assert!(!back.addon_enabled(storage));
        assert!(!back.enabled_addons().contains(&STORAGE_PROVISIONER));
        assert!(!back.enabled_addons().contains(&"from-a-newer-kindling"));
        let text = std::fs::read_to_string(record_path(&paths, "old")).unwrap();
        assert!(text.contains("\"storage-provisioner\": false"), "{text}");
    }

    #[test]
    fn a_new_cluster_avoids_the_ports_of_the_others() {
        let d = tempfile::tempdir().unwrap();
        let paths = Paths::new(d.path());
        let first = new_record(&paths, "a", 20).unwrap();
        assert!(first.api_port >= ports::FIRST_API_PORT);
        save_record(&paths, &first).unwrap();
        let second = new_record(&paths, "b", 20).unwrap();
        assert_ne!(second.api_port, first.api_port, "a stopped cluster keeps its API port");
        assert_ne!(second.node_port_base, first.node_port_base, "and its NodePort range");
        // A record's own ports do not count against it (a restart after a lost VM).
        assert_eq!(new_record(&paths, "a", 20).unwrap().api_port, first.api_port);
    }
}
