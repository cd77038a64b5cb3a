//! `POST /v1/responses`, `GET` / `DELETE /v1/responses/{id}` driven with `oneshot` over the
//! scripted `MockLlm`: answers and typed events in the Responses dialect, the stored
//! conversation behind `previous_response_id`, tenant scoping and errors in OpenAI's format.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::response::Response;
use http::Request;
use http_body_util::BodyExt;
use llm_tower_axum::{ClientKeys, OpenAiRouter};
use llm_tower_core::dialect::responses::MemoryResponseStore;
use llm_tower_core::{
    ChatChunk, ChatResponse, ChunkChoice, Delta, Dialect, Extra, FunctionCallDelta, LlmError,
    LlmResponse, NativeRequest, Role, ToolCallDelta,
};
use llm_tower_test::{MockLlm, Step};
use serde_json::{Value, json};
use tower::ServiceExt;

fn post(path: &str, key: &str, body: &str) -> Request<Body> {
    Request::post(path)
        .header("content-type", "application/json")
        .header("authorization", format!("Bearer {key}"))
        .body(Body::from(body.to_owned()))
        .unwrap()
}

fn req(method: &str, path: &str, key: &str) -> Request<Body> {
    Request::builder()
        .method(method)
        .uri(path)
        .header("authorization", format!("Bearer {key}"))
        .body(Body::empty())
        .unwrap()
}

async fn json_of(resp: Response) -> Value {
    let b = resp.into_body().collect().await.unwrap().to_bytes();
    serde_json::from_slice(&b).unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&b)))
}

async fn text(resp: Response) -> String {
    String::from_utf8(
        resp.into_body()
            .collect()
            .await
            .unwrap()
            .to_bytes()
            .to_vec(),
    )
    .unwrap()
}

fn events(text: &str) -> Vec<(String, Value)> {
    text.split("\n\n")
        .filter(|f| !f.trim().is_empty())
        .map(|f| {
            let (name, data) = f.split_once('\n').expect("event and data lines");
            let name = name.strip_prefix("event: ").expect("event line");
            let data = data.strip_prefix("data: ").expect("data line");
            (name.to_owned(), serde_json::from_str(data).expect(data))
        })
        .collect()
}

fn app(mock: MockLlm) -> axum::Router {
    OpenAiRouter::new(mock)
        .client_keys(
            ClientKeys::new()
                .with_key("sk-a", "tenant-a")
                .with_key("sk-b", "tenant-b"),
        )
        .response_store(
            Arc::new(MemoryResponseStore::new(100)),
            Duration::from_secs(3600),
        )
        .into_router()
}

#[tokio::test(start_paused = true)]
async fn a_plain_answer_is_a_response_object_and_is_stored() {
    let mock = MockLlm::new("p").then(Step::reply("Hi!"));
    let app = app(mock.clone());
    let body = r#"{"model":"m","input":"Hello","instructions":"Be brief.","metadata":{"k":"v"}}"#;
    let resp = app
        .clone()
        .oneshot(post("/v1/responses", "sk-a", body))
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let v = json_of(resp).await;
    assert_eq!(v["object"], "response");
    assert_eq!(v["status"], "completed");
    assert_eq!(v["output"][0]["type"], "message");
    assert_eq!(v["output"][0]["content"][0]["text"], "Hi!");
    assert_eq!(v["instructions"], "Be brief.");
    assert_eq!(v["metadata"], json!({"k": "v"}));
    assert!(v["usage"]["total_tokens"].is_u64());
    let seen = mock.last_request().unwrap();
    assert_eq!(seen.messages.len(), 2);
    assert_eq!(seen.messages[0].role, Role::System);
    let native = seen.extensions.get::<NativeRequest>().unwrap();
    assert_eq!(native.dialect(), Dialect::Responses);
    assert_eq!(native.body().as_ref(), body.as_bytes());

    // Retrieved by its tenant only.
    let id = v["id"].as_str().unwrap();
    let got = app
        .clone()
        .oneshot(req("GET", &format!("/v1/responses/{id}"), "sk-a"))
        .await
        .unwrap();
    assert_eq!(got.status(), 200);
    assert_eq!(json_of(got).await, v);
    let other = app
        .clone()
        .oneshot(req("GET", &format!("/v1/responses/{id}"), "sk-b"))
        .await
        .unwrap();
    assert_eq!(other.status(), 404);
    let e = json_of(other).await;
    assert_eq!(e["error"]["param"], "response_id");
    // Another tenant cannot delete it; its own can, once.
    let del = app
        .clone()
        .oneshot(req("DELETE", &format!("/v1/responses/{id}"), "sk-b"))
        .await
        .unwrap();
    assert_eq!(del.status(), 404);
    let del = app
        .clone()
        .oneshot(req("DELETE", &format!("/v1/responses/{id}"), "sk-a"))
        .await
        .unwrap();
    assert_eq!(del.status(), 200);
    assert_eq!(
        json_of(del).await,
        json!({"id": id, "object": "response.deleted", "deleted": true})
    );
    let gone = app
        .oneshot(req("GET", &format!("/v1/responses/{id}"), "sk-a"))
        .await
        .unwrap();
    assert_eq!(gone.status(), 404);
}

