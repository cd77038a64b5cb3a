//! The balance layer over scripted members, in paused time.
#![cfg(feature = "balance")]

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures_util::StreamExt;
use llm_tower::balance::{Balance, BalanceLayer, BalanceTarget, Pick};
use llm_tower::fallback::Cooldown;
use llm_tower::{
    ChatRequest, ChatResponse, ErrorKind, LlmError, LlmResponse, Message, RateLimitHeadroom,
    TakenTargets,
};
use llm_tower_test::{MockLlm, Step};
use tower::{Layer, Service, ServiceExt};

fn req() -> ChatRequest {
    ChatRequest::new("gpt-4o", vec![Message::user("hi")])
}

/// A member whose latency (ms) can be changed while the test runs, and whose answers
/// report `headroom` (remaining requests of 100, resetting in 60 s) when set.
#[derive(Clone)]
struct Member {
    name: &'static str,
    latency_ms: Arc<AtomicU64>,
    remaining: Arc<AtomicU64>,
}

const NO_HEADROOM: u64 = u64::MAX;

impl Member {
    fn new(name: &'static str, ms: u64) -> Self {
        Self {
            name,
            latency_ms: Arc::new(AtomicU64::new(ms)),
            remaining: Arc::new(AtomicU64::new(NO_HEADROOM)),
        }
    }

    fn target(&self) -> BalanceTarget {
        let m = self.clone();
        BalanceTarget::new(
            self.name,
            tower::service_fn(move |req: ChatRequest| {
                let ms = m.latency_ms.load(Ordering::Relaxed);
                let remaining = m.remaining.load(Ordering::Relaxed);
                async move {
                    tokio::time::sleep(Duration::from_millis(ms)).await;
                    let mut resp =
                        LlmResponse::complete(ChatResponse::from_text(req.model, "answer"));
                    if remaining != NO_HEADROOM {
                        resp.meta.headroom = Some(RateLimitHeadroom {
                            remaining_requests: Some(remaining),
                            limit_requests: Some(100),
                            reset_requests: Some(Duration::from_secs(60)),
                            ..Default::default()
                        });
                    }
                    Ok::<_, LlmError>(resp)
                }
            }),
        )
    }
}

async fn send(group: &mut Balance, n: usize) -> Vec<String> {
    let mut served = Vec::new();
    for _ in 0..n {
        let resp = group.ready().await.unwrap().call(req()).await.unwrap();
        served.push(resp.meta.provider.as_deref().unwrap().to_owned());
    }
    served
}

fn count(served: &[String], name: &str) -> usize {
    served.iter().filter(|s| *s == name).count()
}

#[tokio::test(start_paused = true)]
async fn slow_member_gets_less_traffic_then_recovers() {
    let fast = Member::new("fast", 100);
    let slow = Member::new("slow", 2_000);
    let mut group = Balance::new(vec![fast.target(), slow.target()]);
    let stats = group.stats();

    let served = send(&mut group, 100).await;
    // The slow member's first answer raises its estimate to 2 s: it is tried again only
    // when its estimate has decayed below the fast one's.
    assert!(
        count(&served, "slow") <= 10,
        "slow served {}",
        count(&served, "slow")
    );
    assert!(count(&served, "fast") >= 90);
    let snap = stats.snapshot();
    assert!(snap[1].latency > snap[0].latency, "{snap:?}");

    // It speeds up: once its estimate has decayed it is tried, measured fast, and keeps
    // its share.
    slow.latency_ms.store(100, Ordering::Relaxed);
    tokio::time::advance(Duration::from_secs(60)).await;
    let served = send(&mut group, 100).await;
    assert!(
        count(&served, "slow") >= 30,
        "slow served {}",
        count(&served, "slow")
    );
    assert!(
        count(&served, "fast") >= 30,
        "fast served {}",
        count(&served, "fast")
    );
}

#[tokio::test(start_paused = true)]
async fn a_call_given_up_raises_the_members_estimate() {
    // A call dropped before its answer (a hedge's loser, a client gone) took at least that
    // long: a member whose slow calls are always cancelled must not keep looking fast.
    let a = Member::new("a", 100);
    let b = Member::new("b", 100);
    let mut group = Balance::new(vec![a.target(), b.target()]);
    let stats = group.stats();
    send(&mut group, 10).await;
    a.latency_ms.store(60_000, Ordering::Relaxed);
    // Calls until one goes to "a"; that one is given up after 5 s.
    loop {
        let fut = group.ready().await.unwrap().call(req());
        if stats.snapshot()[0].in_flight == 1 {
            let r = tokio::time::timeout(Duration::from_secs(5), fut).await;
            assert!(r.is_err(), "a hangs for 60 s");
            break;
        }
        fut.await.unwrap();
    }
    let snap = stats.snapshot();
    assert_eq!(snap[0].in_flight, 0);
    assert!(snap[0].latency >= Duration::from_secs(5), "{snap:?}");
    // So "b" serves the next calls.
    let served = send(&mut group, 20).await;
    assert_eq!(count(&served, "b"), 20, "{served:?}");

    // A call given up sooner than the estimate says nothing: the estimate stays.
    let before = stats.snapshot()[1].latency;
    let fut = group.ready().await.unwrap().call(req());
    assert_eq!(stats.snapshot()[1].in_flight, 1);
    drop(fut);
    assert_eq!(stats.snapshot()[1].latency, before);
}

