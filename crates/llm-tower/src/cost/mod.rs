//! The `Cost` layer: prices every response from a per-model price table, totals spend per
//! task type, tenant and model, and enforces budgets reserved before the call.
//!
//! # Money
//!
//! Integers only: prices are converted once, at load time, to nano-dollars
//! ([`NanoUsd`], 1e-9 USD) per token ([`ModelPrice`]); costs and totals are
//! integer sums. A [`PriceTable`] deserializes from configuration
//! (`{"gpt-4o-mini": {"input_per_mtok_usd": 0.15, "output_per_mtok_usd": 0.6,
//! "cached_input_per_mtok_usd": 0.075}}`; Anthropic models add
//! `cache_write_input_per_mtok_usd`, the price of the input tokens written to the prompt
//! cache, `cache_creation_input_tokens`; both cache prices default to the input price) and
//! finds dated or prefixed variants
//! (`gpt-4o-mini-2024-07-18` → `gpt-4o-mini`; see [`PriceTable::get`]). The model priced is
//! the one that served ([`ResponseMeta::model`](crate::ResponseMeta)), else the one asked for.
//! A model with no price (and no [`CostLayer::default_price`]) costs nothing and is counted
//! in [`CostTotals::unpriced`].
//!
//! # Cost of a response
//!
//! - Complete response: [`ResponseMeta::cost`](crate::ResponseMeta) is set before it is
//!   returned.
//! - Stream: the cost is known only at the end, so `meta.cost` is `None` on the stream's
//!   initial meta; the cost is computed in the completion hook
//!   ([`LlmResponse::on_finish`](crate::LlmResponse::on_finish)) and recorded in the totals
//!   (and passed to [`CostLayer::on_record`]). A stream that ends without a usage report
//!   is counted in [`CostTotals::unknown_usage`].
//! - Cache hit (`meta.cache == CacheStatus::Hit`): costs 0; `saved_nano_usd` is what it
//!   would have cost.
//!
//! # Every paid attempt
//!
//! An upstream attempt that reported usage costs money even when its answer is thrown
//! away: an answer the validate layer rejected before its retry, a fallback attempt that
//! failed after its usage arrived (a provider stream that broke after Anthropic's
//! `message_start`), the answers behind a request that failed in the end. The layer that
//! discards such an answer records it as a [`PaidAttempt`] (with the model that served
//! it) on what it returns next: [`ResponseMeta::paid_attempts`](crate::ResponseMeta) on a
//! response, [`LlmError::paid_attempts`] on an error (whose own attempt's usage, if it
//! reported one, is [`LlmError::usage`]). This layer prices each paid attempt at the price
//! of its model and adds it to the totals under that model (in
//! [`CostTotals::discarded_attempts`], not in `requests`), also when the request ends in
//! an error; `meta.cost` of a complete response is the response's own cost plus its paid
//! attempts'. The budget hold is settled with the same sum, and the rate-limit layer
//! settles its token holds with the same usage. A stream dropped by the client after its
//! usage arrived is settled with that usage (the completion hook's
//! [`Outcome::Dropped`](crate::Outcome)).
//!
//! # Budgets
//!
//! A [`Budget`] caps spend per tenant, per task type, for one tenant or task, or globally,
//! per [`BudgetWindow`] (UTC day, UTC month, fixed periods, or total). Before the call the
//! layer **reserves** the expected cost (prompt estimate + output limit at the model's
//! price, see [`CostEstimator`]) from every budget that applies, atomically and all or
//! nothing, as a [`Hold`] with a per-request [`HoldId`] and an expiry
//! ([`CostLayer::hold_ttl`]), so concurrent first requests cannot slip past the cap; after
//! the call it settles the hold by id with the actual cost (once, from the completion
//! hook). Spend is settled + open holds (see [`ledger`](crate::ledger)). A budget is
//! exhausted when its spend has reached the limit, or when this request's reservation
//! would pass it: the error is [`LlmError::budget_exceeded`] (HTTP 429,
//! `insufficient_quota`) with a retry-after at the end of the window.
//!
//! Settlement rules (same as the rate-limit layer), always plus the cost of the paid
//! attempts: usage unknown → the estimate is settled (no refund); future dropped after the
//! call started → the estimate is settled; dropped before (or the store failed closed) →
//! settled at zero; the inner service failed with an error that reports its own usage →
//! that usage; with an error that means the provider refused before generating (rate
//! limited, bad request, …) → zero (refunded). A hold whose settlement never arrives is
//! released at its expiry.
//!
//! Stores: [`InMemoryBudgetStore`] (default) or any [`BudgetStore`]; `llm-tower-redis` has
//! one for replicas (atomic Lua reserve/settle).
//!
//! # Readiness
//!
//! `poll_ready` delegates to the inner service. With a store that answers synchronously
//! (in-memory) the call goes straight through; with an asynchronous store the instance
//! that was polled ready is moved into the future, so the inner service must be `Clone`.
//!
//! # Example
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! use llm_tower::cost::{Budget, BudgetWindow, CostLayer, ModelPrice, PriceTable};
//! use llm_tower::{ChatRequest, ChatResponse, ErrorKind, LlmError, LlmResponse, Message, Usage};
//! use tower::{Service, ServiceBuilder, ServiceExt};
//!
//! let prices = PriceTable::new().with("gpt-4o-mini", ModelPrice::per_mtok_usd(0.15, 0.6, None).unwrap());
//! let layer = CostLayer::new(prices)
//!     .budget(Budget::per_tenant(1_000_000, BudgetWindow::Daily)); // $0.001 a day
//! let mut svc = ServiceBuilder::new().layer(layer.clone()).service_fn(|req: ChatRequest| async move {
//!     let mut r = ChatResponse::from_text(req.model, "hi");
//!     r.usage = Some(Usage::new(1000, 100));
//!     Ok::<_, LlmError>(LlmResponse::complete(r))
//! });
//! let req = ChatRequest::new("gpt-4o-mini-2024-07-18", vec![Message::user("Hi")])
//!     .with_tenant("acme");
//! let resp = svc.ready().await.unwrap().call(req).await.unwrap();
//! // 1000 × 150 + 100 × 600 nano-dollars.
//! assert_eq!(resp.meta.cost.unwrap().nano_usd, 210_000);
//! assert_eq!(layer.totals().by_tenant["acme"].nano_usd, 210_000);
//! # }
//! ```

