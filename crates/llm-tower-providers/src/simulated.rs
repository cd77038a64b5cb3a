//! [`SimulatedLlm`]: an in-process stand-in for a real provider, for demos, examples and
//! evaluations (per-model quality knobs), behind the `simulated` feature.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::StreamExt;
use llm_tower_core::{
    ChatChunk, ChatRequest, ChatResponse, EmbeddingInput, EmbeddingsResponse, ErrorKind,
    FunctionCall, FunctionCallDelta, LlmError, LlmResponse, ResponseBody, ResponseMeta, Role,
    ToolCall, ToolCallDelta, Usage,
};
use serde_json::{Map, Value, json};
use tower_service::Service;

type AnswerFn = Arc<dyn Fn(&ChatRequest) -> String + Send + Sync>;

/// A simulated LLM: answers every request in process, with no network and no key, like a
/// provider would: after a time to first token, streamed word by word when the request
/// streams, with usage estimated at ~4 bytes a token, and with scripted periodic failures so
/// fallback chains have something to do in a demo.
///
/// The answer is deterministic and derived from the prompt. A request whose
/// `response_format` is `json_object` gets `{"answer": "..."}`; one with a `json_schema` gets
/// a JSON value that satisfies the schema (its `enum`/`const` values, required properties,
/// types), so validation demos pass. A request with function tools gets a call of the chosen
/// (or first) one, with schema-satisfying arguments, until its last message is a tool
/// result.
///
/// Clones share the call counter (so `fail_every` counts across clones). Time uses tokio's
/// clock: `tokio::time::pause()` makes the delays instant in tests.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), llm_tower_core::LlmError> {
/// # tokio::time::pause();
/// use llm_tower_core::{ChatRequest, ErrorKind, Message};
/// use llm_tower_providers::SimulatedLlm;
/// use std::time::Duration;
/// use tower::{Service, ServiceExt};
///
/// let mut llm = SimulatedLlm::builder("sim-fast")
///     .model("sim-small")
///     .latency(Duration::from_millis(250))
///     .token_delay(Duration::from_millis(15))
///     .fail_every(3, ErrorKind::RateLimited) // calls 3, 6, 9 … answer 429
///     .build();
///
/// let req = ChatRequest::new("any", vec![Message::user("What is tower?")]);
/// let resp = llm.ready().await?.call(req.clone()).await?;
/// assert_eq!(resp.meta.provider.as_deref(), Some("sim-fast"));
/// assert_eq!(resp.meta.model.as_deref(), Some("sim-small"));
/// let text = resp.into_complete().await?.text();
/// assert!(text.contains("tower"));
///
/// llm.ready().await?.call(req.clone()).await?;
/// let err = llm.ready().await?.call(req).await.unwrap_err();
/// assert_eq!(err.kind(), ErrorKind::RateLimited);
/// assert_eq!(err.retry_after(), Some(Duration::from_secs(1)));
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct SimulatedLlm {
    inner: Arc<Inner>,
}

struct Inner {
    name: Arc<str>,
    model: Option<String>,
    latency: Duration,
    token_delay: Duration,
    failure: Option<(u64, ErrorKind)>,
    retry_after: Duration,
    answer: Option<AnswerFn>,
    quality: Quality,
    calls: AtomicU64,
}

impl fmt::Debug for SimulatedLlm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let i = &self.inner;
        f.debug_struct("SimulatedLlm")
            .field("name", &i.name)
            .field("model", &i.model)
            .field("latency", &i.latency)
            .field("token_delay", &i.token_delay)
            .field("failure", &i.failure)
            .field("quality", &i.quality)
            .field("calls", &self.calls())
            .finish_non_exhaustive()
    }
}

/// Builds a [`SimulatedLlm`]. Defaults: 200 ms to the first token, 20 ms a word, never fails,
/// serves the requested model.
#[derive(Clone)]
pub struct SimulatedLlmBuilder {
    name: Arc<str>,
    model: Option<String>,
    latency: Duration,
    token_delay: Duration,
    failure: Option<(u64, ErrorKind)>,
    retry_after: Duration,
    answer: Option<AnswerFn>,
    quality: Quality,
}

