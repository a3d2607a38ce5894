//! [`Storage`] on a local directory. Atomic writes are a temporary file in
//! `<root>/_tmp`, written, fsynced and renamed into place (same file system,
//! so the rename is atomic); the parent directory is fsynced so the rename
//! survives a crash.

use std::io;
use std::path::{Path, PathBuf};
use std::time::UNIX_EPOCH;

use tokio::io::{AsyncReadExt, AsyncSeekExt};

use super::{CHUNK, Chunks, Reader, Storage, Whole, Writer};

/// Where temporary files live, inside the root.
pub const TMP_DIR: &str = "_tmp";

/// A temporary file this old was left by a crash.
pub const STALE_TMP: std::time::Duration = std::time::Duration::from_secs(600);

/// A directory-backed store.
#[derive(Debug, Clone)]
pub struct FsStorage {
    root: PathBuf,
    /// Whether [`Storage::whole`] maps files: not on a filesystem other
    /// servers share (NFS, say), where a blob another server renames over
    /// or deletes can vanish under a mapping and fault the reader
    /// (SIGBUS) instead of failing a read.
    map: bool,
}

impl FsStorage {
    /// Uses `root`, creating it. Temporary files from a previous crash are
    /// removed: nothing refers to them.
    pub fn open(root: impl Into<PathBuf>) -> io::Result<Self> {
        let root = root.into();
        std::fs::create_dir_all(&root)?;
        let tmp = root.join(TMP_DIR);
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp)?;
        }
        std::fs::create_dir_all(&tmp)?;
        Ok(FsStorage { root, map: true })
    }

    /// Uses `root` on a filesystem other servers (replicas) share.
    /// Temporary files a crash left are removed, but only those older
    /// than [`STALE_TMP`]: another server may be writing its own right
    /// now (each is written, fsynced and renamed within one call).
    pub fn open_shared(root: impl Into<PathBuf>) -> io::Result<Self> {
        let root = root.into();
        let tmp = root.join(TMP_DIR);
        std::fs::create_dir_all(&tmp)?;
        let now = std::time::SystemTime::now();
        for entry in std::fs::read_dir(&tmp)? {
            let entry = entry?;
            let old = entry
                .metadata()
                .and_then(|m| m.modified())
                .is_ok_and(|m| now.duration_since(m).is_ok_and(|age| age > STALE_TMP));
            if old {
                let _ = std::fs::remove_file(entry.path());
            }
        }
        Ok(FsStorage { root, map: false })
    }

    /// Uses `root` beside a process that [`open`](Self::open)ed it and still
    /// runs (a server): nothing is removed, since its temporary files are
    /// in use.
    pub fn attach(root: impl Into<PathBuf>) -> io::Result<Self> {
        let root = root.into();
        std::fs::create_dir_all(root.join(TMP_DIR))?;
        Ok(FsStorage { root, map: true })
    }

    fn path(&self, name: &str) -> PathBuf {
        debug_assert!(
            !name.split('/').any(|c| c == ".."),
            "object names never climb: {name}"
        );
        self.root.join(name)
    }

    /// A fresh temporary file's path, on the same file system as every
    /// object (so a rename into place is atomic).
    fn tmp_path(&self) -> PathBuf {
        self.root
            .join(TMP_DIR)
            .join(uuid::Uuid::new_v4().to_string())
    }

    /// The root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }
}

fn absent<T>(e: io::Error) -> io::Result<Option<T>> {
    if e.kind() == io::ErrorKind::NotFound {
        Ok(None)
    } else {
        Err(e)
    }
}

/// Runs a sequence of blocking file-system calls as one trip to tokio's
/// blocking pool (each `tokio::fs` call would be a trip of its own).
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> io::Result<T> + Send + 'static,
) -> io::Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| io::Error::other(format!("blocking task failed: {e}")))?
}

#[async_trait::async_trait]
impl Storage for FsStorage {
    async fn stat(&self, name: &str) -> io::Result<Option<u64>> {
        match tokio::fs::metadata(self.path(name)).await {
            Ok(m) if m.is_file() => Ok(Some(m.len())),
            Ok(_) => Ok(None),
            Err(e) => absent(e),
        }
    }

