//! The end-to-end test harness: the gateway built in-process from a TOML config
//! ([`TestGateway`]), served on `127.0.0.1:0` with the same graceful `serve` the binary
//! uses, and a small real HTTP client ([`Client`]) with SSE parsing. The tests themselves
//! are in `tests/*.rs`.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client as HyperClient;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use llm_tower_axum::ShutdownOutcome;
use llm_tower_proxy::config::Config;
use serde_json::Value;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// The client key of tenant `acme` in [`base_config`].
pub const ACME_KEY: &str = "sk-e2e-acme";
/// The client key of tenant `globex` in [`base_config`].
pub const GLOBEX_KEY: &str = "sk-e2e-globex";
/// The provider key the gateway sends upstream.
pub const UPSTREAM_KEY: &str = "sk-upstream-e2e";

/// The environment the gateway reads secrets from in tests: fixed test keys, plus
/// `REDIS_URL` and `DATABASE_URL` from the process (for the shared-store tests).
pub fn test_env(name: &str) -> Option<String> {
    match name {
        "E2E_ACME_KEY" => Some(ACME_KEY.to_owned()),
        "E2E_GLOBEX_KEY" => Some(GLOBEX_KEY.to_owned()),
        "E2E_UPSTREAM_KEY" => Some(UPSTREAM_KEY.to_owned()),
        "REDIS_URL" | "DATABASE_URL" => std::env::var(name).ok(),
        _ => None,
    }
}

/// The value of `var`, or a panic saying the test needs it (never a silent pass).
pub fn required_env(var: &str) -> String {
    std::env::var(var).unwrap_or_else(|_| {
        panic!("this test needs {var} (e.g. redis://127.0.0.1:6379 or postgres://postgres@127.0.0.1:5432/test); .ci/run sets it")
    })
}

/// A unique path for a test's SQLite jobs file.
pub fn temp_db(tag: &str) -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("llm-tower-e2e-{}", std::process::id()));
    dir.join(format!("{tag}-{n}.db"))
        .to_string_lossy()
        .into_owned()
}

/// A config with two providers in front of mock upstreams: `primary` (OpenAI API at
/// `openai_base`) and `backup` (Anthropic API at `anthropic_base`), chains
/// `main = [primary gpt-4o-mini, backup claude-haiku]`, `solo = [primary]`,
/// `claude = [backup]`; model aliases `solo`, `claude`; two client keys (`acme`,
/// `globex`); memory cache; a price for gpt-4o-mini; `extra` appended (TOML).
pub fn base_config(openai_base: &str, anthropic_base: &str, jobs: bool, extra: &str) -> String {
    let jobs = if jobs {
        format!(
            "[jobs]\nstore = \"sqlite\"\npath = {:?}\nworkers = 2\n",
            temp_db("jobs")
        )
    } else {
        "[jobs]\nenabled = false\n".to_owned()
    };
    format!(
        r#"
[server]
listen = "127.0.0.1:0"
body_limit_bytes = 65536
shutdown_grace_secs = 10

[providers.primary]
kind = "openai"
base_url = "{openai_base}/v1"
api_key_env = "E2E_UPSTREAM_KEY"

[providers.backup]
kind = "anthropic"
base_url = "{anthropic_base}"
api_key_env = "E2E_UPSTREAM_KEY"

[chains.main]
steps = [
  {{ provider = "primary", model = "gpt-4o-mini" }},
  {{ provider = "backup", model = "claude-haiku-4-5" }},
]

[chains.solo]
steps = [{{ provider = "primary", model = "gpt-4o-mini" }}]
attempt_timeout_ms = 2000

[chains.claude]
steps = [{{ provider = "backup", model = "claude-haiku-4-5" }}]

[routing]
default_chain = "main"
models = {{ solo = "solo", claude = "claude" }}

[cache]
store = "memory"

[prices."gpt-4o-mini"]
input_per_mtok = 0.15
output_per_mtok = 0.60

[[auth.keys]]
tenant = "acme"
key_env = "E2E_ACME_KEY"

[[auth.keys]]
tenant = "globex"
key_env = "E2E_GLOBEX_KEY"

{jobs}
{extra}
"#
    )
}

