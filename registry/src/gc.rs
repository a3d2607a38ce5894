//! Lifecycle rules and garbage collection (`wharf registry gc`).
//!
//! 1. Lifecycle, per repository settings: tags beyond the newest
//!    `keep_last_tagged` are removed; untagged manifests older than
//!    `expire_untagged_after_secs` are removed unless something live needs
//!    them (a child of an index, or a referrer of a live manifest).
//! 2. Mark: every manifest revision left, and the config and layers it
//!    names, in every repository.
//! 3. Sweep: blob content nobody marked, older than [`GRACE_SECS`] (so a
//!    push in flight — blobs uploaded, manifest not yet — keeps its blobs),
//!    along with the repository links to it; upload sessions idle for
//!    [`STALE_UPLOAD_SECS`].

use std::collections::{BTreeSet, HashSet};

use serde_json::Value;

use crate::digest::Digest;
use crate::error::Result;
use crate::path::{Name, Reference};
use crate::store::{Store, upload_data, upload_id, upload_repo};

/// Unreferenced blobs younger than this survive a collection.
pub const GRACE_SECS: u64 = 3600;
/// Upload sessions untouched for this long are abandoned.
pub const STALE_UPLOAD_SECS: u64 = 24 * 3600;

/// What a collection removed (or, in a dry run, would remove).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct GcReport {
    /// `repo:tag` removed by `keep_last_tagged`.
    pub tags_removed: Vec<String>,
    /// `repo@digest` removed by `expire_untagged_after_secs`.
    pub manifests_removed: Vec<String>,
    /// Blob digests removed.
    pub blobs_removed: Vec<String>,
    /// Bytes those blobs held.
    pub bytes_freed: u64,
    /// Abandoned upload sessions removed.
    pub uploads_removed: usize,
}

fn references(json: &Value) -> Vec<Digest> {
    let mut out = Vec::new();
    let mut push = |v: Option<&Value>| {
        if let Some(d) = v
            .and_then(|d| d.get("digest"))
            .and_then(Value::as_str)
            .and_then(|d| d.parse().ok())
        {
            out.push(d);
        }
    };
    push(json.get("config"));
    for layer in json
        .get("layers")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        push(Some(layer));
    }
    out
}

