//! `weft policy`: snapshot schedules with retention.

use clap::Subcommand;

use super::output::{print_json, print_table};
use super::{encode_query, env_path, CliError, KeepArgs};
use crate::client::Client;
use weft_api::policy::{Policy, SetPolicy};

/// `weft policy …`
#[derive(Debug, Subcommand)]
pub enum PolicyCommand {
    /// Snapshot a resource on a schedule and apply retention after each run.
    ///
    /// Example: weft policy set web --resource all --every 15m --keep-last 8 --keep-daily 7
    Set {
        /// Environment name.
        env: String,
        /// all, config, net or disk:<name>.
        #[arg(long, default_value = "all")]
        resource: String,
        /// Interval, e.g. 15m, 1h, 1d.
        #[arg(long, value_parser = humantime::parse_duration)]
        every: std::time::Duration,
        /// Category given to the snapshots.
        #[arg(long)]
        category: Option<String>,
        #[command(flatten)]
        keep: KeepArgs,
    },
    /// List policies with their last result and next run.
    List {
        /// Only this environment's.
        env: Option<String>,
    },
    /// Remove a policy (its snapshots stay).
    Delete {
        /// Environment name.
        env: String,
        /// all, config, net or disk:<name>.
        #[arg(long, default_value = "all")]
        resource: String,
    },
}

/// Runs `weft policy …`.
pub(super) async fn run(client: &Client, cmd: PolicyCommand, json: bool) -> Result<(), CliError> {
    let print = |list: &[Policy]| {
        if json {
            print_json(&list);
            return;
        }
        let rows = list
            .iter()
            .map(|p| {
                vec![
                    p.env.clone(),
                    p.resource.clone(),
                    humantime::format_duration(std::time::Duration::from_secs(p.every_secs))
                        .to_string(),
                    serde_json::to_string(&p.keep).unwrap_or_default(),
                    p.next_run.clone(),
                    p.last_result.clone().unwrap_or_else(|| "-".into()),
                    p.failures.to_string(),
                ]
            })
            .collect();
        print_table(
            &[
                "ENV",
                "RESOURCE",
                "EVERY",
                "KEEP",
                "NEXT RUN",
                "LAST RESULT",
                "FAILURES",
            ],
            rows,
        );
    };
    match cmd {
        PolicyCommand::Set {
            env,
            resource,
            every,
            category,
            keep,
        } => {
            let policy: Policy = client
                .request_json(
                    hyper::Method::PUT,
                    &format!("{}/policies", env_path(&env)?),
                    &SetPolicy {
                        resource,
                        every_secs: every.as_secs().max(1),
                        category,
                        keep: keep.into(),
                    },
                )
                .await?;
            print(&[policy]);
        }
        PolicyCommand::List { env } => {
            let path = match env {
                Some(e) => format!("/v1/policies?env={}", encode_query(&e)),
                None => "/v1/policies".into(),
            };
            let list: Vec<Policy> = client.get(&path).await?;
            print(&list);
        }
        PolicyCommand::Delete { env, resource } => {
            client
                .delete(&format!(
                    "{}/policies/{}",
                    env_path(&env)?,
                    encode_query(&resource)
                ))
                .await?;
            if !json {
                println!("deleted the {resource} policy of {env}");
            }
        }
    }
    Ok(())
}
