//! The OpenAI Responses dialect (`POST /v1/responses`): its requests as the [`ChatRequest`]
//! view, its answers from and to chat-completions answers, its streamed events, and the
//! [`ResponseStore`] that keeps answers for `previous_response_id`.
//!
//! What the chat view carries: `input` (a string, or items: messages with `input_text` /
//! `input_image` / `output_text` parts, `function_call` and `function_call_output`),
//! `instructions` (a first system message), function `tools`, `tool_choice`,
//! `text.format` (`json_schema` / `json_object` as `response_format`), `max_output_tokens`,
//! `temperature`, `top_p`, `parallel_tool_calls`, `user`, `stream`. `metadata`, `store`
//! and `previous_response_id` are the gateway's business (echoed in the answer, acted on by
//! the HTTP edge) and never need a provider. `reasoning` input items are the previous
//! model's private state and are left out of a translation; everything else (hosted tools,
//! `input_file`, `include`, `background`, `conversation`, `prompt`, …) is recorded as
//! untranslatable ([`NativeRequest::check_translatable`]): a 400 naming it at a provider
//! that does not speak Responses.

use std::future::Future;
use std::pin::Pin;

use bytes::Bytes;
use serde_json::{Map, Number, Value, json};

use super::messages::write_frame;
use super::{Dialect, NativeRequest};
use crate::json::{Key, LenientStr};
use crate::{
    ChatChunk, ChatRequest, ChatResponse, Choice, CompletionTokensDetails, Content, ContentPart,
    Delta, ErrorKind, Extra, FunctionCall, FunctionCallDelta, FunctionDef, ImageUrl,
    JsonSchemaFormat, LlmError, MAX_REQUEST_BYTES, Message, NativeEvent, PromptTokensDetails,
    ResponseFormat, Role, StreamHead, StreamOptions, Tool, ToolCall, ToolCallDelta, Usage,
};

/// Top-level fields this module maps or that the gateway handles; any other one is kept in
/// the view's `extra` and is untranslatable.
const KNOWN: &[&str] = &[
    "model",
    "input",
    "instructions",
    "tools",
    "tool_choice",
    "text",
    "max_output_tokens",
    "temperature",
    "top_p",
    "metadata",
    "stream",
    "stream_options",
    "store",
    "previous_response_id",
    "parallel_tool_calls",
    "user",
    "reasoning",
    "truncation",
    "service_tier",
    "prompt_cache_key",
    "safety_identifier",
    "include",
    "background",
];

/// Fields of the request echoed in the response object (as OpenAI does).
const ECHOED: &[&str] = &[
    "instructions",
    "max_output_tokens",
    "metadata",
    "parallel_tool_calls",
    "previous_response_id",
    "reasoning",
    "store",
    "temperature",
    "text",
    "tool_choice",
    "tools",
    "top_p",
    "truncation",
    "user",
];

fn bad(msg: impl Into<String>) -> LlmError {
    LlmError::bad_request(msg.into())
}

fn untranslatable(param: &str, what: &str) -> LlmError {
    bad(format!(
        "`{param}`: {what} has no equivalent in the chat completions API, so this request \
         cannot be served by the provider chosen for it"
    ))
    .with_param(param)
    .with_code("untranslatable_field")
}

/// Parses a Responses API request into the [`ChatRequest`] view, with the body kept as a
/// [`NativeRequest`] of [`Dialect::Responses`]. Malformed input (not JSON, no `model`, no
/// `input`, an item without its fields) is a bad request naming the field.
///
/// ```
/// use llm_tower_core::dialect::responses::request_from_slice;
///
/// let req = request_from_slice(br#"{
///     "model": "gpt-4o-mini", "instructions": "Be brief.", "input": "Hi",
///     "max_output_tokens": 50, "stream": true
/// }"#).unwrap();
/// assert_eq!(req.messages.len(), 2);
/// assert_eq!(req.messages[0].text(), "Be brief.");
/// assert_eq!(req.max_tokens, Some(50));
/// assert!(req.is_stream());
/// ```
pub fn request_from_slice(body: &[u8]) -> Result<ChatRequest, LlmError> {
    request_from_bytes(Bytes::copy_from_slice(body))
}

/// [`request_from_slice`] on a body already in [`Bytes`] (kept without a copy).
pub fn request_from_bytes(body: Bytes) -> Result<ChatRequest, LlmError> {
    RequestBody::parse(&body)?.request(body.clone())
}

/// A Responses request body's top-level members: the one read an HTTP edge makes of it
/// (it reads `store` and takes `previous_response_id` there, then builds the view with
/// [`request`](Self::request) and the echo with [`echo`](Self::echo)). `model` and a
/// string `input` are borrowed from the body, every other member is a JSON value; a
/// repeated member reads as its last value. Not JSON, not an object or over
/// [`MAX_REQUEST_BYTES`] is a bad request.
///
/// ```
/// use llm_tower_core::dialect::responses::RequestBody;
/// let body = bytes::Bytes::from_static(br#"{"model":"m","input":"Hi","store":false}"#);
/// let top = RequestBody::parse(&body).unwrap();
/// assert!(!top.store());
/// let view = top.request(body.clone()).unwrap();
/// assert_eq!(view.messages[0].text(), "Hi");
/// assert!(top.echo().previous_response_id().is_none());
/// assert!(RequestBody::parse(b"[1]").is_err());
/// ```
#[derive(Debug)]
pub struct RequestBody<'a> {
    members: Vec<(Key<'a>, Member<'a>)>,
    /// The text of the `model` value (quotes included), when there is exactly one and it
    /// is a string without escapes: the body is then sent with the routed model in its
    /// place.
    model_value: Option<&'a str>,
}

/// A top-level member: a string borrowed from the body (`model`, a string `input`), or
/// a JSON value.
#[derive(Debug)]
enum Member<'a> {
    Text(Key<'a>),
    Value(Value),
}

impl Member<'_> {
    fn as_str(&self) -> Option<&str> {
        match self {
            Member::Text(s) => Some(s.as_str()),
            Member::Value(Value::String(s)) => Some(s),
            Member::Value(_) => None,
        }
    }

    fn into_value(self) -> Value {
        match self {
            Member::Text(s) => Value::String(s.into_owned()),
            Member::Value(v) => v,
        }
    }
}

impl<'a> RequestBody<'a> {
    /// Reads `body` (see the type's docs).
    pub fn parse(body: &'a [u8]) -> Result<Self, LlmError> {
        if body.len() > MAX_REQUEST_BYTES {
            return Err(bad(format!(
                "request body of {} bytes exceeds the limit of {MAX_REQUEST_BYTES} bytes",
                body.len()
            )));
        }
        // The typed read takes every well-formed object; anything it refuses is read
        // again as JSON values, whose error names the fault as before.
        match crate::json::from_slice::<Self>(body) {
            Ok(mut top) => {
                // The model's text with its quotes (a string read borrowed has no escapes).
                top.model_value = top.model_value.and_then(|m| {
                    let at = (m.as_ptr() as usize).checked_sub(body.as_ptr() as usize)?;
                    let raw = body.get(at.checked_sub(1)?..at + m.len() + 1)?;
                    std::str::from_utf8(raw).ok()
                });
                Ok(top)
            }
            Err(_) => {
                let members: crate::json::Members<'a> = crate::json::from_slice(body)
                    .map_err(|e| bad(format!("invalid request body: {e}")))?;
                Ok(Self {
                    members: members
                        .into_inner()
                        .into_iter()
                        .map(|(k, v)| (k, Member::Value(v)))
                        .collect(),
                    model_value: None,
                })
            }
        }
    }

    fn member(&self, key: &str) -> Option<&Member<'a>> {
        self.members
            .iter()
            .rev()
            .find(|(k, _)| k.as_str() == key)
            .map(|(_, v)| v)
    }

    /// Whether the answer is to be stored: `store` is not `false` (the default is `true`).
    pub fn store(&self) -> bool {
        !matches!(
            self.member("store"),
            Some(Member::Value(Value::Bool(false)))
        )
    }

    /// Takes the member `key` out (every occurrence), as a JSON value: the last one sent.
    pub fn remove(&mut self, key: &str) -> Option<Value> {
        let mut last = None;
        let mut i = 0;
        while i < self.members.len() {
            if self.members[i].0.as_str() == key {
                last = Some(self.members.remove(i).1);
            } else {
                i += 1;
            }
        }
        if key == "model" {
            self.model_value = None;
        }
        last.map(Member::into_value)
    }

    /// Sets the member `key` to `value` (replacing any it had).
    pub fn insert(&mut self, key: &str, value: Value) {
        self.remove(key);
        self.members
            .push((Key::Owned(key.to_owned()), Member::Value(value)));
    }

    /// The members as JSON text, keys in order and once each (as a [`Map`] writes them).
    pub fn to_vec(&self) -> Result<Vec<u8>, LlmError> {
        let mut top = Map::new();
        for (k, v) in &self.members {
            let v = match v {
                Member::Text(s) => Value::String(s.as_str().to_owned()),
                Member::Value(v) => v.clone(),
            };
            top.insert(k.as_str().to_owned(), v);
        }
        serde_json::to_vec(&top).map_err(|e| LlmError::internal(format!("cannot encode: {e}")))
    }

    /// The fields a translated answer echoes.
    pub fn echo(&self) -> Echo {
        let mut echo = Map::new();
        for (k, v) in &self.members {
            // ECHOED is sorted; `model` and `input` are not echoed.
            if let Member::Value(v) = v
                && ECHOED.binary_search(&k.as_str()).is_ok()
            {
                echo.insert(k.as_str().to_owned(), v.clone());
            }
        }
        Echo(echo)
    }

    /// The [`ChatRequest`] view, with `body` (what a provider that speaks Responses
    /// receives: the body read, or these members as JSON) kept as its [`NativeRequest`].
    pub fn request(&self, body: Bytes) -> Result<ChatRequest, LlmError> {
        let mut p = Parser {
            req: ChatRequest::default(),
            first: None,
        };
        p.top(self)?;
        let Parser { mut req, first } = p;
        let mut native = NativeRequest::new(Dialect::Responses, body, req.messages.len());
        if let Some(raw) = self.model_value {
            // Ignored unless `raw` stands in `body` (not so in a body re-assembled).
            native.set_model_value(raw);
        }
        if let Some(e) = first {
            native.set_untranslatable(e);
        }
        req.extensions.insert(native);
        Ok(req)
    }
}

impl<'de> serde::Deserialize<'de> for RequestBody<'de> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = RequestBody<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<RequestBody<'de>, A::Error> {
                let mut members = Vec::with_capacity(map.size_hint().unwrap_or(8));
                let (mut model_value, mut models) = (None, 0u32);
                while let Some(k) = map.next_key::<Key<'de>>()? {
                    let v = match k.as_str() {
                        // A model that is not a string is the slow read's to refuse.
                        "model" => {
                            let m: Key<'de> = map.next_value()?;
                            models += 1;
                            // Widened to its quotes by `parse`.
                            model_value = match &m {
                                Key::Borrowed(s) => Some(*s),
                                Key::Owned(_) => None,
                            };
                            Member::Text(m)
                        }
                        "input" => map.next_value::<TextOrValue<'de>>()?.0,
                        _ => Member::Value(map.next_value()?),
                    };
                    members.push((k, v));
                }
                Ok(RequestBody {
                    members,
                    model_value: model_value.filter(|_| models == 1),
                })
            }
        }
        d.deserialize_map(V)
    }
}

/// A member read as borrowed text when it is a string without escapes, else as a value.
struct TextOrValue<'de>(Member<'de>);

impl<'de> serde::Deserialize<'de> for TextOrValue<'de> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::value::{MapAccessDeserializer, SeqAccessDeserializer};
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = TextOrValue<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_borrowed_str<E>(self, s: &'de str) -> Result<TextOrValue<'de>, E> {
                Ok(TextOrValue(Member::Text(Key::Borrowed(s))))
            }
            fn visit_str<E>(self, s: &str) -> Result<TextOrValue<'de>, E> {
                Ok(TextOrValue(Member::Text(Key::Owned(s.to_owned()))))
            }
            fn visit_string<E>(self, s: String) -> Result<TextOrValue<'de>, E> {
                Ok(TextOrValue(Member::Text(Key::Owned(s))))
            }
            fn visit_bool<E>(self, b: bool) -> Result<TextOrValue<'de>, E> {
                Ok(TextOrValue(Member::Value(Value::Bool(b))))
            }
            fn visit_i64<E>(self, n: i64) -> Result<TextOrValue<'de>, E> {
                Ok(TextOrValue(Member::Value(n.into())))
            }
            fn visit_u64<E>(self, n: u64) -> Result<TextOrValue<'de>, E> {
                Ok(TextOrValue(Member::Value(n.into())))
            }
            fn visit_f64<E>(self, n: f64) -> Result<TextOrValue<'de>, E> {
                Ok(TextOrValue(Member::Value(
                    Number::from_f64(n).map_or(Value::Null, Value::Number),
                )))
            }
            fn visit_unit<E>(self) -> Result<TextOrValue<'de>, E> {
                Ok(TextOrValue(Member::Value(Value::Null)))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                seq: A,
            ) -> Result<TextOrValue<'de>, A::Error> {
                serde::Deserialize::deserialize(SeqAccessDeserializer::new(seq))
                    .map(|v| TextOrValue(Member::Value(v)))
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                map: A,
            ) -> Result<TextOrValue<'de>, A::Error> {
                serde::Deserialize::deserialize(MapAccessDeserializer::new(map))
                    .map(|v| TextOrValue(Member::Value(v)))
            }
        }
        d.deserialize_any(V)
    }
}

