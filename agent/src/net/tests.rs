//! Tests of the network module: the catalog side, plans and checks, the kernel side through a recording `NetOps`.

use super::*;
use crate::catalog::NewEnvironment;
use crate::model::{EnvKind, EnvState};
use weft_netns::{Call, LinkEnd, Recorder, WeaveNet, WeavePlan};
use weft_qmp::launch::NicConfig;

const P0: u16 = 47290;
const P1: u16 = 47291;
const P2: u16 = 47292;

pub(super) fn config(tap: &str) -> VmConfig {
    VmConfig {
        nics: vec![NicConfig {
            id: "net0".into(),
            tap: tap.into(),
            mac: "52:54:00:12:34:56".into(),
        }],
        ..VmConfig::default()
    }
}

pub(super) async fn add_env(catalog: &Catalog, name: &str, tap: &str) {
    let config = config(tap);
    catalog
        .insert_environment(&NewEnvironment {
            name,
            kind: EnvKind::Managed,
            config: Some(&config),
            qmp_socket: std::path::Path::new("/nonexistent.sock"),
            state: EnvState::Stopped,
            pid: None,
        })
        .await
        .unwrap();
}

/// A weave row of `web` (its environment row too), branched from `source` at `taken_at`.
pub(super) async fn add_weave(
    catalog: &Catalog,
    name: &str,
    index: u8,
    source: &str,
    taken_at: &str,
) {
    add_env(catalog, name, "weft-tap0").await;
    sqlx::query(
        "INSERT INTO weaves (name, parent, source, taken_at, net_index, created_at) VALUES (?, 'web', ?, ?, ?, ?)",
    )
    .bind(name)
    .bind(source)
    .bind(taken_at)
    .bind(i64::from(index))
    .bind(now())
    .execute(&catalog.pool)
    .await
    .unwrap();
}

/// A catalog with environment `web` (NIC on the operator's tap `tweb`, which
/// exists) and the recording kernel double.
pub(super) async fn rig() -> (Catalog, Arc<Recorder>, Net) {
    let catalog = Catalog::open_in_memory().await.unwrap();
    add_env(&catalog, "web", "tweb").await;
    let rec = Arc::new(Recorder::new());
    let net = Net::with_ops(&catalog, rec.clone());
    // weftd starts web's QEMU, which makes its tap: weft's.
    net.claim_taps("web", &["tweb".to_string()]).await.unwrap();
    rec.create_netns("operator").unwrap();
    rec.create_veth(
        &LinkEnd::root("tweb"),
        &LinkEnd::in_netns("operator", "eth0"),
    )
    .unwrap();
    catalog
        .set_state("web", EnvState::Running, Some(1), None)
        .await
        .unwrap();
    rec.clear_calls();
    (catalog, rec, net)
}

