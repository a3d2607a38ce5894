//! Services: create, scale, update (rolling deployments), delete, and the
//! reconciler that keeps each one at its desired count.
//!
//! The reconciler wakes when a task stops or a service's task starts
//! running, when a service changes, and on a short tick. For each service it compares live tasks with the desired
//! count: it starts tasks of the primary deployment (no more than
//! `maximum_percent` of the desired count in total), retires tasks of
//! older deployments while at least `minimum_healthy_percent` keep
//! running, scales down extra ones (`ScaledDown`), backs off exponentially
//! when tasks keep failing, rolls a failing deployment back (circuit
//! breaker), and records what it does as service events.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, watch};
use utoipa::ToSchema;
use wharf_runtime::StopCode;

use crate::control::Control;
use crate::db::Write;
use crate::error::{ApiError, Result};
use crate::model::{
    self, Deployment, DeploymentStatus, RolloutState, Service, ServiceStatus, Task,
    TaskDefinitionStatus, TaskStatus,
};
use crate::taskdef::check_name;
use crate::tasks::StopReason;

/// The most tasks one service may keep (the node's instance pool is the
/// real bound; this catches typos).
pub const MAX_DESIRED: u32 = 10_000;

/// A task that ran at least this long before failing starts a new
/// failure streak instead of extending one.
const HEALTHY_RUN: Duration = Duration::from_secs(10);

/// A task counts as healthy for a rollout (retiring old tasks, reaching a
/// steady state, completing a deployment) only once it has been RUNNING
/// this long — Kubernetes' `minReadySeconds`. A task that fails at once is
/// RUNNING for an instant, on its own guest thread, and must not complete
/// the deployment that the circuit breaker is about to roll back.
const SETTLE: Duration = Duration::from_secs(1);

fn settled(task: &Task, now: std::time::SystemTime) -> bool {
    task.status == TaskStatus::Running
        && task
            .started_at
            .as_deref()
            .and_then(|at| humantime::parse_rfc3339(at).ok())
            .is_some_and(|at| now.duration_since(at).unwrap_or_default() >= SETTLE)
}

/// Consecutive failed tasks of an in-progress deployment that trip the
/// circuit breaker.
pub const CIRCUIT_BREAKER_FAILURES: u32 = 3;

/// The share of 5xx answers (percent) from an in-progress deployment's
/// HTTP tasks that trips the circuit breaker...
pub const CIRCUIT_BREAKER_5XX_PERCENT: u64 = 50;
/// ...once they have answered at least this many requests.
pub const CIRCUIT_BREAKER_MIN_REQUESTS: u64 = 20;

/// `POST /v1/services`.
#[derive(Debug, Clone, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateServiceRequest {
    /// The service's name.
    pub name: String,
    /// `family` or `family:revision`.
    pub task_definition: String,
    /// Tasks to keep running.
    pub desired_count: u32,
    /// Default 100.
    #[serde(default)]
    pub minimum_healthy_percent: Option<u32>,
    /// Default 200.
    #[serde(default)]
    pub maximum_percent: Option<u32>,
    /// Where the ingress sends requests (`HOST`, `HOST/PATH` or `/PATH`);
    /// HTTP services only.
    #[serde(default)]
    pub routes: Vec<String>,
    /// Placement for the service's tasks, replacing the task definition's
    /// constraints and strategy where given.
    #[serde(default)]
    pub placement: Option<crate::taskdef::PlacementInput>,
}

/// `PATCH /v1/services/{name}`: scale, or deploy a new revision.
#[derive(Debug, Clone, Default, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UpdateServiceRequest {
    /// New desired count.
    #[serde(default)]
    pub desired_count: Option<u32>,
    /// A new task definition: starts a rolling deployment.
    #[serde(default)]
    pub task_definition: Option<String>,
    /// New lower bound of a rolling deployment.
    #[serde(default)]
    pub minimum_healthy_percent: Option<u32>,
    /// New upper bound of a rolling deployment.
    #[serde(default)]
    pub maximum_percent: Option<u32>,
    /// Replaces the service's routes.
    #[serde(default)]
    pub routes: Option<Vec<String>>,
    /// Sets the autoscaling policy; `null` turns it off.
    #[serde(
        default,
        deserialize_with = "present",
        skip_serializing_if = "Option::is_none"
    )]
    #[schema(value_type = Option<crate::autoscale::Autoscaling>)]
    pub autoscaling: Option<Option<crate::autoscale::Autoscaling>>,
}

