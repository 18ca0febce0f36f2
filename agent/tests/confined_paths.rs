//! Host paths API callers name are confined, through a real weftd and the `weft` CLI:
//! images only from `image_dirs`, restores and replays only into `export_dirs`, never
//! through a symlink planted there, attach only to a socket outside weftd's own
//! directories. Every refusal is one line; what weft writes is 0600; nothing outside
//! the directories is written.

mod common;
use common::Weftd;

use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use weft::catalog::{Catalog, NewEnvironment};
use weft::model::{EnvKind, EnvState, Job, JobState};
use weft_dpa::{DataType, Entry, Operation};
use weft_provenance::log::{LogOptions, ProvenanceLog};

/// A test's directories: images and exports (configured), and one outside both.
struct Scene {
    _tmp: tempfile::TempDir,
    root: PathBuf,
    images: PathBuf,
    exports: PathBuf,
    outside: PathBuf,
}

impl Scene {
    fn new() -> Scene {
        let tmp = tempfile::tempdir().unwrap();
        let root = std::fs::canonicalize(tmp.path()).unwrap();
        let s = Scene {
            images: root.join("images"),
            exports: root.join("exports"),
            outside: root.join("outside"),
            root,
            _tmp: tmp,
        };
        for d in [&s.images, &s.exports, &s.outside] {
            std::fs::create_dir_all(d).unwrap();
        }
        s
    }

    async fn weftd(&self) -> Weftd {
        let q = |p: &Path| serde_json::to_string(&p.to_string_lossy()).unwrap();
        Weftd::start_with(
            &self.root,
            &format!(
                "image_dirs = [{}]\nexport_dirs = [{}]\n",
                q(&self.images),
                q(&self.exports)
            ),
        )
        .await
    }

    /// Every path below `outside`, sorted.
    fn outside_tree(&self) -> Vec<PathBuf> {
        fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
            for e in std::fs::read_dir(dir).unwrap().flatten() {
                let p = e.path();
                out.push(p.clone());
                if e.file_type().unwrap().is_dir() {
                    walk(&p, out);
                }
            }
        }
        let mut out = Vec::new();
        walk(&self.outside, &mut out);
        out.sort();
        out
    }
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// `out` failed with one line on stderr that contains `want`; returns the line.
fn refused(out: &Output, want: &str) -> String {
    let err = String::from_utf8_lossy(&out.stderr).trim().to_string();
    assert!(
        !out.status.success(),
        "expected a refusal ({want}), got success"
    );
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert_eq!(err.lines().count(), 1, "one line: {err:?}");
    assert!(err.contains(want), "{err:?} lacks {want:?}");
    err
}

fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn mode(p: &Path) -> u32 {
    std::fs::symlink_metadata(p).unwrap().permissions().mode() & 0o777
}

/// Names in `dir` that weft gives its temporary files.
fn temps(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(".weft-tmp-"))
        .collect()
}

