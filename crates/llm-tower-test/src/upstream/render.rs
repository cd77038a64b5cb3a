//! Response bodies and headers in the exact shapes OpenAI and Anthropic send.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue};
use std::borrow::Cow;

use serde::{Deserialize, Serialize};
use serde_json::json;

use super::scenario::{ErrorFlavor, Scenario};

/// Which wire API a request speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Api {
    OpenAi,
    Anthropic,
    /// OpenAI's Responses API (its errors and headers are OpenAI's).
    Responses,
}

/// What the renderers need from a request.
#[derive(Debug)]
pub(crate) struct Parsed {
    pub(crate) model: String,
    pub(crate) stream: bool,
    pub(crate) include_usage: bool,
    pub(crate) json_mode: bool,
    pub(crate) last_user: String,
    pub(crate) input_bytes: usize,
}

const MAX_ECHO_CHARS: usize = 64;

/// The request fields the mock reads; everything else is skipped without being built.
#[derive(Deserialize)]
struct RawRequest<'a> {
    #[serde(borrow, default)]
    model: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    messages: Option<Vec<RawMessage<'a>>>,
    #[serde(default)]
    stream: Option<bool>,
    #[serde(default)]
    stream_options: Option<RawStreamOptions>,
    #[serde(borrow, default)]
    response_format: Option<RawFormat<'a>>,
    #[serde(borrow, default)]
    system: Option<RawContent<'a>>,
    // Responses: `input` and `instructions` instead of `messages` and `system`.
    #[serde(borrow, default)]
    input: Option<RawInput<'a>>,
    #[serde(borrow, default)]
    instructions: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    text: Option<RawText<'a>>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum RawInput<'a> {
    Text(#[serde(borrow)] Cow<'a, str>),
    Items(#[serde(borrow)] Vec<RawMessage<'a>>),
}

#[derive(Deserialize)]
struct RawText<'a> {
    #[serde(borrow, default)]
    format: Option<RawFormat<'a>>,
}

#[derive(Deserialize)]
struct RawStreamOptions {
    #[serde(default)]
    include_usage: Option<bool>,
}

#[derive(Deserialize)]
struct RawFormat<'a> {
    #[serde(borrow, rename = "type", default)]
    kind: Option<Cow<'a, str>>,
}

#[derive(Deserialize)]
struct RawMessage<'a> {
    #[serde(borrow, default)]
    role: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    content: Option<RawContent<'a>>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum RawContent<'a> {
    Text(#[serde(borrow)] Cow<'a, str>),
    Parts(#[serde(borrow)] Vec<RawPart<'a>>),
}

#[derive(Deserialize)]
struct RawPart<'a> {
    #[serde(borrow, default)]
    text: Option<Cow<'a, str>>,
}

impl RawContent<'_> {
    fn len(&self) -> usize {
        match self {
            RawContent::Text(s) => s.len(),
            RawContent::Parts(parts) => parts
                .iter()
                .filter_map(|p| p.text.as_ref())
                .map(|t| t.len())
                .sum(),
        }
    }

    fn text(&self) -> String {
        match self {
            RawContent::Text(s) => s.to_string(),
            RawContent::Parts(parts) => parts
                .iter()
                .filter_map(|p| p.text.as_deref())
                .collect::<Vec<_>>()
                .join(" "),
        }
    }
}

impl Parsed {
    pub(crate) fn from_slice(api: Api, body: &[u8]) -> Result<Self, String> {
        let raw: RawRequest<'_> = serde_json::from_slice(body)
            .map_err(|e| format!("We could not parse the JSON body of your request: {e}"))?;
        if api == Api::Responses {
            return Self::responses(raw);
        }
        let messages = raw
            .messages
            .ok_or_else(|| "'messages' is a required property".to_owned())?;
        let default_model = match api {
            Api::OpenAi | Api::Responses => "gpt-4o-mini",
            Api::Anthropic => "claude-3-5-haiku-latest",
        };
        let mut input_bytes = raw.system.as_ref().map_or(0, RawContent::len);
        let mut last_user = None;
        for m in &messages {
            input_bytes += m.content.as_ref().map_or(0, RawContent::len);
            if m.role.as_deref() == Some("user") {
                last_user = m.content.as_ref();
            }
        }
        Ok(Self {
            model: raw.model.as_deref().unwrap_or(default_model).to_owned(),
            stream: raw.stream.unwrap_or(false),
            include_usage: raw
                .stream_options
                .and_then(|o| o.include_usage)
                .unwrap_or(false),
            json_mode: matches!(
                raw.response_format.as_ref().and_then(|f| f.kind.as_deref()),
                Some("json_object" | "json_schema")
            ),
            last_user: last_user.map(RawContent::text).unwrap_or_default(),
            input_bytes,
        })
    }
}

