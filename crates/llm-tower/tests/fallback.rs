//! The fallback layer with the scripted mock, in paused time.
#![cfg(feature = "fallback")]

use std::time::Duration;

use futures_util::StreamExt;
use llm_tower::fallback::{CircuitState, Cooldown, Fallback, FallbackLayer, FallbackTarget};
use llm_tower::{ChatRequest, Deadline, ErrorKind, LlmError, LlmResponse, Message, ResponseBody};
use llm_tower_test::{MockLlm, Step};
use tower::{Layer, Service, ServiceExt};

fn req() -> ChatRequest {
    ChatRequest::new("gpt-4o", vec![Message::user("hi")])
}

fn stream_req() -> ChatRequest {
    let mut r = req();
    r.stream = Some(true);
    r
}

/// primary → cheap → free, without a breaker unless a test adds one.
fn chain(_p: &MockLlm, c: &MockLlm, f: &MockLlm) -> FallbackLayer {
    FallbackLayer::new(vec![
        FallbackTarget::new("cheap", c.clone()).with_model("gpt-4o-mini"),
        FallbackTarget::new("free", f.clone()).with_model("llama-free"),
    ])
    .primary_name("primary")
    .no_cooldown()
}

fn mocks() -> (MockLlm, MockLlm, MockLlm) {
    (MockLlm::new("p"), MockLlm::new("c"), MockLlm::new("f"))
}

/// Drains a response body: the texts seen and the error item that ended it, if any.
async fn drain(resp: LlmResponse) -> (String, Option<LlmError>) {
    match resp.body {
        ResponseBody::Complete(r) => (r.text(), None),
        ResponseBody::Encoded(r) => (r.decode().unwrap().text(), None),
        ResponseBody::Embeddings(_) => panic!("an embeddings answer to a chat request"),
        ResponseBody::Stream(mut s) => {
            let mut text = String::new();
            while let Some(item) = s.next().await {
                match item {
                    Ok(c) => {
                        text.push_str(c.choices.first().and_then(|c| c.delta.text()).unwrap_or(""));
                    }
                    Err(e) => {
                        // Nothing may follow an error item.
                        assert!(s.next().await.is_none());
                        return (text, Some(e));
                    }
                }
            }
            (text, None)
        }
    }
}

#[tokio::test(start_paused = true)]
async fn falls_back_on_each_retryable_kind() {
    let kinds = [
        LlmError::rate_limited("429"),
        LlmError::timeout("slow"),
        LlmError::unavailable("503"),
        LlmError::overloaded("529"),
        LlmError::transport("reset"),
    ];
    for err in kinds {
        let kind = err.kind();
        let (p, c, f) = mocks();
        let p = p.then(Step::error(err));
        let svc = chain(&p, &c, &f).layer(p.clone());
        let resp = svc.oneshot(req()).await.unwrap();
        assert_eq!(resp.meta.attempts.len(), 2, "{kind}");
        let a0 = &resp.meta.attempts[0];
        assert_eq!(&*a0.target, "primary");
        assert_eq!(a0.model.as_deref(), Some("gpt-4o"));
        assert_eq!(a0.error.as_ref().unwrap().kind, kind);
        assert!(!a0.error.as_ref().unwrap().skipped);
        let a1 = &resp.meta.attempts[1];
        assert_eq!(&*a1.target, "cheap");
        assert!(a1.error.is_none());
        assert_eq!(c.last_request().unwrap().model, "gpt-4o-mini");
        assert_eq!(resp.meta.provider.as_deref(), Some("c"));
        assert_eq!(f.calls(), 0);
    }
}

