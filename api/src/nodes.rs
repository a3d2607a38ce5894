//! Nodes as resources: the server's own node, `local`, and the edge nodes
//! that joined with a join token (see [`crate::fleet`] for their
//! protocol). Each is listed with its capacity, what is free, its tasks,
//! engine and WASI interfaces, drained or activated by an admin, and an
//! edge node is removed with its credential. A draining node takes no new
//! tasks; what it runs goes on.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::control::Control;
use crate::error::{ApiError, ErrorCode, Result};
use crate::fleet::{JoinRequest, JoinResponse, Report, SyncResponse};
use crate::model::{self, JoinToken, Node, NodeResources, NodeState, NodeStatus};

/// How long a node's sync waits for the records of the outcomes it
/// reports (all of them together) before answering without their
/// acknowledgements.
const FINISHED_WAIT: Duration = Duration::from_secs(2);
pub use crate::tasks::LOCAL_NODE;

/// The local node's settings from the server's flags.
#[derive(Debug, Clone, Default)]
pub struct LocalNodeConfig {
    /// Labels for placement (`--node-labels zone=a,disk=ssd`).
    pub labels: BTreeMap<String, String>,
    /// The server runs no tasks itself (`--no-local-node`): a pure
    /// control plane for edge nodes.
    pub disabled: bool,
    /// The replica's name (`--replica`), which its node takes; `None`:
    /// `local`.
    pub replica: Option<String>,
}

impl LocalNodeConfig {
    /// The local node's name.
    pub fn name(&self) -> &str {
        self.replica.as_deref().unwrap_or(LOCAL_NODE)
    }
}

/// The most edge nodes a cluster takes.
pub const MAX_NODES: usize = 10_000;

/// The longest a join token may live.
pub const MAX_JOIN_TOKEN_TTL: Duration = Duration::from_secs(366 * 24 * 3600);

/// `POST /v1/join-tokens`.
#[derive(Debug, Clone, Default, serde::Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateJoinTokenRequest {
    /// How long it is accepted (`1h`, `30m`; default 1h).
    #[serde(default)]
    pub ttl: Option<String>,
    /// Labels nodes joining with it get.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

/// A new join token: the secret is shown once.
#[derive(Debug, Clone, serde::Serialize, utoipa::ToSchema)]
pub struct CreatedJoinToken {
    /// `WJ1.<CA fingerprint or none>.<secret>`, for `wharf node join --token`.
    pub token: String,
    /// What is stored of it.
    pub join_token: JoinToken,
}

/// Whether `name` may name a node: 1–63 lowercase letters, digits and
/// `-`, starting with a letter or digit.
fn check_node_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && !name.starts_with('-');
    if !ok {
        return Err(ApiError::invalid(
            "name",
            "a node name is 1 to 63 lowercase letters, digits or '-', not starting with '-'",
        ));
    }
    if name == LOCAL_NODE {
        return Err(ApiError::conflict("\"local\" is the server's own node"));
    }
    Ok(())
}

/// Parses `k=v,k2=v2` labels; the error names the bad entry.
pub fn parse_labels(text: &str) -> std::result::Result<BTreeMap<String, String>, String> {
    let mut labels = BTreeMap::new();
    for entry in text.split(',').map(str::trim).filter(|e| !e.is_empty()) {
        let (k, v) = entry
            .split_once('=')
            .ok_or_else(|| format!("label {entry:?} is not KEY=VALUE"))?;
        let ok = |s: &str| {
            !s.is_empty()
                && s.len() <= 63
                && s.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_./".contains(c))
        };
        if !ok(k) || !(v.is_empty() || ok(v)) {
            return Err(format!(
                "label {entry:?}: keys and values are up to 63 letters, digits, '-', '_', '.' or '/'"
            ));
        }
        labels.insert(k.to_owned(), v.to_owned());
    }
    Ok(labels)
}

/// A placement constraint on node labels: `KEY == VALUE`, `KEY != VALUE`
/// or `KEY in [V1, V2]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Constraint {
    key: String,
    negated: bool,
    values: Vec<String>,
}

