//! Fidelity: documents in the shapes of the OpenAI API reference deserialize and serialize
//! back to an equal JSON value; malformed input is a bad-request error, never a panic.

use llm_tower_core::{ChatChunk, ChatRequest, ChatResponse, Content, ContentPart, ErrorKind, Role};
use proptest::prelude::*;
use serde_json::{Map, Value, json};

const CORPUS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/corpus");

fn read(name: &str) -> String {
    std::fs::read_to_string(format!("{CORPUS}/{name}")).expect("corpus file")
}

fn roundtrip<T: serde::de::DeserializeOwned + serde::Serialize>(doc: &str) -> (Value, Value) {
    let original: Value = serde_json::from_str(doc).expect("corpus is valid JSON");
    let typed: T = serde_json::from_str(doc).expect("corpus parses into the typed form");
    let back = serde_json::to_value(&typed).expect("serializes");
    (original, back)
}

#[test]
fn request_corpus_round_trips() {
    for name in [
        "request_tools.json",
        "request_json_schema.json",
        "request_multimodal.json",
        "request_stream.json",
    ] {
        let (original, back) = roundtrip::<ChatRequest>(&read(name));
        assert_eq!(original, back, "{name} changed in the round trip");
        // The strict entry point accepts them too.
        ChatRequest::from_slice(read(name).as_bytes()).expect(name);
    }
}

#[test]
fn response_corpus_round_trips() {
    for name in [
        "response_basic.json",
        "response_tool_calls.json",
        "response_logprobs_audio.json",
    ] {
        let (original, back) = roundtrip::<ChatResponse>(&read(name));
        assert_eq!(original, back, "{name} changed in the round trip");
    }
}

#[test]
fn chunk_corpus_round_trips() {
    for (i, line) in read("chunks.jsonl").lines().enumerate() {
        let (original, back) = roundtrip::<ChatChunk>(line);
        assert_eq!(
            original,
            back,
            "chunk line {} changed in the round trip",
            i + 1
        );
    }
}

#[test]
fn typed_fields_are_read() {
    let req = ChatRequest::from_slice(read("request_multimodal.json").as_bytes()).unwrap();
    let Some(Content::Parts(parts)) = req.messages[0].content() else {
        panic!("multi-part content expected");
    };
    let kinds: Vec<&str> = parts.iter().map(ContentPart::kind).collect();
    assert_eq!(
        kinds,
        [
            "text",
            "image_url",
            "image_url",
            "input_audio",
            "file",
            "video_url"
        ]
    );
    assert!(
        matches!(&parts[1], ContentPart::ImageUrl { image_url, .. } if image_url.detail.as_deref() == Some("high"))
    );
    assert_eq!(req.messages[2].role, Role::Other("critic".into()));
    assert_eq!(req.max_tokens, Some(300));

    let req = ChatRequest::from_slice(read("request_tools.json").as_bytes()).unwrap();
    assert_eq!(
        req.messages[2].content,
        Some(None),
        "explicit null content is kept"
    );
    assert_eq!(req.messages[2].tool_calls.as_ref().unwrap().len(), 2);
    assert_eq!(
        req.tools.as_ref().unwrap()[0]
            .function
            .as_ref()
            .unwrap()
            .name,
        "get_weather"
    );
    assert_eq!(req.temperature_f64(), Some(0.0));

    let req = ChatRequest::from_slice(read("request_stream.json").as_bytes()).unwrap();
    assert!(req.is_stream());
    assert_eq!(
        req.stream_options.as_ref().unwrap().include_usage,
        Some(true)
    );
    assert!(req.extra.contains_key("some_future_field"));

    let resp: ChatResponse = serde_json::from_str(&read("response_tool_calls.json")).unwrap();
    assert_eq!(resp.usage.as_ref().unwrap().cached_tokens(), 64);
    assert_eq!(resp.choices[0].finish_reason.as_deref(), Some("tool_calls"));
}