#[tokio::test]
async fn images_come_only_from_image_dirs_and_attach_only_from_outside_weftd() {
    let scene = Scene::new();
    let w = scene.weftd().await;
    // weftd made its default directories.
    for d in ["data/images", "data/exports"] {
        assert_eq!(mode(&scene.root.join(d)), 0o750, "{d}");
    }
    let disk = scene.images.join("d.raw");
    std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
    let secret = scene.outside.join("secret.img");
    std::fs::write(&secret, vec![7u8; 1 << 20]).unwrap();
    let create = |name: &str, extra: &[&str]| {
        let mut args = vec!["env", "create", name, "--no-start"];
        args.extend_from_slice(extra);
        w.cli(&args)
    };
    let spec = |p: &Path| format!("{},format=raw", p.display());

    // Inside: recorded under its canonical path.
    let link = scene.images.join("link.raw");
    symlink(&disk, &link).unwrap();
    ok(&create("inside", &["--disk", &spec(&link)]));
    let shown: serde_json::Value =
        serde_json::from_str(&ok(&w.cli(&["--json", "env", "show", "inside"]))).unwrap();
    assert_eq!(shown["config"]["disks"][0]["path"], s(&disk), "{shown}");

    // Outside, through a symlink, through `..`: one line naming the key and the dirs.
    let e = refused(&create("o1", &["--disk", &spec(&secret)]), "image_dirs = [");
    assert!(e.contains(s(&scene.images)), "{e}");
    let escape = scene.images.join("escape.raw");
    symlink(&secret, &escape).unwrap();
    refused(&create("o2", &["--disk", &spec(&escape)]), "leads to");
    let dotdot = format!("{}/../outside/secret.img", scene.images.display());
    refused(
        &create("o3", &["--disk", &format!("{dotdot},format=raw")]),
        "`..`",
    );
    refused(
        &create("o4", &["--disk", &spec(&disk), "--kernel", s(&secret)]),
        "kernel",
    );
    let kernel = scene.images.join("vmlinuz");
    std::fs::write(&kernel, b"k").unwrap();
    refused(
        &create(
            "o5",
            &[
                "--disk",
                &spec(&disk),
                "--kernel",
                s(&kernel),
                "--initrd",
                s(&escape),
            ],
        ),
        "initrd",
    );
    // weftd's own files are not images.
    refused(
        &create(
            "o6",
            &[
                "--disk",
                &format!(
                    "{},format=raw",
                    scene.root.join("data/catalog.db").display()
                ),
            ],
        ),
        "image_dirs",
    );

    // Swapped for a symlink after the create: refused when QEMU would start on it.
    let swap = scene.images.join("swap.raw");
    std::fs::write(&swap, vec![0u8; 1 << 20]).unwrap();
    ok(&create("swap", &["--disk", &spec(&swap)]));
    std::fs::remove_file(&swap).unwrap();
    symlink(&secret, &swap).unwrap();
    refused(&w.cli(&["env", "start", "swap"]), "symlink");
    let qmp_dir = scene.root.join("run/qmp");
    let sockets = std::fs::read_dir(&qmp_dir).map_or(0, |d| d.count());
    assert_eq!(sockets, 0, "no QEMU was started");

    // Attach: weftd's own socket, a symlink to it, a regular file.
    let own = scene.root.join("run/weftd.sock");
    refused(
        &w.cli(&["env", "attach", "a1", "--qmp", s(&own)]),
        "weftd's own directory",
    );
    let sock_link = scene.outside.join("vm.qmp");
    symlink(&own, &sock_link).unwrap();
    refused(
        &w.cli(&["env", "attach", "a2", "--qmp", s(&sock_link)]),
        "symlink",
    );
    refused(
        &w.cli(&["env", "attach", "a3", "--qmp", s(&secret)]),
        "not a unix socket",
    );

    let names: Vec<String> =
        serde_json::from_str::<Vec<serde_json::Value>>(&ok(&w.cli(&["--json", "env", "list"])))
            .unwrap()
            .iter()
            .map(|e| e["name"].as_str().unwrap_or_default().to_string())
            .collect();
    assert_eq!(
        names,
        vec!["inside", "swap"],
        "refused creates record nothing"
    );
}

async fn wait_job(w: &Weftd, id: i64) -> Job {
    let client = weft_client::Client::new(&w.socket);
    wait_until::Wait::new(format!("job {id} to end"), Duration::from_secs(60))
        .until_async(|| async {
            let job: Job = client.get(&format!("/v1/jobs/{id}")).await.unwrap();
            match job.state {
                JobState::Running => Err(format!("{job:?}")),
                _ => Ok(job),
            }
        })
        .await
        .unwrap_or_else(|e| panic!("{e}"))
}

