//! A replay written out (`replay --out`) whatever the size of the state: SQLite rows and
//! key-value keys are kept in a scratch database on disk as the log streams in, not in
//! memory, and read back page by page when the output is written.
//!
//! [`Spilled`] applies entries like [`State::apply`] does, with the same outcome (the
//! tests compare both outputs), but holds in memory only what is small per source: the
//! table definitions (at most 64 KiB each), the JSON documents (a document is replaced
//! or patched by pointer, so it is rebuilt whole; its size is the guest file's) and the
//! names of the key-value sources. Rows and keys go into the scratch database, one
//! SQLite table each, keyed like the in-memory maps; values are bound parameters and
//! no guest text is ever SQL there. The scratch file lives in weftd's private work
//! directory (`<data_dir>/work`, on the data file system, never a tmpfs; a weftd that
//! dies leaves it there and the next one empties the directory), is opened without a
//! journal and deleted when the replay ends; its page cache is [`SCRATCH_CACHE_KIB`].
//!
//! Memory for a replay with `--out` is then the log's decoded block, the scratch
//! database's and the output database's page caches and one page of rows, not the
//! state. `--into` still rebuilds the state in memory: it compares it with the weave's.

use std::ops::ControlFlow;
use std::path::{Path, PathBuf};

use rusqlite::{params, Connection};
use serde_json::Value;
use weft_dpa::{DataType, Entry, Operation};

use crate::error::ReplayError;
use crate::log::{ProvenanceLog, Query, Record};
use crate::state::{canonical_key, parse_value, Pages, RowPage, State, Summary, PAGE};

/// Page cache of the scratch database, in KiB.
pub const SCRATCH_CACHE_KIB: i64 = 8 * 1024;

/// Scratch statements per transaction.
const STATEMENTS_PER_TRANSACTION: usize = 16 * 1024;

/// A replay's state with its rows and keys on disk (see the module documentation).
pub struct Spilled {
    /// Definitions, JSON documents and source names; no rows, no keys.
    mem: State,
    conn: Connection,
    /// Only rows and keys marked at least this are written (1 in a `--from` window).
    min_mark: i64,
    in_tx: usize,
    scratch: PathBuf,
    _file: tempfile::TempPath,
}

impl Spilled {
    /// A replay whose scratch database is a new hidden file in `dir` (created if
    /// missing).
    pub fn create(dir: &Path) -> Result<Spilled, ReplayError> {
        std::fs::create_dir_all(dir).map_err(|source| ReplayError::Io {
            what: format!("create {}", dir.display()),
            source,
        })?;
        let file = tempfile::Builder::new()
            .prefix(".weft-replay-scratch-")
            .tempfile_in(dir)
            .map_err(|source| ReplayError::Io {
                what: format!("create a scratch file in {}", dir.display()),
                source,
            })?
            .into_temp_path();
        let scratch = file.to_path_buf();
        let fail = |source| ReplayError::Scratch {
            path: scratch.display().to_string(),
            source,
        };
        let conn = Connection::open(&file).map_err(fail)?;
        conn.execute_batch(&format!(
            "PRAGMA journal_mode = OFF;
             PRAGMA synchronous = OFF;
             PRAGMA temp_store = FILE;
             PRAGMA cache_size = -{SCRATCH_CACHE_KIB};
             CREATE TABLE rows (db TEXT NOT NULL, tbl TEXT NOT NULL, key TEXT NOT NULL,
                                row TEXT NOT NULL, mark INTEGER NOT NULL DEFAULT 0,
                                PRIMARY KEY (db, tbl, key));
             CREATE TABLE kv (store TEXT NOT NULL, key TEXT NOT NULL, value TEXT NOT NULL,
                              mark INTEGER NOT NULL DEFAULT 0, PRIMARY KEY (store, key));
             BEGIN;"
        ))
        .map_err(fail)?;
        Ok(Spilled {
            mem: State::default(),
            conn,
            min_mark: 0,
            in_tx: 0,
            scratch,
            _file: file,
        })
    }

    fn fail(&self, source: rusqlite::Error) -> ReplayError {
        ReplayError::Scratch {
            path: self.scratch.display().to_string(),
            source,
        }
    }

    /// Takes `base` as the state the log applies on (`replay --base`: a base read off
    /// a disk is bounded by `[replay] base_max_*`).
    pub fn load(&mut self, base: State) -> Result<(), ReplayError> {
        for (source, db) in base.sqlite {
            let mem = self.mem.sqlite.entry(source.clone()).or_default();
            mem.schemas.extend(db.schemas);
            for table in db.rows.keys() {
                mem.rows.entry(table.clone()).or_default();
            }
            for (table, rows) in db.rows {
                for (key, row) in rows {
                    self.put_row(&source, &table, &key, &Value::Object(row).to_string())?;
                }
            }
        }
        for (source, kv) in base.kv {
            self.mem.kv.entry(source.clone()).or_default();
            for (key, value) in kv {
                self.put_kv(&source, &key, &value)?;
            }
        }
        self.mem.json.extend(base.json);
        Ok(())
    }

