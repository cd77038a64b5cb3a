//! OpenTelemetry traces and metrics of chat requests, after the GenAI semantic conventions
//! (feature `otel`).
//!
//! [`OtelTracing`] given to [`OpenAiRouter::otel`](crate::OpenAiRouter::otel) makes every
//! `POST /v1/chat/completions`:
//!
//! - a **request span** (`SERVER`, named `chat {model}`), child of the incoming
//!   `traceparent` if there is one, with `gen_ai.operation.name`, `gen_ai.request.model`,
//!   `gen_ai.provider.name`, `gen_ai.response.model`, `gen_ai.usage.input_tokens` /
//!   `output_tokens`, `gen_ai.response.finish_reasons`, `error.type`, and the gateway's own
//!   `llm_tower.*` attributes (task, tenant, cost, cache status, attempts, route);
//! - one **attempt span** (`CLIENT`) per upstream call below it, when the stack reports its
//!   attempts (llm-tower's `observe` feature, `ObserveLayer` over each provider): a
//!   fallback shows as two. Each attempt's trace context is handed to the provider, which
//!   sends it upstream as `traceparent`;
//! - **span events** for what the layers report: `llm_tower.cache.hit`,
//!   `llm_tower.cache.coalesced`, `llm_tower.validation.retry`, `llm_tower.rate_limit.wait`;
//! - **metrics**: `gen_ai.client.operation.duration`,
//!   `gen_ai.client.operation.time_to_first_chunk` and `gen_ai.client.token.usage` per
//!   attempt; `gen_ai.server.request.duration` and `gen_ai.server.time_to_first_token`
//!   per request. Their attributes are the bounded labels of the Prometheus metrics
//!   (models the config knows, or `other`).
//!
//! Prompt and completion content (`gen_ai.input.messages`, `gen_ai.output.messages`) is
//! recorded only with [`OtelTracing::capture_content`], truncated to
//! [`OtelTracing::max_content_bytes`].
//!
//! The tracer and meter come from the application's OpenTelemetry SDK setup (the gateway
//! builds them from `[telemetry]` and the `OTEL_*` variables).
//!
//! ```
//! use llm_tower_axum::otel::OtelTracing;
//! use opentelemetry::global::BoxedTracer;
//! use opentelemetry::trace::noop::NoopTracerProvider;
//! use opentelemetry::global::ObjectSafeTracerProvider;
//!
//! let tracer = BoxedTracer::new(
//!     NoopTracerProvider::new().boxed_tracer(opentelemetry::InstrumentationScope::builder("llm-tower").build()),
//! );
//! let meter = opentelemetry::global::meter("llm-tower");
//! let otel = OtelTracing::new(tracer, &meter)
//!     .provider_name("primary", "openai")
//!     .capture_content(false);
//! # let _ = otel;
//! ```

use std::collections::HashMap;
use std::fmt;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context as TaskContext, Poll};
use std::time::{Duration, Instant};

use futures_core::Stream;
use llm_tower_core::{
    AttemptEnd, AttemptObserver, BoxChunkStream, ChatChunk, ChatRequest, ChatResponse, ChunkStream,
    LlmError, ObserveEvent, Observer, RequestObserver, ResponseMeta, TraceParent, Usage,
};
use opentelemetry::global::BoxedTracer;
use opentelemetry::metrics::{Histogram, Meter};
use opentelemetry::propagation::{Extractor, TextMapPropagator};
use opentelemetry::trace::{Span, SpanKind, Status, TraceContextExt, TraceFlags, Tracer};
use opentelemetry::{Array, Context, KeyValue, StringValue, Value};
use opentelemetry_sdk::propagation::TraceContextPropagator;

use crate::metrics::Labels;