/// The quality knobs: which calls answer invalid JSON or a different answer.
///
/// A rate is kept in parts per million and applied by call number, not drawn at random:
/// with the rate as a reduced fraction `k / m` (0.125 = 1/8), every block of `m`
/// consecutive calls (calls 1 to m, m+1 to 2m, …) holds exactly `k` affected calls, at
/// places within the block drawn from the seed. So `N` calls from the first hold exactly
/// `N·rate` affected ones when `N` is a multiple of `m` (and within `k` of it otherwise),
/// and two clients taking turns on one provider do not split the affected calls by
/// parity. Each knob draws its own places.
#[derive(Debug, Clone, Copy, Default)]
struct Quality {
    invalid_json_ppm: u32,
    wrong_answer_ppm: u32,
    seed: u64,
}

const MILLION: u64 = 1_000_000;

/// Multipliers coprime to 10⁶ (so to every block size): `p ↦ (a·p + c) mod m` is then a
/// permutation of a block.
const COPRIME: [u64; 8] = [7, 11, 13, 17, 19, 23, 29, 31];

impl Quality {
    fn hits(ppm: u32, call: u64, seed: u64) -> bool {
        if ppm == 0 || call == 0 {
            return false;
        }
        let ppm = u64::from(ppm);
        if ppm >= MILLION {
            return true;
        }
        let g = gcd(ppm, MILLION);
        let (k, m) = (ppm / g, MILLION / g);
        let (block, place) = ((call - 1) / m, (call - 1) % m);
        let h = splitmix(seed ^ block.wrapping_mul(0x9e37_79b9_7f4a_7c15));
        let a = COPRIME[(h % 8) as usize];
        let c = (h >> 8) % m;
        // u128: a·place < 31·10⁶ fits u64 too, but the sum stays obviously in range.
        let slot = (u128::from(a) * u128::from(place) + u128::from(c)) % u128::from(m);
        slot < u128::from(k)
    }

    fn invalid_json(&self, call: u64) -> bool {
        Self::hits(self.invalid_json_ppm, call, splitmix(self.seed ^ 0x6a73))
    }

    fn wrong_answer(&self, call: u64) -> bool {
        Self::hits(self.wrong_answer_ppm, call, splitmix(self.seed ^ 0x7772))
    }
}

fn gcd(mut a: u64, mut b: u64) -> u64 {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

fn rate_ppm(rate: f64) -> u32 {
    if rate.is_nan() {
        return 0;
    }
    // Clamped to [0, 1] first, so the cast cannot overflow.
    (rate.clamp(0.0, 1.0) * MILLION as f64).round() as u32
}

fn splitmix(seed: u64) -> u64 {
    let mut z = seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

impl fmt::Debug for SimulatedLlmBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SimulatedLlmBuilder")
            .field("name", &self.name)
            .field("model", &self.model)
            .field("latency", &self.latency)
            .field("token_delay", &self.token_delay)
            .field("failure", &self.failure)
            .field("quality", &self.quality)
            .finish_non_exhaustive()
    }
}

impl SimulatedLlmBuilder {
    /// The model reported in responses and [`ResponseMeta::model`] (default: the request's).
    pub fn model(mut self, model: impl Into<String>) -> Self {
        self.model = Some(model.into());
        self
    }

    /// Time to the first token (the whole wait before a complete response starts).
    pub fn latency(mut self, d: Duration) -> Self {
        self.latency = d;
        self
    }

    /// Delay per streamed word. A complete response waits for all of them too, as a real
    /// model generates every token before answering.
    pub fn token_delay(mut self, d: Duration) -> Self {
        self.token_delay = d;
        self
    }

    /// Every `n`-th call (the n-th, 2n-th, …) fails with `kind`, after the latency. Rate
    /// limited and overloaded errors carry a retry-after ([`retry_after`](Self::retry_after),
    /// default 1 s). `n = 0` never fails.
    pub fn fail_every(mut self, n: u64, kind: ErrorKind) -> Self {
        self.failure = (n > 0).then_some((n, kind));
        self
    }

    /// The retry-after of scripted rate-limited / overloaded / unavailable failures.
    pub fn retry_after(mut self, d: Duration) -> Self {
        self.retry_after = d;
        self
    }

