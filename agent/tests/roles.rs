//! Roles through a real weftd, called by real non-root users over its socket: every
//! route of the table is refused (403) or served exactly as its declared role says, for
//! a caller without a role, a reader, an operator and an admin (the last three mapped by
//! group, supplementary group and user name); bodies that need more are refused too;
//! every refusal is one line and is in the audit log; `weft` run as those users works or
//! refuses as it should. No guest is needed. The test users and groups (`weftt-*`) are
//! made with useradd/groupadd if missing: the tests run as root.

mod common;
use common::Weftd;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use weft::api::routes;
use weft::model::AuditEntry;
use weft::roles::Role;
use weft_client::Client;

/// Test users: (name, supplementary groups).
const USERS: [(&str, &str); 5] = [
    ("weftt-none", "weftt-sock"),
    ("weftt-reader", "weftt-sock,weftt-readers"),
    ("weftt-oper", "weftt-sock,weftt-readers"),
    ("weftt-admin", "weftt-sock,weftt-admins"),
    ("weftt-out", ""),
];

/// weftt-oper is a reader through its group and an operator by name: the highest wins.
const CONFIG: &str = r#"
socket_group = "weftt-sock"
[roles]
admin = ["@weftt-admins"]
operator = ["weftt-oper"]
reader = ["@weftt-readers"]
"#;

/// Makes the test users and groups (idempotent; serialised between test processes).
fn ensure_accounts() {
    let mut script = String::from(
        "set -e\nfor g in weftt-sock weftt-readers weftt-admins; do getent group $g >/dev/null || groupadd --system $g; done\n",
    );
    for (user, groups) in USERS {
        script.push_str(&format!(
            "id -u {user} >/dev/null 2>&1 || useradd --system --no-create-home --shell /usr/sbin/nologin --user-group {user}\nusermod -G '{groups}' {user}\n"
        ));
    }
    let out = Command::new("flock")
        .args(["/tmp/weft-test-accounts.lock", "sh", "-c", &script])
        .output()
        .expect("flock runs");
    assert!(
        out.status.success(),
        "cannot make the test users: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn uid(user: &str) -> u32 {
    nix::unistd::User::from_name(user)
        .unwrap()
        .unwrap_or_else(|| panic!("no user {user}"))
        .uid
        .as_raw()
}

/// `program args` run as `user` with its primary and supplementary groups, as a login
/// would give them.
fn as_user(user: &str, program: &Path, args: &[&str]) -> Output {
    Command::new("setpriv")
        .args([
            &format!("--reuid={user}"),
            &format!("--regid={user}"),
            "--init-groups",
            "--",
        ])
        .arg(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("setpriv runs")
}

/// A weftd whose socket the test users can reach: the test directory is 0711, weftd
/// makes its run directory 0750 and the socket 0660, both of group weftt-sock.
async fn start(dir: &Path) -> Weftd {
    ensure_accounts();
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o711)).unwrap();
    let quoted = serde_json::to_string(&dir.to_string_lossy()).unwrap();
    let config = format!("image_dirs = [{quoted}]\nexport_dirs = [{quoted}]\n{CONFIG}");
    Weftd::start_with(dir, &config).await
}

