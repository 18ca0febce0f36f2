//! `weft env`: environments, their configuration and their network setup.

use std::net::Ipv4Addr;
use std::path::PathBuf;

use clap::{Args, Subcommand};

use super::output::{print_env, print_json, print_net, print_table};
use super::{absolute_opt, env_path, parse_memory_mib, CliError};
use crate::client::Client;
use weft_api::env::{CreateEnvironment, DiskRequest, EnvironmentView};
use weft_api::net::{ExposeRequest, GuestPlan, NetSetup, UnexposeRequest};
use weft_api::vm::Accel;

/// `weft env …`
#[derive(Debug, Subcommand)]
pub enum EnvCommand {
    /// Create an environment and launch its QEMU under weftd's supervision.
    ///
    /// Example: weft env create web --disk /srv/web.qcow2,name=vda --memory 1G --cpus 2
    Create(CreateArgs),
    /// Attach a VM started by someone else (e.g. libvirt) through its QMP socket.
    ///
    /// Example: weft env attach db --qmp /var/lib/libvirt/qemu/domain-1-db/monitor.sock
    Attach {
        /// Name of the new environment.
        name: String,
        /// The VM's QMP socket: the socket itself (not a symlink), outside weftd's run
        /// and data directories.
        #[arg(long)]
        qmp: PathBuf,
    },
    /// List environments.
    List,
    /// Show one environment: state, QEMU run state, configuration, files.
    Show {
        /// Environment name.
        name: String,
    },
    /// Start a stopped managed environment.
    Start {
        /// Environment name.
        name: String,
    },
    /// Stop an environment (QMP quit; killed after weftd's stop timeout).
    Stop {
        /// Environment name.
        name: String,
    },
    /// Pause an environment's vCPUs (its disks are drained and flushed).
    Pause {
        /// Environment name.
        name: String,
    },
    /// Resume a paused environment.
    Resume {
        /// Environment name.
        name: String,
    },
    /// Delete an environment: stop it if weftd runs it, forget it if attached. Disk images are kept,
    /// with the guest's writes since a weave from now committed into them. Refused for a weave
    /// (`weft weave delete`) and while weaves branch from it.
    Delete {
        /// Environment name.
        name: String,
    },
    /// Change an environment's memory and vCPUs (stored; a running VM gets them at its
    /// next start). Take a `config` snapshot to record the change in its history.
    ///
    /// Example: weft env set web --memory 1G --cpus 2
    Set {
        /// Environment name.
        name: String,
        /// Guest memory: 512M, 1G, or MiB as a plain number.
        #[arg(long, value_parser = parse_memory_mib, value_name = "SIZE")]
        memory: Option<u64>,
        /// vCPUs.
        #[arg(long)]
        cpus: Option<u32>,
    },
    /// Show an environment's network setup (guest address plan, host ports, active
    /// weave), or change its guest address plan (recorded as a `net` snapshot; weaves
    /// from a past instant get the plan of that instant).
    ///
    /// Example: weft env net web --guest 192.168.100.2/24 --gateway 192.168.100.1
    Net {
        /// Environment name.
        name: String,
        /// The guest's address and prefix length, e.g. 192.168.100.2/24.
        #[arg(long, value_parser = parse_cidr, requires = "gateway")]
        guest: Option<(Ipv4Addr, u8)>,
        /// The guest's gateway, e.g. 192.168.100.1.
        #[arg(long, requires = "guest")]
        gateway: Option<Ipv4Addr>,
    },
    /// Publish a guest port of the environment on a host port (any local address,
    /// loopback included). New connections go to the environment's guest, or to the
    /// weave `weft weave activate` made active.
    ///
    /// The host must reach the guest's address (e.g. the operator's tap carries the
    /// gateway address). Example: weft env expose web --guest-port 80 --host-port 8080
    Expose {
        /// Environment name.
        name: String,
        /// Port of the guest.
        #[arg(long)]
        guest_port: u16,
        /// Port on the host.
        #[arg(long)]
        host_port: u16,
        /// The guest's address (default: the environment's address plan, `weft env net`).
        #[arg(long)]
        guest_ip: Option<Ipv4Addr>,
    },
    /// Remove a host port of the environment: one it published, or one routed to one
    /// of its weaves.
    Unexpose {
        /// Environment name.
        name: String,
        /// Port on the host.
        #[arg(long)]
        host_port: u16,
    },
    /// Send the ports the environment published back to its own guest (after `weft
    /// weave activate`), in one nftables transaction; established connections finish
    /// where they started.
    Activate {
        /// Environment name.
        name: String,
    },
}

