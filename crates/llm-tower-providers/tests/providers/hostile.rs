//! Hostile upstreams (the mock's hostile modes, over real HTTP): no panic, a classified
//! error that lets a fallback chain move on (or the good answer, bad headers ignored and
//! counted), delays capped.

use std::time::Duration;

use llm_tower::fallback::{Fallback, FallbackTarget};
use llm_tower_core::{ChatRequest, Deadline, ErrorKind, LlmError, LlmResponse};
use llm_tower_providers::{
    AnthropicProvider, HttpClient, HttpClientConfig, MAX_UPSTREAM_DELAY, OpenAiProvider,
    ResponseLimits,
};
use llm_tower_test::{MockUpstream, Scenario};
use tower::ServiceExt;

use crate::{
    anthropic, anthropic_config, drain, openai, openai_config, request, text_of, upstream,
};

/// Both providers, each on its own mock whose default is `s`.
async fn both(s: Scenario) -> (MockUpstream, OpenAiProvider, AnthropicProvider) {
    let (up, client) = upstream().await;
    up.set_default(s);
    let (o, a) = (openai(&up, &client), anthropic(&up, &client));
    (up, o, a)
}

async fn call_both(
    o: &OpenAiProvider,
    a: &AnthropicProvider,
    req: ChatRequest,
) -> [Result<LlmResponse, LlmError>; 2] {
    [
        o.clone().oneshot(req.clone()).await,
        a.clone().oneshot(req).await,
    ]
}

/// An error a fallback chain moves on from, of `kind` (and `code`, if given).
fn assert_fallback_error(e: &LlmError, kind: ErrorKind, code: Option<&str>) {
    assert_eq!(e.kind(), kind, "{e:?}");
    assert!(e.should_fall_back(), "{e:?}");
    if let Some(c) = code {
        assert_eq!(e.code(), Some(c), "{e:?}");
    }
    assert!(e.provider().is_some(), "{e:?}");
    for key in [crate::OPENAI_KEY, crate::ANTHROPIC_KEY] {
        assert!(!format!("{e:?} {e}").contains(key));
    }
}

fn err(r: Result<LlmResponse, LlmError>) -> LlmError {
    match r {
        Ok(_) => panic!("expected an error"),
        Err(e) => e,
    }
}

#[tokio::test]
async fn retry_after_1e20_is_capped_at_one_day() {
    let (_up, o, a) = both(Scenario::status(429).absurd_headers()).await;
    for r in call_both(&o, &a, request(false)).await {
        let e = err(r);
        assert_fallback_error(&e, ErrorKind::RateLimited, None);
        assert_eq!(e.retry_after(), Some(MAX_UPSTREAM_DELAY));
    }
}

#[tokio::test]
async fn absurd_rate_limit_headers_on_a_good_answer_are_ignored_and_counted() {
    let (_up, o, a) = both(Scenario::ok().text("fine answer").absurd_headers()).await;
    for stream in [false, true] {
        let [ro, ra] = call_both(&o, &a, request(stream)).await;
        for r in [ro, ra] {
            let resp = r.expect("a good answer despite the headers");
            let h = resp.meta.headroom.expect("the readable values are kept");
            assert_eq!(h.remaining_requests, None, "NaN is ignored");
            assert_eq!(h.limit_requests, None, "-1 is ignored");
            assert_eq!(h.remaining_tokens, Some(u64::MAX), "23 digits saturate");
            assert_eq!(h.reset_tokens, Some(MAX_UPSTREAM_DELAY), "1e19 s is capped");
            assert!(h.reset_requests.is_none_or(|d| d <= MAX_UPSTREAM_DELAY));
            assert!(h.reset_tokens.is_none_or(|d| d <= MAX_UPSTREAM_DELAY));
            if stream {
                let (chunks, e) = drain(resp).await;
                assert!(e.is_none(), "{e:?}");
                assert_eq!(text_of(&chunks), "fine answer");
            } else {
                assert_eq!(resp.into_complete().await.unwrap().text(), "fine answer");
            }
        }
    }
    // Two answers each, several bad values each.
    assert!(o.malformed_headers() >= 8, "{}", o.malformed_headers());
    assert!(a.malformed_headers() >= 8, "{}", a.malformed_headers());
}

