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

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::ops::Range;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use toml::Spanned;

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

/// A secret value read from the environment. `Debug` and `Display` print `[redacted]`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret.
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }
    /// The secret itself, for the one place that must send it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret([redacted])")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

/// The whole configuration file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Listen address, body limit, shutdown.
    #[serde(default)]
    pub server: ServerConfig,
    /// Bounds on what every real provider reads from its upstream.
    #[serde(default)]
    pub upstream: UpstreamConfig,
    /// Upstream providers by name.
    pub providers: BTreeMap<String, Spanned<ProviderConfig>>,
    /// Fallback chains by name: what serves a route.
    pub chains: BTreeMap<String, Spanned<ChainConfig>>,
    /// Model aliases and routes by task type.
    pub routing: RoutingConfig,
    /// Response cache.
    #[serde(default)]
    pub cache: CacheConfig,
    /// Client-side rate limits (per tenant, model or task).
    #[serde(default)]
    pub rate_limits: RateLimitsConfig,
    /// Prices per model (USD per million tokens).
    #[serde(default)]
    pub prices: BTreeMap<String, Spanned<PriceConfig>>,
    /// Spend budgets.
    #[serde(default)]
    pub budgets: BudgetsConfig,
    /// Output validators by task type.
    #[serde(default)]
    pub validators: BTreeMap<String, Spanned<ValidatorConfig>>,
    /// Client keys and tenants.
    #[serde(default)]
    pub auth: AuthConfig,
    /// Async jobs.
    #[serde(default)]
    pub jobs: JobsConfig,
    /// OpenTelemetry traces and metrics over OTLP (off by default).
    #[serde(default)]
    pub telemetry: TelemetryConfig,
    /// Where the file was loaded from (its directory resolves relative paths).
    #[serde(skip)]
    pub base_dir: PathBuf,
    #[serde(skip)]
    source_path: PathBuf,
}

/// `[server]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    /// Address to listen on (default `127.0.0.1:8080`).
    #[serde(default = "default_listen")]
    pub listen: Spanned<String>,
    /// Largest accepted request body in bytes (default 1 MiB).
    #[serde(default = "default_body_limit")]
    pub body_limit_bytes: Spanned<u64>,
    /// How long in-flight requests and streams may run after a shutdown signal (default 30 s).
    #[serde(default = "default_grace")]
    pub shutdown_grace_secs: u64,
    /// Serve `GET /metrics` (Prometheus text), default true.
    #[serde(default = "yes")]
    pub metrics: bool,
    /// Seconds for a whole HTTP/1 request header, from the connection's start or the end
    /// of the previous response (so also the HTTP/1.1 keep-alive idle time). Default 10.
    #[serde(default = "default_header_secs")]
    pub header_read_timeout_secs: u64,
    /// Seconds for a whole request body, from its header (more: 408). Default 30.
    #[serde(default = "default_body_secs")]
    pub body_read_timeout_secs: u64,
    /// Seconds a connection may stay with no request in flight. Default 60.
    #[serde(default = "default_idle_secs")]
    pub idle_timeout_secs: u64,
    /// Most client connections open at once; more are closed on accept. Default 4096.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// Serve `/metrics` on this address only (not on `listen`).
    pub metrics_listen: Option<Spanned<String>>,
    /// NAME of the env var holding a bearer token `/metrics` requires. Without it and
    /// without `metrics_listen`, `/metrics` is served only when `listen` is a loopback
    /// address.
    pub metrics_token_env: Option<Spanned<String>>,
}

fn default_header_secs() -> u64 {
    10
}
fn default_body_secs() -> u64 {
    30
}
fn default_idle_secs() -> u64 {
    60
}
fn default_max_connections() -> usize {
    4096
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            listen: default_listen(),
            body_limit_bytes: default_body_limit(),
            shutdown_grace_secs: default_grace(),
            metrics: true,
            header_read_timeout_secs: default_header_secs(),
            body_read_timeout_secs: default_body_secs(),
            idle_timeout_secs: default_idle_secs(),
            max_connections: default_max_connections(),
            metrics_listen: None,
            metrics_token_env: None,
        }
    }
}

fn default_listen() -> Spanned<String> {
    Spanned::new(0..0, "127.0.0.1:8080".to_owned())
}
fn default_body_limit() -> Spanned<u64> {
    Spanned::new(0..0, 1024 * 1024)
}
fn default_grace() -> u64 {
    30
}
fn yes() -> bool {
    true
}

/// `[upstream]`: bounds on the answers of every `openai` / `anthropic` provider. Each breach
/// is an error the fallback chain moves on from (see `llm_tower_providers::ResponseLimits`).
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct UpstreamConfig {
    /// Largest non-streamed answer body, in bytes (default 16 MiB).
    pub max_body_bytes: usize,
    /// Largest server-sent event of a stream, in bytes (default 1 MiB).
    pub max_sse_event_bytes: usize,
    /// Longest wait to the response headers and, non-streamed, to the end of the body, in
    /// milliseconds; `0` = none (default 600 000).
    pub response_timeout_ms: u64,
    /// Most response headers (default 100).
    pub max_response_headers: usize,
    /// Most bytes of response head (default 65 536).
    pub max_response_header_bytes: usize,
    /// Speak HTTP/2 only, also over plain `http://` (h2c with prior knowledge), instead of
    /// negotiating it by TLS ALPN (default false).
    pub http2_only: bool,
    /// Most bytes of non-streamed answers read at once, over every provider (default
    /// 256 MiB).
    pub max_buffered_bytes: usize,
}

impl Default for UpstreamConfig {
    fn default() -> Self {
        let l = llm_tower_providers::ResponseLimits::default();
        let h = llm_tower_providers::HttpClientConfig::default();
        Self {
            max_body_bytes: l.max_body_bytes,
            max_sse_event_bytes: l.max_sse_event_bytes,
            response_timeout_ms: l.response_timeout_ms,
            max_response_headers: h.max_response_headers,
            max_response_header_bytes: h.max_response_header_bytes,
            http2_only: h.http2_only,
            max_buffered_bytes: h.max_buffered_bytes,
        }
    }
}

impl UpstreamConfig {
    /// The providers' limits.
    pub fn limits(&self) -> llm_tower_providers::ResponseLimits {
        llm_tower_providers::ResponseLimits {
            max_body_bytes: self.max_body_bytes,
            max_sse_event_bytes: self.max_sse_event_bytes,
            response_timeout_ms: self.response_timeout_ms,
        }
    }

