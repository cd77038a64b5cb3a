//! Tests of the rate-limit layer, on paused time with the scripted mock.
#![cfg(feature = "rate-limit")]

use llm_tower::LlmService;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use llm_tower::rate_limit::{
    Acquire, BucketCheck, HeadroomTracker, Hold, InMemoryRateLimitStore, OnLimit, RateLimitLayer,
    Rule,
};
use llm_tower::{
    ChatRequest, Deadline, ErrorKind, LlmError, LlmResponse, Message, RateLimitHeadroom, Usage,
};
use llm_tower_test::{MockLlm, Step};
use tower::{Layer, Service, ServiceExt};

/// A request whose token estimate is exactly 100 ("Hi": 1 + 4 + 3 prompt, 92 output).
fn req(tenant: &str) -> ChatRequest {
    let mut r = ChatRequest::new("gpt-4o-mini", vec![Message::user("Hi")]).with_tenant(tenant);
    r.max_tokens = Some(92);
    r
}

fn stream_req(tenant: &str) -> ChatRequest {
    let mut r = req(tenant);
    r.stream = Some(true);
    r
}

async fn call<S>(svc: &mut S, r: ChatRequest) -> Result<LlmResponse, LlmError>
where
    S: LlmService,
{
    svc.ready().await?.call(r).await
}

fn tokens_layer(store: &Arc<InMemoryRateLimitStore>, limit: u64) -> RateLimitLayer {
    RateLimitLayer::new()
        .store(store.clone())
        .rule(Rule::tokens(limit, Duration::from_secs(60)).named("tok"))
}

#[test]
fn estimator_is_documented_formula() {
    let e = llm_tower::rate_limit::TokenEstimator::default();
    assert_eq!(e.estimate(&req("a")), 100);
    let mut r = req("a");
    r.max_tokens = None;
    r.n = Some(2);
    assert_eq!(e.estimate(&r), 8 + 2 * 512);
}

#[tokio::test(start_paused = true)]
async fn rejects_with_retry_after_then_refills() {
    let mock = MockLlm::new("m");
    let layer = RateLimitLayer::new().rule(Rule::requests(2, Duration::from_secs(10)).per_tenant());
    let mut svc = layer.layer(mock.clone());

    let r1 = call(&mut svc, req("a")).await.unwrap();
    assert_eq!(r1.meta.limits.unwrap().remaining_requests, Some(1));
    call(&mut svc, req("a")).await.unwrap();
    let err = call(&mut svc, req("a")).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::RateLimited);
    // One request refills every 5 s.
    assert_eq!(err.retry_after(), Some(Duration::from_secs(5)));
    // Another tenant has its own bucket.
    call(&mut svc, req("b")).await.unwrap();
    assert_eq!(mock.calls(), 3);

    tokio::time::advance(Duration::from_secs(5)).await;
    call(&mut svc, req("a")).await.unwrap();
    let s = layer.stats();
    assert_eq!((s.allowed, s.limited, s.waited), (4, 1, 0));
}

#[test]
fn all_or_nothing_across_buckets() {
    let store = InMemoryRateLimitStore::new();
    let check = |key: &str, limit, amount| BucketCheck {
        key: key.into(),
        limit,
        window: Duration::from_secs(60),
        amount,
        held: true,
    };
    let hold = || Hold::new(Duration::from_secs(600));
    // The second bucket refuses: the first must not be charged.
    let r = store.try_acquire(hold(), &[check("a", 10, 5), check("b", 3, 4)]);
    assert!(matches!(r, Acquire::Limited { index: 1, .. }));
    assert_eq!(
        store.remaining("a"),
        None,
        "nothing was taken from bucket a"
    );
    let r = store.try_acquire(hold(), &[check("a", 10, 5), check("b", 3, 3)]);
    assert_eq!(
        r,
        Acquire::Allowed {
            remaining: vec![Some(5), Some(0)]
        }
    );
}