/// A field that is present (even as `null`) is `Some`.
fn present<'de, D, T>(d: D) -> std::result::Result<Option<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    T::deserialize(d).map(Some)
}

/// The most routes one service may have.
pub const MAX_ROUTES: usize = 32;

/// Checks a service's routes: well formed, only for HTTP services, and
/// held by no other service (409). Returns them in their normal form.
fn check_routes(
    name: &str,
    routes: &[String],
    kind: crate::model::TaskKind,
    services: &std::collections::BTreeMap<String, ServiceState>,
    who: &crate::auth::Principal,
) -> Result<Vec<String>> {
    if routes.len() > MAX_ROUTES {
        return Err(ApiError::invalid(
            "routes",
            format!("a service has at most {MAX_ROUTES} routes"),
        ));
    }
    if !routes.is_empty() && kind != crate::model::TaskKind::Http {
        return Err(ApiError::invalid(
            "routes",
            "only services of kind \"http\" task definitions take routes",
        ));
    }
    let mut out: Vec<String> = Vec::new();
    for text in routes {
        let route = crate::ingress::Route::parse(text.trim())
            .map_err(|e| ApiError::invalid("routes", e))?;
        for other in services.values() {
            if other.service.name == name {
                continue;
            }
            let taken = other
                .service
                .routes
                .iter()
                .any(|r| crate::ingress::Route::parse(r).is_ok_and(|r| r == route));
            if taken {
                // A scoped token is not told another team's service name.
                return Err(ApiError::conflict(if who.repositories.is_empty() {
                    format!(
                        "route {route} already belongs to service {}",
                        other.service.name
                    )
                } else {
                    format!("route {route} already belongs to another service")
                }));
            }
        }
        let shown = route.to_string();
        if !out.contains(&shown) {
            out.push(shown);
        }
    }
    Ok(out)
}

/// The reconciler's memory of a service.
#[derive(Debug)]
pub(crate) struct ServiceState {
    service: Service,
    failures: u32,
    next_start: Option<Instant>,
    steady: bool,
    start_error: Option<String>,
}

impl ServiceState {
    /// The service as stored.
    pub(crate) fn service(&self) -> &Service {
        &self.service
    }
}

fn check_counts(desired: u32, min: u32, max: u32) -> Result<()> {
    if desired > MAX_DESIRED {
        return Err(ApiError::invalid(
            "desired_count",
            format!("must be at most {MAX_DESIRED}"),
        ));
    }
    if min > 100 {
        return Err(ApiError::invalid(
            "minimum_healthy_percent",
            "must be 0 to 100",
        ));
    }
    if !(100..=400).contains(&max) {
        return Err(ApiError::invalid("maximum_percent", "must be 100 to 400"));
    }
    // A rolling deployment needs room to start a new task or to stop an
    // old one; without either it would stall.
    let max_total = u64::from(desired) * u64::from(max) / 100;
    let min_healthy = (u64::from(desired) * u64::from(min)).div_ceil(100);
    if desired > 0 && max_total <= u64::from(desired) && min_healthy >= u64::from(desired) {
        return Err(ApiError::invalid(
            "minimum_healthy_percent",
            format!(
                "{min}% with maximum_percent {max}% leaves a deployment of {desired} tasks no room to start or stop a task: lower minimum_healthy_percent or raise maximum_percent"
            ),
        ));
    }
    Ok(())
}

fn new_deployment(task_definition: &str) -> Deployment {
    let now = model::now();
    Deployment {
        id: format!(
            "ecs-svc-{}",
            &uuid::Uuid::new_v4().simple().to_string()[..16]
        ),
        status: DeploymentStatus::Primary,
        task_definition: task_definition.to_owned(),
        running_count: 0,
        pending_count: 0,
        rollout_state: RolloutState::InProgress,
        rollout_state_reason: "deployment started".into(),
        failed_tasks: 0,
        created_at: now.clone(),
        updated_at: now,
    }
}

impl Control {
    fn event(&self, service: &str, message: String) {
        tracing::info!(service, %message, "service event");
        self.writer.send(Write::Event {
            service: service.to_owned(),
            at: model::now(),
            message,
        });
    }

