//! Tests of the API server: the route table against `docs/openapi.json` (both ways), roles, error answers.

use super::*;
use std::collections::{BTreeMap, BTreeSet};

/// Every documented operation with its `x-weft-role` (empty when it has none).
fn documented() -> BTreeMap<(String, String), String> {
    let doc: serde_json::Value = serde_json::from_str(OPENAPI).expect("docs/openapi.json is JSON");
    let mut out = BTreeMap::new();
    for (path, item) in doc["paths"].as_object().expect("paths") {
        for (method, op) in item.as_object().expect("path item") {
            if ["get", "post", "put", "delete", "patch"].contains(&method.as_str()) {
                let role = op["x-weft-role"].as_str().unwrap_or_default().to_string();
                out.insert((method.to_uppercase(), path.clone()), role);
            }
        }
    }
    out
}

#[test]
fn openapi_documents_exactly_the_served_routes_and_their_roles() {
    let served: BTreeMap<(String, String), String> = routes()
        .iter()
        .map(|r| {
            (
                (r.method.to_string(), r.path.to_string()),
                r.role.to_string(),
            )
        })
        .collect();
    let documented = documented();
    let served_keys: BTreeSet<_> = served.keys().collect();
    let documented_keys: BTreeSet<_> = documented.keys().collect();
    let undocumented: Vec<_> = served_keys.difference(&documented_keys).collect();
    let unserved: Vec<_> = documented_keys.difference(&served_keys).collect();
    assert!(
        undocumented.is_empty(),
        "routes served but not in docs/openapi.json: {undocumented:?}"
    );
    assert!(
        unserved.is_empty(),
        "routes in docs/openapi.json that weftd does not serve: {unserved:?}"
    );
    let wrong: Vec<_> = served
        .iter()
        .filter(|(k, role)| documented[*k] != **role)
        .map(|(k, role)| {
            format!(
                "{} {}: x-weft-role {:?}, served as {role}",
                k.0, k.1, documented[k]
            )
        })
        .collect();
    assert!(
        wrong.is_empty(),
        "docs/openapi.json's x-weft-role differs from the route table: {wrong:#?}"
    );
}

#[test]
fn every_get_is_for_readers_and_every_change_needs_more() {
    for r in routes() {
        assert_eq!(
            r.method == Method::GET,
            r.role == Role::Reader,
            "{} {} needs {}",
            r.method,
            r.path,
            r.role
        );
    }
}
