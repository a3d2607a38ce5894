//! The tasks of HTTP services as the ingress sees them: each is a server
//! slot holding its component's pre-instantiation, serving up to
//! `max_concurrency` requests at once, each in a fresh instance admitted
//! by the node's executor (a slot of the instance pool and the request's
//! memory limit from the node's budget). [`Backends`] lists, per service,
//! the tasks that take traffic: a task is added once it is `RUNNING`
//! (its health check passed) and removed the moment it is asked to stop,
//! before it drains.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::BodyExt;
use tokio::sync::Notify;
use wharf_runtime::{
    AddressCheck, Artifact, Executor, GuestEnd, HttpOptions, LogBuffer, OutboundRule, Outcome,
    STOP_CODE_HEADER, StopCode, StopSignal, TaskSpec, text_response,
};

use crate::metrics::Metrics;
use crate::model::{HttpSettings, HttpStats};

/// The response body type of the `wasi:http` host.
pub(crate) type Body = wharf_runtime::HttpBody;

/// How often a starting task's health check is tried.
const HEALTH_CHECK_EVERY: Duration = Duration::from_millis(250);

/// How many recent request latencies a task keeps for its percentiles.
const LATENCY_WINDOW: usize = 1024;

#[derive(Debug, Default)]
struct Counters {
    /// By status class: 1xx (index 0) to 5xx (index 4).
    classes: [u64; 5],
    refused: u64,
    outbound_denied: u64,
    fuel: u64,
    latencies_ms: VecDeque<f64>,
}

/// Why a task did not take a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum NotTaken {
    /// It is at its `max_concurrency`.
    Full,
    /// The node has no instance slot or memory for it.
    Node(String),
}

/// Where a task's requests are served.
enum Target {
    /// Here, in a fresh instance per request.
    Local {
        artifact: Arc<Artifact>,
        spec: Arc<TaskSpec>,
        outbound: Arc<[OutboundRule]>,
        address_ok: AddressCheck,
        executor: Executor,
    },
    /// On an edge node: forwarded to its ingress, which serves it there.
    Remote {
        node: Arc<crate::fleet::RemoteNode>,
        addr: SocketAddr,
        forwarder: Arc<Forwarder>,
    },
}

/// Forwards requests to nodes' ingresses: pooled connections, and the
/// ingresses that refused one lately (passed over for [`SUSPECT_FOR`]).
pub(crate) struct Forwarder {
    client: hyper_util::client::legacy::Client<
        hyper_util::client::legacy::connect::HttpConnector,
        http_body_util::combinators::UnsyncBoxBody<Bytes, std::io::Error>,
    >,
    suspects: Mutex<HashMap<SocketAddr, Instant>>,
}

impl Forwarder {
    /// A forwarder whose connections are given up after two seconds.
    pub(crate) fn new() -> Self {
        let mut connector = hyper_util::client::legacy::connect::HttpConnector::new();
        connector.set_connect_timeout(Some(Duration::from_secs(2)));
        connector.set_nodelay(true);
        let client =
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                // Less than an ingress keeps an idle connection (10 s),
                // so none is reused as the node closes it.
                .pool_idle_timeout(Duration::from_secs(5))
                .pool_max_idle_per_host(64)
                .build(connector);
        Forwarder {
            client,
            suspects: Mutex::default(),
        }
    }

    fn suspects(&self) -> std::sync::MutexGuard<'_, HashMap<SocketAddr, Instant>> {
        self.suspects.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether `addr` refused a connection within [`SUSPECT_FOR`].
    fn is_suspect(&self, addr: SocketAddr) -> bool {
        let mut suspects = self.suspects();
        match suspects.get(&addr) {
            Some(until) if Instant::now() < *until => true,
            Some(_) => {
                suspects.remove(&addr);
                false
            }
            None => false,
        }
    }
}

