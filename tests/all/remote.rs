//! Task definitions that name other registries, aimed at internal
//! services and hostile registries: refused before any request, bounded,
//! stoppable, never echoing; and the CLI never handing the Wharf token to
//! another registry.

use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::json;
use sha2::{Digest as _, Sha256};
use wharf_testkit::Target;

use crate::fake::{Answer, Fake, Seen, ok};
use crate::server::Server;

fn sha256(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

/// A Wasm artifact manifest whose layer is `layer` (`size` as declared).
fn manifest(layer: &str, size: u64) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.wasm.config.v0+json",
            "digest": sha256(b"{}"),
            "size": 2
        },
        "layers": [{"mediaType": "application/wasm", "digest": layer, "size": size}]
    }))
    .unwrap()
}

/// A fake registry on `ip` serving `manifest_bytes` for every manifest
/// and answering blobs with `blob`.
fn registry(
    ip: &str,
    manifest_bytes: Vec<u8>,
    blob: impl Fn(&Seen) -> Answer + Send + Sync + 'static,
) -> Fake {
    Fake::start(ip, move |req| {
        if req.path.contains("/manifests/") {
            ok(
                "application/vnd.oci.image.manifest.v1+json",
                &manifest_bytes,
            )
        } else if req.path.contains("/blobs/") {
            blob(req)
        } else {
            Answer::Full(404, vec![], b"SECRET-INTERNAL-BODY".to_vec())
        }
    })
}

fn register(s: &Server, family: &str, artifact: &str) -> crate::server::Response {
    s.api(
        "POST",
        "/v1/taskdefs",
        Some(json!({"family": family, "artifact": artifact, "limits": {"timeout": "30s"}})),
    )
}

fn run(s: &Server, family: &str) -> String {
    let r = s.api(
        "POST",
        "/v1/tasks",
        Some(json!({"task_definition": family})),
    );
    assert_eq!(r.status, 201, "{r:?}");
    r.json()[0]["id"].as_str().unwrap().to_owned()
}

#[test]
fn internal_destinations_are_refused_before_any_request() {
    let internal = Fake::start("127.0.0.1", |_| {
        Answer::Full(200, vec![], b"SECRET-INTERNAL-BODY".to_vec())
    });
    let s = Server::start();
    let port = internal.addr.rsplit(':').next().unwrap();
    for artifact in [
        format!("{}/probe/x:1", internal.addr),
        format!("localhost:{port}/probe/x:1"),
        "169.254.169.254/latest/meta-data:1".to_owned(),
        "10.0.0.1:5000/team/x:1".to_owned(),
    ] {
        let r = register(&s, "probe", &artifact);
        assert_eq!(r.status, 422, "{artifact}: {r:?}");
        let message = r.json()["message"].as_str().unwrap().to_owned();
        assert!(
            message.contains("internal address"),
            "{artifact}: {message}"
        );
    }
    assert!(
        internal.seen().is_empty(),
        "the server reached the internal service: {:?}",
        internal.seen()
    );
}

