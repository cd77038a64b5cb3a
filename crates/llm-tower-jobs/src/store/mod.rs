//! The [`JobStore`] trait and its two implementations: [`SqliteStore`] (embedded, one
//! file, the default) and [`PostgresStore`] (many replicas share one queue).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use sqlx::SqlSafeStr as _;
use sqlx::migrate::{Migration, MigrationType, Migrator};
use tokio::sync::Notify;

use crate::types::{Finish, Job, JobError, JobId, Lease, LlmCall, NewJob, Submitted};

mod postgres;
mod responses;
mod sqlite;

pub use postgres::PostgresStore;
pub use sqlite::SqliteStore;

/// The future every [`JobStore`] method returns.
pub type StoreFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, JobError>> + Send + 'a>>;

/// Where jobs and recorded step outputs live. All times are Unix milliseconds passed in by
/// the caller (wall clock in production), so the store itself has no clock and tests can
/// move time freely.
///
/// Every write a worker makes names its [`Lease`]; a write whose epoch is no longer the
/// job's current one (the lease expired and another worker claimed the job, or the job was
/// cancelled) fails with [`JobError::LeaseLost`] and changes nothing. That fencing is what
/// makes "never run by two workers at once" hold for the effects that matter.
pub trait JobStore: Send + Sync + std::fmt::Debug + 'static {
    /// Creates a job, or returns the job already created under the same
    /// `(tenant, idempotency key)` when the kind and input are equal; different input
    /// under a used key is [`JobError::Conflict`].
    fn submit(&self, job: NewJob, now: i64) -> StoreFuture<'_, Submitted>;

    /// The tenant's job, unless unknown, another tenant's, or expired.
    fn get<'a>(&'a self, tenant: &'a str, id: JobId, now: i64) -> StoreFuture<'a, Option<Job>>;

    /// Cancels a queued or running job (a finished job is returned unchanged); `None` when
    /// the tenant has no such job. `expires_at` becomes `now + retention_ms`.
    fn cancel<'a>(
        &'a self,
        tenant: &'a str,
        id: JobId,
        now: i64,
        retention_ms: i64,
    ) -> StoreFuture<'a, Option<Job>>;

    /// Claims the most urgent runnable job of one of `kinds`: a queued job whose `run_at`
    /// has come, or a running job whose lease expired (its worker died). Increments the
    /// attempts and the lease epoch; the lease lasts until `now + lease_ms`. Concurrent
    /// claims never return the same job.
    fn claim<'a>(
        &'a self,
        kinds: &'a [String],
        worker: &'a str,
        now: i64,
        lease_ms: i64,
    ) -> StoreFuture<'a, Option<(Job, Lease)>>;

    /// Extends the lease to `now + lease_ms`. `Ok(false)` when the lease is no longer
    /// current (cancelled, or claimed by another worker): the worker must stop.
    fn renew(&self, lease: Lease, now: i64, lease_ms: i64) -> StoreFuture<'_, bool>;

    /// The recorded step outputs of a job, as `(name, JSON output)`.
    fn steps(&self, id: JobId) -> StoreFuture<'_, Vec<(String, serde_json::Value)>>;

    /// Records one completed step's output (fenced).
    fn record_step<'a>(
        &'a self,
        lease: Lease,
        name: &'a str,
        output: &'a serde_json::Value,
        now: i64,
    ) -> StoreFuture<'a, ()>;

    /// Stores the job's progress (fenced).
    fn set_progress<'a>(
        &'a self,
        lease: Lease,
        progress: &'a crate::Progress,
        now: i64,
    ) -> StoreFuture<'a, ()>;

    /// Ends the attempt (fenced): success, failure, retry later, or release.
    fn finish(
        &self,
        lease: Lease,
        finish: Finish,
        now: i64,
        retention_ms: i64,
    ) -> StoreFuture<'_, ()>;

    /// Deletes finished jobs (and their steps) whose retention ended; returns how many.
    fn purge_expired(&self, now: i64) -> StoreFuture<'_, u64>;

    /// Notes that the attempt holding `lease` starts the LLM call `key` of the job
    /// (fenced), and returns the call's record: with its `response` when an earlier
    /// attempt recorded one (the caller uses it and does not call the upstream), otherwise
    /// with `starts` incremented. The start note may be lost in a database crash; only
    /// [`record_call`](Self::record_call) must be durable.
    ///
    /// The default (for stores that do not keep call records) never finds a response:
    /// every re-run of a step calls the upstream again (at-least-once).
    fn begin_call<'a>(&'a self, lease: Lease, key: &'a str, now: i64) -> StoreFuture<'a, LlmCall> {
        let _ = (lease, now);
        Box::pin(async move { Ok(LlmCall::new(key, 1, None)) })
    }

    /// Durably records the upstream's answer to the call `key` of job `id`, unless an
    /// answer is recorded already (the first answer stays). Not fenced: an answer that
    /// was paid for is worth keeping whoever holds the lease now. The default keeps
    /// nothing.
    fn record_call<'a>(
        &'a self,
        id: JobId,
        key: &'a str,
        response: &'a serde_json::Value,
        now: i64,
    ) -> StoreFuture<'a, ()> {
        let _ = (id, key, response, now);
        Box::pin(async { Ok(()) })
    }

    /// Deletes the records of the calls `keys` (fenced), so that a retry of a step that
    /// failed asks the upstream afresh instead of reusing the answers it rejected. The
    /// default does nothing.
    fn forget_calls<'a>(&'a self, lease: Lease, keys: &'a [String]) -> StoreFuture<'a, ()> {
        let _ = (lease, keys);
        Box::pin(async { Ok(()) })
    }

    /// The job's LLM call records, ordered by key (for inspection and tests). The default
    /// has none.
    fn calls(&self, id: JobId) -> StoreFuture<'_, Vec<LlmCall>> {
        let _ = id;
        Box::pin(async { Ok(Vec::new()) })
    }

    /// How many of the tenant's jobs are queued (waiting for a first run or a retry),
    /// counting no further than `limit` (so the cost is bounded).
    fn count_queued<'a>(&'a self, tenant: &'a str, limit: u64) -> StoreFuture<'a, u64>;

    /// The [`ResponseStore`](llm_tower_core::dialect::responses::ResponseStore) in the
    /// same database (table `llm_responses`), for a gateway's stored Responses answers;
    /// `None` (the default) for a store that keeps none.
    fn response_store(&self) -> Option<Arc<dyn llm_tower_core::dialect::responses::ResponseStore>> {
        None
    }

    /// Runs until dropped, calling `wake.notify_waiters()` whenever another process
    /// submitted or released work (PostgreSQL: `LISTEN`). The default waits forever:
    /// an embedded store only has in-process submitters, which wake workers directly.
    fn listen(&self, wake: Arc<Notify>) -> Pin<Box<dyn Future<Output = ()> + Send + '_>> {
        drop(wake);
        Box::pin(std::future::pending())
    }
}

