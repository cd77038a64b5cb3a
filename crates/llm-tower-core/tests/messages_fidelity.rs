//! Wire fidelity of the Anthropic Messages dialect: requests in the shapes of Anthropic's
//! API reference reach a Messages upstream equal as JSON values (only `model` rewritten);
//! Messages answers are kept byte for byte; translations both ways keep what both
//! dialects can say; malformed input is a bad request naming the field, never a panic.

use bytes::Bytes;
use llm_tower_core::dialect::messages::{
    self, EventEncoder, request_from_slice, response_from_json, response_to_json,
};
use llm_tower_core::{
    ChatChunk, ChatResponse, Content, ContentPart, Dialect, EncodedResponse, ErrorKind,
    NativeRequest, Role,
};
use proptest::prelude::*;
use serde_json::{Value, json};

const CORPUS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/corpus/messages");

fn read(name: &str) -> String {
    std::fs::read_to_string(format!("{CORPUS}/{name}")).expect("corpus file")
}

const REQUESTS: [&str; 3] = [
    "request_basic.json",
    "request_tools.json",
    "request_thinking.json",
];

#[test]
fn requests_reach_a_messages_upstream_as_sent() {
    for name in REQUESTS {
        let doc = read(name);
        let view = request_from_slice(doc.as_bytes()).expect(name);
        let native = view.extensions.get::<NativeRequest>().expect(name);
        assert_eq!(native.dialect(), Dialect::Messages);
        let original: Value = serde_json::from_str(&doc).unwrap();
        // As sent, and with the routed model.
        let same: Value =
            serde_json::from_slice(&native.body_for(&view, &view.model, &[]).unwrap()).unwrap();
        assert_eq!(same, original, "{name} changed on its way");
        let routed: Value =
            serde_json::from_slice(&native.body_for(&view, "claude-x", &[]).unwrap()).unwrap();
        let mut want = original.clone();
        want["model"] = "claude-x".into();
        assert_eq!(routed, want, "{name}: only the model may change");
    }
}

#[test]
fn views_say_what_a_chat_provider_would_be_missing() {
    let basic = request_from_slice(read("request_basic.json").as_bytes()).unwrap();
    let err = basic
        .extensions
        .get::<NativeRequest>()
        .unwrap()
        .check_translatable()
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::BadRequest);
    assert_eq!(err.param(), Some("top_k"), "{err}");
    assert_eq!(basic.messages[0].role, Role::System);
    assert_eq!(
        basic.user.as_deref(),
        Some("13803d75-b4b5-4c3e-b2a2-6f21399b021b")
    );
    assert_eq!(basic.extra["stop"], json!(["\n\nHuman:"]));
    assert_eq!(basic.max_tokens, Some(1024));
    // Unknown fields stay in the view, so a cache tells such requests apart.
    assert!(basic.extra.contains_key("x_future_field"));

    let tools = request_from_slice(read("request_tools.json").as_bytes()).unwrap();
    tools
        .extensions
        .get::<NativeRequest>()
        .unwrap()
        .check_translatable()
        .expect("everything in request_tools.json has a chat equivalent");
    let roles: Vec<&str> = tools.messages.iter().map(|m| m.role.as_str()).collect();
    assert_eq!(
        roles,
        [
            "system",
            "user",
            "assistant",
            "tool",
            "user",
            "assistant",
            "tool"
        ]
    );
    let Some(Content::Parts(parts)) = tools.messages[1].content() else {
        panic!("parts expected");
    };
    let urls: Vec<&str> = parts
        .iter()
        .filter_map(|p| match p {
            ContentPart::ImageUrl { image_url, .. } => Some(image_url.url.as_str()),
            _ => None,
        })
        .collect();
    assert!(urls[0].starts_with("data:image/png;base64,iVBOR"));
    assert_eq!(urls[1], "https://example.com/photo.jpg");
    let call = &tools.messages[2].tool_calls.as_ref().unwrap()[0];
    assert_eq!(call.id, "toolu_01A09q90qw90lq917835lq9");
    let args: Value = serde_json::from_str(&call.function.arguments).unwrap();
    assert_eq!(
        args,
        json!({"location": "Paris, France", "unit": "celsius"})
    );
    assert_eq!(
        tools.messages[3].tool_call_id.as_deref(),
        Some(call.id.as_str())
    );
    assert_eq!(tools.messages[3].text(), "15 degrees, cloudy");
    assert_eq!(tools.messages[6].text(), "Error: service down");
    assert_eq!(tools.extra["parallel_tool_calls"], false);
    assert_eq!(tools.tool_choice, Some(json!("auto")));
    assert_eq!(
        tools.stream_options.as_ref().unwrap().include_usage,
        Some(true)
    );
    let tool = &tools.tools.as_ref().unwrap()[0];
    assert_eq!(tool.function.as_ref().unwrap().name, "get_weather");
    // The chat view serializes as a plain chat request (no Anthropic-only keys).
    let as_chat = serde_json::to_value(&tools).unwrap();
    assert!(!as_chat.to_string().contains("cache_control"), "{as_chat}");

    let thinking = request_from_slice(read("request_thinking.json").as_bytes()).unwrap();
    let err = thinking
        .extensions
        .get::<NativeRequest>()
        .unwrap()
        .check_translatable()
        .unwrap_err();
    assert!(err.message().contains("untranslatable") || err.code() == Some("untranslatable_field"));
    // Thinking blocks and signatures stay in the view as they were.
    let Some(Content::Parts(parts)) = thinking.messages[1].content() else {
        panic!("parts expected");
    };
    assert!(
        matches!(&parts[0], ContentPart::Other(o) if o["signature"] == "EqQBCgIYAhIM1gbcDa9GJwZA2b3hGgxBdjrkzLoky3dl1pkiMOYds")
    );
}

