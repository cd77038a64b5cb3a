//! Two gateway replicas sharing Redis (cache, rate limits, budgets) and PostgreSQL (jobs),
//! as `production.toml` runs them.

use http::StatusCode;
use llm_tower_e2e::{ACME_KEY, Client, TestGateway, base_config, chat, poll_until, required_env};
use llm_tower_test::{MockUpstream, Scenario};

fn shared_config(openai: &MockUpstream, anthropic: &MockUpstream) -> String {
    let base = base_config(&openai.base_url(), &anthropic.base_url(), false, "");
    // Swap the memory cache and the SQLite jobs for the shared stores.
    let base = base
        .replace("[cache]\nstore = \"memory\"\n", "")
        .replace("[jobs]\nenabled = false\n", "");
    format!(
        r#"{base}
[cache]
store = "redis"
redis_url_env = "REDIS_URL"

[rate_limits]
store = "redis"
redis_url_env = "REDIS_URL"

[[rate_limits.rules]]
key = "tenant"
requests_per_minute = 100000

[budgets]
store = "redis"
redis_url_env = "REDIS_URL"

[[budgets.limits]]
scope = "tenant"
usd = 1000.0
per = "day"

[jobs]
store = "postgres"
url_env = "DATABASE_URL"
workers = 2
"#
    )
}

fn nonce() -> String {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    format!("{}-{}", std::process::id(), t.as_nanos())
}

#[tokio::test]
#[ignore = "needs REDIS_URL and DATABASE_URL (run with -- --include-ignored; .ci/run sets them)"]
async fn replicas_share_the_cache_and_the_job_queue() {
    required_env("REDIS_URL");
    required_env("DATABASE_URL");
    let openai = MockUpstream::start().await;
    let anthropic = MockUpstream::start().await;
    openai.set_default(Scenario::ok().text("shared answer"));
    let toml = shared_config(&openai, &anthropic);
    let a = TestGateway::start(&toml).await;
    let b = TestGateway::start(&toml).await;
    let client = Client::with_key(ACME_KEY);

    // Replica A misses and stores in Redis; replica B answers the same request from it.
    let prompt = format!("shared cache {}", nonce());
    let r1 = client
        .post(
            &a.url("/v1/chat/completions"),
            &[],
            &chat("gpt-4o-mini", &prompt, false),
        )
        .await;
    assert_eq!(r1.status, StatusCode::OK, "{}", r1.text());
    assert_eq!(r1.header("x-llm-cache"), "miss");
    let r2 = client
        .post(
            &b.url("/v1/chat/completions"),
            &[],
            &chat("gpt-4o-mini", &prompt, false),
        )
        .await;
    assert_eq!(r2.header("x-llm-cache"), "hit", "{}", r2.text());
    assert_eq!(
        r2.json()["choices"][0]["message"]["content"],
        "shared answer"
    );
    assert_eq!(openai.request_count(), 1);

    // A job submitted to A is visible (and run) through B: one PostgreSQL queue.
    let job_prompt = format!("shared job {}", nonce());
    let r = client
        .post(
            &a.url("/v1/jobs"),
            &[],
            &chat("gpt-4o-mini", &job_prompt, false),
        )
        .await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.text());
    let id = r.json()["id"].as_str().unwrap().to_owned();
    let url_b = b.url(&format!("/v1/jobs/{id}"));
    let done = poll_until(500, || async {
        let v = client.get(&url_b).await.json();
        matches!(v["status"].as_str(), Some("succeeded" | "failed")).then_some(v)
    })
    .await
    .expect("the job finished");
    assert_eq!(done["status"], "succeeded", "{done}");
}
