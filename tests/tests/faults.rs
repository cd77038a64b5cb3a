//! The fault suite: the real gateway (in-process, real TCP) under 64 concurrent clients, in
//! front of a mock upstream in each hostile mode, with a healthy second step.
//!
//! After every scenario the same invariants are checked ([`Rig::check`]):
//! - every request got a 2xx or a clear OpenAI-shaped error (status + JSON `error`); a
//!   stream is complete (`[DONE]`) or ends with an explicit error event, never a
//!   clean-looking truncated end, never a broken HTTP body;
//! - where the failure comes before the first chunk, no client sees an error at all (the
//!   healthy step serves);
//! - no panic anywhere in the process (`llm_panics_total` on `/metrics` did not move);
//! - the gateway still answers `/healthz` and a normal request;
//! - memory: the peak RSS of the scenario (`VmHWM`, reset before it) and the RSS after it
//!   stay under a bound (the gateway is in-process).
//!
//! The scenarios run one at a time (a process-wide lock): RSS and the panic counter are
//! process-wide.
//!
//! `cargo test -p llm-tower-e2e --test faults`

use std::time::Duration;

use bytes::Bytes;
use http::{Method, StatusCode};
use http_body_util::BodyExt;
use llm_tower_e2e::{ACME_KEY, Client, TestGateway, chat, sse_data};
use llm_tower_test::{MockUpstream, Scenario};
use serde_json::Value;
use tokio::sync::{Mutex, MutexGuard};
use tokio::task::JoinSet;

/// Concurrent clients per scenario.
const CONCURRENCY: usize = 64;
/// A bound on one response, so that a hang fails the test instead of hanging it (not a
/// timing assertion: every scenario's timeouts are far below it).
const HANG: Duration = Duration::from_secs(60);
const MIB: u64 = 1024 * 1024;
/// `upstream.max_body_bytes`: the cap is per answer, so `CONCURRENCY` answers may hold
/// `CONCURRENCY` times it at once (the default 16 MiB would allow 1 GiB at 64 clients).
const MAX_BODY_BYTES: u64 = 512 * 1024;

/// RSS and the panic counter are process-wide: one scenario at a time.
static SERIAL: Mutex<()> = Mutex::const_new(());

/// Two providers in front of two mock upstreams: `primary` (OpenAI API, the hostile one) and
/// `backup` (Anthropic API, healthy). `main = [primary, backup]`; `solo = [primary]`.
/// Timeouts short enough that a stalled upstream costs seconds, long enough that the healthy
/// step answers in time on a loaded debug build; a breaker that never opens, so every
/// request meets the hostile mode; no cache, so every request goes upstream.
fn config(primary: &str, backup: &str, upstream_extra: &str) -> String {
    const MAX_BODY: u64 = MAX_BODY_BYTES;
    format!(
        r#"
[server]
listen = "127.0.0.1:0"
body_limit_bytes = 65536
shutdown_grace_secs = 5

[upstream]
response_timeout_ms = 4000
max_body_bytes = {MAX_BODY}
{upstream_extra}

[providers.primary]
kind = "openai"
base_url = "{primary}/v1"
api_key_env = "E2E_UPSTREAM_KEY"

[providers.backup]
kind = "anthropic"
base_url = "{backup}"
api_key_env = "E2E_UPSTREAM_KEY"

[chains.main]
steps = [
  {{ provider = "primary", model = "gpt-4o-mini" }},
  {{ provider = "backup", model = "claude-haiku-4-5" }},
]
attempt_timeout_ms = 10000
first_chunk_timeout_ms = 2000
stall_timeout_ms = 2000
breaker_min_calls = 1000000

[chains.solo]
steps = [{{ provider = "primary", model = "gpt-4o-mini" }}]
attempt_timeout_ms = 10000
first_chunk_timeout_ms = 2000
stall_timeout_ms = 2000
breaker_min_calls = 1000000

[routing]
default_chain = "main"
models = {{ solo = "solo" }}

[cache]
enabled = false

[[auth.keys]]
tenant = "acme"
key_env = "E2E_ACME_KEY"

[jobs]
enabled = false
"#
    )
}

