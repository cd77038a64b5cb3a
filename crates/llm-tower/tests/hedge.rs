//! The hedge layer over scripted services, in paused time.
#![cfg(feature = "hedge")]

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use futures_util::{FutureExt, StreamExt};
use llm_tower::hedge::{HedgeDelay, HedgeLayer, Hedged};
use llm_tower::{ChatRequest, ChatResponse, ErrorKind, LlmError, LlmResponse, Message, Usage};
use llm_tower_test::{MockLlm, Step};
use tokio::time::Instant;
use tower::{Layer, Service, ServiceExt};

fn req() -> ChatRequest {
    ChatRequest::new("gpt-4o", vec![Message::user("hello there")])
}

/// Sets its flag when dropped before it was disarmed: stands for an upstream connection
/// closed on cancel.
struct Closed(Option<Arc<AtomicBool>>);
impl Drop for Closed {
    fn drop(&mut self) {
        if let Some(flag) = &self.0 {
            flag.store(true, Ordering::SeqCst);
        }
    }
}

/// Call `i` (from 0) takes `latency(i)` and answers `"answer i"`; a call whose future is
/// dropped before it answers sets `cancelled[i]`.
#[derive(Clone)]
struct Upstream {
    calls: Arc<AtomicUsize>,
    cancelled: Arc<[Arc<AtomicBool>]>,
    latency: Arc<dyn Fn(usize) -> Result<Duration, LlmError> + Send + Sync>,
}

impl Upstream {
    fn new(latency: impl Fn(usize) -> Result<Duration, LlmError> + Send + Sync + 'static) -> Self {
        Self {
            calls: Arc::default(),
            cancelled: (0..512).map(|_| Arc::new(AtomicBool::new(false))).collect(),
            latency: Arc::new(latency),
        }
    }
    fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }
    fn cancelled(&self, i: usize) -> bool {
        self.cancelled[i].load(Ordering::SeqCst)
    }
}

impl Service<ChatRequest> for Upstream {
    type Response = LlmResponse;
    type Error = LlmError;
    type Future = futures_util::future::BoxFuture<'static, Result<LlmResponse, LlmError>>;

    fn poll_ready(
        &mut self,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), LlmError>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: ChatRequest) -> Self::Future {
        let i = self.calls.fetch_add(1, Ordering::SeqCst);
        let latency = (self.latency)(i);
        let flag = self.cancelled[i.min(511)].clone();
        Box::pin(async move {
            let mut guard = Closed(Some(flag));
            let d = latency?;
            tokio::time::sleep(d).await;
            guard.0 = None; // answered: not cancelled
            let mut answer = ChatResponse::from_text(req.model, format!("answer {i}"));
            answer.usage = Some(Usage::new(10, 5));
            Ok(LlmResponse::complete(answer))
        })
    }
}

fn fixed(ms: u64) -> HedgeLayer {
    HedgeLayer::new()
        .delay(HedgeDelay::Fixed(Duration::from_millis(ms)))
        .budget(1.0)
}

#[tokio::test(start_paused = true)]
async fn hedge_fires_at_the_delay_and_the_loser_is_cancelled() {
    let up = Upstream::new(|i| Ok(Duration::from_millis(if i == 0 { 10_000 } else { 300 })));
    let layer = fixed(1_000);
    let stats = layer.stats();
    let mut svc = layer.layer(up.clone());

    let t = Instant::now();
    let fut = svc.ready().await.unwrap().call(req());
    tokio::pin!(fut);
    // Before the delay: one call only.
    assert!(fut.as_mut().now_or_never().is_none());
    tokio::time::advance(Duration::from_millis(999)).await;
    assert!(fut.as_mut().now_or_never().is_none());
    assert_eq!(up.calls(), 1);
    let resp = fut.await.unwrap();
    assert_eq!(t.elapsed(), Duration::from_millis(1_300));
    assert_eq!(up.calls(), 2);
    assert_eq!(resp.into_complete().await.unwrap().text(), "answer 1");
    assert!(
        up.cancelled(0),
        "the first attempt was dropped when the second answered"
    );
    assert!(!up.cancelled(1));
    assert_eq!((stats.hedged(), stats.second_won()), (1, 1));
}

