//! `wharf bench suite FILE.toml`: benchmarks run in order into one
//! report — `[[bench]]` entries as `wharf bench run` runs them, and
//! `[[http]]` entries as `wharf bench http` loads them (a `serve`d
//! component is served by a `wharf serve` process of this binary for the
//! entry's duration). `[defaults]` fills what an entry leaves out.
//! Relative artifact paths are under `--artifacts` (default: the
//! `samples/target` directory beside the suite file's directory, where
//! `cargo build` of `samples/` puts them).

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{ExitCode, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::Args;
use serde::Deserialize;

use super::Results;
use super::run::{Cache, Config, Plan};

#[derive(Debug, Args)]
pub(crate) struct SuiteArgs {
    /// The suite (TOML): [defaults], [[bench]] and [[http]] entries.
    file: PathBuf,
    /// Where relative artifact paths start (default: samples/target
    /// beside the suite file's directory).
    #[arg(long, value_name = "DIR")]
    artifacts: Option<PathBuf>,
    /// Write the results (JSON) to this file.
    #[arg(long, value_name = "FILE.json")]
    save: Option<PathBuf>,
    #[command(flatten)]
    output: super::OutputArgs,
}

/// A `[[bench]]` entry, or `[defaults]`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Entry {
    name: Option<String>,
    artifact: Option<String>,
    args: Option<Vec<String>>,
    params: Option<BTreeMap<String, Vec<String>>>,
    runs: Option<usize>,
    duration: Option<String>,
    warmup: Option<usize>,
    concurrency: Option<usize>,
    cold: Option<bool>,
    /// `memory` (default) or `disk`.
    cache: Option<String>,
    fuel: Option<u64>,
    memory: Option<String>,
    timeout: Option<String>,
    env: Option<BTreeMap<String, String>>,
}

impl Entry {
    /// This entry, with `defaults` where it says nothing.
    fn or(self, d: &Entry) -> Entry {
        Entry {
            name: self.name,
            artifact: self.artifact.or_else(|| d.artifact.clone()),
            args: self.args.or_else(|| d.args.clone()),
            params: self.params.or_else(|| d.params.clone()),
            // An entry's own runs or duration beats the defaults' other one.
            runs: self.runs.or(if self.duration.is_some() {
                None
            } else {
                d.runs
            }),
            duration: self.duration.clone().or_else(|| {
                if self.runs.is_some() {
                    None
                } else {
                    d.duration.clone()
                }
            }),
            warmup: self.warmup.or(d.warmup),
            concurrency: self.concurrency.or(d.concurrency),
            cold: self.cold.or(d.cold),
            cache: self.cache.or_else(|| d.cache.clone()),
            fuel: self.fuel.or(d.fuel),
            memory: self.memory.or_else(|| d.memory.clone()),
            timeout: self.timeout.or_else(|| d.timeout.clone()),
            env: self.env.or_else(|| d.env.clone()),
        }
    }
}

/// An `[[http]]` entry.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct HttpEntry {
    name: String,
    /// A `wasi:http` component to serve for the entry (with `path`).
    serve: Option<String>,
    /// The server to serve it with, instead of `wharf serve`: a command
    /// (split on spaces, no shell) whose `{file}` is the component and
    /// `{addr}` a free loopback address, e.g. `wasmtime serve -Scli
    /// --addr {addr} {file}`; the load starts once `{addr}` accepts.
    command: Option<String>,
    /// Or a URL to load.
    url: Option<String>,
    #[serde(default = "root")]
    path: String,
    rate: Option<f64>,
    connections: Option<usize>,
    duration: Option<String>,
    method: Option<String>,
    #[serde(default)]
    headers: BTreeMap<String, String>,
}

