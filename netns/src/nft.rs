//! nftables through nftnl/libmnl: turning [`NftOp`]s into one netlink batch
//! (one transaction), and dumping table and chain names.
//!
//! These functions talk to the netfilter socket of the calling thread's
//! namespace; [`crate::Kernel`] runs them on a thread that entered the right one.

use std::ffi::{CStr, CString};
use std::io;
use std::os::fd::AsRawFd;
use std::os::raw::c_char;
use std::ptr::NonNull;

use nftnl::expr::{Expression, Immediate, Nat, NatType, Register};
use nftnl::nftnl_sys::{self as sys, libc};
use nftnl::{nft_expr, Batch, Chain, MsgType, ProtoFamily, Rule, Table};

use crate::ops::{BaseChain, ChainKind, Family, Hook, Net, NftOp, NftRule, NftTable, Verdict};

/// `NFTA_FIB_F_DADDR`: look up the destination address.
const NFTA_FIB_F_DADDR: u32 = 1 << 1;
/// `NFT_FIB_RESULT_ADDRTYPE`: the result is the route type (RTN_*).
const NFT_FIB_RESULT_ADDRTYPE: u32 = 3;

/// `fib daddr type` (loads the address type of the destination into reg 1).
/// nftnl has no wrapper for the fib expression, so it is built here.
struct FibDaddrType;

impl Expression for FibDaddrType {
    fn to_expr(&self, _rule: &Rule) -> NonNull<sys::nftnl_expr> {
        // SAFETY: the name is a NUL-terminated static string; a null return is handled below.
        let expr = unsafe { sys::nftnl_expr_alloc(c"fib".as_ptr()) };
        let Some(expr) = NonNull::new(expr) else {
            // Out of memory for a tiny allocation: do what nftnl itself does.
            std::process::abort();
        };
        // SAFETY: `expr` is a live fib expression; these attributes are u32 attributes of it.
        unsafe {
            sys::nftnl_expr_set_u32(
                expr.as_ptr(),
                sys::NFTNL_EXPR_FIB_FLAGS as u16,
                NFTA_FIB_F_DADDR,
            );
            sys::nftnl_expr_set_u32(
                expr.as_ptr(),
                sys::NFTNL_EXPR_FIB_RESULT as u16,
                NFT_FIB_RESULT_ADDRTYPE,
            );
            sys::nftnl_expr_set_u32(
                expr.as_ptr(),
                sys::NFTNL_EXPR_FIB_DREG as u16,
                libc::NFT_REG_1 as u32,
            );
        }
        expr
    }
}

/// `IP_CT_DIR_REPLY`: the packet goes the other way than the connection's first one.
const IP_CT_DIR_REPLY: u8 = 1;

/// `ct direction` (loads the packet's conntrack direction into reg 1). nftnl's
/// `Conntrack` expression has no direction key, so it is built here.
struct CtDirection;

impl Expression for CtDirection {
    fn to_expr(&self, _rule: &Rule) -> NonNull<sys::nftnl_expr> {
        // SAFETY: the name is a NUL-terminated static string; a null return is handled below.
        let expr = unsafe { sys::nftnl_expr_alloc(c"ct".as_ptr()) };
        let Some(expr) = NonNull::new(expr) else {
            std::process::abort();
        };
        // SAFETY: `expr` is a live ct expression; key and dreg are u32 attributes of it.
        unsafe {
            sys::nftnl_expr_set_u32(
                expr.as_ptr(),
                sys::NFTNL_EXPR_CT_KEY as u16,
                libc::NFT_CT_DIRECTION as u32,
            );
            sys::nftnl_expr_set_u32(
                expr.as_ptr(),
                sys::NFTNL_EXPR_CT_DREG as u16,
                libc::NFT_REG_1 as u32,
            );
        }
        expr
    }
}