mod budget;
mod price;

pub mod future;

pub use crate::ledger::{DEFAULT_HOLD_TTL, Hold, HoldId, MIN_HOLD_TTL};
pub use budget::{
    Budget, BudgetCharge, BudgetScope, BudgetStore, BudgetWindow, InMemoryBudgetStore, Reserve,
    ReserveFuture,
};
pub use price::{InvalidPrice, ModelPrice, PicoUsd, PriceConfig, PriceTable, usd_to_nano};

use llm_tower_core::LlmService;
use std::collections::BTreeMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use llm_tower_core::Cost as ResponseCost;
use llm_tower_core::{
    CacheStatus, ChatRequest, ErrorKind, LlmError, LlmResponse, NanoUsd, Outcome, PaidAttempt,
    ResponseBody, Usage,
};
use tower_layer::Layer;
use tower_service::Service;

// ===== estimator =====

/// How the expected cost of a request is estimated for budget reservations (an
/// approximation, not a tokenizer): prompt tokens `ceil(text bytes / bytes_per_token) +
/// messages × per_message_tokens + 3` at the input price, plus the output limit
/// (`max_completion_tokens`, else `max_tokens`, else `default_output_tokens`) times `n`
/// at the output price.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CostEstimator {
    /// Bytes of text per token. Default 4.
    pub bytes_per_token: u32,
    /// Overhead tokens per message. Default 4.
    pub per_message_tokens: u32,
    /// Output estimate when the request sets no limit. Default 512.
    pub default_output_tokens: u64,
}

impl Default for CostEstimator {
    fn default() -> Self {
        Self {
            bytes_per_token: 4,
            per_message_tokens: 4,
            default_output_tokens: 512,
        }
    }
}

impl CostEstimator {
    /// The expected cost of `req` at `price`.
    pub fn estimate(&self, req: &ChatRequest, price: &ModelPrice) -> NanoUsd {
        let bytes = req.prompt_text_len() as u64;
        let prompt = bytes.div_ceil(u64::from(self.bytes_per_token.max(1)))
            + req.messages.len() as u64 * u64::from(self.per_message_tokens)
            + 3;
        let output = req
            .output_limit()
            .unwrap_or(self.default_output_tokens)
            .saturating_mul(req.n.unwrap_or(1).max(1));
        price.estimate(prompt, output)
    }
}

