//! A mock OpenAI / Anthropic HTTP upstream: a real HTTP/1.1 and h2c server on localhost.
//!
//! [`MockUpstream::start`] binds `127.0.0.1:0` and serves:
//!
//! - `POST /v1/chat/completions`: OpenAI chat completions, JSON or SSE (`"stream": true`),
//!   with a final usage chunk when `stream_options.include_usage` is true;
//! - `POST /v1/messages`: Anthropic Messages, JSON or SSE (`message_start`,
//!   `content_block_start`, `ping`, `content_block_delta`, `content_block_stop`,
//!   `message_delta`, `message_stop`);
//! - `POST /v1/responses`: OpenAI Responses, JSON or its typed SSE events
//!   (`response.created`, `response.in_progress`, `response.output_item.added`,
//!   `response.content_part.added`, `response.output_text.delta`…, `.done`,
//!   `response.content_part.done`, `response.output_item.done`, `response.completed` with
//!   usage);
//! - `GET /v1/models`: the model list (Anthropic's shape when the request carries
//!   `anthropic-version`, OpenAI's otherwise).
//!
//! The `/v1` prefix is optional. What each completion request gets is a [`Scenario`]: from the
//! `x-mock-scenario` header (JSON), else the queue ([`MockUpstream::push`]), else the default
//! ([`MockUpstream::set_default`], initially [`Scenario::ok`]). Successful responses carry the
//! provider's rate-limit headers. Every request is recorded ([`MockUpstream::requests`]).
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! use llm_tower_test::{MockUpstream, Scenario};
//! use std::time::Duration;
//!
//! let upstream = MockUpstream::start().await;
//! upstream.push(Scenario::rate_limited(2));
//! upstream.push(Scenario::ok().text("Hello!").chunk_delay(Duration::from_millis(5)));
//! let url = format!("{}/v1/chat/completions", upstream.base_url());
//! // ... point an OpenAI client at `url`: the first call gets a 429, the second "Hello!".
//! # let _ = url;
//! assert_eq!(upstream.request_count(), 0);
//! upstream.shutdown().await;
//! # }
//! ```

mod drip;
mod render;
mod scenario;

use std::collections::VecDeque;
use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use futures_core::Stream;
use futures_util::StreamExt;
use http::header::{CACHE_CONTROL, CONTENT_TYPE, RETRY_AFTER};
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Either, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::{JoinHandle, JoinSet};

use render::{Answer, Api, Ev, Parsed};
pub use scenario::Scenario;

/// The header that carries a per-request [`Scenario`] as JSON; it takes precedence over the
/// queue and the default.
pub const SCENARIO_HEADER: &str = "x-mock-scenario";

/// How long [`MockUpstream::shutdown`] lets in-flight responses finish.
const GRACE: Duration = Duration::from_secs(5);

/// One request the mock upstream received.
#[derive(Clone, Debug)]
pub struct RecordedRequest {
    /// The HTTP method.
    pub method: Method,
    /// The request path (without the query).
    pub path: String,
    /// The request headers. Credential headers (`authorization`, `x-api-key`, `api-key`,
    /// `proxy-authorization`) are marked sensitive, so `Debug` output hides them.
    pub headers: HeaderMap,
    /// The raw request body.
    pub body: Bytes,
}

impl RecordedRequest {
    /// The body parsed as JSON, if it is JSON.
    pub fn json(&self) -> Option<serde_json::Value> {
        serde_json::from_slice(&self.body).ok()
    }

    /// A header's value as text, if present and visible ASCII.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

struct Shared {
    queue: Mutex<VecDeque<Scenario>>,
    default: Mutex<Arc<Scenario>>,
    record: bool,
    requests: Mutex<Vec<RecordedRequest>>,
    request_count: AtomicUsize,
    connection_count: AtomicUsize,
    tokens_used: AtomicU64,
    cap: Mutex<Option<RateCap>>,
    capped: AtomicUsize,
    tail: Option<Tail>,
}

/// A long latency tail: `ppm` per million requests are `factor` times slower.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Tail {
    ppm: u64,
    factor: u32,
}

impl Tail {
    /// Whether request `seq` is in the tail: a hash of `seq` (splitmix64), so a run is
    /// reproducible and slow requests are spread evenly, not every n-th.
    fn hits(&self, seq: usize) -> bool {
        let mut z = (seq as u64).wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        z % 1_000_000 < self.ppm
    }
}