/// The GenAI semantic-convention names used here; `tests::names_match_semconv` checks
/// them against `opentelemetry-semantic-conventions`.
pub mod names {
    /// `gen_ai.operation.name`
    pub const OPERATION_NAME: &str = "gen_ai.operation.name";
    /// `gen_ai.provider.name`
    pub const PROVIDER_NAME: &str = "gen_ai.provider.name";
    /// `gen_ai.request.model`
    pub const REQUEST_MODEL: &str = "gen_ai.request.model";
    /// `gen_ai.request.max_tokens`
    pub const REQUEST_MAX_TOKENS: &str = "gen_ai.request.max_tokens";
    /// `gen_ai.request.temperature`
    pub const REQUEST_TEMPERATURE: &str = "gen_ai.request.temperature";
    /// `gen_ai.request.stream`
    pub const REQUEST_STREAM: &str = "gen_ai.request.stream";
    /// `gen_ai.response.model`
    pub const RESPONSE_MODEL: &str = "gen_ai.response.model";
    /// `gen_ai.response.finish_reasons`
    pub const RESPONSE_FINISH_REASONS: &str = "gen_ai.response.finish_reasons";
    /// `gen_ai.response.time_to_first_chunk`
    pub const RESPONSE_TIME_TO_FIRST_CHUNK: &str = "gen_ai.response.time_to_first_chunk";
    /// `gen_ai.usage.input_tokens`
    pub const USAGE_INPUT_TOKENS: &str = "gen_ai.usage.input_tokens";
    /// `gen_ai.usage.output_tokens`
    pub const USAGE_OUTPUT_TOKENS: &str = "gen_ai.usage.output_tokens";
    /// `gen_ai.usage.cache_read.input_tokens`
    pub const USAGE_CACHE_READ_INPUT_TOKENS: &str = "gen_ai.usage.cache_read.input_tokens";
    /// `gen_ai.token.type`
    pub const TOKEN_TYPE: &str = "gen_ai.token.type";
    /// `gen_ai.input.messages`
    pub const INPUT_MESSAGES: &str = "gen_ai.input.messages";
    /// `gen_ai.output.messages`
    pub const OUTPUT_MESSAGES: &str = "gen_ai.output.messages";
    /// `error.type`
    pub const ERROR_TYPE: &str = "error.type";
    /// `gen_ai.client.operation.duration`
    pub const CLIENT_OPERATION_DURATION: &str = "gen_ai.client.operation.duration";
    /// `gen_ai.client.operation.time_to_first_chunk`
    pub const CLIENT_TIME_TO_FIRST_CHUNK: &str = "gen_ai.client.operation.time_to_first_chunk";
    /// `gen_ai.client.token.usage`
    pub const CLIENT_TOKEN_USAGE: &str = "gen_ai.client.token.usage";
    /// `gen_ai.server.request.duration`
    pub const SERVER_REQUEST_DURATION: &str = "gen_ai.server.request.duration";
    /// `gen_ai.server.time_to_first_token`
    pub const SERVER_TIME_TO_FIRST_TOKEN: &str = "gen_ai.server.time_to_first_token";

    /// `llm_tower.task`: the task type (a name the config knows, or `other`).
    pub const TASK: &str = "llm_tower.task";
    /// `llm_tower.tenant`
    pub const TENANT: &str = "llm_tower.tenant";
    /// `llm_tower.provider`: the provider's name in the config.
    pub const PROVIDER: &str = "llm_tower.provider";
    /// `llm_tower.route`: the chain the route layer chose.
    pub const ROUTE: &str = "llm_tower.route";
    /// `llm_tower.cache`: `hit`, `miss`, `bypass` or `none`.
    pub const CACHE: &str = "llm_tower.cache";
    /// `llm_tower.cost_usd`: what the request cost (its attempts included), in dollars.
    pub const COST_USD: &str = "llm_tower.cost_usd";
    /// `llm_tower.cost_saved_usd`: what a cache hit saved, in dollars.
    pub const COST_SAVED_USD: &str = "llm_tower.cost_saved_usd";
    /// `llm_tower.attempts`: upstream attempts made (skipped targets not counted).
    pub const ATTEMPTS: &str = "llm_tower.attempts";
    /// `llm_tower.request_id`: the `x-request-id`.
    pub const REQUEST_ID: &str = "llm_tower.request_id";
}

use names as n;