// ===== totals =====

/// Spend and usage over a set of requests. Money in nano-dollars.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CostTotals {
    /// Responses recorded (completed, failed or dropped streams included).
    pub requests: u64,
    /// Of those, cache hits.
    pub cache_hits: u64,
    /// Prompt tokens.
    pub prompt_tokens: u64,
    /// Of the prompt tokens, cached ones.
    pub cached_tokens: u64,
    /// Completion tokens.
    pub completion_tokens: u64,
    /// Cost.
    pub nano_usd: NanoUsd,
    /// Saved by cache hits.
    pub saved_nano_usd: NanoUsd,
    /// Responses that ended without a usage report (their cost is not in `nano_usd`).
    pub unknown_usage: u64,
    /// Responses (and discarded attempts) of a model with no price.
    pub unpriced: u64,
    /// Attempts paid for whose answer was discarded (an answer validation rejected before
    /// its retry, a fallback attempt that failed after reporting usage, the answers behind
    /// a request that failed; see [`PaidAttempt`]): their tokens and cost are in the sums
    /// above, but they are not counted in `requests`.
    pub discarded_attempts: u64,
}

impl CostTotals {
    fn add(&mut self, o: &CostTotals) {
        self.requests += o.requests;
        self.cache_hits += o.cache_hits;
        self.prompt_tokens = self.prompt_tokens.saturating_add(o.prompt_tokens);
        self.cached_tokens = self.cached_tokens.saturating_add(o.cached_tokens);
        self.completion_tokens = self.completion_tokens.saturating_add(o.completion_tokens);
        self.nano_usd = self.nano_usd.saturating_add(o.nano_usd);
        self.saved_nano_usd = self.saved_nano_usd.saturating_add(o.saved_nano_usd);
        self.unknown_usage += o.unknown_usage;
        self.unpriced += o.unpriced;
        self.discarded_attempts += o.discarded_attempts;
    }

    /// The cost in dollars, for display only.
    pub fn usd(&self) -> f64 {
        self.nano_usd as f64 / 1e9
    }
}

/// A snapshot of a [`CostLayer`]'s totals. Unset task types and tenants appear as `""`;
/// past 4 096 (task type, tenant, model) keys, new task types are counted as `other`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CostSnapshot {
    /// Everything.
    pub total: CostTotals,
    /// Per task type.
    pub by_task: BTreeMap<String, CostTotals>,
    /// Per tenant.
    pub by_tenant: BTreeMap<String, CostTotals>,
    /// Per model (as priced: the model that served).
    pub by_model: BTreeMap<String, CostTotals>,
    /// Per (task type, tenant, model).
    pub entries: BTreeMap<(String, String, String), CostTotals>,
    /// Requests refused because a budget was exhausted.
    pub budget_exceeded: u64,
}

/// What the layer learned about one finished response (passed to
/// [`CostLayer::on_record`]).
#[derive(Debug, Clone)]
pub struct CostRecord {
    /// The task type (`""` if unset).
    pub task: Arc<str>,
    /// The tenant (`""` if unset).
    pub tenant: Arc<str>,
    /// The model priced.
    pub model: Arc<str>,
    /// The usage, if reported.
    pub usage: Option<Usage>,
    /// The cost (`None` if the usage or the price is unknown).
    pub cost: Option<ResponseCost>,
    /// Whether it was a cache hit.
    pub cache_hit: bool,
    /// Whether the response was delivered completely.
    pub completed: bool,
    /// Whether this is an attempt paid for whose answer was discarded (see
    /// [`CostTotals::discarded_attempts`]) rather than the response.
    pub discarded: bool,
}

type Key = (Arc<str>, Arc<str>, Arc<str>);
type OnRecord = Arc<dyn Fn(&CostRecord) + Send + Sync>;

struct State {
    totals: Mutex<crate::FastMap<Key, CostTotals>>,
    budget_exceeded: AtomicU64,
    // Shared "unset" label, so requests without a task or tenant do not allocate one.
    empty: Arc<str>,
    // The task label of totals past `MAX_TOTAL_KEYS`.
    other: Arc<str>,
}

