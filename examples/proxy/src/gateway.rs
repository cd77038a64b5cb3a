//! Building the gateway from a [`Config`]: providers, the layer stack, the HTTP surface
//! and the jobs worker — with the same public layers and builder methods a library user has.
//!
//! # The stack, outermost first
//!
//! ```text
//! HTTP (llm-tower-axum: auth → tenant, body limit, request id, metrics, headers, SSE)
//!  └ shadow                (with [shadow.TASK]) once the answer is complete, a sampled
//!     │                   copy to a candidate chain, in a task of its own
//!     └ client rate limits   reject (or wait) before anything is spent or looked up
//!        └ cost + budgets     reserve the expected cost first, so concurrent requests cannot
//!           │                 slip past a budget; a cache hit below is priced at 0 (and the
//!           │                 saving counted), which needs cost ABOVE the cache
//!           └ cache           a hit skips validation, routing and every provider
//!              └ validate     checks fresh answers only (a cached answer was checked when
//!                 │           stored); its retry goes through routing and fallback again
//!                 └ route     model alias / task type → a chain (and the real model)
//!                    └ hedge    (per chain, when configured) a second attempt after the p95
//!                       └ fallback (one per chain): ordered steps, per-attempt timeouts,
//!                          │                         cooldown, stream commit point
//!                          └ balance (a step that is a group): p2c over its members
//!                             └ per provider: rate limit + provider headroom (OnLimit::FallBack,
//!                                │            so a full provider hands over to the next step;
//!                                │            shared through Redis with [rate_limits] store = "redis")
//!                                └ observe (with [telemetry]): one span per upstream attempt
//!                                   └ provider (OpenAI-compatible, Anthropic or simulated)
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
use llm_tower::cache::{CacheLayer, MemoryStore};
use llm_tower::cost::{
    Budget, BudgetScope as CostScope, BudgetWindow as CostWindow, CostLayer, PriceTable,
};
use llm_tower::dialect::responses::MemoryResponseStore;
use llm_tower::fallback::{Cooldown, Fallback, FallbackTarget};
use llm_tower::hedge::{HedgeDelay, HedgeLayer, HedgeStats};
use llm_tower::observe::ObserveLayer;
use llm_tower::rate_limit::{
    HeadroomTracker, OnLimit as LimitPolicy, RateLimitLayer, Rule as LimitRule,
};
use llm_tower::route::{Route, RoutePolicy};
use llm_tower::validate::ValidateLayer;
use llm_tower::{BoxLlmService, ChatRequest, ErrorKind, LlmServiceBuilderExt, boxed};
use llm_tower_axum::{ClientKeys, Metrics, MetricsAccess, ModelEntry, OpenAiRouter, Server};
use llm_tower_jobs::{
    Jobs, JobsApiLimits, PostgresStore, SqliteStore, Worker, WorkerHandle, jobs_router_with,
};
use llm_tower_providers::SimulatedLlm;
use llm_tower_providers::{
    AnthropicConfig, AnthropicProvider, HttpClient, OpenAiConfig, OpenAiProvider,
};
use llm_tower_redis::{RedisConn, RedisOptions};
use tower::ServiceBuilder;

