//! One-call forms for the common parts of a request and an answer, so application code does
//! not build JSON numbers or dig through the body by hand. The explicit fields stay public.

use serde_json::{Number, Value};

use crate::request::{ChatRequest, Extra, FunctionDef, JsonSchemaFormat, ResponseFormat, Tool};
use crate::{ChatResponse, LlmError, LlmResponse, ResponseMeta};

/// A finite `f64` as a JSON number. A NaN or infinite sampling parameter is a bug in the
/// caller, which no provider would accept either.
fn number(what: &str, value: f64) -> Number {
    Number::from_f64(value).unwrap_or_else(|| panic!("{what} must be finite, got {value}"))
}

/// Builder methods for the parameters most calls set.
///
/// ```
/// use llm_tower_core::{ChatRequest, Message, Tool};
/// use serde_json::json;
///
/// let req = ChatRequest::new("gpt-4o-mini", vec![Message::user("Extract the city")])
///     .with_temperature(0.0) // deterministic, so the cache may serve it
///     .with_max_tokens(200)
///     .with_seed(7)
///     .with_json_schema("place", json!({"type": "object", "properties": {"city": {"type": "string"}}}))
///     .with_tool(Tool::function("lookup", "Find a place", json!({"type": "object"})));
/// let body = serde_json::to_value(&req).unwrap();
/// assert_eq!(body["temperature"], 0.0);
/// assert_eq!(body["response_format"]["json_schema"]["name"], "place");
/// assert_eq!(body["tools"][0]["function"]["name"], "lookup");
/// ```
impl ChatRequest {
    /// Sets `temperature`.
    ///
    /// # Panics
    ///
    /// If `t` is NaN or infinite.
    #[must_use]
    pub fn with_temperature(mut self, t: f64) -> Self {
        self.temperature = Some(number("temperature", t));
        self
    }

    /// Sets `top_p`.
    ///
    /// # Panics
    ///
    /// If `p` is NaN or infinite.
    #[must_use]
    pub fn with_top_p(mut self, p: f64) -> Self {
        self.top_p = Some(number("top_p", p));
        self
    }

    /// Sets `max_tokens`, the output limit every OpenAI-compatible server and the Anthropic
    /// translation understand. OpenAI's reasoning models take
    /// [`max_completion_tokens`](Self::with_max_completion_tokens) instead.
    #[must_use]
    pub fn with_max_tokens(mut self, n: u64) -> Self {
        self.max_tokens = Some(n);
        self
    }

    /// Sets `max_completion_tokens` (output limit including reasoning tokens).
    #[must_use]
    pub fn with_max_completion_tokens(mut self, n: u64) -> Self {
        self.max_completion_tokens = Some(n);
        self
    }

    /// Sets `seed`.
    #[must_use]
    pub fn with_seed(mut self, seed: i64) -> Self {
        self.seed = Some(seed);
        self
    }

    /// Asks for a streamed (`true`) or complete (`false`) answer.
    #[must_use]
    pub fn with_stream(mut self, stream: bool) -> Self {
        self.stream = Some(stream);
        self
    }

    /// Asks for JSON output matching `schema` (`response_format` of type `json_schema`,
    /// strict). The validate layer checks answers against the same schema.
    #[must_use]
    pub fn with_json_schema(mut self, name: impl Into<String>, schema: Value) -> Self {
        self.response_format = Some(ResponseFormat {
            kind: "json_schema".to_owned(),
            json_schema: Some(JsonSchemaFormat {
                name: name.into(),
                schema: Some(schema),
                strict: Some(true),
                extra: Extra::new(),
            }),
            extra: Extra::new(),
        });
        self
    }

    /// Asks for any JSON object (`response_format` of type `json_object`).
    #[must_use]
    pub fn with_json_object(mut self) -> Self {
        self.response_format = Some(ResponseFormat {
            kind: "json_object".to_owned(),
            json_schema: None,
            extra: Extra::new(),
        });
        self
    }

    /// Adds a tool the model may call.
    #[must_use]
    pub fn with_tool(mut self, tool: Tool) -> Self {
        self.tools.get_or_insert_with(Vec::new).push(tool);
        self
    }
}

