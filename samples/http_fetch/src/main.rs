//! A `wasi:http/proxy` component (meaningful for wasm32-wasip2) that calls
//! out: `/?url=http://HOST[:PORT]/PATH` fetches the URL with
//! `wasi:http/outgoing-handler` and answers `fetched STATUS: BODY`, or 502
//! with the WASI HTTP error code when the host refused or failed it (a
//! denied destination is `HttpRequestDenied`).
#![no_main]

use wasi::http::outgoing_handler;
use wasi::http::types::{
    Fields, IncomingRequest, OutgoingBody, OutgoingRequest, OutgoingResponse, ResponseOutparam,
    Scheme,
};
use wasi::io::streams::StreamError;

struct Fetch;

wasi::http::proxy::export!(Fetch);

fn respond(out: ResponseOutparam, status: u16, text: &str) {
    let response = OutgoingResponse::new(Fields::new());
    response.set_status_code(status).unwrap();
    let body = response.body().unwrap();
    ResponseOutparam::set(out, Ok(response));
    let stream = body.write().unwrap();
    for chunk in text.as_bytes().chunks(4096) {
        stream.blocking_write_and_flush(chunk).unwrap();
    }
    drop(stream);
    OutgoingBody::finish(body, None).unwrap();
}

/// `http://host:port/path` → (scheme, authority, path).
fn split(url: &str) -> Option<(Scheme, String, String)> {
    let (scheme, rest) = url.split_once("://")?;
    let scheme = match scheme {
        "http" => Scheme::Http,
        "https" => Scheme::Https,
        _ => return None,
    };
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    Some((scheme, authority.to_owned(), path.to_owned()))
}

fn fetch(url: &str) -> Result<(u16, String), String> {
    let (scheme, authority, path) = split(url).ok_or_else(|| format!("bad url {url}"))?;
    let request = OutgoingRequest::new(Fields::new());
    request.set_scheme(Some(&scheme)).unwrap();
    request.set_authority(Some(&authority)).unwrap();
    request.set_path_with_query(Some(&path)).unwrap();
    let body = request.body().unwrap();
    OutgoingBody::finish(body, None).unwrap();
    let future = outgoing_handler::handle(request, None).map_err(|e| format!("{e:?}"))?;
    future.subscribe().block();
    let response = future
        .get()
        .ok_or("no response")?
        .map_err(|()| "response taken twice".to_owned())?
        .map_err(|e| format!("{e:?}"))?;
    let status = response.status();
    let incoming = response.consume().map_err(|()| "no body")?;
    let stream = incoming.stream().map_err(|()| "no body stream")?;
    let mut bytes = Vec::new();
    loop {
        match stream.blocking_read(64 << 10) {
            Ok(chunk) => bytes.extend_from_slice(&chunk),
            Err(StreamError::Closed) => break,
            Err(e) => return Err(format!("{e:?}")),
        }
        if bytes.len() > 1 << 20 {
            break;
        }
    }
    Ok((status, String::from_utf8_lossy(&bytes).into_owned()))
}

impl wasi::exports::http::incoming_handler::Guest for Fetch {
    fn handle(request: IncomingRequest, out: ResponseOutparam) {
        let path = request.path_with_query().unwrap_or_default();
        if path == "/healthz" {
            return respond(out, 200, "ok\n");
        }
        let Some(url) = path.split_once("url=").map(|(_, u)| u.to_owned()) else {
            return respond(out, 400, "give ?url=http://host/path\n");
        };
        match fetch(&url) {
            Ok((status, body)) => respond(out, 200, &format!("fetched {status}: {body}")),
            Err(e) => respond(out, 502, &format!("fetch failed: {e}\n")),
        }
    }
}
