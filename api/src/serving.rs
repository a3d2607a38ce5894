//! The tasks of HTTP services as the ingress sees them: each is a server
//! slot holding its component's pre-instantiation, serving up to
//! `max_concurrency` requests at once, each in a fresh instance admitted
//! by the node's executor (a slot of the instance pool and the request's
//! memory limit from the node's budget). [`Backends`] lists, per service,
//! the tasks that take traffic: a task is added once it is `RUNNING`
//! (its health check passed) and removed the moment it is asked to stop,
//! before it drains.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::Notify;
use wharf_runtime::{
    AddressCheck, Artifact, Executor, GuestEnd, HttpOptions, OutboundRule, STOP_CODE_HEADER,
    TaskSpec, text_response,
};

use crate::metrics::Metrics;
use crate::model::{HttpSettings, HttpStats};

/// The response body type of the `wasi:http` host.
pub(crate) type Body = wharf_runtime::HttpBody;

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

/// One task of an HTTP service that serves requests.
pub(crate) struct HttpTask {
    pub(crate) id: String,
    pub(crate) service: String,
    artifact: Arc<Artifact>,
    spec: Arc<TaskSpec>,
    outbound: Arc<[OutboundRule]>,
    address_ok: AddressCheck,
    pub(crate) settings: HttpSettings,
    /// Requests whose instance is not yet gone.
    in_flight: AtomicU64,
    idle: Notify,
    counters: Mutex<Counters>,
    executor: Executor,
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
            artifact,
            spec: Arc::new(spec),
            outbound: outbound.into(),
            address_ok,
            settings,
            in_flight: AtomicU64::new(0),
            idle: Notify::new(),
            counters: Mutex::default(),
            executor,
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
        let admission = match self.executor.try_admit(self.spec.limits.memory) {
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
        let runtime = self.executor.runtime().clone();
        let (artifact, spec, outbound, address_ok) = (
            self.artifact.clone(),
            self.spec.clone(),
            self.outbound.clone(),
            self.address_ok.clone(),
        );
        let joined = self
            .executor
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
            let mut c = self.lock();
            c.classes[usize::from((status / 100).clamp(1, 5) - 1)] += 1;
            if c.latencies_ms.len() == LATENCY_WINDOW {
                c.latencies_ms.pop_front();
            }
            c.latencies_ms
                .push_back(outcome.duration.as_secs_f64() * 1000.0);
        }
        if let Some(code) = outcome.stop_code
            && let wharf_runtime::Stdio::Capture(logs) = &self.spec.stdio
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
