//! The `/v1/` routes: thin handlers over [`Control`], token checks, the
//! audit log, per-route latency metrics, and the OpenAPI document that
//! describes exactly these routes.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::{FromRequest, FromRequestParts, MatchedPath, Path, Request, State};
use axum::http::request::Parts;
use axum::http::{Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Router};
use serde::Deserialize;
use utoipa::{IntoParams, OpenApi};

use crate::auth::{Principal, token_of};
use crate::control::{
    Control, CreateSecretRequest, CreateTokenRequest, CreatedToken, RunTaskRequest,
};
use crate::db::{TaskFilter, Write};
use crate::error::{ApiError, ErrorCode, Result};
use crate::model::{
    self, AuditEntry, LogEntry, LogPage, Node, NodeStatus, Role, Secret, Service, ServiceEvent,
    Task, TaskDefinition, TaskStatus, Token,
};
use crate::services::{CreateServiceRequest, UpdateServiceRequest};
use crate::taskdef::TaskDefinitionInput;

type Ctl = State<Arc<Control>>;

/// A JSON body whose rejections are [`ApiError`]s: 400 for a body that is
/// not JSON, 422 for JSON of the wrong shape (the message names the field).
pub struct Json<T>(pub T);

impl<T: serde::de::DeserializeOwned, S: Send + Sync> FromRequest<S> for Json<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self> {
        use axum::extract::rejection::JsonRejection;
        match axum::Json::<T>::from_request(req, state).await {
            Ok(axum::Json(v)) => Ok(Json(v)),
            Err(JsonRejection::JsonDataError(e)) => Err(ApiError::new(
                ErrorCode::InvalidParameter,
                e.body_text().replace(
                    "Failed to deserialize the JSON body into the target type: ",
                    "",
                ),
            )),
            Err(e) => Err(ApiError::new(ErrorCode::InvalidRequest, e.body_text())),
        }
    }
}

impl<T: serde::Serialize> IntoResponse for Json<T> {
    fn into_response(self) -> Response {
        axum::Json(self.0).into_response()
    }
}

/// Query parameters whose rejections are [`ApiError`]s (400).
pub struct Query<T>(pub T);

impl<T: serde::de::DeserializeOwned, S: Send + Sync> FromRequestParts<S> for Query<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self> {
        axum::extract::Query::<T>::from_request_parts(parts, state)
            .await
            .map(|q| Query(q.0))
            .map_err(|e| ApiError::new(ErrorCode::InvalidRequest, e.body_text()))
    }
}

/// The `/v1/` router.
pub fn router(control: Arc<Control>) -> Router {
    Router::new()
        .route("/v1/openapi.json", get(openapi))
        .route("/v1/taskdefs", post(register_taskdef).get(list_taskdefs))
        .route(
            "/v1/taskdefs/{name}",
            get(describe_taskdef).delete(deregister_taskdef),
        )
        .route("/v1/tasks", post(run_task).get(list_tasks))
        .route("/v1/tasks/{id}", get(describe_task))
        .route("/v1/tasks/{id}/stop", post(stop_task))
        .route("/v1/tasks/{id}/logs", get(task_logs))
        .route("/v1/services", post(create_service).get(list_services))
        .route(
            "/v1/services/{name}",
            get(describe_service)
                .patch(update_service)
                .delete(delete_service),
        )
        .route("/v1/services/{name}/events", get(service_events))
        .route("/v1/secrets", post(put_secret).get(list_secrets))
        .route("/v1/secrets/{name}", axum::routing::delete(delete_secret))
        .route("/v1/tokens", post(create_token).get(list_tokens))
        .route("/v1/tokens/{id}", axum::routing::delete(revoke_token))
        .route("/v1/audit", get(audit))
        .route("/v1/nodes", get(list_nodes))
        .route("/v1/replicas", get(list_replicas))
        .route("/v1/nodes/{name}", get(describe_node).delete(remove_node))
        .route(
            "/v1/join-tokens",
            post(create_join_token).get(list_join_tokens),
        )
        .route(
            "/v1/join-tokens/{id}",
            axum::routing::delete(delete_join_token),
        )
        .route("/v1/agent/sync", post(agent_sync))
        .route("/v1/nodes/{name}/drain", post(drain_node))
        .route("/v1/nodes/{name}/activate", post(activate_node))
        .fallback(|| async { ApiError::not_found("no such route in the /v1/ API") })
        .layer(middleware::from_fn_with_state(
            control.clone(),
            authenticate,
        ))
        .with_state(control)
}