/// Most (task type, tenant, model) keys the totals keep. Task types come from clients: past
/// this many keys, a new one is added up under task `other`, so that no client can grow the
/// totals without bound. The per-tenant and per-model sums stay exact.
const MAX_TOTAL_KEYS: usize = 4096;

// ===== layer =====

#[derive(Clone)]
struct Config {
    prices: PriceTable,
    default_price: Option<ModelPrice>,
    budgets: Vec<(Budget, Arc<str>)>,
    estimator: CostEstimator,
    on_record: Option<OnRecord>,
    hold_ttl: Duration,
}

/// Applies [`Cost`] to a service. See the [module docs](self) for an example.
///
/// # Clone
///
/// Clones share the totals and the budget store.
#[derive(Clone)]
pub struct CostLayer {
    config: Arc<Config>,
    store: Arc<dyn BudgetStore>,
    state: Arc<State>,
}

impl fmt::Debug for CostLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CostLayer")
            .field("models_priced", &self.config.prices.len())
            .field("budgets", &self.config.budgets)
            .field("store", &self.store)
            .finish_non_exhaustive()
    }
}

impl CostLayer {
    /// A layer pricing with `prices`, no budgets, the in-memory budget store.
    pub fn new(prices: PriceTable) -> Self {
        Self {
            config: Arc::new(Config {
                prices,
                default_price: None,
                budgets: Vec::new(),
                estimator: CostEstimator::default(),
                on_record: None,
                hold_ttl: DEFAULT_HOLD_TTL,
            }),
            store: Arc::new(InMemoryBudgetStore::new()),
            state: Arc::new(State {
                totals: Mutex::default(),
                budget_exceeded: AtomicU64::new(0),
                empty: Arc::from(""),
                other: Arc::from("other"),
            }),
        }
    }

    /// The price for models missing from the table (default: none, they cost nothing).
    #[must_use]
    pub fn default_price(mut self, price: ModelPrice) -> Self {
        Arc::make_mut(&mut self.config).default_price = Some(price);
        self
    }

    /// Adds a budget.
    #[must_use]
    pub fn budget(mut self, budget: Budget) -> Self {
        let name: Arc<str> = match &budget.name {
            Some(n) => n.clone(),
            None => budget.default_name().into(),
        };
        Arc::make_mut(&mut self.config).budgets.push((budget, name));
        self
    }

    /// Adds several budgets.
    #[must_use]
    pub fn budgets(self, budgets: impl IntoIterator<Item = Budget>) -> Self {
        budgets.into_iter().fold(self, Self::budget)
    }

    /// Keeps budgets in `store` (e.g. the Redis store of `llm-tower-redis`).
    #[must_use]
    pub fn store(mut self, store: Arc<dyn BudgetStore>) -> Self {
        self.store = store;
        self
    }

    /// The estimator for reservations.
    #[must_use]
    pub fn estimator(mut self, estimator: CostEstimator) -> Self {
        Arc::make_mut(&mut self.config).estimator = estimator;
        self
    }

    /// How long a reservation is held if it is never settled (default
    /// [`DEFAULT_HOLD_TTL`], 10 minutes): a replica that dies mid-request, or a reservation
    /// whose answer was lost, stops counting against the budget after this. Make it longer
    /// than your longest request (streams included). At least [`MIN_HOLD_TTL`] (1 s).
    #[must_use]
    pub fn hold_ttl(mut self, ttl: Duration) -> Self {
        // A hold that expires before it is made would let the request through unreserved.
        Arc::make_mut(&mut self.config).hold_ttl = ttl.max(MIN_HOLD_TTL);
        self
    }

    /// Calls `f` with every finished response's record (for metrics or a ledger). It runs
    /// inside the completion hook: keep it quick and non-blocking.
    #[must_use]
    pub fn on_record<F>(mut self, f: F) -> Self
    where
        F: Fn(&CostRecord) + Send + Sync + 'static,
    {
        Arc::make_mut(&mut self.config).on_record = Some(Arc::new(f));
        self
    }

    /// The price table.
    pub fn prices(&self) -> &PriceTable {
        &self.config.prices
    }

