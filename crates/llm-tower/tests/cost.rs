//! Tests of the cost layer, on paused time with the scripted mock.
#![cfg(feature = "cost")]

use llm_tower::LlmService;
use std::sync::{Arc, Mutex};
use std::time::{Duration, UNIX_EPOCH};

use llm_tower::cost::{
    Budget, BudgetCharge, BudgetStore, BudgetWindow, CostLayer, CostRecord, Hold,
    InMemoryBudgetStore, ModelPrice, PriceTable, Reserve,
};
use llm_tower::{
    CacheStatus, ChatRequest, ChatResponse, ErrorKind, LlmError, LlmResponse, Message, Usage,
};
use llm_tower_test::{MockLlm, Step};
use tower::{Layer, Service, ServiceExt};

/// Estimate: 8 prompt + 92 output tokens.
fn req(tenant: &str, task: &str) -> ChatRequest {
    let mut r = ChatRequest::new("gpt-4o-mini", vec![Message::user("Hi")])
        .with_tenant(tenant)
        .with_task_type(task);
    r.max_tokens = Some(92);
    r
}

/// 1000 nano-dollars a token in and out, 100 cached: a 100-token estimate costs 100 000.
fn prices() -> PriceTable {
    PriceTable::new().with("gpt-4o-mini", ModelPrice::per_token_nano(1000, 1000, 100))
}

async fn call<S>(svc: &mut S, r: ChatRequest) -> Result<LlmResponse, LlmError>
where
    S: LlmService,
{
    svc.ready().await?.call(r).await
}

#[test]
fn price_table_from_config_and_lookup() {
    let t: PriceTable = serde_json::from_str(
        r#"{"gpt-4o-mini": {"input_per_mtok_usd": 0.15, "output_per_mtok_usd": 0.6, "cached_input_per_mtok_usd": 0.075},
            "gpt-4o": {"input_per_mtok_usd": 2.5, "output_per_mtok_usd": 10.0},
            "llama3": {"input_per_mtok_usd": 0.0, "output_per_mtok_usd": 0.0}}"#,
    )
    .unwrap();
    let p = t.get("gpt-4o-mini").unwrap().1;
    assert_eq!(
        (p.input, p.output, p.cached_input),
        (150_000, 600_000, 75_000)
    );
    assert_eq!(
        t.get("gpt-4o").unwrap().1.cached_input,
        2_500_000,
        "defaults to input"
    );
    assert_eq!(t.get("gpt-4o-mini-2024-07-18").unwrap().0, "gpt-4o-mini");
    assert_eq!(t.get("gpt-4o-2024-08-06").unwrap().0, "gpt-4o");
    assert_eq!(t.get("openai/gpt-4o-mini").unwrap().0, "gpt-4o-mini");
    assert_eq!(t.get("gpt-4o-mini-audio-preview").unwrap().0, "gpt-4o-mini");
    assert_eq!(t.get("llama3:8b").unwrap().0, "llama3");
    assert!(t.get("gpt-4").is_none());
    assert!(t.get("gpt-4omni").is_none());

    let bad = serde_json::from_str::<PriceTable>(
        r#"{"m": {"input_per_mtok_usd": -1.0, "output_per_mtok_usd": 0.6}}"#,
    );
    assert!(bad.is_err());
    let typo = serde_json::from_str::<PriceTable>(
        r#"{"m": {"input_per_mtok": 1.0, "output_per_mtok_usd": 0.6}}"#,
    );
    assert!(typo.is_err());
}

#[test]
fn cost_is_integer_and_counts_cached_tokens() {
    let p = ModelPrice::per_mtok_usd(0.15, 0.6, Some(0.075)).unwrap();
    let u = Usage::new(1_000_000, 1_000_000).with_cached_tokens(400_000);
    // 600k × 150 + 400k × 75 + 1M × 600
    assert_eq!(p.cost(&u), 90_000_000 + 30_000_000 + 600_000_000);
    let huge = Usage {
        prompt_tokens: u64::MAX,
        completion_tokens: u64::MAX,
        ..Usage::default()
    };
    assert_eq!(p.cost(&huge), u64::MAX, "saturates, never wraps");
}

