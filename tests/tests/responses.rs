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
    upstream_with(false).await
}

/// The corpus answers' ids, `resp_up{n}` for the n-th request when `numbered` (so that
/// every answer is stored under its own id).
async fn upstream_with(numbered: bool) -> Upstream {
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
                let n = {
                    let mut seen = seen.lock().unwrap();
                    seen.push(body);
                    seen.len()
                };
                let id = |text: String, corpus_id: &str| {
                    if numbered {
                        text.replace(corpus_id, &format!("\"resp_up{n}\""))
                    } else {
                        text
                    }
                };
                if stream {
                    (
                        [("content-type", "text/event-stream")],
                        id(corpus("stream_text.sse"), "\"resp_1\""),
                    )
                } else {
                    (
                        [("content-type", "application/json")],
                        id(
                            corpus("response_basic.json"),
                            "\"resp_67ccd2bed1ec8190b14f964abc0542670bb6a6b452d3795b\"",
                        ),
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

/// A streamed passthrough answer is read to its end, past its last event: the cache keeps
/// it (the repeat is a hit and never reaches the upstream), and it is counted as answered,
/// not as dropped.
#[tokio::test(flavor = "multi_thread")]
async fn a_streamed_passthrough_answer_is_cached_and_counted_as_answered() {
    let up = upstream().await;
    let anthropic = MockUpstream::start().await;
    let toml = format!(
        "{}\n[cache]\nstore = \"memory\"\n",
        config(&up.base, &anthropic.base_url())
    );
    let gw = TestGateway::start(&toml).await;
    let body = corpus("request_basic.json")
        .replace("\"store\": true", "\"stream\": true")
        .replace("\"temperature\": 0.7", "\"temperature\": 0");
    let client = Client::with_key(ACME_KEY);
    for want in ["miss", "hit"] {
        let resp = client
            .send(
                Method::POST,
                &gw.url("/v1/responses"),
                &[],
                Some(body.clone()),
            )
            .await;
        assert_eq!(resp.status, StatusCode::OK, "{}", resp.text());
        assert_eq!(resp.header("x-llm-cache"), want);
        assert_eq!(resp.text(), corpus("stream_text.sse"));
    }
    assert_eq!(up.bodies.lock().unwrap().len(), 1, "the hit went upstream");

    let page = Client::new().get(&gw.url("/metrics")).await.text();
    let count = |status: &str| {
        page.lines()
            .filter(|l| l.starts_with("llm_requests_total{"))
            .filter(|l| l.contains(&format!(r#"status="{status}""#)))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .sum::<u64>()
    };
    assert_eq!((count("ok"), count("dropped")), (2, 0), "{page}");
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

/// The response objects in a stream's events (`response.created`, `.completed`, …).
fn streamed_responses(sse: &str) -> Vec<Value> {
    sse.lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter_map(|d| serde_json::from_str::<Value>(d).ok())
        .filter_map(|mut v| v.get_mut("response").map(Value::take))
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_passthrough_answer_names_the_previous_response_id_the_gateway_resolved() {
    let up = upstream_with(true).await;
    let anthropic = MockUpstream::start().await;
    let gw = TestGateway::start(&config(&up.base, &anthropic.base_url())).await;
    let acme = Client::with_key(ACME_KEY);
    let url = gw.url("/v1/responses");

    // JSON: the upstream says `null` (it never saw the id); the client and the stored
    // copy read the id the client sent. Everything else stays the upstream's.
    let first = acme
        .post(
            &url,
            &[],
            &json!({"model": "gpt-4.1", "input": "Tell me a story."}),
        )
        .await;
    assert_eq!(first.json()["id"], "resp_up1");
    assert_eq!(first.json()["previous_response_id"], Value::Null);
    let next = acme
        .post(
            &url,
            &[],
            &json!({"model": "gpt-4.1", "previous_response_id": "resp_up1", "input": "More."}),
        )
        .await;
    assert_eq!(next.status, StatusCode::OK, "{}", next.text());
    let got = next.json();
    assert_eq!(got["id"], "resp_up2");
    assert_eq!(got["previous_response_id"], "resp_up1");
    let mut want: Value = serde_json::from_str(&corpus("response_basic.json")).unwrap();
    want["id"] = "resp_up2".into();
    want["previous_response_id"] = "resp_up1".into();
    assert_eq!(got, want);
    let stored = acme.get(&gw.url("/v1/responses/resp_up2")).await;
    assert_eq!(stored.json()["previous_response_id"], "resp_up1");

    // Streamed: the same in `response.created`, `.in_progress` and `.completed`, and in
    // the copy stored from the last one; the other events as they came.
    let resp = acme
        .post(
            &url,
            &[],
            &json!({"model": "gpt-4.1", "previous_response_id": "resp_up2", "input": "Again.",
                    "stream": true}),
        )
        .await;
    assert_eq!(resp.status, StatusCode::OK);
    let text = resp.text();
    let objects = streamed_responses(&text);
    assert_eq!(objects.len(), 3, "{text}");
    for r in &objects {
        assert_eq!(r["id"], "resp_up3");
        assert_eq!(r["previous_response_id"], "resp_up2", "{text}");
    }
    let sent = corpus("stream_text.sse");
    let deltas = |t: &str| -> Vec<String> {
        t.split("\n\n")
            .filter(|f| f.contains("response.output_text.delta"))
            .map(str::to_owned)
            .collect()
    };
    assert_eq!(deltas(&text), deltas(&sent));
    assert_eq!(
        text.matches("event: ").count(),
        sent.matches("event: ").count()
    );
    let stored = acme.get(&gw.url("/v1/responses/resp_up3")).await;
    assert_eq!(stored.status, StatusCode::OK);
    assert_eq!(stored.json()["previous_response_id"], "resp_up2");
    assert_eq!(stored.json()["status"], "completed");

    // Without a previous id, a stream is forwarded byte for byte.
    let resp = acme
        .post(
            &url,
            &[],
            &json!({"model": "gpt-4.1", "input": "x", "stream": true}),
        )
        .await;
    assert_eq!(resp.text(), sent.replace("\"resp_1\"", "\"resp_up4\""));
    // ...and its stored copy is the response object of its last event, as it came.
    let stored = acme.get(&gw.url("/v1/responses/resp_up4")).await;
    assert_eq!(stored.status, StatusCode::OK, "{}", stored.text());
    let last = streamed_responses(&resp.text()).pop().unwrap();
    assert_eq!(last["status"], "completed");
    assert_eq!(stored.json(), last);
}

#[tokio::test(flavor = "multi_thread")]
async fn input_items_are_listed_in_pages_for_the_responses_tenant_only() {
    let up = upstream_with(true).await;
    let anthropic = MockUpstream::start().await;
    let gw = TestGateway::start(&config(&up.base, &anthropic.base_url())).await;
    let acme = Client::with_key(ACME_KEY);
    let url = gw.url("/v1/responses");
    let input: Vec<Value> = (0..5)
        .map(|i| json!({"role": "user", "content": format!("turn {i}")}))
        .collect();
    let first = acme
        .post(&url, &[], &json!({"model": "gpt-4.1", "input": input}))
        .await;
    assert_eq!(first.json()["id"], "resp_up1");
    let list = |q: &str| {
        let acme = &acme;
        let url = gw.url(&format!("/v1/responses/resp_up1/input_items{q}"));
        async move { acme.get(&url).await }
    };
    let texts = |page: &Value| -> Vec<String> {
        page["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| i["content"][0]["text"].as_str().unwrap().to_owned())
            .collect()
    };

    // Default: newest first, up to 20, every item a message with an id and input_text.
    let all = list("").await;
    assert_eq!(all.status, StatusCode::OK, "{}", all.text());
    let all = all.json();
    assert_eq!(all["object"], "list");
    assert_eq!(
        texts(&all),
        ["turn 4", "turn 3", "turn 2", "turn 1", "turn 0"]
    );
    assert_eq!(all["has_more"], false);
    assert_eq!(all["first_id"], all["data"][0]["id"]);
    assert_eq!(all["last_id"], all["data"][4]["id"]);
    let item = &all["data"][0];
    assert_eq!(item["type"], "message");
    assert_eq!(item["role"], "user");
    assert_eq!(item["content"][0]["type"], "input_text");

    // Ascending pages of two, each continuing after the last id of the one before.
    let mut seen = Vec::new();
    let mut query = "?order=asc&limit=2".to_owned();
    let mut pages = 0;
    loop {
        let page = list(&query).await.json();
        pages += 1;
        seen.extend(texts(&page));
        if page["has_more"] == false {
            break;
        }
        query = format!(
            "?order=asc&limit=2&after={}",
            page["last_id"].as_str().unwrap()
        );
    }
    assert_eq!(pages, 3);
    assert_eq!(seen, ["turn 0", "turn 1", "turn 2", "turn 3", "turn 4"]);
    // Descending after an id: the older ones.
    let after = all["data"][1]["id"].as_str().unwrap().to_owned();
    let page = list(&format!("?after={after}&limit=100")).await.json();
    assert_eq!(texts(&page), ["turn 2", "turn 1", "turn 0"]);

    // A continued conversation lists the previous input, the previous output (its own
    // id) and the new input.
    let next = acme
        .post(
            &url,
            &[],
            &json!({"model": "gpt-4.1", "previous_response_id": "resp_up1",
                    "input": [{"type": "message", "role": "user",
                               "content": [{"type": "input_text", "text": "and then?"}]}]}),
        )
        .await;
    assert_eq!(next.json()["id"], "resp_up2");
    let page = acme
        .get(&gw.url("/v1/responses/resp_up2/input_items?order=asc"))
        .await
        .json();
    let data = page["data"].as_array().unwrap();
    assert_eq!(data.len(), 7);
    let stored: Value = serde_json::from_str(&corpus("response_basic.json")).unwrap();
    assert_eq!(data[5]["id"], stored["output"][0]["id"]);
    assert_eq!(data[6]["content"][0]["text"], "and then?");

    // Another tenant's, an unknown and a deleted id: 404 in OpenAI's error shape.
    let globex = Client::with_key(GLOBEX_KEY);
    let other = globex
        .get(&gw.url("/v1/responses/resp_up1/input_items"))
        .await;
    assert_eq!(other.status, StatusCode::NOT_FOUND);
    let e = other.json();
    assert!(e["error"]["type"].is_string(), "{e}");
    assert_eq!(e["error"]["code"], "not_found");
    assert_eq!(e["error"]["param"], "response_id");
    assert!(e["error"]["message"].as_str().unwrap().contains("resp_up1"));
    let unknown = acme
        .get(&gw.url("/v1/responses/resp_nope/input_items"))
        .await;
    assert_eq!(unknown.status, StatusCode::NOT_FOUND);
    acme.send(Method::DELETE, &gw.url("/v1/responses/resp_up2"), &[], None)
        .await;
    let deleted = acme
        .get(&gw.url("/v1/responses/resp_up2/input_items"))
        .await;
    assert_eq!(deleted.status, StatusCode::NOT_FOUND);

    // Bad query values: 400 naming the parameter.
    for (q, param) in [
        ("?limit=0", "limit"),
        ("?limit=101", "limit"),
        ("?limit=ten", "limit"),
        ("?order=newest", "order"),
        ("?after=msg_unknown", "after"),
        ("?after=", "after"),
    ] {
        let r = list(q).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{q}: {}", r.text());
        assert_eq!(r.json()["error"]["param"], param, "{q}");
    }
    // `include` (and what the gateway does not know) is ignored.
    assert_eq!(
        list("?include[]=message.input_image.image_url&limit=1")
            .await
            .status,
        StatusCode::OK
    );
}
