//! The `weft` command line: a thin client of weftd's API.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

use crate::client::{Client, ClientError};
use weft_api::audit::AuditEntry;
use weft_api::env::EnvironmentView;
use weft_api::env::{CreateEnvironment, DiskRequest, Status};
use weft_api::job::{Job, JobState};
use weft_api::net::{Egress, EgressRequest, ExposeRequest, GuestPlan, NetSetup, UnexposeRequest};
use weft_api::policy::{Policy, SetPolicy};
use weft_api::snapshot::Keep;
use weft_api::snapshot::{CreateSnapshot, PruneRequest, RestoreRequest, Snapshot};
use weft_api::vm::Accel;
use weft_api::weave::{CreateWeave, Source, Weave};
use weft_api::{API_SOCKET_NAME, DEFAULT_RUN_DIR};

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
    Restore {
        /// Snapshot id (see `weft snapshot list ENV`).
        snapshot: i64,
        /// The image to write, inside one of weftd's `export_dirs` (`<data_dir>/exports`
        /// by default); written 0600, never through a symlink; must not exist.
        #[arg(long)]
        output: PathBuf,
        /// Image format: raw (sparse) or qcow2 (zero chunks stay unallocated).
        #[arg(long, default_value = "raw")]
        format: String,
        /// Replace the file at --output if it is a regular file (never a symlink or
        /// directory).
        #[arg(long)]
        force: bool,
        /// Return at once with the job id instead of following its progress.
        #[arg(long)]
        detach: bool,
    },
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
    Replay {
        /// Environment or weave name.
        env: String,
        /// The instant (guest time, RFC 3339), or `now`.
        #[arg(long)]
        to: String,
        /// Keep only the items changed from this instant on (RFC 3339), each as it
        /// stood at --to.
        #[arg(long)]
        from: Option<String>,
        /// Write the state under this directory, mirroring the guest's paths (a
        /// SQLite database per database, the JSON documents, the key-value files).
        /// It must be inside one of weftd's `export_dirs` (`<data_dir>/exports` by
        /// default); files are written 0600, never through a symlink, and replace
        /// regular files of an earlier replay.
        #[arg(long)]
        out: Option<PathBuf>,
        /// Push the state into this running weave's guest through its DPA, which
        /// makes (and records) the changes needed to reach it.
        #[arg(long)]
        into: Option<String>,
        /// With --into: push even though WEAVE is not a weave of ENV (another
        /// environment, its weave, ENV itself). Recorded in the audit log.
        #[arg(long, requires = "into")]
        force: bool,
        /// Start from the application files inside this disk snapshot (an id from
        /// `weft snapshot list`), then apply the log from shortly before it to --to.
        #[arg(long, conflicts_with = "from")]
        base: Option<i64>,
        /// With --base: how many seconds before the snapshot the log is applied again,
        /// to cover writes the guest had not yet written back to the disk.
        #[arg(long, requires = "base")]
        base_margin: Option<u64>,
    },
    /// Show the audit log (who changed what, when, with what result), or verify it.
    #[command(args_conflicts_with_subcommands = true)]
    Audit {
        /// How many of the newest records to show.
        #[arg(long, default_value_t = 20)]
        limit: u32,
        #[command(subcommand)]
        command: Option<AuditCommand>,
    },
}

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

/// `weft audit …`
#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// Recompute the audit log's hash chain: exits 1 and names the entries when any
    /// entry was edited or deleted.
    Verify,
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

