//! The Anthropic Messages dialect: its requests as the [`ChatRequest`] view, its answers
//! from and to chat-completions answers, its streamed events and its errors.
//!
//! Translation both ways lives here, next to the chat → Messages request translation of
//! `llm-tower-providers` (whose Anthropic provider re-exports [`response_from_json`],
//! [`usage_from`] and [`finish_reason`]), so the HTTP edge and the providers share it.
//!
//! What the chat view cannot carry to a provider of another dialect (recorded with
//! [`NativeRequest::set_untranslatable`], refused there with a 400 naming it): `thinking`
//! (enabled) and thinking blocks, `top_k`, server tools and their blocks, documents,
//! images in tool results, image sources other than base64 and URL, `metadata` keys other
//! than `user_id`, and any top-level field this module does not know. `cache_control`
//! (a caching hint, on blocks, tools or the whole request) and `service_tier` are not
//! carried: an OpenAI-compatible provider caches prompts on its own.

use bytes::Bytes;
use serde::Deserialize;
use serde::de::Error as _;
use serde_json::value::RawValue;
use serde_json::{Map, Number, Value, json};

use super::{Dialect, NATIVE_EVENT, NativeRequest};
use crate::json::{Key, LenientStr};
use crate::{
    ChatChunk, ChatRequest, ChatResponse, Choice, Content, ContentPart, Delta, ErrorKind, Extra,
    FunctionCall, FunctionCallDelta, FunctionDef, ImageUrl, LlmError, MAX_REQUEST_BYTES, Message,
    NativeEvent, PromptTokensDetails, Role, StreamHead, StreamOptions, Tool, ToolCall,
    ToolCallDelta, Usage,
};

/// Top-level request fields this module maps (any other one is kept in the view's `extra`
/// and is untranslatable).
const KNOWN: &[&str] = &[
    "model",
    "max_tokens",
    "messages",
    "system",
    "temperature",
    "top_p",
    "top_k",
    "stop_sequences",
    "stream",
    "metadata",
    "tools",
    "tool_choice",
    "thinking",
    "service_tier",
    "cache_control",
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

/// Parses a Messages API request (`POST /v1/messages`) into the [`ChatRequest`] view, with
/// the body kept as a [`NativeRequest`] in its extensions. Malformed input (not JSON, no
/// `model`, no `max_tokens`, no `messages`, a role other than `user` / `assistant`, a block
/// without its fields) is a bad request naming the field.
///
/// ```
/// use llm_tower_core::dialect::messages::request_from_slice;
///
/// let req = request_from_slice(br#"{
///     "model": "claude-sonnet-4-5", "max_tokens": 100, "stream": true,
///     "system": [{"type": "text", "text": "Be brief.", "cache_control": {"type": "ephemeral"}}],
///     "messages": [{"role": "user", "content": "Hi"}]
/// }"#).unwrap();
/// assert_eq!(req.messages.len(), 2);
/// assert_eq!(req.messages[0].text(), "Be brief.");
/// assert_eq!(req.max_tokens, Some(100));
/// assert!(req.is_stream());
/// assert!(request_from_slice(br#"{"model":"m","messages":[]}"#).unwrap_err().message().contains("max_tokens"));
/// ```
pub fn request_from_slice(body: &[u8]) -> Result<ChatRequest, LlmError> {
    request_from_bytes(Bytes::copy_from_slice(body))
}

/// [`request_from_slice`] on a body already in [`Bytes`] (kept without a copy).
pub fn request_from_bytes(body: Bytes) -> Result<ChatRequest, LlmError> {
    parse(body, true)
}

/// Parses a token-counting request (`POST /v1/messages/count_tokens`): a Messages request
/// without `max_tokens`.
pub fn count_tokens_request_from_bytes(body: Bytes) -> Result<ChatRequest, LlmError> {
    parse(body, false)
}

fn parse(body: Bytes, needs_max_tokens: bool) -> Result<ChatRequest, LlmError> {
    if body.len() > MAX_REQUEST_BYTES {
        return Err(bad(format!(
            "request body of {} bytes exceeds the limit of {MAX_REQUEST_BYTES} bytes",
            body.len()
        )));
    }
    // The typed read takes every well-formed request; anything it refuses (bad JSON, a
    // turn of another shape) is read again as JSON values, whose checks name the fault.
    let (top, model_value) = match crate::json::from_slice::<Top<'_>>(&body) {
        Ok(top) => {
            let model = top.model_value;
            (top, model)
        }
        Err(_) => {
            let members: crate::json::Members<'_> = crate::json::from_slice(&body)
                .map_err(|e| bad(format!("invalid request body: {e}")))?;
            (Top::from(members), None)
        }
    };
    let mut p = Parser {
        req: ChatRequest::default(),
        first_untranslatable: None,
    };
    p.top(&top, needs_max_tokens)?;
    let Parser {
        mut req,
        first_untranslatable,
    } = p;
    let mut native = NativeRequest::new(Dialect::Messages, body.clone(), req.messages.len());
    if let Some(raw) = model_value {
        native.set_model_value(raw);
    }
    if let Some(e) = first_untranslatable {
        native.set_untranslatable(e);
    }
    req.extensions.insert(native);
    Ok(req)
}

/// A request's top-level members in order (a repeated key reads as its last value, as in
/// a `Map`), with `messages` read straight into [`Turn`]s when every one has the usual
/// shape: no JSON value is built for them.
struct Top<'de> {
    members: Vec<(Key<'de>, Member<'de>)>,
    /// The text of the `model` value, when there is exactly one and it is a string.
    model_value: Option<&'de str>,
}

enum Member<'de> {
    Value(Value),
    Turns(Vec<Turn<'de>>),
}

/// One entry of `messages` with a string `role` and a `content` that is a string or an
/// array (other members are read, and not used).
struct Turn<'de> {
    role: Key<'de>,
    content: TurnContent<'de>,
}

enum TurnContent<'de> {
    Text(Key<'de>),
    Blocks(Vec<Value>),
}

/// What `messages` holds: turns read typed, or the JSON value (from a body the typed read
/// refused).
enum Turns<'a, 'de> {
    Typed(&'a [Turn<'de>]),
    Value(&'a Value),
}

impl<'de> Top<'de> {
    fn get(&self, key: &str) -> Option<&Value> {
        match self.member(key)? {
            Member::Value(v) => Some(v),
            Member::Turns(_) => None,
        }
    }

    fn member(&self, key: &str) -> Option<&Member<'de>> {
        self.members
            .iter()
            .rev()
            .find(|(k, _)| k.as_str() == key)
            .map(|(_, v)| v)
    }

    fn messages(&self) -> Option<Turns<'_, 'de>> {
        Some(match self.member("messages")? {
            Member::Value(v) => Turns::Value(v),
            Member::Turns(t) => Turns::Typed(t),
        })
    }

    /// The members held as JSON values, in order.
    fn values(&self) -> impl Iterator<Item = (&str, &Value)> {
        self.members.iter().filter_map(|(k, v)| match v {
            Member::Value(v) => Some((k.as_str(), v)),
            Member::Turns(_) => None,
        })
    }
}

impl<'de> From<crate::json::Members<'de>> for Top<'de> {
    fn from(m: crate::json::Members<'de>) -> Self {
        Top {
            members: m
                .into_inner()
                .into_iter()
                .map(|(k, v)| (k, Member::Value(v)))
                .collect(),
            model_value: None,
        }
    }
}