/// Duration buckets the GenAI conventions advise, in seconds.
const DURATION_BUCKETS: [f64; 14] = [
    0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92,
];
/// Token-count buckets the GenAI conventions advise.
const TOKEN_BUCKETS: [f64; 14] = [
    1.0,
    4.0,
    16.0,
    64.0,
    256.0,
    1024.0,
    4096.0,
    16384.0,
    65536.0,
    262_144.0,
    1_048_576.0,
    4_194_304.0,
    16_777_216.0,
    67_108_864.0,
];
/// Default [`OtelTracing::max_content_bytes`].
pub const DEFAULT_MAX_CONTENT_BYTES: usize = 16 * 1024;
/// Finish reasons kept per request (one per choice; `n` is the client's).
const MAX_REASONS: usize = 16;

struct Instruments {
    client_duration: Histogram<f64>,
    client_first_chunk: Histogram<f64>,
    client_tokens: Histogram<u64>,
    server_duration: Histogram<f64>,
    server_first_token: Histogram<f64>,
}

impl Instruments {
    fn new(meter: &Meter) -> Self {
        let secs = |name: &'static str, what: &'static str| {
            meter
                .f64_histogram(name)
                .with_unit("s")
                .with_description(what)
                .with_boundaries(DURATION_BUCKETS.to_vec())
                .build()
        };
        Self {
            client_duration: secs(n::CLIENT_OPERATION_DURATION, "GenAI operation duration"),
            client_first_chunk: secs(
                n::CLIENT_TIME_TO_FIRST_CHUNK,
                "Time to receive the first chunk of a streamed answer",
            ),
            client_tokens: meter
                .u64_histogram(n::CLIENT_TOKEN_USAGE)
                .with_unit("{token}")
                .with_description("Number of input and output tokens used")
                .with_boundaries(TOKEN_BUCKETS.to_vec())
                .build(),
            server_duration: secs(n::SERVER_REQUEST_DURATION, "GenAI server request duration"),
            server_first_token: secs(
                n::SERVER_TIME_TO_FIRST_TOKEN,
                "Time to the first token of a streamed answer",
            ),
        }
    }
}

/// OpenTelemetry for an [`OpenAiRouter`](crate::OpenAiRouter): see the [module
/// docs](self).
#[derive(Clone)]
pub struct OtelTracing {
    tracer: Arc<BoxedTracer>,
    instruments: Arc<Instruments>,
    capture_content: bool,
    max_content_bytes: usize,
    systems: HashMap<Arc<str>, Arc<str>>,
}

impl fmt::Debug for OtelTracing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OtelTracing")
            .field("capture_content", &self.capture_content)
            .field("max_content_bytes", &self.max_content_bytes)
            .field("systems", &self.systems)
            .finish_non_exhaustive()
    }
}

impl OtelTracing {
    /// Spans from `tracer`, metrics from `meter`; content not captured.
    pub fn new(tracer: BoxedTracer, meter: &Meter) -> Self {
        Self {
            tracer: Arc::new(tracer),
            instruments: Arc::new(Instruments::new(meter)),
            capture_content: false,
            max_content_bytes: DEFAULT_MAX_CONTENT_BYTES,
            systems: HashMap::new(),
        }
    }

    /// The `gen_ai.provider.name` of the provider named `provider` in the stack
    /// (`openai`, `anthropic`…; default: the name itself).
    #[must_use]
    pub fn provider_name(mut self, provider: &str, gen_ai_name: &str) -> Self {
        self.systems.insert(provider.into(), gen_ai_name.into());
        self
    }

    /// Record prompts and completions on the request span (`gen_ai.input.messages`,
    /// `gen_ai.output.messages`). Off by default: they may hold personal data.
    #[must_use]
    pub fn capture_content(mut self, yes: bool) -> Self {
        self.capture_content = yes;
        self
    }

    /// The most bytes of content recorded per attribute (default 16 KiB); longer content
    /// is cut at a character boundary.
    #[must_use]
    pub fn max_content_bytes(mut self, bytes: usize) -> Self {
        self.max_content_bytes = bytes;
        self
    }

    fn system(&self, provider: &str) -> Arc<str> {
        self.systems
            .get(provider)
            .cloned()
            .unwrap_or_else(|| provider.into())
    }
}

/// A model name → its metric label (itself, or `other` when the config does not know it).
pub(crate) type ModelLabel = Box<dyn Fn(&str) -> Arc<str> + Send + Sync>;

