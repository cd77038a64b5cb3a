//! What the front doors of other dialects (Messages, Responses) share: the request span,
//! the call through the service with its metrics and trace, the complete answer of a
//! translated body, and the start of a stream. Each door keeps only its parsing and its
//! wire format.

use std::time::Instant;

use axum::body::Body;
use axum::extract::Request;
use axum::response::Response;
use http::{HeaderValue, header};
use llm_tower_core::{
    ChatChunk, ChatRequest, ChatResponse, ChunkStream, Dialect, LlmError, LlmResponse, NativeEvent,
    Outcome, ResponseBody, ResponseMeta, StreamEvent, Tenant,
};
use tower::{Service, ServiceExt};

use crate::auth::ANONYMOUS_TENANT;
use crate::headers::{self, X_REQUEST_ID};
use crate::metrics::Labels;
use crate::router::{AppState, CancelGuard, Finish};

/// The request's tenant (set by the auth layer; anonymous without one).
pub(crate) fn tenant_of(req: &Request) -> Tenant {
    req.extensions()
        .get::<Tenant>()
        .cloned()
        .unwrap_or_else(|| Tenant::from(ANONYMOUS_TENANT))
}

/// The `llm_request` span of a request in `dialect`.
pub(crate) fn request_span(dialect: Dialect, tenant: &Tenant, req: &Request) -> tracing::Span {
    let span = tracing::info_span!(
        "llm_request",
        request_id = tracing::field::Empty,
        tenant = %tenant,
        dialect = dialect.as_str(),
        task = tracing::field::Empty,
        model = tracing::field::Empty,
        stream = tracing::field::Empty,
    );
    // Recorded, not formatted into the span up front: a disabled span costs nothing.
    if let Some(id) = req
        .headers()
        .get(&X_REQUEST_ID)
        .and_then(|v| v.to_str().ok())
    {
        span.record("request_id", id);
    }
    span
}

/// The [`Finish`] of a request of `tenant` that started at `start`.
pub(crate) fn finish_for<S>(st: &AppState<S>, tenant: &Tenant, start: Instant) -> Finish {
    Finish::new(
        st.metrics.clone(),
        Labels {
            tenant: tenant.0.clone(),
            ..Labels::default()
        },
        start,
    )
}

/// An answer from the service, its meta taken apart (and already observed).
pub(crate) struct Dispatched {
    pub(crate) finish: Finish,
    pub(crate) response: LlmResponse,
    pub(crate) meta: ResponseMeta,
    pub(crate) stream: bool,
}

/// Labels the request from its view (task, model), starts its trace from the client's
/// headers (`incoming`, only when tracing), calls the service and observes the answer's
/// meta. A failure gives the [`Finish`] back to answer it in the door's format.
pub(crate) async fn dispatch<S>(
    st: &AppState<S>,
    #[allow(unused_mut)] mut view: ChatRequest,
    mut finish: Finish,
    incoming: Option<&http::HeaderMap>,
) -> Result<Dispatched, (Finish, LlmError)>
where
    S: Service<ChatRequest, Response = LlmResponse, Error = LlmError>
        + Clone
        + Send
        + Sync
        + 'static,
    S::Future: Send + 'static,
{
    if let Some(task) = view.task_type() {
        finish.labels.task = task.0.clone();
    }
    finish.labels.model = st.model_label(view.model.as_str());
    let span = tracing::Span::current();
    span.record("task", &*finish.labels.task);
    span.record("model", &*finish.labels.model);
    let stream = view.is_stream();
    span.record("stream", stream);
    #[cfg(feature = "otel")]
    if let (Some(otel), Some(h)) = (&st.otel, incoming) {
        let id = h.get(&X_REQUEST_ID).and_then(|v| v.to_str().ok());
        finish.trace = Some(otel.start(h, &mut view, &finish.labels, id));
    }
    #[cfg(not(feature = "otel"))]
    let _ = incoming;

    let guard = CancelGuard(Some(finish));
    let called = st.service.clone().oneshot(view).await;
    let mut finish = guard.disarm();
    let mut response = match called {
        Ok(r) => r,
        Err(e) => return Err((finish, e)),
    };
    let meta = std::mem::take(&mut response.meta);
    #[cfg(feature = "otel")]
    if let Some(t) = &finish.trace {
        t.meta(&meta);
    }
    finish.observe_meta(st, &meta);
    Ok(Dispatched {
        finish,
        response,
        meta,
        stream,
    })
}