/// Every `/v1/` request needs a token; mutating ones need `deployer`.
async fn authenticate(State(control): Ctl, mut req: Request, next: Next) -> Response {
    let Some(token) = token_of(req.headers()) else {
        return ApiError::new(
            ErrorCode::Unauthorized,
            "authentication required: send Authorization: Bearer <token> (the admin token is in the data directory's admin.token)",
        )
        .into_response();
    };
    let Some(who) = control.tokens.authenticate(&token) else {
        return ApiError::new(
            ErrorCode::Unauthorized,
            "the token is not valid (unknown or revoked)",
        )
        .into_response();
    };
    // A node's credential reaches the node protocol and nothing else; the
    // node protocol takes nothing else.
    let agent_route = req.uri().path().starts_with("/v1/agent/");
    match (&who.node, agent_route) {
        (Some(node), false) => {
            return ApiError::new(
                ErrorCode::AccessDenied,
                format!(
                    "the credential of node {node} may only call the node protocol (/v1/agent/)"
                ),
            )
            .into_response();
        }
        (None, true) => {
            return ApiError::new(
                ErrorCode::AccessDenied,
                "the node protocol takes node credentials (wharf node join), not tokens",
            )
            .into_response();
        }
        _ => {}
    }
    let reading = matches!(*req.method(), Method::GET | Method::HEAD);
    if !reading
        && !agent_route
        && let Err(e) = who.require(Role::Deployer)
    {
        return e.into_response();
    }
    req.extensions_mut().insert(who.clone());
    let mut response = next.run(req).await;
    // The audit layer outside finds the caller here, without hashing the
    // token a second time.
    response.extensions_mut().insert(who);
    response
}

/// Records mutating calls of `/v1/` and `/v2/` in the audit log, and
/// every call's latency by route.
pub async fn observe(State(control): Ctl, req: Request, next: Next) -> Response {
    let started = Instant::now();
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|m| m.as_str().to_owned())
        .unwrap_or_else(|| {
            if path.starts_with("/v2/") {
                "/v2/*".into()
            } else {
                "unmatched".into()
            }
        });
    let mutating = !matches!(method, Method::GET | Method::HEAD | Method::OPTIONS);
    // Only mutating calls are audited; `/v1/` ones were authenticated
    // inside (see `authenticate`), `/v2/` ones by the registry.
    let token = if mutating {
        token_of(req.headers())
    } else {
        None
    };
    let response = next.run(req).await;
    let status = response.status().as_u16();
    control
        .metrics
        .http_requests
        .with_label_values(&[method.as_str(), &route, &status.to_string()])
        .observe(started.elapsed().as_secs_f64());
    if mutating && (path.starts_with("/v1/") || path.starts_with("/v2/")) {
        let who = response
            .extensions()
            .get::<Arc<Principal>>()
            .cloned()
            .or_else(|| token.and_then(|t| control.tokens.authenticate(&t)));
        // Only authenticated callers are audited: a flood of bad requests
        // must not fill the store. They are counted instead.
        match who {
            Some(p) => control.writer.send(Write::Audit(Box::new(AuditEntry {
                id: 0,
                at: model::now(),
                token_id: p.token_id.clone(),
                actor: p.name.clone(),
                method: method.to_string(),
                path: truncate(path, MAX_AUDIT_PATH),
                status,
            }))),
            None => control.metrics.unauthenticated.inc(),
        }
    }
    response
}

/// Paths are stored up to this many bytes in the audit log (a name, an id
/// and a digest fit; a 60 KB path of garbage does not).
const MAX_AUDIT_PATH: usize = 512;

/// `text` cut to at most `max` bytes on a character boundary, marked `…`.
fn truncate(mut text: String, max: usize) -> String {
    if text.len() > max {
        let mut end = max;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
        text.push('…');
    }
    text
}

/// The OpenAPI document of these routes.
#[utoipa::path(get, path = "/v1/openapi.json", tag = "meta",
    responses((status = 200, description = "The OpenAPI 3.1 document", content_type = "application/json"),
              (status = "4XX", body = ApiError)))]
async fn openapi() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "application/json")],
        ApiDoc::openapi()
            .to_pretty_json()
            .expect("the document serializes"),
    )
}

