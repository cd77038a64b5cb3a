//! The HTTP endpoints as an axum [`Router`] to merge into a server.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use futures_util::StreamExt;
use llm_tower_core::{ChatRequest, LlmError, Tenant};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::jobs::{DEFAULT_TENANT, Jobs};
use crate::types::{JobError, JobId, JobOptions};

/// What clients may ask of the job endpoints (see [`jobs_router_with`]).
///
/// ```
/// use std::time::Duration;
/// use llm_tower_jobs::JobsApiLimits;
///
/// let limits = JobsApiLimits::default()
///     .body_limit(1 << 20)
///     .max_priority(0)
///     .tenant_max_priority("batch-admin", 100)
///     .max_attempts(5)
///     .max_backoff(Duration::from_secs(60))
///     .max_queued_per_tenant(500);
/// assert_eq!(limits.priority_cap("batch-admin"), 100);
/// assert_eq!(limits.priority_cap("anyone-else"), 0);
/// ```
#[derive(Debug, Clone)]
pub struct JobsApiLimits {
    body_limit: usize,
    max_priority: i64,
    tenant_priority: HashMap<String, i64>,
    max_attempts: u32,
    max_backoff: Duration,
    max_queued_per_tenant: u64,
    ws: crate::ws::JobsWsLimits,
}

/// Default of [`JobsApiLimits::body_limit`]: 4 MiB (the chat endpoint's default too).
pub const DEFAULT_JOBS_BODY_LIMIT: usize = 4 * 1024 * 1024;

impl Default for JobsApiLimits {
    /// Body 4 MiB, priority at most 0, at most 10 attempts, back-off at most 5 minutes,
    /// 1 000 queued jobs per tenant.
    fn default() -> Self {
        Self {
            body_limit: DEFAULT_JOBS_BODY_LIMIT,
            max_priority: 0,
            tenant_priority: HashMap::new(),
            max_attempts: 10,
            max_backoff: Duration::from_secs(300),
            max_queued_per_tenant: 1000,
            ws: crate::ws::JobsWsLimits::default(),
        }
    }
}

impl JobsApiLimits {
    /// Largest accepted `POST /v1/jobs` body in bytes; bigger gets 413.
    #[must_use]
    pub fn body_limit(mut self, bytes: usize) -> Self {
        self.body_limit = bytes;
        self
    }
    /// Highest `job.priority` a client may ask for (tenants without their own cap).
    #[must_use]
    pub fn max_priority(mut self, p: i64) -> Self {
        self.max_priority = p;
        self
    }
    /// Highest `job.priority` the tenant may ask for (replaces [`max_priority`](Self::max_priority) for it).
    #[must_use]
    pub fn tenant_max_priority(mut self, tenant: impl Into<String>, p: i64) -> Self {
        self.tenant_priority.insert(tenant.into(), p);
        self
    }
    /// Most `job.max_attempts` a client may ask for (at least 1).
    #[must_use]
    pub fn max_attempts(mut self, n: u32) -> Self {
        self.max_attempts = n.max(1);
        self
    }
    /// Longest `job.backoff_ms` a client may ask for.
    #[must_use]
    pub fn max_backoff(mut self, d: Duration) -> Self {
        self.max_backoff = d;
        self
    }
    /// Most queued jobs per tenant; a submit beyond it is 429 (at least 1).
    #[must_use]
    pub fn max_queued_per_tenant(mut self, n: u64) -> Self {
        self.max_queued_per_tenant = n.max(1);
        self
    }
    /// The limits of `GET /v1/jobs/ws` (default [`JobsWsLimits::default`](crate::JobsWsLimits)).
    #[must_use]
    pub fn websocket(mut self, ws: crate::ws::JobsWsLimits) -> Self {
        self.ws = ws;
        self
    }
    /// The limits of `GET /v1/jobs/ws`, whose [`stats`](crate::JobsWsLimits::stats) count
    /// what its sockets refused and closed.
    pub fn websocket_limits(&self) -> &crate::ws::JobsWsLimits {
        &self.ws
    }
    /// The priority cap of `tenant`.
    pub fn priority_cap(&self, tenant: &str) -> i64 {
        self.tenant_priority
            .get(tenant)
            .copied()
            .unwrap_or(self.max_priority)
    }
}