/// The known top-level fields of a request, found in one pass over its members (a
/// repeated one as its last value).
#[derive(Default)]
struct Fields<'a, 'b> {
    model: Option<&'a Member<'b>>,
    input: Option<&'a Member<'b>>,
    instructions: Option<&'a Value>,
    tools: Option<&'a Value>,
    tool_choice: Option<&'a Value>,
    text: Option<&'a Value>,
    max_output_tokens: Option<&'a Value>,
    temperature: Option<&'a Value>,
    top_p: Option<&'a Value>,
    metadata: Option<&'a Value>,
    stream: Option<&'a Value>,
    store: Option<&'a Value>,
    previous_response_id: Option<&'a Value>,
    parallel_tool_calls: Option<&'a Value>,
    user: Option<&'a Value>,
    reasoning: Option<&'a Value>,
    truncation: Option<&'a Value>,
    service_tier: Option<&'a Value>,
    prompt_cache_key: Option<&'a Value>,
    safety_identifier: Option<&'a Value>,
    include: Option<&'a Value>,
    background: Option<&'a Value>,
    /// A member not in [`KNOWN`].
    unknown: bool,
}

impl<'a, 'b> Fields<'a, 'b> {
    fn of(top: &'a RequestBody<'b>) -> Self {
        let mut f = Self::default();
        for (k, m) in &top.members {
            match k.as_str() {
                "model" => f.model = Some(m),
                "input" => f.input = Some(m),
                _ => {}
            }
            // Only `model` and `input` are read as text.
            let Member::Value(v) = m else { continue };
            let slot = match k.as_str() {
                "instructions" => &mut f.instructions,
                "tools" => &mut f.tools,
                "tool_choice" => &mut f.tool_choice,
                "text" => &mut f.text,
                "max_output_tokens" => &mut f.max_output_tokens,
                "temperature" => &mut f.temperature,
                "top_p" => &mut f.top_p,
                "metadata" => &mut f.metadata,
                "stream" => &mut f.stream,
                "store" => &mut f.store,
                "previous_response_id" => &mut f.previous_response_id,
                "parallel_tool_calls" => &mut f.parallel_tool_calls,
                "user" => &mut f.user,
                "reasoning" => &mut f.reasoning,
                "truncation" => &mut f.truncation,
                "service_tier" => &mut f.service_tier,
                "prompt_cache_key" => &mut f.prompt_cache_key,
                "safety_identifier" => &mut f.safety_identifier,
                "include" => &mut f.include,
                "background" => &mut f.background,
                "model" | "input" | "stream_options" => continue,
                _ => {
                    f.unknown = true;
                    continue;
                }
            };
            *slot = Some(v);
        }
        f
    }
}

struct Parser {
    req: ChatRequest,
    first: Option<LlmError>,
}

fn str_field<'a>(v: &'a Value, key: &str, at: &str) -> Result<&'a str, LlmError> {
    match v.get(key) {
        Some(Value::String(s)) => Ok(s),
        Some(_) => {
            Err(bad(format!("`{at}.{key}` must be a string")).with_param(format!("{at}.{key}")))
        }
        None => Err(bad(format!("`{at}` needs `{key}`")).with_param(format!("{at}.{key}"))),
    }
}

fn number(v: &Value, param: &str) -> Result<Number, LlmError> {
    match v {
        Value::Number(n) => Ok(n.clone()),
        _ => Err(bad(format!("`{param}` must be a number")).with_param(param)),
    }
}

impl Parser {
    fn cannot(&mut self, param: &str, what: &str) {
        if self.first.is_none() {
            self.first = Some(untranslatable(param, what));
        }
    }

    fn top(&mut self, top: &RequestBody<'_>) -> Result<(), LlmError> {
        let f = Fields::of(top);
        match f.model.map(Member::as_str) {
            Some(Some(m)) if !m.trim().is_empty() => m.clone_into(&mut self.req.model),
            Some(Some(_)) => {
                return Err(bad("`model` must not be empty").with_param("model"));
            }
            Some(None) => return Err(bad("`model` must be a string").with_param("model")),
            None => return Err(bad("`model`: field required").with_param("model")),
        }
        match f.instructions {
            None | Some(Value::Null) => {}
            Some(Value::String(s)) => self.req.messages.push(Message::system(s.as_str())),
            Some(_) => {
                return Err(bad("`instructions` must be a string").with_param("instructions"));
            }
        }
        match f.input {
            Some(Member::Text(s)) => self.req.messages.push(Message::user(s.as_str())),
            Some(Member::Value(Value::String(s))) => {
                self.req.messages.push(Message::user(s.as_str()));
            }
            Some(Member::Value(Value::Array(items))) => {
                for (i, item) in items.iter().enumerate() {
                    self.item(item, i)?;
                }
            }
            _ => {
                return Err(
                    bad("`input` must be a string or an array of input items").with_param("input")
                );
            }
        }
        if let Some(t) = f.temperature.filter(|v| !v.is_null()) {
            self.req.temperature = Some(number(t, "temperature")?);
        }
        if let Some(t) = f.top_p.filter(|v| !v.is_null()) {
            self.req.top_p = Some(number(t, "top_p")?);
        }
        match f.max_output_tokens {
            None | Some(Value::Null) => {}
            Some(v) => {
                let n = v.as_u64().filter(|n| *n >= 1).ok_or_else(|| {
                    bad("`max_output_tokens` must be an integer of at least 1")
                        .with_param("max_output_tokens")
                })?;
                self.req.max_tokens = Some(n);
            }
        }
        match f.stream {
            None | Some(Value::Null) => {}
            Some(Value::Bool(s)) => {
                self.req.stream = Some(*s);
                if *s {
                    self.req.stream_options = Some(StreamOptions {
                        include_usage: Some(true),
                        extra: Extra::new(),
                    });
                }
            }
            Some(_) => return Err(bad("`stream` must be a boolean").with_param("stream")),
        }
        for (key, v) in [("store", f.store), ("background", f.background)] {
            match v {
                None | Some(Value::Null | Value::Bool(_)) => {}
                Some(_) => return Err(bad(format!("`{key}` must be a boolean")).with_param(key)),
            }
        }
        if f.background == Some(&Value::Bool(true)) {
            self.cannot("background", "a background response");
        }
        match f.previous_response_id {
            None | Some(Value::Null | Value::String(_)) => {}
            Some(_) => {
                return Err(bad("`previous_response_id` must be a string")
                    .with_param("previous_response_id"));
            }
        }
        match f.metadata {
            None | Some(Value::Null | Value::Object(_)) => {}
            Some(_) => return Err(bad("`metadata` must be an object").with_param("metadata")),
        }
        match f.user {
            None | Some(Value::Null) => {}
            Some(Value::String(u)) => self.req.user = Some(u.clone()),
            Some(_) => return Err(bad("`user` must be a string").with_param("user")),
        }
        for (key, v) in [
            ("parallel_tool_calls", f.parallel_tool_calls),
            ("service_tier", f.service_tier),
            ("prompt_cache_key", f.prompt_cache_key),
            ("safety_identifier", f.safety_identifier),
        ] {
            if let Some(v) = v.filter(|v| !v.is_null()) {
                self.req.extra.insert(key.into(), v.clone());
            }
        }
        if let Some(tools) = f.tools.filter(|v| !v.is_null()) {
            self.tools(tools)?;
        }
        if let Some(choice) = f.tool_choice.filter(|v| !v.is_null()) {
            self.tool_choice(choice)?;
        }
        if let Some(text) = f.text.filter(|v| !v.is_null()) {
            self.text(text)?;
        }
        match f.reasoning {
            None | Some(Value::Null) => {}
            Some(Value::Object(r)) => {
                for (k, v) in r {
                    match (k.as_str(), v) {
                        (_, Value::Null) => {}
                        ("effort", e) => {
                            self.req.extra.insert("reasoning_effort".into(), e.clone());
                        }
                        _ => self.cannot(&format!("reasoning.{k}"), "this reasoning option"),
                    }
                }
            }
            Some(_) => return Err(bad("`reasoning` must be an object").with_param("reasoning")),
        }
        match f.truncation {
            None | Some(Value::Null) => {}
            Some(Value::String(t)) if t == "disabled" => {}
            Some(_) => self.cannot("truncation", "automatic truncation"),
        }
        match f.include {
            None | Some(Value::Null) => {}
            Some(Value::Array(a)) if a.is_empty() => {}
            Some(_) => self.cannot("include", "`include`"),
        }
        if f.unknown {
            // In key order, each once with its last value: the first named is the same
            // whatever order the client sent them in.
            let mut unknown = std::collections::BTreeMap::new();
            for (k, m) in &top.members {
                if let Member::Value(v) = m
                    && !KNOWN.contains(&k.as_str())
                {
                    unknown.insert(k.as_str(), v);
                }
            }
            for (k, v) in unknown {
                // Kept in the view, so that the cache key tells such requests apart.
                self.req.extra.insert(k.to_owned(), v.clone());
                self.cannot(k, "this field");
            }
        }
        Ok(())
    }

    fn item(&mut self, item: &Value, i: usize) -> Result<(), LlmError> {
        let at = format!("input[{i}]");
        let Value::Object(o) = item else {
            return Err(bad(format!("`{at}` must be an object")).with_param(at));
        };
        let kind = match o.get("type") {
            None => "message",
            Some(Value::String(t)) => t.as_str(),
            Some(_) => {
                return Err(
                    bad(format!("`{at}.type` must be a string")).with_param(format!("{at}.type"))
                );
            }
        };
        match kind {
            "message" => self.message(item, &at),
            "function_call" => {
                let call_id = str_field(item, "call_id", &at)?;
                let name = str_field(item, "name", &at)?;
                let arguments = str_field(item, "arguments", &at)?;
                let call = ToolCall {
                    id: call_id.to_owned(),
                    kind: "function".into(),
                    function: FunctionCall {
                        name: name.to_owned(),
                        arguments: arguments.to_owned(),
                        extra: Extra::new(),
                    },
                    extra: Extra::new(),
                };
                // Consecutive calls (and the text just before them) are one chat turn.
                match self.req.messages.last_mut() {
                    Some(m) if m.role == Role::Assistant => {
                        m.tool_calls.get_or_insert_with(Vec::new).push(call);
                    }
                    _ => self.req.messages.push(Message {
                        role: Role::Assistant,
                        content: Some(None),
                        tool_calls: Some(vec![call]),
                        ..Message::default()
                    }),
                }
                Ok(())
            }
            "function_call_output" => {
                let call_id = str_field(item, "call_id", &at)?;
                let text = match o.get("output") {
                    Some(Value::String(s)) => s.clone(),
                    Some(Value::Array(parts)) => {
                        let mut text = String::new();
                        for (k, p) in parts.iter().enumerate() {
                            let pat = format!("{at}.output[{k}]");
                            match str_field(p, "type", &pat)? {
                                "input_text" | "output_text" => {
                                    text.push_str(str_field(p, "text", &pat)?);
                                }
                                other => self.cannot(&pat, &format!("an `{other}` tool output")),
                            }
                        }
                        text
                    }
                    _ => {
                        return Err(bad(format!("`{at}.output` must be a string or an array"))
                            .with_param(format!("{at}.output")));
                    }
                };
                self.req.messages.push(Message {
                    role: Role::Tool,
                    content: Some(Some(Content::Text(text))),
                    tool_call_id: Some(call_id.to_owned()),
                    ..Message::default()
                });
                Ok(())
            }
            // The previous model's private reasoning: a chat model cannot take it back.
            "reasoning" => Ok(()),
            other => {
                self.cannot(&at, &format!("an input item of type `{other}`"));
                Ok(())
            }
        }
    }

    fn message(&mut self, m: &Value, at: &str) -> Result<(), LlmError> {
        let role = match str_field(m, "role", at)? {
            "user" => Role::User,
            "assistant" => Role::Assistant,
            "system" => Role::System,
            "developer" => Role::Developer,
            other => {
                return Err(bad(format!(
                    "`{at}.role` must be user, assistant, system or developer, not `{other}`"
                ))
                .with_param(format!("{at}.role")));
            }
        };
        let content = match m.get("content") {
            Some(Value::String(s)) => Content::Text(s.clone()),
            Some(Value::Array(parts)) => {
                let mut out = Vec::with_capacity(parts.len());
                for (j, p) in parts.iter().enumerate() {
                    let pat = format!("{at}.content[{j}]");
                    match str_field(p, "type", &pat)? {
                        "input_text" | "output_text" | "text" => out.push(ContentPart::Text {
                            text: str_field(p, "text", &pat)?.to_owned(),
                            extra: Extra::new(),
                        }),
                        "refusal" => out.push(ContentPart::Text {
                            text: str_field(p, "refusal", &pat)?.to_owned(),
                            extra: Extra::new(),
                        }),
                        "input_image" => match p.get("image_url") {
                            Some(Value::String(url)) => out.push(ContentPart::ImageUrl {
                                image_url: ImageUrl {
                                    url: url.clone(),
                                    detail: p
                                        .get("detail")
                                        .and_then(Value::as_str)
                                        .map(str::to_owned),
                                    extra: Extra::new(),
                                },
                                extra: Extra::new(),
                            }),
                            _ => self.cannot(&pat, "an image given by `file_id`"),
                        },
                        other => self.cannot(&pat, &format!("an `{other}` content part")),
                    }
                }
                // One text part is the plain string form (what most chat servers expect).
                match out.as_slice() {
                    [ContentPart::Text { text, .. }] => Content::Text(text.clone()),
                    _ => Content::Parts(out),
                }
            }
            _ => {
                return Err(bad(format!(
                    "`{at}.content` must be a string or an array of parts"
                ))
                .with_param(format!("{at}.content")));
            }
        };
        self.req.messages.push(Message {
            role,
            content: Some(Some(content)),
            ..Message::default()
        });
        Ok(())
    }