impl Parsed {
    fn responses(raw: RawRequest<'_>) -> Result<Self, String> {
        let input = raw
            .input
            .ok_or_else(|| "Missing required parameter: 'input'.".to_owned())?;
        let mut input_bytes = raw.instructions.as_ref().map_or(0, |i| i.len());
        let last_user = match &input {
            RawInput::Text(t) => {
                input_bytes += t.len();
                t.to_string()
            }
            RawInput::Items(items) => {
                let mut last = None;
                for m in items {
                    input_bytes += m.content.as_ref().map_or(0, RawContent::len);
                    if m.role.as_deref() == Some("user") {
                        last = m.content.as_ref();
                    }
                }
                last.map(RawContent::text).unwrap_or_default()
            }
        };
        Ok(Self {
            model: raw.model.as_deref().unwrap_or("gpt-4o-mini").to_owned(),
            stream: raw.stream.unwrap_or(false),
            // Responses report usage in `response.completed`, always.
            include_usage: true,
            json_mode: matches!(
                raw.text
                    .as_ref()
                    .and_then(|t| t.format.as_ref())
                    .and_then(|f| f.kind.as_deref()),
                Some("json_object" | "json_schema")
            ),
            last_user,
            input_bytes,
        })
    }
}

/// The answer one request gets.
#[derive(Debug)]
pub(crate) struct Answer {
    pub(crate) id: String,
    pub(crate) created: u64,
    pub(crate) text: String,
    pub(crate) prompt_tokens: u64,
    pub(crate) completion_tokens: u64,
    pub(crate) cached_tokens: u64,
}

/// The default answer: deterministic, derived from the last user text.
pub(crate) fn default_text(p: &Parsed) -> String {
    let trimmed = p.last_user.trim();
    let echo: String = trimmed.chars().take(MAX_ECHO_CHARS).collect();
    let text = if echo.is_empty() {
        "mock answer".to_owned()
    } else if echo.len() < trimmed.len() {
        format!("mock answer to: {echo}…")
    } else {
        format!("mock answer to: {echo}")
    };
    if p.json_mode {
        json!({ "answer": text }).to_string()
    } else {
        text
    }
}

pub(crate) fn estimate_tokens(bytes: usize) -> u64 {
    (bytes as u64).div_ceil(4).max(1)
}

impl Answer {
    pub(crate) fn new(api: Api, seq: usize, p: &Parsed, s: &Scenario) -> Self {
        let text = s.text.clone().unwrap_or_else(|| default_text(p));
        let prompt_tokens = s
            .prompt_tokens
            .unwrap_or_else(|| estimate_tokens(p.input_bytes));
        let completion_tokens = s
            .completion_tokens
            .unwrap_or_else(|| estimate_tokens(text.len()));
        let id = match api {
            Api::OpenAi => format!("chatcmpl-mock{seq:012}"),
            Api::Anthropic => format!("msg_mock{seq:016}"),
            Api::Responses => format!("resp_mock{seq:016}"),
        };
        Self {
            id,
            created: unix_now(),
            text,
            prompt_tokens,
            completion_tokens,
            cached_tokens: s.cached_tokens.unwrap_or(0),
        }
    }

    /// The stream's text chunks: one word (with its trailing space) each.
    pub(crate) fn chunks(&self) -> impl Iterator<Item = &str> {
        self.text.split_inclusive(' ')
    }
}

pub(crate) fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

// ---------------------------------------------------------------- OpenAI

// Typed wire structs (not `json!`): faster, and fields come in the providers' order.

#[derive(Serialize)]
struct PromptDetails {
    cached_tokens: u64,
    audio_tokens: u64,
}

#[derive(Serialize)]
struct CompletionDetails {
    reasoning_tokens: u64,
    audio_tokens: u64,
    accepted_prediction_tokens: u64,
    rejected_prediction_tokens: u64,
}

#[derive(Serialize)]
struct OaUsage {
    prompt_tokens: u64,
    completion_tokens: u64,
    total_tokens: u64,
    prompt_tokens_details: PromptDetails,
    completion_tokens_details: CompletionDetails,
}

fn openai_usage(a: &Answer) -> OaUsage {
    OaUsage {
        prompt_tokens: a.prompt_tokens,
        completion_tokens: a.completion_tokens,
        total_tokens: a.prompt_tokens + a.completion_tokens,
        prompt_tokens_details: PromptDetails {
            cached_tokens: a.cached_tokens,
            audio_tokens: 0,
        },
        completion_tokens_details: CompletionDetails {
            reasoning_tokens: 0,
            audio_tokens: 0,
            accepted_prediction_tokens: 0,
            rejected_prediction_tokens: 0,
        },
    }
}

#[derive(Serialize)]
struct OaMessage<'a> {
    role: &'static str,
    content: &'a str,
    refusal: Option<&'a str>,
    annotations: [(); 0],
}

#[derive(Serialize)]
struct OaChoice<'a> {
    index: u32,
    message: OaMessage<'a>,
    logprobs: Option<()>,
    finish_reason: &'static str,
}

#[derive(Serialize)]
struct OaCompletion<'a> {
    id: &'a str,
    object: &'static str,
    created: u64,
    model: &'a str,
    choices: [OaChoice<'a>; 1],
    usage: OaUsage,
    service_tier: &'static str,
    system_fingerprint: &'static str,
}

