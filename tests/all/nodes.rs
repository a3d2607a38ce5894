//! Nodes as resources through the real server: the server's own node is
//! listed with its capacity, engine and WASI interfaces, and an admin's
//! drain stops new tasks from starting on it (surviving a restart) until
//! it is activated.

use std::process::Command;

use serde_json::json;
use wharf_testkit::Target;

use crate::server::Server;

fn wharf(s: &Server, token: &str, args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_wharf"))
        .args(args)
        .env("WHARF_SERVER", &s.base)
        .env("WHARF_TOKEN", token)
        .output()
        .unwrap()
}

fn token(s: &Server, role: &str) -> String {
    let r = s.api(
        "POST",
        "/v1/tokens",
        Some(json!({"name": role, "role": role})),
    );
    assert_eq!(r.status, 201, "{r:?}");
    r.json()["secret"].as_str().unwrap().to_owned()
}

#[test]
fn the_local_node_is_listed_and_an_admin_drain_stops_new_tasks_until_activated() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let flags = [
        "--node-labels",
        "zone=eu-west-1a,disk=ssd",
        "--memory-budget",
        "1GiB",
    ];
    let s = Server::start_with(&data, &flags);
    let r = s.api("GET", "/v1/nodes/local", None);
    assert_eq!(r.status, 200, "{r:?}");
    let node = r.json();
    assert_eq!(node["status"], "READY");
    assert_eq!(node["local"], true);
    assert_eq!(node["labels"], json!({"zone": "eu-west-1a", "disk": "ssd"}));
    assert!(node["capacity"]["slots"].as_u64().unwrap() > 0, "{node}");
    assert_eq!(node["capacity"]["memory_bytes"], 1u64 << 30);
    assert_eq!(node["free"]["memory_bytes"], 1u64 << 30);
    assert_eq!(node["engine_version"], "wasmtime 48.0.8");
    assert_eq!(node["compatibility_hash"].as_str().unwrap().len(), 16);
    assert_eq!(node["arch"], std::env::consts::ARCH);
    let wasi: Vec<&str> = node["wasi_interfaces"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert!(wasi.contains(&"wasi:http/incoming-handler"), "{wasi:?}");
    assert!(wasi.contains(&"wasi_snapshot_preview1"), "{wasi:?}");
    assert_eq!(s.api("GET", "/v1/nodes/elsewhere", None).status, 404);

    let out = wharf(&s, &s.token, &["node", "ls"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    assert!(text.contains("local") && text.contains("READY"), "{text}");

    // Readers see nodes; only admins drain them.
    let reader = token(&s, "reader");
    let deployer = token(&s, "deployer");
    assert_eq!(s.api_as(&reader, "GET", "/v1/nodes", None).status, 200);
    assert_eq!(
        s.api_as(&deployer, "POST", "/v1/nodes/local/drain", None)
            .status,
        403
    );
    let out = wharf(&s, &s.token, &["node", "drain", "local"]);
    assert!(out.status.success(), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("DRAINING"));

    // A draining node starts nothing new, and says why.
    s.push_sample("hello", Target::P1, "team/hello:v1");
    let r = s.api(
        "POST",
        "/v1/taskdefs",
        Some(json!({"family": "hello", "artifact": "team/hello:v1"})),
    );
    assert_eq!(r.status, 201);
    let run = |s: &Server| {
        let r = s.api(
            "POST",
            "/v1/tasks",
            Some(json!({"task_definition": "hello"})),
        );
        assert_eq!(r.status, 201, "{r:?}");
        let id = r.json()[0]["id"].as_str().unwrap().to_owned();
        s.wait_stopped(&id)
    };
    let t = run(&s);
    assert_eq!(t["stop_code"], "FailedToStart", "{t}");
    assert!(
        t["message"].as_str().unwrap().contains("local is DRAINING"),
        "{t}"
    );

    // The drain survives a restart.
    s.terminate();
    let s = Server::start_with(&data, &flags);
    assert_eq!(
        s.api("GET", "/v1/nodes/local", None).json()["status"],
        "DRAINING"
    );
    let out = wharf(&s, &s.token, &["node", "activate", "local"]);
    assert!(out.status.success(), "{out:?}");
    let t = run(&s);
    assert_eq!(t["stop_code"], "Completed", "{t}");
}

#[test]
fn placement_constraints_are_checked_against_the_nodes_labels() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start_with(
        &dir.path().join("data"),
        &["--node-labels", "region=eu-west,zone=a"],
    );
    s.push_sample("hello", Target::P1, "team/hello:v1");
    let register = |family: &str, constraints: serde_json::Value| {
        s.api(
            "POST",
            "/v1/taskdefs",
            Some(json!({"family": family, "artifact": "team/hello:v1",
                        "placement": {"constraints": constraints}})),
        )
    };
    // A malformed constraint names its field.
    let r = register("bad", json!(["region = eu-west"]));
    assert_eq!(r.status, 422, "{r:?}");
    assert!(
        r.json()["message"]
            .as_str()
            .unwrap()
            .starts_with("placement.constraints")
    );
    let r = register(
        "fits",
        json!(["region == eu-west", "zone in [a, b]", "disk != hdd"]),
    );
    assert_eq!(r.status, 201, "{r:?}");
    assert_eq!(
        r.json()["placement_constraints"].as_array().unwrap().len(),
        3
    );
    assert_eq!(
        register("elsewhere", json!(["region == us-east"])).status,
        201
    );
    let run = |family: &str| {
        let r = s.api(
            "POST",
            "/v1/tasks",
            Some(json!({"task_definition": family})),
        );
        assert_eq!(r.status, 201, "{r:?}");
        s.wait_stopped(r.json()[0]["id"].as_str().unwrap())
    };
    assert_eq!(run("fits")["stop_code"], "Completed");
    let t = run("elsewhere");
    assert_eq!(t["stop_code"], "FailedToStart", "{t}");
    let message = t["message"].as_str().unwrap();
    assert!(message.contains("region == us-east"), "{message}");
    assert!(message.contains("region=eu-west"), "{message}");
}

#[test]
fn a_task_whose_artifact_imports_what_no_node_provides_is_refused_by_name() {
    let s = Server::start();
    // A core module that needs wasi-nn, which no Wharf node provides.
    let wat = r#"(module
        (import "wasi_ephemeral_nn" "load" (func (param i32 i32 i32 i32 i32) (result i32)))
        (memory (export "memory") 1)
        (func (export "_start")))"#;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("nn.wasm");
    std::fs::write(&file, wat::parse_str(wat).unwrap()).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_wharf"))
        .arg("push")
        .arg(&file)
        .arg(format!("{}/team/nn:v1", s.host()))
        .env("WHARF_TOKEN", &s.token)
        .env("WHARF_SERVER", &s.base)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let r = s.api(
        "POST",
        "/v1/taskdefs",
        Some(json!({"family": "nn", "artifact": "team/nn:v1"})),
    );
    assert_eq!(r.status, 201, "{r:?}");
    assert_eq!(
        r.json()["requires_interfaces"],
        json!(["wasi_ephemeral_nn"])
    );
    let r = s.api("POST", "/v1/tasks", Some(json!({"task_definition": "nn"})));
    assert_eq!(r.status, 201, "{r:?}");
    let t = s.wait_stopped(r.json()[0]["id"].as_str().unwrap());
    assert_eq!(t["stop_code"], "FailedToStart", "{t}");
    assert_eq!(
        t["message"],
        "no READY node provides wasi_ephemeral_nn (the artifact imports it)"
    );
}

