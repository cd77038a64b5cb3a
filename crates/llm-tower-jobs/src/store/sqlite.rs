//! The embedded store: one SQLite file, no server.

use std::str::FromStr;
use std::time::Duration;

use sqlx::migrate::Migrator;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};

use super::{
    JobStore, StoreFuture, cols, count, fenced, job_from_row, json_text, leased, limit_param,
    llm_call, resubmitted, step_outputs,
};
use crate::types::{
    Finish, Job, JobError, JobId, Lease, LlmCall, NewJob, Progress, Submitted, dur_ms,
};

/// The embedded [`JobStore`]: one local SQLite file (through sqlx), no server, WAL mode.
/// Several processes may share the file (the claim is one atomic `UPDATE … RETURNING`), but
/// it is meant for one machine; use [`PostgresStore`](crate::PostgresStore) for replicas.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), llm_tower_jobs::JobError> {
/// use llm_tower_jobs::SqliteStore;
/// let path = std::env::temp_dir().join(format!("doc-jobs-{}.db", std::process::id()));
/// let store = SqliteStore::open(&path).await?;
/// # store.pool().close().await;
/// # for ext in ["", "-wal", "-shm"] { let _ = std::fs::remove_file(format!("{}{ext}", path.display())); }
/// let in_memory = SqliteStore::connect("sqlite::memory:").await?;
/// # drop(in_memory);
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct SqliteStore {
    pool: SqlitePool,
}

impl std::fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteStore")
            .field("connections", &self.pool.size())
            .finish_non_exhaustive()
    }
}

fn migrator() -> Migrator {
    super::migrator(&[
        (
            1,
            "jobs",
            include_str!("../../migrations/sqlite/0001_jobs.sql"),
        ),
        (
            2,
            "llm_calls",
            include_str!("../../migrations/sqlite/0002_llm_calls.sql"),
        ),
        (
            3,
            "responses",
            include_str!("../../migrations/sqlite/0003_responses.sql"),
        ),
    ])
}

impl SqliteStore {
    /// Opens (creating if missing) the database at `url` (`sqlite://path`, `sqlite:path`
    /// or `sqlite::memory:`) and runs the migrations.
    pub async fn connect(url: &str) -> Result<Self, JobError> {
        let opts = SqliteConnectOptions::from_str(url).map_err(JobError::store)?;
        // An in-memory database exists per connection: keep exactly one.
        let memory = url.contains(":memory:") || url.contains("mode=memory");
        Self::connect_with(opts, if memory { 1 } else { 4 }).await
    }

    /// Opens (creating if missing) the database file at `path` and runs the migrations.
    pub async fn open(path: impl AsRef<std::path::Path>) -> Result<Self, JobError> {
        let opts = SqliteConnectOptions::new().filename(path);
        Self::connect_with(opts, 4).await
    }

    async fn connect_with(opts: SqliteConnectOptions, max: u32) -> Result<Self, JobError> {
        let opts = opts
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .busy_timeout(Duration::from_secs(10))
            .foreign_keys(true);
        let pool = SqlitePoolOptions::new()
            .max_connections(max)
            .min_connections(1)
            .connect_with(opts)
            .await
            .map_err(JobError::store)?;
        migrator().run(&pool).await.map_err(JobError::store)?;
        Ok(Self { pool })
    }

    /// The connection pool (for inspection in tests and tools).
    pub fn pool(&self) -> &SqlitePool {
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
            .execute(&self.pool)
            .await
            .map_err(JobError::store)?;
        fenced(r.rows_affected())
    }
}

const SELECT_BY_KEY: &str = concat!(
    "SELECT ",
    cols!(),
    " FROM llm_jobs WHERE tenant = ?1 AND idempotency_key = ?2"
);

