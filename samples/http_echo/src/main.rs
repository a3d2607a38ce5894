//! A `wasi:http/proxy` component (meaningful for wasm32-wasip2) that
//! answers with the request it got, as JSON: method, path, headers and
//! body — what a service behind the ingress sees (forwarded headers, the
//! request id). `GET /healthz` answers `ok`; `/fail-health` answers 500
//! (for health-check tests); the variable `VERSION`, if set, is in every
//! answer (for rolling-update tests).
#![no_main]

use wasi::http::types::{
    Fields, IncomingRequest, Method, OutgoingBody, OutgoingResponse, ResponseOutparam,
};
use wasi::io::streams::StreamError;

struct Echo;

wasi::http::proxy::export!(Echo);

fn json_string(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 2);
    out.push('"');
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

fn respond(out: ResponseOutparam, status: u16, content_type: &str, body: &[u8]) {
    let headers = Fields::new();
    headers
        .set("content-type", &[content_type.as_bytes().to_vec()])
        .unwrap();
    let response = OutgoingResponse::new(headers);
    response.set_status_code(status).unwrap();
    let outgoing = response.body().unwrap();
    ResponseOutparam::set(out, Ok(response));
    let stream = outgoing.write().unwrap();
    for chunk in body.chunks(4096) {
        stream.blocking_write_and_flush(chunk).unwrap();
    }
    drop(stream);
    OutgoingBody::finish(outgoing, None).unwrap();
}

impl wasi::exports::http::incoming_handler::Guest for Echo {
    fn handle(request: IncomingRequest, out: ResponseOutparam) {
        let path = request.path_with_query().unwrap_or_default();
        let version = std::env::var("VERSION").unwrap_or_default();
        match path.as_str() {
            "/healthz" => return respond(out, 200, "text/plain", b"ok\n"),
            "/fail-health" => return respond(out, 500, "text/plain", b"unhealthy\n"),
            _ => {}
        }
        let method = match request.method() {
            Method::Get => "GET".to_owned(),
            Method::Head => "HEAD".to_owned(),
            Method::Post => "POST".to_owned(),
            Method::Put => "PUT".to_owned(),
            Method::Delete => "DELETE".to_owned(),
            Method::Patch => "PATCH".to_owned(),
            Method::Options => "OPTIONS".to_owned(),
            Method::Other(m) => m,
            other => format!("{other:?}"),
        };
        let headers: Vec<String> = request
            .headers()
            .entries()
            .into_iter()
            .map(|(k, v)| {
                format!(
                    "[{},{}]",
                    json_string(&k),
                    json_string(&String::from_utf8_lossy(&v))
                )
            })
            .collect();
        let mut body = Vec::new();
        if let Ok(incoming) = request.consume() {
            let stream = incoming.stream().unwrap();
            loop {
                match stream.blocking_read(64 << 10) {
                    Ok(chunk) => body.extend_from_slice(&chunk),
                    Err(StreamError::Closed) => break,
                    // The host ended the body (over the ingress's limit).
                    Err(StreamError::LastOperationFailed(_)) => {
                        return respond(out, 400, "text/plain", b"the request body failed\n");
                    }
                }
            }
        }
        println!("echo: {method} {path} ({} body bytes)", body.len());
        let text = format!(
            "{{\"method\":{},\"path\":{},\"version\":{},\"headers\":[{}],\"body\":{}}}\n",
            json_string(&method),
            json_string(&path),
            json_string(&version),
            headers.join(","),
            json_string(&String::from_utf8_lossy(&body)),
        );
        respond(out, 200, "application/json", text.as_bytes());
    }
}
