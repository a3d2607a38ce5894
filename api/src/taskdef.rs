//! Task definition files (TOML or JSON) and run-time overrides: the raw
//! shapes people write, and their validation into checked values. Every
//! error names the field it is about.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::error::{ApiError, Result};
use crate::model::{HttpSettings, TaskKind, TaskLimits};

/// A task definition as written in a file or sent to
/// `POST /v1/taskdefs`. Unknown fields are refused.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TaskDefinitionInput {
    /// Family name: letters, digits, `-` and `_`, up to 255.
    pub family: String,
    /// `repo:tag` or `repo@digest` in the built-in registry, or
    /// `host/repo:tag` of another OCI registry.
    pub artifact: String,
    /// `command` (the default) or `http`.
    #[serde(default)]
    pub kind: Option<String>,
    /// Arguments after the program name.
    #[serde(default)]
    pub args: Vec<String>,
    /// Environment variables.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Environment variable name → secret name.
    #[serde(default)]
    pub secrets: BTreeMap<String, String>,
    /// Limits (for `http`: per request).
    #[serde(default)]
    pub limits: LimitsInput,
    /// How `http` tasks serve.
    #[serde(default)]
    pub http: Option<HttpInput>,
    /// Where tasks may run.
    #[serde(default)]
    pub placement: Option<PlacementInput>,
    /// Free-form labels.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

/// The `[placement]` section as people write it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PlacementInput {
    /// Constraints on node labels: `KEY == VALUE`, `KEY != VALUE`,
    /// `KEY in [V1, V2]`; a task runs only on a node meeting all of them.
    #[serde(default)]
    pub constraints: Vec<String>,
    /// How tasks spread over the nodes that qualify: `spread` (fewest
    /// tasks of the service per node; the default), `spread(LABEL)` (per
    /// value of a label such as `zone` first) or `binpack` (the node with
    /// the least free memory that fits).
    #[serde(default)]
    pub strategy: Option<String>,
}

/// Checks a `[placement]` section (of a definition or a service); the
/// error names the field.
pub(crate) fn check_placement(p: &PlacementInput) -> Result<()> {
    if p.constraints.len() > MAX_CONSTRAINTS {
        return Err(ApiError::invalid(
            "placement.constraints",
            format!("at most {MAX_CONSTRAINTS}"),
        ));
    }
    for c in &p.constraints {
        crate::nodes::Constraint::parse(c)
            .map_err(|e| ApiError::invalid("placement.constraints", e))?;
    }
    if let Some(text) = &p.strategy {
        crate::tasks::Strategy::parse(text)
            .map_err(|e| ApiError::invalid("placement.strategy", e))?;
    }
    Ok(())
}

/// The most placement constraints one definition may have.
pub const MAX_CONSTRAINTS: usize = 16;

/// The `[http]` section as people write it.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct HttpInput {
    /// Requests in flight per task (default 64).
    #[serde(default)]
    pub max_concurrency: Option<u32>,
    /// Time limit per request, e.g. `10s` (default 30s).
    #[serde(default)]
    pub request_timeout: Option<String>,
    /// The largest request body, e.g. `8MiB` (the default).
    #[serde(default)]
    pub max_request_body: Option<Quantity>,
    /// A path that must answer `GET` with 2xx before a task takes traffic.
    #[serde(default)]
    pub health_check: Option<String>,
    /// Outbound destinations: `SCHEME://HOST[:PORT]`, `*` as the port or
    /// `*.` before the host; none by default.
    #[serde(default)]
    pub allowed_outbound_hosts: Vec<String>,
}

/// Requests in flight per HTTP task unless the definition says.
pub const DEFAULT_HTTP_CONCURRENCY: u32 = 64;
/// The most requests one HTTP task may serve at once.
pub const MAX_HTTP_CONCURRENCY: u32 = 4096;
/// An HTTP request's time limit unless the definition says.
pub const DEFAULT_REQUEST_TIMEOUT_MS: u64 = 30_000;
/// The longest request time limit.
pub const MAX_REQUEST_TIMEOUT_MS: u64 = 3_600_000;
/// The largest request body unless the definition says.
pub const DEFAULT_MAX_REQUEST_BODY: u64 = 8 << 20;
/// The largest request body a definition may allow.
pub const MAX_REQUEST_BODY: u64 = 1 << 30;