    fn tools(&mut self, tools: &Value) -> Result<(), LlmError> {
        let Value::Array(tools) = tools else {
            return Err(bad("`tools` must be an array").with_param("tools"));
        };
        let mut out = Vec::with_capacity(tools.len());
        for (i, t) in tools.iter().enumerate() {
            let at = format!("tools[{i}]");
            match str_field(t, "type", &at)? {
                "function" => {
                    let mut extra = Extra::new();
                    if let Some(s) = t.get("strict").filter(|v| !v.is_null()) {
                        extra.insert("strict".into(), s.clone());
                    }
                    out.push(Tool {
                        kind: "function".into(),
                        function: Some(FunctionDef {
                            name: str_field(t, "name", &at)?.to_owned(),
                            description: t
                                .get("description")
                                .and_then(Value::as_str)
                                .map(str::to_owned),
                            parameters: t.get("parameters").filter(|v| !v.is_null()).cloned(),
                            extra,
                        }),
                        extra: Extra::new(),
                    });
                }
                other => self.cannot(&at, &format!("the hosted tool `{other}`")),
            }
        }
        if !out.is_empty() {
            self.req.tools = Some(out);
        }
        Ok(())
    }

    fn tool_choice(&mut self, c: &Value) -> Result<(), LlmError> {
        let choice = match c {
            Value::String(s) if matches!(s.as_str(), "auto" | "none" | "required") => c.clone(),
            Value::Object(o) if o.get("type").and_then(Value::as_str) == Some("function") => {
                let name = str_field(c, "name", "tool_choice")?;
                json!({"type": "function", "function": {"name": name}})
            }
            Value::Object(_) => {
                self.cannot("tool_choice", "this tool choice");
                return Ok(());
            }
            _ => {
                return Err(
                    bad("`tool_choice` must be auto, none, required or an object")
                        .with_param("tool_choice"),
                );
            }
        };
        self.req.tool_choice = Some(choice);
        Ok(())
    }

    fn text(&mut self, text: &Value) -> Result<(), LlmError> {
        let Value::Object(o) = text else {
            return Err(bad("`text` must be an object").with_param("text"));
        };
        for (k, v) in o {
            match (k.as_str(), v) {
                (_, Value::Null) => {}
                ("format", f) => {
                    let format = match str_field(f, "type", "text.format")? {
                        "text" => continue,
                        "json_object" => ResponseFormat {
                            kind: "json_object".into(),
                            json_schema: None,
                            extra: Extra::new(),
                        },
                        "json_schema" => {
                            let mut extra = Extra::new();
                            if let Some(d) = f.get("description").filter(|v| !v.is_null()) {
                                extra.insert("description".into(), d.clone());
                            }
                            ResponseFormat {
                                kind: "json_schema".into(),
                                json_schema: Some(JsonSchemaFormat {
                                    name: str_field(f, "name", "text.format")?.to_owned(),
                                    schema: f.get("schema").cloned(),
                                    strict: f.get("strict").and_then(Value::as_bool),
                                    extra,
                                }),
                                extra: Extra::new(),
                            }
                        }
                        other => {
                            return Err(bad(format!(
                                "`text.format.type` must be text, json_object or json_schema, not `{other}`"
                            ))
                            .with_param("text.format.type"));
                        }
                    };
                    self.req.response_format = Some(format);
                }
                ("verbosity", v) => {
                    self.req.extra.insert("verbosity".into(), v.clone());
                }
                _ => self.cannot(&format!("text.{k}"), "this text option"),
            }
        }
        Ok(())
    }
}

// ===== answers =====

/// The request fields a Responses answer echoes (`instructions`, `tools`, `metadata`, …),
/// read from the client's body, plus `previous_response_id` when the edge resolved one.
#[derive(Debug, Clone, Default)]
pub struct Echo(Map<String, Value>);

impl Echo {
    /// The echoed fields of `body` (a Responses request); empty when it is not an object.
    pub fn from_body(body: &[u8]) -> Self {
        let top: Map<String, Value> = crate::json::from_slice(body).unwrap_or_default();
        Self(
            top.into_iter()
                .filter(|(k, _)| ECHOED.contains(&k.as_str()))
                .collect(),
        )
    }

    /// Sets an echoed field.
    pub fn set(&mut self, key: &str, value: Value) {
        self.0.insert(key.to_owned(), value);
    }

    /// The `previous_response_id` echoed, if one was given.
    pub fn previous_response_id(&self) -> Option<&str> {
        self.0.get("previous_response_id").and_then(Value::as_str)
    }

    fn get(&self, key: &str) -> Value {
        self.0.get(key).cloned().unwrap_or(Value::Null)
    }
}

/// A new response id, `resp_…`: the clock in nanoseconds, the process id and a counter,
/// so ids stay unique across restarts (a stored id is never reused).
pub fn new_response_id() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!(
        "resp_{:016x}{:08x}{:06x}",
        nanos as u64,
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed) & 0xff_ffff
    )
}

/// [`Usage`] as Responses usage (`input_tokens`, `output_tokens`, their details, total).
pub fn usage_to_json(u: &Usage) -> Value {
    json!({
        "input_tokens": u.prompt_tokens,
        "input_tokens_details": {"cached_tokens": u.cached_tokens()},
        "output_tokens": u.completion_tokens,
        "output_tokens_details": {"reasoning_tokens": u.reasoning_tokens()},
        "total_tokens": u.prompt_tokens.saturating_add(u.completion_tokens),
    })
}

/// Responses usage → [`Usage`]; counts read saturating (the upstream is not trusted).
pub fn usage_from(v: &Value) -> Usage {
    let n = |v: Option<&Value>| v.and_then(Value::as_u64).unwrap_or(0);
    let mut u = Usage::new(n(v.get("input_tokens")), n(v.get("output_tokens")));
    let cached = v
        .get("input_tokens_details")
        .and_then(|d| d.get("cached_tokens"))
        .and_then(Value::as_u64);
    if cached.is_some() {
        u.prompt_tokens_details = Some(PromptTokensDetails {
            cached_tokens: cached,
            ..PromptTokensDetails::default()
        });
    }
    let reasoning = v
        .get("output_tokens_details")
        .and_then(|d| d.get("reasoning_tokens"))
        .and_then(Value::as_u64);
    if reasoning.is_some() {
        u.completion_tokens_details = Some(CompletionTokensDetails {
            reasoning_tokens: reasoning,
            ..CompletionTokensDetails::default()
        });
    }
    u
}

/// One streamed Responses API event, read into borrowed fields (no JSON tree is built; the
/// `response` objects of `response.created` and `.completed` carry the whole answer, which
/// a full parse would build only to drop it): what a decoder of the stream needs to follow
/// it and what its chat view ([`view`](Self::view)) reads.
///
/// ```
/// use llm_tower_core::StreamHead;
/// use llm_tower_core::dialect::responses::StreamScan;
///
/// let data = br#"{"type":"response.output_text.delta","output_index":0,"delta":"hi","sequence_number":3}"#;
/// let scan = StreamScan::parse(data).unwrap();
/// assert_eq!(scan.kind(), "response.output_text.delta");
/// let chunk = scan.view(&StreamHead::default(), None, None).unwrap();
/// assert_eq!(chunk.choices[0].delta.text(), Some("hi"));
/// ```
#[derive(Debug, serde::Deserialize)]
pub struct StreamScan<'a> {
    #[serde(rename = "type", borrow, default)]
    kind: LenientStr<'a>,
    #[serde(default)]
    output_index: Option<Value>,
    #[serde(borrow, default)]
    delta: LenientStr<'a>,
    #[serde(borrow, default)]
    item: Option<Box<ScanItem<'a>>>,
    #[serde(borrow, default)]
    response: Option<Box<ScanResponse<'a>>>,
}

#[derive(Debug, serde::Deserialize)]
struct ScanItem<'a> {
    #[serde(rename = "type", borrow, default)]
    kind: LenientStr<'a>,
    #[serde(borrow, default)]
    call_id: LenientStr<'a>,
    #[serde(borrow, default)]
    name: LenientStr<'a>,
    #[serde(borrow, default)]
    arguments: LenientStr<'a>,
}

#[derive(Debug, serde::Deserialize)]
struct ScanResponse<'a> {
    #[serde(borrow, default)]
    id: LenientStr<'a>,
    #[serde(borrow, default)]
    model: LenientStr<'a>,
    #[serde(default)]
    created_at: Option<Value>,
    #[serde(borrow, default)]
    usage: Option<&'a serde_json::value::RawValue>,
    /// The usage as the hand-written check read it (`usage` is then not kept).
    #[serde(skip)]
    read_usage: Option<Option<Usage>>,
    /// Where the object is in the event's data and whether its `status` is `failed`, as
    /// the hand-written check read them (`None` through serde, or where its `id` or
    /// `status` is neither a string nor `null`).
    #[serde(skip)]
    stored: Option<(std::ops::Range<usize>, bool)>,
}

impl<'a> StreamScan<'a> {
    /// Reads an event's data: a JSON object (anything else is refused).
    pub fn parse(data: &'a [u8]) -> serde_json::Result<Self> {
        // The common events (deltas, parts, items' ends) by hand; the rest through serde.
        if let Ok(text) = std::str::from_utf8(data)
            && let Some(scan) = Self::common(text)
        {
            return Ok(scan);
        }
        crate::json::from_object(data)
    }

    /// [`parse`](Self::parse) by the hand-written check
    /// ([`check_responses_event`](crate::encoded::scan::check_responses_event)).
    fn common(text: &'a str) -> Option<Self> {
        use crate::json::Key;
        let string = |found| LenientStr::scanned(text, found);
        let found = crate::encoded::scan::check_responses_event(text.as_bytes())?;
        let item = match found.item {
            Some(i) => Some(Box::new(ScanItem {
                kind: string(i.kind)?,
                call_id: string(i.call_id)?,
                name: string(i.name)?,
                arguments: string(i.arguments)?,
            })),
            None => None,
        };
        let response = match found.response {
            Some(r) => {
                let failed = string(r.status)?.as_deref() == Some("failed");
                Some(Box::new(ScanResponse {
                    id: string(r.id)?,
                    model: string(r.model)?,
                    created_at: r.created_at.map(Value::from),
                    usage: None,
                    read_usage: Some(r.usage),
                    stored: (!r.odd).then_some((r.range, failed)),
                }))
            }
            None => None,
        };
        Some(Self {
            kind: LenientStr(Some(Key::Borrowed(&text[found.kind]))),
            output_index: found.output_index.map(Value::from),
            delta: string(found.delta)?,
            item,
            response,
        })
    }

    /// The event's `type` (`""` without one).
    pub fn kind(&self) -> &str {
        self.kind.as_deref().unwrap_or_default()
    }

    /// The event's `output_index`, when it is a whole number.
    pub fn output_index(&self) -> Option<u64> {
        self.output_index.as_ref().and_then(Value::as_u64)
    }

    /// Whether an `response.output_item.added` adds a function call.
    pub fn adds_call(&self) -> bool {
        self.item.as_ref().and_then(|i| i.kind.as_deref()) == Some("function_call")
    }

    /// The `response` object's id, model and `created_at` (`response.created`).
    pub fn response_head(&self) -> (Option<&str>, Option<&str>, u64) {
        let r = self.response.as_ref();
        (
            r.and_then(|r| r.id.as_deref()),
            r.and_then(|r| r.model.as_deref()),
            r.and_then(|r| r.created_at.as_ref())
                .and_then(Value::as_u64)
                .unwrap_or(0),
        )
    }

    /// The usage of the `response` object, when it is an object.
    pub fn usage(&self) -> Option<Usage> {
        let response = self.response.as_ref()?;
        if let Some(read) = &response.read_usage {
            return read.clone();
        }
        let raw = response.usage?;
        let v: Value = serde_json::from_str(raw.get()).ok()?;
        v.is_object().then(|| usage_from(&v))
    }

    /// Where the event's `response` object is in its data, and the id a response store
    /// keeps it under (its `id`, unless its `status` is `failed`), when the hand-written
    /// check read them; `None` otherwise (read the data itself).
    pub fn stored_response(&self) -> Option<(std::ops::Range<usize>, Option<&str>)> {
        let r = self.response.as_ref()?;
        let (range, failed) = r.stored.clone()?;
        Some((range, r.id.as_deref().filter(|_| !failed)))
    }

    /// Whether the event ends the answer (`response.completed`, `.incomplete`).
    pub fn is_end(&self) -> bool {
        matches!(self.kind(), "response.completed" | "response.incomplete")
    }

