//! The status page in a real headless browser (Debian's `chromium`): it loads, shows the
//! figures the `/status` JSON has, and updates after traffic.
//!
//! Ignored by default (it needs the browser); `.ci/run` installs chromium and runs it:
//! `cargo test -p llm-tower-proxy --test status_page -- --include-ignored`.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::body::{Body, to_bytes};
use axum::http::Request;
use llm_tower_proxy::config::blake3_hex;
use llm_tower_proxy::reload::Live;
use serde_json::Value;
use tower::ServiceExt;

const TOKEN: &str = "status-page-token";

fn config(port: u16) -> String {
    format!(
        r#"
[server]
listen = "127.0.0.1:{port}"
metrics_token_env = "STATUS_TOKEN"

[providers.flaky]
kind = "simulated"
simulated = {{ latency_ms = 2, token_delay_ms = 0, fail_every = 2, fail_kind = "unavailable", retry_after_secs = 600 }}

[providers.steady]
kind = "simulated"
simulated = {{ latency_ms = 3, token_delay_ms = 0 }}

[chains.main]
steps = [{{ provider = "flaky", model = "sim-large" }}, {{ provider = "steady", model = "sim-small" }}]
breaker_min_calls = 1000

[routing]
default_chain = "main"

[routing.tasks]
summarize = "main"
classify = "main"

[cache]
store = "memory"

[prices.sim-large]
input_per_mtok = 3.0
output_per_mtok = 12.0

[prices.sim-small]
input_per_mtok = 1.0
output_per_mtok = 2.0

[[budgets.limits]]
scope = "tenant"
usd = 1.0
per = "day"

[[auth.keys]]
tenant = "acme"
key_blake3 = "{a}"

[[auth.keys]]
tenant = "globex"
key_blake3 = "{b}"

[jobs]
enabled = false
"#,
        a = blake3_hex("sk-acme"),
        b = blake3_hex("sk-globex"),
    )
}

fn chat(key: &str, task: &str, content: &str) -> Request<Body> {
    let body = serde_json::json!({
        "model": "any",
        "messages": [{"role": "user", "content": content}],
    });
    Request::post("/v1/chat/completions")
        .header("authorization", format!("Bearer {key}"))
        .header("content-type", "application/json")
        .header("x-llm-task", task)
        .body(Body::from(body.to_string()))
        .unwrap()
}

async fn traffic(router: &axum::Router, round: usize, n: usize) {
    for i in 0..n {
        let (key, task) = match i % 3 {
            0 => ("sk-acme", "summarize"),
            1 => ("sk-globex", "classify"),
            _ => ("sk-acme", "classify"),
        };
        let resp = router
            .clone()
            .oneshot(chat(key, task, &format!("round {round} request {i}")))
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        let _ = to_bytes(resp.into_body(), 1 << 20).await.unwrap();
    }
}

/// The text of the element `data-figure="name"` in the dumped DOM.
fn figure<'a>(dom: &'a str, name: &str) -> Option<&'a str> {
    let at = dom.find(&format!("data-figure=\"{name}\""))?;
    let rest = &dom[at..];
    let start = rest.find('>')? + 1;
    let end = rest[start..].find('<')?;
    Some(&rest[start..start + end])
}

fn attr<'a>(dom: &'a str, name: &str) -> Option<&'a str> {
    let at = dom.find(&format!("{name}=\""))? + name.len() + 2;
    let end = dom[at..].find('"')?;
    Some(&dom[at..at + end])
}