fn to_bytes(v: &impl Serialize) -> Bytes {
    // Serializing these plain structs into a Vec cannot fail.
    Bytes::from(serde_json::to_vec(v).unwrap_or_default())
}

pub(crate) fn openai_completion(p: &Parsed, a: &Answer) -> Bytes {
    to_bytes(&OaCompletion {
        id: &a.id,
        object: "chat.completion",
        created: a.created,
        model: &p.model,
        choices: [OaChoice {
            index: 0,
            message: OaMessage {
                role: "assistant",
                content: &a.text,
                refusal: None,
                annotations: [],
            },
            logprobs: None,
            finish_reason: "stop",
        }],
        usage: openai_usage(a),
        service_tier: "default",
        system_fingerprint: "fp_mock",
    })
}

#[derive(Serialize, Default)]
struct OaDelta<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    role: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    content: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    refusal: Option<Option<&'a str>>,
}

#[derive(Serialize)]
struct OaChunkChoice<'a> {
    index: u32,
    delta: OaDelta<'a>,
    logprobs: Option<()>,
    finish_reason: Option<&'static str>,
}

#[derive(Serialize)]
struct OaChunk<'a> {
    id: &'a str,
    object: &'static str,
    created: u64,
    model: &'a str,
    service_tier: &'static str,
    system_fingerprint: &'static str,
    choices: Vec<OaChunkChoice<'a>>,
    // Absent without include_usage; `null` on every chunk but the last with it.
    #[serde(skip_serializing_if = "Option::is_none")]
    usage: Option<Option<OaUsage>>,
}

fn openai_chunk<'a>(
    p: &'a Parsed,
    a: &'a Answer,
    delta: OaDelta<'a>,
    finish: Option<&'static str>,
) -> OaChunk<'a> {
    OaChunk {
        id: &a.id,
        object: "chat.completion.chunk",
        created: a.created,
        model: &p.model,
        service_tier: "default",
        system_fingerprint: "fp_mock",
        choices: vec![OaChunkChoice {
            index: 0,
            delta,
            logprobs: None,
            finish_reason: finish,
        }],
        usage: p.include_usage.then_some(None),
    }
}

fn text_delta(c: &str) -> OaDelta<'_> {
    OaDelta {
        content: Some(c),
        ..OaDelta::default()
    }
}

pub(crate) fn sse_data(v: &impl Serialize) -> Bytes {
    let mut out = b"data: ".to_vec();
    let _ = serde_json::to_writer(&mut out, v);
    out.extend_from_slice(b"\n\n");
    Bytes::from(out)
}

fn sse_event(name: &str, v: &impl Serialize) -> Bytes {
    let mut out = format!("event: {name}\ndata: ").into_bytes();
    let _ = serde_json::to_writer(&mut out, v);
    out.extend_from_slice(b"\n\n");
    Bytes::from(out)
}

/// One SSE event of a planned stream.
#[derive(Debug)]
pub(crate) enum Ev {
    Bytes(Bytes),
    Abort,
}

/// Apply the scenario's stream faults to the text-chunk events. Returns whether the stream
/// goes on to its normal end.
fn push_text_events(
    out: &mut Vec<Ev>,
    s: &Scenario,
    texts: Vec<Bytes>,
    broken_chunk: Bytes,
    unframed: impl Fn(&str) -> Bytes,
    chunks: &[&str],
) -> bool {
    for (i, t) in texts.into_iter().enumerate() {
        if s.drop_after_chunks == Some(i) {
            out.push(Ev::Abort);
            return false;
        }
        if s.error_event_after_chunks == Some(i) {
            return false;
        }
        if s.malformed_sse {
            // A JSON line with no `data:` field, then the rest without blank-line separators.
            let mut raw = b"{\"mock\":\"not an sse event\"}\n".to_vec();
            for c in &chunks[i..] {
                raw.extend_from_slice(&unframed(c));
            }
            out.push(Ev::Bytes(Bytes::from(raw)));
            return false;
        }
        if s.malformed_json && i == 0 {
            out.push(Ev::Bytes(broken_chunk.clone()));
        } else {
            out.push(Ev::Bytes(t));
        }
    }
    let n = chunks.len();
    if s.drop_after_chunks.is_some_and(|d| d >= n) {
        out.push(Ev::Abort);
        return false;
    }
    if s.error_event_after_chunks.is_some_and(|d| d >= n) {
        return false;
    }
    true
}

