//! The chat-completions request: typed where layers act, lossless for everything else.

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::{Map, Number, Value};

use crate::LlmError;
use crate::ext::{CachePolicy, Deadline, IdempotencyKey, TaskType, Tenant};

/// A JSON object holding fields this crate does not type; written back unchanged.
pub type Extra = Map<String, Value>;

/// An OpenAI chat-completions request.
///
/// Fields that layers read or change are typed; every other field (present or future) is
/// kept in [`extra`](Self::extra) and serialized back unchanged, so a gateway forwards what
/// the client sent. Typed metadata for layers travels in [`extensions`](Self::extensions),
/// which is never serialized.
///
/// ```
/// use llm_tower_core::{ChatRequest, Message};
///
/// let req = ChatRequest::from_slice(br#"{
///     "model": "gpt-4o-mini",
///     "messages": [{"role": "user", "content": "Hi"}],
///     "temperature": 0,
///     "some_future_field": {"x": 1}
/// }"#).unwrap();
/// assert_eq!(req.model, "gpt-4o-mini");
/// assert_eq!(req.messages[0].text(), "Hi");
/// // Unknown fields survive the round trip.
/// let back = serde_json::to_value(&req).unwrap();
/// assert_eq!(back["some_future_field"]["x"], 1);
///
/// let built = ChatRequest::new("gpt-4o-mini", vec![Message::user("Hi")]);
/// assert_eq!(built.messages.len(), 1);
/// ```
#[derive(Debug, Clone, Default, Serialize)]
pub struct ChatRequest {
    /// Model name or alias.
    pub model: String,
    /// The conversation.
    pub messages: Vec<Message>,
    /// Whether the answer is streamed as server-sent events.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stream: Option<bool>,
    /// Streaming options (`include_usage`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stream_options: Option<StreamOptions>,
    /// Sampling temperature, kept as the client's JSON number so `1` stays `1`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub temperature: Option<Number>,
    /// Nucleus sampling, kept as the client's JSON number.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub top_p: Option<Number>,
    /// Legacy output limit.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_tokens: Option<u64>,
    /// Output limit including reasoning tokens.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_completion_tokens: Option<u64>,
    /// Number of choices.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub n: Option<u64>,
    /// Sampling seed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub seed: Option<i64>,
    /// Structured-output settings.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub response_format: Option<ResponseFormat>,
    /// Tool (function) definitions.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tools: Option<Vec<Tool>>,
    /// Tool choice (`"auto"`, `"none"`, `"required"` or an object).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool_choice: Option<Value>,
    /// End-user identifier.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// Every other field, kept as sent.
    #[serde(flatten)]
    pub extra: Extra,
    /// Typed metadata for layers (task type, tenant, …); never serialized.
    #[serde(skip)]
    pub extensions: http::Extensions,
}

crate::json::deserialize_with_extra!(
    ChatRequest, "a chat completions request",
    required: [model, messages],
    optional: [
        stream, stream_options, temperature, top_p, max_tokens, max_completion_tokens, n, seed,
        response_format, tools, tool_choice, user,
    ],
    nullable: [],
    skipped: [extensions],
);

/// Largest accepted request document; bigger bodies are refused before parsing.
pub const MAX_REQUEST_BYTES: usize = 32 * 1024 * 1024;

impl ChatRequest {
    /// A request for `model` with `messages` and nothing else set.
    pub fn new(model: impl Into<String>, messages: Vec<Message>) -> Self {
        Self {
            model: model.into(),
            messages,
            ..Self::default()
        }
    }

