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
//!   written. One whose writes have not moved for `stall` is dropped.
//! - HTTP/2 lets a client hold a response without a blocked write: one
//!   that reads the socket (and answers pings) but grants no flow-control
//!   window leaves every response body it asked for waiting in hyper,
//!   never asked for its next frame — each holding its next chunk (a
//!   blob pull's is 1 MiB), up to 256 streams a connection. So a
//!   response body that hyper has not taken a piece of (or its end)
//!   within `stall` — counted from when the response was ready, and again
//!   from each piece taken or each wait for its own data — drops the
//!   connection too ([`CountedBody`]). Frames are handed out in pieces of
//!   at most [`H2_PIECE`] bytes on HTTP/2 (its own frame size; the
//!   streams of a connection share its window) and [`H1_PIECE`] on
//!   HTTP/1.1 (smaller pieces cost a large download a quarter of its
//!   speed there, and a client that does not read at all is also caught
//!   by its blocked writes), so a client that is slow but keeps taking a
//!   piece of each response within `stall` — at 60 s about 270 bytes/s a
//!   stream on HTTP/2, 4.3 KiB/s on HTTP/1.1 — keeps it going. Left: the
//!   last piece of a response whose body hyper has dropped sits in h2's
//!   send buffer until the client takes it, held while another request
//!   of the connection keeps it from idling (at most 256 × [`H2_PIECE`],
//!   4 MiB, a connection).
//! - A request body must bring [`MIN_REQUEST_BYTES`] (or its end) within
//!   each `stall`, or it fails ([`StallBody`], for the listeners whose
//!   handlers read bodies): one byte a minute would otherwise hold a
//!   connection and its handler for ever (Apache's `MinRate` idea).
//!
//! [`accept`] is the three listeners' accept loop (a place per
//! connection under a cap); [`Activity`] notes a connection's first byte
//! and blocked writes ([`Activity::io`]), its requests in flight — from
//! the call until the response body ends or is dropped
//! ([`Activity::begin`], [`CountedBody`], [`counted`]) — and the response
//! bodies that wait for hyper to ask for their next frame; [`supervise`]
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
    /// A write the client does not take, or a response body hyper takes
    /// no piece of, for it: dropped; a request body that
    /// brings less than [`MIN_REQUEST_BYTES`] in it fails.
    pub stall: Duration,
}

/// On HTTP/2, the largest frame a response body hands hyper at once (a
/// larger one goes in pieces), and the least of it a client must take
/// within each stall time.
pub const H2_PIECE: usize = 16 << 10;

/// The same on HTTP/1.1.
pub const H1_PIECE: usize = 256 << 10;

/// The least a request body must bring within each stall time (about
/// 1 KiB/s at 60 s).
pub const MIN_REQUEST_BYTES: usize = 64 << 10;

