//! What both providers share: sending one request, reading bodies, the SSE chunk stream
//! and the named response future.

use std::collections::VecDeque;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures_core::Stream;
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Uri};
use http_body::Body;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use llm_tower_core::dialect::Dialect;
use llm_tower_core::{
    Deadline, LlmError, LlmResponse, NativeEvent, PaidAttempt, RateLimitHeadroom, StreamEvent,
    StreamHead, TraceParent,
};
use tokio::time::Instant;

use crate::classify;
use crate::http::{BufferBudget, HttpClient, HttpResponse};
use crate::limits::ResponseLimits;
use crate::secret::ApiKey;
use crate::sse::{SseEvent, SseParser};

/// Largest error body read for classification.
const MAX_ERROR_BYTES: usize = 256 * 1024;
/// How long an error body may take to arrive.
const ERROR_BODY_TIMEOUT: Duration = Duration::from_secs(10);

/// A provider's fixed request target: URL, headers (authorization included, marked
/// sensitive) and the shared client.
#[derive(Clone)]
pub(crate) struct Endpoint {
    pub(crate) provider: Arc<str>,
    pub(crate) url: Uri,
    pub(crate) headers: HeaderMap,
    pub(crate) key: Option<ApiKey>,
    pub(crate) client: HttpClient,
    pub(crate) limits: ResponseLimits,
    /// Rate-limit header values that could not be read (ignored), over all answers.
    pub(crate) malformed_headers: Arc<AtomicU64>,
}

impl fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Header values may be secrets (custom auth headers): print names only.
        let names: Vec<&str> = self.headers.keys().map(HeaderName::as_str).collect();
        f.debug_struct("Endpoint")
            .field("provider", &self.provider)
            .field("url", &self.url)
            .field("headers", &names)
            .field("key", &self.key)
            .field("limits", &self.limits)
            .finish_non_exhaustive()
    }
}

impl Endpoint {
    /// Builds the target: `base_url` + `path`, the fixed headers, the auth header.
    pub(crate) fn new(
        provider: &str,
        base_url: &str,
        path: &str,
        auth: Option<(HeaderName, String)>,
        key: Option<ApiKey>,
        extra: &std::collections::BTreeMap<String, String>,
        client: HttpClient,
    ) -> Result<Self, LlmError> {
        let bad = |msg: String| LlmError::bad_request(format!("{provider} configuration: {msg}"));
        let url = format!("{}{path}", base_url.trim_end_matches('/'));
        let url: Uri = url
            .parse()
            .map_err(|e| bad(format!("invalid base_url `{base_url}`: {e}")))?;
        if !matches!(url.scheme_str(), Some("http" | "https")) || url.host().is_none() {
            return Err(bad(format!(
                "base_url `{base_url}` must be an absolute http:// or https:// URL"
            )));
        }
        let mut headers = HeaderMap::new();
        headers.insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        headers.insert(
            http::header::USER_AGENT,
            HeaderValue::from_static(concat!("llm-tower/", env!("CARGO_PKG_VERSION"))),
        );
        for (name, value) in extra {
            let n = HeaderName::try_from(name.as_str())
                .map_err(|_| bad(format!("invalid header name `{name}`")))?;
            // The value is not echoed: extra headers often carry secrets.
            let mut v = HeaderValue::try_from(value.as_str())
                .map_err(|_| bad(format!("invalid value for header `{name}`")))?;
            v.set_sensitive(true);
            headers.insert(n, v);
        }
        if let Some((name, value)) = auth {
            // Never echo the value: it is the key.
            let mut v = HeaderValue::try_from(value).map_err(|_| {
                bad("the API key contains characters not allowed in a header".into())
            })?;
            v.set_sensitive(true);
            headers.insert(name, v);
        }
        Ok(Self {
            provider: Arc::from(provider),
            url,
            headers,
            key,
            client,
            limits: ResponseLimits::default(),
            malformed_headers: Arc::default(),
        })
    }

    /// The rate-limit headroom of a successful answer; values that do not parse are
    /// ignored and counted, never an error.
    pub(crate) fn headroom(&self, headers: &HeaderMap) -> Option<RateLimitHeadroom> {
        let (h, bad) = classify::headroom(headers);
        if bad > 0 {
            self.malformed_headers
                .fetch_add(u64::from(bad), Ordering::Relaxed);
            tracing::debug!(provider = %self.provider, count = bad, "ignored malformed rate-limit headers");
        }
        h
    }

