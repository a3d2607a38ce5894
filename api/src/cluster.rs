//! Several `wharf server` replicas on one PostgreSQL database and one
//! object store (issue 12).
//!
//! - **Replica rows.** Each process holds the row of its replica name
//!   (`--replica`, also its local node's name, so a task's `node` says
//!   which replica runs it) with a lease by the database's clock, renewed
//!   every [`Cluster::ttl`]/6. A process that cannot renew within the TTL
//!   (by its own clock, counted from before the renewal was sent, so it
//!   gives up before the database lets anyone take over) while other
//!   replicas live, or that finds its row or the lease taken, is
//!   *fenced*: [`Cluster::fenced`] resolves and the server exits, rather
//!   than run tasks that another replica already counts as lost. Alone
//!   on the database, a late renewal takes nothing from anyone.
//! - **The `control` lease.** One replica, the leader, holds it: it runs
//!   the services' reconcilers, the autoscaler, the edge nodes' protocol
//!   and the janitor. Its fencing token grows at every change of holder.
//!   A new leader first forgets the replicas whose lease ran out (their
//!   tasks become `NodeLost` in the same transaction that drops their
//!   row), then waits until no other replica holds a service task, then
//!   takes the edge nodes' tasks over and loads the services — the
//!   reconciler then refills them, so no desired slot runs twice.
//! - **Requests go where the state is.** Every replica serves `/v2/`
//!   (the registry lives in the shared object store), task definitions,
//!   secrets, tokens and reads from the database, and runs one-off tasks
//!   on its own node. Services, nodes and the node protocol are the
//!   leader's: other replicas forward those requests to it, and a task's
//!   requests to the replica that runs it. A forwarded request carries
//!   the cluster's replica key (from the database) and the client's
//!   address, which only a request with the right key may set.
//! - **Caches.** Tokens are reloaded when a replica notifies a change
//!   (PostgreSQL `LISTEN/NOTIFY`), and whenever the notification channel
//!   was lost. Task definitions are cached too, with read-your-writes
//!   across replicas: each change counts a generation in its transaction
//!   and notifies; every replica drops its cache when told (or when the
//!   channel was lost, or every TTL/6 if the generation moved) and records
//!   the generation it is fresh for; the replica that made the change
//!   answers its client only once every other live replica has recorded
//!   it, or after a TTL and a third, by when one that has not no longer
//!   uses its cache (a replica uses it only within a TTL of its last
//!   catch-up, and reads the database otherwise).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderValue, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use tokio::sync::watch;

use crate::control::Control;
use crate::db::{Replica, StateStore};
use crate::error::{ApiError, ErrorCode};

/// How long a replica's lease lasts without a renewal (default).
pub const DEFAULT_LEASE_TTL: Duration = Duration::from_secs(3);

/// The notification that tokens changed.
pub(crate) const TOKENS_CHANGED: &str = "tokens";
/// The notification that task definitions changed.
pub(crate) const DEFS_CHANGED: &str = "taskdefs";

/// The header a forwarded request carries the replica key in.
const KEY_HEADER: &str = "x-wharf-replica-key";
/// The header a forwarded request carries the client's address in.
const PEER_HEADER: &str = "x-wharf-peer";

/// The largest body of `POST /v1/tasks` a replica reads to decide where
/// the request goes (a run request is a small JSON document).
const MAX_ROUTED_BODY: usize = 1 << 20;

/// This process as one of several replicas.
pub struct Cluster {
    /// Its row.
    pub me: Replica,
    /// Its lease's length.
    pub ttl: Duration,
    key: String,
    /// Whether it holds the `control` lease (and when it lapses by the
    /// local clock).
    leading: AtomicBool,
    lead_until: std::sync::Mutex<Option<Instant>>,
    fence: AtomicI64,
    fenced_tx: watch::Sender<Option<String>>,
    /// The leader as of the last round (every TTL/6).
    leader: std::sync::Mutex<Option<Replica>>,
    /// Whether `client` speaks TLS (to `https://` replicas).
    tls: bool,
    /// Whether the leader's duties are loaded (see `set_ready`).
    ready: AtomicBool,
    /// Places for request bodies held while routing ([`MAX_HELD_REQUESTS`]).
    held: tokio::sync::Semaphore,
    /// Whether the last round saw no other live replica: nobody could
    /// take over, so a late renewal is no reason to stop.
    alone: AtomicBool,
    client: hyper_util::client::legacy::Client<
        hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>,
        Body,
    >,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("me", &self.me.name)
            .finish_non_exhaustive()
    }
}

