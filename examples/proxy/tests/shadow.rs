//! Shadow traffic through the whole gateway (simulated providers, paused clock): the
//! candidate's quality and cost land in the shadow series only; the served request's
//! rate limits, budget and cache entries are untouched by the copies.

use axum::body::{Body, to_bytes};
use axum::http::{Request, StatusCode};
use llm_tower_proxy::config::Config;
use serde_json::{Value, json};
use tower::ServiceExt;

const CONFIG: &str = r#"
[providers.big]
kind = "simulated"
simulated = { latency_ms = 10, token_delay_ms = 0 }

[providers.tiny]
kind = "simulated"
simulated = { latency_ms = 5, token_delay_ms = 0, invalid_json_rate = 0.25, quality_seed = 5 }

[chains.main]
steps = [{ provider = "big", model = "sim-big" }]

[chains.candidate]
steps = [{ provider = "tiny", model = "sim-tiny" }]

[routing]
default_chain = "main"
tasks = { classify = "main" }
catch_all = true

[cache]
store = "memory"

[[rate_limits.rules]]
key = "global"
requests_per_minute = 9

[prices.sim-big]
input_per_mtok = 10.0
output_per_mtok = 30.0

[prices.sim-tiny]
input_per_mtok = 0.1
output_per_mtok = 0.4

[[budgets.limits]]
scope = "global"
usd = 100.0
per = "day"

[validators.classify]
kind = "json"

[shadow.classify]
chain = "candidate"
sample_rate = 1.0
budget_usd = 1.0
seed = 9

[jobs]
enabled = false
"#;

async fn post(router: &axum::Router, text: &str) -> (StatusCode, f64, String, String) {
    let body = json!({
        "model": "m",
        "temperature": 0,
        "response_format": {"type": "json_object"},
        "messages": [{"role": "user", "content": text}],
    });
    let req = Request::post("/v1/chat/completions")
        .header("content-type", "application/json")
        .header("x-llm-task", "classify")
        .body(Body::from(body.to_string()))
        .unwrap();
    let resp = router.clone().oneshot(req).await.unwrap();
    let (parts, body) = resp.into_parts();
    let header = |h: &str| {
        parts
            .headers
            .get(h)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned()
    };
    let cost = header("x-llm-cost-usd").parse().unwrap_or(0.0);
    let cache = header("x-llm-cache");
    let bytes = to_bytes(body, 1 << 20).await.unwrap();
    (
        parts.status,
        cost,
        cache,
        String::from_utf8_lossy(&bytes).into_owned(),
    )
}

async fn get(router: &axum::Router, uri: &str) -> String {
    let req = Request::get(uri).body(Body::empty()).unwrap();
    let resp = router.clone().oneshot(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let bytes = to_bytes(resp.into_body(), 16 << 20).await.unwrap();
    String::from_utf8_lossy(&bytes).into_owned()
}

#[tokio::test(start_paused = true)]
async fn shadow_results_and_costs_stay_apart_from_the_served_traffic() {
    let config = Config::parse(CONFIG, std::path::Path::new(".")).unwrap();
    let router = llm_tower_proxy::build(&config, &|_: &str| None)
        .await
        .unwrap()
        .router;
    let mut served_cost = 0.0;
    for i in 0..8 {
        let (status, cost, cache, body) = post(&router, &format!("review {i}")).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(cache, "miss");
        served_cost += cost;
    }
    // Let the copies run (the clock is paused: instant; the copies take 5 ms).
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    // The 9th request of the minute still passes: 8 copies took none of the 9 allowed
    // (well under a second has passed: the bucket has not refilled a request).
    let (status, cost, cache, body) = post(&router, "review 0").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(cache, "hit", "the copies wrote no cache entry of their own");
    served_cost += cost;
    let (status, _, _, _) = post(&router, "review 99").await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;

    let status: Value = serde_json::from_str(&get(&router, "/status?format=json").await).unwrap();
    let s = &status["shadow"]["classify"];
    assert_eq!(s["candidate"], "candidate");
    // 10 sampled; 9 served answers (one a cache hit) were copied; the refused 10th was not.
    assert_eq!(s["sampled"], 10, "{s}");
    assert_eq!(s["skipped"], 1, "{s}");
    assert_eq!(s["started"], 9, "{s}");
    assert_eq!(s["completed"], 9, "{s}");
    assert_eq!(s["errors"], 0);
    // The candidate breaks 1 JSON answer in 4, spread over its calls: 2 or 3 of 9.
    let invalid = s["invalid"].as_u64().unwrap();
    assert!((2..=3).contains(&invalid), "{s}");
    assert_eq!(s["valid"].as_u64().unwrap() + invalid, 9);
    assert_eq!(s["served_valid"], 9);
    // Simulated models agree on labels: every valid candidate answer matches the served one.
    assert_eq!(s["normalised"].as_u64().unwrap(), 9 - invalid, "{s}");
    assert!(s["cost_usd"].as_f64().unwrap() > 0.0);
    // The budget holds the served cost only.
    let used = status["budgets"][0]["used_usd"].as_f64().unwrap();
    assert!((used - served_cost).abs() < 1e-9, "{used} vs {served_cost}");
    // Only the served requests are in the cache: 9 distinct prompts (the 10th refused).
    assert_eq!(status["cache"]["entries"], 8);

    let metrics = get(&router, "/metrics").await;
    let line = |name: &str| {
        metrics
            .lines()
            .find(|l| l.starts_with(name) && l.contains("task=\"classify\""))
            .unwrap_or_else(|| panic!("no {name} in {metrics}"))
            .to_owned()
    };
    assert!(line("llm_shadow_calls_total").ends_with(" 9"));
    assert!(line("llm_shadow_cost_nano_usd_total").contains("candidate=\"candidate\""));
    // The served cost series never names the candidate's model.
    assert!(
        !metrics
            .lines()
            .any(|l| l.starts_with("llm_cost_nano_usd_total") && l.contains("sim-tiny")),
        "{metrics}"
    );
}
