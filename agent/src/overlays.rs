//! The qcow2 overlays weft itself puts under a running environment's disks, and how
//! the guest's writes in them go back into the images the user gave.
//!
//! A weave "from now" freezes the images an environment runs on and gives the
//! environment a new top overlay per disk (`blockdev-snapshot`); from then on the guest
//! writes there. Those overlays are weft's, the images below are the user's:
//! - each overlay is recorded (`env_overlays`) as `pending` *before* QEMU switches to
//!   it, and marked `active` together with the new configuration once it has;
//! - recovery, a failed switch and `env delete` settle pending rows against what QEMU
//!   runs on (`query-block`), or, with no QEMU, against the overlay file itself (a
//!   complete overlay on the image below is always safe to run on: if QEMU never
//!   switched to it, it is empty and reads through);
//! - `env delete` commits every overlay down into the user's image (`block-commit` in
//!   the running QEMU with its vCPUs paused, or in a qemu-storage-daemon when it does
//!   not run) before anything is removed.

use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use sqlx::Row;
use tracing::{info, warn};
use weft_qmp::launch::{DiskConfig, DiskFormat, VmConfig};
use weft_qmp::{backup, block, commit, Qmp};

use crate::catalog::{now, Catalog, CatalogError};
use crate::error::{one_line, ApiError};

/// How long one commit job may take (a whole disk of guest writes).
const COMMIT_DEADLINE: Duration = Duration::from_secs(600);

/// One overlay weft put under an environment's disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Overlay {
    /// The environment.
    pub env: String,
    /// Its disk (the device name).
    pub disk: String,
    /// The overlay file weft made.
    pub path: PathBuf,
    /// The image it was made on (the disk's top before it).
    pub below: PathBuf,
    /// The image the user gave for the disk: where `env delete` commits to.
    pub origin: PathBuf,
    /// The format of `origin`.
    pub origin_format: DiskFormat,
    /// Whether the catalog knows QEMU runs on it (else it is `pending`).
    pub active: bool,
}

