//! The mock HTTP upstream, exercised with a real HTTP client.

use std::time::Duration;

use bytes::Bytes;
use futures_util::FutureExt;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use llm_tower_test::{MockUpstream, SCENARIO_HEADER, Scenario};
use serde_json::{Value, json};

type HttpClient = Client<HttpConnector, Full<Bytes>>;

fn client() -> HttpClient {
    Client::builder(TokioExecutor::new()).build_http()
}

fn h2_client() -> HttpClient {
    Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http()
}

const CHAT: &str = "/v1/chat/completions";
const MESSAGES: &str = "/v1/messages";

fn chat_body(stream: bool, include_usage: bool) -> Value {
    let mut v = json!({
        "model": "gpt-4o-mini",
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "What is tower?"}
        ]
    });
    if stream {
        v["stream"] = json!(true);
    }
    if include_usage {
        v["stream_options"] = json!({"include_usage": true});
    }
    v
}

fn messages_body(stream: bool) -> Value {
    json!({
        "model": "claude-sonnet-4-5",
        "max_tokens": 256,
        "system": "Be brief.",
        "stream": stream,
        "messages": [{"role": "user", "content": [{"type": "text", "text": "What is tower?"}]}]
    })
}

async fn send(
    c: &HttpClient,
    up: &MockUpstream,
    path: &str,
    body: &Value,
    headers: &[(&str, &str)],
) -> Response<Incoming> {
    let mut b = Request::builder()
        .method(Method::POST)
        .uri(format!("{}{path}", up.base_url()))
        .header("content-type", "application/json");
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    let req = b.body(Full::new(Bytes::from(body.to_string()))).unwrap();
    c.request(req).await.expect("request failed")
}

async fn post(up: &MockUpstream, path: &str, body: &Value) -> Response<Incoming> {
    send(&client(), up, path, body, &[]).await
}

async fn get(up: &MockUpstream, path: &str, headers: &[(&str, &str)]) -> Response<Incoming> {
    let mut b = Request::builder().uri(format!("{}{path}", up.base_url()));
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    client()
        .request(b.body(Full::new(Bytes::new())).unwrap())
        .await
        .unwrap()
}

async fn text(resp: Response<Incoming>) -> String {
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    String::from_utf8(bytes.to_vec()).unwrap()
}

async fn json_of(resp: Response<Incoming>) -> Value {
    serde_json::from_str(&text(resp).await).unwrap()
}

/// Reads the body frame by frame: what arrived, and whether it ended in an error.
async fn read_all(resp: Response<Incoming>) -> (String, bool) {
    let mut body = resp.into_body();
    let mut out = Vec::new();
    loop {
        match body.frame().await {
            None => return (String::from_utf8(out).unwrap(), false),
            Some(Err(_)) => return (String::from_utf8(out).unwrap(), true),
            Some(Ok(f)) => {
                if let Ok(d) = f.into_data() {
                    out.extend_from_slice(&d);
                }
            }
        }
    }
}

/// Splits SSE text into (event name, data) pairs, checking the framing strictly.
fn sse(text: &str) -> Vec<(Option<String>, String)> {
    assert!(
        text.ends_with("\n\n"),
        "stream must end with a blank line: {text:?}"
    );
    text.trim_end_matches('\n')
        .split("\n\n")
        .map(|block| {
            let mut event = None;
            let mut data = None;
            for line in block.lines() {
                if let Some(e) = line.strip_prefix("event: ") {
                    event = Some(e.to_owned());
                } else if let Some(d) = line.strip_prefix("data: ") {
                    assert!(data.is_none(), "one data line per event: {block:?}");
                    data = Some(d.to_owned());
                } else {
                    panic!("unexpected SSE line {line:?}");
                }
            }
            (event, data.expect("event without data"))
        })
        .collect()
}

fn header<'a>(resp: &'a Response<Incoming>, name: &str) -> &'a str {
    resp.headers()
        .get(name)
        .unwrap_or_else(|| panic!("missing header {name}"))
        .to_str()
        .unwrap()
}

fn openai_stream_text(events: &[(Option<String>, String)]) -> String {
    events
        .iter()
        .filter(|(_, d)| d != "[DONE]")
        .filter_map(|(_, d)| {
            let v: Value = serde_json::from_str(d).unwrap();
            v["choices"][0]["delta"]["content"]
                .as_str()
                .map(str::to_owned)
        })
        .collect()
}