/// A snapshot of a stopped environment's disk (a qemu-storage-daemon reads it; no
/// guest) is restored only into the export directories.
#[tokio::test]
async fn qemu_restores_write_only_inside_export_dirs_and_never_through_symlinks() {
    let scene = Scene::new();
    let w = scene.weftd().await;
    let disk = scene.images.join("d.raw");
    let content: Vec<u8> = (0..4u32 << 20)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    std::fs::write(&disk, &content).unwrap();
    ok(&w.cli(&[
        "env",
        "create",
        "r",
        "--no-start",
        "--disk",
        &format!("{},format=raw", disk.display()),
    ]));
    let client = weft_client::Client::new(&w.socket);
    let job: Job = client
        .post(
            "/v1/environments/r/snapshots",
            &serde_json::json!({"resource": "disk:vda"}),
        )
        .await
        .unwrap();
    let job = wait_job(&w, job.id).await;
    assert_eq!(job.state, JobState::Succeeded, "{:?}", job.error);
    let id = job.result.as_ref().unwrap()["snapshots"][0]
        .as_i64()
        .unwrap()
        .to_string();
    let restore = |out: &Path, extra: &[&str]| {
        let mut args = vec!["restore", id.as_str(), "--output", s(out)];
        args.extend_from_slice(extra);
        w.cli(&args)
    };

    // Planted: a file symlink to a victim outside, a directory symlink to outside.
    let victim = scene.outside.join("victim");
    symlink(&victim, scene.exports.join("out.img")).unwrap();
    symlink(&scene.outside, scene.exports.join("sub")).unwrap();
    let before = scene.outside_tree();
    refused(&restore(&scene.exports.join("out.img"), &[]), "symlink");
    refused(
        &restore(&scene.exports.join("out.img"), &["--force"]),
        "symlink",
    );
    refused(&restore(&scene.exports.join("sub/x.img"), &[]), "symlink");
    refused(
        &restore(&scene.exports.join("sub/x.img"), &["--format", "qcow2"]),
        "symlink",
    );
    refused(
        &restore(
            Path::new(&format!("{}/../outside/y.img", scene.exports.display())),
            &[],
        ),
        "`..`",
    );
    let e = refused(
        &restore(&scene.outside.join("z.img"), &[]),
        "export_dirs = [",
    );
    assert!(e.contains(s(&scene.exports)), "{e}");
    refused(
        &restore(&scene.root.join("data/catalog.db"), &["--force"]),
        "export_dirs",
    );
    refused(
        &restore(&scene.exports.join("no/such/dir.img"), &[]),
        "does not exist",
    );
    assert_eq!(scene.outside_tree(), before, "nothing written outside");
    assert!(!victim.exists());

    // Inside: byte-exact, 0600, no temporary file left; taken names need --force.
    let raw = scene.exports.join("ok.img");
    ok(&restore(&raw, &[]));
    assert_eq!(
        std::fs::read(&raw).unwrap(),
        content,
        "the restore is byte-exact"
    );
    assert_eq!(mode(&raw), 0o600);
    refused(&restore(&raw, &[]), "exists");
    std::fs::write(&raw, b"stale").unwrap();
    ok(&restore(&raw, &["--force"]));
    assert_eq!(std::fs::read(&raw).unwrap(), content);
    let qcow2 = scene.exports.join("ok.qcow2");
    ok(&restore(&qcow2, &["--format", "qcow2"]));
    assert_eq!(mode(&qcow2), 0o600);
    let cmp = std::process::Command::new("qemu-img")
        .args(["compare", "-f", "raw", "-F", "qcow2"])
        .arg(&disk)
        .arg(&qcow2)
        .output()
        .unwrap();
    assert!(
        cmp.status.success(),
        "{}",
        String::from_utf8_lossy(&cmp.stdout)
    );
    // The default export directory works without any configuration.
    let default = scene.root.join("data/exports/d.img");
    ok(&restore(&default, &[]));
    assert_eq!(mode(&default), 0o600);
    assert!(
        temps(&scene.exports).is_empty(),
        "{:?}",
        temps(&scene.exports)
    );
    assert_eq!(scene.outside_tree(), before, "nothing written outside");
}

fn entry(
    seq: u64,
    data_type: DataType,
    op: Operation,
    source: &str,
    collection: &str,
    key: &str,
    new: &str,
) -> Entry {
    Entry {
        seq,
        guest_time_us: 1_790_000_000_000_000 + seq as i64 * 1_000_000,
        data_type,
        op,
        source: source.into(),
        collection: collection.into(),
        key: key.into(),
        old: None,
        new: Some(new.into()),
        tx: None,
    }
}