#[tokio::test(start_paused = true)]
async fn no_hedge_when_the_first_answers_in_time() {
    let up = Upstream::new(|_| Ok(Duration::from_millis(900)));
    let layer = fixed(1_000);
    let stats = layer.stats();
    let mut svc = layer.layer(up.clone());
    let resp = svc.ready().await.unwrap().call(req()).await.unwrap();
    assert!(resp.meta.extensions.get::<Hedged>().is_none());
    assert!(resp.meta.paid_attempts.is_empty());
    assert_eq!(up.calls(), 1);
    assert_eq!(stats.hedged(), 0);
}

#[tokio::test(start_paused = true)]
async fn first_wins_over_a_slower_second() {
    // Hedged at 1 s; the first answers at 1.2 s, the second would at 2 s.
    let up = Upstream::new(|i| Ok(Duration::from_millis(if i == 0 { 1_200 } else { 1_000 })));
    let mut svc = fixed(1_000).layer(up.clone());
    let resp = svc.ready().await.unwrap().call(req()).await.unwrap();
    assert_eq!(
        resp.meta.extensions.get::<Hedged>(),
        Some(&Hedged { second_won: false })
    );
    assert!(up.cancelled(1), "the second attempt was cancelled");
    assert_eq!(
        resp.meta.paid_attempts.len(),
        1,
        "the cancelled second is counted"
    );
}

#[tokio::test(start_paused = true)]
async fn hedge_after_the_observed_p95() {
    // 20 answers of 100 ms teach the histogram; the 21st call hangs for 60 s.
    let up = Upstream::new(|i| Ok(Duration::from_millis(if i == 20 { 60_000 } else { 100 })));
    let layer = HedgeLayer::new(); // p95, 20 samples, 5 % budget
    let stats = layer.stats();
    let mut svc = layer.layer(up.clone());
    for _ in 0..20 {
        svc.ready().await.unwrap().call(req()).await.unwrap();
    }
    assert_eq!(stats.hedged(), 0, "no hedging before 20 samples");
    // The upper edge of the histogram bucket holding 100 ms (buckets are under 1 % wide).
    let delay = stats.current_delay().unwrap();
    assert!(
        delay >= Duration::from_millis(100) && delay < Duration::from_millis(101),
        "{delay:?}"
    );
    let t = Instant::now();
    let resp = svc.ready().await.unwrap().call(req()).await.unwrap();
    // Hedged at the delay (tokio's timer rounds it up to the next millisecond), + 100 ms.
    assert_eq!(t.elapsed(), Duration::from_millis(201));
    assert_eq!(
        resp.meta.extensions.get::<Hedged>(),
        Some(&Hedged { second_won: true })
    );
    assert!(up.cancelled(20));
}

#[tokio::test(start_paused = true)]
async fn budget_stops_hedging_beyond_its_share() {
    // Every call is slower than the delay: without a budget each would be hedged.
    let up = Upstream::new(|_| Ok(Duration::from_millis(1_000)));
    let layer = HedgeLayer::new().delay(HedgeDelay::Fixed(Duration::from_millis(10))); // 5 %
    let stats = layer.stats();
    let svc = layer.layer(up.clone());
    let calls = (0..200).map(|_| svc.clone().oneshot(req()));
    let results = futures_util::future::join_all(calls).await;
    assert!(results.iter().all(Result::is_ok));
    assert_eq!(stats.requests(), 200);
    assert_eq!(stats.hedged(), 10, "5 % of 200");
    assert_eq!(stats.denied(), 190);
    assert_eq!(up.calls(), 210);
}

#[tokio::test(start_paused = true)]
async fn a_failing_second_attempt_does_not_fail_the_request() {
    let up = Upstream::new(|i| {
        if i == 1 {
            Err(LlmError::unavailable("the other target is cooling down"))
        } else {
            Ok(Duration::from_millis(3_000))
        }
    });
    let mut svc = fixed(1_000).layer(up.clone());
    let t = Instant::now();
    let resp = svc.ready().await.unwrap().call(req()).await.unwrap();
    assert_eq!(t.elapsed(), Duration::from_secs(3));
    assert_eq!(resp.into_complete().await.unwrap().text(), "answer 0");
    assert!(!up.cancelled(0));
}

#[tokio::test(start_paused = true)]
async fn both_failing_returns_the_first_error() {
    let up = Upstream::new(|i| {
        if i == 0 {
            Ok(Duration::from_millis(2_000)).and(Err(LlmError::timeout("first")))
        } else {
            Err(LlmError::unavailable("second"))
        }
    });
    let mut svc = fixed(1_000).layer(up);
    let e = svc.ready().await.unwrap().call(req()).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Timeout);
}