#[test]
fn an_allowed_registry_serves_a_task_but_its_redirects_and_realms_are_rechecked() {
    let hello = std::fs::read(wharf_testkit::wasm("hello", Target::P1)).unwrap();
    let layer = sha256(&hello);
    // The internal service a hostile registry points at.
    let internal = Fake::start("127.0.0.1", |_| {
        Answer::Full(200, vec![], b"SECRET-INTERNAL-BODY".to_vec())
    });
    let good = registry("127.0.0.2", manifest(&layer, hello.len() as u64), {
        let hello = hello.clone();
        move |_| ok("application/octet-stream", &hello)
    });
    let target = format!("http://{}/secret", internal.addr);
    // Another layer, so the compiled cache of the first cannot answer.
    let other_layer = sha256(b"another layer");
    let redirecting = registry("127.0.0.2", manifest(&other_layer, 13), {
        move |_| Answer::Full(307, vec![("Location".into(), target.clone())], vec![])
    });
    let realm = format!("http://{}/token", internal.addr);
    let challenging = Fake::start("127.0.0.2", move |_| {
        Answer::Full(
            401,
            vec![(
                "WWW-Authenticate".into(),
                format!("Bearer realm=\"{realm}\",service=\"x\""),
            )],
            b"SECRET-INTERNAL-BODY".to_vec(),
        )
    });
    let data = tempfile::tempdir().unwrap();
    let s = Server::start_with(
        &data.path().join("data"),
        &["--allow-registry-network", "127.0.0.2/32"],
    );

    // The allow-listed registry works end to end.
    let r = register(&s, "good", &format!("{}/team/hello:v1", good.addr));
    assert_eq!(r.status, 201, "{r:?}");
    let t = s.wait_stopped(&run(&s, "good"));
    assert_eq!(t["stop_code"], "Completed", "{t}");

    // Its redirect to a loopback address outside the list is not followed.
    let r = register(
        &s,
        "redirected",
        &format!("{}/team/hello:v1", redirecting.addr),
    );
    assert_eq!(r.status, 201, "{r:?}");
    let t = s.wait_stopped(&run(&s, "redirected"));
    assert_eq!(t["stop_code"], "FailedToStart", "{t}");
    assert!(
        t["message"].as_str().unwrap().contains("internal address"),
        "{t}"
    );

    // A token realm on an internal address is not asked.
    let r = register(&s, "realm", &format!("{}/team/hello:v1", challenging.addr));
    assert_eq!(r.status, 422, "{r:?}");
    let text = r.json().to_string();
    assert!(text.contains("internal address"), "{text}");
    assert!(
        !text.contains("SECRET"),
        "the upstream body was echoed: {text}"
    );

    assert!(
        internal.seen().is_empty(),
        "the internal service was reached: {:?}",
        internal.seen()
    );

    // An error answer is reported by status, never by its body.
    let notfound = Fake::start("127.0.0.2", |_| {
        Answer::Full(404, vec![], b"SECRET-INTERNAL-BODY".to_vec())
    });
    let r = register(&s, "missing", &format!("{}/team/hello:v1", notfound.addr));
    assert_eq!(r.status, 422, "{r:?}");
    let text = r.json().to_string();
    assert!(text.contains("HTTP 404"), "{text}");
    assert!(
        !text.contains("SECRET"),
        "the upstream body was echoed: {text}"
    );
}

#[test]
fn a_remote_layer_above_the_cap_is_refused_without_downloading_it() {
    let claimed: u64 = 300 << 20;
    let layer = sha256(b"never sent");
    // The manifest understates the size; the blob's answer claims 300 MiB.
    let big = registry("127.0.0.2", manifest(&layer, 1024), move |_| {
        Answer::Claim {
            len: claimed,
            sent: claimed,
        }
    });
    // This one declares the size honestly in the manifest.
    let honest = registry("127.0.0.2", manifest(&layer, claimed), move |_| {
        Answer::Claim {
            len: claimed,
            sent: claimed,
        }
    });
    let data = tempfile::tempdir().unwrap();
    let s = Server::start_with(
        &data.path().join("data"),
        &["--allow-registry-network", "127.0.0.2"],
    );
    for (family, fake) in [("big", &big), ("honest", &honest)] {
        let r = register(&s, family, &format!("{}/team/big:v1", fake.addr));
        assert_eq!(r.status, 201, "{r:?}");
        let t = s.wait_stopped(&run(&s, family));
        assert_eq!(t["stop_code"], "FailedToStart", "{t}");
        assert!(t["message"].as_str().unwrap().contains("limit"), "{t}");
        let written = *fake.written.lock().unwrap();
        assert!(
            written < 64 << 20,
            "{family}: {written} bytes were downloaded before the refusal"
        );
    }
    // The honest one is refused before its blob is even asked for.
    assert!(
        !honest.seen().iter().any(|r| r.path.contains("/blobs/")),
        "{:?}",
        honest.seen()
    );
}

#[test]
fn a_task_whose_registry_never_answers_stops_when_asked() {
    let layer = sha256(b"never sent");
    let silent = registry("127.0.0.2", manifest(&layer, 1024), |_| Answer::Silence);
    let data = tempfile::tempdir().unwrap();
    let s = Server::start_with(
        &data.path().join("data"),
        &["--allow-registry-network", "127.0.0.2"],
    );
    let r = register(&s, "silent", &format!("{}/team/x:v1", silent.addr));
    assert_eq!(r.status, 201, "{r:?}");
    let id = run(&s, "silent");
    let deadline = Instant::now() + Duration::from_secs(20);
    while !silent.seen().iter().any(|r| r.path.contains("/blobs/")) {
        assert!(Instant::now() < deadline, "the blob was never asked for");
        std::thread::sleep(Duration::from_millis(20));
    }
    let t = s.api("GET", &format!("/v1/tasks/{id}"), None).json();
    assert_eq!(t["status"], "PROVISIONING", "{t}");
    let asked = Instant::now();
    let r = s.api("POST", &format!("/v1/tasks/{id}/stop"), None);
    assert_eq!(r.status, 200, "{r:?}");
    let t = s.wait_stopped(&id);
    assert_eq!(t["stop_code"], "UserStopped", "{t}");
    assert!(
        asked.elapsed() < Duration::from_secs(5),
        "the stop took {:?}",
        asked.elapsed()
    );
}

