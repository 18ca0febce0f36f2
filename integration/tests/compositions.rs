//! End-to-end tests of temporal compositions through weftd and the `weft` CLI: a
//! weave whose disk comes from one instant and whose VM configuration comes from
//! another, and a `prompt` composition whose apply is refused until its conflict is
//! resolved. Real QEMU guests; weftd hands out weave network slots 240-249.

use std::path::Path;

use anyhow::{ensure, Context as _};
use weft::compositions::CompositionView;
use weft::model::{Job, NetSetup, Snapshot};
use weft::weaves::SourceRow;
use weft_api::composition::{Conflict, Origin};
use weft_integration::{read_ext4_file, wait_until};

mod common;
use common::*;

async fn rig() -> anyhow::Result<Rig> {
    let mut rig = Rig::new()?;
    let config = rig.path("weftd.toml");
    std::fs::write(&config, "[net]\nfirst_slot = 240\nlast_slot = 249\n")?;
    rig.config = Some(config);
    rig.start_weftd().await?;
    Ok(rig)
}

/// A snapshot of `resource` with `category`.
async fn snapshot(
    rig: &Rig,
    env: &str,
    resource: &str,
    category: &str,
) -> anyhow::Result<Snapshot> {
    let job: Job = rig
        .client()
        .post(
            &format!("/v1/environments/{env}/snapshots"),
            &serde_json::json!({"resource": resource, "category": category}),
        )
        .await?;
    let job = rig.wait_job(job.id).await?;
    let id = job
        .result
        .as_ref()
        .and_then(|r| r["snapshots"][0].as_i64())
        .context("snapshot id")?;
    Ok(rig.client().get(&format!("/v1/snapshots/{id}")).await?)
}

/// Pids of weft-blk processes serving `socket`.
fn weft_blk_pids(socket: &Path) -> Vec<u32> {
    let needle = socket.as_os_str().as_encoded_bytes().to_vec();
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| {
                c.windows(8).any(|w| w == b"weft-blk")
                    && c.windows(needle.len()).any(|w| w == needle.as_slice())
            })
        })
        .collect()
}

fn write_rules(rig: &Rig, name: &str, text: &str) -> anyhow::Result<String> {
    let path = rig.path(name);
    std::fs::write(&path, text)?;
    Ok(path.to_str().context("utf-8")?.to_string())
}

fn tick_in(image: &Path) -> anyhow::Result<u64> {
    let text = String::from_utf8(read_ext4_file(image, "/www/now.txt")?)?;
    text.trim()
        .strip_prefix("tick ")
        .and_then(|n| n.parse().ok())
        .with_context(|| format!("now.txt holds {text:?}"))
}

