//! A weave's network, through `weft-netns`: its namespace with the guest's tap behind
//! NAT. Host ports, plans and reconciling live in [`crate::net`].
//!
//! A weave keeps the guest address plan its environment had at the weave's instant
//! (see [`crate::net`]); without one recorded, the guest is 192.168.100.2/24 with
//! gateway 192.168.100.1 (the namespace side of its tap). The test guest takes its
//! address with `weft.net=192.168.100.2/24,192.168.100.1`.

use std::net::Ipv4Addr;

use weft_netns::{GuestLink, Kernel, WeaveNet, WeavePlan};
use weft_qmp::launch::VmConfig;

use crate::model::{Egress, GuestPlan};

/// The guest's address inside a weave with the default plan.
pub const GUEST_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 100, 2);
/// The guest's gateway inside a weave with the default plan.
pub const GATEWAY_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 100, 1);
/// The guest network's prefix length in the default plan.
pub const GUEST_PREFIX: u8 = 24;

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, weft_netns::Error> + Send + 'static,
) -> Result<T, String> {
    match tokio::task::spawn_blocking(f).await {
        Ok(r) => r.map_err(|e| e.to_string()),
        Err(e) => Err(format!("network task failed: {e}")),
    }
}

/// The network plan of weave `name` (slot `index`): the guest plan `guest`, on the
/// tap of the first NIC of `config` (which carries the gateway address), with `egress`.
pub fn weave_plan(
    name: &str,
    index: u8,
    config: &VmConfig,
    guest: &GuestPlan,
    egress: Egress,
) -> WeavePlan {
    let tap = config
        .nics
        .first()
        .map(|n| n.tap.clone())
        .unwrap_or_else(|| "weft-tap0".to_string());
    WeavePlan {
        name: name.to_string(),
        index,
        guest_ip: guest.guest_ip,
        guest_prefix: guest.guest_prefix,
        gateway_ip: guest.gateway,
        guest_link: GuestLink::Tap { name: tap },
        egress: kernel_egress(&egress),
    }
}

/// Creates the namespace of weave `name` (slot `index`) with the default guest plan.
/// weftd itself goes through [`crate::net::Net::create_weave`], which uses the plan of
/// the weave's instant and records what it creates.
pub async fn create(name: &str, index: u8, config: &VmConfig) -> Result<(), String> {
    let plan = weave_plan(
        name,
        index,
        config,
        &GuestPlan::default(),
        Egress::default(),
    );
    blocking(move || WeaveNet::create(&Kernel::new(), &plan).map(drop)).await
}

/// Removes the namespace of a weave and every route to it.
pub async fn delete(name: &str, index: u8) -> Result<(), String> {
    let name = name.to_string();
    blocking(move || WeaveNet::delete(&Kernel::new(), &name, index)).await
}

/// The kernel's filter policy for an egress setting of the API.
pub fn kernel_egress(egress: &Egress) -> weft_netns::Egress {
    match egress {
        Egress::None => weft_netns::Egress::None,
        Egress::Internet => weft_netns::Egress::Internet,
        Egress::All => weft_netns::Egress::All,
    }
}
