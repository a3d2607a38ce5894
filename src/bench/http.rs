//! `wharf bench http`: HTTP load against any URL, or a Wharf service by
//! name through the server's ingress.
//!
//! Open loop (`--rate R`): request `i` is due at `start + i / R`, whether
//! or not the server kept up, and its latency is measured from that due
//! time — a stall shows as the latency of every request it delayed, not
//! as fewer samples (the coordinated-omission correction of wrk2). Closed
//! loop (default): `--connections C` connections each send the next
//! request when the last one is answered. Latencies go into HDR
//! histograms (microseconds, 3 significant digits); answers are counted
//! by status code and failures by kind.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use clap::Args;
use hdrhistogram::Histogram;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use serde::{Deserialize, Serialize};

#[derive(Debug, Args)]
pub(crate) struct HttpArgs {
    /// The URL to load (http:// or https://); or give --service.
    #[arg(required_unless_present = "service")]
    url: Option<String>,
    /// A Wharf HTTP service by name: loaded through the server's ingress
    /// at its first route.
    #[arg(long, conflicts_with = "url")]
    service: Option<String>,
    /// Open loop: requests per second, each timed from when it was due.
    #[arg(long)]
    rate: Option<f64>,
    /// Connections (closed loop: each sends its next request when the last
    /// is answered; open loop: how many requests may be in flight).
    #[arg(long, default_value_t = 10)]
    connections: usize,
    /// How long to load, e.g. 10s.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    duration: Duration,
    /// The request method.
    #[arg(long, default_value = "GET")]
    method: String,
    /// A request header, K:V (repeatable).
    #[arg(long = "header", value_name = "K:V")]
    headers: Vec<String>,
    /// The request body, from a file.
    #[arg(long)]
    body: Option<PathBuf>,
    /// How long one request may take before it counts as a timeout.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    timeout: Duration,
    /// A CA certificate (PEM) to trust for https:// (default: the web's
    /// roots).
    #[arg(long, env = "WHARF_CA_CERT")]
    ca_cert: Option<PathBuf>,
    /// The Wharf server (for --service).
    #[arg(long, env = "WHARF_SERVER", default_value = "http://127.0.0.1:7070")]
    server: String,
    /// Wharf token (for --service; default: the local admin token).
    #[arg(long, env = "WHARF_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Data directory (its admin token, for --service).
    #[arg(long, env = "WHARF_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// The benchmark's name (default: the URL).
    #[arg(long)]
    name: Option<String>,
    /// Write the results (JSON) to this file.
    #[arg(long, value_name = "FILE.json")]
    save: Option<PathBuf>,
    #[command(flatten)]
    output: super::OutputArgs,
}

fn parse_duration(text: &str) -> Result<Duration, String> {
    wharf_runtime::parse_duration(text).map_err(|e| e.to_string())
}

/// One HTTP load benchmark's results.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct HttpBenchmark {
    pub(crate) name: String,
    pub(crate) url: String,
    pub(crate) method: String,
    /// `open` (fixed rate) or `closed`.
    pub(crate) mode: String,
    /// The open loop's target rate.
    pub(crate) rate: Option<f64>,
    pub(crate) connections: usize,
    /// How long requests were sent, in seconds.
    pub(crate) duration_s: f64,
    /// Until the last answer, in seconds (an open loop that fell behind
    /// sends its late requests after the duration).
    pub(crate) elapsed_s: f64,
    /// Requests answered (any status).
    pub(crate) requests: u64,
    /// Answers per second until the last answer.
    pub(crate) throughput: f64,
    /// Latency of answered and timed-out requests, in milliseconds (open
    /// loop: from when each was due).
    pub(crate) latency_ms: LatencySummary,
    /// Answers by status code.
    pub(crate) status: BTreeMap<String, u64>,
    /// Failures by kind (`connect`, `timeout`, `io`, `tls`).
    pub(crate) errors: BTreeMap<String, u64>,
    /// Per second: answers, failures, median and p99 latency (ms).
    pub(crate) timeline: Vec<Second>,
    /// The latency distribution: `[upper bound ms, count]` per bucket.
    pub(crate) histogram: Vec<[f64; 2]>,
    pub(crate) warnings: Vec<String>,
}

