//! How the DPA turns source data into entry keys and values: the SQL that renders a
//! SQLite row and its key as JSON, and the parsing of key-value files. The agent
//! captures with these; weftd's replay reads the files of a disk snapshot with the same
//! functions (`weft replay --base`), so a base and the log agree on every key and value.

use std::collections::BTreeMap;

/// A SQL identifier, double-quoted.
pub fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// A SQL string literal, single-quoted.
pub fn quote_lit(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

/// SQL giving the JSON text of the column expression `x`: integers, text and NULL as
/// JSON, reals with 17 significant digits (so they read back as the same double;
/// `json_quote` keeps only 15), blobs as `{"$blob":"<hex>"}`.
pub fn json_value(x: &str) -> String {
    format!(
        "CASE typeof({x}) WHEN 'blob' THEN '{{\"$blob\":\"'||hex({x})||'\"}}' \
         WHEN 'real' THEN printf('%!.17g',{x}) ELSE json_quote({x}) END"
    )
}

/// SQL giving a JSON object of the columns, read through `prefix` (`NEW.`, `OLD.` or
/// nothing).
pub fn json_row(prefix: &str, cols: &[String]) -> String {
    let mut parts = Vec::new();
    for (i, c) in cols.iter().enumerate() {
        let key = serde_json::to_string(c).unwrap_or_default();
        let sep = if i == 0 { "{" } else { "," };
        parts.push(quote_lit(&format!("{sep}{key}:")));
        parts.push(json_value(&format!("{prefix}{}", quote_ident(c))));
    }
    if parts.is_empty() {
        return "'{}'".into();
    }
    parts.push("'}'".into());
    parts.join("||")
}

/// How a table's rows are keyed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Key {
    /// No primary key: the rowid.
    Rowid,
    /// The primary key's columns, in key order.
    Columns(Vec<String>),
}

/// SQL giving a row's key as a JSON array, read through `prefix`.
pub fn json_key(prefix: &str, pk: &Key) -> String {
    let cols: Vec<String> = match pk {
        Key::Rowid => vec![format!("{prefix}rowid")],
        Key::Columns(c) => c
            .iter()
            .map(|c| format!("{prefix}{}", quote_ident(c)))
            .collect(),
    };
    let mut parts = vec!["'['".to_string()];
    for (i, c) in cols.iter().enumerate() {
        if i > 0 {
            parts.push("','".into());
        }
        parts.push(json_value(c));
    }
    parts.push("']'".into());
    parts.join("||")
}

/// Whether a table is the DPA's own (capture, transaction counter) or SQLite's.
pub fn is_internal_table(name: &str) -> bool {
    name.starts_with("_weft_") || name.starts_with("sqlite_")
}

/// Parses a `KEY=value` file: blank lines and lines starting with `#` are ignored, an
/// `export ` prefix is allowed, whitespace around the key and the value is trimmed,
/// and a value enclosed in a matching pair of `"` or `'` loses that pair (no escapes).
/// Lines without `=` are ignored; a repeated key keeps its last value.
pub fn parse_env(text: &str) -> BTreeMap<String, String> {
    let mut map = BTreeMap::new();
    for line in text.lines() {
        if let Some((k, v)) = env_line(line) {
            map.insert(k, v);
        }
    }
    map
}

/// One line of a `KEY=value` file, as [`parse_env`] reads it.
pub fn env_line(line: &str) -> Option<(String, String)> {
    let t = line.trim();
    if t.is_empty() || t.starts_with('#') {
        return None;
    }
    let t = t.strip_prefix("export ").unwrap_or(t);
    let (k, v) = t.split_once('=')?;
    let k = k.trim();
    if k.is_empty() {
        return None;
    }
    let v = v.trim();
    let b = v.as_bytes();
    let v = if b.len() >= 2 && (b[0] == b'"' || b[0] == b'\'') && b[b.len() - 1] == b[0] {
        &v[1..v.len() - 1]
    } else {
        v
    };
    Some((k.to_string(), v.to_string()))
}

/// Whether `name` is a key a directory source holds (dotfiles are not: they are the
/// temporary files of atomic writes).
pub fn is_dir_key(name: &str) -> bool {
    !name.is_empty() && !name.starts_with('.') && !name.contains('/')
}