impl Tool {
    /// A function tool: `name`, what it does, and the JSON Schema of its arguments.
    ///
    /// ```
    /// use llm_tower_core::Tool;
    /// let t = Tool::function("get_weather", "Weather for a city", serde_json::json!({"type": "object"}));
    /// assert_eq!(t.function.unwrap().name, "get_weather");
    /// ```
    pub fn function(
        name: impl Into<String>,
        description: impl Into<String>,
        parameters: Value,
    ) -> Self {
        Self {
            kind: "function".to_owned(),
            function: Some(FunctionDef {
                name: name.into(),
                description: Some(description.into()),
                parameters: Some(parameters),
                extra: Extra::new(),
            }),
            extra: Extra::new(),
        }
    }
}

/// A complete answer with what the layers learned about it: the result of
/// [`LlmResponse::into_answer`].
#[derive(Debug, Clone)]
pub struct Answer {
    /// The answer (a stream is aggregated into one).
    pub response: ChatResponse,
    /// Provider, model, attempts, cache status, usage, cost.
    pub meta: ResponseMeta,
}

impl Answer {
    /// The text of the first choice (empty if none).
    pub fn text(&self) -> String {
        self.response.text()
    }
}

impl LlmResponse {
    /// Collects the body (as [`into_complete`](Self::into_complete)) and keeps the meta
    /// beside it, so the text and the meta come from one call. For a stream, the usage the
    /// stream ended with fills the meta's usage when no layer set it.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), llm_tower_core::LlmError> {
    /// use llm_tower_core::{ChatResponse, LlmResponse};
    /// let answer = LlmResponse::complete(ChatResponse::from_text("m", "hi")).into_answer().await?;
    /// assert_eq!(answer.text(), "hi");
    /// assert_eq!(answer.meta.model.as_deref(), Some("m"));
    /// # Ok(()) }
    /// ```
    pub async fn into_answer(mut self) -> Result<Answer, LlmError> {
        let mut meta = std::mem::take(&mut self.meta);
        let response = self.into_complete().await?;
        if meta.usage.is_none() {
            meta.usage.clone_from(&response.usage);
        }
        Ok(Answer { response, meta })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{ChatChunk, Message, Usage};

    #[test]
    #[should_panic(expected = "temperature must be finite")]
    fn nan_temperature_is_refused() {
        let _ = ChatRequest::new("m", vec![Message::user("x")]).with_temperature(f64::NAN);
    }

    #[test]
    fn builders_round_trip_through_the_parser() {
        let req = ChatRequest::new("m", vec![Message::user("x")])
            .with_temperature(0.5)
            .with_top_p(1.0)
            .with_max_completion_tokens(9)
            .with_stream(true)
            .with_json_object();
        let back = ChatRequest::from_slice(&serde_json::to_vec(&req).unwrap()).unwrap();
        assert_eq!(back.temperature, req.temperature);
        assert_eq!(back.max_completion_tokens, Some(9));
        assert_eq!(back.stream, Some(true));
        assert_eq!(back.response_format.unwrap().kind, "json_object");
    }

    #[tokio::test]
    async fn a_streamed_answer_brings_its_usage_into_the_meta() {
        let mut last = ChatChunk::text("c", "m", "");
        last.usage = Some(Some(Usage::new(3, 4)));
        let chunks = vec![
            Ok(ChatChunk::text("c", "m", "he")),
            Ok(ChatChunk::text("c", "m", "y")),
            Ok(last),
        ];
        let answer = LlmResponse::stream(futures_util::stream::iter(chunks))
            .into_answer()
            .await
            .unwrap();
        assert_eq!(answer.text(), "hey");
        assert_eq!(answer.meta.usage.map(|u| u.total_tokens), Some(7));
    }

    #[tokio::test]
    async fn a_failed_stream_is_an_error() {
        let chunks = vec![
            Ok(ChatChunk::text("c", "m", "he")),
            Err(LlmError::unavailable("cut")),
        ];
        let err = LlmResponse::stream(futures_util::stream::iter(chunks))
            .into_answer()
            .await
            .unwrap_err();
        assert_eq!(err.kind(), crate::ErrorKind::Unavailable);
    }
}
