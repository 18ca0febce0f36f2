//! `weft weave`: weaves, their limits, volume sync, egress and routes.

use clap::Subcommand;

use super::output::{print_env, print_json, print_net, print_report, print_table};
use super::{env_path, parse_egress, parse_memory_mib, CliError};
use crate::client::Client;
use weft_api::env::EnvironmentView;
use weft_api::net::{Egress, EgressRequest, NetSetup};
use weft_api::weave::{CreateWeave, Source, Weave};

/// `weft weave …`
#[derive(Debug, Subcommand)]
pub enum WeaveCommand {
    /// Branch an environment into a running weave: from now (default), a snapshot or a
    /// past instant. Its disks are overlays; it runs in its own network namespace.
    ///
    /// Example: weft weave create web --at 2026-11-21T18:00:00Z --name before
    Create {
        /// Environment name.
        env: String,
        /// Branch from the newest snapshots at or before this instant (RFC 3339).
        #[arg(long, conflicts_with = "snapshot")]
        at: Option<String>,
        /// Branch from the instant of this snapshot.
        #[arg(long)]
        snapshot: Option<i64>,
        /// Weave name (1-10 characters); w<index> by default.
        #[arg(long)]
        name: Option<String>,
        /// Serve the disks live from the chunk store through weft-blk (with --at or
        /// --snapshot): nothing is restored first.
        #[arg(long)]
        live: bool,
        /// What the guest may open connections to: none (not the host, other weaves
        /// or any network), internet (public addresses only) or all. Connections
        /// routed to it work under every policy.
        #[arg(long, default_value = "none", value_parser = parse_egress)]
        egress: Egress,
    },
    /// List the weaves of an environment.
    List {
        /// Environment name.
        env: String,
    },
    /// Show one weave.
    Show {
        /// Weave name.
        weave: String,
        /// Show where each resource came from (snapshot, instant, or per slot range
        /// of a merged disk).
        #[arg(long)]
        sources: bool,
    },
    /// Stop a weave's QEMU (its disks and network stay).
    Stop {
        /// Weave name.
        weave: String,
    },
    /// Start a stopped weave.
    Start {
        /// Weave name.
        weave: String,
    },
    /// Change a weave's CPU and memory limits while it runs.
    ///
    /// The limits are its cgroup's; a limit left out is removed. Where the weave's
    /// QEMU has a balloon device (the default) the guest is also asked, through the
    /// balloon, to keep only the memory limit (at most its configured memory); `weft
    /// weave show` reports the target and the guest's memory as it follows.
    ///
    /// Example: weft weave limits w1 --cpu 50% --memory 256M
    Limits {
        /// Weave name.
        weave: String,
        /// CPU time in percent of one CPU (e.g. 50% or 150%).
        #[arg(long, value_parser = parse_percent)]
        cpu: Option<u32>,
        /// Memory limit: 256M, 1G.
        #[arg(long, value_parser = parse_memory_mib)]
        memory: Option<u64>,
    },
    /// Copy into DST the blocks of a volume that SRC changed since their common base.
    ///
    /// Both are paused during the copy; DST's guest is then reset so that it reads the
    /// synced volume afresh (--no-reset only resumes it). Ranges changed on both sides
    /// refuse the sync, listed, unless --prefer names the side that wins.
    ///
    /// Example: weft weave sync w1 w2 --volume vda --prefer src
    Sync {
        /// The weave whose changes are copied.
        src: String,
        /// The weave that receives them (never an environment).
        dst: String,
        /// The volume (disk name), e.g. vda.
        #[arg(long)]
        volume: String,
        /// Which side wins ranges both changed: src or dst.
        #[arg(long, value_parser = ["src", "dst"])]
        prefer: Option<String>,
        /// Resume DST's guest without resetting it.
        #[arg(long)]
        no_reset: bool,
    },
    /// Change what a weave's guest may open connections to, while it runs or not.
    ///
    /// none: nothing (not the host, other weaves or any network); internet: public
    /// addresses only (not the host, other weaves, 10/8, 172.16/12, 192.168/16,
    /// 100.64/10, 169.254/16, fc00::/7, fe80::/10); all: everything, the host
    /// included. Connections routed to the guest and DHCP work under every policy.
    ///
    /// Example: weft weave egress w1 internet
    Egress {
        /// Weave name.
        weave: String,
        /// none, internet or all.
        #[arg(value_parser = parse_egress)]
        policy: Egress,
    },
    /// Route new connections to a host port to the weave's guest port.
    ///
    /// Example: weft weave route w1 --guest-port 80 --host-port 8080
    Route {
        /// Weave name.
        weave: String,
        /// Port of the guest.
        #[arg(long)]
        guest_port: u16,
        /// Port on the host (default: the guest port).
        #[arg(long)]
        host_port: Option<u16>,
    },
    /// Move every host port of the environment (published with `weft env expose`, or
    /// routed to any of its weaves) to this weave, in one nftables transaction: new
    /// connections go to it, established ones finish where they started. `weft env
    /// activate ENV` sends the published ones back.
    Activate {
        /// Weave name.
        weave: String,
    },
    /// Delete a weave: its QEMU, namespace, routes, cgroups and overlays. Refused for an
    /// environment that is not a weave.
    Delete {
        /// Weave name.
        weave: String,
    },
}

