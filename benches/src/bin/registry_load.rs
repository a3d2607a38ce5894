//! Registry load: push and pull of 1 KiB, 1 MiB, 64 MiB and 512 MiB blobs
//! at concurrency 1 and 8, against `wharf server` and CNCF distribution
//! (Debian's `docker-registry`) started side by side on loopback with
//! filesystem storage, with the same client (ureq, one thread per stream).
//!
//! `cargo build --release -p wharf && cargo run --release -p wharf-bench --bin registry_load`
//! Env: `WHARF_BIN` (default target/release/wharf), `DOCKER_REGISTRY`
//! (default /usr/bin/docker-registry), `SIZES` (e.g. `1K,1M`).

use std::io::Read;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use sha2::{Digest as _, Sha256};

struct Peer {
    name: &'static str,
    base: String,
    auth: Option<String>,
    child: Child,
}

impl Drop for Peer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_wharf(dir: &std::path::Path) -> Peer {
    let (child, base, token) = wharf_bench::spawn_wharf_server(dir);
    Peer {
        name: "wharf",
        base,
        auth: Some(format!("Bearer {token}")),
        child,
    }
}

fn start_distribution(dir: &std::path::Path) -> Peer {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let config = dir.join("config.yml");
    std::fs::write(
        &config,
        format!(
            "version: 0.1\nlog:\n  level: error\n  accesslog:\n    disabled: true\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: 127.0.0.1:{port}\n",
            dir.join("data").display()
        ),
    )
    .unwrap();
    let bin =
        std::env::var("DOCKER_REGISTRY").unwrap_or_else(|_| "/usr/bin/docker-registry".into());
    let child = Command::new(bin)
        .arg("serve")
        .arg(&config)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start docker-registry (apt-get install docker-registry)");
    let base = format!("http://127.0.0.1:{port}");
    for _ in 0..100 {
        if ureq::get(&format!("{base}/v2/")).call().is_ok() {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Peer {
        name: "distribution",
        base,
        auth: None,
        child,
    }
}

fn fill(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

fn req(peer: &Peer, method: &str, url: &str) -> ureq::Request {
    let r = ureq::request(method, url);
    match &peer.auth {
        Some(a) => r.set("Authorization", a),
        None => r,
    }
}

/// POST then PUT ?digest= with the whole body: monolithic push, which
/// both registries support.
fn push(peer: &Peer, repo: &str, blob: &[u8], digest: &str) {
    let r = req(
        peer,
        "POST",
        &format!("{}/v2/{repo}/blobs/uploads/", peer.base),
    )
    .call()
    .expect("start upload");
    let location = r.header("location").expect("location").to_owned();
    let url = if location.starts_with("http") {
        location
    } else {
        format!("{}{location}", peer.base)
    };
    let sep = if url.contains('?') { '&' } else { '?' };
    req(peer, "PUT", &format!("{url}{sep}digest={digest}"))
        .set("Content-Type", "application/octet-stream")
        .send_bytes(blob)
        .expect("finish upload");
}

fn pull(peer: &Peer, repo: &str, digest: &str) -> u64 {
    let r = req(
        peer,
        "GET",
        &format!("{}/v2/{repo}/blobs/{digest}", peer.base),
    )
    .call()
    .expect("pull");
    let mut reader = r.into_reader();
    let mut buf = vec![0; 1 << 20];
    let mut n = 0;
    loop {
        let k = reader.read(&mut buf).unwrap();
        if k == 0 {
            break n;
        }
        n += k as u64;
    }
}

struct Row {
    size: String,
    concurrency: usize,
    op: &'static str,
    results: Vec<(&'static str, f64, f64)>, // (peer, MB/s, req/s)
}

fn main() {
    let sizes: Vec<(String, usize, usize)> = [
        ("1K", 1 << 10, 2_000),
        ("1M", 1 << 20, 200),
        ("64M", 64 << 20, 8),
        ("512M", 512 << 20, 2),
    ]
    .into_iter()
    .map(|(n, s, c)| (n.to_owned(), s, c))
    .filter(|(n, _, _)| std::env::var("SIZES").map_or(true, |v| v.split(',').any(|x| x == n)))
    .collect();
    let dirs = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
    let peers = [
        Arc::new(start_wharf(dirs[0].path())),
        Arc::new(start_distribution(dirs[1].path())),
    ];
    let mut rows = Vec::new();
    let mut seed = 0u64;
    for (size_name, size, count) in &sizes {
        for concurrency in [1usize, 8] {
            // Every stream pushes its own blobs (distinct content).
            let per_thread = (*count / concurrency).max(1);
            let blobs: Vec<Vec<(Vec<u8>, String)>> = (0..concurrency)
                .map(|_| {
                    (0..per_thread)
                        .map(|_| {
                            seed += 1;
                            let b = fill(seed, *size);
                            let d = format!("sha256:{}", hex::encode(Sha256::digest(&b)));
                            (b, d)
                        })
                        .collect()
                })
                .collect();
            let blobs = Arc::new(blobs);
            let total_bytes = (concurrency * per_thread * size) as f64;
            let total_reqs = (concurrency * per_thread) as f64;
            let mut push_row = Row {
                size: size_name.clone(),
                concurrency,
                op: "push",
                results: vec![],
            };
            let mut pull_row = Row {
                size: size_name.clone(),
                concurrency,
                op: "pull",
                results: vec![],
            };
            for peer in &peers {
                let repo = format!("bench/s{}c{concurrency}", size_name.to_lowercase());
                let t = Instant::now();
                let handles: Vec<_> = (0..concurrency)
                    .map(|i| {
                        let (peer, blobs, repo) = (peer.clone(), blobs.clone(), repo.clone());
                        std::thread::spawn(move || {
                            for (b, d) in &blobs[i] {
                                push(&peer, &repo, b, d);
                            }
                        })
                    })
                    .collect();
                handles.into_iter().for_each(|h| h.join().unwrap());
                let secs = t.elapsed().as_secs_f64();
                push_row
                    .results
                    .push((peer.name, total_bytes / secs / 1e6, total_reqs / secs));
                let t = Instant::now();
                let handles: Vec<_> = (0..concurrency)
                    .map(|i| {
                        let (peer, blobs, repo) = (peer.clone(), blobs.clone(), repo.clone());
                        std::thread::spawn(move || {
                            for (b, d) in &blobs[i] {
                                assert_eq!(pull(&peer, &repo, d), b.len() as u64);
                            }
                        })
                    })
                    .collect();
                handles.into_iter().for_each(|h| h.join().unwrap());
                let secs = t.elapsed().as_secs_f64();
                pull_row
                    .results
                    .push((peer.name, total_bytes / secs / 1e6, total_reqs / secs));
            }
            eprintln!("done {size_name} c{concurrency}");
            rows.push(push_row);
            rows.push(pull_row);
        }
    }
    println!(
        "| blob | conc. | op | wharf MB/s | wharf blobs/s | distribution MB/s | distribution blobs/s | ratio |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for r in rows {
        let (w, d) = (&r.results[0], &r.results[1]);
        println!(
            "| {} | {} | {} | {:.1} | {:.0} | {:.1} | {:.0} | {:.2}× |",
            r.size,
            r.concurrency,
            r.op,
            w.1,
            w.2,
            d.1,
            d.2,
            w.1 / d.1
        );
    }
}