#[tokio::test]
async fn openai_json_completion_has_openai_shape_and_headers() {
    let up = MockUpstream::start().await;
    let resp = post(&up, CHAT, &chat_body(false, false)).await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(header(&resp, "content-type"), "application/json");
    assert_eq!(header(&resp, "x-ratelimit-limit-requests"), "10000");
    assert_eq!(header(&resp, "x-ratelimit-remaining-requests"), "9999");
    assert_eq!(header(&resp, "x-ratelimit-limit-tokens"), "2000000");
    let remaining_tokens: u64 = header(&resp, "x-ratelimit-remaining-tokens")
        .parse()
        .unwrap();
    assert!(remaining_tokens < 2_000_000);
    assert_eq!(header(&resp, "x-ratelimit-reset-requests"), "1s");
    assert_eq!(header(&resp, "x-ratelimit-reset-tokens"), "6m0s");
    assert!(header(&resp, "x-request-id").starts_with("req_"));
    let v = json_of(resp).await;
    assert_eq!(v["object"], "chat.completion");
    assert!(v["id"].as_str().unwrap().starts_with("chatcmpl-"));
    assert_eq!(v["model"], "gpt-4o-mini");
    assert_eq!(v["choices"][0]["message"]["role"], "assistant");
    assert_eq!(
        v["choices"][0]["message"]["content"],
        "mock answer to: What is tower?"
    );
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    let u = &v["usage"];
    // "Be brief." + "What is tower?" = 23 bytes -> 6 tokens; the answer is 30 bytes -> 8.
    assert_eq!(u["prompt_tokens"], 6);
    assert_eq!(u["completion_tokens"], 8);
    assert_eq!(u["total_tokens"], 14);
    assert_eq!(u["prompt_tokens_details"]["cached_tokens"], 0);
    // The remaining requests count down.
    let resp = post(&up, CHAT, &chat_body(false, false)).await;
    assert_eq!(header(&resp, "x-ratelimit-remaining-requests"), "9998");
}

#[tokio::test]
async fn openai_stream_uses_exact_sse_framing() {
    let up = MockUpstream::start().await;
    let resp = post(&up, CHAT, &chat_body(true, false)).await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(
        header(&resp, "content-type"),
        "text/event-stream; charset=utf-8"
    );
    let body = text(resp).await;
    assert!(body.starts_with("data: {"));
    assert!(body.ends_with("\n\ndata: [DONE]\n\n"));
    let events = sse(&body);
    assert!(events.iter().all(|(e, _)| e.is_none()));
    assert_eq!(events.last().unwrap().1, "[DONE]");
    let first: Value = serde_json::from_str(&events[0].1).unwrap();
    assert_eq!(first["object"], "chat.completion.chunk");
    assert_eq!(first["choices"][0]["delta"]["role"], "assistant");
    // Without include_usage there is no usage field at all.
    for (_, d) in &events[..events.len() - 1] {
        let v: Value = serde_json::from_str(d).unwrap();
        assert!(v.get("usage").is_none(), "{d}");
    }
    let finish: Value = serde_json::from_str(&events[events.len() - 2].1).unwrap();
    assert_eq!(finish["choices"][0]["finish_reason"], "stop");
    // Several chunks, which concatenate to the answer.
    assert!(events.len() >= 6, "{events:?}");
    assert_eq!(
        openai_stream_text(&events),
        "mock answer to: What is tower?"
    );
}

#[tokio::test]
async fn openai_stream_include_usage_adds_a_final_usage_chunk() {
    let up = MockUpstream::start().await;
    up.push(
        Scenario::ok()
            .text("one two three")
            .usage(11, 3)
            .cached_tokens(5),
    );
    let body = text(post(&up, CHAT, &chat_body(true, true)).await).await;
    let events = sse(&body);
    assert_eq!(events.last().unwrap().1, "[DONE]");
    let usage_chunk: Value = serde_json::from_str(&events[events.len() - 2].1).unwrap();
    assert_eq!(usage_chunk["choices"], json!([]));
    assert_eq!(usage_chunk["usage"]["prompt_tokens"], 11);
    assert_eq!(usage_chunk["usage"]["completion_tokens"], 3);
    assert_eq!(usage_chunk["usage"]["total_tokens"], 14);
    assert_eq!(
        usage_chunk["usage"]["prompt_tokens_details"]["cached_tokens"],
        5
    );
    for (_, d) in &events[..events.len() - 2] {
        let v: Value = serde_json::from_str(d).unwrap();
        assert_eq!(v["usage"], Value::Null, "other chunks carry usage: null");
        assert!(v.get("usage").is_some());
    }
    assert_eq!(openai_stream_text(&events), "one two three");
}

#[tokio::test]
async fn anthropic_json_message_has_messages_shape_and_headers() {
    let up = MockUpstream::start().await;
    up.push(
        Scenario::ok()
            .text("Tower is a library.")
            .usage(40, 5)
            .cached_tokens(30),
    );
    let resp = post(&up, MESSAGES, &messages_body(false)).await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert!(header(&resp, "request-id").starts_with("req_"));
    assert_eq!(header(&resp, "anthropic-ratelimit-requests-limit"), "10000");
    assert_eq!(
        header(&resp, "anthropic-ratelimit-requests-remaining"),
        "9999"
    );
    assert_eq!(header(&resp, "anthropic-ratelimit-tokens-limit"), "2000000");
    header(&resp, "anthropic-ratelimit-tokens-remaining")
        .parse::<u64>()
        .unwrap();
    for name in [
        "anthropic-ratelimit-requests-reset",
        "anthropic-ratelimit-tokens-reset",
    ] {
        let reset = header(&resp, name);
        // RFC 3339, UTC: 2026-11-26T18:46:23Z
        assert_eq!(reset.len(), 20, "{reset}");
        assert_eq!(&reset[4..5], "-");
        assert_eq!(&reset[10..11], "T");
        assert!(reset.ends_with('Z'));
    }
    assert!(resp.headers().get("x-ratelimit-limit-requests").is_none());
    let v = json_of(resp).await;
    assert_eq!(v["type"], "message");
    assert_eq!(v["role"], "assistant");
    assert!(v["id"].as_str().unwrap().starts_with("msg_"));
    assert_eq!(v["model"], "claude-sonnet-4-5");
    assert_eq!(
        v["content"],
        json!([{"type": "text", "text": "Tower is a library."}])
    );
    assert_eq!(v["stop_reason"], "end_turn");
    assert_eq!(
        v["usage"],
        json!({
            "input_tokens": 10,
            "output_tokens": 5,
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": 30
        })
    );
}

