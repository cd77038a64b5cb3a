//! `POST /v1/messages` through the gateway, in front of mock Anthropic and OpenAI upstreams:
//! native passthrough to the Anthropic provider (the body as sent, the answer as it came),
//! and a fallback chain that crosses dialects (Anthropic fails, an OpenAI-compatible step
//! answers in Messages framing).

use http::StatusCode;
use llm_tower_e2e::{ACME_KEY, Client, TestGateway, UPSTREAM_KEY, base_config};
use llm_tower_test::{MockUpstream, Scenario};
use serde_json::{Value, json};

/// The base config plus a chain that tries Anthropic first, then OpenAI, for the task
/// `claude-first`.
const EXTRA: &str = r#"
[chains.claude_first]
steps = [
  { provider = "backup", model = "claude-haiku-4-5" },
  { provider = "primary", model = "gpt-4o-mini" },
]

[routing.tasks]
claude-first = "claude_first"
"#;

struct Setup {
    openai: MockUpstream,
    anthropic: MockUpstream,
    gw: TestGateway,
}

async fn setup() -> Setup {
    let openai = MockUpstream::start().await;
    let anthropic = MockUpstream::start().await;
    let toml = base_config(&openai.base_url(), &anthropic.base_url(), false, EXTRA);
    let gw = TestGateway::start(&toml).await;
    Setup {
        openai,
        anthropic,
        gw,
    }
}

fn client() -> Client {
    // Anthropic's clients send the key as `x-api-key`.
    Client::new().header("x-api-key", ACME_KEY)
}

/// Splits SSE text into (event name, data as JSON).
fn events(text: &str) -> Vec<(String, Value)> {
    text.split("\n\n")
        .filter(|f| !f.trim().is_empty())
        .map(|f| {
            let mut name = String::new();
            let mut data = String::new();
            for line in f.lines() {
                if let Some(n) = line.strip_prefix("event: ") {
                    name = n.to_owned();
                } else if let Some(d) = line.strip_prefix("data: ") {
                    data.push_str(d);
                }
            }
            (name, serde_json::from_str(&data).expect(&data))
        })
        .collect()
}

fn text_of(evs: &[(String, Value)]) -> String {
    evs.iter()
        .filter(|(n, _)| n == "content_block_delta")
        .filter_map(|(_, d)| d["delta"]["text"].as_str())
        .collect()
}

/// A Messages request with what no layer knows: thinking blocks with signatures,
/// `cache_control`, `metadata`, a beta field.
fn rich(stream: bool) -> Value {
    json!({
        "model": "claude",
        "max_tokens": 300,
        "stream": stream,
        "system": [{"type": "text", "text": "Be brief.", "cache_control": {"type": "ephemeral", "ttl": "1h"}}],
        "metadata": {"user_id": "u-1"},
        "thinking": {"type": "enabled", "budget_tokens": 1024},
        "context_management": {"edits": [{"type": "clear_tool_uses_20250919"}]},
        "messages": [
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": [
                {"type": "thinking", "thinking": "Greet back.", "signature": "sig-abc=="},
                {"type": "text", "text": "Hello!"}
            ]},
            {"role": "user", "content": [{"type": "text", "text": "And now?", "cache_control": {"type": "ephemeral"}}]}
        ]
    })
}

#[tokio::test]
async fn a_messages_request_reaches_anthropic_as_sent_and_comes_back_as_it_came() {
    let s = setup().await;
    s.anthropic
        .push(Scenario::ok().text("Native answer").usage(11, 3));
    let body = rich(false);
    let r = client()
        .post(
            &s.gw.url("/v1/messages"),
            &[
                ("anthropic-version", "2023-06-01"),
                ("anthropic-beta", "context-management-2025-06-27"),
            ],
            &body,
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    let v = r.json();
    assert_eq!(v["type"], "message");
    assert_eq!(v["content"][0]["text"], "Native answer");
    assert_eq!(v["usage"]["input_tokens"], 11);
    assert_eq!(r.header("x-llm-provider"), "backup");

    // The upstream got the client's body, only the model routed, and the client's headers.
    let up = s.anthropic.last_request().unwrap();
    let mut want = body.clone();
    want["model"] = "claude-haiku-4-5".into();
    assert_eq!(up.json().unwrap(), want);
    assert_eq!(up.header("anthropic-version"), Some("2023-06-01"));
    assert_eq!(
        up.header("anthropic-beta"),
        Some("context-management-2025-06-27")
    );
    assert_eq!(up.header("x-api-key"), Some(UPSTREAM_KEY));
    assert_eq!(s.openai.request_count(), 0);
}

#[tokio::test]
async fn a_streamed_messages_request_is_forwarded_event_for_event() {
    let s = setup().await;
    s.anthropic
        .push(Scenario::ok().text("one two three").usage(9, 3));
    let r = client()
        .post(&s.gw.url("/v1/messages"), &[], &rich(true))
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(r.header("content-type"), "text/event-stream");
    let evs = events(&r.text());
    let names: Vec<&str> = evs.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names.first(), Some(&"message_start"));
    assert_eq!(names.last(), Some(&"message_stop"));
    for (n, d) in &evs {
        assert_eq!(d["type"], n.as_str());
    }
    assert_eq!(text_of(&evs), "one two three");
    let up = s.anthropic.last_request().unwrap().json().unwrap();
    assert_eq!(up["stream"], true);
    assert_eq!(up["messages"][1]["content"][0]["signature"], "sig-abc==");
}