#[tokio::test]
pub(super) async fn route_localnet_only_on_taps_weft_made() {
    let (catalog, rec, net) = rig().await;
    // An environment whose NIC names a link that existed before its QEMU started
    // (the host's uplink, say): publishing its port changes nothing of that link.
    add_env(&catalog, "ops", "eth9").await;
    rec.create_veth(
        &LinkEnd::root("eth9"),
        &LinkEnd::in_netns("operator", "eth1"),
    )
    .unwrap();
    net.claim_taps("ops", &["eth9".to_string()]).await.unwrap();
    catalog
        .set_state("ops", EnvState::Running, Some(2), None)
        .await
        .unwrap();
    rec.clear_calls();
    let e = net
        .expose("ops", &expose(80, P1), "alice")
        .await
        .unwrap_err();
    let text = e.one_line();
    assert!(matches!(e, ApiError::Conflict(_)), "{e:?}");
    assert!(text.contains("\"eth9\" was not made by weft"), "{text}");
    assert!(!text.contains('\n'), "{text}");
    assert!(!rec
        .mutations()
        .iter()
        .any(|c| matches!(c, Call::SetSysctl { key, .. } if key.contains("route_localnet"))));
    // Nothing of the refused port stays: no route, no record, no ownership.
    assert!(weft_netns::list_routes(rec.as_ref()).unwrap().is_empty());
    assert!(net.setup("ops").await.unwrap().ports.is_empty());
    assert!(!catalog.owned_net().await.unwrap().ports.contains(&P1));

    // weft's own tap, but its environment stopped: a link of that name now is not
    // the tap weft's QEMU made (that one went with QEMU).
    catalog
        .set_state("web", EnvState::Stopped, None, None)
        .await
        .unwrap();
    let e = net
        .expose("web", &expose(80, P2), "alice")
        .await
        .unwrap_err();
    assert!(
        e.one_line().contains("\"tweb\" was not made by weft"),
        "{e}"
    );
    // Running again on a tap its QEMU made: allowed.
    net.claim_taps("web", &["tweb2".to_string()]).await.unwrap();
    assert!(catalog.env_taps("web").await.unwrap().contains("tweb2"));
    assert!(catalog.env_taps("web").await.unwrap().contains("tweb"));
    // A tap that exists when weftd starts the QEMU loses its record.
    net.claim_taps("web", &["tweb".to_string()]).await.unwrap();
    assert!(!catalog.env_taps("web").await.unwrap().contains("tweb"));
}

pub(super) fn expose(guest_port: u16, host_port: u16) -> ExposeRequest {
    ExposeRequest {
        guest_port,
        host_port: Some(host_port),
        guest_ip: None,
    }
}

pub(super) fn home(host_port: u16, guest_port: u16) -> Route {
    Route {
        host_port,
        to: Target::Addr(Ipv4Addr::new(192, 168, 100, 2)),
        guest_port,
    }
}

/// Transactions on the root route table (the weaves' filters aside).
pub(super) fn nft_batches(rec: &Recorder) -> usize {
    rec.mutations()
        .iter()
        .filter(|c| {
            matches!(c, Call::ApplyNft(None, b)
            if b.iter().any(|op| op.table().name == weft_netns::TABLE))
        })
        .count()
}

pub(super) async fn net_snapshots(catalog: &Catalog, env: &str) -> Vec<crate::model::Snapshot> {
    let filter = SnapshotFilter {
        resource: Some("net".into()),
        ..SnapshotFilter::default()
    };
    catalog.snapshots(env, &filter).await.unwrap()
}

#[tokio::test]
pub(super) async fn expose_routes_to_the_guest_and_records_a_net_snapshot() {
    let (catalog, rec, net) = rig().await;
    let setup = net.expose("web", &expose(80, P0), "alice").await.unwrap();
    assert_eq!(
        setup.ports,
        vec![HostPort {
            host_port: P0,
            guest_port: 80,
            guest_ip: None,
            published: true,
            target: "web".into()
        }]
    );
    assert_eq!(
        weft_netns::list_routes(rec.as_ref()).unwrap(),
        vec![home(P0, 80)]
    );
    // Host-local clients may leave through the operator's tap.
    assert!(rec.mutations().contains(&Call::SetSysctl {
        netns: None,
        key: "net/ipv4/conf/tweb/route_localnet".into(),
        value: "1".into()
    }));
    assert!(catalog.owned_net().await.unwrap().ports.contains(&P0));
    let snaps = net_snapshots(&catalog, "web").await;
    assert_eq!(snaps.len(), 1);
    let s = &snaps[0];
    assert_eq!(s.kind, SnapshotKind::Net);
    assert_eq!(s.actor, "alice");
    assert_eq!(s.category.as_deref(), Some(CHANGE_CATEGORY));
    assert_eq!(
        s.note.as_deref(),
        Some("expose host port 47290 -> guest port 80")
    );
    assert_eq!(s.net.as_ref(), Some(&setup));
}