// ----- task definitions -----

#[utoipa::path(post, path = "/v1/taskdefs", tag = "taskdefs", request_body = TaskDefinitionInput,
    responses((status = 201, body = TaskDefinition), (status = "4XX", body = ApiError)))]
async fn register_taskdef(
    State(c): Ctl,
    Extension(who): Extension<Arc<Principal>>,
    Json(input): Json<TaskDefinitionInput>,
) -> Result<(StatusCode, Json<TaskDefinition>)> {
    Ok((StatusCode::CREATED, Json(c.register(input, &who).await?)))
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
struct FamilyQuery {
    /// Only this family.
    family: Option<String>,
}

#[utoipa::path(get, path = "/v1/taskdefs", tag = "taskdefs", params(FamilyQuery),
    responses((status = 200, body = Vec<TaskDefinition>), (status = "4XX", body = ApiError)))]
async fn list_taskdefs(
    State(c): Ctl,
    Extension(who): Extension<Arc<Principal>>,
    Query(q): Query<FamilyQuery>,
) -> Result<Json<Vec<TaskDefinition>>> {
    Ok(Json(c.task_definitions(q.family.as_deref(), &who).await?))
}

#[utoipa::path(get, path = "/v1/taskdefs/{name}", tag = "taskdefs",
    params(("name" = String, Path, description = "`family` (latest active revision) or `family:revision`")),
    responses((status = 200, body = TaskDefinition), (status = "4XX", body = ApiError)))]
async fn describe_taskdef(
    State(c): Ctl,
    Extension(who): Extension<Arc<Principal>>,
    Path(name): Path<String>,
) -> Result<Json<TaskDefinition>> {
    Ok(Json((*c.task_definition_for(&name, &who).await?).clone()))
}

#[utoipa::path(delete, path = "/v1/taskdefs/{name}", tag = "taskdefs",
    params(("name" = String, Path, description = "`family:revision`")),
    responses((status = 200, body = TaskDefinition, description = "Now INACTIVE"), (status = "4XX", body = ApiError)))]
async fn deregister_taskdef(
    State(c): Ctl,
    Extension(who): Extension<Arc<Principal>>,
    Path(name): Path<String>,
) -> Result<Json<TaskDefinition>> {
    let def = c.task_definition_for(&name, &who).await?;
    c.authorize_run(&def, &who).await?;
    Ok(Json(c.deregister(&name).await?))
}

// ----- tasks -----

#[utoipa::path(post, path = "/v1/tasks", tag = "tasks", request_body = RunTaskRequest,
    responses((status = 201, body = Vec<Task>, description = "The tasks, PROVISIONING"), (status = "4XX", body = ApiError)))]
async fn run_task(
    State(c): Ctl,
    Extension(who): Extension<Arc<Principal>>,
    Json(request): Json<RunTaskRequest>,
) -> Result<(StatusCode, Json<Vec<Task>>)> {
    Ok((StatusCode::CREATED, Json(c.run_task(request, &who).await?)))
}

/// The most tasks one list returns.
const MAX_LIST: u32 = 1000;

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
struct TaskQuery {
    /// Only tasks of this family.
    family: Option<String>,
    /// Only tasks of this service.
    service: Option<String>,
    /// Only tasks in this status (PROVISIONING, PENDING, RUNNING, STOPPED).
    status: Option<String>,
    /// At most this many (default 100, at most 1000), newest first.
    limit: Option<u32>,
}

#[utoipa::path(get, path = "/v1/tasks", tag = "tasks", params(TaskQuery),
    responses((status = 200, body = Vec<Task>), (status = "4XX", body = ApiError)))]
async fn list_tasks(
    State(c): Ctl,
    Extension(who): Extension<Arc<Principal>>,
    Query(q): Query<TaskQuery>,
) -> Result<Json<Vec<Task>>> {
    let status = match q.status.as_deref() {
        None => None,
        Some(s) => Some(TaskStatus::parse(s).ok_or_else(|| {
            ApiError::invalid(
                "status",
                format!("{s:?} is not PROVISIONING, PENDING, RUNNING or STOPPED"),
            )
        })?),
    };
    let limit = q.limit.unwrap_or(100);
    if limit == 0 || limit > MAX_LIST {
        return Err(ApiError::invalid(
            "limit",
            format!("must be 1 to {MAX_LIST}"),
        ));
    }
    let tasks = c
        .list_tasks(TaskFilter {
            family: q.family,
            service: q.service,
            status,
            limit,
        })
        .await?;
    if who.repositories.is_empty() {
        return Ok(Json(tasks));
    }
    let mut visible = Vec::with_capacity(tasks.len());
    for task in tasks {
        if c.sees_task(&task, &who).await {
            visible.push(task);
        }
    }
    Ok(Json(visible))
}

