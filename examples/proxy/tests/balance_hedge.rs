//! A chain step that is a balanced group, and a hedged chain, through the gateway's router
//! with tokio's clock paused (simulated providers).

use axum::body::{Body, to_bytes};
use axum::http::{Request, StatusCode};
use llm_tower_proxy::config::Config;
use serde_json::{Value, json};
use tower::ServiceExt;

const CONFIG: &str = r#"
[providers.fast]
kind = "simulated"
simulated = { latency_ms = 50, token_delay_ms = 0 }

[providers.slow]
kind = "simulated"
simulated = { latency_ms = 5000, token_delay_ms = 0 }

[chains.group]
steps = [{ group = ["fast", "slow"], model = "sim-small" }]

[chains.hedged]
steps = [{ group = ["slow", "fast"], model = "sim-small", pick = "round_robin" }]

[chains.hedged.hedge]
delay_ms = 200
budget_percent = 100

[routing]
default_chain = "group"
catch_all = true
models = { hedged = "hedged" }

[cache]
enabled = false

[jobs]
enabled = false
"#;

async fn router() -> axum::Router {
    let config = Config::parse(CONFIG, std::path::Path::new(".")).unwrap();
    llm_tower_proxy::build(&config, &|_: &str| None)
        .await
        .unwrap()
        .router
}

async fn post(router: &axum::Router, model: &str) -> (StatusCode, String, String) {
    let body = json!({"model": model, "messages": [{"role": "user", "content": "hi"}]});
    let req = Request::post("/v1/chat/completions")
        .header("content-type", "application/json")
        .body(Body::from(body.to_string()))
        .unwrap();
    let resp = router.clone().oneshot(req).await.unwrap();
    let (parts, body) = resp.into_parts();
    let provider = parts
        .headers
        .get("x-llm-provider")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    let bytes = to_bytes(body, 1 << 20).await.unwrap();
    (
        parts.status,
        provider,
        String::from_utf8_lossy(&bytes).into_owned(),
    )
}

#[tokio::test(start_paused = true)]
async fn a_balanced_group_prefers_its_fast_member() {
    let router = router().await;
    let mut fast = 0;
    for _ in 0..30 {
        let (status, provider, text) = post(&router, "anything").await;
        assert_eq!(status, StatusCode::OK, "{text}");
        assert!(provider == "fast" || provider == "slow", "{provider}");
        fast += usize::from(provider == "fast");
    }
    assert!(fast >= 25, "the fast member served {fast} of 30");
}

#[tokio::test(start_paused = true)]
async fn a_hedged_chain_answers_from_the_other_member() {
    let router = router().await;
    // Round robin sends every other first attempt to "slow" (5 s): those are hedged after
    // 200 ms to "fast", which answers 50 ms later.
    for _ in 0..4 {
        let t = tokio::time::Instant::now();
        let (status, provider, text) = post(&router, "hedged").await;
        assert_eq!(status, StatusCode::OK, "{text}");
        assert_eq!(provider, "fast");
        assert!(
            t.elapsed() < std::time::Duration::from_secs(1),
            "{:?}",
            t.elapsed()
        );
    }
    let metrics = router
        .clone()
        .oneshot(Request::get("/metrics").body(Body::empty()).unwrap())
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&to_bytes(metrics.into_body(), 1 << 20).await.unwrap())
        .into_owned();
    let sent = text
        .lines()
        .find(|l| l.starts_with("llm_hedge_sent_total{chain=\"hedged\"}"))
        .unwrap_or_else(|| panic!("no hedge counter in:\n{text}"));
    let v: Value = serde_json::from_str(sent.rsplit(' ').next().unwrap()).unwrap();
    assert!(v.as_u64().unwrap() >= 2, "{sent}");
}
