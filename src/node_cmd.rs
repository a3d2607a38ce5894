//! `wharf node ls | describe | drain | activate`: the cluster's nodes
//! through the `/v1/nodes` API (today the server's own node, `local`).

use anyhow::Result;
use clap::Subcommand;
use wharf_api::model::Node;

use crate::client::{ApiArgs, block, segment, show, table, wire};

#[derive(Debug, Subcommand)]
pub(crate) enum NodeCommand {
    /// List nodes.
    Ls,
    /// Show a node: capacity, what is free, engine, WASI interfaces.
    Describe {
        /// The node's name.
        name: String,
    },
    /// Stop placing new tasks on a node (admin); its tasks go on.
    Drain {
        /// The node's name.
        name: String,
    },
    /// Place tasks on a drained node again (admin).
    Activate {
        /// The node's name.
        name: String,
    },
}

pub(crate) fn main(api: ApiArgs, command: NodeCommand) -> Result<()> {
    let client = api.client()?;
    let output = api.output;
    let path = |name: &str| format!("/v1/nodes/{}", segment(name));
    match command {
        NodeCommand::Ls => show(output, client.get("/v1/nodes", &[])?, list),
        NodeCommand::Describe { name } => show(output, client.get(&path(&name), &[])?, describe),
        NodeCommand::Drain { name } => show(
            output,
            client.post(&format!("{}/drain", path(&name)), serde_json::json!({}))?,
            describe,
        ),
        NodeCommand::Activate { name } => show(
            output,
            client.post(&format!("{}/activate", path(&name)), serde_json::json!({}))?,
            describe,
        ),
    }
}

fn memory(bytes: Option<u64>) -> String {
    bytes.map_or("no budget".to_owned(), |b| format!("{} MiB", b >> 20))
}

fn list(nodes: Vec<Node>) {
    let rows = nodes
        .into_iter()
        .map(|n| {
            [
                n.name,
                wire(n.status),
                format!("{}/{}", n.free.slots, n.capacity.slots),
                format!(
                    "{}/{}",
                    memory(n.free.memory_bytes),
                    memory(n.capacity.memory_bytes)
                ),
                n.running_tasks.to_string(),
                n.arch,
            ]
        })
        .collect();
    table(
        [
            "NAME",
            "STATUS",
            "FREE SLOTS",
            "FREE MEMORY",
            "TASKS",
            "ARCH",
        ],
        rows,
    );
}

fn describe(n: Node) {
    let labels: Vec<String> = n.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
    block(&[
        ("name", n.name),
        ("status", wire(n.status)),
        ("local", n.local.to_string()),
        ("labels", labels.join(", ")),
        (
            "slots",
            format!("{} free of {}", n.free.slots, n.capacity.slots),
        ),
        (
            "memory",
            format!(
                "{} free of {}",
                memory(n.free.memory_bytes),
                memory(n.capacity.memory_bytes)
            ),
        ),
        ("tasks", n.running_tasks.to_string()),
        ("last heartbeat", n.last_heartbeat),
        ("version", n.version),
        (
            "engine",
            format!("{} ({})", n.engine_version, n.compatibility_hash),
        ),
        ("platform", format!("{}-{}", n.arch, n.os)),
        ("wasi", n.wasi_interfaces.join(", ")),
    ]);
}
