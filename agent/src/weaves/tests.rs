//! Root-free tests of weave create's failure paths: every step that fails late leaves
//! nothing of the weave (rows, files, namespace and rules, cgroups).

use super::*;
use crate::testrig::{Rig, ENV};

/// A live weave `w1` of [`ENV`] from a disk snapshot.
fn from_snapshot(id: i64) -> CreateWeave {
    CreateWeave {
        name: Some("w1".into()),
        source: Some(Source::Snapshot(id)),
        live: true,
        egress: Default::default(),
    }
}

/// `err`'s one line contains `text`.
#[track_caller]
fn assert_says(err: &ApiError, text: &str) {
    let line = err.one_line();
    assert!(line.contains(text), "{line}");
}

/// Nothing of weave `name` is left (rows, files, indexes, namespaces, cgroups, DHCP),
/// and the network is as it was `before`.
async fn assert_nothing_left(rig: &Rig, name: &str, before: &str) {
    let left = rig.leftovers(name).await;
    assert!(left.is_empty(), "left behind: {left:?}");
    assert_eq!(rig.net_state(), before);
}

#[tokio::test]
async fn weave_create_failure_at_the_nth_netns_op_removes_everything() {
    let rig = Rig::new().await;
    let id = rig.disk_snapshot("2026-12-01T10:00:00.000000Z").await;
    let before = rig.net_state();
    // Halfway through its namespace, links and rules.
    rig.doubles.net.fail_nth_mutation(4);
    let err = rig.weaves.create(ENV, from_snapshot(id)).await.unwrap_err();
    assert_says(&err, "injected failure");
    assert!(
        rig.doubles.net.mutations().len() >= 4,
        "the namespace was half made: {:?}",
        rig.doubles.net.mutations()
    );
    assert_nothing_left(&rig, "w1", &before).await;
    assert!(rig.doubles.processes.launches().is_empty());
}

#[tokio::test]
async fn weave_create_failure_at_its_cgroups_removes_everything() {
    let rig = Rig::new().await;
    let id = rig.disk_snapshot("2026-12-01T10:00:00.000000Z").await;
    let before = rig.net_state();
    rig.doubles.cgroups.fail_nth_mutation(1);
    let err = rig.weaves.create(ENV, from_snapshot(id)).await.unwrap_err();
    assert_says(&err, "cannot create the cgroups of w1");
    assert_nothing_left(&rig, "w1", &before).await;
}

#[tokio::test]
async fn weave_create_failure_at_the_qemu_launch_removes_everything() {
    let rig = Rig::new().await;
    let id = rig.disk_snapshot("2026-12-01T10:00:00.000000Z").await;
    let before = rig.net_state();
    rig.doubles.processes.fail("exec format error");
    let err = rig.weaves.create(ENV, from_snapshot(id)).await.unwrap_err();
    assert_says(&err, "exec format error");
    // It got as far as QEMU: in the weave's namespace and cgroups, its disks served
    // by weft-blk from the snapshot's block map.
    let launches = rig.doubles.processes.launches();
    assert_eq!(launches.len(), 1, "{launches:?}");
    let launch = &launches[0];
    assert_eq!(launch.opts.netns, Some(netns_path("w1")));
    assert_eq!(launch.opts.cgroups.len(), 1, "{:?}", launch.opts.cgroups);
    assert!(launch.opts.cgroups[0].ends_with("weft/w1"));
    assert_eq!(launch.config.vhost_user_disks.len(), 1);
    assert!(launch.paths.qmp_socket.ends_with("w1.sock"));
    assert!(rig
        .doubles
        .cgroups
        .calls()
        .contains(&crate::cgroups::Call::Create("w1".into())));
    // Its guest's DHCP server ran in its namespace, on the guest's tap, until removed.
    let dhcp = rig.doubles.dhcp.calls();
    assert!(
        matches!(&dhcp[..], [crate::dhcp::Call::Start(w, ns, tap, _), crate::dhcp::Call::Stop(s)]
            if w == "w1" && *ns == netns_path("w1") && tap == "weft-tap0" && s == "w1"),
        "{dhcp:?}"
    );
    assert_nothing_left(&rig, "w1", &before).await;
    // The environment it branched from is as it was.
    let env = rig
        .manager
        .catalog()
        .environment(ENV)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(env.state, crate::model::EnvState::Stopped);
}

