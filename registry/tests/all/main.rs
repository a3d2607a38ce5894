//! Integration tests of the registry crate through its router (in-process,
//! `tower::ServiceExt::oneshot`) and its store: lifecycle, garbage
//! collection, tag immutability.

mod fuzz;

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::body::Body;
use axum::http::{Request, StatusCode};
use http_body_util::BodyExt;
use sha2::{Digest as _, Sha256};
use tower::ServiceExt;
use wharf_registry::Registry;
use wharf_registry::auth::StaticTokens;
use wharf_registry::path::Name;
use wharf_registry::storage::fs::FsStorage;
use wharf_registry::store::RepoSettings;

const TOKEN: &str = "test-token";

struct Harness {
    _dir: tempfile::TempDir,
    registry: Arc<Registry>,
    router: axum::Router,
}

impl Harness {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let storage = FsStorage::open(dir.path()).unwrap();
        let registry = Registry::new(
            Arc::new(storage),
            Arc::new(StaticTokens::new([TOKEN.to_owned()])),
        );
        let router = wharf_registry::http::router(registry.clone());
        Harness {
            _dir: dir,
            registry,
            router,
        }
    }

    async fn send(
        &self,
        method: &str,
        uri: &str,
        content_type: Option<&str>,
        body: Vec<u8>,
    ) -> (StatusCode, Vec<u8>) {
        let mut req = Request::builder()
            .method(method)
            .uri(uri)
            .header("authorization", format!("Bearer {TOKEN}"));
        if let Some(ct) = content_type {
            req = req.header("content-type", ct);
        }
        let response = self
            .router
            .clone()
            .oneshot(req.body(Body::from(body)).unwrap())
            .await
            .unwrap();
        let status = response.status();
        (
            status,
            response
                .into_body()
                .collect()
                .await
                .unwrap()
                .to_bytes()
                .to_vec(),
        )
    }

    /// Opens an upload session in `repo` and returns its id.
    async fn open_upload(&self, repo: &str) -> String {
        let req = Request::builder()
            .method("POST")
            .uri(format!("/v2/{repo}/blobs/uploads/"))
            .header("authorization", format!("Bearer {TOKEN}"))
            .body(Body::empty())
            .unwrap();
        let response = self.router.clone().oneshot(req).await.unwrap();
        assert_eq!(response.status(), StatusCode::ACCEPTED);
        response.headers()["docker-upload-uuid"]
            .to_str()
            .unwrap()
            .to_owned()
    }

    async fn blob(&self, repo: &str, bytes: &[u8]) -> String {
        let digest = format!("sha256:{}", hex::encode(Sha256::digest(bytes)));
        let (status, _) = self
            .send(
                "POST",
                &format!("/v2/{repo}/blobs/uploads/?digest={digest}"),
                None,
                bytes.to_vec(),
            )
            .await;
        assert_eq!(status, StatusCode::CREATED);
        digest
    }

    /// Pushes a manifest over a fresh config blob; returns its digest.
    async fn manifest(
        &self,
        repo: &str,
        reference: &str,
        config_bytes: &[u8],
    ) -> (StatusCode, String) {
        let config = self.blob(repo, config_bytes).await;
        let manifest = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config, "size": config_bytes.len()},
            "layers": [],
        });
        let bytes = serde_json::to_vec(&manifest).unwrap();
        let digest = format!("sha256:{}", hex::encode(Sha256::digest(&bytes)));
        let reference = if reference.is_empty() {
            digest.clone()
        } else {
            reference.to_owned()
        };
        let (status, _) = self
            .send(
                "PUT",
                &format!("/v2/{repo}/manifests/{reference}"),
                Some("application/vnd.oci.image.manifest.v1+json"),
                bytes,
            )
            .await;
        (status, digest)
    }

    async fn status(&self, uri: &str) -> StatusCode {
        self.send("GET", uri, None, Vec::new()).await.0
    }
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

#[tokio::test]
async fn gc_keeps_referenced_blobs_and_young_ones_and_dry_run_changes_nothing() {
    let h = Harness::new();
    let (_, manifest) = h.manifest("app", "v1", b"{\"a\":1}").await;
    let orphan = h.blob("app", b"nobody refers to me").await;
    let store = &h.registry.store;

    // Young: within the grace period, kept.
    let report = store.gc(now(), false).await.unwrap();
    assert!(report.blobs_removed.is_empty(), "{report:?}");

    let later = now() + wharf_registry::gc::GRACE_SECS + 60;
    let report = store.gc(later, true).await.unwrap();
    assert_eq!(report.blobs_removed, std::slice::from_ref(&orphan));
    assert_eq!(report.bytes_freed, 19);
    assert_eq!(
        h.status(&format!("/v2/app/blobs/{orphan}")).await,
        StatusCode::OK,
        "dry run removed nothing"
    );

    let report = store.gc(later, false).await.unwrap();
    assert_eq!(report.blobs_removed, std::slice::from_ref(&orphan));
    assert_eq!(
        h.status(&format!("/v2/app/blobs/{orphan}")).await,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        h.status(&format!("/v2/app/manifests/{manifest}")).await,
        StatusCode::OK
    );
    assert_eq!(h.status("/v2/app/manifests/v1").await, StatusCode::OK);
    // Idempotent.
    assert_eq!(store.gc(later, false).await.unwrap(), Default::default());
}

