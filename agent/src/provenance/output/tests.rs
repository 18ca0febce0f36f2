//! Writing states out: real files and databases, rows SQLite refuses, guest names
//! that stay names, and a spilled replay that writes what the in-memory one writes.

use std::collections::BTreeMap;
use std::ops::ControlFlow;

use rusqlite::Connection;
use serde_json::json;
use weft_dpa::{DataType, Operation};
use weft_provenance::item::Item;
use weft_provenance::log::{ProvenanceLog, Query};
use weft_provenance::sql::{check_create_table, open_guest_copy};
use weft_provenance::state::{rebuild, State, Summary};
use weft_provenance::test_util::{apply_sqlite_base, change as e, entry, log_of_every_kind, T0};

use super::*;

#[test]
fn paths_stay_under_the_output_directory() {
    assert_eq!(
        confined("/data/app.db").unwrap(),
        PathBuf::from("data/app.db")
    );
    assert!(confined("/data/../../etc/passwd").is_err());
    assert!(confined("/").is_err());
}

#[tokio::test]
async fn a_state_is_written_as_real_files_and_a_sqlite_database() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = State::default();
    let db = "/data/app.db";
    s.apply(&e(
        DataType::Sqlite,
        Operation::Schema,
        db,
        "t",
        "",
        None,
        Some(r#""CREATE TABLE t(id INTEGER PRIMARY KEY, name TEXT, b BLOB)""#),
    ))
    .unwrap();
    s.apply(&e(
        DataType::Sqlite,
        Operation::Insert,
        db,
        "t",
        "[7]",
        None,
        Some(r#"{"id":7,"name":"Bob","b":{"$blob":"00ff"}}"#),
    ))
    .unwrap();
    s.apply(&e(
        DataType::Json,
        Operation::Insert,
        "/etc/app.json",
        "",
        "",
        None,
        Some(r#"{"k":1}"#),
    ))
    .unwrap();
    s.apply(&e(
        DataType::Kv,
        Operation::Insert,
        "/etc/app.env",
        "",
        "A",
        None,
        Some(r#""1""#),
    ))
    .unwrap();
    s.apply(&e(
        DataType::Kv,
        Operation::Insert,
        "/etc/keys/",
        "",
        "token",
        None,
        Some(r#""abc""#),
    ))
    .unwrap();
    let files = write_to(&s, dir.path()).await.unwrap();
    assert_eq!(files.len(), 4);
    assert_eq!(
        std::fs::read_to_string(dir.path().join("etc/app.env")).unwrap(),
        "A=1\n"
    );
    assert_eq!(
        std::fs::read_to_string(dir.path().join("etc/keys/token")).unwrap(),
        "abc"
    );
    let doc: Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("etc/app.json")).unwrap()).unwrap();
    assert_eq!(doc, serde_json::json!({"k": 1}));
    use sqlx::Connection as _;
    let mut conn = sqlx::SqliteConnection::connect(&format!(
        "sqlite://{}",
        dir.path().join("data/app.db").display()
    ))
    .await
    .unwrap();
    let (id, name, b): (i64, String, Vec<u8>) = sqlx::query_as("SELECT id, name, b FROM t")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert_eq!((id, name.as_str(), b), (7, "Bob", vec![0, 255]));
}
#[tokio::test]
async fn a_row_sqlite_refuses_is_skipped_not_the_database() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = State::default();
    let db = "/data/app.db";
    s.apply(&e(
        DataType::Sqlite,
        Operation::Schema,
        db,
        "t",
        "",
        None,
        Some(r#""CREATE TABLE t(id INTEGER PRIMARY KEY, n INTEGER) STRICT""#),
    ))
    .unwrap();
    for (key, row) in [
        ("[1]", r#"{"id":1,"n":10}"#),
        ("[2]", r#"{"id":2,"nope":1}"#),
        ("[3]", r#"{"id":3,"n":"not a number"}"#),
        ("[4]", r#"{"id":4,"n\u0000x":1}"#),
        ("[5]", r#"{}"#),
        ("[6]", r#"{"id":6,"n":60}"#),
    ] {
        s.apply(&e(
            DataType::Sqlite,
            Operation::Insert,
            db,
            "t",
            key,
            None,
            Some(row),
        ))
        .unwrap();
    }
    let written = write_counted(&s, dir.path())
        .await
        .expect("the database is written");
    assert_eq!(written.rows_skipped, 4);
    use sqlx::Connection as _;
    let mut conn = sqlx::SqliteConnection::connect(&format!(
        "sqlite://{}",
        dir.path().join("data/app.db").display()
    ))
    .await
    .unwrap();
    let rows: Vec<(i64, i64)> = sqlx::query_as("SELECT id, n FROM t ORDER BY id")
        .fetch_all(&mut conn)
        .await
        .unwrap();
    assert_eq!(rows, vec![(1, 10), (6, 60)]);
}

/// Compositions merge table definitions as items and write them out without a log
/// entry: the definition is checked again where the database is written.
#[tokio::test]
async fn merged_items_write_only_plain_tables() {
    let dir = tempfile::tempdir().unwrap();
    let escaped = dir.path().join("escaped.db");
    let schema = |table: &str| Item::Schema {
        db: "/data/app.db".into(),
        table: table.into(),
    };
    let row = |table: &str| Item::Row {
        db: "/data/app.db".into(),
        table: table.into(),
        key: "[1]".into(),
    };
    let attach = format!(
        "CREATE TABLE a(x); COMMIT; ATTACH DATABASE '{}' AS p; CREATE TABLE p.y(z); BEGIN",
        escaped.display()
    );
    let items = std::collections::BTreeMap::from([
        (schema("a"), json!(attach)),
        (row("a"), json!({"x": 1})),
        (
            schema("good"),
            json!("CREATE TABLE good(id INTEGER PRIMARY KEY, v TEXT)"),
        ),
        (row("good"), json!({"id": 1, "v": "kept"})),
    ]);
    let out = dir.path().join("out");
    let files = write_to(&State::from_items(&items), &out).await.unwrap();
    assert!(!escaped.exists(), "ATTACH ran on the host");
    let mut conn = open_guest_copy(&files[0]).await.unwrap();
    let names: Vec<String> = sqlx::query_scalar("SELECT name FROM sqlite_master")
        .fetch_all(&mut conn)
        .await
        .unwrap();
    assert_eq!(names, vec!["good".to_string()]);
    let v: String = sqlx::query_scalar("SELECT v FROM good")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert_eq!(v, "kept");
}

/// Table and column names come from the guest too: they are quoted identifiers in
/// every statement weftd builds, never SQL.
#[tokio::test]
async fn guest_names_stay_names() {
    let dir = tempfile::tempdir().unwrap();
    let escaped = dir.path().join("n.db");
    let table = format!("t\"; ATTACH DATABASE '{}' AS p; --", escaped.display());
    let col = format!(
        "c\") VALUES (1); ATTACH DATABASE '{}' AS q; --",
        escaped.display()
    );
    let quote = |n: &str| format!("\"{}\"", n.replace('"', "\"\""));
    let sql = format!(
        "CREATE TABLE {}({} TEXT, \"it's\" TEXT)",
        quote(&table),
        quote(&col)
    );
    check_create_table(&table, &sql).unwrap();
    let mut row = serde_json::Map::new();
    row.insert(col.clone(), json!("v"));
    row.insert("it's".into(), json!("w"));
    let items = std::collections::BTreeMap::from([
        (
            Item::Schema {
                db: "/app.db".into(),
                table: table.clone(),
            },
            json!(sql),
        ),
        (
            Item::Row {
                db: "/app.db".into(),
                table: table.clone(),
                key: "[1]".into(),
            },
            serde_json::Value::Object(row),
        ),
    ]);
    let out = dir.path().join("out");
    let files = write_to(&State::from_items(&items), &out).await.unwrap();
    assert!(!escaped.exists(), "a name ran as SQL");
    let mut conn = open_guest_copy(&files[0]).await.unwrap();
    let got: (String, String) = sqlx::query_as(&format!(
        "SELECT {}, \"it's\" FROM {}",
        quote(&col),
        quote(&table)
    ))
    .fetch_one(&mut conn)
    .await
    .unwrap();
    assert_eq!(got, ("v".to_string(), "w".to_string()));
}

/// Every file under `dir`: a database as its definitions and rows, others as text.
fn tree(dir: &Path) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for f in std::fs::read_dir(&d).unwrap() {
            let p = f.unwrap().path();
            if p.is_dir() {
                stack.push(p);
                continue;
            }
            let name = p.strip_prefix(dir).unwrap().display().to_string();
            let text = if name.ends_with(".db") {
                dump(&p)
            } else {
                std::fs::read_to_string(&p).unwrap()
            };
            out.insert(name, text);
        }
    }
    out
}

fn dump(db: &Path) -> String {
    let conn = Connection::open(db).unwrap();
    let mut text = String::new();
    let tables: Vec<(String, String)> = conn
        .prepare("SELECT name, sql FROM sqlite_master WHERE type = 'table' ORDER BY name")
        .unwrap()
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    for (name, sql) in tables {
        text += &format!("{sql}\n");
        let mut st = conn
            .prepare(&format!("SELECT * FROM \"{name}\" ORDER BY 1"))
            .unwrap();
        let n = st.column_count();
        let mut rows = st.query([]).unwrap();
        while let Some(r) = rows.next().unwrap() {
            for i in 0..n {
                text += &match r.get_ref(i).unwrap() {
                    rusqlite::types::ValueRef::Text(t) => {
                        format!("Text({:?}) ", String::from_utf8_lossy(t))
                    }
                    v => format!("{v:?} "),
                };
            }
            text += "\n";
        }
    }
    text
}

async fn spilled(log: &ProvenanceLog, from: Option<i64>, out: &Path) -> (Summary, Written) {
    let output = Output::unconfined(out).unwrap();
    let mut s = Spilled::create(output.work()).unwrap();
    let summary = s.rebuild(log, "vm", from, i64::MAX).unwrap();
    let written = write_spilled(&mut s, &output).await.unwrap();
    (summary, written)
}

#[tokio::test]
async fn a_spilled_replay_writes_what_the_in_memory_one_writes() {
    let dir = tempfile::tempdir().unwrap();
    let log = log_of_every_kind(&dir.path().join("log"));
    let window = T0 + 1214 * 1000;
    for from in [None, Some(window)] {
        let (a, b) = (dir.path().join("mem"), dir.path().join("disk"));
        let _ = std::fs::remove_dir_all(&a);
        let _ = std::fs::remove_dir_all(&b);
        let (state, mem_summary) = rebuild(&log, "vm", from, i64::MAX).unwrap();
        let mem_written = write_counted(&state, &a).await.unwrap();
        let (summary, written) = spilled(&log, from, &b).await;
        assert_eq!(summary, mem_summary, "window {from:?}");
        assert!(summary.skipped >= 4, "{summary:?}");
        assert_eq!(written.rows_skipped, mem_written.rows_skipped);
        let (ta, tb) = (tree(&a), tree(&b));
        assert_eq!(ta, tb, "window {from:?}");
        assert!(
            tb.keys().all(|f| !f.contains("scratch")),
            "the scratch file is gone"
        );
        assert!(tb.contains_key("etc/keys/token"));
        match from {
            None => {
                assert_eq!(written.rows_skipped, 2);
                assert!(tb["data/app.db"].contains("Text(\"row 1\")"));
                assert!(tb["etc/app.env"].lines().count() > 400);
            }
            Some(_) => {
                // Only what the window changed: updated rows, not the untouched ones.
                assert!(!tb["data/app.db"].contains("Text(\"row 1\")"));
                assert!(tb["data/app.db"].contains("Text(\"new 7\")"));
                assert_eq!(tb["etc/app.env"], "K0001=changed\n");
                assert!(!tb.contains_key("etc/app.json"));
            }
        }
    }
}

#[tokio::test]
async fn a_spilled_replay_applies_the_log_on_a_base() {
    let dir = tempfile::tempdir().unwrap();
    let log = log_of_every_kind(&dir.path().join("log"));
    let mut base = State::default();
    for (i, e) in (0..40).map(|i| {
        (
            i,
            entry(
                1,
                DataType::Kv,
                Operation::Insert,
                "/etc/base.env",
                "",
                &format!("B{i}"),
                Some(r#""base""#),
            ),
        )
    }) {
        let _ = i;
        base.apply(&e).unwrap();
    }
    apply_sqlite_base(&mut base);
    base.apply(&entry(
        1,
        DataType::Json,
        Operation::Insert,
        "/etc/base.json",
        "",
        "",
        Some(r#"{"b":true}"#),
    ))
    .unwrap();
    let query = Query {
        from_us: Some(T0 + 900 * 1000),
        ..Default::default()
    };
    let (a, b) = (dir.path().join("mem"), dir.path().join("disk"));
    let mut state = base.clone();
    let mut mem_summary = Summary::default();
    log.scan("vm", &query, |r| {
        state.apply_counted(&r, &mut mem_summary);
        ControlFlow::Continue(())
    })
    .unwrap();
    write_counted(&state, &a).await.unwrap();
    let output = Output::unconfined(&b).unwrap();
    let mut s = Spilled::create(output.work()).unwrap();
    s.load(base).unwrap();
    let (summary, _) = s.apply_log(&log, "vm", &query, u64::MAX).unwrap();
    write_spilled(&mut s, &output).await.unwrap();
    drop(s);
    drop(output);
    assert_eq!(summary, mem_summary);
    let (ta, tb) = (tree(&a), tree(&b));
    assert_eq!(ta, tb);
    assert!(tb["data/app.db"].contains("from the base"));
    assert_eq!(tb["etc/base.env"].lines().count(), 40);
}
