//! The OpenAI Responses front door: `POST /v1/responses`, `GET` and
//! `DELETE /v1/responses/{id}` and `GET /v1/responses/{id}/input_items`, over the same
//! LLM service as chat completions.
//!
//! The body is parsed into the chat view the layers act on
//! ([`responses::request_from_bytes`]), which keeps the original body for a provider that
//! speaks Responses. Answers are written in the Responses dialect: an upstream's own JSON
//! or events as they came, anything else translated. Errors are OpenAI's.
//!
//! `store` (default `true`) keeps the answer, with the whole conversation's input, in the
//! [`ResponseStore`] for its retention; `previous_response_id` continues from a stored
//! answer of the same tenant: its input and output come before the new input, before any
//! layer sees the request. An unknown, expired or other tenant's id is a 404.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::task::{Context, Poll, ready};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{Path, Request, State};
use axum::response::Response;
use bytes::Bytes;
use futures_core::Stream;
use http::StatusCode;
use llm_tower_core::dialect::responses::{
    self, Echo, EventEncoder, InputItemsQuery, RequestBody, ResponseStore, StoredResponse,
};
use llm_tower_core::{
    ChatRequest, ChunkStream, Dialect, LlmError, LlmResponse, ResponseBody, StreamEvent, Tenant,
};
use serde_json::Value;
use tower::Service;
use tower_http::request_id::RequestId;
use tracing::Instrument;

use crate::error::error_response;
use crate::headers;
use crate::native::{self, tenant_of};
use crate::router::{AppState, Finish, json_response, read_body};
use crate::sse::Gather;

/// Input items a stored conversation may reach (with `previous_response_id`).
pub(crate) const MAX_CONVERSATION_ITEMS: usize = 4096;

/// How often expired responses are purged, at most.
const PURGE_EVERY_MS: i64 = 60_000;

/// The response store of a router and its retention.
#[derive(Clone)]
pub(crate) struct ResponseStorage {
    store: Arc<dyn ResponseStore>,
    retention_ms: i64,
    last_purge: Arc<AtomicI64>,
}

impl ResponseStorage {
    pub(crate) fn new(store: Arc<dyn ResponseStore>, retention: Duration) -> Self {
        Self {
            store,
            retention_ms: i64::try_from(retention.as_millis()).unwrap_or(i64::MAX),
            last_purge: Arc::new(AtomicI64::new(0)),
        }
    }

    /// Keeps `response` (its JSON, with its conversation's `input`) under `id` for the
    /// tenant; a failure is logged, not the client's problem (its answer is already paid
    /// for).
    async fn save(&self, tenant: &str, id: String, input: Vec<Value>, response: Bytes) {
        let now = now_ms();
        let row = StoredResponse {
            id,
            tenant: tenant.to_owned(),
            input: Value::Array(input),
            response,
            created_at: now,
            expires_at: now.saturating_add(self.retention_ms),
        };
        if let Err(e) = self.store.put_response(row).await {
            tracing::warn!(error = %e, "cannot store the response");
        }
        // Expired rows go at most once a minute, on the way of a write.
        let last = self.last_purge.load(Ordering::Relaxed);
        if now.saturating_sub(last) >= PURGE_EVERY_MS
            && self
                .last_purge
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            match self.store.purge_expired_responses(now).await {
                Ok(n) if n > 0 => tracing::debug!(purged = n, "expired responses purged"),
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "cannot purge expired responses"),
            }
        }
    }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

fn not_found(id: &str, param: &str) -> LlmError {
    LlmError::not_found(format!("Response with id '{id}' not found."))
        .with_param(param)
        .with_code("not_found")
}

/// What the handler keeps of a request besides its view: the body's members (what to
/// echo and the conversation's input to store are read from them only when needed), the
/// resolved `previous_response_id`, whether to store the answer.
struct Prepared<'a> {
    top: RequestBody<'a>,
    prev: Option<String>,
    store: bool,
}

