//! HTTP services end to end through the real server: `kind = "http"`
//! task definitions, services with routes, and the ingress on its own
//! port — routing, balancing, limits, draining, rolling updates,
//! rollbacks, outbound HTTP and a kill -9 under load.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use wharf_testkit::Target;

use crate::server::{Response, Server, call, converged, events, eventually, register, service};

fn create_service(s: &Server, body: Value) -> Value {
    let r = s.api("POST", "/v1/services", Some(body));
    assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
    r.json()
}

/// A task's output so far, as text.
fn log_text(s: &Server, task: &Value) -> String {
    let logs = s.api(
        "GET",
        &format!("/v1/tasks/{}/logs", task["id"].as_str().unwrap()),
        None,
    );
    String::from_utf8_lossy(&logs.body).into_owned()
}

/// Live tasks of a service.
fn tasks_of(s: &Server, name: &str) -> Vec<Value> {
    let r = s.api("GET", &format!("/v1/tasks?service={name}"), None);
    assert_eq!(r.status, 200);
    r.json().as_array().unwrap().to_vec()
}

fn agent() -> ureq::Agent {
    ureq::AgentBuilder::new()
        .timeout(Duration::from_secs(30))
        .build()
}

/// A request through the ingress.
fn ingress(s: &Server, method: &str, path: &str) -> ureq::Request {
    let base = s.ingress.as_deref().expect("the ingress is on");
    agent().request(method, &format!("{base}{path}"))
}

fn get(s: &Server, path: &str) -> Response {
    call(ingress(s, "GET", path).call())
}

/// One HTTP/1.1 exchange written by hand (for headers a client library
/// would not send), read until the server closes.
fn raw(s: &Server, request: &[u8]) -> String {
    raw_to(s.ingress.as_deref().unwrap(), request)
}

fn raw_to(base: &str, request: &[u8]) -> String {
    let addr = base.trim_start_matches("http://");
    let mut stream = TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    stream.write_all(request).unwrap();
    let mut out = Vec::new();
    let _ = stream.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

/// Pushes `sample` and registers an `http` task definition of it.
fn http_def(s: &Server, sample: &str, family: &str, extra: Value) -> Value {
    let repo = format!("team/{sample}:v1");
    s.push_sample(sample, Target::P2, &repo);
    let mut def = json!({"family": family, "artifact": repo, "kind": "http"});
    for (k, v) in extra.as_object().unwrap() {
        def[k] = v.clone();
    }
    register(s, def)
}

fn metrics(s: &Server) -> String {
    String::from_utf8(s.api("GET", "/metrics", None).body).unwrap()
}

#[test]
fn a_pushed_component_is_served_through_the_ingress_with_forwarding_headers() {
    let s = Server::start();
    let def = http_def(
        &s,
        "http_echo",
        "api",
        json!({"http": {"health_check": "/healthz", "max_request_body": "1KiB"},
               "limits": {"fuel": 50_000_000u64, "memory": "32MiB"}}),
    );
    assert_eq!(def["kind"], "http");
    assert_eq!(def["http"]["health_check"], "/healthz");
    assert_eq!(def["http"]["max_concurrency"], 64);
    create_service(
        &s,
        json!({"name": "api", "task_definition": "api", "desired_count": 1,
               "routes": ["api.localhost", "/api/v1"]}),
    );
    let svc = converged(&s, "api", 1);
    assert_eq!(svc["routes"], json!(["api.localhost", "/api/v1"]));

    // By path prefix.
    let r = call(
        ingress(&s, "POST", "/api/v1/users?x=1")
            .set("X-Forwarded-For", "10.1.2.3")
            .send_string("name=ann"),
    );
    assert_eq!(r.status, 200, "{r:?}");
    let echoed = r.json();
    assert_eq!(echoed["method"], "POST");
    assert_eq!(echoed["path"], "/api/v1/users?x=1");
    assert_eq!(echoed["body"], "name=ann");
    let header = |name: &str| {
        echoed["headers"]
            .as_array()
            .unwrap()
            .iter()
            .find(|h| h[0] == name)
            .map(|h| h[1].as_str().unwrap().to_owned())
    };
    assert_eq!(header("x-forwarded-for").unwrap(), "10.1.2.3, 127.0.0.1");
    assert_eq!(header("x-forwarded-proto").unwrap(), "http");
    let id = header("x-request-id").expect("a request id is set");
    assert_eq!(r.header("x-request-id"), Some(id.as_str()));
    // A client's own request id is kept.
    let r = call(
        ingress(&s, "GET", "/api/v1")
            .set("X-Request-Id", "abc-123")
            .call(),
    );
    assert_eq!(r.header("x-request-id"), Some("abc-123"));

    // By host (any path), and the exact host wins over the path route.
    let answer = raw(
        &s,
        b"GET /elsewhere HTTP/1.1\r\nHost: API.localhost:7080\r\nConnection: close\r\n\r\n",
    );
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.contains("\"path\":\"/elsewhere\""), "{answer}");

    // Nothing routed: 404 with a JSON body.
    let r = get(&s, "/nothing-here");
    assert_eq!(r.status, 404);
    assert_eq!(r.json()["code"], "NOT_FOUND");
    let r = get(&s, "/api/v1x");
    assert_eq!(r.status, 404, "a prefix matches whole segments only");

    // The task's record counts what it served; the metrics too.
    let task = &tasks_of(&s, "api")[0];
    assert_eq!(task["status"], "RUNNING");
    assert!(
        task["http"]["responses"]["2xx"].as_u64().unwrap() >= 3,
        "{task}"
    );
    assert!(task["fuel_consumed"].as_u64().unwrap() > 0, "{task}");
    assert!(task["http"]["latency_p99_ms"].as_f64().is_some(), "{task}");
    let m = metrics(&s);
    assert!(
        m.contains("wharf_http_requests_total{code=\"200\",service=\"api\"}"),
        "{m}"
    );
    assert!(m.contains("wharf_http_request_fuel_count{service=\"api\"}"));
    assert!(m.contains("wharf_http_instances_total{service=\"api\"}"));
    // The guest's stdout reaches the task's log.
    let logs = log_text(&s, task);
    assert!(logs.contains("echo: POST /api/v1/users?x=1"), "{logs}");
}