/// What a scenario promises the clients.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Expect {
    /// The failure comes before anything reached the client and a healthy step exists:
    /// every client gets a complete answer.
    NoError,
    /// Every client gets a complete answer or a clear error (no fallback, or a failure
    /// after the stream's commit point).
    Clear,
}

/// How one response ended.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Outcome {
    Answer,
    Error(StatusCode),
    ErrorEvent,
}

struct Rig {
    primary: MockUpstream,
    backup: MockUpstream,
    gw: TestGateway,
    client: Client,
    panics_before: u64,
    _serial: MutexGuard<'static, ()>,
}

impl Rig {
    async fn start() -> Self {
        Self::start_with("").await
    }

    /// `upstream_extra`: more keys of `[upstream]`.
    async fn start_with(upstream_extra: &str) -> Self {
        let serial = SERIAL.lock().await;
        let primary = MockUpstream::builder()
            .record_requests(false)
            .start()
            .await
            .expect("mock");
        let backup = MockUpstream::builder()
            .record_requests(false)
            .default_scenario(Scenario::ok().text("healthy backup answer"))
            .start()
            .await
            .expect("mock");
        let toml = config(&primary.base_url(), &backup.base_url(), upstream_extra);
        let gw = TestGateway::start(&toml).await;
        let mut rig = Self {
            primary,
            backup,
            gw,
            client: Client::with_key(ACME_KEY),
            panics_before: 0,
            _serial: serial,
        };
        // Earlier scenarios' failures (a failed assertion is a panic too) are not ours.
        rig.panics_before = rig.panics().await;
        rig
    }

    async fn panics(&self) -> u64 {
        let page = Client::new().get(&self.gw.url("/metrics")).await;
        assert_eq!(page.status, StatusCode::OK, "{}", page.text());
        metric(&page.text(), "llm_panics_total")
            .unwrap_or_else(|| panic!("no llm_panics_total on /metrics"))
    }

    /// Runs `scenario` on the primary for `CONCURRENCY` concurrent requests to `model`,
    /// checks every answer against `expect`, then the gateway's health; returns the outcomes.
    async fn run(
        &self,
        scenario: Scenario,
        model: &str,
        stream: bool,
        expect: Expect,
    ) -> Vec<Outcome> {
        self.primary.set_default(scenario.clone());
        reset_peak_rss();
        let base_rss = rss_kib("VmRSS");
        let mut set = JoinSet::new();
        for i in 0..CONCURRENCY {
            let client = self.client.clone();
            let url = self.gw.url("/v1/chat/completions");
            let body = chat(model, &format!("fault {i}"), stream).to_string();
            set.spawn(async move {
                tokio::time::timeout(HANG, request(&client, &url, body))
                    .await
                    .unwrap_or_else(|_| Err("no complete response (hung)".to_owned()))
            });
        }
        let mut outcomes = Vec::new();
        while let Some(r) = set.join_next().await {
            let (status, body) = r
                .expect("client task")
                .unwrap_or_else(|e| panic!("{scenario:?} stream={stream}: {e}"));
            let outcome = judge(status, &body, stream)
                .unwrap_or_else(|e| panic!("{scenario:?} stream={stream}: {e}"));
            if expect == Expect::NoError {
                assert_eq!(
                    outcome,
                    Outcome::Answer,
                    "{scenario:?} stream={stream}: a healthy step was there: {}",
                    String::from_utf8_lossy(&body)
                );
            }
            outcomes.push(outcome);
        }
        self.check(base_rss).await;
        outcomes
    }

