//! The PostgreSQL store: replicas share one queue.

use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use sqlx::migrate::Migrator;
use sqlx::postgres::{PgConnectOptions, PgListener, PgPool, PgPoolOptions};
use tokio::sync::Notify;

use super::{
    JobStore, StoreFuture, cols, count, fenced, job_from_row, json_text, leased, limit_param,
    llm_call, resubmitted, step_outputs,
};
use crate::types::{
    Finish, Job, JobError, JobId, Lease, LlmCall, NewJob, Progress, Submitted, dur_ms,
};

/// The NOTIFY channel that wakes idle workers of every replica.
const CHANNEL: &str = "llm_tower_jobs";

/// The PostgreSQL [`JobStore`], for many replicas sharing one queue: claims use
/// `FOR UPDATE SKIP LOCKED`, submits `NOTIFY` idle workers (`LISTEN` in
/// [`JobStore::listen`]), the migrations run at [`connect`](Self::connect). Every statement
/// has a server-side `statement_timeout` (10 s) and pool acquisition times out after 5 s,
/// so a stuck database surfaces as a [`JobError::Store`] instead of a hang.
///
/// Submits, recorded steps, recorded LLM answers and outcomes are durable commits. Claims,
/// lease renewals, progress and the notes that an LLM call starts use a second small pool
/// with `synchronous_commit = off` (no WAL flush wait on the submit → start path); losing
/// one in a database crash is harmless, because every claim also sets a random token that
/// fenced writes check with the epoch, and an answer's record does not need its note.
///
/// ```no_run
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), llm_tower_jobs::JobError> {
/// use llm_tower_jobs::PostgresStore;
/// let url = std::env::var("DATABASE_URL").expect("DATABASE_URL");
/// let store = PostgresStore::connect(&url).await?;
/// # drop(store); Ok(()) }
/// ```
#[derive(Clone)]
pub struct PostgresStore {
    pool: PgPool,
    /// Connections with `synchronous_commit = off`, for writes whose loss in a database
    /// crash is harmless: claims (the job just stays claimable; the per-claim token keeps a
    /// lost claim's epoch from being reused), lease renewals, progress and LLM call start
    /// notes. Submits, step records, LLM answers and outcomes use the durable pool. A later durable commit flushes the WAL
    /// up to itself, so it also makes every earlier fast commit durable.
    fast: PgPool,
}

// By hand: the pool's connect options hold the database password.
impl std::fmt::Debug for PostgresStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresStore")
            .field("connections", &self.pool.size())
            .field("fast_connections", &self.fast.size())
            .finish_non_exhaustive()
    }
}

fn migrator() -> Migrator {
    super::migrator(&[
        (
            1,
            "jobs",
            include_str!("../../migrations/postgres/0001_jobs.sql"),
        ),
        (
            2,
            "llm_calls",
            include_str!("../../migrations/postgres/0002_llm_calls.sql"),
        ),
        (
            3,
            "responses",
            include_str!("../../migrations/postgres/0003_responses.sql"),
        ),
    ])
}

impl PostgresStore {
    /// Connects to `url` (e.g. the `DATABASE_URL` environment variable) and runs the
    /// migrations.
    pub async fn connect(url: &str) -> Result<Self, JobError> {
        let opts = PgConnectOptions::from_str(url).map_err(JobError::store)?;
        Self::connect_with(opts).await
    }

    /// Connects to the `DATABASE_URL` environment variable's database (a bad-request error
    /// when it is unset) and runs the migrations.
    pub async fn from_env() -> Result<Self, JobError> {
        let url = std::env::var("DATABASE_URL")
            .map_err(|_| JobError::BadRequest("DATABASE_URL is not set".into()))?;
        Self::connect(&url).await
    }

