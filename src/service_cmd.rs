//! `wharf service create | ls | describe | scale | update | rm`: services
//! through the `/v1/services` API.

use anyhow::Result;
use clap::Subcommand;
use wharf_api::model::{Service, ServiceEvent};
use wharf_api::services::{CreateServiceRequest, UpdateServiceRequest};

use crate::Output;
use crate::client::{ApiArgs, block, decode, segment, show, table, wire};

/// Events `service describe` shows, newest first.
const EVENTS_SHOWN: u32 = 10;

#[derive(Debug, Subcommand)]
pub(crate) enum ServiceCommand {
    /// Create a service that keeps N tasks of a task definition running.
    Create {
        /// The service's name.
        name: String,
        /// FAMILY (its latest active revision) or FAMILY:REVISION.
        #[arg(long = "taskdef")]
        task_definition: String,
        /// Tasks to keep running.
        #[arg(long = "desired")]
        desired_count: u32,
        /// A rolling deployment keeps at least this percentage running
        /// (default 100).
        #[arg(long)]
        min_healthy_percent: Option<u32>,
        /// A rolling deployment runs at most this percentage (default 200).
        #[arg(long)]
        max_percent: Option<u32>,
    },
    /// List services.
    Ls,
    /// Show a service, its deployments and its latest events (with
    /// --output json: the service only, as the API returns it).
    Describe {
        /// The service's name.
        name: String,
    },
    /// Change a service's desired count.
    Scale {
        /// The service's name.
        name: String,
        /// The new desired count.
        desired_count: u32,
    },
    /// Roll a service out to another task definition revision.
    Update {
        /// The service's name.
        name: String,
        /// FAMILY:REVISION to deploy.
        #[arg(long = "taskdef")]
        task_definition: String,
    },
    /// Delete a service: it drains (its tasks stop), then disappears.
    Rm {
        /// The service's name.
        name: String,
    },
}

pub(crate) fn main(api: ApiArgs, command: ServiceCommand) -> Result<()> {
    let client = api.client()?;
    let output = api.output;
    let path = |name: &str| format!("/v1/services/{}", segment(name));
    match command {
        ServiceCommand::Create {
            name,
            task_definition,
            desired_count,
            min_healthy_percent,
            max_percent,
        } => {
            let request = CreateServiceRequest {
                name,
                task_definition,
                desired_count,
                minimum_healthy_percent: min_healthy_percent,
                maximum_percent: max_percent,
            };
            show(output, client.post("/v1/services", request)?, describe)
        }
        ServiceCommand::Ls => show(output, client.get("/v1/services", &[])?, list),
        ServiceCommand::Describe { name } => {
            let service = client.get(&path(&name), &[])?;
            if matches!(output, Output::Json) {
                println!("{}", serde_json::to_string_pretty(&service)?);
                return Ok(());
            }
            let events = client.get(
                &format!("{}/events", path(&name)),
                &[("limit", EVENTS_SHOWN.to_string())],
            )?;
            describe(decode(service)?);
            let events: Vec<ServiceEvent> = decode(events)?;
            println!();
            table(
                ["EVENT AT", "MESSAGE"],
                events.into_iter().map(|e| [e.at, e.message]).collect(),
            );
            Ok(())
        }
        ServiceCommand::Scale {
            name,
            desired_count,
        } => {
            let request = UpdateServiceRequest {
                desired_count: Some(desired_count),
                ..Default::default()
            };
            show(output, client.patch(&path(&name), request)?, describe)
        }
        ServiceCommand::Update {
            name,
            task_definition,
        } => {
            let request = UpdateServiceRequest {
                task_definition: Some(task_definition),
                ..Default::default()
            };
            show(output, client.patch(&path(&name), request)?, describe)
        }
        ServiceCommand::Rm { name } => show(output, client.delete(&path(&name))?, describe),
    }
}

fn list(services: Vec<Service>) {
    let rows = services
        .into_iter()
        .map(|s| {
            [
                s.name,
                s.task_definition,
                s.desired_count.to_string(),
                s.running_count.to_string(),
                s.pending_count.to_string(),
                wire(s.status),
            ]
        })
        .collect();
    table(
        ["NAME", "TASKDEF", "DESIRED", "RUNNING", "PENDING", "STATUS"],
        rows,
    );
}

fn describe(s: Service) {
    block(&[
        ("name", s.name),
        ("task definition", s.task_definition),
        ("status", wire(s.status)),
        ("desired", s.desired_count.to_string()),
        ("running", s.running_count.to_string()),
        ("pending", s.pending_count.to_string()),
        ("min healthy", format!("{}%", s.minimum_healthy_percent)),
        ("max", format!("{}%", s.maximum_percent)),
        ("created", s.created_at),
    ]);
    println!();
    let rows = s
        .deployments
        .into_iter()
        .map(|d| {
            [
                d.id,
                wire(d.status),
                d.task_definition,
                d.running_count.to_string(),
                d.pending_count.to_string(),
                wire(d.rollout_state),
                d.rollout_state_reason,
            ]
        })
        .collect();
    table(
        [
            "DEPLOYMENT",
            "STATUS",
            "TASKDEF",
            "RUNNING",
            "PENDING",
            "ROLLOUT",
            "REASON",
        ],
        rows,
    );
}
