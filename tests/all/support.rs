//! Running the real `wharf` binary and reading what it reports.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde_json::Value;

/// What one `wharf run` did.
#[derive(Debug)]
pub(crate) struct RunResult {
    /// The process exit status.
    pub(crate) status: i32,
    pub(crate) stdout: String,
    pub(crate) stderr: String,
    /// The `--report` JSON.
    pub(crate) report: Value,
}

impl RunResult {
    pub(crate) fn stop_code(&self) -> &str {
        self.report["stop_code"]
            .as_str()
            .unwrap_or_else(|| panic!("no stop code in {self:#?}"))
    }

    pub(crate) fn message(&self) -> &str {
        self.report["message"].as_str().unwrap()
    }

    pub(crate) fn assert(&self, stop_code: &str, status: i32) -> &Self {
        assert_eq!(
            (self.stop_code(), self.status),
            (stop_code, status),
            "{self:#?}"
        );
        self
    }
}

/// A data directory for one test (compile cache), removed at the end.
pub(crate) struct Wharf {
    dir: tempfile::TempDir,
}

impl Wharf {
    pub(crate) fn new() -> Self {
        Wharf {
            dir: tempfile::tempdir().unwrap(),
        }
    }

    pub(crate) fn path(&self) -> &Path {
        self.dir.path()
    }

    fn command(&self, flags: &[&str], file: &Path, args: &[&str]) -> (Command, PathBuf) {
        let report = self
            .dir
            .path()
            .join(format!("report-{}.json", rand_suffix()));
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_wharf"));
        cmd.arg("run")
            .arg("--data-dir")
            .arg(self.dir.path().join("data"))
            .arg("--report")
            .arg(&report)
            .args(flags)
            .arg(file)
            .arg("--")
            .args(args)
            .env_remove("WHARF_DATA_DIR")
            .env_remove("RUST_LOG")
            .env_remove("WHARF_LOG");
        (cmd, report)
    }

    /// `wharf run FLAGS FILE -- ARGS` with stdin from `stdin`.
    pub(crate) fn run_with_stdin(
        &self,
        flags: &[&str],
        file: &Path,
        args: &[&str],
        stdin: &[u8],
    ) -> RunResult {
        let (mut cmd, report) = self.command(flags, file, args);
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn wharf");
        child.stdin.take().unwrap().write_all(stdin).unwrap();
        finish(child.wait_with_output().unwrap(), &report)
    }

    /// `wharf run FLAGS FILE -- ARGS` with empty stdin.
    pub(crate) fn run(&self, flags: &[&str], file: &Path, args: &[&str]) -> RunResult {
        self.run_with_stdin(flags, file, args, b"")
    }

    /// Like [`run`](Self::run) but stdin stays open (and silent) until the
    /// process exits.
    pub(crate) fn run_with_open_stdin(
        &self,
        flags: &[&str],
        file: &Path,
        args: &[&str],
    ) -> RunResult {
        let (mut cmd, report) = self.command(flags, file, args);
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn wharf");
        let stdin = child.stdin.take();
        let output = child.wait_with_output().unwrap();
        drop(stdin);
        finish(output, &report)
    }
}

fn finish(output: std::process::Output, report: &Path) -> RunResult {
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    let report = match std::fs::read_to_string(report) {
        Ok(text) => serde_json::from_str(&text).expect("report is JSON"),
        Err(e) => panic!("no report ({e}); stderr: {stderr}"),
    };
    RunResult {
        status: output.status.code().expect("wharf exited, not killed"),
        stdout,
        stderr,
        report,
    }
}

fn rand_suffix() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed).to_string()
}
