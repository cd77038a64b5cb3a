//! The llm-tower stack behind real tonic handlers, over a real TCP socket.

use example_tonic_app::pb::ExplainRequest;
use example_tonic_app::pb::assistant_client::AssistantClient;
use example_tonic_app::pb::assistant_server::AssistantServer;
use example_tonic_app::{AssistantService, demo_llm, llm_stack};
use futures_util::StreamExt;
use llm_tower_core::LlmError;
use llm_tower_test::{MockLlm, Step};
use tonic::Code;
use tonic::transport::{Channel, Server};

/// Compile-only: the layered stack satisfies tonic's `Server::builder()` bounds
/// (`Send + Sync + 'static` handlers, `Send` futures), with and without boxing.
#[allow(dead_code)]
fn stack_works_under_tonic_server_builder() {
    // The stack as `llm_stack` builds it, over the demo provider.
    let svc = AssistantService::new(llm_stack(demo_llm()));
    let _router = Server::builder().add_service(AssistantServer::new(svc));
    // An unboxed stack of every llm-tower layer, straight from ServiceBuilder, works too:
    // each layer's service is Clone + Send + Sync with Send futures.
    use llm_tower::LlmServiceBuilderExt;
    use std::time::Duration;
    let unboxed =
        tower::ServiceBuilder::new()
            .layer(llm_tower::rate_limit::RateLimitLayer::new().rule(
                llm_tower::rate_limit::Rule::requests(10, Duration::from_secs(1)).per_tenant(),
            ))
            .cost(llm_tower::cost::CostLayer::new(
                llm_tower::cost::PriceTable::new(),
            ))
            .cache(llm_tower::cache::CacheLayer::in_memory(1 << 20))
            .validate(llm_tower::validate::ValidateLayer::new())
            .route(llm_tower::route::RouteLayer::new(
                llm_tower::route::RoutePolicy::new().default_target("p"),
                "p",
            ))
            .fallback(llm_tower::fallback::FallbackLayer::new(vec![
                llm_tower::fallback::FallbackTarget::new("backup", MockLlm::new("b")),
            ]))
            .service(MockLlm::new("m"));
    let _router =
        Server::builder().add_service(AssistantServer::new(AssistantService::new(unboxed)));
}

async fn start<P>(provider: P) -> AssistantClient<Channel>
where
    P: tower::Service<
            llm_tower_core::ChatRequest,
            Response = llm_tower_core::LlmResponse,
            Error = LlmError,
        > + Clone
        + Send
        + Sync
        + 'static,
    P::Future: Send + 'static,
{
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let svc = AssistantService::new(llm_stack(provider));
    tokio::spawn(
        Server::builder()
            .add_service(AssistantServer::new(svc))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    AssistantClient::connect(format!("http://{addr}"))
        .await
        .unwrap()
}

fn topic(t: &str) -> ExplainRequest {
    ExplainRequest {
        topic: t.into(),
        tenant: "acme".into(),
    }
}

#[tokio::test]
async fn explain_goes_through_the_stack() {
    let provider = MockLlm::new("p").then(Step::reply("Tower is a service abstraction."));
    let mut client = start(provider.clone()).await;
    let reply = client.explain(topic("tower")).await.unwrap().into_inner();
    assert_eq!(reply.text, "Tower is a service abstraction.");
    // The route layer rewrote the model for the `explain` task.
    assert_eq!(reply.model, "small-model");
    let seen = provider.last_request().unwrap();
    assert_eq!(seen.model, "small-model");
    assert_eq!(seen.task_type().map(|t| t.as_str()), Some("explain"));
    assert_eq!(seen.tenant().map(|t| t.as_str()), Some("acme"));
    assert!(reply.total_tokens > 0);
}

#[tokio::test]
async fn stream_delivers_chunks_in_order() {
    let provider = MockLlm::new("p").then(Step::stream(["Tower ", "is ", "great."]));
    let mut client = start(provider).await;
    let mut stream = client
        .explain_stream(topic("tower"))
        .await
        .unwrap()
        .into_inner();
    let mut text = String::new();
    while let Some(chunk) = stream.next().await {
        text.push_str(&chunk.unwrap().text);
    }
    assert_eq!(text, "Tower is great.");
}

#[tokio::test]
async fn a_stream_cut_upstream_ends_with_an_error_status() {
    let provider = MockLlm::new("p")
        .then(Step::stream(["one ", "two ", "three"]).fail_after(2, LlmError::transport("reset")));
    let mut client = start(provider).await;
    let mut stream = client
        .explain_stream(topic("tower"))
        .await
        .unwrap()
        .into_inner();
    let mut got = Vec::new();
    let mut err = None;
    while let Some(item) = stream.next().await {
        match item {
            Ok(c) => got.push(c.text),
            Err(s) => {
                err = Some(s);
                break;
            }
        }
    }
    assert_eq!(got, ["one ", "two "]);
    assert_eq!(
        err.expect("an error status, not a clean end").code(),
        Code::Unavailable
    );
}

#[tokio::test]
async fn llm_errors_map_to_grpc_codes() {
    let cases = [
        (LlmError::rate_limited("slow down"), Code::ResourceExhausted),
        (LlmError::timeout("too slow"), Code::DeadlineExceeded),
        (LlmError::unavailable("down"), Code::Unavailable),
        (LlmError::bad_request("nope"), Code::InvalidArgument),
        (LlmError::auth("bad key"), Code::Unauthenticated),
        (LlmError::budget_exceeded("spent"), Code::ResourceExhausted),
        (LlmError::invalid_output("not json", "x"), Code::Internal),
    ];
    for (err, code) in cases {
        let provider = MockLlm::new("p").then(Step::error(err.clone()));
        let mut client = start(provider).await;
        let status = client.explain(topic("x")).await.unwrap_err();
        assert_eq!(status.code(), code, "{err}");
        assert_eq!(status.message(), err.message());
    }
}

#[tokio::test]
async fn empty_topic_is_rejected_without_calling_the_llm() {
    let provider = MockLlm::new("p");
    let mut client = start(provider.clone()).await;
    let status = client.explain(topic("  ")).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert_eq!(provider.calls(), 0);
}

#[tokio::test]
async fn the_demo_provider_answers_from_the_prompt() {
    let mut client = start(demo_llm()).await;
    let reply = client
        .explain(topic("backpressure"))
        .await
        .unwrap()
        .into_inner();
    assert!(reply.text.contains("backpressure"), "{}", reply.text);
}

#[tokio::test]
async fn the_second_identical_call_is_a_cache_hit() {
    let provider = MockLlm::new("p").then(Step::reply("cached answer"));
    let mut client = start(provider.clone()).await;
    let first = client.explain(topic("tower")).await.unwrap().into_inner();
    let second = client.explain(topic("tower")).await.unwrap().into_inner();
    assert_eq!(
        (first.cache.as_str(), second.cache.as_str()),
        ("miss", "hit")
    );
    assert_eq!(second.text, "cached answer");
    assert_eq!(provider.calls(), 1);
    // Another tenant never sees that entry.
    let other = client
        .explain(ExplainRequest {
            topic: "tower".into(),
            tenant: "globex".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(other.cache, "miss");
}
