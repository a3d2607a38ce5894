//! Where Wharf keeps its files on this machine.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

/// The data directory: the flag or `WHARF_DATA_DIR` (handled by clap), else
/// `$XDG_DATA_HOME/wharf`, else `~/.local/share/wharf`.
pub(crate) fn data_dir(flag: Option<PathBuf>) -> Result<PathBuf> {
    if let Some(dir) = flag {
        return Ok(dir);
    }
    if let Some(xdg) = std::env::var_os("XDG_DATA_HOME").filter(|v| !v.is_empty()) {
        return Ok(PathBuf::from(xdg).join("wharf"));
    }
    let home = std::env::var_os("HOME")
        .context("cannot find a data directory: set --data-dir, WHARF_DATA_DIR or HOME")?;
    Ok(PathBuf::from(home).join(".local/share/wharf"))
}

/// Compiled artifacts, kept across runs and restarts.
pub(crate) fn compile_cache(data_dir: &std::path::Path) -> PathBuf {
    data_dir.join("cache").join("compiled")
}

/// Where the registry keeps its blobs, manifests and uploads.
#[derive(Debug, Clone)]
pub(crate) enum Blobs {
    /// `registry/` in the data directory: this server's alone.
    Dir(PathBuf),
    /// `--blobs file:///PATH`: a shared filesystem such as NFS, which
    /// other servers (replicas) may use at the same time.
    Shared(PathBuf),
    /// `--blobs s3://BUCKET/PREFIX?endpoint=URL&region=R`.
    S3(String),
}

impl Blobs {
    /// From `--blobs` (`None`: the data directory).
    pub(crate) fn parse(data_dir: &std::path::Path, blobs: Option<&str>) -> anyhow::Result<Blobs> {
        let Some(url) = blobs else {
            return Ok(Blobs::Dir(data_dir.join("registry")));
        };
        if url.starts_with("s3://") {
            // Checked now: a bad URL stops the start, not the first push.
            wharf_registry::storage::s3::S3Storage::open(url)?;
            return Ok(Blobs::S3(url.to_owned()));
        }
        match url.strip_prefix("file://") {
            Some(path) if path.starts_with('/') && !path.split('/').any(|c| c == "..") => {
                Ok(Blobs::Shared(PathBuf::from(path)))
            }
            Some(_) => anyhow::bail!(
                "--blobs {url}: a file:// URL needs an absolute path without `..`, such as file:///mnt/shared/wharf"
            ),
            None => anyhow::bail!(
                "--blobs {url} is neither file:///PATH nor s3://BUCKET/PREFIX?endpoint=URL&region=R (leave --blobs out for the data directory)"
            ),
        }
    }

    /// Opens the storage. A directory is opened as its owner (temporary
    /// files a crash left removed: all of them in the data directory,
    /// the stale ones on a shared path) or, with `owner` false, beside a
    /// running server that owns it.
    pub(crate) fn open(
        &self,
        owner: bool,
    ) -> anyhow::Result<std::sync::Arc<dyn wharf_registry::storage::Storage>> {
        use anyhow::Context;
        use wharf_registry::storage::fs::FsStorage;
        Ok(match self {
            Blobs::Dir(root) | Blobs::Shared(root) => std::sync::Arc::new(
                match (owner, self) {
                    (false, _) => FsStorage::attach(root),
                    (true, Blobs::Shared(_)) => FsStorage::open_shared(root),
                    (true, _) => FsStorage::open(root),
                }
                .with_context(|| {
                    format!("failed to open registry storage in {}", root.display())
                })?,
            ),
            Blobs::S3(url) => {
                std::sync::Arc::new(wharf_registry::storage::s3::S3Storage::open(url)?)
            }
        })
    }
}

/// The admin token, created by the server on first start (mode 0600).
pub(crate) fn admin_token(data_dir: &std::path::Path) -> PathBuf {
    data_dir.join("admin.token")
}

/// The local server's admin token, for a client given no `--token`.
pub(crate) fn local_admin_token(flag: Option<PathBuf>) -> Result<String> {
    let dir = data_dir(flag)?;
    Ok(std::fs::read_to_string(admin_token(&dir))
        .with_context(|| {
            format!(
                "no --token, and no admin token in {} to fall back on",
                dir.display()
            )
        })?
        .trim()
        .to_owned())
}

/// The data directory's lock file: held by the running server (an advisory
/// lock, released by the kernel when the process dies, kill -9 included).
fn lock_file(data_dir: &std::path::Path) -> Result<std::fs::File> {
    let path = data_dir.join("wharf.lock");
    std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("failed to open {}", path.display()))
}

/// Holds the data directory for as long as the returned file lives; refuses
/// when another server holds it.
pub(crate) fn lock_data_dir(data_dir: &std::path::Path) -> Result<std::fs::File> {
    try_lock_data_dir(data_dir)?.with_context(|| {
        format!(
            "{} is in use by another running wharf server",
            data_dir.display()
        )
    })
}

/// The data directory's lock if no server holds it, `None` if one does.
pub(crate) fn try_lock_data_dir(data_dir: &std::path::Path) -> Result<Option<std::fs::File>> {
    let file = lock_file(data_dir)?;
    match file.try_lock() {
        Ok(()) => Ok(Some(file)),
        Err(std::fs::TryLockError::WouldBlock) => Ok(None),
        Err(std::fs::TryLockError::Error(e)) => Err(e).context("failed to lock the data directory"),
    }
}

/// Writes `bytes` to `path` durably (temporary file, fsync, rename), with
/// mode 0600.
pub(crate) fn write_private(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    #[cfg(unix)]
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    options.mode(0o600);
    let mut file = options
        .open(&tmp)
        .with_context(|| format!("failed to create {}", tmp.display()))?;
    file.write_all(bytes)?;
    file.sync_all()?;
    std::fs::rename(&tmp, path).with_context(|| format!("failed to write {}", path.display()))?;
    Ok(())
}
