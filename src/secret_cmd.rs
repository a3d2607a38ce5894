//! `wharf secret create | ls | rm`: the secret store through the
//! `/v1/secrets` API. Values go in and are never printed or returned.

use std::io::{IsTerminal, Read};
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Subcommand;
use wharf_api::control::CreateSecretRequest;
use wharf_api::model::Secret;

use crate::Output;
use crate::client::{ApiArgs, segment, show, table};

#[derive(Debug, Subcommand)]
pub(crate) enum SecretCommand {
    /// Create or replace a secret. Without --value or --from-file the value
    /// is read from stdin (one trailing newline removed).
    Create {
        /// The secret's name.
        name: String,
        /// The value (visible in the process list: prefer stdin or a file).
        #[arg(long, conflicts_with = "from_file")]
        value: Option<String>,
        /// Read the value from this file, exactly as it is.
        #[arg(long, value_name = "FILE")]
        from_file: Option<PathBuf>,
        /// The repositories whose task definitions may use it (`team/*` or
        /// a name); without it the secret is global (admins only).
        #[arg(long)]
        scope: Option<String>,
    },
    /// List secrets (names only).
    Ls,
    /// Delete a secret.
    Rm {
        /// The secret's name.
        name: String,
    },
}

pub(crate) fn main(api: ApiArgs, command: SecretCommand) -> Result<()> {
    let client = api.client()?;
    let output = api.output;
    match command {
        SecretCommand::Create {
            name,
            value,
            from_file,
            scope,
        } => {
            let value = match (value, from_file) {
                (Some(v), _) => v,
                (None, Some(file)) => std::fs::read_to_string(&file)
                    .with_context(|| format!("cannot read {} as UTF-8 text", file.display()))?,
                (None, None) => read_stdin()?,
            };
            let request = CreateSecretRequest { name, value, scope };
            show(output, client.post("/v1/secrets", request)?, |s: Secret| {
                println!("secret {} stored at {}", s.name, s.updated_at);
            })
        }
        SecretCommand::Ls => show(
            output,
            client.get("/v1/secrets", &[])?,
            |secrets: Vec<Secret>| {
                let rows = secrets
                    .into_iter()
                    .map(|s| [s.name, s.updated_at])
                    .collect();
                table(["NAME", "UPDATED"], rows);
            },
        ),
        SecretCommand::Rm { name } => {
            client.delete(&format!("/v1/secrets/{}", segment(&name)))?;
            // The API answers 204 without a body: nothing to print as JSON.
            if let Output::Text = output {
                println!("secret {name} deleted");
            }
            Ok(())
        }
    }
}

fn read_stdin() -> Result<String> {
    let mut stdin = std::io::stdin();
    if stdin.is_terminal() {
        eprintln!("wharf: type the secret's value, then Ctrl-D");
    }
    let mut value = String::new();
    stdin
        .read_to_string(&mut value)
        .context("cannot read the secret's value from stdin as UTF-8 text")?;
    // `echo value | wharf secret create` should not store the newline.
    let trimmed = value
        .strip_suffix("\r\n")
        .or_else(|| value.strip_suffix('\n'))
        .unwrap_or(&value);
    Ok(trimmed.to_owned())
}
