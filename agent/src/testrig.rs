//! A root-free rig for unit tests of weftd's logic: a catalog in memory, data and run
//! directories in a temporary directory, a chunk store there, and a host of test
//! doubles ([`crate::host::doubles`]): no root, namespace, cgroup or QEMU is needed.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use weft_blockdev::store::BlockMap;
use weft_qmp::launch::{DiskConfig, DiskFormat, NicConfig, VmConfig};

use crate::catalog::{Catalog, NewEnvironment};
use crate::catalog_snapshots::{Completed, NewSnapshot};
use crate::config::Config;
use crate::envs::Manager;
use crate::host::doubles::Doubles;
use crate::model::{EnvKind, EnvState, SnapshotKind};
use crate::snapshots::Snapshots;
use crate::weaves::Weaves;

/// The environment every rig has.
pub(crate) const ENV: &str = "web";

/// The rig.
pub(crate) struct Rig {
    /// Holds the data and run directories.
    _dir: tempfile::TempDir,
    pub(crate) doubles: Doubles,
    pub(crate) manager: Arc<Manager>,
    pub(crate) snapshots: Arc<Snapshots>,
    pub(crate) weaves: Arc<Weaves>,
}

impl Rig {
    /// A rig with managed environment [`ENV`] (stopped): one raw disk `vda` of 1 MiB
    /// and a NIC on the operator's tap `tweb`.
    pub(crate) async fn new() -> Rig {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = Config {
            data_dir: dir.path().join("data"),
            run_dir: dir.path().join("run"),
            ..Config::default()
        };
        for d in [&config.data_dir, &config.run_dir] {
            std::fs::create_dir_all(d).expect("rig directory");
        }
        let catalog = Catalog::open_in_memory().await.expect("catalog");
        let doubles = Doubles::new();
        let manager = Manager::with_host(config, catalog, doubles.host());
        let store = crate::snapshots::open_store(manager.config()).expect("store");
        let snapshots = Snapshots::new(manager.clone(), store);
        let weaves = Weaves::new(manager.clone(), snapshots.clone());
        let images = manager.config().data_dir.join("images");
        std::fs::create_dir_all(&images).expect("image directory");
        let disk = images.join("vda.raw");
        std::fs::write(&disk, vec![0u8; 1 << 20]).expect("disk image");
        let vm = VmConfig {
            disks: vec![DiskConfig {
                name: "vda".into(),
                path: disk,
                format: DiskFormat::Raw,
                read_only: false,
                backing: Vec::new(),
            }],
            nics: vec![NicConfig {
                id: "net0".into(),
                tap: "tweb".into(),
                mac: "52:54:00:12:34:56".into(),
            }],
            ..VmConfig::default()
        };
        let qmp_socket = manager.config().run_dir.join("qmp").join("web.sock");
        manager
            .catalog()
            .insert_environment(&NewEnvironment {
                name: ENV,
                kind: EnvKind::Managed,
                config: Some(&vm),
                qmp_socket: &qmp_socket,
                state: EnvState::Stopped,
                pid: None,
            })
            .await
            .expect("environment row");
        Rig {
            _dir: dir,
            doubles,
            manager,
            snapshots,
            weaves,
        }
    }

    /// A complete full snapshot of [`ENV`]'s `vda` at `taken_at`, its block map (an
    /// all-zero disk) in the store.
    pub(crate) async fn disk_snapshot(&self, taken_at: &str) -> i64 {
        let catalog = self.manager.catalog();
        let id = catalog
            .insert_snapshot(&NewSnapshot {
                env: ENV,
                resource: "disk:vda",
                kind: SnapshotKind::Full,
                actor: "test",
                category: None,
                note: None,
                parent: None,
                reason: None,
                config: None,
                taken_at,
            })
            .await
            .expect("snapshot row");
        let index = format!("{ENV}/disk-vda/{id:010}");
        let store = self.snapshots.store();
        let map = BlockMap::new(1 << 20, store.chunk_size());
        let checksum = weft_blockdev::pull::digest_of(&map);
        store.write_index(&index, &map).expect("block map");
        catalog
            .complete_snapshot(
                id,
                &Completed {
                    size: 1 << 20,
                    checksum: &checksum,
                    index_name: &index,
                    bytes_marked: 0,
                    bytes_read: 0,
                    bytes_new: 0,
                },
            )
            .await
            .expect("complete");
        id
    }

    /// The network model of the host double, as a text to compare.
    pub(crate) fn net_state(&self) -> String {
        let rec = &self.doubles.net;
        let mut out = format!("netns {:?}; root links {:?}", rec.netns(), rec.links(None));
        for ns in std::iter::once(None).chain(rec.netns().iter().map(|n| Some(n.as_str()))) {
            out += &format!("; tables in {ns:?}: {:?}", rec.tables(ns));
        }
        out
    }

    /// Everything that names weave `name` after it should be gone: catalog rows, files
    /// and directories under the data and run directories, store indexes, network
    /// objects, DHCP servers, cgroups. Empty when nothing is left.
    pub(crate) async fn leftovers(&self, name: &str) -> Vec<String> {
        let catalog = self.manager.catalog();
        let mut left = Vec::new();
        if catalog.weave(name).await.expect("catalog").is_some() {
            left.push("weave row".to_string());
        }
        if catalog.environment(name).await.expect("catalog").is_some() {
            left.push("environment row".to_string());
        }
        if catalog.placement(name).await.expect("catalog").is_some() {
            left.push("placement row".to_string());
        }
        let sources = catalog.weave_sources(name).await.expect("catalog");
        if !sources.is_empty() {
            left.push(format!("{} source rows", sources.len()));
        }
        for root in [
            &self.manager.config().data_dir,
            &self.manager.config().run_dir,
        ] {
            left.extend(
                files_naming(root, name)
                    .into_iter()
                    .map(|p| p.display().to_string()),
            );
        }
        let prefix = crate::names::weave_index_prefix(name);
        left.extend(
            self.snapshots
                .store()
                .list_indexes()
                .expect("indexes")
                .into_iter()
                .filter(|i| i.starts_with(&prefix)),
        );
        let rec = &self.doubles.net;
        if rec.netns().iter().any(|n| n.contains(name)) {
            left.push(format!("netns: {:?}", rec.netns()));
        }
        if !self.doubles.dhcp.running().is_empty() {
            left.push(format!("DHCP servers: {:?}", self.doubles.dhcp.running()));
        }
        if !self.doubles.cgroups.groups().is_empty() {
            left.push(format!("cgroups: {:?}", self.doubles.cgroups.groups()));
        }
        left
    }
}

/// Paths under `root` with a component that is `name` or starts with `name.`.
fn files_naming(root: &Path, name: &str) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(root) else {
        return out;
    };
    for e in entries.flatten() {
        let file = e.file_name().to_string_lossy().into_owned();
        let path = e.path();
        if file == name || file.starts_with(&format!("{name}.")) {
            out.push(path);
        } else if path.is_dir() {
            out.extend(files_naming(&path, name));
        }
    }
    out
}
