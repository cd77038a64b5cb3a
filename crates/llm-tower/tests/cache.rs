//! Tests of the cache layer, against the scripted MockLlm in paused time.
#![cfg(feature = "cache")]

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use llm_tower::cache::{
    Cache, CacheKey, CacheLayer, CacheStore, CachedEntry, MemoryStore, StoreError, StoreFuture,
};
use llm_tower::{
    CachePolicy, CacheStatus, ChatRequest, ErrorKind, LlmError, LlmResponse, Message, ResponseBody,
    Usage,
};
use llm_tower_test::{MockLlm, Step};
use tower::{Service, ServiceExt};

fn req(text: &str) -> ChatRequest {
    let mut r = ChatRequest::new("gpt-test", vec![Message::user(text)]);
    r.temperature = Some(0.into());
    r
}

fn stream_req(text: &str) -> ChatRequest {
    let mut r = req(text);
    r.stream = Some(true);
    r
}

fn svc(layer: &CacheLayer, mock: &MockLlm) -> Cache<MockLlm> {
    Cache::new(mock.clone(), layer)
}

async fn call(svc: &mut Cache<MockLlm>, r: ChatRequest) -> Result<LlmResponse, LlmError> {
    svc.ready().await?.call(r).await
}

async fn text_of(resp: LlmResponse) -> String {
    resp.into_complete().await.expect("complete").text()
}

/// Drains a stream, returning the chunk texts and whether it ended with an error.
async fn drain(resp: LlmResponse) -> (Vec<String>, Option<LlmError>) {
    let ResponseBody::Stream(mut s) = resp.body else {
        panic!("expected a stream");
    };
    let mut texts = Vec::new();
    while let Some(item) = s.next().await {
        match item {
            Ok(c) => texts.extend(
                c.choices
                    .iter()
                    .filter_map(|ch| ch.delta.text().map(str::to_owned))
                    .filter(|t| !t.is_empty()),
            ),
            Err(e) => return (texts, Some(e)),
        }
    }
    (texts, None)
}

// ===== keys =====

#[test]
fn key_ignores_fields_that_do_not_change_the_answer() {
    let base = req("hi");
    let k = CacheKey::for_request(&base);

    let mut r = base.clone();
    r.user = Some("alice".into());
    r.stream = Some(true);
    r.stream_options = Some(Default::default());
    r.extra
        .insert("metadata".into(), serde_json::json!({"trace": "x"}));
    r.extra.insert("store".into(), true.into());
    r.extra.insert("service_tier".into(), "flex".into());
    r.set_cache_policy(CachePolicy::NoCache);
    assert_eq!(CacheKey::for_request(&r), k);

    // `0` and `0.0` are the same temperature; `n: 1` is the default.
    let mut r = base;
    r.temperature = serde_json::Number::from_f64(0.0);
    r.n = Some(1);
    assert_eq!(CacheKey::for_request(&r), k);
}

