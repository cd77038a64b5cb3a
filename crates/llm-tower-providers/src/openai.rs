//! The OpenAI-compatible provider (`POST {base_url}/chat/completions`).

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fmt;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use llm_tower_core::dialect::responses::StreamScan;
use llm_tower_core::{
    ChatChunk, ChatRequest, Dialect, EmbeddingsResponse, EncodedChunk, EncodedResponse, LlmError,
    LlmResponse, NativeRequest, StreamEvent, StreamHead, StreamOptions, TraceParent,
};
use serde::Deserialize;
use serde_json::Value;
use tower_service::Service;

use crate::classify;
use crate::common::{Decoder, Endpoint, ResponseFuture, SseStream, map_model, native_event};
use crate::http::HttpClient;
use crate::limits::ResponseLimits;
use crate::secret::ApiKey;
use crate::sse::SseEvent;

/// Settings of an [`OpenAiProvider`]; deserializable from the gateway's TOML.
///
/// The key comes from `api_key` or, when that is absent, from the environment variable
/// named by `api_key_env`. With neither, and `base_url` on `api.openai.com`,
/// `OPENAI_API_KEY` is read; for any other host nothing is (so an OpenAI key is never sent
/// to another provider by accident). A provider without key (a local vLLM, Ollama or
/// LM Studio) sends no `authorization` header.
///
/// ```
/// use llm_tower_providers::OpenAiConfig;
///
/// let cfg: OpenAiConfig = serde_json::from_value(serde_json::json!({
///     "name": "groq",
///     "base_url": "https://api.groq.com/openai/v1",
///     "api_key_env": "GROQ_API_KEY",
///     "models": {"fast": "llama-3.1-8b-instant"},
///     "headers": {"x-team": "search"}
/// })).unwrap();
/// assert_eq!(cfg.models["fast"], "llama-3.1-8b-instant");
/// assert!(OpenAiConfig::default().base_url.starts_with("https://api.openai.com"));
/// ```
#[derive(Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OpenAiConfig {
    /// Provider name in [`ResponseMeta::provider`](llm_tower_core::ResponseMeta), errors and
    /// logs. Default `openai`.
    pub name: String,
    /// The API base, up to and including the version (`https://api.openai.com/v1`,
    /// `https://openrouter.ai/api/v1`, `http://localhost:11434/v1`); `/chat/completions`
    /// is appended.
    pub base_url: String,
    /// The key itself (prefer `api_key_env` in files).
    pub api_key: Option<ApiKey>,
    /// Environment variable read when `api_key` is absent; a variable that is not set
    /// means "no key". Default: `OPENAI_API_KEY` for `api.openai.com`, none elsewhere.
    pub api_key_env: Option<String>,
    /// Extra request headers (`HTTP-Referer`, `OpenAI-Organization`, …).
    pub headers: BTreeMap<String, String>,
    /// Model mapping: alias → provider model, applied to `model` before sending.
    pub models: HashMap<String, String>,
    /// Model used when a request names none.
    pub default_model: Option<String>,
    /// Ask for `stream_options.include_usage` on streams so they end with usage.
    /// Default `true`; turn off only for servers that reject the field.
    pub stream_usage: bool,
    /// Bounds on the answers read (body size, event size, response timeout).
    pub limits: ResponseLimits,
    /// Whether the server speaks the Responses API (`POST {base_url}/responses`): a
    /// Responses request is then forwarded as the client sent it (only `model` mapped) and
    /// its answer kept as the upstream's bytes; otherwise it is sent as its chat view and
    /// the answer translated. Default: `true` for `api.openai.com`, `false` elsewhere.
    pub responses: Option<bool>,
}

impl Default for OpenAiConfig {
    fn default() -> Self {
        Self {
            name: "openai".to_owned(),
            base_url: "https://api.openai.com/v1".to_owned(),
            api_key: None,
            api_key_env: None,
            headers: BTreeMap::new(),
            models: HashMap::new(),
            default_model: None,
            stream_usage: true,
            limits: ResponseLimits::default(),
            responses: None,
        }
    }
}

