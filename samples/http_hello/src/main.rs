//! A `wasi:http/proxy` component (meaningful for wasm32-wasip2): answers
//! `hello from wharf: METHOD PATH`, and misbehaves on request to exercise
//! the server's limits: `/trap` aborts, `/spin` loops forever, `/grow`
//! grows memory without end, `/status/N` answers with status N; `/env/K`
//! answers the variable K and `/read/F` the file `/data/F`, to show what a
//! server grants (nothing unless asked).
#![no_main]

use wasi::http::types::{
    Fields, IncomingRequest, Method, OutgoingBody, OutgoingResponse, ResponseOutparam,
};

struct Hello;

wasi::http::proxy::export!(Hello);

impl wasi::exports::http::incoming_handler::Guest for Hello {
    fn handle(request: IncomingRequest, out: ResponseOutparam) {
        let path = request.path_with_query().unwrap_or_default();
        let method = match request.method() {
            Method::Get => "GET".to_owned(),
            Method::Post => "POST".to_owned(),
            other => format!("{other:?}"),
        };
        let mut status = 200;
        let mut text = format!("hello from wharf: {method} {path}\n");
        match path.as_str() {
            "/trap" => std::process::abort(),
            "/spin" => {
                let mut n: u64 = 0;
                loop {
                    n = std::hint::black_box(n.wrapping_add(1));
                }
            }
            "/grow" => {
                let mut held: Vec<Vec<u8>> = Vec::new();
                loop {
                    held.push(vec![1u8; 1 << 20]);
                }
            }
            p if p.starts_with("/status/") => {
                status = p["/status/".len()..].parse().unwrap_or(500);
            }
            p if p.starts_with("/env/") => {
                text = std::env::var(&p["/env/".len()..]).unwrap_or_else(|_| "<unset>".into());
            }
            p if p.starts_with("/read/") => {
                text = std::fs::read_to_string(format!("/data/{}", &p["/read/".len()..]))
                    .unwrap_or_else(|e| format!("<{e}>"));
            }
            _ => {}
        }
        let response = OutgoingResponse::new(Fields::new());
        response.set_status_code(status).unwrap();
        let body = response.body().unwrap();
        ResponseOutparam::set(out, Ok(response));
        let stream = body.write().unwrap();
        stream
            .blocking_write_and_flush(text.as_bytes())
            .unwrap();
        drop(stream);
        OutgoingBody::finish(body, None).unwrap();
    }
}
