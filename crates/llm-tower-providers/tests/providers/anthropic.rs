use std::time::Duration;

use llm_tower_core::{ChatRequest, ErrorKind, LlmError, Message, Role};
use llm_tower_providers::AnthropicProvider;
use llm_tower_providers::anthropic::{
    TranslateOptions, from_messages_response, to_messages_request,
};
use llm_tower_test::Scenario;
use serde_json::{Value, json};
use tower::ServiceExt;

use crate::{ANTHROPIC_KEY, anthropic, anthropic_config, drain, request, text_of, upstream};

#[tokio::test]
async fn complete_response_with_cache_usage_and_headroom() {
    let (up, client) = upstream().await;
    up.push(
        Scenario::ok()
            .text("Bonjour")
            .usage(100, 7)
            .cached_tokens(80)
            .ratelimit_remaining(11, 5000),
    );
    let resp = anthropic(&up, &client)
        .oneshot(request(false))
        .await
        .unwrap();
    assert_eq!(resp.meta.provider.as_deref(), Some("anthropic"));
    assert_eq!(resp.meta.model.as_deref(), Some("test-model"));
    let u = resp.meta.usage.clone().unwrap();
    assert_eq!(u.completion_tokens, 7);
    assert_eq!(u.cached_tokens(), 80);
    assert!(u.prompt_tokens >= 80, "cached reads count as input: {u:?}");
    let h = resp.meta.headroom.unwrap();
    assert_eq!(h.remaining_requests, Some(11));
    assert_eq!(
        h.remaining_tokens,
        Some(1000),
        "the tightest of tokens / input / output"
    );
    assert!(h.reset_tokens.unwrap() <= Duration::from_secs(60));
    assert_eq!(resp.into_complete().await.unwrap().text(), "Bonjour");

    let rec = up.last_request().unwrap();
    assert_eq!(rec.path, "/v1/messages");
    assert_eq!(rec.header("x-api-key"), Some(ANTHROPIC_KEY));
    assert_eq!(rec.header("anthropic-version"), Some("2023-06-01"));
    assert!(rec.header("authorization").is_none());
    let body = rec.json().unwrap();
    assert_eq!(body["system"], "You are terse.");
    assert_eq!(
        body["messages"],
        json!([{"role": "user", "content": [{"type": "text", "text": "Say hello"}]}])
    );
    assert_eq!(body["max_tokens"], 4096);
}

#[tokio::test]
async fn stream_maps_events_to_chunks() {
    let (up, client) = upstream().await;
    up.push(
        Scenario::ok()
            .text("one two three")
            .usage(30, 3)
            .cached_tokens(10),
    );
    let resp = anthropic(&up, &client)
        .oneshot(request(true))
        .await
        .unwrap();
    let (chunks, err) = drain(resp).await;
    assert!(err.is_none(), "{err:?}");
    assert_eq!(text_of(&chunks), "one two three");
    assert_eq!(chunks[0].choices[0].delta.role, Some(Role::Assistant));
    assert!(
        chunks
            .iter()
            .any(|c| c.choices.first().and_then(|c| c.finish_reason()) == Some("stop"))
    );
    let last = chunks.last().unwrap();
    let u = last.usage().expect("the last chunk carries usage");
    assert_eq!(u.completion_tokens, 3);
    assert_eq!(u.cached_tokens(), 10);
    assert_eq!(up.last_request().unwrap().json().unwrap()["stream"], true);
}

#[tokio::test]
async fn prompt_caching_marks_system_and_tools() {
    let (up, client) = upstream().await;
    let p = AnthropicProvider::new(anthropic_config(&up).prompt_caching(true), &client).unwrap();
    let mut req = request(false);
    req.tools = Some(vec![
        serde_json::from_value(json!({"type": "function", "function": {"name": "a", "parameters": {"type": "object"}}})).unwrap(),
        serde_json::from_value(json!({"type": "function", "function": {"name": "b"}})).unwrap(),
    ]);
    up.push(Scenario::ok().cached_tokens(50));
    let resp = p.clone().oneshot(req.clone()).await.unwrap();
    assert_eq!(resp.meta.usage.as_ref().unwrap().cached_tokens(), 50);
    let body = up.last_request().unwrap().json().unwrap();
    assert_eq!(
        body["system"][0]["cache_control"],
        json!({"type": "ephemeral"})
    );
    assert!(body["tools"][0].get("cache_control").is_none());
    assert_eq!(
        body["tools"][1]["cache_control"],
        json!({"type": "ephemeral"})
    );
    assert_eq!(
        body["tools"][1]["input_schema"],
        json!({"type": "object", "properties": {}})
    );
}

