//! HTTP components (`wasi:http/proxy`): one fresh instance per request,
//! from the artifact's pre-instantiation, with the task limits applied per
//! request — fuel, memory, and a deadline the epoch callback enforces —
//! and every way a request can end mapped to a response a client
//! understands. Outbound HTTP is closed unless an [`OutboundRule`] allows
//! the destination: any other request gets the WASI HTTP "request denied"
//! error and no connection is made.
//!
//! This module knows `wasi:http` as a guest interface and the `http`
//! request/response types it is written in; listeners, routing and
//! balancing are the binary's and the control plane's.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use wasmtime::component::ResourceTable;
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};
use wasmtime_wasi_http::p2::bindings::http::types::Scheme;
use wasmtime_wasi_http::p2::body::HyperOutgoingBody;
use wasmtime_wasi_http::{WasiHttpCtx, WasiHttpCtxView, WasiHttpHooks, WasiHttpView};

use crate::artifact::{Artifact, Prepared};
use crate::limits::MemoryLimiter;
use crate::logs::Stream;
use crate::outcome::StopCode;
use crate::sandbox::{
    Failure, HasLimiter, Stdio, StopSignal, TaskSpec, classify, new_store, wasi_builder,
};

/// The header that names the stop code of a request a limit ended.
pub const STOP_CODE_HEADER: &str = "x-wharf-stop-code";

/// A request's store: WASI (no files, no env, no sockets), `wasi:http`,
/// the memory limiter and the outbound policy.
pub(crate) struct HttpState {
    wasi: WasiCtx,
    http: WasiHttpCtx,
    table: ResourceTable,
    limiter: MemoryLimiter,
    hooks: Outbound,
}

impl WasiView for HttpState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

impl WasiHttpView for HttpState {
    fn http(&mut self) -> WasiHttpCtxView<'_> {
        WasiHttpCtxView {
            ctx: &mut self.http,
            table: &mut self.table,
            hooks: &mut self.hooks,
        }
    }
}

impl HasLimiter for HttpState {
    fn limiter(&mut self) -> &mut MemoryLimiter {
        &mut self.limiter
    }
}

/// One destination a component may call: `SCHEME://HOST[:PORT]`, where
/// the host may be `*` or start with `*.` and the port may be `*`; without
/// a port, the scheme's default.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboundRule {
    scheme: String,
    host: String,
    /// `None`: any port.
    port: Option<u16>,
}

impl OutboundRule {
    /// Parses `http://127.0.0.1:*`, `https://api.example.com`,
    /// `https://*.example.com:8443`.
    pub fn parse(text: &str) -> crate::Result<OutboundRule> {
        let invalid = |why: &str| {
            crate::Error::InvalidInput(format!(
                "invalid outbound host {text:?}: {why} (expected e.g. https://api.example.com or http://127.0.0.1:*)"
            ))
        };
        let (scheme, rest) = text.split_once("://").ok_or_else(|| invalid("no scheme"))?;
        let scheme = scheme.to_ascii_lowercase();
        if scheme != "http" && scheme != "https" {
            return Err(invalid("the scheme must be http or https"));
        }
        let rest = rest.strip_suffix('/').unwrap_or(rest);
        if rest.contains(['/', '?', '#', '@']) {
            return Err(invalid("only a scheme, a host and a port"));
        }
        let (host, port) = match rest.rsplit_once(':') {
            Some((h, p)) if !h.ends_with(']') || rest.starts_with('[') => (h, Some(p)),
            _ => (rest, None),
        };
        let port = match port {
            None => Some(if scheme == "https" { 443 } else { 80 }),
            Some("*") => None,
            Some(p) => Some(p.parse::<u16>().map_err(|_| invalid("a bad port"))?),
        };
        let host = host.to_ascii_lowercase();
        let bare = host.strip_prefix("*.").unwrap_or(&host);
        if host.is_empty()
            || (host != "*"
                && (bare.is_empty()
                    || !bare
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || "-.[]:".contains(c))))
        {
            return Err(invalid("a bad host"));
        }
        Ok(OutboundRule { scheme, host, port })
    }

    /// Whether a request to `scheme://host:port` is allowed by this rule.
    pub fn allows(&self, scheme: &str, host: &str, port: u16) -> bool {
        let host = host.to_ascii_lowercase();
        let host_ok = match self.host.strip_prefix("*.") {
            _ if self.host == "*" => true,
            Some(suffix) => host
                .strip_suffix(suffix)
                .is_some_and(|h| h.ends_with('.') && h.len() > 1),
            None => self.host == host,
        };
        self.scheme.eq_ignore_ascii_case(scheme) && host_ok && self.port.is_none_or(|p| p == port)
    }
}

