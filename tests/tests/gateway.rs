//! The gateway in-process, bound to 127.0.0.1:0, in front of mock OpenAI/Anthropic HTTP
//! upstreams, driven by a real HTTP client.

use std::time::Duration;

use http::{Method, StatusCode};
use llm_tower_axum::ShutdownOutcome;
use llm_tower_e2e::{
    ACME_KEY, Client, GLOBEX_KEY, TestGateway, UPSTREAM_KEY, base_config, chat, next_frame,
    poll_until, sse_data, streamed_text,
};
use llm_tower_test::{MockUpstream, Scenario};
use serde_json::{Value, json};

struct Setup {
    openai: MockUpstream,
    anthropic: MockUpstream,
    gw: TestGateway,
    client: Client,
}

async fn setup(jobs: bool, extra: &str) -> Setup {
    let openai = MockUpstream::start().await;
    let anthropic = MockUpstream::start().await;
    let toml = base_config(&openai.base_url(), &anthropic.base_url(), jobs, extra);
    let gw = TestGateway::start(&toml).await;
    Setup {
        openai,
        anthropic,
        gw,
        client: Client::with_key(ACME_KEY),
    }
}

impl Setup {
    fn chat_url(&self) -> String {
        self.gw.url("/v1/chat/completions")
    }
}

#[tokio::test]
async fn non_streaming_call_goes_through_with_its_headers() {
    let s = setup(false, "").await;
    s.openai
        .push(Scenario::ok().text("Hello from upstream").usage(12, 4));
    let r = s
        .client
        .post(&s.chat_url(), &[], &chat("gpt-4o-mini", "Hi", false))
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    let v = r.json();
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["choices"][0]["message"]["content"], "Hello from upstream");
    assert_eq!(v["usage"]["prompt_tokens"], 12);
    assert_eq!(r.header("x-llm-provider"), "primary");
    assert_eq!(r.header("x-llm-model"), "gpt-4o-mini");
    assert_eq!(r.header("x-llm-cache"), "miss");
    assert_eq!(r.header("x-llm-attempts"), "1");
    // 12 × 150 + 4 × 600 nano-dollars = 4200 n$.
    assert_eq!(
        r.header("x-llm-cost-usd").parse::<f64>().unwrap(),
        0.0000042
    );
    assert!(!r.header("x-request-id").is_empty());
    assert!(
        r.header("server-timing").contains("gateway;dur="),
        "{}",
        r.header("server-timing")
    );

    // The upstream got the chain's model and the provider key, never the client's key.
    let up = s.openai.last_request().unwrap();
    assert_eq!(up.json().unwrap()["model"], "gpt-4o-mini");
    assert_eq!(
        up.header("authorization"),
        Some(format!("Bearer {UPSTREAM_KEY}").as_str())
    );
    assert_eq!(s.anthropic.request_count(), 0);
}

#[tokio::test]
async fn streaming_call_is_sse_ending_with_done() {
    let s = setup(false, "").await;
    s.openai.push(Scenario::ok().text("one two three four"));
    let r = s
        .client
        .post(&s.chat_url(), &[], &chat("gpt-4o-mini", "Count", true))
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(r.header("content-type"), "text/event-stream");
    assert_eq!(r.header("x-llm-provider"), "primary");
    let data = r.sse_data();
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"));
    assert_eq!(streamed_text(&data).trim(), "one two three four");

    // Asked for, the final usage chunk comes through before [DONE].
    s.openai.push(Scenario::ok().text("a b").usage(9, 2));
    let mut body = chat("gpt-4o-mini", "Usage please", true);
    body["stream_options"] = json!({"include_usage": true});
    let r = s.client.post(&s.chat_url(), &[], &body).await;
    let data = r.sse_data();
    let usage: Value = serde_json::from_str(&data[data.len() - 2]).unwrap();
    assert_eq!(usage["usage"]["prompt_tokens"], 9, "{data:?}");
    assert_eq!(usage["usage"]["completion_tokens"], 2, "{data:?}");
}

