//! The `weft` command line: a thin client of weftd's API.
//!
//! This module holds the [`Cli`] type, the dispatch of its top-level commands, the exit
//! codes and the helpers every command shares (request paths, shared argument parsers,
//! following a job); printing lives in `output`. Each top-level command group has its own
//! module, which uses these helpers and no other group's module.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

use crate::client::{Client, ClientError};
use weft_api::job::{Job, JobState};
use weft_api::net::Egress;
use weft_api::snapshot::Keep;
use weft_api::{API_SOCKET_NAME, DEFAULT_RUN_DIR};

mod audit;
mod compositions;
mod daemon;
mod env;
mod jobs;
mod output;
mod policy;
mod provenance;
mod snapshots;
mod store;
mod weaves;

pub use audit::{AuditArgs, AuditCommand};
pub use compositions::ComposeCommand;
pub use env::{parse_accel, parse_cidr, parse_disk, parse_nic, CreateArgs, EnvCommand};
pub use jobs::JobCommand;
pub use policy::PolicyCommand;
pub use provenance::{ProvenanceCommand, ReplayArgs};
pub use snapshots::{RestoreArgs, SnapshotCommand};
pub use store::StoreCommand;
pub use weaves::{parse_percent, WeaveCommand};

use output::{job_row, print_json, print_table, JOB_HEADERS};

/// Exit code: weftd refused or failed the request.
pub const EXIT_FAILED: u8 = 1;
/// Exit code: bad command line (clap's own).
pub const EXIT_USAGE: u8 = 2;
/// Exit code: weftd could not be reached.
pub const EXIT_UNREACHABLE: u8 = 3;

/// weft: record a VM's resources over time and weave new environments from that history.
#[derive(Debug, Parser)]
#[command(name = "weft", version, about, propagate_version = true)]
pub struct Cli {
    /// weftd's API socket.
    #[arg(long, global = true, env = "WEFT_SOCKET", default_value_os_t = default_socket())]
    pub socket: PathBuf,
    /// Print JSON instead of tables (for scripts).
    #[arg(long, global = true)]
    pub json: bool,
    /// Who is acting, for the audit log (the socket's user is always recorded too).
    #[arg(long, global = true, env = "WEFT_ACTOR")]
    pub actor: Option<String>,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

fn default_socket() -> PathBuf {
    Path::new(DEFAULT_RUN_DIR).join(API_SOCKET_NAME)
}

/// Top-level commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Show weftd's version, uptime and environment counts.
    Status,
    /// Show who weftd sees on its socket: user, uid, groups, and the role they hold
    /// (reader, operator or admin; see [roles] in weftd.toml).
    Whoami,
    /// Manage environments (VMs weft records).
    #[command(subcommand)]
    Env(EnvCommand),
    /// Snapshots of environment resources (disks, configuration).
    #[command(subcommand)]
    Snapshot(SnapshotCommand),
    /// Restore a disk snapshot into a new image, exactly as the disk was.
    ///
    /// Example: weft restore 42 --output /srv/restore/web-vda.img
    Restore(RestoreArgs),
    /// Weaves: isolated, running branches of an environment.
    #[command(subcommand)]
    Weave(WeaveCommand),
    /// Temporal compositions: each resource from its own point in history.
    #[command(subcommand)]
    Compose(ComposeCommand),
    /// Snapshot schedules with retention, run by weftd.
    #[command(subcommand)]
    Policy(PolicyCommand),
    /// Long operations (snapshots, restores) and their progress.
    #[command(subcommand)]
    Job(JobCommand),
    /// The chunk store holding disk snapshots.
    #[command(subcommand)]
    Store(StoreCommand),
    /// Data changes guests' DPAs recorded (the provenance log), for audits.
    #[command(subcommand)]
    Provenance(ProvenanceCommand),
    /// Rebuild an environment's application state (SQLite databases, JSON and
    /// key-value files its DPA captures) as of an instant, from its provenance log:
    /// into files (--out), or pushed into a running weave's guest (--into).
    ///
    /// Example: weft replay web --to 2026-11-22T10:00:00Z --out /srv/replay/web
    Replay(ReplayArgs),
    /// Show the audit log (who changed what, when, with what result), or verify it.
    #[command(args_conflicts_with_subcommands = true)]
    Audit(AuditArgs),
}