#[test]
fn http_definitions_are_checked_against_what_the_artifact_exports() {
    let s = Server::start();
    s.push_sample("hello", Target::P2, "team/hello:v1");
    s.push_sample("http_hello", Target::P2, "team/web:v1");
    // A command is not an HTTP component: 422 naming kind and what it exports.
    let r = s.api(
        "POST",
        "/v1/taskdefs",
        Some(json!({"family": "x", "artifact": "team/hello:v1", "kind": "http"})),
    );
    assert_eq!(r.status, 422, "{r:?}");
    let message = r.json()["message"].as_str().unwrap().to_owned();
    assert!(message.starts_with("kind"), "{message}");
    assert!(message.contains("wasi:cli/run"), "{message}");
    // And an HTTP component registered as a command is told to be http.
    let r = s.api(
        "POST",
        "/v1/taskdefs",
        Some(json!({"family": "x", "artifact": "team/web:v1"})),
    );
    assert_eq!(r.status, 422, "{r:?}");
    assert!(String::from_utf8_lossy(&r.body).contains("kind = \\\"http\\\""));
    // Bad [http] fields name themselves.
    for (http, field) in [
        (json!({"max_concurrency": 0}), "http.max_concurrency"),
        (json!({"request_timeout": "soon"}), "http.request_timeout"),
        (json!({"health_check": "healthz"}), "http.health_check"),
        (
            json!({"allowed_outbound_hosts": ["ftp://x"]}),
            "http.allowed_outbound_hosts",
        ),
        (json!({"max_request_body": "2GiB"}), "http.max_request_body"),
    ] {
        let r = s.api(
            "POST",
            "/v1/taskdefs",
            Some(json!({"family": "x", "artifact": "team/web:v1", "kind": "http", "http": http})),
        );
        assert_eq!(r.status, 422, "{r:?}");
        assert!(
            r.json()["message"].as_str().unwrap().starts_with(field),
            "{r:?}"
        );
    }
    register(
        &s,
        json!({"family": "web", "artifact": "team/web:v1", "kind": "http"}),
    );
    register(&s, json!({"family": "hello", "artifact": "team/hello:v1"}));
    // An http definition is not a one-off task: 409 saying to create a service.
    let r = s.api("POST", "/v1/tasks", Some(json!({"task_definition": "web"})));
    assert_eq!(r.status, 409, "{r:?}");
    assert!(String::from_utf8_lossy(&r.body).contains("service"));
    // Routes are for HTTP services, well formed, and not another's.
    let r = s.api(
        "POST",
        "/v1/services",
        Some(json!({"name": "cmd", "task_definition": "hello", "desired_count": 0, "routes": ["/x"]})),
    );
    assert_eq!(r.status, 422, "{r:?}");
    let r = s.api(
        "POST",
        "/v1/services",
        Some(json!({"name": "bad", "task_definition": "web", "desired_count": 0, "routes": ["/a?b"]})),
    );
    assert_eq!(r.status, 422, "{r:?}");
    create_service(
        &s,
        json!({"name": "one", "task_definition": "web", "desired_count": 0, "routes": ["/shared"]}),
    );
    let r = s.api(
        "POST",
        "/v1/services",
        Some(json!({"name": "two", "task_definition": "web", "desired_count": 0, "routes": ["/shared/"]})),
    );
    assert_eq!(r.status, 409, "{r:?}");
    create_service(
        &s,
        json!({"name": "two", "task_definition": "web", "desired_count": 0, "routes": ["/other"]}),
    );
    let r = s.api(
        "PATCH",
        "/v1/services/two",
        Some(json!({"routes": ["/shared"]})),
    );
    assert_eq!(r.status, 409, "{r:?}");
    let r = s.api(
        "PATCH",
        "/v1/services/two",
        Some(json!({"routes": ["/moved"]})),
    );
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.json()["routes"], json!(["/moved"]));
    // A service with no task: 503 with Retry-After, not a hang.
    let r = get(&s, "/moved");
    assert_eq!(r.status, 503);
    assert_eq!(r.header("retry-after"), Some("1"));
    assert_eq!(r.json()["code"], "SERVICE_UNAVAILABLE");
}