/// What a connection has done: whether a byte has arrived, how many of
/// its requests are in flight, when the last one ended, since when a
/// write waits for the client, and which response bodies wait for hyper
/// to ask for their next frame.
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
    /// Response bodies waiting for hyper to take a piece or their end: (body, since when in nanoseconds from `born`). At most one
    /// per stream.
    owed: std::sync::Mutex<Vec<(u64, u64)>>,
    /// Numbers the connection's response bodies.
    bodies: AtomicU64,
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
            owed: std::sync::Mutex::new(Vec::new()),
            bodies: AtomicU64::new(0),
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

    /// Body `body` waits for hyper to take a piece or its end, from now.
    fn owe(&self, body: u64) {
        let now = self.nanos();
        let mut owed = self.owed.lock().unwrap_or_else(|p| p.into_inner());
        match owed.iter_mut().find(|(b, _)| *b == body) {
            Some(entry) => entry.1 = now,
            None => owed.push((body, now)),
        }
    }

    /// Body `body` waits no more (for its own data, or it is done).
    fn paid(&self, body: u64) {
        let mut owed = self.owed.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(at) = owed.iter().position(|(b, _)| *b == body) {
            owed.swap_remove(at);
        }
    }

    /// Since when the body that has waited longest for hyper has waited,
    /// if one does.
    fn owed_since(&self) -> Option<Instant> {
        let owed = self.owed.lock().unwrap_or_else(|p| p.into_inner());
        let ns = owed.iter().map(|(_, since)| *since).min()?;
        Some(self.born + Duration::from_nanos(ns))
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
    B: Body<Data = Bytes> + Unpin + Send + 'static,
{
    let activity = activity.clone();
    hyper::service::service_fn(move |request| {
        let in_flight = activity.begin();
        let piece = match request.version() {
            http::Version::HTTP_2 => H2_PIECE,
            _ => H1_PIECE,
        };
        let response = handle(request);
        async move {
            Ok::<_, std::convert::Infallible>(
                response
                    .await
                    .map(|body| CountedBody::new(body, in_flight, piece)),
            )
        }
    })
}

/// A response body that keeps its request in flight until it ends or is
/// dropped (a streamed body is a request in progress), hands hyper its
/// frames in pieces of at most `piece` bytes, and notes on the
/// connection's [`Activity`] while it waits for hyper to take a piece or
/// its end — from its making, and from each piece handed — which
/// is a client not taking it. A wait for its own data (a stream, a
/// guest) is not the client's and ends the period.
#[derive(Debug)]
pub struct CountedBody<B> {
    inner: B,
    /// What is left of a frame larger than `piece`.
    rest: Bytes,
    /// The most handed at once.
    piece: usize,
    /// Its number on the connection.
    id: u64,
    /// Whether it waits for hyper (a period is running).
    owed: bool,
    /// Bytes handed to hyper in the current period.
    handed: usize,
    in_flight: InFlight,
}

impl<B> CountedBody<B> {
    /// `inner`, handed out at most `piece` bytes at once, holding
    /// `in_flight` for as long as it lives; waiting for hyper from now.
    pub fn new(inner: B, in_flight: InFlight, piece: usize) -> Self {
        let activity = &in_flight.0;
        let id = activity.bodies.fetch_add(1, Ordering::Relaxed);
        activity.owe(id);
        CountedBody {
            inner,
            rest: Bytes::new(),
            piece,
            id,
            owed: true,
            handed: 0,
            in_flight,
        }
    }

    /// Notes `n` bytes handed to hyper: a new period once a piece is
    /// (or once one starts after a wait for its own data).
    fn handed(&mut self, n: usize) {
        if !self.owed {
            self.owed = true;
            self.handed = n;
            self.in_flight.0.owe(self.id);
        } else if self.handed + n >= self.piece {
            self.handed = 0;
            self.in_flight.0.owe(self.id);
        } else {
            self.handed += n;
        }
    }

    fn pay(&mut self) {
        if self.owed {
            self.owed = false;
            self.in_flight.0.paid(self.id);
        }
    }
}

impl<B> Drop for CountedBody<B> {
    fn drop(&mut self) {
        self.pay();
    }
}

impl<B: Body<Data = Bytes> + Unpin> Body for CountedBody<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        if !this.rest.is_empty() {
            let piece = if this.rest.len() > this.piece {
                this.rest.split_to(this.piece)
            } else {
                std::mem::take(&mut this.rest)
            };
            this.handed(piece.len());
            return Poll::Ready(Some(Ok(Frame::data(piece))));
        }
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                let frame = match frame.into_data() {
                    Ok(mut data) => {
                        if data.len() > this.piece {
                            this.rest = data.split_off(this.piece);
                        }
                        this.handed(data.len());
                        Frame::data(data)
                    }
                    Err(frame) => {
                        this.handed(0);
                        frame
                    }
                };
                Poll::Ready(Some(Ok(frame)))
            }
            // Waiting for its own data is not the client's doing; an end
            // or an error ends the wait.
            polled => {
                this.pay();
                polled
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.rest.is_empty() && self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        let inner = self.inner.size_hint();
        let rest = self.rest.len() as u64;
        let mut hint = SizeHint::new();
        if let Some(upper) = inner.upper() {
            hint.set_upper(upper.saturating_add(rest));
        }
        hint.set_lower(inner.lower().saturating_add(rest));
        hint
    }
}

/// Runs `conn` (served over [`Activity::io`] with its requests counted)
/// to its end, under the [`Bounds`]: no byte within `silent` — dropped
/// (`None`); no request in flight for `idle` — closed with `graceful`,
/// as when `stopping` turns true; a write waiting for the client, or a
/// response body waiting for hyper to ask for its next frame, for
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
        let stall_at = (activity.blocked_since().into_iter())
            .chain(activity.owed_since())
            .min()
            .map(|since| since + bounds.stall);
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