impl<'de> Deserialize<'de> for Top<'de> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Top<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<Top<'de>, A::Error> {
                let mut members = Vec::with_capacity(map.size_hint().unwrap_or(8));
                let mut model_value = None;
                let mut models = 0u32;
                while let Some(k) = map.next_key::<Key<'de>>()? {
                    let v = match k.as_str() {
                        "messages" => Member::Turns(map.next_value()?),
                        "model" => {
                            // Its text is kept, for the body to be sent with another model
                            // in its place; a model that is not a string is the slow read's
                            // to refuse.
                            let raw: &'de RawValue = map.next_value()?;
                            let model: Key<'de> =
                                serde_json::from_str(raw.get()).map_err(A::Error::custom)?;
                            models += 1;
                            model_value = Some(raw.get());
                            Member::Value(Value::String(model.into_owned()))
                        }
                        _ => Member::Value(map.next_value()?),
                    };
                    members.push((k, v));
                }
                Ok(Top {
                    members,
                    model_value: model_value.filter(|_| models == 1),
                })
            }
        }
        d.deserialize_map(V)
    }
}

impl<'de> Deserialize<'de> for Turn<'de> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Turn<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a message")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<Turn<'de>, A::Error> {
                let (mut role, mut content) = (None, None);
                while let Some(k) = map.next_key::<Key<'de>>()? {
                    match k.as_str() {
                        "role" => role = Some(map.next_value()?),
                        "content" => content = Some(map.next_value()?),
                        // Read as a value, so that what the slow read refuses is refused.
                        _ => drop(map.next_value::<Value>()?),
                    }
                }
                match (role, content) {
                    (Some(role), Some(content)) => Ok(Turn { role, content }),
                    _ => Err(A::Error::custom("not a message")),
                }
            }
        }
        d.deserialize_map(V)
    }
}

impl<'de> Deserialize<'de> for TurnContent<'de> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = TurnContent<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a string or an array of content blocks")
            }
            fn visit_borrowed_str<E>(self, s: &'de str) -> Result<TurnContent<'de>, E> {
                Ok(TurnContent::Text(Key::Borrowed(s)))
            }
            fn visit_str<E>(self, s: &str) -> Result<TurnContent<'de>, E> {
                Ok(TurnContent::Text(Key::Owned(s.to_owned())))
            }
            fn visit_string<E>(self, s: String) -> Result<TurnContent<'de>, E> {
                Ok(TurnContent::Text(Key::Owned(s)))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                seq: A,
            ) -> Result<TurnContent<'de>, A::Error> {
                Vec::deserialize(serde::de::value::SeqAccessDeserializer::new(seq))
                    .map(TurnContent::Blocks)
            }
        }
        d.deserialize_any(V)
    }
}

struct Parser {
    req: ChatRequest,
    first_untranslatable: Option<LlmError>,
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

impl Parser {
    fn cannot(&mut self, param: &str, what: &str) {
        if self.first_untranslatable.is_none() {
            self.first_untranslatable = Some(untranslatable(param, what));
        }
    }

    fn top(&mut self, top: &Top<'_>, needs_max_tokens: bool) -> Result<(), LlmError> {
        match top.get("model") {
            Some(Value::String(m)) if !m.trim().is_empty() => self.req.model.clone_from(m),
            Some(Value::String(_)) => {
                return Err(bad("`model` must not be empty").with_param("model"));
            }
            Some(_) => return Err(bad("`model` must be a string").with_param("model")),
            None => return Err(bad("`model`: field required").with_param("model")),
        }
        match top.get("max_tokens") {
            Some(v) => {
                let n = v.as_u64().filter(|n| *n >= 1).ok_or_else(|| {
                    bad("`max_tokens` must be an integer of at least 1").with_param("max_tokens")
                })?;
                self.req.max_tokens = Some(n);
            }
            None if needs_max_tokens => {
                return Err(bad("`max_tokens`: field required").with_param("max_tokens"));
            }
            None => {}
        }
        match top.get("system") {
            None | Some(Value::Null) => {}
            Some(Value::String(s)) => self.req.messages.push(Message::system(s.as_str())),
            Some(Value::Array(blocks)) => {
                let mut parts = Vec::with_capacity(blocks.len());
                for (j, b) in blocks.iter().enumerate() {
                    let at = format!("system[{j}]");
                    if b.get("type").and_then(Value::as_str) != Some("text") {
                        return Err(bad(format!("`{at}` must be a text block")).with_param(at));
                    }
                    parts.push(self.text_part(b, &at)?);
                }
                self.req.messages.push(Message {
                    role: Role::System,
                    content: Some(Some(Content::Parts(parts))),
                    ..Message::default()
                });
            }
            Some(_) => {
                return Err(bad("`system` must be a string or an array of text blocks")
                    .with_param("system"));
            }
        }
        match top.messages() {
            Some(Turns::Typed(turns)) => {
                for (i, t) in turns.iter().enumerate() {
                    let content = match &t.content {
                        TurnContent::Text(s) => Ok(s.as_str()),
                        TurnContent::Blocks(b) => Err(b.as_slice()),
                    };
                    self.turn(role(t.role.as_str(), i)?, content, i)?;
                }
            }
            Some(Turns::Value(Value::Array(messages))) => {
                for (i, m) in messages.iter().enumerate() {
                    self.message(m, i)?;
                }
            }
            _ => {
                return Err(bad("`messages` must be an array of messages").with_param("messages"));
            }
        }
        if let Some(t) = top.get("temperature") {
            self.req.temperature = Some(number(t, "temperature")?);
        }
        if let Some(t) = top.get("top_p") {
            self.req.top_p = Some(number(t, "top_p")?);
        }
        match top.get("stream") {
            None | Some(Value::Null) => {}
            Some(Value::Bool(s)) => {
                self.req.stream = Some(*s);
                if *s {
                    // A chat upstream reports usage on a stream only when asked.
                    self.req.stream_options = Some(StreamOptions {
                        include_usage: Some(true),
                        extra: Extra::new(),
                    });
                }
            }
            Some(_) => return Err(bad("`stream` must be a boolean").with_param("stream")),
        }
        match top.get("stop_sequences") {
            None | Some(Value::Null) => {}
            Some(Value::Array(a)) if a.iter().all(Value::is_string) => {
                if !a.is_empty() {
                    self.req
                        .extra
                        .insert("stop".into(), Value::Array(a.clone()));
                }
            }
            Some(_) => {
                return Err(bad("`stop_sequences` must be an array of strings")
                    .with_param("stop_sequences"));
            }
        }
        match top.get("metadata") {
            None | Some(Value::Null) => {}
            Some(Value::Object(m)) => {
                for (k, v) in m {
                    match (k.as_str(), v) {
                        ("user_id", Value::String(u)) => self.req.user = Some(u.clone()),
                        ("user_id", Value::Null) => {}
                        _ => self.cannot(&format!("metadata.{k}"), "this metadata field"),
                    }
                }
            }
            Some(_) => return Err(bad("`metadata` must be an object").with_param("metadata")),
        }
        if let Some(tools) = top.get("tools") {
            self.tools(tools)?;
        }
        if let Some(choice) = top.get("tool_choice") {
            self.tool_choice(choice)?;
        }
        match top.get("thinking") {
            None | Some(Value::Null) => {}
            Some(t) if t.get("type").and_then(Value::as_str) == Some("disabled") => {}
            Some(t) => {
                self.req.extra.insert("thinking".into(), t.clone());
                self.cannot("thinking", "extended thinking");
            }
        }
        if let Some(k) = top.get("top_k") {
            self.req.extra.insert("top_k".into(), k.clone());
            self.cannot("top_k", "`top_k` sampling");
        }
        for (k, v) in top.values() {
            if !KNOWN.contains(&k) {
                // Kept in the view, so that the cache key tells such requests apart.
                self.req.extra.insert(k.to_owned(), v.clone());
                self.cannot(k, "this field");
            }
        }
        Ok(())
    }

    fn text_part(&mut self, b: &Value, at: &str) -> Result<ContentPart, LlmError> {
        let text = str_field(b, "text", at)?;
        let mut extra = Extra::new();
        for (k, v) in b.as_object().into_iter().flatten() {
            match k.as_str() {
                "type" | "text" => {}
                // A caching hint, not content: a chat upstream caches on its own.
                "cache_control" => {}
                "citations" if v.is_null() => {}
                _ => {
                    self.cannot(&format!("{at}.{k}"), "this text block field");
                    extra.insert(k.clone(), v.clone());
                }
            }
        }
        Ok(ContentPart::Text {
            text: text.to_owned(),
            extra,
        })
    }