#[test]
fn key_changes_with_every_answer_changing_field() {
    let base = req("hi");
    let k = CacheKey::for_request(&base);
    type Change = Box<dyn Fn(&mut ChatRequest)>;
    let variants: Vec<Change> = vec![
        Box::new(|r| r.temperature = Some(1.into())),
        Box::new(|r| r.temperature = serde_json::Number::from_f64(0.2)),
        Box::new(|r| r.model = "other".into()),
        Box::new(|r| r.messages.push(Message::assistant("x"))),
        Box::new(|r| r.messages[0] = Message::system("hi")),
        Box::new(|r| r.seed = Some(7)),
        Box::new(|r| r.top_p = Some(1.into())),
        Box::new(|r| r.max_tokens = Some(10)),
        Box::new(|r| r.max_completion_tokens = Some(10)),
        Box::new(|r| r.n = Some(2)),
        Box::new(|r| r.tool_choice = Some("none".into())),
        Box::new(|r| {
            r.extra.insert("stop".into(), serde_json::json!(["\n"]));
        }),
        Box::new(|r| {
            r.extra.insert("some_future_field".into(), 1.into());
        }),
        Box::new(|r| {
            r.response_format =
                serde_json::from_value(serde_json::json!({"type": "json_object"})).ok();
        }),
        Box::new(|r| {
            r.tools = serde_json::from_value(serde_json::json!([
                {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
            ]))
            .ok();
        }),
        Box::new(|r| r.set_task_type("explain")),
        Box::new(|r| r.set_tenant("acme")),
    ];
    let mut seen = std::collections::HashSet::new();
    seen.insert(k);
    for (i, change) in variants.iter().enumerate() {
        let mut r = base.clone();
        change(&mut r);
        assert!(
            seen.insert(CacheKey::for_request(&r)),
            "variant {i} collided"
        );
    }
}

#[test]
fn key_is_canonical_over_json_key_order_and_stable() {
    let a = ChatRequest::from_slice(
        br#"{"model":"m","messages":[{"role":"user","content":"x"}],"temperature":0,"logit_bias":{"1":2,"3":4}}"#,
    )
    .unwrap();
    let b = ChatRequest::from_slice(
        br#"{"logit_bias":{"3":4,"1":2},"temperature":0.0,"messages":[{"content":"x","role":"user"}],"model":"m"}"#,
    )
    .unwrap();
    assert_eq!(CacheKey::for_request(&a), CacheKey::for_request(&b));
    // Stable across runs and processes (stores outlive them): pin one key. If this
    // changes on purpose, bump KEY_VERSION in cache/key.rs.
    assert_eq!(
        CacheKey::for_request(&a).to_hex(),
        "1e79d382bd5ae3dec126ed168fb1af08e7c2be374f65c4858b000812eb0fcc4c"
    );
}

#[test]
fn key_distinguishes_field_boundaries() {
    // "ab" + "c" must not collide with "a" + "bc".
    let r1 = ChatRequest::new("m", vec![Message::user("ab"), Message::user("c")]);
    let r2 = ChatRequest::new("m", vec![Message::user("a"), Message::user("bc")]);
    assert_ne!(CacheKey::for_request(&r1), CacheKey::for_request(&r2));
}

#[test]
fn key_of_large_requests_is_sensitive_to_trailing_zero_bytes() {
    // Encodings over 1 KiB are zero-padded before hashing: trailing NULs in the content
    // must still give another key.
    let long = "x".repeat(1500);
    let a = ChatRequest::new("m", vec![Message::user(long.clone())]);
    let b = ChatRequest::new("m", vec![Message::user(format!("{long}\0\0"))]);
    assert_ne!(CacheKey::for_request(&a), CacheKey::for_request(&b));
    let huge = ChatRequest::new("m", vec![Message::user("y".repeat(10_000))]);
    let huge2 = ChatRequest::new("m", vec![Message::user("y".repeat(10_001))]);
    assert_ne!(CacheKey::for_request(&huge), CacheKey::for_request(&huge2));
    assert_eq!(
        CacheKey::for_request(&huge).to_hex(),
        "7f398d33aef1682cf2fc3f9b28a7c5c6c633ff6e9ce800a3f3a6747d85072f54"
    );
}

// ===== hits, misses, tenants =====

#[tokio::test(start_paused = true)]
async fn second_identical_request_is_a_hit_with_the_original_usage() {
    let mock = MockLlm::new("mock").then(Step::reply("answer").with_usage(Usage::new(100, 20)));
    let layer = CacheLayer::in_memory(1 << 20);
    let mut s = svc(&layer, &mock);

    let first = call(&mut s, req("q")).await.unwrap();
    assert_eq!(first.meta.cache, CacheStatus::Miss);
    assert_eq!(text_of(first).await, "answer");

    let hit = call(&mut s, req("q")).await.unwrap();
    assert_eq!(hit.meta.cache, CacheStatus::Hit);
    assert_eq!(hit.meta.usage, Some(Usage::new(100, 20)));
    assert_eq!(hit.meta.provider.as_deref(), Some("mock"));
    assert_eq!(text_of(hit).await, "answer");
    assert_eq!(mock.calls(), 1);
    let st = layer.stats().snapshot();
    assert_eq!((st.hits, st.misses, st.bypasses, st.writes), (1, 1, 0, 1));
}

#[tokio::test(start_paused = true)]
async fn tenants_never_share_entries() {
    let mock = MockLlm::new("mock");
    let layer = CacheLayer::in_memory(1 << 20);
    let mut s = svc(&layer, &mock);
    call(&mut s, req("q").with_tenant("a")).await.unwrap();
    let other = call(&mut s, req("q").with_tenant("b")).await.unwrap();
    assert_eq!(other.meta.cache, CacheStatus::Miss);
    let none = call(&mut s, req("q")).await.unwrap();
    assert_eq!(none.meta.cache, CacheStatus::Miss);
    let again = call(&mut s, req("q").with_tenant("a")).await.unwrap();
    assert_eq!(again.meta.cache, CacheStatus::Hit);
    assert_eq!(mock.calls(), 3);
}

#[tokio::test(start_paused = true)]
async fn user_field_shares_the_entry_temperature_does_not() {
    let mock = MockLlm::new("mock");
    let layer = CacheLayer::in_memory(1 << 20);
    let mut s = svc(&layer, &mock);
    call(&mut s, req("q")).await.unwrap();
    let mut r = req("q");
    r.user = Some("bob".into());
    assert_eq!(call(&mut s, r).await.unwrap().meta.cache, CacheStatus::Hit);
    let mut r = req("q");
    r.seed = Some(1); // still deterministic, but a different request
    assert_eq!(call(&mut s, r).await.unwrap().meta.cache, CacheStatus::Miss);
}

// ===== policy =====

#[tokio::test(start_paused = true)]
async fn non_deterministic_requests_bypass() {
    let mock = MockLlm::new("mock");
    let layer = CacheLayer::in_memory(1 << 20);
    let mut s = svc(&layer, &mock);
    for _ in 0..2 {
        let mut r = req("q");
        r.temperature = serde_json::Number::from_f64(0.7);
        assert_eq!(
            call(&mut s, r).await.unwrap().meta.cache,
            CacheStatus::Bypass
        );
    }
    let mut r = req("q");
    r.temperature = None; // the provider default (1) is not deterministic either
    assert_eq!(
        call(&mut s, r).await.unwrap().meta.cache,
        CacheStatus::Bypass
    );
    assert_eq!(mock.calls(), 3);
    assert_eq!(layer.stats().bypasses(), 3);

    // A seed makes it deterministic.
    let mut r = req("q");
    r.temperature = serde_json::Number::from_f64(0.7);
    r.seed = Some(42);
    call(&mut s, r.clone()).await.unwrap();
    assert_eq!(call(&mut s, r).await.unwrap().meta.cache, CacheStatus::Hit);
}

#[tokio::test(start_paused = true)]
async fn per_request_policies() {
    let mock = MockLlm::new("mock")
        .then(Step::reply("one"))
        .then(Step::reply("two"))
        .then(Step::reply("three"));
    let layer = CacheLayer::in_memory(1 << 20);
    let mut s = svc(&layer, &mock);

    // NoStore: neither read nor write.
    let mut r = req("q");
    r.set_cache_policy(CachePolicy::NoStore);
    let resp = call(&mut s, r).await.unwrap();
    assert_eq!(resp.meta.cache, CacheStatus::Bypass);
    assert_eq!(
        call(&mut s, req("q")).await.unwrap().meta.cache,
        CacheStatus::Miss
    ); // "two" stored

    // NoCache: skip the lookup, store the fresh answer.
    let mut r = req("q");
    r.set_cache_policy(CachePolicy::NoCache);
    let resp = call(&mut s, r).await.unwrap();
    assert_eq!(resp.meta.cache, CacheStatus::Bypass);
    assert_eq!(text_of(resp).await, "three");
    let hit = call(&mut s, req("q")).await.unwrap();
    assert_eq!(hit.meta.cache, CacheStatus::Hit);
    assert_eq!(text_of(hit).await, "three");
    assert_eq!(mock.calls(), 3);
}

#[tokio::test(start_paused = true)]
async fn force_caches_a_non_deterministic_request() {
    let mock = MockLlm::new("mock");
    let layer = CacheLayer::in_memory(1 << 20);
    let mut s = svc(&layer, &mock);
    let mut r = req("q");
    r.temperature = Some(1.into());
    r.set_cache_policy(CachePolicy::Force);
    assert_eq!(
        call(&mut s, r.clone()).await.unwrap().meta.cache,
        CacheStatus::Miss
    );
    assert_eq!(call(&mut s, r).await.unwrap().meta.cache, CacheStatus::Hit);
    assert_eq!(mock.calls(), 1);
}

#[tokio::test(start_paused = true)]
async fn task_rules_ttl_zero_never_caches_and_cacheable_task_always_does() {
    let mock = MockLlm::new("mock");
    let layer = CacheLayer::in_memory(1 << 20)
        .task_ttl("personal", Duration::ZERO)
        .cacheable_task("explain");
    let mut s = svc(&layer, &mock);
    for _ in 0..2 {
        let mut r = req("q").with_task_type("personal");
        r.set_cache_policy(CachePolicy::Force); // a zero TTL still wins
        assert_eq!(
            call(&mut s, r).await.unwrap().meta.cache,
            CacheStatus::Bypass
        );
    }
    let mut r = req("q").with_task_type("explain");
    r.temperature = Some(1.into());
    assert_eq!(
        call(&mut s, r.clone()).await.unwrap().meta.cache,
        CacheStatus::Miss
    );
    assert_eq!(call(&mut s, r).await.unwrap().meta.cache, CacheStatus::Hit);
    assert_eq!(mock.calls(), 3);
}

#[tokio::test(start_paused = true)]
async fn entries_expire_after_their_task_ttl() {
    let mock = MockLlm::new("mock");
    let layer = CacheLayer::in_memory(1 << 20)
        .default_ttl(Duration::from_secs(3600))
        .task_ttl("recommend", Duration::from_secs(600));
    let mut s = svc(&layer, &mock);
    let rec = || req("q").with_task_type("recommend");
    let plain = || req("q");

    call(&mut s, rec()).await.unwrap();
    call(&mut s, plain()).await.unwrap();
    tokio::time::advance(Duration::from_secs(599)).await;
    assert_eq!(
        call(&mut s, rec()).await.unwrap().meta.cache,
        CacheStatus::Hit
    );
    tokio::time::advance(Duration::from_secs(2)).await;
    assert_eq!(
        call(&mut s, rec()).await.unwrap().meta.cache,
        CacheStatus::Miss
    );
    assert_eq!(
        call(&mut s, plain()).await.unwrap().meta.cache,
        CacheStatus::Hit
    );
    tokio::time::advance(Duration::from_secs(3600)).await;
    assert_eq!(
        call(&mut s, plain()).await.unwrap().meta.cache,
        CacheStatus::Miss
    );
    assert_eq!(mock.calls(), 4);
}

// ===== errors =====

#[tokio::test(start_paused = true)]
async fn inner_errors_are_not_cached() {
    let mock = MockLlm::new("mock")
        .then(Step::error(LlmError::unavailable("503")))
        .then(Step::reply("ok"));
    let layer = CacheLayer::in_memory(1 << 20);
    let mut s = svc(&layer, &mock);
    let err = call(&mut s, req("q")).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Unavailable);
    let ok = call(&mut s, req("q")).await.unwrap();
    assert_eq!(ok.meta.cache, CacheStatus::Miss);
    assert_eq!(text_of(ok).await, "ok");
    assert_eq!(mock.calls(), 2);
}

