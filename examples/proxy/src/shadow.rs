//! Shadow traffic per task type: a sampled copy of live requests of a task goes to a
//! candidate chain **after** the client's answer is complete, and the candidate's answer is
//! validated and compared with the served one.
//!
//! # Guarantees
//!
//! - The client's answer is never delayed or changed: the copy is sent from a task of its
//!   own, started by the completion hook ([`LlmResponse::on_finish`]) once the served answer
//!   completed (a complete body: when the stack returned it; a stream: at its last chunk).
//!   A served answer that fails or that the client drops is not shadowed.
//! - Bounded: at most `max_in_flight` shadow calls of a task at once, each cut after
//!   its timeout; a copy that finds no free slot is dropped and counted.
//! - Apart: the layer sits above the served stack's rate limits, budgets and cache, and the
//!   copy goes straight to the candidate chain, so it touches none of them. The
//!   candidate's cost is priced from its usage and counted in the shadow series only,
//!   capped by the task's own daily budget (checked before each copy, so it is exceeded by
//!   at most the calls in flight at that moment).
//! - Labels and keys are the configuration's task and candidate names only.
//!
//! The layer is meant to wrap the whole stack (outermost), so the served answer it
//! compares is the one the client gets.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures_util::StreamExt;
use llm_tower::NanoUsd;
use llm_tower::cost::PriceTable;
use llm_tower::validate::Rule;
use llm_tower::{BoxLlmService, ChatRequest, LlmError, LlmResponse, LlmService, ResponseBody};
use serde_json::{Value, json};
use tokio::sync::Semaphore;
use tower::{Layer, Service, ServiceExt};

use crate::compare::compare;

/// The longest served or candidate answer kept for comparison; a longer served stream is
/// not shadowed (counted as `skipped`).
pub const MAX_COMPARED_BYTES: usize = 1024 * 1024;

/// One task's shadow: which candidate gets its copies, how often, and within what.
#[derive(Clone)]
pub struct ShadowTarget {
    task: Arc<str>,
    candidate: Arc<str>,
    service: BoxLlmService,
    model: Option<String>,
    rate_ppm: u64,
    budget: Option<NanoUsd>,
    validator: Option<Rule>,
    timeout: Duration,
    max_in_flight: usize,
    seed: Option<u64>,
}

impl fmt::Debug for ShadowTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ShadowTarget")
            .field("task", &self.task)
            .field("candidate", &self.candidate)
            .field("model", &self.model)
            .field("rate_ppm", &self.rate_ppm)
            .field("budget", &self.budget)
            .field("timeout", &self.timeout)
            .field("max_in_flight", &self.max_in_flight)
            .finish_non_exhaustive()
    }
}

impl ShadowTarget {
    /// Copies of `task`'s requests go to `service`, reported as `candidate`. Defaults:
    /// sample rate 0.05, no budget, no validator, a 60 s timeout, 4 calls in flight, the
    /// request's model.
    pub fn new(
        task: impl Into<Arc<str>>,
        candidate: impl Into<Arc<str>>,
        service: BoxLlmService,
    ) -> Self {
        Self {
            task: task.into(),
            candidate: candidate.into(),
            service,
            model: None,
            rate_ppm: 50_000,
            budget: None,
            validator: None,
            timeout: Duration::from_secs(60),
            max_in_flight: 4,
            seed: None,
        }
    }

    /// Seeds this task's sampler (default: the layer's [`seed`](ShadowLayer::seed)).
    #[must_use]
    pub fn seed(mut self, seed: u64) -> Self {
        self.seed = Some(seed);
        self
    }

    /// The cap on this task's shadow calls in flight; a copy finding none free is dropped
    /// (counted in `dropped_full`).
    #[must_use]
    pub fn max_in_flight(mut self, n: usize) -> Self {
        self.max_in_flight = n;
        self
    }

    /// The share of the task's requests copied (0 to 1).
    #[must_use]
    pub fn sample_rate(mut self, rate: f64) -> Self {
        let r = if rate.is_nan() {
            0.0
        } else {
            rate.clamp(0.0, 1.0)
        };
        // Clamped first: the cast cannot overflow.
        self.rate_ppm = (r * 1e6).round() as u64;
        self
    }

    /// The candidate's spend cap per UTC day, in nano-dollars.
    #[must_use]
    pub fn budget(mut self, nano: NanoUsd) -> Self {
        self.budget = Some(nano);
        self
    }

    /// The check both answers get (the task's validator).
    #[must_use]
    pub fn validator(mut self, rule: Rule) -> Self {
        self.validator = Some(rule);
        self
    }