/// A provider-side limit over every completion request: at most `limit` per fixed window.
#[derive(Debug, Clone, Copy)]
struct RateCap {
    limit: u64,
    window: Duration,
    start: Option<tokio::time::Instant>,
    used: u64,
}

/// What the cap says about one request: served with `remaining` left until `reset`, or
/// refused until `reset`.
enum CapVerdict {
    Served { remaining: u64, reset: Duration },
    Refused { reset: Duration },
}

impl RateCap {
    fn take(&mut self) -> CapVerdict {
        let now = tokio::time::Instant::now();
        let start = match self.start {
            Some(s) if now < s + self.window => s,
            _ => {
                self.used = 0;
                self.start = Some(now);
                now
            }
        };
        let reset = (start + self.window).saturating_duration_since(now);
        if self.used >= self.limit {
            return CapVerdict::Refused { reset };
        }
        self.used += 1;
        CapVerdict::Served {
            remaining: self.limit - self.used,
            reset,
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding these locks cannot leave the data inconsistent.
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

struct Handle {
    addr: SocketAddr,
    shared: Arc<Shared>,
    stop: watch::Sender<bool>,
    task: Mutex<Option<JoinHandle<()>>>,
}

impl Drop for Handle {
    fn drop(&mut self) {
        // The last handle is gone: stop at once (connections are aborted).
        if let Some(task) = lock(&self.task).take() {
            task.abort();
        }
    }
}

/// A running mock OpenAI / Anthropic HTTP server. Cheap to clone (all clones share the
/// server); the server stops when [`shutdown`](Self::shutdown) is called or the last clone is
/// dropped.
///
/// Starting it spawns the accept loop and one task per connection on the current tokio
/// runtime.
#[derive(Clone)]
pub struct MockUpstream {
    inner: Arc<Handle>,
}

impl fmt::Debug for MockUpstream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MockUpstream")
            .field("addr", &self.inner.addr)
            .field("requests", &self.request_count())
            .field("connections", &self.connection_count())
            .finish()
    }
}

/// Configures a [`MockUpstream`] before it starts (address, default scenario, recording).
///
/// ```
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> std::io::Result<()> {
/// use llm_tower_test::{MockUpstream, Scenario};
///
/// let upstream = MockUpstream::builder()
///     .addr("127.0.0.1:0".parse().unwrap())
///     .default_scenario(Scenario::ok().text("hi"))
///     .record_requests(false) // long-running load tests: keep memory flat
///     .start()
///     .await?;
/// assert!(upstream.base_url().starts_with("http://127.0.0.1:"));
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct MockUpstreamBuilder {
    addr: SocketAddr,
    default: Scenario,
    record: bool,
    tail: Option<Tail>,
}

impl Default for MockUpstreamBuilder {
    fn default() -> Self {
        Self {
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            default: Scenario::ok(),
            record: true,
            tail: None,
        }
    }
}

impl MockUpstreamBuilder {
    /// The address to bind (default `127.0.0.1:0`, a free port).
    pub fn addr(mut self, addr: SocketAddr) -> Self {
        self.addr = addr;
        self
    }

    /// The scenario used when the queue is empty (default [`Scenario::ok`]).
    pub fn default_scenario(mut self, s: Scenario) -> Self {
        self.default = s;
        self
    }

    /// Whether to record every request for [`MockUpstream::requests`] (default `true`).
    /// Turn it off for long runs: recorded requests are kept in memory.
    pub fn record_requests(mut self, record: bool) -> Self {
        self.record = record;
        self
    }

    /// A long latency tail: a `share` (0–1) of requests, spread by a hash of their sequence
    /// number, wait `factor` times their scenario's `latency_ms` and `first_chunk_delay_ms`
    /// (e.g. `0.05, 20`: 5 % of calls 20× slower).
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> std::io::Result<()> {
    /// use llm_tower_test::{MockUpstream, Scenario};
    /// use std::time::Duration;
    /// let upstream = MockUpstream::builder()
    ///     .default_scenario(Scenario::ok().latency(Duration::from_millis(20)))
    ///     .latency_tail(0.05, 20) // 5 % take 400 ms
    ///     .start()
    ///     .await?;
    /// # drop(upstream); Ok(()) }
    /// ```
    pub fn latency_tail(mut self, share: f64, factor: u32) -> Self {
        let share = if share.is_finite() {
            share.clamp(0.0, 1.0)
        } else {
            0.0
        };
        self.tail = (share > 0.0 && factor > 1).then(|| Tail {
            // In range after the clamp.
            ppm: (share * 1e6).round() as u64,
            factor,
        });
        self
    }

    /// Bind and spawn the server on the current tokio runtime.
    pub async fn start(self) -> io::Result<MockUpstream> {
        let listener = TcpListener::bind(self.addr).await?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            queue: Mutex::new(VecDeque::new()),
            default: Mutex::new(Arc::new(self.default)),
            record: self.record,
            requests: Mutex::new(Vec::new()),
            request_count: AtomicUsize::new(0),
            connection_count: AtomicUsize::new(0),
            tokens_used: AtomicU64::new(0),
            cap: Mutex::new(None),
            capped: AtomicUsize::new(0),
            tail: self.tail,
        });
        let (stop, stop_rx) = watch::channel(false);
        let task = tokio::spawn(serve(listener, shared.clone(), stop_rx));
        Ok(MockUpstream {
            inner: Arc::new(Handle {
                addr,
                shared,
                stop,
                task: Mutex::new(Some(task)),
            }),
        })
    }
}

impl MockUpstream {
    /// Bind `127.0.0.1:0` and spawn the server.
    ///
    /// # Panics
    ///
    /// If no local port can be bound (a test helper: use [`MockUpstream::builder`] to handle
    /// the error).
    pub async fn start() -> MockUpstream {
        match Self::builder().start().await {
            Ok(m) => m,
            Err(e) => panic!("MockUpstream: cannot bind 127.0.0.1:0: {e}"),
        }
    }