#[tokio::test(start_paused = true)]
async fn empty_answers_are_not_cached() {
    let mock = MockLlm::new("mock").then(Step::respond(|r| {
        let mut resp = llm_tower::ChatResponse::from_text(r.model.clone(), "");
        resp.choices.clear();
        Ok(LlmResponse::complete(resp))
    }));
    let layer = CacheLayer::in_memory(1 << 20);
    let mut s = svc(&layer, &mock);
    call(&mut s, req("q")).await.unwrap();
    assert_eq!(
        call(&mut s, req("q")).await.unwrap().meta.cache,
        CacheStatus::Miss
    );
    assert_eq!(layer.stats().skipped_writes(), 1);
}

/// A store that always fails.
#[derive(Debug)]
struct BrokenStore;

impl CacheStore for BrokenStore {
    fn get(&self, _key: CacheKey) -> StoreFuture<Option<Arc<CachedEntry>>> {
        Box::pin(async { Err(StoreError::new("connection refused")) })
    }
    fn put(&self, _key: CacheKey, _e: Arc<CachedEntry>, _ttl: Duration) -> StoreFuture<()> {
        Box::pin(async { Err(StoreError::new("connection refused")) })
    }
}

/// A store that never answers.
#[derive(Debug)]
struct HangingStore;

impl CacheStore for HangingStore {
    fn get(&self, _key: CacheKey) -> StoreFuture<Option<Arc<CachedEntry>>> {
        Box::pin(std::future::pending())
    }
    fn put(&self, _key: CacheKey, _e: Arc<CachedEntry>, _ttl: Duration) -> StoreFuture<()> {
        Box::pin(std::future::pending())
    }
}

#[tokio::test(start_paused = true)]
async fn store_errors_fail_open() {
    let mock = MockLlm::new("mock");
    let layer = CacheLayer::new(BrokenStore);
    let mut s = svc(&layer, &mock);
    for _ in 0..3 {
        let resp = call(&mut s, req("q")).await.unwrap();
        assert_eq!(resp.meta.cache, CacheStatus::Miss);
        assert_eq!(text_of(resp).await, "ok");
    }
    // A stream still completes too.
    let (texts, err) = drain(call(&mut s, stream_req("q")).await.unwrap()).await;
    assert!(err.is_none());
    assert_eq!(texts.concat(), "ok");
    assert_eq!(mock.calls(), 4);
    let st = layer.stats().snapshot();
    assert_eq!(
        st.errors, 8,
        "one failed get and one failed put per request"
    );
    assert_eq!(st.misses, 4);
}

#[tokio::test(start_paused = true)]
async fn store_timeouts_fail_open() {
    let mock = MockLlm::new("mock");
    let layer = CacheLayer::new(HangingStore).store_timeout(Duration::from_millis(20));
    let mut s = svc(&layer, &mock);
    let resp = call(&mut s, req("q")).await.unwrap();
    assert_eq!(text_of(resp).await, "ok");
    let (texts, err) = drain(call(&mut s, stream_req("q")).await.unwrap()).await;
    assert!(err.is_none());
    assert_eq!(texts.concat(), "ok");
    assert_eq!(layer.stats().errors(), 4);
}