    /// When the response timeout of a request sent at `started` expires, if before its
    /// deadline: `(instant, true)`; the deadline's instant otherwise: `(instant, false)`.
    fn expiry(&self, started: Instant, deadline: Option<Deadline>) -> Option<(Instant, bool)> {
        // `checked_add`: a huge configured timeout means "none", never a panic.
        let own = self.limits.timeout().and_then(|t| started.checked_add(t));
        match (own, deadline) {
            (Some(o), Some(d)) if o < d.0 => Some((o, true)),
            (_, Some(d)) => Some((d.0, false)),
            (Some(o), None) => Some((o, true)),
            (None, None) => None,
        }
    }

    fn timeout_error(&self, own: bool, what: &str) -> LlmError {
        let msg = if own {
            format!(
                "{}: {what} within the response timeout ({} ms)",
                self.provider, self.limits.response_timeout_ms
            )
        } else {
            format!("{}: {what} before the request's deadline", self.provider)
        };
        let e = LlmError::timeout(msg).with_provider(&*self.provider);
        if own {
            e.with_code("upstream_timeout")
        } else {
            e
        }
    }

    /// POSTs `body`; returns the success response, the time to its headers and when it
    /// was sent, or the classified error. Honours the request's [`Deadline`] and the
    /// response timeout up to the response headers.
    pub(crate) async fn send(
        &self,
        body: Vec<u8>,
        stream: bool,
        deadline: Option<Deadline>,
        trace: Option<&TraceParent>,
    ) -> Result<(HttpResponse, Duration, Instant), LlmError> {
        self.send_with(body, stream, deadline, trace, &[]).await
    }

    /// [`send`](Self::send) with request headers of this call that replace the fixed ones
    /// of the same name.
    pub(crate) async fn send_with(
        &self,
        body: Vec<u8>,
        stream: bool,
        deadline: Option<Deadline>,
        trace: Option<&TraceParent>,
        headers: &[(HeaderName, HeaderValue)],
    ) -> Result<(HttpResponse, Duration, Instant), LlmError> {
        let mut req = Request::new(Full::new(Bytes::from(body)));
        *req.method_mut() = Method::POST;
        *req.uri_mut() = self.url.clone();
        *req.headers_mut() = self.headers.clone();
        for (name, value) in headers {
            req.headers_mut().insert(name.clone(), value.clone());
        }
        req.headers_mut().insert(
            http::header::ACCEPT,
            HeaderValue::from_static(if stream {
                "text/event-stream"
            } else {
                "application/json"
            }),
        );
        // The attempt's trace context (set only when tracing is on), so the upstream's
        // own spans join the request's trace.
        if let Some(t) = trace {
            t.write(req.headers_mut());
        }
        let started = Instant::now();
        let fut = self.client.send(req);
        let result = match self.expiry(started, deadline) {
            Some((at, own)) => match tokio::time::timeout_at(at, fut).await {
                Ok(r) => r,
                Err(_) => return Err(self.timeout_error(own, "no response headers")),
            },
            None => fut.await,
        };
        let resp = result.map_err(|e| {
            if head_too_large(&e) {
                let cfg = self.client.config();
                return LlmError::transport(format!(
                    "{}: the response head is too large (more than {} headers or {} bytes)",
                    self.provider, cfg.max_response_headers, cfg.max_response_header_bytes
                ))
                .with_provider(&*self.provider)
                .with_code("upstream_head_too_large");
            }
            let what = if e.is_connect() {
                "cannot connect to the upstream"
            } else {
                "request failed"
            };
            classify::transport(&self.provider, what, &e)
        })?;
        let elapsed = started.elapsed();
        if resp.status().is_success() {
            return Ok((resp, elapsed, started));
        }
        let (parts, body) = resp.into_parts();
        // A failed or stalled read of the error body still leaves the status to classify by.
        let bytes = tokio::time::timeout(
            ERROR_BODY_TIMEOUT,
            read_limited(body, MAX_ERROR_BYTES, self.client.buffers()),
        )
        .await
        .ok()
        .and_then(Result::ok)
        .unwrap_or_default();
        tracing::debug!(provider = %self.provider, status = parts.status.as_u16(), "upstream error");
        Err(classify::classify_status(
            &self.provider,
            parts.status,
            &parts.headers,
            &bytes,
            self.key.as_ref(),
        ))
    }

