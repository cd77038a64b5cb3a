//! Complete responses, stream chunks and usage.

use serde::{Deserialize, Serialize};

use crate::request::{Extra, Message};

/// A complete (non-streamed) chat-completions response.
///
/// ```
/// use llm_tower_core::ChatResponse;
/// let resp = ChatResponse::from_text("gpt-4o-mini", "Hello!");
/// assert_eq!(resp.text(), "Hello!");
/// ```
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ChatResponse {
    /// Response id (`chatcmpl-…`).
    pub id: String,
    /// `chat.completion`.
    #[serde(default = "object_completion")]
    pub object: String,
    /// Unix seconds.
    #[serde(default)]
    pub created: u64,
    /// The model that answered.
    pub model: String,
    /// The choices.
    pub choices: Vec<Choice>,
    /// Token usage.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
    /// Other fields (`system_fingerprint`, `service_tier`, …), kept as sent.
    #[serde(flatten)]
    pub extra: Extra,
}

fn object_completion() -> String {
    "chat.completion".to_owned()
}

impl ChatResponse {
    /// A one-choice response with assistant text `text`, finish reason `stop`.
    pub fn from_text(model: impl Into<String>, text: impl Into<String>) -> Self {
        Self {
            id: format!("chatcmpl-{}", next_id()),
            object: object_completion(),
            created: unix_now(),
            model: model.into(),
            choices: vec![Choice {
                index: 0,
                message: Message::assistant(text),
                finish_reason: Some("stop".to_owned()),
                extra: Extra::new(),
            }],
            usage: None,
            extra: Extra::new(),
        }
    }

    /// Parses a response body: `serde_json::from_slice`, but quicker on valid UTF-8 (checked
    /// once for the whole body, not string by string).
    ///
    /// ```
    /// use llm_tower_core::ChatResponse;
    /// let body = br#"{"id":"c1","model":"m","choices":[{"index":0,"message":{"role":"assistant","content":"hi"},"finish_reason":"stop"}]}"#;
    /// assert_eq!(ChatResponse::from_slice(body).unwrap().text(), "hi");
    /// assert!(ChatResponse::from_slice(b"{\"id\": \"\xff\"}").is_err());
    /// ```
    pub fn from_slice(bytes: &[u8]) -> serde_json::Result<Self> {
        crate::json::from_slice(bytes)
    }

    /// The text of the first choice (empty if none).
    pub fn text(&self) -> String {
        self.choices
            .first()
            .map(|c| c.message.text())
            .unwrap_or_default()
    }
}

/// One choice of a [`ChatResponse`].
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Choice {
    /// Choice index.
    #[serde(default)]
    pub index: u32,
    /// The assistant message.
    pub message: Message,
    /// `stop`, `length`, `tool_calls`, `content_filter`, …
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finish_reason: Option<String>,
    /// Other fields (`logprobs`, …), kept as sent.
    #[serde(flatten)]
    pub extra: Extra,
}

/// One server-sent chunk of a streamed response (`chat.completion.chunk`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ChatChunk {
    /// Response id, the same on every chunk.
    #[serde(default)]
    pub id: String,
    /// `chat.completion.chunk`.
    #[serde(default = "object_chunk")]
    pub object: String,
    /// Unix seconds.
    #[serde(default)]
    pub created: u64,
    /// The model that answers.
    #[serde(default)]
    pub model: String,
    /// Choice deltas (empty on the final usage chunk).
    #[serde(default)]
    pub choices: Vec<ChunkChoice>,
    /// Usage: `None` = absent, `Some(None)` = `null`, `Some(Some(u))` = the final usage.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "crate::nullable"
    )]
    pub usage: Option<Option<Usage>>,
    /// Other fields, kept as sent.
    #[serde(flatten)]
    pub extra: Extra,
}

fn object_chunk() -> String {
    "chat.completion.chunk".to_owned()
}

impl ChatChunk {
    /// A chunk carrying a text delta for choice 0.
    pub fn text(id: impl Into<String>, model: impl Into<String>, text: impl Into<String>) -> Self {
        let delta = Delta {
            content: Some(Some(text.into())),
            ..Delta::default()
        };
        Self::for_delta(id.into(), unix_now(), model.into(), delta, None)
    }

