//! A provider's limits shared by two gateway replicas through Redis (`[rate_limits] store =
//! "redis"`): together they stay under the provider's limit and hand the rest to the next
//! step of the chain before the provider answers 429.

use std::time::Duration;

use http::StatusCode;
use llm_tower_e2e::{ACME_KEY, Client, TestGateway, chat, poll_until, required_env};
use llm_tower_test::MockUpstream;
use tokio::task::JoinSet;

/// Provider names are the shared keys' names: unique per run, so that runs (and
/// concurrent tests) never share a bucket.
fn unique_name(tag: &str) -> String {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    format!("{tag}_{}_{}", std::process::id(), t.as_nanos())
}

/// Two steps: `limited` (with `limits`), then the healthy `spare`.
fn config(name: &str, limited: &MockUpstream, spare: &MockUpstream, limits: &str) -> String {
    format!(
        r#"
[server]
listen = "127.0.0.1:0"

[providers.{name}]
kind = "openai"
base_url = "{limited}/v1"
api_key_env = "E2E_UPSTREAM_KEY"
rate_limit = {{ {limits} }}

[providers.spare]
kind = "openai"
base_url = "{spare}/v1"
api_key_env = "E2E_UPSTREAM_KEY"

[chains.main]
steps = [{{ provider = "{name}" }}, {{ provider = "spare" }}]

[routing]
default_chain = "main"
catch_all = true

[cache]
enabled = false

[rate_limits]
store = "redis"
redis_url_env = "REDIS_URL"
headroom_refresh_ms = 20

[[auth.keys]]
tenant = "acme"
key_env = "E2E_ACME_KEY"

[jobs]
enabled = false
"#,
        limited = limited.base_url(),
        spare = spare.base_url(),
    )
}

/// Sends `n` requests at once, alternating between the replicas; every answer must be a
/// 200 (no 429 reaches the client). Returns how many each provider served.
async fn burst(replicas: [&TestGateway; 2], n: usize, tag: &str) -> Vec<String> {
    let client = Client::with_key(ACME_KEY);
    let mut set = JoinSet::new();
    for i in 0..n {
        let url = replicas[i % 2].url("/v1/chat/completions");
        let client = client.clone();
        let body = chat("gpt-4o-mini", &format!("{tag} {i}"), false);
        set.spawn(async move { client.post(&url, &[], &body).await });
    }
    let mut served_by = Vec::new();
    while let Some(r) = set.join_next().await {
        let r = r.expect("request task");
        assert_eq!(r.status, StatusCode::OK, "{}", r.text());
        served_by.push(r.header("x-llm-provider").to_owned());
    }
    served_by
}

#[tokio::test]
#[ignore = "needs REDIS_URL (run with -- --include-ignored; .ci/run sets it)"]
async fn replicas_share_a_providers_request_limit() {
    required_env("REDIS_URL");
    let limited = MockUpstream::start().await;
    let spare = MockUpstream::start().await;
    // The provider allows 8 requests a minute; the gateway's rule says 6 (a 6-per-minute
    // bucket refills one request per 10 s, so the margin of 2 holds for 20 s of test).
    limited.set_rate_cap(Some((8, Duration::from_secs(60))));
    let name = unique_name("lim");
    let toml = config(&name, &limited, &spare, "requests_per_minute = 6");
    let a = TestGateway::start(&toml).await;
    let b = TestGateway::start(&toml).await;

    // 30 concurrent requests over both replicas: each replica alone would allow 6, so
    // per-process buckets would send up to 12 and the provider would refuse 4.
    let served_by = burst([&a, &b], 30, "rpm").await;
    let on_limited = served_by.iter().filter(|p| **p == name).count();
    let on_spare = served_by.iter().filter(|p| *p == "spare").count();
    assert_eq!(on_limited + on_spare, 30, "{served_by:?}");
    assert_eq!(
        limited.rate_capped_count(),
        0,
        "the provider never said 429"
    );
    assert!(
        (1..=8).contains(&limited.request_count()),
        "the limited provider saw {} requests",
        limited.request_count()
    );
    assert_eq!(on_limited, limited.request_count());
    assert_eq!(spare.request_count(), on_spare);
}

#[tokio::test]
#[ignore = "needs REDIS_URL (run with -- --include-ignored; .ci/run sets it)"]
async fn replicas_share_the_headroom_one_of_them_learned() {
    required_env("REDIS_URL");
    let limited = MockUpstream::start().await;
    let spare = MockUpstream::start().await;
    // No bucket of our own: only the provider's `x-ratelimit-remaining-requests`, kept
    // at 3 or more.
    limited.set_rate_cap(Some((8, Duration::from_secs(60))));
    let name = unique_name("hr");
    let toml = config(&name, &limited, &spare, "min_remaining_requests = 3");
    let a = TestGateway::start(&toml).await;
    let b = TestGateway::start(&toml).await;
    let client = Client::with_key(ACME_KEY);

    // Replica A alone, one request at a time, until the headroom it learns sends it to
    // the spare: remaining 7, 6, 5, 4, 3, 2 → refused after the sixth.
    let mut i = 0;
    let first_spare = poll_until(20, || {
        i += 1;
        let (client, url) = (client.clone(), a.url("/v1/chat/completions"));
        async move {
            let r = client
                .post(&url, &[], &chat("gpt-4o-mini", &format!("a {i}"), false))
                .await;
            assert_eq!(r.status, StatusCode::OK, "{}", r.text());
            (r.header("x-llm-provider") == "spare").then_some(i)
        }
    })
    .await
    .expect("replica A moved to the spare");
    assert_eq!(first_spare, 7);
    assert_eq!(limited.request_count(), 6);

    // A's observation reaches Redis, then B reads it: the documented bound is twice
    // `headroom_refresh_ms` (40 ms); wait for the key, then 25 refresh intervals.
    let redis = redis::Client::open(required_env("REDIS_URL")).expect("REDIS_URL");
    let conn = redis
        .get_multiplexed_async_connection()
        .await
        .expect("connect to REDIS_URL");
    let key = format!("llm-tower:hr:v1:{{{name}}}:r");
    let stored = poll_until(250, || {
        let (mut conn, key) = (conn.clone(), key.clone());
        async move {
            redis::cmd("GET")
                .arg(&key)
                .query_async::<Option<u64>>(&mut conn)
                .await
                .ok()
                .flatten()
        }
    })
    .await;
    assert_eq!(stored, Some(2), "A's observation is in Redis");
    tokio::time::sleep(Duration::from_millis(500)).await;

    // B has sent nothing to the provider itself. A burst at B alone: without A's
    // observation B would send all of it (2 served, 8 refused with 429 upstream).
    let served_by = burst([&b, &b], 10, "b").await;
    assert!(served_by.iter().all(|p| p == "spare"), "{served_by:?}");
    assert_eq!(limited.request_count(), 6, "B sent nothing to the provider");
    assert_eq!(limited.rate_capped_count(), 0);
}
