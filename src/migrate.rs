//! `wharf migrate`: moves a single-node install (its data directory's
//! `state.db` and `registry/`) onto PostgreSQL and/or another blob store
//! (`file:///PATH`, `s3://...`), so the same data directory's server can
//! start with `--state` and `--blobs`. The server must be stopped; the
//! source is only read.
//!
//! Every blob is hashed while it is read and again after it is written,
//! and must match its name; the state goes into an empty database only.
//! Upload sessions in flight are not moved (their clients start again).

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::Args;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use wharf_api::db::{PgStore, SqliteStore, StateStore, TaskFilter, Write};
use wharf_registry::digest::{Algorithm, Digest, Hasher};
use wharf_registry::storage::Storage;
use wharf_registry::storage::fs::FsStorage;

#[derive(Debug, Args)]
pub(crate) struct MigrateArgs {
    /// The data directory of the install to move (its server stopped).
    #[arg(long, env = "WHARF_DATA_DIR")]
    from: Option<PathBuf>,
    /// An empty PostgreSQL database for the state (`postgres://...`).
    #[arg(long)]
    to_state: Option<String>,
    /// Where the registry goes: `file:///PATH` or `s3://BUCKET/PREFIX?...`
    /// (credentials from AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY).
    #[arg(long)]
    to_blobs: Option<String>,
}

/// What was moved.
#[derive(Debug, Default)]
struct Moved {
    blobs: u64,
    blob_bytes: u64,
    objects: u64,
    task_definitions: usize,
    tasks: usize,
    services: usize,
    secrets: usize,
    tokens: usize,
}

pub(crate) fn main(args: MigrateArgs) -> Result<()> {
    if args.to_state.is_none() && args.to_blobs.is_none() {
        bail!(
            "nothing to do: give --to-state postgres://... and/or --to-blobs file:///PATH|s3://..."
        );
    }
    let dir = crate::paths::data_dir(args.from)?;
    if !dir.join("state.db").exists() {
        bail!("{} holds no Wharf install (no state.db)", dir.display());
    }
    let _lock = crate::paths::try_lock_data_dir(&dir)?.with_context(|| {
        format!(
            "a wharf server is running on {}: stop it before migrating",
            dir.display()
        )
    })?;
    if let Some(url) = &args.to_state
        && !(url.starts_with("postgres://") || url.starts_with("postgresql://"))
    {
        bail!(
            "--to-state {} is not a PostgreSQL URL",
            wharf_api::db::redacted(url)
        );
    }
    let target_blobs = args
        .to_blobs
        .as_deref()
        .map(|url| crate::paths::Blobs::parse(&dir, Some(url)))
        .transpose()?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let mut moved = Moved::default();
        if let Some(blobs) = &target_blobs {
            let source = FsStorage::open(dir.join("registry"))
                .context("failed to open the data directory's registry")?;
            let target = blobs.open(true)?;
            copy_registry(&source, target.as_ref(), &mut moved).await?;
        }
        if let Some(url) = &args.to_state {
            let source = SqliteStore::open(&dir.join("state.db")).await?;
            let target = PgStore::open(url).await.with_context(|| {
                format!(
                    "failed to open the state in {}",
                    wharf_api::db::redacted(url)
                )
            })?;
            let result = copy_state(&source, &target, &mut moved).await;
            source.close().await;
            target.close().await;
            result?;
        }
        println!(
            "moved {} blobs ({} bytes, every digest checked twice), {} other registry objects, {} task definitions, {} tasks, {} services, {} secrets, {} tokens",
            moved.blobs,
            moved.blob_bytes,
            moved.objects,
            moved.task_definitions,
            moved.tasks,
            moved.services,
            moved.secrets,
            moved.tokens
        );
        let mut start = format!("wharf server --data-dir {}", dir.display());
        if let Some(url) = &args.to_state {
            start += &format!(" --state {}", wharf_api::db::redacted(url));
        }
        if let Some(url) = &args.to_blobs {
            start += &format!(" --blobs {url}");
        }
        println!("start the server with: {start}");
        Ok(())
    })
}

/// Every object name under `prefix`, depth first, but temporary files and
/// upload sessions.
async fn walk(storage: &dyn Storage, prefix: &str, out: &mut Vec<String>) -> Result<()> {
    for child in storage.list(prefix).await? {
        let name = if prefix.is_empty() {
            child.clone()
        } else {
            format!("{prefix}/{child}")
        };
        if prefix.is_empty() && (child == "uploads" || child.starts_with('_')) {
            continue;
        }
        if storage.stat(&name).await?.is_some() {
            out.push(name.clone());
        }
        Box::pin(walk(storage, &name, out)).await?;
    }
    Ok(())
}

/// Hashes an object's bytes with `alg`; its length too.
async fn hash(storage: &dyn Storage, name: &str, alg: Algorithm) -> Result<(Digest, u64)> {
    let mut reader = storage
        .reader(name, 0, None)
        .await?
        .with_context(|| format!("{name} disappeared"))?;
    let mut hasher = Hasher::new(alg);
    let mut buf = vec![0; 1 << 20];
    let mut len = 0;
    loop {
        let n = reader.read(&mut buf).await?;
        if n == 0 {
            return Ok((hasher.finish(), len));
        }
        hasher.update(&buf[..n]);
        len += n as u64;
    }
}

