//! The results of a `backup` run as markdown tables: fulls, the incremental, restores,
//! and the ratios against the peers with their goals.

use super::image::{Content, Image};
use super::{Results, FULLS, GIB, MIB, RESTORE_PARALLEL};
use crate::{median, min_max};
#[allow(clippy::too_many_arguments)]
pub(super) fn print_results(
    image: &Image,
    chunk_size: u32,
    rounds: usize,
    offsets: &[u64],
    restic: &str,
    borg: &str,
    dropped: bool,
    res: &Results,
) {
    let mib = |b: f64| b / MIB as f64;
    let size = image.size as f64;
    println!();
    println!(
        "### backup: full snapshot of a {} GiB image ({rounds} rounds, median; weft chunks of {} KiB; page cache {})",
        image.size / GIB,
        chunk_size / 1024,
        if dropped {
            "dropped before each"
        } else {
            "not dropped"
        }
    );
    println!();
    println!(
        "Image: {} MiB random, {} MiB zero (unallocated), {} MiB one repeated MiB, {} MiB text. {restic}; {borg}.",
        image.mib_of(Content::Random),
        image.mib_of(Content::Zero),
        image.mib_of(Content::Repeated),
        image.mib_of(Content::Text),
    );
    println!();
    println!(
        "| tool | s (median) | min | max | MiB/s (image / time) | stored MiB | stored / image |"
    );
    println!("| --- | ---: | ---: | ---: | ---: | ---: | ---: |");
    for (i, who) in FULLS.iter().enumerate() {
        let (lo, hi) = min_max(&res.full_s[i]);
        let m = median(&res.full_s[i]);
        let stored = median(&res.stored[i]);
        println!(
            "| {} | {m:.2} | {lo:.2} | {hi:.2} | {:.0} | {:.1} | {:.3} |",
            who.name(),
            mib(size) / m,
            mib(stored),
            stored / size
        );
    }
    println!();
    println!(
        "weft plain: `backup::start` {:.0} ms, NBD connect + `pull::pull` {:.2} s (median); read {:.0} MiB over NBD (allocated extents only); QMP teardown after the index was written: {:.0} ms (not in the time).",
        median(&res.full_setup_s) * 1e3,
        median(&res.full_pull_s),
        mib(median(&res.weft_read)),
        median(&res.teardown_s) * 1e3
    );

    println!();
    println!(
        "### backup: incremental after writing {} blocks of 64 KiB (1 %) through the guest's block backend",
        offsets.len()
    );
    println!();
    println!("| what | median | min | max |");
    println!("| --- | ---: | ---: | ---: |");
    let row = |name: &str, xs: &[f64], scale: f64, digits: usize| {
        let (lo, hi) = min_max(xs);
        println!(
            "| {name} | {:.*} | {:.*} | {:.*} |",
            digits,
            median(xs) * scale,
            digits,
            lo * scale,
            digits,
            hi * scale
        );
    };
    row("incremental time (s)", &res.inc_s, 1.0, 3);
    row(
        "of which `backup::start` over QMP (s)",
        &res.inc_setup_s,
        1.0,
        3,
    );
    row(
        "of which NBD connect + `pull::pull` (s)",
        &res.inc_pull_s,
        1.0,
        3,
    );
    row(
        "of which `write_index` (s)",
        &res.inc_s
            .iter()
            .zip(&res.inc_setup_s)
            .zip(&res.inc_pull_s)
            .map(|((t, s), p)| t - s - p)
            .collect::<Vec<_>>(),
        1.0,
        3,
    );
    row("MiB marked dirty", &res.inc_marked, 1.0 / MIB as f64, 2);
    row("MiB read over NBD", &res.inc_read, 1.0 / MIB as f64, 2);
    row("chunks written", &res.inc_chunks, 1.0, 0);
    row(
        "MiB added to the store",
        &res.inc_stored,
        1.0 / MIB as f64,
        2,
    );
    row("teardown (s, not in the time)", &res.inc_teardown_s, 1.0, 3);
    row("dirtying, HMP qemu-io (s, not timed)", &res.dirty_s, 1.0, 2);

    println!();
    println!("### backup: restore of the full snapshot to a raw file (ends with fsync)");
    println!();
    println!("| tool | s (median) | min | max | MiB/s (image / time) | MiB written |");
    println!("| --- | ---: | ---: | ---: | ---: | ---: |");
    let weft_restore = format!(
        "weft (weftd's restore: {RESTORE_PARALLEL} groups of ≤ 1 MiB in flight, gets + O_DIRECT pwrite, zero chunks skipped)"
    );
    for (i, name) in [weft_restore.as_str(), "restic restore (writes every byte)"]
        .iter()
        .enumerate()
    {
        let (lo, hi) = min_max(&res.restore_s[i]);
        let m = median(&res.restore_s[i]);
        println!(
            "| {name} | {m:.2} | {lo:.2} | {hi:.2} | {:.0} | {:.0} |",
            mib(size) / m,
            mib(median(&res.restore_written[i]))
        );
    }

    let full = |i: usize| median(&res.full_s[i]);
    let yes = |ok: bool| if ok { "met" } else { "**missed**" };
    let tput = full(2) / full(0);
    let tput_enc = full(2) / full(1);
    let stored = median(&res.stored[0]) / median(&res.stored[3]);
    let inc = median(&res.inc_s) / full(0);
    let restore = median(&res.restore_s[1]) / median(&res.restore_s[0]);
    println!();
    println!("| ratio (from the medians) | value | goal | |");
    println!("| --- | ---: | --- | --- |");
    println!(
        "| full throughput, weft plain / restic | **{tput:.2}** | ≥ 2 | {} |",
        yes(tput >= 2.0)
    );
    println!("| full throughput, weft encrypted / restic | {tput_enc:.2} | (both encrypt) | |");
    println!(
        "| stored size, weft plain / borg | **{stored:.3}** | ≤ 1 | {} |",
        yes(stored <= 1.0)
    );
    println!(
        "| stored size, weft plain / borg with zstd,3 | {:.3} | (same compressor) | |",
        median(&res.stored[0]) / median(&res.stored[4])
    );
    println!(
        "| stored size, weft plain / restic | {:.3} | | |",
        median(&res.stored[0]) / median(&res.stored[2])
    );
    println!(
        "| time, weft incremental / weft full | **{inc:.3}** | ≤ 0.05 | {} |",
        yes(inc <= 0.05)
    );
    println!(
        "| restore throughput, weft / restic | **{restore:.2}** | ≥ 2 | {} |",
        yes(restore >= 2.0)
    );
}