    /// Reads a complete response body, bounded in size
    /// ([`ResponseLimits::max_body_bytes`]) and time (the response timeout from `started`,
    /// and the request's deadline).
    pub(crate) async fn read_body(
        &self,
        body: Incoming,
        started: Instant,
        deadline: Option<Deadline>,
    ) -> Result<Bytes, LlmError> {
        let max = self.limits.max_body_bytes;
        let too_large = || {
            LlmError::transport(format!(
                "{}: the response body is larger than the limit of {max} bytes (max_body_bytes)",
                self.provider
            ))
            .with_provider(&*self.provider)
            .with_code("upstream_response_too_large")
        };
        // A declared length over the limit fails before a byte is read.
        if body.size_hint().lower() > max as u64 {
            return Err(too_large());
        }
        let read = read_limited(body, max, self.client.buffers());
        let result = match self.expiry(started, deadline) {
            Some((at, own)) => match tokio::time::timeout_at(at, read).await {
                Ok(r) => r,
                Err(_) => return Err(self.timeout_error(own, "no complete response body")),
            },
            None => read.await,
        };
        result.map_err(|e| match e {
            ReadError::TooLarge => too_large(),
            ReadError::BuffersFull => LlmError::transport(format!(
                "{}: too many answer bytes are being read at once (max_buffered_bytes)",
                self.provider
            ))
            .with_provider(&*self.provider)
            .with_code("upstream_buffers_full"),
            ReadError::Body(e) => classify::transport(
                &self.provider,
                "connection failed while reading the response",
                &e,
            ),
        })
    }
}

/// Whether the transport error is hyper's "message head is too large" (too many headers
/// or too many header bytes).
fn head_too_large(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur = Some(e);
    while let Some(err) = cur {
        // `is_parse_too_large` needs hyper's `server` feature; its text is stable.
        if let Some(h) = err.downcast_ref::<hyper::Error>()
            && h.is_parse()
            && h.to_string().contains("too large")
        {
            return true;
        }
        cur = err.source();
    }
    false
}

enum ReadError {
    TooLarge,
    BuffersFull,
    Body(hyper::Error),
}

/// Reads a whole body of at most `limit` bytes, each byte taken from the shared `budget`
/// while it is being read.
async fn read_limited(
    mut body: Incoming,
    limit: usize,
    budget: &BufferBudget,
) -> Result<Bytes, ReadError> {
    let mut hold = budget.holder();
    let mut parts: Vec<Bytes> = Vec::new();
    let mut len = 0usize;
    while let Some(frame) = body.frame().await {
        let Ok(data) = frame.map_err(ReadError::Body)?.into_data() else {
            continue; // trailers
        };
        len = len.saturating_add(data.len());
        if len > limit {
            return Err(ReadError::TooLarge);
        }
        if !hold.take(data.len()) {
            return Err(ReadError::BuffersFull);
        }
        parts.push(data);
    }
    // One frame (the common small answer) is returned as it is, without a copy.
    Ok(match parts.len() {
        1 => parts.pop().unwrap_or_default(),
        _ => parts.concat().into(),
    })
}

/// Turns SSE events of one provider into chunk events (typed, or kept in the upstream's
/// JSON where that is the client's format too).
pub(crate) trait Decoder: Send + Unpin + 'static {
    /// Handles one event, pushing the chunk events it yields.
    fn decode(&mut self, event: &SseEvent, out: &mut VecDeque<StreamEvent>)
    -> Result<(), LlmError>;
    /// Whether the terminal event has been seen.
    fn is_done(&self) -> bool;
    /// The terminal event's name, for the "ended early" error.
    fn terminal(&self) -> &'static str;
    /// The usage the provider reported before the stream failed (Anthropic reports the
    /// input tokens in `message_start`): the failed attempt was paid for.
    fn usage_so_far(&self) -> Option<PaidAttempt> {
        None
    }
}

/// The event stream of a streamed response: body frames → SSE events → chunk events.
///
/// Ends with an error (never a clean end) if the body ends or breaks before the
/// provider's terminal event.
pub(crate) struct SseStream<B, D> {
    body: Option<B>,
    parser: SseParser,
    decoder: D,
    queue: VecDeque<StreamEvent>,
    provider: Arc<str>,
    finished: bool,
}