    /// Like [`connect`](Self::connect), but keeps every table in `schema` (created if
    /// missing): separate queues in one database, and isolated tests. The name must be
    /// ASCII letters, digits and underscores.
    pub async fn connect_in_schema(url: &str, schema: &str) -> Result<Self, JobError> {
        if schema.is_empty()
            || !schema
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_')
        {
            return Err(JobError::BadRequest(format!(
                "invalid schema name {schema:?}"
            )));
        }
        let opts = PgConnectOptions::from_str(url).map_err(JobError::store)?;
        let admin = PgPoolOptions::new()
            .max_connections(1)
            .acquire_timeout(Duration::from_secs(5))
            .connect_with(opts.clone())
            .await
            .map_err(JobError::store)?;
        // The name was checked above: letters, digits and underscores only.
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "CREATE SCHEMA IF NOT EXISTS \"{schema}\""
        )))
        .execute(&admin)
        .await
        .map_err(JobError::store)?;
        admin.close().await;
        Self::connect_with(opts.options([("search_path", schema)])).await
    }

    /// Connects with prepared options and runs the migrations.
    pub async fn connect_with(opts: PgConnectOptions) -> Result<Self, JobError> {
        let opts = opts.options([("statement_timeout", "10000")]);
        let pool = PgPoolOptions::new()
            .max_connections(16)
            .acquire_timeout(Duration::from_secs(5))
            .connect_with(opts.clone())
            .await
            .map_err(JobError::store)?;
        migrator().run(&pool).await.map_err(JobError::store)?;
        let fast = PgPoolOptions::new()
            .max_connections(8)
            .acquire_timeout(Duration::from_secs(5))
            .connect_with(opts.options([("synchronous_commit", "off")]))
            .await
            .map_err(JobError::store)?;
        Ok(Self { pool, fast })
    }

    /// The connection pool (for inspection in tests and tools).
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    async fn fenced_update(
        &self,
        sql: &'static str,
        lease: Lease,
        text: Option<String>,
        now: i64,
    ) -> Result<(), JobError> {
        let r = sqlx::query(sql)
            .bind(text)
            .bind(now)
            .bind(lease.id.to_string())
            .bind(lease.epoch)
            .bind(lease.token.to_string())
            .execute(&self.fast)
            .await
            .map_err(JobError::store)?;
        fenced(r.rows_affected())
    }

    async fn notify(&self) {
        // A lost notification only delays a worker until its next poll.
        if let Err(e) = sqlx::query("SELECT pg_notify($1, '')")
            .bind(CHANNEL)
            .execute(&self.pool)
            .await
        {
            tracing::debug!(error = %e, "pg_notify failed");
        }
    }
}

const SELECT_BY_KEY: &str = concat!(
    "SELECT ",
    cols!(),
    " FROM llm_jobs WHERE tenant = $1 AND idempotency_key = $2"
);