#[tokio::test]
async fn anthropic_provider_is_translated_both_ways_streaming_or_not() {
    let s = setup(false, "").await;
    s.anthropic.push(Scenario::ok().text("Bonjour from Claude"));
    s.anthropic
        .push(Scenario::ok().text("streamed from Claude"));
    let r = s
        .client
        .post(&s.chat_url(), &[], &chat("claude", "Hi", false))
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(
        r.json()["choices"][0]["message"]["content"],
        "Bonjour from Claude"
    );
    assert_eq!(r.header("x-llm-provider"), "backup");
    let up = s.anthropic.last_request().unwrap();
    assert!(up.path.ends_with("/v1/messages"), "{}", up.path);
    assert_eq!(up.header("x-api-key"), Some(UPSTREAM_KEY));

    let r = s
        .client
        .post(&s.chat_url(), &[], &chat("claude", "Hi again", true))
        .await;
    let data = r.sse_data();
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"));
    assert_eq!(streamed_text(&data).trim(), "streamed from Claude");
}

#[tokio::test]
async fn second_identical_call_is_a_cache_hit() {
    let s = setup(false, "").await;
    s.openai.push(Scenario::ok().text("cached words"));
    let first = s
        .client
        .post(&s.chat_url(), &[], &chat("gpt-4o-mini", "same", false))
        .await;
    let second = s
        .client
        .post(&s.chat_url(), &[], &chat("gpt-4o-mini", "same", false))
        .await;
    assert_eq!(first.header("x-llm-cache"), "miss");
    assert_eq!(second.header("x-llm-cache"), "hit");
    assert_eq!(
        second.json()["choices"][0]["message"]["content"],
        "cached words"
    );
    assert_eq!(second.header("x-llm-cost-usd").parse::<f64>().unwrap(), 0.0);
    assert_eq!(s.openai.request_count(), 1);

    // A hit replays as a stream to a streaming request.
    let streamed = s
        .client
        .post(&s.chat_url(), &[], &chat("gpt-4o-mini", "same", true))
        .await;
    assert_eq!(streamed.header("x-llm-cache"), "hit");
    assert_eq!(streamed_text(&streamed.sse_data()), "cached words");

    // Cache-Control: no-cache goes upstream again; another tenant never shares the entry.
    let bypass = s
        .client
        .post(
            &s.chat_url(),
            &[("cache-control", "no-cache")],
            &chat("gpt-4o-mini", "same", false),
        )
        .await;
    assert_eq!(bypass.header("x-llm-cache"), "bypass");
    let other = Client::with_key(GLOBEX_KEY)
        .post(&s.chat_url(), &[], &chat("gpt-4o-mini", "same", false))
        .await;
    assert_eq!(other.header("x-llm-cache"), "miss");
    assert_eq!(s.openai.request_count(), 3);
}

#[tokio::test]
async fn fallback_to_the_next_provider_is_visible_in_headers() {
    let s = setup(false, "").await;
    s.openai.push(Scenario::unavailable());
    s.anthropic
        .push(Scenario::ok().text("served by the backup"));
    let r = s
        .client
        .post(&s.chat_url(), &[], &chat("gpt-4o-mini", "Hi", false))
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(r.header("x-llm-provider"), "backup");
    assert_eq!(r.header("x-llm-model"), "claude-haiku-4-5");
    assert_eq!(r.header("x-llm-attempts"), "2");
    assert_eq!(
        r.json()["choices"][0]["message"]["content"],
        "served by the backup"
    );

    // Streams fall back too, before their first chunk.
    s.openai.push(Scenario::rate_limited(1));
    s.anthropic.push(Scenario::ok().text("streamed backup"));
    let r = s
        .client
        .post(&s.chat_url(), &[], &chat("gpt-4o-mini", "Hi stream", true))
        .await;
    assert_eq!(r.header("x-llm-provider"), "backup");
    assert_eq!(streamed_text(&r.sse_data()).trim(), "streamed backup");
}