    /// Loads services from the store (at start).
    pub(crate) async fn load_services(&self) -> Result<()> {
        let mut services = self.services.lock().await;
        for service in self.store.services().await? {
            services.insert(
                service.name.clone(),
                ServiceState {
                    service,
                    failures: 0,
                    next_start: None,
                    steady: false,
                    start_error: None,
                },
            );
        }
        self.rebuild_routes(&services);
        Ok(())
    }

    fn with_counts(&self, mut service: Service) -> Service {
        let live = self.tasks.live_of_service(&service.name);
        let running =
            |t: &&Task| t.status == TaskStatus::Running && t.desired_status == TaskStatus::Running;
        let pending = |t: &&Task| {
            matches!(t.status, TaskStatus::Provisioning | TaskStatus::Pending)
                && t.desired_status == TaskStatus::Running
        };
        let count = |f: &dyn Fn(&&Task) -> bool, d: Option<&str>| {
            live.iter()
                .filter(|t| d.is_none_or(|d| t.deployment_id.as_deref() == Some(d)))
                .filter(f)
                .count() as u32
        };
        service.running_count = count(&running, None);
        service.pending_count = count(&pending, None);
        for d in &mut service.deployments {
            d.running_count = count(&running, Some(&d.id));
            d.pending_count = count(&pending, Some(&d.id));
        }
        service
    }

    /// Creates a service.
    pub async fn create_service(
        &self,
        request: CreateServiceRequest,
        who: &crate::auth::Principal,
    ) -> Result<Service> {
        check_name("name", &request.name)?;
        let min = request.minimum_healthy_percent.unwrap_or(100);
        let max = request.maximum_percent.unwrap_or(200);
        check_counts(request.desired_count, min, max)?;
        let def = self
            .task_definition_for(&request.task_definition, who)
            .await?;
        self.authorize_run(&def, who).await?;
        if def.status == TaskDefinitionStatus::Inactive {
            return Err(ApiError::conflict(format!(
                "task definition {} is INACTIVE",
                def.task_definition
            )));
        }
        let mut services = self.services.lock().await;
        if services.contains_key(&request.name) {
            return Err(ApiError::conflict(format!(
                "service {} already exists",
                request.name
            )));
        }
        let routes = check_routes(&request.name, &request.routes, def.kind, &services, who)?;
        if let Some(p) = &request.placement {
            crate::taskdef::check_placement(p)?;
        }
        let service = Service {
            name: request.name.clone(),
            task_definition: def.task_definition.clone(),
            status: ServiceStatus::Active,
            desired_count: request.desired_count,
            running_count: 0,
            pending_count: 0,
            minimum_healthy_percent: min,
            maximum_percent: max,
            deployments: vec![new_deployment(&def.task_definition)],
            routes,
            autoscaling: None,
            placement: request.placement.clone(),
            created_at: model::now(),
        };
        self.store.put_service(&service).await?;
        self.event(
            &service.name,
            format!(
                "service {} created with {} desired tasks of {}",
                service.name, service.desired_count, service.task_definition
            ),
        );
        services.insert(
            service.name.clone(),
            ServiceState {
                service: service.clone(),
                failures: 0,
                next_start: None,
                steady: false,
                start_error: None,
            },
        );
        self.rebuild_routes(&services);
        drop(services);
        self.wake.notify_one();
        Ok(service)
    }

    /// Every service `who` may see, with its counts.
    pub async fn list_services(&self, who: &crate::auth::Principal) -> Vec<Service> {
        let all = self.all_services().await;
        let mut out = Vec::with_capacity(all.len());
        for service in all {
            if self.sees_service(&service, who).await {
                out.push(service);
            }
        }
        out
    }

    /// Every service with its counts (the lock is released on return).
    async fn all_services(&self) -> Vec<Service> {
        let services = self.services.lock().await;
        services
            .values()
            .map(|s| self.with_counts(s.service.clone()))
            .collect()
    }

    /// Whether `who` may see a service: its task definition is in scope.
    async fn sees_service(&self, service: &Service, who: &crate::auth::Principal) -> bool {
        who.repositories.is_empty()
            || self
                .task_definition_for(&service.task_definition, who)
                .await
                .is_ok()
    }

    /// One service with its counts, if `who` may see it.
    pub async fn service_for(&self, name: &str, who: &crate::auth::Principal) -> Result<Service> {
        let service = self.service(name).await?;
        if self.sees_service(&service, who).await {
            Ok(service)
        } else {
            Err(ApiError::not_found(format!(
                "service {name} does not exist"
            )))
        }
    }