/// The gateway, serving on `127.0.0.1:<random>` in this process.
#[derive(Debug)]
pub struct TestGateway {
    /// Where it listens.
    pub addr: SocketAddr,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<std::io::Result<ShutdownOutcome>>>,
}

impl TestGateway {
    /// Parses `toml` (relative paths against `base_dir`), builds the gateway with
    /// [`test_env`] secrets, starts its jobs worker and serves it.
    pub async fn start(toml: &str) -> Self {
        Self::start_in(toml, Path::new(".")).await
    }

    /// [`start`](Self::start) with relative paths resolved against `base_dir`.
    pub async fn start_in(toml: &str, base_dir: &Path) -> Self {
        let config = Config::parse(toml, base_dir).unwrap_or_else(|e| panic!("{e}"));
        Self::start_config(&config).await
    }

    /// Builds and serves an already parsed config.
    pub async fn start_config(config: &Config) -> Self {
        let mut gw = llm_tower_proxy::build(config, &test_env)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let _worker = gw.spawn_worker();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (tx, rx) = oneshot::channel::<()>();
        let signal = async move {
            let _ = rx.await;
        };
        let task = tokio::spawn(llm_tower_axum::serve(listener, gw.router, signal, gw.grace));
        Self {
            addr,
            shutdown: Some(tx),
            task: Some(task),
        }
    }

    /// `http://127.0.0.1:<port>` + `path`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Sends the shutdown signal (like SIGTERM) without waiting.
    pub fn signal_shutdown(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }

    /// Signals shutdown and waits for the server to stop.
    pub async fn shutdown(mut self) -> ShutdownOutcome {
        self.signal_shutdown();
        let task = self.task.take().expect("running");
        task.await.expect("server task").expect("serve")
    }
}

impl Drop for TestGateway {
    fn drop(&mut self) {
        self.signal_shutdown();
    }
}

/// A buffered HTTP response.
#[derive(Debug)]
pub struct Resp {
    /// Status.
    pub status: StatusCode,
    /// Headers.
    pub headers: HeaderMap,
    /// Body.
    pub body: Bytes,
}

impl Resp {
    /// The body as JSON (panics with the body if it is not).
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }

    /// A header as a string ("" when absent).
    pub fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    }

    /// The body as text.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The `data:` payloads of an SSE body, in order.
    pub fn sse_data(&self) -> Vec<String> {
        sse_data(&self.text())
    }
}

/// The `data:` payloads of an SSE text, in order.
pub fn sse_data(text: &str) -> Vec<String> {
    text.split("\n\n")
        .filter_map(|event| {
            let data: Vec<&str> = event
                .lines()
                .filter_map(|l| l.strip_prefix("data: "))
                .collect();
            (!data.is_empty()).then(|| data.join("\n"))
        })
        .collect()
}

/// The text of streamed chat chunks (`choices[0].delta.content`, concatenated).
pub fn streamed_text(data: &[String]) -> String {
    data.iter()
        .filter_map(|d| serde_json::from_str::<Value>(d).ok())
        .filter_map(|v| {
            v["choices"][0]["delta"]["content"]
                .as_str()
                .map(str::to_owned)
        })
        .collect()
}

/// A real HTTP/1.1 client (hyper) for the gateway.
#[derive(Debug, Clone)]
pub struct Client {
    inner: HyperClient<HttpConnector, Full<Bytes>>,
    headers: BTreeMap<String, String>,
}

impl Default for Client {
    fn default() -> Self {
        Self::new()
    }
}