#[tokio::test]
async fn a_stream_cut_mid_way_upstream_reaches_the_client_as_an_error_event() {
    let s = setup(false, "").await;
    s.openai.push(
        Scenario::ok()
            .text("alpha beta gamma delta epsilon")
            .drop_after_chunks(2),
    );
    let r = s
        .client
        .post(&s.chat_url(), &[], &chat("solo", "Cut me", true))
        .await;
    assert_eq!(r.status, StatusCode::OK);
    let data = r.sse_data();
    assert!(
        !data.iter().any(|d| d == "[DONE]"),
        "a cut stream must not look complete: {data:?}"
    );
    let last: Value = serde_json::from_str(data.last().unwrap()).unwrap();
    assert!(last["error"]["type"].is_string(), "{last}");
    assert!(streamed_text(&data).starts_with("alpha"), "{data:?}");

    // The same with an upstream `error` event in the SSE.
    s.openai.push(
        Scenario::ok()
            .text("one two three")
            .error_event_after_chunks(1),
    );
    let r = s
        .client
        .post(&s.chat_url(), &[], &chat("solo", "Cut me again", true))
        .await;
    let data = r.sse_data();
    assert!(!data.iter().any(|d| d == "[DONE]"), "{data:?}");
    assert!(data.last().unwrap().contains("\"error\""), "{data:?}");
}

/// Each upstream failure, on a one-step chain, maps to the status and OpenAI error type a
/// client expects.
#[tokio::test]
async fn every_upstream_error_maps_to_an_openai_error() {
    let cases: Vec<(Scenario, u16, &str)> = vec![
        (Scenario::rate_limited(7), 429, "rate_limit_error"),
        (Scenario::unavailable(), 503, "service_unavailable_error"),
        (Scenario::server_error(), 503, "service_unavailable_error"),
        (Scenario::overloaded(), 503, "overloaded_error"),
        (
            Scenario::context_length_exceeded(),
            400,
            "invalid_request_error",
        ),
        (Scenario::content_filter(), 400, "invalid_request_error"),
        (Scenario::unauthorized(), 401, "authentication_error"),
        (Scenario::status(400), 400, "invalid_request_error"),
        (Scenario::ok().malformed_json(), 502, "upstream_error"),
        (
            Scenario::ok().latency(Duration::from_secs(10)),
            504,
            "timeout_error",
        ),
    ];
    for (scenario, status, kind) in cases {
        // A fresh gateway per case: a failure opens the provider's cooldown.
        let s = setup(false, "").await;
        s.openai.push(scenario.clone());
        let r = s
            .client
            .post(&s.chat_url(), &[], &chat("solo", "Hi", false))
            .await;
        let v = r.json();
        assert_eq!(r.status.as_u16(), status, "{scenario:?}: {v}");
        assert_eq!(v["error"]["type"], kind, "{scenario:?}: {v}");
        assert!(v["error"]["message"].is_string());
        assert!(
            !r.text().contains(UPSTREAM_KEY),
            "the provider key leaked: {v}"
        );
        if status == 429 {
            assert_eq!(r.header("retry-after"), "7");
        }
        if scenario == Scenario::context_length_exceeded() {
            assert_eq!(v["error"]["code"], "context_length_exceeded");
        }
    }
}

