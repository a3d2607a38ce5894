//! [`Storage`] on an S3-compatible object store (`wharf server --blobs
//! s3://BUCKET/PREFIX?endpoint=URL&region=R`), through the `object_store`
//! crate. Credentials come from the usual AWS environment variables
//! (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, ...).
//!
//! S3 objects cannot be appended to, so an appendable object (an upload's
//! data) is a series of parts under it, `NAME/part-000001`, ..., each
//! written by one appender as an ordinary upload (a multipart upload past
//! [`PART_BUFFER`]). `commit` makes one object of them: a server-side copy
//! for a single part, or the parts streamed into one multipart upload.
//! Either way the target appears whole or not at all (S3 makes an object
//! visible only when its PUT, copy or multipart upload completes), and
//! the parts stay readable by any server until the commit, so an upload
//! started through one server can be continued through another.

use std::io;
use std::sync::Arc;

use bytes::Bytes;
use futures_util::{StreamExt, TryStreamExt};
use object_store::aws::AmazonS3Builder;
use object_store::buffered::BufWriter;
use object_store::path::Path;
use object_store::{GetOptions, GetRange, ObjectMeta, ObjectStore, PutPayload};
use tokio::io::AsyncWriteExt;

use super::{Reader, Storage, Writer};

/// Bytes an appender holds before it streams as a multipart upload (S3's
/// parts must be at least 5 MiB, but the last).
const PART_BUFFER: usize = 8 << 20;

/// The largest object S3's server-side copy takes; larger parts are
/// streamed through the server instead.
const MAX_COPY: u64 = 5 << 30;

/// Where an appendable object's parts live, below its name.
const PART_PREFIX: &str = "part-";

/// An S3 bucket (or a prefix in it).
#[derive(Debug, Clone)]
pub struct S3Storage {
    store: Arc<dyn ObjectStore>,
    prefix: String,
    /// `s3://bucket/prefix`, for messages.
    shown: String,
}

/// An object-store error as an I/O error (not found as `NotFound`).
fn io_error(e: object_store::Error) -> io::Error {
    match e {
        object_store::Error::NotFound { .. } => io::Error::new(io::ErrorKind::NotFound, e),
        e => io::Error::other(e),
    }
}

fn absent<T>(r: object_store::Result<T>) -> io::Result<Option<T>> {
    match r {
        Ok(v) => Ok(Some(v)),
        Err(object_store::Error::NotFound { .. }) => Ok(None),
        Err(e) => Err(io_error(e)),
    }
}

impl S3Storage {
    /// Opens `s3://BUCKET[/PREFIX][?endpoint=URL&region=R]` with
    /// credentials from the environment. Nothing is contacted yet.
    pub fn open(url: &str) -> io::Result<Self> {
        Self::open_with(url, std::iter::empty::<(String, String)>())
    }

