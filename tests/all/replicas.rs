//! Several `wharf server` replicas on one real PostgreSQL database
//! (`wharf_testkit::postgres`) and one real S3-compatible bucket
//! (`wharf_testkit::garage`): any replica answers any request, one leads
//! the services, and a `kill -9` of the leader moves them.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde_json::json;
use wharf_testkit::Target;

use crate::server::{Server, call, eventually, register, sha256};

/// The shared database and bucket of one test's replicas.
struct Shared {
    state: String,
    blobs: String,
    env: Vec<(&'static str, String)>,
    dir: tempfile::TempDir,
}

impl Shared {
    fn new() -> Shared {
        let garage = wharf_testkit::garage::shared();
        Shared {
            state: wharf_testkit::postgres::shared().database(),
            blobs: garage.url("wharf"),
            env: garage.env(),
            dir: tempfile::tempdir().unwrap(),
        }
    }

    fn data(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Starts replica `name`; every replica after the first gets the
    /// first one's admin token and secrets key, as an operator copies
    /// them.
    fn start(&self, name: &str) -> Server {
        self.start_with(name, &[])
    }

    /// [`start`](Self::start) with more flags.
    fn start_with(&self, name: &str, extra: &[&str]) -> Server {
        let data = self.data(name);
        let first = self.data("a");
        if name != "a" && !data.exists() {
            std::fs::create_dir_all(&data).unwrap();
            for file in ["admin.token", "secrets.key"] {
                std::fs::copy(first.join(file), data.join(file)).unwrap();
            }
            // With TLS, the CA too: replicas trust each other through it.
            if first.join("tls").exists() {
                std::fs::create_dir_all(data.join("tls")).unwrap();
                for file in ["ca.pem", "ca.key"] {
                    std::fs::copy(first.join("tls").join(file), data.join("tls").join(file))
                        .unwrap();
                }
            }
        }
        let mut flags = vec![
            "--state",
            &self.state,
            "--blobs",
            &self.blobs,
            "--replica",
            name,
        ];
        flags.extend_from_slice(extra);
        Server::start_with_env(&data, &flags, &self.env)
    }
}

/// The replica that leads, as `/v1/replicas` says; the `/v1/nodes`
/// listing (the leader's) must agree: it names its own node, which is the
/// replica's name.
fn leader(s: &Server) -> String {
    let replicas = s.api("GET", "/v1/replicas", None).json();
    let leaders: Vec<&str> = replicas
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["leader"] == true)
        .filter_map(|r| r["name"].as_str())
        .collect();
    let nodes = s.api("GET", "/v1/nodes", None).json();
    let own = nodes
        .as_array()
        .unwrap_or_else(|| panic!("no node list: {nodes}"))
        .iter()
        .find(|n| n["local"] == true)
        .and_then(|n| n["name"].as_str())
        .unwrap_or_else(|| panic!("no local node in {nodes}"));
    assert_eq!(leaders, [own], "{replicas}");
    own.to_owned()
}

fn wait_stopped_on(s: &Server, id: &str) -> serde_json::Value {
    eventually(Duration::from_secs(30), "the task to stop", || {
        let t = s.api("GET", &format!("/v1/tasks/{id}"), None).json();
        (t["status"] == "STOPPED").then_some(t)
    })
}

#[test]
fn three_replicas_share_the_registry_state_uploads_and_tokens() {
    let shared = Shared::new();
    let a = shared.start("a");
    let b = shared.start("b");
    let c = shared.start("c");

    // Push to A, pull from B.
    a.push_sample("echo", Target::P1, "team/echo:v1");
    let r = call(
        b.req("GET", "/v2/team/echo/manifests/v1")
            .set("Accept", "application/vnd.oci.image.manifest.v1+json")
            .call(),
    );
    assert_eq!(r.status, 200, "{r:?}");
    let manifest = r.json();
    let layer = manifest["layers"][0]["digest"].as_str().unwrap().to_owned();
    let r = call(b.req("GET", &format!("/v2/team/echo/blobs/{layer}")).call());
    assert_eq!(r.status, 200);
    assert_eq!(sha256(&r.body), layer, "B serves the bytes A stored");

    // Register on A, run on B, describe on C: read-your-writes.
    register(
        &a,
        json!({"family": "echo", "artifact": "team/echo:v1", "args": ["on", "b"]}),
    );
    let r = b.api(
        "POST",
        "/v1/tasks",
        Some(json!({"task_definition": "echo"})),
    );
    assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
    let id = r.json()[0]["id"].as_str().unwrap().to_owned();
    let r = c.api("GET", &format!("/v1/tasks/{id}"), None);
    assert_eq!(r.status, 200, "C knows the task at once");
    let t = wait_stopped_on(&c, &id);
    assert_eq!(t["stop_code"], "Completed", "{t}");
    assert_eq!(t["node"], "b", "B ran it on its own node");
    let logs = c.api("GET", &format!("/v1/tasks/{id}/logs"), None);
    assert!(
        String::from_utf8_lossy(&logs.body).contains(r#""text":"b""#),
        "{}",
        String::from_utf8_lossy(&logs.body)
    );
    // A run on A for C's own node runs on C.
    let r = a.api(
        "POST",
        "/v1/tasks",
        Some(json!({"task_definition": "echo", "node": "c"})),
    );
    assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
    let on_c = r.json()[0]["id"].as_str().unwrap().to_owned();
    assert_eq!(wait_stopped_on(&b, &on_c)["node"], "c");
    // A new revision registered on C is the one B runs next.
    register(
        &c,
        json!({"family": "echo", "artifact": "team/echo:v1", "args": ["revision", "2"]}),
    );
    let r = b.api(
        "POST",
        "/v1/tasks",
        Some(json!({"task_definition": "echo"})),
    );
    assert_eq!(r.json()[0]["task_definition"], "echo:2");
    // B caches task definitions: a deregistration on A is what B runs
    // next, a moment later, all the same.
    let r = a.api("DELETE", "/v1/taskdefs/echo:2", None);
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let r = b.api(
        "POST",
        "/v1/tasks",
        Some(json!({"task_definition": "echo"})),
    );
    assert_eq!(r.json()[0]["task_definition"], "echo:1");
    let r = b.api("GET", "/v1/taskdefs/echo:2", None);
    assert_eq!(r.json()["status"], "INACTIVE");

    // A long task on B: stopped and followed through A.
    a.push_sample("heartbeat", Target::P1, "team/beat:v1");
    register(
        &b,
        json!({"family": "beat", "artifact": "team/beat:v1", "args": ["50"]}),
    );
    let r = b.api(
        "POST",
        "/v1/tasks",
        Some(json!({"task_definition": "beat"})),
    );
    let long = r.json()[0]["id"].as_str().unwrap().to_owned();
    eventually(Duration::from_secs(20), "heartbeats through A", || {
        let logs = a.api("GET", &format!("/v1/tasks/{long}/logs"), None);
        String::from_utf8_lossy(&logs.body)
            .contains("heartbeat 1")
            .then_some(())
    });
    let r = a.api("POST", &format!("/v1/tasks/{long}/stop"), None);
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(wait_stopped_on(&c, &long)["stop_code"], "UserStopped");

    // A chunked upload started on A, continued on B, then on A again
    // (whose idea of the upload is stale by now), finished on C.
    let chunks: [Vec<u8>; 3] = [vec![1u8; 1 << 20], vec![2u8; 5000], b"end".to_vec()];
    let whole = chunks.concat();
    let digest = sha256(&whole);
    let r = call(a.req("POST", "/v2/team/echo/blobs/uploads/").call());
    assert_eq!(r.status, 202);
    let location = r.header("location").unwrap().to_owned();
    let mut at = 0;
    for (chunk, s) in chunks.iter().zip([&a, &b, &a]) {
        let r = call(
            s.req("PATCH", &location)
                .set("Content-Range", &format!("{at}-{}", at + chunk.len() - 1))
                .send_bytes(chunk),
        );
        assert_eq!(r.status, 202, "{r:?}");
        at += chunk.len();
        assert_eq!(r.header("range"), Some(format!("0-{}", at - 1).as_str()));
    }
    let sep = if location.contains('?') { '&' } else { '?' };
    let r = call(
        c.req("PUT", &format!("{location}{sep}digest={digest}"))
            .send_bytes(&[]),
    );
    assert_eq!(r.status, 201, "{r:?}");
    let r = call(
        a.req("GET", &format!("/v2/team/echo/blobs/{digest}"))
            .call(),
    );
    assert_eq!(sha256(&r.body), digest);

    // A token made on A works on C; revoked on B, it stops working on A.
    let r = a.api(
        "POST",
        "/v1/tokens",
        Some(json!({"name": "ci", "role": "reader"})),
    );
    assert_eq!(r.status, 201);
    let token = r.json();
    let secret = token["secret"].as_str().unwrap().to_owned();
    let token_id = token["token"]["id"].as_str().unwrap().to_owned();
    eventually(Duration::from_secs(5), "the token on C", || {
        (c.api_as(&secret, "GET", "/v1/taskdefs", None).status == 200).then_some(())
    });
    // Which replicas there are, and their addresses, is for admins.
    assert_eq!(c.api_as(&secret, "GET", "/v1/replicas", None).status, 403);
    let replicas = c.api("GET", "/v1/replicas", None).json();
    let names: Vec<&str> = replicas
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|r| r["name"].as_str())
        .collect();
    assert_eq!(names, ["a", "b", "c"]);
    assert_eq!(leader(&c), "a");
    assert_eq!(
        b.api("DELETE", &format!("/v1/tokens/{token_id}"), None)
            .status,
        200
    );
    eventually(Duration::from_secs(5), "the revocation on A", || {
        (a.api_as(&secret, "GET", "/v1/taskdefs", None).status == 401).then_some(())
    });

    // A follower holds a leader's request body only up to the API's own
    // limit, even one with no token (the leader authenticates it).
    // The client declares 3 MiB and sends one byte past the limit, then
    // reads: a client still writing when the follower answers and closes
    // may see a broken pipe instead of the answer (a race of the test, not
    // of the server), so it sends no more than the follower reads.
    let answer = {
        use std::io::{Read, Write};
        let mut conn = std::net::TcpStream::connect(b.base.trim_start_matches("http://")).unwrap();
        conn.set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        write!(
            conn,
            "POST /v1/services HTTP/1.1\r\nHost: b\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\n\r\n",
            3 << 20
        )
        .unwrap();
        conn.write_all(&vec![b'x'; (2 << 20) + 1]).unwrap();
        let mut got = Vec::new();
        let mut buf = [0u8; 8192];
        // Until the follower closes (or resets) the connection.
        while let Ok(n) = conn.read(&mut buf) {
            if n == 0 {
                break;
            }
            got.extend_from_slice(&buf[..n]);
        }
        String::from_utf8_lossy(&got).into_owned()
    };
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert!(answer.contains("over 2097152 bytes"), "{answer}");
    // A fourth process may not take a live replica's name.
    let (code, stderr) = fails(&shared, "b");
    assert_ne!(code, 0);
    assert!(
        stderr.contains("replica b is already running on this database"),
        "{stderr}"
    );
    // Nor join with another data directory's secrets.
    let other = shared.data("d");
    std::fs::create_dir_all(&other).unwrap();
    let (code, stderr) = fails(&shared, "d");
    assert_ne!(code, 0);
    assert!(
        stderr.contains("secrets.key is not the one the other replicas"),
        "{stderr}"
    );
    drop(a);
    drop((b, c));
}

/// Starts replica `name` expecting it to fail; its exit code and stderr.
fn fails(shared: &Shared, name: &str) -> (i32, String) {
    let data = shared.data(&format!("{name}-again"));
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_wharf"))
        .args(["server", "--listen", "127.0.0.1:0", "--ingress", "off"])
        .arg("--data-dir")
        .arg(if name == "d" { shared.data("d") } else { data })
        .args([
            "--state",
            &shared.state,
            "--blobs",
            &shared.blobs,
            "--replica",
            name,
        ])
        .envs(shared.env.iter().map(|(k, v)| (k, v)))
        .env_remove("WHARF_STATE")
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The service's tasks as any replica lists them.
fn tasks_of(s: &Server, service: &str) -> Vec<serde_json::Value> {
    s.api(
        "GET",
        &format!("/v1/tasks?service={service}&limit=1000"),
        None,
    )
    .json()
    .as_array()
    .unwrap()
    .clone()
}

#[test]
fn a_kill_9_of_the_leader_during_a_scale_up_moves_the_service_within_5_s_with_no_duplicate() {
    let shared = Shared::new();
    let a = shared.start("a");
    let b = shared.start("b");
    let c = shared.start("c");
    assert_eq!(leader(&b), "a", "the first replica leads");
    a.push_sample("heartbeat", Target::P1, "team/beat:v1");
    register(
        &b,
        json!({"family": "beat", "artifact": "team/beat:v1", "args": ["100"]}),
    );
    // Created on C, which forwards it to the leader.
    let r = c.api(
        "POST",
        "/v1/services",
        Some(json!({"name": "web", "task_definition": "beat", "desired_count": 2})),
    );
    assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
    crate::server::converged(&b, "web", 2);
    let before: Vec<String> = tasks_of(&b, "web")
        .iter()
        .map(|t| t["id"].as_str().unwrap().to_owned())
        .collect();
    assert!(tasks_of(&b, "web").iter().all(|t| t["node"] == "a"));

    // Scale up through B, and kill the leader at once.
    let r = b.api(
        "PATCH",
        "/v1/services/web",
        Some(json!({"desired_count": 6})),
    );
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    a.kill9();
    let killed = Instant::now();
    // A request for the leader meanwhile is held through the change of
    // leader, not refused: both followers answer it.
    for s in [&b, &c] {
        let r = s.api("GET", "/v1/services/web", None);
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
        assert_eq!(r.json()["desired_count"], 6);
    }

    // Watch from C until the service runs 6 tasks again; at no moment
    // may more than 6 run outside the dead replica.
    let mut worst = 0;
    let took = loop {
        let tasks = tasks_of(&c, "web");
        let live: Vec<&serde_json::Value> = tasks
            .iter()
            .filter(|t| t["status"] != "STOPPED" && t["node"] != "a")
            .collect();
        worst = worst.max(live.len());
        let running = live.iter().filter(|t| t["status"] == "RUNNING").count();
        if running == 6 && live.len() == 6 {
            break killed.elapsed();
        }
        assert!(
            killed.elapsed() < Duration::from_secs(30),
            "the service did not come back: {tasks:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    eprintln!("failover: 6 tasks RUNNING again {took:?} after the kill -9");
    assert!(worst <= 6, "{worst} tasks were live at once for 6 slots");
    assert!(
        took < Duration::from_secs(5),
        "another replica finished the scale-up {took:?} after the kill (target 5 s)"
    );
    let new_leader = leader(&c);
    assert!(["b", "c"].contains(&new_leader.as_str()), "{new_leader}");
    let tasks = tasks_of(&c, "web");
    // Every record is kept: the dead leader's tasks are STOPPED NodeLost.
    for id in &before {
        let t = tasks
            .iter()
            .find(|t| t["id"] == id.as_str())
            .unwrap_or_else(|| panic!("task {id} has no record"));
        assert_eq!(t["status"], "STOPPED", "{t}");
        assert_eq!(t["stop_code"], "NodeLost", "{t}");
    }
    assert!(
        tasks
            .iter()
            .filter(|t| t["status"] == "RUNNING")
            .all(|t| t["node"] == new_leader.as_str()),
        "{tasks:?}"
    );
    let events = crate::server::events(&c, "web");
    assert!(
        events
            .iter()
            .any(|e| e.contains("NodeLost (its replica stopped)")),
        "{events:?}"
    );

    // The dead replica comes back under its name: it follows, and the
    // service keeps its 6 tasks.
    let a = shared.start("a");
    assert_eq!(leader(&a), new_leader);
    std::thread::sleep(Duration::from_secs(1));
    let live = tasks_of(&a, "web")
        .into_iter()
        .filter(|t| t["status"] != "STOPPED")
        .count();
    assert_eq!(live, 6);
    drop((a, b, c));
}

/// HTTP services are the leader's: another replica's ingress relays their
/// requests to it. A node attached (through any replica) keeps its task
/// through a `kill -9` of the leader: it syncs with the next replica it
/// was given, which forwards to the new leader, which took the task over.
#[test]
fn ingresses_relay_to_the_leader_and_a_node_moves_on_when_the_leader_dies() {
    let shared = Shared::new();
    let a = shared.start("a");
    let b = shared.start("b");
    let c = shared.start("c");
    a.push_sample("http_echo", Target::P2, "team/web:v1");
    register(
        &b,
        json!({"family": "web", "artifact": "team/web:v1", "kind": "http",
               "http": {"health_check": "/healthz"}}),
    );
    let r = c.api(
        "POST",
        "/v1/services",
        Some(
            json!({"name": "web", "task_definition": "web", "desired_count": 1,
                    "routes": ["/web"]}),
        ),
    );
    assert_eq!(r.status, 201, "{r:?}");
    crate::server::converged(&b, "web", 1);
    for s in [&a, &b, &c] {
        let url = format!("{}/web/hi", s.ingress.as_deref().unwrap());
        let (status, body) = crate::edge::http_get(&url);
        assert_eq!(status, 200, "{url}: {body}");
    }

    // A node joins through C and is given every replica.
    let token = crate::edge::join_token(&c, &[]);
    let servers = format!("{},{},{}", a.base, b.base, c.base);
    let _node = crate::edge::Agent::start_in(
        &[],
        &servers,
        &shared.data("node"),
        Some(&token),
        &["--name", "edge1"],
    )
    .unwrap();
    eventually(Duration::from_secs(10), "the node reports", || {
        let n = c.api("GET", "/v1/nodes/edge1", None).json();
        (n["status"] == "READY").then_some(())
    });
    a.push_sample("heartbeat", Target::P1, "team/beat:v1");
    register(
        &a,
        json!({"family": "beat", "artifact": "team/beat:v1", "args": ["100"]}),
    );
    let r = b.api(
        "POST",
        "/v1/tasks",
        Some(json!({"task_definition": "beat", "node": "edge1"})),
    );
    assert_eq!(r.status, 201, "{r:?}");
    let id = r.json()[0]["id"].as_str().unwrap().to_owned();
    eventually(Duration::from_secs(20), "the task runs on the node", || {
        let t = c.api("GET", &format!("/v1/tasks/{id}"), None).json();
        (t["status"] == "RUNNING" && t["node"] == "edge1").then_some(())
    });

    a.kill9();
    let new_leader = eventually(Duration::from_secs(10), "a new leader", || {
        let r = b.api("GET", "/v1/nodes", None);
        (r.status == 200).then(|| leader(&b))
    });
    assert_ne!(new_leader, "a");
    // The node's task runs on, followed by the new leader: its output
    // keeps coming and it is never lost.
    let beats = |s: &Server| -> usize {
        let logs = s.api("GET", &format!("/v1/tasks/{id}/logs"), None).json();
        logs["lines"].as_array().map_or(0, Vec::len)
    };
    let waited = std::time::Instant::now();
    let before = loop {
        let n = beats(&c);
        if n > 0 {
            break n;
        }
        // What each replica says, for a failure that is rare.
        if waited.elapsed() > Duration::from_secs(15) {
            let say = |s: &Server, path: &str| {
                let r = s.api("GET", path, None);
                format!("{path}: {} {}", r.status, String::from_utf8_lossy(&r.body))
            };
            panic!(
                "timed out waiting for the node's output; C: {}; {}; {}; B: {}; {}",
                say(&c, &format!("/v1/tasks/{id}/logs")),
                say(&c, &format!("/v1/tasks/{id}")),
                say(&c, "/v1/replicas"),
                say(&b, &format!("/v1/tasks/{id}/logs")),
                say(&b, "/v1/nodes/edge1"),
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    eventually(
        Duration::from_secs(15),
        "more output after the move",
        || (beats(&b) > before + 5).then_some(()),
    );
    let t = c.api("GET", &format!("/v1/tasks/{id}"), None).json();
    assert_eq!(t["status"], "RUNNING", "{t}");
    assert_eq!(t["node"], "edge1");
    let n = c.api("GET", "/v1/nodes/edge1", None).json();
    assert_eq!(n["status"], "READY", "{n}");
    // And the HTTP service, moved to the new leader, answers through
    // every live replica's ingress.
    eventually(
        Duration::from_secs(15),
        "the service through B and C",
        || {
            [&b, &c]
                .iter()
                .all(|s| {
                    let url = format!("{}/web/hi", s.ingress.as_deref().unwrap());
                    crate::edge::http_get(&url).0 == 200
                })
                .then_some(())
        },
    );
    let r = c.api("POST", &format!("/v1/tasks/{id}/stop"), None);
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(wait_stopped_on(&b, &id)["stop_code"], "UserStopped");
}

/// Replicas that serve TLS forward to each other over TLS, trusting the
/// CA they share (`--tls auto`'s, copied as the admin token is).
#[test]
fn replicas_with_tls_forward_to_each_other_over_tls() {
    let shared = Shared::new();
    let a = shared.start_with("a", &["--tls", "auto"]);
    let b = shared.start_with("b", &["--tls", "auto"]);
    assert!(b.base.starts_with("https://"), "{}", b.base);
    let ca = shared.data("a").join("tls/ca.pem");
    let cli = |s: &Server, args: &[&str]| {
        let ca = ["--ca-cert", ca.to_str().unwrap(), "--output", "json"];
        serde_json::from_str::<serde_json::Value>(&s.cli(&[args, &ca].concat())).unwrap()
    };
    let replicas = cli(&b, &["node", "replicas"]);
    let urls: Vec<&str> = replicas
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|r| r["api_url"].as_str())
        .collect();
    assert!(urls.iter().all(|u| u.starts_with("https://")), "{urls:?}");
    // B is a follower: the node listing is A's, forwarded over TLS.
    let nodes = cli(&b, &["node", "ls"]);
    assert_eq!(nodes[0]["name"], "a", "{nodes}");
    assert_eq!(cli(&b, &["service", "ls"]), json!([]));
    drop(a);
}