#[tokio::test(start_paused = true)]
async fn previous_response_id_rebuilds_the_conversation_for_its_tenant_only() {
    let mock = MockLlm::new("p")
        .then(Step::reply("Paris."))
        .then(Step::reply("About 2 million."));
    let app = app(mock.clone());
    let first = app
        .clone()
        .oneshot(post(
            "/v1/responses",
            "sk-a",
            r#"{"model":"m","input":"Capital of France?"}"#,
        ))
        .await
        .unwrap();
    let id = json_of(first).await["id"].as_str().unwrap().to_owned();
    let next = format!(r#"{{"model":"m","previous_response_id":"{id}","input":"Population?"}}"#);
    let resp = app
        .clone()
        .oneshot(post("/v1/responses", "sk-a", &next))
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let v = json_of(resp).await;
    assert_eq!(v["previous_response_id"], id.as_str());
    let seen = mock.last_request().unwrap();
    let turns: Vec<(Role, String)> = seen
        .messages
        .iter()
        .map(|m| (m.role.clone(), m.text()))
        .collect();
    assert_eq!(
        turns,
        [
            (Role::User, "Capital of France?".to_owned()),
            (Role::Assistant, "Paris.".to_owned()),
            (Role::User, "Population?".to_owned()),
        ]
    );
    // The layers see a self-contained request: no `previous_response_id` in the body.
    let native = seen.extensions.get::<NativeRequest>().unwrap();
    let body: Value = serde_json::from_slice(native.body()).unwrap();
    assert!(body.get("previous_response_id").is_none());
    assert_eq!(body["input"].as_array().unwrap().len(), 3);

    // Another tenant, or an unknown id: 404 naming the parameter, and no upstream call.
    let calls = mock.calls();
    for (key, body) in [
        ("sk-b", next.clone()),
        (
            "sk-a",
            r#"{"model":"m","previous_response_id":"resp_nope","input":"x"}"#.to_owned(),
        ),
    ] {
        let resp = app
            .clone()
            .oneshot(post("/v1/responses", key, &body))
            .await
            .unwrap();
        assert_eq!(resp.status(), 404);
        let e = json_of(resp).await;
        assert_eq!(e["error"]["param"], "previous_response_id");
    }
    assert_eq!(mock.calls(), calls);
}

#[tokio::test(start_paused = true)]
async fn store_false_keeps_nothing() {
    let mock = MockLlm::new("p").then(Step::reply("x"));
    let app = app(mock);
    let resp = app
        .clone()
        .oneshot(post(
            "/v1/responses",
            "sk-a",
            r#"{"model":"m","input":"hi","store":false}"#,
        ))
        .await
        .unwrap();
    let v = json_of(resp).await;
    assert_eq!(v["store"], false);
    let id = v["id"].as_str().unwrap();
    let got = app
        .oneshot(req("GET", &format!("/v1/responses/{id}"), "sk-a"))
        .await
        .unwrap();
    assert_eq!(got.status(), 404);
}

#[tokio::test(start_paused = true)]
async fn a_stream_has_the_typed_events_in_order_and_is_stored() {
    let mock = MockLlm::new("p").then(Step::stream(["Hel", "lo"]));
    let app = app(mock);
    let resp = app
        .clone()
        .oneshot(post(
            "/v1/responses",
            "sk-a",
            r#"{"model":"m","input":"hi","stream":true}"#,
        ))
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    let evs = events(&text(resp).await);
    let names: Vec<&str> = evs.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        names,
        [
            "response.created",
            "response.in_progress",
            "response.output_item.added",
            "response.content_part.added",
            "response.output_text.delta",
            "response.output_text.delta",
            "response.output_text.done",
            "response.content_part.done",
            "response.output_item.done",
            "response.completed",
        ]
    );
    for (i, (name, v)) in evs.iter().enumerate() {
        assert_eq!(v["type"], name.as_str());
        assert_eq!(v["sequence_number"], i as u64);
    }
    let done = &evs.last().unwrap().1["response"];
    assert_eq!(done["output"][0]["content"][0]["text"], "Hello");
    let id = done["id"].as_str().unwrap();
    let got = app
        .oneshot(req("GET", &format!("/v1/responses/{id}"), "sk-a"))
        .await
        .unwrap();
    assert_eq!(json_of(got).await, *done);
}

