//! The ingress: the data plane's own listener (apart from the API port),
//! HTTP/1.1 with keep-alive and HTTP/2 without TLS (h2c), that routes each
//! request by host and path to an HTTP service and balances it over the
//! service's `RUNNING` tasks by least outstanding requests (power of two
//! choices).
//!
//! What it refuses, and how: no route → 404; a service with no task that
//! takes traffic, or every task full → 503 with `Retry-After`; headers
//! over [`MAX_HEADER_BYTES`] → 431 (hyper's own answer); a body over the
//! task definition's `max_request_body` → 413; a client that does not
//! finish its headers — or send anything — within [`HEADER_TIMEOUT`] is
//! dropped (slowloris), and a connection with no request in flight for as
//! long — HTTP/2's included, which hyper would keep open — is closed
//! (GOAWAY on HTTP/2), one whose response the client has not read for a
//! minute is dropped ([`BOUNDS`]); at most [`MAX_CONNECTIONS`]
//! connections at once.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderValue, Request, Response, StatusCode, header};
use http_body::{Frame, SizeHint};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::sync::{Semaphore, watch};

use crate::control::Control;
use crate::metrics::Metrics;
use crate::serving::{Backends, Body, HttpTask, NotTaken, pick};

/// Headers larger than this get 431.
pub const MAX_HEADER_BYTES: usize = 64 << 10;
/// A client must send a request's headers within this time, and a
/// connection with no request in flight is closed after it.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// A connection's bounds: [`HEADER_TIMEOUT`] to say something and as long
/// idle; a response the client does not read for 60 s drops it.
pub const BOUNDS: crate::conn::Bounds = crate::conn::Bounds {
    silent: HEADER_TIMEOUT,
    idle: HEADER_TIMEOUT,
    stall: Duration::from_secs(60),
};
/// Connections served at once; more wait in the kernel's backlog.
pub const MAX_CONNECTIONS: usize = 10_000;
/// The longest route text.
pub const MAX_ROUTE_LEN: usize = 512;

/// Where requests to a service come from: `HOST`, `HOST/PATH` or `/PATH`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Route {
    /// Lowercase host without port; `None`: any host.
    pub host: Option<String>,
    /// Path prefix, `/` at least, without a trailing `/` (except `/`).
    pub path: String,
}

impl Route {
    /// Parses a route; the error says what is wrong.
    pub fn parse(text: &str) -> Result<Route, String> {
        let bad = |why: &str| {
            format!("{text:?} is not a route ({why}): expected HOST, HOST/PATH or /PATH")
        };
        if text.is_empty() || text.len() > MAX_ROUTE_LEN {
            return Err(bad(&format!("1 to {MAX_ROUTE_LEN} characters")));
        }
        let (host, path) = match text.find('/') {
            Some(0) => (None, text),
            Some(i) => (Some(&text[..i]), &text[i..]),
            None => (Some(text), "/"),
        };
        let host = match host {
            None => None,
            Some(h) => {
                let h = h.to_ascii_lowercase();
                if h.is_empty()
                    || h.starts_with(['.', '-'])
                    || !h
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.')
                {
                    return Err(bad("a host has letters, digits, '-' and '.'"));
                }
                Some(h)
            }
        };
        if path.contains(['?', '#', ' ', '%', '*']) || path.contains("//") || path.contains("/../")
        {
            return Err(bad(
                "a path has no query, spaces, wildcards or empty segments",
            ));
        }
        let path = match path.trim_end_matches('/') {
            "" => "/".to_owned(),
            p => p.to_owned(),
        };
        Ok(Route { host, path })
    }

    /// Whether a request to `host` and `path` matches.
    fn matches(&self, host: &str, path: &str) -> bool {
        self.host.as_deref().is_none_or(|h| h == host)
            && (self.path == "/"
                || path
                    .strip_prefix(self.path.as_str())
                    .is_some_and(|rest| rest.is_empty() || rest.starts_with('/')))
    }
}

