//! Where a server keeps what it holds: `--state postgres://...` puts the
//! control plane's state in a real PostgreSQL server
//! (`wharf_testkit::postgres`) instead of SQLite (the whole suite also runs
//! on PostgreSQL: `WHARF_TEST_STATE=postgres`); `--blobs file:///PATH`
//! puts the registry on a shared filesystem path, and `--blobs s3://...`
//! in a bucket of a real S3-compatible server (`wharf_testkit::garage`).

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

    // A second server of the same replica name (`local` when none is
    // given) would take the first one's running tasks for lost: it
    // refuses to start.
    let other = dir.path().join("other");
    let (code, stderr) = server_fails(&other, &["--state", &url]);
    assert_ne!(code, 0);
    assert!(
        stderr.contains("replica local is already running on this database"),
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

#[test]
fn blobs_on_a_shared_filesystem_path_survive_a_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let shared = dir.path().join("nfs").join("wharf");
    let blobs = format!("file://{}", shared.display());
    let s = Server::start_with(&data, &["--blobs", &blobs]);
    s.push_sample("echo", Target::P1, "team/echo:v1");
    let wasm = std::fs::read(wharf_testkit::wasm("echo", Target::P1)).unwrap();
    let digest = crate::server::sha256(&wasm);
    // The layer is a file under the shared path, none in the data directory.
    let hex = digest.trim_start_matches("sha256:");
    let found = walk(&shared)
        .into_iter()
        .filter(|p| p.to_string_lossy().contains(hex))
        .count();
    assert!(found >= 1, "the layer under {}", shared.display());
    assert!(!data.join("registry").exists());
    // `wharf registry gc` finds the same storage with the same flag.
    let out = Command::new(env!("CARGO_BIN_EXE_wharf"))
        .args(["registry", "gc", "--dry-run", "--output", "json"])
        .arg("--data-dir")
        .arg(&data)
        .args(["--blobs", &blobs])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["blobs_removed"], json!([]));

    s.kill9();
    let s = Server::start_with(&data, &["--blobs", &blobs]);
    let r = crate::server::call(
        s.req("GET", &format!("/v2/team/echo/blobs/{digest}"))
            .call(),
    );
    assert_eq!(r.status, 200);
    assert_eq!(crate::server::sha256(&r.body), digest);
    register(&s, json!({"family": "echo", "artifact": "team/echo:v1"}));
    let r = s.api(
        "POST",
        "/v1/tasks",
        Some(json!({"task_definition": "echo"})),
    );
    let id = r.json()[0]["id"].as_str().unwrap().to_owned();
    assert_eq!(s.wait_stopped(&id)["stop_code"], "Completed");
}

#[test]
fn a_blobs_url_that_is_neither_an_absolute_path_nor_a_bucket_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    for (url, says) in [
        ("s3:///wharf", "names no bucket"),
        ("s3://bucket/wharf?colour=red", "unknown parameter"),
        ("file://relative/dir", "needs an absolute path"),
        ("file:///mnt/../etc", "needs an absolute path without `..`"),
        ("/mnt/shared", "is neither file:///PATH nor s3://"),
    ] {
        let (code, stderr) = server_fails(&dir.path().join("d"), &["--blobs", url]);
        assert_eq!(code, 2, "{url}: {stderr}");
        assert!(stderr.contains(says), "{url}: {stderr}");
    }
}

/// Every file under `dir`.
fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if path.is_dir() {
            files.extend(walk(&path));
        } else {
            files.push(path);
        }
    }
    files
}

