//! `wharf server`: the whole single-node system on one port — the registry
//! at `/v2/`, the control plane at `/v1/`, `/metrics` and `/healthz` — with
//! state in one data directory and a local node that runs tasks.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Args;
use wharf_api::{Api, ApiConfig};
use wharf_runtime::{Runtime, RuntimeConfig};

#[derive(Debug, Args)]
pub(crate) struct ServerArgs {
    /// Data directory (registry storage, admin token).
    #[arg(long, env = "WHARF_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Where the control plane's state lives: a PostgreSQL database
    /// (`postgres://USER[:PASSWORD]@HOST[:PORT]/DB`, libpq parameters
    /// such as `?sslmode=require` allowed) instead of `state.db` (SQLite)
    /// in the data directory.
    #[arg(long, env = "WHARF_STATE")]
    state: Option<String>,
    /// Where the registry keeps blobs, manifests and uploads instead of
    /// `registry/` in the data directory: `file:///PATH` (e.g. a shared
    /// filesystem; temporary file, fsync, rename as in the data directory)
    /// or `s3://BUCKET/PREFIX?endpoint=URL&region=R` (an S3-compatible
    /// object store; credentials from AWS_ACCESS_KEY_ID and
    /// AWS_SECRET_ACCESS_KEY).
    #[arg(long, env = "WHARF_BLOBS")]
    blobs: Option<String>,
    /// Address to listen on.
    #[arg(long, env = "WHARF_LISTEN", default_value = "127.0.0.1:7070")]
    listen: SocketAddr,
    /// Concurrent tasks on this node (default and 0: 1000); above 1000
    /// the instance pool is sized for them.
    #[arg(long, env = "WHARF_SLOTS", value_parser = parse_slots)]
    slots: Option<usize>,
    /// Memory the node's running tasks may reserve together (each reserves
    /// its memory limit); tasks beyond it wait PENDING. Default: half of
    /// the machine's physical memory.
    #[arg(long, env = "WHARF_MEMORY_BUDGET", value_parser = parse_size)]
    memory_budget: Option<u64>,
    /// Memory limit of tasks whose definition sets none.
    #[arg(long, env = "WHARF_DEFAULT_MEMORY", default_value = "64MiB", value_parser = parse_size)]
    default_memory: u64,
    /// Timeout of tasks whose definition sets none (default: none, as
    /// long-running service tasks need).
    #[arg(long, env = "WHARF_DEFAULT_TIMEOUT", value_parser = parse_duration)]
    default_timeout: Option<std::time::Duration>,
    /// Threads that run guest code, apart from the API's (default: the
    /// number of cores, at most the slots).
    #[arg(long, env = "WHARF_GUEST_THREADS")]
    guest_threads: Option<usize>,
    /// Output of stopped tasks kept in the state store, newest first;
    /// older tasks keep their records but not their output.
    #[arg(long, env = "WHARF_KEEP_TASK_OUTPUT", default_value = "256MiB", value_parser = parse_size)]
    keep_task_output: u64,
    /// Internal network (CIDR or address) that task definitions may name
    /// registries in; loopback, private and link-local destinations are
    /// refused otherwise. Repeatable.
    #[arg(long = "allow-registry-network", env = "WHARF_ALLOW_REGISTRY_NETWORKS", value_delimiter = ',', value_parser = wharf_registry::remote::RemotePolicy::parse_network)]
    allow_registry_networks: Vec<wharf_registry::remote::IpNet>,
    /// First delay before restarting a failing service task; it doubles
    /// with each consecutive failure.
    #[arg(long, env = "WHARF_RESTART_BACKOFF", default_value = "1s", value_parser = parse_duration)]
    restart_backoff: std::time::Duration,
    /// Address of the ingress that serves HTTP services (`off`: none).
    #[arg(long, env = "WHARF_INGRESS", default_value = "127.0.0.1:7080")]
    ingress: String,
    /// How long a stopping HTTP task may finish its requests in flight.
    #[arg(long, env = "WHARF_DEREGISTRATION_DELAY", default_value = "10s", value_parser = parse_duration)]
    deregistration_delay: std::time::Duration,
    /// Internal network (CIDR or address) that components' allowed
    /// outbound destinations may resolve to; loopback, private and
    /// link-local addresses are refused otherwise. Repeatable.
    #[arg(long = "allow-outbound-network", env = "WHARF_ALLOW_OUTBOUND_NETWORKS", value_delimiter = ',', value_parser = wharf_registry::remote::RemotePolicy::parse_network)]
    allow_outbound_networks: Vec<wharf_registry::remote::IpNet>,
    /// Labels of the server's own node, for placement: KEY=VALUE,...
    #[arg(long, env = "WHARF_NODE_LABELS", default_value = "", value_parser = wharf_api::nodes::parse_labels)]
    node_labels: std::collections::BTreeMap<String, String>,
    /// TLS on the API and registry listener: `auto` keeps a CA in the data
    /// directory and signs a server certificate at every start; `off`
    /// serves plain HTTP, which only a loopback address may do unless
    /// `--insecure`.
    #[arg(long, env = "WHARF_TLS", default_value = "off", value_parser = ["off", "auto"])]
    tls: String,
    /// The server's certificate chain (PEM; its last certificate is the CA
    /// join tokens pin), instead of `--tls auto`.
    #[arg(
        long,
        env = "WHARF_TLS_CERT",
        requires = "tls_key",
        conflicts_with = "tls"
    )]
    tls_cert: Option<PathBuf>,
    /// The private key of `--tls-cert` (PEM).
    #[arg(long, env = "WHARF_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Another name or address the `--tls auto` certificate is valid for.
    #[arg(long = "tls-san", env = "WHARF_TLS_SANS", value_delimiter = ',')]
    tls_sans: Vec<String>,
    /// Serve plain HTTP on an address other than loopback (tokens, node
    /// credentials and secrets then cross the network in the clear).
    #[arg(long)]
    insecure: bool,
    /// Run no tasks on this server: a pure control plane for edge nodes
    /// (`wharf node join`).
    #[arg(long, env = "WHARF_NO_LOCAL_NODE")]
    no_local_node: bool,
    /// With `--state postgres://`: this server's name among the replicas
    /// sharing the database (also its own node's name). Each replica
    /// needs its own; a second process with a name in use is refused.
    #[arg(long, env = "WHARF_REPLICA", value_parser = parse_replica)]
    replica: Option<String>,
    /// With `--state postgres://`: the URL other replicas forward requests
    /// to this one at (default: http:// and the --listen address).
    #[arg(long, env = "WHARF_ADVERTISE")]
    advertise: Option<String>,
    /// With `--state postgres://`: the URL other replicas relay HTTP
    /// services' requests to this one's ingress at (default: http:// and
    /// the --ingress address).
    #[arg(long, env = "WHARF_ADVERTISE_INGRESS")]
    advertise_ingress: Option<String>,
    /// With `--state postgres://`: how long a replica's lease lasts
    /// unrenewed; after about this long a dead replica's tasks are lost
    /// and a dead leader's services move to another replica.
    #[arg(long, env = "WHARF_LEASE_TTL", default_value = "3s", value_parser = parse_duration)]
    lease_ttl: std::time::Duration,
    /// How often edge nodes sync when nothing happens.
    #[arg(long, env = "WHARF_HEARTBEAT", default_value = "2s", value_parser = parse_duration)]
    heartbeat: std::time::Duration,
    /// An edge node silent this long is LOST: its tasks stop NodeLost and
    /// services start them elsewhere.
    #[arg(long, env = "WHARF_NODE_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    node_timeout: std::time::Duration,
    /// How long a starting HTTP task's health check may keep failing
    /// before the task fails to start.
    #[arg(long, env = "WHARF_HEALTH_CHECK_GRACE", default_value = "30s", value_parser = parse_duration)]
    health_check_grace: std::time::Duration,
}