/// A request body that fails once it has brought less than
/// [`MIN_REQUEST_BYTES`] (and not its end) in its `stall` time, counted
/// from its first read and again each time it completes that much. hyper has no body
/// read timeout: a client trickling an upload would hold its connection
/// and handler for ever, with nothing at all as with a byte a minute.
pub struct StallBody<B> {
    inner: B,
    stall: Duration,
    /// When the current period began (the first read, then each
    /// [`MIN_REQUEST_BYTES`] completed), and the bytes brought in it.
    since: Option<tokio::time::Instant>,
    brought: usize,
    /// Armed while a read waits, for the period's end.
    timer: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl<B> StallBody<B> {
    /// `inner`, failing when it brings less than [`MIN_REQUEST_BYTES`]
    /// in `stall`.
    pub fn new(inner: B, stall: Duration) -> Self {
        StallBody {
            inner,
            stall,
            since: None,
            brought: 0,
            timer: None,
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
        let since = *this.since.get_or_insert_with(tokio::time::Instant::now);
        if let Poll::Ready(frame) = Pin::new(&mut this.inner).poll_frame(cx) {
            if let Some(Ok(frame)) = &frame {
                this.brought += frame.data_ref().map_or(0, Bytes::len);
                if this.brought >= MIN_REQUEST_BYTES {
                    this.since = Some(tokio::time::Instant::now());
                    this.brought = 0;
                }
            }
            return Poll::Ready(frame.map(|f| f.map_err(Into::into)));
        }
        let deadline = since + this.stall;
        match &mut this.timer {
            Some(timer) if timer.deadline() == deadline => {}
            Some(timer) => timer.as_mut().reset(deadline),
            None => this.timer = Some(Box::pin(tokio::time::sleep_until(deadline))),
        }
        let timer = this.timer.as_mut().expect("armed above");
        if timer.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Some(Err(format!(
                "the request body is too slow: {} bytes in the last {:?}; at least {} KiB (or the rest of the body) must come within each {:?}",
                this.brought,
                this.stall,
                MIN_REQUEST_BYTES >> 10,
                this.stall
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

    /// Bounds where only `stall` matters.
    fn stall_bounds(stall: Duration) -> Bounds {
        Bounds {
            silent: SILENT,
            idle: stall * 10,
            stall,
        }
    }

    /// A connection's activity once it has said something.
    fn heard() -> Arc<Activity> {
        let activity = Activity::new();
        activity.heard.store(true, Ordering::Relaxed);
        activity
    }

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

    /// A request body that brings a [`MIN_REQUEST_BYTES`] within each `stall` goes on
    /// for as long as it likes; one that then trickles (a little, often)
    /// fails once a `stall` passes without a whole [`MIN_REQUEST_BYTES`].
    #[tokio::test]
    async fn a_request_body_that_trickles_fails() {
        use http_body_util::BodyExt;
        let stall = Duration::from_millis(200);
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, std::io::Error>>(4);
        let body = StallBody::new(http_body_util::StreamBody::new(tokio_stream_of(rx)), stall);
        tokio::spawn(async move {
            for _ in 0..4 {
                // Each within the stall time, all of them past it.
                tokio::time::sleep(stall / 2).await;
                tx.send(Ok(Frame::data(Bytes::from(vec![b'x'; MIN_REQUEST_BYTES]))))
                    .await
                    .unwrap();
            }
            // Then two bytes every quarter of it, with the sender open.
            for _ in 0..40 {
                tokio::time::sleep(stall / 4).await;
                if tx
                    .send(Ok(Frame::data(Bytes::from_static(b"ab"))))
                    .await
                    .is_err()
                {
                    return;
                }
            }
        });
        let mut body = body;
        let mut got = 0;
        let started = Instant::now();
        let failed = loop {
            match body.frame().await {
                Some(Ok(frame)) => got += frame.into_data().unwrap().len(),
                Some(Err(e)) => break e.to_string(),
                None => panic!("the body ended instead of failing"),
            }
        };
        assert!(
            (4 * MIN_REQUEST_BYTES..4 * MIN_REQUEST_BYTES + 20).contains(&got),
            "{got}"
        );
        assert!(failed.contains("too slow"), "{failed}");
        let took = started.elapsed();
        // The last whole piece came at 2 stall times.
        assert!(took >= stall * 3 && took < stall * 6, "{took:?}");
    }

    /// A response body hyper never asks for (an HTTP/2 stream the client
    /// grants no window), does not ask for again after a [`H2_PIECE`], or
    /// takes less than a [`H2_PIECE`] of in small frames, drops its
    /// connection after the stall time, although its request is in
    /// flight.
    #[tokio::test]
    async fn a_response_body_not_taken_drops_its_connection() {
        use http_body_util::BodyExt;
        let (_stop, stopping) = watch::channel(false);
        let stall = Duration::from_millis(300);
        let b = stall_bounds(stall);
        for frames_taken in [0, 1] {
            let activity = heard();
            let mut started = Instant::now();
            let mut body = CountedBody::new(
                http_body_util::Full::new(Bytes::from(vec![0u8; 3 * H2_PIECE])),
                activity.begin(),
                H2_PIECE,
            );
            for _ in 0..frames_taken {
                tokio::time::sleep(stall / 2).await;
                started = Instant::now();
                let frame = body.frame().await.unwrap().unwrap();
                assert_eq!(frame.into_data().unwrap().len(), H2_PIECE);
            }
            let conn = Closable::new(Arc::new(AtomicUsize::new(0)));
            let never = |_: Pin<&mut Closable>| panic!("a stalled connection is dropped");
            let done = tokio::time::timeout(
                stall * 5,
                supervise(conn, never, &activity, b, stopping.clone()),
            )
            .await
            .expect("dropped");
            assert_eq!(done, None, "after {frames_taken} frames");
            let took = started.elapsed();
            assert!(took >= stall && took < stall * 3, "{took:?}");
            drop(body);
            assert_eq!(activity.owed_since(), None);
        }

        // Frames of 100 bytes, each ready when asked for, asked for four
        // times a stall time: 400 bytes a period, short of an H2_PIECE.
        let activity = heard();
        let small =
            futures_util::stream::iter((0..1000).map(|_| {
                Ok::<_, std::convert::Infallible>(Frame::data(Bytes::from(vec![1u8; 100])))
            }));
        let started = Instant::now();
        let mut body = CountedBody::new(
            http_body_util::StreamBody::new(small),
            activity.begin(),
            H2_PIECE,
        );
        let reader = async move {
            while let Some(frame) = body.frame().await {
                frame.unwrap();
                tokio::time::sleep(stall / 4).await;
            }
        };
        let never = |_: Pin<&mut _>| panic!("a stalled connection is dropped");
        let done =
            tokio::time::timeout(stall * 5, supervise(reader, never, &activity, b, stopping))
                .await
                .expect("dropped");
        assert_eq!(done, None);
        let took = started.elapsed();
        assert!(took >= stall && took < stall * 3, "{took:?}");
    }

    /// A large frame goes to hyper in pieces, and a body that waits for
    /// its own data, or whose pieces are taken slowly but steadily, keeps
    /// its connection for longer than the stall time.
    #[tokio::test]
    async fn a_body_taken_in_pieces_or_waiting_for_its_data_keeps_its_connection() {
        use http_body_util::BodyExt;
        let (_stop, stopping) = watch::channel(false);
        let stall = Duration::from_secs(1);
        let b = stall_bounds(stall);
        let activity = heard();
        // Its data comes after two stall times, then one large frame.
        let data = futures_util::stream::unfold(0, move |i| async move {
            if i == 1 {
                return None;
            }
            tokio::time::sleep(stall * 2).await;
            let frame = Frame::data(Bytes::from(vec![7u8; 3 * H2_PIECE + 10]));
            Some((Ok::<_, std::convert::Infallible>(frame), i + 1))
        });
        let started = Instant::now();
        let mut body = CountedBody::new(
            http_body_util::StreamBody::new(Box::pin(data)),
            activity.begin(),
            H2_PIECE,
        );
        let reader = async move {
            let mut sizes = Vec::new();
            while let Some(frame) = body.frame().await {
                sizes.push(frame.unwrap().into_data().unwrap().len());
                // Taken slowly: the pieces together take longer than the
                // stall time.
                tokio::time::sleep(stall / 4).await;
            }
            sizes
        };
        let never = |_: Pin<&mut _>| panic!("closed a connection with a response going");
        let sizes = supervise(reader, never, &activity, b, stopping).await;
        assert_eq!(sizes, Some(vec![H2_PIECE, H2_PIECE, H2_PIECE, 10]));
        assert!(started.elapsed() >= stall * 3, "{:?}", started.elapsed());
        assert_eq!(activity.owed_since(), None);
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
        let activity = heard();
        let started = Instant::now();
        let request = activity.begin();
        let body = CountedBody::new(
            http_body_util::Empty::<bytes::Bytes>::new(),
            request,
            H2_PIECE,
        );
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

        let activity = heard();
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
        let activity = heard();
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