#[tokio::test]
async fn gateway_side_errors_are_openai_errors_too() {
    let s = setup(false, "").await;
    let url = s.chat_url();

    // Auth: missing or wrong key.
    let r = Client::new()
        .post(&url, &[], &chat("gpt-4o-mini", "Hi", false))
        .await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    assert_eq!(r.json()["error"]["type"], "authentication_error");
    let r = Client::with_key("sk-wrong")
        .post(&url, &[], &chat("gpt-4o-mini", "Hi", false))
        .await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    assert!(!r.text().contains("sk-wrong"));

    // Malformed bodies.
    let r = s
        .client
        .send(Method::POST, &url, &[], Some("{not json".into()))
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert_eq!(r.json()["error"]["type"], "invalid_request_error");
    let r = s
        .client
        .post(&url, &[], &json!({"model": "gpt-4o-mini", "messages": []}))
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);

    // Body limit (64 KiB in this config).
    let big = chat("gpt-4o-mini", &"x".repeat(100_000), false);
    let r = s.client.post(&url, &[], &big).await;
    assert_eq!(r.status, StatusCode::PAYLOAD_TOO_LARGE);
    assert!(r.json()["error"]["message"].is_string());

    // Unknown path and wrong method.
    let r = s.client.get(&s.gw.url("/v1/nope")).await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    assert!(r.json()["error"].is_object());
    let r = s.client.get(&url).await;
    assert_eq!(r.status, StatusCode::METHOD_NOT_ALLOWED);

    // Nothing of that reached the upstream.
    assert_eq!(s.openai.request_count(), 0);

    // Health and metrics need no key.
    assert_eq!(
        Client::new().get(&s.gw.url("/healthz")).await.status,
        StatusCode::OK
    );
    let m = Client::new().get(&s.gw.url("/metrics")).await;
    assert_eq!(m.status, StatusCode::OK);
}

#[tokio::test]
async fn models_lists_aliases_and_real_models() {
    let s = setup(false, "").await;
    let r = s.client.get(&s.gw.url("/v1/models")).await;
    assert_eq!(r.status, StatusCode::OK);
    let ids: Vec<String> = r.json()["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap().to_owned())
        .collect();
    for want in ["solo", "claude", "gpt-4o-mini", "claude-haiku-4-5"] {
        assert!(ids.iter().any(|i| i == want), "{want} missing from {ids:?}");
    }
}

#[tokio::test]
async fn client_rate_limit_and_budget_answer_429() {
    let extra = r#"
[[rate_limits.rules]]
key = "tenant"
requests_per_minute = 2

[[budgets.limits]]
scope = "tenant"
only = "globex"
usd = 0.000001
per = "day"
"#;
    let s = setup(false, extra).await;
    let url = s.chat_url();
    for i in 0..2 {
        let r = s
            .client
            .post(&url, &[], &chat("gpt-4o-mini", &format!("q{i}"), false))
            .await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    }
    let r = s
        .client
        .post(&url, &[], &chat("gpt-4o-mini", "q3", false))
        .await;
    assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(r.json()["error"]["type"], "rate_limit_error");
    assert!(r.header("retry-after").parse::<u64>().unwrap() >= 1);

    // globex has a budget of one micro-dollar a day: the reservation alone exceeds it.
    let r = Client::with_key(GLOBEX_KEY)
        .post(&url, &[], &chat("gpt-4o-mini", "expensive", false))
        .await;
    assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS, "{}", r.text());
    assert_eq!(r.json()["error"]["type"], "insufficient_quota");
    assert_eq!(s.openai.request_count(), 2);
}

