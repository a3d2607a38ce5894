//! `wharf server`: the registry at `/v2/` and `/healthz`, on one port, with
//! state in one data directory. (The control plane joins it at `/v1/` with
//! its issue.)

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result};
use axum::Router;
use axum::routing::get;
use clap::Args;
use wharf_registry::Registry;
use wharf_registry::auth::StaticTokens;
use wharf_registry::storage::fs::FsStorage;

#[derive(Debug, Args)]
pub(crate) struct ServerArgs {
    /// Data directory (registry storage, admin token).
    #[arg(long, env = "WHARF_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Address to listen on.
    #[arg(long, env = "WHARF_LISTEN", default_value = "127.0.0.1:7070")]
    listen: SocketAddr,
}

/// Reads the admin token, creating it (mode 0600) on first start.
pub(crate) fn admin_token(data_dir: &Path) -> Result<String> {
    let path = crate::paths::admin_token(data_dir);
    match std::fs::read_to_string(&path) {
        Ok(token) => return Ok(token.trim().to_owned()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("failed to read {}", path.display())),
    }
    let token = format!(
        "{}{}",
        uuid::Uuid::new_v4().simple(),
        uuid::Uuid::new_v4().simple()
    );
    let tmp = path.with_extension("tmp");
    {
        use std::io::Write;
        #[cfg(unix)]
        use std::os::unix::fs::OpenOptionsExt;
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create(true).truncate(true);
        #[cfg(unix)]
        options.mode(0o600);
        let mut file = options
            .open(&tmp)
            .with_context(|| format!("failed to create {}", tmp.display()))?;
        file.write_all(token.as_bytes())?;
        file.sync_all()?;
    }
    std::fs::rename(&tmp, &path).with_context(|| format!("failed to write {}", path.display()))?;
    Ok(token)
}

pub(crate) fn main(args: ServerArgs) -> Result<()> {
    let data_dir = crate::paths::data_dir(args.data_dir)?;
    std::fs::create_dir_all(&data_dir)
        .with_context(|| format!("failed to create {}", data_dir.display()))?;
    let token = admin_token(&data_dir)?;
    let storage =
        FsStorage::open(data_dir.join("registry")).context("failed to open registry storage")?;
    let registry = Registry::new(Arc::new(storage), Arc::new(StaticTokens::new([token])));

    let tokio = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("failed to start the async runtime")?;
    tokio.block_on(async move {
        let app = Router::new()
            .route("/healthz", get(|| async { "ok\n" }))
            .merge(wharf_registry::http::router(registry));
        let listener = tokio::net::TcpListener::bind(args.listen)
            .await
            .with_context(|| format!("failed to listen on {}", args.listen))?;
        let local = listener.local_addr()?;
        // Scripts and tests wait for this line.
        eprintln!(
            "wharf: listening on http://{local} (data dir {})",
            data_dir.display()
        );
        axum::serve(listener, app)
            .with_graceful_shutdown(shutdown_signal())
            .await
            .context("server failed")?;
        eprintln!("wharf: stopped");
        Ok(())
    })
}

/// Resolves on Ctrl-C or SIGTERM: stop accepting, finish in-flight requests.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
}