fn usd(nano: u64) -> String {
    format!("${:.6}", nano as f64 / 1e9)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a headless chromium (apt-get install chromium); .ci/run installs it"]
async fn the_page_shows_the_json_figures_and_updates_after_traffic() {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let dir = std::env::temp_dir().join(format!("llm-tower-status-page-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("gateway.toml");
    std::fs::write(&path, config(port)).unwrap();
    let (live, gateway) = Live::start(&path, |k: &str| {
        (k == "STATUS_TOKEN").then(|| TOKEN.to_owned())
    })
    .await
    .unwrap();
    let inner = live.router();
    traffic(&inner, 0, 12).await;

    // Before the page's second read of the JSON, more traffic arrives: the page must show it.
    let reads = Arc::new(AtomicUsize::new(0));
    let (r, i) = (reads.clone(), inner.clone());
    let served = inner.clone().layer(axum::middleware::from_fn(
        move |req: Request<Body>, next: axum::middleware::Next| {
            let (reads, inner) = (r.clone(), i.clone());
            async move {
                let json = req.uri().path() == "/status"
                    && req.uri().query().is_some_and(|q| q.contains("format=json"));
                if json && reads.fetch_add(1, Ordering::SeqCst) == 1 {
                    traffic(&inner, 1, 6).await;
                }
                next.run(req).await
            }
        },
    ));
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
        .await
        .unwrap();
    tokio::spawn(
        gateway
            .server
            .clone()
            .serve(listener, served, std::future::pending()),
    );

    let profile = dir.join("chromium-profile");
    let url = format!("http://127.0.0.1:{port}/status.html#token={TOKEN}&interval=400");
    let run = tokio::process::Command::new("chromium")
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--virtual-time-budget=6000",
            "--dump-dom",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .arg(&url)
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(120), run)
        .await
        .expect("chromium did not finish in 120 s")
        .expect("cannot run chromium");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let dom = String::from_utf8_lossy(&out.stdout);

    // The page loaded and read the JSON several times, with the token from its fragment.
    let polls: u32 = attr(&dom, "data-polls").unwrap().parse().unwrap();
    assert!(polls >= 3, "{polls} reads\n{dom}");
    assert!(reads.load(Ordering::SeqCst) >= 3);
    // It updated after the traffic that arrived between its reads.
    assert_eq!(attr(&dom, "data-first-requests"), Some("12"), "{dom}");
    assert_eq!(attr(&dom, "data-last-requests"), Some("18"), "{dom}");
    assert_eq!(figure(&dom, "requests"), Some("18"));

    // The figures are the JSON's.
    let req = Request::get("/status?window=60")
        .header("authorization", format!("Bearer {TOKEN}"))
        .body(Body::empty())
        .unwrap();
    let resp = inner.clone().oneshot(req).await.unwrap();
    let status: Value =
        serde_json::from_slice(&to_bytes(resp.into_body(), 1 << 22).await.unwrap()).unwrap();
    let a = &status["activity"];
    assert_eq!(a["totals"]["requests"], 18);
    for (kind, map) in [("task", "by_task"), ("tenant", "by_tenant")] {
        let rows = a[map].as_object().unwrap();
        assert!(rows.len() >= 2, "{rows:?}");
        for (name, t) in rows {
            let cost = t["cost_nano_usd"].as_u64().unwrap();
            assert!(cost > 0, "{name}: {t}");
            assert_eq!(
                figure(&dom, &format!("{kind}:{name}:cost")),
                Some(usd(cost).as_str()),
                "{kind} {name}"
            );
            assert_eq!(
                figure(&dom, &format!("{kind}:{name}:requests")),
                Some(t["requests"].to_string().as_str()),
                "{kind} {name}"
            );
        }
    }
    // `flaky` fails every other call: the fallbacks and their reason (tried, then skipped).
    let fb = &a["fallbacks"][0];
    assert_eq!(fb["provider"], "flaky", "{}", a["fallbacks"]);
    assert_eq!(fb["reason"], "unavailable");
    assert!(fb["count"].as_u64().unwrap() >= 1, "{fb}");
    assert_eq!(
        figure(&dom, "fallback:flaky:unavailable:false"),
        Some(fb["count"].to_string().as_str())
    );
    // Budget bars: one per tenant, with what the JSON says was used.
    let budgets = status["budgets"].as_array().unwrap();
    assert_eq!(budgets.len(), 2, "{budgets:?}");
    for b in budgets {
        let used = b["used_usd"].as_f64().unwrap();
        assert!(used > 0.0, "{b}");
        let name = format!(
            "budget:{}:{}:used",
            b["name"].as_str().unwrap(),
            b["subject"].as_str().unwrap()
        );
        assert_eq!(
            figure(&dom, &name),
            Some(format!("${used:.6}").as_str()),
            "{name}"
        );
    }
    // `flaky` answers 503 with a retry-after: its breaker opened, `steady` serves now.
    assert_eq!(
        status["chains"]["main"]["serving"], "steady",
        "{}",
        status["providers"]
    );
    assert_eq!(figure(&dom, "chain:main:serving"), Some("steady"));
    assert_eq!(status["providers"]["flaky"]["breaker"], "open");
    assert_eq!(figure(&dom, "provider:flaky:breaker"), Some("open"));
    assert_eq!(figure(&dom, "provider:steady:breaker"), Some("closed"));
    for f in a["fallbacks"].as_array().unwrap() {
        let name = format!(
            "fallback:{}:{}:{}",
            f["provider"].as_str().unwrap(),
            f["reason"].as_str().unwrap(),
            f["skipped"]
        );
        assert_eq!(
            figure(&dom, &name),
            Some(f["count"].to_string().as_str()),
            "{name}"
        );
    }
    assert_eq!(
        figure(&dom, "provider:steady:served"),
        Some(status["providers"]["steady"]["served"].to_string().as_str())
    );
    assert!(dom.contains("<svg"), "the charts are drawn");
}