impl std::fmt::Display for OutboundRule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.port {
            Some(p) => write!(f, "{}://{}:{p}", self.scheme, self.host),
            None => write!(f, "{}://{}:*", self.scheme, self.host),
        }
    }
}

/// The longest an allowed outbound request may take to connect.
const OUTBOUND_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Outbound HTTP: closed unless a rule allows the destination. A denied
/// request makes no connection; it is counted and written to the guest's
/// stderr log, so the operator sees what the component tried.
struct Outbound {
    rules: Arc<[OutboundRule]>,
    address_ok: Option<AddressCheck>,
    denied: Arc<AtomicU32>,
    stdio: Stdio,
}

/// Decides whether an address a destination resolves to may be reached.
pub type AddressCheck = Arc<dyn Fn(std::net::IpAddr) -> bool + Send + Sync>;

/// How long resolving an allowed destination may take.
const OUTBOUND_RESOLVE_TIMEOUT: Duration = Duration::from_secs(5);

/// Resolves `host:port` and keeps the first address if every address
/// passes `check` (a name with one internal address is refused whole).
async fn resolve_checked(
    host: &str,
    port: u16,
    check: &AddressCheck,
) -> Result<std::net::SocketAddr, String> {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let lookup = tokio::net::lookup_host((host, port));
    let addrs: Vec<std::net::SocketAddr> =
        match tokio::time::timeout(OUTBOUND_RESOLVE_TIMEOUT, lookup).await {
            Ok(Ok(a)) => a.collect(),
            Ok(Err(e)) => return Err(format!("cannot resolve {host}: {e}")),
            Err(_) => return Err(format!("resolving {host} timed out")),
        };
    if let Some(bad) = addrs.iter().find(|a| !check(a.ip())) {
        return Err(format!(
            "{host} resolves to the internal address {}, which this server does not let components reach",
            bad.ip()
        ));
    }
    addrs
        .first()
        .copied()
        .ok_or_else(|| format!("{host} has no address"))
}

impl Outbound {
    fn allowed(&self, uri: &http::Uri) -> bool {
        let scheme = uri.scheme_str().unwrap_or("https");
        let Some(host) = uri.host() else {
            return false;
        };
        let port = uri
            .port_u16()
            .unwrap_or(if scheme.eq_ignore_ascii_case("https") {
                443
            } else {
                80
            });
        self.rules.iter().any(|r| r.allows(scheme, host, port))
    }
}

/// Counts a denied outbound request and writes why to the guest's stderr.
fn deny(denied: &AtomicU32, stdio: &Stdio, uri: &http::Uri, why: &str) {
    denied.fetch_add(1, Ordering::Relaxed);
    let line = format!("wharf: outbound request to {uri} denied: {why}\n");
    match stdio {
        Stdio::Capture(logs) => logs.write(Stream::Stderr, line.as_bytes()),
        Stdio::Inherit => eprint!("{line}"),
    }
}

impl Outbound {
    fn deny(&self, uri: &http::Uri, why: &str) {
        deny(&self.denied, &self.stdio, uri, why);
    }
}