#[tokio::test(start_paused = true)]
async fn tokens_reserved_then_settled_with_actual_usage() {
    let store = Arc::new(InMemoryRateLimitStore::new());
    let mock = MockLlm::new("m").then(Step::reply("x").with_usage(Usage::new(10, 20)));
    let mut svc = tokens_layer(&store, 1000).layer(mock);
    let resp = call(&mut svc, req("a")).await.unwrap();
    // The reservation (100) shows in the response's remaining...
    assert_eq!(resp.meta.limits.unwrap().remaining_tokens, Some(900));
    // ...and the complete response settled it at once with the actual 30 tokens.
    assert_eq!(store.remaining("tok"), Some(970));
}

#[tokio::test(start_paused = true)]
async fn usage_above_estimate_goes_into_debt() {
    let store = Arc::new(InMemoryRateLimitStore::new());
    let mock = MockLlm::new("m").otherwise(Step::reply("x").with_usage(Usage::new(500, 700)));
    let mut svc = tokens_layer(&store, 1000).layer(mock);
    call(&mut svc, req("a")).await.unwrap();
    assert_eq!(store.remaining("tok"), Some(0));
    let err = call(&mut svc, req("a")).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::RateLimited);
    // 200 of debt + 100 needed = 300 tokens at 1000/min = 18 s.
    assert_eq!(err.retry_after(), Some(Duration::from_secs(18)));
}

#[tokio::test(start_paused = true)]
async fn concurrent_first_requests_cannot_pass_on_stale_count() {
    let store = Arc::new(InMemoryRateLimitStore::new());
    let mock = MockLlm::new("m").otherwise(
        Step::reply("x")
            .with_usage(Usage::new(8, 92))
            .with_latency(Duration::from_secs(1)),
    );
    let svc = tokens_layer(&store, 300).layer(mock.clone());
    let futs = (0..10).map(|_| {
        let mut svc = svc.clone();
        async move { call(&mut svc, req("a")).await }
    });
    let results = futures_util::future::join_all(futs).await;
    let ok = results.iter().filter(|r| r.is_ok()).count();
    assert_eq!(ok, 3);
    assert_eq!(mock.calls(), 3);
    assert!(
        results
            .iter()
            .filter_map(|r| r.as_ref().err())
            .all(|e| e.kind() == ErrorKind::RateLimited)
    );
}

#[tokio::test(start_paused = true)]
async fn no_refund_when_usage_unknown() {
    let store = Arc::new(InMemoryRateLimitStore::new());
    // A stream without a usage chunk.
    let mock = MockLlm::new("m").then(Step::stream(["a", "b"]).without_finish());
    let mut svc = tokens_layer(&store, 1000).layer(mock);
    let resp = call(&mut svc, stream_req("a")).await.unwrap();
    let text = resp.into_complete().await.unwrap().text();
    assert_eq!(text, "ab");
    assert_eq!(store.remaining("tok"), Some(900), "the estimate stands");
}

#[tokio::test(start_paused = true)]
async fn streams_settle_exactly_once() {
    // Completed with usage: settled at the end, not before.
    let store = Arc::new(InMemoryRateLimitStore::new());
    let mock = MockLlm::new("m").then(Step::stream(["a", "b"]).with_usage(Usage::new(5, 5)));
    let mut svc = tokens_layer(&store, 1000).layer(mock);
    let mut resp = call(&mut svc, stream_req("a")).await.unwrap();
    assert_eq!(store.remaining("tok"), Some(900), "reserved until the end");
    let llm_tower::ResponseBody::Stream(s) = &mut resp.body else {
        panic!("expected a stream")
    };
    while s.next().await.is_some() {}
    assert_eq!(store.remaining("tok"), Some(990));
    drop(resp);
    assert_eq!(
        store.remaining("tok"),
        Some(990),
        "not settled again on drop"
    );

    // Failed mid-stream (no usage): kept.
    let store = Arc::new(InMemoryRateLimitStore::new());
    let mock = MockLlm::new("m")
        .then(Step::stream(["a", "b"]).fail_after(1, LlmError::transport("reset")));
    let mut svc = tokens_layer(&store, 1000).layer(mock);
    let resp = call(&mut svc, stream_req("a")).await.unwrap();
    assert_eq!(
        resp.into_complete().await.unwrap_err().kind(),
        ErrorKind::Transport
    );
    assert_eq!(store.remaining("tok"), Some(900));

    // Dropped by the caller after one chunk: kept.
    let store = Arc::new(InMemoryRateLimitStore::new());
    let mock = MockLlm::new("m").then(Step::stream(["a", "b", "c"]));
    let mut svc = tokens_layer(&store, 1000).layer(mock);
    let resp = call(&mut svc, stream_req("a")).await.unwrap();
    let mut s = resp.into_stream();
    s.next().await.unwrap().unwrap();
    drop(s);
    assert_eq!(store.remaining("tok"), Some(900));
}

