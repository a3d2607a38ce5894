//! `wharf run`: one task, locally, with the limits Wharf tasks have
//! everywhere; stdio passes through and the process exits with the guest's
//! exit code.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::Args;
use wharf_registry::client::RegistryClient;
use wharf_runtime::{
    DirGrant, Limits, Outcome, Runtime, RuntimeConfig, Stdio, StopCode, StopSignal, TaskSpec,
};

#[derive(Debug, Args)]
pub(crate) struct RunArgs {
    /// Fuel budget (about one unit per Wasm instruction); default unlimited.
    #[arg(long, value_parser = parse_fuel)]
    fuel: Option<u64>,
    /// Memory limit over all the guest's memories, e.g. 64MiB or 1GiB;
    /// default 1GiB.
    #[arg(long, value_parser = parse_size)]
    memory: Option<u64>,
    /// Wall-clock limit, e.g. 500ms, 5s, 2m; default none.
    #[arg(long, value_parser = parse_duration)]
    timeout: Option<std::time::Duration>,
    /// Environment variable for the guest: K=V, or K to pass the host's
    /// value. The guest sees no others.
    #[arg(long = "env", value_name = "K=V")]
    env: Vec<String>,
    /// Directory for the guest: HOST[:GUEST][:ro]. The guest sees no others.
    #[arg(long = "dir", value_name = "HOST[:GUEST][:ro]", value_parser = parse_dir)]
    dirs: Vec<DirGrant>,
    /// Print a one-line summary to stderr when the task ends.
    #[arg(long)]
    stats: bool,
    /// Write the outcome as one JSON object to FILE.
    #[arg(long, value_name = "FILE")]
    report: Option<PathBuf>,
    /// Data directory (compile cache, pulled artifacts).
    #[arg(long, env = "WHARF_DATA_DIR")]
    data_dir: Option<PathBuf>,
    #[command(flatten)]
    registry: RegistryArgs,
    /// The .wasm (or .wat) file to run, or a registry reference
    /// (HOST[:PORT]/REPOSITORY[:TAG|@DIGEST]) pulled and cached by digest.
    #[arg(value_name = "FILE|REF")]
    file: String,
    /// Arguments for the guest (after `--`).
    #[arg(last = true)]
    args: Vec<String>,
}

/// Where a reference is pulled from, with which credentials (the same
/// rules as `wharf pull`: the Wharf token goes only to `--server`).
#[derive(Debug, Args)]
#[command(next_help_heading = "Registry options (FILE|REF is a reference)")]
pub(crate) struct RegistryArgs {
    /// Wharf token (default: the local server's admin token).
    #[arg(long, env = "WHARF_TOKEN", hide_env_values = true)]
    token: Option<String>,
    #[command(flatten)]
    options: crate::image::RegistryOptions,
}

impl RegistryArgs {
    /// The `/v1/` API of `--server` with this token (default: the local
    /// server's admin token).
    pub(crate) fn api(&self) -> Result<crate::bench::ClusterApi> {
        let base = self.options.server().trim_end_matches('/').to_owned();
        let token = match &self.token {
            Some(t) => t.clone(),
            None => crate::paths::local_admin_token(None)?,
        };
        let mut agent =
            ureq::AgentBuilder::new().timeout_connect(std::time::Duration::from_secs(10));
        if let Some(tls) = self.options.ureq_tls()? {
            agent = agent.tls_config(tls);
        }
        Ok(crate::bench::ClusterApi {
            base,
            token,
            agent: agent.build(),
        })
    }
}

/// The runtime of a local command (`wharf run`, `wharf serve`): a pool of
/// `max_instances`, sized for the memory asked for, compiled code cached
/// in the data directory.
pub(crate) fn local_runtime_config(
    max_instances: u32,
    memory: Option<u64>,
    data_dir: &Path,
) -> RuntimeConfig {
    RuntimeConfig {
        max_instances,
        max_task_memory: memory
            .unwrap_or(0)
            .max(RuntimeConfig::default().max_task_memory),
        cache_dir: Some(crate::paths::compile_cache(data_dir)),
        ..RuntimeConfig::default()
    }
}