/// How a forwarded request went.
enum Forwarded<B> {
    /// The node's answer, or a 502/504 saying what went wrong.
    Answered(http::Response<Body>),
    /// The node's ingress took no connection and the request, which has
    /// no body, was kept: another task may serve it.
    Refused(String, http::Request<B>),
}

/// Marks a request the server's ingress forwarded to a node.
const HOP_HEADER: &str = "x-wharf-forwarded";

/// How long a node whose ingress refused a connection is passed over.
const SUSPECT_FOR: Duration = Duration::from_secs(2);

/// The hop-by-hop headers a proxy does not pass on (RFC 9110 7.6.1).
const HOP_BY_HOP: [&str; 8] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "upgrade",
];

/// One task of an HTTP service that serves requests.
pub(crate) struct HttpTask {
    pub(crate) id: String,
    pub(crate) service: String,
    target: Target,
    pub(crate) settings: HttpSettings,
    /// Requests whose instance is not yet gone.
    in_flight: AtomicU64,
    idle: Notify,
    counters: Mutex<Counters>,
    metrics: Metrics,
}

impl std::fmt::Debug for HttpTask {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpTask")
            .field("id", &self.id)
            .field("service", &self.service)
            .finish_non_exhaustive()
    }
}

/// Ends a request's hold on its task when the instance is gone.
struct InFlight(Arc<HttpTask>);

impl Drop for InFlight {
    fn drop(&mut self) {
        if self.0.in_flight.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.idle.notify_waiters();
        }
        self.0
            .metrics
            .ingress_in_flight
            .with_label_values(&[&self.0.service])
            .dec();
    }
}

