//! Tokens and roles. Every `/v1/` and `/v2/` request carries a token
//! (Bearer, or the password of Basic credentials, which registry clients
//! send); the token's role decides what it may do, and its repository
//! patterns scope it in the registry. Only hashes of tokens are stored.

use std::sync::Arc;

use axum::http::HeaderMap;
use dashmap::DashMap;
use sha2::{Digest as _, Sha256};
use wharf_registry::auth::{Access, Authorizer};
use wharf_registry::{ErrorCode as OciCode, RegistryError};

use crate::error::{ApiError, ErrorCode};
use crate::model::{Role, Token};

/// Who is calling.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// The token's id (`admin` for the data directory's token).
    pub token_id: String,
    /// The token's name.
    pub name: String,
    /// What it may do.
    pub role: Role,
    /// Registry repository patterns; empty: all.
    pub repositories: Vec<String>,
    /// The edge node whose credential this is: it may only call the node
    /// protocol (`/v1/agent/`) and pull the artifacts of its own tasks.
    pub node: Option<String>,
}

impl Principal {
    /// Refuses unless the role is at least `role`.
    pub fn require(&self, role: Role) -> Result<(), ApiError> {
        if self.role >= role {
            Ok(())
        } else {
            Err(ApiError::new(
                ErrorCode::AccessDenied,
                format!(
                    "token {:?} has role {} and this needs {}",
                    self.name,
                    self.role.as_str(),
                    role.as_str()
                ),
            ))
        }
    }

    /// Whether the token's repository scopes include `repository`.
    pub fn may_reach(&self, repository: &str) -> bool {
        self.repositories.is_empty()
            || self
                .repositories
                .iter()
                .any(|p| crate::secrets::pattern_matches(p, repository))
    }
}

/// The SHA-256 of a token, as stored.
pub fn hash(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

/// A fresh random token secret.
pub fn new_secret() -> String {
    format!(
        "wharf_{}{}",
        uuid::Uuid::new_v4().simple(),
        uuid::Uuid::new_v4().simple()
    )
}

/// The known tokens, by hash.
#[derive(Debug, Default)]
pub struct Tokens {
    by_hash: DashMap<String, Arc<Principal>>,
}

impl Tokens {
    /// Accepts `token` (the data directory's admin token) as `admin`.
    pub fn with_admin(token: &str) -> Self {
        let tokens = Tokens::default();
        tokens.by_hash.insert(
            hash(token),
            Arc::new(Principal {
                token_id: "admin".into(),
                name: "admin".into(),
                role: Role::Admin,
                repositories: Vec::new(),
                node: None,
            }),
        );
        tokens
    }

    /// Adds (or, when revoked, removes) a stored token.
    pub fn load(&self, token: &Token, hash: &str) {
        if token.revoked_at.is_some() {
            self.by_hash.remove(hash);
            return;
        }
        self.by_hash.insert(
            hash.to_owned(),
            Arc::new(Principal {
                token_id: token.id.clone(),
                name: token.name.clone(),
                role: token.role,
                repositories: token.repositories.clone(),
                node: None,
            }),
        );
    }

    /// Accepts the credential of edge node `name` (by its hash).
    pub fn load_node(&self, name: &str, hash: &str) {
        self.by_hash.insert(
            hash.to_owned(),
            Arc::new(Principal {
                token_id: format!("node:{name}"),
                name: format!("node {name}"),
                role: Role::Reader,
                repositories: Vec::new(),
                node: Some(name.to_owned()),
            }),
        );
    }

    /// Refuses a credential from now on.
    pub fn forget(&self, hash: &str) {
        self.by_hash.remove(hash);
    }

    /// Who `token` belongs to.
    pub fn authenticate(&self, token: &str) -> Option<Arc<Principal>> {
        self.by_hash.get(&hash(token)).map(|p| p.clone())
    }
}

/// The token of a request: `Authorization: Bearer T`, or Basic with `T` as
/// the password — the registry's own rule, so both surfaces agree.
pub fn token_of(headers: &HeaderMap) -> Option<String> {
    wharf_registry::http::token(headers)
}

/// The registry's authorizer: roles decide pull/push/delete, repository
/// patterns scope them; a node pulls only what its tasks run.
#[derive(Clone)]
pub struct RegistryAuthorizer(pub Arc<Tokens>, pub(crate) Arc<crate::fleet::Fleet>);

impl std::fmt::Debug for RegistryAuthorizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegistryAuthorizer").finish_non_exhaustive()
    }
}