/// Composition `mix` of [`ENV`]: its `vda` merged, by timestamp, from two snapshots.
async fn merged_composition(rig: &Rig) -> Arc<crate::compositions::Compositions> {
    let older = rig.disk_snapshot("2026-12-01T10:00:00.000000Z").await;
    let newer = rig.disk_snapshot("2026-12-02T10:00:00.000000Z").await;
    let comps = crate::compositions::Compositions::new(rig.manager.clone(), rig.snapshots.clone());
    let rules = serde_json::from_value(serde_json::json!({
        "conflict": "merge-by-timestamp",
        "rule": [
            {"resources": ["disk:vda"], "pin": older},
            {"resources": ["disk:vda"], "pin": newer},
        ],
    }))
    .unwrap();
    let view = comps
        .create(
            weft_api::composition::CreateComposition {
                name: "mix".into(),
                env: ENV.into(),
                rules,
            },
            "test",
        )
        .await
        .unwrap();
    let vda = view
        .plan
        .resources
        .iter()
        .find(|c| c.resource == "disk:vda");
    assert!(
        matches!(
            vda.map(|c| &c.origin),
            Some(weft_api::composition::Origin::Merge { .. })
        ),
        "{:?}",
        view.plan
    );
    comps
}

#[tokio::test]
async fn weave_create_failure_at_its_dhcp_server_removes_everything() {
    let rig = Rig::new().await;
    let id = rig.disk_snapshot("2026-12-01T10:00:00.000000Z").await;
    let before = rig.net_state();
    rig.doubles.dhcp.fail_next_start();
    let err = rig.weaves.create(ENV, from_snapshot(id)).await.unwrap_err();
    assert_says(&err, "DHCP of weave w1");
    assert!(rig.doubles.processes.launches().is_empty());
    assert_nothing_left(&rig, "w1", &before).await;
}

/// What `weft compose apply mix --weave w2 --live` asks for (the API's apply is this
/// create, inside its audited change).
fn apply_mix() -> CreateWeave {
    CreateWeave {
        name: Some("w2".into()),
        source: Some(Source::Composition("mix".into())),
        live: true,
        egress: Default::default(),
    }
}

#[tokio::test]
async fn compose_apply_failure_at_the_qemu_launch_removes_the_weave_and_its_merge() {
    let rig = Rig::new().await;
    let comps = merged_composition(&rig).await;
    let before = rig.net_state();
    rig.doubles.processes.fail("exec format error");
    let err = rig.weaves.create(ENV, apply_mix()).await.unwrap_err();
    assert_says(&err, "exec format error");
    // Its weave was made and started: QEMU was launched on the merge, served live.
    let launches = rig.doubles.processes.launches();
    assert_eq!(launches.len(), 1, "{launches:?}");
    assert_eq!(launches[0].opts.netns, Some(netns_path("w2")));
    assert_eq!(launches[0].config.vhost_user_disks.len(), 1);
    // Nothing of it is left: rows, per-slot sources, the disk spec, the merge stored as
    // the weave's own block map, namespace, cgroups.
    assert_nothing_left(&rig, "w2", &before).await;
    // The composition stays, and applies once QEMU can start.
    assert!(comps.get("mix").await.is_ok());
}

#[tokio::test]
async fn compose_apply_failure_while_building_its_sources_removes_everything() {
    let rig = Rig::new().await;
    let _comps = merged_composition(&rig).await;
    // The newer side's block map is gone from the store: the merge cannot be made.
    let store = rig.snapshots.store();
    let newer = store.list_indexes().unwrap().into_iter().max().unwrap();
    store.remove_index(&newer).unwrap();
    let before = rig.net_state();
    let err = rig.weaves.create(ENV, apply_mix()).await.unwrap_err();
    assert_says(&err, &newer);
    assert!(rig.doubles.processes.launches().is_empty());
    assert!(rig.doubles.cgroups.calls().is_empty());
    assert_nothing_left(&rig, "w2", &before).await;
}

/// A weave's placement (its namespace and cgroups) is stored with it when it is made,
/// and its QEMU is launched there; an environment that is not a weave has none, and
/// runs in the host's namespaces.
#[tokio::test]
async fn a_weaves_placement_is_stored_with_it_and_used_at_its_launch() {
    let rig = Rig::new().await;
    let id = rig.disk_snapshot("2026-12-01T10:00:00.000000Z").await;
    rig.doubles
        .processes
        .serve(std::sync::Arc::new(weft_qmp::fake::FakeQemu::start()));
    rig.weaves
        .create(ENV, from_snapshot(id))
        .await
        .expect("weave");
    let catalog = rig.manager.catalog();
    assert_eq!(
        catalog.placement("w1").await.unwrap(),
        Some(crate::placement::Stored::weave("w1"))
    );
    assert_eq!(catalog.placement(ENV).await.unwrap(), None);
    let launches = rig.doubles.processes.launches();
    let launch = launches.last().expect("a launch");
    assert_eq!(launch.opts.netns, Some(netns_path("w1")));
    assert!(launch.opts.cgroups.iter().all(|c| c.ends_with("weft/w1")));
    let host = crate::placement::of(catalog, rig.doubles.cgroups.as_ref(), ENV)
        .await
        .unwrap();
    assert_eq!(host, crate::placement::Placement::default());
}