#[tokio::test(start_paused = true)]
async fn a_first_failure_before_the_delay_is_returned_at_once() {
    let up = Upstream::new(|_| Err(LlmError::unavailable("503")));
    let layer = fixed(1_000);
    let stats = layer.stats();
    let mut svc = layer.layer(up.clone());
    let t = Instant::now();
    let e = svc.ready().await.unwrap().call(req()).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Unavailable);
    assert_eq!(t.elapsed(), Duration::ZERO);
    assert_eq!((up.calls(), stats.hedged()), (1, 0));
}

#[tokio::test(start_paused = true)]
async fn streams_race_to_their_first_chunk() {
    // The first stream's headers come at once but its first chunk after 10 s; the second's
    // after 200 ms. The winner's stream starts with its first chunk (replayed).
    let mock = MockLlm::new("m")
        .then(Step::stream(["slow", " one"]).first_chunk_delay(Duration::from_secs(10)))
        .then(Step::stream(["fast", " one"]).first_chunk_delay(Duration::from_millis(200)));
    let mut svc = fixed(1_000).layer(mock.clone());
    let mut r = req();
    r.stream = Some(true);
    let t = Instant::now();
    let resp = svc.ready().await.unwrap().call(r).await.unwrap();
    assert_eq!(t.elapsed(), Duration::from_millis(1_200));
    let mut s = resp.into_stream();
    let mut text = String::new();
    while let Some(c) = s.next().await {
        let c = c.unwrap();
        for ch in &c.choices {
            text.push_str(ch.delta.text().unwrap_or_default());
        }
    }
    assert_eq!(text, "fast one");
    assert_eq!(mock.calls(), 2);
}

#[cfg(feature = "cost")]
#[tokio::test(start_paused = true)]
async fn cost_counts_both_attempts() {
    use llm_tower::cost::{CostLayer, ModelPrice, PriceTable};
    let prices = || {
        PriceTable::new().with(
            "gpt-4o",
            ModelPrice::per_mtok_usd(1000.0, 1000.0, None).unwrap(),
        )
    };
    // Same request twice: once answered in time, once hedged.
    let up = Upstream::new(|i| Ok(Duration::from_millis(if i == 1 { 10_000 } else { 100 })));
    let cost = CostLayer::new(prices());
    let totals = cost.clone();
    let mut svc = tower::ServiceBuilder::new()
        .layer(cost)
        .layer(fixed(1_000))
        .service(up);
    let plain = svc.ready().await.unwrap().call(req()).await.unwrap();
    let hedged = svc.ready().await.unwrap().call(req()).await.unwrap();
    let (c1, c2) = (
        plain.meta.cost.unwrap().nano_usd,
        hedged.meta.cost.unwrap().nano_usd,
    );
    assert!(c2 > c1, "the cancelled attempt is priced too: {c1} vs {c2}");
    assert_eq!(hedged.meta.paid_attempts.len(), 1);
    assert_eq!(totals.totals().total.discarded_attempts, 1);
}

#[cfg(feature = "balance")]
#[tokio::test(start_paused = true)]
async fn over_a_balanced_group_the_second_attempt_goes_to_the_other_member() {
    use llm_tower::balance::{Balance, BalanceTarget};
    // Whichever member the first attempt picks hangs (its first call); the hedge must go to
    // the other member, which answers in 100 ms.
    let a = Upstream::new(|i| Ok(Duration::from_millis(if i == 0 { 60_000 } else { 100 })));
    let b = Upstream::new(|i| Ok(Duration::from_millis(if i == 0 { 60_000 } else { 100 })));
    let group = Balance::new(vec![
        BalanceTarget::new("a", a.clone()),
        BalanceTarget::new("b", b.clone()),
    ]);
    let mut svc = fixed(1_000).layer(group);
    let t = Instant::now();
    let resp = svc.ready().await.unwrap().call(req()).await.unwrap();
    assert_eq!(
        t.elapsed(),
        Duration::from_secs(60),
        "both members' first calls hang"
    );
    // Both were called once: the second attempt did not go to the first one's member.
    assert_eq!((a.calls(), b.calls()), (1, 1));
    let winner = resp.meta.provider.as_deref().unwrap().to_owned();
    let loser = if winner == "a" { &b } else { &a };
    assert!(loser.cancelled(0), "the loser's call was dropped");
}
