//! Every paid upstream attempt is priced and counted: an answer validation rejected before
//! its retry, a fallback attempt that failed after reporting usage, a stream the client
//! dropped after its usage arrived. Cost totals, budget settlements and token-limit
//! settlements all use the sum over every paid attempt. Paused time, scripted mock.
#![cfg(all(
    feature = "cost",
    feature = "validate",
    feature = "fallback",
    feature = "rate-limit"
))]

use llm_tower::LlmService;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use llm_tower::cost::{
    Budget, BudgetWindow, CostLayer, InMemoryBudgetStore, ModelPrice, PriceTable,
};
use llm_tower::fallback::{Fallback, FallbackTarget};
use llm_tower::rate_limit::{InMemoryRateLimitStore, RateLimitLayer, Rule as LimitRule};
use llm_tower::validate::{Rule, ValidateLayer};
use llm_tower::{ChatRequest, ErrorKind, LlmError, LlmResponse, Message, ResponseBody, Usage};
use llm_tower_test::{MockLlm, Step};
use tower::{Layer, Service, ServiceExt};

const TOKEN_LIMIT: u64 = 100_000;

fn price_a() -> ModelPrice {
    ModelPrice::per_token_nano(1000, 2000, 100)
}

fn price_b() -> ModelPrice {
    ModelPrice::per_token_nano(3000, 5000, 300)
}

fn prices() -> PriceTable {
    PriceTable::new()
        .with("model-a", price_a())
        .with("model-b", price_b())
}

fn req() -> ChatRequest {
    let mut r = ChatRequest::new("model-a", vec![Message::user("Give me JSON")])
        .with_tenant("acme")
        .with_task_type("extract");
    r.max_tokens = Some(100);
    r
}

/// The accounting of one stack: its cost layer, budget store and token store.
struct Books {
    cost: CostLayer,
    budgets: Arc<InMemoryBudgetStore>,
    tokens: Arc<InMemoryRateLimitStore>,
}

impl Books {
    fn new() -> Self {
        let budgets = Arc::new(InMemoryBudgetStore::new());
        let cost = CostLayer::new(prices())
            .store(budgets.clone())
            .budget(Budget::global(1_000_000_000, BudgetWindow::Total).named("all"));
        Self {
            cost,
            budgets,
            tokens: Arc::new(InMemoryRateLimitStore::new()),
        }
    }

    fn limit(&self) -> RateLimitLayer {
        RateLimitLayer::new()
            .store(self.tokens.clone())
            .rule(LimitRule::tokens(TOKEN_LIMIT, Duration::from_secs(60)).named("tok"))
    }

    /// `RateLimit → Cost → inner`.
    fn wrap<S>(
        &self,
        inner: S,
    ) -> impl Service<ChatRequest, Response = LlmResponse, Error = LlmError> + use<S>
    where
        S: LlmService + Clone + Send + 'static,
        S::Future: Send + 'static,
    {
        self.limit().layer(self.cost.layer(inner))
    }

    /// Settled spend of the global budget (no hold left open).
    fn budget_spent(&self) -> u64 {
        assert_eq!(
            self.budgets.open_holds("all|total").0,
            0,
            "no hold left open"
        );
        self.budgets.spent("all|total")
    }

    /// Tokens settled on the token limit (no hold left open; time is paused, so nothing
    /// refilled).
    fn tokens_used(&self) -> u64 {
        assert_eq!(self.tokens.open_holds("tok"), 0, "no hold left open");
        TOKEN_LIMIT - self.tokens.remaining("tok").expect("the bucket exists")
    }
}

fn tokens(u: &Usage) -> u64 {
    u.prompt_tokens + u.completion_tokens
}

async fn call<S>(svc: &mut S, r: ChatRequest) -> Result<LlmResponse, LlmError>
where
    S: LlmService,
{
    svc.ready().await?.call(r).await
}

