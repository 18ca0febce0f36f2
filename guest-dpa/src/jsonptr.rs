//! JSON documents at JSON-pointer level (RFC 6901): the diff that turns two versions of
//! a document into changes, and the set/remove operations that replay them.
//!
//! Objects are compared key by key and recursed into. Arrays are compared index by
//! index: a changed element is an update at its index (recursed into when both sides
//! are containers), a longer array adds the new tail in order (each an insert at the
//! then-current length, i.e. an append), a shorter one removes the extra elements from
//! the last one down. Applying the changes of [`diff`] in order to the old document
//! with [`set`] and [`remove`] gives the new document. Anything else that changed type
//! is an update of the whole value at its pointer; the root's pointer is `""`.

use serde_json::Value;

/// One change at a pointer.
#[derive(Debug, Clone, PartialEq)]
pub enum Change {
    /// A member or element that did not exist.
    Insert {
        /// Where.
        ptr: String,
        /// The value.
        new: Value,
    },
    /// A value that changed.
    Update {
        /// Where.
        ptr: String,
        /// Before.
        old: Value,
        /// After.
        new: Value,
    },
    /// A member or element that is gone.
    Delete {
        /// Where.
        ptr: String,
        /// Before.
        old: Value,
    },
}

/// Escapes one reference token (`~` → `~0`, `/` → `~1`).
pub fn escape(token: &str) -> String {
    token.replace('~', "~0").replace('/', "~1")
}

/// Splits a pointer into unescaped tokens; `""` is the root (no tokens).
pub fn tokens(ptr: &str) -> Result<Vec<String>, String> {
    if ptr.is_empty() {
        return Ok(Vec::new());
    }
    let Some(rest) = ptr.strip_prefix('/') else {
        return Err(format!("JSON pointer {ptr:?} does not start with /"));
    };
    rest.split('/')
        .map(|t| {
            if t.contains('~') {
                let mut out = String::new();
                let mut chars = t.chars();
                while let Some(c) = chars.next() {
                    if c == '~' {
                        match chars.next() {
                            Some('0') => out.push('~'),
                            Some('1') => out.push('/'),
                            _ => return Err(format!("bad escape in JSON pointer {ptr:?}")),
                        }
                    } else {
                        out.push(c);
                    }
                }
                Ok(out)
            } else {
                Ok(t.to_string())
            }
        })
        .collect()
}

/// The changes that turn `old` into `new`.
pub fn diff(old: &Value, new: &Value) -> Vec<Change> {
    let mut out = Vec::new();
    diff_at(&mut String::new(), old, new, &mut out);
    out
}

fn diff_at(ptr: &mut String, old: &Value, new: &Value, out: &mut Vec<Change>) {
    match (old, new) {
        (Value::Object(a), Value::Object(b)) => {
            for (k, va) in a {
                let len = ptr.len();
                ptr.push('/');
                ptr.push_str(&escape(k));
                match b.get(k) {
                    Some(vb) => diff_at(ptr, va, vb, out),
                    None => out.push(Change::Delete {
                        ptr: ptr.clone(),
                        old: va.clone(),
                    }),
                }
                ptr.truncate(len);
            }
            for (k, vb) in b {
                if !a.contains_key(k) {
                    out.push(Change::Insert {
                        ptr: format!("{ptr}/{}", escape(k)),
                        new: vb.clone(),
                    });
                }
            }
        }
        (Value::Array(a), Value::Array(b)) => {
            let common = a.len().min(b.len());
            for i in 0..common {
                let len = ptr.len();
                ptr.push('/');
                ptr.push_str(&i.to_string());
                diff_at(ptr, &a[i], &b[i], out);
                ptr.truncate(len);
            }
            for (i, v) in b.iter().enumerate().skip(common) {
                out.push(Change::Insert {
                    ptr: format!("{ptr}/{i}"),
                    new: v.clone(),
                });
            }
            for i in (common..a.len()).rev() {
                out.push(Change::Delete {
                    ptr: format!("{ptr}/{i}"),
                    old: a[i].clone(),
                });
            }
        }
        (a, b) if a == b => {}
        (a, b) => out.push(Change::Update {
            ptr: ptr.clone(),
            old: a.clone(),
            new: b.clone(),
        }),
    }
}