#[tokio::test]
async fn anthropic_stream_sends_events_in_order() {
    let up = MockUpstream::start().await;
    up.push(Scenario::ok().text("Hello from Claude").usage(9, 4));
    let resp = post(&up, MESSAGES, &messages_body(true)).await;
    assert_eq!(
        header(&resp, "content-type"),
        "text/event-stream; charset=utf-8"
    );
    let events = sse(&text(resp).await);
    let names: Vec<&str> = events.iter().map(|(e, _)| e.as_deref().unwrap()).collect();
    assert_eq!(
        names,
        [
            "message_start",
            "content_block_start",
            "ping",
            "content_block_delta",
            "content_block_delta",
            "content_block_delta",
            "content_block_stop",
            "message_delta",
            "message_stop"
        ]
    );
    let data: Vec<Value> = events
        .iter()
        .map(|(_, d)| serde_json::from_str(d).unwrap())
        .collect();
    for ((name, _), d) in events.iter().zip(&data) {
        assert_eq!(
            d["type"].as_str(),
            name.as_deref(),
            "data type matches event name"
        );
    }
    assert_eq!(data[0]["message"]["usage"]["input_tokens"], 9);
    assert_eq!(data[0]["message"]["content"], json!([]));
    let text: String = data
        .iter()
        .filter(|d| d["type"] == "content_block_delta")
        .map(|d| {
            assert_eq!(d["delta"]["type"], "text_delta");
            d["delta"]["text"].as_str().unwrap().to_owned()
        })
        .collect();
    assert_eq!(text, "Hello from Claude");
    assert_eq!(data[7]["delta"]["stop_reason"], "end_turn");
    assert_eq!(data[7]["usage"]["output_tokens"], 4);
}

#[tokio::test]
async fn error_statuses_carry_provider_bodies_and_headers() {
    let up = MockUpstream::start().await;
    struct Case {
        scenario: Scenario,
        status: u16,
        openai_type: &'static str,
        openai_code: Value,
        anthropic_type: &'static str,
    }
    let cases = [
        Case {
            scenario: Scenario::rate_limited(7),
            status: 429,
            openai_type: "requests",
            openai_code: json!("rate_limit_exceeded"),
            anthropic_type: "rate_limit_error",
        },
        Case {
            scenario: Scenario::server_error(),
            status: 500,
            openai_type: "server_error",
            openai_code: Value::Null,
            anthropic_type: "api_error",
        },
        Case {
            scenario: Scenario::unavailable(),
            status: 503,
            openai_type: "server_error",
            openai_code: Value::Null,
            anthropic_type: "api_error",
        },
        Case {
            scenario: Scenario::overloaded(),
            status: 529,
            openai_type: "overloaded_error",
            openai_code: json!("overloaded"),
            anthropic_type: "overloaded_error",
        },
        Case {
            scenario: Scenario::context_length_exceeded(),
            status: 400,
            openai_type: "invalid_request_error",
            openai_code: json!("context_length_exceeded"),
            anthropic_type: "invalid_request_error",
        },
        Case {
            scenario: Scenario::content_filter(),
            status: 400,
            openai_type: "invalid_request_error",
            openai_code: json!("content_policy_violation"),
            anthropic_type: "invalid_request_error",
        },
        Case {
            scenario: Scenario::unauthorized(),
            status: 401,
            openai_type: "invalid_request_error",
            openai_code: json!("invalid_api_key"),
            anthropic_type: "authentication_error",
        },
        Case {
            scenario: Scenario::status(404),
            status: 404,
            openai_type: "invalid_request_error",
            openai_code: json!("model_not_found"),
            anthropic_type: "not_found_error",
        },
        Case {
            scenario: Scenario::status(403),
            status: 403,
            openai_type: "invalid_request_error",
            openai_code: json!("model_not_found"),
            anthropic_type: "permission_error",
        },
    ];
    for case in cases {
        for stream in [false, true] {
            // OpenAI path: OpenAI error shape (streams also get a JSON error, like OpenAI).
            up.push(case.scenario.clone().header("x-extra", "yes"));
            let resp = post(&up, CHAT, &chat_body(stream, stream)).await;
            assert_eq!(resp.status().as_u16(), case.status, "{:?}", case.scenario);
            assert_eq!(header(&resp, "content-type"), "application/json");
            assert_eq!(header(&resp, "x-extra"), "yes");
            if case.status == 429 {
                assert_eq!(header(&resp, "retry-after"), "7");
                assert_eq!(header(&resp, "retry-after-ms"), "7000");
                assert_eq!(header(&resp, "x-ratelimit-remaining-requests"), "0");
                assert_eq!(header(&resp, "x-ratelimit-remaining-tokens"), "0");
                assert_eq!(header(&resp, "x-ratelimit-limit-requests"), "10000");
            } else {
                assert!(resp.headers().get("retry-after").is_none());
            }
            let v = json_of(resp).await;
            let e = &v["error"];
            assert_eq!(e["type"], case.openai_type, "{v}");
            assert_eq!(e["code"], case.openai_code, "{v}");
            assert!(e["message"].as_str().is_some_and(|m| !m.is_empty()));
            assert!(e.get("param").is_some());

            // Anthropic path: Anthropic error shape.
            up.push(case.scenario.clone());
            let resp = post(&up, MESSAGES, &messages_body(stream)).await;
            assert_eq!(resp.status().as_u16(), case.status);
            if case.status == 429 {
                assert_eq!(header(&resp, "retry-after"), "7");
                assert_eq!(header(&resp, "anthropic-ratelimit-requests-remaining"), "0");
                assert_eq!(header(&resp, "anthropic-ratelimit-tokens-remaining"), "0");
            }
            let v = json_of(resp).await;
            assert_eq!(v["type"], "error");
            assert_eq!(v["error"]["type"], case.anthropic_type, "{v}");
            assert!(v["error"]["message"].as_str().is_some());
        }
    }
    let v = {
        up.push(Scenario::context_length_exceeded());
        json_of(post(&up, MESSAGES, &messages_body(false)).await).await
    };
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .starts_with("prompt is too long")
    );
}

