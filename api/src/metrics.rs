//! Prometheus metrics of the control plane, the node and the registry, in
//! one `prometheus::Registry` rendered at `GET /metrics`.

use prometheus::{
    Encoder, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

/// Buckets from 10 µs to 60 s: task starts are microseconds, runs up to
/// minutes.
const LATENCY_BUCKETS: &[f64] = &[
    0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
    0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

/// The metrics.
#[derive(Debug, Clone)]
pub struct Metrics {
    registry: Registry,
    /// Live tasks by status.
    pub tasks: IntGaugeVec,
    /// Tasks that took a slot.
    pub task_starts: IntCounter,
    /// Stopped tasks by stop code.
    pub task_stops: IntCounterVec,
    /// Run time of stopped tasks.
    pub task_duration: Histogram,
    /// Time from accepting a task to its slot (fetch, compile when cold,
    /// queueing, then instantiation).
    pub task_start_latency: Histogram,
    /// Time to instantiate a task in its sandbox.
    pub instantiate: Histogram,
    /// Fuel consumed by stopped tasks.
    pub fuel_consumed: IntCounter,
    /// Registry bytes by direction (`in`: pushed, `out`: pulled).
    pub registry_bytes: IntCounterVec,
    /// API latency by method, route and status.
    pub http_requests: HistogramVec,
    /// Desired tasks per service.
    pub service_desired: IntGaugeVec,
    /// Running tasks per service.
    pub service_running: IntGaugeVec,
    /// Mutating calls refused for want of a valid token (not audited: the
    /// audit log holds authenticated callers only).
    pub unauthenticated: IntCounter,
    /// Bytes of the node's memory budget reserved by admitted tasks.
    pub memory_reserved: IntGauge,
    /// The node's memory budget (0: none).
    pub memory_budget: IntGauge,
    /// Ingress requests by service and status code.
    pub ingress_requests: IntCounterVec,
    /// Ingress latency to the response head, by service.
    pub ingress_duration: HistogramVec,
    /// Ingress requests in flight, by service.
    pub ingress_in_flight: IntGaugeVec,
    /// Requests held while a service scaled to zero starts, by service.
    pub ingress_queued: IntGaugeVec,
    /// Fuel per request, by service.
    pub ingress_fuel: HistogramVec,
    /// Instances created for requests, by service.
    pub ingress_instances: IntCounterVec,
    /// Outbound requests denied, by service.
    pub outbound_denied: IntCounterVec,
    /// The autoscaler's metric: average requests in flight per task.
    pub autoscaler_inflight: GaugeVec,
    /// Requests per second per task, over the autoscaler's last interval.
    pub autoscaler_rate: GaugeVec,
}

/// Fuel buckets from a thousand to ten billion units.
const FUEL_BUCKETS: &[f64] = &[1e3, 1e4, 1e5, 1e6, 1e7, 1e8, 1e9, 1e10];

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Registers every metric.
    pub fn new() -> Self {
        let registry = Registry::new();
        let hist = |name: &str, help: &str| {
            Histogram::with_opts(HistogramOpts::new(name, help).buckets(LATENCY_BUCKETS.to_vec()))
                .expect("valid histogram")
        };
        let m = Metrics {
            tasks: IntGaugeVec::new(
                Opts::new("wharf_tasks", "Tasks on this server by status"),
                &["status"],
            )
            .expect("valid"),
            task_starts: IntCounter::new("wharf_task_starts_total", "Tasks that started")
                .expect("valid"),
            task_stops: IntCounterVec::new(
                Opts::new("wharf_task_stops_total", "Tasks that stopped, by stop code"),
                &["stop_code"],
            )
            .expect("valid"),
            task_duration: hist("wharf_task_duration_seconds", "Run time of stopped tasks"),
            task_start_latency: hist(
                "wharf_task_start_latency_seconds",
                "Time from accepting a task to running it (fetch, compile if cold, queue, instantiate)",
            ),
            instantiate: hist(
                "wharf_task_instantiate_seconds",
                "Time to instantiate a task from its pre-linked artifact",
            ),
            fuel_consumed: IntCounter::new(
                "wharf_task_fuel_consumed_total",
                "Fuel consumed by stopped tasks",
            )
            .expect("valid"),
            registry_bytes: IntCounterVec::new(
                Opts::new("wharf_registry_bytes_total", "Registry bytes by direction"),
                &["direction"],
            )
            .expect("valid"),
            http_requests: HistogramVec::new(
                HistogramOpts::new("wharf_api_request_duration_seconds", "API latency")
                    .buckets(LATENCY_BUCKETS.to_vec()),
                &["method", "route", "status"],
            )
            .expect("valid"),
            service_desired: IntGaugeVec::new(
                Opts::new("wharf_service_desired_tasks", "Desired tasks per service"),
                &["service"],
            )
            .expect("valid"),
            service_running: IntGaugeVec::new(
                Opts::new("wharf_service_running_tasks", "Running tasks per service"),
                &["service"],
            )
            .expect("valid"),
            unauthenticated: IntCounter::new(
                "wharf_unauthenticated_requests_total",
                "Mutating /v1/ and /v2/ calls without a valid token (not audited)",
            )
            .expect("valid"),
            memory_reserved: IntGauge::new(
                "wharf_node_memory_reserved_bytes",
                "Memory reserved by the local node's admitted tasks (their limits)",
            )
            .expect("valid"),
            memory_budget: IntGauge::new(
                "wharf_node_memory_budget_bytes",
                "The local node's memory budget for tasks (0: none)",
            )
            .expect("valid"),
            ingress_requests: IntCounterVec::new(
                Opts::new(
                    "wharf_http_requests_total",
                    "Requests through the ingress, by service and status code",
                ),
                &["service", "code"],
            )
            .expect("valid"),
            ingress_duration: HistogramVec::new(
                HistogramOpts::new(
                    "wharf_http_request_duration_seconds",
                    "Ingress time to the response head, by service",
                )
                .buckets(LATENCY_BUCKETS.to_vec()),
                &["service"],
            )
            .expect("valid"),
            ingress_in_flight: IntGaugeVec::new(
                Opts::new(
                    "wharf_http_requests_in_flight",
                    "Ingress requests being served, by service",
                ),
                &["service"],
            )
            .expect("valid"),
            ingress_queued: IntGaugeVec::new(
                Opts::new(
                    "wharf_http_requests_queued",
                    "Requests held while a service scaled to zero starts",
                ),
                &["service"],
            )
            .expect("valid"),
            ingress_fuel: HistogramVec::new(
                HistogramOpts::new("wharf_http_request_fuel", "Fuel per request, by service")
                    .buckets(FUEL_BUCKETS.to_vec()),
                &["service"],
            )
            .expect("valid"),
            ingress_instances: IntCounterVec::new(
                Opts::new(
                    "wharf_http_instances_total",
                    "Instances created for requests, by service",
                ),
                &["service"],
            )
            .expect("valid"),
            outbound_denied: IntCounterVec::new(
                Opts::new(
                    "wharf_http_outbound_denied_total",
                    "Outbound requests of components that no rule allowed, by service",
                ),
                &["service"],
            )
            .expect("valid"),
            autoscaler_inflight: GaugeVec::new(
                Opts::new(
                    "wharf_service_inflight_per_task",
                    "Average requests in flight per task over the autoscaler's last interval",
                ),
                &["service"],
            )
            .expect("valid"),
            autoscaler_rate: GaugeVec::new(
                Opts::new(
                    "wharf_service_requests_per_second_per_task",
                    "Requests per second per task over the autoscaler's last interval",
                ),
                &["service"],
            )
            .expect("valid"),
            registry,
        };
        for c in [
            Box::new(m.tasks.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(m.task_starts.clone()),
            Box::new(m.task_stops.clone()),
            Box::new(m.task_duration.clone()),
            Box::new(m.task_start_latency.clone()),
            Box::new(m.instantiate.clone()),
            Box::new(m.fuel_consumed.clone()),
            Box::new(m.registry_bytes.clone()),
            Box::new(m.http_requests.clone()),
            Box::new(m.service_desired.clone()),
            Box::new(m.service_running.clone()),
            Box::new(m.unauthenticated.clone()),
            Box::new(m.memory_reserved.clone()),
            Box::new(m.memory_budget.clone()),
            Box::new(m.ingress_requests.clone()),
            Box::new(m.ingress_duration.clone()),
            Box::new(m.ingress_in_flight.clone()),
            Box::new(m.ingress_queued.clone()),
            Box::new(m.ingress_fuel.clone()),
            Box::new(m.ingress_instances.clone()),
            Box::new(m.outbound_denied.clone()),
            Box::new(m.autoscaler_inflight.clone()),
            Box::new(m.autoscaler_rate.clone()),
        ] {
            m.registry.register(c).expect("metric names are unique");
        }
        for status in ["PROVISIONING", "PENDING", "RUNNING"] {
            m.tasks.with_label_values(&[status]).set(0);
        }
        m
    }

    /// Brings a counter that mirrors a running total up to `total`.
    pub fn mirror(counter: &IntCounter, total: u64) {
        let now = counter.get();
        if total > now {
            counter.inc_by(total - now);
        }
    }

    /// The text exposition format.
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut out)
            .expect("metrics encode");
        String::from_utf8(out).expect("metrics are UTF-8")
    }
}
