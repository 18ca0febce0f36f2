//! What a weave's traffic may reach: the root namespace's `inet weft-filter` table
//! (one set of chains per weave, by the policy of its [`Egress`]) and the filter
//! inside each weave namespace (the guest reaches nothing of the namespace but DHCP).
//!
//! The rules match the input link (`wh<index>` in the root namespace, the guest link
//! inside the weave's), so IPv4 and IPv6 are treated alike; only the private
//! destinations of [`Egress::Internet`] name a family.

use std::fmt;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

use crate::ops::{
    BaseChain, ChainKind, Hook, Net, NetOps, NftOp, NftRule, NftTable, Prefix, Prefix6, Verdict,
};
use crate::plan::{host_link, ns_addr};
use crate::{Error, Result};

/// Name of the `inet` filter tables (root namespace and weave namespaces).
pub const FILTER_TABLE: &str = "weft-filter";

/// The `inet weft-filter` table.
pub fn filter_table() -> NftTable {
    NftTable::inet(FILTER_TABLE)
}

/// The UDP port weftd's DHCP server answers on inside a weave namespace.
pub const DHCP_SERVER_PORT: u16 = 67;

/// What a weave's guest may open connections to. Connections routed to the guest
/// (host ports) and their replies work under every policy.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Egress {
    /// Nothing: not the host, not other weaves, not any network.
    #[default]
    None,
    /// Public addresses only: not the host's own addresses, other weaves or the
    /// private, shared, link-local and unique-local networks ([`PRIVATE_V4`], [`PRIVATE_V6`]).
    Internet,
    /// Everything, the host included.
    All,
}

impl Egress {
    /// The policy's name, as the API and the CLI spell it.
    pub fn as_str(&self) -> &'static str {
        match self {
            Egress::None => "none",
            Egress::Internet => "internet",
            Egress::All => "all",
        }
    }
}

impl fmt::Display for Egress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Egress {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "none" => Ok(Egress::None),
            "internet" => Ok(Egress::Internet),
            "all" => Ok(Egress::All),
            other => Err(Error::InvalidPlan(format!(
                "egress {other:?} is not one of none, internet, all"
            ))),
        }
    }
}

/// IPv4 destinations `internet` egress refuses: 10/8 (weaves' 10.231/16 included),
/// 172.16/12, 192.168/16, 100.64/10 (shared address space) and 169.254/16 (link-local).
/// The host's own addresses are refused by the input chain whatever they are.
pub const PRIVATE_V4: [Prefix; 5] = [
    Prefix::new(Ipv4Addr::new(10, 0, 0, 0), 8),
    Prefix::new(Ipv4Addr::new(172, 16, 0, 0), 12),
    Prefix::new(Ipv4Addr::new(192, 168, 0, 0), 16),
    Prefix::new(Ipv4Addr::new(100, 64, 0, 0), 10),
    Prefix::new(Ipv4Addr::new(169, 254, 0, 0), 16),
];

/// IPv6 destinations `internet` egress refuses: unique-local fc00::/7 and link-local fe80::/10.
pub const PRIVATE_V6: [Prefix6; 2] = [
    Prefix6::new(Ipv6Addr::new(0xfc00, 0, 0, 0, 0, 0, 0, 0), 7),
    Prefix6::new(Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 0), 10),
];

/// The chains of weave `index` in the root filter table: input, forward, and
/// (for egress beyond the host) the masquerade of the weave's address.
pub fn filter_chains(index: u8) -> [String; 3] {
    [
        format!("w{index}-in"),
        format!("w{index}-fwd"),
        format!("w{index}-nat"),
    ]
}

/// The weave index a root filter chain belongs to.
pub(crate) fn parse_filter_chain(chain: &str) -> Option<u8> {
    let rest = chain.strip_prefix('w')?;
    let (digits, side) = rest.split_once('-')?;
    if !matches!(side, "in" | "fwd" | "nat")
        || digits.is_empty()
        || (digits.len() > 1 && digits.starts_with('0'))
    {
        return None;
    }
    digits.parse().ok()
}