#[tokio::test]
pub(super) async fn bad_exposes_are_refused_with_nothing_left_behind() {
    let (catalog, rec, net) = rig().await;
    add_weave(&catalog, "w1", 7, "now", &now()).await;
    net.expose("web", &expose(80, P0), "alice").await.unwrap();
    // Someone else's route on P1 (another weftd).
    weft_netns::route(rec.as_ref(), &Route::to_weave(P1, 200, 80)).unwrap();
    // A process on the host listens on a port.
    let listener = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
    let busy = listener.local_addr().unwrap().port();
    rec.clear_calls();

    let cases: Vec<(&str, ExposeRequest, &str)> = vec![
        (
            "web",
            expose(81, P0),
            "already published by environment web",
        ),
        ("web", expose(0, P2), "ports must be 1-65535"),
        ("nope", expose(80, P2), "no environment named \"nope\""),
        ("w1", expose(80, P2), "is a weave of \"web\""),
        (
            "web",
            ExposeRequest {
                guest_ip: Some(Ipv4Addr::LOCALHOST),
                ..expose(80, P2)
            },
            "cannot be a guest address",
        ),
        ("web", expose(80, P1), "by someone else"),
        ("web", expose(80, busy), "in use by a process on the host"),
    ];
    for (env, req, want) in cases {
        let e = net.expose(env, &req, "alice").await.unwrap_err().one_line();
        assert!(e.contains(want), "{env} {req:?}: {e}");
        assert!(!e.contains('\n'), "{e}");
    }
    drop(listener);
    assert_eq!(catalog.net_setup("web").await.unwrap().ports.len(), 1);
    assert_eq!(catalog.owned_net().await.unwrap().ports, [P0].into());
    assert_eq!(net_snapshots(&catalog, "web").await.len(), 1);
    // The only kernel change tried was the refused route on P1: nothing was applied.
    assert_eq!(nft_batches(&rec), 0);
    assert_eq!(
        weft_netns::list_routes(rec.as_ref()).unwrap(),
        vec![home(P0, 80), Route::to_weave(P1, 200, 80)]
    );
}

#[tokio::test]
pub(super) async fn activate_moves_every_port_in_one_transaction_and_back() {
    let (catalog, rec, net) = rig().await;
    add_weave(&catalog, "w1", 7, "now", &now()).await;
    add_weave(&catalog, "w2", 8, "now", &now()).await;
    net.expose("web", &expose(80, P0), "alice").await.unwrap();
    net.route_weave("w1", P1, 8080, "alice").await.unwrap();
    // Routing the same again is a no-op; elsewhere is refused.
    net.route_weave("w1", P1, 8080, "alice").await.unwrap();
    let e = net.route_weave("w2", P1, 8080, "alice").await.unwrap_err();
    assert!(
        e.one_line().contains("already routed to weave w1 of web"),
        "{e}"
    );

    rec.clear_calls();
    let moved = net.activate_weave("w2", "bob").await.unwrap();
    assert_eq!(moved["ports"], json!([P0, P1]));
    assert_eq!(
        nft_batches(&rec),
        1,
        "one transaction: {:?}",
        rec.mutations()
    );
    assert_eq!(
        weft_netns::list_routes(rec.as_ref()).unwrap(),
        vec![Route::to_weave(P0, 8, 80), Route::to_weave(P1, 8, 8080)]
    );
    let setup = catalog.net_setup("web").await.unwrap();
    assert_eq!(setup.active.as_deref(), Some("w2"));
    assert!(setup.ports.iter().all(|p| p.target == "w2"));
    let last = net_snapshots(&catalog, "web").await.pop().unwrap();
    assert_eq!(last.actor, "bob");
    assert_eq!(
        last.note.as_deref(),
        Some("activate weave w2: host ports 47290, 47291")
    );

    // A port published while w2 is active goes to w2.
    net.expose("web", &expose(443, P2), "alice").await.unwrap();
    assert!(weft_netns::list_routes(rec.as_ref())
        .unwrap()
        .contains(&Route::to_weave(P2, 8, 443)));

    // And back: published ports go home, the weave-only route stays.
    rec.clear_calls();
    let setup = net.activate_env("web", "bob").await.unwrap();
    assert_eq!(nft_batches(&rec), 1);
    assert_eq!(setup.active, None);
    assert_eq!(
        weft_netns::list_routes(rec.as_ref()).unwrap(),
        vec![home(P0, 80), Route::to_weave(P1, 8, 8080), home(P2, 443)]
    );
    // Activating what is active changes nothing and records nothing.
    let count = net_snapshots(&catalog, "web").await.len();
    rec.clear_calls();
    net.activate_env("web", "bob").await.unwrap();
    assert_eq!(nft_batches(&rec), 0);
    assert_eq!(net_snapshots(&catalog, "web").await.len(), count);
    // Weaves have no published ports to take back.
    let e = net.activate_env("w1", "bob").await.unwrap_err();
    assert!(e.one_line().contains("is a weave"), "{}", e.one_line());
}