    /// A builder, to choose the address, default scenario and recording.
    pub fn builder() -> MockUpstreamBuilder {
        MockUpstreamBuilder::default()
    }

    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.inner.addr
    }

    /// `http://127.0.0.1:PORT` (no trailing `/v1`).
    pub fn base_url(&self) -> String {
        format!("http://{}", self.inner.addr)
    }

    /// Queue a scenario: the next completion requests take queued scenarios in order.
    pub fn push(&self, s: Scenario) {
        lock(&self.inner.shared.queue).push_back(s);
    }

    /// The scenario used when the queue is empty (initially [`Scenario::ok`]).
    pub fn set_default(&self, s: Scenario) {
        *lock(&self.inner.shared.default) = Arc::new(s);
    }

    /// Every request received so far, in arrival order (empty if recording is off).
    pub fn requests(&self) -> Vec<RecordedRequest> {
        lock(&self.inner.shared.requests).clone()
    }

    /// The last request received, if any (and recording is on).
    pub fn last_request(&self) -> Option<RecordedRequest> {
        lock(&self.inner.shared.requests).last().cloned()
    }

    /// Forget the recorded requests (the counters keep counting).
    pub fn clear_requests(&self) {
        lock(&self.inner.shared.requests).clear();
    }

    /// How many requests (any path) were received.
    pub fn request_count(&self) -> usize {
        self.inner.shared.request_count.load(Ordering::Relaxed)
    }

    /// Behave like a provider with a request limit: at most `limit` completion requests
    /// per fixed `window` (the first starts at the first request), over every client and
    /// scenario. Beyond it a request is answered 429 with `retry-after` (whole seconds,
    /// rounded up) and no remaining requests; within it the rate-limit headers report the
    /// requests left and the window's reset (`x-ratelimit-reset-requests`,
    /// `anthropic-ratelimit-requests-reset`). `None` removes the cap.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// use llm_tower_test::MockUpstream;
    /// use std::time::Duration;
    ///
    /// let upstream = MockUpstream::start().await;
    /// upstream.set_rate_cap(Some((10, Duration::from_secs(60))));
    /// // ... the 11th completion request within the minute gets a 429.
    /// assert_eq!(upstream.rate_capped_count(), 0);
    /// # }
    /// ```
    pub fn set_rate_cap(&self, cap: Option<(u64, Duration)>) {
        *lock(&self.inner.shared.cap) = cap.map(|(limit, window)| RateCap {
            limit,
            window: window.max(Duration::from_millis(1)),
            start: None,
            used: 0,
        });
    }

