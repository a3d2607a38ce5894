//! Secret values at rest, and who may use a secret.
//!
//! Values are sealed with AES-256-GCM under a key kept in its own file
//! (`DATA_DIR/secrets.key`, mode 0600), never in `state.db` — k3s's
//! secrets-encryption pattern: a copy of the database alone reveals no
//! value. The secret's name is the associated data, so a sealed value
//! cannot be moved to another secret's row and still open.
//!
//! A secret has a scope: a repository pattern (`team/*`, `team/app`) whose
//! task definitions may use it, or none (global), which only admins may
//! create or use.

use std::io::Write as _;
use std::path::Path;

use ring::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use ring::rand::{SecureRandom, SystemRandom};

use crate::auth::Principal;
use crate::model::Role;

/// Marks a sealed value (version 1: hex of nonce ‖ ciphertext ‖ tag).
const SEALED_PREFIX: &str = "enc1:";

/// Seals and opens secret values.
pub struct SecretBox {
    key: LessSafeKey,
    rng: SystemRandom,
}

impl std::fmt::Debug for SecretBox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SecretBox").finish_non_exhaustive()
    }
}

impl SecretBox {
    /// Reads the key file, creating it (32 random bytes, hex, mode 0600) if
    /// it does not exist.
    pub fn open_or_create(path: &Path) -> std::io::Result<SecretBox> {
        let rng = SystemRandom::new();
        let bytes = match std::fs::read_to_string(path) {
            Ok(text) => hex::decode(text.trim()).map_err(|_| {
                std::io::Error::other(format!("{} is not a hex key", path.display()))
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let mut key = [0u8; 32];
                rng.fill(&mut key)
                    .map_err(|_| std::io::Error::other("no randomness for the secrets key"))?;
                let tmp = path.with_extension("tmp");
                let mut options = std::fs::OpenOptions::new();
                options.write(true).create(true).truncate(true);
                #[cfg(unix)]
                std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
                let mut file = options.open(&tmp)?;
                file.write_all(hex::encode(key).as_bytes())?;
                file.sync_all()?;
                std::fs::rename(&tmp, path)?;
                key.to_vec()
            }
            Err(e) => return Err(e),
        };
        let unbound = UnboundKey::new(&AES_256_GCM, &bytes).map_err(|_| {
            std::io::Error::other(format!("{} must hold a 32-byte key", path.display()))
        })?;
        Ok(SecretBox {
            key: LessSafeKey::new(unbound),
            rng,
        })
    }

    /// Whether a stored value is sealed (older stores kept plain values).
    pub fn is_sealed(stored: &str) -> bool {
        stored.starts_with(SEALED_PREFIX)
    }

    /// The stored form of secret `name`'s `value`.
    pub fn seal(&self, name: &str, value: &str) -> String {
        let mut nonce = [0u8; NONCE_LEN];
        self.rng
            .fill(&mut nonce)
            .expect("the system has randomness");
        let mut data = value.as_bytes().to_vec();
        self.key
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(name.as_bytes()),
                &mut data,
            )
            .expect("a secret fits AES-GCM's limits");
        let mut out = nonce.to_vec();
        out.extend_from_slice(&data);
        format!("{SEALED_PREFIX}{}", hex::encode(out))
    }

    /// The value of secret `name` from its stored form.
    pub fn open(&self, name: &str, stored: &str) -> Result<String, String> {
        let Some(text) = stored.strip_prefix(SEALED_PREFIX) else {
            return Ok(stored.to_owned());
        };
        let bytes = hex::decode(text).map_err(|_| format!("secret {name} is corrupt"))?;
        if bytes.len() < NONCE_LEN {
            return Err(format!("secret {name} is corrupt"));
        }
        let (nonce, sealed) = bytes.split_at(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce)
            .map_err(|_| format!("secret {name} is corrupt"))?;
        let mut sealed = sealed.to_vec();
        let plain = self
            .key
            .open_in_place(nonce, Aad::from(name.as_bytes()), &mut sealed)
            .map_err(|_| format!("secret {name} does not open with this server's secrets.key"))?;
        String::from_utf8(plain.to_vec()).map_err(|_| format!("secret {name} is corrupt"))
    }
}

/// Whether repository pattern `pattern` (`team/*` or an exact name)
/// matches `repository`.
pub fn pattern_matches(pattern: &str, repository: &str) -> bool {
    match pattern.strip_suffix('*') {
        Some(prefix) => repository.starts_with(prefix),
        None => pattern == repository,
    }
}

/// Whether pattern `outer` covers everything pattern `inner` matches.
pub fn pattern_covers(outer: &str, inner: &str) -> bool {
    match outer.strip_suffix('*') {
        Some(prefix) => inner.starts_with(prefix),
        None => outer == inner,
    }
}

/// Whether `who` may manage or use secrets of `scope` (`None`: global).
pub fn may_use_scope(who: &Principal, scope: Option<&str>) -> bool {
    match scope {
        None => who.role >= Role::Admin,
        Some(scope) => {
            who.repositories.is_empty() || who.repositories.iter().any(|p| pattern_covers(p, scope))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seals_and_opens() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("secrets.key");
        let sb = SecretBox::open_or_create(&path).unwrap();
        let sealed = sb.seal("db", "hunter2");
        assert!(SecretBox::is_sealed(&sealed));
        assert!(!sealed.contains("hunter2"));
        assert_eq!(sb.open("db", &sealed).unwrap(), "hunter2");
        // Bound to its name.
        assert!(sb.open("other", &sealed).is_err());
        // The same key is read back after a restart.
        let again = SecretBox::open_or_create(&path).unwrap();
        assert_eq!(again.open("db", &sealed).unwrap(), "hunter2");
        // A different key does not open it.
        let other = SecretBox::open_or_create(&dir.path().join("k2")).unwrap();
        assert!(other.open("db", &sealed).is_err());
        // Plain values of older stores read as they are.
        assert_eq!(sb.open("db", "plain").unwrap(), "plain");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
    }

    #[test]
    fn scopes() {
        assert!(pattern_matches("team/*", "team/app"));
        assert!(!pattern_matches("team/*", "teams/app"));
        assert!(pattern_matches("team/app", "team/app"));
        assert!(pattern_covers("team/*", "team/app/*"));
        assert!(pattern_covers("team/*", "team/*"));
        assert!(!pattern_covers("team/app", "team/*"));
        let who = |role, repos: &[&str]| Principal {
            token_id: "t".into(),
            name: "t".into(),
            role,
            repositories: repos.iter().map(|s| s.to_string()).collect(),
            node: None,
        };
        assert!(!may_use_scope(&who(Role::Deployer, &[]), None));
        assert!(may_use_scope(&who(Role::Admin, &[]), None));
        assert!(may_use_scope(
            &who(Role::Deployer, &["team/*"]),
            Some("team/x")
        ));
        assert!(!may_use_scope(
            &who(Role::Deployer, &["team/*"]),
            Some("secret/*")
        ));
        assert!(may_use_scope(&who(Role::Deployer, &[]), Some("secret/*")));
    }
}
