//! The world a campaign runs in: a private weftd on one data directory (restarted after
//! every kill), the `weft` CLI and API client pointed at it, and the guests.
//!
//! - `rldpa` runs the test guest's `script` workload with the DPA: `/data/run.sh`
//!   ([`RUN_SH`]) commits numbered rows to a SQLite table, one a second, then a burst of
//!   300, over and over, and prints what it committed; its DPA streams them to weftd over
//!   vhost-user vsock. Its qcow2 disk gets incremental snapshots.
//! - `rlcold` is a stopped environment on a raw disk: a 16 MiB ext4 (the counter
//!   workload, for the weaves made from it) followed by 32 MiB of seeded random bytes
//!   that the campaign changes between rounds. Its snapshots are taken through a
//!   qemu-storage-daemon and are always full (a raw image keeps no checkpoint).
//!
//! Images, kernel and initramfs live in `<data>/images`, restores go to
//! `<data>/exports`: inside the data directory, which is where weftd accepts host paths
//! by default.

use std::collections::BTreeMap;
use std::io::{Read as _, Seek as _, SeekFrom, Write as _};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use anyhow::{ensure, Context as _, Result};
use weft::model::Snapshot;
use weft_client::Client;
use weft_integration::{bin_path, guest_assets, procs, LogOnDrop, SerialLog, Weftd, WeftdBuilder};

use crate::Rng;

/// The DPA environment.
pub const DPA_ENV: &str = "rldpa";
/// The stopped environment with full snapshots.
pub const COLD_ENV: &str = "rlcold";
/// The composition over `rlcold`.
pub const COMPOSITION: &str = "rlmix";
/// Weave names start with this (namespaces `weft-rl…`, cgroups `weft/rl…`).
pub const WEAVE_PREFIX: &str = "rl";
/// The weave network slots this weftd hands out (clear of the test suite's).
pub const SLOTS: std::ops::RangeInclusive<u8> = 180..=189;

const MIB: u64 = 1 << 20;
/// `rlcold`: its file system, then the random region the campaign changes.
const COLD_FS_MIB: u64 = 16;
const COLD_MIB: u64 = 48;
const DPA_DISK_MIB: u64 = 32;
const BOOT: Duration = Duration::from_secs(120);

/// The guest workload: numbered rows in `/data/rel/app.db`, table `items` (`n` is the
/// primary key, so a row cannot be committed twice). Every cycle: 2 MiB of new bytes in
/// `/data/bulk` (so incremental snapshots have something to read), ten rows a second
/// apart, then a burst of `$1` rows (default 300) as fast as SQLite commits them, each
/// its own transaction, or all in one with `$3` = `tx`; `$2` random bytes (hex) pad
/// every burst row (default none). A failed statement is not counted: the count is
/// re-read from the table. Console lines: `weft-rel: row N`, `weft-rel: burst K begin
/// after N`, `weft-rel: burst K end rows=N`.
pub const RUN_SH: &str = r#"burst=${1:-300}
pad=${2:-0}
db=/data/rel/app.db
mkdir -p /data/rel
q() { sqlite3 -bail -cmd ".timeout 10000" "$db" "$@"; }
until q "PRAGMA journal_mode=WAL; CREATE TABLE IF NOT EXISTS items (n INTEGER PRIMARY KEY, kind TEXT, pad TEXT)" >/dev/null; do sleep 1; done
last() { until m=$(q "SELECT coalesce(max(n), 0) FROM items"); do sleep 1; done; echo "$m"; }
padding="''"
[ "$pad" -gt 0 ] && padding="hex(randomblob($pad))"
n=$(last)
b=0
while true; do
    dd if=/dev/urandom of=/data/bulk bs=64k count=32 conv=fsync 2>/dev/null
    i=0
    while [ $i -lt 10 ]; do
        if q "INSERT INTO items VALUES ($((n + 1)), 'trickle', '')"; then
            n=$((n + 1))
            echo "weft-rel: row $n"
        else
            n=$(last)
        fi
        i=$((i + 1))
        sleep 1
    done
    b=$((b + 1))
    echo "weft-rel: burst $b begin after $n"
    {
        [ "$3" = tx ] && echo "BEGIN;"
        seq $((n + 1)) $((n + burst)) | sed "s/.*/INSERT INTO items VALUES (&, 'burst', $padding);/"
        [ "$3" = tx ] && echo "COMMIT;"
    } | q
    n=$(last)
    echo "weft-rel: burst $b end rows=$n"
