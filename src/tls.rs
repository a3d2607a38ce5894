//! TLS for `wharf server` and for the clients that pin its CA.
//!
//! `--tls auto` keeps a CA (an ECDSA P-256 key and a self-signed
//! certificate, `DATA_DIR/tls/ca.{pem,key}`, the key mode 0600) and signs
//! a fresh server certificate at every start for the names the server is
//! reached by (localhost, loopback, the host name, the listen address,
//! `--tls-san`). `--tls-cert/--tls-key` use an operator's files instead;
//! the chain's last certificate is the CA join tokens pin. Either way the
//! CA's SHA-256 (of its DER) goes into join tokens, and nodes refuse a
//! server whose CA does not match it.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use sha2::{Digest as _, Sha256};

/// The server's TLS: its rustls configuration and the CA it pins.
pub(crate) struct ServerTls {
    pub(crate) config: Arc<rustls::ServerConfig>,
    /// The CA certificate, PEM (served at `/v1/agent/ca`).
    pub(crate) ca_pem: String,
    /// SHA-256 of the CA's DER, hex.
    pub(crate) fingerprint: String,
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The one certificate in `pem` (DER) and its SHA-256, hex. More than
/// one is refused: a CA file whose fingerprint is checked must not smuggle
/// a second, unchecked certificate into a trust store.
pub(crate) fn single_certificate(pem: &str) -> Result<(Vec<u8>, String)> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<std::result::Result<_, _>>()
        .context("not a PEM certificate")?;
    match certs.as_slice() {
        [one] => Ok((one.to_vec(), hex::encode(Sha256::digest(one.as_ref())))),
        [] => bail!("no certificate"),
        _ => bail!("{} certificates where one CA was expected", certs.len()),
    }
}

fn pem_of(der: &[u8]) -> String {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = String::from("-----BEGIN CERTIFICATE-----\n");
    for chunk in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(chunk).expect("base64 is ASCII"));
        out.push('\n');
    }
    out.push_str("-----END CERTIFICATE-----\n");
    out
}

fn server_config(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> Result<Arc<rustls::ServerConfig>> {
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .context("TLS versions")?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .context("the certificate and key do not make a TLS identity")?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// The operator's certificate chain and key.
pub(crate) fn from_files(cert: &Path, key: &Path) -> Result<ServerTls> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .with_context(|| format!("cannot read {}", cert.display()))?
        .collect::<std::result::Result<_, _>>()
        .with_context(|| format!("{} is not a PEM certificate chain", cert.display()))?;
    let Some(ca) = chain.last() else {
        bail!("{} holds no certificate", cert.display());
    };
    let ca_pem = pem_of(ca.as_ref());
    let fingerprint = hex::encode(Sha256::digest(ca.as_ref()));
    let key = PrivateKeyDer::from_pem_file(key)
        .with_context(|| format!("{} is not a PEM private key", key.display()))?;
    Ok(ServerTls {
        config: server_config(chain, key)?,
        ca_pem,
        fingerprint,
    })
}

fn ca_params() -> Result<rcgen::CertificateParams> {
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new())?;
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "Wharf cluster CA");
    params.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
        rcgen::KeyUsagePurpose::DigitalSignature,
    ];
    Ok(params)
}

/// `--tls auto`: the data directory's CA (made on first start) and a
/// server certificate for `listen`, the usual local names and `sans`.
pub(crate) fn auto(data_dir: &Path, listen: SocketAddr, sans: &[String]) -> Result<ServerTls> {
    let dir = data_dir.join("tls");
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let (ca_pem_path, ca_key_path) = (dir.join("ca.pem"), dir.join("ca.key"));
    let (ca_pem, ca_key) = if ca_pem_path.exists() && ca_key_path.exists() {
        let key = std::fs::read_to_string(&ca_key_path)?;
        (
            std::fs::read_to_string(&ca_pem_path)?,
            rcgen::KeyPair::from_pem(&key)
                .with_context(|| format!("{} is not a key", ca_key_path.display()))?,
        )
    } else {
        let key = rcgen::KeyPair::generate()?;
        let cert = ca_params()?.self_signed(&key)?;
        crate::paths::write_private(&ca_key_path, key.serialize_pem().as_bytes())?;
        crate::paths::write_private(&ca_pem_path, cert.pem().as_bytes())?;
        (cert.pem(), key)
    };
    // The issuer for signing: the same name and key as the stored CA
    // (certificates it signs verify against the stored one).
    let issuer = ca_params()?.self_signed(&ca_key)?;
    let mut names: Vec<String> = vec!["localhost".into(), "127.0.0.1".into(), "::1".into()];
    if let Ok(host) = std::fs::read_to_string("/proc/sys/kernel/hostname") {
        names.push(host.trim().to_owned());
    }
    if !listen.ip().is_unspecified() {
        names.push(listen.ip().to_string());
    }
    names.extend(sans.iter().cloned());
    names.sort();
    names.dedup();
    let mut params = rcgen::CertificateParams::new(names)?;
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "wharf server");
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
    let key = rcgen::KeyPair::generate()?;
    let leaf = params.signed_by(&key, &issuer, &ca_key)?;
    let ca_der = CertificateDer::from_pem_slice(ca_pem.as_bytes()).context("the stored CA")?;
    let fingerprint = hex::encode(Sha256::digest(ca_der.as_ref()));
    let chain = vec![leaf.der().clone(), ca_der];
    let key = PrivateKeyDer::try_from(key.serialize_der())
        .map_err(|e| anyhow::anyhow!("the server key: {e}"))?;
    Ok(ServerTls {
        config: server_config(chain, key)?,
        ca_pem,
        fingerprint,
    })
}

/// A rustls client configuration that trusts the web's CAs (Mozilla's,
/// built in: no system store needed).
pub(crate) fn client_with_web_roots() -> Result<Arc<rustls::ClientConfig>> {
    let roots = rustls::RootCertStore {
        roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
    };
    Ok(Arc::new(
        rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .context("TLS versions")?
            .with_root_certificates(roots)
            .with_no_client_auth(),
    ))
}

/// A rustls client configuration that trusts only the CA in `pem`.
pub(crate) fn client_trusting(pem: &str) -> Result<Arc<rustls::ClientConfig>> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(pem.as_bytes()) {
        roots
            .add(cert.context("not a PEM certificate")?)
            .context("not a CA certificate")?;
    }
    if roots.is_empty() {
        bail!("no certificate in the CA file");
    }
    Ok(Arc::new(
        rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .context("TLS versions")?
            .with_root_certificates(roots)
            .with_no_client_auth(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_keeps_its_ca_and_signs_for_the_listen_address() {
        let dir = tempfile::tempdir().unwrap();
        let listen: SocketAddr = "10.1.2.3:7070".parse().unwrap();
        let first = auto(dir.path(), listen, &["wharf.example".into()]).unwrap();
        let again = auto(dir.path(), listen, &[]).unwrap();
        assert_eq!(first.fingerprint, again.fingerprint, "the CA is kept");
        assert_eq!(
            single_certificate(&first.ca_pem).unwrap().1,
            first.fingerprint
        );
        assert_eq!(first.fingerprint.len(), 64);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(dir.path().join("tls/ca.key"))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        assert!(client_trusting(&first.ca_pem).is_ok());
        // A second certificate after the pinned one is refused.
        let doubled = format!("{}{}", first.ca_pem, first.ca_pem);
        assert!(single_certificate(&doubled).is_err());
        assert!(client_trusting("nothing").is_err());
    }
}
