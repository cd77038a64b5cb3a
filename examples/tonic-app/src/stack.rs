//! The LLM stack the handlers call, built with `ServiceBuilder` from llm-tower layers.
//!
//! `examples/axum-app` and `examples/tonic-app` each keep their own copy of this module on
//! purpose: each example is meant to be copied out alone, with nothing shared to untangle.

use std::time::Duration;

use llm_tower::cache::CacheLayer;
use llm_tower::rate_limit::{RateLimitLayer, Rule};
use llm_tower::route::{RouteLayer, RoutePolicy};
use llm_tower::{BoxLlmService, BoxableLlmService, LlmServiceBuilderExt, boxed};
use llm_tower_test::SimulatedLlm;
use tower::ServiceBuilder;

/// Builds the handlers' stack over `provider` (the service that really answers), outermost
/// first:
///
/// - **rate limit**: 120 requests and 60 000 tokens a minute per tenant (reject with
///   retry-after), so one tenant cannot spend everyone's quota;
/// - **cache**: identical deterministic requests (the handlers send temperature 0) are
///   answered from memory for 24 h, per tenant;
/// - **route**: the task type `explain` goes to `provider` asking for `small-model`,
///   anything else to `provider` unchanged.
///
/// Boxed into a cloneable [`BoxLlmService`] so the handler type stays simple; clones share
/// the cache and the limits.
pub fn llm_stack<S>(provider: S) -> BoxLlmService
where
    S: BoxableLlmService,
{
    let limits = RateLimitLayer::new()
        .rule(Rule::requests(120, Duration::from_secs(60)).per_tenant())
        .rule(Rule::tokens(60_000, Duration::from_secs(60)).per_tenant());
    let cache =
        CacheLayer::in_memory(16 * 1024 * 1024).task_ttl("explain", Duration::from_secs(24 * 3600));
    let policy = RoutePolicy::new()
        .task_model("explain", "provider", "small-model")
        .default_target("provider");
    boxed(
        ServiceBuilder::new()
            .layer(limits)
            .cache(cache)
            .route(RouteLayer::new(policy, "provider"))
            .service(provider),
    )
}

/// A local stand-in for a real provider: llm-tower-test's simulated LLM (deterministic
/// answers derived from the prompt, streamed word by word), with no network and no key.
pub fn demo_llm() -> SimulatedLlm {
    SimulatedLlm::builder("simulated")
        .latency(Duration::from_millis(80))
        .token_delay(Duration::from_millis(10))
        .build()
}
