//! A recording test double for [`NetOps`] (after youki's `TestHelperSyscall`).
//!
//! It records every call, keeps a small model of the kernel objects (namespaces,
//! links, veth pairs, nftables tables/chains/rules) so that listings answer
//! consistently, and can be told to fail a chosen call.

use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::net::Ipv4Addr;
use std::sync::{Mutex, MutexGuard};

use crate::ops::{Family, LinkEnd, NetOps, NftOp, NftRule, NftTable, Prefix};
use crate::{Error, Result};

/// One recorded call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Call {
    /// [`NetOps::create_netns`]
    CreateNetns(String),
    /// [`NetOps::delete_netns`]
    DeleteNetns(String),
    /// [`NetOps::list_netns`]
    ListNetns,
    /// [`NetOps::create_veth`]
    CreateVeth(LinkEnd, LinkEnd),
    /// [`NetOps::create_tap`]
    CreateTap {
        /// Namespace.
        netns: String,
        /// Tap name.
        name: String,
    },
    /// [`NetOps::delete_link`]
    DeleteLink(LinkEnd),
    /// [`NetOps::list_links`]
    ListLinks(Option<String>),
    /// [`NetOps::set_link_up`]
    SetLinkUp(LinkEnd),
    /// [`NetOps::add_address`]
    AddAddress(LinkEnd, Prefix),
    /// [`NetOps::set_default_route`]
    SetDefaultRoute(Option<String>, Ipv4Addr),
    /// [`NetOps::set_sysctl`]
    SetSysctl {
        /// Namespace.
        netns: Option<String>,
        /// Key under /proc/sys.
        key: String,
        /// Value.
        value: String,
    },
    /// [`NetOps::apply_nft`]
    ApplyNft(Option<String>, Vec<NftOp>),
    /// [`NetOps::list_nft_tables`]
    ListNftTables(Option<String>),
    /// [`NetOps::list_nft_chains`]
    ListNftChains(Option<String>, NftTable),
}

impl Call {
    /// Whether the call changes something (lists do not).
    pub fn is_mutation(&self) -> bool {
        !matches!(
            self,
            Call::ListNetns | Call::ListLinks(_) | Call::ListNftTables(_) | Call::ListNftChains(..)
        )
    }
}

/// A link in the model: (namespace, name).
type End = (Option<String>, String);
type Chains = BTreeMap<String, Vec<NftRule>>;
type Tables = BTreeMap<NftTable, Chains>;

#[derive(Debug, Default, Clone)]
struct Model {
    netns: BTreeSet<String>,
    links: BTreeSet<End>,
    veths: Vec<(End, End)>,
    tables: BTreeMap<Option<String>, Tables>,
}

#[derive(Default)]
struct State {
    calls: Vec<Call>,
    mutations: usize,
    fail_nth: Option<usize>,
    model: Model,
}

/// The recording test double.
#[derive(Default)]
pub struct Recorder {
    state: Mutex<State>,
}

impl std::fmt::Debug for Recorder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Recorder").finish_non_exhaustive()
    }
}

fn key(end: &LinkEnd) -> End {
    (end.netns.clone(), end.name.clone())
}

fn errno(op: &str, code: i32) -> Error {
    Error::os(op, io::Error::from_raw_os_error(code))
}

impl Recorder {
    /// An empty host: no namespaces, links or tables.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panicking test must not hide the calls from the others.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Make the `n`th mutating call from now on (1-based) fail with EIO.
    pub fn fail_nth_mutation(&self, n: usize) {
        let mut st = self.lock();
        st.fail_nth = Some(st.mutations + n);
    }

    /// Every call so far.
    pub fn calls(&self) -> Vec<Call> {
        self.lock().calls.clone()
    }

    /// The mutating calls so far.
    pub fn mutations(&self) -> Vec<Call> {
        self.calls().into_iter().filter(Call::is_mutation).collect()
    }

    /// Forget the recorded calls (the model stays).
    pub fn clear_calls(&self) {
        self.lock().calls.clear();
    }

    /// Namespaces in the model.
    pub fn netns(&self) -> Vec<String> {
        self.lock().model.netns.iter().cloned().collect()
    }

    /// Links of a namespace in the model.
    pub fn links(&self, netns: Option<&str>) -> Vec<String> {
        let ns = netns.map(str::to_string);
        self.lock()
            .model
            .links
            .iter()
            .filter(|(n, _)| *n == ns)
            .map(|(_, l)| l.clone())
            .collect()
    }

    /// `ip` tables of a namespace in the model.
    pub fn tables(&self, netns: Option<&str>) -> Vec<String> {
        self.tables_of(netns, Family::Ip)
    }