    /// The model the copy asks for (default: the client's).
    #[must_use]
    pub fn model(mut self, model: impl Into<String>) -> Self {
        self.model = Some(model.into());
        self
    }

    /// How long a shadow call may take before it is cut (and counted as an error).
    #[must_use]
    pub fn timeout(mut self, d: Duration) -> Self {
        self.timeout = d;
        self
    }
}

/// Counters of one task's shadow (one candidate).
#[derive(Debug, Default)]
pub struct ShadowCounters {
    /// Requests of the task seen.
    pub requests: AtomicU64,
    /// Requests picked by the sampler.
    pub sampled: AtomicU64,
    /// Sampled, but the served answer did not complete (failed, dropped, too long, not text).
    pub skipped: AtomicU64,
    /// Copies dropped: every shadow slot was busy.
    pub dropped_full: AtomicU64,
    /// Copies dropped: the candidate's budget was spent.
    pub dropped_budget: AtomicU64,
    /// Copies sent to the candidate.
    pub started: AtomicU64,
    /// Candidate calls that failed or timed out.
    pub errors: AtomicU64,
    /// Candidate answers received.
    pub completed: AtomicU64,
    /// Candidate answers that passed the validator.
    pub valid: AtomicU64,
    /// Candidate answers that failed the validator.
    pub invalid: AtomicU64,
    /// Served answers (of shadowed requests) that passed the validator.
    pub served_valid: AtomicU64,
    /// Candidate answers byte-equal to the served one.
    pub exact: AtomicU64,
    /// Candidate answers equal to the served one after normalising.
    pub normalised: AtomicU64,
    /// JSON leaf fields equal in both answers.
    pub fields_agree: AtomicU64,
    /// JSON leaf fields compared.
    pub fields_total: AtomicU64,
    /// The candidate's cost, in nano-dollars.
    pub cost_nano: AtomicU64,
    /// Prompt tokens the candidate used.
    pub prompt_tokens: AtomicU64,
    /// Completion tokens the candidate used.
    pub completion_tokens: AtomicU64,
    day_spent: Mutex<(u64, NanoUsd)>,
}

impl ShadowCounters {
    fn get(c: &AtomicU64) -> u64 {
        c.load(Ordering::Relaxed)
    }

    fn add(c: &AtomicU64, n: u64) {
        c.fetch_add(n, Ordering::Relaxed);
    }

    /// The counters as JSON (for `/status`).
    pub fn to_json(&self) -> Value {
        let g = Self::get;
        let completed = g(&self.completed);
        let ratio = |n: u64, d: u64| {
            if d == 0 {
                Value::Null
            } else {
                json!(n as f64 / d as f64)
            }
        };
        json!({
            "requests": g(&self.requests),
            "sampled": g(&self.sampled),
            "skipped": g(&self.skipped),
            "dropped_full": g(&self.dropped_full),
            "dropped_budget": g(&self.dropped_budget),
            "started": g(&self.started),
            "errors": g(&self.errors),
            "completed": completed,
            "valid": g(&self.valid),
            "invalid": g(&self.invalid),
            "served_valid": g(&self.served_valid),
            "valid_ratio": ratio(g(&self.valid), g(&self.valid) + g(&self.invalid)),
            "exact": g(&self.exact),
            "normalised": g(&self.normalised),
            "match_ratio": ratio(g(&self.normalised), completed),
            "fields_agree": g(&self.fields_agree),
            "fields_total": g(&self.fields_total),
            "field_agreement": ratio(g(&self.fields_agree), g(&self.fields_total)),
            "cost_usd": g(&self.cost_nano) as f64 / 1e9,
            "prompt_tokens": g(&self.prompt_tokens),
            "completion_tokens": g(&self.completion_tokens),
        })
    }

    /// Spend of the current UTC day; with `add`, adds to it first.
    fn day_spend(&self, add: NanoUsd) -> NanoUsd {
        let day = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() / 86_400);
        let mut s = self
            .day_spent
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if s.0 != day {
            *s = (day, 0);
        }
        s.1 = s.1.saturating_add(add);
        s.1
    }
}

/// Every shadow's counters, by task and candidate (cheap to clone).
#[derive(Clone, Default, Debug)]
pub struct ShadowStats(Arc<[TaskCounters]>);

/// A task, its candidate and their counters.
type TaskCounters = (Arc<str>, Arc<str>, Arc<ShadowCounters>);

impl ShadowStats {
    /// The counters of `task`'s shadow.
    pub fn get(&self, task: &str) -> Option<&ShadowCounters> {
        self.0
            .iter()
            .find(|(t, _, _)| &**t == task)
            .map(|(_, _, c)| &**c)
    }