fn text(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

impl Catalog {
    /// Records overlays about to be switched to, as `pending`.
    pub async fn record_pending_overlays(&self, rows: &[Overlay]) -> Result<(), CatalogError> {
        let mut tx = self.pool.begin().await?;
        for o in rows {
            sqlx::query(
                "INSERT OR REPLACE INTO env_overlays
                   (env, disk, path, below, origin, origin_format, state, created_at)
                 VALUES (?, ?, ?, ?, ?, ?, 'pending', ?)",
            )
            .bind(&o.env)
            .bind(&o.disk)
            .bind(text(&o.path))
            .bind(text(&o.below))
            .bind(text(&o.origin))
            .bind(o.origin_format.driver())
            .bind(now())
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// QEMU runs on `paths`: they become `active`, and `config` (which names them) the
    /// environment's configuration, in one transaction.
    pub async fn activate_overlays(
        &self,
        env: &str,
        config: &VmConfig,
        paths: &[PathBuf],
    ) -> Result<(), CatalogError> {
        let config_text = serde_json::to_string(config).map_err(|e| CatalogError::Corrupt {
            name: env.to_string(),
            reason: e.to_string(),
        })?;
        let mut tx = self.pool.begin().await?;
        for p in paths {
            sqlx::query("UPDATE env_overlays SET state = 'active' WHERE env = ? AND path = ?")
                .bind(env)
                .bind(text(p))
                .execute(&mut *tx)
                .await?;
        }
        sqlx::query("UPDATE environments SET config = ?, updated_at = ? WHERE name = ?")
            .bind(config_text)
            .bind(now())
            .bind(env)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }

    /// Forgets overlays (never switched to, or committed down); with `config`, stores it
    /// as the environment's configuration in the same transaction.
    pub async fn forget_overlays(
        &self,
        env: &str,
        paths: &[PathBuf],
        config: Option<&VmConfig>,
    ) -> Result<(), CatalogError> {
        let mut tx = self.pool.begin().await?;
        for p in paths {
            sqlx::query("DELETE FROM env_overlays WHERE env = ? AND path = ?")
                .bind(env)
                .bind(text(p))
                .execute(&mut *tx)
                .await?;
        }
        if let Some(config) = config {
            let config_text = serde_json::to_string(config).map_err(|e| CatalogError::Corrupt {
                name: env.to_string(),
                reason: e.to_string(),
            })?;
            sqlx::query("UPDATE environments SET config = ?, updated_at = ? WHERE name = ?")
                .bind(config_text)
                .bind(now())
                .bind(env)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// The overlays weft put under `env`'s disks, oldest first.
    pub async fn env_overlays(&self, env: &str) -> Result<Vec<Overlay>, CatalogError> {
        let rows =
            sqlx::query("SELECT * FROM env_overlays WHERE env = ? ORDER BY created_at, rowid")
                .bind(env)
                .fetch_all(&self.pool)
                .await?;
        rows.iter()
            .map(|r| {
                let format: String = r.try_get("origin_format")?;
                let state: String = r.try_get("state")?;
                Ok(Overlay {
                    env: r.try_get("env")?,
                    disk: r.try_get("disk")?,
                    path: PathBuf::from(r.try_get::<String, _>("path")?),
                    below: PathBuf::from(r.try_get::<String, _>("below")?),
                    origin: PathBuf::from(r.try_get::<String, _>("origin")?),
                    origin_format: if format == "qcow2" {
                        DiskFormat::Qcow2
                    } else {
                        DiskFormat::Raw
                    },
                    active: state == "active",
                })
            })
            .collect()
    }
}

/// The image the user gave for `disk` of `env` (and its format): the origin of the
/// overlays weft put under it, or the disk's own image when there are none.
pub async fn origin_of(
    catalog: &Catalog,
    env: &str,
    disk: &weft_qmp::launch::DiskConfig,
) -> Result<(PathBuf, DiskFormat), ApiError> {
    Ok(catalog
        .env_overlays(env)
        .await?
        .into_iter()
        .find(|o| o.disk == disk.name)
        .map(|o| (o.origin, o.origin_format))
        .unwrap_or_else(|| (disk.path.clone(), disk.format)))
}

fn canonical(p: &Path) -> PathBuf {
    std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf())
}

/// The image files of the backing chain of device `disk`, top first (`query-block`).
async fn chain(qmp: &Qmp, disk: &str) -> Result<Vec<PathBuf>, ApiError> {
    let files = block::device_chain(qmp, disk)
        .await
        .map_err(ApiError::from)?
        .unwrap_or_default();
    Ok(files.iter().map(|f| canonical(Path::new(f))).collect())
}

/// The backing file a qcow2 image's header names, if `path` is a complete qcow2
/// header with one (read by hand: 20 bytes and the name, no image parsing).
fn qcow2_backing(path: &Path) -> Option<PathBuf> {
    let mut f = std::fs::File::open(path).ok()?;
    let mut head = [0u8; 20];
    f.read_exact(&mut head).ok()?;
    if &head[..4] != b"QFI\xfb" {
        return None;
    }
    let offset = u64::from_be_bytes(head[8..16].try_into().ok()?);
    let len = u32::from_be_bytes(head[16..20].try_into().ok()?);
    // QEMU limits backing file names to 1023 bytes.
    if offset == 0 || len == 0 || len > 1023 {
        return None;
    }
    use std::io::Seek as _;
    f.seek(std::io::SeekFrom::Start(offset)).ok()?;
    let mut name = vec![0u8; len as usize];
    f.read_exact(&mut name).ok()?;
    String::from_utf8(name).ok().map(PathBuf::from)
}

/// `disk` with overlay `o` as its top, over the image `o` was made on and what the
/// configuration has below that image. An overlay on an image the configuration does
/// not know gets no recorded chain: the next start reads it from the headers weft wrote
/// ([`crate::images::pin_backing`]).
fn over(disk: &DiskConfig, o: &Overlay) -> DiskConfig {
    let below = canonical(&o.below);
    if canonical(&disk.path) == below {
        return disk.under(&o.path);
    }
    match disk
        .backing
        .iter()
        .find(|b| canonical(&b.path) == below)
        .and_then(|b| disk.rebased_to(&b.path))
    {
        Some(base) => base.under(&o.path),
        None => DiskConfig {
            path: o.path.clone(),
            format: DiskFormat::Qcow2,
            backing: Vec::new(),
            ..disk.clone()
        },
    }
}

/// Settles `env`'s pending overlays (and active ones a finished commit left behind)
/// against what its QEMU runs on: `qmp` when it runs, `None` when no QEMU of it runs
/// (never call it with `None` while a QEMU that does not answer may still run).
/// Overlays QEMU runs on become active and the configuration names them; overlays it
/// never switched to are forgotten and their files removed.
pub async fn settle(
    catalog: &Catalog,
    env: &str,
    qmp: Option<&Qmp>,
) -> Result<Vec<String>, ApiError> {
    let overlays = catalog.env_overlays(env).await?;
    if overlays.is_empty() {
        return Ok(Vec::new());
    }
    let Some(row) = catalog.environment(env).await? else {
        return Ok(Vec::new());
    };
    let Some(mut config) = row.config else {
        return Ok(Vec::new());
    };
    let mut done = Vec::new();
    let (mut adopt, mut forget) = (Vec::new(), Vec::new());
    let mut changed = false;
    for disk in config.disks.iter_mut() {
        let mine: Vec<&Overlay> = overlays.iter().filter(|o| o.disk == disk.name).collect();
        if mine.is_empty() {
            continue;
        }
        match qmp {
            Some(qmp) => {
                let files = chain(qmp, &disk.name).await?;
                if files.is_empty() {
                    // QEMU shows no such device: nothing to learn from it.
                    continue;
                }
                let top = &files[0];
                let origin = canonical(&mine[0].origin);
                let ours = |o: &&Overlay| files.contains(&canonical(&o.path));
                if mine.iter().any(|o| o.active) && !mine.iter().any(ours) && *top == origin {
                    // A commit finished: QEMU runs on the user's image again.
                    *disk = disk
                        .rebased_to(&mine[0].origin)
                        .unwrap_or_else(|| DiskConfig {
                            path: mine[0].origin.clone(),
                            format: mine[0].origin_format,
                            backing: Vec::new(),
                            ..disk.clone()
                        });
                    changed = true;
                    forget.extend(mine.iter().map(|o| o.path.clone()));
                    done.push(format!(
                        "disk {}: committed into {}",
                        disk.name,
                        origin.display()
                    ));
                    continue;
                }
                for o in &mine {
                    if o.active {
                        continue;
                    }
                    if ours(o) {
                        adopt.push(o.path.clone());
                        done.push(format!(
                            "disk {}: QEMU runs on {}",
                            disk.name,
                            o.path.display()
                        ));
                    } else {
                        forget.push(o.path.clone());
                        done.push(format!(
                            "disk {}: {} was never switched to",
                            disk.name,
                            o.path.display()
                        ));
                    }
                }
                if let Some(o) = mine.iter().find(|o| canonical(&o.path) == *top) {
                    if disk.path != o.path {
                        *disk = over(disk, o);
                        changed = true;
                    }
                }
            }
            None => {
                for o in mine.iter().filter(|o| !o.active) {
                    // Complete and made on the image the configuration names: running
                    // on it loses nothing whether or not QEMU switched to it.
                    let complete = qcow2_backing(&o.path)
                        .is_some_and(|b| canonical(&b) == canonical(&o.below));
                    if complete && canonical(&disk.path) == canonical(&o.below) {
                        *disk = over(disk, o);
                        changed = true;
                        adopt.push(o.path.clone());
                        done.push(format!(
                            "disk {}: runs on {} from now",
                            disk.name,
                            o.path.display()
                        ));
                    } else {
                        forget.push(o.path.clone());
                        done.push(format!(
                            "disk {}: {} was never switched to",
                            disk.name,
                            o.path.display()
                        ));
                    }
                }
            }
        }
    }
    if !adopt.is_empty() || changed {
        catalog.activate_overlays(env, &config, &adopt).await?;
    }
    if !forget.is_empty() {
        catalog.forget_overlays(env, &forget, None).await?;
        for p in &forget {
            // Never the file QEMU runs on: those were adopted above.
            if !config.disks.iter().any(|d| d.path == *p) {
                let _ = std::fs::remove_file(p);
            }
        }
    }
    for d in &done {
        info!(env, detail = %d, "overlays settled");
    }
    Ok(done)
}

/// Commits everything above the user's image `origin` on the chain of block node
/// `root` down into it (an active commit: `block-commit`, then `block-job-complete`
/// once it is ready), in a QEMU or qemu-storage-daemon. Afterwards `root`'s users
/// run on `origin` itself.
pub async fn commit_down(
    qmp: &Qmp,
    root: &str,
    origin: &Path,
    origin_format: DiskFormat,
    job: &str,
) -> Result<(), ApiError> {
    let qemu =
        |e: weft_qmp::Error| ApiError::qmp(format!("committing into {}", origin.display()), e);
    let base = block::node_of_file(qmp, origin_format.driver(), origin)
        .await
        .map_err(qemu)?
        .ok_or_else(|| {
            ApiError::Qemu(format!(
                "{} is not in the disk's backing chain; nothing was changed",
                origin.display()
            ))
        })?;
    if base == root {
        return Ok(());
    }
    match commit::active_commit(qmp, job, root, Some(&base), COMMIT_DEADLINE).await {
        Ok(()) => Ok(()),
        Err(e @ weft_qmp::Error::BlockJob { .. }) => {
            warn!(job, error = %e, "commit did not complete");
            Err(ApiError::Qemu(one_line(&format!(
                "committing into {}: {e}; nothing was removed",
                origin.display()
            ))))
        }
        Err(e) => Err(qemu(e)),
    }
}

/// The root node of device `disk` in a running QEMU.
pub async fn device_root(qmp: &Qmp, disk: &str) -> Result<String, ApiError> {
    backup::device_root_node(qmp, disk)
        .await
        .map_err(|e| ApiError::qmp(format!("disk {disk}"), e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qcow2_backing_reads_only_complete_headers() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("o.qcow2");
        let name = b"/images/base.raw";
        let mut img = vec![0u8; 512];
        img[..4].copy_from_slice(b"QFI\xfb");
        img[8..16].copy_from_slice(&200u64.to_be_bytes());
        img[16..20].copy_from_slice(&(name.len() as u32).to_be_bytes());
        img[200..200 + name.len()].copy_from_slice(name);
        std::fs::write(&p, &img).unwrap();
        assert_eq!(qcow2_backing(&p), Some(PathBuf::from("/images/base.raw")));
        // Cut short before the name: not complete.
        std::fs::write(&p, &img[..210]).unwrap();
        assert_eq!(qcow2_backing(&p), None);
        // Not qcow2 at all, or empty.
        std::fs::write(&p, vec![0u8; 512]).unwrap();
        assert_eq!(qcow2_backing(&p), None);
        std::fs::write(&p, b"").unwrap();
        assert_eq!(qcow2_backing(&p), None);
    }

    #[tokio::test]
    async fn overlays_go_pending_active_and_forgotten() {
        let catalog = Catalog::open_in_memory().await.unwrap();
        let config = VmConfig::default();
        catalog
            .insert_environment(&crate::catalog::NewEnvironment {
                name: "e",
                kind: crate::model::EnvKind::Managed,
                config: Some(&config),
                qmp_socket: Path::new("/run/e.sock"),
                state: crate::model::EnvState::Stopped,
                pid: None,
            })
            .await
            .unwrap();
        let o = Overlay {
            env: "e".into(),
            disk: "vda".into(),
            path: "/d/vda-1.qcow2".into(),
            below: "/img/vda.raw".into(),
            origin: "/img/vda.raw".into(),
            origin_format: DiskFormat::Raw,
            active: false,
        };
        catalog
            .record_pending_overlays(std::slice::from_ref(&o))
            .await
            .unwrap();
        assert_eq!(catalog.env_overlays("e").await.unwrap(), vec![o.clone()]);
        catalog
            .activate_overlays("e", &config, std::slice::from_ref(&o.path))
            .await
            .unwrap();
        assert!(catalog.env_overlays("e").await.unwrap()[0].active);
        catalog
            .forget_overlays("e", std::slice::from_ref(&o.path), None)
            .await
            .unwrap();
        assert!(catalog.env_overlays("e").await.unwrap().is_empty());
    }
}