/// Where other replicas reach a listener on `addr`: the address, or for
/// every address (`0.0.0.0`, `::`) this machine's host name.
fn advertised(addr: SocketAddr) -> Result<String> {
    if addr.ip().is_unspecified() {
        Ok(format!("{}:{}", crate::agent::hostname()?, addr.port()))
    } else {
        Ok(addr.to_string())
    }
}

/// A replica name is a node name: 1 to 63 lowercase letters, digits or
/// '-'.
fn parse_replica(text: &str) -> Result<String, String> {
    let ok = !text.is_empty()
        && text.len() <= 63
        && !text.starts_with('-')
        && text
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if ok {
        Ok(text.to_owned())
    } else {
        Err(
            "a replica name is 1 to 63 lowercase letters, digits or '-', not starting with '-'"
                .into(),
        )
    }
}

/// Checks `--state` (in `main`, not as a clap parser: clap would echo
/// the URL's password in its error).
fn check_state(url: &str) -> Result<()> {
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        return Ok(());
    }
    anyhow::bail!(
        "--state {} is not a PostgreSQL URL such as postgres://wharf@db.example/wharf (leave --state out for SQLite in the data directory)",
        wharf_api::db::redacted(url)
    )
}

pub(crate) fn parse_size(text: &str) -> Result<u64, String> {
    wharf_runtime::parse_size(text).map_err(|e| e.to_string())
}

/// The most concurrent tasks a node may be given: the pool reserves ~8 GiB
/// of address space per slot (two linear memories at 4 GiB and their
/// guards), so past ~10,500 slots (measured) the reservation fails and the engine
/// falls back to mapping each task's memory on demand.
pub(crate) const MAX_SLOTS: usize = 100_000;

/// `--slots`: 0 (the default, as before) to [`MAX_SLOTS`].
pub(crate) fn parse_slots(s: &str) -> Result<usize, String> {
    let n: usize = s
        .parse()
        .map_err(|_| format!("{s:?} is not a number of slots"))?;
    if n > MAX_SLOTS {
        return Err(format!("must be at most {MAX_SLOTS}"));
    }
    Ok(n)
}