impl JobStore for SqliteStore {
    fn submit(&self, job: NewJob, now: i64) -> StoreFuture<'_, Submitted> {
        Box::pin(async move {
            let input = json_text(&job.input)?;
            let o = &job.options;
            if let Some(key) = &o.idempotency_key {
                // A key whose job expired (but is not purged yet) is free again.
                sqlx::query(
                    "DELETE FROM llm_jobs WHERE tenant = ?1 AND idempotency_key = ?2 \
                     AND expires_at IS NOT NULL AND expires_at <= ?3",
                )
                .bind(&job.tenant)
                .bind(key)
                .bind(now)
                .execute(&self.pool)
                .await
                .map_err(JobError::store)?;
            }
            let row = sqlx::query(concat!(
                "INSERT INTO llm_jobs (id, tenant, kind, input, idempotency_key, status, priority, \
                 attempts, max_attempts, timeout_ms, backoff_ms, run_at, lease_epoch, \
                 created_at, updated_at) \
                 VALUES (?1, ?2, ?3, ?4, ?5, 'queued', ?6, 0, ?7, ?8, ?9, ?10, 0, ?10, ?10) \
                 ON CONFLICT (tenant, idempotency_key) DO NOTHING RETURNING ",
                cols!()
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
                " FROM llm_jobs WHERE id = ?1 AND tenant = ?2 \
                 AND (expires_at IS NULL OR expires_at > ?3)"
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
                "UPDATE llm_jobs SET status = 'cancelled', finished_at = ?3, updated_at = ?3, \
                 expires_at = ?3 + ?4, lease_owner = NULL, lease_expires = NULL \
                 WHERE id = ?1 AND tenant = ?2 AND status IN ('queued', 'running') RETURNING ",
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
            let kinds = json_text(&kinds)?;
            let token = uuid::Uuid::new_v4();
            // One statement: SQLite serialises writers, so two claims never pick one job.
            let row = sqlx::query(concat!(
                "UPDATE llm_jobs SET status = 'running', lease_epoch = lease_epoch + 1, \
                 lease_owner = ?1, lease_token = ?5, lease_expires = ?2 + ?3, attempts = attempts + 1, \
                 started_at = COALESCE(started_at, ?2), updated_at = ?2 \
                 WHERE id = (SELECT id FROM llm_jobs \
                   WHERE kind IN (SELECT value FROM json_each(?4)) \
                   AND ((status = 'queued' AND run_at <= ?2) \
                     OR (status = 'running' AND lease_expires <= ?2)) \
                   ORDER BY priority DESC, run_at, id LIMIT 1) RETURNING ",
                cols!()
            ))
            .bind(worker)
            .bind(now)
            .bind(lease_ms)
            .bind(kinds)
            .bind(token.to_string())
            .fetch_optional(&self.pool)
            .await
            .map_err(JobError::store)?;
            row.map(|r| Ok(leased(job_from_row!(&r)?, token)))
                .transpose()
        })
    }

    fn renew(&self, lease: Lease, now: i64, lease_ms: i64) -> StoreFuture<'_, bool> {
        Box::pin(async move {
            let r = sqlx::query(
                "UPDATE llm_jobs SET lease_expires = ?1 + ?2 \
                 WHERE id = ?3 AND lease_epoch = ?4 AND lease_token = ?5 AND status = 'running'",
            )
            .bind(now)
            .bind(lease_ms)
            .bind(lease.id.to_string())
            .bind(lease.epoch)
            .bind(lease.token.to_string())
            .execute(&self.pool)
            .await
            .map_err(JobError::store)?;
            Ok(r.rows_affected() == 1)
        })
    }

