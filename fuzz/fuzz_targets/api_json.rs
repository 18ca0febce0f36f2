//! Feeds a request body (or query string) to every type weftd's API deserializes, as a
//! local caller could send it: the JSON bodies of the `POST`/`PUT` routes (what axum's
//! `Json` extractor parses) and the query strings of the `GET` routes (axum's `Query`).
//!
//! Properties: no panic; bounded (serde_json's recursion limit, libFuzzer's
//! `-timeout`); a value accepted is written back (weftd writes several into the audit
//! log with `serde_json::to_string`) and that text parses again to the same value
//! (compared as JSON, so types without `PartialEq` count too); where weftd checks a
//! body without I/O (composition rules, snapshot policies) the check runs too, gives
//! one line when it refuses, and a policy it admits has a next run weftd can write.
//!
//! Input: byte 0 picks the type, the rest is the body.
#![no_main]

use std::time::{Duration, SystemTime};

use libfuzzer_sys::fuzz_target;
use serde::de::DeserializeOwned;
use serde::Serialize;
use weft_api::audit::AuditQuery;
use weft_api::composition::{ApplyComposition, CreateComposition, ResolveRequest};
use weft_api::env::{CreateEnvironment, Limits, SetConfig};
use weft_api::net::{EgressRequest, ExposeRequest, GuestPlan, RouteRequest, UnexposeRequest};
use weft_api::policy::{next_run, PolicyQuery, SetPolicy};
use weft_api::provenance::{PageQuery, ReplayRequest};
use weft_api::snapshot::{CreateSnapshot, PruneRequest, RestoreRequest, SnapshotQuery};
use weft_api::store::{GcRequest, TierRequest};
use weft_api::weave::{CreateWeave, SyncRequest};

fn one_line(s: &str) -> bool {
    !s.contains('\n') && !s.contains('\r')
}

/// Parses a JSON body as `T`; what is accepted must write back and parse again to
/// the same value.
fn json<T: Serialize + DeserializeOwned>(body: &[u8]) -> Option<T> {
    let v: T = serde_json::from_slice(body).ok()?;
    let text = serde_json::to_string(&v).expect("an accepted body serializes");
    let again: T = match serde_json::from_str(&text) {
        Ok(a) => a,
        Err(e) => panic!(
            "{} written back as {text} does not parse: {e}",
            std::any::type_name::<T>()
        ),
    };
    assert_eq!(
        serde_json::to_value(&v).expect("to JSON"),
        serde_json::to_value(&again).expect("to JSON"),
        "{} changes through {text}",
        std::any::type_name::<T>()
    );
    Some(v)
}

/// Parses a query string as `T` (axum's `Query` uses serde_urlencoded).
fn query<T: DeserializeOwned>(q: &[u8]) -> Option<T> {
    serde_urlencoded::from_bytes(q).ok()
}

fuzz_target!(|data: &[u8]| {
    let [which, body @ ..] = data else { return };
    match which % 24 {
        0 => {
            json::<CreateEnvironment>(body);
        }
        1 => {
            json::<CreateSnapshot>(body);
        }
        2 => {
            json::<PruneRequest>(body);
        }
        3 => {
            json::<RestoreRequest>(body);
        }
        4 => {
            json::<GuestPlan>(body);
        }
        5 => {
            json::<EgressRequest>(body);
        }
        6 => {
            json::<ExposeRequest>(body);
        }
        7 => {
            json::<UnexposeRequest>(body);
        }
        8 => {
            json::<CreateWeave>(body);
        }
        9 => {
            if let Some(c) = json::<CreateComposition>(body) {
                // weftd stores the rules as checked (`Rules::parse` checked them as
                // they came in through the CLI; the API takes them as JSON).
                if let Err(e) = c.rules.checked() {
                    assert!(one_line(&e.0), "a refusal of more than one line: {:?}", e.0);
                }
            }
        }
        10 => {
            json::<ResolveRequest>(body);
        }
        11 => {
            json::<ApplyComposition>(body);
        }
        12 => {
            if let Some(p) = json::<SetPolicy>(body) {
                match p.check() {
                    Err(e) => assert!(one_line(&e), "a refusal of more than one line: {e:?}"),
                    Ok(()) => {
                        let next = next_run(SystemTime::now(), Duration::from_secs(p.every_secs));
                        assert!(next.len() >= 20 && next.ends_with('Z'), "next run {next:?}");
                    }
                }
            }
        }
        13 => {
            json::<SetConfig>(body);
        }
        14 => {
            json::<Limits>(body);
        }
        15 => {
            json::<RouteRequest>(body);
        }
        16 => {
            json::<GcRequest>(body);
        }
        17 => {
            json::<TierRequest>(body);
        }
        18 => {
            json::<ReplayRequest>(body);
        }
        19 => {
            json::<SyncRequest>(body);
        }
        20 => {
            query::<AuditQuery>(body);
        }
        21 => {
            query::<SnapshotQuery>(body);
        }
        22 => {
            query::<PolicyQuery>(body);
        }
        _ => {
            if let Some(q) = query::<PageQuery>(body) {
                let text = serde_urlencoded::to_string(&q).expect("a page query writes back");
                let again: PageQuery =
                    serde_urlencoded::from_str(&text).expect("a written page query parses");
                assert_eq!(again, q, "the page query changes through {text:?}");
            }
        }
    }
});
