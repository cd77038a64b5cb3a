//! Reloading the configuration while it serves: in-process under load (64 streams in
//! flight), a refused file, and SIGHUP on the real binary with `/status` and `usage`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use llm_tower_proxy::reload::Live;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const STREAMS: usize = 64;

fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

fn dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("llm-tower-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// The config; `second` adds a provider, a chain and the alias `fresh` routed to it.
fn config(port: u16, second: bool) -> String {
    let mut c = format!(
        r#"
[server]
listen = "127.0.0.1:{port}"
shutdown_grace_secs = 20
max_connections = 1024

[providers.sim]
kind = "simulated"
simulated = {{ latency_ms = 20, token_delay_ms = 15 }}

[chains.main]
steps = [{{ provider = "sim", model = "sim-small" }}]

[routing]
default_chain = "main"
catch_all = true

[cache]
store = "memory"

[prices.sim-small]
input_per_mtok = 1.0
output_per_mtok = 2.0

[[budgets.limits]]
scope = "global"
usd = 100.0
per = "day"

[jobs]
enabled = false
"#
    );
    if second {
        c.push_str(
            r#"
[providers.sim2]
kind = "simulated"
simulated = { latency_ms = 5, token_delay_ms = 1 }

[chains.second]
steps = [{ provider = "sim2", model = "sim-small" }]

[routing.models]
fresh = "second"
"#,
        );
    }
    c
}

fn raw_post(port: u16, body: &str) -> String {
    format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: 127.0.0.1:{port}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    )
}

/// Sends `raw` and reads the whole answer (bounded by the test's own timeout).
async fn exchange(port: u16, raw: &str) -> String {
    let mut s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    s.write_all(raw.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).await.unwrap();
    String::from_utf8_lossy(&out).into_owned()
}

fn header<'a>(answer: &'a str, name: &str) -> Option<&'a str> {
    let head = answer.split("\r\n\r\n").next()?;
    head.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.eq_ignore_ascii_case(name).then_some(v.trim())
    })
}

fn chat(model: &str, content: &str, stream: bool) -> String {
    serde_json::json!({
        "model": model,
        "stream": stream,
        "temperature": 0,
        "messages": [{"role": "user", "content": content}],
    })
    .to_string()
}

async fn status(port: u16) -> Value {
    let answer = exchange(
        port,
        "GET /status HTTP/1.1\r\nhost: x\r\naccept: application/json\r\nconnection: close\r\n\r\n",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let body = answer.split("\r\n\r\n").nth(1).unwrap();
    serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body}"))
}