    fn steps(&self, id: JobId) -> StoreFuture<'_, Vec<(String, serde_json::Value)>> {
        Box::pin(async move {
            let rows: Vec<(String, String)> =
                sqlx::query_as("SELECT name, output FROM llm_job_steps WHERE job_id = ?1")
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
                "UPDATE llm_jobs SET updated_at = ?1 \
                 WHERE id = ?2 AND lease_epoch = ?3 AND lease_token = ?4 AND status = 'running'",
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
                 VALUES (?1, ?2, ?3, ?4)",
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
                "UPDATE llm_jobs SET progress = ?1, updated_at = ?2 \
                 WHERE id = ?3 AND lease_epoch = ?4 AND lease_token = ?5 AND status = 'running'",
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
                    "UPDATE llm_jobs SET status = 'succeeded', result = ?1, error = NULL, \
                     finished_at = ?2, updated_at = ?2, expires_at = ?2 + ?5, \
                     lease_owner = NULL, lease_expires = NULL \
                     WHERE id = ?3 AND lease_epoch = ?4 AND lease_token = ?6 AND status = 'running'",
                    Some(json_text(v)?),
                    retention_ms,
                ),
                Finish::Failed(e) => (
                    "UPDATE llm_jobs SET status = 'failed', error = ?1, \
                     finished_at = ?2, updated_at = ?2, expires_at = ?2 + ?5, \
                     lease_owner = NULL, lease_expires = NULL \
                     WHERE id = ?3 AND lease_epoch = ?4 AND lease_token = ?6 AND status = 'running'",
                    Some(json_text(e)?),
                    retention_ms,
                ),
                Finish::Retry { error, run_at } => (
                    "UPDATE llm_jobs SET status = 'queued', error = ?1, updated_at = ?2, \
                     run_at = ?5, lease_owner = NULL, lease_expires = NULL \
                     WHERE id = ?3 AND lease_epoch = ?4 AND lease_token = ?6 AND status = 'running'",
                    Some(json_text(error)?),
                    *run_at,
                ),
                Finish::Release => (
                    "UPDATE llm_jobs SET status = 'queued', error = COALESCE(?1, error), \
                     updated_at = ?2, run_at = ?2 + ?5, attempts = MAX(attempts - 1, 0), \
                     lease_owner = NULL, lease_expires = NULL \
                     WHERE id = ?3 AND lease_epoch = ?4 AND lease_token = ?6 AND status = 'running'",
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
            fenced(r.rows_affected())
        })
    }

    fn begin_call<'a>(&'a self, lease: Lease, key: &'a str, now: i64) -> StoreFuture<'a, LlmCall> {
        Box::pin(async move {
            // One statement: the fence, the start note, and the recorded answer if any.
            // A start whose answer is recorded already is not counted.
            let row: Option<(String, i64, Option<String>)> = sqlx::query_as(
                "INSERT INTO llm_job_calls (job_id, call_key, starts, created_at) \
                 SELECT ?1, ?2, 1, ?3 WHERE EXISTS (SELECT 1 FROM llm_jobs \
                   WHERE id = ?1 AND lease_epoch = ?4 AND lease_token = ?5 AND status = 'running') \
                 ON CONFLICT (job_id, call_key) DO UPDATE SET starts = llm_job_calls.starts + \
                   CASE WHEN llm_job_calls.response IS NULL THEN 1 ELSE 0 END \
                 RETURNING call_key, starts, response",
            )
            .bind(lease.id.to_string())
            .bind(key)
            .bind(now)
            .bind(lease.epoch)
            .bind(lease.token.to_string())
            .fetch_optional(&self.pool)
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
                 VALUES (?1, ?2, 1, ?3, ?4, ?4) \
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
                "DELETE FROM llm_job_calls WHERE job_id = ?1 AND call_key IN (SELECT value FROM json_each(?2)) \
                 AND EXISTS (SELECT 1 FROM llm_jobs WHERE id = ?1 AND lease_epoch = ?3 \
                   AND lease_token = ?4 AND status = 'running')",
            )
            .bind(lease.id.to_string())
            .bind(json_text(&keys)?)
            .bind(lease.epoch)
            .bind(lease.token.to_string())
            .execute(&self.pool)
            .await
            .map_err(JobError::store)?;
            Ok(())
        })
    }

    fn calls(&self, id: JobId) -> StoreFuture<'_, Vec<LlmCall>> {
        Box::pin(async move {
            let rows: Vec<(String, i64, Option<String>)> = sqlx::query_as(
                "SELECT call_key, starts, response FROM llm_job_calls WHERE job_id = ?1 \
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
                "DELETE FROM llm_jobs WHERE expires_at IS NOT NULL AND expires_at <= ?1",
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
                 WHERE tenant = ?1 AND status = 'queued' LIMIT ?2) AS q",
            )
            .bind(tenant)
            .bind(limit_param(limit))
            .fetch_one(&self.pool)
            .await
            .map_err(JobError::store)?;
            Ok(count(n))
        })
    }
}