    /// `{task: {"candidate": …, counters…}}` for `/status`.
    pub fn to_json(&self) -> Value {
        let mut m = serde_json::Map::new();
        for (task, cand, c) in self.0.iter() {
            let mut v = c.to_json();
            if let Value::Object(o) = &mut v {
                o.insert("candidate".into(), json!(&**cand));
            }
            m.insert(task.to_string(), v);
        }
        Value::Object(m)
    }

    /// Registers the counters with `metrics` (read at scrape time), labelled by task and
    /// candidate.
    pub fn register(&self, metrics: &llm_tower_axum::Metrics) {
        type Read = fn(&ShadowCounters) -> u64;
        let series: [(&'static str, &'static str, Read); 10] = [
            (
                "llm_shadow_sampled_total",
                "Requests copied to a shadow candidate",
                |c| ShadowCounters::get(&c.sampled),
            ),
            (
                "llm_shadow_dropped_total",
                "Shadow copies dropped (no free slot, or the shadow budget spent)",
                |c| ShadowCounters::get(&c.dropped_full) + ShadowCounters::get(&c.dropped_budget),
            ),
            (
                "llm_shadow_calls_total",
                "Shadow calls sent to the candidate",
                |c| ShadowCounters::get(&c.started),
            ),
            (
                "llm_shadow_errors_total",
                "Shadow calls that failed or timed out",
                |c| ShadowCounters::get(&c.errors),
            ),
            (
                "llm_shadow_valid_total",
                "Shadow answers that passed the task's validator",
                |c| ShadowCounters::get(&c.valid),
            ),
            (
                "llm_shadow_invalid_total",
                "Shadow answers that failed the task's validator",
                |c| ShadowCounters::get(&c.invalid),
            ),
            (
                "llm_shadow_match_total",
                "Shadow answers equal to the served one after normalising",
                |c| ShadowCounters::get(&c.normalised),
            ),
            (
                "llm_shadow_fields_agree_total",
                "JSON fields equal in the shadow and served answers",
                |c| ShadowCounters::get(&c.fields_agree),
            ),
            (
                "llm_shadow_fields_total",
                "JSON fields compared between shadow and served answers",
                |c| ShadowCounters::get(&c.fields_total),
            ),
            (
                "llm_shadow_cost_nano_usd_total",
                "Cost of shadow calls in nano-dollars (not in the served cost)",
                |c| ShadowCounters::get(&c.cost_nano),
            ),
        ];
        for (task, cand, c) in self.0.iter() {
            for (name, help, read) in series {
                let c = c.clone();
                metrics.counter_at_scrape(
                    name,
                    help,
                    &[("task", task.to_string()), ("candidate", cand.to_string())],
                    move || read(&c),
                );
            }
        }
    }
}

/// A sampler over a seeded sequence: the `n`-th request is picked when
/// `splitmix64(seed + n) mod 10⁶ < rate in ppm`, so a fixed seed picks the same requests.
#[derive(Debug)]
struct Sampler {
    seed: u64,
    n: AtomicU64,
}

impl Sampler {
    fn pick(&self, ppm: u64) -> bool {
        if ppm == 0 {
            return false;
        }
        if ppm >= 1_000_000 {
            return true;
        }
        let n = self.n.fetch_add(1, Ordering::Relaxed);
        let mut z = self
            .seed
            .wrapping_add(n.wrapping_mul(0x9e37_79b9_7f4a_7c15));
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        z % 1_000_000 < ppm
    }
}

struct Shared {
    targets: Vec<(ShadowTarget, Arc<ShadowCounters>)>,
    slots: Vec<Arc<Semaphore>>,
    samplers: Vec<Sampler>,
    prices: PriceTable,
    stats: ShadowStats,
}

/// The layer: see the [module docs](self).
///
/// ```
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// use llm_tower::{ChatRequest, Message, boxed};
/// use llm_tower::cost::PriceTable;
/// use llm_tower_providers::SimulatedLlm;
/// use llm_tower_proxy::shadow::{ShadowLayer, ShadowTarget};
/// use tower::{Layer, ServiceExt};
/// # tokio::time::pause();
///
/// let served = SimulatedLlm::new("served");
/// let candidate = boxed(SimulatedLlm::new("candidate"));
/// let layer = ShadowLayer::new(PriceTable::new())
///     .target(ShadowTarget::new("classify", "cheap", candidate).sample_rate(1.0))
///     .seed(7);
/// let stats = layer.stats();
/// let svc = layer.layer(served);
/// let req = ChatRequest::new("m", vec![Message::user("great!")]).with_task_type("classify");
/// let answer = svc.oneshot(req).await.unwrap().into_complete().await.unwrap();
/// assert!(!answer.text().is_empty());
/// tokio::time::sleep(std::time::Duration::from_secs(5)).await; // the copy runs on its own
/// assert_eq!(stats.get("classify").unwrap().to_json()["completed"], 1);
/// # }
/// ```
#[derive(Clone)]
pub struct ShadowLayer {
    targets: Vec<ShadowTarget>,
    seed: Option<u64>,
    prices: PriceTable,
    shared: Arc<Shared>,
}