#[tokio::test(start_paused = true)]
async fn never_falls_back_on_request_errors() {
    for err in [
        LlmError::bad_request("bad"),
        LlmError::auth("no key"),
        LlmError::content_filtered("refused"),
        LlmError::context_length_exceeded("too long"),
    ] {
        let kind = err.kind();
        let (p, c, f) = mocks();
        let p = p.then(Step::error(err));
        let svc = chain(&p, &c, &f).layer(p.clone());
        let e = svc.oneshot(req()).await.unwrap_err();
        assert_eq!(e.kind(), kind);
        assert!(e.attempts().is_empty());
        assert_eq!(e.provider(), Some("primary"));
        assert_eq!(c.calls() + f.calls(), 0, "{kind} must not fall back");
    }
}

#[tokio::test(start_paused = true)]
async fn all_failed_carries_every_attempt() {
    let (p, c, f) = mocks();
    let p = p.then(Step::error(LlmError::unavailable("p down")));
    let c = c.then(Step::error(
        LlmError::rate_limited("c busy").with_retry_after(Duration::from_secs(7)),
    ));
    let f = f.then(Step::error(LlmError::overloaded("f overloaded")));
    let svc = chain(&p, &c, &f).honor_retry_after(false).layer(p.clone());
    let e = svc.oneshot(req()).await.unwrap_err();
    assert!(e.message().starts_with("All LLM providers failed"), "{e}");
    for part in ["p down", "c busy", "f overloaded"] {
        assert!(e.message().contains(part), "{e}");
    }
    assert_eq!(e.attempts().len(), 3);
    assert_eq!(e.attempts()[1].provider(), Some("cheap"));
    assert_eq!(e.kind(), ErrorKind::Overloaded);
    assert_eq!(e.retry_after(), Some(Duration::from_secs(7)));
    assert_eq!(f.last_request().unwrap().model, "llama-free");
}

#[tokio::test(start_paused = true)]
async fn total_timeout_moves_on() {
    let (p, c, f) = mocks();
    let p = p.then(Step::reply("late").with_latency(Duration::from_secs(120)));
    let svc = chain(&p, &c, &f)
        .timeout(Duration::from_secs(10))
        .layer(p.clone());
    let resp = svc.oneshot(req()).await.unwrap();
    let err = resp.meta.attempts[0].error.clone().unwrap();
    assert_eq!(err.kind, ErrorKind::Timeout);
    assert!(err.message.contains("10s"), "{}", err.message);
    assert_eq!(drain(resp).await.0, "ok");
}

#[tokio::test(start_paused = true)]
async fn first_chunk_timeout_moves_on() {
    let (p, c, f) = mocks();
    let p = p.then(Step::stream(["a", "b"]).first_chunk_delay(Duration::from_secs(30)));
    let c = c.then(Step::stream(["x", "y"]));
    let svc = chain(&p, &c, &f)
        .first_chunk_timeout(Duration::from_secs(5))
        .layer(p.clone());
    let resp = svc.oneshot(stream_req()).await.unwrap();
    let err = resp.meta.attempts[0].error.clone().unwrap();
    assert_eq!(err.kind, ErrorKind::Timeout);
    assert!(err.message.contains("first chunk"), "{}", err.message);
    let (text, e) = drain(resp).await;
    assert_eq!(text, "xy");
    assert!(e.is_none());
}

#[tokio::test(start_paused = true)]
async fn first_chunk_timeout_ignores_complete_requests() {
    let (p, c, f) = mocks();
    let p = p.then(Step::reply("slow but fine").with_latency(Duration::from_secs(30)));
    let svc = chain(&p, &c, &f)
        .first_chunk_timeout(Duration::from_secs(5))
        .layer(p.clone());
    let resp = svc.oneshot(req()).await.unwrap();
    assert_eq!(resp.meta.attempts.len(), 1);
    assert_eq!(drain(resp).await.0, "slow but fine");
}

