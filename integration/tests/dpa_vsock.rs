//! The DPA transport end to end with a real guest: weftd (vsock = "vhost-user")
//! starts `vhost-device-vsock` for the environment, QEMU gets a
//! `vhost-user-vsock-pci` device, and a program in the guest connects over AF_VSOCK
//! to CID 2, port 5150, where weftd's listener answers: welcome, then an ack for the
//! entries it made durable in the environment's provenance log. weftd is killed and
//! restarted meanwhile (the device outlives it and is adopted); deleting the
//! environment leaves no device process or socket behind. Also measures what the
//! vsock device adds to an environment's start.
//!
//! The guest program is `dpa_vsock/probe.rs`, compiled here with `rustc` as a static
//! binary and appended to the test guest's initramfs as a second cpio archive, with
//! its own `rdinit` script.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context as _};
use weft_dpa::proto::{encode, DataType, Decoder, Entry, Hello, Message, Operation, Welcome};
use weft_integration::{guest_assets, wait_until, SerialLog};

mod common;
use common::*;

const ENV: &str = "dpa1";

/// The frames the probe sends: hello, then a batch of entries 1..=3.
fn probe_frames() -> Vec<u8> {
    let entry = |seq: u64| Entry {
        seq,
        guest_time_us: 1_700_000_000_000_000 + seq as i64,
        data_type: DataType::Kv,
        op: Operation::Insert,
        source: "/etc/app.env".into(),
        collection: String::new(),
        key: format!("KEY{seq}"),
        old: None,
        new: Some(format!("\"value {seq}\"")),
        tx: None,
    };
    let mut out = encode(&Message::Hello(Hello {
        version: weft_dpa::proto::PROTOCOL_VERSION,
        capabilities: vec!["kv".into()],
        agent: "vsock-probe".into(),
    }));
    out.extend(encode(&Message::Batch((1..=3).map(entry).collect())));
    out
}

/// The rdinit of the probe guest: the test guest's modules (vsock among them), then
/// the probe, forever.
const PROBE_INIT: &str = r#"#!/bin/busybox sh
/bin/busybox mkdir -p /proc /sys /dev /tmp
/bin/busybox --install -s
export PATH=/sbin:/bin:/usr/sbin:/usr/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
exec </dev/console >/dev/console 2>&1
while read -r mod; do
    [ -f "/lib/modules/$mod.ko" ] && insmod "/lib/modules/$mod.ko"
done </etc/weft-modules
echo "WEFT-READY"
exec /weft-vsock-probe /probe-frames.bin
"#;

/// One newc cpio member.
fn cpio_member(out: &mut Vec<u8>, name: &str, mode: u32, data: &[u8]) {
    let pad = |out: &mut Vec<u8>| {
        while !out.len().is_multiple_of(4) {
            out.push(0);
        }
    };
    let fields = [
        0,
        mode,
        0,
        0,
        1,
        0,
        data.len() as u32,
        0,
        0,
        0,
        0,
        name.len() as u32 + 1,
        0,
    ];
    out.extend_from_slice(b"070701");
    for f in fields {
        out.extend_from_slice(format!("{f:08x}").as_bytes());
    }
    out.extend_from_slice(name.as_bytes());
    out.push(0);
    pad(out);
    out.extend_from_slice(data);
    pad(out);
}

/// The test guest's initramfs with the probe appended (the kernel unpacks
/// concatenated archives in order, each on a 4-byte boundary).
fn probe_initrd(base: &Path, dir: &Path) -> anyhow::Result<PathBuf> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/dpa_vsock/probe.rs");
    let bin = dir.join("weft-vsock-probe");
    let out = Command::new(std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into()))
        .args([
            "--edition",
            "2021",
            "-O",
            "-C",
            "target-feature=+crt-static",
            "-o",
        ])
        .arg(&bin)
        .arg(&src)
        .output()
        .context("run rustc")?;
    ensure!(
        out.status.success(),
        "rustc {}: {}",
        src.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    let mut img = std::fs::read(base)?;
    while !img.len().is_multiple_of(4) {
        img.push(0);
    }
    let mut cpio = Vec::new();
    cpio_member(
        &mut cpio,
        "weft-vsock-probe",
        0o100755,
        &std::fs::read(&bin)?,
    );
    cpio_member(&mut cpio, "probe-frames.bin", 0o100644, &probe_frames());
    cpio_member(&mut cpio, "probe-init", 0o100755, PROBE_INIT.as_bytes());
    cpio_member(&mut cpio, "TRAILER!!!", 0, &[]);
    img.extend(cpio);
    let path = dir.join("probe-initrd.img");
    std::fs::write(&path, img)?;
    Ok(path)
}

