//! What the API's and the ingress's listeners (and `wharf serve`'s) do
//! with a connection around hyper, for the bounds hyper does not keep on
//! its own ([`Bounds`]):
//!
//! - hyper's header timeout starts only once hyper-util's auto builder
//!   has sniffed the protocol from the first bytes, so a client that
//!   connects and sends nothing would hold its connection for ever: one
//!   that has sent no byte within `silent` is dropped.
//! - HTTP/1.1 waits for the next request of a kept-alive connection at
//!   most its header timeout, but hyper gives an HTTP/2 connection with
//!   no stream open no timeout at all (pings a client answers keep it
//!   alive): a connection with no request in flight for `idle` is closed
//!   gracefully (GOAWAY on HTTP/2).
//! - hyper has no write timeout: a client that stops reading (its TCP
//!   window full) holds the connection while a response waits to be
//!   written. One whose writes have not moved for `stall` is dropped; and
//!   a request body that sends no byte for as long fails
//!   ([`StallBody`], for the listeners whose handlers read bodies).
//!
//! [`accept`] is the three listeners' accept loop (a place per
//! connection under a cap); [`Activity`] notes a connection's first byte
//! and blocked writes ([`Activity::io`]) and its requests in flight —
//! from the call until the response body ends or is dropped
//! ([`Activity::begin`], [`CountedBody`], [`counted`]) — and [`supervise`]
//! runs the connection under these rules and the server's shutdown.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::watch;

/// How long a connection may be silent, idle, or stalled; see the module.
#[derive(Debug, Clone, Copy)]
pub struct Bounds {
    /// No byte at all within it: dropped.
    pub silent: Duration,
    /// No request in flight for it: closed gracefully.
    pub idle: Duration,
    /// A write the client does not take, or a request body that sends
    /// nothing, for it: dropped, or the body fails.
    pub stall: Duration,
}

/// What a connection has done: whether a byte has arrived, how many of
/// its requests are in flight, when the last one ended, and since when a
/// write waits for the client.
#[derive(Debug)]
pub struct Activity {
    heard: AtomicBool,
    in_flight: AtomicUsize,
    /// When the connection last had no request in flight: nanoseconds
    /// from `born`.
    quiet_since: AtomicU64,
    /// Since when a write has been waiting: nanoseconds from `born`, plus
    /// one; 0 while none waits.
    blocked_since: AtomicU64,
    born: Instant,
}

impl Activity {
    /// A new connection's.
    pub fn new() -> Arc<Activity> {
        Arc::new(Activity {
            heard: AtomicBool::new(false),
            in_flight: AtomicUsize::new(0),
            quiet_since: AtomicU64::new(0),
            blocked_since: AtomicU64::new(0),
            born: Instant::now(),
        })
    }

    /// `io`, noting the first byte read from it and writes that wait.
    pub fn io<S>(self: &Arc<Self>, io: S) -> Watched<S> {
        Watched {
            io,
            activity: self.clone(),
        }
    }

    fn nanos(&self) -> u64 {
        u64::try_from(self.born.elapsed().as_nanos()).unwrap_or(u64::MAX - 1)
    }

    /// Notes whether a write (or flush) had to wait.
    fn wrote<T>(&self, polled: &Poll<T>) {
        if polled.is_pending() {
            if self.blocked_since.load(Ordering::Relaxed) == 0 {
                self.blocked_since
                    .store(self.nanos() + 1, Ordering::Relaxed);
            }
        } else if self.blocked_since.load(Ordering::Relaxed) != 0 {
            self.blocked_since.store(0, Ordering::Relaxed);
        }
    }

    /// Since when a write has been waiting for the client, if one is.
    fn blocked_since(&self) -> Option<Instant> {
        match self.blocked_since.load(Ordering::Relaxed) {
            0 => None,
            ns => Some(self.born + Duration::from_nanos(ns - 1)),
        }
    }

    /// A request begins; it is in flight until the guard is dropped (move
    /// it into the response's [`CountedBody`]).
    pub fn begin(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        InFlight(self.clone())
    }

    /// Since when no request has been in flight; `None` while one is.
    fn quiet_since(&self) -> Option<Instant> {
        if self.in_flight.load(Ordering::Acquire) > 0 {
            return None;
        }
        let ns = self.quiet_since.load(Ordering::Acquire);
        Some(self.born + Duration::from_nanos(ns))
    }
}

