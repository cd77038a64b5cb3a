//! The validate layer with the scripted mock.
#![cfg(feature = "validate")]

use std::time::Duration;

use futures_util::StreamExt;
use llm_tower::validate::{Rule, ValidateLayer};
use llm_tower::{
    ChatRequest, ErrorKind, JsonSchemaFormat, LlmError, Message, ResponseBody, ResponseFormat,
};
use llm_tower_test::{MockLlm, Step};
use serde_json::json;
use tower::{Layer, ServiceExt};

fn req(task: &str) -> ChatRequest {
    ChatRequest::new("m", vec![Message::user("give me json")]).with_task_type(task)
}

fn schema() -> serde_json::Value {
    json!({
        "type": "object",
        "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
        "required": ["name", "age"]
    })
}

fn last_message(mock: &MockLlm) -> String {
    mock.last_request().unwrap().messages.last().unwrap().text()
}

#[tokio::test(start_paused = true)]
async fn valid_output_passes_without_retry() {
    let mock = MockLlm::new("m").then(Step::reply(r#"{"a": 1}"#));
    let layer = ValidateLayer::new().task("extract", Rule::json());
    let stats = layer.stats();
    let resp = layer
        .layer(mock.clone())
        .oneshot(req("extract"))
        .await
        .unwrap();
    assert_eq!(resp.into_complete().await.unwrap().text(), r#"{"a": 1}"#);
    assert_eq!(mock.calls(), 1);
    assert!(stats.snapshot().is_empty());
}

#[tokio::test(start_paused = true)]
async fn invalid_json_fixed_by_the_retry() {
    let mock = MockLlm::new("m")
        .then(Step::reply("Sure! here it is: {a: 1"))
        .then(Step::reply(r#"{"a": 1}"#));
    let layer = ValidateLayer::new().task("extract", Rule::json());
    let stats = layer.stats();
    let resp = layer
        .layer(mock.clone())
        .oneshot(req("extract"))
        .await
        .unwrap();
    assert_eq!(resp.into_complete().await.unwrap().text(), r#"{"a": 1}"#);
    assert_eq!(mock.calls(), 2);
    let reminder = last_message(&mock);
    assert!(
        reminder
            .starts_with("IMPORTANT: Output ONLY valid JSON. The previous answer failed because: "),
        "{reminder}"
    );
    assert!(reminder.contains("not valid JSON"), "{reminder}");
    // The retry keeps the original conversation.
    assert_eq!(
        mock.last_request().unwrap().messages[0].text(),
        "give me json"
    );
    let c = stats.get("extract").unwrap();
    assert_eq!((c.failures, c.retries, c.fixed, c.exhausted), (1, 1, 1, 0));
}

#[tokio::test(start_paused = true)]
async fn not_fixed_gives_invalid_output_with_the_last_output() {
    let mock = MockLlm::new("m")
        .then(Step::reply("nope"))
        .then(Step::reply("still nope"));
    let layer = ValidateLayer::new().task("extract", Rule::json());
    let stats = layer.stats();
    let e = layer
        .layer(mock.clone())
        .oneshot(req("extract"))
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidOutput);
    assert_eq!(e.output(), Some("still nope"));
    assert!(e.message().contains("not valid JSON"), "{e}");
    assert_eq!(mock.calls(), 2);
    let c = stats.get("extract").unwrap();
    assert_eq!((c.failures, c.retries, c.fixed, c.exhausted), (2, 1, 0, 1));
}

#[tokio::test(start_paused = true)]
async fn retry_count_is_configurable() {
    let mock = MockLlm::new("m").otherwise(Step::reply("prose"));
    let svc = ValidateLayer::new()
        .task("extract", Rule::json())
        .retries(3)
        .layer(mock.clone());
    svc.oneshot(req("extract")).await.unwrap_err();
    assert_eq!(mock.calls(), 4);

    let mock = MockLlm::new("m").otherwise(Step::reply("prose"));
    let svc = ValidateLayer::new()
        .task("extract", Rule::json())
        .retries(0)
        .layer(mock.clone());
    svc.oneshot(req("extract")).await.unwrap_err();
    assert_eq!(mock.calls(), 1);
}

#[tokio::test(start_paused = true)]
async fn json_schema_rule_names_the_violation() {
    let mock = MockLlm::new("m")
        .then(Step::reply(r#"{"name": "Ada"}"#))
        .then(Step::reply(r#"{"name": "Ada", "age": 36}"#));
    let svc = ValidateLayer::new()
        .task("person", Rule::json_schema(&schema()).unwrap())
        .layer(mock.clone());
    let resp = svc.oneshot(req("person")).await.unwrap();
    assert!(resp.into_complete().await.unwrap().text().contains("36"));
    let reminder = last_message(&mock);
    assert!(reminder.contains("JSON Schema"), "{reminder}");
    assert!(reminder.contains("age"), "{reminder}");
}

#[test]
fn invalid_configured_schema_is_rejected_at_build() {
    let e = Rule::json_schema(&json!({"type": 12})).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::BadRequest);
}

fn with_response_format(mut r: ChatRequest, schema: serde_json::Value) -> ChatRequest {
    r.response_format = Some(ResponseFormat {
        kind: "json_schema".into(),
        json_schema: Some(JsonSchemaFormat {
            name: "person".into(),
            schema: Some(schema),
            strict: Some(true),
            extra: Default::default(),
        }),
        extra: Default::default(),
    });
    r
}

#[tokio::test(start_paused = true)]
async fn request_response_format_schema_is_enforced_and_cached() {
    let mock = MockLlm::new("m")
        .then(Step::reply(r#"{"name": 1, "age": 2}"#))
        .then(Step::reply(r#"{"name": "x", "age": 2}"#))
        .then(Step::reply(r#"{"name": "y", "age": 3}"#));
    let layer = ValidateLayer::new();
    let stats = layer.stats();
    let svc = layer.layer(mock.clone());
    // No task rule: the request's own schema applies.
    let r = ChatRequest::new("m", vec![Message::user("x")]);
    let resp = svc
        .clone()
        .oneshot(with_response_format(r.clone(), schema()))
        .await
        .unwrap();
    assert!(resp.into_complete().await.unwrap().text().contains("\"x\""));
    assert!(
        last_message(&mock).contains("/name"),
        "{}",
        last_message(&mock)
    );
    assert_eq!(stats.get("default").unwrap().fixed, 1);
    // Same schema again: served from the cache (same outcome).
    svc.oneshot(with_response_format(r, schema()))
        .await
        .unwrap();
    assert_eq!(mock.calls(), 3);
}

#[tokio::test(start_paused = true)]
async fn invalid_request_schema_is_a_bad_request_before_any_call() {
    let mock = MockLlm::new("m");
    let svc = ValidateLayer::new().layer(mock.clone());
    let r = with_response_format(ChatRequest::new("m", vec![]), json!({"type": "nonsense"}));
    let e = svc.oneshot(r).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::BadRequest);
    assert_eq!(e.param(), Some("response_format"));
    assert_eq!(mock.calls(), 0);
}

#[tokio::test(start_paused = true)]
async fn custom_function_rule_with_reminder() {
    let mock = MockLlm::new("m")
        .then(Step::reply("a very long answer indeed"))
        .then(Step::reply("short"));
    let rule = Rule::custom(|out: &str| {
        if out.len() <= 10 {
            Ok(())
        } else {
            Err(format!(
                "the answer has {} characters, at most 10 are allowed",
                out.len()
            ))
        }
    })
    .with_reminder("IMPORTANT: Answer in at most 10 characters.");
    let svc = ValidateLayer::new().default_rule(rule).layer(mock.clone());
    let resp = svc
        .oneshot(ChatRequest::new("m", vec![Message::user("x")]))
        .await
        .unwrap();
    assert_eq!(resp.into_complete().await.unwrap().text(), "short");
    assert_eq!(
        last_message(&mock),
        "IMPORTANT: Answer in at most 10 characters. The previous answer failed because: \
         the answer has 25 characters, at most 10 are allowed"
    );
}

#[tokio::test(start_paused = true)]
async fn requests_without_rules_pass_through() {
    let mock = MockLlm::new("m").then(Step::reply("prose is fine"));
    let svc = ValidateLayer::new()
        .task("extract", Rule::json())
        .layer(mock.clone());
    let resp = svc.oneshot(req("chat")).await.unwrap();
    assert_eq!(resp.into_complete().await.unwrap().text(), "prose is fine");
}

#[tokio::test(start_paused = true)]
async fn inner_errors_pass_through() {
    let mock = MockLlm::new("m").then(Step::error(LlmError::unavailable("down")));
    let svc = ValidateLayer::new()
        .task("extract", Rule::json())
        .layer(mock.clone());
    let e = svc.oneshot(req("extract")).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Unavailable);
    assert_eq!(mock.calls(), 1);
}

#[tokio::test(start_paused = true)]
async fn streams_are_validated_before_release_and_replayed() {
    let mock = MockLlm::new("m")
        .then(Step::stream(["{\"a\"", ": oops"]).chunk_delay(Duration::from_millis(5)))
        .then(Step::stream(["{\"a\"", ": 1}"]).chunk_delay(Duration::from_millis(5)));
    let svc = ValidateLayer::new()
        .task("extract", Rule::json())
        .layer(mock.clone());
    let mut r = req("extract");
    r.stream = Some(true);
    let resp = svc.oneshot(r).await.unwrap();
    // By the time the caller has the stream, both upstream calls happened.
    assert_eq!(mock.calls(), 2);
    let ResponseBody::Stream(mut s) = resp.body else {
        panic!("a streamed request gets a stream back");
    };
    let mut text = String::new();
    let mut usage = false;
    while let Some(item) = s.next().await {
        let c = item.unwrap();
        usage |= c.usage().is_some();
        text.push_str(c.choices.first().and_then(|c| c.delta.text()).unwrap_or(""));
    }
    assert_eq!(text, "{\"a\": 1}");
    assert!(usage, "the replay keeps the usage chunk");
}

#[tokio::test(start_paused = true)]
async fn stream_error_is_passed_through() {
    let mock = MockLlm::new("m")
        .then(Step::stream(["{", "}"]).fail_after(1, LlmError::transport("reset")));
    let svc = ValidateLayer::new()
        .task("extract", Rule::json())
        .layer(mock.clone());
    let mut r = req("extract");
    r.stream = Some(true);
    let e = svc.oneshot(r).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Transport);
}

#[test]
fn rule_check_is_public() {
    assert!(Rule::json().check("[1, 2]").is_ok());
    assert!(Rule::json().check("[1, 2").is_err());
    let r = Rule::json_schema(&schema()).unwrap();
    assert!(r.check(r#"{"name": "a", "age": 1}"#).is_ok());
    let e = r.check(r#"{"name": "a", "age": "one"}"#).unwrap_err();
    assert!(e.contains("/age"), "{e}");
}

fn encoded(content: &str) -> Step {
    let json = serde_json::to_vec(&json!({
        "id": "c", "model": "m",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}]
    }))
    .unwrap();
    Step::respond(move |_| {
        let body = llm_tower::EncodedResponse::from_json(json.clone().into())
            .map_err(|e| LlmError::transport(e.to_string()))?;
        Ok(llm_tower::LlmResponse::encoded(body))
    })
}

#[tokio::test(start_paused = true)]
async fn answers_kept_as_json_are_checked_and_passed_on_unchanged() {
    let mock = MockLlm::new("m")
        .then(encoded("not json"))
        .then(encoded(r#"{"a": 1}"#));
    let layer = ValidateLayer::new().task("extract", Rule::json());
    let resp = layer
        .layer(mock.clone())
        .oneshot(req("extract"))
        .await
        .unwrap();
    assert_eq!(mock.calls(), 2, "the invalid first answer was retried");
    let ResponseBody::Encoded(body) = &resp.body else {
        panic!("expected the encoded body, got {:?}", resp.body);
    };
    assert_eq!(body.decode().unwrap().text(), r#"{"a": 1}"#);
}

// ===== tool calls and stream limits =====

fn weather_tool() -> llm_tower::Tool {
    llm_tower::Tool {
        kind: "function".into(),
        function: Some(llm_tower::FunctionDef {
            name: "get_weather".into(),
            description: None,
            parameters: Some(json!({
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"],
                "additionalProperties": false
            })),
            extra: Default::default(),
        }),
        extra: Default::default(),
    }
}

/// A step answering with one call of `get_weather` with these arguments, and no text.
fn tool_call(args: &'static str) -> Step {
    Step::respond(move |req| {
        let mut resp = llm_tower::ChatResponse::from_text(req.model.clone(), "");
        resp.choices[0].message.content = None;
        resp.choices[0].message.tool_calls = Some(vec![llm_tower::ToolCall {
            id: "call_1".into(),
            kind: "function".into(),
            function: llm_tower::FunctionCall {
                name: "get_weather".into(),
                arguments: args.into(),
                extra: Default::default(),
            },
            extra: Default::default(),
        }]);
        Ok(llm_tower::LlmResponse::complete(resp))
    })
}

fn tool_req() -> ChatRequest {
    // A response_format for the text answer, and a tool with its own schema.
    let mut r = with_response_format(
        ChatRequest::new("m", vec![Message::user("weather in Paris?")]),
        schema(),
    );
    r.tools = Some(vec![weather_tool()]);
    r
}

#[tokio::test(start_paused = true)]
async fn a_valid_tool_call_passes_even_with_a_response_format() {
    let mock = MockLlm::new("m").then(tool_call(r#"{"city": "Paris"}"#));
    let layer = ValidateLayer::new();
    let stats = layer.stats();
    let resp = layer.layer(mock.clone()).oneshot(tool_req()).await.unwrap();
    let r = resp.into_complete().await.unwrap();
    let calls = r.choices[0].message.tool_calls.as_ref().unwrap();
    assert_eq!(calls[0].function.arguments, r#"{"city": "Paris"}"#);
    assert_eq!(mock.calls(), 1, "a valid tool call is not retried");
    assert!(stats.snapshot().is_empty(), "{stats:?}");
}

#[tokio::test(start_paused = true)]
async fn a_tool_call_not_matching_its_tools_schema_is_retried_once_with_a_reminder() {
    let mock = MockLlm::new("m")
        .then(tool_call(r#"{"town": 75}"#))
        .then(tool_call(r#"{"city": "Paris"}"#));
    let layer = ValidateLayer::new();
    let stats = layer.stats();
    let resp = layer.layer(mock.clone()).oneshot(tool_req()).await.unwrap();
    let r = resp.into_complete().await.unwrap();
    assert_eq!(
        r.choices[0].message.tool_calls.as_ref().unwrap()[0]
            .function
            .arguments,
        r#"{"city": "Paris"}"#
    );
    assert_eq!(mock.calls(), 2);
    let reminder = last_message(&mock);
    assert!(
        reminder.starts_with("IMPORTANT: Call tools only with arguments that match"),
        "{reminder}"
    );
    assert!(reminder.contains("`get_weather`"), "{reminder}");
    assert!(reminder.contains("city"), "{reminder}");
    let c = stats.get("default").unwrap();
    assert_eq!((c.failures, c.retries, c.fixed, c.exhausted), (1, 1, 1, 0));
}

#[tokio::test(start_paused = true)]
async fn tool_arguments_that_are_not_json_fail_and_can_be_left_unchecked() {
    let mock = MockLlm::new("m").otherwise(tool_call("city=Paris"));
    let e = ValidateLayer::new()
        .layer(mock.clone())
        .oneshot(tool_req())
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidOutput);
    assert!(e.message().contains("not valid JSON"), "{e}");
    assert_eq!(mock.calls(), 2);
    // Turned off: the tool call passes (the response_format is for text answers).
    let resp = ValidateLayer::new()
        .check_tool_arguments(false)
        .layer(mock.clone())
        .oneshot(tool_req())
        .await
        .unwrap();
    assert!(resp.into_complete().await.is_ok());
    assert_eq!(mock.calls(), 3);
}

#[tokio::test(start_paused = true)]
async fn a_stream_past_the_buffer_cap_fails_clearly_without_a_retry() {
    let mock = MockLlm::new("m").otherwise(Step::stream(vec!["{\"a\": 1}"; 500]));
    let layer = ValidateLayer::new()
        .task("extract", Rule::json())
        .max_stream_bytes(32 * 1024);
    let stats = layer.stats();
    let mut r = req("extract");
    r.stream = Some(true);
    let e = layer
        .layer(mock.clone())
        .oneshot(r.clone())
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidOutput);
    assert!(
        e.message().contains("larger than the validation buffer"),
        "{e}"
    );
    assert_eq!(mock.calls(), 1, "no retry");
    assert_eq!(stats.get("extract").unwrap().too_large, 1);
}