#[tokio::test]
async fn queue_is_taken_in_order_then_the_default() {
    let up = MockUpstream::start().await;
    up.push(Scenario::unavailable());
    up.push(Scenario::ok().text("second"));
    up.set_default(Scenario::ok().text("default"));
    let body = chat_body(false, false);
    assert_eq!(post(&up, CHAT, &body).await.status(), 503);
    let v = json_of(post(&up, CHAT, &body).await).await;
    assert_eq!(v["choices"][0]["message"]["content"], "second");
    for _ in 0..2 {
        let v = json_of(post(&up, CHAT, &body).await).await;
        assert_eq!(v["choices"][0]["message"]["content"], "default");
    }
    assert_eq!(up.request_count(), 4);
}

#[tokio::test]
async fn header_scenario_overrides_the_queue() {
    let up = MockUpstream::start().await;
    up.push(Scenario::ok().text("queued"));
    let c = client();
    let hdr = Scenario::rate_limited(3).to_json();
    let resp = send(
        &c,
        &up,
        CHAT,
        &chat_body(false, false),
        &[(SCENARIO_HEADER, &hdr)],
    )
    .await;
    assert_eq!(resp.status(), 429);
    assert_eq!(header(&resp, "retry-after"), "3");
    let resp = send(
        &c,
        &up,
        CHAT,
        &chat_body(false, false),
        &[(
            SCENARIO_HEADER,
            r#"{"text":"from header","prompt_tokens":2,"completion_tokens":1}"#,
        )],
    )
    .await;
    let v = json_of(resp).await;
    assert_eq!(v["choices"][0]["message"]["content"], "from header");
    assert_eq!(v["usage"]["total_tokens"], 3);
    // The queue was not consumed by the header requests.
    let v = json_of(post(&up, CHAT, &chat_body(false, false)).await).await;
    assert_eq!(v["choices"][0]["message"]["content"], "queued");
    // A bad header is a clear 400.
    let resp = send(
        &c,
        &up,
        CHAT,
        &chat_body(false, false),
        &[(SCENARIO_HEADER, "{nope")],
    )
    .await;
    assert_eq!(resp.status(), 400);
    let v = json_of(resp).await;
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains(SCENARIO_HEADER)
    );
    let resp = send(
        &c,
        &up,
        CHAT,
        &chat_body(false, false),
        &[(SCENARIO_HEADER, r#"{"bogus":1}"#)],
    )
    .await;
    assert_eq!(resp.status(), 400);
}

#[tokio::test]
async fn latency_delays_the_response_headers() {
    let up = MockUpstream::start().await;
    let c = client();
    let slow = Scenario::ok().latency(Duration::from_millis(600)).to_json();
    let slow_req = {
        let (c, up) = (c.clone(), up.clone());
        tokio::spawn(async move {
            send(
                &c,
                &up,
                CHAT,
                &chat_body(false, false),
                &[(SCENARIO_HEADER, &slow)],
            )
            .await
            .status()
        })
    };
    // Wait until the slow request has reached the server, then a fast one completes first.
    while up.request_count() == 0 {
        tokio::task::yield_now().await;
    }
    let fast = post(&up, CHAT, &chat_body(false, false)).await;
    assert_eq!(fast.status(), 200);
    text(fast).await;
    assert!(
        !slow_req.is_finished(),
        "the slow request's headers came before its latency"
    );
    assert_eq!(slow_req.await.unwrap(), 200);
}

#[tokio::test]
async fn first_chunk_delay_comes_after_the_headers() {
    let up = MockUpstream::start().await;
    up.push(
        Scenario::ok()
            .text("a b")
            .first_chunk_delay(Duration::from_millis(600))
            .chunk_delay(Duration::from_millis(1)),
    );
    let resp = post(&up, CHAT, &chat_body(true, false)).await;
    // The headers are here; the first event is not yet.
    assert_eq!(resp.status(), 200);
    let mut body = resp.into_body();
    assert!(
        body.frame().now_or_never().is_none(),
        "first event before its delay"
    );
    // Meanwhile another request is served in full.
    text(post(&up, CHAT, &chat_body(false, false)).await).await;
    assert!(
        body.frame().now_or_never().is_none(),
        "first event before its delay"
    );
    let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
    assert!(first.starts_with(b"data: {"));
    let rest = body.collect().await.unwrap().to_bytes();
    let all = format!(
        "{}{}",
        String::from_utf8_lossy(&first),
        String::from_utf8_lossy(&rest)
    );
    let events = sse(&all);
    assert_eq!(openai_stream_text(&events), "a b");
    assert_eq!(events.last().unwrap().1, "[DONE]");
}

#[tokio::test]
async fn drop_after_chunks_aborts_the_stream() {
    let up = MockUpstream::start().await;
    up.push(
        Scenario::ok()
            .text("one two three four")
            .drop_after_chunks(2),
    );
    let (body, errored) = read_all(post(&up, CHAT, &chat_body(true, true)).await).await;
    assert!(errored, "the client must see a broken body, got {body:?}");
    assert!(!body.contains("[DONE]"));
    let events = sse(&body);
    assert_eq!(openai_stream_text(&events), "one two ");

    up.push(
        Scenario::ok()
            .text("one two three four")
            .drop_after_chunks(1),
    );
    let (body, errored) = read_all(post(&up, MESSAGES, &messages_body(true)).await).await;
    assert!(errored);
    assert!(!body.contains("message_stop"));
    let names: Vec<_> = sse(&body).into_iter().map(|(e, _)| e.unwrap()).collect();
    assert_eq!(
        names,
        [
            "message_start",
            "content_block_start",
            "ping",
            "content_block_delta"
        ]
    );

    // Over HTTP/2 the stream is reset.
    up.push(Scenario::ok().text("one two").drop_after_chunks(0));
    let resp = send(&h2_client(), &up, CHAT, &chat_body(true, false), &[]).await;
    assert_eq!(resp.version(), http::Version::HTTP_2);
    let (_, errored) = read_all(resp).await;
    assert!(errored);
}

#[tokio::test]
async fn error_event_after_chunks_sends_the_provider_error_event() {
    let up = MockUpstream::start().await;
    up.push(
        Scenario::ok()
            .text("one two three")
            .error_event_after_chunks(1),
    );
    let (body, errored) = read_all(post(&up, MESSAGES, &messages_body(true)).await).await;
    assert!(!errored, "ends cleanly");
    let events = sse(&body);
    let (name, data) = events.last().unwrap();
    assert_eq!(name.as_deref(), Some("error"));
    let v: Value = serde_json::from_str(data).unwrap();
    assert_eq!(v["type"], "error");
    assert_eq!(v["error"]["type"], "overloaded_error");
    assert_eq!(events.len(), 5);

    up.push(
        Scenario::ok()
            .text("one two three")
            .error_event_after_chunks(2),
    );
    let (body, _) = read_all(post(&up, CHAT, &chat_body(true, false)).await).await;
    let events = sse(&body);
    let v: Value = serde_json::from_str(&events.last().unwrap().1).unwrap();
    assert_eq!(v["error"]["type"], "server_error");
    assert!(!body.contains("[DONE]"));
}

#[tokio::test]
async fn malformed_json_is_not_json() {
    let up = MockUpstream::start().await;
    up.push(Scenario::ok().malformed_json());
    let resp = post(&up, CHAT, &chat_body(false, false)).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(header(&resp, "content-type"), "application/json");
    let body = text(resp).await;
    assert!(serde_json::from_str::<Value>(&body).is_err(), "{body}");

    up.push(Scenario::ok().malformed_json());
    let body = text(post(&up, MESSAGES, &messages_body(false)).await).await;
    assert!(serde_json::from_str::<Value>(&body).is_err());

    up.push(Scenario::ok().text("a b c").malformed_json());
    let body = text(post(&up, CHAT, &chat_body(true, false)).await).await;
    let events = sse(&body);
    let bad = events
        .iter()
        .filter(|(_, d)| d != "[DONE]" && serde_json::from_str::<Value>(d).is_err())
        .count();
    assert_eq!(bad, 1, "{body}");

    up.push(Scenario::ok().text("a b c").malformed_json());
    let body = text(post(&up, MESSAGES, &messages_body(true)).await).await;
    let bad = sse(&body)
        .iter()
        .filter(|(_, d)| serde_json::from_str::<Value>(d).is_err())
        .count();
    assert_eq!(bad, 1, "{body}");
}

#[tokio::test]
async fn malformed_sse_breaks_the_framing() {
    let up = MockUpstream::start().await;
    for (path, body) in [
        (CHAT, chat_body(true, false)),
        (MESSAGES, messages_body(true)),
    ] {
        up.push(Scenario::ok().text("a b c").malformed_sse());
        let (text, errored) = read_all(post(&up, path, &body).await).await;
        assert!(!errored, "the connection closes gracefully");
        assert!(
            std::panic::catch_unwind(|| sse(&text)).is_err(),
            "framing must be invalid: {text:?}"
        );
        assert!(text.contains("\n{\"mock\":\"not an sse event\"}\n"));
        assert!(!text.contains("[DONE]") && !text.contains("message_stop"));
    }
}

#[tokio::test]
async fn no_terminal_event_ends_cleanly_without_done() {
    let up = MockUpstream::start().await;
    up.push(Scenario::ok().text("a b").no_terminal_event());
    let (body, errored) = read_all(post(&up, CHAT, &chat_body(true, true)).await).await;
    assert!(!errored);
    let events = sse(&body);
    assert!(events.iter().all(|(_, d)| d != "[DONE]"));
    assert_eq!(openai_stream_text(&events), "a b");

    up.push(Scenario::ok().text("a b").no_terminal_event());
    let (body, errored) = read_all(post(&up, MESSAGES, &messages_body(true)).await).await;
    assert!(!errored);
    let names: Vec<_> = sse(&body).into_iter().map(|(e, _)| e.unwrap()).collect();
    assert_eq!(names.last().map(String::as_str), Some("message_delta"));
}

#[tokio::test]
async fn models_lists_in_both_shapes() {
    let up = MockUpstream::start().await;
    let resp = get(&up, "/v1/models", &[]).await;
    assert_eq!(resp.status(), 200);
    let v = json_of(resp).await;
    assert_eq!(v["object"], "list");
    assert!(
        v["data"]
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m["id"] == "gpt-4o-mini" && m["object"] == "model")
    );
    let v = json_of(get(&up, "/v1/models", &[("anthropic-version", "2023-06-01")]).await).await;
    assert_eq!(v["has_more"], false);
    assert!(
        v["data"]
            .as_array()
            .unwrap()
            .iter()
            .all(|m| m["type"] == "model")
    );
}

