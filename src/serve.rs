//! `wharf serve`: one `wasi:http/proxy` component on a local port, like
//! `wasmtime serve` — a fresh instance per request from the cached
//! pre-instantiation, with fuel, memory and a timeout per request, at most
//! `--max-concurrency` requests in flight (more get 503 with `Retry-After`).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result};
use clap::Args;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use wharf_api::ingress::{BOUNDS, HEADER_TIMEOUT, MAX_CONNECTIONS, MAX_HEADER_BYTES};
use wharf_runtime::{
    ArtifactKind, DirGrant, Executor, ExecutorConfig, HttpOptions, Limits, OutboundRule, Runtime,
    Stdio, TaskSpec, text_response,
};

#[derive(Debug, Args)]
pub(crate) struct ServeArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// Fuel per request; default unlimited.
    #[arg(long)]
    fuel: Option<u64>,
    /// Memory limit per request, e.g. 64MiB; default 1GiB.
    #[arg(long, value_parser = parse_size)]
    memory: Option<u64>,
    /// Time limit per request (504 past it), e.g. 500ms, 30s.
    #[arg(long, value_parser = parse_duration, default_value = "30s")]
    timeout: std::time::Duration,
    /// Environment variable for the component: K=V, or K to pass the
    /// host's value. It sees no others.
    #[arg(long = "env", value_name = "K=V")]
    env: Vec<String>,
    /// Directory for the component: HOST[:GUEST][:ro]. It sees no others.
    #[arg(long = "dir", value_name = "HOST[:GUEST][:ro]", value_parser = parse_dir)]
    dirs: Vec<DirGrant>,
    /// Requests in flight at once; more get 503 with Retry-After.
    #[arg(long, default_value_t = 64)]
    max_concurrency: usize,
    /// A destination the component may call with wasi:http/outgoing-handler:
    /// SCHEME://HOST[:PORT], `*` as the port or `*.` before the host.
    /// Repeatable; without it, every outbound request is denied.
    #[arg(long = "allow-outbound", value_name = "URL", value_parser = parse_outbound)]
    allow_outbound: Vec<OutboundRule>,
    /// Data directory (compile cache).
    #[arg(long, env = "WHARF_DATA_DIR")]
    data_dir: Option<PathBuf>,
    #[command(flatten)]
    registry: crate::run::RegistryArgs,
    /// The component (.wasm) to serve, or a registry reference
    /// (HOST[:PORT]/REPOSITORY[:TAG|@DIGEST]) pulled and cached by digest.
    #[arg(value_name = "FILE|REF")]
    file: String,
}

fn parse_size(text: &str) -> Result<u64, String> {
    wharf_runtime::parse_size(text).map_err(|e| e.to_string())
}

fn parse_outbound(text: &str) -> Result<OutboundRule, String> {
    OutboundRule::parse(text).map_err(|e| e.to_string())
}

fn parse_dir(text: &str) -> Result<DirGrant, String> {
    DirGrant::parse(text).map_err(|e| e.to_string())
}

fn parse_duration(text: &str) -> Result<std::time::Duration, String> {
    wharf_runtime::parse_duration(text).map_err(|e| e.to_string())
}