#[test]
fn chunks_aggregate_to_the_response_they_describe() {
    let mut acc = llm_tower_core::StreamAccumulator::default();
    for line in read("chunks.jsonl")
        .lines()
        .filter(|l| l.contains("chatcmpl-123"))
    {
        acc.push(&serde_json::from_str::<ChatChunk>(line).unwrap());
    }
    let resp = acc.finish();
    assert_eq!(resp.text(), "Hello there");
    assert_eq!(resp.choices[0].finish_reason.as_deref(), Some("stop"));
    assert_eq!(resp.usage.as_ref().unwrap().total_tokens, 11);

    let mut acc = llm_tower_core::StreamAccumulator::default();
    for line in read("chunks.jsonl")
        .lines()
        .filter(|l| l.contains("chatcmpl-456"))
    {
        acc.push(&serde_json::from_str::<ChatChunk>(line).unwrap());
    }
    let resp = acc.finish();
    let calls = resp.choices[0].message.tool_calls.as_ref().unwrap();
    assert_eq!(calls.len(), 2);
    assert_eq!(calls[0].function.arguments, "{\"location\":");
    assert_eq!(calls[1].function.name, "get_time");
    assert_eq!(resp.choices[0].message.content, Some(None));
}

#[test]
fn complete_response_replays_as_chunks_and_back() {
    let resp: ChatResponse = serde_json::from_str(&read("response_tool_calls.json")).unwrap();
    let mut acc = llm_tower_core::StreamAccumulator::default();
    for c in resp.to_chunks() {
        acc.push(&c);
    }
    let again = acc.finish();
    assert_eq!(
        again.choices[0].message.tool_calls,
        resp.choices[0].message.tool_calls
    );
    assert_eq!(again.usage, resp.usage);
    assert_eq!(
        again.choices[0].finish_reason,
        resp.choices[0].finish_reason
    );
}

fn bad(body: &[u8]) -> llm_tower_core::LlmError {
    let err = ChatRequest::from_slice(body).expect_err("must be rejected");
    assert_eq!(err.kind(), ErrorKind::BadRequest, "{err}");
    assert_eq!(err.status(), 400);
    assert_eq!(
        err.to_openai_json()["error"]["type"],
        "invalid_request_error"
    );
    err
}

