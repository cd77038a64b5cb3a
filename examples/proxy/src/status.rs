//! The gateway's `/status` JSON: what each build exposes ([`Parts`]) and how it is read.
//!
//! The schema is described in docs/operations.md. Every map is keyed by names from the
//! configuration (providers, chains, budgets, tenants and tasks it knows), so its size is
//! bounded by the file, not by traffic.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use llm_tower::cache::MemoryStore;
use llm_tower::cost::{Budget, InMemoryBudgetStore};
use llm_tower::fallback::{CircuitState, FallbackHealth};
use llm_tower::rate_limit::{HeadroomTracker, InMemoryRateLimitStore};
use llm_tower_axum::{StatusQuery, StatusSource};
use llm_tower_jobs::Jobs;
use llm_tower_redis::RedisConn;
use llm_tower_redis::budget::RedisBudgetStore;
use serde_json::{Value, json};

use crate::config::Secret;
use crate::reload::{Carry, ReloadInfo, unix_now};

/// A provider, as `/status` shows it.
#[derive(Clone, Default)]
pub(crate) struct ProviderPart {
    pub(crate) kind: &'static str,
    pub(crate) limits: Option<LimitPart>,
    /// The Anthropic client itself, for `/v1/messages/count_tokens` (kept over a reload).
    pub(crate) anthropic: Option<llm_tower_providers::AnthropicProvider>,
}

/// A provider's own limits: the configured rates, the local buckets (in memory) and the
/// headroom the provider reports.
#[derive(Clone, Default)]
pub(crate) struct LimitPart {
    pub(crate) name: String,
    pub(crate) rpm: Option<u64>,
    pub(crate) tpm: Option<u64>,
    pub(crate) buckets: Option<Arc<InMemoryRateLimitStore>>,
    pub(crate) headroom: Option<HeadroomTracker>,
}

pub(crate) struct ChainPart {
    pub(crate) name: String,
    pub(crate) steps: Vec<(String, Option<String>)>,
    pub(crate) health: FallbackHealth,
}

pub(crate) struct CachePart {
    pub(crate) kind: &'static str,
    pub(crate) memory: Option<Arc<MemoryStore>>,
}

/// One row of the budgets table: a budget for one subject (a tenant, a task, or all).
pub(crate) struct BudgetPart {
    pub(crate) name: String,
    pub(crate) scope: &'static str,
    pub(crate) subject: Option<String>,
    pub(crate) window: &'static str,
    pub(crate) budget: Budget,
    pub(crate) tenant: String,
    pub(crate) task: String,
}

pub(crate) enum BudgetRead {
    Memory(Arc<InMemoryBudgetStore>),
    Redis(RedisBudgetStore),
}

pub(crate) struct RedisPart {
    pub(crate) used_by: Vec<String>,
    pub(crate) conn: RedisConn,
    pub(crate) url: Secret,
}

