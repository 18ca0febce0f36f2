//! `weft compose`: temporal compositions, their plans and conflicts, and applying them.

use std::path::PathBuf;

use clap::Subcommand;

use super::output::{print_json, print_report, print_table};
use super::{parse_egress, CliError};
use crate::client::Client;
use weft_api::net::Egress;
use weft_api::weave::Weave;

/// `weft compose …`
#[derive(Debug, Subcommand)]
pub enum ComposeCommand {
    /// Create a composition from a rules file (TOML, or JSON; see docs/compositions.md).
    ///
    /// Example: weft compose create tuesday --env web --rules tuesday.toml
    Create {
        /// Composition name.
        name: String,
        /// The environment whose history it composes.
        #[arg(long)]
        env: String,
        /// The rules file.
        #[arg(long)]
        rules: PathBuf,
    },
    /// List compositions.
    List,
    /// Show the plan: each resource, the snapshot chosen, its time and category, the
    /// rule that chose it, and conflicts. Nothing is changed.
    Plan {
        /// Composition name.
        name: String,
    },
    /// List the conflicts of a composition's merges (open and resolved).
    Conflicts {
        /// Composition name.
        name: String,
    },
    /// Resolve conflicts by side: one (--resource and --key), a resource's, or --all.
    Resolve {
        /// Composition name.
        name: String,
        /// The conflict's resource.
        #[arg(long)]
        resource: Option<String>,
        /// The conflict's key (`slots A..B`, a JSON pointer, or for `data:` the
        /// source and its item, as `weft compose conflicts` shows it).
        #[arg(long, requires = "resource")]
        key: Option<String>,
        /// Every open conflict.
        #[arg(long, conflicts_with_all = ["resource", "key"])]
        all: bool,
        /// The side to take: older, newer, a snapshot id, or (for `data:`) a side's
        /// instant.
        #[arg(long)]
        take: String,
    },
    /// Make a weave of the plan (refused while a conflict is open).
    Apply {
        /// Composition name.
        name: String,
        /// Name of the new weave (default w<index>).
        #[arg(long)]
        weave: Option<String>,
        /// Serve the disks live through weft-blk (merges as an index of the weave's
        /// own): nothing is restored first.
        #[arg(long)]
        live: bool,
        /// What the weave's guest may open connections to: none, internet or all.
        #[arg(long, default_value = "none", value_parser = parse_egress)]
        egress: Egress,
    },
    /// Delete a composition (weaves made from it stay).
    Delete {
        /// Composition name.
        name: String,
    },
}

fn compose_path(name: &str) -> Result<String, CliError> {
    weft_api::names::check_composition_name(name).map_err(|e| CliError::Usage(e.to_string()))?;
    Ok(format!("/v1/compositions/{name}"))
}

fn print_conflicts(list: &[weft_api::composition::Conflict]) {
    let rows = list
        .iter()
        .map(|c| {
            // A `data:` conflict's sides are instants (µs since the Unix epoch).
            let side = |id: i64| {
                if c.resource.starts_with("data:") {
                    let at = u64::try_from(id).unwrap_or(0);
                    let t = std::time::UNIX_EPOCH + std::time::Duration::from_micros(at);
                    humantime::format_rfc3339_micros(t).to_string()
                } else {
                    id.to_string()
                }
            };
            vec![
                c.resource.clone(),
                c.key.clone(),
                side(c.sides[0]),
                side(c.sides[1]),
                c.resolved
                    .map(|r| format!("take {}", side(r)))
                    .unwrap_or_else(|| "open".into()),
            ]
        })
        .collect();
    print_table(&["RESOURCE", "KEY", "SIDE A", "SIDE B", "STATE"], rows);
}

fn print_plan(view: &weft_api::composition::CompositionView) {
    use weft_api::composition::Origin;
    let rows = view
        .plan
        .resources
        .iter()
        .map(|c| {
            let (from, time, category) = match &c.origin {
                Origin::Snapshot {
                    id,
                    taken_at,
                    category,
                } => (
                    format!("snapshot {id}"),
                    taken_at.clone(),
                    category.clone().unwrap_or_default(),
                ),
                Origin::Instant { at } => ("provenance log".into(), at.clone(), String::new()),
                Origin::Merge { sides, base } => (
                    format!(
                        "merge of {}{}",
                        sides
                            .iter()
                            .map(|s| s.to_string())
                            .collect::<Vec<_>>()
                            .join(" + "),
                        base.map(|b| format!(" (ancestor {b})")).unwrap_or_default()
                    ),
                    String::new(),
                    String::new(),
                ),
                Origin::DataMerge { instants, base } => (
                    format!(
                        "merge of provenance log at {} (against {base})",
                        instants.join(" + ")
                    ),
                    instants.last().cloned().unwrap_or_default(),
                    String::new(),
                ),
            };
            vec![
                c.resource.clone(),
                from,
                time,
                category,
                c.rule.clone(),
                c.settled.clone().unwrap_or_default(),
            ]
        })
        .collect();
    print_table(
        &["RESOURCE", "FROM", "TIME", "CATEGORY", "RULE", "SETTLED"],
        rows,
    );
    let open = view.plan.open_conflicts().count();
    if !view.plan.conflicts.is_empty() {
        println!();
        print_conflicts(&view.plan.conflicts);
    }
    if open > 0 {
        println!(
            "\n{open} open conflict(s): `weft compose resolve {} …` before apply",
            view.composition.name
        );
    }
}

