//! Attacks and faults a hostile tenant or a broken peer would try, against
//! the real server: each test reproduces one and shows it refused or
//! bounded.

use std::process::Command;

use serde_json::{Value, json};

use crate::server::{Response, Server, call, image_manifest, sha256};

/// Creates a token with `role` limited to `repositories`; returns its secret.
pub(crate) fn scoped_token(s: &Server, role: &str, repositories: &[&str]) -> String {
    let r = s.api(
        "POST",
        "/v1/tokens",
        Some(json!({"name": format!("{role}-{}", repositories.join(",")), "role": role, "repositories": repositories})),
    );
    assert_eq!(r.status, 201, "{r:?}");
    r.json()["secret"].as_str().unwrap().to_owned()
}

/// A registry request with `token` as the Bearer credential.
fn as_token(s: &Server, token: &str, method: &str, path: &str) -> ureq::Request {
    ureq::request(method, &format!("{}{path}", s.base))
        .set("Authorization", &format!("Bearer {token}"))
}

#[test]
fn a_mount_needs_pull_access_to_its_source_and_is_never_an_oracle() {
    let s = Server::start();
    let digest = s.push_blob("secret/app", b"the other team's layer");
    s.push_blob("team/y", b"ours");
    let ours = sha256(b"ours");
    let team = scoped_token(&s, "deployer", &["team/*"]);

    // From a repository the token cannot read: a plain upload, no link.
    let r = call(
        as_token(
            &s,
            &team,
            "POST",
            &format!("/v2/team/x/blobs/uploads/?mount={digest}&from=secret/app"),
        )
        .call(),
    );
    assert_eq!(r.status, 202, "{r:?}");
    assert!(r.header("location").unwrap().contains("/blobs/uploads/"));
    // Without `from`: the store is not searched either.
    let r = call(
        as_token(
            &s,
            &team,
            "POST",
            &format!("/v2/team/x/blobs/uploads/?mount={digest}"),
        )
        .call(),
    );
    assert_eq!(r.status, 202, "{r:?}");
    let r = call(as_token(&s, &team, "GET", &format!("/v2/team/x/blobs/{digest}")).call());
    assert_eq!(r.status, 404, "the blob leaked into team/x: {r:?}");
    // Without `from` even the admin gets an upload, not a mount.
    let r = call(
        s.req("POST", &format!("/v2/team/x/blobs/uploads/?mount={digest}"))
            .call(),
    );
    assert_eq!(r.status, 202, "{r:?}");

    // From a repository it can read: mounted.
    let r = call(
        as_token(
            &s,
            &team,
            "POST",
            &format!("/v2/team/x/blobs/uploads/?mount={ours}&from=team/y"),
        )
        .call(),
    );
    assert_eq!(r.status, 201, "{r:?}");
    let r = call(as_token(&s, &team, "GET", &format!("/v2/team/x/blobs/{ours}")).call());
    assert_eq!((r.status, r.body.as_slice()), (200, b"ours".as_slice()));
}

#[test]
fn the_catalog_lists_only_repositories_a_token_may_pull() {
    let s = Server::start();
    s.push_blob("team/a", b"a");
    s.push_blob("secret/app", b"b");
    let team = scoped_token(&s, "reader", &["team/*"]);
    let r = call(as_token(&s, &team, "GET", "/v2/_catalog").call());
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["repositories"], json!(["team/a"]));
    let r = call(s.req("GET", "/v2/_catalog").call());
    assert_eq!(r.json()["repositories"], json!(["secret/app", "team/a"]));
}