done
"#;

/// The guest DPA's configuration: the workload's database, the spool on the data disk.
const DPA_TOML: &str = r#"spool_dir = "/data/.weft-dpa"
[[sqlite]]
path = "/data/rel/app.db"
"#;

/// The composition: the oldest and the newest disk snapshot of `rlcold`, merged slot by
/// slot (the newer side wins), so an apply restores a merged base (or serves it live).
const RULES: &str = r#"conflict = "merge-by-timestamp"

[[rule]]
name = "oldest disk"
resources = ["disk:*"]
strategy = "earliest"

[[rule]]
name = "newest disk"
resources = ["disk:*"]
strategy = "latest"
"#;

/// A weftd run by the campaign, and everything needed to talk to it.
pub struct World {
    /// The work directory.
    pub dir: PathBuf,
    /// weftd's data directory.
    pub data: PathBuf,
    /// weftd's run directory.
    pub run: PathBuf,
    /// The rig's weftd (started and restarted on the same directories and config).
    weftd: Weftd,
    /// Restarts so far.
    pub starts: u32,
}

impl World {
    /// A world in `dir` whose data directory is `data` (created when missing);
    /// `extra_config` is appended to weftd.toml.
    pub fn new(dir: &Path, data: &Path, extra_config: &str) -> Result<World> {
        let run = dir.join("run");
        for d in [dir, data, &run] {
            std::fs::create_dir_all(d).with_context(|| format!("create {}", d.display()))?;
        }
        let weftd = WeftdBuilder::new(dir)
            .data_dir(data)
            .net_slots(u32::from(*SLOTS.start()), u32::from(*SLOTS.end()))
            .dpa_vsock("vhost-user")
            .config(extra_config)
            .start_timeout(Duration::from_secs(60))
            .log_on_drop(LogOnDrop::Panicking)
            // The campaign kills and reports strays itself (`kill_strays`).
            .clean_on_drop(false)
            .build()?;
        Ok(World {
            dir: dir.to_path_buf(),
            data: data.to_path_buf(),
            run,
            weftd,
            starts: 0,
        })
    }

    pub fn socket(&self) -> PathBuf {
        self.weftd.socket()
    }

    pub fn client(&self) -> Client {
        self.weftd.client()
    }

    pub fn images(&self) -> PathBuf {
        self.data.join("images")
    }

    pub fn exports(&self) -> PathBuf {
        self.data.join("exports")
    }

    pub fn weftd_log(&self) -> &Path {
        self.weftd.log_path()
    }

    pub fn weftd_pid(&self) -> Option<u32> {
        self.weftd.pid()
    }

    /// Starts weftd and waits until it answers; a weftd that exits at start fails.
    pub async fn start_weftd(&mut self) -> Result<Duration> {
        ensure!(!self.weftd.alive(), "weftd already runs");
        self.starts += 1;
        self.weftd.start().await
    }

    /// SIGKILL to weftd alone (not its process group: QEMU, weft-blk and the vsock
    /// devices run in groups of their own anyway), and waits for it.
    pub fn kill_weftd(&mut self) -> Result<()> {
        let status = self.weftd.sigkill().context("SIGKILL weftd")?;
        ensure!(
            std::os::unix::process::ExitStatusExt::signal(&status) == Some(9),
            "weftd ended otherwise than by SIGKILL: {status}"
        );
        Ok(())
    }

    /// Whether weftd still runs.
    pub fn weftd_alive(&mut self) -> bool {
        self.weftd.alive()
    }