    /// The shared HTTP client's settings.
    pub fn http(&self) -> llm_tower_providers::HttpClientConfig {
        llm_tower_providers::HttpClientConfig {
            max_response_headers: self.max_response_headers,
            max_response_header_bytes: self.max_response_header_bytes,
            http2_only: self.http2_only,
            max_buffered_bytes: self.max_buffered_bytes,
            ..Default::default()
        }
    }
}

/// The kind of a provider.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ProviderKind {
    /// Any OpenAI-compatible chat-completions API (OpenAI, OpenRouter, vLLM, Ollama, Groq…).
    Openai,
    /// Anthropic's Messages API.
    Anthropic,
    /// The built-in simulated provider (no network, no key), for demos and load tests.
    Simulated,
}

impl ProviderKind {
    /// `openai`, `anthropic` or `simulated`.
    pub fn as_str(self) -> &'static str {
        match self {
            ProviderKind::Openai => "openai",
            ProviderKind::Anthropic => "anthropic",
            ProviderKind::Simulated => "simulated",
        }
    }
}

/// `[providers.<name>]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProviderConfig {
    /// `openai`, `anthropic` or `simulated`.
    pub kind: ProviderKind,
    /// API base URL (default: the vendor's public API for `openai`/`anthropic`).
    pub base_url: Option<Spanned<String>>,
    /// NAME of the environment variable holding the API key (never the key itself).
    pub api_key_env: Option<Spanned<String>>,
    /// Renames models on the way to this provider (`"gpt-4o-mini" = "openai/gpt-4o-mini"`).
    #[serde(default)]
    pub model_map: BTreeMap<String, String>,
    /// Extra request headers sent to this provider (`HTTP-Referer` for OpenRouter,
    /// `OpenAI-Organization`, …). Not for secrets: those go in `headers_env`.
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// Extra request headers whose values are secrets: header name → NAME of the env var
    /// holding the value (`{ "X-Api-Token" = "VENDOR_TOKEN" }`). Never logged.
    #[serde(default)]
    pub headers_env: BTreeMap<String, String>,
    /// Anthropic only: mark stable system prompts cacheable (`cache_control`).
    #[serde(default)]
    pub prompt_caching: bool,
    /// This provider's own limits (stay under the vendor's limits, keep headroom).
    pub rate_limit: Option<Spanned<ProviderLimitConfig>>,
    /// Behaviour of a `simulated` provider.
    pub simulated: Option<Spanned<SimulatedConfig>>,
}

/// `[providers.<name>.rate_limit]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProviderLimitConfig {
    /// Requests per minute sent to this provider.
    pub requests_per_minute: Option<u64>,
    /// Tokens per minute sent to this provider.
    pub tokens_per_minute: Option<u64>,
    /// Move traffic to the next step of the chain while the provider reports fewer than
    /// this many requests left in its window (`x-ratelimit-remaining-requests`), before it
    /// answers 429. Default 0 (off).
    #[serde(default)]
    pub min_remaining_requests: u64,
    /// Same for tokens left (`x-ratelimit-remaining-tokens`), beyond the request's estimate.
    #[serde(default)]
    pub min_remaining_tokens: u64,
}

/// `[providers.<name>.simulated]`: the simulated provider's behaviour.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SimulatedConfig {
    /// Time to the first token, in milliseconds (default 50).
    #[serde(default = "default_sim_latency")]
    pub latency_ms: u64,
    /// Delay per streamed word, in milliseconds (default 10).
    #[serde(default = "default_sim_token")]
    pub token_delay_ms: u64,
    /// Every Nth call fails (0 = never), so fallback is visible.
    #[serde(default)]
    pub fail_every: u64,
    /// How the scripted failures fail (default `unavailable`, a 503).
    #[serde(default)]
    pub fail_kind: SimulatedFailure,
}

/// The error kind of a simulated provider's scripted failures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SimulatedFailure {
    /// 503.
    #[default]
    Unavailable,
    /// 429 with retry-after.
    RateLimited,
    /// 529-style overload.
    Overloaded,
    /// A timeout.
    Timeout,
}

impl Default for SimulatedConfig {
    fn default() -> Self {
        Self {
            latency_ms: default_sim_latency(),
            token_delay_ms: default_sim_token(),
            fail_every: 0,
            fail_kind: SimulatedFailure::default(),
        }
    }
}

fn default_sim_latency() -> u64 {
    50
}
fn default_sim_token() -> u64 {
    10
}

/// `[chains.<name>]`: an ordered fallback chain.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChainConfig {
    /// The steps, tried in order.
    pub steps: Vec<Spanned<ChainStep>>,
    /// Total time for one attempt, in milliseconds.
    pub attempt_timeout_ms: Option<u64>,
    /// Time to the first streamed chunk, in milliseconds.
    pub first_chunk_timeout_ms: Option<u64>,
    /// Longest pause between streamed chunks, in milliseconds.
    pub stall_timeout_ms: Option<u64>,
    /// Circuit breaker: once a step made at least `breaker_min_calls` attempts within
    /// `breaker_window_secs` and at least `breaker_failure_ratio` of them failed, skip it for
    /// this many seconds, then probe it with one request (default 30).
    pub cooldown_secs: Option<u64>,
    /// Attempts within the window before the failure ratio counts (default 5).
    pub breaker_min_calls: Option<u32>,
    /// Failure ratio (0–1) that opens the breaker (default 0.5).
    pub breaker_failure_ratio: Option<f64>,
    /// The breaker's sliding window, in seconds (default 60).
    pub breaker_window_secs: Option<u64>,
    /// Longest a step is skipped, whatever its cooldown or an upstream's retry-after asks,
    /// in seconds (default 300).
    pub max_cooldown_secs: Option<u64>,
    /// `[chains.<name>.hedge]`: race a second attempt against a slow one (off when absent).
    pub hedge: Option<Spanned<HedgeConfig>>,
}

/// `[chains.<name>.hedge]`: after `delay_ms` (or the observed `percentile` of the chain's
/// latencies, once `min_samples` were seen), send the request a second time and take the
/// first answer; at most `budget_percent` extra calls.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HedgeConfig {
    /// A fixed delay before the second attempt, in milliseconds (default: observed).
    pub delay_ms: Option<u64>,
    /// The percentile of observed latencies to wait for (default 95).
    pub percentile: Option<f64>,
    /// Latencies observed before hedging starts (default 20).
    pub min_samples: Option<u64>,
    /// Most extra calls, in percent of the chain's requests (default 5).
    pub budget_percent: Option<f64>,
}