    /// How many requests the rate cap ([`set_rate_cap`](Self::set_rate_cap)) answered 429.
    pub fn rate_capped_count(&self) -> usize {
        self.inner.shared.capped.load(Ordering::Relaxed)
    }

    /// How many TCP connections were accepted (for connection-reuse tests).
    pub fn connection_count(&self) -> usize {
        self.inner.shared.connection_count.load(Ordering::Relaxed)
    }

    /// Stop accepting, let in-flight responses finish (up to 5 s), close every connection.
    pub async fn shutdown(self) {
        let _ = self.inner.stop.send(true);
        let task = lock(&self.inner.task).take();
        if let Some(mut task) = task
            && tokio::time::timeout(GRACE, &mut task).await.is_err()
        {
            task.abort();
        }
    }
}

async fn serve(listener: TcpListener, shared: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    let builder = Arc::new(auto::Builder::new(TokioExecutor::new()));
    let mut conns = JoinSet::new();
    let conn_stop = stop.clone();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else {
                    // EMFILE and friends: back off instead of spinning.
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                };
                let _ = stream.set_nodelay(true);
                shared.connection_count.fetch_add(1, Ordering::Relaxed);
                let shared = shared.clone();
                let builder = builder.clone();
                let mut stop = conn_stop.clone();
                conns.spawn(async move {
                    // Set by a `header_drip` scenario for the response being written.
                    let drip = Arc::new(AtomicU64::new(0));
                    let io = drip::DripIo::new(stream, drip.clone());
                    let svc = hyper::service::service_fn(move |req| {
                        handle(shared.clone(), drip.clone(), req)
                    });
                    let conn = builder.serve_connection(TokioIo::new(io), svc);
                    tokio::pin!(conn);
                    tokio::select! {
                        _ = conn.as_mut() => return,
                        _ = stop.changed() => {}
                    }
                    conn.as_mut().graceful_shutdown();
                    let _ = conn.await;
                });
            }
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
            _ = stop.changed() => break,
        }
    }
    drop(listener);
    while conns.join_next().await.is_some() {}
}

type EventStream = Pin<Box<dyn Stream<Item = Result<Frame<Bytes>, io::Error>> + Send>>;
type Body = Either<Full<Bytes>, StreamBody<EventStream>>;

fn full(status: StatusCode, content_type: &'static str, body: Bytes) -> Response<Body> {
    let mut r = Response::new(Either::Left(Full::new(body)));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    r
}

const JSON: &str = "application/json";

/// What a `reset_before_head` scenario answers: hyper closes the connection on a service
/// error, without writing a response.
#[derive(Debug)]
struct ResetBeforeHead;

impl fmt::Display for ResetBeforeHead {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("mock upstream: connection closed before the response head")
    }
}

impl std::error::Error for ResetBeforeHead {}