    /// Generate the answer text with `f` instead of the built-in generator (JSON modes are
    /// then up to `f`).
    pub fn answer_with<F>(mut self, f: F) -> Self
    where
        F: Fn(&ChatRequest) -> String + Send + Sync + 'static,
    {
        self.answer = Some(Arc::new(f));
        self
    }

    /// The share of calls (0 to 1) whose JSON answer is broken: cut before its last
    /// character, as a model that stopped early would. Prose answers are unchanged (they
    /// are not JSON anyway). Exact over blocks of calls, not drawn at random: see
    /// [`quality_seed`](Self::quality_seed).
    pub fn invalid_json_rate(mut self, rate: f64) -> Self {
        self.quality.invalid_json_ppm = rate_ppm(rate);
        self
    }

    /// The share of calls (0 to 1) that give a different answer from the one every other
    /// call gives the same request: another label for a classification, another enum value
    /// or text in JSON, other prose. Still valid JSON where JSON was asked for.
    pub fn wrong_answer_rate(mut self, rate: f64) -> Self {
        self.quality.wrong_answer_ppm = rate_ppm(rate);
        self
    }

    /// Where in the call sequence the affected calls of the quality rates fall (default 0).
    /// Whatever the seed, every block of calls the size of the rate's denominator holds
    /// exactly its share of affected calls (one in every 4 calls for 0.25), so tests can
    /// assert exact rates.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// # tokio::time::pause();
    /// use llm_tower_core::{ChatRequest, Message};
    /// use llm_tower_providers::SimulatedLlm;
    /// use tower::ServiceExt;
    ///
    /// let llm = SimulatedLlm::builder("sim").invalid_json_rate(0.25).quality_seed(7).build();
    /// let mut broken = 0;
    /// for i in 0..100 {
    ///     let mut req = ChatRequest::new("m", vec![Message::user(format!("item {i}"))]);
    ///     req.response_format = Some(serde_json::from_value(serde_json::json!({"type": "json_object"})).unwrap());
    ///     let text = llm.clone().oneshot(req).await.unwrap().into_complete().await.unwrap().text();
    ///     broken += usize::from(serde_json::from_str::<serde_json::Value>(&text).is_err());
    /// }
    /// assert_eq!(broken, 25);
    /// # }
    /// ```
    pub fn quality_seed(mut self, seed: u64) -> Self {
        self.quality.seed = seed;
        self
    }

    /// The service.
    pub fn build(self) -> SimulatedLlm {
        SimulatedLlm {
            inner: Arc::new(Inner {
                name: self.name,
                model: self.model,
                latency: self.latency,
                token_delay: self.token_delay,
                failure: self.failure,
                retry_after: self.retry_after,
                answer: self.answer,
                quality: self.quality,
                calls: AtomicU64::new(0),
            }),
        }
    }
}

impl SimulatedLlm {
    /// A simulated provider named `name` with the default settings.
    pub fn new(name: impl Into<Arc<str>>) -> Self {
        Self::builder(name).build()
    }

    /// A builder for a simulated provider named `name`.
    pub fn builder(name: impl Into<Arc<str>>) -> SimulatedLlmBuilder {
        SimulatedLlmBuilder {
            name: name.into(),
            model: None,
            latency: Duration::from_millis(200),
            token_delay: Duration::from_millis(20),
            failure: None,
            retry_after: Duration::from_secs(1),
            answer: None,
            quality: Quality::default(),
        }
    }

    /// The provider name.
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// Calls so far (shared by clones).
    pub fn calls(&self) -> u64 {
        self.inner.calls.load(Ordering::Relaxed)
    }

    /// The answer this service gives `req` (without delays, failures or quality knobs).
    pub fn answer_text(&self, req: &ChatRequest) -> String {
        match &self.inner.answer {
            Some(f) => f(req),
            None => generate(req, false),
        }
    }