#[tokio::test]
pub(super) async fn a_failed_switch_changes_neither_the_kernel_nor_the_catalog() {
    let (catalog, rec, net) = rig().await;
    add_weave(&catalog, "w1", 7, "now", &now()).await;
    net.expose("web", &expose(80, P0), "alice").await.unwrap();
    net.expose("web", &expose(81, P1), "alice").await.unwrap();
    let before = (
        catalog.net_setup("web").await.unwrap(),
        net_snapshots(&catalog, "web").await.len(),
        weft_netns::list_routes(rec.as_ref()).unwrap(),
    );
    rec.fail_nth_mutation(1);
    let e = net.activate_weave("w1", "bob").await.unwrap_err();
    assert!(
        e.one_line().contains("injected failure"),
        "{}",
        e.one_line()
    );
    let after = (
        catalog.net_setup("web").await.unwrap(),
        net_snapshots(&catalog, "web").await.len(),
        weft_netns::list_routes(rec.as_ref()).unwrap(),
    );
    assert_eq!(before, after);
    // Nothing routes to an empty family.
    let (catalog, _rec, net) = rig().await;
    add_weave(&catalog, "w1", 7, "now", &now()).await;
    let e = net.activate_weave("w1", "bob").await.unwrap_err();
    assert!(
        e.one_line().contains("weft env expose web"),
        "{}",
        e.one_line()
    );
}

#[tokio::test]
pub(super) async fn unexpose_and_plan_changes_follow_through() {
    let (catalog, rec, net) = rig().await;
    net.expose("web", &expose(80, P0), "alice").await.unwrap();
    let explicit = ExposeRequest {
        guest_ip: Some(Ipv4Addr::new(192, 168, 100, 9)),
        ..expose(22, P1)
    };
    net.expose("web", &explicit, "alice").await.unwrap();
    let plan = GuestPlan {
        guest_ip: Ipv4Addr::new(192, 168, 7, 2),
        guest_prefix: 24,
        gateway: Ipv4Addr::new(192, 168, 7, 1),
    };
    let setup = net.set_plan("web", plan, "alice").await.unwrap();
    assert_eq!(setup.plan, plan);
    // The port without an address of its own follows the plan; the other stays.
    assert_eq!(
        weft_netns::list_routes(rec.as_ref()).unwrap(),
        vec![
            Route {
                host_port: P0,
                to: Target::Addr(plan.guest_ip),
                guest_port: 80
            },
            Route {
                host_port: P1,
                to: Target::Addr(Ipv4Addr::new(192, 168, 100, 9)),
                guest_port: 22
            }
        ]
    );
    let bad = GuestPlan {
        gateway: Ipv4Addr::new(192, 168, 8, 1),
        ..plan
    };
    let e = net.set_plan("web", bad, "alice").await.unwrap_err();
    assert!(matches!(e, ApiError::BadRequest(_)), "{e}");
    assert!(e.one_line().contains("outside"), "{}", e.one_line());

    net.unexpose("web", P0, "alice").await.unwrap();
    assert_eq!(
        weft_netns::list_routes(rec.as_ref())
            .unwrap()
            .iter()
            .map(|r| r.host_port)
            .collect::<Vec<_>>(),
        vec![P1]
    );
    assert_eq!(catalog.owned_net().await.unwrap().ports, [P1].into());
    let e = net.unexpose("web", P0, "alice").await.unwrap_err();
    assert!(
        e.one_line().contains("its host ports: 47291"),
        "{}",
        e.one_line()
    );
    let notes: Vec<String> = net_snapshots(&catalog, "web")
        .await
        .into_iter()
        .filter_map(|s| s.note)
        .collect();
    assert_eq!(
        notes,
        vec![
            "expose host port 47290 -> guest port 80",
            "expose host port 47291 -> guest port 22",
            "address plan 192.168.7.2/24 via 192.168.7.1",
            "unexpose host port 47290",
        ]
    );
}

