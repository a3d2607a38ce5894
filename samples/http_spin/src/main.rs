//! A `wasi:http/proxy` component (meaningful for wasm32-wasip2) that
//! passes its health check (`GET /healthz` answers `ok`) and loops
//! forever on every other request, burning fuel: the request timeout (or
//! the fuel limit) must end it while the server serves on.
#![no_main]

use wasi::http::types::{Fields, IncomingRequest, OutgoingBody, OutgoingResponse, ResponseOutparam};

struct Spin;

wasi::http::proxy::export!(Spin);

impl wasi::exports::http::incoming_handler::Guest for Spin {
    fn handle(request: IncomingRequest, out: ResponseOutparam) {
        if request.path_with_query().as_deref() != Some("/healthz") {
            let mut n: u64 = 0;
            loop {
                n = std::hint::black_box(n.wrapping_add(1));
            }
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
