//! HTTP components (`wasi:http/proxy`): one fresh instance per request,
//! from the artifact's pre-instantiation, with the task limits applied per
//! request — fuel, memory, and a deadline the epoch callback enforces —
//! and every way a request can end mapped to a response a client
//! understands. Outbound HTTP is closed: the guest gets the WASI HTTP
//! "request denied" error and no connection is made.
//!
//! This module knows `wasi:http` as a guest interface and the `http`
//! request/response types it is written in; listeners, routing and
//! balancing are the binary's and the control plane's.

use std::convert::Infallible;
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
use crate::outcome::StopCode;
use crate::sandbox::{
    Failure, HasLimiter, StopSignal, TaskSpec, classify, new_store, wasi_builder,
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
    hooks: DenyOutbound,
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

/// Outbound HTTP is closed by default: every request is denied before any
/// connection is made.
struct DenyOutbound;

impl WasiHttpHooks for DenyOutbound {
    fn send_request(
        &mut self,
        _request: http::Request<wasmtime_wasi_http::WasiBody>,
        _options: Option<wasmtime_wasi_http::RequestOptions>,
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
        Box::new(async { Err(wasmtime_wasi_http::Error::HttpRequestDenied) })
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
        let mut wasi = match wasi_builder(spec) {
            Ok(b) => b,
            Err(message) => return failed(500, StopCode::FailedToStart, message, started),
        };
        let state = HttpState {
            wasi: wasi.build(),
            http: WasiHttpCtx::new(),
            table: ResourceTable::new(),
            limiter: MemoryLimiter::new(memory),
            hooks: DenyOutbound,
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