impl std::fmt::Display for Route {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (&self.host, self.path.as_str()) {
            (Some(h), "/") => write!(f, "{h}"),
            (Some(h), p) => write!(f, "{h}{p}"),
            (None, p) => write!(f, "{p}"),
        }
    }
}

/// Every service's routes.
#[derive(Debug, Clone, Default)]
pub struct RouteTable {
    routes: Vec<(Route, String)>,
}

impl RouteTable {
    /// A table of `(route, service)`.
    pub fn new(routes: Vec<(Route, String)>) -> Self {
        RouteTable { routes }
    }

    /// The service for a request: a route naming the host beats one that
    /// does not; then the longest path prefix wins.
    pub fn lookup(&self, host: &str, path: &str) -> Option<&str> {
        self.routes
            .iter()
            .filter(|(r, _)| r.matches(host, path))
            .max_by_key(|(r, _)| (r.host.is_some(), r.path.len()))
            .map(|(_, s)| s.as_str())
    }

    /// The routes of each of `services` that has some.
    pub fn of_services<'a>(
        &self,
        services: impl IntoIterator<Item = &'a String>,
    ) -> BTreeMap<String, Vec<String>> {
        let mut out = BTreeMap::new();
        for service in services {
            let routes: Vec<String> = self
                .routes
                .iter()
                .filter(|(_, s)| s == service)
                .map(|(r, _)| r.to_string())
                .collect();
            if !routes.is_empty() {
                out.insert(service.clone(), routes);
            }
        }
        out
    }

    /// The service already holding `route`, if any other than `except`.
    pub fn holder(&self, route: &Route, except: &str) -> Option<&str> {
        self.routes
            .iter()
            .find(|(r, s)| r == route && s != except)
            .map(|(_, s)| s.as_str())
    }
}

/// Where an ingress sends a request (several replicas: only the leader
/// holds the services).
pub(crate) enum Relay {
    /// Routed here.
    Here,
    /// To the leader's ingress at this URL, through this replica's client.
    To(String, Arc<crate::cluster::Cluster>),
    /// Nowhere yet: 503, saying why.
    Nowhere(String),
}

/// Marks a request one replica's ingress relayed to another's.
const RELAYED: &str = "x-wharf-relayed";

/// What an ingress routes to: the server's (every service, with
/// autoscaling) or an edge node's (the services with tasks on it).
pub(crate) trait Gateway: Send + Sync + 'static {
    /// The current routes.
    fn route_table(&self) -> Arc<RouteTable>;
    /// The tasks taking traffic.
    fn backends(&self) -> &Backends;
    fn metrics(&self) -> &Metrics;
    /// Where requests go (default: routed here).
    fn relay(&self, _relayed: bool) -> Relay {
        Relay::Here
    }
    /// A request to `service` began (the autoscaler's traffic book).
    fn began(&self, _service: &str) {}
    /// A request to `service` ended after `took`.
    fn ended(&self, _service: &str, _took: Duration) {}
    /// For a service with no task taking traffic: tasks to try, once
    /// there are some, or `None` (503) at once.
    fn wait_for_backend(
        self: &Arc<Self>,
        service: &str,
    ) -> impl Future<Output = Option<Arc<[Arc<HttpTask>]>>> + Send;
}

impl Gateway for Control {
    fn route_table(&self) -> Arc<RouteTable> {
        self.routes()
    }

    fn backends(&self) -> &Backends {
        self.tasks.backends()
    }

    fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    fn relay(&self, relayed: bool) -> Relay {
        match &self.cluster {
            Some(c) => c.ingress_relay(relayed),
            None => Relay::Here,
        }
    }

    fn began(&self, service: &str) {
        self.traffic.began(service);
    }

    fn ended(&self, service: &str, took: Duration) {
        self.traffic.ended(service, took);
    }

    /// Held while a service that may scale to zero scales from zero (see
    /// [`crate::autoscale`]).
    fn wait_for_backend(
        self: &Arc<Self>,
        service: &str,
    ) -> impl Future<Output = Option<Arc<[Arc<HttpTask>]>>> + Send {
        self.hold_for_scale_from_zero(service)
    }
}

