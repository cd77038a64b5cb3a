//! `POST /v1/embeddings` through the gateway in front of the mock OpenAI upstream: routing
//! by model alias, the per-input cache, cost, and errors in the OpenAI format.

use http::StatusCode;
use llm_tower_e2e::{ACME_KEY, Client, TestGateway, base_config};
use llm_tower_test::{MockUpstream, Scenario};
use serde_json::json;

#[tokio::test]
async fn embeddings_are_routed_cached_per_input_and_priced() {
    let openai = MockUpstream::start().await;
    let anthropic = MockUpstream::start().await;
    let gw = TestGateway::start(&base_config(
        &openai.base_url(),
        &anthropic.base_url(),
        false,
        "",
    ))
    .await;
    let client = Client::with_key(ACME_KEY);
    let url = gw.url("/v1/embeddings");

    let r = client
        .post(
            &url,
            &[],
            &json!({"model": "solo", "input": ["alpha", "beta"], "dimensions": 3}),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(r.header("x-llm-cache"), "miss");
    assert_eq!(r.header("x-llm-provider"), "primary");
    assert!(r.header("x-llm-cost-usd").starts_with("0.0000"));
    let first = r.json();
    assert_eq!(first["object"], "list");
    assert_eq!(first["data"][1]["index"], 1);
    assert_eq!(first["data"][0]["embedding"].as_array().unwrap().len(), 3);
    // The alias was resolved to the chain's model upstream.
    let sent = openai.last_request().unwrap();
    assert_eq!(sent.path, "/v1/embeddings");
    assert_eq!(sent.json().unwrap()["model"], "gpt-4o-mini");

    // Half cached: one input goes upstream, the answer comes back in order.
    let r = client
        .post(
            &url,
            &[],
            &json!({"model": "solo", "input": ["gamma", "alpha"], "dimensions": 3, "encoding_format": "base64"}),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(
        openai.last_request().unwrap().json().unwrap()["input"],
        json!(["gamma"])
    );
    let v = r.json();
    let b64 = v["data"][1]["embedding"].as_str().unwrap();
    let alpha: Vec<f32> = serde_json::from_value(first["data"][0]["embedding"].clone()).unwrap();
    assert_eq!(llm_tower::embeddings::decode_base64(b64).unwrap(), alpha);

    // All cached: no upstream call, priced at 0.
    let calls = openai.request_count();
    let r = client
        .post(
            &url,
            &[],
            &json!({"model": "solo", "input": ["beta", "gamma"], "dimensions": 3}),
        )
        .await;
    assert_eq!(r.header("x-llm-cache"), "hit");
    assert_eq!(r.header("x-llm-cost-usd"), "0.0");
    assert_eq!(openai.request_count(), calls);

    // An upstream failure on a one-step chain is the OpenAI error; bad input is a 400.
    openai.push(Scenario::unavailable());
    let r = client
        .post(&url, &[], &json!({"model": "solo", "input": "fresh"}))
        .await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE, "{}", r.text());
    let r = client
        .post(&url, &[], &json!({"model": "solo", "input": [1.5]}))
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert_eq!(r.json()["error"]["type"], "invalid_request_error");
}
