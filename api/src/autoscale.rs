//! Autoscaling of HTTP services: target tracking on the average number of
//! requests in flight per task, measured by the ingress, and scale to and
//! from zero.
//!
//! Each pass (once a second, beside the reconciler) turns what the
//! ingress saw into one number per service — the average concurrency over
//! the last interval by Little's law (the sum of request times divided by
//! the interval), or the requests in flight now if that is higher — and
//! sets the desired count to `ceil(concurrency / target)` within
//! `[min, max]`. Scaling out happens at once; scaling in waits for the
//! cooldown since the last change; a service with `min = 0` goes to zero
//! only after `idle_to_zero` without a request. Every decision is a
//! service event carrying the value that caused it.
//!
//! A request to a service at zero is held by the ingress (at most
//! [`MAX_HELD`] per service, for at most [`HOLD_TIMEOUT`]) while the
//! service scales to one; compiled code is cached, so this costs a task
//! start.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use dashmap::DashMap;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::control::Control;
use crate::error::{ApiError, Result};
use crate::serving::HttpTask;

/// Requests held per service while it scales from zero; more get 503.
pub const MAX_HELD: u64 = 1_000;
/// How long a held request waits for the first task.
pub const HOLD_TIMEOUT: Duration = Duration::from_secs(30);

/// A service's autoscaling policy (`PATCH /v1/services/{name}` with
/// `autoscaling`; `null` turns it off).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Autoscaling {
    /// The fewest tasks (0: scale to zero when idle).
    pub min: u32,
    /// The most tasks.
    pub max: u32,
    /// Requests in flight per task to aim for.
    pub target_inflight: f64,
    /// Milliseconds after a change before scaling in (default 60 s).
    #[serde(default = "default_cooldown")]
    pub scale_in_cooldown_ms: u64,
    /// Milliseconds without a request before a `min = 0` service goes to
    /// zero (default 5 min).
    #[serde(default = "default_idle")]
    pub idle_to_zero_ms: u64,
}

fn default_cooldown() -> u64 {
    60_000
}

fn default_idle() -> u64 {
    300_000
}

impl Autoscaling {
    /// Checks the policy; errors name the field.
    pub fn check(&self) -> Result<()> {
        if self.max == 0 || self.max > crate::services::MAX_DESIRED {
            return Err(ApiError::invalid(
                "autoscaling.max",
                format!("must be 1 to {}", crate::services::MAX_DESIRED),
            ));
        }
        if self.min > self.max {
            return Err(ApiError::invalid(
                "autoscaling.min",
                "must be at most autoscaling.max",
            ));
        }
        if !(self.target_inflight.is_finite() && self.target_inflight > 0.0) {
            return Err(ApiError::invalid(
                "autoscaling.target_inflight",
                "must be a number above 0",
            ));
        }
        Ok(())
    }

    /// The desired count for `concurrency` requests in flight on average.
    pub fn desired_for(&self, concurrency: f64) -> u32 {
        let want = (concurrency / self.target_inflight).ceil();
        let want = if want.is_finite() && want > 0.0 {
            want.min(f64::from(self.max)) as u32
        } else {
            0
        };
        want.clamp(self.min, self.max)
    }
}

/// What the ingress saw of one service since the last pass.
#[derive(Debug, Default)]
pub(crate) struct Traffic {
    /// Microseconds of request time ended in this interval.
    busy_us: AtomicU64,
    /// Requests ended in this interval.
    requests: AtomicU64,
    /// Requests held while the service scales from zero.
    pub(crate) held: AtomicU64,
    /// When the last request began, in ms after [`epoch`] (0: never).
    last_request_ms: AtomicU64,
}

/// The instant `last_request_ms` counts from (the first use).
fn epoch() -> Instant {
    static EPOCH: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

impl Traffic {
    /// How long ago the last request began, if one did.
    fn idle_for(&self, now: Instant) -> Option<Duration> {
        match self.last_request_ms.load(Ordering::Relaxed) {
            0 => None,
            ms => Some(now.saturating_duration_since(epoch() + Duration::from_millis(ms - 1))),
        }
    }
}

/// Per-service traffic, written by the ingress, read by the autoscaler.
#[derive(Debug, Default)]
pub(crate) struct TrafficBook {
    by_service: DashMap<String, Arc<Traffic>>,
}

impl TrafficBook {
    pub(crate) fn of(&self, service: &str) -> Arc<Traffic> {
        if let Some(t) = self.by_service.get(service) {
            return t.clone();
        }
        self.by_service
            .entry(service.to_owned())
            .or_default()
            .clone()
    }

    /// Books a request that began (lock-free: one store per request).
    pub(crate) fn began(&self, service: &str) {
        let ms = epoch().elapsed().as_millis() as u64 + 1;
        self.of(service)
            .last_request_ms
            .store(ms, Ordering::Relaxed);
    }

    /// Books a request that ended after `took`.
    pub(crate) fn ended(&self, service: &str, took: Duration) {
        let t = self.of(service);
        t.busy_us
            .fetch_add(took.as_micros() as u64, Ordering::Relaxed);
        t.requests.fetch_add(1, Ordering::Relaxed);
    }
}

/// The autoscaler's memory of one service between passes.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ScalerState {
    last_change: Instant,
    last_pass: Instant,
}

impl Default for ScalerState {
    fn default() -> Self {
        let now = Instant::now();
        ScalerState {
            last_change: now,
            last_pass: now,
        }
    }
}

