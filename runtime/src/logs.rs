//! A task's stdout and stderr as timestamped lines in a bounded buffer that
//! readers can page through and follow *while the task runs*.
//!
//! The guest writes through [`LogStream`], a WASI output stream that never
//! blocks and never grows without bound: complete lines are appended, the
//! oldest lines are evicted once the buffer holds more than its byte limit,
//! and an over-long line is cut into pieces of [`MAX_LINE_BYTES`]. Readers
//! address lines by a sequence number that keeps counting across evictions,
//! so a follower knows when it fell behind.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::SystemTime;

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::p2::{OutputStream, Pollable, StreamResult};

/// A line longer than this is split: it bounds the partial-line buffer a
/// guest can make the host hold by writing without newlines.
pub const MAX_LINE_BYTES: usize = 16 * 1024;

/// The default retention per task (both streams together): enough for a
/// long run of diagnostics, small enough for thousands of tasks per node.
pub const DEFAULT_RETAINED_BYTES: usize = 1 << 20;

/// What a line costs the retention budget beyond its text: the record
/// around it (sequence number, timestamp, stream, the string's header, its
/// queue slot) in memory, and about as much as JSON in the store. Counting
/// it means a guest printing empty lines forever keeps a bounded number of
/// them, not millions.
pub const LINE_OVERHEAD_BYTES: usize = 64;

fn line_cost(text: &str) -> usize {
    text.len() + LINE_OVERHEAD_BYTES
}

/// How much a guest may write in one WASI `write` call (the permit).
const WRITE_PERMIT: usize = 64 * 1024;

/// Which stream a line came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Stream {
    /// The guest's standard output.
    Stdout,
    /// The guest's standard error.
    Stderr,
}

impl Stream {
    /// The stream's name, as serialized: `stdout` or `stderr`.
    pub fn as_str(self) -> &'static str {
        match self {
            Stream::Stdout => "stdout",
            Stream::Stderr => "stderr",
        }
    }

    /// The stream named `name` (anything but `stderr` is standard output).
    pub fn named(name: &str) -> Stream {
        if name == "stderr" {
            Stream::Stderr
        } else {
            Stream::Stdout
        }
    }
}

/// One line of output, without its newline.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogLine {
    /// Position in the task's log, starting at 0, never reused.
    pub seq: u64,
    /// When the line was completed.
    pub at: SystemTime,
    /// Which stream wrote it.
    pub stream: Stream,
    /// The text; invalid UTF-8 is replaced.
    pub text: String,
}

/// A page of lines returned by [`LogBuffer::read_from`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogPage {
    /// The lines, oldest first.
    pub lines: Vec<LogLine>,
    /// The sequence number to ask for next.
    pub next_seq: u64,
    /// Lines between the requested position and the first returned one that
    /// were evicted before they could be read.
    pub missed: u64,
    /// The task has finished and no line will follow `next_seq`.
    pub closed: bool,
}

/// The bounded, followable log of one task.
#[derive(Debug)]
pub struct LogBuffer {
    inner: Mutex<Inner>,
    changed: Notify,
    retained_bytes: usize,
}

#[derive(Debug, Default)]
struct Inner {
    lines: VecDeque<LogLine>,
    bytes: usize,
    next_seq: u64,
    partial: [Vec<u8>; 2],
    closed: bool,
}