impl HttpInput {
    fn check(&self) -> Result<HttpSettings> {
        let max_concurrency = self.max_concurrency.unwrap_or(DEFAULT_HTTP_CONCURRENCY);
        if !(1..=MAX_HTTP_CONCURRENCY).contains(&max_concurrency) {
            return Err(ApiError::invalid(
                "http.max_concurrency",
                format!("must be 1 to {MAX_HTTP_CONCURRENCY}"),
            ));
        }
        let request_timeout_ms = match &self.request_timeout {
            None => DEFAULT_REQUEST_TIMEOUT_MS,
            Some(t) => {
                let d = wharf_runtime::parse_duration(t)
                    .map_err(|e| ApiError::invalid("http.request_timeout", e))?;
                let ms = u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
                if !(1..=MAX_REQUEST_TIMEOUT_MS).contains(&ms) {
                    return Err(ApiError::invalid(
                        "http.request_timeout",
                        "must be between 1ms and 1h",
                    ));
                }
                ms
            }
        };
        let max_request_body = match &self.max_request_body {
            None => DEFAULT_MAX_REQUEST_BODY,
            Some(Quantity::Number(n)) => *n,
            Some(Quantity::Text(t)) => wharf_runtime::parse_size(t)
                .map_err(|e| ApiError::invalid("http.max_request_body", e))?,
        };
        if max_request_body > MAX_REQUEST_BODY {
            return Err(ApiError::invalid(
                "http.max_request_body",
                format!("must be at most {MAX_REQUEST_BODY} bytes"),
            ));
        }
        if let Some(path) = &self.health_check
            && (!path.starts_with('/')
                || path.len() > 1024
                || path.parse::<http::uri::PathAndQuery>().is_err())
        {
            return Err(ApiError::invalid(
                "http.health_check",
                format!("{path:?} is not a path such as /healthz"),
            ));
        }
        for host in &self.allowed_outbound_hosts {
            wharf_runtime::OutboundRule::parse(host)
                .map_err(|e| ApiError::invalid("http.allowed_outbound_hosts", e))?;
        }
        Ok(HttpSettings {
            max_concurrency,
            request_timeout_ms,
            max_request_body,
            health_check: self.health_check.clone(),
            allowed_outbound_hosts: self.allowed_outbound_hosts.clone(),
        })
    }
}

/// Limits as people write them.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LimitsInput {
    /// Fuel units.
    #[serde(default)]
    pub fuel: Option<u64>,
    /// Bytes, or a size such as `64MiB`.
    #[serde(default)]
    pub memory: Option<Quantity>,
    /// A duration such as `500ms`, `30s`, `2m`.
    #[serde(default)]
    pub timeout: Option<String>,
}

/// A number, or a string with a unit.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum Quantity {
    /// A plain number of bytes.
    Number(u64),
    /// A size with a unit (`64MiB`).
    Text(String),
}

/// A validated task definition, before the artifact is resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckedDefinition {
    pub(crate) family: String,
    pub(crate) artifact: String,
    pub(crate) kind: TaskKind,
    pub(crate) args: Vec<String>,
    pub(crate) env: BTreeMap<String, String>,
    pub(crate) secrets: BTreeMap<String, String>,
    pub(crate) limits: TaskLimits,
    pub(crate) http: Option<HttpSettings>,
    pub(crate) constraints: Vec<String>,
    pub(crate) strategy: Option<String>,
    pub(crate) labels: BTreeMap<String, String>,
}

/// The longest family or service name (as ECS).
pub const MAX_NAME_LEN: usize = 255;

/// Checks a family or service name.
pub fn check_name(field: &str, name: &str) -> Result<()> {
    if name.is_empty() || name.len() > MAX_NAME_LEN {
        return Err(ApiError::invalid(
            field,
            format!("must be 1 to {MAX_NAME_LEN} characters"),
        ));
    }
    if !name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    {
        return Err(ApiError::invalid(
            field,
            format!("{name:?} may contain only letters, digits, '-' and '_'"),
        ));
    }
    Ok(())
}

fn check_env_name(field: &str, name: &str) -> Result<()> {
    if name.is_empty() || name.contains(['=', '\0']) {
        return Err(ApiError::invalid(
            field,
            format!("{name:?} is not a valid environment variable name"),
        ));
    }
    Ok(())
}

