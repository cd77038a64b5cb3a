//! The gateway's TOML configuration: one file, parsed strictly, validated at start.
//!
//! - Every table rejects unknown keys (`deny_unknown_fields`), so a typo fails the start
//!   instead of being silently ignored.
//! - Parse errors come from `toml`, whose message names the line and column. Validation
//!   errors (a fallback chain naming a provider that does not exist, a zero limit, …) name
//!   the line of the offending value too, through [`toml::Spanned`].
//! - Secrets are never in the file: providers name the environment variable that holds
//!   their key (`api_key_env = "OPENAI_API_KEY"`) and secret header values
//!   (`headers_env`), client keys are given as an env var name or as a BLAKE3 hash, the
//!   `/metrics` token as an env var name. Resolved secrets live in [`Secret`], whose `Debug` is redacted.
//! - Relative paths (SQLite file, JSON Schema files) are resolved against the directory of
//!   the config file, so `--config examples/proxy/demo.toml` works from any directory.
//!
//! ```
//! use llm_tower_proxy::config::Config;
//!
//! let cfg = Config::parse(
//!     r#"
//!     [server]
//!     listen = "127.0.0.1:0"
//!
//!     [providers.sim]
//!     kind = "simulated"
//!
//!     [chains.default]
//!     steps = [{ provider = "sim", model = "sim-small" }]
//!
//!     [routing]
//!     default_chain = "default"
//!     "#,
//!     std::path::Path::new("."),
//! )
//! .unwrap();
//! assert_eq!(cfg.chains["default"].get_ref().steps.len(), 1);
//!
//! // A typo is rejected, and the error names the line.
//! let err = Config::parse("[server]\nlisten = \"127.0.0.1:0\"\nlisen = 1\n", std::path::Path::new("."))
//!     .unwrap_err();
//! assert!(err.to_string().contains("line 3"), "{err}");
//! ```

mod check;
mod schema;
mod secrets;

use std::fmt;
use std::net::SocketAddr;
use std::ops::Range;
use std::path::{Path, PathBuf};

pub use schema::*;
pub use secrets::*;

/// A configuration error. Its `Display` names the file and the line, never a secret.
#[derive(Debug)]
pub enum ConfigError {
    /// The file could not be read.
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The TOML is malformed, has an unknown key or a value of the wrong type.
    Parse {
        /// The file (or `<inline>`).
        path: PathBuf,
        /// `toml`'s message, which names the line and column.
        message: String,
    },
    /// A value is well-formed but invalid (a reference to something undefined, a zero limit…).
    Invalid {
        /// The file (or `<inline>`).
        path: PathBuf,
        /// The 1-based line of the offending value, when known.
        line: Option<usize>,
        /// What is wrong.
        message: String,
    },
    /// A required environment variable is unset or empty (only its NAME is reported).
    MissingEnv {
        /// The variable's name.
        var: String,
        /// What needs it.
        needed_by: String,
    },
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConfigError::Io { path, source } => {
                write!(f, "cannot read config {}: {source}", path.display())
            }
            ConfigError::Parse { path, message } => {
                write!(
                    f,
                    "invalid config {}: {}",
                    path.display(),
                    message.trim_end()
                )
            }
            ConfigError::Invalid {
                path,
                line: Some(line),
                message,
            } => write!(
                f,
                "invalid config {}, line {line}: {message}",
                path.display()
            ),
            ConfigError::Invalid {
                path,
                line: None,
                message,
            } => write!(f, "invalid config {}: {message}", path.display()),
            ConfigError::MissingEnv { var, needed_by } => write!(
                f,
                "environment variable {var} is not set (needed by {needed_by})"
            ),
        }
    }
}

impl std::error::Error for ConfigError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            ConfigError::Io { source, .. } => Some(source),
            _ => None,
        }
    }
}

/// Maps byte offsets of the source to 1-based lines.
struct Lines<'a>(&'a str);

impl Lines<'_> {
    fn line(&self, span: &Range<usize>) -> Option<usize> {
        if span.start == 0 && span.end == 0 {
            return None; // a default value: not in the file
        }
        let upto = self.0.get(..span.start)?;
        Some(upto.bytes().filter(|b| *b == b'\n').count() + 1)
    }
}

