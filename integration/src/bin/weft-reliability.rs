//! weft-reliability: the crash and disk-full campaign against a real weftd.
//!
//! ```text
//! weft-reliability kills [--seed N] [--kills 50] [--dir DIR] [--keep]
//! weft-reliability disk-full [--seed N] [--size-mib 256] [--dir DIR] [--keep]
//! ```
//!
//! `kills` sends SIGKILL to weftd (and only weftd) at seeded random points during disk
//! snapshots (full and incremental), weave create and delete, compose apply and guest
//! DPA write bursts, restarts it on the same data directory and checks after every
//! restart that the store verifies, that every new complete snapshot restores to its
//! checksum, that the guest's numbered rows are in the provenance log exactly once, and
//! that nothing (namespace, link, nftables chain, cgroup, process, work file) is left
//! that no live environment or weave owns. `disk-full` puts the data directory on a
//! small loop-mounted ext4 and fills it during a snapshot, a provenance append and a
//! weave create: each must fail with one line naming the lack of space, leave earlier
//! snapshots and entries intact, and succeed once space is freed.
//!
//! Both print the seed first and in every failure line: the same seed replays the same
//! sequence of operations, variants and kill points (a kill point is a seeded fraction
//! of the operation's duration, measured in a calibration round). Both need root, QEMU,
//! `vhost-device-vsock` (`make tools`), e2fsprogs, iproute2 and nftables, and the
//! workspace binaries built (`cargo build -p weft --bins -p weft-blockdev --bin
//! weft-blk`). They print a markdown summary for `docs/reliability.md` and exit 1 when
//! any check failed. See `integration/README.md`.

use std::path::PathBuf;
use std::process::ExitCode;

#[path = "weft-reliability/checks.rs"]
mod checks;
#[path = "weft-reliability/disk_full.rs"]
mod disk_full;
#[path = "weft-reliability/kills.rs"]
mod kills;
#[path = "weft-reliability/world.rs"]
mod world;

const USAGE: &str = "usage: weft-reliability kills [--seed N] [--kills 50] [--dir DIR] [--keep]
       weft-reliability disk-full [--seed N] [--size-mib 256] [--dir DIR] [--keep]";

/// Options shared by both parts.
#[derive(Debug, Clone)]
pub struct Options {
    /// Seed of every random choice.
    pub seed: u64,
    /// Rounds of `kills`.
    pub kills: u32,
    /// Size of the `disk-full` file system.
    pub size_mib: u64,
    /// Work directory (default: a new one under the system's temporary directory).
    pub dir: Option<PathBuf>,
    /// Keep the work directory even when everything passed.
    pub keep: bool,
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (command, options) = match parse(&args) {
        Ok(v) => v,
        Err(e) => {
            eprintln!("weft-reliability: {e}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    if !nix::unistd::geteuid().is_root() {
        eprintln!(
            "weft-reliability: run it as root (it starts weftd, QEMU, namespaces and loop mounts)"
        );
        return ExitCode::from(2);
    }
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("weft-reliability: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = rt.block_on(async {
        match command.as_str() {
            "kills" => kills::run(&options).await,
            "disk-full" => disk_full::run(&options).await,
            _ => unreachable!("parse accepts only these"),
        }
    });
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("weft-reliability: seed {}: {e:#}", options.seed);
            ExitCode::FAILURE
        }
    }
}

fn parse(args: &[String]) -> Result<(String, Options), String> {
    let command = args.first().ok_or("give a command")?.clone();
    if !["kills", "disk-full"].contains(&command.as_str()) {
        return Err(format!("unknown command {command:?}"));
    }
    let mut options = Options {
        seed: random_seed(),
        kills: 50,
        size_mib: 256,
        dir: None,
        keep: false,
    };
    let mut it = args[1..].iter();
    while let Some(flag) = it.next() {
        let mut value = || {
            it.next()
                .cloned()
                .ok_or_else(|| format!("{flag} needs a value"))
        };
        let number = |v: String| {
            v.parse::<u64>()
                .map_err(|_| format!("{flag} wants a number, not {v:?}"))
        };
        match flag.as_str() {
            "--seed" => options.seed = number(value()?)?,
            "--kills" => {
                options.kills = u32::try_from(number(value()?)?)
                    .ok()
                    .filter(|k| *k > 0)
                    .ok_or("--kills wants 1 or more")?
            }
            "--size-mib" => {
                options.size_mib = number(value()?)?;
                if options.size_mib < 128 {
                    return Err("--size-mib wants at least 128 (the guest images need room)".into());
                }
            }
            "--dir" => options.dir = Some(PathBuf::from(value()?)),
            "--keep" => options.keep = true,
            "-h" | "--help" => return Err("help".into()),
            other => return Err(format!("unknown option {other:?}")),
        }
    }
    Ok((command, options))
}

/// A new work directory of its own, under `parent` (`--dir`) or the system's temporary
/// directory. Always a fresh one: the campaign ends every process whose command line
/// names it, so it must name nothing else (`--dir /tmp` must not reach other programs).
fn work_dir(parent: Option<&std::path::Path>, prefix: &str) -> anyhow::Result<PathBuf> {
    let mut b = tempfile::Builder::new();
    b.prefix(prefix);
    let dir = match parent {
        Some(p) => {
            std::fs::create_dir_all(p)?;
            b.tempdir_in(std::path::absolute(p)?)?
        }
        None => b.tempdir()?,
    };
    Ok(dir.keep())
}

/// A seed from the kernel's random pool (the time, if that cannot be read).
fn random_seed() -> u64 {
    let mut b = [0u8; 8];
    let read = std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut b));
    match read {
        // Short enough to type back.
        Ok(()) => u64::from_le_bytes(b) % 1_000_000_000,
        Err(_) => {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(1)
                % 1_000_000_000
        }
    }
}

/// SplitMix64: every random choice of a run comes from one of these, seeded.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A fraction in [0, 1).
    pub fn fraction(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// The UTC date and time now, for the summary.
pub fn now_utc() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil from days (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02} UTC",
        rem / 3600,
        (rem % 3600) / 60
    )
}

/// The machine line of the summary: cores, accelerator, kernel.
pub fn machine() -> String {
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_default();
    format!("{cores} cores, guests under TCG, Linux {kernel}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_seed_gives_the_same_sequence() {
        let (mut a, mut b) = (Rng::new(7), Rng::new(7));
        let xs: Vec<u64> = (0..5).map(|_| a.next_u64()).collect();
        let ys: Vec<u64> = (0..5).map(|_| b.next_u64()).collect();
        assert_eq!(xs, ys);
        assert_ne!(Rng::new(8).next_u64(), xs[0]);
        let f = Rng::new(3).fraction();
        assert!((0.0..1.0).contains(&f));
    }

    #[test]
    fn options_parse() {
        let args: Vec<String> = ["kills", "--seed", "42", "--kills", "3", "--keep"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let (cmd, o) = parse(&args).unwrap();
        assert_eq!(
            (cmd.as_str(), o.seed, o.kills, o.keep),
            ("kills", 42, 3, true)
        );
        let bad: Vec<String> = ["kills", "--kills", "0"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        assert!(parse(&bad).is_err());
        let bad: Vec<String> = ["explode"].iter().map(|s| s.to_string()).collect();
        assert!(parse(&bad).is_err());
    }
}