fn pull(reference: &str, env: &[(&str, &str)], extra: &[&str]) -> std::process::Output {
    let out_dir = tempfile::tempdir().unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_wharf"));
    cmd.arg("pull")
        .arg(reference)
        .arg("-o")
        .arg(out_dir.path().join("x.wasm"))
        .args(extra)
        .env_remove("WHARF_DATA_DIR")
        .env_remove("WHARF_REGISTRY_AUTH")
        .env("DOCKER_CONFIG", out_dir.path().join("no-docker"));
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().unwrap()
}

fn authorizations(fake: &Fake) -> Vec<String> {
    fake.seen()
        .iter()
        .filter_map(|r| r.header("authorization").map(str::to_owned))
        .collect()
}

#[test]
fn the_cli_offers_the_wharf_token_only_to_the_wharf_server() {
    use base64::Engine as _;
    let basic = |u: &str, p: &str| {
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(format!("{u}:{p}"))
        )
    };
    // A registry that asks for Basic credentials, as most private ones do.
    let other = Fake::start("127.0.0.2", |req| {
        if req.path == "/v2/" {
            Answer::Full(
                401,
                vec![("WWW-Authenticate".into(), "Basic realm=\"other\"".into())],
                vec![],
            )
        } else {
            Answer::Full(404, vec![], vec![])
        }
    });
    let reference = format!("{}/team/x:v1", other.addr);
    let token = "wharf-token-that-must-not-leave-0123456789abcdef";

    // WHARF_TOKEN and the local server's address elsewhere: no credentials.
    let out = pull(
        &reference,
        &[
            ("WHARF_TOKEN", token),
            ("WHARF_SERVER", "http://127.0.0.1:7070"),
        ],
        &[],
    );
    assert!(!out.status.success());
    assert!(!other.seen().is_empty(), "the registry was never asked");
    let seen = authorizations(&other);
    assert!(
        seen.iter()
            .all(|a| !a.contains(&basic("wharf", token)[6..])),
        "the Wharf token went to another registry: {seen:?}"
    );

    // --username/--password are for it.
    let out = pull(
        &reference,
        &[("WHARF_TOKEN", token)],
        &["--username", "alice", "--password", "pw1"],
    );
    assert!(!out.status.success());
    assert!(authorizations(&other).contains(&basic("alice", "pw1")));

    // So is its WHARF_REGISTRY_AUTH entry, and its docker config entry.
    let entry = format!("{}=bob:pw2", other.addr);
    pull(&reference, &[("WHARF_REGISTRY_AUTH", &entry)], &[]);
    assert!(authorizations(&other).contains(&basic("bob", "pw2")));
    let docker = tempfile::tempdir().unwrap();
    std::fs::write(
        docker.path().join("config.json"),
        json!({"auths": {other.addr.clone(): {"auth": base64::engine::general_purpose::STANDARD.encode("carol:pw3")}}}).to_string(),
    )
    .unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_wharf"));
    let out_dir = tempfile::tempdir().unwrap();
    cmd.args(["pull", &reference, "-o"])
        .arg(out_dir.path().join("x.wasm"))
        .env("DOCKER_CONFIG", docker.path())
        .env_remove("WHARF_REGISTRY_AUTH")
        .env_remove("WHARF_TOKEN");
    cmd.output().unwrap();
    assert!(authorizations(&other).contains(&basic("carol", "pw3")));

    // The Wharf server itself gets the token.
    let s = Server::start();
    s.push_sample("hello", Target::P1, "team/hello:v1");
    let out = pull(
        &format!("{}/team/hello:v1", s.host()),
        &[("WHARF_TOKEN", &s.token), ("WHARF_SERVER", &s.base)],
        &[],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