#[test]
fn empty_credentials_are_refused_and_a_short_admin_token_stops_the_server() {
    let s = Server::start();
    // Basic with an empty password.
    let r = call(
        ureq::get(&format!("{}/v2/_catalog", s.base))
            .set("Authorization", "Basic dXNlcjo=")
            .call(),
    );
    assert_eq!(r.status, 401);
    drop(s);

    for content in ["", "\n", "short-token"] {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("admin.token"), content).unwrap();
        let out = Command::new(env!("CARGO_BIN_EXE_wharf"))
            .args(["server", "--listen", "127.0.0.1:0", "--data-dir"])
            .arg(dir.path())
            .output()
            .unwrap();
        assert!(!out.status.success(), "started with {content:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains("too short to be a token"), "{stderr}");
    }
}

#[test]
fn of_concurrent_pushes_to_an_immutable_tag_exactly_one_wins() {
    let s = Server::start();
    let data = s.data().to_str().unwrap().to_owned();
    let out = Command::new(env!("CARGO_BIN_EXE_wharf"))
        .args([
            "registry",
            "settings",
            "team/app",
            "--tag-immutability",
            "true",
        ])
        .args(["--data-dir", &data])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let config = s.push_blob("team/app", b"{}");
    let manifests: Vec<Value> = (0..8)
        .map(|i| {
            let mut m = image_manifest((&config, 2), &[]);
            m["annotations"] = json!({"n": i.to_string()});
            m
        })
        .collect();
    let statuses: Vec<u16> = std::thread::scope(|scope| {
        let handles: Vec<_> = manifests
            .iter()
            .map(|m| scope.spawn(|| s.push_manifest("team/app", "v1", m).status))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let wins = statuses.iter().filter(|&&st| st == 201).count();
    assert_eq!(wins, 1, "{statuses:?}");
    assert!(
        statuses.iter().all(|&st| st == 201 || st == 409),
        "{statuses:?}"
    );
}

#[test]
fn an_out_of_order_chunk_gets_416_with_the_current_range() {
    let s = Server::start();
    let r = call(s.req("POST", "/v2/team/c/blobs/uploads/").call());
    assert_eq!(r.status, 202);
    let location = r.header("location").unwrap().to_owned();
    // The first chunk claims to start at 5.
    let r = call(
        s.req("PATCH", &location)
            .set("Content-Range", "5-9")
            .send_bytes(b"hello"),
    );
    assert_eq!((r.status, r.header("range")), (416, Some("0-0")), "{r:?}");
    assert_eq!(r.error_code(), "BLOB_UPLOAD_INVALID");
    let r = call(
        s.req("PATCH", &location)
            .set("Content-Range", "0-4")
            .send_bytes(b"hello"),
    );
    assert_eq!((r.status, r.header("range")), (202, Some("0-4")), "{r:?}");
    let r = call(
        s.req("PATCH", &location)
            .set("Content-Range", "3-7")
            .send_bytes(b"world"),
    );
    assert_eq!((r.status, r.header("range")), (416, Some("0-4")), "{r:?}");
}

#[test]
fn manifests_with_absent_non_distributable_layers_are_accepted_and_served() {
    let s = Server::start();
    let config = s.push_blob("team/nd", b"{}");
    let foreign = format!("sha256:{}", "ab".repeat(32));
    let manifest = |urls: Value| {
        json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config, "size": 2},
            "layers": [{
                "mediaType": "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
                "digest": foreign, "size": 12345, "urls": urls,
            }],
        })
    };
    let r = s.push_manifest(
        "team/nd",
        "v1",
        &manifest(json!(["https://example.com/layer"])),
    );
    assert_eq!(r.status, 201, "{r:?}");
    let r: Response = call(s.req("GET", "/v2/team/nd/manifests/v1").call());
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["layers"][0]["digest"], foreign.as_str());
    let r = call(s.req("GET", "/v2/team/nd/tags/list").call());
    assert_eq!(r.json()["tags"], json!(["v1"]));
    // The descriptor is still validated.
    let r = s.push_manifest("team/nd", "v2", &manifest(json!(["file:///etc/passwd"])));
    assert_eq!(
        (r.status, r.error_code().as_str()),
        (400, "MANIFEST_INVALID")
    );
    // A distributable layer must still be present.
    let mut m = manifest(json!([]));
    m["layers"][0]["mediaType"] = json!("application/vnd.oci.image.layer.v1.tar+gzip");
    let r = s.push_manifest("team/nd", "v3", &m);
    assert_eq!(
        (r.status, r.error_code().as_str()),
        (400, "MANIFEST_BLOB_UNKNOWN")
    );
}

