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
    assert_eq!(health.snapshot()[0].recent_failures, 2);
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