fn cstring(what: &str, s: &str) -> io::Result<CString> {
    CString::new(s).map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{what} {s:?} contains a NUL byte"),
        )
    })
}

fn hook(h: Hook) -> nftnl::Hook {
    match h {
        Hook::Prerouting => nftnl::Hook::PreRouting,
        Hook::Input => nftnl::Hook::In,
        Hook::Forward => nftnl::Hook::Forward,
        Hook::Output => nftnl::Hook::Out,
        Hook::Postrouting => nftnl::Hook::PostRouting,
    }
}

fn proto_family(f: Family) -> ProtoFamily {
    match f {
        Family::Ip => ProtoFamily::Ipv4,
        Family::Inet => ProtoFamily::Inet,
    }
}

fn nft_table(t: &NftTable) -> io::Result<Table> {
    Ok(Table::new(
        cstring("table", &t.name)?,
        proto_family(t.family),
    ))
}

/// `meta nfproto ipv4|ipv6` in an `inet` table, where a payload match on the
/// network header must not read the other family's header; nothing in `ip`.
fn add_match_nfproto(rule: &mut Rule, family: Family, proto: i32) {
    if family == Family::Inet {
        rule.add_expr(&nft_expr!(meta nfproto));
        rule.add_expr(&nft_expr!(cmp == proto as u8));
    }
}

fn add_match_iif(rule: &mut Rule, iif: &str) -> io::Result<()> {
    let iif = cstring("interface", iif)?;
    rule.add_expr(&nft_expr!(meta iifname));
    rule.add_expr(&nft_expr!(cmp == nftnl::expr::InterfaceName::Exact(iif)));
    Ok(())
}

fn add_match_daddr(rule: &mut Rule, family: Family, net: Net) {
    match net {
        Net::V4(p) => {
            add_match_nfproto(rule, family, libc::NFPROTO_IPV4);
            add_match_prefix(rule, nftnl::expr::Ipv4HeaderField::Daddr, p);
        }
        Net::V6(p) => {
            // An `ip` table never sees IPv6, so it never matches there.
            add_match_nfproto(rule, Family::Inet, libc::NFPROTO_IPV6);
            rule.add_expr(&nftnl::expr::Payload::Network(
                nftnl::expr::NetworkHeaderField::Ipv6(nftnl::expr::Ipv6HeaderField::Daddr),
            ));
            rule.add_expr(&nft_expr!(bitwise mask p.mask(), xor std::net::Ipv6Addr::UNSPECIFIED));
            rule.add_expr(&nft_expr!(cmp == p.network().addr));
        }
    }
}

fn add_verdict(rule: &mut Rule, v: Verdict) {
    match v {
        Verdict::Accept => rule.add_expr(&nft_expr!(verdict accept)),
        Verdict::Drop => rule.add_expr(&nft_expr!(verdict drop)),
    }
}

fn add_match_prefix(rule: &mut Rule, field: nftnl::expr::Ipv4HeaderField, p: crate::Prefix) {
    rule.add_expr(&nftnl::expr::Payload::Network(
        nftnl::expr::NetworkHeaderField::Ipv4(field),
    ));
    rule.add_expr(&nft_expr!(bitwise mask p.mask(), xor std::net::Ipv4Addr::UNSPECIFIED));
    rule.add_expr(&nft_expr!(cmp == p.network().addr));
}

