//! The capture tables and triggers: what a table looks like (columns, key), the three
//! triggers the agent installs on it, whether the installed ones are current, and the
//! install itself (one write transaction, with a baseline of a new table's rows).

use std::collections::BTreeSet;

use rusqlite::{params, Connection, OptionalExtension};

use super::{CAPTURE_TABLE, TX_TABLE};
use crate::capture_format::{json_key, json_row, quote_ident, quote_lit, Key};

const NOW_US: &str = "CAST((julianday('now') - 2440587.5) * 86400000000.0 AS INTEGER)";

#[derive(Debug, Clone)]
pub(super) struct TableInfo {
    name: String,
    sql: String,
    pub(super) cols: Vec<String>,
    pub(super) key: Key,
}

pub(super) fn table_info(
    conn: &Connection,
    name: &str,
    sql: String,
) -> rusqlite::Result<TableInfo> {
    let mut stmt = conn.prepare("SELECT name, pk FROM pragma_table_info(?1) ORDER BY cid")?;
    let rows = stmt.query_map([name], |r| {
        Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?))
    })?;
    let mut cols = Vec::new();
    let mut pk = Vec::new();
    for row in rows {
        let (c, p) = row?;
        if p > 0 {
            pk.push((p, c.clone()));
        }
        cols.push(c);
    }
    pk.sort();
    let key = if pk.is_empty() {
        Key::Rowid
    } else {
        Key::Columns(pk.into_iter().map(|(_, c)| c).collect())
    };
    Ok(TableInfo {
        name: name.to_string(),
        sql,
        cols,
        key,
    })
}

fn trigger_names(table: &str) -> [String; 3] {
    [
        format!("_weft_ins_{table}"),
        format!("_weft_upd_{table}"),
        format!("_weft_del_{table}"),
    ]
}

fn trigger_sqls(t: &TableInfo) -> [String; 3] {
    let [ins, upd, del] = trigger_names(&t.name);
    let tbl = quote_ident(&t.name);
    let lit = quote_lit(&t.name);
    let epoch = format!("(SELECT epoch FROM {TX_TABLE} WHERE id=1)");
    let insert = |op: &str, pk: String, old: &str, new: &str| {
        format!(
            "INSERT INTO {CAPTURE_TABLE}(tbl,op,pk,old,new,epoch,time_us) VALUES ({lit},'{op}',{pk},{old},{new},{epoch},{NOW_US})"
        )
    };
    [
        format!(
            "CREATE TRIGGER {} AFTER INSERT ON {tbl} BEGIN {}; END",
            quote_ident(&ins),
            insert(
                "insert",
                json_key("NEW.", &t.key),
                "NULL",
                &json_row("NEW.", &t.cols)
            )
        ),
        format!(
            "CREATE TRIGGER {} AFTER UPDATE ON {tbl} BEGIN {}; END",
            quote_ident(&upd),
            insert(
                "update",
                json_key("NEW.", &t.key),
                &json_row("OLD.", &t.cols),
                &json_row("NEW.", &t.cols)
            )
        ),
        format!(
            "CREATE TRIGGER {} AFTER DELETE ON {tbl} BEGIN {}; END",
            quote_ident(&del),
            insert(
                "delete",
                json_key("OLD.", &t.key),
                &json_row("OLD.", &t.cols),
                "NULL"
            )
        ),
    ]
}

/// Names of the agent's triggers, on `table` or on every table.
pub(super) fn weft_triggers(
    conn: &Connection,
    table: Option<&str>,
) -> rusqlite::Result<Vec<String>> {
    let mut stmt = conn.prepare(
        "SELECT name FROM sqlite_master WHERE type='trigger' AND name LIKE '\\_weft\\_%' ESCAPE '\\' \
         AND (?1 IS NULL OR tbl_name = ?1)",
    )?;
    let names = stmt
        .query_map([table], |r| r.get::<_, String>(0))?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    Ok(names)
}

