//! Crash recovery for real: a worker in a child process (this test binary re-executed in
//! "worker mode") is killed with SIGKILL in the middle of a multi-step job; another worker
//! finishes the job, and every completed step ran exactly once. Step executions are
//! counted in a log file both processes append to.

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use common::within;
use llm_tower_core::{ChatRequest, ChatResponse, LlmError, LlmResponse, Message, Tenant, boxed};
use llm_tower_jobs::{
    JobContext, JobOptions, JobStatus, JobStore, Jobs, PostgresStore, SqliteStore,
};
use serde_json::{Value, json};

const CHILD: &str = "LLM_TOWER_JOBS_CRASH_CHILD";
const LOG: &str = "LLM_TOWER_JOBS_CRASH_LOG";

fn log_line(path: &Path, line: &str) {
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .expect("open log");
    writeln!(f, "{line}").expect("write log");
    f.sync_all().expect("sync log");
}

fn count(log: &str, line: &str) -> usize {
    log.lines().filter(|l| *l == line).count()
}

/// The job: three durable steps; the LLM is a deterministic function. With `hang`, the
/// second step never finishes (the child is killed there).
fn register(jobs: &Jobs, log: PathBuf, hang: bool) {
    jobs.register("video_pipeline", move |ctx: JobContext, input: Value| {
        let log = log.clone();
        async move {
            ctx.set_total_steps(3);
            let topic = input["topic"].as_str().unwrap_or_default().to_owned();
            let script: String = ctx
                .step("generate_script", || async {
                    log_line(&log, "start generate_script");
                    let req =
                        ChatRequest::new("m", vec![Message::user(format!("script: {topic}"))]);
                    let text = ctx.chat(req).await?.text();
                    log_line(&log, "done generate_script");
                    Ok(text)
                })
                .await?;
            let scenes: Vec<String> = ctx
                .step("generate_scenes", || async {
                    log_line(&log, "start generate_scenes");
                    if hang {
                        std::future::pending::<()>().await;
                    }
                    log_line(&log, "done generate_scenes");
                    Ok(script.split(' ').map(|w| format!("scene of {w}")).collect())
                })
                .await?;
            let rendered = ctx
                .step("render", || async {
                    log_line(&log, "start render");
                    log_line(&log, "done render");
                    Ok(scenes.len())
                })
                .await?;
            Ok(json!({"script": script, "scenes": scenes, "rendered": rendered}))
        }
    });
}

fn llm() -> llm_tower_core::BoxLlmService {
    boxed(tower::service_fn(|req: ChatRequest| async move {
        let prompt = req.messages[0].text();
        Ok::<_, LlmError>(LlmResponse::complete(ChatResponse::from_text(
            req.model,
            format!("{prompt} in three acts"),
        )))
    }))
}

async fn open(spec: &str) -> Arc<dyn JobStore> {
    match spec.split_once(':') {
        Some(("sqlite", path)) => Arc::new(SqliteStore::open(path).await.expect("sqlite")),
        Some(("pg", schema)) => Arc::new(
            PostgresStore::connect_in_schema(&common::database_url(), schema)
                .await
                .expect("postgres"),
        ),
        _ => panic!("bad store spec {spec}"),
    }
}

/// Worker mode: does nothing in a normal test run; in the child it runs a worker forever.
#[test]
fn crash_child_worker() {
    let Ok(spec) = std::env::var(CHILD) else {
        return;
    };
    let log = PathBuf::from(std::env::var(LOG).expect("log path"));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async move {
        let jobs = Jobs::new(open(&spec).await);
        register(&jobs, log, true);
        let (worker, _handle) = jobs
            .worker(llm())
            .lease(Duration::from_secs(1))
            .poll_interval(Duration::from_millis(20))
            .build();
        worker.run().await;
    });
}

async fn crash_and_resume(spec: String) {
    let log = std::env::temp_dir().join(format!("{}.log", common::unique("crash_log")));
    let store = open(&spec).await;
    let jobs = Jobs::new(store);
    let tenant = Tenant::from("acme");
    let submitted = jobs
        .submit(
            &tenant,
            "video_pipeline",
            json!({"topic": "tides"}),
            JobOptions::default(),
        )
        .await
        .expect("submit");
    let id = submitted.job.id;

    let mut child = Command::new(std::env::current_exe().expect("current exe"))
        .args([
            "--exact",
            "crash_child_worker",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD, &spec)
        .env(LOG, &log)
        .stdout(Stdio::null())
        .spawn()
        .expect("spawn the worker process");

    // Wait until the child is inside step two (step one recorded), then kill it hard.
    within("the child to reach step two", async {
        loop {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            if text.contains("start generate_scenes") {
                break;
            }
            if let Ok(Some(status)) = child.try_wait() {
                panic!("the worker process exited early: {status}");
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    child.kill().expect("SIGKILL the worker");
    child.wait().expect("reap the worker");

    let mid = jobs.get(&tenant, id).await.unwrap().unwrap();
    assert_eq!(
        mid.status,
        JobStatus::Running,
        "the dead worker still holds the lease"
    );
    assert_eq!(jobs.store().steps(id).await.unwrap().len(), 1);

    // A new worker takes the job over once the dead worker's lease (1 s) expires.
    register(&jobs, log.clone(), false);
    let (worker, handle) = jobs
        .worker(llm())
        .lease(Duration::from_secs(1))
        .poll_interval(Duration::from_millis(20))
        .build();
    let task = tokio::spawn(worker.run());
    let done = common::wait_done(&jobs, &tenant, id).await;
    handle.shutdown();
    task.await.unwrap();

    assert_eq!(done.status, JobStatus::Succeeded, "{done:?}");
    assert_eq!(done.attempts, 2);
    let result = done.result.unwrap();
    assert_eq!(result["script"], "script: tides in three acts");
    assert_eq!(result["rendered"], 5);

    let text = std::fs::read_to_string(&log).unwrap();
    // Step one completed before the crash and was replayed, not run again.
    assert_eq!(count(&text, "start generate_script"), 1, "{text}");
    assert_eq!(count(&text, "done generate_script"), 1, "{text}");
    // Step two was interrupted once and completed once.
    assert_eq!(count(&text, "start generate_scenes"), 2, "{text}");
    assert_eq!(count(&text, "done generate_scenes"), 1, "{text}");
    assert_eq!(count(&text, "done render"), 1, "{text}");
    let _ = std::fs::remove_file(&log);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_worker_killed_mid_job_resumes_without_rerunning_steps() {
    let db = common::TempDb::new();
    crash_and_resume(format!("sqlite:{}", db.path().display())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs DATABASE_URL (run with -- --include-ignored; .ci/run sets it)"]
async fn postgres_worker_killed_mid_job_resumes_without_rerunning_steps() {
    let _ = common::database_url();
    let schema = common::unique("jobs_crash");
    crash_and_resume(format!("pg:{schema}")).await;
    common::drop_schema(&schema).await;
}
