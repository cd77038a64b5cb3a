//! Validate model outputs — "is JSON", a JSON Schema, the request's own `response_format`
//! schema, or a user function — and retry with a format reminder when they fail.
//!
//! # Rules
//!
//! Rules are set per task type ([`ValidateLayer::task`]) or for requests without a rule of
//! their own ([`ValidateLayer::default_rule`]):
//! - [`Rule::json`]: the output parses as JSON;
//! - [`Rule::json_schema`]: the output is JSON matching a schema, compiled once when the rule
//!   is built;
//! - [`Rule::custom`]: any [`ValidateOutput`] — a closure `Fn(&str) -> Result<(), String>`
//!   or your own type.
//!
//! In addition (unless [`ValidateLayer::use_response_format`] turns it off), a request whose
//! `response_format` is `json_schema` is checked against that schema — compiled on first sight
//! and cached, keyed by a hash of the schema — and `json_object` is checked as JSON. A schema
//! that does not compile is a bad request, answered before any call.
//!
//! Each choice's text is checked against these rules. A choice that answers with tool calls
//! only is not: its calls' arguments are checked against each called tool's own parameter
//! schema, from the request's `tools[].function.parameters` (unless
//! [`ValidateLayer::check_tool_arguments`] turns it off; a call to a tool without a schema,
//! or whose schema does not compile, is not checked). A `response_format` describes the
//! text answer, never a tool's arguments. Requests with no applicable rule and no tool
//! schema pass straight through.
//!
//! # Retry, then a typed error
//!
//! When an output fails, the request is sent again (once by default, see
//! [`ValidateLayer::retries`]) with a user message appended that names what was wrong:
//! `IMPORTANT: Output ONLY valid JSON. The previous answer failed because: …`. If the last
//! try fails too, the caller gets [`LlmError::invalid_output`](crate::LlmError::invalid_output)
//! with the reason; [`LlmError::output`](crate::LlmError::output) holds the rejected output.
//! Errors of the inner service are passed through untouched.
//!
//! A rejected answer was paid for: its usage is recorded as a
//! [`PaidAttempt`] in the `paid_attempts` of the response that follows
//! (or of the error), so that the cost and rate-limit layers above count every attempt.
//!
//! # Streams
//!
//! A streamed response is **buffered and validated before the caller sees any of it**: the
//! chunks are assembled, checked, and only then released as a stream replaying the buffered
//! chunks. Time to first byte is therefore the time of the whole answer; put the layer only
//! on routes that need checked output. The buffered chunks may take at most
//! [`ValidateLayer::max_stream_bytes`] of memory (default 8 MiB; the assembled answer comes
//! on top, about as large again). A longer answer cannot be checked: the stream is dropped
//! (the upstream call ends) and the caller gets
//! [`LlmError::invalid_output`](crate::LlmError::invalid_output) saying so, without a retry
//! (a reminder would not make the answer shorter) and counted in
//! [`TaskCounts::too_large`].
//!
//! # Counts
//!
//! [`ValidateLayer::stats`] reads, per task type (`"default"` for requests without one), how
//! many outputs failed, how many retries were sent, how many retries fixed the output and
//! how many requests gave up.
//!
//! # Readiness
//!
//! `poll_ready` delegates to the inner service. A request that needs checking moves the
//! instance that was polled ready into its future (leaving a fresh clone behind), and a
//! retry waits for that instance's readiness again before calling it. A request that fails
//! its plan (a `response_format` schema that does not compile) is answered at once without
//! calling the inner service.
//!
//! # Example
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), llm_tower::LlmError> {
//! use llm_tower::validate::{Rule, ValidateLayer};
//! use llm_tower::{ChatRequest, ChatResponse, LlmError, LlmResponse, LlmServiceBuilderExt, Message};
//! use serde_json::json;
//! use std::sync::atomic::{AtomicUsize, Ordering};
//! use std::sync::Arc;
//! use tower::{Service, ServiceBuilder, ServiceExt};
//!
//! // A model that answers in prose first, then in JSON once reminded.
//! let calls = Arc::new(AtomicUsize::new(0));
//! let llm = tower::service_fn(move |req: ChatRequest| {
//!     let n = calls.fetch_add(1, Ordering::SeqCst);
//!     async move {
//!         let text = if n == 0 { "Sure! The answer is 4." } else { r#"{"answer": 4}"# };
//!         Ok::<_, LlmError>(LlmResponse::complete(ChatResponse::from_text(req.model, text)))
//!     }
//! });
//!
//! let schema = json!({"type": "object", "required": ["answer"]});
//! let layer = ValidateLayer::new().task("extract", Rule::json_schema(&schema)?);
//! let stats = layer.stats();
//! let mut svc = ServiceBuilder::new().validate(layer).service(llm);
//!
//! let req = ChatRequest::new("m", vec![Message::user("2+2?")]).with_task_type("extract");
//! let resp = svc.ready().await?.call(req).await?;
//! assert_eq!(resp.into_complete().await?.text(), r#"{"answer": 4}"#);
//! let counts = stats.get("extract").unwrap();
//! assert_eq!((counts.failures, counts.fixed), (1, 1));
//! # Ok(()) }
//! ```

use llm_tower_core::LlmService;
use std::borrow::Cow;
use std::collections::HashMap;
use std::collections::hash_map::DefaultHasher;
use std::fmt;
use std::future::Future;
use std::hash::{Hash, Hasher};
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll, ready};