    /// Applies one record, counting it in `summary` as applied or skipped (like
    /// [`State::apply_counted`]); only a failure of the scratch database is an error.
    pub fn apply_counted(&mut self, r: &Record, summary: &mut Summary) -> Result<(), ReplayError> {
        let outcome = self.apply(&r.entry)?;
        summary.count(r, outcome);
        Ok(())
    }

    /// Applies one entry: the outer error is the scratch database's, the inner one
    /// says why the entry does not apply (as [`State::apply`]).
    fn apply(&mut self, e: &Entry) -> Result<Result<(), String>, ReplayError> {
        let skip = |why: String| Ok(Err(why));
        match (e.data_type, e.op) {
            (DataType::Json, _) | (DataType::Sqlite, Operation::Schema) => Ok(self.mem.apply(e)),
            (DataType::Sqlite, Operation::Insert | Operation::Update) => {
                self.mem.sqlite.entry(e.source.clone()).or_default();
                let row = match parse_value(&e.new) {
                    Ok(Value::Object(row)) => row,
                    Ok(_) => return skip("a row is a JSON object".into()),
                    Err(why) => return skip(why),
                };
                let key = match canonical_key(&e.key) {
                    Ok(key) => key,
                    Err(why) => return skip(why),
                };
                self.put_row(
                    &e.source,
                    &e.collection,
                    &key,
                    &Value::Object(row).to_string(),
                )?;
                Ok(Ok(()))
            }
            (DataType::Sqlite, Operation::Delete) => {
                self.mem.sqlite.entry(e.source.clone()).or_default();
                let key = match canonical_key(&e.key) {
                    Ok(key) => key,
                    Err(why) => return skip(why),
                };
                self.run(
                    "DELETE FROM rows WHERE db = ?1 AND tbl = ?2 AND key = ?3",
                    params![e.source, e.collection, key],
                )?;
                Ok(Ok(()))
            }
            (DataType::Kv, op) => {
                self.mem.kv.entry(e.source.clone()).or_default();
                match op {
                    Operation::Insert | Operation::Update => {
                        let value = match parse_value(&e.new) {
                            Ok(Value::String(v)) => v,
                            Ok(_) => return skip("a key-value value is a JSON string".into()),
                            Err(why) => return skip(why),
                        };
                        self.put_kv(&e.source, &e.key, &value)?;
                    }
                    Operation::Delete => self.run(
                        "DELETE FROM kv WHERE store = ?1 AND key = ?2",
                        params![e.source, e.key],
                    )?,
                    Operation::Schema => {
                        return skip("key-value sources have no schema".into());
                    }
                }
                Ok(Ok(()))
            }
        }
    }

    fn put_row(&mut self, db: &str, table: &str, key: &str, row: &str) -> Result<(), ReplayError> {
        self.run(
            "INSERT INTO rows (db, tbl, key, row) VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT (db, tbl, key) DO UPDATE SET row = excluded.row",
            params![db, table, key, row],
        )
    }

    fn put_kv(&mut self, store: &str, key: &str, value: &str) -> Result<(), ReplayError> {
        self.run(
            "INSERT INTO kv (store, key, value) VALUES (?1, ?2, ?3)
             ON CONFLICT (store, key) DO UPDATE SET value = excluded.value",
            params![store, key, value],
        )
    }

    /// Runs one statement in the current scratch transaction, committing every
    /// [`STATEMENTS_PER_TRANSACTION`].
    fn run(&mut self, sql: &str, args: impl rusqlite::Params) -> Result<(), ReplayError> {
        let done = self
            .conn
            .prepare_cached(sql)
            .and_then(|mut st| st.execute(args));
        done.map_err(|e| self.fail(e))?;
        self.in_tx += 1;
        if self.in_tx >= STATEMENTS_PER_TRANSACTION {
            self.conn
                .execute_batch("COMMIT; BEGIN")
                .map_err(|e| self.fail(e))?;
            self.in_tx = 0;
        }
        Ok(())
    }

    /// Rebuilds `vm`'s state as of `to_us` from its log, like [`crate::state::rebuild`]
    /// (with `from_us`, only the items changed in `[from_us, to_us]` are written).
    pub fn rebuild(
        &mut self,
        log: &ProvenanceLog,
        vm: &str,
        from_us: Option<i64>,
        to_us: i64,
    ) -> Result<Summary, ReplayError> {
        let query = Query {
            to_us: Some(to_us),
            ..Default::default()
        };
        let (summary, seen) = self.apply_log(log, vm, &query, u64::MAX)?;
        if let Some(from) = from_us {
            self.keep_window(log, vm, from, to_us, seen)?;
        }
        Ok(summary)
    }

