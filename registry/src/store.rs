//! The OCI layer over [`Storage`]: blobs shared across repositories,
//! per-repository links, upload sessions, manifests, tags and referrers.
//!
//! On-disk layout (object names; `_`-prefixed names cannot collide with
//! repository path components, which must start with `[a-z0-9]`):
//!
//! ```text
//! <root>/
//! ├── blobs/<alg>/<hex>                          content, complete and verified, shared
//! ├── uploads/<id>.data                          bytes received so far (from the first byte)
//! │   └── <id>.repo                              repository of a session of an older version
//! ├── repositories/<name...>/
//! │   ├── _links/<alg>/<hex>                     blob is part of this repository
//! │   ├── _manifests/<alg>/<hex>                 manifest revision; content: its media type
//! │   ├── _tags/<tag>                            content: the tag's digest
//! │   └── _referrers/<alg>/<hex>/<alg>-<hex>     subject <- referrer manifest
//! └── _tmp/                                      temporary files, renamed into place
//! ```
//!
//! Order of writes makes every crash harmless: content before links, the
//! manifest revision before the tag. A crash leaves at worst an
//! unreferenced blob, which garbage collection removes.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex, RwLock};

use axum::http::StatusCode;
use futures_util::{Stream, StreamExt};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::digest::{Algorithm, Digest, Hasher};
use crate::error::{ErrorCode, RegistryError, Result};
use crate::path::{Name, Reference, valid_tag};
use crate::storage::{Storage, Whole};

/// Manifests larger than this are refused: the spec suggests registries
/// accept at least 4 MiB, and a manifest is buffered to validate it.
pub const MAX_MANIFEST_BYTES: usize = 4 << 20;

/// The manifest media types the registry stores.
pub mod media {
    /// OCI image manifest.
    pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
    /// OCI image index.
    pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
    /// Docker image manifest v2 schema 2.
    pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
    /// Docker manifest list.
    pub const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
    /// Manifest kinds with a `manifests` array.
    pub fn is_index(media_type: &str) -> bool {
        media_type == OCI_INDEX || media_type == DOCKER_LIST
    }
    /// Every accepted manifest media type.
    pub const ALL: [&str; 4] = [OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_LIST];
}

fn blob_path(d: &Digest) -> String {
    format!("blobs/{}/{}", d.algorithm().as_str(), d.hex())
}
fn repo_path(name: &Name) -> String {
    format!("repositories/{name}")
}
fn link_path(name: &Name, d: &Digest) -> String {
    format!(
        "repositories/{name}/_links/{}/{}",
        d.algorithm().as_str(),
        d.hex()
    )
}
fn revision_path(name: &Name, d: &Digest) -> String {
    format!(
        "repositories/{name}/_manifests/{}/{}",
        d.algorithm().as_str(),
        d.hex()
    )
}
fn tag_path(name: &Name, tag: &str) -> String {
    format!("repositories/{name}/_tags/{tag}")
}
fn referrers_dir(name: &Name, subject: &Digest) -> String {
    format!(
        "repositories/{name}/_referrers/{}/{}",
        subject.algorithm().as_str(),
        subject.hex()
    )
}
// An upload session is at most one object, its bytes, from the first
// byte on: its id is signed with the repository it belongs to (see
// `Store::new_session_id`), so opening one writes nothing, and a push in one
// request touches no session object at all. Older versions kept the
// repository in a second object beside it (`upload_repo`), and before
// that a directory per session; both are still read and cleared.
pub(crate) fn upload_data(id: &str) -> String {
    format!("uploads/{id}.data")
}
pub(crate) fn upload_repo(id: &str) -> String {
    format!("uploads/{id}.repo")
}
/// The session an object under `uploads/` belongs to: `<id>.repo`,
/// `<id>.data`, or a directory `<id>` (the layout before sessions were
/// flat, which garbage collection still clears).
pub(crate) fn upload_id(object: &str) -> &str {
    object
        .strip_suffix(".repo")
        .or_else(|| object.strip_suffix(".data"))
        .unwrap_or(object)
}

fn settings_path(name: &Name) -> String {
    format!("repositories/{name}/_settings.json")
}

/// Per-repository settings, as ECR has them.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RepoSettings {
    /// Refuse to move a tag once it exists.
    pub tag_immutability: bool,
    /// Lifecycle: keep only the newest N tagged manifests (by push time).
    pub keep_last_tagged: Option<usize>,
    /// Lifecycle: remove untagged manifests older than this many seconds.
    pub expire_untagged_after_secs: Option<u64>,
}

/// The largest blob pushed whole that is hashed in memory and written
/// once, instead of streamed through an upload file.
const SMALL_BLOB: usize = 256 << 10;

fn body_ended(e: axum::Error) -> RegistryError {
    RegistryError::new(
        ErrorCode::BlobUploadInvalid,
        format!("request body ended early: {e}"),
    )
}

/// Bytes of an upload hashed where they are received; past them, hashing
/// moves to a thread of its own and takes batches of this size.
const HASH_BATCH: usize = 1 << 20;
/// Batches waiting for the hashing thread, at most (a bound on the memory
/// one upload holds for it).
const HASH_QUEUE: usize = 4;

/// An upload's sha256 as its chunks arrive. A large body is hashed on a
/// blocking thread, beside the task that receives it (which then only
/// receives and hands bytes to the writer): in series on one worker,
/// hashing was a third of a large push. A small body never pays for a
/// thread.
struct Hashing {
    /// The hasher, while it is still here.
    hasher: Option<Hasher>,
    /// Chunks not yet hashed, and their length.
    batch: Vec<bytes::Bytes>,
    batched: usize,
    /// The hashing thread, once there is one.
    thread: Option<(
        tokio::sync::mpsc::Sender<Vec<bytes::Bytes>>,
        tokio::sync::oneshot::Receiver<Hasher>,
    )>,
}

/// Uploads hashed on threads of their own at once, at most; others hash
/// where they receive. The threads are not tokio's blocking pool: an
/// upload's writer already holds a thread there, and a hasher queued
/// behind hundreds of writers waiting for their own uploads' bytes would
/// stall all of them.
const HASHING_THREADS: usize = 4;
static HASHERS: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(HASHING_THREADS);

impl Hashing {
    fn new(hasher: Hasher) -> Self {
        Hashing {
            hasher: Some(hasher),
            batch: Vec::new(),
            batched: 0,
            thread: None,
        }
    }