impl fmt::Debug for ShadowLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ShadowLayer")
            .field("targets", &self.targets)
            .field("seed", &self.seed)
            .finish_non_exhaustive()
    }
}

impl ShadowLayer {
    /// A layer pricing candidate answers with `prices`.
    pub fn new(prices: PriceTable) -> Self {
        let shared = build_shared(&[], None, &prices);
        Self {
            targets: Vec::new(),
            seed: None,
            prices,
            shared,
        }
    }

    // Counters and slots are made here, so every service this layer makes shares them.
    fn rebuilt(mut self) -> Self {
        self.shared = build_shared(&self.targets, self.seed, &self.prices);
        self
    }

    /// Shadows one task (a task named twice keeps its first target).
    #[must_use]
    pub fn target(mut self, t: ShadowTarget) -> Self {
        if !self.targets.iter().any(|x| x.task == t.task) {
            self.targets.push(t);
        }
        self.rebuilt()
    }

    /// Seeds the samplers of targets without a seed of their own, so the same requests are
    /// picked on every run (tests).
    #[must_use]
    pub fn seed(mut self, seed: u64) -> Self {
        self.seed = Some(seed);
        self.rebuilt()
    }

    /// The counters (shared by every service this layer makes).
    pub fn stats(&self) -> ShadowStats {
        self.shared.stats.clone()
    }

    /// Whether any task is shadowed.
    pub fn is_empty(&self) -> bool {
        self.targets.is_empty()
    }
}

fn build_shared(targets: &[ShadowTarget], seed: Option<u64>, prices: &PriceTable) -> Arc<Shared> {
    {
        let seed = seed.unwrap_or_else(|| {
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as u64)
        });
        let targets: Vec<(ShadowTarget, Arc<ShadowCounters>)> = targets
            .iter()
            .map(|t| (t.clone(), Arc::new(ShadowCounters::default())))
            .collect();
        let stats = ShadowStats(
            targets
                .iter()
                .map(|(t, c)| (t.task.clone(), t.candidate.clone(), c.clone()))
                .collect(),
        );
        let slots = targets
            .iter()
            .map(|(t, _)| Arc::new(Semaphore::new(t.max_in_flight)))
            .collect();
        let samplers = targets
            .iter()
            .enumerate()
            .map(|(i, (t, _))| Sampler {
                // Tasks sharing the layer's seed still draw different sequences.
                seed: t
                    .seed
                    .unwrap_or(seed ^ (i as u64).wrapping_mul(0xa076_1d64_78bd_642f)),
                n: AtomicU64::new(0),
            })
            .collect();
        Arc::new(Shared {
            targets,
            slots,
            samplers,
            prices: prices.clone(),
            stats,
        })
    }
}

impl<S> Layer<S> for ShadowLayer {
    type Service = Shadow<S>;
    fn layer(&self, inner: S) -> Shadow<S> {
        Shadow {
            inner,
            shared: self.shared.clone(),
        }
    }
}

/// The service of [`ShadowLayer`].
#[derive(Clone)]
pub struct Shadow<S> {
    inner: S,
    shared: Arc<Shared>,
}

impl<S: fmt::Debug> fmt::Debug for Shadow<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Shadow")
            .field("inner", &self.inner)
            .finish_non_exhaustive()
    }
}

/// A sampled request: which target, and the copy to send.
struct Plan {
    shared: Arc<Shared>,
    target: usize,
    copy: ChatRequest,
}

impl<S> Service<ChatRequest> for Shadow<S>
where
    S: LlmService,
{
    type Response = LlmResponse;
    type Error = LlmError;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), LlmError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: ChatRequest) -> Self::Future {
        let plan = self.plan(&req);
        ResponseFuture {
            inner: self.inner.call(req),
            plan,
        }
    }
}