    /// Applies the records of `vm`'s log that `query` selects, up to seq `up_to`;
    /// returns what was applied and the last seq seen.
    pub fn apply_log(
        &mut self,
        log: &ProvenanceLog,
        vm: &str,
        query: &Query,
        up_to: u64,
    ) -> Result<(Summary, u64), ReplayError> {
        let mut summary = Summary::default();
        let (mut seen, mut failed) = (0, None);
        log.scan(vm, query, |r| {
            if r.entry.seq > up_to {
                return ControlFlow::Break(());
            }
            seen = r.entry.seq;
            match self.apply_counted(&r, &mut summary) {
                Ok(()) => ControlFlow::Continue(()),
                Err(e) => {
                    failed = Some(e);
                    ControlFlow::Break(())
                }
            }
        })?;
        match failed {
            Some(e) => Err(e),
            None => Ok((summary, seen)),
        }
    }

    /// Keeps only the items changed in `[from_us, to_us]` (up to seq `seen`), as they
    /// stand: the same items [`crate::state::rebuild`] keeps for a window.
    fn keep_window(
        &mut self,
        log: &ProvenanceLog,
        vm: &str,
        from_us: i64,
        to_us: i64,
        seen: u64,
    ) -> Result<(), ReplayError> {
        let mut window = State::default();
        let mut failed = None;
        log.scan(
            vm,
            &Query {
                from_us: Some(from_us),
                to_us: Some(to_us),
                ..Default::default()
            },
            |r| {
                if r.entry.seq > seen {
                    return ControlFlow::Break(());
                }
                window.take_item(&self.mem, &r.entry);
                match self.mark(&r.entry) {
                    Ok(()) => ControlFlow::Continue(()),
                    Err(e) => {
                        failed = Some(e);
                        ControlFlow::Break(())
                    }
                }
            },
        )?;
        if let Some(e) = failed {
            return Err(e);
        }
        self.mem = window;
        self.min_mark = 1;
        Ok(())
    }

    /// Marks the row or key `e` changed as in the window.
    fn mark(&mut self, e: &Entry) -> Result<(), ReplayError> {
        match e.data_type {
            DataType::Sqlite => {
                if let Ok(key) = canonical_key(&e.key) {
                    self.run(
                        "UPDATE rows SET mark = 1 WHERE db = ?1 AND tbl = ?2 AND key = ?3",
                        params![e.source, e.collection, key],
                    )?;
                }
            }
            DataType::Kv => self.run(
                "UPDATE kv SET mark = 1 WHERE store = ?1 AND key = ?2",
                params![e.source, e.key],
            )?,
            DataType::Json => {}
        }
        Ok(())
    }

    /// Ends the scratch transaction: what was applied is then read back page by page
    /// ([`Pages`]) to be written out.
    pub fn finish(&mut self) -> Result<(), ReplayError> {
        if self.in_tx > 0 || !self.conn.is_autocommit() {
            self.conn
                .execute_batch("COMMIT")
                .map_err(|e| self.fail(e))?;
            self.in_tx = 0;
        }
        Ok(())
    }
}

impl Pages for Spilled {
    fn shape(&self) -> &State {
        &self.mem
    }