/// How a balanced group picks its member.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GroupPick {
    /// Power of two choices by latency, in-flight requests and headroom.
    #[default]
    P2c,
    /// Each member in turn.
    RoundRobin,
}

/// A member of a balanced group: a provider name, or `{ provider, model }`.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum GroupMember {
    /// A provider, asked for the step's model.
    Provider(String),
    /// A provider and the model to ask it for.
    Step {
        /// Provider name.
        provider: String,
        /// The model (default: the step's model, else the request's).
        model: Option<String>,
    },
}

impl GroupMember {
    /// The provider's name.
    pub fn provider(&self) -> &str {
        match self {
            Self::Provider(p) | Self::Step { provider: p, .. } => p,
        }
    }
    /// The member's own model, if it names one.
    pub fn model(&self) -> Option<&str> {
        match self {
            Self::Provider(_) => None,
            Self::Step { model, .. } => model.as_deref(),
        }
    }
}

impl ChainStep {
    /// The providers this step calls: its own, or its group's members.
    pub fn providers(&self) -> impl Iterator<Item = &str> {
        let single = self.group.is_empty().then_some(self.provider.as_str());
        single
            .into_iter()
            .chain(self.group.iter().map(GroupMember::provider))
    }

    /// The models this step names (its own and its group members').
    pub fn models(&self) -> impl Iterator<Item = &str> {
        self.model
            .as_deref()
            .into_iter()
            .chain(self.group.iter().filter_map(GroupMember::model))
    }
}

/// One step of a chain: a provider and the model to ask it for.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChainStep {
    /// Provider name (a key of `[providers]`); empty for a balanced group.
    #[serde(default)]
    pub provider: String,
    /// The model to ask for (default: the request's model).
    pub model: Option<String>,
    /// A balanced group instead of one provider (see `[chains]` in docs/configuration.md).
    #[serde(default)]
    pub group: Vec<GroupMember>,
    /// How the group picks its member (default `p2c`).
    pub pick: Option<GroupPick>,
}

/// `[routing]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoutingConfig {
    /// The chain used when no alias and no task route matches.
    pub default_chain: Spanned<String>,
    /// Public model names → chain (the chain's steps name the real models).
    #[serde(default)]
    pub models: BTreeMap<String, Spanned<String>>,
    /// Task type (`x-llm-task`) → chain. Takes precedence over the model alias.
    #[serde(default)]
    pub tasks: BTreeMap<String, Spanned<String>>,
    /// Whether `default_chain` also serves model names the config does not know (a
    /// catch-all). Default `false`: an unknown model is a 404 `model_not_found`, and the
    /// default chain serves only the models the config names (chain steps, `model_map`,
    /// `[prices]`) that no alias routes.
    #[serde(default)]
    pub catch_all: bool,
}

/// Where a store lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StoreKind {
    /// In this process (one machine).
    #[default]
    Memory,
    /// In Redis (shared by replicas); needs `redis_url_env`.
    Redis,
}

/// `[cache]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CacheConfig {
    /// Turn the cache on (default true).
    #[serde(default = "yes")]
    pub enabled: bool,
    /// `memory` (default) or `redis`.
    #[serde(default = "memory_store")]
    pub store: Spanned<StoreKind>,
    /// NAME of the env var holding the Redis URL (store = "redis").
    pub redis_url_env: Option<Spanned<String>>,
    /// Memory the in-memory store may use, in MiB (default 64).
    #[serde(default = "default_cache_mb")]
    pub max_memory_mb: u64,
    /// Task types whose answers are cached even when the request is not deterministic
    /// (by default only `temperature = 0` or seeded requests are cached).
    #[serde(default)]
    pub cacheable_tasks: Vec<String>,
    /// Default time to live, in seconds (default 3600).
    #[serde(default = "default_ttl")]
    pub ttl_secs: u64,
    /// Time to live per task type, in seconds (0 = never cache that task).
    #[serde(default)]
    pub ttl_by_task: BTreeMap<String, u64>,
    /// Longest a request waits for an identical in-flight one before calling upstream
    /// itself, in milliseconds (default 30000).
    pub coalesce_timeout_ms: Option<u64>,
    /// Memory a stream's copy may take while it is buffered to be stored, in bytes
    /// (default 8 MiB); past it the stream is served but not stored.
    pub max_stream_bytes: Option<usize>,
}

impl Default for CacheConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            store: Spanned::new(0..0, StoreKind::Memory),
            redis_url_env: None,
            max_memory_mb: default_cache_mb(),
            cacheable_tasks: Vec::new(),
            ttl_secs: default_ttl(),
            ttl_by_task: BTreeMap::new(),
            coalesce_timeout_ms: None,
            max_stream_bytes: None,
        }
    }
}

fn memory_store() -> Spanned<StoreKind> {
    Spanned::new(0..0, StoreKind::Memory)
}

fn sqlite_store() -> Spanned<JobsStoreKind> {
    Spanned::new(0..0, JobsStoreKind::Sqlite)
}

impl Default for RateLimitsConfig {
    fn default() -> Self {
        Self {
            store: memory_store(),
            redis_url_env: None,
            on_limit: OnLimit::default(),
            max_wait_ms: default_max_wait(),
            headroom_refresh_ms: default_headroom_refresh(),
            rules: Vec::new(),
        }
    }
}

impl Default for BudgetsConfig {
    fn default() -> Self {
        Self {
            store: memory_store(),
            redis_url_env: None,
            limits: Vec::new(),
        }
    }
}

fn default_cache_mb() -> u64 {
    64
}
fn default_ttl() -> u64 {
    3600
}

/// `[rate_limits]`: limits on what clients send.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimitsConfig {
    /// `memory` (default) or `redis`.
    #[serde(default = "memory_store")]
    pub store: Spanned<StoreKind>,
    /// NAME of the env var holding the Redis URL (store = "redis"). With Redis, the
    /// providers' own limits (`[providers.NAME] rate_limit`) are shared too.
    pub redis_url_env: Option<Spanned<String>>,
    /// With store = "redis": how often each replica publishes the provider headroom it
    /// learned and reads what the others learned, in milliseconds (default 100, 10 to
    /// 60000). A replica acts on another's observation within twice this.
    #[serde(default = "default_headroom_refresh")]
    pub headroom_refresh_ms: u64,
    /// Reject at once (default) or wait for room.
    #[serde(default)]
    pub on_limit: OnLimit,
    /// Longest wait when `on_limit = "wait"`, in milliseconds (default 2000).
    #[serde(default = "default_max_wait")]
    pub max_wait_ms: u64,
    /// The rules; every rule applies to every request, all or nothing.
    #[serde(default)]
    pub rules: Vec<Spanned<RateLimitRule>>,
}