#[tokio::test(start_paused = true)]
async fn hang_before_first_chunk_times_out() {
    let (p, c, f) = mocks();
    let p = p.then(Step::hang());
    let svc = chain(&p, &c, &f)
        .timeout(Duration::from_secs(3))
        .layer(p.clone());
    let resp = svc.oneshot(stream_req()).await.unwrap();
    assert_eq!(
        resp.meta.attempts[0].error.as_ref().unwrap().kind,
        ErrorKind::Timeout
    );
    assert_eq!(drain(resp).await.0, "ok");
}

#[tokio::test(start_paused = true)]
async fn stall_after_commit_ends_with_error_item() {
    let (p, c, f) = mocks();
    let p = p.then(Step::stream(["a", "b", "c"]).chunk_delay(Duration::from_secs(60)));
    let svc = chain(&p, &c, &f)
        .stall_timeout(Duration::from_secs(5))
        .layer(p.clone());
    let resp = svc.oneshot(stream_req()).await.unwrap();
    assert_eq!(resp.meta.attempts.len(), 1);
    let (text, e) = drain(resp).await;
    assert_eq!(text, "a");
    let e = e.expect("a stall must end with an error item");
    assert_eq!(e.kind(), ErrorKind::Timeout);
    assert!(e.message().contains("stalled"));
    assert_eq!(c.calls(), 0, "no fallback after the commit point");
}

#[tokio::test(start_paused = true)]
async fn stream_failing_before_first_chunk_falls_back() {
    let (p, c, f) = mocks();
    let p = p.then(Step::stream(["a", "b"]).fail_after(0, LlmError::transport("reset")));
    let c = c.then(Step::stream(["x", "y"]));
    let svc = chain(&p, &c, &f).layer(p.clone());
    let resp = svc.oneshot(stream_req()).await.unwrap();
    assert_eq!(
        resp.meta.attempts[0].error.as_ref().unwrap().kind,
        ErrorKind::Transport
    );
    let (text, e) = drain(resp).await;
    assert_eq!(text, "xy");
    assert!(e.is_none());
}

#[tokio::test(start_paused = true)]
async fn stream_failing_after_first_chunk_ends_with_error_item() {
    let (p, c, f) = mocks();
    let p = p.then(Step::stream(["a", "b", "c"]).fail_after(1, LlmError::transport("reset")));
    let svc = chain(&p, &c, &f).layer(p.clone());
    let resp = svc.oneshot(stream_req()).await.unwrap();
    let (text, e) = drain(resp).await;
    assert_eq!(text, "a");
    let e = e.expect("an upstream failure after the commit point is an error item");
    assert_eq!(e.kind(), ErrorKind::Transport);
    assert_eq!(c.calls(), 0);
}

#[tokio::test(start_paused = true)]
async fn stream_ending_without_finish_is_not_success() {
    let (p, c, f) = mocks();
    let p = p.then(Step::stream(["a", "b"]).without_finish());
    let svc = chain(&p, &c, &f).layer(p.clone());
    let resp = svc.oneshot(stream_req()).await.unwrap();
    let (text, e) = drain(resp).await;
    assert_eq!(text, "ab");
    assert_eq!(
        e.expect("an abrupt end is an error").kind(),
        ErrorKind::Transport
    );

    // Opt-out for upstreams that never send a finish reason.
    let (p, c, f) = mocks();
    let p = p.then(Step::stream(["a", "b"]).without_finish());
    let svc = chain(&p, &c, &f)
        .require_finish_reason(false)
        .layer(p.clone());
    let (_, e) = drain(svc.oneshot(stream_req()).await.unwrap()).await;
    assert!(e.is_none());
}

