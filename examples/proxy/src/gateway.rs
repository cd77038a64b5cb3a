//! Building the gateway from a [`Config`]: providers, the layer stack, the HTTP surface
//! and the jobs worker — with the same public layers and builder methods a library user has.
//!
//! # The stack, outermost first
//!
//! ```text
//! HTTP (llm-tower-axum: auth → tenant, body limit, request id, metrics, headers, SSE)
//!  └ client rate limits   reject (or wait) before anything is spent or looked up
//!     └ cost + budgets     reserve the expected cost first, so concurrent requests cannot
//!        │                 slip past a budget; a cache hit below is priced at 0 (and the
//!        │                 saving counted), which needs cost ABOVE the cache
//!        └ cache           a hit skips validation, routing and every provider
//!           └ validate     checks fresh answers only (a cached answer was checked when
//!              │           stored); its retry goes through routing and fallback again
//!              └ route     model alias / task type → a chain (and the real model)
//!                 └ hedge    (per chain, when configured) a second attempt after the p95
//!                    └ fallback (one per chain): ordered steps, per-attempt timeouts,
//!                       │                         cooldown, stream commit point
//!                       └ balance (a step that is a group): p2c over its members
//!                          └ per provider: rate limit + provider headroom (OnLimit::FallBack,
//!                                          so a full provider hands over to the next step;
//!                                          shared through Redis with [rate_limits] store = "redis")
//!                             └ provider (OpenAI-compatible, Anthropic or simulated)
//! ```
//!
//! Every provider is built once and shared by every chain that names it, so its limits
//! and headroom are counted once.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use llm_tower::balance::{Balance, BalanceStats, BalanceTarget, Pick};
use llm_tower::cache::CacheLayer;
use llm_tower::cost::{
    Budget, BudgetScope as CostScope, BudgetWindow as CostWindow, CostLayer, PriceTable,
};
use llm_tower::fallback::{Cooldown, Fallback, FallbackTarget};
use llm_tower::hedge::{HedgeDelay, HedgeLayer, HedgeStats};
use llm_tower::rate_limit::{
    HeadroomTracker, OnLimit as LimitPolicy, RateLimitLayer, Rule as LimitRule,
};
use llm_tower::route::{Route, RoutePolicy};
use llm_tower::validate::{Rule as ValidateRule, ValidateLayer};
use llm_tower::{BoxLlmService, ChatRequest, ErrorKind, LlmServiceBuilderExt, boxed};
use llm_tower_axum::{ClientKeys, Metrics, MetricsAccess, ModelEntry, OpenAiRouter, Server};
use llm_tower_jobs::{
    Jobs, JobsApiLimits, PostgresStore, SqliteStore, Worker, WorkerHandle, jobs_router_with,
};
use llm_tower_providers::{
    AnthropicConfig, AnthropicProvider, ApiKey, HttpClient, OpenAiConfig, OpenAiProvider,
};
use llm_tower_redis::{RedisConn, RedisOptions};
use llm_tower_test::SimulatedLlm;
use tower::ServiceBuilder;

use crate::config::{
    BudgetScope, BudgetWindow, ChainStep, Config, ConfigError, GroupPick, HedgeConfig,
    JobsStoreKind, LimitKey, OnLimit, ProviderConfig, ProviderKind, Secret, Secrets,
    SimulatedFailure, StoreKind, ValidatorKind, parse_digest,
};

/// Why the gateway could not be built.
#[derive(Debug)]
pub enum BuildError {
    /// The configuration (or a secret it names) is wrong.
    Config(ConfigError),
    /// A component could not be set up (a store did not answer, a provider is invalid…).
    Setup {
        /// What was being set up.
        what: String,
        /// Why it failed (never contains a secret).
        message: String,
    },
}

impl fmt::Display for BuildError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BuildError::Config(e) => e.fmt(f),
            BuildError::Setup { what, message } => write!(f, "cannot set up {what}: {message}"),
        }
    }
}

impl std::error::Error for BuildError {}

impl From<ConfigError> for BuildError {
    fn from(e: ConfigError) -> Self {
        BuildError::Config(e)
    }
}

fn setup(what: impl Into<String>, message: impl fmt::Display) -> BuildError {
    BuildError::Setup {
        what: what.into(),
        message: message.to_string(),
    }
}