impl<S: JobStore + ?Sized> JobStore for Arc<S> {
    fn submit(&self, job: NewJob, now: i64) -> StoreFuture<'_, Submitted> {
        (**self).submit(job, now)
    }
    fn get<'a>(&'a self, tenant: &'a str, id: JobId, now: i64) -> StoreFuture<'a, Option<Job>> {
        (**self).get(tenant, id, now)
    }
    fn cancel<'a>(
        &'a self,
        tenant: &'a str,
        id: JobId,
        now: i64,
        retention_ms: i64,
    ) -> StoreFuture<'a, Option<Job>> {
        (**self).cancel(tenant, id, now, retention_ms)
    }
    fn claim<'a>(
        &'a self,
        kinds: &'a [String],
        worker: &'a str,
        now: i64,
        lease_ms: i64,
    ) -> StoreFuture<'a, Option<(Job, Lease)>> {
        (**self).claim(kinds, worker, now, lease_ms)
    }
    fn renew(&self, lease: Lease, now: i64, lease_ms: i64) -> StoreFuture<'_, bool> {
        (**self).renew(lease, now, lease_ms)
    }
    fn steps(&self, id: JobId) -> StoreFuture<'_, Vec<(String, serde_json::Value)>> {
        (**self).steps(id)
    }
    fn record_step<'a>(
        &'a self,
        lease: Lease,
        name: &'a str,
        output: &'a serde_json::Value,
        now: i64,
    ) -> StoreFuture<'a, ()> {
        (**self).record_step(lease, name, output, now)
    }
    fn set_progress<'a>(
        &'a self,
        lease: Lease,
        progress: &'a crate::Progress,
        now: i64,
    ) -> StoreFuture<'a, ()> {
        (**self).set_progress(lease, progress, now)
    }
    fn finish(
        &self,
        lease: Lease,
        finish: Finish,
        now: i64,
        retention_ms: i64,
    ) -> StoreFuture<'_, ()> {
        (**self).finish(lease, finish, now, retention_ms)
    }
    fn purge_expired(&self, now: i64) -> StoreFuture<'_, u64> {
        (**self).purge_expired(now)
    }
    fn count_queued<'a>(&'a self, tenant: &'a str, limit: u64) -> StoreFuture<'a, u64> {
        (**self).count_queued(tenant, limit)
    }
    fn response_store(&self) -> Option<Arc<dyn llm_tower_core::dialect::responses::ResponseStore>> {
        (**self).response_store()
    }
    fn listen(&self, wake: Arc<Notify>) -> Pin<Box<dyn Future<Output = ()> + Send + '_>> {
        (**self).listen(wake)
    }
    fn begin_call<'a>(&'a self, lease: Lease, key: &'a str, now: i64) -> StoreFuture<'a, LlmCall> {
        (**self).begin_call(lease, key, now)
    }
    fn record_call<'a>(
        &'a self,
        id: JobId,
        key: &'a str,
        response: &'a serde_json::Value,
        now: i64,
    ) -> StoreFuture<'a, ()> {
        (**self).record_call(id, key, response, now)
    }
    fn forget_calls<'a>(&'a self, lease: Lease, keys: &'a [String]) -> StoreFuture<'a, ()> {
        (**self).forget_calls(lease, keys)
    }
    fn calls(&self, id: JobId) -> StoreFuture<'_, Vec<LlmCall>> {
        (**self).calls(id)
    }
}