/// The router's view: the tracing setup and the model labels it may use in metrics.
pub(crate) struct Otel {
    pub(crate) cfg: OtelTracing,
    pub(crate) model_label: ModelLabel,
}

struct HeaderExtractor<'a>(&'a http::HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }
    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(http::HeaderName::as_str).collect()
    }
}

/// What the request span gathers while the answer goes out.
#[derive(Default)]
struct Gathered {
    first_chunk: Option<Duration>,
    reasons: Vec<String>,
    output: String,
    output_cut: bool,
}

/// The shared state of one traced request: the observer the layers call.
struct ReqState {
    otel: Arc<Otel>,
    cx: Context,
    start: Instant,
    gathered: Mutex<Gathered>,
}

/// One request's trace, from the handler's side.
pub(crate) struct RequestTrace {
    state: Arc<ReqState>,
}

impl Otel {
    /// Starts the request span (child of the incoming `traceparent`) and puts the observer
    /// into the request.
    pub(crate) fn start(
        self: &Arc<Self>,
        headers: &http::HeaderMap,
        req: &mut ChatRequest,
        labels: &Labels,
        request_id: Option<&str>,
    ) -> RequestTrace {
        let parent = TraceContextPropagator::new().extract(&HeaderExtractor(headers));
        let mut attrs = vec![
            KeyValue::new(n::OPERATION_NAME, "chat"),
            KeyValue::new(n::REQUEST_MODEL, req.model.clone()),
            KeyValue::new(n::REQUEST_STREAM, req.is_stream()),
            KeyValue::new(n::TASK, labels.task.to_string()),
            KeyValue::new(n::TENANT, labels.tenant.to_string()),
        ];
        if let Some(t) = req.temperature_f64() {
            attrs.push(KeyValue::new(n::REQUEST_TEMPERATURE, t));
        }
        if let Some(m) = req.output_limit() {
            attrs.push(KeyValue::new(
                n::REQUEST_MAX_TOKENS,
                i64::try_from(m).unwrap_or(i64::MAX),
            ));
        }
        if let Some(id) = request_id {
            attrs.push(KeyValue::new(n::REQUEST_ID, id.to_owned()));
        }
        if self.cfg.capture_content {
            attrs.push(KeyValue::new(
                n::INPUT_MESSAGES,
                input_messages(req, self.cfg.max_content_bytes),
            ));
        }
        let span = self
            .cfg
            .tracer
            .span_builder(format!("chat {}", req.model))
            .with_kind(SpanKind::Server)
            .with_attributes(attrs)
            .start_with_context(&*self.cfg.tracer, &parent);
        let state = Arc::new(ReqState {
            otel: self.clone(),
            cx: parent.with_span(span),
            start: Instant::now(),
            gathered: Mutex::default(),
        });
        req.extensions.insert(Observer::new(state.clone()));
        RequestTrace { state }
    }
}

impl RequestTrace {
    fn gathered(&self) -> std::sync::MutexGuard<'_, Gathered> {
        self.state
            .gathered
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// What the stack reported in the response meta.
    pub(crate) fn meta(&self, meta: &ResponseMeta) {
        let span = self.state.cx.span();
        if let Some(p) = &meta.provider {
            span.set_attribute(KeyValue::new(n::PROVIDER, p.to_string()));
            span.set_attribute(KeyValue::new(
                n::PROVIDER_NAME,
                self.state.otel.cfg.system(p).to_string(),
            ));
        }
        if let Some(m) = &meta.model {
            span.set_attribute(KeyValue::new(n::RESPONSE_MODEL, m.clone()));
        }
        if let Some(r) = &meta.route {
            span.set_attribute(KeyValue::new(n::ROUTE, r.to_string()));
        }
        span.set_attribute(KeyValue::new(n::CACHE, meta.cache.as_str()));
        if let Some(c) = meta.cost {
            span.set_attribute(KeyValue::new(n::COST_USD, c.usd()));
            if c.saved_nano_usd > 0 {
                span.set_attribute(KeyValue::new(
                    n::COST_SAVED_USD,
                    c.saved_nano_usd as f64 / 1e9,
                ));
            }
        }
        let attempts = if meta.attempts.is_empty() && meta.cache == llm_tower_core::CacheStatus::Hit
        {
            0
        } else {
            meta.attempt_count()
        };
        span.set_attribute(KeyValue::new(
            n::ATTEMPTS,
            i64::try_from(attempts).unwrap_or(i64::MAX),
        ));
    }

