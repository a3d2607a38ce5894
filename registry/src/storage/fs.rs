//! [`Storage`] on a local directory. Atomic writes are a temporary file in
//! `<root>/_tmp`, written, fsynced and renamed into place (same file system,
//! so the rename is atomic); the parent directory is fsynced so the rename
//! survives a crash.

use std::io;
use std::path::{Path, PathBuf};
use std::time::UNIX_EPOCH;

use tokio::io::{AsyncReadExt, AsyncSeekExt};

use super::{Reader, Storage, Writer};

/// Where temporary files live, inside the root.
pub const TMP_DIR: &str = "_tmp";

/// A temporary file this old was left by a crash.
pub const STALE_TMP: std::time::Duration = std::time::Duration::from_secs(600);

/// A directory-backed store.
#[derive(Debug, Clone)]
pub struct FsStorage {
    root: PathBuf,
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
        Ok(FsStorage { root })
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
        Ok(FsStorage { root })
    }

    /// Uses `root` beside a process that [`open`](Self::open)ed it and still
    /// runs (a server): nothing is removed, since its temporary files are
    /// in use.
    pub fn attach(root: impl Into<PathBuf>) -> io::Result<Self> {
        let root = root.into();
        std::fs::create_dir_all(root.join(TMP_DIR))?;
        Ok(FsStorage { root })
    }

    fn path(&self, name: &str) -> PathBuf {
        debug_assert!(
            !name.split('/').any(|c| c == ".."),
            "object names never climb: {name}"
        );
        self.root.join(name)
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

    async fn read(&self, name: &str) -> io::Result<Option<Vec<u8>>> {
        match tokio::fs::read(self.path(name)).await {
            Ok(bytes) => Ok(Some(bytes)),
            Err(e) => absent(e),
        }
    }

    async fn write(&self, name: &str, bytes: &[u8]) -> io::Result<()> {
        let target = self.path(name);
        let tmp = self
            .root
            .join(TMP_DIR)
            .join(uuid::Uuid::new_v4().to_string());
        let bytes = bytes.to_vec();
        // One trip to the blocking pool for the whole sequence.
        blocking(move || {
            let parent = target.parent().expect("object has a parent");
            std::fs::create_dir_all(parent)?;
            let result = (|| {
                let mut file = std::fs::File::create(&tmp)?;
                std::io::Write::write_all(&mut file, &bytes)?;
                file.sync_all()?;
                std::fs::rename(&tmp, &target)?;
                std::fs::File::open(parent)?.sync_all()
            })();
            if result.is_err() {
                let _ = std::fs::remove_file(&tmp);
            }
            result
        })
        .await
    }

    async fn write_scratch(&self, name: &str, bytes: &[u8]) -> io::Result<()> {
        let path = self.path(name);
        let bytes = bytes.to_vec();
        blocking(move || {
            std::fs::create_dir_all(path.parent().expect("object has a parent"))?;
            std::fs::write(path, bytes)
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
            std::fs::File::open(&from)?.sync_all()?;
            let parent = to.parent().expect("object has a parent");
            std::fs::create_dir_all(parent)?;
            std::fs::rename(&from, &to)?;
            std::fs::File::open(parent)?.sync_all()
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

/// Bytes handed to the writer thread at a time.
const WRITE_BLOCK: usize = 1 << 20;
/// The writer thread starts write-back of what it wrote every this many
/// bytes, so the final fsync of a large blob has little left to do.
const WRITEBACK_EVERY: u64 = 64 << 20;

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
            let mut since_sync = 0u64;
            while let Some(block) = rx.blocking_recv() {
                file.write_all(&block)?;
                since_sync += block.len() as u64;
                if since_sync >= WRITEBACK_EVERY {
                    file.sync_data()?;
                    since_sync = 0;
                }
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
