//! An environment's network: guest address plans, host ports, egress.

use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};

/// An environment's guest address plan: the address its guest uses and the gateway
/// it expects. Every weave keeps the plan it was made with: its instant's, or the one a
/// composition's `net` rule chose.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestPlan {
    /// The guest's address.
    pub guest_ip: Ipv4Addr,
    /// The guest network's prefix length (1-30).
    pub guest_prefix: u8,
    /// The guest's gateway (inside a weave: the namespace side of its tap).
    pub gateway: Ipv4Addr,
}

impl Default for GuestPlan {
    /// 192.168.100.2/24 via 192.168.100.1.
    fn default() -> Self {
        GuestPlan {
            guest_ip: Ipv4Addr::new(192, 168, 100, 2),
            guest_prefix: 24,
            gateway: Ipv4Addr::new(192, 168, 100, 1),
        }
    }
}

/// One host port of an environment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostPort {
    /// Port on the host (any local address, loopback included).
    pub host_port: u16,
    /// Port of the guest.
    pub guest_port: u16,
    /// The environment's guest address for this port; its plan's address when absent.
    pub guest_ip: Option<Ipv4Addr>,
    /// Published by the environment (`weft env expose`); otherwise routed to a weave
    /// only (`weft weave route`).
    pub published: bool,
    /// Where new connections go now: the environment or one of its weaves.
    pub target: String,
}

/// The `net` resource of an environment: its address plan, its host ports and where
/// they go. A weave's setup is its plan and the ports that go to it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetSetup {
    /// Environment (or weave).
    pub env: String,
    /// The guest address plan.
    pub plan: GuestPlan,
    /// The weave the environment's ports go to; the environment itself when absent.
    pub active: Option<String>,
    /// Host ports, by port.
    pub ports: Vec<HostPort>,
    /// What a weave's guest may open connections to (environments run on the
    /// operator's network and have none of weft's).
    #[serde(default)]
    pub egress: Egress,
}

/// A weave's egress policy. Connections routed to the guest (host ports) and DHCP from
/// weftd work under every policy.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Egress {
    /// The guest opens no connection: not to the host, other weaves or any network.
    #[default]
    None,
    /// Public addresses only: not the host's own addresses, other weaves, 10/8,
    /// 172.16/12, 192.168/16, 100.64/10, 169.254/16, fc00::/7 or fe80::/10.
    Internet,
    /// Everything, the host included.
    All,
}

impl Egress {
    /// The name the API, the CLI and the catalog use.
    pub fn as_str(&self) -> &'static str {
        match self {
            Egress::None => "none",
            Egress::Internet => "internet",
            Egress::All => "all",
        }
    }
}

impl std::str::FromStr for Egress {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "none" => Ok(Egress::None),
            "internet" => Ok(Egress::Internet),
            "all" => Ok(Egress::All),
            other => Err(format!(
                "egress {other:?} is not one of none, internet, all"
            )),
        }
    }
}

/// Body of `POST /v1/weaves/{name}/egress`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EgressRequest {
    /// The new policy.
    pub egress: Egress,
}

/// Body of `POST /v1/environments/{name}/expose`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExposeRequest {
    /// Port of the guest.
    pub guest_port: u16,
    /// Port on the host (default: the guest port).
    #[serde(default)]
    pub host_port: Option<u16>,
    /// The guest's address (default: the environment's plan).
    #[serde(default)]
    pub guest_ip: Option<Ipv4Addr>,
}

/// Body of `POST /v1/environments/{name}/unexpose`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UnexposeRequest {
    /// Port on the host.
    pub host_port: u16,
}

/// Body of `POST /v1/weaves/{name}/route`.
#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RouteRequest {
    /// Port of the guest.
    pub guest_port: u16,
    /// Port on the host (default: the guest port).
    pub host_port: Option<u16>,
}