/// The runtime of a node with `slots` concurrent tasks: the instance pool
/// holds the runtime's default (1,000) or `slots` if that is more, so
/// `--slots 10000` runs ten thousand tasks with the pool's fast starts
/// and a small node keeps the headroom it always had.
pub(crate) fn runtime_config(data_dir: &Path, slots: Option<usize>) -> RuntimeConfig {
    let default = RuntimeConfig::default();
    let wanted = slots.map_or(0, |n| u32::try_from(n).unwrap_or(u32::MAX));
    RuntimeConfig {
        cache_dir: Some(crate::paths::compile_cache(data_dir)),
        max_instances: wanted.max(default.max_instances),
        ..default
    }
}

/// Bytes of physical memory, from `/proc/meminfo` (`None` elsewhere).
pub(crate) fn physical_memory() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

fn parse_duration(text: &str) -> Result<std::time::Duration, String> {
    wharf_runtime::parse_duration(text).map_err(|e| e.to_string())
}

/// The shortest admin token accepted from the token file: 128 bits as hex.
/// Created tokens have 64 hex characters.
const MIN_ADMIN_TOKEN_LEN: usize = 32;

/// Reads the admin token, creating it (mode 0600) on first start.
pub(crate) fn admin_token(data_dir: &Path) -> Result<String> {
    let path = crate::paths::admin_token(data_dir);
    match std::fs::read_to_string(&path) {
        Ok(token) => {
            let token = token.trim();
            // An empty or short file would make empty or guessable
            // credentials admin: refuse to start instead.
            if token.len() < MIN_ADMIN_TOKEN_LEN {
                anyhow::bail!(
                    "{} holds {} characters, too short to be a token (at least {MIN_ADMIN_TOKEN_LEN}): delete it and a new one is created at start, or write a longer random token",
                    path.display(),
                    token.len()
                );
            }
            return Ok(token.to_owned());
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("failed to read {}", path.display())),
    }
    let token = format!(
        "{}{}",
        uuid::Uuid::new_v4().simple(),
        uuid::Uuid::new_v4().simple()
    );
    crate::paths::write_private(&path, token.as_bytes())?;
    Ok(token)
}

