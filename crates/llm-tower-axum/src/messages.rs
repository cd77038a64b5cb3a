//! The Anthropic Messages front door: `POST /v1/messages` and
//! `POST /v1/messages/count_tokens`, over the same LLM service as chat completions.
//!
//! The body is parsed into the chat view the layers act on
//! ([`messages::request_from_bytes`]), which keeps the original body for a provider that
//! speaks Messages. Answers are written in the Messages dialect: an upstream's own
//! Messages JSON or events as they came, anything else translated. Errors, including
//! authentication and unknown paths under `/v1/messages`, have Anthropic's error body
//! `{"type": "error", "error": {"type", "message"}}`.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::response::Response;
use bytes::Bytes;
use futures_core::Stream;
use futures_util::StreamExt;
use http::{HeaderName, HeaderValue, StatusCode, header};
use llm_tower_core::dialect::messages::{self, EventEncoder};
use llm_tower_core::{
    BoxableLlmService, ChatChunk, ChatRequest, ChunkStream, Dialect, LlmError, LlmResponse,
    NativeRequest, Outcome, ResponseBody, ResponseMeta, Tenant,
};
use tower::ServiceExt;
use tower_http::request_id::RequestId;
use tracing::Instrument;

use crate::auth::ANONYMOUS_TENANT;
use crate::headers::{self, X_REQUEST_ID};
use crate::metrics::Labels;
use crate::router::{AppState, CancelGuard, Finish, json_response, read_body};

/// Counts the input tokens of a `count_tokens` request (see
/// [`OpenAiRouter::count_tokens`](crate::OpenAiRouter::count_tokens)).
pub type CountTokens = Arc<
    dyn Fn(ChatRequest) -> Pin<Box<dyn Future<Output = Result<u64, LlmError>> + Send>>
        + Send
        + Sync,
>;

/// Request headers forwarded to a provider that speaks Messages.
const FORWARDED: [HeaderName; 2] = [
    HeaderName::from_static("anthropic-version"),
    HeaderName::from_static("anthropic-beta"),
];

/// Whether `path` is under the Messages API (its errors are in Anthropic's format).
pub(crate) fn is_messages_path(path: &str) -> bool {
    path == "/v1/messages" || path.starts_with("/v1/messages/")
}

/// The Anthropic-format error response for `error`: its status, the error body and, when
/// known, `retry-after`. A 413 is Anthropic's `request_too_large`.
pub(crate) fn error_response(error: &LlmError) -> Response {
    let mut v = messages::error_json(error);
    if error.code() == Some("request_too_large") {
        v["error"]["type"] = "request_too_large".into();
    }
    let body = serde_json::to_vec(&v).unwrap_or_else(|_| {
        br#"{"type":"error","error":{"type":"api_error","message":"internal error"}}"#.to_vec()
    });
    let mut resp = crate::error::error_response(error);
    *resp.body_mut() = Body::from(body);
    resp
}

fn tenant_of(req: &Request) -> Tenant {
    req.extensions()
        .get::<Tenant>()
        .cloned()
        .unwrap_or_else(|| Tenant::from(ANONYMOUS_TENANT))
}

/// Reads and parses the body into the view, with the request metadata, the tenant, the
/// request id and the forwarded headers. `count` parses a `count_tokens` request.
async fn view<S>(
    st: &AppState<S>,
    req: Request,
    tenant: Tenant,
    count: bool,
) -> Result<ChatRequest, (Option<StatusCode>, LlmError)> {
    let (parts, body) = req.into_parts();
    let bytes = read_body(body, &parts.headers, st.body_limit)
        .await
        .map_err(|(status, err)| {
            let err = if status == StatusCode::PAYLOAD_TOO_LARGE {
                err.with_code("request_too_large")
            } else {
                err
            };
            (Some(status), err)
        })?;
    let parsed = if count {
        messages::count_tokens_request_from_bytes(bytes)
    } else {
        messages::request_from_bytes(bytes)
    };
    let mut view = parsed.map_err(|e| (None, e))?;
    headers::request_metadata(&parts.headers, &mut view).map_err(|e| (None, e))?;
    if let Some(native) = view.extensions.get_mut::<NativeRequest>() {
        for name in FORWARDED {
            for value in parts.headers.get_all(&name) {
                native.push_header(name.clone(), value.clone());
            }
        }
    }
    view.extensions.insert(tenant);
    if let Some(id) = parts.extensions.get::<RequestId>() {
        view.extensions.insert(id.clone());
    }
    Ok(view)
}