pub(crate) fn openai_stream(p: &Parsed, a: &Answer, s: &Scenario) -> Vec<Ev> {
    let chunks: Vec<&str> = a.chunks().collect();
    let mut out = Vec::with_capacity(chunks.len() + 4);
    let role = OaDelta {
        role: Some("assistant"),
        content: Some(""),
        refusal: Some(None),
    };
    out.push(Ev::Bytes(sse_data(&openai_chunk(p, a, role, None))));
    let texts = chunks
        .iter()
        .map(|c| sse_data(&openai_chunk(p, a, text_delta(c), None)))
        .collect();
    let broken = Bytes::from(format!(
        "data: {{\"id\":\"{}\",\"object\":\"chat.completion.chunk\",\"choices\":[{{\"delta\":{{\"content\":\n\n",
        a.id
    ));
    let unframed = |c: &str| {
        let mut b = sse_data(&openai_chunk(p, a, text_delta(c), None)).to_vec();
        b.pop(); // one newline only: the events run together
        Bytes::from(b)
    };
    let complete = push_text_events(&mut out, s, texts, broken, unframed, &chunks);
    if !complete {
        if s.error_event_after_chunks.is_some() && !s.malformed_sse {
            out.push(Ev::Bytes(sse_data(&json!({
                "error": {
                    "message": "The server had an error while processing your request. Sorry about that!",
                    "type": "server_error",
                    "param": null,
                    "code": null
                }
            }))));
        }
        return out;
    }
    out.push(Ev::Bytes(sse_data(&openai_chunk(
        p,
        a,
        OaDelta::default(),
        Some("stop"),
    ))));
    if p.include_usage {
        let mut last = openai_chunk(p, a, OaDelta::default(), None);
        last.choices.clear();
        last.usage = Some(Some(openai_usage(a)));
        out.push(Ev::Bytes(sse_data(&last)));
    }
    if !s.no_terminal_event {
        out.push(Ev::Bytes(Bytes::from_static(b"data: [DONE]\n\n")));
    }
    out
}

// ---------------------------------------------------------------- Anthropic

#[derive(Serialize)]
struct AnUsage {
    input_tokens: u64,
    cache_creation_input_tokens: u64,
    cache_read_input_tokens: u64,
    output_tokens: u64,
}

fn anthropic_usage(a: &Answer) -> AnUsage {
    AnUsage {
        input_tokens: a.prompt_tokens.saturating_sub(a.cached_tokens),
        cache_creation_input_tokens: 0,
        cache_read_input_tokens: a.cached_tokens,
        output_tokens: a.completion_tokens,
    }
}

#[derive(Serialize)]
struct AnText<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    text: &'a str,
}

#[derive(Serialize)]
struct AnMessage<'a> {
    id: &'a str,
    #[serde(rename = "type")]
    kind: &'static str,
    role: &'static str,
    model: &'a str,
    content: Vec<AnText<'a>>,
    stop_reason: Option<&'static str>,
    stop_sequence: Option<()>,
    usage: AnUsage,
}

pub(crate) fn anthropic_message(p: &Parsed, a: &Answer) -> Bytes {
    to_bytes(&AnMessage {
        id: &a.id,
        kind: "message",
        role: "assistant",
        model: &p.model,
        content: vec![AnText {
            kind: "text",
            text: &a.text,
        }],
        stop_reason: Some("end_turn"),
        stop_sequence: None,
        usage: anthropic_usage(a),
    })
}

#[derive(Serialize)]
struct AnDeltaEvent<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    index: u32,
    delta: AnTextDelta<'a>,
}

#[derive(Serialize)]
struct AnTextDelta<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    text: &'a str,
}

fn anthropic_delta(c: &str) -> AnDeltaEvent<'_> {
    AnDeltaEvent {
        kind: "content_block_delta",
        index: 0,
        delta: AnTextDelta {
            kind: "text_delta",
            text: c,
        },
    }
}

pub(crate) fn anthropic_stream(p: &Parsed, a: &Answer, s: &Scenario) -> Vec<Ev> {
    #[derive(Serialize)]
    struct Start<'a> {
        #[serde(rename = "type")]
        kind: &'static str,
        message: AnMessage<'a>,
    }
    let chunks: Vec<&str> = a.chunks().collect();
    let mut out = Vec::with_capacity(chunks.len() + 8);
    let mut start_usage = anthropic_usage(a);
    start_usage.output_tokens = 1;
    out.push(Ev::Bytes(sse_event(
        "message_start",
        &Start {
            kind: "message_start",
            message: AnMessage {
                id: &a.id,
                kind: "message",
                role: "assistant",
                model: &p.model,
                content: Vec::new(),
                stop_reason: None,
                stop_sequence: None,
                usage: start_usage,
            },
        },
    )));
    out.push(Ev::Bytes(sse_event(
        "content_block_start",
        &json!({
            "type": "content_block_start",
            "index": 0,
            "content_block": { "type": "text", "text": "" }
        }),
    )));
    out.push(Ev::Bytes(sse_event("ping", &json!({ "type": "ping" }))));
    let texts = chunks
        .iter()
        .map(|c| sse_event("content_block_delta", &anthropic_delta(c)))
        .collect();
    let broken = Bytes::from_static(
        b"event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\n\n",
    );
    let unframed = |c: &str| {
        let mut b = sse_event("content_block_delta", &anthropic_delta(c)).to_vec();
        b.pop(); // one newline only: the events run together
        Bytes::from(b)
    };
    let complete = push_text_events(&mut out, s, texts, broken, unframed, &chunks);
    if !complete {
        if s.error_event_after_chunks.is_some() && !s.malformed_sse {
            out.push(Ev::Bytes(sse_event(
                "error",
                &json!({
                    "type": "error",
                    "error": { "type": "overloaded_error", "message": "Overloaded" }
                }),
            )));
        }
        return out;
    }
    out.push(Ev::Bytes(sse_event(
        "content_block_stop",
        &json!({ "type": "content_block_stop", "index": 0 }),
    )));
    out.push(Ev::Bytes(sse_event(
        "message_delta",
        &json!({
            "type": "message_delta",
            "delta": { "stop_reason": "end_turn", "stop_sequence": null },
            "usage": { "output_tokens": a.completion_tokens }
        }),
    )));
    if !s.no_terminal_event {
        out.push(Ev::Bytes(sse_event(
            "message_stop",
            &json!({ "type": "message_stop" }),
        )));
    }
    out
}