#[tokio::test]
async fn a_header_value_past_the_head_limit_is_a_transport_error() {
    let (_up, o, a) = both(Scenario::ok().big_header(200 * 1024)).await;
    for r in call_both(&o, &a, request(false)).await {
        assert_fallback_error(
            &err(r),
            ErrorKind::Transport,
            Some("upstream_head_too_large"),
        );
    }
    // A client that allows it reads the answer.
    let up = MockUpstream::start().await;
    up.set_default(Scenario::ok().text("big").big_header(200 * 1024));
    let client = HttpClient::new(HttpClientConfig {
        max_response_header_bytes: 1024 * 1024,
        ..HttpClientConfig::default()
    })
    .unwrap();
    let resp = openai(&up, &client).oneshot(request(false)).await.unwrap();
    assert_eq!(resp.into_complete().await.unwrap().text(), "big");
}

#[tokio::test]
async fn hundreds_of_headers_are_a_transport_error() {
    let (_up, o, a) = both(Scenario::ok().extra_headers(300)).await;
    for r in call_both(&o, &a, request(true)).await {
        assert_fallback_error(
            &err(r),
            ErrorKind::Transport,
            Some("upstream_head_too_large"),
        );
    }
    let up = MockUpstream::start().await;
    up.set_default(Scenario::ok().text("many").extra_headers(300));
    let client = HttpClient::new(HttpClientConfig {
        max_response_headers: 400,
        ..HttpClientConfig::default()
    })
    .unwrap();
    let resp = anthropic(&up, &client)
        .oneshot(request(false))
        .await
        .unwrap();
    assert_eq!(resp.into_complete().await.unwrap().text(), "many");
}

#[tokio::test]
async fn a_50_mb_body_hits_the_default_size_cap() {
    let (_up, o, a) = both(Scenario::ok().huge_body(50_000_000)).await;
    for r in call_both(&o, &a, request(false)).await {
        let e = err(r);
        assert_fallback_error(
            &e,
            ErrorKind::Transport,
            Some("upstream_response_too_large"),
        );
        assert!(e.message().contains("16777216"), "{e}");
    }
}

#[tokio::test]
async fn a_body_under_the_cap_is_the_answer_and_the_cap_is_configurable() {
    let (up, client) = upstream().await;
    up.set_default(Scenario::ok().text("padded").huge_body(512 * 1024));
    let small = ResponseLimits::default().max_body_bytes(256 * 1024);
    let roomy = OpenAiProvider::new(openai_config(&up), &client).unwrap();
    let tight = OpenAiProvider::new(openai_config(&up).limits(small), &client).unwrap();
    let resp = roomy.oneshot(request(false)).await.unwrap();
    assert_eq!(resp.into_complete().await.unwrap().text(), "padded");
    let e = err(tight.oneshot(request(false)).await);
    assert_fallback_error(
        &e,
        ErrorKind::Transport,
        Some("upstream_response_too_large"),
    );
}

