//! A `wasi:http/proxy` component (meaningful for wasm32-wasip2) that
//! waits before it answers: `/N` waits N milliseconds (blocked in a WASI
//! clock, using no fuel), for drain, autoscaling and timeout tests.
//! `GET /healthz` answers at once.
#![no_main]

use wasi::http::types::{Fields, IncomingRequest, OutgoingBody, OutgoingResponse, ResponseOutparam};

struct Slow;

wasi::http::proxy::export!(Slow);

impl wasi::exports::http::incoming_handler::Guest for Slow {
    fn handle(request: IncomingRequest, out: ResponseOutparam) {
        let path = request.path_with_query().unwrap_or_default();
        let ms: u64 = path
            .trim_start_matches('/')
            .split(['?', '/'])
            .next()
            .and_then(|n| n.parse().ok())
            .unwrap_or(0);
        if path != "/healthz" && ms > 0 {
            wasi::clocks::monotonic_clock::subscribe_duration(ms * 1_000_000).block();
        }
        let text = format!("waited {ms} ms\n");
        let response = OutgoingResponse::new(Fields::new());
        response.set_status_code(200).unwrap();
        let body = response.body().unwrap();
        ResponseOutparam::set(out, Ok(response));
        let stream = body.write().unwrap();
        stream.blocking_write_and_flush(text.as_bytes()).unwrap();
        drop(stream);
        OutgoingBody::finish(body, None).unwrap();
    }
}
