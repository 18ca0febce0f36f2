//! `weft snapshot` and `weft restore`: snapshots of an environment's resources, and
//! restoring a disk snapshot into an image.

use std::path::PathBuf;

use clap::{Args, Subcommand};

use super::output::{human_bytes, print_json, print_report, print_table};
use super::{encode_query, env_path, follow, CliError, KeepArgs};
use crate::client::{Client, ClientError};
use weft_api::job::Job;
use weft_api::snapshot::{CreateSnapshot, PruneRequest, RestoreRequest, Snapshot};

/// `weft snapshot …`
#[derive(Debug, Subcommand)]
pub enum SnapshotCommand {
    /// Snapshot resources of a running environment.
    ///
    /// Example: weft snapshot create web --resource all --category "security update"
    Create {
        /// Environment name.
        env: String,
        /// all, config, net or disk:<name>.
        #[arg(long, default_value = "all")]
        resource: String,
        /// Semantic category, e.g. "security update".
        #[arg(long)]
        category: Option<String>,
        /// Free text.
        #[arg(long)]
        note: Option<String>,
        /// Return at once with the job id instead of following its progress.
        #[arg(long)]
        detach: bool,
    },
    /// List complete snapshots of an environment.
    List {
        /// Environment name.
        env: String,
        /// Only this resource (config, net, disk:vda).
        #[arg(long)]
        resource: Option<String>,
        /// Taken at or after (RFC 3339, e.g. 2026-11-22T10:00:00Z).
        #[arg(long)]
        since: Option<String>,
        /// Taken at or before (RFC 3339).
        #[arg(long)]
        until: Option<String>,
        /// Only this category.
        #[arg(long)]
        category: Option<String>,
        /// Include pending and failed snapshots.
        #[arg(long)]
        all: bool,
    },
    /// Show one snapshot.
    Show {
        /// Snapshot id.
        id: i64,
    },
    /// Read a snapshot's chunks back and check its digest.
    Verify {
        /// Snapshot id.
        id: i64,
    },
    /// Delete a snapshot (its chunks are freed by `weft store gc`).
    Delete {
        /// Snapshot id.
        id: i64,
    },
    /// Remove snapshots a retention rule does not keep (the newest is always kept).
    ///
    /// Example: weft snapshot prune web --keep-last 3 --keep-daily 7 --keep-weekly 4
    Prune {
        /// Environment name.
        env: String,
        /// Only this resource (config, net, disk:vda); every resource when absent.
        #[arg(long)]
        resource: Option<String>,
        #[command(flatten)]
        keep: KeepArgs,
        /// Show what would be removed without removing it.
        #[arg(long)]
        dry_run: bool,
    },
}

/// Arguments of `weft restore`.
#[derive(Debug, Args)]
pub struct RestoreArgs {
    /// Snapshot id (see `weft snapshot list ENV`).
    pub snapshot: i64,
    /// The image to write, inside one of weftd's `export_dirs` (`<data_dir>/exports`
    /// by default); written 0600, never through a symlink; must not exist.
    #[arg(long)]
    pub output: PathBuf,
    /// Image format: raw (sparse) or qcow2 (zero chunks stay unallocated).
    #[arg(long, default_value = "raw")]
    pub format: String,
    /// Replace the file at --output if it is a regular file (never a symlink or
    /// directory).
    #[arg(long)]
    pub force: bool,
    /// Return at once with the job id instead of following its progress.
    #[arg(long)]
    pub detach: bool,
}