/// HDR percentiles.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub(crate) struct LatencySummary {
    pub(crate) mean: f64,
    pub(crate) stddev: f64,
    pub(crate) p50: f64,
    pub(crate) p90: f64,
    pub(crate) p99: f64,
    pub(crate) p999: f64,
    pub(crate) min: f64,
    pub(crate) max: f64,
}

/// One second of the run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Second {
    pub(crate) t: u64,
    pub(crate) requests: u64,
    pub(crate) errors: u64,
    pub(crate) p50_ms: f64,
    pub(crate) p99_ms: f64,
}

/// A new latency histogram: 1 µs to 1 hour, 3 significant digits.
fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("valid bounds")
}

/// What one connection saw.
struct Tally {
    all: Histogram<u64>,
    seconds: Vec<(Histogram<u64>, u64)>,
    status: BTreeMap<String, u64>,
    errors: BTreeMap<String, u64>,
}

impl Tally {
    fn new() -> Tally {
        Tally {
            all: histogram(),
            seconds: Vec::new(),
            status: BTreeMap::new(),
            errors: BTreeMap::new(),
        }
    }

    fn second(&mut self, s: usize) -> &mut (Histogram<u64>, u64) {
        while self.seconds.len() <= s {
            self.seconds.push((histogram(), 0));
        }
        &mut self.seconds[s]
    }

    fn answer(&mut self, at: usize, status: u16, latency: Duration) {
        let us = (latency.as_micros() as u64).clamp(1, 3_600_000_000);
        let _ = self.all.record(us);
        let _ = self.second(at).0.record(us);
        *self.status.entry(status.to_string()).or_insert(0) += 1;
    }

    /// The latency of a request that got no answer (a timeout).
    fn late(&mut self, at: usize, latency: Duration) {
        let us = (latency.as_micros() as u64).clamp(1, 3_600_000_000);
        let _ = self.all.record(us);
        let _ = self.second(at).0.record(us);
    }

    fn error(&mut self, at: usize, kind: &str) {
        self.second(at).1 += 1;
        *self.errors.entry(kind.to_owned()).or_insert(0) += 1;
    }

    fn merge(&mut self, other: Tally) {
        let _ = self.all.add(&other.all);
        for (i, (h, e)) in other.seconds.into_iter().enumerate() {
            let mine = self.second(i);
            let _ = mine.0.add(&h);
            mine.1 += e;
        }
        for (k, v) in other.status {
            *self.status.entry(k).or_insert(0) += v;
        }
        for (k, v) in other.errors {
            *self.errors.entry(k).or_insert(0) += v;
        }
    }
}

/// Where and what to send.
struct Target {
    host: String,
    port: u16,
    tls: Option<(
        tokio_rustls::TlsConnector,
        rustls_pki_types::ServerName<'static>,
    )>,
    method: http::Method,
    uri: http::Uri,
    headers: http::HeaderMap,
    body: Bytes,
}

impl Target {
    /// The next request (the same every time).
    fn request(&self) -> http::Request<Full<Bytes>> {
        let mut r = http::Request::new(Full::new(self.body.clone()));
        *r.method_mut() = self.method.clone();
        *r.uri_mut() = self.uri.clone();
        *r.headers_mut() = self.headers.clone();
        r
    }
}

type Sender = hyper::client::conn::http1::SendRequest<Full<Bytes>>;

/// Opens a connection, or says what kind of failure it was.
async fn connect(target: &Target) -> std::result::Result<Sender, &'static str> {
    let tcp = tokio::net::TcpStream::connect((target.host.as_str(), target.port))
        .await
        .map_err(|_| "connect")?;
    let _ = tcp.set_nodelay(true);
    macro_rules! handshake {
        ($io:expr) => {{
            let (sender, conn) = hyper::client::conn::http1::handshake($io)
                .await
                .map_err(|_| "connect")?;
            tokio::spawn(async move {
                let _ = conn.await;
            });
            Ok(sender)
        }};
    }
    match &target.tls {
        None => handshake!(TokioIo::new(tcp)),
        Some((connector, name)) => {
            let stream = connector
                .connect(name.clone(), tcp)
                .await
                .map_err(|_| "tls")?;
            handshake!(TokioIo::new(stream))
        }
    }
}