fn refuse(finish: Finish, status: Option<StatusCode>, err: &LlmError) -> Response {
    let mut resp = finish.reject_with(err, error_response);
    if let Some(s) = status {
        *resp.status_mut() = s;
    }
    resp
}

/// `POST /v1/messages`.
pub(crate) async fn messages<S>(State(st): State<Arc<AppState<S>>>, req: Request) -> Response
where
    S: BoxableLlmService,
{
    let start = Instant::now();
    let tenant = tenant_of(&req);
    let span = tracing::info_span!(
        "llm_request",
        request_id = tracing::field::Empty,
        tenant = %tenant,
        dialect = Dialect::Messages.as_str(),
        task = tracing::field::Empty,
        model = tracing::field::Empty,
        stream = tracing::field::Empty,
    );
    if let Some(id) = req
        .headers()
        .get(&X_REQUEST_ID)
        .and_then(|v| v.to_str().ok())
    {
        span.record("request_id", id);
    }
    messages_inner(st, req, start, tenant)
        .instrument(span)
        .await
}

async fn messages_inner<S>(
    st: Arc<AppState<S>>,
    req: Request,
    start: Instant,
    tenant: Tenant,
) -> Response
where
    S: BoxableLlmService,
{
    let mut finish = Finish::new(
        st.metrics.clone(),
        Labels {
            tenant: tenant.0.clone(),
            ..Labels::default()
        },
        start,
    );
    // The client's trace context, read before the request is consumed (only when tracing).
    #[cfg(feature = "otel")]
    let incoming = st.otel.is_some().then(|| req.headers().clone());
    #[allow(unused_mut)] // mutated only with the `otel` feature
    let mut view = match view(&st, req, tenant, false).await {
        Ok(v) => v,
        Err((status, e)) => return refuse(finish, status, &e),
    };
    if let Some(task) = view.task_type() {
        finish.labels.task = task.0.clone();
    }
    finish.labels.model = st.model_label(view.model.as_str());
    let span = tracing::Span::current();
    span.record("task", &*finish.labels.task);
    span.record("model", &*finish.labels.model);
    let wants_stream = view.is_stream();
    span.record("stream", wants_stream);
    #[cfg(feature = "otel")]
    if let (Some(otel), Some(h)) = (&st.otel, &incoming) {
        let id = h.get(&X_REQUEST_ID).and_then(|v| v.to_str().ok());
        finish.trace = Some(otel.start(h, &mut view, &finish.labels, id));
    }

    let guard = CancelGuard(Some(finish));
    let called = st.service.clone().oneshot(view).await;
    let mut finish = guard.disarm();
    let mut resp = match called {
        Ok(r) => r,
        Err(e) => return refuse(finish, None, &e),
    };
    let meta = std::mem::take(&mut resp.meta);
    #[cfg(feature = "otel")]
    if let Some(t) = &finish.trace {
        t.meta(&meta);
    }
    finish.observe_meta(&st, &meta);

    if !wants_stream {
        let json = match resp.body {
            // Anthropic's own answer: forwarded as it came.
            ResponseBody::Encoded(r) if r.dialect() == Dialect::Messages => {
                finish.record("ok", r.usage().or(meta.usage.as_ref()));
                Ok(r.into_json())
            }
            body => {
                let guard = CancelGuard(Some(finish));
                let complete = LlmResponse {
                    body,
                    meta: ResponseMeta::default(),
                }
                .into_complete()
                .await;
                let mut finish = guard.disarm();
                match complete {
                    Ok(r) => {
                        #[cfg(feature = "otel")]
                        if let Some(t) = &finish.trace {
                            t.complete(&r);
                        }
                        finish.record("ok", r.usage.as_ref().or(meta.usage.as_ref()));
                        serde_json::to_vec(&messages::response_to_json(&r))
                            .map(Bytes::from)
                            .map_err(|e| {
                                LlmError::internal(format!("cannot encode the response: {e}"))
                            })
                    }
                    Err(e) => {
                        finish.record(e.kind().as_str(), None);
                        Err(e)
                    }
                }
            }
        };
        let mut out = match json {
            Ok(json) => json_response(StatusCode::OK, json),
            Err(e) => error_response(&e),
        };
        headers::write_meta_headers(out.headers_mut(), &meta, start.elapsed());
        return out;
    }

    let mut stream = resp.into_stream();
    #[cfg(feature = "otel")]
    if let Some(t) = &finish.trace {
        t.watch(&mut stream);
    }
    stream.on_finish(move |outcome: &Outcome| {
        let status = match outcome {
            Outcome::Completed { .. } => "ok",
            Outcome::Failed { error, .. } => error.kind().as_str(),
            Outcome::Dropped { .. } => "dropped",
        };
        finish.record(status, outcome.usage());
    });
    // Headers go out with the first chunk: a failure before it is an HTTP error.
    let first = match stream.next().await {
        Some(Ok(chunk)) => Some(chunk),
        Some(Err(e)) => {
            let mut out = error_response(&e);
            headers::write_meta_headers(out.headers_mut(), &meta, start.elapsed());
            return out;
        }
        None => None,
    };
    let mut out = Response::new(Body::from_stream(MessagesSse {
        first,
        inner: stream,
        encoder: EventEncoder::new(),
        done: false,
    }));
    let h = out.headers_mut();
    *h = http::HeaderMap::with_capacity(16);
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert("x-accel-buffering", HeaderValue::from_static("no"));
    headers::write_meta_headers(h, &meta, start.elapsed());
    out
}