/// The columns every query returns (a literal, for `concat!`).
macro_rules! cols {
    () => {
        "id, tenant, kind, input, idempotency_key, status, priority, attempts, max_attempts, \
         timeout_ms, backoff_ms, run_at, lease_epoch, result, error, progress, created_at, \
         updated_at, started_at, finished_at, expires_at"
    };
}
pub(crate) use cols;

/// Maps a row (SQLite or PostgreSQL) to a [`Job`]: both stores use the same column names
/// and types (TEXT and 64-bit integers).
macro_rules! job_from_row {
    ($row:expr) => {{
        use sqlx::Row as _;
        let row = $row;
        (|| -> Result<$crate::Job, $crate::JobError> {
            let id: String = row.try_get("id").map_err($crate::JobError::store)?;
            let status: String = row.try_get("status").map_err($crate::JobError::store)?;
            let input: String = row.try_get("input").map_err($crate::JobError::store)?;
            let result: Option<String> = row.try_get("result").map_err($crate::JobError::store)?;
            let error: Option<String> = row.try_get("error").map_err($crate::JobError::store)?;
            let progress: Option<String> =
                row.try_get("progress").map_err($crate::JobError::store)?;
            let attempts: i64 = row.try_get("attempts").map_err($crate::JobError::store)?;
            let max_attempts: i64 = row
                .try_get("max_attempts")
                .map_err($crate::JobError::store)?;
            let timeout_ms: Option<i64> =
                row.try_get("timeout_ms").map_err($crate::JobError::store)?;
            let backoff_ms: i64 = row.try_get("backoff_ms").map_err($crate::JobError::store)?;
            Ok($crate::Job {
                id: id.parse().map_err($crate::JobError::store)?,
                tenant: row.try_get("tenant").map_err($crate::JobError::store)?,
                kind: row.try_get("kind").map_err($crate::JobError::store)?,
                input: serde_json::from_str(&input).map_err($crate::JobError::store)?,
                idempotency_key: row
                    .try_get("idempotency_key")
                    .map_err($crate::JobError::store)?,
                status: $crate::JobStatus::parse(&status)
                    .ok_or_else(|| $crate::JobError::Store(format!("unknown status {status}")))?,
                priority: row.try_get("priority").map_err($crate::JobError::store)?,
                attempts: u32::try_from(attempts).unwrap_or(0),
                max_attempts: u32::try_from(max_attempts).unwrap_or(1),
                timeout_ms: timeout_ms.and_then(|t| u64::try_from(t).ok()),
                backoff_ms: u64::try_from(backoff_ms).unwrap_or(0),
                run_at: row.try_get("run_at").map_err($crate::JobError::store)?,
                lease_epoch: row
                    .try_get("lease_epoch")
                    .map_err($crate::JobError::store)?,
                result: result
                    .map(|s| serde_json::from_str(&s))
                    .transpose()
                    .map_err($crate::JobError::store)?,
                error: error
                    .map(|s| serde_json::from_str(&s))
                    .transpose()
                    .map_err($crate::JobError::store)?,
                progress: progress
                    .map(|s| serde_json::from_str(&s))
                    .transpose()
                    .map_err($crate::JobError::store)?,
                created_at: row.try_get("created_at").map_err($crate::JobError::store)?,
                updated_at: row.try_get("updated_at").map_err($crate::JobError::store)?,
                started_at: row.try_get("started_at").map_err($crate::JobError::store)?,
                finished_at: row
                    .try_get("finished_at")
                    .map_err($crate::JobError::store)?,
                expires_at: row.try_get("expires_at").map_err($crate::JobError::store)?,
            })
        })()
    }};
}
pub(crate) use job_from_row;