#[derive(Clone)]
struct ApiState {
    jobs: Jobs,
    limits: Arc<JobsApiLimits>,
}

/// The job endpoints with the [`JobsApiLimits::default`] limits: see [`jobs_router_with`].
///
/// ```
/// # async fn demo() -> Result<(), llm_tower_jobs::JobError> {
/// use llm_tower_jobs::{jobs_router, Jobs, SqliteStore};
/// let jobs = Jobs::new(SqliteStore::connect("sqlite::memory:").await?);
/// let app: axum::Router = axum::Router::new().merge(jobs_router(jobs));
/// # let _ = app; Ok(()) }
/// ```
pub fn jobs_router(jobs: Jobs) -> Router {
    jobs_router_with(jobs, JobsApiLimits::default())
}

/// The job endpoints, to merge into the gateway's router:
///
/// - `POST /v1/jobs`: body = a chat-completions request, plus an optional `"job"` object
///   `{"priority", "max_attempts", "timeout_ms", "backoff_ms"}` (removed before the request
///   is stored); optional `Idempotency-Key` header; the `x-llm-task` header sets the task
///   type. A body over [`JobsApiLimits::body_limit`] is `413`; a priority, attempt count or
///   back-off over its limit is `400` naming the limit; a tenant with
///   [`JobsApiLimits::max_queued_per_tenant`] jobs queued gets `429`
///   (`"code": "too_many_queued_jobs"`; the count is checked before the insert, so
///   concurrent submits may pass it by a few); an `x-llm-task` that is not 1 to 256
///   visible ASCII characters is `400`. Answers `202 {"id", "object": "job", "status"}` with `Location: /v1/jobs/{id}`.
///   A repeat with a used key answers `200` with the job's current state (its result when
///   done) and `idempotent-replayed: true`; a different body under a used key is `409`
///   (`"type": "conflict_error"`). A malformed body is `400`.
/// - `GET /v1/jobs/{id}`: the job ([`Job::to_json`](crate::Job::to_json)).
/// - `GET /v1/jobs/{id}/events`: server-sent events, one per change of status, attempts or
///   progress (`event:` is the status, `data:` the job JSON), ending with the final state;
///   a finished job gives its final state at once.
/// - `GET /v1/jobs/ws`: a WebSocket on which a client subscribes to one or many of its
///   jobs and is pushed each change and the final state with the result (see
///   [`crate::ws`] for the messages and [`JobsWsLimits`](crate::JobsWsLimits) for the bounds).
/// - `DELETE /v1/jobs/{id}`: cancels; answers the job (status `cancelled`, or its final
///   state if it had already finished).
///
/// Unknown ids, malformed ids and other tenants' jobs are `404`. The tenant is the
/// [`Tenant`] request extension set by the auth middleware; without one, requests act for
/// [`DEFAULT_TENANT`], so without authentication every caller shares one tenant (its
/// jobs, its idempotency keys, its queue cap). Errors use the OpenAI error format.
///
/// ```
/// # async fn demo() -> Result<(), llm_tower_jobs::JobError> {
/// use llm_tower_jobs::{jobs_router_with, Jobs, JobsApiLimits, SqliteStore};
/// let jobs = Jobs::new(SqliteStore::connect("sqlite::memory:").await?);
/// let limits = JobsApiLimits::default().body_limit(1 << 20).max_queued_per_tenant(100);
/// let app: axum::Router = axum::Router::new().merge(jobs_router_with(jobs, limits));
/// # let _ = app; Ok(()) }
/// ```
pub fn jobs_router_with(jobs: Jobs, limits: JobsApiLimits) -> Router {
    let body_limit = limits.body_limit;
    let ws = Router::new()
        .route("/v1/jobs/ws", get(crate::ws::upgrade))
        .with_state(crate::ws::WsState {
            jobs: jobs.clone(),
            limits: Arc::new(limits.ws.clone()),
        });
    Router::new()
        .route("/v1/jobs", post(submit))
        .route("/v1/jobs/{id}", get(get_job).delete(cancel_job))
        .route("/v1/jobs/{id}/events", get(events))
        .layer(DefaultBodyLimit::max(body_limit))
        .with_state(ApiState {
            jobs,
            limits: Arc::new(limits),
        })
        .merge(ws)
}

