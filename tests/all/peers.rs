//! Real OCI clients against a real `wharf server`: skopeo (Debian) and the
//! oras Python SDK (PyPI). Both round-trip with identical digests.

use std::path::Path;
use std::process::Command;

use wharf_testkit::{Target, wasm};

use crate::server::{Server, call, require, sha256};

fn have(cmd: &str, arg: &str) -> bool {
    Command::new(cmd)
        .arg(arg)
        .output()
        .is_ok_and(|o| o.status.success())
}

fn run(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn run_bytes(cmd: &mut Command) -> Vec<u8> {
    let out = cmd.output().unwrap();
    assert!(out.status.success(), "{cmd:?}");
    out.stdout
}

fn write_blob(layout: &Path, bytes: &[u8]) -> (String, usize) {
    let digest = sha256(bytes);
    let hex = digest.trim_start_matches("sha256:");
    std::fs::write(layout.join("blobs/sha256").join(hex), bytes).unwrap();
    (digest, bytes.len())
}

/// An OCI image layout with one image (a real tar layer) tagged `v1`;
/// returns the manifest digest.
fn oci_layout(work: &Path) -> (std::path::PathBuf, String) {
    let layout = work.join("layout");
    std::fs::create_dir_all(layout.join("blobs/sha256")).unwrap();
    std::fs::write(
        layout.join("oci-layout"),
        r#"{"imageLayoutVersion":"1.0.0"}"#,
    )
    .unwrap();
    let content = work.join("content");
    std::fs::create_dir_all(&content).unwrap();
    std::fs::write(content.join("hello.txt"), "hello from a layer\n").unwrap();
    let tar = work.join("layer.tar.gz");
    run(Command::new("tar")
        .arg("-czf")
        .arg(&tar)
        .arg("-C")
        .arg(&content)
        .arg("hello.txt"));
    let gz = std::fs::read(&tar).unwrap();
    let diff_id = sha256(&run_bytes(Command::new("gzip").arg("-dc").arg(&tar)));
    let (layer, layer_size) = write_blob(&layout, &gz);
    let config = serde_json::json!({
        "architecture": "amd64", "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": [diff_id]},
    });
    let (config, config_size) = write_blob(&layout, &serde_json::to_vec(&config).unwrap());
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config, "size": config_size},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": layer, "size": layer_size}],
    });
    let (digest, size) = write_blob(&layout, &serde_json::to_vec(&manifest).unwrap());
    let index = serde_json::json!({
        "schemaVersion": 2,
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": digest, "size": size,
            "annotations": {"org.opencontainers.image.ref.name": "v1"},
        }],
    });
    std::fs::write(
        layout.join("index.json"),
        serde_json::to_vec(&index).unwrap(),
    )
    .unwrap();
    (layout, digest)
}

fn layout_digest(layout: &Path) -> String {
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(layout.join("index.json")).unwrap()).unwrap();
    index["manifests"][0]["digest"].as_str().unwrap().to_owned()
}

#[test]
fn skopeo_copies_into_between_and_out_of_wharf_with_identical_digests() {
    if !require("skopeo", have("skopeo", "--version")) {
        return;
    }
    let work = tempfile::tempdir().unwrap();
    let (layout, digest) = oci_layout(work.path());
    let (a, b) = (Server::start(), Server::start());
    let creds = |s: &Server| format!("wharf:{}", s.token);

    // OCI layout -> wharf A.
    run(Command::new("skopeo")
        .args([
            "copy",
            "--quiet",
            "--preserve-digests",
            "--dest-tls-verify=false",
            "--dest-creds",
            &creds(&a),
        ])
        .arg(format!("oci:{}:v1", layout.display()))
        .arg(format!("docker://{}/skopeo/app:v1", a.host())));
    let r = call(a.req("HEAD", "/v2/skopeo/app/manifests/v1").call());
    assert_eq!(r.header("docker-content-digest"), Some(digest.as_str()));

    // wharf A -> wharf B (registry to registry), and within A (mount).
    for (dest, repo) in [(&b, "copied/app"), (&a, "mounted/app")] {
        run(Command::new("skopeo")
            .args([
                "copy",
                "--quiet",
                "--preserve-digests",
                "--src-tls-verify=false",
                "--dest-tls-verify=false",
            ])
            .args(["--src-creds", &creds(&a), "--dest-creds", &creds(dest)])
            .arg(format!("docker://{}/skopeo/app:v1", a.host()))
            .arg(format!("docker://{}/{repo}:v1", dest.host())));
        let r = call(dest.req("HEAD", &format!("/v2/{repo}/manifests/v1")).call());
        assert_eq!(
            r.header("docker-content-digest"),
            Some(digest.as_str()),
            "{repo}"
        );
    }

    // wharf B -> OCI layout.
    let out = work.path().join("out");
    run(Command::new("skopeo")
        .args([
            "copy",
            "--quiet",
            "--preserve-digests",
            "--src-tls-verify=false",
            "--src-creds",
            &creds(&b),
        ])
        .arg(format!("docker://{}/copied/app:v1", b.host()))
        .arg(format!("oci:{}:v1", out.display())));
    assert_eq!(layout_digest(&out), digest);
    let raw = run(Command::new("skopeo")
        .args([
            "inspect",
            "--raw",
            "--tls-verify=false",
            "--creds",
            &creds(&b),
        ])
        .arg(format!("docker://{}/copied/app:v1", b.host())));
    assert_eq!(sha256(raw.as_bytes()), digest);
    let tags = run(Command::new("skopeo")
        .args(["list-tags", "--tls-verify=false", "--creds", &creds(&b)])
        .arg(format!("docker://{}/copied/app", b.host())));
    assert!(tags.contains("\"v1\""), "{tags}");

    // Without credentials skopeo is refused.
    let refused = Command::new("skopeo")
        .args(["inspect", "--raw", "--tls-verify=false"])
        .arg(format!("docker://{}/copied/app:v1", b.host()))
        .output()
        .unwrap();
    assert!(!refused.status.success());
}