impl Constraint {
    /// Parses a constraint; the error says what is expected.
    pub fn parse(text: &str) -> std::result::Result<Constraint, String> {
        let bad = || {
            format!(
                "{text:?} is not a constraint: expected KEY == VALUE, KEY != VALUE or KEY in [V1, V2]"
            )
        };
        let word = |s: &str| {
            let s = s.trim();
            (!s.is_empty()
                && s.len() <= 63
                && s.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_./".contains(c)))
            .then(|| s.to_owned())
        };
        let (key, negated, values) = if let Some((k, v)) = text.split_once("==") {
            (k, false, vec![word(v).ok_or_else(bad)?])
        } else if let Some((k, v)) = text.split_once("!=") {
            (k, true, vec![word(v).ok_or_else(bad)?])
        } else if let Some((k, v)) = text.split_once(" in ") {
            let list = v
                .trim()
                .strip_prefix('[')
                .and_then(|l| l.strip_suffix(']'))
                .ok_or_else(bad)?;
            let values: Option<Vec<String>> = list.split(',').map(word).collect();
            (k, false, values.ok_or_else(bad)?)
        } else {
            return Err(bad());
        };
        Ok(Constraint {
            key: word(key).ok_or_else(bad)?,
            negated,
            values,
        })
    }

    /// Whether a node with `labels` satisfies it (a missing label matches
    /// only `!=`).
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        let hit = labels
            .get(&self.key)
            .is_some_and(|v| self.values.iter().any(|w| w == v));
        hit != self.negated
    }
}

/// What a scan's imports require of a node: component imports as
/// interfaces without their version (`wasi:http/outgoing-handler`), core
/// imports as their module (`wasi_snapshot_preview1`); sorted, once each.
pub fn required_interfaces(imports: &[String]) -> Vec<String> {
    let mut out: Vec<String> = imports
        .iter()
        .map(|i| match i.split_once("::") {
            Some((module, _)) => module.to_owned(),
            None => i.split('@').next().unwrap_or(i).to_owned(),
        })
        .collect();
    out.sort();
    out.dedup();
    out
}

/// Whether a runtime providing `provided` (interfaces, or whole packages
/// such as `wasi:cli`) provides `interface`.
pub fn provides(provided: &[&str], interface: &str) -> bool {
    let package = interface.split('/').next().unwrap_or(interface);
    provided.iter().any(|p| *p == interface || *p == package)
}

impl Control {
    /// Restores what operators set on nodes, and the edge nodes with their
    /// credentials (at start).
    pub(crate) async fn load_nodes(&self) -> Result<()> {
        for node in self.store.nodes().await? {
            if node.name == self.tasks.local_name() {
                self.tasks.set_node_status(node.status);
            } else if let Some(hash) = &node.credential_hash {
                self.tasks
                    .fleet()
                    .add(&node.name, node.status, node.labels.clone());
                self.tokens.load_node(&node.name, hash);
            }
        }
        Ok(())
    }

    /// Every node.
    pub async fn nodes(&self) -> Vec<Node> {
        let mut nodes = Vec::new();
        if !self.config.local_node.disabled {
            nodes.push(self.local_node());
        }
        nodes.extend(self.tasks.fleet().all().iter().map(|n| n.view()));
        nodes
    }

    /// One node.
    pub async fn node(&self, name: &str) -> Result<Node> {
        self.nodes()
            .await
            .into_iter()
            .find(|n| n.name == name)
            .ok_or_else(|| ApiError::not_found(format!("node {name} does not exist")))
    }

    /// What is stored of a node.
    async fn stored_node(&self, name: &str) -> Result<Option<NodeState>> {
        Ok(self
            .store
            .nodes()
            .await?
            .into_iter()
            .find(|n| n.name == name))
    }

    /// Drains (`DRAINING`) or activates (`READY`) a node.
    pub async fn set_node_status(&self, name: &str, status: NodeStatus) -> Result<Node> {
        self.node(name).await?;
        if status == NodeStatus::Lost {
            return Err(ApiError::invalid(
                "status",
                "LOST is set by heartbeats, not by people",
            ));
        }
        let stored = self.stored_node(name).await?;
        self.store
            .put_node(&NodeState {
                status,
                ..stored.unwrap_or_else(|| NodeState {
                    name: name.to_owned(),
                    ..NodeState::default()
                })
            })
            .await?;
        match self.tasks.fleet().get(name) {
            Some(node) => node.set_status(status),
            None => self.tasks.set_node_status(status),
        }
        tracing::info!(node = name, status = ?status, "node status changed");
        self.wake.notify_one();
        self.node(name).await
    }