impl HttpTask {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        id: String,
        service: String,
        artifact: Arc<Artifact>,
        spec: TaskSpec,
        settings: HttpSettings,
        address_ok: AddressCheck,
        executor: Executor,
        metrics: Metrics,
    ) -> Arc<Self> {
        // Checked at registration; a rule that no longer parses is dropped
        // (closed is the safe side).
        let outbound: Vec<OutboundRule> = settings
            .allowed_outbound_hosts
            .iter()
            .filter_map(|h| OutboundRule::parse(h).ok())
            .collect();
        Arc::new(HttpTask {
            id,
            service,
            target: Target::Local {
                artifact,
                spec: Arc::new(spec),
                outbound: outbound.into(),
                address_ok,
                executor,
            },
            settings,
            in_flight: AtomicU64::new(0),
            idle: Notify::new(),
            counters: Mutex::default(),
            metrics,
        })
    }

    /// A task running on edge node `node`, whose ingress at `addr` serves
    /// it: requests are forwarded there.
    pub(crate) fn remote(
        id: String,
        service: String,
        settings: HttpSettings,
        node: Arc<crate::fleet::RemoteNode>,
        addr: SocketAddr,
        forwarder: Arc<Forwarder>,
        metrics: Metrics,
    ) -> Arc<Self> {
        Arc::new(HttpTask {
            id,
            service,
            target: Target::Remote {
                node,
                addr,
                forwarder,
            },
            settings,
            in_flight: AtomicU64::new(0),
            idle: Notify::new(),
            counters: Mutex::default(),
            metrics,
        })
    }

    /// Requests in flight (the balancer's load measure).
    pub(crate) fn load(&self) -> u64 {
        self.in_flight.load(Ordering::Acquire)
    }

    /// Serves one request in a fresh instance, on the executor's guest
    /// threads. `Err` when the task or the node cannot take it now (the
    /// caller tries another task or answers 503).
    pub(crate) async fn serve<B>(
        self: &Arc<Self>,
        request: http::Request<B>,
    ) -> Result<http::Response<Body>, (NotTaken, http::Request<B>)>
    where
        B: http_body::Body<Data = Bytes> + Send + 'static,
        B::Error: Into<wharf_runtime::HttpError>,
    {
        self.serve_counted(request, true).await
    }

    /// [`serve`](Self::serve); `count: false` keeps the request out of
    /// the task's answer counts and latencies (health checks).
    async fn serve_counted<B>(
        self: &Arc<Self>,
        request: http::Request<B>,
        count: bool,
    ) -> Result<http::Response<Body>, (NotTaken, http::Request<B>)>
    where
        B: http_body::Body<Data = Bytes> + Send + 'static,
        B::Error: Into<wharf_runtime::HttpError>,
    {
        if let Target::Remote {
            node,
            addr,
            forwarder,
        } = &self.target
        {
            // Never to an address the server no longer accepts for the
            // node (it moved, or is refused now).
            if node.ingress() != Some(*addr) {
                let why = format!("node {}'s ingress is no longer {addr}", node.name);
                return Err((NotTaken::Node(why), request));
            }
            if forwarder.is_suspect(*addr) {
                let why = format!("node {}'s ingress at {addr} did not answer", node.name);
                return Err((NotTaken::Node(why), request));
            }
            // A request the server's ingress forwarded once is not
            // forwarded again (a node pointing back at a server).
            if request.headers().contains_key(HOP_HEADER) {
                return Ok(text_response(
                    508,
                    format!(
                        "loop: this request was forwarded to node {} before\n",
                        node.name
                    ),
                ));
            }
        }
        // Take a place first, so two requests cannot both see the last one.
        let max = u64::from(self.settings.max_concurrency);
        if self.in_flight.fetch_add(1, Ordering::AcqRel) >= max {
            self.in_flight.fetch_sub(1, Ordering::AcqRel);
            self.lock().refused += 1;
            return Err((NotTaken::Full, request));
        }
        self.metrics
            .ingress_in_flight
            .with_label_values(&[&self.service])
            .inc();
        // Held by the instance (until it is gone) and by this call (until
        // the answer is counted): the task is idle only when both let go.
        let place = Arc::new(InFlight(self.clone()));
        let counted = place.clone();
        let (artifact, spec, outbound, address_ok, executor) = match &self.target {
            Target::Local {
                artifact,
                spec,
                outbound,
                address_ok,
                executor,
            } => (artifact, spec, outbound, address_ok, executor),
            Target::Remote { .. } => {
                let began = Instant::now();
                let forwarded = self.forward(request).await;
                drop((place, counted));
                return match forwarded {
                    Forwarded::Answered(response) => {
                        if count {
                            self.record(response.status().as_u16(), began.elapsed());
                        }
                        Ok(response)
                    }
                    Forwarded::Refused(why, request) => Err((NotTaken::Node(why), request)),
                };
            }
        };
        let admission = match executor.try_admit(spec.limits.memory) {
            Ok(a) => a,
            Err(e) => {
                drop((place, counted));
                return Err((NotTaken::Node(e.to_string()), request));
            }
        };
        self.metrics
            .ingress_instances
            .with_label_values(&[&self.service])
            .inc();
        let this = self.clone();
        let on_end = Box::new(move |end: GuestEnd| {
            drop(admission);
            let mut c = this.lock();
            if let Some(fuel) = end.fuel_consumed {
                c.fuel = c.fuel.saturating_add(fuel);
                this.metrics
                    .ingress_fuel
                    .with_label_values(&[&this.service])
                    .observe(fuel as f64);
            }
            if end.outbound_denied > 0 {
                c.outbound_denied += u64::from(end.outbound_denied);
                this.metrics
                    .outbound_denied
                    .with_label_values(&[&this.service])
                    .inc_by(u64::from(end.outbound_denied));
            }
            drop(c);
            drop(place);
        });
        let (method, path) = (request.method().clone(), request.uri().path().to_owned());
        let runtime = executor.runtime().clone();
        let (artifact, spec, outbound, address_ok) = (
            artifact.clone(),
            spec.clone(),
            outbound.clone(),
            address_ok.clone(),
        );
        let stdio = spec.stdio.clone();
        let joined = executor
            .spawn_beside(async move {
                runtime
                    .handle_http_with(
                        &artifact,
                        &spec,
                        request,
                        HttpOptions {
                            outbound,
                            address_ok: Some(address_ok),
                            on_end: Some(on_end),
                        },
                    )
                    .await
            })
            .await;
        let (response, outcome) = match joined {
            Ok(r) => r,
            Err(e) => {
                let response = text_response(500, format!("internal error: {e}\n"));
                return Ok(response);
            }
        };
        let status = response.status().as_u16();
        if count {
            self.record(status, outcome.duration);
        }
        if let Some(code) = outcome.stop_code
            && let wharf_runtime::Stdio::Capture(logs) = &stdio
        {
            logs.write(
                wharf_runtime::Stream::Stderr,
                format!(
                    "wharf: {method} {path} ended {code} ({status}): {}\n",
                    outcome.message
                )
                .as_bytes(),
            );
        }
        drop(counted);
        Ok(response)
    }

    /// Counts an answer and its latency.
    fn record(&self, status: u16, took: Duration) {
        let mut c = self.lock();
        c.classes[usize::from((status / 100).clamp(1, 5) - 1)] += 1;
        if c.latencies_ms.len() == LATENCY_WINDOW {
            c.latencies_ms.pop_front();
        }
        c.latencies_ms.push_back(took.as_secs_f64() * 1000.0);
    }

    /// Sends a request to the node's ingress.
    async fn forward<B>(&self, request: http::Request<B>) -> Forwarded<B>
    where
        B: http_body::Body<Data = Bytes> + Send + 'static,
        B::Error: Into<wharf_runtime::HttpError>,
    {
        let Target::Remote {
            node,
            addr,
            forwarder,
        } = &self.target
        else {
            unreachable!("forward is for remote tasks");
        };
        let node = &node.name;
        let (mut parts, body) = request.into_parts();
        // A request without a body is kept until the node takes it, so
        // another task can serve it if the node's ingress is gone.
        let kept = body.is_end_stream().then(|| {
            let mut again = http::Request::new(());
            *again.method_mut() = parts.method.clone();
            *again.uri_mut() = parts.uri.clone();
            *again.version_mut() = parts.version;
            *again.headers_mut() = parts.headers.clone();
            again
        });
        if !parts.headers.contains_key(http::header::HOST)
            && let Some(authority) = parts.uri.authority()
            && let Ok(v) = http::HeaderValue::from_str(authority.as_str())
        {
            parts.headers.insert(http::header::HOST, v);
        }
        for name in HOP_BY_HOP {
            parts.headers.remove(name);
        }
        parts
            .headers
            .insert(HOP_HEADER, http::HeaderValue::from_static("1"));
        let path = parts
            .uri
            .path_and_query()
            .map_or("/", |p| p.as_str())
            .to_owned();
        parts.uri = match format!("http://{addr}{path}").parse() {
            Ok(u) => u,
            Err(e) => {
                return Forwarded::Answered(text_response(
                    400,
                    format!("bad request target: {e}\n"),
                ));
            }
        };
        parts.version = http::Version::HTTP_11;
        let (sent, kept) = match kept {
            Some(again) => (
                http_body_util::Empty::new()
                    .map_err(|never: std::convert::Infallible| match never {})
                    .boxed_unsync(),
                Some(again.map(|()| body)),
            ),
            None => (
                body.map_err(|e| {
                    std::io::Error::other(format!(
                        "{:?}",
                        Into::<wharf_runtime::HttpError>::into(e)
                    ))
                })
                .boxed_unsync(),
                None,
            ),
        };
        let request = http::Request::from_parts(parts, sent);
        // The node ends the request at its timeout (504); this bounds a
        // node that stops answering.
        let limit =
            Duration::from_millis(self.settings.request_timeout_ms) + Duration::from_secs(5);
        let answer = tokio::time::timeout(limit, forwarder.client.request(request)).await;
        let response = match answer {
            Ok(Ok(response)) => {
                let (mut parts, body) = response.into_parts();
                for name in HOP_BY_HOP {
                    parts.headers.remove(name);
                }
                let body = body
                    .map_err(|_| wharf_runtime::HttpError::HttpProtocolError)
                    .boxed_unsync();
                http::Response::from_parts(parts, body)
            }
            Ok(Err(e)) => {
                if e.is_connect() {
                    forwarder
                        .suspects()
                        .insert(*addr, Instant::now() + SUSPECT_FOR);
                    let why = format!("node {node}'s ingress at {addr} did not answer");
                    if let Some(request) = kept {
                        return Forwarded::Refused(why, request);
                    }
                }
                tracing::warn!(task = %self.id, node = %node, %addr, error = %e, "forwarding to a node's ingress failed");
                text_response(
                    502,
                    format!("node {node}'s ingress at {addr} did not answer\n"),
                )
            }
            Err(_) => text_response(
                504,
                format!(
                    "node {node}'s ingress at {addr} did not answer within {}s\n",
                    limit.as_secs()
                ),
            ),
        };
        Forwarded::Answered(response)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Counters> {
        self.counters.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// What the task has served so far.
    pub(crate) fn stats(&self) -> (HttpStats, u64) {
        let c = self.lock();
        let mut responses = BTreeMap::new();
        for (i, n) in c.classes.iter().enumerate() {
            if *n > 0 {
                responses.insert(format!("{}xx", i + 1), *n);
            }
        }
        let mut sorted: Vec<f64> = c.latencies_ms.iter().copied().collect();
        sorted.sort_by(f64::total_cmp);
        let pct = |p: f64| {
            (!sorted.is_empty()).then(|| {
                let i = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
                (sorted[i] * 1000.0).round() / 1000.0
            })
        };
        (
            HttpStats {
                responses,
                in_flight: self.load(),
                refused: c.refused,
                outbound_denied: c.outbound_denied,
                latency_p50_ms: pct(0.5),
                latency_p99_ms: pct(0.99),
            },
            c.fuel,
        )
    }

    /// Waits until no request is in flight, or `limit` passes. Returns
    /// how many were still in flight.
    pub(crate) async fn drain(&self, limit: Duration) -> u64 {
        let deadline = Instant::now() + limit;
        loop {
            let idle = self.idle.notified();
            tokio::pin!(idle);
            idle.as_mut().enable();
            let n = self.load();
            if n == 0 {
                return 0;
            }
            if tokio::time::timeout_at(deadline.into(), idle)
                .await
                .is_err()
            {
                return self.load();
            }
        }
    }

    /// Checks `path` (if any) until it answers 2xx: `Err` with the outcome
    /// to end with if `grace` passes first, or a stop comes.
    pub(crate) async fn become_healthy(
        self: &Arc<Self>,
        path: Option<&str>,
        grace: Duration,
        stop: &StopSignal,
    ) -> Result<(), Outcome> {
        let Some(path) = path else {
            return Ok(());
        };
        let deadline = Instant::now() + grace;
        loop {
            let checked = tokio::select! {
                biased;
                () = stop.wait() => {
                    return Err(Outcome::not_started(StopCode::UserStopped, "stopped before its health check passed"));
                }
                checked = self.check_health(path) => checked,
            };
            match checked {
                Ok(()) => return Ok(()),
                Err(why) if Instant::now() >= deadline => {
                    return Err(Outcome::not_started(
                        StopCode::FailedToStart,
                        format!(
                            "its health check did not pass within {}: {why}",
                            humantime::format_duration(grace)
                        ),
                    ));
                }
                Err(_) => tokio::time::sleep(HEALTH_CHECK_EVERY).await,
            }
        }
    }

    /// Once the task takes no new requests: lets those in flight finish
    /// (up to `delay`, the rest noted in `logs`); the outcome of a task
    /// that ran since `running`.
    pub(crate) async fn wind_down(
        &self,
        delay: Duration,
        running: Instant,
        logs: &LogBuffer,
    ) -> Outcome {
        let left = self.drain(delay).await;
        if left > 0 {
            logs.write(
                wharf_runtime::Stream::Stderr,
                format!(
                    "wharf: {left} requests were still in flight after the deregistration delay of {}s\n",
                    delay.as_secs()
                )
                .as_bytes(),
            );
        }
        let (_, fuel) = self.stats();
        let mut outcome = Outcome::not_started(StopCode::UserStopped, "");
        outcome.fuel_consumed = fuel;
        outcome.duration_ms = running.elapsed().as_secs_f64() * 1000.0;
        outcome
    }

    /// One `GET` of the health check path: `Ok` on 2xx, else why not.
    pub(crate) async fn check_health(self: &Arc<Self>, path: &str) -> Result<(), String> {
        let request = http::Request::get(path)
            .header(http::header::HOST, "localhost")
            .header(http::header::USER_AGENT, "wharf-health-check")
            .body(http_body_util::Empty::<Bytes>::new())
            .map_err(|e| e.to_string())?;
        match self.serve_counted(request, false).await {
            Ok(r) if r.status().is_success() => Ok(()),
            Ok(r) => {
                let code = r
                    .headers()
                    .get(STOP_CODE_HEADER)
                    .and_then(|v| v.to_str().ok())
                    .map(|c| format!(" ({c})"))
                    .unwrap_or_default();
                Err(format!("GET {path} answered {}{code}", r.status().as_u16()))
            }
            Err((NotTaken::Full, _)) => Err("the task is at its max_concurrency".into()),
            Err((NotTaken::Node(why), _)) => Err(why),
        }
    }
}

/// The tasks of each HTTP service that take traffic.
#[derive(Debug, Default)]
pub(crate) struct Backends {
    by_service: RwLock<HashMap<String, Arc<[Arc<HttpTask>]>>>,
    /// Woken when a service gains a task (requests held for a service
    /// scaled to zero wait on it).
    pub(crate) added: Notify,
}

impl Backends {
    /// The tasks of `service` that take traffic now.
    pub(crate) fn of(&self, service: &str) -> Arc<[Arc<HttpTask>]> {
        self.by_service
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(service)
            .cloned()
            .unwrap_or_else(|| Arc::from(Vec::new()))
    }

    pub(crate) fn add(&self, task: Arc<HttpTask>) {
        {
            let mut map = self.by_service.write().unwrap_or_else(|p| p.into_inner());
            let mut list: Vec<Arc<HttpTask>> = map
                .get(&task.service)
                .map(|l| l.to_vec())
                .unwrap_or_default();
            list.push(task.clone());
            map.insert(task.service.clone(), list.into());
        }
        self.added.notify_waiters();
    }

    pub(crate) fn remove(&self, task: &HttpTask) {
        let mut map = self.by_service.write().unwrap_or_else(|p| p.into_inner());
        if let Some(list) = map.get(&task.service) {
            let list: Vec<Arc<HttpTask>> =
                list.iter().filter(|t| t.id != task.id).cloned().collect();
            if list.is_empty() {
                map.remove(&task.service);
            } else {
                map.insert(task.service.clone(), list.into());
            }
        }
    }

    /// In-flight requests of each service (the autoscaler's metric).
    pub(crate) fn load_by_service(&self) -> HashMap<String, (usize, u64)> {
        self.by_service
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(s, l)| (s.clone(), (l.len(), l.iter().map(|t| t.load()).sum())))
            .collect()
    }
}

/// Picks a task by least outstanding requests among two chosen at random
/// (power of two choices): nearly as good as the least loaded of all,
/// without a global scan or herding onto one task.
pub(crate) fn pick(tasks: &[Arc<HttpTask>]) -> Option<&Arc<HttpTask>> {
    match tasks.len() {
        0 => None,
        1 => tasks.first(),
        n => {
            let a = fastrand::usize(..n);
            let mut b = fastrand::usize(..n - 1);
            if b >= a {
                b += 1;
            }
            let (ta, tb) = (&tasks[a], &tasks[b]);
            Some(if tb.load() < ta.load() { tb } else { ta })
        }
    }
}
