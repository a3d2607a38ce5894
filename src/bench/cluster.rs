//! `wharf bench run TASKDEF --nodes all|LABEL=VALUE`: the same benchmark
//! on every matching node of a cluster, one node at a time (nodes that
//! share a machine do not disturb each other's numbers). Each node runs a
//! benchmark task (`POST /v1/tasks` with `node` and `bench`) that writes
//! one line per run; this side reads the lines back and computes every
//! node's statistics the same way, then the spread between nodes.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};
use wharf_runtime::BenchRun;

use super::run::{Config, Plan, combinations, substitute};
use super::{Benchmark, METRICS, RunRecord};

/// Runs per node when the flags give a duration rather than a count.
const DEFAULT_NODE_RUNS: u32 = 50;
/// How long one node's benchmark may take.
const NODE_DEADLINE: Duration = Duration::from_secs(600);

/// The `/v1/` API of the server the cluster belongs to.
pub(crate) struct Api {
    pub(crate) base: String,
    pub(crate) token: String,
    pub(crate) agent: ureq::Agent,
}

impl Api {
    fn call(&self, method: &str, path: &str, body: Option<Value>) -> Result<Value> {
        let request = self
            .agent
            .request(method, &format!("{}{path}", self.base))
            .set("authorization", &format!("Bearer {}", self.token));
        let answer = match body {
            Some(b) => request.send_json(b),
            None => request.call(),
        };
        match answer {
            Ok(r) => Ok(r.into_json()?),
            Err(ureq::Error::Status(code, r)) => {
                let body: Value = r.into_json().unwrap_or_default();
                bail!(
                    "{method} {path}: {code} {}",
                    body["message"].as_str().unwrap_or("")
                )
            }
            Err(e) => bail!("cannot reach {}: {e}", self.base),
        }
    }
}

/// Whether a node matches `all` or `LABEL=VALUE`.
fn matches(node: &Value, selector: &str) -> bool {
    match selector.split_once('=') {
        None => selector == "all",
        Some((k, v)) => node["labels"][k.trim()].as_str() == Some(v.trim()),
    }
}

/// One node's benchmark task, to its end; its runs.
fn on_node(api: &Api, request: Value, node: &str) -> Result<(Vec<BenchRun>, u64)> {
    let started = api.call("POST", "/v1/tasks", Some(request))?;
    let id = started[0]["id"]
        .as_str()
        .context("the server did not say which task it started")?
        .to_owned();
    let deadline = Instant::now() + NODE_DEADLINE;
    let task = loop {
        let t = api.call(
            "GET",
            &format!("/v1/tasks/{id}?wait_stopped_ms=30000"),
            None,
        )?;
        if t["status"] == "STOPPED" {
            break t;
        }
        if Instant::now() > deadline {
            let _ = api.call("POST", &format!("/v1/tasks/{id}/stop"), None);
            bail!("the benchmark on node {node} did not end within {NODE_DEADLINE:?}");
        }
    };
    if task["stop_code"] != "Completed" {
        bail!(
            "the benchmark on node {node} ended {}: {}",
            task["stop_code"].as_str().unwrap_or("?"),
            task["message"].as_str().unwrap_or("")
        );
    }
    let page = api.call(
        "GET",
        &format!("/v1/tasks/{id}/logs?from=0&limit=10000"),
        None,
    )?;
    let runs = page["lines"]
        .as_array()
        .map(|lines| {
            lines
                .iter()
                .filter_map(|l| l["text"].as_str().and_then(BenchRun::parse))
                .collect()
        })
        .unwrap_or_default();
    Ok((runs, page["missed"].as_u64().unwrap_or(0)))
}

/// The benchmark `taskdef` on every node `selector` matches, per
/// combination of the parameters; and the spread between the nodes (and
/// a `FAILED` note for each node whose benchmark did not finish).
pub(crate) fn benchmarks(
    api: &Api,
    taskdef: &str,
    selector: &str,
    config: &Config,
) -> Result<(Vec<Benchmark>, Vec<String>)> {
    if selector != "all" && !selector.contains('=') {
        bail!("--nodes {selector:?}: give all or LABEL=VALUE");
    }
    let def = api.call(
        "GET",
        &format!("/v1/taskdefs/{}", crate::client::segment(taskdef)),
        None,
    )?;
    let nodes: Vec<Value> = api
        .call("GET", "/v1/nodes", None)?
        .as_array()
        .cloned()
        .unwrap_or_default()
        .into_iter()
        .filter(|n| n["status"] == "READY" && matches(n, selector))
        .collect();
    if nodes.is_empty() {
        bail!("no READY node matches --nodes {selector} (wharf node ls)");
    }
    let runs = match config.plan {
        Plan::Runs(n) => u32::try_from(n).unwrap_or(u32::MAX),
        Plan::For(..) => DEFAULT_NODE_RUNS,
    }
    .min(wharf_runtime::MAX_BENCH_RUNS);
    let mut out = Vec::new();
    let mut notes = Vec::new();
    for values in combinations(&config.params) {
        let args: Vec<String> = config.args.iter().map(|a| substitute(a, &values)).collect();
        let label = if values.is_empty() {
            config.name.clone()
        } else {
            let shown: Vec<String> = values.iter().map(|(k, v)| format!("{k}={v}")).collect();
            format!("{} ({})", config.name, shown.join(", "))
        };
        let mut per_node = Vec::new();
        for node in &nodes {
            let name = node["name"].as_str().unwrap_or_default().to_owned();
            eprintln!("wharf: {label} on node {name}");
            let mut request = json!({
                "task_definition": taskdef,
                "node": name,
                "bench": {"runs": runs, "warmup": config.warmup.min(wharf_runtime::MAX_BENCH_RUNS as usize)},
            });
            // The flags that change a run go as the task's overrides.
            let mut overrides = json!({
                "env": config
                    .env
                    .iter()
                    .map(|(k, v)| (k.clone(), Value::from(substitute(v, &values))))
                    .collect::<serde_json::Map<_, _>>(),
                "limits": {
                    "fuel": config.fuel,
                    "memory": config.memory,
                    "timeout": config.timeout.map(|t| format!("{}ms", t.as_millis())),
                },
            });
            if !config.args.is_empty() {
                overrides["args"] = json!(args);
            }
            request["overrides"] = overrides;
            let (records, missed) = match on_node(api, request, &name) {
                Ok(r) => r,
                Err(e) => {
                    // The other nodes' numbers are kept; the run fails.
                    eprintln!("wharf: {e:#}");
                    notes.push(format!("{label} @ {name}: FAILED: {e:#}"));
                    continue;
                }
            };
            let mut b = node_benchmark(&label, &name, &def, &args, &values, records, config);
            if missed > 0 {
                b.warnings.push(format!(
                    "{missed} runs' lines were evicted from the task's retained output before they were read"
                ));
            }
            per_node.push(b);
        }
        notes.extend(spread(&label, &per_node));
        out.extend(per_node);
    }
    Ok((out, notes))
}