/// The longest a describe may wait for a task to stop.
const MAX_WAIT_MS: u64 = 60_000;

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
struct DescribeQuery {
    /// Wait up to this many milliseconds (at most 60000) for the task to
    /// stop before answering.
    wait_stopped_ms: Option<u64>,
}

#[utoipa::path(get, path = "/v1/tasks/{id}", tag = "tasks",
    params(("id" = String, Path, description = "Task id"), DescribeQuery),
    responses((status = 200, body = Task), (status = "4XX", body = ApiError)))]
async fn describe_task(
    State(c): Ctl,
    Extension(who): Extension<Arc<Principal>>,
    Path(id): Path<String>,
    Query(q): Query<DescribeQuery>,
) -> Result<Json<Task>> {
    let task = c.task_for(&id, &who).await?;
    let task = match q.wait_stopped_ms {
        Some(ms) if ms > MAX_WAIT_MS => {
            return Err(ApiError::invalid(
                "wait_stopped_ms",
                format!("must be at most {MAX_WAIT_MS}"),
            ));
        }
        // A stopped task's record is final: no second lookup.
        Some(ms) if task.status != TaskStatus::Stopped => {
            c.tasks.wait_stopped(&id, Duration::from_millis(ms)).await?
        }
        _ => Some(task),
    };
    task.map(Json)
        .ok_or_else(|| ApiError::not_found(format!("task {id} does not exist")))
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
struct StopQuery {
    /// Why, recorded as the task's message.
    reason: Option<String>,
}

#[utoipa::path(post, path = "/v1/tasks/{id}/stop", tag = "tasks",
    params(("id" = String, Path, description = "Task id"), StopQuery),
    responses((status = 200, body = Task, description = "The task, with desired status STOPPED"), (status = "4XX", body = ApiError)))]
async fn stop_task(
    State(c): Ctl,
    Extension(who): Extension<Arc<Principal>>,
    Path(id): Path<String>,
    Query(q): Query<StopQuery>,
) -> Result<Json<Task>> {
    c.task_for(&id, &who).await?;
    Ok(Json(c.stop_task(&id, q.reason).await?))
}

/// The most lines one page returns.
const MAX_LOG_PAGE: usize = 10_000;

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
struct LogQuery {
    /// The first line to return (a `next_seq` of an earlier page).
    from: Option<u64>,
    /// At most this many lines (default and maximum 10000).
    limit: Option<usize>,
    /// Stream lines as they are written (`application/x-ndjson`, one
    /// LogEntry per line) until the task stops.
    follow: Option<bool>,
}

#[utoipa::path(get, path = "/v1/tasks/{id}/logs", tag = "tasks",
    params(("id" = String, Path, description = "Task id"), LogQuery),
    responses((status = 200, description = "A page of output; with follow=true an NDJSON stream of LogEntry, one per line",
               content((LogPage = "application/json"), (LogEntry = "application/x-ndjson"))),
              (status = "4XX", body = ApiError)))]
async fn task_logs(
    State(c): Ctl,
    Extension(who): Extension<Arc<Principal>>,
    Path(id): Path<String>,
    Query(q): Query<LogQuery>,
) -> Result<Response> {
    c.task_for(&id, &who).await?;
    let from = q.from.unwrap_or(0);
    let limit = q.limit.unwrap_or(MAX_LOG_PAGE);
    if limit == 0 || limit > MAX_LOG_PAGE {
        return Err(ApiError::invalid(
            "limit",
            format!("must be 1 to {MAX_LOG_PAGE}"),
        ));
    }
    if q.follow == Some(true) {
        if let Some((buffer, status)) = c.tasks.log_follow(&id) {
            return Ok(follow(buffer, status, from));
        }
        let page = c
            .tasks
            .logs(&id, from, MAX_LOG_PAGE)
            .await?
            .ok_or_else(|| ApiError::not_found(format!("task {id} does not exist")))?;
        let mut body = String::new();
        for line in page.lines {
            body.push_str(&serde_json::to_string(&line).expect("serializes"));
            body.push('\n');
        }
        return Ok(([(header::CONTENT_TYPE, "application/x-ndjson")], body).into_response());
    }
    let page = c
        .tasks
        .logs(&id, from, limit)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("task {id} does not exist")))?;
    Ok(Json(page).into_response())
}

