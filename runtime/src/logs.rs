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

fn line_cost(len: usize) -> usize {
    len + LINE_OVERHEAD_BYTES
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
///
/// Held for every running task, so its memory is what a long-running
/// task costs: a retained line is a 16-byte record and its text, back to
/// back with the other lines' text in one ring, and nothing more (a
/// `VecDeque<LogLine>` cost 56 bytes a line and a 32-byte allocation for
/// its text). What it holds stays within its retention budget for lines
/// of ~10 bytes and more (the budget counts [`LINE_OVERHEAD_BYTES`] a
/// line), and within 1.5 times it for any lines (a single line longer
/// than the budget aside).
#[derive(Debug)]
pub struct LogBuffer {
    inner: Mutex<Inner>,
    changed: Notify,
    retained_bytes: usize,
}

/// One retained line; its text is the next `len` bytes of `Inner::text`.
#[derive(Debug, Clone, Copy)]
struct Meta {
    /// When the line was completed: nanoseconds since the Unix epoch.
    at: u64,
    len: u32,
    stream: Stream,
}

#[derive(Debug, Default)]
struct Inner {
    /// The retained lines, oldest first.
    meta: VecDeque<Meta>,
    /// Their text (each line valid UTF-8), oldest first.
    text: VecDeque<u8>,
    /// The sequence number of `meta[0]`.
    first_seq: u64,
    /// What the retained lines cost the budget (`line_cost` each).
    bytes: usize,
    /// Each stream's unterminated line: empty (no allocation) while a
    /// guest writes whole lines.
    partial: [Vec<u8>; 2],
    closed: bool,
}

impl Inner {
    fn next_seq(&self) -> u64 {
        self.first_seq + self.meta.len() as u64
    }

    /// Where line `index`'s text starts in `text`, counted from whichever
    /// end is nearer.
    fn offset(&self, index: usize) -> usize {
        if index <= self.meta.len() / 2 {
            self.meta.range(..index).map(|m| m.len as usize).sum()
        } else {
            self.text.len()
                - self
                    .meta
                    .range(index..)
                    .map(|m| m.len as usize)
                    .sum::<usize>()
        }
    }

    fn line(&self, index: usize, start: usize) -> LogLine {
        let meta = self.meta[index];
        let end = start + meta.len as usize;
        let (a, b) = self.text.as_slices();
        let mut bytes = Vec::with_capacity(meta.len as usize);
        if start < a.len() {
            bytes.extend_from_slice(&a[start..end.min(a.len())]);
        }
        if end > a.len() {
            bytes.extend_from_slice(&b[start.saturating_sub(a.len())..end - a.len()]);
        }
        LogLine {
            seq: self.first_seq + index as u64,
            at: SystemTime::UNIX_EPOCH + std::time::Duration::from_nanos(meta.at),
            stream: meta.stream,
            // Kept as valid UTF-8, so this never replaces anything.
            text: match String::from_utf8(bytes) {
                Ok(text) => text,
                Err(e) => String::from_utf8_lossy(e.as_bytes()).into_owned(),
            },
        }
    }

    /// Bytes allocated for the retained lines and partial lines.
    #[cfg(test)]
    fn held_bytes(&self) -> usize {
        self.meta.capacity() * std::mem::size_of::<Meta>()
            + self.text.capacity()
            + self.partial.iter().map(Vec::capacity).sum::<usize>()
    }
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
        let slot = stream as usize;
        let mut added = false;
        while !bytes.is_empty() {
            let room = MAX_LINE_BYTES - inner.partial[slot].len();
            let take = bytes.len().min(room);
            match bytes[..take].iter().position(|&b| b == b'\n') {
                Some(nl) => {
                    self.push_line(&mut inner, stream, &bytes[..nl]);
                    bytes = &bytes[nl + 1..];
                    added = true;
                }
                None => {
                    inner.partial[slot].extend_from_slice(&bytes[..take]);
                    bytes = &bytes[take..];
                    if inner.partial[slot].len() == MAX_LINE_BYTES {
                        self.push_line(&mut inner, stream, &[]);
                        added = true;
                        // A line of exactly the maximum ends here, not in
                        // an empty line after it.
                        if let Some(rest) = bytes.strip_prefix(b"\n") {
                            bytes = rest;
                        }
                    }
                }
            }
        }
        drop(inner);
        if added {
            self.changed.notify_waiters();
        }
    }

    /// Retains the line that is `stream`'s partial line followed by `tail`.
    fn push_line(&self, inner: &mut Inner, stream: Stream, tail: &[u8]) {
        let mut partial = std::mem::take(&mut inner.partial[stream as usize]);
        let line = if partial.is_empty() {
            tail
        } else {
            partial.extend_from_slice(tail);
            partial.as_slice()
        };
        let text = String::from_utf8_lossy(line);
        let len = text.len();
        // Room first: the oldest lines go before the new one is added, so
        // the ring holds at most the budget's text. It grows by doubling,
        // but never past the budget unless one line alone needs more.
        while inner.bytes + line_cost(len) > self.retained_bytes && !inner.meta.is_empty() {
            let old = inner.meta.pop_front().expect("a line");
            inner.text.drain(..old.len as usize);
            inner.bytes -= line_cost(old.len as usize);
            inner.first_seq += 1;
        }
        let need = inner.text.len() + len;
        if need > inner.text.capacity() {
            let target = (inner.text.capacity() * 2).clamp(need, self.retained_bytes.max(need));
            let more = target - inner.text.len();
            inner.text.reserve_exact(more);
        }
        inner.text.extend(text.as_bytes());
        inner.bytes += line_cost(len);
        let at = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX));
        inner.meta.push_back(Meta {
            at,
            len: len as u32,
            stream,
        });
    }

    /// Ends the log: unterminated lines are kept, followers are woken and
    /// told nothing more will come.
    pub fn close(&self) {
        let mut inner = self.lock();
        for stream in [Stream::Stdout, Stream::Stderr] {
            if !inner.partial[stream as usize].is_empty() {
                self.push_line(&mut inner, stream, &[]);
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
        let first = inner.first_seq;
        let next = inner.next_seq();
        let start = from.clamp(first, next);
        let skip = (start - first) as usize;
        let count = inner.meta.len().saturating_sub(skip).min(max);
        let mut lines = Vec::with_capacity(count);
        let mut at = inner.offset(skip);
        for index in skip..skip + count {
            lines.push(inner.line(index, at));
            at += inner.meta[index].len as usize;
        }
        let next_seq = lines.last().map_or(start.min(next), |l| l.seq + 1);
        LogPage {
            missed: start.saturating_sub(from.min(start)),
            closed: inner.closed && next_seq >= next,
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
                if inner.closed || inner.next_seq() > seq {
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
    fn short_lines_are_held_within_the_retention_budget() {
        let retained = 64 << 10;
        let buffer = LogBuffer::new(retained);
        for n in 0..100_000 {
            buffer.write(Stream::Stdout, format!("heartbeat {n}\n").as_bytes());
        }
        let held = buffer.lock().held_bytes();
        // A VecDeque<LogLine> and a String per line held ~84 KiB here.
        assert!(
            held <= retained,
            "{held} bytes held for a budget of {retained}"
        );
        let lines = buffer.lines();
        assert_eq!(lines.len(), retained / line_cost("heartbeat 99999".len()));
        assert_eq!(lines.last().unwrap().text, "heartbeat 99999");
        assert_eq!(lines.last().unwrap().seq, 99_999);
    }

    #[test]
    fn lines_of_any_length_are_held_within_one_and_a_half_budgets() {
        let retained = 64 << 10;
        for len in [0, 1, 10, 100, 1_000, 5_000, MAX_LINE_BYTES - 1] {
            let buffer = LogBuffer::new(retained);
            let line = format!("{}\n", "x".repeat(len));
            for _ in 0..(4 * retained / (len + 1)).max(2_000) {
                buffer.write(Stream::Stderr, line.as_bytes());
            }
            let held = buffer.lock().held_bytes();
            assert!(
                held <= retained * 3 / 2,
                "lines of {len}: {held} bytes held"
            );
            assert!(buffer.lines().iter().all(|l| l.text.len() == len));
        }
    }

    #[test]
    fn lines_read_back_whole_across_the_rings_wrap_with_their_time() {
        let buffer = LogBuffer::new(4 * (20 + LINE_OVERHEAD_BYTES));
        let before = SystemTime::now();
        // Evictions move the ring's start, so later lines wrap around it.
        for n in 0..37 {
            buffer.write(
                Stream::Stdout,
                format!("line {n:02} padded out\n").as_bytes(),
            );
        }
        // A character split across two writes, and a byte that is not UTF-8.
        buffer.write(Stream::Stderr, b"caf\xc3");
        buffer.write(Stream::Stderr, b"\xa9 ok\nbad \xff\n");
        let after = SystemTime::now();
        let page = buffer.read_from(0, 10);
        let texts: Vec<&str> = page.lines.iter().map(|l| l.text.as_str()).collect();
        assert_eq!(
            texts,
            [
                "line 35 padded out",
                "line 36 padded out",
                "café ok",
                "bad \u{fffd}"
            ]
        );
        assert_eq!(page.lines[0].seq, 35);
        assert_eq!(page.missed, 35);
        assert!(page.lines.iter().all(|l| before <= l.at && l.at <= after));
        // Reading from the middle finds the same text as reading from the start.
        assert_eq!(buffer.read_from(37, 1).lines[0].text, "café ok");
        assert_eq!(buffer.read_from(38, 5).lines[0].text, "bad \u{fffd}");
    }

    #[test]
    fn a_growing_line_that_replaces_invalid_bytes_keeps_the_ring_within_the_budget() {
        // 16 KiB of bytes that are not UTF-8 become 48 KiB of replacement
        // characters: each line evicts the one before it before it is
        // added, so the ring never holds two (96 KiB).
        let retained = 64 << 10;
        let buffer = LogBuffer::new(retained);
        for n in 0..40 {
            let mut line = vec![0xff; MAX_LINE_BYTES - 40 + n];
            line.push(b'\n');
            buffer.write(Stream::Stdout, &line);
            let cap = buffer.lock().text.capacity();
            assert!(cap <= retained, "line {n}: a ring of {cap} bytes");
        }
        assert_eq!(buffer.lines().len(), 1);
    }

    #[test]
    fn a_line_of_exactly_the_maximum_is_one_line() {
        let buffer = LogBuffer::new(1 << 20);
        let mut bytes = vec![b'x'; MAX_LINE_BYTES];
        bytes.extend_from_slice(b"\nnext\n");
        buffer.write(Stream::Stdout, &bytes);
        let lens: Vec<usize> = buffer.lines().iter().map(|l| l.text.len()).collect();
        assert_eq!(lens, [MAX_LINE_BYTES, 4]);
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