pub(crate) fn main(args: ServerArgs) -> Result<()> {
    if let Some(url) = &args.state {
        check_state(url)?;
    }
    let ingress: Option<SocketAddr> = match args.ingress.as_str() {
        "off" => None,
        addr => Some(addr.parse().with_context(|| {
            format!("--ingress {addr:?} is not an address such as 127.0.0.1:7080, or off")
        })?),
    };
    let data_dir = crate::paths::data_dir(args.data_dir)?;
    std::fs::create_dir_all(&data_dir)
        .with_context(|| format!("failed to create {}", data_dir.display()))?;
    let tls = match (&args.tls_cert, &args.tls_key, args.tls.as_str()) {
        (Some(cert), Some(key), _) => Some(crate::tls::from_files(cert, key)?),
        (_, _, "auto") => Some(crate::tls::auto(&data_dir, args.listen, &args.tls_sans)?),
        _ => None,
    };
    if tls.is_none() && !args.listen.ip().is_loopback() && !args.insecure {
        anyhow::bail!(
            "--listen {} is not loopback and TLS is off: tokens, node credentials and secrets would cross the network in the clear (use --tls auto or --tls-cert/--tls-key, or --insecure to accept it)",
            args.listen
        );
    }
    // Held until the process exits.
    let _lock = crate::paths::lock_data_dir(&data_dir)?;
    let token = admin_token(&data_dir)?;
    let storage = crate::paths::Blobs::parse(&data_dir, args.blobs.as_deref())?.open(true)?;
    // 0 is the default, as if not given (also for the guest threads).
    let slots = args.slots.filter(|&n| n > 0);
    let runtime = Runtime::new(runtime_config(&data_dir, slots))
        .context("failed to start the wasm runtime")?;
    let max_task_memory = runtime.config().max_task_memory;
    if args.default_memory > max_task_memory {
        anyhow::bail!(
            "--default-memory {} is above the per-task maximum of {max_task_memory} bytes",
            args.default_memory
        );
    }
    let mut config = ApiConfig::new(data_dir.clone(), token);
    let state_shown = match &args.state {
        Some(url) => wharf_api::db::redacted(url),
        None => data_dir.join("state.db").display().to_string(),
    };
    config.state = args.state;
    config.slots = slots;
    config.restart_backoff = args.restart_backoff;
    // Half of the machine leaves room for the server itself, compiling,
    // and the page cache; an edge node that needs more says so.
    config.memory_budget = args.memory_budget.or(physical_memory().map(|m| m / 2));
    config.default_memory = Some(args.default_memory);
    config.default_timeout = args.default_timeout;
    config.remote_policy.allow = args.allow_registry_networks;
    config.keep_log_bytes = args.keep_task_output;
    config.deregistration_delay = args.deregistration_delay;
    config.health_check_grace = args.health_check_grace;
    config.outbound_policy.allow = args.allow_outbound_networks;
    config.local_node.labels = args.node_labels;
    config.local_node.disabled = args.no_local_node;
    if args.replica.is_some() && config.state.is_none() {
        anyhow::bail!(
            "--replica names one of several servers sharing a PostgreSQL database: it needs --state postgres://..."
        );
    }
    config.local_node.replica = args.replica;
    if !(std::time::Duration::from_millis(500)..=std::time::Duration::from_secs(60))
        .contains(&args.lease_ttl)
    {
        anyhow::bail!("--lease-ttl must be between 500ms and 60s");
    }
    config.lease_ttl = args.lease_ttl;
    if args.heartbeat >= args.node_timeout {
        anyhow::bail!(
            "--heartbeat ({:?}) must be shorter than --node-timeout ({:?}), or every node is lost between two heartbeats",
            args.heartbeat,
            args.node_timeout
        );
    }
    // Replicas forward to each other over TLS when they serve it,
    // trusting the CA they share.
    if config.state.is_some()
        && let Some(t) = &tls
    {
        config.replica_tls = Some(crate::tls::client_trusting(&t.ca_pem)?);
    }
    config.ca_fingerprint = tls.as_ref().map(|t| t.fingerprint.clone());
    config.ca_pem = tls.as_ref().map(|t| t.ca_pem.clone());
    config.heartbeat = args.heartbeat;
    config.node_timeout = args.node_timeout;
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    config.guest_threads = Some(
        args.guest_threads
            .unwrap_or(cores)
            .min(slots.unwrap_or(usize::MAX))
            .max(1),
    );

    let tokio = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("failed to start the async runtime")?;
    tokio.block_on(async move {
        // Bound first: other replicas learn the address at open.
        let listener = tokio::net::TcpListener::bind(args.listen)
            .await
            .with_context(|| format!("failed to listen on {}", args.listen))?;
        let local = listener.local_addr()?;
        let ingress_listener = match ingress {
            Some(addr) => Some(
                tokio::net::TcpListener::bind(addr)
                    .await
                    .with_context(|| format!("failed to listen on {addr} for the ingress"))?,
            ),
            None => None,
        };
        if let Some(l) = &ingress_listener
            && config.state.is_some()
        {
            let at = l.local_addr()?;
            config.advertise_ingress = Some(match &args.advertise_ingress {
                Some(url) => url.trim_end_matches('/').to_owned(),
                None => format!("http://{}", advertised(at)?),
            });
        }
        if config.state.is_some() {
            config.advertise = Some(match args.advertise {
                Some(url) => url.trim_end_matches('/').to_owned(),
                None => format!(
                    "{}://{}",
                    if tls.is_some() { "https" } else { "http" },
                    advertised(local)?
                ),
            });
        }
        let api = Api::open(config, runtime, storage)
            .await
            .with_context(|| format!("failed to open the state in {state_shown}"))?;
        let app = api.router();
        api.listening_on(local);
        if let Some(listener) = ingress_listener {
            // Scripts and tests wait for this line too.
            eprintln!("wharf: ingress on http://{}", listener.local_addr()?);
            api.serve_ingress(listener);
        }
        // Scripts and tests wait for this line.
        eprintln!(
            "wharf: listening on {}://{local} (data dir {})",
            if tls.is_some() { "https" } else { "http" },
            data_dir.display()
        );
        if let Some(t) = &tls {
            eprintln!("wharf: CA fingerprint sha256:{}", t.fingerprint);
        }
        let drainer = api.drainer();
        let fenced = api.fenced();
        let shutdown = async move {
            tokio::select! {
                () = shutdown_signal() => {}
                why = fenced => {
                    // Other replicas count this one's tasks as lost
                    // already: they must not run on.
                    eprintln!("wharf: {why}");
                    std::process::exit(3);
                }
            }
            // Tasks stop first, so requests that follow their logs
            // finish too; new requests meanwhile are answered (runs
            // are refused with 409) until the listener closes.
            eprintln!("wharf: stopping tasks");
            drainer.drain().await;
        };
        serve(
            listener,
            tls.map(|t| t.config),
            app,
            shutdown,
            MAX_API_CONNECTIONS,
            API_BOUNDS,
        )
        .await;
        api.shutdown().await;
        eprintln!("wharf: stopped");
        Ok(())
    })
}