    /// A complete answer: its finish reasons (and content, when captured).
    pub(crate) fn complete(&self, r: &ChatResponse) {
        let cap = self.state.otel.cfg.capture_content;
        let max = self.state.otel.cfg.max_content_bytes;
        let mut g = self.gathered();
        for c in r.choices.iter().take(MAX_REASONS) {
            if let Some(f) = &c.finish_reason {
                g.reasons.push(f.clone());
            }
            if cap {
                push_cut(&mut g, &c.message.text(), max);
            }
        }
    }

    /// A complete answer kept as JSON: its finish reasons (decoded only while tracing).
    pub(crate) fn encoded(&self, json: &[u8]) {
        if self.state.otel.cfg.capture_content {
            if let Ok(r) = ChatResponse::from_slice(json) {
                self.complete(&r);
            }
            return;
        }
        #[derive(serde::Deserialize)]
        struct C {
            #[serde(default)]
            finish_reason: Option<String>,
        }
        #[derive(serde::Deserialize)]
        struct B {
            #[serde(default)]
            choices: Vec<C>,
        }
        if let Ok(b) = serde_json::from_slice::<B>(json) {
            let mut g = self.gathered();
            g.reasons.extend(
                b.choices
                    .into_iter()
                    .filter_map(|c| c.finish_reason)
                    .take(MAX_REASONS),
            );
        }
    }

    /// A stream: watches its chunks for the first one, finish reasons and content.
    pub(crate) fn watch(&self, stream: &mut ChunkStream) {
        let state = self.state.clone();
        stream.wrap(move |inner| Watched {
            inner,
            state,
            first: false,
        });
    }

    /// Ends the request span and records the server metrics.
    pub(crate) fn end(self, status: &str, usage: Option<&Usage>, labels: &Labels) {
        let st = &self.state;
        let elapsed = st.start.elapsed();
        let span = st.cx.span();
        if let Some(u) = usage {
            set_usage(&span, u);
        }
        let g = std::mem::take(&mut *self.gathered());
        if !g.reasons.is_empty() {
            span.set_attribute(KeyValue::new(
                n::RESPONSE_FINISH_REASONS,
                strings(g.reasons),
            ));
        }
        if st.otel.cfg.capture_content && !g.output.is_empty() {
            span.set_attribute(KeyValue::new(
                n::OUTPUT_MESSAGES,
                output_messages(&g.output, g.output_cut),
            ));
        }
        let mut attrs = vec![
            KeyValue::new(n::OPERATION_NAME, "chat"),
            KeyValue::new(n::REQUEST_MODEL, labels.model.to_string()),
            KeyValue::new(n::TASK, labels.task.to_string()),
        ];
        if !labels.provider.is_empty() {
            attrs.push(KeyValue::new(
                n::PROVIDER_NAME,
                st.otel.cfg.system(&labels.provider).to_string(),
            ));
        }
        if status != "ok" {
            span.set_attribute(KeyValue::new(n::ERROR_TYPE, status.to_owned()));
            span.set_status(Status::error(status.to_owned()));
            attrs.push(KeyValue::new(n::ERROR_TYPE, status.to_owned()));
        }
        let inst = &st.otel.cfg.instruments;
        inst.server_duration.record(elapsed.as_secs_f64(), &attrs);
        if let Some(first) = g.first_chunk
            && status == "ok"
        {
            inst.server_first_token.record(first.as_secs_f64(), &attrs);
        }
        span.end();
    }
}

fn push_cut(g: &mut Gathered, text: &str, max: usize) {
    if g.output_cut {
        return;
    }
    let room = max.saturating_sub(g.output.len());
    if text.len() <= room {
        g.output.push_str(text);
    } else {
        g.output.push_str(cut(text, room));
        g.output_cut = true;
    }
}

