//! `wharf service create | ls | describe | scale | update | rm`: services
//! through the `/v1/services` API.

use anyhow::Result;
use clap::Subcommand;
use wharf_api::autoscale::Autoscaling;
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
        /// Where the ingress sends requests: HOST, HOST/PATH or /PATH
        /// (HTTP services; repeatable).
        #[arg(long = "route")]
        routes: Vec<String>,
        /// A placement constraint on node labels, replacing the task
        /// definition's: "KEY == V", "KEY != V", "KEY in [A, B]"
        /// (repeatable).
        #[arg(long = "constraint")]
        constraints: Vec<String>,
        /// How tasks spread over nodes, replacing the task definition's:
        /// spread, spread(LABEL) or binpack.
        #[arg(long)]
        placement_strategy: Option<String>,
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
    /// Roll a service out to another task definition revision, or change
    /// its routes.
    Update {
        /// The service's name.
        name: String,
        /// FAMILY:REVISION to deploy.
        #[arg(long = "taskdef")]
        task_definition: Option<String>,
        /// Replaces the service's routes (repeatable).
        #[arg(long = "route")]
        routes: Vec<String>,
        /// Removes every route.
        #[arg(long, conflicts_with = "routes")]
        no_routes: bool,
    },
    /// Scale an HTTP service on requests in flight per task, to and from
    /// zero with --min 0.
    Autoscale {
        /// The service's name.
        name: String,
        /// The fewest tasks (0: scale to zero when idle).
        #[arg(long, required_unless_present = "off")]
        min: Option<u32>,
        /// The most tasks.
        #[arg(long, required_unless_present = "off")]
        max: Option<u32>,
        /// Requests in flight per task to aim for.
        #[arg(long, required_unless_present = "off")]
        target_inflight: Option<f64>,
        /// Time after a change before scaling in.
        #[arg(long, default_value = "60s", value_parser = parse_duration)]
        scale_in_cooldown: std::time::Duration,
        /// Time without a request before a --min 0 service goes to zero.
        #[arg(long, default_value = "5m", value_parser = parse_duration)]
        idle_to_zero: std::time::Duration,
        /// Turn autoscaling off (the desired count stays where it is).
        #[arg(long, conflicts_with_all = ["min", "max", "target_inflight"])]
        off: bool,
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
            routes,
            constraints,
            placement_strategy,
        } => {
            let placed = !constraints.is_empty() || placement_strategy.is_some();
            let placement = placed.then_some(wharf_api::taskdef::PlacementInput {
                constraints,
                strategy: placement_strategy,
            });
            let request = CreateServiceRequest {
                name,
                task_definition,
                desired_count,
                minimum_healthy_percent: min_healthy_percent,
                maximum_percent: max_percent,
                routes,
                placement,
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
            routes,
            no_routes,
        } => {
            if task_definition.is_none() && routes.is_empty() && !no_routes {
                anyhow::bail!("nothing to update: give --taskdef, --route or --no-routes");
            }
            let request = UpdateServiceRequest {
                task_definition,
                routes: (no_routes || !routes.is_empty()).then_some(routes),
                ..Default::default()
            };
            show(output, client.patch(&path(&name), request)?, describe)
        }
        ServiceCommand::Autoscale {
            name,
            min,
            max,
            target_inflight,
            scale_in_cooldown,
            idle_to_zero,
            off,
        } => {
            let policy = match (off, min, max, target_inflight) {
                (true, ..) => None,
                (false, Some(min), Some(max), Some(target_inflight)) => Some(Autoscaling {
                    min,
                    max,
                    target_inflight,
                    scale_in_cooldown_ms: millis(scale_in_cooldown),
                    idle_to_zero_ms: millis(idle_to_zero),
                }),
                _ => anyhow::bail!("give --min, --max and --target-inflight, or --off"),
            };
            let request = UpdateServiceRequest {
                autoscaling: Some(policy),
                ..Default::default()
            };
            show(output, client.patch(&path(&name), request)?, describe)
        }
        ServiceCommand::Rm { name } => show(output, client.delete(&path(&name))?, describe),
    }
}

fn parse_duration(text: &str) -> Result<std::time::Duration, String> {
    wharf_runtime::parse_duration(text).map_err(|e| e.to_string())
}

fn humantime_ms(ms: u64) -> String {
    if ms.is_multiple_of(1000) {
        format!("{}s", ms / 1000)
    } else {
        format!("{ms}ms")
    }
}

fn millis(d: std::time::Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
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
        ("routes", s.routes.join(", ")),
        (
            "autoscaling",
            match &s.autoscaling {
                None => "off".to_owned(),
                Some(a) => format!(
                    "{} to {} tasks at {} in flight per task (scale in after {}, to zero after {} idle)",
                    a.min,
                    a.max,
                    a.target_inflight,
                    humantime_ms(a.scale_in_cooldown_ms),
                    humantime_ms(a.idle_to_zero_ms)
                ),
            },
        ),
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