async fn handle(
    shared: Arc<Shared>,
    drip: Arc<AtomicU64>,
    req: Request<Incoming>,
) -> Result<Response<Body>, ResetBeforeHead> {
    let seq = shared.request_count.fetch_add(1, Ordering::Relaxed) + 1;
    let (parts, body) = req.into_parts();
    let body = match body.collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => return Ok(full(StatusCode::BAD_REQUEST, JSON, Bytes::new())),
    };
    let path = parts.uri.path();
    if shared.record {
        let mut headers = parts.headers.clone();
        // Keys stay readable for assertions but print as "Sensitive" in Debug output.
        for (name, value) in headers.iter_mut() {
            if matches!(
                name.as_str(),
                "authorization" | "proxy-authorization" | "x-api-key" | "api-key"
            ) {
                value.set_sensitive(true);
            }
        }
        lock(&shared.requests).push(RecordedRequest {
            method: parts.method.clone(),
            path: path.to_owned(),
            headers,
            body: body.clone(),
        });
    }
    let route = path.strip_prefix("/v1").unwrap_or(path);
    let embeddings = route == "/embeddings" && parts.method == Method::POST;
    let api = match (route, &parts.method) {
        ("/chat/completions" | "/embeddings", &Method::POST) => Api::OpenAi,
        ("/messages", &Method::POST) => Api::Anthropic,
        ("/responses", &Method::POST) => Api::Responses,
        ("/models", &Method::GET) => return Ok(models(&parts.headers)),
        ("/chat/completions" | "/messages" | "/responses" | "/models" | "/embeddings", _) => {
            return Ok(openai_error(
                StatusCode::METHOD_NOT_ALLOWED,
                "invalid_request_error",
                &format!("Method {} is not allowed on {path}", parts.method),
            ));
        }
        _ => {
            return Ok(openai_error(
                StatusCode::NOT_FOUND,
                "invalid_request_error",
                &format!("Invalid URL ({} {path})", parts.method),
            ));
        }
    };
    let scenario = match parts.headers.get(SCENARIO_HEADER) {
        Some(v) => match v.to_str().ok().map(Scenario::from_json) {
            Some(Ok(s)) => Arc::new(s),
            Some(Err(e)) => {
                return Ok(openai_error(
                    StatusCode::BAD_REQUEST,
                    "invalid_request_error",
                    &format!("invalid {SCENARIO_HEADER} header: {e}"),
                ));
            }
            None => {
                return Ok(openai_error(
                    StatusCode::BAD_REQUEST,
                    "invalid_request_error",
                    &format!("invalid {SCENARIO_HEADER} header: not UTF-8"),
                ));
            }
        },
        None => {
            let queued = lock(&shared.queue).pop_front();
            match queued {
                Some(s) => Arc::new(s),
                None => lock(&shared.default).clone(),
            }
        }
    };
    let verdict = lock(&shared.cap).as_mut().map(RateCap::take);
    let scenario = match verdict {
        Some(CapVerdict::Refused { reset }) => {
            shared.capped.fetch_add(1, Ordering::Relaxed);
            let secs = reset.as_millis().div_ceil(1000).max(1);
            Arc::new(Scenario::rate_limited(
                u64::try_from(secs).unwrap_or(u64::MAX),
            ))
        }
        Some(CapVerdict::Served { remaining, .. }) => {
            let mut s = (*scenario).clone();
            s.ratelimit_remaining_requests = Some(remaining);
            Arc::new(s)
        }
        None => scenario,
    };
    let scenario = match shared.tail {
        Some(t) if t.hits(seq) => {
            let mut s = (*scenario).clone();
            s.latency = s.latency.saturating_mul(t.factor);
            s.first_chunk_delay = s.first_chunk_delay.saturating_mul(t.factor);
            Arc::new(s)
        }
        _ => scenario,
    };
    if !scenario.latency.is_zero() {
        tokio::time::sleep(scenario.latency).await;
    }
    if scenario.reset_before_head {
        return Err(ResetBeforeHead);
    }
    if let Some(ms) = scenario.header_drip_ms {
        drip.store(ms.max(1), Ordering::Relaxed);
    }
    let mut resp = if embeddings && (200..300).contains(&scenario.status) {
        respond_embeddings(seq, &body, &scenario)
    } else {
        respond(&shared, api, seq, &body, &scenario)
    };
    if let Some(CapVerdict::Served { reset, .. } | CapVerdict::Refused { reset }) = verdict {
        render::requests_reset_header(api, resp.headers_mut(), reset);
    }
    Ok(resp)
}