    /// A chunk carrying `delta` for choice 0 with its `finish_reason` (`None` while the
    /// choice goes on): what a decoder of another dialect's stream builds per event.
    ///
    /// ```
    /// use llm_tower_core::{ChatChunk, Delta};
    /// let c = ChatChunk::for_delta("c1".into(), 7, "m".into(), Delta::default(), Some("stop".into()));
    /// assert_eq!((c.created, c.choices[0].finish_reason.clone()), (7, Some(Some("stop".into()))));
    /// ```
    pub fn for_delta(
        id: String,
        created: u64,
        model: String,
        delta: Delta,
        finish: Option<String>,
    ) -> Self {
        Self {
            id,
            object: object_chunk(),
            created,
            model,
            choices: vec![ChunkChoice {
                index: 0,
                delta,
                finish_reason: Some(finish),
                extra: Extra::new(),
            }],
            usage: None,
            extra: Extra::new(),
        }
    }

    /// Parses one stream event's data: `serde_json::from_slice`, but quicker on valid UTF-8
    /// (checked once, not string by string).
    ///
    /// ```
    /// use llm_tower_core::ChatChunk;
    /// let data = br#"{"id":"c1","model":"m","choices":[{"index":0,"delta":{"content":"hi"}}]}"#;
    /// assert_eq!(ChatChunk::from_slice(data).unwrap().choices[0].delta.text(), Some("hi"));
    /// ```
    pub fn from_slice(bytes: &[u8]) -> serde_json::Result<Self> {
        crate::json::from_slice(bytes)
    }

    /// The usage this chunk carries, if any.
    pub fn usage(&self) -> Option<&Usage> {
        self.usage.as_ref().and_then(Option::as_ref)
    }
}

/// One choice's delta in a [`ChatChunk`].
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ChunkChoice {
    /// Choice index.
    #[serde(default)]
    pub index: u32,
    /// What this chunk adds.
    #[serde(default)]
    pub delta: Delta,
    /// `None` = absent, `Some(None)` = `null` (every chunk but the last), else the reason.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "crate::nullable"
    )]
    pub finish_reason: Option<Option<String>>,
    /// Other fields (`logprobs`, …), kept as sent.
    #[serde(flatten)]
    pub extra: Extra,
}

impl ChunkChoice {
    /// The finish reason, if this chunk ends the choice.
    pub fn finish_reason(&self) -> Option<&str> {
        self.finish_reason.as_ref().and_then(Option::as_deref)
    }
}

/// The incremental part of a streamed message.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Delta {
    /// Role (first chunk only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<crate::Role>,
    /// Text delta: `None` = absent, `Some(None)` = `null`.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "crate::nullable"
    )]
    pub content: Option<Option<String>>,
    /// Tool-call deltas.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Vec<ToolCallDelta>>,
    /// Other fields (`refusal`, …), kept as sent.
    #[serde(flatten)]
    pub extra: Extra,
}

impl Delta {
    /// The text delta, if any.
    pub fn text(&self) -> Option<&str> {
        self.content.as_ref().and_then(Option::as_deref)
    }
}

/// A fragment of a tool call in a stream; fragments with the same `index` concatenate.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ToolCallDelta {
    /// Which tool call this fragment belongs to.
    pub index: u32,
    /// Call id (first fragment).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// `function` (first fragment).
    #[serde(default, rename = "type", skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    /// Function name and argument fragments.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub function: Option<FunctionCallDelta>,
    /// Other fields.
    #[serde(flatten)]
    pub extra: Extra,
}

/// Function fragment of a [`ToolCallDelta`].
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct FunctionCallDelta {
    /// Function name (first fragment).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Argument fragment.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub arguments: Option<String>,
    /// Other fields.
    #[serde(flatten)]
    pub extra: Extra,
}