#[test]
fn maintenance_beside_a_live_server_keeps_its_files_and_a_second_server_is_refused() {
    let s = Server::start();
    let data = s.data().to_owned();
    // A temporary file the server is writing right now.
    let in_flight = data.join("registry/_tmp/in-flight");
    std::fs::write(&in_flight, b"half a blob").unwrap();
    for args in [
        vec!["registry", "settings", "team/app", "--keep-last", "3"],
        vec!["registry", "gc", "--dry-run"],
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_wharf"))
            .args(&args)
            .arg("--data-dir")
            .arg(&data)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            in_flight.exists(),
            "{args:?} removed the server's temporary file"
        );
    }
    let config = s.push_blob("team/app", b"{}");
    assert_eq!(
        s.push_manifest("team/app", "v1", &image_manifest((&config, 2), &[]))
            .status,
        201
    );

    let out = Command::new(env!("CARGO_BIN_EXE_wharf"))
        .args(["server", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(&data)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("in use by another running wharf server"),
        "{stderr}"
    );
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

#[test]
fn secrets_have_scopes_are_sealed_at_rest_and_scoped_tokens_see_only_their_own() {
    use wharf_testkit::Target;
    let s = Server::start();
    s.push_sample("echo", Target::P1, "team/echo:v1");
    s.push_sample("echo", Target::P1, "secret/app:v1");
    let team = scoped_token(&s, "deployer", &["team/*"]);
    let team_reader = scoped_token(&s, "reader", &["team/*"]);
    let secret = |token: &str, body: Value| s.api_as(token, "POST", "/v1/secrets", Some(body));

    // Global secrets are the admin's; a scoped token manages only its own.
    assert_eq!(
        secret(
            &s.token,
            json!({"name": "root-pw", "value": "global-value-91"})
        )
        .status,
        201
    );
    assert_eq!(
        secret(
            &s.token,
            json!({"name": "ops-pw", "value": "ops-value-27", "scope": "secret/*"})
        )
        .status,
        201
    );
    for body in [
        json!({"name": "mine", "value": "v"}),
        json!({"name": "mine", "value": "v", "scope": "secret/*"}),
        json!({"name": "ops-pw", "value": "overwritten", "scope": "team/*"}),
    ] {
        let r = secret(&team, body.clone());
        assert_eq!(r.status, 403, "{body}: {r:?}");
    }
    assert_eq!(
        secret(
            &team,
            json!({"name": "team-pw", "value": "team-value-55", "scope": "team/*"})
        )
        .status,
        201
    );
    let listed = s.api_as(&team, "GET", "/v1/secrets", None).json();
    assert_eq!(
        listed,
        json!([{"name": "team-pw", "updated_at": listed[0]["updated_at"], "scope": "team/*"}])
    );

    // Values are sealed: not in the database files; the key is beside them.
    let state = s.state_dump();
    for value in ["global-value-91", "ops-value-27", "team-value-55"] {
        assert!(
            !contains(&state, value.as_bytes()),
            "{value} is in state.db"
        );
    }
    assert!(s.data().join("secrets.key").exists());

    // A scoped deployer cannot hand itself secrets that are not its own.
    let def = |family: &str, artifact: &str, secret: &str| json!({"family": family, "artifact": artifact, "secrets": {"PW": secret}});
    for (secret, status) in [("root-pw", 403), ("ops-pw", 403), ("team-pw", 201)] {
        let r = s.api_as(
            &team,
            "POST",
            "/v1/taskdefs",
            Some(def("team-echo", "team/echo:v1", secret)),
        );
        assert_eq!(r.status, status, "{secret}: {r:?}");
    }
    // Not even the admin may put a secret into another repository's tasks.
    let r = s.api(
        "POST",
        "/v1/taskdefs",
        Some(def("wrong", "secret/app:v1", "team-pw")),
    );
    assert_eq!(r.status, 403, "{r:?}");
    let r = s.api(
        "POST",
        "/v1/taskdefs",
        Some(def("ops", "secret/app:v1", "ops-pw")),
    );
    assert_eq!(r.status, 201, "{r:?}");

    // The other team's task definition, task and logs are invisible.
    let r = s.api("POST", "/v1/tasks", Some(json!({"task_definition": "ops"})));
    assert_eq!(r.status, 201);
    let ops_task = r.json()[0]["id"].as_str().unwrap().to_owned();
    let r = s.api(
        "GET",
        &format!("/v1/tasks/{ops_task}?wait_stopped_ms=20000"),
        None,
    );
    assert_eq!(r.json()["status"], "STOPPED");
    let families: Vec<String> = s
        .api_as(&team_reader, "GET", "/v1/taskdefs", None)
        .json()
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["family"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(families, ["team-echo"]);
    for path in [
        "/v1/taskdefs/ops".to_owned(),
        format!("/v1/tasks/{ops_task}"),
        format!("/v1/tasks/{ops_task}/logs"),
    ] {
        let r = s.api_as(&team_reader, "GET", &path, None);
        assert_eq!(r.status, 404, "{path}: {r:?}");
        assert!(!String::from_utf8_lossy(&r.body).contains("ops-value-27"));
    }
    let listed = s.api_as(&team_reader, "GET", "/v1/tasks", None).json();
    assert_eq!(listed, json!([]));
    for (method, path, body) in [
        ("POST", "/v1/tasks", Some(json!({"task_definition": "ops"}))),
        ("POST", &format!("/v1/tasks/{ops_task}/stop") as &str, None),
        (
            "POST",
            "/v1/services",
            Some(json!({"name": "steal", "task_definition": "ops", "desired_count": 1})),
        ),
    ] {
        let r = s.api_as(&team, method, path, body);
        assert!(r.status == 404 || r.status == 403, "{method} {path}: {r:?}");
    }

    // The team's own task gets its own secret.
    let r = s.api_as(
        &team,
        "POST",
        "/v1/tasks",
        Some(json!({"task_definition": "team-echo"})),
    );
    assert_eq!(r.status, 201, "{r:?}");
    let id = r.json()[0]["id"].as_str().unwrap().to_owned();
    let t = s
        .api_as(
            &team,
            "GET",
            &format!("/v1/tasks/{id}?wait_stopped_ms=20000"),
            None,
        )
        .json();
    assert_eq!(t["stop_code"], "Completed", "{t}");
    let logs = s
        .api_as(&team_reader, "GET", &format!("/v1/tasks/{id}/logs"), None)
        .json();
    let lines: Vec<&str> = logs["lines"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["text"].as_str().unwrap())
        .collect();
    assert!(lines.contains(&"PW=team-value-55"), "{lines:?}");
}

#[test]
fn secrets_stored_in_plain_text_by_an_older_server_are_sealed_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start_in(dir.path());
    assert_eq!(
        s.api(
            "POST",
            "/v1/secrets",
            Some(json!({"name": "old", "value": "plain-old-value-13"}))
        )
        .status,
        201
    );
    let state = s.state_url().map(str::to_owned);
    s.terminate();
    // What an older version wrote: the value as it is.
    if let Some(url) = state {
        wharf_testkit::postgres::shared()
            .sql(&url, "UPDATE secrets SET value = 'plain-old-value-13'");
        let s = Server::start_in(dir.path());
        assert!(!contains(&s.state_dump(), b"plain-old-value-13"));
        return;
    }
    let out = Command::new("python3")
        .arg("-c")
        .arg("import sqlite3,sys; c=sqlite3.connect(sys.argv[1]); c.execute(\"UPDATE secrets SET value='plain-old-value-13'\"); c.commit(); c.execute('VACUUM'); c.close()")
        .arg(dir.path().join("state.db"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let s = Server::start_in(dir.path());
    assert!(!contains(&s.state_dump(), b"plain-old-value-13"));
    s.push_sample("echo", wharf_testkit::Target::P1, "team/echo:v1");
    let r = s.api(
        "POST",
        "/v1/taskdefs",
        Some(json!({"family": "e", "artifact": "team/echo:v1", "secrets": {"V": "old"}})),
    );
    assert_eq!(r.status, 201, "{r:?}");
    let r = s.api("POST", "/v1/tasks", Some(json!({"task_definition": "e"})));
    let id = r.json()[0]["id"].as_str().unwrap().to_owned();
    s.api(
        "GET",
        &format!("/v1/tasks/{id}?wait_stopped_ms=20000"),
        None,
    );
    let logs = s.api("GET", &format!("/v1/tasks/{id}/logs"), None).json();
    assert!(logs.to_string().contains("V=plain-old-value-13"), "{logs}");
}

#[test]
fn a_guest_printing_empty_lines_forever_keeps_a_bounded_log() {
    let s = Server::start();
    let empty = s.state_size();
    s.push_sample("flood", wharf_testkit::Target::P1, "team/flood:v1");
    let r = s.api(
        "POST",
        "/v1/taskdefs",
        Some(json!({"family": "newlines", "artifact": "team/flood:v1", "args": ["8", "empty"]})),
    );
    assert_eq!(r.status, 201, "{r:?}");
    let r = s.api(
        "POST",
        "/v1/tasks",
        Some(json!({"task_definition": "newlines"})),
    );
    let id = r.json()[0]["id"].as_str().unwrap().to_owned();
    let t = s
        .api(
            "GET",
            &format!("/v1/tasks/{id}?wait_stopped_ms=60000"),
            None,
        )
        .json();
    assert_eq!(t["stop_code"], "Completed", "{t}");
    let page = s.api("GET", &format!("/v1/tasks/{id}/logs"), None).json();
    let kept = page["lines"].as_array().unwrap().len();
    // 8 MiB of newlines are 8 Mi lines; 64 KiB of retention at 64 bytes a
    // record keeps about a thousand.
    assert!(kept <= (64 << 10) / 64 + 1, "kept {kept} lines");
    assert!(
        page["next_seq"].as_u64().unwrap() >= 8 << 20,
        "{}",
        page["next_seq"]
    );
    let state = s.state_size().saturating_sub(empty);
    assert!(state < 8 << 20, "the state grew by {state} bytes");
}

#[test]
fn unauthenticated_calls_are_counted_not_audited_and_paths_are_cut() {
    let s = Server::start();
    let empty = s.state_size();
    let long = "x".repeat(16 << 10);
    for i in 0..100 {
        let path = if i % 2 == 0 {
            format!("/v1/tasks/{long}/stop")
        } else {
            format!("/v2/team/{long}/blobs/uploads/")
        };
        let token = if i % 4 < 2 { "" } else { "not-a-token" };
        let r = s.api_as(token, "POST", &path, None);
        assert_eq!(r.status, 401, "{r:?}");
    }
    let audit = s.api("GET", "/v1/audit?limit=1000", None).json();
    assert_eq!(audit, json!([]), "unauthenticated calls were audited");
    let metrics = String::from_utf8(s.api("GET", "/metrics", None).body).unwrap();
    assert!(
        metrics.contains("wharf_unauthenticated_requests_total 100"),
        "{}",
        metrics
            .lines()
            .filter(|l| l.contains("unauth"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    // An authenticated call with a long path is audited, its path cut.
    let r = s.api("POST", &format!("/v1/tasks/{long}/stop"), None);
    assert_eq!(r.status, 404);
    let audit = s.api("GET", "/v1/audit", None).json();
    let path = audit[0]["path"].as_str().unwrap();
    assert!(
        path.starts_with("/v1/tasks/xxx") && path.len() <= 520,
        "{}",
        path.len()
    );
    let state = s.state_size().saturating_sub(empty);
    assert!(state < 1 << 20, "the state grew by {state} bytes");
}

#[test]
fn a_task_seen_stopped_survives_a_kill_9_right_after() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start_in(dir.path());
    s.push_sample("flood", wharf_testkit::Target::P1, "team/flood:v1");
    let r = s.api(
        "POST",
        "/v1/taskdefs",
        Some(json!({"family": "chatty", "artifact": "team/flood:v1", "args": ["4"]})),
    );
    assert_eq!(r.status, 201, "{r:?}");
    let r = s.api(
        "POST",
        "/v1/tasks",
        Some(json!({"task_definition": "chatty", "count": 20})),
    );
    let ids: Vec<String> = r
        .json()
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["id"].as_str().unwrap().to_owned())
        .collect();
    // Poll without waiting: the first STOPPED seen must already be durable.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let seen = 'poll: loop {
        assert!(std::time::Instant::now() < deadline, "no task stopped");
        for id in &ids {
            let t = s.api("GET", &format!("/v1/tasks/{id}"), None).json();
            if t["status"] == "STOPPED" {
                break 'poll t;
            }
        }
    };
    s.kill9();
    let s = Server::start_in(dir.path());
    let id = seen["id"].as_str().unwrap();
    let after = s.api("GET", &format!("/v1/tasks/{id}"), None).json();
    assert_eq!(after["status"], "STOPPED");
    assert_eq!(after["stop_code"], seen["stop_code"], "{after}");
}

/// A valid core module of about `size` bytes: one custom section.
fn big_module(size: usize) -> Vec<u8> {
    let mut m = b"\0asm\x01\0\0\0".to_vec();
    let payload = size;
    let mut len = payload + 2; // name length byte + name
    m.push(0); // custom section
    loop {
        let byte = (len & 0x7f) as u8;
        len >>= 7;
        if len == 0 {
            m.push(byte);
            break;
        }
        m.push(byte | 0x80);
    }
    m.extend_from_slice(&[1, b'x']);
    m.resize(m.len() + payload, 0);
    m
}

/// The server's resident anonymous memory (its heap, stacks), in KiB:
/// not the page cache's file pages it maps.
fn rss_anon_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("RssAnon:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("RssAnon in /proc/PID/status")
}

#[test]
fn concurrent_manifest_pushes_scan_within_a_memory_bound() {
    const LAYER: usize = 96 << 20;
    let s = Server::start();
    let layer = big_module(LAYER);
    let layer_digest = sha256(&layer);
    assert_eq!(s.push_blob("team/big", &layer), layer_digest);
    let layer_size = layer.len();
    drop(layer);
    let config = s.push_blob("team/big", b"{}");
    let before = rss_anon_kib(s.pid());
    let done = std::sync::atomic::AtomicBool::new(false);
    // Six manifests (different annotations) naming the same 96 MiB layer,
    // pushed at once: each push scans the layer. Sampled meanwhile: the
    // peak of the server's heap and stacks.
    let (statuses, peak) = std::thread::scope(|scope| {
        let sampler = scope.spawn(|| {
            let mut peak = 0;
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                peak = peak.max(rss_anon_kib(s.pid()));
                std::thread::sleep(std::time::Duration::from_millis(2));
            }
            peak
        });
        let handles: Vec<_> = (0..6)
            .map(|i| {
                let (s, config, layer_digest) = (&s, &config, &layer_digest);
                scope.spawn(move || {
                    let manifest = json!({
                        "schemaVersion": 2,
                        "mediaType": "application/vnd.oci.image.manifest.v1+json",
                        "config": {"mediaType": "application/vnd.wasm.config.v0+json", "digest": config, "size": 2},
                        "layers": [{"mediaType": "application/wasm", "digest": layer_digest, "size": layer_size}],
                        "annotations": {"n": i.to_string()},
                    });
                    s.push_manifest("team/big", &format!("v{i}"), &manifest).status
                })
            })
            .collect();
        let statuses: Vec<u16> = handles.into_iter().map(|h| h.join().unwrap()).collect();
        done.store(true, std::sync::atomic::Ordering::Relaxed);
        (statuses, sampler.join().unwrap())
    });
    assert!(
        statuses.iter().all(|s| *s == 201 || *s == 400),
        "{statuses:?}"
    );
    let grew_mib = peak.saturating_sub(before) / 1024;
    // A scan maps the layer's file (the page cache holds it, not the
    // heap): read into memory, two at a time, they held about 2 x 96 MiB
    // of heap (six at once, 6 x 96).
    assert!(
        grew_mib < 48,
        "six concurrent scans raised the server's heap by {grew_mib} MiB"
    );
}

#[test]
fn every_task_acknowledged_under_load_survives_a_kill_9() {
    // Four clients submit runs back to back; the server is killed with
    // SIGKILL mid-stream. Every task that got its 201 must be in the
    // state after the restart: the writer acknowledges nothing before its
    // commit, whatever it lingers or batches.
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start_in(dir.path());
    s.push_sample("hello", wharf_testkit::Target::P1, "team/hello:v1");
    let r = s.api(
        "POST",
        "/v1/taskdefs",
        Some(json!({"family": "hello", "artifact": "team/hello:v1"})),
    );
    assert_eq!(r.status, 201, "{r:?}");
    let acked = std::sync::Mutex::new(Vec::<String>::new());
    let refused = std::sync::atomic::AtomicUsize::new(0);
    std::thread::scope(|scope| {
        for _ in 0..4 {
            scope.spawn(|| {
                for _ in 0..100_000 {
                    match s
                        .req("POST", "/v1/tasks")
                        .send_json(json!({"task_definition": "hello", "count": 3}))
                    {
                        Ok(r) => {
                            let tasks: Value = r.into_json().unwrap();
                            let mut acked = acked.lock().unwrap();
                            for t in tasks.as_array().unwrap() {
                                acked.push(t["id"].as_str().unwrap().to_owned());
                            }
                        }
                        // The server is gone: stop submitting.
                        Err(_) => {
                            refused.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            return;
                        }
                    }
                }
            });
        }
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while acked.lock().unwrap().len() < 600 {
            assert!(
                std::time::Instant::now() < deadline,
                "too few runs accepted"
            );
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        let killed = Command::new("kill")
            .args(["-9", &s.pid().to_string()])
            .status()
            .unwrap();
        assert!(killed.success());
    });
    assert_eq!(refused.into_inner(), 4, "every client saw the server go");
    s.kill9();
    let acked = acked.into_inner().unwrap();
    let s = Server::start_in(dir.path());
    let mut missing = Vec::new();
    for id in &acked {
        let r = s.api("GET", &format!("/v1/tasks/{id}"), None);
        if r.status != 200 {
            missing.push(id.clone());
        } else {
            let t = r.json();
            assert_eq!(t["status"], "STOPPED", "{t}");
            let code = t["stop_code"].as_str().unwrap();
            assert!(code == "Completed" || code == "NodeLost", "{t}");
        }
    }
    assert!(
        missing.is_empty(),
        "{} of {} acknowledged tasks are gone after the kill -9: {:?}",
        missing.len(),
        acked.len(),
        &missing[..missing.len().min(5)]
    );
}