/// The user tables to capture: `(name, CREATE TABLE statement)`, by name.
fn capture_targets(
    conn: &Connection,
    wanted: Option<&[String]>,
) -> rusqlite::Result<Vec<(String, String)>> {
    let mut stmt = conn.prepare(
        "SELECT name, sql FROM sqlite_master WHERE type='table' \
         AND name NOT LIKE 'sqlite\\_%' ESCAPE '\\' AND name NOT LIKE '\\_weft\\_%' ESCAPE '\\' \
         AND sql NOT LIKE 'CREATE VIRTUAL%' ORDER BY name",
    )?;
    let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
    let tables: Vec<(String, String)> = rows.collect::<rusqlite::Result<_>>()?;
    Ok(tables
        .into_iter()
        .filter(|(n, _)| wanted.is_none_or(|w| w.iter().any(|t| t == n)))
        .collect())
}

/// The agent's triggers: `(name, table)`.
fn existing_triggers(conn: &Connection) -> rusqlite::Result<Vec<(String, String)>> {
    let mut stmt = conn.prepare(
        "SELECT name, tbl_name FROM sqlite_master WHERE type='trigger' AND name LIKE '\\_weft\\_%' ESCAPE '\\'",
    )?;
    let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
    rows.collect()
}

/// Whether table `name`'s triggers are exactly the ones the agent would install.
fn triggers_current(conn: &Connection, info: &TableInfo) -> rusqlite::Result<bool> {
    let want = trigger_sqls(info);
    for (n, w) in trigger_names(&info.name).iter().zip(&want) {
        let sql: Option<String> = conn
            .query_row(
                "SELECT sql FROM sqlite_master WHERE type='trigger' AND name=?1",
                [n],
                |r| r.get(0),
            )
            .optional()?;
        if sql.as_deref() != Some(w.as_str()) {
            return Ok(false);
        }
    }
    Ok(true)
}

/// What [`install`] would have to do, found by reading only.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Needed {
    /// The database holds no table to capture yet: it is not past its creation.
    NoTables,
    /// Everything is in place.
    Nothing,
    /// A write is needed; `capture_tables`: the capture tables exist already.
    Install { capture_tables: bool },
}

/// Reads (never writes) what [`install`] would change, so the agent takes the write
/// lock only when something is to be done.
pub(super) fn install_needed(
    conn: &Connection,
    wanted: Option<&[String]>,
) -> rusqlite::Result<Needed> {
    let targets = capture_targets(conn, wanted)?;
    if targets.is_empty() {
        return Ok(Needed::NoTables);
    }
    let capture_tables: i64 = conn.query_row(
        "SELECT count(*) FROM sqlite_master WHERE type='table' AND name IN (?1, ?2)",
        [CAPTURE_TABLE, TX_TABLE],
        |r| r.get(0),
    )?;
    let capture_tables = capture_tables == 2;
    let install = Needed::Install { capture_tables };
    if !capture_tables {
        return Ok(install);
    }
    let names: BTreeSet<&str> = targets.iter().map(|(n, _)| n.as_str()).collect();
    if existing_triggers(conn)?
        .iter()
        .any(|(_, t)| !names.contains(t.as_str()))
    {
        return Ok(install);
    }
    for (name, sql) in &targets {
        let info = table_info(conn, name, sql.clone())?;
        if !triggers_current(conn, &info)? {
            return Ok(install);
        }
    }
    Ok(Needed::Nothing)
}