/// Token usage, with cached-input and reasoning tokens.
///
/// ```
/// use llm_tower_core::Usage;
/// let u = Usage::new(100, 20).with_cached_tokens(80);
/// assert_eq!(u.total_tokens, 120);
/// assert_eq!(u.cached_tokens(), 80);
/// assert_eq!(u.uncached_prompt_tokens(), 20);
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Usage {
    /// Input tokens, cached ones included.
    pub prompt_tokens: u64,
    /// Output tokens, reasoning ones included.
    pub completion_tokens: u64,
    /// Sum of the two.
    pub total_tokens: u64,
    /// Breakdown of the input tokens.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prompt_tokens_details: Option<PromptTokensDetails>,
    /// Breakdown of the output tokens.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub completion_tokens_details: Option<CompletionTokensDetails>,
    /// Other fields, kept as sent.
    #[serde(flatten)]
    pub extra: Extra,
}

crate::json::deserialize_with_extra!(
    Usage, "a usage object",
    required: [],
    optional: [prompt_tokens_details, completion_tokens_details],
    nullable: [],
    skipped: [],
    counts: [prompt_tokens, completion_tokens, total_tokens],
);

impl Usage {
    /// Usage with `prompt` input and `completion` output tokens.
    pub fn new(prompt: u64, completion: u64) -> Self {
        Self {
            prompt_tokens: prompt,
            completion_tokens: completion,
            total_tokens: prompt.saturating_add(completion),
            ..Self::default()
        }
    }
    /// Sets the cached-input token count.
    #[must_use]
    pub fn with_cached_tokens(mut self, cached: u64) -> Self {
        self.prompt_tokens_details
            .get_or_insert_with(Default::default)
            .cached_tokens = Some(cached);
        self
    }
    /// Input tokens read from the provider's prompt cache.
    pub fn cached_tokens(&self) -> u64 {
        self.prompt_tokens_details
            .as_ref()
            .and_then(|d| d.cached_tokens)
            .unwrap_or(0)
    }
    /// Input tokens billed at the full input price.
    pub fn uncached_prompt_tokens(&self) -> u64 {
        self.prompt_tokens.saturating_sub(self.cached_tokens())
    }
    /// Output tokens spent on reasoning.
    pub fn reasoning_tokens(&self) -> u64 {
        self.completion_tokens_details
            .as_ref()
            .and_then(|d| d.reasoning_tokens)
            .unwrap_or(0)
    }
}

/// `prompt_tokens_details`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct PromptTokensDetails {
    /// Tokens served from the provider's prompt cache.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cached_tokens: Option<u64>,
    /// Tokens written to the provider's prompt cache (Anthropic `cache_creation_input_tokens`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cache_write_tokens: Option<u64>,
    /// Audio input tokens.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub audio_tokens: Option<u64>,
    /// Other fields.
    #[serde(flatten)]
    pub extra: Extra,
}

crate::json::deserialize_with_extra!(
    PromptTokensDetails, "a prompt_tokens_details object",
    required: [],
    optional: [],
    nullable: [],
    skipped: [],
    counts: [cached_tokens, cache_write_tokens, audio_tokens],
);

/// `completion_tokens_details`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct CompletionTokensDetails {
    /// Reasoning tokens.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reasoning_tokens: Option<u64>,
    /// Audio output tokens.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub audio_tokens: Option<u64>,
    /// Predicted-output tokens that appeared in the answer.
    // Typed although no layer reads them: OpenAI sends both on every answer, and in
    // `extra` each clone and drop of a usage would allocate and free their keys.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub accepted_prediction_tokens: Option<u64>,
    /// Predicted-output tokens that did not (billed as output all the same).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rejected_prediction_tokens: Option<u64>,
    /// Other fields.
    #[serde(flatten)]
    pub extra: Extra,
}

crate::json::deserialize_with_extra!(
    CompletionTokensDetails, "a completion_tokens_details object",
    required: [],
    optional: [],
    nullable: [],
    skipped: [],
    counts: [reasoning_tokens, audio_tokens, accepted_prediction_tokens, rejected_prediction_tokens],
);

pub(crate) fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// A process-unique id suffix (not random: ids only need to be unique per process here;
/// providers and the HTTP surface use their own request ids).
pub(crate) fn next_id() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(1);
    format!(
        "{:x}{:06x}",
        unix_now(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}