/// Whether `target` names a registry artifact rather than a file: it is
/// not a file here, and its first part is a host (`.`, `:` or
/// `localhost`), as in `docker run`.
fn is_reference(target: &str) -> bool {
    if Path::new(target).exists() {
        return false;
    }
    match target.split_once('/') {
        Some((host, rest)) => {
            !rest.is_empty() && (host.contains(['.', ':']) || host == "localhost")
        }
        None => false,
    }
}

/// The reference's Wasm layer as a local file, pulled once per manifest
/// digest into `DATA_DIR/cache/pulled/`; a reference with a digest that is
/// already there needs no registry at all.
fn pull_cached(reference: &str, registry: &RegistryArgs, data_dir: &Path) -> Result<PathBuf> {
    let wharf = crate::image::Credentials::new(registry.token.clone(), Some(data_dir.to_owned()));
    let credentials = registry.options.for_reference(reference, &wharf)?;
    let client = RegistryClient::with_tls(
        reference,
        credentials,
        &registry.options.tls_for(reference)?,
    )?;
    let tokio = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("failed to start the async runtime")?;
    let digest = tokio
        .block_on(client.manifest_digest(reference))
        .with_context(|| format!("failed to resolve {reference}"))?;
    let dir = data_dir.join("cache").join("pulled");
    // Digests are `alg:hex`, validated by the client; `:` is kept out of
    // file names.
    let file = dir.join(format!("{}.wasm", digest.replace(':', "-")));
    if file.is_file() {
        return Ok(file);
    }
    std::fs::create_dir_all(&dir).with_context(|| format!("failed to create {}", dir.display()))?;
    let repo = reference.split('@').next().unwrap_or(reference);
    let repo = match repo.rsplit_once(':') {
        Some((r, tag)) if !tag.contains('/') => r,
        _ => repo,
    };
    // Pinned to the digest just resolved, so the file holds what its name says.
    tokio
        .block_on(client.pull_wasm(&format!("{repo}@{digest}"), &file, |_, _| {}))
        .with_context(|| format!("failed to pull {reference}"))?;
    Ok(file)
}

fn parse_fuel(text: &str) -> Result<u64, String> {
    text.replace('_', "")
        .parse()
        .map_err(|_| format!("invalid fuel {text:?}: expected a whole number"))
}

fn parse_size(text: &str) -> Result<u64, String> {
    wharf_runtime::parse_size(text).map_err(|e| e.to_string())
}

fn parse_duration(text: &str) -> Result<std::time::Duration, String> {
    wharf_runtime::parse_duration(text).map_err(|e| e.to_string())
}

fn parse_dir(text: &str) -> Result<DirGrant, String> {
    DirGrant::parse(text).map_err(|e| e.to_string())
}

/// What `wharf run` exits with when the guest did not choose an exit code.
/// `wharf task run --wait` exits the same way for a task of the server.
pub(crate) fn exit_status(stop_code: StopCode, exit_code: Option<i32>) -> u8 {
    match stop_code {
        StopCode::Completed => 0,
        StopCode::NonZeroExit => match exit_code {
            Some(code @ 1..=255) => code as u8,
            _ => 1,
        },
        // The conventions of `timeout(1)`, shells and `wasmtime run`.
        StopCode::Timeout => 124,
        StopCode::FailedToStart => 126,
        StopCode::UserStopped | StopCode::ScaledDown | StopCode::NodeLost => 130,
        StopCode::OutOfFuel | StopCode::MemoryLimit | StopCode::Trap => 134,
    }
}

/// `--env` values: `K=V`, or `K` to pass the host's value.
pub(crate) fn host_env(flags: &[String]) -> Result<Vec<(String, String)>> {
    flags
        .iter()
        .map(|kv| match kv.split_once('=') {
            Some((k, v)) => Ok((k.to_owned(), v.to_owned())),
            None => std::env::var(kv)
                .map(|v| (kv.clone(), v))
                .with_context(|| format!("--env {kv}: the host has no variable {kv} to pass")),
        })
        .collect()
}