    /// `messages[i]` as a JSON value (a body the typed read refused).
    fn message(&mut self, m: &Value, i: usize) -> Result<(), LlmError> {
        let at = format!("messages[{i}]");
        if !m.is_object() {
            return Err(bad(format!("`{at}` must be an object")).with_param(at));
        }
        let role = role(str_field(m, "role", &at)?, i)?;
        let content = match m.get("content") {
            Some(Value::String(s)) => Ok(s.as_str()),
            Some(Value::Array(b)) => Err(b.as_slice()),
            _ => {
                return Err(bad(format!(
                    "`{at}.content` must be a string or an array of content blocks"
                ))
                .with_param(format!("{at}.content")));
            }
        };
        self.turn(role, content, i)
    }

    /// `messages[i]`: its content, a string (`Ok`) or blocks (`Err`).
    fn turn(
        &mut self,
        role: Role,
        content: Result<&str, &[Value]>,
        i: usize,
    ) -> Result<(), LlmError> {
        let blocks = match content {
            Ok(s) => {
                self.req.messages.push(Message::new(role, s));
                return Ok(());
            }
            Err(b) => b,
        };
        let at = format!("messages[{i}]");
        let mut parts = Vec::new();
        let mut calls = Vec::new();
        for (j, b) in blocks.iter().enumerate() {
            let bat = format!("{at}.content[{j}]");
            let kind = str_field(b, "type", &bat)?;
            match (kind, &role) {
                ("text", _) => parts.push(self.text_part(b, &bat)?),
                ("image", Role::User) => parts.push(self.image(b, &bat)?),
                ("tool_use", Role::Assistant) => {
                    let id = str_field(b, "id", &bat)?;
                    let name = str_field(b, "name", &bat)?;
                    let input = b.get("input").cloned().unwrap_or_else(|| json!({}));
                    calls.push(ToolCall {
                        id: id.to_owned(),
                        kind: "function".into(),
                        function: FunctionCall {
                            name: name.to_owned(),
                            arguments: input.to_string(),
                            extra: Extra::new(),
                        },
                        extra: Extra::new(),
                    });
                }
                ("tool_result", Role::User) => {
                    // Chat wants each result as a `tool` message right after the call.
                    let msg = self.tool_result(b, &bat)?;
                    self.flush_user(&mut parts);
                    self.req.messages.push(msg);
                }
                _ => {
                    let Value::Object(o) = b else {
                        return Err(bad(format!("`{bat}` must be an object")).with_param(bat));
                    };
                    self.cannot(&bat, &format!("a `{kind}` block"));
                    parts.push(ContentPart::Other(o.clone()));
                }
            }
        }
        if role == Role::Assistant {
            let content = if parts.is_empty() {
                if calls.is_empty() {
                    Some(Some(Content::Text(String::new())))
                } else {
                    Some(None)
                }
            } else {
                Some(Some(Content::Parts(parts)))
            };
            self.req.messages.push(Message {
                role,
                content,
                tool_calls: (!calls.is_empty()).then_some(calls),
                ..Message::default()
            });
        } else {
            self.flush_user(&mut parts);
        }
        Ok(())
    }

    fn flush_user(&mut self, parts: &mut Vec<ContentPart>) {
        if !parts.is_empty() {
            self.req.messages.push(Message {
                role: Role::User,
                content: Some(Some(Content::Parts(std::mem::take(parts)))),
                ..Message::default()
            });
        }
    }

    fn image(&mut self, b: &Value, at: &str) -> Result<ContentPart, LlmError> {
        let src = b.get("source").ok_or_else(|| {
            bad(format!("`{at}` needs `source`")).with_param(format!("{at}.source"))
        })?;
        let sat = format!("{at}.source");
        let url = match str_field(src, "type", &sat)? {
            "base64" => format!(
                "data:{};base64,{}",
                str_field(src, "media_type", &sat)?,
                str_field(src, "data", &sat)?
            ),
            "url" => str_field(src, "url", &sat)?.to_owned(),
            other => {
                self.cannot(&sat, &format!("an image source of type `{other}`"));
                let Value::Object(o) = b else {
                    unreachable!("checked by str_field")
                };
                return Ok(ContentPart::Other(o.clone()));
            }
        };
        Ok(ContentPart::ImageUrl {
            image_url: ImageUrl {
                url,
                detail: None,
                extra: Extra::new(),
            },
            extra: Extra::new(),
        })
    }

    fn tool_result(&mut self, b: &Value, at: &str) -> Result<Message, LlmError> {
        let id = str_field(b, "tool_use_id", at)?;
        let mut text = String::new();
        match b.get("content") {
            None | Some(Value::Null) => {}
            Some(Value::String(s)) => text.push_str(s),
            Some(Value::Array(items)) => {
                for (k, item) in items.iter().enumerate() {
                    let iat = format!("{at}.content[{k}]");
                    match str_field(item, "type", &iat)? {
                        "text" => text.push_str(str_field(item, "text", &iat)?),
                        other => self.cannot(&iat, &format!("a `{other}` block in a tool result")),
                    }
                }
            }
            Some(_) => {
                return Err(bad(format!("`{at}.content` must be a string or an array"))
                    .with_param(format!("{at}.content")));
            }
        }
        if b.get("is_error") == Some(&Value::Bool(true)) {
            // Chat has no error flag on a tool result: the model is told in the text.
            text.insert_str(0, "Error: ");
        }
        Ok(Message {
            role: Role::Tool,
            content: Some(Some(Content::Text(text))),
            tool_call_id: Some(id.to_owned()),
            ..Message::default()
        })
    }

    fn tools(&mut self, tools: &Value) -> Result<(), LlmError> {
        let Value::Array(tools) = tools else {
            return Err(bad("`tools` must be an array").with_param("tools"));
        };
        let mut out = Vec::with_capacity(tools.len());
        for (i, t) in tools.iter().enumerate() {
            let at = format!("tools[{i}]");
            let Value::Object(o) = t else {
                return Err(bad(format!("`{at}` must be an object")).with_param(at));
            };
            match o.get("type").and_then(Value::as_str) {
                None | Some("custom") => {
                    let name = str_field(t, "name", &at)?;
                    out.push(Tool {
                        kind: "function".into(),
                        function: Some(FunctionDef {
                            name: name.to_owned(),
                            description: o
                                .get("description")
                                .and_then(Value::as_str)
                                .map(str::to_owned),
                            parameters: o.get("input_schema").cloned(),
                            extra: Extra::new(),
                        }),
                        extra: Extra::new(),
                    });
                }
                Some(kind) => {
                    self.cannot(&at, &format!("the server tool `{kind}`"));
                    let mut extra = o.clone();
                    extra.remove("type");
                    out.push(Tool {
                        kind: kind.to_owned(),
                        function: None,
                        extra,
                    });
                }
            }
        }
        if !out.is_empty() {
            self.req.tools = Some(out);
        }
        Ok(())
    }

