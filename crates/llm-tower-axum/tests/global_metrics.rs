//! `Metrics::install_prometheus`: the recorder becomes the process-wide one (own test
//! binary, so no other test sees the global recorder).

use axum::body::Body;
use http::Request;
use http_body_util::BodyExt;
use llm_tower_axum::{Metrics, OpenAiRouter};
use llm_tower_test::MockLlm;
use tower::ServiceExt;

#[tokio::test]
async fn installed_recorder_renders_this_crate_and_other_metrics() {
    let metrics = Metrics::install_prometheus().expect("first install");
    assert!(
        Metrics::install_prometheus().is_err(),
        "only one global recorder"
    );
    // A metric recorded by some other layer through the global recorder.
    metrics::counter!("other_layer_events_total").increment(3);

    let app = OpenAiRouter::new(MockLlm::new("mock"))
        .metrics(metrics)
        .into_router();
    let req = Request::post("/v1/chat/completions")
        .body(Body::from(
            r#"{"model":"m","messages":[{"role":"user","content":"x"}]}"#,
        ))
        .unwrap();
    assert_eq!(app.clone().oneshot(req).await.unwrap().status(), 200);

    let resp = app
        .oneshot(Request::get("/metrics").body(Body::empty()).unwrap())
        .await
        .unwrap();
    let page = resp.into_body().collect().await.unwrap().to_bytes();
    let page = std::str::from_utf8(&page).unwrap();
    assert!(page.contains("other_layer_events_total 3"), "{page}");
    assert!(page.contains(r#"llm_requests_total{task="none",model="m",provider="mock",tenant="anonymous",status="ok"} 1"#), "{page}");
}
