//! The data types of the job system: ids, states, options, records and errors.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use llm_tower_core::LlmError;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

/// A job's id: a UUID v7, so ids sort by creation time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct JobId(pub uuid::Uuid);

impl JobId {
    /// A fresh, time-ordered id.
    pub fn new() -> Self {
        Self(uuid::Uuid::now_v7())
    }
}

impl Default for JobId {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Display for JobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl FromStr for JobId {
    type Err = uuid::Error;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        uuid::Uuid::parse_str(s).map(Self)
    }
}

/// Where a job is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobStatus {
    /// Waiting for a worker (new, or waiting for its next retry).
    Queued,
    /// A worker holds its lease and runs it.
    Running,
    /// Finished with a result.
    Succeeded,
    /// Finished with an error (not retryable, or attempts exhausted).
    Failed,
    /// Cancelled by the client.
    Cancelled,
}

impl JobStatus {
    /// The name stored in the database and shown in the API.
    pub fn as_str(self) -> &'static str {
        match self {
            JobStatus::Queued => "queued",
            JobStatus::Running => "running",
            JobStatus::Succeeded => "succeeded",
            JobStatus::Failed => "failed",
            JobStatus::Cancelled => "cancelled",
        }
    }

    /// Parses a stored status name.
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "queued" => JobStatus::Queued,
            "running" => JobStatus::Running,
            "succeeded" => JobStatus::Succeeded,
            "failed" => JobStatus::Failed,
            "cancelled" => JobStatus::Cancelled,
            _ => return None,
        })
    }

    /// Whether the job has finished (succeeded, failed or cancelled).
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            JobStatus::Succeeded | JobStatus::Failed | JobStatus::Cancelled
        )
    }
}

impl fmt::Display for JobStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Per-job options.
///
/// ```
/// use llm_tower_jobs::JobOptions;
/// use std::time::Duration;
///
/// let opts = JobOptions::default()
///     .priority(10)
///     .max_attempts(5)
///     .timeout(Duration::from_secs(120))
///     .idempotency_key("order-42");
/// assert_eq!(opts.max_attempts, 5);
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct JobOptions {
    /// Higher runs first (default 0).
    pub priority: i64,
    /// Attempts in total, including the first (default 3). Only retryable errors
    /// ([`LlmError::is_retryable`]) use further attempts.
    pub max_attempts: u32,
    /// Time limit of one attempt (default: none).
    pub timeout: Option<Duration>,
    /// Base of the exponential back-off between attempts (default 1 s): attempt `n` waits
    /// `backoff * 2^(n-1)`, capped by the worker, and never less than the error's retry-after.
    pub backoff: Duration,
    /// Submitting again with the same key (same tenant) returns the same job.
    pub idempotency_key: Option<String>,
}

impl Default for JobOptions {
    fn default() -> Self {
        Self {
            priority: 0,
            max_attempts: 3,
            timeout: None,
            backoff: Duration::from_secs(1),
            idempotency_key: None,
        }
    }
}

impl JobOptions {
    /// Sets the priority (higher runs first).
    #[must_use]
    pub fn priority(mut self, priority: i64) -> Self {
        self.priority = priority;
        self
    }
    /// Sets the number of attempts (at least 1).
    #[must_use]
    pub fn max_attempts(mut self, n: u32) -> Self {
        self.max_attempts = n.max(1);
        self
    }
    /// Sets the time limit of one attempt.
    #[must_use]
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }
    /// Sets the back-off base.
    #[must_use]
    pub fn backoff(mut self, backoff: Duration) -> Self {
        self.backoff = backoff;
        self
    }
    /// Sets the idempotency key.
    #[must_use]
    pub fn idempotency_key(mut self, key: impl Into<String>) -> Self {
        self.idempotency_key = Some(key.into());
        self
    }
}

