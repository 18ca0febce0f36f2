//! `weft provenance` and `weft replay`: the data changes guests' DPAs recorded, and
//! application state rebuilt from them.

use std::path::PathBuf;

use clap::{Args, Subcommand};

use super::output::print_json;
use super::{absolute_opt, encode_query, env_path, CliError};
use crate::client::Client;

/// `weft provenance …`
#[derive(Debug, Subcommand)]
pub enum ProvenanceCommand {
    /// Show an environment's newest data changes, and with --follow the new ones as
    /// they arrive (--json prints one JSON object per line).
    ///
    /// Example: weft provenance tail web --follow
    Tail {
        /// Environment or weave name.
        env: String,
        /// How many of the newest changes to show first.
        #[arg(long, short = 'n', default_value_t = 20)]
        lines: u64,
        /// Keep showing new changes until interrupted.
        #[arg(long, short = 'f')]
        follow: bool,
    },
    /// Find data changes of an environment: by key, table, source and guest time. A
    /// weave's answer starts with its parent's changes up to the branch instant.
    ///
    /// Example: weft provenance query web --table customers --key '[123]' --from 2026-11-22T10:00:00Z
    Query {
        /// Environment or weave name.
        env: String,
        /// Only this key: a SQLite primary key as a JSON array (e.g. '[123]'), a JSON
        /// pointer (e.g. /features/beta) or a key-value key.
        #[arg(long)]
        key: Option<String>,
        /// Only this SQLite table.
        #[arg(long)]
        table: Option<String>,
        /// Only this source: the database, JSON file or key-value source's path in the guest.
        #[arg(long)]
        source: Option<String>,
        /// Guest time at or after (RFC 3339, e.g. 2026-11-22T10:00:00Z).
        #[arg(long)]
        from: Option<String>,
        /// Guest time at or before (RFC 3339).
        #[arg(long)]
        to: Option<String>,
        /// Most changes to show, oldest first (0: all).
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
}

/// Arguments of `weft replay`.
#[derive(Debug, Args)]
pub struct ReplayArgs {
    /// Environment or weave name.
    pub env: String,
    /// The instant (guest time, RFC 3339), or `now`.
    #[arg(long)]
    pub to: String,
    /// Keep only the items changed from this instant on (RFC 3339), each as it
    /// stood at --to.
    #[arg(long)]
    pub from: Option<String>,
    /// Write the state under this directory, mirroring the guest's paths (a
    /// SQLite database per database, the JSON documents, the key-value files).
    /// It must be inside one of weftd's `export_dirs` (`<data_dir>/exports` by
    /// default); files are written 0600, never through a symlink, and replace
    /// regular files of an earlier replay.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Push the state into this running weave's guest through its DPA, which
    /// makes (and records) the changes needed to reach it.
    #[arg(long)]
    pub into: Option<String>,
    /// With --into: push even though WEAVE is not a weave of ENV (another
    /// environment, its weave, ENV itself). Recorded in the audit log.
    #[arg(long, requires = "into")]
    pub force: bool,
    /// Start from the application files inside this disk snapshot (an id from
    /// `weft snapshot list`), then apply the log from shortly before it to --to.
    #[arg(long, conflicts_with = "from")]
    pub base: Option<i64>,
    /// With --base: how many seconds before the snapshot the log is applied again,
    /// to cover writes the guest had not yet written back to the disk.
    #[arg(long, requires = "base")]
    pub base_margin: Option<u64>,
}

/// Runs `weft provenance …`.
pub(super) async fn run(
    client: &Client,
    cmd: ProvenanceCommand,
    json: bool,
) -> Result<(), CliError> {
    use weft_api::provenance::{parse_time, Page, RecordView};
    let print = |env: &str, records: &[RecordView], lines: bool| {
        if json && lines {
            // JSON lines: one object per change, as they come.
            for r in records {
                if let Ok(s) = serde_json::to_string(r) {
                    println!("{s}");
                }
            }
        } else if json {
            print_json(&records);
        } else {
            for r in records {
                println!("{}", provenance_line(env, r));
            }
        }
    };
    match cmd {
        ProvenanceCommand::Tail { env, lines, follow } => {
            let base = format!("{}/provenance", env_path(&env)?);
            let page: Page = client.get(&format!("{base}?tail={lines}")).await?;
            if !json {
                println!("{}", provenance_header());
            }
            print(&env, &page.records, follow);
            if !follow {
                return Ok(());
            }
            let mut after = page.records.last().map_or(page.last_seq, |r| r.seq);
            loop {
                let page: Page = client.get(&format!("{base}?after_seq={after}")).await?;
                print(&env, &page.records, true);
                after = page.records.last().map_or(after, |r| r.seq);
                if page.next_after_seq.is_none() {
                    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                }
            }
        }
        ProvenanceCommand::Query {
            env,
            key,
            table,
            source,
            from,
            to,
            limit,
        } => {
            for (what, t) in [("from", &from), ("to", &to)] {
                if let Some(t) = t {
                    parse_time(what, t).map_err(CliError::Usage)?;
                }
            }
            let mut params = Vec::new();
            for (k, v) in [
                ("key", key),
                ("table", table),
                ("source", source),
                ("from", from),
                ("to", to),
            ] {
                if let Some(v) = v {
                    params.push(format!("{k}={}", encode_query(&v)));
                }
            }
            let base = format!("{}/provenance?{}", env_path(&env)?, params.join("&"));
            let want = if limit == 0 { usize::MAX } else { limit };
            let mut records: Vec<RecordView> = Vec::new();
            let mut after: Option<u64> = None;
            while records.len() < want {
                // weftd ends each page at its byte budget; the limit only says when to stop.
                let mut path = base.clone();
                if want != usize::MAX {
                    path.push_str(&format!("&limit={}", want - records.len()));
                }
                if let Some(a) = after {
                    path.push_str(&format!("&after_seq={a}"));
                }
                let page: Page = client.get(&path).await?;
                records.extend(page.records);
                match page.next_after_seq {
                    Some(n) => after = Some(n),
                    None => break,
                }
            }
            records.truncate(want);
            if !json {
                println!("{}", provenance_header());
            }
            print(&env, &records, false);
        }
    }
    Ok(())
}

fn provenance_header() -> String {
    format!(
        "{:>8}  {:<27}  {:<6} {:<6}  {}",
        "SEQ", "GUEST TIME", "TYPE", "OP", "WHERE  KEY  CHANGE"
    )
}

/// One change on one line: where, which key, and what it became.
fn provenance_line(env: &str, r: &weft_api::provenance::RecordView) -> String {
    fn short(v: &Option<serde_json::Value>) -> String {
        let text = v.as_ref().map(|v| v.to_string()).unwrap_or_default();
        if text.chars().count() > 60 {
            format!("{}…", text.chars().take(59).collect::<String>())
        } else {
            text
        }
    }
    let place = if r.collection.is_empty() {
        r.source.clone()
    } else {
        format!("{}:{}", r.source, r.collection)
    };
    let change = match r.op {
        weft_api::provenance::Operation::Insert => format!("+ {}", short(&r.new)),
        weft_api::provenance::Operation::Delete => format!("- {}", short(&r.old)),
        weft_api::provenance::Operation::Update => format!("{} → {}", short(&r.old), short(&r.new)),
        weft_api::provenance::Operation::Schema => short(&r.new),
    };
    let from = if r.vm != env {
        format!("  (from {})", r.vm)
    } else {
        String::new()
    };
    format!(
        "{:>8}  {:<27}  {:<6} {:<6}  {place}  {}  {change}{from}",
        r.seq,
        r.guest_time,
        r.data_type.as_str(),
        r.op.as_str(),
        r.key
    )
}

/// `weft replay`
pub(super) async fn replay(client: &Client, args: ReplayArgs, json: bool) -> Result<(), CliError> {
    let ReplayArgs {
        env,
        to,
        from,
        out,
        into,
        force,
        base,
        base_margin,
    } = args;
    let req = weft_api::provenance::ReplayRequest {
        to,
        from,
        out: absolute_opt(out).map_err(CliError::Usage)?,
        into,
        force,
        base,
        base_margin_secs: base_margin,
    };
    let report: weft_api::provenance::ReplayReport = client
        .post(&format!("{}/replay", env_path(&env)?), &req)
        .await?;
    if json {
        print_json(&report);
    } else {
        println!(
            "replayed {} entries of {} (last seq {}, {} skipped)",
            report.applied, report.env, report.last_seq, report.skipped
        );
        if let Some(id) = report.base {
            println!("  base: snapshot {id}");
            for (src, at) in &report.base_found {
                println!("    {src} found at {at}");
            }
        }
        for f in &report.files {
            println!("  wrote {f}");
        }
        if report.rows_skipped > 0 {
            println!(
                "  {} rows left out: their tables refused them (weftd's log says why)",
                report.rows_skipped
            );
        }
        if let Some(w) = &report.into {
            println!("  {w}: {} changes made", report.changes_made);
        }
    }
    Ok(())
}