    /// One service with its counts.
    pub async fn service(&self, name: &str) -> Result<Service> {
        let services = self.services.lock().await;
        services
            .get(name)
            .map(|s| self.with_counts(s.service.clone()))
            .ok_or_else(|| ApiError::not_found(format!("service {name} does not exist")))
    }

    /// A service's latest events, newest first.
    pub async fn service_events(&self, name: &str, limit: u32) -> Result<Vec<model::ServiceEvent>> {
        let known = self.services.lock().await.contains_key(name);
        // Queued events reach the store before this read.
        self.writer.commit(Vec::new()).await?;
        let events = self.store.events(name, limit).await?;
        if !known && events.is_empty() {
            return Err(ApiError::not_found(format!(
                "service {name} does not exist"
            )));
        }
        Ok(events)
    }

    /// Scales a service or starts a deployment of a new revision.
    pub async fn update_service(
        &self,
        name: &str,
        request: UpdateServiceRequest,
        who: &crate::auth::Principal,
    ) -> Result<Service> {
        self.service_for(name, who).await?;
        let def = match &request.task_definition {
            Some(t) => {
                let def = self.task_definition_for(t, who).await?;
                self.authorize_run(&def, who).await?;
                Some(def)
            }
            None => None,
        };
        let mut services = self.services.lock().await;
        let state = services
            .get_mut(name)
            .ok_or_else(|| ApiError::not_found(format!("service {name} does not exist")))?;
        if state.service.status == ServiceStatus::Draining {
            return Err(ApiError::conflict(format!(
                "service {name} is being deleted"
            )));
        }
        let mut service = state.service.clone();
        let kind = match &def {
            Some(d) => d.kind,
            None => self.task_definition(&service.task_definition).await?.kind,
        };
        let routes = request.routes.as_ref().unwrap_or(&service.routes).clone();
        let services_view = &*services;
        let routes = check_routes(name, &routes, kind, services_view, who)?;
        let state = services
            .get_mut(name)
            .ok_or_else(|| ApiError::not_found(format!("service {name} does not exist")))?;
        let mut desired = request.desired_count.unwrap_or(service.desired_count);
        let mut events = Vec::new();
        if let Some(policy) = &request.autoscaling {
            if let Some(p) = policy {
                p.check()?;
                if kind != crate::model::TaskKind::Http {
                    return Err(ApiError::invalid(
                        "autoscaling",
                        "only services of kind \"http\" task definitions autoscale (on requests in flight)",
                    ));
                }
                desired = desired.clamp(p.min, p.max);
                events.push(format!(
                    "service {name} autoscales from {} to {} tasks at {} requests in flight per task",
                    p.min, p.max, p.target_inflight
                ));
            } else if service.autoscaling.is_some() {
                events.push(format!("service {name} no longer autoscales"));
            }
            service.autoscaling = policy.clone();
        }
        let min = request
            .minimum_healthy_percent
            .unwrap_or(service.minimum_healthy_percent);
        let max = request.maximum_percent.unwrap_or(service.maximum_percent);
        check_counts(desired, min, max)?;
        if desired != service.desired_count {
            events.push(format!(
                "service {name} desired count changed from {} to {desired}",
                service.desired_count
            ));
        }
        if routes != service.routes {
            events.push(format!(
                "service {name} routes changed to [{}]",
                routes.join(", ")
            ));
        }
        service.desired_count = desired;
        service.minimum_healthy_percent = min;
        service.maximum_percent = max;
        service.routes = routes;
        if let Some(def) = def {
            if def.status == TaskDefinitionStatus::Inactive {
                return Err(ApiError::conflict(format!(
                    "task definition {} is INACTIVE",
                    def.task_definition
                )));
            }
            if def.task_definition != service.task_definition {
                for d in &mut service.deployments {
                    d.status = DeploymentStatus::Active;
                }
                let deployment = new_deployment(&def.task_definition);
                events.push(format!(
                    "service {name} started deployment {} of {}",
                    deployment.id, def.task_definition
                ));
                service.deployments.insert(0, deployment);
                service.task_definition = def.task_definition.clone();
                state.failures = 0;
                state.next_start = None;
            }
        }
        self.store.put_service(&service).await?;
        for event in events {
            self.event(name, event);
        }
        state.service = service.clone();
        state.steady = false;
        self.rebuild_routes(&services);
        drop(services);
        self.wake.notify_one();
        Ok(self.with_counts(service))
    }

