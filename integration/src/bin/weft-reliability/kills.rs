//! `kills`: SIGKILL to weftd at seeded points of its work, then restart and checks.
//!
//! Every round draws the same six numbers from the seeded generator whatever happened
//! before (operation kind, kill point, variant, two picks, a mutation seed), so a seed
//! replays the same sequence of operations and kill points; choices that depend on the
//! catalog (which weave to delete) index into it with a drawn number.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Output;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};
use weft::model::{Snapshot, SnapshotState};
use weft_integration::wait_until;

use crate::checks::{self, Ledger, Live};
use crate::world::{self, bursts, World, COLD_ENV, COMPOSITION, DPA_ENV};
use crate::{Options, Rng};

/// The operations weftd is killed in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    Full,
    Incremental,
    WeaveCreate,
    WeaveDelete,
    ComposeApply,
    DpaBurst,
}

const KINDS: [Kind; 6] = [
    Kind::Full,
    Kind::Incremental,
    Kind::WeaveCreate,
    Kind::WeaveDelete,
    Kind::ComposeApply,
    Kind::DpaBurst,
];

impl Kind {
    fn label(self) -> &'static str {
        match self {
            Kind::Full => "full snapshot (stopped env, qemu-storage-daemon)",
            Kind::Incremental => "incremental snapshot (running env)",
            Kind::WeaveCreate => "weave create",
            Kind::WeaveDelete => "weave delete",
            Kind::ComposeApply => "compose apply",
            Kind::DpaBurst => "DPA write burst (300 rows)",
        }
    }

    fn variant_label(self, v: u64) -> &'static str {
        match (self, v) {
            (Kind::WeaveCreate, 0) => "from a snapshot",
            (Kind::WeaveCreate, 1) => "live from a snapshot",
            (Kind::WeaveCreate, _) => "from now",
            (Kind::ComposeApply, 0) => "restored",
            (Kind::ComposeApply, _) => "live",
            _ => "",
        }
    }

    /// Its variants (each calibrated on its own): a weave from a snapshot, served live
    /// from a snapshot, from now; a composition applied restored or live.
    fn variants(self) -> u64 {
        match self {
            Kind::WeaveCreate => 3,
            Kind::ComposeApply => 2,
            _ => 1,
        }
    }
}

/// The numbers one round draws.
#[derive(Debug, Clone, Copy)]
struct Draw {
    kind: Kind,
    /// Where in the operation's calibrated duration the kill lands.
    point: f64,
    variant: u64,
    pick: u64,
    older: u64,
    mutate: u64,
}

fn draw(rng: &mut Rng) -> Draw {
    Draw {
        kind: KINDS[(rng.next_u64() % KINDS.len() as u64) as usize],
        point: rng.fraction(),
        variant: rng.next_u64(),
        pick: rng.next_u64(),
        older: rng.next_u64(),
        mutate: rng.next_u64(),
    }
}

/// What a round starts.
enum Op {
    /// A `weft` command.
    Cli(Vec<String>),
    /// The guest's next burst of rows.
    Burst,
}

/// Counts per operation kind.
#[derive(Debug, Default, Clone)]
struct Tally {
    kills: u32,
    inside: u32,
    survived: u32,
    points_ms: Vec<u64>,
}

struct Campaign {
    world: World,
    ledger: Ledger,
    cold_disk: PathBuf,
    seed: u64,
    /// Mean duration of each kind's variants.
    calibrated: BTreeMap<(Kind, u64), Duration>,
    /// How long a `weft` command takes to reach weftd.
    cli_overhead: Duration,
    tally: BTreeMap<Kind, Tally>,
    failures: Vec<String>,
    /// What the checks after the previous round found.
    last_failures: std::collections::BTreeSet<String>,
    recoveries: Vec<Duration>,
}