    async fn reader(
        &self,
        name: &str,
        offset: u64,
        len: Option<u64>,
    ) -> io::Result<Option<Reader>> {
        let mut file = match tokio::fs::File::open(self.path(name)).await {
            Ok(f) => f,
            Err(e) => return absent(e),
        };
        if offset > 0 {
            file.seek(io::SeekFrom::Start(offset)).await?;
        }
        Ok(Some(match len {
            Some(len) => Box::pin(file.take(len)),
            None => Box::pin(file),
        }))
    }

    /// Each chunk is read straight into a pooled buffer that the response
    /// body hands back when the socket has taken it (one copy, no
    /// allocation per chunk), and the next one is read while this one is
    /// sent. The blocking pool is held only during a read, never while a
    /// slow client drains the socket.
    async fn chunks(&self, name: &str, offset: u64, len: u64) -> io::Result<Option<Chunks>> {
        let path = self.path(name);
        let file = match blocking(move || std::fs::File::open(path)).await {
            Ok(f) => std::sync::Arc::new(f),
            Err(e) => return absent(e),
        };
        let read = move |file: std::sync::Arc<std::fs::File>, at: u64, n: usize| {
            tokio::task::spawn_blocking(move || read_chunk(&file, at, n))
        };
        let first = (len > 0).then(|| read(file.clone(), offset, chunk_len(len)));
        let stream =
            futures_util::stream::unfold((first, offset, len), move |(pending, at, left)| {
                let file = file.clone();
                async move {
                    let chunk = match pending?.await {
                        Ok(Ok(chunk)) => chunk,
                        Ok(Err(e)) => return Some((Err(e), (None, at, 0))),
                        Err(e) => {
                            let e = io::Error::other(format!("blob read failed: {e}"));
                            return Some((Err(e), (None, at, 0)));
                        }
                    };
                    let n = chunk.len() as u64;
                    let (at, left) = (at + n, left - n);
                    let next = (left > 0).then(|| read(file, at, chunk_len(left)));
                    Some((Ok(chunk), (next, at, left)))
                }
            });
        Ok(Some(Box::pin(stream)))
    }

    async fn read(&self, name: &str) -> io::Result<Option<Vec<u8>>> {
        match tokio::fs::read(self.path(name)).await {
            Ok(bytes) => Ok(Some(bytes)),
            Err(e) => absent(e),
        }
    }

    async fn whole(&self, name: &str) -> io::Result<Option<Whole>> {
        let path = self.path(name);
        let map = self.map;
        blocking(move || {
            let mut file = match std::fs::File::open(&path) {
                Ok(f) => f,
                Err(e) => return absent(e),
            };
            if map && file.metadata()?.len() > 0 {
                // SAFETY: the objects read whole are blobs, which are never
                // written in place: a blob is a temporary file written,
                // fsynced and renamed into place, and a later write of the
                // same name renames a new file over it; deleting one
                // unlinks it. On a local filesystem neither touches the
                // inode mapped here (a shared one is not mapped: `map`).
                // Only a process writing into the data directory behind
                // Wharf's back could change the bytes under the mapping —
                // the same trust wasmtime places in the compiled files it
                // maps from the cache.
                #[allow(unsafe_code)]
                let mapped = unsafe { memmap2::Mmap::map(&file) };
                // A filesystem that cannot map (some FUSE ones): read.
                if let Ok(mapped) = mapped {
                    return Ok(Some(Whole::Mapped(mapped)));
                }
            }
            let mut bytes = Vec::new();
            std::io::Read::read_to_end(&mut file, &mut bytes)?;
            Ok(Some(Whole::Heap(bytes)))
        })
        .await
    }

    async fn write(&self, name: &str, bytes: &[u8]) -> io::Result<()> {
        let target = self.path(name);
        let tmp = self.tmp_path();
        let bytes = bytes.to_vec();
        // One trip to the blocking pool for the whole sequence.
        blocking(move || {
            place_whole(&tmp, &target, &bytes)?;
            sync_parent(&target)
        })
        .await
    }

    /// One trip, and on ext4 or XFS two journal commits instead of three:
    /// the object's data, then its rename and the mark together (the second
    /// directory sync finds its entry committed already).
    async fn write_marked(&self, name: &str, bytes: &[u8], mark: &str) -> io::Result<()> {
        let (target, mark) = (self.path(name), self.path(mark));
        let tmp = self.tmp_path();
        let bytes = bytes.to_vec();
        blocking(move || {
            place_whole(&tmp, &target, &bytes)?;
            create_empty(&mark)?;
            sync_parent(&target)?;
            sync_parent(&mark)
        })
        .await
    }

