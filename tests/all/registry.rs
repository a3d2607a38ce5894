//! The OCI Distribution endpoints of a real `wharf server`, over HTTP.

use crate::server::{Server, call, image_manifest, sha256};

const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";

#[test]
fn base_requires_a_token_and_challenges() {
    let s = Server::start();
    let r = call(ureq::get(&format!("{}/v2/", s.base)).call());
    assert_eq!(r.status, 401);
    assert!(
        r.header("www-authenticate")
            .unwrap()
            .starts_with("Basic realm="),
        "{r:?}"
    );
    assert_eq!(r.error_code(), "UNAUTHORIZED");
    let r = call(
        ureq::get(&format!("{}/v2/", s.base))
            .set("Authorization", "Bearer wrong")
            .call(),
    );
    assert_eq!(r.status, 401);
    // Basic with any user name and the token as password.
    let basic = {
        use std::io::Write;
        let mut enc = Vec::new();
        write!(enc, "anyone:{}", s.token).unwrap();
        base64_encode(&enc)
    };
    let r = call(
        ureq::get(&format!("{}/v2/", s.base))
            .set("Authorization", &format!("Basic {basic}"))
            .call(),
    );
    assert_eq!(r.status, 200);
    assert_eq!(
        r.header("docker-distribution-api-version"),
        Some("registry/2.0")
    );
    // Every route is protected, not just the base.
    let r = call(ureq::get(&format!("{}/v2/_catalog", s.base)).call());
    assert_eq!(r.status, 401);
    let r = call(ureq::get(&format!("{}/healthz", s.base)).call());
    assert_eq!(r.status, 200);
    // The admin token is readable by its owner only.
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(s.data().join("admin.token"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
}

fn base64_encode(bytes: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (b[0] as u32) << 16 | (b[1] as u32) << 8 | b[2] as u32;
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(A[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[test]
fn monolithic_push_post_then_put_and_pull_with_ranges() {
    let s = Server::start();
    let blob = b"the quick brown fox".to_vec();
    let digest = sha256(&blob);
    let r = call(s.req("POST", "/v2/team/app/blobs/uploads/").call());
    assert_eq!(r.status, 202);
    let location = r.header("location").unwrap().to_owned();
    assert!(r.header("docker-upload-uuid").is_some());
    let r = call(
        s.req("PUT", &format!("{location}?digest={digest}"))
            .send_bytes(&blob),
    );
    assert_eq!(r.status, 201, "{r:?}");
    assert_eq!(
        r.header("location"),
        Some(format!("/v2/team/app/blobs/{digest}").as_str())
    );
    assert_eq!(r.header("docker-content-digest"), Some(digest.as_str()));

    let r = call(s.req("GET", &format!("/v2/team/app/blobs/{digest}")).call());
    assert_eq!((r.status, r.body.as_slice()), (200, blob.as_slice()));
    let r = call(
        s.req("HEAD", &format!("/v2/team/app/blobs/{digest}"))
            .call(),
    );
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-length"), Some("19"));
    assert_eq!(r.header("docker-content-digest"), Some(digest.as_str()));
    let r = call(
        s.req("GET", &format!("/v2/team/app/blobs/{digest}"))
            .set("Range", "bytes=4-8")
            .call(),
    );
    assert_eq!((r.status, r.body.as_slice()), (206, b"quick".as_slice()));
    assert_eq!(r.header("content-range"), Some("bytes 4-8/19"));
    let r = call(
        s.req("GET", &format!("/v2/team/app/blobs/{digest}"))
            .set("Range", "bytes=100-")
            .call(),
    );
    assert_eq!(r.status, 416);
    assert_eq!(r.header("content-range"), Some("bytes */19"));

    // Blobs are per repository: not visible from another one until mounted.
    let r = call(s.req("GET", &format!("/v2/other/blobs/{digest}")).call());
    assert_eq!((r.status, r.error_code().as_str()), (404, "BLOB_UNKNOWN"));
}

#[test]
fn single_post_push_and_digest_mismatch_stores_nothing() {
    let s = Server::start();
    let digest = s.push_blob("app", b"one shot");
    assert_eq!(
        call(s.req("HEAD", &format!("/v2/app/blobs/{digest}")).call()).status,
        200
    );

    let wrong = sha256(b"something else");
    let r = call(
        s.req("POST", &format!("/v2/app/blobs/uploads/?digest={wrong}"))
            .send_bytes(b"not that"),
    );
    assert_eq!((r.status, r.error_code().as_str()), (400, "DIGEST_INVALID"));
    assert_eq!(
        call(s.req("HEAD", &format!("/v2/app/blobs/{wrong}")).call()).status,
        404
    );
    assert_eq!(
        call(
            s.req("HEAD", &format!("/v2/app/blobs/{}", sha256(b"not that")))
                .call()
        )
        .status,
        404
    );
    let blobs = s.data().join("registry/blobs/sha256");
    assert_eq!(
        std::fs::read_dir(blobs).unwrap().count(),
        1,
        "only the good blob is stored"
    );
    // No session object either (a push in one request never makes one).
    assert_eq!(
        std::fs::read_dir(s.data().join("registry/uploads")).map_or(0, |d| d.count()),
        0
    );

    let r = call(
        s.req("POST", "/v2/app/blobs/uploads/?digest=sha256:nothex")
            .send_bytes(b"x"),
    );
    assert_eq!((r.status, r.error_code().as_str()), (400, "DIGEST_INVALID"));
}

#[test]
fn sha512_digests_are_verified() {
    use sha2::Digest as _;
    let s = Server::start();
    let blob = b"sha512 content";
    let digest = format!("sha512:{}", hex::encode(sha2::Sha512::digest(blob)));
    let r = call(
        s.req("POST", &format!("/v2/app/blobs/uploads/?digest={digest}"))
            .send_bytes(blob),
    );
    assert_eq!(r.status, 201, "{r:?}");
    let r = call(s.req("GET", &format!("/v2/app/blobs/{digest}")).call());
    assert_eq!(r.body, blob);
}

#[test]
fn chunked_push_in_order_status_out_of_order_and_cancel() {
    let s = Server::start();
    let r = call(s.req("POST", "/v2/a/b/c/blobs/uploads/").call());
    let location = r.header("location").unwrap().to_owned();
    let r = call(
        s.req("PATCH", &location)
            .set("Content-Range", "0-4")
            .send_bytes(b"hello"),
    );
    assert_eq!(r.status, 202, "{r:?}");
    assert_eq!(r.header("range"), Some("0-4"));
    let r = call(s.req("GET", &location).call());
    assert_eq!((r.status, r.header("range")), (204, Some("0-4")));
    // A chunk that does not start where the upload ends.
    let r = call(
        s.req("PATCH", &location)
            .set("Content-Range", "3-7")
            .send_bytes(b"xxxxx"),
    );
    assert_eq!(
        (r.status, r.error_code().as_str()),
        (416, "BLOB_UPLOAD_INVALID")
    );
    let r = call(
        s.req("PATCH", &location)
            .set("Content-Range", "5-10")
            .send_bytes(b" world"),
    );
    assert_eq!((r.status, r.header("range")), (202, Some("0-10")));
    // Chunks without Content-Range are streamed appends.
    let r = call(s.req("PATCH", &location).send_bytes(b"!"));
    assert_eq!(r.header("range"), Some("0-11"));
    let digest = sha256(b"hello world!");
    let r = call(
        s.req("PUT", &format!("{location}?digest={digest}"))
            .send_bytes(b""),
    );
    assert_eq!(r.status, 201, "{r:?}");
    assert_eq!(
        call(s.req("GET", &format!("/v2/a/b/c/blobs/{digest}")).call()).body,
        b"hello world!"
    );

    let r = call(s.req("POST", "/v2/a/b/c/blobs/uploads/").call());
    let location = r.header("location").unwrap().to_owned();
    call(s.req("PATCH", &location).send_bytes(b"abandoned"));
    assert_eq!(call(s.req("DELETE", &location).call()).status, 204);
    let r = call(s.req("GET", &location).call());
    assert_eq!(
        (r.status, r.error_code().as_str()),
        (404, "BLOB_UPLOAD_UNKNOWN")
    );
    // An upload belongs to its repository.
    let r = call(s.req("POST", "/v2/a/b/c/blobs/uploads/").call());
    let id = r.header("docker-upload-uuid").unwrap().to_owned();
    let r = call(
        s.req("PATCH", &format!("/v2/elsewhere/blobs/uploads/{id}"))
            .send_bytes(b"x"),
    );
    assert_eq!(
        (r.status, r.error_code().as_str()),
        (404, "BLOB_UPLOAD_UNKNOWN")
    );
}

#[test]
fn cross_repository_mount() {
    let s = Server::start();
    let digest = s.push_blob("source/repo", b"shared layer");
    let r = call(
        s.req(
            "POST",
            &format!("/v2/target/blobs/uploads/?mount={digest}&from=source/repo"),
        )
        .call(),
    );
    assert_eq!(r.status, 201, "{r:?}");
    assert_eq!(
        r.header("location"),
        Some(format!("/v2/target/blobs/{digest}").as_str())
    );
    assert_eq!(
        call(s.req("GET", &format!("/v2/target/blobs/{digest}")).call()).body,
        b"shared layer"
    );
    // Unknown blob: falls back to a normal upload session.
    let unknown = sha256(b"never pushed");
    let r = call(
        s.req(
            "POST",
            &format!("/v2/target/blobs/uploads/?mount={unknown}&from=source/repo"),
        )
        .call(),
    );
    assert_eq!(r.status, 202);
    assert!(r.header("location").unwrap().contains("/blobs/uploads/"));
}

#[test]
fn manifests_by_tag_and_digest_with_validation() {
    let s = Server::start();
    let config = s.push_blob("team/app", b"{}");
    let layer = s.push_blob("team/app", b"layer bytes");
    let manifest = image_manifest((&config, 2), &[(&layer, 11)]);
    let r = s.push_manifest("team/app", "v1", &manifest);
    assert_eq!(r.status, 201, "{r:?}");
    let digest = r.header("docker-content-digest").unwrap().to_owned();
    assert_eq!(digest, sha256(&serde_json::to_vec(&manifest).unwrap()));

    for reference in ["v1", digest.as_str()] {
        let r = call(
            s.req("GET", &format!("/v2/team/app/manifests/{reference}"))
                .set("Accept", OCI_MANIFEST)
                .call(),
        );
        assert_eq!(r.status, 200);
        assert_eq!(r.header("content-type"), Some(OCI_MANIFEST));
        assert_eq!(r.header("docker-content-digest"), Some(digest.as_str()));
        assert_eq!(r.json(), manifest);
        let h = call(
            s.req("HEAD", &format!("/v2/team/app/manifests/{reference}"))
                .call(),
        );
        assert_eq!(
            h.header("content-length").unwrap(),
            r.body.len().to_string()
        );
    }

    // Validation: bad JSON, unknown blobs, wrong size, unknown media type, digest mismatch.
    let r = call(
        s.req("PUT", "/v2/team/app/manifests/bad")
            .set("Content-Type", OCI_MANIFEST)
            .send_string("{not json"),
    );
    assert_eq!(
        (r.status, r.error_code().as_str()),
        (400, "MANIFEST_INVALID")
    );
    let missing = image_manifest((&config, 2), &[(&sha256(b"absent"), 6)]);
    let r = s.push_manifest("team/app", "v2", &missing);
    assert_eq!(
        (r.status, r.error_code().as_str()),
        (400, "MANIFEST_BLOB_UNKNOWN")
    );
    let wrong_size = image_manifest((&config, 3), &[]);
    assert_eq!(
        s.push_manifest("team/app", "v2", &wrong_size).error_code(),
        "MANIFEST_INVALID"
    );
    let r = call(
        s.req("PUT", "/v2/team/app/manifests/v2")
            .set("Content-Type", "text/plain")
            .send_string("{\"schemaVersion\":2}"),
    );
    assert_eq!(r.error_code(), "MANIFEST_INVALID");
    let other = image_manifest((&config, 2), &[]);
    let r = s.push_manifest("team/app", &digest, &other);
    assert_eq!((r.status, r.error_code().as_str()), (400, "DIGEST_INVALID"));
    let r = call(s.req("GET", "/v2/team/app/manifests/nope").call());
    assert_eq!(
        (r.status, r.error_code().as_str()),
        (404, "MANIFEST_UNKNOWN")
    );

    // Docker v2 schema 2, and an index over both.
    let mut docker = image_manifest((&config, 2), &[(&layer, 11)]);
    docker["mediaType"] = "application/vnd.docker.distribution.manifest.v2+json".into();
    docker["config"]["mediaType"] = "application/vnd.docker.container.image.v1+json".into();
    let r = s.push_manifest("team/app", "docker", &docker);
    assert_eq!(r.status, 201, "{r:?}");
    let docker_digest = r.header("docker-content-digest").unwrap().to_owned();
    let index = serde_json::json!({
        "schemaVersion": 2, "mediaType": OCI_INDEX,
        "manifests": [
            {"mediaType": OCI_MANIFEST, "digest": digest, "size": 0},
            {"mediaType": "application/vnd.docker.distribution.manifest.v2+json", "digest": docker_digest, "size": 0},
        ]
    });
    assert_eq!(s.push_manifest("team/app", "multi", &index).status, 201);
    let dangling = serde_json::json!({"schemaVersion": 2, "mediaType": OCI_INDEX,
        "manifests": [{"mediaType": OCI_MANIFEST, "digest": sha256(b"x"), "size": 1}]});
    assert_eq!(
        s.push_manifest("team/app", "dangling", &dangling)
            .error_code(),
        "MANIFEST_BLOB_UNKNOWN"
    );
}

#[test]
fn tags_and_catalog_paginate_with_link_headers() {
    let s = Server::start();
    let config = s.push_blob("r/one", b"{}");
    let manifest = image_manifest((&config, 2), &[]);
    for tag in ["c", "a", "b", "d"] {
        assert_eq!(s.push_manifest("r/one", tag, &manifest).status, 201);
    }
    let r = call(s.req("GET", "/v2/r/one/tags/list").call());
    assert_eq!(
        r.json(),
        serde_json::json!({"name": "r/one", "tags": ["a", "b", "c", "d"]})
    );
    let r = call(s.req("GET", "/v2/r/one/tags/list?n=2").call());
    assert_eq!(r.json()["tags"], serde_json::json!(["a", "b"]));
    assert_eq!(
        r.header("link"),
        Some("</v2/r/one/tags/list?n=2&last=b>; rel=\"next\"")
    );
    let r = call(s.req("GET", "/v2/r/one/tags/list?n=2&last=b").call());
    assert_eq!(r.json()["tags"], serde_json::json!(["c", "d"]));
    assert_eq!(r.header("link"), None);
    let r = call(s.req("GET", "/v2/missing/tags/list").call());
    assert_eq!((r.status, r.error_code().as_str()), (404, "NAME_UNKNOWN"));

    s.push_blob("r/two", b"x");
    s.push_blob("a/deep/name", b"x");
    let r = call(s.req("GET", "/v2/_catalog").call());
    assert_eq!(
        r.json(),
        serde_json::json!({"repositories": ["a/deep/name", "r/one", "r/two"]})
    );
    let r = call(s.req("GET", "/v2/_catalog?n=1&last=a/deep/name").call());
    assert_eq!(r.json()["repositories"], serde_json::json!(["r/one"]));
    assert!(r.header("link").unwrap().contains("last=r/one"));
}

#[test]
fn referrers_with_subject_and_artifact_type_filter() {
    let s = Server::start();
    let (subject, subject_digest) = s.push_empty_image("app", "v1");
    let config = s.push_blob("app", b"{}");
    let subject_size = serde_json::to_vec(&subject).unwrap().len();
    let mut refs = Vec::new();
    for kind in [
        "application/vnd.example.sbom",
        "application/vnd.example.signature",
    ] {
        let mut m = image_manifest((&config, 2), &[]);
        m["artifactType"] = kind.into();
        m["subject"] = serde_json::json!({"mediaType": OCI_MANIFEST, "digest": subject_digest, "size": subject_size});
        m["annotations"] = serde_json::json!({"kind": kind});
        let digest = sha256(&serde_json::to_vec(&m).unwrap());
        let r = s.push_manifest("app", &digest, &m);
        assert_eq!(r.status, 201, "{r:?}");
        assert_eq!(r.header("oci-subject"), Some(subject_digest.as_str()));
        refs.push(digest);
    }
    let r = call(
        s.req("GET", &format!("/v2/app/referrers/{subject_digest}"))
            .call(),
    );
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-type"), Some(OCI_INDEX));
    let index = r.json();
    assert_eq!(index["manifests"].as_array().unwrap().len(), 2);
    assert!(
        index["manifests"]
            .as_array()
            .unwrap()
            .iter()
            .all(|d| d["annotations"]["kind"].is_string())
    );
    let r = call(
        s.req(
            "GET",
            &format!(
                "/v2/app/referrers/{subject_digest}?artifactType=application/vnd.example.sbom"
            ),
        )
        .call(),
    );
    assert_eq!(r.header("oci-filters-applied"), Some("artifactType"));
    let only = r.json()["manifests"].as_array().unwrap().clone();
    assert_eq!(only.len(), 1);
    assert_eq!(only[0]["digest"], refs[0].as_str());
    assert_eq!(only[0]["artifactType"], "application/vnd.example.sbom");
    // Unknown subject: an empty index, not an error.
    let r = call(
        s.req("GET", &format!("/v2/app/referrers/{}", sha256(b"nothing")))
            .call(),
    );
    assert_eq!(
        (r.status, r.json()["manifests"].as_array().unwrap().len()),
        (200, 0)
    );
    // Deleting a referrer removes it from the list.
    assert_eq!(
        call(
            s.req("DELETE", &format!("/v2/app/manifests/{}", refs[1]))
                .call()
        )
        .status,
        202
    );
    let r = call(
        s.req("GET", &format!("/v2/app/referrers/{subject_digest}"))
            .call(),
    );
    assert_eq!(r.json()["manifests"].as_array().unwrap().len(), 1);
}

#[test]
fn deletes_of_manifests_tags_and_blobs() {
    let s = Server::start();
    let (manifest, digest) = s.push_empty_image("app", "v1");
    let config = sha256(b"{}");
    s.push_manifest("app", "v2", &manifest);
    // Tag delete leaves the manifest.
    assert_eq!(
        call(s.req("DELETE", "/v2/app/manifests/v2").call()).status,
        202
    );
    assert_eq!(
        call(s.req("GET", "/v2/app/manifests/v2").call()).status,
        404
    );
    assert_eq!(
        call(s.req("GET", &format!("/v2/app/manifests/{digest}")).call()).status,
        200
    );
    // Manifest delete removes its tags.
    assert_eq!(
        call(
            s.req("DELETE", &format!("/v2/app/manifests/{digest}"))
                .call()
        )
        .status,
        202
    );
    assert_eq!(
        call(s.req("GET", "/v2/app/manifests/v1").call()).status,
        404
    );
    assert_eq!(
        call(s.req("GET", &format!("/v2/app/manifests/{digest}")).call()).error_code(),
        "MANIFEST_UNKNOWN"
    );
    assert_eq!(
        call(
            s.req("DELETE", &format!("/v2/app/manifests/{digest}"))
                .call()
        )
        .status,
        404
    );
    // Blob delete.
    assert_eq!(
        call(s.req("DELETE", &format!("/v2/app/blobs/{config}")).call()).status,
        202
    );
    assert_eq!(
        call(s.req("GET", &format!("/v2/app/blobs/{config}")).call()).error_code(),
        "BLOB_UNKNOWN"
    );
    assert_eq!(
        call(s.req("DELETE", &format!("/v2/app/blobs/{config}")).call()).status,
        404
    );
}

#[test]
fn client_mistakes_get_spec_errors_never_500() {
    let s = Server::start();
    let cases: [(&str, &str, u16, &str); 6] = [
        ("GET", "/v2/UPPER/tags/list", 400, "NAME_INVALID"),
        ("GET", "/v2/a//b/tags/list", 400, "NAME_INVALID"),
        ("GET", "/v2/app/manifests/-bad-tag", 400, "MANIFEST_INVALID"),
        ("GET", "/v2/app/blobs/md5:abc", 405, "UNSUPPORTED"),
        (
            "GET",
            "/v2/app/blobs/uploads/not-a-session",
            404,
            "BLOB_UPLOAD_UNKNOWN",
        ),
        ("POST", "/v2/app/manifests/v1", 405, "UNSUPPORTED"),
    ];
    for (method, path, status, code) in cases {
        let r = call(s.req(method, path).call());
        assert_eq!(
            (r.status, r.error_code().as_str()),
            (status, code),
            "{method} {path}: {r:?}"
        );
    }
    let r = call(s.req("GET", "/v2/app/what/ever").call());
    assert_eq!(r.status, 404);
    // Manifest too large.
    let big = format!(
        "{{\"schemaVersion\":2,\"pad\":\"{}\"}}",
        "x".repeat(5 << 20)
    );
    let r = call(
        s.req("PUT", "/v2/app/manifests/big")
            .set("Content-Type", OCI_MANIFEST)
            .send_string(&big),
    );
    assert_eq!((r.status, r.error_code().as_str()), (413, "SIZE_INVALID"));
}

#[test]
fn state_and_chunked_uploads_survive_a_kill_and_restart() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start_in(dir.path());
    let (_, digest) = s.push_empty_image("app", "v1");
    let r = call(s.req("POST", "/v2/app/blobs/uploads/").call());
    let location = r.header("location").unwrap().to_owned();
    call(
        s.req("PATCH", &location)
            .set("Content-Range", "0-5")
            .send_bytes(b"first "),
    );
    s.kill9();

    let s = Server::start_in(dir.path());
    let r = call(s.req("GET", "/v2/app/manifests/v1").call());
    assert_eq!(
        (r.status, r.header("docker-content-digest")),
        (200, Some(digest.as_str()))
    );
    // The upload continues where it was.
    let r = call(s.req("GET", &location).call());
    assert_eq!(r.header("range"), Some("0-5"));
    let r = call(
        s.req("PATCH", &location)
            .set("Content-Range", "6-11")
            .send_bytes(b"second"),
    );
    assert_eq!(r.status, 202, "{r:?}");
    let blob_digest = sha256(b"first second");
    assert_eq!(
        call(
            s.req("PUT", &format!("{location}?digest={blob_digest}"))
                .call()
        )
        .status,
        201
    );
    assert_eq!(
        call(s.req("GET", &format!("/v2/app/blobs/{blob_digest}")).call()).body,
        b"first second"
    );
}

#[test]
fn settings_and_gc_from_the_cli_apply_to_a_running_server() {
    let s = Server::start();
    let data = s.data().to_str().unwrap().to_owned();
    let wharf = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_wharf"))
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let settings = wharf(&[
        "registry",
        "settings",
        "team/app",
        "--tag-immutability",
        "true",
        "--keep-last",
        "5",
        "--data-dir",
        &data,
    ]);
    assert!(
        settings.contains("\"tag_immutability\": true"),
        "{settings}"
    );
    let config = s.push_blob("team/app", b"{}");
    let manifest = image_manifest((&config, 2), &[]);
    assert_eq!(s.push_manifest("team/app", "v1", &manifest).status, 201);
    let r = s.push_manifest("team/app", "v1", &manifest);
    assert_eq!((r.status, r.error_code().as_str()), (409, "DENIED"));

    s.push_blob("team/app", b"orphan");
    let report: serde_json::Value = serde_json::from_str(&wharf(&[
        "registry",
        "gc",
        "--dry-run",
        "--output",
        "json",
        "--data-dir",
        &data,
    ]))
    .unwrap();
    // Young orphans survive (grace period); nothing referenced is touched.
    assert_eq!(report["blobs_removed"], serde_json::json!([]));
    assert_eq!(
        call(s.req("GET", "/v2/team/app/manifests/v1").call()).status,
        200
    );

    let bad = std::process::Command::new(env!("CARGO_BIN_EXE_wharf"))
        .args(["registry", "settings", "Bad Name", "--data-dir", &data])
        .output()
        .unwrap();
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("invalid repository name"));
}