pub async fn run(options: &Options) -> Result<bool> {
    let seed = options.seed;
    println!(
        "weft-reliability kills: seed {seed} (replay: weft-reliability kills --seed {seed} --kills {})",
        options.kills
    );
    let dir = crate::work_dir(options, "weft-rel-kills")?;
    println!("work directory: {}", dir.display());
    let mut world = World::new(&dir, &dir.join("data"), "")?;
    world.start_weftd().await?;
    let started = Instant::now();
    let mut campaign = Campaign {
        cold_disk: PathBuf::new(),
        world,
        ledger: Ledger::default(),
        seed,
        calibrated: BTreeMap::new(),
        cli_overhead: Duration::ZERO,
        tally: BTreeMap::new(),
        failures: Vec::new(),
        last_failures: Default::default(),
        recoveries: Vec::new(),
    };
    let result = campaign.run_all(options).await;
    let leftover = campaign.teardown().await;
    let elapsed = started.elapsed();
    let clean = match result {
        Ok(()) => {
            campaign.failures.extend(leftover);
            campaign.summary(options, elapsed);
            campaign.failures.is_empty()
        }
        Err(e) => {
            for l in leftover {
                eprintln!("{l}");
            }
            return Err(e.context(format!("work directory {} kept", dir.display())));
        }
    };
    if clean && !options.keep {
        let _ = std::fs::remove_dir_all(&dir);
    } else {
        println!("work directory kept: {}", dir.display());
    }
    Ok(clean)
}

impl Campaign {
    async fn run_all(&mut self, options: &Options) -> Result<()> {
        let t = Instant::now();
        let (kernel, initrd) = self.world.install_assets().await?;
        self.cold_disk = self.world.create_cold_env(&kernel, &initrd, self.seed)?;
        self.world
            .create_dpa_env(&kernel, &initrd, false, "300,0")
            .await?;
        self.ledger.cold_next = Some(world::sha256_file(&self.cold_disk)?);
        self.world
            .weft_ok(&["snapshot", "create", COLD_ENV, "--resource", "all"])?;
        checks::note_cold(&self.world, &mut self.ledger)?;
        self.world
            .weft_ok(&["snapshot", "create", DPA_ENV, "--resource", "disk:vda"])?;
        self.world.create_composition()?;
        println!("setup: {:.1} s", t.elapsed().as_secs_f64());

        self.calibrate().await?;
        // Everything holds before the first kill.
        let before = self.check(0, None).await;
        if !before.is_empty() {
            bail!("before any kill: {}", before.join("; "));
        }

        let mut rng = Rng::new(self.seed);
        for round in 1..=options.kills {
            let d = draw(&mut rng);
            self.round(round, d).await?;
        }
        // The final sweep: every complete snapshot restores, the whole log reads again.
        let t = Instant::now();
        let mut sweep = Vec::new();
        if let Err(e) = checks::restore_all(&self.world, &mut self.ledger) {
            sweep.push(format!("final restore of every snapshot: {e:#}"));
        }
        self.ledger.dpa = checks::DpaLedger::default();
        if let Err(e) = checks::dpa_rows(&self.world, &mut self.ledger.dpa).await {
            sweep.push(format!("final read of the provenance log: {e:#}"));
        }
        for f in sweep {
            self.fail(options.kills + 1, "final sweep", &f);
        }
        println!(
            "final sweep: {} snapshots restored, {} rows read once each ({:.1} s)",
            self.ledger.restored.len(),
            self.ledger.dpa.rows.len(),
            t.elapsed().as_secs_f64()
        );
        Ok(())
    }

    fn fail(&mut self, round: u32, what: &str, message: &str) {
        let line = format!("FAIL seed={} round={round} ({what}): {message}", self.seed);
        println!("{line}");
        self.failures.push(line);
    }