impl Prepared<'_> {
    /// The fields a translated answer echoes.
    fn echo(&self) -> Echo {
        let mut echo = self.top.echo();
        if let Some(prev) = &self.prev {
            echo.set("previous_response_id", Value::String(prev.clone()));
        }
        echo
    }

    /// What an upstream's own answer needs of the echo: the resolved previous id.
    fn native_echo(&self) -> Echo {
        let mut echo = Echo::default();
        if let Some(prev) = &self.prev {
            echo.set("previous_response_id", Value::String(prev.clone()));
        }
        echo
    }

    /// The conversation's input items, to store (taken out of the body).
    fn take_input(&mut self) -> Vec<Value> {
        match self.top.remove("input") {
            Some(Value::String(s)) => vec![serde_json::json!({"role": "user", "content": s})],
            Some(Value::Array(items)) => items,
            _ => Vec::new(),
        }
    }
}

fn bad(msg: impl Into<String>) -> LlmError {
    LlmError::bad_request(msg.into())
}

/// Reads the body of `req` (only its head is left in `parts`).
async fn read<S>(
    st: &AppState<S>,
    req: Request,
) -> Result<(http::request::Parts, Bytes), (Option<StatusCode>, LlmError)> {
    let (parts, body) = req.into_parts();
    let bytes = read_body(body, &parts.headers, st.body_limit)
        .await
        .map_err(|(s, e)| (Some(s), e))?;
    Ok((parts, bytes))
}

/// Reads the body's members (once), resolves `previous_response_id`, builds the view.
async fn prepare<'a, S>(
    st: &AppState<S>,
    parts: &http::request::Parts,
    bytes: &'a Bytes,
    tenant: &Tenant,
) -> Result<(ChatRequest, Prepared<'a>), (Option<StatusCode>, LlmError)> {
    let mut top = RequestBody::parse(bytes).map_err(|e| (None, e))?;
    let store = st.responses.is_some() && top.store();
    let prev = match top.remove("previous_response_id") {
        Some(Value::String(prev)) => Some(prev),
        Some(Value::Null) | None => None,
        Some(_) => {
            return Err((
                None,
                bad("`previous_response_id` must be a string").with_param("previous_response_id"),
            ));
        }
    };
    let body = match &prev {
        Some(prev) => {
            let full = conversation(st, tenant, prev, top.remove("input")).await?;
            top.insert("input", Value::Array(full));
            let body = top.to_vec().map_err(|e| (None, e))?;
            if body.len() > st.body_limit {
                return Err((
                    Some(StatusCode::PAYLOAD_TOO_LARGE),
                    bad(format!(
                        "the conversation exceeds the limit of {} bytes",
                        st.body_limit
                    ))
                    .with_param("previous_response_id")
                    .with_code("request_too_large"),
                ));
            }
            Bytes::from(body)
        }
        None => bytes.clone(),
    };
    let mut view = top.request(body).map_err(|e| (None, e))?;
    headers::request_metadata(&parts.headers, &mut view).map_err(|e| (None, e))?;
    view.extensions.insert(tenant.clone());
    if let Some(id) = parts.extensions.get::<RequestId>() {
        view.extensions.insert(id.clone());
    }
    Ok((view, Prepared { top, prev, store }))
}

/// The whole conversation before a request that continues from `prev`: the stored input,
/// the stored output, then the request's own `input`.
async fn conversation<S>(
    st: &AppState<S>,
    tenant: &Tenant,
    prev: &str,
    input: Option<Value>,
) -> Result<Vec<Value>, (Option<StatusCode>, LlmError)> {
    let found = match &st.responses {
        Some(s) => s
            .store
            .get_response(&tenant.0, prev, now_ms())
            .await
            .map_err(|e| (None, e))?,
        None => None,
    };
    let Some(found) = found else {
        return Err((None, not_found(prev, "previous_response_id")));
    };
    let output = found.output();
    let mut full = match found.input {
        Value::Array(items) => items,
        _ => Vec::new(),
    };
    full.extend(output);
    match input {
        Some(Value::String(s)) => full.push(serde_json::json!({"role": "user", "content": s})),
        Some(Value::Array(mut items)) => full.append(&mut items),
        // As the parser words it without a previous response.
        _ => {
            return Err((
                None,
                bad("`input` must be a string or an array of input items").with_param("input"),
            ));
        }
    }
    if full.len() > MAX_CONVERSATION_ITEMS {
        return Err((
            None,
            bad(format!(
                "the conversation has {} items, more than {MAX_CONVERSATION_ITEMS}",
                full.len()
            ))
            .with_param("previous_response_id")
            .with_code("conversation_too_long"),
        ));
    }
    Ok(full)
}