/// Runs `weft snapshot …` (`verify` of a damaged snapshot is an error).
pub(super) async fn run(client: &Client, cmd: SnapshotCommand, json: bool) -> Result<(), CliError> {
    match cmd {
        SnapshotCommand::Create {
            env,
            resource,
            category,
            note,
            detach,
        } => {
            let path = format!("{}/snapshots", env_path(&env)?);
            let job: Job = client
                .post(
                    &path,
                    &CreateSnapshot {
                        resource: Some(resource),
                        category,
                        note,
                    },
                )
                .await?;
            follow(client, job, detach, json).await?;
        }
        SnapshotCommand::List {
            env,
            resource,
            since,
            until,
            category,
            all,
        } => {
            let mut query = Vec::new();
            for (k, v) in [
                ("resource", resource),
                ("since", since),
                ("until", until),
                ("category", category),
            ] {
                if let Some(v) = v {
                    query.push(format!("{k}={}", encode_query(&v)));
                }
            }
            if all {
                query.push("all=true".into());
            }
            let path = format!("{}/snapshots?{}", env_path(&env)?, query.join("&"));
            let list: Vec<Snapshot> = client.get(&path).await?;
            if json {
                print_json(&list);
            } else {
                let rows = list
                    .iter()
                    .map(|s| {
                        vec![
                            s.id.to_string(),
                            s.taken_at.clone(),
                            s.resource.clone(),
                            s.kind.as_str().into(),
                            s.state.as_str().into(),
                            s.size.map(human_bytes).unwrap_or_else(|| "-".into()),
                            s.bytes_new.map(human_bytes).unwrap_or_else(|| "-".into()),
                            s.category.clone().unwrap_or_default(),
                            s.actor.clone(),
                        ]
                    })
                    .collect();
                print_table(
                    &[
                        "ID", "TAKEN", "RESOURCE", "KIND", "STATE", "SIZE", "NEW", "CATEGORY",
                        "ACTOR",
                    ],
                    rows,
                );
            }
        }
        SnapshotCommand::Show { id } => {
            let s: Snapshot = client.get(&format!("/v1/snapshots/{id}")).await?;
            if json {
                print_json(&s);
            } else {
                print_report(&serde_json::to_value(&s).unwrap_or_default());
            }
        }
        SnapshotCommand::Verify { id } => {
            let r: serde_json::Value = client
                .post(
                    &format!("/v1/snapshots/{id}/verify"),
                    &serde_json::json!({}),
                )
                .await?;
            if json {
                print_json(&r);
            } else {
                print_report(&r);
            }
            if r["ok"] != true {
                return Err(CliError::Client(ClientError::Api {
                    status: hyper::StatusCode::CONFLICT,
                    message: format!("snapshot {id} is damaged (see above)"),
                }));
            }
        }
        SnapshotCommand::Prune {
            env,
            resource,
            keep,
            dry_run,
        } => {
            let report: serde_json::Value = client
                .post(
                    &format!("{}/snapshots/prune", env_path(&env)?),
                    &PruneRequest {
                        resource,
                        keep: keep.into(),
                        dry_run,
                    },
                )
                .await?;
            if json {
                print_json(&report);
            } else {
                let rows = report["resources"]
                    .as_object()
                    .map(|m| {
                        m.iter()
                            .map(|(r, v)| {
                                vec![r.clone(), v["kept"].to_string(), v["removed"].to_string()]
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                print_table(
                    &[
                        "RESOURCE",
                        "KEPT",
                        if dry_run { "WOULD REMOVE" } else { "REMOVED" },
                    ],
                    rows,
                );
            }
        }
        SnapshotCommand::Delete { id } => {
            client.delete(&format!("/v1/snapshots/{id}")).await?;
            if json {
                print_json(&serde_json::json!({ "deleted": id }));
            } else {
                println!("deleted snapshot {id}");
            }
        }
    }
    Ok(())
}

/// `weft restore`
pub(super) async fn restore(
    client: &Client,
    args: RestoreArgs,
    json: bool,
) -> Result<(), CliError> {
    let RestoreArgs {
        snapshot,
        output,
        format,
        force,
        detach,
    } = args;
    let output = std::path::absolute(&output)
        .map_err(|e| CliError::Usage(format!("--output {}: {e}", output.display())))?;
    let job: Job = client
        .post(
            &format!("/v1/snapshots/{snapshot}/restore"),
            &RestoreRequest {
                output,
                format: Some(format),
                force,
            },
        )
        .await?;
    follow(client, job, detach, json).await?;
    Ok(())
}