    fn tool_choice(&mut self, c: &Value) -> Result<(), LlmError> {
        if c.is_null() {
            return Ok(());
        }
        let choice = match c.get("type").and_then(Value::as_str) {
            Some("auto") => json!("auto"),
            Some("any") => json!("required"),
            Some("none") => json!("none"),
            Some("tool") => {
                let name = str_field(c, "name", "tool_choice")?;
                json!({"type": "function", "function": {"name": name}})
            }
            _ => {
                return Err(bad("`tool_choice.type` must be auto, any, tool or none")
                    .with_param("tool_choice.type"));
            }
        };
        if c.get("disable_parallel_tool_use") == Some(&Value::Bool(true)) {
            self.req
                .extra
                .insert("parallel_tool_calls".into(), Value::Bool(false));
        }
        self.req.tool_choice = Some(choice);
        Ok(())
    }
}

/// The role of `messages[i]`.
fn role(role: &str, i: usize) -> Result<Role, LlmError> {
    match role {
        "user" => Ok(Role::User),
        "assistant" => Ok(Role::Assistant),
        other => {
            let at = format!("messages[{i}]");
            Err(bad(format!(
                "`{at}.role` must be `user` or `assistant`, not `{other}`"
            ))
            .with_param(format!("{at}.role")))
        }
    }
}

fn number(v: &Value, param: &str) -> Result<Number, LlmError> {
    match v {
        Value::Number(n) => Ok(n.clone()),
        _ => Err(bad(format!("`{param}` must be a number")).with_param(param)),
    }
}

// ===== answers =====

/// Maps an Anthropic `stop_reason` to an OpenAI `finish_reason`.
///
/// ```
/// use llm_tower_core::dialect::messages::finish_reason;
/// assert_eq!(finish_reason("end_turn"), "stop");
/// assert_eq!(finish_reason("tool_use"), "tool_calls");
/// ```
pub fn finish_reason(stop_reason: &str) -> &str {
    match stop_reason {
        "end_turn" | "stop_sequence" | "pause_turn" => "stop",
        "max_tokens" | "model_context_window_exceeded" => "length",
        "tool_use" => "tool_calls",
        "refusal" => "content_filter",
        other => other,
    }
}

/// Maps an OpenAI `finish_reason` to an Anthropic `stop_reason`.
///
/// ```
/// use llm_tower_core::dialect::messages::stop_reason;
/// assert_eq!(stop_reason("length"), "max_tokens");
/// ```
pub fn stop_reason(finish_reason: &str) -> &str {
    match finish_reason {
        "stop" => "end_turn",
        "length" => "max_tokens",
        "tool_calls" | "function_call" => "tool_use",
        "content_filter" => "refusal",
        other => other,
    }
}

/// Maps Anthropic usage (`input_tokens`, `output_tokens`, `cache_creation_input_tokens`,
/// `cache_read_input_tokens`) to [`Usage`]: `prompt_tokens` counts all input, cached
/// reads included, and the cache reads / writes go to `prompt_tokens_details`. Counts are
/// read saturating (the upstream is not trusted).
pub fn usage_from(v: &Value) -> Usage {
    let n = |k: &str| {
        v.get(k).and_then(|x| match x {
            Value::Number(n) => Some(
                n.as_u64()
                    .or_else(|| n.as_f64().map(|f| if f > 0.0 { f as u64 } else { 0 })),
            )
            .flatten(),
            _ => None,
        })
    };
    counts_usage(
        n("input_tokens"),
        n("output_tokens"),
        n("cache_creation_input_tokens"),
        n("cache_read_input_tokens"),
    )
}

/// [`usage_from`] on counts already read: input, output, cache writes, cache reads.
fn counts_usage(
    input: Option<u64>,
    output: Option<u64>,
    write: Option<u64>,
    read: Option<u64>,
) -> Usage {
    let prompt = input
        .unwrap_or(0)
        .saturating_add(write.unwrap_or(0))
        .saturating_add(read.unwrap_or(0));
    let mut u = Usage::new(prompt, output.unwrap_or(0));
    if write.is_some() || read.is_some() {
        u.prompt_tokens_details = Some(PromptTokensDetails {
            cached_tokens: Some(read.unwrap_or(0)),
            cache_write_tokens: write,
            ..PromptTokensDetails::default()
        });
    }
    u
}

/// [`Usage`] as Anthropic usage: `input_tokens` are the uncached ones, cache reads and
/// writes apart (the inverse of [`usage_from`]).
pub fn usage_to_json(u: &Usage) -> Value {
    let read = u.cached_tokens();
    let write = u
        .prompt_tokens_details
        .as_ref()
        .and_then(|d| d.cache_write_tokens)
        .unwrap_or(0);
    let mut m = Map::new();
    m.insert(
        "input_tokens".into(),
        u.prompt_tokens
            .saturating_sub(read)
            .saturating_sub(write)
            .into(),
    );
    m.insert("output_tokens".into(), u.completion_tokens.into());
    m.insert("cache_creation_input_tokens".into(), write.into());
    m.insert("cache_read_input_tokens".into(), read.into());
    Value::Object(m)
}

/// Translates a Messages API response into a chat-completions response: text blocks
/// joined, `tool_use` blocks as tool calls (input serialized as the arguments string),
/// `thinking` blocks in `message.reasoning_content`, stop reason and usage mapped. The
/// error names what is malformed.
///
/// ```
/// use llm_tower_core::dialect::messages::response_from_json;
/// let resp = response_from_json(&serde_json::json!({
///     "id": "msg_1", "type": "message", "role": "assistant", "model": "claude-sonnet-4-5",
///     "content": [{"type": "text", "text": "Hi!"}],
///     "stop_reason": "end_turn",
///     "usage": {"input_tokens": 10, "output_tokens": 3, "cache_read_input_tokens": 90}
/// })).unwrap();
/// assert_eq!(resp.text(), "Hi!");
/// assert_eq!(resp.usage.unwrap().prompt_tokens, 100);
/// ```
pub fn response_from_json(v: &Value) -> Result<ChatResponse, String> {
    let obj = v.as_object().ok_or("not a JSON object")?;
    let content = obj
        .get("content")
        .and_then(Value::as_array)
        .ok_or("missing `content`")?;
    let mut text: Option<String> = None;
    let mut reasoning: Option<String> = None;
    let mut calls = Vec::new();
    for block in content {
        match block.get("type").and_then(Value::as_str) {
            Some("text") => {
                let t = block.get("text").and_then(Value::as_str).unwrap_or("");
                text.get_or_insert_with(String::new).push_str(t);
            }
            Some("thinking") => {
                let t = block.get("thinking").and_then(Value::as_str).unwrap_or("");
                reasoning.get_or_insert_with(String::new).push_str(t);
            }
            Some("tool_use") => {
                let id = block.get("id").and_then(Value::as_str).unwrap_or("");
                let name = block
                    .get("name")
                    .and_then(Value::as_str)
                    .ok_or("a tool_use block without `name`")?;
                let input = block.get("input").cloned().unwrap_or_else(|| json!({}));
                calls.push(ToolCall {
                    id: id.to_owned(),
                    kind: "function".into(),
                    function: FunctionCall {
                        name: name.to_owned(),
                        arguments: input.to_string(),
                        extra: Extra::new(),
                    },
                    extra: Extra::new(),
                });
            }
            _ => {} // redacted thinking, server tool blocks: nothing to map
        }
    }
    let mut extra = Extra::new();
    if let Some(r) = reasoning {
        extra.insert("reasoning_content".into(), Value::from(r));
    }
    let tool_calls = (!calls.is_empty()).then_some(calls);
    let content = match text {
        Some(t) => Some(Some(Content::Text(t))),
        None if tool_calls.is_some() => Some(None),
        None => Some(Some(Content::Text(String::new()))),
    };
    let finish = obj
        .get("stop_reason")
        .and_then(Value::as_str)
        .map(|r| finish_reason(r).to_owned());
    let s = |k: &str| obj.get(k).and_then(Value::as_str).unwrap_or("").to_owned();
    Ok(ChatResponse {
        id: s("id"),
        object: "chat.completion".into(),
        created: crate::response::unix_now(),
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
            finish_reason: finish,
            extra: Extra::new(),
        }],
        usage: obj.get("usage").map(usage_from),
        extra: Extra::new(),
    })
}

