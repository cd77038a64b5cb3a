//! Wire fidelity of the OpenAI Responses dialect: requests in the shapes of OpenAI's API
//! reference reach a Responses upstream equal as JSON values (only `model` rewritten);
//! Responses answers and events are kept byte for byte; translations both ways keep what
//! both dialects can say; what the chat view cannot carry is named.

use bytes::Bytes;
use llm_tower_core::dialect::responses::{
    Echo, EventEncoder, request_from_slice, response_from_json, response_to_json,
};
use llm_tower_core::dialect::{NATIVE_EVENT, messages};
use llm_tower_core::{
    ChatChunk, ChatResponse, Content, Dialect, EncodedResponse, ErrorKind, NativeRequest, Role,
};
use serde_json::{Value, json};

const CORPUS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/corpus/responses");

fn read(name: &str) -> String {
    std::fs::read_to_string(format!("{CORPUS}/{name}")).expect("corpus file")
}

const REQUESTS: [&str; 3] = [
    "request_basic.json",
    "request_items.json",
    "request_hosted.json",
];

#[test]
fn requests_reach_a_responses_upstream_as_sent() {
    for name in REQUESTS {
        let doc = read(name);
        let view = request_from_slice(doc.as_bytes()).expect(name);
        let native = view.extensions.get::<NativeRequest>().expect(name);
        assert_eq!(native.dialect(), Dialect::Responses);
        let original: Value = serde_json::from_str(&doc).unwrap();
        let same: Value =
            serde_json::from_slice(&native.body_for(&view, &view.model, &[]).unwrap()).unwrap();
        assert_eq!(same, original, "{name} changed on its way");
        let routed: Value =
            serde_json::from_slice(&native.body_for(&view, "gpt-x", &[]).unwrap()).unwrap();
        let mut want = original.clone();
        want["model"] = "gpt-x".into();
        assert_eq!(routed, want, "{name}: only the model may change");
    }
}

#[test]
fn a_layers_reminder_is_added_to_the_input() {
    let doc = read("request_basic.json");
    let view = request_from_slice(doc.as_bytes()).unwrap();
    let native = view.extensions.get::<NativeRequest>().unwrap();
    let add = [json!({"role": "user", "content": "Answer in JSON."})];
    let sent: Value = serde_json::from_slice(&native.body_for(&view, "m", &add).unwrap()).unwrap();
    // A string input becomes its user item, followed by the reminder.
    assert_eq!(
        sent["input"],
        json!([
            {"role": "user", "content": "Tell me a three sentence bedtime story about a unicorn."},
            {"role": "user", "content": "Answer in JSON."}
        ])
    );
}

#[test]
fn views_carry_what_chat_can_say_and_name_the_rest() {
    let items = request_from_slice(read("request_items.json").as_bytes()).unwrap();
    let native = items.extensions.get::<NativeRequest>().unwrap();
    assert!(native.check_translatable().is_ok());
    let roles: Vec<Role> = items.messages.iter().map(|m| m.role.clone()).collect();
    assert_eq!(
        roles,
        [Role::Developer, Role::User, Role::Assistant, Role::Tool]
    );
    // The text before the call and the call are one assistant turn.
    let turn = &items.messages[2];
    assert_eq!(turn.text(), "Let me check.");
    assert_eq!(turn.tool_calls.as_ref().unwrap()[0].id, "call_abc");
    match items.messages[1].content.clone().flatten() {
        Some(Content::Parts(parts)) => assert_eq!(parts.len(), 2),
        other => panic!("{other:?}"),
    }
    let format = items.response_format.as_ref().unwrap();
    assert_eq!(format.kind, "json_schema");
    assert_eq!(format.json_schema.as_ref().unwrap().strict, Some(true));
    assert_eq!(items.extra["reasoning_effort"], "low");
    assert_eq!(items.extra["parallel_tool_calls"], false);
    assert!(items.is_stream());

    let hosted = request_from_slice(read("request_hosted.json").as_bytes()).unwrap();
    let err = hosted
        .extensions
        .get::<NativeRequest>()
        .unwrap()
        .check_translatable()
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::BadRequest);
    assert_eq!(err.param(), Some("tools[0]"), "{err}");
    assert_eq!(err.code(), Some("untranslatable_field"));
}

#[test]
fn answers_are_kept_byte_for_byte_and_decode_for_the_layers() {
    for (name, text, calls) in [
        ("response_basic.json", "In a peaceful grove", 0),
        ("response_tool.json", "", 1),
    ] {
        let doc = read(name);
        let enc = EncodedResponse::from_responses_json(Bytes::from(doc.clone())).expect(name);
        assert_eq!(enc.dialect(), Dialect::Responses);
        assert_eq!(enc.model(), "gpt-4.1-2025-04-14");
        let chat = enc.decode().unwrap();
        assert!(chat.text().starts_with(text), "{name}");
        let tool_calls = chat.choices[0].message.tool_calls.iter().flatten().count();
        assert_eq!(tool_calls, calls, "{name}");
        assert_eq!(enc.into_json().as_ref(), doc.as_bytes(), "{name}");
    }
    let usage = EncodedResponse::from_responses_json(Bytes::from(read("response_tool.json")))
        .unwrap()
        .usage()
        .cloned()
        .unwrap();
    assert_eq!((usage.prompt_tokens, usage.completion_tokens), (291, 23));
    assert_eq!(usage.cached_tokens(), 128);
    // Not a response: refused, not guessed.
    assert!(
        EncodedResponse::from_responses_json(Bytes::from_static(
            br#"{"id":"x","object":"chat.completion","model":"m","output":[]}"#
        ))
        .is_err()
    );
}

