use std::sync::{Arc, Mutex};
use std::time::Duration;

use llm_tower_core::{ChatRequest, Deadline, ErrorKind, LlmError, Message, Outcome, ResponseBody};
use llm_tower_providers::{OpenAiConfig, OpenAiProvider};
use llm_tower_test::Scenario;
use serde_json::json;
use tower::ServiceExt;

use crate::{OPENAI_KEY, drain, openai, openai_config, request, text_of, upstream};

#[tokio::test]
async fn complete_response_with_meta() {
    let (up, client) = upstream().await;
    up.push(
        Scenario::ok()
            .text("Hello there")
            .usage(12, 3)
            .cached_tokens(8)
            .ratelimit_remaining(42, 9000),
    );
    let resp = openai(&up, &client).oneshot(request(false)).await.unwrap();
    assert_eq!(resp.meta.provider.as_deref(), Some("openai"));
    assert_eq!(resp.meta.model.as_deref(), Some("test-model"));
    let usage = resp.meta.usage.clone().unwrap();
    assert_eq!(
        (
            usage.prompt_tokens,
            usage.completion_tokens,
            usage.cached_tokens()
        ),
        (12, 3, 8)
    );
    let h = resp.meta.headroom.unwrap();
    assert_eq!(h.remaining_requests, Some(42));
    assert_eq!(h.remaining_tokens, Some(9000));
    assert_eq!(h.reset_tokens, Some(Duration::from_secs(360)));
    assert!(resp.meta.upstream_time.is_some());
    assert_eq!(resp.into_complete().await.unwrap().text(), "Hello there");
}

#[tokio::test]
async fn request_body_is_the_callers_with_unknown_fields() {
    let (up, client) = upstream().await;
    let cfg = openai_config(&up)
        .model("fast", "gpt-4o-mini")
        .header("x-team", "search")
        .name("openrouter");
    let p = OpenAiProvider::new(cfg, &client).unwrap();
    let mut req = ChatRequest::from_slice(
        br#"{"model":"fast","messages":[{"role":"user","content":"Hi"}],
             "temperature":1,"logit_bias":{"50256":-100},"future_field":{"nested":[1,2]},
             "stream":true,"stream_options":{"other":true}}"#,
    )
    .unwrap();
    req.set_task_type("greet"); // extensions never reach the wire
    let resp = p.oneshot(req).await.unwrap();
    assert_eq!(resp.meta.provider.as_deref(), Some("openrouter"));
    let (chunks, err) = drain(resp).await;
    assert!(err.is_none(), "{err:?}");
    assert!(
        chunks.last().unwrap().usage().is_some(),
        "stream ends with usage"
    );

    let rec = up.last_request().unwrap();
    assert_eq!(rec.path, "/v1/chat/completions");
    assert_eq!(
        rec.header("authorization"),
        Some(&*format!("Bearer {OPENAI_KEY}"))
    );
    assert_eq!(rec.header("x-team"), Some("search"));
    assert_eq!(rec.header("accept"), Some("text/event-stream"));
    let body = rec.json().unwrap();
    assert_eq!(body["model"], "gpt-4o-mini");
    assert_eq!(body["temperature"], 1);
    assert_eq!(body["logit_bias"], json!({"50256": -100}));
    assert_eq!(body["future_field"], json!({"nested": [1, 2]}));
    assert_eq!(
        body["stream_options"],
        json!({"other": true, "include_usage": true})
    );
    assert!(body.get("extensions").is_none());
}

#[tokio::test]
async fn stream_chunks_usage_and_completion_hook() {
    let (up, client) = upstream().await;
    up.push(Scenario::ok().text("one two three four").usage(20, 4));
    let mut resp = openai(&up, &client).oneshot(request(true)).await.unwrap();
    assert!(resp.is_stream());
    assert!(resp.meta.headroom.is_some());
    let seen = Arc::new(Mutex::new(None));
    let seen2 = seen.clone();
    resp.on_finish(move |o: &Outcome| *seen2.lock().unwrap() = Some(o.clone()));
    let (chunks, err) = drain(resp).await;
    assert!(err.is_none());
    assert_eq!(text_of(&chunks), "one two three four");
    let outcome = seen.lock().unwrap().clone().unwrap();
    assert!(outcome.is_completed());
    let usage = outcome.usage().unwrap();
    assert_eq!((usage.prompt_tokens, usage.completion_tokens), (20, 4));
}

