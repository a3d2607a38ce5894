//! `wharf push`, `wharf pull` and `wharf image inspect`: Wasm artifacts to
//! and from any OCI registry, Wharf's own by default credentials.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use wharf_registry::client::RegistryClient;

/// Where the token comes from: the flag, `WHARF_TOKEN`, or the local
/// server's admin token in the data directory. Global, so that commands
/// with subcommands (`wharf task ...`) take it before or after them.
#[derive(Debug, Args)]
pub(crate) struct Credentials {
    /// API and registry token (default: the local server's admin token).
    #[arg(long, global = true, env = "WHARF_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Data directory holding the local admin token.
    #[arg(long, global = true, env = "WHARF_DATA_DIR")]
    data_dir: Option<PathBuf>,
}

impl Credentials {
    /// `--token` as given.
    pub(crate) fn explicit_token(&self) -> Option<String> {
        self.token.clone()
    }

    /// `--data-dir` as given.
    pub(crate) fn data_dir_flag(&self) -> Option<PathBuf> {
        self.data_dir.clone()
    }

    pub(crate) fn token(&self) -> Result<Option<String>> {
        if let Some(t) = &self.token {
            return Ok(Some(t.clone()));
        }
        let dir = crate::paths::data_dir(self.data_dir.clone())?;
        match std::fs::read_to_string(crate::paths::admin_token(&dir)) {
            Ok(t) => Ok(Some(t.trim().to_owned())),
            Err(_) => Ok(None),
        }
    }
}

/// Credentials for a registry named by a reference. The Wharf token is
/// offered only to the Wharf server (`--server`); any other registry gets
/// `--username`/`--password`, a `WHARF_REGISTRY_AUTH` entry for its host,
/// or the user's `~/.docker/config.json` entry, and otherwise nothing.
#[derive(Debug, Args)]
pub(crate) struct RegistryCredentials {
    #[command(flatten)]
    credentials: Credentials,
    #[command(flatten)]
    options: RegistryOptions,
}

/// Which registry the Wharf token belongs to, and the credentials for any
/// other: shared by `wharf push/pull/image` and `wharf run/serve` (whose
/// token flag sits beside their own `--data-dir`).
#[derive(Debug, Args)]
pub(crate) struct RegistryOptions {
    /// The Wharf server the Wharf token belongs to.
    #[arg(
        long,
        global = true,
        env = "WHARF_SERVER",
        default_value = "http://127.0.0.1:7070"
    )]
    server: String,
    /// User name for a registry other than the Wharf server.
    #[arg(long, requires = "password")]
    username: Option<String>,
    /// Password for a registry other than the Wharf server.
    #[arg(
        long,
        requires = "username",
        env = "WHARF_REGISTRY_PASSWORD",
        hide_env_values = true
    )]
    password: Option<String>,
    /// `HOST=USER:PASSWORD` entries (separated by spaces or new lines) for
    /// registries other than the Wharf server.
    #[arg(long, env = "WHARF_REGISTRY_AUTH", hide_env_values = true, hide = true)]
    registry_auth: Option<String>,
    /// A CA certificate (PEM) to trust, such as a `--tls auto` server's
    /// `DATA_DIR/tls/ca.pem`.
    #[arg(long, env = "WHARF_CA_CERT")]
    ca_cert: Option<PathBuf>,
}

/// `host:port` with `localhost` spelled as `127.0.0.1` and Docker Hub's
/// aliases as one name, so both spellings name the same registry.
fn same_host(a: &str, b: &str) -> bool {
    let norm = |h: &str| {
        let h = h.trim_end_matches('/').to_ascii_lowercase();
        let h = match h.strip_prefix("localhost") {
            Some(rest) => format!("127.0.0.1{rest}"),
            None => h,
        };
        match h.as_str() {
            "docker.io" | "index.docker.io" | "registry-1.docker.io" => "docker.io".to_owned(),
            _ => h,
        }
    };
    norm(a) == norm(b)
}