    /// Parses a request body, returning a bad-request [`LlmError`] that names the field
    /// at fault (`messages[0].role: …`) on malformed input.
    ///
    /// ```
    /// use llm_tower_core::{ChatRequest, ErrorKind};
    /// let err = ChatRequest::from_slice(br#"{"messages": []}"#).unwrap_err();
    /// assert_eq!(err.kind(), ErrorKind::BadRequest);
    /// assert!(err.message().contains("model"));
    /// ```
    pub fn from_slice(body: &[u8]) -> Result<Self, LlmError> {
        if body.len() > MAX_REQUEST_BYTES {
            return Err(LlmError::bad_request(format!(
                "request body of {} bytes exceeds the limit of {MAX_REQUEST_BYTES} bytes",
                body.len()
            )));
        }
        // The fast path parses plainly; only a failure is parsed again with path tracking,
        // which costs on every field, to name the field at fault.
        let req: ChatRequest = match crate::json::from_slice(body) {
            Ok(req) => req,
            Err(plain) => {
                let de = &mut serde_json::Deserializer::from_slice(body);
                // Cannot succeed where the plain parse failed (same input, same parser);
                // if it did, the plain error is still the answer.
                let Err(err) = serde_path_to_error::deserialize::<_, ChatRequest>(de) else {
                    return Err(LlmError::bad_request(format!(
                        "invalid request body: {plain}"
                    )));
                };
                let path = err.path().to_string();
                let inner = err.into_inner();
                let msg = if path.is_empty() || path == "." {
                    format!("invalid request body: {inner}")
                } else {
                    format!("invalid request body at `{path}`: {inner}")
                };
                return Err(LlmError::bad_request(msg));
            }
        };
        req.validate()?;
        Ok(req)
    }

    /// Checks the rules the OpenAI API enforces that serde cannot: a non-empty model and
    /// at least one message.
    pub fn validate(&self) -> Result<(), LlmError> {
        if self.model.trim().is_empty() {
            return Err(LlmError::bad_request("`model` must not be empty").with_param("model"));
        }
        if self.messages.is_empty() {
            return Err(
                LlmError::bad_request("`messages` must contain at least one message")
                    .with_param("messages"),
            );
        }
        Ok(())
    }

    /// Whether the caller asked for a stream.
    pub fn is_stream(&self) -> bool {
        self.stream.unwrap_or(false)
    }

    /// The temperature as a float, if set.
    pub fn temperature_f64(&self) -> Option<f64> {
        self.temperature.as_ref().and_then(Number::as_f64)
    }

    /// The output limit, whichever of `max_completion_tokens` / `max_tokens` is set.
    pub fn output_limit(&self) -> Option<u64> {
        self.max_completion_tokens.or(self.max_tokens)
    }

    /// The task type extension, if set.
    pub fn task_type(&self) -> Option<&TaskType> {
        self.extensions.get()
    }
    /// Sets the task type.
    pub fn set_task_type(&mut self, task: impl Into<TaskType>) {
        self.extensions.insert(task.into());
    }
    /// Builder form of [`set_task_type`](Self::set_task_type).
    #[must_use]
    pub fn with_task_type(mut self, task: impl Into<TaskType>) -> Self {
        self.set_task_type(task);
        self
    }
    /// The tenant extension, if set.
    pub fn tenant(&self) -> Option<&Tenant> {
        self.extensions.get()
    }
    /// Sets the tenant.
    pub fn set_tenant(&mut self, tenant: impl Into<Tenant>) {
        self.extensions.insert(tenant.into());
    }
    /// Builder form of [`set_tenant`](Self::set_tenant).
    #[must_use]
    pub fn with_tenant(mut self, tenant: impl Into<Tenant>) -> Self {
        self.set_tenant(tenant);
        self
    }
    /// The idempotency key extension, if set.
    pub fn idempotency_key(&self) -> Option<&IdempotencyKey> {
        self.extensions.get()
    }
    /// Sets the idempotency key.
    pub fn set_idempotency_key(&mut self, key: impl Into<IdempotencyKey>) {
        self.extensions.insert(key.into());
    }
    /// The deadline extension, if set.
    pub fn deadline(&self) -> Option<Deadline> {
        self.extensions.get().copied()
    }
    /// Sets the deadline.
    pub fn set_deadline(&mut self, deadline: Deadline) {
        self.extensions.insert(deadline);
    }
    /// The cache policy ([`CachePolicy::Default`] when unset).
    pub fn cache_policy(&self) -> CachePolicy {
        self.extensions.get().copied().unwrap_or_default()
    }
    /// Sets the cache policy.
    pub fn set_cache_policy(&mut self, policy: CachePolicy) {
        self.extensions.insert(policy);
    }

    /// Concatenated text of every message (for token estimates and validators).
    /// An embeddings envelope counts its inputs ([`ChatRequest::embeddings`]).
    pub fn prompt_text_len(&self) -> usize {
        if let Some(e) = self.as_embeddings() {
            return e.input_len();
        }
        self.messages.iter().map(|m| m.text_len()).sum()
    }
}