    /// Tables of one family of a namespace in the model.
    pub fn tables_of(&self, netns: Option<&str>, family: Family) -> Vec<String> {
        let ns = netns.map(str::to_string);
        self.lock()
            .model
            .tables
            .get(&ns)
            .map(|t| {
                t.keys()
                    .filter(|k| k.family == family)
                    .map(|k| k.name.clone())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Chains of a table in the model.
    pub fn chains(&self, netns: Option<&str>, table: &NftTable) -> Vec<String> {
        let ns = netns.map(str::to_string);
        self.lock()
            .model
            .tables
            .get(&ns)
            .and_then(|t| t.get(table))
            .map(|c| c.keys().cloned().collect())
            .unwrap_or_default()
    }

    /// Rules of a chain of an `ip` table in the model.
    pub fn rules(&self, netns: Option<&str>, table: &str, chain: &str) -> Vec<NftRule> {
        self.rules_in(netns, &table.into(), chain)
    }

    /// Rules of a chain of any table in the model.
    pub fn rules_in(&self, netns: Option<&str>, table: &NftTable, chain: &str) -> Vec<NftRule> {
        let ns = netns.map(str::to_string);
        self.lock()
            .model
            .tables
            .get(&ns)
            .and_then(|t| t.get(table))
            .and_then(|c| c.get(chain))
            .cloned()
            .unwrap_or_default()
    }

    /// Record a call; fail it if it is the chosen one; else run `f` on the model.
    fn call<T>(&self, call: Call, f: impl FnOnce(&mut Model) -> Result<T>) -> Result<T> {
        let mut st = self.lock();
        let mutation = call.is_mutation();
        let op = format!("{call:?}");
        st.calls.push(call);
        if mutation {
            st.mutations += 1;
            if st.fail_nth == Some(st.mutations) {
                return Err(Error::os(op, io::Error::other("injected failure")));
            }
        }
        f(&mut st.model)
    }
}

impl Model {
    fn has_ns(&self, netns: &Option<String>) -> bool {
        netns.as_ref().is_none_or(|n| self.netns.contains(n))
    }

    fn need_ns(&self, op: &str, netns: &Option<String>) -> Result<()> {
        if self.has_ns(netns) {
            Ok(())
        } else {
            Err(errno(op, libc::ENOENT))
        }
    }

    fn need_link(&self, op: &str, end: &End) -> Result<()> {
        self.need_ns(op, &end.0)?;
        if self.links.contains(end) {
            Ok(())
        } else {
            Err(errno(op, libc::ENODEV))
        }
    }

    fn remove_link(&mut self, end: &End) {
        self.links.remove(end);
        let mut peers = Vec::new();
        self.veths.retain(|(a, b)| {
            if a == end {
                peers.push(b.clone());
                false
            } else if b == end {
                peers.push(a.clone());
                false
            } else {
                true
            }
        });
        for p in peers {
            self.links.remove(&p);
        }
    }

    fn apply(tables: &mut Tables, op: &NftOp) -> std::result::Result<(), i32> {
        match op {
            NftOp::AddTable { table } => {
                tables.entry(table.clone()).or_default();
            }
            NftOp::DeleteTable { table } => {
                tables.remove(table).ok_or(libc::ENOENT)?;
            }
            NftOp::AddChain { table, chain, .. } => {
                tables
                    .get_mut(table)
                    .ok_or(libc::ENOENT)?
                    .entry(chain.clone())
                    .or_default();
            }
            NftOp::FlushChain { table, chain } => {
                tables
                    .get_mut(table)
                    .and_then(|t| t.get_mut(chain))
                    .ok_or(libc::ENOENT)?
                    .clear();
            }
            NftOp::DeleteChain { table, chain } => {
                let t = tables.get_mut(table).ok_or(libc::ENOENT)?;
                match t.get(chain) {
                    None => return Err(libc::ENOENT),
                    Some(rules) if !rules.is_empty() => return Err(libc::EBUSY),
                    Some(_) => {
                        t.remove(chain);
                    }
                }
            }
            NftOp::AddRule {
                table, chain, rule, ..
            } => {
                tables
                    .get_mut(table)
                    .and_then(|t| t.get_mut(chain))
                    .ok_or(libc::ENOENT)?
                    .push(rule.clone());
            }
        }
        Ok(())
    }
}

impl NetOps for Recorder {
    fn create_netns(&self, name: &str) -> Result<bool> {
        self.call(Call::CreateNetns(name.into()), |m| {
            Ok(m.netns.insert(name.to_string()))
        })
    }

    fn delete_netns(&self, name: &str) -> Result<()> {
        self.call(Call::DeleteNetns(name.into()), |m| {
            if m.netns.remove(name) {
                let ns = Some(name.to_string());
                let inside: Vec<_> = m.links.iter().filter(|(n, _)| *n == ns).cloned().collect();
                for end in inside {
                    m.remove_link(&end);
                }
                m.tables.remove(&ns);
            }
            Ok(())
        })
    }

    fn list_netns(&self) -> Result<Vec<String>> {
        self.call(Call::ListNetns, |m| Ok(m.netns.iter().cloned().collect()))
    }

    fn create_veth(&self, a: &LinkEnd, b: &LinkEnd) -> Result<bool> {
        let op = format!("create veth {} <-> {}", a.name, b.name);
        self.call(Call::CreateVeth(a.clone(), b.clone()), |m| {
            m.need_ns(&op, &a.netns)?;
            m.need_ns(&op, &b.netns)?;
            let (ka, kb) = (key(a), key(b));
            if m.links.contains(&ka) {
                return Ok(false);
            }
            if m.links.contains(&kb) {
                return Err(errno(&op, libc::EEXIST));
            }
            m.links.insert(ka.clone());
            m.links.insert(kb.clone());
            m.veths.push((ka, kb));
            Ok(true)
        })
    }

    fn create_tap(&self, netns: &str, name: &str) -> Result<bool> {
        let op = format!("create tap {name}");
        let call = Call::CreateTap {
            netns: netns.into(),
            name: name.into(),
        };
        self.call(call, |m| {
            let ns = Some(netns.to_string());
            m.need_ns(&op, &ns)?;
            Ok(m.links.insert((ns, name.to_string())))
        })
    }

    fn delete_link(&self, netns: Option<&str>, name: &str) -> Result<()> {
        let end = LinkEnd {
            netns: netns.map(str::to_string),
            name: name.into(),
        };
        self.call(Call::DeleteLink(end.clone()), |m| {
            m.need_ns("delete link", &end.netns)?;
            m.remove_link(&key(&end));
            Ok(())
        })
    }

    fn list_links(&self, netns: Option<&str>) -> Result<Vec<String>> {
        let ns = netns.map(str::to_string);
        self.call(Call::ListLinks(ns.clone()), |m| {
            m.need_ns("list links", &ns)?;
            Ok(m.links
                .iter()
                .filter(|(n, _)| *n == ns)
                .map(|(_, l)| l.clone())
                .collect())
        })
    }

    fn set_link_up(&self, netns: Option<&str>, name: &str) -> Result<()> {
        let end = LinkEnd {
            netns: netns.map(str::to_string),
            name: name.into(),
        };
        self.call(Call::SetLinkUp(end.clone()), |m| {
            m.need_link("set link up", &key(&end))
        })
    }

    fn add_address(&self, netns: Option<&str>, link: &str, addr: Prefix) -> Result<()> {
        let end = LinkEnd {
            netns: netns.map(str::to_string),
            name: link.into(),
        };
        self.call(Call::AddAddress(end.clone(), addr), |m| {
            m.need_link("add address", &key(&end))
        })
    }

    fn set_default_route(&self, netns: Option<&str>, via: Ipv4Addr) -> Result<()> {
        let ns = netns.map(str::to_string);
        self.call(Call::SetDefaultRoute(ns.clone(), via), |m| {
            m.need_ns("set default route", &ns)
        })
    }

    fn set_sysctl(&self, netns: Option<&str>, key: &str, value: &str) -> Result<()> {
        let ns = netns.map(str::to_string);
        let call = Call::SetSysctl {
            netns: ns.clone(),
            key: key.into(),
            value: value.into(),
        };
        self.call(call, |m| m.need_ns("set sysctl", &ns))
    }

    fn apply_nft(&self, netns: Option<&str>, batch: &[NftOp]) -> Result<()> {
        let ns = netns.map(str::to_string);
        self.call(Call::ApplyNft(ns.clone(), batch.to_vec()), |m| {
            m.need_ns("apply nftables", &ns)?;
            // All or nothing, like the kernel's transaction.
            let mut tables = m.tables.get(&ns).cloned().unwrap_or_default();
            for op in batch {
                Model::apply(&mut tables, op)
                    .map_err(|code| errno(&format!("apply nftables {op:?}"), code))?;
            }
            m.tables.insert(ns, tables);
            Ok(())
        })
    }

    fn list_nft_tables(&self, netns: Option<&str>) -> Result<Vec<String>> {
        let ns = netns.map(str::to_string);
        self.call(Call::ListNftTables(ns.clone()), |m| {
            m.need_ns("list tables", &ns)?;
            Ok(m.tables
                .get(&ns)
                .map(|t| {
                    t.keys()
                        .filter(|k| k.family == Family::Ip)
                        .map(|k| k.name.clone())
                        .collect()
                })
                .unwrap_or_default())
        })
    }

    fn list_nft_chains(&self, netns: Option<&str>, table: &NftTable) -> Result<Vec<String>> {
        let ns = netns.map(str::to_string);
        self.call(Call::ListNftChains(ns.clone(), table.clone()), |m| {
            m.need_ns("list chains", &ns)?;
            Ok(m.tables
                .get(&ns)
                .and_then(|t| t.get(table))
                .map(|c| c.keys().cloned().collect())
                .unwrap_or_default())
        })
    }
}