/// A tool call's arguments as the `input` object of a `tool_use` block (a string that is
/// not a JSON object is kept under `"arguments"`, as the API requires an object).
fn tool_input(arguments: &str) -> Value {
    match serde_json::from_str::<Value>(arguments) {
        Ok(v @ Value::Object(_)) => v,
        _ if arguments.trim().is_empty() => json!({}),
        _ => json!({ "arguments": arguments }),
    }
}

/// Translates a chat-completions response (its first choice) into a Messages API
/// response: reasoning as a `thinking` block, then the text, then tool calls as
/// `tool_use` blocks; the finish reason and usage mapped back.
///
/// ```
/// use llm_tower_core::ChatResponse;
/// use llm_tower_core::dialect::messages::response_to_json;
/// let v = response_to_json(&ChatResponse::from_text("gpt-4o-mini", "Hi!"));
/// assert_eq!(v["type"], "message");
/// assert_eq!(v["content"][0]["text"], "Hi!");
/// assert_eq!(v["stop_reason"], "end_turn");
/// ```
pub fn response_to_json(r: &ChatResponse) -> Value {
    let mut content = Vec::new();
    let mut stop = None;
    if let Some(choice) = r.choices.first() {
        let m = &choice.message;
        if let Some(Value::String(t)) = m.extra.get("reasoning_content")
            && !t.is_empty()
        {
            content.push(json!({"type": "thinking", "thinking": t, "signature": ""}));
        }
        let text = m.text();
        if !text.is_empty() {
            content.push(json!({"type": "text", "text": text}));
        }
        for tc in m.tool_calls.iter().flatten() {
            content.push(json!({
                "type": "tool_use",
                "id": tc.id,
                "name": tc.function.name,
                "input": tool_input(&tc.function.arguments),
            }));
        }
        stop = choice.finish_reason.as_deref().map(stop_reason);
    }
    let usage = r
        .usage
        .as_ref()
        .map_or_else(|| usage_to_json(&Usage::default()), usage_to_json);
    json!({
        "id": message_id(&r.id),
        "type": "message",
        "role": "assistant",
        "model": r.model,
        "content": content,
        "stop_reason": stop,
        "stop_sequence": null,
        "usage": usage,
    })
}

fn message_id(id: &str) -> String {
    if id.starts_with("msg_") {
        id.to_owned()
    } else if id.is_empty() {
        format!("msg_{}", crate::response::next_id())
    } else {
        format!("msg_{id}")
    }
}

/// What a complete Messages API answer must look like: its `model` and `usage` are read,
/// the rest checked for type and left as it is.
#[derive(Deserialize)]
struct Shape<'a> {
    // Borrowed: nothing is copied for a check.
    #[serde(rename = "id", borrow)]
    _id: std::borrow::Cow<'a, str>,
    #[serde(rename = "type", borrow)]
    kind: std::borrow::Cow<'a, str>,
    #[serde(rename = "role", default)]
    _role: serde::de::IgnoredAny,
    model: String,
    #[serde(rename = "content")]
    _content: Vec<serde::de::IgnoredAny>,
    #[serde(default)]
    usage: Option<ShapeUsage>,
}

#[derive(Deserialize)]
struct ShapeUsage {
    #[serde(default)]
    input_tokens: Option<crate::json::Count>,
    #[serde(default)]
    output_tokens: Option<crate::json::Count>,
    #[serde(default)]
    cache_creation_input_tokens: Option<crate::json::Count>,
    #[serde(default)]
    cache_read_input_tokens: Option<crate::json::Count>,
}

/// Checks that `json` is a Messages API answer; returns its model and usage.
pub(crate) fn check_response(json: &[u8]) -> serde_json::Result<(String, Option<Usage>)> {
    // The hand-written pass reads the common case, serde the rest (errors included).
    if let Ok(text) = std::str::from_utf8(json)
        && let Some(found) = crate::encoded::scan::check_messages(text.as_bytes())
    {
        let usage = found.usage.map(|[i, o, w, r]| counts_usage(i, o, w, r));
        return Ok((text[found.model].to_owned(), usage));
    }
    check_response_serde(json)
}

/// [`check_response`] through serde.
fn check_response_serde(json: &[u8]) -> serde_json::Result<(String, Option<Usage>)> {
    let shape: Shape<'_> = crate::json::from_slice(json)?;
    if shape.kind != "message" {
        return Err(serde::de::Error::custom(format!(
            "`type` is `{}`, not `message`",
            shape.kind
        )));
    }
    let usage = shape.usage.map(|u| {
        let c = |x: Option<crate::json::Count>| x.and_then(|c| c.0);
        counts_usage(
            c(u.input_tokens),
            c(u.output_tokens),
            c(u.cache_creation_input_tokens),
            c(u.cache_read_input_tokens),
        )
    });
    Ok((shape.model, usage))
}

// ===== errors =====

/// The Anthropic error `type` for an error kind.
pub fn error_type(kind: ErrorKind) -> &'static str {
    match kind {
        ErrorKind::RateLimited | ErrorKind::BudgetExceeded => "rate_limit_error",
        ErrorKind::Timeout => "timeout_error",
        ErrorKind::Overloaded => "overloaded_error",
        ErrorKind::BadRequest | ErrorKind::ContextLengthExceeded | ErrorKind::ContentFiltered => {
            "invalid_request_error"
        }
        ErrorKind::Auth => "authentication_error",
        ErrorKind::NotFound => "not_found_error",
        _ => "api_error",
    }
}

/// The Anthropic error body: `{"type": "error", "error": {"type", "message"}}`.
///
/// ```
/// use llm_tower_core::LlmError;
/// use llm_tower_core::dialect::messages::error_json;
/// let v = error_json(&LlmError::not_found("no such model"));
/// assert_eq!(v["type"], "error");
/// assert_eq!(v["error"]["type"], "not_found_error");
/// ```
pub fn error_json(e: &LlmError) -> Value {
    json!({
        "type": "error",
        "error": {"type": error_type(e.kind()), "message": e.message()},
    })
}

// ===== streams =====

/// Writes one SSE frame: `event: {name}\ndata: {json}\n\n` (a multi-line `data` one
/// `data:` line each).
pub fn write_frame(out: &mut Vec<u8>, name: &str, data: &str) {
    write_frame_bytes(out, name.as_bytes(), data.as_bytes());
}

/// [`write_frame`] on bytes.
pub(crate) fn write_frame_bytes(out: &mut Vec<u8>, name: &[u8], data: &[u8]) {
    fn line(out: &mut Vec<u8>, mut line: &[u8]) {
        while let Some(l) = line.strip_suffix(b"\r") {
            line = l;
        }
        out.extend_from_slice(b"data: ");
        out.extend_from_slice(line);
        out.push(b'\n');
    }
    out.reserve(name.len() + data.len() + 16);
    out.extend_from_slice(b"event: ");
    out.extend_from_slice(name);
    out.push(b'\n');
    // The common case is one line.
    if memchr::memchr(b'\n', data).is_some() {
        for l in data.split(|&b| b == b'\n') {
            line(out, l);
        }
    } else {
        line(out, data);
    }
    out.push(b'\n');
}

