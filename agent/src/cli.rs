//! The `weft` command line: a thin client of weftd's API.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

use crate::api::EnvironmentView;
use crate::client::{Client, ClientError};
use crate::config::{API_SOCKET_NAME, DEFAULT_RUN_DIR};
use crate::model::{AuditEntry, CreateEnvironment, DiskRequest, Status};
use weft_qmp::launch::Accel;

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
    /// Manage environments (VMs weft records).
    #[command(subcommand)]
    Env(EnvCommand),
    /// Show the audit log (who changed what, when, with what result).
    Audit {
        /// How many of the newest records to show.
        #[arg(long, default_value_t = 20)]
        limit: u32,
    },
}

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
        /// The VM's QMP socket.
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
    /// Delete an environment: stop it if weftd runs it, forget it if attached. Disk images are kept.
    Delete {
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
    /// Record the environment without launching QEMU.
    #[arg(long)]
    pub no_start: bool,
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

/// Parses `tcg`, `kvm` or `auto`.
pub fn parse_accel(s: &str) -> Result<Accel, String> {
    match s {
        "tcg" => Ok(Accel::Tcg),
        "kvm" => Ok(Accel::Kvm),
        "auto" => Ok(Accel::Auto),
        other => Err(format!("{other:?}: use tcg, kvm or auto")),
    }
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

/// Parses `PATH[,name=vda][,format=raw|qcow2][,readonly]`; relative paths are made absolute.
pub fn parse_disk(spec: &str) -> Result<DiskRequest, String> {
    let mut parts = spec.split(',');
    let path = parts.next().filter(|p| !p.is_empty()).ok_or_else(|| {
        format!("--disk {spec:?}: expected PATH[,name=vda][,format=raw|qcow2][,readonly]")
    })?;
    let path = std::path::absolute(path).map_err(|e| format!("--disk {path}: {e}"))?;
    let mut disk = DiskRequest {
        path,
        name: None,
        format: None,
        read_only: false,
    };
    for opt in parts {
        match opt.split_once('=').unwrap_or((opt, "")) {
            ("name", v) if !v.is_empty() => disk.name = Some(v.to_string()),
            ("format", v) if !v.is_empty() => disk.format = Some(v.to_string()),
            ("readonly", "" | "on" | "true" | "yes") => disk.read_only = true,
            ("readonly", "off" | "false" | "no") => disk.read_only = false,
            _ => {
                return Err(format!(
                    "--disk {spec:?}: unknown option {opt:?}; known: name=, format=, readonly"
                ))
            }
        }
    }
    Ok(disk)
}

fn absolute_opt(p: Option<PathBuf>) -> Result<Option<PathBuf>, String> {
    p.map(|p| std::path::absolute(&p).map_err(|e| format!("{}: {e}", p.display())))
        .transpose()
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
        Err(CliError::Client(e)) => {
            eprintln!("weft: {e}");
            match e {
                ClientError::Unreachable { .. } => ExitCode::from(EXIT_UNREACHABLE),
                _ => ExitCode::from(EXIT_FAILED),
            }
        }
    }
}

enum CliError {
    Usage(String),
    Client(ClientError),
}

impl From<ClientError> for CliError {
    fn from(e: ClientError) -> Self {
        CliError::Client(e)
    }
}

fn env_path(name: &str) -> Result<String, CliError> {
    crate::envs::check_name(name).map_err(|e| CliError::Usage(e.to_string()))?;
    Ok(format!("/v1/environments/{name}"))
}

async fn dispatch(client: &Client, command: Command, json: bool) -> Result<(), CliError> {
    match command {
        Command::Status => {
            let s: Status = client.get("/v1/status").await?;
            if json {
                print_json(&s);
            } else {
                println!(
                    "weftd {} (pid {}), up {}",
                    s.version,
                    s.pid,
                    humantime::format_duration(std::time::Duration::from_secs(s.uptime_secs))
                );
                println!("socket:       {}", s.socket.display());
                println!("data:         {}", s.data_dir.display());
                println!("environments: {} ({} running)", s.environments, s.running);
                println!("accel:        {} by default", s.default_accel);
                match &s.kvm_detail {
                    None => println!("kvm:          usable"),
                    Some(why) => println!("kvm:          not usable: {why}"),
                }
            }
        }
        Command::Audit { limit } => {
            let log: Vec<AuditEntry> = client.get(&format!("/v1/audit?limit={limit}")).await?;
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
        Command::Env(cmd) => env_command(client, cmd, json).await?,
    }
    Ok(())
}

async fn env_command(client: &Client, cmd: EnvCommand, json: bool) -> Result<(), CliError> {
    match cmd {
        EnvCommand::Create(args) => {
            let disks = args
                .disks
                .iter()
                .map(|d| parse_disk(d))
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
        EnvCommand::Delete { name } => {
            client.delete(&env_path(&name)?).await?;
            if json {
                print_json(&serde_json::json!({ "deleted": name }));
            } else {
                println!("deleted {name}");
            }
        }
    }
    Ok(())
}

fn print_json<T: serde::Serialize>(value: &T) {
    match serde_json::to_string_pretty(value) {
        Ok(s) => println!("{s}"),
        Err(e) => eprintln!("weft: cannot print JSON: {e}"),
    }
}

fn print_env(v: &EnvironmentView, json: bool) {
    if json {
        print_json(v);
        return;
    }
    let e = &v.env;
    println!("name:       {}", e.name);
    println!("kind:       {}", e.kind.as_str());
    println!("state:      {}", e.state.as_str());
    if let Some(r) = &v.runstate {
        println!("qemu:       {r}");
    }
    if let Some(pid) = e.pid {
        println!("pid:        {pid}");
    }
    println!("qmp socket: {}", e.qmp_socket.display());
    if let Some(c) = &e.config {
        println!("memory:     {} MiB", c.memory_mib);
        println!("cpus:       {}", c.cpus);
        println!("accel:      {}", c.accel);
        if let Some(k) = &c.kernel {
            println!("kernel:     {}", k.display());
        }
        if let Some(i) = &c.initrd {
            println!("initrd:     {}", i.display());
        }
        if let Some(a) = &c.append {
            println!("append:     {a}");
        }
        for d in &c.disks {
            println!(
                "disk {}:   {} ({:?}{})",
                d.name,
                d.path.display(),
                d.format,
                if d.read_only { ", read-only" } else { "" }
            );
        }
    }
    if let Some(f) = &e.files {
        println!("serial log: {}", f.serial_log.display());
        println!("qemu log:   {}", f.qemu_log.display());
    }
    if let Some(x) = &e.last_exit {
        println!("last exit:  {x}");
    }
    println!("created:    {}", e.created_at);
    println!("updated:    {}", e.updated_at);
}

/// Prints rows under headers with columns padded to their widest cell.
fn print_table(headers: &[&str], rows: Vec<Vec<String>>) {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        let padded: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        println!("{}", padded.join("  ").trim_end());
    };
    line(headers.iter().map(|h| h.to_string()).collect());
    for row in rows {
        line(row);
    }
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