fn node_benchmark(
    label: &str,
    node: &str,
    def: &Value,
    args: &[String],
    params: &BTreeMap<String, String>,
    records: Vec<BenchRun>,
    config: &Config,
) -> Benchmark {
    let runs: Vec<RunRecord> = records
        .into_iter()
        .map(|r| {
            let completed = matches!(
                r.stop_code,
                wharf_runtime::StopCode::Completed | wharf_runtime::StopCode::NonZeroExit
            );
            RunRecord {
                compile_ms: None,
                load_ms: Some(r.load_ms),
                instantiate_ms: r.instantiate_ms,
                execute_ms: r.execute_ms,
                total_ms: r.total_ms,
                fuel: r.fuel,
                peak_memory_bytes: r.peak_memory_bytes,
                stop_code: r.stop_code.as_str().into(),
                exit_code: r.exit_code,
                completed,
                message: None,
            }
        })
        .collect();
    let mut failed = BTreeMap::new();
    for r in runs.iter().filter(|r| !r.completed) {
        *failed.entry(r.stop_code.clone()).or_insert(0) += 1;
    }
    let mut b = Benchmark {
        name: format!("{label} @ {node}"),
        artifact: def["artifact"].as_str().unwrap_or_default().to_owned(),
        digest: def["wasm_digest"].as_str().unwrap_or_default().to_owned(),
        args: args.to_vec(),
        params: params.clone(),
        concurrency: 1,
        cold: false,
        warmup: config.warmup,
        fuel_limit: def["limits"]["fuel"].as_u64(),
        memory_limit: def["limits"]["memory_bytes"].as_u64(),
        runs,
        failed,
        harness_overhead_us: 0.0,
        throughput: 0.0,
        stats: BTreeMap::new(),
        fuel_identical: false,
        warnings: Vec::new(),
        process: false,
    };
    for (metric, _) in METRICS {
        if let Some(s) = super::stats::summarize(&b.samples(metric)) {
            b.stats.insert(metric.to_owned(), s);
        }
    }
    let fuel = b.samples("fuel");
    b.fuel_identical = !fuel.is_empty() && fuel.iter().all(|f| *f == fuel[0]);
    b
}

/// The spread of the nodes' medians, and whether fuel agreed.
fn spread(label: &str, nodes: &[Benchmark]) -> Vec<String> {
    let medians: Vec<(&str, f64)> = nodes
        .iter()
        .filter_map(|b| {
            let node = b.name.rsplit(" @ ").next().unwrap_or_default();
            b.stats.get("total_ms").map(|s| (node, s.median))
        })
        .collect();
    let Some(fastest) = medians.iter().min_by(|a, b| a.1.total_cmp(&b.1)) else {
        return vec![format!("{label}: no node completed a run")];
    };
    let slowest = medians
        .iter()
        .max_by(|a, b| a.1.total_cmp(&b.1))
        .expect("not empty");
    let mut notes = vec![format!(
        "{label}: spread between {} nodes: median {} ({}) to {} ({}), {:.2}×",
        medians.len(),
        super::report::time(fastest.1),
        fastest.0,
        super::report::time(slowest.1),
        slowest.0,
        slowest.1 / fastest.1
    )];
    let fuels: Vec<u64> = nodes
        .iter()
        .filter(|b| b.fuel_identical)
        .filter_map(|b| b.stats.get("fuel").map(|s| s.median as u64))
        .collect();
    if fuels.len() == nodes.len() && fuels.iter().all(|f| *f == fuels[0]) {
        notes.push(format!(
            "{label}: fuel identical on every node ({})",
            super::report::count(fuels[0] as f64)
        ));
    } else {
        notes.push(format!("{label}: fuel differs between nodes"));
    }
    notes
}