fn event(out: &mut Vec<u8>, v: &Value) {
    let name = v.get("type").and_then(Value::as_str).unwrap_or("error");
    write_frame(out, name, &v.to_string());
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Open {
    None,
    Text,
    Thinking,
    Tool(u32),
}

/// Chat-completions chunks → the Messages API's streamed events.
///
/// Events in order: `message_start` and a `ping` with the first chunk; for each content
/// block `content_block_start`, its deltas (`text_delta`, `thinking_delta`,
/// `input_json_delta`) and `content_block_stop`; at the end `message_delta` (stop reason,
/// usage) and `message_stop`. A failure is an `error` event and nothing after it. A chunk
/// that carries its original event ([`NATIVE_EVENT`]) is written as it is, and the encoder
/// writes nothing of its own for such a stream.
///
/// ```
/// use llm_tower_core::ChatChunk;
/// use llm_tower_core::dialect::messages::EventEncoder;
///
/// let mut enc = EventEncoder::new();
/// let mut out = Vec::new();
/// enc.push(&ChatChunk::text("c1", "m", "Hel"), &mut out);
/// enc.push(&ChatChunk::text("c1", "m", "lo"), &mut out);
/// enc.finish(&mut out);
/// let text = String::from_utf8(out).unwrap();
/// assert!(text.starts_with("event: message_start\n"));
/// assert!(text.contains("event: content_block_delta\ndata: {\"delta\":{\"text\":\"Hel\""));
/// assert!(text.ends_with("event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n"));
/// ```
#[derive(Debug)]
pub struct EventEncoder {
    started: bool,
    native: bool,
    ended: bool,
    index: u32,
    open: Open,
    stop: Option<String>,
    usage: Option<Usage>,
    tools_seen: Vec<u32>,
}

impl Default for EventEncoder {
    fn default() -> Self {
        Self::new()
    }
}

impl EventEncoder {
    /// An encoder before its first chunk.
    pub fn new() -> Self {
        Self {
            started: false,
            native: false,
            ended: false,
            index: 0,
            open: Open::None,
            stop: None,
            usage: None,
            tools_seen: Vec::new(),
        }
    }

    /// Whether the stream's end (`message_stop`) or an error was written.
    pub fn is_ended(&self) -> bool {
        self.ended
    }

    fn start(&mut self, chunk: &ChatChunk, out: &mut Vec<u8>) {
        self.started = true;
        let mut usage = usage_to_json(chunk.usage().unwrap_or(&Usage::default()));
        usage["output_tokens"] = 0.into();
        event(
            out,
            &json!({
                "type": "message_start",
                "message": {
                    "id": message_id(&chunk.id),
                    "type": "message",
                    "role": "assistant",
                    "model": chunk.model,
                    "content": [],
                    "stop_reason": null,
                    "stop_sequence": null,
                    "usage": usage,
                }
            }),
        );
        event(out, &json!({"type": "ping"}));
    }

    fn close(&mut self, out: &mut Vec<u8>) {
        if self.open != Open::None {
            event(
                out,
                &json!({"type": "content_block_stop", "index": self.index}),
            );
            self.index = self.index.saturating_add(1);
            self.open = Open::None;
        }
    }

    fn open(&mut self, block: Open, start: Value, out: &mut Vec<u8>) {
        self.close(out);
        self.open = block;
        event(
            out,
            &json!({"type": "content_block_start", "index": self.index, "content_block": start}),
        );
    }

    fn delta(&self, delta: Value, out: &mut Vec<u8>) {
        event(
            out,
            &json!({"type": "content_block_delta", "index": self.index, "delta": delta}),
        );
    }

    /// Writes an upstream's own event (see [`NativeEvent`]) as it came; the encoder then
    /// writes nothing of its own.
    pub fn push_native(&mut self, event: &NativeEvent, out: &mut Vec<u8>) {
        if self.ended {
            return;
        }
        self.native = true;
        self.started = true;
        event.write_frame(out);
        if event.name() == "message_stop" {
            self.ended = true;
        }
    }

    /// Adds the events for `chunk` to `out`.
    pub fn push(&mut self, chunk: &ChatChunk, out: &mut Vec<u8>) {
        if self.ended {
            return;
        }
        if let Some(frame) = super::native_event(chunk) {
            self.native = true;
            self.started = true;
            out.extend_from_slice(frame.as_bytes());
            if frame.starts_with("event: message_stop") {
                self.ended = true;
            }
            return;
        }
        if self.native {
            return; // a native stream's view chunks are not written twice
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
        if let Some(Value::String(t)) = choice.delta.extra.get("reasoning_content")
            && !t.is_empty()
        {
            if self.open != Open::Thinking {
                self.open(
                    Open::Thinking,
                    json!({"type": "thinking", "thinking": "", "signature": ""}),
                    out,
                );
            }
            self.delta(json!({"type": "thinking_delta", "thinking": t}), out);
        }
        if let Some(t) = choice.delta.text()
            && !t.is_empty()
        {
            if self.open != Open::Text {
                self.open(Open::Text, json!({"type": "text", "text": ""}), out);
            }
            self.delta(json!({"type": "text_delta", "text": t}), out);
        }
        for tc in choice.delta.tool_calls.iter().flatten() {
            if self.open != Open::Tool(tc.index) {
                if self.tools_seen.contains(&tc.index) {
                    // Chat streams one call after the other; a call resumed after another
                    // began cannot be put back into its closed block.
                    self.error(
                        &LlmError::transport(
                            "the upstream interleaved the arguments of two tool calls",
                        ),
                        out,
                    );
                    return;
                }
                self.tools_seen.push(tc.index);
                let f = tc.function.as_ref();
                self.open(
                    Open::Tool(tc.index),
                    json!({
                        "type": "tool_use",
                        "id": tc.id.clone().unwrap_or_default(),
                        "name": f.and_then(|f| f.name.clone()).unwrap_or_default(),
                        "input": {},
                    }),
                    out,
                );
            }
            if let Some(args) = tc.function.as_ref().and_then(|f| f.arguments.as_deref())
                && !args.is_empty()
            {
                self.delta(
                    json!({"type": "input_json_delta", "partial_json": args}),
                    out,
                );
            }
        }
        if let Some(r) = choice.finish_reason() {
            self.stop = Some(stop_reason(r).to_owned());
        }
    }

    /// Writes the end of a stream that completed (`message_delta`, `message_stop`).
    pub fn finish(&mut self, out: &mut Vec<u8>) {
        if self.ended || self.native {
            if self.native && !self.ended {
                // A native stream always ends with its own `message_stop`; one that did
                // not is an upstream failure the provider reports as an error item.
                self.ended = true;
            }
            return;
        }
        if !self.started {
            self.start(&ChatChunk::default(), out);
        }
        self.close(out);
        let usage = usage_to_json(self.usage.as_ref().unwrap_or(&Usage::default()));
        event(
            out,
            &json!({
                "type": "message_delta",
                "delta": {"stop_reason": self.stop.as_deref().unwrap_or("end_turn"), "stop_sequence": null},
                "usage": usage,
            }),
        );
        event(out, &json!({"type": "message_stop"}));
        self.ended = true;
    }

    /// Writes the `error` event of a stream that failed after it started.
    pub fn error(&mut self, e: &LlmError, out: &mut Vec<u8>) {
        if self.ended {
            return;
        }
        self.ended = true;
        event(out, &error_json(e));
    }
}

/// One streamed Messages API event, read into borrowed fields (no JSON tree is built):
/// what a decoder of the stream needs to follow it ([`kind`](Self::kind),
/// [`index`](Self::index), the block's type, the message's id, model and usage) and what
/// its chat view ([`view`](Self::view)) reads.
///
/// ```
/// use llm_tower_core::StreamHead;
/// use llm_tower_core::dialect::messages::StreamScan;
///
/// let data = br#"{"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"hi"}}"#;
/// let scan = StreamScan::parse(data).unwrap();
/// assert_eq!((scan.kind(), scan.index()), ("content_block_delta", Some(0)));
/// let chunk = scan.view(&StreamHead::default(), None, None).unwrap();
/// assert_eq!(chunk.choices[0].delta.text(), Some("hi"));
/// ```
#[derive(Debug, Deserialize)]
pub struct StreamScan<'a> {
    #[serde(rename = "type", borrow, default)]
    kind: LenientStr<'a>,
    #[serde(default)]
    index: Option<Value>,
    #[serde(borrow, default)]
    delta: Option<ScanDelta<'a>>,
    #[serde(borrow, default)]
    content_block: Option<ScanBlock<'a>>,
    #[serde(borrow, default)]
    message: Option<ScanMessage<'a>>,
    #[serde(borrow, default)]
    usage: Option<&'a serde_json::value::RawValue>,
}

#[derive(Debug, Deserialize)]
struct ScanDelta<'a> {
    #[serde(rename = "type", borrow, default)]
    kind: LenientStr<'a>,
    #[serde(borrow, default)]
    text: LenientStr<'a>,
    #[serde(borrow, default)]
    partial_json: LenientStr<'a>,
    #[serde(borrow, default)]
    thinking: LenientStr<'a>,
    #[serde(borrow, default)]
    stop_reason: LenientStr<'a>,
}

