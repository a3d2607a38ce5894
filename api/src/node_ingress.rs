//! An edge node's ingress (`wharf node join --ingress ADDR`): the same
//! listener, routing and balancing as the server's ([`crate::ingress`]),
//! over the HTTP tasks that run on the node, by the routes the server
//! sends with every sync. Edge traffic stays at the edge; the server's
//! ingress forwards its share of a service's requests here too.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use tokio::sync::watch;
use wharf_runtime::{AddressCheck, Artifact, Executor, LogBuffer, Outcome, StopSignal, TaskSpec};

use crate::ingress::{Gateway, Route, RouteTable};
use crate::metrics::Metrics;
use crate::model::{HttpSettings, HttpStats};
use crate::serving::{Backends, HttpTask};

/// The ingress of an edge node.
pub struct NodeIngress {
    routes: RwLock<Arc<RouteTable>>,
    backends: Backends,
    metrics: Metrics,
    executor: Executor,
    address_ok: AddressCheck,
}

impl std::fmt::Debug for NodeIngress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeIngress").finish_non_exhaustive()
    }
}

impl Gateway for NodeIngress {
    fn route_table(&self) -> Arc<RouteTable> {
        self.routes
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn backends(&self) -> &Backends {
        &self.backends
    }

    fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// A node does not scale services: no task, no answer but 503.
    fn wait_for_backend(
        self: &Arc<Self>,
        _service: &str,
    ) -> impl Future<Output = Option<Arc<[Arc<HttpTask>]>>> + Send {
        std::future::ready(None)
    }
}

impl NodeIngress {
    /// An ingress whose tasks run on `executor`; their components may
    /// connect out only to addresses `address_ok` accepts.
    pub fn new(executor: Executor, address_ok: AddressCheck) -> Arc<Self> {
        Arc::new(NodeIngress {
            routes: RwLock::default(),
            backends: Backends::default(),
            metrics: Metrics::new(),
            executor,
            address_ok,
        })
    }

    /// Replaces the routes (service → its routes, as the server sent
    /// them); routes that do not parse are left out.
    pub fn set_routes(&self, routes: &BTreeMap<String, Vec<String>>) {
        let table = routes
            .iter()
            .flat_map(|(service, rs)| {
                rs.iter()
                    .filter_map(|r| Route::parse(r).ok())
                    .map(|r| (r, service.clone()))
                    .collect::<Vec<_>>()
            })
            .collect();
        *self.routes.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(RouteTable::new(table));
    }

    /// Serves on `listener` until `shutdown` turns true.
    pub async fn serve(
        self: Arc<Self>,
        listener: tokio::net::TcpListener,
        shutdown: watch::Receiver<bool>,
    ) {
        crate::ingress::serve(self, listener, shutdown).await;
    }

    /// A task of `service` that serves with `artifact`; it takes traffic
    /// once [`open`](ServingTask::open)ed.
    pub fn task(
        self: &Arc<Self>,
        id: String,
        service: String,
        artifact: Arc<Artifact>,
        spec: TaskSpec,
        settings: HttpSettings,
    ) -> ServingTask {
        ServingTask {
            task: HttpTask::new(
                id,
                service,
                artifact,
                spec,
                settings,
                self.address_ok.clone(),
                self.executor.clone(),
                self.metrics.clone(),
            ),
            ingress: self.clone(),
        }
    }
}

/// One HTTP task on a node's ingress.
#[derive(Debug)]
pub struct ServingTask {
    task: Arc<HttpTask>,
    ingress: Arc<NodeIngress>,
}

impl ServingTask {
    /// Checks `path` (if any) until it answers 2xx: `Err` with the
    /// outcome to end with if `grace` passes first, or a stop comes.
    pub async fn become_healthy(
        &self,
        path: Option<&str>,
        grace: Duration,
        stop: &StopSignal,
    ) -> Result<(), Outcome> {
        self.task.become_healthy(path, grace, stop).await
    }

    /// Takes traffic from now on.
    pub fn open(&self) {
        self.ingress.backends.add(self.task.clone());
    }

    /// Takes no new requests from now on.
    pub fn close(&self) {
        self.ingress.backends.remove(&self.task);
    }

    /// Takes no new requests, lets those in flight finish (up to
    /// `delay`, the rest noted in `logs`); the outcome of a task that ran
    /// since `running`.
    pub async fn wind_down(&self, delay: Duration, running: Instant, logs: &LogBuffer) -> Outcome {
        self.close();
        self.task.wind_down(delay, running, logs).await
    }

    /// What it served so far.
    pub fn stats(&self) -> HttpStats {
        self.task.stats().0
    }
}

impl Drop for ServingTask {
    fn drop(&mut self) {
        self.close();
    }
}