/// One request as `user` through curl: (HTTP status, body).
fn call(user: &str, socket: &Path, method: &str, path: &str, body: Option<&str>) -> (u16, String) {
    let url = format!("http://weftd{path}");
    let socket = socket.to_str().unwrap();
    let mut args = vec![
        "-sS",
        "--unix-socket",
        socket,
        "-X",
        method,
        "-o",
        "-",
        "-w",
        "\n%{http_code}",
    ];
    if let Some(b) = body {
        args.extend(["-H", "content-type: application/json", "--data-binary", b]);
    }
    args.push(&url);
    let out = as_user(user, Path::new("/usr/bin/curl"), &args);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
    let code = code.trim().parse().unwrap_or_else(|_| {
        panic!(
            "curl {method} {path} as {user}: {text} {}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (code, body.to_string())
}

/// The path with its parameters filled with things that do not exist.
fn fill(path: &str) -> String {
    path.replace("{name}", "rolesnone")
        .replace("{id}", "999999")
        .replace("{resource}", "disk:vda")
}

fn error_of(body: &str) -> String {
    serde_json::from_str::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v["error"].as_str().map(str::to_owned))
        .unwrap_or_else(|| body.to_string())
}

#[tokio::test]
async fn every_route_refuses_or_serves_as_its_role_says() {
    let dir = tempfile::tempdir().unwrap();
    let weftd = start(dir.path()).await;
    let socket = weftd.socket.clone();
    let callers: [(&str, Option<Role>); 4] = [
        ("weftt-none", None),
        ("weftt-reader", Some(Role::Reader)),
        ("weftt-oper", Some(Role::Operator)),
        ("weftt-admin", Some(Role::Admin)),
    ];
    // One thread per caller; each calls every route of the table.
    let results: Vec<Vec<String>> = std::thread::scope(|s| {
        let handles: Vec<_> = callers
            .iter()
            .map(|&(user, role)| {
                let socket = &socket;
                s.spawn(move || {
                    let mut wrong = Vec::new();
                    for r in routes() {
                        let method = r.method.as_str();
                        let body = (method != "GET").then_some("{}");
                        let (code, answer) = call(user, socket, method, &fill(r.path), body);
                        let allowed = role.is_some_and(|have| have >= r.role);
                        let what = format!("{method} {} as {user} (needs {})", r.path, r.role);
                        if allowed && code == 403 {
                            wrong.push(format!("{what}: refused: {}", error_of(&answer)));
                        }
                        if !allowed {
                            let e = error_of(&answer);
                            let line = format!("forbidden: {} needs role {}; uid ", r.what, r.role);
                            if code != 403 || !e.starts_with(&line) || e.contains('\n') {
                                wrong.push(format!("{what}: {code} {e}"));
                            }
                        }
                    }
                    wrong
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let wrong: Vec<_> = results.into_iter().flatten().collect();
    assert!(
        wrong.is_empty(),
        "{} wrong answers:\n{}",
        wrong.len(),
        wrong.join("\n")
    );

    // What a caller without a role hears, and that unknown routes tell it nothing.
    let (code, body) = call("weftt-none", &socket, "GET", "/v1/environments", None);
    let none_uid = uid("weftt-none");
    assert_eq!(code, 403);
    assert!(
        error_of(&body).starts_with(&format!(
            "forbidden: env list needs role reader; uid {none_uid} (weftt-none) has no role"
        )),
        "{body}"
    );
    assert_eq!(
        call("weftt-none", &socket, "GET", "/v1/nothing", None).0,
        403
    );
    assert_eq!(
        call("weftt-reader", &socket, "GET", "/v1/nothing", None).0,
        404
    );

    // Bodies that need more than the route: refused for the operator, not for the admin.
    let env_body = |kind: &str| {
        if kind == "attached" {
            r#"{"kind":"attached","name":"rolesatt","qmp_socket":"/nonexistent/qmp.sock"}"#
        } else {
            r#"{"kind":"managed","name":"rolesmgd","disks":[{"path":"/nonexistent/d.raw"}],"no_start":true}"#
        }
    };
    let cases = [
        (
            "POST",
            "/v1/environments",
            env_body("attached"),
            Some("env attach"),
        ),
        ("POST", "/v1/environments", env_body("managed"), None),
        (
            "POST",
            "/v1/environments/rolesnone/weaves",
            r#"{"egress":"all"}"#,
            Some("weave create --egress all"),
        ),
        (
            "POST",
            "/v1/environments/rolesnone/weaves",
            r#"{"egress":"internet"}"#,
            None,
        ),
        (
            "POST",
            "/v1/compositions/rolesnone/apply",
            r#"{"egress":"all"}"#,
            Some("compose apply --egress all"),
        ),
        (
            "POST",
            "/v1/compositions/rolesnone/apply",
            r#"{"egress":"none"}"#,
            None,
        ),
        (
            "POST",
            "/v1/weaves/rolesnone/egress",
            r#"{"egress":"all"}"#,
            Some("weave egress all"),
        ),
        (
            "POST",
            "/v1/weaves/rolesnone/egress",
            r#"{"egress":"internet"}"#,
            None,
        ),
        (
            "POST",
            "/v1/environments/rolesnone/replay",
            r#"{"to":"now","out":"/nonexistent/out"}"#,
            Some("replay --out"),
        ),
        (
            "POST",
            "/v1/environments/rolesnone/replay",
            r#"{"to":"now","into":"rolesnonew","force":true}"#,
            Some("replay --force"),
        ),
        (
            "POST",
            "/v1/environments/rolesnone/replay",
            r#"{"to":"now","into":"rolesnonew"}"#,
            None,
        ),
    ];
    let oper_uid = uid("weftt-oper");
    let mut refusals = 0;
    for (method, path, body, admin_only) in cases {
        let (code, answer) = call("weftt-oper", &socket, method, path, Some(body));
        match admin_only {
            Some(what) => {
                refusals += 1;
                assert_eq!(code, 403, "{path} {body} as operator: {answer}");
                assert_eq!(
                    error_of(&answer),
                    format!("forbidden: {what} needs role admin; uid {oper_uid} (weftt-oper) has operator")
                );
            }
            None => assert_ne!(code, 403, "{path} {body} as operator: {answer}"),
        }
        let (code, answer) = call("weftt-admin", &socket, method, path, Some(body));
        assert_ne!(code, 403, "{path} {body} as admin: {answer}");
    }

    // Every refusal is in the audit log, with the peer and the route.
    let expected: usize = routes()
        .iter()
        .map(|r| {
            callers
                .iter()
                .filter(|(_, role)| !role.is_some_and(|have| have >= r.role))
                .count()
        })
        .sum::<usize>()
        + 2 // env list and the unknown route, as weftt-none
        + refusals;
    let log: Vec<AuditEntry> = Client::new(&socket)
        .get("/v1/audit?limit=10000")
        .await
        .unwrap();
    let forbidden: Vec<_> = log.iter().filter(|e| e.action == "api.forbidden").collect();
    assert_eq!(forbidden.len(), expected, "refusals in the audit log");
    assert!(forbidden.iter().all(|e| e.result == "forbidden"));
    assert!(
        forbidden.iter().any(|e| e.actor == "weftt-reader"
            && e.target.as_deref() == Some("DELETE /v1/environments/rolesnone")
            && e.detail
                .as_deref()
                .is_some_and(|d| d.contains("env delete needs role operator"))),
        "{forbidden:#?}"
    );
}

/// The `weft` binary, copied where the test users can run it.
fn weft_for_users(dir: &Path) -> PathBuf {
    let weft = dir.join("weft");
    std::fs::copy(common::weft_cli_path(), &weft).unwrap();
    std::fs::set_permissions(&weft, std::fs::Permissions::from_mode(0o755)).unwrap();
    weft
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[tokio::test]
async fn weft_as_real_users_lists_refuses_in_one_line_and_audits() {
    let dir = tempfile::tempdir().unwrap();
    let weftd = start(dir.path()).await;
    let weft = weft_for_users(dir.path());
    let socket = weftd.socket.to_str().unwrap().to_string();
    let run = |user: &str, args: &[&str]| {
        let mut all = vec!["--socket", &socket];
        all.extend(args);
        as_user(user, &weft, &all)
    };

    // An operator makes an environment (recorded only, no QEMU) ...
    let disk = dir.path().join("roles.raw");
    std::fs::File::create(&disk)
        .and_then(|f| f.set_len(1 << 20))
        .unwrap();
    let spec = format!("{},name=vda,format=raw", disk.display());
    let out = run(
        "weftt-oper",
        &[
            "env",
            "create",
            "rolesenv",
            "--disk",
            &spec,
            "--memory",
            "64M",
            "--no-start",
        ],
    );
    assert!(
        out.status.success(),
        "env create as operator: {}",
        text(&out.stderr)
    );

    // ... a reader sees it, and is who it thinks it is ...
    let out = run("weftt-reader", &["env", "list"]);
    assert!(
        out.status.success(),
        "env list as reader: {}",
        text(&out.stderr)
    );
    assert!(
        text(&out.stdout).contains("rolesenv"),
        "{}",
        text(&out.stdout)
    );
    let reader_uid = uid("weftt-reader");
    let out = run("weftt-reader", &["whoami"]);
    assert!(out.status.success(), "whoami: {}", text(&out.stderr));
    let who = text(&out.stdout);
    assert!(
        who.contains(&format!("user:   weftt-reader (uid {reader_uid})")),
        "{who}"
    );
    assert!(
        who.contains("weftt-readers") && who.contains("role:   reader"),
        "{who}"
    );

    // ... but cannot delete it: one line, exit 1, and the environment stays.
    let out = run(
        "weftt-reader",
        &["--actor", "ci-bot", "env", "delete", "rolesenv"],
    );
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    assert_eq!(
        text(&out.stderr),
        format!("weft: forbidden: env delete needs role operator; uid {reader_uid} (weftt-reader) has reader\n")
    );
    assert!(text(&run("weftt-reader", &["env", "list"]).stdout).contains("rolesenv"));

    // The refusal is in `weft audit`, which the reader may read.
    let out = run("weftt-reader", &["audit", "--limit", "50"]);
    assert!(
        out.status.success(),
        "audit as reader: {}",
        text(&out.stderr)
    );
    let audit = text(&out.stdout);
    assert!(
        audit
            .lines()
            .any(|l| l.contains("ci-bot (via weftt-reader)")
                && l.contains("api.forbidden")
                && l.contains("DELETE /v1/environments/rolesenv")
                && l.contains("forbidden")),
        "{audit}"
    );

    // In the socket's group without a role: nothing, not even whoami.
    let none_uid = uid("weftt-none");
    for args in [&["env", "list"][..], &["whoami"], &["status"]] {
        let out = run("weftt-none", args);
        assert_eq!(
            out.status.code(),
            Some(1),
            "{args:?}: {}",
            text(&out.stderr)
        );
        let err = text(&out.stderr);
        assert!(
            err.starts_with("weft: forbidden: ")
                && err.contains(&format!("uid {none_uid} (weftt-none) has no role"))
                && err.lines().count() == 1,
            "{err}"
        );
    }
    // Outside the socket's group: the socket does not open.
    let out = run("weftt-out", &["env", "list"]);
    assert_eq!(out.status.code(), Some(3), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("Permission denied"),
        "{}",
        text(&out.stderr)
    );

    // The operator may delete it.
    let out = run("weftt-oper", &["env", "delete", "rolesenv"]);
    assert!(
        out.status.success(),
        "env delete as operator: {}",
        text(&out.stderr)
    );
    let out = run("weftt-admin", &["whoami"]);
    assert!(
        text(&out.stdout).contains("role:   admin"),
        "{}",
        text(&out.stdout)
    );
}

#[test]
fn weftd_does_not_start_with_an_unknown_name_in_roles() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("weftd.toml");
    std::fs::write(&config, "[roles]\noperator = [\"weftt-nosuchuser\"]\n").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_weftd"))
        .arg("--config")
        .arg(&config)
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .arg("--run-dir")
        .arg(dir.path().join("run"))
        .output()
        .expect("weftd runs");
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(
        err.contains("roles.operator in weftd.toml names user \"weftt-nosuchuser\""),
        "{err}"
    );
    assert!(!dir.path().join("run/weftd.sock").exists());
}