#[test]
fn scaled_to_three_requests_are_spread_over_every_task() {
    let s = Server::start();
    http_def(&s, "http_hello", "web", json!({}));
    create_service(
        &s,
        json!({"name": "web", "task_definition": "web", "desired_count": 1, "routes": ["/"]}),
    );
    converged(&s, "web", 1);
    let r = s.api(
        "PATCH",
        "/v1/services/web",
        Some(json!({"desired_count": 3})),
    );
    assert_eq!(r.status, 200);
    converged(&s, "web", 3);
    for i in 0..90 {
        let r = get(&s, &format!("/n/{i}"));
        assert_eq!(r.status, 200, "{r:?}");
        assert_eq!(
            String::from_utf8_lossy(&r.body),
            format!("hello from wharf: GET /n/{i}\n")
        );
    }
    // HTTP/2 without TLS (h2c, prior knowledge) on the same port.
    let out = std::process::Command::new("curl")
        .args(["-sS", "--http2-prior-knowledge", "-w", "\n%{http_version}"])
        .arg(format!("{}/h2", s.ingress.as_deref().unwrap()))
        .output()
        .expect("curl (installed by .ci/run)");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "hello from wharf: GET /h2\n\n2",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let tasks = tasks_of(&s, "web");
    assert_eq!(tasks.len(), 3);
    let served: Vec<u64> = tasks
        .iter()
        .map(|t| t["http"]["responses"]["2xx"].as_u64().unwrap_or(0))
        .collect();
    assert_eq!(served.iter().sum::<u64>(), 91, "{served:?}");
    assert!(served.iter().all(|&n| n >= 5), "unbalanced: {served:?}");
    // `wharf task stop` of an HTTP task: it leaves the balancer, stops
    // with UserStopped, and the service replaces it.
    let id = tasks[0]["id"].as_str().unwrap().to_owned();
    let r = s.api("POST", &format!("/v1/tasks/{id}/stop"), Some(json!({})));
    assert_eq!(r.status, 200, "{r:?}");
    let t = s.wait_stopped(&id);
    assert_eq!(t["stop_code"], "UserStopped", "{t}");
    converged(&s, "web", 3);
    assert_eq!(get(&s, "/after-stop").status, 200);
}