#[tokio::test]
async fn a_failing_anthropic_step_falls_back_to_openai_in_messages_framing() {
    let s = setup().await;
    s.anthropic.push(Scenario::overloaded());
    s.openai
        .push(Scenario::ok().text("Answer from OpenAI").usage(20, 5));
    let body = json!({
        "model": "any-name",
        "max_tokens": 100,
        "system": "Be brief.",
        "messages": [{"role": "user", "content": [{"type": "text", "text": "Hi", "cache_control": {"type": "ephemeral"}}]}]
    });
    let r = client()
        .post(
            &s.gw.url("/v1/messages"),
            &[("x-llm-task", "claude-first")],
            &body,
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    let v = r.json();
    assert_eq!(v["type"], "message");
    assert_eq!(v["role"], "assistant");
    assert_eq!(
        v["content"][0],
        json!({"type": "text", "text": "Answer from OpenAI"})
    );
    assert_eq!(v["stop_reason"], "end_turn");
    assert_eq!(v["usage"]["input_tokens"], 20);
    assert_eq!(v["usage"]["output_tokens"], 5);
    assert_eq!(r.header("x-llm-provider"), "primary");
    assert_eq!(r.header("x-llm-attempts"), "2");
    assert_eq!(s.anthropic.request_count(), 1);
    // The OpenAI step got a chat request.
    let up = s.openai.last_request().unwrap().json().unwrap();
    assert_eq!(up["model"], "gpt-4o-mini");
    assert_eq!(up["max_tokens"], 100);
    assert_eq!(
        up["messages"][0],
        json!({"role": "system", "content": "Be brief."})
    );
    assert_eq!(up["messages"][1]["content"][0]["text"], "Hi");
    assert!(!up.to_string().contains("cache_control"), "{up}");
}

#[tokio::test]
async fn a_streamed_fallback_to_openai_is_a_messages_event_stream() {
    let s = setup().await;
    s.anthropic.push(Scenario::unavailable());
    s.openai
        .push(Scenario::ok().text("alpha beta gamma").usage(7, 3));
    let body = json!({
        "model": "any-name", "max_tokens": 100, "stream": true,
        "messages": [{"role": "user", "content": "Hi"}]
    });
    let r = client()
        .post(
            &s.gw.url("/v1/messages"),
            &[("x-llm-task", "claude-first")],
            &body,
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    let evs = events(&r.text());
    let names: Vec<&str> = evs.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names[..3], ["message_start", "ping", "content_block_start"]);
    assert_eq!(
        names[names.len() - 3..],
        ["content_block_stop", "message_delta", "message_stop"]
    );
    assert_eq!(text_of(&evs), "alpha beta gamma");
    let (_, delta) = &evs[evs.len() - 2];
    assert_eq!(delta["delta"]["stop_reason"], "end_turn");
    assert_eq!(delta["usage"]["output_tokens"], 3);
    // A chat upstream streams usage only when asked.
    let up = s.openai.last_request().unwrap().json().unwrap();
    assert_eq!(up["stream_options"]["include_usage"], true);
}

#[tokio::test]
async fn what_a_chat_step_cannot_carry_is_a_400_naming_it() {
    let s = setup().await;
    s.anthropic.push(Scenario::overloaded());
    let mut body = rich(false);
    body["model"] = "any-name".into();
    let r = client()
        .post(
            &s.gw.url("/v1/messages"),
            &[("x-llm-task", "claude-first")],
            &body,
        )
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "{}", r.text());
    let v = r.json();
    assert_eq!(v["type"], "error");
    assert_eq!(v["error"]["type"], "invalid_request_error");
    let msg = v["error"]["message"].as_str().unwrap();
    assert!(
        msg.contains("`context_management`") || msg.contains("`thinking`"),
        "{msg}"
    );
    // Nothing was sent to the chat upstream.
    assert_eq!(s.openai.request_count(), 0);
}

#[tokio::test]
async fn unknown_models_and_bad_keys_are_anthropic_errors() {
    let s = setup().await;
    let body = json!({"model": "claude-typo", "max_tokens": 5, "messages": [{"role": "user", "content": "Hi"}]});
    let r = client().post(&s.gw.url("/v1/messages"), &[], &body).await;
    assert_eq!(r.status, StatusCode::NOT_FOUND, "{}", r.text());
    assert_eq!(r.json()["error"]["type"], "not_found_error");
    // On chat: OpenAI's shape, `model_not_found`.
    let chat = json!({"model": "claude-typo", "messages": [{"role": "user", "content": "Hi"}]});
    let r = Client::with_key(ACME_KEY)
        .post(&s.gw.url("/v1/chat/completions"), &[], &chat)
        .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    assert_eq!(r.json()["error"]["code"], "model_not_found");
    // A wrong key.
    let r = Client::new()
        .header("x-api-key", "sk-nope")
        .post(&s.gw.url("/v1/messages"), &[], &body)
        .await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    assert_eq!(r.json()["error"]["type"], "authentication_error");
    assert_eq!(s.anthropic.request_count() + s.openai.request_count(), 0);
}