impl Authorizer for RegistryAuthorizer {
    fn check(&self, token: Option<&str>, access: &Access) -> Result<(), RegistryError> {
        let Some(token) = token else {
            return Err(RegistryError::new(
                OciCode::Unauthorized,
                "authentication required: log in with any user name and a Wharf token as the password",
            ));
        };
        let Some(who) = self.0.authenticate(token) else {
            return Err(RegistryError::new(
                OciCode::Unauthorized,
                "the token is not valid",
            ));
        };
        let denied = |what: &str, name: &str| {
            Err(RegistryError::new(
                OciCode::Denied,
                format!("token {:?} may not {what} {name}", who.name),
            ))
        };
        if let Some(node) = &who.node {
            return match access {
                Access::Base => Ok(()),
                Access::Pull(name) if self.1.may_pull(node, name.as_str()) => Ok(()),
                Access::Pull(name) => denied("pull from", name.as_str()),
                Access::Catalog => denied("list", "the catalog"),
                Access::Push(name) => denied("push to", name.as_str()),
                Access::Delete(name) => denied("delete from", name.as_str()),
            };
        }
        match access {
            Access::Base | Access::Catalog => Ok(()),
            Access::Pull(name) if who.may_reach(name.as_str()) => Ok(()),
            Access::Pull(name) => denied("pull from", name.as_str()),
            Access::Push(name) | Access::Delete(name)
                if who.role >= Role::Deployer && who.may_reach(name.as_str()) =>
            {
                Ok(())
            }
            Access::Push(name) => denied("push to", name.as_str()),
            Access::Delete(name) => denied("delete from", name.as_str()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use wharf_registry::path::Name;

    fn token(role: Role, repos: &[&str]) -> (Token, String) {
        let t = Token {
            id: "t1".into(),
            name: "ci".into(),
            role,
            repositories: repos.iter().map(|s| s.to_string()).collect(),
            created_at: String::new(),
            revoked_at: None,
        };
        (t, hash("secret"))
    }

    #[test]
    fn registry_scopes() {
        let tokens = Arc::new(Tokens::with_admin("root"));
        let (t, h) = token(Role::Reader, &["team/*"]);
        tokens.load(&t, &h);
        let fleet = Arc::new(crate::fleet::Fleet::new(
            std::time::Duration::from_secs(2),
            std::time::Duration::from_secs(10),
        ));
        let auth = RegistryAuthorizer(tokens.clone(), fleet.clone());
        let name = |n: &str| Name::parse(n).unwrap();
        assert!(
            auth.check(Some("secret"), &Access::Pull(name("team/a")))
                .is_ok()
        );
        let code = |r: Result<(), RegistryError>| r.unwrap_err().code();
        assert_eq!(
            code(auth.check(Some("secret"), &Access::Pull(name("other/a")))),
            Some(OciCode::Denied)
        );
        assert_eq!(
            code(auth.check(Some("secret"), &Access::Push(name("team/a")))),
            Some(OciCode::Denied)
        );
        assert_eq!(
            code(auth.check(None, &Access::Base)),
            Some(OciCode::Unauthorized)
        );
        assert_eq!(
            code(auth.check(Some("nope"), &Access::Base)),
            Some(OciCode::Unauthorized)
        );
        assert!(auth.check(Some("root"), &Access::Delete(name("x"))).is_ok());
        let (mut t, h) = token(Role::Deployer, &[]);
        tokens.load(&t, &h);
        assert!(
            auth.check(Some("secret"), &Access::Push(name("any/thing")))
                .is_ok()
        );
        t.revoked_at = Some("now".into());
        tokens.load(&t, &h);
        assert!(tokens.authenticate("secret").is_none());
        // A node pulls only from repositories its tasks run from.
        tokens.load_node("edge", &hash("node-secret"));
        let node = fleet.add("edge", crate::model::NodeStatus::Ready, Default::default());
        let pull = |repo: &str| auth.check(Some("node-secret"), &Access::Pull(name(repo)));
        assert_eq!(code(pull("team/a")), Some(OciCode::Denied));
        let (tx, _rx) = tokio::sync::mpsc::unbounded_channel();
        node.hold("t1", None, 0, None, "team/a".into(), tx);
        assert!(pull("team/a").is_ok());
        assert_eq!(code(pull("team/b")), Some(OciCode::Denied));
        assert_eq!(
            code(auth.check(Some("node-secret"), &Access::Push(name("team/a")))),
            Some(OciCode::Denied)
        );
        assert_eq!(
            code(auth.check(Some("node-secret"), &Access::Catalog)),
            Some(OciCode::Denied)
        );
        tokens.forget(&hash("node-secret"));
        assert_eq!(code(pull("team/a")), Some(OciCode::Unauthorized));
    }

    #[test]
    fn tokens_from_headers() {
        let mut h = HeaderMap::new();
        h.insert("authorization", "Bearer abc".parse().unwrap());
        assert_eq!(token_of(&h).as_deref(), Some("abc"));
        h.insert("authorization", "Basic dXNlcjpzZWNyZXQ=".parse().unwrap());
        assert_eq!(token_of(&h).as_deref(), Some("secret"));
        h.insert("authorization", "Digest x".parse().unwrap());
        assert_eq!(token_of(&h), None);
    }
}