#[tokio::test(start_paused = true)]
async fn cooldown_opens_skips_and_probes() {
    let (p, c, f) = mocks();
    let p = p.otherwise(Step::error(LlmError::unavailable("down")));
    let layer = chain(&p, &c, &f).cooldown(Cooldown::new(
        2,
        Duration::from_secs(60),
        Duration::from_secs(30),
    ));
    let health = layer.health();
    let svc = layer.layer(p.clone());

    for _ in 0..2 {
        svc.clone().oneshot(req()).await.unwrap();
    }
    assert_eq!(p.calls(), 2);
    let h = &health.snapshot()[0];
    assert!(matches!(h.state, CircuitState::Open { .. }), "{h:?}");
    assert_eq!(h.opened, 1);

    // Open: skipped without a call, and the attempt says so.
    let resp = svc.clone().oneshot(req()).await.unwrap();
    assert_eq!(p.calls(), 2);
    let a0 = resp.meta.attempts[0].error.clone().unwrap();
    assert!(a0.skipped);
    assert_eq!(resp.meta.attempt_count(), 1);
    assert_eq!(health.snapshot()[0].skipped, 1);

    // After the cooldown: one probe, which fails and reopens.
    tokio::time::advance(Duration::from_secs(31)).await;
    assert!(matches!(
        health.snapshot()[0].state,
        CircuitState::HalfOpen { probing: false }
    ));
    svc.clone().oneshot(req()).await.unwrap();
    assert_eq!(p.calls(), 3);
    assert!(matches!(
        health.snapshot()[0].state,
        CircuitState::Open { .. }
    ));
    svc.clone().oneshot(req()).await.unwrap();
    assert_eq!(p.calls(), 3);

    // Next probe succeeds and closes it.
    p.push(Step::reply("back"));
    tokio::time::advance(Duration::from_secs(31)).await;
    let resp = svc.clone().oneshot(req()).await.unwrap();
    assert_eq!(resp.meta.provider.as_deref(), Some("p"));
    assert_eq!(health.snapshot()[0].state, CircuitState::Closed);
}

#[tokio::test(start_paused = true)]
async fn failures_outside_the_window_do_not_open() {
    let (p, c, f) = mocks();
    let p = p.otherwise(Step::error(LlmError::unavailable("down")));
    let layer = chain(&p, &c, &f).cooldown(Cooldown::new(
        2,
        Duration::from_secs(10),
        Duration::from_secs(30),
    ));
    let health = layer.health();
    let svc = layer.layer(p.clone());
    svc.clone().oneshot(req()).await.unwrap();
    tokio::time::advance(Duration::from_secs(11)).await;
    svc.clone().oneshot(req()).await.unwrap();
    assert_eq!(health.snapshot()[0].state, CircuitState::Closed);
    // The first failure has left the window.
    assert_eq!(health.snapshot()[0].recent_failures, 1);
    assert_eq!(health.snapshot()[0].recent_calls, 1);
}

#[tokio::test(start_paused = true)]
async fn only_one_probe_at_a_time_and_a_dropped_probe_is_released() {
    let (p, c, f) = mocks();
    let p = p
        .then(Step::error(LlmError::unavailable("down")))
        .then(Step::reply("slow probe").with_latency(Duration::from_secs(100)));
    let layer = chain(&p, &c, &f).cooldown(Cooldown::new(
        1,
        Duration::from_secs(60),
        Duration::from_secs(5),
    ));
    let health = layer.health();
    let mut svc = layer.layer(p.clone());
    svc.clone().oneshot(req()).await.unwrap();
    tokio::time::advance(Duration::from_secs(6)).await;

    let mut probe = Box::pin(svc.ready().await.unwrap().call(req()));
    assert!(futures_util::FutureExt::now_or_never(probe.as_mut()).is_none());
    assert_eq!(
        health.snapshot()[0].state,
        CircuitState::HalfOpen { probing: true }
    );
    // Another request meanwhile skips the target.
    let resp = svc.clone().oneshot(req()).await.unwrap();
    assert!(resp.meta.attempts[0].error.as_ref().unwrap().skipped);
    assert_eq!(p.calls(), 2);

    drop(probe);
    assert_eq!(
        health.snapshot()[0].state,
        CircuitState::HalfOpen { probing: false }
    );
    let resp = svc.oneshot(req()).await.unwrap();
    assert_eq!(p.calls(), 3, "a new probe goes out");
    assert_eq!(resp.meta.provider.as_deref(), Some("p"));
}