/// Parses `50%` or `50` into 50.
pub fn parse_percent(s: &str) -> Result<u32, String> {
    let n: u32 = s
        .trim()
        .trim_end_matches('%')
        .parse()
        .map_err(|_| format!("{s:?} is not a percentage; use e.g. 50%"))?;
    if n == 0 || n > 100 * 64 {
        return Err(format!("{s:?} is out of range (1% to 6400%)"));
    }
    Ok(n)
}

fn weave_path(name: &str) -> Result<String, CliError> {
    weft_api::names::check_weave_name(name).map_err(|e| CliError::Usage(e.to_string()))?;
    Ok(format!("/v1/weaves/{name}"))
}

fn print_weaves(list: &[Weave], json: bool) {
    if json {
        print_json(&list);
        return;
    }
    let rows = list
        .iter()
        .map(|w| {
            let env = w.env.as_ref();
            vec![
                w.name.clone(),
                w.parent.clone(),
                w.source.clone(),
                w.taken_at.clone(),
                env.map(|e| e.state.as_str().to_string())
                    .unwrap_or_else(|| "-".into()),
                env.and_then(|e| e.pid)
                    .map(|p| p.to_string())
                    .unwrap_or_else(|| "-".into()),
                format!("weft-{}", w.name),
            ]
        })
        .collect();
    print_table(
        &["WEAVE", "ENV", "SOURCE", "INSTANT", "STATE", "PID", "NETNS"],
        rows,
    );
}

