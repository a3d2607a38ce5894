//! Edge nodes through real processes: a `wharf server` and `wharf node
//! join` agents on loopback, each with its own data directory and labels.
//! Joining (and the tokens that are refused), placement on nodes, output
//! and outcomes reaching the server, a node's credential refused
//! everywhere but the node protocol, `kill -9` of a node with its service
//! tasks started elsewhere, a node's restart with its credential and
//! caches, and `wharf node rm`.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::json;
use wharf_testkit::Target;

use crate::server::{Server, converged, eventually, register, service};

/// A running `wharf node join`; killed when dropped.
pub(crate) struct Agent {
    child: Child,
    pub(crate) data: PathBuf,
    /// Its ingress (`http://IP:PORT`), if it has one.
    pub(crate) ingress: Option<String>,
}

impl Agent {
    /// Starts an agent; `token` is `None` for a node that joined before.
    pub(crate) fn start(
        s: &Server,
        data: &Path,
        token: Option<&str>,
        extra: &[&str],
    ) -> std::result::Result<Agent, String> {
        Agent::start_in(&[], &s.base, data, token, extra)
    }

    /// Starts an agent under `prefix` (such as `ip netns exec NS`) that
    /// joins `server`.
    pub(crate) fn start_in(
        prefix: &[&str],
        server: &str,
        data: &Path,
        token: Option<&str>,
        extra: &[&str],
    ) -> std::result::Result<Agent, String> {
        let mut cmd = match prefix {
            [] => Command::new(env!("CARGO_BIN_EXE_wharf")),
            [first, rest @ ..] => {
                let mut c = Command::new(first);
                c.args(rest).arg(env!("CARGO_BIN_EXE_wharf"));
                c
            }
        };
        cmd.args(["node", "join", "--server", server, "--data-dir"])
            .arg(data)
            .args(extra)
            .env_remove("WHARF_TOKEN")
            .env_remove("WHARF_DATA_DIR")
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        if let Some(t) = token {
            cmd.args(["--token", t]);
        }
        let mut child = cmd.spawn().expect("spawn wharf node join");
        let stderr = child.stderr.take().unwrap();
        let mut lines = BufReader::new(stderr).lines();
        let mut said = String::new();
        let mut ingress = None;
        loop {
            match lines.next() {
                Some(Ok(line)) => {
                    said.push_str(&line);
                    said.push('\n');
                    if let Some(rest) = line.strip_prefix("wharf: ingress on ") {
                        ingress = rest.split_whitespace().next().map(str::to_owned);
                    }
                    if line.starts_with("wharf: node ") && line.contains(" attached to ") {
                        break;
                    }
                }
                _ => {
                    let _ = child.wait();
                    return Err(said);
                }
            }
        }
        std::thread::spawn(move || for _ in lines {});
        Ok(Agent {
            child,
            data: data.to_owned(),
            ingress,
        })
    }

    /// The node's credential, from its data directory.
    pub(crate) fn credential(&self) -> String {
        let m: serde_json::Value =
            serde_json::from_slice(&std::fs::read(self.data.join("node.json")).unwrap()).unwrap();
        m["credential"].as_str().unwrap().to_owned()
    }

    /// The agent's exit code once it exits (within `limit`).
    pub(crate) fn exit_code(&mut self, limit: Duration) -> Option<i32> {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.code();
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }

    pub(crate) fn kill9(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn wharf(s: &Server, args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_wharf"))
        .args(args)
        .env("WHARF_SERVER", &s.base)
        .env("WHARF_TOKEN", &s.token)
        .output()
        .unwrap()
}

/// Makes a join token with the CLI.
pub(crate) fn join_token(s: &Server, args: &[&str]) -> String {
    let mut all = vec!["node", "token", "create"];
    all.extend_from_slice(args);
    let out = wharf(s, &all);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

fn node(s: &Server, name: &str) -> serde_json::Value {
    let r = s.api("GET", &format!("/v1/nodes/{name}"), None);
    assert_eq!(r.status, 200, "{r:?}");
    r.json()
}

fn tasks_of(s: &Server, service: &str) -> Vec<serde_json::Value> {
    let r = s.api(
        "GET",
        &format!("/v1/tasks?service={service}&status=RUNNING"),
        None,
    );
    assert_eq!(r.status, 200);
    r.json().as_array().unwrap().clone()
}

fn nodes_of(tasks: &[serde_json::Value]) -> Vec<String> {
    let mut nodes: Vec<String> = tasks
        .iter()
        .map(|t| t["node"].as_str().unwrap().to_owned())
        .collect();
    nodes.sort();
    nodes
}

#[test]
fn nodes_join_with_a_token_run_placed_tasks_and_report_output_and_outcomes() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start_with(
        &dir.path().join("server"),
        &["--node-labels", "role=server"],
    );
    // Bad, expired and malformed tokens are refused, and nothing joins.
    let token = join_token(&s, &["--labels", "role=edge", "--ttl", "1h"]);
    assert!(token.starts_with("WJ1.none."), "{token}");
    let forged = format!("{}x", token);
    let err = Agent::start(
        &s,
        &dir.path().join("bad"),
        Some(&forged),
        &["--name", "bad"],
    )
    .err()
    .expect("a forged token is refused");
    assert!(err.contains("join token is not valid"), "{err}");
    let short = join_token(&s, &["--ttl", "1s"]);
    std::thread::sleep(Duration::from_millis(1100));
    let err = Agent::start(
        &s,
        &dir.path().join("late"),
        Some(&short),
        &["--name", "late"],
    )
    .err()
    .expect("an expired token is refused");
    assert!(err.contains("expired"), "{err}");
    // A revoked token joins nothing.
    let revoked = join_token(&s, &[]);
    let listed = wharf(&s, &["node", "token", "ls", "--output", "json"]);
    let ids: serde_json::Value = serde_json::from_slice(&listed.stdout).unwrap();
    let newest = ids
        .as_array()
        .unwrap()
        .iter()
        .max_by_key(|t| t["created_at"].as_str().unwrap().to_owned())
        .unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let out = wharf(&s, &["node", "token", "rm", &newest]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let err = Agent::start(
        &s,
        &dir.path().join("rev"),
        Some(&revoked),
        &["--name", "rev"],
    )
    .err()
    .expect("a revoked token is refused");
    assert!(err.contains("join token is not valid"), "{err}");
    let err = Agent::start(
        &s,
        &dir.path().join("junk"),
        Some("hello"),
        &["--name", "junk"],
    )
    .err()
    .expect("not a join token");
    assert!(err.contains("not a join token"), "{err}");
    assert_eq!(
        s.api("GET", "/v1/nodes", None)
            .json()
            .as_array()
            .unwrap()
            .len(),
        1
    );

    let a = Agent::start(
        &s,
        &dir.path().join("a"),
        Some(&token),
        &[
            "--name",
            "edge-a",
            "--labels",
            "zone=a,role=ignored",
            "--slots",
            "8",
        ],
    )
    .unwrap();
    let _b = Agent::start(
        &s,
        &dir.path().join("b"),
        Some(&token),
        &["--name", "edge-b", "--labels", "zone=b", "--slots", "8"],
    )
    .unwrap();
    // A name is taken once.
    let err = Agent::start(
        &s,
        &dir.path().join("a2"),
        Some(&token),
        &["--name", "edge-a"],
    )
    .err()
    .unwrap();
    assert!(err.contains("has joined already"), "{err}");
    let edge_a = eventually(Duration::from_secs(10), "edge-a reports", || {
        let n = node(&s, "edge-a");
        (n["capacity"]["slots"] == 8).then_some(n)
    });
    assert_eq!(edge_a["status"], "READY");
    assert_eq!(edge_a["local"], false);
    // The token's labels win over the node's own.
    assert_eq!(edge_a["labels"], json!({"zone": "a", "role": "edge"}));
    assert_eq!(edge_a["engine_version"], "wasmtime 48.0.8");
    assert!(
        edge_a["wasi_interfaces"]
            .as_array()
            .unwrap()
            .contains(&json!("wasi:cli"))
    );
    // The credential is the node's alone.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(a.data.join("node.json"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }
    let listed = wharf(&s, &["node", "ls"]);
    let text = String::from_utf8_lossy(&listed.stdout);
    assert!(text.contains("edge-a") && text.contains("edge-b"), "{text}");

    // A task placed on the edge runs there; its output and outcome reach
    // the server.
    s.push_sample("hello", Target::P1, "team/hello:v1");
    register(
        &s,
        json!({"family": "hello", "artifact": "team/hello:v1",
               "placement": {"constraints": ["role == edge", "zone == b"]}}),
    );
    let r = s.api(
        "POST",
        "/v1/tasks",
        Some(json!({"task_definition": "hello"})),
    );
    assert_eq!(r.status, 201, "{r:?}");
    let id = r.json()[0]["id"].as_str().unwrap().to_owned();
    let t = s.wait_stopped(&id);
    assert_eq!(t["stop_code"], "Completed", "{t}");
    assert_eq!(t["node"], "edge-b");
    assert_eq!(t["exit_code"], 0);
    let logs = s.api("GET", &format!("/v1/tasks/{id}/logs"), None).json();
    assert_eq!(logs["lines"][0]["text"], "Hello, world!", "{logs}");
    // Pulled by digest, verified, kept, and compiled once into the cache.
    let blobs: Vec<_> = std::fs::read_dir(dir.path().join("b/cache/blobs"))
        .unwrap()
        .collect();
    assert_eq!(blobs.len(), 1);
    assert!(
        std::fs::read_dir(dir.path().join("b/cache/compiled"))
            .unwrap()
            .next()
            .is_some()
    );
    // A label no node has is named in the refusal.
    register(
        &s,
        json!({"family": "nowhere", "artifact": "team/hello:v1",
               "placement": {"constraints": ["zone == c"]}}),
    );
    let r = s.api(
        "POST",
        "/v1/tasks",
        Some(json!({"task_definition": "nowhere"})),
    );
    let id = r.json()[0]["id"].as_str().unwrap().to_owned();
    let t = s.wait_stopped(&id);
    assert_eq!(t["stop_code"], "FailedToStart");
    let message = t["message"].as_str().unwrap();
    assert!(
        message.contains("zone == c") && message.contains("edge-a has labels"),
        "{message}"
    );

    // `wharf task logs --follow` of a task on a node streams its output.
    s.push_sample("heartbeat", Target::P1, "team/beat:v1");
    register(
        &s,
        json!({"family": "beat", "artifact": "team/beat:v1", "args": ["50", "30"],
               "placement": {"constraints": ["zone == a"]}}),
    );
    let r = s.api(
        "POST",
        "/v1/tasks",
        Some(json!({"task_definition": "beat"})),
    );
    let id = r.json()[0]["id"].as_str().unwrap().to_owned();
    eventually(Duration::from_secs(10), "beat runs on edge-a", || {
        (node(&s, "edge-a")["running_tasks"] == 1).then_some(())
    });
    assert_eq!(
        node(&s, "local")["running_tasks"],
        0,
        "counted where it runs"
    );
    let out = wharf(&s, &["task", "logs", "--follow", &id]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let beats: Vec<&str> = text.lines().filter(|l| l.contains("heartbeat")).collect();
    assert_eq!(beats.len(), 30, "{text}");
    assert!(beats[0].ends_with("heartbeat 0") && beats[29].ends_with("heartbeat 29"));
    assert_eq!(s.wait_stopped(&id)["node"], "edge-a");
}

#[test]
fn a_nodes_credential_reaches_only_the_node_protocol_and_its_own_artifacts() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start_with(&dir.path().join("server"), &[]);
    let token = join_token(&s, &[]);
    let mut a = Agent::start(
        &s,
        &dir.path().join("a"),
        Some(&token),
        &["--name", "edge-a"],
    )
    .unwrap();
    let cred = a.credential();
    s.push_sample("hello", Target::P1, "team/hello:v1");
    s.push_sample("hello", Target::P1, "other/hello:v1");
    let digest =
        register(&s, json!({"family": "hello", "artifact": "team/hello:v1"}))["wasm_digest"]
            .as_str()
            .unwrap()
            .to_owned();
    // Every /v1/ route but the node protocol is 403 for a node.
    for (method, path, body) in [
        ("GET", "/v1/tasks", None),
        ("GET", "/v1/taskdefs", None),
        ("GET", "/v1/nodes", None),
        ("GET", "/v1/secrets", None),
        ("GET", "/v1/tokens", None),
        ("GET", "/v1/audit", None),
        ("GET", "/v1/openapi.json", None),
        ("GET", "/v1/join-tokens", None),
        (
            "POST",
            "/v1/tasks",
            Some(json!({"task_definition": "hello"})),
        ),
        (
            "POST",
            "/v1/taskdefs",
            Some(json!({"family": "x", "artifact": "team/hello:v1"})),
        ),
        ("POST", "/v1/join-tokens", Some(json!({}))),
        ("POST", "/v1/nodes/edge-a/drain", Some(json!({}))),
        ("DELETE", "/v1/nodes/edge-a", None),
        (
            "POST",
            "/v1/tokens",
            Some(json!({"name": "x", "role": "admin"})),
        ),
    ] {
        let r = s.api_as(&cred, method, path, body);
        assert_eq!(r.status, 403, "{method} {path}: {r:?}");
        assert_eq!(r.json()["code"], "AccessDenied", "{method} {path}");
    }
    // ...and in the registry it pulls only what its tasks run.
    for path in [
        "/v2/_catalog".to_owned(),
        format!("/v2/team/hello/blobs/{digest}"),
        format!("/v2/other/hello/blobs/{digest}"),
        "/v2/team/hello/tags/list".to_owned(),
    ] {
        let r = s.api_as(&cred, "GET", &path, None);
        assert_eq!(r.status, 403, "{path}: {r:?}");
    }
    let r = s.api_as(&cred, "PUT", "/v2/team/hello/manifests/v2", Some(json!({})));
    assert_eq!(r.status, 403);
    // A token is not a node.
    let r = s.api(
        "POST",
        "/v1/agent/sync",
        Some(
            json!({"info": {"slots": 1, "memory_bytes": null, "free_slots": 1,
            "free_memory_bytes": null, "version": "x", "engine_version": "x",
            "compatibility_hash": "x", "arch": "x", "os": "x", "wasi_interfaces": []}}),
        ),
    );
    assert_eq!(r.status, 403, "{r:?}");
    // The node protocol itself answers the node.
    let r = s.api_as(
        &cred,
        "POST",
        "/v1/agent/sync",
        Some(
            json!({"info": {"slots": 1, "memory_bytes": null, "free_slots": 1,
            "free_memory_bytes": null, "version": "x", "engine_version": "x",
            "compatibility_hash": "x", "arch": "x", "os": "x", "wasi_interfaces": []}}),
        ),
    );
    assert_eq!(r.status, 200, "{r:?}");
    // Only admins manage nodes and join tokens.
    let deployer = s.api(
        "POST",
        "/v1/tokens",
        Some(json!({"name": "d", "role": "deployer"})),
    );
    let deployer = deployer.json()["secret"].as_str().unwrap().to_owned();
    assert_eq!(
        s.api_as(&deployer, "POST", "/v1/join-tokens", Some(json!({})))
            .status,
        403
    );
    assert_eq!(
        s.api_as(&deployer, "DELETE", "/v1/nodes/edge-a", None)
            .status,
        403
    );
    // A removed node is refused at once.
    let out = wharf(&s, &["node", "rm", "edge-a"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r = s.api_as(&cred, "POST", "/v1/agent/sync", Some(json!({"info": {}})));
    assert_eq!(r.status, 401, "{r:?}");
    assert_eq!(s.api("GET", "/v1/nodes/edge-a", None).status, 404);
    // The agent learns it at its next sync, stops its tasks and exits 3
    // (which its systemd unit does not restart).
    assert_eq!(a.exit_code(Duration::from_secs(10)), Some(3));
}

#[test]
fn a_killed_node_is_lost_its_service_tasks_run_elsewhere_and_it_reattaches() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start_with(
        &dir.path().join("server"),
        &["--no-local-node", "--node-timeout", "3s"],
    );
    // A pure control plane lists no node of its own, and runs nothing.
    assert_eq!(s.api("GET", "/v1/nodes", None).json(), json!([]));
    s.push_sample("heartbeat", Target::P1, "team/beat:v1");
    register(
        &s,
        json!({"family": "beat", "artifact": "team/beat:v1", "args": ["200"]}),
    );
    let token = join_token(&s, &[]);
    let a = Agent::start(
        &s,
        &dir.path().join("a"),
        Some(&token),
        &["--name", "edge-a"],
    )
    .unwrap();
    let _b = Agent::start(
        &s,
        &dir.path().join("b"),
        Some(&token),
        &["--name", "edge-b"],
    )
    .unwrap();
    wait_for_nodes(&s, 2);
    let r = s.api(
        "POST",
        "/v1/services",
        Some(json!({"name": "beat", "task_definition": "beat", "desired_count": 4})),
    );
    assert_eq!(r.status, 201, "{r:?}");
    converged(&s, "beat", 4);
    // Spread: two tasks per node.
    assert_eq!(
        nodes_of(&tasks_of(&s, "beat")),
        ["edge-a", "edge-a", "edge-b", "edge-b"]
    );
    let on_a: Vec<String> = tasks_of(&s, "beat")
        .iter()
        .filter(|t| t["node"] == "edge-a")
        .map(|t| t["id"].as_str().unwrap().to_owned())
        .collect();
    let killed = Instant::now();
    a.kill9();
    // Lost after the timeout; its tasks stop NodeLost and run on edge-b.
    for id in &on_a {
        let t = s.wait_stopped(id);
        assert_eq!(t["stop_code"], "NodeLost", "{t}");
        assert!(
            t["message"].as_str().unwrap().contains("no heartbeat"),
            "{t}"
        );
    }
    eventually(Duration::from_secs(20), "the tasks run on edge-b", || {
        let nodes = nodes_of(&tasks_of(&s, "beat"));
        (nodes == ["edge-b", "edge-b", "edge-b", "edge-b"]).then_some(())
    });
    let elapsed = killed.elapsed();
    eprintln!("kill -9 of a node to its service tasks running elsewhere: {elapsed:?}");
    assert!(elapsed < Duration::from_secs(3 + 8), "{elapsed:?}");
    assert_eq!(node(&s, "edge-a")["status"], "LOST");
    assert_eq!(service(&s, "beat")["running_count"], 4);
    // A lost node is not the tasks' failure: no backoff.
    let events = crate::server::events(&s, "beat").join("\n");
    assert!(events.contains("stopped: NodeLost"), "{events}");
    assert!(!events.contains("consecutive failures"), "{events}");
    // Restarted, it reattaches with its credential (no token) and caches.
    let _a = Agent::start(&s, &dir.path().join("a"), None, &[]).unwrap();
    eventually(Duration::from_secs(10), "edge-a is back", || {
        (node(&s, "edge-a")["status"] == "READY").then_some(())
    });
}

/// Waits until `n` nodes have reported (their capacity is known).
fn wait_for_nodes(s: &Server, n: usize) {
    eventually(
        Duration::from_secs(10),
        &format!("{n} nodes report"),
        || {
            let listed = s.api("GET", "/v1/nodes", None).json();
            let reported = listed
                .as_array()
                .unwrap()
                .iter()
                .filter(|n| n["capacity"]["slots"].as_u64() > Some(0))
                .count();
            (reported == n).then_some(())
        },
    );
}

/// A server on every address (a node in a network namespace reaches it
/// through its veth pair) with `heartbeat` pushed as `team/beat:v1`
/// through 127.0.0.1 (`wharf push` speaks plain HTTP to loopback only).
fn start_for_netns(data: &Path, extra: &[&str]) -> (Server, u16) {
    let port = free_port();
    let listen = format!("0.0.0.0:{port}");
    let mut flags = vec![
        "--listen",
        listen.as_str(),
        "--insecure",
        "--no-local-node",
        "--heartbeat",
        "500ms",
    ];
    flags.extend_from_slice(extra);
    let s = Server::start_with(data, &flags);
    let pushed = Command::new(env!("CARGO_BIN_EXE_wharf"))
        .arg("push")
        .arg(wharf_testkit::wasm("heartbeat", Target::P1))
        .arg(format!("127.0.0.1:{port}/team/beat:v1"))
        .env("WHARF_TOKEN", &s.token)
        .env("WHARF_SERVER", format!("http://127.0.0.1:{port}"))
        .output()
        .unwrap();
    assert!(
        pushed.status.success(),
        "{}",
        String::from_utf8_lossy(&pushed.stderr)
    );
    (s, port)
}

/// A loopback port free now (for a server that must come back on it).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn signal(agent: &Agent, sig: &str) {
    let pid = agent.child.id().to_string();
    assert!(
        Command::new("kill")
            .args([sig, &pid])
            .status()
            .unwrap()
            .success()
    );
}

#[test]
fn a_drained_node_hands_its_tasks_over_and_a_cut_off_node_is_reconciled_when_it_returns() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start_with(
        &dir.path().join("server"),
        &[
            "--no-local-node",
            "--node-timeout",
            "3s",
            "--heartbeat",
            "500ms",
        ],
    );
    s.push_sample("heartbeat", Target::P1, "team/beat:v1");
    register(
        &s,
        json!({"family": "beat", "artifact": "team/beat:v1", "args": ["200"]}),
    );
    let token = join_token(&s, &[]);
    let _a = Agent::start(
        &s,
        &dir.path().join("a"),
        Some(&token),
        &["--name", "edge-a"],
    )
    .unwrap();
    let b = Agent::start(
        &s,
        &dir.path().join("b"),
        Some(&token),
        &["--name", "edge-b"],
    )
    .unwrap();
    wait_for_nodes(&s, 2);
    let r = s.api(
        "POST",
        "/v1/services",
        Some(json!({"name": "beat", "task_definition": "beat", "desired_count": 2})),
    );
    assert_eq!(r.status, 201, "{r:?}");
    converged(&s, "beat", 2);
    assert_eq!(nodes_of(&tasks_of(&s, "beat")), ["edge-a", "edge-b"]);

    // Draining edge-a moves its task to edge-b, started before the old one
    // stops (minimum healthy 100 %).
    let on_a = tasks_of(&s, "beat")
        .iter()
        .find(|t| t["node"] == "edge-a")
        .map(|t| t["id"].as_str().unwrap().to_owned())
        .unwrap();
    let out = wharf(&s, &["node", "drain", "edge-a"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    eventually(Duration::from_secs(20), "the task moved off edge-a", || {
        let svc = service(&s, "beat");
        assert!(svc["running_count"].as_u64().unwrap() >= 2, "{svc}");
        (nodes_of(&tasks_of(&s, "beat")) == ["edge-b", "edge-b"]).then_some(())
    });
    let t = s.wait_stopped(&on_a);
    assert_eq!(t["stop_code"], "ScaledDown", "{t}");
    assert!(
        t["message"]
            .as_str()
            .unwrap()
            .contains("edge-a is draining"),
        "{t}"
    );
    let events = crate::server::events(&s, "beat").join("\n");
    assert!(
        events.contains(&format!("moved task {on_a} off draining node edge-a")),
        "{events}"
    );
    assert!(
        events.contains("on node edge-b"),
        "placements are events: {events}"
    );
    let out = wharf(&s, &["node", "activate", "edge-a"]);
    assert!(out.status.success());

    // edge-b is cut off (frozen): lost after the timeout, its tasks run on
    // edge-a; when it comes back, the tasks it still runs are stopped.
    let old: Vec<String> = tasks_of(&s, "beat")
        .iter()
        .map(|t| t["id"].as_str().unwrap().to_owned())
        .collect();
    signal(&b, "-STOP");
    eventually(Duration::from_secs(20), "the tasks run on edge-a", || {
        (nodes_of(&tasks_of(&s, "beat")) == ["edge-a", "edge-a"]).then_some(())
    });
    assert_eq!(node(&s, "edge-b")["status"], "LOST");
    for id in &old {
        assert_eq!(s.wait_stopped(id)["stop_code"], "NodeLost");
    }
    signal(&b, "-CONT");
    eventually(
        Duration::from_secs(20),
        "edge-b back, running nothing",
        || {
            let n = node(&s, "edge-b");
            (n["status"] == "READY" && n["free"]["slots"] == n["capacity"]["slots"]).then_some(())
        },
    );
    let svc = converged(&s, "beat", 2);
    assert_eq!(svc["running_count"], 2);
    assert_eq!(nodes_of(&tasks_of(&s, "beat")), ["edge-a", "edge-a"]);
}

#[test]
fn nodes_run_on_while_the_server_is_stopped_and_it_takes_their_tasks_back() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("server");
    let listen = format!("127.0.0.1:{}", free_port());
    let flags = [
        "--listen",
        listen.as_str(),
        "--no-local-node",
        "--node-timeout",
        "5s",
    ];
    let s = Server::start_with(&data, &flags);
    s.push_sample("heartbeat", Target::P1, "team/beat:v1");
    register(
        &s,
        json!({"family": "beat", "artifact": "team/beat:v1", "args": ["200"]}),
    );
    register(
        &s,
        json!({"family": "short", "artifact": "team/beat:v1", "args": ["100", "80"]}),
    );
    let token = join_token(&s, &[]);
    let _a = Agent::start(
        &s,
        &dir.path().join("a"),
        Some(&token),
        &["--name", "edge-a"],
    )
    .unwrap();
    let _b = Agent::start(
        &s,
        &dir.path().join("b"),
        Some(&token),
        &["--name", "edge-b"],
    )
    .unwrap();
    wait_for_nodes(&s, 2);
    let r = s.api(
        "POST",
        "/v1/services",
        Some(json!({"name": "beat", "task_definition": "beat", "desired_count": 2})),
    );
    assert_eq!(r.status, 201, "{r:?}");
    converged(&s, "beat", 2);
    let mut before: Vec<String> = tasks_of(&s, "beat")
        .iter()
        .map(|t| t["id"].as_str().unwrap().to_owned())
        .collect();
    before.sort();
    // A task that ends (8 s) while the server is away.
    let r = s.api(
        "POST",
        "/v1/tasks",
        Some(json!({"task_definition": "short"})),
    );
    let short = r.json()[0]["id"].as_str().unwrap().to_owned();
    eventually(Duration::from_secs(10), "the short task runs", || {
        let t = s.api("GET", &format!("/v1/tasks/{short}"), None).json();
        (t["status"] == "RUNNING").then_some(())
    });

    // The server stops for 30 s; the nodes keep their tasks.
    let status = s.terminate();
    assert!(status.success());
    std::thread::sleep(Duration::from_secs(30));
    let s = Server::start_with(&data, &flags);
    // Back: the same tasks, no replacement, the short task's outcome kept.
    let t = s.wait_stopped(&short);
    assert_eq!(t["stop_code"], "Completed", "{t}");
    assert_eq!(t["exit_code"], 0);
    // Its output is whole: before the stop (kept at shutdown), during
    // (held by the node), after.
    let all = beats(&s, &short);
    assert_eq!(all, (0..80).collect::<Vec<u64>>());
    assert!(t["fuel_consumed"].as_u64().unwrap() > 0, "{t}");
    let svc = converged(&s, "beat", 2);
    assert_eq!(svc["running_count"], 2);
    let mut after: Vec<String> = tasks_of(&s, "beat")
        .iter()
        .map(|t| t["id"].as_str().unwrap().to_owned())
        .collect();
    after.sort();
    assert_eq!(
        after, before,
        "the nodes' tasks were taken back, not replaced"
    );
    // They still report: output keeps coming.
    let logs = |id: &str| {
        s.api("GET", &format!("/v1/tasks/{id}/logs"), None).json()["lines"]
            .as_array()
            .unwrap()
            .len()
    };
    let n = logs(&after[0]);
    eventually(Duration::from_secs(10), "new output", || {
        (logs(&after[0]) > n).then_some(())
    });
}

#[test]
fn over_tls_nodes_pin_the_servers_ca_from_the_join_token() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("server");
    // Plain HTTP is for loopback only.
    let out = Command::new(env!("CARGO_BIN_EXE_wharf"))
        .args([
            "server",
            "--listen",
            "0.0.0.0:0",
            "--ingress",
            "off",
            "--data-dir",
        ])
        .arg(dir.path().join("open"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(said.contains("not loopback and TLS is off"), "{said}");

    // A definition registered before TLS; the server comes back with it.
    let s = Server::start_with(&data, &["--no-local-node"]);
    s.push_sample("hello", Target::P1, "team/hello:v1");
    register(&s, json!({"family": "hello", "artifact": "team/hello:v1"}));
    assert!(s.terminate().success());
    let s = Server::start_with(&data, &["--no-local-node", "--tls", "auto"]);
    assert!(s.base.starts_with("https://127.0.0.1:"), "{}", s.base);
    let ca = data.join("tls/ca.pem");
    let ca_text = std::fs::read_to_string(&ca).unwrap();
    let b64: String = ca_text
        .lines()
        .filter(|l| !l.starts_with("-----"))
        .collect();
    use base64::Engine as _;
    let der = base64::engine::general_purpose::STANDARD
        .decode(b64)
        .unwrap();
    let fingerprint = crate::server::sha256(&der);
    let cli = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_wharf"))
            .args(args)
            .env("WHARF_SERVER", &s.base)
            .env("WHARF_TOKEN", &s.token)
            .output()
            .unwrap()
    };
    // A client that does not trust the CA is refused by TLS itself.
    let out = cli(&["node", "ls"]);
    assert!(!out.status.success());
    let ca_flag = ca.to_str().unwrap();
    // The registry speaks TLS too: push and pull with the CA trusted.
    let echo = wharf_testkit::wasm("echo", Target::P1);
    let reference = format!("{}/team/echo:v1", s.base.trim_start_matches("https://"));
    let echo_flag = echo.to_str().unwrap();
    let out = cli(&["push", echo_flag, &reference]);
    assert!(!out.status.success(), "an untrusted CA is refused");
    let out = cli(&["push", echo_flag, &reference, "--ca-cert", ca_flag]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let pulled = dir.path().join("echo.wasm");
    let out = cli(&[
        "pull",
        &reference,
        "-o",
        pulled.to_str().unwrap(),
        "--ca-cert",
        ca_flag,
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        std::fs::read(&pulled).unwrap(),
        std::fs::read(&echo).unwrap()
    );
    let out = cli(&["node", "token", "create", "--ca-cert", ca_flag]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let token = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    assert_eq!(
        token.split('.').nth(1).unwrap(),
        fingerprint.trim_start_matches("sha256:"),
        "the token pins the CA"
    );
    // A token pinning another CA is refused before anything is sent.
    let parts: Vec<&str> = token.split('.').collect();
    let wrong = format!("{}.{}.{}", parts[0], "0".repeat(64), parts[2]);
    let err = Agent::start(
        &s,
        &dir.path().join("w"),
        Some(&wrong),
        &["--name", "edge-w"],
    )
    .err()
    .expect("a wrong CA fingerprint is refused");
    assert!(err.contains("does not match the join token"), "{err}");
    assert!(!dir.path().join("w/node.json").exists());
    // The right one joins over TLS, pulls and runs.
    let _a = Agent::start(
        &s,
        &dir.path().join("a"),
        Some(&token),
        &["--name", "edge-a"],
    )
    .unwrap();
    assert_eq!(
        std::fs::read_to_string(dir.path().join("a/ca.pem")).unwrap(),
        ca_text
    );
    let out = cli(&[
        "task",
        "run",
        "hello",
        "--wait",
        "--ca-cert",
        ca_flag,
        "--output",
        "json",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let t: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let t = if t.is_array() { t[0].clone() } else { t };
    assert_eq!(t["stop_code"], "Completed", "{t}");
    assert_eq!(t["node"], "edge-a");
}

#[test]
fn node_install_writes_a_systemd_unit_that_systemd_accepts() {
    let dir = tempfile::tempdir().unwrap();
    let wharf = env!("CARGO_BIN_EXE_wharf");
    let run = |token: &str| {
        Command::new(wharf)
            .args(["node", "install", "--server", "https://wharf.example:7070"])
            .args([
                "--token", token, "--name", "edge-1", "--labels", "zone=a", "--slots", "4",
            ])
            .arg("--unit-dir")
            .arg(dir.path().join("units"))
            .arg("--env-file")
            .arg(dir.path().join("etc/node.env"))
            .arg("--data-dir")
            .arg(dir.path().join("data"))
            .env_remove("WHARF_TOKEN")
            .env_remove("WHARF_DATA_DIR")
            .output()
            .unwrap()
    };
    let out = run("not-a-token");
    assert!(!out.status.success());
    assert!(!dir.path().join("units/wharf-node.service").exists());
    let out = run("WJ1.00ff.wharf_secret");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "systemctl daemon-reload && systemctl enable --now wharf-node"
    );
    let unit = dir.path().join("units/wharf-node.service");
    let text = std::fs::read_to_string(&unit).unwrap();
    assert!(
        text.contains(&format!("ExecStart={wharf} node join"))
            && text.contains("RestartPreventExitStatus=3"),
        "{text}"
    );
    assert!(text.contains(&format!(
        "ReadWritePaths={}",
        dir.path().join("data").display()
    )));
    let env_path = dir.path().join("etc/node.env");
    let env = std::fs::read_to_string(&env_path).unwrap();
    for line in [
        "WHARF_SERVER=\"https://wharf.example:7070\"",
        "WHARF_TOKEN=\"WJ1.00ff.wharf_secret\"",
        "WHARF_NODE_NAME=\"edge-1\"",
        "WHARF_NODE_LABELS=\"zone=a\"",
        "WHARF_SLOTS=4",
    ] {
        assert!(env.lines().any(|l| l == line), "{line} in {env}");
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&env_path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "the token stays private");
    }
    // systemd itself checks the unit (Debian's systemd package).
    let verify = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&unit)
        .output()
        .expect("systemd-analyze (apt-get install systemd)");
    assert!(
        verify.status.success(),
        "{}",
        String::from_utf8_lossy(&verify.stderr)
    );
    // A plain-HTTP server off loopback is refused here too.
    let out = Command::new(wharf)
        .args(["node", "install", "--server", "http://10.0.0.5:7070"])
        .args(["--token", "WJ1.none.wharf_secret"])
        .arg("--unit-dir")
        .arg(dir.path().join("units2"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--insecure"));
}

/// A network namespace with a veth pair to the host, removed on drop.
struct Netns {
    name: String,
    host_if: String,
    host_ip: String,
}

fn ip(args: &[&str]) -> bool {
    Command::new("ip")
        .args(args)
        .status()
        .is_ok_and(|s| s.success())
}

impl Netns {
    /// Namespace `k` of this test process (tests run side by side).
    fn create(k: u32) -> Option<Netns> {
        let id = std::process::id() % 10_000;
        let net = 231 + k;
        let n = Netns {
            name: format!("wharf-{id}-{k}"),
            host_if: format!("wh{id}{k}h"),
            host_ip: format!("10.{net}.{}.1", id % 250),
        };
        let node_if = format!("wh{id}{k}n");
        let node_ip = format!("10.{net}.{}.2/24", id % 250);
        let ok = ip(&["netns", "add", &n.name])
            && ip(&[
                "link", "add", &n.host_if, "type", "veth", "peer", "name", &node_if,
            ])
            && ip(&["link", "set", &node_if, "netns", &n.name])
            && ip(&[
                "addr",
                "add",
                &format!("{}/24", n.host_ip),
                "dev",
                &n.host_if,
            ])
            && ip(&["link", "set", &n.host_if, "up"])
            && ip(&[
                "netns", "exec", &n.name, "ip", "addr", "add", &node_ip, "dev", &node_if,
            ])
            && ip(&[
                "netns", "exec", &n.name, "ip", "link", "set", &node_if, "up",
            ])
            && ip(&["netns", "exec", &n.name, "ip", "link", "set", "lo", "up"]);
        ok.then_some(n)
    }

    /// Cuts (or restores) the node's link.
    fn link(&self, up: bool) {
        assert!(ip(&[
            "link",
            "set",
            &self.host_if,
            if up { "up" } else { "down" }
        ]));
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        ip(&["link", "del", &self.host_if]);
        ip(&["netns", "del", &self.name]);
    }
}

/// The numbers of `heartbeat N` lines of a task's output.
fn beats(s: &Server, id: &str) -> Vec<u64> {
    let logs = s.api("GET", &format!("/v1/tasks/{id}/logs"), None).json();
    logs["lines"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|l| l["text"].as_str()?.strip_prefix("heartbeat ")?.parse().ok())
        .collect()
}

#[test]
fn a_node_cut_off_by_the_network_runs_on_and_is_reconciled_when_the_link_returns() {
    let netns = Netns::create(0);
    if !crate::server::require("ip netns (root)", netns.is_some()) {
        return;
    }
    let netns = netns.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (s, port) = start_for_netns(&dir.path().join("server"), &[]);
    let far_url = format!("http://{}:{port}", netns.host_ip);
    let token = join_token(&s, &[]);
    let _far = Agent::start_in(
        &["ip", "netns", "exec", &netns.name],
        &far_url,
        &dir.path().join("far"),
        Some(&token),
        &["--name", "edge-far", "--labels", "site=far", "--insecure"],
    )
    .unwrap();
    let _near = Agent::start_in(
        &[],
        &far_url,
        &dir.path().join("near"),
        Some(&token),
        &["--name", "edge-near", "--labels", "site=near", "--insecure"],
    )
    .unwrap();
    register(
        &s,
        json!({"family": "far", "artifact": "team/beat:v1", "args": ["100"],
               "placement": {"constraints": ["site == far"]}}),
    );
    let r = s.api("POST", "/v1/tasks", Some(json!({"task_definition": "far"})));
    let id = r.json()[0]["id"].as_str().unwrap().to_owned();
    eventually(Duration::from_secs(20), "output from the far node", || {
        (beats(&s, &id).len() >= 5).then_some(())
    });
    // A cut shorter than the node timeout: the task runs on, and its
    // output from the cut arrives when the link returns, with no gap.
    let before = beats(&s, &id).len();
    netns.link(false);
    std::thread::sleep(Duration::from_secs(4));
    assert_eq!(node(&s, "edge-far")["status"], "READY");
    netns.link(true);
    let seen = eventually(Duration::from_secs(20), "the output of the cut", || {
        let b = beats(&s, &id);
        (b.len() >= before + 40).then_some(b)
    });
    assert!(
        seen.iter().enumerate().all(|(i, n)| i as u64 == *n),
        "a gap in {seen:?}"
    );
    assert_eq!(
        s.api("GET", &format!("/v1/tasks/{id}"), None).json()["status"],
        "RUNNING"
    );

    // A cut longer than the timeout: the far node is lost and its service
    // task runs on the near node; back, the far node stops its old task.
    register(
        &s,
        json!({"family": "svc", "artifact": "team/beat:v1", "args": ["200"],
               "placement": {"constraints": ["site in [far, near]"]}}),
    );
    let r = s.api(
        "POST",
        "/v1/services",
        Some(json!({"name": "svc", "task_definition": "svc", "desired_count": 2})),
    );
    assert_eq!(r.status, 201);
    converged(&s, "svc", 2);
    assert_eq!(nodes_of(&tasks_of(&s, "svc")), ["edge-far", "edge-near"]);
    netns.link(false);
    eventually(Duration::from_secs(30), "svc runs on the near node", || {
        (nodes_of(&tasks_of(&s, "svc")) == ["edge-near", "edge-near"]).then_some(())
    });
    assert_eq!(node(&s, "edge-far")["status"], "LOST");
    assert_eq!(s.wait_stopped(&id)["stop_code"], "NodeLost");
    netns.link(true);
    eventually(
        Duration::from_secs(30),
        "the far node back, running nothing",
        || {
            let n = node(&s, "edge-far");
            (n["status"] == "READY" && n["free"]["slots"] == n["capacity"]["slots"]).then_some(())
        },
    );
    converged(&s, "svc", 2);
    assert_eq!(nodes_of(&tasks_of(&s, "svc")), ["edge-near", "edge-near"]);
}

#[test]
fn binpack_fills_the_fullest_node_that_fits_and_spread_by_label_balances_zones() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start_with(&dir.path().join("server"), &["--no-local-node"]);
    s.push_sample("heartbeat", Target::P1, "team/beat:v1");
    let token = join_token(&s, &[]);
    let nodes: Vec<Agent> = [
        ("small", "a", "1GiB"),
        ("large", "a", "4GiB"),
        ("other", "b", "4GiB"),
    ]
    .iter()
    .map(|(name, zone, memory)| {
        Agent::start(
            &s,
            &dir.path().join(name),
            Some(&token),
            &[
                "--name",
                name,
                "--labels",
                &format!("zone={zone}"),
                "--memory-budget",
                memory,
            ],
        )
        .unwrap()
    })
    .collect();
    assert_eq!(nodes.len(), 3);
    wait_for_nodes(&s, 3);
    // binpack: the node with the least free memory that still fits.
    register(
        &s,
        json!({"family": "packed", "artifact": "team/beat:v1", "args": ["500"],
               "limits": {"memory": "256MiB"}, "placement": {"strategy": "binpack"}}),
    );
    let r = s.api(
        "POST",
        "/v1/services",
        Some(json!({"name": "packed", "task_definition": "packed", "desired_count": 5})),
    );
    assert_eq!(r.status, 201, "{r:?}");
    converged(&s, "packed", 5);
    // 1 GiB holds four 256 MiB tasks; the fifth goes to the next fullest.
    let placed = nodes_of(&tasks_of(&s, "packed"));
    assert_eq!(
        placed.iter().filter(|n| *n == "small").count(),
        4,
        "{placed:?}"
    );
    assert_eq!(node(&s, "small")["free"]["memory_bytes"], 0);
    // spread(zone): zone a (two nodes) and zone b (one) get two tasks each.
    register(
        &s,
        json!({"family": "zoned", "artifact": "team/beat:v1", "args": ["500"],
               "placement": {"strategy": "spread(zone)"}}),
    );
    let r = s.api(
        "POST",
        "/v1/services",
        Some(json!({"name": "zoned", "task_definition": "zoned", "desired_count": 4})),
    );
    assert_eq!(r.status, 201, "{r:?}");
    converged(&s, "zoned", 4);
    let placed = nodes_of(&tasks_of(&s, "zoned"));
    assert_eq!(
        placed.iter().filter(|n| *n == "other").count(),
        2,
        "{placed:?}"
    );
    // A service's placement replaces its definition's.
    let out = wharf(
        &s,
        &[
            "service",
            "create",
            "pinned",
            "--taskdef",
            "zoned",
            "--desired",
            "2",
            "--constraint",
            "zone == b",
            "--placement-strategy",
            "binpack",
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        service(&s, "pinned")["placement"]["constraints"],
        json!(["zone == b"])
    );
    converged(&s, "pinned", 2);
    assert_eq!(nodes_of(&tasks_of(&s, "pinned")), ["other", "other"]);
    let r = s.api(
        "POST",
        "/v1/services",
        Some(
            json!({"name": "bad", "task_definition": "zoned", "desired_count": 1,
                    "placement": {"constraints": ["zone = b"]}}),
        ),
    );
    assert_eq!(r.status, 422, "{r:?}");
    // A strategy that is not one is refused at registration.
    let r = s.api(
        "POST",
        "/v1/taskdefs",
        Some(json!({"family": "bad", "artifact": "team/beat:v1",
                    "placement": {"strategy": "random"}})),
    );
    assert_eq!(r.status, 422, "{r:?}");
    assert!(
        r.json()["message"]
            .as_str()
            .unwrap()
            .starts_with("placement.strategy")
    );
}

#[test]
fn a_cut_off_node_restarts_its_failing_service_task_with_backoff() {
    let netns = Netns::create(1);
    if !crate::server::require("ip netns (root)", netns.is_some()) {
        return;
    }
    let netns = netns.unwrap();
    let dir = tempfile::tempdir().unwrap();
    // A node timeout longer than the cut: the node stays READY.
    let (s, port) = start_for_netns(&dir.path().join("server"), &["--node-timeout", "60s"]);
    let url = format!("http://{}:{port}", netns.host_ip);
    let token = join_token(&s, &[]);
    let _far = Agent::start_in(
        &["ip", "netns", "exec", &netns.name],
        &url,
        &dir.path().join("far"),
        Some(&token),
        &["--name", "edge-far", "--insecure"],
    )
    .unwrap();
    // Each run beats for 3 s, then its timeout ends it: a failure.
    register(
        &s,
        json!({"family": "flaky", "artifact": "team/beat:v1", "args": ["100"],
               "limits": {"timeout": "3s"}}),
    );
    let r = s.api(
        "POST",
        "/v1/services",
        Some(json!({"name": "flaky", "task_definition": "flaky", "desired_count": 1})),
    );
    assert_eq!(r.status, 201);
    let id = eventually(Duration::from_secs(20), "a running task", || {
        tasks_of(&s, "flaky")
            .first()
            .map(|t| t["id"].as_str().unwrap().to_owned())
    });
    netns.link(false);
    std::thread::sleep(Duration::from_secs(10));
    netns.link(true);
    // Back: the task ran on through the cut, restarted by the node.
    let t = s.wait_stopped(&id);
    assert_eq!(t["stop_code"], "Timeout", "{t}");
    let logs = s.api("GET", &format!("/v1/tasks/{id}/logs"), None).json();
    let lines: Vec<&str> = logs["lines"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["text"].as_str().unwrap())
        .collect();
    let restarts = lines
        .iter()
        .filter(|l| l.contains("the server is out of reach, restarting"))
        .count();
    assert!(restarts >= 2, "{lines:#?}");
    let runs = lines.iter().filter(|l| **l == "heartbeat 0").count();
    assert_eq!(runs, restarts + 1, "{lines:#?}");
    assert!(
        lines
            .iter()
            .any(|l| l.contains("restarting in 2s (attempt 2)")),
        "backoff doubles"
    );
}

/// A GET to `url`, as (status, body); 0 when nothing answered.
pub(crate) fn http_get(url: &str) -> (u16, String) {
    let agent = ureq::AgentBuilder::new()
        .timeout(Duration::from_secs(20))
        .build();
    match agent.get(url).call() {
        Ok(r) => (r.status(), r.into_string().unwrap_or_default()),
        Err(ureq::Error::Status(code, r)) => (code, r.into_string().unwrap_or_default()),
        Err(_) => (0, String::new()),
    }
}

/// Requests answered per task of a service (the server's counts of what
/// it forwarded), by node.
fn answered_by_node(s: &Server, service: &str) -> std::collections::BTreeMap<String, u64> {
    let mut by_node = std::collections::BTreeMap::new();
    for t in tasks_of(s, service) {
        let n = t["http"]["responses"]["2xx"].as_u64().unwrap_or(0);
        *by_node
            .entry(t["node"].as_str().unwrap().to_owned())
            .or_insert(0) += n;
    }
    by_node
}

#[test]
fn http_services_are_served_by_node_ingresses_and_through_the_servers_ingress() {
    let dir = tempfile::tempdir().unwrap();
    // A fixed port: the nodes find the server again after its restart.
    let listen = format!("127.0.0.1:{}", free_port());
    let flags = [
        "--no-local-node",
        "--node-timeout",
        "3s",
        "--listen",
        listen.as_str(),
    ];
    let s = Server::start_with(&dir.path().join("server"), &flags);
    let server_ingress = s.ingress.clone().unwrap();
    s.push_sample("http_echo", Target::P2, "team/echo:v1");
    register(
        &s,
        json!({"family": "echo", "artifact": "team/echo:v1", "kind": "http",
               "http": {"health_check": "/healthz"}}),
    );
    let token = join_token(&s, &[]);
    // A node without an ingress gets no HTTP task: the refusal names it.
    let plain = Agent::start(
        &s,
        &dir.path().join("plain"),
        Some(&token),
        &["--name", "plain"],
    )
    .unwrap();
    wait_for_nodes(&s, 1);
    let r = s.api(
        "POST",
        "/v1/services",
        Some(
            json!({"name": "web", "task_definition": "echo", "desired_count": 4,
                    "routes": ["/web"]}),
        ),
    );
    assert_eq!(r.status, 201, "{r:?}");
    eventually(Duration::from_secs(10), "the placement is refused", || {
        let events = crate::server::events(&s, "web").join("\n");
        events.contains("no node serves HTTP").then_some(())
    });
    // A node may only advertise the address it connects from, and none
    // of the server's own listeners: the server does not forward to it.
    let api_addr = s.host().to_owned();
    let liars: Vec<Agent> = [("far", "10.9.9.9:8080"), ("self", api_addr.as_str())]
        .iter()
        .map(|(name, advertised)| {
            Agent::start(
                &s,
                &dir.path().join(name),
                Some(&token),
                &[
                    "--name",
                    name,
                    "--ingress",
                    "127.0.0.1:0",
                    "--advertise-ingress",
                    advertised,
                ],
            )
            .unwrap()
        })
        .collect();
    let edges: Vec<Agent> = ["edge-a", "edge-b", "edge-c"]
        .iter()
        .map(|name| {
            Agent::start(
                &s,
                &dir.path().join(name),
                Some(&token),
                &["--name", name, "--ingress", "127.0.0.1:0"],
            )
            .unwrap()
        })
        .collect();
    wait_for_nodes(&s, 6);
    let far = node(&s, "far");
    assert!(
        far["ingress_refused"]
            .as_str()
            .unwrap()
            .contains("connects from 127.0.0.1"),
        "{far}"
    );
    let own = node(&s, "self");
    assert!(
        own["ingress_refused"]
            .as_str()
            .unwrap()
            .contains("server's own listeners"),
        "{own}"
    );
    let edge_a = node(&s, "edge-a");
    assert_eq!(
        format!("http://{}", edge_a["ingress"].as_str().unwrap()),
        edges[0].ingress.clone().unwrap()
    );
    // Four tasks over the three nodes that serve HTTP (spread).
    converged(&s, "web", 4);
    let nodes = nodes_of(&tasks_of(&s, "web"));
    let mut distinct = nodes.clone();
    distinct.dedup();
    assert_eq!(distinct, ["edge-a", "edge-b", "edge-c"], "{nodes:?}");
    // Each node's ingress serves the service's route on the node.
    for edge in &edges {
        let base = edge.ingress.clone().unwrap();
        eventually(Duration::from_secs(10), "the node routes /web", || {
            let (status, body) = http_get(&format!("{base}/web/hi?x=1"));
            (status == 200).then_some(body)
        });
        let (status, body) = http_get(&format!("{base}/web/hi?x=1"));
        assert_eq!(status, 200, "{body}");
        assert!(body.contains("\"path\":\"/web/hi?x=1\""), "{body}");
        let (status, _) = http_get(&format!("{base}/elsewhere"));
        assert_eq!(status, 404);
    }
    // The server's ingress balances over every node's tasks, forwarding
    // to their ingresses; the path, query and forwarding chain survive.
    let (status, body) = http_get(&format!("{server_ingress}/web/through?y=2"));
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("\"path\":\"/web/through?y=2\""), "{body}");
    assert!(body.contains("127.0.0.1, 127.0.0.1"), "{body}");
    for _ in 0..60 {
        let (status, body) = http_get(&format!("{server_ingress}/web/n"));
        assert_eq!(status, 200, "{body}");
    }
    let answered = answered_by_node(&s, "web");
    assert_eq!(
        answered.keys().collect::<Vec<_>>(),
        ["edge-a", "edge-b", "edge-c"]
    );
    assert!(answered.values().all(|n| *n > 0), "{answered:?}");
    assert!(answered.values().sum::<u64>() >= 61, "{answered:?}");
    // Cut off from the server (stopped), a node's ingress serves on.
    let server_pid = s.pid().to_string();
    let kill = |sig: &str| {
        assert!(
            Command::new("kill")
                .args([sig, &server_pid])
                .status()
                .unwrap()
                .success()
        );
    };
    kill("-STOP");
    let edge_b = edges[1].ingress.clone().unwrap();
    let during = http_get(&format!("{edge_b}/web/cut"));
    kill("-CONT");
    assert_eq!(during.0, 200, "{during:?}");
    // kill -9 of a node: the server's ingress passes over it at once (a
    // request without a body that its ingress refused goes to another
    // task: none fails) and its tasks are replaced on the others.
    let mut edges = edges;
    edges.remove(0).kill9();
    let mut in_a_row = 0;
    let mut failed = 0;
    let deadline = Instant::now() + Duration::from_secs(30);
    while in_a_row < 40 && Instant::now() < deadline {
        let (status, _) = http_get(&format!("{server_ingress}/web/after"));
        if status == 200 {
            in_a_row += 1;
        } else {
            in_a_row = 0;
            failed += 1;
        }
    }
    assert_eq!(
        (in_a_row, failed),
        (40, 0),
        "requests failed after the kill"
    );
    eventually(
        Duration::from_secs(20),
        "edge-a's tasks run elsewhere",
        || {
            let nodes = nodes_of(&tasks_of(&s, "web"));
            (nodes.len() == 4 && !nodes.contains(&"edge-a".to_owned())).then_some(())
        },
    );
    // A request the server's ingress forwarded once is not forwarded again
    // (a node pointing its ingress back at the server would loop).
    let looped = ureq::get(&format!("{server_ingress}/web/loop"))
        .set("x-wharf-forwarded", "1")
        .call();
    assert!(
        matches!(looped, Err(ureq::Error::Status(508, _))),
        "{looped:?}"
    );
    // After a restart of the server, the nodes' running HTTP tasks take
    // its ingress's traffic again (taken back, once each node syncs).
    assert!(s.terminate().success());
    let s = Server::start_with(&dir.path().join("server"), &flags);
    let server_ingress = s.ingress.clone().unwrap();
    eventually(
        Duration::from_secs(20),
        "the restarted server forwards",
        || (http_get(&format!("{server_ingress}/web/again")).0 == 200).then_some(()),
    );
    for _ in 0..20 {
        assert_eq!(http_get(&format!("{server_ingress}/web/again")).0, 200);
    }
    // Scaled to zero, a node no longer routes the service.
    let r = s.api(
        "PATCH",
        "/v1/services/web",
        Some(json!({"desired_count": 0})),
    );
    assert_eq!(r.status, 200, "{r:?}");
    eventually(Duration::from_secs(20), "edge-b stops routing /web", || {
        (http_get(&format!("{edge_b}/web/gone")).0 == 404).then_some(())
    });
    drop((plain, liars));
}

#[test]
fn the_same_benchmark_runs_on_every_matching_node_with_the_spread_between_them() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start_with(&dir.path().join("server"), &["--node-labels", "zone=hq"]);
    s.push_sample("cpu", Target::P1, "team/cpu:v1");
    register(
        &s,
        json!({"family": "cpu", "artifact": "team/cpu:v1", "args": ["20000"]}),
    );
    let token = join_token(&s, &[]);
    let _agents: Vec<Agent> = [("edge-a", "zone=a"), ("edge-b", "zone=b")]
        .iter()
        .map(|(name, labels)| {
            Agent::start(
                &s,
                &dir.path().join(name),
                Some(&token),
                &["--name", name, "--labels", labels],
            )
            .unwrap()
        })
        .collect();
    wait_for_nodes(&s, 3);
    let bench = |extra: &[&str]| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_wharf"));
        cmd.args([
            "bench", "run", "cpu", "--runs", "15", "--warmup", "2", "--output", "json",
        ])
        .args(extra)
        .env("WHARF_SERVER", &s.base)
        .env("WHARF_TOKEN", &s.token);
        let out = cmd.output().unwrap();
        assert!(out.status.success(), "{out:?}");
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()
    };
    let all = bench(&["--nodes", "all"]);
    let benches = all["benchmarks"].as_array().unwrap();
    let names: Vec<&str> = benches
        .iter()
        .map(|b| b["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["cpu @ local", "cpu @ edge-a", "cpu @ edge-b"]);
    let mut fuel = Vec::new();
    for b in benches {
        assert_eq!(b["runs"].as_array().unwrap().len(), 15, "{b}");
        assert_eq!(b["failed"], json!({}), "{b}");
        assert_eq!(b["fuel_identical"], true, "{b}");
        assert!(b["stats"]["execute_ms"]["median"].as_f64().unwrap() > 0.0);
        fuel.push(b["stats"]["fuel"]["median"].as_f64().unwrap());
    }
    // The same guest work on every node, to the unit.
    assert!(fuel.iter().all(|f| *f == fuel[0]), "{fuel:?}");
    let notes = all["notes"].to_string();
    assert!(notes.contains("spread between 3 nodes"), "{notes}");
    assert!(notes.contains("fuel identical on every node"), "{notes}");
    // A label picks the nodes; arguments after -- replace the definition's.
    let one = bench(&["--nodes", "zone=b", "--", "40000"]);
    let benches = one["benchmarks"].as_array().unwrap();
    assert_eq!(benches.len(), 1);
    assert_eq!(benches[0]["name"], "cpu @ edge-b");
    assert!(benches[0]["stats"]["fuel"]["median"].as_f64().unwrap() > fuel[0] * 1.5);
    // The benchmark tasks are tasks like any other, placed on their node.
    let r = s.api("GET", "/v1/tasks?family=cpu", None);
    let on: Vec<String> = nodes_of(r.json().as_array().unwrap());
    assert_eq!(on.iter().filter(|n| *n == "edge-b").count(), 2, "{on:?}");
    // `wharf task run --node` places on that node, or names why not.
    let r = s.api(
        "POST",
        "/v1/tasks",
        Some(json!({"task_definition": "cpu", "node": "edge-a"})),
    );
    assert_eq!(r.status, 201, "{r:?}");
    let t = s.wait_stopped(r.json()[0]["id"].as_str().unwrap());
    assert_eq!(
        (t["node"].as_str(), t["stop_code"].as_str()),
        (Some("edge-a"), Some("Completed"))
    );
    let r = s.api(
        "POST",
        "/v1/tasks",
        Some(json!({"task_definition": "cpu", "node": "nowhere"})),
    );
    let t = s.wait_stopped(r.json()[0]["id"].as_str().unwrap());
    assert_eq!(t["stop_code"], "FailedToStart");
    assert!(
        t["message"].as_str().unwrap().contains("no node nowhere"),
        "{t}"
    );
    // A benchmark's size is bounded.
    let r = s.api(
        "POST",
        "/v1/tasks",
        Some(json!({"task_definition": "cpu", "bench": {"runs": 501}})),
    );
    assert_eq!(r.status, 422, "{r:?}");
    assert!(String::from_utf8_lossy(&r.body).contains("runs must be 1 to 500"));
}