#[test]
fn answers_are_kept_byte_for_byte() {
    for name in ["response_text.json", "response_tool_use.json"] {
        let doc = read(name).trim_end().to_owned();
        let enc = EncodedResponse::from_messages_json(Bytes::from(doc.clone())).expect(name);
        assert_eq!(enc.json().as_ref(), doc.as_bytes());
        assert_eq!(enc.dialect(), Dialect::Messages);
        // Stored by a cache as its JSON, read back as what it was.
        let text = serde_json::to_string(&enc).unwrap();
        let back: EncodedResponse = serde_json::from_str(&text).unwrap();
        assert_eq!(back, enc);
    }
    let enc = EncodedResponse::from_messages_json(Bytes::from(read("response_text.json"))).unwrap();
    let u = enc.usage().unwrap();
    assert_eq!(
        (u.prompt_tokens, u.completion_tokens, u.cached_tokens()),
        (4195, 503, 2000)
    );
    assert_eq!(enc.model(), "claude-sonnet-4-5-20250929");
}

#[test]
fn answers_translate_both_ways() {
    for name in ["response_text.json", "response_tool_use.json"] {
        let original: Value = serde_json::from_str(&read(name)).unwrap();
        let chat = response_from_json(&original).unwrap();
        let back = response_to_json(&chat);
        for key in ["type", "role", "model", "stop_reason"] {
            assert_eq!(back[key], original[key], "{name}: {key}");
        }
        let u = &original["usage"];
        for key in ["input_tokens", "output_tokens"] {
            assert_eq!(back["usage"][key], u[key], "{name}: usage.{key}");
        }
        // Every text, thinking and tool_use block, in order (signatures are Anthropic's own
        // and cannot survive a chat answer).
        let strip = |v: &Value| -> Vec<Value> {
            v["content"]
                .as_array()
                .unwrap()
                .iter()
                .map(|b| {
                    let mut b = b.clone();
                    b.as_object_mut().unwrap().remove("signature");
                    b
                })
                .collect()
        };
        assert_eq!(strip(&back), strip(&original), "{name}: content");
    }
    // A chat answer with a tool call whose arguments are not an object.
    let mut r = ChatResponse::from_text("m", "");
    r.choices[0].message.content = Some(None);
    r.choices[0].message.tool_calls = Some(vec![llm_tower_core::ToolCall {
        id: "c".into(),
        kind: "function".into(),
        function: llm_tower_core::FunctionCall {
            name: "f".into(),
            arguments: "not json".into(),
            extra: Default::default(),
        },
        extra: Default::default(),
    }]);
    r.choices[0].finish_reason = Some("tool_calls".into());
    let v = response_to_json(&r);
    assert_eq!(v["content"][0]["input"], json!({"arguments": "not json"}));
    assert_eq!(v["stop_reason"], "tool_use");
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

#[test]
fn chat_chunks_become_a_well_formed_event_stream() {
    // The chat corpus stream: role, text, a tool call in pieces, finish, usage.
    let chunks = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/corpus/chunks.jsonl"
    ))
    .unwrap();
    let mut enc = EventEncoder::new();
    let mut out = Vec::new();
    for line in chunks.lines() {
        enc.push(&ChatChunk::from_slice(line.as_bytes()).unwrap(), &mut out);
    }
    enc.finish(&mut out);
    let evs = events(std::str::from_utf8(&out).unwrap());
    let names: Vec<&str> = evs.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names[0], "message_start");
    assert_eq!(names[1], "ping");
    assert_eq!(names[names.len() - 2..], ["message_delta", "message_stop"]);
    // Every event's name is its data's type; blocks open and close in order.
    let mut open: Option<u64> = None;
    let mut next = 0;
    for (name, data) in &evs {
        assert_eq!(data["type"], name.as_str());
        match name.as_str() {
            "content_block_start" => {
                assert_eq!(open, None);
                assert_eq!(data["index"], next);
                open = Some(next);
            }
            "content_block_delta" => assert_eq!(data["index"].as_u64(), open),
            "content_block_stop" => {
                assert_eq!(data["index"].as_u64(), open);
                open = None;
                next += 1;
            }
            _ => {}
        }
    }
    assert_eq!(open, None);
}