#[test]
fn blobs_in_an_s3_bucket_survive_a_kill_9_mid_upload_and_are_never_partial() {
    let garage = wharf_testkit::garage::shared();
    let url = garage.url("wharf");
    let env = garage.env();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let s = Server::start_with_env(&data, &["--blobs", &url], &env);
    s.push_sample("echo", Target::P1, "team/echo:v1");
    assert!(
        !data.join("registry").exists(),
        "the blobs went to the bucket"
    );
    // A chunked upload, cut by a kill -9 between its chunks.
    let r = crate::server::call(s.req("POST", "/v2/team/echo/blobs/uploads/").call());
    let location = r.header("location").unwrap().to_owned();
    let first = vec![7u8; 3 << 20];
    let r = crate::server::call(
        s.req("PATCH", &location)
            .set("Content-Range", &format!("0-{}", first.len() - 1))
            .send_bytes(&first),
    );
    assert_eq!(r.status, 202, "{r:?}");
    s.kill9();

    let s = Server::start_with_env(&data, &["--blobs", &url], &env);
    let second = b"and the rest".to_vec();
    let whole = [first.clone(), second.clone()].concat();
    let digest = crate::server::sha256(&whole);
    // Not visible before it is finished.
    let r = crate::server::call(
        s.req("HEAD", &format!("/v2/team/echo/blobs/{digest}"))
            .call(),
    );
    assert_eq!(r.status, 404);
    let r = crate::server::call(s.req("GET", &location).call());
    assert_eq!(
        r.header("range"),
        Some(format!("0-{}", first.len() - 1).as_str())
    );
    let r = crate::server::call(
        s.req("PATCH", &location)
            .set(
                "Content-Range",
                &format!("{}-{}", first.len(), whole.len() - 1),
            )
            .send_bytes(&second),
    );
    assert_eq!(r.status, 202, "{r:?}");
    // Finished through the second server.
    let r = crate::server::call(s.req("PUT", &format!("{location}?digest={digest}")).call());
    assert_eq!(r.status, 201, "{r:?}");
    // A wrong digest stores nothing.
    let r = crate::server::call(s.req("POST", "/v2/team/echo/blobs/uploads/").call());
    let location = r.header("location").unwrap().to_owned();
    let wrong = crate::server::sha256(b"something else");
    let r = crate::server::call(
        s.req("PUT", &format!("{location}?digest={wrong}"))
            .send_bytes(&whole),
    );
    assert_eq!(r.status, 400, "{r:?}");
    let r = crate::server::call(
        s.req("HEAD", &format!("/v2/team/echo/blobs/{wrong}"))
            .call(),
    );
    assert_eq!(r.status, 404);
    let r = crate::server::call(
        s.req("GET", &format!("/v2/team/echo/blobs/{digest}"))
            .call(),
    );
    assert_eq!(r.status, 200);
    assert_eq!(crate::server::sha256(&r.body), digest);
    // The pushed artifact runs: the server reads its layer from the bucket.
    register(&s, json!({"family": "echo", "artifact": "team/echo:v1"}));
    let r = s.api(
        "POST",
        "/v1/tasks",
        Some(json!({"task_definition": "echo"})),
    );
    let id = r.json()[0]["id"].as_str().unwrap().to_owned();
    assert_eq!(s.wait_stopped(&id)["stop_code"], "Completed");
}

