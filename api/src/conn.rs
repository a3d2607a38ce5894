//! What the API's and the ingress's listeners do with a connection
//! before and around hyper: hyper's header timeout starts only once
//! hyper-util's auto builder has sniffed the protocol from the first
//! bytes, so a client that connects and sends nothing would hold its
//! connection for ever. [`heard`] notes the first byte read, and
//! [`drop_if_silent`] ends a connection that has sent none in time.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// `io`, and a flag that turns true once a byte has been read from it.
pub fn heard<S>(io: S) -> (FirstBytes<S>, Arc<AtomicBool>) {
    let flag = Arc::new(AtomicBool::new(false));
    (
        FirstBytes {
            io,
            heard: flag.clone(),
        },
        flag,
    )
}

/// Runs `conn` (a connection over [`heard`]'s io) to its end, unless no
/// byte has arrived within `timeout`: then it is dropped (`None`).
pub async fn drop_if_silent<F: Future>(
    conn: F,
    heard: &AtomicBool,
    timeout: Duration,
) -> Option<F::Output> {
    tokio::pin!(conn);
    tokio::select! {
        done = &mut conn => return Some(done),
        () = tokio::time::sleep(timeout) => {}
    }
    if heard.load(Ordering::Relaxed) {
        Some(conn.await)
    } else {
        None
    }
}

/// A connection's io, noting that a byte has arrived.
#[derive(Debug)]
pub struct FirstBytes<S> {
    io: S,
    heard: Arc<AtomicBool>,
}

impl<S: AsyncRead + Unpin> AsyncRead for FirstBytes<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.io).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.heard.store(true, Ordering::Relaxed);
        }
        polled
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for FirstBytes<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, data)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    /// A silent peer is dropped at the timeout; one that has said
    /// something is served to the end, however long that takes.
    #[tokio::test]
    async fn a_silent_connection_is_dropped_and_a_talking_one_is_not() {
        let timeout = Duration::from_millis(100);
        let echo_one = |io: FirstBytes<tokio::io::DuplexStream>| async move {
            let mut io = io;
            let mut byte = [0u8; 1];
            io.read_exact(&mut byte).await.unwrap();
            // Longer than the timeout, after the first byte.
            tokio::time::sleep(Duration::from_millis(300)).await;
            io.write_all(&byte).await.unwrap();
            byte[0]
        };
        let (server, _client) = tokio::io::duplex(64);
        let (io, flag) = heard(server);
        assert_eq!(drop_if_silent(echo_one(io), &flag, timeout).await, None);

        let (server, mut client) = tokio::io::duplex(64);
        let (io, flag) = heard(server);
        client.write_all(b"x").await.unwrap();
        assert_eq!(
            drop_if_silent(echo_one(io), &flag, timeout).await,
            Some(b'x')
        );
        let mut back = [0u8; 1];
        client.read_exact(&mut back).await.unwrap();
        assert_eq!(&back, b"x");
    }
}