impl Cluster {
    /// Takes the replica row of `me.name`, waiting up to the TTL and a
    /// second for a previous process of that name to run out.
    pub(crate) async fn join(
        store: &dyn StateStore,
        me: Replica,
        ttl: Duration,
        tls: Option<Arc<rustls::ClientConfig>>,
    ) -> Result<Arc<Cluster>, sqlx::Error> {
        let replicas = store.replicas().expect("a store with replicas");
        if store
            .nodes()
            .await?
            .iter()
            .any(|n| n.name == me.name && n.credential_hash.is_some())
        {
            return Err(sqlx::Error::Configuration(
                format!(
                    "an edge node is named {}: give this replica another --replica NAME",
                    me.name
                )
                .into(),
            ));
        }
        let deadline = Instant::now() + ttl + Duration::from_secs(1);
        while !replicas.claim(&me, ttl).await? {
            if Instant::now() >= deadline {
                return Err(sqlx::Error::Configuration(
                    format!(
                        "replica {} is already running on this database: give each server its own --replica NAME",
                        me.name
                    )
                    .into(),
                ));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let key = replicas.replica_key().await?;
        Ok(Arc::new(Cluster {
            me,
            ttl,
            key,
            leading: AtomicBool::new(false),
            lead_until: std::sync::Mutex::new(None),
            fence: AtomicI64::new(0),
            fenced_tx: watch::channel(None).0,
            leader: std::sync::Mutex::new(None),
            tls: tls.is_some(),
            ready: AtomicBool::new(false),
            held: tokio::sync::Semaphore::new(MAX_HELD_REQUESTS),
            alone: AtomicBool::new(true),
            client: hyper_util::client::legacy::Client::builder(
                hyper_util::rt::TokioExecutor::new(),
            )
            // Less than the API keeps an idle connection (30 s).
            .pool_idle_timeout(Duration::from_secs(20))
            .build(connector(tls)),
        }))
    }

    /// A place to hold a request's body while routing it, if one is free.
    fn hold(&self) -> Option<tokio::sync::SemaphorePermit<'_>> {
        self.held.try_acquire().ok()
    }

    /// Says the leader's duties are loaded (services, edge nodes): from
    /// now on it serves the leader's routes.
    pub(crate) fn set_ready(&self) {
        self.ready.store(true, Ordering::Release);
    }

    /// Whether this replica leads and has taken over (its services and
    /// edge nodes are loaded): the leader's routes are served here.
    pub fn serves_leader(&self) -> bool {
        self.ready.load(Ordering::Acquire) && self.is_leader()
    }

    /// Whether this replica leads now (by its own clock, with a margin).
    pub fn is_leader(&self) -> bool {
        self.leading.load(Ordering::Acquire)
            && self
                .lead_until
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .is_some_and(|t| Instant::now() < t)
    }

    /// At start: takes the `control` lease if it is free, waiting (up to
    /// the TTL and a second) while a lease whose holder is gone runs out
    /// — unless another live replica leads. `true`: this replica leads.
    pub(crate) async fn lead_at_start(&self, store: &dyn StateStore) -> Result<bool, sqlx::Error> {
        let replicas = store.replicas().expect("a store with replicas");
        let deadline = Instant::now() + self.ttl + Duration::from_secs(1);
        loop {
            let sent = Instant::now();
            if let Some(fence) = replicas.lead(&self.me, self.ttl).await? {
                self.fence.store(fence, Ordering::Release);
                *self.lead_until.lock().unwrap_or_else(|p| p.into_inner()) =
                    Some(sent + self.ttl - self.margin());
                self.leading.store(true, Ordering::Release);
                tracing::info!(replica = %self.me.name, fence, "this replica leads");
                return Ok(true);
            }
            let all = replicas.list().await?;
            let leader = all.iter().find(|r| r.leader && r.id != self.me.id);
            if let Some(l) = leader
                && !l.expired
            {
                *self.leader.lock().unwrap_or_else(|p| p.into_inner()) = Some(l.clone());
                return Ok(false);
            }
            if Instant::now() >= deadline {
                return Ok(false);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The leader's fencing token (0 before it ever led).
    pub fn fence(&self) -> i64 {
        self.fence.load(Ordering::Acquire)
    }

    /// Resolves with the reason once this replica must stop: its lease ran
    /// out, or another process took its name or the `control` lease.
    pub fn fenced(&self) -> impl std::future::Future<Output = String> + Send + 'static {
        let mut rx = self.fenced_tx.subscribe();
        async move {
            loop {
                if let Some(why) = rx.borrow_and_update().clone() {
                    return why;
                }
                if rx.changed().await.is_err() {
                    return "the replica closed".into();
                }
            }
        }
    }

    pub(crate) fn fence_off(&self, why: String) {
        self.leading.store(false, Ordering::Release);
        tracing::error!(replica = %self.me.name, "{why}");
        self.fenced_tx.send_if_modified(|w| {
            if w.is_none() {
                *w = Some(why);
                true
            } else {
                false
            }
        });
    }

    /// The margin kept from the lease's end: a replica acts only while it
    /// is sure the database still counts it.
    fn margin(&self) -> Duration {
        self.ttl / 6
    }

    /// Renews the lease every TTL/6 and tries for the `control` lease
    /// (`became_leader` is told when it is taken) until shutdown or until
    /// fenced. While it leads, it forgets the replicas whose lease ran
    /// out and hands their lost tasks to `on_lost`.
    pub(crate) async fn keep(
        self: Arc<Self>,
        store: Arc<dyn StateStore>,
        mut became_leader: Option<tokio::sync::oneshot::Sender<()>>,
        mut shutdown: watch::Receiver<bool>,
        on_lost: impl Fn(Vec<crate::model::Task>) + Send,
    ) {
        let replicas = store.replicas().expect("a store with replicas");
        let mut valid_until = Instant::now() + self.ttl - self.margin();
        loop {
            let sent = Instant::now();
            let round = tokio::time::timeout(self.ttl / 3, async {
                let renewed = replicas.renew(&self.me, self.ttl).await?;
                let lead = if renewed {
                    replicas.lead(&self.me, self.ttl).await?
                } else {
                    None
                };
                Ok::<_, sqlx::Error>((renewed, lead))
            })
            .await;
            match round {
                Ok(Ok((false, _))) => {
                    return self.fence_off(format!(
                        "another process took replica {}'s row: this one stops",
                        self.me.name
                    ));
                }
                Ok(Ok((true, lead))) => {
                    valid_until = sent + self.ttl - self.margin();
                    match lead {
                        Some(fence) => {
                            *self.lead_until.lock().unwrap_or_else(|p| p.into_inner()) =
                                Some(valid_until);
                            let old = self.fence.swap(fence, Ordering::AcqRel);
                            if !self.leading.swap(true, Ordering::AcqRel) {
                                tracing::info!(replica = %self.me.name, fence, "this replica leads");
                                if let Some(tx) = became_leader.take() {
                                    let _ = tx.send(());
                                }
                            } else if old != fence {
                                return self.fence_off(format!(
                                    "the control lease changed hands ({old} to {fence}): this replica stops"
                                ));
                            }
                        }
                        None if self.leading.load(Ordering::Acquire) => {
                            return self.fence_off(
                                "another replica took the control lease: this one stops".into(),
                            );
                        }
                        None => {}
                    }
                }
                Ok(Err(e)) => tracing::warn!(error = %e, "cannot renew the replica lease"),
                Err(_) => tracing::warn!("renewing the replica lease timed out"),
            }
            // Late, with others who may have taken over: stop. Alone, a
            // late renewal (a pause, a slow database) takes nothing from
            // anyone, and the next one that succeeds carries on.
            if Instant::now() >= valid_until && !self.alone.load(Ordering::Acquire) {
                return self.fence_off(format!(
                    "replica {} could not renew its lease within {:?}: it stops, since other replicas now count its tasks as lost",
                    self.me.name, self.ttl
                ));
            }
            match replicas.list().await {
                Ok(all) => {
                    *self.leader.lock().unwrap_or_else(|p| p.into_inner()) =
                        all.iter().find(|r| r.leader).cloned();
                    self.alone.store(
                        !all.iter().any(|r| r.id != self.me.id && !r.expired),
                        Ordering::Release,
                    );
                    if self.is_leader() {
                        on_lost(forget_expired(&*store, &self.me, all).await);
                    }
                }
                Err(e) => tracing::warn!(error = %e, "cannot list the replicas"),
            }
            tokio::select! {
                _ = shutdown.changed() => return,
                () = tokio::time::sleep(self.ttl / 6) => {}
            }
        }
    }

    /// The replica that led at the last round (at most TTL/6 ago).
    pub(crate) fn leader(&self) -> Option<Replica> {
        self.leader
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The leader: the last round's, or the database's if that knew none
    /// (a replica that just started, or during a change of leader).
    pub(crate) async fn find_leader(&self, store: &dyn StateStore) -> Option<Replica> {
        if let Some(l) = self.leader() {
            return Some(l);
        }
        let found = store
            .replicas()?
            .list()
            .await
            .ok()?
            .into_iter()
            .find(|r| r.leader);
        if found.is_some() {
            self.leader
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone_from(&found);
        }
        found
    }

    /// Where this replica's ingress sends a request: here (it leads, or
    /// another replica relayed the request already), the leader's
    /// ingress, or nowhere yet (no replica leads).
    pub(crate) fn ingress_relay(self: &Arc<Self>, relayed: bool) -> crate::ingress::Relay {
        if relayed || self.serves_leader() {
            return crate::ingress::Relay::Here;
        }
        match self.leader() {
            Some(l) if l.id != self.me.id => match l.ingress_url {
                Some(url) => crate::ingress::Relay::To(url, self.clone()),
                None => crate::ingress::Relay::Nowhere(format!(
                    "replica {}, which serves the HTTP services, has no ingress",
                    l.name
                )),
            },
            _ if self.leader().is_some() => crate::ingress::Relay::Here,
            _ => crate::ingress::Relay::Nowhere(
                "no replica leads the cluster at the moment (one takes over within seconds)".into(),
            ),
        }
    }

    /// Lets go: the row and the lease (if held) go at once, so another
    /// replica takes over without waiting for them to run out.
    pub(crate) async fn leave(&self, store: &dyn StateStore) {
        if let Some(r) = store.replicas()
            && let Err(e) = r.leave(&self.me).await
        {
            tracing::warn!(error = %e, "cannot give up the replica lease");
        }
    }

    /// Sends a request to another replica as it is.
    pub(crate) async fn send(
        &self,
        req: Request,
    ) -> Result<axum::http::Response<hyper::body::Incoming>, hyper_util::client::legacy::Error>
    {
        self.client.request(req).await
    }

    /// Whether `req` was forwarded by another replica (it carries the key).
    fn forwarded(&self, req: &Request) -> bool {
        req.headers()
            .get(KEY_HEADER)
            .and_then(|v| v.to_str().ok())
            // Hashes compare in time independent of the key's bytes.
            .is_some_and(|v| crate::auth::hash(v) == crate::auth::hash(&self.key))
    }

    /// Sends `req` to `to` and streams its answer back. `Err` when `to`
    /// took no connection (nothing reached it: the request may go
    /// elsewhere), saying why.
    async fn forward(
        &self,
        mut req: Request,
        to: &Replica,
        peer: Option<SocketAddr>,
    ) -> Result<Response, String> {
        let Some(path) = req.uri().path_and_query().map(|p| p.as_str().to_owned()) else {
            return Ok(ApiError::invalid("path", "no path").into_response());
        };
        let scheme_ok =
            to.api_url.starts_with("http://") || (to.api_url.starts_with("https://") && self.tls);
        if !scheme_ok {
            return Ok(ApiError::new(
                ErrorCode::Unavailable,
                format!(
                    "replica {} serves {} but this one has no TLS to reach it with: give every replica TLS with one CA, or none",
                    to.name, to.api_url
                ),
            )
            .into_response());
        }
        let Ok(uri) = format!("{}{path}", to.api_url).parse::<axum::http::Uri>() else {
            return Ok(ApiError::new(
                ErrorCode::Internal,
                format!("replica {}'s address {} is not a URL", to.name, to.api_url),
            )
            .into_response());
        };
        *req.uri_mut() = uri;
        // The client speaks HTTP/1.1 to replicas, whatever the caller spoke.
        *req.version_mut() = axum::http::Version::HTTP_11;
        let headers = req.headers_mut();
        for hop in [
            header::CONNECTION,
            header::HOST,
            header::TE,
            header::UPGRADE,
        ] {
            headers.remove(hop);
        }
        headers.remove(PEER_HEADER);
        if let Ok(key) = HeaderValue::from_str(&self.key) {
            headers.insert(KEY_HEADER, key);
        }
        if let Some(peer) = peer
            && let Ok(v) = HeaderValue::from_str(&peer.to_string())
        {
            headers.insert(PEER_HEADER, v);
        }
        match self.client.request(req).await {
            Ok(resp) => Ok(resp.map(Body::new)),
            Err(e) => {
                // A dead leader: the next request asks the database again.
                let mut cached = self.leader.lock().unwrap_or_else(|p| p.into_inner());
                if cached.as_ref().is_some_and(|l| l.id == to.id) {
                    *cached = None;
                }
                drop(cached);
                let why = format!("replica {} did not answer ({e})", to.name);
                if e.is_connect() {
                    Err(why)
                } else {
                    Ok(unavailable(format!("{why}: try again")))
                }
            }
        }
    }
}

/// A 503 with `Retry-After: 1`.
fn unavailable(message: String) -> Response {
    let mut resp = ApiError::new(ErrorCode::Unavailable, message).into_response();
    resp.headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    resp
}

/// The largest body a follower holds while it finds the leader (the
/// API's JSON bodies are at most 2 MB too).
const MAX_HELD_BODY: usize = 2 << 20;

/// Requests whose bodies a replica holds at once while it routes them
/// (before any authentication: the replica that serves them
/// authenticates): at most this many × [`MAX_HELD_BODY`] of memory.
const MAX_HELD_REQUESTS: usize = 64;

/// The answer when [`MAX_HELD_REQUESTS`] are held already.
fn too_many_held() -> Response {
    unavailable(format!(
        "this replica holds {MAX_HELD_REQUESTS} requests for other replicas already: try again"
    ))
}

/// A request as it came, again, to send or serve once more.
fn again(parts: &axum::http::request::Parts, body: &bytes::Bytes) -> Request {
    let mut req = Request::new(Body::from(body.clone()));
    *req.method_mut() = parts.method.clone();
    *req.uri_mut() = parts.uri.clone();
    *req.version_mut() = parts.version;
    *req.headers_mut() = parts.headers.clone();
    // The route's path parameters and the client's address among them.
    *req.extensions_mut() = parts.extensions.clone();
    req
}

/// Serves a leader's request here (this replica leads) or at the leader.
/// While no replica leads, or the one that led took no connection (it
/// just died), the request is held — for at most the lease's length and
/// two seconds, as long as a takeover takes — so a client sees a change
/// of leader as a slower answer, not an error.
async fn to_leader(
    control: &Control,
    cluster: &Cluster,
    req: Request,
    next: Next,
    peer: Option<SocketAddr>,
) -> Response {
    if cluster.serves_leader() {
        return next.run(req).await;
    }
    let Some(_held) = cluster.hold() else {
        return too_many_held();
    };
    let (parts, body) = req.into_parts();
    let Ok(body) = axum::body::to_bytes(body, MAX_HELD_BODY).await else {
        return ApiError::new(
            ErrorCode::InvalidRequest,
            format!("the request body is over {MAX_HELD_BODY} bytes, or it broke off"),
        )
        .into_response();
    };
    let deadline = Instant::now() + cluster.ttl + Duration::from_secs(2);
    let mut why = "no replica leads the cluster at the moment".to_owned();
    while Instant::now() < deadline {
        if cluster.serves_leader() {
            return next.run(again(&parts, &body)).await;
        }
        match cluster.find_leader(&*control.store).await {
            // This replica leads but is still taking over: wait.
            Some(l) if l.id == cluster.me.id => {}
            Some(l) => match cluster.forward(again(&parts, &body), &l, peer).await {
                Ok(resp) => return resp,
                Err(e) => why = e,
            },
            None => {}
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    unavailable(format!(
        "{why} (a replica takes over within seconds): try again"
    ))
}

/// Forgets every replica of `all` but `me` whose lease ran out; returns
/// the tasks that were lost with them.
pub(crate) async fn forget_expired(
    store: &dyn StateStore,
    me: &Replica,
    all: Vec<Replica>,
) -> Vec<crate::model::Task> {
    let Some(replicas) = store.replicas() else {
        return Vec::new();
    };
    let mut lost = Vec::new();
    for r in all.iter().filter(|r| r.expired && r.id != me.id) {
        match replicas.forget(&r.name, &r.id, &crate::model::now()).await {
            Ok(Some(tasks)) => {
                tracing::warn!(replica = %r.name, tasks = tasks.len(), "replica lost: its lease ran out");
                lost.extend(tasks);
            }
            Ok(None) => {}
            Err(e) => tracing::warn!(replica = %r.name, error = %e, "cannot forget a replica"),
        }
    }
    lost
}

/// Connections to other replicas: `https://` with the replicas' shared
/// CA when they serve TLS, else plain HTTP only.
fn connector(
    tls: Option<Arc<rustls::ClientConfig>>,
) -> hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector> {
    let mut http = hyper_util::client::legacy::connect::HttpConnector::new();
    http.enforce_http(false);
    http.set_connect_timeout(Some(Duration::from_secs(2)));
    // Without a configuration of its own, it trusts nobody: an https://
    // replica is refused before any connection (see `forward`).
    let config = match tls {
        Some(cfg) => (*cfg).clone(),
        None => rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("rustls' default versions")
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth(),
    };
    hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(config)
        .https_or_http()
        .enable_http1()
        .wrap_connector(http)
}

/// The live replica named `name` (also its own node's name), if any.
async fn live_replica(store: &dyn StateStore, name: &str) -> Option<Replica> {
    store
        .replicas()?
        .list()
        .await
        .ok()?
        .into_iter()
        .find(|r| r.name == name && !r.expired)
}

/// The leader's routes: services, nodes and the node protocol.
fn leader_route(path: &str) -> bool {
    path.starts_with("/v1/services")
        || path.starts_with("/v1/nodes")
        || path.starts_with("/v1/agent/")
}

/// A registry request with a credential this replica does not know: an
/// edge node's (only the leader holds those), or a token made a moment
/// ago on another replica. The leader knows both.
fn node_pull(control: &Control, req: &Request, path: &str) -> bool {
    path.starts_with("/v2/")
        && crate::auth::token_of(req.headers())
            .is_some_and(|t| control.tokens.authenticate(&t).is_none())
}

/// Where a request goes.
enum Route {
    Here,
    Leader,
    Replica(String),
}

/// The outermost layer of a replica's router: serves a request here, or
/// forwards it to the leader or to the replica that runs its task. A
/// request another replica forwarded is always served here, with the
/// client's address it carries.
pub async fn route(State(control): State<Arc<Control>>, mut req: Request, next: Next) -> Response {
    let Some(cluster) = control.cluster.clone() else {
        return next.run(req).await;
    };
    let peer = req
        .extensions()
        .get::<axum::extract::ConnectInfo<SocketAddr>>()
        .map(|c| c.0);
    if cluster.forwarded(&req) {
        let client = req
            .headers()
            .get(PEER_HEADER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<SocketAddr>().ok());
        if let Some(client) = client {
            req.extensions_mut()
                .insert(axum::extract::ConnectInfo(client));
        }
        // A leader's route reaches a replica that is still taking over
        // (its edge nodes and services not yet loaded): it waits.
        if leader_route(req.uri().path()) {
            let deadline = Instant::now() + cluster.ttl * 2 + Duration::from_secs(2);
            while !cluster.serves_leader() {
                if Instant::now() >= deadline {
                    return unavailable(
                        "this replica is not ready to lead yet (a replica takes over within seconds): try again".into(),
                    );
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        return next.run(req).await;
    }
    req.headers_mut().remove(PEER_HEADER);
    let path = req.uri().path().to_owned();
    let route = if leader_route(&path) || node_pull(&control, &req, &path) {
        Route::Leader
    } else if let Some(rest) = path.strip_prefix("/v1/tasks/") {
        let id = rest.split('/').next().unwrap_or_default();
        task_route(&control, &cluster, id).await
    } else if path == "/v1/tasks" && req.method() == axum::http::Method::POST {
        let Some(_held) = cluster.hold() else {
            return too_many_held();
        };
        let (parts, body) = req.into_parts();
        let bytes = match axum::body::to_bytes(body, MAX_ROUTED_BODY).await {
            Ok(b) => b,
            Err(_) => {
                return ApiError::new(
                    ErrorCode::InvalidRequest,
                    format!("a run request is at most {MAX_ROUTED_BODY} bytes"),
                )
                .into_response();
            }
        };
        let node = serde_json::from_slice::<serde_json::Value>(&bytes)
            .ok()
            .and_then(|v| v.get("node").and_then(|n| n.as_str()).map(str::to_owned));
        req = Request::from_parts(parts, Body::from(bytes));
        match node {
            // Here, on this replica's own node.
            Some(n) if n == cluster.me.name => Route::Here,
            // Another replica's own node: that replica runs it.
            Some(n) if live_replica(&*control.store, &n).await.is_some() => Route::Replica(n),
            // An edge node (the leader's), or any node when this replica
            // runs no tasks itself.
            Some(_) => Route::Leader,
            None if control.config.local_node.disabled => Route::Leader,
            None => Route::Here,
        }
    } else {
        Route::Here
    };
    let to = match route {
        Route::Here => return next.run(req).await,
        Route::Leader => return to_leader(&control, &cluster, req, next, peer).await,
        Route::Replica(name) => live_replica(&*control.store, &name).await,
    };
    match to {
        Some(to) if to.id != cluster.me.id => match cluster.forward(req, &to, peer).await {
            Ok(resp) => resp,
            Err(why) => unavailable(format!("{why}: try again")),
        },
        _ => next.run(req).await,
    }
}

/// A task's requests go to the replica that holds it: here if it is live
/// here; the replica whose node runs it; the leader for a task on an edge
/// node; here for a stopped task (its record is in the database).
async fn task_route(control: &Control, cluster: &Cluster, id: &str) -> Route {
    if control.tasks.is_live(id) {
        return Route::Here;
    }
    let Ok(Some(task)) = control.store.task(id).await else {
        return Route::Here;
    };
    if task.status == crate::model::TaskStatus::Stopped || task.node == cluster.me.name {
        return Route::Here;
    }
    // Not placed yet: the replica that started it holds it.
    let holder = if task.node.is_empty() {
        match &task.replica {
            Some(r) if *r != cluster.me.name => r.clone(),
            _ => return Route::Here,
        }
    } else {
        task.node.clone()
    };
    match live_replica(&*control.store, &holder).await {
        Some(r) => Route::Replica(r.name),
        // Unplaced, of a replica that ran out: its record says what is
        // known (the leader marks it lost).
        None if task.node.is_empty() => Route::Here,
        // An edge node's task (the leader's), or one of a replica that ran
        // out (the leader answers from its record).
        None => Route::Leader,
    }
}