/// Runs `wharf` with `args` and `env`; its exit code, stdout and stderr.
fn wharf(args: &[&str], env: &[(&str, String)]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_wharf"))
        .args(args)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .env_remove("WHARF_DATA_DIR")
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn migrate_moves_a_single_node_install_onto_postgresql_and_a_bucket() {
    let garage = wharf_testkit::garage::shared();
    let blobs = garage.url("moved");
    let env = garage.env();
    let state = wharf_testkit::postgres::shared().database();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let data_arg = data.to_str().unwrap().to_owned();
    // A single-node install (SQLite, registry/ in the data directory)
    // with some of everything.
    let s = Server::start_on_sqlite(&data);
    s.push_sample("echo", Target::P1, "team/echo:v1");
    let r = s.api(
        "POST",
        "/v1/secrets",
        Some(json!({"name": "db", "value": "moved-secret-7"})),
    );
    assert_eq!(r.status, 201);
    register(
        &s,
        json!({"family": "echo", "artifact": "team/echo:v1", "args": ["one"],
               "secrets": {"PASSWORD": "db"}}),
    );
    register(
        &s,
        json!({"family": "echo", "artifact": "team/echo:v1", "args": ["two"],
               "secrets": {"PASSWORD": "db"}}),
    );
    let token = s
        .api(
            "POST",
            "/v1/tokens",
            Some(json!({"name": "ci", "role": "reader"})),
        )
        .json()["secret"]
        .as_str()
        .unwrap()
        .to_owned();
    let r = s.api(
        "POST",
        "/v1/tasks",
        Some(json!({"task_definition": "echo:1"})),
    );
    let before = r.json()[0]["id"].as_str().unwrap().to_owned();
    assert_eq!(s.wait_stopped(&before)["stop_code"], "Completed");
    let wasm = std::fs::read(wharf_testkit::wasm("echo", Target::P1)).unwrap();
    let layer = crate::server::sha256(&wasm);

    // Not while its server runs.
    let (code, _, stderr) = wharf(
        &["migrate", "--from", &data_arg, "--to-state", &state],
        &env,
    );
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("stop it before migrating"), "{stderr}");
    assert_eq!(s.terminate().code(), Some(0));

    let (code, stdout, stderr) = wharf(
        &[
            "migrate",
            "--from",
            &data_arg,
            "--to-state",
            &state,
            "--to-blobs",
            &blobs,
        ],
        &env,
    );
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("every digest checked twice"), "{stdout}");
    assert!(stdout.contains("2 task definitions, 1 tasks"), "{stdout}");
    // Into a database that already holds state: refused.
    let (code, _, stderr) = wharf(
        &["migrate", "--from", &data_arg, "--to-state", &state],
        &env,
    );
    assert_eq!(code, 2);
    assert!(
        stderr.contains("migrate into an empty database"),
        "{stderr}"
    );

    // The same data directory's server on the new stores has it all.
    std::fs::remove_dir_all(data.join("registry")).unwrap();
    std::fs::remove_file(data.join("state.db")).unwrap();
    let s = Server::start_with_env(&data, &["--state", &state, "--blobs", &blobs], &env);
    let defs = s.api("GET", "/v1/taskdefs?family=echo", None).json();
    assert_eq!(defs.as_array().unwrap().len(), 2, "{defs}");
    let t = s.api("GET", &format!("/v1/tasks/{before}"), None).json();
    assert_eq!(t["stop_code"], "Completed", "{t}");
    let logs = s.api("GET", &format!("/v1/tasks/{before}/logs"), None);
    assert!(
        String::from_utf8_lossy(&logs.body).contains(r#""text":"one""#),
        "{}",
        String::from_utf8_lossy(&logs.body)
    );
    assert_eq!(s.api_as(&token, "GET", "/v1/tasks", None).status, 200);
    let r = crate::server::call(s.req("GET", &format!("/v2/team/echo/blobs/{layer}")).call());
    assert_eq!(crate::server::sha256(&r.body), layer);
    // A new revision numbers on, and the moved secret opens for a task.
    let def = register(
        &s,
        json!({"family": "echo", "artifact": "team/echo:v1", "secrets": {"PASSWORD": "db"}}),
    );
    assert_eq!(def["revision"], 3, "{def}");
    let r = s.api(
        "POST",
        "/v1/tasks",
        Some(json!({"task_definition": "echo:3"})),
    );
    let after = r.json()[0]["id"].as_str().unwrap().to_owned();
    assert_eq!(s.wait_stopped(&after)["stop_code"], "Completed");
    let logs = s.api("GET", &format!("/v1/tasks/{after}/logs"), None);
    assert!(
        String::from_utf8_lossy(&logs.body).contains("PASSWORD=moved-secret-7"),
        "{}",
        String::from_utf8_lossy(&logs.body)
    );
}