/// `stream_options` of a streaming request.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct StreamOptions {
    /// Ask for a final chunk that carries usage.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub include_usage: Option<bool>,
    /// Other options, kept as sent.
    #[serde(flatten)]
    pub extra: Extra,
}

/// `response_format`: `{"type": "text" | "json_object" | "json_schema", "json_schema": {...}}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ResponseFormat {
    /// `text`, `json_object` or `json_schema`.
    #[serde(rename = "type")]
    pub kind: String,
    /// The schema, for `json_schema`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub json_schema: Option<JsonSchemaFormat>,
    /// Other fields, kept as sent.
    #[serde(flatten)]
    pub extra: Extra,
}

/// The `json_schema` member of [`ResponseFormat`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JsonSchemaFormat {
    /// Schema name.
    pub name: String,
    /// The JSON Schema itself.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schema: Option<Value>,
    /// Strict mode.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub strict: Option<bool>,
    /// Other fields (`description`, …), kept as sent.
    #[serde(flatten)]
    pub extra: Extra,
}

/// A tool definition: `{"type": "function", "function": {...}}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Tool {
    /// Tool type (`function`, or a future kind).
    #[serde(rename = "type")]
    pub kind: String,
    /// The function, for function tools.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub function: Option<FunctionDef>,
    /// Other fields, kept as sent.
    #[serde(flatten)]
    pub extra: Extra,
}

/// A function tool's definition.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FunctionDef {
    /// Function name.
    pub name: String,
    /// What the function does.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// JSON Schema of the arguments.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parameters: Option<Value>,
    /// Other fields (`strict`, …), kept as sent.
    #[serde(flatten)]
    pub extra: Extra,
}

/// The author of a message. Unknown roles are kept verbatim.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub enum Role {
    /// `system`
    System,
    /// `developer`
    Developer,
    /// `user`
    #[default]
    User,
    /// `assistant`
    Assistant,
    /// `tool`
    Tool,
    /// `function` (deprecated by OpenAI, still accepted)
    Function,
    /// Any other role, kept as sent.
    Other(String),
}

impl Role {
    /// The wire name.
    pub fn as_str(&self) -> &str {
        match self {
            Role::System => "system",
            Role::Developer => "developer",
            Role::User => "user",
            Role::Assistant => "assistant",
            Role::Tool => "tool",
            Role::Function => "function",
            Role::Other(s) => s,
        }
    }
}

impl From<&str> for Role {
    fn from(s: &str) -> Self {
        match s {
            "system" => Role::System,
            "developer" => Role::Developer,
            "user" => Role::User,
            "assistant" => Role::Assistant,
            "tool" => Role::Tool,
            "function" => Role::Function,
            other => Role::Other(other.to_owned()),
        }
    }
}

impl Serialize for Role {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for Role {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        // Borrowed from the input where it can be: serde's `Cow<str>` always allocates.
        let s = crate::json::Key::deserialize(d)?;
        Ok(Role::from(s.as_str()))
    }
}

/// One chat message (any role).
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Message {
    /// Who wrote it.
    pub role: Role,
    /// The content: `None` = absent, `Some(None)` = explicit `null` (assistant tool calls).
    #[serde(skip_serializing_if = "Option::is_none", with = "crate::nullable")]
    pub content: Option<Option<Content>>,
    /// Participant name.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Tool calls made by the assistant.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Vec<ToolCall>>,
    /// For `tool` messages: the call this is the result of.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
    /// Other fields (`refusal`, `audio`, `annotations`, …), kept as sent.
    #[serde(flatten)]
    pub extra: Extra,
}

crate::json::deserialize_with_extra!(
    Message, "a chat message",
    required: [role],
    optional: [name, tool_calls, tool_call_id],
    nullable: [content],
    skipped: [],
);