/// A timestamp later than `t` (timestamps have microseconds: two in a row can be equal).
pub(super) fn later_than(t: &str) -> String {
    wait_until::wait_until(
        &format!("the clock to pass {t}"),
        std::time::Duration::from_secs(5),
        || {
            let n = now();
            if n.as_str() > t {
                Ok(n)
            } else {
                Err(n)
            }
        },
    )
    .unwrap()
}

#[tokio::test]
pub(super) async fn a_weave_from_the_past_gets_the_plan_of_its_instant() {
    let (catalog, rec, net) = rig().await;
    let old = GuestPlan {
        guest_ip: Ipv4Addr::new(192, 168, 5, 2),
        guest_prefix: 24,
        gateway: Ipv4Addr::new(192, 168, 5, 1),
    };
    let new = GuestPlan {
        guest_ip: Ipv4Addr::new(10, 9, 0, 2),
        guest_prefix: 16,
        gateway: Ipv4Addr::new(10, 9, 0, 1),
    };
    // Before anything is recorded: the current (default) plan.
    assert_eq!(
        net.plan_at("web", false, &now()).await.unwrap(),
        GuestPlan::default()
    );
    net.set_plan("web", old, "alice").await.unwrap();
    let between = later_than(&now());
    later_than(&between);
    net.set_plan("web", new, "alice").await.unwrap();
    assert_eq!(net.plan_at("web", false, &between).await.unwrap(), old);
    assert_eq!(net.plan_at("web", false, &now()).await.unwrap(), new);
    assert_eq!(net.plan_at("web", true, &between).await.unwrap(), new);

    // The weave's namespace gets that plan, and keeps it as its own.
    add_weave(&catalog, "past", 7, "at past", &between).await;
    let weave = catalog.weave("past").await.unwrap().unwrap();
    net.create_weave(&weave, &config("weft-tap0"), None, Egress::None)
        .await
        .unwrap();
    assert_eq!(catalog.net_plan("past").await.unwrap(), old);
    assert_eq!(
        rec.rules(Some("weft-past"), weft_netns::TABLE, "prerouting"),
        vec![weft_netns::NftRule::DnatTcpFromLink {
            iif: "wn7".into(),
            to: old.guest_ip
        }]
    );
    assert!(rec.calls().contains(&Call::AddAddress(
        LinkEnd::in_netns("weft-past", "weft-tap0"),
        weft_netns::Prefix::new(old.gateway, 24)
    )));
    let owned = catalog.owned_net().await.unwrap();
    assert!(owned.netns.contains("weft-past") && owned.indices.contains(&7));
    // A weave's plan is not changed through its environment's commands.
    let e = net.set_plan("past", new, "alice").await.unwrap_err();
    assert!(e.one_line().contains("is a weave"), "{}", e.one_line());

    // A plan a composition chose wins over the weave's instant's; a bad one is
    // refused before anything is made.
    add_weave(&catalog, "chosen", 8, "composition c", &now()).await;
    let weave = catalog.weave("chosen").await.unwrap().unwrap();
    let bad = GuestPlan {
        gateway: Ipv4Addr::new(172, 16, 0, 1),
        ..old
    };
    let e = net
        .create_weave(&weave, &config("weft-tap1"), Some(bad), Egress::None)
        .await
        .unwrap_err();
    assert!(
        e.one_line().contains("chosen address plan"),
        "{}",
        e.one_line()
    );
    net.create_weave(&weave, &config("weft-tap1"), Some(old), Egress::None)
        .await
        .unwrap();
    assert_eq!(catalog.net_plan("chosen").await.unwrap(), old);
}