    /// Whether the event's chat view has a choice (see [`view`](Self::view)), given the
    /// chat tool index of its function call (`tool`).
    pub fn has_content(&self, tool: Option<u32>) -> bool {
        match self.kind() {
            "response.created" | "response.output_text.delta" => true,
            "response.output_item.added" => self.adds_call(),
            "response.function_call_arguments.delta" => tool.is_some(),
            _ => self.is_end(),
        }
    }

    /// The event's chat view: the chunk a chat client gets for it, with `head`'s id and
    /// model; `tool` is the chat tool index of a function call's events and, on the end,
    /// how many calls the answer made (its finish reason is then `tool_calls`); `usage`
    /// the answer's usage, on its end. `None` for an event with no chat meaning.
    pub fn view(
        &self,
        head: &StreamHead,
        tool: Option<u32>,
        usage: Option<&Usage>,
    ) -> Option<ChatChunk> {
        let chunk = |delta: Delta, finish: Option<String>| {
            ChatChunk::for_delta(
                head.id.clone(),
                head.created,
                head.model.clone(),
                delta,
                finish,
            )
        };
        let call = |index: u32, id: Option<&str>, name: Option<&str>, args: &str| Delta {
            tool_calls: Some(vec![ToolCallDelta {
                index,
                id: id.map(str::to_owned),
                kind: id.map(|_| "function".to_owned()),
                function: Some(FunctionCallDelta {
                    name: name.map(str::to_owned),
                    arguments: Some(args.to_owned()),
                    extra: Extra::new(),
                }),
                extra: Extra::new(),
            }]),
            ..Delta::default()
        };
        match self.kind() {
            "response.created" => Some(chunk(
                Delta {
                    role: Some(Role::Assistant),
                    content: Some(Some(String::new())),
                    ..Delta::default()
                },
                None,
            )),
            "response.output_text.delta" => Some(chunk(
                Delta {
                    content: Some(Some(self.delta.as_deref().unwrap_or_default().to_owned())),
                    ..Delta::default()
                },
                None,
            )),
            "response.output_item.added" if self.adds_call() => {
                let item = self.item.as_ref()?;
                Some(chunk(
                    call(
                        tool.unwrap_or_default(),
                        Some(item.call_id.as_deref().unwrap_or_default()),
                        item.name.as_deref(),
                        item.arguments.as_deref().unwrap_or_default(),
                    ),
                    None,
                ))
            }
            "response.function_call_arguments.delta" => Some(chunk(
                call(tool?, None, None, self.delta.as_deref().unwrap_or_default()),
                None,
            )),
            kind @ ("response.completed" | "response.incomplete") => {
                let finish = if tool.is_some_and(|n| n > 0) {
                    "tool_calls"
                } else if kind == "response.incomplete" {
                    "length"
                } else {
                    "stop"
                };
                let mut last = chunk(Delta::default(), Some(finish.to_owned()));
                last.usage = usage.map(|u| Some(u.clone()));
                Some(last)
            }
            _ => None,
        }
    }
}

/// The chat view of a native Responses event ([`NativeEvent::decode`]): its
/// [`StreamScan::view`], or a chunk with no choices for an event with no chat meaning.
pub(crate) fn native_view(ev: &NativeEvent) -> Result<ChatChunk, LlmError> {
    let scan = StreamScan::parse(ev.data())
        .map_err(|e| LlmError::transport(format!("malformed JSON in a stream event: {e}")))?;
    Ok(scan
        .view(ev.head(), ev.tool(), ev.usage())
        .unwrap_or_else(|| {
            let h = ev.head();
            let mut c = ChatChunk::for_delta(
                h.id.clone(),
                h.created,
                h.model.clone(),
                Delta::default(),
                None,
            );
            c.choices.clear();
            c
        }))
}

fn item_suffix(id: &str, n: usize) -> String {
    let base = id.strip_prefix("resp_").unwrap_or(id);
    format!("{base}_{n}")
}

/// The response object around `output`, as OpenAI writes it.
fn envelope(
    id: &str,
    created_at: u64,
    model: &str,
    status: &str,
    output: Vec<Value>,
    usage: Option<&Usage>,
    echo: &Echo,
) -> Value {
    let incomplete = match status {
        "incomplete" => json!({"reason": "max_output_tokens"}),
        _ => Value::Null,
    };
    let text = match echo.get("text") {
        Value::Null => json!({"format": {"type": "text"}}),
        t => t,
    };
    let tool_choice = match echo.get("tool_choice") {
        Value::Null => json!("auto"),
        t => t,
    };
    json!({
        "id": id,
        "object": "response",
        "created_at": created_at,
        "status": status,
        "error": null,
        "incomplete_details": incomplete,
        "instructions": echo.get("instructions"),
        "max_output_tokens": echo.get("max_output_tokens"),
        "model": model,
        "output": output,
        "parallel_tool_calls": echo.get("parallel_tool_calls").as_bool().unwrap_or(true),
        "previous_response_id": echo.get("previous_response_id"),
        "reasoning": echo.get("reasoning"),
        "store": echo.get("store").as_bool().unwrap_or(true),
        "temperature": echo.get("temperature"),
        "text": text,
        "tool_choice": tool_choice,
        "tools": match echo.get("tools") { Value::Null => json!([]), t => t },
        "top_p": echo.get("top_p"),
        "truncation": match echo.get("truncation") { Value::Null => json!("disabled"), t => t },
        "usage": usage.map(usage_to_json),
        "user": echo.get("user"),
        "metadata": match echo.get("metadata") { Value::Null => json!({}), m => m },
    })
}

fn status_of(finish: Option<&str>) -> &'static str {
    match finish {
        Some("length") => "incomplete",
        _ => "completed",
    }
}

/// Translates a chat-completions response (its first choice) into a Responses API
/// response with id `id`: reasoning as a `reasoning` item, the text as a `message` item,
/// tool calls as `function_call` items; usage mapped, `length` as `incomplete`.
///
/// ```
/// use llm_tower_core::ChatResponse;
/// use llm_tower_core::dialect::responses::{Echo, response_to_json};
/// let v = response_to_json(&ChatResponse::from_text("gpt-4o-mini", "Hi!"), "resp_1", &Echo::default());
/// assert_eq!(v["object"], "response");
/// assert_eq!(v["output"][0]["content"][0]["text"], "Hi!");
/// assert_eq!(v["status"], "completed");
/// ```
pub fn response_to_json(r: &ChatResponse, id: &str, echo: &Echo) -> Value {
    let mut output = Vec::new();
    let mut finish = None;
    if let Some(choice) = r.choices.first() {
        let m = &choice.message;
        if let Some(Value::String(t)) = m.extra.get("reasoning_content")
            && !t.is_empty()
        {
            output.push(json!({
                "id": format!("rs_{}", item_suffix(id, output.len())),
                "type": "reasoning",
                "summary": [{"type": "summary_text", "text": t}],
            }));
        }
        let text = m.text();
        if !text.is_empty() || m.tool_calls.is_none() {
            output.push(json!({
                "id": format!("msg_{}", item_suffix(id, output.len())),
                "type": "message",
                "status": "completed",
                "role": "assistant",
                "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}],
            }));
        }
        for tc in m.tool_calls.iter().flatten() {
            output.push(json!({
                "id": format!("fc_{}", item_suffix(id, output.len())),
                "type": "function_call",
                "status": "completed",
                "call_id": tc.id,
                "name": tc.function.name,
                "arguments": tc.function.arguments,
            }));
        }
        finish = choice.finish_reason.as_deref();
    }
    let created = if r.created > 0 {
        r.created
    } else {
        crate::response::unix_now()
    };
    envelope(
        id,
        created,
        &r.model,
        status_of(finish),
        output,
        Some(r.usage.as_ref().unwrap_or(&Usage::default())),
        echo,
    )
}

/// Translates a Responses API response into a chat-completions response: `output_text`
/// parts joined, `function_call` items as tool calls, reasoning summaries as
/// `reasoning_content`, usage mapped. The error names what is malformed.
///
/// ```
/// use llm_tower_core::dialect::responses::response_from_json;
/// let r = response_from_json(&serde_json::json!({
///     "id": "resp_1", "object": "response", "model": "gpt-4o", "status": "completed",
///     "output": [{"type": "message", "role": "assistant",
///                 "content": [{"type": "output_text", "text": "Hi!"}]}],
///     "usage": {"input_tokens": 5, "output_tokens": 2, "total_tokens": 7}
/// })).unwrap();
/// assert_eq!(r.text(), "Hi!");
/// assert_eq!(r.usage.unwrap().total_tokens, 7);
/// ```
pub fn response_from_json(v: &Value) -> Result<ChatResponse, String> {
    let obj = v.as_object().ok_or("not a JSON object")?;
    let output = obj
        .get("output")
        .and_then(Value::as_array)
        .ok_or("missing `output`")?;
    let mut text: Option<String> = None;
    let mut reasoning: Option<String> = None;
    let mut calls = Vec::new();
    for item in output {
        match item.get("type").and_then(Value::as_str) {
            Some("message") => {
                for part in item
                    .get("content")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                {
                    let t = part
                        .get("text")
                        .or_else(|| part.get("refusal"))
                        .and_then(Value::as_str)
                        .unwrap_or("");
                    text.get_or_insert_with(String::new).push_str(t);
                }
            }
            Some("reasoning") => {
                for s in item
                    .get("summary")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                {
                    let t = s.get("text").and_then(Value::as_str).unwrap_or("");
                    reasoning.get_or_insert_with(String::new).push_str(t);
                }
            }
            Some("function_call") => {
                let s = |k: &str| item.get(k).and_then(Value::as_str).unwrap_or("").to_owned();
                calls.push(ToolCall {
                    id: s("call_id"),
                    kind: "function".into(),
                    function: FunctionCall {
                        name: item
                            .get("name")
                            .and_then(Value::as_str)
                            .ok_or("a function_call item without `name`")?
                            .to_owned(),
                        arguments: s("arguments"),
                        extra: Extra::new(),
                    },
                    extra: Extra::new(),
                });
            }
            _ => {}
        }
    }
    let mut extra = Extra::new();
    if let Some(r) = reasoning {
        extra.insert("reasoning_content".into(), Value::from(r));
    }
    let tool_calls = (!calls.is_empty()).then_some(calls);
    let finish = if tool_calls.is_some() {
        "tool_calls"
    } else if obj.get("status").and_then(Value::as_str) == Some("incomplete") {
        "length"
    } else {
        "stop"
    };
    let content = match text {
        Some(t) => Some(Some(Content::Text(t))),
        None if tool_calls.is_some() => Some(None),
        None => Some(Some(Content::Text(String::new()))),
    };
    let s = |k: &str| obj.get(k).and_then(Value::as_str).unwrap_or("").to_owned();
    Ok(ChatResponse {
        id: s("id"),
        object: "chat.completion".into(),
        created: obj
            .get("created_at")
            .and_then(Value::as_u64)
            .unwrap_or_else(crate::response::unix_now),
        model: s("model"),
        choices: vec![Choice {
            index: 0,
            message: Message {
                role: Role::Assistant,
                content,
                tool_calls,
                extra,
                ..Message::default()
            },
            finish_reason: Some(finish.to_owned()),
            extra: Extra::new(),
        }],
        usage: obj.get("usage").filter(|u| u.is_object()).map(usage_from),
        extra: Extra::new(),
    })
}

/// A JSON array whose items are skipped.
struct IgnoredArray;

impl<'de> serde::Deserialize<'de> for IgnoredArray {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = IgnoredArray;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("an array")
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut a: A,
            ) -> Result<IgnoredArray, A::Error> {
                while a.next_element::<serde::de::IgnoredAny>()?.is_some() {}
                Ok(IgnoredArray)
            }
        }
        d.deserialize_seq(V)
    }
}

/// Checks that `json` is a Responses API answer (`"object": "response"`, a string `id` and
/// `model`, an `output` array); returns its model and usage.
pub(crate) fn check_response(json: &[u8]) -> serde_json::Result<(String, Option<Usage>)> {
    #[derive(serde::Deserialize)]
    struct Shape {
        #[serde(rename = "id")]
        _id: String,
        object: String,
        model: String,
        // Checked to be an array, its items skipped (not collected).
        #[serde(rename = "output")]
        _output: IgnoredArray,
        #[serde(default)]
        usage: Option<ShapeUsage>,
    }
    // The counts as `usage_from` reads them (anything else in them is ignored), without
    // building the object.
    #[derive(serde::Deserialize)]
    struct ShapeUsage {
        #[serde(default)]
        input_tokens: Option<Value>,
        #[serde(default)]
        output_tokens: Option<Value>,
        #[serde(default)]
        input_tokens_details: Option<Value>,
        #[serde(default)]
        output_tokens_details: Option<Value>,
    }
    let shape: Shape = crate::json::from_slice(json)?;
    if shape.object != "response" {
        return Err(serde::de::Error::custom(format!(
            "`object` is `{}`, not `response`",
            shape.object
        )));
    }
    let usage = shape.usage.map(|u| {
        let n = |v: &Option<Value>| v.as_ref().and_then(Value::as_u64).unwrap_or(0);
        let mut usage = Usage::new(n(&u.input_tokens), n(&u.output_tokens));
        let detail = |v: &Option<Value>, k: &str| v.as_ref()?.get(k)?.as_u64();
        if let Some(cached) = detail(&u.input_tokens_details, "cached_tokens") {
            usage.prompt_tokens_details = Some(PromptTokensDetails {
                cached_tokens: Some(cached),
                ..PromptTokensDetails::default()
            });
        }
        if let Some(r) = detail(&u.output_tokens_details, "reasoning_tokens") {
            usage.completion_tokens_details = Some(CompletionTokensDetails {
                reasoning_tokens: Some(r),
                ..CompletionTokensDetails::default()
            });
        }
        usage
    });
    Ok((shape.model, usage))
}