fn follow(
    buffer: Arc<wharf_runtime::LogBuffer>,
    status: tokio::sync::watch::Receiver<model::TaskStatus>,
    from: u64,
) -> Response {
    let stream = futures_util::stream::unfold(
        (buffer, status, from, false),
        |(buffer, mut status, seq, done)| async move {
            if done {
                // The output is whole; the stream ends once STOPPED is
                // visible, so a client that reads the task next sees it
                // stopped (a dropped sender: the task is gone, also done).
                let _ = status.wait_for(|s| *s == model::TaskStatus::Stopped).await;
                return None;
            }
            loop {
                let page = buffer.read_from(seq, 256);
                if !page.lines.is_empty() || page.closed {
                    let mut chunk = String::new();
                    for l in page.lines {
                        let entry = crate::tasks::convert_line(l);
                        chunk.push_str(&serde_json::to_string(&entry).expect("serializes"));
                        chunk.push('\n');
                    }
                    let done = page.closed && buffer.read_from(page.next_seq, 1).lines.is_empty();
                    return Some((
                        Ok::<_, std::io::Error>(chunk),
                        (buffer, status, page.next_seq, done),
                    ));
                }
                buffer.wait_for(seq).await;
            }
        },
    );
    (
        [(header::CONTENT_TYPE, "application/x-ndjson")],
        axum::body::Body::from_stream(stream),
    )
        .into_response()
}

// ----- services -----

#[utoipa::path(post, path = "/v1/services", tag = "services", request_body = CreateServiceRequest,
    responses((status = 201, body = Service), (status = "4XX", body = ApiError)))]
async fn create_service(
    State(c): Ctl,
    Extension(who): Extension<Arc<Principal>>,
    Json(r): Json<CreateServiceRequest>,
) -> Result<(StatusCode, Json<Service>)> {
    Ok((StatusCode::CREATED, Json(c.create_service(r, &who).await?)))
}

#[utoipa::path(get, path = "/v1/services", tag = "services",
    responses((status = 200, body = Vec<Service>), (status = "4XX", body = ApiError)))]
async fn list_services(
    State(c): Ctl,
    Extension(who): Extension<Arc<Principal>>,
) -> Json<Vec<Service>> {
    Json(c.list_services(&who).await)
}

#[utoipa::path(get, path = "/v1/services/{name}", tag = "services",
    params(("name" = String, Path, description = "Service name")),
    responses((status = 200, body = Service), (status = "4XX", body = ApiError)))]
async fn describe_service(
    State(c): Ctl,
    Extension(who): Extension<Arc<Principal>>,
    Path(name): Path<String>,
) -> Result<Json<Service>> {
    Ok(Json(c.service_for(&name, &who).await?))
}

#[utoipa::path(patch, path = "/v1/services/{name}", tag = "services",
    params(("name" = String, Path, description = "Service name")), request_body = UpdateServiceRequest,
    responses((status = 200, body = Service), (status = "4XX", body = ApiError)))]
async fn update_service(
    State(c): Ctl,
    Extension(who): Extension<Arc<Principal>>,
    Path(name): Path<String>,
    Json(r): Json<UpdateServiceRequest>,
) -> Result<Json<Service>> {
    Ok(Json(c.update_service(&name, r, &who).await?))
}

#[utoipa::path(delete, path = "/v1/services/{name}", tag = "services",
    params(("name" = String, Path, description = "Service name")),
    responses((status = 200, body = Service, description = "DRAINING: removed once its tasks stopped"), (status = "4XX", body = ApiError)))]