impl Message {
    /// A message with `role` and text `content`.
    pub fn new(role: Role, content: impl Into<String>) -> Self {
        Self {
            role,
            content: Some(Some(Content::Text(content.into()))),
            ..Self::default()
        }
    }
    /// A `system` message.
    pub fn system(content: impl Into<String>) -> Self {
        Self::new(Role::System, content)
    }
    /// A `user` message.
    pub fn user(content: impl Into<String>) -> Self {
        Self::new(Role::User, content)
    }
    /// An `assistant` message.
    pub fn assistant(content: impl Into<String>) -> Self {
        Self::new(Role::Assistant, content)
    }

    /// The message's content, if any.
    pub fn content(&self) -> Option<&Content> {
        self.content.as_ref().and_then(Option::as_ref)
    }

    /// The text of the message: the string content, or the text parts joined.
    pub fn text(&self) -> String {
        match self.content() {
            None => String::new(),
            Some(c) => c.text(),
        }
    }

    /// Length in bytes of the text content plus tool-call arguments (for estimates).
    pub fn text_len(&self) -> usize {
        let content = self.content().map_or(0, Content::text_len);
        let tools = self.tool_calls.as_ref().map_or(0, |calls| {
            calls
                .iter()
                .map(|c| c.function.name.len() + c.function.arguments.len())
                .sum()
        });
        content + tools
    }
}

/// Message content: a plain string or a list of parts.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum Content {
    /// Plain text.
    Text(String),
    /// Multi-part content (text, images, audio, files, refusals).
    Parts(Vec<ContentPart>),
}

impl Content {
    /// The text: the string, or every text part joined without separator.
    pub fn text(&self) -> String {
        match self {
            Content::Text(s) => s.clone(),
            Content::Parts(parts) => parts.iter().filter_map(ContentPart::text).collect(),
        }
    }
    fn text_len(&self) -> usize {
        match self {
            Content::Text(s) => s.len(),
            Content::Parts(parts) => parts
                .iter()
                .filter_map(ContentPart::text)
                .map(str::len)
                .sum(),
        }
    }
}

impl<'de> Deserialize<'de> for Content {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        // A hand-written visitor (not `untagged`) so a bad part reports its own error and
        // path instead of "did not match any variant".
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Content;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a string or an array of content parts")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Content, E> {
                Ok(Content::Text(v.to_owned()))
            }
            fn visit_string<E: serde::de::Error>(self, v: String) -> Result<Content, E> {
                Ok(Content::Text(v))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<Content, A::Error> {
                let mut parts = Vec::with_capacity(seq.size_hint().unwrap_or(1));
                while let Some(p) = seq.next_element::<ContentPart>()? {
                    parts.push(p);
                }
                Ok(Content::Parts(parts))
            }
        }
        d.deserialize_any(V)
    }
}

impl From<&str> for Content {
    fn from(s: &str) -> Self {
        Content::Text(s.to_owned())
    }
}
impl From<String> for Content {
    fn from(s: String) -> Self {
        Content::Text(s)
    }
}

/// One part of multi-part content. Unknown part types are kept verbatim in
/// [`ContentPart::Other`].
#[derive(Debug, Clone, PartialEq)]
pub enum ContentPart {
    /// `{"type": "text", "text": …}`
    Text {
        /// The text.
        text: String,
        /// Other fields (`cache_control`, …).
        extra: Extra,
    },
    /// `{"type": "image_url", "image_url": {"url", "detail"}}`
    ImageUrl {
        /// The image reference.
        image_url: ImageUrl,
        /// Other fields.
        extra: Extra,
    },
    /// `{"type": "input_audio", "input_audio": {"data", "format"}}`
    InputAudio {
        /// The audio.
        input_audio: InputAudio,
        /// Other fields.
        extra: Extra,
    },
    /// `{"type": "refusal", "refusal": …}` (assistant messages)
    Refusal {
        /// The refusal text.
        refusal: String,
        /// Other fields.
        extra: Extra,
    },
    /// Any other part (`file`, future kinds), kept as sent.
    Other(Extra),
}

impl ContentPart {
    /// A text part.
    pub fn text_part(text: impl Into<String>) -> Self {
        ContentPart::Text {
            text: text.into(),
            extra: Extra::new(),
        }
    }
    /// The text of a text part.
    pub fn text(&self) -> Option<&str> {
        match self {
            ContentPart::Text { text, .. } => Some(text),
            _ => None,
        }
    }
    /// The part's `type`.
    pub fn kind(&self) -> &str {
        match self {
            ContentPart::Text { .. } => "text",
            ContentPart::ImageUrl { .. } => "image_url",
            ContentPart::InputAudio { .. } => "input_audio",
            ContentPart::Refusal { .. } => "refusal",
            ContentPart::Other(m) => m.get("type").and_then(Value::as_str).unwrap_or(""),
        }
    }
}