#[tokio::test]
async fn validator_retries_once_then_fails_with_invalid_output() {
    let extra = r#"
[validators.extract]
kind = "json_schema"
schema = { type = "object", required = ["name"] }
"#;
    let s = setup(false, extra).await;
    // Prose first, valid JSON after the reminder.
    s.openai.push(Scenario::ok().text("Sure! The name is Ada."));
    s.openai.push(Scenario::ok().text(r#"{"name": "Ada"}"#));
    let h = [("x-llm-task", "extract")];
    let r = s
        .client
        .post(&s.chat_url(), &h, &chat("solo", "Who?", false))
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(
        r.json()["choices"][0]["message"]["content"],
        r#"{"name": "Ada"}"#
    );
    let retry = s.openai.last_request().unwrap().json().unwrap();
    assert!(
        retry["messages"].to_string().contains("IMPORTANT"),
        "{retry}"
    );

    s.openai.push(Scenario::ok().text("nope"));
    s.openai.push(Scenario::ok().text("still nope"));
    let r = s
        .client
        .post(&s.chat_url(), &h, &chat("solo", "Who else?", false))
        .await;
    assert_eq!(r.status, StatusCode::BAD_GATEWAY);
    assert_eq!(r.json()["error"]["type"], "invalid_output_error");
}

#[tokio::test]
async fn jobs_submit_poll_succeed_and_stay_per_tenant() {
    let s = setup(true, "").await;
    s.openai.set_default(Scenario::ok().text("job answer"));
    let r = s
        .client
        .post(
            &s.gw.url("/v1/jobs"),
            &[("idempotency-key", "job-1")],
            &chat("gpt-4o-mini", "Long task", false),
        )
        .await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.text());
    let id = r.json()["id"].as_str().unwrap().to_owned();
    assert!(r.header("location").ends_with(&id));

    let url = s.gw.url(&format!("/v1/jobs/{id}"));
    let done = poll_until(500, || async {
        let v = s.client.get(&url).await.json();
        matches!(v["status"].as_str(), Some("succeeded" | "failed")).then_some(v)
    })
    .await
    .expect("the job finished");
    assert_eq!(done["status"], "succeeded", "{done}");
    assert_eq!(
        done["result"]["choices"][0]["message"]["content"],
        "job answer"
    );

    // Same idempotency key: same job, no second upstream call.
    let again = s
        .client
        .post(
            &s.gw.url("/v1/jobs"),
            &[("idempotency-key", "job-1")],
            &chat("gpt-4o-mini", "Long task", false),
        )
        .await;
    assert_eq!(again.json()["id"], id.as_str());
    assert_eq!(s.openai.request_count(), 1);

    // Another tenant cannot see it; no key, no access.
    assert_eq!(
        Client::with_key(GLOBEX_KEY).get(&url).await.status,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        Client::new().get(&url).await.status,
        StatusCode::UNAUTHORIZED
    );
}

#[tokio::test]
async fn graceful_shutdown_finishes_an_in_flight_stream() {
    let Setup {
        openai,
        mut gw,
        client,
        ..
    } = setup(false, "").await;
    let words: Vec<String> = (0..15).map(|i| format!("w{i}")).collect();
    openai.push(
        Scenario::ok()
            .text(words.join(" "))
            .chunk_delay(Duration::from_millis(40)),
    );
    let url = gw.url("/v1/chat/completions");
    let resp = client
        .start(
            Method::POST,
            &url,
            &[],
            Some(chat("gpt-4o-mini", "slow", true).to_string()),
        )
        .await;
    assert_eq!(resp.status(), StatusCode::OK);
    let mut body = resp.into_body();
    let mut text =
        String::from_utf8_lossy(&next_frame(&mut body).await.expect("first chunk")).into_owned();

    // SIGTERM equivalent while the stream is in flight: new connections are refused…
    gw.signal_shutdown();
    let addr = gw.addr;
    let refused = poll_until(250, || async {
        tokio::net::TcpStream::connect(addr)
            .await
            .is_err()
            .then_some(())
    })
    .await;
    assert!(
        refused.is_some(),
        "still accepting after the shutdown signal"
    );

    // …while the stream in flight runs to its end.
    while let Some(frame) = next_frame(&mut body).await {
        text.push_str(&String::from_utf8_lossy(&frame));
    }
    let data = sse_data(&text);
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"), "{text}");
    assert_eq!(streamed_text(&data).split_whitespace().count(), 15);
    drop(body);
    drop(client);
    assert_eq!(gw.shutdown().await, ShutdownOutcome::Graceful);
}