use llm_tower_core::{
    ChatRequest, ChatResponse, ChunkStream, Content, LlmError, LlmResponse, Message, PaidAttempt,
    ResponseBody, StreamAccumulator, StreamEvent, Usage,
};
use pin_project_lite::pin_project;
use serde_json::Value;
use tower::ServiceExt;
use tower_layer::Layer;
use tower_service::Service;

/// The reminder prefix for JSON rules.
const JSON_REMINDER: &str = "IMPORTANT: Output ONLY valid JSON.";
/// The reminder prefix for custom rules without their own.
const FORMAT_REMINDER: &str = "IMPORTANT: Output ONLY an answer in the required format.";
/// The reminder prefix when a tool call's arguments fail their tool's schema.
const TOOL_REMINDER: &str =
    "IMPORTANT: Call tools only with arguments that match the tool's parameters schema.";
/// How many request schemas the cache keeps before it starts over.
const SCHEMA_CACHE_CAP: usize = 1024;

/// Default [`ValidateLayer::max_stream_bytes`]: 8 MiB.
pub const DEFAULT_MAX_STREAM_BYTES: usize = 8 * 1024 * 1024;

// ===== rules =====

/// A user check of an output: `Ok(())`, or `Err(reason)` naming what is wrong (the reason is
/// shown to the model in the retry's reminder).
///
/// Implemented for every `Fn(&str) -> Result<(), String> + Send + Sync + 'static`.
///
/// ```
/// use llm_tower::validate::{Rule, ValidateOutput};
///
/// let short = |out: &str| if out.len() <= 10 { Ok(()) } else { Err(format!("{} chars, the limit is 10", out.len())) };
/// assert!(short.validate("ok").is_ok());
/// let _rule = Rule::custom(short);
/// ```
pub trait ValidateOutput: Send + Sync + 'static {
    /// Checks one output.
    fn validate(&self, output: &str) -> Result<(), String>;
}

impl<F> ValidateOutput for F
where
    F: Fn(&str) -> Result<(), String> + Send + Sync + 'static,
{
    fn validate(&self, output: &str) -> Result<(), String> {
        self(output)
    }
}

#[derive(Clone)]
enum RuleKind {
    Json,
    Schema(Arc<jsonschema::Validator>),
    Custom(Arc<dyn ValidateOutput>),
}

/// One check of an output (see the [module docs](crate::validate)).
#[derive(Clone)]
pub struct Rule {
    kind: RuleKind,
    reminder: Option<Arc<str>>,
}

impl fmt::Debug for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match &self.kind {
            RuleKind::Json => "json",
            RuleKind::Schema(_) => "json_schema",
            RuleKind::Custom(_) => "custom",
        };
        f.debug_struct("Rule")
            .field("kind", &kind)
            .field("reminder", &self.reminder)
            .finish()
    }
}

impl Rule {
    /// The output must parse as JSON.
    pub fn json() -> Self {
        Self {
            kind: RuleKind::Json,
            reminder: None,
        }
    }

    /// The output must be JSON matching `schema`, compiled now (not per call).
    ///
    /// Fails with a bad-request [`LlmError`] when the schema does not compile.
    pub fn json_schema(schema: &Value) -> Result<Self, LlmError> {
        let v = jsonschema::validator_for(schema)
            .map_err(|e| LlmError::bad_request(format!("invalid JSON Schema: {e}")))?;
        Ok(Self {
            kind: RuleKind::Schema(Arc::new(v)),
            reminder: None,
        })
    }

    /// The output must pass `check`.
    pub fn custom(check: impl ValidateOutput) -> Self {
        Self {
            kind: RuleKind::Custom(Arc::new(check)),
            reminder: None,
        }
    }

