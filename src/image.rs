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

#[derive(Debug, Args)]
pub(crate) struct PushArgs {
    /// The .wasm file.
    file: PathBuf,
    /// Where to push: HOST[:PORT]/REPOSITORY[:TAG].
    reference: String,
    #[command(flatten)]
    credentials: Credentials,
}

#[derive(Debug, Args)]
pub(crate) struct PullArgs {
    /// What to pull: HOST[:PORT]/REPOSITORY[:TAG|@DIGEST].
    reference: String,
    /// Output file (default: the repository's last path component + .wasm).
    #[arg(short, long)]
    output: Option<PathBuf>,
    #[command(flatten)]
    credentials: Credentials,
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
        credentials: Credentials,
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
    let client = RegistryClient::new(&args.reference, args.credentials.token()?.as_deref())?;
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
    let client = RegistryClient::new(&args.reference, args.credentials.token()?.as_deref())?;
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
            let client = RegistryClient::new(&reference, credentials.token()?.as_deref())?;
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