#[tokio::test]
pub(super) async fn deleting_the_active_weave_sends_published_ports_home() {
    let (catalog, rec, net) = rig().await;
    add_weave(&catalog, "w1", 7, "now", &now()).await;
    let weave = catalog.weave("w1").await.unwrap().unwrap();
    net.create_weave(&weave, &config("weft-tap0"), None, Egress::None)
        .await
        .unwrap();
    net.expose("web", &expose(80, P0), "alice").await.unwrap();
    net.route_weave("w1", P1, 8080, "alice").await.unwrap();
    net.activate_weave("w1", "alice").await.unwrap();

    net.delete_weave("w1", 7, "web").await.unwrap();
    assert_eq!(
        weft_netns::list_routes(rec.as_ref()).unwrap(),
        vec![home(P0, 80)]
    );
    assert!(!rec.netns().contains(&"weft-w1".to_string()));
    let setup = catalog.net_setup("web").await.unwrap();
    assert_eq!(setup.active, None);
    assert_eq!(setup.ports.len(), 1);
    assert_eq!(setup.ports[0].target, "web");
    let owned = catalog.owned_net().await.unwrap();
    assert_eq!(owned.ports, [P0].into());
    assert!(owned.netns.is_empty() && owned.indices.is_empty());
    let last = net_snapshots(&catalog, "web").await.pop().unwrap();
    assert!(last.note.unwrap().starts_with("weave w1 deleted"));
}

#[tokio::test]
pub(super) async fn egress_is_set_at_create_changed_while_running_recorded_and_restored() {
    let (catalog, rec, net) = rig().await;
    let filter = weft_netns::filter_table();
    add_weave(&catalog, "e1", 7, "now", &now()).await;
    let weave = catalog.weave("e1").await.unwrap().unwrap();
    net.create_weave(&weave, &config("weft-tap0"), None, Egress::Internet)
        .await
        .unwrap();
    assert_eq!(
        catalog.net_setup("e1").await.unwrap().egress,
        Egress::Internet
    );
    assert_eq!(rec.chains(None, &filter), vec!["w7-fwd", "w7-in", "w7-nat"]);
    // Leaving the host needs the root namespace to forward.
    assert!(rec.calls().contains(&Call::SetSysctl {
        netns: None,
        key: "net/ipv4/ip_forward".into(),
        value: "1".into()
    }));

    // Changed while it runs: one filter transaction, recorded with a net snapshot.
    rec.clear_calls();
    let setup = net.set_egress("e1", Egress::None, "alice").await.unwrap();
    assert_eq!(setup.egress, Egress::None);
    assert_eq!(rec.chains(None, &filter), vec!["w7-fwd", "w7-in"]);
    assert_eq!(rec.mutations().len(), 1, "{:?}", rec.mutations());
    let snaps = net_snapshots(&catalog, "e1").await;
    let last = snaps.iter().max_by_key(|s| s.id).unwrap();
    assert_eq!(last.net.as_ref().unwrap().egress, Egress::None);
    assert_eq!(last.actor, "alice");

    // Only weaves have an egress policy.
    let e = net
        .set_egress("web", Egress::All, "alice")
        .await
        .unwrap_err();
    assert!(matches!(e, ApiError::Missing(_)), "{e}");
    // A kernel failure changes nothing.
    rec.fail_nth_mutation(1);
    assert!(net.set_egress("e1", Egress::All, "alice").await.is_err());
    assert_eq!(catalog.net_setup("e1").await.unwrap().egress, Egress::None);
    assert_eq!(rec.chains(None, &filter), vec!["w7-fwd", "w7-in"]);

    // After a reboot the filter is gone: reconcile puts back the recorded policy.
    net.set_egress("e1", Egress::All, "alice").await.unwrap();
    weft_netns::remove_filter(rec.as_ref(), 7).unwrap();
    assert!(rec.chains(None, &filter).is_empty());
    let report = net.reconcile().await.report.unwrap();
    assert_eq!(report.errors, Vec::<String>::new());
    assert_eq!(rec.chains(None, &filter), vec!["w7-fwd", "w7-in", "w7-nat"]);
    assert!(
        rec.rules_in(None, &filter, "w7-fwd").is_empty(),
        "egress all"
    );
}