    /// Removes an edge node: its credential is refused from now on, and
    /// its tasks stop `NodeLost` (services start them elsewhere).
    pub async fn remove_node(&self, name: &str) -> Result<Node> {
        if name == self.tasks.local_name() {
            return Err(ApiError::conflict(
                "the server's own node cannot be removed (start the server with --no-local-node)",
            ));
        }
        let node = self.node(name).await?;
        let stored = self.stored_node(name).await?;
        if let Some(hash) = stored.as_ref().and_then(|n| n.credential_hash.as_ref()) {
            self.tokens.forget(hash);
        }
        self.store.delete_node(name).await?;
        if let Some(n) = self.tasks.fleet().remove(name) {
            tracing::warn!(node = %n.name, "node removed");
        }
        self.wake.notify_one();
        Ok(node)
    }

    /// Makes a join token (the secret is returned once).
    pub async fn create_join_token(&self, req: CreateJoinTokenRequest) -> Result<CreatedJoinToken> {
        let ttl = match req.ttl.as_deref() {
            None => Duration::from_secs(3600),
            Some(text) => humantime::parse_duration(text)
                .map_err(|e| ApiError::invalid("ttl", format!("{text:?}: {e}")))?,
        };
        if ttl.is_zero() || ttl > MAX_JOIN_TOKEN_TTL {
            return Err(ApiError::invalid("ttl", "between 1s and 366 days"));
        }
        for (k, v) in &req.labels {
            parse_labels(&format!("{k}={v}")).map_err(|e| ApiError::invalid("labels", e))?;
        }
        let secret = crate::auth::new_secret();
        let created = std::time::SystemTime::now();
        let token = JoinToken {
            id: uuid::Uuid::new_v4().simple().to_string()[..12].to_owned(),
            labels: req.labels,
            created_at: model::timestamp(created),
            expires_at: model::timestamp(created + ttl),
        };
        self.store
            .put_join_token(&token, &crate::auth::hash(&secret))
            .await?;
        let fingerprint = self
            .config
            .ca_fingerprint
            .clone()
            .unwrap_or_else(|| "none".into());
        Ok(CreatedJoinToken {
            token: format!("{}.{fingerprint}.{secret}", crate::fleet::JOIN_TOKEN_PREFIX),
            join_token: token,
        })
    }

    /// Revokes a join token: no node joins with it from now on (nodes
    /// that joined keep their credentials).
    pub async fn delete_join_token(&self, id: &str) -> Result<()> {
        if self.store.delete_join_token(id).await? {
            Ok(())
        } else {
            Err(ApiError::not_found(format!(
                "join token {id} does not exist"
            )))
        }
    }

    /// Every join token (without secrets).
    pub async fn join_tokens(&self) -> Result<Vec<JoinToken>> {
        Ok(self.store.join_tokens().await?)
    }

    /// Exchanges a join token's secret for a node credential.
    pub async fn join(&self, secret: &str, req: JoinRequest) -> Result<JoinResponse> {
        let refused = |why: &str| ApiError::new(ErrorCode::Unauthorized, why.to_owned());
        let Some(token) = self.store.join_token(&crate::auth::hash(secret)).await? else {
            return Err(refused("the join token is not valid"));
        };
        if token.expires_at <= model::now() {
            return Err(refused(&format!(
                "the join token expired at {} (make a new one with wharf node token create)",
                token.expires_at
            )));
        }
        check_node_name(&req.name)?;
        let mut labels = req.labels.clone();
        for (k, v) in &labels {
            parse_labels(&format!("{k}={v}")).map_err(|e| ApiError::invalid("labels", e))?;
        }
        labels.extend(token.labels.clone());
        let _guard = self.join_lock.lock().await;
        let replica_named = match self.store.replicas() {
            Some(r) => r.list().await?.iter().any(|r| r.name == req.name),
            None => false,
        };
        if req.name == self.tasks.local_name() || replica_named {
            return Err(ApiError::conflict(format!(
                "{} is the name of a server's own node: choose another --name",
                req.name
            )));
        }
        if self.stored_node(&req.name).await?.is_some() {
            return Err(ApiError::conflict(format!(
                "a node named {} has joined already (wharf node rm {} first, or choose another --name)",
                req.name, req.name
            )));
        }
        if self.tasks.fleet().all().len() >= MAX_NODES {
            return Err(ApiError::conflict(format!(
                "the cluster has {MAX_NODES} nodes, the most it takes"
            )));
        }
        let credential = crate::auth::new_secret();
        let hash = crate::auth::hash(&credential);
        self.store
            .put_node(&NodeState {
                name: req.name.clone(),
                status: NodeStatus::Ready,
                labels: labels.clone(),
                credential_hash: Some(hash.clone()),
                joined_at: Some(model::now()),
            })
            .await?;
        self.tasks
            .fleet()
            .add(&req.name, NodeStatus::Ready, labels.clone());
        self.tokens.load_node(&req.name, &hash);
        tracing::info!(node = %req.name, token = %token.id, "node joined");
        Ok(JoinResponse {
            name: req.name,
            credential,
            labels,
        })
    }

