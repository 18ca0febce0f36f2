//! Catalog rows of snapshots and jobs.

use sqlx::Row;
use weft_qmp::launch::VmConfig;

use crate::catalog::{now, Catalog, CatalogError};
use crate::model::{Job, JobState, Snapshot, SnapshotKind, SnapshotState};

/// A new snapshot row (state `pending`, or `complete` for a config snapshot). Net
/// snapshots are written by [`crate::net`].
#[derive(Debug, Clone)]
pub struct NewSnapshot<'a> {
    /// Environment name.
    pub env: &'a str,
    /// `disk:<name>` or `config`.
    pub resource: &'a str,
    /// Full, incremental or config.
    pub kind: SnapshotKind,
    /// Who asked.
    pub actor: &'a str,
    /// Semantic category.
    pub category: Option<&'a str>,
    /// Free text.
    pub note: Option<&'a str>,
    /// The snapshot this one builds on.
    pub parent: Option<i64>,
    /// Why a disk snapshot is full.
    pub reason: Option<&'a str>,
    /// The VM configuration (config snapshots).
    pub config: Option<&'a VmConfig>,
    /// The instant the snapshot shows; every resource of one request shares it.
    pub taken_at: &'a str,
}

/// Filters of a snapshot listing.
#[derive(Debug, Clone, Default)]
pub struct SnapshotFilter {
    /// Only this resource.
    pub resource: Option<String>,
    /// Taken at or after (RFC 3339).
    pub since: Option<String>,
    /// Taken at or before (RFC 3339).
    pub until: Option<String>,
    /// Only this category.
    pub category: Option<String>,
    /// Include pending and failed ones.
    pub all_states: bool,
}

/// What a finished disk snapshot records.
#[derive(Debug, Clone)]
pub struct Completed<'a> {
    /// Disk size.
    pub size: u64,
    /// Content digest.
    pub checksum: &'a str,
    /// Block map name in the store.
    pub index_name: &'a str,
    /// Bytes QEMU marked dirty (incremental) or allocated (full).
    pub bytes_marked: u64,
    /// Bytes read over NBD.
    pub bytes_read: u64,
    /// Bytes newly stored.
    pub bytes_new: u64,
}

const SNAPSHOT_COLUMNS: &str = "id, env, resource, state, kind, taken_at, finished_at, actor, category, note, parent, size, checksum, index_name, checkpoint, bytes_read, bytes_new, bytes_marked, reason, error, config, net";