/// What a rate-limit rule counts by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LimitKey {
    /// One bucket for everything.
    Global,
    /// One bucket per tenant.
    Tenant,
    /// One bucket per requested model.
    Model,
    /// One bucket per task type.
    Task,
}

/// What to do when a limit is reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnLimit {
    /// Answer 429 with `retry-after` at once (default).
    #[default]
    Reject,
    /// Wait for capacity up to `max_wait_ms`, then reject.
    Wait,
}

/// `[[rate_limits.rules]]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimitRule {
    /// What the rule counts by.
    pub key: LimitKey,
    /// Requests per minute.
    pub requests_per_minute: Option<u64>,
    /// Tokens per minute (reserved from an estimate, settled with actual usage).
    pub tokens_per_minute: Option<u64>,
}

fn default_max_wait() -> u64 {
    2000
}

fn default_headroom_refresh() -> u64 {
    100
}

/// `[prices.<model>]`: USD per million tokens.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PriceConfig {
    /// Uncached input tokens.
    pub input_per_mtok: f64,
    /// Output tokens.
    pub output_per_mtok: f64,
    /// Cached input tokens (default: the input price).
    pub cached_input_per_mtok: Option<f64>,
    /// Input tokens written to the provider's prompt cache (Anthropic
    /// `cache_creation_input_tokens`; default: the input price).
    pub cache_write_input_per_mtok: Option<f64>,
}

impl PriceConfig {
    /// The cost layer's price (its own conversion and checks).
    pub fn model_price(
        &self,
    ) -> Result<llm_tower::cost::ModelPrice, llm_tower::cost::InvalidPrice> {
        let p = llm_tower::cost::ModelPrice::per_mtok_usd(
            self.input_per_mtok,
            self.output_per_mtok,
            self.cached_input_per_mtok,
        )?;
        match self.cache_write_input_per_mtok {
            Some(w) => p.with_cache_write_per_mtok_usd(w),
            None => Ok(p),
        }
    }
}

/// `[budgets]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BudgetsConfig {
    /// `memory` (default) or `redis`.
    #[serde(default = "memory_store")]
    pub store: Spanned<StoreKind>,
    /// NAME of the env var holding the Redis URL (store = "redis").
    pub redis_url_env: Option<Spanned<String>>,
    /// The budgets.
    #[serde(default)]
    pub limits: Vec<Spanned<BudgetRule>>,
}

/// What a budget caps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BudgetScope {
    /// All spend.
    Global,
    /// Spend per tenant.
    Tenant,
    /// Spend per task type.
    Task,
}

/// The window a budget resets on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BudgetWindow {
    /// Resets every hour.
    Hour,
    /// Resets every UTC day.
    Day,
    /// Resets every UTC month.
    Month,
    /// Never resets.
    Total,
}

/// `[[budgets.limits]]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BudgetRule {
    /// What the budget caps.
    pub scope: BudgetScope,
    /// Only this tenant / task (default: each one gets its own budget of this size).
    pub only: Option<String>,
    /// The cap, in USD.
    pub usd: f64,
    /// The window.
    pub per: BudgetWindow,
}

/// `[validators.<task>]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ValidatorConfig {
    /// `json` (the output must parse) or `json_schema`.
    pub kind: ValidatorKind,
    /// Inline JSON Schema (a TOML table, or a string of JSON).
    pub schema: Option<toml::Value>,
    /// JSON Schema file, relative to the config file.
    pub schema_file: Option<PathBuf>,
}

/// The kind of validator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ValidatorKind {
    /// The output must be valid JSON.
    Json,
    /// The output must be JSON valid against a schema.
    JsonSchema,
}

/// `[auth]`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    /// The client keys. With none, the gateway is open and every request is tenant
    /// `anonymous` (fine on 127.0.0.1, not elsewhere).
    #[serde(default)]
    pub keys: Vec<Spanned<ClientKeyConfig>>,
}

/// `[[auth.keys]]`: one client key and its tenant. Exactly one of `key_env`, `key_blake3`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientKeyConfig {
    /// The tenant the key belongs to.
    pub tenant: String,
    /// NAME of the env var holding the key.
    pub key_env: Option<String>,
    /// Lowercase hex BLAKE3 digest of the key (`llm-tower-proxy hash-key` prints it).
    pub key_blake3: Option<String>,
    /// Highest `job.priority` this key's tenant may ask for (default `jobs.max_priority`).
    pub max_job_priority: Option<i64>,
}

/// Where jobs are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobsStoreKind {
    /// One SQLite file (default).
    #[default]
    Sqlite,
    /// PostgreSQL (replicas share one queue); needs `url_env`.
    Postgres,
}

/// `[jobs]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobsConfig {
    /// Serve `/v1/jobs` (default true).
    #[serde(default = "yes")]
    pub enabled: bool,
    /// `sqlite` (default) or `postgres`.
    #[serde(default = "sqlite_store")]
    pub store: Spanned<JobsStoreKind>,
    /// SQLite file, relative to the config file (default `llm-tower-jobs.db`).
    #[serde(default = "default_jobs_path")]
    pub path: PathBuf,
    /// NAME of the env var holding the PostgreSQL URL (store = "postgres").
    pub url_env: Option<Spanned<String>>,
    /// Concurrent jobs run by this process (default 4).
    #[serde(default = "default_workers")]
    pub workers: usize,
    /// Highest `job.priority` a client may ask for (a key may allow more). Default 0.
    #[serde(default)]
    pub max_priority: i64,
    /// Most `job.max_attempts` a client may ask for. Default 10.
    #[serde(default = "default_job_attempts")]
    pub max_attempts: u32,
    /// Longest `job.backoff_ms` a client may ask for. Default 300000 (5 min).
    #[serde(default = "default_job_backoff")]
    pub max_backoff_ms: u64,
    /// Most queued jobs per tenant; more is 429. Default 1000.
    #[serde(default = "default_job_queue")]
    pub max_queued_per_tenant: u64,
}

fn default_job_attempts() -> u32 {
    10
}
fn default_job_backoff() -> u64 {
    300_000
}
fn default_job_queue() -> u64 {
    1000
}

impl Default for JobsConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            store: Spanned::new(0..0, JobsStoreKind::Sqlite),
            path: default_jobs_path(),
            url_env: None,
            workers: default_workers(),
            max_priority: 0,
            max_attempts: default_job_attempts(),
            max_backoff_ms: default_job_backoff(),
            max_queued_per_tenant: default_job_queue(),
        }
    }
}