#[test]
fn oversized_slow_and_excess_requests_are_refused_as_a_client_understands() {
    let s = Server::start();
    http_def(
        &s,
        "http_echo",
        "echo",
        json!({"http": {"max_request_body": "1KiB"}}),
    );
    http_def(
        &s,
        "http_slow",
        "slow",
        json!({"http": {"max_concurrency": 1}}),
    );
    create_service(
        &s,
        json!({"name": "echo", "task_definition": "echo", "desired_count": 1, "routes": ["/echo"]}),
    );
    create_service(
        &s,
        json!({"name": "slow", "task_definition": "slow", "desired_count": 1, "routes": ["slow.localhost"]}),
    );
    converged(&s, "echo", 1);
    converged(&s, "slow", 1);

    // 413: by Content-Length, and a chunked body that runs past the limit.
    let r = call(ingress(&s, "POST", "/echo").send_bytes(&[b'x'; 2048]));
    assert_eq!(r.status, 413, "{r:?}");
    assert_eq!(r.json()["code"], "PAYLOAD_TOO_LARGE");
    let chunk = format!("{:x}\r\n{}\r\n", 800, "y".repeat(800));
    let answer = raw(
        &s,
        format!(
            "POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n{chunk}{chunk}0\r\n\r\n"
        )
        .as_bytes(),
    );
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    let r = call(ingress(&s, "POST", "/echo").send_bytes(&[b'x'; 1000]));
    assert_eq!(r.status, 200, "{r:?}");

    // 431: headers past the limit.
    let answer = raw(
        &s,
        format!(
            "GET /echo HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\nConnection: close\r\n\r\n",
            "z".repeat(100 << 10)
        )
        .as_bytes(),
    );
    assert!(answer.starts_with("HTTP/1.1 431"), "{answer:.80}");

    // 503 with Retry-After when the only task is at its max_concurrency.
    let slow = std::thread::spawn({
        let base = s.ingress.clone().unwrap();
        move || {
            raw_to(
                &base,
                b"GET /3000 HTTP/1.1\r\nHost: slow.localhost\r\nConnection: close\r\n\r\n",
            )
        }
    });
    eventually(
        Duration::from_secs(10),
        "the slow request in flight",
        || {
            let t = &tasks_of(&s, "slow")[0];
            (t["http"]["in_flight"] == 1).then_some(())
        },
    );
    let answer = raw(
        &s,
        b"GET /1 HTTP/1.1\r\nHost: slow.localhost\r\nConnection: close\r\n\r\n",
    );
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    assert!(
        answer.to_ascii_lowercase().contains("retry-after: 1"),
        "{answer}"
    );
    let answer = slow.join().unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.contains("waited 3000 ms\n"), "{answer}");

    // A client that never finishes its headers is dropped (slowloris),
    // and an HTTP/2 one that opens no stream is closed with a GOAWAY
    // (hyper alone would keep it for ever).
    let addr = s.ingress.as_deref().unwrap().trim_start_matches("http://");
    let mut lazy = TcpStream::connect(addr).unwrap();
    lazy.write_all(b"GET /echo HTTP/1.1\r\nHost: x\r\n")
        .unwrap();
    lazy.set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut quiet = TcpStream::connect(addr).unwrap();
    quiet
        .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0")
        .unwrap();
    quiet
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let started = Instant::now();
    let mut buf = Vec::new();
    let _ = lazy.read_to_end(&mut buf);
    let waited = started.elapsed();
    assert!(
        waited < Duration::from_secs(20),
        "a slow client held its connection for {waited:?}"
    );
    // Read as a client would: a graceful GOAWAY comes with a PING, and
    // the final GOAWAY after its answer.
    let (mut types, mut frames, mut buf) = (Vec::new(), Vec::new(), [0u8; 4096]);
    loop {
        match quiet.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => frames.extend_from_slice(&buf[..n]),
        }
        while frames.len() >= 9 {
            let len =
                usize::from(frames[0]) << 16 | usize::from(frames[1]) << 8 | usize::from(frames[2]);
            if frames.len() < 9 + len {
                break;
            }
            let (kind, flags) = (frames[3], frames[4]);
            types.push(kind);
            if kind == 6 && flags & 1 == 0 {
                let mut ack = vec![0, 0, 8, 6, 1, 0, 0, 0, 0];
                ack.extend_from_slice(&frames[9..17]);
                let _ = quiet.write_all(&ack);
            }
            frames.drain(..9 + len);
        }
    }
    let waited = started.elapsed();
    assert!(
        waited < Duration::from_secs(15),
        "an idle HTTP/2 client held its connection for {waited:?}"
    );
    assert!(types.contains(&7), "closed without a GOAWAY: {types:?}");
    // The ingress serves on.
    assert_eq!(get(&s, "/echo").status, 200);
}