    /// The price of `model` (table lookup, then the default price).
    pub fn price_of(&self, model: &str) -> Option<ModelPrice> {
        self.config
            .prices
            .get(model)
            .map(|(_, p)| p)
            .or(self.config.default_price)
    }

    /// A snapshot of the totals.
    pub fn totals(&self) -> CostSnapshot {
        let map = lock(&self.state.totals);
        let mut snap = CostSnapshot {
            budget_exceeded: self.state.budget_exceeded.load(Ordering::Relaxed),
            ..CostSnapshot::default()
        };
        for ((task, tenant, model), t) in map.iter() {
            snap.total.add(t);
            snap.by_task.entry(task.to_string()).or_default().add(t);
            snap.by_tenant.entry(tenant.to_string()).or_default().add(t);
            snap.by_model.entry(model.to_string()).or_default().add(t);
            snap.entries.insert(
                (task.to_string(), tenant.to_string(), model.to_string()),
                *t,
            );
        }
        snap
    }

    /// Clears the totals (e.g. after exporting them). Budgets are not affected.
    pub fn reset_totals(&self) {
        lock(&self.state.totals).clear();
    }

    fn charges(&self, req: &ChatRequest) -> Vec<BudgetCharge> {
        if self.config.budgets.is_empty() {
            return Vec::new();
        }
        let amount = self
            .price_of(&req.model)
            .map_or(0, |p| self.config.estimator.estimate(req, &p));
        let now = SystemTime::now();
        self.config
            .budgets
            .iter()
            .filter_map(|(b, name)| {
                let (window, ttl) = b.window.current(now);
                b.key_for(name, req, &window).map(|key| BudgetCharge {
                    key,
                    limit: b.limit,
                    amount,
                    ttl,
                })
            })
            .collect()
    }

