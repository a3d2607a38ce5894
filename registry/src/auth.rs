//! Who may do what. The registry asks an [`Authorizer`] for every request;
//! the server plugs in its token store (the admin token now, per-repository
//! scopes with the control plane's token management).

use crate::error::{ErrorCode, RegistryError};
use crate::path::Name;

/// What a request wants to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Access {
    /// `GET /v2/`: is the client authenticated at all.
    Base,
    /// List repositories.
    Catalog,
    /// Read manifests, blobs, tags, referrers of a repository.
    Pull(Name),
    /// Upload blobs and manifests to a repository.
    Push(Name),
    /// Delete manifests, tags or blobs of a repository.
    Delete(Name),
}

/// Decides requests. `Err` must be `UNAUTHORIZED` (no or unknown token,
/// answered 401 with a challenge) or `DENIED` (known token, not allowed: 403).
pub trait Authorizer: Send + Sync + 'static {
    /// Checks `token` (from Basic or Bearer credentials) for `access`.
    fn check(&self, token: Option<&str>, access: &Access) -> Result<(), RegistryError>;
}

/// Any of a fixed set of tokens may do anything.
#[derive(Debug, Clone)]
pub struct StaticTokens {
    tokens: Vec<String>,
}

impl StaticTokens {
    /// Accepts exactly these tokens.
    pub fn new(tokens: impl IntoIterator<Item = String>) -> Self {
        StaticTokens {
            tokens: tokens.into_iter().collect(),
        }
    }
}

/// Compares without an early exit, so timing does not reveal a prefix.
fn same(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

impl Authorizer for StaticTokens {
    fn check(&self, token: Option<&str>, _access: &Access) -> Result<(), RegistryError> {
        match token {
            Some(t) if self.tokens.iter().any(|known| same(known, t)) => Ok(()),
            Some(_) => Err(RegistryError::new(
                ErrorCode::Unauthorized,
                "the token is not valid",
            )),
            None => Err(RegistryError::new(
                ErrorCode::Unauthorized,
                "authentication required: log in with any user name and a Wharf token as the password",
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn static_tokens() {
        let auth = StaticTokens::new(["abc".to_owned()]);
        assert!(auth.check(Some("abc"), &Access::Base).is_ok());
        assert_eq!(
            auth.check(Some("abd"), &Access::Base).unwrap_err().code(),
            Some(ErrorCode::Unauthorized)
        );
        assert_eq!(
            auth.check(None, &Access::Catalog).unwrap_err().code(),
            Some(ErrorCode::Unauthorized)
        );
        assert!(!same("abc", "abcd"));
    }
}