fn respond(shared: &Shared, api: Api, seq: usize, body: &Bytes, s: &Scenario) -> Response<Body> {
    let parsed = Parsed::from_slice(api, body);
    let rid = format!("req_mock{seq:016x}");

    let mut resp = if !(200..300).contains(&s.status) {
        let model = parsed.as_ref().map_or("unknown", |p| p.model.as_str());
        // 1xx is not a final response: a scenario asking for one gets a 500.
        let status = StatusCode::from_u16(s.status)
            .ok()
            .filter(|c| c.as_u16() >= 200)
            .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let mut r = full(status, JSON, render::error_body(api, s, model, &rid));
        if s.status == 429 {
            let rr = s.ratelimit_remaining_requests.unwrap_or(0);
            let rt = s.ratelimit_remaining_tokens.unwrap_or(0);
            render::ratelimit_headers(api, r.headers_mut(), rr, rt);
        }
        r
    } else {
        let p = match parsed {
            Ok(p) => p,
            Err(msg) => return bad_request(api, &msg),
        };
        let answer = Answer::new(api, seq, &p, s);
        let used = shared.tokens_used.fetch_add(
            answer.prompt_tokens + answer.completion_tokens,
            Ordering::Relaxed,
        ) + answer.prompt_tokens
            + answer.completion_tokens;
        let rr = s
            .ratelimit_remaining_requests
            .unwrap_or(render::LIMIT_REQUESTS - 1 - (seq as u64 - 1) % render::LIMIT_REQUESTS);
        let rt = s
            .ratelimit_remaining_tokens
            .unwrap_or(render::LIMIT_TOKENS - used % render::LIMIT_TOKENS);
        let status = StatusCode::from_u16(s.status).unwrap_or(StatusCode::OK);
        let mut r = if let Some(r) = hostile_body(api, &p, &answer, s, status) {
            r
        } else if p.stream {
            let events = match api {
                Api::OpenAi => render::openai_stream(&p, &answer, s),
                Api::Anthropic => render::anthropic_stream(&p, &answer, s),
                Api::Responses => render::responses_stream(&p, &answer, s),
            };
            let mut r = Response::new(Either::Right(StreamBody::new(event_stream(
                events,
                s.first_chunk_delay,
                s.chunk_delay,
            ))));
            *r.status_mut() = status;
            let h = r.headers_mut();
            h.insert(
                CONTENT_TYPE,
                HeaderValue::from_static("text/event-stream; charset=utf-8"),
            );
            h.insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
            r
        } else if s.malformed_json {
            full(
                status,
                JSON,
                Bytes::from(format!(
                    "{{\"id\":\"{}\",\"object\":\"chat.completion\",\"choices\":[{{\"index\":0,\"message\":{{\"role\":\"assistant\",\"content\":\"{}",
                    answer.id,
                    answer.text.replace(['"', '\\'], "")
                )),
            )
        } else {
            let body = match api {
                Api::OpenAi => render::openai_completion(&p, &answer),
                Api::Anthropic => render::anthropic_message(&p, &answer),
                Api::Responses => render::responses_object(&p, &answer),
            };
            full(status, JSON, body)
        };
        render::ratelimit_headers(api, r.headers_mut(), rr, rt);
        r
    };

    let h = resp.headers_mut();
    let rid_name = match api {
        Api::OpenAi | Api::Responses => "x-request-id",
        Api::Anthropic => "request-id",
    };
    if let Ok(v) = HeaderValue::from_str(&rid) {
        h.insert(HeaderName::from_static(rid_name), v);
    }
    if let Some(secs) = s.retry_after_secs {
        h.insert(RETRY_AFTER, HeaderValue::from(secs));
        if api != Api::Anthropic {
            h.insert(
                HeaderName::from_static("retry-after-ms"),
                HeaderValue::from(secs.saturating_mul(1000)),
            );
        }
    }
    if s.absurd_headers {
        render::absurd_headers(h);
    }
    if let Some(n) = s.big_header_bytes {
        let n = n.min(scenario::MAX_HOSTILE_ALLOC);
        if let Ok(v) = HeaderValue::from_bytes(&vec![b'a'; n]) {
            h.insert(HeaderName::from_static("x-mock-big"), v);
        }
    }
    for i in 0..s
        .extra_header_count
        .unwrap_or(0)
        .min(scenario::MAX_EXTRA_HEADERS)
    {
        if let Ok(k) = HeaderName::try_from(format!("x-mock-h{i}")) {
            h.insert(k, HeaderValue::from(i));
        }
    }
    for (k, v) in &s.headers {
        if let (Ok(k), Ok(v)) = (
            HeaderName::from_bytes(k.as_bytes()),
            HeaderValue::from_str(v),
        ) {
            h.append(k, v);
        }
    }
    resp
}

/// `POST /v1/embeddings`: the simulated provider's deterministic vectors, written in the
/// request's `encoding_format`, with usage and the OpenAI rate-limit headers. A scenario's
/// `malformed_json` cuts the document short.
fn respond_embeddings(seq: usize, body: &Bytes, s: &Scenario) -> Response<Body> {
    let req = match llm_tower_core::EmbeddingsRequest::from_slice(body) {
        Ok(r) => r,
        Err(e) => return bad_request(Api::OpenAi, e.message()),
    };
    let dims = req
        .dimensions
        .map_or(llm_tower_providers::simulated::SIMULATED_DIMENSIONS, |d| {
            usize::try_from(d).unwrap_or(1)
        });
    let data = req
        .input
        .iter()
        .map(|x| llm_tower_providers::simulated::embed(&req.model, x, dims))
        .collect();
    let tokens = req
        .input
        .iter()
        .map(|x| render::estimate_tokens(x.len_bytes()))
        .sum();
    let answer = llm_tower_core::EmbeddingsResponse {
        model: req.model.clone(),
        data,
        usage: llm_tower_core::Usage::new(tokens, 0),
    };
    let mut json = answer.to_json(req.format());
    if s.malformed_json {
        json.truncate(json.len() / 2);
    }
    let status = StatusCode::from_u16(s.status).unwrap_or(StatusCode::OK);
    let mut r = full(status, JSON, Bytes::from(json));
    let rr = s
        .ratelimit_remaining_requests
        .unwrap_or(render::LIMIT_REQUESTS - 1);
    let rt = s
        .ratelimit_remaining_tokens
        .unwrap_or(render::LIMIT_TOKENS.saturating_sub(tokens));
    render::ratelimit_headers(Api::OpenAi, r.headers_mut(), rr, rt);
    if let Ok(v) = HeaderValue::from_str(&format!("req_mock{seq:016x}")) {
        r.headers_mut()
            .insert(HeaderName::from_static("x-request-id"), v);
    }
    r
}