async fn error_of(scenario: Scenario, stream: bool) -> LlmError {
    let (up, client) = upstream().await;
    up.push(scenario);
    match anthropic(&up, &client).oneshot(request(stream)).await {
        Err(e) => e,
        Ok(resp) => drain(resp).await.1.expect("an error"),
    }
}

#[tokio::test]
async fn error_kinds() {
    let e = error_of(Scenario::rate_limited(3), false).await;
    assert_eq!(e.kind(), ErrorKind::RateLimited);
    assert_eq!(e.retry_after(), Some(Duration::from_secs(3)));
    assert_eq!(e.provider(), Some("anthropic"));

    let date = httpdate::fmt_http_date(std::time::SystemTime::now() + Duration::from_secs(30));
    let e = error_of(Scenario::status(429).header("retry-after", &date), true).await;
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
        (Scenario::status(413), ErrorKind::BadRequest),
        (Scenario::status(404), ErrorKind::NotFound),
    ] {
        let label = format!("{s:?}");
        let e = error_of(s.clone(), false).await;
        assert_eq!(e.kind(), kind, "{label}: {e}");
        assert!(e.message().contains("anthropic"), "{e}");
        assert_eq!(error_of(s, true).await.kind(), kind, "{label} (stream)");
    }
}

#[tokio::test]
async fn stream_failures() {
    let e = error_of(
        Scenario::ok().text("a b c d").error_event_after_chunks(1),
        true,
    )
    .await;
    assert_eq!(e.kind(), ErrorKind::Overloaded, "{e}");

    let e = error_of(Scenario::ok().no_terminal_event(), true).await;
    assert_eq!(e.kind(), ErrorKind::Transport);
    assert!(e.message().contains("message_stop"), "{e}");

    let e = error_of(Scenario::ok().malformed_json(), true).await;
    assert_eq!(e.kind(), ErrorKind::Transport);
    assert!(
        e.message().contains("anthropic") && e.message().contains("malformed"),
        "{e}"
    );

    let e = error_of(Scenario::ok().malformed_json(), false).await;
    assert_eq!(e.kind(), ErrorKind::Transport);
    assert!(e.message().contains("malformed"), "{e}");

    let e = error_of(Scenario::ok().malformed_sse(), true).await;
    assert_eq!(e.kind(), ErrorKind::Transport, "{e}");

    let (up, client) = upstream().await;
    up.push(
        Scenario::ok()
            .text("alpha beta gamma delta")
            .drop_after_chunks(2),
    );
    let resp = anthropic(&up, &client)
        .oneshot(request(true))
        .await
        .unwrap();
    let (chunks, err) = drain(resp).await;
    assert_eq!(err.unwrap().kind(), ErrorKind::Transport);
    assert_eq!(text_of(&chunks), "alpha beta ");
}

// ------------------------------------------------------------------ translation corpus

fn opts() -> TranslateOptions {
    TranslateOptions::default()
}

fn req(v: Value) -> ChatRequest {
    ChatRequest::from_slice(v.to_string().as_bytes()).unwrap()
}

