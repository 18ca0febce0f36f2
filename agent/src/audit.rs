//! The audit log: who asked weftd for what, when, with what result; hash-chained (F15).
//!
//! Every audit row gets a row in `audit_chain` written in the same transaction:
//! `hash = SHA-256("weft-audit-v1\0" ‖ prev_hash ‖ id ‖ fields)`, where `prev_hash` is
//! the previous entry's hash (32 zero bytes for the first) and each field is encoded as
//! a presence byte, a u64 length and the bytes (format in `docs/audit.md`). After every
//! append the chain's head (last id and hash) is written to a file beside the database,
//! so that removing entries at the end is noticed too. [`Catalog::verify_audit`]
//! recomputes the chain: an edited row no longer matches its hash, a deleted one breaks
//! the link or the head.

use std::path::Path;

use ring::digest::{Context, SHA256};
use serde::{Deserialize, Serialize};
use sqlx::Row;

use crate::catalog::{now, Catalog, CatalogError};
use crate::model::AuditEntry;
pub use weft_api::audit::AuditVerify;

const DOMAIN: &[u8] = b"weft-audit-v1\0";
const ZERO: [u8; 32] = [0; 32];

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Head {
    id: i64,
    hash: String,
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// The hash of entry `e` after `prev`.
pub fn entry_hash(prev: &[u8; 32], e: &AuditEntry) -> [u8; 32] {
    let mut ctx = Context::new(&SHA256);
    ctx.update(DOMAIN);
    ctx.update(prev);
    ctx.update(&e.id.to_le_bytes());
    let fields: [Option<&str>; 6] = [
        Some(&e.at),
        Some(&e.actor),
        Some(&e.action),
        e.target.as_deref(),
        e.detail.as_deref(),
        Some(&e.result),
    ];
    for f in fields {
        match f {
            None => ctx.update(&[0]),
            Some(s) => {
                ctx.update(&[1]);
                ctx.update(&(s.len() as u64).to_le_bytes());
                ctx.update(s.as_bytes());
            }
        }
    }
    let mut out = [0u8; 32];
    out.copy_from_slice(ctx.finish().as_ref());
    out
}

fn entry_from_row(r: &sqlx::sqlite::SqliteRow) -> Result<AuditEntry, sqlx::Error> {
    Ok(AuditEntry {
        id: r.try_get("id")?,
        at: r.try_get("at")?,
        actor: r.try_get("actor")?,
        action: r.try_get("action")?,
        target: r.try_get("target")?,
        detail: r.try_get("detail")?,
        result: r.try_get("result")?,
        hash: r
            .try_get::<Option<Vec<u8>>, _>("hash")
            .ok()
            .flatten()
            .map(|h| hex(&h)),
    })
}

fn read_head(path: &Path) -> Result<Option<Head>, String> {
    match std::fs::read(path) {
        Ok(b) => serde_json::from_slice(&b)
            .map(Some)
            .map_err(|e| format!("{}: {e}", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(format!("{}: {e}", path.display())),
    }
}

fn write_head(path: &Path, head: &Head) -> std::io::Result<()> {
    use std::io::Write;
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = std::path::PathBuf::from(tmp);
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(&serde_json::to_vec(head).unwrap_or_default())?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

impl Catalog {
    /// Appends an audit record, chained to the one before.
    pub async fn audit(
        &self,
        actor: &str,
        action: &str,
        target: Option<&str>,
        detail: Option<&str>,
        result: &str,
    ) -> Result<(), CatalogError> {
        let _one = self.audit_lock.lock().await;
        // IMMEDIATE: take the write lock before reading the chain's last hash (a
        // deferred transaction would fail, not wait, when it later needs to write).
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        let prev: Option<Vec<u8>> =
            sqlx::query_scalar("SELECT hash FROM audit_chain ORDER BY id DESC LIMIT 1")
                .fetch_optional(&mut *tx)
                .await?;
        let prev: [u8; 32] = prev.and_then(|p| p.try_into().ok()).unwrap_or(ZERO);
        let at = now();
        let id: i64 = sqlx::query_scalar(
            "INSERT INTO audit (at, actor, action, target, detail, result) VALUES (?, ?, ?, ?, ?, ?) RETURNING id",
        )
        .bind(&at)
        .bind(actor)
        .bind(action)
        .bind(target)
        .bind(detail)
        .bind(result)
        .fetch_one(&mut *tx)
        .await?;
        let entry = AuditEntry {
            id,
            at,
            actor: actor.into(),
            action: action.into(),
            target: target.map(Into::into),
            detail: detail.map(Into::into),
            result: result.into(),
            hash: None,
        };
        let hash = entry_hash(&prev, &entry);
        sqlx::query("INSERT INTO audit_chain (id, prev_hash, hash) VALUES (?, ?, ?)")
            .bind(id)
            .bind(&prev[..])
            .bind(&hash[..])
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        self.record_head(id, &hash);
        Ok(())
    }

    fn record_head(&self, id: i64, hash: &[u8; 32]) {
        if let Some(path) = &self.audit_head {
            let head = Head {
                id,
                hash: hex(hash),
            };
            if let Err(e) = write_head(path, &head) {
                tracing::error!(error = %e, path = %path.display(), "cannot record the audit log's head");
            }
        }
    }

    /// Chains audit rows written before the log was chained (once, at open). Rows
    /// are sealed only past the last chained one, and only while the recorded head
    /// (if any) is that last chained row: a chain cut short is left for
    /// [`Catalog::verify_audit`] to report, never re-sealed.
    pub(crate) async fn seal_audit(&self) -> Result<(), CatalogError> {
        let _one = self.audit_lock.lock().await;
        let last: Option<(i64, Vec<u8>)> =
            sqlx::query_as("SELECT id, hash FROM audit_chain ORDER BY id DESC LIMIT 1")
                .fetch_optional(&self.pool)
                .await?;
        let head = self
            .audit_head
            .as_deref()
            .and_then(|p| read_head(p).ok().flatten());
        let (from, mut prev) = match &last {
            Some((id, h)) => (*id, h.clone().try_into().unwrap_or(ZERO)),
            None => (0, ZERO),
        };
        if let Some(head) = &head {
            if head.id != from {
                return Ok(());
            }
        }
        let rows = sqlx::query(
            "SELECT id, at, actor, action, target, detail, result, NULL AS hash FROM audit WHERE id > ? ORDER BY id",
        )
        .bind(from)
        .fetch_all(&self.pool)
        .await?;
        if rows.is_empty() {
            return Ok(());
        }
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        let mut last_id = from;
        for r in &rows {
            let e = entry_from_row(r)?;
            let hash = entry_hash(&prev, &e);
            sqlx::query("INSERT INTO audit_chain (id, prev_hash, hash) VALUES (?, ?, ?)")
                .bind(e.id)
                .bind(&prev[..])
                .bind(&hash[..])
                .execute(&mut *tx)
                .await?;
            prev = hash;
            last_id = e.id;
        }
        tx.commit().await?;
        tracing::info!(
            entries = rows.len(),
            "audit log: chained the entries written before it was chained"
        );
        self.record_head(last_id, &prev);
        Ok(())
    }

    /// The newest `limit` audit records, oldest first, with their hashes.
    pub async fn audit_log(&self, limit: u32) -> Result<Vec<AuditEntry>, CatalogError> {
        let rows = sqlx::query(
            "SELECT a.id, a.at, a.actor, a.action, a.target, a.detail, a.result, c.hash FROM
               (SELECT * FROM audit ORDER BY id DESC LIMIT ?) a
               LEFT JOIN audit_chain c ON c.id = a.id ORDER BY a.id",
        )
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.iter().map(entry_from_row).collect::<Result<_, _>>()?)
    }

    /// Recomputes the whole chain and compares it with the recorded head.
    pub async fn verify_audit(&self) -> Result<AuditVerify, CatalogError> {
        let _one = self.audit_lock.lock().await;
        let rows = sqlx::query(
            "SELECT a.id AS id, a.at, a.actor, a.action, a.target, a.detail, a.result,
                    c.hash AS hash, c.prev_hash AS prev_hash, c.id AS chain_id
               FROM audit a LEFT JOIN audit_chain c ON c.id = a.id
             UNION ALL
             SELECT c.id, NULL, NULL, NULL, NULL, NULL, NULL, c.hash, c.prev_hash, c.id
               FROM audit_chain c WHERE c.id NOT IN (SELECT id FROM audit)
             ORDER BY 1",
        )
        .fetch_all(&self.pool)
        .await?;
        let mut problems = Vec::new();
        let mut prev = ZERO;
        let mut last: Option<(i64, [u8; 32])> = None;
        for r in &rows {
            let id: i64 = r.try_get("id")?;
            let at: Option<String> = r.try_get("at")?;
            let stored: Option<Vec<u8>> = r.try_get("hash")?;
            let stored_prev: Option<Vec<u8>> = r.try_get("prev_hash")?;
            let (Some(_), Some(stored), Some(stored_prev)) = (at, stored, stored_prev) else {
                problems.push(if r.try_get::<Option<String>, _>("at")?.is_none() {
                    format!("entry {id} was deleted (its hash is still chained)")
                } else {
                    format!("entry {id} has no hash: it was not written by weftd")
                });
                continue;
            };
            if let Some((before, _)) = last {
                if id != before + 1 {
                    problems.push(format!(
                        "entries {} to {} are missing (ids are never reused)",
                        before + 1,
                        id - 1
                    ));
                }
            }
            if stored_prev.as_slice() != prev.as_slice() {
                problems.push(format!(
                    "entry {id} does not follow the entry before it: an entry before it was deleted or changed"
                ));
            }
            let mut e = entry_from_row(r)?;
            e.hash = None;
            let want = entry_hash(&stored_prev.clone().try_into().unwrap_or(ZERO), &e);
            if want.as_slice() != stored.as_slice() {
                problems.push(format!("entry {id} was changed after it was written"));
            }
            prev = stored.clone().try_into().unwrap_or(ZERO);
            last = Some((id, prev));
        }
        let head = match self.audit_head.as_deref().map(read_head) {
            Some(Ok(h)) => h,
            Some(Err(e)) => {
                problems.push(format!("the recorded head cannot be read: {e}"));
                None
            }
            None => None,
        };
        if let Some(h) = &head {
            match rows.iter().position(|r| r.try_get::<i64, _>("id").ok() == Some(h.id)) {
                None => problems.push(format!(
                    "the recorded head is entry {}, which is not in the log: entries at the end were deleted",
                    h.id
                )),
                Some(_) => {
                    let at_head: Option<Vec<u8>> = rows
                        .iter()
                        .find(|r| r.try_get::<i64, _>("id").ok() == Some(h.id))
                        .and_then(|r| r.try_get("hash").ok().flatten());
                    if at_head.as_deref().map(hex).as_deref() != Some(h.hash.as_str()) {
                        problems.push(format!(
                            "entry {} does not have the hash the recorded head has",
                            h.id
                        ));
                    }
                }
            }
        } else if self.audit_head.is_some() && last.is_some() {
            problems.push("the recorded head is missing".into());
        }
        Ok(AuditVerify {
            ok: problems.is_empty(),
            entries: rows.len() as u64,
            last: last.map(|(id, h)| (id, hex(&h))),
            head: head.map(|h| (h.id, h.hash)),
            problems,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Edits the database as someone with write access to its file would.
    async fn tamper(c: &Catalog, sql: &str) {
        let mut conn = c.pool.acquire().await.unwrap();
        for t in [
            "DROP TRIGGER IF EXISTS audit_is_append_only_update",
            "DROP TRIGGER IF EXISTS audit_is_append_only_delete",
            "DROP TRIGGER IF EXISTS audit_chain_is_append_only_update",
            "DROP TRIGGER IF EXISTS audit_chain_is_append_only_delete",
            "PRAGMA foreign_keys = OFF",
        ] {
            sqlx::query(t).execute(&mut *conn).await.unwrap();
        }
        sqlx::query(sql).execute(&mut *conn).await.unwrap();
        sqlx::query("PRAGMA foreign_keys = ON")
            .execute(&mut *conn)
            .await
            .unwrap();
    }

    async fn filled() -> (tempfile::TempDir, Catalog) {
        let dir = tempfile::tempdir().unwrap();
        let c = Catalog::open(&dir.path().join("catalog.db")).await.unwrap();
        for i in 0..5 {
            c.audit("root", "env.create", Some(&format!("e{i}")), None, "ok")
                .await
                .unwrap();
        }
        (dir, c)
    }

    #[tokio::test]
    async fn an_untouched_log_verifies_and_survives_reopening() {
        let (dir, c) = filled().await;
        let v = c.verify_audit().await.unwrap();
        assert!(v.ok, "{v:?}");
        assert_eq!(v.entries, 5);
        assert_eq!(v.last, v.head);
        c.close().await;
        let c = Catalog::open(&dir.path().join("catalog.db")).await.unwrap();
        c.audit("root", "env.stop", Some("e1"), Some("{}"), "ok")
            .await
            .unwrap();
        let v = c.verify_audit().await.unwrap();
        assert!(v.ok && v.entries == 6, "{v:?}");
        let log = c.audit_log(2).await.unwrap();
        assert_eq!(log[1].hash, v.last.map(|l| l.1));
    }

    #[tokio::test]
    async fn an_edited_entry_is_found() {
        let (_dir, c) = filled().await;
        tamper(&c, "UPDATE audit SET result = 'error: no' WHERE id = 3").await;
        let v = c.verify_audit().await.unwrap();
        assert!(!v.ok);
        assert_eq!(v.problems, vec!["entry 3 was changed after it was written"]);
    }

    #[tokio::test]
    async fn deleted_entries_are_found_in_the_middle_and_at_the_end() {
        let (_dir, c) = filled().await;
        tamper(&c, "DELETE FROM audit WHERE id = 2").await;
        let v = c.verify_audit().await.unwrap();
        assert!(!v.ok);
        assert!(v.problems[0].contains("entry 2 was deleted"), "{v:?}");
        tamper(&c, "DELETE FROM audit_chain WHERE id = 2").await;
        let v = c.verify_audit().await.unwrap();
        assert!(
            v.problems
                .iter()
                .any(|p| p.contains("entry 3 does not follow")),
            "{v:?}"
        );
        assert!(
            v.problems
                .iter()
                .any(|p| p.contains("entries 2 to 2 are missing")),
            "{v:?}"
        );
        // An entry appended after a deletion links cleanly, but the gap stays.
        c.audit("root", "later", None, None, "ok").await.unwrap();
        assert!(!c.verify_audit().await.unwrap().ok);

        let (_dir, c) = filled().await;
        tamper(&c, "DELETE FROM audit WHERE id = 5").await;
        tamper(&c, "DELETE FROM audit_chain WHERE id = 5").await;
        let v = c.verify_audit().await.unwrap();
        assert!(!v.ok);
        assert!(
            v.problems[0].contains("entries at the end were deleted"),
            "{v:?}"
        );
    }

    #[tokio::test]
    async fn rows_from_before_the_chain_are_sealed_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("catalog.db");
        let c = Catalog::open(&path).await.unwrap();
        // As an older weftd wrote them: no chain rows, no head file.
        for i in 0..3 {
            sqlx::query("INSERT INTO audit (at, actor, action, target, detail, result) VALUES ('t', 'root', 'a', ?, NULL, 'ok')")
                .bind(format!("old{i}"))
                .execute(&c.pool)
                .await
                .unwrap();
        }
        c.close().await;
        let mut head = path.as_os_str().to_owned();
        head.push(".audit-head");
        let _ = std::fs::remove_file(&head);
        let c = Catalog::open(&path).await.unwrap();
        let v = c.verify_audit().await.unwrap();
        assert!(v.ok && v.entries == 3, "{v:?}");
        c.audit("root", "b", None, None, "ok").await.unwrap();
        assert!(c.verify_audit().await.unwrap().ok);
    }

    #[tokio::test]
    async fn the_audit_log_is_append_only() {
        let c = Catalog::open_in_memory().await.unwrap();
        for i in 0..3 {
            c.audit("root", "env.create", Some(&format!("e{i}")), None, "ok")
                .await
                .unwrap();
        }
        let log = c.audit_log(2).await.unwrap();
        assert_eq!(log.len(), 2);
        assert_eq!(log[0].target.as_deref(), Some("e1"));
        assert_eq!(log[1].target.as_deref(), Some("e2"));
        for sql in [
            "UPDATE audit SET result = 'x'",
            "DELETE FROM audit",
            "UPDATE audit_chain SET hash = zeroblob(32)",
            "DELETE FROM audit_chain",
        ] {
            assert!(sqlx::query(sql).execute(&c.pool).await.is_err(), "{sql}");
        }
        assert_eq!(c.audit_log(10).await.unwrap().len(), 3);
        assert!(c.verify_audit().await.unwrap().ok);
    }
}
