//! `/v2/...` paths parsed once into a typed [`Route`]. Repository names may
//! contain `/`, so a path is read from its end: the last segments say what
//! is addressed, everything before them is the name.

use crate::digest::Digest;
use crate::error::{ErrorCode, RegistryError, Result};

/// The longest repository name accepted (distribution's limit too).
pub const MAX_NAME_LEN: usize = 255;

/// A validated repository name (`team/app`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Name(String);

impl Name {
    /// Validates against the spec's
    /// `[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*(\/[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*)*`.
    pub fn parse(text: &str) -> Result<Name> {
        let invalid = || {
            RegistryError::new(
                ErrorCode::NameInvalid,
                format!(
                    "invalid repository name {text:?}: lowercase letters and digits in path \
                     components separated by '/', with '.', '_', '__' or '-' inside components"
                ),
            )
        };
        if text.is_empty() || text.len() > MAX_NAME_LEN {
            return Err(invalid());
        }
        if text.split('/').all(valid_component) {
            Ok(Name(text.to_owned()))
        } else {
            Err(invalid())
        }
    }

    /// The name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for Name {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

fn valid_component(c: &str) -> bool {
    let alnum = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    let bytes = c.as_bytes();
    if bytes.is_empty() || !alnum(bytes[0]) || !alnum(bytes[bytes.len() - 1]) {
        return false;
    }
    let mut i = 0;
    while i < bytes.len() {
        if alnum(bytes[i]) {
            i += 1;
            continue;
        }
        let start = i;
        while i < bytes.len() && !alnum(bytes[i]) {
            i += 1;
        }
        let sep = &c[start..i];
        let ok = sep == "." || sep == "_" || sep == "__" || sep.bytes().all(|b| b == b'-');
        if !ok {
            return false;
        }
    }
    true
}

/// Validates a tag: `[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}`.
pub fn valid_tag(tag: &str) -> bool {
    let b = tag.as_bytes();
    !b.is_empty()
        && b.len() <= 128
        && (b[0].is_ascii_alphanumeric() || b[0] == b'_')
        && b.iter()
            .all(|&c| c.is_ascii_alphanumeric() || c == b'_' || c == b'.' || c == b'-')
}

/// A manifest reference: a tag or a digest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reference {
    /// A tag such as `v1`.
    Tag(String),
    /// A digest.
    Digest(Digest),
}

impl Reference {
    /// Parses a tag or a digest (anything with a `:` is a digest).
    pub fn parse(text: &str) -> Result<Reference> {
        if text.contains(':') {
            return Ok(Reference::Digest(text.parse()?));
        }
        if valid_tag(text) {
            Ok(Reference::Tag(text.to_owned()))
        } else {
            Err(RegistryError::new(
                ErrorCode::ManifestInvalid,
                format!(
                    "invalid tag {text:?}: up to 128 of [A-Za-z0-9_.-], not starting with '.' or '-'"
                ),
            ))
        }
    }
}

impl std::fmt::Display for Reference {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Reference::Tag(t) => f.write_str(t),
            Reference::Digest(d) => f.write_str(d.as_str()),
        }
    }
}

/// What a `/v2/...` path addresses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// `/v2/`
    Base,
    /// `/v2/_catalog`
    Catalog,
    /// `/v2/<name>/tags/list`
    Tags(Name),
    /// `/v2/<name>/manifests/<reference>`
    Manifest(Name, Reference),
    /// `/v2/<name>/blobs/<digest>`
    Blob(Name, Digest),
    /// `/v2/<name>/blobs/uploads/`
    UploadStart(Name),
    /// `/v2/<name>/blobs/uploads/<id>`
    Upload(Name, String),
    /// `/v2/<name>/referrers/<digest>`
    Referrers(Name, Digest),
}

