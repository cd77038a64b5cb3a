//! ChatRequest → Messages API request, Messages API response → ChatResponse, and the
//! streaming event decoder.

use std::collections::VecDeque;
use std::sync::Arc;

use llm_tower_core::dialect::Dialect;
use llm_tower_core::dialect::messages::StreamScan;
use llm_tower_core::{
    ChatRequest, ChatResponse, Content, ContentPart, LlmError, Message, PaidAttempt, Role,
    StreamEvent, StreamHead, Usage,
};
use serde_json::{Map, Value, json};

use crate::classify;
use crate::common::{Decoder, native_event};
use crate::secret::ApiKey;
use crate::sse::SseEvent;

/// How a [`ChatRequest`] becomes a Messages API request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TranslateOptions {
    /// `max_tokens` when the request sets no output limit (the Messages API requires one).
    pub default_max_tokens: u64,
    /// Mark the system prompt and the tool definitions with `cache_control`.
    pub prompt_caching: bool,
    /// The cache TTL (`"5m"`, `"1h"`); `None` = the provider's default (5 minutes).
    pub cache_ttl: Option<String>,
}

impl Default for TranslateOptions {
    fn default() -> Self {
        Self {
            default_max_tokens: 4096,
            prompt_caching: false,
            cache_ttl: None,
        }
    }
}

/// Request fields that are Anthropic's own and pass through unchanged when present in the
/// request's unknown fields.
const PASSTHROUGH: &[&str] = &[
    "top_k",
    "thinking",
    "stop_sequences",
    "container",
    "mcp_servers",
    "context_management",
];

/// Content block types that are Anthropic's own; such parts pass through unchanged.
const NATIVE_BLOCKS: &[&str] = &[
    "image",
    "document",
    "tool_use",
    "tool_result",
    "thinking",
    "redacted_thinking",
    "search_result",
    "server_tool_use",
    "web_search_tool_result",
    "container_upload",
];

fn bad(msg: impl Into<String>) -> LlmError {
    LlmError::bad_request(msg.into()).with_provider("anthropic")
}