/// The complete chat answer of `body` (an answer to translate), recording the request.
pub(crate) async fn complete(
    finish: Finish,
    body: ResponseBody,
    meta: &ResponseMeta,
) -> Result<ChatResponse, LlmError> {
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
            Ok(r)
        }
        Err(e) => {
            finish.record(e.kind().as_str(), None);
            Err(e)
        }
    }
}

/// The answer's stream, with the request's recording (metrics, trace) hooked to its end.
pub(crate) fn watched_stream(finish: Finish, response: LlmResponse) -> ChunkStream {
    let mut stream = response.into_stream();
    let mut finish = finish;
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
    stream
}

/// [`watched_stream`], then its first event (headers go out with it: a failure before it
/// is an HTTP error).
pub(crate) async fn open_stream(
    finish: Finish,
    response: LlmResponse,
) -> Result<(Option<StreamEvent>, ChunkStream), LlmError> {
    let mut stream = watched_stream(finish, response);
    match std::future::poll_fn(|cx| stream.poll_next_native(cx)).await {
        Some(Ok(event)) => Ok((Some(event), stream)),
        Some(Err(e)) => Err(e),
        None => Ok((None, stream)),
    }
}

/// A writer of a dialect's streamed events (the Messages and Responses
/// `EventEncoder`s).
pub(crate) trait DialectEncoder {
    /// Writes the events for a typed chunk (translated).
    fn push(&mut self, chunk: &ChatChunk, out: &mut Vec<u8>);
    /// Writes an upstream's own event, as it came.
    fn push_native(&mut self, event: &NativeEvent, out: &mut Vec<u8>);
    /// Writes the failure of a stream that started.
    fn error(&mut self, error: &LlmError, out: &mut Vec<u8>);
    /// Writes the end of a stream that completed.
    fn finish(&mut self, out: &mut Vec<u8>);
}

macro_rules! dialect_encoder {
    ($t:ty) => {
        impl DialectEncoder for $t {
            fn push(&mut self, chunk: &ChatChunk, out: &mut Vec<u8>) {
                <$t>::push(self, chunk, out);
            }
            fn push_native(&mut self, event: &NativeEvent, out: &mut Vec<u8>) {
                <$t>::push_native(self, event, out);
            }
            fn error(&mut self, error: &LlmError, out: &mut Vec<u8>) {
                <$t>::error(self, error, out);
            }
            fn finish(&mut self, out: &mut Vec<u8>) {
                <$t>::finish(self, out);
            }
        }
    };
}
dialect_encoder!(llm_tower_core::dialect::messages::EventEncoder);
dialect_encoder!(llm_tower_core::dialect::responses::EventEncoder);

/// Writes `item`, the next item of a stream taken with
/// [`ChunkStream::poll_next_native`], with `encoder`. Returns whether the stream ended.
pub(crate) fn write_item<E: DialectEncoder>(
    encoder: &mut E,
    item: Option<Result<StreamEvent, LlmError>>,
    out: &mut Vec<u8>,
) -> bool {
    match item {
        Some(Ok(StreamEvent::Native(event))) => {
            encoder.push_native(&event, out);
            false
        }
        Some(Ok(StreamEvent::Chunk(chunk))) => {
            encoder.push(&chunk, out);
            false
        }
        // Not given by `poll_next_native`: decoded here all the same.
        Some(Ok(event)) => match event.into_chunk() {
            Ok(chunk) => {
                encoder.push(&chunk, out);
                false
            }
            Err(e) => write_item(encoder, Some(Err(e)), out),
        },
        Some(Err(e)) => {
            tracing::warn!(error = %e, "stream failed after it started");
            encoder.error(&e, out);
            true
        }
        None => {
            encoder.finish(out);
            true
        }
    }
}

/// The `text/event-stream` response around `body`, with the meta headers.
pub(crate) fn sse_response(body: Body, meta: &ResponseMeta, start: Instant) -> Response {
    let mut out = Response::new(body);
    let h = out.headers_mut();
    *h = http::HeaderMap::with_capacity(16);
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert("x-accel-buffering", HeaderValue::from_static("no"));
    headers::write_meta_headers(h, meta, start.elapsed());
    out
}