    /// One sync of the node protocol: takes the node's report, then
    /// answers with what the node should do, holding the answer up to the
    /// report's `wait_ms` when there is nothing yet.
    pub async fn agent_sync(
        &self,
        node: &str,
        report: Report,
        peer: Option<std::net::IpAddr>,
    ) -> Result<SyncResponse> {
        let fleet = self.tasks.fleet().clone();
        let Some(remote) = fleet.get(node) else {
            return Err(ApiError::new(
                ErrorCode::AccessDenied,
                format!("node {node} was removed"),
            ));
        };
        remote.set_ingress(
            report
                .info
                .ingress
                .as_deref()
                .map(|a| self.check_ingress(a, peer)),
        );
        let tasks = self.tasks.clone();
        let received = remote.receive(&report, &fleet.epoch, &|id| tasks.log_buffer(id));
        let mut ack = received.ack;
        let mut stop = received.stop;
        let answered = !ack.is_empty() || !stop.is_empty() || !received.finished.is_empty();
        // Acknowledged only once the record is durable: a node that misses
        // the answer reports the outcome again. One deadline for them all,
        // well within the agent's patience for a sync (5 s): a store that
        // fails (its commits are retried) must not make the node think
        // the server is gone.
        let deadline = tokio::time::Instant::now() + FINISHED_WAIT;
        for (id, done) in received.finished {
            if tokio::time::timeout_at(deadline, done)
                .await
                .is_ok_and(|r| r.is_ok())
            {
                ack.push(id);
            }
        }
        let wait = Duration::from_millis(report.wait_ms).min(crate::fleet::MAX_WAIT);
        // Only what `pending` reads is kept while the poll is held.
        let report = Report {
            tasks: Vec::new(),
            ..report
        };
        if !answered && !wait.is_zero() {
            remote.wait_for_change(wait, &report, &fleet.epoch).await;
            remote.touch();
        }
        let (assign, stopping) = remote.pending(&report, &fleet.epoch);
        stop.extend(stopping);
        // Its own listener routes its tasks even if the server does not
        // forward to it (edge traffic stays at the edge).
        let routes = match report.info.ingress {
            Some(_) => self.routes().of_services(&remote.services()),
            None => Default::default(),
        };
        Ok(SyncResponse {
            epoch: fleet.epoch.clone(),
            assign,
            stop,
            ack,
            heartbeat_ms: fleet.heartbeat.as_millis() as u64,
            routes,
        })
    }

    /// The ingress a node advertises, if the server may forward requests
    /// there: the address it connects from (a node, or a stolen
    /// credential, cannot point the server's traffic at another machine)
    /// and none of the server's own listeners.
    fn check_ingress(
        &self,
        advertised: &str,
        peer: Option<std::net::IpAddr>,
    ) -> std::result::Result<std::net::SocketAddr, String> {
        let addr: std::net::SocketAddr = advertised
            .parse()
            .map_err(|_| format!("{advertised:?} is not IP:PORT"))?;
        let Some(peer) = peer else {
            return Err("the server cannot see the address the node connects from".into());
        };
        if addr.ip().to_canonical() != peer.to_canonical() {
            return Err(format!(
                "the node advertises {addr} but connects from {peer}: the server forwards only to the address a node connects from"
            ));
        }
        if addr.port() == 0 {
            return Err(format!("{addr} has no port"));
        }
        let ip = addr.ip().to_canonical();
        let own = self.own_addrs.lock().unwrap_or_else(|p| p.into_inner());
        if own.iter().any(|o| {
            o.port() == addr.port() && (o.ip().is_unspecified() || o.ip().to_canonical() == ip)
        }) {
            return Err(format!("{addr} is one of the server's own listeners"));
        }
        // From loopback, a node is on the server's machine only if the
        // server listens there alone; a server reachable from elsewhere
        // that sees a node on loopback sits behind a local proxy, and the
        // node's real address is unknown.
        if ip.is_loopback() && !own.iter().all(|o| o.ip().to_canonical().is_loopback()) {
            return Err(format!(
                "the node connects from loopback but the server listens off loopback (behind a local proxy?): {addr} would be this machine, not the node"
            ));
        }
        Ok(addr)
    }