#[tokio::test(start_paused = true)]
async fn a_stream_that_fails_after_it_started_ends_with_response_failed() {
    let mock = MockLlm::new("p")
        .then(Step::stream(["one ", "two ", "three"]).fail_after(2, LlmError::overloaded("busy")));
    let app = app(mock);
    let resp = app
        .clone()
        .oneshot(post(
            "/v1/responses",
            "sk-a",
            r#"{"model":"m","input":"hi","stream":true}"#,
        ))
        .await
        .unwrap();
    let evs = events(&text(resp).await);
    let (name, last) = evs.last().unwrap();
    assert_eq!(name, "response.failed");
    assert_eq!(last["response"]["status"], "failed");
    assert!(
        last["response"]["error"]["message"]
            .as_str()
            .unwrap()
            .contains("busy")
    );
    assert!(!evs.iter().any(|(n, _)| n == "response.completed"));
    // A failed response is not stored.
    let id = last["response"]["id"].as_str().unwrap();
    let got = app
        .oneshot(req("GET", &format!("/v1/responses/{id}"), "sk-a"))
        .await
        .unwrap();
    assert_eq!(got.status(), 404);
}

fn tool_chunk(id: Option<&str>, args: &str) -> ChatChunk {
    ChatChunk {
        model: "m".into(),
        choices: vec![ChunkChoice {
            index: 0,
            delta: Delta {
                tool_calls: Some(vec![ToolCallDelta {
                    index: 0,
                    id: id.map(str::to_owned),
                    kind: id.map(|_| "function".to_owned()),
                    function: Some(FunctionCallDelta {
                        name: id.map(|_| "get_weather".to_owned()),
                        arguments: Some(args.to_owned()),
                        extra: Extra::new(),
                    }),
                    extra: Extra::new(),
                }]),
                ..Delta::default()
            },
            finish_reason: None,
            extra: Extra::new(),
        }],
        ..ChatChunk::default()
    }
}

