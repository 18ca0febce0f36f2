//! Checks the shipped systemd unit with `systemd-analyze verify`.

use std::path::Path;
use std::process::Command;

#[test]
fn systemd_unit_verifies() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let unit = std::fs::read_to_string(root.join("systemd/weftd.service")).unwrap();
    assert!(
        unit.contains("Type=notify"),
        "weftd.service must be Type=notify"
    );
    assert!(unit.contains("Restart=on-failure"));
    assert!(
        unit.contains("KillMode=process"),
        "guests must survive a weftd restart"
    );
    // verify checks that ExecStart exists: point it at the binary just built.
    let weftd = env!("CARGO_BIN_EXE_weftd");
    let unit = unit.replace("/usr/local/bin/weftd", weftd);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("weftd.service");
    std::fs::write(&path, unit).unwrap();
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&path)
        .output()
        .expect("systemd-analyze is installed (package systemd)");
    let stderr = String::from_utf8_lossy(&out.stderr);
    // Lines about other units on the host are not ours to judge.
    let ours: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("weftd.service"))
        .collect();
    assert!(
        out.status.success() && ours.is_empty(),
        "systemd-analyze verify failed:\n{stderr}"
    );
}

#[test]
fn tmpfiles_entry_creates_the_runtime_directory() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let text = std::fs::read_to_string(root.join("systemd/weft.conf")).unwrap();
    let entries: Vec<Vec<&str>> = text
        .lines()
        .filter(|l| !l.trim_start().starts_with('#') && !l.trim().is_empty())
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert!(entries
        .iter()
        .any(|e| e.len() >= 3 && e[0] == "d" && e[1] == "/run/weft"));
    for e in &entries {
        assert!(
            e.len() >= 5,
            "tmpfiles line needs type, path, mode, user, group: {e:?}"
        );
    }
}