fn add_rule_exprs(rule: &mut Rule, family: Family, spec: &NftRule) -> io::Result<()> {
    match spec {
        NftRule::DnatTcpFromLink { iif, to } => {
            let iif = cstring("interface", iif)?;
            rule.add_expr(&nft_expr!(meta iifname));
            rule.add_expr(&nft_expr!(cmp == nftnl::expr::InterfaceName::Exact(iif)));
            rule.add_expr(&nft_expr!(meta l4proto));
            rule.add_expr(&nft_expr!(cmp == libc::IPPROTO_TCP as u8));
            rule.add_expr(&Immediate::new(to.octets(), Register::Reg1));
            rule.add_expr(&Nat {
                nat_type: NatType::DNat,
                family: ProtoFamily::Ipv4,
                ip_register: Register::Reg1,
                port_register: None,
            });
        }
        NftRule::DnatLocalPort { port, to, to_port } => {
            rule.add_expr(&FibDaddrType);
            rule.add_expr(&nft_expr!(cmp == u32::from(libc::RTN_LOCAL)));
            rule.add_expr(&nft_expr!(meta l4proto));
            rule.add_expr(&nft_expr!(cmp == libc::IPPROTO_TCP as u8));
            rule.add_expr(&nft_expr!(payload tcp dport));
            rule.add_expr(&nft_expr!(cmp == port.to_be()));
            rule.add_expr(&Immediate::new(to.octets(), Register::Reg1));
            rule.add_expr(&Immediate::new(to_port.to_be(), Register::Reg2));
            rule.add_expr(&Nat {
                nat_type: NatType::DNat,
                family: ProtoFamily::Ipv4,
                ip_register: Register::Reg1,
                port_register: Some(Register::Reg2),
            });
        }
        NftRule::Masquerade { saddr, daddr, oif } => {
            add_match_nfproto(rule, family, libc::NFPROTO_IPV4);
            add_match_prefix(rule, nftnl::expr::Ipv4HeaderField::Saddr, *saddr);
            if let Some(daddr) = daddr {
                add_match_prefix(rule, nftnl::expr::Ipv4HeaderField::Daddr, *daddr);
            }
            if let Some(oif) = oif {
                let oif = cstring("interface", oif)?;
                rule.add_expr(&nft_expr!(meta oifname));
                rule.add_expr(&nft_expr!(cmp == nftnl::expr::InterfaceName::Exact(oif)));
            }
            rule.add_expr(&nft_expr!(masquerade));
        }
        NftRule::AcceptReplies { iif } => {
            add_match_iif(rule, iif)?;
            rule.add_expr(&CtDirection);
            rule.add_expr(&nft_expr!(cmp == IP_CT_DIR_REPLY));
            rule.add_expr(&nft_expr!(verdict accept));
        }
        NftRule::AcceptRelated { iif } => {
            add_match_iif(rule, iif)?;
            let related = nftnl::expr::States::RELATED;
            rule.add_expr(&nft_expr!(ct state));
            rule.add_expr(&nft_expr!(bitwise mask related.bits(), xor 0u32));
            rule.add_expr(&nft_expr!(cmp != 0u32));
            rule.add_expr(&nft_expr!(verdict accept));
        }
        NftRule::AcceptUdp { iif, port } => {
            add_match_iif(rule, iif)?;
            rule.add_expr(&nft_expr!(meta l4proto));
            rule.add_expr(&nft_expr!(cmp == libc::IPPROTO_UDP as u8));
            rule.add_expr(&nft_expr!(payload udp dport));
            rule.add_expr(&nft_expr!(cmp == port.to_be()));
            rule.add_expr(&nft_expr!(verdict accept));
        }
        NftRule::FromLink {
            iif,
            daddr,
            verdict,
        } => {
            add_match_iif(rule, iif)?;
            if let Some(net) = daddr {
                add_match_daddr(rule, family, *net);
            }
            add_verdict(rule, *verdict);
        }
    }
    Ok(())
}