// ---------------------------------------------------------------- Responses

#[derive(Serialize)]
struct RsUsage {
    input_tokens: u64,
    input_tokens_details: RsCached,
    output_tokens: u64,
    output_tokens_details: RsReasoning,
    total_tokens: u64,
}

#[derive(Serialize)]
struct RsCached {
    cached_tokens: u64,
}

#[derive(Serialize)]
struct RsReasoning {
    reasoning_tokens: u64,
}

fn responses_usage(a: &Answer) -> RsUsage {
    RsUsage {
        input_tokens: a.prompt_tokens,
        input_tokens_details: RsCached {
            cached_tokens: a.cached_tokens,
        },
        output_tokens: a.completion_tokens,
        output_tokens_details: RsReasoning {
            reasoning_tokens: 0,
        },
        total_tokens: a.prompt_tokens + a.completion_tokens,
    }
}

#[derive(Serialize)]
struct RsPart<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    text: &'a str,
    annotations: [(); 0],
    logprobs: [(); 0],
}

#[derive(Serialize)]
struct RsItem<'a> {
    id: &'a str,
    #[serde(rename = "type")]
    kind: &'static str,
    status: &'static str,
    role: &'static str,
    content: Vec<RsPart<'a>>,
}

#[derive(Serialize)]
struct RsReasoningEcho {
    effort: Option<()>,
    summary: Option<()>,
}

#[derive(Serialize)]
struct RsFormat {
    #[serde(rename = "type")]
    kind: &'static str,
}

#[derive(Serialize)]
struct RsTextEcho {
    format: RsFormat,
}

/// The response object as OpenAI writes it (request fields echoed with their defaults).
#[derive(Serialize)]
struct RsResponse<'a> {
    id: &'a str,
    object: &'static str,
    created_at: u64,
    status: &'static str,
    error: Option<()>,
    incomplete_details: Option<()>,
    instructions: Option<()>,
    max_output_tokens: Option<()>,
    model: &'a str,
    output: Vec<RsItem<'a>>,
    parallel_tool_calls: bool,
    previous_response_id: Option<()>,
    reasoning: RsReasoningEcho,
    store: bool,
    temperature: f64,
    text: RsTextEcho,
    tool_choice: &'static str,
    tools: [(); 0],
    top_p: f64,
    truncation: &'static str,
    usage: Option<RsUsage>,
    user: Option<()>,
    metadata: serde_json::Map<String, serde_json::Value>,
}

/// The id of the answer's one message item.
fn message_id(a: &Answer) -> String {
    format!("msg_{}", a.id.strip_prefix("resp_").unwrap_or(&a.id))
}

fn rs_response<'a>(p: &'a Parsed, a: &'a Answer, item_id: &'a str, done: bool) -> RsResponse<'a> {
    RsResponse {
        id: &a.id,
        object: "response",
        created_at: a.created,
        status: if done { "completed" } else { "in_progress" },
        error: None,
        incomplete_details: None,
        instructions: None,
        max_output_tokens: None,
        model: &p.model,
        output: if done {
            vec![rs_message(item_id, &a.text, "completed")]
        } else {
            Vec::new()
        },
        parallel_tool_calls: true,
        previous_response_id: None,
        reasoning: RsReasoningEcho {
            effort: None,
            summary: None,
        },
        store: true,
        temperature: 1.0,
        text: RsTextEcho {
            format: RsFormat { kind: "text" },
        },
        tool_choice: "auto",
        tools: [],
        top_p: 1.0,
        truncation: "disabled",
        usage: done.then(|| responses_usage(a)),
        user: None,
        metadata: serde_json::Map::new(),
    }
}

fn rs_message<'a>(id: &'a str, text: &'a str, status: &'static str) -> RsItem<'a> {
    RsItem {
        id,
        kind: "message",
        status,
        role: "assistant",
        content: vec![RsPart {
            kind: "output_text",
            text,
            annotations: [],
            logprobs: [],
        }],
    }
}

/// A complete Responses API answer (`POST /v1/responses`).
pub(crate) fn responses_object(p: &Parsed, a: &Answer) -> Bytes {
    let item = message_id(a);
    to_bytes(&rs_response(p, a, &item, true))
}