// ===== input items =====

/// The query of `GET /v1/responses/{id}/input_items`: `limit` (1 to 100, default 20),
/// `order` (`asc` or `desc`, the default: the newest item first) and `after` (the id of
/// the item the page starts after). `include` and unknown parameters are ignored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InputItemsQuery {
    /// Items per page.
    pub limit: usize,
    /// Oldest first.
    pub ascending: bool,
    /// The page starts after this item.
    pub after: Option<String>,
}

impl Default for InputItemsQuery {
    fn default() -> Self {
        Self {
            limit: 20,
            ascending: false,
            after: None,
        }
    }
}

/// Longest `after` cursor read (ids are far shorter).
const MAX_CURSOR_BYTES: usize = 1024;

impl InputItemsQuery {
    /// Parses a URL query string (`limit=5&order=asc&after=msg_1`); a bad value is a 400
    /// naming the parameter.
    ///
    /// ```
    /// use llm_tower_core::dialect::responses::InputItemsQuery;
    /// let q = InputItemsQuery::parse(Some("limit=5&order=asc&after=msg%5F1")).unwrap();
    /// assert_eq!((q.limit, q.ascending, q.after.as_deref()), (5, true, Some("msg_1")));
    /// assert_eq!(InputItemsQuery::parse(None).unwrap(), InputItemsQuery::default());
    /// assert!(InputItemsQuery::parse(Some("limit=0")).is_err());
    /// assert!(InputItemsQuery::parse(Some("order=up")).is_err());
    /// ```
    pub fn parse(query: Option<&str>) -> Result<Self, LlmError> {
        let mut q = Self::default();
        for (key, value) in form_urlencoded::parse(query.unwrap_or("").as_bytes()) {
            match &*key {
                "limit" => {
                    q.limit = value
                        .parse::<usize>()
                        .ok()
                        .filter(|n| (1..=100).contains(n))
                        .ok_or_else(|| {
                            bad(format!(
                                "`limit` must be an integer from 1 to 100, not `{}`",
                                shorten(&value)
                            ))
                            .with_param("limit")
                        })?;
                }
                "order" => {
                    q.ascending = match &*value {
                        "asc" => true,
                        "desc" => false,
                        other => {
                            return Err(bad(format!(
                                "`order` must be `asc` or `desc`, not `{}`",
                                shorten(other)
                            ))
                            .with_param("order"));
                        }
                    };
                }
                "after" => {
                    // Invalid UTF-8 decodes to U+FFFD, which no item id holds.
                    if value.is_empty()
                        || value.len() > MAX_CURSOR_BYTES
                        || value.contains(char::REPLACEMENT_CHARACTER)
                    {
                        return Err(bad("`after` must be an item id").with_param("after"));
                    }
                    q.after = Some(value.into_owned());
                }
                _ => {}
            }
        }
        Ok(q)
    }
}

/// An input item's id: its own, or one made from the response id and its position (the
/// same on every call, so `after` finds it again).
fn input_item_id(response_id: &str, n: usize, item: &Value) -> String {
    if let Some(id) = item.get("id").and_then(Value::as_str) {
        return id.to_owned();
    }
    let prefix = match item.get("type").and_then(Value::as_str) {
        None | Some("message") => "msg",
        Some("function_call") => "fc",
        Some("function_call_output") => "fco",
        Some("reasoning") => "rs",
        Some(_) => "item",
    };
    let base = response_id.strip_prefix("resp_").unwrap_or(response_id);
    format!("{prefix}_{base}_in{n}")
}

/// An input item as OpenAI lists it: with its id, a message with its `type`, `status` and
/// its content as parts (a string becomes one `input_text`, `output_text` for the
/// assistant).
fn listed_item(id: String, item: &Value) -> Value {
    let mut v = match item {
        Value::Object(o) => o.clone(),
        other => return json!({"id": id, "type": "message", "content": other}),
    };
    v.insert("id".into(), id.into());
    if v.get("type").is_none_or(|t| t == "message") {
        v.entry("type").or_insert_with(|| "message".into());
        v.entry("status").or_insert_with(|| "completed".into());
        if let Some(Value::String(text)) = v.get("content") {
            let kind = if v.get("role").and_then(Value::as_str) == Some("assistant") {
                "output_text"
            } else {
                "input_text"
            };
            let part = json!([{"type": kind, "text": text}]);
            v.insert("content".into(), part);
        }
    }
    Value::Object(v)
}

/// A page of `GET /v1/responses/{id}/input_items`: the list object (`data`, `first_id`,
/// `last_id`, `has_more`) over the conversation `input` stored with response
/// `response_id`. An `after` that names no item is a 400.
///
/// ```
/// use llm_tower_core::dialect::responses::{InputItemsQuery, input_items_page};
/// let input = serde_json::json!([{"role": "user", "content": "Hi"},
///                                {"id": "msg_a", "type": "message", "role": "assistant",
///                                 "content": [{"type": "output_text", "text": "Hello"}]},
///                                {"role": "user", "content": "More"}]);
/// let q = InputItemsQuery { limit: 2, ..InputItemsQuery::default() };
/// let page = input_items_page("resp_1", &input, &q).unwrap();
/// assert_eq!(page["object"], "list");
/// assert_eq!(page["data"][0]["content"][0]["text"], "More"); // newest first
/// assert_eq!(page["last_id"], "msg_a");
/// assert_eq!(page["has_more"], true);
/// ```
pub fn input_items_page(
    response_id: &str,
    input: &Value,
    q: &InputItemsQuery,
) -> Result<Value, LlmError> {
    let items: &[Value] = input.as_array().map_or(&[], Vec::as_slice);
    let mut order: Vec<usize> = (0..items.len()).collect();
    if !q.ascending {
        order.reverse();
    }
    let start = match &q.after {
        None => 0,
        Some(after) => {
            order
                .iter()
                .position(|&n| input_item_id(response_id, n, &items[n]) == *after)
                .ok_or_else(|| {
                    bad(format!(
                        "`after`: no input item `{}` in response '{response_id}'",
                        shorten(after)
                    ))
                    .with_param("after")
                })?
                + 1
        }
    };
    let rest = &order[start.min(order.len())..];
    let page = &rest[..rest.len().min(q.limit)];
    let data: Vec<Value> = page
        .iter()
        .map(|&n| listed_item(input_item_id(response_id, n, &items[n]), &items[n]))
        .collect();
    let id_at = |i: Option<&Value>| i.and_then(|v| v.get("id")).cloned().unwrap_or(Value::Null);
    Ok(json!({
        "object": "list",
        "first_id": id_at(data.first()),
        "last_id": id_at(data.last()),
        "has_more": rest.len() > page.len(),
        "data": data,
    }))
}

/// At most 64 bytes of `s`, for an error message.
fn shorten(s: &str) -> &str {
    let mut end = s.len().min(64);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

// ===== errors =====

/// The OpenAI error `type` for an error kind.
fn error_type(kind: ErrorKind) -> &'static str {
    match kind {
        ErrorKind::RateLimited | ErrorKind::BudgetExceeded => "rate_limit_error",
        ErrorKind::BadRequest | ErrorKind::ContextLengthExceeded | ErrorKind::ContentFiltered => {
            "invalid_request_error"
        }
        ErrorKind::Auth => "authentication_error",
        ErrorKind::NotFound => "invalid_request_error",
        _ => "server_error",
    }
}

/// The stream `error` event for `e`.
pub fn error_event(e: &LlmError, sequence_number: u64) -> Value {
    json!({
        "type": "error",
        "code": e.code().unwrap_or(error_type(e.kind())),
        "message": e.message(),
        "param": e.param(),
        "sequence_number": sequence_number,
    })
}

// ===== streams =====

#[derive(Debug, Clone, Copy, PartialEq)]
enum Open {
    None,
    Text,
    Tool(u32),
}

/// Chat-completions chunks → the Responses API's streamed events, each with its
/// `sequence_number`.
///
/// Events in order: `response.created` and `response.in_progress` with the first chunk;
/// for text `response.output_item.added`, `response.content_part.added`,
/// `response.output_text.delta`…, `response.output_text.done`,
/// `response.content_part.done`, `response.output_item.done`; for a tool call
/// `response.output_item.added`, `response.function_call_arguments.delta`…,
/// `response.function_call_arguments.done`, `response.output_item.done`; at the end
/// `response.completed` (or `response.incomplete`) with the whole response. A failure
/// after the start is `response.failed`. Chunks that carry their original event
/// ([`NATIVE_EVENT`](super::NATIVE_EVENT)) are written as they are, except that when
/// the echo names a `previous_response_id` (the edge resolved it, so the upstream never
/// saw it) the response objects of `response.created`, `.completed`, … say that id.
///
/// ```
/// use llm_tower_core::ChatChunk;
/// use llm_tower_core::dialect::responses::{Echo, EventEncoder};
///
/// let mut enc = EventEncoder::new("resp_1".into(), Echo::default());
/// let mut out = Vec::new();
/// enc.push(&ChatChunk::text("c1", "m", "Hel"), &mut out);
/// enc.push(&ChatChunk::text("c1", "m", "lo"), &mut out);
/// enc.finish(&mut out);
/// let text = String::from_utf8(out).unwrap();
/// assert!(text.starts_with("event: response.created\n"));
/// assert!(text.contains("event: response.output_text.delta\n"));
/// assert_eq!(enc.final_response().unwrap()["output"][0]["content"][0]["text"], "Hello");
/// // What a response store keeps: the id, and the response as JSON text.
/// assert_eq!(enc.final_store_id(), Some("resp_1"));
/// assert!(enc.take_final_json().unwrap().starts_with(b"{"));
/// ```
#[derive(Debug)]
pub struct EventEncoder {
    id: String,
    echo: Echo,
    model: String,
    created_at: u64,
    seq: u64,
    started: bool,
    native: bool,
    ended: bool,
    open: Open,
    output: Vec<Value>,
    text: String,
    args: String,
    finish: Option<String>,
    usage: Option<Usage>,
    tools_seen: Vec<u32>,
    pending_call: Option<Value>,
    last: Option<Final>,
    keep_final: bool,
}

/// The whole response of a stream's end: built (a translated stream, or an upstream's
/// patched with `previous_response_id`), or the upstream's JSON text as it came, with the
/// id it is stored under (see [`EventEncoder::final_store_id`]).
#[derive(Debug)]
enum Final {
    Built(Value),
    Raw {
        json: Bytes,
        store_id: Option<String>,
    },
}

/// The `response` member of an upstream's last event, as its JSON text (not parsed into a
/// tree: it is stored as it came), in a copy of its own size (a slice would keep the
/// upstream's read buffer alive for as long as a store keeps it). `None` when the event is
/// not an object with one.
fn raw_response(data: &[u8]) -> Option<Final> {
    if let Ok(text) = std::str::from_utf8(data)
        && let Some(found) = crate::encoded::scan::final_response(text.as_bytes())
    {
        let failed = found.status.is_some_and(|r| &text[r] == "failed");
        return Some(Final::Raw {
            json: Bytes::copy_from_slice(&data[found.response]),
            store_id: found.id.filter(|_| !failed).map(|r| text[r].to_owned()),
        });
    }
    raw_response_serde(data)
}

/// [`raw_response`] through serde.
fn raw_response_serde(data: &[u8]) -> Option<Final> {
    #[derive(serde::Deserialize)]
    struct End<'a> {
        #[serde(borrow)]
        response: Option<&'a serde_json::value::RawValue>,
    }
    let end: End<'_> = serde_json::from_slice(data).ok()?;
    let json = end.response?.get();
    Some(Final::Raw {
        json: Bytes::copy_from_slice(json.as_bytes()),
        store_id: store_id(json.as_bytes()),
    })
}

/// The id a response (JSON text) is stored under: its `id`, unless its `status` is
/// `failed`.
fn store_id(json: &[u8]) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct Head<'a> {
        #[serde(borrow)]
        id: Option<std::borrow::Cow<'a, str>>,
        #[serde(borrow)]
        status: Option<std::borrow::Cow<'a, str>>,
    }
    let head: Head<'_> = serde_json::from_slice(json).ok()?;
    if head.status.as_deref() == Some("failed") {
        return None;
    }
    head.id.map(std::borrow::Cow::into_owned)
}

impl EventEncoder {
    /// An encoder for the response `id` (used when the stream is translated), echoing
    /// `echo`.
    pub fn new(id: String, echo: Echo) -> Self {
        Self {
            id,
            echo,
            model: String::new(),
            created_at: crate::response::unix_now(),
            seq: 0,
            started: false,
            native: false,
            ended: false,
            open: Open::None,
            output: Vec::new(),
            text: String::new(),
            args: String::new(),
            finish: None,
            usage: None,
            tools_seen: Vec::new(),
            pending_call: None,
            last: None,
            keep_final: true,
        }
    }

    /// Whether to keep the whole response of the stream's end for
    /// [`final_response`](Self::final_response) (default `true`). Without it, an
    /// upstream's last event is written without being parsed.
    pub fn keep_final(mut self, keep: bool) -> Self {
        self.keep_final = keep;
        self
    }

