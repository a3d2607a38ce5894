//! A small blocking client for the control plane's `/v1/` API, shared by
//! the client commands (`wharf taskdef`, `task`, `service`, `secret`,
//! `token`, `audit`), and the two ways they print what it answers.
//!
//! Answers stay `serde_json::Value`s until they are printed, so
//! `--output json` prints exactly the API's JSON; text mode decodes them
//! into the API's own model types.

use std::io::BufRead;
use std::time::Duration;

use anyhow::{Context, Result, anyhow};
use clap::Args;
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::Output;
use crate::image::Credentials;

/// How long to wait for a connection to the server. Reads have no timeout:
/// a followed log or a wait for a task to stop may be silent for long.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Where the server is, who is asking, and how to print. Global, so it may
/// come before or after the subcommand.
#[derive(Debug, Args)]
#[command(next_help_heading = "Server options")]
pub(crate) struct ApiArgs {
    /// The Wharf server's URL.
    #[arg(
        long,
        global = true,
        env = "WHARF_SERVER",
        default_value = "http://127.0.0.1:7070"
    )]
    server: String,
    #[command(flatten)]
    credentials: Credentials,
    /// The CA certificate (PEM) to trust for an `https://` server, such as
    /// the server's `DATA_DIR/tls/ca.pem` with `--tls auto`.
    #[arg(long, global = true, env = "WHARF_CA_CERT")]
    ca_cert: Option<std::path::PathBuf>,
    /// Output format: aligned text for people, the API's JSON for scripts.
    #[arg(long, global = true, value_enum, default_value = "text")]
    pub(crate) output: Output,
}

impl ApiArgs {
    /// The server's URL.
    pub(crate) fn server(&self) -> &str {
        &self.server
    }

    /// `--token` as given (no fallback to the local admin token).
    pub(crate) fn explicit_token(&self) -> Option<String> {
        self.credentials.explicit_token()
    }

    /// `--data-dir` as given.
    pub(crate) fn data_dir_flag(&self) -> Option<std::path::PathBuf> {
        self.credentials.data_dir_flag()
    }

    pub(crate) fn client(&self) -> Result<Client> {
        let mut agent = ureq::AgentBuilder::new().timeout_connect(CONNECT_TIMEOUT);
        if let Some(path) = &self.ca_cert {
            let pem = std::fs::read_to_string(path)
                .with_context(|| format!("cannot read --ca-cert {}", path.display()))?;
            agent = agent.tls_config(
                crate::tls::client_trusting(&pem)
                    .with_context(|| format!("--ca-cert {}", path.display()))?,
            );
        }
        Ok(Client {
            base: self.server.trim_end_matches('/').to_owned(),
            token: self.credentials.token()?,
            agent: agent.build(),
        })
    }
}

/// A connection to one server with one token.
pub(crate) struct Client {
    base: String,
    token: Option<String>,
    agent: ureq::Agent,
}

impl Client {
    fn request(&self, method: &str, path: &str, query: &[(&str, String)]) -> ureq::Request {
        let mut req = self.agent.request(method, &format!("{}{path}", self.base));
        for (key, value) in query {
            req = req.query(key, value);
        }
        match &self.token {
            Some(token) => req.set("Authorization", &format!("Bearer {token}")),
            None => req,
        }
    }

    /// Sends the request and turns an error answer into `CODE: message`.
    fn send(&self, req: ureq::Request, body: Option<&Value>) -> Result<ureq::Response> {
        let result = match body {
            Some(body) => req.send_json(body),
            None => req.call(),
        };
        match result {
            Ok(response) => Ok(response),
            Err(ureq::Error::Status(status, response)) => Err(api_error(status, response)),
            Err(e) => Err(anyhow!(
                "cannot reach the Wharf server at {} (set --server or WHARF_SERVER): {e}",
                self.base
            )),
        }
    }

    fn json(&self, req: ureq::Request, body: Option<&Value>) -> Result<Value> {
        let response = self.send(req, body)?;
        if response.status() == 204 {
            return Ok(Value::Null);
        }
        serde_json::from_reader(response.into_reader()).context("the server's answer is not JSON")
    }

