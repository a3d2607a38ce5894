//! `wharf token create | ls | revoke` and `wharf audit ls`: API tokens and
//! the audit log (both need an admin token).

use anyhow::Result;
use clap::Subcommand;
use wharf_api::control::{CreateTokenRequest, CreatedToken};
use wharf_api::model::{AuditEntry, Role, Token};

use crate::client::{ApiArgs, block, or_dash, segment, show, table, wire};

#[derive(Debug, Subcommand)]
pub(crate) enum TokenCommand {
    /// Create a token; its secret is printed once and never again.
    Create {
        /// A name for people.
        #[arg(long)]
        name: String,
        /// What it may do.
        #[arg(long, value_parser = parse_role)]
        role: Role,
        /// A registry repository it may reach (`team/*` for a prefix;
        /// repeatable; none: all).
        #[arg(long = "repository", value_name = "PATTERN")]
        repositories: Vec<String>,
    },
    /// List tokens (without their secrets).
    Ls,
    /// Revoke a token: it stops working at once.
    Revoke {
        /// The token's id.
        id: String,
    },
}

#[derive(Debug, Subcommand)]
pub(crate) enum AuditCommand {
    /// List mutating API and registry calls, newest first.
    Ls {
        /// At most this many (default 100, at most 1000).
        #[arg(long)]
        limit: Option<u32>,
    },
}

fn parse_role(text: &str) -> Result<Role, String> {
    Role::parse(text).ok_or_else(|| format!("{text:?} is not admin, deployer or reader"))
}

pub(crate) fn main(api: ApiArgs, command: TokenCommand) -> Result<()> {
    let client = api.client()?;
    let output = api.output;
    match command {
        TokenCommand::Create {
            name,
            role,
            repositories,
        } => {
            let request = CreateTokenRequest {
                name,
                role,
                repositories,
            };
            show(
                output,
                client.post("/v1/tokens", request)?,
                |created: CreatedToken| {
                    let mut pairs = pairs(created.token);
                    pairs.push(("secret", created.secret));
                    block(&pairs);
                    eprintln!("wharf: save the secret now: it cannot be shown again");
                },
            )
        }
        TokenCommand::Ls => show(
            output,
            client.get("/v1/tokens", &[])?,
            |tokens: Vec<Token>| {
                let rows = tokens
                    .into_iter()
                    .map(|t| {
                        [
                            t.id,
                            t.name,
                            wire(t.role),
                            repositories(&t.repositories),
                            t.created_at,
                            or_dash(t.revoked_at),
                        ]
                    })
                    .collect();
                table(
                    ["ID", "NAME", "ROLE", "REPOSITORIES", "CREATED", "REVOKED"],
                    rows,
                );
            },
        ),
        TokenCommand::Revoke { id } => show(
            output,
            client.delete(&format!("/v1/tokens/{}", segment(&id)))?,
            describe,
        ),
    }
}

pub(crate) fn audit(api: ApiArgs, command: AuditCommand) -> Result<()> {
    let client = api.client()?;
    match command {
        AuditCommand::Ls { limit } => {
            let query: Vec<_> = limit
                .map(|l| ("limit", l.to_string()))
                .into_iter()
                .collect();
            show(
                api.output,
                client.get("/v1/audit", &query)?,
                |entries: Vec<AuditEntry>| {
                    let rows = entries
                        .into_iter()
                        .map(|e| {
                            [
                                e.id.to_string(),
                                e.at,
                                e.actor,
                                e.token_id,
                                e.method,
                                e.path,
                                e.status.to_string(),
                            ]
                        })
                        .collect();
                    table(
                        ["ID", "AT", "ACTOR", "TOKEN", "METHOD", "PATH", "STATUS"],
                        rows,
                    );
                },
            )
        }
    }
}

fn repositories(patterns: &[String]) -> String {
    if patterns.is_empty() {
        "all".into()
    } else {
        patterns.join(",")
    }
}

fn describe(t: Token) {
    block(&pairs(t));
}

fn pairs(t: Token) -> Vec<(&'static str, String)> {
    vec![
        ("id", t.id),
        ("name", t.name),
        ("role", wire(t.role)),
        ("repositories", repositories(&t.repositories)),
        ("created", t.created_at),
        ("revoked", or_dash(t.revoked_at)),
    ]
}