/// Runs `weft weave …`.
pub(super) async fn run(client: &Client, cmd: WeaveCommand, json: bool) -> Result<(), CliError> {
    match cmd {
        WeaveCommand::Create {
            env,
            at,
            snapshot,
            name,
            live,
            egress,
        } => {
            let source = match (at, snapshot) {
                (Some(t), _) => Source::At(t),
                (None, Some(id)) => Source::Snapshot(id),
                (None, None) => Source::Now,
            };
            let w: Weave = client
                .post(
                    &format!("{}/weaves", env_path(&env)?),
                    &CreateWeave {
                        name,
                        source: Some(source),
                        live,
                        egress,
                    },
                )
                .await?;
            print_weaves(&[w], json);
        }
        WeaveCommand::List { env } => {
            let list: Vec<Weave> = client.get(&format!("{}/weaves", env_path(&env)?)).await?;
            print_weaves(&list, json);
        }
        WeaveCommand::Show {
            weave,
            sources: true,
        } => {
            let rows: Vec<weft_api::weave::SourceRow> = client
                .get(&format!("{}/sources", weave_path(&weave)?))
                .await?;
            if json {
                print_json(&rows);
            } else {
                let rows = rows
                    .iter()
                    .map(|r| {
                        vec![
                            r.resource.clone(),
                            r.part.clone(),
                            r.snapshot.map(|s| s.to_string()).unwrap_or_default(),
                            r.instant.clone().unwrap_or_default(),
                            r.detail.clone().unwrap_or_default(),
                        ]
                    })
                    .collect();
                print_table(&["RESOURCE", "PART", "SNAPSHOT", "INSTANT", "DETAIL"], rows);
            }
        }
        WeaveCommand::Show { weave, .. } => {
            let w: Weave = client.get(&weave_path(&weave)?).await?;
            if json {
                print_json(&w);
            } else {
                print_report(&serde_json::to_value(&w).unwrap_or_default());
            }
        }
        WeaveCommand::Stop { weave } => {
            let env: EnvironmentView = client
                .post(
                    &format!("{}/stop", weave_path(&weave)?),
                    &serde_json::json!({}),
                )
                .await?;
            print_env(&env, json);
        }
        WeaveCommand::Start { weave } => {
            let env: EnvironmentView = client
                .post(
                    &format!("{}/start", weave_path(&weave)?),
                    &serde_json::json!({}),
                )
                .await?;
            print_env(&env, json);
        }
        WeaveCommand::Sync {
            src,
            dst,
            volume,
            prefer,
            no_reset,
        } => {
            let prefer = match prefer.as_deref() {
                Some("src") => Some(weft_api::weave::Prefer::Src),
                Some("dst") => Some(weft_api::weave::Prefer::Dst),
                _ => None,
            };
            // Both are weaves: a bad name is reported as a weave name, before weftd.
            let path = format!("{}/sync", weave_path(&src)?);
            weave_path(&dst)?;
            let r: weft_api::weave::SyncReport = client
                .post(
                    &path,
                    &weft_api::weave::SyncRequest {
                        dst,
                        volume,
                        prefer,
                        reset: !no_reset,
                    },
                )
                .await?;
            if json {
                print_json(&r);
            } else {
                println!(
                    "synced {} from {} into {}: {} bytes copied ({} changed in {}, {} in {}, {} conflicting range(s) of {} bytes{}), base {}{}",
                    r.volume,
                    r.src,
                    r.dst,
                    r.copied_bytes,
                    r.src_changed_bytes,
                    r.src,
                    r.dst_changed_bytes,
                    r.dst,
                    r.conflicts.len(),
                    r.conflict_bytes,
                    match r.prefer {
                        Some(weft_api::weave::Prefer::Src) => ", src won",
                        Some(weft_api::weave::Prefer::Dst) => ", dst kept its own",
                        None => "",
                    },
                    r.base,
                    if r.reset { "; destination reset" } else { "" }
                );
            }
        }
        WeaveCommand::Egress { weave, policy } => {
            let setup: NetSetup = client
                .post(
                    &format!("{}/egress", weave_path(&weave)?),
                    &EgressRequest { egress: policy },
                )
                .await?;
            print_net(&setup, json);
        }
        WeaveCommand::Limits { weave, cpu, memory } => {
            let w: Weave = client
                .post(
                    &format!("{}/limits", weave_path(&weave)?),
                    &weft_api::env::Limits {
                        cpu_percent: cpu,
                        memory_mib: memory,
                    },
                )
                .await?;
            if json {
                print_json(&w);
            } else {
                match &w.balloon {
                    Some(b) => println!(
                        "limits of {} set; balloon target {} MiB (the guest has {} MiB now)",
                        w.name, b.target_mib, b.actual_mib
                    ),
                    None => println!("limits of {} set", w.name),
                }
            }
        }
        WeaveCommand::Route {
            weave,
            guest_port,
            host_port,
        } => {
            let w: Weave = client
                .post(
                    &format!("{}/route", weave_path(&weave)?),
                    &serde_json::json!({"guest_port": guest_port, "host_port": host_port}),
                )
                .await?;
            if json {
                print_json(&w);
            } else {
                println!(
                    "host port {} -> weave {} guest port {guest_port}",
                    host_port.unwrap_or(guest_port),
                    w.name
                );
            }
        }
        WeaveCommand::Activate { weave } => {
            let r: serde_json::Value = client
                .post(
                    &format!("{}/activate", weave_path(&weave)?),
                    &serde_json::json!({}),
                )
                .await?;
            if json {
                print_json(&r);
            } else {
                println!("ports {} now go to weave {weave}", r["ports"]);
            }
        }
        WeaveCommand::Delete { weave } => {
            client.delete(&weave_path(&weave)?).await?;
            if json {
                print_json(&serde_json::json!({ "deleted": weave }));
            } else {
                println!("deleted weave {weave}");
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bad_weave_name_is_called_one() {
        assert_eq!(weave_path("w1").ok().as_deref(), Some("/v1/weaves/w1"));
        // "Bad!" breaks the environment rule too; the message still says weave.
        for bad in ["Bad!", "toolongname1", "a_b"] {
            match weave_path(bad) {
                Err(CliError::Usage(m)) => assert!(m.starts_with("invalid weave name"), "{m}"),
                _ => panic!("weave_path accepted {bad:?}"),
            }
        }
    }
}