async fn serve(path: &Path) -> (std::sync::Arc<Live>, u16) {
    let (live, gateway) = Live::start(path, |_: &str| None).await.unwrap();
    let live = std::sync::Arc::new(live);
    let addr = live.listen_addr();
    let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
    tokio::spawn(
        gateway
            .server
            .clone()
            .serve(listener, live.router(), std::future::pending()),
    );
    (live, addr.port())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_under_64_streams_cuts_none_and_serves_the_new_routes_at_once() {
    let port = free_port();
    let path = dir("reload-load").join("gateway.toml");
    std::fs::write(&path, config(port, false)).unwrap();
    let (live, port) = serve(&path).await;

    // State to keep: a cached answer and the budget's spend.
    let cached = raw_post(port, &chat("any", "What is a reload?", false));
    let first = exchange(port, &cached).await;
    assert_eq!(header(&first, "x-llm-cache"), Some("miss"), "{first}");
    let before = status(port).await;
    let spent = before["budgets"][0]["used_usd"].as_f64().unwrap();
    assert!(spent > 0.0, "{}", before["budgets"]);

    // Before the reload, `fresh` is no alias: the default chain serves it.
    let fresh = raw_post(port, &chat("fresh", "hello", false));
    let answer = exchange(port, &fresh).await;
    assert_eq!(header(&answer, "x-llm-provider"), Some("sim"), "{answer}");

    // 64 streams, each past its headers (in flight) before the reload.
    let (started_tx, mut started_rx) = tokio::sync::mpsc::channel(STREAMS);
    let mut streams = Vec::new();
    for i in 0..STREAMS {
        let started = started_tx.clone();
        let raw = raw_post(
            port,
            &chat(
                "any",
                &format!("Tell me story number {i} about atomic swaps"),
                true,
            ),
        );
        streams.push(tokio::spawn(async move {
            let mut s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
            s.write_all(raw.as_bytes()).await.unwrap();
            let mut out = vec![0u8; 4096];
            let n = s.read(&mut out).await.unwrap();
            out.truncate(n);
            started.send(()).await.unwrap();
            s.read_to_end(&mut out).await.unwrap();
            String::from_utf8_lossy(&out).into_owned()
        }));
    }
    for _ in 0..STREAMS {
        started_rx.recv().await.unwrap();
    }

    std::fs::write(&path, config(port, true)).unwrap();
    let report = live.reload().await.unwrap();
    assert!(report.restart_needed.is_empty(), "{report:?}");

    // The new route serves right after the swap (a new prompt: the old answer is cached).
    let fresh = raw_post(port, &chat("fresh", "hello after the reload", false));
    let answer = exchange(port, &fresh).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert_eq!(header(&answer, "x-llm-provider"), Some("sim2"), "{answer}");

    // None of the streams was cut: each ends with [DONE] and no error event.
    let mut done = 0;
    for s in streams {
        let body = s.await.unwrap();
        assert!(body.starts_with("HTTP/1.1 200"), "{body}");
        assert!(body.contains("data: [DONE]"), "a stream was cut: {body}");
        assert!(!body.contains("\"error\""), "{body}");
        done += 1;
    }
    assert_eq!(done, STREAMS);

    // The cache and the budget survived (their sections did not change).
    let again = exchange(port, &cached).await;
    assert_eq!(header(&again, "x-llm-cache"), Some("hit"), "{again}");
    let after = status(port).await;
    assert!(
        after["budgets"][0]["used_usd"].as_f64().unwrap() >= spent,
        "{}",
        after["budgets"]
    );
    assert_eq!(after["config"]["reloads"], 1);
    assert!(
        after["providers"]["sim2"].is_object(),
        "{}",
        after["providers"]
    );
    assert_eq!(after["chains"]["second"]["serving"], "sim2");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_file_is_refused_with_its_line_and_the_old_config_keeps_serving() {
    let port = free_port();
    let path = dir("reload-invalid").join("gateway.toml");
    std::fs::write(&path, config(port, true)).unwrap();
    let (live, port) = serve(&path).await;

    // A chain step naming a provider that does not exist.
    let bad = config(port, true).replacen(
        "steps = [{ provider = \"sim\", model = \"sim-small\" }]",
        "steps = [{ provider = \"nope\", model = \"sim-small\" }]",
        1,
    );
    assert_ne!(bad, config(port, true));
    let line = bad.lines().position(|l| l.contains("nope")).unwrap() + 1;
    let at = format!("line {line}");
    std::fs::write(&path, &bad).unwrap();
    let err = live.reload().await.unwrap_err().to_string();
    assert!(err.contains(&at), "{err}");
    assert!(err.contains("nope"), "{err}");

    // The old stack still serves its routes.
    let answer = exchange(port, &raw_post(port, &chat("fresh", "still there?", false))).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert_eq!(header(&answer, "x-llm-provider"), Some("sim2"), "{answer}");
    let s = status(port).await;
    assert_eq!(s["config"]["failed_reloads"], 1);
    assert_eq!(s["config"]["reloads"], 0);
    assert!(
        s["config"]["last_reload_error"]
            .as_str()
            .unwrap()
            .contains(&at),
        "{}",
        s["config"]
    );

    // A listener-level change applies the rest and says what needs a restart.
    let moved = config(port, true).replace("max_connections = 1024", "max_connections = 10");
    std::fs::write(&path, moved).unwrap();
    let report = live.reload().await.unwrap();
    assert_eq!(report.restart_needed, vec!["server.max_connections"]);
    let s = status(port).await;
    assert_eq!(s["config"]["last_reload_error"], Value::Null);
    assert_eq!(s["config"]["restart_needed"][0], "server.max_connections");
}

#[cfg(unix)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_the_binary_and_usage_reads_its_status() {
    let port = free_port();
    let path = dir("reload-sighup").join("gateway.toml");
    std::fs::write(&path, config(port, false)).unwrap();
    let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_llm-tower-proxy"))
        .arg("--config")
        .arg(&path)
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut up = false;
    for _ in 0..300 {
        if TcpStream::connect(("127.0.0.1", port)).await.is_ok() {
            up = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(up, "the gateway did not start");
    let fresh = raw_post(port, &chat("fresh", "hello", false));
    let answer = exchange(port, &fresh).await;
    assert_eq!(header(&answer, "x-llm-provider"), Some("sim"), "{answer}");

    std::fs::write(&path, config(port, true)).unwrap();
    let pid = child.id().unwrap().to_string();
    let kill = std::process::Command::new("kill")
        .args(["-HUP", &pid])
        .status()
        .unwrap();
    assert!(kill.success());
    // Bounded wait for the reload to land.
    let mut reloaded = false;
    for _ in 0..300 {
        if status(port).await["config"]["reloads"] == 1 {
            reloaded = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(reloaded, "SIGHUP did not reload");
    let fresh = raw_post(port, &chat("fresh", "hello after the reload", false));
    let answer = exchange(port, &fresh).await;
    assert_eq!(header(&answer, "x-llm-provider"), Some("sim2"), "{answer}");

    // `usage` reads the running gateway's /status.
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_llm-tower-proxy"))
        .arg("--config")
        .arg(&path)
        .args(["usage", "--window", "5", "--json"])
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let usage: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(usage["window_minutes"], 5);
    assert_eq!(usage["totals"]["requests"], 2);
    assert_eq!(usage["by_model"]["sim-small"]["requests"], 2);
    assert!(
        usage["by_tenant"]["anonymous"]["cost_nano_usd"]
            .as_u64()
            .unwrap()
            > 0
    );
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_llm-tower-proxy"))
        .arg("--config")
        .arg(&path)
        .arg("usage")
        .output()
        .await
        .unwrap();
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success());
    assert!(table.contains("task type"), "{table}");
    assert!(table.contains("anonymous"), "{table}");
    assert!(table.contains("sim-small"), "{table}");
    drop(child);
}

/// `/status` reports the Redis and PostgreSQL stores, and the budgets kept in Redis.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs REDIS_URL and DATABASE_URL"]
async fn status_reports_redis_and_postgres_stores() {
    let redis = std::env::var("REDIS_URL").expect("REDIS_URL");
    let pg = std::env::var("DATABASE_URL").expect("DATABASE_URL");
    let port = free_port();
    let path = dir("status-stores").join("gateway.toml");
    // A budget name of its own, so runs do not share spend.
    let tenant = format!("stores-{}-{port}", std::process::id());
    let text = config(port, false)
        .replace(
            "[cache]\nstore = \"memory\"",
            "[cache]\nstore = \"redis\"\nredis_url_env = \"REDIS_URL\"",
        )
        .replace(
            "[[budgets.limits]]\nscope = \"global\"",
            &format!(
                "[budgets]\nstore = \"redis\"\nredis_url_env = \"REDIS_URL\"\n\n[[budgets.limits]]\nscope = \"tenant\"\nonly = \"{tenant}\""
            ),
        )
        .replace(
            "[jobs]\nenabled = false",
            "[jobs]\nstore = \"postgres\"\nurl_env = \"DATABASE_URL\"",
        );
    std::fs::write(&path, text).unwrap();
    let env = move |k: &str| match k {
        "REDIS_URL" => Some(redis.clone()),
        "DATABASE_URL" => Some(pg.clone()),
        _ => None,
    };
    let (live, mut gateway) = Live::start(&path, env).await.unwrap();
    let _worker = gateway.spawn_worker();
    let listener = tokio::net::TcpListener::bind(live.listen_addr())
        .await
        .unwrap();
    tokio::spawn(
        gateway
            .server
            .clone()
            .serve(listener, live.router(), std::future::pending()),
    );
    let answer = exchange(port, &raw_post(port, &chat("any", "stores", false))).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");

    let s = status(port).await;
    let stores = s["stores"].as_array().unwrap();
    let redis = stores.iter().find(|st| st["kind"] == "redis").unwrap();
    assert_eq!(redis["healthy"], true, "{redis}");
    let used_by = redis["used_by"].to_string();
    assert!(
        used_by.contains("budgets") && used_by.contains("cache"),
        "{used_by}"
    );
    let pg = stores.iter().find(|st| st["kind"] == "postgres").unwrap();
    assert_eq!(pg["healthy"], true, "{pg}");
    assert_eq!(pg["last_error"], Value::Null);
    assert_eq!(s["cache"]["store"], "redis");
    // The budget of another tenant: read from Redis, nothing spent by us.
    assert_eq!(s["budgets"][0]["subject"], tenant.as_str());
    assert_eq!(s["budgets"][0]["used_usd"], 0.0, "{}", s["budgets"]);
    // Nothing secret in the answer.
    let text = s.to_string();
    assert!(
        !text.contains("redis://") && !text.contains("postgres://"),
        "{text}"
    );
}
