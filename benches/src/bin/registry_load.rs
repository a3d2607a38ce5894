//! Registry load: push and pull of 1 KiB, 1 MiB, 64 MiB and 512 MiB blobs
//! at concurrency 1 and 8, against `wharf server` and CNCF distribution
//! (Debian's `docker-registry`) started side by side on loopback with
//! filesystem storage, with the same client (ureq, one thread per stream).
//!
//! `cargo build --release -p wharf && cargo run --release -p wharf-bench --bin registry_load`
//! Env: `WHARF_BIN` (default target/release/wharf), `DOCKER_REGISTRY`
//! (default /usr/bin/docker-registry), `SIZES` (e.g. `1K,1M`), `STREAMS`
//! (default `1,8`), `ROUNDS` (default 1: rounds alternate which peer goes
//! first; each cell reports the medians and the range of the ratio). For
//! blobs of 64 MiB and more, the machine's own floor for a durable write
//! of the same bytes is measured in the same run. Every timed push starts
//! after a `sync`, so no peer pays for the write-back of another's bytes.

use std::io::Read;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use sha2::{Digest as _, Sha256};

struct Peer {
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

/// Each stream's blobs with their digests.
type Streams = Vec<Vec<(Vec<u8>, String)>>;

/// Runs `op` on every blob, one thread per stream (each its own list of
/// blobs), and returns the seconds until all are done.
fn in_streams(
    peer: &Arc<Peer>,
    blobs: &Arc<Streams>,
    repo: &str,
    op: fn(&Peer, &str, &[u8], &str),
) -> f64 {
    let t = Instant::now();
    let handles: Vec<_> = (0..blobs.len())
        .map(|i| {
            let (peer, blobs, repo) = (peer.clone(), blobs.clone(), repo.to_owned());
            std::thread::spawn(move || {
                for (b, d) in &blobs[i] {
                    op(&peer, &repo, b, d);
                }
            })
        })
        .collect();
    handles.into_iter().for_each(|h| h.join().unwrap());
    t.elapsed().as_secs_f64()
}

/// Per round: (wharf MB/s, wharf req/s, distribution MB/s, distribution req/s).
type Cell = Vec<(f64, f64, f64, f64)>;

/// The machine's own floor for a durable write of `blob` in `dir`: one
/// write of the whole blob from memory, then fsync (what `dd conv=fsync`
/// measures), in MB/s.
fn durable_write(dir: &std::path::Path, blob: &[u8]) -> f64 {
    use std::io::Write;
    let path = dir.join("floor");
    let t = Instant::now();
    let mut f = std::fs::File::create(&path).unwrap();
    f.write_all(blob).unwrap();
    f.sync_all().unwrap();
    let secs = t.elapsed().as_secs_f64();
    std::fs::remove_file(&path).unwrap();
    blob.len() as f64 / secs / 1e6
}

/// Flushes what earlier phases left dirty (distribution does not fsync
/// its blobs: the kernel would write them back during the next peer's
/// push), so every timed push starts from the same clean page cache.
fn settle() {
    let _ = Command::new("sync").status();
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
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
    let concurrencies: Vec<usize> = std::env::var("STREAMS")
        .unwrap_or_else(|_| "1,8".into())
        .split(',')
        .map(|c| c.parse().expect("STREAMS: numbers, e.g. 1,8"))
        .collect();
    // Rounds alternate which peer goes first, so a slow phase of the
    // machine does not always land on the same one.
    let rounds: usize = std::env::var("ROUNDS").map_or(1, |r| r.parse().expect("ROUNDS: a number"));
    let dirs = [
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
    ];
    let peers = [
        Arc::new(start_wharf(dirs[0].path())),
        Arc::new(start_distribution(dirs[1].path())),
    ];
    // (size, streams, op) → per-round results, in the order first seen.
    let mut cells: Vec<((String, usize, &'static str), Cell)> = Vec::new();
    let mut floors: Vec<(String, Vec<f64>)> = Vec::new();
    let mut seed = 0u64;
    for round in 0..rounds {
        for (size_name, size, count) in &sizes {
            for &concurrency in &concurrencies {
                // Every stream pushes its own blobs (distinct content, new
                // in every round).
                let per_thread = (*count / concurrency).max(1);
                let blobs: Streams = (0..concurrency)
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
                if *size >= 64 << 20 && concurrency == 1 {
                    settle();
                    let floor = durable_write(dirs[2].path(), &blobs[0][0].0);
                    match floors.iter_mut().find(|(n, _)| n == size_name) {
                        Some((_, v)) => v.push(floor),
                        None => floors.push((size_name.clone(), vec![floor])),
                    }
                }
                let blobs = Arc::new(blobs);
                let total_bytes = (concurrency * per_thread * size) as f64;
                let total_reqs = (concurrency * per_thread) as f64;
                let mut results = [[(0.0, 0.0); 2]; 2]; // [op][peer]
                let order: [usize; 2] = if round % 2 == 0 { [0, 1] } else { [1, 0] };
                for p in order {
                    let peer = &peers[p];
                    let repo = format!("bench/s{}c{concurrency}", size_name.to_lowercase());
                    settle();
                    let secs = in_streams(peer, &blobs, &repo, push);
                    results[0][p] = (total_bytes / secs / 1e6, total_reqs / secs);
                    let secs = in_streams(peer, &blobs, &repo, |peer, repo, b, d| {
                        assert_eq!(pull(peer, repo, d), b.len() as u64);
                    });
                    results[1][p] = (total_bytes / secs / 1e6, total_reqs / secs);
                }
                for (op, r) in ["push", "pull"].into_iter().zip(results) {
                    let key = (size_name.clone(), concurrency, op);
                    let row = (r[0].0, r[0].1, r[1].0, r[1].1);
                    match cells.iter_mut().find(|(k, _)| *k == key) {
                        Some((_, v)) => v.push(row),
                        None => cells.push((key, vec![row])),
                    }
                }
                eprintln!("round {} done {size_name} c{concurrency}", round + 1);
            }
        }
    }
    println!(
        "| blob | conc. | op | wharf MB/s | wharf blobs/s | distribution MB/s | distribution blobs/s | ratio, median (range) |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for ((size, concurrency, op), runs) in cells {
        let ratios: Vec<f64> = runs.iter().map(|r| r.0 / r.2).collect();
        let (lo, hi) = ratios
            .iter()
            .fold((f64::MAX, f64::MIN), |(l, h), &r| (l.min(r), h.max(r)));
        let col = |f: fn(&(f64, f64, f64, f64)) -> f64| median(runs.iter().map(f).collect());
        println!(
            "| {size} | {concurrency} | {op} | {:.1} | {:.0} | {:.1} | {:.0} | {:.2}× ({lo:.2}–{hi:.2}) |",
            col(|r| r.0),
            col(|r| r.1),
            col(|r| r.2),
            col(|r| r.3),
            median(ratios.clone()),
        );
    }
    for (size, v) in floors {
        let (lo, hi) = v
            .iter()
            .fold((f64::MAX, f64::MIN), |(l, h), &r| (l.min(r), h.max(r)));
        println!(
            "\nmachine floor, {size}: one write + fsync from memory (dd conv=fsync) {:.0} MB/s ({lo:.0}–{hi:.0})",
            median(v)
        );
    }
}
