//! `wharf taskdef register | ls | describe | deregister`: task definitions
//! through the `/v1/taskdefs` API.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Subcommand;
use wharf_api::model::{TaskDefinition, TaskLimits};

use crate::client::{ApiArgs, block, or_dash, segment, show, table, wire};

#[derive(Debug, Subcommand)]
pub(crate) enum TaskdefCommand {
    /// Register a new revision from a TOML or JSON file.
    Register {
        /// The task definition file.
        file: PathBuf,
    },
    /// List task definition revisions.
    Ls {
        /// Only this family.
        #[arg(long)]
        family: Option<String>,
    },
    /// Show one revision (FAMILY alone: its latest active revision).
    Describe {
        /// FAMILY[:REVISION]
        name: String,
    },
    /// Mark a revision INACTIVE: running tasks go on, no new ones start.
    Deregister {
        /// FAMILY:REVISION
        name: String,
    },
}

pub(crate) fn main(api: ApiArgs, command: TaskdefCommand) -> Result<()> {
    let client = api.client()?;
    let output = api.output;
    match command {
        TaskdefCommand::Register { file } => {
            let text = std::fs::read_to_string(&file)
                .with_context(|| format!("cannot read {}", file.display()))?;
            // Parsed here so a typo is reported with the file's name and
            // position before anything is sent.
            let input = wharf_api::taskdef::parse_file(&text)
                .map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
            show(output, client.post("/v1/taskdefs", input)?, describe)
        }
        TaskdefCommand::Ls { family } => {
            let query: Vec<_> = family.map(|f| ("family", f)).into_iter().collect();
            show(
                output,
                client.get("/v1/taskdefs", &query)?,
                |defs: Vec<TaskDefinition>| {
                    let rows = defs
                        .into_iter()
                        .map(|d| {
                            [
                                d.task_definition,
                                wire(d.status),
                                d.artifact,
                                d.artifact_digest,
                                d.registered_at,
                            ]
                        })
                        .collect();
                    table(
                        ["TASKDEF", "STATUS", "ARTIFACT", "DIGEST", "REGISTERED"],
                        rows,
                    );
                },
            )
        }
        TaskdefCommand::Describe { name } => show(
            output,
            client.get(&format!("/v1/taskdefs/{}", segment(&name)), &[])?,
            describe,
        ),
        TaskdefCommand::Deregister { name } => show(
            output,
            client.delete(&format!("/v1/taskdefs/{}", segment(&name)))?,
            describe,
        ),
    }
}

fn describe(def: TaskDefinition) {
    let pairs = |map: &std::collections::BTreeMap<String, String>, sep: &str| {
        map.iter()
            .map(|(k, v)| format!("{k}{sep}{v}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    block(&[
        ("task definition", def.task_definition.clone()),
        ("status", wire(def.status)),
        ("artifact", def.artifact),
        ("artifact digest", def.artifact_digest),
        ("wasm digest", def.wasm_digest),
        ("kind", wire(def.kind)),
        ("args", def.args.join(" ")),
        ("env", pairs(&def.env, "=")),
        ("secrets", pairs(&def.secrets, " from secret ")),
        ("limits", limits(&def.limits)),
        ("labels", pairs(&def.labels, "=")),
        ("registered", def.registered_at),
        ("deregistered", or_dash(def.deregistered_at)),
    ]);
}

/// Limits as `fuel=N memory=BYTES timeout=MSms`, or `node defaults`.
pub(crate) fn limits(limits: &TaskLimits) -> String {
    let parts: Vec<String> = [
        limits.fuel.map(|f| format!("fuel={f}")),
        limits.memory_bytes.map(|m| format!("memory={m}")),
        limits.timeout_ms.map(|t| format!("timeout={t}ms")),
    ]
    .into_iter()
    .flatten()
    .collect();
    if parts.is_empty() {
        "node defaults".into()
    } else {
        parts.join(" ")
    }
}