#[tokio::test(start_paused = true)]
async fn cost_in_meta_and_totals() {
    let mock = MockLlm::new("m")
        .otherwise(Step::reply("x").with_usage(Usage::new(10, 20).with_cached_tokens(4)));
    let layer = CostLayer::new(prices());
    let mut svc = layer.layer(mock);
    let r = call(&mut svc, req("acme", "chat")).await.unwrap();
    let cost = r.meta.cost.unwrap();
    assert_eq!(cost.nano_usd, 6 * 1000 + 4 * 100 + 20 * 1000);
    call(&mut svc, req("acme", "summarize")).await.unwrap();
    call(&mut svc, req("other", "chat")).await.unwrap();

    let snap = layer.totals();
    assert_eq!(snap.total.requests, 3);
    assert_eq!(snap.total.nano_usd, 3 * cost.nano_usd);
    assert_eq!(snap.by_tenant["acme"].nano_usd, 2 * cost.nano_usd);
    assert_eq!(snap.by_task["chat"].requests, 2);
    assert_eq!(snap.by_model["gpt-4o-mini"].prompt_tokens, 30);
    assert_eq!(snap.by_model["gpt-4o-mini"].cached_tokens, 12);
    assert_eq!(
        snap.entries[&(
            "summarize".to_string(),
            "acme".to_string(),
            "gpt-4o-mini".to_string()
        )]
            .requests,
        1
    );
}

#[tokio::test(start_paused = true)]
async fn an_answer_kept_as_json_is_priced_from_its_usage() {
    let json = r#"{"id":"c","model":"gpt-4o-mini","choices":[{"message":{"role":"assistant","content":"x"}}],"usage":{"prompt_tokens":10,"completion_tokens":20,"total_tokens":30,"prompt_tokens_details":{"cached_tokens":4}}}"#;
    let mock = MockLlm::new("m").otherwise(Step::respond(move |_| {
        let body = llm_tower::EncodedResponse::from_json(json.as_bytes().to_vec().into())
            .map_err(|e| LlmError::transport(e.to_string()))?;
        Ok(LlmResponse::encoded(body))
    }));
    let layer = CostLayer::new(prices());
    let mut svc = layer.layer(mock);
    let r = call(&mut svc, req("acme", "chat")).await.unwrap();
    assert_eq!(
        r.meta.cost.unwrap().nano_usd,
        6 * 1000 + 4 * 100 + 20 * 1000
    );
    assert_eq!(layer.totals().by_model["gpt-4o-mini"].cached_tokens, 4);
}

#[tokio::test(start_paused = true)]
async fn client_chosen_task_types_cannot_grow_the_totals_without_bound() {
    let mock = MockLlm::new("m").otherwise(Step::reply("x").with_usage(Usage::new(1, 1)));
    let layer = CostLayer::new(prices());
    let mut svc = layer.layer(mock);
    let keys = 4096;
    for i in 0..keys + 5 {
        call(&mut svc, req("acme", &format!("task-{i}")))
            .await
            .unwrap();
    }
    // A known key past the limit is still counted under its own name.
    call(&mut svc, req("acme", "task-0")).await.unwrap();

    let snap = layer.totals();
    assert_eq!(snap.entries.len(), keys + 1);
    assert_eq!(snap.by_task["other"].requests, 5);
    assert_eq!(snap.by_task["task-0"].requests, 2);
    assert!(!snap.by_task.contains_key(&format!("task-{keys}")));
    // The tenant and model sums stay exact.
    assert_eq!(snap.by_tenant["acme"].requests, keys as u64 + 6);
    assert_eq!(snap.by_model["gpt-4o-mini"].requests, keys as u64 + 6);
}

