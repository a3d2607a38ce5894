//! `kill -9` of the server in the middle of uploads, then a restart: every
//! stored blob's bytes hash to its name, and nothing half-written is served.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use crate::server::{Server, call, sha256};

/// Deterministic pseudo-random bytes, different per (thread, round).
fn payload(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

#[test]
fn kill_9_during_uploads_leaves_only_whole_verified_blobs() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start_in(dir.path());
    let (base, token) = (server.base.clone(), server.token.clone());
    let stop = Arc::new(AtomicBool::new(false));
    let completed = Arc::new(AtomicUsize::new(0));
    let workers: Vec<_> = (0..4u64)
        .map(|t| {
            let (base, token, stop, completed) =
                (base.clone(), token.clone(), stop.clone(), completed.clone());
            std::thread::spawn(move || {
                let auth = format!("Bearer {token}");
                for round in 0..200u64 {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    let bytes = payload(t * 1000 + round, (1 << 20) + (round as usize * 4099));
                    let digest = sha256(&bytes);
                    let ok = if round % 2 == 0 {
                        // Monolithic.
                        ureq::post(&format!(
                            "{base}/v2/crash/t{t}/blobs/uploads/?digest={digest}"
                        ))
                        .set("Authorization", &auth)
                        .send_bytes(&bytes)
                        .is_ok()
                    } else {
                        // Chunked, 256 KiB at a time.
                        let Ok(r) = ureq::post(&format!("{base}/v2/crash/t{t}/blobs/uploads/"))
                            .set("Authorization", &auth)
                            .call()
                        else {
                            break;
                        };
                        let mut location =
                            format!("{base}{}", r.header("location").unwrap_or_default());
                        let mut ok = true;
                        for (i, chunk) in bytes.chunks(256 << 10).enumerate() {
                            let start = i * (256 << 10);
                            let range = format!("{start}-{}", start + chunk.len() - 1);
                            match ureq::patch(&location)
                                .set("Authorization", &auth)
                                .set("Content-Range", &range)
                                .send_bytes(chunk)
                            {
                                Ok(r) => {
                                    location = format!(
                                        "{base}{}",
                                        r.header("location").unwrap_or_default()
                                    )
                                }
                                Err(_) => {
                                    ok = false;
                                    break;
                                }
                            }
                        }
                        ok && ureq::put(&format!("{location}?digest={digest}"))
                            .set("Authorization", &auth)
                            .call()
                            .is_ok()
                    };
                    if ok {
                        completed.fetch_add(1, Ordering::Relaxed);
                    } else {
                        break;
                    }
                }
            })
        })
        .collect();
    // Let uploads get going, then crash the server mid-flight.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while completed.load(Ordering::Relaxed) < 8 && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(150));
    server.kill9();
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.join().unwrap();
    }
    let done = completed.load(Ordering::Relaxed);
    assert!(done >= 8, "only {done} uploads completed before the crash");

    let server = Server::start_in(dir.path());
    // Every stored blob is whole: its bytes hash to its name.
    let blobs = dir.path().join("registry/blobs/sha256");
    let mut stored = 0;
    for entry in std::fs::read_dir(&blobs).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        assert_eq!(
            sha256(&std::fs::read(&path).unwrap()),
            format!("sha256:{name}"),
            "blob {name} is corrupt"
        );
        stored += 1;
    }
    assert!(stored >= done, "{stored} blobs stored, {done} acknowledged");
    assert_eq!(
        std::fs::read_dir(dir.path().join("registry/_tmp"))
            .unwrap()
            .count(),
        0
    );
    // Everything the server serves is whole too.
    for t in 0..4 {
        for entry in std::fs::read_dir(
            dir.path()
                .join(format!("registry/repositories/crash/t{t}/_links/sha256")),
        )
        .into_iter()
        .flatten()
        {
            let hex = entry.unwrap().file_name().to_string_lossy().into_owned();
            let r = call(
                server
                    .req("GET", &format!("/v2/crash/t{t}/blobs/sha256:{hex}"))
                    .call(),
            );
            assert_eq!(r.status, 200);
            assert_eq!(sha256(&r.body), format!("sha256:{hex}"));
        }
    }
}