/// The probe's replies (round, welcome, ack) in the serial log so far.
fn replies(serial: &SerialLog) -> anyhow::Result<Vec<(u64, Welcome, u64)>> {
    let mut out = Vec::new();
    for line in serial.contents().lines() {
        let Some(rest) = line.trim().strip_prefix("PROBE-REPLY ") else {
            continue;
        };
        let (round, hex) = rest.split_once(' ').context("reply line")?;
        let bytes = (0..hex.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&hex[i..i + 2], 16))
            .collect::<Result<Vec<u8>, _>>()
            .context("hex")?;
        let mut d = Decoder::new();
        d.feed(&bytes);
        let (Some(Message::Welcome(w)), Some(Message::Ack { upto })) =
            (d.next_message()?, d.next_message()?)
        else {
            bail!("the probe got {bytes:02x?}, not welcome and ack");
        };
        out.push((round.parse()?, w, upto));
    }
    Ok(out)
}

/// The rounds in which the probe got no answer, with its error.
fn probe_errors(serial: &SerialLog) -> Vec<(u64, String)> {
    serial
        .contents()
        .lines()
        .filter_map(|l| {
            let (round, err) = l.trim().strip_prefix("PROBE-ERROR ")?.split_once(' ')?;
            Some((round.parse().ok()?, err.to_string()))
        })
        .collect()
}

async fn reply_after(
    serial: &SerialLog,
    round: u64,
    what: &str,
) -> anyhow::Result<(u64, Welcome, u64)> {
    wait_until(Duration::from_secs(60), what, || async move {
        Ok(replies(serial)?.into_iter().find(|r| r.0 > round))
    })
    .await
}

/// Processes whose command line mentions `needle`.
fn processes_naming(needle: &str) -> Vec<(u32, String)> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|p| p.parse().ok()) else {
            continue;
        };
        let Ok(cmd) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
        if cmd.contains(needle) {
            out.push((pid, cmd));
        }
    }
    out
}

fn records(rig: &Rig) -> anyhow::Result<Vec<u64>> {
    let log =
        weft_provenance::log::ProvenanceLog::open(rig.path("data/provenance"), Default::default())?;
    Ok(log
        .query(ENV, &weft_provenance::log::Query::default())?
        .into_iter()
        .map(|r| r.entry.seq)
        .collect())
}

async fn rig(vsock: &str) -> anyhow::Result<Rig> {
    let mut rig = Rig::new()?;
    let config = rig.path("weftd.toml");
    std::fs::write(&config, format!("[dpa]\nvsock = \"{vsock}\"\n"))?;
    rig.config = Some(config);
    rig.start_weftd().await?;
    Ok(rig)
}

#[tokio::test]
async fn qemu_a_guest_dpa_connection_reaches_weftd_over_vhost_user_vsock() -> anyhow::Result<()> {
    let mut rig = rig("vhost-user").await?;
    let assets = tokio::task::spawn_blocking(guest_assets).await??;
    let initrd = probe_initrd(&assets.initrd, rig.dir.path())?;
    rig.weft_ok(&[
        "env",
        "create",
        ENV,
        "--memory",
        "256M",
        "--kernel",
        assets.kernel.to_str().context("utf-8")?,
        "--initrd",
        initrd.to_str().context("utf-8")?,
        "--append",
        "console=ttyS0 panic=-1 rdinit=/probe-init",
    ])?;
    let serial = rig.serial(ENV);
    serial.wait_for("WEFT-READY", BOOT).await?;

    // The guest's connection arrives at weftd: welcome (nothing held yet), then the
    // ack of the three entries, durable in the log.
    let (round, welcome, upto) = reply_after(&serial, 0, "the probe's first reply").await?;
    eprintln!("first reply in round {round}: {welcome:?}, ack {upto}");
    ensure!(welcome.acked == 0 && upto == 3, "{welcome:?} ack {upto}");

    // One device process, serving the sockets in the VM's directory in weftd's
    // vsock directory (its working directory: it is given relative paths).
    let vsock_dir = rig.path("run/vsock");
    let vm_dir = vsock_dir.join(ENV);
    let devices: Vec<_> = processes_naming("vhost-device-vsock")
        .into_iter()
        .filter(|(pid, _)| {
            std::fs::read_link(format!("/proc/{pid}/cwd")).is_ok_and(|cwd| cwd == vm_dir)
        })
        .collect();
    ensure!(devices.len() == 1, "{devices:?}");
    let device_pid = devices[0].0;

    // Confined: its own non-root user (per VM, the directory's owner), no
    // capabilities, no_new_privs, a seccomp filter; and yet the guest got through.
    let status = std::fs::read_to_string(format!("/proc/{device_pid}/status"))?;
    let field = |key: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{key}:")))
            .map(|v| v.split_whitespace().collect::<Vec<_>>())
            .unwrap_or_default()
    };
    let uid: u32 = field("Uid").first().context("Uid")?.parse()?;
    ensure!(
        uid >= weft::dpa::DEFAULT_DEVICE_ID_BASE
            && field("Uid").iter().all(|u| *u == uid.to_string()),
        "the vsock device runs as uids {:?}",
        field("Uid")
    );
    ensure!(
        field("Gid").iter().all(|g| *g == uid.to_string()),
        "gids {:?}",
        field("Gid")
    );
    ensure!(field("Groups").is_empty(), "groups {:?}", field("Groups"));
    for caps in ["CapInh", "CapPrm", "CapEff", "CapAmb"] {
        ensure!(
            field(caps) == ["0000000000000000"],
            "{caps} {:?}",
            field(caps)
        );
    }
    ensure!(
        field("NoNewPrivs") == ["1"],
        "NoNewPrivs {:?}",
        field("NoNewPrivs")
    );
    ensure!(field("Seccomp") == ["2"], "Seccomp {:?}", field("Seccomp"));
    {
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::metadata(&vm_dir)?;
        ensure!(
            m.uid() == uid && m.mode() & 0o777 == 0o700,
            "{} is {m:?}",
            vm_dir.display()
        );
        let m = std::fs::metadata(&vsock_dir)?;
        ensure!(
            m.uid() == 0 && m.mode() & 0o077 == 0,
            "{} is {m:?}",
            vsock_dir.display()
        );
    }

    // weftd dies and comes back: the device (and the guest's vsock) live on, and the
    // guest's next connection is served by the new weftd, which holds entries 1-3.
    rig.kill_weftd();
    let seen = replies(&serial)?.last().map_or(0, |r| r.0);
    // The probe's next try finds no weftd behind the device (up to its 2 s period and 10 s
    // read timeout later); the device has to outlive weftd.
    let failed = wait_until(
        Duration::from_secs(60),
        "a probe round to fail while weftd is down",
        || async { Ok(probe_errors(&serial).into_iter().find(|e| e.0 > seen)) },
    )
    .await?;
    eprintln!("while weftd was down: {failed:?}");
    ensure!(
        weft_qmp::process::process_alive(device_pid),
        "the vsock device died with weftd"
    );
    ensure!(records(&rig)? == vec![1, 2, 3], "{:?}", records(&rig)?);
    rig.start_weftd().await?;
    let restarted = replies(&serial)?.last().map_or(0, |r| r.0).max(seen);
    let (_, welcome, upto) =
        reply_after(&serial, restarted, "a reply from the restarted weftd").await?;
    ensure!(welcome.acked == 3 && upto == 3, "{welcome:?} ack {upto}");

    // Deleting the environment ends the device and removes its sockets.
    rig.weft_ok(&["env", "delete", ENV])?;
    ensure!(
        !weft_qmp::process::process_alive(device_pid),
        "device pid {device_pid} outlived its environment"
    );
    let left: Vec<_> = std::fs::read_dir(&vsock_dir)?
        .map(|e| e.map(|e| e.file_name()))
        .collect::<Result<_, _>>()?;
    ensure!(left.is_empty(), "left in {}: {left:?}", vsock_dir.display());
    rig.passed();
    Ok(())
}