/// A streamed Responses event: `event: <name>` and its data: `type`, `fields`'s members,
/// `sequence_number` (then counted on).
fn rs_event(name: &'static str, seq: &mut u64, fields: &impl Serialize) -> Bytes {
    #[derive(Serialize)]
    struct Event<'a, T> {
        #[serde(rename = "type")]
        kind: &'static str,
        #[serde(flatten)]
        fields: &'a T,
        sequence_number: u64,
    }
    let b = sse_event(
        name,
        &Event {
            kind: name,
            fields,
            sequence_number: *seq,
        },
    );
    *seq += 1;
    b
}

#[derive(Serialize)]
struct RsTextDelta<'a> {
    item_id: &'a str,
    output_index: u32,
    content_index: u32,
    delta: &'a str,
    logprobs: [(); 0],
}

/// A Responses stream, as OpenAI sends it: `response.created`, `response.in_progress`,
/// `response.output_item.added`, `response.content_part.added`, one
/// `response.output_text.delta` per word, `response.output_text.done`,
/// `response.content_part.done`, `response.output_item.done`, `response.completed` with
/// the whole response and its usage. A mid-stream failure is an `error` event.
pub(crate) fn responses_stream(p: &Parsed, a: &Answer, s: &Scenario) -> Vec<Ev> {
    let chunks: Vec<&str> = a.chunks().collect();
    let item = message_id(a);
    let mut seq = 0_u64;
    let mut out = Vec::with_capacity(chunks.len() + 8);
    let started = rs_response(p, a, &item, false);
    for name in ["response.created", "response.in_progress"] {
        out.push(Ev::Bytes(rs_event(
            name,
            &mut seq,
            &json!({ "response": &started }),
        )));
    }
    let added = RsItem {
        id: &item,
        kind: "message",
        status: "in_progress",
        role: "assistant",
        content: Vec::new(),
    };
    out.push(Ev::Bytes(rs_event(
        "response.output_item.added",
        &mut seq,
        &json!({ "output_index": 0, "item": added }),
    )));
    let empty = RsPart {
        kind: "output_text",
        text: "",
        annotations: [],
        logprobs: [],
    };
    out.push(Ev::Bytes(rs_event(
        "response.content_part.added",
        &mut seq,
        &json!({ "item_id": &item, "output_index": 0, "content_index": 0, "part": empty }),
    )));
    let delta = |c: &str, seq: &mut u64| {
        rs_event(
            "response.output_text.delta",
            seq,
            &RsTextDelta {
                item_id: &item,
                output_index: 0,
                content_index: 0,
                delta: c,
                logprobs: [],
            },
        )
    };
    let texts = chunks.iter().map(|c| delta(c, &mut seq)).collect();
    let broken = Bytes::from_static(
        b"event: response.output_text.delta\ndata: {\"type\":\"response.output_text.delta\",\"delta\":\n\n",
    );
    let unframed = |c: &str| {
        let mut b = delta(c, &mut 0).to_vec();
        b.pop(); // one newline only: the events run together
        Bytes::from(b)
    };
    let complete = push_text_events(&mut out, s, texts, broken, unframed, &chunks);
    if !complete {
        if s.error_event_after_chunks.is_some() && !s.malformed_sse {
            out.push(Ev::Bytes(rs_event(
                "error",
                &mut seq,
                &json!({
                    "code": "server_error",
                    "message": "The server had an error while processing your request. Sorry about that!",
                    "param": null
                }),
            )));
        }
        return out;
    }
    let part = RsPart {
        kind: "output_text",
        text: &a.text,
        annotations: [],
        logprobs: [],
    };
    out.push(Ev::Bytes(rs_event(
        "response.output_text.done",
        &mut seq,
        &json!({ "item_id": &item, "output_index": 0, "content_index": 0, "text": &a.text,
                 "logprobs": [] }),
    )));
    out.push(Ev::Bytes(rs_event(
        "response.content_part.done",
        &mut seq,
        &json!({ "item_id": &item, "output_index": 0, "content_index": 0, "part": part }),
    )));
    out.push(Ev::Bytes(rs_event(
        "response.output_item.done",
        &mut seq,
        &json!({ "output_index": 0, "item": rs_message(&item, &a.text, "completed") }),
    )));
    if !s.no_terminal_event {
        out.push(Ev::Bytes(rs_event(
            "response.completed",
            &mut seq,
            &json!({ "response": rs_response(p, a, &item, true) }),
        )));
    }
    out
}

// ---------------------------------------------------------------- errors