    /// [`open`](Self::open) with settings given as environment variables
    /// would be (`AWS_ACCESS_KEY_ID`, ...) on top of the environment's.
    pub fn open_with(
        url: &str,
        settings: impl IntoIterator<Item = (impl AsRef<str>, impl AsRef<str>)>,
    ) -> io::Result<Self> {
        let invalid = |why: String| io::Error::new(io::ErrorKind::InvalidInput, why);
        // Before parsing: the parser would resolve `..` silently.
        let raw_path = url.split('?').next().unwrap_or_default();
        if raw_path.split('/').skip(3).any(|c| c == ".." || c == ".") {
            return Err(invalid(format!("{url}: the prefix may not hold . or ..")));
        }
        let parsed = url::Url::parse(url).map_err(|e| invalid(format!("{url}: {e}")))?;
        if parsed.scheme() != "s3" {
            return Err(invalid(format!("{url} is not an s3:// URL")));
        }
        let bucket = parsed
            .host_str()
            .filter(|b| !b.is_empty())
            .ok_or_else(|| invalid(format!("{url} names no bucket")))?
            .to_owned();
        let prefix = parsed.path().trim_matches('/').to_owned();
        let mut builder = AmazonS3Builder::from_env().with_bucket_name(&bucket);
        for (key, value) in settings {
            let key = key.as_ref().to_ascii_lowercase();
            let key = key.parse().map_err(|e| invalid(format!("{key}: {e}")))?;
            builder = builder.with_config(key, value.as_ref());
        }
        let mut endpoint_http = false;
        for (key, value) in parsed.query_pairs() {
            match key.as_ref() {
                "endpoint" => {
                    endpoint_http = value.starts_with("http://");
                    builder = builder.with_endpoint(value.as_ref());
                }
                "region" => builder = builder.with_region(value.as_ref()),
                other => {
                    return Err(invalid(format!(
                        "{url}: unknown parameter {other:?} (endpoint, region)"
                    )));
                }
            }
        }
        // Path-style addressing (BUCKET after the endpoint) works with every
        // S3-compatible server; plain HTTP only to an endpoint that says so.
        builder = builder
            .with_virtual_hosted_style_request(false)
            .with_allow_http(endpoint_http);
        let store = builder
            .build()
            .map_err(|e| invalid(format!("{url}: {e}")))?;
        Ok(S3Storage {
            store: Arc::new(store),
            shown: format!("s3://{bucket}/{prefix}"),
            prefix,
        })
    }

    /// `s3://bucket/prefix`.
    pub fn shown(&self) -> &str {
        &self.shown
    }

    fn key(&self, name: &str) -> Path {
        debug_assert!(
            !name.split('/').any(|c| c == ".."),
            "object names never climb: {name}"
        );
        if self.prefix.is_empty() {
            Path::from(name)
        } else {
            Path::from(format!("{}/{name}", self.prefix))
        }
    }

    /// An appendable object's parts, in order (empty if it has none).
    async fn parts(&self, name: &str) -> io::Result<Vec<ObjectMeta>> {
        let listed = self
            .store
            .list_with_delimiter(Some(&self.key(name)))
            .await
            .map_err(io_error)?;
        let mut parts: Vec<ObjectMeta> = listed
            .objects
            .into_iter()
            .filter(|o| {
                o.location
                    .filename()
                    .is_some_and(|f| f.starts_with(PART_PREFIX))
            })
            .collect();
        parts.sort_by(|a, b| a.location.as_ref().cmp(b.location.as_ref()));
        Ok(parts)
    }

    /// The ranges of `parts` that hold bytes `offset..offset+len`.
    fn spans(parts: &[ObjectMeta], offset: u64, len: Option<u64>) -> Vec<(Path, u64, u64)> {
        let end = len.map_or(u64::MAX, |l| offset.saturating_add(l));
        let mut at = 0u64;
        let mut spans = Vec::new();
        for p in parts {
            let (start, stop) = (at, at + p.size);
            at = stop;
            let (from, to) = (offset.max(start), end.min(stop));
            if from < to {
                spans.push((p.location.clone(), from - start, to - start));
            }
        }
        spans
    }

    /// Reads `spans` one after another as one stream.
    fn read_spans(&self, spans: Vec<(Path, u64, u64)>) -> Reader {
        let store = self.store.clone();
        let stream = futures_util::stream::iter(spans)
            .then(move |(path, from, to)| {
                let store = store.clone();
                async move {
                    let options = GetOptions {
                        range: Some(GetRange::Bounded(from..to)),
                        ..GetOptions::default()
                    };
                    let got = store.get_opts(&path, options).await.map_err(io_error)?;
                    Ok::<_, io::Error>(got.into_stream().map_err(io_error))
                }
            })
            .try_flatten();
        Box::pin(tokio_util::io::StreamReader::new(stream))
    }
}

#[async_trait::async_trait]
impl Storage for S3Storage {
    async fn stat(&self, name: &str) -> io::Result<Option<u64>> {
        if let Some(meta) = absent(self.store.head(&self.key(name)).await)? {
            return Ok(Some(meta.size));
        }
        let parts = self.parts(name).await?;
        Ok((!parts.is_empty()).then(|| parts.iter().map(|p| p.size).sum()))
    }