impl RegistryCredentials {
    /// The user name and password to send to `reference`'s registry.
    pub(crate) fn for_reference(&self, reference: &str) -> Result<Option<(String, String)>> {
        self.options.for_reference(reference, &self.credentials)
    }

    /// A client for `reference`'s registry, with its credentials and TLS.
    pub(crate) fn client(&self, reference: &str) -> Result<RegistryClient> {
        Ok(RegistryClient::with_tls(
            reference,
            self.for_reference(reference)?,
            &self.options.tls_for(reference)?,
        )?)
    }
}

impl Credentials {
    /// A token flag and the data directory to fall back on.
    pub(crate) fn new(token: Option<String>, data_dir: Option<PathBuf>) -> Self {
        Credentials { token, data_dir }
    }
}

impl RegistryOptions {
    /// The Wharf server's URL.
    pub(crate) fn server(&self) -> &str {
        &self.server
    }

    /// A TLS configuration trusting `--ca-cert`, if given.
    pub(crate) fn ureq_tls(&self) -> Result<Option<std::sync::Arc<rustls::ClientConfig>>> {
        match &self.ca_cert {
            None => Ok(None),
            Some(path) => {
                let pem = std::fs::read_to_string(path)
                    .with_context(|| format!("cannot read --ca-cert {}", path.display()))?;
                Ok(Some(crate::tls::client_trusting(&pem)?))
            }
        }
    }

    /// TLS for `reference`'s registry: HTTPS (even on loopback) when it is
    /// the `--server` and that is `https://`, and `--ca-cert` trusted.
    pub(crate) fn tls_for(&self, reference: &str) -> Result<wharf_registry::client::ClientTls> {
        let (registry, _) = wharf_registry::client::registry_of(reference)?;
        let https_server = self.server.starts_with("https://")
            && same_host(
                &registry,
                self.server
                    .trim_start_matches("https://")
                    .trim_end_matches('/'),
            );
        let ca_pem = match &self.ca_cert {
            Some(path) => Some(
                std::fs::read(path)
                    .with_context(|| format!("cannot read --ca-cert {}", path.display()))?,
            ),
            None => None,
        };
        Ok(wharf_registry::client::ClientTls {
            https: https_server,
            ca_pem,
        })
    }

    /// The user name and password to send to `reference`'s registry. The
    /// registry is the one the client will contact (`127.0.0.1:7070` with
    /// no repository is Docker Hub's `library/127.0.0.1`), and the Wharf
    /// token (from `wharf`) goes only to a reference that names the
    /// `--server` itself.
    pub(crate) fn for_reference(
        &self,
        reference: &str,
        wharf: &Credentials,
    ) -> Result<Option<(String, String)>> {
        let (registry, explicit) = wharf_registry::client::registry_of(reference)?;
        let server = self
            .server
            .trim_start_matches("http://")
            .trim_start_matches("https://")
            .trim_end_matches('/');
        if explicit && same_host(&registry, server) {
            return Ok(wharf.token()?.map(|token| ("wharf".to_owned(), token)));
        }
        if let (Some(user), Some(password)) = (&self.username, &self.password) {
            return Ok(Some((user.clone(), password.clone())));
        }
        if let Some(entries) = &self.registry_auth {
            for entry in entries.split_whitespace() {
                let Some((host, creds)) = entry.split_once('=') else {
                    anyhow::bail!("WHARF_REGISTRY_AUTH entries are HOST=USER:PASSWORD");
                };
                if same_host(host, &registry) {
                    let (user, password) = creds.split_once(':').with_context(|| {
                        format!("WHARF_REGISTRY_AUTH entry for {host} is not USER:PASSWORD")
                    })?;
                    return Ok(Some((user.to_owned(), password.to_owned())));
                }
            }
        }
        Ok(docker_config_auth(&registry))
    }
}