/// Whether an existing job matches a repeated submit (same kind and input).
pub(crate) fn same_request(existing: &Job, new: &NewJob) -> Result<(), JobError> {
    if existing.kind == new.kind && existing.input == new.input {
        Ok(())
    } else {
        Err(JobError::Conflict(format!(
            "the idempotency key {:?} was already used with a different request",
            new.options.idempotency_key.as_deref().unwrap_or_default()
        )))
    }
}

pub(crate) fn json_text(v: &impl serde::Serialize) -> Result<String, JobError> {
    serde_json::to_string(v).map_err(JobError::store)
}

/// Maps a `(call_key, starts, response)` row of `llm_job_calls` to an [`LlmCall`].
pub(crate) fn llm_call(
    (key, starts, response): (String, i64, Option<String>),
) -> Result<LlmCall, JobError> {
    let response = response
        .map(|r| serde_json::from_str(&r))
        .transpose()
        .map_err(JobError::store)?;
    Ok(LlmCall::new(
        key,
        u32::try_from(starts).unwrap_or(u32::MAX),
        response,
    ))
}

/// The migrations of a store, as `(version, name, SQL)`: the SQL text is per dialect, the
/// list's shape is the same for both.
pub(crate) fn migrator(migrations: &[(i64, &'static str, &'static str)]) -> Migrator {
    Migrator::with_migrations(
        migrations
            .iter()
            .map(|&(version, name, sql)| {
                Migration::new(
                    version,
                    name.into(),
                    MigrationType::Simple,
                    sql.into_sql_str(),
                    false,
                )
            })
            .collect(),
    )
}

/// The outcome of a fenced write: it must have changed exactly the job's row, otherwise the
/// lease is no longer current.
pub(crate) fn fenced(rows_affected: u64) -> Result<(), JobError> {
    if rows_affected == 1 {
        Ok(())
    } else {
        Err(JobError::LeaseLost)
    }
}

/// The lease a claim returns with the claimed job: its epoch, and the claim's token.
pub(crate) fn leased(job: Job, token: uuid::Uuid) -> (Job, Lease) {
    let lease = Lease {
        id: job.id,
        epoch: job.lease_epoch,
        token,
    };
    (job, lease)
}

/// The answer to a submit whose idempotency key names `existing`: that job, when the
/// request is the same.
pub(crate) fn resubmitted(existing: Job, new: &NewJob) -> Result<Submitted, JobError> {
    same_request(&existing, new)?;
    Ok(Submitted {
        job: existing,
        created: false,
    })
}

/// Maps `(name, output)` rows of `llm_job_steps` to the step outputs.
pub(crate) fn step_outputs(
    rows: Vec<(String, String)>,
) -> Result<Vec<(String, serde_json::Value)>, JobError> {
    rows.into_iter()
        .map(|(n, o)| Ok((n, serde_json::from_str(&o).map_err(JobError::store)?)))
        .collect()
}

/// The `LIMIT` parameter of [`JobStore::count_queued`] (saturating).
pub(crate) fn limit_param(limit: u64) -> i64 {
    i64::try_from(limit).unwrap_or(i64::MAX)
}

/// A count from the database (never negative in practice) as `u64`.
pub(crate) fn count(n: i64) -> u64 {
    u64::try_from(n).unwrap_or(0)
}