/// Parses a request path. `None` means "no such endpoint" (404); `Some(Err)`
/// means the endpoint exists but a part of the path is malformed.
pub fn parse(path: &str) -> Option<Result<Route>> {
    let rest = path.strip_prefix("/v2")?;
    if rest.is_empty() || rest == "/" {
        return Some(Ok(Route::Base));
    }
    let rest = rest.strip_prefix('/')?;
    if rest == "_catalog" {
        return Some(Ok(Route::Catalog));
    }
    let segments: Vec<&str> = rest.split('/').collect();
    let n = segments.len();
    let name = |upto: usize| -> Result<Name> { Name::parse(&segments[..upto].join("/")) };
    let route = match segments.as_slice() {
        [.., "tags", "list"] if n > 2 => name(n - 2).map(Route::Tags),
        [.., "blobs", "uploads", ""] | [.., "blobs", "uploads"] if n > 2 => {
            let upto = if segments[n - 1].is_empty() {
                n - 3
            } else {
                n - 2
            };
            if upto == 0 {
                return None;
            }
            name(upto).map(Route::UploadStart)
        }
        [.., "blobs", "uploads", id] if n > 3 => {
            let id = (*id).to_owned();
            name(n - 3).map(|name| Route::Upload(name, id))
        }
        [.., "manifests", reference] if n > 2 => {
            name(n - 2).and_then(|name| Ok(Route::Manifest(name, Reference::parse(reference)?)))
        }
        [.., "blobs", digest] if n > 2 => {
            name(n - 2).and_then(|name| Ok(Route::Blob(name, digest.parse()?)))
        }
        [.., "referrers", digest] if n > 2 => {
            name(n - 2).and_then(|name| Ok(Route::Referrers(name, digest.parse()?)))
        }
        _ => return None,
    };
    Some(route)
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: &str = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    fn check(path: &str, expected: Option<Result<Route, ErrorCode>>) {
        let got = parse(path).map(|r| r.map_err(|e| e.code().unwrap()));
        assert_eq!(got, expected, "{path}");
    }

    fn name(s: &str) -> Name {
        Name::parse(s).unwrap()
    }

    #[test]
    fn routes() {
        check("/v2/", Some(Ok(Route::Base)));
        check("/v2", Some(Ok(Route::Base)));
        check("/v2/_catalog", Some(Ok(Route::Catalog)));
        check("/v2/a/b/c/tags/list", Some(Ok(Route::Tags(name("a/b/c")))));
        check(
            "/v2/team/app/manifests/v1.0",
            Some(Ok(Route::Manifest(
                name("team/app"),
                Reference::Tag("v1.0".into()),
            ))),
        );
        check(
            &format!("/v2/app/manifests/{D}"),
            Some(Ok(Route::Manifest(
                name("app"),
                Reference::Digest(D.parse().unwrap()),
            ))),
        );
        check(
            &format!("/v2/x/y/blobs/{D}"),
            Some(Ok(Route::Blob(name("x/y"), D.parse().unwrap()))),
        );
        check(
            "/v2/x/y/blobs/uploads/",
            Some(Ok(Route::UploadStart(name("x/y")))),
        );
        check(
            "/v2/x/y/blobs/uploads",
            Some(Ok(Route::UploadStart(name("x/y")))),
        );
        check(
            "/v2/x/blobs/uploads/abc-123",
            Some(Ok(Route::Upload(name("x"), "abc-123".into()))),
        );
        check(
            &format!("/v2/x/referrers/{D}"),
            Some(Ok(Route::Referrers(name("x"), D.parse().unwrap()))),
        );
        // A repository may be called "blobs".
        check(
            &format!("/v2/blobs/blobs/{D}"),
            Some(Ok(Route::Blob(name("blobs"), D.parse().unwrap()))),
        );
        check("/v2/UPPER/tags/list", Some(Err(ErrorCode::NameInvalid)));
        check("/v2/a//b/tags/list", Some(Err(ErrorCode::NameInvalid)));
        check(
            "/v2/app/manifests/-bad",
            Some(Err(ErrorCode::ManifestInvalid)),
        );
        check(
            "/v2/app/blobs/sha256:zz",
            Some(Err(ErrorCode::DigestInvalid)),
        );
        check("/v2/app/nothing", None);
        check("/v3/", None);
        check("/v2/tags/list", None);
    }

    #[test]
    fn names() {
        for ok in [
            "a",
            "a/b",
            "a.b",
            "a_b",
            "a__b",
            "a---b",
            "0/1/2",
            "library/ubuntu",
        ] {
            assert!(Name::parse(ok).is_ok(), "{ok}");
        }
        for bad in [
            "", "A", "a/", "/a", "a..b", "a___b", "_a", "a-", "a b", "a/_links",
        ] {
            assert!(Name::parse(bad).is_err(), "{bad}");
        }
        assert!(Name::parse(&"a".repeat(256)).is_err());
    }

    #[test]
    fn tags() {
        for ok in ["latest", "v1.0.0", "_x", "A-b_c.d", &"a".repeat(128)] {
            assert!(valid_tag(ok), "{ok}");
        }
        for bad in ["", ".x", "-x", "a/b", "a:b", &"a".repeat(129)] {
            assert!(!valid_tag(bad), "{bad}");
        }
    }
}