/// Translates a chat-completions request into a Messages API request body.
///
/// System and developer messages become `system`; tool results become `tool_result`
/// blocks in user turns; consecutive turns of one role are merged (the API requires
/// alternation); images become `image` blocks (base64 from `data:` URLs, else `url`);
/// tools, `tool_choice` (`parallel_tool_calls: false` → `disable_parallel_tool_use`),
/// `stop`, `user` (→ `metadata.user_id`) are mapped; `n > 1` and audio input are refused
/// with a bad request. With [`TranslateOptions::prompt_caching`], the last system block
/// and the last tool carry `cache_control`.
///
/// ```
/// use llm_tower_core::{ChatRequest, Message};
/// use llm_tower_providers::anthropic::{to_messages_request, TranslateOptions};
///
/// let req = ChatRequest::new("claude", vec![Message::system("Be brief."), Message::user("Hi")]);
/// let opts = TranslateOptions { prompt_caching: true, ..TranslateOptions::default() };
/// let body = to_messages_request(&req, &opts).unwrap();
/// assert_eq!(body["system"][0]["text"], "Be brief.");
/// assert_eq!(body["system"][0]["cache_control"]["type"], "ephemeral");
/// assert_eq!(body["messages"][0]["role"], "user");
/// assert_eq!(body["max_tokens"], 4096);
/// ```
pub fn to_messages_request(req: &ChatRequest, opts: &TranslateOptions) -> Result<Value, LlmError> {
    if req.n.is_some_and(|n| n > 1) {
        return Err(bad("Anthropic does not support `n` > 1").with_param("n"));
    }
    let mut system: Vec<Value> = Vec::new();
    let mut turns: Vec<(&'static str, Vec<Value>)> = Vec::new();
    for (i, m) in req.messages.iter().enumerate() {
        let (role, blocks) = match &m.role {
            Role::System | Role::Developer => {
                for b in content_blocks(m.content(), i)? {
                    if b.get("type").and_then(Value::as_str) != Some("text") {
                        return Err(bad(format!(
                            "messages[{i}]: a system message may hold only text"
                        ))
                        .with_param(format!("messages[{i}].content")));
                    }
                    system.push(b);
                }
                continue;
            }
            Role::User => ("user", content_blocks(m.content(), i)?),
            Role::Assistant => ("assistant", assistant_blocks(m, i)?),
            Role::Tool => ("user", vec![tool_result(m, i)?]),
            other => {
                return Err(bad(format!(
                    "messages[{i}]: role `{}` is not supported by Anthropic",
                    other.as_str()
                ))
                .with_param(format!("messages[{i}].role")));
            }
        };
        if blocks.is_empty() {
            continue;
        }
        match turns.last_mut() {
            Some((r, prev)) if *r == role => prev.extend(blocks),
            _ => turns.push((role, blocks)),
        }
    }
    if turns.is_empty() {
        return Err(bad("the request has no user or assistant message").with_param("messages"));
    }

    let mut body = Map::new();
    body.insert("model".into(), Value::from(req.model.as_str()));
    body.insert(
        "max_tokens".into(),
        Value::from(req.output_limit().unwrap_or(opts.default_max_tokens)),
    );
    let cache_control = || {
        let mut cc = json!({"type": "ephemeral"});
        if let Some(ttl) = &opts.cache_ttl {
            cc["ttl"] = Value::from(ttl.as_str());
        }
        cc
    };
    if !system.is_empty() {
        if opts.prompt_caching {
            if let Some(Value::Object(last)) = system.last_mut() {
                last.entry("cache_control").or_insert_with(cache_control);
            }
            body.insert("system".into(), Value::Array(system));
        } else if let [Value::Object(only)] = &system[..]
            && only.len() == 2
        {
            body.insert("system".into(), only["text"].clone());
        } else {
            body.insert("system".into(), Value::Array(system));
        }
    }
    body.insert(
        "messages".into(),
        Value::Array(
            turns
                .into_iter()
                .map(|(role, content)| json!({"role": role, "content": content}))
                .collect(),
        ),
    );
    if let Some(t) = &req.temperature {
        body.insert("temperature".into(), Value::Number(t.clone()));
    }
    if let Some(p) = &req.top_p {
        body.insert("top_p".into(), Value::Number(p.clone()));
    }
    if req.is_stream() {
        body.insert("stream".into(), Value::Bool(true));
    }
    match req.extra.get("stop") {
        Some(Value::String(s)) => {
            body.insert("stop_sequences".into(), json!([s]));
        }
        Some(Value::Array(a)) if !a.is_empty() => {
            body.insert("stop_sequences".into(), Value::Array(a.clone()));
        }
        _ => {}
    }
    let mut metadata = match req.extra.get("metadata") {
        // OpenAI's `metadata` is free-form; Anthropic accepts only `user_id`.
        Some(Value::Object(m)) => m
            .get("user_id")
            .map(|u| Map::from_iter([("user_id".to_owned(), u.clone())]))
            .unwrap_or_default(),
        _ => Map::new(),
    };
    if let Some(user) = &req.user {
        metadata.insert("user_id".into(), Value::from(user.as_str()));
    }
    if !metadata.is_empty() {
        body.insert("metadata".into(), Value::Object(metadata));
    }
    if let Some(tools) = &req.tools {
        let mut out = Vec::with_capacity(tools.len());
        for (i, t) in tools.iter().enumerate() {
            out.push(match (&*t.kind, &t.function) {
                ("function", Some(f)) => {
                    let mut tool = Map::new();
                    tool.insert("name".into(), Value::from(f.name.as_str()));
                    if let Some(d) = &f.description {
                        tool.insert("description".into(), Value::from(d.as_str()));
                    }
                    tool.insert(
                        "input_schema".into(),
                        f.parameters
                            .clone()
                            .unwrap_or_else(|| json!({"type": "object", "properties": {}})),
                    );
                    if let Some(cc) = t.extra.get("cache_control") {
                        tool.insert("cache_control".into(), cc.clone());
                    }
                    Value::Object(tool)
                }
                ("function", None) => {
                    return Err(bad(format!("tools[{i}]: a function tool needs `function`"))
                        .with_param(format!("tools[{i}]")));
                }
                // Anthropic's own tool types (`web_search_20250305`, `bash_20250124`, …).
                (kind, _) => {
                    let mut tool = t.extra.clone();
                    tool.insert("type".into(), Value::from(kind));
                    Value::Object(tool)
                }
            });
        }
        if opts.prompt_caching
            && let Some(Value::Object(last)) = out.last_mut()
        {
            last.entry("cache_control").or_insert_with(cache_control);
        }
        if !out.is_empty() {
            body.insert("tools".into(), Value::Array(out));
        }
    }
    let mut choice = match &req.tool_choice {
        None => None,
        Some(Value::String(s)) => match s.as_str() {
            "auto" => Some(json!({"type": "auto"})),
            "none" => Some(json!({"type": "none"})),
            "required" => Some(json!({"type": "any"})),
            other => {
                return Err(bad(format!("unknown tool_choice `{other}`")).with_param("tool_choice"));
            }
        },
        Some(Value::Object(o)) => {
            match o
                .get("function")
                .and_then(|f| f.get("name"))
                .and_then(Value::as_str)
            {
                Some(name) => Some(json!({"type": "tool", "name": name})),
                // Already in Anthropic's shape (`{"type": "any"}`, `{"type": "tool", "name"}`).
                None if o.contains_key("type") => Some(Value::Object(o.clone())),
                None => return Err(bad("invalid tool_choice").with_param("tool_choice")),
            }
        }
        Some(_) => return Err(bad("invalid tool_choice").with_param("tool_choice")),
    };
    if req.extra.get("parallel_tool_calls") == Some(&Value::Bool(false)) && req.tools.is_some() {
        let c = choice.get_or_insert_with(|| json!({"type": "auto"}));
        c["disable_parallel_tool_use"] = Value::Bool(true);
    }
    if let Some(c) = choice {
        body.insert("tool_choice".into(), c);
    }
    for key in PASSTHROUGH {
        if let Some(v) = req.extra.get(*key) {
            body.insert((*key).to_owned(), v.clone());
        }
    }
    Ok(Value::Object(body))
}

fn content_blocks(content: Option<&Content>, i: usize) -> Result<Vec<Value>, LlmError> {
    let Some(content) = content else {
        return Ok(Vec::new());
    };
    match content {
        Content::Text(t) if t.is_empty() => Ok(Vec::new()),
        Content::Text(t) => Ok(vec![json!({"type": "text", "text": t})]),
        Content::Parts(parts) => {
            let mut out = Vec::with_capacity(parts.len());
            for (j, p) in parts.iter().enumerate() {
                match p {
                    ContentPart::Text { text, extra }
                    | ContentPart::Refusal {
                        refusal: text,
                        extra,
                    } => {
                        if text.is_empty() {
                            continue;
                        }
                        let mut b = Map::new();
                        b.insert("type".into(), "text".into());
                        b.insert("text".into(), Value::from(text.as_str()));
                        if let Some(cc) = extra.get("cache_control") {
                            b.insert("cache_control".into(), cc.clone());
                        }
                        out.push(Value::Object(b));
                    }
                    ContentPart::ImageUrl { image_url, extra } => {
                        let mut b = image_block(&image_url.url)
                            .map_err(|m| bad(format!("messages[{i}].content[{j}]: {m}")))?;
                        if let Some(cc) = extra.get("cache_control") {
                            b["cache_control"] = cc.clone();
                        }
                        out.push(b);
                    }
                    ContentPart::InputAudio { .. } => {
                        return Err(bad(format!(
                            "messages[{i}].content[{j}]: Anthropic does not accept audio input"
                        ))
                        .with_param(format!("messages[{i}].content[{j}]")));
                    }
                    ContentPart::Other(m) => {
                        let kind = m.get("type").and_then(Value::as_str).unwrap_or("");
                        if NATIVE_BLOCKS.contains(&kind) {
                            out.push(Value::Object(m.clone()));
                        } else {
                            return Err(bad(format!(
                                "messages[{i}].content[{j}]: content part `{kind}` is not supported by Anthropic"
                            ))
                            .with_param(format!("messages[{i}].content[{j}]")));
                        }
                    }
                }
            }
            Ok(out)
        }
    }
}

/// `data:<media>;base64,<data>` → a base64 source; anything else → a URL source.
fn image_block(url: &str) -> Result<Value, String> {
    if let Some(rest) = url.strip_prefix("data:") {
        let (meta, data) = rest
            .split_once(',')
            .ok_or_else(|| "malformed data: URL".to_owned())?;
        let media = meta
            .strip_suffix(";base64")
            .ok_or_else(|| "image data: URLs must be base64".to_owned())?;
        return Ok(json!({
            "type": "image",
            "source": {"type": "base64", "media_type": media, "data": data}
        }));
    }
    Ok(json!({"type": "image", "source": {"type": "url", "url": url}}))
}

fn assistant_blocks(m: &Message, i: usize) -> Result<Vec<Value>, LlmError> {
    let mut out = content_blocks(m.content(), i)?;
    for (j, tc) in m.tool_calls.iter().flatten().enumerate() {
        let args = tc.function.arguments.trim();
        let input: Value = if args.is_empty() {
            json!({})
        } else {
            serde_json::from_str(args).map_err(|e| {
                bad(format!(
                    "messages[{i}].tool_calls[{j}].function.arguments is not JSON: {e}"
                ))
                .with_param(format!("messages[{i}].tool_calls[{j}].function.arguments"))
            })?
        };
        out.push(json!({
            "type": "tool_use",
            "id": tc.id,
            "name": tc.function.name,
            "input": input,
        }));
    }
    Ok(out)
}

fn tool_result(m: &Message, i: usize) -> Result<Value, LlmError> {
    let id = m.tool_call_id.as_deref().ok_or_else(|| {
        bad(format!(
            "messages[{i}]: a tool message needs `tool_call_id`"
        ))
        .with_param(format!("messages[{i}].tool_call_id"))
    })?;
    let mut b = Map::new();
    b.insert("type".into(), "tool_result".into());
    b.insert("tool_use_id".into(), Value::from(id));
    match m.content() {
        Some(Content::Text(t)) => {
            b.insert("content".into(), Value::from(t.as_str()));
        }
        Some(c @ Content::Parts(_)) => {
            b.insert("content".into(), Value::Array(content_blocks(Some(c), i)?));
        }
        None => {}
    }
    if m.extra.get("is_error") == Some(&Value::Bool(true)) {
        b.insert("is_error".into(), Value::Bool(true));
    }
    Ok(Value::Object(b))
}

pub use llm_tower_core::dialect::messages::{finish_reason, usage_from};

/// Translates a Messages API response into a chat-completions response
/// ([`response_from_json`](llm_tower_core::dialect::messages::response_from_json), shared
/// with the HTTP edge); an `error` document is classified as the provider's error.
///
/// ```
/// use llm_tower_providers::anthropic::from_messages_response;
/// let resp = from_messages_response(&serde_json::json!({
///     "id": "msg_1", "type": "message", "role": "assistant", "model": "claude-sonnet-4-5",
///     "content": [{"type": "text", "text": "Hi!"}],
///     "stop_reason": "end_turn",
///     "usage": {"input_tokens": 10, "output_tokens": 3, "cache_read_input_tokens": 90}
/// }), "anthropic").unwrap();
/// assert_eq!(resp.text(), "Hi!");
/// assert_eq!(resp.choices[0].finish_reason.as_deref(), Some("stop"));
/// let usage = resp.usage.unwrap();
/// assert_eq!((usage.prompt_tokens, usage.cached_tokens()), (100, 90));
/// ```
pub fn from_messages_response(v: &Value, provider: &str) -> Result<ChatResponse, LlmError> {
    if v.get("type").and_then(Value::as_str) == Some("error") {
        return Err(
            classify::classify_inline(provider, v, None).unwrap_or_else(|| {
                classify::malformed(
                    provider,
                    "Messages API response",
                    "an error without details",
                )
            }),
        );
    }
    llm_tower_core::dialect::messages::response_from_json(v)
        .map_err(|what| classify::malformed(provider, "Messages API response", what))
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[derive(Clone, Copy)]
enum Block {
    Text,
    Tool(u32),
    Thinking,
    Other,
}

/// Most content blocks one streamed message may have.
const MAX_BLOCKS: usize = 4096;

/// Anthropic streaming events → chunks (for a chat client) or the events as they came
/// ([`NativeEvent`]s, for a client that spoke Messages). Each event is read once into
/// borrowed fields ([`StreamScan`]); the decoder keeps only what following the stream
/// needs: the blocks' kinds, the tool calls' count, the merged usage.
/// See [`AnthropicProvider`](super::AnthropicProvider).
pub(crate) struct AnthropicDecoder {
    provider: Arc<str>,
    key: Option<ApiKey>,
    head: Arc<StreamHead>,
    blocks: Vec<Block>,
    tools: u32,
    usage: Map<String, Value>,
    started: bool,
    done: bool,
    /// Events are kept as they came (the request was in the Messages dialect).
    native: bool,
}

impl AnthropicDecoder {
    pub(crate) fn new(provider: Arc<str>, key: Option<ApiKey>, model: String) -> Self {
        Self {
            native: false,
            provider,
            key,
            head: Arc::new(StreamHead {
                id: String::new(),
                model,
                created: unix_now(),
            }),
            blocks: Vec::new(),
            tools: 0,
            usage: Map::new(),
            started: false,
            done: false,
        }
    }

    /// Events are kept as they came ([`NativeEvent`]), events with no chat meaning
    /// included.
    pub(crate) fn native(mut self, on: bool) -> Self {
        self.native = on;
        self
    }

    fn malformed(&self, what: impl std::fmt::Display) -> LlmError {
        classify::malformed(&self.provider, "stream event", what)
    }

    fn merge_usage(&mut self, u: Option<&str>) {
        if let Some(Ok(Value::Object(src))) = u.map(serde_json::from_str::<Value>) {
            for (k, v) in src {
                if !v.is_null() {
                    self.usage.insert(k, v);
                }
            }
        }
    }

    fn usage(&self) -> Usage {
        usage_from(&Value::Object(self.usage.clone()))
    }

    /// The block at `index`, created if new; an index past [`MAX_BLOCKS`] is malformed
    /// (it would otherwise size the table: `"index": 1e12` must not allocate).
    fn block_mut(&mut self, index: usize) -> Result<&mut Block, LlmError> {
        if index >= MAX_BLOCKS {
            return Err(self.malformed(format!(
                "content block index {index} (at most {MAX_BLOCKS} blocks)"
            )));
        }
        if self.blocks.len() <= index {
            self.blocks.resize(index + 1, Block::Other);
        }
        Ok(&mut self.blocks[index])
    }

    /// Follows one event: checks its order and shape and updates the state. Returns the
    /// chat tool index its view speaks of, and the usage it carries (on `message_stop`).
    fn follow(&mut self, scan: &StreamScan<'_>, kind: &str) -> Result<Step, LlmError> {
        if kind != "message_start" && kind != "ping" && kind != "error" && !self.started {
            return Err(self.malformed(format!("`{kind}` before `message_start`")));
        }
        let mut step = Step::default();
        match kind {
            "message_start" => {
                if !scan.has_message() {
                    return Err(self.malformed("message_start without `message`"));
                }
                self.started = true;
                let (id, model) = scan.message_id_model();
                if id.is_some() || model.is_some() {
                    let mut head = (*self.head).clone();
                    if let Some(id) = id {
                        id.clone_into(&mut head.id);
                    }
                    if let Some(m) = model {
                        m.clone_into(&mut head.model);
                    }
                    self.head = Arc::new(head);
                }
                self.merge_usage(scan.usage_json());
            }
            "content_block_start" => {
                let i = scan
                    .index()
                    .ok_or_else(|| self.malformed("content_block_start without `index`"))?;
                let block = match scan.block_kind() {
                    Some("text") => Block::Text,
                    Some("tool_use") => {
                        let t = self.tools;
                        self.tools = self.tools.saturating_add(1);
                        step.tool = Some(t);
                        Block::Tool(t)
                    }
                    Some("thinking") => Block::Thinking,
                    _ => Block::Other,
                };
                *self.block_mut(i)? = block;
            }
            "content_block_delta" => {
                let i = scan
                    .index()
                    .ok_or_else(|| self.malformed("content_block_delta without `index`"))?;
                if !scan.has_delta() {
                    return Err(self.malformed("content_block_delta without `delta`"));
                }
                if let Some(Block::Tool(t)) = self.blocks.get(i) {
                    step.tool = Some(*t);
                }
            }
            "message_delta" => self.merge_usage(scan.usage_json()),
            "message_stop" => {
                self.done = true;
                step.usage = Some(self.usage());
            }
            _ => {} // new event types are ignored, as Anthropic's versioning policy asks
        }
        Ok(step)
    }

    /// An `error` event, classified.
    fn error_event(&self, data: &[u8]) -> LlmError {
        match serde_json::from_slice::<Value>(data) {
            Ok(v) => classify::classify_inline(&self.provider, &v, self.key.as_ref())
                .unwrap_or_else(|| self.malformed("an error event without details")),
            Err(e) => self.malformed(e),
        }
    }
}

/// What following one event found (see [`AnthropicDecoder::follow`]).
#[derive(Default)]
struct Step {
    tool: Option<u32>,
    usage: Option<Usage>,
}

impl Decoder for AnthropicDecoder {
    fn decode(&mut self, ev: &SseEvent, out: &mut VecDeque<StreamEvent>) -> Result<(), LlmError> {
        let scan = StreamScan::parse(ev.data()).map_err(|e| self.malformed(e))?;
        let kind = match scan.kind() {
            "" => ev.event().unwrap_or_default(),
            kind => kind,
        };
        if kind == "error" {
            return Err(self.error_event(ev.data()));
        }
        let step = self.follow(&scan, kind)?;
        if !self.native {
            if let Some(chunk) = scan.view(&self.head, step.tool, step.usage.as_ref()) {
                out.push_back(chunk.into());
            }
            return Ok(());
        }
        let content = scan.has_content(step.tool);
        let finish = kind == "message_delta" && scan.stop_reason().is_some();
        let mut event = native_event(Dialect::Messages, ev, kind, &self.head)
            .ok_or_else(|| self.malformed("an event name that is not UTF-8"))?;
        if content {
            event = event.with_choice(finish);
        }
        if let Some(t) = step.tool {
            event = event.with_tool(t);
        }
        if let Some(u) = step.usage {
            event = event.with_usage(u);
        }
        out.push_back(event.into());
        Ok(())
    }

    fn is_done(&self) -> bool {
        self.done
    }

    fn usage_so_far(&self) -> Option<PaidAttempt> {
        (self.started && !self.usage.is_empty())
            .then(|| PaidAttempt::new(Some(self.head.model.clone()), self.usage()))
    }

    fn terminal(&self) -> &'static str {
        "message_stop"
    }
}
