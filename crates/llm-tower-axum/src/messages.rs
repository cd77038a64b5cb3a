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
use http::{HeaderName, StatusCode};
use llm_tower_core::dialect::messages::{self, EventEncoder};
use llm_tower_core::{
    BoxableLlmService, ChatRequest, ChunkStream, Dialect, LlmError, NativeRequest, ResponseBody,
    StreamEvent, Tenant,
};
use tower_http::request_id::RequestId;
use tracing::Instrument;

use crate::headers;
use crate::native::{self, tenant_of};
use crate::router::{AppState, Finish, json_response, read_body};
use crate::sse::Gather;

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
    let span = native::request_span(Dialect::Messages, &tenant, &req);
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
    let finish = native::finish_for(&st, &tenant, start);
    // The client's trace context, read before the request is consumed (only when tracing).
    let incoming = st.traces().then(|| req.headers().clone());
    let view = match view(&st, req, tenant, false).await {
        Ok(v) => v,
        Err((status, e)) => return refuse(finish, status, &e),
    };
    let native::Dispatched {
        finish,
        response: resp,
        meta,
        stream: wants_stream,
    } = match native::dispatch(&st, view, finish, incoming.as_ref()).await {
        Ok(d) => d,
        Err((finish, e)) => return refuse(finish, None, &e),
    };

    if !wants_stream {
        let json = match resp.body {
            // Anthropic's own answer: forwarded as it came.
            ResponseBody::Encoded(r) if r.dialect() == Dialect::Messages => {
                let mut finish = finish;
                finish.record("ok", r.usage().or(meta.usage.as_ref()));
                Ok(r.into_json())
            }
            body => native::complete(finish, body, &meta).await.and_then(|r| {
                serde_json::to_vec(&messages::response_to_json(&r))
                    .map(Bytes::from)
                    .map_err(|e| LlmError::internal(format!("cannot encode the response: {e}")))
            }),
        };
        let mut out = match json {
            Ok(json) => json_response(StatusCode::OK, json),
            Err(e) => error_response(&e),
        };
        headers::write_meta_headers(out.headers_mut(), &meta, start.elapsed());
        return out;
    }

    let (first, stream) = match native::open_stream(finish, resp).await {
        Ok(s) => s,
        Err(e) => {
            let mut out = error_response(&e);
            headers::write_meta_headers(out.headers_mut(), &meta, start.elapsed());
            return out;
        }
    };
    native::sse_response(
        Body::from_stream(MessagesSse {
            first,
            inner: stream,
            encoder: EventEncoder::new(),
            done: false,
            gather: Gather::default(),
        }),
        &meta,
        start,
    )
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

/// The Messages SSE body: an upstream's own events as they came, chunks translated
/// ([`EventEncoder`]); the first event may already have been taken (the handler waits for
/// it before sending headers). A stream that fails ends with an `error` event and no
/// `message_stop`.
struct MessagesSse {
    first: Option<StreamEvent>,
    inner: ChunkStream,
    encoder: EventEncoder,
    done: bool,
    gather: Gather,
}

impl Stream for MessagesSse {
    type Item = Result<Bytes, Infallible>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        let (first, inner, encoder) = (&mut this.first, &mut this.inner, &mut this.encoder);
        let next = |cx: &mut Context<'_>| match first.take() {
            Some(first) => Poll::Ready(Some(Ok(first))),
            None => inner.poll_next_native(cx),
        };
        let take = |item, out: &mut Vec<u8>| native::write_item(encoder, item, out);
        this.gather
            .poll_write(cx, &mut this.done, next, take)
            .map(|w| w.map(Ok))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sse::tests::one_per_turn;
    use futures_util::StreamExt;
    use llm_tower_core::ChatChunk;

    #[tokio::test]
    async fn a_burst_handed_over_one_chunk_per_turn_leaves_in_one_write_after_the_first() {
        let chunks = (0..10)
            .map(|_| ChatChunk::text("c", "m", "hi").into())
            .collect();
        let sse = MessagesSse {
            first: None,
            inner: ChunkStream::from_events(one_per_turn(chunks)),
            encoder: EventEncoder::new(),
            done: false,
            gather: Gather::default(),
        };
        let writes: Vec<String> = sse
            .map(|w| String::from_utf8(w.unwrap().to_vec()).unwrap())
            .collect()
            .await;
        // The first chunk leaves at once (time to first byte); the rest together.
        assert_eq!(writes.len(), 2, "{writes:?}");
        assert!(
            writes[0].starts_with("event: message_start"),
            "{}",
            writes[0]
        );
        assert_eq!(writes[1].matches("event: content_block_delta").count(), 9);
        assert!(
            writes[1].ends_with("event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n"),
            "{}",
            writes[1]
        );
    }
}