    async fn commit_marked(&self, from: &str, to: &str, mark: &str) -> io::Result<()> {
        let (from, to, mark) = (self.path(from), self.path(to), self.path(mark));
        blocking(move || {
            place_file(&from, &to)?;
            create_empty(&mark)?;
            sync_parent(&to)?;
            sync_parent(&mark)
        })
        .await
    }

    /// An empty file needs no temporary file, rename or data sync: it is
    /// created in place (it exists whole or not at all), and one sync of
    /// its directory makes the entry durable (on ext4 and XFS the new
    /// inode is in the same journal commit).
    async fn mark(&self, name: &str) -> io::Result<()> {
        let path = self.path(name);
        // Synced even when it exists: another request may have created it
        // a moment ago and not synced yet. A directory with nothing new to
        // commit syncs at once.
        blocking(move || {
            create_empty(&path)?;
            sync_parent(&path)
        })
        .await
    }

    async fn appender(&self, name: &str) -> io::Result<Writer> {
        let path = self.path(name);
        let file = blocking(move || {
            std::fs::create_dir_all(path.parent().expect("object has a parent"))?;
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
        })
        .await?;
        Ok(Box::pin(PipelinedWriter::new(file)))
    }

    async fn commit(&self, from: &str, to: &str) -> io::Result<()> {
        let (from, to) = (self.path(from), self.path(to));
        blocking(move || {
            place_file(&from, &to)?;
            sync_parent(&to)
        })
        .await
    }

    async fn delete(&self, name: &str) -> io::Result<()> {
        let path = self.path(name);
        blocking(move || {
            let result = match std::fs::metadata(&path) {
                Ok(m) if m.is_dir() => std::fs::remove_dir_all(&path),
                Ok(_) => std::fs::remove_file(&path),
                Err(e) => Err(e),
            };
            match result {
                Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
                _ => Ok(()),
            }
        })
        .await
    }

    async fn list(&self, prefix: &str) -> io::Result<Vec<String>> {
        let mut dir = match tokio::fs::read_dir(self.path(prefix)).await {
            Ok(d) => d,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::NotFound | io::ErrorKind::NotADirectory
                ) =>
            {
                return Ok(Vec::new());
            }
            Err(e) => return Err(e),
        };
        let mut names = Vec::new();
        while let Some(entry) = dir.next_entry().await? {
            let name = entry.file_name().to_string_lossy().into_owned();
            if !(prefix.is_empty() && name == TMP_DIR) {
                names.push(name);
            }
        }
        names.sort();
        Ok(names)
    }

    async fn modified(&self, name: &str) -> io::Result<Option<u64>> {
        match tokio::fs::metadata(self.path(name)).await {
            Ok(m) => Ok(m
                .modified()?
                .duration_since(UNIX_EPOCH)
                .ok()
                .map(|d| d.as_secs())),
            Err(e) => absent(e),
        }
    }
}

