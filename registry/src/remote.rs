//! The one guarded client through which the *server* reaches other
//! registries (task definitions whose artifact names another registry).
//!
//! A reference in a task definition is a URL chosen by a tenant, fetched
//! by the server from inside its network: without guards it reaches the
//! loopback interface, the cloud metadata service and private ranges, and
//! an echoed answer turns the server into a proxy for reading them. So:
//!
//! - every name is resolved by [`GuardedResolver`], which refuses it when
//!   any address is loopback, private, link-local, unspecified, shared
//!   (CGNAT) or multicast, unless it falls in the operator's allow-list;
//!   IP literals (which skip resolution) are checked before every request
//!   and on every redirect hop, and redirects are limited;
//! - the bearer-token realm a registry names is a destination too, and
//!   goes through the same checks;
//! - connect and read timeouts are set, proxies from the environment are
//!   ignored, manifests are capped, blobs are refused before download when
//!   their declared size is above the cap and cut off when a stream runs
//!   past it, and are hashed while streaming to a file;
//! - upstream bodies are never echoed: errors carry the status and a short
//!   description of our own.
//!
//! `oci-client` (used by the CLI) builds its own HTTP client with no hook
//! for a resolver or a redirect policy, so it cannot be guarded; this is
//! the small part of the distribution protocol the server needs (resolve a
//! tag, fetch a blob by digest), on `reqwest`.

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
pub use ipnet::IpNet;
use oci_client::Reference;
use reqwest::header::{ACCEPT, AUTHORIZATION, WWW_AUTHENTICATE};
use reqwest::{StatusCode, Url};
use tokio::io::AsyncWriteExt;

use crate::digest::{Digest, Hasher};

/// How long to wait for a TCP (and TLS) connection.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a response may stay silent between bytes.
pub const READ_TIMEOUT: Duration = Duration::from_secs(30);
/// The longest a manifest (with its token exchange) may take in all: a
/// registry that trickles a byte per read timeout is cut off here.
pub const MANIFEST_TIMEOUT: Duration = Duration::from_secs(60);
/// Redirect hops followed (registries redirect blobs to a CDN once).
pub const MAX_REDIRECTS: usize = 5;
/// The largest manifest read: the same cap the registry puts on pushes.
pub const MAX_REMOTE_MANIFEST_BYTES: usize = crate::store::MAX_MANIFEST_BYTES;
/// The largest token answer read from a realm.
const MAX_TOKEN_BYTES: usize = 64 << 10;

const MANIFEST_ACCEPT: &str = "application/vnd.oci.image.manifest.v1+json, \
     application/vnd.docker.distribution.manifest.v2+json, \
     application/vnd.oci.image.index.v1+json";

/// Why a remote fetch failed, in our words (never the upstream's body).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RemoteError {
    /// The reference does not parse.
    #[error("invalid reference {0:?}: expected HOST[:PORT]/REPOSITORY[:TAG|@DIGEST]")]
    Reference(String),
    /// The destination is an internal address and not allow-listed. The
    /// address itself is logged, not shown: it would map internal names.
    #[error(
        "{host} is refused: it resolves to an internal address (loopback, private, link-local and similar ranges need the server's registry allow-list)"
    )]
    Internal {
        /// The host asked for.
        host: String,
        /// The address that made it internal.
        addr: IpAddr,
    },
    /// The registry answered with an error status.
    #[error("{host} answered HTTP {status} for the {what}")]
    Status {
        /// The registry.
        host: String,
        /// The HTTP status.
        status: u16,
        /// What was asked for.
        what: &'static str,
    },
    /// The registry could not be reached, timed out, or broke off.
    #[error("cannot reach {host}: {reason}")]
    Unreachable {
        /// The registry.
        host: String,
        /// A short reason (connect, timeout, redirect, ...).
        reason: String,
    },
    /// An answer broke the protocol or a cap.
    #[error("{0}")]
    Invalid(String),
    /// Writing the downloaded blob failed.
    #[error("cannot write the download: {0}")]
    Io(String),
}