impl LogBuffer {
    /// A buffer that keeps roughly the last `retained_bytes` of text.
    pub fn new(retained_bytes: usize) -> Arc<Self> {
        Arc::new(LogBuffer {
            inner: Mutex::default(),
            changed: Notify::new(),
            retained_bytes,
        })
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding this lock cannot leave the buffer in a state
        // worse than missing a line, so poisoning is ignored.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Appends bytes written by the guest to `stream`.
    pub fn write(&self, stream: Stream, mut bytes: &[u8]) {
        let mut inner = self.lock();
        if inner.closed {
            return;
        }
        let mut added = false;
        while !bytes.is_empty() {
            let slot = stream as usize;
            let room = MAX_LINE_BYTES - inner.partial[slot].len();
            let take = bytes.len().min(room);
            match bytes[..take].iter().position(|&b| b == b'\n') {
                Some(nl) => {
                    inner.partial[slot].extend_from_slice(&bytes[..nl]);
                    bytes = &bytes[nl + 1..];
                    self.push_partial(&mut inner, stream);
                    added = true;
                }
                None => {
                    inner.partial[slot].extend_from_slice(&bytes[..take]);
                    bytes = &bytes[take..];
                    if inner.partial[slot].len() == MAX_LINE_BYTES {
                        self.push_partial(&mut inner, stream);
                        added = true;
                    }
                }
            }
        }
        drop(inner);
        if added {
            self.changed.notify_waiters();
        }
    }

    fn push_partial(&self, inner: &mut Inner, stream: Stream) {
        let raw = std::mem::take(&mut inner.partial[stream as usize]);
        let text = match String::from_utf8(raw) {
            Ok(text) => text,
            Err(e) => String::from_utf8_lossy(e.as_bytes()).into_owned(),
        };
        inner.bytes += line_cost(&text);
        let seq = inner.next_seq;
        inner.next_seq += 1;
        inner.lines.push_back(LogLine {
            seq,
            at: SystemTime::now(),
            stream,
            text,
        });
        while inner.bytes > self.retained_bytes && inner.lines.len() > 1 {
            let old = inner.lines.pop_front().expect("more than one line");
            inner.bytes -= line_cost(&old.text);
        }
    }

    /// Ends the log: unterminated lines are kept, followers are woken and
    /// told nothing more will come.
    pub fn close(&self) {
        let mut inner = self.lock();
        for stream in [Stream::Stdout, Stream::Stderr] {
            if !inner.partial[stream as usize].is_empty() {
                self.push_partial(&mut inner, stream);
            }
        }
        inner.closed = true;
        drop(inner);
        self.changed.notify_waiters();
    }

    /// Opens a closed log again, for another run of the same task (an
    /// edge node restarting a failed task while its server is away): lines
    /// and their numbers go on where they stopped.
    pub fn reopen(&self) {
        self.lock().closed = false;
    }

    /// Lines from sequence number `from` on, at most `max` of them.
    pub fn read_from(&self, from: u64, max: usize) -> LogPage {
        let inner = self.lock();
        let first = inner.lines.front().map_or(inner.next_seq, |l| l.seq);
        let start = from.max(first);
        let skip = (start - first) as usize;
        let lines: Vec<LogLine> = inner.lines.iter().skip(skip).take(max).cloned().collect();
        let next_seq = lines
            .last()
            .map_or(start.min(inner.next_seq), |l| l.seq + 1);
        LogPage {
            missed: start.saturating_sub(from.min(start)),
            closed: inner.closed && next_seq >= inner.next_seq,
            lines,
            next_seq,
        }
    }

    /// Every retained line, oldest first.
    pub fn lines(&self) -> Vec<LogLine> {
        self.read_from(0, usize::MAX).lines
    }

    /// The retained stdout text, lines joined with `\n` (for tests and
    /// small tools).
    pub fn stdout_text(&self) -> String {
        self.lines()
            .into_iter()
            .filter(|l| l.stream == Stream::Stdout)
            .map(|l| l.text + "\n")
            .collect()
    }

    /// Waits until a line with sequence number `>= seq` exists or the log
    /// is closed. Returns at once if that is already the case.
    pub async fn wait_for(&self, seq: u64) {
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let inner = self.lock();
                if inner.closed || inner.next_seq > seq {
                    return;
                }
            }
            notified.await;
        }
    }
}

/// The WASI side of a [`LogBuffer`]: one per stream, given to the guest as
/// its stdout or stderr.
#[derive(Debug, Clone)]
pub struct LogStream {
    buffer: Arc<LogBuffer>,
    stream: Stream,
}

impl LogStream {
    /// A stream that appends to `buffer` as `stream`.
    pub fn new(buffer: Arc<LogBuffer>, stream: Stream) -> Self {
        LogStream { buffer, stream }
    }
}

impl IsTerminal for LogStream {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for LogStream {
    fn p2_stream(&self) -> Box<dyn OutputStream> {
        Box::new(self.clone())
    }

    fn async_stream(&self) -> Box<dyn tokio::io::AsyncWrite + Send + Sync> {
        Box::new(self.clone())
    }
}

#[wasmtime_wasi::async_trait]
impl Pollable for LogStream {
    async fn ready(&mut self) {}
}

impl OutputStream for LogStream {
    fn write(&mut self, bytes: Bytes) -> StreamResult<()> {
        self.buffer.write(self.stream, &bytes);
        Ok(())
    }

    fn flush(&mut self) -> StreamResult<()> {
        Ok(())
    }