/// The built gateway: the router to serve, plus the jobs worker to run next to it.
///
/// The worker is returned, not spawned: run it with [`Gateway::spawn_worker`] (or
/// `worker.run()` where you like) and stop it with the handle.
pub struct Gateway {
    /// The HTTP surface: `/v1/chat/completions`, `/v1/models`, `/v1/jobs…`, `/healthz`,
    /// `/metrics`.
    pub router: Router,
    /// The LLM stack below the HTTP layer (what the jobs worker calls too).
    pub llm: BoxLlmService,
    /// The jobs worker, when jobs are enabled.
    pub worker: Option<(Worker, WorkerHandle)>,
    /// The jobs API, when jobs are enabled.
    pub jobs: Option<Jobs>,
    /// How long in-flight requests may run after a shutdown signal.
    pub grace: Duration,
    /// The server to run `router` with: `[server]`'s timeouts, connection cap and grace.
    pub server: Server,
    /// `/metrics` on a listener of its own (`server.metrics_listen`): address and router.
    pub metrics_listener: Option<(std::net::SocketAddr, Router)>,
}

impl fmt::Debug for Gateway {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Gateway")
            .field("jobs", &self.jobs.is_some())
            .field("grace", &self.grace)
            .finish_non_exhaustive()
    }
}

impl Gateway {
    /// Spawns the jobs worker on the current runtime (if any) and returns its handle and
    /// task; call `handle.shutdown()` then await the task to stop it gracefully.
    pub fn spawn_worker(&mut self) -> Option<(WorkerHandle, tokio::task::JoinHandle<()>)> {
        let (worker, handle) = self.worker.take()?;
        let task = tokio::spawn(async move {
            let stats = worker.run().await;
            tracing::info!(?stats, "jobs worker stopped");
        });
        Some((handle, task))
    }
}

/// Builds the gateway's router, with the jobs worker **spawned** on the current runtime
/// (it stops when the runtime does). Reads secrets from the process environment.
/// For control over the worker and shutdown, and for `[server]`'s timeouts and connection
/// cap ([`Gateway::server`]), use [`build`].
pub async fn app(config: &Config) -> Result<Router, BuildError> {
    let mut gw = build(config, &|k: &str| std::env::var(k).ok()).await?;
    let _ = gw.spawn_worker();
    Ok(gw.router)
}