    /// The answer of call number `call`: [`answer_text`](Self::answer_text), unless the
    /// quality knobs pick this call for a wrong answer or broken JSON.
    fn answer_for_call(&self, req: &ChatRequest, call: u64) -> String {
        let q = &self.inner.quality;
        let mut text = if q.wrong_answer(call) {
            match &self.inner.answer {
                Some(f) => wrong_variant(f(req)),
                None => generate(req, true),
            }
        } else {
            self.answer_text(req)
        };
        if q.invalid_json(call) && text.trim_start().starts_with(['{', '[']) {
            text.pop();
        }
        text
    }

    fn failure(&self, call: u64) -> Option<LlmError> {
        let (n, kind) = self.inner.failure?;
        if !call.is_multiple_of(n) {
            return None;
        }
        let name = &self.inner.name;
        let mut err = LlmError::new(
            kind,
            format!("{name}: simulated {} (call {call})", kind.as_str()),
        )
        .with_provider(name.to_string())
        .with_upstream_status(match kind {
            ErrorKind::Overloaded => 529,
            ErrorKind::Unavailable => 503,
            other => other.status(),
        });
        if matches!(
            kind,
            ErrorKind::RateLimited | ErrorKind::Overloaded | ErrorKind::Unavailable
        ) {
            err = err.with_retry_after(self.inner.retry_after);
        }
        Some(err)
    }
}

/// The future of [`SimulatedLlm`].
pub struct SimulatedFuture(Pin<Box<dyn Future<Output = Result<LlmResponse, LlmError>> + Send>>);

impl fmt::Debug for SimulatedFuture {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SimulatedFuture")
    }
}

impl Future for SimulatedFuture {
    type Output = Result<LlmResponse, LlmError>;
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        self.0.as_mut().poll(cx)
    }
}

impl Service<ChatRequest> for SimulatedLlm {
    type Response = LlmResponse;
    type Error = LlmError;
    type Future = SimulatedFuture;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), LlmError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: ChatRequest) -> SimulatedFuture {
        let call = self.inner.calls.fetch_add(1, Ordering::Relaxed) + 1;
        let this = self.clone();
        SimulatedFuture(Box::pin(async move {
            let inner = &this.inner;
            if let Some(emb) = req.as_embeddings() {
                if !inner.latency.is_zero() {
                    tokio::time::sleep(inner.latency).await;
                }
                if let Some(err) = this.failure(call) {
                    return Err(err);
                }
                let model = inner.model.clone().unwrap_or_else(|| req.model.clone());
                let dims = emb
                    .dimensions
                    .map_or(SIMULATED_DIMENSIONS, |d| usize::try_from(d).unwrap_or(1));
                let data = emb.input.iter().map(|x| embed(&model, x, dims)).collect();
                let tokens = emb
                    .input
                    .iter()
                    .map(|x| estimate_tokens(x.len_bytes()))
                    .sum();
                let mut resp = LlmResponse::embeddings(EmbeddingsResponse {
                    model,
                    data,
                    usage: Usage::new(tokens, 0),
                });
                resp.meta.provider = Some(inner.name.clone());
                return Ok(resp);
            }
            if req.messages.is_empty() {
                return Err(LlmError::bad_request("'messages' must not be empty")
                    .with_param("messages")
                    .with_provider(inner.name.to_string()));
            }
            let started = tokio::time::Instant::now();
            if !inner.latency.is_zero() {
                tokio::time::sleep(inner.latency).await;
            }
            if let Some(err) = this.failure(call) {
                return Err(err);
            }
            let model = inner.model.clone().unwrap_or_else(|| req.model.clone());
            let (text, finish) = limit_words(this.answer_for_call(&req, call), req.output_limit());
            let usage = Usage::new(
                estimate_tokens(req.prompt_text_len()),
                estimate_tokens(text.len()),
            );
            let mut meta = ResponseMeta {
                provider: Some(inner.name.clone()),
                model: Some(model.clone()),
                ..ResponseMeta::default()
            };
            let call = tool_call(&req, call);
            if let Some(tc) = call {
                return Ok(tool_answer(&req, tc, model, usage, meta, started));
            }
            let words: Vec<String> = text.split_inclusive(' ').map(str::to_owned).collect();
            if req.is_stream() {
                meta.upstream_time = Some(started.elapsed());
                let id = next_id();
                let delay = inner.token_delay;
                let mut items: Vec<ChatChunk> = words
                    .into_iter()
                    .map(|w| ChatChunk::text(id.clone(), model.clone(), w))
                    .collect();
                let mut last = ChatChunk::text(id.clone(), model.clone(), "");
                last.choices[0].delta.content = None;
                last.choices[0].finish_reason = Some(Some(finish.to_owned()));
                items.push(last);
                let mut u = ChatChunk::text(id, model, "");
                u.choices.clear();
                u.usage = Some(Some(usage));
                items.push(u);
                let n_words = items.len() - 2;
                let stream = futures_util::stream::iter(items.into_iter().enumerate()).then(
                    move |(i, chunk)| async move {
                        // The first word comes after the latency; each next one a delay later.
                        if i > 0 && i < n_words && !delay.is_zero() {
                            tokio::time::sleep(delay).await;
                        }
                        Ok(chunk)
                    },
                );
                Ok(LlmResponse {
                    body: ResponseBody::Stream(llm_tower_core::ChunkStream::new(stream)),
                    meta,
                })
            } else {
                let gen_time = inner.token_delay.saturating_mul(
                    u32::try_from(words.len().saturating_sub(1)).unwrap_or(u32::MAX),
                );
                if !gen_time.is_zero() {
                    tokio::time::sleep(gen_time).await;
                }
                let mut resp = ChatResponse::from_text(model, text);
                resp.choices[0].finish_reason = Some(finish.to_owned());
                resp.usage = Some(usage.clone());
                meta.usage = Some(usage);
                meta.upstream_time = Some(started.elapsed());
                Ok(LlmResponse {
                    body: ResponseBody::Complete(Box::new(resp)),
                    meta,
                })
            }
        }))
    }
}