impl Catalog {
    /// Inserts a snapshot row; returns its id.
    pub async fn insert_snapshot(&self, s: &NewSnapshot<'_>) -> Result<i64, CatalogError> {
        let (state, finished) = match s.kind {
            SnapshotKind::Config | SnapshotKind::Net => (SnapshotState::Complete, Some(now())),
            _ => (SnapshotState::Pending, None),
        };
        let config = s
            .config
            .map(serde_json::to_string)
            .transpose()
            .map_err(|e| CatalogError::Corrupt {
                name: s.env.to_string(),
                reason: e.to_string(),
            })?;
        let id = sqlx::query(
            "INSERT INTO snapshots (env, resource, state, kind, taken_at, finished_at, actor, category, note, parent, reason, config)
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(s.env)
        .bind(s.resource)
        .bind(state.as_str())
        .bind(s.kind.as_str())
        .bind(s.taken_at)
        .bind(finished)
        .bind(s.actor)
        .bind(s.category)
        .bind(s.note)
        .bind(s.parent)
        .bind(s.reason)
        .bind(config)
        .execute(&self.pool)
        .await?
        .last_insert_rowid();
        Ok(id)
    }

    /// Records the checkpoint bitmap a pending disk snapshot adds.
    pub async fn set_snapshot_checkpoint(
        &self,
        id: i64,
        checkpoint: &str,
    ) -> Result<(), CatalogError> {
        sqlx::query("UPDATE snapshots SET checkpoint = ? WHERE id = ?")
            .bind(checkpoint)
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Marks a pending disk snapshot complete (only a pending one).
    pub async fn complete_snapshot(
        &self,
        id: i64,
        c: &Completed<'_>,
    ) -> Result<bool, CatalogError> {
        let done = sqlx::query(
            "UPDATE snapshots SET state = 'complete', finished_at = ?, size = ?, checksum = ?, index_name = ?, bytes_read = ?, bytes_new = ?, bytes_marked = ?
             WHERE id = ? AND state = 'pending'",
        )
        .bind(now())
        .bind(to_i64(c.size))
        .bind(c.checksum)
        .bind(c.index_name)
        .bind(to_i64(c.bytes_read))
        .bind(to_i64(c.bytes_new))
        .bind(to_i64(c.bytes_marked))
        .bind(id)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Marks a pending snapshot failed.
    pub async fn fail_snapshot(&self, id: i64, error: &str) -> Result<(), CatalogError> {
        sqlx::query(
            "UPDATE snapshots SET state = 'failed', finished_at = ?, error = ? WHERE id = ? AND state = 'pending'",
        )
        .bind(now())
        .bind(error)
        .bind(id)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Marks every pending snapshot failed (weftd stopped while taking them); returns them.
    pub async fn fail_pending_snapshots(&self, error: &str) -> Result<Vec<Snapshot>, CatalogError> {
        let pending = self.snapshots_where("state = 'pending'", &[]).await?;
        for s in &pending {
            self.fail_snapshot(s.id, error).await?;
        }
        Ok(pending)
    }

    /// One snapshot.
    pub async fn snapshot(&self, id: i64) -> Result<Option<Snapshot>, CatalogError> {
        Ok(self
            .snapshots_where("id = ?", &[id.to_string()])
            .await?
            .into_iter()
            .next())
    }

    /// The newest complete snapshot of a resource.
    pub async fn latest_snapshot(
        &self,
        env: &str,
        resource: &str,
    ) -> Result<Option<Snapshot>, CatalogError> {
        Ok(self
            .snapshots_where(
                "env = ? AND resource = ? AND state = 'complete' ORDER BY id DESC LIMIT 1",
                &[env.to_string(), resource.to_string()],
            )
            .await?
            .into_iter()
            .next())
    }

    /// Snapshots of an environment, oldest first.
    pub async fn snapshots(
        &self,
        env: &str,
        f: &SnapshotFilter,
    ) -> Result<Vec<Snapshot>, CatalogError> {
        let mut clause = String::from("env = ?");
        let mut args = vec![env.to_string()];
        if !f.all_states {
            clause.push_str(" AND state = 'complete'");
        }
        for (column, op, value) in [
            ("resource", "=", &f.resource),
            ("taken_at", ">=", &f.since),
            ("taken_at", "<=", &f.until),
            ("category", "=", &f.category),
        ] {
            if let Some(v) = value {
                clause.push_str(&format!(" AND {column} {op} ?"));
                args.push(v.clone());
            }
        }
        clause.push_str(" ORDER BY id");
        self.snapshots_where(&clause, &args).await
    }

    /// Whether another snapshot builds on `id`.
    pub async fn has_children(&self, id: i64) -> Result<bool, CatalogError> {
        let row = sqlx::query(
            "SELECT COUNT(*) AS n FROM snapshots WHERE parent = ? AND state != 'failed'",
        )
        .bind(id)
        .fetch_one(&self.pool)
        .await?;
        Ok(row.try_get::<i64, _>("n")? > 0)
    }

    /// Removes a snapshot row; children keep pointing at nothing.
    pub async fn delete_snapshot(&self, id: i64) -> Result<bool, CatalogError> {
        let mut tx = self.pool.begin().await?;
        sqlx::query("UPDATE snapshots SET parent = NULL WHERE parent = ?")
            .bind(id)
            .execute(&mut *tx)
            .await?;
        let done = sqlx::query("DELETE FROM snapshots WHERE id = ?")
            .bind(id)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(done.rows_affected() == 1)
    }

    /// Block map names of every complete or pending snapshot (for the store's GC view).
    pub async fn live_index_names(&self) -> Result<Vec<String>, CatalogError> {
        let rows = sqlx::query(
            "SELECT index_name FROM snapshots WHERE index_name IS NOT NULL AND state = 'complete'",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| r.try_get::<String, _>("index_name").map_err(Into::into))
            .collect()
    }

    async fn snapshots_where(
        &self,
        clause: &str,
        args: &[String],
    ) -> Result<Vec<Snapshot>, CatalogError> {
        let sql = format!("SELECT {SNAPSHOT_COLUMNS} FROM snapshots WHERE {clause}");
        let mut q = sqlx::query(&sql);
        for a in args {
            q = q.bind(a);
        }
        let rows = q.fetch_all(&self.pool).await?;
        rows.iter().map(snapshot_from_row).collect()
    }

    /// Starts a job row; returns its id.
    pub async fn insert_job(
        &self,
        kind: &str,
        target: &str,
        actor: &str,
    ) -> Result<i64, CatalogError> {
        Ok(sqlx::query(
            "INSERT INTO jobs (kind, target, actor, state, started_at) VALUES (?, ?, ?, 'running', ?)",
        )
        .bind(kind)
        .bind(target)
        .bind(actor)
        .bind(now())
        .execute(&self.pool)
        .await?
        .last_insert_rowid())
    }

    /// Ends a job.
    pub async fn finish_job(
        &self,
        id: i64,
        outcome: Result<&serde_json::Value, &str>,
        done: u64,
        total: u64,
    ) -> Result<(), CatalogError> {
        let (state, result, error) = match outcome {
            Ok(v) => (JobState::Succeeded, Some(v.to_string()), None),
            Err(e) => (JobState::Failed, None, Some(e.to_string())),
        };
        sqlx::query(
            "UPDATE jobs SET state = ?, finished_at = ?, result = ?, error = ?, done_bytes = ?, total_bytes = ? WHERE id = ?",
        )
        .bind(state.as_str())
        .bind(now())
        .bind(result)
        .bind(error)
        .bind(to_i64(done))
        .bind(to_i64(total))
        .bind(id)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Marks jobs still running failed (weftd stopped during them); returns how many.
    pub async fn fail_running_jobs(&self, error: &str) -> Result<u64, CatalogError> {
        let done = sqlx::query(
            "UPDATE jobs SET state = 'failed', finished_at = ?, error = ? WHERE state = 'running'",
        )
        .bind(now())
        .bind(error)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected())
    }

    /// One job.
    pub async fn job(&self, id: i64) -> Result<Option<Job>, CatalogError> {
        let row = sqlx::query("SELECT * FROM jobs WHERE id = ?")
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        row.map(|r| job_from_row(&r)).transpose()
    }

    /// The newest jobs, newest first.
    pub async fn jobs(&self, limit: u32) -> Result<Vec<Job>, CatalogError> {
        let rows = sqlx::query("SELECT * FROM jobs ORDER BY id DESC LIMIT ?")
            .bind(i64::from(limit))
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(job_from_row).collect()
    }
}

fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn to_u64(v: Option<i64>) -> Option<u64> {
    v.and_then(|v| u64::try_from(v).ok())
}

fn snapshot_from_row(r: &sqlx::sqlite::SqliteRow) -> Result<Snapshot, CatalogError> {
    let id: i64 = r.try_get("id")?;
    let corrupt = |reason: String| CatalogError::Corrupt {
        name: format!("snapshot {id}"),
        reason,
    };
    let state: String = r.try_get("state")?;
    let kind: String = r.try_get("kind")?;
    Ok(Snapshot {
        id,
        env: r.try_get("env")?,
        resource: r.try_get("resource")?,
        state: SnapshotState::parse(&state).ok_or_else(|| corrupt(format!("state {state:?}")))?,
        kind: SnapshotKind::parse(&kind).ok_or_else(|| corrupt(format!("kind {kind:?}")))?,
        taken_at: r.try_get("taken_at")?,
        finished_at: r.try_get("finished_at")?,
        actor: r.try_get("actor")?,
        category: r.try_get("category")?,
        note: r.try_get("note")?,
        parent: r.try_get("parent")?,
        size: to_u64(r.try_get("size")?),
        checksum: r.try_get("checksum")?,
        index_name: r.try_get("index_name")?,
        checkpoint: r.try_get("checkpoint")?,
        bytes_read: to_u64(r.try_get("bytes_read")?),
        bytes_new: to_u64(r.try_get("bytes_new")?),
        bytes_marked: to_u64(r.try_get("bytes_marked")?),
        reason: r.try_get("reason")?,
        error: r.try_get("error")?,
        config: r
            .try_get::<Option<String>, _>("config")?
            .map(|c| serde_json::from_str(&c))
            .transpose()
            .map_err(|e| corrupt(format!("config: {e}")))?,
        net: r
            .try_get::<Option<String>, _>("net")?
            .map(|n| serde_json::from_str(&n))
            .transpose()
            .map_err(|e| corrupt(format!("net: {e}")))?,
    })
}

fn job_from_row(r: &sqlx::sqlite::SqliteRow) -> Result<Job, CatalogError> {
    let id: i64 = r.try_get("id")?;
    let state: String = r.try_get("state")?;
    Ok(Job {
        id,
        kind: r.try_get("kind")?,
        target: r.try_get("target")?,
        actor: r.try_get("actor")?,
        state: JobState::parse(&state).ok_or_else(|| CatalogError::Corrupt {
            name: format!("job {id}"),
            reason: format!("state {state:?}"),
        })?,
        started_at: r.try_get("started_at")?,
        finished_at: r.try_get("finished_at")?,
        done_bytes: to_u64(r.try_get("done_bytes")?).unwrap_or(0),
        total_bytes: to_u64(r.try_get("total_bytes")?).unwrap_or(0),
        result: r
            .try_get::<Option<String>, _>("result")?
            .and_then(|s| serde_json::from_str(&s).ok()),
        error: r.try_get("error")?,
    })
}
