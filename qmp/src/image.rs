//! Image files made by QEMU itself, through a short-lived `qemu-storage-daemon`
//! (`blockdev-create`), so weft never writes image formats by hand nor runs `qemu-img`.

use std::path::Path;
use std::time::Duration;

use serde_json::json;

use crate::launch::{DiskFormat, LaunchPaths};
use crate::process::SpawnOptions;
use crate::{utf8_path as utf8, Error, Qmp};

/// Creates `path` as an empty qcow2 overlay of `size` bytes whose backing file is
/// `backing` (recorded by absolute path, with its format). Nothing reads `backing` here,
/// so it may be open read-write elsewhere. `work` holds the daemon's socket and log.
pub async fn create_overlay(
    path: &Path,
    backing: &Path,
    backing_format: DiskFormat,
    size: u64,
    work: &Path,
) -> Result<(), Error> {
    if path.exists() {
        return Err(Error::InvalidConfig(format!("{} exists", path.display())));
    }
    let path_s = utf8(path)?;
    utf8(backing)?;
    let token = std::process::id().to_string() + &format!("-{:x}", fxhash(path_s));
    let paths = LaunchPaths {
        qmp_socket: work.join(format!("mkimg-{token}.qmp")),
        serial_log: work.join(format!("mkimg-{token}.serial")),
        output_log: work.join(format!("mkimg-{token}.log")),
        // The daemon outlives a caller that dies; its pid file lets the caller's
        // successor find and end it.
        pid_file: Some(work.join(format!("mkimg-{token}.pid"))),
    };
    std::fs::create_dir_all(work)?;
    let daemon =
        crate::process::spawn_storage_daemon(&[], &paths, &SpawnOptions::default()).await?;
    let qmp = daemon.qmp().clone();
    let result = create_overlay_in(&qmp, path, backing, backing_format, size).await;
    let _ = qmp.execute_raw("quit", None).await;
    if tokio::time::timeout(Duration::from_secs(10), daemon.wait())
        .await
        .is_err()
    {
        daemon.kill().await;
    }
    for p in [&paths.serial_log, &paths.output_log]
        .into_iter()
        .chain(paths.pid_file.as_ref())
    {
        let _ = std::fs::remove_file(p);
    }
    if result.is_err() {
        let _ = std::fs::remove_file(path);
    }
    result
}

/// Creates `path` as [`create_overlay`] does, through `blockdev-create` jobs of an
/// already running QEMU or storage daemon (`qmp`), which saves starting a daemon: a
/// running environment's QEMU makes its own new top and a weave's overlay this way. The
/// file is not left open in that process. Node and job names derive from `path`, so
/// several overlays may be made on one connection, one after another.
pub async fn create_overlay_in(
    qmp: &Qmp,
    path: &Path,
    backing: &Path,
    backing_format: DiskFormat,
    size: u64,
) -> Result<(), Error> {
    if path.exists() {
        return Err(Error::InvalidConfig(format!("{} exists", path.display())));
    }
    let path_s = utf8(path)?;
    let backing_s = utf8(backing)?;
    // QEMU ids: a letter first, at most 31 characters.
    let tag = format!("mk{:016x}", fxhash(path_s));
    let (file, fmt) = (format!("{tag}f"), format!("{tag}q"));
    let result = async {
        create(
            qmp,
            &file,
            json!({"driver": "file", "filename": path_s, "size": 0}),
        )
        .await?;
        qmp.execute_raw(
            "blockdev-add",
            Some(json!({"driver": "file", "node-name": file, "filename": path_s})),
        )
        .await?;
        let made = create(
            qmp,
            &fmt,
            json!({
                "driver": "qcow2",
                "file": file,
                "size": size,
                "backing-file": backing_s,
                "backing-fmt": backing_format.driver(),
            }),
        )
        .await;
        let deleted = qmp
            .execute_raw("blockdev-del", Some(json!({"node-name": file})))
            .await
            .map(drop);
        made.and(deleted)
    }
    .await;
    if result.is_err() {
        let _ = std::fs::remove_file(path);
    }
    result
}

async fn create(qmp: &Qmp, id: &str, options: serde_json::Value) -> Result<(), Error> {
    let done = qmp.wait_job(id, Duration::from_secs(60));
    qmp.execute_raw(
        "blockdev-create",
        Some(json!({"job-id": id, "options": options})),
    )
    .await?;
    done.await
}

/// A small stable hash for unique work-file names.
fn fxhash(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    })
}