/// The tool call a request with function tools gets, unless its last message is already a
/// tool result or `tool_choice` is `"none"`: the chosen (or first) function, with arguments
/// that satisfy its parameter schema.
fn tool_call(req: &ChatRequest, call: u64) -> Option<ToolCall> {
    let tools = req.tools.as_ref()?;
    if req.messages.last().is_some_and(|m| m.role == Role::Tool) {
        return None;
    }
    let named = match &req.tool_choice {
        Some(Value::String(s)) if s == "none" => return None,
        Some(Value::Object(o)) => o
            .get("function")
            .and_then(|f| f.get("name"))
            .and_then(Value::as_str),
        _ => None,
    };
    let f = tools
        .iter()
        .filter_map(|t| t.function.as_ref())
        .find(|f| named.is_none_or(|n| n == f.name))?;
    let schema = f.parameters.clone().unwrap_or(Value::Null);
    let args = value_for_schema(&schema, &schema, &last_user_text(req), 0);
    Some(ToolCall {
        id: format!("call_sim{call:012}"),
        kind: "function".into(),
        function: FunctionCall {
            name: f.name.clone(),
            arguments: args.to_string(),
            extra: Map::new(),
        },
        extra: Map::new(),
    })
}

/// The answer that is a tool call, complete or as a stream (the call in one delta).
fn tool_answer(
    req: &ChatRequest,
    tc: ToolCall,
    model: String,
    usage: Usage,
    mut meta: ResponseMeta,
    started: tokio::time::Instant,
) -> LlmResponse {
    meta.upstream_time = Some(started.elapsed());
    if req.is_stream() {
        let id = next_id();
        let mut first = ChatChunk::text(id.clone(), model.clone(), "");
        first.choices[0].delta.content = None;
        first.choices[0].delta.tool_calls = Some(vec![ToolCallDelta {
            index: 0,
            id: Some(tc.id),
            kind: Some("function".into()),
            function: Some(FunctionCallDelta {
                name: Some(tc.function.name),
                arguments: Some(tc.function.arguments),
                extra: Map::new(),
            }),
            extra: Map::new(),
        }]);
        let mut last = ChatChunk::text(id.clone(), model.clone(), "");
        last.choices[0].delta.content = None;
        last.choices[0].finish_reason = Some(Some("tool_calls".into()));
        let mut u = ChatChunk::text(id, model, "");
        u.choices.clear();
        u.usage = Some(Some(usage));
        let items = [first, last, u].map(Ok);
        return LlmResponse {
            body: ResponseBody::Stream(llm_tower_core::ChunkStream::new(
                futures_util::stream::iter(items),
            )),
            meta,
        };
    }
    let mut resp = ChatResponse::from_text(model, "");
    resp.choices[0].message.content = Some(None);
    resp.choices[0].message.tool_calls = Some(vec![tc]);
    resp.choices[0].finish_reason = Some("tool_calls".into());
    resp.usage = Some(usage.clone());
    meta.usage = Some(usage);
    LlmResponse {
        body: ResponseBody::Complete(Box::new(resp)),
        meta,
    }
}