#[tokio::test(start_paused = true)]
async fn retry_after_skips_until_then() {
    let (p, c, f) = mocks();
    let p = p.then(Step::error(
        LlmError::rate_limited("429").with_retry_after(Duration::from_secs(20)),
    ));
    let svc = chain(&p, &c, &f).layer(p.clone());
    svc.clone().oneshot(req()).await.unwrap();
    let resp = svc.clone().oneshot(req()).await.unwrap();
    assert!(resp.meta.attempts[0].error.as_ref().unwrap().skipped);
    assert_eq!(p.calls(), 1);
    tokio::time::advance(Duration::from_secs(21)).await;
    let resp = svc.oneshot(req()).await.unwrap();
    assert_eq!(p.calls(), 2);
    assert_eq!(resp.meta.provider.as_deref(), Some("p"));
}

#[tokio::test(start_paused = true)]
async fn everything_cooling_down_fails_fast_with_retry_after() {
    let p = MockLlm::new("p").otherwise(Step::error(LlmError::unavailable("down")));
    let svc = Fallback::new(vec![FallbackTarget::new("only", p.clone())]).cooldown(Cooldown::new(
        1,
        Duration::from_secs(60),
        Duration::from_secs(30),
    ));
    let e = svc.clone().oneshot(req()).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Unavailable);
    let e = svc.clone().oneshot(req()).await.unwrap_err();
    assert_eq!(p.calls(), 1);
    assert!(
        e.retry_after()
            .is_some_and(|d| d <= Duration::from_secs(30))
    );
    assert!(e.message().contains("cooling down"), "{e}");
    assert_eq!(svc.health().snapshot().len(), 1);
}

#[tokio::test(start_paused = true)]
async fn deadline_skips_targets_and_caps_attempts() {
    let (p, c, f) = mocks();
    let p = p.then(Step::reply("late").with_latency(Duration::from_secs(60)));
    let svc = chain(&p, &c, &f).layer(p.clone());
    let mut r = req();
    r.set_deadline(Deadline::after(Duration::from_secs(2)));
    let e = svc.oneshot(r).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Timeout);
    assert_eq!(e.attempts().len(), 3);
    assert_eq!(c.calls() + f.calls(), 0, "no time left for the others");
}

#[tokio::test(start_paused = true)]
async fn clones_share_breaker_state() {
    let (p, c, f) = mocks();
    let p = p.otherwise(Step::error(LlmError::unavailable("down")));
    let layer = chain(&p, &c, &f).cooldown(Cooldown::new(
        2,
        Duration::from_secs(60),
        Duration::from_secs(30),
    ));
    let a = layer.layer(p.clone());
    let b = layer.clone().layer(p.clone());
    a.oneshot(req()).await.unwrap();
    b.clone().oneshot(req()).await.unwrap();
    let resp = b.oneshot(req()).await.unwrap();
    assert!(resp.meta.attempts[0].error.as_ref().unwrap().skipped);
}

#[tokio::test(start_paused = true)]
async fn empty_chain_is_unavailable() {
    let e = Fallback::new(vec![]).oneshot(req()).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Unavailable);
}

#[tokio::test(start_paused = true)]
async fn a_callers_deadline_is_no_mark_against_the_target() {
    let p = MockLlm::new("p").otherwise(Step::reply("slow").with_latency(Duration::from_secs(60)));
    let layer = FallbackLayer::new(vec![]).cooldown(Cooldown::new(
        1,
        Duration::from_secs(60),
        Duration::from_secs(30),
    ));
    let health = layer.health();
    let svc = layer.layer(p.clone());
    let mut r = req();
    r.set_deadline(Deadline::after(Duration::from_secs(1)));
    assert_eq!(svc.oneshot(r).await.unwrap_err().kind(), ErrorKind::Timeout);
    assert_eq!(health.snapshot()[0].state, CircuitState::Closed);
    assert_eq!(health.snapshot()[0].failures, 0);
}

