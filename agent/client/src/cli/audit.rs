//! `weft audit`: the audit log and its verification.

use clap::{Args, Subcommand};

use super::output::{print_json, print_table};
use super::CliError;
use crate::client::Client;
use weft_api::audit::AuditEntry;

/// Arguments of `weft audit`.
#[derive(Debug, Args)]
pub struct AuditArgs {
    /// How many of the newest records to show.
    #[arg(long, default_value_t = 20)]
    pub limit: u32,
    #[command(subcommand)]
    pub command: Option<AuditCommand>,
}

/// `weft audit …`
#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// Recompute the audit log's hash chain: exits 1 and names the entries when any
    /// entry was edited or deleted.
    Verify,
}

/// Runs `weft audit` and `weft audit verify` (exit code 1 when the chain does not verify).
pub(super) async fn run(client: &Client, args: AuditArgs, json: bool) -> Result<(), CliError> {
    match args.command {
        Some(AuditCommand::Verify) => {
            let v: weft_api::audit::AuditVerify = client.get("/v1/audit/verify").await?;
            if json {
                print_json(&v);
            } else if v.ok {
                match &v.last {
                    Some((id, hash)) => println!(
                        "audit log ok: {} entries, chain head {id} {hash}",
                        v.entries
                    ),
                    None => println!("audit log ok: empty"),
                }
            } else {
                for p in &v.problems {
                    println!("{p}");
                }
            }
            if !v.ok {
                return Err(CliError::Failed(format!(
                    "the audit log does not verify: {} problem(s)",
                    v.problems.len()
                )));
            }
        }
        None => {
            let path = format!("/v1/audit?limit={}", args.limit);
            let log: Vec<AuditEntry> = client.get(&path).await?;
            if json {
                print_json(&log);
            } else {
                let rows = log
                    .iter()
                    .map(|e| {
                        vec![
                            e.id.to_string(),
                            e.at.clone(),
                            e.actor.clone(),
                            e.action.clone(),
                            e.target.clone().unwrap_or_default(),
                            e.result.clone(),
                        ]
                    })
                    .collect();
                print_table(&["ID", "TIME", "ACTOR", "ACTION", "TARGET", "RESULT"], rows);
            }
        }
    }
    Ok(())
}