/// Result of this module.
pub type Result<T, E = RemoteError> = std::result::Result<T, E>;

/// Which internal networks the server may reach anyway.
#[derive(Debug, Clone, Default)]
pub struct RemotePolicy {
    /// Networks allowed even though they are internal.
    pub allow: Vec<IpNet>,
}

impl RemotePolicy {
    /// Parses one allow-list entry: a network (`10.0.0.0/8`, `fd00::/8`)
    /// or a single address (`127.0.0.1`).
    pub fn parse_network(text: &str) -> Result<IpNet, String> {
        let text = text.trim();
        text.parse::<IpNet>()
            .or_else(|_| text.parse::<IpAddr>().map(IpNet::from))
            .map_err(|_| format!("invalid network {text:?}: expected e.g. 10.0.0.0/8 or 127.0.0.1"))
    }

    /// Whether `ip` may be reached: a public address, or an allow-listed one.
    pub fn permits(&self, ip: IpAddr) -> bool {
        let ip = canonical(ip);
        !is_internal(ip) || self.allow.iter().any(|net| net.contains(&ip))
    }

    fn check(&self, host: &str, ip: IpAddr) -> Result<()> {
        if self.permits(ip) {
            Ok(())
        } else {
            tracing::warn!(%host, addr = %ip, "refused a remote registry on an internal address");
            Err(RemoteError::Internal {
                host: host.to_owned(),
                addr: ip,
            })
        }
    }
}

/// IPv6 addresses that carry an IPv4 address are that address: mapped
/// (`::ffff:a.b.c.d`), compatible (`::a.b.c.d`), NAT64 (`64:ff9b::/96`)
/// and 6to4 (`2002:AABB:CCDD::/48`), so `64:ff9b::a9fe:a9fe` is the
/// metadata service it translates to.
fn canonical(ip: IpAddr) -> IpAddr {
    let IpAddr::V6(v6) = ip else { return ip };
    if let Some(v4) = v6.to_ipv4_mapped() {
        return IpAddr::V4(v4);
    }
    let v4 = |hi: u16, lo: u16| {
        IpAddr::V4(std::net::Ipv4Addr::from(
            (u32::from(hi) << 16) | u32::from(lo),
        ))
    };
    match v6.segments() {
        // `::` and `::1` are themselves, not 0.0.0.0 and 0.0.0.1.
        [0, 0, 0, 0, 0, 0, 0, 0 | 1] => ip,
        [0, 0, 0, 0, 0, 0, hi, lo] => v4(hi, lo),
        [0x64, 0xff9b, 0, 0, 0, 0, hi, lo] => v4(hi, lo),
        [0x2002, hi, lo, ..] => v4(hi, lo),
        _ => ip,
    }
}

/// Loopback, private, link-local, unspecified, shared (CGNAT), benchmark,
/// IETF-protocol, reserved, multicast, broadcast and the IPv6 unique-local,
/// site-local, local-use NAT64 and Teredo ranges.
pub fn is_internal(ip: IpAddr) -> bool {
    match canonical(ip) {
        IpAddr::V4(v4) => {
            let [a, b, c, _] = v4.octets();
            v4.is_loopback()
                || v4.is_private()
                || v4.is_link_local()
                || v4.is_unspecified()
                || v4.is_broadcast()
                || v4.is_multicast()
                || a == 0
                || a >= 240
                || (a == 100 && (64..128).contains(&b))
                || (a == 192 && b == 0 && c == 0)
                || (a == 198 && (b == 18 || b == 19))
        }
        IpAddr::V6(v6) => {
            let s = v6.segments();
            v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                || (s[0] & 0xfe00) == 0xfc00
                || (s[0] & 0xffc0) == 0xfe80
                || (s[0] & 0xffc0) == 0xfec0
                || (s[0] == 0x64 && s[1] == 0xff9b && s[2] == 1)
                || (s[0] == 0x2001 && s[1] == 0)
        }
    }
}