/// Progress of a multi-step job: the step running and "n of m" when the job declared `m`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Progress {
    /// The name of the step running (or last run).
    pub step: String,
    /// 1-based index of that step.
    pub n: u32,
    /// Total number of steps, when the job declared it
    /// ([`JobContext::set_total_steps`](crate::JobContext::set_total_steps)).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub m: Option<u32>,
}

/// A stored, classified job error: what [`LlmError`] said, in a form that survives the
/// database.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobErrorInfo {
    /// [`ErrorKind::as_str`](llm_tower_core::ErrorKind::as_str), e.g. `"rate_limited"`.
    pub kind: String,
    /// The OpenAI error type, e.g. `"rate_limit_error"`.
    #[serde(rename = "type")]
    pub error_type: String,
    /// The message.
    pub message: String,
    /// The HTTP status the error maps to.
    pub status: u16,
    /// The OpenAI error code, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<String>,
}

impl From<&LlmError> for JobErrorInfo {
    fn from(e: &LlmError) -> Self {
        Self {
            kind: e.kind().as_str().to_owned(),
            error_type: e.kind().openai_type().to_owned(),
            message: e.message().to_owned(),
            status: e.status(),
            code: e.code().map(str::to_owned),
        }
    }
}

/// A job as stored: state, attempts, timestamps (Unix milliseconds, wall clock), result or
/// error, progress.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct Job {
    /// The id.
    pub id: JobId,
    /// The tenant that created it; only it can see the job.
    pub tenant: String,
    /// The handler name: [`CHAT_KIND`](crate::CHAT_KIND) for a chat request, or a
    /// registered multi-step handler.
    pub kind: String,
    /// The input (for a chat job: `{"request": <chat request>, "task_type": ..}`).
    pub input: Value,
    /// The idempotency key it was submitted with.
    pub idempotency_key: Option<String>,
    /// Current state.
    pub status: JobStatus,
    /// Priority (higher first).
    pub priority: i64,
    /// Attempts started so far.
    pub attempts: u32,
    /// Attempts allowed.
    pub max_attempts: u32,
    /// Per-attempt time limit in milliseconds.
    pub timeout_ms: Option<u64>,
    /// Back-off base in milliseconds.
    pub backoff_ms: u64,
    /// Earliest time the job may (re)start.
    pub run_at: i64,
    /// The lease epoch (fencing token) of the latest claim.
    pub lease_epoch: i64,
    /// The result (a chat job: the `ChatResponse` JSON).
    pub result: Option<Value>,
    /// The last error (kept while a retry waits; final when failed).
    pub error: Option<JobErrorInfo>,
    /// The step running, for multi-step jobs.
    pub progress: Option<Progress>,
    /// When submitted.
    pub created_at: i64,
    /// When last changed.
    pub updated_at: i64,
    /// When first started.
    pub started_at: Option<i64>,
    /// When finished.
    pub finished_at: Option<i64>,
    /// When the finished job's record (and result) is deleted.
    pub expires_at: Option<i64>,
}

impl Job {
    /// The public JSON view used by the HTTP endpoints (no input, no lease internals).
    ///
    /// `{"id", "object": "job", "kind", "status", "priority", "attempts", "max_attempts",
    /// "created_at_ms", "updated_at_ms", "started_at_ms", "finished_at_ms", "expires_at_ms",
    /// "progress", "result", "error"}`; `error` is the OpenAI error shape plus `kind` and
    /// `status`.
    pub fn to_json(&self) -> Value {
        json!({
            "id": self.id.to_string(),
            "object": "job",
            "kind": self.kind,
            "status": self.status.as_str(),
            "priority": self.priority,
            "attempts": self.attempts,
            "max_attempts": self.max_attempts,
            "created_at_ms": self.created_at,
            "updated_at_ms": self.updated_at,
            "started_at_ms": self.started_at,
            "finished_at_ms": self.finished_at,
            "expires_at_ms": self.expires_at,
            "progress": self.progress,
            "result": self.result,
            "error": self.error,
        })
    }
}