#[test]
fn a_drain_finishes_requests_in_flight_before_the_task_stops() {
    let s = Server::start();
    http_def(&s, "http_slow", "slow", json!({}));
    create_service(
        &s,
        json!({"name": "slow", "task_definition": "slow", "desired_count": 1, "routes": ["/"]}),
    );
    converged(&s, "slow", 1);
    let id = tasks_of(&s, "slow")[0]["id"].as_str().unwrap().to_owned();
    let slow = std::thread::spawn({
        let base = s.ingress.clone().unwrap();
        move || call(agent().get(&format!("{base}/2000")).call())
    });
    eventually(
        Duration::from_secs(10),
        "the slow request in flight",
        || {
            let t = &tasks_of(&s, "slow")[0];
            (t["http"]["in_flight"] == 1).then_some(())
        },
    );
    let r = s.api(
        "PATCH",
        "/v1/services/slow",
        Some(json!({"desired_count": 0})),
    );
    assert_eq!(r.status, 200);
    // No new requests reach the stopping task...
    // (Requests sent before the scale-down reached the task are served.)
    let mut early = 0;
    let r = eventually(Duration::from_secs(5), "new requests refused", || {
        let r = get(&s, "/1");
        early += u64::from(r.status == 200);
        (r.status == 503).then_some(r)
    });
    assert_eq!(r.header("retry-after"), Some("1"));
    // ...while the one in flight finishes.
    let r = slow.join().unwrap();
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.body, b"waited 2000 ms\n");
    let t = s.wait_stopped(&id);
    assert_eq!(t["stop_code"], "ScaledDown", "{t}");
    assert_eq!(t["http"]["responses"]["2xx"], 1 + early, "{t}");
}

/// Requests in a loop until `stop`; counts answers by status and
/// transport errors.
struct Load {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicU64>,
    bad: Arc<std::sync::Mutex<Vec<String>>>,
    versions: Arc<std::sync::Mutex<Vec<String>>>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Load {
    fn start(s: &Server, path: &str, clients: usize) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicU64::new(0));
        let bad = Arc::new(std::sync::Mutex::new(Vec::new()));
        let versions = Arc::new(std::sync::Mutex::new(Vec::new()));
        let url = format!("{}{path}", s.ingress.as_deref().unwrap());
        let threads = (0..clients)
            .map(|_| {
                let (stop, ok, bad, versions, url) = (
                    stop.clone(),
                    ok.clone(),
                    bad.clone(),
                    versions.clone(),
                    url.clone(),
                );
                std::thread::spawn(move || {
                    let agent = agent();
                    while !stop.load(Ordering::Relaxed) {
                        match agent.get(&url).call() {
                            Ok(r) => {
                                let body = r.into_string().unwrap_or_default();
                                let v: Value = serde_json::from_str(&body).unwrap_or_default();
                                let version = v["version"].as_str().unwrap_or_default();
                                let mut seen = versions.lock().unwrap();
                                if seen.last().map(String::as_str) != Some(version) {
                                    seen.push(version.to_owned());
                                }
                                ok.fetch_add(1, Ordering::Relaxed);
                            }
                            Err(e) => bad.lock().unwrap().push(e.to_string()),
                        }
                    }
                })
            })
            .collect();
        Load {
            stop,
            ok,
            bad,
            versions,
            threads,
        }
    }

    /// Stops the clients; returns (answers, failures).
    fn finish(self) -> (u64, Vec<String>, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads {
            t.join().unwrap();
        }
        (
            self.ok.load(Ordering::Relaxed),
            self.bad.lock().unwrap().clone(),
            self.versions.lock().unwrap().clone(),
        )
    }
}