/// A DNS resolver that refuses names with an internal address.
#[derive(Debug)]
struct GuardedResolver {
    policy: Arc<RemotePolicy>,
}

impl reqwest::dns::Resolve for GuardedResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let policy = self.policy.clone();
        let host = name.as_str().to_owned();
        Box::pin(async move {
            let addrs: Vec<SocketAddr> =
                tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            // All or nothing: one internal address among public ones
            // would let a rebinding answer pick it.
            for addr in &addrs {
                policy.check(&host, addr.ip())?;
            }
            let addrs: reqwest::dns::Addrs = Box::new(addrs.into_iter());
            Ok(addrs)
        })
    }
}

/// Whether plain HTTP is used: only for loopback hosts (`localhost`, an IP
/// literal on loopback). `127.evil.example` is a name, not loopback.
pub fn is_loopback_host(registry: &str) -> bool {
    let host = match registry.rsplit_once(':') {
        Some((h, port)) if port.chars().all(|c| c.is_ascii_digit()) => h,
        _ => registry,
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host == "localhost"
        || host
            .parse::<IpAddr>()
            .is_ok_and(|ip| canonical(ip).is_loopback())
}

/// What a remote manifest says, as far as running it goes.
#[derive(Debug, Clone)]
pub struct RemoteManifest {
    /// The manifest's digest.
    pub digest: String,
    /// Its layers, as JSON descriptors.
    pub layers: Vec<serde_json::Value>,
}

/// The guarded client. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Remote {
    http: reqwest::Client,
    policy: Arc<RemotePolicy>,
}

impl Remote {
    /// A client that refuses internal destinations outside `policy`.
    pub fn new(policy: RemotePolicy) -> Result<Remote> {
        let policy = Arc::new(policy);
        let redirect_policy = policy.clone();
        let http = reqwest::Client::builder()
            .connect_timeout(CONNECT_TIMEOUT)
            .read_timeout(READ_TIMEOUT)
            .no_proxy()
            .dns_resolver(Arc::new(GuardedResolver {
                policy: policy.clone(),
            }))
            .redirect(reqwest::redirect::Policy::custom(move |attempt| {
                if attempt.previous().len() >= MAX_REDIRECTS {
                    return attempt.error("too many redirects");
                }
                match check_url(&redirect_policy, attempt.url()) {
                    Ok(()) => attempt.follow(),
                    Err(e) => attempt.error(e),
                }
            }))
            .user_agent(concat!("wharf/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| RemoteError::Invalid(format!("cannot build the HTTP client: {e}")))?;
        Ok(Remote { http, policy })
    }

    /// Resolves `reference` to its manifest digest and layers, within
    /// [`MANIFEST_TIMEOUT`].
    pub async fn manifest(&self, reference: &str) -> Result<RemoteManifest> {
        let r = parse(reference)?;
        tokio::time::timeout(MANIFEST_TIMEOUT, self.manifest_of(reference, &r))
            .await
            .map_err(|_| RemoteError::Unreachable {
                host: host_of(&r),
                reason: format!("no manifest within {}s", MANIFEST_TIMEOUT.as_secs()),
            })?
    }

    async fn manifest_of(&self, reference: &str, r: &Reference) -> Result<RemoteManifest> {
        let target = r.digest().or(r.tag()).unwrap_or("latest").to_owned();
        let url = self.url(r, &format!("manifests/{target}"))?;
        let response = self.get(r, url, Some(MANIFEST_ACCEPT), "manifest").await?;
        let bytes =
            read_capped(response, MAX_REMOTE_MANIFEST_BYTES, &host_of(r), "manifest").await?;
        let digest = Digest::sha256_of(&bytes).to_string();
        if let Some(pinned) = r.digest()
            && pinned != digest
        {
            return Err(RemoteError::Invalid(format!(
                "the manifest of {reference} has digest {digest}, not the one asked for"
            )));
        }
        let json: serde_json::Value = serde_json::from_slice(&bytes).map_err(|_| {
            RemoteError::Invalid(format!("the manifest of {reference} is not JSON"))
        })?;
        if json.get("manifests").is_some() {
            return Err(RemoteError::Invalid(format!(
                "{reference} is an index: name one of its manifests by digest"
            )));
        }
        let layers = json
            .get("layers")
            .and_then(|l| l.as_array())
            .cloned()
            .unwrap_or_default();
        Ok(RemoteManifest { digest, layers })
    }

    /// Downloads blob `digest` of `reference`'s repository into `out`,
    /// refusing it above `max_bytes` (before and while downloading) and
    /// verifying the digest while streaming. The file appears only when
    /// complete and verified.
    pub async fn blob_to_file(
        &self,
        reference: &str,
        digest: &Digest,
        max_bytes: u64,
        out: &Path,
    ) -> Result<u64> {
        let r = parse(reference)?;
        let host = host_of(&r);
        let url = self.url(&r, &format!("blobs/{digest}"))?;
        let response = self.get(&r, url, None, "blob").await?;
        if let Some(len) = response.content_length()
            && len > max_bytes
        {
            return Err(RemoteError::Invalid(format!(
                "the layer {digest} is {len} bytes, above the limit of {max_bytes}"
            )));
        }
        let io = |e: std::io::Error| RemoteError::Io(e.to_string());
        let dir = out.parent().unwrap_or(Path::new("."));
        let tmp = tempfile::NamedTempFile::new_in(dir).map_err(io)?;
        let mut file = tokio::fs::File::from_std(tmp.reopen().map_err(io)?);
        let mut hasher = Hasher::new(digest.algorithm());
        let mut stream = response.bytes_stream();
        let mut done = 0u64;
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| unreachable(&host, &e))?;
            done += chunk.len() as u64;
            if done > max_bytes {
                return Err(RemoteError::Invalid(format!(
                    "the layer {digest} is larger than the limit of {max_bytes} bytes"
                )));
            }
            hasher.update(&chunk);
            file.write_all(&chunk).await.map_err(io)?;
        }
        file.sync_all().await.map_err(io)?;
        let actual = hasher.finish();
        if &actual != digest {
            return Err(RemoteError::Invalid(format!(
                "the downloaded layer has digest {actual}, not {digest}"
            )));
        }
        tmp.persist(out).map_err(|e| io(e.error))?;
        Ok(done)
    }