/// Serialize the ops into one batch (begin … end): the kernel commits all or nothing.
fn build_batch(ops: &[NftOp]) -> io::Result<nftnl::FinalizedBatch> {
    let mut batch = Batch::new();
    for op in ops {
        match op {
            NftOp::AddTable { table } => {
                let t = nft_table(table)?;
                batch.add(&t, MsgType::Add);
            }
            NftOp::DeleteTable { table } => {
                let t = nft_table(table)?;
                batch.add(&t, MsgType::Del);
            }
            NftOp::AddChain { table, chain, base } => {
                let t = nft_table(table)?;
                let mut c = Chain::new(cstring("chain", chain)?, &t);
                if let Some(BaseChain {
                    kind,
                    hook: h,
                    priority,
                }) = base
                {
                    c.set_hook(hook(*h), *priority);
                    c.set_type(match kind {
                        ChainKind::Nat => nftnl::ChainType::Nat,
                        ChainKind::Filter => nftnl::ChainType::Filter,
                    });
                    c.set_policy(nftnl::Policy::Accept);
                }
                batch.add(&c, MsgType::Add);
            }
            NftOp::FlushChain { table, chain } => {
                let t = nft_table(table)?;
                let c = Chain::new(cstring("chain", chain)?, &t);
                // A rule delete without a handle deletes every rule of the chain.
                let r = Rule::new(&c);
                batch.add(&r, MsgType::Del);
            }
            NftOp::DeleteChain { table, chain } => {
                let t = nft_table(table)?;
                let c = Chain::new(cstring("chain", chain)?, &t);
                batch.add(&c, MsgType::Del);
            }
            NftOp::AddRule {
                table,
                chain,
                rule,
                comment,
            } => {
                let t = nft_table(table)?;
                let c = Chain::new(cstring("chain", chain)?, &t);
                let mut r = Rule::new(&c);
                add_rule_exprs(&mut r, table.family, rule)?;
                if let Some(comment) = comment {
                    r.set_comment(cstring("comment", comment)?)
                        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
                }
                batch.add(&r, MsgType::Add);
            }
        }
    }
    Ok(batch.finalize())
}

fn socket() -> io::Result<mnl::Socket> {
    let socket = mnl::Socket::new(mnl::Bus::Netfilter)?;
    // A lost answer must not hang the daemon: give up after a while.
    let timeout = libc::timeval {
        tv_sec: 10,
        tv_usec: 0,
    };
    // SAFETY: the fd belongs to `socket`, which is alive; the option value is a
    // valid timeval whose size is passed along.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&timeout as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(socket)
}

/// A receive buffer aligned for `nlmsghdr`, as libmnl requires.
struct RecvBuf {
    storage: Vec<u8>,
    start: usize,
}

impl RecvBuf {
    fn new() -> Self {
        let len = nftnl::nft_nlmsg_maxsize() as usize;
        let storage = vec![0u8; len + std::mem::align_of::<libc::nlmsghdr>()];
        let start = storage
            .as_ptr()
            .align_offset(std::mem::align_of::<libc::nlmsghdr>());
        RecvBuf { storage, start }
    }

    fn get(&mut self) -> &mut [u8] {
        &mut self.storage[self.start..]
    }
}

/// Send the batch and wait for the kernel's verdict on every message.
pub(crate) fn apply(ops: &[NftOp]) -> io::Result<()> {
    if ops.is_empty() {
        return Ok(());
    }
    let batch = build_batch(ops)?;
    let socket = socket()?;
    let portid = socket.portid();
    socket.send_all(&batch)?;
    let mut buf = RecvBuf::new();
    let mut expected = batch.sequence_numbers();
    while !expected.is_empty() {
        for message in socket.recv(buf.get())? {
            let message = message?;
            let Some(seq) = expected.next() else {
                return Err(io::Error::other("unexpected netfilter acknowledgement"));
            };
            mnl::cb_run(message, seq, portid)?;
        }
    }
    Ok(())
}