    /// The invariants after a scenario: no panic, the gateway healthy, memory bounded.
    async fn check(&self, base_rss: u64) {
        let peak = rss_kib("VmHWM");
        let panics = self.panics().await;
        assert_eq!(panics, self.panics_before, "the gateway panicked");

        let health = Client::new().get(&self.gw.url("/healthz")).await;
        assert_eq!(health.status, StatusCode::OK);
        self.primary
            .set_default(Scenario::ok().text("back to normal"));
        let r = self
            .client
            .post(
                &self.gw.url("/v1/chat/completions"),
                &[],
                &chat("gpt-4o-mini", "normal", false),
            )
            .await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text());
        assert!(r.json()["choices"][0]["message"]["content"].is_string());

        // 64 answers buffered whole would be GiBs (50 MB bodies: 3.2 GB). The bound:
        // each client's answer up to the cap, twice (a growing buffer and its copy), and
        // 32 MiB for everything else.
        let bound = base_rss + (CONCURRENCY as u64 * 2 * MAX_BODY_BYTES + 32 * MIB) / 1024;
        assert!(
            peak <= bound,
            "peak RSS {peak} KiB, over the bound {bound} KiB (base {base_rss} KiB)"
        );
        let after = rss_kib("VmRSS");
        assert!(
            after <= base_rss + 64 * MIB / 1024,
            "RSS after {after} KiB (base {base_rss} KiB)"
        );
    }
}

/// Sends one request and reads the whole body; an HTTP-level failure (a body cut by the
/// gateway) is an error.
async fn request(client: &Client, url: &str, body: String) -> Result<(StatusCode, Bytes), String> {
    let resp = client.start(Method::POST, url, &[], Some(body)).await;
    let status = resp.status();
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| format!("the gateway broke the response body ({status}): {e}"))?
        .to_bytes();
    Ok((status, body))
}

/// Whether one response is a complete answer, a clear error or an explicit error event.
fn judge(status: StatusCode, body: &[u8], stream: bool) -> Result<Outcome, String> {
    let text = String::from_utf8_lossy(body);
    if !status.is_success() {
        let v: Value = serde_json::from_slice(body)
            .map_err(|e| format!("{status} with a body that is not JSON ({e}): {text}"))?;
        let e = &v["error"];
        if !(e["message"].is_string() && e["type"].is_string()) {
            return Err(format!("{status} without an OpenAI error object: {text}"));
        }
        return Ok(Outcome::Error(status));
    }
    if !stream {
        let v: Value = serde_json::from_slice(body)
            .map_err(|e| format!("{status} with a body that is not JSON ({e}): {text}"))?;
        if !v["choices"][0]["message"]["content"].is_string() {
            return Err(format!("{status} without an answer: {text}"));
        }
        return Ok(Outcome::Answer);
    }
    let data = sse_data(&text);
    let Some((last, chunks)) = data.split_last() else {
        return Err(format!("an empty stream: {text:?}"));
    };
    for c in chunks {
        let v: Value =
            serde_json::from_str(c).map_err(|e| format!("a chunk that is not JSON ({e}): {c}"))?;
        if !v["error"].is_null() {
            return Err(format!("an error event before the end: {text}"));
        }
    }
    if last == "[DONE]" {
        return Ok(Outcome::Answer);
    }
    let v: Value = serde_json::from_str(last)
        .map_err(|_| format!("a stream that ends without [DONE] nor an error event: {text}"))?;
    if v["error"]["message"].is_string() {
        Ok(Outcome::ErrorEvent)
    } else {
        Err(format!(
            "a stream that ends without [DONE] nor an error event: {text}"
        ))
    }
}

/// The value of an unlabelled (or first labelled) sample of `name` on a Prometheus page.
fn metric(page: &str, name: &str) -> Option<u64> {
    page.lines()
        .filter(|l| !l.starts_with('#'))
        .find(|l| l.starts_with(name) && matches!(l.as_bytes().get(name.len()), Some(b' ' | b'{')))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse::<f64>().ok())
        .map(|v| v as u64)
}

/// A field of `/proc/self/status`, in KiB.
fn rss_kib(field: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no {field} in /proc/self/status"))
}

/// Resets `VmHWM` to the current RSS (Linux: `5` to `/proc/self/clear_refs`).
fn reset_peak_rss() {
    std::fs::write("/proc/self/clear_refs", "5").expect("reset VmHWM");
}