#[tokio::test]
async fn unknown_paths_methods_and_bad_bodies_are_clear_errors() {
    let up = MockUpstream::start().await;
    assert_eq!(get(&up, "/v1/nope", &[]).await.status(), 404);
    assert_eq!(get(&up, CHAT, &[]).await.status(), 405);
    let req = Request::post(format!("{}{CHAT}", up.base_url()))
        .body(Full::new(Bytes::from_static(b"{not json")))
        .unwrap();
    let resp = client().request(req).await.unwrap();
    assert_eq!(resp.status(), 400);
    assert_eq!(
        json_of(resp).await["error"]["type"],
        "invalid_request_error"
    );
    let resp = post(&up, MESSAGES, &json!({"model": "x"})).await;
    assert_eq!(resp.status(), 400);
    assert_eq!(
        json_of(resp).await["error"]["type"],
        "invalid_request_error"
    );
}

#[tokio::test]
async fn requests_are_recorded() {
    let up = MockUpstream::start().await;
    let c = client();
    send(
        &c,
        &up,
        CHAT,
        &chat_body(false, false),
        &[("authorization", "Bearer sk-test")],
    )
    .await;
    get(&up, "/v1/models", &[]).await;
    let reqs = up.requests();
    assert_eq!(reqs.len(), 2);
    assert_eq!(reqs[0].method, Method::POST);
    assert_eq!(reqs[0].path, CHAT);
    assert_eq!(reqs[0].header("authorization"), Some("Bearer sk-test"));
    assert!(
        !format!("{:?}", reqs[0]).contains("sk-test"),
        "keys never in Debug"
    );
    assert_eq!(reqs[0].json().unwrap()["model"], "gpt-4o-mini");
    assert_eq!(reqs[1].method, Method::GET);
    assert_eq!(up.last_request().unwrap().path, "/v1/models");
    up.clear_requests();
    assert!(up.requests().is_empty());
    assert_eq!(up.request_count(), 2);
}

