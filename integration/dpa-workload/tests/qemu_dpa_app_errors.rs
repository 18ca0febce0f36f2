//! The DPA never makes the application fail, in a real guest: Debian's `sqlite3` CLI
//! (`.timeout 10000`) creates three databases while weft-dpa watches their paths, and
//! `weft-dpa-workload --writer`, an application with no busy timeout at all, makes
//! 10,000 mixed writes while weft-dpa captures them. Every statement succeeds, and the
//! spool on the guest's disk, replayed on the host, rebuilds every database.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context as _};
use rusqlite::types::Value as SqlValue;
use rusqlite::Connection;
use weft_dpa::agent::{spool::Spool, sqlite};
use weft_dpa::proto::{DataType, Entry, Operation};
use weft_integration::{read_ext4_file, Guest, GuestOpts};

const CLI_DBS: usize = 3;
const WRITES: u64 = 10_000;

const DPA_CONFIG: &str = r#"spool_dir = "/data/.weft-dpa"
[[sqlite]]
path = "/data/app/cli1.db"
[[sqlite]]
path = "/data/app/cli2.db"
[[sqlite]]
path = "/data/app/cli3.db"
[[sqlite]]
path = "/data/app/writer.db"
"#;

/// /data/run.sh: waits for the agent, runs the CLI on three new databases, then the
/// writer, then waits until the agent's spool stops growing.
const RUN_SH: &str = r#"
i=0
while ! ls /data/.weft-dpa/*.seg >/dev/null 2>&1 && [ "$i" -lt 200 ]; do
    sleep 0.1
    i=$((i + 1))
done
# The agent watches /data/app right after its spool is open.
sleep 0.5
for n in 1 2 3; do
    sqlite3 "/data/app/cli$n.db" >"/tmp/cli$n.out" 2>&1 <<'SQL'
.timeout 10000
PRAGMA journal_mode=WAL; CREATE TABLE notes(id INTEGER PRIMARY KEY, body TEXT NOT NULL);
INSERT INTO notes(body) VALUES ('one'), ('two'), ('three');
BEGIN; SELECT count(*) FROM notes; UPDATE notes SET body = body || '!' WHERE id = 2; COMMIT;
DELETE FROM notes WHERE id = 3;
SELECT 'rows=' || count(*) FROM notes;
SQL
    echo "weft-sqlite3: cli$n rc=$? $(tr '\n' ' ' <"/tmp/cli$n.out")"
done
# What capture costs a write: the same writer first on a database the agent does not
# capture (shorter), then on the captured one.
weft-dpa-workload --writer /data/app/plain.db --count=2000 | sed 's/: writer /: plain writer /'
weft-dpa-workload --writer /data/app/writer.db --count=10000 --wait-capture
# The agent drains as the writer writes; wait until its spool is still for a second.
last=
for i in $(seq 1 60); do
    now=$(ls -l /data/.weft-dpa/ | md5sum)
    [ "$now" = "$last" ] && break
    last=$now
    sleep 1
done
sync
"#;

/// A raw ext4 image of `size_mib` holding the files of `dir` (mkfs.ext4 -d).
fn disk_from(dir: &Path, image: &Path, size_mib: u64) -> anyhow::Result<()> {
    std::fs::File::create(image)?.set_len(size_mib << 20)?;
    let out = Command::new("mkfs.ext4")
        .args([
            "-q",
            "-F",
            "-E",
            "lazy_itable_init=0,lazy_journal_init=0",
            "-d",
        ])
        .arg(dir)
        .arg(image)
        .output()
        .context("cannot run mkfs.ext4")?;
    ensure!(
        out.status.success(),
        "mkfs.ext4 -d failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

fn table_rows(db: &Path, table: &str) -> anyhow::Result<Vec<Vec<SqlValue>>> {
    let c = Connection::open(db)?;
    let mut stmt = c.prepare(&format!("SELECT * FROM {table} ORDER BY 1"))?;
    let n = stmt.column_count();
    let rows = stmt.query_map([], |r| (0..n).map(|i| r.get::<_, SqlValue>(i)).collect())?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// Copies a database (and its WAL, if any) off the disk into `work`.
fn fetch_db(disk: &Path, work: &Path, name: &str) -> anyhow::Result<std::path::PathBuf> {
    let out = work.join(name);
    std::fs::write(&out, read_ext4_file(disk, &format!("/app/{name}"))?)?;
    if let Ok(wal) = read_ext4_file(disk, &format!("/app/{name}-wal")) {
        std::fs::write(work.join(format!("{name}-wal")), wal)?;
    }
    Ok(out)
}

/// Replays the entries of `source` and compares `table` with the database on the disk.
fn check_replay(
    disk: &Path,
    work: &Path,
    entries: &[Entry],
    name: &str,
    table: &str,
) -> anyhow::Result<usize> {
    let source = format!("/data/app/{name}");
    let mine: Vec<&Entry> = entries
        .iter()
        .filter(|e| e.source == source && e.data_type == DataType::Sqlite)
        .collect();
    let replayed = work.join(format!("replayed-{name}"));
    sqlite::apply(replayed.to_str().unwrap_or_default(), &mine)?;
    let recorded = fetch_db(disk, work, name)?;
    let (got, want) = (table_rows(&replayed, table)?, table_rows(&recorded, table)?);
    ensure!(
        got == want,
        "{name}: the spool replays to {} rows, the guest's database holds {}",
        got.len(),
        want.len()
    );
    ensure!(!want.is_empty(), "{name}: no rows");
    Ok(mine.len())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_dpa_never_fails_the_sqlite3_cli_or_a_writer_without_busy_timeout(
) -> anyhow::Result<()> {
    let src = tempfile::tempdir()?;
    std::fs::write(src.path().join("weft-dpa.toml"), DPA_CONFIG)?;
    std::fs::write(src.path().join("run.sh"), RUN_SH)?;
    std::fs::create_dir(src.path().join("app"))?;
    let image = src.path().join("data.img");
    let tree = src.path().join("tree");
    std::fs::create_dir(&tree)?;
    for f in ["weft-dpa.toml", "run.sh", "app"] {
        std::fs::rename(src.path().join(f), tree.join(f))?;
    }
    disk_from(&tree, &image, 64)?;

    let started = Instant::now();
    let guest = Guest::boot(GuestOpts {
        workload: "script".into(),
        data_disk: Some(image.clone()),
        extra_append: "weft.dpa=1".into(),
        ready_timeout: Duration::from_secs(90),
        ..GuestOpts::default()
    })
    .await?;
    guest
        .serial()
        .wait_for("weft-script: done", Duration::from_secs(300))
        .await?;
    let ran = started.elapsed();
    let serial = guest.serial().contents();
    let (exit, _dir) = guest.shutdown_keep_dir().await?;
    ensure!(exit.success(), "{exit}");

    for l in serial
        .lines()
        .filter(|l| l.contains("weft-sqlite3:") || l.contains("weft-dpa-workload: writer"))
    {
        eprintln!("guest: {l}");
    }
    // The CLI: no error, every statement ran.
    for n in 1..=CLI_DBS {
        let line = serial
            .lines()
            .find(|l| l.contains(&format!("weft-sqlite3: cli{n} ")))
            .with_context(|| format!("no result of the sqlite3 CLI on cli{n}.db"))?;
        ensure!(
            line.contains(&format!("cli{n} rc=0 ")) && line.contains("rows=2"),
            "the sqlite3 CLI failed with the DPA watching: {line}"
        );
    }
    // The writer without a busy timeout: no error.
    let line = serial
        .lines()
        .find(|l| l.contains("weft-dpa-workload: writer writes="))
        .context("no writer result on the console")?;
    let plain = serial
        .lines()
        .find(|l| l.contains("weft-dpa-workload: plain writer writes="))
        .context("no result of the uncaptured writer on the console")?;
    let field_of = |line: &str, k: &str| -> anyhow::Result<u64> {
        let v = line
            .split_whitespace()
            .find_map(|w| w.strip_prefix(&format!("{k}=")))
            .with_context(|| format!("no {k}= in {line}"))?;
        Ok(v.parse()?)
    };
    let field = |k: &str| field_of(line, k);
    ensure!(field_of(plain, "errors")? == 0, "{plain}");
    if field("errors")? != 0 {
        let errs: Vec<&str> = serial
            .lines()
            .filter(|l| l.contains("writer error"))
            .collect();
        bail!("the writer without a busy timeout failed: {line}\n{errs:#?}");
    }
    ensure!(field("writes")? == WRITES, "{line}");
    ensure!(
        !serial.contains("weft-dpa exited"),
        "the agent must not exit"
    );

    // What the agent captured: the spool replays to every database.
    let work = src.path().join("replay");
    let spool_dir = work.join("spool");
    std::fs::create_dir_all(&spool_dir)?;
    for gen in 1u64.. {
        let name = format!("{gen:016x}.seg");
        match read_ext4_file(&image, &format!("/.weft-dpa/{name}")) {
            Ok(bytes) => std::fs::write(spool_dir.join(name), bytes)?,
            Err(_) if gen > 1 => break,
            Err(e) => return Err(e.context("no spool segment on the guest's disk")),
        }
    }
    let entries = Spool::open(&spool_dir, u64::MAX, 1 << 20)?.read_from(1, usize::MAX)?;
    for n in 1..=CLI_DBS {
        check_replay(&image, &work, &entries, &format!("cli{n}.db"), "notes")?;
    }
    let writer = check_replay(&image, &work, &entries, "writer.db", "items")?;
    let count = |op: Operation| {
        entries
            .iter()
            .filter(|e| e.source == "/data/app/writer.db" && e.op == op)
            .count() as u64
    };
    ensure!(
        (
            count(Operation::Insert),
            count(Operation::Update),
            count(Operation::Delete)
        ) == (field("inserts")?, field("updates")?, field("deletes")?),
        "captured row changes differ from the writer's: {line}"
    );
    let per_write = |ms: u64, n: u64| ms as f64 * 1000.0 / n as f64;
    eprintln!(
        "guest: sqlite3 CLI x{CLI_DBS} and {WRITES} writes without a busy timeout, 0 errors \
         ({writer} entries captured for the writer); a write takes {:.0} µs captured, \
         {:.0} µs uncaptured (TCG); boot to done {:.1}s",
        per_write(field("ms")?, WRITES),
        per_write(field_of(plain, "ms")?, field_of(plain, "writes")?),
        ran.as_secs_f64()
    );
    Ok(())
}