const SRCNAT_INET: BaseChain = BaseChain {
    kind: ChainKind::Nat,
    hook: Hook::Postrouting,
    priority: 100,
};

fn remove_chain_ops(table: &NftTable, chain: &str, base: BaseChain) -> [NftOp; 3] {
    // add + flush + delete: gone whether or not it existed, in the same transaction.
    [
        NftOp::AddChain {
            table: table.clone(),
            chain: chain.to_string(),
            base: Some(base),
        },
        NftOp::FlushChain {
            table: table.clone(),
            chain: chain.to_string(),
        },
        NftOp::DeleteChain {
            table: table.clone(),
            chain: chain.to_string(),
        },
    ]
}

fn rule(table: &NftTable, chain: &str, rule: NftRule, comment: &str) -> NftOp {
    NftOp::AddRule {
        table: table.clone(),
        chain: chain.to_string(),
        rule,
        comment: Some(format!("weft: {comment}")),
    }
}

/// One transaction that (re)writes weave `index`'s chains of the root filter table
/// for `egress`. The chains are removed and added again in the same batch, so no
/// packet ever sees the weave half-filtered.
pub fn filter_ops(index: u8, egress: Egress) -> Vec<NftOp> {
    let t = filter_table();
    let wh = host_link(index);
    let [input, forward, nat] = filter_chains(index);
    let mut ops = vec![NftOp::AddTable { table: t.clone() }];
    ops.extend(remove_chain_ops(&t, &input, BaseChain::INPUT_FILTER));
    ops.extend(remove_chain_ops(&t, &forward, BaseChain::FORWARD_FILTER));
    ops.extend(remove_chain_ops(&t, &nat, SRCNAT_INET));

    let replies = |chain: &str| {
        [
            rule(
                &t,
                chain,
                NftRule::AcceptReplies { iif: wh.clone() },
                "replies to connections routed to the weave",
            ),
            rule(
                &t,
                chain,
                NftRule::AcceptRelated { iif: wh.clone() },
                "errors about known connections",
            ),
        ]
    };
    let drop_all = |chain: &str, why: &str| {
        rule(
            &t,
            chain,
            NftRule::FromLink {
                iif: wh.clone(),
                daddr: None,
                verdict: Verdict::Drop,
            },
            why,
        )
    };

    for (chain, base) in [
        (&input, BaseChain::INPUT_FILTER),
        (&forward, BaseChain::FORWARD_FILTER),
    ] {
        ops.push(NftOp::AddChain {
            table: t.clone(),
            chain: chain.clone(),
            base: Some(base),
        });
    }
    match egress {
        Egress::None | Egress::Internet => {
            ops.extend(replies(&input));
            ops.push(drop_all(&input, "the weave reaches nothing of the host"));
        }
        Egress::All => {}
    }
    match egress {
        Egress::None => {
            ops.extend(replies(&forward));
            ops.push(drop_all(&forward, "egress none"));
        }
        Egress::Internet => {
            ops.extend(replies(&forward));
            let private = PRIVATE_V4
                .iter()
                .map(|p| Net::V4(*p))
                .chain(PRIVATE_V6.iter().map(|p| Net::V6(*p)));
            for net in private {
                ops.push(rule(
                    &t,
                    &forward,
                    NftRule::FromLink {
                        iif: wh.clone(),
                        daddr: Some(net),
                        verdict: Verdict::Drop,
                    },
                    "egress internet: no private networks",
                ));
            }
        }
        Egress::All => {}
    }
    if egress != Egress::None {
        ops.push(NftOp::AddChain {
            table: t.clone(),
            chain: nat.clone(),
            base: Some(SRCNAT_INET),
        });
        ops.push(rule(
            &t,
            &nat,
            NftRule::Masquerade {
                saddr: Prefix::new(ns_addr(index), 32),
                daddr: None,
                oif: None,
            },
            "weave egress leaves as the host",
        ));
    }
    ops
}