#[derive(Debug, Deserialize)]
struct ScanBlock<'a> {
    #[serde(rename = "type", borrow, default)]
    kind: LenientStr<'a>,
    #[serde(borrow, default)]
    text: LenientStr<'a>,
    #[serde(borrow, default)]
    id: LenientStr<'a>,
    #[serde(borrow, default)]
    name: LenientStr<'a>,
    #[serde(borrow, default)]
    input: Option<&'a serde_json::value::RawValue>,
}

#[derive(Debug, Deserialize)]
struct ScanMessage<'a> {
    #[serde(borrow, default)]
    id: LenientStr<'a>,
    #[serde(borrow, default)]
    model: LenientStr<'a>,
    #[serde(borrow, default)]
    usage: Option<&'a serde_json::value::RawValue>,
}

impl<'a> StreamScan<'a> {
    /// Reads an event's data: a JSON object (anything else is refused).
    pub fn parse(data: &'a [u8]) -> serde_json::Result<Self> {
        // The common events (text deltas, pings, ends) by hand; the rest through serde.
        if let Ok(text) = std::str::from_utf8(data)
            && let Some(scan) = Self::common(text)
        {
            return Ok(scan);
        }
        crate::json::from_object(data)
    }

    /// [`parse`](Self::parse) of the events the hand-written check reads
    /// ([`check_messages_event`](crate::encoded::scan::check_messages_event)).
    fn common(text: &'a str) -> Option<Self> {
        use crate::json::Key;
        let found = crate::encoded::scan::check_messages_event(text.as_bytes())?;
        let borrowed = |r: std::ops::Range<usize>| LenientStr(Some(Key::Borrowed(&text[r])));
        let delta = match found.delta {
            None => None,
            Some((kind, body)) => Some(ScanDelta {
                kind: borrowed(kind),
                text: LenientStr::scanned(text, body)?,
                partial_json: LenientStr::default(),
                thinking: LenientStr::default(),
                stop_reason: LenientStr::default(),
            }),
        };
        Some(Self {
            kind: borrowed(found.kind),
            index: found.index.map(Value::from),
            delta,
            content_block: None,
            message: None,
            usage: None,
        })
    }

    /// The event's `type` (`""` without one).
    pub fn kind(&self) -> &str {
        self.kind.as_deref().unwrap_or_default()
    }

    /// The content block index, when it is a whole number.
    pub fn index(&self) -> Option<usize> {
        self.index
            .as_ref()
            .and_then(Value::as_u64)
            .map(|i| usize::try_from(i).unwrap_or(usize::MAX))
    }

    /// Whether a `content_block_delta` has its `delta`.
    pub fn has_delta(&self) -> bool {
        self.delta.is_some()
    }

    /// The type of a `content_block_start`'s block.
    pub fn block_kind(&self) -> Option<&str> {
        self.content_block.as_ref()?.kind.as_deref()
    }

    /// Whether a `message_start` has its `message`.
    pub fn has_message(&self) -> bool {
        self.message.is_some()
    }

    /// A `message_start`'s message id and model.
    pub fn message_id_model(&self) -> (Option<&str>, Option<&str>) {
        let m = self.message.as_ref();
        (
            m.and_then(|m| m.id.as_deref()),
            m.and_then(|m| m.model.as_deref()),
        )
    }

    /// The usage object of the event (a `message_start`'s message's, a `message_delta`'s),
    /// as its text; `None` when absent or `null`.
    pub fn usage_json(&self) -> Option<&'a str> {
        let raw = match self.kind() {
            "message_start" => self.message.as_ref()?.usage?,
            _ => self.usage?,
        };
        Some(raw.get())
    }

    /// A `message_delta`'s stop reason.
    pub fn stop_reason(&self) -> Option<&str> {
        self.delta.as_ref()?.stop_reason.as_deref()
    }

    /// Whether the event's chat view has a choice (see [`view`](Self::view)), given the
    /// chat tool index of its block (`tool`, a tool block's).
    pub fn has_content(&self, tool: Option<u32>) -> bool {
        match self.kind() {
            "message_start" => true,
            "message_delta" => self.stop_reason().is_some(),
            "content_block_start" => match self.block_kind() {
                Some("text") => self
                    .content_block
                    .as_ref()
                    .and_then(|b| b.text.as_deref())
                    .is_some_and(|t| !t.is_empty()),
                Some("tool_use") => true,
                _ => false,
            },
            "content_block_delta" => match self.delta.as_ref().and_then(|d| d.kind.as_deref()) {
                Some("text_delta" | "thinking_delta") => true,
                Some("input_json_delta") => tool.is_some(),
                _ => false,
            },
            _ => false,
        }
    }

    /// The event's chat view: the chunk a chat client gets for it, with `head`'s id and
    /// model, `tool` the chat tool index of its block (a tool block's start and arguments)
    /// and `usage` the stream's usage (the chunk of `message_stop`); `None` for an event
    /// with no chat meaning (a ping, a block's end, a signature).
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
        let text = |t: &str| Delta {
            content: Some(Some(t.to_owned())),
            ..Delta::default()
        };
        match self.kind() {
            "message_start" => Some(chunk(
                Delta {
                    role: Some(Role::Assistant),
                    content: Some(Some(String::new())),
                    ..Delta::default()
                },
                None,
            )),
            "content_block_start" => {
                let block = self.content_block.as_ref()?;
                match block.kind.as_deref() {
                    Some("text") => {
                        let t = block.text.as_deref().filter(|t| !t.is_empty())?;
                        Some(chunk(text(t), None))
                    }
                    Some("tool_use") => {
                        // `input` is `{}` here; the arguments arrive as `input_json_delta`.
                        let args = match block
                            .input
                            .and_then(|raw| serde_json::from_str::<Value>(raw.get()).ok())
                        {
                            Some(Value::Object(o)) if !o.is_empty() => Value::Object(o).to_string(),
                            _ => String::new(),
                        };
                        Some(chunk(
                            tool_delta(
                                tool.unwrap_or_default(),
                                Some(block.id.as_deref().unwrap_or_default()),
                                Some(block.name.as_deref().unwrap_or_default()),
                                &args,
                            ),
                            None,
                        ))
                    }
                    _ => None,
                }
            }
            "content_block_delta" => {
                let delta = self.delta.as_ref()?;
                match (delta.kind.as_deref(), tool) {
                    (Some("text_delta"), _) => {
                        Some(chunk(text(delta.text.as_deref().unwrap_or_default()), None))
                    }
                    (Some("input_json_delta"), Some(t)) => Some(chunk(
                        tool_delta(
                            t,
                            None,
                            None,
                            delta.partial_json.as_deref().unwrap_or_default(),
                        ),
                        None,
                    )),
                    (Some("thinking_delta"), _) => {
                        let mut d = Delta::default();
                        let t = delta.thinking.as_deref().unwrap_or_default();
                        d.extra.insert("reasoning_content".into(), Value::from(t));
                        Some(chunk(d, None))
                    }
                    _ => None, // signature deltas, citations, server tool input
                }
            }
            "message_delta" => {
                let r = self.stop_reason()?;
                Some(chunk(Delta::default(), Some(finish_reason(r).to_owned())))
            }
            "message_stop" => {
                let mut last = chunk(Delta::default(), None);
                last.choices.clear();
                last.usage = Some(Some(usage.cloned().unwrap_or_default()));
                Some(last)
            }
            _ => None,
        }
    }
}