#[tokio::test]
pub(super) async fn reconcile_removes_owned_strays_restores_the_rest_and_leaves_others_alone() {
    let (catalog, rec, net) = rig().await;
    add_weave(&catalog, "w1", 7, "now", &now()).await;
    net.expose("web", &expose(80, P0), "alice").await.unwrap();
    net.route_weave("w1", P1, 8080, "alice").await.unwrap();
    // A weave this weftd made and then lost from its catalog (a crash mid-delete).
    catalog
        .own_net(&[
            (OWN_NETNS, "weft-old".into()),
            (OWN_INDEX, "9".into()),
            own_port(P2),
        ])
        .await
        .unwrap();
    WeaveNet::create(rec.as_ref(), &WeavePlan::new("old", 9)).unwrap();
    weft_netns::route(rec.as_ref(), &Route::to_weave(P2, 9, 80)).unwrap();
    // Another weftd's weave and route on the same host.
    WeaveNet::create(rec.as_ref(), &WeavePlan::new("theirs", 10)).unwrap();
    let theirs = Route::to_weave(47298, 10, 80);
    weft_netns::route(rec.as_ref(), &theirs).unwrap();
    // After a reboot: w1's namespace and the environment's route are gone.
    weft_netns::unroute(rec.as_ref(), P0).unwrap();

    let done = net.reconcile().await;
    let report = done.report.clone().unwrap();
    assert_eq!(report.errors, Vec::<String>::new());
    assert_eq!(report.removed_netns, vec!["weft-old"]);
    assert_eq!(report.created_weaves, vec!["w1"]);
    assert!(done.weave("w1").is_ok());
    assert_eq!(
        weft_netns::list_routes(rec.as_ref()).unwrap(),
        vec![home(P0, 80), Route::to_weave(P1, 7, 8080), theirs]
    );
    assert_eq!(rec.netns(), vec!["operator", "weft-theirs", "weft-w1"]);
    assert!(rec.links(None).contains(&"wh10".to_string()));
    // What it removed it no longer owns; what the catalog wants it owns.
    let owned = catalog.owned_net().await.unwrap();
    assert_eq!(owned.netns, ["weft-w1".to_string()].into());
    assert_eq!(owned.indices, [7].into());
    assert_eq!(owned.ports, [P0, P1].into());
    let audit = catalog.audit_log(10).await.unwrap();
    assert!(audit
        .iter()
        .any(|a| a.action == "net.reconcile" && a.result == "ok"));
    // A second pass changes nothing.
    rec.clear_calls();
    let again = net.reconcile().await.report.unwrap();
    assert!(!again.changed(), "{again:?}");
    assert_eq!(nft_batches(&rec), 0);
}

