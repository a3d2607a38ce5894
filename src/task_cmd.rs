//! `wharf task run | ls | describe | stop | logs`: tasks through the
//! `/v1/tasks` API.

use std::collections::BTreeMap;
use std::io::Write;
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use clap::Subcommand;
use serde_json::Value;
use wharf_api::control::RunTaskRequest;
use wharf_api::model::{LogEntry, LogPage, Task, TaskStatus};
use wharf_api::taskdef::{LimitsInput, Overrides, Quantity};
use wharf_runtime::StopCode;

use crate::Output;
use crate::client::{ApiArgs, Client, block, decode, or_dash, segment, show, table, wire};

/// How long one `GET /v1/tasks/{id}` of `task run --wait` waits on the
/// server (its maximum is 60 s); the client asks again until the task stops.
const WAIT_STEP_MS: u64 = 30_000;

#[derive(Debug, Subcommand)]
pub(crate) enum TaskCommand {
    /// Start tasks of a task definition.
    Run {
        /// FAMILY (its latest active revision) or FAMILY:REVISION.
        task_definition: String,
        /// How many tasks to start (1 to 100).
        #[arg(long)]
        count: Option<u32>,
        /// Replace the task definition's arguments (repeat for several).
        #[arg(long = "arg", value_name = "ARG", allow_hyphen_values = true)]
        args: Vec<String>,
        /// Add or override an environment variable: K=V (repeatable).
        #[arg(long, value_name = "K=V", value_parser = parse_env)]
        env: Vec<(String, String)>,
        /// Override the fuel budget.
        #[arg(long)]
        fuel: Option<u64>,
        /// Override the memory limit (64MiB, 1GiB, bytes).
        #[arg(long)]
        memory: Option<String>,
        /// Override the wall-clock timeout (500ms, 5s, 2m).
        #[arg(long)]
        timeout: Option<String>,
        /// Wait for the tasks to stop, print how they ended and exit with
        /// the (first failing) task's exit code, as `wharf run` does.
        #[arg(long)]
        wait: bool,
        /// Run on this node only (wharf node ls).
        #[arg(long)]
        node: Option<String>,
    },
    /// List tasks, newest first.
    Ls {
        /// Only tasks of this family.
        #[arg(long)]
        family: Option<String>,
        /// Only tasks of this service.
        #[arg(long)]
        service: Option<String>,
        /// Only tasks in this status: PROVISIONING, PENDING, RUNNING, STOPPED.
        #[arg(long)]
        status: Option<String>,
        /// At most this many (default 100, at most 1000).
        #[arg(long)]
        limit: Option<u32>,
    },
    /// Show one task.
    Describe {
        /// The task's id.
        id: String,
    },
    /// Ask a task to stop (stop code UserStopped).
    Stop {
        /// The task's id.
        id: String,
        /// Why, recorded as the task's message.
        #[arg(long)]
        reason: Option<String>,
    },
    /// Print a task's output: `TIMESTAMP STREAM TEXT` lines, or one JSON
    /// object per line with --output json.
    Logs {
        /// The task's id.
        id: String,
        /// Keep printing new lines until the task stops.
        #[arg(long, short)]
        follow: bool,
    },
}

fn parse_env(text: &str) -> Result<(String, String), String> {
    text.split_once('=')
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .ok_or_else(|| format!("{text:?} is not K=V"))
}

