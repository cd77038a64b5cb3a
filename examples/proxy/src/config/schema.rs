//! The serde types of the configuration file: one struct per table, with their defaults.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::Deserialize;
use toml::Spanned;

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
    /// Stored OpenAI Responses answers (`store`, `previous_response_id`).
    #[serde(default)]
    pub responses: ResponsesConfig,
    /// OpenTelemetry traces and metrics over OTLP (off by default).
    #[serde(default)]
    pub telemetry: TelemetryConfig,
    /// Shadow traffic by task type: a sampled copy of the task's requests goes to a
    /// candidate chain once the served answer is complete (docs/eval-and-shadow.md).
    #[serde(default)]
    pub shadow: BTreeMap<String, Spanned<ShadowConfig>>,
    /// Where the file was loaded from (its directory resolves relative paths).
    #[serde(skip)]
    pub base_dir: PathBuf,
    /// The file's path as errors name it (`<inline>` for text).
    #[serde(skip)]
    pub(super) source_path: PathBuf,
    /// Each validator's rule, its JSON Schema compiled once by the check.
    #[serde(skip)]
    pub(super) validator_rules: BTreeMap<String, llm_tower::validate::Rule>,
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
    /// `openai` only: the server speaks the Responses API (`POST {base_url}/responses`), so
    /// a Responses request is forwarded as sent; otherwise it is translated to chat.
    /// Default: true for `api.openai.com`, false elsewhere.
    pub responses: Option<bool>,
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
    /// The retry-after of a scripted failure, in seconds (default 1): how long the
    /// fallback's breaker skips the provider after one.
    #[serde(default = "default_sim_retry_after")]
    pub retry_after_secs: u64,
    /// Share of answers (0 to 1) whose JSON is broken (cut short), spread evenly over calls.
    #[serde(default)]
    pub invalid_json_rate: f64,
    /// Share of answers (0 to 1) that differ from the answer other calls give (another
    /// label, another enum value), still valid.
    #[serde(default)]
    pub wrong_answer_rate: f64,
    /// Where the affected calls fall in the call sequence (default 0).
    #[serde(default)]
    pub quality_seed: u64,
}

fn default_sim_retry_after() -> u64 {
    1
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
            retry_after_secs: default_sim_retry_after(),
            invalid_json_rate: 0.0,
            wrong_answer_rate: 0.0,
            quality_seed: 0,
        }
    }
}

fn default_sim_latency() -> u64 {
    50
}
fn default_sim_token() -> u64 {
    10
}

/// `[shadow.<task>]`: shadow traffic for one task type.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShadowConfig {
    /// The candidate: a chain of this file.
    pub chain: Spanned<String>,
    /// Share of the task's requests copied, 0 to 1 (default 0.05).
    #[serde(default = "default_shadow_rate")]
    pub sample_rate: f64,
    /// The candidate's spend cap per UTC day, in USD (default: none).
    pub budget_usd: Option<f64>,
    /// Shadow calls of this task in flight at once; more copies are dropped (default 4).
    #[serde(default = "default_shadow_in_flight")]
    pub max_in_flight: usize,
    /// A shadow call taking longer is cut, in milliseconds (default 60 000).
    #[serde(default = "default_shadow_timeout")]
    pub timeout_ms: u64,
    /// The model the copy asks for (default: the client's).
    pub model: Option<String>,
    /// Seeds the sampler, so the same requests are picked on every run (default: random).
    pub seed: Option<u64>,
}

fn default_shadow_rate() -> f64 {
    0.05
}
fn default_shadow_in_flight() -> usize {
    4
}
fn default_shadow_timeout() -> u64 {
    60_000
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

/// `[responses]`: where answers to `POST /v1/responses` with `store` (the default) are
/// kept: the jobs database (`[jobs]`), or memory (the last `memory_capacity`) when jobs
/// are off.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResponsesConfig {
    /// Keep stored answers (default true); false ignores `store` and refuses every
    /// `previous_response_id` (404).
    #[serde(default = "yes")]
    pub store: bool,
    /// How long a stored answer is kept, in seconds (default 2592000: 30 days). Expired
    /// ones are not found, and are purged.
    #[serde(default = "default_responses_retention")]
    pub retention_secs: u64,
    /// Answers kept in memory when jobs are off (the oldest go first). Default 1000.
    #[serde(default = "default_responses_memory")]
    pub memory_capacity: usize,
}

fn default_responses_retention() -> u64 {
    30 * 24 * 3600
}
fn default_responses_memory() -> usize {
    1000
}

impl Default for ResponsesConfig {
    fn default() -> Self {
        Self {
            store: true,
            retention_secs: default_responses_retention(),
            memory_capacity: default_responses_memory(),
        }
    }
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