// ===== coalescing =====

#[tokio::test(start_paused = true)]
async fn concurrent_identical_misses_make_one_upstream_call() {
    let mock =
        MockLlm::new("mock").otherwise(Step::reply("shared").with_latency(Duration::from_secs(2)));
    let layer = CacheLayer::in_memory(1 << 20);
    let s = svc(&layer, &mock);
    let tasks: Vec<_> = (0..10)
        .map(|_| {
            let s = s.clone();
            tokio::spawn(async move { s.oneshot(req("q")).await })
        })
        .collect();
    for t in tasks {
        let resp = t.await.unwrap().unwrap();
        assert_eq!(text_of(resp).await, "shared");
    }
    assert_eq!(mock.calls(), 1);
    let st = layer.stats().snapshot();
    assert_eq!((st.misses, st.hits, st.coalesced), (1, 9, 9));
}

#[tokio::test(start_paused = true)]
async fn waiters_get_the_leaders_upstream_error() {
    let mock = MockLlm::new("mock")
        .then(Step::error(LlmError::overloaded("busy")).with_latency(Duration::from_secs(1)));
    let layer = CacheLayer::in_memory(1 << 20);
    let s = svc(&layer, &mock);
    let tasks: Vec<_> = (0..5)
        .map(|_| {
            let s = s.clone();
            tokio::spawn(async move { s.oneshot(req("q")).await })
        })
        .collect();
    for t in tasks {
        assert_eq!(t.await.unwrap().unwrap_err().kind(), ErrorKind::Overloaded);
    }
    assert_eq!(mock.calls(), 1);
    // Nothing was stored: the next request calls upstream.
    let mut s = s;
    assert_eq!(
        call(&mut s, req("q")).await.unwrap().meta.cache,
        CacheStatus::Miss
    );
}

#[tokio::test(start_paused = true)]
async fn a_dropped_leader_does_not_leave_waiters_hanging() {
    let mock = MockLlm::new("mock")
        .then(Step::reply("never").with_latency(Duration::from_secs(60)))
        .otherwise(Step::reply("second").with_latency(Duration::from_secs(1)));
    let layer = CacheLayer::in_memory(1 << 20);
    let s = svc(&layer, &mock);
    let leader = {
        let s = s.clone();
        tokio::spawn(async move { s.oneshot(req("q")).await })
    };
    tokio::time::sleep(Duration::from_millis(10)).await;
    let waiters: Vec<_> = (0..4)
        .map(|_| {
            let s = s.clone();
            tokio::spawn(async move { s.oneshot(req("q")).await })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(10)).await;
    leader.abort();
    for w in waiters {
        assert_eq!(text_of(w.await.unwrap().unwrap()).await, "second");
    }
    // One waiter took over as the new leader; the rest waited for it.
    assert_eq!(mock.calls(), 2);
}

#[tokio::test(start_paused = true)]
async fn a_leader_timing_out_on_its_own_deadline_lets_waiters_retry() {
    let mock = MockLlm::new("mock")
        .then(Step::error(LlmError::timeout("deadline")).with_latency(Duration::from_secs(1)))
        .otherwise(Step::reply("fine"));
    let layer = CacheLayer::in_memory(1 << 20);
    let s = svc(&layer, &mock);
    let tasks: Vec<_> = (0..3)
        .map(|_| {
            let s = s.clone();
            tokio::spawn(async move { s.oneshot(req("q")).await })
        })
        .collect();
    let results: Vec<_> = futures_util::future::join_all(tasks).await;
    let oks = results
        .into_iter()
        .filter(|r| matches!(r, Ok(Ok(_))))
        .count();
    assert_eq!(oks, 2, "the leader fails alone; its waiters are served");
    assert_eq!(mock.calls(), 2);
}

#[tokio::test(start_paused = true)]
async fn waiters_do_not_wait_past_their_deadline() {
    let mock =
        MockLlm::new("mock").otherwise(Step::reply("slow").with_latency(Duration::from_secs(30)));
    let layer = CacheLayer::in_memory(1 << 20);
    let s = svc(&layer, &mock);
    let leader = {
        let s = s.clone();
        tokio::spawn(async move { s.oneshot(req("q")).await })
    };
    tokio::time::sleep(Duration::from_millis(10)).await;
    let mut r = req("q");
    r.set_deadline(llm_tower::Deadline::after(Duration::from_secs(2)));
    let started = tokio::time::Instant::now();
    let err = s.clone().oneshot(r).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Timeout);
    assert_eq!(
        started.elapsed(),
        Duration::from_secs(2),
        "paused clock: exact"
    );
    // The leader is unaffected.
    assert_eq!(text_of(leader.await.unwrap().unwrap()).await, "slow");
    assert_eq!(mock.calls(), 1);
}

#[tokio::test(start_paused = true)]
async fn coalescing_can_be_disabled() {
    let mock =
        MockLlm::new("mock").otherwise(Step::reply("x").with_latency(Duration::from_secs(1)));
    let layer = CacheLayer::in_memory(1 << 20).coalesce(false);
    let s = svc(&layer, &mock);
    let tasks: Vec<_> = (0..3)
        .map(|_| {
            let s = s.clone();
            tokio::spawn(async move { s.oneshot(req("q")).await })
        })
        .collect();
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    assert_eq!(mock.calls(), 3);
}

// ===== streams =====

