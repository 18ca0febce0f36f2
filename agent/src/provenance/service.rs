//! weftd's side of the provenance log: the API's view of records, the async glue the
//! handlers and weaves use, and periodic retention.

use std::ops::ControlFlow;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tracing::{info, warn};

use weft_api::provenance::{parse_time, PageQuery, RecordView};
use weft_provenance::log::{ProvenanceError, ProvenanceLog, Query};

use crate::envs::Manager;
use crate::error::{one_line, ApiError};

/// Bytes of a page's JSON when the request does not say.
pub const DEFAULT_PAGE_BYTES: usize = 4 << 20;
/// Most bytes of a page's JSON a request may ask for (the CLI takes answers up to
/// 64 MiB).
pub const MAX_PAGE_BYTES: usize = 16 << 20;
/// Fewest bytes of a page's JSON a request may ask for.
pub const MIN_PAGE_BYTES: usize = 1024;
/// Most bytes of a page's JSON after its records: `],"last_seq":` and
/// `,"next_after_seq":` with two numbers of up to 20 digits, `}`.
const PAGE_TAIL: usize = 72;
/// How often weftd applies the retention rules.
pub const RETENTION_PERIOD: Duration = Duration::from_secs(600);

/// The API's status for a log error.
pub fn env_error(e: ProvenanceError) -> ApiError {
    let text = one_line(&e.to_string());
    match e {
        ProvenanceError::InvalidName(_) | ProvenanceError::Invalid(_) => ApiError::BadRequest(text),
        ProvenanceError::Gap { .. }
        | ProvenanceError::Quota { .. }
        | ProvenanceError::Branch(_) => ApiError::Conflict(text),
        ProvenanceError::Io { .. } | ProvenanceError::Corrupt { .. } => {
            // The cause chain names the file and the OS error.
            ApiError::provenance("", e)
        }
    }
}

fn log_of(manager: &Manager) -> Result<ProvenanceLog, ApiError> {
    manager.provenance().cloned().ok_or_else(|| {
        ApiError::Conflict("weftd has no provenance log open (see its log for why)".into())
    })
}

/// Runs a blocking log call off the async threads.
pub async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ProvenanceError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ApiError::task("provenance task failed", e))?
        .map_err(env_error)
}

/// One page of `name`'s provenance records: a [`weft_api::provenance::Page`] as the API's JSON, at most
/// `max_bytes` of it (or one record larger than that).
pub async fn page(manager: &Manager, name: &str, q: PageQuery) -> Result<Vec<u8>, ApiError> {
    manager
        .catalog()
        .environment(name)
        .await?
        .ok_or_else(|| ApiError::NotFound(name.to_string()))?;
    let log = log_of(manager)?;
    if q.tail.is_some() && q.after_seq.is_some() {
        return Err(ApiError::BadRequest(
            "give either tail or after_seq, not both".into(),
        ));
    }
    let limit = q.limit.unwrap_or(usize::MAX);
    let budget = q.max_bytes.unwrap_or(DEFAULT_PAGE_BYTES);
    if !(MIN_PAGE_BYTES..=MAX_PAGE_BYTES).contains(&budget) {
        return Err(ApiError::BadRequest(format!(
            "max_bytes {budget} is out of range: give {MIN_PAGE_BYTES} to {MAX_PAGE_BYTES}"
        )));
    }
    let mut query = Query {
        from_us: q
            .from
            .as_deref()
            .map(|t| parse_time("from", t))
            .transpose()
            .map_err(ApiError::BadRequest)?,
        to_us: q
            .to
            .as_deref()
            .map(|t| parse_time("to", t))
            .transpose()
            .map_err(ApiError::BadRequest)?,
        after_seq: q.after_seq,
        key: q.key,
        collection: q.table,
        source: q.source,
        limit: None,
    };
    let vm = name.to_string();
    let tail = q.tail;
    // The log streams into the page, each record serialised as it comes and only its
    // JSON kept, until the byte budget: neither the answer nor weftd's memory grows
    // with what matches (a record's parsed values can take many times their text).
    blocking(move || {
        let last_seq = log.last_seq(&vm)?;
        if let Some(n) = tail {
            query.after_seq = Some(last_seq.saturating_sub(n));
        }
        let mut body = Vec::from(&b"{\"records\":["[..]);
        let mut count = 0usize;
        let mut last: Option<u64> = None;
        let mut more = false;
        let mut record = Vec::new();
        log.scan(&vm, &query, |r| {
            if count >= limit {
                more = true;
                return ControlFlow::Break(());
            }
            record.clear();
            // A RecordView always serialises (string keys, values parsed from JSON).
            let _ = serde_json::to_writer(&mut record, &RecordView::from(&r));
            if body.len() + 1 + record.len() + PAGE_TAIL > budget && count > 0 {
                more = true;
                return ControlFlow::Break(());
            }
            if count > 0 {
                body.push(b',');
            }
            body.extend_from_slice(&record);
            count += 1;
            last = Some(r.entry.seq);
            ControlFlow::Continue(())
        })?;
        let next_after_seq = if more { last } else { None };
        body.extend_from_slice(b"],\"last_seq\":");
        body.extend_from_slice(last_seq.to_string().as_bytes());
        body.extend_from_slice(b",\"next_after_seq\":");
        match next_after_seq {
            Some(n) => body.extend_from_slice(n.to_string().as_bytes()),
            None => body.extend_from_slice(b"null"),
        }
        body.push(b'}');
        Ok(body)
    })
    .await
}

