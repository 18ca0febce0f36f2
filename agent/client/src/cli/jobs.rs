//! `weft job`: long operations and their progress.

use clap::Subcommand;

use super::output::{job_row, print_json, print_table, JOB_HEADERS};
use super::{follow, CliError};
use crate::client::Client;
use weft_api::job::Job;

/// `weft job …`
#[derive(Debug, Subcommand)]
pub enum JobCommand {
    /// List the newest jobs.
    List {
        /// How many.
        #[arg(long, default_value_t = 20)]
        limit: u32,
    },
    /// Show one job, or follow it with --wait.
    Show {
        /// Job id.
        id: i64,
        /// Follow the job's progress until it ends.
        #[arg(long)]
        wait: bool,
    },
}

/// Runs `weft job …`.
pub(super) async fn run(client: &Client, cmd: JobCommand, json: bool) -> Result<(), CliError> {
    match cmd {
        JobCommand::List { limit } => {
            let jobs: Vec<Job> = client.get(&format!("/v1/jobs?limit={limit}")).await?;
            if json {
                print_json(&jobs);
            } else {
                let rows = jobs.iter().map(job_row).collect();
                print_table(&JOB_HEADERS, rows);
            }
        }
        JobCommand::Show { id, wait } => {
            let job: Job = client.get(&format!("/v1/jobs/{id}")).await?;
            follow(client, job, !wait, json).await?;
        }
    }
    Ok(())
}
