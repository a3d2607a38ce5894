//! Blob reads (with `Range`), deletes, and the upload protocol: monolithic
//! (`POST` + `PUT`, or a single `POST ?digest=`), chunked (`PATCH` in order),
//! status, cancel, and cross-repository mounts.

use axum::body::Body;
use axum::extract::Request;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::Response;

use super::{empty, query_pairs, set};
use crate::Registry;
use crate::auth::Access;
use crate::digest::Digest;
use crate::error::{ErrorCode, RegistryError, Result};
use crate::path::Name;

fn unknown(name: &Name, digest: &Digest) -> RegistryError {
    RegistryError::new(
        ErrorCode::BlobUnknown,
        format!("blob {digest} is not in {name}"),
    )
}

/// Parses `Range: bytes=START-[END]` against a blob of `size` bytes.
/// `Ok(None)`: no range asked; `Err`: unsatisfiable.
fn parse_range(headers: &HeaderMap, size: u64) -> std::result::Result<Option<(u64, u64)>, ()> {
    let Some(value) = headers.get(header::RANGE) else {
        return Ok(None);
    };
    let text = value.to_str().map_err(|_| ())?;
    let spec = text.strip_prefix("bytes=").ok_or(())?;
    let (start, end) = spec.split_once('-').ok_or(())?;
    let (start, end) = match (start.trim(), end.trim()) {
        ("", suffix) => {
            let n: u64 = suffix.parse().map_err(|_| ())?;
            (size.saturating_sub(n), size.checked_sub(1).ok_or(())?)
        }
        (s, "") => (s.parse().map_err(|_| ())?, size.checked_sub(1).ok_or(())?),
        (s, e) => (
            s.parse().map_err(|_| ())?,
            e.parse::<u64>()
                .map_err(|_| ())?
                .min(size.saturating_sub(1)),
        ),
    };
    if start > end || start >= size {
        return Err(());
    }
    Ok(Some((start, end)))
}

pub(super) async fn get(
    registry: &Registry,
    name: &Name,
    digest: &Digest,
    headers: &HeaderMap,
    head: bool,
) -> Result<Response> {
    let size = registry
        .store
        .blob_size(name, digest)
        .await?
        .ok_or_else(|| unknown(name, digest))?;
    let range = match parse_range(headers, size) {
        Ok(r) => r,
        Err(()) => {
            // Unsatisfiable: 416 with the size, as RFC 9110 asks.
            let mut r = empty(StatusCode::RANGE_NOT_SATISFIABLE);
            set(&mut r, "content-range", format!("bytes */{size}"))?;
            return Ok(r);
        }
    };
    let (status, offset, len) = match range {
        Some((start, end)) => (StatusCode::PARTIAL_CONTENT, start, end - start + 1),
        None => (StatusCode::OK, 0, size),
    };
    let body = if head {
        Body::empty()
    } else {
        let chunks = registry
            .store
            .blob_chunks(digest, offset, len)
            .await?
            .ok_or_else(|| unknown(name, digest))?;
        registry.metrics.bytes_out(len);
        Body::from_stream(chunks)
    };
    let mut r = Response::new(body);
    *r.status_mut() = status;
    set(&mut r, "content-length", len.to_string())?;
    set(&mut r, "content-type", "application/octet-stream")?;
    set(&mut r, "docker-content-digest", digest.as_str())?;
    set(&mut r, "accept-ranges", "bytes")?;
    if let Some((start, end)) = range {
        set(
            &mut r,
            "content-range",
            format!("bytes {start}-{end}/{size}"),
        )?;
    }
    Ok(r)
}

pub(super) async fn delete(registry: &Registry, name: &Name, digest: &Digest) -> Result<Response> {
    registry.store.delete_blob(name, digest).await?;
    Ok(empty(StatusCode::ACCEPTED))
}

fn upload_response(status: StatusCode, name: &Name, id: &str, offset: u64) -> Result<Response> {
    let mut r = empty(status);
    set(&mut r, "location", format!("/v2/{name}/blobs/uploads/{id}"))?;
    set(&mut r, "docker-upload-uuid", id)?;
    // Inclusive end of what was received; "0-0" before the first byte, as
    // distribution answers.
    set(&mut r, "range", format!("0-{}", offset.saturating_sub(1)))?;
    set(&mut r, "content-length", "0")?;
    Ok(r)
}

fn created(name: &Name, digest: &Digest) -> Result<Response> {
    let mut r = empty(StatusCode::CREATED);
    set(&mut r, "location", format!("/v2/{name}/blobs/{digest}"))?;
    set(&mut r, "docker-content-digest", digest.as_str())?;
    set(&mut r, "content-length", "0")?;
    Ok(r)
}