fn next_id() -> String {
    static N: AtomicU64 = AtomicU64::new(1);
    format!("chatcmpl-sim{:012}", N.fetch_add(1, Ordering::Relaxed))
}

/// Dimensions of a simulated embedding when the request names none.
pub const SIMULATED_DIMENSIONS: usize = 256;

/// A deterministic unit vector for `input` under `model` (splitmix64 seeded by FNV-1a): the
/// same input always gets the same vector, different inputs different ones.
pub fn embed(model: &str, input: &EmbeddingInput, dims: usize) -> Vec<f32> {
    let mut seed = match input {
        EmbeddingInput::Text(t) => fnv(t),
        EmbeddingInput::Tokens(t) => t.iter().fold(fnv("tokens"), |h, id| {
            (h ^ u64::from(*id)).wrapping_mul(0x0100_0000_01b3)
        }),
    } ^ fnv(model).rotate_left(17);
    let mut v: Vec<f32> = (0..dims)
        .map(|_| {
            seed = seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = seed;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^= z >> 31;
            // Uniform in [-1, 1).
            (z >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        })
        .collect();
    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    if norm > 0.0 {
        v.iter_mut().for_each(|x| *x /= norm);
    }
    v
}

/// ~4 bytes a token, at least one.
fn estimate_tokens(bytes: usize) -> u64 {
    (bytes as u64).div_ceil(4).max(1)
}

/// Cut the answer at the request's output limit (in ~4-byte tokens), like `finish_reason:
/// "length"`. JSON answers are never cut (they would stop being JSON).
fn limit_words(text: String, limit: Option<u64>) -> (String, &'static str) {
    let Some(limit) = limit else {
        return (text, "stop");
    };
    if estimate_tokens(text.len()) <= limit || text.starts_with(['{', '[']) {
        return (text, "stop");
    }
    let max_bytes = usize::try_from(limit.saturating_mul(4)).unwrap_or(usize::MAX);
    let mut out = String::new();
    for w in text.split_inclusive(' ') {
        if out.len() + w.len() > max_bytes {
            break;
        }
        out.push_str(w);
    }
    (out.trim_end().to_owned(), "length")
}

/// FNV-1a: a stable hash, so answers are the same across runs and machines.
fn fnv(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

const OPENERS: &[&str] = &[
    "Good question.",
    "Here is a short answer.",
    "In brief:",
    "Sure.",
];
const BODIES: &[&str] = &[
    "The key idea is to start with the simplest thing that works, measure it, and only then add complexity where the numbers show a need.",
    "It mostly depends on your constraints: latency, cost and how much correctness matters for this step.",
    "A practical approach is to split the problem into small steps, check each result, and keep a fallback for when a step fails.",
    "Most teams get there by caching what repeats, routing easy work to a cheaper model and keeping the expensive one for hard cases.",
];
const CLOSERS: &[&str] = &[
    "Let me know if you want more detail.",
    "I can go deeper on any part of this.",
    "Hope that helps.",
    "",
];

fn last_user_text(req: &ChatRequest) -> String {
    req.messages
        .iter()
        .rev()
        .find(|m| m.role == Role::User)
        .map(|m| m.text())
        .unwrap_or_default()
}

fn system_text(req: &ChatRequest) -> String {
    req.messages
        .iter()
        .filter(|m| m.role == Role::System)
        .map(|m| m.text())
        .collect::<Vec<_>>()
        .join(" ")
}

/// Another answer made from `text` (a custom answer function's): inside JSON, its string
/// values get a prefix; other text, a suffix.
fn wrong_variant(text: String) -> String {
    match serde_json::from_str::<Value>(&text) {
        Ok(mut v) => {
            fn walk(v: &mut Value) {
                match v {
                    Value::String(s) => s.insert_str(0, "alt: "),
                    Value::Array(a) => a.iter_mut().for_each(walk),
                    Value::Object(o) => o.values_mut().for_each(walk),
                    Value::Bool(b) => *b = !*b,
                    _ => {}
                }
            }
            walk(&mut v);
            v.to_string()
        }
        Err(_) => format!("{text} (alternative)"),
    }
}

/// The built-in deterministic answer; `variant` gives a different one (a wrong answer).
fn generate(req: &ChatRequest, variant: bool) -> String {
    let prompt = last_user_text(req);
    let h = fnv(&prompt) ^ fnv(&req.model).rotate_left(7);
    let task = req
        .task_type()
        .map(|t| t.0.to_ascii_lowercase())
        .unwrap_or_default();
    let hint = format!("{task} {}", system_text(req).to_ascii_lowercase());
    let prose = if hint.contains("classif") {
        // From the prompt alone: every simulated model agrees on a label (unless told to
        // answer wrongly), so evaluations and shadow comparisons have a truth to find.
        let hc = fnv(&prompt);
        ["positive", "negative", "neutral"][((hc % 3 + u64::from(variant)) % 3) as usize].to_owned()
    } else if hint.contains("summar") {
        let words: Vec<&str> = prompt.split_whitespace().take(12).collect();
        let head = if variant { "In short" } else { "Summary" };
        format!("{head}: {}.", words.join(" ").trim_end_matches('.'))
    } else {
        let topic: Vec<&str> = prompt.split_whitespace().take(8).collect();
        let topic = topic.join(" ");
        let v = u64::from(variant);
        let pick = |list: &[&'static str], shift: u32| {
            list[(((h >> shift) % list.len() as u64 + v) % list.len() as u64) as usize]
        };
        let mut s = format!(
            "{} About \"{}\": {}",
            pick(OPENERS, 0),
            topic.trim_end_matches(['?', '.', '!']),
            pick(BODIES, 8)
        );
        let closer = pick(CLOSERS, 16);
        if !closer.is_empty() {
            s.push(' ');
            s.push_str(closer);
        }
        s
    };
    match req.response_format.as_ref().map(|f| f.kind.as_str()) {
        Some("json_object") => json!({ "answer": prose }).to_string(),
        Some("json_schema") => {
            let schema = req
                .response_format
                .as_ref()
                .and_then(|f| f.json_schema.as_ref())
                .and_then(|s| s.schema.clone())
                .unwrap_or(Value::Null);
            let mut v = value_for_schema(&schema, &schema, &prose, 0);
            if variant {
                vary(&mut v, &schema, &schema, 0);
            }
            v.to_string()
        }
        _ => prose,
    }
}

/// Changes `v` (made by [`value_for_schema`]) into another value the schema accepts where
/// it can: the next `enum` value, a flipped boolean, a string with a different start.
fn vary(v: &mut Value, schema: &Value, root: &Value, depth: usize) {
    if depth > 16 {
        return;
    }
    let Some(obj) = schema.as_object() else {
        if let Value::Object(m) = v {
            m.values_mut()
                .for_each(|x| vary(x, &Value::Null, root, depth + 1));
        } else if let Value::String(s) = v {
            s.insert_str(0, "Alt: ");
        }
        return;
    };
    if let Some(r) = obj.get("$ref").and_then(Value::as_str)
        && let Some(target) = r.strip_prefix('#').and_then(|p| root.pointer(p))
    {
        return vary(v, target, root, depth + 1);
    }
    if obj.contains_key("const") {
        return;
    }
    if let Some(e) = obj.get("enum").and_then(Value::as_array) {
        if let Some(next) = e.get(1) {
            *v = next.clone();
        }
        return;
    }
    match v {
        Value::Object(m) => {
            let props = obj.get("properties").and_then(Value::as_object);
            for (k, x) in m.iter_mut() {
                let sub = props.and_then(|p| p.get(k)).unwrap_or(&Value::Null);
                vary(x, sub, root, depth + 1);
            }
        }
        Value::Array(a) => {
            let item = obj.get("items").unwrap_or(&Value::Null);
            a.iter_mut().for_each(|x| vary(x, item, root, depth + 1));
        }
        Value::String(s) if !obj.contains_key("maxLength") && !obj.contains_key("pattern") => {
            s.insert_str(0, "Alt: ");
        }
        Value::Bool(b) => *b = !*b,
        _ => {}
    }
}

/// A value that satisfies `schema` (the common subset: type, enum, const, properties,
/// required, items, minItems, anyOf/oneOf/allOf, local `$ref`s, numeric minimum).
fn value_for_schema(schema: &Value, root: &Value, text: &str, depth: usize) -> Value {
    if depth > 16 {
        return Value::Null;
    }
    let Some(obj) = schema.as_object() else {
        // `true`, or no schema at all: anything goes; answer an object like json_object.
        return json!({ "answer": text });
    };
    if let Some(r) = obj.get("$ref").and_then(Value::as_str)
        && let Some(target) = r.strip_prefix('#').and_then(|p| root.pointer(p))
    {
        return value_for_schema(target, root, text, depth + 1);
    }
    if let Some(c) = obj.get("const") {
        return c.clone();
    }
    if let Some(first) = obj
        .get("enum")
        .and_then(Value::as_array)
        .and_then(|e| e.first())
    {
        return first.clone();
    }
    for key in ["anyOf", "oneOf"] {
        if let Some(first) = obj
            .get(key)
            .and_then(Value::as_array)
            .and_then(|a| a.first())
        {
            return value_for_schema(first, root, text, depth + 1);
        }
    }
    if let Some(all) = obj.get("allOf").and_then(Value::as_array) {
        // Merge object parts; otherwise the first part decides.
        let mut merged = Map::new();
        for part in all {
            match value_for_schema(part, root, text, depth + 1) {
                Value::Object(m) => merged.extend(m),
                other if merged.is_empty() => return other,
                _ => {}
            }
        }
        return Value::Object(merged);
    }
    let ty = match obj.get("type") {
        Some(Value::String(t)) => t.as_str(),
        Some(Value::Array(ts)) => ts
            .iter()
            .filter_map(Value::as_str)
            .find(|t| *t != "null")
            .unwrap_or("null"),
        _ if obj.contains_key("properties") => "object",
        _ if obj.contains_key("items") => "array",
        _ => "object",
    };
    match ty {
        "object" => {
            let mut m = Map::new();
            if let Some(props) = obj.get("properties").and_then(Value::as_object) {
                for (k, sub) in props {
                    m.insert(k.clone(), value_for_schema(sub, root, text, depth + 1));
                }
            } else if obj.get("additionalProperties") != Some(&Value::Bool(false)) {
                m.insert("answer".to_owned(), Value::String(text.to_owned()));
            }
            Value::Object(m)
        }
        "array" => {
            let n = obj
                .get("minItems")
                .and_then(Value::as_u64)
                .unwrap_or(1)
                .max(1);
            let item = obj.get("items").unwrap_or(&Value::Null);
            let items = (0..n.min(16))
                .map(|_| value_for_schema(item, root, text, depth + 1))
                .collect();
            Value::Array(items)
        }
        "string" => {
            let mut s = text.to_owned();
            if let Some(max) = obj.get("maxLength").and_then(Value::as_u64) {
                s = s
                    .chars()
                    .take(usize::try_from(max).unwrap_or(usize::MAX))
                    .collect();
            }
            if let Some(min) = obj.get("minLength").and_then(Value::as_u64) {
                while (s.chars().count() as u64) < min {
                    s.push('.');
                }
            }
            Value::String(s)
        }
        "integer" => json!(
            obj.get("minimum").and_then(Value::as_i64).unwrap_or(1).max(
                obj.get("exclusiveMinimum")
                    .and_then(Value::as_i64)
                    .map_or(i64::MIN, |m| m + 1)
            )
        ),
        "number" => json!(obj.get("minimum").and_then(Value::as_f64).unwrap_or(1.0)),
        "boolean" => Value::Bool(true),
        _ => Value::Null,
    }
}