    fn exceeded(&self, charges: &[BudgetCharge], index: usize, spent: NanoUsd) -> LlmError {
        self.state.budget_exceeded.fetch_add(1, Ordering::Relaxed);
        let Some(c) = charges.get(index) else {
            return LlmError::budget_exceeded("budget exhausted");
        };
        let mut e = LlmError::budget_exceeded(format!(
            "budget exhausted ({}): spent ${:.6} of ${:.6}",
            c.key,
            spent as f64 / 1e9,
            c.limit as f64 / 1e9
        ));
        if let Some(ttl) = c.ttl {
            e = e.with_retry_after(ttl);
        }
        e
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl<S> Layer<S> for CostLayer {
    type Service = Cost<S>;

    fn layer(&self, inner: S) -> Cost<S> {
        Cost {
            inner,
            layer: self.clone(),
        }
    }
}

// ===== service =====

/// The cost service. See the [module docs](self).
#[derive(Clone, Debug)]
pub struct Cost<S> {
    inner: S,
    layer: CostLayer,
}

impl<S> Cost<S> {
    /// Wraps `inner` with `layer`.
    pub fn new(inner: S, layer: &CostLayer) -> Self {
        layer.layer(inner)
    }
    /// A snapshot of the totals.
    pub fn totals(&self) -> CostSnapshot {
        self.layer.totals()
    }
    inner_service_accessors!();
}

/// The request's part of the accounting, carried to the completion hook. Its hold is
/// settled exactly once: with the actual cost, or when dropped (see [`Drop`]).
struct Ticket {
    layer: CostLayer,
    task: Arc<str>,
    tenant: Arc<str>,
    req_model: String,
    charges: Vec<BudgetCharge>,
    hold: Hold,
    // The inner service was called (so a cost may have been incurred).
    called: bool,
}

impl Drop for Ticket {
    fn drop(&mut self) {
        // Unsettled: the caller went away, or the reservation failed closed. After the call
        // started the estimate stands (no refund); before, nothing was spent, and settling
        // at zero makes a reservation still in flight a no-op when it lands.
        if !self.charges.is_empty() {
            let estimate = if self.called {
                self.charges.first().map_or(0, |c| c.amount)
            } else {
                0
            };
            self.settle(Some(estimate));
        }
    }
}

impl Ticket {
    fn new(layer: CostLayer, req: &ChatRequest, charges: Vec<BudgetCharge>, hold: Hold) -> Self {
        Self {
            hold,
            called: false,
            task: req
                .task_type()
                .map_or_else(|| layer.state.empty.clone(), |t| t.0.clone()),
            tenant: req
                .tenant()
                .map_or_else(|| layer.state.empty.clone(), |t| t.0.clone()),
            req_model: req.model.clone(),
            layer,
            charges,
        }
    }

    /// Settles the hold: with the actual cost, or (unknown) with the estimate (no refund).
    /// Consumes the charges, so it cannot run twice.
    fn settle(&mut self, actual: Option<NanoUsd>) {
        self.settle_with(actual, 0);
    }

    /// [`settle`](Self::settle), plus `paid`: what discarded attempts cost.
    fn settle_with(&mut self, actual: Option<NanoUsd>, paid: NanoUsd) {
        let charges = std::mem::take(&mut self.charges);
        let Some(first) = charges.first() else { return };
        let actual = actual.unwrap_or(first.amount).saturating_add(paid);
        self.layer.store.settle(self.hold, &charges, actual);
    }

    /// Prices the attempts paid for and discarded (each with the model that served it),
    /// adds them to the totals and returns what they cost together.
    fn record_paid(&self, paid: &[PaidAttempt]) -> NanoUsd {
        let mut sum: NanoUsd = 0;
        for a in paid {
            let model: Arc<str> = a.model.as_deref().unwrap_or(&self.req_model).into();
            let price = self.layer.price_of(&model);
            let cost = price_usage(price, Some(&a.usage), false);
            let nano = cost.map_or(0, |c| c.nano_usd);
            sum = sum.saturating_add(nano);
            let t = CostTotals {
                discarded_attempts: 1,
                unpriced: u64::from(price.is_none()),
                prompt_tokens: a.usage.prompt_tokens,
                cached_tokens: a.usage.cached_tokens(),
                completion_tokens: a.usage.completion_tokens,
                nano_usd: nano,
                ..CostTotals::default()
            };
            self.add_totals(&model, &t);
            if let Some(f) = &self.layer.config.on_record {
                f(&CostRecord {
                    task: self.task.clone(),
                    tenant: self.tenant.clone(),
                    model,
                    usage: Some(a.usage.clone()),
                    cost,
                    cache_hit: false,
                    completed: false,
                    discarded: true,
                });
            }
        }
        sum
    }

    fn add_totals(&self, model: &Arc<str>, t: &CostTotals) {
        let mut key = (self.task.clone(), self.tenant.clone(), model.clone());
        let mut totals = lock(&self.layer.state.totals);
        if totals.len() >= MAX_TOTAL_KEYS && !totals.contains_key(&key) {
            key.0 = self.layer.state.other.clone();
        }
        totals.entry(key).or_default().add(t);
    }

    /// Forgets the charges without settling (the store refused: nothing is held).
    fn disarm(&mut self) {
        self.charges.clear();
    }

    fn on_response(self, mut resp: LlmResponse) -> LlmResponse {
        let model: Arc<str> = resp.meta.model.as_deref().unwrap_or(&self.req_model).into();
        let price = self.layer.price_of(&model);
        let hit = resp.meta.cache == CacheStatus::Hit;
        // Earlier attempts paid for and discarded: counted now, settled with the response.
        let paid = if resp.meta.paid_attempts.is_empty() {
            0
        } else {
            self.record_paid(&resp.meta.paid_attempts)
        };
        let cost = match &resp.body {
            ResponseBody::Complete(r) => price_usage(price, r.usage.as_ref(), hit),
            ResponseBody::Encoded(r) => price_usage(price, r.usage(), hit),
            ResponseBody::Stream(_) => None,
            // A partly cached batch reports in the meta only what the upstream was paid for.
            ResponseBody::Embeddings(r) => {
                price_usage(price, resp.meta.usage.as_ref().or(Some(&r.usage)), hit)
            }
        };
        resp.meta.cost = match cost {
            Some(c) if paid > 0 => Some(ResponseCost {
                nano_usd: c.nano_usd.saturating_add(paid),
                ..c
            }),
            other => other,
        };
        resp.on_finish(move |o: &Outcome| self.finish(o, &model, price, hit, paid));
        resp
    }

    fn finish(
        mut self,
        o: &Outcome,
        model: &Arc<str>,
        price: Option<ModelPrice>,
        hit: bool,
        paid: NanoUsd,
    ) {
        let usage = o.usage();
        let cost = price_usage(price, usage, hit);
        self.settle_with(cost.map(|c| c.nano_usd), paid);
        let mut t = CostTotals {
            requests: 1,
            cache_hits: u64::from(hit),
            unknown_usage: u64::from(usage.is_none()),
            unpriced: u64::from(price.is_none()),
            ..CostTotals::default()
        };
        if let Some(u) = usage {
            t.prompt_tokens = u.prompt_tokens;
            t.cached_tokens = u.cached_tokens();
            t.completion_tokens = u.completion_tokens;
        }
        if let Some(c) = cost {
            t.nano_usd = c.nano_usd;
            t.saved_nano_usd = c.saved_nano_usd;
        }
        self.add_totals(model, &t);
        if let Some(f) = &self.layer.config.on_record {
            f(&CostRecord {
                task: self.task.clone(),
                tenant: self.tenant.clone(),
                model: model.clone(),
                usage: usage.cloned(),
                cost,
                cache_hit: hit,
                completed: o.is_completed(),
                discarded: false,
            });
        }
    }

    fn on_error(mut self, e: &LlmError) {
        // The failing attempt's own cost: known if it reported usage (it is among the
        // paid attempts), else zero if the provider refused before generating, else the
        // estimate (no refund).
        let own = if e.usage().is_some() || rejected_before_generation(e.kind()) {
            Some(0)
        } else {
            None
        };
        let paid = if e.paid_attempts().is_empty() {
            0
        } else {
            self.record_paid(e.paid_attempts())
        };
        self.settle_with(own, paid);
    }
}

fn price_usage(
    price: Option<ModelPrice>,
    usage: Option<&Usage>,
    hit: bool,
) -> Option<ResponseCost> {
    let (price, usage) = (price?, usage?);
    let full = price.cost(usage);
    Some(if hit {
        ResponseCost {
            nano_usd: 0,
            saved_nano_usd: full,
        }
    } else {
        ResponseCost {
            nano_usd: full,
            saved_nano_usd: 0,
        }
    })
}

/// Errors that mean the provider refused before generating (usage known to be zero).
fn rejected_before_generation(kind: ErrorKind) -> bool {
    matches!(
        kind,
        ErrorKind::RateLimited
            | ErrorKind::BadRequest
            | ErrorKind::ContextLengthExceeded
            | ErrorKind::Auth
            | ErrorKind::NotFound
            | ErrorKind::Unavailable
            | ErrorKind::Overloaded
            | ErrorKind::BudgetExceeded
    )
}

impl<S> Service<ChatRequest> for Cost<S>
where
    S: LlmService + Clone,
{
    type Response = LlmResponse;
    type Error = LlmError;
    type Future = future::ResponseFuture<S>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), LlmError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: ChatRequest) -> Self::Future {
        let charges = self.layer.charges(&req);
        if charges.is_empty() {
            let hold = Hold {
                id: HoldId::from_u128(0),
                expires_at: tokio::time::Instant::now(),
            };
            let mut ticket = Ticket::new(self.layer.clone(), &req, charges, hold);
            ticket.called = true;
            return future::ResponseFuture::calling(self.inner.call(req), ticket);
        }
        let hold = Hold::new(self.layer.config.hold_ttl);
        match self.layer.store.reserve_now(hold, &charges) {
            Some(Ok(Reserve::Reserved { .. })) => {
                let mut ticket = Ticket::new(self.layer.clone(), &req, charges, hold);
                ticket.called = true;
                future::ResponseFuture::calling(self.inner.call(req), ticket)
            }
            Some(Ok(Reserve::Exceeded { index, spent })) => {
                future::ResponseFuture::ready(Err(self.layer.exceeded(&charges, index, spent)))
            }
            Some(Err(e)) => future::ResponseFuture::ready(Err(e)),
            None => {
                let fut = self.layer.store.reserve(hold, &charges);
                let fresh = self.inner.clone();
                let inner = std::mem::replace(&mut self.inner, fresh);
                let ticket = Ticket::new(self.layer.clone(), &req, charges, hold);
                future::ResponseFuture::reserving(fut, inner, req, ticket)
            }
        }
    }
}
