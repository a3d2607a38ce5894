//! A real `wharf server` process on a loopback port, and a small HTTP
//! client that speaks to it with the admin token.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use sha2::{Digest as _, Sha256};

/// Whether the suite runs on PostgreSQL (`WHARF_TEST_STATE=postgres`).
pub(crate) fn on_postgres() -> bool {
    std::env::var("WHARF_TEST_STATE").as_deref() == Ok("postgres")
}

/// The database of the server on `data` when the suite runs on
/// PostgreSQL: created on first start, remembered beside `data`.
fn state_url(data: &Path) -> Option<String> {
    if !on_postgres() {
        return None;
    }
    std::fs::create_dir_all(data).unwrap();
    let file = data.join("test-state-url");
    if let Ok(url) = std::fs::read_to_string(&file) {
        return Some(url);
    }
    let url = wharf_testkit::postgres::shared().database();
    std::fs::write(&file, &url).unwrap();
    Some(url)
}

/// A running server; killed when dropped.
pub(crate) struct Server {
    child: Child,
    pub(crate) base: String,
    /// The ingress's base URL (`http://127.0.0.1:PORT`), unless it is off.
    pub(crate) ingress: Option<String>,
    pub(crate) token: String,
    data: PathBuf,
    /// The PostgreSQL database of the state, if it is not `state.db`.
    state: Option<String>,
    _dir: Option<tempfile::TempDir>,
}

impl Server {
    /// Starts a server on a fresh data directory.
    pub(crate) fn start() -> Server {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        let mut server = Server::start_in(&data);
        server._dir = Some(dir);
        server
    }

    /// Starts a server on `data` (to restart on the same state).
    pub(crate) fn start_in(data: &Path) -> Server {
        Server::start_with(data, &[])
    }

    /// Starts a server on `data` with extra `wharf server` flags.
    ///
    /// With `WHARF_TEST_STATE=postgres` the state goes to a database of
    /// the test process's PostgreSQL server instead of `state.db` (one
    /// per data directory, so a restart finds it): the suite runs on
    /// either store.
    pub(crate) fn start_with(data: &Path, flags: &[&str]) -> Server {
        Server::start_with_env(data, flags, &[])
    }

    /// [`start_with`](Self::start_with), with extra environment variables.
    pub(crate) fn start_with_env(data: &Path, flags: &[&str], env: &[(&str, String)]) -> Server {
        Server::spawn(data, flags, env, true)
    }

    /// A server on `data` with its state in `state.db`, whatever
    /// `WHARF_TEST_STATE` says (a single-node install to migrate).
    pub(crate) fn start_on_sqlite(data: &Path) -> Server {
        Server::spawn(data, &[], &[], false)
    }

    fn spawn(data: &Path, flags: &[&str], env: &[(&str, String)], suite_state: bool) -> Server {
        let given = flags
            .iter()
            .position(|f| *f == "--state")
            .map(|i| flags[i + 1].to_owned());
        let state_url = given
            .clone()
            .or_else(|| suite_state.then(|| state_url(data)).flatten());
        let state = match (&given, &state_url) {
            (None, Some(url)) => vec!["--state".to_owned(), url.clone()],
            _ => Vec::new(),
        };
        // Tests run side by side: the ingress gets a free port too.
        let ingress_flags: &[&str] = if flags.contains(&"--ingress") {
            &[]
        } else {
            &["--ingress", "127.0.0.1:0"]
        };
        let listen: &[&str] = if flags.contains(&"--listen") {
            &[]
        } else {
            &["--listen", "127.0.0.1:0"]
        };
        let mut child = Command::new(env!("CARGO_BIN_EXE_wharf"))
            .arg("server")
            .args(listen)
            .arg("--data-dir")
            .arg(data)
            .args(ingress_flags)
            .args(&state)
            .args(flags)
            .env_remove("WHARF_DATA_DIR")
            .env_remove("WHARF_STATE")
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn wharf server");
        let stderr = child.stderr.take().unwrap();
        let mut lines = BufReader::new(stderr).lines();
        let mut ingress = None;
        let base = loop {
            let line = lines.next().expect("server printed its address").unwrap();
            if let Some(rest) = line.strip_prefix("wharf: ingress on ") {
                ingress = Some(rest.trim().to_owned());
            }
            if let Some(rest) = line.strip_prefix("wharf: listening on ") {
                break rest.split_whitespace().next().unwrap().to_owned();
            }
        };
        // Keep draining stderr so the server never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines {});
        let token = std::fs::read_to_string(data.join("admin.token"))
            .unwrap()
            .trim()
            .to_owned();
        Server {
            child,
            base,
            ingress,
            token,
            data: data.to_owned(),
            state: state_url,
            _dir: None,
        }
    }

    /// The PostgreSQL database of the state (`None`: `state.db`).
    pub(crate) fn state_url(&self) -> Option<&str> {
        self.state.as_deref()
    }

