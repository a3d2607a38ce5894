//! Manifests (get, head, put, delete), tags, the catalog and referrers.

use axum::body::Body;
use axum::extract::Request;
use axum::http::{StatusCode, header};
use axum::response::Response;
use http_body_util::BodyExt;

use super::{empty, paginate, pagination, query_pairs, set};
use crate::Registry;
use crate::digest::Digest;
use crate::error::{ErrorCode, RegistryError, Result};
use crate::path::{Name, Reference};
use crate::store::{MAX_MANIFEST_BYTES, media};

pub(super) async fn get(
    registry: &Registry,
    name: &Name,
    reference: &Reference,
    head: bool,
) -> Result<Response> {
    let manifest = registry.store.manifest(name, reference).await?;
    let len = manifest.bytes.len();
    let mut r = Response::new(if head {
        Body::empty()
    } else {
        Body::from(manifest.bytes)
    });
    set(&mut r, "content-type", &manifest.media_type)?;
    set(&mut r, "content-length", len.to_string())?;
    set(&mut r, "docker-content-digest", manifest.digest.as_str())?;
    Ok(r)
}

pub(super) async fn put(
    registry: &Registry,
    name: &Name,
    reference: &Reference,
    request: Request,
) -> Result<Response> {
    let content_type = request
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let bytes = read_manifest_body(request.into_body()).await?;
    registry.metrics.bytes_in(bytes.len() as u64);
    // A quick refusal before the scan; the check that counts is repeated
    // under the tag's lock, right before the write.
    registry.check_tag_push(name, reference).await?;
    let scan = registry.scan_wasm(name, &bytes).await?;
    let put = {
        let _tag = match reference {
            Reference::Tag(tag) => Some(registry.lock_tag(name, tag).await),
            Reference::Digest(_) => None,
        };
        registry.check_tag_push(name, reference).await?;
        registry
            .store
            .put_manifest(name, reference, content_type.as_deref(), &bytes)
            .await?
    };
    if let Some(scan) = scan {
        registry
            .attach_scan(name, &put.digest, bytes.len(), &put.media_type, &scan)
            .await?;
    }
    let mut r = empty(StatusCode::CREATED);
    set(
        &mut r,
        "location",
        format!("/v2/{name}/manifests/{}", put.digest),
    )?;
    set(&mut r, "docker-content-digest", put.digest.as_str())?;
    set(&mut r, "content-length", "0")?;
    if let Some(subject) = put.subject {
        set(&mut r, "oci-subject", subject.as_str())?;
    }
    Ok(r)
}

/// An oversized manifest body is read and discarded up to this many bytes
/// so the client, still sending, receives the 413 instead of a broken pipe.
const DRAIN_LIMIT: usize = 64 << 20;

/// Reads a manifest body of at most [`MAX_MANIFEST_BYTES`].
async fn read_manifest_body(mut body: Body) -> Result<Vec<u8>> {
    let mut bytes = Vec::new();
    let mut seen = 0usize;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| {
            RegistryError::new(
                ErrorCode::ManifestInvalid,
                format!("cannot read the manifest: {e}"),
            )
        })?;
        let Ok(data) = frame.into_data() else {
            continue;
        };
        seen += data.len();
        if seen <= MAX_MANIFEST_BYTES {
            bytes.extend_from_slice(&data);
        } else if seen > DRAIN_LIMIT {
            break;
        }
    }
    if seen > MAX_MANIFEST_BYTES {
        return Err(RegistryError::with_status(
            ErrorCode::SizeInvalid,
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("manifest of {seen}+ bytes exceeds the {MAX_MANIFEST_BYTES}-byte limit"),
        ));
    }
    Ok(bytes)
}

pub(super) async fn delete(
    registry: &Registry,
    name: &Name,
    reference: &Reference,
) -> Result<Response> {
    registry.store.delete_manifest(name, reference).await?;
    Ok(empty(StatusCode::ACCEPTED))
}

fn with_next_link(
    mut r: Response,
    base: &str,
    n: Option<usize>,
    next: Option<String>,
) -> Result<Response> {
    if let (Some(n), Some(next)) = (n, next) {
        set(
            &mut r,
            "link",
            format!("<{base}?n={n}&last={next}>; rel=\"next\""),
        )?;
    }
    Ok(r)
}

pub(super) async fn tags(
    registry: &Registry,
    name: &Name,
    query: Option<&str>,
) -> Result<Response> {
    if !registry.store.repository_exists(name).await? {
        return Err(RegistryError::new(
            ErrorCode::NameUnknown,
            format!("repository {name} does not exist"),
        ));
    }
    let (n, last) = pagination(query);
    let (page, next) = paginate(registry.store.tags(name).await?, n, last.as_deref());
    let r = axum::response::IntoResponse::into_response(axum::Json(
        serde_json::json!({ "name": name.as_str(), "tags": page }),
    ));
    with_next_link(r, &format!("/v2/{name}/tags/list"), n, next)
}

pub(super) async fn catalog(
    registry: &Registry,
    query: Option<&str>,
    visible: impl Fn(&str) -> bool,
) -> Result<Response> {
    let (n, last) = pagination(query);
    let mut names = registry.store.catalog().await?;
    names.retain(|name| visible(name));
    let (page, next) = paginate(names, n, last.as_deref());
    let r = axum::response::IntoResponse::into_response(axum::Json(
        serde_json::json!({ "repositories": page }),
    ));
    with_next_link(r, "/v2/_catalog", n, next)
}

pub(super) async fn referrers(
    registry: &Registry,
    name: &Name,
    subject: &Digest,
    query: Option<&str>,
) -> Result<Response> {
    let artifact_type = query_pairs(query)
        .into_iter()
        .find(|(k, _)| k == "artifactType")
        .map(|(_, v)| v);
    let manifests = registry
        .store
        .referrers(name, subject, artifact_type.as_deref())
        .await?;
    let body = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": media::OCI_INDEX,
        "manifests": manifests,
    });
    let mut r = Response::new(Body::from(body.to_string()));
    set(&mut r, "content-type", media::OCI_INDEX)?;
    if artifact_type.is_some() {
        set(&mut r, "oci-filters-applied", "artifactType")?;
    }
    Ok(r)
}