    /// Runs every variant of every kind of operation twice to its end and keeps the
    /// mean duration: kill points are fractions of it.
    async fn calibrate(&mut self) -> Result<()> {
        // What a `weft` command costs before its request reaches weftd: the median of
        // five `weft status` (start-up, connection, one small request).
        let mut status = Vec::new();
        for _ in 0..5 {
            let t = Instant::now();
            self.world.weft_ok(&["status"])?;
            status.push(t.elapsed());
        }
        status.sort();
        self.cli_overhead = status[2];
        println!(
            "calibration: {:<50}          {:>6} ms",
            "a weft command reaching weftd (weft status)",
            self.cli_overhead.as_millis()
        );
        let mut rng = Rng::new(self.seed ^ 0xca11_b8a7e);
        for kind in KINDS {
            for variant in 0..kind.variants() {
                let mut total = Duration::ZERO;
                for i in 0..2u32 {
                    let d = Draw {
                        kind,
                        point: 0.0,
                        variant,
                        pick: rng.next_u64(),
                        older: 0,
                        mutate: rng.next_u64(),
                    };
                    let name = format!("rlk{}{variant}{i}", kind as u8);
                    let op = self.prepare(&d, &name).await?;
                    total += self
                        .run_to_end(op)
                        .await
                        .with_context(|| format!("calibration of {} failed", kind.label()))?;
                    checks::note_cold(&self.world, &mut self.ledger)?;
                }
                let mean = total / 2;
                println!(
                    "calibration: {:<50} variant {variant}: {:>6} ms",
                    kind.label(),
                    mean.as_millis()
                );
                self.calibrated.insert((kind, variant), mean);
            }
        }
        Ok(())
    }

    async fn run_to_end(&self, op: Op) -> Result<Duration> {
        match op {
            Op::Cli(args) => {
                let args: Vec<&str> = args.iter().map(String::as_str).collect();
                let t = Instant::now();
                self.world.weft_ok(&args)?;
                Ok(t.elapsed())
            }
            Op::Burst => {
                let (k, begun) = self.next_burst().await?;
                let serial = self.world.serial(DPA_ENV);
                wait_until(Duration::from_secs(60), "the burst to end", || {
                    let text = serial.contents();
                    async move { Ok(bursts(&text).get(&k).is_some_and(|b| b.1).then_some(())) }
                })
                .await?;
                Ok(begun.elapsed())
            }
        }
    }

    /// Waits for the guest's next burst to begin: its number and when it was seen.
    async fn next_burst(&self) -> Result<(u64, Instant)> {
        let serial = self.world.serial(DPA_ENV);
        let seen = bursts(&serial.contents())
            .keys()
            .max()
            .copied()
            .unwrap_or(0);
        let k = wait_until(Duration::from_secs(60), "the guest's next burst", || {
            let text = serial.contents();
            async move {
                Ok(bursts(&text)
                    .iter()
                    .find(|(k, b)| **k > seen && b.0)
                    .map(|(k, _)| *k))
            }
        })
        .await?;
        Ok((k, Instant::now()))
    }

    /// Makes the round's operation possible (not killed) and returns it.
    async fn prepare(&mut self, d: &Draw, name: &str) -> Result<Op> {
        let strs = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        Ok(match d.kind {
            Kind::Full => {
                world::mutate_cold(&self.cold_disk, &mut Rng::new(d.mutate))?;
                self.ledger.cold_next = Some(world::sha256_file(&self.cold_disk)?);
                Op::Cli(strs(&["snapshot", "create", COLD_ENV, "--resource", "all"]))
            }
            Kind::Incremental => Op::Cli(strs(&[
                "snapshot",
                "create",
                DPA_ENV,
                "--resource",
                "disk:vda",
            ])),
            Kind::WeaveCreate => {
                self.make_room().await?;
                match d.variant % d.kind.variants() {
                    2 => Op::Cli(strs(&["weave", "create", DPA_ENV, "--name", name])),
                    v => {
                        let s = self.cold_snapshot(d.pick)?;
                        let mut args = strs(&[
                            "weave",
                            "create",
                            COLD_ENV,
                            "--snapshot",
                            &s.to_string(),
                            "--name",
                            name,
                        ]);
                        if v == 1 {
                            args.push("--live".into());
                        }
                        Op::Cli(args)
                    }
                }
            }
            Kind::WeaveDelete => {
                let mut weaves = Live::read(&self.world).await?.weaves;
                if weaves.is_empty() {
                    let s = self.cold_snapshot(d.pick)?;
                    let prep = format!("{name}p");
                    self.world.weft_ok(&[
                        "weave",
                        "create",
                        COLD_ENV,
                        "--snapshot",
                        &s.to_string(),
                        "--name",
                        &prep,
                    ])?;
                    weaves = Live::read(&self.world).await?.weaves;
                }
                weaves.sort_by(|a, b| a.name.cmp(&b.name));
                let victim = &weaves[(d.pick % weaves.len() as u64) as usize];
                Op::Cli(strs(&["weave", "delete", &victim.name]))
            }
            Kind::ComposeApply => {
                self.make_room().await?;
                let mut args = strs(&["compose", "apply", COMPOSITION, "--weave", name]);
                if d.variant % d.kind.variants() == 1 {
                    args.push("--live".into());
                }
                Op::Cli(args)
            }
            Kind::DpaBurst => Op::Burst,
        })
    }

