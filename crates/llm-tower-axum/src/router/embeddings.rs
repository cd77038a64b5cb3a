//! `POST /v1/embeddings`: the body becomes an embeddings envelope
//! ([`ChatRequest::embeddings`]) and goes through the same service as chat; the answer is
//! written in the `encoding_format` the client asked for.

use std::sync::Arc;
use std::time::Instant;

use axum::extract::{Request, State};
use axum::response::Response;
use http::StatusCode;
use llm_tower_core::{
    BoxableLlmService, ChatRequest, EmbeddingsRequest, LlmError, ResponseBody, Tenant,
};
use tower::ServiceExt;
use tower_http::request_id::RequestId;
use tracing::Instrument;

use super::{AppState, CancelGuard, Finish, json_response, read_body};
use crate::auth::ANONYMOUS_TENANT;
use crate::error::error_response;
use crate::headers::{self, X_REQUEST_ID};
use crate::metrics::{FailedAttempt, Labels};

pub(super) async fn embeddings<S>(State(st): State<Arc<AppState<S>>>, req: Request) -> Response
where
    S: BoxableLlmService,
{
    let start = Instant::now();
    let tenant = req
        .extensions()
        .get::<Tenant>()
        .cloned()
        .unwrap_or_else(|| Tenant::from(ANONYMOUS_TENANT));
    let span = tracing::info_span!(
        "llm_request",
        request_id = tracing::field::Empty,
        tenant = %tenant,
        task = tracing::field::Empty,
        model = tracing::field::Empty,
        kind = "embeddings",
    );
    if let Some(id) = req
        .headers()
        .get(&X_REQUEST_ID)
        .and_then(|v| v.to_str().ok())
    {
        span.record("request_id", id);
    }
    inner(st, req, start, tenant).instrument(span).await
}

async fn inner<S>(st: Arc<AppState<S>>, req: Request, start: Instant, tenant: Tenant) -> Response
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
    let (parts, body) = req.into_parts();
    let bytes = match read_body(body, &parts.headers, st.body_limit).await {
        Ok(b) => b,
        Err((status, err)) => {
            let mut resp = finish.reject(&err);
            *resp.status_mut() = status;
            return resp;
        }
    };
    let emb = match EmbeddingsRequest::from_slice(&bytes) {
        Ok(r) => r,
        Err(e) => return finish.reject(&e),
    };
    drop(bytes);
    let format = emb.format();
    let mut env = ChatRequest::embeddings(emb);
    if let Err(e) = headers::request_metadata(&parts.headers, &mut env) {
        return finish.reject(&e);
    }
    env.extensions.insert(tenant);
    if let Some(id) = parts.extensions.get::<RequestId>() {
        env.extensions.insert(id.clone());
    }
    if let Some(task) = env.task_type() {
        finish.labels.task = task.0.clone();
    }
    finish.labels.model = st.model_label(env.model.as_str());
    let span = tracing::Span::current();
    span.record("task", &*finish.labels.task);
    span.record("model", &*finish.labels.model);

    let guard = CancelGuard(Some(finish));
    let called = st.service.clone().oneshot(env).await;
    let mut finish = guard.disarm();
    let mut resp = match called {
        Ok(r) => r,
        Err(e) => return finish.reject(&e),
    };
    let meta = std::mem::take(&mut resp.meta);
    if let Some(p) = &meta.provider {
        finish.labels.provider = p.clone();
    }
    if let Some(m) = &meta.model {
        match &st.known_models {
            None => finish.labels.model = m.as_str().into(),
            Some(known) => {
                if let Some(label) = known.get(m.as_str()) {
                    finish.labels.model = label.clone();
                }
            }
        }
    }
    finish.upstream = meta.upstream_time;
    finish.cost_nano_usd = meta.cost.map(|c| c.nano_usd);
    finish.cache = meta.cache;
    finish.fallbacks = FailedAttempt::from_meta(&meta.attempts);
    let mut out = match resp.body {
        ResponseBody::Embeddings(r) => {
            finish.record("ok", meta.usage.as_ref().or(Some(&r.usage)));
            json_response(StatusCode::OK, r.to_json(format))
        }
        _ => {
            let e =
                LlmError::internal("the service answered an embeddings request with a chat answer");
            finish.record(e.kind().as_str(), None);
            error_response(&e)
        }
    };
    headers::write_meta_headers(out.headers_mut(), &meta, start.elapsed());
    out
}