const S: Duration = Duration::from_secs(1);

// ------------------------------------------------------------------ scenarios

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limited_with_retry_after_1e20() {
    let rig = Rig::start().await;
    for stream in [false, true] {
        let s = Scenario::status(429).absurd_headers();
        rig.run(s, "gpt-4o-mini", stream, Expect::NoError).await;
    }
    // The capped retry-after keeps the primary skipped: it was asked once, maybe a few
    // times by requests already in flight, never 128 times.
    assert!(rig.primary.request_count() < 2 * CONCURRENCY);
    let s = Scenario::status(429).absurd_headers();
    rig.run(s, "solo", false, Expect::Clear).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nan_and_inf_rate_limit_headers_on_a_good_answer() {
    let rig = Rig::start().await;
    for stream in [false, true] {
        let s = Scenario::ok().absurd_headers();
        rig.run(s, "gpt-4o-mini", stream, Expect::NoError).await;
    }
    assert_eq!(rig.backup.request_count(), 0, "the good answers were used");
    let page = Client::new().get(&rig.gw.url("/metrics")).await.text();
    let bad = metric(
        &page,
        "llm_upstream_malformed_headers_total{provider=\"primary\"}",
    );
    assert!(bad.unwrap_or(0) >= 2 * CONCURRENCY as u64, "{page}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_50_mb_body() {
    let rig = Rig::start().await;
    for stream in [false, true] {
        let s = Scenario::ok().huge_body(50_000_000);
        let out = rig.run(s, "gpt-4o-mini", stream, Expect::Clear).await;
        if !stream {
            assert!(out.iter().all(|o| *o == Outcome::Answer), "{out:?}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_and_wrong_shaped_json() {
    let rig = Rig::start().await;
    rig.run(
        Scenario::ok().malformed_json(),
        "gpt-4o-mini",
        false,
        Expect::NoError,
    )
    .await;
    // `[[]]`: JSON, but not a completion.
    rig.run(
        Scenario::ok().deep_json(2),
        "gpt-4o-mini",
        false,
        Expect::NoError,
    )
    .await;
    // In a stream, after the role chunk: a clear end either way.
    rig.run(
        Scenario::ok().malformed_json(),
        "gpt-4o-mini",
        true,
        Expect::Clear,
    )
    .await;
    rig.run(
        Scenario::ok().malformed_sse(),
        "gpt-4o-mini",
        true,
        Expect::Clear,
    )
    .await;
    rig.run(
        Scenario::ok().malformed_json(),
        "solo",
        false,
        Expect::Clear,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cut_streams() {
    let rig = Rig::start().await;
    // Cut mid-way, and ended "cleanly" without the terminal event: never a clean end.
    for s in [
        Scenario::ok()
            .text("one two three four")
            .drop_after_chunks(2),
        Scenario::ok()
            .text("one two three four")
            .no_terminal_event(),
        Scenario::ok()
            .text("one two three four")
            .error_event_after_chunks(1),
    ] {
        // Past the commit point: an error event, never `[DONE]` after a partial answer.
        let out = rig.run(s, "gpt-4o-mini", true, Expect::Clear).await;
        assert!(out.iter().all(|o| *o == Outcome::ErrorEvent), "{out:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_upstreams() {
    let rig = Rig::start().await;
    // Before the first chunk / the head: the healthy step serves.
    rig.run(
        Scenario::ok().first_chunk_delay(60 * S),
        "gpt-4o-mini",
        true,
        Expect::NoError,
    )
    .await;
    rig.run(
        Scenario::ok().latency(60 * S),
        "gpt-4o-mini",
        false,
        Expect::NoError,
    )
    .await;
    // Mid-stream: an error event.
    let s = Scenario::ok().text("one two three").chunk_delay(60 * S);
    let out = rig.run(s, "gpt-4o-mini", true, Expect::Clear).await;
    assert!(out.iter().all(|o| *o == Outcome::ErrorEvent), "{out:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_reset_before_and_after_the_head() {
    let rig = Rig::start().await;
    for stream in [false, true] {
        rig.run(
            Scenario::ok().reset_before_head(),
            "gpt-4o-mini",
            stream,
            Expect::NoError,
        )
        .await;
        rig.run(
            Scenario::ok().reset_after_head(),
            "gpt-4o-mini",
            stream,
            Expect::NoError,
        )
        .await;
    }
    let out = rig
        .run(
            Scenario::ok().reset_before_head(),
            "solo",
            false,
            Expect::Clear,
        )
        .await;
    assert!(
        out.iter().all(|o| matches!(o, Outcome::Error(_))),
        "{out:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_header_drip() {
    let rig = Rig::start().await;
    for stream in [false, true] {
        let s = Scenario::ok().header_drip(Duration::from_millis(50));
        rig.run(s, "gpt-4o-mini", stream, Expect::NoError).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn absurd_header_sizes() {
    let rig = Rig::start().await;
    for stream in [false, true] {
        rig.run(
            Scenario::ok().big_header(256 * 1024),
            "gpt-4o-mini",
            stream,
            Expect::NoError,
        )
        .await;
        rig.run(
            Scenario::ok().extra_headers(5000),
            "gpt-4o-mini",
            stream,
            Expect::NoError,
        )
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_that_never_ends() {
    let rig = Rig::start().await;
    rig.run(
        Scenario::ok().endless_body(),
        "gpt-4o-mini",
        false,
        Expect::NoError,
    )
    .await;
    rig.run(
        Scenario::ok().endless_body(),
        "gpt-4o-mini",
        true,
        Expect::Clear,
    )
    .await;
}

/// `max_body_bytes` bounds one answer, `max_buffered_bytes` all of them together: 64
/// endless bodies of up to 512 KiB each would hold 32 MiB, the budget allows 4 MiB.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endless_bodies_share_one_buffer_budget() {
    let rig = Rig::start_with("max_buffered_bytes = 4194304").await;
    rig.run(
        Scenario::ok().endless_body(),
        "gpt-4o-mini",
        false,
        Expect::NoError,
    )
    .await;
    let page = Client::new().get(&rig.gw.url("/metrics")).await.text();
    let refused = metric(&page, "llm_upstream_buffer_refusals_total");
    assert!(refused.unwrap_or(0) > 0, "{page}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_100k_levels_deep() {
    let rig = Rig::start().await;
    rig.run(
        Scenario::ok().deep_json(100_000),
        "gpt-4o-mini",
        false,
        Expect::NoError,
    )
    .await;
    rig.run(
        Scenario::ok().deep_json(100_000),
        "gpt-4o-mini",
        true,
        Expect::Clear,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_stream_reset() {
    // The gateway speaks h2c to the mock: a body error there is a RST_STREAM.
    let rig = Rig::start_with("http2_only = true").await;
    for stream in [false, true] {
        rig.run(
            Scenario::ok().reset_after_head(),
            "gpt-4o-mini",
            stream,
            Expect::NoError,
        )
        .await;
    }
    let s = Scenario::ok()
        .text("one two three four")
        .drop_after_chunks(2);
    let out = rig.run(s, "gpt-4o-mini", true, Expect::Clear).await;
    // h2 drops a reset stream's unread frames: when the reset overtakes the first chunks,
    // the failure is before the commit point and the healthy step serves.
    assert!(
        out.iter()
            .all(|o| matches!(o, Outcome::ErrorEvent | Outcome::Answer)),
        "{out:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_panic_counter_sees_a_panic_in_a_spawned_task() {
    // What makes `llm_panics_total` unchanged mean something: a panic nobody reports (a
    // spawned task's) reaches the gateway's `/metrics`.
    let rig = Rig::start().await;
    let task = tokio::spawn(async { panic!("a panic in a spawned task") });
    assert!(task.await.expect_err("it panicked").is_panic());
    assert_eq!(rig.panics().await, rig.panics_before + 1);
}
