//! Feeds a guest's table definition to where weftd runs it: `weft_provenance::sql`, the
//! one place guest SQL reaches SQLite (a DPA `schema` entry or a `sqlite_master` row
//! read off a guest's disk, when a replay or a composition writes its database).
//!
//! The definition is created with `create_table` on a hardened output database
//! (`open_output`) in a scratch directory, and checked with `check_create_table` in
//! memory: both must agree. What is admitted leaves exactly one table of the named
//! name in `main` (with at most its automatic indexes and `sqlite_sequence`) and
//! nothing else: no trigger, no view, no other table, no attached database, no file in
//! the scratch directory besides the database, no file at a path the text names that
//! was not there before. What is refused leaves the database empty, and its reason is
//! one line. Time is bounded by libFuzzer's `-timeout` (the campaign sets it).
//!
//! Input: the table's name, a newline, the definition (no newline: table `t`).
#![no_main]

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use weft_provenance::sql::{check_create_table, create_table, open_output};

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime")
    })
}

/// A scratch directory of this process, which is also its working directory, so that
/// a relative path in the text (`ATTACH 'x.db'`) would land in it.
fn scratch() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("weft-fuzz-schema-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("scratch directory");
        std::env::set_current_dir(&dir).expect("enter the scratch directory");
        dir
    })
}

/// Absolute paths the text names in quotes (`'…'`, `"…"`), as ATTACH would take them.
fn named_paths(sql: &str) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for q in ['\'', '"'] {
        for (i, part) in sql.split(q).enumerate() {
            if i % 2 == 1 && part.starts_with('/') && part.len() < 4096 {
                out.push(PathBuf::from(part));
            }
        }
    }
    out
}

fn one_line(s: &str) -> bool {
    !s.contains('\n') && !s.contains('\r')
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let (table, sql) = text.split_once('\n').unwrap_or(("t", text));
    let dir = scratch();
    for e in std::fs::read_dir(dir).expect("list the scratch directory") {
        let p = e.expect("scratch entry").path();
        let _ = std::fs::remove_file(&p).or_else(|_| std::fs::remove_dir_all(&p));
    }
    let paths: Vec<(PathBuf, bool)> = named_paths(sql)
        .into_iter()
        .map(|p| {
            let was = p.symlink_metadata().is_ok();
            (p, was)
        })
        .collect();
    let db = dir.join("out.db");

    let checked = check_create_table(table, sql);
    let (created, objects, databases) = runtime().block_on(async {
        let mut conn = open_output(&db).await.expect("open the output database");
        let created = create_table(&mut conn, table, sql).await;
        let objects: Vec<(String, String, String)> =
            sqlx::query_as("SELECT type, name, tbl_name FROM main.sqlite_master")
                .fetch_all(&mut conn)
                .await
                .expect("read sqlite_master");
        let databases: Vec<(i64, String, String)> = sqlx::query_as("PRAGMA database_list")
            .fetch_all(&mut conn)
            .await
            .expect("list databases");
        use sqlx::Connection as _;
        conn.close().await.expect("close");
        (created, objects, databases)
    });

    assert_eq!(
        checked.is_ok(),
        created.is_ok(),
        "check_create_table and create_table disagree on {sql:?}: {checked:?} / {created:?}"
    );
    for e in [&checked, &created]
        .into_iter()
        .filter_map(|r| r.as_ref().err())
    {
        assert!(
            one_line(&e.to_string()),
            "a refusal of more than one line: {e}"
        );
    }
    for (_, name, _) in &databases {
        assert!(
            name == "main" || name == "temp",
            "database {name:?} is attached after {sql:?}"
        );
    }
    let entries: Vec<String> = std::fs::read_dir(dir)
        .expect("list the scratch directory")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        entries,
        ["out.db"],
        "files besides the database after {sql:?}"
    );
    for (p, was) in &paths {
        assert!(
            *was || p.symlink_metadata().is_err(),
            "{} was created by {sql:?}",
            p.display()
        );
    }

    let same = |a: &str, b: &str| a.eq_ignore_ascii_case(b);
    if created.is_err() {
        assert!(
            objects.is_empty(),
            "{sql:?} was refused but left {objects:?}"
        );
        return;
    }
    let tables: Vec<&(String, String, String)> =
        objects.iter().filter(|(ty, _, _)| ty == "table").collect();
    assert!(
        tables.iter().filter(|(_, n, _)| same(n, table)).count() == 1,
        "{sql:?} was admitted for {table:?} but made {objects:?}"
    );
    for (ty, name, of) in &objects {
        let ok = match ty.as_str() {
            "table" => same(name, table) || name == "sqlite_sequence",
            "index" => same(of, table) && name.starts_with("sqlite_autoindex_"),
            _ => false,
        };
        assert!(
            ok,
            "{sql:?} for {table:?} also made {ty} {name:?} on {of:?}"
        );
    }
});