    /// At most one weave runs before a create (two after): TCG guests share two cores.
    async fn make_room(&self) -> Result<()> {
        let mut weaves = Live::read(&self.world).await?.weaves;
        weaves.sort_by(|a, b| a.created_at.cmp(&b.created_at));
        while weaves.len() > 1 {
            let w = weaves.remove(0);
            self.world
                .weft_ok(&["weave", "delete", &w.name])
                .with_context(|| format!("cannot delete weave {} (made before a kill)", w.name))?;
        }
        Ok(())
    }

    /// A complete disk snapshot of `rlcold`, chosen by `pick`.
    fn cold_snapshot(&self, pick: u64) -> Result<i64> {
        let snaps: Vec<Snapshot> = self
            .world
            .snapshots(COLD_ENV)?
            .into_iter()
            .filter(|s| s.state == SnapshotState::Complete && s.index_name.is_some())
            .collect();
        if snaps.is_empty() {
            bail!("{COLD_ENV} has no complete disk snapshot");
        }
        Ok(snaps[(pick % snaps.len() as u64) as usize].id)
    }

    async fn round(&mut self, round: u32, d: Draw) -> Result<()> {
        let t = Instant::now();
        let name = format!("rlw{round}");
        let variant = d.kind.variant_label(d.variant % d.kind.variants());
        let label = if variant.is_empty() {
            d.kind.label().to_string()
        } else {
            format!("{} ({variant})", d.kind.label())
        };
        let label = label.as_str();
        let op = match self.prepare(&d, &name).await {
            Ok(op) => op,
            Err(e) => {
                // A failure to prepare is a failure of what an earlier kill left.
                self.fail(round, label, &format!("preparing: {e:#}"));
                return Ok(());
            }
        };
        let duration = self
            .calibrated
            .get(&(d.kind, d.variant % d.kind.variants()))
            .copied()
            .unwrap_or_default();
        // Inside the operation: from when its request reaches weftd (the CLI's own
        // start-up and connection take `cli_overhead`) to 95% of its usual duration.
        let point = match d.kind {
            Kind::DpaBurst => duration.mul_f64(0.95 * d.point),
            _ => {
                let work = duration.saturating_sub(self.cli_overhead);
                self.cli_overhead + work.mul_f64(0.95 * d.point)
            }
        };
        let (inside, output) = self.kill_during(op, point).await?;
        let recovery = self.world.start_weftd().await.with_context(|| {
            format!(
                "seed {} round {round}: weftd does not start after the kill",
                self.seed
            )
        })?;
        self.recoveries.push(recovery);
        let mut failures = self.check(round, Some(d.older)).await;
        // An operation that ended before the kill must have succeeded.
        if let Some(o) = output.as_ref().filter(|o| !inside && !o.status.success()) {
            let err = String::from_utf8_lossy(&o.stderr);
            failures.push(format!(
                "the operation failed by itself before the kill: {}",
                err.lines().last().unwrap_or("").trim()
            ));
        }
        // A problem already found after the round before is not this kill's doing.
        let (fresh, still): (Vec<String>, Vec<String>) = failures
            .into_iter()
            .partition(|f| !self.last_failures.contains(f));
        self.last_failures = fresh.iter().chain(still.iter()).cloned().collect();
        let tally = self.tally.entry(d.kind).or_default();
        tally.kills += 1;
        tally.inside += u32::from(inside);
        tally.points_ms.push(point.as_millis() as u64);
        if fresh.is_empty() {
            tally.survived += 1;
        }
        let op_result = output
            .map(|o| {
                if o.status.success() {
                    "finished".to_string()
                } else {
                    let err = String::from_utf8_lossy(&o.stderr);
                    format!("cut: {}", err.lines().last().unwrap_or("").trim())
                }
            })
            .unwrap_or_else(|| "burst".into());
        let verdict = match (fresh.len(), still.len()) {
            (0, 0) => "ok".to_string(),
            (0, n) => format!("ok ({n} earlier problem(s) persist)"),
            (f, 0) => format!("{f} FAILED"),
            (f, n) => format!("{f} FAILED ({n} earlier problem(s) persist)"),
        };
        println!(
            "round {round:>3}: {label:<50} kill at {:>5} ms ({}); {op_result}; weftd back in {} ms; {verdict} ({:.1} s)",
            point.as_millis(),
            if inside { "inside" } else { "after it ended" },
            recovery.as_millis(),
            t.elapsed().as_secs_f64()
        );
        for f in fresh {
            self.fail(round, label, &f);
        }
        Ok(())
    }

