//! The real [`NetOps`]: rtnetlink for links, addresses and routes, nftnl for
//! nftables, a few syscalls for namespaces and taps.
//!
//! Anything that must happen inside a namespace runs on a fresh OS thread that
//! `setns`es into it and then exits: the namespace of a thread is never changed
//! for anyone else (a tokio worker must never be moved). Netlink sockets are
//! opened on that thread, so they belong to that namespace.

use std::fs::{self, File, OpenOptions};
use std::future::Future;
use std::io;
use std::net::{IpAddr, Ipv4Addr};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use futures::TryStreamExt;
use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sched::{setns, unshare, CloneFlags};
use rtnetlink::packet_route::link::{InfoData, InfoVeth, LinkAttribute};
use rtnetlink::{Handle, LinkMessageBuilder, LinkUnspec, LinkVeth, RouteMessageBuilder};

use crate::ops::{LinkEnd, NetOps, NftOp, NftTable, Prefix};
use crate::plan::{netns_path, NETNS_DIR};
use crate::{nft, Error, Result};

/// The real kernel. Needs CAP_NET_ADMIN and CAP_SYS_ADMIN (namespaces, mounts) —
/// in practice root.
#[derive(Debug, Default, Clone, Copy)]
pub struct Kernel;

impl Kernel {
    /// The real kernel.
    pub fn new() -> Self {
        Kernel
    }
}

fn check_netns_name(name: &str) -> io::Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.');
    if ok {
        Ok(())
    } else {
        Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("invalid namespace name {name:?}"),
        ))
    }
}

fn check_link_name(name: &str) -> io::Result<()> {
    let ok = !name.is_empty()
        && name.len() < libc::IFNAMSIZ
        && name != "."
        && name != ".."
        && name.bytes().all(|b| b.is_ascii_graphic() && b != b'/');
    if ok {
        Ok(())
    } else {
        Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("invalid link name {name:?}: 1-15 printable characters, no '/'"),
        ))
    }
}

fn open_netns(name: &str) -> io::Result<File> {
    check_netns_name(name)?;
    File::open(netns_path(name))
}

/// Run `f` on a new OS thread, inside `netns` if given.
fn run_in<T, F>(netns: Option<&str>, op: &str, f: F) -> Result<T>
where
    T: Send + 'static,
    F: FnOnce() -> io::Result<T> + Send + 'static,
{
    let ns_file = match netns {
        Some(name) => Some(open_netns(name).map_err(|e| Error::os(op, e))?),
        None => None,
    };
    let worker = std::thread::Builder::new()
        .name("weft-netns".into())
        .spawn(move || {
            if let Some(file) = ns_file {
                setns(&file, CloneFlags::CLONE_NEWNET).map_err(io::Error::from)?;
            }
            f()
        })
        .map_err(|e| Error::os(op, e))?;
    match worker.join() {
        Ok(result) => result.map_err(|e| Error::os(op, e)),
        Err(_) => Err(Error::os(
            op,
            io::Error::other("netns worker thread panicked"),
        )),
    }
}

fn nl_err(e: rtnetlink::Error) -> io::Error {
    match &e {
        rtnetlink::Error::NetlinkError(msg) if msg.code.is_some() => msg.to_io(),
        _ => io::Error::other(e.to_string()),
    }
}

/// Run an rtnetlink conversation on a new thread inside `netns`.
fn rtnl<T, F, Fut>(netns: Option<&str>, op: &str, f: F) -> Result<T>
where
    T: Send + 'static,
    F: FnOnce(Handle) -> Fut + Send + 'static,
    Fut: Future<Output = io::Result<T>>,
{
    run_in(netns, op, move || rtnl_here(f))
}