/// What one build exposes to `/status`.
#[derive(Default)]
pub(crate) struct Parts {
    pub(crate) providers: Vec<(String, ProviderPart)>,
    pub(crate) chains: Vec<ChainPart>,
    pub(crate) cache: Option<CachePart>,
    pub(crate) budgets: Vec<BudgetPart>,
    pub(crate) budget_read: Option<BudgetRead>,
    pub(crate) redis: Vec<RedisPart>,
    pub(crate) jobs: Option<(&'static str, Jobs, Option<Secret>)>,
    /// Shadow traffic counters per task (`[shadow]`).
    pub(crate) shadow: Option<crate::shadow::ShadowStats>,
}

/// How long `/status` waits for a store it asks (budgets in Redis, the jobs store).
const PROBE_TIMEOUT: Duration = Duration::from_millis(500);

/// The `/status` source reading the build in force from `carry`.
pub(crate) fn source(carry: &Carry) -> StatusSource {
    let parts = carry.parts.clone();
    let activity = carry.activity.clone();
    let info = carry.info.clone();
    let started = carry.started;
    let jobs_error = carry.jobs_error.clone();
    StatusSource::new(move |q: StatusQuery| {
        let parts = parts.load_full();
        let activity = activity.snapshot(q.window_minutes);
        let info = info.lock().unwrap_or_else(PoisonError::into_inner).clone();
        let jobs_error = jobs_error.clone();
        async move {
            let activity = serde_json::to_value(&activity).unwrap_or(Value::Null);
            render(&parts, activity, &info, started.elapsed(), &jobs_error).await
        }
    })
}

fn state_name(s: CircuitState) -> (&'static str, Option<u128>) {
    match s {
        CircuitState::Closed => ("closed", None),
        CircuitState::Open { remaining } => ("open", Some(remaining.as_millis())),
        CircuitState::HalfOpen { .. } => ("half_open", None),
    }
}

fn severity(s: &str) -> u8 {
    match s {
        "open" => 2,
        "half_open" => 1,
        _ => 0,
    }
}

async fn render(
    parts: &Parts,
    activity: Value,
    info: &ReloadInfo,
    uptime: Duration,
    jobs_error: &Mutex<Option<String>>,
) -> Value {
    // Chains, and per provider the worst breaker state over the chains naming it.
    let mut chains = serde_json::Map::new();
    let mut breakers: std::collections::BTreeMap<&str, (&'static str, Option<u128>, u64, u64)> =
        std::collections::BTreeMap::new();
    for c in &parts.chains {
        let health = c.health.snapshot();
        let mut serving = None;
        let steps: Vec<Value> = c
            .steps
            .iter()
            .zip(&health)
            .map(|((provider, model), h)| {
                let (state, remaining) = state_name(h.state);
                if serving.is_none() && state != "open" {
                    serving = Some(provider.clone());
                }
                let e = breakers
                    .entry(provider.as_str())
                    .or_insert(("closed", None, 0, 0));
                if severity(state) > severity(e.0) {
                    e.0 = state;
                    e.1 = remaining;
                }
                e.2 += h.recent_calls;
                e.3 += h.recent_failures;
                json!({
                    "provider": provider,
                    "model": model,
                    "state": state,
                    "open_remaining_ms": remaining,
                    "recent_calls": h.recent_calls,
                    "recent_failures": h.recent_failures,
                    "skipped": h.skipped,
                    "opened": h.opened,
                })
            })
            .collect();
        chains.insert(
            c.name.clone(),
            json!({ "serving": serving, "steps": steps }),
        );
    }

    let by_provider = activity.get("by_provider");
    let mut providers = serde_json::Map::new();
    for (name, p) in &parts.providers {
        let (state, remaining, calls, failures) = breakers
            .get(name.as_str())
            .copied()
            .unwrap_or(("closed", None, 0, 0));
        let act = by_provider.and_then(|b| b.get(name));
        let rate_limit = p.limits.as_ref().map(|l| {
            let local = |suffix: &str, limit: Option<u64>| {
                let limit = limit?;
                Some(match &l.buckets {
                    // An absent bucket is a full one.
                    Some(b) => b
                        .remaining(&format!("provider:{}:{suffix}", l.name))
                        .unwrap_or(limit),
                    None => limit,
                })
            };
            let (req, tok) = l
                .headroom
                .as_ref()
                .map_or((None, None), HeadroomTracker::remaining);
            json!({
                "requests_per_minute": l.rpm,
                "tokens_per_minute": l.tpm,
                "remaining_requests": local("rpm", l.rpm),
                "remaining_tokens": local("tpm", l.tpm),
                "shared": l.buckets.is_none(),
                "provider_remaining_requests": req,
                "provider_remaining_tokens": tok,
            })
        });
        providers.insert(
            name.clone(),
            json!({
                "kind": p.kind,
                "breaker": state,
                "open_remaining_ms": remaining,
                "recent_calls": calls,
                "recent_failures": failures,
                "recent_error_ratio": if calls == 0 { 0.0 } else { failures as f64 / calls as f64 },
                "latency_ms": act.and_then(|a| a.get("upstream_latency_ms")).cloned().unwrap_or(Value::Null),
                "served": act.and_then(|a| a.get("served")).cloned().unwrap_or(json!(0)),
                "failed_attempts": act.and_then(|a| a.get("failed_attempts")).cloned().unwrap_or(json!(0)),
                "rate_limit": rate_limit,
            }),
        );
    }

    let totals = activity.get("totals");
    let cache = match &parts.cache {
        None => json!({ "enabled": false }),
        Some(c) => json!({
            "enabled": true,
            "store": c.kind,
            "entries": c.memory.as_ref().map(|m| m.entry_count()),
            "bytes": c.memory.as_ref().map(|m| m.weighted_size()),
            "max_bytes": c.memory.as_ref().map(|m| m.max_bytes()),
            "hits": totals.and_then(|t| t.get("cache_hits")).cloned().unwrap_or(json!(0)),
            "misses": totals.and_then(|t| t.get("cache_misses")).cloned().unwrap_or(json!(0)),
            "hit_ratio": totals.and_then(|t| t.get("cache_hit_ratio")).cloned().unwrap_or(json!(0.0)),
        }),
    };

    let now = SystemTime::now();
    let mut budgets = Vec::new();
    for b in &parts.budgets {
        let key = b.budget.key_at(&b.tenant, &b.task, now);
        let used = match (&parts.budget_read, &key) {
            (Some(BudgetRead::Memory(m)), Some(k)) => Some(m.spent(k)),
            (Some(BudgetRead::Redis(r)), Some(k)) => {
                tokio::time::timeout(PROBE_TIMEOUT, r.spent(k))
                    .await
                    .ok()
                    .and_then(Result::ok)
            }
            _ => None,
        };
        let limit = b.budget.limit();
        budgets.push(json!({
            "name": b.name,
            "scope": b.scope,
            "subject": b.subject,
            "window": b.window,
            "limit_usd": limit as f64 / 1e9,
            "used_usd": used.map(|u| u as f64 / 1e9),
            "used_ratio": used.map(|u| if limit == 0 { 1.0 } else { u as f64 / limit as f64 }),
        }));
    }

    let mut stores: Vec<Value> = parts
        .redis
        .iter()
        .map(|r| {
            json!({
                "kind": "redis",
                "used_by": r.used_by,
                "healthy": r.conn.is_closed(),
                "breaker_open": r.conn.is_open(),
                "failures": r.conn.failure_count(),
                // The URL may hold a password; errors must not repeat it.
                "last_error": r.conn.last_error().map(|e| e.replace(r.url.expose(), "[redacted]")),
            })
        })
        .collect();
    if let Some((kind, jobs, url)) = &parts.jobs {
        let probe = tokio::time::timeout(PROBE_TIMEOUT, jobs.store().count_queued("", 1)).await;
        let healthy = matches!(probe, Ok(Ok(_)));
        let mut last = jobs_error.lock().unwrap_or_else(PoisonError::into_inner);
        match probe {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                let e = e.to_string();
                *last = Some(match url {
                    Some(u) => e.replace(u.expose(), "[redacted]"),
                    None => e,
                });
            }
            Err(_) => *last = Some("timed out".to_owned()),
        }
        stores.push(json!({
            "kind": kind,
            "used_by": ["jobs"],
            "healthy": healthy,
            "failures": Value::Null,
            "last_error": *last,
        }));
    }

    json!({
        "version": 1,
        "generated_at_unix": unix_now(),
        "uptime_secs": uptime.as_secs(),
        "config": {
            "path": info.path.as_ref().map(|p| p.display().to_string()),
            "loaded_at_unix": info.loaded_at_unix,
            "reloads": info.reloads,
            "failed_reloads": info.failed_reloads,
            "last_reload_error": info.last_error,
            "restart_needed": info.restart_needed,
        },
        "providers": providers,
        "chains": chains,
        "cache": cache,
        "budgets": budgets,
        "stores": stores,
        "shadow": parts.shadow.as_ref().map_or_else(|| json!({}), crate::shadow::ShadowStats::to_json),
        "activity": activity,
    })
}