    fn url(&self, r: &Reference, path: &str) -> Result<Url> {
        let registry = r.resolve_registry();
        let scheme = if is_loopback_host(registry) {
            "http"
        } else {
            "https"
        };
        let url = Url::parse(&format!(
            "{scheme}://{registry}/v2/{}/{path}",
            r.repository()
        ))
        .map_err(|_| RemoteError::Reference(r.whole()))?;
        check_url(&self.policy, &url)?;
        Ok(url)
    }

    /// A GET that answers a bearer challenge once with an anonymous token.
    async fn get(
        &self,
        r: &Reference,
        url: Url,
        accept: Option<&str>,
        what: &'static str,
    ) -> Result<reqwest::Response> {
        let host = host_of(r);
        let send = |token: Option<String>| {
            let mut req = self.http.get(url.clone());
            if let Some(accept) = accept {
                req = req.header(ACCEPT, accept);
            }
            if let Some(token) = token {
                req = req.header(AUTHORIZATION, format!("Bearer {token}"));
            }
            req.send()
        };
        let mut response = send(None).await.map_err(|e| unreachable(&host, &e))?;
        if response.status() == StatusCode::UNAUTHORIZED
            && let Some(challenge) = response
                .headers()
                .get(WWW_AUTHENTICATE)
                .and_then(|v| v.to_str().ok())
                .and_then(Challenge::parse)
        {
            let token = self.token(&host, &challenge).await?;
            response = send(Some(token))
                .await
                .map_err(|e| unreachable(&host, &e))?;
        }
        if !response.status().is_success() {
            return Err(RemoteError::Status {
                host,
                status: response.status().as_u16(),
                what,
            });
        }
        Ok(response)
    }