/// `s` cut to at most `max` bytes, at a character boundary.
fn cut(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

fn strings(v: Vec<String>) -> Value {
    Value::Array(Array::String(
        v.into_iter().map(StringValue::from).collect(),
    ))
}

fn set_usage(span: &opentelemetry::trace::SpanRef<'_>, u: &Usage) {
    let i = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
    span.set_attribute(KeyValue::new(n::USAGE_INPUT_TOKENS, i(u.prompt_tokens)));
    span.set_attribute(KeyValue::new(
        n::USAGE_OUTPUT_TOKENS,
        i(u.completion_tokens),
    ));
    if u.cached_tokens() > 0 {
        span.set_attribute(KeyValue::new(
            n::USAGE_CACHE_READ_INPUT_TOKENS,
            i(u.cached_tokens()),
        ));
    }
}

/// The request's messages in the conventions' JSON shape, each text cut so the whole stays
/// within about `max` bytes.
fn input_messages(req: &ChatRequest, max: usize) -> String {
    let mut left = max;
    let msgs: Vec<serde_json::Value> = req
        .messages
        .iter()
        .map(|m| {
            let text = m.text();
            let t = cut(&text, left);
            left -= t.len();
            serde_json::json!({
                "role": m.role.as_str(),
                "parts": [{"type": "text", "content": t}],
            })
        })
        .collect();
    serde_json::Value::Array(msgs).to_string()
}

fn output_messages(text: &str, truncated: bool) -> String {
    let mut m = serde_json::json!({
        "role": "assistant",
        "parts": [{"type": "text", "content": text}],
    });
    if truncated {
        m["llm_tower.truncated"] = serde_json::Value::Bool(true);
    }
    serde_json::Value::Array(vec![m]).to_string()
}

/// The request's stream as the client receives it.
struct Watched {
    inner: BoxChunkStream,
    state: Arc<ReqState>,
    first: bool,
}

impl Stream for Watched {
    type Item = Result<ChatChunk, LlmError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<Option<Self::Item>> {
        let item = std::task::ready!(self.inner.as_mut().poll_next(cx));
        if let Some(Ok(chunk)) = &item {
            let this = &mut *self;
            let cfg = &this.state.otel.cfg;
            let mut g = this
                .state
                .gathered
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            if !this.first {
                this.first = true;
                g.first_chunk = Some(this.state.start.elapsed());
            }
            for c in &chunk.choices {
                if let Some(r) = c.finish_reason()
                    && g.reasons.len() < MAX_REASONS
                {
                    g.reasons.push(r.to_owned());
                }
                if cfg.capture_content
                    && let Some(t) = c.delta.text()
                {
                    push_cut(&mut g, t, cfg.max_content_bytes);
                }
            }
        }
        Poll::Ready(item)
    }
}

impl RequestObserver for ReqState {
    fn event(&self, event: ObserveEvent<'_>) {
        let span = self.cx.span();
        match event {
            ObserveEvent::CacheHit => span.add_event("llm_tower.cache.hit", vec![]),
            ObserveEvent::CacheCoalesced => span.add_event("llm_tower.cache.coalesced", vec![]),
            ObserveEvent::ValidationRetry { attempt, rule } => span.add_event(
                "llm_tower.validation.retry",
                vec![
                    KeyValue::new("llm_tower.validation.attempt", i64::from(attempt)),
                    KeyValue::new("llm_tower.validation.rule", rule.to_owned()),
                ],
            ),
            ObserveEvent::RateLimitWait { wait } => span.add_event(
                "llm_tower.rate_limit.wait",
                vec![KeyValue::new(
                    "llm_tower.rate_limit.wait_ms",
                    i64::try_from(wait.as_millis()).unwrap_or(i64::MAX),
                )],
            ),
            _ => {}
        }
    }

    fn attempt(&self, provider: &str, request: &mut ChatRequest) -> Box<dyn AttemptObserver> {
        let cfg = &self.otel.cfg;
        let system = cfg.system(provider);
        let span = cfg
            .tracer
            .span_builder(format!("chat {}", request.model))
            .with_kind(SpanKind::Client)
            .with_attributes([
                KeyValue::new(n::OPERATION_NAME, "chat"),
                KeyValue::new(n::PROVIDER_NAME, system.to_string()),
                KeyValue::new(n::PROVIDER, provider.to_owned()),
                KeyValue::new(n::REQUEST_MODEL, request.model.clone()),
            ])
            .start_with_context(&*cfg.tracer, &self.cx);
        let sc = span.span_context();
        if sc.is_valid() {
            let flags = if sc.trace_flags().is_sampled() {
                TraceFlags::SAMPLED
            } else {
                TraceFlags::default()
            };
            let value = format!(
                "00-{}-{}-{:02x}",
                sc.trace_id(),
                sc.span_id(),
                flags.to_u8()
            );
            if let Ok(v) = http::HeaderValue::from_str(&value) {
                let mut t = TraceParent::new(v);
                let state = sc.trace_state().header();
                if !state.is_empty() {
                    t.tracestate = http::HeaderValue::from_str(&state).ok();
                }
                request.extensions.insert(t);
            }
        }
        Box::new(AttemptTrace {
            otel: self.otel.clone(),
            span: Some(span),
            start: Instant::now(),
            first: None,
            system,
            model: (self.otel.model_label)(&request.model),
        })
    }
}

/// One upstream attempt's span.
struct AttemptTrace {
    otel: Arc<Otel>,
    span: Option<<BoxedTracer as Tracer>::Span>,
    start: Instant,
    first: Option<Duration>,
    system: Arc<str>,
    /// The requested model's metric label.
    model: Arc<str>,
}

impl AttemptTrace {
    fn close(&mut self, error: Option<&str>, model: Option<&str>, usage: Option<&Usage>) {
        let Some(mut span) = self.span.take() else {
            return;
        };
        let inst = &self.otel.cfg.instruments;
        let mut attrs = vec![
            KeyValue::new(n::OPERATION_NAME, "chat"),
            KeyValue::new(n::PROVIDER_NAME, self.system.to_string()),
            KeyValue::new(n::REQUEST_MODEL, self.model.to_string()),
        ];
        if let Some(m) = model {
            attrs.push(KeyValue::new(
                n::RESPONSE_MODEL,
                (self.otel.model_label)(m).to_string(),
            ));
        }
        if let Some(e) = error {
            span.set_attribute(KeyValue::new(n::ERROR_TYPE, e.to_owned()));
            span.set_status(Status::error(e.to_owned()));
            attrs.push(KeyValue::new(n::ERROR_TYPE, e.to_owned()));
        }
        inst.client_duration
            .record(self.start.elapsed().as_secs_f64(), &attrs);
        if let Some(f) = self.first {
            span.set_attribute(KeyValue::new(
                n::RESPONSE_TIME_TO_FIRST_CHUNK,
                f.as_secs_f64(),
            ));
            inst.client_first_chunk.record(f.as_secs_f64(), &attrs);
        }
        if let Some(u) = usage {
            let i = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
            span.set_attribute(KeyValue::new(n::USAGE_INPUT_TOKENS, i(u.prompt_tokens)));
            span.set_attribute(KeyValue::new(
                n::USAGE_OUTPUT_TOKENS,
                i(u.completion_tokens),
            ));
            if error.is_none() {
                let mut a = attrs.clone();
                a.push(KeyValue::new(n::TOKEN_TYPE, "input"));
                inst.client_tokens.record(u.prompt_tokens, &a);
                attrs.push(KeyValue::new(n::TOKEN_TYPE, "output"));
                inst.client_tokens.record(u.completion_tokens, &attrs);
            }
        }
        span.end();
    }
}

impl AttemptObserver for AttemptTrace {
    fn first_chunk(&mut self) {
        self.first = Some(self.start.elapsed());
    }

    fn finish(mut self: Box<Self>, end: AttemptEnd<'_>) {
        match end {
            AttemptEnd::Answered {
                model,
                usage,
                finish_reasons,
            } => {
                if let Some(span) = self.span.as_mut() {
                    if let Some(m) = model {
                        span.set_attribute(KeyValue::new(n::RESPONSE_MODEL, m.to_owned()));
                    }
                    if !finish_reasons.is_empty() {
                        span.set_attribute(KeyValue::new(
                            n::RESPONSE_FINISH_REASONS,
                            strings(finish_reasons.iter().take(MAX_REASONS).cloned().collect()),
                        ));
                    }
                }
                self.close(None, model, usage);
            }
            AttemptEnd::Failed { error, usage } => {
                self.close(Some(error.kind().as_str()), None, usage);
            }
            _ => self.close(Some("cancelled"), None, None),
        }
    }
}

impl Drop for AttemptTrace {
    fn drop(&mut self) {
        // Abandoned before an end was reported (the fallback moved on after a timeout, the
        // client went away).
        self.close(Some("cancelled"), None, None);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[allow(deprecated)] // the GenAI names moved to their own semconv repository
    fn names_match_semconv() {
        use opentelemetry_semantic_conventions::{attribute as a, metric as m};
        assert_eq!(n::OPERATION_NAME, a::GEN_AI_OPERATION_NAME);
        assert_eq!(n::PROVIDER_NAME, a::GEN_AI_PROVIDER_NAME);
        assert_eq!(n::REQUEST_MODEL, a::GEN_AI_REQUEST_MODEL);
        assert_eq!(n::REQUEST_MAX_TOKENS, a::GEN_AI_REQUEST_MAX_TOKENS);
        assert_eq!(n::REQUEST_TEMPERATURE, a::GEN_AI_REQUEST_TEMPERATURE);
        assert_eq!(n::REQUEST_STREAM, a::GEN_AI_REQUEST_STREAM);
        assert_eq!(n::RESPONSE_MODEL, a::GEN_AI_RESPONSE_MODEL);
        assert_eq!(
            n::RESPONSE_FINISH_REASONS,
            a::GEN_AI_RESPONSE_FINISH_REASONS
        );
        assert_eq!(
            n::RESPONSE_TIME_TO_FIRST_CHUNK,
            a::GEN_AI_RESPONSE_TIME_TO_FIRST_CHUNK
        );
        assert_eq!(n::USAGE_INPUT_TOKENS, a::GEN_AI_USAGE_INPUT_TOKENS);
        assert_eq!(n::USAGE_OUTPUT_TOKENS, a::GEN_AI_USAGE_OUTPUT_TOKENS);
        assert_eq!(
            n::USAGE_CACHE_READ_INPUT_TOKENS,
            a::GEN_AI_USAGE_CACHE_READ_INPUT_TOKENS
        );
        assert_eq!(n::TOKEN_TYPE, a::GEN_AI_TOKEN_TYPE);
        assert_eq!(n::INPUT_MESSAGES, a::GEN_AI_INPUT_MESSAGES);
        assert_eq!(n::OUTPUT_MESSAGES, a::GEN_AI_OUTPUT_MESSAGES);
        assert_eq!(n::ERROR_TYPE, a::ERROR_TYPE);
        assert_eq!(
            n::CLIENT_OPERATION_DURATION,
            m::GEN_AI_CLIENT_OPERATION_DURATION
        );
        assert_eq!(
            n::CLIENT_TIME_TO_FIRST_CHUNK,
            m::GEN_AI_CLIENT_OPERATION_TIME_TO_FIRST_CHUNK
        );
        assert_eq!(n::CLIENT_TOKEN_USAGE, m::GEN_AI_CLIENT_TOKEN_USAGE);
        assert_eq!(
            n::SERVER_REQUEST_DURATION,
            m::GEN_AI_SERVER_REQUEST_DURATION
        );
        assert_eq!(
            n::SERVER_TIME_TO_FIRST_TOKEN,
            m::GEN_AI_SERVER_TIME_TO_FIRST_TOKEN
        );
    }

    #[test]
    fn cut_keeps_char_boundaries() {
        assert_eq!(cut("héllo", 2), "h");
        assert_eq!(cut("héllo", 3), "hé");
        assert_eq!(cut("abc", 10), "abc");
    }

    #[test]
    fn input_messages_are_bounded() {
        let req = ChatRequest::new(
            "m",
            vec![
                llm_tower_core::Message::system("x".repeat(100)),
                llm_tower_core::Message::user("y".repeat(100)),
            ],
        );
        let s = input_messages(&req, 120);
        let v: serde_json::Value = serde_json::from_str(&s).unwrap();
        let total: usize = v
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["parts"][0]["content"].as_str().unwrap().len())
            .sum();
        assert_eq!(total, 120);
        assert_eq!(v[1]["role"], "user");
    }
}
