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

#[tokio::test]
async fn weave_create_failure_at_the_nth_netns_op_removes_everything() {
    let rig = Rig::new(true).await;
    let id = rig.disk_snapshot("2026-12-01T10:00:00.000000Z").await;
    let before = rig.net_state();
    // Halfway through its namespace, links and rules.
    rig.doubles.net.fail_nth_mutation(4);
    let err = rig.weaves.create(ENV, from_snapshot(id)).await.unwrap_err();
    assert!(err.to_string().contains("injected failure"), "{err}");
    assert!(
        rig.doubles.net.mutations().len() >= 4,
        "the namespace was half made: {:?}",
        rig.doubles.net.mutations()
    );
    let left = rig.leftovers("w1").await;
    assert!(left.is_empty(), "left behind: {left:?}");
    assert_eq!(rig.net_state(), before);
    assert!(rig.doubles.processes.launches().is_empty());
}

#[tokio::test]
async fn weave_create_failure_at_its_cgroups_removes_everything() {
    let rig = Rig::new(true).await;
    let id = rig.disk_snapshot("2026-12-01T10:00:00.000000Z").await;
    let before = rig.net_state();
    rig.doubles.cgroups.fail_nth_mutation(1);
    let err = rig.weaves.create(ENV, from_snapshot(id)).await.unwrap_err();
    assert!(
        err.to_string().contains("cannot create the cgroups of w1"),
        "{err}"
    );
    let left = rig.leftovers("w1").await;
    assert!(left.is_empty(), "left behind: {left:?}");
    assert_eq!(rig.net_state(), before);
}

#[tokio::test]
async fn weave_create_failure_at_the_qemu_launch_removes_everything() {
    // No NIC: a guest NIC's DHCP server needs the weave's real namespace.
    let rig = Rig::new(false).await;
    let id = rig.disk_snapshot("2026-12-01T10:00:00.000000Z").await;
    let before = rig.net_state();
    rig.doubles.processes.fail("exec format error");
    let err = rig.weaves.create(ENV, from_snapshot(id)).await.unwrap_err();
    assert!(err.to_string().contains("exec format error"), "{err}");
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
    let left = rig.leftovers("w1").await;
    assert!(left.is_empty(), "left behind: {left:?}");
    assert_eq!(rig.net_state(), before);
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