#[tokio::test(start_paused = true)]
async fn a_validation_retry_costs_both_attempts() {
    let (u1, u2) = (Usage::new(10, 20), Usage::new(30, 40));
    let mock = MockLlm::new("m")
        .then(Step::reply("not json").with_usage(u1.clone()))
        .then(Step::reply(r#"{"ok": true}"#).with_usage(u2.clone()));
    let books = Books::new();
    let validate = ValidateLayer::new().task("extract", Rule::json());
    let mut svc = books.wrap(validate.layer(mock.clone()));

    let resp = call(&mut svc, req()).await.unwrap();
    assert_eq!(mock.calls(), 2);
    let both = price_a().cost(&u1) + price_a().cost(&u2);
    assert_eq!(resp.meta.paid_attempts.len(), 1, "the rejected answer");
    assert_eq!(
        resp.meta.cost.unwrap().nano_usd,
        both,
        "x-llm-cost-usd: both"
    );

    let t = books.cost.totals();
    assert_eq!(t.total.nano_usd, both);
    assert_eq!((t.total.requests, t.total.discarded_attempts), (1, 1));
    assert_eq!(t.total.prompt_tokens, 40);
    assert_eq!(t.total.completion_tokens, 60);
    assert_eq!(t.by_tenant["acme"].nano_usd, both);
    assert_eq!(t.by_task["extract"].nano_usd, both);
    assert_eq!(books.budget_spent(), both, "budget settled with both");
    assert_eq!(
        books.tokens_used(),
        tokens(&u1) + tokens(&u2),
        "tokens: both"
    );
}

#[tokio::test(start_paused = true)]
async fn a_request_that_fails_validation_still_costs_every_answer() {
    let (u1, u2) = (Usage::new(10, 20), Usage::new(30, 40));
    let mock = MockLlm::new("m")
        .then(Step::reply("nope").with_usage(u1.clone()))
        .then(Step::reply("still nope").with_usage(u2.clone()));
    let books = Books::new();
    let validate = ValidateLayer::new().task("extract", Rule::json());
    let mut svc = books.wrap(validate.layer(mock));

    let err = call(&mut svc, req()).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidOutput);
    assert_eq!(err.paid_attempts().len(), 2);
    assert_eq!(err.usage(), Some(&u2), "the last answer is the error's own");

    let both = price_a().cost(&u1) + price_a().cost(&u2);
    let t = books.cost.totals();
    assert_eq!(t.total.nano_usd, both);
    assert_eq!((t.total.requests, t.total.discarded_attempts), (0, 2));
    // Both answers are known: no estimate on top.
    assert_eq!(books.budget_spent(), both);
    assert_eq!(books.tokens_used(), tokens(&u1) + tokens(&u2));
}

#[tokio::test(start_paused = true)]
async fn a_failing_fallback_attempt_that_reported_usage_is_counted() {
    // The primary fails mid-answer after reporting its usage (as the Anthropic provider
    // does for an `overloaded_error` after `message_start`), the secondary serves.
    let (u1, u2) = (Usage::new(100, 5), Usage::new(50, 10));
    let a = MockLlm::new("a").then(Step::error(
        LlmError::overloaded("overloaded mid-stream").with_usage(None, u1.clone()),
    ));
    let b = MockLlm::new("b").then(Step::reply("hello").with_usage(u2.clone()));
    let chain = Fallback::new(vec![
        FallbackTarget::new("a", a).with_model("model-a"),
        FallbackTarget::new("b", b).with_model("model-b"),
    ])
    .no_cooldown();
    let books = Books::new();
    let mut svc = books.wrap(chain);

    let resp = call(&mut svc, req()).await.unwrap();
    assert_eq!(resp.meta.model.as_deref(), Some("model-b"));
    let paid = &resp.meta.paid_attempts;
    assert_eq!(paid.len(), 1);
    assert_eq!(
        paid[0].model.as_deref(),
        Some("model-a"),
        "priced as what served it"
    );

    // Each attempt at the price of the model that served it.
    let (ca, cb) = (price_a().cost(&u1), price_b().cost(&u2));
    let t = books.cost.totals();
    assert_eq!(t.by_model["model-a"].nano_usd, ca);
    assert_eq!(t.by_model["model-a"].discarded_attempts, 1);
    assert_eq!(t.by_model["model-b"].nano_usd, cb);
    assert_eq!(t.by_model["model-b"].requests, 1);
    assert_eq!(t.total.nano_usd, ca + cb);
    assert_eq!(resp.meta.cost.unwrap().nano_usd, ca + cb);
    assert_eq!(books.budget_spent(), ca + cb);
    assert_eq!(books.tokens_used(), tokens(&u1) + tokens(&u2));
}

#[tokio::test(start_paused = true)]
async fn when_every_target_fails_the_paid_attempts_are_still_settled() {
    let u1 = Usage::new(100, 5);
    let a = MockLlm::new("a").then(Step::error(
        LlmError::overloaded("overloaded mid-stream").with_usage(None, u1.clone()),
    ));
    // Refused before generating: costs nothing.
    let b = MockLlm::new("b").then(Step::error(LlmError::unavailable("down")));
    let chain = Fallback::new(vec![
        FallbackTarget::new("a", a).with_model("model-a"),
        FallbackTarget::new("b", b).with_model("model-b"),
    ])
    .no_cooldown();
    let books = Books::new();
    let mut svc = books.wrap(chain);

    let err = call(&mut svc, req()).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Unavailable);
    assert_eq!(err.paid_attempts().len(), 1);
    let ca = price_a().cost(&u1);
    let t = books.cost.totals();
    assert_eq!(t.total.nano_usd, ca);
    assert_eq!(t.by_model["model-a"].discarded_attempts, 1);
    assert_eq!(
        books.budget_spent(),
        ca,
        "the paid attempt, not the estimate"
    );
    assert_eq!(books.tokens_used(), tokens(&u1));
}

