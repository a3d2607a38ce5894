//! The control plane through the real server over HTTP: task definitions,
//! tasks, services, secrets, tokens, recovery after kill -9 and SIGTERM.

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use wharf_testkit::Target;

use crate::server::{Server, converged, events, eventually, register, service};

fn run(s: &Server, body: Value) -> Vec<String> {
    let r = s.api("POST", "/v1/tasks", Some(body));
    assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
    r.json()
        .as_array()
        .unwrap()
        .iter()
        .map(|t| {
            assert_eq!(t["status"], "PROVISIONING");
            t["id"].as_str().unwrap().to_owned()
        })
        .collect()
}

fn stopped(s: &Server, id: &str) -> Value {
    let r = s.api(
        "GET",
        &format!("/v1/tasks/{id}?wait_stopped_ms=20000"),
        None,
    );
    assert_eq!(r.status, 200);
    let t = r.json();
    assert_eq!(t["status"], "STOPPED", "{t}");
    t
}

fn logs(s: &Server, id: &str) -> Vec<String> {
    let r = s.api("GET", &format!("/v1/tasks/{id}/logs"), None);
    assert_eq!(r.status, 200);
    r.json()["lines"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["text"].as_str().unwrap().to_owned())
        .collect()
}

fn beat_def(family: &str) -> Value {
    json!({"family": family, "artifact": "team/beat:v1", "args": ["200"],
           "limits": {"memory": "32MiB"}})
}