/// What [`JobStore::submit`](crate::JobStore::submit) needs to create a job.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct NewJob {
    /// The id to use.
    pub id: JobId,
    /// The owner.
    pub tenant: String,
    /// The handler name.
    pub kind: String,
    /// The input.
    pub input: Value,
    /// Options.
    pub options: JobOptions,
}

impl NewJob {
    /// A new job with a fresh id.
    pub fn new(tenant: impl Into<String>, kind: impl Into<String>, input: Value) -> Self {
        Self {
            id: JobId::new(),
            tenant: tenant.into(),
            kind: kind.into(),
            input,
            options: JobOptions::default(),
        }
    }

    /// Sets the options.
    #[must_use]
    pub fn with_options(mut self, options: JobOptions) -> Self {
        self.options = options;
        self
    }
}

/// The answer to a submit: the job, and whether it was created now or found under its
/// idempotency key.
#[derive(Debug, Clone)]
pub struct Submitted {
    /// The job (for a replay: its current state, with its result when done).
    pub job: Job,
    /// `false` when an earlier submit with the same idempotency key created it.
    pub created: bool,
}

/// The fencing token of one claim: every write by the worker names it, and the store
/// rejects writes whose epoch is no longer current.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Lease {
    /// The job.
    pub id: JobId,
    /// The epoch the claim set (incremented by every claim).
    pub epoch: i64,
    /// A random token unique to this claim, checked with the epoch: even if a database
    /// crash loses a claim and the epoch is handed out again, the token differs.
    pub token: uuid::Uuid,
}

/// The record of one LLM call made inside a durable step
/// ([`JobContext::chat`](crate::JobContext::chat) within
/// [`JobContext::step`](crate::JobContext::step)), kept so that a re-run of the step
/// reuses the answer instead of calling the upstream again. Deleted with its job.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct LlmCall {
    /// The call's key within its job: `"{step}/{n}/{fingerprint}"`, the step's recorded
    /// name, the call's 0-based index within the step, and the first 16 hex digits of the
    /// BLAKE3 hash of the request's JSON. The same on every attempt as long as the
    /// handler is deterministic up to the call.
    pub key: String,
    /// How many attempts started this call. More than one while `response` is `None`
    /// means an earlier start left no recorded answer: its call failed, or its worker
    /// died after sending the request; in that case the upstream may have been paid.
    pub starts: u32,
    /// The upstream's answer (a serialized `ChatResponse`) once recorded.
    pub response: Option<Value>,
}

impl LlmCall {
    /// A call record.
    pub fn new(key: impl Into<String>, starts: u32, response: Option<Value>) -> Self {
        Self {
            key: key.into(),
            starts,
            response,
        }
    }
}

/// How a worker ends an attempt.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum Finish {
    /// Succeeded with this result.
    Succeeded(Value),
    /// Failed for good.
    Failed(JobErrorInfo),
    /// Failed this attempt; queue again at `run_at` (Unix ms).
    Retry {
        /// The attempt's error.
        error: JobErrorInfo,
        /// When to try again.
        run_at: i64,
    },
    /// Give the job back unstarted-equivalent (graceful shutdown): queued again at once and
    /// the attempt is not counted.
    Release,
}

/// Errors of the job system (store failures, conflicts, fencing).
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum JobError {
    /// The idempotency key was used with a different request (HTTP 409).
    Conflict(String),
    /// The input is invalid (HTTP 400).
    BadRequest(String),
    /// The worker's lease is no longer current (another worker took the job, or it was
    /// cancelled): the write was rejected.
    LeaseLost,
    /// The store failed (HTTP 500; the message never holds credentials).
    Store(String),
}

impl JobError {
    pub(crate) fn store(e: impl fmt::Display) -> Self {
        JobError::Store(e.to_string())
    }

