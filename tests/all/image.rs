//! `wharf push`, `wharf pull` and `wharf image inspect` against a real
//! server, and the registry's Wasm validation and scan on push.

use std::process::Command;

use wharf_testkit::{Target, wasm};

use crate::server::{Server, call, sha256};

fn wharf(server: &Server, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_wharf"))
        .args(args)
        .env("WHARF_TOKEN", &server.token)
        .env("WHARF_SERVER", &server.base)
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
fn push_pull_and_inspect_round_trip_with_identical_digests() {
    let s = Server::start();
    let work = tempfile::tempdir().unwrap();
    for (target, os, world, kind) in [
        (Target::P1, "wasip1", "wasip1 command", "module"),
        (Target::P2, "wasip2", "wasi:cli/command", "component"),
    ] {
        let file = wasm("hello", target);
        let original = std::fs::read(&file).unwrap();
        let reference = format!("{}/team/hello-{os}:v1", s.host());
        let (code, stdout, stderr) = wharf(&s, &["push", file.to_str().unwrap(), &reference]);
        assert_eq!(code, 0, "{stderr}");
        assert!(stdout.contains(world), "{stdout}");

        let out = work.path().join(format!("{os}.wasm"));
        let (code, stdout, stderr) = wharf(&s, &["pull", &reference, "-o", out.to_str().unwrap()]);
        assert_eq!(code, 0, "{stderr}");
        assert_eq!(std::fs::read(&out).unwrap(), original);
        assert!(stdout.contains(&sha256(&original)), "{stdout}");

        let (code, stdout, stderr) =
            wharf(&s, &["image", "inspect", &reference, "--output", "json"]);
        assert_eq!(code, 0, "{stderr}");
        let inspected: serde_json::Value = serde_json::from_str(&stdout).unwrap();
        assert_eq!(inspected["scan"]["kind"], kind);
        assert_eq!(inspected["scan"]["world"], world);
        assert_eq!(inspected["config"]["architecture"], "wasm");
        assert_eq!(inspected["config"]["os"], os);
        assert_eq!(
            inspected["config"]["layerDigests"][0],
            sha256(&original).as_str()
        );
        assert_eq!(inspected["layers"][0]["mediaType"], "application/wasm");
        let imports = inspected["scan"]["imports"].as_array().unwrap();
        assert!(
            imports.iter().any(|i| i.as_str().unwrap().contains("wasi")),
            "{imports:?}"
        );
        // The manifest the registry serves has the digest inspect reports.
        let r = call(
            s.req("HEAD", &format!("/v2/team/hello-{os}/manifests/v1"))
                .call(),
        );
        assert_eq!(
            r.header("docker-content-digest"),
            inspected["digest"].as_str()
        );
    }
}

#[test]
fn push_refuses_files_that_are_not_wasm() {
    let s = Server::start();
    let work = tempfile::tempdir().unwrap();
    let junk = work.path().join("junk.wasm");
    std::fs::write(&junk, b"definitely not wasm").unwrap();
    let (code, _, stderr) = wharf(
        &s,
        &[
            "push",
            junk.to_str().unwrap(),
            &format!("{}/team/junk:v1", s.host()),
        ],
    );
    assert_ne!(code, 0);
    assert!(stderr.contains("not a WebAssembly"), "{stderr}");
    let (code, _, stderr) = wharf(&s, &["push", junk.to_str().unwrap(), "not a reference"]);
    assert_ne!(code, 0);
    assert!(stderr.contains("invalid reference"), "{stderr}");
}

/// Pushes a manifest whose one layer has `layer_type` and `bytes`.
fn push_artifact(
    s: &Server,
    repo: &str,
    layer_type: &str,
    bytes: &[u8],
) -> crate::server::Response {
    let config = s.push_blob(repo, b"{}");
    let layer = s.push_blob(repo, bytes);
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.wasm.config.v0+json", "digest": config, "size": 2},
        "layers": [{"mediaType": layer_type, "digest": layer, "size": bytes.len()}],
    });
    s.push_manifest(repo, "v1", &manifest)
}