    /// Whether the stream's end or an error was written.
    pub fn is_ended(&self) -> bool {
        self.ended
    }

    /// The whole response of a stream that ended (`response.completed` / `.incomplete` /
    /// `.failed`), translated or as the upstream sent it.
    pub fn final_response(&self) -> Option<Value> {
        match self.last.as_ref()? {
            Final::Built(v) => Some(v.clone()),
            Final::Raw { json, .. } => serde_json::from_slice(json).ok(),
        }
    }

    /// The id to store the [`final_response`](Self::final_response) under: its `id`,
    /// unless its `status` is `failed` (or it has no string `id`).
    pub fn final_store_id(&self) -> Option<&str> {
        match self.last.as_ref()? {
            Final::Built(v) => (v.get("status").and_then(Value::as_str) != Some("failed"))
                .then(|| v.get("id").and_then(Value::as_str))
                .flatten(),
            Final::Raw { store_id, .. } => store_id.as_deref(),
        }
    }

    /// [`final_response`](Self::final_response) as JSON text, taken out of the encoder:
    /// an upstream's as it came, without a parse.
    pub fn take_final_json(&mut self) -> Option<Bytes> {
        match self.last.take()? {
            Final::Built(v) => serde_json::to_vec(&v).ok().map(Bytes::from),
            Final::Raw { json, .. } => Some(json),
        }
    }

    fn event(&mut self, mut v: Value, out: &mut Vec<u8>) {
        v["sequence_number"] = self.seq.into();
        self.seq = self.seq.saturating_add(1);
        let name = v
            .get("type")
            .and_then(Value::as_str)
            .unwrap_or("error")
            .to_owned();
        write_frame(out, &name, &v.to_string());
    }

    fn snapshot(&self, status: &str, output: Vec<Value>, usage: Option<&Usage>) -> Value {
        envelope(
            &self.id,
            self.created_at,
            &self.model,
            status,
            output,
            usage,
            &self.echo,
        )
    }

    fn start(&mut self, chunk: &ChatChunk, out: &mut Vec<u8>) {
        self.started = true;
        self.model.clone_from(&chunk.model);
        let r = self.snapshot("in_progress", Vec::new(), None);
        self.event(json!({"type": "response.created", "response": r}), out);
        self.event(json!({"type": "response.in_progress", "response": r}), out);
    }

    fn item_id(&self, prefix: &str) -> String {
        format!("{prefix}_{}", item_suffix(&self.id, self.output.len()))
    }

    fn close(&mut self, out: &mut Vec<u8>) {
        let index = self.output.len();
        match self.open {
            Open::None => return,
            Open::Text => {
                let id = self.item_id("msg");
                let text = std::mem::take(&mut self.text);
                let part =
                    json!({"type": "output_text", "text": text, "annotations": [], "logprobs": []});
                self.event(
                    json!({"type": "response.output_text.done", "item_id": id, "output_index": index,
                           "content_index": 0, "text": text, "logprobs": []}),
                    out,
                );
                self.event(
                    json!({"type": "response.content_part.done", "item_id": id, "output_index": index,
                           "content_index": 0, "part": part}),
                    out,
                );
                let item = json!({"id": id, "type": "message", "status": "completed",
                                  "role": "assistant", "content": [part]});
                self.event(
                    json!({"type": "response.output_item.done", "output_index": index, "item": item}),
                    out,
                );
                self.output.push(item);
            }
            Open::Tool(_) => {
                let id = self.item_id("fc");
                let args = std::mem::take(&mut self.args);
                let mut item = self.pending_call.take().unwrap_or_else(|| json!({}));
                item["id"] = id.clone().into();
                item["status"] = "completed".into();
                item["arguments"] = args.clone().into();
                self.event(
                    json!({"type": "response.function_call_arguments.done", "item_id": id,
                           "output_index": index, "name": item["name"].clone(), "arguments": args}),
                    out,
                );
                self.event(
                    json!({"type": "response.output_item.done", "output_index": index, "item": item.clone()}),
                    out,
                );
                self.output.push(item);
            }
        }
        self.open = Open::None;
    }

    /// Writes an upstream's own event (see [`NativeEvent`]) as it came (but see the type's
    /// documentation for `previous_response_id`); the encoder then writes nothing of its
    /// own.
    pub fn push_native(&mut self, event: &NativeEvent, out: &mut Vec<u8>) {
        if self.ended {
            return;
        }
        self.native(
            event.name(),
            event.data(),
            event.answer(),
            |out| event.write_frame(out),
            out,
        );
    }

    /// An upstream's own event `name` with its `data` and, where its reader found it, the
    /// whole answer it carries (see [`NativeEvent::answer`]); `write` writes it as it came.
    fn native(
        &mut self,
        name: &str,
        data: &[u8],
        answer: Option<(&[u8], Option<&str>)>,
        write: impl FnOnce(&mut Vec<u8>),
        out: &mut Vec<u8>,
    ) {
        self.native = true;
        self.started = true;
        self.seq = self.seq.saturating_add(1);
        let ends = matches!(
            name,
            "response.completed" | "response.incomplete" | "response.failed"
        );
        match self
            .echo
            .previous_response_id()
            .filter(|_| carries_response(name))
        {
            // The edge resolved `previous_response_id` and removed it, so the upstream
            // says `null`: the client must read the id it sent.
            Some(prev) => match serde_json::from_slice::<Value>(data) {
                Ok(mut v) => {
                    if let Some(r) = v.get_mut("response").and_then(Value::as_object_mut) {
                        r.insert("previous_response_id".into(), prev.into());
                    }
                    write_frame(out, name, &v.to_string());
                    if ends {
                        self.last = v.get_mut("response").map(Value::take).map(Final::Built);
                    }
                }
                Err(_) => write(out),
            },
            None => {
                write(out);
                if ends && self.keep_final {
                    self.last = match answer {
                        // A copy of its own size: a slice would keep the upstream's read
                        // buffer alive for as long as a store keeps it.
                        Some((json, id)) => Some(Final::Raw {
                            json: Bytes::copy_from_slice(json),
                            store_id: id.map(str::to_owned),
                        }),
                        None => raw_response(data),
                    };
                }
            }
        }
        if ends {
            self.ended = true;
        }
    }

    /// Adds the events for `chunk` to `out`.
    pub fn push(&mut self, chunk: &ChatChunk, out: &mut Vec<u8>) {
        if self.ended {
            return;
        }
        if let Some(frame) = super::native_event(chunk) {
            let name = frame_name(frame).unwrap_or("message");
            let data = frame_data_text(frame);
            self.native(
                name,
                data.as_bytes(),
                None,
                |out| out.extend_from_slice(frame.as_bytes()),
                out,
            );
            return;
        }
        if self.native {
            return;
        }
        if !self.started {
            self.start(chunk, out);
        }
        if let Some(u) = chunk.usage() {
            self.usage = Some(u.clone());
        }
        let Some(choice) = chunk.choices.iter().find(|c| c.index == 0) else {
            return;
        };
        if let Some(t) = choice.delta.text()
            && !t.is_empty()
        {
            if self.open != Open::Text {
                self.close(out);
                self.open = Open::Text;
                let index = self.output.len();
                let id = self.item_id("msg");
                self.event(
                    json!({"type": "response.output_item.added", "output_index": index,
                           "item": {"id": id, "type": "message", "status": "in_progress",
                                    "role": "assistant", "content": []}}),
                    out,
                );
                self.event(
                    json!({"type": "response.content_part.added", "item_id": id, "output_index": index,
                           "content_index": 0,
                           "part": {"type": "output_text", "text": "", "annotations": [], "logprobs": []}}),
                    out,
                );
            }
            self.text.push_str(t);
            let index = self.output.len();
            let id = self.item_id("msg");
            self.event(
                json!({"type": "response.output_text.delta", "item_id": id, "output_index": index,
                       "content_index": 0, "delta": t, "logprobs": []}),
                out,
            );
        }
        for tc in choice.delta.tool_calls.iter().flatten() {
            if self.open != Open::Tool(tc.index) {
                if self.tools_seen.contains(&tc.index) {
                    self.error(
                        &LlmError::transport(
                            "the upstream interleaved the arguments of two tool calls",
                        ),
                        out,
                    );
                    return;
                }
                self.close(out);
                self.tools_seen.push(tc.index);
                self.open = Open::Tool(tc.index);
                let f = tc.function.as_ref();
                let index = self.output.len();
                let item = json!({
                    "id": self.item_id("fc"),
                    "type": "function_call",
                    "status": "in_progress",
                    "call_id": tc.id.clone().unwrap_or_default(),
                    "name": f.and_then(|f| f.name.clone()).unwrap_or_default(),
                    "arguments": "",
                });
                self.pending_call = Some(item.clone());
                self.event(
                    json!({"type": "response.output_item.added", "output_index": index, "item": item}),
                    out,
                );
            }
            if let Some(args) = tc.function.as_ref().and_then(|f| f.arguments.as_deref())
                && !args.is_empty()
            {
                self.args.push_str(args);
                let index = self.output.len();
                let id = self.item_id("fc");
                self.event(
                    json!({"type": "response.function_call_arguments.delta", "item_id": id,
                           "output_index": index, "delta": args}),
                    out,
                );
            }
        }
        if let Some(r) = choice.finish_reason() {
            self.finish = Some(r.to_owned());
        }
    }

    /// Writes the end of a stream that completed (`response.completed`, or
    /// `response.incomplete` when the model ran out of tokens).
    pub fn finish(&mut self, out: &mut Vec<u8>) {
        if self.ended || self.native {
            self.ended = true;
            return;
        }
        if !self.started {
            self.start(&ChatChunk::default(), out);
        }
        self.close(out);
        let status = status_of(self.finish.as_deref());
        let usage = self.usage.clone().unwrap_or_default();
        let r = self.snapshot(status, self.output.clone(), Some(&usage));
        let name = if status == "incomplete" {
            "response.incomplete"
        } else {
            "response.completed"
        };
        self.event(json!({"type": name, "response": r}), out);
        self.last = Some(Final::Built(r));
        self.ended = true;
    }

    /// Writes the end of a stream that failed after it started: `response.failed` (an
    /// `error` event on a stream whose events came from the upstream).
    pub fn error(&mut self, e: &LlmError, out: &mut Vec<u8>) {
        if self.ended {
            return;
        }
        self.ended = true;
        if self.native || !self.started {
            let v = error_event(e, self.seq);
            self.seq = self.seq.saturating_add(1);
            write_frame(out, "error", &v.to_string());
            return;
        }
        let output = std::mem::take(&mut self.output);
        let mut r = self.snapshot("failed", output, None);
        r["error"] = json!({"code": e.code().unwrap_or("server_error"), "message": e.message()});
        self.event(json!({"type": "response.failed", "response": r}), out);
    }
}

/// The event name of an SSE frame as [`write_frame`] writes it.
fn frame_name(frame: &str) -> Option<&str> {
    frame.strip_prefix("event: ")?.split('\n').next()
}

/// Whether a native frame is one of the events that carry the whole response object
/// (`response.created`, `.in_progress`, `.completed`, `.incomplete`, `.failed`,
/// `.queued`): one dot in the name, where the item events have two.
fn carries_response(name: &str) -> bool {
    name.strip_prefix("response.")
        .is_some_and(|rest| !rest.contains('.'))
}

/// The data of an SSE frame as [`write_frame`] writes it.
fn frame_data_text(frame: &str) -> String {
    let mut data = String::new();
    for line in frame.lines() {
        if let Some(d) = line
            .strip_prefix("data: ")
            .or_else(|| line.strip_prefix("data:"))
        {
            if !data.is_empty() {
                data.push('\n');
            }
            data.push_str(d);
        }
    }
    data
}

// ===== the store =====

/// A stored response: what `previous_response_id` continues from and
/// `GET /v1/responses/{id}` returns.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredResponse {
    /// The response id (`resp_…`).
    pub id: String,
    /// The tenant that created it; no other tenant can read or delete it.
    pub tenant: String,
    /// The whole conversation's input items up to this response (previous ones included).
    pub input: Value,
    /// The response object as the client received it, as JSON text (kept as text:
    /// storing an upstream's answer parses nothing; its `output` continues the
    /// conversation, see [`output`](Self::output)).
    pub response: Bytes,
    /// Unix milliseconds.
    pub created_at: i64,
    /// Unix milliseconds after which the response is gone.
    pub expires_at: i64,
}

impl StoredResponse {
    /// The response's `output` items (none when the stored JSON has none).
    ///
    /// ```
    /// use llm_tower_core::dialect::responses::StoredResponse;
    /// let r = StoredResponse { id: "resp_1".into(), tenant: "a".into(), input: serde_json::json!([]),
    ///     response: r#"{"id":"resp_1","output":[{"type":"message"}]}"#.into(),
    ///     created_at: 0, expires_at: 10 };
    /// assert_eq!(r.output()[0]["type"], "message");
    /// ```
    pub fn output(&self) -> Vec<Value> {
        #[derive(serde::Deserialize)]
        struct Output {
            #[serde(default)]
            output: Vec<Value>,
        }
        crate::json::from_slice::<Output>(&self.response)
            .map(|o| o.output)
            .unwrap_or_default()
    }
}