fn without_ids(v: &Value) -> Value {
    let mut items = v["output"].as_array().cloned().unwrap_or_default();
    for i in &mut items {
        i.as_object_mut().unwrap().remove("id");
    }
    Value::Array(items)
}

#[test]
fn translations_round_trip_as_json_values() {
    for name in ["response_basic.json", "response_tool.json"] {
        let v: Value = serde_json::from_str(&read(name)).unwrap();
        let chat = response_from_json(&v).unwrap();
        let back = response_to_json(&chat, v["id"].as_str().unwrap(), &Echo::default());
        assert_eq!(without_ids(&back), without_ids(&v), "{name}: output");
        assert_eq!(back["usage"], v["usage"], "{name}: usage");
        assert_eq!(back["status"], v["status"], "{name}");
    }
    // Chat → Responses → chat keeps text, calls and usage.
    let mut chat = ChatResponse::from_text("m", "Bonjour");
    chat.usage = Some(llm_tower_core::Usage::new(10, 3));
    let there = response_to_json(&chat, "resp_1", &Echo::default());
    let back = response_from_json(&there).unwrap();
    assert_eq!(back.text(), "Bonjour");
    let u = back.usage.unwrap();
    assert_eq!(
        (u.prompt_tokens, u.completion_tokens, u.total_tokens),
        (10, 3, 13)
    );
}

fn frames(text: &str) -> Vec<String> {
    text.split_inclusive("\n\n").map(str::to_owned).collect()
}

#[test]
fn native_events_pass_through_unchanged() {
    let sse = read("stream_text.sse");
    let mut enc = EventEncoder::new("resp_ours".into(), Echo::default());
    let mut out = Vec::new();
    for f in frames(&sse) {
        let mut c = ChatChunk::default();
        c.extra.insert(NATIVE_EVENT.into(), Value::String(f));
        enc.push(&c, &mut out);
    }
    enc.finish(&mut out);
    assert_eq!(String::from_utf8(out).unwrap(), sse);
    let last = frames(&sse).pop().unwrap();
    let data: Value =
        serde_json::from_str(last.lines().nth(1).unwrap().strip_prefix("data: ").unwrap()).unwrap();
    assert_eq!(enc.final_response().as_ref(), Some(&data["response"]));
    // The frame helper writes what the upstream sent.
    let first = frames(&sse).remove(0);
    let (name, data) = first.trim_end().split_once('\n').unwrap();
    let rebuilt = messages::native_frame(
        name.strip_prefix("event: ").unwrap(),
        data.strip_prefix("data: ").unwrap(),
    );
    assert_eq!(rebuilt, Value::String(first));
}

#[test]
fn translated_events_parse_and_agree_with_the_final_response() {
    let mut enc = EventEncoder::new("resp_t".into(), Echo::default());
    let mut out = Vec::new();
    for part in ["Hi", " there", "!"] {
        enc.push(&ChatChunk::text("c", "m", part), &mut out);
    }
    enc.finish(&mut out);
    let text = String::from_utf8(out).unwrap();
    let mut deltas = String::new();
    for (i, f) in frames(&text).iter().enumerate() {
        let (name, data) = f.trim_end().split_once('\n').unwrap();
        let v: Value = serde_json::from_str(data.strip_prefix("data: ").unwrap()).unwrap();
        assert_eq!(v["type"], name.strip_prefix("event: ").unwrap());
        assert_eq!(v["sequence_number"], i as u64);
        if v["type"] == "response.output_text.delta" {
            deltas.push_str(v["delta"].as_str().unwrap());
        }
    }
    let done = enc.final_response().unwrap();
    assert_eq!(response_from_json(&done).unwrap().text(), deltas);
    assert_eq!(deltas, "Hi there!");
}

#[test]
fn malformed_input_is_a_bad_request_never_a_panic() {
    let cases: [&[u8]; 8] = [
        b"",
        b"[]",
        br#"{"model":"m","input":7}"#,
        br#"{"model":"m","input":[7]}"#,
        br#"{"model":"m","input":[{"role":"tool","content":"x"}]}"#,
        br#"{"model":"m","input":[{"type":"function_call_output","output":"x"}]}"#,
        br#"{"model":"m","input":"x","text":{"format":{"type":"yaml"}}}"#,
        br#"{"model":"m","input":"x","tool_choice":7}"#,
    ];
    for body in cases {
        let e = request_from_slice(body).unwrap_err();
        assert_eq!(
            e.kind(),
            ErrorKind::BadRequest,
            "{}",
            String::from_utf8_lossy(body)
        );
    }
}