    async fn update(&mut self, chunk: bytes::Bytes) {
        self.batched += chunk.len();
        self.batch.push(chunk);
        if self.batched < HASH_BATCH {
            return;
        }
        self.batched = 0;
        let batch = std::mem::take(&mut self.batch);
        if self.thread.is_none()
            && let Some(hasher) = self.hasher.take()
        {
            match Self::start_thread(hasher) {
                Ok(thread) => self.thread = Some(thread),
                Err(hasher) => self.hasher = Some(hasher),
            }
        }
        match (&self.thread, &mut self.hasher) {
            // Fails only if the thread is gone, which `finish` reports.
            (Some((tx, _)), _) => {
                let _ = tx.send(batch).await;
            }
            (None, Some(hasher)) => {
                for chunk in batch {
                    hasher.update(&chunk);
                }
            }
            (None, None) => unreachable!("the hasher is here or on its thread"),
        }
    }

    /// Hands `hasher` to a thread of its own, or gives it back when
    /// [`HASHING_THREADS`] are busy (or no thread can be made).
    #[allow(clippy::type_complexity, clippy::result_large_err)]
    fn start_thread(
        hasher: Hasher,
    ) -> std::result::Result<
        (
            tokio::sync::mpsc::Sender<Vec<bytes::Bytes>>,
            tokio::sync::oneshot::Receiver<Hasher>,
        ),
        Hasher,
    > {
        let Ok(permit) = HASHERS.try_acquire() else {
            return Err(hasher);
        };
        let (tx, mut rx) = tokio::sync::mpsc::channel::<Vec<bytes::Bytes>>(HASH_QUEUE);
        let (done_tx, done) = tokio::sync::oneshot::channel();
        // Shared, so that a thread that cannot be made gives it back.
        let slot = Arc::new(Mutex::new(Some(hasher)));
        let theirs = slot.clone();
        let spawned = std::thread::Builder::new()
            .name("wharf-hash".into())
            .spawn(move || {
                let _permit = permit;
                let taken = theirs.lock().unwrap_or_else(|p| p.into_inner()).take();
                let Some(mut hasher) = taken else { return };
                while let Some(batch) = rx.blocking_recv() {
                    for chunk in batch {
                        hasher.update(&chunk);
                    }
                }
                let _ = done_tx.send(hasher);
            });
        let mut back = slot.lock().unwrap_or_else(|p| p.into_inner());
        match spawned {
            Ok(_) => Ok((tx, done)),
            Err(_) => Err(back.take().expect("a thread never made never took it")),
        }
    }

    async fn finish(mut self) -> Result<Hasher> {
        let batch = std::mem::take(&mut self.batch);
        match self.thread {
            None => {
                let mut hasher = self.hasher.take().expect("the hasher is here");
                for chunk in batch {
                    hasher.update(&chunk);
                }
                Ok(hasher)
            }
            Some((tx, done)) => {
                let _ = tx.send(batch).await;
                drop(tx);
                done.await.map_err(|_| {
                    RegistryError::Internal("the hashing thread ended without its hash".into())
                })
            }
        }
    }
}

/// Where a completed upload's bytes are.
enum Content<'a> {
    /// Received whole, in memory (a small push); whether the session may
    /// have a data file all the same (of no bytes).
    Memory(&'a [u8], bool),
    /// In the upload's data file.
    Upload,
}

/// The live hash of an upload. Kept in memory between requests; rebuilt
/// from the bytes on disk after a restart.
struct UploadState {
    offset: u64,
    hasher: Hasher,
    /// The upload's data file may exist (bytes were appended, or it was
    /// found): removing the session then removes it.
    stored: bool,
}

/// Bytes of an upload id's tag: a forger must guess 64 bits per request.
const SESSION_TAG_BYTES: usize = 8;
/// Hex digits of a signed upload id: a 128-bit nonce and its tag.
const SESSION_ID_LEN: usize = 32 + 2 * SESSION_TAG_BYTES;

/// Live upload states kept in memory before those no request holds are
/// let go (each is rebuilt from its stored bytes when next used): opening
/// sessions and never using them cannot grow the server.
const LIVE_KEPT: usize = 4096;

/// Ended (completed or cancelled) sessions remembered, so a request
/// waiting behind the one that ended a session, or a late retry, finds it
/// gone. The oldest are forgotten first; a forgotten id is valid again,
/// as a new empty session of its repository (it holds nothing, and only
/// a pusher of that repository has it).
const ENDED_KEPT: usize = 4096;

type Session = Arc<tokio::sync::Mutex<Option<UploadState>>>;

/// The upload states in memory, by id.
struct Live {
    sessions: HashMap<String, Session>,
    /// How many are kept before those no request holds are let go
    /// ([`LIVE_KEPT`]; smaller in tests).
    kept: usize,
    /// Twice what requests held at the last purge: the next purge waits
    /// for the larger of this and `kept` (so many held ones do not make
    /// every insert a scan).
    purge_at: usize,
}

impl Default for Live {
    fn default() -> Self {
        Live {
            sessions: HashMap::new(),
            kept: LIVE_KEPT,
            purge_at: 0,
        }
    }
}

impl Live {
    /// `id`'s entry, made (`fresh` or empty) if there is none. At the
    /// bound, entries no request holds are let go: those with nothing to
    /// rebuild, then, if half the bound is still taken, the others (each
    /// is rebuilt from its stored bytes when next used). Requests clone an
    /// entry only under the lock this is called under, so an entry only
    /// the map holds is one no request is using.
    fn entry(&mut self, id: &str, fresh: impl FnOnce() -> Option<UploadState>) -> Session {
        if let Some(s) = self.sessions.get(id) {
            return s.clone();
        }
        if self.sessions.len() >= self.purge_at.max(self.kept) {
            let idle = |s: &Session| Arc::strong_count(s) == 1;
            self.sessions.retain(|_, s| {
                !idle(s)
                    || s.try_lock().is_ok_and(|state| {
                        state.as_ref().is_some_and(|st| st.offset > 0 || st.stored)
                    })
            });
            // Half the bound still taken (so the next purge is at least
            // that many inserts away): the others too.
            if self.sessions.len() >= self.kept / 2 {
                self.sessions.retain(|_, s| !idle(s));
            }
            // Every one left is held.
            self.purge_at = if self.sessions.len() >= self.kept / 2 {
                2 * self.sessions.len()
            } else {
                0
            };
        }
        let s = Arc::new(tokio::sync::Mutex::new(fresh()));
        self.sessions.insert(id.to_owned(), s.clone());
        s
    }