#[test]
fn push_register_run_logs_describe() {
    let s = Server::start();
    s.push_sample("echo", Target::P1, "team/echo:v1");
    s.api(
        "POST",
        "/v1/secrets",
        Some(json!({"name": "db-password", "value": "s3cret"})),
    );
    let def = register(
        &s,
        json!({"family": "echo", "artifact": "team/echo:v1", "args": ["a", "b"],
               "env": {"GREETING": "hi"}, "secrets": {"DB_PASSWORD": "db-password"},
               "limits": {"fuel": 1_000_000_000u64, "memory": "64MiB", "timeout": "30s"}}),
    );
    assert_eq!(def["task_definition"], "echo:1");
    assert!(
        def["artifact_digest"]
            .as_str()
            .unwrap()
            .starts_with("sha256:")
    );
    assert_eq!(def["limits"]["memory_bytes"], 64 << 20);
    assert_eq!(def["limits"]["timeout_ms"], 30_000);

    let ids = run(
        &s,
        json!({"task_definition": "echo", "count": 2,
                             "overrides": {"env": {"EXTRA": "1"}}}),
    );
    assert_eq!(ids.len(), 2);
    for id in &ids {
        let t = stopped(&s, id);
        assert_eq!(t["stop_code"], "Completed");
        assert_eq!(t["exit_code"], 0);
        assert!(t["fuel_consumed"].as_u64().unwrap() > 0);
        assert!(t["peak_memory_bytes"].as_u64().unwrap() > 0);
        assert!(t["started_at"].is_string() && t["stopped_at"].is_string());
        let lines = logs(&s, id);
        assert_eq!(
            lines,
            [
                "args:",
                "a",
                "b",
                "env:",
                "DB_PASSWORD=s3cret",
                "EXTRA=1",
                "GREETING=hi"
            ]
        );
    }
    // The state (which holds secret values) is readable by its owner only
    // (on PostgreSQL, the database's own access control applies).
    #[cfg(unix)]
    if s.state_url().is_none() {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(s.data().join("state.db"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o077, 0, "state.db mode {mode:o}");
    }
    // The secret's value is in the task, never in the API's answers.
    let listed = s.api("GET", "/v1/secrets", None);
    assert!(!String::from_utf8_lossy(&listed.body).contains("s3cret"));
    assert_eq!(listed.json()[0]["name"], "db-password");

    // Listing filters by family and status.
    let r = s.api("GET", "/v1/tasks?family=echo&status=STOPPED", None);
    assert_eq!(r.json().as_array().unwrap().len(), 2);
    let r = s.api("GET", "/v1/tasks?family=nope", None);
    assert_eq!(r.json().as_array().unwrap().len(), 0);

    // A new registration is a new revision; the tag was pinned.
    let def2 = register(&s, json!({"family": "echo", "artifact": "team/echo:v1"}));
    assert_eq!(def2["revision"], 2);
    let r = s.api("GET", "/v1/taskdefs/echo", None);
    assert_eq!(r.json()["revision"], 2);
    let r = s.api("DELETE", "/v1/taskdefs/echo:2", None);
    assert_eq!(r.json()["status"], "INACTIVE");
    assert_eq!(
        s.api("GET", "/v1/taskdefs/echo", None).json()["revision"],
        1
    );
    let r = s.api(
        "POST",
        "/v1/tasks",
        Some(json!({"task_definition": "echo:2"})),
    );
    assert_eq!(
        (r.status, r.json()["code"].as_str()),
        (409, Some("Conflict"))
    );
}

#[test]
fn bad_input_gets_clear_errors() {
    let s = Server::start();
    s.push_sample("hello", Target::P1, "team/hello:v1");
    let check =
        |method: &str, path: &str, body: Option<Value>, status: u16, code: &str, words: &str| {
            let r = s.api(method, path, body);
            let j = r.json();
            assert_eq!(
                (r.status, j["code"].as_str().unwrap()),
                (status, code),
                "{j}"
            );
            assert!(
                j["message"].as_str().unwrap().contains(words),
                "{j} should say {words}"
            );
        };
    let def = |extra: Value| {
        let mut d = json!({"family": "hello", "artifact": "team/hello:v1"});
        d.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        Some(d)
    };
    check(
        "POST",
        "/v1/taskdefs",
        def(json!({"limits": {"memory": "lots"}})),
        422,
        "InvalidParameter",
        "limits.memory",
    );
    check(
        "POST",
        "/v1/taskdefs",
        def(json!({"limits": {"fuel": "x"}})),
        422,
        "InvalidParameter",
        "limits.fuel",
    );
    check(
        "POST",
        "/v1/taskdefs",
        def(json!({"family": "no spaces"})),
        422,
        "InvalidParameter",
        "family",
    );
    check(
        "POST",
        "/v1/taskdefs",
        def(json!({"colour": 1})),
        422,
        "InvalidParameter",
        "colour",
    );
    check(
        "POST",
        "/v1/taskdefs",
        def(json!({"artifact": "team/none:v1"})),
        422,
        "InvalidParameter",
        "artifact",
    );
    check(
        "POST",
        "/v1/taskdefs",
        def(json!({"secrets": {"PW": "missing"}})),
        422,
        "InvalidParameter",
        "secrets.PW",
    );
    check(
        "POST",
        "/v1/tasks",
        Some(json!({"task_definition": "ghost"})),
        404,
        "NotFound",
        "ghost",
    );
    check("GET", "/v1/tasks/0123", None, 404, "NotFound", "0123");
    check(
        "GET",
        "/v1/tasks?status=DONE",
        None,
        422,
        "InvalidParameter",
        "status",
    );
    check(
        "GET",
        "/v1/tasks?limit=x",
        None,
        400,
        "InvalidRequest",
        "limit",
    );
    check("GET", "/v1/services/ghost", None, 404, "NotFound", "ghost");
    check(
        "POST",
        "/v1/services",
        Some(json!({"name": "s", "task_definition": "ghost", "desired_count": 1})),
        404,
        "NotFound",
        "ghost",
    );
    let r = call_raw(&s, "POST", "/v1/taskdefs", "{not json");
    assert_eq!(
        (r.0, r.1["code"].as_str().unwrap()),
        (400, "InvalidRequest")
    );
    register(&s, json!({"family": "hello", "artifact": "team/hello:v1"}));
    check(
        "POST",
        "/v1/tasks",
        Some(json!({"task_definition": "hello", "count": 0})),
        422,
        "InvalidParameter",
        "count",
    );
    check(
        "POST",
        "/v1/tasks",
        Some(json!({"task_definition": "hello", "overrides": {"limits": {"memory": "9GiB"}}})),
        422,
        "InvalidParameter",
        "overrides.limits.memory",
    );
    check(
        "POST",
        "/v1/services",
        Some(
            json!({"name": "stuck", "task_definition": "hello", "desired_count": 3,
                    "minimum_healthy_percent": 100, "maximum_percent": 100}),
        ),
        422,
        "InvalidParameter",
        "no room",
    );
    let svc = json!({"name": "web", "task_definition": "hello", "desired_count": 0});
    assert_eq!(s.api("POST", "/v1/services", Some(svc.clone())).status, 201);
    check(
        "POST",
        "/v1/services",
        Some(svc),
        409,
        "Conflict",
        "already exists",
    );
}

fn call_raw(s: &Server, method: &str, path: &str, body: &str) -> (u16, Value) {
    let r = crate::server::call(
        s.req(method, path)
            .set("Content-Type", "application/json")
            .send_string(body),
    );
    (r.status, r.json())
}

#[test]
fn a_service_scales_3_5_1_and_is_deleted() {
    let s = Server::start();
    s.push_sample("heartbeat", Target::P1, "team/beat:v1");
    register(&s, beat_def("beat"));
    let r = s.api(
        "POST",
        "/v1/services",
        Some(json!({"name": "web", "task_definition": "beat", "desired_count": 3})),
    );
    assert_eq!(r.status, 201);
    assert_eq!(r.json()["task_definition"], "beat:1");
    converged(&s, "web", 3);
    for n in [5u64, 1] {
        let r = s.api(
            "PATCH",
            "/v1/services/web",
            Some(json!({"desired_count": n})),
        );
        assert_eq!(r.status, 200);
        converged(&s, "web", n);
        let running = s
            .api("GET", "/v1/tasks?service=web&status=RUNNING", None)
            .json();
        let kept = running.as_array().unwrap().iter();
        let kept = kept.filter(|t| t["desired_status"] == "RUNNING").count();
        assert_eq!(kept as u64, n);
    }
    // The tasks scaled away stopped as ScaledDown, and the service's own
    // events tell the story.
    let down = eventually(Duration::from_secs(10), "4 stopped tasks", || {
        let down = s
            .api("GET", "/v1/tasks?service=web&status=STOPPED", None)
            .json();
        let down = down.as_array().unwrap().clone();
        (down.len() == 4).then_some(down)
    });
    assert!(
        down.iter().all(|t| t["stop_code"] == "ScaledDown"),
        "{down:?}"
    );
    let ev = events(&s, "web");
    assert!(
        ev.iter().any(|e| e.contains("has reached a steady state")),
        "{ev:?}"
    );
    assert!(
        ev.iter()
            .any(|e| e.contains("desired count changed from 5 to 1")),
        "{ev:?}"
    );
    // Service tasks keep logging while they run.
    let id = s
        .api("GET", "/v1/tasks?service=web&status=RUNNING", None)
        .json()[0]["id"]
        .as_str()
        .unwrap()
        .to_owned();
    eventually(Duration::from_secs(5), "a heartbeat line", || {
        logs(&s, &id)
            .iter()
            .any(|l| l.starts_with("heartbeat"))
            .then_some(())
    });

    let r = s.api("DELETE", "/v1/services/web", None);
    assert_eq!(r.json()["status"], "DRAINING");
    eventually(Duration::from_secs(10), "the service to go", || {
        (s.api("GET", "/v1/services/web", None).status == 404).then_some(())
    });
    assert_eq!(s.api("GET", "/v1/services", None).json(), json!([]));
    // Removed only once its tasks had stopped.
    let tasks = s
        .api("GET", "/v1/tasks?service=web&limit=1000", None)
        .json();
    let tasks = tasks.as_array().unwrap();
    assert_eq!(tasks.len(), 5); // 3, then 2 more for 5
    assert!(tasks.iter().all(|t| t["status"] == "STOPPED"), "{tasks:?}");
}

#[test]
fn a_rolling_deployment_replaces_every_task_and_a_failing_one_rolls_back() {
    let s = Server::start();
    s.push_sample("heartbeat", Target::P1, "team/beat:v1");
    s.push_sample("exitcode", Target::P1, "team/exit:v1");
    register(&s, beat_def("beat"));
    register(&s, beat_def("beat")); // beat:2, same program, new revision
    let r = s.api(
        "POST",
        "/v1/services",
        Some(
            json!({"name": "api", "task_definition": "beat:1", "desired_count": 2,
                    "minimum_healthy_percent": 50, "maximum_percent": 100}),
        ),
    );
    assert_eq!(r.status, 201);
    converged(&s, "api", 2);
    let r = s.api(
        "PATCH",
        "/v1/services/api",
        Some(json!({"task_definition": "beat:2"})),
    );
    let deployments = r.json()["deployments"].clone();
    assert_eq!(deployments[0]["status"], "PRIMARY");
    assert_eq!(deployments[0]["task_definition"], "beat:2");
    assert_eq!(deployments[1]["status"], "ACTIVE");
    let svc = converged(&s, "api", 2);
    assert_eq!(svc["task_definition"], "beat:2");
    let running = s
        .api("GET", "/v1/tasks?service=api&status=RUNNING", None)
        .json();
    assert!(
        running
            .as_array()
            .unwrap()
            .iter()
            .all(|t| t["task_definition"] == "beat:2")
    );

    // A revision whose tasks exit at once trips the circuit breaker and the
    // service goes back to beat:2.
    register(&s, json!({"family": "beat", "artifact": "team/exit:v1"}));
    let r = s.api(
        "PATCH",
        "/v1/services/api",
        Some(json!({"task_definition": "beat:3"})),
    );
    assert_eq!(r.status, 200);
    let deadline = Instant::now() + Duration::from_secs(30);
    let ev = loop {
        let ev = events(&s, "api");
        if ev.iter().any(|e| e.contains("rolling back to beat:2")) {
            break ev;
        }
        assert!(
            Instant::now() < deadline,
            "no rollback; events: {ev:#?}\nservice: {}\ntasks: {}",
            service(&s, "api"),
            s.api("GET", "/v1/tasks?service=api&limit=50", None).json()
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(
        ev.iter().any(|e| e.contains("failed: NonZeroExit")),
        "{ev:?}"
    );
    let svc = converged(&s, "api", 2);
    assert_eq!(svc["task_definition"], "beat:2");
}

#[test]
fn a_crash_looping_service_backs_off_and_records_events() {
    let s = Server::start();
    s.push_sample("exitcode", Target::P1, "team/exit:v1");
    register(
        &s,
        json!({"family": "crash", "artifact": "team/exit:v1", "args": ["7"]}),
    );
    s.api(
        "POST",
        "/v1/services",
        Some(json!({"name": "loop", "task_definition": "crash", "desired_count": 1})),
    );
    // Backoff starts at 1 s and doubles: in 4 s there are a handful of
    // attempts, where an unthrottled loop would start thousands.
    std::thread::sleep(Duration::from_secs(4));
    let tasks = s
        .api("GET", "/v1/tasks?service=loop&limit=1000", None)
        .json();
    let n = tasks.as_array().unwrap().len();
    assert!(
        (3..=8).contains(&n),
        "{n} attempts in 4 s: {:?}",
        events(&s, "loop")
    );
    assert!(
        tasks
            .as_array()
            .unwrap()
            .iter()
            .all(|t| t["status"] != "STOPPED" || t["exit_code"] == 7)
    );
    let ev = events(&s, "loop");
    assert!(
        ev.iter().any(|e| e.contains("failed: NonZeroExit")),
        "{ev:?}"
    );
    let delays: Vec<&String> = ev
        .iter()
        .filter(|e| e.contains("is restarting tasks in"))
        .collect();
    assert!(
        delays
            .iter()
            .any(|e| e.contains("in 1s after 2 consecutive failures")),
        "{ev:?}"
    );
    assert!(
        delays
            .iter()
            .any(|e| e.contains("in 2s after 3 consecutive failures")),
        "{ev:?}"
    );
    let svc = service(&s, "loop");
    assert_eq!(svc["running_count"], 0);
}

#[test]
fn kill_9_and_restart_recover_state_and_services() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let s = Server::start_in(&data);
    s.push_sample("heartbeat", Target::P1, "team/beat:v1");
    register(&s, beat_def("beat"));
    s.api(
        "POST",
        "/v1/secrets",
        Some(json!({"name": "k", "value": "v"})),
    );
    let token = s
        .api(
            "POST",
            "/v1/tokens",
            Some(json!({"name": "ci", "role": "reader"})),
        )
        .json()["secret"]
        .as_str()
        .unwrap()
        .to_owned();
    let lone = run(&s, json!({"task_definition": "beat"})).remove(0);
    let done = run(
        &s,
        json!({"task_definition": "beat", "overrides": {"args": ["1", "2"]}}),
    )
    .remove(0);
    stopped(&s, &done);
    s.api(
        "POST",
        "/v1/services",
        Some(json!({"name": "web", "task_definition": "beat", "desired_count": 2})),
    );
    let before = converged(&s, "web", 2);
    let old_tasks = s
        .api("GET", "/v1/tasks?service=web&status=RUNNING", None)
        .json();
    eventually(Duration::from_secs(5), "the lone task to run", || {
        (s.api("GET", &format!("/v1/tasks/{lone}"), None).json()["status"] == "RUNNING")
            .then_some(())
    });
    s.kill9();

    let s = Server::start_in(&data);
    // Everything known before is known after.
    assert_eq!(s.api("GET", "/v1/taskdefs/beat:1", None).status, 200);
    assert_eq!(s.api("GET", "/v1/secrets", None).json()[0]["name"], "k");
    assert_eq!(s.api_as(&token, "GET", "/v1/tasks", None).status, 200);
    let t = s.api("GET", &format!("/v1/tasks/{done}"), None).json();
    assert_eq!(
        (t["status"].as_str(), t["stop_code"].as_str()),
        (Some("STOPPED"), Some("Completed"))
    );
    // Running tasks died with the node.
    let t = s.api("GET", &format!("/v1/tasks/{lone}"), None).json();
    assert_eq!(
        (t["status"].as_str(), t["stop_code"].as_str()),
        (Some("STOPPED"), Some("NodeLost"))
    );
    for old in old_tasks.as_array().unwrap() {
        let t = s
            .api(
                "GET",
                &format!("/v1/tasks/{}", old["id"].as_str().unwrap()),
                None,
            )
            .json();
        assert_eq!(t["stop_code"], "NodeLost");
    }
    // The service comes back to its desired count with new tasks.
    let after = converged(&s, "web", 2);
    assert_eq!(after["created_at"], before["created_at"]);
    let ev = events(&s, "web");
    assert!(ev.iter().any(|e| e.contains("NodeLost")), "{ev:?}");
}

#[test]
fn sigterm_stops_tasks_with_a_recorded_reason() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let s = Server::start_in(&data);
    s.push_sample("heartbeat", Target::P1, "team/beat:v1");
    register(&s, beat_def("beat"));
    let id = run(&s, json!({"task_definition": "beat"})).remove(0);
    eventually(Duration::from_secs(5), "the task to run", || {
        (s.api("GET", &format!("/v1/tasks/{id}"), None).json()["status"] == "RUNNING").then_some(())
    });
    // A client following the task's logs does not hold the shutdown up.
    let follower = s
        .req("GET", &format!("/v1/tasks/{id}/logs?follow=true"))
        .call()
        .unwrap();
    let status = s.terminate();
    assert!(status.success(), "{status:?}");
    let streamed = std::io::read_to_string(follower.into_reader()).unwrap_or_default();
    assert!(streamed.contains("heartbeat 0"), "{streamed}");
    let s = Server::start_in(&data);
    let t = s.api("GET", &format!("/v1/tasks/{id}"), None).json();
    assert_eq!(t["stop_code"], "UserStopped", "{t}");
    assert_eq!(t["message"], "the server shut down");
    assert!(logs(&s, &id).iter().any(|l| l == "heartbeat 0"));
}

#[test]
fn stopping_a_task_and_following_its_logs() {
    let s = Server::start();
    s.push_sample("heartbeat", Target::P1, "team/beat:v1");
    register(
        &s,
        json!({"family": "beat", "artifact": "team/beat:v1", "args": ["20"]}),
    );
    let id = run(&s, json!({"task_definition": "beat"})).remove(0);
    // Follow: lines arrive while the task runs.
    let r = s
        .req("GET", &format!("/v1/tasks/{id}/logs?follow=true"))
        .call()
        .unwrap();
    assert_eq!(r.header("content-type"), Some("application/x-ndjson"));
    let mut lines = std::io::BufRead::lines(std::io::BufReader::new(r.into_reader()));
    for n in 0..3 {
        let line: Value = serde_json::from_str(&lines.next().unwrap().unwrap()).unwrap();
        assert_eq!(line["text"], format!("heartbeat {n}"));
        assert_eq!(line["stream"], "stdout");
        assert_eq!(line["seq"], n);
    }
    let r = s.api("POST", &format!("/v1/tasks/{id}/stop?reason=enough"), None);
    assert_eq!(r.json()["desired_status"], "STOPPED");
    let t = stopped(&s, &id);
    assert_eq!(
        (t["stop_code"].as_str(), t["message"].as_str()),
        (Some("UserStopped"), Some("enough"))
    );
    // The follow stream ends once the task stopped.
    assert!(lines.count() < 10_000);
    // Pages continue where the last ended.
    let page = s
        .api("GET", &format!("/v1/tasks/{id}/logs?from=1&limit=1"), None)
        .json();
    assert_eq!(page["lines"][0]["text"], "heartbeat 1");
    assert_eq!(page["next_seq"], 2);
}

#[test]
fn the_auth_matrix_holds_and_mutations_are_audited() {
    let s = Server::start();
    s.push_sample("hello", Target::P1, "team/hello:v1");
    register(&s, json!({"family": "hello", "artifact": "team/hello:v1"}));
    let mut tokens = std::collections::HashMap::new();
    for role in ["reader", "deployer", "admin"] {
        let r = s.api(
            "POST",
            "/v1/tokens",
            Some(json!({"name": role, "role": role})),
        );
        assert_eq!(r.status, 201);
        tokens.insert(role, r.json()["secret"].as_str().unwrap().to_owned());
    }
    let scoped = s
        .api(
            "POST",
            "/v1/tokens",
            Some(json!({"name": "other", "role": "deployer", "repositories": ["other/*"]})),
        )
        .json();
    let run_body = json!({"task_definition": "hello"});
    // (token, GET tasks, POST tasks, GET tokens, registry catalog, registry pull)
    let expect: [(&str, u16, u16, u16, u16, u16); 4] = [
        ("", 401, 401, 401, 401, 401),
        ("reader", 200, 403, 403, 200, 200),
        ("deployer", 200, 201, 403, 200, 200),
        ("admin", 200, 201, 200, 200, 200),
    ];
    for (role, list, run_status, tokens_status, catalog, pull) in expect {
        let token = if role.is_empty() {
            ""
        } else {
            tokens[role].as_str()
        };
        let got = (
            s.api_as(token, "GET", "/v1/tasks", None).status,
            s.api_as(token, "POST", "/v1/tasks", Some(run_body.clone()))
                .status,
            s.api_as(token, "GET", "/v1/tokens", None).status,
            registry_status(&s, token, "GET", "/v2/_catalog"),
            registry_status(&s, token, "GET", "/v2/team/hello/manifests/v1"),
        );
        assert_eq!(
            got,
            (list, run_status, tokens_status, catalog, pull),
            "role {role:?}"
        );
    }
    // Registry push needs deployer, and a scoped token stays in its scope.
    let blob = "/v2/team/hello/blobs/uploads/";
    assert_eq!(registry_status(&s, &tokens["reader"], "POST", blob), 403);
    assert_eq!(registry_status(&s, &tokens["deployer"], "POST", blob), 202);
    let scoped_secret = scoped["secret"].as_str().unwrap();
    assert_eq!(registry_status(&s, scoped_secret, "POST", blob), 403);
    assert_eq!(
        registry_status(&s, scoped_secret, "POST", "/v2/other/app/blobs/uploads/"),
        202
    );
    // Nor may it register a task definition that runs another repository's code.
    let r = s.api_as(
        scoped_secret,
        "POST",
        "/v1/taskdefs",
        Some(json!({"family": "sneak", "artifact": "team/hello:v1"})),
    );
    assert_eq!(
        (r.status, r.json()["code"].as_str()),
        (403, Some("AccessDenied"))
    );
    // Every /v1/ and /v2/ route wants a token; /healthz and /metrics do not.
    for path in [
        "/v1/taskdefs",
        "/v1/services",
        "/v1/secrets",
        "/v1/audit",
        "/v1/openapi.json",
        "/v2/",
    ] {
        assert_eq!(s.api_as("", "GET", path, None).status, 401, "{path}");
    }
    assert_eq!(s.api_as("", "GET", "/healthz", None).status, 200);
    // Revoked tokens stop working at once.
    let id = scoped["token"]["id"].as_str().unwrap();
    assert_eq!(
        s.api("DELETE", &format!("/v1/tokens/{id}"), None).status,
        200
    );
    assert_eq!(
        s.api_as(scoped_secret, "GET", "/v1/tasks", None).status,
        401
    );
    let listed = s.api("GET", "/v1/tokens", None);
    assert!(!String::from_utf8_lossy(&listed.body).contains(scoped_secret));
    // The audit log says who did what.
    let audit = s.api("GET", "/v1/audit?limit=1000", None).json();
    let entries = audit.as_array().unwrap();
    let seen = |actor: &str, method: &str, path: &str, status: u64| {
        entries.iter().any(|e| {
            e["actor"] == actor
                && e["method"] == method
                && e["path"] == path
                && e["status"] == status
        })
    };
    assert!(seen("deployer", "POST", "/v1/tasks", 201), "{audit}");
    assert!(seen("reader", "POST", "/v1/tasks", 403), "{audit}");
    // Unauthenticated calls are counted, not audited.
    assert!(!entries.iter().any(|e| e["status"] == 401), "{audit}");
    assert!(seen("admin", "POST", "/v1/tokens", 201), "{audit}");
    assert!(
        seen("other", "POST", "/v2/team/hello/blobs/uploads/", 403),
        "{audit}"
    );
    assert_eq!(
        s.api_as(&tokens["deployer"], "GET", "/v1/audit", None)
            .status,
        403
    );
}

fn registry_status(s: &Server, token: &str, method: &str, path: &str) -> u16 {
    let mut r = ureq::request(method, &format!("{}{path}", s.base));
    if !token.is_empty() {
        r = r.set("Authorization", &format!("Bearer {token}"));
    }
    crate::server::call(r.call()).status
}

#[test]
fn metrics_and_the_openapi_document_match_the_server() {
    let s = Server::start();
    s.push_sample("hello", Target::P1, "team/hello:v1");
    register(&s, json!({"family": "hello", "artifact": "team/hello:v1"}));
    let id = run(&s, json!({"task_definition": "hello"})).remove(0);
    stopped(&s, &id);
    s.api(
        "POST",
        "/v1/services",
        Some(json!({"name": "idle", "task_definition": "hello", "desired_count": 0})),
    );
    let metrics = String::from_utf8(s.api_as("", "GET", "/metrics", None).body).unwrap();
    for needle in [
        "wharf_task_stops_total{stop_code=\"Completed\"} 1",
        "wharf_task_starts_total 1",
        "wharf_task_duration_seconds_count 1",
        "wharf_task_start_latency_seconds_count 1",
        "wharf_task_instantiate_seconds_count 1",
        "wharf_tasks{status=\"RUNNING\"} 0",
        "wharf_registry_bytes_total{direction=\"in\"}",
        "wharf_service_desired_tasks{service=\"idle\"} 0",
        "wharf_service_running_tasks{service=\"idle\"} 0",
        "wharf_api_request_duration_seconds_count{method=\"POST\",route=\"/v1/tasks\",status=\"201\"} 1",
    ] {
        assert!(
            metrics.contains(needle),
            "/metrics lacks {needle}:\n{metrics}"
        );
    }
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("wharf_task_fuel_consumed_total ") && !l.ends_with(" 0"))
    );

    // Every documented operation is routed (no 405, no route-less 404).
    let doc = s.api("GET", "/v1/openapi.json", None).json();
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
    let paths = doc["paths"].as_object().unwrap();
    assert!(paths.len() >= 13, "{}", paths.len());
    for (path, item) in paths {
        for method in item.as_object().unwrap().keys() {
            let concrete = path.replace("{name}", "x").replace("{id}", "x");
            let r = s.api(&method.to_uppercase(), &concrete, None);
            assert_ne!(r.status, 405, "{method} {path}");
            if r.status == 404 {
                let message = r.json()["message"].as_str().unwrap().to_owned();
                assert!(!message.contains("no such route"), "{method} {path}");
            }
        }
    }
    let r = s.api("GET", "/v1/nowhere", None);
    assert_eq!(r.status, 404);
}