    /// Stops weftd with SIGTERM (it leaves running QEMUs running), waiting up to 30 s.
    pub fn stop_weftd(&mut self) {
        self.weftd.stop(Duration::from_secs(30));
    }

    /// Kills every process (but this one and its ancestors) whose command line names the
    /// work directory or that runs in it; what it killed, for the report (after a
    /// teardown: nothing).
    pub fn kill_strays(&self) -> Vec<String> {
        let mut killed = Vec::new();
        for pid in procs::processes_in(&self.dir) {
            let cmdline = procs::cmdline(pid);
            if cmdline.trim().is_empty() {
                continue;
            }
            procs::kill(pid);
            killed.push(format!("stray process {pid} killed: {}", cmdline.trim()));
        }
        killed
    }

    fn weft_cmd(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(bin_path("weft"));
        cmd.arg("--socket")
            .arg(self.socket())
            .args(args)
            .stdin(Stdio::null());
        cmd
    }

    /// Runs `weft ARGS` to its end.
    pub fn weft(&self, args: &[&str]) -> Result<Output> {
        self.weft_cmd(args)
            .output()
            .with_context(|| format!("run weft {args:?}"))
    }

    /// Runs `weft ARGS`; its stdout, or an error with its stderr.
    pub fn weft_ok(&self, args: &[&str]) -> Result<String> {
        let out = self.weft(args)?;
        ensure!(
            out.status.success(),
            "weft {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Starts `weft ARGS` without waiting (its output is collected when it ends).
    pub fn spawn_weft(&self, args: &[&str]) -> Result<Child> {
        self.weft_cmd(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("start weft {args:?}"))
    }

    /// `weft --json ARGS`, parsed.
    pub fn weft_json<T: serde::de::DeserializeOwned>(&self, args: &[&str]) -> Result<T> {
        let mut all = vec!["--json"];
        all.extend_from_slice(args);
        let out = self.weft_ok(&all)?;
        serde_json::from_str(&out).with_context(|| format!("weft {args:?} printed {out:?}"))
    }

    pub fn serial(&self, env: &str) -> SerialLog {
        SerialLog::new(self.data.join("environments").join(env).join("serial.log"))
    }

    /// Every snapshot of `env`, pending and failed ones included.
    pub fn snapshots(&self, env: &str) -> Result<Vec<Snapshot>> {
        self.weft_json(&["snapshot", "list", env, "--all"])
    }

    /// Copies the guest kernel and initramfs into the images directory.
    pub async fn install_assets(&self) -> Result<(PathBuf, PathBuf)> {
        let assets = tokio::task::spawn_blocking(guest_assets).await??;
        let images = self.images();
        std::fs::create_dir_all(&images)?;
        let kernel = images.join("vmlinuz");
        let initrd = images.join("initramfs.img");
        std::fs::copy(&assets.kernel, &kernel)?;
        std::fs::copy(&assets.initrd, &initrd)?;
        Ok((kernel, initrd))
    }

    /// Creates `rldpa` and waits until its DPA has delivered the first burst. Its disk
    /// is qcow2, or with `preallocated` a raw image whose every block is allocated (on a
    /// file system that fills up, the guest's writes then never need new blocks).
    /// `workload_args` go to [`RUN_SH`] (comma-separated).
    pub async fn create_dpa_env(
        &self,
        kernel: &Path,
        initrd: &Path,
        preallocated: bool,
        workload_args: &str,
    ) -> Result<PathBuf> {
        let root = self.dir.join("rldpa-root");
        std::fs::create_dir_all(&root)?;
        std::fs::write(root.join("run.sh"), RUN_SH)?;
        std::fs::write(root.join("weft-dpa.toml"), DPA_TOML)?;
        let raw = if preallocated {
            self.images().join("rldpa-vda.raw")
        } else {
            self.dir.join("rldpa-vda.raw")
        };
        {
            let mut f = std::fs::File::create(&raw)?;
            if preallocated {
                let zeros = vec![0u8; MIB as usize];
                for _ in 0..DPA_DISK_MIB {
                    f.write_all(&zeros)?;
                }
                f.sync_all()?;
            } else {
                f.set_len(DPA_DISK_MIB * MIB)?;
            }
        }
        sh(Command::new("mkfs.ext4")
            .args([
                "-q",
                "-F",
                "-E",
                "lazy_itable_init=0,lazy_journal_init=0,nodiscard",
                "-d",
            ])
            .arg(&root)
            .arg(&raw))?;
        let disk = if preallocated {
            raw
        } else {
            let qcow2 = self.images().join("rldpa-vda.qcow2");
            sh(Command::new("qemu-img")
                .args(["convert", "-O", "qcow2"])
                .arg(&raw)
                .arg(&qcow2))?;
            std::fs::remove_file(&raw)?;
            qcow2
        };
        self.create_env(
            DPA_ENV,
            &disk,
            kernel,
            initrd,
            "256M",
            &format!("weft.workload=script weft.workload_args={workload_args} weft.dpa=1"),
            false,
        )?;
        let serial = self.serial(DPA_ENV);
        serial.wait_for("WEFT-READY", BOOT).await?;
        serial.wait_for("weft-rel: burst 1 end", BOOT).await?;
        Ok(disk)
    }

    /// Creates the stopped `rlcold` on a new raw disk.
    pub fn create_cold_env(&self, kernel: &Path, initrd: &Path, seed: u64) -> Result<PathBuf> {
        let disk = self.images().join("rlcold-vda.raw");
        {
            let f = std::fs::File::create(&disk)?;
            f.set_len(COLD_MIB * MIB)?;
        }
        sh(Command::new("mkfs.ext4")
            .args(["-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0"])
            .arg(&disk)
            .arg(format!("{COLD_FS_MIB}M")))?;
        let mut bulk = vec![0u8; ((COLD_MIB - COLD_FS_MIB) * MIB) as usize];
        weft_integration::xorshift_fill(&mut bulk, seed | 1);
        let mut f = std::fs::OpenOptions::new().write(true).open(&disk)?;
        f.seek(SeekFrom::Start(COLD_FS_MIB * MIB))?;
        f.write_all(&bulk)?;
        f.sync_all()?;
        self.create_env(
            COLD_ENV,
            &disk,
            kernel,
            initrd,
            "128M",
            "weft.workload=counter",
            true,
        )?;
        Ok(disk)
    }

    #[allow(clippy::too_many_arguments)]
    fn create_env(
        &self,
        name: &str,
        disk: &Path,
        kernel: &Path,
        initrd: &Path,
        memory: &str,
        append: &str,
        stopped: bool,
    ) -> Result<()> {
        let append = format!("console=ttyS0 panic=-1 {append}");
        let mut args = vec![
            "env",
            "create",
            name,
            "--memory",
            memory,
            "--disk",
            utf8(disk)?,
            "--kernel",
            utf8(kernel)?,
            "--initrd",
            utf8(initrd)?,
            "--append",
            &append,
        ];
        if stopped {
            args.push("--no-start");
        }
        self.weft_ok(&args).map(drop)
    }

    /// Creates the composition over `rlcold`.
    pub fn create_composition(&self) -> Result<()> {
        let rules = self.dir.join("rlmix.toml");
        std::fs::write(&rules, RULES)?;
        self.weft_ok(&[
            "compose",
            "create",
            COMPOSITION,
            "--env",
            COLD_ENV,
            "--rules",
            utf8(&rules)?,
        ])
        .map(drop)
    }
}

/// Changes 1 to 8 seeded 64 KiB blocks of `rlcold`'s random region (the environment is
/// stopped and no process has its image open between rounds).
pub fn mutate_cold(disk: &Path, rng: &mut Rng) -> Result<()> {
    let mut f = std::fs::OpenOptions::new().write(true).open(disk)?;
    let blocks = (COLD_MIB - COLD_FS_MIB) * MIB / (64 * 1024);
    let n = 1 + rng.next_u64() % 8;
    let mut buf = vec![0u8; 64 * 1024];
    for _ in 0..n {
        let block = rng.next_u64() % blocks;
        weft_integration::xorshift_fill(&mut buf, rng.next_u64() | 1);
        f.seek(SeekFrom::Start(COLD_FS_MIB * MIB + block * 64 * 1024))?;
        f.write_all(&buf)?;
    }
    f.sync_all()?;
    Ok(())
}

pub use weft_integration::procs::{names_path, this_and_ancestors};

/// Rewrites the first 12 MiB of `rlcold`'s random region (three store chunks that no
/// snapshot holds yet).
pub fn scramble_cold(disk: &Path, seed: u64) -> Result<()> {
    let mut bulk = vec![0u8; (12 * MIB) as usize];
    weft_integration::xorshift_fill(&mut bulk, seed | 1);
    let mut f = std::fs::OpenOptions::new().write(true).open(disk)?;
    f.seek(SeekFrom::Start(COLD_FS_MIB * MIB))?;
    f.write_all(&bulk)?;
    f.sync_all()?;
    Ok(())
}

/// SHA-256 of a file, hex.
pub fn sha256_file(path: &Path) -> Result<String> {
    let mut f = std::fs::File::open(path).with_context(|| format!("open {}", path.display()))?;
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        ctx.update(&buf[..n]);
    }
    Ok(hex(ctx.finish().as_ref()))
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

pub fn utf8(p: &Path) -> Result<&str> {
    p.to_str()
        .with_context(|| format!("{} is not UTF-8", p.display()))
}

/// Runs a host tool, failing with its output.
pub fn sh(cmd: &mut Command) -> Result<Output> {
    let out = cmd
        .output()
        .with_context(|| format!("run {:?}", cmd.get_program()))?;
    ensure!(
        out.status.success(),
        "{:?} {:?} failed: {}{}",
        cmd.get_program(),
        cmd.get_args().collect::<Vec<_>>(),
        String::from_utf8_lossy(&out.stdout).trim(),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(out)
}

/// What the guest's console says it committed: the highest row number.
pub fn committed_rows(serial: &str) -> u64 {
    serial
        .lines()
        .filter_map(|l| {
            let l = l.trim();
            if let Some(n) = l.strip_prefix("weft-rel: row ") {
                return n.trim().parse().ok();
            }
            l.strip_prefix("weft-rel: burst ")
                .and_then(|r| r.split_once(" end rows="))
                .and_then(|(_, n)| n.trim().parse().ok())
        })
        .max()
        .unwrap_or(0)
}

/// Bursts the console shows: number → (begun, ended).
pub fn bursts(serial: &str) -> BTreeMap<u64, (bool, bool)> {
    let mut out = BTreeMap::new();
    for l in serial.lines() {
        let Some(rest) = l.trim().strip_prefix("weft-rel: burst ") else {
            continue;
        };
        let Some((k, what)) = rest.split_once(' ') else {
            continue;
        };
        let Ok(k) = k.parse::<u64>() else {
            continue;
        };
        let e = out.entry(k).or_insert((false, false));
        if what.starts_with("begin") {
            e.0 = true;
        } else if what.starts_with("end") {
            e.1 = true;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_path_is_named_only_as_itself_or_a_parent() {
        assert!(names_path("qemu -pidfile /t/w/run/x.pid", "/t/w"));
        assert!(names_path("/t/w", "/t/w"));
        assert!(names_path("a=/t/w b", "/t/w"));
        assert!(!names_path("qemu /t/w2/run", "/t/w"));
        assert!(!names_path("nothing", "/t/w"));
    }

    #[test]
    fn console_lines_are_read() {
        let text = "weft-rel: row 1\nnoise\nweft-rel: row 2\r\nweft-rel: burst 1 begin after 2\n\
                    weft-rel: burst 1 end rows=302\nweft-rel: row 303\nweft-rel: burst 2 begin after 303\n";
        assert_eq!(committed_rows(text), 303);
        let b = bursts(text);
        assert_eq!(b.get(&1), Some(&(true, true)));
        assert_eq!(b.get(&2), Some(&(true, false)));
        assert_eq!(committed_rows(""), 0);
    }
}
