//! Crash recovery for real: a worker in a child process (this test binary re-executed in
//! "worker mode") is killed with SIGKILL in the middle of a multi-step job; another worker
//! finishes the job, and every completed step ran exactly once. Step executions and LLM
//! calls are counted in a log file both processes append to.
//!
//! The window tests stop the child at a fault point of an LLM call inside a step (through
//! the worker's test hook, which blocks the task there until the kill): after the call's
//! answer is recorded (the upstream is then called once in all), and before it is (the
//! window that remains: called exactly twice).

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use common::within;
use llm_tower_core::{ChatRequest, ChatResponse, LlmError, LlmResponse, Message, Tenant, boxed};
use llm_tower_jobs::{
    FaultPoint, JobContext, JobId, JobOptions, JobStatus, JobStore, Jobs, PostgresStore,
    SqliteStore,
};
use serde_json::{Value, json};

const CHILD: &str = "LLM_TOWER_JOBS_CRASH_CHILD";
const LOG: &str = "LLM_TOWER_JOBS_CRASH_LOG";
/// In the child: the fault point to stop at (`llm_answered` or `call_recorded`) …
const FAULT: &str = "LLM_TOWER_JOBS_CRASH_FAULT";
/// … for this job's first call of `generate_script`.
const FAULT_JOB: &str = "LLM_TOWER_JOBS_CRASH_FAULT_JOB";

fn log_line(path: &Path, line: &str) {
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .expect("open log");
    // One write of the whole line: appends from concurrent jobs do not interleave.
    f.write_all(format!("{line}\n").as_bytes())
        .expect("write log");
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
                    log_line(&log, &format!("start generate_script {topic}"));
                    let req =
                        ChatRequest::new("m", vec![Message::user(format!("script: {topic}"))]);
                    let text = ctx.chat(req).await?.text();
                    log_line(&log, &format!("done generate_script {topic}"));
                    Ok(text)
                })
                .await?;
            let scenes: Vec<String> = ctx
                .step("generate_scenes", || async {
                    log_line(&log, &format!("start generate_scenes {topic}"));
                    if hang {
                        std::future::pending::<()>().await;
                    }
                    log_line(&log, &format!("done generate_scenes {topic}"));
                    Ok(script.split(' ').map(|w| format!("scene of {w}")).collect())
                })
                .await?;
            let rendered = ctx
                .step("render", || async {
                    log_line(&log, &format!("start render {topic}"));
                    log_line(&log, &format!("done render {topic}"));
                    Ok(scenes.len())
                })
                .await?;
            Ok(json!({"script": script, "scenes": scenes, "rendered": rendered}))
        }
    });
}

/// The upstream: a deterministic function that logs every call it answers (`llm <prompt>`),
/// in whichever process calls it.
fn llm(log: PathBuf) -> llm_tower_core::BoxLlmService {
    boxed(tower::service_fn(move |req: ChatRequest| {
        let log = log.clone();
        async move {
            let prompt = req.messages[0].text();
            log_line(&log, &format!("llm {prompt}"));
            Ok::<_, LlmError>(LlmResponse::complete(ChatResponse::from_text(
                req.model,
                format!("{prompt} in three acts"),
            )))
        }
    }))
}

fn fault_name(point: FaultPoint) -> &'static str {
    match point {
        FaultPoint::LlmAnswered => "llm_answered",
        FaultPoint::CallRecorded => "call_recorded",
        _ => "other",
    }
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
    let fault = std::env::var(FAULT).ok();
    rt.block_on(async move {
        let jobs = Jobs::new(open(&spec).await);
        // Without a fault point, step two hangs and the parent kills the child there.
        register(&jobs, log.clone(), fault.is_none());
        let mut builder = jobs
            .worker(llm(log.clone()))
            .concurrency(1)
            .lease(Duration::from_secs(1))
            .poll_interval(Duration::from_millis(20));
        if let Some(fault) = fault {
            let job: JobId = std::env::var(FAULT_JOB)
                .expect("fault job")
                .parse()
                .expect("job id");
            builder = builder.fault_hook(move |point, id, key| {
                if fault_name(point) == fault && id == job && key.starts_with("generate_script/0/")
                {
                    log_line(&log, &format!("fault {fault} {id}"));
                    // Stop right here until the parent's SIGKILL: nothing after this point
                    // of the call happens in this process.
                    loop {
                        std::thread::park();
                    }
                }
            });
        }
        builder.build().0.run().await;
    });
}