/// Run an rtnetlink conversation on the current thread (which must not be a tokio worker).
fn rtnl_here<T, F, Fut>(f: F) -> io::Result<T>
where
    F: FnOnce(Handle) -> Fut,
    Fut: Future<Output = io::Result<T>>,
{
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()?;
    runtime.block_on(async move {
        let (connection, handle, _) = rtnetlink::new_connection()?;
        let task = tokio::spawn(connection);
        let result = f(handle).await;
        task.abort();
        result
    })
}

async fn link_index(handle: &Handle, name: &str) -> io::Result<Option<u32>> {
    let mut links = handle.link().get().match_name(name.to_string()).execute();
    match links.try_next().await {
        Ok(Some(msg)) => Ok(Some(msg.header.index)),
        Ok(None) => Ok(None),
        Err(e) => {
            let e = nl_err(e);
            if e.raw_os_error() == Some(libc::ENODEV) {
                Ok(None)
            } else {
                Err(e)
            }
        }
    }
}

async fn require_link(handle: &Handle, name: &str) -> io::Result<u32> {
    link_index(handle, name)
        .await?
        .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, format!("no link named {name:?}")))
}

async fn set_up(handle: &Handle, index: u32) -> io::Result<()> {
    handle
        .link()
        .set(LinkUnspec::new_with_index(index).up().build())
        .execute()
        .await
        .map_err(nl_err)
}

fn is_netns_mount(path: &Path) -> bool {
    match nix::sys::statfs::statfs(path) {
        // The integer types of both sides differ between libc targets.
        #[allow(clippy::unnecessary_cast)]
        Ok(st) => st.filesystem_type().0 as i64 == libc::NSFS_MAGIC as i64,
        Err(_) => false,
    }
}

/// Make /run/netns a shared mount point, as `ip netns` does, so that namespaces
/// mounted there are seen from other mount namespaces (e.g. a sandboxed service).
fn prepare_netns_dir() -> io::Result<()> {
    fs::create_dir_all(NETNS_DIR)?;
    let shared = || {
        mount(
            Some("none"),
            NETNS_DIR,
            None::<&str>,
            MsFlags::MS_SHARED | MsFlags::MS_REC,
            None::<&str>,
        )
    };
    match shared() {
        Ok(()) => Ok(()),
        Err(nix::errno::Errno::EINVAL) => {
            mount(
                Some(NETNS_DIR),
                NETNS_DIR,
                None::<&str>,
                MsFlags::MS_BIND | MsFlags::MS_REC,
                None::<&str>,
            )?;
            shared()?;
            Ok(())
        }
        Err(e) => Err(e.into()),
    }
}

fn create_netns(name: &str) -> io::Result<bool> {
    check_netns_name(name)?;
    let path = netns_path(name);
    if is_netns_mount(&path) {
        return Ok(false);
    }
    prepare_netns_dir()?;
    // A plain file left by an interrupted create: take its place.
    match fs::remove_file(&path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o444)
        .open(&path)?;
    let target = path.clone();
    let made = std::thread::Builder::new()
        .name("weft-netns".into())
        .spawn(move || -> io::Result<()> {
            // This thread alone moves to a new namespace, pins it with a bind
            // mount, brings its loopback up, and exits.
            unshare(CloneFlags::CLONE_NEWNET)?;
            mount(
                Some("/proc/thread-self/ns/net"),
                &target,
                None::<&str>,
                MsFlags::MS_BIND,
                None::<&str>,
            )?;
            rtnl_here(|handle| async move {
                let lo = require_link(&handle, "lo").await?;
                set_up(&handle, lo).await
            })
        })?
        .join()
        .unwrap_or_else(|_| Err(io::Error::other("netns worker thread panicked")));
    if let Err(e) = made {
        let _ = umount2(&path, MntFlags::MNT_DETACH);
        let _ = fs::remove_file(&path);
        return Err(e);
    }
    Ok(true)
}