    /// The first sentence of the retry's reminder (the reason follows it). Defaults:
    /// `IMPORTANT: Output ONLY valid JSON.` for JSON rules, a generic format reminder for
    /// custom ones.
    #[must_use]
    pub fn with_reminder(mut self, reminder: impl Into<Arc<str>>) -> Self {
        self.reminder = Some(reminder.into());
        self
    }

    /// Checks one output: `Err(reason)` when it fails.
    pub fn check(&self, output: &str) -> Result<(), String> {
        match &self.kind {
            RuleKind::Json => serde_json::from_str::<serde::de::IgnoredAny>(output)
                .map(drop)
                .map_err(|e| format!("the output is not valid JSON ({e})")),
            RuleKind::Schema(v) => {
                let value: Value = serde_json::from_str(output)
                    .map_err(|e| format!("the output is not valid JSON ({e})"))?;
                let errors: Vec<String> = v
                    .iter_errors(&value)
                    .take(3)
                    .map(|e| {
                        let path = e.instance_path().to_string();
                        if path.is_empty() {
                            e.to_string()
                        } else {
                            format!("at {path}: {e}")
                        }
                    })
                    .collect();
                if errors.is_empty() {
                    Ok(())
                } else {
                    Err(format!(
                        "the output does not match the JSON Schema: {}",
                        errors.join("; ")
                    ))
                }
            }
            RuleKind::Custom(f) => f.validate(output),
        }
    }

    fn reminder(&self) -> &str {
        match (&self.reminder, &self.kind) {
            (Some(r), _) => r,
            (None, RuleKind::Json | RuleKind::Schema(_)) => JSON_REMINDER,
            (None, RuleKind::Custom(_)) => FORMAT_REMINDER,
        }
    }
}

// ===== counts =====

/// Validation counts of one task type.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TaskCounts {
    /// Outputs that failed validation (first tries and retries).
    pub failures: u64,
    /// Retries sent with a format reminder.
    pub retries: u64,
    /// Retries whose output then passed.
    pub fixed: u64,
    /// Requests that still failed after the last retry (answered with invalid output).
    pub exhausted: u64,
    /// Streamed answers larger than [`ValidateLayer::max_stream_bytes`], refused unchecked.
    pub too_large: u64,
}

/// Compiled request schemas by hash of the schema (each with the schema, for collisions).
type SchemaCache = HashMap<u64, Vec<(Value, Arc<jsonschema::Validator>)>>;

#[derive(Default)]
struct Shared {
    counts: Mutex<HashMap<Arc<str>, TaskCounts>>,
    schemas: Mutex<SchemaCache>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Counters and a cache: still right after a panic elsewhere.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Shared {
    fn count(&self, task: &Arc<str>, f: impl FnOnce(&mut TaskCounts)) {
        let mut map = lock(&self.counts);
        match map.get_mut(task) {
            Some(c) => f(c),
            None => f(map.entry(task.clone()).or_default()),
        }
    }

    /// The compiled validator of a request's schema, from the cache when seen before.
    fn request_schema(&self, schema: &Value) -> Result<Arc<jsonschema::Validator>, LlmError> {
        self.compiled(schema).map_err(|e| {
            LlmError::bad_request(format!(
                "response_format.json_schema.schema is not a valid JSON Schema: {e}"
            ))
            .with_param("response_format")
        })
    }

    /// The compiled validators of the request's tools that have a parameter schema; a
    /// schema that does not compile is left unchecked (the upstream judges the request).
    fn tool_schemas(&self, req: &ChatRequest) -> Vec<(Box<str>, Arc<jsonschema::Validator>)> {
        let Some(tools) = &req.tools else {
            return Vec::new();
        };
        tools
            .iter()
            .filter_map(|t| {
                let f = t.function.as_ref()?;
                let schema = f.parameters.as_ref()?;
                match self.compiled(schema) {
                    Ok(v) => Some((f.name.as_str().into(), v)),
                    Err(e) => {
                        tracing::debug!(target: "llm_tower::validate", tool = %f.name, error = %e, "tool parameters schema does not compile; not checked");
                        None
                    }
                }
            })
            .collect()
    }

    fn compiled(&self, schema: &Value) -> Result<Arc<jsonschema::Validator>, String> {
        let mut h = DefaultHasher::new();
        // Map order is deterministic (serde_json's default map is sorted).
        schema.to_string().hash(&mut h);
        let key = h.finish();
        if let Some(list) = lock(&self.schemas).get(&key)
            && let Some((_, v)) = list.iter().find(|(s, _)| s == schema)
        {
            return Ok(v.clone());
        }
        // Compile outside the lock: a big schema must not stall other requests.
        let v = jsonschema::validator_for(schema).map_err(|e| e.to_string())?;
        let v = Arc::new(v);
        let mut map = lock(&self.schemas);
        if map.len() >= SCHEMA_CACHE_CAP {
            map.clear();
        }
        map.entry(key)
            .or_default()
            .push((schema.clone(), v.clone()));
        Ok(v)
    }
}

/// A handle on a layer's validation counts (cheap to clone), for metrics.
#[derive(Clone)]
pub struct ValidateStats(Arc<Shared>);

impl fmt::Debug for ValidateStats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map().entries(self.snapshot()).finish()
    }
}