    /// Starts `op`, kills weftd `point` later; whether the operation was still under way,
    /// and the output of its `weft` command.
    async fn kill_during(&mut self, op: Op, point: Duration) -> Result<(bool, Option<Output>)> {
        match op {
            Op::Cli(args) => {
                let refs: Vec<&str> = args.iter().map(String::as_str).collect();
                let mut child = self.world.spawn_weft(&refs)?;
                tokio::time::sleep(point).await;
                let inside = child.try_wait()?.is_none();
                self.world.kill_weftd()?;
                // The command ends once its connection breaks.
                let out = tokio::time::timeout(
                    Duration::from_secs(60),
                    tokio::task::spawn_blocking(move || child.wait_with_output()),
                )
                .await
                .context("the weft command does not end after weftd was killed")???;
                Ok((inside, Some(out)))
            }
            Op::Burst => {
                let (k, begun) = self.next_burst().await?;
                tokio::time::sleep(point.saturating_sub(begun.elapsed())).await;
                let text = self.world.serial(DPA_ENV).contents();
                let inside = !bursts(&text).get(&k).is_some_and(|b| b.1);
                self.world.kill_weftd()?;
                Ok((inside, None))
            }
        }
    }

    /// Every check; their failures, one line each.
    async fn check(&mut self, round: u32, older: Option<u64>) -> Vec<String> {
        let mut failures = Vec::new();
        if let Err(e) = checks::nothing_under_way(&self.world) {
            failures.push(format!("{e:#}"));
        }
        if let Err(e) = checks::store_verify(&self.world) {
            failures.push(format!("{e:#}"));
        }
        if let Err(e) = checks::restore_new(&self.world, &mut self.ledger, older) {
            failures.push(format!("restore: {e:#}"));
        }
        if let Err(e) = checks::dpa_rows(&self.world, &mut self.ledger.dpa).await {
            failures.push(format!("DPA rows: {e:#}"));
        }
        match checks::leftovers(&self.world).await {
            Ok(found) if found.is_empty() => {}
            Ok(found) => failures.push(format!("left over: {}", found.join("; "))),
            Err(e) => failures.push(format!("cannot look for leftovers: {e:#}")),
        }
        if round == 0 && !failures.is_empty() {
            eprintln!("checks before the first kill: {failures:?}");
        }
        failures
    }