/// The body of a hostile 2xx scenario (huge, endless, deep, reset after the head), if any.
fn hostile_body(
    api: Api,
    p: &Parsed,
    a: &Answer,
    s: &Scenario,
    status: StatusCode,
) -> Option<Response<Body>> {
    if !(s.reset_after_head
        || s.endless_body
        || s.huge_body_bytes.is_some()
        || s.deep_json.is_some())
    {
        return None;
    }
    let once = |b: Bytes| event_stream(vec![Ev::Bytes(b)], Duration::ZERO, Duration::ZERO);
    let body: EventStream = if s.reset_after_head {
        event_stream(vec![Ev::Abort], Duration::ZERO, Duration::ZERO)
    } else if p.stream {
        let mut events = match api {
            Api::OpenAi => render::openai_stream(p, a, s),
            Api::Anthropic => render::anthropic_stream(p, a, s),
            Api::Responses => render::responses_stream(p, a, s),
        };
        // The preamble: OpenAI's role chunk; Anthropic's message_start, content_block_start,
        // ping; Responses' created, in_progress, output_item.added, content_part.added.
        let pre = match api {
            Api::OpenAi => 1,
            Api::Anthropic => 3,
            Api::Responses => 4,
        };
        let rest = events.split_off(pre.min(events.len()));
        let pre = event_stream(events, s.first_chunk_delay, s.chunk_delay);
        let rest = event_stream(rest, s.chunk_delay, s.chunk_delay);
        if s.endless_body {
            let every = s.chunk_delay.max(Duration::from_millis(10));
            Box::pin(pre.chain(fill_stream(
                Bytes::from_static(b": keep-alive\n\n"),
                None,
                every,
            )))
        } else if let Some(n) = s.huge_body_bytes {
            let pad = fill_stream(PAD.clone(), Some(n.saturating_sub(4)), Duration::ZERO);
            Box::pin(
                pre.chain(once(Bytes::from_static(b": ")))
                    .chain(pad)
                    .chain(once(Bytes::from_static(b"\n\n")))
                    .chain(rest),
            )
        } else {
            let mut deep = b"data: ".to_vec();
            deep.extend_from_slice(&render::deep_json(s.deep_json.unwrap_or(0)));
            deep.extend_from_slice(b"\n\n");
            Box::pin(pre.chain(once(Bytes::from(deep))).chain(rest))
        }
    } else if let Some(d) = s.deep_json {
        return Some(full(status, JSON, Bytes::from(render::deep_json(d))));
    } else {
        let base = match api {
            Api::OpenAi => render::openai_completion(p, a),
            Api::Anthropic => render::anthropic_message(p, a),
            Api::Responses => render::responses_object(p, a),
        };
        // `{…}` → `{…,"pad":"` + a… + `"}`: still the answer, and valid JSON.
        let mut prefix = base[..base.len().saturating_sub(1)].to_vec();
        prefix.extend_from_slice(b",\"pad\":\"");
        let prefix = Bytes::from(prefix);
        if s.endless_body {
            Box::pin(once(prefix).chain(fill_stream(PAD.clone(), None, s.chunk_delay)))
        } else {
            let total = s.huge_body_bytes.unwrap_or(0).max(prefix.len() + 2);
            let fill = total - prefix.len() - 2;
            let mut r = Response::new(Either::Right(StreamBody::new(Box::pin(
                once(prefix)
                    .chain(fill_stream(PAD.clone(), Some(fill), Duration::ZERO))
                    .chain(once(Bytes::from_static(b"\"}"))),
            ) as EventStream)));
            *r.status_mut() = status;
            r.headers_mut()
                .insert(CONTENT_TYPE, HeaderValue::from_static(JSON));
            r.headers_mut()
                .insert(http::header::CONTENT_LENGTH, HeaderValue::from(total));
            return Some(r);
        }
    };
    let mut r = Response::new(Either::Right(StreamBody::new(body)));
    *r.status_mut() = status;
    let ct = if p.stream {
        "text/event-stream; charset=utf-8"
    } else {
        JSON
    };
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(ct));
    Some(r)
}