    /// Sets a service's desired count (the autoscaler's way), with `why`
    /// in its event.
    pub(crate) async fn set_desired(&self, name: &str, desired: u32, why: &str) -> Result<()> {
        let mut services = self.services.lock().await;
        let state = services
            .get_mut(name)
            .ok_or_else(|| ApiError::not_found(format!("service {name} does not exist")))?;
        if state.service.status != ServiceStatus::Active || state.service.desired_count == desired {
            return Ok(());
        }
        let mut service = state.service.clone();
        service.desired_count = desired;
        self.store.put_service(&service).await?;
        self.event(name, format!("service {name} {why}"));
        state.service = service;
        state.steady = false;
        drop(services);
        self.wake.notify_one();
        Ok(())
    }

    /// Raises a service's desired count to `at_least` if it is below.
    pub(crate) async fn set_desired_at_least(
        &self,
        name: &str,
        at_least: u32,
        why: &str,
    ) -> Result<()> {
        let current = {
            let services = self.services.lock().await;
            services.get(name).map(|s| s.service.desired_count)
        };
        match current {
            Some(n) if n < at_least => self.set_desired(name, at_least, why).await,
            _ => Ok(()),
        }
    }

    /// Starts deleting a service: it scales to zero, then disappears.
    pub async fn delete_service(&self, name: &str) -> Result<Service> {
        let mut services = self.services.lock().await;
        let state = services
            .get_mut(name)
            .ok_or_else(|| ApiError::not_found(format!("service {name} does not exist")))?;
        if state.service.status != ServiceStatus::Draining {
            state.service.status = ServiceStatus::Draining;
            state.service.desired_count = 0;
            self.store.put_service(&state.service).await?;
            self.event(
                name,
                format!("service {name} is being deleted: draining its tasks"),
            );
        }
        let service = state.service.clone();
        drop(services);
        self.wake.notify_one();
        Ok(self.with_counts(service))
    }

    /// Books a stopped task against its service: events, failure streak,
    /// backoff, circuit breaker.
    async fn task_stopped(&self, task: &Task) {
        let Some(name) = &task.service else { return };
        let mut services = self.services.lock().await;
        let Some(state) = services.get_mut(name) else {
            return;
        };
        let code = task.stop_code.as_deref().unwrap_or("");
        let asked = matches!(code, "ScaledDown") || code == StopCode::UserStopped.as_str();
        if asked {
            return;
        }
        let message = task.message.as_deref().filter(|m| !m.is_empty());
        // A lost node is not the task's failure: it is started elsewhere
        // at once, without a backoff or a vote for the circuit breaker.
        if code == StopCode::NodeLost.as_str() {
            self.event(
                name,
                format!(
                    "service {name} task {} stopped: NodeLost ({}); starting a replacement",
                    task.id,
                    message.unwrap_or("its node was lost")
                ),
            );
            return;
        }
        self.event(
            name,
            match message {
                Some(m) => format!("service {name} task {} failed: {code} ({m})", task.id),
                None => format!("service {name} task {} failed: {code}", task.id),
            },
        );
        let ran = Duration::from_secs_f64(task.duration_ms.unwrap_or(0.0).max(0.0) / 1000.0);
        state.failures = if ran >= HEALTHY_RUN {
            1
        } else {
            state.failures + 1
        };
        state.steady = false;
        if state.failures >= 2 {
            let shift = (state.failures - 2).min(16);
            let delay = self
                .config
                .restart_backoff
                .saturating_mul(1 << shift)
                .min(self.config.max_restart_backoff);
            state.next_start = Some(Instant::now() + delay);
            self.event(
                name,
                format!(
                    "service {name} is restarting tasks in {} after {} consecutive failures",
                    humantime::format_duration(Duration::from_millis(delay.as_millis() as u64)),
                    state.failures
                ),
            );
        }
        // Circuit breaker: an in-progress deployment whose tasks keep
        // failing rolls back to the previous deployment.
        let service = &mut state.service;
        let Some(primary) = service.deployments.first_mut() else {
            return;
        };
        if task.deployment_id.as_deref() != Some(primary.id.as_str())
            || primary.rollout_state != RolloutState::InProgress
        {
            return;
        }
        primary.failed_tasks += 1;
        primary.updated_at = model::now();
        let failed_tasks = primary.failed_tasks;
        if failed_tasks < CIRCUIT_BREAKER_FAILURES || service.deployments.len() < 2 {
            let _ = self.store.put_service(service).await;
            return;
        }
        let reason = format!("circuit breaker: {failed_tasks} tasks failed; rolled back");
        let failed_id = self.roll_back(state, &reason).await;
        drop(services);
        self.stop_deployment(name, &failed_id).await;
    }