fn spawn_child(spec: &str, log: &Path, fault: Option<(&str, JobId)>) -> Child {
    let mut cmd = Command::new(std::env::current_exe().expect("current exe"));
    cmd.args([
        "--exact",
        "crash_child_worker",
        "--nocapture",
        "--test-threads=1",
    ])
    .env(CHILD, spec)
    .env(LOG, log)
    .env_remove(FAULT)
    .env_remove(FAULT_JOB)
    .stdout(Stdio::null());
    if let Some((point, job)) = fault {
        cmd.env(FAULT, point).env(FAULT_JOB, job.to_string());
    }
    cmd.spawn().expect("spawn the worker process")
}

/// Waits until the log has `line`, then kills the child hard (SIGKILL) and reaps it.
async fn kill_at(child: &mut Child, log: &Path, line: &str) {
    within(&format!("the child to log {line:?}"), async {
        loop {
            let text = std::fs::read_to_string(log).unwrap_or_default();
            if text.lines().any(|l| l == line) {
                break;
            }
            if let Ok(Some(status)) = child.try_wait() {
                panic!("the worker process exited early: {status}\n{text}");
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    child.kill().expect("SIGKILL the worker");
    child.wait().expect("reap the worker");
}

/// A worker in this process (the restarted one), as the child's: lease 1 s.
fn start_worker(
    jobs: &Jobs,
    log: &Path,
) -> (
    llm_tower_jobs::WorkerHandle,
    tokio::task::JoinHandle<llm_tower_jobs::WorkerStats>,
) {
    register(jobs, log.to_path_buf(), false);
    let (worker, handle) = jobs
        .worker(llm(log.to_path_buf()))
        .lease(Duration::from_secs(1))
        .poll_interval(Duration::from_millis(20))
        .build();
    (handle, tokio::spawn(worker.run()))
}

async fn submit(jobs: &Jobs, tenant: &Tenant, topic: &str, priority: i64) -> JobId {
    jobs.submit(
        tenant,
        "video_pipeline",
        json!({ "topic": topic }),
        JobOptions::default().priority(priority),
    )
    .await
    .expect("submit")
    .job
    .id
}

async fn crash_and_resume(spec: String) {
    let log = std::env::temp_dir().join(format!("{}.log", common::unique("crash_log")));
    let store = open(&spec).await;
    let jobs = Jobs::new(store);
    let tenant = Tenant::from("acme");
    let id = submit(&jobs, &tenant, "tides", 0).await;

    // Kill the child inside step two (step one recorded).
    let mut child = spawn_child(&spec, &log, None);
    kill_at(&mut child, &log, "start generate_scenes tides").await;

    let mid = jobs.get(&tenant, id).await.unwrap().unwrap();
    assert_eq!(
        mid.status,
        JobStatus::Running,
        "the dead worker still holds the lease"
    );
    assert_eq!(jobs.store().steps(id).await.unwrap().len(), 1);

    // A new worker takes the job over once the dead worker's lease (1 s) expires.
    let (handle, task) = start_worker(&jobs, &log);
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
    assert_eq!(count(&text, "start generate_script tides"), 1, "{text}");
    assert_eq!(count(&text, "done generate_script tides"), 1, "{text}");
    assert_eq!(count(&text, "llm script: tides"), 1, "{text}");
    // Step two was interrupted once and completed once.
    assert_eq!(count(&text, "start generate_scenes tides"), 2, "{text}");
    assert_eq!(count(&text, "done generate_scenes tides"), 1, "{text}");
    assert_eq!(count(&text, "done render tides"), 1, "{text}");
    let _ = std::fs::remove_file(&log);
}

/// Kills the child at `point` of step one's LLM call of one job (the first claimed; two
/// more wait in the queue, and one more is submitted while the dead worker holds its
/// lease), restarts a worker, and checks that every job succeeds and how often the
/// upstream was called for each step.
async fn crash_in_the_window(spec: String, point: FaultPoint) {
    let name = fault_name(point);
    let log = std::env::temp_dir().join(format!("{}.log", common::unique("crash_log")));
    let jobs = Jobs::new(open(&spec).await);
    let tenant = Tenant::from("acme");
    // The highest priority: the child (one job at a time) claims it first.
    let target = submit(&jobs, &tenant, "tides", 10).await;
    let mut ids = vec![
        (target, "tides"),
        (submit(&jobs, &tenant, "waves", 0).await, "waves"),
        (submit(&jobs, &tenant, "reefs", 0).await, "reefs"),
    ];

    let mut child = spawn_child(&spec, &log, Some((name, target)));
    kill_at(&mut child, &log, &format!("fault {name} {target}")).await;

    // The state the crash left: step one not recorded; the call's answer recorded or not.
    let mid = jobs.get(&tenant, target).await.unwrap().unwrap();
    assert_eq!(mid.status, JobStatus::Running, "{mid:?}");
    assert!(jobs.store().steps(target).await.unwrap().is_empty());
    let calls = jobs.store().calls(target).await.unwrap();
    assert_eq!(calls.len(), 1, "{calls:?}");
    assert!(calls[0].key.starts_with("generate_script/0/"), "{calls:?}");
    assert_eq!(calls[0].starts, 1);
    assert_eq!(
        calls[0].response.is_some(),
        point == FaultPoint::CallRecorded,
        "{calls:?}"
    );
    let text = std::fs::read_to_string(&log).unwrap();
    assert_eq!(count(&text, "llm script: tides"), 1, "{text}");
    assert_eq!(count(&text, "done generate_script tides"), 0, "{text}");

    // Accepted while the dead worker still holds its lease.
    ids.push((submit(&jobs, &tenant, "dunes", 0).await, "dunes"));

    let (handle, task) = start_worker(&jobs, &log);
    let mut done = Vec::new();
    for (id, topic) in &ids {
        done.push((common::wait_done(&jobs, &tenant, *id).await, *topic));
    }
    handle.shutdown();
    let stats = task.await.unwrap();

    let text = std::fs::read_to_string(&log).unwrap();
    // Every accepted job ended, and succeeded with its own result.
    for (job, topic) in &done {
        assert_eq!(job.status, JobStatus::Succeeded, "{job:?}");
        let result = job.result.as_ref().unwrap();
        assert_eq!(result["script"], format!("script: {topic} in three acts"));
        assert_eq!(result["rendered"], 5);
        // Every other step called the upstream (or ran) exactly once.
        assert_eq!(
            count(&text, &format!("done generate_script {topic}")),
            1,
            "{text}"
        );
        assert_eq!(
            count(&text, &format!("done generate_scenes {topic}")),
            1,
            "{text}"
        );
        assert_eq!(count(&text, &format!("done render {topic}")), 1, "{text}");
        if *topic != "tides" {
            assert_eq!(count(&text, &format!("llm script: {topic}")), 1, "{text}");
            assert_eq!(job.attempts, 1, "{job:?}");
        }
    }
    let target_job = &done[0].0;
    assert_eq!(target_job.attempts, 2, "{target_job:?}");
    // Step one's body ran again on the second attempt ...
    assert_eq!(count(&text, "start generate_script tides"), 2, "{text}");
    // ... and its LLM call was paid once when the answer was recorded before the crash,
    // twice when the crash came between the answer and its record.
    let calls = jobs.store().calls(target).await.unwrap();
    assert_eq!(calls.len(), 1, "{calls:?}");
    assert!(calls[0].response.is_some(), "{calls:?}");
    match point {
        FaultPoint::CallRecorded => {
            assert_eq!(count(&text, "llm script: tides"), 1, "{text}");
            assert_eq!(calls[0].starts, 1);
            assert_eq!(
                (stats.llm_calls_replayed, stats.llm_calls_repeated),
                (1, 0),
                "{stats:?}"
            );
        }
        _ => {
            assert_eq!(count(&text, "llm script: tides"), 2, "{text}");
            assert_eq!(calls[0].starts, 2);
            assert_eq!(
                (stats.llm_calls_replayed, stats.llm_calls_repeated),
                (0, 1),
                "{stats:?}"
            );
        }
    }
    // The restarted worker called the upstream once per job, plus the repeat.
    let repeats = u64::from(point == FaultPoint::LlmAnswered);
    assert_eq!(stats.llm_calls, 3 + repeats, "{stats:?}");
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_killed_after_the_answer_is_recorded_calls_the_llm_once() {
    let db = common::TempDb::new();
    crash_in_the_window(
        format!("sqlite:{}", db.path().display()),
        FaultPoint::CallRecorded,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_killed_before_the_answer_is_recorded_calls_the_llm_twice() {
    let db = common::TempDb::new();
    crash_in_the_window(
        format!("sqlite:{}", db.path().display()),
        FaultPoint::LlmAnswered,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs DATABASE_URL (run with -- --include-ignored; .ci/run sets it)"]
async fn postgres_killed_after_the_answer_is_recorded_calls_the_llm_once() {
    let _ = common::database_url();
    let schema = common::unique("jobs_window");
    crash_in_the_window(format!("pg:{schema}"), FaultPoint::CallRecorded).await;
    common::drop_schema(&schema).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs DATABASE_URL (run with -- --include-ignored; .ci/run sets it)"]
async fn postgres_killed_before_the_answer_is_recorded_calls_the_llm_twice() {
    let _ = common::database_url();
    let schema = common::unique("jobs_window");
    crash_in_the_window(format!("pg:{schema}"), FaultPoint::LlmAnswered).await;
    common::drop_schema(&schema).await;
}