impl JobStore for PostgresStore {
    fn submit(&self, job: NewJob, now: i64) -> StoreFuture<'_, Submitted> {
        Box::pin(async move {
            let input = json_text(&job.input)?;
            let o = &job.options;
            if let Some(key) = &o.idempotency_key {
                // A key whose job expired (but is not purged yet) is free again.
                sqlx::query(
                    "DELETE FROM llm_jobs WHERE tenant = $1 AND idempotency_key = $2 \
                     AND expires_at IS NOT NULL AND expires_at <= $3",
                )
                .bind(&job.tenant)
                .bind(key)
                .bind(now)
                .execute(&self.pool)
                .await
                .map_err(JobError::store)?;
            }
            let row = sqlx::query(concat!(
                // The NOTIFY rides in the same statement (and commit) as the insert, and
                // only when a row was inserted.
                "WITH ins AS (INSERT INTO llm_jobs (id, tenant, kind, input, idempotency_key, \
                 status, priority, attempts, max_attempts, timeout_ms, backoff_ms, run_at, \
                 lease_epoch, created_at, updated_at) \
                 VALUES ($1, $2, $3, $4, $5, 'queued', $6, 0, $7, $8, $9, $10, 0, $10, $10) \
                 ON CONFLICT (tenant, idempotency_key) DO NOTHING RETURNING ",
                cols!(),
                ") SELECT ins.* FROM ins CROSS JOIN LATERAL (SELECT pg_notify($11, '')) AS n"
            ))
            .bind(job.id.to_string())
            .bind(&job.tenant)
            .bind(&job.kind)
            .bind(&input)
            .bind(&o.idempotency_key)
            .bind(o.priority)
            .bind(i64::from(o.max_attempts.max(1)))
            .bind(o.timeout.map(dur_ms))
            .bind(dur_ms(o.backoff))
            .bind(now)
            .bind(CHANNEL)
            .fetch_optional(&self.pool)
            .await
            .map_err(JobError::store)?;
            if let Some(row) = row {
                return Ok(Submitted {
                    job: job_from_row!(&row)?,
                    created: true,
                });
            }
            let row = sqlx::query(SELECT_BY_KEY)
                .bind(&job.tenant)
                .bind(&o.idempotency_key)
                .fetch_one(&self.pool)
                .await
                .map_err(JobError::store)?;
            resubmitted(job_from_row!(&row)?, &job)
        })
    }

    fn get<'a>(&'a self, tenant: &'a str, id: JobId, now: i64) -> StoreFuture<'a, Option<Job>> {
        Box::pin(async move {
            let row = sqlx::query(concat!(
                "SELECT ",
                cols!(),
                " FROM llm_jobs WHERE id = $1 AND tenant = $2 \
                 AND (expires_at IS NULL OR expires_at > $3)"
            ))
            .bind(id.to_string())
            .bind(tenant)
            .bind(now)
            .fetch_optional(&self.pool)
            .await
            .map_err(JobError::store)?;
            row.map(|r| job_from_row!(&r)).transpose()
        })
    }

    fn cancel<'a>(
        &'a self,
        tenant: &'a str,
        id: JobId,
        now: i64,
        retention_ms: i64,
    ) -> StoreFuture<'a, Option<Job>> {
        Box::pin(async move {
            let row = sqlx::query(concat!(
                "UPDATE llm_jobs SET status = 'cancelled', finished_at = $3, updated_at = $3, \
                 expires_at = $3 + $4, lease_owner = NULL, lease_expires = NULL \
                 WHERE id = $1 AND tenant = $2 AND status IN ('queued', 'running') RETURNING ",
                cols!()
            ))
            .bind(id.to_string())
            .bind(tenant)
            .bind(now)
            .bind(retention_ms)
            .fetch_optional(&self.pool)
            .await
            .map_err(JobError::store)?;
            match row {
                Some(r) => Ok(Some(job_from_row!(&r)?)),
                None => self.get(tenant, id, now).await,
            }
        })
    }

    fn claim<'a>(
        &'a self,
        kinds: &'a [String],
        worker: &'a str,
        now: i64,
        lease_ms: i64,
    ) -> StoreFuture<'a, Option<(Job, Lease)>> {
        Box::pin(async move {
            let token = uuid::Uuid::new_v4();
            // SKIP LOCKED: concurrent claimers pass over a row another one is taking.
            let row = sqlx::query(concat!(
                "UPDATE llm_jobs SET status = 'running', lease_epoch = lease_epoch + 1, \
                 lease_owner = $1, lease_token = $5, lease_expires = $2 + $3, attempts = attempts + 1, \
                 started_at = COALESCE(started_at, $2), updated_at = $2 \
                 WHERE id = (SELECT id FROM llm_jobs \
                   WHERE kind = ANY($4) \
                   AND ((status = 'queued' AND run_at <= $2) \
                     OR (status = 'running' AND lease_expires <= $2)) \
                   ORDER BY priority DESC, run_at, id LIMIT 1 FOR UPDATE SKIP LOCKED) RETURNING ",
                cols!()
            ))
            .bind(worker)
            .bind(now)
            .bind(lease_ms)
            .bind(kinds.to_vec())
            .bind(token.to_string())
            .fetch_optional(&self.fast)
            .await
            .map_err(JobError::store)?;
            row.map(|r| Ok(leased(job_from_row!(&r)?, token)))
                .transpose()
        })
    }

    fn renew(&self, lease: Lease, now: i64, lease_ms: i64) -> StoreFuture<'_, bool> {
        Box::pin(async move {
            let r = sqlx::query(
                "UPDATE llm_jobs SET lease_expires = $1 + $2 \
                 WHERE id = $3 AND lease_epoch = $4 AND lease_token = $5 AND status = 'running'",
            )
            .bind(now)
            .bind(lease_ms)
            .bind(lease.id.to_string())
            .bind(lease.epoch)
            .bind(lease.token.to_string())
            .execute(&self.fast)
            .await
            .map_err(JobError::store)?;
            Ok(r.rows_affected() == 1)
        })
    }

    fn steps(&self, id: JobId) -> StoreFuture<'_, Vec<(String, serde_json::Value)>> {
        Box::pin(async move {
            let rows: Vec<(String, String)> =
                sqlx::query_as("SELECT name, output FROM llm_job_steps WHERE job_id = $1")
                    .bind(id.to_string())
                    .fetch_all(&self.pool)
                    .await
                    .map_err(JobError::store)?;
            step_outputs(rows)
        })
    }

    fn record_step<'a>(
        &'a self,
        lease: Lease,
        name: &'a str,
        output: &'a serde_json::Value,
        now: i64,
    ) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            let output = json_text(output)?;
            let mut tx = self.pool.begin().await.map_err(JobError::store)?;
            // The fencing check and the insert commit together or not at all.
            let r = sqlx::query(
                "UPDATE llm_jobs SET updated_at = $1 \
                 WHERE id = $2 AND lease_epoch = $3 AND lease_token = $4 AND status = 'running'",
            )
            .bind(now)
            .bind(lease.id.to_string())
            .bind(lease.epoch)
            .bind(lease.token.to_string())
            .execute(&mut *tx)
            .await
            .map_err(JobError::store)?;
            fenced(r.rows_affected())?;
            sqlx::query(
                "INSERT INTO llm_job_steps (job_id, name, output, created_at) \
                 VALUES ($1, $2, $3, $4)",
            )
            .bind(lease.id.to_string())
            .bind(name)
            .bind(output)
            .bind(now)
            .execute(&mut *tx)
            .await
            .map_err(JobError::store)?;
            tx.commit().await.map_err(JobError::store)
        })
    }

    fn set_progress<'a>(
        &'a self,
        lease: Lease,
        progress: &'a Progress,
        now: i64,
    ) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            self.fenced_update(
                "UPDATE llm_jobs SET progress = $1, updated_at = $2 \
                 WHERE id = $3 AND lease_epoch = $4 AND lease_token = $5 AND status = 'running'",
                lease,
                Some(json_text(progress)?),
                now,
            )
            .await
        })
    }

    fn finish(
        &self,
        lease: Lease,
        finish: Finish,
        now: i64,
        retention_ms: i64,
    ) -> StoreFuture<'_, ()> {
        Box::pin(async move {
            let (sql, text, extra): (&'static str, Option<String>, i64) = match &finish {
                Finish::Succeeded(v) => (
                    "UPDATE llm_jobs SET status = 'succeeded', result = $1, error = NULL, \
                     finished_at = $2, updated_at = $2, expires_at = $2 + $5, \
                     lease_owner = NULL, lease_expires = NULL \
                     WHERE id = $3 AND lease_epoch = $4 AND lease_token = $6 AND status = 'running'",
                    Some(json_text(v)?),
                    retention_ms,
                ),
                Finish::Failed(e) => (
                    "UPDATE llm_jobs SET status = 'failed', error = $1, \
                     finished_at = $2, updated_at = $2, expires_at = $2 + $5, \
                     lease_owner = NULL, lease_expires = NULL \
                     WHERE id = $3 AND lease_epoch = $4 AND lease_token = $6 AND status = 'running'",
                    Some(json_text(e)?),
                    retention_ms,
                ),
                Finish::Retry { error, run_at } => (
                    "UPDATE llm_jobs SET status = 'queued', error = $1, updated_at = $2, \
                     run_at = $5, lease_owner = NULL, lease_expires = NULL \
                     WHERE id = $3 AND lease_epoch = $4 AND lease_token = $6 AND status = 'running'",
                    Some(json_text(error)?),
                    *run_at,
                ),
                Finish::Release => (
                    "UPDATE llm_jobs SET status = 'queued', error = COALESCE($1, error), \
                     updated_at = $2, run_at = $2 + $5, attempts = GREATEST(attempts - 1, 0), \
                     lease_owner = NULL, lease_expires = NULL \
                     WHERE id = $3 AND lease_epoch = $4 AND lease_token = $6 AND status = 'running'",
                    None,
                    0,
                ),
            };
            let r = sqlx::query(sql)
                .bind(text)
                .bind(now)
                .bind(lease.id.to_string())
                .bind(lease.epoch)
                .bind(extra)
                .bind(lease.token.to_string())
                .execute(&self.pool)
                .await
                .map_err(JobError::store)?;
            fenced(r.rows_affected())?;
            if matches!(finish, Finish::Release) {
                self.notify().await;
            }
            Ok(())
        })
    }

    fn begin_call<'a>(&'a self, lease: Lease, key: &'a str, now: i64) -> StoreFuture<'a, LlmCall> {
        Box::pin(async move {
            // One statement: the fence, the start note, and the recorded answer if any.
            // A start whose answer is recorded already is not counted.
            let row: Option<(String, i64, Option<String>)> = sqlx::query_as(
                "INSERT INTO llm_job_calls (job_id, call_key, starts, created_at) \
                 SELECT $1, $2, 1, $3 WHERE EXISTS (SELECT 1 FROM llm_jobs \
                   WHERE id = $1 AND lease_epoch = $4 AND lease_token = $5 AND status = 'running') \
                 ON CONFLICT (job_id, call_key) DO UPDATE SET starts = llm_job_calls.starts + \
                   CASE WHEN llm_job_calls.response IS NULL THEN 1 ELSE 0 END \
                 RETURNING call_key, starts, response",
            )
            .bind(lease.id.to_string())
            .bind(key)
            .bind(now)
            .bind(lease.epoch)
            .bind(lease.token.to_string())
            .fetch_optional(&self.fast)
            .await
            .map_err(JobError::store)?;
            row.map_or(Err(JobError::LeaseLost), llm_call)
        })
    }

    fn record_call<'a>(
        &'a self,
        id: JobId,
        key: &'a str,
        response: &'a serde_json::Value,
        now: i64,
    ) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            sqlx::query(
                "INSERT INTO llm_job_calls (job_id, call_key, starts, response, created_at, answered_at) \
                 VALUES ($1, $2, 1, $3, $4, $4) \
                 ON CONFLICT (job_id, call_key) DO UPDATE SET response = excluded.response, \
                   answered_at = excluded.answered_at WHERE llm_job_calls.response IS NULL",
            )
            .bind(id.to_string())
            .bind(key)
            .bind(json_text(response)?)
            .bind(now)
            .execute(&self.pool)
            .await
            .map_err(JobError::store)?;
            Ok(())
        })
    }

    fn forget_calls<'a>(&'a self, lease: Lease, keys: &'a [String]) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            if keys.is_empty() {
                return Ok(());
            }
            sqlx::query(
                "DELETE FROM llm_job_calls WHERE job_id = $1 AND call_key = ANY($2) \
                 AND EXISTS (SELECT 1 FROM llm_jobs WHERE id = $1 AND lease_epoch = $3 \
                   AND lease_token = $4 AND status = 'running')",
            )
            .bind(lease.id.to_string())
            .bind(keys.to_vec())
            .bind(lease.epoch)
            .bind(lease.token.to_string())
            .execute(&self.fast)
            .await
            .map_err(JobError::store)?;
            Ok(())
        })
    }

    fn calls(&self, id: JobId) -> StoreFuture<'_, Vec<LlmCall>> {
        Box::pin(async move {
            let rows: Vec<(String, i64, Option<String>)> = sqlx::query_as(
                "SELECT call_key, starts, response FROM llm_job_calls WHERE job_id = $1 \
                 ORDER BY call_key",
            )
            .bind(id.to_string())
            .fetch_all(&self.pool)
            .await
            .map_err(JobError::store)?;
            rows.into_iter().map(llm_call).collect()
        })
    }

    fn response_store(
        &self,
    ) -> Option<std::sync::Arc<dyn llm_tower_core::dialect::responses::ResponseStore>> {
        Some(std::sync::Arc::new(self.clone()))
    }

    fn purge_expired(&self, now: i64) -> StoreFuture<'_, u64> {
        Box::pin(async move {
            let r = sqlx::query(
                "DELETE FROM llm_jobs WHERE expires_at IS NOT NULL AND expires_at <= $1",
            )
            .bind(now)
            .execute(&self.pool)
            .await
            .map_err(JobError::store)?;
            Ok(r.rows_affected())
        })
    }

    fn count_queued<'a>(&'a self, tenant: &'a str, limit: u64) -> StoreFuture<'a, u64> {
        Box::pin(async move {
            // The (tenant, idempotency_key) index finds the tenant's rows; LIMIT bounds the scan.
            let n: i64 = sqlx::query_scalar(
                "SELECT COUNT(*) FROM (SELECT 1 FROM llm_jobs \
                 WHERE tenant = $1 AND status = 'queued' LIMIT $2) AS q",
            )
            .bind(tenant)
            .bind(limit_param(limit))
            .fetch_one(&self.pool)
            .await
            .map_err(JobError::store)?;
            Ok(count(n))
        })
    }

    fn listen(
        &self,
        wake: Arc<Notify>,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send + '_>> {
        Box::pin(async move {
            loop {
                let mut listener = match PgListener::connect_with(&self.pool).await {
                    Ok(l) => l,
                    Err(e) => {
                        tracing::warn!(error = %e, "LISTEN connection failed; retrying");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                        continue;
                    }
                };
                if let Err(e) = listener.listen(CHANNEL).await {
                    tracing::warn!(error = %e, "LISTEN failed; retrying");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
                loop {
                    match listener.recv().await {
                        Ok(_) => wake.notify_waiters(),
                        Err(e) => {
                            // Notifications may have been missed while disconnected: wake
                            // the workers so they look at the queue.
                            tracing::warn!(error = %e, "LISTEN connection lost; reconnecting");
                            wake.notify_waiters();
                            break;
                        }
                    }
                }
            }
        })
    }
}