/// Triggers that make the store refuse every STOPPED task record (as a
/// full disk would refuse them): SQLite's, then PostgreSQL's.
const REFUSE_STOPPED: (&str, &str) = (
    "CREATE TRIGGER refuse_stop_i BEFORE INSERT ON tasks WHEN NEW.status = 'STOPPED' \
       BEGIN SELECT RAISE(ABORT, 'refused for the test'); END; \
     CREATE TRIGGER refuse_stop_u BEFORE UPDATE ON tasks WHEN NEW.status = 'STOPPED' \
       BEGIN SELECT RAISE(ABORT, 'refused for the test'); END;",
    "CREATE FUNCTION refuse_stop() RETURNS trigger LANGUAGE plpgsql AS $$ \
       BEGIN IF NEW.status = 'STOPPED' THEN RAISE EXCEPTION 'refused for the test'; END IF; \
       RETURN NEW; END $$; \
     CREATE TRIGGER refuse_stop BEFORE INSERT OR UPDATE ON tasks \
       FOR EACH ROW EXECUTE FUNCTION refuse_stop();",
);
/// Drops [`REFUSE_STOPPED`]'s triggers.
const ACCEPT_STOPPED: (&str, &str) = (
    "DROP TRIGGER refuse_stop_i; DROP TRIGGER refuse_stop_u;",
    "DROP TRIGGER refuse_stop ON tasks; DROP FUNCTION refuse_stop();",
);

#[test]
fn a_stopped_record_the_store_refuses_is_retried_and_never_shown_before() {
    // A full disk or a database away, for STOPPED records only: a trigger
    // refuses them. The task must not show STOPPED (nor vanish) while its
    // final record is not durable, and must once the store takes it again.
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start_in(dir.path());
    s.push_sample("heartbeat", Target::P1, "team/beat:v1");
    let r = s.api(
        "POST",
        "/v1/taskdefs",
        Some(json!({"family": "beat", "artifact": "team/beat:v1", "args": ["100"]})),
    );
    assert_eq!(r.status, 201, "{r:?}");
    let r = s.api(
        "POST",
        "/v1/tasks",
        Some(json!({"task_definition": "beat"})),
    );
    assert_eq!(r.status, 201, "{r:?}");
    let id = r.json()[0]["id"].as_str().unwrap().to_owned();
    crate::server::eventually(Duration::from_secs(30), "the task running", || {
        let t = s.api("GET", &format!("/v1/tasks/{id}"), None).json();
        (t["status"] == "RUNNING").then_some(())
    });
    s.state_sql(REFUSE_STOPPED.0, REFUSE_STOPPED.1);
    let r = s.api("POST", &format!("/v1/tasks/{id}/stop"), None);
    assert_eq!(r.status, 200, "{r:?}");
    // Several failed commits (retried after 0.1, 0.2, 0.4, 0.8 s...).
    let refusing = Instant::now() + Duration::from_millis(1500);
    while Instant::now() < refusing {
        let r = s.api("GET", &format!("/v1/tasks/{id}"), None);
        assert_eq!(r.status, 200, "{r:?}");
        let t = r.json();
        assert_eq!(t["status"], "RUNNING", "shown before it is durable: {t}");
        assert_eq!(t["desired_status"], "STOPPED", "{t}");
        std::thread::sleep(Duration::from_millis(50));
    }
    s.state_sql(ACCEPT_STOPPED.0, ACCEPT_STOPPED.1);
    let t = crate::server::eventually(Duration::from_secs(10), "the task stopped", || {
        let t = s.api("GET", &format!("/v1/tasks/{id}"), None).json();
        (t["status"] == "STOPPED").then_some(t)
    });
    assert_eq!(t["stop_code"], "UserStopped", "{t}");
    // Durable, with its output: a restart reads both from the store.
    assert!(s.terminate().success());
    let s = Server::start_in(dir.path());
    let t = s.api("GET", &format!("/v1/tasks/{id}"), None).json();
    assert_eq!(t["status"], "STOPPED", "{t}");
    assert_eq!(t["stop_code"], "UserStopped", "{t}");
    let page = s.api("GET", &format!("/v1/tasks/{id}/logs"), None).json();
    assert!(
        page["lines"].as_array().is_some_and(|l| !l.is_empty()),
        "{page}"
    );
}