fn digest_param(query: Option<&str>) -> Result<Option<Digest>> {
    query_pairs(query)
        .into_iter()
        .find(|(k, _)| k == "digest")
        .map(|(_, v)| v.parse())
        .transpose()
}

pub(super) async fn start(registry: &Registry, name: &Name, request: Request) -> Result<Response> {
    let params = query_pairs(request.uri().query());
    let param = |key: &str| {
        params
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.clone())
    };
    if let Some(mount) = param("mount") {
        let digest: Digest = mount.parse()?;
        let from = param("from").map(|f| Name::parse(&f)).transpose()?;
        // A mount needs pull access to `from`. Without `from`, or without
        // that access, it is a normal upload (as the spec allows): the
        // answer never tells whether a blob exists somewhere the caller
        // cannot read.
        if let Some(from) = from
            && registry
                .auth
                .check(
                    super::token(request.headers()).as_deref(),
                    &Access::Pull(from.clone()),
                )
                .is_ok()
            && registry.store.mount(name, &digest, &from).await?
        {
            return created(name, &digest);
        }
    }
    let digest = digest_param(request.uri().query())?;
    let id = registry.store.start_upload(name).await?;
    match digest {
        Some(digest) => {
            let body = request.into_body().into_data_stream();
            registry
                .store
                .finish_upload(name, &id, &digest, counting(registry, body))
                .await?;
            created(name, &digest)
        }
        None => upload_response(StatusCode::ACCEPTED, name, &id, 0),
    }
}

/// Counts bytes received for the metrics as they stream through.
fn counting<'a>(
    registry: &'a Registry,
    body: axum::body::BodyDataStream,
) -> impl crate::store::BodyStream + 'a {
    use futures_util::StreamExt;
    body.map(move |chunk| {
        if let Ok(c) = &chunk {
            registry.metrics.bytes_in(c.len() as u64);
        }
        chunk
    })
}

pub(super) async fn status(registry: &Registry, name: &Name, id: &str) -> Result<Response> {
    let offset = registry.store.upload_offset(name, id).await?;
    upload_response(StatusCode::NO_CONTENT, name, id, offset)
}

/// `Content-Range: START-END` (the spec's form; `bytes ` prefix tolerated).
fn content_range_start(headers: &HeaderMap) -> Result<Option<u64>> {
    let Some(value) = headers.get(header::CONTENT_RANGE) else {
        return Ok(None);
    };
    let invalid = || {
        RegistryError::with_status(
            ErrorCode::BlobUploadInvalid,
            StatusCode::RANGE_NOT_SATISFIABLE,
            format!("invalid Content-Range {value:?}: expected START-END"),
        )
    };
    let text = value.to_str().map_err(|_| invalid())?;
    let text = text.strip_prefix("bytes ").unwrap_or(text);
    let (start, _end) = text.split_once('-').ok_or_else(invalid)?;
    start.trim().parse().map(Some).map_err(|_| invalid())
}

pub(super) async fn patch(
    registry: &Registry,
    name: &Name,
    id: &str,
    request: Request,
) -> Result<Response> {
    let start = content_range_start(request.headers())?;
    let body = request.into_body().into_data_stream();
    match registry
        .store
        .append_upload(name, id, start, counting(registry, body))
        .await
    {
        Ok(offset) => upload_response(StatusCode::ACCEPTED, name, id, offset),
        // Out of order: the store refused before taking a byte; the spec
        // wants the 416 to say where the upload stands.
        Err(
            e @ RegistryError::Client {
                status: Some(StatusCode::RANGE_NOT_SATISFIABLE),
                ..
            },
        ) => {
            let offset = registry.store.upload_offset(name, id).await?;
            let mut r = axum::response::IntoResponse::into_response(e);
            set(&mut r, "location", format!("/v2/{name}/blobs/uploads/{id}"))?;
            set(&mut r, "range", format!("0-{}", offset.saturating_sub(1)))?;
            Ok(r)
        }
        Err(e) => Err(e),
    }
}

pub(super) async fn finish(
    registry: &Registry,
    name: &Name,
    id: &str,
    request: Request,
) -> Result<Response> {
    let digest = digest_param(request.uri().query())?.ok_or_else(|| {
        RegistryError::new(
            ErrorCode::DigestInvalid,
            "completing an upload needs ?digest=<algorithm:hex>",
        )
    })?;
    let body = request.into_body().into_data_stream();
    registry
        .store
        .finish_upload(name, id, &digest, counting(registry, body))
        .await?;
    created(name, &digest)
}

pub(super) async fn cancel(registry: &Registry, name: &Name, id: &str) -> Result<Response> {
    registry.store.cancel_upload(name, id).await?;
    Ok(empty(StatusCode::NO_CONTENT))
}