async fn delete_service(
    State(c): Ctl,
    Extension(who): Extension<Arc<Principal>>,
    Path(name): Path<String>,
) -> Result<Json<Service>> {
    c.service_for(&name, &who).await?;
    Ok(Json(c.delete_service(&name).await?))
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
struct EventQuery {
    /// At most this many (default 100, at most 1000), newest first.
    limit: Option<u32>,
}

#[utoipa::path(get, path = "/v1/services/{name}/events", tag = "services",
    params(("name" = String, Path, description = "Service name"), EventQuery),
    responses((status = 200, body = Vec<ServiceEvent>), (status = "4XX", body = ApiError)))]
async fn service_events(
    State(c): Ctl,
    Extension(who): Extension<Arc<Principal>>,
    Path(name): Path<String>,
    Query(q): Query<EventQuery>,
) -> Result<Json<Vec<ServiceEvent>>> {
    if !who.repositories.is_empty() {
        c.service_for(&name, &who).await?;
    }
    let limit = q.limit.unwrap_or(100);
    if limit == 0 || limit > MAX_LIST {
        return Err(ApiError::invalid(
            "limit",
            format!("must be 1 to {MAX_LIST}"),
        ));
    }
    Ok(Json(c.service_events(&name, limit).await?))
}

// ----- secrets -----

#[utoipa::path(post, path = "/v1/secrets", tag = "secrets", request_body = CreateSecretRequest,
    responses((status = 201, body = Secret, description = "Created or replaced; the value is not returned"), (status = "4XX", body = ApiError)))]
async fn put_secret(
    State(c): Ctl,
    Extension(who): Extension<Arc<Principal>>,
    Json(r): Json<CreateSecretRequest>,
) -> Result<(StatusCode, Json<Secret>)> {
    Ok((StatusCode::CREATED, Json(c.put_secret(r, &who).await?)))
}

#[utoipa::path(get, path = "/v1/secrets", tag = "secrets",
    responses((status = 200, body = Vec<Secret>), (status = "4XX", body = ApiError)))]
async fn list_secrets(
    State(c): Ctl,
    Extension(who): Extension<Arc<Principal>>,
) -> Result<Json<Vec<Secret>>> {
    Ok(Json(c.list_secrets(&who).await?))
}

#[utoipa::path(delete, path = "/v1/secrets/{name}", tag = "secrets",
    params(("name" = String, Path, description = "Secret name")),
    responses((status = 204, description = "Deleted"), (status = "4XX", body = ApiError)))]
async fn delete_secret(
    State(c): Ctl,
    Extension(who): Extension<Arc<Principal>>,
    Path(name): Path<String>,
) -> Result<StatusCode> {
    c.delete_secret(&name, &who).await?;
    Ok(StatusCode::NO_CONTENT)
}

// ----- tokens and audit (admin) -----

#[utoipa::path(post, path = "/v1/tokens", tag = "tokens", request_body = CreateTokenRequest,
    responses((status = 201, body = CreatedToken), (status = "4XX", body = ApiError)))]
async fn create_token(
    State(c): Ctl,
    Extension(who): Extension<Arc<Principal>>,
    Json(r): Json<CreateTokenRequest>,
) -> Result<(StatusCode, Json<CreatedToken>)> {
    who.require(Role::Admin)?;
    Ok((StatusCode::CREATED, Json(c.create_token(r).await?)))
}

#[utoipa::path(get, path = "/v1/tokens", tag = "tokens",
    responses((status = 200, body = Vec<Token>), (status = "4XX", body = ApiError)))]
async fn list_tokens(
    State(c): Ctl,
    Extension(who): Extension<Arc<Principal>>,
) -> Result<Json<Vec<Token>>> {
    who.require(Role::Admin)?;
    Ok(Json(c.list_tokens().await?))
}

#[utoipa::path(delete, path = "/v1/tokens/{id}", tag = "tokens",
    params(("id" = String, Path, description = "Token id")),
    responses((status = 200, body = Token, description = "Revoked"), (status = "4XX", body = ApiError)))]
async fn revoke_token(
    State(c): Ctl,
    Extension(who): Extension<Arc<Principal>>,
    Path(id): Path<String>,
) -> Result<Json<Token>> {
    who.require(Role::Admin)?;
    Ok(Json(c.revoke_token(&id).await?))
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
struct AuditQuery {
    /// At most this many (default 100, at most 1000), newest first.
    limit: Option<u32>,
}

#[utoipa::path(get, path = "/v1/audit", tag = "tokens", params(AuditQuery),
    responses((status = 200, body = Vec<AuditEntry>), (status = "4XX", body = ApiError)))]