#[test]
fn an_error_ends_a_stream_in_anthropic_framing() {
    let mut enc = EventEncoder::new();
    let mut out = Vec::new();
    enc.push(&ChatChunk::text("c", "m", "hi"), &mut out);
    enc.error(&llm_tower_core::LlmError::overloaded("busy"), &mut out);
    enc.finish(&mut out);
    enc.push(&ChatChunk::text("c", "m", "late"), &mut out);
    let evs = events(std::str::from_utf8(&out).unwrap());
    let (name, data) = evs.last().unwrap();
    assert_eq!(name, "error");
    assert_eq!(data["error"]["type"], "overloaded_error");
    assert!(!evs.iter().any(|(n, _)| n == "message_stop"));
    assert_eq!(
        evs.iter()
            .filter(|(n, _)| n == "content_block_delta")
            .count(),
        1
    );
}

#[test]
fn native_frames_are_written_as_they_came() {
    let mut enc = EventEncoder::new();
    let mut out = Vec::new();
    let mut c = ChatChunk::text("c", "m", "ignored: the frame is the truth");
    messages::attach_native(
        &mut c,
        messages::native_frame("message_start", r#"{"type":"message_start","message":{}}"#),
    );
    enc.push(&c, &mut out);
    let mut stop = ChatChunk::default();
    messages::attach_native(
        &mut stop,
        messages::native_frame("message_stop", r#"{"type":"message_stop"}"#),
    );
    enc.push(&stop, &mut out);
    enc.finish(&mut out);
    assert_eq!(
        std::str::from_utf8(&out).unwrap(),
        "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{}}\n\n\
         event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n"
    );
}

fn bad(body: &[u8]) -> llm_tower_core::LlmError {
    request_from_slice(body).unwrap_err()
}

#[test]
fn malformed_requests_are_bad_requests_naming_the_field() {
    let cases: [(&[u8], &str); 12] = [
        (b"", ""),
        (b"[]", ""),
        (br#"{"max_tokens":1,"messages":[]}"#, "model"),
        (br#"{"model":"","max_tokens":1,"messages":[]}"#, "model"),
        (br#"{"model":"m","messages":[]}"#, "max_tokens"),
        (br#"{"model":"m","max_tokens":0,"messages":[]}"#, "max_tokens"),
        (br#"{"model":"m","max_tokens":1}"#, "messages"),
        (br#"{"model":"m","max_tokens":1,"messages":[{"role":"system","content":"x"}]}"#, "messages[0].role"),
        (br#"{"model":"m","max_tokens":1,"messages":[{"role":"user","content":[{"type":"text"}]}]}"#, "messages[0].content[0].text"),
        (br#"{"model":"m","max_tokens":1,"messages":[{"role":"user","content":[{"type":"image","source":{"type":"base64"}}]}]}"#, "messages[0].content[0].source.media_type"),
        (br#"{"model":"m","max_tokens":1,"messages":[],"tool_choice":{"type":"sometimes"}}"#, "tool_choice.type"),
        (br#"{"model":"m","max_tokens":1,"messages":[],"system":[{"type":"image"}]}"#, "system[0]"),
    ];
    for (body, param) in cases {
        let e = bad(body);
        assert_eq!(
            e.kind(),
            ErrorKind::BadRequest,
            "{}",
            String::from_utf8_lossy(body)
        );
        if !param.is_empty() {
            assert_eq!(
                e.param(),
                Some(param),
                "{}: {e}",
                String::from_utf8_lossy(body)
            );
        }
    }
}

proptest! {
    /// Any JSON document: a view or a bad request, never a panic; a view's body reaches a
    /// Messages upstream equal as a JSON value.
    #[test]
    fn any_document_parses_or_is_refused(doc in any_json()) {
        let text = doc.to_string();
        if let Ok(view) = request_from_slice(text.as_bytes()) {
            let native = view.extensions.get::<NativeRequest>().unwrap();
            let back: Value = serde_json::from_slice(&native.body_for(&view, &view.model, &[]).unwrap()).unwrap();
            prop_assert_eq!(back, doc);
        }
    }
}

fn any_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i32>().prop_map(Value::from),
        "[a-z ]{0,6}".prop_map(Value::from),
    ];
    let value = leaf.prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::btree_map("(type|text|role|content|x)", inner, 0..4)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    });
    // Mostly requests that get far into the parser.
    (value.clone(), prop::collection::vec(value, 0..3)).prop_map(|(extra, contents)| {
        let messages: Vec<Value> = contents
            .into_iter()
            .map(|c| json!({"role": "user", "content": c}))
            .collect();
        json!({"model": "m", "max_tokens": 8, "messages": messages, "x": extra})
    })
}
