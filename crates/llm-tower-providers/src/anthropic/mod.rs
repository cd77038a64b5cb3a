//! The Anthropic Messages provider (`POST {base_url}/v1/messages`) and its translation
//! to and from the chat-completions shapes.

pub(crate) mod translate;

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::{HeaderName, HeaderValue};
use llm_tower_core::{
    ChatRequest, Dialect, EncodedResponse, LlmError, LlmResponse, NativeRequest, TraceParent,
};
use serde::Deserialize;
use serde_json::Value;
use tower_service::Service;

pub use translate::{
    TranslateOptions, finish_reason, from_messages_response, to_messages_request, usage_from,
};

use crate::classify;
use crate::common::{Endpoint, ResponseFuture, SseStream, map_model};
use crate::http::HttpClient;
use crate::limits::ResponseLimits;
use crate::openai::resolve_key;
use crate::secret::ApiKey;
use translate::AnthropicDecoder;

/// Settings of an [`AnthropicProvider`]; deserializable from the gateway's TOML.
///
/// ```
/// use llm_tower_providers::AnthropicConfig;
///
/// let cfg: AnthropicConfig = serde_json::from_value(serde_json::json!({
///     "prompt_caching": true,
///     "models": {"smart": "claude-sonnet-4-5"},
///     "beta": ["token-efficient-tools-2025-02-19"]
/// })).unwrap();
/// assert!(cfg.prompt_caching);
/// assert_eq!(cfg.api_key_env, None); // ANTHROPIC_API_KEY is read for api.anthropic.com
/// ```
#[derive(Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AnthropicConfig {
    /// Provider name in meta, errors and logs. Default `anthropic`.
    pub name: String,
    /// API base without the version path; `/v1/messages` is appended. Default
    /// `https://api.anthropic.com`.
    pub base_url: String,
    /// The key itself (prefer `api_key_env` in files).
    pub api_key: Option<ApiKey>,
    /// Environment variable read when `api_key` is absent. Default: `ANTHROPIC_API_KEY`
    /// for `api.anthropic.com`, none for other hosts (a key is never sent elsewhere by
    /// accident).
    pub api_key_env: Option<String>,
    /// `anthropic-version` header. Default `2023-06-01`.
    pub version: String,
    /// `anthropic-beta` features, sent comma-separated.
    pub beta: Vec<String>,
    /// Extra request headers.
    pub headers: BTreeMap<String, String>,
    /// Model mapping: alias → provider model.
    pub models: HashMap<String, String>,
    /// Model used when a request names none.
    pub default_model: Option<String>,
    /// `max_tokens` when the request sets no limit (the API requires one). Default 4096.
    pub default_max_tokens: u64,
    /// Prompt caching: mark the system prompt and the tool definitions with
    /// `cache_control` so repeated calls read them from Anthropic's cache. Default `false`.
    pub prompt_caching: bool,
    /// Cache TTL for prompt caching (`"5m"` or `"1h"`); default: Anthropic's (5 minutes).
    pub cache_ttl: Option<String>,
    /// Bounds on the answers read (body size, event size, response timeout).
    pub limits: ResponseLimits,
}

impl Default for AnthropicConfig {
    fn default() -> Self {
        Self {
            name: "anthropic".to_owned(),
            base_url: "https://api.anthropic.com".to_owned(),
            api_key: None,
            api_key_env: None,
            version: "2023-06-01".to_owned(),
            beta: Vec::new(),
            headers: BTreeMap::new(),
            models: HashMap::new(),
            default_model: None,
            default_max_tokens: 4096,
            prompt_caching: false,
            cache_ttl: None,
            limits: ResponseLimits::default(),
        }
    }
}

impl AnthropicConfig {
    /// A config for `base_url` with the other fields at their defaults.
    pub fn new(base_url: impl Into<String>) -> Self {
        Self {
            base_url: base_url.into(),
            ..Self::default()
        }
    }
    /// Sets the provider name.
    #[must_use]
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = name.into();
        self
    }
    /// Sets the key.
    #[must_use]
    pub fn api_key(mut self, key: ApiKey) -> Self {
        self.api_key = Some(key);
        self
    }
    /// Sets the environment variable holding the key (`None`: the default rule).
    #[must_use]
    pub fn api_key_env(mut self, var: Option<String>) -> Self {
        self.api_key_env = var;
        self
    }
    /// Adds an extra header.
    #[must_use]
    pub fn header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.insert(name.into(), value.into());
        self
    }
    /// Maps `alias` to the provider's `model`.
    #[must_use]
    pub fn model(mut self, alias: impl Into<String>, model: impl Into<String>) -> Self {
        self.models.insert(alias.into(), model.into());
        self
    }
    /// Sets the bounds on the answers read (see [`ResponseLimits`]).
    #[must_use]
    pub fn limits(mut self, limits: ResponseLimits) -> Self {
        self.limits = limits;
        self
    }
    /// Turns prompt caching on or off.
    #[must_use]
    pub fn prompt_caching(mut self, on: bool) -> Self {
        self.prompt_caching = on;
        self
    }
}