impl OpenAiConfig {
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
    /// Whether the server speaks the Responses API (see [`OpenAiConfig::responses`]).
    #[must_use]
    pub fn responses(mut self, on: bool) -> Self {
        self.responses = Some(on);
        self
    }
    /// Sets the bounds on the answers read (see [`ResponseLimits`]).
    #[must_use]
    pub fn limits(mut self, limits: ResponseLimits) -> Self {
        self.limits = limits;
        self
    }
}

impl fmt::Debug for OpenAiConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OpenAiConfig")
            .field("name", &self.name)
            .field("base_url", &self.base_url)
            .field("api_key", &self.api_key)
            .field("api_key_env", &self.api_key_env)
            .field("headers", &self.headers.keys().collect::<Vec<_>>())
            .field("models", &self.models)
            .field("default_model", &self.default_model)
            .field("stream_usage", &self.stream_usage)
            .field("limits", &self.limits)
            .field("responses", &self.responses)
            .finish()
    }
}

/// Resolves the key: explicit, else the named environment variable, else the vendor's
/// own variable when `base_url` points at the vendor's host (never another host's).
pub(crate) fn resolve_key(
    explicit: Option<&ApiKey>,
    env: Option<&str>,
    base_url: &str,
    vendor: (&str, &str),
) -> Option<ApiKey> {
    if let Some(k) = explicit {
        return Some(k.clone());
    }
    let var = match env {
        Some(v) => v,
        None => {
            let host = base_url
                .parse::<http::Uri>()
                .ok()
                .and_then(|u| u.host().map(str::to_ascii_lowercase));
            if host.as_deref() != Some(vendor.0) {
                return None;
            }
            vendor.1
        }
    };
    ApiKey::from_env(var).ok()
}

/// An OpenAI-compatible chat-completions client as an LLM service: OpenAI, OpenRouter,
/// Groq, Together, vLLM, Ollama, LM Studio, anything speaking `/v1/chat/completions`.
///
/// - The body sent is the caller's [`ChatRequest`] with every unknown field preserved;
///   only `model` (the mapping) and, for streams, `stream_options.include_usage` change.
/// - Streams are parsed from SSE and end with the usage chunk; a stream that ends
///   without `data: [DONE]` ends with an error.
/// - [`ResponseMeta`](llm_tower_core::ResponseMeta) gets the provider name, the model
///   served, usage (complete responses; streams report it through the completion hook),
///   rate-limit headroom from `x-ratelimit-*` and the time to the response headers.
/// - Always ready (`poll_ready` returns `Ready` at once): bound concurrency with
///   `tower::limit::ConcurrencyLimit` above it.
///
/// ```
/// use llm_tower_providers::{ApiKey, HttpClient, OpenAiConfig, OpenAiProvider};
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// let client = HttpClient::with_defaults().unwrap();
/// let cfg = OpenAiConfig::new("http://localhost:11434/v1")
///     .name("ollama")
///     .api_key_env(None)
///     .model("small", "llama3.2:1b");
/// let ollama = OpenAiProvider::new(cfg, &client).unwrap();
/// assert_eq!(ollama.name(), "ollama");
/// # }
/// ```
#[derive(Clone)]
pub struct OpenAiProvider {
    inner: Arc<Inner>,
}

struct Inner {
    endpoint: Endpoint,
    /// `{base_url}/embeddings`: the same client, headers and limits.
    embeddings: Endpoint,
    /// `{base_url}/responses`, when the server speaks the Responses API.
    responses: Option<Endpoint>,
    models: HashMap<String, String>,
    default_model: Option<String>,
    stream_usage: bool,
}