use crate::config::{
    BudgetScope, BudgetWindow, ChainConfig, ChainStep, Config, ConfigError, GroupPick, HedgeConfig,
    JobsStoreKind, LimitKey, OnLimit, ProviderConfig, ProviderKind, Secret, Secrets,
    SimulatedFailure, StoreKind, parse_digest,
};
use crate::reload::{Carry, CarryState, Fp, fp, secret_fp};
use crate::shadow::{ShadowLayer, ShadowTarget};
use crate::status::{
    BudgetPart, BudgetRead, CachePart, ChainPart, LimitPart, Parts, ProviderPart, RedisPart,
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
    /// OpenTelemetry (`[telemetry]`), when on: flush it before exit.
    pub telemetry: Option<crate::telemetry::Telemetry>,
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
/// (To reload it later, start it with [`Live`](crate::reload::Live) instead.)
pub async fn build(
    config: &Config,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Gateway, BuildError> {
    let carry = Carry::default();
    let secrets = config.resolve_secrets(env)?;
    init_telemetry(config, env, &carry)?;
    let (gateway, next, parts) = build_with(config, secrets, &carry).await?;
    carry.commit(next, &gateway.llm, parts);
    Ok(gateway)
}

/// Sets up telemetry once, before the first build: its exporters outlive a reload, so
/// `[telemetry]` takes effect at start only.
pub(crate) fn init_telemetry(
    config: &Config,
    env: &dyn Fn(&str) -> Option<String>,
    carry: &Carry,
) -> Result<(), BuildError> {
    if carry.telemetry.get().is_none() {
        let t = crate::telemetry::build(config, env).map_err(|e| setup("telemetry", e))?;
        let _ = carry.telemetry.set(t);
    }
    Ok(())
}

/// [`build`], reusing what `carry` holds from the previous build where the configuration
/// is unchanged; the caller commits the returned state once it serves the new build.
pub(crate) async fn build_with(
    config: &Config,
    secrets: Secrets,
    carry: &Carry,
) -> Result<(Gateway, CarryState, Parts), BuildError> {
    let telemetry = carry.telemetry.get().cloned().flatten();
    let prev = carry.previous();
    let mut next = CarryState::default();
    let mut parts = Parts::default();
    let redis = RedisPool::from_previous(&prev);
    let shared = provider_limits_store(config, &secrets, &redis).await?;
    let Providers {
        services: providers,
        malformed,
        client,
        anthropic,
    } = build_providers(
        config,
        &secrets,
        shared.as_ref(),
        telemetry.is_some(),
        &prev,
        &mut next,
    )?;
    parts.providers = next
        .providers
        .iter()
        .map(|(n, (_, _, p))| (n.clone(), p.clone()))
        .collect();
    let (routed, route_stats) = build_route(config, &providers, &prev, &mut next, &mut parts);
    let count_tokens = token_counter(config, routed.clone(), anthropic);

    let client_limits = build_client_limits(config, &secrets, &redis, &prev, &mut next).await?;
    let cost = build_cost(
        config, &secrets, &redis, carry, &prev, &mut next, &mut parts,
    )
    .await?;
    let cache = build_cache(config, &secrets, &redis, &prev, &mut next, &mut parts).await?;
    let validate = build_validate(config)?;
    let shadow = build_shadow(config, &next)?;
    parts.shadow = shadow.as_ref().map(ShadowLayer::stats);

    // Shadow outermost: it sees the answer the client gets, and its copies go straight to
    // the candidate chain, past none of the client's limits, budgets or cache.
    let llm = boxed(
        ServiceBuilder::new()
            .option_layer(shadow)
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

    // One recorder for the process: a reload keeps the counters.
    let metrics = carry
        .metrics
        .get_or_init(|| {
            if config.server.metrics {
                Metrics::prometheus()
            } else {
                Metrics::disabled()
            }
        })
        .clone();
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
    if let Some(stats) = &parts.shadow {
        stats.register(&metrics);
    }
    let status = crate::status::source(carry);
    let (metrics_access, metrics_listener) = metrics_access(config, &secrets, &metrics, &status);
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
        .metrics_access(metrics_access.clone())
        .known_tasks(known_tasks(config))
        .known_models(known_models(config))
        .activity(carry.activity.clone())
        .merge(llm_tower_axum::status_router(metrics_access, status))
        .count_tokens(count_tokens);
    if let Some(t) = &telemetry {
        http = http.otel(t.tracing.clone());
    }

    // The jobs store and worker are made once; the worker calls the stack in force.
    let (jobs, worker) = match carry.jobs.get() {
        Some(jobs) => (jobs.clone(), None),
        None if config.jobs.enabled => {
            let jobs = build_jobs(config, &secrets).await?;
            let current = crate::reload::CurrentLlm(carry.llm.clone());
            let worker = jobs
                .worker(boxed(current))
                .concurrency(config.jobs.workers)
                .shutdown_grace(grace)
                .build();
            let _ = carry.jobs.set(Some(jobs.clone()));
            (Some(jobs), Some(worker))
        }
        None => {
            let _ = carry.jobs.set(None);
            (None, None)
        }
    };
    if let Some(jobs) = &jobs
        && config.jobs.enabled
    {
        http = http.merge_authenticated(jobs_router_with(
            jobs.clone(),
            jobs_limits(config, body_limit),
        ));
        let kind = match config.jobs.store.get_ref() {
            JobsStoreKind::Sqlite => "sqlite",
            JobsStoreKind::Postgres => "postgres",
        };
        parts.jobs = Some((kind, jobs.clone(), secrets.jobs_database_url.clone()));
    }
    // Stored Responses answers live in the jobs database; without jobs, in memory.
    if config.responses.store {
        let r = &config.responses;
        let response_store = jobs
            .as_ref()
            .and_then(|j| j.store().response_store())
            .unwrap_or_else(|| Arc::new(MemoryResponseStore::new(r.memory_capacity)));
        http = http.response_store(response_store, Duration::from_secs(r.retention_secs));
    }
    parts.redis = redis.parts(&mut next);

    let gateway = Gateway {
        router: http.into_router(),
        llm,
        worker,
        jobs,
        grace,
        server,
        metrics_listener,
        telemetry,
    };
    Ok((gateway, next, parts))
}

/// Who reads `/metrics` on the main listener, and the metrics listener if any. Not public
/// beyond loopback unless a token guards it or it has a listener of its own.
fn metrics_access(
    config: &Config,
    secrets: &Secrets,
    metrics: &Metrics,
    status: &llm_tower_axum::StatusSource,
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
            addr.map(|a| {
                let status = llm_tower_axum::status_router(access.clone(), status.clone());
                (a, metrics.standalone_router_with(access, status))
            }),
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
        .chain(config.shadow.keys())
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
    /// The Anthropic providers by name, for `count_tokens`.
    anthropic: BTreeMap<String, AnthropicProvider>,
}

/// Where the providers' limits and headroom are shared between replicas: the rate-limit
/// Redis (`[rate_limits] store = "redis"`), when a provider has limits.
struct SharedLimits {
    /// What the providers' fingerprints include (the store's URL digest, the refresh).
    fp: String,
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
        fp: format!(
            "{}:{}",
            secret_fp(Some(url.expose())),
            config.rate_limits.headroom_refresh_ms
        ),
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
    observe: bool,
    prev: &CarryState,
    next: &mut CarryState,
) -> Result<Providers, BuildError> {
    // One pooled HTTP client for every real provider (kept over a reload when
    // `[upstream]` is unchanged, with its open connections).
    let needs_http = config
        .providers
        .values()
        .any(|p| p.get_ref().kind != ProviderKind::Simulated);
    let http_fp = fp(&[&config.upstream]);
    let client = match &prev.http {
        Some((f, c)) if needs_http && *f == http_fp => Some(c.clone()),
        _ if needs_http => {
            Some(HttpClient::new(config.upstream.http()).map_err(|e| setup("the HTTP client", e))?)
        }
        _ => None,
    };
    next.http = client.clone().map(|c| (http_fp, c));
    let mut out = BTreeMap::new();
    let mut malformed = Vec::new();
    let mut anthropic = BTreeMap::new();
    for (name, p) in &config.providers {
        let p = p.get_ref();
        let mut secret_digests: Vec<String> = vec![secret_fp(
            secrets.provider_keys.get(name).map(|k| k.expose()),
        )];
        for (h, v) in secrets.provider_headers.get(name).into_iter().flatten() {
            secret_digests.push(format!("{h}={}", secret_fp(Some(v.expose()))));
        }
        let f = fp(&[
            name,
            p,
            &config.upstream,
            &secret_digests,
            &shared.map(|s| s.fp.as_str()),
        ]);
        if let Some((pf, svc, part)) = prev.providers.get(name)
            && *pf == f
        {
            // Unchanged: the same service, with its limit buckets and headroom.
            out.insert(name.clone(), svc.clone());
            anthropic.extend(part.anthropic.clone().map(|c| (name.clone(), c)));
            next.providers
                .insert(name.clone(), (f, svc.clone(), part.clone()));
            continue;
        }
        let (mut raw, count, claude) =
            provider_service(name, p, secrets, client.as_ref(), config.upstream.limits())?;
        if observe {
            // One span per upstream call: below the provider's own limits (a provider
            // skipped for them was not called).
            raw = boxed(
                ServiceBuilder::new()
                    .layer(ObserveLayer::new(name.as_str()))
                    .service(raw),
            );
        }
        let (svc, limits) = with_provider_limits(name, p, shared, raw);
        let part = ProviderPart {
            kind: p.kind.as_str(),
            limits,
            anthropic: claude.clone(),
        };
        next.providers.insert(name.clone(), (f, svc.clone(), part));
        out.insert(name.clone(), svc);
        malformed.extend(count.map(|c| (name.clone(), c)));
        anthropic.extend(claude.map(|c| (name.clone(), c)));
    }
    Ok(Providers {
        services: out,
        malformed,
        client,
        anthropic,
    })
}

fn provider_service(
    name: &str,
    p: &ProviderConfig,
    secrets: &Secrets,
    client: Option<&HttpClient>,
    limits: llm_tower_providers::ResponseLimits,
) -> Result<
    (
        BoxLlmService,
        Option<MalformedCount>,
        Option<AnthropicProvider>,
    ),
    BuildError,
> {
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
                .retry_after(Duration::from_secs(sim.retry_after_secs))
                .invalid_json_rate(sim.invalid_json_rate)
                .wrong_answer_rate(sim.wrong_answer_rate)
                .quality_seed(sim.quality_seed)
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
            Ok((svc, None, None))
        }
        ProviderKind::Openai | ProviderKind::Anthropic => {
            let client =
                client.ok_or_else(|| setup(format!("provider {name:?}"), "no HTTP client"))?;
            let bad = |e| setup(format!("provider {name:?}"), e);
            if p.kind == ProviderKind::Openai {
                let mut c = OpenAiConfig {
                    name: name.to_owned(),
                    api_key: key.cloned(),
                    api_key_env: None,
                    models,
                    headers: headers.clone(),
                    limits,
                    responses: p.responses,
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
                    None,
                ))
            } else {
                let mut c = AnthropicConfig {
                    name: name.to_owned(),
                    api_key: key.cloned(),
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
                    boxed(provider.clone()),
                    Some(Box::new(move || read.malformed_headers())),
                    Some(provider),
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
) -> (BoxLlmService, Option<LimitPart>) {
    let Some(rl) = &p.rate_limit else {
        return (svc, None);
    };
    let rl = rl.get_ref();
    let mut part = LimitPart {
        name: name.to_owned(),
        rpm: rl.requests_per_minute,
        tpm: rl.tokens_per_minute,
        ..LimitPart::default()
    };
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
        part.headroom = Some(tracker.clone());
        layer = layer.headroom(tracker);
    }
    if let Some(s) = shared
        && (rl.requests_per_minute.is_some() || rl.tokens_per_minute.is_some())
    {
        layer = layer.store(s.store.clone());
    } else {
        // The layer's own in-memory store, kept here too so `/status` reads its buckets.
        let buckets = Arc::new(llm_tower::rate_limit::InMemoryRateLimitStore::new());
        part.buckets = Some(buckets.clone());
        layer = layer.store(buckets);
    }
    // `.layer(..)`, not `.rate_limit(..)`: with tower's `limit` feature on, tower's own
    // inherent `ServiceBuilder::rate_limit(num, per)` shadows the extension method.
    (
        boxed(ServiceBuilder::new().layer(layer).service(svc)),
        Some(part),
    )
}

// ===== route + fallback =====

fn build_route(
    config: &Config,
    providers: &BTreeMap<String, BoxLlmService>,
    prev: &CarryState,
    next: &mut CarryState,
    parts: &mut Parts,
) -> (Route, RouteStats) {
    let mut policy = RoutePolicy::new();
    let mut stats = RouteStats::default();
    for (name, chain) in &config.chains {
        let c = chain.get_ref();
        // Unchanged steps over unchanged providers: the same chain, breakers, balanced
        // groups and hedge statistics included.
        let step_fps: Vec<Vec<Option<Fp>>> = c
            .steps
            .iter()
            .map(|s| {
                s.get_ref()
                    .providers()
                    .map(|p| next.providers.get(p).map(|p| p.0))
                    .collect()
            })
            .collect();
        let f = fp(&[name, c, &step_fps]);
        let built = match prev.chains.get(name) {
            Some((pf, built)) if *pf == f => built.clone(),
            _ => chain_service(name, c, providers),
        };
        next.chains.insert(name.clone(), (f, built.clone()));
        parts.chains.push(ChainPart {
            name: name.clone(),
            steps: c
                .steps
                .iter()
                .map(|s| {
                    let s = s.get_ref();
                    let provider = s.providers().collect::<Vec<_>>().join("+");
                    (provider, s.model.clone())
                })
                .collect(),
            health: built.fallback.health(),
        });
        stats.groups.extend(built.stats.groups.iter().cloned());
        stats.hedges.extend(built.stats.hedges.iter().cloned());
        policy = policy.target(name.as_str(), built.service);
    }
    for (alias, chain) in &config.routing.models {
        // The alias stays the model name: steps with a model of their own replace it.
        policy = policy.alias(alias.as_str(), chain.get_ref().as_str(), alias.as_str());
    }
    for (task, chain) in &config.routing.tasks {
        policy = policy.task(task.as_str(), chain.get_ref().as_str());
    }
    policy = policy.default_target(config.routing.default_chain.get_ref().as_str());
    if !config.routing.catch_all {
        // A typo in `model` is a 404, not a call to the default (maybe dearest) chain.
        policy = policy.default_for_models(known_models(config));
    }
    (Route::new(policy), stats)
}

/// One chain as built: its fallback (whose health `/status` reads), the service that
/// serves it (the fallback, hedged when configured) and its groups' and hedge's counters.
#[derive(Clone)]
pub(crate) struct BuiltChain {
    fallback: Fallback,
    service: BoxLlmService,
    stats: RouteStats,
}

fn chain_service(
    name: &str,
    c: &ChainConfig,
    providers: &BTreeMap<String, BoxLlmService>,
) -> BuiltChain {
    let mut stats = RouteStats::default();
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
                stats.groups.push((name.to_owned(), group));
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
    let service = match &c.hedge {
        Some(h) => {
            let hedge = hedge_layer(h.get_ref());
            stats.hedges.push((name.to_owned(), hedge.stats()));
            boxed(tower::Layer::layer(&hedge, fb.clone()))
        }
        None => boxed(fb.clone()),
    };
    BuiltChain {
        fallback: fb,
        service,
        stats,
    }
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
#[derive(Default, Clone)]
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

/// `POST /v1/messages/count_tokens`: routed like a request; when the chain's first step is
/// an Anthropic provider, it counts (`/v1/messages/count_tokens` upstream), otherwise the
/// text-length estimate answers. Not an LLM call: no limit, budget or cache applies.
fn token_counter(
    config: &Config,
    route: Route,
    anthropic: BTreeMap<String, AnthropicProvider>,
) -> llm_tower_axum::CountTokens {
    // chain → (its first step's Anthropic provider, the step's model).
    let first: BTreeMap<String, (AnthropicProvider, Option<String>)> = config
        .chains
        .iter()
        .filter_map(|(name, c)| {
            let step = c.get_ref().steps.first()?.get_ref();
            let p = anthropic.get(&step.provider)?.clone();
            Some((name.clone(), (p, step.model.clone())))
        })
        .collect();
    let first = Arc::new(first);
    Arc::new(move |mut req: ChatRequest| {
        let resolved = route
            .resolve(&req)
            .map(|(chain, model)| (first.get(chain).cloned(), model));
        Box::pin(async move {
            let (provider, model) = resolved?;
            match provider {
                Some((p, step_model)) => {
                    req.model = step_model.unwrap_or(model);
                    p.count_tokens(&req).await
                }
                None => Ok(llm_tower::dialect::messages::estimate_input_tokens(&req)),
            }
        })
    })
}

// ===== stores =====

/// Redis connections by URL, so stores naming the same server share one connection
/// (also across a reload), with the stores using each.
#[derive(Default)]
struct RedisPool {
    previous: BTreeMap<String, RedisConn>,
    used: tokio::sync::Mutex<BTreeMap<String, (RedisConn, Vec<String>)>>,
}

impl RedisPool {
    fn from_previous(prev: &CarryState) -> Self {
        Self {
            previous: prev.redis.clone(),
            used: tokio::sync::Mutex::default(),
        }
    }

    /// The connections used by this build (into `next`), for `/status`.
    fn parts(&self, next: &mut CarryState) -> Vec<RedisPart> {
        let used = self.used.try_lock().map(|m| m.clone()).unwrap_or_default();
        used.into_iter()
            .map(|(url, (conn, mut used_by))| {
                next.redis.insert(url.clone(), conn.clone());
                used_by.dedup();
                RedisPart {
                    used_by,
                    conn,
                    url: Secret::new(url),
                }
            })
            .collect()
    }

    async fn get(&self, what: &str, url: &Secret) -> Result<RedisConn, BuildError> {
        let mut map = self.used.lock().await;
        if let Some((c, used_by)) = map.get_mut(url.expose()) {
            used_by.push(what.to_owned());
            return Ok(c.clone());
        }
        if let Some(c) = self.previous.get(url.expose()) {
            map.insert(url.expose().to_owned(), (c.clone(), vec![what.to_owned()]));
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
        map.insert(
            url.expose().to_owned(),
            (conn.clone(), vec![what.to_owned()]),
        );
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
    prev: &CarryState,
    next: &mut CarryState,
) -> Result<Option<RateLimitLayer>, BuildError> {
    let rl = &config.rate_limits;
    if rl.rules.is_empty() {
        return Ok(None);
    }
    // The requested model is the client's choice: names the config does not know share
    // one bucket.
    let models = known_models(config);
    let f = fp(&[
        rl,
        &models,
        &secret_fp(secrets.rate_limit_redis_url.as_ref().map(Secret::expose)),
    ]);
    if let Some((pf, layer)) = &prev.client_limits
        && *pf == f
    {
        if *rl.store.get_ref() == StoreKind::Redis
            && let Some(url) = &secrets.rate_limit_redis_url
        {
            redis.get("rate limits", url).await?;
        }
        next.client_limits = Some((f, layer.clone()));
        return Ok(Some(layer.clone()));
    }
    let mut layer = RateLimitLayer::new();
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
    next.client_limits = Some((f, layer.clone()));
    Ok(Some(layer))
}

async fn build_cost(
    config: &Config,
    secrets: &Secrets,
    redis: &RedisPool,
    carry: &Carry,
    prev: &CarryState,
    next: &mut CarryState,
    parts: &mut Parts,
) -> Result<CostLayer, BuildError> {
    let redis_store =
        !config.budgets.limits.is_empty() && *config.budgets.store.get_ref() == StoreKind::Redis;
    let budget_url = secrets.budget_redis_url.as_ref().filter(|_| redis_store);
    let f = fp(&[
        &config.prices,
        &config.budgets,
        &secret_fp(budget_url.map(Secret::expose)),
    ]);
    let reused = prev
        .cost
        .as_ref()
        .filter(|(pf, _)| *pf == f)
        .map(|(_, l)| l.clone());
    budget_parts(config, parts);
    parts.budget_read = Some(BudgetRead::Memory(carry.budget_mem.clone()));
    if let Some(url) = budget_url {
        let conn = redis.get("budgets", url).await?;
        parts.budget_read = Some(BudgetRead::Redis(
            llm_tower_redis::budget::RedisBudgetStore::new(conn),
        ));
    }
    if let Some(layer) = reused {
        next.cost = Some((f, layer.clone()));
        return Ok(layer);
    }
    let mut layer = CostLayer::new(price_table(config)?);
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
    // In memory, spend is kept across reloads: a budget with the same scope and window
    // has the same key, and keeps what it has spent.
    layer = layer.store(carry.budget_mem.clone());
    if redis_store {
        let url = secrets
            .budget_redis_url
            .as_ref()
            .ok_or_else(|| setup("budgets", "no Redis URL"))?;
        let conn = redis.get("budgets", url).await?;
        layer = layer.store(Arc::new(llm_tower_redis::budget::RedisBudgetStore::new(
            conn,
        )));
    }
    next.cost = Some((f, layer.clone()));
    Ok(layer)
}

/// The budgets' rows for `/status`: per-tenant and per-task budgets get one row per
/// tenant and task the config knows.
fn budget_parts(config: &Config, parts: &mut Parts) {
    let mut tenants: Vec<String> = config
        .auth
        .keys
        .iter()
        .map(|k| k.get_ref().tenant.clone())
        .collect();
    if tenants.is_empty() {
        tenants.push(llm_tower_axum::ANONYMOUS_TENANT.to_owned());
    }
    tenants.sort();
    tenants.dedup();
    let tasks: Vec<String> = known_tasks(config).into_iter().collect();
    for b in &config.budgets.limits {
        let b = b.get_ref();
        let Some(limit) = llm_tower::cost::usd_to_nano(b.usd) else {
            continue;
        };
        let (window, cw) = match b.per {
            BudgetWindow::Hour => ("hour", CostWindow::Every(Duration::from_secs(3600))),
            BudgetWindow::Day => ("day", CostWindow::Daily),
            BudgetWindow::Month => ("month", CostWindow::Monthly),
            BudgetWindow::Total => ("total", CostWindow::Total),
        };
        let row = |scope: CostScope, subject: Option<String>, tenant: &str, task: &str| {
            let budget = Budget::new(scope, limit, cw);
            BudgetPart {
                name: budget_name(budget.scope()),
                scope: match b.scope {
                    BudgetScope::Global => "global",
                    BudgetScope::Tenant => "tenant",
                    BudgetScope::Task => "task",
                },
                subject,
                window,
                budget,
                tenant: tenant.to_owned(),
                task: task.to_owned(),
            }
        };
        match (b.scope, &b.only) {
            (BudgetScope::Global, _) => parts.budgets.push(row(CostScope::Global, None, "", "")),
            (BudgetScope::Tenant, Some(t)) => parts.budgets.push(row(
                CostScope::Tenant(t.as_str().into()),
                Some(t.clone()),
                t,
                "",
            )),
            (BudgetScope::Task, Some(t)) => parts.budgets.push(row(
                CostScope::Task(t.as_str().into()),
                Some(t.clone()),
                "",
                t,
            )),
            (BudgetScope::Tenant, None) => {
                for t in &tenants {
                    parts
                        .budgets
                        .push(row(CostScope::PerTenant, Some(t.clone()), t, ""));
                }
            }
            (BudgetScope::Task, None) => {
                for t in &tasks {
                    parts
                        .budgets
                        .push(row(CostScope::PerTask, Some(t.clone()), "", t));
                }
            }
        }
    }
}

fn budget_name(scope: &CostScope) -> String {
    match scope {
        CostScope::Global => "global".to_owned(),
        CostScope::PerTenant => "per tenant".to_owned(),
        CostScope::PerTask => "per task".to_owned(),
        CostScope::Tenant(t) => format!("tenant {t}"),
        CostScope::Task(t) => format!("task {t}"),
    }
}

async fn build_cache(
    config: &Config,
    secrets: &Secrets,
    redis: &RedisPool,
    prev: &CarryState,
    next: &mut CarryState,
    parts: &mut Parts,
) -> Result<Option<CacheLayer>, BuildError> {
    let c = &config.cache;
    if !c.enabled {
        return Ok(None);
    }
    let f = fp(&[
        c,
        &secret_fp(secrets.cache_redis_url.as_ref().map(Secret::expose)),
    ]);
    let mut layer = match c.store.get_ref() {
        StoreKind::Memory => {
            let max = c.max_memory_mb.saturating_mul(1024 * 1024);
            // The entries stay over a reload while the size does.
            let store = match &prev.cache_mem {
                Some((m, s)) if *m == max => s.clone(),
                _ => Arc::new(MemoryStore::new(max)),
            };
            next.cache_mem = Some((max, store.clone()));
            parts.cache = Some(CachePart {
                kind: "memory",
                memory: Some(store.clone()),
            });
            CacheLayer::from_arc(store)
        }
        StoreKind::Redis => {
            let url = secrets
                .cache_redis_url
                .as_ref()
                .ok_or_else(|| setup("the cache", "no Redis URL"))?;
            let conn = redis.get("the cache", url).await?;
            parts.cache = Some(CachePart {
                kind: "redis",
                memory: None,
            });
            CacheLayer::new(llm_tower_redis::cache::RedisCacheStore::new(conn))
        }
    };
    if let Some((pf, l)) = &prev.cache
        && *pf == f
    {
        // Unchanged: the same layer (its counters and in-flight coalescing too).
        next.cache = Some((f, l.clone()));
        return Ok(Some(l.clone()));
    }
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
    next.cache = Some((f, layer.clone()));
    Ok(Some(layer))
}

/// `[shadow.TASK]`: the shadow layer over this build's chains (none when no task is
/// shadowed).
fn build_shadow(config: &Config, built: &CarryState) -> Result<Option<ShadowLayer>, BuildError> {
    if config.shadow.is_empty() {
        return Ok(None);
    }
    let mut layer = ShadowLayer::new(price_table(config)?);
    for (task, s) in &config.shadow {
        let s = s.get_ref();
        let chain = s.chain.get_ref();
        // Validated at load: the chain exists.
        let Some((_, c)) = built.chains.get(chain) else {
            return Err(setup(
                format!("shadow {task:?}"),
                format!("no chain {chain:?}"),
            ));
        };
        let mut t = ShadowTarget::new(task.as_str(), chain.as_str(), c.service.clone())
            .sample_rate(s.sample_rate)
            .max_in_flight(s.max_in_flight)
            .timeout(Duration::from_millis(s.timeout_ms));
        if let Some(usd) = s.budget_usd {
            let nano = llm_tower::cost::usd_to_nano(usd)
                .ok_or_else(|| setup(format!("shadow {task:?}"), "budget out of range"))?;
            t = t.budget(nano);
        }
        if let Some(m) = &s.model {
            t = t.model(m.as_str());
        }
        if let Some(seed) = s.seed {
            t = t.seed(seed);
        }
        if let Some(rule) = config.validator_rule(task) {
            t = t.validator(rule.clone());
        }
        layer = layer.target(t);
    }
    Ok(Some(layer))
}

/// The configuration's price table (`[prices]`).
pub(crate) fn price_table(config: &Config) -> Result<PriceTable, BuildError> {
    let mut prices = PriceTable::new();
    for (model, p) in &config.prices {
        let p = p.get_ref();
        let price = p
            .model_price()
            .map_err(|e| setup(format!("price of {model:?}"), e))?;
        prices = prices.with(model.clone(), price);
    }
    Ok(prices)
}

fn build_validate(config: &Config) -> Result<Option<ValidateLayer>, BuildError> {
    if config.validators.is_empty() {
        return Ok(None);
    }
    let mut layer = ValidateLayer::new();
    for task in config.validators.keys() {
        // The rule the config check built: its schema is compiled once, there.
        let rule = config
            .validator_rule(task)
            .cloned()
            .ok_or_else(|| setup(format!("validator {task:?}"), "no rule"))?;
        layer = layer.task(task.as_str(), rule);
    }
    Ok(Some(layer))
}

/// The services `eval` runs candidates on: every chain and every provider, built as the
/// gateway builds them but without the client-facing layers (rate limits, budgets, cost,
/// validation); with `use_cache`, each goes through the configured cache. Providers' own
/// limits apply, counted in this process only.
pub(crate) async fn eval_services(
    config: &Config,
    env: &dyn Fn(&str) -> Option<String>,
    use_cache: bool,
) -> Result<
    (
        BTreeMap<String, BoxLlmService>,
        BTreeMap<String, BoxLlmService>,
    ),
    BuildError,
> {
    let secrets = config.resolve_secrets(env)?;
    let prev = CarryState::default();
    let mut next = CarryState::default();
    let providers = build_providers(config, &secrets, None, false, &prev, &mut next)?.services;
    let mut chains: BTreeMap<String, BoxLlmService> = config
        .chains
        .iter()
        .map(|(name, c)| {
            (
                name.clone(),
                chain_service(name, c.get_ref(), &providers).service,
            )
        })
        .collect();
    let mut providers = providers;
    if use_cache {
        let redis = RedisPool::default();
        let mut parts = Parts::default();
        if let Some(cache) =
            build_cache(config, &secrets, &redis, &prev, &mut next, &mut parts).await?
        {
            for svc in chains.values_mut().chain(providers.values_mut()) {
                *svc = boxed(tower::Layer::layer(&cache, svc.clone()));
            }
        }
    }
    Ok((chains, providers))
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
