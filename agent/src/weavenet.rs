//! A weave's network, through `weft-netns`: its namespace with the guest's tap behind
//! NAT, and host ports routed to it.
//!
//! Every weave keeps the same guest address plan: the guest is 192.168.100.2/24 with
//! gateway 192.168.100.1 (the namespace side of its tap). The test guest takes it with
//! `weft.net=192.168.100.2/24,192.168.100.1`; DHCP for guests is not served yet.

use std::net::Ipv4Addr;

use weft_netns::{GuestLink, Kernel, Route, WeaveNet, WeavePlan};
use weft_qmp::launch::VmConfig;

/// The guest's address inside every weave.
pub const GUEST_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 100, 2);
/// The guest's gateway inside every weave.
pub const GATEWAY_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 100, 1);
/// The guest network's prefix length.
pub const GUEST_PREFIX: u8 = 24;

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, weft_netns::Error> + Send + 'static,
) -> Result<T, String> {
    match tokio::task::spawn_blocking(f).await {
        Ok(r) => r.map_err(|e| e.to_string()),
        Err(e) => Err(format!("network task failed: {e}")),
    }
}

/// Creates the namespace of weave `name` (slot `index`) with one tap per NIC of
/// `config` (the first carries the gateway address).
pub async fn create(name: &str, index: u8, config: &VmConfig) -> Result<(), String> {
    let tap = config
        .nics
        .first()
        .map(|n| n.tap.clone())
        .unwrap_or_else(|| "weft-tap0".to_string());
    let plan = WeavePlan {
        name: name.to_string(),
        index,
        guest_ip: GUEST_IP,
        guest_prefix: GUEST_PREFIX,
        gateway_ip: GATEWAY_IP,
        guest_link: GuestLink::Tap { name: tap },
    };
    blocking(move || WeaveNet::create(&Kernel::new(), &plan).map(drop)).await
}

/// Removes the namespace of a weave and every route to it.
pub async fn delete(name: &str, index: u8) -> Result<(), String> {
    let name = name.to_string();
    blocking(move || {
        let kernel = Kernel::new();
        for r in weft_netns::list_routes(&kernel)? {
            if r.weave_index == index {
                weft_netns::unroute(&kernel, r.host_port)?;
            }
        }
        WeaveNet::delete(&kernel, &name, index)
    })
    .await
}

/// Makes new connections to `host_port` reach the weave's guest on `guest_port`.
pub async fn route(host_port: u16, index: u8, guest_port: u16) -> Result<(), String> {
    blocking(move || {
        let kernel = Kernel::new();
        weft_netns::enable_host_forwarding(&kernel)?;
        weft_netns::route(
            &kernel,
            &Route {
                host_port,
                weave_index: index,
                guest_port,
            },
        )
    })
    .await
}

/// Moves a routed host port to another weave in one nftables transaction: new
/// connections go there, established ones finish where they started.
pub async fn switch(host_port: u16, to_index: u8) -> Result<(), String> {
    blocking(move || weft_netns::switch(&Kernel::new(), host_port, to_index).map(drop)).await
}

/// The routed host ports.
pub async fn routes() -> Result<Vec<Route>, String> {
    blocking(|| weft_netns::list_routes(&Kernel::new())).await
}