fn dump<T>(msg_type: i32, family: u16, cb: mnl::Callback<T>, data: &mut T) -> io::Result<()> {
    let socket = socket()?;
    let portid = socket.portid();
    let seq = 1;
    let mut req = RecvBuf::new();
    let hdr_len;
    {
        let buf = req.get();
        // SAFETY: `buf` is aligned and `nft_nlmsg_maxsize()` bytes long, the size
        // nftnl_nlmsg_build_hdr may write; it returns a pointer into `buf`.
        let hdr = unsafe {
            sys::nftnl_nlmsg_build_hdr(
                buf.as_mut_ptr().cast::<c_char>(),
                msg_type as u16,
                family,
                (libc::NLM_F_DUMP | libc::NLM_F_ACK) as u16,
                seq,
            )
        };
        // SAFETY: `hdr` points at the header just built inside `buf`.
        hdr_len = unsafe { (*hdr).nlmsg_len } as usize;
    }
    socket.send(&req.get()[..hdr_len])?;
    let mut buf = RecvBuf::new();
    loop {
        let n = socket.recv_raw(buf.get())?;
        if n == 0 {
            return Ok(());
        }
        match mnl::cb_run2(&buf.get()[..n], seq, portid, cb, data)? {
            mnl::CbResult::Stop => return Ok(()),
            mnl::CbResult::Ok => {}
        }
    }
}

fn tables_cb(header: &libc::nlmsghdr, tables: &mut Vec<String>) -> libc::c_int {
    // SAFETY: the table object is allocated here and freed before returning; the
    // header is a complete message handed over by libmnl; the name pointer is
    // only read while the table object lives.
    unsafe {
        let t = sys::nftnl_table_alloc();
        if t.is_null() {
            return mnl::mnl_sys::MNL_CB_ERROR;
        }
        if sys::nftnl_table_nlmsg_parse(header, t) < 0 {
            sys::nftnl_table_free(t);
            return mnl::mnl_sys::MNL_CB_ERROR;
        }
        let name = sys::nftnl_table_get_str(t, sys::NFTNL_TABLE_NAME as u16);
        if !name.is_null() {
            tables.push(CStr::from_ptr(name).to_string_lossy().into_owned());
        }
        sys::nftnl_table_free(t);
    }
    mnl::mnl_sys::MNL_CB_OK
}

struct ChainFilter {
    table: String,
    chains: Vec<String>,
}

fn chains_cb(header: &libc::nlmsghdr, out: &mut ChainFilter) -> libc::c_int {
    // SAFETY: as in `tables_cb`, for a chain object.
    unsafe {
        let c = sys::nftnl_chain_alloc();
        if c.is_null() {
            return mnl::mnl_sys::MNL_CB_ERROR;
        }
        if sys::nftnl_chain_nlmsg_parse(header, c) < 0 {
            sys::nftnl_chain_free(c);
            return mnl::mnl_sys::MNL_CB_ERROR;
        }
        let table = sys::nftnl_chain_get_str(c, sys::NFTNL_CHAIN_TABLE as u16);
        let name = sys::nftnl_chain_get_str(c, sys::NFTNL_CHAIN_NAME as u16);
        if !table.is_null()
            && !name.is_null()
            && CStr::from_ptr(table).to_bytes() == out.table.as_bytes()
        {
            out.chains
                .push(CStr::from_ptr(name).to_string_lossy().into_owned());
        }
        sys::nftnl_chain_free(c);
    }
    mnl::mnl_sys::MNL_CB_OK
}

/// Names of the `ip` family tables.
pub(crate) fn list_tables() -> io::Result<Vec<String>> {
    let mut tables = Vec::new();
    dump(
        libc::NFT_MSG_GETTABLE,
        libc::NFPROTO_IPV4 as u16,
        tables_cb,
        &mut tables,
    )?;
    tables.sort();
    Ok(tables)
}

/// Names of the chains of `table`.
pub(crate) fn list_chains(table: &NftTable) -> io::Result<Vec<String>> {
    let mut filter = ChainFilter {
        table: table.name.clone(),
        chains: Vec::new(),
    };
    dump(
        libc::NFT_MSG_GETCHAIN,
        proto_family(table.family) as u16,
        chains_cb,
        &mut filter,
    )?;
    filter.chains.sort();
    Ok(filter.chains)
}
