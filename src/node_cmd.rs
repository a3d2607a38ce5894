//! `wharf node ls | describe | drain | activate | rm | token`: the
//! cluster's nodes through the `/v1/nodes` and `/v1/join-tokens` API, and
//! `wharf node join`, which runs this machine as an edge node
//! ([`crate::agent`]).

use anyhow::Result;
use clap::Subcommand;
use wharf_api::model::Node;

use crate::client::{ApiArgs, block, segment, show, table, wire};

#[derive(Debug, Subcommand)]
pub(crate) enum NodeCommand {
    /// List nodes.
    Ls,
    /// List the `wharf server` replicas sharing the database, and which
    /// one leads (admin).
    Replicas,
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
    /// Remove an edge node (admin): its credential is refused at once and
    /// its tasks stop NodeLost (services start them elsewhere).
    Rm {
        /// The node's name.
        name: String,
    },
    /// Join tokens, which edge nodes join with (admin).
    Token {
        #[command(subcommand)]
        command: TokenCommand,
    },
    /// Run this machine as an edge node of the server (--server URL
    /// --token JOIN_TOKEN; --data-dir keeps its credential and caches).
    Join(crate::agent::JoinArgs),
    /// Install `wharf node join` as a systemd service on this machine:
    /// writes the unit and its environment file and prints the
    /// `systemctl` line that starts it.
    Install(crate::agent::InstallArgs),
}

#[derive(Debug, Subcommand)]
pub(crate) enum TokenCommand {
    /// Make a join token; it is shown once.
    Create {
        /// How long it is accepted.
        #[arg(long, default_value = "1h")]
        ttl: String,
        /// Labels every node joining with it gets: KEY=VALUE,...
        #[arg(long, default_value = "", value_parser = wharf_api::nodes::parse_labels)]
        labels: std::collections::BTreeMap<String, String>,
    },
    /// List join tokens (without their secrets).
    Ls,
    /// Revoke a join token (nodes that joined with it stay).
    Rm {
        /// The token's id.
        id: String,
    },
}

pub(crate) fn main(api: ApiArgs, command: NodeCommand) -> Result<()> {
    if let NodeCommand::Join(args) = command {
        return crate::agent::main(
            args,
            api.server(),
            api.explicit_token(),
            api.data_dir_flag(),
        );
    }
    if let NodeCommand::Install(args) = command {
        return crate::agent::install(
            args,
            api.server(),
            api.explicit_token(),
            api.data_dir_flag(),
        );
    }
    let client = api.client()?;
    let output = api.output;
    let path = |name: &str| format!("/v1/nodes/{}", segment(name));
    match command {
        NodeCommand::Ls => show(output, client.get("/v1/nodes", &[])?, list),
        NodeCommand::Replicas => show(output, client.get("/v1/replicas", &[])?, replicas),
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
        NodeCommand::Rm { name } => show(output, client.delete(&path(&name))?, describe),
        NodeCommand::Token {
            command: TokenCommand::Create { ttl, labels },
        } => show(
            output,
            client.post(
                "/v1/join-tokens",
                serde_json::json!({"ttl": ttl, "labels": labels}),
            )?,
            |created: serde_json::Value| {
                println!("{}", created["token"].as_str().unwrap_or_default());
                eprintln!(
                    "wharf: join token {} expires at {}; it is shown only once",
                    created["join_token"]["id"].as_str().unwrap_or_default(),
                    created["join_token"]["expires_at"]
                        .as_str()
                        .unwrap_or_default()
                );
            },
        ),
        NodeCommand::Token {
            command: TokenCommand::Ls,
        } => show(
            output,
            client.get("/v1/join-tokens", &[])?,
            |tokens: Vec<wharf_api::model::JoinToken>| {
                let rows = tokens
                    .into_iter()
                    .map(|t| {
                        let labels: Vec<String> =
                            t.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
                        [t.id, t.expires_at, labels.join(",")]
                    })
                    .collect();
                table(["ID", "EXPIRES", "LABELS"], rows);
            },
        ),
        NodeCommand::Token {
            command: TokenCommand::Rm { id },
        } => {
            client.delete(&format!("/v1/join-tokens/{}", segment(&id)))?;
            eprintln!("wharf: join token {id} revoked");
            Ok(())
        }
        NodeCommand::Join(_) | NodeCommand::Install(_) => unreachable!("handled above"),
    }
}

fn memory(bytes: Option<u64>) -> String {
    bytes.map_or("no budget".to_owned(), |b| format!("{} MiB", b >> 20))
}

fn replicas(all: Vec<wharf_api::model::ReplicaInfo>) {
    if all.is_empty() {
        println!("a single server: its state is not in PostgreSQL");
        return;
    }
    let rows = all
        .into_iter()
        .map(|r| {
            [
                r.name,
                if r.leader { "yes" } else { "-" }.to_owned(),
                if r.expired { "EXPIRED" } else { "ok" }.to_owned(),
                r.api_url,
                r.ingress_url.unwrap_or_else(|| "-".into()),
            ]
        })
        .collect();
    table(["NAME", "LEADER", "LEASE", "API", "INGRESS"], rows);
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
        (
            "ingress",
            match (n.ingress, n.ingress_refused) {
                (Some(a), _) => a,
                (None, Some(why)) => format!("refused: {why}"),
                (None, None) => "none".into(),
            },
        ),
    ]);
}
