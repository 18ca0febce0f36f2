//! Restores: a disk snapshot written out as a raw or qcow2 image, or into an environment.

use super::*;

impl Snapshots {
    /// The block map of a disk snapshot, checked against its recorded checksum.
    pub async fn block_map(&self, id: i64) -> Result<BlockMap, ApiError> {
        let s = self.get(id).await?;
        let name = s
            .index_name
            .clone()
            .ok_or_else(|| ApiError::BadRequest(format!("snapshot {id} has no disk")))?;
        let store = self.store.clone();
        let map = blocking(move || store.read_index(&name))
            .await?
            .map_err(store_err)?;
        if Some(pull::digest_of(&map)) != s.checksum {
            return Err(ApiError::Internal(format!(
                "the block map of snapshot {id} does not match its recorded checksum"
            )));
        }
        Ok(map)
    }

    /// Restores a disk snapshot into a new raw image at `output` and waits for it (used
    /// for the shared bases of weaves).
    pub async fn restore_into(&self, id: i64, output: &Path) -> Result<(), ApiError> {
        let map = self.block_map(id).await?;
        let progress = (AtomicU64::new(0), AtomicU64::new(0));
        restore_raw(&self.store, &map, output, &progress)
            .await
            .map(drop)
    }

    /// Restores a block map (e.g. a composition's merge of disk snapshots) into a new
    /// raw image at `output` and waits for it.
    pub async fn restore_map_into(&self, map: &BlockMap, output: &Path) -> Result<(), ApiError> {
        let progress = (AtomicU64::new(0), AtomicU64::new(0));
        restore_raw(&self.store, map, output, &progress)
            .await
            .map(drop)
    }

    /// Restores a disk snapshot into a new image at `output` as a job. `output` must be
    /// inside `export_dirs` (see [`crate::confine`]); an existing file there is refused
    /// unless `force` is set, and then only a regular file is replaced.
    pub async fn restore(
        self: &Arc<Self>,
        id: i64,
        output: &Path,
        format: Option<&str>,
        force: bool,
        actor: &str,
    ) -> Result<Job, ApiError> {
        let s = self.get(id).await?;
        if s.state != SnapshotState::Complete {
            return Err(ApiError::Conflict(format!(
                "snapshot {id} is {}, not complete",
                s.state.as_str()
            )));
        }
        let Some(name) = s.index_name.clone() else {
            return Err(ApiError::BadRequest(format!(
                "snapshot {id} is a {} snapshot: it has no disk to restore",
                s.resource
            )));
        };
        let qcow2 = match format.unwrap_or("raw") {
            "raw" => false,
            "qcow2" => true,
            other => {
                return Err(ApiError::BadRequest(format!(
                    "unknown format {other:?}: use raw or qcow2"
                )))
            }
        };
        let replace = if force {
            crate::confine::Replace::RegularFile
        } else {
            crate::confine::Replace::Never
        };
        // The file is made (0600, under a temporary name) before the job starts, so a
        // refused path is the request's answer.
        let pending = crate::confine::ExportDirs::new(self.manager.config())
            .create("--output", output, replace)?;
        let output = pending.path();
        let checksum = s.checksum.clone();
        self.spawn_job(
            "restore",
            &format!("snapshot {id}"),
            actor,
            move |me, progress| async move {
                let store = me.store.clone();
                let map = blocking(move || store.read_index(&name))
                    .await?
                    .map_err(store_err)?;
                if Some(pull::digest_of(&map)) != checksum {
                    return Err(ApiError::Internal(format!(
                        "the block map of snapshot {id} does not match its recorded checksum"
                    )));
                }
                let work = me.manager.config().run_dir.join("restore");
                // Names the temporary file for the next weftd, should this one die
                // before it is renamed (see crate::leftovers).
                let record = crate::leftovers::record_output(&work, id, &pending.temp_path())?;
                let written = if qcow2 {
                    restore_qcow2(&me.store, &map, &pending.proc_path(), &work, id, &progress).await
                } else {
                    let file = Arc::clone(pending.file());
                    file.set_len(map.disk_size).map_err(|e| {
                        ApiError::io(format!("cannot size {}", output.display()), e)
                    })?;
                    crate::testpoints::point("restore.partial").await;
                    restore_raw_file(&me.store, &map, file, &progress, &pending.temp_path()).await
                };
                let written = match written {
                    Ok(n) => blocking(move || pending.commit())
                        .await?
                        .map(|()| n)
                        .map_err(ApiError::from),
                    Err(e) => Err(e),
                };
                let _ = std::fs::remove_file(&record);
                let written = written?;
                Ok(json!({"output": output, "bytes": map.disk_size, "bytes_written": written}))
            },
        )
        .await
    }
}

