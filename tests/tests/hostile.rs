//! The gateway in front of a hostile upstream (the mock's hostile modes) with a healthy
//! second step: the chain moves on, or the good answer goes through, never a 500.

use http::StatusCode;
use llm_tower_e2e::{ACME_KEY, Client, TestGateway, base_config, chat, streamed_text};
use llm_tower_test::{MockUpstream, Scenario};

struct Setup {
    openai: MockUpstream,
    anthropic: MockUpstream,
    _gw: TestGateway,
    url: String,
    client: Client,
}

async fn setup(extra: &str) -> Setup {
    let openai = MockUpstream::start().await;
    let anthropic = MockUpstream::start().await;
    let toml = base_config(&openai.base_url(), &anthropic.base_url(), false, extra);
    let gw = TestGateway::start(&toml).await;
    let url = gw.url("/v1/chat/completions");
    Setup {
        openai,
        anthropic,
        _gw: gw,
        url,
        client: Client::with_key(ACME_KEY),
    }
}

#[tokio::test]
async fn a_429_with_retry_after_1e20_falls_back_to_the_healthy_step() {
    let s = setup("").await;
    s.openai.set_default(Scenario::status(429).absurd_headers());
    s.anthropic.set_default(Scenario::ok().text("healthy"));
    for stream in [false, true] {
        let r = s
            .client
            .post(&s.url, &[], &chat("gpt-4o-mini", "Hi", stream))
            .await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text());
        assert_eq!(r.header("x-llm-provider"), "backup");
        if stream {
            assert_eq!(streamed_text(&r.sse_data()).trim(), "healthy");
        } else {
            assert_eq!(r.json()["choices"][0]["message"]["content"], "healthy");
        }
    }
    // The capped retry-after keeps the primary skipped: it was asked once.
    assert_eq!(s.openai.request_count(), 1);
}

#[tokio::test]
async fn nan_and_inf_rate_limit_headers_do_not_spoil_a_good_answer() {
    let s = setup("").await;
    s.openai
        .set_default(Scenario::ok().text("good").absurd_headers());
    for stream in [false, true] {
        let r = s
            .client
            .post(&s.url, &[], &chat("gpt-4o-mini", "Hi", stream))
            .await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text());
        assert_eq!(r.header("x-llm-provider"), "primary");
        if stream {
            assert_eq!(streamed_text(&r.sse_data()).trim(), "good");
        } else {
            assert_eq!(r.json()["choices"][0]["message"]["content"], "good");
        }
    }
    assert_eq!(s.anthropic.request_count(), 0);
}

#[tokio::test]
async fn absurd_resets_reach_the_provider_headroom_tracker_capped() {
    // The tracker turns a reset into `now + reset`: an uncapped `1e19` seconds overflows.
    let s = setup(
        "[providers.primary.rate_limit]\nmin_remaining_requests = 1\nmin_remaining_tokens = 1\n",
    )
    .await;
    s.openai
        .set_default(Scenario::ok().text("good").absurd_headers());
    for _ in 0..2 {
        let r = s
            .client
            .post(&s.url, &[], &chat("gpt-4o-mini", "Hi", false))
            .await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text());
        assert_eq!(r.header("x-llm-provider"), "primary");
    }
}

#[tokio::test]
async fn a_50_mb_answer_is_refused_and_the_chain_moves_on() {
    let s = setup("").await;
    s.openai.push(Scenario::ok().huge_body(50_000_000));
    s.anthropic.push(Scenario::ok().text("small"));
    let r = s
        .client
        .post(&s.url, &[], &chat("gpt-4o-mini", "Hi", false))
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(r.header("x-llm-provider"), "backup");
    assert_eq!(r.json()["choices"][0]["message"]["content"], "small");

    // The cap is the config's: `solo` has no second step, so the breach is the answer.
    let s = setup("[upstream]\nmax_body_bytes = 1024\n").await;
    s.openai.push(Scenario::ok().huge_body(4096));
    let r = s.client.post(&s.url, &[], &chat("solo", "Hi", false)).await;
    assert_eq!(r.status, StatusCode::BAD_GATEWAY, "{}", r.text());
    let body = r.json();
    assert_eq!(body["error"]["type"], "upstream_error");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("larger than the limit of 1024 bytes"),
        "{body}"
    );
}