/// The `id` of a Responses API answer's JSON, read without building the rest. When the
/// document is one already checked (an [`EncodedResponse`](crate::EncodedResponse) of
/// this dialect: valid JSON, one `id`) and `id` is its first member, as OpenAI writes it,
/// nothing after it is read.
///
/// ```
/// use llm_tower_core::dialect::responses::response_id;
/// assert_eq!(response_id(br#"{"id":"resp_1","object":"response","output":[]}"#).as_deref(), Some("resp_1"));
/// assert_eq!(response_id(br#"{"object":"response","id":"resp_1","output":[]}"#).as_deref(), Some("resp_1"));
/// assert_eq!(response_id(b"[]"), None);
/// ```
pub fn response_id(json: &[u8]) -> Option<String> {
    if let Some(id) = leading_id(json) {
        return Some(id.to_owned());
    }
    #[derive(serde::Deserialize)]
    struct Id {
        id: String,
    }
    crate::json::from_slice::<Id>(json).ok().map(|i| i.id)
}

/// `{"id":"…"` at the start of `json` (whitespace allowed), the id without escapes.
fn leading_id(json: &[u8]) -> Option<&str> {
    fn ws(b: &[u8]) -> &[u8] {
        let n = b
            .iter()
            .take_while(|c| matches!(c, b' ' | b'\n' | b'\r' | b'\t'))
            .count();
        &b[n..]
    }
    let rest = ws(json).strip_prefix(b"{")?;
    let rest = ws(rest).strip_prefix(b"\"id\"")?;
    let rest = ws(rest).strip_prefix(b":")?;
    let rest = ws(rest).strip_prefix(b"\"")?;
    let end = rest
        .iter()
        .position(|&c| c == b'"' || c == b'\\' || c < 0x20)?;
    if rest[end] != b'"' {
        return None;
    }
    std::str::from_utf8(&rest[..end]).ok()
}

/// The future every [`ResponseStore`] method returns.
pub type StoreFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, LlmError>> + Send + 'a>>;

/// Where stored responses live (the jobs store implements it for SQLite and PostgreSQL).
/// Times are Unix milliseconds passed in by the caller. Every read and delete is scoped by
/// tenant.
pub trait ResponseStore: Send + Sync + std::fmt::Debug + 'static {
    /// Stores (or replaces, for the same tenant and id) a response.
    fn put_response(&self, r: StoredResponse) -> StoreFuture<'_, ()>;
    /// The tenant's response `id`, unless unknown, another tenant's or expired.
    fn get_response<'a>(
        &'a self,
        tenant: &'a str,
        id: &'a str,
        now: i64,
    ) -> StoreFuture<'a, Option<StoredResponse>>;
    /// Deletes the tenant's response `id`; whether there was one.
    fn delete_response<'a>(&'a self, tenant: &'a str, id: &'a str) -> StoreFuture<'a, bool>;
    /// Deletes expired responses; how many.
    fn purge_expired_responses(&self, now: i64) -> StoreFuture<'_, u64>;
}

/// An in-memory [`ResponseStore`] holding at most `capacity` responses (the oldest go
/// first); for tests and for a server without a database.
///
/// ```
/// use llm_tower_core::dialect::responses::{MemoryResponseStore, ResponseStore, StoredResponse};
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// let store = MemoryResponseStore::new(100);
/// let r = StoredResponse { id: "resp_1".into(), tenant: "a".into(), input: serde_json::json!([]),
///     response: "{}".into(), created_at: 0, expires_at: 10 };
/// store.put_response(r).await.unwrap();
/// assert!(store.get_response("a", "resp_1", 5).await.unwrap().is_some());
/// assert!(store.get_response("b", "resp_1", 5).await.unwrap().is_none());
/// assert!(store.get_response("a", "resp_1", 10).await.unwrap().is_none());
/// # }
/// ```
#[derive(Debug)]
pub struct MemoryResponseStore {
    capacity: usize,
    rows: std::sync::Mutex<MemoryRows>,
}

/// The rows by tenant and id, and their keys in the order they came (for eviction).
#[derive(Debug, Default)]
struct MemoryRows {
    by_key: std::collections::HashMap<(String, String), StoredResponse>,
    order: std::collections::VecDeque<(String, String)>,
}

impl MemoryResponseStore {
    /// A store for at most `capacity` responses.
    pub fn new(capacity: usize) -> Self {
        Self {
            capacity: capacity.max(1),
            rows: std::sync::Mutex::new(MemoryRows::default()),
        }
    }

    fn rows(&self) -> std::sync::MutexGuard<'_, MemoryRows> {
        self.rows
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl ResponseStore for MemoryResponseStore {
    fn put_response(&self, r: StoredResponse) -> StoreFuture<'_, ()> {
        let mut rows = self.rows();
        let key = (r.tenant.clone(), r.id.clone());
        // A replaced row keeps its place in the eviction order.
        if rows.by_key.insert(key.clone(), r).is_none() {
            rows.order.push_back(key);
        }
        while rows.by_key.len() > self.capacity {
            let Some(oldest) = rows.order.pop_front() else {
                break;
            };
            rows.by_key.remove(&oldest);
        }
        Box::pin(async { Ok(()) })
    }