impl<B, D> SseStream<B, D>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: std::error::Error + 'static,
    D: Decoder,
{
    pub(crate) fn new(body: B, decoder: D, provider: Arc<str>, max_event_bytes: usize) -> Self {
        Self {
            body: Some(body),
            parser: SseParser::with_max_event_bytes(max_event_bytes),
            decoder,
            queue: VecDeque::new(),
            provider,
            finished: false,
        }
    }

    fn fail(&mut self, mut err: LlmError) -> Poll<Option<Result<StreamEvent, LlmError>>> {
        if err.usage().is_none()
            && let Some(paid) = self.decoder.usage_so_far()
        {
            err = err.with_usage(paid.model, paid.usage);
        }
        self.finished = true;
        self.body = None;
        self.queue.clear();
        Poll::Ready(Some(Err(err)))
    }

    /// After the terminal event: read what is already there so that the connection can go
    /// back to the pool, but never wait for it.
    fn drain_ready(&mut self, cx: &mut Context<'_>) {
        if let Some(body) = self.body.as_mut() {
            for _ in 0..4 {
                match Pin::new(&mut *body).poll_frame(cx) {
                    Poll::Ready(Some(Ok(_))) => continue,
                    _ => break,
                }
            }
        }
        self.body = None;
    }
}

impl<B, D> Stream for SseStream<B, D>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: std::error::Error + 'static,
    D: Decoder,
{
    type Item = Result<StreamEvent, LlmError>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        loop {
            if let Some(chunk) = this.queue.pop_front() {
                return Poll::Ready(Some(Ok(chunk)));
            }
            if this.finished {
                return Poll::Ready(None);
            }
            if this.decoder.is_done() {
                this.finished = true;
                this.drain_ready(cx);
                return Poll::Ready(None);
            }
            match this.parser.next_event() {
                Ok(Some(ev)) => {
                    if let Err(e) = this.decoder.decode(&ev, &mut this.queue) {
                        return this.fail(e);
                    }
                    continue;
                }
                Ok(None) => {}
                Err(e) => {
                    let err = LlmError::transport(format!(
                        "{}: a server-sent event is larger than the limit of {} bytes \
                         (max_sse_event_bytes)",
                        this.provider,
                        e.limit()
                    ))
                    .with_provider(&*this.provider)
                    .with_code("upstream_event_too_large");
                    return this.fail(err);
                }
            }
            let Some(body) = this.body.as_mut() else {
                // The body ended: a last event may lack its blank line.
                if let Some(ev) = this.parser.finish() {
                    if let Err(e) = this.decoder.decode(&ev, &mut this.queue) {
                        return this.fail(e);
                    }
                    continue;
                }
                let err = LlmError::transport(format!(
                    "{}: the stream ended before its terminal event ({})",
                    this.provider,
                    this.decoder.terminal()
                ))
                .with_provider(&*this.provider);
                return this.fail(err);
            };
            match Pin::new(body).poll_frame(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(None) => this.body = None,
                Poll::Ready(Some(Ok(frame))) => {
                    if let Ok(data) = frame.into_data() {
                        this.parser.push(&data);
                    }
                }
                Poll::Ready(Some(Err(e))) => {
                    let err =
                        classify::transport(&this.provider, "the connection broke mid-stream", &e);
                    return this.fail(err);
                }
            }
        }
    }
}

/// The future every provider returns from `call`.
pub struct ResponseFuture {
    inner: Pin<Box<dyn Future<Output = Result<LlmResponse, LlmError>> + Send>>,
}

impl ResponseFuture {
    pub(crate) fn new<F>(f: F) -> Self
    where
        F: Future<Output = Result<LlmResponse, LlmError>> + Send + 'static,
    {
        Self { inner: Box::pin(f) }
    }
}

impl Future for ResponseFuture {
    type Output = Result<LlmResponse, LlmError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        self.inner.as_mut().poll(cx)
    }
}

impl fmt::Debug for ResponseFuture {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}

/// `ev` kept as its upstream sent it, in `dialect`: named by its `event:` line, or by
/// `fallback` (the event's type) where that line is missing or not UTF-8. `None` when
/// neither is a name.
pub(crate) fn native_event(
    dialect: Dialect,
    ev: &SseEvent,
    fallback: &str,
    head: &Arc<StreamHead>,
) -> Option<NativeEvent> {
    let native =
        |name: Bytes| NativeEvent::new(dialect, name, ev.data_bytes().clone(), head.clone());
    ev.event_bytes()
        .and_then(|name| native(name.clone()))
        .or_else(|| native(Bytes::copy_from_slice(fallback.as_bytes())))
}

/// Applies the alias → provider model mapping and the default model.
pub(crate) fn map_model(
    model: &mut String,
    models: &std::collections::HashMap<String, String>,
    default_model: Option<&str>,
) {
    if let Some(m) = models.get(model.as_str()) {
        model.clone_from(m);
    } else if model.is_empty()
        && let Some(d) = default_model
    {
        *model = d.to_owned();
    }
}
