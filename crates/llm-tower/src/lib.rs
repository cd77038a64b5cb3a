//! Tower middleware for LLM calls: `Layer`s over one LLM `Service`
//! (`async fn(ChatRequest) -> Result<LlmResponse, LlmError>`).
//!
//! Each production pattern for LLM-backed products is its own layer, behind its own cargo
//! feature, so an application composes exactly the stack it needs with
//! [`tower::ServiceBuilder`] and the [`LlmServiceBuilderExt`] methods:
//!
//! | feature | module | what it does |
//! |---|---|---|
//! | `route` | [`route`] | pick a target (and real model) by task type or model alias |
//! | `fallback` | [`fallback`] | ordered chain with timeouts, cooldown and a stream commit point |
//! | `validate` | [`validate`] | check outputs (JSON, JSON Schema, functions), retry once with a reminder |
//! | `cache` | [`cache`] | answer identical deterministic requests from a store |
//! | `rate-limit` | [`rate_limit`] | requests and tokens per window, keyed by tenant/model/task |
//! | `cost` | [`cost`] | price every response, total it, enforce budgets |
//!
//! Layers never depend on each other: they talk through request extensions
//! ([`TaskType`], [`Tenant`], …) and [`ResponseMeta`]. The core contract is re-exported at
//! the crate root.
//!
//! # Example
//!
//! A primary model that answers 503 falls back to a backup; the stack also prices every
//! answer, limits each tenant, caches deterministic requests and checks JSON outputs of the
//! `extract` task. Order matters: outer layers see what inner layers produce (cost sees the
//! cache's hits, the cache stores only validated answers).
//!
//! ```
//! # #[cfg(all(feature = "cache", feature = "fallback", feature = "validate", feature = "rate-limit", feature = "cost"))]
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), llm_tower::LlmError> {
//! use std::time::Duration;
//!
//! use llm_tower::cache::CacheLayer;
//! use llm_tower::cost::{CostLayer, ModelPrice, PriceTable};
//! use llm_tower::fallback::{FallbackLayer, FallbackTarget};
//! use llm_tower::rate_limit::{RateLimitLayer, Rule as Limit};
//! use llm_tower::validate::{Rule, ValidateLayer};
//! use llm_tower::{ChatRequest, LlmError, LlmServiceBuilderExt, Message};
//! use llm_tower_test::{MockLlm, Step};
//! use tower::{ServiceBuilder, ServiceExt};
//!
//! let primary = MockLlm::new("primary").then(Step::error(LlmError::unavailable("503")));
//! let backup = MockLlm::new("backup");
//! let prices = PriceTable::new()
//!     .with("gpt-4o-mini", ModelPrice::per_mtok_usd(0.15, 0.60, Some(0.075)).unwrap());
//!
//! let llm = ServiceBuilder::new()
//!     .cost(CostLayer::new(prices))
//!     .llm_rate_limit(
//!         RateLimitLayer::new().rule(Limit::requests(600, Duration::from_secs(60)).per_tenant()),
//!     )
//!     .cache(CacheLayer::in_memory(64 << 20))
//!     .validate(ValidateLayer::new().task("extract", Rule::json()))
//!     .fallback(
//!         FallbackLayer::new(vec![FallbackTarget::new("backup", backup)])
//!             .first_chunk_timeout(Duration::from_secs(10)),
//!     )
//!     .service(primary);
//!
//! let req = ChatRequest::new("gpt-4o-mini", vec![Message::user("Hi")]).with_tenant("acme");
//! let resp = llm.oneshot(req).await?;
//! assert_eq!(resp.meta.attempt_count(), 2); // primary failed, backup served
//! assert!(resp.meta.cost.is_some());
//! # Ok(()) }
//! # #[cfg(not(all(feature = "cache", feature = "fallback", feature = "validate", feature = "rate-limit", feature = "cost")))]
//! # fn main() {}
//! ```
#![cfg_attr(docsrs, feature(doc_cfg))]

pub use llm_tower_core::*;

/// The hash maps on the request path (rate-limit buckets, budgets, cost totals, prices,
/// routes, cache flights): foldhash instead of std's SipHash, which was ~4 % of the
/// gateway's instructions per request. Seeded per map, like std's.
#[allow(dead_code)] // not every feature set has such a map
pub(crate) type FastMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;
#[allow(dead_code)] // used by some features only
pub(crate) type FastSet<K> = std::collections::HashSet<K, foldhash::fast::RandomState>;

mod builder;

#[cfg(any(feature = "cache", feature = "validate"))]
mod mem;
pub use builder::LlmServiceBuilderExt;

#[cfg(feature = "route")]
#[cfg_attr(docsrs, doc(cfg(feature = "route")))]
pub mod route;

#[cfg(feature = "fallback")]
#[cfg_attr(docsrs, doc(cfg(feature = "fallback")))]
pub mod fallback;

#[cfg(feature = "validate")]
#[cfg_attr(docsrs, doc(cfg(feature = "validate")))]
pub mod validate;

#[cfg(feature = "cache")]
#[cfg_attr(docsrs, doc(cfg(feature = "cache")))]
pub mod cache;

#[cfg(any(feature = "rate-limit", feature = "cost"))]
#[cfg_attr(docsrs, doc(cfg(any(feature = "rate-limit", feature = "cost"))))]
pub mod ledger;

#[cfg(feature = "rate-limit")]
#[cfg_attr(docsrs, doc(cfg(feature = "rate-limit")))]
pub mod rate_limit;

#[cfg(feature = "cost")]
#[cfg_attr(docsrs, doc(cfg(feature = "cost")))]
pub mod cost;