/// Weave `index`'s chains removed from the root filter table; the table too when
/// no other chain is left in it (someone else's weaves may have chains there).
pub(crate) fn remove_filter_ops(index: u8, present: &[String]) -> Vec<NftOp> {
    let t = filter_table();
    let mine = filter_chains(index);
    if present.is_empty() {
        return Vec::new();
    }
    if present.iter().all(|c| mine.contains(c)) {
        return vec![NftOp::DeleteTable { table: t }];
    }
    let mut ops = Vec::new();
    for c in mine.iter().filter(|c| present.contains(c)) {
        ops.push(NftOp::FlushChain {
            table: t.clone(),
            chain: c.clone(),
        });
        ops.push(NftOp::DeleteChain {
            table: t.clone(),
            chain: c.clone(),
        });
    }
    ops
}

/// Sets weave `index`'s egress policy in the root namespace (one transaction). The
/// change applies to new connections and to packets of connections the guest opened
/// before: those the new policy refuses are dropped from the next packet on.
pub fn set_egress(ops: &dyn NetOps, index: u8, egress: Egress) -> Result<()> {
    ops.apply_nft(None, &filter_ops(index, egress))
}

/// Removes weave `index`'s chains from the root filter table.
pub fn remove_filter(ops: &dyn NetOps, index: u8) -> Result<()> {
    let present = ops.list_nft_chains(None, &filter_table())?;
    let batch = remove_filter_ops(index, &present);
    if batch.is_empty() {
        return Ok(());
    }
    ops.apply_nft(None, &batch)
}