impl ValidateStats {
    /// The counts of every task type seen so far, sorted by task type.
    pub fn snapshot(&self) -> Vec<(Arc<str>, TaskCounts)> {
        let mut v: Vec<_> = lock(&self.0.counts)
            .iter()
            .map(|(k, c)| (k.clone(), *c))
            .collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    /// The counts of one task type (`"default"` for requests without one).
    pub fn get(&self, task: &str) -> Option<TaskCounts> {
        lock(&self.0.counts).get(task).copied()
    }
}

// ===== impl ValidateLayer =====

#[derive(Clone)]
struct Config {
    tasks: HashMap<Arc<str>, Vec<Rule>>,
    default: Vec<Rule>,
    response_format: bool,
    tool_arguments: bool,
    retries: u32,
    max_stream_bytes: usize,
}

/// Validates the outputs of the wrapped service (see the [module docs](crate::validate)).
///
/// # Clone
///
/// Clones (and every service built from the layer) share the counts and the schema cache.
#[derive(Clone)]
pub struct ValidateLayer {
    config: Arc<Config>,
    shared: Arc<Shared>,
}

impl fmt::Debug for ValidateLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ValidateLayer")
            .field("tasks", &self.config.tasks)
            .field("default", &self.config.default)
            .field("response_format", &self.config.response_format)
            .field("tool_arguments", &self.config.tool_arguments)
            .field("retries", &self.config.retries)
            .field("max_stream_bytes", &self.config.max_stream_bytes)
            .finish()
    }
}

impl Default for ValidateLayer {
    fn default() -> Self {
        Self::new()
    }
}

impl ValidateLayer {
    /// No rules yet; the request's `response_format` and tool schemas are honoured; one
    /// retry; streams buffered up to 8 MiB.
    pub fn new() -> Self {
        Self {
            config: Arc::new(Config {
                tasks: HashMap::new(),
                default: Vec::new(),
                response_format: true,
                tool_arguments: true,
                retries: 1,
                max_stream_bytes: DEFAULT_MAX_STREAM_BYTES,
            }),
            shared: Arc::default(),
        }
    }

    /// Adds `rule` for requests of task type `task` (rules of a task all apply, in order).
    #[must_use]
    pub fn task(mut self, task: impl Into<Arc<str>>, rule: Rule) -> Self {
        Arc::make_mut(&mut self.config)
            .tasks
            .entry(task.into())
            .or_default()
            .push(rule);
        self
    }

    /// Adds `rule` for requests whose task type has no rules (or that have no task type).
    #[must_use]
    pub fn default_rule(mut self, rule: Rule) -> Self {
        Arc::make_mut(&mut self.config).default.push(rule);
        self
    }

    /// Whether a request's `response_format` (`json_schema`, `json_object`) is checked too
    /// (default: yes).
    #[must_use]
    pub fn use_response_format(mut self, yes: bool) -> Self {
        Arc::make_mut(&mut self.config).response_format = yes;
        self
    }

    /// Whether tool calls' arguments are checked against the called tool's parameter
    /// schema from the request (default: yes).
    #[must_use]
    pub fn check_tool_arguments(mut self, yes: bool) -> Self {
        Arc::make_mut(&mut self.config).tool_arguments = yes;
        self
    }

    /// The most memory a streamed answer's chunks may take while buffered for checking
    /// (default [`DEFAULT_MAX_STREAM_BYTES`], 8 MiB). A longer answer fails with
    /// [`ErrorKind::InvalidOutput`](crate::ErrorKind::InvalidOutput), unchecked and not
    /// retried (see the [module docs](crate::validate)).
    #[must_use]
    pub fn max_stream_bytes(mut self, bytes: usize) -> Self {
        Arc::make_mut(&mut self.config).max_stream_bytes = bytes;
        self
    }