impl<S> Shadow<S> {
    fn plan(&self, req: &ChatRequest) -> Option<Plan> {
        let task = req.task_type()?;
        let idx = self
            .shared
            .targets
            .iter()
            .position(|(t, _)| t.task == task.0)?;
        let (t, c) = &self.shared.targets[idx];
        ShadowCounters::add(&c.requests, 1);
        if req.as_embeddings().is_some() || !self.shared.samplers[idx].pick(t.rate_ppm) {
            return None;
        }
        ShadowCounters::add(&c.sampled, 1);
        let mut copy = req.clone();
        // The candidate answers in full: comparing needs the whole text, not its timing.
        copy.stream = None;
        copy.stream_options = None;
        if let Some(m) = &t.model {
            copy.model = m.clone();
        }
        Some(Plan {
            shared: self.shared.clone(),
            target: idx,
            copy,
        })
    }
}

pin_project_lite::pin_project! {
    /// The future of [`Shadow`]: the served call, then (when sampled) the hook that sends
    /// the copy once the served answer completed.
    pub struct ResponseFuture<F> {
        #[pin]
        inner: F,
        plan: Option<Plan>,
    }
}

impl<F> fmt::Debug for ResponseFuture<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}

impl<F> Future for ResponseFuture<F>
where
    F: Future<Output = Result<LlmResponse, LlmError>>,
{
    type Output = Result<LlmResponse, LlmError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let out = std::task::ready!(this.inner.poll(cx));
        let Some(plan) = this.plan.take() else {
            return Poll::Ready(out);
        };
        match out {
            Ok(mut resp) => {
                attach(&mut resp, plan);
                Poll::Ready(Ok(resp))
            }
            Err(e) => {
                plan.skip();
                Poll::Ready(Err(e))
            }
        }
    }
}

impl Plan {
    fn counters(&self) -> &ShadowCounters {
        &self.shared.targets[self.target].1
    }

    fn skip(&self) {
        ShadowCounters::add(&self.counters().skipped, 1);
    }
}

/// Arranges for the copy to go once the served answer is complete.
fn attach(resp: &mut LlmResponse, plan: Plan) {
    match &mut resp.body {
        // Complete already: the client's answer is whole; the copy goes from its own task.
        ResponseBody::Complete(r) => send(plan, r.text()),
        ResponseBody::Encoded(r) => match r.decode() {
            Ok(r) => send(plan, r.text()),
            Err(_) => plan.skip(),
        },
        ResponseBody::Stream(s) => {
            let text = Arc::new(Mutex::new(Some(String::new())));
            let seen = text.clone();
            s.wrap(move |inner| {
                inner.inspect(move |item| {
                    let Ok(chunk) = item else { return };
                    let Some(piece) = chunk
                        .choices
                        .iter()
                        .find(|c| c.index == 0)
                        .and_then(|c| c.delta.text())
                    else {
                        return;
                    };
                    let mut t = seen.lock().unwrap_or_else(PoisonError::into_inner);
                    if let Some(acc) = t.as_mut() {
                        if acc.len().saturating_add(piece.len()) > MAX_COMPARED_BYTES {
                            *t = None; // too long to compare: skipped at the end
                        } else {
                            acc.push_str(piece);
                        }
                    }
                })
            });
            s.on_finish(move |outcome| {
                let t = text.lock().unwrap_or_else(PoisonError::into_inner).take();
                match t {
                    Some(t) if outcome.is_completed() => send(plan, t),
                    _ => plan.skip(),
                }
            });
        }
        ResponseBody::Embeddings(_) => plan.skip(),
    }
}

/// Sends the copy from a task of its own, if the budget and a slot allow.
fn send(plan: Plan, served: String) {
    let shared = plan.shared.clone();
    let (t, c) = &shared.targets[plan.target];
    if let Some(b) = t.budget
        && c.day_spend(0) >= b
    {
        ShadowCounters::add(&c.dropped_budget, 1);
        return;
    }
    let Ok(handle) = tokio::runtime::Handle::try_current() else {
        plan.skip();
        return;
    };
    let Ok(permit) = shared.slots[plan.target].clone().try_acquire_owned() else {
        ShadowCounters::add(&c.dropped_full, 1);
        return;
    };
    ShadowCounters::add(&c.started, 1);
    handle.spawn(async move {
        let _permit = permit;
        run_copy(&plan, &served).await;
    });
}