/// Parses the command line like `Parser::parse`, but reports a bad command line
/// as one line (`<bin>: <reason>`, exit code 2) instead of clap's multi-line
/// usage text; `--help` and `--version` print as usual.
pub fn parse_args_or_exit<P: Parser>(bin: &str) -> P {
    match P::try_parse() {
        Ok(parsed) => parsed,
        Err(e) => {
            use clap::error::ErrorKind;
            if matches!(
                e.kind(),
                ErrorKind::DisplayHelp
                    | ErrorKind::DisplayVersion
                    | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
            ) {
                e.exit();
            }
            eprintln!("{bin}: {} (see {bin} --help)", one_line_clap_error(&e));
            std::process::exit(i32::from(EXIT_USAGE));
        }
    }
}

/// The first line of a clap error without its `error: ` prefix.
fn one_line_clap_error(e: &clap::Error) -> String {
    let text = e.render().to_string();
    let first = text.lines().next().unwrap_or("bad command line");
    first.trim_start_matches("error: ").trim().to_string()
}

/// Runs the CLI; returns the process exit code.
pub async fn run(cli: Cli) -> ExitCode {
    let json = cli.json;
    let client = Client::new(&cli.socket).with_actor(cli.actor.clone());
    match dispatch(&client, cli.command, json).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(CliError::Usage(msg)) => {
            eprintln!("weft: {msg}");
            ExitCode::from(EXIT_USAGE)
        }
        Err(CliError::Failed(msg)) => {
            eprintln!("weft: {msg}");
            ExitCode::from(EXIT_FAILED)
        }
        Err(CliError::Client(e)) => {
            eprintln!("weft: {e}");
            match e {
                ClientError::Unreachable { .. } => ExitCode::from(EXIT_UNREACHABLE),
                _ => ExitCode::from(EXIT_FAILED),
            }
        }
    }
}

/// Why a command failed; [`run`] maps each to its exit code.
enum CliError {
    /// A bad argument the command line parser could not see (exit code 2).
    Usage(String),
    /// The request worked and its answer is a failure (e.g. a verification).
    Failed(String),
    /// weftd refused or failed the request, or could not be reached (exit code 3).
    Client(ClientError),
}

impl From<ClientError> for CliError {
    fn from(e: ClientError) -> Self {
        CliError::Client(e)
    }
}

async fn dispatch(client: &Client, command: Command, json: bool) -> Result<(), CliError> {
    match command {
        Command::Status => daemon::status(client, json).await,
        Command::Whoami => daemon::whoami(client, json).await,
        Command::Env(cmd) => env::run(client, cmd, json).await,
        Command::Snapshot(cmd) => snapshots::run(client, cmd, json).await,
        Command::Restore(args) => snapshots::restore(client, args, json).await,
        Command::Weave(cmd) => weaves::run(client, cmd, json).await,
        Command::Compose(cmd) => compositions::run(client, cmd, json).await,
        Command::Policy(cmd) => policy::run(client, cmd, json).await,
        Command::Job(cmd) => jobs::run(client, cmd, json).await,
        Command::Store(cmd) => store::run(client, cmd, json).await,
        Command::Provenance(cmd) => provenance::run(client, cmd, json).await,
        Command::Replay(args) => provenance::replay(client, args, json).await,
        Command::Audit(args) => audit::run(client, args, json).await,
    }
}

// Helpers shared by the command groups.

/// The API path of an environment by name; a bad name is a usage error.
fn env_path(name: &str) -> Result<String, CliError> {
    weft_api::names::check_env_name(name).map_err(|e| CliError::Usage(e.to_string()))?;
    Ok(format!("/v1/environments/{name}"))
}

/// Percent-encodes a query value.
fn encode_query(v: &str) -> String {
    v.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' | b':' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Makes an optional path absolute (weftd does not share the CLI's working directory).
fn absolute_opt(p: Option<PathBuf>) -> Result<Option<PathBuf>, String> {
    p.map(|p| std::path::absolute(&p).map_err(|e| format!("{}: {e}", p.display())))
        .transpose()
}