/// Connections the API listener holds at once; the next one waits in the
/// kernel's backlog until one closes (as the ingress does).
const MAX_API_CONNECTIONS: usize = 10_000;
/// How long a client may take to send a request's headers, how long a
/// connection may sit with no request in flight, and how long a client
/// may take to take a piece of a response (16 KiB a stream on HTTP/2,
/// 256 KiB on HTTP/1.1), or to send 64 KiB of a request body (nginx's
/// `send_timeout`, Apache's `MinRate`).
const API_BOUNDS: wharf_api::conn::Bounds = wharf_api::conn::Bounds {
    silent: Duration::from_secs(30),
    idle: Duration::from_secs(30),
    stall: Duration::from_secs(60),
};
/// How long a TLS client may take over its handshake.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves `app` on `listener` — over TLS (HTTP/1.1 and h2 by ALPN) when
/// `tls` is set, else HTTP/1.1 and h2c — until `shutdown` resolves, then
/// closes every connection gracefully and lets open requests finish (up
/// to 30 s). What a caller can make it hold is bounded: at most
/// `connections` at once (the server's: [`MAX_API_CONNECTIONS`]), each
/// with `bounds.silent` to send its headers (a client that trickles
/// them, or sends nothing, is dropped), closed once no request has been
/// in flight for `bounds.idle` (h2's included: hyper has no idle timeout
/// for it), dropped once a response has waited `bounds.stall` for a
/// client that does not take it (HTTP/2's withheld window included), and
/// 256 h2 streams; a request body that brings less than 64 KiB in
/// `bounds.stall` fails. Handlers see the peer's
/// address (a node's ingress must be the address it connects from).
/// Replies go out without Nagle's delay.
async fn serve(
    listener: tokio::net::TcpListener,
    tls: Option<std::sync::Arc<rustls::ServerConfig>>,
    app: axum::Router,
    shutdown: impl std::future::Future<Output = ()>,
    connections: usize,
    bounds: wharf_api::conn::Bounds,
) {
    use hyper_util::rt::{TokioExecutor, TokioTimer};
    let acceptor = tls.map(tokio_rustls::TlsAcceptor::from);
    let (stop, stopping) = tokio::sync::watch::channel(false);
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(bounds.silent);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(256);
    let places = u32::try_from(connections).expect("connections fit in u32");
    let connections = std::sync::Arc::new(tokio::sync::Semaphore::new(connections));
    wharf_api::conn::accept(&listener, &connections, shutdown, |tcp, peer, place| {
        let acceptor = acceptor.clone();
        let app = app.clone();
        let builder = builder.clone();
        let stopping = stopping.clone();
        tokio::spawn(async move {
            let _place = place;
            match acceptor {
                Some(acceptor) => {
                    // A client that never finishes its handshake is dropped.
                    let Ok(Ok(stream)) =
                        tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await
                    else {
                        return;
                    };
                    serve_connection(stream, peer, &builder, app, stopping, bounds).await;
                }
                None => serve_connection(tcp, peer, &builder, app, stopping, bounds).await,
            }
        });
    })
    .await;
    // New clients are refused while the open requests finish, not left
    // in the backlog of a listener nobody accepts on.
    drop(listener);
    stop.send_replace(true);
    // Each connection gives its place back as it ends.
    let _ = tokio::time::timeout(Duration::from_secs(30), connections.acquire_many(places)).await;
}

/// One connection of [`serve`] under [`wharf_api::conn::supervise`]:
/// dropped if it has sent no byte within `bounds.silent` (hyper's own
/// header timeout starts only once it has sniffed the protocol), closed
/// gracefully once no request has been in flight for as long or when
/// `stopping` turns true. Each request's body fails if it brings less
/// than 64 KiB in `bounds.stall`, and its handler sees `peer`.
async fn serve_connection<S>(
    io: S,
    peer: SocketAddr,
    builder: &hyper_util::server::conn::auto::Builder<hyper_util::rt::TokioExecutor>,
    app: axum::Router,
    stopping: tokio::sync::watch::Receiver<bool>,
    bounds: wharf_api::conn::Bounds,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let activity = wharf_api::conn::Activity::new();
    let service = wharf_api::conn::counted(&activity, move |request| {
        let mut request = request
            .map(|body| axum::body::Body::new(wharf_api::conn::StallBody::new(body, bounds.stall)));
        request
            .extensions_mut()
            .insert(axum::extract::ConnectInfo(peer));
        let answer = tower::ServiceExt::oneshot(app.clone(), request);
        async move {
            match answer.await {
                Ok(response) => response,
                Err(never) => match never {},
            }
        }
    });
    let conn = builder
        .serve_connection_with_upgrades(hyper_util::rt::TokioIo::new(activity.io(io)), service)
        .into_owned();
    let _ =
        wharf_api::conn::supervise(conn, |c| c.graceful_shutdown(), &activity, bounds, stopping)
            .await;
}

/// Resolves on Ctrl-C or SIGTERM: stop accepting, finish in-flight requests.
pub(crate) async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
}