async fn audit(
    State(c): Ctl,
    Extension(who): Extension<Arc<Principal>>,
    Query(q): Query<AuditQuery>,
) -> Result<Json<Vec<AuditEntry>>> {
    who.require(Role::Admin)?;
    let limit = q.limit.unwrap_or(100);
    if limit == 0 || limit > MAX_LIST {
        return Err(ApiError::invalid(
            "limit",
            format!("must be 1 to {MAX_LIST}"),
        ));
    }
    c.writer.commit(Vec::new()).await?;
    Ok(Json(c.store.audit(limit).await?))
}

#[utoipa::path(get, path = "/v1/replicas", tag = "nodes",
    responses((status = 200, body = Vec<crate::model::ReplicaInfo>, description = "The replicas sharing this server's database (admin; empty: a single server on SQLite)"), (status = "4XX", body = ApiError)))]
async fn list_replicas(
    State(c): Ctl,
    Extension(who): Extension<Arc<Principal>>,
) -> Result<Json<Vec<crate::model::ReplicaInfo>>> {
    who.require(Role::Admin)?;
    let Some(replicas) = c.store.replicas() else {
        return Ok(Json(Vec::new()));
    };
    Ok(Json(
        replicas
            .list()
            .await?
            .into_iter()
            .map(|r| crate::model::ReplicaInfo {
                name: r.name,
                leader: r.leader,
                expired: r.expired,
                api_url: r.api_url,
                ingress_url: r.ingress_url,
            })
            .collect(),
    ))
}

#[utoipa::path(get, path = "/v1/nodes", tag = "nodes",
    responses((status = 200, body = Vec<Node>, description = "Every node"), (status = "4XX", body = ApiError)))]
async fn list_nodes(State(c): Ctl) -> Json<Vec<Node>> {
    Json(c.nodes().await)
}

#[utoipa::path(get, path = "/v1/nodes/{name}", tag = "nodes",
    params(("name" = String, Path, description = "Node name")),
    responses((status = 200, body = Node, description = "The node"), (status = "4XX", body = ApiError)))]
async fn describe_node(State(c): Ctl, Path(name): Path<String>) -> Result<Json<Node>> {
    Ok(Json(c.node(&name).await?))
}

#[utoipa::path(post, path = "/v1/nodes/{name}/drain", tag = "nodes",
    params(("name" = String, Path, description = "Node name")),
    responses((status = 200, body = Node, description = "The node, DRAINING: it takes no new tasks"), (status = "4XX", body = ApiError)))]
async fn drain_node(
    State(c): Ctl,
    Extension(who): Extension<Arc<Principal>>,
    Path(name): Path<String>,
) -> Result<Json<Node>> {
    who.require(Role::Admin)?;
    Ok(Json(c.set_node_status(&name, NodeStatus::Draining).await?))
}

#[utoipa::path(post, path = "/v1/nodes/{name}/activate", tag = "nodes",
    params(("name" = String, Path, description = "Node name")),
    responses((status = 200, body = Node, description = "The node, READY"), (status = "4XX", body = ApiError)))]
async fn activate_node(
    State(c): Ctl,
    Extension(who): Extension<Arc<Principal>>,
    Path(name): Path<String>,
) -> Result<Json<Node>> {
    who.require(Role::Admin)?;
    Ok(Json(c.set_node_status(&name, NodeStatus::Ready).await?))
}

#[utoipa::path(delete, path = "/v1/nodes/{name}", tag = "nodes",
    params(("name" = String, Path, description = "Node name")),
    responses((status = 200, body = Node, description = "The removed node: its credential is refused from now on, its tasks stop NodeLost"), (status = "4XX", body = ApiError)))]
async fn remove_node(
    State(c): Ctl,
    Extension(who): Extension<Arc<Principal>>,
    Path(name): Path<String>,
) -> Result<Json<Node>> {
    who.require(Role::Admin)?;
    Ok(Json(c.remove_node(&name).await?))
}

#[utoipa::path(post, path = "/v1/join-tokens", tag = "nodes",
    request_body = crate::nodes::CreateJoinTokenRequest,
    responses((status = 200, body = crate::nodes::CreatedJoinToken, description = "The token, shown once"), (status = "4XX", body = ApiError)))]