#[tokio::test(start_paused = true)]
async fn a_function_call_round_trip_through_previous_response_id() {
    let mut call = ChatResponse::from_text("m", "");
    call.choices[0].message.content = Some(None);
    call.choices[0].message.tool_calls = Some(vec![llm_tower_core::ToolCall {
        id: "call_1".into(),
        kind: "function".into(),
        function: llm_tower_core::FunctionCall {
            name: "get_weather".into(),
            arguments: r#"{"city":"Paris"}"#.into(),
            extra: Extra::new(),
        },
        extra: Extra::new(),
    }]);
    call.choices[0].finish_reason = Some("tool_calls".into());
    let mock = MockLlm::new("p")
        .then(Step::respond(move |_| {
            Ok(LlmResponse::complete(call.clone()))
        }))
        .then(Step::reply("Sunny in Paris."));
    let app = app(mock.clone());
    let tools = r#"[{"type":"function","name":"get_weather","parameters":{"type":"object","properties":{"city":{"type":"string"}}}}]"#;
    let body = format!(
        r#"{{"model":"m","input":"Weather in Paris?","tools":{tools},"tool_choice":"auto"}}"#
    );
    let v = json_of(
        app.clone()
            .oneshot(post("/v1/responses", "sk-a", &body))
            .await
            .unwrap(),
    )
    .await;
    let fc = &v["output"][0];
    assert_eq!(fc["type"], "function_call");
    assert_eq!(fc["call_id"], "call_1");
    assert_eq!(fc["name"], "get_weather");
    assert_eq!(fc["arguments"], r#"{"city":"Paris"}"#);
    assert_eq!(v["tools"][0]["name"], "get_weather");
    let seen = mock.last_request().unwrap();
    assert_eq!(
        seen.tools.as_ref().unwrap()[0]
            .function
            .as_ref()
            .unwrap()
            .name,
        "get_weather"
    );

    let next = format!(
        r#"{{"model":"m","previous_response_id":"{}","tools":{tools},
            "input":[{{"type":"function_call_output","call_id":"call_1","output":"sunny"}}]}}"#,
        v["id"].as_str().unwrap()
    );
    let v2 = json_of(
        app.oneshot(post("/v1/responses", "sk-a", &next))
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(v2["output"][0]["content"][0]["text"], "Sunny in Paris.");
    let seen = mock.last_request().unwrap();
    assert_eq!(seen.messages.len(), 3);
    assert_eq!(
        seen.messages[1].tool_calls.as_ref().unwrap()[0].id,
        "call_1"
    );
    assert_eq!(seen.messages[2].role, Role::Tool);
    assert_eq!(seen.messages[2].tool_call_id.as_deref(), Some("call_1"));
}

#[tokio::test(start_paused = true)]
async fn a_streamed_function_call_has_argument_events() {
    let mock = MockLlm::new("p").then(Step::respond(|_| {
        let chunks = vec![
            Ok(tool_chunk(Some("call_9"), "")),
            Ok(tool_chunk(None, r#"{"city":"#)),
            Ok(tool_chunk(None, r#""Oslo"}"#)),
        ];
        Ok(LlmResponse::stream(futures_util::stream::iter(chunks)))
    }));
    let app = app(mock);
    let resp = app
        .oneshot(post(
            "/v1/responses",
            "sk-a",
            r#"{"model":"m","input":"x","stream":true}"#,
        ))
        .await
        .unwrap();
    let evs = events(&text(resp).await);
    let names: Vec<&str> = evs.iter().map(|(n, _)| n.as_str()).collect();
    assert!(
        names.contains(&"response.function_call_arguments.delta"),
        "{names:?}"
    );
    let done = evs
        .iter()
        .find(|(n, _)| n == "response.function_call_arguments.done")
        .unwrap();
    assert_eq!(done.1["arguments"], r#"{"city":"Oslo"}"#);
    let completed = &evs.last().unwrap().1["response"];
    assert_eq!(completed["output"][0]["call_id"], "call_9");
}

#[tokio::test(start_paused = true)]
async fn errors_are_in_openai_format() {
    let mock = MockLlm::new("p").then(Step::error(LlmError::rate_limited("slow down")));
    let app = app(mock);
    // Malformed: 400 naming the field.
    let resp = app
        .clone()
        .oneshot(post("/v1/responses", "sk-a", r#"{"model":"m"}"#))
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    let e = json_of(resp).await;
    assert_eq!(e["error"]["param"], "input");
    // The upstream's error, with its status.
    let resp = app
        .clone()
        .oneshot(post(
            "/v1/responses",
            "sk-a",
            r#"{"model":"m","input":"x"}"#,
        ))
        .await
        .unwrap();
    assert_eq!(resp.status(), 429);
    assert_eq!(json_of(resp).await["error"]["type"], "rate_limit_error");
    // No key: 401 in OpenAI's format.
    let resp = app
        .oneshot(post(
            "/v1/responses",
            "sk-wrong",
            r#"{"model":"m","input":"x"}"#,
        ))
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);
}