#[tokio::test(start_paused = true)]
async fn served_model_is_priced_with_dated_variant() {
    let mock = MockLlm::new("m").then(Step::respond(|_r: &ChatRequest| {
        let mut c = ChatResponse::from_text("gpt-4o-mini-2024-07-18", "x");
        c.usage = Some(Usage::new(1, 1));
        Ok(LlmResponse::complete(c))
    }));
    let layer = CostLayer::new(prices());
    let mut svc = layer.layer(mock);
    let mut r = req("a", "t");
    r.model = "alias-for-mini".into();
    let resp = call(&mut svc, r).await.unwrap();
    assert_eq!(resp.meta.cost.unwrap().nano_usd, 2000);
    assert!(
        layer
            .totals()
            .by_model
            .contains_key("gpt-4o-mini-2024-07-18")
    );
}

#[tokio::test(start_paused = true)]
async fn stream_cost_recorded_at_the_end() {
    let mock = MockLlm::new("m").then(Step::stream(["a", "b"]).with_usage(Usage::new(10, 10)));
    let records = Arc::new(Mutex::new(Vec::<CostRecord>::new()));
    let rec = records.clone();
    let layer = CostLayer::new(prices())
        .on_record(move |r: &CostRecord| rec.lock().unwrap().push(r.clone()));
    let mut svc = layer.layer(mock);
    let mut r = req("a", "t");
    r.stream = Some(true);
    let resp = call(&mut svc, r).await.unwrap();
    assert!(resp.meta.cost.is_none(), "unknown until the end");
    assert_eq!(layer.totals().total.requests, 0);
    resp.into_complete().await.unwrap();
    assert_eq!(layer.totals().total.nano_usd, 20_000);
    let recs = records.lock().unwrap();
    assert_eq!(recs.len(), 1);
    assert!(recs[0].completed);
    assert_eq!(recs[0].cost.unwrap().nano_usd, 20_000);
}

#[tokio::test(start_paused = true)]
async fn cache_hit_costs_nothing_and_reports_savings() {
    let mock = MockLlm::new("m").then(Step::respond(|r: &ChatRequest| {
        let mut c = ChatResponse::from_text(r.model.clone(), "x");
        c.usage = Some(Usage::new(10, 10));
        let mut resp = LlmResponse::complete(c);
        resp.meta.cache = CacheStatus::Hit;
        Ok(resp)
    }));
    let layer = CostLayer::new(prices());
    let mut svc = layer.layer(mock);
    let resp = call(&mut svc, req("a", "t")).await.unwrap();
    let c = resp.meta.cost.unwrap();
    assert_eq!((c.nano_usd, c.saved_nano_usd), (0, 20_000));
    let t = layer.totals().total;
    assert_eq!((t.cache_hits, t.nano_usd, t.saved_nano_usd), (1, 0, 20_000));
}

#[tokio::test(start_paused = true)]
async fn unpriced_model_costs_nothing_and_is_counted() {
    let layer = CostLayer::new(prices());
    let mut svc = layer.layer(MockLlm::new("m"));
    let mut r = req("a", "t");
    r.model = "mystery".into();
    let resp = call(&mut svc, r).await.unwrap();
    assert!(resp.meta.cost.is_none());
    assert_eq!(layer.totals().total.unpriced, 1);
    let layer = CostLayer::new(prices()).default_price(ModelPrice::per_token_nano(1, 1, 1));
    let mut svc =
        layer.layer(MockLlm::new("m").then(Step::reply("x").with_usage(Usage::new(3, 4))));
    let mut r = req("a", "t");
    r.model = "mystery".into();
    assert_eq!(
        call(&mut svc, r).await.unwrap().meta.cost.unwrap().nano_usd,
        7
    );
}

