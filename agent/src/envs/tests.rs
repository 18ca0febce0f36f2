//! Tests of the environment manager.

use super::*;

#[test]
pub(super) fn names_are_checked() {
    assert!(check_name("web-1").is_ok());
    assert!(check_name("a").is_ok());
    for bad in ["", "-x", "Web", "a/b", "a b", &"x".repeat(33)] {
        assert!(
            matches!(check_name(bad), Err(ApiError::BadRequest(_))),
            "{bad}"
        );
    }
}

#[tokio::test]
pub(super) async fn a_name_is_held_by_one_create_at_a_time() {
    let catalog = Catalog::open_in_memory().await.unwrap();
    let manager = Manager::with_host(
        Config::default(),
        catalog.clone(),
        crate::host::doubles::Doubles::new().host(),
    );
    let first = manager.reserve("web").await.unwrap();
    assert_eq!(first.name(), "web");
    let again = manager.reserve("web").await.err().unwrap();
    assert!(matches!(again, ApiError::Conflict(_)), "{again}");
    // Other names are free; the name is free again once the hold is gone.
    let other = manager.reserve("db").await.unwrap();
    drop(first);
    let second = manager.reserve("web").await.unwrap();
    drop((second, other));
    // A name an environment has is refused, and not left held.
    let config = VmConfig::default();
    catalog
        .insert_environment(&NewEnvironment {
            name: "web",
            kind: EnvKind::Managed,
            config: Some(&config),
            qmp_socket: Path::new("/run/web.sock"),
            state: EnvState::Stopped,
            pid: None,
        })
        .await
        .unwrap();
    for _ in 0..2 {
        let taken = manager.reserve("web").await.err().unwrap();
        assert!(matches!(taken, ApiError::Duplicate(_)), "{taken}");
    }
}

#[test]
pub(super) fn disk_names_default_in_order() {
    assert_eq!(default_disk_name(0).unwrap(), "vda");
    assert_eq!(default_disk_name(2).unwrap(), "vdc");
    assert!(default_disk_name(26).is_err());
}

pub(super) fn disk(path: &Path) -> DiskRequest {
    DiskRequest {
        path: path.to_owned(),
        name: None,
        format: None,
        read_only: false,
        backing: None,
    }
}

#[test]
pub(super) fn vm_config_rejects_missing_disks_and_relative_paths() {
    let e = vm_config(vec![], None, None, None, None, None).unwrap_err();
    assert!(e.one_line().contains("--disk"), "{}", e.one_line());
    let rel = disk(Path::new("disk.img"));
    let e = vm_config(vec![rel], None, None, None, None, None).unwrap_err();
    assert!(e.one_line().contains("relative"), "{}", e.one_line());
    let missing = disk(Path::new("/nonexistent/disk.img"));
    let e = vm_config(vec![missing], None, None, None, None, None).unwrap_err();
    assert!(
        e.one_line().contains("/nonexistent/disk.img"),
        "{}",
        e.one_line()
    );
}

#[test]
pub(super) fn vm_config_fills_defaults() {
    let dir = tempfile::tempdir().unwrap();
    let disk_path = dir.path().join("d.img");
    std::fs::write(&disk_path, vec![0u8; 4096]).unwrap();
    let c = vm_config(vec![disk(&disk_path)], None, Some(2), None, None, None).unwrap();
    assert_eq!(c.memory_mib, DEFAULT_MEMORY_MIB);
    assert_eq!(c.cpus, 2);
    assert_eq!(c.disks[0].name, "vda");
    assert_eq!(c.disks[0].format, weft_qmp::launch::DiskFormat::Raw);
    assert_eq!(c.disks[0].path, disk_path);
}