    fn check_write(&mut self) -> StreamResult<usize> {
        Ok(WRITE_PERMIT)
    }
}

impl tokio::io::AsyncWrite for LogStream {
    fn poll_write(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        self.buffer.write(self.stream, buf);
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn texts(buffer: &LogBuffer) -> Vec<String> {
        buffer.lines().into_iter().map(|l| l.text).collect()
    }

    #[test]
    fn splits_lines_across_writes_and_streams() {
        let buffer = LogBuffer::new(1024);
        buffer.write(Stream::Stdout, b"hel");
        buffer.write(Stream::Stderr, b"oops\n");
        buffer.write(Stream::Stdout, b"lo\nworld\nta");
        assert_eq!(texts(&buffer), ["oops", "hello", "world"]);
        buffer.close();
        assert_eq!(texts(&buffer), ["oops", "hello", "world", "ta"]);
        assert_eq!(buffer.lines()[0].stream, Stream::Stderr);
        assert_eq!(buffer.stdout_text(), "hello\nworld\nta\n");
    }

    #[test]
    fn evicts_oldest_lines_beyond_the_limit_and_counts_misses() {
        // Room for two 5-byte lines and their records.
        let buffer = LogBuffer::new(2 * (5 + LINE_OVERHEAD_BYTES));
        for i in 0..10 {
            buffer.write(Stream::Stdout, format!("line{i}\n").as_bytes());
        }
        let page = buffer.read_from(0, 100);
        assert_eq!(page.lines.iter().map(|l| l.seq).collect::<Vec<_>>(), [8, 9]);
        assert_eq!(page.missed, 8);
        assert_eq!(page.next_seq, 10);
        assert!(!page.closed);
        let later = buffer.read_from(10, 100);
        assert!(later.lines.is_empty());
        assert_eq!(later.next_seq, 10);
        assert_eq!(later.missed, 0);
    }

    #[test]
    fn empty_lines_cost_their_record_so_a_flood_of_them_stays_bounded() {
        let buffer = LogBuffer::new(64 << 10);
        for _ in 0..100_000 {
            buffer.write(Stream::Stdout, b"\n\n\n\n\n\n\n\n\n\n");
        }
        let kept = buffer.lines().len();
        assert_eq!(kept, (64 << 10) / LINE_OVERHEAD_BYTES);
        assert_eq!(buffer.read_from(0, 1).missed, 1_000_000 - kept as u64);
    }

    #[test]
    fn cuts_lines_longer_than_the_maximum() {
        let buffer = LogBuffer::new(1 << 20);
        buffer.write(Stream::Stdout, &vec![b'x'; MAX_LINE_BYTES * 2 + 5]);
        buffer.close();
        let lens: Vec<usize> = buffer.lines().iter().map(|l| l.text.len()).collect();
        assert_eq!(lens, [MAX_LINE_BYTES, MAX_LINE_BYTES, 5]);
    }

    #[test]
    fn a_reopened_log_goes_on_numbering() {
        let buffer = LogBuffer::new(1 << 10);
        buffer.write(Stream::Stdout, b"one\n");
        buffer.close();
        buffer.write(Stream::Stdout, b"lost\n");
        buffer.reopen();
        buffer.write(Stream::Stdout, b"two\n");
        let page = buffer.read_from(0, 10);
        let texts: Vec<&str> = page.lines.iter().map(|l| l.text.as_str()).collect();
        assert_eq!(texts, ["one", "two"]);
        assert_eq!(page.lines[1].seq, 1);
        assert!(!page.closed);
    }

    #[test]
    fn pages_and_closed_flag() {
        let buffer = LogBuffer::new(1024);
        buffer.write(Stream::Stdout, b"a\nb\nc\n");
        let page = buffer.read_from(0, 2);
        assert_eq!(page.lines.len(), 2);
        assert_eq!(page.next_seq, 2);
        buffer.close();
        let rest = buffer.read_from(page.next_seq, 10);
        assert_eq!(rest.lines[0].text, "c");
        assert!(rest.closed);
        buffer.write(Stream::Stdout, b"after close\n");
        assert_eq!(buffer.lines().len(), 3);
    }

    #[tokio::test]
    async fn followers_wake_on_new_lines_and_on_close() {
        let buffer = LogBuffer::new(1024);
        let follower = {
            let buffer = buffer.clone();
            tokio::spawn(async move {
                buffer.wait_for(0).await;
                let first = buffer.read_from(0, 10);
                buffer.wait_for(first.next_seq).await;
                (first, buffer.read_from(1, 10))
            })
        };
        tokio::task::yield_now().await;
        buffer.write(Stream::Stdout, b"one\n");
        tokio::task::yield_now().await;
        buffer.close();
        let (first, second) = follower.await.unwrap();
        assert_eq!(first.lines[0].text, "one");
        assert!(second.closed);
    }
}