#[tokio::test(start_paused = true)]
async fn future_dropped_before_response_keeps_reservation() {
    let store = Arc::new(InMemoryRateLimitStore::new());
    let mock = MockLlm::new("m").then(Step::reply("x").with_latency(Duration::from_secs(3600)));
    let mut svc = tokens_layer(&store, 1000).layer(mock);
    let fut = svc.ready().await.unwrap().call(req("a"));
    // The caller gives up before the response: the future is dropped mid-call.
    let r = tokio::time::timeout(Duration::from_millis(10), fut).await;
    assert!(r.is_err(), "timed out");
    assert_eq!(store.remaining("tok"), Some(900));
}

#[tokio::test(start_paused = true)]
async fn inner_errors_refund_only_when_provider_refused() {
    let store = Arc::new(InMemoryRateLimitStore::new());
    let mock = MockLlm::new("m")
        .then(Step::error(LlmError::bad_request("nope")))
        .then(Step::error(LlmError::timeout("slow")));
    let mut svc = tokens_layer(&store, 1000).layer(mock);
    assert_eq!(
        call(&mut svc, req("a")).await.unwrap_err().kind(),
        ErrorKind::BadRequest
    );
    assert_eq!(
        store.remaining("tok"),
        Some(1000),
        "a refused request used nothing"
    );
    assert_eq!(
        call(&mut svc, req("a")).await.unwrap_err().kind(),
        ErrorKind::Timeout
    );
    assert_eq!(
        store.remaining("tok"),
        Some(900),
        "a timeout may have used tokens"
    );
}

#[tokio::test(start_paused = true)]
async fn oversized_request_is_refused_without_retry_after() {
    let mock = MockLlm::new("m");
    let mut svc = RateLimitLayer::new()
        .rule(Rule::tokens(50, Duration::from_secs(60)))
        .layer(mock.clone());
    let err = call(&mut svc, req("a")).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::RateLimited);
    assert_eq!(err.retry_after(), None);
    assert_eq!(mock.calls(), 0);
}

#[tokio::test(start_paused = true)]
async fn wait_policy_waits_for_room() {
    let mock = MockLlm::new("m");
    let layer = RateLimitLayer::new()
        .rule(Rule::requests(1, Duration::from_secs(2)))
        .on_limit(OnLimit::Wait {
            max_wait: Duration::from_secs(5),
        });
    let mut svc = layer.layer(mock.clone());
    call(&mut svc, req("a")).await.unwrap();
    let start = tokio::time::Instant::now();
    call(&mut svc, req("a")).await.unwrap();
    assert_eq!(start.elapsed(), Duration::from_secs(2));
    let s = layer.stats();
    assert_eq!((s.allowed, s.limited, s.waited), (2, 0, 1));
}