/// The error body the real provider sends for this status on this API.
pub(crate) fn error_body(api: Api, s: &Scenario, model: &str, request_id: &str) -> Bytes {
    let status = s.status;
    let v = match api {
        Api::OpenAi | Api::Responses => {
            let (message, kind, param, code): (String, &str, Option<&str>, Option<&str>) =
                match (status, s.error) {
                    (_, Some(ErrorFlavor::ContextLengthExceeded)) => (
                        "This model's maximum context length is 128000 tokens. However, your \
                         messages resulted in 131072 tokens. Please reduce the length of the \
                         messages."
                            .into(),
                        "invalid_request_error",
                        Some("messages"),
                        Some("context_length_exceeded"),
                    ),
                    (_, Some(ErrorFlavor::ContentFilter)) => (
                        "Your request was rejected as a result of our safety system. Your \
                         prompt may contain text that is not allowed by our safety system."
                            .into(),
                        "invalid_request_error",
                        None,
                        Some("content_policy_violation"),
                    ),
                    (401, _) => (
                        "Incorrect API key provided: sk-mock***. You can find your API key at \
                         https://platform.openai.com/account/api-keys."
                            .into(),
                        "invalid_request_error",
                        None,
                        Some("invalid_api_key"),
                    ),
                    (403, _) => (
                        "You are not allowed to sample from this model".into(),
                        "invalid_request_error",
                        None,
                        Some("model_not_found"),
                    ),
                    (404, _) => (
                        format!(
                            "The model `{model}` does not exist or you do not have access to it."
                        ),
                        "invalid_request_error",
                        None,
                        Some("model_not_found"),
                    ),
                    (429, _) => (
                        format!(
                            "Rate limit reached for {model} in organization org-mock on requests \
                             per min (RPM): Limit 10000, Used 10000, Requested 1. Please try \
                             again in {}s.",
                            s.retry_after_secs.unwrap_or(1)
                        ),
                        "requests",
                        None,
                        Some("rate_limit_exceeded"),
                    ),
                    (503, _) => (
                        "The server is overloaded or not ready yet.".into(),
                        "server_error",
                        None,
                        None,
                    ),
                    (529, _) => (
                        "The engine is currently overloaded, please try again later.".into(),
                        "overloaded_error",
                        None,
                        Some("overloaded"),
                    ),
                    (500..=599, _) => (
                        "The server had an error while processing your request. Sorry about \
                         that!"
                            .into(),
                        "server_error",
                        None,
                        None,
                    ),
                    _ => (
                        format!("mock error (HTTP {status})"),
                        "invalid_request_error",
                        None,
                        None,
                    ),
                };
            json!({ "error": { "message": message, "type": kind, "param": param, "code": code } })
        }
        Api::Anthropic => {
            let (kind, message): (&str, String) = match (status, s.error) {
                (_, Some(ErrorFlavor::ContextLengthExceeded)) => (
                    "invalid_request_error",
                    "prompt is too long: 215000 tokens > 200000 maximum".into(),
                ),
                (_, Some(ErrorFlavor::ContentFilter)) => (
                    "invalid_request_error",
                    "Output blocked by content filtering policy".into(),
                ),
                (401, _) => ("authentication_error", "invalid x-api-key".into()),
                (403, _) => (
                    "permission_error",
                    "Your API key does not have permission to use the specified resource.".into(),
                ),
                (404, _) => ("not_found_error", format!("model: {model}")),
                (413, _) => (
                    "request_too_large",
                    "Request exceeds the maximum allowed number of bytes.".into(),
                ),
                (429, _) => (
                    "rate_limit_error",
                    "This request would exceed the rate limit for your organization of 50 \
                     requests per minute. Please retry later."
                        .into(),
                ),
                (529, _) => ("overloaded_error", "Overloaded".into()),
                (500..=599, _) => ("api_error", "Internal server error".into()),
                _ => (
                    "invalid_request_error",
                    format!("mock error (HTTP {status})"),
                ),
            };
            json!({
                "type": "error",
                "error": { "type": kind, "message": message },
                "request_id": request_id
            })
        }
    };
    Bytes::from(v.to_string())
}

// ---------------------------------------------------------------- headers

pub(crate) const LIMIT_REQUESTS: u64 = 10_000;
pub(crate) const LIMIT_TOKENS: u64 = 2_000_000;

/// Replaces the request-count reset header with `reset` from now.
pub(crate) fn requests_reset_header(api: Api, h: &mut HeaderMap, reset: Duration) {
    match api {
        Api::OpenAi | Api::Responses => put_str(
            h,
            "x-ratelimit-reset-requests",
            &format!("{}ms", reset.as_millis().max(1)),
        ),
        Api::Anthropic => put_str(
            h,
            "anthropic-ratelimit-requests-reset",
            &rfc3339(SystemTime::now() + reset),
        ),
    }
}

