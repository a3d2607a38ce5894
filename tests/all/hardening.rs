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