#[tokio::test(start_paused = true)]
async fn wait_policy_rejects_past_deadline_or_max_wait() {
    let mock = MockLlm::new("m");
    let layer = RateLimitLayer::new()
        .rule(Rule::requests(1, Duration::from_secs(10)))
        .on_limit(OnLimit::Wait {
            max_wait: Duration::from_secs(60),
        });
    let mut svc = layer.layer(mock.clone());
    call(&mut svc, req("a")).await.unwrap();
    // The deadline (3 s) is shorter than the refill (10 s): rejected without waiting.
    let mut r = req("a");
    r.set_deadline(Deadline::after(Duration::from_secs(3)));
    let start = tokio::time::Instant::now();
    let err = call(&mut svc, r).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::RateLimited);
    assert_eq!(start.elapsed(), Duration::ZERO);

    let layer = RateLimitLayer::new()
        .rule(Rule::requests(1, Duration::from_secs(10)))
        .on_limit(OnLimit::Wait {
            max_wait: Duration::from_secs(1),
        });
    let mut svc = layer.layer(mock);
    call(&mut svc, req("a")).await.unwrap();
    assert_eq!(
        call(&mut svc, req("a")).await.unwrap_err().kind(),
        ErrorKind::RateLimited
    );
}

#[tokio::test(start_paused = true)]
async fn fall_back_policy_fails_fast_so_a_fallback_moves_on() {
    let primary = MockLlm::new("primary");
    let secondary = MockLlm::new("secondary");
    let limited = RateLimitLayer::new()
        .rule(Rule::requests(1, Duration::from_secs(60)))
        .on_limit(OnLimit::FallBack)
        .target("primary")
        .layer(primary.clone());
    // A minimal fallback: try the limited primary, then the secondary.
    let chain = tower::service_fn(move |r: ChatRequest| {
        let mut p = limited.clone();
        let mut s = secondary.clone();
        async move {
            match p.ready().await?.call(r.clone()).await {
                Err(e) if e.should_fall_back() => s.ready().await?.call(r).await,
                other => other,
            }
        }
    });
    let mut chain = chain;
    let mut r = req("a");
    r.set_deadline(Deadline::after(Duration::from_secs(600)));
    let a = call(&mut chain, r.clone()).await.unwrap();
    let b = call(&mut chain, r).await.unwrap();
    assert_eq!(a.meta.provider.as_deref(), Some("primary"));
    assert_eq!(
        b.meta.provider.as_deref(),
        Some("secondary"),
        "moved on without waiting"
    );
    assert_eq!(primary.calls(), 1);
}

#[tokio::test(start_paused = true)]
async fn limited_error_names_target_and_falls_back() {
    let mut svc = RateLimitLayer::new()
        .rule(Rule::requests(1, Duration::from_secs(60)))
        .on_limit(OnLimit::FallBack)
        .target("openai")
        .layer(MockLlm::new("m"));
    call(&mut svc, req("a")).await.unwrap();
    let err = call(&mut svc, req("a")).await.unwrap_err();
    assert!(err.should_fall_back());
    assert_eq!(err.provider(), Some("openai"));
    assert_eq!(err.retry_after(), Some(Duration::from_secs(60)));
}

fn with_headroom(remaining: u64, reset: Duration) -> Step {
    Step::respond(move |r: &ChatRequest| {
        let mut resp =
            LlmResponse::complete(llm_tower::ChatResponse::from_text(r.model.clone(), "ok"));
        resp.meta.headroom = Some(RateLimitHeadroom {
            remaining_requests: Some(remaining),
            reset_requests: Some(reset),
            ..RateLimitHeadroom::default()
        });
        Ok(resp)
    })
}

#[tokio::test(start_paused = true)]
async fn headroom_tracker_limits_before_provider_429() {
    let mock = MockLlm::new("m")
        .then(with_headroom(1, Duration::from_secs(5)))
        .otherwise(with_headroom(100, Duration::from_secs(5)));
    let layer = RateLimitLayer::new()
        .headroom(HeadroomTracker::new(2, 0))
        .on_limit(OnLimit::FallBack);
    let mut svc = layer.layer(mock.clone());
    call(&mut svc, req("a")).await.unwrap();
    let err = call(&mut svc, req("a")).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::RateLimited);
    assert_eq!(err.retry_after(), Some(Duration::from_secs(5)));
    assert_eq!(mock.calls(), 1, "the provider was not asked");
    assert_eq!(layer.stats().headroom_limited, 1);
    tokio::time::advance(Duration::from_secs(5)).await;
    call(&mut svc, req("a")).await.unwrap();
    assert_eq!(mock.calls(), 2);
}