/// One connection's loop until `end`.
async fn connection(
    target: Arc<Target>,
    next: Arc<AtomicU64>,
    answered: Arc<AtomicU64>,
    start: Instant,
    end: Instant,
    rate: Option<f64>,
    timeout: Duration,
) -> Tally {
    let mut tally = Tally::new();
    let mut sender: Option<Sender> = None;
    loop {
        // When this request is due: its slot in the schedule (open loop),
        // or now (closed loop).
        let due = match rate {
            Some(r) => {
                let i = next.fetch_add(1, Ordering::AcqRel);
                let due = start + Duration::from_secs_f64(i as f64 / r);
                if due >= end {
                    break;
                }
                tokio::time::sleep_until(due.into()).await;
                due
            }
            None => {
                // Every connection begins at `start`, as the clock does.
                tokio::time::sleep_until(start.into()).await;
                let now = Instant::now();
                if now >= end {
                    break;
                }
                now
            }
        };
        let second = due.duration_since(start).as_secs() as usize;
        let ready = match sender.take() {
            Some(mut s) => s.ready().await.ok().map(|()| s),
            None => None,
        };
        let s = match ready {
            Some(s) => s,
            None => match connect(&target).await {
                Ok(s) => s,
                Err(kind) => {
                    tally.error(second, kind);
                    if rate.is_none() {
                        // Not a busy loop against a server that is down.
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                    continue;
                }
            },
        };
        let mut s = s;
        let request = target.request();
        let exchange = async {
            let response = s.send_request(request).await?;
            let status = response.status().as_u16();
            // The whole body, as a client would read it.
            response.into_body().collect().await?;
            Ok::<u16, hyper::Error>(status)
        };
        match tokio::time::timeout(timeout, exchange).await {
            Ok(Ok(status)) => {
                tally.answer(second, status, due.elapsed());
                answered.fetch_add(1, Ordering::Relaxed);
                sender = Some(s);
            }
            Ok(Err(_)) => tally.error(second, "io"),
            // A request given up on still waited this long: it counts in
            // the latencies (a stall longer than the timeout stays in p99).
            Err(_) => {
                tally.error(second, "timeout");
                tally.late(second, due.elapsed());
            }
        }
    }
    tally
}

/// The URL and Host header of a service's first route, through the
/// server's ingress.
fn service_url(args: &HttpArgs, service: &str) -> Result<(String, Option<String>)> {
    let token = match &args.token {
        Some(t) => t.clone(),
        None => crate::paths::local_admin_token(args.data_dir.clone())?,
    };
    let base = args.server.trim_end_matches('/');
    let get = |path: &str| -> Result<serde_json::Value> {
        let response = ureq::get(&format!("{base}{path}"))
            .set("authorization", &format!("Bearer {token}"))
            .call();
        match response {
            Ok(r) => Ok(r.into_json()?),
            Err(ureq::Error::Status(code, r)) => {
                let body: serde_json::Value = r.into_json().unwrap_or_default();
                bail!(
                    "{base}{path}: {code} {}",
                    body["message"].as_str().unwrap_or("")
                )
            }
            Err(e) => bail!("cannot reach {base}: {e}"),
        }
    };
    let s = get(&format!("/v1/services/{}", crate::client::segment(service)))?;
    let route = s["routes"]
        .as_array()
        .and_then(|r| r.first())
        .and_then(|r| r.as_str())
        .with_context(|| {
            format!("service {service} has no route: it is not served by the ingress")
        })?
        .to_owned();
    let nodes = get("/v1/nodes")?;
    let ingress = nodes
        .as_array()
        .and_then(|n| n.iter().find(|n| n["local"] == true))
        .and_then(|n| n["ingress"].as_str())
        .context("the server has no ingress (wharf server --ingress)")?
        .to_owned();
    let (host, path) = match route.find('/') {
        Some(0) => (None, route.as_str()),
        Some(i) => (Some(route[..i].to_owned()), &route[i..]),
        None => (Some(route.clone()), "/"),
    };
    Ok((format!("http://{ingress}{path}"), host))
}

/// One HTTP load, as flags or a suite entry give it.
pub(crate) struct Load {
    pub(crate) name: String,
    pub(crate) url: String,
    /// The Host header, if not the URL's.
    pub(crate) host_header: Option<String>,
    pub(crate) rate: Option<f64>,
    pub(crate) connections: usize,
    pub(crate) duration: Duration,
    pub(crate) method: String,
    /// `K:V` each.
    pub(crate) headers: Vec<String>,
    pub(crate) body: Bytes,
    pub(crate) timeout: Duration,
    pub(crate) ca_cert: Option<PathBuf>,
}

/// The load the flags describe.
fn measure(args: &HttpArgs) -> Result<HttpBenchmark> {
    let (url, host_header) = match (&args.url, &args.service) {
        (Some(u), _) => (u.clone(), None),
        (None, Some(s)) => service_url(args, s)?,
        (None, None) => bail!("give a URL or --service"),
    };
    let body = match &args.body {
        Some(p) => Bytes::from(
            std::fs::read(p).with_context(|| format!("cannot read --body {}", p.display()))?,
        ),
        None => Bytes::new(),
    };
    load(&Load {
        name: args.name.clone().unwrap_or_else(|| url.clone()),
        url,
        host_header,
        rate: args.rate,
        connections: args.connections,
        duration: args.duration,
        method: args.method.clone(),
        headers: args.headers.clone(),
        body,
        timeout: args.timeout,
        ca_cert: args.ca_cert.clone(),
    })
}

/// Runs one HTTP benchmark.
pub(crate) fn load(args: &Load) -> Result<HttpBenchmark> {
    if args.connections == 0 {
        bail!("--connections must be at least 1");
    }
    if let Some(r) = args.rate
        && !(r > 0.0 && r.is_finite())
    {
        bail!("--rate must be a positive number of requests per second");
    }
    let (url, host_header) = (args.url.clone(), args.host_header.clone());
    let parsed = url::Url::parse(&url).with_context(|| format!("{url} is not a URL"))?;
    let host = parsed
        .host_str()
        .with_context(|| format!("{url} has no host"))?
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_owned();
    let port = parsed.port_or_known_default().unwrap_or(80);
    let tls = match parsed.scheme() {
        "http" => None,
        "https" => {
            let config = match &args.ca_cert {
                Some(path) => {
                    let pem = std::fs::read_to_string(path)
                        .with_context(|| format!("cannot read --ca-cert {}", path.display()))?;
                    crate::tls::client_trusting(&pem)?
                }
                None => crate::tls::client_with_web_roots()?,
            };
            let name = rustls_pki_types::ServerName::try_from(host.clone())
                .with_context(|| format!("{host} is not a TLS server name"))?;
            Some((tokio_rustls::TlsConnector::from(config), name))
        }
        other => bail!("{other}:// is not HTTP; give http:// or https://"),
    };
    let path = match parsed.query() {
        Some(q) => format!("{}?{q}", parsed.path()),
        None => parsed.path().to_owned(),
    };
    let method = http::Method::from_bytes(args.method.to_ascii_uppercase().as_bytes())
        .with_context(|| format!("{} is not an HTTP method", args.method))?;
    let host_value = host_header.unwrap_or_else(|| match parsed.port() {
        Some(p) => format!("{}:{p}", parsed.host_str().unwrap_or_default()),
        None => parsed.host_str().unwrap_or_default().to_owned(),
    });
    let mut request = http::Request::builder()
        .method(method)
        .uri(path)
        .header(http::header::HOST, host_value)
        .header(http::header::USER_AGENT, "wharf-bench");
    for h in &args.headers {
        let (k, v) = h
            .split_once(':')
            .with_context(|| format!("--header {h:?} is not K:V"))?;
        request = request.header(k.trim(), v.trim());
    }
    let body = args.body.clone();
    // A bad header fails here, not in every connection.
    let (parts, ()) = request
        .body(())
        .context("the request is not valid HTTP")?
        .into_parts();
    let target = Arc::new(Target {
        host,
        port,
        tls,
        method: parts.method,
        uri: parts.uri,
        headers: parts.headers,
        body,
    });
    let tokio = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("failed to start the async runtime")?;
    // Progress on a terminal only: quiet when piped.
    let progress = std::io::IsTerminal::is_terminal(&std::io::stderr()).then(|| {
        let p = indicatif::ProgressBar::new(args.duration.as_secs().max(1));
        p.set_style(
            indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} s  {msg}")
                .expect("valid template"),
        );
        p
    });
    let answered = Arc::new(AtomicU64::new(0));
    let (tally, took) = tokio.block_on(async {
        let next = Arc::new(AtomicU64::new(0));
        let start = Instant::now() + Duration::from_millis(20);
        let end = start + args.duration;
        let ticker = progress.clone().map(|p| {
            let answered = answered.clone();
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    p.set_position(start.elapsed().as_secs());
                    p.set_message(format!("{} answers", answered.load(Ordering::Relaxed)));
                }
            })
        });
        let workers: Vec<_> = (0..args.connections)
            .map(|_| {
                tokio::spawn(connection(
                    target.clone(),
                    next.clone(),
                    answered.clone(),
                    start,
                    end,
                    args.rate,
                    args.timeout,
                ))
            })
            .collect();
        let mut tally = Tally::new();
        for w in workers {
            if let Ok(t) = w.await {
                tally.merge(t);
            }
        }
        if let Some(t) = ticker {
            t.abort();
        }
        (tally, start.elapsed())
    });
    if let Some(p) = progress {
        p.finish_and_clear();
    }
    let ms = |us: u64| us as f64 / 1000.0;
    let h = &tally.all;
    let requests: u64 = tally.status.values().sum();
    let duration_s = args.duration.as_secs_f64();
    let latency_ms = if !h.is_empty() {
        LatencySummary {
            mean: h.mean() / 1000.0,
            stddev: h.stdev() / 1000.0,
            p50: ms(h.value_at_quantile(0.5)),
            p90: ms(h.value_at_quantile(0.9)),
            p99: ms(h.value_at_quantile(0.99)),
            p999: ms(h.value_at_quantile(0.999)),
            min: ms(h.min()),
            max: ms(h.max()),
        }
    } else {
        LatencySummary::default()
    };
    let timeline = tally
        .seconds
        .iter()
        .enumerate()
        .map(|(t, (h, e))| Second {
            t: t as u64,
            requests: h.len(),
            errors: *e,
            p50_ms: if h.is_empty() {
                0.0
            } else {
                ms(h.value_at_quantile(0.5))
            },
            p99_ms: if h.is_empty() {
                0.0
            } else {
                ms(h.value_at_quantile(0.99))
            },
        })
        .collect();
    let histogram = h
        .iter_log(1, 2.0)
        .filter(|v| v.count_since_last_iteration() > 0)
        .map(|v| {
            [
                ms(v.value_iterated_to()),
                v.count_since_last_iteration() as f64,
            ]
        })
        .collect();
    let elapsed_s = took.as_secs_f64().max(f64::MIN_POSITIVE);
    let throughput = requests as f64 / elapsed_s;
    let mut warnings = Vec::new();
    let failed: u64 = tally.errors.values().sum();
    if failed > 0 {
        let kinds: Vec<String> = tally
            .errors
            .iter()
            .map(|(k, n)| format!("{k} ×{n}"))
            .collect();
        warnings.push(format!("{failed} requests failed ({})", kinds.join(", ")));
    }
    if let Some(r) = args.rate
        && throughput < r * 0.95
    {
        warnings.push(format!(
            "The target rate of {r}/s was not reached ({throughput:.1}/s): the server did not keep up, or more --connections are needed; latencies count the wait."
        ));
    }
    if requests == 0 {
        warnings.push("No request was answered.".into());
    }
    Ok(HttpBenchmark {
        name: args.name.clone(),
        url,
        method: args.method.to_ascii_uppercase(),
        mode: if args.rate.is_some() {
            "open"
        } else {
            "closed"
        }
        .into(),
        rate: args.rate,
        connections: args.connections,
        duration_s,
        elapsed_s,
        requests,
        throughput,
        latency_ms,
        status: tally.status,
        errors: tally.errors,
        timeline,
        histogram,
        warnings,
    })
}

pub(crate) fn main(args: HttpArgs) -> Result<std::process::ExitCode> {
    let bench = measure(&args)?;
    let results = super::Results::new(super::report::now(), Vec::new(), vec![bench], Vec::new());
    super::emit(&results, args.save.as_ref(), &args.output)?;
    let answered = results.http.iter().all(|b| b.requests > 0);
    Ok(if answered {
        std::process::ExitCode::SUCCESS
    } else {
        std::process::ExitCode::from(1)
    })
}