/// The file to load for `target` (pulling a reference once per digest)
/// and the program name the guest sees as `argv[0]`.
pub(crate) fn resolve_target(
    target: &str,
    registry: &RegistryArgs,
    data_dir: &Path,
) -> Result<(PathBuf, String)> {
    if is_reference(target) {
        let file = pull_cached(target, registry, data_dir)?;
        let repo = target.split(['@']).next().unwrap_or_default();
        let last = repo.rsplit('/').next().unwrap_or("main");
        let name = last.split(':').next().unwrap_or("main");
        return Ok((file, format!("{name}.wasm")));
    }
    let file = PathBuf::from(target);
    let program = file
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "main.wasm".into());
    Ok((file, program))
}

pub(crate) fn main(args: RunArgs) -> Result<ExitCode> {
    let env = host_env(&args.env)?;
    let data_dir = crate::paths::data_dir(args.data_dir.clone())?;
    // One task: a pool of two.
    let config = local_runtime_config(2, args.memory, &data_dir);
    let (file, program) = resolve_target(&args.file, &args.registry, &data_dir)?;
    let spec = TaskSpec {
        program,
        args: args.args.clone(),
        env,
        dirs: args.dirs.clone(),
        limits: Limits {
            fuel: args.fuel,
            memory: args.memory,
            timeout: args.timeout,
        },
        stdio: Stdio::Inherit,
    };

    let tokio = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("failed to start the async runtime")?;
    let runtime = Runtime::new(config).context("failed to start the wasm runtime")?;
    let (outcome, source) = match runtime.load_file(&file) {
        Ok(loaded) => {
            let stop = StopSignal::new();
            let outcome = tokio.block_on(async {
                let ctrl_c = {
                    let stop = stop.clone();
                    tokio::spawn(async move {
                        if tokio::signal::ctrl_c().await.is_ok() {
                            stop.stop();
                        }
                    })
                };
                let outcome = runtime.run_with_stop(&loaded.artifact, &spec, &stop).await;
                ctrl_c.abort();
                outcome
            });
            (outcome, Some(loaded))
        }
        Err(error) => (
            Outcome::not_started(StopCode::FailedToStart, error.to_string()),
            None,
        ),
    };

    if !matches!(
        outcome.stop_code,
        StopCode::Completed | StopCode::NonZeroExit
    ) {
        eprintln!("wharf: {}: {}", outcome.stop_code, outcome.message);
    }
    if args.stats {
        eprintln!(
            "wharf: {} exit={} fuel={} duration={:.3}ms peak_memory={} artifact={}",
            outcome.stop_code,
            outcome.exit_code.map_or("-".into(), |c| c.to_string()),
            outcome.fuel_consumed,
            outcome.duration_ms,
            outcome.peak_memory_bytes,
            source
                .as_ref()
                .map_or("-".into(), |l| serde_json::to_value(l.source)
                    .unwrap()
                    .as_str()
                    .unwrap_or("-")
                    .to_owned()),
        );
    }
    if let Some(path) = &args.report {
        let mut report = serde_json::to_value(&outcome).expect("outcome serializes");
        if let Some(loaded) = &source {
            report["digest"] = loaded.artifact.digest().into();
            report["kind"] = serde_json::to_value(loaded.artifact.kind()).expect("kind serializes");
            report["artifact_source"] =
                serde_json::to_value(loaded.source).expect("source serializes");
        }
        if let Some(rss) = host_max_rss_bytes() {
            report["host_max_rss_bytes"] = rss.into();
        }
        std::fs::write(path, format!("{report}\n"))
            .with_context(|| format!("failed to write the report to {}", path.display()))?;
    }
    Ok(ExitCode::from(exit_status(
        outcome.stop_code,
        outcome.exit_code,
    )))
}

/// The peak resident memory of this process (Linux `VmHWM`), so a report
/// shows what running the guest cost the host.
fn host_max_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}