/// The filter table inside a weave namespace: from the guest link, DHCP requests,
/// replies to connections made towards the guest and related errors reach the
/// namespace itself; nothing else does (forwarded traffic is the root filter's).
pub(crate) fn ns_filter_ops(guest_link: &str) -> Vec<NftOp> {
    let t = filter_table();
    let g = guest_link.to_string();
    vec![
        // add + delete + add: replaces the table atomically whether or not it existed.
        NftOp::AddTable { table: t.clone() },
        NftOp::DeleteTable { table: t.clone() },
        NftOp::AddTable { table: t.clone() },
        NftOp::AddChain {
            table: t.clone(),
            chain: "input".into(),
            base: Some(BaseChain::INPUT_FILTER),
        },
        rule(
            &t,
            "input",
            NftRule::AcceptUdp {
                iif: g.clone(),
                port: DHCP_SERVER_PORT,
            },
            "DHCP from the guest",
        ),
        rule(
            &t,
            "input",
            NftRule::AcceptReplies { iif: g.clone() },
            "replies to the namespace's own connections",
        ),
        rule(
            &t,
            "input",
            NftRule::AcceptRelated { iif: g.clone() },
            "errors about known connections",
        ),
        rule(
            &t,
            "input",
            NftRule::FromLink {
                iif: g,
                daddr: None,
                verdict: Verdict::Drop,
            },
            "the guest reaches nothing else of the namespace",
        ),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::recorder::Recorder;

    #[test]
    fn egress_names_round_trip() {
        for e in [Egress::None, Egress::Internet, Egress::All] {
            assert_eq!(e.as_str().parse::<Egress>().unwrap(), e);
        }
        assert!("everything".parse::<Egress>().is_err());
        assert_eq!(Egress::default(), Egress::None);
    }

    #[test]
    fn filter_chain_names_parse() {
        assert_eq!(parse_filter_chain("w7-in"), Some(7));
        assert_eq!(parse_filter_chain("w255-nat"), Some(255));
        assert_eq!(parse_filter_chain("w07-in"), None);
        assert_eq!(parse_filter_chain("w256-fwd"), None);
        assert_eq!(parse_filter_chain("input"), None);
    }

    #[test]
    fn egress_none_drops_everything_from_the_link_but_replies() {
        let rec = Recorder::new();
        set_egress(&rec, 7, Egress::None).unwrap();
        let t = filter_table();
        assert_eq!(rec.chains(None, &t), vec!["w7-fwd", "w7-in"]);
        let expected = vec![
            NftRule::AcceptReplies { iif: "wh7".into() },
            NftRule::AcceptRelated { iif: "wh7".into() },
            NftRule::FromLink {
                iif: "wh7".into(),
                daddr: None,
                verdict: Verdict::Drop,
            },
        ];
        assert_eq!(rec.rules_in(None, &t, "w7-in"), expected);
        assert_eq!(rec.rules_in(None, &t, "w7-fwd"), expected);
    }

    #[test]
    fn egress_internet_drops_private_networks_and_masquerades() {
        let rec = Recorder::new();
        set_egress(&rec, 7, Egress::Internet).unwrap();
        let t = filter_table();
        assert_eq!(rec.chains(None, &t), vec!["w7-fwd", "w7-in", "w7-nat"]);
        let fwd = rec.rules_in(None, &t, "w7-fwd");
        // Every private network of both families is dropped, nothing else.
        let dropped: Vec<Net> = fwd
            .iter()
            .filter_map(|r| match r {
                NftRule::FromLink {
                    daddr: Some(n),
                    verdict: Verdict::Drop,
                    ..
                } => Some(*n),
                _ => None,
            })
            .collect();
        assert_eq!(dropped.len(), 7);
        assert!(dropped.contains(&Net::V4(Prefix::new(Ipv4Addr::new(10, 0, 0, 0), 8))));
        assert!(dropped.contains(&Net::V6(PRIVATE_V6[0])));
        assert!(!fwd
            .iter()
            .any(|r| matches!(r, NftRule::FromLink { daddr: None, .. })));
        // The host stays out of reach.
        assert_eq!(rec.rules_in(None, &t, "w7-in").len(), 3);
        assert_eq!(
            rec.rules_in(None, &t, "w7-nat"),
            vec![NftRule::Masquerade {
                saddr: Prefix::new(Ipv4Addr::new(10, 231, 7, 2), 32),
                daddr: None,
                oif: None
            }]
        );
    }

    #[test]
    fn changing_egress_rewrites_the_chains_in_one_transaction() {
        let rec = Recorder::new();
        set_egress(&rec, 7, Egress::All).unwrap();
        let t = filter_table();
        assert!(rec.rules_in(None, &t, "w7-in").is_empty());
        assert!(rec.rules_in(None, &t, "w7-fwd").is_empty());
        assert_eq!(rec.rules_in(None, &t, "w7-nat").len(), 1);
        rec.clear_calls();
        set_egress(&rec, 7, Egress::None).unwrap();
        assert_eq!(rec.mutations().len(), 1, "one transaction");
        assert_eq!(rec.chains(None, &t), vec!["w7-fwd", "w7-in"]);
        assert_eq!(rec.rules_in(None, &t, "w7-fwd").len(), 3);
        // A failed change leaves the old policy whole.
        rec.fail_nth_mutation(1);
        assert!(set_egress(&rec, 7, Egress::All).is_err());
        assert_eq!(rec.rules_in(None, &t, "w7-fwd").len(), 3);
    }

    #[test]
    fn removing_a_weave_filter_keeps_other_weaves_and_drops_the_last_table() {
        let rec = Recorder::new();
        set_egress(&rec, 7, Egress::None).unwrap();
        set_egress(&rec, 8, Egress::Internet).unwrap();
        remove_filter(&rec, 8).unwrap();
        assert_eq!(rec.chains(None, &filter_table()), vec!["w7-fwd", "w7-in"]);
        remove_filter(&rec, 7).unwrap();
        assert!(rec.tables_of(None, crate::Family::Inet).is_empty());
        // Nothing there: nothing to do.
        rec.clear_calls();
        remove_filter(&rec, 7).unwrap();
        assert!(rec.mutations().is_empty());
    }

    #[test]
    fn the_namespace_lets_the_guest_reach_dhcp_only() {
        let rec = Recorder::new();
        rec.create_netns("weft-a").unwrap();
        rec.apply_nft(Some("weft-a"), &ns_filter_ops("tap0"))
            .unwrap();
        let rules = rec.rules_in(Some("weft-a"), &filter_table(), "input");
        assert_eq!(
            rules.first(),
            Some(&NftRule::AcceptUdp {
                iif: "tap0".into(),
                port: 67
            })
        );
        assert_eq!(
            rules.last(),
            Some(&NftRule::FromLink {
                iif: "tap0".into(),
                daddr: None,
                verdict: Verdict::Drop
            })
        );
    }
}