#[tokio::test]
async fn keep_alive_reuses_one_connection() {
    let up = MockUpstream::start().await;
    let c = client();
    for stream in [false, true, false] {
        let resp = send(&c, &up, CHAT, &chat_body(stream, false), &[]).await;
        text(resp).await;
    }
    assert_eq!(up.request_count(), 3);
    assert_eq!(up.connection_count(), 1);
    // Another client (pool) opens another connection.
    text(post(&up, CHAT, &chat_body(false, false)).await).await;
    assert_eq!(up.connection_count(), 2);
}

#[tokio::test]
async fn h2c_serves_json_and_streams() {
    let up = MockUpstream::start().await;
    let c = h2_client();
    let resp = send(&c, &up, CHAT, &chat_body(false, false), &[]).await;
    assert_eq!(resp.version(), http::Version::HTTP_2);
    assert_eq!(
        json_of(resp).await["choices"][0]["message"]["content"],
        "mock answer to: What is tower?"
    );
    let resp = send(&c, &up, MESSAGES, &messages_body(true), &[]).await;
    let events = sse(&text(resp).await);
    assert_eq!(events.last().unwrap().0.as_deref(), Some("message_stop"));
    assert_eq!(up.connection_count(), 1);
}

#[tokio::test]
async fn json_mode_answers_json_by_default() {
    let up = MockUpstream::start().await;
    let mut body = chat_body(false, false);
    body["response_format"] = json!({"type": "json_object"});
    let v = json_of(post(&up, CHAT, &body).await).await;
    let content = v["choices"][0]["message"]["content"].as_str().unwrap();
    let inner: Value = serde_json::from_str(content).unwrap();
    assert_eq!(inner["answer"], "mock answer to: What is tower?");
}

