//! The HTTP endpoints as an axum [`Router`] to merge into a server.

use std::convert::Infallible;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use futures_util::StreamExt;
use llm_tower_core::{ChatRequest, LlmError, MAX_REQUEST_BYTES, Tenant};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::jobs::{DEFAULT_TENANT, Jobs};
use crate::types::{JobError, JobId, JobOptions};

/// The job endpoints, to merge into the gateway's router:
///
/// - `POST /v1/jobs`: body = a chat-completions request, plus an optional `"job"` object
///   `{"priority", "max_attempts", "timeout_ms", "backoff_ms"}` (removed before the request
///   is stored); optional `Idempotency-Key` header; the `x-llm-task` header sets the task
///   type. Answers `202 {"id", "object": "job", "status"}` with `Location: /v1/jobs/{id}`.
///   A repeat with a used key answers `200` with the job's current state (its result when
///   done) and `idempotent-replayed: true`; a different body under a used key is `409`
///   (`"type": "conflict_error"`). A malformed body is `400`.
/// - `GET /v1/jobs/{id}`: the job ([`Job::to_json`](crate::Job::to_json)).
/// - `GET /v1/jobs/{id}/events`: server-sent events, one per change of status, attempts or
///   progress (`event:` is the status, `data:` the job JSON), ending with the final state;
///   a finished job gives its final state at once.
/// - `DELETE /v1/jobs/{id}`: cancels; answers the job (status `cancelled`, or its final
///   state if it had already finished).
///
/// Unknown ids, malformed ids and other tenants' jobs are `404`. The tenant is the
/// [`Tenant`] request extension set by the auth middleware; without one, requests act for
/// [`DEFAULT_TENANT`]. Errors use the OpenAI error format.
///
/// ```
/// # async fn demo() -> Result<(), llm_tower_jobs::JobError> {
/// use llm_tower_jobs::{jobs_router, Jobs, SqliteStore};
/// let jobs = Jobs::new(SqliteStore::connect("sqlite::memory:").await?);
/// let app: axum::Router = axum::Router::new().merge(jobs_router(jobs));
/// # let _ = app; Ok(()) }
/// ```
pub fn jobs_router(jobs: Jobs) -> Router {
    Router::new()
        .route("/v1/jobs", post(submit))
        .route("/v1/jobs/{id}", get(get_job).delete(cancel_job))
        .route("/v1/jobs/{id}/events", get(events))
        .layer(DefaultBodyLimit::max(MAX_REQUEST_BYTES))
        .with_state(jobs)
}

fn tenant_of(t: Option<Extension<Tenant>>) -> Tenant {
    t.map_or_else(|| Tenant::from(DEFAULT_TENANT), |Extension(t)| t)
}

fn error(status: u16, body: Value) -> Response {
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    (status, Json(body)).into_response()
}

fn llm_error(e: &LlmError) -> Response {
    error(e.status(), e.to_openai_json())
}

fn job_error(e: &JobError) -> Response {
    if let JobError::Store(m) = e {
        tracing::error!(error = %m, "job store failed");
    }
    error(e.status(), e.to_openai_json())
}

fn not_found(id: &str) -> Response {
    llm_error(&LlmError::not_found(format!("no job with id {id:?}")))
}