    fn remove(&mut self, id: &str) {
        self.sessions.remove(id);
    }
}

/// The most recently ended sessions, in the order they ended.
#[derive(Default)]
struct Ended {
    ids: HashSet<String>,
    order: VecDeque<String>,
}

impl Ended {
    fn add(&mut self, id: &str) {
        if self.ids.insert(id.to_owned()) {
            self.order.push_back(id.to_owned());
            if self.order.len() > ENDED_KEPT
                && let Some(old) = self.order.pop_front()
            {
                self.ids.remove(&old);
            }
        }
    }
}

/// An id in the signed form (older versions' ids are hyphenated UUIDs).
fn signed_form(id: &str) -> bool {
    id.len() == SESSION_ID_LEN && id.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// A stored manifest, as served.
#[derive(Debug, Clone)]
pub struct Manifest {
    /// Its digest.
    pub digest: Digest,
    /// Its media type.
    pub media_type: String,
    /// Its bytes.
    pub bytes: Vec<u8>,
}

/// Result of a manifest push.
#[derive(Debug, Clone)]
pub struct PutManifest {
    /// The manifest's digest.
    pub digest: Digest,
    /// The `subject` it refers to, if any.
    pub subject: Option<Digest>,
    /// The media type it was stored with.
    pub media_type: String,
}

/// The OCI registry's storage layer.
pub struct Store {
    storage: Arc<dyn Storage>,
    uploads: Mutex<Live>,
    ended: Mutex<Ended>,
    /// Signs upload ids with their repository (see [`Store::set_session_key`]).
    session_key: RwLock<[u8; 32]>,
    /// Other servers write to the same storage (replicas): an upload's
    /// live state is checked against its stored length before it is used.
    shared: std::sync::atomic::AtomicBool,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").finish_non_exhaustive()
    }
}

/// A stream of request body chunks.
pub trait BodyStream:
    Stream<Item = std::result::Result<bytes::Bytes, axum::Error>> + Send + Unpin
{
}
impl<T: Stream<Item = std::result::Result<bytes::Bytes, axum::Error>> + Send + Unpin> BodyStream
    for T
{
}