#[tokio::test(start_paused = true)]
async fn headroom_counts_down_between_responses() {
    let t = HeadroomTracker::new(1, 0);
    t.observe(&RateLimitHeadroom {
        remaining_requests: Some(2),
        remaining_tokens: Some(1000),
        reset_requests: Some(Duration::from_secs(1)),
        reset_tokens: Some(Duration::from_secs(1)),
        ..RateLimitHeadroom::default()
    });
    assert!(t.admit(100).is_ok());
    assert!(t.admit(100).is_ok());
    assert_eq!(t.admit(100), Err(Duration::from_secs(1)));
    assert_eq!(t.remaining(), (Some(0), Some(800)));
    // Tokens: 800 left, 900 wanted.
    let t = HeadroomTracker::new(0, 0);
    t.observe(&RateLimitHeadroom {
        remaining_tokens: Some(800),
        reset_tokens: Some(Duration::from_secs(2)),
        ..RateLimitHeadroom::default()
    });
    assert_eq!(t.check(900), Err(Duration::from_secs(2)));
    assert_eq!(t.check(700), Ok(()));
}

#[tokio::test(start_paused = true)]
async fn keyed_buckets_do_not_grow_without_bound() {
    let store = Arc::new(InMemoryRateLimitStore::with_max_keys(100));
    let mut svc = RateLimitLayer::new()
        .store(store.clone())
        .rule(Rule::requests(10, Duration::from_secs(1)).per_tenant())
        .layer(MockLlm::new("m"));
    for i in 0..1000 {
        call(&mut svc, req(&format!("tenant-{i}"))).await.unwrap();
        assert!(store.len() <= 100, "{} buckets", store.len());
    }
    // Once refilled, and their request ids forgotten (2 s), buckets are the same as absent
    // and are swept.
    tokio::time::advance(Duration::from_secs(2)).await;
    store.retain_recent();
    assert!(store.is_empty());
}

#[tokio::test(start_paused = true)]
async fn combined_keys_and_filters() {
    let layer = RateLimitLayer::new()
        .rule(
            Rule::requests(1, Duration::from_secs(60))
                .per_model()
                .per_task(),
        )
        .rule(Rule::requests(1, Duration::from_secs(60)).for_tenant("free"));
    let mut svc = layer.layer(MockLlm::new("m"));
    let with = |tenant: &str, model: &str, task: &str| {
        let mut r = req(tenant).with_task_type(task);
        r.model = model.into();
        r
    };
    call(&mut svc, with("paid", "a", "x")).await.unwrap();
    call(&mut svc, with("paid", "a", "y")).await.unwrap();
    call(&mut svc, with("paid", "b", "x")).await.unwrap();
    assert!(call(&mut svc, with("paid", "a", "x")).await.is_err());
    call(&mut svc, with("free", "c", "x")).await.unwrap();
    // "free" is limited by its own rule even on a fresh model/task bucket.
    assert!(call(&mut svc, with("free", "d", "x")).await.is_err());
}

#[tokio::test(start_paused = true)]
async fn made_up_model_names_share_one_bucket() {
    let store = Arc::new(InMemoryRateLimitStore::new());
    let layer = RateLimitLayer::new().store(store.clone()).rule(
        Rule::requests(2, Duration::from_secs(60))
            .per_model()
            .known_models(["gpt-4o-mini"]),
    );
    let mut svc = layer.layer(MockLlm::new("m"));
    let with = |model: &str| {
        let mut r = req("t");
        r.model = model.into();
        r
    };
    // A known model has its own bucket...
    call(&mut svc, with("gpt-4o-mini")).await.unwrap();
    call(&mut svc, with("gpt-4o-mini")).await.unwrap();
    assert!(call(&mut svc, with("gpt-4o-mini")).await.is_err());
    // ...and every made-up name takes from one `other` bucket, not a fresh one each.
    call(&mut svc, with("made-up-1")).await.unwrap();
    call(&mut svc, with("made-up-2")).await.unwrap();
    let e = call(&mut svc, with("made-up-3")).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::RateLimited);
    assert_eq!(store.len(), 2);
}

