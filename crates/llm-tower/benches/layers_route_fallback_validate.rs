//! Happy-path overhead of the route, fallback and validate layers over a trivial,
//! zero-latency inner service (a `service_fn`, not the mock's `Mutex`), in ns per call.
//! The JSON Schema check itself is measured separately.
//!
//! `cargo bench -p llm-tower --features route,fallback,validate --bench layers_route_fallback_validate`

use llm_tower::LlmService;
use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use futures_util::FutureExt;
use llm_tower::fallback::{FallbackLayer, FallbackTarget};
use llm_tower::route::{RouteLayer, RoutePolicy};
use llm_tower::validate::{Rule, ValidateLayer};
use llm_tower::{ChatRequest, ChatResponse, LlmError, LlmResponse, Message};
use serde_json::json;
use tower::{Layer, Service, ServiceBuilder, ServiceExt};

fn inner() -> impl Service<ChatRequest, Response = LlmResponse, Error = LlmError, Future = impl Send>
+ Clone
+ Send
+ Sync
+ 'static {
    tower::service_fn(|req: ChatRequest| async move {
        Ok::<_, LlmError>(LlmResponse::complete(ChatResponse::from_text(
            req.model,
            r#"{"name": "Ada", "age": 36}"#,
        )))
    })
}

fn request() -> ChatRequest {
    ChatRequest::new("gpt-4o-mini", vec![Message::user("Extract the person.")])
        .with_task_type("extract")
}

fn run<S>(c: &mut Criterion, name: &str, mut svc: S)
where
    S: LlmService,
{
    let req = request();
    c.bench_function(name, |b| {
        b.iter(|| {
            // Every service here is ready at once and answers at once: one poll each, no
            // executor overhead in the numbers (the runtime is entered for the timers).
            let ready = svc.ready().now_or_never().expect("ready").expect("ok");
            let resp = ready.call(req.clone()).now_or_never().expect("answered");
            black_box(resp.expect("ok"));
        });
    });
}

fn layers(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    let _guard = rt.enter();

    run(c, "baseline/service_fn", inner());

    let route = RouteLayer::new(
        RoutePolicy::new()
            .target("other", inner())
            .alias("fast", "other", "gpt-4o-mini")
            .default_target("main"),
        "main",
    );
    let route = route.layer(inner());
    run(c, "route/default_target", route.clone());
    let mut by_alias = route;
    let alias_req = ChatRequest::new("fast", vec![Message::user("Extract the person.")]);
    c.bench_function("route/alias", |b| {
        b.iter(|| {
            let ready = by_alias.ready().now_or_never().expect("ready").expect("ok");
            let resp = ready
                .call(alias_req.clone())
                .now_or_never()
                .expect("answered");
            black_box(resp.expect("ok"));
        });
    });

    let fallback = FallbackLayer::new(vec![FallbackTarget::new("backup", inner())]);
    run(c, "fallback/primary_ok", fallback.layer(inner()));

    let fallback_timed = FallbackLayer::new(vec![FallbackTarget::new("backup", inner())])
        .timeout(std::time::Duration::from_secs(30));
    run(
        c,
        "fallback/primary_ok_with_timeout",
        fallback_timed.layer(inner()),
    );

    let validate = ValidateLayer::new().task("extract", Rule::custom(|_: &str| Ok(())));
    run(c, "validate/trivial_rule", validate.layer(inner()));

    let passthrough = ValidateLayer::new().task("other", Rule::json());
    run(
        c,
        "validate/no_rule_passthrough",
        passthrough.layer(inner()),
    );

    let all = ServiceBuilder::new()
        .layer(ValidateLayer::new().task("extract", Rule::custom(|_: &str| Ok(()))))
        .layer(RouteLayer::new(
            RoutePolicy::new().default_target("chain"),
            "chain",
        ))
        .layer(FallbackLayer::new(vec![FallbackTarget::new(
            "backup",
            inner(),
        )]))
        .service(inner());
    run(c, "all_three/composed", all);

    // The validation work itself, outside any layer.
    let schema = json!({
        "type": "object",
        "properties": {"name": {"type": "string"}, "age": {"type": "integer", "minimum": 0}},
        "required": ["name", "age"]
    });
    let rule = Rule::json_schema(&schema).unwrap();
    let out = r#"{"name": "Ada", "age": 36}"#;
    c.bench_function("check/json_schema", |b| {
        b.iter(|| black_box(rule.check(black_box(out))));
    });
    let json = Rule::json();
    c.bench_function("check/is_json", |b| {
        b.iter(|| black_box(json.check(black_box(out))));
    });
}

criterion_group!(benches, layers);
criterion_main!(benches);
