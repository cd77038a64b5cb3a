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
//! ([`TaskType`](llm_tower_core::TaskType), [`Tenant`](llm_tower_core::Tenant), …) and
//! [`ResponseMeta`](llm_tower_core::ResponseMeta). The core contract is re-exported at the
//! crate root.
#![cfg_attr(docsrs, feature(doc_cfg))]

pub use llm_tower_core::*;

mod builder;
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

#[cfg(feature = "rate-limit")]
#[cfg_attr(docsrs, doc(cfg(feature = "rate-limit")))]
pub mod rate_limit;

#[cfg(feature = "cost")]
#[cfg_attr(docsrs, doc(cfg(feature = "cost")))]
pub mod cost;