pub(crate) fn main(api: ApiArgs, command: TaskCommand) -> Result<ExitCode> {
    let client = api.client()?;
    let output = api.output;
    match command {
        TaskCommand::Run {
            task_definition,
            count,
            args,
            env,
            fuel,
            memory,
            timeout,
            wait,
            node,
        } => {
            let overrides = Overrides {
                args: (!args.is_empty()).then_some(args),
                env: env.into_iter().collect::<BTreeMap<_, _>>(),
                limits: LimitsInput {
                    fuel,
                    memory: memory.map(Quantity::Text),
                    timeout,
                },
            };
            let request = RunTaskRequest {
                task_definition,
                count,
                overrides: Some(overrides),
                node,
                bench: None,
            };
            let started = client.post("/v1/tasks", request)?;
            if !wait {
                show(output, started, list)?;
                return Ok(ExitCode::SUCCESS);
            }
            let started: Vec<Task> = decode(started)?;
            let mut stopped = Vec::with_capacity(started.len());
            for task in &started {
                stopped.push(wait_stopped(&client, &task.id)?);
            }
            let tasks: Vec<Task> = decode(Value::from(stopped.clone()))?;
            let code = tasks.iter().map(exit_status).find(|&c| c != 0).unwrap_or(0);
            match output {
                Output::Json => println!("{}", serde_json::to_string_pretty(&stopped)?),
                Output::Text => {
                    for (i, task) in tasks.into_iter().enumerate() {
                        if i > 0 {
                            println!();
                        }
                        describe(task);
                    }
                }
            }
            Ok(ExitCode::from(code))
        }
        TaskCommand::Ls {
            family,
            service,
            status,
            limit,
        } => {
            let query: Vec<(&str, String)> = [
                ("family", family),
                ("service", service),
                ("status", status),
                ("limit", limit.map(|l| l.to_string())),
            ]
            .into_iter()
            .filter_map(|(k, v)| Some((k, v?)))
            .collect();
            show(output, client.get("/v1/tasks", &query)?, list)?;
            Ok(ExitCode::SUCCESS)
        }
        TaskCommand::Describe { id } => {
            show(output, client.get(&task_path(&id), &[])?, describe)?;
            Ok(ExitCode::SUCCESS)
        }
        TaskCommand::Stop { id, reason } => {
            let query: Vec<_> = reason.map(|r| ("reason", r)).into_iter().collect();
            let path = format!("{}/stop", task_path(&id));
            show(output, client.post_empty(&path, &query)?, describe)?;
            Ok(ExitCode::SUCCESS)
        }
        TaskCommand::Logs { id, follow } => {
            logs(&client, output, &id, follow)?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn task_path(id: &str) -> String {
    format!("/v1/tasks/{}", segment(id))
}

/// Asks for the task until it is STOPPED; returns the API's JSON of it.
fn wait_stopped(client: &Client, id: &str) -> Result<Value> {
    loop {
        let task = client.get(
            &task_path(id),
            &[("wait_stopped_ms", WAIT_STEP_MS.to_string())],
        )?;
        if task["status"] == TaskStatus::Stopped.as_str() {
            return Ok(task);
        }
    }
}

/// What `task run --wait` exits with for one stopped task: the same as
/// `wharf run` for the same ending.
fn exit_status(task: &Task) -> u8 {
    let stop_code = task
        .stop_code
        .as_deref()
        .and_then(|c| serde_json::from_value::<StopCode>(Value::from(c)).ok());
    match stop_code {
        Some(code) => crate::run::exit_status(code, task.exit_code),
        None => 1,
    }
}

fn logs(client: &Client, output: Output, id: &str, follow: bool) -> Result<()> {
    let path = format!("{}/logs", task_path(id));
    let mut stdout = std::io::stdout().lock();
    let mut print = |line: &LogEntry| -> Result<()> {
        match output {
            Output::Json => writeln!(stdout, "{}", serde_json::to_string(line)?)?,
            Output::Text => writeln!(stdout, "{} {} {}", line.at, line.stream, line.text)?,
        }
        // Followed lines are shown as they arrive, even through a pipe.
        stdout.flush()?;
        Ok(())
    };
    if follow {
        for line in client.lines(&path, &[("follow", "true".into())])? {
            let line = line.context("the log stream broke off")?;
            if line.trim().is_empty() {
                continue;
            }
            let entry: LogEntry =
                serde_json::from_str(&line).context("unexpected log line from the server")?;
            print(&entry)?;
        }
        return Ok(());
    }
    let mut from = 0;
    loop {
        let page: LogPage = decode(client.get(&path, &[("from", from.to_string())])?)?;
        if page.missed > 0 {
            eprintln!(
                "wharf: {} earlier lines were dropped (log retention is bounded)",
                page.missed
            );
        }
        for line in &page.lines {
            print(line)?;
        }
        if page.closed || page.lines.is_empty() {
            return Ok(());
        }
        if page.next_seq <= from {
            bail!("the server's log paging did not advance (next_seq {from})");
        }
        from = page.next_seq;
    }
}

fn list(tasks: Vec<Task>) {
    let rows = tasks
        .into_iter()
        .map(|t| {
            [
                t.id,
                t.task_definition,
                wire(t.status),
                or_dash(t.stop_code),
                or_dash(t.exit_code),
                or_dash(t.started_at),
            ]
        })
        .collect();
    table(
        ["ID", "TASKDEF", "STATUS", "STOP CODE", "EXIT", "STARTED"],
        rows,
    );
}

fn describe(t: Task) {
    let http = t.http.as_ref().map(|h| {
        let responses: Vec<String> = h
            .responses
            .iter()
            .map(|(k, v)| format!("{k} {v}"))
            .collect();
        let ms = |v: Option<f64>| v.map_or("-".to_owned(), |v| format!("{v:.3}ms"));
        format!(
            "{} | in flight {} | refused {} | outbound denied {} | p50 {} | p99 {}",
            if responses.is_empty() {
                "no requests".to_owned()
            } else {
                responses.join(", ")
            },
            h.in_flight,
            h.refused,
            h.outbound_denied,
            ms(h.latency_p50_ms),
            ms(h.latency_p99_ms)
        )
    });
    block(&[
        ("id", t.id),
        ("task definition", t.task_definition),
        ("service", or_dash(t.service)),
        ("deployment", or_dash(t.deployment_id)),
        ("node", t.node),
        ("status", wire(t.status)),
        ("desired status", wire(t.desired_status)),
        ("stop code", or_dash(t.stop_code)),
        ("exit code", or_dash(t.exit_code)),
        ("message", or_dash(t.message.filter(|m| !m.is_empty()))),
        ("args", t.args.join(" ")),
        ("limits", crate::taskdef_cmd::limits(&t.limits)),
        ("fuel consumed", or_dash(t.fuel_consumed)),
        (
            "peak memory",
            or_dash(t.peak_memory_bytes.map(|b| format!("{b} bytes"))),
        ),
        (
            "duration",
            or_dash(t.duration_ms.map(|d| format!("{d:.3}ms"))),
        ),
        ("created", t.created_at),
        ("started", or_dash(t.started_at)),
        ("stopped", or_dash(t.stopped_at)),
        ("requests", or_dash(http)),
    ]);
}