/// A JSON error answer of the ingress.
pub(crate) fn error(status: StatusCode, code: &str, message: String) -> Response<Body> {
    let body = serde_json::json!({ "code": code, "message": message }).to_string();
    let mut response = Response::new(
        http_body_util::Full::new(Bytes::from(body))
            .map_err(|never: Infallible| match never {})
            .boxed_unsync(),
    );
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    if status == StatusCode::SERVICE_UNAVAILABLE {
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    }
    response
}

/// A request body that ends with an error once it passes `limit` bytes,
/// and says so through `exceeded`.
struct Limited {
    inner: Incoming,
    left: u64,
    limit: u64,
    exceeded: Arc<AtomicBool>,
}

impl http_body::Body for Limited {
    type Data = Bytes;
    type Error = wharf_runtime::HttpError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        match Pin::new(&mut self.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    let n = data.len() as u64;
                    if n > self.left {
                        self.exceeded.store(true, Ordering::Release);
                        let limit = self.limit;
                        return Poll::Ready(Some(Err(
                            wharf_runtime::HttpError::HttpRequestBodySize(Some(limit)),
                        )));
                    }
                    self.left -= n;
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(e.into()))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The host a request names, lowercase and without its port.
fn request_host(request: &Request<Incoming>) -> String {
    let raw = request
        .uri()
        .host()
        .map(str::to_owned)
        .or_else(|| {
            request
                .headers()
                .get(header::HOST)
                .and_then(|h| h.to_str().ok())
                .map(|h| match h.rsplit_once(':') {
                    Some((host, port)) if port.chars().all(|c| c.is_ascii_digit()) => {
                        host.to_owned()
                    }
                    _ => h.to_owned(),
                })
        })
        .unwrap_or_default();
    raw.trim_end_matches('.').to_ascii_lowercase()
}

/// Answers one ingress request.
async fn route_request<G: Gateway>(
    gateway: &Arc<G>,
    mut request: Request<Incoming>,
    peer: SocketAddr,
) -> Response<Body> {
    let relayed = request.headers().contains_key(RELAYED);
    match gateway.relay(relayed) {
        Relay::Here => {}
        Relay::To(url, cluster) => return relay(&cluster, &url, request, peer).await,
        Relay::Nowhere(why) => {
            return error(StatusCode::SERVICE_UNAVAILABLE, "SERVICE_UNAVAILABLE", why);
        }
    }
    let started = Instant::now();
    let request_id = request
        .headers()
        .get("x-request-id")
        .filter(|v| !v.is_empty() && v.len() <= 200)
        .cloned()
        .unwrap_or_else(|| {
            HeaderValue::from_str(&uuid::Uuid::new_v4().simple().to_string())
                .expect("hex is a valid header value")
        });
    let host = request_host(&request);
    let path = request.uri().path().to_owned();
    let service = gateway
        .route_table()
        .lookup(&host, &path)
        .map(str::to_owned);
    let mut response = match service {
        None => error(
            StatusCode::NOT_FOUND,
            "NOT_FOUND",
            format!("no service is routed at {host}{path}"),
        ),
        Some(service) => {
            let headers = request.headers_mut();
            let forwarded = match headers.get("x-forwarded-for").and_then(|v| v.to_str().ok()) {
                Some(before) => format!("{before}, {}", peer.ip()),
                None => peer.ip().to_string(),
            };
            if let Ok(v) = HeaderValue::from_str(&forwarded) {
                headers.insert("x-forwarded-for", v);
            }
            headers.insert("x-forwarded-proto", HeaderValue::from_static("http"));
            headers.insert("x-request-id", request_id.clone());
            gateway.began(&service);
            let response = forward(gateway, &service, request).await;
            gateway.ended(&service, started.elapsed());
            let status = response.status();
            gateway
                .metrics()
                .ingress_requests
                .with_label_values(&[&service, status.as_str()])
                .inc();
            gateway
                .metrics()
                .ingress_duration
                .with_label_values(&[&service])
                .observe(started.elapsed().as_secs_f64());
            response
        }
    };
    response.headers_mut().insert("x-request-id", request_id);
    response
}

/// Relays a request to the leader's ingress (`url`), as it came, with the
/// client in `X-Forwarded-For`.
async fn relay(
    cluster: &crate::cluster::Cluster,
    url: &str,
    request: Request<Incoming>,
    peer: SocketAddr,
) -> Response<Body> {
    let (mut parts, body) = request.into_parts();
    let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    let Some(uri) = url
        .strip_prefix("http://")
        .and_then(|base| format!("http://{base}{path}").parse::<http::Uri>().ok())
    else {
        return error(
            StatusCode::BAD_GATEWAY,
            "BAD_GATEWAY",
            format!("the leader's ingress {url} is not an http:// URL"),
        );
    };
    if !parts.headers.contains_key(header::HOST)
        && let Some(authority) = parts.uri.authority()
        && let Ok(v) = HeaderValue::from_str(authority.as_str())
    {
        parts.headers.insert(header::HOST, v);
    }
    parts.uri = uri;
    let forwarded = match parts
        .headers
        .get("x-forwarded-for")
        .and_then(|v| v.to_str().ok())
    {
        Some(before) => format!("{before}, {}", peer.ip()),
        None => peer.ip().to_string(),
    };
    if let Ok(v) = HeaderValue::from_str(&forwarded) {
        parts.headers.insert("x-forwarded-for", v);
    }
    parts.headers.insert(RELAYED, HeaderValue::from_static("1"));
    parts.version = http::Version::HTTP_11;
    for name in ["connection", "keep-alive", "te", "trailer", "upgrade"] {
        parts.headers.remove(name);
    }
    let request = Request::from_parts(parts, axum::body::Body::new(body));
    match cluster.send(request).await {
        Ok(response) => response.map(|b| {
            b.map_err(|_| wharf_runtime::HttpError::HttpProtocolError)
                .boxed_unsync()
        }),
        Err(e) => error(
            StatusCode::BAD_GATEWAY,
            "BAD_GATEWAY",
            format!("the leader's ingress {url} did not answer: {e}"),
        ),
    }
}

/// Sends a routed request to one of the service's tasks.
async fn forward<G: Gateway>(
    gateway: &Arc<G>,
    service: &str,
    request: Request<Incoming>,
) -> Response<Body> {
    let mut tasks = gateway.backends().of(service);
    if tasks.is_empty() {
        match gateway.wait_for_backend(service).await {
            Some(t) => tasks = t,
            None => {
                return error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "SERVICE_UNAVAILABLE",
                    format!("service {service} has no task ready to serve"),
                );
            }
        }
    }
    let limit = tasks
        .iter()
        .map(|t| t.settings.max_request_body)
        .max()
        .unwrap_or(0);
    let declared = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit) {
        return error(
            StatusCode::PAYLOAD_TOO_LARGE,
            "PAYLOAD_TOO_LARGE",
            format!("the request body is over this service's limit of {limit} bytes"),
        );
    }
    let exceeded = Arc::new(AtomicBool::new(false));
    let mut request = request.map(|inner| Limited {
        inner,
        left: limit,
        limit,
        exceeded: exceeded.clone(),
    });
    // The balancer's pick first; only if it is full, the others with
    // room, least loaded first (built then, off the common path).
    let mut next = pick(&tasks).cloned();
    let mut rest: Option<std::vec::IntoIter<Arc<crate::serving::HttpTask>>> = None;
    let mut node_full = None;
    while let Some(task) = next {
        match task.serve(request).await {
            Ok(response) => {
                if exceeded.load(Ordering::Acquire) {
                    return error(
                        StatusCode::PAYLOAD_TOO_LARGE,
                        "PAYLOAD_TOO_LARGE",
                        format!("the request body is over this service's limit of {limit} bytes"),
                    );
                }
                return response;
            }
            Err((reason, back)) => {
                request = back;
                if let NotTaken::Node(why) = reason {
                    node_full = Some(why);
                }
            }
        }
        next = rest
            .get_or_insert_with(|| {
                let mut others: Vec<_> =
                    tasks.iter().filter(|t| t.id != task.id).cloned().collect();
                others.sort_by_key(|t| t.load());
                others.into_iter()
            })
            .next();
    }
    let why = node_full.unwrap_or_else(|| "every task is at its max_concurrency".into());
    error(
        StatusCode::SERVICE_UNAVAILABLE,
        "SERVICE_UNAVAILABLE",
        format!("service {service} is busy: {why}"),
    )
}

