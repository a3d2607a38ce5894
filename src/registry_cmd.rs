//! `wharf registry gc` and `wharf registry settings`: maintenance of the
//! registry's storage in a data directory (like distribution's
//! `garbage-collect`, run on the server's machine).

use std::path::PathBuf;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use clap::Subcommand;
use wharf_registry::path::Name;
use wharf_registry::store::Store;

#[derive(Debug, Subcommand)]
pub(crate) enum RegistryCommand {
    /// Apply lifecycle rules and remove unreferenced blobs (older than an
    /// hour, so pushes in flight keep theirs) and abandoned uploads.
    Gc {
        /// Report what would be removed without removing it.
        #[arg(long)]
        dry_run: bool,
        #[arg(long, env = "WHARF_DATA_DIR")]
        data_dir: Option<PathBuf>,
        /// The server's `--blobs`, if it has one.
        #[arg(long, env = "WHARF_BLOBS")]
        blobs: Option<String>,
        /// Output format.
        #[arg(long, value_enum, default_value = "text")]
        output: crate::Output,
    },
    /// Show or change a repository's settings (tag immutability, lifecycle).
    Settings {
        /// The repository, e.g. team/app.
        repository: String,
        /// Refuse to move existing tags.
        #[arg(long)]
        tag_immutability: Option<bool>,
        /// Lifecycle: keep only the newest N tags (0 turns the rule off).
        #[arg(long)]
        keep_last: Option<usize>,
        /// Lifecycle: remove untagged manifests older than this (e.g. 7d is
        /// written 168h; "off" turns the rule off).
        #[arg(long)]
        expire_untagged: Option<String>,
        #[arg(long, env = "WHARF_DATA_DIR")]
        data_dir: Option<PathBuf>,
        /// The server's `--blobs`, if it has one.
        #[arg(long, env = "WHARF_BLOBS")]
        blobs: Option<String>,
    },
}

/// The registry's store in the data directory. With no server running,
/// the directory's lock is taken (and returned, to hold until done) and the
/// storage opened as its owner; beside a running server it is attached
/// without touching the server's temporary files. Settings are single
/// atomic writes and garbage collection spares anything younger than its
/// grace period, so both are safe beside a live server.
fn store(data_dir: Option<PathBuf>, blobs: Option<&str>) -> Result<(Store, Option<std::fs::File>)> {
    let dir = crate::paths::data_dir(data_dir)?;
    std::fs::create_dir_all(&dir).with_context(|| format!("failed to create {}", dir.display()))?;
    let lock = crate::paths::try_lock_data_dir(&dir)?;
    let storage = crate::paths::Blobs::parse(&dir, blobs)?.open(lock.is_some())?;
    Ok((Store::new(storage), lock))
}

pub(crate) fn main(command: RegistryCommand) -> Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    match command {
        RegistryCommand::Gc {
            dry_run,
            data_dir,
            blobs,
            output,
        } => {
            let (store, _lock) = store(data_dir, blobs.as_deref())?;
            let now = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs();
            let report = rt
                .block_on(store.gc(now, dry_run))
                .context("garbage collection failed")?;
            match output {
                crate::Output::Json => println!("{}", serde_json::to_string_pretty(&report)?),
                crate::Output::Text => {
                    let verb = if dry_run { "would remove" } else { "removed" };
                    for t in &report.tags_removed {
                        println!("{verb} tag {t}");
                    }
                    for m in &report.manifests_removed {
                        println!("{verb} manifest {m}");
                    }
                    for b in &report.blobs_removed {
                        println!("{verb} blob {b}");
                    }
                    println!(
                        "{verb} {} tags, {} manifests, {} blobs ({} bytes), {} abandoned uploads",
                        report.tags_removed.len(),
                        report.manifests_removed.len(),
                        report.blobs_removed.len(),
                        report.bytes_freed,
                        report.uploads_removed
                    );
                }
            }
        }
        RegistryCommand::Settings {
            repository,
            tag_immutability,
            keep_last,
            expire_untagged,
            data_dir,
            blobs,
        } => {
            let name = Name::parse(&repository).map_err(|e| anyhow::anyhow!("{e}"))?;
            let (store, _lock) = store(data_dir, blobs.as_deref())?;
            let mut settings = rt
                .block_on(store.settings(&name))
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            if let Some(v) = tag_immutability {
                settings.tag_immutability = v;
            }
            if let Some(n) = keep_last {
                settings.keep_last_tagged = (n > 0).then_some(n);
            }
            if let Some(text) = expire_untagged {
                settings.expire_untagged_after_secs = if text == "off" {
                    None
                } else {
                    Some(
                        wharf_runtime::parse_duration(&text)
                            .map_err(|e| anyhow::anyhow!("--expire-untagged: {e}"))?
                            .as_secs(),
                    )
                };
            }
            rt.block_on(store.set_settings(&name, &settings))
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            println!("{}", serde_json::to_string_pretty(&settings)?);
        }
    }
    Ok(())
}