impl WasiHttpHooks for Outbound {
    fn send_request(
        &mut self,
        request: http::Request<wasmtime_wasi_http::WasiBody>,
        options: Option<wasmtime_wasi_http::RequestOptions>,
        _fut: Box<dyn Future<Output = Result<(), wasmtime_wasi_http::Error>> + Send>,
    ) -> Box<
        dyn Future<
                Output = Result<
                    (
                        http::Response<wasmtime_wasi_http::WasiBody>,
                        Box<dyn Future<Output = Result<(), wasmtime_wasi_http::Error>> + Send>,
                    ),
                    wasmtime_wasi_http::Error,
                >,
            > + Send,
    > {
        if !self.allowed(request.uri()) {
            self.deny(request.uri(), "not an allowed outbound host");
            return Box::new(async { Err(wasmtime_wasi_http::Error::HttpRequestDenied) });
        }
        let mut options = options.unwrap_or_default();
        options.connect_timeout = Some(
            options
                .connect_timeout
                .unwrap_or(OUTBOUND_CONNECT_TIMEOUT)
                .min(OUTBOUND_CONNECT_TIMEOUT),
        );
        let check = self.address_ok.clone();
        let (denied, stdio) = (self.denied.clone(), self.stdio.clone());
        let mut request = request;
        Box::new(async move {
            // Allowed by name; the addresses the name resolves to must be
            // reachable too (no internal address unless the operator
            // allows its network). Plain HTTP then connects to the checked
            // address itself, so the name cannot resolve elsewhere later;
            // HTTPS connects by name for its certificate check.
            if let Some(check) = check {
                let uri = request.uri().clone();
                let https = uri
                    .scheme_str()
                    .is_some_and(|s| s.eq_ignore_ascii_case("https"));
                let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
                let host = uri.host().unwrap_or_default().to_owned();
                match resolve_checked(&host, port, &check).await {
                    Ok(addr) if !https => {
                        let mut parts = uri.into_parts();
                        parts.authority = addr.to_string().parse().ok();
                        if let Ok(pinned) = http::Uri::from_parts(parts) {
                            *request.uri_mut() = pinned;
                        }
                    }
                    Ok(_) => {}
                    Err(why) => {
                        deny(&denied, &stdio, request.uri(), &why);
                        return Err(wasmtime_wasi_http::Error::HttpRequestDenied);
                    }
                }
            }
            let (response, io) =
                wasmtime_wasi_http::default_send_request(request, Some(options)).await?;
            Ok((
                response.map(BodyExt::boxed_unsync),
                Box::new(io) as Box<dyn Future<Output = _> + Send>,
            ))
        })
    }
}

/// What one request's instance used, reported when it is gone.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GuestEnd {
    /// Fuel the instance consumed; `None` when it was dropped at its
    /// timeout before it could say.
    pub fuel_consumed: Option<u64>,
    /// Outbound requests it made that no rule allowed.
    pub outbound_denied: u32,
}

/// What a request may reach beyond its [`TaskSpec`], and who hears when
/// its instance is gone.
#[derive(Default)]
pub struct HttpOptions {
    /// Destinations the component may call (empty: none).
    pub outbound: Arc<[OutboundRule]>,
    /// Which addresses an allowed destination may resolve to (`None`:
    /// any, as for `wharf serve`, where the operator is the user).
    pub address_ok: Option<AddressCheck>,
    /// Called once when the request's instance is dropped — after the
    /// guest returns (it may write the body after the response head), or
    /// when it is abandoned at its timeout. What it captures (a slot, a
    /// memory reservation) is held until then.
    pub on_end: Option<Box<dyn FnOnce(GuestEnd) + Send>>,
}

impl std::fmt::Debug for HttpOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpOptions")
            .field("outbound", &self.outbound)
            .finish_non_exhaustive()
    }
}

/// Calls `on_end` when the guest's task ends or is dropped.
struct EndGuard {
    on_end: Option<Box<dyn FnOnce(GuestEnd) + Send>>,
    end: GuestEnd,
    denied: Arc<AtomicU32>,
}

impl Drop for EndGuard {
    fn drop(&mut self) {
        if let Some(f) = self.on_end.take() {
            self.end.outbound_denied = self.denied.load(Ordering::Relaxed);
            f(self.end);
        }
    }
}