impl Store {
    /// A store over `storage`.
    pub fn new(storage: Arc<dyn Storage>) -> Self {
        // Random until the server sets its own (a v4 UUID is 122 bits
        // from the operating system's generator).
        let mut key = [0; 32];
        key[..16].copy_from_slice(uuid::Uuid::new_v4().as_bytes());
        key[16..].copy_from_slice(uuid::Uuid::new_v4().as_bytes());
        Store {
            storage,
            uploads: Mutex::default(),
            ended: Mutex::default(),
            session_key: RwLock::new(key),
            shared: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// Derives the key that signs upload ids from `secret`. A session
    /// opened before a restart, or on another server over the same
    /// storage, is known by its id alone when the secret is the same.
    pub fn set_session_key(&self, secret: &[u8]) {
        use sha2::Digest as _;
        let mut h = sha2::Sha256::new();
        h.update(b"wharf upload sessions v1\0");
        h.update(secret);
        *self.session_key.write().expect("session key lock") = h.finalize().into();
    }

    /// The MAC of upload nonce `nonce` in `name`.
    fn session_mac(&self, name: &Name, nonce: &str) -> hmac::Hmac<sha2::Sha256> {
        use hmac::Mac as _;
        let key = *self.session_key.read().expect("session key lock");
        let mut mac =
            <hmac::Hmac<sha2::Sha256>>::new_from_slice(&key).expect("HMAC takes any key length");
        mac.update(name.as_str().as_bytes());
        mac.update(b"\0");
        mac.update(nonce.as_bytes());
        mac
    }

    /// A new upload id of `name`: a random nonce and its tag.
    fn new_session_id(&self, name: &Name) -> String {
        use hmac::Mac as _;
        let nonce = uuid::Uuid::new_v4().simple().to_string();
        let tag = self.session_mac(name, &nonce).finalize().into_bytes();
        format!("{nonce}{}", hex::encode(&tag[..SESSION_TAG_BYTES]))
    }

    /// Whether signed id `id` was issued for `name` (compared in constant
    /// time).
    fn signed_for(&self, name: &Name, id: &str) -> bool {
        use hmac::Mac as _;
        let (nonce, tag) = id.split_at(32);
        hex::decode(tag).is_ok_and(|tag| {
            self.session_mac(name, nonce)
                .verify_truncated_left(&tag)
                .is_ok()
        })
    }

    /// Says other servers share the storage (see `shared`).
    pub fn set_shared(&self) {
        self.shared
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }

    /// Drops `state` if its stored length differs from what it was built
    /// on, so it is rebuilt from the stored bytes: checked when other
    /// servers append to the storage, and, with `always`, before a commit
    /// (`wharf registry gc` may have removed an idle session's file, and a
    /// signed id outlives it).
    async fn check_fresh(
        &self,
        id: &str,
        state: &mut Option<UploadState>,
        always: bool,
    ) -> Result<()> {
        if let Some(live) = state.as_ref()
            && (always || self.shared.load(std::sync::atomic::Ordering::Relaxed))
        {
            let stored = self.storage.stat(&upload_data(id)).await?.unwrap_or(0);
            if stored != live.offset {
                *state = None;
            }
        }
        Ok(())
    }

    /// The primitive storage.
    pub fn storage(&self) -> &Arc<dyn Storage> {
        &self.storage
    }

    // ----- blobs -----

    /// Size of a blob if it is part of repository `name`.
    pub async fn blob_size(&self, name: &Name, digest: &Digest) -> Result<Option<u64>> {
        if self.storage.stat(&link_path(name, digest)).await?.is_none() {
            return Ok(None);
        }
        Ok(self.storage.stat(&blob_path(digest)).await?)
    }

    /// A blob's `len` bytes from `offset`, as a response body's chunks.
    pub async fn blob_chunks(
        &self,
        digest: &Digest,
        offset: u64,
        len: u64,
    ) -> Result<Option<crate::storage::Chunks>> {
        Ok(self.storage.chunks(&blob_path(digest), offset, len).await?)
    }

    /// Whether the blob content exists anywhere.
    pub async fn blob_exists(&self, digest: &Digest) -> Result<bool> {
        Ok(self.storage.stat(&blob_path(digest)).await?.is_some())
    }

    /// Links a blob of `from` into `name` (cross-repository mount). Returns
    /// false if `from` has no such blob. The caller checks that the client
    /// may pull from `from`.
    pub async fn mount(&self, name: &Name, digest: &Digest, from: &Name) -> Result<bool> {
        if self.blob_size(from, digest).await?.is_none() {
            return Ok(false);
        }
        self.storage.mark(&link_path(name, digest)).await?;
        Ok(true)
    }

    /// Stores small bytes as a blob of `name` (scans, empty configs).
    pub async fn put_small_blob(&self, name: &Name, bytes: &[u8]) -> Result<Digest> {
        let digest = Digest::sha256_of(bytes);
        if !self.blob_exists(&digest).await? {
            self.storage.write(&blob_path(&digest), bytes).await?;
        }
        self.storage.mark(&link_path(name, &digest)).await?;
        Ok(digest)
    }

    /// A whole blob of `name`, if it is at most `max` bytes: mapped from
    /// its file where the storage has one, so reading a large layer (a
    /// scan, a compile) holds none of it in the heap.
    pub async fn read_blob(&self, name: &Name, digest: &Digest, max: u64) -> Result<Option<Whole>> {
        match self.blob_size(name, digest).await? {
            Some(size) if size <= max => Ok(self.storage.whole(&blob_path(digest)).await?),
            _ => Ok(None),
        }
    }

    /// Unlinks a blob from `name`. Content stays until garbage collection.
    pub async fn delete_blob(&self, name: &Name, digest: &Digest) -> Result<()> {
        if self.storage.stat(&link_path(name, digest)).await?.is_none() {
            return Err(RegistryError::new(
                ErrorCode::BlobUnknown,
                format!("blob {digest} is not in {name}"),
            ));
        }
        self.storage.delete(&link_path(name, digest)).await?;
        Ok(())
    }

    // ----- uploads -----

    /// Opens an upload session for `name`. Nothing is stored: the id
    /// carries its repository, signed, and the data file comes with the
    /// first byte.
    pub async fn start_upload(&self, name: &Name) -> Result<String> {
        let id = self.new_session_id(name);
        self.uploads.lock().expect("uploads lock").entry(&id, || {
            Some(UploadState {
                offset: 0,
                hasher: Hasher::new(Algorithm::Sha256),
                stored: false,
            })
        });
        Ok(id)
    }

    fn session(&self, id: &str) -> Session {
        self.uploads
            .lock()
            .expect("uploads lock")
            .entry(id, || None)
    }

    async fn check_upload(&self, name: &Name, id: &str) -> Result<()> {
        let unknown = || {
            RegistryError::new(
                ErrorCode::BlobUploadUnknown,
                format!("no upload {id:?} in {name}"),
            )
        };
        if id.is_empty() || id.len() > 64 || !id.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-')
        {
            return Err(unknown());
        }
        if self.ended.lock().expect("ended lock").ids.contains(id) {
            return Err(unknown());
        }
        if signed_form(id) {
            return if self.signed_for(name, id) {
                Ok(())
            } else {
                Err(unknown())
            };
        }
        // A session opened by an older version: its repository is stored.
        match self.storage.read(&upload_repo(id)).await? {
            Some(repo) if repo == name.as_str().as_bytes() => Ok(()),
            _ => Err(unknown()),
        }
    }

    /// Hashes an upload's bytes on disk with `alg`.
    async fn hash_upload(&self, id: &str, alg: Algorithm) -> Result<UploadState> {
        let mut hasher = Hasher::new(alg);
        let mut offset = 0;
        let reader = self.storage.reader(&upload_data(id), 0, None).await?;
        let stored = reader.is_some();
        if let Some(mut r) = reader {
            let mut buf = vec![0; 1 << 20];
            loop {
                let n = r.read(&mut buf).await?;
                if n == 0 {
                    break;
                }
                hasher.update(&buf[..n]);
                offset += n as u64;
            }
        }
        Ok(UploadState {
            offset,
            hasher,
            stored,
        })
    }

    /// Rebuilds an upload's live sha256 state from its bytes (after a restart).
    async fn recover(&self, id: &str) -> Result<UploadState> {
        self.hash_upload(id, Algorithm::Sha256).await
    }

    /// Bytes received so far.
    pub async fn upload_offset(&self, name: &Name, id: &str) -> Result<u64> {
        let guard = self.locked(name, id).await?;
        Ok(guard.as_ref().expect("state present").offset)
    }

    /// Locks upload `id` of `name` with its live state fresh or rebuilt.
    /// The session is checked before its entry is made (an unknown id
    /// never enters the map) and again once the lock is held: a request
    /// that waited behind the one completing or cancelling it finds it
    /// gone instead of writing into a finished session.
    async fn locked(
        &self,
        name: &Name,
        id: &str,
    ) -> Result<tokio::sync::OwnedMutexGuard<Option<UploadState>>> {
        self.locked_checking(name, id, false).await
    }

    /// [`locked`](Store::locked), the state checked against the stored
    /// length whether or not the storage is shared (`always`: to commit).
    async fn locked_checking(
        &self,
        name: &Name,
        id: &str,
        always: bool,
    ) -> Result<tokio::sync::OwnedMutexGuard<Option<UploadState>>> {
        self.check_upload(name, id).await?;
        let mut guard = self.session(id).lock_owned().await;
        if let Err(e) = self.check_upload(name, id).await {
            // It passed a moment ago: it was completed or cancelled.
            drop(guard);
            self.uploads.lock().expect("uploads lock").remove(id);
            return Err(e);
        }
        self.check_fresh(id, &mut guard, always).await?;
        if guard.is_none() {
            *guard = Some(self.recover(id).await?);
        }
        Ok(guard)
    }

    /// Appends a chunk. With `start`, the chunk must begin where the upload
    /// ends (416 otherwise). Returns the new length.
    pub async fn append_upload(
        &self,
        name: &Name,
        id: &str,
        start: Option<u64>,
        body: impl BodyStream,
    ) -> Result<u64> {
        let mut guard = self.locked(name, id).await?;
        let state = guard.as_mut().expect("state present");
        if let Some(start) = start
            && start != state.offset
        {
            return Err(RegistryError::with_status(
                ErrorCode::BlobUploadInvalid,
                StatusCode::RANGE_NOT_SATISFIABLE,
                format!(
                    "chunk starts at {start} but the upload has {} bytes: chunks must arrive in order",
                    state.offset
                ),
            ));
        }
        let mut writer = self.storage.appender(&upload_data(id)).await?;
        let mut body = body;
        let mut received = 0u64;
        // The live state leaves the session while the body is read: if
        // this request is dropped half way, the next one rebuilds it from
        // the bytes on disk instead of finding an emptied hasher.
        let mut state = guard.take().expect("state present");
        let mut hashing = Hashing::new(std::mem::replace(
            &mut state.hasher,
            Hasher::new(Algorithm::Sha256),
        ));
        let result: Result<Hasher> = async {
            while let Some(chunk) = body.next().await {
                let chunk = chunk.map_err(body_ended)?;
                writer.write_all(&chunk).await?;
                received += chunk.len() as u64;
                hashing.update(chunk).await;
            }
            writer.shutdown().await?;
            hashing.finish().await
        }
        .await;
        match result {
            Ok(hasher) => {
                state.hasher = hasher;
                state.offset += received;
                state.stored = true;
                let offset = state.offset;
                *guard = Some(state);
                Ok(offset)
            }
            Err(e) => {
                // Let the writer finish what it was given, so the file is
                // settled before anyone reads it; its own error adds nothing.
                // The bytes on disk and the hash may now disagree: the state
                // stays out, and the next request rebuilds it from disk.
                let _ = writer.shutdown().await;
                Err(e)
            }
        }
    }

    /// Completes an upload: appends the last bytes, verifies the digest,
    /// and makes the blob visible in `name`. A mismatch stores nothing.
    pub async fn finish_upload(
        &self,
        name: &Name,
        id: &str,
        digest: &Digest,
        body: impl BodyStream,
    ) -> Result<()> {
        let mut body = body;
        // A blob pushed whole and small (the common monolithic push of a
        // config, a scan, a small module) never goes through the upload
        // file: hashed in memory and written once, durably. The session
        // stays locked until then, so no chunk slips in beside it.
        let guard = self.locked(name, id).await?;
        let live = guard.as_ref().expect("state present");
        if live.offset == 0 {
            // Another server may have opened the data file since.
            let stored = live.stored || self.shared.load(std::sync::atomic::Ordering::Relaxed);
            let mut prefix = Vec::new();
            let mut ended = true;
            while let Some(chunk) = body.next().await {
                let chunk = chunk.map_err(body_ended)?;
                prefix.extend_from_slice(&chunk);
                if prefix.len() > SMALL_BLOB {
                    ended = false;
                    break;
                }
            }
            if ended {
                let actual = digest.same_algorithm_of(&prefix);
                return self
                    .conclude(name, id, digest, &actual, Content::Memory(&prefix, stored))
                    .await;
            }
            drop(guard);
            let prefix = futures_util::stream::iter([Ok(bytes::Bytes::from(prefix))]);
            self.append_upload(name, id, None, prefix.chain(body))
                .await?;
        } else {
            drop(guard);
            self.append_upload(name, id, None, body).await?;
        }
        // What is committed is the stored bytes: a live state that
        // disagrees with their length is rebuilt from them, so the digest
        // check is of those bytes.
        let mut guard = self.locked_checking(name, id, true).await?;
        let state = guard.take().expect("state present");
        let actual = match digest.algorithm() {
            Algorithm::Sha256 => state.hasher.finish(),
            // Uploads are hashed with sha256 as they arrive; the rarer
            // sha512 is computed once at the end.
            Algorithm::Sha512 => self
                .hash_upload(id, Algorithm::Sha512)
                .await?
                .hasher
                .finish(),
        };
        // Still locked: a chunk waiting behind this request finds the
        // session gone, never half committed.
        let result = self
            .conclude(name, id, digest, &actual, Content::Upload)
            .await;
        drop(guard);
        result
    }

    /// Ends upload `id`: if its bytes hash to `digest` (they hash to
    /// `actual`), they become the blob, linked into `name`; otherwise
    /// nothing is stored. Either way the session is gone.
    async fn conclude(
        &self,
        name: &Name,
        id: &str,
        digest: &Digest,
        actual: &Digest,
        content: Content<'_>,
    ) -> Result<()> {
        // Whether the data file is still there once this is done (a
        // commit moves it into place).
        let mut data_left = match content {
            Content::Memory(_, stored) => stored,
            Content::Upload => true,
        };
        let result = if actual != digest {
            Err(RegistryError::new(
                ErrorCode::DigestInvalid,
                format!("the uploaded content has digest {actual}, not {digest}"),
            ))
        } else {
            let link = link_path(name, digest);
            let blob = blob_path(digest);
            if self.blob_exists(digest).await? {
                self.storage.mark(&link).await?;
            } else {
                match content {
                    Content::Memory(bytes, _) => {
                        self.storage.write_marked(&blob, bytes, &link).await?
                    }
                    Content::Upload => {
                        self.storage
                            .commit_marked(&upload_data(id), &blob, &link)
                            .await?;
                        data_left = false;
                    }
                }
            }
            Ok(())
        };
        self.remove_session(id, data_left).await?;
        result
    }

    /// Removes upload `id` (and its data file, if `data`): it is
    /// remembered as ended first, so a request checking the session finds
    /// it gone before its bytes go.
    async fn remove_session(&self, id: &str, data: bool) -> Result<()> {
        self.ended.lock().expect("ended lock").add(id);
        if !signed_form(id) {
            self.storage.delete(&upload_repo(id)).await?;
        }
        if data {
            self.storage.delete(&upload_data(id)).await?;
        }
        self.uploads.lock().expect("uploads lock").remove(id);
        Ok(())
    }

    /// Cancels an upload, under its lock: a chunk being appended ends
    /// first, so none lands after its file is removed.
    pub async fn cancel_upload(&self, name: &Name, id: &str) -> Result<()> {
        self.check_upload(name, id).await?;
        let guard = self.session(id).lock_owned().await;
        if let Err(e) = self.check_upload(name, id).await {
            drop(guard);
            self.uploads.lock().expect("uploads lock").remove(id);
            return Err(e);
        }
        let result = self.remove_session(id, true).await;
        drop(guard);
        result
    }

    // ----- manifests -----

    /// Resolves a reference to a digest in `name`.
    pub async fn resolve(&self, name: &Name, reference: &Reference) -> Result<Option<Digest>> {
        match reference {
            Reference::Digest(d) => Ok(Some(d.clone())),
            Reference::Tag(tag) => match self.storage.read(&tag_path(name, tag)).await? {
                Some(bytes) => {
                    let text = String::from_utf8(bytes).map_err(|_| {
                        RegistryError::Internal(format!("corrupt tag {name}:{tag}"))
                    })?;
                    Ok(Some(text.trim().parse().map_err(|_| {
                        RegistryError::Internal(format!("corrupt tag {name}:{tag}"))
                    })?))
                }
                None => Ok(None),
            },
        }
    }

    /// A manifest by tag or digest.
    pub async fn manifest(&self, name: &Name, reference: &Reference) -> Result<Manifest> {
        let unknown = || {
            RegistryError::new(
                ErrorCode::ManifestUnknown,
                format!("manifest {reference} is not in {name}"),
            )
        };
        let digest = self.resolve(name, reference).await?.ok_or_else(unknown)?;
        let media_type = self
            .storage
            .read(&revision_path(name, &digest))
            .await?
            .ok_or_else(unknown)?;
        let bytes = self
            .storage
            .read(&blob_path(&digest))
            .await?
            .ok_or_else(unknown)?;
        Ok(Manifest {
            digest,
            media_type: String::from_utf8_lossy(&media_type).into_owned(),
            bytes,
        })
    }

    /// Validates and stores a manifest under a tag or its digest.
    pub async fn put_manifest(
        &self,
        name: &Name,
        reference: &Reference,
        content_type: Option<&str>,
        bytes: &[u8],
    ) -> Result<PutManifest> {
        let invalid = |m: String| RegistryError::new(ErrorCode::ManifestInvalid, m);
        if bytes.len() > MAX_MANIFEST_BYTES {
            return Err(RegistryError::with_status(
                ErrorCode::SizeInvalid,
                StatusCode::PAYLOAD_TOO_LARGE,
                format!(
                    "manifest of {} bytes exceeds the {MAX_MANIFEST_BYTES}-byte limit",
                    bytes.len()
                ),
            ));
        }
        let json: Value = serde_json::from_slice(bytes)
            .map_err(|e| invalid(format!("manifest is not valid JSON: {e}")))?;
        let declared = json.get("mediaType").and_then(Value::as_str);
        let content_type = content_type.map(|c| c.split(';').next().unwrap_or(c).trim());
        let media_type = match (declared, content_type) {
            (Some(d), Some(c)) if d != c => {
                return Err(invalid(format!(
                    "manifest mediaType {d:?} does not match Content-Type {c:?}"
                )));
            }
            (Some(d), _) => d,
            (None, Some(c)) => c,
            (None, None) => {
                return Err(invalid(
                    "manifest has no mediaType and the request no Content-Type".into(),
                ));
            }
        }
        .to_owned();
        if !media::ALL.contains(&media_type.as_str()) {
            return Err(invalid(format!(
                "unsupported manifest media type {media_type:?}"
            )));
        }
        if json.get("schemaVersion").and_then(Value::as_u64) != Some(2) {
            return Err(invalid("schemaVersion must be 2".into()));
        }

        // Everything the manifest refers to must already be here.
        if media::is_index(&media_type) {
            let manifests = json
                .get("manifests")
                .and_then(Value::as_array)
                .ok_or_else(|| invalid("an index needs a manifests array".into()))?;
            for m in manifests {
                let d = descriptor_digest(m).map_err(invalid)?;
                if self.storage.stat(&revision_path(name, &d)).await?.is_none() {
                    return Err(RegistryError::new(
                        ErrorCode::ManifestBlobUnknown,
                        format!("index refers to manifest {d}, which is not in {name}"),
                    ));
                }
            }
        } else {
            let config = json
                .get("config")
                .ok_or_else(|| invalid("an image manifest needs a config descriptor".into()))?;
            let layers = json
                .get("layers")
                .and_then(Value::as_array)
                .ok_or_else(|| invalid("an image manifest needs a layers array".into()))?;
            for descriptor in std::iter::once(config).chain(layers) {
                let d = descriptor_digest(descriptor).map_err(invalid)?;
                let size = descriptor
                    .get("size")
                    .and_then(Value::as_u64)
                    .ok_or_else(|| invalid(format!("descriptor {d} has no size")))?;
                match self.blob_size(name, &d).await? {
                    // Non-distributable layers (deprecated, still in the
                    // spec) live elsewhere, at their `urls`: they may be
                    // absent here. The descriptor itself must be sound.
                    None if is_nondistributable(descriptor) => {
                        check_urls(descriptor).map_err(invalid)?;
                    }
                    None => {
                        return Err(RegistryError::new(
                            ErrorCode::ManifestBlobUnknown,
                            format!("manifest refers to blob {d}, which is not in {name}"),
                        ));
                    }
                    Some(actual) if actual != size => {
                        return Err(invalid(format!(
                            "descriptor {d} says {size} bytes but the blob has {actual}"
                        )));
                    }
                    Some(_) => {}
                }
            }
        }
        let subject = match json.get("subject") {
            Some(s) => Some(descriptor_digest(s).map_err(invalid)?),
            None => None,
        };

        let digest = match reference {
            Reference::Digest(d) => {
                let actual = d.same_algorithm_of(bytes);
                if &actual != d {
                    return Err(RegistryError::new(
                        ErrorCode::DigestInvalid,
                        format!("manifest has digest {actual}, not {d}"),
                    ));
                }
                actual
            }
            Reference::Tag(_) => Digest::sha256_of(bytes),
        };

        // Content, then the revision, then referrer and tag links.
        if !self.blob_exists(&digest).await? {
            self.storage.write(&blob_path(&digest), bytes).await?;
        }
        self.storage
            .write(&revision_path(name, &digest), media_type.as_bytes())
            .await?;
        if let Some(subject) = &subject {
            let link = format!(
                "{}/{}-{}",
                referrers_dir(name, subject),
                digest.algorithm().as_str(),
                digest.hex()
            );
            self.storage.mark(&link).await?;
        }
        if let Reference::Tag(tag) = reference {
            self.storage
                .write(&tag_path(name, tag), digest.as_str().as_bytes())
                .await?;
        }
        Ok(PutManifest {
            digest,
            subject,
            media_type,
        })
    }

    /// Deletes a tag, or a manifest revision and every tag pointing at it.
    pub async fn delete_manifest(&self, name: &Name, reference: &Reference) -> Result<()> {
        match reference {
            Reference::Tag(tag) => {
                if self.storage.stat(&tag_path(name, tag)).await?.is_none() {
                    return Err(RegistryError::new(
                        ErrorCode::ManifestUnknown,
                        format!("tag {tag} is not in {name}"),
                    ));
                }
                self.storage.delete(&tag_path(name, tag)).await?;
            }
            Reference::Digest(digest) => {
                let manifest = self.manifest(name, reference).await?;
                for tag in self.tags(name).await? {
                    if self
                        .resolve(name, &Reference::Tag(tag.clone()))
                        .await?
                        .as_ref()
                        == Some(digest)
                    {
                        self.storage.delete(&tag_path(name, &tag)).await?;
                    }
                }
                if let Ok(json) = serde_json::from_slice::<Value>(&manifest.bytes)
                    && let Some(Ok(subject)) = json.get("subject").map(descriptor_digest)
                {
                    let link = format!(
                        "{}/{}-{}",
                        referrers_dir(name, &subject),
                        digest.algorithm().as_str(),
                        digest.hex()
                    );
                    self.storage.delete(&link).await?;
                }
                self.storage.delete(&revision_path(name, digest)).await?;
            }
        }
        Ok(())
    }

    // ----- settings -----

    /// The settings of `name` (defaults when none were set).
    pub async fn settings(&self, name: &Name) -> Result<RepoSettings> {
        match self.storage.read(&settings_path(name)).await? {
            Some(bytes) => serde_json::from_slice(&bytes)
                .map_err(|e| RegistryError::Internal(format!("corrupt settings for {name}: {e}"))),
            None => Ok(RepoSettings::default()),
        }
    }

    /// Replaces the settings of `name`.
    pub async fn set_settings(&self, name: &Name, settings: &RepoSettings) -> Result<()> {
        let bytes = serde_json::to_vec_pretty(settings).expect("settings serialize");
        self.storage.write(&settings_path(name), &bytes).await?;
        Ok(())
    }

    // ----- listings -----

    /// Whether repository `name` exists (has any blob or manifest).
    pub async fn repository_exists(&self, name: &Name) -> Result<bool> {
        let entries = self.storage.list(&repo_path(name)).await?;
        Ok(entries.iter().any(|e| e == "_links" || e == "_manifests"))
    }

    /// All tags of `name`, sorted.
    pub async fn tags(&self, name: &Name) -> Result<Vec<String>> {
        let mut tags: Vec<String> = self
            .storage
            .list(&format!("repositories/{name}/_tags"))
            .await?
            .into_iter()
            .filter(|t| valid_tag(t))
            .collect();
        tags.sort();
        Ok(tags)
    }

    /// All repository names, sorted.
    pub async fn catalog(&self) -> Result<Vec<String>> {
        let mut out = Vec::new();
        let mut pending = vec![String::new()];
        while let Some(prefix) = pending.pop() {
            let dir = if prefix.is_empty() {
                "repositories".to_owned()
            } else {
                format!("repositories/{prefix}")
            };
            let entries = self.storage.list(&dir).await?;
            if !prefix.is_empty() && entries.iter().any(|e| e == "_links" || e == "_manifests") {
                out.push(prefix.clone());
            }
            for entry in entries.into_iter().filter(|e| !e.starts_with('_')) {
                pending.push(if prefix.is_empty() {
                    entry
                } else {
                    format!("{prefix}/{entry}")
                });
            }
        }
        out.sort();
        Ok(out)
    }

    /// The referrers of `subject` in `name`, as index descriptors, with an
    /// optional artifact type filter.
    pub async fn referrers(
        &self,
        name: &Name,
        subject: &Digest,
        artifact_type: Option<&str>,
    ) -> Result<Vec<Value>> {
        let mut out = Vec::new();
        for entry in self.storage.list(&referrers_dir(name, subject)).await? {
            let Some((alg, hex)) = entry.split_once('-') else {
                continue;
            };
            let Ok(digest) = format!("{alg}:{hex}").parse::<Digest>() else {
                continue;
            };
            let Ok(manifest) = self
                .manifest(name, &Reference::Digest(digest.clone()))
                .await
            else {
                continue;
            };
            let Ok(json) = serde_json::from_slice::<Value>(&manifest.bytes) else {
                continue;
            };
            let kind = json
                .get("artifactType")
                .and_then(Value::as_str)
                .or_else(|| json.pointer("/config/mediaType").and_then(Value::as_str))
                .map(str::to_owned);
            if artifact_type.is_some() && kind.as_deref() != artifact_type {
                continue;
            }
            let mut descriptor = serde_json::json!({
                "mediaType": manifest.media_type,
                "digest": digest.as_str(),
                "size": manifest.bytes.len(),
            });
            if let Some(kind) = kind {
                descriptor["artifactType"] = kind.into();
            }
            if let Some(annotations) = json.get("annotations") {
                descriptor["annotations"] = annotations.clone();
            }
            out.push(descriptor);
        }
        Ok(out)
    }
}

/// Whether a descriptor is a non-distributable layer
/// (`application/vnd.oci.image.layer.nondistributable.*`, or Docker's
/// `application/vnd.docker.image.rootfs.foreign.*`).
fn is_nondistributable(descriptor: &Value) -> bool {
    descriptor
        .get("mediaType")
        .and_then(Value::as_str)
        .is_some_and(|m| m.contains(".nondistributable.") || m.contains(".rootfs.foreign."))
}

/// `urls`, when present, must be an array of http(s) URLs.
fn check_urls(descriptor: &Value) -> std::result::Result<(), String> {
    let Some(urls) = descriptor.get("urls") else {
        return Ok(());
    };
    let urls = urls
        .as_array()
        .ok_or_else(|| "a descriptor's urls must be an array".to_owned())?;
    for url in urls {
        let ok = url
            .as_str()
            .is_some_and(|u| u.starts_with("https://") || u.starts_with("http://"));
        if !ok {
            return Err(format!(
                "{url} is not an http(s) URL in a descriptor's urls"
            ));
        }
    }
    Ok(())
}

fn descriptor_digest(descriptor: &Value) -> std::result::Result<Digest, String> {
    let text = descriptor
        .get("digest")
        .and_then(Value::as_str)
        .ok_or_else(|| "a descriptor has no digest".to_owned())?;
    text.parse().map_err(|e: RegistryError| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn hash_in_chunks(bytes: &[u8]) -> Digest {
        let mut hashing = Hashing::new(Hasher::new(Algorithm::Sha256));
        for chunk in bytes.chunks(64 << 10) {
            hashing.update(bytes::Bytes::copy_from_slice(chunk)).await;
        }
        hashing.finish().await.unwrap().finish()
    }

    /// A large body is hashed right on a thread of its own, and right
    /// where it is received when every hashing thread is taken.
    #[tokio::test]
    async fn hashing_is_the_same_on_its_thread_and_inline_when_threads_are_busy() {
        let bytes: Vec<u8> = (0..(3 << 20) + 17).map(|i| (i * 31 % 253) as u8).collect();
        let want = Digest::sha256_of(&bytes);
        assert_eq!(hash_in_chunks(&bytes).await, want, "on its thread");
        let all = HASHERS.acquire_many(HASHING_THREADS as u32).await.unwrap();
        let mut hashing = Hashing::new(Hasher::new(Algorithm::Sha256));
        hashing.update(bytes::Bytes::copy_from_slice(&bytes)).await;
        assert!(hashing.thread.is_none(), "no thread while all are taken");
        assert_eq!(hashing.finish().await.unwrap().finish(), want);
        drop(all);
        assert_eq!(
            hash_in_chunks(&bytes[..100]).await,
            Digest::sha256_of(&bytes[..100])
        );
    }

    type Chunks = futures_util::stream::Iter<
        std::vec::IntoIter<std::result::Result<bytes::Bytes, axum::Error>>,
    >;

    fn empty() -> Chunks {
        futures_util::stream::iter(Vec::new())
    }

    fn chunk(bytes: &[u8]) -> Chunks {
        futures_util::stream::iter(vec![Ok(bytes::Bytes::copy_from_slice(bytes))])
    }

    /// Sessions opened and never used cost the server no file, and the
    /// states in memory stay bounded however they are reached (opened
    /// here, or only used here: a replica's); a state with bytes is let go
    /// last and, let go, is rebuilt from its stored bytes and completes;
    /// ended ones are remembered up to [`ENDED_KEPT`].
    #[tokio::test]
    async fn opened_sessions_hold_bounded_memory_and_no_files() {
        const KEPT: usize = 8;
        let dir = tempfile::tempdir().unwrap();
        let storage: Arc<dyn Storage> =
            Arc::new(crate::storage::fs::FsStorage::open(dir.path()).unwrap());
        let store = Store::new(storage.clone());
        let replica = Store::new(storage);
        store.set_session_key(b"shared");
        replica.set_session_key(b"shared");
        store.uploads.lock().unwrap().kept = KEPT;
        let live = || store.uploads.lock().unwrap().sessions.len();
        let name = Name::parse("app").unwrap();

        let first = store.start_upload(&name).await.unwrap();
        let bytes = b"kept across the purge";
        store
            .append_upload(&name, &first, Some(0), chunk(bytes))
            .await
            .unwrap();
        let held = store.locked(&name, &first).await.unwrap();
        for _ in 0..10 * KEPT {
            store.start_upload(&name).await.unwrap();
        }
        for _ in 0..10 * KEPT {
            let id = replica.start_upload(&name).await.unwrap();
            assert_eq!(store.upload_offset(&name, &id).await.unwrap(), 0);
        }
        assert!(live() <= KEPT, "{} states kept", live());
        assert_eq!(
            store.storage.list("uploads").await.unwrap(),
            [format!("{first}.data")]
        );
        drop(held);
        // Idle with bytes: kept while states with nothing go…
        for _ in 0..2 * KEPT {
            store.start_upload(&name).await.unwrap();
        }
        let has = |id: &str| store.uploads.lock().unwrap().sessions.contains_key(id);
        assert!(has(&first), "a state with bytes goes last");
        // …and let go once those alone fill the bound.
        let mut others = Vec::new();
        for _ in 0..KEPT {
            let id = store.start_upload(&name).await.unwrap();
            store
                .append_upload(&name, &id, Some(0), chunk(b"x"))
                .await
                .unwrap();
            others.push(id);
        }
        store.start_upload(&name).await.unwrap();
        assert!(!has(&first), "let go once unused");
        let digest = Digest::sha256_of(bytes);
        store
            .finish_upload(&name, &first, &digest, empty())
            .await
            .unwrap();
        let blob = store.read_blob(&name, &digest, 1 << 20).await.unwrap();
        assert_eq!(blob.as_deref(), Some(&bytes[..]));
        for id in &others {
            store.cancel_upload(&name, id).await.unwrap();
        }
        assert_eq!(
            store.storage.list("uploads").await.unwrap(),
            Vec::<String>::new()
        );

        for _ in 0..ENDED_KEPT + 10 {
            let id = store.start_upload(&name).await.unwrap();
            store.cancel_upload(&name, &id).await.unwrap();
        }
        let ended = store.ended.lock().unwrap();
        assert_eq!(
            (ended.ids.len(), ended.order.len()),
            (ENDED_KEPT, ENDED_KEPT)
        );
    }

    /// A live state whose file went (`wharf registry gc` clears a session
    /// idle for a day; signed ids stay valid) is not trusted: what is
    /// committed is checked against the bytes stored, never the state.
    #[tokio::test]
    async fn a_session_whose_bytes_were_collected_commits_only_what_is_stored() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::new(Arc::new(
            crate::storage::fs::FsStorage::open(dir.path()).unwrap(),
        ));
        let name = Name::parse("app").unwrap();
        let id = store.start_upload(&name).await.unwrap();
        store
            .append_upload(&name, &id, Some(0), chunk(b"collected "))
            .await
            .unwrap();
        store.storage.delete(&upload_data(&id)).await.unwrap();
        store
            .append_upload(&name, &id, Some(10), chunk(b"then more"))
            .await
            .unwrap();
        let claimed = Digest::sha256_of(b"collected then more");
        let e = store
            .finish_upload(&name, &id, &claimed, empty())
            .await
            .unwrap_err();
        assert!(
            matches!(
                &e,
                RegistryError::Client {
                    code: ErrorCode::DigestInvalid,
                    ..
                }
            ),
            "{e:?}"
        );
        assert!(!store.blob_exists(&claimed).await.unwrap());
    }
}
