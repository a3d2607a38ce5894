//! A tiny HTTP server on a loopback address that answers with a closure
//! and records every request: the "internal service" an attacker aims the
//! server at, or a hostile registry.

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// One request as the fake saw it.
#[derive(Debug, Clone)]
pub(crate) struct Seen {
    pub(crate) path: String,
    pub(crate) headers: Vec<(String, String)>,
}

impl Seen {
    pub(crate) fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// What to do with a request.
pub(crate) enum Answer {
    /// Status, headers and body.
    Full(u16, Vec<(String, String)>, Vec<u8>),
    /// Status line and headers claiming `len` bytes, then `sent` zero bytes
    /// written as fast as the peer reads them (until it hangs up).
    Claim { len: u64, sent: u64 },
    /// Never answer; hold the connection open.
    Silence,
}

pub(crate) fn ok(content_type: &str, body: &[u8]) -> Answer {
    Answer::Full(
        200,
        vec![("Content-Type".into(), content_type.into())],
        body.to_vec(),
    )
}

pub(crate) struct Fake {
    pub(crate) addr: String,
    seen: Arc<Mutex<Vec<Seen>>>,
    /// Bytes of `Claim` bodies written before the peer hung up.
    pub(crate) written: Arc<Mutex<u64>>,
}

impl Fake {
    /// Serves on `ip` (any port) with `answer`.
    pub(crate) fn start(
        ip: &str,
        answer: impl Fn(&Seen) -> Answer + Send + Sync + 'static,
    ) -> Fake {
        let listener = TcpListener::bind((ip, 0)).unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let written = Arc::new(Mutex::new(0));
        let answer = Arc::new(answer);
        {
            let (seen, written) = (seen.clone(), written.clone());
            std::thread::spawn(move || {
                for stream in listener.incoming() {
                    let Ok(stream) = stream else { return };
                    let (seen, written, answer) = (seen.clone(), written.clone(), answer.clone());
                    std::thread::spawn(move || serve(stream, &seen, &written, &*answer));
                }
            });
        }
        Fake {
            addr,
            seen,
            written,
        }
    }

    pub(crate) fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
}

fn serve(
    stream: TcpStream,
    seen: &Mutex<Vec<Seen>>,
    written: &Mutex<u64>,
    answer: &dyn Fn(&Seen) -> Answer,
) {
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut stream = stream;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        let mut parts = line.split_whitespace();
        let _method = parts.next();
        let path = parts.next().unwrap_or_default().to_owned();
        let mut headers = Vec::new();
        loop {
            let mut h = String::new();
            if reader.read_line(&mut h).unwrap_or(0) == 0 {
                return;
            }
            let h = h.trim_end();
            if h.is_empty() {
                break;
            }
            if let Some((k, v)) = h.split_once(':') {
                headers.push((k.trim().to_owned(), v.trim().to_owned()));
            }
        }
        let request = Seen { path, headers };
        seen.lock().unwrap().push(request.clone());
        match answer(&request) {
            Answer::Full(status, headers, body) => {
                let mut head = format!("HTTP/1.1 {status} X\r\nContent-Length: {}\r\n", body.len());
                for (k, v) in headers {
                    head.push_str(&format!("{k}: {v}\r\n"));
                }
                head.push_str("\r\n");
                if stream.write_all(head.as_bytes()).is_err() || stream.write_all(&body).is_err() {
                    return;
                }
            }
            Answer::Claim { len, sent } => {
                let head = format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: {len}\r\n\r\n"
                );
                if stream.write_all(head.as_bytes()).is_err() {
                    return;
                }
                let chunk = vec![0u8; 64 << 10];
                let mut done = 0;
                while done < sent {
                    let n = chunk.len().min((sent - done) as usize);
                    if stream.write_all(&chunk[..n]).is_err() {
                        break;
                    }
                    done += n as u64;
                    *written.lock().unwrap() = done;
                }
                return;
            }
            Answer::Silence => {
                std::thread::sleep(Duration::from_secs(300));
                return;
            }
        }
    }
}