/// `POST /v1/responses`.
pub(crate) async fn create<S>(State(st): State<Arc<AppState<S>>>, req: Request) -> Response
where
    S: Service<ChatRequest, Response = LlmResponse, Error = LlmError>
        + Clone
        + Send
        + Sync
        + 'static,
    S::Future: Send + 'static,
{
    let start = Instant::now();
    let tenant = tenant_of(&req);
    let span = native::request_span(Dialect::Responses, &tenant, &req);
    create_inner(st, req, start, tenant).instrument(span).await
}

async fn create_inner<S>(
    st: Arc<AppState<S>>,
    req: Request,
    start: Instant,
    tenant: Tenant,
) -> Response
where
    S: Service<ChatRequest, Response = LlmResponse, Error = LlmError>
        + Clone
        + Send
        + Sync
        + 'static,
    S::Future: Send + 'static,
{
    let finish = native::finish_for(&st, &tenant, start);
    let incoming = st.traces().then(|| req.headers().clone());
    let reject = |finish: Finish, (status, e): (Option<StatusCode>, LlmError)| {
        let mut resp = finish.reject_with(&e, error_response);
        if let Some(s) = status {
            *resp.status_mut() = s;
        }
        resp
    };
    let (parts, bytes) = match read(&st, req).await {
        Ok(r) => r,
        Err(e) => return reject(finish, e),
    };
    let (view, mut prepared) = match prepare(&st, &parts, &bytes, &tenant).await {
        Ok(p) => p,
        Err(e) => return reject(finish, e),
    };
    drop(parts);
    let storage = if prepared.store {
        st.responses.clone()
    } else {
        None
    };
    let native::Dispatched {
        finish,
        response: resp,
        meta,
        stream: wants_stream,
    } = match native::dispatch(&st, view, finish, incoming.as_ref()).await {
        Ok(d) => d,
        Err((finish, e)) => return finish.reject_with(&e, error_response),
    };

    if !wants_stream {
        let json = match resp.body {
            // The upstream's own Responses answer: forwarded as it came.
            ResponseBody::Encoded(r) if r.dialect() == Dialect::Responses => {
                let mut finish = finish;
                finish.record("ok", r.usage().or(meta.usage.as_ref()));
                match prepared.prev.as_deref() {
                    // Resolved here, so the upstream says `null`: the client reads its id.
                    Some(prev) => with_previous_id(&r.into_json(), prev),
                    None => Ok((r.into_json(), None)),
                }
            }
            body => native::complete(finish, body, &meta).await.and_then(|r| {
                let id = responses::new_response_id();
                let v = responses::response_to_json(&r, &id, &prepared.echo());
                serde_json::to_vec(&v)
                    .map(|b| (Bytes::from(b), Some(id)))
                    .map_err(|e| LlmError::internal(format!("cannot encode the response: {e}")))
            }),
        };
        let mut out = match json {
            Ok((json, id)) => {
                if let Some(storage) = &storage
                    && let Some(id) = id.or_else(|| responses::response_id(&json))
                {
                    // A copy of its own size: the body may be a slice of a larger read.
                    let copy = Bytes::copy_from_slice(&json);
                    storage
                        .save(&tenant.0, id, prepared.take_input(), copy)
                        .await;
                }
                json_response(StatusCode::OK, json)
            }
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
    // An upstream's own events keep its id and echo: made only for a translated stream.
    let encoder = match &first {
        Some(StreamEvent::Native(_)) => EventEncoder::new(String::new(), prepared.native_echo()),
        Some(StreamEvent::Chunk(c)) if llm_tower_core::dialect::native_event(c).is_some() => {
            EventEncoder::new(String::new(), prepared.native_echo())
        }
        _ => EventEncoder::new(responses::new_response_id(), prepared.echo()),
    };
    let save = storage.map(|s| (s, tenant.0.to_string(), prepared.take_input()));
    let encoder = encoder.keep_final(save.is_some());
    let sse = Sse {
        first,
        inner: stream,
        encoder,
        done: false,
        gather: Gather::default(),
        save,
        saving: None,
    };
    native::sse_response(Body::from_stream(sse), &meta, start)
}

/// An upstream's Responses answer with `previous_response_id` set to `prev`, and its id.
fn with_previous_id(json: &[u8], prev: &str) -> Result<(Bytes, Option<String>), LlmError> {
    let mut v: Value = serde_json::from_slice(json)
        .map_err(|e| LlmError::internal(format!("cannot read the response: {e}")))?;
    if let Some(o) = v.as_object_mut() {
        o.insert("previous_response_id".into(), prev.into());
    }
    let b = serde_json::to_vec(&v)
        .map_err(|e| LlmError::internal(format!("cannot encode the response: {e}")))?;
    let id = v.get("id").and_then(Value::as_str).map(str::to_owned);
    Ok((Bytes::from(b), id))
}

/// The Responses SSE body: chunks → events ([`EventEncoder`]: an upstream's own events
/// as they came, anything else translated); the first chunk may already have been taken.
/// Events that arrive together leave in one write ([`Gather`]). The answer is stored
/// before the write with its last event, so a client that continues from it at once
/// finds it.
struct Sse {
    first: Option<StreamEvent>,
    inner: ChunkStream,
    encoder: EventEncoder,
    done: bool,
    gather: Gather,
    save: Option<(ResponseStorage, String, Vec<Value>)>,
    /// The store's write of the answer, and the last write, sent once it is done.
    saving: Option<(SaveFuture, Option<Bytes>)>,
}

type SaveFuture = Pin<Box<dyn Future<Output = ()> + Send>>;

impl Stream for Sse {
    type Item = Result<Bytes, Infallible>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        if let Some((saving, _)) = &mut this.saving {
            if saving.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            let write = this.saving.take().and_then(|(_, write)| write);
            return Poll::Ready(write.map(Ok));
        }
        let (first, inner, encoder) = (&mut this.first, &mut this.inner, &mut this.encoder);
        let next = |cx: &mut Context<'_>| match first.take() {
            Some(first) => Poll::Ready(Some(Ok(first))),
            None => inner.poll_next_native(cx),
        };
        // Read to the inner stream's end, past the terminal event (the encoder writes
        // nothing after it): a stream left before its end counts as dropped.
        let take = |item, out: &mut Vec<u8>| native::write_item(encoder, item, out);
        let write = ready!(this.gather.poll_write(cx, &mut this.done, next, take));
        if this.done
            && let Some((storage, tenant, input)) = this.save.take()
            && let Some(id) = this.encoder.final_store_id().map(str::to_owned)
            && let Some(json) = this.encoder.take_final_json()
        {
            let save = Box::pin(async move {
                storage.save(&tenant, id, input, json).await;
            });
            this.saving = Some((save, write));
            return self.poll_next(cx);
        }
        Poll::Ready(write.map(Ok))
    }
}