/// `--slots` sizes the instance pool, not just the node's admission: a
/// node given more slots than the default pool (1,000) runs that many
/// tasks at once (before, the slots were capped at the pool's size and
/// the tasks beyond it waited `PENDING`); a value past what any pool can
/// hold is refused by name.
#[test]
fn slots_beyond_the_default_pool_run_that_many_tasks_at_once() {
    let out = Command::new(env!("CARGO_BIN_EXE_wharf"))
        .args(["server", "--slots", "100001"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("--slots") && err.contains("must be at most 100000"),
        "{err}"
    );

    let dir = tempfile::tempdir().unwrap();
    let tasks = 1_100u64;
    let s = Server::start_with(
        &dir.path().join("data"),
        &["--slots", "1100", "--memory-budget", "8GiB"],
    );
    let node = s.api("GET", "/v1/nodes/local", None).json();
    assert_eq!(node["capacity"]["slots"], tasks, "{node}");
    s.push_sample("heartbeat", Target::P1, "team/beat:v1");
    crate::server::register(
        &s,
        json!({"family": "beat", "artifact": "team/beat:v1", "args": ["1000"],
               "limits": {"memory": "4MiB"}}),
    );
    let r = s.api(
        "POST",
        "/v1/services",
        Some(json!({"name": "many", "task_definition": "beat", "desired_count": tasks})),
    );
    assert_eq!(r.status, 201, "{r:?}");
    crate::server::eventually(std::time::Duration::from_secs(120), "1,100 running", || {
        let svc = crate::server::service(&s, "many");
        (svc["running_count"] == tasks).then_some(())
    });
    let node = s.api("GET", "/v1/nodes/local", None).json();
    assert_eq!(node["free"]["slots"], 0, "{node}");
}

/// `--slots 0` (as `WHARF_SLOTS=0` in an installed unit may say) is the
/// default in full: 1,000 slots and a guest thread per core, not the one
/// guest thread "at most the slots" would leave.
#[test]
fn slots_zero_is_the_default_slots_and_guest_threads() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start_with(&dir.path().join("data"), &["--slots", "0"]);
    let node = s.api("GET", "/v1/nodes/local", None).json();
    assert_eq!(node["capacity"]["slots"], 1_000, "{node}");
    let guests = std::fs::read_dir(format!("/proc/{}/task", s.pid()))
        .unwrap()
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .filter(|name| name.trim() == "wharf-guest")
        .count();
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    assert_eq!(guests, cores);
}