    /// Rolls a service's in-progress primary deployment back to the
    /// previous one (the circuit breaker); returns the failed
    /// deployment's id. The caller stops its tasks.
    async fn roll_back(&self, state: &mut ServiceState, reason: &str) -> String {
        let service = &mut state.service;
        let name = service.name.clone();
        let mut failed = service.deployments.remove(0);
        failed.status = DeploymentStatus::Inactive;
        failed.rollout_state = RolloutState::Failed;
        failed.rollout_state_reason = reason.to_owned();
        let previous = &mut service.deployments[0];
        previous.status = DeploymentStatus::Primary;
        previous.failed_tasks = 0;
        previous.rollout_state = RolloutState::InProgress;
        previous.rollout_state_reason = format!("rolling back from deployment {}", failed.id);
        previous.updated_at = model::now();
        service.task_definition = previous.task_definition.clone();
        self.event(
            &name,
            format!(
                "service {name} deployment {} failed ({}): rolling back to {}",
                failed.id, failed.rollout_state_reason, service.task_definition
            ),
        );
        state.failures = 0;
        state.next_start = None;
        state.steady = false;
        let _ = self.store.put_service(&state.service).await;
        failed.id
    }

    /// Stops the live tasks of a rolled-back deployment.
    async fn stop_deployment(&self, name: &str, deployment: &str) {
        for t in self.tasks.live_of_service(name) {
            if t.deployment_id.as_deref() == Some(deployment) {
                let _ = self
                    .tasks
                    .stop(
                        &t.id,
                        StopReason {
                            code: StopCode::ScaledDown,
                            message: "its deployment was rolled back".into(),
                        },
                    )
                    .await;
            }
        }
    }

    /// The 5xx share of an in-progress deployment's HTTP tasks, if they
    /// have answered enough requests to judge.
    fn failing_share(live: &[Task], deployment: &str) -> Option<(u64, u64)> {
        let (mut total, mut errors) = (0u64, 0u64);
        for t in live
            .iter()
            .filter(|t| t.deployment_id.as_deref() == Some(deployment))
        {
            if let Some(http) = &t.http {
                total += http.responses.values().sum::<u64>();
                errors += http.responses.get("5xx").copied().unwrap_or(0);
            }
        }
        (total >= CIRCUIT_BREAKER_MIN_REQUESTS
            && errors * 100 >= total * CIRCUIT_BREAKER_5XX_PERCENT)
            .then_some((errors, total))
    }