fn delete_netns(name: &str) -> io::Result<()> {
    check_netns_name(name)?;
    let path = netns_path(name);
    match umount2(&path, MntFlags::MNT_DETACH) {
        Ok(()) | Err(nix::errno::Errno::EINVAL) | Err(nix::errno::Errno::ENOENT) => {}
        Err(e) => return Err(e.into()),
    }
    match fs::remove_file(&path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

fn create_tap(name: &str) -> io::Result<bool> {
    if nix::net::if_::if_nametoindex(name).is_ok() {
        return Ok(false);
    }
    let tun = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open("/dev/net/tun")?;
    // SAFETY: ifreq is plain old data; all-zero is a valid value.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in ifr.ifr_name.iter_mut().zip(name.bytes()) {
        *dst = src as libc::c_char;
    }
    ifr.ifr_ifru.ifru_flags =
        (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as libc::c_short;
    // SAFETY: `tun` is an open /dev/net/tun; TUNSETIFF reads and writes one ifreq,
    // which lives on this stack frame for the whole call. The name is NUL-terminated
    // because check_link_name bounded it below IFNAMSIZ and the rest is zero.
    if unsafe { libc::ioctl(tun.as_raw_fd(), libc::TUNSETIFF, &mut ifr) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: TUNSETOWNER and TUNSETPERSIST take an integer argument, no pointer.
    if unsafe { libc::ioctl(tun.as_raw_fd(), libc::TUNSETOWNER, 0 as libc::c_ulong) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: as above. Until this succeeds, closing `tun` removes the device.
    if unsafe { libc::ioctl(tun.as_raw_fd(), libc::TUNSETPERSIST, 1 as libc::c_ulong) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(true)
}

fn check_sysctl_key(key: &str) -> io::Result<()> {
    let ok = !key.is_empty()
        && !key.starts_with('/')
        && key
            .split('/')
            .all(|part| !part.is_empty() && part != "." && part != "..")
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_-./".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("invalid sysctl key {key:?}"),
        ))
    }
}

impl NetOps for Kernel {
    fn create_netns(&self, name: &str) -> Result<bool> {
        create_netns(name).map_err(|e| Error::os(format!("create namespace {name}"), e))
    }

    fn delete_netns(&self, name: &str) -> Result<()> {
        delete_netns(name).map_err(|e| Error::os(format!("delete namespace {name}"), e))
    }

    fn list_netns(&self) -> Result<Vec<String>> {
        let op = "list namespaces";
        let entries = match fs::read_dir(NETNS_DIR) {
            Ok(entries) => entries,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(Error::os(op, e)),
        };
        let mut names = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|e| Error::os(op, e))?;
            if let Some(name) = entry.file_name().to_str() {
                names.push(name.to_string());
            }
        }
        names.sort();
        Ok(names)
    }

    fn create_veth(&self, a: &LinkEnd, b: &LinkEnd) -> Result<bool> {
        let op = format!("create veth {} <-> {}", a.name, b.name);
        let (a, b) = (a.clone(), b.clone());
        check_link_name(&a.name).map_err(|e| Error::os(&op, e))?;
        check_link_name(&b.name).map_err(|e| Error::os(&op, e))?;
        // The peer is created directly in its namespace (IFLA_NET_NS_FD), so the
        // pair never exists half-moved and names never clash in the root namespace.
        let peer_ns = if a.netns == b.netns {
            None
        } else {
            let file = match &b.netns {
                Some(ns) => open_netns(ns),
                None => File::open("/proc/self/ns/net"),
            };
            Some(file.map_err(|e| Error::os(&op, e))?)
        };
        rtnl(a.netns.as_deref(), &op, move |handle| async move {
            if link_index(&handle, &a.name).await?.is_some() {
                return Ok(false);
            }
            let mut peer = LinkMessageBuilder::<LinkUnspec>::new().name(b.name.clone());
            if let Some(file) = &peer_ns {
                peer = peer.setns_by_fd(file.as_raw_fd());
            }
            let msg = LinkMessageBuilder::<LinkVeth>::new(&a.name, &b.name)
                .set_info_data(InfoData::Veth(InfoVeth::Peer(peer.build())))
                .build();
            handle.link().add(msg).execute().await.map_err(nl_err)?;
            drop(peer_ns);
            Ok(true)
        })
    }

    fn create_tap(&self, netns: &str, name: &str) -> Result<bool> {
        let op = format!("create tap {name} in {netns}");
        check_link_name(name).map_err(|e| Error::os(&op, e))?;
        let name = name.to_string();
        run_in(Some(netns), &op, move || create_tap(&name))
    }

    fn delete_link(&self, netns: Option<&str>, name: &str) -> Result<()> {
        let op = format!("delete link {name}");
        let name = name.to_string();
        rtnl(netns, &op, move |handle| async move {
            let Some(index) = link_index(&handle, &name).await? else {
                return Ok(());
            };
            match handle.link().del(index).execute().await.map_err(nl_err) {
                Err(e) if e.raw_os_error() != Some(libc::ENODEV) => Err(e),
                _ => Ok(()),
            }
        })
    }

    fn list_links(&self, netns: Option<&str>) -> Result<Vec<String>> {
        rtnl(netns, "list links", |handle| async move {
            let mut links = handle.link().get().execute();
            let mut names = Vec::new();
            while let Some(msg) = links.try_next().await.map_err(nl_err)? {
                for attr in msg.attributes {
                    if let LinkAttribute::IfName(name) = attr {
                        names.push(name);
                    }
                }
            }
            names.sort();
            Ok(names)
        })
    }

    fn set_link_up(&self, netns: Option<&str>, name: &str) -> Result<()> {
        let op = format!("set link {name} up");
        let name = name.to_string();
        rtnl(netns, &op, move |handle| async move {
            let index = require_link(&handle, &name).await?;
            set_up(&handle, index).await
        })
    }

    fn add_address(&self, netns: Option<&str>, link: &str, addr: Prefix) -> Result<()> {
        let op = format!("add address {addr} to {link}");
        let link = link.to_string();
        rtnl(netns, &op, move |handle| async move {
            let index = require_link(&handle, &link).await?;
            match handle
                .address()
                .add(index, IpAddr::V4(addr.addr), addr.len)
                .execute()
                .await
                .map_err(nl_err)
            {
                Err(e) if e.raw_os_error() != Some(libc::EEXIST) => Err(e),
                _ => Ok(()),
            }
        })
    }

    fn set_default_route(&self, netns: Option<&str>, via: Ipv4Addr) -> Result<()> {
        let op = format!("set default route via {via}");
        rtnl(netns, &op, move |handle| async move {
            let route = RouteMessageBuilder::<Ipv4Addr>::new().gateway(via).build();
            handle
                .route()
                .add(route)
                .replace()
                .execute()
                .await
                .map_err(nl_err)
        })
    }

    fn set_sysctl(&self, netns: Option<&str>, key: &str, value: &str) -> Result<()> {
        let op = format!("set sysctl {key}={value}");
        check_sysctl_key(key).map_err(|e| Error::os(&op, e))?;
        let path = format!("/proc/sys/{key}");
        let value = value.to_string();
        // /proc/sys/net is resolved against the network namespace of the opening thread.
        run_in(netns, &op, move || fs::write(path, value))
    }

    fn apply_nft(&self, netns: Option<&str>, batch: &[NftOp]) -> Result<()> {
        let batch = batch.to_vec();
        run_in(netns, "apply nftables transaction", move || {
            nft::apply(&batch)
        })
    }

    fn list_nft_tables(&self, netns: Option<&str>) -> Result<Vec<String>> {
        run_in(netns, "list nftables tables", nft::list_tables)
    }

    fn list_nft_chains(&self, netns: Option<&str>, table: &NftTable) -> Result<Vec<String>> {
        let table = table.clone();
        let op = format!("list nftables chains of {table}");
        run_in(netns, &op, move || nft::list_chains(&table))
    }
}
