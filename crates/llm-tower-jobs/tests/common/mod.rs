//! Shared test support: stores on temp files / unique PostgreSQL schemas, mock services.
#![allow(dead_code, unreachable_pub, missing_docs)]

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures_util::StreamExt;
use llm_tower_core::Tenant;
use llm_tower_jobs::{Job, JobId, JobStatus, JobStore, Jobs, PostgresStore, SqliteStore};

pub const PG_IGNORE: &str = "needs DATABASE_URL (run with -- --include-ignored; .ci/run sets it)";

static SEQ: AtomicU64 = AtomicU64::new(0);

/// A name unique to this process and call.
pub fn unique(prefix: &str) -> String {
    let n = SEQ.fetch_add(1, Ordering::Relaxed);
    let r = uuid::Uuid::new_v4().simple().to_string();
    format!("{prefix}_{}_{n}_{}", std::process::id(), &r[..8])
}

/// A fresh SQLite file name in the temp dir; the file (and its WAL files) are removed on
/// drop.
pub struct TempDb(PathBuf);

impl TempDb {
    pub fn new() -> Self {
        Self(std::env::temp_dir().join(format!("{}.db", unique("llm_tower_jobs_test"))))
    }
    pub fn path(&self) -> &std::path::Path {
        &self.0
    }
    pub async fn store(&self) -> Arc<dyn JobStore> {
        Arc::new(SqliteStore::open(&self.0).await.expect("open sqlite store"))
    }
}

impl Drop for TempDb {
    fn drop(&mut self) {
        for suffix in ["", "-wal", "-shm"] {
            let mut p = self.0.clone().into_os_string();
            p.push(suffix);
            let _ = std::fs::remove_file(p);
        }
    }
}

pub fn database_url() -> String {
    std::env::var("DATABASE_URL").expect(
        "DATABASE_URL is not set: this PostgreSQL test needs it \
         (e.g. postgres://postgres@127.0.0.1:5432/test; .ci/run sets it)",
    )
}

/// A PostgreSQL store in a schema of its own.
pub async fn postgres_in(schema: &str) -> Arc<dyn JobStore> {
    Arc::new(
        PostgresStore::connect_in_schema(&database_url(), schema)
            .await
            .expect("connect to PostgreSQL"),
    )
}

pub async fn postgres() -> Arc<dyn JobStore> {
    postgres_in(&unique("jobs_test")).await
}

/// Fails the test instead of hanging when something never happens.
pub async fn within<T>(what: &str, fut: impl Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(60), fut)
        .await
        .unwrap_or_else(|_| panic!("gave up waiting: {what}"))
}

pub async fn wait_done(jobs: &Jobs, tenant: &Tenant, id: JobId) -> Job {
    within("job to finish", async {
        jobs.wait(tenant, id)
            .await
            .expect("wait")
            .expect("job exists")
    })
    .await
}

/// Waits until the job reaches `status` (through its event stream).
pub async fn wait_status(jobs: &Jobs, tenant: &Tenant, id: JobId, status: JobStatus) -> Job {
    within("job status", async {
        let mut events = jobs
            .events(tenant, id)
            .await
            .expect("events")
            .expect("job exists");
        while let Some(job) = events.next().await {
            if job.status == status {
                return job;
            }
        }
        panic!("the job ended without reaching {status}")
    })
    .await
}

/// Drops a test schema (after a passing test; a failing one leaves it for inspection).
pub async fn drop_schema(schema: &str) {
    assert!(
        schema
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_')
    );
    let pool = sqlx::PgPool::connect(&database_url())
        .await
        .expect("connect");
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "DROP SCHEMA IF EXISTS \"{schema}\" CASCADE"
    )))
    .execute(&pool)
    .await
    .expect("drop schema");
    pool.close().await;
}
