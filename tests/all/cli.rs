//! The client commands (`wharf taskdef`, `task`, `service`, `secret`,
//! `token`, `audit`) against a real server: their JSON is the API's, their
//! text is tables and blocks, API errors reach the user as `CODE: message`.

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use wharf_testkit::{Target, wasm};

use crate::server::Server;

/// The longest one command may take; a hung command fails the test.
const COMMAND_DEADLINE: Duration = Duration::from_secs(60);

/// How long a test waits for the server to reach a state.
const STATE_DEADLINE: Duration = Duration::from_secs(20);

/// What one `wharf` invocation did.
#[derive(Debug)]
struct Out {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Out {
    /// Asserts success and returns stdout.
    fn ok(&self) -> &str {
        assert_eq!(self.code, 0, "{self:#?}");
        &self.stdout
    }

    /// Asserts success and parses stdout as one JSON document.
    fn json(&self) -> Value {
        serde_json::from_str(self.ok())
            .unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {self:#?}"))
    }

    /// Asserts the command failed the way `wharf` reports errors.
    fn fails_with(&self, text: &str) {
        assert_eq!(self.code, 2, "{self:#?}");
        assert!(self.stderr.contains(text), "{self:#?}");
    }
}

/// Runs `wharf ARGS` with `token` (or none) against `server`, with stdin.
fn wharf_as(server: &Server, token: Option<&str>, args: &[&str], stdin: &[u8]) -> Out {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_wharf"));
    cmd.args(args)
        .env("WHARF_SERVER", &server.base)
        .env_remove("WHARF_TOKEN")
        .env_remove("WHARF_DATA_DIR")
        .env_remove("WHARF_LOG")
        .env_remove("RUST_LOG")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if let Some(token) = token {
        cmd.env("WHARF_TOKEN", token);
    }
    let mut child = cmd.spawn().expect("spawn wharf");
    let mut input = child.stdin.take().unwrap();
    std::io::Write::write_all(&mut input, stdin).unwrap();
    drop(input);
    let read = |mut pipe: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut text = String::new();
            pipe.read_to_string(&mut text).unwrap();
            text
        })
    };
    let stdout = read(Box::new(child.stdout.take().unwrap()));
    let stderr = read(Box::new(child.stderr.take().unwrap()));
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if started.elapsed() > COMMAND_DEADLINE {
            let _ = child.kill();
            panic!("wharf {args:?} did not finish in {COMMAND_DEADLINE:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Out {
        code: status.code().expect("wharf exited, not killed"),
        stdout: stdout.join().unwrap(),
        stderr: stderr.join().unwrap(),
    }
}

/// Runs `wharf ARGS` with the admin token.
fn wharf(server: &Server, args: &[&str]) -> Out {
    wharf_as(server, Some(&server.token), args, b"")
}

/// Pushes a sample to the server's registry as `team/NAME:v1`.
fn push(server: &Server, sample: &str) -> String {
    let file = wasm(sample, Target::P1);
    let reference = format!("{}/team/{sample}:v1", server.host());
    wharf(server, &["push", file.to_str().unwrap(), &reference]).ok();
    format!("team/{sample}:v1")
}

/// Writes `text` to a file in `dir` and returns its path.
fn file(dir: &tempfile::TempDir, name: &str, text: &str) -> String {
    let path = dir.path().join(name);
    std::fs::write(&path, text).unwrap();
    path.to_str().unwrap().to_owned()
}

/// Registers `family` running `artifact` with the given extra TOML.
fn register(server: &Server, dir: &tempfile::TempDir, family: &str, artifact: &str, extra: &str) {
    let toml = format!("family = \"{family}\"\nartifact = \"{artifact}\"\n{extra}");
    let path = file(dir, &format!("{family}.toml"), &toml);
    let def = wharf(server, &["taskdef", "register", &path, "--output", "json"]).json();
    assert_eq!(def["family"], family);
}