/// Writes `map` as a qcow2 image at `target`, a path QEMU opens (for a restore, the
/// weftd descriptor of the file made in the export directory). QEMU writes the format:
/// a qemu-storage-daemon creates the image, exports it writable over NBD, and only the
/// data chunks are written (zero chunks stay unallocated).
async fn restore_qcow2(
    store: &ChunkStore,
    map: &BlockMap,
    target: &Path,
    work: &Path,
    id: i64,
    progress: &(AtomicU64, AtomicU64),
) -> Result<u64, ApiError> {
    std::fs::create_dir_all(work)
        .map_err(|e| ApiError::io(format!("cannot create {}", work.display()), e))?;
    let paths = weft_qmp::launch::LaunchPaths {
        qmp_socket: work.join(format!("{id}.qmp")),
        serial_log: work.join(format!("{id}.serial")),
        output_log: work.join(format!("{id}.log")),
        pid_file: Some(work.join(format!("{id}.pid"))),
    };
    let nbd_socket = work.join(format!("{id}.nbd"));
    let daemon = weft_qmp::process::spawn_storage_daemon(
        &[],
        &paths,
        &weft_qmp::process::SpawnOptions::default(),
    )
    .await
    .map_err(|e| ApiError::qmp("cannot start qemu-storage-daemon", e))?;
    let qmp = daemon.qmp().clone();
    let written = async {
        let qemu = |e: weft_qmp::Error| ApiError::qmp("qcow2 restore", e);
        backup::create_file_node(&qmp, target, "out-file")
            .await
            .map_err(qemu)?;
        backup::create_qcow2_node(&qmp, "out-file", "out", map.disk_size, None)
            .await
            .map_err(qemu)?;
        if nbd_socket.to_str().is_none() {
            return Err(ApiError::Internal("socket path is not UTF-8".into()));
        }
        export::start_server(&qmp, &nbd_socket)
            .await
            .map_err(qemu)?;
        export::add(&qmp, &Export::writable("out", "out", "out"))
            .await
            .map_err(qemu)?;
        let nbd = NbdClient::connect_unix(&nbd_socket, "out", &[])
            .await
            .map_err(|e| ApiError::nbd("qcow2 restore", e))?;
        progress.1.store(map.data_bytes(), Ordering::Relaxed);
        let nbd_ref = &nbd;
        let written = stream::iter(weft_blockdev::restore::data_groups(map))
            .map(|group| {
                let store = store.clone();
                async move {
                    let offset = group.offset;
                    let data = blocking(move || weft_blockdev::restore::read_group(&store, &group))
                        .await?
                        .map_err(store_err)?;
                    let step = nbd_ref.max_request() as usize;
                    for (k, piece) in data.chunks(step).enumerate() {
                        nbd_ref
                            .write(offset + (k * step) as u64, piece)
                            .await
                            .map_err(|e| {
                                ApiError::nbd(format!("qcow2 restore: write at {offset}"), e)
                            })?;
                    }
                    progress.0.fetch_add(data.len() as u64, Ordering::Relaxed);
                    Ok::<u64, ApiError>(data.len() as u64)
                }
            })
            .buffer_unordered(weft_blockdev::restore::PARALLEL_GROUPS)
            .try_fold(0u64, |acc, n| async move { Ok(acc + n) })
            .await?;
        nbd.flush()
            .await
            .map_err(|e| ApiError::nbd("qcow2 restore: flush", e))?;
        let _ = nbd.disconnect().await;
        Ok::<u64, ApiError>(written)
    }
    .await;
    // quit closes the image cleanly (QEMU writes its metadata); then the file is final.
    let _ = qmp.execute_raw("quit", None).await;
    if tokio::time::timeout(std::time::Duration::from_secs(30), daemon.wait())
        .await
        .is_err()
    {
        daemon.kill().await;
    }
    let _ = std::fs::remove_file(&nbd_socket);
    remove_launch_files(&paths);
    written
}

/// Writes `map` as a sparse raw image of weft's own (a weave's base): into
/// `<output>.partial`, then renamed.
async fn restore_raw(
    store: &ChunkStore,
    map: &BlockMap,
    output: &Path,
    progress: &(AtomicU64, AtomicU64),
) -> Result<u64, ApiError> {
    let partial = PathBuf::from(format!("{}.partial", output.display()));
    let io =
        |what: &str, e: std::io::Error| ApiError::io(format!("{what} {}", partial.display()), e);
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&partial)
        .map_err(|e| io("cannot create", e))?;
    file.set_len(map.disk_size)
        .map_err(|e| io("cannot size", e))?;
    crate::testpoints::point("restore.partial").await;
    let file = Arc::new(file);
    let result = restore_raw_file(store, map, Arc::clone(&file), progress, &partial).await;
    let written = match result {
        Ok(w) => w,
        Err(e) => {
            let _ = std::fs::remove_file(&partial);
            return Err(e);
        }
    };
    file.sync_all().map_err(|e| io("cannot sync", e))?;
    std::fs::rename(&partial, output).map_err(|e| io("cannot rename", e))?;
    Ok(written)
}

/// Writes the data chunks of `map` into `file` (already sized), in parallel.
async fn restore_raw_file(
    store: &ChunkStore,
    map: &BlockMap,
    file: Arc<std::fs::File>,
    progress: &(AtomicU64, AtomicU64),
    path: &Path,
) -> Result<u64, ApiError> {
    progress.1.store(map.data_bytes(), Ordering::Relaxed);
    let report = |done: u64, _total: u64| progress.0.store(done, Ordering::Relaxed);
    weft_blockdev::restore::restore_into_file(store, map, file, &report)
        .await
        .map_err(|e| match e {
            weft_blockdev::restore::Error::Store(e) => store_err(e),
            // Which file: a full disk is then a one-line answer to "where".
            e @ weft_blockdev::restore::Error::Write { .. } => {
                ApiError::restore(path.display().to_string(), e)
            }
            e => ApiError::restore("", e),
        })
}

/// Removes the files of a storage daemon that has ended.
pub(super) fn remove_launch_files(paths: &weft_qmp::launch::LaunchPaths) {
    for p in [&paths.qmp_socket, &paths.serial_log, &paths.output_log]
        .into_iter()
        .chain(paths.pid_file.as_ref())
    {
        let _ = std::fs::remove_file(p);
    }
}
