//! Nodes as resources. Today the cluster is the server's own node,
//! `local`: listed with its capacity, what is free, its running tasks,
//! engine and WASI interfaces, and drained or activated by an admin. A
//! draining node takes no new tasks (they stop `FailedToStart`, naming
//! why); what it runs goes on. Edge nodes that join over the network are
//! the rest of this work.

use std::collections::BTreeMap;

use crate::control::Control;
use crate::error::{ApiError, Result};
use crate::model::{self, Node, NodeResources, NodeState, NodeStatus};
use crate::tasks::LOCAL_NODE;

/// The local node's settings from the server's flags.
#[derive(Debug, Clone, Default)]
pub struct LocalNodeConfig {
    /// Labels for placement (`--node-labels zone=a,disk=ssd`).
    pub labels: BTreeMap<String, String>,
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
    /// Restores what operators set on nodes (at start).
    pub(crate) async fn load_nodes(&self) -> Result<()> {
        for node in self.store.nodes().await? {
            if node.name == LOCAL_NODE {
                self.tasks.set_node_status(node.status);
            }
        }
        Ok(())
    }

    /// Every node.
    pub async fn nodes(&self) -> Vec<Node> {
        vec![self.local_node()]
    }

    /// One node.
    pub async fn node(&self, name: &str) -> Result<Node> {
        self.nodes()
            .await
            .into_iter()
            .find(|n| n.name == name)
            .ok_or_else(|| ApiError::not_found(format!("node {name} does not exist")))
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
        self.store
            .put_node(&NodeState {
                name: name.to_owned(),
                status,
            })
            .await?;
        self.tasks.set_node_status(status);
        tracing::info!(node = name, status = ?status, "node status changed");
        self.wake.notify_one();
        self.node(name).await
    }

    fn local_node(&self) -> Node {
        let executor = self.tasks.executor();
        let stats = executor.stats();
        let runtime = executor.runtime();
        let budget = executor.memory_budget();
        Node {
            name: LOCAL_NODE.into(),
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