/// A provider failing 4 calls in 5 (successes in between): the ratio opens the breaker,
/// later requests go straight to the healthy step, and a probe closes it once it recovers.
#[tokio::test(start_paused = true)]
async fn a_mostly_failing_provider_opens_on_its_failure_ratio() {
    let (p, c, f) = mocks();
    for i in 0..10 {
        p.push(if i % 5 == 2 {
            Step::reply("lucky")
        } else {
            Step::error(LlmError::unavailable("flaky"))
        });
    }
    let p = p.otherwise(Step::reply("recovered"));
    let layer = chain(&p, &c, &f).cooldown(
        Cooldown::new(10, Duration::from_secs(60), Duration::from_secs(30)).failure_ratio(0.5),
    );
    let health = layer.health();
    let svc = layer.layer(p.clone());

    // Below the minimum number of calls nothing opens, even at 80 % failures.
    for _ in 0..9 {
        svc.clone().oneshot(req()).await.unwrap();
        tokio::time::advance(Duration::from_secs(1)).await;
    }
    assert_eq!(health.snapshot()[0].state, CircuitState::Closed);
    assert_eq!(health.snapshot()[0].recent_calls, 9);
    // The tenth call (a failure: 8 of 10) opens it.
    svc.clone().oneshot(req()).await.unwrap();
    let h = health.snapshot()[0].clone();
    assert!(matches!(h.state, CircuitState::Open { .. }), "{h:?}");
    assert_eq!((h.opened, h.failures, h.successes), (1, 8, 2));
    assert_eq!(p.calls(), 10);

    // Open: requests skip straight to the healthy step, without paying for a failure.
    for _ in 0..5 {
        let resp = svc.clone().oneshot(req()).await.unwrap();
        assert!(resp.meta.attempts[0].error.as_ref().unwrap().skipped);
        assert_eq!(resp.meta.provider.as_deref(), Some("c"));
    }
    assert_eq!(p.calls(), 10);
    assert_eq!(health.snapshot()[0].skipped, 5);

    // The provider has recovered: after the cooldown one probe goes out and closes it.
    tokio::time::advance(Duration::from_secs(31)).await;
    let resp = svc.clone().oneshot(req()).await.unwrap();
    assert_eq!(p.calls(), 11);
    assert_eq!(resp.meta.provider.as_deref(), Some("p"));
    assert_eq!(health.snapshot()[0].state, CircuitState::Closed);
    let resp = svc.oneshot(req()).await.unwrap();
    assert_eq!(resp.meta.provider.as_deref(), Some("p"));
    assert_eq!(p.calls(), 12);
}

/// Mostly healthy with occasional failures: the ratio stays under the threshold, so the
/// breaker stays closed however many failures add up over time.
#[tokio::test(start_paused = true)]
async fn occasional_failures_below_the_ratio_never_open() {
    let (p, c, f) = mocks();
    for i in 0..100 {
        p.push(if i % 4 == 0 {
            Step::error(LlmError::unavailable("blip"))
        } else {
            Step::reply("fine")
        });
    }
    let layer = chain(&p, &c, &f).cooldown(
        Cooldown::new(5, Duration::from_secs(10), Duration::from_secs(30)).failure_ratio(0.5),
    );
    let health = layer.health();
    let svc = layer.layer(p.clone());
    for _ in 0..100 {
        svc.clone().oneshot(req()).await.unwrap();
        tokio::time::advance(Duration::from_millis(300)).await;
    }
    let h = health.snapshot()[0].clone();
    assert_eq!(h.state, CircuitState::Closed, "{h:?}");
    assert_eq!((h.opened, h.failures), (0, 25));
    assert_eq!(p.calls(), 100);
}