impl Config {
    /// Reads, parses and validates a config file.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self, ConfigError> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let base = path
            .parent()
            .map_or_else(|| PathBuf::from("."), Path::to_path_buf);
        let base = if base.as_os_str().is_empty() {
            PathBuf::from(".")
        } else {
            base
        };
        Self::parse_named(&text, &base, path)
    }

    /// Parses and validates config text; relative paths resolve against `base_dir`.
    pub fn parse(text: &str, base_dir: &Path) -> Result<Self, ConfigError> {
        Self::parse_named(text, base_dir, Path::new("<inline>"))
    }

    fn parse_named(text: &str, base_dir: &Path, path: &Path) -> Result<Self, ConfigError> {
        let mut cfg: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        cfg.base_dir = base_dir.to_path_buf();
        cfg.source_path = path.to_path_buf();
        cfg.validate(&Lines(text))?;
        Ok(cfg)
    }

    /// Resolves a path from the file against the config file's directory.
    pub fn resolve_path(&self, p: &Path) -> PathBuf {
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            self.base_dir.join(p)
        }
    }

    /// The listen address (validated at load).
    pub fn listen_addr(&self) -> SocketAddr {
        // Validated in `validate`; the fallback is unreachable in practice.
        self.server
            .listen
            .get_ref()
            .parse()
            .unwrap_or_else(|_| SocketAddr::from(([127, 0, 0, 1], 8080)))
    }

    /// The rule of the validator of `task`, built (its JSON Schema compiled) when the file
    /// was checked.
    pub fn validator_rule(&self, task: &str) -> Option<&llm_tower::validate::Rule> {
        self.validator_rules.get(task)
    }

    /// The JSON Schema of a validator, read from its inline value or its file.
    pub fn validator_schema(
        &self,
        v: &ValidatorConfig,
    ) -> Result<Option<serde_json::Value>, ConfigError> {
        if let Some(inline) = &v.schema {
            return Ok(Some(match inline {
                toml::Value::String(s) => serde_json::from_str(s)
                    .map_err(|e| self.invalid(None, format!("schema is not JSON: {e}")))?,
                other => serde_json::to_value(other)
                    .map_err(|e| self.invalid(None, format!("schema: {e}")))?,
            }));
        }
        if let Some(file) = &v.schema_file {
            let path = self.resolve_path(file);
            let text = std::fs::read_to_string(&path).map_err(|source| ConfigError::Io {
                path: path.clone(),
                source,
            })?;
            let value = serde_json::from_str(&text).map_err(|e| {
                self.invalid(
                    None,
                    format!("schema file {} is not JSON: {e}", path.display()),
                )
            })?;
            return Ok(Some(value));
        }
        Ok(None)
    }

    fn invalid(&self, line: Option<usize>, message: impl Into<String>) -> ConfigError {
        ConfigError::Invalid {
            path: self.source_path.clone(),
            line,
            message: message.into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: &str = r#"
[providers.sim]
kind = "simulated"

[chains.main]
steps = [{ provider = "sim" }]

[routing]
default_chain = "main"
"#;

    fn parse(s: &str) -> Result<Config, ConfigError> {
        Config::parse(s, Path::new("."))
    }

    #[test]
    fn minimal_config_has_defaults() {
        let c = parse(MIN).unwrap();
        assert_eq!(c.listen_addr().to_string(), "127.0.0.1:8080");
        assert_eq!(*c.server.body_limit_bytes.get_ref(), 1024 * 1024);
        assert!(c.cache.enabled);
        assert_eq!(*c.jobs.store.get_ref(), JobsStoreKind::Sqlite);
        assert_eq!(
            c.upstream.limits(),
            llm_tower_providers::ResponseLimits::default()
        );
        assert_eq!(
            c.upstream.http(),
            llm_tower_providers::HttpClientConfig::default()
        );
    }

    #[test]
    fn responses_keys_are_read_and_checked() {
        let c = parse(MIN).unwrap();
        assert!(c.responses.store);
        assert_eq!(c.responses.retention_secs, 30 * 24 * 3600);
        let c = parse(&format!(
            "{MIN}\n[responses]\nretention_secs = 3600\nmemory_capacity = 10\n"
        ))
        .unwrap();
        assert_eq!(
            (c.responses.retention_secs, c.responses.memory_capacity),
            (3600, 10)
        );
        let e = parse(&format!("{MIN}\n[responses]\nretention_secs = 1\n")).unwrap_err();
        assert!(e.to_string().contains("responses.retention_secs"), "{e}");
        // `responses` is a flag of OpenAI-compatible providers only.
        let text = MIN.replace(
            "kind = \"simulated\"",
            "kind = \"simulated\"\nresponses = true",
        );
        let e = parse(&text).unwrap_err();
        assert!(e.to_string().contains("responses applies only"), "{e}");
    }

    #[test]
    fn upstream_limits_are_read_and_checked() {
        let c = parse(&format!(
            "[upstream]\nmax_body_bytes = 1024\nmax_response_headers = 50\nhttp2_only = true\n{MIN}"
        ))
        .unwrap();
        assert_eq!(c.upstream.limits().max_body_bytes, 1024);
        assert_eq!(c.upstream.http().max_response_headers, 50);
        assert!(c.upstream.http().http2_only);
        let e = parse(&format!("[upstream]\nmax_sse_event_bytes = 0\n{MIN}")).unwrap_err();
        assert!(
            e.to_string().contains("upstream.max_sse_event_bytes"),
            "{e}"
        );
        let e = parse(&format!("[upstream]\nmax_body = 1\n{MIN}")).unwrap_err();
        assert!(e.to_string().contains("max_body"), "{e}");
    }

    #[test]
    fn breaker_and_cache_limits_parse_and_the_ratio_is_checked() {
        let text = MIN.replace(
            "steps = [{ provider = \"sim\" }]",
            "steps = [{ provider = \"sim\" }]\nbreaker_min_calls = 10\nbreaker_failure_ratio = 0.8\nbreaker_window_secs = 30\nmax_cooldown_secs = 120",
        ) + "\n[cache]\ncoalesce_timeout_ms = 5000\nmax_stream_bytes = 1048576\n";
        let c = parse(&text).unwrap();
        let chain = c.chains["main"].get_ref();
        assert_eq!(chain.breaker_min_calls, Some(10));
        assert_eq!(chain.breaker_failure_ratio, Some(0.8));
        assert_eq!(chain.max_cooldown_secs, Some(120));
        assert_eq!(c.cache.coalesce_timeout_ms, Some(5000));
        assert_eq!(c.cache.max_stream_bytes, Some(1 << 20));
        let bad = text.replace("breaker_failure_ratio = 0.8", "breaker_failure_ratio = 1.5");
        let e = parse(&bad).unwrap_err().to_string();
        assert!(e.contains("breaker_failure_ratio"), "{e}");
    }

    #[test]
    fn provider_limits_alone_use_the_rate_limit_redis() {
        let text = MIN.replace(
            "kind = \"simulated\"",
            "kind = \"simulated\"\nrate_limit = { min_remaining_requests = 2 }",
        ) + "\n[rate_limits]\nstore = \"redis\"\nredis_url_env = \"R_URL\"\n";
        let c = parse(&text).unwrap();
        assert_eq!(c.rate_limits.headroom_refresh_ms, 100);
        let secrets = c
            .resolve_secrets(|k: &str| (k == "R_URL").then(|| "redis://h:1".to_owned()))
            .unwrap();
        assert_eq!(
            secrets.rate_limit_redis_url.as_ref().map(Secret::expose),
            Some("redis://h:1")
        );
        for bad in ["5", "60001"] {
            let e = parse(&format!("{text}headroom_refresh_ms = {bad}\n"))
                .unwrap_err()
                .to_string();
            assert!(e.contains("headroom_refresh_ms"), "{e}");
        }
        let ok = parse(&format!("{text}headroom_refresh_ms = 250\n")).unwrap();
        assert_eq!(ok.rate_limits.headroom_refresh_ms, 250);
    }

    #[test]
    fn unknown_key_is_rejected_with_its_line() {
        let text = format!("{MIN}\n[cache]\nttl_sec = 5\n");
        let e = parse(&text).unwrap_err().to_string();
        assert!(e.contains("line 12"), "{e}");
        assert!(e.contains("ttl_sec"), "{e}");
    }

    #[test]
    fn wrong_type_is_rejected_with_its_line() {
        let e = parse("[server]\nlisten = 8080\n").unwrap_err().to_string();
        assert!(e.contains("line 2"), "{e}");
    }

    #[test]
    fn undefined_provider_in_chain_names_the_line() {
        let text = MIN.replace(
            "steps = [{ provider = \"sim\" }]",
            "steps = [\n  { provider = \"sim\" },\n  { provider = \"nope\" },\n]",
        );
        let e = parse(&text).unwrap_err().to_string();
        assert!(e.contains("\"nope\""), "{e}");
        assert!(e.contains("line 8"), "{e}");
    }

    const GROUP: &str = r#"
[providers.a]
kind = "simulated"

[providers.b]
kind = "simulated"

[chains.main]
steps = [
  { group = ["a", { provider = "b", model = "m-b" }], model = "m", pick = "round_robin" },
  { provider = "a" },
]

[chains.main.hedge]
budget_percent = 2.5

[routing]
default_chain = "main"
"#;

    #[test]
    fn balanced_group_and_hedge_parse() {
        let c = parse(GROUP).unwrap();
        let chain = c.chains["main"].get_ref();
        let step = chain.steps[0].get_ref();
        assert_eq!(step.group.len(), 2);
        assert_eq!(step.group[1].model(), Some("m-b"));
        assert_eq!(step.pick, Some(GroupPick::RoundRobin));
        assert_eq!(step.models().collect::<Vec<_>>(), ["m", "m-b"]);
        let h = chain.hedge.as_ref().unwrap().get_ref();
        assert_eq!((h.budget_percent, h.delay_ms), (Some(2.5), None));
        assert!(
            parse(MIN).unwrap().chains["main"].get_ref().hedge.is_none(),
            "off by default"
        );
    }

    #[test]
    fn bad_groups_and_hedges_name_their_line() {
        let cases = [
            (
                r#"{ group = ["a", { provider = "b", model = "m-b" }], model = "m", pick = "round_robin" }"#,
                r#"{ group = ["a", "nope"] }"#,
                "\"nope\" is not a defined provider",
                "line 10",
            ),
            (
                r#"{ group = ["a", { provider = "b", model = "m-b" }], model = "m", pick = "round_robin" }"#,
                r#"{ group = ["a"] }"#,
                "at least two members",
                "line 10",
            ),
            (
                r#"{ group = ["a", { provider = "b", model = "m-b" }], model = "m", pick = "round_robin" }"#,
                r#"{ group = ["a", "a"] }"#,
                "named twice",
                "line 10",
            ),
            (
                r#"{ group = ["a", { provider = "b", model = "m-b" }], model = "m", pick = "round_robin" }"#,
                r#"{ provider = "a", group = ["a", "b"] }"#,
                "not both",
                "line 10",
            ),
            (
                r#"{ group = ["a", { provider = "b", model = "m-b" }], model = "m", pick = "round_robin" }"#,
                r#"{ group = ["a", "b"], pick = "random" }"#,
                "unknown variant",
                "line 10",
            ),
            (
                "budget_percent = 2.5",
                "budget_percent = 0",
                "budget_percent",
                "line 14",
            ),
            (
                "budget_percent = 2.5",
                "delay_ms = 0",
                "delay_ms must be > 0",
                "line 14",
            ),
            (
                "budget_percent = 2.5",
                "percentile = 101",
                "percentile",
                "line 14",
            ),
            (
                "budget_percent = 2.5",
                "delay_ms = 500\npercentile = 90",
                "do not apply",
                "line 14",
            ),
            (
                "budget_percent = 2.5",
                "delay = 5",
                "unknown field",
                "line 15",
            ),
        ];
        for (from, to, want, line) in cases {
            let text = GROUP.replace(from, to);
            let e = match parse(&text) {
                Ok(_) => panic!("accepted: {to}"),
                Err(e) => e.to_string(),
            };
            assert!(e.contains(want), "{to}: {e}");
            assert!(e.contains(line), "{to}: {e}");
        }
    }

    #[test]
    fn undefined_chain_in_route_is_rejected() {
        let text = format!("{MIN}\n[routing.tasks]\nclassify = \"cheap\"\n");
        let text = text.replacen("[routing]\ndefault_chain = \"main\"\n", "", 1);
        let text = text.replace(
            "[routing.tasks]",
            "[routing]\ndefault_chain = \"main\"\n[routing.tasks]",
        );
        let e = parse(&text).unwrap_err().to_string();
        assert!(e.contains("\"cheap\""), "{e}");
        assert!(e.contains("line"), "{e}");
    }

    #[test]
    fn cache_write_price_is_read() {
        let text = format!(
            "{MIN}\n[prices.claude]\ninput_per_mtok = 3.0\noutput_per_mtok = 15.0\n\
             cached_input_per_mtok = 0.3\ncache_write_input_per_mtok = 3.75\n\
             [prices.gpt]\ninput_per_mtok = 2.5\noutput_per_mtok = 10.0\n"
        );
        let cfg = parse(&text).unwrap();
        let claude = cfg.prices["claude"].get_ref().model_price().unwrap();
        assert_eq!(claude.cache_write_input, 3_750_000);
        // No write price: the input price (OpenAI has none).
        let gpt = cfg.prices["gpt"].get_ref().model_price().unwrap();
        assert_eq!(gpt.cache_write_input, gpt.input);
        let bad = format!(
            "{MIN}\n[prices.m]\ninput_per_mtok = 1.0\noutput_per_mtok = 1.0\n\
             cache_write_input_per_mtok = -1.0\n"
        );
        assert!(parse(&bad).unwrap_err().to_string().contains("prices"));
    }

    #[test]
    fn bad_values_are_rejected() {
        let cases = [
            ("[server]\nlisten = \"localhost\"\n", "server.listen"),
            ("[server]\nbody_limit_bytes = 0\n", "body_limit_bytes"),
            ("[cache]\nstore = \"redis\"\n", "redis_url_env"),
            ("[jobs]\nstore = \"postgres\"\n", "url_env"),
            (
                "[[rate_limits.rules]]\nkey = \"tenant\"\n",
                "requests_per_minute",
            ),
            (
                "[[budgets.limits]]\nscope = \"tenant\"\nusd = -1.0\nper = \"day\"\n",
                "usd",
            ),
            (
                "[prices.m]\ninput_per_mtok = -1.0\noutput_per_mtok = 1.0\n",
                "prices",
            ),
            (
                "[[auth.keys]]\ntenant = \"a\"\nkey_blake3 = \"abc\"\n",
                "64 hex",
            ),
            (
                "[[auth.keys]]\ntenant = \"a\"\nkey_env = \"sk-live-123\"\n",
                "NAME of an environment variable",
            ),
            ("[validators.x]\nkind = \"json_schema\"\n", "exactly one"),
            (
                "[validators.x]\nkind = \"json_schema\"\nschema = { type = 12 }\n",
                "invalid JSON Schema",
            ),
        ];
        for (extra, want) in cases {
            let text = format!("{extra}\n{MIN}");
            let e = match parse(&text) {
                Ok(_) => panic!("accepted: {extra}"),
                Err(e) => e.to_string(),
            };
            assert!(e.contains(want), "{extra}: {e}");
            assert!(
                e.contains("line") || matches!(want, "prices"),
                "{extra}: {e}"
            );
        }
    }

    #[test]
    fn hardening_keys_have_defaults_and_are_checked() {
        let c = parse(MIN).unwrap();
        let s = &c.server;
        assert_eq!(
            (
                s.header_read_timeout_secs,
                s.body_read_timeout_secs,
                s.idle_timeout_secs,
                s.max_connections
            ),
            (10, 30, 60, 4096)
        );
        assert!(s.metrics_listen.is_none() && s.metrics_token_env.is_none());
        let j = &c.jobs;
        assert_eq!(
            (
                j.max_priority,
                j.max_attempts,
                j.max_backoff_ms,
                j.max_queued_per_tenant
            ),
            (0, 10, 300_000, 1000)
        );
        for (extra, want) in [
            ("[server]\nidle_timeout_secs = 0\n", "idle_timeout_secs"),
            (
                "[server]\nbody_read_timeout_secs = 0\n",
                "body_read_timeout_secs",
            ),
            ("[server]\nmax_connections = 0\n", "max_connections"),
            ("[server]\nmetrics_listen = \"nope\"\n", "line 2"),
            ("[server]\nmetrics_token_env = \"tok-123\"\n", "NAME of"),
            (
                "[jobs]\nmax_queued_per_tenant = 0\n",
                "max_queued_per_tenant",
            ),
        ] {
            let e = parse(&format!("{extra}{MIN}")).unwrap_err().to_string();
            assert!(e.contains(want), "{extra}: {e}");
        }
        // A secret header value names its env var; a value pasted there is refused
        // without being echoed.
        let provider = |tables: &str| {
            format!(
                "[providers.oa]\nkind = \"openai\"\n{tables}\n[chains.main]\n\
                 steps = [{{ provider = \"oa\" }}]\n[routing]\ndefault_chain = \"main\"\n"
            )
        };
        let e = parse(&provider(r#"headers_env = { "X-Token" = "sk-live-123" }"#))
            .unwrap_err()
            .to_string();
        assert!(e.contains("NAME of") && !e.contains("sk-live-123"), "{e}");
        let both =
            provider("headers = { \"x-token\" = \"a\" }\nheaders_env = { \"X-Token\" = \"TOK\" }");
        assert!(parse(&both).unwrap_err().to_string().contains("both"));
        let c = parse(&provider(r#"headers_env = { "X-Token" = "TOK" }"#)).unwrap();
        let missing = c.resolve_secrets(|_| None).unwrap_err().to_string();
        assert!(
            missing.contains("TOK") && missing.contains("X-Token"),
            "{missing}"
        );
        let s = c
            .resolve_secrets(|k| (k == "TOK").then(|| "header-secret".to_owned()))
            .unwrap();
        assert_eq!(
            s.provider_headers["oa"]["X-Token"].expose(),
            "header-secret"
        );
        assert!(!format!("{s:?}").contains("header-secret"));
    }

    #[test]
    fn shadow_tables_are_read_and_checked() {
        let c = parse(&format!(
            "{MIN}\n[shadow.classify]\nchain = \"main\"\nsample_rate = 0.25\nbudget_usd = 2.5\nseed = 3\n"
        ))
        .unwrap();
        let s = c.shadow["classify"].get_ref();
        assert_eq!(
            (s.sample_rate, s.budget_usd, s.seed),
            (0.25, Some(2.5), Some(3))
        );
        assert_eq!((s.max_in_flight, s.timeout_ms), (4, 60_000));
        for (bad, needle) in [
            ("chain = \"nope\"", "\"nope\" is not a defined chain"),
            ("chain = \"main\"\nsample_rate = 1.5", "sample_rate"),
            ("chain = \"main\"\nbudget_usd = -1.0", "budget_usd"),
            ("chain = \"main\"\nmax_in_flight = 0", "max_in_flight"),
            ("chain = \"main\"\ntimeout_ms = 0", "timeout_ms"),
            ("chain = \"main\"\nrate = 1", "rate"),
        ] {
            let e = parse(&format!("{MIN}\n[shadow.classify]\n{bad}\n")).unwrap_err();
            assert!(e.to_string().contains(needle), "{bad}: {e}");
        }
        let e = parse(&MIN.replace(
            "kind = \"simulated\"",
            "kind = \"simulated\"\nsimulated = { invalid_json_rate = 2.0 }",
        ))
        .unwrap_err();
        assert!(e.to_string().contains("invalid_json_rate"), "{e}");
    }

    #[test]
    fn simulated_provider_takes_no_key() {
        let text = MIN.replace(
            "kind = \"simulated\"",
            "kind = \"simulated\"\napi_key_env = \"X\"",
        );
        assert!(parse(&text).unwrap_err().to_string().contains("simulated"));
    }

    #[test]
    fn secrets_come_from_env_and_are_redacted() {
        let text = r#"
[providers.oa]
kind = "openai"
api_key_env = "OA_KEY"
[chains.main]
steps = [{ provider = "oa", model = "gpt-4o-mini" }]
[routing]
default_chain = "main"
[[auth.keys]]
tenant = "acme"
key_env = "ACME_KEY"
"#;
        let c = parse(text).unwrap();
        let missing = c.resolve_secrets(|_| None).unwrap_err().to_string();
        assert!(missing.contains("OA_KEY"), "{missing}");
        let s = c
            .resolve_secrets(|k| match k {
                "OA_KEY" => Some("sk-very-secret".into()),
                "ACME_KEY" => Some("client-secret".into()),
                _ => None,
            })
            .unwrap();
        assert_eq!(s.provider_keys["oa"].expose(), "sk-very-secret");
        assert_eq!(s.client_keys[0].blake3, blake3_hex("client-secret"));
        let dbg = format!("{s:?} {c:?}");
        assert!(!dbg.contains("sk-very-secret"), "{dbg}");
        assert!(!dbg.contains("client-secret"), "{dbg}");
    }

    #[test]
    fn shipped_configs_are_valid() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR"));
        for f in ["demo.toml", "production.toml", "bench.toml"] {
            let path = dir.join(f);
            if f == "bench.toml" && !path.exists() {
                continue;
            }
            Config::from_file(&path).unwrap_or_else(|e| panic!("{f}: {e}"));
        }
    }

    #[test]
    fn blake3_matches_known_vector() {
        assert_eq!(
            blake3_hex("abc"),
            "6437b3ac38465133ffb63b75273a8db548c558465d79db03fd359c6cd5bd9d85"
        );
        assert_eq!(parse_digest(&blake3_hex("abc")).map(|d| d.len()), Some(32));
    }
}