/// Runs `weft compose …`.
pub(super) async fn run(client: &Client, cmd: ComposeCommand, json: bool) -> Result<(), CliError> {
    use weft_api::composition::{CompositionView, CreateComposition, ResolveRequest, Take};
    match cmd {
        ComposeCommand::Create { name, env, rules } => {
            weft_api::names::check_composition_name(&name).map_err(CliError::Usage)?;
            let text = std::fs::read_to_string(&rules).map_err(|e| {
                CliError::Usage(format!("cannot read rules file {}: {e}", rules.display()))
            })?;
            let parsed = weft_api::composition::Rules::parse(&text)
                .map_err(|e| CliError::Usage(format!("{}: {e}", rules.display())))?;
            let view: CompositionView = client
                .post(
                    "/v1/compositions",
                    &CreateComposition {
                        name,
                        env,
                        rules: parsed,
                    },
                )
                .await?;
            if json {
                print_json(&view);
            } else {
                print_plan(&view);
            }
        }
        ComposeCommand::List => {
            let list: Vec<weft_api::composition::Composition> =
                client.get("/v1/compositions").await?;
            if json {
                print_json(&list);
            } else {
                let rows = list
                    .iter()
                    .map(|c| {
                        vec![
                            c.name.clone(),
                            c.env.clone(),
                            c.rules.rules.len().to_string(),
                            format!("{:?}", c.rules.conflict).to_lowercase(),
                            c.created_at.clone(),
                        ]
                    })
                    .collect();
                print_table(&["NAME", "ENV", "RULES", "CONFLICT", "CREATED"], rows);
            }
        }
        ComposeCommand::Plan { name } => {
            let view: CompositionView = client.get(&compose_path(&name)?).await?;
            if json {
                print_json(&view);
            } else {
                print_plan(&view);
            }
        }
        ComposeCommand::Conflicts { name } => {
            let list: Vec<weft_api::composition::Conflict> = client
                .get(&format!("{}/conflicts", compose_path(&name)?))
                .await?;
            if json {
                print_json(&list);
            } else {
                print_conflicts(&list);
            }
        }
        ComposeCommand::Resolve {
            name,
            resource,
            key,
            all,
            take,
        } => {
            let take = match take.parse::<i64>() {
                Ok(id) => Take::Snapshot(id),
                Err(_) => Take::Side(take),
            };
            if !all && resource.is_none() {
                return Err(CliError::Usage(
                    "name a conflict (--resource and --key), a resource (--resource) or --all"
                        .into(),
                ));
            }
            let list: Vec<weft_api::composition::Conflict> = client
                .post(
                    &format!("{}/resolve", compose_path(&name)?),
                    &ResolveRequest {
                        resource,
                        key,
                        all,
                        take,
                    },
                )
                .await?;
            if json {
                print_json(&list);
            } else {
                print_conflicts(&list);
            }
        }
        ComposeCommand::Apply {
            name,
            weave,
            live,
            egress,
        } => {
            let w: Weave = client
                .post(
                    &format!("{}/apply", compose_path(&name)?),
                    &weft_api::composition::ApplyComposition {
                        weave,
                        live,
                        egress,
                    },
                )
                .await?;
            if json {
                print_json(&w);
            } else {
                print_report(&serde_json::to_value(&w).unwrap_or_default());
            }
        }
        ComposeCommand::Delete { name } => {
            client.delete(&compose_path(&name)?).await?;
            if !json {
                println!("composition {name} deleted");
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bad_composition_name_is_called_one() {
        assert_eq!(
            compose_path("tue").ok().as_deref(),
            Some("/v1/compositions/tue")
        );
        match compose_path("Bad!") {
            Err(CliError::Usage(m)) => assert!(m.starts_with("invalid composition name"), "{m}"),
            _ => panic!("compose_path accepted \"Bad!\""),
        }
    }
}
