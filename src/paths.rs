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

/// Where the registry keeps its blobs, manifests and uploads: `--blobs
/// file:///PATH` (a shared filesystem such as NFS), or `registry/` in the
/// data directory.
pub(crate) fn registry_root(
    data_dir: &std::path::Path,
    blobs: Option<&str>,
) -> anyhow::Result<PathBuf> {
    let Some(url) = blobs else {
        return Ok(data_dir.join("registry"));
    };
    match url.strip_prefix("file://") {
        Some(path) if path.starts_with('/') && !path.split('/').any(|c| c == "..") => {
            Ok(PathBuf::from(path))
        }
        Some(_) => anyhow::bail!(
            "--blobs {url}: a file:// URL needs an absolute path without `..`, such as file:///mnt/shared/wharf"
        ),
        None if url.starts_with("s3://") => anyhow::bail!(
            "--blobs {url}: object storage (s3://) is not supported yet; use file:///PATH or leave --blobs out"
        ),
        None => anyhow::bail!(
            "--blobs {url} is not a file:///PATH URL (leave --blobs out for the data directory)"
        ),
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
