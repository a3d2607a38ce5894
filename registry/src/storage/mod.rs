//! The storage primitive under the registry: a handful of operations on
//! named objects (read, write-then-commit, move, list, delete) that any
//! backend can offer — the local file system ([`fs`]) or an S3-compatible
//! object store ([`s3`]).
//! All OCI meaning lives one layer up, in [`crate::store`].
//!
//! Object names are relative, `/`-separated, and built only from validated
//! repository names, digests and tags, never from raw client input.

pub mod fs;
pub mod s3;

use std::io;
use std::pin::Pin;

use tokio::io::{AsyncRead, AsyncWrite};

/// A boxed reader of an object's bytes.
pub type Reader = Pin<Box<dyn AsyncRead + Send>>;
/// A boxed writer appending to an object.
pub type Writer = Pin<Box<dyn AsyncWrite + Send>>;
/// An object's bytes as the chunks a response body sends.
pub type Chunks = Pin<Box<dyn futures_util::Stream<Item = io::Result<bytes::Bytes>> + Send>>;

/// An object's bytes, whole: mapped from its file where the backend keeps
/// one — the kernel's page cache holds them, reclaimable, not the
/// server's heap — else read into memory.
#[derive(Debug)]
pub enum Whole {
    /// Read into the heap.
    Heap(Vec<u8>),
    /// Mapped read-only from the object's file.
    Mapped(memmap2::Mmap),
}

impl std::ops::Deref for Whole {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        match self {
            Whole::Heap(bytes) => bytes,
            Whole::Mapped(map) => map,
        }
    }
}

/// Bytes per chunk of [`Storage::chunks`]: each read is a trip to the
/// blocking pool, so large reads keep large pulls cheap.
pub const CHUNK: usize = 1 << 20;

/// The storage primitives. Implementations must make [`write`] and
/// [`commit`] atomic: a reader sees the old object, the new object, or no
/// object — never a partial one — even after a crash.
///
/// [`write`]: Storage::write
/// [`commit`]: Storage::commit
#[async_trait::async_trait]
pub trait Storage: Send + Sync + 'static {
    /// The size of an object, or `None` if it does not exist.
    async fn stat(&self, name: &str) -> io::Result<Option<u64>>;
    /// Reads `len` bytes (or to the end) from `offset`.
    async fn reader(&self, name: &str, offset: u64, len: Option<u64>)
    -> io::Result<Option<Reader>>;
    /// Reads `len` bytes from `offset` as chunks of up to [`CHUNK`] bytes,
    /// for a response body.
    async fn chunks(&self, name: &str, offset: u64, len: u64) -> io::Result<Option<Chunks>> {
        Ok(self
            .reader(name, offset, Some(len))
            .await?
            .map(|r| Box::pin(tokio_util::io::ReaderStream::with_capacity(r, CHUNK)) as Chunks))
    }
    /// Reads a small object whole.
    async fn read(&self, name: &str) -> io::Result<Option<Vec<u8>>>;
    /// An immutable object (a blob) whole, however large, without holding
    /// it in the heap where the backend can map it (see [`Whole`]).
    async fn whole(&self, name: &str) -> io::Result<Option<Whole>> {
        Ok(self.read(name).await?.map(Whole::Heap))
    }
    /// Writes a small object atomically, replacing any previous one.
    async fn write(&self, name: &str, bytes: &[u8]) -> io::Result<()>;
    /// Creates an empty object (a link or a marker) durably; one that
    /// exists already is left as it is. Cheaper than [`write`] where the
    /// backend can: an empty object has no content to make durable.
    ///
    /// [`write`]: Storage::write
    async fn mark(&self, name: &str) -> io::Result<()> {
        self.write(name, b"").await
    }
    /// [`write`]s `name`, then [`mark`]s `mark`: durable together once
    /// this returns. A crash before that may leave the mark without the
    /// object (readers treat a link to a missing blob as no link).
    ///
    /// [`write`]: Storage::write
    /// [`mark`]: Storage::mark
    async fn write_marked(&self, name: &str, bytes: &[u8], mark: &str) -> io::Result<()> {
        self.write(name, bytes).await?;
        self.mark(mark).await
    }
    /// [`commit`]s `from` to `to`, then [`mark`]s `mark`, as
    /// [`write_marked`] does.
    ///
    /// [`commit`]: Storage::commit
    /// [`mark`]: Storage::mark
    /// [`write_marked`]: Storage::write_marked
    async fn commit_marked(&self, from: &str, to: &str, mark: &str) -> io::Result<()> {
        self.commit(from, to).await?;
        self.mark(mark).await
    }
    /// Opens an object for appending, creating it if needed. Appended bytes
    /// are not durable until [`commit`](Storage::commit).
    async fn appender(&self, name: &str) -> io::Result<Writer>;
    /// Makes `from` durable and atomically moves it to `to`, replacing it.
    async fn commit(&self, from: &str, to: &str) -> io::Result<()>;
    /// Removes an object, or everything under a prefix. Absent is fine.
    async fn delete(&self, name: &str) -> io::Result<()>;
    /// The names directly under `prefix` (objects and sub-prefixes), sorted.
    async fn list(&self, prefix: &str) -> io::Result<Vec<String>>;
    /// When an object was last written, as seconds since the Unix epoch.
    async fn modified(&self, name: &str) -> io::Result<Option<u64>>;
}