    /// How many retries with a reminder before giving up (default 1; 0 never retries).
    #[must_use]
    pub fn retries(mut self, retries: u32) -> Self {
        Arc::make_mut(&mut self.config).retries = retries;
        self
    }

    /// The counts of every service built from this layer.
    pub fn stats(&self) -> ValidateStats {
        ValidateStats(self.shared.clone())
    }
}

impl<S> Layer<S> for ValidateLayer {
    type Service = Validate<S>;

    fn layer(&self, inner: S) -> Validate<S> {
        Validate {
            inner,
            config: self.config.clone(),
            shared: self.shared.clone(),
        }
    }
}

// ===== impl Validate =====

/// The validating service (see the [module docs](crate::validate)).
pub struct Validate<S> {
    inner: S,
    config: Arc<Config>,
    shared: Arc<Shared>,
}

impl<S: Clone> Clone for Validate<S> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            config: self.config.clone(),
            shared: self.shared.clone(),
        }
    }
}

impl<S: fmt::Debug> fmt::Debug for Validate<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Validate")
            .field("inner", &self.inner)
            .field("retries", &self.config.retries)
            .finish_non_exhaustive()
    }
}

impl<S> Validate<S> {
    /// Wraps `inner` with `layer`'s rules (same as `layer.layer(inner)`).
    pub fn new(inner: S, layer: &ValidateLayer) -> Self {
        layer.layer(inner)
    }

    /// The counts (shared with the layer this service came from).
    pub fn stats(&self) -> ValidateStats {
        ValidateStats(self.shared.clone())
    }

    inner_service_accessors!();

    /// The rules that apply to `req`, or `None` when none does.
    fn plan(&self, req: &ChatRequest) -> Result<Option<Plan>, LlmError> {
        // Validators check a model's text; an embedding has none.
        if req.as_embeddings().is_some() {
            return Ok(None);
        }
        let task = req.task_type().map(|t| &t.0);
        let task_rules = task.and_then(|t| self.config.tasks.get(t));
        let mut extra = None;
        if self.config.response_format
            && let Some(rf) = &req.response_format
        {
            match rf.kind.as_str() {
                "json_schema" => {
                    let schema = rf.json_schema.as_ref().and_then(|j| j.schema.as_ref());
                    extra = Some(match schema {
                        Some(s) => Rule {
                            kind: RuleKind::Schema(self.shared.request_schema(s)?),
                            reminder: None,
                        },
                        None => Rule::json(),
                    });
                }
                "json_object" => extra = Some(Rule::json()),
                _ => {}
            }
        }
        let (task_key, has_rules) = match task_rules {
            Some(r) => (task.cloned(), !r.is_empty()),
            None => (None, !self.config.default.is_empty()),
        };
        let tools = if self.config.tool_arguments {
            self.shared.tool_schemas(req)
        } else {
            Vec::new()
        };
        if !has_rules && extra.is_none() && tools.is_empty() {
            return Ok(None);
        }
        Ok(Some(Plan {
            config: self.config.clone(),
            task_key,
            extra,
            tools,
            label: task.cloned().unwrap_or_else(|| Arc::from("default")),
        }))
    }
}

struct Plan {
    config: Arc<Config>,
    /// The task whose rules apply (`None`: the default rules).
    task_key: Option<Arc<str>>,
    /// The request's own `response_format` rule.
    extra: Option<Rule>,
    /// The parameter schemas of the request's tools, by tool name.
    tools: Vec<(Box<str>, Arc<jsonschema::Validator>)>,
    /// The task type the counts go to.
    label: Arc<str>,
}

impl Plan {
    fn rules(&self) -> impl Iterator<Item = &Rule> {
        let base = match &self.task_key {
            Some(t) => self.config.tasks.get(t).map_or(&[][..], Vec::as_slice),
            None => &self.config.default[..],
        };
        base.iter().chain(self.extra.as_ref())
    }

    /// The first failure among the outputs: (the reminder, the reason, the output).
    fn check(&self, resp: &ChatResponse) -> Result<(), (String, String, String)> {
        for out in outputs(resp) {
            match out {
                Output::Text(text) => {
                    for rule in self.rules() {
                        if let Err(reason) = rule.check(&text) {
                            return Err((rule.reminder().to_owned(), reason, text.into_owned()));
                        }
                    }
                }
                Output::ToolCall(name, args) => {
                    let Some((_, v)) = self.tools.iter().find(|(n, _)| **n == *name) else {
                        continue;
                    };
                    let rule = Rule {
                        kind: RuleKind::Schema(v.clone()),
                        reminder: None,
                    };
                    if let Err(reason) = rule.check(args) {
                        let reason = format!(
                            "the arguments of the call to tool `{name}` are wrong: {reason}"
                        );
                        return Err((TOOL_REMINDER.to_owned(), reason, args.to_owned()));
                    }
                }
            }
        }
        Ok(())
    }
}