/// The `auths` entry for `registry` in the docker CLI's config
/// (`$DOCKER_CONFIG/config.json` or `~/.docker/config.json`): `auth`
/// (base64 of `user:password`) or `username` and `password`. Credential
/// helpers (`credsStore`, `credHelpers`) are not run.
fn docker_config_auth(registry: &str) -> Option<(String, String)> {
    use base64::Engine as _;
    let dir = match std::env::var_os("DOCKER_CONFIG") {
        Some(d) => PathBuf::from(d),
        None => PathBuf::from(std::env::var_os("HOME")?).join(".docker"),
    };
    let text = std::fs::read_to_string(dir.join("config.json")).ok()?;
    let config: serde_json::Value = serde_json::from_str(&text).ok()?;
    let auths = config.get("auths")?.as_object()?;
    let entry = auths.iter().find_map(|(host, entry)| {
        // Keys are hosts or URLs (`https://index.docker.io/v1/`).
        let host = host
            .trim_start_matches("https://")
            .trim_start_matches("http://")
            .split('/')
            .next()
            .unwrap_or_default();
        same_host(host, registry).then_some(entry)
    })?;
    if let Some(auth) = entry.get("auth").and_then(|a| a.as_str()) {
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(auth)
            .ok()?;
        let (user, password) = std::str::from_utf8(&decoded).ok()?.split_once(':')?;
        return Some((user.to_owned(), password.to_owned()));
    }
    let user = entry.get("username")?.as_str()?;
    let password = entry.get("password")?.as_str()?;
    Some((user.to_owned(), password.to_owned()))
}

#[derive(Debug, Args)]
pub(crate) struct PushArgs {
    /// The .wasm file.
    file: PathBuf,
    /// Where to push: HOST[:PORT]/REPOSITORY[:TAG].
    reference: String,
    #[command(flatten)]
    credentials: RegistryCredentials,
}

#[derive(Debug, Args)]
pub(crate) struct PullArgs {
    /// What to pull: HOST[:PORT]/REPOSITORY[:TAG|@DIGEST].
    reference: String,
    /// Output file (default: the repository's last path component + .wasm).
    #[arg(short, long)]
    output: Option<PathBuf>,
    #[command(flatten)]
    credentials: RegistryCredentials,
}

#[derive(Debug, Subcommand)]
pub(crate) enum ImageCommand {
    /// Show a Wasm artifact's manifest digest, config, layers and the
    /// registry's scan (module or component, world, imports, exports).
    Inspect {
        /// HOST[:PORT]/REPOSITORY[:TAG|@DIGEST]
        reference: String,
        /// Output format.
        #[arg(long, value_enum, default_value = "text")]
        output: crate::Output,
        #[command(flatten)]
        credentials: RegistryCredentials,
    },
}

fn bar(quiet: bool) -> ProgressBar {
    if quiet {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template("{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec}")
            .expect("valid template")
            .progress_chars("=> "),
    );
    bar
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("failed to start the async runtime")
}

pub(crate) fn push(args: PushArgs) -> Result<()> {
    let bytes = std::fs::read(&args.file)
        .with_context(|| format!("cannot read {}", args.file.display()))?;
    let client = args.credentials.client(&args.reference)?;
    let bar = bar(false);
    bar.set_message("pushing");
    let pushed = runtime()?.block_on(client.push_wasm(bytes, &args.reference, |done, total| {
        bar.set_length(total);
        bar.set_position(done);
    }));
    bar.finish_and_clear();
    let pushed = pushed.with_context(|| format!("failed to push {}", args.reference))?;
    println!(
        "{} pushed: {} ({}, {})",
        args.reference, pushed.digest, pushed.scan.os, pushed.scan.world
    );
    Ok(())
}

pub(crate) fn pull(args: PullArgs) -> Result<()> {
    let output = match args.output {
        Some(o) => o,
        None => {
            let repo = args.reference.split(['@']).next().unwrap_or_default();
            let last = repo.rsplit('/').next().unwrap_or("artifact");
            let name = last.split(':').next().unwrap_or("artifact");
            PathBuf::from(format!("{name}.wasm"))
        }
    };
    let client = args.credentials.client(&args.reference)?;
    let bar = bar(false);
    bar.set_message("pulling");
    let digest = runtime()?.block_on(client.pull_wasm(&args.reference, &output, |done, total| {
        bar.set_length(total);
        bar.set_position(done);
    }));
    bar.finish_and_clear();
    let digest = digest.with_context(|| format!("failed to pull {}", args.reference))?;
    println!(
        "{} pulled to {} ({digest})",
        args.reference,
        output.display()
    );
    Ok(())
}