#[test]
fn request_tools_tool_use_and_results() {
    let r = req(json!({
        "model": "claude-sonnet-4-5",
        "max_completion_tokens": 512,
        "temperature": 0.2,
        "stop": "END",
        "user": "u-42",
        "parallel_tool_calls": false,
        "frequency_penalty": 0.5,
        "top_k": 5,
        "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
        "tools": [{"type": "function", "function": {
            "name": "get_weather", "description": "Weather by city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}],
        "messages": [
            {"role": "system", "content": "Use tools."},
            {"role": "developer", "content": [{"type": "text", "text": "Be exact."}]},
            {"role": "user", "content": "Weather in Paris and Rome?"},
            {"role": "assistant", "content": null, "tool_calls": [
                {"id": "toolu_1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\":\"Paris\"}"}},
                {"id": "toolu_2", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\":\"Rome\"}"}}]},
            {"role": "tool", "tool_call_id": "toolu_1", "content": "18C"},
            {"role": "tool", "tool_call_id": "toolu_2", "content": [{"type": "text", "text": "21C"}]},
            {"role": "user", "content": "Thanks"}
        ]
    }));
    let body = to_messages_request(&r, &opts()).unwrap();
    assert_eq!(
        body,
        json!({
            "model": "claude-sonnet-4-5",
            "max_tokens": 512,
            "temperature": 0.2,
            "stop_sequences": ["END"],
            "metadata": {"user_id": "u-42"},
            "top_k": 5,
            "system": [{"type": "text", "text": "Use tools."}, {"type": "text", "text": "Be exact."}],
            "tools": [{"name": "get_weather", "description": "Weather by city",
                "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}],
            "tool_choice": {"type": "tool", "name": "get_weather", "disable_parallel_tool_use": true},
            "messages": [
                {"role": "user", "content": [{"type": "text", "text": "Weather in Paris and Rome?"}]},
                {"role": "assistant", "content": [
                    {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}},
                    {"type": "tool_use", "id": "toolu_2", "name": "get_weather", "input": {"city": "Rome"}}]},
                {"role": "user", "content": [
                    {"type": "tool_result", "tool_use_id": "toolu_1", "content": "18C"},
                    {"type": "tool_result", "tool_use_id": "toolu_2", "content": [{"type": "text", "text": "21C"}]},
                    {"type": "text", "text": "Thanks"}]}
            ]
        })
    );
}

#[test]
fn request_images_and_choices() {
    let r = req(json!({
        "model": "m",
        "tool_choice": "required",
        "tools": [{"type": "function", "function": {"name": "f"}}, {"type": "web_search_20250305", "name": "web_search", "max_uses": 2}],
        "messages": [{"role": "user", "content": [
            {"type": "text", "text": "What is this?", "cache_control": {"type": "ephemeral"}},
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}},
            {"type": "image_url", "image_url": {"url": "https://example.com/cat.jpg", "detail": "high"}},
            {"type": "document", "source": {"type": "text", "media_type": "text/plain", "data": "doc"}}
        ]}]
    }));
    let body = to_messages_request(&r, &opts()).unwrap();
    assert_eq!(body["tool_choice"], json!({"type": "any"}));
    assert_eq!(
        body["tools"][1],
        json!({"type": "web_search_20250305", "name": "web_search", "max_uses": 2})
    );
    assert_eq!(
        body["messages"][0]["content"],
        json!([
            {"type": "text", "text": "What is this?", "cache_control": {"type": "ephemeral"}},
            {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}},
            {"type": "image", "source": {"type": "url", "url": "https://example.com/cat.jpg"}},
            {"type": "document", "source": {"type": "text", "media_type": "text/plain", "data": "doc"}}
        ])
    );
    for (choice, expect) in [
        ("auto", json!({"type": "auto"})),
        ("none", json!({"type": "none"})),
    ] {
        let mut r2 = r.clone();
        r2.tool_choice = Some(json!(choice));
        assert_eq!(
            to_messages_request(&r2, &opts()).unwrap()["tool_choice"],
            expect
        );
    }
}

#[test]
fn request_refusals_are_bad_requests() {
    let bad = |v: Value| to_messages_request(&req(v), &opts()).unwrap_err();
    let e = bad(json!({"model": "m", "n": 2, "messages": [{"role": "user", "content": "x"}]}));
    assert_eq!((e.kind(), e.param()), (ErrorKind::BadRequest, Some("n")));
    let e = bad(
        json!({"model": "m", "messages": [{"role": "user", "content": [
        {"type": "input_audio", "input_audio": {"data": "AAA", "format": "wav"}}]}]}),
    );
    assert_eq!(e.kind(), ErrorKind::BadRequest);
    let e = bad(json!({"model": "m", "messages": [{"role": "system", "content": "only system"}]}));
    assert_eq!(e.kind(), ErrorKind::BadRequest);
    let e = bad(json!({"model": "m", "messages": [{"role": "tool", "content": "no id"}]}));
    assert_eq!(e.param(), Some("messages[0].tool_call_id"));
    let e = bad(
        json!({"model": "m", "messages": [{"role": "assistant", "content": null,
        "tool_calls": [{"id": "t", "type": "function", "function": {"name": "f", "arguments": "{not json"}}]}]}),
    );
    assert_eq!(e.kind(), ErrorKind::BadRequest);
    let e = bad(
        json!({"model": "m", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png,raw"}}]}]}),
    );
    assert!(e.message().contains("base64"), "{e}");
}

#[test]
fn request_merges_consecutive_turns_and_skips_empty_text() {
    let r = ChatRequest::new(
        "m",
        vec![
            Message::user("a"),
            Message::user("b"),
            Message::assistant(""),
            Message::assistant("c"),
        ],
    );
    let body = to_messages_request(&r, &opts()).unwrap();
    assert_eq!(
        body["messages"],
        json!([
            {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "c"}]}
        ])
    );
}