#[test]
fn a_rolling_update_under_load_loses_no_request_and_a_broken_revision_rolls_back() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start_with(
        &dir.path().join("data"),
        &[
            "--deregistration-delay",
            "5s",
            "--health-check-grace",
            "1s",
            "--restart-backoff",
            "100ms",
        ],
    );
    s.push_sample("http_echo", Target::P2, "team/api:v1");
    let def = |version: &str, health: &str| {
        json!({"family": "api", "artifact": "team/api:v1", "kind": "http",
               "env": {"VERSION": version}, "http": {"health_check": health}})
    };
    register(&s, def("v1", "/healthz"));
    create_service(
        &s,
        json!({"name": "api", "task_definition": "api:1", "desired_count": 2, "routes": ["/"]}),
    );
    converged(&s, "api", 2);
    let load = Load::start(&s, "/", 4);
    std::thread::sleep(Duration::from_millis(500));

    // v1 → v2: traffic moves only to v2 tasks that passed their health
    // check; v1 tasks drain.
    register(&s, def("v2", "/healthz"));
    let r = s.api(
        "PATCH",
        "/v1/services/api",
        Some(json!({"task_definition": "api:2"})),
    );
    assert_eq!(r.status, 200, "{r:?}");
    let svc = converged(&s, "api", 2);
    assert_eq!(svc["task_definition"], "api:2");
    std::thread::sleep(Duration::from_millis(500));

    // v3 never passes its health check: the circuit breaker rolls back to v2
    // while v2 keeps serving.
    register(&s, def("v3", "/fail-health"));
    let r = s.api(
        "PATCH",
        "/v1/services/api",
        Some(json!({"task_definition": "api:3"})),
    );
    assert_eq!(r.status, 200, "{r:?}");
    eventually(Duration::from_secs(60), "the rollback", || {
        let svc = service(&s, "api");
        (svc["task_definition"] == "api:2"
            && svc["deployments"]
                .as_array()
                .unwrap()
                .iter()
                .all(|d| d["task_definition"] == "api:2" || d["rollout_state"] == "FAILED"))
        .then_some(())
    });
    std::thread::sleep(Duration::from_millis(500));
    let (ok, bad, versions) = load.finish();
    assert!(
        bad.is_empty(),
        "failed requests during the rollouts: {bad:?}"
    );
    assert!(ok > 50, "only {ok} requests in the whole test");
    assert_eq!(
        versions.first().map(String::as_str),
        Some("v1"),
        "{versions:?}"
    );
    assert_eq!(
        versions.last().map(String::as_str),
        Some("v2"),
        "{versions:?}"
    );
    assert!(!versions.iter().any(|v| v == "v3"), "{versions:?}");
    let events = events(&s, "api");
    assert!(
        events.iter().any(|e| e.contains("rolling back to api:2")),
        "{events:#?}"
    );
    assert!(
        events.iter().any(|e| e.contains("health check")),
        "{events:#?}"
    );
}

#[test]
fn outbound_http_is_closed_unless_the_definition_allows_the_destination() {
    let dir = tempfile::tempdir().unwrap();
    // The operator lets components reach loopback (this test's only
    // network); other internal addresses stay closed whatever a
    // definition says.
    let s = Server::start_with(
        &dir.path().join("data"),
        &["--allow-outbound-network", "127.0.0.1"],
    );
    s.push_sample("http_fetch", Target::P2, "team/fetch:v1");
    register(
        &s,
        json!({"family": "closed", "artifact": "team/fetch:v1", "kind": "http"}),
    );
    register(
        &s,
        json!({"family": "open", "artifact": "team/fetch:v1", "kind": "http",
               "http": {"allowed_outbound_hosts": ["http://127.0.0.1:*"]}}),
    );
    create_service(
        &s,
        json!({"name": "closed", "task_definition": "closed", "desired_count": 1, "routes": ["/closed"]}),
    );
    create_service(
        &s,
        json!({"name": "open", "task_definition": "open", "desired_count": 1, "routes": ["/open"]}),
    );
    converged(&s, "closed", 1);
    converged(&s, "open", 1);
    let target = format!("{}/healthz", s.base);
    let r = get(&s, &format!("/open?url={target}"));
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.body, b"fetched 200: ok\n");
    let r = get(&s, &format!("/closed?url={target}"));
    assert_eq!(r.status, 502, "{r:?}");
    assert!(
        String::from_utf8_lossy(&r.body).contains("HttpRequestDenied"),
        "{r:?}"
    );
    // Allowed is per scheme, host and port: localhost is not 127.0.0.1.
    let port = s.base.rsplit(':').next().unwrap();
    let r = get(&s, &format!("/open?url=http://localhost:{port}/healthz"));
    assert_eq!(r.status, 502, "{r:?}");
    // A hostile definition allowing the cloud metadata address gets
    // nothing: it is internal and the operator did not allow its network.
    register(
        &s,
        json!({"family": "meta", "artifact": "team/fetch:v1", "kind": "http",
               "http": {"allowed_outbound_hosts": ["http://169.254.169.254"]}}),
    );
    create_service(
        &s,
        json!({"name": "meta", "task_definition": "meta", "desired_count": 1, "routes": ["/meta"]}),
    );
    converged(&s, "meta", 1);
    let started = Instant::now();
    let r = get(&s, "/meta?url=http://169.254.169.254/latest/meta-data/");
    assert_eq!(r.status, 502, "{r:?}");
    assert!(
        String::from_utf8_lossy(&r.body).contains("HttpRequestDenied"),
        "{r:?}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "a connection was tried"
    );
    let meta = &tasks_of(&s, "meta")[0];
    let logs = log_text(&s, meta);
    assert!(logs.contains("internal address 169.254.169.254"), "{logs}");
    let m = metrics(&s);
    assert!(
        m.contains("wharf_http_outbound_denied_total{service=\"closed\"} 1"),
        "{m}"
    );
    assert!(
        m.contains("wharf_http_outbound_denied_total{service=\"meta\"} 1"),
        "{m}"
    );
    let task = &tasks_of(&s, "closed")[0];
    assert_eq!(task["http"]["outbound_denied"], 1, "{task}");
    let logs = log_text(&s, task);
    assert!(
        logs.contains("denied: not an allowed outbound host"),
        "{logs}"
    );
}

