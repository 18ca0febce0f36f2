//! End-to-end test of `weft weave sync`: two weaves branched at different instants both
//! write to their volume; a sync without a side refuses and lists the conflicting
//! ranges, touching nothing; with `--prefer src` the destination serves what the source
//! wrote, and the sync leaves no layer, export or NBD server behind.

use std::time::Duration;

use anyhow::{ensure, Context as _};
use weft_integration::wait_until;

mod common;
use common::*;

const NET: &str = "weft.workload=web weft.net=192.168.100.2/24,192.168.100.1";

async fn wait_boots(port: u16, want: impl Fn(&str) -> bool + Copy) -> anyhow::Result<String> {
    wait_until(
        Duration::from_secs(90),
        &format!("boots.txt on port {port}"),
        || async move { Ok(http(port, "boots.txt").ok().filter(|t| want(t))) },
    )
    .await?;
    http(port, "boots.txt")
}

#[tokio::test]
async fn qemu_weave_sync_refuses_conflicts_then_copies_the_source_side() -> anyhow::Result<()> {
    let mut rig = Rig::new()?;
    rig.start_weftd().await?;
    let disk = qcow2_data_disk(&rig, "vda")?;
    let tap = format!("ws{}", std::process::id() % 100_000);
    rig.boot_with("web", &[&disk], NET, &["--nic", &tap])
        .await?;
    rig.serial("web").wait_for("weft-web: tick 5", BOOT).await?;
    let s1 = rig.snapshot("web", "all").await?;
    rig.serial("web")
        .wait_for("weft-web: tick 15", BOOT)
        .await?;
    let s2 = rig.snapshot("web", "all").await?;
    for (name, s) in [("sa", &s1), ("sb", &s2)] {
        rig.weft_ok(&[
            "weave",
            "create",
            "web",
            "--snapshot",
            &s.id.to_string(),
            "--name",
            name,
        ])?;
    }
    let base = 47_240 + (std::process::id() % 8) as u16 * 2;
    let (pa, pb) = (base, base + 1);
    for (w, p) in [("sa", pa), ("sb", pb)] {
        rig.weft_ok(&[
            "weave",
            "route",
            w,
            "--guest-port",
            "80",
            "--host-port",
            &p.to_string(),
        ])?;
    }
    // Each weave's boot appended its own line to boots.txt: sa's write.
    let a_boots = wait_boots(pa, |t| t.lines().count() == 2).await?;
    let b_boots = wait_boots(pb, |t| t.lines().count() == 2).await?;
    let a_line = a_boots.lines().last().context("empty")?.to_string();
    ensure!(
        !b_boots.contains(&format!("{a_line}\n")),
        "sb sees sa's write before any sync: {b_boots:?}"
    );

    // Both changed the volume since s1 (sb's base is newer and both guests write):
    // refused, the conflicting ranges listed, sb untouched and not reset.
    let out = rig.weft(&["weave", "sync", "sa", "sb", "--volume", "vda"]);
    let err = String::from_utf8_lossy(&out.stderr);
    ensure!(!out.status.success(), "a conflicting sync must fail");
    ensure!(
        err.contains("both changed") && err.contains("--prefer"),
        "{err}"
    );
    ensure!(
        http(pb, "boots.txt")? == b_boots,
        "a refused sync changed sb"
    );

    // Unknown volume, same weave twice: one clear error each.
    let out = rig.weft(&["weave", "sync", "sa", "sb", "--volume", "vdz"]);
    ensure!(String::from_utf8_lossy(&out.stderr).contains("no volume"));
    let out = rig.weft(&["weave", "sync", "sa", "sa", "--volume", "vda"]);
    ensure!(String::from_utf8_lossy(&out.stderr).contains("the same"));

    // The source wins: sb is reset and then serves sa's file (with sa's boot line).
    let report = rig.weft_ok(&[
        "--json", "weave", "sync", "sa", "sb", "--volume", "vda", "--prefer", "src",
    ])?;
    let report: serde_json::Value = serde_json::from_str(&report)?;
    ensure!(report["copied_bytes"].as_u64() > Some(0), "{report}");
    ensure!(
        !report["conflicts"]
            .as_array()
            .context("conflicts")?
            .is_empty(),
        "{report}"
    );
    ensure!(report["reset"] == true, "{report}");
    let synced = wait_boots(pb, |t| {
        t.contains(&format!("{a_line}\n")) && t.lines().count() >= 3
    })
    .await?;
    ensure!(
        synced.starts_with(&a_boots),
        "sb should serve sa's boots.txt plus its new boot: {synced:?} vs {a_boots:?}"
    );
    // The source ran on, unchanged.
    ensure!(http(pa, "boots.txt")? == a_boots);

    // Nothing of the sync is left: no layer file, no socket.
    let sync_dir = rig.path("run/sync");
    let left: Vec<_> = std::fs::read_dir(&sync_dir)
        .map(|rd| rd.filter_map(|e| e.ok().map(|e| e.file_name())).collect())
        .unwrap_or_default();
    ensure!(left.is_empty(), "left in {}: {left:?}", sync_dir.display());

    for w in ["sa", "sb"] {
        rig.weft_ok(&["weave", "delete", w])?;
    }
    rig.weft_ok(&["env", "delete", "web"])?;
    rig.passed();
    Ok(())
}