#[test]
fn response_text_tool_use_thinking_and_usage() {
    let r = from_messages_response(
        &json!({
            "id": "msg_01XFDUDYJgAACzvnptvVoYEL",
            "type": "message",
            "role": "assistant",
            "model": "claude-sonnet-4-5-20250929",
            "content": [
                {"type": "thinking", "thinking": "The user wants weather.", "signature": "EqQBCgIYAhIM"},
                {"type": "text", "text": "Let me check."},
                {"type": "tool_use", "id": "toolu_01A09q90qw90lq917835lq9", "name": "get_weather",
                 "input": {"city": "Paris", "unit": "celsius"}}
            ],
            "stop_reason": "tool_use",
            "stop_sequence": null,
            "usage": {"input_tokens": 2095, "output_tokens": 503,
                      "cache_creation_input_tokens": 1000, "cache_read_input_tokens": 4000}
        }),
        "anthropic",
    )
    .unwrap();
    assert_eq!(r.id, "msg_01XFDUDYJgAACzvnptvVoYEL");
    assert_eq!(r.model, "claude-sonnet-4-5-20250929");
    let c = &r.choices[0];
    assert_eq!(c.finish_reason.as_deref(), Some("tool_calls"));
    assert_eq!(c.message.text(), "Let me check.");
    assert_eq!(
        c.message.extra["reasoning_content"],
        "The user wants weather."
    );
    let call = &c.message.tool_calls.as_ref().unwrap()[0];
    assert_eq!(call.id, "toolu_01A09q90qw90lq917835lq9");
    assert_eq!(call.function.name, "get_weather");
    let args: Value = serde_json::from_str(&call.function.arguments).unwrap();
    assert_eq!(args, json!({"city": "Paris", "unit": "celsius"}));
    let u = r.usage.unwrap();
    assert_eq!(u.prompt_tokens, 2095 + 1000 + 4000);
    assert_eq!(u.completion_tokens, 503);
    assert_eq!(u.cached_tokens(), 4000);
    assert_eq!(
        u.prompt_tokens_details.unwrap().cache_write_tokens,
        Some(1000)
    );
}

#[test]
fn response_stop_reasons_and_errors() {
    for (reason, finish) in [
        ("end_turn", "stop"),
        ("stop_sequence", "stop"),
        ("max_tokens", "length"),
        ("tool_use", "tool_calls"),
        ("refusal", "content_filter"),
    ] {
        let r = from_messages_response(
            &json!({"id": "m", "model": "x", "content": [], "stop_reason": reason, "usage": {"input_tokens": 1, "output_tokens": 0}}),
            "anthropic",
        )
        .unwrap();
        assert_eq!(r.choices[0].finish_reason.as_deref(), Some(finish));
    }
    let e = from_messages_response(
        &json!({"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}),
        "anthropic",
    )
    .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Overloaded);
    let e = from_messages_response(&json!({"id": "m"}), "anthropic").unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Transport);
    assert!(e.message().contains("anthropic"));
}