#[tokio::test]
async fn shutdown_stops_the_server() {
    let up = MockUpstream::start().await;
    let url = up.base_url();
    text(post(&up, CHAT, &chat_body(false, false)).await).await;
    up.shutdown().await;
    let req = Request::get(format!("{url}/v1/models"))
        .body(Full::new(Bytes::new()))
        .unwrap();
    assert!(client().request(req).await.is_err());
}

#[tokio::test]
async fn dropping_the_last_handle_stops_the_server() {
    let up = MockUpstream::start().await;
    let url = up.base_url();
    let clone = up.clone();
    drop(up);
    text(post(&clone, CHAT, &chat_body(false, false)).await).await;
    drop(clone);
    tokio::task::yield_now().await;
    let req = Request::get(format!("{url}/v1/models"))
        .body(Full::new(Bytes::new()))
        .unwrap();
    assert!(client().request(req).await.is_err());
}

#[test]
fn scenario_json_round_trips() {
    let s = Scenario::context_length_exceeded()
        .header("a", "b")
        .latency(Duration::from_millis(5))
        .drop_after_chunks(3)
        .usage(1, 2)
        .cached_tokens(1)
        .ratelimit_remaining(5, 100);
    let back = Scenario::from_json(&s.to_json()).unwrap();
    assert_eq!(back, s);
    assert_eq!(Scenario::from_json("{}").unwrap(), Scenario::ok());
    assert_eq!(
        Scenario::from_json(r#"{"status":400,"error":"content_filter"}"#).unwrap(),
        Scenario::content_filter()
    );
    assert_eq!(
        Scenario::from_json(r#"{"text":"hi","chunk_delay_ms":20}"#).unwrap(),
        Scenario::ok()
            .text("hi")
            .chunk_delay(Duration::from_millis(20))
    );
}

#[tokio::test]
async fn ratelimit_remaining_overrides_headroom_headers() {
    let up = MockUpstream::start().await;
    up.push(Scenario::ok().ratelimit_remaining(3, 1234));
    let resp = post(&up, CHAT, &chat_body(false, false)).await;
    assert_eq!(header(&resp, "x-ratelimit-remaining-requests"), "3");
    assert_eq!(header(&resp, "x-ratelimit-remaining-tokens"), "1234");
    up.push(Scenario::ok().ratelimit_remaining(3, 1234));
    let resp = post(&up, MESSAGES, &messages_body(false)).await;
    assert_eq!(header(&resp, "anthropic-ratelimit-requests-remaining"), "3");
    assert_eq!(
        header(&resp, "anthropic-ratelimit-tokens-remaining"),
        "1234"
    );
}

#[tokio::test]
async fn shutdown_lets_in_flight_responses_finish() {
    let up = MockUpstream::start().await;
    up.push(
        Scenario::ok()
            .text("still here")
            .latency(Duration::from_millis(200)),
    );
    let in_flight = {
        let up = up.clone();
        tokio::spawn(async move { text(post(&up, CHAT, &chat_body(false, false)).await).await })
    };
    while up.request_count() == 0 {
        tokio::task::yield_now().await;
    }
    up.shutdown().await;
    let body: Value = serde_json::from_str(&in_flight.await.unwrap()).unwrap();
    assert_eq!(body["choices"][0]["message"]["content"], "still here");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drop_after_chunks_delivers_the_chunks_before_the_abort_on_any_runtime() {
    let up = MockUpstream::start().await;
    for n in 0..4 {
        up.push(
            Scenario::ok()
                .text("one two three four")
                .drop_after_chunks(n),
        );
        let (body, errored) = read_all(post(&up, CHAT, &chat_body(true, false)).await).await;
        assert!(errored);
        let words = ["one ", "two ", "three ", "four"];
        assert_eq!(openai_stream_text(&sse(&body)), words[..n].concat());
    }
}

#[tokio::test]
async fn recording_can_be_turned_off() {
    let up = MockUpstream::builder()
        .record_requests(false)
        .default_scenario(Scenario::ok().text("quiet"))
        .start()
        .await
        .unwrap();
    let v = json_of(post(&up, CHAT, &chat_body(false, false)).await).await;
    assert_eq!(v["choices"][0]["message"]["content"], "quiet");
    assert!(up.requests().is_empty());
    assert_eq!(up.request_count(), 1);
}

#[tokio::test]
async fn rate_cap_answers_429_above_the_limit_over_every_scenario() {
    let up = MockUpstream::start().await;
    up.set_rate_cap(Some((2, Duration::from_secs(60))));
    let body = chat_body(false, false);
    let r1 = post(&up, "/v1/chat/completions", &body).await;
    assert_eq!(r1.status(), StatusCode::OK);
    assert_eq!(header(&r1, "x-ratelimit-remaining-requests"), "1");
    let reset = header(&r1, "x-ratelimit-reset-requests").to_owned();
    let ms: u64 = reset.trim_end_matches("ms").parse().unwrap();
    assert!(ms > 0 && ms <= 60_000, "{reset}");
    // A scenario header does not get around the cap: it counts every request.
    let r2 = send(
        &client(),
        &up,
        "/v1/messages",
        &messages_body(false),
        &[(SCENARIO_HEADER, r#"{"text":"x"}"#)],
    )
    .await;
    assert_eq!(r2.status(), StatusCode::OK);
    assert_eq!(header(&r2, "anthropic-ratelimit-requests-remaining"), "0");
    let r3 = post(&up, "/v1/chat/completions", &body).await;
    assert_eq!(r3.status(), StatusCode::TOO_MANY_REQUESTS);
    let retry: u64 = header(&r3, "retry-after").parse().unwrap();
    assert!((1..=60).contains(&retry), "{retry}");
    assert_eq!(header(&r3, "x-ratelimit-remaining-requests"), "0");
    assert_eq!(up.rate_capped_count(), 1);
    // Removed: served again.
    up.set_rate_cap(None);
    let r4 = post(&up, "/v1/chat/completions", &body).await;
    assert_eq!(r4.status(), StatusCode::OK);
    assert_eq!(up.request_count(), 4);
}

const RESPONSES: &str = "/v1/responses";

fn responses_body(stream: bool) -> Value {
    json!({
        "model": "gpt-4.1",
        "instructions": "Be brief.",
        "input": [{"role": "user", "content": [{"type": "input_text", "text": "What is tower?"}]}],
        "stream": stream
    })
}

#[tokio::test]
async fn responses_json_has_the_response_object_shape_and_openai_headers() {
    let up = MockUpstream::start().await;
    up.push(Scenario::ok().text("Hello there").usage(7, 2));
    let resp = post(&up, RESPONSES, &responses_body(false)).await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert!(header(&resp, "x-request-id").starts_with("req_mock"));
    assert!(!header(&resp, "x-ratelimit-remaining-requests").is_empty());
    let v = json_of(resp).await;
    assert_eq!(v["object"], "response");
    assert_eq!(v["status"], "completed");
    assert_eq!(v["model"], "gpt-4.1");
    assert!(v["id"].as_str().unwrap().starts_with("resp_"));
    assert_eq!(v["previous_response_id"], Value::Null);
    assert_eq!(v["output"][0]["type"], "message");
    assert_eq!(v["output"][0]["content"][0]["text"], "Hello there");
    assert_eq!(v["usage"]["input_tokens"], 7);
    assert_eq!(v["usage"]["total_tokens"], 9);
    let chat = llm_tower_core::dialect::responses::response_from_json(&v).unwrap();
    assert_eq!(chat.text(), "Hello there");

    // The default answer echoes the last user text; no `input` is OpenAI's 400.
    let v = json_of(post(&up, RESPONSES, &json!({"model": "m", "input": "ping"})).await).await;
    assert_eq!(v["output"][0]["content"][0]["text"], "mock answer to: ping");
    let resp = post(&up, RESPONSES, &json!({"model": "m"})).await;
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    assert_eq!(
        json_of(resp).await["error"]["type"],
        "invalid_request_error"
    );
}

#[tokio::test]
async fn responses_stream_sends_typed_events_in_order() {
    let up = MockUpstream::start().await;
    up.push(Scenario::ok().text("Hello from tower").usage(9, 4));
    let resp = post(&up, RESPONSES, &responses_body(true)).await;
    assert_eq!(
        header(&resp, "content-type"),
        "text/event-stream; charset=utf-8"
    );
    let events = sse(&text(resp).await);
    let names: Vec<&str> = events.iter().map(|(e, _)| e.as_deref().unwrap()).collect();
    assert_eq!(
        names,
        [
            "response.created",
            "response.in_progress",
            "response.output_item.added",
            "response.content_part.added",
            "response.output_text.delta",
            "response.output_text.delta",
            "response.output_text.delta",
            "response.output_text.done",
            "response.content_part.done",
            "response.output_item.done",
            "response.completed"
        ]
    );
    let data: Vec<Value> = events
        .iter()
        .map(|(_, d)| serde_json::from_str(d).unwrap())
        .collect();
    for (i, ((name, _), d)) in events.iter().zip(&data).enumerate() {
        assert_eq!(d["type"].as_str(), name.as_deref());
        assert_eq!(d["sequence_number"], i);
    }
    assert_eq!(data[0]["response"]["status"], "in_progress");
    let deltas: String = data[4..7]
        .iter()
        .map(|d| d["delta"].as_str().unwrap())
        .collect();
    assert_eq!(deltas, "Hello from tower");
    assert_eq!(data[7]["text"], "Hello from tower");
    let item_id = &data[2]["item"]["id"];
    assert!(
        data[4..10]
            .iter()
            .all(|d| d["item_id"] == *item_id || d["item"]["id"] == *item_id)
    );
    let done = &data[10]["response"];
    assert_eq!(done["status"], "completed");
    assert_eq!(done["output"][0]["content"][0]["text"], "Hello from tower");
    assert_eq!(done["usage"]["output_tokens"], 4);

    // A failure mid-stream is an `error` event, and no `response.completed`.
    up.push(Scenario::ok().text("a b c").error_event_after_chunks(1));
    let events = sse(&text(post(&up, RESPONSES, &responses_body(true)).await).await);
    let last = events.last().unwrap();
    assert_eq!(last.0.as_deref(), Some("error"));
    assert_eq!(
        serde_json::from_str::<Value>(&last.1).unwrap()["code"],
        "server_error"
    );
    assert!(
        events
            .iter()
            .all(|(e, _)| e.as_deref() != Some("response.completed"))
    );
}
