//! Two independent layer instances sharing one Redis enforce one limit.

mod common;
use common::{conn, unique_prefix};
use llm_tower::LlmService;

use std::sync::Arc;
use std::time::Duration;

use llm_tower::rate_limit::{RateLimitLayer, Rule};
use llm_tower::{ChatRequest, ErrorKind, LlmError, LlmResponse, Message, Usage};
use llm_tower_redis::RedisConn;
use llm_tower_redis::rate_limit::RedisRateLimitStore;
use llm_tower_test::{MockLlm, Step};
use tower::{Layer, ServiceExt};

/// Estimate: 100 tokens.
fn req(tenant: &str) -> ChatRequest {
    let mut r = ChatRequest::new("gpt-4o-mini", vec![Message::user("Hi")]).with_tenant(tenant);
    r.max_tokens = Some(92);
    r
}

async fn call<S>(svc: &mut S, r: ChatRequest) -> Result<LlmResponse, LlmError>
where
    S: LlmService,
{
    svc.ready().await?.call(r).await
}

#[tokio::test]
#[ignore = "needs REDIS_URL (run with -- --include-ignored; .ci/run sets it)"]
async fn two_replicas_share_one_request_limit() {
    let prefix = unique_prefix("rl-requests");
    let make = |c: RedisConn| {
        RateLimitLayer::new()
            .store(Arc::new(RedisRateLimitStore::new(c).fail_closed()))
            .rule(Rule::requests(5, Duration::from_secs(3600)).per_tenant())
    };
    let a = make(conn(&prefix).await).layer(MockLlm::new("a"));
    let b = make(conn(&prefix).await).layer(MockLlm::new("b"));
    let futs = (0..10).map(|i| {
        let mut svc = if i % 2 == 0 { a.clone() } else { b.clone() };
        async move { call(&mut svc, req("acme")).await }
    });
    let results = futures_util::future::join_all(futs).await;
    assert_eq!(results.iter().filter(|r| r.is_ok()).count(), 5);
    for e in results.iter().filter_map(|r| r.as_ref().err()) {
        assert_eq!(e.kind(), ErrorKind::RateLimited);
        assert!(e.retry_after().is_some());
    }
    // Another tenant is not affected.
    let mut a = a;
    let resp = call(&mut a, req("other")).await.unwrap();
    assert_eq!(resp.meta.limits.unwrap().remaining_requests, Some(4));
}

#[tokio::test]
#[ignore = "needs REDIS_URL (run with -- --include-ignored; .ci/run sets it)"]
async fn tokens_are_reserved_and_settled_across_replicas() {
    let prefix = unique_prefix("rl-tokens");
    let c = conn(&prefix).await;
    let store_a = RedisRateLimitStore::new(c.clone()).fail_closed();
    let make = |store: RedisRateLimitStore, mock: MockLlm| {
        RateLimitLayer::new()
            .store(Arc::new(store))
            .rule(Rule::tokens(1000, Duration::from_secs(36_000)).named("tok"))
            .layer(mock)
    };
    let mut a = make(
        store_a.clone(),
        MockLlm::new("a").otherwise(Step::reply("x").with_usage(Usage::new(10, 20))),
    );
    let mut b = make(
        RedisRateLimitStore::new(conn(&prefix).await).fail_closed(),
        MockLlm::new("b"),
    );
    let resp = call(&mut a, req("t")).await.unwrap();
    assert_eq!(resp.meta.limits.unwrap().remaining_tokens, Some(900));
    // The settlement (30 actual, 100 reserved) is sent in the background.
    let mut level = 0.0;
    for _ in 0..100 {
        level = store_a
            .bucket("tok", 1000, Duration::from_secs(36_000))
            .await
            .unwrap()
            .level;
        if level > 960.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!((969.0..=971.0).contains(&level), "level {level}");
    // Replica b sees the same bucket.
    let resp = call(&mut b, req("t")).await.unwrap();
    let left = resp.meta.limits.unwrap().remaining_tokens.unwrap();
    assert!((869..=871).contains(&left), "left {left}");
}

#[tokio::test]
#[ignore = "needs REDIS_URL (run with -- --include-ignored; .ci/run sets it)"]
async fn refusal_charges_no_bucket() {
    let prefix = unique_prefix("rl-atomic");
    let c = conn(&prefix).await;
    let layer = RateLimitLayer::new()
        .store(Arc::new(RedisRateLimitStore::new(c.clone()).fail_closed()))
        .rule(Rule::requests(10, Duration::from_secs(36_000)).named("wide"))
        .rule(
            Rule::requests(1, Duration::from_secs(36_000))
                .per_tenant()
                .named("narrow"),
        );
    let mut svc = layer.layer(MockLlm::new("m"));
    let r = call(&mut svc, req("a")).await.unwrap();
    assert_eq!(r.meta.limits.unwrap().remaining_requests, Some(0));
    for _ in 0..5 {
        assert!(call(&mut svc, req("a")).await.is_err());
    }
    call(&mut svc, req("b")).await.unwrap();
    // The five refusals took nothing from "wide": only a's and b's requests did.
    let level = RedisRateLimitStore::new(c)
        .bucket("wide", 10, Duration::from_secs(36_000))
        .await
        .unwrap()
        .level;
    assert!((8.0..8.1).contains(&level), "level {level}");
    let stats = layer.stats();
    assert_eq!((stats.allowed, stats.limited), (2, 5));
}