#[tokio::test]
async fn qemu_composition_takes_the_disk_and_the_config_from_different_instants(
) -> anyhow::Result<()> {
    let mut rig = rig().await?;
    let disk = qcow2_data_disk(&rig, "vda")?;
    rig.boot_with("cm", &[&disk], "weft.workload=web", &[])
        .await?;
    rig.serial("cm").wait_for("weft-web: tick 5", BOOT).await?;

    // Config C0 (256 MiB, 1 vCPU); the disk at T1; config C1 (384 MiB, 2 vCPUs) and
    // C2 (320 MiB, 2 vCPUs); the disk again at T3, further on.
    let c0 = snapshot(&rig, "cm", "config", "c0").await?;
    rig.weft_ok(&["env", "pause", "cm"])?;
    let reference = rig.path("t1.raw");
    let out = std::process::Command::new("qemu-img")
        .args(["convert", "-U", "-O", "raw"])
        .arg(&disk)
        .arg(&reference)
        .output()?;
    ensure!(out.status.success(), "qemu-img convert: {out:?}");
    let t1 = snapshot(&rig, "cm", "disk:vda", "t1").await?;
    rig.weft_ok(&["env", "resume", "cm"])?;
    let k1 = tick_in(&reference)?;
    rig.weft_ok(&["env", "set", "cm", "--memory", "384M", "--cpus", "2"])?;
    let c1 = snapshot(&rig, "cm", "config", "c1").await?;
    rig.weft_ok(&["env", "set", "cm", "--memory", "320M"])?;
    let c2 = snapshot(&rig, "cm", "config", "c2").await?;
    rig.ticks("cm", 5).await?;
    let t3 = snapshot(&rig, "cm", "disk:vda", "t3").await?;
    ensure!(t3.taken_at > t1.taken_at && c0.id < c1.id);
    // The address plan N1, recorded after both disks, then changed back.
    let plan_of = |env: &str| -> anyhow::Result<NetSetup> {
        Ok(serde_json::from_str(
            &rig.weft_ok(&["--json", "env", "net", env])?,
        )?)
    };
    let original = plan_of("cm")?.plan;
    rig.weft_ok(&[
        "env",
        "net",
        "cm",
        "--guest",
        "192.168.77.2/24",
        "--gateway",
        "192.168.77.1",
    ])?;
    let n1 = snapshot(&rig, "cm", "net", "n1").await?;
    rig.weft_ok(&[
        "env",
        "net",
        "cm",
        "--guest",
        &format!("{}/{}", original.guest_ip, original.guest_prefix),
        "--gateway",
        &original.gateway.to_string(),
    ])?;
    ensure!(original.guest_ip != "192.168.77.2".parse::<std::net::Ipv4Addr>()?);

    // The disk from T1, the configuration from C1.
    let rules = write_rules(
        &rig,
        "a.toml",
        r#"
        [[rule]]
        name = "disk before the change"
        resources = ["disk:*"]
        categories = ["t1"]

        [[rule]]
        name = "bigger config"
        resources = ["config"]
        categories = ["c1"]

        [[rule]]
        name = "later network"
        resources = ["net"]
        categories = ["n1"]
        "#,
    )?;
    rig.weft_ok(&["compose", "create", "ca", "--env", "cm", "--rules", &rules])?;
    let plan: CompositionView =
        serde_json::from_str(&rig.weft_ok(&["--json", "compose", "plan", "ca"])?)?;
    let from = |r: &str| {
        plan.plan
            .resources
            .iter()
            .find(|c| c.resource == r)
            .map(|c| (c.origin.clone(), c.rule.clone()))
    };
    let (disk_origin, disk_rule) = from("disk:vda").context("no disk in the plan")?;
    ensure!(
        matches!(disk_origin, Origin::Snapshot { id, .. } if id == t1.id),
        "{disk_origin:?}"
    );
    ensure!(disk_rule == "disk before the change", "{disk_rule}");
    ensure!(matches!(from("config").unwrap().0, Origin::Snapshot { id, .. } if id == c1.id));
    let text = rig.weft_ok(&["compose", "plan", "ca"])?;
    ensure!(
        text.contains("disk before the change") && text.contains("t1"),
        "{text}"
    );

    rig.weft_ok(&["compose", "apply", "ca", "--weave", "ca1"])?;
    // The weave's guest reads the disk of T1: its count goes on from T1's.
    rig.serial("ca1")
        .wait_for(&format!("weft-web: boot after tick {k1}"), BOOT)
        .await?;
    let (m, smp) = rig.qemu_memory_cpus("ca1")?;
    ensure!(
        m == "384M" && smp == "2",
        "weave QEMU runs with -m {m} -smp {smp}"
    );
    let sources: Vec<SourceRow> =
        serde_json::from_str(&rig.weft_ok(&["--json", "weave", "show", "ca1", "--sources"])?)?;
    let src = |r: &str| {
        sources
            .iter()
            .find(|s| s.resource == r)
            .and_then(|s| s.snapshot)
    };
    ensure!(
        src("disk:vda") == Some(t1.id) && src("config") == Some(c1.id) && src("net") == Some(n1.id),
        "{sources:?}"
    );
    // The network comes from its own rule (N1), not from the disk's instant (T1).
    let weave_plan = plan_of("ca1")?.plan;
    ensure!(
        weave_plan.guest_ip.to_string() == "192.168.77.2"
            && weave_plan.gateway.to_string() == "192.168.77.1",
        "weave ca1 has the address plan {weave_plan:?}"
    );

    // The same plan served live: weft-blk reads the chunk store, nothing is restored.
    rig.weft_ok(&["compose", "apply", "ca", "--live", "--weave", "ca2"])?;
    rig.serial("ca2")
        .wait_for(&format!("weft-web: boot after tick {k1}"), BOOT)
        .await?;
    let socket = rig.path("run/blk/ca2.vda.sock");
    let pids = weft_blk_pids(&socket);
    ensure!(pids.len() == 1, "no weft-blk serves {}", socket.display());
    // As weftd spawns it, it serves the guest under its seccomp filter.
    let status = std::fs::read_to_string(format!("/proc/{}/status", pids[0]))?;
    ensure!(
        status.lines().any(|l| l == "Seccomp:\t2") && status.lines().any(|l| l == "NoNewPrivs:\t1"),
        "weft-blk {} is not confined: {status}",
        pids[0]
    );
    rig.serial("ca2")
        .wait_for(&format!("weft-web: tick {}", (k1 / 5 + 2) * 5), BOOT)
        .await?;
    // Its served disk cannot be snapshotted yet: said, not silently left out of `all`.
    for args in [
        &["snapshot", "create", "ca2"][..],
        &["snapshot", "create", "ca2", "--resource", "disk:vda"],
    ] {
        let out = rig.weft(args);
        let err = String::from_utf8_lossy(&out.stderr);
        ensure!(
            !out.status.success() && err.contains("served disks are not supported"),
            "{args:?} on a live weave: {err}"
        );
    }
    rig.weft_ok(&["snapshot", "create", "ca2", "--resource", "config"])?;
    let out = rig.weft(&["weave", "sync", "ca1", "ca2", "--volume", "vda"]);
    let err = String::from_utf8_lossy(&out.stderr);
    ensure!(
        !out.status.success() && err.contains("served live by weft-blk"),
        "weave sync into a served volume: {err}"
    );
    // Its guest's writes survive a stop (weft-blk flushes and exits) and a start.
    rig.weft_ok(&["weave", "stop", "ca2"])?;
    ensure!(
        weft_blk_pids(&socket).is_empty(),
        "weft-blk outlived its weave's QEMU"
    );
    rig.weft_ok(&["weave", "start", "ca2"])?;
    let serial = rig.serial("ca2");
    let target = (k1 / 5 + 2) * 5;
    // The newest boot line (the serial log may start over with the new QEMU).
    let again = wait_until(BOOT, "the live weave to boot again", || {
        let text = serial.contents();
        async move {
            Ok(text
                .lines()
                .filter_map(|l| {
                    l.trim()
                        .strip_prefix("weft-web: boot after tick ")
                        .and_then(|n| n.trim().parse::<u64>().ok())
                })
                .filter(|n| *n != k1)
                .max())
        }
    })
    .await?;
    ensure!(
        again >= target,
        "the live weave restarted at tick {again}: its writes were lost"
    );
    rig.weft_ok(&["weave", "delete", "ca2"])?;
    ensure!(weft_blk_pids(&socket).is_empty() && !socket.exists());
    ensure!(
        !rig.path("data/blk/ca2").exists(),
        "the live weave's write layer was left behind"
    );

    // prompt: C1 and C2 both changed memory (from C0's): a conflict to resolve.
    let rules = write_rules(
        &rig,
        "b.toml",
        &format!(
            r#"
            conflict = "prompt"
            [[rule]]
            name = "first"
            resources = ["config"]
            pin = {}
            [[rule]]
            name = "second"
            resources = ["config"]
            pin = {}
            [[rule]]
            resources = ["disk:vda"]
            pin = {}
            "#,
            c1.id, c2.id, t3.id
        ),
    )?;
    rig.weft_ok(&["compose", "create", "cb", "--env", "cm", "--rules", &rules])?;
    let conflicts: Vec<Conflict> =
        serde_json::from_str(&rig.weft_ok(&["--json", "compose", "conflicts", "cb"])?)?;
    ensure!(
        conflicts
            == vec![Conflict {
                resource: "config".into(),
                key: "/memory_mib".into(),
                sides: [c1.id, c2.id],
                resolved: None,
            }],
        "{conflicts:?}"
    );
    let refused = rig.weft(&["compose", "apply", "cb", "--weave", "cb1"]);
    let err = String::from_utf8_lossy(&refused.stderr);
    ensure!(
        !refused.status.success(),
        "apply with an open conflict worked"
    );
    ensure!(
        err.contains("open conflict") && err.contains("config /memory_mib"),
        "{err}"
    );
    ensure!(
        rig.weft(&["weave", "show", "cb1"]).status.code() != Some(0),
        "a refused apply left a weave"
    );
    rig.weft_ok(&[
        "compose",
        "resolve",
        "cb",
        "--resource",
        "config",
        "--key",
        "/memory_mib",
        "--take",
        "older",
    ])?;
    rig.weft_ok(&["compose", "apply", "cb", "--weave", "cb1"])?;
    rig.serial("cb1").wait_for("WEFT-READY", BOOT).await?;
    let (m, smp) = rig.qemu_memory_cpus("cb1")?;
    ensure!(
        m == "384M" && smp == "2",
        "weave QEMU runs with -m {m} -smp {smp}"
    );

    // Every step is in the audit log, and the log verifies.
    let audit = rig.weft_ok(&["audit", "--limit", "100"])?;
    for action in [
        "compose.create",
        "compose.resolve",
        "compose.apply",
        "env.config",
    ] {
        ensure!(
            audit.contains(action),
            "no {action} in the audit log:\n{audit}"
        );
    }
    ensure!(rig.weft_ok(&["audit", "verify"])?.contains("audit log ok"));

    for w in ["ca1", "cb1"] {
        rig.weft_ok(&["weave", "delete", w])?;
    }
    rig.weft_ok(&["compose", "delete", "ca"])?;
    rig.weft_ok(&["compose", "delete", "cb"])?;
    rig.weft_ok(&["env", "delete", "cm"])?;
    rig.passed();
    Ok(())
}
