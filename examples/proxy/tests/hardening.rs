//! Hostile input against the gateway built from a config: slow clients on real TCP,
//! `/metrics` beyond loopback, the jobs API's limits, client-made task and model names,
//! secret provider headers. A real HTTP mock upstream answers.

use std::path::Path;
use std::time::Duration;

use axum::body::{Body, to_bytes};
use axum::http::{Request, StatusCode};
use llm_tower_proxy::config::Config;
use llm_tower_test::MockUpstream;
use serde_json::{Value, json};
use tower::ServiceExt;

const VENDOR_TOKEN: &str = "vendor-secret-31337";

fn env(k: &str) -> Option<String> {
    match k {
        "UP_KEY" => Some("sk-upstream".into()),
        "VENDOR_TOKEN" => Some(VENDOR_TOKEN.into()),
        "ACME_KEY" => Some("sk-acme".into()),
        "GLOBEX_KEY" => Some("sk-globex".into()),
        "METRICS_TOKEN" => Some("scrape-token".into()),
        _ => None,
    }
}

/// A config over `upstream` with `server` as the `[server]` table's body.
fn config(upstream: &str, server: &str, jobs_db: &Path) -> Config {
    let text = format!(
        r#"
[server]
{server}

[providers.up]
kind = "openai"
base_url = "{upstream}"
api_key_env = "UP_KEY"
headers = {{ "X-Title" = "gateway" }}
headers_env = {{ "X-Vendor-Token" = "VENDOR_TOKEN" }}

[chains.main]
steps = [{{ provider = "up" }}]

[routing]
default_chain = "main"
catch_all = true   # the step has no model: any model name goes to the upstream as sent
models = {{ "fast" = "main" }}
tasks = {{ classify = "main" }}

[cache]
enabled = false

[[auth.keys]]
tenant = "acme"
key_env = "ACME_KEY"
max_job_priority = 5

[[auth.keys]]
tenant = "globex"
key_env = "GLOBEX_KEY"

[jobs]
path = "{}"
max_attempts = 3
max_backoff_ms = 1000
max_queued_per_tenant = 2
"#,
        jobs_db.display()
    );
    Config::parse(&text, Path::new(".")).unwrap()
}

struct TempPath(std::path::PathBuf);

impl TempPath {
    fn new(tag: &str) -> Self {
        Self(std::env::temp_dir().join(format!(
            "llm-tower-hardening-{tag}-{}-{}.db",
            std::process::id(),
            uuid_like()
        )))
    }
}

impl Drop for TempPath {
    fn drop(&mut self) {
        for suffix in ["", "-wal", "-shm"] {
            let mut p = self.0.clone().into_os_string();
            p.push(suffix);
            let _ = std::fs::remove_file(p);
        }
    }
}

fn uuid_like() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos()
}

async fn call(
    router: &axum::Router,
    method: &str,
    uri: &str,
    headers: &[(&str, &str)],
    body: Option<String>,
) -> (StatusCode, axum::http::HeaderMap, String) {
    let mut req = Request::builder().method(method).uri(uri);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    if body.is_some() {
        req = req.header("content-type", "application/json");
    }
    let req = req.body(body.map_or_else(Body::empty, Body::from)).unwrap();
    let resp = router.clone().oneshot(req).await.unwrap();
    let (parts, body) = resp.into_parts();
    let bytes = to_bytes(body, 64 << 20).await.unwrap();
    (
        parts.status,
        parts.headers,
        String::from_utf8_lossy(&bytes).into_owned(),
    )
}