/// Writes `bytes` to `tmp`, syncs it and renames it to `target` (whose
/// directory is created if needed); `tmp` is gone either way.
fn place_whole(tmp: &Path, target: &Path, bytes: &[u8]) -> io::Result<()> {
    std::fs::create_dir_all(target.parent().expect("object has a parent"))?;
    let result = (|| {
        let mut file = std::fs::File::create(tmp)?;
        std::io::Write::write_all(&mut file, bytes)?;
        file.sync_all()?;
        std::fs::rename(tmp, target)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(tmp);
    }
    result
}

/// Syncs the file `from` and renames it to `to` (whose directory is
/// created if needed).
fn place_file(from: &Path, to: &Path) -> io::Result<()> {
    std::fs::File::open(from)?.sync_all()?;
    std::fs::create_dir_all(to.parent().expect("object has a parent"))?;
    std::fs::rename(from, to)
}

/// Creates an empty file at `path` (and its directory) unless one exists.
fn create_empty(path: &Path) -> io::Result<()> {
    std::fs::create_dir_all(path.parent().expect("object has a parent"))?;
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .map(drop)
}

/// Makes the entries of `path`'s directory durable.
fn sync_parent(path: &Path) -> io::Result<()> {
    std::fs::File::open(path.parent().expect("object has a parent"))?.sync_all()
}

fn chunk_len(left: u64) -> usize {
    left.min(CHUNK as u64) as usize
}

/// Idle read buffers kept for the next pull: at most this many (each
/// [`CHUNK`] bytes), so a burst of pulls leaves little behind.
const POOLED_BUFFERS: usize = 8;

static BUFFERS: std::sync::Mutex<Vec<Vec<u8>>> = std::sync::Mutex::new(Vec::new());

/// A read buffer that goes back to the pool when the response body is
/// done with it.
struct Pooled {
    buf: Vec<u8>,
    len: usize,
}

impl AsRef<[u8]> for Pooled {
    fn as_ref(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

impl Drop for Pooled {
    fn drop(&mut self) {
        let mut pool = BUFFERS.lock().unwrap_or_else(|e| e.into_inner());
        if pool.len() < POOLED_BUFFERS {
            pool.push(std::mem::take(&mut self.buf));
        }
    }
}

/// Reads exactly `n` bytes at `at` into a pooled buffer. A file shorter
/// than its stated size is an error, never a short body sent as whole.
fn read_chunk(file: &std::fs::File, at: u64, n: usize) -> io::Result<bytes::Bytes> {
    use std::os::unix::fs::FileExt;
    let taken = BUFFERS.lock().unwrap_or_else(|e| e.into_inner()).pop();
    let mut buf = taken.unwrap_or_else(|| vec![0; CHUNK]);
    file.read_exact_at(&mut buf[..n], at)?;
    Ok(bytes::Bytes::from_owner(Pooled { buf, len: n }))
}

/// Bytes handed to the writer thread at a time.
const WRITE_BLOCK: usize = 1 << 20;
/// The writer thread starts write-back of each this many bytes it wrote,
/// without waiting for it, so the disk works while more arrives and the
/// final fsync of a large blob has little left to do.
const WRITEBACK_EVERY: u64 = 8 << 20;
/// About this many bytes of an upload (plus the ranges in flight) wait
/// for write-back: past it, the writer waits for the oldest range (which
/// is long done, normally). Keeps a fast sender from filling memory with
/// dirty pages.
const DIRTY_WINDOW: u64 = 32 << 20;

/// Write-back of one appended file, a window at a time.
struct Writeback {
    /// Where the range not yet handed to write-back starts.
    start: u64,
    /// Where the file ends.
    end: u64,
}

impl Writeback {
    fn new(file: &std::fs::File) -> io::Result<Self> {
        let len = file.metadata()?.len();
        Ok(Writeback {
            start: len,
            end: len,
        })
    }

    /// Counts `n` more bytes written, and starts write-back every
    /// [`WRITEBACK_EVERY`] of them.
    fn wrote(&mut self, file: &std::fs::File, n: usize) -> io::Result<()> {
        self.end += n as u64;
        if self.end - self.start >= WRITEBACK_EVERY {
            start_writeback(file, self.start, self.end)?;
            self.start = self.end;
        }
        Ok(())
    }
}

/// Starts write-back of `[start, end)` of `file`, and waits for what lies
/// more than [`DIRTY_WINDOW`] before it (`sync_file_range`, which makes
/// nothing durable by itself: the commit's fsync does).
#[cfg(target_os = "linux")]
fn start_writeback(file: &std::fs::File, start: u64, end: u64) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let range = |from: u64, to: u64, flags| {
        // SAFETY: a plain system call on a file descriptor this function
        // borrows; no memory is passed.
        #[allow(unsafe_code)]
        let r = unsafe {
            libc::sync_file_range(
                file.as_raw_fd(),
                from as libc::off64_t,
                (to - from) as libc::off64_t,
                flags,
            )
        };
        if r == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    };
    range(start, end, libc::SYNC_FILE_RANGE_WRITE)?;
    let old = start.saturating_sub(DIRTY_WINDOW);
    let from = old.saturating_sub(end - start);
    // Never a range of no bytes: to sync_file_range that means "to the
    // end of the file", which would wait for everything just started.
    if from < old {
        range(
            from,
            old,
            libc::SYNC_FILE_RANGE_WAIT_BEFORE
                | libc::SYNC_FILE_RANGE_WRITE
                | libc::SYNC_FILE_RANGE_WAIT_AFTER,
        )?;
    }
    Ok(())
}

/// Elsewhere, the data is synced every [`DIRTY_WINDOW`] bytes instead.
#[cfg(not(target_os = "linux"))]
fn start_writeback(file: &std::fs::File, start: u64, end: u64) -> io::Result<()> {
    if start / DIRTY_WINDOW != end / DIRTY_WINDOW {
        file.sync_data()?;
    }
    Ok(())
}

/// An appending writer that hands full blocks to a blocking thread, so
/// receiving and hashing (on the async side) overlap with the write and
/// write-back system calls (on the thread).
struct PipelinedWriter {
    block: Vec<u8>,
    tx: Option<tokio_util::sync::PollSender<Vec<u8>>>,
    done: Option<tokio::task::JoinHandle<io::Result<()>>>,
}

impl PipelinedWriter {
    fn new(mut file: std::fs::File) -> Self {
        let (tx, mut rx) = tokio::sync::mpsc::channel::<Vec<u8>>(4);
        let done = tokio::task::spawn_blocking(move || {
            use std::io::Write;
            let mut writeback = Writeback::new(&file)?;
            while let Some(block) = rx.blocking_recv() {
                file.write_all(&block)?;
                writeback.wrote(&file, block.len())?;
            }
            file.flush()
        });
        PipelinedWriter {
            block: Vec::with_capacity(WRITE_BLOCK),
            tx: Some(tokio_util::sync::PollSender::new(tx)),
            done: Some(done),
        }
    }

    fn closed() -> io::Error {
        io::Error::new(io::ErrorKind::BrokenPipe, "the writer thread stopped")
    }

    /// Sends the current block if it is full (or `force` and non-empty).
    fn poll_send(
        &mut self,
        cx: &mut std::task::Context<'_>,
        force: bool,
    ) -> std::task::Poll<io::Result<()>> {
        use std::task::Poll;
        if self.block.is_empty() || (!force && self.block.len() < WRITE_BLOCK) {
            return Poll::Ready(Ok(()));
        }
        let tx = self.tx.as_mut().ok_or_else(Self::closed)?;
        match tx.poll_reserve(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Err(_)) => Poll::Ready(Err(Self::closed())),
            Poll::Ready(Ok(())) => {
                let block = std::mem::replace(&mut self.block, Vec::with_capacity(WRITE_BLOCK));
                tx.send_item(block).map_err(|_| Self::closed())?;
                Poll::Ready(Ok(()))
            }
        }
    }
}

impl tokio::io::AsyncWrite for PipelinedWriter {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<io::Result<usize>> {
        use std::task::Poll;
        match self.poll_send(cx, false) {
            Poll::Ready(Ok(())) => {}
            Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
            Poll::Pending => return Poll::Pending,
        }
        let room = WRITE_BLOCK - self.block.len();
        let n = room.min(buf.len());
        self.block.extend_from_slice(&buf[..n]);
        Poll::Ready(Ok(n))
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        self.poll_send(cx, true)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        use std::future::Future;
        use std::task::Poll;
        match self.poll_send(cx, true) {
            Poll::Ready(Ok(())) => {}
            other => return other,
        }
        // Closing the channel lets the thread finish; then wait for it.
        self.tx = None;
        let Some(done) = self.done.as_mut() else {
            return Poll::Ready(Ok(()));
        };
        match std::pin::Pin::new(done).poll(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(result) => {
                self.done = None;
                Poll::Ready(
                    result.map_err(|e| io::Error::other(format!("writer thread failed: {e}")))?,
                )
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn passes_the_storage_suite() {
        let dir = tempfile::tempdir().unwrap();
        let storage = FsStorage::open(dir.path()).unwrap();
        let tmp = dir.path().join(TMP_DIR);
        super::super::suite::run(&storage, || {
            std::fs::read_dir(&tmp)
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect()
        })
        .await;
    }

    /// A blob read whole is mapped on a filesystem of its own, read on a
    /// shared one (where another server may rename over or delete it
    /// under the mapping); the bytes are the same, and a blob renamed
    /// over or deleted leaves a mapping made before it intact.
    #[tokio::test]
    async fn a_blob_is_mapped_unless_the_filesystem_is_shared() {
        let dir = tempfile::tempdir().unwrap();
        let local = FsStorage::open(dir.path()).unwrap();
        local.write("blob", b"first").await.unwrap();
        let mapped = local.whole("blob").await.unwrap().unwrap();
        assert!(matches!(mapped, Whole::Mapped(_)), "{mapped:?}");
        local.write("blob", b"second!").await.unwrap();
        local.delete("blob").await.unwrap();
        assert_eq!(&*mapped, b"first");
        local.write("blob", b"third").await.unwrap();
        let shared = FsStorage::open_shared(dir.path()).unwrap();
        let read = shared.whole("blob").await.unwrap().unwrap();
        assert!(matches!(read, Whole::Heap(_)), "{read:?}");
        assert_eq!(&*read, b"third");
    }

    /// An upload long enough to cross the write-back window, in writes of
    /// odd sizes over two appenders (two requests), reads back whole.
    #[tokio::test]
    async fn a_long_upload_with_write_back_reads_back_exactly() {
        use tokio::io::AsyncWriteExt;
        let dir = tempfile::tempdir().unwrap();
        let storage = FsStorage::open(dir.path()).unwrap();
        let total = (DIRTY_WINDOW + 3 * WRITEBACK_EVERY) as usize + 12_345;
        let bytes: Vec<u8> = (0..total).map(|i| (i * 31 % 253) as u8).collect();
        let (first, second) = bytes.split_at(total / 3 + 1);
        for part in [first, second] {
            let mut w = storage.appender("up/data").await.unwrap();
            for piece in part.chunks(777_777) {
                w.write_all(piece).await.unwrap();
            }
            w.shutdown().await.unwrap();
        }
        storage.commit("up/data", "blob").await.unwrap();
        assert!(std::fs::read(dir.path().join("blob")).unwrap() == bytes);
    }

    /// A pull's chunks cover exactly the range asked, across chunk
    /// boundaries and with buffers reused from earlier pulls; a file
    /// shorter than the range is an error, not a short body.
    #[tokio::test]
    async fn chunks_cover_the_range_exactly_and_a_short_file_is_an_error() {
        use futures_util::StreamExt;
        let dir = tempfile::tempdir().unwrap();
        let storage = FsStorage::open(dir.path()).unwrap();
        let bytes: Vec<u8> = (0..CHUNK * 5 / 2).map(|i| (i * 13 % 251) as u8).collect();
        storage.write("blob", &bytes).await.unwrap();
        for (offset, len) in [(0, bytes.len()), (7, CHUNK), (CHUNK - 1, CHUNK + 2), (0, 0)] {
            let mut chunks = storage
                .chunks("blob", offset as u64, len as u64)
                .await
                .unwrap()
                .unwrap();
            let mut out = Vec::new();
            while let Some(chunk) = chunks.next().await {
                let chunk = chunk.unwrap();
                assert!(chunk.len() <= CHUNK);
                out.extend_from_slice(&chunk);
            }
            assert!(out == bytes[offset..offset + len], "{offset}+{len}");
        }
        let mut chunks = storage
            .chunks("blob", 0, bytes.len() as u64 + 1)
            .await
            .unwrap()
            .unwrap();
        let mut failed = false;
        while let Some(chunk) = chunks.next().await {
            failed |= chunk.is_err();
        }
        assert!(failed, "a range past the end of the file must fail");
    }

    #[test]
    fn stale_temporary_files_are_removed_on_open() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join(TMP_DIR)).unwrap();
        std::fs::write(dir.path().join(TMP_DIR).join("half-written"), b"x").unwrap();
        FsStorage::open(dir.path()).unwrap();
        assert_eq!(
            std::fs::read_dir(dir.path().join(TMP_DIR)).unwrap().count(),
            0
        );
    }

    /// On a shared path a crash's leftovers go; a file another server (a
    /// replica) is writing right now stays.
    #[test]
    fn on_a_shared_path_stale_temporary_files_go_and_fresh_ones_stay() {
        let dir = tempfile::tempdir().unwrap();
        let tmp = dir.path().join(TMP_DIR);
        std::fs::create_dir_all(&tmp).unwrap();
        let stale = std::fs::File::create(tmp.join("half-written")).unwrap();
        stale
            .set_modified(std::time::SystemTime::now() - STALE_TMP * 2)
            .unwrap();
        std::fs::write(tmp.join("being-written"), b"x").unwrap();
        FsStorage::open_shared(dir.path()).unwrap();
        let left: Vec<String> = std::fs::read_dir(&tmp)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(left, ["being-written"]);
    }
}