/// How one request ended, beside the response sent for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestOutcome {
    /// `None`: the guest answered (whatever its status); otherwise the
    /// limit or failure that ended it.
    pub stop_code: Option<StopCode>,
    /// What happened, for logs.
    pub message: String,
    /// Wall time of the request up to its response head.
    pub duration: Duration,
}

/// A response with a small text body.
pub fn text_response(status: u16, body: String) -> http::Response<HyperOutgoingBody> {
    let mut response = http::Response::new(
        Full::new(Bytes::from(body))
            .map_err(|never: Infallible| match never {})
            .boxed_unsync(),
    );
    *response.status_mut() =
        http::StatusCode::from_u16(status).unwrap_or(http::StatusCode::INTERNAL_SERVER_ERROR);
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

fn failed(
    status: u16,
    code: StopCode,
    message: String,
    started: Instant,
) -> (http::Response<HyperOutgoingBody>, RequestOutcome) {
    let mut response = text_response(status, format!("{code}: {message}\n"));
    response.headers_mut().insert(
        STOP_CODE_HEADER,
        http::HeaderValue::from_static(code.as_str()),
    );
    (
        response,
        RequestOutcome {
            stop_code: Some(code),
            message,
            duration: started.elapsed(),
        },
    )
}

impl crate::Runtime {
    /// Serves one request with a fresh instance of `artifact` (an HTTP
    /// component) granted what `spec` grants (env, directories, stdio) and
    /// limited by its limits, per request. The guest's own response
    /// is passed on; a trap, fuel or memory limit is a 500 with the stop
    /// code in [`STOP_CODE_HEADER`]; a request that outlives its timeout is
    /// a 504 and its instance is dropped.
    pub async fn handle_http<B>(
        &self,
        artifact: &Artifact,
        spec: &TaskSpec,
        request: http::Request<B>,
    ) -> (http::Response<HyperOutgoingBody>, RequestOutcome)
    where
        B: http_body::Body<Data = Bytes> + Send + 'static,
        B::Error: Into<wasmtime_wasi_http::Error>,
    {
        self.handle_http_with(artifact, spec, request, HttpOptions::default())
            .await
    }

    /// [`handle_http`](Self::handle_http) with outbound rules and an
    /// end-of-instance callback.
    pub async fn handle_http_with<B>(
        &self,
        artifact: &Artifact,
        spec: &TaskSpec,
        request: http::Request<B>,
        options: HttpOptions,
    ) -> (http::Response<HyperOutgoingBody>, RequestOutcome)
    where
        B: http_body::Body<Data = Bytes> + Send + 'static,
        B::Error: Into<wasmtime_wasi_http::Error>,
    {
        let denied = Arc::new(AtomicU32::new(0));
        let mut guard = EndGuard {
            on_end: options.on_end,
            end: GuestEnd::default(),
            denied: denied.clone(),
        };
        let started = Instant::now();
        let limits = &spec.limits;
        let Prepared::Http(pre) = &artifact.prepared else {
            return failed(
                500,
                StopCode::FailedToStart,
                "not an HTTP component".into(),
                started,
            );
        };
        let memory = limits
            .memory
            .unwrap_or(self.config().max_task_memory)
            .min(self.config().max_task_memory);
        // Built in one statement: the builder is not kept in the request's
        // future (see `sandbox::run`).
        let wasi = match wasi_builder(spec, memory) {
            Ok(mut b) => b.build(),
            Err(message) => return failed(500, StopCode::FailedToStart, message, started),
        };
        let state = HttpState {
            wasi,
            http: WasiHttpCtx::new(),
            table: ResourceTable::new(),
            limiter: MemoryLimiter::new(memory),
            hooks: Outbound {
                rules: options.outbound,
                address_ok: options.address_ok,
                denied,
                stdio: spec.stdio.clone(),
            },
        };
        let stop = StopSignal::new();
        let deadline = limits.timeout.and_then(|t| started.checked_add(t));
        let mut store = new_store(&self.engine, state, limits.fuel, deadline, &stop);
        let (sender, receiver) = tokio::sync::oneshot::channel();
        let (req, out) = {
            let mut http = store.data_mut().http();
            let req = http.new_incoming_request(Scheme::Http, request);
            let out = http.new_response_outparam(sender);
            match (req, out) {
                (Ok(req), Ok(out)) => (req, out),
                (Err(e), _) | (_, Err(e)) => {
                    return failed(400, StopCode::FailedToStart, format!("{e:#}"), started);
                }
            }
        };
        let pre = pre.clone();
        // The guest runs in its own task: it may go on writing the body
        // after the response head is sent. The epoch callback ends it at
        // the deadline either way.
        let budget = limits.fuel.unwrap_or(u64::MAX);
        let guest = tokio::spawn(async move {
            let result = async {
                let proxy = pre
                    .instantiate_async(&mut store)
                    .await
                    .map_err(Failure::Start)?;
                proxy
                    .wasi_http_incoming_handler()
                    .call_handle(&mut store, req, out)
                    .await
                    .map_err(Failure::Run)
            }
            .await;
            let denied = store.data_mut().limiter().denied();
            guard.end.fuel_consumed = store.get_fuel().ok().map(|left| budget - left);
            drop(store);
            drop(guard);
            (result, denied)
        });
        let head = async {
            match limits.timeout {
                Some(t) => tokio::time::timeout_at((started + t).into(), receiver).await,
                None => Ok(receiver.await),
            }
        };
        match head.await {
            Ok(Ok(Ok(response))) => (
                response,
                RequestOutcome {
                    stop_code: None,
                    message: String::new(),
                    duration: started.elapsed(),
                },
            ),
            Ok(Ok(Err(code))) => failed(
                500,
                StopCode::Trap,
                format!("the component answered with an error: {code:?}"),
                started,
            ),
            // Blocked past the deadline (in a WASI call, where no epoch
            // check runs): the instance is dropped.
            Err(_) => {
                stop.stop();
                guest.abort();
                failed(
                    504,
                    StopCode::Timeout,
                    "the request ran past its timeout".into(),
                    started,
                )
            }
            // The guest ended without answering: its outcome says why.
            Ok(Err(_)) => match guest.await {
                Ok((Ok(()), _)) => failed(
                    500,
                    StopCode::Trap,
                    "the component returned without a response".into(),
                    started,
                ),
                Ok((Err(failure), denied)) => {
                    if let Some(p) = failure.error().downcast_ref::<crate::sandbox::Preempted>() {
                        let code = match p {
                            crate::sandbox::Preempted::Deadline => StopCode::Timeout,
                            crate::sandbox::Preempted::Stopped => StopCode::UserStopped,
                        };
                        return failed(
                            504,
                            code,
                            "the request ran past its timeout".into(),
                            started,
                        );
                    }
                    let (code, _, message) = classify(failure, denied);
                    failed(500, code, message, started)
                }
                Err(e) => failed(500, StopCode::Trap, format!("internal error: {e}"), started),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outbound_rules_match_scheme_host_and_port() {
        let rule = |t: &str| OutboundRule::parse(t).unwrap();
        let any_port = rule("http://127.0.0.1:*");
        assert!(any_port.allows("http", "127.0.0.1", 8080));
        assert!(!any_port.allows("https", "127.0.0.1", 8080));
        assert!(!any_port.allows("http", "localhost", 8080));
        let default_port = rule("https://API.example.com/");
        assert!(default_port.allows("https", "api.example.com", 443));
        assert!(!default_port.allows("https", "api.example.com", 8443));
        assert!(!default_port.allows("https", "evil-api.example.com", 443));
        let wildcard = rule("https://*.example.com:8443");
        assert!(wildcard.allows("https", "a.b.example.com", 8443));
        assert!(!wildcard.allows("https", "example.com", 8443));
        assert!(!wildcard.allows("https", "badexample.com", 8443));
        assert_eq!(wildcard.to_string(), "https://*.example.com:8443");
        for bad in [
            "127.0.0.1",
            "ftp://x",
            "http://",
            "http://a/b",
            "http://user@a",
            "http://a:99999",
            "http://a b",
        ] {
            assert!(OutboundRule::parse(bad).is_err(), "{bad:?}");
        }
    }
}