fn parse_id(id: &str) -> Option<JobId> {
    id.parse().ok()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct JobOptionsBody {
    priority: Option<i64>,
    max_attempts: Option<u32>,
    timeout_ms: Option<u64>,
    backoff_ms: Option<u64>,
}

fn options_from(body: Option<Value>, headers: &HeaderMap) -> Result<JobOptions, LlmError> {
    let mut opts = JobOptions::default();
    if let Some(v) = body {
        let o: JobOptionsBody = serde_json::from_value(v).map_err(|e| {
            LlmError::bad_request(format!("invalid `job` options: {e}")).with_param("job")
        })?;
        if let Some(p) = o.priority {
            opts = opts.priority(p);
        }
        if let Some(n) = o.max_attempts {
            if n == 0 {
                return Err(
                    LlmError::bad_request("`job.max_attempts` must be at least 1")
                        .with_param("job.max_attempts"),
                );
            }
            opts = opts.max_attempts(n);
        }
        if let Some(t) = o.timeout_ms {
            opts = opts.timeout(Duration::from_millis(t));
        }
        if let Some(b) = o.backoff_ms {
            opts = opts.backoff(Duration::from_millis(b));
        }
    }
    if let Some(key) = headers.get("idempotency-key") {
        let key = key
            .to_str()
            .ok()
            .filter(|k| !k.is_empty() && k.len() <= 255)
            .ok_or_else(|| {
                LlmError::bad_request(
                    "the Idempotency-Key header must be 1 to 255 visible ASCII characters",
                )
            })?;
        opts = opts.idempotency_key(key);
    }
    Ok(opts)
}

async fn submit(
    State(jobs): State<Jobs>,
    tenant: Option<Extension<Tenant>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let tenant = tenant_of(tenant);
    let mut req = match ChatRequest::from_slice(&body) {
        Ok(r) => r,
        Err(e) => return llm_error(&e),
    };
    let opts = match options_from(req.extra.remove("job"), &headers) {
        Ok(o) => o,
        Err(e) => return llm_error(&e),
    };
    if let Some(task) = headers.get("x-llm-task").and_then(|v| v.to_str().ok())
        && !task.is_empty()
    {
        req.set_task_type(task);
    }
    let submitted = match jobs.submit_chat(&tenant, req, opts).await {
        Ok(s) => s,
        Err(e) => return job_error(&e),
    };
    let id = submitted.job.id.to_string();
    let location = HeaderValue::from_str(&format!("/v1/jobs/{id}"));
    let mut resp = if submitted.created {
        (
            StatusCode::ACCEPTED,
            Json(json!({"id": id, "object": "job", "status": submitted.job.status.as_str()})),
        )
            .into_response()
    } else {
        let mut r = (StatusCode::OK, Json(submitted.job.to_json())).into_response();
        r.headers_mut()
            .insert("idempotent-replayed", HeaderValue::from_static("true"));
        r
    };
    if let Ok(l) = location {
        resp.headers_mut().insert(header::LOCATION, l);
    }
    resp
}

async fn get_job(
    State(jobs): State<Jobs>,
    tenant: Option<Extension<Tenant>>,
    Path(id): Path<String>,
) -> Response {
    let Some(job_id) = parse_id(&id) else {
        return not_found(&id);
    };
    match jobs.get(&tenant_of(tenant), job_id).await {
        Ok(Some(job)) => Json(job.to_json()).into_response(),
        Ok(None) => not_found(&id),
        Err(e) => job_error(&e),
    }
}

async fn cancel_job(
    State(jobs): State<Jobs>,
    tenant: Option<Extension<Tenant>>,
    Path(id): Path<String>,
) -> Response {
    let Some(job_id) = parse_id(&id) else {
        return not_found(&id);
    };
    match jobs.cancel(&tenant_of(tenant), job_id).await {
        Ok(Some(job)) => Json(job.to_json()).into_response(),
        Ok(None) => not_found(&id),
        Err(e) => job_error(&e),
    }
}

async fn events(
    State(jobs): State<Jobs>,
    tenant: Option<Extension<Tenant>>,
    Path(id): Path<String>,
) -> Response {
    let Some(job_id) = parse_id(&id) else {
        return not_found(&id);
    };
    let stream = match jobs.events(&tenant_of(tenant), job_id).await {
        Ok(Some(s)) => s,
        Ok(None) => return not_found(&id),
        Err(e) => return job_error(&e),
    };
    let events = stream.map(|job| {
        let data = job.to_json().to_string();
        Ok::<_, Infallible>(Event::default().event(job.status.as_str()).data(data))
    });
    Sse::new(events)
        .keep_alive(KeepAlive::default())
        .into_response()
}