fn default_jobs_path() -> PathBuf {
    PathBuf::from("llm-tower-jobs.db")
}
fn default_workers() -> usize {
    4
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

    /// A step that is a balanced group: members, each a defined provider, named once.
    fn check_group(
        &self,
        lines: &Lines<'_>,
        chain: &str,
        step: &Spanned<ChainStep>,
    ) -> Result<(), ConfigError> {
        let bad =
            |msg: String| self.invalid(lines.line(&step.span()), format!("chain {chain:?}: {msg}"));
        let s = step.get_ref();
        if !s.provider.is_empty() {
            return Err(bad("a step names a provider or a group, not both".into()));
        }
        if s.group.len() < 2 {
            return Err(bad("a group needs at least two members".into()));
        }
        for (i, m) in s.group.iter().enumerate() {
            if !self.providers.contains_key(m.provider()) {
                return Err(bad(format!(
                    "group member {:?} is not a defined provider (defined: {})",
                    m.provider(),
                    self.providers
                        .keys()
                        .cloned()
                        .collect::<Vec<_>>()
                        .join(", ")
                )));
            }
            let same = |o: &GroupMember| {
                o.provider() == m.provider()
                    && o.model().or(s.model.as_deref()) == m.model().or(s.model.as_deref())
            };
            if s.group[..i].iter().any(same) {
                return Err(bad(format!(
                    "group member {:?} is named twice with the same model",
                    m.provider()
                )));
            }
        }
        Ok(())
    }

    /// `[chains.<name>.hedge]`: values in range.
    fn check_hedge(
        &self,
        lines: &Lines<'_>,
        chain: &str,
        h: &Spanned<HedgeConfig>,
    ) -> Result<(), ConfigError> {
        let bad = |msg: &str| {
            self.invalid(
                lines.line(&h.span()),
                format!("chain {chain:?}: hedge.{msg}"),
            )
        };
        let c = h.get_ref();
        if c.delay_ms == Some(0) {
            return Err(bad("delay_ms must be > 0"));
        }
        if c.delay_ms.is_some() && (c.percentile.is_some() || c.min_samples.is_some()) {
            return Err(bad(
                "delay_ms is a fixed delay: percentile and min_samples do not apply",
            ));
        }
        if c.percentile.is_some_and(|p| !(p > 0.0 && p <= 100.0)) {
            return Err(bad("percentile must be within (0, 100]"));
        }
        if c.min_samples == Some(0) {
            return Err(bad("min_samples must be > 0"));
        }
        if c.budget_percent.is_some_and(|p| !(p > 0.0 && p <= 100.0)) {
            return Err(bad("budget_percent must be within (0, 100]"));
        }
        Ok(())
    }

    fn validate(&self, lines: &Lines<'_>) -> Result<(), ConfigError> {
        let err = |span: &Range<usize>, msg: String| self.invalid(lines.line(span), msg);

        // [server]
        let listen = &self.server.listen;
        if listen.get_ref().parse::<SocketAddr>().is_err() {
            return Err(err(
                &listen.span(),
                format!(
                    "server.listen = {:?} is not an address like 127.0.0.1:8080",
                    listen.get_ref()
                ),
            ));
        }
        let limit = &self.server.body_limit_bytes;
        if *limit.get_ref() == 0 {
            return Err(err(
                &limit.span(),
                "server.body_limit_bytes must be > 0".into(),
            ));
        }

        let g = &self.server;
        if [
            g.header_read_timeout_secs,
            g.body_read_timeout_secs,
            g.idle_timeout_secs,
        ]
        .contains(&0)
            || g.max_connections == 0
        {
            return Err(self.invalid(
                None,
                "server: header_read_timeout_secs, body_read_timeout_secs, idle_timeout_secs \
                 and max_connections must be > 0",
            ));
        }
        if let Some(m) = &g.metrics_listen
            && m.get_ref().parse::<SocketAddr>().is_err()
        {
            return Err(err(
                &m.span(),
                format!(
                    "server.metrics_listen = {:?} is not an address",
                    m.get_ref()
                ),
            ));
        }
        if let Some(e) = &g.metrics_token_env {
            check_env_name(e.get_ref())
                .map_err(|m| err(&e.span(), format!("server.metrics_token_env {m}")))?;
        }

        // [upstream]
        let u = &self.upstream;
        for (key, v) in [
            ("max_body_bytes", u.max_body_bytes),
            ("max_sse_event_bytes", u.max_sse_event_bytes),
            ("max_response_headers", u.max_response_headers),
            ("max_response_header_bytes", u.max_response_header_bytes),
            ("max_buffered_bytes", u.max_buffered_bytes),
        ] {
            if v == 0 {
                return Err(self.invalid(None, format!("upstream.{key} must be > 0")));
            }
        }

        // [providers]
        if self.providers.is_empty() {
            return Err(self.invalid(None, "at least one [providers.<name>] is required"));
        }
        for (name, p) in &self.providers {
            let span = p.span();
            let p = p.get_ref();
            match p.kind {
                ProviderKind::Simulated => {
                    if p.base_url.is_some()
                        || p.api_key_env.is_some()
                        || !p.headers.is_empty()
                        || !p.headers_env.is_empty()
                    {
                        return Err(err(
                            &span,
                            format!(
                                "provider {name:?} is simulated: base_url, api_key_env and headers do not apply"
                            ),
                        ));
                    }
                }
                ProviderKind::Openai | ProviderKind::Anthropic => {
                    if p.simulated.is_some() {
                        return Err(err(
                            &span,
                            format!(
                                "provider {name:?}: [simulated] applies only to kind = \"simulated\""
                            ),
                        ));
                    }
                    if let Some(url) = &p.base_url {
                        let u = url.get_ref();
                        if !(u.starts_with("http://") || u.starts_with("https://")) {
                            return Err(err(
                                &url.span(),
                                format!(
                                    "provider {name:?}: base_url {u:?} must start with http:// or https://"
                                ),
                            ));
                        }
                    }
                }
            }
            if let Some(env) = &p.api_key_env {
                check_env_name(env.get_ref())
                    .map_err(|m| err(&env.span(), format!("provider {name:?}: api_key_env {m}")))?;
            }
            for (h, env) in &p.headers_env {
                check_env_name(env)
                    .map_err(|m| err(&span, format!("provider {name:?}: headers_env.{h:?} {m}")))?;
                if p.headers.keys().any(|k| k.eq_ignore_ascii_case(h)) {
                    return Err(err(
                        &span,
                        format!(
                            "provider {name:?}: header {h:?} is in both headers and headers_env"
                        ),
                    ));
                }
            }
            if let Some(rl) = &p.rate_limit {
                let r = rl.get_ref();
                if r.requests_per_minute == Some(0) || r.tokens_per_minute == Some(0) {
                    return Err(err(
                        &rl.span(),
                        format!("provider {name:?}: rate limits must be > 0"),
                    ));
                }
            }
            if p.prompt_caching && p.kind != ProviderKind::Anthropic {
                return Err(err(
                    &span,
                    format!(
                        "provider {name:?}: prompt_caching applies only to kind = \"anthropic\""
                    ),
                ));
            }
        }

        // [chains]
        if self.chains.is_empty() {
            return Err(self.invalid(None, "at least one [chains.<name>] is required"));
        }
        for (name, c) in &self.chains {
            let span = c.span();
            let c = c.get_ref();
            if c.steps.is_empty() {
                return Err(err(&span, format!("chain {name:?} has no steps")));
            }
            for step in &c.steps {
                let s = step.get_ref();
                if !s.group.is_empty() || s.pick.is_some() {
                    self.check_group(lines, name, step)?;
                    continue;
                }
                if !self.providers.contains_key(&s.provider) {
                    return Err(err(
                        &step.span(),
                        format!(
                            "chain {name:?} names provider {:?}, which is not defined (defined: {})",
                            s.provider,
                            self.providers
                                .keys()
                                .cloned()
                                .collect::<Vec<_>>()
                                .join(", ")
                        ),
                    ));
                }
            }
            for (field, v) in [
                ("attempt_timeout_ms", c.attempt_timeout_ms),
                ("first_chunk_timeout_ms", c.first_chunk_timeout_ms),
                ("stall_timeout_ms", c.stall_timeout_ms),
            ] {
                if v == Some(0) {
                    return Err(err(&span, format!("chain {name:?}: {field} must be > 0")));
                }
            }
            if let Some(h) = &c.hedge {
                self.check_hedge(lines, name, h)?;
            }
            if c.breaker_failure_ratio
                .is_some_and(|r| !(0.0..=1.0).contains(&r))
            {
                return Err(err(
                    &span,
                    format!("chain {name:?}: breaker_failure_ratio must be within 0..=1"),
                ));
            }
        }

        // [routing]
        let chain_ref = |what: String, r: &Spanned<String>| {
            if self.chains.contains_key(r.get_ref()) {
                Ok(())
            } else {
                Err(err(
                    &r.span(),
                    format!(
                        "{what} names chain {:?}, which is not defined (defined: {})",
                        r.get_ref(),
                        self.chains.keys().cloned().collect::<Vec<_>>().join(", ")
                    ),
                ))
            }
        };
        chain_ref("routing.default_chain".into(), &self.routing.default_chain)?;
        for (model, c) in &self.routing.models {
            chain_ref(format!("routing.models.{model:?}"), c)?;
        }
        for (task, c) in &self.routing.tasks {
            chain_ref(format!("routing.tasks.{task:?}"), c)?;
        }

        // [cache]
        let store_env =
            |what: &str, kind: &Spanned<StoreKind>, env: &Option<Spanned<String>>| match (
                kind.get_ref(),
                env,
            ) {
                (StoreKind::Redis, None) => Err(err(
                    &kind.span(),
                    format!("{what}: store = \"redis\" needs redis_url_env"),
                )),
                (StoreKind::Redis, Some(e)) => check_env_name(e.get_ref())
                    .map_err(|m| err(&e.span(), format!("{what}: redis_url_env {m}"))),
                (StoreKind::Memory, Some(e)) => Err(err(
                    &e.span(),
                    format!("{what}: redis_url_env applies only to store = \"redis\""),
                )),
                (StoreKind::Memory, None) => Ok(()),
            };
        store_env("cache", &self.cache.store, &self.cache.redis_url_env)?;
        if self.cache.enabled && (self.cache.ttl_secs == 0 || self.cache.max_memory_mb == 0) {
            return Err(self.invalid(None, "cache: ttl_secs and max_memory_mb must be > 0"));
        }

        // [rate_limits]
        store_env(
            "rate_limits",
            &self.rate_limits.store,
            &self.rate_limits.redis_url_env,
        )?;
        if !(10..=60_000).contains(&self.rate_limits.headroom_refresh_ms) {
            return Err(self.invalid(
                None,
                "rate_limits: headroom_refresh_ms must be between 10 and 60000",
            ));
        }
        for rule in &self.rate_limits.rules {
            let r = rule.get_ref();
            if r.requests_per_minute.is_none() && r.tokens_per_minute.is_none() {
                return Err(err(
                    &rule.span(),
                    "rate limit rule needs requests_per_minute or tokens_per_minute".into(),
                ));
            }
            if r.requests_per_minute == Some(0) || r.tokens_per_minute == Some(0) {
                return Err(err(&rule.span(), "rate limits must be > 0".into()));
            }
        }

        // [prices]
        for (model, p) in &self.prices {
            let v = p.get_ref();
            let all = [
                Some(v.input_per_mtok),
                Some(v.output_per_mtok),
                v.cached_input_per_mtok,
                v.cache_write_input_per_mtok,
            ];
            if all
                .into_iter()
                .flatten()
                .any(|x| !x.is_finite() || !(0.0..=1e6).contains(&x))
            {
                return Err(err(
                    &p.span(),
                    format!("prices.{model:?}: prices must be finite, >= 0 and <= 1e6 USD"),
                ));
            }
        }

        for (model, p) in &self.prices {
            let v = p.get_ref();
            // The cost layer's own conversion, so what it would refuse fails here, with a line.
            if let Err(e) = v.model_price() {
                return Err(err(&p.span(), format!("prices.{model:?}: {e}")));
            }
        }

        // [budgets]
        store_env("budgets", &self.budgets.store, &self.budgets.redis_url_env)?;
        for b in &self.budgets.limits {
            let v = b.get_ref();
            if !v.usd.is_finite() || v.usd <= 0.0 {
                return Err(err(&b.span(), "budget usd must be > 0".into()));
            }
            if v.scope == BudgetScope::Global && v.only.is_some() {
                return Err(err(&b.span(), "a global budget takes no `only`".into()));
            }
            if llm_tower::cost::usd_to_nano(v.usd).is_none() {
                return Err(err(&b.span(), "budget usd is out of range".into()));
            }
        }

        // [validators]
        for (task, v) in &self.validators {
            let span = v.span();
            let vc = v.get_ref();
            match (vc.kind, vc.schema.is_some(), vc.schema_file.is_some()) {
                (ValidatorKind::Json, false, false) => {}
                (ValidatorKind::Json, _, _) => {
                    return Err(err(
                        &span,
                        format!("validators.{task:?}: kind = \"json\" takes no schema"),
                    ));
                }
                (ValidatorKind::JsonSchema, true, true)
                | (ValidatorKind::JsonSchema, false, false) => {
                    return Err(err(
                        &span,
                        format!(
                            "validators.{task:?}: kind = \"json_schema\" needs exactly one of schema, schema_file"
                        ),
                    ));
                }
                (ValidatorKind::JsonSchema, _, _) => {
                    let schema = self.validator_schema(vc).map_err(|e| match e {
                        ConfigError::Invalid { message, .. } => {
                            err(&span, format!("validators.{task:?}: {message}"))
                        }
                        other => other,
                    })?;
                    if let Some(Err(e)) = schema.as_ref().map(jsonschema::validator_for) {
                        return Err(err(
                            &span,
                            format!("validators.{task:?}: invalid JSON Schema: {e}"),
                        ));
                    }
                }
            }
        }

        // [auth]
        let mut tenants_by_hash = std::collections::BTreeSet::new();
        for k in &self.auth.keys {
            let v = k.get_ref();
            if v.tenant.trim().is_empty() {
                return Err(err(&k.span(), "auth key: tenant must not be empty".into()));
            }
            match (&v.key_env, &v.key_blake3) {
                (Some(env), None) => check_env_name(env)
                    .map_err(|m| err(&k.span(), format!("auth key: key_env {m}")))?,
                (None, Some(h)) => {
                    if h.len() != 64 || !h.bytes().all(|b| b.is_ascii_hexdigit()) {
                        return Err(err(
                            &k.span(),
                            "auth key: key_blake3 must be 64 hex digits".into(),
                        ));
                    }
                    if !tenants_by_hash.insert(h.to_ascii_lowercase()) {
                        return Err(err(
                            &k.span(),
                            "auth key: the same key_blake3 appears twice".into(),
                        ));
                    }
                }
                _ => {
                    return Err(err(
                        &k.span(),
                        "auth key: give exactly one of key_env, key_blake3".into(),
                    ));
                }
            }
        }

        // [jobs]
        let j = &self.jobs;
        match (j.store.get_ref(), &j.url_env) {
            (JobsStoreKind::Postgres, None) => {
                return Err(err(
                    &j.store.span(),
                    "jobs: store = \"postgres\" needs url_env".into(),
                ));
            }
            (JobsStoreKind::Postgres, Some(e)) => {
                check_env_name(e.get_ref())
                    .map_err(|m| err(&e.span(), format!("jobs: url_env {m}")))?;
            }
            (JobsStoreKind::Sqlite, Some(e)) => {
                return Err(err(
                    &e.span(),
                    "jobs: url_env applies only to store = \"postgres\"".into(),
                ));
            }
            (JobsStoreKind::Sqlite, None) => {}
        }
        if j.workers == 0 || j.workers > 1024 {
            return Err(self.invalid(None, "jobs.workers must be within 1..=1024"));
        }
        if j.max_attempts == 0 || j.max_queued_per_tenant == 0 {
            return Err(self.invalid(
                None,
                "jobs.max_attempts and jobs.max_queued_per_tenant must be > 0",
            ));
        }
        self.validate_telemetry(lines)
    }

    /// `[telemetry]`.
    fn validate_telemetry(&self, lines: &Lines<'_>) -> Result<(), ConfigError> {
        let err = |span: &Range<usize>, msg: String| self.invalid(lines.line(span), msg);
        let t = &self.telemetry;
        if let Some(p) = &t.protocol
            && OtlpProtocol::parse(p.get_ref()).is_none()
        {
            return Err(err(
                &p.span(),
                format!(
                    "telemetry.protocol = {:?}: use \"grpc\" or \"http/protobuf\"",
                    p.get_ref()
                ),
            ));
        }
        if let Some(e) = &t.endpoint {
            let ok = e.get_ref().parse::<http::Uri>().ok().is_some_and(|u| {
                matches!(u.scheme_str(), Some("http" | "https")) && u.host().is_some()
            });
            if !ok {
                return Err(err(
                    &e.span(),
                    format!(
                        "telemetry.endpoint = {:?} is not an http:// or https:// URL",
                        e.get_ref()
                    ),
                ));
            }
        }
        if let Some(r) = &t.sample_ratio
            && !(0.0..=1.0).contains(r.get_ref())
        {
            return Err(err(
                &r.span(),
                "telemetry.sample_ratio must be within 0.0..=1.0".into(),
            ));
        }
        let i = &t.metrics_interval_secs;
        if *i.get_ref() == 0 || *i.get_ref() > 86_400 {
            return Err(err(
                &i.span(),
                "telemetry.metrics_interval_secs must be within 1..=86400".into(),
            ));
        }
        let m = &t.max_content_bytes;
        if *m.get_ref() > 1 << 20 {
            return Err(err(
                &m.span(),
                "telemetry.max_content_bytes must be at most 1048576".into(),
            ));
        }
        Ok(())
    }

    /// Reads every secret named by the file from the environment, through `env` (use
    /// `|k| std::env::var(k).ok()`). Fails naming the first missing variable.
    pub fn resolve_secrets(
        &self,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Secrets, ConfigError> {
        let get = |var: &str, needed_by: String| {
            env(var)
                .filter(|v| !v.is_empty())
                .map(Secret::new)
                .ok_or_else(|| ConfigError::MissingEnv {
                    var: var.to_owned(),
                    needed_by,
                })
        };
        let mut provider_keys = BTreeMap::new();
        let mut provider_headers = BTreeMap::new();
        for (name, p) in &self.providers {
            if let Some(var) = &p.get_ref().api_key_env {
                provider_keys.insert(
                    name.clone(),
                    get(var.get_ref(), format!("provider {name:?}"))?,
                );
            }
            let mut headers = BTreeMap::new();
            for (h, var) in &p.get_ref().headers_env {
                headers.insert(
                    h.clone(),
                    get(var, format!("header {h:?} of provider {name:?}"))?,
                );
            }
            if !headers.is_empty() {
                provider_headers.insert(name.clone(), headers);
            }
        }
        let metrics_token = match &self.server.metrics_token_env {
            Some(var) if self.server.metrics => {
                Some(get(var.get_ref(), "server.metrics_token_env".into())?)
            }
            _ => None,
        };
        let redis = |what: &str, e: &Option<Spanned<String>>| {
            e.as_ref()
                .map(|v| get(v.get_ref(), what.to_owned()))
                .transpose()
        };
        let cache_redis_url = if self.cache.enabled {
            redis("cache", &self.cache.redis_url_env)?
        } else {
            None
        };
        let rate_limit_redis_url = if self.rate_limits.rules.is_empty()
            && !self
                .providers
                .values()
                .any(|p| p.get_ref().rate_limit.is_some())
        {
            None
        } else {
            redis("rate_limits", &self.rate_limits.redis_url_env)?
        };
        let budget_redis_url = if self.budgets.limits.is_empty() {
            None
        } else {
            redis("budgets", &self.budgets.redis_url_env)?
        };
        let jobs_database_url = if self.jobs.enabled {
            redis("jobs", &self.jobs.url_env)?
        } else {
            None
        };
        let mut client_keys = Vec::new();
        for k in &self.auth.keys {
            let v = k.get_ref();
            let hash = match (&v.key_env, &v.key_blake3) {
                (Some(var), _) => {
                    blake3_hex(get(var, format!("auth key of tenant {:?}", v.tenant))?.expose())
                }
                (None, Some(h)) => h.to_ascii_lowercase(),
                (None, None) => continue, // rejected by validation
            };
            client_keys.push(ClientKey {
                tenant: v.tenant.clone(),
                blake3: hash,
            });
        }
        Ok(Secrets {
            provider_keys,
            provider_headers,
            metrics_token,
            cache_redis_url,
            rate_limit_redis_url,
            budget_redis_url,
            jobs_database_url,
            client_keys,
        })
    }
}

/// A client key as the gateway keeps it: only its BLAKE3, never the key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientKey {
    /// The tenant.
    pub tenant: String,
    /// Lowercase hex BLAKE3 of the key.
    pub blake3: String,
}