/// A retry-after of days (or `u64::MAX` seconds) benches the target for `max_cooldown` only,
/// and never overflows the clock.
#[tokio::test(start_paused = true)]
async fn a_huge_retry_after_is_capped_by_max_cooldown() {
    for ra in [Duration::from_secs(86_400 * 30), Duration::MAX] {
        let (p, c, f) = mocks();
        let p = p.then(Step::error(
            LlmError::rate_limited("429").with_retry_after(ra),
        ));
        let layer = chain(&p, &c, &f).max_cooldown(Duration::from_secs(120));
        let health = layer.health();
        let svc = layer.layer(p.clone());
        svc.clone().oneshot(req()).await.unwrap();
        match health.snapshot()[0].state {
            CircuitState::Open { remaining } => assert!(remaining <= Duration::from_secs(120)),
            other => panic!("expected open, got {other:?}"),
        }
        let resp = svc.clone().oneshot(req()).await.unwrap();
        let skipped = resp.meta.attempts[0].error.clone().unwrap();
        assert!(skipped.skipped);
        tokio::time::advance(Duration::from_secs(121)).await;
        let resp = svc.oneshot(req()).await.unwrap();
        assert_eq!(
            resp.meta.provider.as_deref(),
            Some("p"),
            "probed after the cap"
        );
        assert_eq!(p.calls(), 2);
    }
}

/// The default cap is a few minutes, and it also bounds a long configured cooldown.
#[tokio::test(start_paused = true)]
async fn the_default_cap_bounds_the_breaker_too() {
    let p = MockLlm::new("p").then(Step::error(LlmError::unavailable("down")));
    let svc = Fallback::new(vec![FallbackTarget::new("only", p.clone())]).cooldown(Cooldown::new(
        1,
        Duration::from_secs(60),
        Duration::from_secs(86_400),
    ));
    svc.clone().oneshot(req()).await.unwrap_err();
    match svc.health().snapshot()[0].state {
        CircuitState::Open { remaining } => {
            assert!(remaining <= llm_tower::fallback::DEFAULT_MAX_COOLDOWN);
        }
        other => panic!("expected open, got {other:?}"),
    }
    tokio::time::advance(llm_tower::fallback::DEFAULT_MAX_COOLDOWN + Duration::from_secs(1)).await;
    svc.clone().oneshot(req()).await.unwrap();
    assert_eq!(p.calls(), 2);
}

/// A probe hung on a target that never answers (no timeout configured) blocks other probes
/// only for one cooldown; a newer probe then decides.
#[tokio::test(start_paused = true)]
async fn a_hung_probe_does_not_block_probing_for_ever() {
    let p = MockLlm::new("p")
        .then(Step::error(LlmError::unavailable("down")))
        .then(Step::hang());
    let c = MockLlm::new("c");
    let layer = FallbackLayer::new(vec![FallbackTarget::new("cheap", c.clone())]).cooldown(
        Cooldown::new(1, Duration::from_secs(60), Duration::from_secs(5)),
    );
    let health = layer.health();
    let mut svc = layer.layer(p.clone());
    svc.clone().oneshot(req()).await.unwrap();
    tokio::time::advance(Duration::from_secs(6)).await;
    let mut hung = Box::pin(svc.ready().await.unwrap().call(req()));
    assert!(futures_util::FutureExt::now_or_never(hung.as_mut()).is_none());
    let resp = svc.clone().oneshot(req()).await.unwrap();
    assert!(resp.meta.attempts[0].error.as_ref().unwrap().skipped);
    tokio::time::advance(Duration::from_secs(6)).await;
    let resp = svc.oneshot(req()).await.unwrap();
    assert_eq!(
        resp.meta.provider.as_deref(),
        Some("p"),
        "a fresh probe went out"
    );
    assert_eq!(health.snapshot()[0].state, CircuitState::Closed);
    drop(hung);
    assert_eq!(health.snapshot()[0].state, CircuitState::Closed);
}