/// Records that weave `weave` of `parent`, whose disks show the instant `taken_at`
/// (RFC 3339), starts with `parent`'s provenance up to that instant. Nothing to do
/// when weftd has no log.
pub async fn branch_weave(
    manager: &Manager,
    weave: &str,
    parent: &str,
    taken_at: &str,
) -> Result<(), ApiError> {
    let Some(log) = manager.provenance().cloned() else {
        return Ok(());
    };
    let until_us = parse_time("at", taken_at).map_err(ApiError::Internal)?;
    let (weave, parent) = (weave.to_string(), parent.to_string());
    blocking(move || log.branch(&weave, &parent, until_us)).await
}

/// Applies the retention rules every [`RETENTION_PERIOD`], forever (weftd aborts it).
pub async fn retention_task(log: ProvenanceLog) {
    let options = log.options();
    if options.retain_us.is_none() && options.retain_bytes == 0 {
        return;
    }
    loop {
        tokio::time::sleep(RETENTION_PERIOD).await;
        let l = log.clone();
        match blocking(move || l.enforce_retention()).await {
            Ok(r) if r.segments > 0 => {
                info!(
                    segments = r.segments,
                    bytes = r.bytes,
                    "provenance retention"
                )
            }
            Ok(_) => {}
            Err(e) => warn!(error = %e.one_line(), "provenance retention failed"),
        }
    }
}

/// Now, in µs since the Unix epoch (the host receive time of entries).
pub fn host_now_us() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_config_section_becomes_log_options() {
        use crate::config::Config;
        let c = Config::parse(
            "[provenance]\nsegment_mib = 8\nquota_mib = 100\nretain_days = 2\nretain_mib = 50\n",
            std::path::Path::new("x.toml"),
        )
        .unwrap();
        let o = c.provenance.log_options();
        assert_eq!(o.segment_bytes, 8 << 20);
        assert_eq!(o.quota_bytes, 100 << 20);
        assert_eq!(o.retain_us, Some(2 * 86_400_000_000));
        assert_eq!(o.retain_bytes, 50 << 20);
        assert_eq!(
            c.provenance_dir(),
            std::path::Path::new("/var/lib/weft/provenance")
        );
        let d = Config::default().provenance.log_options();
        assert_eq!(
            d,
            weft_provenance::log::LogOptions::default(),
            "the documented defaults agree"
        );
        for bad in [
            "[provenance]\nquota_mib = 10\n",
            "[provenance]\nsegment_mib = 0\n",
            "[provenance]\ncompression_level = 22\n",
        ] {
            assert!(
                Config::parse(bad, std::path::Path::new("x.toml")).is_err(),
                "{bad}"
            );
        }
    }
}