/// Reads `resp`'s stream until a chunk carrying usage, then drops it (the client went away
/// before the end).
async fn drop_after_usage(resp: LlmResponse) {
    let ResponseBody::Stream(mut s) = resp.body else {
        panic!("a stream")
    };
    while let Some(item) = s.next().await {
        if item.unwrap().usage().is_some() {
            break;
        }
    }
    drop(s);
}

#[tokio::test(start_paused = true)]
async fn a_stream_dropped_by_the_client_after_its_usage_is_counted() {
    let u = Usage::new(70, 30);
    let mut r = req();
    r.stream = Some(true);

    // Straight over the provider, and behind a fallback's commit point.
    let mock = MockLlm::new("m").then(Step::stream(["a", "b"]).with_usage(u.clone()));
    let books = Books::new();
    let mut svc = books.wrap(mock);
    drop_after_usage(call(&mut svc, r.clone()).await.unwrap()).await;
    let c = price_a().cost(&u);
    let t = books.cost.totals();
    assert_eq!((t.total.requests, t.total.unknown_usage), (1, 0));
    assert_eq!(t.total.nano_usd, c);
    assert_eq!(books.budget_spent(), c, "the actual cost, not the estimate");
    assert_eq!(books.tokens_used(), tokens(&u));

    let b = MockLlm::new("b").then(Step::stream(["a", "b"]).with_usage(u.clone()));
    let chain = Fallback::new(vec![FallbackTarget::new("b", b).with_model("model-b")]);
    let books = Books::new();
    let mut svc = books.wrap(chain);
    drop_after_usage(call(&mut svc, r).await.unwrap()).await;
    let c = price_b().cost(&u);
    assert_eq!(books.cost.totals().by_model["model-b"].nano_usd, c);
    assert_eq!(books.budget_spent(), c);
    assert_eq!(books.tokens_used(), tokens(&u));
}

