//! A `wasi:http/proxy` component (meaningful for wasm32-wasip2) that
//! passes its health check (`GET /healthz` answers `ok`) and traps on
//! every other request: a broken release that looks alive, for the
//! circuit breaker's 5xx share.
#![no_main]

use wasi::http::types::{Fields, IncomingRequest, OutgoingBody, OutgoingResponse, ResponseOutparam};

struct Trap;

wasi::http::proxy::export!(Trap);

impl wasi::exports::http::incoming_handler::Guest for Trap {
    fn handle(request: IncomingRequest, out: ResponseOutparam) {
        if request.path_with_query().as_deref() != Some("/healthz") {
            eprintln!("http_trap: giving up");
            std::process::abort();
        }
        let response = OutgoingResponse::new(Fields::new());
        let body = response.body().unwrap();
        ResponseOutparam::set(out, Ok(response));
        let stream = body.write().unwrap();
        stream.blocking_write_and_flush(b"ok\n").unwrap();
        drop(stream);
        OutgoingBody::finish(body, None).unwrap();
    }
}