#[tokio::test(start_paused = true)]
async fn in_flight_requests_spread_over_equal_members() {
    let a = Member::new("a", 1_000);
    let b = Member::new("b", 1_000);
    let group = Balance::new(vec![a.target(), b.target()]);
    let stats = group.stats();
    let calls = (0..40).map(|_| group.clone().oneshot(req()));
    let served = futures_util::future::join_all(calls).await;
    assert!(served.iter().all(Result::is_ok));
    // Each pick raises the picked member's in-flight count, so concurrent requests split.
    let (pa, pb) = (stats.picked("a"), stats.picked("b"));
    assert_eq!(pa + pb, 40);
    assert!(pa.abs_diff(pb) <= 2, "a {pa} b {pb}");
}

#[tokio::test(start_paused = true)]
async fn member_near_its_headroom_is_avoided() {
    let low = Member::new("low", 100);
    let high = Member::new("high", 100);
    low.remaining.store(5, Ordering::Relaxed); // 5 % of 100 left: load × 10
    high.remaining.store(90, Ordering::Relaxed);
    let mut group = Balance::new(vec![low.target(), high.target()]);
    let served = send(&mut group, 50).await;
    assert!(
        count(&served, "low") <= 8,
        "low served {}",
        count(&served, "low")
    );

    // At its limit it is not picked at all until the reset.
    low.remaining.store(0, Ordering::Relaxed);
    let _ = send(&mut group, 40).await; // low answers once with 0 left, or is counted down to 0
    let served = send(&mut group, 20).await;
    assert_eq!(count(&served, "low"), 0);
    tokio::time::advance(Duration::from_secs(61)).await;
    low.remaining.store(NO_HEADROOM, Ordering::Relaxed);
    high.remaining.store(NO_HEADROOM, Ordering::Relaxed);
    let served = send(&mut group, 40).await;
    assert!(
        count(&served, "low") > 0,
        "low is picked again after its reset"
    );
}

#[tokio::test(start_paused = true)]
async fn rate_limited_member_is_left_alone_until_its_retry_after() {
    let limited = MockLlm::new("limited")
        .then(Step::error(
            LlmError::rate_limited("429").with_retry_after(Duration::from_secs(30)),
        ))
        .otherwise(Step::reply("ok"));
    let other =
        MockLlm::new("other").otherwise(Step::reply("ok").with_latency(Duration::from_secs(1)));
    let mut group = Balance::new(vec![
        BalanceTarget::new("limited", limited.clone()),
        BalanceTarget::new("other", other.clone()),
    ])
    .no_cooldown();
    // Whichever is picked first, within a few requests "limited" answers 429.
    let mut saw_429 = false;
    for _ in 0..10 {
        if let Err(e) = group.ready().await.unwrap().call(req()).await {
            assert_eq!(e.kind(), ErrorKind::RateLimited);
            assert_eq!(e.provider(), Some("limited"));
            saw_429 = true;
            break;
        }
    }
    assert!(saw_429);
    let before = limited.calls();
    for _ in 0..20 {
        group.ready().await.unwrap().call(req()).await.unwrap();
    }
    assert_eq!(limited.calls(), before, "not picked before its retry-after");
}

#[tokio::test(start_paused = true)]
async fn open_breaker_is_not_chosen_and_all_open_fails_fast() {
    let bad = MockLlm::new("bad").otherwise(Step::error(LlmError::unavailable("503")));
    let good = MockLlm::new("good");
    let cooldown = Cooldown::new(2, Duration::from_secs(60), Duration::from_secs(30));
    let mut group = Balance::new(vec![
        BalanceTarget::new("bad", bad.clone()),
        BalanceTarget::new("good", good.clone()),
    ])
    .cooldown(cooldown);
    let mut errors = 0;
    for _ in 0..30 {
        if group.ready().await.unwrap().call(req()).await.is_err() {
            errors += 1;
        }
    }
    assert_eq!(bad.calls(), 2, "the breaker opened after 2 failures");
    assert_eq!(errors, 2);
    assert_eq!(good.calls(), 28);
    let snap = group.stats().snapshot();
    assert!(snap[0].excluded && !snap[1].excluded, "{snap:?}");

    // Both failing: once both are open, a request fails at once with a retry-after.
    let bad2 = MockLlm::new("bad2").otherwise(Step::error(LlmError::unavailable("503")));
    let mut group = Balance::new(vec![
        BalanceTarget::new("bad", bad.clone()),
        BalanceTarget::new("bad2", bad2.clone()),
    ])
    .cooldown(cooldown);
    for _ in 0..4 {
        let _ = group.ready().await.unwrap().call(req()).await;
    }
    let t = tokio::time::Instant::now();
    let e = group.ready().await.unwrap().call(req()).await.unwrap_err();
    assert_eq!(t.elapsed(), Duration::ZERO);
    assert_eq!(e.kind(), ErrorKind::Unavailable);
    assert!(e.retry_after().is_some());
    assert!(e.should_fall_back(), "a chain above moves on");
}