/// One thing checked in an answer.
#[derive(Debug, PartialEq)]
enum Output<'a> {
    /// A choice's text, checked against the rules.
    Text(Cow<'a, str>),
    /// A tool call (tool name, arguments), checked against the tool's parameter schema.
    ToolCall(&'a str, &'a str),
}

/// What is checked: each choice's text, or, for a choice with tool calls and no text, each
/// call. Borrowed where possible: this runs on every validated response.
fn outputs(resp: &ChatResponse) -> Vec<Output<'_>> {
    if resp.choices.is_empty() {
        return vec![Output::Text(Cow::Borrowed(""))];
    }
    let mut out = Vec::with_capacity(resp.choices.len());
    for c in &resp.choices {
        let text = match c.message.content() {
            None => Cow::Borrowed(""),
            Some(Content::Text(t)) => Cow::Borrowed(t.as_str()),
            Some(other) => Cow::Owned(other.text()),
        };
        match &c.message.tool_calls {
            Some(calls) if text.is_empty() && !calls.is_empty() => {
                out.extend(calls.iter().map(|t| {
                    Output::ToolCall(t.function.name.as_str(), t.function.arguments.as_str())
                }));
            }
            _ => out.push(Output::Text(text)),
        }
    }
    out
}

impl<S> Service<ChatRequest> for Validate<S>
where
    S: LlmService + Clone + Send + 'static,
    S::Future: Send + 'static,
{
    type Response = LlmResponse;
    type Error = LlmError;
    type Future = ResponseFuture<S, S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), LlmError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: ChatRequest) -> Self::Future {
        let plan = match self.plan(&req) {
            Err(e) => {
                return ResponseFuture {
                    kind: Kind::Failed { error: Some(e) },
                };
            }
            Ok(None) => {
                return ResponseFuture {
                    kind: Kind::Passthrough {
                        fut: self.inner.call(req),
                    },
                };
            }
            Ok(Some(plan)) => plan,
        };
        let retry_req = (plan.config.retries > 0).then(|| req.clone());
        // The retry needs the service inside the future: take the instance that was polled
        // ready and leave a fresh clone behind.
        let fresh = self.inner.clone();
        let mut svc = std::mem::replace(&mut self.inner, fresh);
        let fut = svc.call(req);
        ResponseFuture {
            kind: Kind::First {
                fut,
                ctx: Some(RetryCtx {
                    svc,
                    retry_req,
                    plan,
                    shared: self.shared.clone(),
                }),
            },
        }
    }
}

/// What the slow path needs: the service to call again, the request to retry, the rules.
struct RetryCtx<S> {
    svc: S,
    retry_req: Option<ChatRequest>,
    plan: Plan,
    shared: Arc<Shared>,
}

