//! Where Wharf keeps its files on this machine.

use std::path::PathBuf;

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

/// The admin token, created by the server on first start (mode 0600).
pub(crate) fn admin_token(data_dir: &std::path::Path) -> PathBuf {
    data_dir.join("admin.token")
}