    /// The HTTP status.
    pub fn status(&self) -> u16 {
        match self {
            JobError::Conflict(_) => 409,
            JobError::BadRequest(_) => 400,
            JobError::LeaseLost => 409,
            JobError::Store(_) => 500,
        }
    }

    /// The OpenAI-style error body. A conflict has type `"conflict_error"` and code
    /// `"idempotency_key_reused"`.
    pub fn to_openai_json(&self) -> Value {
        match self {
            JobError::Conflict(m) => json!({"error": {
                "message": m, "type": "conflict_error", "param": null,
                "code": "idempotency_key_reused"}}),
            JobError::BadRequest(m) => LlmError::bad_request(m.clone()).to_openai_json(),
            JobError::LeaseLost => json!({"error": {
                "message": "the job's lease was lost", "type": "conflict_error",
                "param": null, "code": "lease_lost"}}),
            JobError::Store(_) => {
                // The store's text may name hosts; clients get a generic message.
                LlmError::internal("the job store failed").to_openai_json()
            }
        }
    }
}

impl fmt::Display for JobError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            JobError::Conflict(m) => write!(f, "conflict: {m}"),
            JobError::BadRequest(m) => write!(f, "bad request: {m}"),
            JobError::LeaseLost => f.write_str("lease lost"),
            JobError::Store(m) => write!(f, "job store error: {m}"),
        }
    }
}

impl std::error::Error for JobError {}

impl From<JobError> for LlmError {
    fn from(e: JobError) -> Self {
        match e {
            JobError::Conflict(m) => LlmError::bad_request(m).with_code("idempotency_key_reused"),
            JobError::BadRequest(m) => LlmError::bad_request(m),
            JobError::LeaseLost => LlmError::cancelled("the job's lease was lost"),
            JobError::Store(m) => LlmError::internal(format!("job store: {m}")),
        }
    }
}

/// Wall-clock Unix milliseconds (the database clock of the stores).
pub(crate) fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

pub(crate) fn dur_ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_names_round_trip() {
        for s in [
            JobStatus::Queued,
            JobStatus::Running,
            JobStatus::Succeeded,
            JobStatus::Failed,
            JobStatus::Cancelled,
        ] {
            assert_eq!(JobStatus::parse(s.as_str()), Some(s));
            assert_eq!(serde_json::to_value(s).unwrap(), s.as_str());
        }
        assert_eq!(JobStatus::parse("paused"), None);
        assert!(JobStatus::Cancelled.is_terminal() && !JobStatus::Running.is_terminal());
    }

    #[test]
    fn errors_map_to_openai_bodies() {
        let c = JobError::Conflict("key reused".into());
        assert_eq!(c.status(), 409);
        let body = c.to_openai_json();
        assert_eq!(body["error"]["type"], "conflict_error");
        assert_eq!(body["error"]["code"], "idempotency_key_reused");
        assert_eq!(JobError::BadRequest("x".into()).status(), 400);
        // Store errors never leak their text (it may name hosts) to clients.
        let s = JobError::Store("connect to db.internal:5432 failed".into());
        assert_eq!(s.status(), 500);
        assert!(!s.to_openai_json().to_string().contains("db.internal"));
    }

    #[test]
    fn error_info_keeps_the_classification() {
        let e = LlmError::rate_limited("slow down");
        let info = JobErrorInfo::from(&e);
        assert_eq!(info.kind, "rate_limited");
        assert_eq!(info.error_type, "rate_limit_error");
        assert_eq!(info.status, 429);
        assert_eq!(info.code.as_deref(), Some("rate_limit_exceeded"));
        let v = serde_json::to_value(&info).unwrap();
        assert_eq!(v["type"], "rate_limit_error");
    }

    #[test]
    fn options_clamp_attempts() {
        assert_eq!(JobOptions::default().max_attempts(0).max_attempts, 1);
        let id = JobId::new();
        assert_eq!(id.to_string().parse::<JobId>().unwrap(), id);
        assert!("nope".parse::<JobId>().is_err());
    }
}