/// Installs or refreshes the capture in one write transaction; returns how many tables
/// got new triggers.
pub(super) fn install(conn: &mut Connection, wanted: Option<&[String]>) -> rusqlite::Result<usize> {
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    tx.execute_batch(&format!(
        "CREATE TABLE IF NOT EXISTS {CAPTURE_TABLE}(id INTEGER PRIMARY KEY AUTOINCREMENT, tbl TEXT NOT NULL, \
           op TEXT NOT NULL, pk TEXT NOT NULL, old TEXT, new TEXT, epoch INTEGER NOT NULL, time_us INTEGER NOT NULL);
         CREATE TABLE IF NOT EXISTS {TX_TABLE}(id INTEGER PRIMARY KEY CHECK (id = 1), epoch INTEGER NOT NULL, instance TEXT NOT NULL);
         INSERT OR IGNORE INTO {TX_TABLE}(id, epoch, instance) VALUES (1, 1, lower(hex(randomblob(8))));"
    ))?;
    let targets = capture_targets(&tx, wanted)?;
    let target_names: BTreeSet<&str> = targets.iter().map(|(n, _)| n.as_str()).collect();
    // Triggers on tables no longer captured go.
    for (name, tbl) in &existing_triggers(&tx)? {
        if !target_names.contains(tbl.as_str()) {
            tx.execute_batch(&format!("DROP TRIGGER IF EXISTS {}", quote_ident(name)))?;
        }
    }
    let bump = format!("UPDATE {TX_TABLE} SET epoch = epoch + 1 WHERE id = 1");
    let mut installed = 0;
    for (name, sql) in targets {
        let info = table_info(&tx, &name, sql)?;
        let want = trigger_sqls(&info);
        let names = trigger_names(&name);
        let mut have = Vec::new();
        for n in &names {
            let sql: Option<String> = tx
                .query_row(
                    "SELECT sql FROM sqlite_master WHERE type='trigger' AND name=?1",
                    [n],
                    |r| r.get(0),
                )
                .optional()?;
            have.push(sql);
        }
        if have
            .iter()
            .zip(&want)
            .all(|(h, w)| h.as_deref() == Some(w.as_str()))
        {
            continue;
        }
        let fresh = have.iter().all(Option::is_none);
        for n in weft_triggers(&tx, Some(&name))? {
            tx.execute_batch(&format!("DROP TRIGGER IF EXISTS {}", quote_ident(&n)))?;
        }
        // The schema and (for a table seen the first time) its current rows form a
        // transaction of their own.
        tx.execute_batch(&bump)?;
        tx.execute(
            &format!(
                "INSERT INTO {CAPTURE_TABLE}(tbl,op,pk,old,new,epoch,time_us) \
                 VALUES (?1,'schema','',NULL,json_quote(?2),(SELECT epoch FROM {TX_TABLE} WHERE id=1),{NOW_US})"
            ),
            params![info.name, info.sql],
        )?;
        if fresh {
            tx.execute_batch(&format!(
                "INSERT INTO {CAPTURE_TABLE}(tbl,op,pk,old,new,epoch,time_us) \
                 SELECT {},'insert',{},NULL,{},(SELECT epoch FROM {TX_TABLE} WHERE id=1),{NOW_US} FROM {} ORDER BY rowid",
                quote_lit(&name),
                json_key("", &info.key),
                json_row("", &info.cols),
                quote_ident(&name)
            ))
            .or_else(|e| {
                // WITHOUT ROWID tables have no rowid to order by.
                if e.to_string().contains("rowid") {
                    tx.execute_batch(&format!(
                        "INSERT INTO {CAPTURE_TABLE}(tbl,op,pk,old,new,epoch,time_us) \
                         SELECT {},'insert',{},NULL,{},(SELECT epoch FROM {TX_TABLE} WHERE id=1),{NOW_US} FROM {}",
                        quote_lit(&name),
                        json_key("", &info.key),
                        json_row("", &info.cols),
                        quote_ident(&name)
                    ))
                } else {
                    Err(e)
                }
            })?;
        }
        for sql in &want {
            tx.execute_batch(sql)?;
        }
        tx.execute_batch(&bump)?;
        installed += 1;
    }
    if installed > 0 {
        // Later application rows carry an epoch of their own (the install's rows are
        // one transaction of the agent's).
        tx.execute_batch(&bump)?;
    }
    tx.commit()?;
    Ok(installed)
}