#[test]
fn invalid_rules_are_errors() {
    use llm_tower::rate_limit::LimitUnit;
    assert!(Rule::try_new(LimitUnit::Requests, 0, Duration::from_secs(1)).is_err());
    assert!(Rule::try_new(LimitUnit::Tokens, 1, Duration::ZERO).is_err());
}

#[tokio::test(start_paused = true)]
async fn headroom_is_given_back_when_a_bucket_refuses() {
    let tracker = HeadroomTracker::new(1, 0);
    tracker.observe(&RateLimitHeadroom {
        remaining_requests: Some(10),
        reset_requests: Some(Duration::from_secs(60)),
        ..RateLimitHeadroom::default()
    });
    let mut svc = RateLimitLayer::new()
        .headroom(tracker.clone())
        .rule(Rule::requests(1, Duration::from_secs(60)))
        .layer(MockLlm::new("m"));
    call(&mut svc, req("a")).await.unwrap();
    assert!(call(&mut svc, req("a")).await.is_err());
    // The mock reports no headroom, so only the local count moved: one request sent.
    assert_eq!(tracker.remaining().0, Some(9));
}

#[tokio::test(start_paused = true)]
async fn builder_ext_adds_the_layer() {
    use llm_tower::LlmServiceBuilderExt;
    let mut svc = tower::ServiceBuilder::new()
        .llm_rate_limit(RateLimitLayer::new().rule(Rule::requests(1, Duration::from_secs(60))))
        .service(MockLlm::new("m"));
    call(&mut svc, req("a")).await.unwrap();
    assert!(call(&mut svc, req("a")).await.is_err());
}

// ===== the ledger: holds in buckets =====

fn tok(key: &str, limit: u64, amount: u64) -> BucketCheck {
    BucketCheck {
        key: key.into(),
        limit,
        window: Duration::from_secs(100),
        amount,
        held: true,
    }
}

#[tokio::test(start_paused = true)]
async fn bucket_settle_applies_the_difference_once() {
    let store = InMemoryRateLimitStore::new();
    let hold = Hold::new(Duration::from_secs(600));
    let c = [tok("k", 100, 50)];
    store.try_acquire(hold, &c);
    assert_eq!(store.remaining("k"), Some(50));
    assert_eq!(store.open_holds("k"), 1);
    for _ in 0..3 {
        store.settle_now(hold, &c, 20);
        assert_eq!(store.remaining("k"), Some(80), "gave back 30, once");
    }
    assert_eq!(store.open_holds("k"), 0);
}

#[tokio::test(start_paused = true)]
async fn bucket_duplicate_acquire_takes_once() {
    let store = InMemoryRateLimitStore::new();
    let hold = Hold::new(Duration::from_secs(600));
    let c = [tok("k", 100, 60)];
    store.try_acquire(hold, &c);
    // Sent again: allowed (it already was) without a second take, even without room.
    assert_eq!(
        store.try_acquire(hold, &c),
        Acquire::Allowed {
            remaining: vec![Some(40)]
        }
    );
    assert_eq!(store.remaining("k"), Some(40));
    // A request bucket's take is final, and remembered: a repeat is a no-op too.
    let r = BucketCheck {
        held: false,
        ..tok("r", 10, 1)
    };
    let h2 = Hold::new(Duration::from_secs(600));
    store.try_acquire(h2, std::slice::from_ref(&r));
    store.try_acquire(h2, std::slice::from_ref(&r));
    assert_eq!(store.remaining("r"), Some(9));
}