/// The suite every backend must pass, including "nothing left behind".
#[cfg(test)]
pub(crate) mod suite {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::Storage;

    async fn read_to_end(
        s: &dyn Storage,
        name: &str,
        offset: u64,
        len: Option<u64>,
    ) -> Option<Vec<u8>> {
        let mut r = s.reader(name, offset, len).await.unwrap()?;
        let mut out = Vec::new();
        r.read_to_end(&mut out).await.unwrap();
        Some(out)
    }

    async fn chunks_to_end(s: &dyn Storage, name: &str, offset: u64, len: u64) -> Option<Vec<u8>> {
        use futures_util::StreamExt;
        let mut chunks = s.chunks(name, offset, len).await.unwrap()?;
        let mut out = Vec::new();
        while let Some(chunk) = chunks.next().await {
            out.extend_from_slice(&chunk.unwrap());
        }
        Some(out)
    }

    /// Runs every check against `s`, which must start empty. `leftovers`
    /// lists whatever the backend holds besides the named objects (temporary
    /// files), which must be nothing at the end.
    pub(crate) async fn run(s: &dyn Storage, leftovers: impl Fn() -> Vec<String>) {
        assert_eq!(s.stat("a/b").await.unwrap(), None);
        assert_eq!(s.read("a/b").await.unwrap(), None);
        assert!(s.reader("a/b", 0, None).await.unwrap().is_none());
        assert!(s.list("a").await.unwrap().is_empty());

        assert!(s.whole("a/b").await.unwrap().is_none());
        s.write("a/b", b"hello").await.unwrap();
        assert_eq!(s.stat("a/b").await.unwrap(), Some(5));
        assert_eq!(s.read("a/b").await.unwrap().unwrap(), b"hello");
        assert_eq!(&*s.whole("a/b").await.unwrap().unwrap(), b"hello");
        s.write("a/empty", b"").await.unwrap();
        assert_eq!(&*s.whole("a/empty").await.unwrap().unwrap(), b"");
        s.delete("a/empty").await.unwrap();
        s.write("a/b", b"replaced").await.unwrap();
        assert_eq!(s.read("a/b").await.unwrap().unwrap(), b"replaced");
        assert_eq!(read_to_end(s, "a/b", 2, Some(3)).await.unwrap(), b"pla");
        assert_eq!(read_to_end(s, "a/b", 5, None).await.unwrap(), b"ced");
        assert_eq!(chunks_to_end(s, "a/b", 1, 6).await.unwrap(), b"eplace");
        assert!(s.chunks("a/nope", 0, 1).await.unwrap().is_none());
        assert!(s.modified("a/b").await.unwrap().is_some());

        s.mark("a/m").await.unwrap();
        s.mark("a/m").await.unwrap();
        assert_eq!(s.stat("a/m").await.unwrap(), Some(0));
        s.delete("a/m").await.unwrap();

        s.write_marked("w/obj", b"whole", "w/links/obj")
            .await
            .unwrap();
        assert_eq!(s.read("w/obj").await.unwrap().unwrap(), b"whole");
        assert_eq!(s.stat("w/links/obj").await.unwrap(), Some(0));
        let mut w = s.appender("w/up").await.unwrap();
        w.write_all(b"appended").await.unwrap();
        w.shutdown().await.unwrap();
        drop(w);
        s.commit_marked("w/up", "w/obj2", "w/links/obj2")
            .await
            .unwrap();
        assert_eq!(s.read("w/obj2").await.unwrap().unwrap(), b"appended");
        assert_eq!(s.stat("w/links/obj2").await.unwrap(), Some(0));
        assert_eq!(s.stat("w/up").await.unwrap(), None);
        s.delete("w").await.unwrap();

        let mut w = s.appender("up/1").await.unwrap();
        w.write_all(b"part one, ").await.unwrap();
        w.shutdown().await.unwrap();
        drop(w);
        let mut w = s.appender("up/1").await.unwrap();
        w.write_all(b"part two").await.unwrap();
        w.shutdown().await.unwrap();
        drop(w);
        assert_eq!(s.stat("up/1").await.unwrap(), Some(18));
        s.commit("up/1", "done/x").await.unwrap();
        assert_eq!(
            s.read("done/x").await.unwrap().unwrap(),
            b"part one, part two"
        );
        assert_eq!(s.stat("up/1").await.unwrap(), None);

        s.write("a/c/d", b"").await.unwrap();
        assert_eq!(s.list("a").await.unwrap(), ["b", "c"]);
        s.delete("a/c").await.unwrap();
        assert_eq!(s.list("a").await.unwrap(), ["b"]);
        s.delete("a/nope").await.unwrap();
        s.delete("a").await.unwrap();
        s.delete("done").await.unwrap();
        s.delete("up").await.unwrap();
        assert!(
            s.list("").await.unwrap().is_empty(),
            "{:?}",
            s.list("").await.unwrap()
        );
        assert!(leftovers().is_empty(), "left behind: {:?}", leftovers());
    }
}
