//! The `/v2/` HTTP surface: one handler parses the path into a [`Route`]
//! once, checks the token, and dispatches on (method, route).

mod blobs;
mod manifests;

use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::any;
use base64::Engine as _;

use crate::Registry;
use crate::auth::Access;
use crate::error::{ErrorCode, RegistryError, Result};
use crate::path::{self, Route};

/// The registry's routes, to be mounted at the server's root.
pub fn router(registry: Arc<Registry>) -> Router {
    Router::new()
        .route("/v2", any(dispatch))
        .route("/v2/", any(dispatch))
        .route("/v2/{*rest}", any(dispatch))
        .with_state(registry)
}

/// The token in `Authorization`: HTTP Basic with any user name and the
/// token as password (what `docker login`, skopeo and oras send), or Bearer.
pub fn token(headers: &HeaderMap) -> Option<String> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, rest) = value.split_once(' ')?;
    // An empty credential is no credential: it never matches a token.
    let nonempty = |t: String| Some(t).filter(|t| !t.is_empty());
    if scheme.eq_ignore_ascii_case("bearer") {
        return nonempty(rest.trim().to_owned());
    }
    if scheme.eq_ignore_ascii_case("basic") {
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(rest.trim())
            .ok()?;
        let text = String::from_utf8(decoded).ok()?;
        return text
            .split_once(':')
            .and_then(|(_, password)| nonempty(password.to_owned()));
    }
    None
}

fn access(method: &Method, route: &Route) -> Access {
    let mutating = !matches!(*method, Method::GET | Method::HEAD);
    match route {
        Route::Base => Access::Base,
        Route::Catalog => Access::Catalog,
        Route::Tags(n) | Route::Referrers(n, _) => Access::Pull(n.clone()),
        Route::Manifest(n, _) | Route::Blob(n, _) if *method == Method::DELETE => {
            Access::Delete(n.clone())
        }
        Route::Manifest(n, _) | Route::Blob(n, _) | Route::UploadStart(n) | Route::Upload(n, _) => {
            if mutating || matches!(route, Route::UploadStart(_) | Route::Upload(..)) {
                Access::Push(n.clone())
            } else {
                Access::Pull(n.clone())
            }
        }
    }
}

async fn dispatch(State(registry): State<Arc<Registry>>, request: Request) -> Response {
    let method = request.method().clone();
    let path = request.uri().path().to_owned();
    let route = match path::parse(&path) {
        None => {
            return RegistryError::with_status(
                ErrorCode::Unsupported,
                StatusCode::NOT_FOUND,
                format!("no registry endpoint at {path}"),
            )
            .into_response();
        }
        Some(Err(e)) => {
            // Authenticate before revealing anything about the request.
            if let Err(denied) = registry
                .auth
                .check(token(request.headers()).as_deref(), &Access::Base)
            {
                return denied.into_response();
            }
            return e.into_response();
        }
        Some(Ok(route)) => route,
    };
    if let Err(denied) = registry.auth.check(
        token(request.headers()).as_deref(),
        &access(&method, &route),
    ) {
        return denied.into_response();
    }
    let result = match (&method, route) {
        (&Method::GET | &Method::HEAD, Route::Base) => Ok(base()),
        (&Method::GET, Route::Catalog) => {
            let token = token(request.headers());
            // Only the repositories the caller may pull from are listed.
            let visible = |name: &str| {
                path::Name::parse(name).is_ok_and(|n| {
                    registry
                        .auth
                        .check(token.as_deref(), &Access::Pull(n))
                        .is_ok()
                })
            };
            manifests::catalog(&registry, request.uri().query(), visible).await
        }
        (&Method::GET, Route::Tags(name)) => {
            manifests::tags(&registry, &name, request.uri().query()).await
        }
        (&Method::GET | &Method::HEAD, Route::Manifest(name, reference)) => {
            manifests::get(&registry, &name, &reference, method == Method::HEAD).await
        }
        (&Method::PUT, Route::Manifest(name, reference)) => {
            manifests::put(&registry, &name, &reference, request).await
        }
        (&Method::DELETE, Route::Manifest(name, reference)) => {
            manifests::delete(&registry, &name, &reference).await
        }
        (&Method::GET, Route::Referrers(name, digest)) => {
            manifests::referrers(&registry, &name, &digest, request.uri().query()).await
        }
        (&Method::GET | &Method::HEAD, Route::Blob(name, digest)) => {
            blobs::get(
                &registry,
                &name,
                &digest,
                request.headers(),
                method == Method::HEAD,
            )
            .await
        }
        (&Method::DELETE, Route::Blob(name, digest)) => {
            blobs::delete(&registry, &name, &digest).await
        }
        (&Method::POST, Route::UploadStart(name)) => blobs::start(&registry, &name, request).await,
        (&Method::GET, Route::Upload(name, id)) => blobs::status(&registry, &name, &id).await,
        (&Method::PATCH, Route::Upload(name, id)) => {
            blobs::patch(&registry, &name, &id, request).await
        }
        (&Method::PUT, Route::Upload(name, id)) => {
            blobs::finish(&registry, &name, &id, request).await
        }
        (&Method::DELETE, Route::Upload(name, id)) => blobs::cancel(&registry, &name, &id).await,
        (method, route) => Err(RegistryError::new(
            ErrorCode::Unsupported,
            format!("{method} is not supported on {}", route_name(&route)),
        )),
    };
    result.unwrap_or_else(IntoResponse::into_response)
}

