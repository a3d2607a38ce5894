//! A real S3-compatible object store for tests: Garage (crates.io
//! `garage`), one per test process, single node on loopback, started on
//! first use in a temporary directory and stopped when the process exits.
//! Each caller gets a bucket of its own, readable and writable with the
//! process's key.
//!
//! The binary: `$WHARF_GARAGE`, `~/.cache/wharf-tools/bin/garage` (where
//! `.ci/run` installs it with `cargo install garage --locked --root
//! ~/.cache/wharf-tools`), or `garage` on `PATH`.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// A running Garage.
#[derive(Debug)]
pub struct Garage {
    bin: PathBuf,
    config: PathBuf,
    /// `http://127.0.0.1:PORT`, the S3 API.
    endpoint: String,
    key_id: String,
    secret: String,
}

/// The region Garage answers for.
pub const REGION: &str = "garage";

static SHARED: OnceLock<Garage> = OnceLock::new();
static BUCKETS: AtomicUsize = AtomicUsize::new(0);

/// The process's Garage, started on first use.
///
/// # Panics
///
/// If Garage is not installed or does not start.
pub fn shared() -> &'static Garage {
    SHARED.get_or_init(Garage::start)
}

fn binary() -> PathBuf {
    if let Some(bin) = std::env::var_os("WHARF_GARAGE") {
        return bin.into();
    }
    if let Some(home) = std::env::var_os("HOME") {
        let bin = Path::new(&home).join(".cache/wharf-tools/bin/garage");
        if bin.is_file() {
            return bin;
        }
    }
    let on_path = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join("garage"))
            .find(|p| p.is_file())
    });
    on_path.expect(
        "Garage is not installed: cargo install garage --locked --root ~/.cache/wharf-tools (.ci/run does), or set WHARF_GARAGE",
    )
}

impl Garage {
    fn cli(&self, args: &[&str]) -> String {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let out = Command::new(&self.bin)
                .arg("-c")
                .arg(&self.config)
                .args(args)
                .output()
                .expect("garage runs");
            if out.status.success() {
                return String::from_utf8_lossy(&out.stdout).into_owned();
            }
            // The server may still be starting.
            assert!(
                Instant::now() < deadline,
                "garage {args:?} failed: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn start() -> Garage {
        let bin = binary();
        let dir = crate::daemon::fresh_dir("wharf-garage-");
        let (rpc, s3, admin) = (
            crate::daemon::free_port(),
            crate::daemon::free_port(),
            crate::daemon::free_port(),
        );
        // Garage's node-to-node secret (32 random bytes as hex).
        let mut random = [0u8; 32];
        std::io::Read::read_exact(
            &mut std::fs::File::open("/dev/urandom").expect("/dev/urandom"),
            &mut random,
        )
        .expect("random bytes");
        let secret: String = random.iter().map(|b| format!("{b:02x}")).collect();
        let config = dir.join("garage.toml");
        std::fs::write(
            &config,
            format!(
                r#"metadata_dir = "{dir}/meta"
data_dir = "{dir}/data"
db_engine = "sqlite"
replication_factor = 1
rpc_bind_addr = "127.0.0.1:{rpc}"
rpc_public_addr = "127.0.0.1:{rpc}"
rpc_secret = "{secret}"

[s3_api]
s3_region = "{REGION}"
api_bind_addr = "127.0.0.1:{s3}"

[admin]
api_bind_addr = "127.0.0.1:{admin}"
"#,
                dir = dir.display()
            ),
        )
        .expect("garage config");
        let log = std::fs::File::create(dir.join("server.log")).expect("garage log");
        let mut cmd = Command::new(&bin);
        cmd.arg("-c")
            .arg(&config)
            .arg("server")
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log);
        crate::daemon::spawn_for_life(cmd, libc::SIGTERM);
        let mut garage = Garage {
            bin,
            config,
            endpoint: format!("http://127.0.0.1:{s3}"),
            key_id: String::new(),
            secret: String::new(),
        };
        let id = garage.cli(&["node", "id", "-q"]);
        let id = id.trim().split('@').next().expect("a node id").to_owned();
        garage.cli(&["layout", "assign", "-z", "dc1", "-c", "1G", &id]);
        garage.cli(&["layout", "apply", "--version", "1"]);
        garage.cli(&["key", "create", "wharf-test"]);
        let info = garage.cli(&["key", "info", "wharf-test", "--show-secret"]);
        let field = |name: &str| {
            info.lines()
                .find_map(|l| {
                    let (k, v) = l.split_once(':')?;
                    (k.trim().eq_ignore_ascii_case(name)).then(|| v.trim().to_owned())
                })
                .unwrap_or_else(|| panic!("no {name:?} in garage key info: {info}"))
        };
        garage.key_id = field("Key ID");
        garage.secret = field("Secret key");
        garage
    }

    /// The S3 endpoint, `http://127.0.0.1:PORT`.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// The environment an S3 client needs for the buckets (AWS names).
    pub fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("AWS_ACCESS_KEY_ID", self.key_id.clone()),
            ("AWS_SECRET_ACCESS_KEY", self.secret.clone()),
            ("AWS_DEFAULT_REGION", REGION.to_owned()),
        ]
    }

    /// A new, empty bucket, readable and writable with [`env`](Self::env)'s
    /// key; its name.
    pub fn bucket(&self) -> String {
        let name = format!(
            "wharf-{}-{}",
            std::process::id(),
            BUCKETS.fetch_add(1, Ordering::Relaxed)
        );
        self.cli(&["bucket", "create", &name]);
        self.cli(&[
            "bucket",
            "allow",
            "--read",
            "--write",
            "--owner",
            &name,
            "--key",
            "wharf-test",
        ]);
        name
    }

    /// `s3://BUCKET/PREFIX?endpoint=...&region=...` for a new bucket.
    pub fn url(&self, prefix: &str) -> String {
        format!(
            "s3://{}/{prefix}?endpoint={}&region={REGION}",
            self.bucket(),
            self.endpoint
        )
    }
}