/// Asks `wharf ARGS --output json` until `done` accepts the answer.
fn poll(server: &Server, args: &[&str], done: impl Fn(&Value) -> bool) -> Value {
    let started = Instant::now();
    loop {
        let mut all = args.to_vec();
        all.extend(["--output", "json"]);
        let answer = wharf(server, &all).json();
        if done(&answer) {
            return answer;
        }
        assert!(
            started.elapsed() < STATE_DEADLINE,
            "wharf {args:?} never reached the expected state: {answer:#}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn taskdef_register_run_wait_ls_and_logs() {
    let s = Server::start();
    let dir = tempfile::tempdir().unwrap();
    let hello = push(&s, "hello");

    let toml = format!(
        "family = \"hello\"\nartifact = \"{hello}\"\n[env]\nGREETING = \"hi\"\n[limits]\nmemory = \"64MiB\"\ntimeout = \"5s\"\n"
    );
    let path = file(&dir, "hello.toml", &toml);
    let text = wharf(&s, &["taskdef", "register", &path]).ok().to_owned();
    assert!(text.contains("task definition: hello:1"), "{text}");
    assert!(text.contains("GREETING=hi"), "{text}");

    // A typo is caught locally, naming the file and the field.
    let bad = file(&dir, "bad.toml", &format!("{toml}colour = 1\n"));
    let out = wharf(&s, &["taskdef", "register", &bad]);
    out.fails_with("colour");
    assert!(out.stderr.contains("bad.toml"), "{out:#?}");
    // The server's validation comes back as `CODE: field: message`.
    let bad = file(
        &dir,
        "bad2.toml",
        &format!("family = \"x\"\nartifact = \"{hello}\"\n[limits]\nmemory = \"lots\"\n"),
    );
    wharf(&s, &["taskdef", "register", &bad])
        .fails_with("wharf: InvalidParameter: limits.memory: ");

    let defs = wharf(&s, &["taskdef", "ls", "--output", "json"]).json();
    assert_eq!(defs.as_array().unwrap().len(), 1, "{defs:#}");
    assert_eq!(defs[0]["task_definition"], "hello:1");
    assert_eq!(defs[0]["limits"]["memory_bytes"], 64 << 20);
    let table = wharf(&s, &["taskdef", "ls"]).ok().to_owned();
    assert!(table.starts_with("TASKDEF"), "{table}");
    assert!(table.contains("hello:1"), "{table}");
    let def = wharf(&s, &["taskdef", "describe", "hello", "--output", "json"]).json();
    assert_eq!(def["status"], "ACTIVE");

    // Run and wait: the task's ending is printed and is the exit status.
    let text = wharf(&s, &["task", "run", "hello", "--wait"])
        .ok()
        .to_owned();
    assert!(text.contains("stop code:       Completed"), "{text}");
    let stopped = wharf(
        &s,
        &["task", "run", "hello:1", "--wait", "--output", "json"],
    )
    .json();
    assert_eq!(stopped[0]["status"], "STOPPED");
    assert_eq!(stopped[0]["exit_code"], 0);
    // A limit that stops it gives the same exit status as `wharf run`.
    let out = wharf(&s, &["task", "run", "hello", "--wait", "--fuel", "10"]);
    assert_eq!(out.code, 134, "{out:#?}");
    assert!(out.stdout.contains("OutOfFuel"), "{out:#?}");

    let tasks = wharf(
        &s,
        &[
            "task", "ls", "--family", "hello", "--status", "STOPPED", "--output", "json",
        ],
    )
    .json();
    let tasks = tasks.as_array().unwrap();
    assert_eq!(tasks.len(), 3, "{tasks:#?}");
    let completed = tasks
        .iter()
        .find(|t| t["stop_code"] == "Completed")
        .unwrap();
    assert_eq!(completed["exit_code"], 0);
    assert_eq!(completed["task_definition"], "hello:1");
    let id = completed["id"].as_str().unwrap();
    assert_eq!(id.len(), 32);
    let table = wharf(&s, &["task", "ls"]).ok().to_owned();
    let header = table.lines().next().unwrap();
    for column in ["ID", "TASKDEF", "STATUS", "STOP CODE", "EXIT", "STARTED"] {
        assert!(header.contains(column), "{table}");
    }
    assert!(table.contains(id), "{table}");
    let text = wharf(&s, &["task", "describe", id]).ok().to_owned();
    assert!(text.contains(&format!("id:              {id}")), "{text}");

    let logs = wharf(&s, &["task", "logs", id]).ok().to_owned();
    assert!(logs.trim_end().ends_with(" stdout Hello, world!"), "{logs}");
    let logs = wharf(&s, &["task", "logs", id, "--output", "json"])
        .ok()
        .to_owned();
    let line: Value = serde_json::from_str(logs.lines().next().unwrap()).unwrap();
    assert_eq!(line["text"], "Hello, world!");
    assert_eq!(line["stream"], "stdout");

    let def = wharf(
        &s,
        &["taskdef", "deregister", "hello:1", "--output", "json"],
    )
    .json();
    assert_eq!(def["status"], "INACTIVE");
    wharf(&s, &["task", "run", "hello"]).fails_with("wharf: NotFound: ");
    wharf(&s, &["task", "describe", "0123"]).fails_with("wharf: NotFound: ");
}

#[test]
fn task_run_wait_exits_with_the_guests_exit_code_and_overrides_apply() {
    let s = Server::start();
    let dir = tempfile::tempdir().unwrap();
    let exitcode = push(&s, "exitcode");
    register(&s, &dir, "exit", &exitcode, "args = [\"3\"]\n");

    let out = wharf(&s, &["task", "run", "exit", "--wait"]);
    assert_eq!(out.code, 3, "{out:#?}");
    let out = wharf(
        &s,
        &[
            "task",
            "run",
            "exit",
            "--wait",
            "--arg",
            "7",
            "--env",
            "A=1",
            "--timeout",
            "5s",
            "--output",
            "json",
        ],
    );
    assert_eq!(out.code, 7, "{out:#?}");
    let stopped: Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(stopped[0]["stop_code"], "NonZeroExit");
    assert_eq!(stopped[0]["exit_code"], 7);
    assert_eq!(stopped[0]["args"], serde_json::json!(["7"]));
    assert_eq!(stopped[0]["limits"]["timeout_ms"], 5000);
    let logs = wharf(&s, &["task", "logs", stopped[0]["id"].as_str().unwrap()])
        .ok()
        .to_owned();
    assert!(logs.contains(" stderr exiting with 7"), "{logs}");

    wharf(&s, &["task", "run", "exit", "--memory", "lots"])
        .fails_with("wharf: InvalidParameter: overrides.limits.memory: ");
    // Several tasks at once, without waiting: a table of what started.
    let started = wharf(
        &s,
        &["task", "run", "exit", "--count", "2", "--output", "json"],
    )
    .json();
    assert_eq!(started.as_array().unwrap().len(), 2, "{started:#}");
}

#[test]
fn task_logs_follow_streams_and_stop_stops() {
    let s = Server::start();
    let dir = tempfile::tempdir().unwrap();
    let heartbeat = push(&s, "heartbeat");
    register(&s, &dir, "beat", &heartbeat, "args = [\"50\"]\n");

    // Five beats, 50 ms apart: --follow prints them all and ends with the task.
    let started = wharf(
        &s,
        &[
            "task", "run", "beat", "--arg", "50", "--arg", "5", "--output", "json",
        ],
    )
    .json();
    let id = started[0]["id"].as_str().unwrap();
    let logs = wharf(&s, &["task", "logs", id, "--follow"]).ok().to_owned();
    let texts: Vec<&str> = logs
        .lines()
        .map(|l| l.split_once(" stdout ").unwrap().1)
        .collect();
    assert_eq!(
        texts,
        [
            "heartbeat 0",
            "heartbeat 1",
            "heartbeat 2",
            "heartbeat 3",
            "heartbeat 4"
        ]
    );
    let task = wharf(&s, &["task", "describe", id, "--output", "json"]).json();
    assert_eq!(task["stop_code"], "Completed");

    // A task that runs until stopped.
    let started = wharf(&s, &["task", "run", "beat", "--output", "json"]).json();
    let id = started[0]["id"].as_str().unwrap().to_owned();
    poll(&s, &["task", "describe", &id], |t| t["status"] == "RUNNING");
    let stopping = wharf(
        &s,
        &[
            "task", "stop", &id, "--reason", "enough", "--output", "json",
        ],
    )
    .json();
    assert_eq!(stopping["desired_status"], "STOPPED");
    let task = poll(&s, &["task", "describe", &id], |t| t["status"] == "STOPPED");
    assert_eq!(task["stop_code"], "UserStopped");
    // Following a stopped task prints what it wrote and ends.
    let logs = wharf(&s, &["task", "logs", &id, "--follow", "--output", "json"])
        .ok()
        .to_owned();
    let first: Value = serde_json::from_str(logs.lines().next().unwrap()).unwrap();
    assert_eq!(first["text"], "heartbeat 0");
}

#[test]
fn service_create_ls_scale_describe_and_rm() {
    let s = Server::start();
    let dir = tempfile::tempdir().unwrap();
    let heartbeat = push(&s, "heartbeat");
    register(&s, &dir, "beat", &heartbeat, "args = [\"100\"]\n");

    let service = wharf(
        &s,
        &[
            "service",
            "create",
            "web",
            "--taskdef",
            "beat",
            "--desired",
            "2",
            "--output",
            "json",
        ],
    )
    .json();
    assert_eq!(service["name"], "web");
    assert_eq!(service["desired_count"], 2);
    assert_eq!(service["task_definition"], "beat:1");
    poll(&s, &["service", "describe", "web"], |s| {
        s["running_count"] == 2
    });
    let services = wharf(&s, &["service", "ls", "--output", "json"]).json();
    assert_eq!(services[0]["name"], "web");
    assert_eq!(services[0]["running_count"], 2);
    assert_eq!(services[0]["pending_count"], 0);
    let table = wharf(&s, &["service", "ls"]).ok().to_owned();
    let mut lines = table.lines();
    let header: Vec<&str> = lines.next().unwrap().split_whitespace().collect();
    assert_eq!(
        header,
        ["NAME", "TASKDEF", "DESIRED", "RUNNING", "PENDING", "STATUS"]
    );
    let row: Vec<&str> = lines.next().unwrap().split_whitespace().collect();
    assert_eq!(row, ["web", "beat:1", "2", "2", "0", "ACTIVE"]);
    let tasks = wharf(
        &s,
        &[
            "task",
            "ls",
            "--service",
            "web",
            "--status",
            "RUNNING",
            "--output",
            "json",
        ],
    )
    .json();
    assert_eq!(tasks.as_array().unwrap().len(), 2, "{tasks:#}");

    let scaled = wharf(&s, &["service", "scale", "web", "1", "--output", "json"]).json();
    assert_eq!(scaled["desired_count"], 1);
    poll(&s, &["service", "describe", "web"], |s| {
        s["running_count"] == 1
    });
    let updated = wharf(
        &s,
        &[
            "service",
            "update",
            "web",
            "--taskdef",
            "beat:1",
            "--output",
            "json",
        ],
    )
    .json();
    assert_eq!(updated["task_definition"], "beat:1");
    let text = wharf(&s, &["service", "describe", "web"]).ok().to_owned();
    assert!(text.contains("desired:         1"), "{text}");
    assert!(text.contains("DEPLOYMENT"), "{text}");
    assert!(text.contains("PRIMARY"), "{text}");
    assert!(text.contains("created with 2 desired tasks"), "{text}");
    assert!(text.contains("desired count changed from 2 to 1"), "{text}");

    wharf(
        &s,
        &[
            "service",
            "create",
            "web",
            "--taskdef",
            "beat",
            "--desired",
            "1",
        ],
    )
    .fails_with("wharf: Conflict: ");
    let removed = wharf(&s, &["service", "rm", "web", "--output", "json"]).json();
    assert_eq!(removed["status"], "DRAINING");
    assert_eq!(removed["desired_count"], 0);
    poll(&s, &["service", "ls"], |list| {
        list.as_array().unwrap().is_empty()
    });
    wharf(&s, &["service", "scale", "web", "3"]).fails_with("wharf: NotFound: ");
}

#[test]
fn secrets_are_stored_and_listed_but_never_printed() {
    let s = Server::start();
    let dir = tempfile::tempdir().unwrap();
    let value_file = file(&dir, "value", "from-a-file-value");

    let created = wharf(
        &s,
        &[
            "secret",
            "create",
            "flag-secret",
            "--value",
            "from-a-flag-value",
            "--output",
            "json",
        ],
    )
    .json();
    assert_eq!(created["name"], "flag-secret");
    assert!(created.get("value").is_none(), "{created:#}");
    let text = wharf(
        &s,
        &[
            "secret",
            "create",
            "file-secret",
            "--from-file",
            &value_file,
        ],
    )
    .ok()
    .to_owned();
    assert!(text.contains("file-secret"), "{text}");
    let out = wharf_as(
        &s,
        Some(&s.token),
        &["secret", "create", "stdin-secret"],
        b"from-stdin-value\n",
    );
    out.ok();

    let listed = wharf(&s, &["secret", "ls", "--output", "json"])
        .ok()
        .to_owned();
    let text = wharf(&s, &["secret", "ls"]).ok().to_owned();
    for output in [&listed, &text] {
        for name in ["flag-secret", "file-secret", "stdin-secret"] {
            assert!(output.contains(name), "{output}");
        }
        assert!(!output.contains("-value"), "a value was printed: {output}");
    }

    // The stdin value lost its trailing newline: a task sees it exactly.
    let echo = push(&s, "echo");
    register(
        &s,
        &dir,
        "show",
        &echo,
        "[secrets]\nS1 = \"stdin-secret\"\nS2 = \"file-secret\"\n",
    );
    let stopped = wharf(&s, &["task", "run", "show", "--wait", "--output", "json"]).json();
    let id = stopped[0]["id"].as_str().unwrap();
    let logs = wharf(&s, &["task", "logs", id, "--output", "json"])
        .ok()
        .to_owned();
    let texts: Vec<String> = logs
        .lines()
        .map(|l| {
            serde_json::from_str::<Value>(l).unwrap()["text"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect();
    let env = texts.iter().skip_while(|t| *t != "env:").skip(1);
    assert_eq!(
        env.collect::<Vec<_>>(),
        ["S1=from-stdin-value", "S2=from-a-file-value"],
        "{logs}"
    );

    wharf(&s, &["secret", "rm", "flag-secret"]).ok();
    wharf(&s, &["secret", "rm", "flag-secret"]).fails_with("wharf: NotFound: ");
    let listed = wharf(&s, &["secret", "ls", "--output", "json"]).json();
    assert_eq!(listed.as_array().unwrap().len(), 2, "{listed:#}");
}

#[test]
fn tokens_limit_what_a_reader_may_do_and_calls_are_audited() {
    let s = Server::start();
    let created = wharf(
        &s,
        &[
            "token", "create", "--name", "ci", "--role", "reader", "--output", "json",
        ],
    )
    .json();
    assert_eq!(created["token"]["role"], "reader");
    let secret = created["secret"].as_str().unwrap().to_owned();
    let id = created["token"]["id"].as_str().unwrap().to_owned();
    // Text mode shows the secret once, and says so.
    let out = wharf(
        &s,
        &["token", "create", "--name", "other", "--role", "deployer"],
    );
    assert!(out.ok().contains("secret:"), "{out:#?}");
    assert!(out.stderr.contains("cannot be shown again"), "{out:#?}");

    // A reader reads, and is refused anything that changes state.
    let reader = |args: &[&str]| wharf_as(&s, Some(&secret), args, b"");
    assert_eq!(
        reader(&["task", "ls", "--output", "json"]).json(),
        Value::Array(vec![])
    );
    reader(&["secret", "create", "x", "--value", "y"]).fails_with("wharf: AccessDenied: ");
    reader(&["service", "scale", "web", "1"]).fails_with("wharf: AccessDenied: ");
    reader(&["token", "ls"]).fails_with("wharf: AccessDenied: ");

    let tokens = wharf(&s, &["token", "ls", "--output", "json"]).json();
    assert!(
        tokens
            .as_array()
            .unwrap()
            .iter()
            .any(|t| t["id"] == id.as_str()),
        "{tokens:#}"
    );
    let table = wharf(&s, &["token", "ls"]).ok().to_owned();
    assert!(table.contains(&id) && table.contains("reader"), "{table}");
    assert!(!table.contains(&secret), "{table}");
    let revoked = wharf(&s, &["token", "revoke", &id, "--output", "json"]).json();
    assert!(revoked["revoked_at"].is_string(), "{revoked:#}");
    reader(&["task", "ls"]).fails_with("wharf: Unauthorized: ");

    let audit = wharf(&s, &["audit", "ls", "--limit", "50", "--output", "json"]).json();
    let entries = audit.as_array().unwrap();
    assert!(
        entries
            .iter()
            .any(|e| e["method"] == "POST" && e["path"] == "/v1/secrets" && e["status"] == 403),
        "{audit:#}"
    );
    assert!(
        entries
            .iter()
            .any(|e| e["method"] == "DELETE" && e["path"] == format!("/v1/tokens/{id}")),
        "{audit:#}"
    );
    let table = wharf(&s, &["audit", "ls"]).ok().to_owned();
    assert!(table.starts_with("ID"), "{table}");
    assert!(table.contains("/v1/tokens"), "{table}");
}

#[test]
fn the_token_defaults_to_the_local_admin_token_and_errors_are_clear() {
    let s = Server::start();
    let data = s.data().to_str().unwrap().to_owned();
    // No --token or WHARF_TOKEN: the data directory's admin.token is used.
    let out = wharf_as(
        &s,
        None,
        &["taskdef", "ls", "--data-dir", &data, "--output", "json"],
        b"",
    );
    assert_eq!(out.json(), Value::Array(vec![]));
    // Global flags also go before the subcommand.
    let out = wharf_as(&s, None, &["secret", "--data-dir", &data, "ls"], b"");
    assert!(out.ok().starts_with("NAME"), "{out:#?}");

    let empty = tempfile::tempdir().unwrap();
    let out = wharf_as(
        &s,
        None,
        &[
            "taskdef",
            "ls",
            "--data-dir",
            empty.path().to_str().unwrap(),
        ],
        b"",
    );
    out.fails_with("wharf: Unauthorized: ");
    wharf(&s, &["task", "ls", "--token", "not-a-token"]).fails_with("wharf: Unauthorized: ");
    wharf(&s, &["task", "ls", "--server", "http://127.0.0.1:1"])
        .fails_with("cannot reach the Wharf server at http://127.0.0.1:1");
}

/// `wharf … | head` ends quietly: a closed stdout stops a client command
/// like any Unix tool (SIGPIPE), not with a panic.
#[cfg(unix)]
#[test]
fn a_closed_pipe_ends_a_client_command_quietly() {
    use std::os::unix::process::ExitStatusExt;
    let s = Server::start();
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let out = Command::new(env!("CARGO_BIN_EXE_wharf"))
        .args(["token", "ls", "--server", &s.base, "--token", &s.token])
        .stdout(writer)
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_eq!(
        out.status.signal(),
        Some(libc_sigpipe()),
        "{:?}",
        out.status
    );
}

/// SIGPIPE's number on Linux and the BSDs.
fn libc_sigpipe() -> i32 {
    13
}