impl fmt::Debug for AnthropicConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AnthropicConfig")
            .field("name", &self.name)
            .field("base_url", &self.base_url)
            .field("api_key", &self.api_key)
            .field("api_key_env", &self.api_key_env)
            .field("version", &self.version)
            .field("beta", &self.beta)
            .field("headers", &self.headers.keys().collect::<Vec<_>>())
            .field("models", &self.models)
            .field("default_model", &self.default_model)
            .field("default_max_tokens", &self.default_max_tokens)
            .field("prompt_caching", &self.prompt_caching)
            .field("cache_ttl", &self.cache_ttl)
            .field("limits", &self.limits)
            .finish()
    }
}

/// The Anthropic Messages API as an LLM service: it takes chat-completions requests and
/// answers chat-completions responses and chunks.
///
/// - Translation both ways ([`to_messages_request`], [`from_messages_response`]): system
///   prompt, multi-part content and images, tools, tool use and tool results, stop
///   reasons, usage with `cache_creation_input_tokens` / `cache_read_input_tokens`
///   (in `prompt_tokens_details.cache_write_tokens` / `cached_tokens`).
/// - Streams: `message_start` → role chunk, `content_block_*` → text / tool-call deltas,
///   `message_delta` → finish reason, `message_stop` → final usage chunk; `ping` is
///   skipped; an `error` event ends the stream with the classified error, and a stream
///   that ends without `message_stop` ends with an error.
/// - Prompt caching ([`AnthropicConfig::prompt_caching`]) marks the system prompt and
///   tool definitions with `cache_control`.
/// - Native passthrough: a request that arrived in the Messages dialect (it carries a
///   [`NativeRequest`]) is sent as the client wrote it, only `model` mapped, with the
///   client's `anthropic-version` / `anthropic-beta`; the answer stays Anthropic's bytes
///   (an [`EncodedResponse`] of [`Dialect::Messages`], or chunks carrying their events).
/// - Meta: provider name, model served, usage, headroom from `anthropic-ratelimit-*`,
///   time to response headers. Always ready, like [`OpenAiProvider`](crate::OpenAiProvider).
///
/// Not mapped: `response_format` (the Messages API has no equivalent here; it is ignored)
/// and `n` > 1 (refused).
///
/// ```
/// use llm_tower_providers::{AnthropicConfig, AnthropicProvider, ApiKey, HttpClient};
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// let client = HttpClient::with_defaults().unwrap();
/// let cfg = AnthropicConfig::default()
///     .api_key(ApiKey::new("sk-ant-test"))
///     .prompt_caching(true)
///     .model("smart", "claude-sonnet-4-5");
/// let claude = AnthropicProvider::new(cfg, &client).unwrap();
/// assert!(!format!("{claude:?}").contains("sk-ant-test"));
/// # }
/// ```
#[derive(Clone)]
pub struct AnthropicProvider {
    inner: Arc<Inner>,
}

struct Inner {
    endpoint: Endpoint,
    count: Endpoint,
    models: HashMap<String, String>,
    default_model: Option<String>,
    opts: TranslateOptions,
}

impl AnthropicProvider {
    /// Builds the provider on the shared `client`. Fails (bad request) on an invalid base
    /// URL, header or version. A missing key is not an error here (check
    /// [`has_api_key`](Self::has_api_key) to warn at startup): requests then fail with the
    /// provider's `401`, classified as [`ErrorKind::Auth`](llm_tower_core::ErrorKind::Auth).
    pub fn new(config: AnthropicConfig, client: &HttpClient) -> Result<Self, LlmError> {
        let key = resolve_key(
            config.api_key.as_ref(),
            config.api_key_env.as_deref(),
            &config.base_url,
            ("api.anthropic.com", "ANTHROPIC_API_KEY"),
        );
        let mut headers = config.headers.clone();
        headers.insert("anthropic-version".into(), config.version.clone());
        if !config.beta.is_empty() {
            headers.insert("anthropic-beta".into(), config.beta.join(","));
        }
        let auth = key
            .as_ref()
            .map(|k| (HeaderName::from_static("x-api-key"), k.expose().to_owned()));
        let mut endpoint = Endpoint::new(
            &config.name,
            &config.base_url,
            "/v1/messages",
            auth,
            key,
            &headers,
            client.clone(),
        )?;
        endpoint.limits = config.limits;
        // The same target and headers, for `count_tokens`.
        let mut count = endpoint.clone();
        count.url = format!(
            "{}/v1/messages/count_tokens",
            config.base_url.trim_end_matches('/')
        )
        .parse()
        .map_err(|e| LlmError::bad_request(format!("invalid base_url: {e}")))?;
        Ok(Self {
            inner: Arc::new(Inner {
                endpoint,
                count,
                models: config.models,
                default_model: config.default_model,
                opts: TranslateOptions {
                    default_max_tokens: config.default_max_tokens,
                    prompt_caching: config.prompt_caching,
                    cache_ttl: config.cache_ttl,
                },
            }),
        })
    }