    /// An anonymous token from the challenge's realm (itself a guarded
    /// destination).
    async fn token(&self, host: &str, challenge: &Challenge) -> Result<String> {
        let mut url = Url::parse(&challenge.realm)
            .map_err(|_| RemoteError::Invalid(format!("{host} names an invalid token realm")))?;
        check_url(&self.policy, &url)?;
        {
            let mut query = url.query_pairs_mut();
            if let Some(service) = &challenge.service {
                query.append_pair("service", service);
            }
            if let Some(scope) = &challenge.scope {
                query.append_pair("scope", scope);
            }
        }
        let realm_host = url.host_str().unwrap_or_default().to_owned();
        let response = self
            .http
            .get(url)
            .send()
            .await
            .map_err(|e| unreachable(&realm_host, &e))?;
        if !response.status().is_success() {
            return Err(RemoteError::Status {
                host: realm_host,
                status: response.status().as_u16(),
                what: "token",
            });
        }
        let bytes = read_capped(response, MAX_TOKEN_BYTES, &realm_host, "token").await?;
        let json: serde_json::Value = serde_json::from_slice(&bytes).map_err(|_| {
            RemoteError::Invalid(format!("{realm_host} answered a token that is not JSON"))
        })?;
        json.get("token")
            .or_else(|| json.get("access_token"))
            .and_then(|t| t.as_str())
            .map(str::to_owned)
            .ok_or_else(|| RemoteError::Invalid(format!("{realm_host} answered no token")))
    }
}

fn parse(reference: &str) -> Result<Reference> {
    reference
        .parse()
        .map_err(|_| RemoteError::Reference(reference.to_owned()))
}

fn host_of(r: &Reference) -> String {
    r.resolve_registry().to_owned()
}

/// Refuses non-HTTP schemes and internal IP literals (names are checked by
/// the resolver when they are connected to).
fn check_url(policy: &RemotePolicy, url: &Url) -> Result<()> {
    let host = url.host_str().unwrap_or_default().to_owned();
    if !matches!(url.scheme(), "http" | "https") {
        return Err(RemoteError::Invalid(format!(
            "{host}: only http and https destinations are followed"
        )));
    }
    match url.host() {
        Some(url::Host::Ipv4(v4)) => policy.check(&host, IpAddr::V4(v4)),
        Some(url::Host::Ipv6(v6)) => policy.check(&host, IpAddr::V6(v6)),
        Some(url::Host::Domain(_)) => Ok(()),
        None => Err(RemoteError::Invalid("a destination without a host".into())),
    }
}