/// Secrets read from the environment. `Debug` prints only redacted values.
#[derive(Debug, Clone, Default)]
pub struct Secrets {
    /// Provider name → API key.
    pub provider_keys: BTreeMap<String, Secret>,
    /// Provider name → header name → value (`headers_env`).
    pub provider_headers: BTreeMap<String, BTreeMap<String, Secret>>,
    /// The bearer token `/metrics` requires (`server.metrics_token_env`).
    pub metrics_token: Option<Secret>,
    /// Redis URL of the cache store.
    pub cache_redis_url: Option<Secret>,
    /// Redis URL of the rate-limit store.
    pub rate_limit_redis_url: Option<Secret>,
    /// Redis URL of the budget store.
    pub budget_redis_url: Option<Secret>,
    /// PostgreSQL URL of the jobs store.
    pub jobs_database_url: Option<Secret>,
    /// Client keys (hashed) and their tenants.
    pub client_keys: Vec<ClientKey>,
}

/// Lowercase hex BLAKE3 digest of `s` (what `key_blake3` holds).
pub fn blake3_hex(s: &str) -> String {
    blake3::hash(s.as_bytes()).to_hex().to_string()
}

/// Parses a 64-digit hex digest.
pub fn parse_digest(hex: &str) -> Option<[u8; 32]> {
    blake3::Hash::from_hex(hex).ok().map(|h| *h.as_bytes())
}