/// The slow path, from the first response on: assemble a stream, check, retry with a
/// reminder while retries are left.
async fn run<S>(first: LlmResponse, ctx: RetryCtx<S>) -> Result<LlmResponse, LlmError>
where
    S: LlmService,
{
    let RetryCtx {
        mut svc,
        mut retry_req,
        plan,
        shared,
    } = ctx;
    let retries = plan.config.retries;
    let mut attempt = 0;
    let mut next = first;
    // Attempts paid for and discarded (rejected answers, and what the inner service
    // reported as such), for the accounting layers above.
    let mut paid: Vec<PaidAttempt> = Vec::new();
    loop {
        paid.append(&mut next.meta.paid_attempts);
        let model = next.meta.model.clone();
        let (mut resp, assembled) = match assemble(next, plan.config.max_stream_bytes).await {
            Ok(done) => done,
            Err((Assemble::Failed(e), usage)) => {
                let e = match usage {
                    Some(u) if e.usage().is_none() => e.with_usage(model, u),
                    _ => e,
                };
                return Err(e.with_paid_attempts(paid));
            }
            Err((Assemble::TooLarge, usage)) => {
                shared.count(&plan.label, |c| c.too_large += 1);
                let max = plan.config.max_stream_bytes;
                let e = LlmError::invalid_output(
                    format!(
                        "the streamed answer is larger than the validation buffer ({max} bytes) and cannot be validated"
                    ),
                    "",
                )
                .with_paid_attempts(paid);
                return Err(match usage {
                    Some(u) => e.with_usage(model, u),
                    None => e,
                });
            }
        };
        let checked = match (&resp.body, &assembled) {
            (_, Some(a)) => a,
            (ResponseBody::Complete(r), None) => r,
            (ResponseBody::Embeddings(_), None) => {
                resp.meta.paid_attempts = paid;
                return Ok(resp);
            }
            (ResponseBody::Encoded(_) | ResponseBody::Stream(_), None) => {
                return Err(LlmError::internal(
                    "validate: a streamed or encoded body was not assembled",
                ));
            }
        };
        let failure = plan.check(checked).err();
        let usage = resp.meta.usage.clone().or_else(|| checked.usage.clone());
        let Some((reminder, reason, output)) = failure else {
            if attempt > 0 {
                shared.count(&plan.label, |c| c.fixed += 1);
            }
            resp.meta.paid_attempts = paid;
            return Ok(resp);
        };
        shared.count(&plan.label, |c| c.failures += 1);
        tracing::debug!(target: "llm_tower::validate", task = %plan.label, %reason, attempt, "output failed validation");
        if attempt >= retries || retry_req.is_none() {
            shared.count(&plan.label, |c| c.exhausted += 1);
            let tries = attempt + 1;
            let e = LlmError::invalid_output(
                format!("the model's output failed validation after {tries} tries: {reason}"),
                output,
            )
            .with_paid_attempts(paid);
            // The rejected answer was paid for: the error carries its usage.
            return Err(match usage {
                Some(u) => e.with_usage(resp.meta.model.take(), u),
                None => e,
            });
        }
        // The rejected answer was paid for, though it is discarded.
        if let Some(u) = usage {
            paid.push(PaidAttempt::new(resp.meta.model.take(), u));
        }
        attempt += 1;
        shared.count(&plan.label, |c| c.retries += 1);
        // The last retry takes the saved request; earlier ones copy it.
        let saved = if attempt >= retries {
            retry_req.take()
        } else {
            retry_req.clone()
        };
        let Some(mut req) = saved else {
            return Err(LlmError::internal("validate: the retry request is gone"));
        };
        req.messages.push(Message::user(format!(
            "{reminder} The previous answer failed because: {reason}"
        )));
        crate::emit(
            &req,
            crate::ObserveEvent::ValidationRetry {
                attempt,
                rule: &plan.label,
            },
        );
        let called = match svc.ready().await {
            Ok(s) => s.call(req).await,
            Err(e) => Err(e),
        };
        next = match called {
            Ok(next) => next,
            Err(e) => return Err(e.with_paid_attempts(paid)),
        };
    }
}

/// Why a response could not be assembled (with the usage seen before, if any).
enum Assemble {
    Failed(LlmError),
    /// A stream's chunks outgrew the buffer limit.
    TooLarge,
}

/// A stream is drained (up to `max_bytes` of chunks in memory), assembled (returned) and
/// replaced by a replay of its chunks; an encoded response is decoded (returned) and kept;
/// a complete response is returned as is.
async fn assemble(
    resp: LlmResponse,
    max_bytes: usize,
) -> Result<(LlmResponse, Option<ChatResponse>), (Assemble, Option<Usage>)> {
    match resp.body {
        ResponseBody::Complete(_) | ResponseBody::Embeddings(_) => Ok((resp, None)),
        ResponseBody::Encoded(ref r) => match r.decode() {
            Ok(decoded) => Ok((resp, Some(decoded))),
            // The upstream answered (and may have said what it used): paid all the same.
            Err(e) => Err((Assemble::Failed(e), r.usage().cloned())),
        },
        ResponseBody::Stream(mut stream) => {
            let mut acc = StreamAccumulator::default();
            // The events are replayed as they came (encoded ones are forwarded as sent);
            // each is decoded once, for the check.
            let mut events: Vec<StreamEvent> = Vec::new();
            let mut held = 0usize;
            while let Some(item) = stream.next_event().await {
                let event = match item {
                    Ok(e) => e,
                    Err(e) => return Err((Assemble::Failed(e), stream.usage().cloned())),
                };
                held = held.saturating_add(crate::mem::event(&event));
                if held > max_bytes {
                    // Dropping the stream ends the upstream call; nothing more is read.
                    return Err((Assemble::TooLarge, stream.usage().cloned()));
                }
                match &event {
                    StreamEvent::Chunk(c) => acc.push(c),
                    other => match other.clone().into_chunk() {
                        Ok(c) => acc.push(&c),
                        Err(e) => return Err((Assemble::Failed(e), stream.usage().cloned())),
                    },
                }
                events.push(event);
            }
            let replay =
                ChunkStream::from_events(futures_util::stream::iter(events.into_iter().map(Ok)));
            let mut meta = resp.meta;
            if meta.usage.is_none() {
                meta.usage = stream.usage().cloned();
            }
            Ok((
                LlmResponse {
                    body: ResponseBody::Stream(replay),
                    meta,
                },
                Some(acc.finish()),
            ))
        }
    }
}