    /// One pass over every service. Returns when the next pass is due.
    async fn reconcile(&self) -> Option<Instant> {
        let mut due: Option<Instant> = None;
        let mut starts = Vec::new();
        let mut stops = Vec::new();
        let mut removed = Vec::new();
        let mut rolled_back: Vec<(String, String)> = Vec::new();
        let draining_nodes = self.tasks.draining_nodes();
        {
            let mut services = self.services.lock().await;
            for state in services.values_mut() {
                let before = serde_json::to_string(&state.service).unwrap_or_default();
                let name = state.service.name.clone();
                let mut live: Vec<Task> = self.tasks.live_of_service(&name);
                // Tasks still stopping keep a draining service alive.
                let stopping = live.len();
                live.retain(|t| t.desired_status == TaskStatus::Running);
                let stopping = stopping - live.len();
                // Circuit breaker on answers: a new deployment whose HTTP
                // tasks mostly fail requests rolls back like one whose
                // tasks keep failing.
                if let Some(p) = state.service.deployments.first()
                    && p.rollout_state == RolloutState::InProgress
                    && state.service.deployments.len() >= 2
                    && let Some((errors, total)) = Self::failing_share(&live, &p.id)
                {
                    let reason = format!(
                        "circuit breaker: {errors} of {total} requests answered 5xx; rolled back"
                    );
                    let failed = self.roll_back(state, &reason).await;
                    rolled_back.push((name.clone(), failed.clone()));
                    live.retain(|t| t.deployment_id.as_deref() != Some(failed.as_str()));
                }
                let service = &mut state.service;
                let desired = service.desired_count;
                let Some(primary) = service.deployments.first().cloned() else {
                    continue;
                };
                // Tasks on a draining node are replaced like an older
                // deployment's: started elsewhere first, then stopped.
                let (mut ours, mut old): (Vec<&Task>, Vec<&Task>) = live.iter().partition(|t| {
                    t.deployment_id.as_deref() == Some(primary.id.as_str())
                        && !draining_nodes.contains(&t.node)
                });
                // Scale down: extra primary tasks go, the youngest first.
                ours.sort_by(|a, b| a.created_at.cmp(&b.created_at));
                while ours.len() as u32 > desired {
                    let t = ours.pop().expect("non-empty");
                    stops.push((
                        t.id.clone(),
                        StopCode::ScaledDown,
                        "the service scaled down".to_owned(),
                    ));
                }
                // Start primary tasks within maximum_percent.
                let max_total =
                    (desired as u64 * service.maximum_percent as u64 / 100).max(desired as u64);
                let total = (ours.len() + old.len()) as u64;
                let want = desired.saturating_sub(ours.len() as u32) as u64;
                let room = max_total.saturating_sub(total).min(want);
                if room > 0 && !self.tasks.draining() {
                    match state.next_start {
                        Some(at) if at > Instant::now() => {
                            due = Some(due.map_or(at, |d| d.min(at)));
                        }
                        _ => {
                            state.next_start = None;
                            starts.push((
                                name.clone(),
                                primary.task_definition.clone(),
                                primary.id.clone(),
                                room,
                            ));
                        }
                    }
                }
                // Retire older deployments while enough stay healthy.
                let min_healthy =
                    (desired as u64 * service.minimum_healthy_percent as u64).div_ceil(100);
                let wall = std::time::SystemTime::now();
                let mut healthy = live.iter().filter(|t| settled(t, wall)).count() as u64;
                let primary_running = ours.iter().filter(|t| settled(t, wall)).count() as u32;
                old.sort_by_key(|t| t.status == TaskStatus::Running);
                for t in old.iter() {
                    let running = settled(t, wall);
                    if running && healthy <= min_healthy && primary_running < desired {
                        break;
                    }
                    if running {
                        healthy = healthy.saturating_sub(1);
                    }
                    let why = if draining_nodes.contains(&t.node)
                        && t.deployment_id.as_deref() == Some(primary.id.as_str())
                    {
                        self.event(
                            &name,
                            format!(
                                "service {name} moved task {} off draining node {}",
                                t.id, t.node
                            ),
                        );
                        format!("node {} is draining; replaced on another node", t.node)
                    } else {
                        "replaced by a new deployment".to_owned()
                    };
                    stops.push((t.id.clone(), StopCode::ScaledDown, why));
                }
                // Older deployments that keep live tasks after this pass.
                let old_left: std::collections::HashSet<&str> = live
                    .iter()
                    .filter(|t| !stops.iter().any(|(id, _, _)| id == &t.id))
                    .filter_map(|t| t.deployment_id.as_deref())
                    .filter(|d| *d != primary.id)
                    .collect();
                let now = model::now();
                let steady = primary_running == desired
                    && ours.len() as u32 == desired
                    && old_left.is_empty();
                if let Some(p) = service.deployments.first_mut()
                    && steady
                    && p.rollout_state == RolloutState::InProgress
                {
                    p.rollout_state = RolloutState::Completed;
                    p.rollout_state_reason = "every desired task runs".into();
                    p.updated_at = now.clone();
                    self.event(
                        &name,
                        format!("service {name} deployment {} completed", p.id),
                    );
                }
                // Older deployments stay listed while they have tasks, and
                // all stay while the primary's rollout is in progress: the
                // circuit breaker rolls back to the newest of them even if
                // its tasks are gone.
                let in_progress = service
                    .deployments
                    .first()
                    .is_some_and(|p| p.rollout_state == RolloutState::InProgress);
                service.deployments.retain(|d| {
                    d.status == DeploymentStatus::Primary
                        || in_progress
                        || old_left.contains(d.id.as_str())
                });
                if steady && !state.steady && service.status == ServiceStatus::Active {
                    // The failure streak is not reset here: a task that
                    // fails at once is RUNNING for an instant, which would
                    // end every streak and with it the backoff. A task
                    // that runs HEALTHY_RUN before failing ends it instead.
                    self.event(&name, format!("service {name} has reached a steady state"));
                }
                state.steady = steady;
                if service.status == ServiceStatus::Draining && live.is_empty() && stopping == 0 {
                    removed.push(name.clone());
                }
                let after = serde_json::to_string(&state.service).unwrap_or_default();
                if before != after
                    && let Err(e) = self.store.put_service(&state.service).await
                {
                    tracing::error!(service = %name, error = %e, "cannot save a service");
                }
            }
            // Deleted from the store before the name is free again, so a
            // new service of the same name cannot be deleted by this.
            for name in &removed {
                match self.store.delete_service(name).await {
                    Ok(()) => {
                        services.remove(name);
                        self.rebuild_routes(&services);
                        self.event(name, format!("service {name} deleted"));
                    }
                    Err(e) => {
                        tracing::error!(service = %name, error = %e, "cannot delete a service");
                    }
                }
            }
        }
        for (name, deployment) in rolled_back {
            self.stop_deployment(&name, &deployment).await;
        }
        for (id, code, message) in stops {
            let _ = self.tasks.stop(&id, StopReason { code, message }).await;
        }
        for (name, def, deployment, n) in starts {
            let launch = match self.task_definition(&def).await {
                Ok(d) => self.prepare(d, None, Some((&name, &deployment))).await,
                Err(e) => Err(e),
            };
            let mut services = self.services.lock().await;
            let Some(state) = services.get_mut(&name) else {
                continue;
            };
            match launch {
                Ok(mut launch) => {
                    // The service's placement replaces the definition's.
                    if let Some(p) = &state.service.placement {
                        let mut def = (*launch.def).clone();
                        if !p.constraints.is_empty() {
                            def.placement_constraints = p.constraints.clone();
                        }
                        if p.strategy.is_some() {
                            def.placement_strategy = p.strategy.clone();
                        }
                        launch.def = Arc::new(def);
                    }
                    state.start_error = None;
                    let mut started = Vec::new();
                    for _ in 0..n {
                        match self.tasks.launch(launch.clone()) {
                            Ok(t) => started.push(t.id),
                            Err(_) => break,
                        }
                    }
                    if !started.is_empty() {
                        self.event(
                            &name,
                            format!(
                                "service {name} has started {} task{}: {}",
                                started.len(),
                                if started.len() == 1 { "" } else { "s" },
                                started.join(", ")
                            ),
                        );
                    }
                }
                Err(e) => {
                    if state.start_error.as_deref() != Some(e.message.as_str()) {
                        self.event(
                            &name,
                            format!("service {name} cannot start tasks: {}", e.message),
                        );
                        state.start_error = Some(e.message.clone());
                    }
                    let at = Instant::now()
                        + self.config.max_restart_backoff.min(Duration::from_secs(5));
                    state.next_start = Some(at);
                    due = Some(due.map_or(at, |d| d.min(at)));
                }
            }
        }
        due
    }