#[tokio::test(start_paused = true)]
async fn concurrent_first_requests_cannot_slip_past_budget() {
    let store = Arc::new(InMemoryBudgetStore::new());
    let mock = MockLlm::new("m").otherwise(
        Step::reply("x")
            .with_usage(Usage::new(8, 92))
            .with_latency(Duration::from_secs(1)),
    );
    let layer = CostLayer::new(prices())
        .store(store.clone())
        .budget(Budget::per_tenant(300_000, BudgetWindow::Daily));
    let svc = layer.layer(mock.clone());
    let futs = (0..10).map(|_| {
        let mut svc = svc.clone();
        async move { call(&mut svc, req("acme", "t")).await }
    });
    let results = futures_util::future::join_all(futs).await;
    assert_eq!(results.iter().filter(|r| r.is_ok()).count(), 3);
    assert_eq!(mock.calls(), 3);
    let errs: Vec<_> = results.iter().filter_map(|r| r.as_ref().err()).collect();
    assert!(errs.iter().all(|e| e.kind() == ErrorKind::BudgetExceeded));
    assert!(
        errs[0].retry_after().is_some(),
        "retry at the end of the day"
    );
    assert_eq!(layer.totals().budget_exceeded, 7);
    // Another tenant has its own budget.
    let mut svc = svc;
    call(&mut svc, req("other", "t")).await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn budget_settles_with_actual_cost() {
    let store = Arc::new(InMemoryBudgetStore::new());
    let mock = MockLlm::new("m")
        .then(Step::reply("x").with_usage(Usage::new(10, 20)))
        .then(Step::stream(["a"]).without_finish())
        .then(Step::error(LlmError::bad_request("no")))
        .then(Step::error(LlmError::timeout("slow")));
    let layer = CostLayer::new(prices())
        .store(store.clone())
        .budget(Budget::global(10_000_000, BudgetWindow::Total).named("all"));
    let mut svc = layer.layer(mock);
    let spent = || {
        store
            .entries()
            .iter()
            .find(|(k, _)| k == "all|total")
            .map_or(0, |e| e.1)
    };

    call(&mut svc, req("a", "t")).await.unwrap();
    assert_eq!(spent(), 30_000, "settled: reserved 100 000, used 30 000");

    let mut r = req("a", "t");
    r.stream = Some(true);
    call(&mut svc, r)
        .await
        .unwrap()
        .into_complete()
        .await
        .unwrap();
    assert_eq!(spent(), 130_000, "no usage: the estimate stands");

    assert!(call(&mut svc, req("a", "t")).await.is_err());
    assert_eq!(spent(), 130_000, "refused by the provider: refunded");
    assert!(call(&mut svc, req("a", "t")).await.is_err());
    assert_eq!(spent(), 230_000, "timeout: kept");
}

#[tokio::test(start_paused = true)]
async fn dropped_future_keeps_budget_reservation() {
    let store = Arc::new(InMemoryBudgetStore::new());
    let mock = MockLlm::new("m").then(Step::reply("x").with_latency(Duration::from_secs(3600)));
    let layer = CostLayer::new(prices())
        .store(store.clone())
        .budget(Budget::global(10_000_000, BudgetWindow::Total).named("all"));
    let mut svc = layer.layer(mock);
    let fut = svc.ready().await.unwrap().call(req("a", "t"));
    assert!(
        tokio::time::timeout(Duration::from_millis(5), fut)
            .await
            .is_err()
    );
    assert_eq!(store.spent("all|total"), 100_000);
}

#[tokio::test(start_paused = true)]
async fn exhausted_budget_rejects_even_free_requests() {
    let store = Arc::new(InMemoryBudgetStore::new());
    let charge = |amount| BudgetCharge {
        key: "k".into(),
        limit: 100,
        amount,
        ttl: None,
    };
    let hold = || Hold::new(Duration::from_secs(600));
    assert!(matches!(
        store.try_reserve(hold(), &[charge(100)]),
        Reserve::Reserved { .. }
    ));
    assert_eq!(
        store.try_reserve(hold(), &[charge(0)]),
        Reserve::Exceeded {
            index: 0,
            spent: 100
        }
    );
}

#[tokio::test(start_paused = true)]
async fn budgets_are_all_or_nothing() {
    let store = InMemoryBudgetStore::new();
    let c = |key: &str, limit, amount| BudgetCharge {
        key: key.into(),
        limit,
        amount,
        ttl: None,
    };
    let hold = Hold::new(Duration::from_secs(600));
    let r = store.try_reserve(hold, &[c("a", 100, 50), c("b", 10, 50)]);
    assert_eq!(r, Reserve::Exceeded { index: 1, spent: 0 });
    assert_eq!(store.spent("a"), 0);
    // A settle without a hold records the actual cost, never a negative correction.
    store.settle(hold, &[c("a", 100, 50)], 5);
    assert_eq!(store.spent("a"), 5);
}

#[tokio::test(start_paused = true)]
async fn task_and_tenant_budgets_apply_only_to_their_scope() {
    let layer = CostLayer::new(prices())
        .budget(Budget::task("expensive", 100_000, BudgetWindow::Monthly))
        .budget(Budget::tenant(
            "trial",
            100_000,
            BudgetWindow::Every(Duration::from_secs(3600)),
        ));
    let mut svc =
        layer.layer(MockLlm::new("m").otherwise(Step::reply("x").with_usage(Usage::new(8, 92))));
    call(&mut svc, req("a", "expensive")).await.unwrap();
    assert_eq!(
        call(&mut svc, req("a", "expensive"))
            .await
            .unwrap_err()
            .kind(),
        ErrorKind::BudgetExceeded
    );
    call(&mut svc, req("a", "cheap")).await.unwrap();
    call(&mut svc, req("a", "cheap")).await.unwrap();
    call(&mut svc, req("trial", "cheap")).await.unwrap();
    assert!(call(&mut svc, req("trial", "cheap")).await.is_err());
}

#[test]
fn budget_windows_follow_the_utc_calendar() {
    let at = |s: u64| UNIX_EPOCH + Duration::from_secs(s);
    // 2023-12-31T23:00:00Z
    let t = at(1_704_063_600);
    assert_eq!(
        BudgetWindow::Monthly.current(t),
        ("m2023-12".into(), Some(Duration::from_secs(3600)))
    );
    assert_eq!(
        BudgetWindow::Daily.current(t).1,
        Some(Duration::from_secs(3600))
    );
    assert_eq!(
        BudgetWindow::Monthly.current(at(1_704_067_200)).0,
        "m2024-01"
    );
    assert_eq!(BudgetWindow::Total.current(t), ("total".into(), None));
    let (id, left) = BudgetWindow::Every(Duration::from_secs(3600)).current(at(7200 + 60));
    assert_eq!(
        (id.as_str(), left),
        ("e3600000:2", Some(Duration::from_secs(3540)))
    );
}

#[tokio::test(start_paused = true)]
async fn builder_ext_adds_the_layer() {
    use llm_tower::LlmServiceBuilderExt;
    let layer = CostLayer::new(prices());
    let mut svc = tower::ServiceBuilder::new()
        .cost(layer.clone())
        .service(MockLlm::new("m").then(Step::reply("x").with_usage(Usage::new(1, 1))));
    call(&mut svc, req("a", "t")).await.unwrap();
    assert_eq!(layer.totals().total.nano_usd, 2000);
}

// ===== the ledger: holds with ids and expiries =====

fn charge(key: &str, limit: u64, amount: u64) -> BudgetCharge {
    BudgetCharge {
        key: key.into(),
        limit,
        amount,
        ttl: None,
    }
}

#[tokio::test(start_paused = true)]
async fn ledger_settle_replaces_the_hold_once() {
    let store = InMemoryBudgetStore::new();
    let hold = Hold::new(Duration::from_secs(600));
    let c = [charge("k", 1_000, 100)];
    assert!(matches!(
        store.try_reserve(hold, &c),
        Reserve::Reserved { .. }
    ));
    assert_eq!((store.spent("k"), store.settled("k")), (100, 0));
    assert_eq!(store.open_holds("k"), (1, 100));
    for _ in 0..3 {
        store.settle(hold, &c, 30);
        assert_eq!((store.spent("k"), store.settled("k")), (30, 30), "once");
    }
    assert_eq!(store.open_holds("k"), (0, 0));
}

#[tokio::test(start_paused = true)]
async fn ledger_duplicate_reserve_is_a_no_op() {
    let store = InMemoryBudgetStore::new();
    let hold = Hold::new(Duration::from_secs(600));
    let c = [charge("k", 150, 100)];
    assert!(matches!(
        store.try_reserve(hold, &c),
        Reserve::Reserved { .. }
    ));
    // Sent again (e.g. after a timeout): not counted twice, and not refused either.
    assert_eq!(
        store.try_reserve(hold, &c),
        Reserve::Reserved {
            spent: vec![Some(100)]
        }
    );
    assert_eq!(store.spent("k"), 100);
    // Arriving after its settlement: still a no-op.
    store.settle(hold, &c, 40);
    assert!(matches!(
        store.try_reserve(hold, &c),
        Reserve::Reserved { .. }
    ));
    assert_eq!((store.spent("k"), store.open_holds("k").0), (40, 0));
}

#[tokio::test(start_paused = true)]
async fn ledger_settle_without_hold_records_actual_and_blocks_a_late_reserve() {
    let store = InMemoryBudgetStore::new();
    let c = [charge("k", 1_000, 100)];
    // Reserved elsewhere: 200 held.
    let other = Hold::new(Duration::from_secs(600));
    store.try_reserve(other, &[charge("k", 1_000, 200)]);
    // This request's reservation failed open: its settle finds no hold.
    let hold = Hold::new(Duration::from_secs(600));
    store.settle(hold, &c, 30);
    assert_eq!((store.settled("k"), store.spent("k")), (30, 230));
    // Its reservation lands late: a no-op (the tombstone), not a second charge.
    store.try_reserve(hold, &c);
    assert_eq!(store.spent("k"), 230);
    // A settle of zero without a hold never takes money back.
    store.settle(Hold::new(Duration::from_secs(600)), &c, 0);
    assert_eq!(store.settled("k"), 30);
}

#[tokio::test(start_paused = true)]
async fn ledger_unsettled_hold_is_released_at_expiry() {
    let store = InMemoryBudgetStore::new();
    let c = [charge("k", 150, 100)];
    let hold = Hold::new(Duration::from_secs(60));
    store.try_reserve(hold, &c);
    // The cap counts the open hold.
    assert!(matches!(
        store.try_reserve(Hold::new(Duration::from_secs(60)), &c),
        Reserve::Exceeded { spent: 100, .. }
    ));
    tokio::time::advance(Duration::from_secs(59)).await;
    assert_eq!(store.spent("k"), 100);
    tokio::time::advance(Duration::from_secs(1)).await;
    assert_eq!(
        (store.spent("k"), store.open_holds("k").0),
        (0, 0),
        "released"
    );
    // A settle after the expiry records the actual cost, once.
    store.settle(hold, &c, 70);
    store.settle(hold, &c, 70);
    assert_eq!(store.spent("k"), 70);
    // And a reservation that arrives after its hold expired is a no-op.
    let late = Hold::new(Duration::from_secs(1));
    tokio::time::advance(Duration::from_secs(2)).await;
    store.try_reserve(late, &c);
    assert_eq!(store.spent("k"), 70);
}

#[tokio::test(start_paused = true)]
async fn layer_settles_every_hold_it_opens() {
    let store = Arc::new(InMemoryBudgetStore::new());
    let mock = MockLlm::new("m")
        .then(Step::reply("x").with_usage(Usage::new(10, 20)))
        .then(Step::error(LlmError::bad_request("no")))
        .then(Step::reply("x").with_latency(Duration::from_secs(3600)));
    let layer = CostLayer::new(prices())
        .store(store.clone())
        .budget(Budget::global(10_000_000, BudgetWindow::Total).named("all"));
    let mut svc = layer.layer(mock);
    call(&mut svc, req("a", "t")).await.unwrap();
    assert!(call(&mut svc, req("a", "t")).await.is_err());
    let fut = svc.ready().await.unwrap().call(req("a", "t"));
    assert!(
        tokio::time::timeout(Duration::from_millis(5), fut)
            .await
            .is_err()
    );
    // 30 000 settled, 0 refunded, the dropped call's estimate kept; no hold left open.
    assert_eq!(store.open_holds("all|total"), (0, 0));
    assert_eq!(store.settled("all|total"), 130_000);
}