#[tokio::test(start_paused = true)]
async fn a_member_another_copy_took_is_avoided() {
    let a = MockLlm::new("a");
    let b = MockLlm::new("b");
    let mut group = Balance::new(vec![
        BalanceTarget::new("a", a.clone()),
        BalanceTarget::new("b", b.clone()),
    ]);
    for _ in 0..10 {
        let taken = TakenTargets::default();
        taken.take("a");
        let mut r = req();
        r.extensions.insert(taken.clone());
        let resp = group.ready().await.unwrap().call(r).await.unwrap();
        assert_eq!(resp.meta.provider.as_deref(), Some("b"));
        assert!(taken.contains("b"), "the pick is recorded");
    }
    assert_eq!(a.calls(), 0);
}

#[tokio::test(start_paused = true)]
async fn stream_latency_is_time_to_first_chunk() {
    // Headers at once, first chunk after 3 s: the estimate is the 3 s.
    let streamer = MockLlm::new("streamer")
        .otherwise(Step::stream(["a", "b"]).first_chunk_delay(Duration::from_secs(3)));
    let mut group = Balance::new(vec![BalanceTarget::new("streamer", streamer)])
        .default_rtt(Duration::from_millis(1));
    let mut r = req();
    r.stream = Some(true);
    let resp = group.ready().await.unwrap().call(r).await.unwrap();
    let snap = group.stats().snapshot();
    assert_eq!(snap[0].in_flight, 1, "a stream is in flight until it ends");
    let mut s = resp.into_stream();
    let mut n = 0;
    while let Some(item) = s.next().await {
        item.unwrap();
        n += 1;
    }
    assert!(n >= 2);
    drop(s);
    let snap = group.stats().snapshot();
    assert_eq!(snap[0].in_flight, 0);
    assert!(snap[0].latency >= Duration::from_millis(2_900), "{snap:?}");
}

#[tokio::test(start_paused = true)]
async fn layer_model_rewrite_and_round_robin() {
    let inner = MockLlm::new("inner");
    let other = MockLlm::new("other");
    let layer = BalanceLayer::new(vec![
        BalanceTarget::new("other", other.clone()).with_model("m2"),
    ])
    .first_name("inner")
    .pick(Pick::RoundRobin);
    let stats = layer.stats();
    let mut svc = layer.layer(inner.clone());
    for _ in 0..10 {
        svc.ready().await.unwrap().call(req()).await.unwrap();
    }
    assert_eq!((stats.picked("inner"), stats.picked("other")), (5, 5));
    assert!(other.requests().iter().all(|r| r.model == "m2"));
    assert!(inner.requests().iter().all(|r| r.model == "gpt-4o"));
}

#[tokio::test(start_paused = true)]
async fn dropped_request_frees_its_slot() {
    let hang =
        MockLlm::new("hang").otherwise(Step::reply("late").with_latency(Duration::from_secs(100)));
    let mut group = Balance::new(vec![BalanceTarget::new("hang", hang)]);
    let fut = group.ready().await.unwrap().call(req());
    assert_eq!(group.stats().snapshot()[0].in_flight, 1);
    drop(fut);
    assert_eq!(group.stats().snapshot()[0].in_flight, 0);
}

#[tokio::test(start_paused = true)]
async fn empty_group_fails() {
    let mut group = Balance::new(vec![]);
    let e = group.ready().await.unwrap().call(req()).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Unavailable);
}

#[tokio::test(start_paused = true)]
async fn a_taken_member_serves_when_no_other_is_left() {
    let a = MockLlm::new("a");
    let mut group = Balance::new(vec![BalanceTarget::new("a", a.clone())]);
    let taken = TakenTargets::default();
    taken.take("a");
    let mut r = req();
    r.extensions.insert(taken);
    let resp = group.ready().await.unwrap().call(r).await.unwrap();
    assert_eq!(resp.meta.provider.as_deref(), Some("a"));
}