pub(crate) fn tenant_of(t: Option<Extension<Tenant>>) -> Tenant {
    t.map_or_else(|| Tenant::from(DEFAULT_TENANT), |Extension(t)| t)
}

fn error(status: u16, body: Value) -> Response {
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    (status, Json(body)).into_response()
}

pub(crate) fn llm_error(e: &LlmError) -> Response {
    let mut resp = error(e.status(), e.to_openai_json());
    if let Some(after) = e.retry_after() {
        // Whole seconds, rounded up: the client never comes back too early.
        let secs = after.as_secs() + u64::from(after.subsec_nanos() > 0);
        resp.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(secs));
    }
    resp
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

fn options_from(
    body: Option<Value>,
    headers: &HeaderMap,
    limits: &JobsApiLimits,
    tenant: &Tenant,
) -> Result<JobOptions, LlmError> {
    let mut opts = JobOptions::default();
    // The defaults obey the limits too (a deployment may allow fewer attempts).
    opts.max_attempts = opts.max_attempts.min(limits.max_attempts);
    opts.backoff = opts.backoff.min(limits.max_backoff);
    if let Some(v) = body {
        let o: JobOptionsBody = serde_json::from_value(v).map_err(|e| {
            LlmError::bad_request(format!("invalid `job` options: {e}")).with_param("job")
        })?;
        if let Some(p) = o.priority {
            let cap = limits.priority_cap(tenant.as_str());
            if p > cap {
                return Err(LlmError::bad_request(format!(
                    "`job.priority` must be at most {cap} for this key"
                ))
                .with_param("job.priority"));
            }
            opts = opts.priority(p);
        }
        if let Some(n) = o.max_attempts {
            if n == 0 || n > limits.max_attempts {
                return Err(LlmError::bad_request(format!(
                    "`job.max_attempts` must be within 1..={}",
                    limits.max_attempts
                ))
                .with_param("job.max_attempts"));
            }
            opts = opts.max_attempts(n);
        }
        if let Some(t) = o.timeout_ms {
            opts = opts.timeout(Duration::from_millis(t));
        }
        if let Some(b) = o.backoff_ms {
            let b = Duration::from_millis(b);
            if b > limits.max_backoff {
                return Err(LlmError::bad_request(format!(
                    "`job.backoff_ms` must be at most {}",
                    limits.max_backoff.as_millis()
                ))
                .with_param("job.backoff_ms"));
            }
            opts = opts.backoff(b);
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
    State(st): State<ApiState>,
    tenant: Option<Extension<Tenant>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let jobs = &st.jobs;
    let tenant = tenant_of(tenant);
    let mut req = match ChatRequest::from_slice(&body) {
        Ok(r) => r,
        Err(e) => return llm_error(&e),
    };
    let opts = match options_from(req.extra.remove("job"), &headers, &st.limits, &tenant) {
        Ok(o) => o,
        Err(e) => return llm_error(&e),
    };
    let cap = st.limits.max_queued_per_tenant;
    match jobs.store().count_queued(tenant.as_str(), cap).await {
        Ok(n) if n >= cap => {
            return llm_error(
                &LlmError::rate_limited(format!(
                    "too many queued jobs: at most {cap} per tenant; retry when some have run"
                ))
                .with_code("too_many_queued_jobs")
                .with_retry_after(Duration::from_secs(1)),
            );
        }
        Ok(_) => {}
        Err(e) => return job_error(&e),
    }
    if let Some(task) = headers.get("x-llm-task") {
        // As the chat endpoint: visible ASCII, 1 to 256 characters.
        match task.to_str().map(str::trim) {
            Ok(t) if !t.is_empty() && t.len() <= 256 => req.set_task_type(t),
            _ => {
                return llm_error(
                    &LlmError::bad_request(
                        "header `x-llm-task` must be 1 to 256 visible ASCII characters",
                    )
                    .with_param("x-llm-task"),
                );
            }
        }
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
    State(ApiState { jobs, .. }): State<ApiState>,
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
    State(ApiState { jobs, .. }): State<ApiState>,
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
    State(ApiState { jobs, .. }): State<ApiState>,
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