    fn local_node(&self) -> Node {
        let executor = self.tasks.executor();
        let stats = executor.stats();
        let runtime = executor.runtime();
        let budget = executor.memory_budget();
        Node {
            name: self.tasks.local_name().to_owned(),
            status: self.tasks.node_status(),
            local: true,
            labels: self.config.local_node.labels.clone(),
            capacity: NodeResources {
                slots: executor.slots() as u64,
                memory_bytes: budget,
            },
            free: NodeResources {
                slots: (executor.slots() - stats.running.min(executor.slots())) as u64,
                memory_bytes: budget.map(|b| b.saturating_sub(stats.memory_reserved)),
            },
            running_tasks: self.tasks.live_count() as u64,
            last_heartbeat: model::now(),
            version: env!("CARGO_PKG_VERSION").into(),
            engine_version: wharf_runtime::ENGINE_VERSION.into(),
            compatibility_hash: runtime.compatibility_hash(),
            arch: std::env::consts::ARCH.into(),
            os: std::env::consts::OS.into(),
            wasi_interfaces: wharf_runtime::PROVIDED_INTERFACES
                .iter()
                .map(|s| (*s).to_owned())
                .collect(),
            ingress: self.ingress_addr.get().map(|a| a.to_string()),
            ingress_refused: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn constraints_parse_and_match_labels() {
        let labels = parse_labels("region=eu-west,zone=a").unwrap();
        let yes = |t: &str| Constraint::parse(t).unwrap().matches(&labels);
        assert!(yes("region == eu-west"));
        assert!(!yes("region == us-east"));
        assert!(yes("region != us-east"));
        assert!(yes("zone in [a, b]"));
        assert!(!yes("zone in [c]"));
        assert!(!yes("disk == ssd"), "a missing label does not match ==");
        assert!(yes("disk != ssd"));
        for bad in [
            "region",
            "region = x",
            "== x",
            "zone in a, b",
            "zone in [a, ]",
            "a b == c",
        ] {
            assert!(Constraint::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn required_interfaces_are_matched_by_interface_or_package() {
        let required = required_interfaces(&[
            "wasi:cli/environment@0.2.4".into(),
            "wasi:http/outgoing-handler@0.2.4".into(),
            "wasi:cli/stdout@0.2.4".into(),
            "wasi_snapshot_preview1::fd_write".into(),
            "wasi:keyvalue/store@0.2.0-draft".into(),
        ]);
        assert_eq!(
            required,
            [
                "wasi:cli/environment",
                "wasi:cli/stdout",
                "wasi:http/outgoing-handler",
                "wasi:keyvalue/store",
                "wasi_snapshot_preview1"
            ]
        );
        let provided = wharf_runtime::PROVIDED_INTERFACES;
        let missing: Vec<&String> = required.iter().filter(|i| !provides(provided, i)).collect();
        assert_eq!(missing, ["wasi:keyvalue/store"]);
        assert!(!provides(provided, "wasi:http/handler"));
    }

    #[test]
    fn labels_parse_and_bad_ones_are_named() {
        let l = parse_labels("zone=eu-west-1a, disk=ssd,edge=").unwrap();
        assert_eq!(l["zone"], "eu-west-1a");
        assert_eq!(l["edge"], "");
        assert!(parse_labels("zone").unwrap_err().contains("zone"));
        assert!(parse_labels("a b=c").is_err());
        assert!(parse_labels("").unwrap().is_empty());
    }
}