async fn run_copy(plan: &Plan, served: &str) {
    let (t, c) = &plan.shared.targets[plan.target];
    let call = async {
        let resp = t.service.clone().oneshot(plan.copy.clone()).await?;
        let meta = resp.meta.clone();
        let answer = resp.into_complete().await?;
        Ok::<_, LlmError>((meta, answer))
    };
    let Ok(Ok((meta, answer))) = tokio::time::timeout(t.timeout, call).await else {
        ShadowCounters::add(&c.errors, 1);
        return;
    };
    ShadowCounters::add(&c.completed, 1);
    let usage = meta.usage.clone().or_else(|| answer.usage.clone());
    if let Some(u) = &usage {
        ShadowCounters::add(&c.prompt_tokens, u.prompt_tokens);
        ShadowCounters::add(&c.completion_tokens, u.completion_tokens);
        let model = meta.model.as_deref().unwrap_or(&plan.copy.model);
        if let Some((_, price)) = plan.shared.prices.get(model) {
            let cost = price.cost(u);
            ShadowCounters::add(&c.cost_nano, cost);
            c.day_spend(cost);
        }
    }
    let mut text = answer.text();
    if text.len() > MAX_COMPARED_BYTES {
        let mut end = MAX_COMPARED_BYTES;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
    }
    if let Some(rule) = &t.validator {
        match rule.check(&text) {
            Ok(()) => ShadowCounters::add(&c.valid, 1),
            Err(_) => ShadowCounters::add(&c.invalid, 1),
        }
        if rule.check(served).is_ok() {
            ShadowCounters::add(&c.served_valid, 1);
        }
    }
    let cmp = compare(&text, served);
    ShadowCounters::add(&c.exact, u64::from(cmp.exact));
    ShadowCounters::add(&c.normalised, u64::from(cmp.normalised));
    if let Some((agree, total)) = cmp.fields {
        ShadowCounters::add(&c.fields_agree, agree);
        ShadowCounters::add(&c.fields_total, total);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicBool;

    use llm_tower::cost::{CostLayer, ModelPrice};
    use llm_tower::{ChatChunk, ChatResponse, ChunkStream, ErrorKind, Message, Usage, boxed};
    use tokio::time::Instant;

    use super::*;

    fn req(task: &str, text: &str) -> ChatRequest {
        ChatRequest::new("m", vec![Message::user(text)]).with_task_type(task)
    }

    fn answer(model: &str, text: &str, usage: Usage) -> LlmResponse {
        let mut r = ChatResponse::from_text(model, text);
        r.usage = Some(usage.clone());
        let mut resp = LlmResponse::complete(r);
        resp.meta.model = Some(model.into());
        resp.meta.usage = Some(usage);
        resp
    }

    /// A candidate that answers `text` (model `cand`, 100 in + 10 out tokens) and counts calls.
    fn candidate(text: &'static str, calls: Arc<AtomicU64>) -> BoxLlmService {
        boxed(tower::service_fn(move |_r: ChatRequest| {
            calls.fetch_add(1, Ordering::SeqCst);
            async move { Ok::<_, LlmError>(answer("cand", text, Usage::new(100, 10))) }
        }))
    }

    fn served(text: &'static str) -> BoxLlmService {
        boxed(tower::service_fn(move |_r: ChatRequest| async move {
            Ok::<_, LlmError>(answer("served", text, Usage::new(100, 10)))
        }))
    }

    fn prices() -> PriceTable {
        // cand: $1 / Mtok in, $2 / Mtok out → 100 + 10 tokens = 120_000 nano-dollars.
        PriceTable::new()
            .with("cand", ModelPrice::per_mtok_usd(1.0, 2.0, None).unwrap())
            .with(
                "served",
                ModelPrice::per_mtok_usd(10.0, 20.0, None).unwrap(),
            )
    }

    async fn settle() {
        // Let spawned shadow tasks run (time is paused: sleeping is instant).
        tokio::time::sleep(Duration::from_secs(1)).await;
    }

    #[tokio::test(start_paused = true)]
    async fn samples_at_the_configured_rate() {
        let calls = Arc::new(AtomicU64::new(0));
        let layer = ShadowLayer::new(prices())
            .target(
                ShadowTarget::new("t", "c", candidate("x", calls.clone()))
                    .sample_rate(0.1)
                    .max_in_flight(100_000),
            )
            .seed(42);
        let stats = layer.stats();
        let svc = layer.layer(served("x"));
        for i in 0..10_000 {
            svc.clone()
                .oneshot(req("t", &format!("q{i}")))
                .await
                .unwrap();
        }
        // Another task is never sampled.
        for _ in 0..100 {
            svc.clone().oneshot(req("other", "q")).await.unwrap();
        }
        settle().await;
        let c = stats.get("t").unwrap();
        let sampled = ShadowCounters::get(&c.sampled);
        assert_eq!(ShadowCounters::get(&c.requests), 10_000);
        // Binomial(10 000, 0.1): sd 30; ±150 is 5 sd.
        assert!((850..=1150).contains(&sampled), "sampled {sampled}");
        assert_eq!(calls.load(Ordering::SeqCst), sampled);
        assert_eq!(ShadowCounters::get(&c.completed), sampled);

        // The same seed picks the same requests.
        let again = ShadowLayer::new(prices())
            .target(
                ShadowTarget::new("t", "c", candidate("x", Arc::default()))
                    .sample_rate(0.1)
                    .max_in_flight(100_000),
            )
            .seed(42);
        let stats2 = again.stats();
        let svc = again.layer(served("x"));
        for i in 0..10_000 {
            svc.clone()
                .oneshot(req("t", &format!("q{i}")))
                .await
                .unwrap();
        }
        assert_eq!(
            ShadowCounters::get(&stats2.get("t").unwrap().sampled),
            sampled
        );
    }

    #[tokio::test(start_paused = true)]
    async fn the_copy_starts_after_the_streamed_answer_is_complete() {
        let calls = Arc::new(AtomicU64::new(0));
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<ChatChunk, LlmError>>(4);
        let rx = Arc::new(Mutex::new(Some(rx)));
        let inner = tower::service_fn(move |_r: ChatRequest| {
            let rx = rx.lock().unwrap().take().unwrap();
            async move {
                let s = futures_util::stream::unfold(rx, |mut rx| async move {
                    rx.recv().await.map(|x| (x, rx))
                });
                Ok::<_, LlmError>(LlmResponse {
                    body: ResponseBody::Stream(ChunkStream::new(s)),
                    meta: Default::default(),
                })
            }
        });
        let layer = ShadowLayer::new(prices())
            .target(
                ShadowTarget::new("t", "c", candidate("Hello world", calls.clone()))
                    .sample_rate(1.0),
            )
            .seed(1);
        let stats = layer.stats();
        let mut r = req("t", "hi");
        r.stream = Some(true);
        let resp = layer.layer(inner).oneshot(r).await.unwrap();
        let mut stream = resp.into_stream();
        tx.send(Ok(ChatChunk::text("id", "m", "Hello ")))
            .await
            .unwrap();
        assert!(stream.next().await.unwrap().is_ok());
        settle().await;
        assert_eq!(
            calls.load(Ordering::SeqCst),
            0,
            "no copy while the client reads"
        );
        tx.send(Ok(ChatChunk::text("id", "m", "world")))
            .await
            .unwrap();
        assert!(stream.next().await.unwrap().is_ok());
        drop(tx);
        assert!(stream.next().await.is_none());
        settle().await;
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        let c = stats.get("t").unwrap();
        assert_eq!(
            ShadowCounters::get(&c.exact),
            1,
            "the served text was the whole stream"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_dropped_or_failed_served_answer_is_not_shadowed() {
        let calls = Arc::new(AtomicU64::new(0));
        let inner = tower::service_fn(|_r: ChatRequest| async {
            let s = futures_util::stream::iter([
                Ok(ChatChunk::text("id", "m", "a")),
                Err(LlmError::new(ErrorKind::Unavailable, "cut")),
            ]);
            Ok::<_, LlmError>(LlmResponse::stream(s))
        });
        let layer = ShadowLayer::new(prices())
            .target(ShadowTarget::new("t", "c", candidate("a", calls.clone())).sample_rate(1.0));
        let stats = layer.stats();
        let svc = layer.layer(inner);
        let mut stream = svc
            .clone()
            .oneshot(req("t", "q"))
            .await
            .unwrap()
            .into_stream();
        while stream.next().await.is_some() {}
        let stream = svc
            .clone()
            .oneshot(req("t", "q"))
            .await
            .unwrap()
            .into_stream();
        drop(stream);
        settle().await;
        assert_eq!(calls.load(Ordering::SeqCst), 0);
        assert_eq!(ShadowCounters::get(&stats.get("t").unwrap().skipped), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn shadow_errors_and_slowness_never_reach_the_client() {
        let slow_started = Arc::new(AtomicBool::new(false));
        let started = slow_started.clone();
        let slow = boxed(tower::service_fn(move |_r: ChatRequest| {
            started.store(true, Ordering::SeqCst);
            async {
                tokio::time::sleep(Duration::from_secs(3600)).await;
                Ok::<_, LlmError>(answer("cand", "late", Usage::new(1, 1)))
            }
        }));
        let failing = boxed(tower::service_fn(|_r: ChatRequest| async {
            Err::<LlmResponse, _>(LlmError::new(ErrorKind::Unavailable, "down"))
        }));
        let layer = ShadowLayer::new(prices())
            .target(
                ShadowTarget::new("slow", "s", slow)
                    .sample_rate(1.0)
                    .timeout(Duration::from_secs(10)),
            )
            .target(ShadowTarget::new("bad", "b", failing).sample_rate(1.0));
        let stats = layer.stats();
        let svc = layer.layer(served("the answer"));
        for task in ["slow", "bad"] {
            let t0 = Instant::now();
            let resp = svc.clone().oneshot(req(task, "q")).await.unwrap();
            let text = resp.into_complete().await.unwrap().text();
            // Paused clock: any wait for the copy would have moved it.
            assert_eq!(t0.elapsed(), Duration::ZERO);
            assert_eq!(text, "the answer");
        }
        tokio::time::sleep(Duration::from_secs(20)).await;
        assert!(slow_started.load(Ordering::SeqCst));
        assert_eq!(
            ShadowCounters::get(&stats.get("slow").unwrap().errors),
            1,
            "timed out"
        );
        assert_eq!(ShadowCounters::get(&stats.get("bad").unwrap().errors), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn in_flight_cap_and_budget_drop_copies_and_count_them() {
        let never = boxed(tower::service_fn(|_r: ChatRequest| async {
            std::future::pending::<()>().await;
            Ok::<_, LlmError>(answer("cand", "", Usage::new(0, 0)))
        }));
        let layer = ShadowLayer::new(prices()).target(
            ShadowTarget::new("t", "c", never)
                .sample_rate(1.0)
                .max_in_flight(2),
        );
        let stats = layer.stats();
        let svc = layer.layer(served("x"));
        for _ in 0..5 {
            svc.clone().oneshot(req("t", "q")).await.unwrap();
        }
        settle().await;
        let c = stats.get("t").unwrap();
        assert_eq!(ShadowCounters::get(&c.started), 2);
        assert_eq!(ShadowCounters::get(&c.dropped_full), 3);

        // 120 000 nano-dollars a copy, a budget of 250 000: the third copy still starts
        // (200 000 spent), later ones are dropped.
        let calls = Arc::new(AtomicU64::new(0));
        let layer = ShadowLayer::new(prices()).target(
            ShadowTarget::new("t", "c", candidate("x", calls.clone()))
                .sample_rate(1.0)
                .budget(250_000),
        );
        let stats = layer.stats();
        let svc = layer.layer(served("x"));
        for _ in 0..6 {
            svc.clone().oneshot(req("t", "q")).await.unwrap();
            settle().await;
        }
        let c = stats.get("t").unwrap();
        assert_eq!(calls.load(Ordering::SeqCst), 3);
        assert_eq!(ShadowCounters::get(&c.dropped_budget), 3);
        assert_eq!(ShadowCounters::get(&c.cost_nano), 360_000);
    }

    #[tokio::test(start_paused = true)]
    async fn counts_and_costs_land_in_the_shadow_series_only() {
        let calls = Arc::new(AtomicU64::new(0));
        let cost = CostLayer::new(prices());
        let json_rule = Rule::json();
        let layer = ShadowLayer::new(prices()).target(
            ShadowTarget::new(
                "t",
                "c",
                candidate(r#"{"label":"pos","score":2}"#, calls.clone()),
            )
            .sample_rate(1.0)
            .validator(json_rule),
        );
        let stats = layer.stats();
        let svc = tower::ServiceBuilder::new()
            .layer(layer)
            .layer(cost.clone())
            .service(served(r#"{"label":"pos","score":1}"#));
        for _ in 0..4 {
            svc.clone().oneshot(req("t", "q")).await.unwrap();
        }
        settle().await;
        let totals = cost.totals();
        // Served: 4 × (100 × $10 + 10 × $20) / Mtok = 4 × 1 200 000 nano-dollars.
        assert_eq!(totals.by_model.len(), 1);
        assert_eq!(totals.by_model["served"].nano_usd, 4_800_000);
        let c = stats.get("t").unwrap();
        assert_eq!(ShadowCounters::get(&c.cost_nano), 4 * 120_000);
        assert_eq!(ShadowCounters::get(&c.valid), 4);
        assert_eq!(ShadowCounters::get(&c.served_valid), 4);
        assert_eq!(ShadowCounters::get(&c.normalised), 0);
        assert_eq!(ShadowCounters::get(&c.fields_agree), 4);
        assert_eq!(ShadowCounters::get(&c.fields_total), 8);
        let j = stats.to_json();
        assert_eq!(j["t"]["candidate"], "c");
        assert_eq!(j["t"]["field_agreement"], 0.5);
    }
}