fn check_env_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_')
        && !name.as_bytes()[0].is_ascii_digit();
    if ok {
        Ok(())
    } else {
        // Do not echo the value: someone may have pasted a key here by mistake.
        Err("must be the NAME of an environment variable (A-Z, 0-9, _), not a secret".into())
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

/// `[telemetry]`: OpenTelemetry traces and metrics (GenAI semantic conventions) over OTLP.
/// Unset keys fall back to the standard `OTEL_*` environment variables, then to the
/// defaults below.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TelemetryConfig {
    /// Export traces and metrics (default false; `OTEL_SDK_DISABLED=true` also turns it off).
    #[serde(default)]
    pub enabled: bool,
    /// `"grpc"` or `"http/protobuf"` (default: `OTEL_EXPORTER_OTLP_PROTOCOL`, else
    /// `http/protobuf`).
    pub protocol: Option<Spanned<String>>,
    /// The collector's base URL (default: `OTEL_EXPORTER_OTLP_ENDPOINT`, else
    /// `http://localhost:4318` for HTTP, `http://localhost:4317` for gRPC). For HTTP,
    /// `/v1/traces` and `/v1/metrics` are appended.
    pub endpoint: Option<Spanned<String>>,
    /// `service.name` of the resource (default: `OTEL_SERVICE_NAME`, else
    /// `llm-tower-proxy`).
    pub service_name: Option<String>,
    /// Export traces (default true).
    #[serde(default = "yes")]
    pub traces: bool,
    /// Export metrics (default true).
    #[serde(default = "yes")]
    pub metrics: bool,
    /// Share of new traces sampled, parent-based (default: `OTEL_TRACES_SAMPLER`, else
    /// all).
    pub sample_ratio: Option<Spanned<f64>>,
    /// Seconds between metric exports (default 60).
    #[serde(default = "default_metrics_interval")]
    pub metrics_interval_secs: Spanned<u64>,
    /// Record prompts and completions on spans (`gen_ai.input.messages`,
    /// `gen_ai.output.messages`). Default false: they may hold personal data.
    #[serde(default)]
    pub capture_content: bool,
    /// The most bytes of content recorded per attribute (default 16384, at most 1 MiB).
    #[serde(default = "default_max_content_bytes")]
    pub max_content_bytes: Spanned<usize>,
}

fn default_metrics_interval() -> Spanned<u64> {
    Spanned::new(0..0, 60)
}
fn default_max_content_bytes() -> Spanned<usize> {
    Spanned::new(0..0, 16 * 1024)
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            protocol: None,
            endpoint: None,
            service_name: None,
            traces: true,
            metrics: true,
            sample_ratio: None,
            metrics_interval_secs: default_metrics_interval(),
            capture_content: false,
            max_content_bytes: default_max_content_bytes(),
        }
    }
}

/// The OTLP transports the gateway speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OtlpProtocol {
    /// OTLP over gRPC (tonic).
    Grpc,
    /// OTLP over HTTP with protobuf bodies.
    HttpProtobuf,
}

impl OtlpProtocol {
    /// `grpc` or `http/protobuf` (as `OTEL_EXPORTER_OTLP_PROTOCOL` spells them).
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "grpc" => Some(Self::Grpc),
            "http/protobuf" => Some(Self::HttpProtobuf),
            _ => None,
        }
    }
}