impl Store {
    /// Applies lifecycle rules and collects garbage; `now` is seconds since
    /// the Unix epoch. With `dry_run` nothing is changed.
    pub async fn gc(&self, now: u64, dry_run: bool) -> Result<GcReport> {
        let mut report = GcReport::default();
        let s = self.storage();
        let mut marked: HashSet<String> = HashSet::new();
        // Lifecycle removes manifests and tags, never repositories, so one
        // listing serves the whole collection.
        let repos = self.catalog().await?;
        for repo in &repos {
            let name = Name::parse(repo)?;
            let settings = self.settings(&name).await?;
            let mut revisions = self.revisions(&name).await?;
            let mut tagged: Vec<(u64, String, Digest)> = Vec::new();
            for tag in self.tags(&name).await? {
                let when = s
                    .modified(&format!("repositories/{name}/_tags/{tag}"))
                    .await?
                    .unwrap_or(0);
                if let Some(d) = self.resolve(&name, &Reference::Tag(tag.clone())).await? {
                    tagged.push((when, tag, d));
                }
            }
            tagged.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.cmp(&b.1)));
            if let Some(keep) = settings.keep_last_tagged {
                for (_, tag, _) in tagged.split_off(keep.min(tagged.len())) {
                    report.tags_removed.push(format!("{name}:{tag}"));
                    if !dry_run {
                        self.delete_manifest(&name, &Reference::Tag(tag)).await?;
                    }
                }
            }
            if let Some(max_age) = settings.expire_untagged_after_secs {
                let live_tagged: HashSet<&Digest> = tagged.iter().map(|(_, _, d)| d).collect();
                // Manifests something live needs: children of indexes and
                // referrers (subject present).
                let mut needed: HashSet<Digest> = HashSet::new();
                for (digest, json) in &revisions {
                    for child in json
                        .get("manifests")
                        .and_then(Value::as_array)
                        .into_iter()
                        .flatten()
                    {
                        if let Some(d) = child
                            .get("digest")
                            .and_then(Value::as_str)
                            .and_then(|d| d.parse().ok())
                        {
                            needed.insert(d);
                        }
                    }
                    if json.get("subject").is_some() {
                        needed.insert(digest.clone());
                    }
                }
                let mut expired = Vec::new();
                for (digest, _) in &revisions {
                    if live_tagged.contains(digest) || needed.contains(digest) {
                        continue;
                    }
                    let path = format!(
                        "repositories/{name}/_manifests/{}/{}",
                        digest.algorithm().as_str(),
                        digest.hex()
                    );
                    let age = now.saturating_sub(s.modified(&path).await?.unwrap_or(now));
                    if age >= max_age {
                        expired.push(digest.clone());
                    }
                }
                for digest in expired {
                    report.manifests_removed.push(format!("{name}@{digest}"));
                    if !dry_run {
                        self.delete_manifest(&name, &Reference::Digest(digest.clone()))
                            .await?;
                    }
                    revisions.retain(|(d, _)| d != &digest);
                }
            }
            for (digest, json) in &revisions {
                marked.insert(digest.to_string());
                marked.extend(references(json).iter().map(Digest::to_string));
            }
        }

        for alg in s.list("blobs").await? {
            for hex in s.list(&format!("blobs/{alg}")).await? {
                let digest = format!("{alg}:{hex}");
                if marked.contains(&digest) {
                    continue;
                }
                let path = format!("blobs/{alg}/{hex}");
                let age = now.saturating_sub(s.modified(&path).await?.unwrap_or(now));
                if age < GRACE_SECS {
                    continue;
                }
                report.bytes_freed += s.stat(&path).await?.unwrap_or(0);
                report.blobs_removed.push(digest.clone());
                if !dry_run {
                    for repo in &repos {
                        s.delete(&format!("repositories/{repo}/_links/{alg}/{hex}"))
                            .await?;
                    }
                    s.delete(&path).await?;
                }
            }
        }
        let sessions: BTreeSet<String> = s
            .list("uploads")
            .await?
            .iter()
            .map(|object| upload_id(object).to_owned())
            .collect();
        for id in sessions {
            // A session's age is its last byte (its data file comes with
            // the first; a session with none has no object), or, for a
            // session of an older version, its marker's.
            let mut touched = None;
            for object in [
                upload_data(&id),
                upload_repo(&id),
                format!("uploads/{id}/data"),
                format!("uploads/{id}/repo"),
            ] {
                touched = s.modified(&object).await?;
                if touched.is_some() {
                    break;
                }
            }
            let age = now.saturating_sub(touched.unwrap_or(0));
            if age >= STALE_UPLOAD_SECS {
                report.uploads_removed += 1;
                if !dry_run {
                    s.delete(&upload_repo(&id)).await?;
                    s.delete(&upload_data(&id)).await?;
                    s.delete(&format!("uploads/{id}")).await?;
                }
            }
        }
        Ok(report)
    }

    /// Every manifest revision of `name` with its parsed JSON.
    async fn revisions(&self, name: &Name) -> Result<Vec<(Digest, Value)>> {
        let mut out = Vec::new();
        for alg in self
            .storage()
            .list(&format!("repositories/{name}/_manifests"))
            .await?
        {
            for hex in self
                .storage()
                .list(&format!("repositories/{name}/_manifests/{alg}"))
                .await?
            {
                let Ok(digest) = format!("{alg}:{hex}").parse::<Digest>() else {
                    continue;
                };
                let Ok(m) = self
                    .manifest(name, &Reference::Digest(digest.clone()))
                    .await
                else {
                    continue;
                };
                let json = serde_json::from_slice(&m.bytes).unwrap_or(Value::Null);
                out.push((digest, json));
            }
        }
        Ok(out)
    }
}