pub(crate) fn main(args: ServeArgs) -> Result<()> {
    let data_dir = crate::paths::data_dir(args.data_dir.clone())?;
    let env = crate::run::host_env(&args.env)?;
    let (file, program) = crate::run::resolve_target(&args.file, &args.registry, &data_dir)?;
    let max = args.max_concurrency.max(1);
    // One instance per request in flight, and a little headroom for
    // instances still being torn down.
    let instances = u32::try_from(max + max / 4 + 1).unwrap_or(u32::MAX);
    let runtime = Runtime::new(crate::run::local_runtime_config(
        instances,
        args.memory,
        &data_dir,
    ))
    .context("failed to start the wasm runtime")?;
    let loaded = runtime
        .load_file(&file)
        .with_context(|| format!("cannot load {}", args.file))?;
    if loaded.artifact.kind() != ArtifactKind::HttpProxy {
        anyhow::bail!(
            "{} is a {:?}, not an HTTP component: `wharf serve` needs a component that exports \
             wasi:http/incoming-handler (the wasi:http/proxy world); run commands with `wharf run`",
            args.file,
            loaded.artifact.kind()
        );
    }
    // Guest output passes through to the server's own stdout and stderr.
    let spec = Arc::new(TaskSpec {
        program,
        args: Vec::new(),
        env,
        dirs: args.dirs.clone(),
        limits: Limits {
            fuel: args.fuel,
            memory: args.memory,
            timeout: Some(args.timeout),
        },
        stdio: Stdio::Inherit,
    });
    let artifact = loaded.artifact;
    // Guests run on threads of their own, apart from the listener's, as in
    // `wharf server`: a busy instance never delays accepting and reading
    // the next request (which showed as a p99 several times the p50).
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let executor = Executor::with_config(
        runtime.clone(),
        &ExecutorConfig {
            slots: 0,
            memory_budget: None,
            guest_threads: Some(cores),
        },
    )
    .context("failed to start the guest threads")?;
    let served = Arc::new(Served {
        runtime: runtime.clone(),
        executor,
        artifact,
        spec,
        outbound: args.allow_outbound.clone().into(),
        slots: Arc::new(tokio::sync::Semaphore::new(max)),
        max,
    });
    let tokio = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("failed to start the async runtime")?;
    tokio.block_on(async move {
        let listener = tokio::net::TcpListener::bind(args.listen)
            .await
            .with_context(|| format!("failed to listen on {}", args.listen))?;
        // Scripts and tests wait for this line.
        eprintln!("wharf: serving http://{}", listener.local_addr()?);
        let places = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
        // Never sent: the process ends at Ctrl-C.
        let (_stop, stopping) = tokio::sync::watch::channel(false);
        let ctrl_c = async {
            let _ = tokio::signal::ctrl_c().await;
        };
        wharf_api::conn::accept(&listener, &places, ctrl_c, |socket, _, place| {
            let served = served.clone();
            let stopping = stopping.clone();
            tokio::spawn(async move {
                let _place = place;
                let activity = wharf_api::conn::Activity::new();
                let service = wharf_api::conn::counted(&activity, move |request| {
                    let served = served.clone();
                    async move { served.handle(request).await }
                });
                let conn = http1::Builder::new()
                    .timer(TokioTimer::new())
                    .keep_alive(true)
                    .header_read_timeout(HEADER_TIMEOUT)
                    .max_buf_size(MAX_HEADER_BYTES)
                    .serve_connection(TokioIo::new(activity.io(socket)), service);
                let _ = wharf_api::conn::supervise(
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
        Ok(())
    })
}

/// What every request of `wharf serve` shares.
struct Served {
    runtime: Arc<Runtime>,
    executor: Executor,
    artifact: Arc<wharf_runtime::Artifact>,
    spec: Arc<TaskSpec>,
    outbound: Arc<[OutboundRule]>,
    slots: Arc<tokio::sync::Semaphore>,
    max: usize,
}

impl Served {
    /// One request: a slot (503 with `Retry-After` when none is free, held
    /// until the instance is gone, not just until the response head), then
    /// a fresh instance on the guest threads.
    async fn handle(
        &self,
        request: hyper::Request<hyper::body::Incoming>,
    ) -> hyper::Response<wharf_runtime::HttpBody> {
        let Ok(slot) = self.slots.clone().try_acquire_owned() else {
            let mut busy =
                text_response(503, format!("all {} request slots are in use\n", self.max));
            busy.headers_mut().insert(
                hyper::header::RETRY_AFTER,
                hyper::header::HeaderValue::from_static("1"),
            );
            return busy;
        };
        // Local and single-user: the operator's own allow-list is the
        // whole policy.
        let options = HttpOptions {
            outbound: self.outbound.clone(),
            address_ok: None,
            on_end: Some(Box::new(move |_| drop(slot))),
        };
        let (runtime, artifact, spec) = (
            self.runtime.clone(),
            self.artifact.clone(),
            self.spec.clone(),
        );
        let handled = self
            .executor
            .spawn_beside(async move {
                runtime
                    .handle_http_with(&artifact, &spec, request, options)
                    .await
            })
            .await;
        match handled {
            Ok((response, outcome)) => {
                if let Some(code) = outcome.stop_code {
                    eprintln!("wharf: request ended {code}: {}", outcome.message);
                }
                response
            }
            Err(e) => text_response(500, format!("internal error: {e}\n")),
        }
    }
}
