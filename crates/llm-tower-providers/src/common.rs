//! What both providers share: sending one request, reading bodies, the SSE chunk stream
//! and the named response future.

use std::collections::VecDeque;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures_core::Stream;
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Uri};
use http_body::Body;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use llm_tower_core::{ChatChunk, Deadline, LlmError, LlmResponse};
use tokio::time::Instant;

use crate::classify;
use crate::http::{HttpClient, HttpResponse};
use crate::secret::ApiKey;
use crate::sse::{SseEvent, SseParser};

/// Largest complete (non-streamed) response body accepted: 64 MiB.
pub(crate) const MAX_RESPONSE_BYTES: usize = 64 * 1024 * 1024;
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
        })
    }

    /// POSTs `body`; returns the success response and the time to its headers, or the
    /// classified error. Honours the request's [`Deadline`] up to the response headers.
    pub(crate) async fn send(
        &self,
        body: Vec<u8>,
        stream: bool,
        deadline: Option<Deadline>,
    ) -> Result<(HttpResponse, Duration), LlmError> {
        let mut req = Request::new(Full::new(Bytes::from(body)));
        *req.method_mut() = Method::POST;
        *req.uri_mut() = self.url.clone();
        *req.headers_mut() = self.headers.clone();
        req.headers_mut().insert(
            http::header::ACCEPT,
            HeaderValue::from_static(if stream {
                "text/event-stream"
            } else {
                "application/json"
            }),
        );
        let started = Instant::now();
        let fut = self.client.send(req);
        let result = match deadline {
            Some(d) => match tokio::time::timeout_at(d.0, fut).await {
                Ok(r) => r,
                Err(_) => {
                    return Err(LlmError::timeout(format!(
                        "{}: no response before the request's deadline",
                        self.provider
                    ))
                    .with_provider(&*self.provider));
                }
            },
            None => fut.await,
        };
        let resp = result.map_err(|e| {
            let what = if e.is_connect() {
                "cannot connect to the upstream"
            } else {
                "request failed"
            };
            classify::transport(&self.provider, what, &e)
        })?;
        let elapsed = started.elapsed();
        if resp.status().is_success() {
            return Ok((resp, elapsed));
        }
        let (parts, body) = resp.into_parts();
        // A failed or stalled read of the error body still leaves the status to classify by.
        let bytes = tokio::time::timeout(ERROR_BODY_TIMEOUT, read_limited(body, MAX_ERROR_BYTES))
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

    /// Reads a complete response body (bounded).
    pub(crate) async fn read_body(&self, body: Incoming) -> Result<Bytes, LlmError> {
        read_limited(body, MAX_RESPONSE_BYTES).await.map_err(|e| {
            if e.is::<http_body_util::LengthLimitError>() {
                classify::malformed(
                    &self.provider,
                    "response",
                    format!("body larger than {MAX_RESPONSE_BYTES} bytes"),
                )
            } else {
                classify::transport(
                    &self.provider,
                    "connection failed while reading the response",
                    &*e,
                )
            }
        })
    }
}

async fn read_limited(
    body: Incoming,
    limit: usize,
) -> Result<Bytes, Box<dyn std::error::Error + Send + Sync>> {
    Ok(Limited::new(body, limit).collect().await?.to_bytes())
}

/// Runs `fut` until the request's deadline, if it has one.
pub(crate) async fn until_deadline<T>(
    provider: &str,
    deadline: Option<Deadline>,
    fut: impl Future<Output = Result<T, LlmError>>,
) -> Result<T, LlmError> {
    match deadline {
        None => fut.await,
        Some(d) => tokio::time::timeout_at(d.0, fut).await.unwrap_or_else(|_| {
            Err(LlmError::timeout(format!(
                "{provider}: no complete response before the request's deadline"
            ))
            .with_provider(provider))
        }),
    }
}

/// Turns SSE events of one provider into chunks.
pub(crate) trait Decoder: Send + Unpin + 'static {
    /// Handles one event, pushing the chunks it yields.
    fn decode(&mut self, event: &SseEvent, out: &mut VecDeque<ChatChunk>) -> Result<(), LlmError>;
    /// Whether the terminal event has been seen.
    fn is_done(&self) -> bool;
    /// The terminal event's name, for the "ended early" error.
    fn terminal(&self) -> &'static str;
}

/// The chunk stream of a streamed response: body frames → SSE events → chunks.
///
/// Ends with an error (never a clean end) if the body ends or breaks before the
/// provider's terminal event.
pub(crate) struct SseStream<B, D> {
    body: Option<B>,
    parser: SseParser,
    decoder: D,
    queue: VecDeque<ChatChunk>,
    provider: Arc<str>,
    finished: bool,
}

impl<B, D> SseStream<B, D>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: std::error::Error + 'static,
    D: Decoder,
{
    pub(crate) fn new(body: B, decoder: D, provider: Arc<str>) -> Self {
        Self {
            body: Some(body),
            parser: SseParser::new(),
            decoder,
            queue: VecDeque::new(),
            provider,
            finished: false,
        }
    }

    fn fail(&mut self, err: LlmError) -> Poll<Option<Result<ChatChunk, LlmError>>> {
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
    type Item = Result<ChatChunk, LlmError>;

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
                    let err = classify::malformed(&this.provider, "server-sent events", e);
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