// ===== impl ResponseFuture =====

type BoxRun = Pin<Box<dyn Future<Output = Result<LlmResponse, LlmError>> + Send>>;

pin_project! {
    #[project = KindProj]
    enum Kind<S, F> {
        // No rule applies: the inner future, untouched.
        Passthrough { #[pin] fut: F },
        // The first call. A complete response that passes is returned from here without
        // any allocation; a stream or a failure moves on to `Validating`.
        First { #[pin] fut: F, ctx: Option<RetryCtx<S>> },
        // The slow path (boxed: it awaits the inner service more than once).
        Validating { fut: BoxRun },
        // Refused before any call (a request schema that does not compile).
        Failed { error: Option<LlmError> },
    }
}

pin_project! {
    /// The response future of [`Validate`].
    pub struct ResponseFuture<S, F> {
        #[pin]
        kind: Kind<S, F>,
    }
}

impl<S, F> fmt::Debug for ResponseFuture<S, F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match &self.kind {
            Kind::Passthrough { .. } => "passthrough",
            Kind::First { .. } => "first",
            Kind::Validating { .. } => "validating",
            Kind::Failed { .. } => "failed",
        };
        f.debug_struct("ResponseFuture")
            .field("kind", &kind)
            .finish()
    }
}

impl<S, F> Future for ResponseFuture<S, F>
where
    S: Service<ChatRequest, Response = LlmResponse, Error = LlmError, Future = F> + Send + 'static,
    F: Future<Output = Result<LlmResponse, LlmError>> + Send + 'static,
{
    type Output = Result<LlmResponse, LlmError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        loop {
            let slow = match self.as_mut().project().kind.project() {
                KindProj::Passthrough { fut } => return fut.poll(cx),
                KindProj::Validating { fut } => return fut.as_mut().poll(cx),
                KindProj::Failed { error } => {
                    return Poll::Ready(Err(error.take().unwrap_or_else(|| {
                        LlmError::internal("validate future polled after completion")
                    })));
                }
                KindProj::First { fut, ctx } => {
                    let resp = match ready!(fut.poll(cx)) {
                        Ok(resp) => resp,
                        Err(e) => return Poll::Ready(Err(e)),
                    };
                    let Some(c) = ctx.take() else {
                        return Poll::Ready(Err(LlmError::internal(
                            "validate future polled after completion",
                        )));
                    };
                    // Anything else (a stream, an encoded body) is checked once assembled.
                    if let ResponseBody::Complete(r) = &resp.body
                        && c.plan.check(r).is_ok()
                    {
                        return Poll::Ready(Ok(resp));
                    }
                    Box::pin(run(resp, c)) as BoxRun
                }
            };
            self.as_mut()
                .project()
                .kind
                .set(Kind::Validating { fut: slow });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn request_schemas_are_compiled_once_and_keyed_by_content() {
        let shared = Shared::default();
        let a = json!({"type": "object", "required": ["x"]});
        let b = json!({"type": "array"});
        let v1 = shared.request_schema(&a).unwrap();
        // An equal schema built separately (a different allocation) hits the same entry.
        let same = json!({"required": ["x"], "type": "object"});
        let v2 = shared.request_schema(&same).unwrap();
        assert!(Arc::ptr_eq(&v1, &v2), "the second lookup is a cache hit");
        let v3 = shared.request_schema(&b).unwrap();
        assert!(!Arc::ptr_eq(&v1, &v3));
        assert_eq!(lock(&shared.schemas).len(), 2);
    }

    #[test]
    fn tool_call_arguments_are_checked_when_there_is_no_text() {
        let mut resp = ChatResponse::from_text("m", "");
        resp.choices[0].message.tool_calls = Some(vec![llm_tower_core::ToolCall {
            id: "c1".into(),
            kind: "function".into(),
            function: llm_tower_core::FunctionCall {
                name: "f".into(),
                arguments: r#"{"a": 1}"#.into(),
                extra: Default::default(),
            },
            extra: Default::default(),
        }]);
        assert_eq!(outputs(&resp), vec![Output::ToolCall("f", r#"{"a": 1}"#)]);
    }
}
