//! `wharf serve` over a real socket: the component answers, and a trap,
//! the fuel and memory limits, a timeout and overload each end as the
//! response a client understands, while the server keeps serving.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use wharf_testkit::{Target, wasm};

use crate::server::{Response, call};

pub(crate) struct Serve {
    child: Child,
    pub(crate) base: String,
    _data: tempfile::TempDir,
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn serve(flags: &[&str]) -> Serve {
    serve_target(flags, wasm("http_hello", Target::P2).to_str().unwrap(), &[])
}

pub(crate) fn serve_target(flags: &[&str], target: &str, env: &[(&str, &str)]) -> Serve {
    let data = tempfile::tempdir().unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_wharf"))
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(data.path())
        .args(flags)
        .arg(target)
        .env_remove("WHARF_DATA_DIR")
        .envs(env.iter().copied())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let base = loop {
        let line = lines
            .next()
            .expect("wharf serve printed its address")
            .unwrap();
        if let Some(rest) = line.strip_prefix("wharf: serving ") {
            break rest.trim().to_owned();
        }
    };
    std::thread::spawn(move || for _ in lines {});
    Serve {
        child,
        base,
        _data: data,
    }
}

pub(crate) fn get(s: &Serve, path: &str) -> Response {
    call(
        ureq::AgentBuilder::new()
            .timeout(Duration::from_secs(30))
            .build()
            .get(&format!("{}{path}", s.base))
            .call(),
    )
}

#[test]
fn requests_get_the_components_answers_and_limits_end_as_status_codes() {
    let s = serve(&["--timeout", "1s", "--memory", "32MiB"]);
    let r = get(&s, "/hello?x=1");
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(
        String::from_utf8_lossy(&r.body),
        "hello from wharf: GET /hello?x=1\n"
    );
    assert_eq!(get(&s, "/status/418").status, 418);

    for (path, status, code) in [
        ("/trap", 500, "Trap"),
        ("/grow", 500, "MemoryLimit"),
        ("/spin", 504, "Timeout"),
    ] {
        let r = get(&s, path);
        assert_eq!(r.status, status, "{path}: {r:?}");
        assert_eq!(r.header("x-wharf-stop-code"), Some(code), "{path}: {r:?}");
        // The server keeps serving whatever one request did.
        assert_eq!(get(&s, "/after").status, 200, "after {path}");
    }

    let s = serve(&["--fuel", "100000"]);
    let r = get(&s, "/spin");
    assert_eq!(
        (r.status, r.header("x-wharf-stop-code")),
        (500, Some("OutOfFuel")),
        "{r:?}"
    );
}

#[test]
fn requests_beyond_the_concurrency_limit_get_503_with_retry_after() {
    let s = serve(&["--timeout", "2s", "--max-concurrency", "1"]);
    std::thread::scope(|scope| {
        // The slow request may itself meet a probe in the only slot; it
        // retries until it is the one holding it.
        let slow = scope.spawn(|| {
            loop {
                let r = get(&s, "/spin");
                if r.status != 503 {
                    return r;
                }
            }
        });
        // Until the slow request holds the only slot.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let busy = loop {
            let r = get(&s, "/quick");
            if r.status == 503 {
                break r;
            }
            assert!(std::time::Instant::now() < deadline, "never busy: {r:?}");
            std::thread::sleep(Duration::from_millis(20));
        };
        assert_eq!(busy.header("retry-after"), Some("1"), "{busy:?}");
        assert_eq!(slow.join().unwrap().status, 504);
    });
    // The slot is held until the timed-out instance is gone (the epoch
    // callback ends it within a tick or two), then serves again.
    let deadline = std::time::Instant::now() + Duration::from_secs(1);
    loop {
        let r = get(&s, "/quick");
        if r.status == 200 {
            break;
        }
        assert_eq!(r.status, 503, "{r:?}");
        assert!(
            std::time::Instant::now() < deadline,
            "the slot of a timed-out request was not freed"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn a_command_is_refused_with_what_it_is() {
    let out = Command::new(env!("CARGO_BIN_EXE_wharf"))
        .args(["serve", "--listen", "127.0.0.1:0"])
        .arg(wasm("hello", Target::P2))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("not an HTTP component") && stderr.contains("P2Command"),
        "{stderr}"
    );
}

#[test]
fn a_component_sees_only_the_env_and_directories_it_is_granted() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("note.txt"), "granted file").unwrap();
    let closed = serve(&[]);
    assert_eq!(get(&closed, "/env/HOME").body, b"<unset>");
    assert!(get(&closed, "/read/note.txt").body.starts_with(b"<"));
    let granted = serve(&[
        "--env",
        "GREETING=hi",
        "--dir",
        &format!("{}:/data:ro", dir.path().display()),
    ]);
    assert_eq!(get(&granted, "/env/GREETING").body, b"hi");
    assert_eq!(get(&granted, "/env/HOME").body, b"<unset>");
    assert_eq!(get(&granted, "/read/note.txt").body, b"granted file");
}

#[test]
fn a_component_is_served_from_a_registry_reference() {
    let registry = crate::server::Server::start();
    registry.push_sample("http_hello", Target::P2, "team/api:v1");
    let s = serve_target(
        &[],
        &format!("{}/team/api:v1", registry.host()),
        &[
            ("WHARF_TOKEN", &registry.token),
            ("WHARF_SERVER", &registry.base),
        ],
    );
    let r = get(&s, "/from-a-registry");
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.body, b"hello from wharf: GET /from-a-registry\n");
}

#[test]
fn a_slow_or_silent_client_is_dropped_and_huge_headers_are_refused() {
    use std::io::{Read, Write};
    let s = serve(&[]);
    let addr = s.base.trim_start_matches("http://");
    // One says nothing, one trickles a request line, one is kept alive
    // after a request: each loses its connection within the 10 s bound.
    let mut silent = std::net::TcpStream::connect(addr).unwrap();
    let mut slow = std::net::TcpStream::connect(addr).unwrap();
    slow.write_all(b"GET / HTTP/1.1\r\n").unwrap();
    let mut kept = std::net::TcpStream::connect(addr).unwrap();
    kept.write_all(b"GET /hello HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let started = std::time::Instant::now();
    for client in [&mut silent, &mut slow, &mut kept] {
        client
            .set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        let mut buf = Vec::new();
        let _ = client.read_to_end(&mut buf);
        let waited = started.elapsed();
        assert!(
            waited < Duration::from_secs(15),
            "a client held its connection for {waited:?}"
        );
    }
    // 200 KiB of headers: 431, hyper's answer, before any instance (its
    // own default limit is ~400 KiB, and it checks the limit only while a
    // head is incomplete: a head just past the limit may slip through).
    let mut big = std::net::TcpStream::connect(addr).unwrap();
    big.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let request = format!(
        "GET / HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\nConnection: close\r\n\r\n",
        "a".repeat(200 << 10)
    );
    let _ = big.write_all(request.as_bytes());
    let mut answer = Vec::new();
    let _ = big.read_to_end(&mut answer);
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 431"), "{answer}");
    // And it serves on.
    assert_eq!(get(&s, "/hello").status, 200);
}