/// Arguments of `weft env create`.
#[derive(Debug, Args)]
pub struct CreateArgs {
    /// Name: 1-32 characters from a-z, 0-9, '-', '_'.
    pub name: String,
    /// A disk: PATH[,name=vda][,format=raw|qcow2][,readonly]. Repeat for more disks.
    /// Images (disks, kernel, initrd) must be inside one of weftd's `image_dirs`
    /// (`<data_dir>/images` by default).
    #[arg(long = "disk", value_name = "SPEC")]
    pub disks: Vec<String>,
    /// Guest memory: 512M, 1G, or MiB as a plain number.
    #[arg(long, value_parser = parse_memory_mib, value_name = "SIZE")]
    pub memory: Option<u64>,
    /// Virtual CPUs.
    #[arg(long)]
    pub cpus: Option<u32>,
    /// Accelerator: tcg, kvm (refused where KVM does not work) or auto; weftd's default when absent.
    #[arg(long, value_parser = parse_accel)]
    pub accel: Option<Accel>,
    /// Kernel image for direct boot.
    #[arg(long)]
    pub kernel: Option<PathBuf>,
    /// Initial ramdisk for direct boot (needs --kernel).
    #[arg(long)]
    pub initrd: Option<PathBuf>,
    /// Kernel command line (needs --kernel).
    #[arg(long)]
    pub append: Option<String>,
    /// A network card on a tap device: TAP[,mac=52:54:00:..]. Repeat for more.
    #[arg(long = "nic", value_name = "SPEC")]
    pub nics: Vec<String>,
    /// Record the environment without launching QEMU.
    #[arg(long)]
    pub no_start: bool,
}

/// Parses `192.168.100.2/24`.
pub fn parse_cidr(s: &str) -> Result<(Ipv4Addr, u8), String> {
    let (addr, len) = s
        .split_once('/')
        .ok_or_else(|| format!("{s:?}: expected ADDRESS/PREFIX, e.g. 192.168.100.2/24"))?;
    let addr: Ipv4Addr = addr
        .parse()
        .map_err(|_| format!("{addr:?} is not an IPv4 address"))?;
    let len: u8 = len
        .parse()
        .ok()
        .filter(|l| (1..=30).contains(l))
        .ok_or_else(|| format!("prefix /{len} is not in 1..=30"))?;
    Ok((addr, len))
}

/// Parses `tcg`, `kvm` or `auto`.
pub fn parse_accel(s: &str) -> Result<Accel, String> {
    match s {
        "tcg" => Ok(Accel::Tcg),
        "kvm" => Ok(Accel::Kvm),
        "auto" => Ok(Accel::Auto),
        other => Err(format!("{other:?}: use tcg, kvm or auto")),
    }
}