/// `GET /v1/responses/{id}`: the tenant's stored response.
pub(crate) async fn retrieve<S>(
    State(st): State<Arc<AppState<S>>>,
    Path(id): Path<String>,
    req: Request,
) -> Response {
    let tenant = tenant_of(&req);
    let Some(storage) = &st.responses else {
        return error_response(&not_found(&id, "response_id"));
    };
    match storage.store.get_response(&tenant.0, &id, now_ms()).await {
        Ok(Some(r)) => json_response(StatusCode::OK, r.response),
        Ok(None) => error_response(&not_found(&id, "response_id")),
        Err(e) => error_response(&e),
    }
}

/// `GET /v1/responses/{id}/input_items`: a page of the conversation's input items of the
/// tenant's stored response (see [`responses::input_items_page`]).
pub(crate) async fn input_items<S>(
    State(st): State<Arc<AppState<S>>>,
    Path(id): Path<String>,
    req: Request,
) -> Response {
    let tenant = tenant_of(&req);
    let query = match InputItemsQuery::parse(req.uri().query()) {
        Ok(q) => q,
        Err(e) => return error_response(&e),
    };
    let Some(storage) = &st.responses else {
        return error_response(&not_found(&id, "response_id"));
    };
    let found = match storage.store.get_response(&tenant.0, &id, now_ms()).await {
        Ok(Some(r)) => r,
        Ok(None) => return error_response(&not_found(&id, "response_id")),
        Err(e) => return error_response(&e),
    };
    match responses::input_items_page(&found.id, &found.input, &query).and_then(|page| {
        serde_json::to_vec(&page).map_err(|e| LlmError::internal(format!("cannot encode: {e}")))
    }) {
        Ok(b) => json_response(StatusCode::OK, b),
        Err(e) => error_response(&e),
    }
}