#[tokio::test(start_paused = true)]
async fn cache_write_tokens_are_priced_at_their_own_price() {
    let price = ModelPrice::per_token_nano(1000, 2000, 100).with_cache_write_pico(1_250_000);
    // 1000 input tokens: 300 plain, 200 read from the cache, 500 written to it.
    let mut u = Usage::new(1000, 10).with_cached_tokens(200);
    u.prompt_tokens_details.as_mut().unwrap().cache_write_tokens = Some(500);
    let expected = 300 * 1000 + 200 * 100 + 500 * 1250 + 10 * 2000;
    assert_eq!(price.cost(&u), expected);

    let layer = CostLayer::new(PriceTable::new().with("model-a", price));
    let mock = MockLlm::new("m").then(Step::reply("hi").with_usage(u.clone()));
    let mut svc = layer.layer(mock);
    let resp = call(&mut svc, req()).await.unwrap();
    assert_eq!(resp.meta.cost.unwrap().nano_usd, expected);
    assert_eq!(layer.totals().total.nano_usd, expected);

    // From configuration (USD per million tokens); the write price defaults to the input's.
    let t: PriceTable = serde_json::from_str(
        r#"{"claude": {"input_per_mtok_usd": 3.0, "output_per_mtok_usd": 15.0,
                       "cached_input_per_mtok_usd": 0.3, "cache_write_input_per_mtok_usd": 3.75},
            "gpt": {"input_per_mtok_usd": 2.5, "output_per_mtok_usd": 10.0}}"#,
    )
    .unwrap();
    assert_eq!(t.get("claude").unwrap().1.cache_write_input, 3_750_000);
    assert_eq!(t.get("gpt").unwrap().1.cache_write_input, 2_500_000);
    let bad = serde_json::from_str::<PriceTable>(
        r#"{"m": {"input_per_mtok_usd": 1.0, "output_per_mtok_usd": 1.0, "cache_write_input_per_mtok_usd": -1.0}}"#,
    );
    assert!(bad.is_err());
    // Counts the upstream sent that do not add up are capped at the prompt tokens.
    let mut odd = Usage::new(100, 0).with_cached_tokens(80);
    odd.prompt_tokens_details
        .as_mut()
        .unwrap()
        .cache_write_tokens = Some(u64::MAX);
    assert_eq!(price.cost(&odd), 80 * 100 + 20 * 1250);
}

/// The issue's acceptance test: a validation retry and a failing fallback attempt in one
/// request; the totals are the sum over every paid attempt, per model, task and tenant,
/// and the budget and the token limit are settled with the same numbers.
#[tokio::test(start_paused = true)]
async fn cost_totals_equal_the_sum_over_every_paid_attempt() {
    let u1 = Usage::new(100, 5); // a: fails after reporting usage
    let u2 = Usage::new(50, 10); // b: answers, validation rejects it
    let u3 = Usage::new(60, 20); // a: the retry, accepted
    let a = MockLlm::new("a")
        .then(Step::error(
            LlmError::transport("the connection broke mid-stream").with_usage(None, u1.clone()),
        ))
        .then(Step::reply(r#"{"ok": true}"#).with_usage(u3.clone()));
    let b = MockLlm::new("b").then(Step::reply("not json").with_usage(u2.clone()));
    let chain = Fallback::new(vec![
        FallbackTarget::new("a", a.clone()).with_model("model-a"),
        FallbackTarget::new("b", b.clone()).with_model("model-b"),
    ])
    .no_cooldown();
    let books = Books::new();
    let validate = ValidateLayer::new().task("extract", Rule::json());
    let mut svc = books.wrap(validate.layer(chain));

    let resp = call(&mut svc, req()).await.unwrap();
    assert_eq!((a.calls(), b.calls()), (2, 1), "three paid attempts");
    assert_eq!(resp.meta.model.as_deref(), Some("model-a"));
    let models: Vec<_> = resp
        .meta
        .paid_attempts
        .iter()
        .map(|p| p.model.as_deref())
        .collect();
    assert_eq!(models, [Some("model-a"), Some("model-b")]);

    let (c1, c2, c3) = (
        price_a().cost(&u1),
        price_b().cost(&u2),
        price_a().cost(&u3),
    );
    let sum = c1 + c2 + c3;
    let t = books.cost.totals();
    assert_eq!(t.total.nano_usd, sum);
    assert_eq!(t.total.prompt_tokens, 100 + 50 + 60);
    assert_eq!(t.total.completion_tokens, 5 + 10 + 20);
    assert_eq!((t.total.requests, t.total.discarded_attempts), (1, 2));
    assert_eq!(t.by_model["model-a"].nano_usd, c1 + c3);
    assert_eq!(t.by_model["model-b"].nano_usd, c2);
    assert_eq!(t.by_task["extract"].nano_usd, sum);
    assert_eq!(t.by_tenant["acme"].nano_usd, sum);
    assert_eq!(resp.meta.cost.unwrap().nano_usd, sum);
    assert_eq!(
        books.budget_spent(),
        sum,
        "budget settled with every attempt"
    );
    assert_eq!(
        books.tokens_used(),
        tokens(&u1) + tokens(&u2) + tokens(&u3),
        "token limit settled with every attempt"
    );
}