#[test]
fn registry_refuses_invalid_wasm_layers_and_accepts_spin_and_runwasi_types_on_pull() {
    let s = Server::start();
    let r = push_artifact(
        &s,
        "bad/wasm",
        "application/wasm",
        b"\0asm\x01\0\0\0\x05garbage",
    );
    assert_eq!(
        (r.status, r.error_code().as_str()),
        (400, "MANIFEST_INVALID"),
        "{r:?}"
    );
    assert!(
        r.json()["errors"][0]["message"]
            .as_str()
            .unwrap()
            .contains("not valid")
    );
    assert_eq!(
        call(s.req("GET", "/v2/bad/wasm/manifests/v1").call()).status,
        404
    );

    let work = tempfile::tempdir().unwrap();
    let original = std::fs::read(wasm("hello", Target::P2)).unwrap();
    for (repo, layer_type) in [
        ("spin/app", "application/vnd.wasm.content.layer.v1+wasm"),
        (
            "runwasi/app",
            "application/vnd.bytecodealliance.wasm.component.layer.v0+wasm",
        ),
    ] {
        assert_eq!(push_artifact(&s, repo, layer_type, &original).status, 201);
        let out = work.path().join("out.wasm");
        let (code, _, stderr) = wharf(
            &s,
            &[
                "pull",
                &format!("{}/{repo}:v1", s.host()),
                "-o",
                out.to_str().unwrap(),
            ],
        );
        assert_eq!(code, 0, "{stderr}");
        assert_eq!(std::fs::read(&out).unwrap(), original);
    }

    // Not a Wasm artifact: a clear refusal, and no file written.
    let config = s.push_blob("plain/image", b"{}");
    let layer = s.push_blob("plain/image", b"tar");
    let manifest = crate::server::image_manifest((&config, 2), &[(&layer, 3)]);
    assert_eq!(s.push_manifest("plain/image", "v1", &manifest).status, 201);
    // A Wasm config without a Wasm layer is not a valid artifact.
    let r = push_artifact(
        &s,
        "half/artifact",
        "application/vnd.oci.image.layer.v1.tar",
        b"tar",
    );
    assert_eq!(r.error_code(), "MANIFEST_INVALID");
    let out = work.path().join("never.wasm");
    let (code, _, stderr) = wharf(
        &s,
        &[
            "pull",
            &format!("{}/plain/image:v1", s.host()),
            "-o",
            out.to_str().unwrap(),
        ],
    );
    assert_ne!(code, 0);
    assert!(stderr.contains("not a Wasm artifact"), "{stderr}");
    assert!(!out.exists());
}

#[test]
fn wharf_run_takes_a_reference_pulls_it_once_and_runs_it_from_the_cache_by_digest() {
    let s = Server::start();
    s.push_sample("echo", Target::P1, "team/echo:v1");
    let data = tempfile::tempdir().unwrap();
    let run = |reference: &str| {
        Command::new(env!("CARGO_BIN_EXE_wharf"))
            .args(["run", "--data-dir"])
            .arg(data.path())
            .arg(reference)
            .args(["--", "from-a-registry"])
            .env("WHARF_TOKEN", &s.token)
            .env("WHARF_SERVER", &s.base)
            .env_remove("WHARF_DATA_DIR")
            .output()
            .unwrap()
    };
    let out = run(&format!("{}/team/echo:v1", s.host()));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("from-a-registry"), "{stdout}");
    let pulled: Vec<_> = std::fs::read_dir(data.path().join("cache/pulled"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(pulled.len(), 1, "{pulled:?}");
    let digest = pulled[0].trim_end_matches(".wasm").replacen('-', ":", 1);
    assert!(digest.starts_with("sha256:"), "{digest}");

    // With the registry gone, the same artifact by digest runs from the
    // cache; a tag cannot be resolved and says so.
    let reference = format!("{}/team/echo@{digest}", s.host());
    let tag = format!("{}/team/echo:v1", s.host());
    drop(s);
    let out = Command::new(env!("CARGO_BIN_EXE_wharf"))
        .args(["run", "--data-dir"])
        .arg(data.path())
        .arg(&reference)
        .env_remove("WHARF_DATA_DIR")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = Command::new(env!("CARGO_BIN_EXE_wharf"))
        .args(["run", "--data-dir"])
        .arg(data.path())
        .arg(&tag)
        .env_remove("WHARF_DATA_DIR")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("failed to resolve"), "{stderr}");
}
