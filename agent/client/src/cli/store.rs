//! `weft store`: the chunk store's statistics, verification, tiering and GC.

use clap::Subcommand;

use super::output::{print_json, print_report};
use super::CliError;
use crate::client::{Client, ClientError};

/// `weft store …`
#[derive(Debug, Subcommand)]
pub enum StoreCommand {
    /// Chunks and bytes per tier, logical bytes, indexes.
    Stats,
    /// Re-hash every chunk; name bad chunks and the snapshots they affect.
    Verify,
    /// Move chunks between the hot and cold tiers by age and access count.
    ///
    /// Example: weft store tier --cold-after 7d --promote-after 3
    Tier {
        /// Move a chunk cold after this long without a read (default 7d).
        #[arg(long, value_parser = humantime::parse_duration)]
        cold_after: Option<std::time::Duration>,
        /// A chunk read at least this often is "frequent" (default 8) …
        #[arg(long)]
        frequent_reads: Option<u32>,
        /// … and goes cold only after this long without a read (default 30d).
        #[arg(long, value_parser = humantime::parse_duration)]
        frequent_cold_after: Option<std::time::Duration>,
        /// Move a cold chunk back after this many cold reads (default 3).
        #[arg(long)]
        promote_after: Option<u32>,
    },
    /// Remove chunks no snapshot references (older than the grace period).
    Gc {
        /// Keep unreferenced chunks younger than this (e.g. 24h5m); must exceed the longest backup.
        #[arg(long, value_parser = humantime::parse_duration)]
        grace: Option<std::time::Duration>,
    },
}

/// Runs `weft store …`; a report that names bad or missing chunks is an error.
pub(super) async fn run(client: &Client, cmd: StoreCommand, json: bool) -> Result<(), CliError> {
    let report: serde_json::Value = match cmd {
        StoreCommand::Stats => client.get("/v1/store").await?,
        StoreCommand::Verify => {
            client
                .post("/v1/store/verify", &serde_json::json!({}))
                .await?
        }
        StoreCommand::Tier {
            cold_after,
            frequent_reads,
            frequent_cold_after,
            promote_after,
        } => {
            client
                .post(
                    "/v1/store/tier",
                    &serde_json::json!({
                        "cold_after_secs": cold_after.map(|d| d.as_secs()),
                        "frequent_reads": frequent_reads,
                        "frequent_cold_after_secs": frequent_cold_after.map(|d| d.as_secs()),
                        "promote_after_cold_reads": promote_after,
                    }),
                )
                .await?
        }
        StoreCommand::Gc { grace } => {
            client
                .post(
                    "/v1/store/gc",
                    &serde_json::json!({ "grace_secs": grace.map(|g| g.as_secs()) }),
                )
                .await?
        }
    };
    if json {
        print_json(&report);
    } else {
        print_report(&report);
    }
    let bad = report["bad_chunks"]
        .as_array()
        .is_some_and(|b| !b.is_empty())
        || report["missing_chunks"]
            .as_array()
            .is_some_and(|b| !b.is_empty())
        || report["bad_indexes"]
            .as_array()
            .is_some_and(|b| !b.is_empty());
    if bad {
        return Err(CliError::Client(ClientError::Api {
            status: hyper::StatusCode::CONFLICT,
            message: "the store has bad or missing chunks (listed above)".into(),
        }));
    }
    Ok(())
}