impl Control {
    /// One autoscaling pass over every service with a policy.
    pub(crate) async fn autoscale(&self) {
        let loads = self.tasks.backends().load_by_service();
        let mut changes = Vec::new();
        {
            let services = self.services.lock().await;
            for state in services.values() {
                let service = state.service();
                let Some(policy) = &service.autoscaling else {
                    continue;
                };
                if service.status != crate::model::ServiceStatus::Active {
                    continue;
                }
                let name = &service.name;
                let traffic = self.traffic.of(name);
                let mut scaler = self.scalers.entry(name.clone()).or_default();
                let now = Instant::now();
                let interval = now
                    .duration_since(scaler.last_pass)
                    .max(Duration::from_millis(1));
                scaler.last_pass = now;
                let busy = traffic.busy_us.swap(0, Ordering::Relaxed) as f64 / 1e6;
                let requests = traffic.requests.swap(0, Ordering::Relaxed);
                let (tasks, in_flight) = loads.get(name).copied().unwrap_or((0, 0));
                let held = traffic.held.load(Ordering::Relaxed);
                let concurrency = (busy / interval.as_secs_f64()).max((in_flight + held) as f64);
                let per_task = concurrency / tasks.max(1) as f64;
                let rate = requests as f64 / interval.as_secs_f64() / tasks.max(1) as f64;
                self.metrics
                    .autoscaler_inflight
                    .with_label_values(&[name])
                    .set(per_task);
                self.metrics
                    .autoscaler_rate
                    .with_label_values(&[name])
                    .set(rate);
                let current = service.desired_count;
                let mut want = policy.desired_for(concurrency);
                let idle_for = traffic.idle_for(now);
                let idle_long =
                    idle_for.is_none_or(|d| d >= Duration::from_millis(policy.idle_to_zero_ms));
                // Zero only after the idle period; until then, one task.
                if want == 0 && current > 0 && !idle_long {
                    want = 1;
                }
                let cooled = now.duration_since(scaler.last_change)
                    >= Duration::from_millis(policy.scale_in_cooldown_ms);
                let change = if want > current {
                    Some(format!(
                        "average in-flight {per_task:.2} per task (target {}) over {} task{}",
                        policy.target_inflight,
                        tasks,
                        if tasks == 1 { "" } else { "s" }
                    ))
                } else if want < current && want == 0 {
                    idle_long.then(|| {
                        format!(
                            "no request for {}",
                            humantime::format_duration(Duration::from_secs(
                                idle_for.map_or(0, |d| d.as_secs())
                            ))
                        )
                    })
                } else if want < current && cooled {
                    Some(format!(
                        "average in-flight {per_task:.2} per task (target {}) after the cooldown",
                        policy.target_inflight
                    ))
                } else {
                    None
                };
                if let Some(why) = change {
                    scaler.last_change = now;
                    changes.push((name.clone(), current, want, why));
                }
            }
        }
        for (name, from, to, why) in changes {
            let _ = self
                .set_desired(&name, to, &format!("autoscaled from {from} to {to}: {why}"))
                .await;
        }
    }

    /// For a request to a service with no task taking traffic: holds it
    /// while a service that may scale to zero starts a task, and returns
    /// the tasks then; `None` (503) for other services, when the hold
    /// queue is full, or after [`HOLD_TIMEOUT`].
    pub(crate) async fn hold_for_scale_from_zero(
        &self,
        service: &str,
    ) -> Option<Arc<[Arc<HttpTask>]>> {
        let zero_ok = {
            let services = self.services.lock().await;
            let s = services.get(service)?.service();
            s.status == crate::model::ServiceStatus::Active
                && s.autoscaling.as_ref().is_some_and(|a| a.min == 0)
                && s.desired_count <= 1
        };
        if !zero_ok {
            return None;
        }
        let traffic = self.traffic.of(service);
        if traffic.held.fetch_add(1, Ordering::AcqRel) >= MAX_HELD {
            traffic.held.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        let gauge = self.metrics.ingress_queued.with_label_values(&[service]);
        gauge.inc();
        let _ = self
            .set_desired_at_least(service, 1, "scaled from zero: a request arrived")
            .await;
        let backends = self.tasks.backends();
        let deadline = Instant::now() + HOLD_TIMEOUT;
        let found = loop {
            let added = backends.added.notified();
            tokio::pin!(added);
            added.as_mut().enable();
            let tasks = backends.of(service);
            if !tasks.is_empty() {
                break Some(tasks);
            }
            if tokio::time::timeout_at(deadline.into(), added)
                .await
                .is_err()
            {
                break None;
            }
        };
        gauge.dec();
        traffic.held.fetch_sub(1, Ordering::AcqRel);
        found
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(min: u32, max: u32, target: f64) -> Autoscaling {
        Autoscaling {
            min,
            max,
            target_inflight: target,
            scale_in_cooldown_ms: default_cooldown(),
            idle_to_zero_ms: default_idle(),
        }
    }

    #[test]
    fn the_desired_count_tracks_the_target_within_bounds() {
        let p = policy(0, 20, 8.0);
        assert_eq!(p.desired_for(0.0), 0);
        assert_eq!(p.desired_for(0.1), 1);
        assert_eq!(p.desired_for(8.0), 1);
        assert_eq!(p.desired_for(8.1), 2);
        assert_eq!(p.desired_for(1e9), 20);
        assert_eq!(p.desired_for(f64::NAN), 0);
        assert_eq!(policy(2, 5, 1.0).desired_for(0.0), 2);
        assert!(policy(3, 2, 1.0).check().is_err());
        assert!(policy(0, 2, 0.0).check().is_err());
        assert!(policy(0, 0, 1.0).check().is_err());
        assert!(policy(0, 2, 0.5).check().is_ok());
    }
}