#[tokio::test]
async fn replays_write_only_inside_export_dirs_and_never_through_symlinks() {
    let scene = Scene::new();
    let data = scene.root.join("data");
    std::fs::create_dir_all(&data).unwrap();
    let catalog = Catalog::open(&data.join("catalog.db")).await.unwrap();
    catalog
        .insert_environment(&NewEnvironment {
            name: "web",
            kind: EnvKind::Managed,
            config: Some(&weft_qmp::launch::VmConfig::default()),
            qmp_socket: &scene.root.join("run/web.qmp"),
            state: EnvState::Stopped,
            pid: None,
        })
        .await
        .unwrap();
    catalog.close().await;
    let log = ProvenanceLog::open(data.join("provenance"), LogOptions::default()).unwrap();
    let schema =
        serde_json::to_string("CREATE TABLE t(id INTEGER PRIMARY KEY, name TEXT)").unwrap();
    log.append(
        "web",
        1,
        &[
            entry(
                1,
                DataType::Sqlite,
                Operation::Schema,
                "/data/app.db",
                "t",
                "",
                &schema,
            ),
            entry(
                2,
                DataType::Sqlite,
                Operation::Insert,
                "/data/app.db",
                "t",
                "[1]",
                r#"{"id":1,"name":"Ann"}"#,
            ),
            entry(
                3,
                DataType::Json,
                Operation::Insert,
                "/etc/app/settings.json",
                "",
                "",
                r#"{"beta":true}"#,
            ),
            entry(
                4,
                DataType::Kv,
                Operation::Insert,
                "/etc/app.env",
                "",
                "A",
                r#""1""#,
            ),
        ],
    )
    .unwrap();
    drop(log);
    let w = scene.weftd().await;
    let replay = |out: &Path| w.cli(&["replay", "web", "--to", "now", "--out", s(out)]);

    // Planted: a directory symlink where the database goes, a file symlink where the
    // key-value file goes.
    let r1 = scene.exports.join("r1");
    std::fs::create_dir_all(&r1).unwrap();
    symlink(&scene.outside, r1.join("data")).unwrap();
    let r2 = scene.exports.join("r2");
    std::fs::create_dir_all(r2.join("etc")).unwrap();
    let victim = scene.outside.join("victim.env");
    symlink(&victim, r2.join("etc/app.env")).unwrap();
    let before = scene.outside_tree();
    refused(&replay(&r1), "symlink");
    refused(&replay(&r2), "symlink");
    refused(&replay(&scene.outside.join("r")), "export_dirs = [");
    refused(
        &replay(Path::new(&format!(
            "{}/../outside/r",
            scene.exports.display()
        ))),
        "`..`",
    );
    symlink(&scene.outside, scene.exports.join("away")).unwrap();
    refused(&replay(&scene.exports.join("away/r")), "symlink");
    assert_eq!(scene.outside_tree(), before, "nothing written outside");
    assert!(!victim.exists());

    // Inside: the state as files, 0600, twice (a second replay replaces them).
    let r3 = scene.exports.join("r3");
    for _ in 0..2 {
        ok(&replay(&r3));
        for f in ["data/app.db", "etc/app/settings.json", "etc/app.env"] {
            assert_eq!(mode(&r3.join(f)), 0o600, "{f}");
        }
        assert_eq!(mode(&r3.join("etc/app")), 0o700);
        assert_eq!(
            std::fs::read_to_string(r3.join("etc/app.env")).unwrap(),
            "A=1\n"
        );
        let doc: serde_json::Value =
            serde_json::from_slice(&std::fs::read(r3.join("etc/app/settings.json")).unwrap())
                .unwrap();
        assert_eq!(doc, serde_json::json!({"beta": true}));
        let db = rusqlite::Connection::open(r3.join("data/app.db")).unwrap();
        let name: String = db
            .query_row("SELECT name FROM t WHERE id = 1", [], |r| r.get(0))
            .unwrap();
        assert_eq!(name, "Ann");
        for d in [&r3, &r3.join("data"), &r3.join("etc"), &r3.join("etc/app")] {
            assert!(temps(d).is_empty(), "{:?}", temps(d));
        }
    }
    // Databases are built in weftd's private work directory, which keeps nothing.
    let work: Vec<_> = std::fs::read_dir(data.join("work")).unwrap().collect();
    assert!(work.is_empty(), "{work:?}");
    assert_eq!(scene.outside_tree(), before, "nothing written outside");
}