    /// Refreshes the per-service gauges.
    pub(crate) async fn refresh_service_metrics(&self) {
        self.metrics.service_desired.reset();
        self.metrics.service_running.reset();
        for s in self.all_services().await {
            self.metrics
                .service_desired
                .with_label_values(&[&s.name])
                .set(i64::from(s.desired_count));
            self.metrics
                .service_running
                .with_label_values(&[&s.name])
                .set(i64::from(s.running_count));
        }
    }
}

/// The reconciler loop; ends when `shutdown` turns true.
pub(crate) async fn reconciler(
    control: Arc<Control>,
    mut stopped: mpsc::UnboundedReceiver<Arc<Task>>,
    mut shutdown: watch::Receiver<bool>,
) {
    /// Even with nothing to wake it, the reconciler looks every so often.
    const TICK: Duration = Duration::from_secs(1);
    let mut next = Instant::now();
    loop {
        tokio::select! {
            biased;
            _ = shutdown.changed() => return,
            Some(task) = stopped.recv() => {
                control.task_stopped(&task).await;
                while let Ok(task) = stopped.try_recv() {
                    control.task_stopped(&task).await;
                }
            }
            () = control.wake.notified() => {}
            () = tokio::time::sleep_until(next.into()) => {}
        }
        let due = control.reconcile().await;
        let tick = Instant::now() + TICK;
        next = due.map_or(tick, |d| d.min(tick));
    }
}