#[cfg(test)]
mod serve_tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    use super::*;

    /// `app` served on a loopback port with these bounds, until the
    /// sender is used.
    async fn start(
        app: axum::Router,
        connections: usize,
        header_timeout: Duration,
    ) -> (
        SocketAddr,
        tokio::sync::oneshot::Sender<()>,
        tokio::task::JoinHandle<()>,
    ) {
        let bounds = wharf_api::conn::Bounds {
            silent: header_timeout,
            idle: header_timeout,
            stall: Duration::from_secs(60),
        };
        start_with(app, connections, bounds).await
    }

    async fn start_with(
        app: axum::Router,
        connections: usize,
        bounds: wharf_api::conn::Bounds,
    ) -> (
        SocketAddr,
        tokio::sync::oneshot::Sender<()>,
        tokio::task::JoinHandle<()>,
    ) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let shutdown = async {
            let _ = stopped.await;
        };
        let server = tokio::spawn(serve(listener, None, app, shutdown, connections, bounds));
        (addr, stop, server)
    }

    /// Stops the listener and waits at most `within` for it to end.
    async fn shut_down(
        stop: tokio::sync::oneshot::Sender<()>,
        server: tokio::task::JoinHandle<()>,
        within: Duration,
    ) {
        stop.send(()).unwrap();
        tokio::time::timeout(within, server)
            .await
            .expect("the listener ends at shutdown")
            .unwrap();
    }

    /// What a hostile client can make the API listener hold: connections
    /// past the cap wait unserved, and a client that trickles its headers
    /// or idles loses its connection after the header timeout, which
    /// frees its place.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_api_listener_holds_at_most_its_cap_and_drops_slow_and_idle_clients() {
        let app = axum::Router::new().route("/", axum::routing::get(|| async { "ok" }));
        let (addr, stop, server) = start(app, 2, Duration::from_millis(400)).await;
        // One trickles a request line and stops; one says nothing.
        let mut slow = TcpStream::connect(addr).await.unwrap();
        slow.write_all(b"GET / HTTP/1.1\r\n").await.unwrap();
        let mut idle = TcpStream::connect(addr).await.unwrap();
        // A third gets through the kernel's backlog but no answer while
        // both places are held.
        let mut third = TcpStream::connect(addr).await.unwrap();
        third
            .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let mut buf = [0u8; 256];
        assert!(
            tokio::time::timeout(Duration::from_millis(200), third.read(&mut buf))
                .await
                .is_err(),
            "served a connection past the cap"
        );
        // The header timeout drops the two, and the third is served.
        let n = tokio::time::timeout(Duration::from_secs(5), third.read(&mut buf))
            .await
            .expect("answered once a place was free")
            .unwrap();
        assert!(
            buf[..n].starts_with(b"HTTP/1.1 200"),
            "{}",
            String::from_utf8_lossy(&buf[..n])
        );
        for client in [&mut slow, &mut idle] {
            let closed = tokio::time::timeout(Duration::from_secs(5), async {
                loop {
                    match client.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        // hyper may answer the half request with a 408
                        // before it closes.
                        Ok(_) => continue,
                    }
                }
            })
            .await;
            assert!(closed.is_ok(), "a slow or idle client kept its connection");
        }
        shut_down(stop, server, Duration::from_secs(35)).await;
    }
    /// At shutdown a request in flight finishes, and a new client is
    /// refused at once instead of waiting in the backlog.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn at_shutdown_open_requests_finish_and_new_clients_are_refused() {
        let app = axum::Router::new().route(
            "/slow",
            axum::routing::get(|| async {
                tokio::time::sleep(Duration::from_millis(500)).await;
                "done"
            }),
        );
        let (addr, stop, server) = start(app, 8, Duration::from_secs(5)).await;
        let mut open = TcpStream::connect(addr).await.unwrap();
        open.write_all(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        stop.send(()).unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(
            TcpStream::connect(addr).await.is_err(),
            "a new client was let in during the drain"
        );
        let mut answer = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), open.read_to_end(&mut answer))
            .await
            .expect("the open request finished and its connection closed")
            .unwrap();
        let answer = String::from_utf8_lossy(&answer);
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        assert!(answer.ends_with("done"), "{answer}");
        tokio::time::timeout(Duration::from_secs(5), server)
            .await
            .expect("the listener ends once its requests are done")
            .unwrap();
    }

    /// Reads HTTP/2 frames until the server closes: their types, and
    /// the bytes of DATA frames; sends `every.1` every `every.0` meanwhile.
    async fn h2_frames_until_closed(
        io: &mut TcpStream,
        limit: Duration,
        every: Option<(Duration, &[u8])>,
    ) -> (Vec<u8>, Vec<u8>) {
        let (mut types, mut data, mut all) = (Vec::new(), Vec::new(), Vec::new());
        let mut buf = [0u8; 4096];
        let (period, tick_bytes) = every.unwrap_or((Duration::from_secs(3600), &[]));
        let mut tick = tokio::time::interval(period);
        tick.tick().await;
        tokio::time::timeout(limit, async {
            loop {
                tokio::select! {
                    read = io.read(&mut buf) => match read {
                        Ok(0) | Err(_) => return,
                        Ok(n) => all.extend_from_slice(&buf[..n]),
                    },
                    _ = tick.tick() => {
                        if io.write_all(tick_bytes).await.is_err() {
                            return;
                        }
                        continue;
                    }
                }
                while all.len() >= 9 {
                    let len =
                        usize::from(all[0]) << 16 | usize::from(all[1]) << 8 | usize::from(all[2]);
                    if all.len() < 9 + len {
                        break;
                    }
                    types.push(all[3]);
                    if all[3] == 0 {
                        data.extend_from_slice(&all[9..9 + len]);
                    }
                    all.drain(..9 + len);
                }
            }
        })
        .await
        .expect("the server closed the connection");
        (types, data)
    }

    /// An HTTP/2 frame.
    fn h2_frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let len = u32::try_from(payload.len()).unwrap().to_be_bytes();
        let mut frame = vec![len[1], len[2], len[3], kind, flags];
        frame.extend_from_slice(&stream.to_be_bytes());
        frame.extend_from_slice(payload);
        frame
    }

    /// HEADERS for `GET path` on `stream`, END_STREAM | END_HEADERS; HPACK
    /// literals without indexing: :method GET, :scheme http, :path,
    /// :authority x.
    fn h2_get(stream: u32, path: &str) -> Vec<u8> {
        let mut block = vec![0x82, 0x86, 0x04, u8::try_from(path.len()).unwrap()];
        block.extend_from_slice(path.as_bytes());
        block.extend_from_slice(&[0x01, 1, b'x']);
        h2_frame(1, 0x05, stream, &block)
    }

    /// A WINDOW_UPDATE of `by` bytes for `stream` (0: the connection).
    fn h2_window_update(stream: u32, by: u32) -> Vec<u8> {
        h2_frame(8, 0, stream, &by.to_be_bytes())
    }

    const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
    /// An empty SETTINGS frame.
    const H2_SETTINGS: &[u8] = &[0, 0, 0, 4, 0, 0, 0, 0, 0];
    const GOAWAY: u8 = 7;

    /// hyper keeps an HTTP/2 connection with no stream open for ever (a
    /// client can hold every place of the cap with them): closed with a
    /// GOAWAY once nothing has been in flight for the idle time, counted
    /// from the end of its last response — a body streamed for longer is
    /// not cut.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_idle_http2_connection_is_closed_but_a_long_response_is_not() {
        let app = axum::Router::new().route(
            "/stream",
            axum::routing::get(|| async {
                let chunks = futures_util::stream::unfold(0u32, |i| async move {
                    if i == 4 {
                        return None;
                    }
                    tokio::time::sleep(Duration::from_millis(300)).await;
                    Some((
                        Ok::<_, std::convert::Infallible>(format!("chunk{i};")),
                        i + 1,
                    ))
                });
                axum::body::Body::from_stream(chunks)
            }),
        );
        let idle = Duration::from_millis(500);
        let (addr, stop, server) = start(app, 8, idle).await;

        // Says hello in HTTP/2 and nothing more.
        let started = std::time::Instant::now();
        let mut quiet = TcpStream::connect(addr).await.unwrap();
        quiet.write_all(H2_PREFACE).await.unwrap();
        quiet.write_all(H2_SETTINGS).await.unwrap();
        let (types, _) = h2_frames_until_closed(&mut quiet, Duration::from_secs(5), None).await;
        assert!(
            types.contains(&GOAWAY),
            "closed without a GOAWAY: {types:?}"
        );
        assert!(
            started.elapsed() >= idle,
            "closed after {:?}",
            started.elapsed()
        );

        // One request whose body streams for 1.2 s, more than twice the
        // idle time: served whole, then the connection goes idle.
        let started = std::time::Instant::now();
        let mut busy = TcpStream::connect(addr).await.unwrap();
        busy.write_all(H2_PREFACE).await.unwrap();
        busy.write_all(H2_SETTINGS).await.unwrap();
        busy.write_all(&h2_get(1, "/stream")).await.unwrap();
        let (types, data) = h2_frames_until_closed(&mut busy, Duration::from_secs(10), None).await;
        assert_eq!(
            String::from_utf8_lossy(&data),
            "chunk0;chunk1;chunk2;chunk3;",
            "{types:?}"
        );
        assert!(
            types.contains(&GOAWAY),
            "closed without a GOAWAY: {types:?}"
        );
        assert!(
            started.elapsed() >= Duration::from_millis(1200) + idle,
            "closed after {:?}",
            started.elapsed()
        );
        shut_down(stop, server, Duration::from_secs(5)).await;
    }

    /// hyper has no body or write timeouts: a client that stops sending
    /// its request body, or stops reading its response, would hold its
    /// connection (and its place under the cap) for ever. The body fails
    /// after the stall time (400), and the connection whose response
    /// waits is dropped, which frees its place.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_stalled_body_fails_and_a_client_that_does_not_read_loses_its_place() {
        let app = axum::Router::new()
            .route(
                "/echo",
                axum::routing::post(|body: axum::body::Body| async move {
                    match axum::body::to_bytes(body, 1 << 20).await {
                        Ok(bytes) => (axum::http::StatusCode::OK, bytes.len().to_string()),
                        Err(e) => (axum::http::StatusCode::BAD_REQUEST, e.to_string()),
                    }
                }),
            )
            .route(
                "/big",
                axum::routing::get(|| async { vec![b'x'; 64 << 20] }),
            )
            .route("/", axum::routing::get(|| async { "ok" }));
        let stall = Duration::from_millis(500);
        // A stall is looked for once the first (silent) second is over.
        let bounds = wharf_api::conn::Bounds {
            silent: Duration::from_secs(1),
            idle: Duration::from_secs(1),
            stall,
        };
        let (addr, stop, server) = start_with(app, 1, bounds).await;
        // Ten bytes of a hundred, then nothing.
        let mut trickle = TcpStream::connect(addr).await.unwrap();
        trickle
            .write_all(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n0123456789")
            .await
            .unwrap();
        let started = std::time::Instant::now();
        let mut buf = [0u8; 512];
        let n = tokio::time::timeout(Duration::from_secs(5), trickle.read(&mut buf))
            .await
            .expect("answered once the body stalled")
            .unwrap();
        let answer = String::from_utf8_lossy(&buf[..n]);
        assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
        assert!(started.elapsed() >= stall, "{:?}", started.elapsed());
        drop(trickle);
        // 64 MiB asked for and never read; the next client waits for the
        // only place.
        let mut deaf = TcpStream::connect(addr).await.unwrap();
        deaf.write_all(b"GET /big HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        let started = std::time::Instant::now();
        let mut next = TcpStream::connect(addr).await.unwrap();
        next.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let n = tokio::time::timeout(Duration::from_secs(5), next.read(&mut buf))
            .await
            .expect("served once the deaf client lost its place")
            .unwrap();
        let answer = String::from_utf8_lossy(&buf[..n]);
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        assert!(started.elapsed() >= stall / 2, "{:?}", started.elapsed());
        drop(deaf);
        shut_down(stop, server, Duration::from_secs(5)).await;
    }

    /// HTTP/2's flow control lets a client that reads the socket (and
    /// pings) hold responses without a blocked write: granting no window,
    /// hyper never asks a body for its next frame, and each body holds
    /// its next chunk. Such a connection is dropped after the stall time;
    /// one that grants window slowly but steadily is served whole, however
    /// long that takes.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_http2_client_that_grants_no_window_loses_its_connection_and_a_slow_one_does_not() {
        let app = axum::Router::new()
            .route("/big", axum::routing::get(|| async { vec![b'x'; 4 << 20] }))
            .route(
                "/mib",
                // One frame of 1 MiB, then the end as a frame of its own:
                // sent whole, its end would be asked for only once the
                // client has taken the lot.
                axum::routing::get(|| async {
                    axum::body::Body::from_stream(futures_util::stream::iter([Ok::<
                        _,
                        std::convert::Infallible,
                    >(
                        vec![b'y'; 1 << 20],
                    )]))
                }),
            );
        let stall = Duration::from_millis(800);
        let bounds = wharf_api::conn::Bounds {
            silent: Duration::from_secs(1),
            idle: Duration::from_secs(1),
            stall,
        };
        let (addr, stop, server) = start_with(app, 4, bounds).await;
        let ping = h2_frame(6, 0, 0, &[1; 8]);

        // Two streams of 4 MiB, no WINDOW_UPDATE ever, a ping every
        // 100 ms: the first takes the connection's 64 KiB window, the
        // second none.
        let started = std::time::Instant::now();
        let mut stingy = TcpStream::connect(addr).await.unwrap();
        stingy.write_all(H2_PREFACE).await.unwrap();
        stingy.write_all(H2_SETTINGS).await.unwrap();
        stingy.write_all(&h2_get(1, "/big")).await.unwrap();
        stingy.write_all(&h2_get(3, "/big")).await.unwrap();
        let (types, data) = h2_frames_until_closed(
            &mut stingy,
            Duration::from_secs(10),
            Some((Duration::from_millis(100), &ping)),
        )
        .await;
        let took = started.elapsed();
        assert!(data.len() <= 65_535, "{} bytes past the window", data.len());
        assert!(
            took >= stall && took < stall + Duration::from_secs(3),
            "dropped after {took:?}; frames {types:?}"
        );

        // 1 MiB, granted 32 KiB every 100 ms (3 s in all, several stall
        // times; each 16 KiB piece well within one).
        let started = std::time::Instant::now();
        let mut slow = TcpStream::connect(addr).await.unwrap();
        slow.write_all(H2_PREFACE).await.unwrap();
        slow.write_all(H2_SETTINGS).await.unwrap();
        slow.write_all(&h2_get(1, "/mib")).await.unwrap();
        let mut grant = h2_window_update(0, 32 << 10);
        grant.extend_from_slice(&h2_window_update(1, 32 << 10));
        let (types, data) = h2_frames_until_closed(
            &mut slow,
            Duration::from_secs(20),
            Some((Duration::from_millis(100), &grant)),
        )
        .await;
        assert_eq!(data.len(), 1 << 20, "frames {types:?}");
        assert!(data.iter().all(|b| *b == b'y'));
        // Closed for being idle once served, not dropped.
        assert!(types.contains(&GOAWAY), "{types:?}");
        assert!(
            started.elapsed() >= stall * 3,
            "served in {:?}",
            started.elapsed()
        );
        shut_down(stop, server, Duration::from_secs(5)).await;
    }
}