/// The provider's rate-limit headers.
pub(crate) fn ratelimit_headers(
    api: Api,
    h: &mut HeaderMap,
    remaining_requests: u64,
    remaining_tokens: u64,
) {
    match api {
        Api::OpenAi | Api::Responses => {
            put(h, "x-ratelimit-limit-requests", LIMIT_REQUESTS);
            put(h, "x-ratelimit-remaining-requests", remaining_requests);
            put(h, "x-ratelimit-limit-tokens", LIMIT_TOKENS);
            put(h, "x-ratelimit-remaining-tokens", remaining_tokens);
            h.insert(
                HeaderName::from_static("x-ratelimit-reset-requests"),
                HeaderValue::from_static("1s"),
            );
            h.insert(
                HeaderName::from_static("x-ratelimit-reset-tokens"),
                HeaderValue::from_static("6m0s"),
            );
        }
        Api::Anthropic => {
            let now = SystemTime::now();
            let req_reset = rfc3339(now + Duration::from_secs(1));
            let tok_reset = rfc3339(now + Duration::from_secs(60));
            put(h, "anthropic-ratelimit-requests-limit", LIMIT_REQUESTS);
            put(
                h,
                "anthropic-ratelimit-requests-remaining",
                remaining_requests,
            );
            put_str(h, "anthropic-ratelimit-requests-reset", &req_reset);
            put(h, "anthropic-ratelimit-tokens-limit", LIMIT_TOKENS);
            put(h, "anthropic-ratelimit-tokens-remaining", remaining_tokens);
            put_str(h, "anthropic-ratelimit-tokens-reset", &tok_reset);
            put(h, "anthropic-ratelimit-input-tokens-limit", LIMIT_TOKENS);
            put(
                h,
                "anthropic-ratelimit-input-tokens-remaining",
                remaining_tokens,
            );
            put_str(h, "anthropic-ratelimit-input-tokens-reset", &tok_reset);
            put(
                h,
                "anthropic-ratelimit-output-tokens-limit",
                LIMIT_TOKENS / 5,
            );
            put(
                h,
                "anthropic-ratelimit-output-tokens-remaining",
                (remaining_tokens / 5).min(LIMIT_TOKENS / 5),
            );
            put_str(h, "anthropic-ratelimit-output-tokens-reset", &tok_reset);
        }
    }
}

/// The hostile mode's absurd values, replacing the normal ones.
pub(crate) fn absurd_headers(h: &mut HeaderMap) {
    const ABSURD: &[(&str, &str)] = &[
        ("retry-after", "1e20"),
        ("retry-after-ms", "NaN"),
        ("x-ratelimit-remaining-requests", "NaN"),
        ("x-ratelimit-remaining-tokens", "99999999999999999999999"),
        ("x-ratelimit-limit-requests", "-1"),
        ("x-ratelimit-limit-tokens", "inf"),
        ("x-ratelimit-reset-requests", "inf"),
        // Past `i64::MAX` nanoseconds... and seconds: `Instant::now() + 1e19 s` overflows.
        ("x-ratelimit-reset-tokens", "1e19"),
        ("anthropic-ratelimit-requests-remaining", "NaN"),
        ("anthropic-ratelimit-requests-limit", "-5"),
        ("anthropic-ratelimit-requests-reset", "9999-12-31T23:59:59Z"),
        ("anthropic-ratelimit-tokens-remaining", "1e400"),
        ("anthropic-ratelimit-tokens-reset", "never"),
        (
            "anthropic-ratelimit-input-tokens-remaining",
            "99999999999999999999999",
        ),
        ("anthropic-ratelimit-output-tokens-reset", "-1s"),
        ("anthropic-ratelimit-input-tokens-reset", "99999999999999h"),
    ];
    for (k, v) in ABSURD {
        put_str(h, k, v);
    }
}

/// `[[[…]]]`, `depth` levels.
pub(crate) fn deep_json(depth: usize) -> Vec<u8> {
    let depth = depth.min(super::scenario::MAX_HOSTILE_ALLOC / 2);
    let mut v = vec![b'['; depth];
    v.resize(depth * 2, b']');
    v
}

fn put(h: &mut HeaderMap, name: &'static str, v: u64) {
    h.insert(HeaderName::from_static(name), HeaderValue::from(v));
}

fn put_str(h: &mut HeaderMap, name: &str, v: &str) {
    if let (Ok(n), Ok(v)) = (
        HeaderName::from_bytes(name.as_bytes()),
        HeaderValue::from_str(v),
    ) {
        h.insert(n, v);
    }
}

/// `YYYY-MM-DDTHH:MM:SSZ` in UTC.
pub(crate) fn rfc3339(t: SystemTime) -> String {
    let secs = t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let days = i64::try_from(secs / 86_400).unwrap_or(0);
    let rem = secs % 86_400;
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        (rem % 3600) / 60,
        rem % 60
    )
}

/// Howard Hinnant's days-to-civil algorithm.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = u32::try_from(doy - (153 * mp + 2) / 5 + 1).unwrap_or(1);
    let m = u32::try_from(if mp < 10 { mp + 3 } else { mp - 9 }).unwrap_or(1);
    (if m <= 2 { y + 1 } else { y }, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_formats_known_instants() {
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00Z");
        let t = UNIX_EPOCH + Duration::from_secs(1_709_251_199); // leap year end of Feb
        assert_eq!(rfc3339(t), "2024-02-29T23:59:59Z");
        let t = UNIX_EPOCH + Duration::from_secs(1_798_761_600);
        assert_eq!(rfc3339(t), "2027-01-01T00:00:00Z");
    }
}