#[test]
fn after_a_kill_9_under_load_the_service_serves_again() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let s = Server::start_in(&data);
    http_def(&s, "http_hello", "web", json!({}));
    create_service(
        &s,
        json!({"name": "web", "task_definition": "web", "desired_count": 2, "routes": ["/"]}),
    );
    converged(&s, "web", 2);
    let load = Load::start(&s, "/", 2);
    std::thread::sleep(Duration::from_millis(300));
    s.kill9();
    let (ok, _, _) = load.finish();
    assert!(ok > 0);
    let s = Server::start_in(&data);
    converged(&s, "web", 2);
    let r = get(&s, "/again");
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.body, b"hello from wharf: GET /again\n");
}

#[test]
fn autoscaling_goes_from_zero_to_n_under_load_and_back_to_zero_when_idle() {
    let s = Server::start();
    http_def(&s, "http_slow", "slow", json!({}));
    s.cli(&[
        "service",
        "create",
        "auto",
        "--taskdef",
        "slow",
        "--desired",
        "0",
        "--route",
        "/",
    ]);
    let shown = s.cli(&[
        "service",
        "autoscale",
        "auto",
        "--min",
        "0",
        "--max",
        "4",
        "--target-inflight",
        "2",
        "--scale-in-cooldown",
        "1s",
        "--idle-to-zero",
        "3s",
    ]);
    assert!(
        shown.contains("0 to 4 tasks at 2 in flight per task"),
        "{shown}"
    );
    assert_eq!(service(&s, "auto")["desired_count"], 0);

    // The first request to a service at zero is held while it starts a task.
    let started = Instant::now();
    let r = get(&s, "/50");
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.body, b"waited 50 ms\n");
    let cold = started.elapsed();
    assert!(cold < Duration::from_secs(10), "{cold:?}");
    assert_eq!(service(&s, "auto")["desired_count"], 1);

    // Eight clients each keeping a 400 ms request in flight: about eight in
    // flight, target two per task, so four tasks.
    let stop = Arc::new(AtomicBool::new(false));
    let failures = Arc::new(AtomicU64::new(0));
    let clients: Vec<_> = (0..8)
        .map(|_| {
            let (stop, failures) = (stop.clone(), failures.clone());
            let url = format!("{}/400", s.ingress.as_deref().unwrap());
            std::thread::spawn(move || {
                let agent = agent();
                while !stop.load(Ordering::Relaxed) {
                    if agent.get(&url).call().is_err() {
                        failures.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        })
        .collect();
    eventually(Duration::from_secs(30), "a scale-out to 4", || {
        let svc = service(&s, "auto");
        (svc["desired_count"] == 4 && svc["running_count"] == 4).then_some(())
    });
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.join().unwrap();
    }
    assert_eq!(
        failures.load(Ordering::Relaxed),
        0,
        "requests failed under load"
    );
    // Idle: in after the cooldown, then to zero after the idle period.
    eventually(Duration::from_secs(30), "a scale-in to zero", || {
        let svc = service(&s, "auto");
        (svc["desired_count"] == 0 && svc["running_count"] == 0).then_some(())
    });
    let events = events(&s, "auto");
    for wanted in [
        "scaled from zero",
        "autoscaled from 1 to",
        "average in-flight",
        "autoscaled from 1 to 0: no request for",
    ] {
        assert!(
            events.iter().any(|e| e.contains(wanted)),
            "{wanted}: {events:#?}"
        );
    }
    let m = metrics(&s);
    assert!(
        m.contains("wharf_service_inflight_per_task{service=\"auto\"}"),
        "{m}"
    );
    // And from zero again.
    assert_eq!(get(&s, "/1").status, 200);
}

#[test]
fn a_release_that_answers_mostly_5xx_is_rolled_back_by_the_circuit_breaker() {
    let s = Server::start();
    s.push_sample("http_echo", Target::P2, "team/api:good");
    s.push_sample("http_trap", Target::P2, "team/api:bad");
    let def = |tag: &str| {
        json!({"family": "api", "artifact": format!("team/api:{tag}"), "kind": "http",
               "http": {"health_check": "/healthz"}})
    };
    register(&s, def("good"));
    create_service(
        &s,
        json!({"name": "api", "task_definition": "api:1", "desired_count": 2, "routes": ["/"]}),
    );
    converged(&s, "api", 2);
    let load = Load::start(&s, "/work", 2);
    // The bad release passes its health check, then traps on every request.
    register(&s, def("bad"));
    let r = s.api(
        "PATCH",
        "/v1/services/api",
        Some(json!({"task_definition": "api:2"})),
    );
    assert_eq!(r.status, 200);
    eventually(Duration::from_secs(60), "the rollback to api:1", || {
        let svc = service(&s, "api");
        (svc["task_definition"] == "api:1").then_some(())
    });
    let svc = converged(&s, "api", 2);
    assert_eq!(svc["task_definition"], "api:1");
    // Served by the good release again.
    let r = get(&s, "/after");
    assert_eq!(r.status, 200, "{r:?}");
    let (ok, _, _) = load.finish();
    assert!(ok > 0);
    let events = events(&s, "api");
    assert!(
        events
            .iter()
            .any(|e| e.contains("requests answered 5xx") && e.contains("rolling back to api:1")),
        "{events:#?}"
    );
}

#[test]
fn a_scoped_token_cannot_see_take_or_change_another_teams_http_service() {
    let s = Server::start();
    http_def(&s, "http_hello", "web", json!({}));
    create_service(
        &s,
        json!({"name": "theirs", "task_definition": "web", "desired_count": 0, "routes": ["/shop"]}),
    );
    // A deployer of other/* only, with an HTTP component of its own.
    let token = s
        .api(
            "POST",
            "/v1/tokens",
            Some(json!({"name": "other", "role": "deployer", "repositories": ["other/*"]})),
        )
        .json()["secret"]
        .as_str()
        .unwrap()
        .to_owned();
    s.push_sample("http_echo", Target::P2, "other/echo:v1");
    let r = s.api_as(
        &token,
        "POST",
        "/v1/taskdefs",
        Some(json!({"family": "mine", "artifact": "other/echo:v1", "kind": "http"})),
    );
    assert_eq!(r.status, 201, "{r:?}");
    // It cannot take the route, nor learn whose it is.
    let r = s.api_as(
        &token,
        "POST",
        "/v1/services",
        Some(json!({"name": "mine", "task_definition": "mine", "desired_count": 0, "routes": ["/shop"]})),
    );
    assert_eq!(r.status, 409, "{r:?}");
    assert!(
        !String::from_utf8_lossy(&r.body).contains("theirs"),
        "{r:?}"
    );
    // It cannot see or change the other service (404, as if absent).
    for (method, body) in [
        ("GET", None),
        ("PATCH", Some(json!({"routes": ["/x"]}))),
        (
            "PATCH",
            Some(json!({"autoscaling": {"min": 0, "max": 1, "target_inflight": 1.0}})),
        ),
    ] {
        let r = s.api_as(&token, method, "/v1/services/theirs", body);
        assert_eq!(r.status, 404, "{method}: {r:?}");
    }
    // Nor run the other team's HTTP definition in a service of its own.
    let r = s.api_as(
        &token,
        "POST",
        "/v1/services",
        Some(json!({"name": "copy", "task_definition": "web", "desired_count": 1, "routes": ["/copy"]})),
    );
    assert_eq!(r.status, 404, "{r:?}");
    assert_eq!(service(&s, "theirs")["routes"], json!(["/shop"]));
}