#[tokio::test]
async fn stream_tool_use_and_thinking_from_a_recorded_stream() {
    // A real Messages API stream shape, served by a tiny local server.
    let body = concat!(
        "event: message_start\n",
        "data: {\"type\":\"message_start\",\"message\":{\"id\":\"msg_014p7gG3wDgGV9EUtLvnow3U\",\"type\":\"message\",\"role\":\"assistant\",\"model\":\"claude-sonnet-4-5\",\"stop_sequence\":null,\"usage\":{\"input_tokens\":472,\"output_tokens\":2,\"cache_read_input_tokens\":400},\"content\":[],\"stop_reason\":null}}\n\n",
        "event: content_block_start\n",
        "data: {\"type\":\"content_block_start\",\"index\":0,\"content_block\":{\"type\":\"thinking\",\"thinking\":\"\"}}\n\n",
        "event: content_block_delta\n",
        "data: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"thinking_delta\",\"thinking\":\"Need weather.\"}}\n\n",
        "event: content_block_delta\n",
        "data: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"signature_delta\",\"signature\":\"EqQB\"}}\n\n",
        "event: content_block_stop\ndata: {\"type\":\"content_block_stop\",\"index\":0}\n\n",
        "event: ping\ndata: {\"type\": \"ping\"}\n\n",
        "event: content_block_start\n",
        "data: {\"type\":\"content_block_start\",\"index\":1,\"content_block\":{\"type\":\"text\",\"text\":\"\"}}\n\n",
        "event: content_block_delta\n",
        "data: {\"type\":\"content_block_delta\",\"index\":1,\"delta\":{\"type\":\"text_delta\",\"text\":\"Checking.\"}}\n\n",
        "event: content_block_stop\ndata: {\"type\":\"content_block_stop\",\"index\":1}\n\n",
        "event: content_block_start\n",
        "data: {\"type\":\"content_block_start\",\"index\":2,\"content_block\":{\"type\":\"tool_use\",\"id\":\"toolu_01T1x1fJ34qAmk2tNTrN7Up6\",\"name\":\"get_weather\",\"input\":{}}}\n\n",
        "event: content_block_delta\n",
        "data: {\"type\":\"content_block_delta\",\"index\":2,\"delta\":{\"type\":\"input_json_delta\",\"partial_json\":\"\"}}\n\n",
        "event: content_block_delta\n",
        "data: {\"type\":\"content_block_delta\",\"index\":2,\"delta\":{\"type\":\"input_json_delta\",\"partial_json\":\"{\\\"location\\\": \\\"San Fra\"}}\n\n",
        "event: content_block_delta\n",
        "data: {\"type\":\"content_block_delta\",\"index\":2,\"delta\":{\"type\":\"input_json_delta\",\"partial_json\":\"ncisco, CA\\\"}\"}}\n\n",
        "event: content_block_stop\ndata: {\"type\":\"content_block_stop\",\"index\":2}\n\n",
        "event: message_delta\n",
        "data: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"tool_use\",\"stop_sequence\":null},\"usage\":{\"output_tokens\":89}}\n\n",
        "event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n",
    );
    let base = crate::pool::serve_fixed("text/event-stream", body).await;
    let client = llm_tower_providers::HttpClient::with_defaults().unwrap();
    let cfg = llm_tower_providers::AnthropicConfig::new(base).api_key_env(None);
    let p = AnthropicProvider::new(cfg, &client).unwrap();
    let resp = p.oneshot(request(true)).await.unwrap();
    let full = resp.into_complete().await.unwrap();
    assert_eq!(full.id, "msg_014p7gG3wDgGV9EUtLvnow3U");
    assert_eq!(full.text(), "Checking.");
    let c = &full.choices[0];
    assert_eq!(c.finish_reason.as_deref(), Some("tool_calls"));
    let call = &c.message.tool_calls.as_ref().unwrap()[0];
    assert_eq!(call.id, "toolu_01T1x1fJ34qAmk2tNTrN7Up6");
    assert_eq!(call.function.name, "get_weather");
    assert_eq!(
        call.function.arguments,
        "{\"location\": \"San Francisco, CA\"}"
    );
    let u = full.usage.unwrap();
    assert_eq!(
        (u.prompt_tokens, u.completion_tokens, u.cached_tokens()),
        (872, 89, 400)
    );
}

#[tokio::test]
async fn connect_failure_is_transport() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    drop(listener);
    let client = llm_tower_providers::HttpClient::with_defaults().unwrap();
    let cfg = llm_tower_providers::AnthropicConfig::new(format!("http://127.0.0.1:{port}"))
        .api_key(llm_tower_providers::ApiKey::new(ANTHROPIC_KEY));
    let p = AnthropicProvider::new(cfg, &client).unwrap();
    let e = p.oneshot(request(true)).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Transport);
    assert!(e.message().contains("connect"), "{e}");
    assert!(!format!("{e:?}").contains(ANTHROPIC_KEY));
}