    async fn reader(
        &self,
        name: &str,
        offset: u64,
        len: Option<u64>,
    ) -> io::Result<Option<Reader>> {
        let parts = match absent(self.store.head(&self.key(name)).await)? {
            Some(meta) => vec![meta],
            None => self.parts(name).await?,
        };
        if parts.is_empty() {
            return Ok(None);
        }
        Ok(Some(self.read_spans(Self::spans(&parts, offset, len))))
    }

    async fn read(&self, name: &str) -> io::Result<Option<Vec<u8>>> {
        match absent(self.store.get(&self.key(name)).await)? {
            Some(got) => Ok(Some(got.bytes().await.map_err(io_error)?.to_vec())),
            None => Ok(None),
        }
    }

    async fn write(&self, name: &str, bytes: &[u8]) -> io::Result<()> {
        // A PUT replaces the object whole, atomically, and is durable once
        // answered.
        self.store
            .put(
                &self.key(name),
                PutPayload::from(Bytes::copy_from_slice(bytes)),
            )
            .await
            .map_err(io_error)?;
        Ok(())
    }

    async fn appender(&self, name: &str) -> io::Result<Writer> {
        let next = self
            .parts(name)
            .await?
            .last()
            .and_then(|p| {
                p.location
                    .filename()?
                    .strip_prefix(PART_PREFIX)?
                    .parse::<u64>()
                    .ok()
            })
            .map_or(1, |n| n + 1);
        let part = self.key(&format!("{name}/{PART_PREFIX}{next:06}"));
        Ok(Box::pin(BufWriter::with_capacity(
            self.store.clone(),
            part,
            PART_BUFFER,
        )))
    }