/// Sets the value at `ptr` (the root, an object member, an existing array element, or
/// the element at the array's length, which appends). The parent must exist.
pub fn set(doc: &mut Value, ptr: &str, value: Value) -> Result<(), String> {
    let toks = tokens(ptr)?;
    let Some((last, parents)) = toks.split_last() else {
        *doc = value;
        return Ok(());
    };
    let parent = walk(doc, parents, ptr)?;
    match parent {
        Value::Object(m) => {
            m.insert(last.clone(), value);
            Ok(())
        }
        Value::Array(a) => {
            let i = index(last, ptr)?;
            if i < a.len() {
                a[i] = value;
            } else if i == a.len() {
                a.push(value);
            } else {
                return Err(format!(
                    "JSON pointer {ptr:?}: index {i} is past the array's end"
                ));
            }
            Ok(())
        }
        _ => Err(format!(
            "JSON pointer {ptr:?}: the parent is not a container"
        )),
    }
}

/// Removes the value at `ptr` (not the root).
pub fn remove(doc: &mut Value, ptr: &str) -> Result<(), String> {
    let toks = tokens(ptr)?;
    let Some((last, parents)) = toks.split_last() else {
        return Err("cannot remove the root of a document".into());
    };
    match walk(doc, parents, ptr)? {
        Value::Object(m) => m
            .remove(last)
            .map(|_| ())
            .ok_or_else(|| format!("JSON pointer {ptr:?}: no such member")),
        Value::Array(a) => {
            let i = index(last, ptr)?;
            if i >= a.len() {
                return Err(format!("JSON pointer {ptr:?}: no such element"));
            }
            a.remove(i);
            Ok(())
        }
        _ => Err(format!(
            "JSON pointer {ptr:?}: the parent is not a container"
        )),
    }
}

fn index(tok: &str, ptr: &str) -> Result<usize, String> {
    if tok.len() > 1 && tok.starts_with('0') {
        return Err(format!("JSON pointer {ptr:?}: bad array index {tok:?}"));
    }
    tok.parse()
        .map_err(|_| format!("JSON pointer {ptr:?}: bad array index {tok:?}"))
}

fn walk<'a>(doc: &'a mut Value, toks: &[String], ptr: &str) -> Result<&'a mut Value, String> {
    let mut cur = doc;
    for t in toks {
        cur = match cur {
            Value::Object(m) => m
                .get_mut(t)
                .ok_or_else(|| format!("JSON pointer {ptr:?}: no member {t:?}"))?,
            Value::Array(a) => {
                let i = index(t, ptr)?;
                a.get_mut(i)
                    .ok_or_else(|| format!("JSON pointer {ptr:?}: no element {i}"))?
            }
            _ => return Err(format!("JSON pointer {ptr:?}: {t:?} is inside a scalar")),
        };
    }
    Ok(cur)
}

/// Splits changes whose values are too large for one entry (`limit` bytes of JSON
/// text): an insert or update of a large object or array becomes an insert or update
/// of an empty one followed by inserts of its members, recursively. A scalar that is
/// still too large, and any too large old value, is replaced by
/// `{"$omitted": {"bytes": N}}` (reported, not replayable).
pub fn fit(changes: Vec<Change>, limit: usize) -> Vec<Change> {
    let mut out = Vec::with_capacity(changes.len());
    for c in changes {
        fit_one(c, limit, &mut out);
    }
    out
}

/// The marker that stands in for a value too large to carry.
pub fn omitted(bytes: usize) -> Value {
    serde_json::json!({ "$omitted": { "bytes": bytes } })
}

fn size(v: &Value) -> usize {
    serde_json::to_string(v)
        .map(|s| s.len())
        .unwrap_or(usize::MAX)
}

fn shrink_old(old: Value, limit: usize) -> Value {
    let n = size(&old);
    if n > limit {
        omitted(n)
    } else {
        old
    }
}

