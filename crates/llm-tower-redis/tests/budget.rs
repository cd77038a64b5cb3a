//! Two independent cost layers sharing one Redis enforce one budget.

mod common;
use common::{conn, unique_prefix};
use llm_tower::LlmService;

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use llm_tower::cost::{Budget, BudgetWindow, CostLayer, ModelPrice, PriceTable};
use llm_tower::{ChatRequest, ErrorKind, LlmError, LlmResponse, Message, Usage};
use llm_tower_redis::budget::RedisBudgetStore;
use llm_tower_test::{MockLlm, Step};
use tower::{Layer, ServiceExt};

/// Estimate 100 tokens at 1000 nano-dollars each: 100 000.
fn req(tenant: &str) -> ChatRequest {
    let mut r = ChatRequest::new("m", vec![Message::user("Hi")]).with_tenant(tenant);
    r.max_tokens = Some(92);
    r
}

fn layer(store: RedisBudgetStore) -> CostLayer {
    CostLayer::new(PriceTable::new().with("m", ModelPrice::per_token_nano(1000, 1000, 1000)))
        .store(Arc::new(store))
        .budget(Budget::per_tenant(300_000, BudgetWindow::Daily).named("daily"))
}

async fn call<S>(svc: &mut S, r: ChatRequest) -> Result<LlmResponse, LlmError>
where
    S: LlmService,
{
    svc.ready().await?.call(r).await
}

#[tokio::test]
#[ignore = "needs REDIS_URL (run with -- --include-ignored; .ci/run sets it)"]
async fn two_replicas_share_one_budget() {
    let prefix = unique_prefix("budget");
    let mock = MockLlm::new("m").otherwise(
        Step::reply("x")
            .with_usage(Usage::new(8, 92))
            .with_latency(Duration::from_millis(50)),
    );
    let a = layer(RedisBudgetStore::new(conn(&prefix).await).fail_closed()).layer(mock.clone());
    let b = layer(RedisBudgetStore::new(conn(&prefix).await).fail_closed()).layer(mock.clone());
    let futs = (0..10).map(|i| {
        let mut svc = if i % 2 == 0 { a.clone() } else { b.clone() };
        async move { call(&mut svc, req("acme")).await }
    });
    let results = futures_util::future::join_all(futs).await;
    assert_eq!(results.iter().filter(|r| r.is_ok()).count(), 3);
    assert_eq!(mock.calls(), 3);
    for e in results.iter().filter_map(|r| r.as_ref().err()) {
        assert_eq!(e.kind(), ErrorKind::BudgetExceeded);
    }
    // Another tenant has its own budget.
    let mut a = a;
    call(&mut a, req("other")).await.unwrap();
}

#[tokio::test]
#[ignore = "needs REDIS_URL (run with -- --include-ignored; .ci/run sets it)"]
async fn settles_with_actual_cost() {
    let prefix = unique_prefix("budget-settle");
    let store = RedisBudgetStore::new(conn(&prefix).await).fail_closed();
    let mock = MockLlm::new("m").otherwise(Step::reply("x").with_usage(Usage::new(10, 20)));
    let mut svc = layer(store.clone()).layer(mock);
    call(&mut svc, req("acme")).await.unwrap();
    let (window, _) = BudgetWindow::Daily.current(SystemTime::now());
    let key = format!("daily|t=acme|{window}");
    // Reserved 100 000, used 30 000: the settlement is sent in the background.
    let mut spent = 0;
    for _ in 0..100 {
        spent = store.spent(&key).await.unwrap();
        if spent == 30_000 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(spent, 30_000);
    // Each further request reserves 100 000 and settles at 30 000: with 300 000 a day, a
    // request passes while spent <= 200 000, i.e. six more.
    let mut ok = 0;
    for _ in 0..10 {
        if call(&mut svc, req("acme")).await.is_ok() {
            ok += 1;
            let want = 30_000 * (ok + 1);
            for _ in 0..100 {
                if store.spent(&key).await.unwrap() == want {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
    assert_eq!(ok, 6);
    assert_eq!(store.spent(&key).await.unwrap(), 210_000);
}