/// `DELETE /v1/responses/{id}`: `{"id", "object": "response.deleted", "deleted": true}`.
pub(crate) async fn delete<S>(
    State(st): State<Arc<AppState<S>>>,
    Path(id): Path<String>,
    req: Request,
) -> Response {
    let tenant = tenant_of(&req);
    let Some(storage) = &st.responses else {
        return error_response(&not_found(&id, "response_id"));
    };
    match storage.store.delete_response(&tenant.0, &id).await {
        Ok(true) => json_response(
            StatusCode::OK,
            serde_json::json!({"id": id, "object": "response.deleted", "deleted": true})
                .to_string(),
        ),
        Ok(false) => error_response(&not_found(&id, "response_id")),
        Err(e) => error_response(&e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sse::tests::one_per_turn;
    use futures_util::StreamExt;
    use llm_tower_core::ChatChunk;
    use llm_tower_core::dialect::responses::MemoryResponseStore;

    fn sse(chunks: usize, save: Option<(ResponseStorage, String, Vec<Value>)>) -> Sse {
        let chunks = (0..chunks)
            .map(|_| ChatChunk::text("c", "m", "hi").into())
            .collect();
        Sse {
            first: None,
            inner: ChunkStream::from_events(one_per_turn(chunks)),
            encoder: EventEncoder::new("resp_t".into(), Echo::default()),
            done: false,
            gather: Gather::default(),
            save,
            saving: None,
        }
    }

    #[tokio::test]
    async fn a_burst_handed_over_one_chunk_per_turn_leaves_in_one_write_after_the_first() {
        let writes: Vec<String> = sse(10, None)
            .map(|w| String::from_utf8(w.unwrap().to_vec()).unwrap())
            .collect()
            .await;
        // The first chunk leaves at once (time to first byte); the rest together.
        assert_eq!(writes.len(), 2, "{writes:?}");
        assert!(writes[0].starts_with("event: response.created\n"));
        assert_eq!(
            writes[1]
                .matches("event: response.output_text.delta")
                .count(),
            9
        );
        assert!(writes[1].contains("event: response.completed\n"));
    }

    #[tokio::test]
    async fn a_streamed_answer_is_stored_before_its_last_write() {
        let store = Arc::new(MemoryResponseStore::new(10));
        let storage = ResponseStorage::new(store.clone(), Duration::from_secs(60));
        let input = vec![serde_json::json!({"role": "user", "content": "x"})];
        let mut body = sse(3, Some((storage, "acme".into(), input.clone())));
        let mut last = String::new();
        while let Some(w) = body.next().await {
            last = String::from_utf8(w.unwrap().to_vec()).unwrap();
            if last.contains("event: response.completed") {
                break;
            }
        }
        assert!(last.contains("event: response.completed"), "{last}");
        let row = store
            .get_response("acme", "resp_t", now_ms())
            .await
            .unwrap()
            .expect("stored when the last write leaves");
        assert_eq!(row.input, Value::Array(input));
        let response: Value = serde_json::from_slice(&row.response).unwrap();
        assert_eq!(response["output"][0]["content"][0]["text"], "hihihi");
        assert!(body.next().await.is_none());
    }
}