impl Client {
    /// A client sending no default headers.
    pub fn new() -> Self {
        Self {
            inner: HyperClient::builder(TokioExecutor::new()).build_http(),
            headers: BTreeMap::new(),
        }
    }

    /// A client sending `Authorization: Bearer <key>` on every request.
    pub fn with_key(key: &str) -> Self {
        Self::new().header("authorization", &format!("Bearer {key}"))
    }

    /// Adds a default header.
    #[must_use]
    pub fn header(mut self, name: &str, value: &str) -> Self {
        self.headers.insert(name.to_owned(), value.to_owned());
        self
    }

    /// Starts a request and returns the response head with its body unread.
    pub async fn start(
        &self,
        method: Method,
        url: &str,
        headers: &[(&str, &str)],
        body: Option<String>,
    ) -> http::Response<Incoming> {
        let mut b = Request::builder().method(method).uri(url);
        for (k, v) in &self.headers {
            b = b.header(k.as_str(), v.as_str());
        }
        if body.is_some() {
            b = b.header("content-type", "application/json");
        }
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        let req = b
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .expect("request");
        self.inner.request(req).await.expect("HTTP request failed")
    }

    /// Sends a request and buffers the whole response.
    pub async fn send(
        &self,
        method: Method,
        url: &str,
        headers: &[(&str, &str)],
        body: Option<String>,
    ) -> Resp {
        let resp = self.start(method, url, headers, body).await;
        let (parts, body) = resp.into_parts();
        let body = body.collect().await.expect("response body").to_bytes();
        Resp {
            status: parts.status,
            headers: parts.headers,
            body,
        }
    }

    /// `POST url` with a JSON body.
    pub async fn post(&self, url: &str, headers: &[(&str, &str)], body: &Value) -> Resp {
        self.send(Method::POST, url, headers, Some(body.to_string()))
            .await
    }

    /// `GET url`.
    pub async fn get(&self, url: &str) -> Resp {
        self.send(Method::GET, url, &[], None).await
    }
}

/// Reads the next data frame of a streaming body (`None` at its end).
pub async fn next_frame(body: &mut Incoming) -> Option<Bytes> {
    loop {
        let frame = body.frame().await?.ok()?;
        if let Ok(data) = frame.into_data() {
            return Some(data);
        }
    }
}

/// A chat request body.
pub fn chat(model: &str, prompt: &str, stream: bool) -> Value {
    serde_json::json!({
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "stream": stream,
        "temperature": 0,
    })
}

/// Polls `f` every 20 ms until it returns `Some`, at most `tries` times (no timing assertion:
/// a bound so a broken build fails instead of hanging).
pub async fn poll_until<T, F, Fut>(tries: usize, mut f: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    for _ in 0..tries {
        if let Some(v) = f().await {
            return Some(v);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    None
}

/// Runs the Python SDK check `tests/sdk/{script}` (with `$PYTHON`, default `python3`)
/// against the gateway on the demo config, asserts that it exited successfully, and returns
/// its standard output for the caller's own checks.
pub async fn run_sdk_check(script: &str) -> String {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("repo root");
    let config =
        Config::from_file(root.join("examples/proxy/demo.toml")).unwrap_or_else(|e| panic!("{e}"));
    let gw = TestGateway::start_config(&config).await;
    let python = std::env::var("PYTHON").unwrap_or_else(|_| "python3".to_owned());
    let out = tokio::process::Command::new(&python)
        .arg(root.join("tests/sdk").join(script))
        .arg(gw.url(""))
        .output()
        .await
        .unwrap_or_else(|e| panic!("cannot run {python}: {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "SDK check failed\n--- stdout\n{stdout}\n--- stderr\n{stderr}"
    );
    stdout
}

/// The Rust examples of the repository's README, compiled as doc tests so the library quick
/// start cannot drift from the API.
#[cfg(doctest)]
#[doc = include_str!("../../README.md")]
struct ReadmeDoctests;