fn chat(model: &str) -> String {
    json!({"model": model, "messages": [{"role": "user", "content": "hi"}]}).to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_are_not_public_beyond_loopback() {
    let up = MockUpstream::start().await;
    let db = TempPath::new("metrics");
    let url = up.base_url();

    // 0.0.0.0 without a token or a listener of their own: not served.
    let cfg = config(&url, r#"listen = "0.0.0.0:8080""#, &db.0);
    let gw = llm_tower_proxy::build(&cfg, &env).await.unwrap();
    let (status, _, body) = call(&gw.router, "GET", "/metrics", &[], None).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    assert!(gw.metrics_listener.is_none());

    // Loopback: public, as before.
    let cfg = config(&url, r#"listen = "127.0.0.1:8080""#, &db.0);
    let gw = llm_tower_proxy::build(&cfg, &env).await.unwrap();
    assert_eq!(
        call(&gw.router, "GET", "/metrics", &[], None).await.0,
        StatusCode::OK
    );

    // A bearer token.
    let cfg = config(
        &url,
        "listen = \"0.0.0.0:8080\"\nmetrics_token_env = \"METRICS_TOKEN\"",
        &db.0,
    );
    let gw = llm_tower_proxy::build(&cfg, &env).await.unwrap();
    let acme = ("authorization", "Bearer sk-acme");
    let (status, _, _) = call(
        &gw.router,
        "POST",
        "/v1/chat/completions",
        &[acme],
        Some(chat("fast")),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let (status, _, body) = call(&gw.router, "GET", "/metrics", &[], None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(
        serde_json::from_str::<Value>(&body).unwrap()["error"]["type"],
        "authentication_error"
    );
    // A client key is not the metrics token.
    let (status, _, _) = call(
        &gw.router,
        "GET",
        "/metrics",
        &[("authorization", "Bearer sk-acme")],
        None,
    )
    .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let (status, _, body) = call(
        &gw.router,
        "GET",
        "/metrics",
        &[("authorization", "Bearer scrape-token")],
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert!(body.contains("llm_requests_total"), "{body}");

    // A listener of their own: not on the main router, served by the other one.
    let cfg = config(
        &url,
        "listen = \"0.0.0.0:8080\"\nmetrics_listen = \"127.0.0.1:0\"",
        &db.0,
    );
    let mut gw = llm_tower_proxy::build(&cfg, &env).await.unwrap();
    assert_eq!(
        call(&gw.router, "GET", "/metrics", &[], None).await.0,
        StatusCode::NOT_FOUND
    );
    let (addr, admin) = gw.metrics_listener.take().unwrap();
    assert_eq!(addr.to_string(), "127.0.0.1:0");
    let (status, _, _) = call(
        &gw.router,
        "POST",
        "/v1/chat/completions",
        &[("authorization", "Bearer sk-acme")],
        Some(chat("fast")),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let (status, _, body) = call(&admin, "GET", "/metrics", &[], None).await;
    assert_eq!(status, StatusCode::OK);
    assert!(body.contains("llm_requests_total"), "{body}");
    assert_eq!(
        call(&admin, "GET", "/v1/models", &[], None).await.0,
        StatusCode::NOT_FOUND
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn made_up_task_and_model_names_are_one_other_series() {
    let up = MockUpstream::start().await;
    let db = TempPath::new("names");
    let cfg = config(&up.base_url(), r#"listen = "127.0.0.1:8080""#, &db.0);
    let gw = llm_tower_proxy::build(&cfg, &env).await.unwrap();
    let key = ("authorization", "Bearer sk-acme");
    for i in 0..300 {
        let task = format!("task-{i}");
        let (status, _, body) = call(
            &gw.router,
            "POST",
            "/v1/chat/completions",
            &[key, ("x-llm-task", task.as_str())],
            Some(chat(&format!("model-{i}"))),
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{body}");
    }
    // A known task and alias keep their names.
    let (status, _, _) = call(
        &gw.router,
        "POST",
        "/v1/chat/completions",
        &[key, ("x-llm-task", "classify")],
        Some(chat("fast")),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let (_, _, page) = call(&gw.router, "GET", "/metrics", &[], None).await;
    let series: Vec<&str> = page
        .lines()
        .filter(|l| l.starts_with("llm_requests_total{"))
        .collect();
    assert_eq!(series.len(), 2, "{series:#?}");
    assert!(
        page.contains(
            r#"llm_requests_total{task="other",model="other",provider="up",tenant="acme",status="ok"} 300"#
        ),
        "{series:#?}"
    );
    assert!(
        page.contains(r#"task="classify",model="fast""#),
        "{series:#?}"
    );
    assert!(!page.contains("task-1") && !page.contains("model-1"));

    // The secret header reached the upstream, next to the plain one; it is in no output.
    let seen = up.last_request().unwrap();
    assert_eq!(seen.header("x-vendor-token"), Some(VENDOR_TOKEN));
    assert_eq!(seen.header("x-title"), Some("gateway"));
    let secrets = cfg.resolve_secrets(env).unwrap();
    let printed = format!("{cfg:?} {secrets:?} {gw:?}");
    assert!(!printed.contains(VENDOR_TOKEN), "{printed}");
    assert!(!page.contains(VENDOR_TOKEN));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_jobs_api_is_bounded_like_the_chat_api() {
    let up = MockUpstream::start().await;
    let db = TempPath::new("jobs");
    let cfg = config(
        &up.base_url(),
        "listen = \"127.0.0.1:8080\"\nbody_limit_bytes = 2048",
        &db.0,
    );
    // The worker is not spawned: submitted jobs stay queued.
    let gw = llm_tower_proxy::build(&cfg, &env).await.unwrap();
    let acme = ("authorization", "Bearer sk-acme");
    let globex = ("authorization", "Bearer sk-globex");
    let job = |extra: Value| {
        let mut b = json!({"model": "fast", "messages": [{"role": "user", "content": "hi"}]});
        if !extra.is_null() {
            b["job"] = extra;
        }
        b.to_string()
    };
    let error_of = |body: &str| serde_json::from_str::<Value>(body).unwrap()["error"].clone();

    // With client keys configured the jobs routes require one.
    let (status, _, body) = call(&gw.router, "POST", "/v1/jobs", &[], Some(job(Value::Null))).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
    let (status, _, _) = call(
        &gw.router,
        "GET",
        "/v1/jobs/0190d3a2-0000-7000-8000-000000000000",
        &[],
        None,
    )
    .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);

    // The server's body limit, as JSON.
    let big = json!({"model": "fast", "messages": [{"role": "user", "content": "x".repeat(4096)}]});
    let (status, _, body) = call(
        &gw.router,
        "POST",
        "/v1/jobs",
        &[acme],
        Some(big.to_string()),
    )
    .await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{body}");
    assert!(error_of(&body)["message"].is_string(), "{body}");

    // Priority: acme's key allows 5, globex's the default 0.
    let (status, _, body) = call(
        &gw.router,
        "POST",
        "/v1/jobs",
        &[acme],
        Some(job(json!({"priority": 6}))),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert_eq!(error_of(&body)["param"], "job.priority");
    let (status, _, body) = call(
        &gw.router,
        "POST",
        "/v1/jobs",
        &[globex],
        Some(job(json!({"priority": 1}))),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    // Attempts and back-off are capped by the config.
    for (opts, param) in [
        (json!({"max_attempts": 4}), "job.max_attempts"),
        (json!({"backoff_ms": 1001}), "job.backoff_ms"),
    ] {
        let (status, _, body) =
            call(&gw.router, "POST", "/v1/jobs", &[acme], Some(job(opts))).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
        assert_eq!(error_of(&body)["param"], param);
    }
    let (status, _, body) = call(
        &gw.router,
        "POST",
        "/v1/jobs",
        &[acme],
        Some(job(json!({"priority": 5, "max_attempts": 3}))),
    )
    .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");

    // Two queued per tenant, then 429.
    let (status, _, _) = call(
        &gw.router,
        "POST",
        "/v1/jobs",
        &[acme],
        Some(job(Value::Null)),
    )
    .await;
    assert_eq!(status, StatusCode::ACCEPTED);
    let (status, headers, body) = call(
        &gw.router,
        "POST",
        "/v1/jobs",
        &[acme],
        Some(job(Value::Null)),
    )
    .await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{body}");
    assert!(headers.contains_key("retry-after"));
    assert_eq!(error_of(&body)["code"], "too_many_queued_jobs");
    assert_eq!(error_of(&body)["type"], "rate_limit_error");
    let (status, _, _) = call(
        &gw.router,
        "POST",
        "/v1/jobs",
        &[globex],
        Some(job(Value::Null)),
    )
    .await;
    assert_eq!(status, StatusCode::ACCEPTED);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_clients_are_shed_by_the_gateway_server() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let up = MockUpstream::start().await;
    let db = TempPath::new("slow");
    let cfg = config(
        &up.base_url(),
        "listen = \"127.0.0.1:0\"\nheader_read_timeout_secs = 1\nidle_timeout_secs = 1\nmax_connections = 1000",
        &db.0,
    );
    let gw = llm_tower_proxy::build(&cfg, &env).await.unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(
        gw.server
            .clone()
            .serve(listener, gw.router.clone(), async move {
                let _ = stopped.await;
            }),
    );

    let mut slow = Vec::new();
    for _ in 0..100 {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nauthoriz")
            .await
            .unwrap();
        slow.push(tokio::spawn(async move {
            let mut buf = [0u8; 512];
            loop {
                match s.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
            }
        }));
    }
    // Ordinary requests are answered meanwhile, each on a connection of its own.
    let body = chat("fast");
    for _ in 0..5 {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        let req = format!(
            "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nauthorization: Bearer sk-acme\r\n\
             content-type: application/json\r\nconnection: close\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        );
        s.write_all(req.as_bytes()).await.unwrap();
        let mut out = Vec::new();
        tokio::time::timeout(Duration::from_secs(30), s.read_to_end(&mut out))
            .await
            .unwrap()
            .unwrap();
        let out = String::from_utf8_lossy(&out);
        assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    }
    // Generous bound: "closed eventually", not how fast.
    for s in slow {
        tokio::time::timeout(Duration::from_secs(30), s)
            .await
            .expect("a slow connection is closed")
            .unwrap();
    }
    tokio::time::timeout(Duration::from_secs(30), async {
        while gw.server.stats().open() > 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("every connection is closed");
    // The connection counters are on /metrics (listen is loopback here: public).
    let (_, _, page) = call(&gw.router, "GET", "/metrics", &[], None).await;
    assert!(page.contains("llm_connections_open 0"), "{page}");
    assert!(page.contains("llm_connections_refused_total"), "{page}");
    stop.send(()).unwrap();
    server.await.unwrap().unwrap();
}