fn route_name(route: &Route) -> &'static str {
    match route {
        Route::Base => "/v2/",
        Route::Catalog => "the catalog",
        Route::Tags(_) => "tags",
        Route::Manifest(..) => "manifests",
        Route::Blob(..) => "blobs",
        Route::UploadStart(_) | Route::Upload(..) => "uploads",
        Route::Referrers(..) => "referrers",
    }
}

fn base() -> Response {
    let mut r = (StatusCode::OK, axum::Json(serde_json::json!({}))).into_response();
    r.headers_mut().insert(
        "Docker-Distribution-API-Version",
        HeaderValue::from_static("registry/2.0"),
    );
    r
}

/// Parses `n` and `last` from a query string.
fn pagination(query: Option<&str>) -> (Option<usize>, Option<String>) {
    let mut n = None;
    let mut last = None;
    for (k, v) in query_pairs(query) {
        match k.as_str() {
            "n" => n = v.parse().ok(),
            "last" => last = Some(v),
            _ => {}
        }
    }
    (n, last)
}

/// Decoded `key=value` pairs of a query string.
fn query_pairs(query: Option<&str>) -> Vec<(String, String)> {
    query
        .unwrap_or_default()
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect()
}

fn percent_decode(s: &str) -> String {
    fn hex(b: u8) -> Option<u8> {
        (b as char).to_digit(16).map(|d| d as u8)
    }
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let decoded = match bytes[i] {
            b'%' if i + 2 < bytes.len() => hex(bytes[i + 1])
                .zip(hex(bytes[i + 2]))
                .map(|(h, l)| h * 16 + l),
            _ => None,
        };
        match (decoded, bytes[i]) {
            (Some(b), _) => {
                out.push(b);
                i += 3;
            }
            (None, b) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Applies `n`/`last` to sorted `items`; returns the page and, if more
/// follow, the value for the next page's `last`.
fn paginate(
    items: Vec<String>,
    n: Option<usize>,
    last: Option<&str>,
) -> (Vec<String>, Option<String>) {
    let start = match last {
        Some(last) => items.partition_point(|i| i.as_str() <= last),
        None => 0,
    };
    let rest = &items[start..];
    match n {
        Some(n) if n < rest.len() => {
            let page = rest[..n].to_vec();
            let next = page.last().cloned();
            (page, next.filter(|_| n > 0))
        }
        _ => (rest.to_vec(), None),
    }
}

fn empty(status: StatusCode) -> Response {
    let mut r = Response::new(Body::empty());
    *r.status_mut() = status;
    r
}

fn set(r: &mut Response, name: &'static str, value: impl AsRef<str>) -> Result<()> {
    let v = HeaderValue::from_str(value.as_ref())
        .map_err(|_| RegistryError::Internal(format!("bad header value for {name}")))?;
    r.headers_mut().insert(name, v);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pagination_pages() {
        let items: Vec<String> = ["a", "b", "c", "d"].iter().map(|s| s.to_string()).collect();
        assert_eq!(
            paginate(items.clone(), Some(2), None),
            (vec!["a".into(), "b".into()], Some("b".into()))
        );
        assert_eq!(
            paginate(items.clone(), Some(2), Some("b")),
            (vec!["c".into(), "d".into()], None)
        );
        assert_eq!(
            paginate(items.clone(), None, Some("a")),
            (vec!["b".into(), "c".into(), "d".into()], None)
        );
        assert_eq!(paginate(items.clone(), Some(0), None), (vec![], None));
        assert_eq!(paginate(items, Some(10), Some("zz")), (vec![], None));
    }

    #[test]
    fn queries_decode() {
        assert_eq!(
            query_pairs(Some("mount=sha256%3Aab&from=a%2Fb&x")),
            vec![
                ("mount".into(), "sha256:ab".into()),
                ("from".into(), "a/b".into()),
                ("x".into(), "".into())
            ]
        );
        assert_eq!(percent_decode("100%"), "100%");
        assert_eq!(percent_decode("%zz%é"), "%zz%é");
        // '+' is not a space outside HTML forms: media types contain it.
        assert_eq!(
            percent_decode("application/vnd.x+json%20"),
            "application/vnd.x+json "
        );
    }

    #[test]
    fn tokens_from_basic_and_bearer() {
        let mut h = HeaderMap::new();
        let basic = base64::engine::general_purpose::STANDARD.encode("anyone:s3cret");
        h.insert(
            header::AUTHORIZATION,
            format!("Basic {basic}").parse().unwrap(),
        );
        assert_eq!(token(&h).as_deref(), Some("s3cret"));
        h.insert(header::AUTHORIZATION, "Bearer tok".parse().unwrap());
        assert_eq!(token(&h).as_deref(), Some("tok"));
        h.insert(header::AUTHORIZATION, "Digest x".parse().unwrap());
        assert_eq!(token(&h), None);
        // Empty credentials are none at all.
        let empty = base64::engine::general_purpose::STANDARD.encode("user:");
        h.insert(
            header::AUTHORIZATION,
            format!("Basic {empty}").parse().unwrap(),
        );
        assert_eq!(token(&h), None);
        h.insert(header::AUTHORIZATION, "Bearer  ".parse().unwrap());
        assert_eq!(token(&h), None);
    }
}