/// Parses `512M`, `1G`, `2048` (MiB) into MiB.
pub fn parse_memory_mib(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (digits, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("{s:?} is not a size; use e.g. 512M or 2G"))?;
    let mib = match unit.to_ascii_uppercase().as_str() {
        "" | "M" | "MB" | "MIB" => Some(n),
        "G" | "GB" | "GIB" => n.checked_mul(1024),
        "T" | "TB" | "TIB" => n.checked_mul(1024 * 1024),
        _ => return Err(format!("{s:?}: unknown unit; use M or G")),
    };
    match mib {
        Some(m) if m > 0 => Ok(m),
        _ => Err(format!("{s:?} is out of range")),
    }
}

/// Parses an egress policy: none, internet or all.
pub fn parse_egress(s: &str) -> Result<Egress, String> {
    s.parse()
}

/// Retention rules (a snapshot kept by any rule stays).
#[derive(Debug, Clone, Copy, Args)]
pub struct KeepArgs {
    /// Keep the newest N.
    #[arg(long, default_value_t = 0)]
    pub keep_last: u32,
    /// Keep the newest of each of the newest N hours.
    #[arg(long, default_value_t = 0)]
    pub keep_hourly: u32,
    /// Keep the newest of each of the newest N days.
    #[arg(long, default_value_t = 0)]
    pub keep_daily: u32,
    /// Keep the newest of each of the newest N ISO weeks.
    #[arg(long, default_value_t = 0)]
    pub keep_weekly: u32,
    /// Keep the newest of each of the newest N months.
    #[arg(long, default_value_t = 0)]
    pub keep_monthly: u32,
}

impl From<KeepArgs> for Keep {
    fn from(k: KeepArgs) -> Keep {
        Keep {
            last: k.keep_last,
            hourly: k.keep_hourly,
            daily: k.keep_daily,
            weekly: k.keep_weekly,
            monthly: k.keep_monthly,
        }
    }
}

/// Follows a job with a progress bar until it ends (or prints it at once when detached);
/// a failed job is an error.
async fn follow(client: &Client, mut job: Job, detach: bool, json: bool) -> Result<(), CliError> {
    if !detach && job.state == JobState::Running {
        let bar = (!json).then(|| {
            let bar = indicatif::ProgressBar::new(0);
            bar.set_style(
                indicatif::ProgressStyle::with_template(
                    "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
                )
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
                .progress_chars("=> "),
            );
            bar.set_message(format!("job {} {} {}", job.id, job.kind, job.target));
            bar
        });
        while job.state == JobState::Running {
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            job = client.get(&format!("/v1/jobs/{}", job.id)).await?;
            if let Some(bar) = &bar {
                bar.set_length(job.total_bytes);
                bar.set_position(job.done_bytes);
            }
        }
        if let Some(bar) = bar {
            bar.finish_and_clear();
        }
    }
    if json {
        print_json(&job);
    } else {
        print_table(&JOB_HEADERS, vec![job_row(&job)]);
        if let Some(result) = &job.result {
            println!("result: {result}");
        }
    }
    if job.state == JobState::Failed {
        return Err(CliError::Client(ClientError::Api {
            status: hyper::StatusCode::INTERNAL_SERVER_ERROR,
            message: format!(
                "job {} failed: {}",
                job.id,
                job.error.as_deref().unwrap_or("no reason recorded")
            ),
        }));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_sizes() {
        assert_eq!(parse_memory_mib("512M"), Ok(512));
        assert_eq!(parse_memory_mib("512"), Ok(512));
        assert_eq!(parse_memory_mib("2G"), Ok(2048));
        assert_eq!(parse_memory_mib("1gib"), Ok(1024));
        assert!(parse_memory_mib("0").is_err());
        assert!(parse_memory_mib("lots").is_err());
        assert!(parse_memory_mib("5X").is_err());
        assert!(parse_memory_mib("99999999999999999999G").is_err());
    }

    #[test]
    fn clap_errors_become_one_line() {
        let e =
            Cli::try_parse_from(["weft", "env", "create", "x", "--memory", "lots"]).unwrap_err();
        let line = one_line_clap_error(&e);
        assert!(!line.contains('\n'));
        assert!(line.contains("--memory"), "{line}");
        assert!(!line.starts_with("error"), "{line}");
    }
}
