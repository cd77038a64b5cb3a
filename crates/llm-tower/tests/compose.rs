//! Route, fallback and validate composed in one `ServiceBuilder` over the scripted mock.
#![cfg(all(feature = "route", feature = "fallback", feature = "validate"))]

use std::time::Duration;

use llm_tower::fallback::{FallbackLayer, FallbackTarget};
use llm_tower::route::{RouteLayer, RoutePolicy};
use llm_tower::validate::{Rule, ValidateLayer};
use llm_tower::{
    ChatRequest, ChatResponse, ErrorKind, LlmError, LlmResponse, LlmServiceBuilderExt, Message,
};
use llm_tower_test::{MockLlm, Step};
use tower::{Service, ServiceBuilder, ServiceExt};

#[tokio::test(start_paused = true)]
async fn three_layers_in_one_builder() {
    let primary = MockLlm::new("openai");
    let free = MockLlm::new("free");
    let cheap = MockLlm::new("cheap");

    let validate = ValidateLayer::new().task("extract", Rule::json());
    let stats = validate.stats();
    let policy = RoutePolicy::new()
        .target("cheap", cheap.clone())
        .function("db", |_req: ChatRequest| async move {
            Ok(LlmResponse::complete(ChatResponse::from_text(
                "db",
                r#"{"row": 1}"#,
            )))
        })
        .alias("smart", "chain", "gpt-4o")
        .task("lookup", "db")
        .default_target("cheap");
    let mut svc = ServiceBuilder::new()
        .validate(validate)
        .route(RouteLayer::new(policy, "chain"))
        .fallback(FallbackLayer::new(vec![
            FallbackTarget::new("free", free.clone()).with_model("llama"),
        ]))
        .service(primary.clone());

    // smart → chain: the primary fails (503), the free model answers prose first, then JSON.
    primary.push(Step::error(LlmError::unavailable("503")));
    free.push(Step::reply("Here you go"));
    primary.push(Step::reply(r#"{"ok": true}"#));
    let req = ChatRequest::new("smart", vec![Message::user("x")]).with_task_type("extract");
    let resp = svc.ready().await.unwrap().call(req).await.unwrap();
    assert_eq!(resp.meta.route.as_deref(), Some("chain"));
    assert_eq!(resp.meta.provider.as_deref(), Some("openai"));
    assert_eq!(resp.meta.attempts.len(), 1, "the retry's own chain");
    assert_eq!(
        resp.into_complete().await.unwrap().text(),
        r#"{"ok": true}"#
    );
    assert_eq!(primary.requests()[0].model, "gpt-4o");
    assert_eq!(free.last_request().unwrap().model, "llama");
    assert_eq!(stats.get("extract").unwrap().fixed, 1);

    // A pure-function route through the same stack.
    let req = ChatRequest::new("any", vec![Message::user("x")]).with_task_type("lookup");
    let resp = svc.ready().await.unwrap().call(req).await.unwrap();
    assert_eq!(resp.meta.route.as_deref(), Some("db"));

    // The default route: a bad request is returned at once.
    cheap.push(Step::error(LlmError::bad_request("bad")));
    let req = ChatRequest::new("whatever", vec![Message::user("x")]);
    let e = svc.ready().await.unwrap().call(req).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::BadRequest);
}

#[tokio::test(start_paused = true)]
async fn fallback_timeouts_inside_a_composed_stack() {
    let primary = MockLlm::new("p").then(Step::reply("{}").with_latency(Duration::from_secs(60)));
    let backup = MockLlm::new("b").then(Step::reply(r#"{"b": 1}"#));
    let fallback = FallbackLayer::new(vec![FallbackTarget::new("b", backup.clone())])
        .timeout(Duration::from_secs(5));
    let svc = ServiceBuilder::new()
        .validate(ValidateLayer::new().default_rule(Rule::json()))
        .fallback(fallback)
        .service(primary.clone());
    let resp = svc
        .oneshot(ChatRequest::new("m", vec![Message::user("x")]))
        .await
        .unwrap();
    assert_eq!(
        resp.meta.attempts[0].error.as_ref().unwrap().kind,
        ErrorKind::Timeout
    );
    assert_eq!(resp.into_complete().await.unwrap().text(), r#"{"b": 1}"#);
}