fn root() -> String {
    "/".into()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SuiteFile {
    #[serde(default)]
    defaults: Entry,
    #[serde(default)]
    bench: Vec<Entry>,
    #[serde(default)]
    http: Vec<HttpEntry>,
}

fn duration(field: &str, text: &str) -> Result<Duration> {
    wharf_runtime::parse_duration(text).with_context(|| format!("{field}: {text:?}"))
}

/// A `wharf serve` of `file` on a free loopback port, stopped when dropped.
struct Served {
    child: std::process::Child,
    base: String,
}

impl Served {
    /// `command` with `{file}` and `{addr}` replaced, once it listens.
    fn start_command(command: &str, file: &Path) -> Result<Served> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let addr = format!("127.0.0.1:{port}");
        let argv: Vec<String> = command
            .split_whitespace()
            .map(|w| {
                w.replace("{file}", &file.display().to_string())
                    .replace("{addr}", &addr)
            })
            .collect();
        let (program, rest) = argv.split_first().context("an empty command")?;
        let child = std::process::Command::new(program)
            .args(rest)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("cannot start {program}"))?;
        let mut served = Served {
            child,
            base: format!("http://{addr}"),
        };
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(&addr).is_err() {
            if let Some(status) = served.child.try_wait()? {
                bail!("{command} exited ({status}) before it listened on {addr}");
            }
            if std::time::Instant::now() > deadline {
                bail!("{command} did not listen on {addr} within 30 s");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(served)
    }

    fn start(file: &Path) -> Result<Served> {
        let exe = std::env::current_exe().context("cannot find this wharf binary")?;
        let mut child = std::process::Command::new(exe)
            .args(["serve", "--listen", "127.0.0.1:0"])
            .arg(file)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("cannot start wharf serve")?;
        let stderr = child.stderr.take().context("no stderr")?;
        let mut lines = BufReader::new(stderr).lines();
        let mut said = String::new();
        let base = loop {
            match lines.next() {
                Some(Ok(line)) => {
                    if let Some(rest) = line.strip_prefix("wharf: serving ") {
                        break rest.trim().to_owned();
                    }
                    said.push_str(&line);
                    said.push('\n');
                }
                _ => {
                    let _ = child.wait();
                    bail!("wharf serve {} did not start: {said}", file.display());
                }
            }
        };
        std::thread::spawn(move || for _ in lines {});
        Ok(Served { child, base })
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub(crate) fn main(args: SuiteArgs) -> Result<ExitCode> {
    let text = std::fs::read_to_string(&args.file)
        .with_context(|| format!("cannot read {}", args.file.display()))?;
    let suite: SuiteFile =
        toml::from_str(&text).with_context(|| format!("{} is not a suite", args.file.display()))?;
    if suite.bench.is_empty() && suite.http.is_empty() {
        bail!("{} has no [[bench]] or [[http]] entry", args.file.display());
    }
    let here = args
        .file
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default();
    let artifacts = args
        .artifacts
        .clone()
        .unwrap_or_else(|| here.join("..").join("samples").join("target"));
    let resolve = |p: &str| {
        let path = PathBuf::from(p);
        if path.is_absolute() {
            path
        } else {
            artifacts.join(path)
        }
    };
    let data_dir = crate::paths::data_dir(None)?;
    let started_at = super::report::now();
    let mut benchmarks = Vec::new();
    for (i, entry) in suite.bench.into_iter().enumerate() {
        let e = entry.or(&suite.defaults);
        let what = format!("[[bench]] {}", i + 1);
        let artifact = e
            .artifact
            .clone()
            .with_context(|| format!("{what}: no artifact"))?;
        let file = resolve(&artifact);
        let name = e.name.clone().unwrap_or_else(|| artifact.clone());
        let plan = match (e.runs, &e.duration) {
            (Some(n), _) => Plan::Runs(n.max(1)),
            (None, Some(d)) => Plan::For(duration(&format!("{what}.duration"), d)?, 1),
            (None, None) => Plan::default_plan(),
        };
        let config = Config {
            name,
            plan,
            warmup: e.warmup.unwrap_or(0),
            concurrency: e.concurrency.unwrap_or(1).max(1),
            cold: e.cold.unwrap_or(false),
            cache: match e.cache.as_deref() {
                None | Some("memory") => Cache::Memory,
                Some("disk") => Cache::Disk,
                Some(other) => bail!("{what}.cache: {other:?} is not memory or disk"),
            },
            fuel: e.fuel,
            memory: e
                .memory
                .as_deref()
                .map(|m| {
                    wharf_runtime::parse_size(m).with_context(|| format!("{what}.memory: {m:?}"))
                })
                .transpose()?,
            timeout: e
                .timeout
                .as_deref()
                .map(|t| duration(&format!("{what}.timeout"), t))
                .transpose()?,
            env: e.env.clone().unwrap_or_default().into_iter().collect(),
            dirs: Vec::new(),
            params: e.params.clone().unwrap_or_default().into_iter().collect(),
            args: e.args.clone().unwrap_or_default(),
            compare_with: None,
        };
        eprintln!("wharf: {}", config.name);
        benchmarks.extend(super::run::benchmarks(
            &file, &artifact, &config, &data_dir,
        )?);
    }
    let mut http = Vec::new();
    for (i, e) in suite.http.iter().enumerate() {
        let what = format!("[[http]] {}", i + 1);
        let served = match (&e.serve, &e.command) {
            (Some(file), Some(command)) => Some(Served::start_command(command, &resolve(file))?),
            (Some(file), None) => Some(Served::start(&resolve(file))?),
            (None, Some(_)) => bail!("{what}: command needs serve (the component)"),
            (None, None) => None,
        };
        let url = match (&served, &e.url) {
            (Some(s), _) => format!("{}{}", s.base, e.path),
            (None, Some(u)) => u.clone(),
            (None, None) => bail!("{what}: give serve or url"),
        };
        eprintln!("wharf: {}", e.name);
        let headers = e.headers.iter().map(|(k, v)| format!("{k}:{v}")).collect();
        let load = super::http::Load {
            name: e.name.clone(),
            url,
            rate: e.rate,
            connections: e.connections.unwrap_or(10),
            duration: match &e.duration {
                Some(d) => duration(&format!("{what}.duration"), d)?,
                None => Duration::from_secs(10),
            },
            method: e.method.clone().unwrap_or_else(|| "GET".into()),
            headers,
            host_header: None,
            body: bytes::Bytes::new(),
            timeout: Duration::from_secs(30),
            ca_cert: None,
        };
        http.push(super::http::load(&load)?);
        drop(served);
    }
    let results = Results::new(started_at, benchmarks, http, Vec::new());
    super::emit(&results, args.save.as_ref(), &args.output)?;
    let failed = results.benchmarks.iter().any(|b| !b.failed.is_empty())
        || results.http.iter().any(|h| h.requests == 0);
    Ok(if failed {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}