    /// Bytes the state takes: SQLite's files, or PostgreSQL's tables
    /// with their indexes and TOAST.
    pub(crate) fn state_size(&self) -> u64 {
        match &self.state {
            Some(url) => wharf_testkit::postgres::shared()
                .sql(
                    url,
                    "SELECT sum(pg_total_relation_size(oid)) FROM pg_class \
                     WHERE relkind = 'r' AND relnamespace = 'public'::regnamespace",
                )
                .trim()
                .parse()
                .unwrap(),
            None => ["state.db", "state.db-wal"]
                .iter()
                .map(|f| std::fs::metadata(self.data.join(f)).map_or(0, |m| m.len()))
                .sum(),
        }
    }

    /// Runs SQL on the stored state while the server runs: `sqlite` on
    /// `state.db` (Python's sqlite3, waiting out the server's write lock),
    /// or `postgres` in its database.
    pub(crate) fn state_sql(&self, sqlite: &str, postgres: &str) {
        if let Some(url) = &self.state {
            wharf_testkit::postgres::shared().sql(url, postgres);
            return;
        }
        let out = std::process::Command::new("python3")
            .arg("-c")
            .arg("import sqlite3,sys; c=sqlite3.connect(sys.argv[1], timeout=30); c.executescript(sys.argv[2]); c.commit(); c.close()")
            .arg(self.data.join("state.db"))
            .arg(sqlite)
            .output()
            .expect("python3 runs");
        assert!(
            out.status.success(),
            "sqlite3 failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Every byte of the stored state: SQLite's files (the database and
    /// its WAL), or what `pg_dump` writes of the database.
    pub(crate) fn state_dump(&self) -> Vec<u8> {
        if let Some(url) = &self.state {
            return wharf_testkit::postgres::shared().dump(url);
        }
        let mut all = Vec::new();
        for entry in std::fs::read_dir(&self.data).unwrap() {
            let path = entry.unwrap().path();
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            if name.starts_with("state.db") {
                all.extend(std::fs::read(&path).unwrap());
            }
        }
        all
    }

    /// The server's process id (to signal it).
    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }

    /// `host:port`, for OCI references.
    pub(crate) fn host(&self) -> &str {
        self.base.trim_start_matches("http://")
    }

    /// A task once it is `STOPPED` (the server waits up to a minute).
    pub(crate) fn wait_stopped(&self, id: &str) -> serde_json::Value {
        self.api(
            "GET",
            &format!("/v1/tasks/{id}?wait_stopped_ms=60000"),
            None,
        )
        .json()
    }

    pub(crate) fn data(&self) -> &Path {
        &self.data
    }

    /// Kills the process with SIGKILL (no clean-up, as in a crash). Use
    /// with [`start_in`](Self::start_in) on a directory the test owns.
    pub(crate) fn kill9(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    /// Stops the process with SIGTERM and waits for it to exit.
    pub(crate) fn terminate(mut self) -> std::process::ExitStatus {
        let pid = self.child.id().to_string();
        let killed = Command::new("kill").args(["-TERM", &pid]).status().unwrap();
        assert!(killed.success());
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the server did not stop within 30 s of SIGTERM"
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }

    /// Runs a `wharf` client command against this server (its URL and
    /// admin token in the environment); panics unless it succeeds, with
    /// its stderr; returns its stdout.
    pub(crate) fn cli(&self, args: &[&str]) -> String {
        let out = Command::new(env!("CARGO_BIN_EXE_wharf"))
            .args(args)
            .env("WHARF_SERVER", &self.base)
            .env("WHARF_TOKEN", &self.token)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "wharf {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// Pushes a sample with `wharf push` as `repo:tag`.
    pub(crate) fn push_sample(&self, sample: &str, target: wharf_testkit::Target, repo_tag: &str) {
        let out = Command::new(env!("CARGO_BIN_EXE_wharf"))
            .arg("push")
            .arg(wharf_testkit::wasm(sample, target))
            .arg(format!("{}/{repo_tag}", self.host()))
            .env("WHARF_TOKEN", &self.token)
            .env("WHARF_SERVER", &self.base)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "push failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// A `/v1/` call with a JSON body (or none) and the admin token.
    pub(crate) fn api(
        &self,
        method: &str,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> Response {
        self.api_as(&self.token.clone(), method, path, body)
    }

    /// A `/v1/` call with `token` (empty: no Authorization header).
    pub(crate) fn api_as(
        &self,
        token: &str,
        method: &str,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> Response {
        let mut r = ureq::request(method, &format!("{}{path}", self.base));
        if !token.is_empty() {
            r = r.set("Authorization", &format!("Bearer {token}"));
        }
        call(match body {
            Some(b) => r.send_json(b),
            None => r.call(),
        })
    }

    pub(crate) fn req(&self, method: &str, path: &str) -> ureq::Request {
        let url = if path.starts_with("http") {
            path.to_owned()
        } else {
            format!("{}{path}", self.base)
        };
        ureq::request(method, &url).set("Authorization", &format!("Bearer {}", self.token))
    }

    /// Pushes a blob in one request and returns its digest.
    pub(crate) fn push_blob(&self, repo: &str, bytes: &[u8]) -> String {
        let digest = sha256(bytes);
        let r = call(
            self.req(
                "POST",
                &format!("/v2/{repo}/blobs/uploads/?digest={digest}"),
            )
            .send_bytes(bytes),
        );
        assert_eq!(r.status, 201, "{r:?}");
        digest
    }

    /// Pushes an image with an empty config and no layers under `tag`;
    /// returns the manifest and its digest.
    pub(crate) fn push_empty_image(&self, repo: &str, tag: &str) -> (serde_json::Value, String) {
        let config = self.push_blob(repo, b"{}");
        let manifest = image_manifest((&config, 2), &[]);
        let r = self.push_manifest(repo, tag, &manifest);
        assert_eq!(r.status, 201, "{r:?}");
        let digest = r.header("docker-content-digest").unwrap().to_owned();
        (manifest, digest)
    }

    /// Pushes an image manifest with one config and the given layers.
    pub(crate) fn push_manifest(
        &self,
        repo: &str,
        reference: &str,
        manifest: &serde_json::Value,
    ) -> Response {
        let body = serde_json::to_vec(manifest).unwrap();
        let media = manifest["mediaType"]
            .as_str()
            .unwrap_or("application/vnd.oci.image.manifest.v1+json")
            .to_owned();
        call(
            self.req("PUT", &format!("/v2/{repo}/manifests/{reference}"))
                .set("Content-Type", &media)
                .send_bytes(&body),
        )
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Polls `check` every 50 ms until it returns `Some`, for at most `limit`.
pub(crate) fn eventually<T>(
    limit: std::time::Duration,
    what: &str,
    mut check: impl FnMut() -> Option<T>,
) -> T {
    let deadline = std::time::Instant::now() + limit;
    loop {
        if let Some(v) = check() {
            return v;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// Registers a task definition (201 expected) and returns it.
pub(crate) fn register(s: &Server, def: serde_json::Value) -> serde_json::Value {
    let r = s.api("POST", "/v1/taskdefs", Some(def));
    assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
    r.json()
}

/// A service as the API describes it.
pub(crate) fn service(s: &Server, name: &str) -> serde_json::Value {
    let r = s.api("GET", &format!("/v1/services/{name}"), None);
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    r.json()
}

/// A service's event messages, newest first.
pub(crate) fn events(s: &Server, name: &str) -> Vec<String> {
    let r = s.api(
        "GET",
        &format!("/v1/services/{name}/events?limit=1000"),
        None,
    );
    assert_eq!(r.status, 200);
    r.json()
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["message"].as_str().unwrap().to_owned())
        .collect()
}

/// Waits until the service runs exactly `n` tasks with nothing pending and
/// one completed deployment.
pub(crate) fn converged(s: &Server, name: &str, n: u64) -> serde_json::Value {
    eventually(
        std::time::Duration::from_secs(60),
        &format!("{name} at {n}"),
        || {
            let svc = service(s, name);
            let deployments = svc["deployments"].as_array().unwrap();
            let done = svc["running_count"] == n
                && svc["pending_count"] == 0
                && deployments.len() == 1
                && deployments[0]["rollout_state"] == "COMPLETED";
            done.then_some(svc)
        },
    )
}

/// A response, whatever its status.
#[derive(Debug)]
pub(crate) struct Response {
    pub(crate) status: u16,
    pub(crate) headers: Vec<(String, String)>,
    pub(crate) body: Vec<u8>,
}

impl Response {
    pub(crate) fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub(crate) fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", String::from_utf8_lossy(&self.body)))
    }

    /// The first OCI error code in the body.
    pub(crate) fn error_code(&self) -> String {
        self.json()["errors"][0]["code"]
            .as_str()
            .unwrap_or_default()
            .to_owned()
    }
}

/// Turns a ureq result into a [`Response`] for any status.
pub(crate) fn call(result: Result<ureq::Response, ureq::Error>) -> Response {
    let r = match result {
        Ok(r) => r,
        Err(ureq::Error::Status(_, r)) => r,
        Err(e) => panic!("transport error: {e}"),
    };
    let status = r.status();
    let headers = r
        .headers_names()
        .into_iter()
        .map(|n| {
            let v = r.header(&n).unwrap_or_default().to_owned();
            (n, v)
        })
        .collect();
    let mut body = Vec::new();
    std::io::Read::read_to_end(&mut r.into_reader(), &mut body).unwrap();
    Response {
        status,
        headers,
        body,
    }
}

pub(crate) fn sha256(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

/// An OCI image manifest over already pushed blobs.
pub(crate) fn image_manifest(config: (&str, usize), layers: &[(&str, usize)]) -> serde_json::Value {
    serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": { "mediaType": "application/vnd.oci.image.config.v1+json", "digest": config.0, "size": config.1 },
        "layers": layers.iter().map(|(d, s)| serde_json::json!({
            "mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": d, "size": s
        })).collect::<Vec<_>>(),
    })
}

/// Fails (in CI) or skips with a note (elsewhere) when a peer tool is missing.
pub(crate) fn require(tool: &str, present: bool) -> bool {
    if present {
        return true;
    }
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("{tool} is required in CI (.ci/run installs it)");
    }
    eprintln!("skipping: {tool} is not installed (it is in CI)");
    false
}