/// 64 KiB of `a`, shared by every padded body.
static PAD: Bytes = Bytes::from_static(&[b'a'; 64 * 1024]);

/// `unit` again and again (every `every`), `total` bytes in all (the last one cut), or
/// forever.
fn fill_stream(unit: Bytes, total: Option<usize>, every: Duration) -> EventStream {
    Box::pin(futures_util::stream::unfold(total, move |left| {
        let unit = unit.clone();
        async move {
            if left == Some(0) || unit.is_empty() {
                return None;
            }
            if !every.is_zero() {
                tokio::time::sleep(every).await;
            }
            let n = left.map_or(unit.len(), |l| l.min(unit.len()));
            Some((Ok(Frame::data(unit.slice(..n))), left.map(|l| l - n)))
        }
    }))
}

fn bad_request(api: Api, msg: &str) -> Response<Body> {
    match api {
        Api::OpenAi | Api::Responses => {
            openai_error(StatusCode::BAD_REQUEST, "invalid_request_error", msg)
        }
        Api::Anthropic => {
            let v = serde_json::json!({
                "type": "error",
                "error": { "type": "invalid_request_error", "message": msg }
            });
            full(StatusCode::BAD_REQUEST, JSON, Bytes::from(v.to_string()))
        }
    }
}

fn openai_error(status: StatusCode, kind: &str, msg: &str) -> Response<Body> {
    let v = serde_json::json!({
        "error": { "message": msg, "type": kind, "param": null, "code": null }
    });
    full(status, JSON, Bytes::from(v.to_string()))
}

/// The models the mock lists.
pub const MODELS: &[&str] = &[
    "gpt-4o",
    "gpt-4o-mini",
    "claude-sonnet-4-5",
    "claude-3-5-haiku-latest",
];

fn models(headers: &HeaderMap) -> Response<Body> {
    let created = 1_715_367_049_u64;
    let v = if headers.contains_key("anthropic-version") {
        let data: Vec<_> = MODELS
            .iter()
            .map(|id| {
                serde_json::json!({
                    "type": "model",
                    "id": id,
                    "display_name": id,
                    "created_at": "2025-02-19T00:00:00Z"
                })
            })
            .collect();
        serde_json::json!({
            "data": data,
            "has_more": false,
            "first_id": MODELS.first(),
            "last_id": MODELS.last()
        })
    } else {
        let data: Vec<_> = MODELS
            .iter()
            .map(|id| {
                serde_json::json!({
                    "id": id,
                    "object": "model",
                    "created": created,
                    "owned_by": "mock"
                })
            })
            .collect();
        serde_json::json!({ "object": "list", "data": data })
    };
    full(StatusCode::OK, JSON, Bytes::from(v.to_string()))
}

fn event_stream(events: Vec<Ev>, first: Duration, between: Duration) -> EventStream {
    let state = (events.into_iter(), true);
    Box::pin(futures_util::stream::unfold(
        state,
        move |(mut it, is_first)| async move {
            let ev = it.next()?;
            let delay = if is_first { first } else { between };
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            let item = match ev {
                Ev::Bytes(b) => Ok(Frame::data(b)),
                // An error from the body makes hyper abort the connection / reset the stream.
                Ev::Abort => {
                    // Let the connection flush the events already written (hyper flushes when
                    // the body is pending), so the client sees them before the abort.
                    tokio::task::yield_now().await;
                    tokio::task::yield_now().await;
                    Err(io::Error::new(
                        io::ErrorKind::ConnectionAborted,
                        "mock upstream: connection dropped mid-stream",
                    ))
                }
            };
            Some((item, (it, false)))
        },
    ))
}