    fn row_page(&self, db: &str, table: &str, after: Option<&str>) -> Result<RowPage, ReplayError> {
        // Two statements, not `?4 IS NULL OR key > ?4`: the key's range must reach the
        // index, or every page would scan the table from its first row.
        let sql = match after {
            Some(_) => {
                "SELECT key, row FROM rows WHERE db = ?1 AND tbl = ?2 AND mark >= ?3
                 AND key > ?4 ORDER BY key LIMIT ?5"
            }
            None => {
                "SELECT key, row FROM rows WHERE db = ?1 AND tbl = ?2 AND mark >= ?3
                 AND ?4 IS NULL ORDER BY key LIMIT ?5"
            }
        };
        let mut st = self.conn.prepare_cached(sql).map_err(|e| self.fail(e))?;
        let rows = st
            .query_map(params![db, table, self.min_mark, after, PAGE as i64], |r| {
                Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?))
            })
            .and_then(|rows| rows.collect::<Result<Vec<_>, _>>())
            .map_err(|e| self.fail(e))?;
        // The scratch rows were JSON objects when they went in.
        Ok(rows
            .into_iter()
            .filter_map(|(key, text)| match serde_json::from_str(&text) {
                Ok(Value::Object(row)) => Some((key, row)),
                _ => None,
            })
            .collect())
    }

    fn kv_page(
        &self,
        store: &str,
        after: Option<&str>,
    ) -> Result<Vec<(String, String)>, ReplayError> {
        let sql = match after {
            Some(_) => {
                "SELECT key, value FROM kv WHERE store = ?1 AND mark >= ?2 AND key > ?3
                 ORDER BY key LIMIT ?4"
            }
            None => {
                "SELECT key, value FROM kv WHERE store = ?1 AND mark >= ?2 AND ?3 IS NULL
                 ORDER BY key LIMIT ?4"
            }
        };
        let mut st = self.conn.prepare_cached(sql).map_err(|e| self.fail(e))?;
        st.query_map(params![store, self.min_mark, after, PAGE as i64], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })
        .and_then(|rows| rows.collect::<Result<Vec<_>, _>>())
        .map_err(|e| self.fail(e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::{apply_sqlite_base, entry, log_of_every_kind, T0};

    /// What a state holds, read back through [`Pages`] as a writer reads it: the
    /// shape, the rows of each defined table and the keys of each key-value source.
    fn read_back(p: &impl Pages) -> State {
        let mut out = p.shape().clone();
        for (db, s) in &mut out.sqlite {
            s.rows.clear();
            for table in s.schemas.keys() {
                let rows = s.rows.entry(table.clone()).or_default();
                let mut after: Option<String> = None;
                loop {
                    let page = p.row_page(db, table, after.as_deref()).unwrap();
                    assert!(page.len() <= PAGE);
                    let Some((last, _)) = page.last() else { break };
                    after = Some(last.clone());
                    rows.extend(page);
                }
            }
        }
        for (store, keys) in &mut out.kv {
            keys.clear();
            let mut after: Option<String> = None;
            loop {
                let page = p.kv_page(store, after.as_deref()).unwrap();
                let Some((last, _)) = page.last() else { break };
                after = Some(last.clone());
                keys.extend(page);
            }
        }
        out
    }

    #[test]
    fn a_spilled_replay_holds_what_the_in_memory_one_holds() {
        let dir = tempfile::tempdir().unwrap();
        let log = log_of_every_kind(&dir.path().join("log"));
        let window = T0 + 1214 * 1000;
        for from in [None, Some(window)] {
            let (state, mem_summary) = crate::state::rebuild(&log, "vm", from, i64::MAX).unwrap();
            let mut s = Spilled::create(&dir.path().join("scratch")).unwrap();
            let summary = s.rebuild(&log, "vm", from, i64::MAX).unwrap();
            s.finish().unwrap();
            assert_eq!(summary, mem_summary, "window {from:?}");
            assert!(summary.skipped >= 4, "{summary:?}");
            let (a, b) = (read_back(&state), read_back(&s));
            assert_eq!(a, b, "window {from:?}");
            let keys = &b.kv["/etc/app.env"];
            match from {
                None => assert!(keys.len() > 400, "{}", keys.len()),
                Some(_) => assert_eq!(keys.len(), 1, "only what the window changed"),
            }
        }
        let scratch: Vec<_> = std::fs::read_dir(dir.path().join("scratch"))
            .unwrap()
            .collect();
        assert!(
            scratch.is_empty(),
            "the scratch files are gone: {scratch:?}"
        );
    }

    #[test]
    fn a_spilled_replay_applies_the_log_on_a_base() {
        let dir = tempfile::tempdir().unwrap();
        let log = log_of_every_kind(&dir.path().join("log"));
        let mut base = State::default();
        for i in 0..40 {
            let key = format!("B{i}");
            let e = entry(
                1,
                DataType::Kv,
                Operation::Insert,
                "/etc/base.env",
                "",
                &key,
                Some(r#""base""#),
            );
            base.apply(&e).unwrap();
        }
        apply_sqlite_base(&mut base);
        let query = Query {
            from_us: Some(T0 + 900 * 1000),
            ..Default::default()
        };
        let mut state = base.clone();
        let mut mem_summary = Summary::default();
        log.scan("vm", &query, |r| {
            state.apply_counted(&r, &mut mem_summary);
            ControlFlow::Continue(())
        })
        .unwrap();
        let mut s = Spilled::create(&dir.path().join("scratch")).unwrap();
        s.load(base).unwrap();
        let (summary, _) = s.apply_log(&log, "vm", &query, u64::MAX).unwrap();
        s.finish().unwrap();
        assert_eq!(summary, mem_summary);
        let (a, b) = (read_back(&state), read_back(&s));
        assert_eq!(a, b);
        assert!(b.sqlite["/data/app.db"].rows["t"].contains_key("[5000]"));
        assert_eq!(b.kv["/etc/base.env"].len(), 40);
    }
}