/// Median `weft env start` time (QEMU answering on QMP) of an idle guest, `n` runs.
async fn median_start(rig: &Rig, name: &str, n: usize) -> anyhow::Result<Duration> {
    let mut times = Vec::new();
    for _ in 0..n {
        let t = Instant::now();
        rig.weft_ok(&["env", "start", name])?;
        times.push(t.elapsed());
        rig.weft_ok(&["env", "stop", name])?;
    }
    times.sort();
    Ok(times[n / 2])
}

/// A benchmark (its limit is wall-clock time, which a busy machine breaks): run with
/// `cargo nextest run -p weft-integration --test dpa_vsock --run-ignored only --no-capture`.
#[tokio::test]
#[ignore = "benchmark: a wall-clock limit; run with --run-ignored only --no-capture"]
async fn qemu_time_the_vsock_device_adds_to_a_start() -> anyhow::Result<()> {
    let assets = tokio::task::spawn_blocking(guest_assets).await??;
    let create = |rig: &Rig, name: &str| {
        rig.weft_ok(&[
            "env",
            "create",
            name,
            "--no-start",
            "--memory",
            "256M",
            "--kernel",
            assets.kernel.to_str().unwrap_or_default(),
            "--initrd",
            assets.initrd.to_str().unwrap_or_default(),
            "--append",
            "console=ttyS0 panic=-1 weft.data=none weft.workload=idle",
        ])
    };
    let mut results = Vec::new();
    for (round, mode) in ["off", "vhost-user", "off", "vhost-user"]
        .iter()
        .enumerate()
    {
        let mut rig = rig(mode).await?;
        let name = format!("t{round}");
        create(&rig, &name)?;
        results.push((*mode, median_start(&rig, &name, 5).await?));
        rig.weft_ok(&["env", "delete", &name])?;
        rig.passed();
    }
    let median = |m: &str| {
        let mut v: Vec<Duration> = results.iter().filter(|r| r.0 == m).map(|r| r.1).collect();
        v.sort();
        v[v.len() / 2]
    };
    let (off, on) = (median("off"), median("vhost-user"));
    eprintln!(
        "env start, median of 5 starts x 2 weftds: vsock off {off:?}, vhost-user vsock {on:?} (+{:?}); {results:?}",
        on.saturating_sub(off)
    );
    // Generous: the device must not make a start noticeably slower.
    ensure!(on < off + Duration::from_millis(500), "{results:?}");
    Ok(())
}