impl OpenAiProvider {
    /// Builds the provider on the shared `client`. Fails (bad request) on an invalid base
    /// URL or header; a key that is not configured is not an error (local servers).
    pub fn new(config: OpenAiConfig, client: &HttpClient) -> Result<Self, LlmError> {
        let key = resolve_key(
            config.api_key.as_ref(),
            config.api_key_env.as_deref(),
            &config.base_url,
            ("api.openai.com", "OPENAI_API_KEY"),
        );
        let auth = key.as_ref().map(|k| {
            (
                http::header::AUTHORIZATION,
                format!("Bearer {}", k.expose()),
            )
        });
        let mut endpoint = Endpoint::new(
            &config.name,
            &config.base_url,
            "/chat/completions",
            auth,
            key,
            &config.headers,
            client.clone(),
        )?;
        endpoint.limits = config.limits;
        let sibling = |path: &str| -> Result<Endpoint, LlmError> {
            let mut ep = endpoint.clone();
            ep.url = format!("{}{path}", config.base_url.trim_end_matches('/'))
                .parse()
                .map_err(|e| {
                    LlmError::bad_request(format!(
                        "{} configuration: invalid base_url: {e}",
                        config.name
                    ))
                })?;
            Ok(ep)
        };
        let embeddings = sibling("/embeddings")?;
        let speaks_responses = config.responses.unwrap_or_else(|| {
            config
                .base_url
                .parse::<http::Uri>()
                .ok()
                .and_then(|u| u.host().map(str::to_ascii_lowercase))
                .is_some_and(|h| h == "api.openai.com")
        });
        let responses = speaks_responses
            .then(|| sibling("/responses"))
            .transpose()?;
        Ok(Self {
            inner: Arc::new(Inner {
                endpoint,
                embeddings,
                responses,
                models: config.models,
                default_model: config.default_model,
                stream_usage: config.stream_usage,
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

    /// The full chat-completions URL.
    pub fn url(&self) -> &http::Uri {
        &self.inner.endpoint.url
    }

    /// The request body this provider would send for `req` (model mapped, stream usage
    /// requested), as JSON.
    pub fn request_body(&self, req: &ChatRequest) -> Result<Vec<u8>, LlmError> {
        let mut req = req.clone();
        self.prepare(&mut req);
        self.encode(&req)
    }

    fn prepare(&self, req: &mut ChatRequest) {
        map_model(
            &mut req.model,
            &self.inner.models,
            self.inner.default_model.as_deref(),
        );
        if req.is_stream() && self.inner.stream_usage {
            req.stream_options
                .get_or_insert_with(StreamOptions::default)
                .include_usage = Some(true);
        }
    }

    fn encode(&self, req: &ChatRequest) -> Result<Vec<u8>, LlmError> {
        // Most requests fit: no step-by-step growth from 8 bytes.
        let mut body = Vec::with_capacity(1024);
        serde_json::to_writer(&mut body, req)
            .map(|()| body)
            .map_err(|e| {
                LlmError::bad_request(format!("cannot encode the request: {e}"))
                    .with_provider(self.name())
            })
    }

    /// `POST {base_url}/embeddings` with the envelope's embeddings request, as the client
    /// sent it but for `model` (the envelope's, mapped).
    async fn run_embeddings(self, mut req: ChatRequest) -> Result<LlmResponse, LlmError> {
        map_model(
            &mut req.model,
            &self.inner.models,
            self.inner.default_model.as_deref(),
        );
        let Some(emb) = req.as_embeddings() else {
            return Err(LlmError::internal("not an embeddings request"));
        };
        let ep = &self.inner.embeddings;
        let mut emb = emb.clone();
        emb.model.clone_from(&req.model);
        let expected = emb.input.len();
        let body = serde_json::to_vec(&emb).map_err(|e| {
            LlmError::bad_request(format!("cannot encode the request: {e}"))
                .with_provider(self.name())
        })?;
        let (resp, upstream_time, started) = ep
            .send(
                body,
                false,
                req.deadline(),
                req.extensions.get::<TraceParent>(),
            )
            .await?;
        let (parts, body) = resp.into_parts();
        let headroom = ep.headroom(&parts.headers);
        let bytes = ep.read_body(body, started, req.deadline()).await?;
        let len = bytes.len();
        let mut answer = match EmbeddingsResponse::from_slice(&bytes, expected) {
            Ok(r) => r,
            Err(e) => {
                if let Ok(v) = serde_json::from_slice::<Value>(&bytes)
                    && let Some(err) = classify::classify_inline(&ep.provider, &v, ep.key.as_ref())
                {
                    return Err(err);
                }
                return Err(e.with_provider(&*ep.provider));
            }
        };
        if answer.model.is_empty() {
            answer.model.clone_from(&req.model);
        }
        let mut out = LlmResponse::embeddings(answer);
        out.meta.body_bytes = Some(len);
        out.meta.provider = Some(ep.provider.clone());
        out.meta.headroom = headroom;
        out.meta.upstream_time = Some(upstream_time);
        Ok(out)
    }

    async fn run(self, mut req: ChatRequest) -> Result<LlmResponse, LlmError> {
        if req.as_embeddings().is_some() {
            return self.run_embeddings(req).await;
        }
        if self.inner.responses.is_some()
            && let Some(native) = req
                .extensions
                .get::<llm_tower_core::NativeRequest>()
                .filter(|n| n.dialect() == Dialect::Responses)
        {
            let native = native.clone();
            return self.run_responses(req, native).await;
        }
        // A request in another dialect is sent as its chat view: only if the view says
        // everything the client asked.
        if let Some(native) = req.extensions.get::<llm_tower_core::NativeRequest>() {
            native
                .check_translatable()
                .map_err(|e| e.with_provider(&*self.inner.endpoint.provider))?;
        }
        self.prepare(&mut req);
        let body = self.encode(&req)?;
        let stream = req.is_stream();
        let ep = &self.inner.endpoint;
        let (resp, upstream_time, started) = ep
            .send(
                body,
                stream,
                req.deadline(),
                req.extensions.get::<TraceParent>(),
            )
            .await?;
        let (parts, body) = resp.into_parts();
        let headroom = ep.headroom(&parts.headers);
        let mut out = if stream && !is_json(&parts.headers) {
            let decoder = OpenAiDecoder {
                provider: ep.provider.clone(),
                key: ep.key.clone(),
                done: false,
            };
            let mut r = LlmResponse::events(SseStream::new(
                body,
                decoder,
                ep.provider.clone(),
                ep.limits.max_sse_event_bytes,
            ));
            r.meta.model = Some(req.model);
            r
        } else {
            // A server may answer a stream request with one JSON document; take it as is.
            let bytes = ep.read_body(body, started, req.deadline()).await?;
            let len = bytes.len();
            // Kept as sent: an HTTP surface forwards it without encoding it again.
            let mut r = LlmResponse::encoded(parse_response(&ep.provider, bytes, ep.key.as_ref())?);
            r.meta.body_bytes = Some(len);
            r
        };
        out.meta.provider = Some(ep.provider.clone());
        out.meta.headroom = headroom;
        out.meta.upstream_time = Some(upstream_time);
        Ok(out)
    }
}

impl OpenAiProvider {
    /// Whether this provider forwards Responses requests to `{base_url}/responses`.
    pub fn speaks_responses(&self) -> bool {
        self.inner.responses.is_some()
    }

    /// `POST {base_url}/responses` with the client's own body (model mapped, any message a
    /// layer appended to the view added to `input`); the answer kept as the upstream sent
    /// it (JSON as an [`EncodedResponse`] of [`Dialect::Responses`], events as chunks
    /// carrying their frames).
    async fn run_responses(
        self,
        mut req: ChatRequest,
        native: NativeRequest,
    ) -> Result<LlmResponse, LlmError> {
        let Some(ep) = self.inner.responses.as_ref() else {
            return Err(LlmError::internal("no Responses endpoint"));
        };
        map_model(
            &mut req.model,
            &self.inner.models,
            self.inner.default_model.as_deref(),
        );
        let append: Vec<Value> = native
            .appended(&req)
            .iter()
            .map(|m| {
                let role = match m.role {
                    llm_tower_core::Role::Assistant => "assistant",
                    llm_tower_core::Role::System => "system",
                    llm_tower_core::Role::Developer => "developer",
                    _ => "user",
                };
                serde_json::json!({"role": role, "content": m.text()})
            })
            .collect();
        let body = native
            .body_for(&req, &req.model, &append)
            .map_err(|e| e.with_provider(&*ep.provider))?;
        let stream = req.is_stream();
        let (resp, upstream_time, started) = ep
            .send(
                body,
                stream,
                req.deadline(),
                req.extensions.get::<TraceParent>(),
            )
            .await?;
        let (parts, body) = resp.into_parts();
        let headroom = ep.headroom(&parts.headers);
        let mut out = if stream && !is_json(&parts.headers) {
            let decoder = ResponsesDecoder::new(ep.provider.clone(), ep.key.clone(), &req.model);
            let mut r = LlmResponse::events(SseStream::new(
                body,
                decoder,
                ep.provider.clone(),
                ep.limits.max_sse_event_bytes,
            ));
            r.meta.model = Some(req.model);
            r
        } else {
            let bytes = ep.read_body(body, started, req.deadline()).await?;
            let len = bytes.len();
            let enc = match EncodedResponse::from_responses_json(bytes.clone()) {
                Ok(r) => r,
                Err(e) => {
                    if let Ok(v) = serde_json::from_slice::<Value>(&bytes)
                        && let Some(err) =
                            classify::classify_inline(&ep.provider, &v, ep.key.as_ref())
                    {
                        return Err(err);
                    }
                    return Err(classify::malformed(
                        &ep.provider,
                        "Responses API response",
                        e,
                    ));
                }
            };
            let mut r = LlmResponse::encoded(enc);
            r.meta.body_bytes = Some(len);
            r
        };
        out.meta.provider = Some(ep.provider.clone());
        out.meta.headroom = headroom;
        out.meta.upstream_time = Some(upstream_time);
        Ok(out)
    }
}

/// Responses API events → the events as they came ([`NativeEvent`]s), each with what the
/// layers read (its content, the end and its usage) and what its chat view needs. Each
/// event is read once into borrowed fields ([`StreamScan`]); the decoder keeps only the
/// function calls' output indices.
pub(crate) struct ResponsesDecoder {
    provider: Arc<str>,
    key: Option<ApiKey>,
    head: Arc<StreamHead>,
    /// `output_index` of each function call → its chat tool index (bounded: a call
    /// beyond [`MAX_TOOL_CALLS`] is malformed).
    tools: Vec<u64>,
    done: bool,
}

/// Function calls one streamed answer may make.
const MAX_TOOL_CALLS: usize = 1024;

impl ResponsesDecoder {
    pub(crate) fn new(provider: Arc<str>, key: Option<ApiKey>, model: &str) -> Self {
        Self {
            provider,
            key,
            head: Arc::new(StreamHead {
                id: String::new(),
                model: model.to_owned(),
                created: 0,
            }),
            tools: Vec::new(),
            done: false,
        }
    }

    fn malformed(&self, what: impl fmt::Display) -> LlmError {
        classify::malformed(&self.provider, "stream event", what)
    }

    /// A `response.failed` or `error` event, classified from all of it.
    fn failure(&self, kind: &str, data: &[u8]) -> LlmError {
        let v: Value = match serde_json::from_slice(data) {
            Ok(v) => v,
            Err(e) => return classify::malformed(&self.provider, "JSON in a stream event", e),
        };
        if kind == "response.failed" {
            let r = v.get("response").cloned().unwrap_or(Value::Null);
            return classify::classify_inline(&self.provider, &r, self.key.as_ref())
                .unwrap_or_else(|| {
                    LlmError::unavailable(format!("{}: the response failed", self.provider))
                        .with_provider(&*self.provider)
                });
        }
        let wrapped = serde_json::json!({"error": v});
        classify::classify_inline(&self.provider, &wrapped, self.key.as_ref()).unwrap_or_else(
            || {
                LlmError::unavailable(format!("{}: the stream reported an error", self.provider))
                    .with_provider(&*self.provider)
            },
        )
    }
}

impl Decoder for ResponsesDecoder {
    fn decode(&mut self, ev: &SseEvent, out: &mut VecDeque<StreamEvent>) -> Result<(), LlmError> {
        let scan = StreamScan::parse(ev.data())
            .map_err(|e| classify::malformed(&self.provider, "JSON in a stream event", e))?;
        let kind = scan.kind();
        if matches!(kind, "response.failed" | "error") {
            return Err(self.failure(kind, ev.data()));
        }
        let mut tool = None;
        let (mut usage, mut answer) = (None, None);
        match kind {
            "response.created" => {
                let (id, model, created) = scan.response_head();
                let mut head = (*self.head).clone();
                if let Some(id) = id {
                    id.clone_into(&mut head.id);
                }
                if let Some(m) = model {
                    m.clone_into(&mut head.model);
                }
                head.created = created;
                self.head = Arc::new(head);
            }
            "response.output_item.added" if scan.adds_call() => {
                if self.tools.len() >= MAX_TOOL_CALLS {
                    return Err(
                        self.malformed(format!("more than {MAX_TOOL_CALLS} function calls"))
                    );
                }
                tool = u32::try_from(self.tools.len()).ok();
                self.tools.push(scan.output_index().unwrap_or(u64::MAX));
            }
            "response.function_call_arguments.delta" => {
                let at = scan.output_index();
                tool = self
                    .tools
                    .iter()
                    .position(|i| Some(*i) == at)
                    .and_then(|t| u32::try_from(t).ok());
            }
            _ if scan.is_end() => {
                self.done = true;
                tool = u32::try_from(self.tools.len()).ok();
                usage = scan.usage();
                // The response object it carries, for a writer that stores it.
                answer = scan.stored_response();
            }
            _ => {}
        }
        let fallback = if kind.is_empty() { "message" } else { kind };
        let mut event = native_event(Dialect::Responses, ev, fallback, &self.head)
            .ok_or_else(|| self.malformed("an event name that is not UTF-8"))?;
        if scan.has_content(tool) {
            event = event.with_choice(scan.is_end());
        }
        if let Some(t) = tool {
            event = event.with_tool(t);
        }
        if let Some(u) = usage {
            event = event.with_usage(u);
        }
        if let Some((range, id)) = answer {
            event = event.with_answer(range, id.map(str::to_owned));
        }
        out.push_back(event.into());
        Ok(())
    }

    fn is_done(&self) -> bool {
        self.done
    }

    fn terminal(&self) -> &'static str {
        "response.completed"
    }
}

fn is_json(headers: &http::HeaderMap) -> bool {
    headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"))
}

/// Parses a complete response; an error object in a 200 body is classified.
fn parse_response(
    provider: &str,
    bytes: Bytes,
    key: Option<&ApiKey>,
) -> Result<EncodedResponse, LlmError> {
    match EncodedResponse::from_json(bytes.clone()) {
        Ok(r) => Ok(r),
        Err(e) => {
            if let Ok(v) = serde_json::from_slice::<Value>(&bytes)
                && let Some(err) = classify::classify_inline(provider, &v, key)
            {
                return Err(err);
            }
            Err(classify::malformed(provider, "JSON in the response", e))
        }
    }
}

impl fmt::Debug for OpenAiProvider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OpenAiProvider")
            .field("endpoint", &self.inner.endpoint)
            .field("models", &self.inner.models)
            .finish_non_exhaustive()
    }
}

impl Service<ChatRequest> for OpenAiProvider {
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

/// OpenAI SSE: `data: {chunk}` events, then `data: [DONE]`.
pub(crate) struct OpenAiDecoder {
    pub(crate) provider: Arc<str>,
    pub(crate) key: Option<ApiKey>,
    pub(crate) done: bool,
}

impl Decoder for OpenAiDecoder {
    fn decode(&mut self, ev: &SseEvent, out: &mut VecDeque<StreamEvent>) -> Result<(), LlmError> {
        let data = ev.data();
        if data == b"[DONE]" {
            self.done = true;
            return Ok(());
        }
        let is_error_event = ev.event() == Some("error");
        // The common chunk is kept as sent: an OpenAI-compatible surface forwards it, and
        // only who needs the content decodes it.
        if !is_error_event && let Some(chunk) = EncodedChunk::from_json(ev.data_bytes().clone()) {
            out.push_back(chunk.into());
            return Ok(());
        }
        match ChatChunk::from_slice(data) {
            Ok(chunk) if !is_error_event && !chunk.extra.contains_key("error") => {
                out.push_back(chunk.into());
                Ok(())
            }
            parsed => {
                if let Ok(v) = serde_json::from_slice::<Value>(data)
                    && let Some(err) =
                        classify::classify_inline(&self.provider, &v, self.key.as_ref())
                {
                    return Err(err);
                }
                match parsed {
                    Err(e) => Err(classify::malformed(
                        &self.provider,
                        "JSON in a stream event",
                        e,
                    )),
                    Ok(_) => Err(LlmError::unavailable(format!(
                        "{}: the stream reported an error",
                        self.provider
                    ))
                    .with_provider(&*self.provider)),
                }
            }
        }
    }

    fn is_done(&self) -> bool {
        self.done
    }

    fn terminal(&self) -> &'static str {
        "data: [DONE]"
    }
}