    /// Deletes every weave and both environments, then checks that nothing is left;
    /// stops weftd and kills whatever process still names the work directory.
    async fn teardown(&mut self) -> Vec<String> {
        let mut found = Vec::new();
        if !self.world.weftd_alive() && self.world.start_weftd().await.is_err() {
            found.push("teardown: weftd does not start".to_string());
        }
        if let Ok(live) = Live::read(&self.world).await {
            for w in live.weaves {
                if let Err(e) = self.world.weft_ok(&["weave", "delete", &w.name]) {
                    found.push(format!("teardown: {e:#}"));
                }
            }
        }
        for env in [DPA_ENV, COLD_ENV] {
            if let Err(e) = self.world.weft_ok(&["env", "delete", env]) {
                found.push(format!("teardown: {e:#}"));
            }
        }
        match checks::leftovers(&self.world).await {
            Ok(l) => found.extend(l.into_iter().map(|l| format!("after teardown: {l}"))),
            Err(e) => found.push(format!("after teardown: {e:#}")),
        }
        self.world.stop_weftd();
        found.extend(self.world.kill_strays());
        found
    }

    fn summary(&self, options: &Options, elapsed: Duration) {
        let mut total = Tally::default();
        println!();
        println!(
            "Command: `weft-reliability kills --seed {} --kills {}`",
            self.seed, options.kills
        );
        println!("Date: {}; machine: {}", crate::now_utc(), crate::machine());
        println!();
        println!("| operation | calibrated duration (per variant) | kills | inside the operation | survived |");
        println!("| --- | ---: | ---: | ---: | ---: |");
        for kind in KINDS {
            let t = self.tally.get(&kind).cloned().unwrap_or_default();
            let durations: Vec<String> = (0..kind.variants())
                .map(|v| {
                    let ms = self.calibrated.get(&(kind, v)).map_or(0, |d| d.as_millis());
                    format!("{ms} ms")
                })
                .collect();
            println!(
                "| {} | {} | {} | {} | {} |",
                kind.label(),
                durations.join(", "),
                t.kills,
                t.inside,
                t.survived
            );
            total.kills += t.kills;
            total.inside += t.inside;
            total.survived += t.survived;
        }
        println!(
            "| **all** | | **{}** | **{}** | **{}** |",
            total.kills, total.inside, total.survived
        );
        let mut rec: Vec<u128> = self.recoveries.iter().map(Duration::as_millis).collect();
        rec.sort_unstable();
        println!();
        println!(
            "Kills survived: {} of {}. Restores compared: {} ({} snapshots in the final sweep). \
             Guest rows in the provenance log exactly once: {}. weftd answering again after a kill: \
             median {} ms, max {} ms. Run time {:.1} min. Failures: {}.",
            total.survived,
            total.kills,
            self.ledger.restores,
            self.ledger.restored.len(),
            self.ledger.dpa.rows.len(),
            rec.get(rec.len() / 2).copied().unwrap_or(0),
            rec.last().copied().unwrap_or(0),
            elapsed.as_secs_f64() / 60.0,
            self.failures.len()
        );
        for f in &self.failures {
            println!("- {f}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_seed_draws_the_same_rounds() {
        let rounds = |seed| {
            let mut rng = Rng::new(seed);
            (0..20)
                .map(|_| {
                    let d = draw(&mut rng);
                    (d.kind, (d.point * 1e9) as u64, d.variant, d.pick)
                })
                .collect::<Vec<_>>()
        };
        assert_eq!(rounds(5), rounds(5));
        assert_ne!(rounds(5), rounds(6));
        // Twenty rounds see most kinds.
        let kinds: std::collections::BTreeSet<Kind> = rounds(5).into_iter().map(|r| r.0).collect();
        assert!(kinds.len() >= 4, "{kinds:?}");
    }
}