fn check_env(field: &str, env: &BTreeMap<String, String>) -> Result<()> {
    for (name, value) in env {
        check_env_name(field, name)?;
        if value.contains('\0') {
            return Err(ApiError::invalid(
                &format!("{field}.{name}"),
                "must not contain NUL",
            ));
        }
    }
    Ok(())
}

/// Validates limits against the node's maximum memory.
pub fn check_limits(field: &str, input: &LimitsInput, max_memory: u64) -> Result<TaskLimits> {
    let fuel = match input.fuel {
        Some(0) => return Err(ApiError::invalid(&format!("{field}.fuel"), "must be > 0")),
        other => other,
    };
    let memory_bytes = match &input.memory {
        None => None,
        Some(Quantity::Number(n)) => Some(*n),
        Some(Quantity::Text(t)) => Some(
            wharf_runtime::parse_size(t)
                .map_err(|e| ApiError::invalid(&format!("{field}.memory"), e))?,
        ),
    };
    if let Some(m) = memory_bytes
        && (m == 0 || m > max_memory)
    {
        return Err(ApiError::invalid(
            &format!("{field}.memory"),
            format!("must be between 1 byte and this node's maximum of {max_memory} bytes"),
        ));
    }
    let timeout_ms = match &input.timeout {
        None => None,
        Some(t) => {
            let d = wharf_runtime::parse_duration(t)
                .map_err(|e| ApiError::invalid(&format!("{field}.timeout"), e))?;
            if d.is_zero() {
                return Err(ApiError::invalid(
                    &format!("{field}.timeout"),
                    "must be > 0",
                ));
            }
            Some(u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        }
    };
    Ok(TaskLimits {
        fuel,
        memory_bytes,
        timeout_ms,
    })
}

impl TaskDefinitionInput {
    /// Validates every field but the artifact's existence.
    pub fn check(&self, max_memory: u64) -> Result<CheckedDefinition> {
        check_name("family", &self.family)?;
        if self.artifact.trim().is_empty() {
            return Err(ApiError::invalid("artifact", "is required"));
        }
        crate::artifacts::ArtifactRef::parse(&self.artifact)?;
        let kind = match self.kind.as_deref() {
            None | Some("command") => TaskKind::Command,
            Some("http") => TaskKind::Http,
            Some(other) => {
                return Err(ApiError::invalid(
                    "kind",
                    format!("{other:?} is not a task kind: expected \"command\" or \"http\""),
                ));
            }
        };
        let http = match (kind, &self.http) {
            (TaskKind::Http, input) => Some(input.clone().unwrap_or_default().check()?),
            (TaskKind::Command, None) => None,
            (TaskKind::Command, Some(_)) => {
                return Err(ApiError::invalid(
                    "http",
                    "is only for kind = \"http\" task definitions",
                ));
            }
        };
        if kind == TaskKind::Http && self.limits.timeout.is_some() {
            return Err(ApiError::invalid(
                "limits.timeout",
                "an http task serves until it is stopped: set the per-request limit as http.request_timeout",
            ));
        }
        if self.args.iter().any(|a| a.contains('\0')) {
            return Err(ApiError::invalid("args", "must not contain NUL"));
        }
        check_env("env", &self.env)?;
        for (var, secret) in &self.secrets {
            check_env_name("secrets", var)?;
            if self.env.contains_key(var) {
                return Err(ApiError::invalid(
                    &format!("secrets.{var}"),
                    "is also set in env: a variable comes from one place",
                ));
            }
            check_name(&format!("secrets.{var}"), secret)?;
        }
        let limits = check_limits("limits", &self.limits, max_memory)?;
        let constraints = self
            .placement
            .as_ref()
            .map(|p| p.constraints.clone())
            .unwrap_or_default();
        if constraints.len() > MAX_CONSTRAINTS {
            return Err(ApiError::invalid(
                "placement.constraints",
                format!("at most {MAX_CONSTRAINTS}"),
            ));
        }
        for c in &constraints {
            crate::nodes::Constraint::parse(c)
                .map_err(|e| ApiError::invalid("placement.constraints", e))?;
        }
        let strategy = self.placement.as_ref().and_then(|p| p.strategy.clone());
        if let Some(p) = &self.placement {
            check_placement(p)?;
        }
        Ok(CheckedDefinition {
            family: self.family.clone(),
            artifact: self.artifact.trim().to_owned(),
            kind,
            args: self.args.clone(),
            env: self.env.clone(),
            secrets: self.secrets.clone(),
            limits,
            http,
            constraints,
            strategy,
            labels: self.labels.clone(),
        })
    }
}

/// Changes to one run of a task definition.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Overrides {
    /// Replaces the task definition's arguments.
    #[serde(default)]
    pub args: Option<Vec<String>>,
    /// Added to (and overriding) the task definition's environment.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Replaces the named limits.
    #[serde(default)]
    pub limits: LimitsInput,
}