    /// The provider name.
    pub fn name(&self) -> &str {
        &self.inner.endpoint.provider
    }

    /// Whether a key is configured.
    pub fn has_api_key(&self) -> bool {
        self.inner.endpoint.key.is_some()
    }

    /// How many rate-limit header values (`x-ratelimit-*`, `anthropic-ratelimit-*`) of
    /// successful answers could not be read (`NaN`, negative, garbage) and were ignored,
    /// since the provider was built. Shared by its clones.
    pub fn malformed_headers(&self) -> u64 {
        self.inner
            .endpoint
            .malformed_headers
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The bounds on the answers read.
    pub fn limits(&self) -> &ResponseLimits {
        &self.inner.endpoint.limits
    }

    /// The full Messages URL.
    pub fn url(&self) -> &http::Uri {
        &self.inner.endpoint.url
    }

    /// The Messages API body this provider would send for `req`.
    pub fn request_body(&self, req: &ChatRequest) -> Result<Value, LlmError> {
        let mut model = req.model.clone();
        map_model(
            &mut model,
            &self.inner.models,
            self.inner.default_model.as_deref(),
        );
        let mut body =
            to_messages_request(req, &self.inner.opts).map_err(|e| e.with_provider(self.name()))?;
        body["model"] = Value::from(model);
        Ok(body)
    }

    /// The Messages request of a client that spoke Messages: its own body, with the
    /// routed model and whatever a layer appended to the view (a validation reminder)
    /// translated and added.
    fn native_body(
        &self,
        req: &ChatRequest,
        native: &NativeRequest,
    ) -> Result<(Vec<u8>, String), LlmError> {
        let mut model = req.model.clone();
        map_model(
            &mut model,
            &self.inner.models,
            self.inner.default_model.as_deref(),
        );
        let appended = native.appended(req);
        let append = if appended.is_empty() {
            Vec::new()
        } else {
            let tail = ChatRequest::new(model.as_str(), appended.to_vec());
            match to_messages_request(&tail, &self.inner.opts)
                .map_err(|e| e.with_provider(self.name()))?
                .get_mut("messages")
                .map(Value::take)
            {
                Some(Value::Array(items)) => items,
                _ => Vec::new(),
            }
        };
        let body = native
            .body_for(req, &model, &append)
            .map_err(|e| e.with_provider(self.name()))?;
        Ok((body, model))
    }

    /// The client's `anthropic-version` replaces the configured one; its `anthropic-beta`
    /// features are added to the configured ones.
    fn native_headers(&self, native: &NativeRequest) -> Vec<(HeaderName, HeaderValue)> {
        let ep = &self.inner.endpoint;
        native
            .headers()
            .iter()
            .map(|(name, value)| {
                if name.as_str() == "anthropic-beta"
                    && let Some(own) = ep.headers.get("anthropic-beta")
                {
                    let mut merged = own.as_bytes().to_vec();
                    merged.push(b',');
                    merged.extend_from_slice(value.as_bytes());
                    if let Ok(v) = HeaderValue::from_bytes(&merged) {
                        return (name.clone(), v);
                    }
                }
                (name.clone(), value.clone())
            })
            .collect()
    }

    /// Counts the input tokens of `req` with the provider's `POST /v1/messages/count_tokens`:
    /// a request that arrived in the Messages dialect is counted as it was sent (with the
    /// provider's model), any other as its translation.
    ///
    /// # Errors
    ///
    /// The provider's error, classified; a malformed answer is a transport error.
    pub async fn count_tokens(&self, req: &ChatRequest) -> Result<u64, LlmError> {
        let native = req
            .extensions
            .get::<NativeRequest>()
            .filter(|n| n.dialect() == Dialect::Messages);
        let (bytes, headers) = match native {
            Some(n) => (self.native_body(req, n)?.0, self.native_headers(n)),
            None => {
                let mut body = self.request_body(req)?;
                if let Some(o) = body.as_object_mut() {
                    // Not part of a count request.
                    o.remove("max_tokens");
                    o.remove("stream");
                }
                let bytes = serde_json::to_vec(&body).map_err(|e| {
                    LlmError::bad_request(format!("cannot encode the request: {e}"))
                })?;
                (bytes, Vec::new())
            }
        };
        let ep = &self.inner.count;
        let (resp, _, started) = ep
            .send_with(bytes, false, req.deadline(), None, &headers)
            .await?;
        let body = ep
            .read_body(resp.into_body(), started, req.deadline())
            .await?;
        #[derive(Deserialize)]
        struct Counted {
            input_tokens: u64,
        }
        serde_json::from_slice::<Counted>(&body)
            .map(|c| c.input_tokens)
            .map_err(|e| classify::malformed(&ep.provider, "count_tokens answer", e))
    }

    async fn run(self, req: ChatRequest) -> Result<LlmResponse, LlmError> {
        if req.as_embeddings().is_some() {
            return Err(LlmError::bad_request(format!(
                "{}: the Anthropic API has no embeddings endpoint",
                self.name()
            ))
            .with_provider(self.name()));
        }
        let native = req
            .extensions
            .get::<NativeRequest>()
            .filter(|n| n.dialect() == Dialect::Messages);
        let (bytes, model, headers) = match native {
            Some(n) => {
                let (bytes, model) = self.native_body(&req, n)?;
                (bytes, model, self.native_headers(n))
            }
            None => {
                // A request in another dialect (Responses) is sent as its chat view: only
                // if the view says everything the client asked.
                if let Some(other) = req.extensions.get::<NativeRequest>() {
                    other
                        .check_translatable()
                        .map_err(|e| e.with_provider(self.name()))?;
                }
                let body = self.request_body(&req)?;
                let model = body["model"].as_str().unwrap_or_default().to_owned();
                let bytes = serde_json::to_vec(&body).map_err(|e| {
                    LlmError::bad_request(format!("cannot encode the request: {e}"))
                        .with_provider(self.name())
                })?;
                (bytes, model, Vec::new())
            }
        };
        let native = native.is_some();
        let stream = req.is_stream();
        let ep = &self.inner.endpoint;
        let (resp, upstream_time, started) = ep
            .send_with(
                bytes,
                stream,
                req.deadline(),
                req.extensions.get::<TraceParent>(),
                &headers,
            )
            .await?;
        let (parts, body) = resp.into_parts();
        let headroom = ep.headroom(&parts.headers);
        let mut out = if stream {
            let decoder = AnthropicDecoder::new(ep.provider.clone(), ep.key.clone(), model.clone())
                .native(native);
            let mut r = LlmResponse::events(SseStream::new(
                body,
                decoder,
                ep.provider.clone(),
                ep.limits.max_sse_event_bytes,
            ));
            r.meta.model = Some(model);
            r
        } else {
            let bytes = ep.read_body(body, started, req.deadline()).await?;
            let len = bytes.len();
            let mut r = if native {
                // Kept as Anthropic's bytes: the client reads them as they came.
                match EncodedResponse::from_messages_json(bytes.clone()) {
                    Ok(enc) => LlmResponse::encoded(enc),
                    Err(e) => {
                        let v: Value = serde_json::from_slice(&bytes).map_err(|_| {
                            classify::malformed(&ep.provider, "Messages API response", &e)
                        })?;
                        // Not a message: an inline error, or malformed.
                        from_messages_response(&v, &ep.provider)?;
                        return Err(classify::malformed(
                            &ep.provider,
                            "Messages API response",
                            e,
                        ));
                    }
                }
            } else {
                let v: Value = serde_json::from_slice(&bytes)
                    .map_err(|e| classify::malformed(&ep.provider, "JSON in the response", e))?;
                LlmResponse::complete(from_messages_response(&v, &ep.provider)?)
            };
            // Anthropic's JSON, not the translation's, but close enough for a size hint.
            r.meta.body_bytes = Some(len);
            r
        };
        out.meta.provider = Some(ep.provider.clone());
        out.meta.headroom = headroom;
        out.meta.upstream_time = Some(upstream_time);
        Ok(out)
    }
}

impl fmt::Debug for AnthropicProvider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AnthropicProvider")
            .field("endpoint", &self.inner.endpoint)
            .field("models", &self.inner.models)
            .field("options", &self.inner.opts)
            .finish_non_exhaustive()
    }
}

impl Service<ChatRequest> for AnthropicProvider {
    type Response = LlmResponse;
    type Error = LlmError;
    type Future = ResponseFuture;

    /// Always ready: the pooled client queues nothing of its own.
    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), LlmError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: ChatRequest) -> ResponseFuture {
        ResponseFuture::new(self.clone().run(req))
    }
}