/// An image reference (URL or `data:` URL).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ImageUrl {
    /// `https://…` or `data:image/png;base64,…`.
    pub url: String,
    /// `low`, `high` or `auto`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    /// Other fields.
    #[serde(flatten)]
    pub extra: Extra,
}

/// Base64 audio input.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InputAudio {
    /// Base64 data.
    pub data: String,
    /// `wav`, `mp3`, …
    pub format: String,
    /// Other fields.
    #[serde(flatten)]
    pub extra: Extra,
}

impl Serialize for ContentPart {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::Error;
        let (kind, key, value, extra) = match self {
            ContentPart::Other(m) => return m.serialize(s),
            ContentPart::Text { text, extra } => {
                ("text", "text", Value::from(text.as_str()), extra)
            }
            ContentPart::ImageUrl { image_url, extra } => (
                "image_url",
                "image_url",
                serde_json::to_value(image_url).map_err(S::Error::custom)?,
                extra,
            ),
            ContentPart::InputAudio { input_audio, extra } => (
                "input_audio",
                "input_audio",
                serde_json::to_value(input_audio).map_err(S::Error::custom)?,
                extra,
            ),
            ContentPart::Refusal { refusal, extra } => {
                ("refusal", "refusal", Value::from(refusal.as_str()), extra)
            }
        };
        let mut m = Map::with_capacity(extra.len() + 2);
        m.insert("type".into(), Value::from(kind));
        m.insert(key.into(), value);
        for (k, v) in extra {
            m.insert(k.clone(), v.clone());
        }
        m.serialize(s)
    }
}

impl<'de> Deserialize<'de> for ContentPart {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        let mut m = Map::deserialize(d)?;
        let kind = match m.get("type") {
            Some(Value::String(k)) => k.clone(),
            Some(_) => return Err(D::Error::custom("content part `type` must be a string")),
            None => return Err(D::Error::missing_field("type")),
        };
        let take = |m: &mut Map<String, Value>, key: &str| {
            m.remove(key)
                .ok_or_else(|| D::Error::custom(format!("`{kind}` content part needs `{key}`")))
        };
        let part = match kind.as_str() {
            "text" => {
                let Value::String(text) = take(&mut m, "text")? else {
                    return Err(D::Error::custom("`text` must be a string"));
                };
                m.remove("type");
                ContentPart::Text { text, extra: m }
            }
            "image_url" => {
                let v = take(&mut m, "image_url")?;
                let image_url = serde_json::from_value(v).map_err(D::Error::custom)?;
                m.remove("type");
                ContentPart::ImageUrl {
                    image_url,
                    extra: m,
                }
            }
            "input_audio" => {
                let v = take(&mut m, "input_audio")?;
                let input_audio = serde_json::from_value(v).map_err(D::Error::custom)?;
                m.remove("type");
                ContentPart::InputAudio {
                    input_audio,
                    extra: m,
                }
            }
            "refusal" => {
                let Value::String(refusal) = take(&mut m, "refusal")? else {
                    return Err(D::Error::custom("`refusal` must be a string"));
                };
                m.remove("type");
                ContentPart::Refusal { refusal, extra: m }
            }
            _ => ContentPart::Other(m),
        };
        Ok(part)
    }
}

/// A tool call made by the assistant.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ToolCall {
    /// Call id, echoed by the `tool` message that answers it.
    pub id: String,
    /// `function`.
    #[serde(rename = "type")]
    pub kind: String,
    /// The call.
    pub function: FunctionCall,
    /// Other fields.
    #[serde(flatten)]
    pub extra: Extra,
}

/// The function part of a [`ToolCall`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FunctionCall {
    /// Function name.
    pub name: String,
    /// Arguments as a JSON string (as the API sends them).
    pub arguments: String,
    /// Other fields.
    #[serde(flatten)]
    pub extra: Extra,
}