/// Builds the gateway from `config`, reading the secrets it names through `env`.
pub async fn build(
    config: &Config,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Gateway, BuildError> {
    let secrets = config.resolve_secrets(env)?;
    let redis = RedisPool::default();
    let shared = provider_limits_store(config, &secrets, &redis).await?;
    let Providers {
        services: providers,
        malformed,
        client,
    } = build_providers(config, &secrets, shared.as_ref())?;
    let (routed, route_stats) = build_route(config, &providers);

    let client_limits = build_client_limits(config, &secrets, &redis).await?;
    let cost = build_cost(config, &secrets, &redis).await?;
    let cache = build_cache(config, &secrets, &redis).await?;
    let validate = build_validate(config)?;

    let llm = boxed(
        ServiceBuilder::new()
            .option_layer(client_limits)
            .cost(cost)
            .option_layer(cache)
            .option_layer(validate)
            .service(routed),
    );

    let mut keys = ClientKeys::new();
    for k in &secrets.client_keys {
        let digest =
            parse_digest(&k.blake3).ok_or_else(|| setup("client keys", "malformed key digest"))?;
        keys.insert_digest(digest, k.tenant.as_str());
    }

    let mut models: Vec<ModelEntry> = config
        .routing
        .models
        .iter()
        .map(|(alias, chain)| ModelEntry::alias(alias.clone(), chain.get_ref().clone()))
        .collect();
    let mut real: Vec<String> = config
        .chains
        .values()
        .flat_map(|c| {
            c.get_ref()
                .steps
                .iter()
                .flat_map(|s| s.get_ref().models().map(str::to_owned))
        })
        .filter(|m| !config.routing.models.contains_key(m))
        .collect();
    real.sort();
    real.dedup();
    models.extend(real.into_iter().map(ModelEntry::new));

    let metrics = if config.server.metrics {
        Metrics::prometheus()
    } else {
        Metrics::disabled()
    };
    for (name, read) in malformed {
        metrics.counter_at_scrape(
            "llm_upstream_malformed_headers_total",
            "Rate-limit header values of successful upstream answers that could not be read",
            &[("provider", name)],
            read,
        );
    }
    if let Some(client) = client {
        metrics.counter_at_scrape(
            "llm_upstream_buffer_refusals_total",
            "Upstream answers refused because upstream.max_buffered_bytes were being read",
            &[],
            move || client.buffer_refusals(),
        );
    }
    route_stats.register(&metrics);
    let (metrics_access, metrics_listener) = metrics_access(config, &secrets, &metrics);
    let body_limit =
        usize::try_from(*config.server.body_limit_bytes.get_ref()).unwrap_or(usize::MAX);
    let grace = Duration::from_secs(config.server.shutdown_grace_secs);

    let server = Server::new()
        .header_read_timeout(Duration::from_secs(config.server.header_read_timeout_secs))
        .body_read_timeout(Duration::from_secs(config.server.body_read_timeout_secs))
        .idle_timeout(Duration::from_secs(config.server.idle_timeout_secs))
        .max_connections(config.server.max_connections)
        .grace(grace)
        .metrics(&metrics);

    let mut http = OpenAiRouter::new(llm.clone())
        .models(models)
        .client_keys(keys)
        .body_limit(body_limit)
        .metrics(metrics)
        .metrics_access(metrics_access)
        .known_tasks(known_tasks(config))
        .known_models(known_models(config));

    let (jobs, worker) = if config.jobs.enabled {
        let jobs = build_jobs(config, &secrets).await?;
        let worker = jobs
            .worker(llm.clone())
            .concurrency(config.jobs.workers)
            .shutdown_grace(grace)
            .build();
        http = http.merge_authenticated(jobs_router_with(
            jobs.clone(),
            jobs_limits(config, body_limit),
        ));
        (Some(jobs), Some(worker))
    } else {
        (None, None)
    };

    Ok(Gateway {
        router: http.into_router(),
        llm,
        worker,
        jobs,
        grace,
        server,
        metrics_listener,
    })
}

/// Who reads `/metrics` on the main listener, and the metrics listener if any. Not public
/// beyond loopback unless a token guards it or it has a listener of its own.
fn metrics_access(
    config: &Config,
    secrets: &Secrets,
    metrics: &Metrics,
) -> (MetricsAccess, Option<(std::net::SocketAddr, Router)>) {
    let s = &config.server;
    let access = match &secrets.metrics_token {
        Some(token) => MetricsAccess::bearer(token.expose()),
        None => MetricsAccess::public(),
    };
    if !s.metrics {
        return (MetricsAccess::off(), None);
    }
    if let Some(addr) = &s.metrics_listen {
        // Validated at load.
        let addr = addr.get_ref().parse().ok();
        return (
            MetricsAccess::off(),
            addr.map(|a| (a, metrics.standalone_router(access))),
        );
    }
    if secrets.metrics_token.is_none() && !config.listen_addr().ip().is_loopback() {
        tracing::warn!(
            "/metrics is not served: server.listen is not a loopback address; \
             set server.metrics_listen or server.metrics_token_env"
        );
        return (MetricsAccess::off(), None);
    }
    (access, None)
}

/// The task names the config knows; any other `x-llm-task` is `other` at the edge, so
/// client-made names cannot grow metrics, cost totals, cache scopes, limits or budgets.
fn known_tasks(config: &Config) -> std::collections::BTreeSet<String> {
    let mut known: std::collections::BTreeSet<String> = config
        .routing
        .tasks
        .keys()
        .chain(config.validators.keys())
        .chain(config.cache.ttl_by_task.keys())
        .chain(&config.cache.cacheable_tasks)
        .cloned()
        .collect();
    for b in &config.budgets.limits {
        let b = b.get_ref();
        if let (BudgetScope::Task, Some(t)) = (b.scope, &b.only) {
            known.insert(t.clone());
        }
    }
    known
}

/// The model names the config knows (aliases, chain steps, model maps, prices): the
/// `model` label is one of them or `other`.
fn known_models(config: &Config) -> std::collections::BTreeSet<String> {
    let mut known: std::collections::BTreeSet<String> = config
        .routing
        .models
        .keys()
        .chain(config.prices.keys())
        .cloned()
        .collect();
    for c in config.chains.values() {
        known.extend(
            c.get_ref()
                .steps
                .iter()
                .flat_map(|s| s.get_ref().models().map(str::to_owned)),
        );
    }
    for p in config.providers.values() {
        for (from, to) in &p.get_ref().model_map {
            known.insert(from.clone());
            known.insert(to.clone());
        }
    }
    known
}

/// `[jobs]`'s limits on what clients ask, with the server's body limit.
fn jobs_limits(config: &Config, body_limit: usize) -> JobsApiLimits {
    let j = &config.jobs;
    let mut limits = JobsApiLimits::default()
        .body_limit(body_limit)
        .max_priority(j.max_priority)
        .max_attempts(j.max_attempts)
        .max_backoff(Duration::from_millis(j.max_backoff_ms))
        .max_queued_per_tenant(j.max_queued_per_tenant);
    // A tenant with several keys gets the highest priority any of them allows.
    let mut by_tenant: BTreeMap<&str, i64> = BTreeMap::new();
    for k in &config.auth.keys {
        let k = k.get_ref();
        if let Some(p) = k.max_job_priority {
            let e = by_tenant.entry(k.tenant.as_str()).or_insert(p);
            *e = (*e).max(p);
        }
    }
    for (tenant, p) in by_tenant {
        limits = limits.tenant_max_priority(tenant, p);
    }
    limits
}

// ===== providers =====

/// Reads a provider's count of malformed rate-limit headers (exported at scrape time).
type MalformedCount = Box<dyn Fn() -> u64 + Send + Sync>;

/// The providers, with what the gateway exports about them.
struct Providers {
    services: BTreeMap<String, BoxLlmService>,
    malformed: Vec<(String, MalformedCount)>,
    /// The HTTP client every real provider shares (none when all are simulated).
    client: Option<HttpClient>,
}

/// Where the providers' limits and headroom are shared between replicas: the rate-limit
/// Redis (`[rate_limits] store = "redis"`), when a provider has limits.
struct SharedLimits {
    conn: RedisConn,
    /// One store (one settlement queue) for every provider's buckets.
    store: Arc<llm_tower_redis::rate_limit::RedisRateLimitStore>,
    refresh: Duration,
}

async fn provider_limits_store(
    config: &Config,
    secrets: &Secrets,
    redis: &RedisPool,
) -> Result<Option<SharedLimits>, BuildError> {
    let any = config
        .providers
        .values()
        .any(|p| p.get_ref().rate_limit.is_some());
    if !any || *config.rate_limits.store.get_ref() != StoreKind::Redis {
        return Ok(None);
    }
    let url = secrets
        .rate_limit_redis_url
        .as_ref()
        .ok_or_else(|| setup("provider rate limits", "no Redis URL"))?;
    let conn = redis.get("rate limits", url).await?;
    Ok(Some(SharedLimits {
        store: Arc::new(llm_tower_redis::rate_limit::RedisRateLimitStore::new(
            conn.clone(),
        )),
        conn,
        refresh: Duration::from_millis(config.rate_limits.headroom_refresh_ms),
    }))
}

fn build_providers(
    config: &Config,
    secrets: &Secrets,
    shared: Option<&SharedLimits>,
) -> Result<Providers, BuildError> {
    // One pooled HTTP client for every real provider.
    let needs_http = config
        .providers
        .values()
        .any(|p| p.get_ref().kind != ProviderKind::Simulated);
    let client = if needs_http {
        Some(HttpClient::new(config.upstream.http()).map_err(|e| setup("the HTTP client", e))?)
    } else {
        None
    };
    let mut out = BTreeMap::new();
    let mut malformed = Vec::new();
    for (name, p) in &config.providers {
        let p = p.get_ref();
        let (raw, count) =
            provider_service(name, p, secrets, client.as_ref(), config.upstream.limits())?;
        out.insert(name.clone(), with_provider_limits(name, p, shared, raw));
        malformed.extend(count.map(|c| (name.clone(), c)));
    }
    Ok(Providers {
        services: out,
        malformed,
        client,
    })
}

fn provider_service(
    name: &str,
    p: &ProviderConfig,
    secrets: &Secrets,
    client: Option<&HttpClient>,
    limits: llm_tower_providers::ResponseLimits,
) -> Result<(BoxLlmService, Option<MalformedCount>), BuildError> {
    let key = secrets.provider_keys.get(name);
    // The plain headers and those read from the environment (`headers_env`); the
    // provider marks every extra header value sensitive and never prints one.
    let mut headers = p.headers.clone();
    for (h, v) in secrets.provider_headers.get(name).into_iter().flatten() {
        headers.insert(h.clone(), v.expose().to_owned());
    }
    let models: std::collections::HashMap<String, String> = p
        .model_map
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    match p.kind {
        ProviderKind::Simulated => {
            let sim = p
                .simulated
                .as_ref()
                .map(|s| s.get_ref().clone())
                .unwrap_or_default();
            let kind = match sim.fail_kind {
                SimulatedFailure::Unavailable => ErrorKind::Unavailable,
                SimulatedFailure::RateLimited => ErrorKind::RateLimited,
                SimulatedFailure::Overloaded => ErrorKind::Overloaded,
                SimulatedFailure::Timeout => ErrorKind::Timeout,
            };
            let llm = SimulatedLlm::builder(name)
                .latency(Duration::from_millis(sim.latency_ms))
                .token_delay(Duration::from_millis(sim.token_delay_ms))
                .fail_every(sim.fail_every, kind)
                .build();
            let map: Arc<BTreeMap<String, String>> = Arc::new(p.model_map.clone());
            let svc = boxed(
                ServiceBuilder::new()
                    .map_request(move |mut req: ChatRequest| {
                        if let Some(m) = map.get(&req.model) {
                            req.model = m.clone();
                        }
                        req
                    })
                    .service(llm),
            );
            Ok((svc, None))
        }
        ProviderKind::Openai | ProviderKind::Anthropic => {
            let client =
                client.ok_or_else(|| setup(format!("provider {name:?}"), "no HTTP client"))?;
            let bad = |e| setup(format!("provider {name:?}"), e);
            if p.kind == ProviderKind::Openai {
                let mut c = OpenAiConfig {
                    name: name.to_owned(),
                    api_key: key.map(|k| ApiKey::new(k.expose())),
                    api_key_env: None,
                    models,
                    headers: headers.clone(),
                    limits,
                    ..OpenAiConfig::default()
                };
                if let Some(url) = &p.base_url {
                    c.base_url = url.get_ref().clone();
                }
                let provider = OpenAiProvider::new(c, client).map_err(bad)?;
                let read = provider.clone();
                Ok((
                    boxed(provider),
                    Some(Box::new(move || read.malformed_headers())),
                ))
            } else {
                let mut c = AnthropicConfig {
                    name: name.to_owned(),
                    api_key: key.map(|k| ApiKey::new(k.expose())),
                    api_key_env: None,
                    models,
                    headers: headers.clone(),
                    prompt_caching: p.prompt_caching,
                    limits,
                    ..AnthropicConfig::default()
                };
                if let Some(url) = &p.base_url {
                    c.base_url = url.get_ref().clone();
                }
                let provider = AnthropicProvider::new(c, client).map_err(bad)?;
                let read = provider.clone();
                Ok((
                    boxed(provider),
                    Some(Box::new(move || read.malformed_headers())),
                ))
            }
        }
    }
}

/// The provider's own limits and headroom, right over it, answering `RateLimited` at once
/// so the chain moves to its next step. With `shared`, the buckets live in Redis (keys
/// `provider:<name>:rpm` / `:tpm`, failing open) and the headroom is shared through it
/// (`llm_tower_redis::headroom`), so replicas together stay under the provider's limits.
fn with_provider_limits(
    name: &str,
    p: &ProviderConfig,
    shared: Option<&SharedLimits>,
    svc: BoxLlmService,
) -> BoxLlmService {
    let Some(rl) = &p.rate_limit else {
        return svc;
    };
    let rl = rl.get_ref();
    let mut layer = RateLimitLayer::new()
        .on_limit(LimitPolicy::FallBack)
        .target(name);
    // `provider:` keeps these apart from the client rules' buckets (`rule0:rpm`) in a
    // shared store.
    if let Some(n) = rl.requests_per_minute {
        layer = layer.rule(
            LimitRule::requests(n, Duration::from_secs(60)).named(format!("provider:{name}:rpm")),
        );
    }
    if let Some(n) = rl.tokens_per_minute {
        layer = layer.rule(
            LimitRule::tokens(n, Duration::from_secs(60)).named(format!("provider:{name}:tpm")),
        );
    }
    if rl.min_remaining_requests > 0 || rl.min_remaining_tokens > 0 {
        let tracker = HeadroomTracker::new(rl.min_remaining_requests, rl.min_remaining_tokens);
        let tracker = match shared {
            Some(s) => llm_tower_redis::headroom::share(s.conn.clone(), name, tracker, s.refresh)
                .tracker()
                .clone(),
            None => tracker,
        };
        layer = layer.headroom(tracker);
    }
    if let Some(s) = shared
        && (rl.requests_per_minute.is_some() || rl.tokens_per_minute.is_some())
    {
        layer = layer.store(s.store.clone());
    }
    // `.layer(..)`, not `.rate_limit(..)`: with tower's `limit` feature on, tower's own
    // inherent `ServiceBuilder::rate_limit(num, per)` shadows the extension method.
    boxed(ServiceBuilder::new().layer(layer).service(svc))
}

// ===== route + fallback =====

fn build_route(
    config: &Config,
    providers: &BTreeMap<String, BoxLlmService>,
) -> (Route, RouteStats) {
    let mut policy = RoutePolicy::new();
    let mut stats = RouteStats::default();
    for (name, chain) in &config.chains {
        let c = chain.get_ref();
        let d = Cooldown::default();
        let mut cooldown = Cooldown::new(
            c.breaker_min_calls.unwrap_or(d.min_calls()),
            c.breaker_window_secs
                .map_or(d.window(), Duration::from_secs),
            c.cooldown_secs.map_or(d.duration(), Duration::from_secs),
        );
        if let Some(r) = c.breaker_failure_ratio {
            cooldown = cooldown.failure_ratio(r);
        }
        let targets = c
            .steps
            .iter()
            .filter_map(|s| {
                let s = s.get_ref();
                if !s.group.is_empty() {
                    let (t, group) = build_group(s, providers, cooldown, c.max_cooldown_secs);
                    stats.groups.push((name.clone(), group));
                    return Some(t);
                }
                // Validated at load: every step names a defined provider.
                let svc = providers.get(&s.provider)?.clone();
                let t = FallbackTarget::from_boxed(s.provider.as_str(), svc);
                Some(match &s.model {
                    Some(m) => t.with_model(m.as_str()),
                    None => t,
                })
            })
            .collect();
        let mut fb = Fallback::new(targets);
        if let Some(ms) = c.attempt_timeout_ms {
            fb = fb.timeout(Duration::from_millis(ms));
        }
        if let Some(ms) = c.first_chunk_timeout_ms {
            fb = fb.first_chunk_timeout(Duration::from_millis(ms));
        }
        if let Some(ms) = c.stall_timeout_ms {
            fb = fb.stall_timeout(Duration::from_millis(ms));
        }
        fb = fb.cooldown(cooldown);
        if let Some(secs) = c.max_cooldown_secs {
            fb = fb.max_cooldown(Duration::from_secs(secs));
        }
        match &c.hedge {
            Some(h) => {
                let hedge = hedge_layer(h.get_ref());
                stats.hedges.push((name.clone(), hedge.stats()));
                policy = policy.target(name.as_str(), tower::Layer::layer(&hedge, fb));
            }
            None => policy = policy.target(name.as_str(), fb),
        }
    }
    for (alias, chain) in &config.routing.models {
        // The alias stays the model name: steps with a model of their own replace it.
        policy = policy.alias(alias.as_str(), chain.get_ref().as_str(), alias.as_str());
    }
    for (task, chain) in &config.routing.tasks {
        policy = policy.task(task.as_str(), chain.get_ref().as_str());
    }
    policy = policy.default_target(config.routing.default_chain.get_ref().as_str());
    (Route::new(policy), stats)
}

// ===== balanced groups and hedging =====

/// A chain step that is a balanced group: one fallback target over a [`Balance`] of its
/// members (named `a+b`), each with the chain's breaker settings.
fn build_group(
    step: &ChainStep,
    providers: &BTreeMap<String, BoxLlmService>,
    cooldown: Cooldown,
    max_cooldown_secs: Option<u64>,
) -> (FallbackTarget, BalanceStats) {
    let members: Vec<BalanceTarget> = step
        .group
        .iter()
        .filter_map(|m| {
            // Validated at load: every member names a defined provider.
            let svc = providers.get(m.provider())?.clone();
            let t = BalanceTarget::from_boxed(m.provider(), svc);
            Some(match m.model().or(step.model.as_deref()) {
                Some(model) => t.with_model(model),
                None => t,
            })
        })
        .collect();
    let name = members
        .iter()
        .map(BalanceTarget::name)
        .collect::<Vec<_>>()
        .join("+");
    let pick = match step.pick.unwrap_or_default() {
        GroupPick::P2c => Pick::PowerOfTwo,
        GroupPick::RoundRobin => Pick::RoundRobin,
    };
    let mut group = Balance::new(members).pick(pick).cooldown(cooldown);
    if let Some(secs) = max_cooldown_secs {
        group = group.max_cooldown(Duration::from_secs(secs));
    }
    let stats = group.stats();
    (FallbackTarget::new(name, group), stats)
}

fn hedge_layer(h: &HedgeConfig) -> HedgeLayer {
    let d = HedgeDelay::default();
    let delay = match (h.delay_ms, d) {
        (Some(ms), _) => HedgeDelay::Fixed(Duration::from_millis(ms)),
        (
            None,
            HedgeDelay::Observed {
                percentile,
                min_samples,
            },
        ) => HedgeDelay::Observed {
            percentile: h.percentile.unwrap_or(percentile),
            min_samples: h.min_samples.unwrap_or(min_samples),
        },
        (None, fixed) => fixed,
    };
    HedgeLayer::new().delay(delay).budget(
        h.budget_percent
            .map_or(llm_tower::hedge::DEFAULT_BUDGET, |p| p / 100.0),
    )
}

/// A hedge counter: metric name, help, and how to read it.
type HedgeCounter = (&'static str, &'static str, fn(&HedgeStats) -> u64);

/// The balanced groups' and hedges' counters, read by `/metrics` at scrape time.
#[derive(Default)]
struct RouteStats {
    groups: Vec<(String, BalanceStats)>,
    hedges: Vec<(String, HedgeStats)>,
}

impl RouteStats {
    fn register(self, metrics: &Metrics) {
        for (chain, g) in self.groups {
            for m in g.snapshot() {
                let (g, member) = (g.clone(), m.name.to_string());
                let read = member.clone();
                metrics.counter_at_scrape(
                    "llm_balance_picks_total",
                    "Requests a balanced group sent to each member",
                    &[("chain", chain.clone()), ("member", member)],
                    move || g.picked(&read),
                );
            }
        }
        for (chain, h) in self.hedges {
            let counters: [HedgeCounter; 4] = [
                (
                    "llm_hedge_requests_total",
                    "Requests seen by a chain's hedge",
                    HedgeStats::requests,
                ),
                (
                    "llm_hedge_sent_total",
                    "Second attempts sent (extra upstream calls)",
                    HedgeStats::hedged,
                ),
                (
                    "llm_hedge_second_won_total",
                    "Second attempts that answered first",
                    HedgeStats::second_won,
                ),
                (
                    "llm_hedge_denied_total",
                    "Second attempts the hedge budget refused",
                    HedgeStats::denied,
                ),
            ];
            for (name, help, read) in counters {
                let h = h.clone();
                metrics
                    .counter_at_scrape(name, help, &[("chain", chain.clone())], move || read(&h));
            }
        }
    }
}

// ===== stores =====

/// Redis connections by URL, so stores naming the same server share one connection.
#[derive(Default)]
struct RedisPool(tokio::sync::Mutex<BTreeMap<String, RedisConn>>);

impl RedisPool {
    async fn get(&self, what: &str, url: &Secret) -> Result<RedisConn, BuildError> {
        let mut map = self.0.lock().await;
        if let Some(c) = map.get(url.expose()) {
            return Ok(c.clone());
        }
        let opts = RedisOptions {
            // Store calls sit on the request path: fail fast, the breaker does the rest.
            op_timeout: Duration::from_millis(100),
            ..RedisOptions::default()
        };
        // The URL may hold a password: report only what failed.
        let conn = RedisConn::connect(url.expose(), opts)
            .await
            .map_err(|e| setup(format!("{what} (Redis)"), redact(&e.to_string(), url)))?;
        map.insert(url.expose().to_owned(), conn.clone());
        Ok(conn)
    }
}

fn redact(message: &str, secret: &Secret) -> String {
    message.replace(secret.expose(), "[redacted]")
}

async fn build_client_limits(
    config: &Config,
    secrets: &Secrets,
    redis: &RedisPool,
) -> Result<Option<RateLimitLayer>, BuildError> {
    let rl = &config.rate_limits;
    if rl.rules.is_empty() {
        return Ok(None);
    }
    let mut layer = RateLimitLayer::new();
    // The requested model is the client's choice: names the config does not know share
    // one bucket.
    let models = known_models(config);
    for (i, rule) in rl.rules.iter().enumerate() {
        let r = rule.get_ref();
        let key = |mut rule: LimitRule| {
            rule = match r.key {
                LimitKey::Global => rule,
                LimitKey::Tenant => rule.per_tenant(),
                LimitKey::Model => rule.per_model().known_models(models.iter().cloned()),
                LimitKey::Task => rule.per_task(),
            };
            rule
        };
        if let Some(n) = r.requests_per_minute {
            layer = layer.rule(
                key(LimitRule::requests(n, Duration::from_secs(60))).named(format!("rule{i}:rpm")),
            );
        }
        if let Some(n) = r.tokens_per_minute {
            layer = layer.rule(
                key(LimitRule::tokens(n, Duration::from_secs(60))).named(format!("rule{i}:tpm")),
            );
        }
    }
    layer = layer.on_limit(match rl.on_limit {
        OnLimit::Reject => LimitPolicy::Reject,
        OnLimit::Wait => LimitPolicy::Wait {
            max_wait: Duration::from_millis(rl.max_wait_ms),
        },
    });
    if *rl.store.get_ref() == StoreKind::Redis {
        let url = secrets
            .rate_limit_redis_url
            .as_ref()
            .ok_or_else(|| setup("rate limits", "no Redis URL"))?;
        let conn = redis.get("rate limits", url).await?;
        layer = layer.store(Arc::new(
            llm_tower_redis::rate_limit::RedisRateLimitStore::new(conn),
        ));
    }
    Ok(Some(layer))
}

async fn build_cost(
    config: &Config,
    secrets: &Secrets,
    redis: &RedisPool,
) -> Result<CostLayer, BuildError> {
    let mut prices = PriceTable::new();
    for (model, p) in &config.prices {
        let p = p.get_ref();
        let price = p
            .model_price()
            .map_err(|e| setup(format!("price of {model:?}"), e))?;
        prices.insert(model.clone(), price);
    }
    let mut layer = CostLayer::new(prices);
    for b in &config.budgets.limits {
        let b = b.get_ref();
        let limit = llm_tower::cost::usd_to_nano(b.usd)
            .ok_or_else(|| setup("budgets", "budget out of range"))?;
        let window = match b.per {
            BudgetWindow::Hour => CostWindow::Every(Duration::from_secs(3600)),
            BudgetWindow::Day => CostWindow::Daily,
            BudgetWindow::Month => CostWindow::Monthly,
            BudgetWindow::Total => CostWindow::Total,
        };
        let scope = match (b.scope, &b.only) {
            (BudgetScope::Global, _) => CostScope::Global,
            (BudgetScope::Tenant, None) => CostScope::PerTenant,
            (BudgetScope::Tenant, Some(t)) => CostScope::Tenant(t.as_str().into()),
            (BudgetScope::Task, None) => CostScope::PerTask,
            (BudgetScope::Task, Some(t)) => CostScope::Task(t.as_str().into()),
        };
        layer = layer.budget(Budget::new(scope, limit, window));
    }
    if !config.budgets.limits.is_empty() && *config.budgets.store.get_ref() == StoreKind::Redis {
        let url = secrets
            .budget_redis_url
            .as_ref()
            .ok_or_else(|| setup("budgets", "no Redis URL"))?;
        let conn = redis.get("budgets", url).await?;
        layer = layer.store(Arc::new(llm_tower_redis::budget::RedisBudgetStore::new(
            conn,
        )));
    }
    Ok(layer)
}

async fn build_cache(
    config: &Config,
    secrets: &Secrets,
    redis: &RedisPool,
) -> Result<Option<CacheLayer>, BuildError> {
    let c = &config.cache;
    if !c.enabled {
        return Ok(None);
    }
    let mut layer = match c.store.get_ref() {
        StoreKind::Memory => CacheLayer::in_memory(c.max_memory_mb.saturating_mul(1024 * 1024)),
        StoreKind::Redis => {
            let url = secrets
                .cache_redis_url
                .as_ref()
                .ok_or_else(|| setup("the cache", "no Redis URL"))?;
            let conn = redis.get("the cache", url).await?;
            CacheLayer::new(llm_tower_redis::cache::RedisCacheStore::new(conn))
        }
    };
    layer = layer.default_ttl(Duration::from_secs(c.ttl_secs));
    for (task, secs) in &c.ttl_by_task {
        layer = layer.task_ttl(task.as_str(), Duration::from_secs(*secs));
    }
    for task in &c.cacheable_tasks {
        layer = layer.cacheable_task(task.as_str());
    }
    if let Some(ms) = c.coalesce_timeout_ms {
        layer = layer.coalesce_timeout(Duration::from_millis(ms));
    }
    if let Some(bytes) = c.max_stream_bytes {
        layer = layer.max_stream_bytes(bytes);
    }
    Ok(Some(layer))
}

fn build_validate(config: &Config) -> Result<Option<ValidateLayer>, BuildError> {
    if config.validators.is_empty() {
        return Ok(None);
    }
    let mut layer = ValidateLayer::new();
    for (task, v) in &config.validators {
        let vc = v.get_ref();
        let rule = match vc.kind {
            ValidatorKind::Json => ValidateRule::json(),
            ValidatorKind::JsonSchema => {
                let schema = config
                    .validator_schema(vc)?
                    .ok_or_else(|| setup(format!("validator {task:?}"), "no schema"))?;
                ValidateRule::json_schema(&schema)
                    .map_err(|e| setup(format!("validator {task:?}"), e))?
            }
        };
        layer = layer.task(task.as_str(), rule);
    }
    Ok(Some(layer))
}

async fn build_jobs(config: &Config, secrets: &Secrets) -> Result<Jobs, BuildError> {
    match config.jobs.store.get_ref() {
        JobsStoreKind::Sqlite => {
            let path = config.resolve_path(&config.jobs.path);
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir)
                    .map_err(|e| setup(format!("the jobs directory {}", dir.display()), e))?;
            }
            let store = SqliteStore::open(&path)
                .await
                .map_err(|e| setup(format!("the jobs store {}", path.display()), e))?;
            Ok(Jobs::new(store))
        }
        JobsStoreKind::Postgres => {
            let url = secrets
                .jobs_database_url
                .as_ref()
                .ok_or_else(|| setup("the jobs store", "no PostgreSQL URL"))?;
            let store = PostgresStore::connect(url.expose())
                .await
                .map_err(|e| setup("the jobs store (PostgreSQL)", redact(&e.to_string(), url)))?;
            Ok(Jobs::new(store))
        }
    }
}