#[tokio::test]
async fn into_complete_aggregates_a_stream() {
    let (up, client) = upstream().await;
    up.push(Scenario::ok().text("a b c"));
    let resp = openai(&up, &client).oneshot(request(true)).await.unwrap();
    let full = resp.into_complete().await.unwrap();
    assert_eq!(full.text(), "a b c");
    assert_eq!(full.choices[0].finish_reason.as_deref(), Some("stop"));
}

async fn error_of(scenario: Scenario, stream: bool) -> LlmError {
    let (up, client) = upstream().await;
    up.push(scenario);
    let res = openai(&up, &client).oneshot(request(stream)).await;
    match res {
        Err(e) => e,
        Ok(resp) => {
            let (_, err) = drain(resp).await;
            err.expect("an error")
        }
    }
}

#[tokio::test]
async fn error_kinds() {
    let e = error_of(Scenario::rate_limited(2), false).await;
    assert_eq!(e.kind(), ErrorKind::RateLimited);
    assert_eq!(e.retry_after(), Some(Duration::from_secs(2)));
    assert_eq!(e.upstream_status(), Some(429));
    assert_eq!(e.provider(), Some("openai"));

    let date = httpdate::fmt_http_date(std::time::SystemTime::now() + Duration::from_secs(30));
    let e = error_of(Scenario::status(429).header("retry-after", &date), false).await;
    assert_eq!(e.kind(), ErrorKind::RateLimited);
    let after = e.retry_after().unwrap();
    assert!(
        after > Duration::from_secs(20) && after <= Duration::from_secs(30),
        "{after:?}"
    );

    for (s, kind) in [
        (Scenario::server_error(), ErrorKind::Unavailable),
        (Scenario::status(502), ErrorKind::Unavailable),
        (Scenario::unavailable(), ErrorKind::Unavailable),
        (Scenario::overloaded(), ErrorKind::Overloaded),
        (
            Scenario::context_length_exceeded(),
            ErrorKind::ContextLengthExceeded,
        ),
        (Scenario::content_filter(), ErrorKind::ContentFiltered),
        (Scenario::unauthorized(), ErrorKind::Auth),
        (Scenario::status(403), ErrorKind::Auth),
        (Scenario::status(400), ErrorKind::BadRequest),
        (Scenario::status(404), ErrorKind::NotFound),
    ] {
        let label = format!("{s:?}");
        let e = error_of(s.clone(), false).await;
        assert_eq!(e.kind(), kind, "{label}: {e}");
        assert!(e.message().contains("openai"), "{e}");
        // Streams fail the same way before the first byte.
        assert_eq!(error_of(s, true).await.kind(), kind, "{label} (stream)");
    }
    let e = error_of(Scenario::context_length_exceeded(), false).await;
    assert_eq!(e.code(), Some("context_length_exceeded"));
}

#[tokio::test]
async fn malformed_upstream_data_is_a_clear_error() {
    let e = error_of(Scenario::ok().malformed_json(), false).await;
    assert_eq!(e.kind(), ErrorKind::Transport);
    assert!(
        e.message().contains("openai") && e.message().contains("malformed"),
        "{e}"
    );

    let e = error_of(Scenario::ok().malformed_json(), true).await;
    assert_eq!(e.kind(), ErrorKind::Transport);
    assert!(e.message().contains("malformed"), "{e}");

    let e = error_of(Scenario::ok().malformed_sse(), true).await;
    assert_eq!(e.kind(), ErrorKind::Transport, "{e}");
    assert!(e.message().contains("openai"), "{e}");
}