fn fit_one(c: Change, limit: usize, out: &mut Vec<Change>) {
    let (ptr, old, new) = match c {
        Change::Delete { ptr, old } => {
            out.push(Change::Delete {
                ptr,
                old: shrink_old(old, limit),
            });
            return;
        }
        Change::Insert { ptr, new } => (ptr, None, new),
        Change::Update { ptr, old, new } => (ptr, Some(old), new),
    };
    let old = old.map(|o| shrink_old(o, limit));
    let n = size(&new);
    if n <= limit {
        out.push(match old {
            Some(old) => Change::Update { ptr, old, new },
            None => Change::Insert { ptr, new },
        });
        return;
    }
    let empty = match &new {
        Value::Object(_) => Value::Object(Default::default()),
        Value::Array(_) => Value::Array(Vec::new()),
        _ => {
            tracing::warn!(pointer = %ptr, bytes = n, "a JSON value is too large for one entry; recorded as omitted");
            let new = omitted(n);
            out.push(match old {
                Some(old) => Change::Update { ptr, old, new },
                None => Change::Insert { ptr, new },
            });
            return;
        }
    };
    out.push(match old {
        Some(old) => Change::Update {
            ptr: ptr.clone(),
            old,
            new: empty.clone(),
        },
        None => Change::Insert {
            ptr: ptr.clone(),
            new: empty.clone(),
        },
    });
    let mut sub = Vec::new();
    diff_at(&mut ptr.clone(), &empty, &new, &mut sub);
    for c in sub {
        fit_one(c, limit, out);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn replay(mut doc: Value, changes: &[Change]) -> Value {
        for c in changes {
            match c {
                Change::Insert { ptr, new } | Change::Update { ptr, new, .. } => {
                    set(&mut doc, ptr, new.clone()).unwrap()
                }
                Change::Delete { ptr, .. } => remove(&mut doc, ptr).unwrap(),
            }
        }
        doc
    }

    #[test]
    fn pointers_escape_per_rfc6901() {
        assert_eq!(escape("a/b~c"), "a~1b~0c");
        assert_eq!(tokens("/a~1b~0c/0").unwrap(), vec!["a/b~c", "0"]);
        assert_eq!(tokens("").unwrap(), Vec::<String>::new());
        assert!(tokens("a").is_err());
        assert!(tokens("/a~2").is_err());
        let d = diff(&json!({}), &json!({"a/b": 1, "~": 2}));
        let ptrs: Vec<_> = d
            .iter()
            .map(|c| match c {
                Change::Insert { ptr, .. } => ptr.as_str(),
                _ => "",
            })
            .collect();
        assert_eq!(ptrs, ["/a~1b", "/~0"]);
    }

    #[test]
    fn diff_reports_members_with_old_and_new() {
        let old = json!({"name": "Alice", "age": 30, "tags": ["a", "b", "c"], "gone": true});
        let new = json!({"name": "Bob", "age": 30, "tags": ["a", "x"], "addr": {"city": "Oslo"}});
        let d = diff(&old, &new);
        assert!(d.contains(&Change::Update {
            ptr: "/name".into(),
            old: json!("Alice"),
            new: json!("Bob")
        }));
        assert!(d.contains(&Change::Delete {
            ptr: "/gone".into(),
            old: json!(true)
        }));
        assert!(d.contains(&Change::Insert {
            ptr: "/addr".into(),
            new: json!({"city": "Oslo"})
        }));
        assert!(d.contains(&Change::Delete {
            ptr: "/tags/2".into(),
            old: json!("c")
        }));
        assert_eq!(d.len(), 5);
        assert_eq!(replay(old, &d), new);
    }

    #[test]
    fn diffs_replay_to_the_new_document() {
        let cases = [
            (json!([1, 2, 3]), json!([1, 2, 3, 4, 5])),
            (json!([1, 2, 3, 4, 5]), json!([9])),
            (
                json!({"a": [1, {"b": 2}]}),
                json!({"a": [1, {"b": 3, "c": []}]}),
            ),
            (json!({"a": 1}), json!([1])),
            (json!(null), json!({"x": {"y": [true]}})),
        ];
        for (old, new) in cases {
            let d = diff(&old, &new);
            assert_eq!(replay(old.clone(), &d), new, "{old} -> {new}");
        }
    }

    #[test]
    fn large_values_are_split_into_members() {
        let big: serde_json::Map<String, Value> = (0..100)
            .map(|i| (format!("k{i}"), json!("x".repeat(50))))
            .collect();
        let new = json!({ "big": big, "huge": "y".repeat(500) });
        let d = fit(diff(&json!(null), &new), 200);
        for c in &d {
            let v = match c {
                Change::Insert { new, .. } | Change::Update { new, .. } => new,
                Change::Delete { old, .. } => old,
            };
            assert!(size(v) <= 200);
        }
        let got = replay(json!(null), &d);
        assert_eq!(got["big"], new["big"]);
        assert_eq!(got["huge"], omitted(502));
    }
}