    /// `GET path?query`.
    pub(crate) fn get(&self, path: &str, query: &[(&str, String)]) -> Result<Value> {
        self.json(self.request("GET", path, query), None)
    }

    /// `POST path` with a JSON body.
    pub(crate) fn post(&self, path: &str, body: impl serde::Serialize) -> Result<Value> {
        let body = serde_json::to_value(body)?;
        self.json(self.request("POST", path, &[]), Some(&body))
    }

    /// `POST path?query` without a body.
    pub(crate) fn post_empty(&self, path: &str, query: &[(&str, String)]) -> Result<Value> {
        self.json(self.request("POST", path, query), None)
    }

    /// `PATCH path` with a JSON body.
    pub(crate) fn patch(&self, path: &str, body: impl serde::Serialize) -> Result<Value> {
        let body = serde_json::to_value(body)?;
        self.json(self.request("PATCH", path, &[]), Some(&body))
    }

    /// `DELETE path`; `Null` when the answer has no body.
    pub(crate) fn delete(&self, path: &str) -> Result<Value> {
        self.json(self.request("DELETE", path, &[]), None)
    }

    /// `GET path?query`, read line by line as the server writes them.
    pub(crate) fn lines(
        &self,
        path: &str,
        query: &[(&str, String)],
    ) -> Result<impl Iterator<Item = std::io::Result<String>>> {
        let response = self.send(self.request("GET", path, query), None)?;
        Ok(std::io::BufReader::new(response.into_reader()).lines())
    }
}

/// An error answer as the user reads it: the API's `{code, message}` as
/// `CODE: message`, anything else with its HTTP status.
fn api_error(status: u16, response: ureq::Response) -> anyhow::Error {
    let text = response.into_string().unwrap_or_default();
    match serde_json::from_str::<Value>(&text) {
        Ok(Value::Object(body)) if body.contains_key("code") => anyhow!(
            "{}: {}",
            body["code"].as_str().unwrap_or("Error"),
            body["message"].as_str().unwrap_or_default()
        ),
        _ => anyhow!("the server answered HTTP {status}: {}", text.trim()),
    }
}

/// `text` escaped for one path segment of a URL.
pub(crate) fn segment(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for b in text.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~:".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Prints an answer: as the API's JSON, or decoded into `T` for `text`.
pub(crate) fn show<T: DeserializeOwned>(
    output: Output,
    answer: Value,
    text: impl FnOnce(T),
) -> Result<()> {
    match output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&answer)?),
        Output::Text => text(decode(answer)?),
    }
    Ok(())
}

/// Decodes an answer into one of the API's model types.
pub(crate) fn decode<T: DeserializeOwned>(answer: Value) -> Result<T> {
    serde_json::from_value(answer).context("unexpected answer from the server")
}

/// Prints an aligned table with a header row (like `docker ps`).
pub(crate) fn table<const N: usize>(headers: [&str; N], rows: Vec<[String; N]>) {
    let mut widths = headers.map(str::len);
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: [&str; N]| {
        let mut out = String::new();
        for (i, (cell, w)) in cells.iter().zip(widths).enumerate() {
            if i + 1 == N {
                out.push_str(cell);
            } else {
                out.push_str(&format!("{cell:<w$}   "));
            }
        }
        println!("{}", out.trim_end());
    };
    line(headers);
    for row in &rows {
        line(row.each_ref().map(String::as_str));
    }
}

/// Prints `key: value` lines with the values aligned (`-` for empty).
pub(crate) fn block(pairs: &[(&str, String)]) {
    let width = pairs.iter().map(|(k, _)| k.len() + 1).max().unwrap_or(0);
    for (key, value) in pairs {
        let value = if value.is_empty() { "-" } else { value };
        println!("{:<width$} {value}", format!("{key}:"));
    }
}

/// An enum as the API spells it (`RUNNING`, `reader`, `IN_PROGRESS`).
pub(crate) fn wire(value: impl serde::Serialize) -> String {
    match serde_json::to_value(value) {
        Ok(Value::String(s)) => s,
        Ok(other) => other.to_string(),
        Err(_) => "?".into(),
    }
}

/// An optional value, or `-`.
pub(crate) fn or_dash<T: ToString>(value: Option<T>) -> String {
    value.map_or_else(|| "-".into(), |v| v.to_string())
}