/// `POST /v1/messages/count_tokens`: `{"input_tokens": n}`. Not an LLM call: no limits,
/// budgets or cache apply.
pub(crate) async fn count_tokens<S>(State(st): State<Arc<AppState<S>>>, req: Request) -> Response {
    let tenant = tenant_of(&req);
    let view = match view(&st, req, tenant, true).await {
        Ok(v) => v,
        Err((status, e)) => {
            let mut r = error_response(&e);
            if let Some(s) = status {
                *r.status_mut() = s;
            }
            return r;
        }
    };
    let counted = match &st.count_tokens {
        Some(counter) => counter(view).await,
        None => Ok(messages::estimate_input_tokens(&view)),
    };
    match counted {
        Ok(n) => json_response(StatusCode::OK, format!(r#"{{"input_tokens":{n}}}"#)),
        Err(e) => error_response(&e),
    }
}

/// The Messages SSE body: chunks → events ([`EventEncoder`]); the first chunk may already
/// have been taken (the handler waits for it before sending headers). A stream that fails
/// ends with an `error` event and no `message_stop`.
struct MessagesSse {
    first: Option<ChatChunk>,
    inner: ChunkStream,
    encoder: EventEncoder,
    done: bool,
}

impl Stream for MessagesSse {
    type Item = Result<Bytes, Infallible>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        let mut out = Vec::new();
        while !this.done {
            let next = match this.first.take() {
                Some(first) => Some(Ok(first)),
                None => match this.inner.poll_next_unpin(cx) {
                    // What is ready is written together.
                    Poll::Pending if out.is_empty() => return Poll::Pending,
                    Poll::Pending => break,
                    Poll::Ready(item) => item,
                },
            };
            match next {
                Some(Ok(chunk)) => this.encoder.push(&chunk, &mut out),
                Some(Err(e)) => {
                    tracing::warn!(error = %e, "stream failed after it started");
                    this.encoder.error(&e, &mut out);
                    this.done = true;
                }
                None => {
                    this.encoder.finish(&mut out);
                    this.done = true;
                }
            }
            // Bounded batches: a fast upstream does not grow one frame without end.
            if out.len() >= 64 * 1024 {
                break;
            }
        }
        if out.is_empty() {
            Poll::Ready(None)
        } else {
            Poll::Ready(Some(Ok(Bytes::from(out))))
        }
    }
}