    async fn commit(&self, from: &str, to: &str) -> io::Result<()> {
        let target = self.key(to);
        let whole = absent(self.store.head(&self.key(from)).await)?;
        let parts = match &whole {
            Some(meta) => vec![meta.clone()],
            None => self.parts(from).await?,
        };
        if parts.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("nothing to commit at {from}"),
            ));
        }
        // Empty parts (an upload's opening, a chunk of no bytes) hold
        // nothing: a push in one request then commits by a server-side
        // copy instead of a second pass of its bytes through the server.
        let parts: Vec<ObjectMeta> = parts.into_iter().filter(|p| p.size > 0).collect();
        match parts.as_slice() {
            [] => self.write(to, b"").await?,
            [one] if one.size <= MAX_COPY => {
                self.store
                    .copy(&one.location, &target)
                    .await
                    .map_err(io_error)?;
            }
            _ => {
                let mut reader = self.read_spans(Self::spans(&parts, 0, None));
                let mut writer = BufWriter::with_capacity(self.store.clone(), target, PART_BUFFER);
                tokio::io::copy(&mut reader, &mut writer).await?;
                writer.shutdown().await?;
            }
        }
        self.delete(from).await
    }

    async fn delete(&self, name: &str) -> io::Result<()> {
        let key = self.key(name);
        absent(self.store.delete(&key).await)?;
        let under: Vec<Path> = self
            .store
            .list(Some(&key))
            .map_ok(|o| o.location)
            .try_collect()
            .await
            .map_err(io_error)?;
        for path in under {
            absent(self.store.delete(&path).await)?;
        }
        Ok(())
    }

    async fn list(&self, prefix: &str) -> io::Result<Vec<String>> {
        let listed = self
            .store
            .list_with_delimiter(Some(&self.key(prefix)))
            .await
            .map_err(io_error)?;
        let mut names: Vec<String> = listed
            .common_prefixes
            .iter()
            .chain(listed.objects.iter().map(|o| &o.location))
            .filter_map(|p| p.filename().map(str::to_owned))
            .collect();
        names.sort();
        names.dedup();
        Ok(names)
    }

    async fn modified(&self, name: &str) -> io::Result<Option<u64>> {
        let metas = match absent(self.store.head(&self.key(name)).await)? {
            Some(meta) => vec![meta],
            None => self.parts(name).await?,
        };
        Ok(metas
            .iter()
            .map(|m| m.last_modified.timestamp().max(0) as u64)
            .max())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn storage(prefix: &str) -> S3Storage {
        let garage = wharf_testkit::garage::shared();
        S3Storage::open_with(&garage.url(prefix), garage.env()).unwrap()
    }

    /// Everything in the bucket under the storage's prefix.
    fn everything(s: &S3Storage) -> Vec<String> {
        let (store, prefix) = (s.store.clone(), s.prefix.clone());
        tokio::task::block_in_place(|| {
            tokio::runtime::Handle::current().block_on(async move {
                let prefix = (!prefix.is_empty()).then(|| Path::from(prefix));
                store
                    .list(prefix.as_ref())
                    .map_ok(|o| o.location.to_string())
                    .try_collect()
                    .await
                    .unwrap()
            })
        })
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn passes_the_storage_suite_on_a_real_s3_server() {
        for prefix in ["", "team/registry"] {
            let s = storage(prefix);
            super::super::suite::run(&s, || everything(&s)).await;
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn appended_parts_read_as_one_object_and_commit_whole_past_one_part() {
        use tokio::io::AsyncReadExt;
        let s = storage("p");
        // Three appenders, the second past the multipart threshold.
        let chunks = [vec![1u8; 1000], vec![2u8; PART_BUFFER + 123], vec![3u8; 77]];
        for chunk in &chunks {
            let mut w = s.appender("uploads/u/data").await.unwrap();
            w.write_all(chunk).await.unwrap();
            w.shutdown().await.unwrap();
        }
        let all: Vec<u8> = chunks.concat();
        assert_eq!(
            s.stat("uploads/u/data").await.unwrap(),
            Some(all.len() as u64)
        );
        // A range across the part boundaries.
        let mut r = s
            .reader("uploads/u/data", 990, Some(20))
            .await
            .unwrap()
            .unwrap();
        let mut got = Vec::new();
        r.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, all[990..1010]);
        // Nothing is visible at the target until the commit is whole.
        assert_eq!(s.stat("blobs/x").await.unwrap(), None);
        s.commit("uploads/u/data", "blobs/x").await.unwrap();
        assert_eq!(s.read("blobs/x").await.unwrap().unwrap(), all);
        assert_eq!(s.stat("uploads/u/data").await.unwrap(), None);
        s.delete("blobs").await.unwrap();
        assert!(everything(&s).is_empty(), "{:?}", everything(&s));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_opening_empty_part_is_skipped_and_an_empty_upload_commits_empty() {
        let s = storage("e");
        for chunk in [&b""[..], b"only chunk"] {
            let mut w = s.appender("uploads/a/data").await.unwrap();
            w.write_all(chunk).await.unwrap();
            w.shutdown().await.unwrap();
        }
        s.commit("uploads/a/data", "blobs/a").await.unwrap();
        assert_eq!(s.read("blobs/a").await.unwrap().unwrap(), b"only chunk");
        let mut w = s.appender("uploads/b/data").await.unwrap();
        w.shutdown().await.unwrap();
        s.commit("uploads/b/data", "blobs/b").await.unwrap();
        assert_eq!(s.read("blobs/b").await.unwrap().unwrap(), b"");
        s.delete("blobs").await.unwrap();
        s.delete("uploads").await.unwrap();
        assert!(everything(&s).is_empty(), "{:?}", everything(&s));
    }

    #[test]
    fn a_bad_url_is_refused_with_the_reason() {
        for (url, says) in [
            ("s3:///x", "names no bucket"),
            ("s3://b/../x", ". or .."),
            ("s3://b/x?colour=red", "unknown parameter"),
            ("file:///x", "is not an s3:// URL"),
        ] {
            let e = S3Storage::open(url).unwrap_err().to_string();
            assert!(e.contains(says), "{url}: {e}");
        }
    }
}