#[tokio::test(start_paused = true)]
async fn bucket_settle_without_hold_only_takes() {
    let store = InMemoryRateLimitStore::new();
    let c = [tok("k", 100, 50)];
    let hold = Hold::new(Duration::from_secs(600));
    // The acquisition failed open: the settle takes the actual usage, never gives back.
    store.settle_now(hold, &c, 30);
    assert_eq!(store.remaining("k"), Some(70));
    // The acquisition lands late: a no-op.
    store.try_acquire(hold, &c);
    assert_eq!(store.remaining("k"), Some(70));
}

#[tokio::test(start_paused = true)]
async fn bucket_hold_expires_without_refund() {
    let store = InMemoryRateLimitStore::new();
    let c = [tok("k", 100, 50)];
    let hold = Hold::new(Duration::from_secs(10));
    store.try_acquire(hold, &c);
    tokio::time::advance(Duration::from_secs(10)).await;
    // Forgotten, not given back: the bucket refilled 10 of the 50 meanwhile.
    assert_eq!(store.open_holds("k"), 0);
    assert_eq!(store.remaining("k"), Some(60));
    // A settle after the expiry takes the actual usage as a new take.
    store.settle_now(hold, &c, 5);
    assert_eq!(store.remaining("k"), Some(55));
}

fn requests_left(n: u64, reset_secs: u64) -> RateLimitHeadroom {
    RateLimitHeadroom {
        remaining_requests: Some(n),
        reset_requests: Some(Duration::from_secs(reset_secs)),
        ..RateLimitHeadroom::default()
    }
}

#[tokio::test(start_paused = true)]
async fn merged_headroom_only_lowers_until_the_reset() {
    let t = HeadroomTracker::new(2, 0);
    t.observe(&requests_left(10, 4));
    // A higher count from another replica does not raise the local one.
    t.merge(&requests_left(50, 9));
    assert_eq!(t.remaining(), (Some(10), None));
    // A lower one replaces it, with its reset.
    t.merge(&requests_left(1, 2));
    assert_eq!(t.remaining(), (Some(1), None));
    assert_eq!(t.check(0), Err(Duration::from_secs(2)));
    // Past the reset the local view is gone, and any merged count is taken.
    tokio::time::advance(Duration::from_secs(2)).await;
    assert_eq!(t.check(0), Ok(()));
    t.merge(&requests_left(50, 9));
    assert_eq!(t.remaining(), (Some(50), None));
    // Tokens merge on their own; a count without a reset gets the default reset (1 s).
    t.merge(&RateLimitHeadroom {
        remaining_tokens: Some(7),
        ..RateLimitHeadroom::default()
    });
    assert_eq!(t.remaining(), (Some(50), Some(7)));
    tokio::time::advance(Duration::from_secs(1)).await;
    assert_eq!(t.remaining(), (Some(50), None));
}

#[tokio::test(start_paused = true)]
async fn observer_sees_observations_with_resets_filled_in_not_merges() {
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let sink = seen.clone();
    let t = HeadroomTracker::new(1, 0).on_observe(move |h| sink.lock().unwrap().push(*h));
    t.observe(&RateLimitHeadroom {
        remaining_requests: Some(3),
        remaining_tokens: Some(900),
        reset_tokens: Some(Duration::MAX),
        ..RateLimitHeadroom::default()
    });
    // Nothing to record: not passed on.
    t.observe(&RateLimitHeadroom::default());
    t.merge(&requests_left(1, 1));
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].remaining_requests, Some(3));
    assert_eq!(seen[0].reset_requests, Some(Duration::from_secs(1)));
    assert_eq!(seen[0].reset_tokens, Some(llm_tower::MAX_RETRY_AFTER));
}

#[tokio::test(start_paused = true)]
async fn weak_tracker_shares_state_and_does_not_keep_it_alive() {
    let t = HeadroomTracker::new(2, 0);
    let weak = t.downgrade();
    weak.upgrade().unwrap().merge(&requests_left(0, 3));
    assert_eq!(t.check(0), Err(Duration::from_secs(3)));
    drop(t);
    assert!(weak.upgrade().is_none());
}