/// Reads at most `cap` bytes of a body; more is an error.
async fn read_capped(
    response: reqwest::Response,
    cap: usize,
    host: &str,
    what: &str,
) -> Result<Vec<u8>> {
    let too_big =
        || RemoteError::Invalid(format!("{host} answered a {what} larger than {cap} bytes"));
    if response.content_length().is_some_and(|n| n > cap as u64) {
        return Err(too_big());
    }
    let mut body = Vec::new();
    let mut stream = response.bytes_stream();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| unreachable(host, &e))?;
        if body.len() + chunk.len() > cap {
            return Err(too_big());
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// A short reason for a transport failure, with our own guard's refusal
/// (from the resolver or the redirect policy) passed through.
fn unreachable(host: &str, error: &reqwest::Error) -> RemoteError {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(e) = source {
        if let Some(refused) = e.downcast_ref::<RemoteError>() {
            return refused.clone();
        }
        source = e.source();
    }
    let reason = if error.is_timeout() {
        "timed out"
    } else if error.is_redirect() {
        "too many redirects"
    } else if error.is_connect() {
        "connection failed"
    } else {
        "the connection broke off"
    };
    RemoteError::Unreachable {
        host: host.to_owned(),
        reason: reason.into(),
    }
}

/// A `Bearer realm="…",service="…",scope="…"` challenge.
#[derive(Debug, PartialEq, Eq)]
struct Challenge {
    realm: String,
    service: Option<String>,
    scope: Option<String>,
}

impl Challenge {
    fn parse(header: &str) -> Option<Challenge> {
        let rest = header.trim().strip_prefix("Bearer ")?;
        let (mut realm, mut service, mut scope) = (None, None, None);
        let mut rest = rest.trim();
        while !rest.is_empty() {
            let (key, after) = rest.split_once('=')?;
            let after = after.trim_start();
            let (value, tail) = if let Some(quoted) = after.strip_prefix('"') {
                let end = quoted.find('"')?;
                (&quoted[..end], &quoted[end + 1..])
            } else {
                let end = after.find(',').unwrap_or(after.len());
                (&after[..end], &after[end..])
            };
            match key.trim() {
                "realm" => realm = Some(value.to_owned()),
                "service" => service = Some(value.to_owned()),
                "scope" => scope = Some(value.to_owned()),
                _ => {}
            }
            rest = tail.trim_start().trim_start_matches(',').trim_start();
        }
        Some(Challenge {
            realm: realm?,
            service,
            scope,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn internal_addresses() {
        for internal in [
            "127.0.0.1",
            "127.9.9.9",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "224.0.0.1",
            "::1",
            "::",
            "fe80::1",
            "fd00::1",
            "::ffff:127.0.0.1",
            "::ffff:169.254.169.254",
            "::127.0.0.1",
            "64:ff9b::a9fe:a9fe",
            "64:ff9b:1::1",
            "2002:7f00:1::1",
            "2001:0:4136:e378::1",
            "198.18.0.1",
            "192.0.0.8",
            "240.0.0.1",
        ] {
            assert!(is_internal(internal.parse().unwrap()), "{internal}");
        }
        for public in [
            "8.8.8.8",
            "1.1.1.1",
            "2606:4700::1111",
            "100.128.0.1",
            "172.32.0.1",
            "64:ff9b::808:808",
            "2002:808:808::1",
        ] {
            assert!(!is_internal(public.parse().unwrap()), "{public}");
        }
    }

    #[test]
    fn the_allow_list_opens_only_its_networks() {
        let policy = RemotePolicy {
            allow: vec!["127.0.0.0/8".parse().unwrap()],
        };
        assert!(policy.permits("127.0.0.1".parse().unwrap()));
        assert!(policy.permits("::ffff:127.0.0.1".parse().unwrap()));
        assert!(!policy.permits("169.254.169.254".parse().unwrap()));
        assert!(policy.permits("8.8.8.8".parse().unwrap()));
    }

    #[test]
    fn loopback_hosts_are_addresses_not_prefixes() {
        assert!(is_loopback_host("localhost:5000"));
        assert!(is_loopback_host("127.0.0.1:7070"));
        assert!(is_loopback_host("[::1]:7070"));
        assert!(!is_loopback_host("127.evil.example"));
        assert!(!is_loopback_host("127.evil.example:7070"));
        assert!(!is_loopback_host("ghcr.io"));
    }

    #[test]
    fn urls_with_internal_literals_are_refused() {
        let policy = RemotePolicy::default();
        for url in [
            "http://127.0.0.1:8080/x",
            "http://[::1]/x",
            "http://169.254.169.254/latest/meta-data",
            "file:///etc/passwd",
        ] {
            assert!(
                check_url(&policy, &Url::parse(url).unwrap()).is_err(),
                "{url}"
            );
        }
        assert!(check_url(&policy, &Url::parse("https://ghcr.io/v2/").unwrap()).is_ok());
    }

    #[test]
    fn challenges() {
        assert_eq!(
            Challenge::parse(
                r#"Bearer realm="https://auth.example/token",service="registry.example",scope="repository:a/b:pull""#
            ),
            Some(Challenge {
                realm: "https://auth.example/token".into(),
                service: Some("registry.example".into()),
                scope: Some("repository:a/b:pull".into()),
            })
        );
        assert_eq!(Challenge::parse("Basic realm=\"x\""), None);
        assert_eq!(Challenge::parse("Bearer service=\"x\""), None);
    }
}