async fn copy_registry(source: &FsStorage, target: &dyn Storage, moved: &mut Moved) -> Result<()> {
    let mut names = Vec::new();
    walk(source, "", &mut names).await?;
    for name in names {
        // blobs/<alg>/<hex>: content, streamed through a temporary upload
        // and checked against its name on both sides.
        let parts: Vec<&str> = name.split('/').collect();
        if let ["blobs", alg, hex] = parts.as_slice() {
            let digest: Digest = format!("{alg}:{hex}")
                .parse()
                .map_err(|e| anyhow::anyhow!("{name} is not a blob name: {e}"))?;
            let scratch = format!("uploads/migrate-{hex}/data");
            let mut reader = source
                .reader(&name, 0, None)
                .await?
                .with_context(|| format!("{name} disappeared"))?;
            let mut writer = target.appender(&scratch).await?;
            let mut hasher = Hasher::new(digest.algorithm());
            let mut buf = vec![0; 1 << 20];
            let mut len = 0u64;
            loop {
                let n = reader.read(&mut buf).await?;
                if n == 0 {
                    break;
                }
                hasher.update(&buf[..n]);
                writer.write_all(&buf[..n]).await?;
                len += n as u64;
            }
            writer.shutdown().await?;
            let read = hasher.finish();
            if read != digest {
                target.delete(&format!("uploads/migrate-{hex}")).await?;
                bail!(
                    "{name} holds content with digest {read}: the source is damaged; nothing of it was moved"
                );
            }
            target.commit(&scratch, &name).await?;
            target.delete(&format!("uploads/migrate-{hex}")).await?;
            let (written, written_len) = hash(target, &name, digest.algorithm()).await?;
            if written != digest || written_len != len {
                bail!("{name} reads back as {written} ({written_len} bytes) from the target");
            }
            moved.blobs += 1;
            moved.blob_bytes += len;
        } else {
            let bytes = source
                .read(&name)
                .await?
                .with_context(|| format!("{name} disappeared"))?;
            target.write(&name, &bytes).await?;
            moved.objects += 1;
        }
    }
    Ok(())
}

async fn copy_state(source: &SqliteStore, target: &PgStore, moved: &mut Moved) -> Result<()> {
    let empty = target.task_definitions(None).await?.is_empty()
        && target.services().await?.is_empty()
        && target.tokens().await?.is_empty()
        && target.secrets().await?.is_empty()
        && target
            .tasks(&TaskFilter {
                limit: 1,
                ..TaskFilter::default()
            })
            .await?
            .is_empty();
    if !empty {
        bail!("the target database already holds Wharf state: migrate into an empty database");
    }
    let mut definitions = source.task_definitions(None).await?;
    // Oldest revision first, as they were registered.
    definitions.sort_by(|a, b| (&a.family, a.revision).cmp(&(&b.family, b.revision)));
    for def in &definitions {
        target.import_task_definition(def).await?;
    }
    moved.task_definitions = definitions.len();
    let tasks = source
        .tasks(&TaskFilter {
            limit: u32::MAX,
            ..TaskFilter::default()
        })
        .await?;
    for chunk in tasks.chunks(500) {
        let mut batch: Vec<Write> = Vec::with_capacity(chunk.len() * 2);
        for task in chunk {
            batch.push(Write::Task(Box::new(task.clone())));
            if let Some(page) = source.task_logs(&task.id).await? {
                batch.push(Write::TaskLogs(task.id.clone(), Box::new(page)));
            }
        }
        target.write(&batch).await?;
    }
    moved.tasks = tasks.len();
    let services = source.services().await?;
    for service in &services {
        target.put_service(service).await?;
    }
    moved.services = services.len();
    let events = source.all_events().await?;
    let batch: Vec<Write> = events
        .into_iter()
        .map(|e| Write::Event {
            service: e.service,
            at: e.at,
            message: e.message,
        })
        .collect();
    for chunk in batch.chunks(1000) {
        target.write(chunk).await?;
    }
    for node in source.nodes().await? {
        target.put_node(&node).await?;
    }
    for (token, hash) in source.join_tokens_with_hashes().await? {
        target.put_join_token(&token, &hash).await?;
    }
    // Sealed values move as they are: `secrets.key` stays in the data
    // directory and opens them on the new store too.
    let secrets = source.secrets().await?;
    for secret in &secrets {
        if let Some((value, scope)) = source.secret(&secret.name).await? {
            target
                .put_secret(&secret.name, &value, scope.as_deref(), &secret.updated_at)
                .await?;
        }
    }
    moved.secrets = secrets.len();
    let tokens = source.tokens().await?;
    for (token, hash) in &tokens {
        target.put_token(token, hash).await?;
    }
    moved.tokens = tokens.len();
    let mut audit = source.audit(u32::MAX).await?;
    audit.reverse();
    let batch: Vec<Write> = audit
        .into_iter()
        .map(|e| Write::Audit(Box::new(e)))
        .collect();
    for chunk in batch.chunks(1000) {
        target.write(chunk).await?;
    }
    Ok(())
}