/// A request in flight on its connection's [`Activity`].
#[derive(Debug)]
pub struct InFlight(Arc<Activity>);

impl Drop for InFlight {
    fn drop(&mut self) {
        let a = &self.0;
        // Stamped before the count drops, so a reader that sees none in
        // flight sees this request's end.
        a.quiet_since.fetch_max(a.nanos(), Ordering::AcqRel);
        a.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Accepts connections on `listener` until `stop` resolves, holding at
/// most as many at once as `places` has permits (the next wait in the
/// kernel's backlog until one closes): each is handed, without Nagle's
/// delay and with its place (held until dropped), to `serve`, which
/// spawns what serves it. A failed accept (out of file descriptors, say)
/// is logged and retried after 50 ms.
pub async fn accept(
    listener: &tokio::net::TcpListener,
    places: &Arc<tokio::sync::Semaphore>,
    stop: impl Future<Output = ()>,
    mut serve: impl FnMut(
        tokio::net::TcpStream,
        std::net::SocketAddr,
        tokio::sync::OwnedSemaphorePermit,
    ),
) {
    tokio::pin!(stop);
    loop {
        let place = tokio::select! {
            p = places.clone().acquire_owned() => p.expect("never closed"),
            () = &mut stop => return,
        };
        let (tcp, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut stop => return,
        };
        let _ = tcp.set_nodelay(true);
        serve(tcp, peer, place);
    }
}

/// `handle` as a hyper service whose requests count on `activity` from
/// their call until their response bodies end.
pub fn counted<F, Fut, B>(
    activity: &Arc<Activity>,
    handle: F,
) -> impl hyper::service::Service<
    http::Request<hyper::body::Incoming>,
    Response = http::Response<CountedBody<B>>,
    Error = std::convert::Infallible,
    Future: Send + 'static,
> + Clone
+ Send
+ 'static
where
    F: Fn(http::Request<hyper::body::Incoming>) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = http::Response<B>> + Send + 'static,
    B: Body + Unpin + Send + 'static,
{
    let activity = activity.clone();
    hyper::service::service_fn(move |request| {
        let in_flight = activity.begin();
        let response = handle(request);
        async move {
            Ok::<_, std::convert::Infallible>(
                response.await.map(|body| CountedBody::new(body, in_flight)),
            )
        }
    })
}

/// A response body that keeps its request in flight until it ends or is
/// dropped (a streamed body is a request in progress).
#[derive(Debug)]
pub struct CountedBody<B> {
    inner: B,
    _in_flight: InFlight,
}

impl<B> CountedBody<B> {
    /// `inner`, holding `in_flight` for as long as it lives.
    pub fn new(inner: B, in_flight: InFlight) -> Self {
        CountedBody {
            inner,
            _in_flight: in_flight,
        }
    }
}

impl<B: Body + Unpin> Body for CountedBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Runs `conn` (served over [`Activity::io`] with its requests counted)
/// to its end, under the [`Bounds`]: no byte within `silent` — dropped
/// (`None`); no request in flight for `idle` — closed with `graceful`,
/// as when `stopping` turns true; a write waiting for the client for
/// `stall` — dropped. A connection still open with nothing in flight for
/// `idle` after a graceful close (an HTTP/2 client that never answers the
/// ping of a graceful GOAWAY) is dropped too.
pub async fn supervise<C: Future>(
    conn: C,
    mut graceful: impl FnMut(Pin<&mut C>),
    activity: &Activity,
    bounds: Bounds,
    mut stopping: watch::Receiver<bool>,
) -> Option<C::Output> {
    tokio::pin!(conn);
    let check = tokio::time::sleep(bounds.silent);
    tokio::pin!(check);
    let mut stopped = false;
    if !activity.heard.load(Ordering::Relaxed) {
        tokio::select! {
            done = conn.as_mut() => return Some(done),
            () = check.as_mut() => {}
            Ok(_) = stopping.wait_for(|stop| *stop) => stopped = true,
        }
        // Silent all along, or at shutdown: not waited for.
        if !activity.heard.load(Ordering::Relaxed) {
            return None;
        }
    }
    let idle = bounds.idle;
    // What is due from `from` (or from the end of the last request, if
    // later): `Err(())` to drop the connection (a stalled write), `Ok(None)`
    // when idle for `idle`, else `Ok(Some(when to look again))`.
    let next_check = |from: Instant| -> Result<Option<Instant>, ()> {
        let now = Instant::now();
        let stall_at = activity.blocked_since().map(|since| since + bounds.stall);
        if stall_at.is_some_and(|at| at <= now) {
            return Err(());
        }
        let at = match activity.quiet_since() {
            Some(since) if now.saturating_duration_since(since.max(from)) >= idle => {
                return Ok(None);
            }
            Some(since) => since.max(from) + idle,
            None => now + idle,
        };
        Ok(Some(stall_at.map_or(at, |stall| stall.min(at))))
    };
    let born = activity.born;
    // A server whose stop signal is gone has no shutdown to wait for.
    let mut may_stop = true;
    while !stopped {
        match next_check(born) {
            Err(()) => return None,
            Ok(None) => break,
            Ok(Some(at)) => check.as_mut().reset(at.into()),
        }
        tokio::select! {
            done = conn.as_mut() => return Some(done),
            () = check.as_mut() => {}
            stop = stopping.wait_for(|stop| *stop), if may_stop => {
                stopped = stop.is_ok();
                may_stop = stopped;
            }
        }
    }
    graceful(conn.as_mut());
    let closing = Instant::now();
    loop {
        match next_check(closing) {
            Err(()) | Ok(None) => return None,
            Ok(Some(at)) => check.as_mut().reset(at.into()),
        }
        tokio::select! {
            done = conn.as_mut() => return Some(done),
            () = check.as_mut() => {}
        }
    }
}

/// A request body that fails once it has sent nothing for its `stall`
/// time while read (hyper has no body read timeout: a client trickling
/// an upload would hold its connection and handler for ever).
pub struct StallBody<B> {
    inner: B,
    stall: Duration,
    /// Armed while a read waits.
    timer: Option<Pin<Box<tokio::time::Sleep>>>,
    waiting: bool,
}

impl<B> StallBody<B> {
    /// `inner`, failing after `stall` without a byte.
    pub fn new(inner: B, stall: Duration) -> Self {
        StallBody {
            inner,
            stall,
            timer: None,
            waiting: false,
        }
    }
}

impl<B> Body for StallBody<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        if let Poll::Ready(frame) = Pin::new(&mut this.inner).poll_frame(cx) {
            this.waiting = false;
            return Poll::Ready(frame.map(|f| f.map_err(Into::into)));
        }
        let deadline = tokio::time::Instant::now() + this.stall;
        let timer = this
            .timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        if !this.waiting {
            timer.as_mut().reset(deadline);
            this.waiting = true;
        }
        if timer.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Some(Err(format!(
                "the client sent no byte of the request body for {} s",
                this.stall.as_secs()
            )
            .into())));
        }
        Poll::Pending
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A connection's io, noting on its [`Activity`] that a byte has arrived
/// and whether writes wait.
#[derive(Debug)]
pub struct Watched<S> {
    io: S,
    activity: Arc<Activity>,
}