    fn get_response<'a>(
        &'a self,
        tenant: &'a str,
        id: &'a str,
        now: i64,
    ) -> StoreFuture<'a, Option<StoredResponse>> {
        let found = self
            .rows()
            .by_key
            .get(&(tenant.to_owned(), id.to_owned()))
            .filter(|x| x.expires_at > now)
            .cloned();
        Box::pin(async move { Ok(found) })
    }

    fn delete_response<'a>(&'a self, tenant: &'a str, id: &'a str) -> StoreFuture<'a, bool> {
        let mut rows = self.rows();
        let key = (tenant.to_owned(), id.to_owned());
        let gone = rows.by_key.remove(&key).is_some();
        if gone {
            rows.order.retain(|k| *k != key);
        }
        Box::pin(async move { Ok(gone) })
    }

    fn purge_expired_responses(&self, now: i64) -> StoreFuture<'_, u64> {
        let mut rows = self.rows();
        let before = rows.by_key.len();
        rows.by_key.retain(|_, x| x.expires_at > now);
        let MemoryRows { by_key, order } = &mut *rows;
        order.retain(|k| by_key.contains_key(k));
        let n = (before - by_key.len()) as u64;
        Box::pin(async move { Ok(n) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The hand-written read of the common events reads what serde reads, and never
    /// accepts what serde refuses (checked on every document one byte away).
    #[test]
    fn the_hand_read_of_common_events_is_serdes() {
        let seeds = [
            r#"{"type":"response.output_text.delta","item_id":"m","output_index":0,"content_index":0,"delta":"Hi \"x\"\n \u00e9","logprobs":[],"sequence_number":4}"#,
            r#"{"type":"response.function_call_arguments.delta","output_index":1,"delta":"{\"a\":","sequence_number":9}"#,
            r#"{"type":"response.content_part.added","content_index":0,"item_id":"m","output_index":0,"part":{"annotations":[],"logprobs":[],"text":"","type":"output_text"},"sequence_number":3}"#,
            r#" { "delta" : "x" , "type" : "response.output_text.delta" , "n" : [ 1 , 2.5e-3 , -0 , true , null ] } "#,
            r#"{"type":"response.created","response":{"created_at":1796386973,"error":null,"id":"resp_1","model":"gpt-4o-mini","output":[],"text":{"format":{"type":"text"}},"tools":[],"usage":null},"sequence_number":0}"#,
            r#"{"type":"response.completed","response":{"id":"r\u00e9","created_at":-1,"model":7,"output":[{"type":"message","content":[{"type":"output_text","text":"hi"}]}],"usage":{"input_tokens":12,"input_tokens_details":{"cached_tokens":2},"output_tokens":3,"output_tokens_details":{"reasoning_tokens":null},"total_tokens":15}}}"#,
            r#"{"type":"response.output_item.added","output_index":1,"item":{"type":"function_call","id":"fc_1","call_id":"call_\"1","name":"get","arguments":"","status":"in_progress"}}"#,
            r#"{"type":"response.output_item.done","item":null,"response":{"usage":"x","created_at":null}}"#,
        ];
        let head = StreamHead::default();
        let read = |s: &StreamScan<'_>| {
            (
                s.kind().to_owned(),
                s.output_index(),
                s.adds_call(),
                {
                    let (id, model, created) = s.response_head();
                    (id.map(str::to_owned), model.map(str::to_owned), created)
                },
                s.usage(),
                s.view(&head, Some(0), None),
            )
        };
        let mut accepted = 0;
        for seed in seeds {
            let fast = StreamScan::common(seed).expect(seed);
            let slow: StreamScan<'_> = crate::json::from_object(seed.as_bytes()).unwrap();
            assert_eq!(read(&fast), read(&slow), "{seed}");
            crate::json::one_byte_away(seed, |doc| {
                let Ok(text) = std::str::from_utf8(doc) else {
                    return;
                };
                if let Some(fast) = StreamScan::common(text) {
                    accepted += 1;
                    let slow: StreamScan<'_> = crate::json::from_object(doc)
                        .unwrap_or_else(|e| panic!("serde refuses {text}: {e}"));
                    assert_eq!(read(&fast), read(&slow), "{text}");
                }
            });
        }
        assert!(accepted > 100, "{accepted}");
    }

    /// A stream's last response as read for a store: its JSON text and store id.
    fn raw(f: Final) -> (Bytes, Option<String>) {
        match f {
            Final::Raw { json, store_id } => (json, store_id),
            Final::Built(_) => unreachable!("a raw response"),
        }
    }

    /// The hand-written scan of a stream's last event reads what serde reads (the
    /// response's JSON text and the id it is stored under) and never accepts what serde
    /// refuses (checked on every document one byte away).
    #[test]
    fn the_hand_read_of_the_last_event_is_serdes() {
        let seeds = [
            r#"{"type":"response.completed","response":{"id":"resp_1","object":"response","status":"completed","output":[{"type":"message","content":[]}],"usage":{"input_tokens":1}},"sequence_number":9}"#,
            r#" { "response" : { "status" : "failed" , "id" : "r" } , "type" : "response.failed" } "#,
            r#"{"response":{"id":null,"status":null,"n":[1,2.5e-3,true,"\u00e9"]}}"#,
        ];
        let mut accepted = 0;
        let mut check = |doc: &[u8]| {
            let Ok(text) = std::str::from_utf8(doc) else {
                return;
            };
            if crate::encoded::scan::final_response(doc).is_none() {
                return;
            }
            accepted += 1;
            let fast = raw_response(doc).map(raw);
            let slow = raw_response_serde(doc).map(raw);
            assert!(slow.is_some(), "serde refuses {text}");
            assert_eq!(fast, slow, "{text}");
        };
        for seed in seeds {
            check(seed.as_bytes());
            crate::json::one_byte_away(seed, &mut check);
        }
        assert!(accepted > 100, "{accepted}");
    }

    /// Where the event reader found the last event's response and the id to store it
    /// under ([`StreamScan::stored_response`], what the writer then takes without reading
    /// the event again), serde reads the same (checked on every document one byte away).
    #[test]
    fn the_response_the_event_read_found_is_the_one_serde_reads() {
        let seeds = [
            r#"{"type":"response.completed","response":{"id":"resp_1","object":"response","status":"completed","output":[{"type":"message","content":[]}],"usage":{"input_tokens":1,"output_tokens":2,"total_tokens":3}},"sequence_number":9}"#,
            r#" { "response" : { "status" : "failed" , "id" : "r" } , "type" : "response.incomplete" } "#,
            r#"{"type":"response.completed","response":{"id":"r\u00e9\"","status":null,"n":[1,2.5e-3,true,"\u00e9"]}}"#,
            r#"{"type":"response.completed","response":{"id":null,"status":"incomplete"}}"#,
        ];
        let mut found = 0;
        let mut check = |doc: &[u8]| {
            let Ok(text) = std::str::from_utf8(doc) else {
                return;
            };
            let Some(scan) = StreamScan::common(text) else {
                return;
            };
            let Some((range, id)) = scan.stored_response() else {
                return;
            };
            found += 1;
            let fast = (Bytes::copy_from_slice(&doc[range]), id.map(str::to_owned));
            let slow = raw_response_serde(doc).map(raw);
            assert_eq!(Some(fast), slow, "{text}");
        };
        for seed in seeds {
            let scan = StreamScan::common(seed).expect(seed);
            assert!(scan.stored_response().is_some(), "the seed is read: {seed}");
            check(seed.as_bytes());
            crate::json::one_byte_away(seed, &mut check);
        }
        assert!(found > 100, "{found}");
        // An `id` or `status` of another type: left to the writer's own read.
        for doc in [
            r#"{"type":"response.completed","response":{"id":7}}"#,
            r#"{"type":"response.completed","response":{"id":"r","status":{}}}"#,
        ] {
            let scan = StreamScan::common(doc).unwrap();
            assert_eq!(scan.stored_response(), None, "{doc}");
            assert_eq!(raw_response(doc.as_bytes()).map(raw).unwrap().1, None);
        }
    }

    #[test]
    fn items_become_chat_turns() {
        let req = request_from_slice(
            br#"{"model":"m","input":[
                {"role":"user","content":[{"type":"input_text","text":"weather?"},
                    {"type":"input_image","image_url":"https://x/y.png"}]},
                {"type":"function_call","call_id":"c1","name":"get","arguments":"{}"},
                {"type":"function_call","call_id":"c2","name":"get","arguments":"{\"a\":1}"},
                {"type":"function_call_output","call_id":"c1","output":"sunny"},
                {"type":"function_call_output","call_id":"c2","output":"rain"},
                {"type":"reasoning","id":"rs_1","summary":[]}
            ],"tools":[{"type":"function","name":"get","parameters":{"type":"object"}}],
              "tool_choice":{"type":"function","name":"get"},
              "text":{"format":{"type":"json_schema","name":"w","schema":{"type":"object"},"strict":true}}}"#,
        )
        .unwrap();
        assert_eq!(req.messages.len(), 4);
        assert_eq!(req.messages[1].tool_calls.as_ref().unwrap().len(), 2);
        assert_eq!(req.messages[2].tool_call_id.as_deref(), Some("c1"));
        assert_eq!(
            req.tools.as_ref().unwrap()[0]
                .function
                .as_ref()
                .unwrap()
                .name,
            "get"
        );
        assert_eq!(req.tool_choice.as_ref().unwrap()["function"]["name"], "get");
        let f = req.response_format.as_ref().unwrap();
        assert_eq!(f.json_schema.as_ref().unwrap().name, "w");
        let native = req.extensions.get::<NativeRequest>().unwrap();
        assert!(native.check_translatable().is_ok());
    }

    #[test]
    fn the_typed_read_and_the_value_read_agree() {
        // Typed; then with a model that is not a string, so as JSON values.
        let body = r#"{"model":"a","input":"x","z_b":1,"z_a":2,"input":"y","model":"b"}"#;
        let req = request_from_slice(body.as_bytes()).unwrap();
        assert_eq!(req.model, "b");
        assert_eq!(req.messages[0].text(), "y");
        let native = req.extensions.get::<NativeRequest>().unwrap();
        // Unknown fields are named in key order, whatever order they came in.
        assert_eq!(
            native.check_translatable().unwrap_err().param(),
            Some("z_a")
        );
        let e = request_from_slice(br#"{"model":1,"input":"x"}"#).unwrap_err();
        assert_eq!(e.message(), "`model` must be a string");
        let e = request_from_slice(b"[1]").unwrap_err();
        assert!(
            e.message().starts_with("invalid request body"),
            "{}",
            e.message()
        );
        let top = RequestBody::parse(br#"{"store":true,"store":false,"input":[1]}"#).unwrap();
        assert!(!top.store());
    }

    #[test]
    fn the_body_sent_is_the_clients_with_the_model_written_in_place() {
        let body = br#"{ "model" : "gpt",  "input":"hi", "z": [1.50] }"#;
        let req = request_from_slice(body).unwrap();
        let native = req.extensions.get::<NativeRequest>().unwrap();
        let sent = native.body_for(&req, "gpt-\"x\"", &[]).unwrap();
        let want = String::from_utf8_lossy(body).replace(r#""gpt""#, r#""gpt-\"x\"""#);
        assert_eq!(String::from_utf8(sent).unwrap(), want);
        // Re-assembled members are sent as a `Map` writes them.
        let mut top = RequestBody::parse(br#"{"model":"m","z":1,"input":"a"}"#).unwrap();
        top.insert("input", json!([{"role": "user", "content": "b"}]));
        let body = Bytes::from(top.to_vec().unwrap());
        assert_eq!(
            &body[..],
            br#"{"input":[{"content":"b","role":"user"}],"model":"m","z":1}"#
        );
        let req = top.request(body).unwrap();
        let native = req.extensions.get::<NativeRequest>().unwrap();
        let sent: Value =
            serde_json::from_slice(&native.body_for(&req, "n", &[]).unwrap()).unwrap();
        assert_eq!(sent["model"], "n");
        assert_eq!(sent["input"][0]["content"], "b");
    }

    #[test]
    fn untranslatable_fields_are_named() {
        for (body, field) in [
            (
                r#"{"model":"m","input":"x","tools":[{"type":"web_search"}]}"#,
                "tools[0]",
            ),
            (
                r#"{"model":"m","input":"x","include":["file_search_call.results"]}"#,
                "include",
            ),
            (r#"{"model":"m","input":"x","x_new":1}"#, "x_new"),
            (
                r#"{"model":"m","input":[{"role":"user","content":[{"type":"input_file","file_id":"f"}]}]}"#,
                "input[0].content[0]",
            ),
        ] {
            let req = request_from_slice(body.as_bytes()).unwrap();
            let e = req
                .extensions
                .get::<NativeRequest>()
                .unwrap()
                .check_translatable()
                .unwrap_err();
            assert_eq!(e.param(), Some(field), "{body}");
        }
    }

    #[test]
    fn malformed_requests_are_bad_requests() {
        for body in [
            &br#"{"input":"x"}"#[..],
            br#"{"model":"m"}"#,
            br#"{"model":"m","input":[{"type":"function_call","name":"f"}]}"#,
            br#"{"model":"m","input":"x","max_output_tokens":0}"#,
            br#"not json"#,
        ] {
            assert!(request_from_slice(body).is_err());
        }
    }

    #[test]
    fn a_tool_stream_becomes_function_call_events() {
        use crate::{ChunkChoice, Delta, FunctionCallDelta, ToolCallDelta};
        let mut enc = EventEncoder::new("resp_t".into(), Echo::default());
        let mut out = Vec::new();
        let call = |id: Option<&str>, args: &str| ChatChunk {
            model: "m".into(),
            choices: vec![ChunkChoice {
                index: 0,
                delta: Delta {
                    tool_calls: Some(vec![ToolCallDelta {
                        index: 0,
                        id: id.map(str::to_owned),
                        kind: None,
                        function: Some(FunctionCallDelta {
                            name: id.map(|_| "get".to_owned()),
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
        };
        enc.push(&call(Some("call_1"), ""), &mut out);
        enc.push(&call(None, "{\"a\":"), &mut out);
        enc.push(&call(None, "1}"), &mut out);
        enc.finish(&mut out);
        let text = String::from_utf8(out).unwrap();
        let names: Vec<&str> = text
            .lines()
            .filter_map(|l| l.strip_prefix("event: "))
            .collect();
        assert_eq!(
            names,
            [
                "response.created",
                "response.in_progress",
                "response.output_item.added",
                "response.function_call_arguments.delta",
                "response.function_call_arguments.delta",
                "response.function_call_arguments.done",
                "response.output_item.done",
                "response.completed"
            ]
        );
        let r = enc.final_response().unwrap();
        assert_eq!(r["output"][0]["arguments"], "{\"a\":1}");
        assert_eq!(r["output"][0]["call_id"], "call_1");
        // Sequence numbers count from 0 without gaps.
        let seqs: Vec<u64> = text
            .lines()
            .filter_map(|l| l.strip_prefix("data: "))
            .map(|d| {
                serde_json::from_str::<Value>(d).unwrap()["sequence_number"]
                    .as_u64()
                    .unwrap()
            })
            .collect();
        assert_eq!(seqs, (0..8).collect::<Vec<_>>());
    }

    fn stored(tenant: &str, id: &str, expires_at: i64) -> StoredResponse {
        StoredResponse {
            id: id.into(),
            tenant: tenant.into(),
            input: json!([]),
            response: Bytes::from(json!({"id": id}).to_string()),
            created_at: 0,
            expires_at,
        }
    }

    #[tokio::test]
    async fn the_memory_store_evicts_the_oldest_and_scopes_by_tenant() {
        let store = MemoryResponseStore::new(2);
        store.put_response(stored("a", "r1", 100)).await.unwrap();
        store.put_response(stored("b", "r1", 100)).await.unwrap();
        // Replacing keeps the count; a third row evicts the oldest.
        store.put_response(stored("a", "r1", 200)).await.unwrap();
        assert_eq!(
            store
                .get_response("a", "r1", 150)
                .await
                .unwrap()
                .unwrap()
                .expires_at,
            200
        );
        store.put_response(stored("a", "r2", 100)).await.unwrap();
        assert!(store.get_response("a", "r1", 0).await.unwrap().is_none());
        assert!(store.get_response("b", "r1", 0).await.unwrap().is_some());
        assert!(!store.delete_response("a", "r1").await.unwrap());
        assert!(store.delete_response("b", "r1").await.unwrap());
        assert_eq!(store.purge_expired_responses(100).await.unwrap(), 1);
        assert!(store.get_response("a", "r2", 0).await.unwrap().is_none());
        // After a delete and a purge, the capacity is whole again.
        for i in 0..3 {
            store
                .put_response(stored("a", &format!("n{i}"), 100))
                .await
                .unwrap();
        }
        assert!(store.get_response("a", "n0", 0).await.unwrap().is_none());
        assert!(store.get_response("a", "n2", 0).await.unwrap().is_some());
    }

    #[test]
    fn input_items_page_in_both_orders_with_stable_ids() {
        let input = json!([
            {"role": "user", "content": "a"},
            {"type": "function_call", "call_id": "c", "name": "f", "arguments": "{}"},
            {"type": "function_call_output", "call_id": "c", "output": "x"},
            {"id": "msg_own", "type": "message", "role": "assistant",
             "content": [{"type": "output_text", "text": "b"}]},
            {"role": "assistant", "content": "c"},
        ]);
        let q = |limit, ascending, after: Option<&str>| InputItemsQuery {
            limit,
            ascending,
            after: after.map(str::to_owned),
        };
        let ids = |page: &Value| -> Vec<String> {
            page["data"]
                .as_array()
                .unwrap()
                .iter()
                .map(|i| i["id"].as_str().unwrap().to_owned())
                .collect()
        };
        let all = input_items_page("resp_x", &input, &q(100, true, None)).unwrap();
        assert_eq!(
            ids(&all),
            ["msg_x_in0", "fc_x_in1", "fco_x_in2", "msg_own", "msg_x_in4"]
        );
        assert_eq!(all["data"][0]["content"][0]["type"], "input_text");
        assert_eq!(all["data"][4]["content"][0]["type"], "output_text");
        assert_eq!(all["data"][4]["type"], "message");
        assert_eq!(all["data"][1]["type"], "function_call");
        assert!(all["data"][1].get("status").is_none());
        let desc = input_items_page("resp_x", &input, &q(2, false, Some("msg_own"))).unwrap();
        assert_eq!(ids(&desc), ["fco_x_in2", "fc_x_in1"]);
        assert_eq!(desc["has_more"], true);
        assert_eq!(desc["first_id"], "fco_x_in2");
        assert_eq!(desc["last_id"], "fc_x_in1");
        let end = input_items_page("resp_x", &input, &q(2, true, Some("msg_x_in4"))).unwrap();
        assert_eq!(ids(&end), Vec::<String>::new());
        assert_eq!(end["first_id"], Value::Null);
        assert_eq!(end["has_more"], false);
        let e = input_items_page("resp_x", &input, &q(2, true, Some("nope"))).unwrap_err();
        assert_eq!(e.param(), Some("after"));
    }

    #[test]
    fn input_items_queries_are_checked() {
        let q =
            InputItemsQuery::parse(Some("include%5B%5D=x&limit=100&order=desc&after=a+b")).unwrap();
        assert_eq!(q.limit, 100);
        assert!(!q.ascending);
        assert_eq!(q.after.as_deref(), Some("a b"));
        for (query, param) in [
            ("limit=101", "limit"),
            ("limit=-1", "limit"),
            ("limit=", "limit"),
            ("order=ASC", "order"),
            ("after=", "after"),
            ("after=%FF", "after"),
        ] {
            let e = InputItemsQuery::parse(Some(query)).unwrap_err();
            assert_eq!(e.param(), Some(param), "{query}");
        }
        // An escape that is not one stays as it is.
        let q = InputItemsQuery::parse(Some("after=%4")).unwrap();
        assert_eq!(q.after.as_deref(), Some("%4"));
    }

    #[test]
    fn native_response_events_name_the_resolved_previous_response_id() {
        let mut echo = Echo::default();
        echo.set("previous_response_id", "resp_prev".into());
        let mut enc = EventEncoder::new("resp_unused".into(), echo);
        let mut out = Vec::new();
        let native = |name: &str, data: &str| {
            let mut c = ChatChunk::default();
            super::super::messages::attach_native(
                &mut c,
                super::super::messages::native_frame(name, data),
            );
            c
        };
        let created = r#"{"type":"response.created","response":{"id":"resp_u","previous_response_id":null},"sequence_number":0}"#;
        let delta = r#"{"type":"response.output_text.delta","delta":"previous_response_id","sequence_number":1}"#;
        let done = r#"{"type":"response.completed","response":{"id":"resp_u","previous_response_id":null,"output":[]},"sequence_number":2}"#;
        enc.push(&native("response.created", created), &mut out);
        enc.push(&native("response.output_text.delta", delta), &mut out);
        enc.push(&native("response.completed", done), &mut out);
        let text = String::from_utf8(out).unwrap();
        let frames: Vec<&str> = text.split_terminator("\n\n").collect();
        assert_eq!(frames.len(), 3, "{text}");
        assert!(
            frames[0].contains(r#""previous_response_id":"resp_prev""#),
            "{text}"
        );
        // Other events are written as they came.
        assert_eq!(
            frames[1],
            format!("event: response.output_text.delta\ndata: {delta}")
        );
        assert!(enc.is_ended());
        let last = enc.final_response().unwrap();
        assert_eq!(last["previous_response_id"], "resp_prev");
        assert_eq!(last["id"], "resp_u");
    }
}
