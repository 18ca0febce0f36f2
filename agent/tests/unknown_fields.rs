//! Every route that takes a JSON body refuses a body with a field it does not know,
//! with a one-line 400 that names the field, through a real weftd. The routes come
//! from `docs/openapi.json` (which a unit test keeps equal to the route table); their
//! number is checked against the handlers in `src/api/` that read a body.

mod common;
use common::Weftd;

use weft_client::{Client, ClientError};

const OPENAPI: &str = include_str!("../../docs/openapi.json");
/// The API server's sources (one file per resource).
const API_SOURCES: &[&str] = &[
    include_str!("../src/api/mod.rs"),
    include_str!("../src/api/audit.rs"),
    include_str!("../src/api/compositions.rs"),
    include_str!("../src/api/envs.rs"),
    include_str!("../src/api/jobs.rs"),
    include_str!("../src/api/net.rs"),
    include_str!("../src/api/policies.rs"),
    include_str!("../src/api/provenance.rs"),
    include_str!("../src/api/snapshots.rs"),
    include_str!("../src/api/store.rs"),
    include_str!("../src/api/weaves.rs"),
];
const UNKNOWN: &str = "zz_not_a_field";

/// `(method, path, body)` of every operation with a request body: a body holding only
/// an unknown field (and the tag of a tagged body, which serde needs first).
fn bodies() -> Vec<(String, String, serde_json::Value)> {
    let doc: serde_json::Value = serde_json::from_str(OPENAPI).unwrap();
    let mut out = Vec::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, op) in item.as_object().unwrap() {
            let Some(schema) = op
                .get("requestBody")
                .map(|b| &b["content"]["application/json"]["schema"])
            else {
                continue;
            };
            let schema = match schema["$ref"].as_str() {
                Some(r) => &doc["components"]["schemas"][r.rsplit('/').next().unwrap()],
                None => schema,
            };
            let mut body = serde_json::json!({ UNKNOWN: 1 });
            if let Some(first) = schema["oneOf"].get(0) {
                if let Some(kind) = first["properties"]["kind"]["const"].as_str() {
                    body["kind"] = kind.into();
                }
            }
            let path = path
                .replace("{name}", "ufx")
                .replace("{id}", "1")
                .replace("{resource}", "config");
            out.push((method.to_uppercase(), path, body));
        }
    }
    out
}

#[tokio::test]
async fn every_body_route_refuses_unknown_fields_in_one_line() {
    let routes = bodies();
    // Handlers that read a body take a `Result<Json<…>, JsonRejection>` parameter and
    // hand it to `body()`, whose own parameter is the one more.
    let handlers = API_SOURCES
        .iter()
        .map(|s| s.matches("rejection::JsonRejection").count())
        .sum::<usize>()
        - 1;
    assert_eq!(
        routes.len(),
        handlers,
        "docs/openapi.json documents {} bodies, api.rs reads {handlers}",
        routes.len()
    );
    assert!(routes.len() >= 20, "{routes:?}");

    let dir = tempfile::tempdir().unwrap();
    let weftd = Weftd::start(dir.path()).await;
    let client = Client::new(&weftd.socket);
    for (method, path, body) in &routes {
        let method: hyper::Method = method.parse().unwrap();
        let r = client
            .request_json::<_, serde_json::Value>(method.clone(), path, body)
            .await;
        match r {
            Err(ClientError::Api { status, message }) => {
                assert_eq!(status.as_u16(), 400, "{method} {path}: {message}");
                assert!(
                    message.starts_with(
                        "invalid request body: unknown field \"zz_not_a_field\", expected"
                    ),
                    "{method} {path}: {message}"
                );
                assert!(!message.contains('\n'), "{method} {path}: {message}");
            }
            other => panic!("{method} {path} with {body} was not refused: {other:?}"),
        }
    }
    // A known body with one unknown field nested in it (a NIC of a create).
    let nested = serde_json::json!({
        "kind": "managed",
        "name": "ufx",
        "disks": [],
        "nics": [{"id": "net0", "tap": "uf0", "mac": "52:54:00:00:00:01", "model": "e1000"}],
    });
    match client
        .post::<_, serde_json::Value>("/v1/environments", &nested)
        .await
    {
        Err(ClientError::Api { status, message }) => {
            assert_eq!(status.as_u16(), 400, "{message}");
            assert!(message.contains("unknown field \"model\""), "{message}");
        }
        other => panic!("a NIC with an unknown field was accepted: {other:?}"),
    }
}