impl Overrides {
    /// Validates and applies the overrides to a definition's values.
    pub fn apply(
        &self,
        args: &mut Vec<String>,
        env: &mut BTreeMap<String, String>,
        limits: &mut TaskLimits,
        max_memory: u64,
    ) -> Result<()> {
        if let Some(a) = &self.args {
            if a.iter().any(|a| a.contains('\0')) {
                return Err(ApiError::invalid("overrides.args", "must not contain NUL"));
            }
            args.clone_from(a);
        }
        check_env("overrides.env", &self.env)?;
        env.extend(self.env.iter().map(|(k, v)| (k.clone(), v.clone())));
        let o = check_limits("overrides.limits", &self.limits, max_memory)?;
        limits.fuel = o.fuel.or(limits.fuel);
        limits.memory_bytes = o.memory_bytes.or(limits.memory_bytes);
        limits.timeout_ms = o.timeout_ms.or(limits.timeout_ms);
        Ok(())
    }
}

/// Parses a task definition file: JSON if it starts with `{`, else TOML.
pub fn parse_file(text: &str) -> std::result::Result<TaskDefinitionInput, String> {
    if text.trim_start().starts_with('{') {
        serde_json::from_str(text).map_err(|e| e.to_string())
    } else {
        toml::from_str(text).map_err(|e| e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAX: u64 = 1 << 30;

    fn input(toml: &str) -> TaskDefinitionInput {
        parse_file(toml).unwrap()
    }

    #[test]
    fn the_issue_example_parses_and_checks() {
        let def = input(
            r#"
family = "hello"
artifact = "team/hello:v1"
kind = "command"
args = ["--name", "x"]

[env]
GREETING = "hi"

[secrets]
DB_PASSWORD = "db-password"

[limits]
fuel = 1_000_000_000
memory = "64MiB"
timeout = "30s"
"#,
        )
        .check(MAX)
        .unwrap();
        assert_eq!(def.family, "hello");
        assert_eq!(def.limits.memory_bytes, Some(64 << 20));
        assert_eq!(def.limits.timeout_ms, Some(30_000));
        assert_eq!(def.limits.fuel, Some(1_000_000_000));
        assert_eq!(def.secrets["DB_PASSWORD"], "db-password");
    }

    fn check_error(toml: &str, field: &str) {
        let err = match parse_file(toml) {
            Err(e) => {
                assert!(e.contains(field), "{e:?} should name {field}");
                return;
            }
            Ok(i) => i.check(MAX).unwrap_err(),
        };
        assert!(
            err.message.starts_with(field),
            "{:?} should start with {field}",
            err.message
        );
    }

    #[test]
    fn errors_name_the_field() {
        check_error("family = \"a b\"\nartifact = \"x:1\"", "family");
        check_error("family = \"a\"\nartifact = \"\"", "artifact");
        check_error(
            "family = \"a\"\nartifact = \"x:1\"\nkind = \"daemon\"",
            "kind",
        );
        check_error(
            "family = \"a\"\nartifact = \"x:1\"\n[limits]\nmemory = \"lots\"",
            "limits.memory",
        );
        check_error(
            "family = \"a\"\nartifact = \"x:1\"\n[limits]\nmemory = \"2GiB\"",
            "limits.memory",
        );
        check_error(
            "family = \"a\"\nartifact = \"x:1\"\n[limits]\ntimeout = \"30\"",
            "limits.timeout",
        );
        check_error(
            "family = \"a\"\nartifact = \"x:1\"\n[limits]\nfuel = 0",
            "limits.fuel",
        );
        check_error("family = \"a\"\nartifact = \"x:1\"\ncolour = 1", "colour");
        check_error(
            "family = \"a\"\nartifact = \"x:1\"\n[env]\nA = \"1\"\n[secrets]\nA = \"s\"",
            "secrets.A",
        );
    }

    #[test]
    fn http_definitions_parse_with_defaults_and_refuse_what_does_not_fit() {
        let def = input(
            r#"
family = "api"
artifact = "team/api:v1"
kind = "http"

[http]
max_concurrency = 64
request_timeout = "10s"
max_request_body = "8MiB"
health_check = "/healthz"
allowed_outbound_hosts = ["http://127.0.0.1:*", "https://api.example.com"]

[limits]
fuel = 50_000_000
memory = "64MiB"
"#,
        )
        .check(MAX)
        .unwrap();
        assert_eq!(def.kind, TaskKind::Http);
        let http = def.http.unwrap();
        assert_eq!(http.request_timeout_ms, 10_000);
        assert_eq!(http.max_request_body, 8 << 20);
        assert_eq!(http.health_check.as_deref(), Some("/healthz"));
        let bare = input("family = \"a\"\nartifact = \"x:1\"\nkind = \"http\"")
            .check(MAX)
            .unwrap();
        let http = bare.http.unwrap();
        assert_eq!(http.max_concurrency, DEFAULT_HTTP_CONCURRENCY);
        assert_eq!(http.request_timeout_ms, DEFAULT_REQUEST_TIMEOUT_MS);
        assert!(http.allowed_outbound_hosts.is_empty());
        check_error(
            "family = \"a\"\nartifact = \"x:1\"\n[http]\nmax_concurrency = 2",
            "http",
        );
        check_error(
            "family = \"a\"\nartifact = \"x:1\"\nkind = \"http\"\n[limits]\ntimeout = \"1s\"",
            "limits.timeout",
        );
        check_error(
            "family = \"a\"\nartifact = \"x:1\"\nkind = \"http\"\n[http]\nrequest_timeout = \"2h\"",
            "http.request_timeout",
        );
    }

    #[test]
    fn overrides_merge() {
        let mut args = vec!["a".to_owned()];
        let mut env = BTreeMap::from([("A".to_owned(), "1".to_owned())]);
        let mut limits = TaskLimits {
            fuel: Some(5),
            memory_bytes: None,
            timeout_ms: Some(1),
        };
        let o = Overrides {
            args: Some(vec!["b".into()]),
            env: BTreeMap::from([("B".to_owned(), "2".to_owned())]),
            limits: LimitsInput {
                fuel: Some(7),
                ..Default::default()
            },
        };
        o.apply(&mut args, &mut env, &mut limits, MAX).unwrap();
        assert_eq!(args, ["b"]);
        assert_eq!(env.len(), 2);
        assert_eq!(limits.fuel, Some(7));
        assert_eq!(limits.timeout_ms, Some(1));
    }
}

/// Property-based fuzzing of task definition files: whatever a client
/// sends, parsing and checking answer with an error naming a field, never
/// a panic. A failure proptest finds is saved under
/// `proptest-regressions/` and replayed first from then on.
#[cfg(test)]
mod fuzz {
    use proptest::prelude::*;

    use super::*;

    /// Keys and values near the real ones, in TOML or JSON.
    fn file() -> impl Strategy<Value = String> {
        let value = prop_oneof![
            "\\PC{0,24}".prop_map(|s| format!("{s:?}")),
            any::<i64>().prop_map(|n| n.to_string()),
            Just("\"64MiB\"".to_owned()),
            Just("\"18446744073709551615GiB\"".to_owned()),
            Just("\"1.5s\"".to_owned()),
            Just("\"-1ms\"".to_owned()),
            Just("[\"a\", 1]".to_owned()),
            Just("{}".to_owned()),
        ];
        let key = prop_oneof![
            Just("family"),
            Just("artifact"),
            Just("kind"),
            Just("args"),
            Just("fuel"),
            Just("memory"),
            Just("timeout"),
            Just("unknown"),
        ];
        let section = prop_oneof![
            Just(""),
            Just("[limits]\n"),
            Just("[env]\n"),
            Just("[secrets]\n")
        ];
        prop::collection::vec((section, key, value), 0..10).prop_map(|lines| {
            lines
                .into_iter()
                .map(|(s, k, v)| format!("{s}{k} = {v}\n"))
                .collect()
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2_000))]

        #[test]
        fn task_definition_files_parse_and_check_without_panicking(
            toml in file(),
            json in "\\{\\PC{0,120}",
            raw in "\\PC{0,200}",
        ) {
            for text in [&toml, &json, &raw] {
                if let Ok(input) = parse_file(text)
                    && let Err(e) = input.check(1 << 30)
                {
                    prop_assert!(!e.message.is_empty());
                }
            }
        }
    }
}
