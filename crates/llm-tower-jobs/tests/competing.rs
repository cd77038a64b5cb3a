//! Two workers (two "replicas": separate `Jobs` handles, separate connection pools)
//! competing for one queue never run a job twice.

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::within;
use llm_tower_core::{ChatRequest, ChatResponse, LlmError, LlmResponse, Tenant, boxed};
use llm_tower_jobs::{JobId, JobOptions, JobStatus, JobStore, Jobs};
use serde_json::json;

type Runs = Arc<Mutex<HashMap<JobId, Vec<&'static str>>>>;

fn replica(store: Arc<dyn JobStore>, name: &'static str, runs: Runs) -> Jobs {
    let jobs = Jobs::new(store);
    jobs.register("count", move |ctx, _input| {
        let runs = runs.clone();
        async move {
            // Record the execution, then yield so the other worker has every chance to
            // claim the same job meanwhile.
            runs.lock().unwrap().entry(ctx.id()).or_default().push(name);
            tokio::task::yield_now().await;
            let v: u32 = ctx.step("only", || async { Ok(1) }).await?;
            Ok(v)
        }
    });
    jobs
}

fn llm() -> llm_tower_core::BoxLlmService {
    boxed(tower::service_fn(|req: ChatRequest| async move {
        Ok::<_, LlmError>(LlmResponse::complete(ChatResponse::from_text(
            req.model, "x",
        )))
    }))
}

async fn compete(a: Arc<dyn JobStore>, b: Arc<dyn JobStore>) {
    const N: usize = 300;
    let runs: Runs = Arc::default();
    let ja = replica(a, "a", runs.clone());
    let jb = replica(b, "b", runs.clone());
    let mut workers = Vec::new();
    for jobs in [&ja, &jb] {
        let (worker, handle) = jobs
            .worker(llm())
            .concurrency(8)
            .poll_interval(Duration::from_millis(5))
            .build();
        workers.push((handle, tokio::spawn(worker.run())));
    }
    let tenant = Tenant::from("t");
    let mut ids = Vec::new();
    for i in 0..N {
        // Submit through both replicas.
        let jobs = if i % 2 == 0 { &ja } else { &jb };
        let s = jobs
            .submit(&tenant, "count", json!({"i": i}), JobOptions::default())
            .await
            .unwrap();
        ids.push(s.job.id);
    }
    within("all jobs to finish", async {
        for id in &ids {
            let done = ja.wait(&tenant, *id).await.unwrap().unwrap();
            assert_eq!(done.status, JobStatus::Succeeded);
            assert_eq!(done.attempts, 1);
        }
    })
    .await;
    let mut stats = Vec::new();
    for (handle, task) in workers {
        handle.shutdown();
        stats.push(task.await.unwrap());
    }
    let runs = runs.lock().unwrap();
    assert_eq!(runs.len(), N);
    for (id, who) in runs.iter() {
        assert_eq!(who.len(), 1, "job {id} ran {} times: {who:?}", who.len());
    }
    assert_eq!(stats[0].succeeded + stats[1].succeeded, N as u64);
    assert_eq!(stats[0].lease_lost + stats[1].lease_lost, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs DATABASE_URL (run with -- --include-ignored; .ci/run sets it)"]
async fn postgres_two_workers_never_run_a_job_twice() {
    let schema = common::unique("jobs_compete");
    let a = common::postgres_in(&schema).await;
    let b = common::postgres_in(&schema).await;
    compete(a, b).await;
    common::drop_schema(&schema).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_two_workers_never_run_a_job_twice() {
    let db = common::TempDb::new();
    let (a, b) = (db.store().await, db.store().await);
    compete(a, b).await;
}