#[tokio::test(start_paused = true)]
async fn a_completed_stream_is_stored_and_replayed_chunk_by_chunk() {
    let mock = MockLlm::new("mock").then(
        Step::stream(["Hel", "lo", " world"])
            .chunk_delay(Duration::from_millis(50))
            .with_usage(Usage::new(12, 3)),
    );
    let layer = CacheLayer::in_memory(1 << 20);
    let mut s = svc(&layer, &mock);

    let first = call(&mut s, stream_req("q")).await.unwrap();
    assert_eq!(first.meta.cache, CacheStatus::Miss);
    let (texts, err) = drain(first).await;
    assert!(err.is_none());
    assert_eq!(texts, ["Hel", "lo", " world"]);

    let hit = call(&mut s, stream_req("q")).await.unwrap();
    assert_eq!(hit.meta.cache, CacheStatus::Hit);
    assert_eq!(hit.meta.usage, Some(Usage::new(12, 3)));
    let (texts, err) = drain(hit).await;
    assert!(err.is_none());
    assert_eq!(texts, ["Hel", "lo", " world"], "replayed chunk by chunk");

    // The same entry answers a non-streaming request, assembled.
    let complete = call(&mut s, req("q")).await.unwrap();
    assert_eq!(complete.meta.cache, CacheStatus::Hit);
    let r = complete.into_complete().await.unwrap();
    assert_eq!(r.text(), "Hello world");
    assert_eq!(r.usage, Some(Usage::new(12, 3)));
    assert_eq!(r.choices[0].finish_reason.as_deref(), Some("stop"));
    assert_eq!(mock.calls(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_complete_answer_replays_as_a_stream() {
    let mock = MockLlm::new("mock").then(Step::reply("whole").with_usage(Usage::new(5, 1)));
    let layer = CacheLayer::in_memory(1 << 20);
    let mut s = svc(&layer, &mock);
    call(&mut s, req("q")).await.unwrap();
    let hit = call(&mut s, stream_req("q")).await.unwrap();
    assert_eq!(hit.meta.cache, CacheStatus::Hit);
    assert!(hit.is_stream());
    let ResponseBody::Stream(mut st) = hit.body else {
        unreachable!()
    };
    let mut n = 0;
    let mut text = String::new();
    while let Some(c) = st.next().await {
        let c = c.unwrap();
        n += 1;
        text.extend(c.choices.iter().filter_map(|ch| ch.delta.text()));
    }
    assert_eq!(text, "whole");
    assert!(n >= 2, "role/content chunk, finish chunk, usage chunk");
    assert_eq!(st.usage(), Some(&Usage::new(5, 1)));
}

#[tokio::test(start_paused = true)]
async fn failed_streams_are_never_stored() {
    let mock = MockLlm::new("mock")
        .then(Step::stream(["a", "b", "c"]).fail_after(2, LlmError::transport("reset")))
        .otherwise(Step::stream(["a", "b", "c"]));
    let layer = CacheLayer::in_memory(1 << 20);
    let mut s = svc(&layer, &mock);
    let (texts, err) = drain(call(&mut s, stream_req("q")).await.unwrap()).await;
    assert_eq!(texts, ["a", "b"]);
    assert_eq!(err.unwrap().kind(), ErrorKind::Transport);
    let next = call(&mut s, stream_req("q")).await.unwrap();
    assert_eq!(next.meta.cache, CacheStatus::Miss);
    assert_eq!(mock.calls(), 2);
}

#[tokio::test(start_paused = true)]
async fn streams_cut_short_are_never_stored() {
    let mock = MockLlm::new("mock")
        .then(Step::stream(["a", "b"]).without_finish())
        .otherwise(Step::stream(["a", "b"]));
    let layer = CacheLayer::in_memory(1 << 20);
    let mut s = svc(&layer, &mock);
    let (_, err) = drain(call(&mut s, stream_req("q")).await.unwrap()).await;
    assert!(err.is_none());
    assert_eq!(
        call(&mut s, stream_req("q")).await.unwrap().meta.cache,
        CacheStatus::Miss
    );
    assert_eq!(layer.stats().skipped_writes(), 1);
}

#[tokio::test(start_paused = true)]
async fn streams_dropped_by_the_caller_are_never_stored() {
    let mock = MockLlm::new("mock")
        .otherwise(Step::stream(["a", "b", "c"]).chunk_delay(Duration::from_millis(10)));
    let layer = CacheLayer::in_memory(1 << 20);
    let mut s = svc(&layer, &mock);
    let resp = call(&mut s, stream_req("q")).await.unwrap();
    let ResponseBody::Stream(mut st) = resp.body else {
        unreachable!()
    };
    st.next().await.unwrap().unwrap();
    drop(st);
    assert_eq!(
        call(&mut s, stream_req("q")).await.unwrap().meta.cache,
        CacheStatus::Miss
    );
    assert_eq!(mock.calls(), 2);
    assert_eq!(layer.stats().writes(), 0);
}

#[tokio::test(start_paused = true)]
async fn oversized_streams_are_served_but_not_stored() {
    let big = "x".repeat(1000);
    let mock = MockLlm::new("mock").otherwise(Step::stream(vec![big.clone(); 5]));
    let layer = CacheLayer::in_memory(1 << 20).max_entry_bytes(2000);
    let mut s = svc(&layer, &mock);
    let (texts, err) = drain(call(&mut s, stream_req("q")).await.unwrap()).await;
    assert!(err.is_none());
    assert_eq!(texts.len(), 5);
    assert_eq!(
        call(&mut s, stream_req("q")).await.unwrap().meta.cache,
        CacheStatus::Miss
    );
}

#[tokio::test(start_paused = true)]
async fn stream_waiters_get_the_leaders_stream_once_it_completed() {
    let mock = MockLlm::new("mock")
        .then(Step::stream(["x", "y"]).chunk_delay(Duration::from_millis(100)))
        .otherwise(Step::error(LlmError::internal("must not be called twice")));
    let layer = CacheLayer::in_memory(1 << 20);
    let s = svc(&layer, &mock);
    let tasks: Vec<_> = (0..4)
        .map(|_| {
            let s = s.clone();
            tokio::spawn(async move { drain(s.oneshot(stream_req("q")).await.unwrap()).await })
        })
        .collect();
    for t in tasks {
        let (texts, err) = t.await.unwrap();
        assert!(err.is_none());
        assert_eq!(texts, ["x", "y"]);
    }
    assert_eq!(mock.calls(), 1);
}

#[tokio::test(start_paused = true)]
async fn stream_waiters_retry_when_the_leader_drops_its_stream() {
    let mock = MockLlm::new("mock")
        .then(Step::stream(["x", "y"]).chunk_delay(Duration::from_millis(100)))
        .otherwise(Step::stream(["z"]));
    let layer = CacheLayer::in_memory(1 << 20);
    let mut s = svc(&layer, &mock);
    let lead = call(&mut s, stream_req("q")).await.unwrap();
    let waiter = {
        let s = s.clone();
        tokio::spawn(async move { drain(s.oneshot(stream_req("q")).await.unwrap()).await })
    };
    tokio::time::sleep(Duration::from_millis(10)).await;
    drop(lead);
    let (texts, err) = waiter.await.unwrap();
    assert!(err.is_none());
    assert_eq!(texts, ["z"]);
    assert_eq!(mock.calls(), 2);
}

// ===== memory store =====

/// A store that only answers asynchronously (like a network store).
#[derive(Debug)]
struct AsyncOnly(MemoryStore);

impl CacheStore for AsyncOnly {
    fn get(&self, key: CacheKey) -> StoreFuture<Option<Arc<CachedEntry>>> {
        let inner = self.0.get(key);
        Box::pin(async move {
            tokio::time::sleep(Duration::from_millis(1)).await;
            inner.await
        })
    }
    fn put(&self, key: CacheKey, e: Arc<CachedEntry>, ttl: Duration) -> StoreFuture<()> {
        self.0.put(key, e, ttl)
    }
}

#[tokio::test(start_paused = true)]
async fn async_stores_serve_hits_too() {
    let mock = MockLlm::new("mock").then(Step::reply("a").with_usage(Usage::new(1, 1)));
    let layer = CacheLayer::new(AsyncOnly(MemoryStore::new(1 << 20)));
    let mut s = svc(&layer, &mock);
    assert_eq!(
        call(&mut s, req("q")).await.unwrap().meta.cache,
        CacheStatus::Miss
    );
    let hit = call(&mut s, req("q")).await.unwrap();
    assert_eq!(hit.meta.cache, CacheStatus::Hit);
    assert_eq!(hit.meta.usage, Some(Usage::new(1, 1)));
    assert_eq!(text_of(hit).await, "a");
    assert_eq!(mock.calls(), 1);
}

#[tokio::test]
async fn memory_store_is_bounded_by_bytes() {
    let store = MemoryStore::new(20_000);
    let entry = Arc::new(CachedEntry::complete(
        llm_tower::ChatResponse::from_text("m", "y".repeat(1000)),
        &Default::default(),
    ));
    for i in 0..100u8 {
        store
            .put(
                CacheKey::from_bytes([i; 32]),
                entry.clone(),
                Duration::from_secs(60),
            )
            .await
            .unwrap();
    }
    assert!(store.weighted_size() <= 20_000, "{}", store.weighted_size());
    assert!(store.entry_count() < 100);
    assert!(store.entry_count() > 0);
}

#[test]
fn an_entry_weighed_from_the_upstream_body_size_is_close_to_its_json_size() {
    // What a provider reads: the body an OpenAI-compatible upstream sends.
    let body = br#"{"id":"chatcmpl-1","object":"chat.completion","created":1795728205,"model":"gpt-4o-mini","choices":[{"index":0,"message":{"role":"assistant","content":"Hello there, how can I help?","refusal":null,"annotations":[]},"logprobs":null,"finish_reason":"stop"}],"usage":{"prompt_tokens":7,"completion_tokens":11,"total_tokens":18,"prompt_tokens_details":{"cached_tokens":0,"audio_tokens":0},"completion_tokens_details":{"reasoning_tokens":0,"audio_tokens":0,"accepted_prediction_tokens":0,"rejected_prediction_tokens":0}},"service_tier":"default","system_fingerprint":"fp_1"}"#;
    let resp: llm_tower::ChatResponse = serde_json::from_slice(body).unwrap();
    let mut meta = llm_tower::LlmResponse::complete(resp.clone()).meta;
    meta.provider = Some("openai".into());
    meta.body_bytes = Some(body.len());
    let hinted = CachedEntry::complete(resp.clone(), &meta);
    meta.body_bytes = None;
    let measured = CachedEntry::complete(resp, &meta);
    let exact = serde_json::to_vec(&measured).unwrap().len();
    assert_eq!(measured.approx_size(), exact);
    let estimate = hinted.approx_size();
    assert!(
        estimate.abs_diff(exact) * 10 <= exact,
        "estimate {estimate} vs {exact}"
    );
}

#[tokio::test]
async fn cached_entries_round_trip_through_json() {
    let mut chunks = Vec::new();
    let resp = llm_tower::ChatResponse {
        usage: Some(Usage::new(3, 4)),
        ..llm_tower::ChatResponse::from_text("m", "hi")
    };
    chunks.extend(resp.to_chunks());
    let e = CachedEntry::chunks(chunks, None, &Default::default());
    assert!(e.is_complete());
    assert_eq!(e.usage, Some(Usage::new(3, 4)));
    let json = serde_json::to_vec(&e).unwrap();
    assert_eq!(json.len(), e.approx_size());
    let back: CachedEntry = serde_json::from_slice(&json).unwrap();
    assert_eq!(back, e);
}

#[tokio::test(start_paused = true)]
async fn huge_ttls_do_not_overflow() {
    let mock = MockLlm::new("mock");
    let layer = CacheLayer::in_memory(1 << 20).default_ttl(Duration::MAX);
    let mut s = svc(&layer, &mock);
    call(&mut s, req("q")).await.unwrap();
    assert_eq!(
        call(&mut s, req("q")).await.unwrap().meta.cache,
        CacheStatus::Hit
    );
}

#[tokio::test(start_paused = true)]
async fn hits_carry_the_original_usage_in_the_body_too() {
    // Usage known only from the meta (not the body) still reaches cost layers on a hit,
    // which read the complete body or the stream's usage chunk; for a typed body and for
    // one kept as the upstream's JSON.
    let no_usage = r#"{"id":"c1","model":"m","choices":[{"message":{"role":"assistant","content":"a"},"finish_reason":"stop"}]}"#;
    for as_json in [false, true] {
        let mock = MockLlm::new("mock").then(Step::respond(move |r| {
            let mut resp = if as_json {
                encoded(no_usage)
            } else {
                LlmResponse::complete(llm_tower::ChatResponse::from_text(r.model.clone(), "a"))
            };
            resp.meta.usage = Some(Usage::new(9, 2));
            Ok(resp)
        }));
        let layer = CacheLayer::in_memory(1 << 20);
        let mut s = svc(&layer, &mock);
        call(&mut s, req("q")).await.unwrap();
        let hit = call(&mut s, req("q")).await.unwrap();
        assert_eq!(hit.meta.usage, Some(Usage::new(9, 2)));
        assert_eq!(
            hit.into_complete().await.unwrap().usage,
            Some(Usage::new(9, 2))
        );
        let hit = call(&mut s, stream_req("q")).await.unwrap();
        let ResponseBody::Stream(mut st) = hit.body else {
            unreachable!()
        };
        while let Some(c) = st.next().await {
            c.unwrap();
        }
        assert_eq!(st.usage(), Some(&Usage::new(9, 2)), "as_json: {as_json}");
    }
}

// ===== answers kept as the upstream's JSON =====

fn encoded(json: &str) -> LlmResponse {
    let body = llm_tower::EncodedResponse::from_json(json.to_owned().into_bytes().into()).unwrap();
    LlmResponse::encoded(body)
}

const ENCODED: &str = r#"{"id":"c1","model":"gpt-test","choices":[{"index":0,"message":{"role":"assistant","content":"kept"},"finish_reason":"stop"}],"usage":{"prompt_tokens":5,"completion_tokens":1,"total_tokens":6},"system_fingerprint":"fp"}"#;

#[tokio::test(start_paused = true)]
async fn an_encoded_answer_is_stored_and_served_as_the_same_bytes() {
    let mock = MockLlm::new("mock").then(Step::respond(|_| Ok(encoded(ENCODED))));
    let layer = CacheLayer::in_memory(1 << 20);
    let mut s = svc(&layer, &mock);

    let first = call(&mut s, req("q")).await.unwrap();
    assert_eq!(first.meta.cache, CacheStatus::Miss);
    assert!(matches!(first.body, ResponseBody::Encoded(_)));

    let hit = call(&mut s, req("q")).await.unwrap();
    assert_eq!(hit.meta.cache, CacheStatus::Hit);
    assert_eq!(hit.meta.usage, Some(Usage::new(5, 1)));
    let ResponseBody::Encoded(body) = &hit.body else {
        panic!("expected the stored bytes, got {:?}", hit.body);
    };
    assert_eq!(body.json().as_ref(), ENCODED.as_bytes());

    // A streaming request for the same answer gets it replayed as chunks.
    let (texts, err) = drain(call(&mut s, stream_req("q")).await.unwrap()).await;
    assert_eq!((texts.concat(), err.is_none()), ("kept".to_owned(), true));
    assert_eq!(mock.calls(), 1);
}

#[tokio::test(start_paused = true)]
async fn encoded_answers_without_choices_are_not_stored() {
    let mock = MockLlm::new("mock")
        .then(Step::respond(|_| {
            Ok(encoded(r#"{"id":"c","model":"m","choices":[]}"#))
        }))
        .then(Step::respond(|_| Ok(encoded(ENCODED))));
    let layer = CacheLayer::in_memory(1 << 20);
    let mut s = svc(&layer, &mock);
    call(&mut s, req("q")).await.unwrap();
    assert_eq!(
        call(&mut s, req("q")).await.unwrap().meta.cache,
        CacheStatus::Miss
    );
    assert_eq!(mock.calls(), 2);
}

#[test]
fn encoded_entries_round_trip_through_json_as_the_document_itself() {
    let body = llm_tower::EncodedResponse::from_json(ENCODED.as_bytes().to_vec().into()).unwrap();
    let e = CachedEntry::encoded(body, &Default::default());
    assert!(e.is_complete());
    assert_eq!(e.usage, Some(Usage::new(5, 1)));
    let json = serde_json::to_string(&e).unwrap();
    assert!(json.contains(ENCODED), "{json}");
    let back: CachedEntry = serde_json::from_str(&json).unwrap();
    assert_eq!(back, e);
    // Weighed from the document's length (with a typical usage object), not serialized.
    let (est, real) = (e.approx_size(), json.len());
    assert!(
        est >= real / 2 && est <= real * 2,
        "estimate {est}, real {real}"
    );
}

// ===== hostile timing and sizes =====

/// The leader's client reads its stream slowly (here: never past the first chunk), so the
/// flight does not land; a waiter stops waiting after the coalesce timeout and is served
/// by its own upstream call.
#[tokio::test(start_paused = true)]
async fn a_slow_reading_leader_does_not_hold_its_waiters_hostage() {
    let mock = MockLlm::new("mock")
        .then(Step::stream(["x", "y"]))
        .otherwise(Step::stream(["z"]));
    let layer = CacheLayer::in_memory(1 << 20).coalesce_timeout(Duration::from_secs(5));
    let mut s = svc(&layer, &mock);
    let lead = call(&mut s, stream_req("q")).await.unwrap();
    let ResponseBody::Stream(mut lead) = lead.body else {
        unreachable!()
    };
    lead.next().await.unwrap().unwrap();
    let started = tokio::time::Instant::now();
    let waiter = {
        let s = s.clone();
        tokio::spawn(async move {
            let resp = s.oneshot(stream_req("q")).await.unwrap();
            (resp.meta.cache, drain(resp).await)
        })
    };
    let (status, (texts, err)) = waiter.await.unwrap();
    assert!(err.is_none());
    assert_eq!(texts, ["z"]);
    assert_eq!(status, CacheStatus::Miss);
    assert_eq!(started.elapsed(), Duration::from_secs(5));
    assert_eq!(mock.calls(), 2);
    let st = layer.stats().snapshot();
    assert_eq!((st.coalesce_timeouts, st.coalesced), (1, 0));
    drop(lead);
}

/// A slow upstream: the waiter waits for the leader up to the coalesce timeout, then
/// calls upstream itself; the leader still gets its own answer.
#[tokio::test(start_paused = true)]
async fn a_waiter_gives_up_on_a_slow_leader_after_the_coalesce_timeout() {
    let mock = MockLlm::new("mock")
        .then(Step::reply("slow").with_latency(Duration::from_secs(60)))
        .otherwise(Step::reply("fast"));
    let layer = CacheLayer::in_memory(1 << 20).coalesce_timeout(Duration::from_secs(2));
    let s = svc(&layer, &mock);
    let lead = tokio::spawn(s.clone().oneshot(req("q")));
    tokio::task::yield_now().await;
    let waiter = tokio::spawn(s.clone().oneshot(req("q")));
    let w = waiter.await.unwrap().unwrap();
    assert_eq!(w.meta.cache, CacheStatus::Miss);
    assert_eq!(text_of(w).await, "fast");
    assert_eq!(text_of(lead.await.unwrap().unwrap()).await, "slow");
    assert_eq!(mock.calls(), 2);
    assert_eq!(layer.stats().coalesce_timeouts(), 1);
}

/// By default waiters wait long enough for an ordinary answer: no timeout, one call.
#[tokio::test(start_paused = true)]
async fn waiters_within_the_coalesce_timeout_share_the_answer() {
    let mock = MockLlm::new("mock")
        .then(Step::reply("a").with_latency(Duration::from_secs(20)))
        .otherwise(Step::error(LlmError::internal("must not be called twice")));
    let layer = CacheLayer::in_memory(1 << 20);
    let s = svc(&layer, &mock);
    let lead = tokio::spawn(s.clone().oneshot(req("q")));
    tokio::task::yield_now().await;
    let w = s.oneshot(req("q")).await.unwrap();
    assert_eq!(w.meta.cache, CacheStatus::Hit);
    assert_eq!(text_of(lead.await.unwrap().unwrap()).await, "a");
    assert_eq!(mock.calls(), 1);
    assert_eq!(layer.stats().coalesce_timeouts(), 0);
}

/// A stream whose copy outgrows `max_stream_bytes` is served in full but not stored, and
/// the overflow is counted.
#[tokio::test(start_paused = true)]
async fn streams_past_the_buffer_cap_are_served_but_not_stored() {
    let mock = MockLlm::new("mock").otherwise(Step::stream(vec!["tok"; 200]));
    let layer = CacheLayer::in_memory(1 << 20).max_stream_bytes(16 * 1024);
    let mut s = svc(&layer, &mock);
    let (texts, err) = drain(call(&mut s, stream_req("q")).await.unwrap()).await;
    assert!(err.is_none());
    assert_eq!(texts.len(), 200);
    let st = layer.stats().snapshot();
    assert_eq!(
        (st.stream_overflows, st.skipped_writes, st.writes),
        (1, 1, 0)
    );
    assert_eq!(
        call(&mut s, stream_req("q")).await.unwrap().meta.cache,
        CacheStatus::Miss
    );
    // Under the cap the same stream is stored.
    let layer = CacheLayer::in_memory(1 << 20);
    let mut s = svc(&layer, &mock);
    drain(call(&mut s, stream_req("q")).await.unwrap()).await;
    assert_eq!(layer.stats().writes(), 1);
    assert_eq!(layer.stats().stream_overflows(), 0);
}

// ===== encoded streams =====

const ENC: [&str; 3] = [
    r#"{"id":"c","object":"chat.completion.chunk","model":"m","choices":[{"index":0,"delta":{"content":"Hel"},"finish_reason":null}],"usage":null}"#,
    r#"{"id":"c","object":"chat.completion.chunk","model":"m","choices":[{"index":0,"delta":{"content":"lo"},"finish_reason":"stop"}],"usage":null}"#,
    r#"{"id":"c","object":"chat.completion.chunk","model":"m","choices":[],"usage":{"prompt_tokens":3,"completion_tokens":2,"total_tokens":5}}"#,
];

fn encoded_events(docs: &[&str]) -> Vec<llm_tower::StreamEvent> {
    docs.iter()
        .map(|d| {
            llm_tower::EncodedChunk::from_json(d.as_bytes().to_vec().into())
                .unwrap()
                .into()
        })
        .collect()
}

/// A service answering every call with these encoded events, counting its calls.
fn encoded_upstream(
    docs: &'static [&'static str],
    calls: Arc<std::sync::atomic::AtomicUsize>,
) -> llm_tower::BoxLlmService {
    llm_tower::boxed(tower::service_fn(move |_req: ChatRequest| {
        calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let events = encoded_events(docs).into_iter().map(Ok).collect::<Vec<_>>();
        async move { Ok::<_, LlmError>(LlmResponse::events(futures_util::stream::iter(events))) }
    }))
}

#[tokio::test(start_paused = true)]
async fn a_stream_of_encoded_events_is_stored_and_replayed_as_sent() {
    let calls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let layer = CacheLayer::in_memory(1 << 20);
    let mut s = Cache::new(encoded_upstream(&ENC, calls.clone()), &layer);
    for round in 0..2 {
        let resp = s
            .ready()
            .await
            .unwrap()
            .call(stream_req("q"))
            .await
            .unwrap();
        let want = if round == 0 {
            CacheStatus::Miss
        } else {
            CacheStatus::Hit
        };
        assert_eq!(resp.meta.cache, want);
        let ResponseBody::Stream(mut st) = resp.body else {
            panic!("expected a stream");
        };
        let mut got = Vec::new();
        while let Some(e) = st.next_event().await {
            got.push(e.unwrap());
        }
        // The same documents, still encoded, byte for byte.
        let json: Vec<&[u8]> = got
            .iter()
            .map(|e| match e {
                llm_tower::StreamEvent::Encoded(c) => c.json().as_ref(),
                other => panic!("round {round}: not encoded: {other:?}"),
            })
            .collect();
        assert_eq!(json, ENC.map(str::as_bytes).to_vec(), "round {round}");
        assert_eq!(st.usage().map(|u| u.total_tokens), Some(5));
    }
    assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), 1);
    // The same entry answers a request that does not stream, assembled.
    let resp = s.ready().await.unwrap().call(req("q")).await.unwrap();
    assert_eq!(resp.meta.cache, CacheStatus::Hit);
    assert_eq!(text_of(resp).await, "Hello");
}

#[tokio::test(start_paused = true)]
async fn an_encoded_stream_without_a_finish_is_not_stored() {
    static CUT: [&str; 1] = [ENC[0]];
    let calls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let layer = CacheLayer::in_memory(1 << 20);
    let mut s = Cache::new(encoded_upstream(&CUT, calls.clone()), &layer);
    for _ in 0..2 {
        let resp = s
            .ready()
            .await
            .unwrap()
            .call(stream_req("q"))
            .await
            .unwrap();
        assert_eq!(resp.meta.cache, CacheStatus::Miss);
        let (texts, err) = drain(resp).await;
        assert_eq!((texts, err.is_none()), (vec!["Hel".to_owned()], true));
    }
    assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), 2);
}