/// Serves an ingress on `listener` until `shutdown` turns true.
pub(crate) async fn serve<G: Gateway>(
    control: Arc<G>,
    listener: tokio::net::TcpListener,
    shutdown: watch::Receiver<bool>,
) {
    let places = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let mut stop = shutdown.clone();
    let stop = async move {
        let _ = stop.wait_for(|stop| *stop).await;
    };
    crate::conn::accept(&listener, &places, stop, |socket, peer, place| {
        let control = control.clone();
        let stopping = shutdown.clone();
        tokio::spawn(async move {
            let _place = place;
            let activity = crate::conn::Activity::new();
            let service = crate::conn::counted(&activity, move |request| {
                let control = control.clone();
                async move { route_request(&control, request, peer).await }
            });
            let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            builder
                .http1()
                .timer(TokioTimer::new())
                .keep_alive(true)
                .header_read_timeout(HEADER_TIMEOUT)
                .max_buf_size(MAX_HEADER_BYTES);
            builder
                .http2()
                .timer(TokioTimer::new())
                .max_header_list_size(MAX_HEADER_BYTES as u32)
                .max_concurrent_streams(256);
            // hyper's header timeout starts once the protocol is known,
            // and HTTP/2 has no idle timeout: both bounds are kept here.
            let conn = builder.serve_connection(TokioIo::new(activity.io(socket)), service);
            let _ = crate::conn::supervise(
                conn,
                |c| c.graceful_shutdown(),
                &activity,
                BOUNDS,
                stopping,
            )
            .await;
        });
    })
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_parse_and_print() {
        for (text, host, path, shown) in [
            ("api.localhost", Some("api.localhost"), "/", "api.localhost"),
            (
                "API.localhost/v1/",
                Some("api.localhost"),
                "/v1",
                "api.localhost/v1",
            ),
            ("/api/v1", None, "/api/v1", "/api/v1"),
            ("/", None, "/", "/"),
        ] {
            let r = Route::parse(text).unwrap();
            assert_eq!(r.host.as_deref(), host, "{text}");
            assert_eq!(r.path, path, "{text}");
            assert_eq!(r.to_string(), shown);
        }
        for bad in ["", "a b", "/x?y", "host:80", "/a//b", "-x", "/a/*", "/a%2f"] {
            assert!(Route::parse(bad).is_err(), "{bad:?} should be refused");
        }
    }

    #[test]
    fn exact_host_beats_none_then_longest_prefix_wins() {
        let table = RouteTable::new(vec![
            (Route::parse("/").unwrap(), "root".into()),
            (Route::parse("/api").unwrap(), "api".into()),
            (Route::parse("/api/v1").unwrap(), "v1".into()),
            (Route::parse("api.localhost").unwrap(), "host".into()),
            (Route::parse("api.localhost/admin").unwrap(), "admin".into()),
        ]);
        assert_eq!(table.lookup("x", "/"), Some("root"));
        assert_eq!(table.lookup("x", "/api"), Some("api"));
        assert_eq!(table.lookup("x", "/apix"), Some("root"));
        assert_eq!(table.lookup("x", "/api/v1/users"), Some("v1"));
        assert_eq!(table.lookup("api.localhost", "/api/v1"), Some("host"));
        assert_eq!(table.lookup("api.localhost", "/admin/x"), Some("admin"));
        let none = RouteTable::new(vec![(Route::parse("/a").unwrap(), "a".into())]);
        assert_eq!(none.lookup("x", "/b"), None);
    }
}