#[tokio::test]
async fn lifecycle_keeps_the_newest_tags_and_expires_untagged_manifests() {
    let h = Harness::new();
    let name = Name::parse("app").unwrap();
    for (i, tag) in ["old", "mid", "new"].iter().enumerate() {
        if i > 0 {
            // Tag age is the file's modification time (1 s resolution).
            tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
        }
        assert_eq!(
            h.manifest("app", tag, format!("{{\"n\":{i}}}").as_bytes())
                .await
                .0,
            StatusCode::CREATED
        );
    }
    let (_, untagged) = h.manifest("app", "", b"{\"untagged\":true}").await;
    h.registry
        .store
        .set_settings(
            &name,
            &RepoSettings {
                keep_last_tagged: Some(2),
                expire_untagged_after_secs: Some(600),
                ..RepoSettings::default()
            },
        )
        .await
        .unwrap();

    let report = h.registry.store.gc(now(), false).await.unwrap();
    assert_eq!(report.tags_removed, ["app:old"]);
    assert!(
        report.manifests_removed.is_empty(),
        "untagged is still young: {report:?}"
    );
    assert_eq!(
        h.status("/v2/app/manifests/old").await,
        StatusCode::NOT_FOUND
    );
    assert_eq!(h.status("/v2/app/manifests/mid").await, StatusCode::OK);

    let report = h.registry.store.gc(now() + 601, false).await.unwrap();
    // The manifest "old" pointed at is untagged now too, and expires with it.
    assert_eq!(report.manifests_removed.len(), 2, "{report:?}");
    assert!(
        report
            .manifests_removed
            .contains(&format!("app@{untagged}"))
    );
    assert_eq!(
        h.status(&format!("/v2/app/manifests/{untagged}")).await,
        StatusCode::NOT_FOUND
    );
    assert_eq!(h.status("/v2/app/manifests/new").await, StatusCode::OK);
}