#[test]
fn malformed_requests_are_bad_requests() {
    let e = bad(br#"{"model": 5, "messages": []}"#);
    assert!(e.message().contains("model"), "{e}");
    let e = bad(br#"{"messages": [{"role": "user", "content": "x"}]}"#);
    assert!(e.message().contains("model"), "{e}");
    let e = bad(br#"{"model": "m"}"#);
    assert!(e.message().contains("messages"), "{e}");
    let e = bad(br#"{"model": "m", "messages": []}"#);
    assert_eq!(e.param(), Some("messages"));
    let e = bad(br#"{"model": "m", "messages": [{"role": "user", "content": 42}]}"#);
    assert!(e.message().contains("messages[0]"), "{e}");
    let e = bad(br#"{"model": "m", "messages": [{"role": 5}]}"#);
    assert!(e.message().contains("messages[0].role"), "{e}");
    assert!(e.message().contains("expected a string"), "{e}");
    let e = bad(br#"{"model": "m", "model": "n", "messages": [{"role": "user"}]}"#);
    assert!(e.message().contains("duplicate field `model`"), "{e}");
    let e =
        bad(br#"{"model": "m", "messages": [{"role": "user", "content": [{"text": "no type"}]}]}"#);
    assert!(e.message().contains("type"), "{e}");
    let e = bad(
        br#"{"model": "m", "messages": [{"role": "user", "content": "x"}], "temperature": "hot"}"#,
    );
    assert!(e.message().contains("temperature"), "{e}");
    let e =
        bad(br#"{"model": "m", "messages": [{"role": "user", "content": "x"}], "max_tokens": -1}"#);
    assert!(e.message().contains("max_tokens"), "{e}");
    bad(b"{not json");
    bad(b"");
    bad(b"[]");
    bad(b"null");
    bad("\u{feff}{}".as_bytes());
}

#[test]
fn huge_inputs_are_handled() {
    // 10 MB of garbage: a clear error, not a panic.
    let garbage = vec![b'x'; 10 * 1024 * 1024];
    bad(&garbage);
    // A 10 MB string inside a valid request is accepted (it is under the limit).
    let big = "y".repeat(10 * 1024 * 1024);
    let body =
        serde_json::to_vec(&json!({"model": "m", "messages": [{"role": "user", "content": big}]}))
            .unwrap();
    let req = ChatRequest::from_slice(&body).unwrap();
    assert_eq!(req.prompt_text_len(), 10 * 1024 * 1024);
    // Past the hard limit: refused before parsing.
    let too_big = vec![b' '; llm_tower_core::MAX_REQUEST_BYTES + 1];
    let e = bad(&too_big);
    assert!(e.message().contains("exceeds"), "{e}");
    // Deep nesting in an unknown field: serde_json's recursion limit, not a stack overflow.
    let deep = format!(
        r#"{{"model":"m","messages":[{{"role":"user","content":"x"}}],"x":{}{}}}"#,
        "[".repeat(100_000),
        "]".repeat(100_000)
    );
    bad(deep.as_bytes());
}

fn json_leaf() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        (-1e12f64..1e12).prop_map(Value::from),
        "[ -~]{0,12}".prop_map(Value::from),
        "\\PC{0,6}".prop_map(Value::from),
    ]
}

fn json_value() -> impl Strategy<Value = Value> {
    json_leaf().prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::from),
            prop::collection::btree_map("[a-z_]{1,6}", inner, 0..4)
                .prop_map(|m| Value::Object(m.into_iter().collect::<Map<_, _>>())),
        ]
    })
}

/// Extra keys never collide with typed fields: they all start with `x_`.
fn extras() -> impl Strategy<Value = Map<String, Value>> {
    prop::collection::btree_map("x_[a-z0-9_]{1,8}", json_value(), 0..5)
        .prop_map(|m| m.into_iter().collect())
}

fn with_extras(mut base: Value, extra: &Map<String, Value>) -> Value {
    let obj = base.as_object_mut().unwrap();
    for (k, v) in extra {
        obj.insert(k.clone(), v.clone());
    }
    base
}

/// Parses the printed document (so both sides read the same float text) and compares.
fn assert_round_trip<T: serde::de::DeserializeOwned + serde::Serialize>(doc: &Value) {
    let text = serde_json::to_string(doc).unwrap();
    let original: Value = serde_json::from_str(&text).unwrap();
    let typed: T = serde_json::from_str(&text).unwrap();
    assert_eq!(serde_json::to_value(&typed).unwrap(), original);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn requests_with_any_extra_fields_round_trip(top in extras(), msg in extras(), part in extras()) {
        let message = with_extras(json!({"role": "user", "content": [with_extras(json!({"type": "text", "text": "hi"}), &part)]}), &msg);
        let doc = with_extras(json!({"model": "m", "messages": [message], "temperature": 0.7}), &top);
        assert_round_trip::<ChatRequest>(&doc);
    }

    #[test]
    fn responses_and_chunks_with_any_extra_fields_round_trip(top in extras(), choice in extras(), usage in extras()) {
        let doc = with_extras(json!({
            "id": "c", "object": "chat.completion", "created": 1, "model": "m",
            "choices": [with_extras(json!({"index": 0, "message": {"role": "assistant", "content": "x"}, "finish_reason": "stop"}), &choice)],
            "usage": with_extras(json!({"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}), &usage)
        }), &top);
        assert_round_trip::<ChatResponse>(&doc);

        let chunk = with_extras(json!({
            "id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m",
            "choices": [with_extras(json!({"index": 0, "delta": {"content": "x"}, "finish_reason": null}), &choice)],
            "usage": null
        }), &top);
        assert_round_trip::<ChatChunk>(&chunk);
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        let _ = ChatRequest::from_slice(&bytes);
    }

    #[test]
    fn arbitrary_json_never_panics(v in json_value()) {
        let _ = ChatRequest::from_slice(&serde_json::to_vec(&v).unwrap());
        let _ = ChatRequest::from_slice(&serde_json::to_vec(&json!({"model": "m", "messages": [v]})).unwrap());
    }
}