#[tokio::test]
async fn stream_without_done_is_an_error() {
    let e = error_of(Scenario::ok().no_terminal_event(), true).await;
    assert_eq!(e.kind(), ErrorKind::Transport);
    assert!(e.message().contains("[DONE]"), "{e}");
}

#[tokio::test]
async fn dropped_connection_mid_stream() {
    let (up, client) = upstream().await;
    up.push(
        Scenario::ok()
            .text("alpha beta gamma delta")
            .drop_after_chunks(2),
    );
    let resp = openai(&up, &client).oneshot(request(true)).await.unwrap();
    let (chunks, err) = drain(resp).await;
    let err = err.expect("the drop is an error, not a clean end");
    assert_eq!(err.kind(), ErrorKind::Transport);
    assert!(err.is_retryable());
    assert_eq!(text_of(&chunks), "alpha beta ");
}

#[tokio::test]
async fn in_stream_error_event() {
    let (up, client) = upstream().await;
    up.push(
        Scenario::ok()
            .text("alpha beta gamma")
            .error_event_after_chunks(1),
    );
    let resp = openai(&up, &client).oneshot(request(true)).await.unwrap();
    let (chunks, err) = drain(resp).await;
    assert_eq!(text_of(&chunks), "alpha ");
    let err = err.unwrap();
    assert_eq!(err.kind(), ErrorKind::Unavailable, "{err}");
}

#[tokio::test]
async fn connect_failure_is_transport() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    drop(listener); // nothing listens there now
    let client = llm_tower_providers::HttpClient::with_defaults().unwrap();
    let cfg = OpenAiConfig::new(format!("http://127.0.0.1:{port}/v1")).api_key_env(None);
    let p = OpenAiProvider::new(cfg, &client).unwrap();
    let e = p.oneshot(request(false)).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Transport);
    assert!(e.message().contains("connect"), "{e}");
}

#[tokio::test]
async fn deadline_bounds_the_wait_for_headers() {
    let (up, client) = upstream().await;
    up.push(Scenario::ok().latency(Duration::from_secs(30)));
    let mut req = request(false);
    req.set_deadline(Deadline::after(Duration::from_millis(50)));
    let e = openai(&up, &client).oneshot(req).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Timeout);
}

#[tokio::test]
async fn model_mapping_and_default_model() {
    let (up, client) = upstream().await;
    let mut cfg = openai_config(&up).model("cheap", "gpt-4o-mini");
    cfg.default_model = Some("gpt-4.1".into());
    let p = OpenAiProvider::new(cfg, &client).unwrap();
    p.clone()
        .oneshot(ChatRequest::new("cheap", vec![Message::user("x")]))
        .await
        .unwrap();
    assert_eq!(
        up.last_request().unwrap().json().unwrap()["model"],
        "gpt-4o-mini"
    );
    let resp = p
        .oneshot(ChatRequest::new("", vec![Message::user("x")]))
        .await
        .unwrap();
    assert_eq!(
        up.last_request().unwrap().json().unwrap()["model"],
        "gpt-4.1"
    );
    // A JSON answer is kept as sent, for the HTTP surface to forward as it is.
    let ResponseBody::Encoded(r) = &resp.body else {
        panic!("expected an encoded body, got {:?}", resp.body);
    };
    assert_eq!(resp.meta.body_bytes, Some(r.json().len()));
    assert_eq!(r.decode().unwrap().choices.len(), 1);
}

#[tokio::test]
async fn invalid_configuration_is_rejected() {
    let client = llm_tower_providers::HttpClient::with_defaults().unwrap();
    let e = OpenAiProvider::new(OpenAiConfig::new("not a url"), &client).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::BadRequest);
    let e = OpenAiProvider::new(OpenAiConfig::new("ftp://x/v1"), &client).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::BadRequest);
    let cfg = OpenAiConfig::new("http://127.0.0.1:1/v1").header("bad header", "v");
    assert!(OpenAiProvider::new(cfg, &client).is_err());
    let toml_like = json!({"base_url": "http://x/v1", "unknown": 1});
    assert!(serde_json::from_value::<OpenAiConfig>(toml_like).is_err());
}