#[tokio::test]
async fn immutable_tags_cannot_be_moved() {
    let h = Harness::new();
    let name = Name::parse("team/app").unwrap();
    h.registry
        .store
        .set_settings(
            &name,
            &RepoSettings {
                tag_immutability: true,
                ..RepoSettings::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(
        h.manifest("team/app", "v1", b"{\"first\":1}").await.0,
        StatusCode::CREATED
    );
    let config = h.blob("team/app", b"{}").await;
    let other = serde_json::json!({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config, "size": 2}, "layers": [],
    });
    let (status, body) = h
        .send(
            "PUT",
            "/v2/team/app/manifests/v1",
            Some("application/vnd.oci.image.manifest.v1+json"),
            serde_json::to_vec(&other).unwrap(),
        )
        .await;
    assert_eq!(status, StatusCode::CONFLICT);
    let body: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(body["errors"][0]["code"], "DENIED");
    assert!(
        body["errors"][0]["message"]
            .as_str()
            .unwrap()
            .contains("immutable")
    );
    // New tags are fine.
    let (status, _) = h
        .send(
            "PUT",
            "/v2/team/app/manifests/v2",
            Some("application/vnd.oci.image.manifest.v1+json"),
            serde_json::to_vec(&other).unwrap(),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED);
}

#[tokio::test]
async fn abandoned_uploads_are_collected() {
    let h = Harness::new();
    let storage = h.registry.store.storage();
    // A session opened and never used stores nothing.
    let (status, _) = h
        .send("POST", "/v2/app/blobs/uploads/", None, Vec::new())
        .await;
    assert_eq!(status, StatusCode::ACCEPTED);
    assert_eq!(storage.list("uploads").await.unwrap(), Vec::<String>::new());
    // A session with bytes, one of the flat layout with a marker beside
    // its bytes (before ids were signed), and one of the layout before
    // that (a directory per session): collection clears all three.
    let id = h.open_upload("app").await;
    let (status, _) = h
        .send(
            "PATCH",
            &format!("/v2/app/blobs/uploads/{id}"),
            None,
            b"some bytes".to_vec(),
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED);
    storage
        .write("uploads/0123-flat.repo", b"app")
        .await
        .unwrap();
    storage
        .write("uploads/0123-old/repo", b"app")
        .await
        .unwrap();
    let mut want = [
        "0123-flat.repo".to_owned(),
        "0123-old".to_owned(),
        format!("{id}.data"),
    ];
    want.sort();
    assert_eq!(storage.list("uploads").await.unwrap(), want);
    assert_eq!(
        h.registry
            .store
            .gc(now(), false)
            .await
            .unwrap()
            .uploads_removed,
        0
    );
    let later = now() + wharf_registry::gc::STALE_UPLOAD_SECS + 1;
    assert_eq!(
        h.registry
            .store
            .gc(later, false)
            .await
            .unwrap()
            .uploads_removed,
        3
    );
    let left = storage.list("uploads").await.unwrap();
    assert!(left.is_empty(), "left behind: {left:?}");
}

/// An upload id is signed with its repository: it is known without
/// anything stored, to another server over the same storage with the
/// same key (a replica, or this one restarted), and to nobody else —
/// not in another repository, not altered, not under another key.
#[tokio::test]
async fn an_upload_id_is_known_by_its_signature_in_its_repository_only() {
    let h = Harness::new();
    h.registry.set_session_key(b"the cluster's secret");
    let bytes = b"pushed through another server".to_vec();
    let digest = format!("sha256:{}", hex::encode(Sha256::digest(&bytes)));

    let id = h.open_upload("app").await;
    assert_eq!(id.len(), 48, "{id}");
    let storage = h.registry.store.storage();
    assert_eq!(storage.list("uploads").await.unwrap(), Vec::<String>::new());
    let unknown = |status: StatusCode, body: &[u8]| {
        assert_eq!(status, StatusCode::NOT_FOUND);
        assert!(
            String::from_utf8_lossy(body).contains("BLOB_UPLOAD_UNKNOWN"),
            "{}",
            String::from_utf8_lossy(body)
        );
    };
    // Another repository, an altered tag, an id never issued, an id of
    // the older form with no marker.
    let (status, body) = h
        .send(
            "PATCH",
            &format!("/v2/other/blobs/uploads/{id}"),
            None,
            b"x".to_vec(),
        )
        .await;
    unknown(status, &body);
    let flipped = format!("{}{}", &id[..47], if id.ends_with('0') { '1' } else { '0' });
    let never = "0".repeat(48);
    for forged in [
        flipped.as_str(),
        &never,
        "6f1d0e1c-5a4b-4c3d-9e8f-7a6b5c4d3e2f",
    ] {
        let (status, body) = h
            .send(
                "GET",
                &format!("/v2/app/blobs/uploads/{forged}"),
                None,
                Vec::new(),
            )
            .await;
        unknown(status, &body);
    }
    // Another registry over the same files: with another key the id is
    // unknown; with the same key it completes the upload.
    let other = |secret: &[u8]| {
        let registry = Registry::new(
            storage.clone(),
            Arc::new(StaticTokens::new([TOKEN.to_owned()])),
        );
        registry.set_session_key(secret);
        Harness {
            _dir: tempfile::tempdir().unwrap(),
            router: wharf_registry::http::router(registry.clone()),
            registry,
        }
    };
    let finish = format!("/v2/app/blobs/uploads/{id}?digest={digest}");
    let stranger = other(b"another secret");
    let (status, body) = stranger.send("PUT", &finish, None, bytes.clone()).await;
    unknown(status, &body);
    let replica = other(b"the cluster's secret");
    let (status, _) = replica.send("PUT", &finish, None, bytes.clone()).await;
    assert_eq!(status, StatusCode::CREATED);
    let (status, pulled) = h
        .send("GET", &format!("/v2/app/blobs/{digest}"), None, Vec::new())
        .await;
    assert_eq!((status, pulled), (StatusCode::OK, bytes.clone()));
    // Ended: the server that ended it knows, for chunks and retries.
    let (status, body) = replica
        .send(
            "PATCH",
            &format!("/v2/app/blobs/uploads/{id}"),
            None,
            b"more".to_vec(),
        )
        .await;
    unknown(status, &body);
    assert_eq!(storage.list("uploads").await.unwrap(), Vec::<String>::new());
}

/// A blob pushed whole is hashed in memory and written once when small,
/// and streamed through an upload file when not: on both sides of that
/// limit what is pulled is exactly what was pushed, a wrong digest stores
/// nothing, and no upload session is left behind.
#[tokio::test]
async fn whole_pushes_on_both_sides_of_the_in_memory_limit_keep_exactly_their_bytes() {
    let h = Harness::new();
    for len in [0usize, 1, 256 << 10, (256 << 10) + 1, 3 << 20] {
        let bytes: Vec<u8> = (0..len).map(|i| (i * 7 % 251) as u8).collect();
        let digest = h.blob("app", &bytes).await;
        let (status, pulled) = h
            .send("GET", &format!("/v2/app/blobs/{digest}"), None, Vec::new())
            .await;
        assert_eq!(status, StatusCode::OK, "{len} bytes");
        assert!(
            pulled == bytes,
            "{len} bytes: pulled {} bytes",
            pulled.len()
        );

        let mut other = bytes.clone();
        other.push(1);
        let (status, body) = h
            .send(
                "POST",
                &format!("/v2/wrong/blobs/uploads/?digest={digest}"),
                None,
                other,
            )
            .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{len} bytes");
        assert!(
            String::from_utf8_lossy(&body).contains("DIGEST_INVALID"),
            "{}",
            String::from_utf8_lossy(&body)
        );
        assert_eq!(
            h.status(&format!("/v2/wrong/blobs/{digest}")).await,
            StatusCode::NOT_FOUND,
            "a refused push links nothing"
        );
    }
    let sessions = h.registry.store.storage().list("uploads").await.unwrap();
    assert!(sessions.is_empty(), "left behind: {sessions:?}");
}
