//! `POST /v1/responses` through the gateway: native passthrough to an OpenAI-compatible
//! provider that speaks Responses (the body as sent, the answer byte for byte), the stored
//! conversation behind `previous_response_id` over that passthrough, and translation to
//! an Anthropic provider (JSON, stream, a 400 naming what cannot be translated).

use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{Method, StatusCode};
use llm_tower_e2e::{ACME_KEY, Client, GLOBEX_KEY, TestGateway};
use llm_tower_test::MockUpstream;
use serde_json::{Value, json};

const CORPUS: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../crates/llm-tower-core/tests/corpus/responses"
);

fn corpus(name: &str) -> String {
    std::fs::read_to_string(format!("{CORPUS}/{name}")).expect("corpus file")
}

/// A Responses API upstream that records each body and answers the corpus answer (JSON,
/// or its events when the request streams).
struct Upstream {
    base: String,
    bodies: Arc<Mutex<Vec<Bytes>>>,
}

async fn upstream() -> Upstream {
    let bodies: Arc<Mutex<Vec<Bytes>>> = Arc::default();
    let seen = bodies.clone();
    let app = axum::Router::new().route(
        "/v1/responses",
        axum::routing::post(move |body: Bytes| {
            let seen = seen.clone();
            async move {
                let stream = serde_json::from_slice::<Value>(&body)
                    .ok()
                    .and_then(|v| v["stream"].as_bool())
                    .unwrap_or(false);
                seen.lock().unwrap().push(body);
                if stream {
                    (
                        [("content-type", "text/event-stream")],
                        corpus("stream_text.sse"),
                    )
                } else {
                    (
                        [("content-type", "application/json")],
                        corpus("response_basic.json"),
                    )
                }
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    Upstream { base, bodies }
}

fn config(openai: &str, anthropic: &str) -> String {
    format!(
        r#"
[server]
listen = "127.0.0.1:0"
body_limit_bytes = 65536

[providers.primary]
kind = "openai"
base_url = "{openai}/v1"
api_key_env = "E2E_UPSTREAM_KEY"
responses = true

[providers.backup]
kind = "anthropic"
base_url = "{anthropic}"
api_key_env = "E2E_UPSTREAM_KEY"

[chains.main]
steps = [{{ provider = "primary", model = "gpt-4.1" }}]

[chains.claude]
steps = [{{ provider = "backup", model = "claude-haiku-4-5" }}]

[routing]
default_chain = "main"
models = {{ claude = "claude" }}

[[auth.keys]]
tenant = "acme"
key_env = "E2E_ACME_KEY"

[[auth.keys]]
tenant = "globex"
key_env = "E2E_GLOBEX_KEY"

[jobs]
enabled = false
"#
    )
}

async fn setup() -> (Upstream, MockUpstream, TestGateway) {
    let up = upstream().await;
    let anthropic = MockUpstream::start().await;
    let gw = TestGateway::start(&config(&up.base, &anthropic.base_url())).await;
    (up, anthropic, gw)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_responses_request_reaches_a_responses_upstream_as_sent_and_comes_back_byte_for_byte() {
    let (up, _anthropic, gw) = setup().await;
    let body = corpus("request_items.json").replace("\"stream\": true", "\"stream\": false");
    let sent: Value = serde_json::from_str(&body).unwrap();
    let client = Client::with_key(ACME_KEY);
    let resp = client
        .send(Method::POST, &gw.url("/v1/responses"), &[], Some(body))
        .await;
    assert_eq!(resp.status, StatusCode::OK, "{}", resp.text());
    assert_eq!(resp.body.as_ref(), corpus("response_basic.json").as_bytes());
    assert_eq!(resp.header("x-llm-provider"), "primary");
    let got: Value = serde_json::from_slice(&up.bodies.lock().unwrap()[0]).unwrap();
    let mut want = sent.clone();
    want["model"] = "gpt-4.1".into();
    assert_eq!(got, want, "only the model may change");

    // Streamed: the upstream's events, as they came.
    let stream_body = corpus("request_basic.json").replace("\"store\": true", "\"stream\": true");
    let resp = client
        .send(
            Method::POST,
            &gw.url("/v1/responses"),
            &[],
            Some(stream_body),
        )
        .await;
    assert_eq!(resp.status, StatusCode::OK);
    assert_eq!(resp.text(), corpus("stream_text.sse"));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stored_passthrough_answer_continues_with_previous_response_id_for_its_tenant() {
    let (up, _anthropic, gw) = setup().await;
    let acme = Client::with_key(ACME_KEY);
    let first = acme
        .post(
            &gw.url("/v1/responses"),
            &[],
            &json!({"model": "gpt-4.1", "input": "Tell me a story."}),
        )
        .await;
    assert_eq!(first.status, StatusCode::OK);
    let stored: Value = serde_json::from_str(&corpus("response_basic.json")).unwrap();
    let id = stored["id"].as_str().unwrap();
    // Kept for acme, as the client received it; invisible to globex.
    let got = acme.get(&gw.url(&format!("/v1/responses/{id}"))).await;
    assert_eq!(got.status, StatusCode::OK);
    assert_eq!(got.json(), stored);
    let globex = Client::with_key(GLOBEX_KEY);
    let other = globex.get(&gw.url(&format!("/v1/responses/{id}"))).await;
    assert_eq!(other.status, StatusCode::NOT_FOUND);

    let next = acme
        .post(
            &gw.url("/v1/responses"),
            &[],
            &json!({"model": "gpt-4.1", "previous_response_id": id, "input": "Another one."}),
        )
        .await;
    assert_eq!(next.status, StatusCode::OK, "{}", next.text());
    let sent: Value = serde_json::from_slice(&up.bodies.lock().unwrap()[1]).unwrap();
    assert!(sent.get("previous_response_id").is_none());
    let mut want = vec![json!({"role": "user", "content": "Tell me a story."})];
    want.extend(stored["output"].as_array().unwrap().iter().cloned());
    want.push(json!({"role": "user", "content": "Another one."}));
    assert_eq!(sent["input"], Value::Array(want));

    let refused = globex
        .post(
            &gw.url("/v1/responses"),
            &[],
            &json!({"model": "gpt-4.1", "previous_response_id": id, "input": "x"}),
        )
        .await;
    assert_eq!(refused.status, StatusCode::NOT_FOUND);
    assert_eq!(refused.json()["error"]["param"], "previous_response_id");
    assert_eq!(
        up.bodies.lock().unwrap().len(),
        2,
        "a refused request costs nothing"
    );

    let deleted = acme
        .send(
            Method::DELETE,
            &gw.url(&format!("/v1/responses/{id}")),
            &[],
            None,
        )
        .await;
    assert_eq!(
        deleted.json(),
        json!({"id": id, "object": "response.deleted", "deleted": true})
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn an_anthropic_provider_answers_a_responses_request_by_translation() {
    let (_up, anthropic, gw) = setup().await;
    let acme = Client::with_key(ACME_KEY);
    let resp = acme
        .post(
            &gw.url("/v1/responses"),
            &[],
            &json!({"model": "claude", "instructions": "Be brief.", "input": "Hello there",
                    "max_output_tokens": 64}),
        )
        .await;
    assert_eq!(resp.status, StatusCode::OK, "{}", resp.text());
    let v = resp.json();
    assert_eq!(v["object"], "response");
    assert!(
        !v["output"][0]["content"][0]["text"]
            .as_str()
            .unwrap()
            .is_empty()
    );
    assert_eq!(resp.header("x-llm-provider"), "backup");
    let sent = anthropic.last_request().unwrap().json().unwrap();
    assert_eq!(sent["system"], "Be brief.");
    assert_eq!(sent["max_tokens"], 64);
    assert_eq!(sent["messages"][0]["content"][0]["text"], "Hello there");

    // Streamed, in Responses events.
    let resp = acme
        .post(
            &gw.url("/v1/responses"),
            &[],
            &json!({"model": "claude", "input": "Hello there", "stream": true}),
        )
        .await;
    let text = resp.text();
    assert!(text.starts_with("event: response.created\n"), "{text}");
    assert!(text.contains("event: response.output_text.delta\n"));
    assert!(text.contains("event: response.completed\n"));

    // What the chat view cannot carry is a 400 naming it, and no upstream call.
    let before = anthropic.request_count();
    let resp = acme
        .post(
            &gw.url("/v1/responses"),
            &[],
            &json!({"model": "claude", "input": "news?", "tools": [{"type": "web_search_preview"}]}),
        )
        .await;
    assert_eq!(resp.status, StatusCode::BAD_REQUEST);
    assert_eq!(resp.json()["error"]["param"], "tools[0]");
    assert_eq!(anthropic.request_count(), before);
}