fn tool_delta(index: u32, id: Option<&str>, name: Option<&str>, args: &str) -> Delta {
    Delta {
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
    }
}

/// The chat view of a native Messages event ([`NativeEvent::decode`]): its
/// [`StreamScan::view`], or a chunk with no choices for an event with no chat meaning.
pub(crate) fn native_view(ev: &NativeEvent) -> Result<ChatChunk, LlmError> {
    let scan = StreamScan::parse(ev.data())
        .map_err(|e| LlmError::transport(format!("malformed JSON in a stream event: {e}")))?;
    Ok(scan
        .view(ev.head(), ev.tool(), ev.usage())
        .unwrap_or_else(|| {
            let mut c = ChatChunk::for_delta(
                ev.head().id.clone(),
                ev.head().created,
                ev.head().model.clone(),
                Delta::default(),
                None,
            );
            c.choices.clear();
            c
        }))
}

/// The frame for a native event, as [`NATIVE_EVENT`] holds it: the event's name and its
/// data as the upstream sent them.
pub fn native_frame(name: &str, data: &str) -> Value {
    let mut out = Vec::with_capacity(name.len() + data.len() + 16);
    write_frame(&mut out, name, data);
    // Built from `&str`s only.
    Value::String(String::from_utf8(out).unwrap_or_default())
}

/// Marks `chunk` as carrying the native `frame` (see [`NATIVE_EVENT`]).
pub fn attach_native(chunk: &mut ChatChunk, frame: Value) {
    chunk.extra.insert(NATIVE_EVENT.into(), frame);
}

/// Rough input token count of a view, for `count_tokens` when no upstream counts: about
/// four bytes of text per token, plus a few per message and for the tool definitions.
pub fn estimate_input_tokens(req: &ChatRequest) -> u64 {
    let mut bytes = req.prompt_text_len() as u64;
    for t in req.tools.iter().flatten() {
        if let Some(f) = &t.function {
            bytes = bytes.saturating_add(f.name.len() as u64);
            bytes = bytes.saturating_add(f.description.as_ref().map_or(0, |d| d.len()) as u64);
            bytes = bytes
                .saturating_add(f.parameters.as_ref().map_or(0, |p| p.to_string().len()) as u64);
        }
    }
    (bytes / 4).saturating_add(4u64.saturating_mul(req.messages.len() as u64))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The hand-written check of an answer never accepts what serde refuses, and reads
    /// the same model and usage (checked on every document one byte away).
    #[test]
    fn the_hand_check_of_an_answer_is_serdes() {
        let seeds = [
            r#"{"id":"msg_1","type":"message","role":"assistant","model":"claude-haiku-4-5","content":[{"type":"text","text":"hi"}],"stop_reason":"end_turn","stop_sequence":null,"usage":{"input_tokens":1,"cache_creation_input_tokens":0,"cache_read_input_tokens":3,"output_tokens":5,"service_tier":"standard","cache_creation":{"ephemeral_5m_input_tokens":0}}}"#,
            r#" { "content" : [ ] , "model" : "m" , "type" : "message" , "id" : "i" , "usage" : null } "#,
            r#"{"id":"i","type":"message","model":"m","content":[1,2.5e-3,true],"usage":{"output_tokens":null}}"#,
        ];
        let mut accepted = 0;
        let mut check = |doc: &[u8]| {
            let Ok(text) = std::str::from_utf8(doc) else {
                return;
            };
            let Some(found) = crate::encoded::scan::check_messages(doc) else {
                return;
            };
            accepted += 1;
            let (model, usage) = check_response_serde(doc)
                .unwrap_or_else(|e| panic!("serde refuses what the scan accepted ({e}): {text}"));
            assert_eq!(&text[found.model], model, "{text}");
            let hand = found.usage.map(|[i, o, w, r]| counts_usage(i, o, w, r));
            assert_eq!(hand, usage, "{text}");
        };
        for seed in seeds {
            check(seed.as_bytes());
            crate::json::one_byte_away(seed, &mut check);
        }
        assert!(accepted > 100, "{accepted}");
    }

    #[test]
    fn a_repeated_member_reads_as_its_last_value_in_both_reads() {
        // Typed; then with a turn of another shape, so as JSON values.
        for turn in [
            r#"{"role":"user","content":"x"}"#,
            r#"{"role":"user","content":"x","n":1}"#,
        ] {
            let body = format!(
                r#"{{"model":"a","max_tokens":1,"messages":[],"max_tokens":7,"messages":[{turn}],"model":"b"}}"#
            );
            let req = request_from_slice(body.as_bytes()).unwrap();
            assert_eq!(req.model, "b");
            assert_eq!(req.max_tokens, Some(7));
            assert_eq!(req.messages.len(), 1);
        }
    }

    #[test]
    fn turns_of_another_shape_are_refused_as_before() {
        for (turn, want) in [
            ("1", "`messages[0]` must be an object"),
            (r#"{"content":"x"}"#, "`messages[0]` needs `role`"),
            (
                r#"{"role":5,"content":"x"}"#,
                "`messages[0].role` must be a string",
            ),
            (
                r#"{"role":"system"}"#,
                "`messages[0].role` must be `user` or `assistant`, not `system`",
            ),
            (
                r#"{"role":"user"}"#,
                "`messages[0].content` must be a string or an array",
            ),
            (
                r#"{"role":"user","content":null}"#,
                "`messages[0].content` must be a string",
            ),
        ] {
            let body = format!(r#"{{"model":"m","max_tokens":1,"messages":[{turn}]}}"#);
            let e = request_from_slice(body.as_bytes()).unwrap_err();
            assert!(e.message().contains(want), "{turn}: {}", e.message());
        }
        let e = request_from_slice(
            br#"{"model":"m","max_tokens":1,"messages":[{"role":"user","content":"x","n":1e999}]}"#,
        )
        .unwrap_err();
        assert!(
            e.message().starts_with("invalid request body"),
            "{}",
            e.message()
        );
    }

    #[test]
    fn the_body_sent_is_the_clients_with_the_model_written_in_place() {
        let body = br#"{ "model" : "claude",  "max_tokens":5, "messages":[{"role":"user","content":"hi"}], "z": [1.50] }"#;
        let req = request_from_slice(body).unwrap();
        let native = req.extensions.get::<NativeRequest>().unwrap();
        let sent = native.body_for(&req, "claude-\"x\"", &[]).unwrap();
        let want = String::from_utf8_lossy(body).replace(r#""claude""#, r#""claude-\"x\"""#);
        assert_eq!(String::from_utf8(sent).unwrap(), want);
        // Two `model`s: re-assembled, with one.
        let req = request_from_slice(br#"{"model":"a","max_tokens":5,"messages":[],"model":"b"}"#)
            .unwrap();
        let native = req.extensions.get::<NativeRequest>().unwrap();
        let sent: Value =
            serde_json::from_slice(&native.body_for(&req, "c", &[]).unwrap()).unwrap();
        assert_eq!(sent, json!({"max_tokens":5,"messages":[],"model":"c"}));
    }

    /// The hand-written read of the common events reads what serde reads, and never
    /// accepts what serde refuses (checked on every document one byte away).
    #[test]
    fn the_hand_read_of_common_events_is_serdes() {
        let seeds = [
            r#"{"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"Hi \"x\"\n \u00e9\ud83d\ude00"}}"#,
            r#"{"type":"content_block_delta","index":2,"delta":{"type":"text_delta","text":"plain"}}"#,
            r#"{"type":"ping"}"#,
            r#"{"type":"content_block_stop","index":3}"#,
            r#" { "delta" : { "text" : "a" , "type" : "text_delta" } , "index" : 12 , "type" : "content_block_delta" } "#,
        ];
        let head = StreamHead::default();
        let read = |s: &StreamScan<'_>| (s.kind().to_owned(), s.index(), s.view(&head, None, None));
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
}