/// Parses an egress policy: none, internet or all.
pub fn parse_egress(s: &str) -> Result<Egress, String> {
    s.parse()
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

/// `weft store …`
#[derive(Debug, Subcommand)]
pub enum StoreCommand {
    /// Chunks and bytes per tier, logical bytes, indexes.
    Stats,
    /// Re-hash every chunk; name bad chunks and the snapshots they affect.
    Verify,
    /// Move chunks between the hot and cold tiers by age and access count.
    ///
    /// Example: weft store tier --cold-after 7d --promote-after 3
    Tier {
        /// Move a chunk cold after this long without a read (default 7d).
        #[arg(long, value_parser = humantime::parse_duration)]
        cold_after: Option<std::time::Duration>,
        /// A chunk read at least this often is "frequent" (default 8) …
        #[arg(long)]
        frequent_reads: Option<u32>,
        /// … and goes cold only after this long without a read (default 30d).
        #[arg(long, value_parser = humantime::parse_duration)]
        frequent_cold_after: Option<std::time::Duration>,
        /// Move a cold chunk back after this many cold reads (default 3).
        #[arg(long)]
        promote_after: Option<u32>,
    },
    /// Remove chunks no snapshot references (older than the grace period).
    Gc {
        /// Keep unreferenced chunks younger than this (e.g. 24h5m); must exceed the longest backup.
        #[arg(long, value_parser = humantime::parse_duration)]
        grace: Option<std::time::Duration>,
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

fn absolute_opt(p: Option<PathBuf>) -> Result<Option<PathBuf>, String> {
    p.map(|p| std::path::absolute(&p).map_err(|e| format!("{}: {e}", p.display())))
        .transpose()
}

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

enum CliError {
    Usage(String),
    /// The request worked and its answer is a failure (e.g. a verification).
    Failed(String),
    Client(ClientError),
}

impl From<ClientError> for CliError {
    fn from(e: ClientError) -> Self {
        CliError::Client(e)
    }
}

fn env_path(name: &str) -> Result<String, CliError> {
    weft_api::names::check_env_name(name).map_err(|e| CliError::Usage(e.to_string()))?;
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
        Command::Whoami => {
            let w: weft_api::roles::Whoami = client.get("/v1/whoami").await?;
            if json {
                print_json(&w);
            } else {
                match w.uid {
                    Some(uid) if w.user != format!("uid {uid}") => {
                        println!("user:   {} (uid {uid})", w.user)
                    }
                    _ => println!("user:   {}", w.user),
                }
                println!("groups: {}", w.groups.join(", "));
                println!(
                    "role:   {}",
                    w.role.map_or("none".to_string(), |r| r.to_string())
                );
                if w.actor != w.user {
                    println!("actor:  {}", w.actor);
                }
            }
        }
        Command::Audit {
            command: Some(AuditCommand::Verify),
            ..
        } => {
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
        Command::Audit { limit, .. } => {
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
        Command::Snapshot(cmd) => snapshot_command(client, cmd, json).await?,
        Command::Restore {
            snapshot,
            output,
            format,
            force,
            detach,
        } => {
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
        }
        Command::Policy(cmd) => policy_command(client, cmd, json).await?,
        Command::Weave(cmd) => weave_command(client, cmd, json).await?,
        Command::Compose(cmd) => compose_command(client, cmd, json).await?,
        Command::Provenance(cmd) => provenance_command(client, cmd, json).await?,
        Command::Replay {
            env,
            to,
            from,
            out,
            into,
            force,
            base,
            base_margin,
        } => {
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
        }
        Command::Job(JobCommand::List { limit }) => {
            let jobs: Vec<Job> = client.get(&format!("/v1/jobs?limit={limit}")).await?;
            if json {
                print_json(&jobs);
            } else {
                let rows = jobs.iter().map(job_row).collect();
                print_table(
                    &[
                        "ID", "KIND", "TARGET", "STATE", "PROGRESS", "STARTED", "ERROR",
                    ],
                    rows,
                );
            }
        }
        Command::Job(JobCommand::Show { id, wait }) => {
            let job: Job = client.get(&format!("/v1/jobs/{id}")).await?;
            follow(client, job, !wait, json).await?;
        }
        Command::Store(cmd) => {
            let report: serde_json::Value = match cmd {
                StoreCommand::Stats => client.get("/v1/store").await?,
                StoreCommand::Verify => {
                    client
                        .post("/v1/store/verify", &serde_json::json!({}))
                        .await?
                }
                StoreCommand::Tier {
                    cold_after,
                    frequent_reads,
                    frequent_cold_after,
                    promote_after,
                } => client
                    .post(
                        "/v1/store/tier",
                        &serde_json::json!({
                            "cold_after_secs": cold_after.map(|d| d.as_secs()),
                            "frequent_reads": frequent_reads,
                            "frequent_cold_after_secs": frequent_cold_after.map(|d| d.as_secs()),
                            "promote_after_cold_reads": promote_after,
                        }),
                    )
                    .await?,
                StoreCommand::Gc { grace } => {
                    client
                        .post(
                            "/v1/store/gc",
                            &serde_json::json!({ "grace_secs": grace.map(|g| g.as_secs()) }),
                        )
                        .await?
                }
            };
            if json {
                print_json(&report);
            } else {
                print_report(&report);
            }
            let bad = report["bad_chunks"]
                .as_array()
                .is_some_and(|b| !b.is_empty())
                || report["missing_chunks"]
                    .as_array()
                    .is_some_and(|b| !b.is_empty())
                || report["bad_indexes"]
                    .as_array()
                    .is_some_and(|b| !b.is_empty());
            if bad {
                return Err(CliError::Client(ClientError::Api {
                    status: hyper::StatusCode::CONFLICT,
                    message: "the store has bad or missing chunks (listed above)".into(),
                }));
            }
        }
    }
    Ok(())
}

async fn provenance_command(
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

async fn env_command(client: &Client, cmd: EnvCommand, json: bool) -> Result<(), CliError> {
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

/// Prints a network setup: plan, active branch, host ports.
fn print_net(setup: &NetSetup, json: bool) {
    if json {
        print_json(setup);
        return;
    }
    let p = &setup.plan;
    println!("env:    {}", setup.env);
    println!(
        "plan:   guest {}/{} via {}",
        p.guest_ip, p.guest_prefix, p.gateway
    );
    match &setup.active {
        Some(w) => println!("active: weave {w}"),
        None => println!("active: {} itself", setup.env),
    }
    println!("egress: {}", setup.egress.as_str());
    let rows = setup
        .ports
        .iter()
        .map(|port| {
            vec![
                port.host_port.to_string(),
                port.guest_port.to_string(),
                port.guest_ip
                    .map(|ip| ip.to_string())
                    .unwrap_or_else(|| "-".into()),
                if port.published {
                    "published"
                } else {
                    "weave route"
                }
                .into(),
                port.target.clone(),
            ]
        })
        .collect();
    print_table(
        &["HOST PORT", "GUEST PORT", "GUEST IP", "KIND", "GOES TO"],
        rows,
    );
}

async fn snapshot_command(
    client: &Client,
    cmd: SnapshotCommand,
    json: bool,
) -> Result<(), CliError> {
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

fn compose_path(name: &str) -> Result<String, CliError> {
    weft_api::names::check_env_name(name).map_err(|e| CliError::Usage(e.to_string()))?;
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

async fn compose_command(client: &Client, cmd: ComposeCommand, json: bool) -> Result<(), CliError> {
    use weft_api::composition::{CompositionView, CreateComposition, ResolveRequest, Take};
    match cmd {
        ComposeCommand::Create { name, env, rules } => {
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

async fn weave_command(client: &Client, cmd: WeaveCommand, json: bool) -> Result<(), CliError> {
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
            weft_api::names::check_env_name(&src).map_err(|e| CliError::Usage(e.to_string()))?;
            let r: weft_api::weave::SyncReport = client
                .post(
                    &format!("/v1/weaves/{src}/sync"),
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

async fn policy_command(client: &Client, cmd: PolicyCommand, json: bool) -> Result<(), CliError> {
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
        print_table(
            &[
                "ID", "KIND", "TARGET", "STATE", "PROGRESS", "STARTED", "ERROR",
            ],
            vec![job_row(&job)],
        );
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

fn job_row(j: &Job) -> Vec<String> {
    let progress = if j.total_bytes > 0 {
        format!(
            "{}/{}",
            human_bytes(j.done_bytes),
            human_bytes(j.total_bytes)
        )
    } else {
        "-".into()
    };
    vec![
        j.id.to_string(),
        j.kind.clone(),
        j.target.clone(),
        j.state.as_str().into(),
        progress,
        j.started_at.clone(),
        j.error.clone().unwrap_or_default(),
    ]
}

/// Bytes in binary units: `512 B`, `1.5 MiB`.
fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
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

/// Prints a JSON object as `key: value` lines (nested values inline).
fn print_report(v: &serde_json::Value) {
    match v.as_object() {
        Some(map) => {
            let width = map.keys().map(String::len).max().unwrap_or(0) + 1;
            for (k, value) in map {
                let text = match value {
                    serde_json::Value::String(s) => s.clone(),
                    serde_json::Value::Null => "-".into(),
                    other => other.to_string(),
                };
                println!("{:<width$} {text}", format!("{k}:"));
            }
        }
        None => println!("{v}"),
    }
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