pub(crate) fn image(command: ImageCommand) -> Result<()> {
    match command {
        ImageCommand::Inspect {
            reference,
            output,
            credentials,
        } => {
            let client = credentials.client(&reference)?;
            let found = runtime()?
                .block_on(client.inspect(&reference))
                .with_context(|| format!("failed to inspect {reference}"))?;
            match output {
                crate::Output::Json => println!("{}", serde_json::to_string_pretty(&found)?),
                crate::Output::Text => {
                    println!("reference: {}", found.reference);
                    println!("digest:    {}", found.digest);
                    for layer in &found.layers {
                        println!(
                            "layer:     {} {} ({} bytes)",
                            layer["mediaType"].as_str().unwrap_or("?"),
                            layer["digest"].as_str().unwrap_or("?"),
                            layer["size"]
                        );
                    }
                    match &found.scan {
                        Some(scan) => {
                            println!("kind:      {:?}", scan.kind);
                            println!("os:        {}", scan.os);
                            println!("world:     {}", scan.world);
                            println!("imports:   {}", scan.imports.len());
                            for i in &scan.imports {
                                println!("  {i}");
                            }
                            println!("exports:   {}", scan.exports.len());
                            for e in &scan.exports {
                                println!("  {e}");
                            }
                        }
                        None => println!(
                            "scan:      none (not a Wasm artifact, or pushed to another registry)"
                        ),
                    }
                }
            }
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn creds() -> RegistryCredentials {
        RegistryCredentials {
            credentials: Credentials {
                token: Some("the-wharf-token".into()),
                data_dir: None,
            },
            options: RegistryOptions {
                server: "http://127.0.0.1:7070".into(),
                username: None,
                password: None,
                registry_auth: Some("ghcr.io=alice:pw docker.io=bob:pw2".into()),
                ca_cert: None,
            },
        }
    }

    #[test]
    fn https_is_used_on_loopback_only_for_an_https_server() {
        let mut c = creds();
        let tls = |c: &RegistryCredentials, r: &str| c.options.tls_for(r).unwrap().https;
        assert!(!tls(&c, "127.0.0.1:7070/team/app:v1"));
        c.options.server = "https://127.0.0.1:7070".into();
        assert!(tls(&c, "127.0.0.1:7070/team/app:v1"));
        assert!(tls(&c, "localhost:7070/team/app:v1"));
        assert!(!tls(&c, "127.0.0.1:5000/team/app:v1"), "another registry");
    }

    #[test]
    fn the_wharf_token_goes_only_to_a_reference_naming_the_server() {
        let c = creds();
        let token = Some(("wharf".to_owned(), "the-wharf-token".to_owned()));
        for to_server in ["127.0.0.1:7070/team/app:v1", "localhost:7070/team/app"] {
            assert_eq!(c.for_reference(to_server).unwrap(), token, "{to_server}");
        }
        // Docker Hub (no registry, or a host without a repository, which
        // oci-client reads as docker.io/library/HOST), other ports, others.
        for elsewhere in [
            "team/app:v1",
            "127.0.0.1:7070",
            "localhost:7070",
            "127.0.0.1:7071/team/app",
            "ghcr.io/team/app:v1",
        ] {
            assert_ne!(c.for_reference(elsewhere).unwrap(), token, "{elsewhere}");
        }
        assert_eq!(
            c.for_reference("ghcr.io/team/app:v1").unwrap(),
            Some(("alice".to_owned(), "pw".to_owned()))
        );
        assert_eq!(
            c.for_reference("team/app:v1").unwrap(),
            Some(("bob".to_owned(), "pw2".to_owned()))
        );
    }
}