#[test]
fn oras_pushes_and_pulls_a_wasm_artifact() {
    let python_has_oras = Command::new("python3")
        .args(["-c", "import oras.client"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !require("oras (pip install oras)", python_has_oras) {
        return;
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/peers/oras_roundtrip.py");
    let file = wasm("hello", Target::P2);
    let original = std::fs::read(&file).unwrap();
    for chunked in ["0", "1"] {
        let s = Server::start();
        let work = tempfile::tempdir().unwrap();
        let out = run(Command::new("python3")
            .arg(&script)
            .arg(s.host())
            .arg(&s.token)
            .arg(&file)
            .arg(work.path())
            .arg(chunked));
        let result: serde_json::Value = serde_json::from_str(out.lines().last().unwrap()).unwrap();
        let pulled = result["files"][0].as_str().unwrap();
        assert_eq!(
            std::fs::read(pulled).unwrap(),
            original,
            "chunked={chunked}"
        );
        let r = call(s.req("GET", "/v2/oras/hello/manifests/v1").call());
        assert_eq!(
            r.header("docker-content-digest"),
            result["digest"].as_str(),
            "chunked={chunked}"
        );
        let manifest = r.json();
        assert_eq!(
            manifest["config"]["mediaType"],
            "application/vnd.wasm.config.v0+json"
        );
        assert_eq!(manifest["layers"][0]["mediaType"], "application/wasm");
        assert_eq!(manifest["layers"][0]["digest"], sha256(&original).as_str());
    }
}

/// Schemathesis (PyPI) fuzzes every operation of `/v1/openapi.json`
/// against a live server: no 5xx, and every answer's status, content type
/// and body match the document.
#[test]
fn schemathesis_finds_no_server_errors_or_schema_mismatches() {
    let has_st = Command::new("python3")
        .args(["-m", "schemathesis.cli", "--version"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !require("schemathesis (pip install schemathesis)", has_st) {
        return;
    }
    let s = Server::start();
    // Some data to find: a sample, a task definition, a task, a service.
    s.push_sample("hello", wharf_testkit::Target::P1, "team/hello:v1");
    let r = s.api(
        "POST",
        "/v1/taskdefs",
        Some(serde_json::json!({"family": "hello", "artifact": "team/hello:v1"})),
    );
    assert_eq!(r.status, 201);
    let r = s.api(
        "POST",
        "/v1/tasks",
        Some(serde_json::json!({"task_definition": "hello"})),
    );
    assert_eq!(r.status, 201);
    let r = s.api(
        "POST",
        "/v1/services",
        Some(serde_json::json!({"name": "web", "task_definition": "hello", "desired_count": 0})),
    );
    assert_eq!(r.status, 201);
    let dir = tempfile::tempdir().unwrap();
    let doc = dir.path().join("openapi.json");
    let r = s.api("GET", "/v1/openapi.json", None);
    assert_eq!(r.status, 200);
    std::fs::write(&doc, &r.body).unwrap();
    let text = run(Command::new("python3")
        .args(["-m", "schemathesis.cli", "run"])
        .arg(&doc)
        .args(["--url", &s.base])
        .args(["-H", &format!("Authorization: Bearer {}", s.token)])
        .args([
            "--checks",
            "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance",
            "--max-examples",
            "25",
            "--seed",
            "1",
        ])
        .env("NO_COLOR", "1")
        .current_dir(dir.path()));
    // `run` asserts the exit status; the summary names what was tested.
    assert!(text.contains("passed"), "{text}");
    assert!(!text.contains("failed"), "{text}");
}