async fn create_join_token(
    State(c): Ctl,
    Extension(who): Extension<Arc<Principal>>,
    Json(req): Json<crate::nodes::CreateJoinTokenRequest>,
) -> Result<Json<crate::nodes::CreatedJoinToken>> {
    who.require(Role::Admin)?;
    Ok(Json(c.create_join_token(req).await?))
}

#[utoipa::path(get, path = "/v1/join-tokens", tag = "nodes",
    responses((status = 200, body = Vec<model::JoinToken>, description = "Join tokens, without their secrets"), (status = "4XX", body = ApiError)))]
async fn list_join_tokens(
    State(c): Ctl,
    Extension(who): Extension<Arc<Principal>>,
) -> Result<Json<Vec<model::JoinToken>>> {
    who.require(Role::Admin)?;
    Ok(Json(c.join_tokens().await?))
}

#[utoipa::path(delete, path = "/v1/join-tokens/{id}", tag = "nodes",
    params(("id" = String, Path, description = "Join token id")),
    responses((status = 200, description = "Revoked: no node joins with it from now on"), (status = "4XX", body = ApiError)))]
async fn delete_join_token(
    State(c): Ctl,
    Extension(who): Extension<Arc<Principal>>,
    Path(id): Path<String>,
) -> Result<Json<serde_json::Value>> {
    who.require(Role::Admin)?;
    c.delete_join_token(&id).await?;
    Ok(Json(serde_json::json!({"id": id, "revoked": true})))
}

/// The node protocol's sync (a heartbeat and a long poll); nodes only.
async fn agent_sync(
    State(c): Ctl,
    Extension(who): Extension<Arc<Principal>>,
    peer: Option<Extension<axum::extract::ConnectInfo<std::net::SocketAddr>>>,
    Json(report): Json<crate::fleet::Report>,
) -> Result<Json<crate::fleet::SyncResponse>> {
    let Some(node) = who.node.as_deref() else {
        return Err(ApiError::new(ErrorCode::AccessDenied, "nodes only"));
    };
    let peer = peer.map(|p| p.0.0.ip());
    Ok(Json(c.agent_sync(node, report, peer).await?))
}

/// `POST /v1/agent/join`, authenticated by a join token rather than a
/// token (so outside [`router`]'s authentication).
pub fn join_router(control: Arc<Control>) -> Router {
    Router::new()
        .route("/v1/agent/join", post(agent_join))
        .route("/v1/agent/ca", get(agent_ca))
        .with_state(control)
}

/// The server's CA certificate, public: a joining node checks it against
/// its join token's fingerprint before it trusts anything else.
async fn agent_ca(State(c): Ctl) -> Result<Response> {
    match &c.config.ca_pem {
        Some(pem) => Ok((
            [(header::CONTENT_TYPE, "application/x-pem-file")],
            pem.clone(),
        )
            .into_response()),
        None => Err(ApiError::not_found("this server does not serve TLS")),
    }
}

async fn agent_join(
    State(c): Ctl,
    headers: axum::http::HeaderMap,
    Json(req): Json<crate::fleet::JoinRequest>,
) -> Result<Json<crate::fleet::JoinResponse>> {
    let Some(secret) = token_of(&headers) else {
        return Err(ApiError::new(
            ErrorCode::Unauthorized,
            "a join needs the join token's secret as Authorization: Bearer",
        ));
    };
    Ok(Json(c.join(&secret, req).await?))
}

use crate::error::ApiError as ApiErrorSchema;

struct Security;

impl utoipa::Modify for Security {
    fn modify(&self, doc: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
        let components = doc.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "token",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

/// The OpenAPI document.
#[derive(OpenApi)]
#[openapi(
    info(title = "Wharf control plane", description = "Task definitions, tasks, services, secrets and tokens of a Wharf server."),
    paths(
        openapi, register_taskdef, list_taskdefs, describe_taskdef, deregister_taskdef,
        run_task, list_tasks, describe_task, stop_task, task_logs,
        create_service, list_services, describe_service, update_service, delete_service, service_events,
        put_secret, list_secrets, delete_secret, create_token, list_tokens, revoke_token, audit,
        list_nodes, list_replicas, describe_node, drain_node, activate_node, remove_node,
        create_join_token, list_join_tokens, delete_join_token,
    ),
    components(schemas(ApiErrorSchema, ErrorCode)),
    modifiers(&Security),
    security(("token" = [])),
)]
pub struct ApiDoc;