impl<S: AsyncRead + Unpin> AsyncRead for Watched<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.io).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.activity.heard.store(true, Ordering::Relaxed);
        }
        polled
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Watched<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let polled = Pin::new(&mut self.io).poll_write(cx, data);
        self.activity.wrote(&polled);
        polled
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let polled = Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        self.activity.wrote(&polled);
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let polled = Pin::new(&mut self.io).poll_flush(cx);
        self.activity.wrote(&polled);
        polled
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    const SILENT: Duration = Duration::from_millis(100);
    const IDLE: Duration = Duration::from_millis(300);

    fn bounds(silent: Duration, idle: Duration) -> Bounds {
        Bounds {
            silent,
            idle,
            stall: Duration::from_secs(60),
        }
    }

    /// A client that stops reading while a response is written: dropped
    /// once the write has waited `stall`, although a request is in flight.
    #[tokio::test]
    async fn a_connection_whose_writes_stall_is_dropped() {
        let (_stop, stopping) = watch::channel(false);
        let (server, mut client) = tokio::io::duplex(64);
        let activity = Activity::new();
        client.write_all(b"x").await.unwrap();
        let io = activity.io(server);
        let writer = activity.clone();
        let conn = async move {
            let mut io = io;
            let mut byte = [0u8; 1];
            io.read_exact(&mut byte).await.unwrap();
            let _request = writer.begin();
            // Far more than the pipe holds; the client reads none of it.
            io.write_all(&[0u8; 4096]).await.unwrap();
        };
        let never = |_: Pin<&mut _>| panic!("a stalled connection is dropped, not closed");
        let stall = Duration::from_millis(200);
        let started = Instant::now();
        let b = Bounds {
            silent: SILENT,
            idle: IDLE,
            stall,
        };
        assert_eq!(supervise(conn, never, &activity, b, stopping).await, None);
        let took = started.elapsed();
        assert!(took >= stall && took < stall + IDLE * 2, "{took:?}");
        drop(client);
    }

    /// A request body with nothing more for `stall` fails; one whose
    /// bytes keep coming does not.
    #[tokio::test]
    async fn a_request_body_that_stalls_fails() {
        use http_body_util::BodyExt;
        let stall = Duration::from_millis(200);
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, std::io::Error>>(4);
        let body = StallBody::new(http_body_util::StreamBody::new(tokio_stream_of(rx)), stall);
        tokio::spawn(async move {
            for _ in 0..4 {
                // Each within the stall time, all of them past it.
                tokio::time::sleep(stall / 2).await;
                tx.send(Ok(Frame::data(Bytes::from_static(b"ab"))))
                    .await
                    .unwrap();
            }
            // Then nothing, and the sender kept open.
            tokio::time::sleep(stall * 10).await;
            drop(tx);
        });
        let mut body = body;
        let mut got = Vec::new();
        let started = Instant::now();
        let failed = loop {
            match body.frame().await {
                Some(Ok(frame)) => got.extend_from_slice(&frame.into_data().unwrap()),
                Some(Err(e)) => break e.to_string(),
                None => panic!("the body ended instead of failing"),
            }
        };
        assert_eq!(got, b"abababab");
        assert!(failed.contains("sent no byte"), "{failed}");
        let took = started.elapsed();
        assert!(took >= stall * 2 + stall && took < stall * 6, "{took:?}");
    }

    /// A receiver as a stream (without tokio-stream).
    fn tokio_stream_of<T: Send + 'static>(
        mut rx: tokio::sync::mpsc::Receiver<T>,
    ) -> impl futures_util::Stream<Item = T> + Unpin {
        Box::pin(futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx)))
    }

    /// A silent peer is dropped at the timeout; one that has said
    /// something is served to the end, however long that takes, while it
    /// has a request in flight.
    #[tokio::test]
    async fn a_silent_connection_is_dropped_and_a_busy_one_is_not() {
        let (_stop, stopping) = watch::channel(false);
        let echo_one = |io: Watched<tokio::io::DuplexStream>, activity: Arc<Activity>| async move {
            let mut io = io;
            let mut byte = [0u8; 1];
            io.read_exact(&mut byte).await.unwrap();
            let _request = activity.begin();
            // Longer than both timeouts, with a request in flight.
            tokio::time::sleep(IDLE * 2).await;
            io.write_all(&byte).await.unwrap();
            byte[0]
        };
        let never = |_: Pin<&mut _>| panic!("closed a connection that was not idle");
        let (server, _client) = tokio::io::duplex(64);
        let activity = Activity::new();
        let conn = echo_one(activity.io(server), activity.clone());
        let done = supervise(
            conn,
            never,
            &activity,
            bounds(SILENT, IDLE),
            stopping.clone(),
        )
        .await;
        assert_eq!(done, None);

        let (server, mut client) = tokio::io::duplex(64);
        let activity = Activity::new();
        client.write_all(b"x").await.unwrap();
        let conn = echo_one(activity.io(server), activity.clone());
        let done = supervise(conn, never, &activity, bounds(SILENT, IDLE), stopping).await;
        assert_eq!(done, Some(b'x'));
        let mut back = [0u8; 1];
        client.read_exact(&mut back).await.unwrap();
        assert_eq!(&back, b"x");
    }

    /// A connection that stays open (as an HTTP/2 one with no stream
    /// does): closed once nothing has been in flight for `idle`, counted
    /// from its last request's end — or at once when the server stops.
    #[tokio::test]
    async fn an_idle_connection_is_closed_after_its_last_request_and_on_shutdown() {
        let (stop, stopping) = watch::channel(false);
        let closes = Arc::new(AtomicUsize::new(0));
        let close = |c: Pin<&mut Closable>| c.close();
        let activity = Activity::new();
        activity.heard.store(true, Ordering::Relaxed);
        let started = Instant::now();
        let request = activity.begin();
        let body = CountedBody::new(http_body_util::Empty::<bytes::Bytes>::new(), request);
        tokio::spawn(async move {
            // A response body streamed for longer than IDLE.
            tokio::time::sleep(IDLE * 2).await;
            drop(body);
        });
        let conn = Closable::new(closes.clone());
        let done = supervise(
            conn,
            close,
            &activity,
            bounds(SILENT, IDLE),
            stopping.clone(),
        )
        .await;
        assert_eq!(done, Some(()));
        assert_eq!(closes.load(Ordering::Relaxed), 1);
        let took = started.elapsed();
        assert!(
            took >= IDLE * 3,
            "closed {took:?} in, before its body ended + IDLE"
        );
        assert!(took < IDLE * 5, "closed {took:?} in");

        let activity = Activity::new();
        activity.heard.store(true, Ordering::Relaxed);
        let started = Instant::now();
        tokio::spawn(async move {
            tokio::time::sleep(IDLE / 3).await;
            stop.send_replace(true);
        });
        let conn = Closable::new(closes.clone());
        let done = supervise(
            conn,
            close,
            &activity,
            bounds(SILENT, IDLE * 10),
            stopping.clone(),
        )
        .await;
        assert_eq!(done, Some(()));
        assert_eq!(closes.load(Ordering::Relaxed), 2);
        assert!(started.elapsed() < IDLE * 2, "{:?}", started.elapsed());
    }

    /// Closed for being idle but still open an idle time later (an HTTP/2
    /// client that never answers the GOAWAY's ping): dropped.
    #[tokio::test]
    async fn a_connection_that_does_not_close_when_asked_is_dropped() {
        let (_stop, stopping) = watch::channel(false);
        let closes = Arc::new(AtomicUsize::new(0));
        let activity = Activity::new();
        activity.heard.store(true, Ordering::Relaxed);
        let started = Instant::now();
        let mut conn = Closable::new(closes.clone());
        conn.sticky = true;
        let close = |c: Pin<&mut Closable>| c.close();
        let done = supervise(conn, close, &activity, bounds(SILENT, IDLE), stopping).await;
        assert_eq!(done, None);
        assert_eq!(closes.load(Ordering::Relaxed), 1);
        let took = started.elapsed();
        assert!(took >= IDLE * 2 && took < IDLE * 4, "{took:?}");
    }

    /// At shutdown a connection that has sent nothing is not waited for.
    #[tokio::test]
    async fn a_silent_connection_is_dropped_at_shutdown() {
        let (stop, stopping) = watch::channel(false);
        let activity = Activity::new();
        let conn = Closable::new(Arc::new(AtomicUsize::new(0)));
        let close = |_: Pin<&mut Closable>| panic!("a silent connection is dropped, not closed");
        stop.send_replace(true);
        let started = Instant::now();
        let done = supervise(
            conn,
            close,
            &activity,
            bounds(IDLE * 10, IDLE * 10),
            stopping,
        )
        .await;
        assert_eq!(done, None);
        assert!(started.elapsed() < IDLE, "{:?}", started.elapsed());
    }

    /// A connection that ends only once closed (or never, if `sticky`:
    /// a peer that does not answer the close).
    struct Closable {
        closed: bool,
        sticky: bool,
        closes: Arc<AtomicUsize>,
    }

    impl Closable {
        fn new(closes: Arc<AtomicUsize>) -> Self {
            Closable {
                closed: false,
                sticky: false,
                closes,
            }
        }

        fn close(mut self: Pin<&mut Self>) {
            self.closed = !self.sticky;
            self.closes.fetch_add(1, Ordering::Relaxed);
        }
    }

    impl Future for Closable {
        type Output = ();

        fn poll(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<()> {
            if self.closed {
                Poll::Ready(())
            } else {
                Poll::Pending
            }
        }
    }
}