#[tokio::test]
pub(super) async fn a_weftd_that_owns_nothing_leaves_the_kernel_alone() {
    let (_catalog, rec, net) = rig().await;
    WeaveNet::create(rec.as_ref(), &WeavePlan::new("theirs", 10)).unwrap();
    rec.clear_calls();
    let done = net.reconcile().await;
    assert_eq!(done.report, Some(ReconcileReport::default()));
    assert!(rec.calls().is_empty(), "{:?}", rec.calls());
}

#[tokio::test]
pub(super) async fn deleting_an_environment_sweeps_its_routes() {
    let (catalog, rec, net) = rig().await;
    net.expose("web", &expose(80, P0), "alice").await.unwrap();
    sqlx::query("DELETE FROM environments WHERE name = 'web'")
        .execute(&catalog.pool)
        .await
        .unwrap();
    net.sweep_ports().await.unwrap();
    assert!(weft_netns::list_routes(rec.as_ref()).unwrap().is_empty());
    assert!(catalog.owned_net().await.unwrap().ports.is_empty());
}

#[tokio::test]
pub(super) async fn migration_6_keeps_snapshots_their_parents_and_ids() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("v5.db");
    let options = sqlx::sqlite::SqliteConnectOptions::new()
        .filename(&path)
        .create_if_missing(true)
        .foreign_keys(true);
    let pool = sqlx::SqlitePool::connect_with(options).await.unwrap();
    let mut names: Vec<_> = std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/migrations"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    names.sort();
    let (before, after): (Vec<_>, Vec<_>) = names
        .into_iter()
        .partition(|p| p.file_name().unwrap().to_string_lossy().as_ref() < "0006");
    for m in &before {
        sqlx::raw_sql(&std::fs::read_to_string(m).unwrap())
            .execute(&pool)
            .await
            .unwrap();
    }
    let insert = "INSERT INTO snapshots (id, env, resource, state, kind, taken_at, actor, parent) VALUES (?, 'web', 'disk:vda', 'complete', ?, '2026-01-01T00:00:00Z', 'a', ?)";
    for (id, kind, parent) in [
        (1, "full", None),
        (2, "incremental", Some(1)),
        (5, "incremental", Some(2)),
    ] {
        sqlx::query(insert)
            .bind(id)
            .bind(kind)
            .bind(parent)
            .execute(&pool)
            .await
            .unwrap();
    }
    // Snapshot 7 was deleted: its id must never come back.
    sqlx::query("UPDATE sqlite_sequence SET seq = 7 WHERE name = 'snapshots'")
        .execute(&pool)
        .await
        .unwrap();
    let six = &after[0];
    assert!(six.ends_with("0006_net.sql"), "{six:?}");
    let mut tx = pool.begin().await.unwrap();
    sqlx::raw_sql(&std::fs::read_to_string(six).unwrap())
        .execute(&mut *tx)
        .await
        .unwrap();
    tx.commit().await.unwrap();
    let rows: Vec<(i64, Option<i64>)> =
        sqlx::query_as("SELECT id, parent FROM snapshots ORDER BY id")
            .fetch_all(&pool)
            .await
            .unwrap();
    assert_eq!(rows, vec![(1, None), (2, Some(1)), (5, Some(2))]);
    let id = sqlx::query(
        "INSERT INTO snapshots (env, resource, state, kind, taken_at, actor, net) VALUES ('web', 'net', 'complete', 'net', '2026-01-02T00:00:00Z', 'a', '{}')",
    )
    .execute(&pool)
    .await
    .unwrap()
    .last_insert_rowid();
    assert_eq!(id, 8);
    let fk: Vec<(String,)> = sqlx::query_as("SELECT \"table\" FROM pragma_foreign_key_check")
        .fetch_all(&pool)
        .await
        .unwrap();
    assert!(fk.is_empty(), "{fk:?}");
    // The parent reference points at the new table.
    let bad = sqlx::query(insert)
        .bind(9)
        .bind("incremental")
        .bind(Some(99))
        .execute(&pool)
        .await;
    assert!(bad.is_err(), "a dangling parent must be refused");
}
