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

/// The status and the one-line `error` of an API answer.
async fn answer(e: ApiError) -> (StatusCode, String) {
    use http_body_util::BodyExt;
    let response = e.into_response();
    let status = response.status();
    let bytes = response
        .into_body()
        .collect()
        .await
        .expect("the body is in memory")
        .to_bytes();
    let body: serde_json::Value = serde_json::from_slice(&bytes).expect("the body is JSON");
    let error = body["error"].as_str().expect("an error text").to_string();
    (status, error)
}

#[tokio::test]
async fn a_full_disk_answers_500_naming_the_os_error() {
    let e = ApiError::io(
        "cannot create /d/environments/web",
        std::io::Error::from_raw_os_error(libc::ENOSPC),
    );
    let (status, error) = answer(e).await;
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
    assert!(!error.contains('\n'), "{error}");
    assert!(
        error.starts_with("cannot create /d/environments/web: "),
        "{error}"
    );
    assert!(
        error.ends_with("No space left on device (os error 28)"),
        "{error}"
    );
}

#[tokio::test]
async fn a_duplicate_name_from_the_catalog_answers_409() {
    let e = ApiError::from(crate::catalog::CatalogError::Duplicate("web".into()));
    let (status, error) = answer(e).await;
    assert_eq!(status, StatusCode::CONFLICT);
    assert_eq!(error, "an environment named \"web\" already exists");
}

#[tokio::test]
async fn a_catalog_failure_answers_500_with_its_cause_once() {
    let db = sqlx::Error::Io(std::io::Error::from_raw_os_error(libc::EIO));
    let e = ApiError::catalog(
        "the change was made but the audit log could not be written",
        crate::catalog::CatalogError::Db(db),
    );
    let (status, error) = answer(e).await;
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
    assert!(
        error.starts_with("the change was made but the audit log could not be written: catalog: "),
        "{error}"
    );
    assert!(
        error.ends_with("Input/output error (os error 5)"),
        "{error}"
    );
    assert_eq!(error.matches("Input/output error").count(), 1, "{error}");
}

#[tokio::test]
async fn qemus_multi_line_output_answers_502_on_one_line() {
    let e = ApiError::qmp(
        "cannot start QEMU for \"web\"",
        weft_qmp::Error::Launch {
            status: weft_qmp::ExitInfo {
                code: Some(1),
                signal: None,
                at: std::time::SystemTime::now(),
            },
            output: "qemu-system-x86_64: -drive file=/d/web.qcow2: Could not open '/d/web.qcow2'\n  Permission denied\n".into(),
        },
    );
    let (status, error) = answer(e).await;
    assert_eq!(status, StatusCode::BAD_GATEWAY);
    assert_eq!(
        error,
        "cannot start QEMU for \"web\": qemu exited during start (exit code 1): \
         qemu-system-x86_64: -drive file=/d/web.qcow2: Could not open '/d/web.qcow2'; Permission denied"
    );
}
