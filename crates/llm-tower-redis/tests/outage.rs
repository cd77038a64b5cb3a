//! A Redis outage must not hang requests: fail-open stores let them through, fail-closed
//! stores refuse them promptly. Redis is "down" here: nothing listens on 127.0.0.1:1.

use llm_tower::LlmService;
use std::sync::Arc;
use std::time::Duration;

use llm_tower::cost::{Budget, BudgetWindow, CostLayer, ModelPrice, PriceTable};
use llm_tower::rate_limit::{RateLimitLayer, Rule};
use llm_tower::{ChatRequest, ErrorKind, LlmError, LlmResponse, Message};
use llm_tower_redis::budget::RedisBudgetStore;
use llm_tower_redis::rate_limit::RedisRateLimitStore;
use llm_tower_redis::{RedisConn, RedisOptions};
use llm_tower_test::MockLlm;
use tower::{Layer, ServiceExt};

fn down() -> RedisConn {
    let opts = RedisOptions {
        op_timeout: Duration::from_millis(100),
        failure_threshold: 3,
        ..RedisOptions::default()
    };
    RedisConn::connect_lazy("redis://127.0.0.1:1", opts).expect("lazy connect never dials")
}

fn req() -> ChatRequest {
    ChatRequest::new("m", vec![Message::user("Hi")]).with_tenant("acme")
}

async fn call<S>(svc: &mut S, r: ChatRequest) -> Result<LlmResponse, LlmError>
where
    S: LlmService,
{
    svc.ready().await?.call(r).await
}

#[tokio::test]
async fn rate_limit_fails_open_by_default() {
    let store = Arc::new(RedisRateLimitStore::new(down()));
    let mock = MockLlm::new("m");
    let mut svc = RateLimitLayer::new()
        .store(store.clone())
        .rule(Rule::requests(1, Duration::from_secs(60)))
        .rule(Rule::tokens(100_000, Duration::from_secs(60)))
        .layer(mock.clone());
    for _ in 0..5 {
        let resp = call(&mut svc, req())
            .await
            .expect("allowed while Redis is down");
        let limits = resp.meta.limits.unwrap();
        assert_eq!(
            (limits.remaining_requests, limits.remaining_tokens),
            (None, None)
        );
    }
    assert_eq!(mock.calls(), 5);
    assert!(store.store_errors() >= 5);
    // After `failure_threshold` failures the breaker is open: no more dialing.
    assert!(store.conn().is_open());
}

#[tokio::test]
async fn rate_limit_fails_closed_when_configured() {
    let store = Arc::new(RedisRateLimitStore::new(down()).fail_closed());
    let mock = MockLlm::new("m");
    let mut svc = RateLimitLayer::new()
        .store(store)
        .rule(Rule::requests(100, Duration::from_secs(60)))
        .layer(mock.clone());
    for _ in 0..5 {
        let err = call(&mut svc, req()).await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Unavailable);
    }
    assert_eq!(mock.calls(), 0);
}

fn cost_layer(store: RedisBudgetStore) -> CostLayer {
    CostLayer::new(PriceTable::new().with("m", ModelPrice::per_token_nano(1, 1, 1)))
        .store(Arc::new(store))
        .budget(Budget::per_tenant(1_000_000, BudgetWindow::Monthly))
}

#[tokio::test]
async fn budget_fails_open_by_default() {
    let store = RedisBudgetStore::new(down());
    let mock = MockLlm::new("m");
    let layer = cost_layer(store.clone());
    let mut svc = layer.layer(mock.clone());
    for _ in 0..5 {
        let resp = call(&mut svc, req())
            .await
            .expect("allowed while Redis is down");
        assert!(resp.meta.cost.is_some());
    }
    assert_eq!(mock.calls(), 5);
    assert!(store.store_errors() >= 5);
    assert_eq!(
        layer.totals().total.requests,
        5,
        "still priced and totalled"
    );
}

#[tokio::test]
async fn budget_fails_closed_when_configured() {
    let mock = MockLlm::new("m");
    let mut svc = cost_layer(RedisBudgetStore::new(down()).fail_closed()).layer(mock.clone());
    for _ in 0..5 {
        let err = call(&mut svc, req()).await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Unavailable);
    }
    assert_eq!(mock.calls(), 0);
}