#[tokio::test]
async fn a_body_that_never_ends_hits_the_size_cap() {
    let (up, client) = upstream().await;
    up.set_default(Scenario::ok().endless_body());
    let limits = ResponseLimits::default().max_body_bytes(1024 * 1024);
    let o = OpenAiProvider::new(openai_config(&up).limits(limits), &client).unwrap();
    let a = AnthropicProvider::new(anthropic_config(&up).limits(limits), &client).unwrap();
    for r in call_both(&o, &a, request(false)).await {
        assert_fallback_error(
            &err(r),
            ErrorKind::Transport,
            Some("upstream_response_too_large"),
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_endless_bodies_share_one_buffer_budget() {
    let up = MockUpstream::start().await;
    up.set_default(Scenario::ok().endless_body());
    // Each answer may take 4 MiB, but all of them together only 1 MiB.
    let client = HttpClient::new(HttpClientConfig {
        max_buffered_bytes: 1024 * 1024,
        ..HttpClientConfig::default()
    })
    .unwrap();
    let limits = ResponseLimits::default().max_body_bytes(4 * 1024 * 1024);
    let o = OpenAiProvider::new(openai_config(&up).limits(limits), &client).unwrap();
    let calls = (0..16).map(|_| o.clone().oneshot(request(false)));
    for r in futures_util::future::join_all(calls).await {
        assert_fallback_error(&err(r), ErrorKind::Transport, Some("upstream_buffers_full"));
    }
    assert!(client.buffer_refusals() >= 16);
    // Every refused or finished read gave its bytes back.
    assert_eq!(client.buffered_bytes(), 0);
    // An ordinary answer still fits afterwards.
    up.set_default(Scenario::ok().text("fits"));
    let resp = o.oneshot(request(false)).await.unwrap();
    assert_eq!(resp.into_complete().await.unwrap().text(), "fits");
}

#[tokio::test]
async fn a_slow_body_that_never_ends_hits_the_response_timeout() {
    let (up, client) = upstream().await;
    up.set_default(
        Scenario::ok()
            .endless_body()
            .chunk_delay(Duration::from_millis(20)),
    );
    let limits = ResponseLimits::default().response_timeout(Duration::from_millis(300));
    let o = OpenAiProvider::new(openai_config(&up).limits(limits), &client).unwrap();
    let a = AnthropicProvider::new(anthropic_config(&up).limits(limits), &client).unwrap();
    for r in call_both(&o, &a, request(false)).await {
        assert_fallback_error(&err(r), ErrorKind::Timeout, Some("upstream_timeout"));
    }
}

#[tokio::test]
async fn an_oversized_stream_event_is_a_transport_error() {
    let (_up, o, a) = both(Scenario::ok().huge_body(2 * 1024 * 1024)).await;
    for r in call_both(&o, &a, request(true)).await {
        let (_, e) = drain(r.unwrap()).await;
        let e = e.expect("the stream ends with an error");
        assert_fallback_error(&e, ErrorKind::Transport, Some("upstream_event_too_large"));
        assert!(e.message().contains("1048576"), "{e}");
    }
    // Under the limit, the (comment) event is skipped and the answer is whole.
    let (_up, o, a) = both(Scenario::ok().text("a b c").huge_body(100 * 1024)).await;
    for r in call_both(&o, &a, request(true)).await {
        let (chunks, e) = drain(r.unwrap()).await;
        assert!(e.is_none(), "{e:?}");
        assert_eq!(text_of(&chunks), "a b c");
    }
}

#[tokio::test]
async fn json_100k_levels_deep_is_malformed_not_a_stack_overflow() {
    let (_up, o, a) = both(Scenario::ok().deep_json(100_000)).await;
    for r in call_both(&o, &a, request(false)).await {
        assert_fallback_error(&err(r), ErrorKind::Transport, None);
    }
    for r in call_both(&o, &a, request(true)).await {
        let (_, e) = drain(r.unwrap()).await;
        assert_fallback_error(&e.expect("an error"), ErrorKind::Transport, None);
    }
}

#[tokio::test]
async fn connection_closed_before_the_head_is_a_transport_error() {
    let (_up, o, a) = both(Scenario::ok().reset_before_head()).await;
    for stream in [false, true] {
        for r in call_both(&o, &a, request(stream)).await {
            assert_fallback_error(&err(r), ErrorKind::Transport, None);
        }
    }
}

#[tokio::test]
async fn connection_aborted_after_the_head_is_a_transport_error() {
    let (_up, o, a) = both(Scenario::ok().reset_after_head()).await;
    for r in call_both(&o, &a, request(false)).await {
        assert_fallback_error(&err(r), ErrorKind::Transport, None);
    }
    for r in call_both(&o, &a, request(true)).await {
        let e = match r {
            Ok(resp) => drain(resp).await.1.expect("the stream ends with an error"),
            Err(e) => e,
        };
        assert_fallback_error(&e, ErrorKind::Transport, None);
    }
}

#[tokio::test]
async fn a_dripping_head_hits_the_response_timeout_or_the_deadline() {
    let (up, client) = upstream().await;
    up.set_default(Scenario::ok().header_drip(Duration::from_millis(20)));
    let limits = ResponseLimits::default().response_timeout(Duration::from_millis(300));
    let o = OpenAiProvider::new(openai_config(&up).limits(limits), &client).unwrap();
    let a = AnthropicProvider::new(anthropic_config(&up).limits(limits), &client).unwrap();
    for r in call_both(&o, &a, request(true)).await {
        let e = err(r);
        assert_fallback_error(&e, ErrorKind::Timeout, Some("upstream_timeout"));
        assert!(e.message().contains("no response headers"), "{e}");
    }
    // Without the provider's own timeout, the request's deadline bounds it.
    let o = OpenAiProvider::new(
        openai_config(&up).limits(ResponseLimits::default().response_timeout(Duration::ZERO)),
        &client,
    )
    .unwrap();
    let mut req = request(false);
    req.extensions.insert(Deadline(
        tokio::time::Instant::now() + Duration::from_millis(300),
    ));
    let e = err(o.oneshot(req).await);
    assert_fallback_error(&e, ErrorKind::Timeout, None);
}

#[tokio::test]
async fn a_dripping_head_that_completes_is_a_good_answer() {
    let (up, client) = upstream().await;
    // A short head through a 1 ms drip: slow, but it arrives.
    up.set_default(
        Scenario::ok()
            .text("dripped")
            .header_drip(Duration::from_millis(1)),
    );
    let resp = openai(&up, &client).oneshot(request(false)).await.unwrap();
    assert_eq!(resp.into_complete().await.unwrap().text(), "dripped");
}

#[tokio::test]
async fn a_stream_that_never_ends_is_cut_by_the_fallback_stall_timeout() {
    let (up, client) = upstream().await;
    up.set_default(Scenario::ok().endless_body());
    let chain = Fallback::new(vec![FallbackTarget::new("endless", openai(&up, &client))])
        .stall_timeout(Duration::from_millis(300));
    let (chunks, e) = drain(chain.oneshot(request(true)).await.unwrap()).await;
    assert!(chunks.len() <= 1, "only the role chunk: {chunks:?}");
    assert_eq!(e.expect("the stall ends it").kind(), ErrorKind::Timeout);
}

/// The observed failures, end to end: a hostile first step, a healthy second step.
#[tokio::test]
async fn a_fallback_chain_moves_past_every_hostile_answer() {
    let healthy = MockUpstream::start().await;
    healthy.set_default(Scenario::ok().text("from the healthy step"));
    let client = HttpClient::with_defaults().unwrap();
    let limits = ResponseLimits::default()
        .max_body_bytes(1024 * 1024)
        .response_timeout(Duration::from_secs(2));
    let hostile = [
        Scenario::status(429).absurd_headers(),
        Scenario::ok().huge_body(50_000_000),
        Scenario::ok().endless_body(),
        Scenario::ok().deep_json(100_000),
        Scenario::ok().reset_before_head(),
        Scenario::ok().reset_after_head(),
        Scenario::ok().extra_headers(300),
    ];
    for s in hostile {
        let bad = MockUpstream::start().await;
        bad.set_default(s.clone());
        let first = OpenAiProvider::new(openai_config(&bad).limits(limits), &client).unwrap();
        let second = anthropic(&healthy, &client);
        let chain = Fallback::new(vec![
            FallbackTarget::new("hostile", first),
            FallbackTarget::new("healthy", second),
        ]);
        let resp = chain
            .oneshot(request(false))
            .await
            .unwrap_or_else(|e| panic!("{s:?}: {e:?}"));
        assert_eq!(
            resp.into_complete().await.unwrap().text(),
            "from the healthy step",
            "{s:?}"
        );
        assert_eq!(bad.request_count(), 1, "{s:?}");
    }
}
