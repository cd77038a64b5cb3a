//! Jobs benchmark: throughput of submit → run → stored result with a zero-latency LLM, and
//! the latency from submit to a worker starting the job while workers are idle.
//!
//! `cargo bench -p llm-tower-jobs --bench jobs` (set DATABASE_URL to include PostgreSQL).
#![allow(missing_docs, clippy::print_stdout)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use llm_tower_core::{ChatRequest, ChatResponse, LlmError, LlmResponse, Message, Tenant, boxed};
use llm_tower_jobs::{JobOptions, JobStatus, JobStore, Jobs, PostgresStore, SqliteStore};
use tokio::sync::mpsc;

/// `cargo bench` passes `--bench`; `cargo test --all-targets` does not, and then a small
/// smoke run only checks that the benchmark works.
fn full() -> bool {
    std::env::args().any(|a| a == "--bench")
}

fn throughput_jobs() -> usize {
    if full() { 2000 } else { 40 }
}

fn latency_samples() -> usize {
    if full() { 300 } else { 10 }
}

fn llm() -> llm_tower_core::BoxLlmService {
    boxed(tower::service_fn(|req: ChatRequest| async move {
        Ok::<_, LlmError>(LlmResponse::complete(ChatResponse::from_text(
            req.model, "ok",
        )))
    }))
}

async fn throughput(store: Arc<dyn JobStore>) -> f64 {
    let n = throughput_jobs();
    let jobs = Jobs::new(store);
    let (worker, handle) = jobs.worker(llm()).concurrency(16).build();
    let task = tokio::spawn(worker.run());
    let tenant = Tenant::from("bench");
    let start = Instant::now();
    let mut submitters = Vec::new();
    for s in 0..4 {
        let jobs = jobs.clone();
        let tenant = tenant.clone();
        submitters.push(tokio::spawn(async move {
            for i in 0..n / 4 {
                let req = ChatRequest::new("m", vec![Message::user(format!("{s}-{i}"))]);
                jobs.submit_chat(&tenant, req, JobOptions::default())
                    .await
                    .expect("submit");
            }
        }));
    }
    for s in submitters {
        s.await.expect("submitter");
    }
    while handle.stats().succeeded < n as u64 {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let elapsed = start.elapsed();
    handle.shutdown();
    task.await.expect("worker");
    n as f64 / elapsed.as_secs_f64()
}

struct Latency {
    from_call: Vec<Duration>,
    from_return: Vec<Duration>,
}

async fn latency(store: Arc<dyn JobStore>) -> Latency {
    let jobs = Jobs::new(store);
    let (tx, mut rx) = mpsc::unbounded_channel::<Instant>();
    jobs.register("probe", move |_ctx, _input| {
        let tx = tx.clone();
        async move {
            let _ = tx.send(Instant::now());
            Ok(())
        }
    });
    // Idle workers wait on the notification, with a long poll so polling cannot help.
    let (worker, handle) = jobs
        .worker(llm())
        .concurrency(4)
        .poll_interval(Duration::from_secs(5))
        .build();
    let task = tokio::spawn(worker.run());
    let tenant = Tenant::from("bench");
    let mut out = Latency {
        from_call: Vec::new(),
        from_return: Vec::new(),
    };
    for i in 0..latency_samples() + 20 {
        let t0 = Instant::now();
        let s = jobs
            .submit(
                &tenant,
                "probe",
                serde_json::json!(i),
                JobOptions::default(),
            )
            .await
            .expect("submit");
        let t1 = Instant::now();
        let started = rx.recv().await.expect("probe started");
        let done = jobs
            .wait(&tenant, s.job.id)
            .await
            .expect("wait")
            .expect("job");
        assert_eq!(done.status, JobStatus::Succeeded);
        if i >= 20 {
            // The first runs warm up connections and caches.
            out.from_call.push(started - t0);
            out.from_return.push(started.saturating_duration_since(t1));
        }
    }
    handle.shutdown();
    task.await.expect("worker");
    out
}

fn pct(v: &mut [Duration], p: f64) -> Duration {
    v.sort();
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v[i]
}

async fn run(name: &str, make: impl AsyncFn() -> Arc<dyn JobStore>) {
    let tput = throughput(make().await).await;
    let mut lat = latency(make().await).await;
    println!(
        "{name:<10} throughput {tput:>7.0} jobs/s ({} jobs, 4 submitters, concurrency 16)",
        throughput_jobs()
    );
    println!(
        "{name:<10} submit→start (from submit call)  p50 {:>8.3?}  p99 {:>8.3?}  max {:>8.3?}",
        pct(&mut lat.from_call, 0.5),
        pct(&mut lat.from_call, 0.99),
        pct(&mut lat.from_call, 1.0)
    );
    println!(
        "{name:<10} submit→start (from submit return) p50 {:>8.3?}  p99 {:>8.3?}  max {:>8.3?}",
        pct(&mut lat.from_return, 0.5),
        pct(&mut lat.from_return, 0.99),
        pct(&mut lat.from_return, 1.0)
    );
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        run("sqlite", async || {
            let path = std::env::temp_dir().join(format!(
                "llm-tower-jobs-bench-{}-{}.db",
                std::process::id(),
                uuid::Uuid::new_v4().simple()
            ));
            Arc::new(SqliteStore::open(&path).await.expect("sqlite")) as Arc<dyn JobStore>
        })
        .await;
        match std::env::var("DATABASE_URL") {
            Ok(url) => {
                let schemas = std::sync::Mutex::new(Vec::new());
                run("postgres", async || {
                    let schema = format!("jobs_bench_{}", uuid::Uuid::new_v4().simple());
                    schemas.lock().unwrap().push(schema.clone());
                    Arc::new(
                        PostgresStore::connect_in_schema(&url, &schema)
                            .await
                            .expect("pg"),
                    ) as Arc<dyn JobStore>
                })
                .await;
                let pool = sqlx::PgPool::connect(&url).await.expect("pg");
                for schema in schemas.into_inner().unwrap() {
                    // Names are generated above: letters, digits, underscores.
                    let sql = format!("DROP SCHEMA IF EXISTS \"{schema}\" CASCADE");
                    sqlx::query(sqlx::AssertSqlSafe(sql))
                        .execute(&pool)
                        .await
                        .expect("drop");
                }
            }
            Err(_) => println!("postgres   skipped (DATABASE_URL not set)"),
        }
    });
}
