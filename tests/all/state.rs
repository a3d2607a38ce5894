//! `wharf server --state postgres://...`: the control plane's state in a
//! real PostgreSQL server (`wharf_testkit::postgres`) instead of SQLite.
//! (The whole suite also runs on PostgreSQL: `WHARF_TEST_STATE=postgres`.)

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::json;
use wharf_testkit::Target;

use crate::server::{Server, register};

/// Runs `wharf server` expected to fail; its exit code and stderr.
fn server_fails(data: &std::path::Path, flags: &[&str]) -> (i32, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_wharf"))
        .args(["server", "--listen", "127.0.0.1:0", "--ingress", "off"])
        .arg("--data-dir")
        .arg(data)
        .args(flags)
        .env_remove("WHARF_STATE")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("wharf server did not fail within 30 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = child.wait_with_output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn the_state_lives_in_postgresql_survives_a_kill_9_and_has_one_server() {
    let url = wharf_testkit::postgres::shared().database();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let s = Server::start_with(&data, &["--state", &url]);
    s.push_sample("echo", Target::P1, "team/echo:v1");
    register(
        &s,
        json!({"family": "echo", "artifact": "team/echo:v1", "args": ["from", "postgres"]}),
    );
    let r = s.api(
        "POST",
        "/v1/secrets",
        Some(json!({"name": "k", "value": "v"})),
    );
    assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
    let r = s.api(
        "POST",
        "/v1/tasks",
        Some(json!({"task_definition": "echo"})),
    );
    assert_eq!(r.status, 201);
    let id = r.json()[0]["id"].as_str().unwrap().to_owned();
    assert_eq!(s.wait_stopped(&id)["stop_code"], "Completed");
    assert!(
        !data.join("state.db").exists(),
        "the state went to PostgreSQL, not SQLite"
    );

    // A second server on the same database would take the first one's
    // running tasks for lost: it refuses to start.
    let other = dir.path().join("other");
    let (code, stderr) = server_fails(&other, &["--state", &url]);
    assert_ne!(code, 0);
    assert!(
        stderr.contains("another wharf server is using the database"),
        "{stderr}"
    );

    s.kill9();
    let s = Server::start_with(&data, &["--state", &url]);
    assert_eq!(s.api("GET", "/v1/taskdefs/echo:1", None).status, 200);
    assert_eq!(s.api("GET", "/v1/secrets", None).json()[0]["name"], "k");
    let t = s.api("GET", &format!("/v1/tasks/{id}"), None).json();
    assert_eq!(t["stop_code"], "Completed", "{t}");
    let logs = s.api("GET", &format!("/v1/tasks/{id}/logs"), None);
    assert!(
        String::from_utf8_lossy(&logs.body).contains(r#""text":"postgres""#),
        "{}",
        String::from_utf8_lossy(&logs.body)
    );
}

#[test]
fn a_bad_or_unreachable_state_url_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let (code, stderr) = server_fails(&dir.path().join("a"), &["--state", "mysql://u:pw@h/db"]);
    assert_eq!(code, 2, "{stderr}");
    assert!(
        stderr.contains("--state mysql://u:***@h/db is not a PostgreSQL URL"),
        "{stderr}"
    );
    assert!(
        !stderr.contains("pw"),
        "the password is not shown: {stderr}"
    );
    // Nothing listens on port 1.
    let (code, stderr) = server_fails(
        &dir.path().join("b"),
        &["--state", "postgres://wharf:hunter2@127.0.0.1:1/wharf"],
    );
    assert_eq!(code, 2, "{stderr}");
    assert!(
        stderr.contains("failed to open the state in postgres://wharf:***@127.0.0.1:1/wharf"),
        "{stderr}"
    );
    assert!(!stderr.contains("hunter2"), "{stderr}");
}
