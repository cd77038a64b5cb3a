//! Overhead of the cost layer (pricing, totals, an in-memory budget).
//!
//! `cargo bench -p llm-tower --features cost --bench cost`

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use futures_util::FutureExt;
use llm_tower::cost::{Budget, BudgetWindow, CostLayer, ModelPrice, PriceTable};
use llm_tower::{ChatRequest, ChatResponse, LlmError, LlmResponse, Message, Usage};
use tower::{Layer, Service};

fn request() -> ChatRequest {
    let mut r = ChatRequest::new(
        "gpt-4o-mini-2024-07-18",
        vec![Message::system("You are terse."), Message::user("Say hi")],
    )
    .with_tenant("acme")
    .with_task_type("chat");
    r.max_tokens = Some(64);
    r
}

fn inner() -> impl Service<
    ChatRequest,
    Response = LlmResponse,
    Error = LlmError,
    Future = std::future::Ready<Result<LlmResponse, LlmError>>,
> + Clone {
    let mut resp = ChatResponse::from_text("gpt-4o-mini-2024-07-18", "hi");
    resp.usage = Some(Usage::new(20, 5));
    // Shared, so cloning the service stays cheap.
    let resp = std::sync::Arc::new(resp);
    tower::service_fn(move |_req: ChatRequest| {
        std::future::ready(Ok::<_, LlmError>(LlmResponse::complete(
            ChatResponse::clone(&resp),
        )))
    })
}

fn prices() -> PriceTable {
    let mut t = PriceTable::new();
    for (m, i, o) in [
        ("gpt-4o-mini", 0.15, 0.6),
        ("gpt-4o", 2.5, 10.0),
        ("claude-3-5-haiku", 0.8, 4.0),
    ] {
        t = t.with(
            m,
            ModelPrice::per_mtok_usd(i, o, None).expect("valid price"),
        );
    }
    t
}

fn bench(c: &mut Criterion) {
    let req = request();
    let mut bare = inner();
    c.bench_function("cost/baseline_inner_only", |b| {
        b.iter(|| black_box(bare.call(req.clone()).now_or_never()));
    });
    let mut priced = CostLayer::new(prices()).layer(inner());
    c.bench_function("cost/layer_price_and_totals", |b| {
        b.iter(|| black_box(priced.call(req.clone()).now_or_never()));
    });
    let mut budgeted = CostLayer::new(prices())
        .budget(Budget::per_tenant(u64::MAX / 2, BudgetWindow::Daily))
        .layer(inner());
    c.bench_function("cost/layer_with_budget", |b| {
        b.iter(|| black_box(budgeted.call(req.clone()).now_or_never()));
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
