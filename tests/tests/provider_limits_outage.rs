//! Shared provider limits while their Redis is down: requests never wait on it (the
//! buckets fail open, each replica's headroom works from what it sees), and what a replica
//! learned during the outage reaches Redis once it is back. A real `redis-server` on a
//! free port, killed and restarted.

use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use http::StatusCode;
use llm_tower_e2e::{ACME_KEY, Client, chat, poll_until, test_env};
use llm_tower_proxy::config::Config;
use llm_tower_test::MockUpstream;
use tokio::sync::oneshot;

struct RedisServer {
    port: u16,
    child: Option<Child>,
}

impl RedisServer {
    async fn start() -> Self {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let mut s = Self { port, child: None };
        s.spawn().await;
        s
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    async fn spawn(&mut self) {
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server on PATH");
        self.child = Some(child);
        let url = self.url();
        let up = poll_until(250, || {
            let url = url.clone();
            async move {
                let c = redis::Client::open(url).ok()?;
                let mut c = c.get_multiplexed_async_connection().await.ok()?;
                redis::cmd("PING")
                    .query_async::<String>(&mut c)
                    .await
                    .ok()
                    .map(|_| ())
            }
        })
        .await;
        assert!(up.is_some(), "redis-server answers");
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A replica reading `SHARED_REDIS` from `url`, the rest from [`test_env`].
async fn replica(toml: &str, url: &str) -> (String, oneshot::Sender<()>) {
    let config = Config::parse(toml, Path::new(".")).unwrap_or_else(|e| panic!("{e}"));
    let env = |k: &str| {
        if k == "SHARED_REDIS" {
            Some(url.to_owned())
        } else {
            test_env(k)
        }
    };
    let gw = llm_tower_proxy::build(&config, &env)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (tx, rx) = oneshot::channel::<()>();
    tokio::spawn(llm_tower_axum::serve(
        listener,
        gw.router,
        async move {
            let _ = rx.await;
        },
        gw.grace,
    ));
    (format!("http://{addr}/v1/chat/completions"), tx)
}

#[tokio::test]
#[ignore = "needs redis-server on PATH (run with -- --include-ignored; .ci/run does)"]
async fn redis_down_never_blocks_and_the_headroom_lands_after() {
    let mut redis = RedisServer::start().await;
    let limited = MockUpstream::start().await;
    let spare = MockUpstream::start().await;
    limited.set_rate_cap(Some((8, Duration::from_secs(60))));
    let toml = format!(
        r#"
[server]
listen = "127.0.0.1:0"

[providers.limited]
kind = "openai"
base_url = "{limited}/v1"
api_key_env = "E2E_UPSTREAM_KEY"
rate_limit = {{ requests_per_minute = 1000, min_remaining_requests = 3 }}

[providers.spare]
kind = "openai"
base_url = "{spare}/v1"
api_key_env = "E2E_UPSTREAM_KEY"

[chains.main]
steps = [{{ provider = "limited" }}, {{ provider = "spare" }}]

[routing]
default_chain = "main"
catch_all = true

[cache]
enabled = false

[rate_limits]
store = "redis"
redis_url_env = "SHARED_REDIS"
headroom_refresh_ms = 20

[[auth.keys]]
tenant = "acme"
key_env = "E2E_ACME_KEY"

[jobs]
enabled = false
"#,
        limited = limited.base_url(),
        spare = spare.base_url(),
    );
    let url = redis.url();
    let (a, _stop_a) = replica(&toml, &url).await;
    let (_b, _stop_b) = replica(&toml, &url).await;
    redis.kill();

    // Redis is gone: the bucket fails open, the headroom A learns from the provider's
    // headers still moves it to the spare before the provider says 429.
    let client = Client::with_key(ACME_KEY);
    let mut i = 0;
    let first_spare = poll_until(20, || {
        i += 1;
        let (client, url) = (client.clone(), a.clone());
        async move {
            let r = client
                .post(&url, &[], &chat("gpt-4o-mini", &format!("down {i}"), false))
                .await;
            assert_eq!(r.status, StatusCode::OK, "{}", r.text());
            (r.header("x-llm-provider") == "spare").then_some(i)
        }
    })
    .await
    .expect("A moved to the spare");
    assert_eq!(first_spare, 7);
    assert_eq!(limited.request_count(), 6);
    assert_eq!(limited.rate_capped_count(), 0);

    // Redis is back (empty): once A's breaker lets a call through (its cooldown, 5 s),
    // the observation it kept is written.
    redis.spawn().await;
    let c = redis::Client::open(redis.url()).expect("url");
    let conn = c.get_multiplexed_async_connection().await.expect("connect");
    let stored = poll_until(1000, || {
        let mut conn = conn.clone();
        async move {
            redis::cmd("GET")
                .arg("llm-tower:hr:v1:{limited}:r")
                .query_async::<Option<u64>>(&mut conn)
                .await
                .ok()
                .flatten()
        }
    })
    .await;
    assert_eq!(
        stored,
        Some(2),
        "A's observation reached Redis after the outage"
    );
}