/// Parses `TAP[,mac=MAC]`; the MAC defaults to a stable one derived from the
/// environment name and the card's position (52:54:00 is QEMU's prefix).
pub fn parse_nic(index: usize, env: &str, spec: &str) -> Result<weft_api::vm::NicConfig, String> {
    let mut parts = spec.split(',');
    let tap = parts
        .next()
        .filter(|t| !t.is_empty() && t.len() <= 15)
        .ok_or_else(|| format!("--nic {spec:?}: expected TAP[,mac=52:54:00:xx:xx:xx] (tap names have at most 15 characters)"))?;
    let hash = env
        .bytes()
        .chain([index as u8])
        .fold(0x811c_9dc5u32, |h, b| {
            (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
        });
    let mut mac = format!(
        "52:54:00:{:02x}:{:02x}:{:02x}",
        (hash >> 16) & 0xff,
        (hash >> 8) & 0xff,
        hash & 0xff
    );
    for opt in parts {
        match opt.split_once('=') {
            Some(("mac", m))
                if m.len() == 17
                    && m.split(':')
                        .all(|x| x.len() == 2 && u8::from_str_radix(x, 16).is_ok()) =>
            {
                mac = m.to_ascii_lowercase()
            }
            _ => {
                return Err(format!(
                    "--nic {spec:?}: unknown or bad option {opt:?}; known: mac=52:54:00:xx:xx:xx"
                ))
            }
        }
    }
    Ok(weft_api::vm::NicConfig {
        id: format!("net{index}"),
        tap: tap.to_string(),
        mac,
    })
}

/// Parses `PATH[,name=vda][,format=raw|qcow2][,backing=FILE][,readonly]`; relative paths
/// are made absolute.
pub fn parse_disk(spec: &str) -> Result<DiskRequest, String> {
    let mut parts = spec.split(',');
    let path = parts.next().filter(|p| !p.is_empty()).ok_or_else(|| {
        format!(
            "--disk {spec:?}: expected PATH[,name=vda][,format=raw|qcow2][,backing=FILE][,readonly]"
        )
    })?;
    let path = std::path::absolute(path).map_err(|e| format!("--disk {path}: {e}"))?;
    let mut disk = DiskRequest {
        path,
        name: None,
        format: None,
        read_only: false,
        backing: None,
    };
    for opt in parts {
        match opt.split_once('=').unwrap_or((opt, "")) {
            ("name", v) if !v.is_empty() => disk.name = Some(v.to_string()),
            ("format", v) if !v.is_empty() => disk.format = Some(v.to_string()),
            ("backing", v) if !v.is_empty() => {
                disk.backing =
                    Some(std::path::absolute(v).map_err(|e| format!("--disk backing {v}: {e}"))?)
            }
            ("readonly", "" | "on" | "true" | "yes") => disk.read_only = true,
            ("readonly", "off" | "false" | "no") => disk.read_only = false,
            _ => {
                return Err(format!(
                    "--disk {spec:?}: unknown option {opt:?}; known: name=, format=, backing=, readonly"
                ))
            }
        }
    }
    Ok(disk)
}

/// Runs `weft env …`.
pub(super) async fn run(client: &Client, cmd: EnvCommand, json: bool) -> Result<(), CliError> {
    match cmd {
        EnvCommand::Create(args) => {
            let disks = args
                .disks
                .iter()
                .map(|d| parse_disk(d))
                .collect::<Result<Vec<_>, _>>()
                .map_err(CliError::Usage)?;
            let nics = args
                .nics
                .iter()
                .enumerate()
                .map(|(i, spec)| parse_nic(i, &args.name, spec))
                .collect::<Result<Vec<_>, _>>()
                .map_err(CliError::Usage)?;
            let req = CreateEnvironment::Managed {
                name: args.name,
                disks,
                memory_mib: args.memory,
                cpus: args.cpus,
                accel: args.accel,
                kernel: absolute_opt(args.kernel).map_err(CliError::Usage)?,
                initrd: absolute_opt(args.initrd).map_err(CliError::Usage)?,
                append: args.append,
                nics,
                no_start: args.no_start,
            };
            let env: EnvironmentView = client.post("/v1/environments", &req).await?;
            print_env(&env, json);
        }
        EnvCommand::Attach { name, qmp } => {
            let qmp_socket = std::path::absolute(&qmp)
                .map_err(|e| CliError::Usage(format!("--qmp {}: {e}", qmp.display())))?;
            let req = CreateEnvironment::Attached { name, qmp_socket };
            let env: EnvironmentView = client.post("/v1/environments", &req).await?;
            print_env(&env, json);
        }
        EnvCommand::List => {
            let envs: Vec<EnvironmentView> = client.get("/v1/environments").await?;
            if json {
                print_json(&envs);
            } else {
                let rows = envs
                    .iter()
                    .map(|v| {
                        vec![
                            v.env.name.clone(),
                            v.env.kind.as_str().to_string(),
                            v.env.state.as_str().to_string(),
                            v.runstate.clone().unwrap_or_else(|| "-".into()),
                            v.env
                                .pid
                                .map(|p| p.to_string())
                                .unwrap_or_else(|| "-".into()),
                            v.env
                                .config
                                .as_ref()
                                .map(|c| {
                                    c.disks
                                        .iter()
                                        .map(|d| d.name.as_str())
                                        .collect::<Vec<_>>()
                                        .join(",")
                                })
                                .unwrap_or_else(|| "-".into()),
                        ]
                    })
                    .collect();
                print_table(&["NAME", "KIND", "STATE", "QEMU", "PID", "DISKS"], rows);
            }
        }
        EnvCommand::Show { name } => {
            let env: EnvironmentView = client.get(&env_path(&name)?).await?;
            print_env(&env, json);
        }
        EnvCommand::Start { name } => {
            let env: EnvironmentView = client
                .post(
                    &format!("{}/start", env_path(&name)?),
                    &serde_json::json!({}),
                )
                .await?;
            print_env(&env, json);
        }
        EnvCommand::Stop { name } => {
            let env: EnvironmentView = client
                .post(
                    &format!("{}/stop", env_path(&name)?),
                    &serde_json::json!({}),
                )
                .await?;
            print_env(&env, json);
        }
        EnvCommand::Pause { name } => {
            let env: EnvironmentView = client
                .post(
                    &format!("{}/pause", env_path(&name)?),
                    &serde_json::json!({}),
                )
                .await?;
            print_env(&env, json);
        }
        EnvCommand::Resume { name } => {
            let env: EnvironmentView = client
                .post(
                    &format!("{}/resume", env_path(&name)?),
                    &serde_json::json!({}),
                )
                .await?;
            print_env(&env, json);
        }
        EnvCommand::Delete { name } => {
            client.delete(&env_path(&name)?).await?;
            if json {
                print_json(&serde_json::json!({ "deleted": name }));
            } else {
                println!("deleted {name}");
            }
        }
        EnvCommand::Set { name, memory, cpus } => {
            let env: EnvironmentView = client
                .post(
                    &format!("{}/config", env_path(&name)?),
                    &weft_api::env::SetConfig {
                        memory_mib: memory,
                        cpus,
                    },
                )
                .await?;
            print_env(&env, json);
        }
        EnvCommand::Net {
            name,
            guest,
            gateway,
        } => {
            let path = format!("{}/net", env_path(&name)?);
            let setup: NetSetup = match (guest, gateway) {
                (Some((guest_ip, guest_prefix)), Some(gateway)) => {
                    client
                        .request_json(
                            hyper::Method::PUT,
                            &path,
                            &GuestPlan {
                                guest_ip,
                                guest_prefix,
                                gateway,
                            },
                        )
                        .await?
                }
                _ => client.get(&path).await?,
            };
            print_net(&setup, json);
        }
        EnvCommand::Expose {
            name,
            guest_port,
            host_port,
            guest_ip,
        } => {
            let setup: NetSetup = client
                .post(
                    &format!("{}/expose", env_path(&name)?),
                    &ExposeRequest {
                        guest_port,
                        host_port: Some(host_port),
                        guest_ip,
                    },
                )
                .await?;
            print_net(&setup, json);
        }
        EnvCommand::Unexpose { name, host_port } => {
            let setup: NetSetup = client
                .post(
                    &format!("{}/unexpose", env_path(&name)?),
                    &UnexposeRequest { host_port },
                )
                .await?;
            print_net(&setup, json);
        }
        EnvCommand::Activate { name } => {
            let setup: NetSetup = client
                .post(
                    &format!("{}/activate", env_path(&name)?),
                    &serde_json::json!({}),
                )
                .await?;
            print_net(&setup, json);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use clap::Parser;

    use super::*;
    use crate::cli::{Cli, Command};

    #[test]
    fn disk_specs() {
        let d = parse_disk("/a.img,name=vdb,format=qcow2,readonly").unwrap();
        assert_eq!(d.path, Path::new("/a.img"));
        assert_eq!(d.name.as_deref(), Some("vdb"));
        assert_eq!(d.format.as_deref(), Some("qcow2"));
        assert!(d.read_only);
        let d = parse_disk("rel.img").unwrap();
        assert!(d.path.is_absolute());
        assert!(!d.read_only);
        assert!(parse_disk("").is_err());
        assert!(parse_disk("/a.img,size=3").is_err());
        let d = parse_disk("/a.qcow2,backing=base.raw").unwrap();
        assert!(d
            .backing
            .is_some_and(|b| b.is_absolute() && b.ends_with("base.raw")));
    }

    #[test]
    fn cli_parses() {
        let cli = Cli::try_parse_from([
            "weft", "--json", "env", "create", "web", "--disk", "/a.img", "--memory", "1G",
        ])
        .unwrap();
        assert!(cli.json);
        match cli.command {
            Command::Env(EnvCommand::Create(a)) => {
                assert_eq!(a.name, "web");
                assert_eq!(a.memory, Some(1024));
            }
            other => panic!("parsed as {other:?}"),
        }
        assert!(Cli::try_parse_from(["weft", "env", "create", "x", "--memory", "lots"]).is_err());
        assert!(Cli::try_parse_from(["weft", "env", "frobnicate"]).is_err());
    }
}
