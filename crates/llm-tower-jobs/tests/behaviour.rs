//! The behavioural suite, run against both stores (SQLite always; PostgreSQL when
//! DATABASE_URL is set, ignored otherwise).

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{wait_done, wait_status, within};
use futures_util::StreamExt;
use llm_tower_core::{
    BoxLlmService, ChatRequest, ChatResponse, LlmError, LlmResponse, Message, Tenant, boxed,
};
use llm_tower_jobs::{
    Finish, JobError, JobId, JobOptions, JobStatus, JobStore, Jobs, NewJob, WorkerStats,
};
use llm_tower_test::{MockLlm, Step};
use serde_json::json;

type Store = Arc<dyn JobStore>;

fn req(text: &str) -> ChatRequest {
    ChatRequest::new("mock-model", vec![Message::user(text)])
}

fn fast() -> JobOptions {
    JobOptions::default().backoff(Duration::from_millis(1))
}

fn tenant() -> Tenant {
    Tenant::from("acme")
}

/// Starts a worker; returns a function that stops it and returns its counters.
fn start(
    jobs: &Jobs,
    service: BoxLlmService,
) -> (
    llm_tower_jobs::WorkerHandle,
    tokio::task::JoinHandle<WorkerStats>,
) {
    let (worker, handle) = jobs
        .worker(service)
        .poll_interval(Duration::from_millis(20))
        .lease(Duration::from_secs(5))
        .build();
    (handle, tokio::spawn(worker.run()))
}

async fn stop(
    (handle, task): (
        llm_tower_jobs::WorkerHandle,
        tokio::task::JoinHandle<WorkerStats>,
    ),
) -> WorkerStats {
    handle.shutdown();
    within("worker to stop", task).await.expect("worker task")
}

async fn chat_job_succeeds(store: Store) {
    let jobs = Jobs::new(store);
    let mock = MockLlm::new("m").then(Step::reply("Paris"));
    let w = start(&jobs, boxed(mock.clone()));
    let s = jobs
        .submit_chat(
            &tenant(),
            req("Capital of France?").with_task_type("qa"),
            fast(),
        )
        .await
        .unwrap();
    assert!(s.created);
    assert_eq!(s.job.status, JobStatus::Queued);
    let done = wait_done(&jobs, &tenant(), s.job.id).await;
    assert_eq!(done.status, JobStatus::Succeeded);
    assert_eq!(done.attempts, 1);
    assert_eq!(
        done.result.as_ref().unwrap()["choices"][0]["message"]["content"],
        "Paris"
    );
    assert!(done.started_at.is_some() && done.finished_at.is_some());
    assert_eq!(mock.calls(), 1);
    // The worker passed tenant and task type on to the stack.
    let seen = mock.last_request().unwrap();
    assert_eq!(seen.tenant().unwrap().as_str(), "acme");
    assert_eq!(seen.task_type().unwrap().as_str(), "qa");
    let stats = stop(w).await;
    assert_eq!(stats.succeeded, 1);
}

async fn transient_errors_are_retried(store: Store) {
    let jobs = Jobs::new(store);
    let mock = MockLlm::new("m")
        .then(Step::error(LlmError::unavailable("503")))
        .then(Step::error(LlmError::rate_limited("429")))
        .then(Step::reply("ok"));
    let w = start(&jobs, boxed(mock.clone()));
    let s = jobs
        .submit_chat(&tenant(), req("hi"), fast().max_attempts(3))
        .await
        .unwrap();
    let done = wait_done(&jobs, &tenant(), s.job.id).await;
    assert_eq!(done.status, JobStatus::Succeeded);
    assert_eq!(done.attempts, 3);
    assert_eq!(mock.calls(), 3);
    let stats = stop(w).await;
    assert_eq!(stats.retried, 2);
}

async fn bad_request_is_not_retried(store: Store) {
    let jobs = Jobs::new(store);
    let mock = MockLlm::new("m").otherwise(Step::error(LlmError::bad_request("bad")));
    let w = start(&jobs, boxed(mock.clone()));
    let s = jobs
        .submit_chat(&tenant(), req("hi"), fast().max_attempts(5))
        .await
        .unwrap();
    let done = wait_done(&jobs, &tenant(), s.job.id).await;
    assert_eq!(done.status, JobStatus::Failed);
    assert_eq!(done.attempts, 1);
    let err = done.error.unwrap();
    assert_eq!(err.kind, "bad_request");
    assert_eq!(err.status, 400);
    assert_eq!(mock.calls(), 1);
    stop(w).await;
}

async fn attempts_are_capped(store: Store) {
    let jobs = Jobs::new(store);
    let mock = MockLlm::new("m").otherwise(Step::error(LlmError::overloaded("busy")));
    let w = start(&jobs, boxed(mock.clone()));
    let s = jobs
        .submit_chat(&tenant(), req("hi"), fast().max_attempts(2))
        .await
        .unwrap();
    let done = wait_done(&jobs, &tenant(), s.job.id).await;
    assert_eq!(done.status, JobStatus::Failed);
    assert_eq!(done.attempts, 2);
    assert_eq!(done.error.unwrap().kind, "overloaded");
    assert_eq!(mock.calls(), 2);
    stop(w).await;
}

async fn attempt_timeout_fails_the_job(store: Store) {
    let jobs = Jobs::new(store);
    let mock = MockLlm::new("m").otherwise(Step::hang());
    let w = start(&jobs, boxed(mock.clone()));
    let s = jobs
        .submit_chat(
            &tenant(),
            req("hi"),
            fast().max_attempts(1).timeout(Duration::from_millis(50)),
        )
        .await
        .unwrap();
    let done = wait_done(&jobs, &tenant(), s.job.id).await;
    assert_eq!(done.status, JobStatus::Failed);
    assert_eq!(done.error.unwrap().kind, "timeout");
    stop(w).await;
}

async fn invalid_chat_request_is_refused(store: Store) {
    let jobs = Jobs::new(store);
    let err = jobs
        .submit_chat(&tenant(), ChatRequest::new("m", vec![]), fast())
        .await
        .unwrap_err();
    assert!(matches!(err, JobError::BadRequest(_)), "{err:?}");
    assert_eq!(err.status(), 400);
}

async fn idempotency_key_replays_and_conflicts(store: Store) {
    let jobs = Jobs::new(store);
    let mock = MockLlm::new("m").otherwise(Step::reply("once"));
    let opts = fast().idempotency_key("order-42");
    let first = jobs
        .submit_chat(&tenant(), req("hi"), opts.clone())
        .await
        .unwrap();
    let again = jobs
        .submit_chat(&tenant(), req("hi"), opts.clone())
        .await
        .unwrap();
    assert!(first.created);
    assert!(!again.created);
    assert_eq!(first.job.id, again.job.id);

    let w = start(&jobs, boxed(mock.clone()));
    wait_done(&jobs, &tenant(), first.job.id).await;
    // After completion the replay carries the result, and the LLM is not called again.
    let replay = jobs
        .submit_chat(&tenant(), req("hi"), opts.clone())
        .await
        .unwrap();
    assert!(!replay.created);
    assert_eq!(replay.job.status, JobStatus::Succeeded);
    assert_eq!(
        replay.job.result.unwrap()["choices"][0]["message"]["content"],
        "once"
    );

    let conflict = jobs
        .submit_chat(&tenant(), req("something else"), opts.clone())
        .await
        .unwrap_err();
    assert!(matches!(conflict, JobError::Conflict(_)), "{conflict:?}");
    assert_eq!(conflict.status(), 409);
    assert_eq!(conflict.to_openai_json()["error"]["type"], "conflict_error");

    // Keys are per tenant.
    let other = jobs
        .submit_chat(&Tenant::from("globex"), req("hi"), opts)
        .await
        .unwrap();
    assert!(other.created);
    assert_ne!(other.job.id, first.job.id);
    wait_done(&jobs, &Tenant::from("globex"), other.job.id).await;
    assert_eq!(mock.calls(), 2);
    stop(w).await;
}

/// A service whose calls hang until dropped; counts starts and drops.
fn hanging_service(started: Arc<AtomicUsize>, dropped: Arc<AtomicUsize>) -> BoxLlmService {
    struct OnDrop(Arc<AtomicUsize>);
    impl Drop for OnDrop {
        fn drop(&mut self) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }
    boxed(tower::service_fn(move |_req: ChatRequest| {
        let started = started.clone();
        let guard = OnDrop(dropped.clone());
        async move {
            started.fetch_add(1, Ordering::SeqCst);
            let _guard = guard;
            std::future::pending::<()>().await;
            Ok::<LlmResponse, LlmError>(LlmResponse::complete(ChatResponse::from_text("m", "")))
        }
    }))
}

async fn cancel_while_running_drops_the_call(store: Store) {
    let jobs = Jobs::new(store);
    let started = Arc::new(AtomicUsize::new(0));
    let dropped = Arc::new(AtomicUsize::new(0));
    let w = start(&jobs, hanging_service(started.clone(), dropped.clone()));
    let s = jobs
        .submit_chat(&tenant(), req("hi"), fast())
        .await
        .unwrap();
    wait_status(&jobs, &tenant(), s.job.id, JobStatus::Running).await;
    // Cancel while the call is in flight.
    within("the LLM call to start", async {
        while started.load(Ordering::SeqCst) == 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    let cancelled = jobs.cancel(&tenant(), s.job.id).await.unwrap().unwrap();
    assert_eq!(cancelled.status, JobStatus::Cancelled);
    within("the LLM call to be dropped", async {
        while dropped.load(Ordering::SeqCst) == 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    let stats = stop(w).await;
    assert_eq!(stats.cancelled, 1);
    let job = jobs.get(&tenant(), s.job.id).await.unwrap().unwrap();
    assert_eq!(job.status, JobStatus::Cancelled);
    assert!(job.finished_at.is_some());
    // Cancelling again returns the final state unchanged.
    let again = jobs.cancel(&tenant(), s.job.id).await.unwrap().unwrap();
    assert_eq!(again.status, JobStatus::Cancelled);
}

async fn cancelled_queued_job_never_runs(store: Store) {
    let jobs = Jobs::new(store);
    let mock = MockLlm::new("m").otherwise(Step::reply("x"));
    let s = jobs.submit_chat(&tenant(), req("a"), fast()).await.unwrap();
    let c = jobs.cancel(&tenant(), s.job.id).await.unwrap().unwrap();
    assert_eq!(c.status, JobStatus::Cancelled);
    let w = start(&jobs, boxed(mock.clone()));
    let other = jobs.submit_chat(&tenant(), req("b"), fast()).await.unwrap();
    wait_done(&jobs, &tenant(), other.job.id).await;
    assert_eq!(mock.calls(), 1);
    assert_eq!(
        jobs.get(&tenant(), s.job.id).await.unwrap().unwrap().status,
        JobStatus::Cancelled
    );
    stop(w).await;
}

async fn tenants_are_isolated(store: Store) {
    let jobs = Jobs::new(store);
    let s = jobs.submit_chat(&tenant(), req("a"), fast()).await.unwrap();
    let other = Tenant::from("globex");
    assert!(jobs.get(&other, s.job.id).await.unwrap().is_none());
    assert!(jobs.cancel(&other, s.job.id).await.unwrap().is_none());
    assert!(jobs.events(&other, s.job.id).await.unwrap().is_none());
    assert!(jobs.get(&tenant(), JobId::new()).await.unwrap().is_none());
    // The other tenant's cancel changed nothing.
    assert_eq!(
        jobs.get(&tenant(), s.job.id).await.unwrap().unwrap().status,
        JobStatus::Queued
    );
}

async fn lease_expiry_and_fencing(store: Store) {
    let t0 = 1_000_000;
    let kinds = vec!["chat".to_owned()];
    let job = NewJob::new("acme", "chat", json!({"request": {}}));
    let id = job.id;
    store.submit(job, t0).await.unwrap();

    let (a_job, a) = store.claim(&kinds, "A", t0, 1000).await.unwrap().unwrap();
    assert_eq!(a_job.id, id);
    assert_eq!(a_job.attempts, 1);
    // Held: nobody else gets it.
    assert!(
        store
            .claim(&kinds, "B", t0 + 500, 1000)
            .await
            .unwrap()
            .is_none()
    );
    // A renews, pushing the expiry out.
    assert!(store.renew(a, t0 + 600, 1000).await.unwrap());
    assert!(
        store
            .claim(&kinds, "B", t0 + 1500, 1000)
            .await
            .unwrap()
            .is_none()
    );
    // A dies; after the lease, B takes over with a new epoch.
    let (b_job, b) = store
        .claim(&kinds, "B", t0 + 1601, 1000)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(b_job.attempts, 2);
    assert!(b.epoch > a.epoch);
    // A's late writes are all rejected.
    assert!(!store.renew(a, t0 + 1700, 1000).await.unwrap());
    let r = store.record_step(a, "s", &json!(1), t0 + 1700).await;
    assert!(matches!(r, Err(JobError::LeaseLost)), "{r:?}");
    let r = store
        .finish(a, Finish::Succeeded(json!("stale")), t0 + 1700, 1000)
        .await;
    assert!(matches!(r, Err(JobError::LeaseLost)), "{r:?}");
    assert!(store.steps(id).await.unwrap().is_empty());
    // B's writes go through.
    store
        .record_step(b, "s", &json!(2), t0 + 1700)
        .await
        .unwrap();
    store
        .finish(b, Finish::Succeeded(json!("fresh")), t0 + 1800, 1000)
        .await
        .unwrap();
    let done = store.get("acme", id, t0 + 1800).await.unwrap().unwrap();
    assert_eq!(done.status, JobStatus::Succeeded);
    assert_eq!(done.result, Some(json!("fresh")));
    assert_eq!(
        store.steps(id).await.unwrap(),
        vec![("s".to_owned(), json!(2))]
    );
}

async fn priority_and_kinds_decide_the_claim(store: Store) {
    let t0 = 2_000_000;
    let low = NewJob::new("t", "chat", json!(1)).with_options(JobOptions::default().priority(1));
    let high = NewJob::new("t", "chat", json!(2)).with_options(JobOptions::default().priority(9));
    let other =
        NewJob::new("t", "pipeline", json!(3)).with_options(JobOptions::default().priority(99));
    let (low_id, high_id) = (low.id, high.id);
    store.submit(low, t0).await.unwrap();
    store.submit(high, t0).await.unwrap();
    store.submit(other, t0).await.unwrap();
    let kinds = vec!["chat".to_owned()];
    let (first, _) = store.claim(&kinds, "w", t0, 1000).await.unwrap().unwrap();
    let (second, _) = store.claim(&kinds, "w", t0, 1000).await.unwrap().unwrap();
    assert_eq!(first.id, high_id);
    assert_eq!(second.id, low_id);
    // A worker never claims a kind it has no handler for.
    assert!(store.claim(&kinds, "w", t0, 1000).await.unwrap().is_none());
    // A retry waits for its run_at.
    let job = NewJob::new("t", "chat", json!(4));
    store.submit(job, t0).await.unwrap();
    let (_, lease) = store.claim(&kinds, "w", t0, 1000).await.unwrap().unwrap();
    let error = (&LlmError::unavailable("x")).into();
    store
        .finish(
            lease,
            Finish::Retry {
                error,
                run_at: t0 + 500,
            },
            t0,
            1000,
        )
        .await
        .unwrap();
    assert!(
        store
            .claim(&kinds, "w", t0 + 499, 1000)
            .await
            .unwrap()
            .is_none()
    );
    let (again, _) = store
        .claim(&kinds, "w", t0 + 500, 1000)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(again.attempts, 2);
    assert_eq!(again.error.unwrap().kind, "unavailable");
}

async fn retention_expires_finished_jobs(store: Store) {
    let t0 = 3_000_000;
    let kinds = vec!["chat".to_owned()];
    let job =
        NewJob::new("t", "chat", json!(1)).with_options(JobOptions::default().idempotency_key("k"));
    let id = job.id;
    store.submit(job, t0).await.unwrap();
    let running = NewJob::new("t", "chat", json!(2));
    let running_id = running.id;
    let (_, lease) = store
        .claim(&kinds, "w", t0, 100_000)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(lease.id, id);
    store.submit(running, t0).await.unwrap();
    store
        .finish(lease, Finish::Succeeded(json!("r")), t0 + 10, 1000)
        .await
        .unwrap();
    let done = store.get("t", id, t0 + 500).await.unwrap().unwrap();
    assert_eq!(done.expires_at, Some(t0 + 1010));
    // Past the retention the job is gone, even before the purge.
    assert!(store.get("t", id, t0 + 1010).await.unwrap().is_none());
    // The key is free again once its job expired.
    let again = NewJob::new("t", "chat", json!("new body"))
        .with_options(JobOptions::default().idempotency_key("k"));
    let resubmitted = store.submit(again, t0 + 2000).await.unwrap();
    assert!(resubmitted.created);
    assert_ne!(resubmitted.job.id, id);
    // The purge removes expired jobs only.
    let (_, lease2) = store
        .claim(&kinds, "w", t0 + 2000, 100_000)
        .await
        .unwrap()
        .unwrap();
    store
        .finish(
            lease2,
            Finish::Failed((&LlmError::bad_request("x")).into()),
            t0 + 2000,
            1000,
        )
        .await
        .unwrap();
    assert_eq!(store.purge_expired(t0 + 2500).await.unwrap(), 0);
    assert_eq!(store.purge_expired(t0 + 3000).await.unwrap(), 1);
    let kept = if lease2.id == running_id {
        resubmitted.job.id
    } else {
        running_id
    };
    assert!(store.get("t", kept, t0 + 3000).await.unwrap().is_some());
    assert!(store.get("t", lease2.id, 0).await.unwrap().is_none());
}

async fn retention_through_jobs(store: Store) {
    let jobs = Jobs::builder(store).retention(Duration::ZERO).build();
    let mock = MockLlm::new("m").otherwise(Step::reply("x"));
    let s = jobs.submit_chat(&tenant(), req("a"), fast()).await.unwrap();
    let mut events = jobs.events(&tenant(), s.job.id).await.unwrap().unwrap();
    // The worker starts after the subscription: the job cannot vanish before it.
    let w = start(&jobs, boxed(mock));
    // With zero retention the job vanishes once finished: the stream ends.
    within("events to end", async {
        while events.next().await.is_some() {}
    })
    .await;
    assert!(jobs.get(&tenant(), s.job.id).await.unwrap().is_none());
    stop(w).await;
    jobs.purge_expired().await.unwrap();
}

/// A three-step pipeline whose middle step fails once with a retryable error: the retry
/// replays step one from its record and runs only the unfinished steps.
async fn recorded_steps_are_replayed_on_retry(store: Store) {
    let jobs = Jobs::new(store);
    let runs: Arc<Mutex<HashMap<String, usize>>> = Arc::default();
    let r = runs.clone();
    jobs.register("pipeline", move |ctx, input| {
        let runs = r.clone();
        async move {
            let count = |name: &str| {
                *runs.lock().unwrap().entry(name.to_owned()).or_default() += 1;
            };
            ctx.set_total_steps(3);
            let topic = input["topic"].as_str().unwrap_or_default().to_owned();
            let script: String = ctx
                .step("generate_script", || async {
                    count("generate_script");
                    let resp = ctx
                        .chat(ChatRequest::new("m", vec![Message::user(topic.clone())]))
                        .await?;
                    Ok(resp.text())
                })
                .await?;
            let scenes: Vec<String> = ctx
                .step("generate_scenes", || async {
                    count("generate_scenes");
                    if ctx.attempt() == 1 {
                        return Err(LlmError::unavailable("flaky"));
                    }
                    Ok(script.split(' ').map(str::to_owned).collect())
                })
                .await?;
            let n = ctx
                .step("render", || async {
                    count("render");
                    Ok(scenes.len())
                })
                .await?;
            Ok(json!({"script": script, "scenes": scenes, "n": n}))
        }
    });
    let mock = MockLlm::new("m").then(Step::reply("one two three"));
    let w = start(&jobs, boxed(mock.clone()));
    let s = jobs
        .submit(&tenant(), "pipeline", json!({"topic": "tides"}), fast())
        .await
        .unwrap();
    let mut events = jobs.events(&tenant(), s.job.id).await.unwrap().unwrap();
    let mut seen = Vec::new();
    within("pipeline", async {
        while let Some(job) = events.next().await {
            seen.push(job);
        }
    })
    .await;
    let done = seen.last().unwrap();
    assert_eq!(done.status, JobStatus::Succeeded, "{done:?}");
    assert_eq!(done.attempts, 2);
    assert_eq!(done.result.as_ref().unwrap()["n"], 3);
    let runs = runs.lock().unwrap().clone();
    assert_eq!(runs["generate_script"], 1);
    assert_eq!(runs["generate_scenes"], 2);
    assert_eq!(runs["render"], 1);
    assert_eq!(mock.calls(), 1);
    // Progress was pushed as "step n of m".
    let progress: Vec<_> = seen.iter().filter_map(|j| j.progress.clone()).collect();
    assert!(
        progress
            .iter()
            .any(|p| p.step == "generate_scenes" && p.n == 2 && p.m == Some(3)),
        "{progress:?}"
    );
    let final_progress = done.progress.clone().unwrap();
    assert_eq!(
        (final_progress.step.as_str(), final_progress.n),
        ("render", 3)
    );
    stop(w).await;
}

async fn repeated_step_names_are_kept_apart(store: Store) {
    let jobs = Jobs::new(store);
    jobs.register("scenes", |ctx, _input| async move {
        let mut out = Vec::new();
        for i in 0..3u32 {
            let v: u32 = ctx.step("scene", || async move { Ok(i * 10) }).await?;
            out.push(v);
        }
        Ok(out)
    });
    let w = start(&jobs, boxed(MockLlm::new("m")));
    let s = jobs
        .submit(&tenant(), "scenes", json!(null), fast())
        .await
        .unwrap();
    let done = wait_done(&jobs, &tenant(), s.job.id).await;
    assert_eq!(done.result, Some(json!([0, 10, 20])));
    let mut names: Vec<String> = jobs
        .store()
        .steps(s.job.id)
        .await
        .unwrap()
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    names.sort();
    assert_eq!(names, ["scene", "scene#1", "scene#2"]);
    stop(w).await;
}

async fn shutdown_releases_running_jobs(store: Store) {
    let jobs = Jobs::new(store);
    let started = Arc::new(AtomicUsize::new(0));
    let dropped = Arc::new(AtomicUsize::new(0));
    let (worker, handle) = jobs
        .worker(hanging_service(started.clone(), dropped.clone()))
        .poll_interval(Duration::from_millis(20))
        .lease(Duration::from_secs(60))
        .shutdown_grace(Duration::from_millis(10))
        .build();
    let task = tokio::spawn(worker.run());
    let s = jobs
        .submit_chat(&tenant(), req("hi"), fast())
        .await
        .unwrap();
    wait_status(&jobs, &tenant(), s.job.id, JobStatus::Running).await;
    handle.shutdown();
    let stats = within("shutdown", task).await.unwrap();
    assert_eq!(stats.released, 1);
    assert_eq!(dropped.load(Ordering::SeqCst), 1);
    // Back in the queue at once (not after the 60 s lease), attempt not counted.
    let job = jobs.get(&tenant(), s.job.id).await.unwrap().unwrap();
    assert_eq!(job.status, JobStatus::Queued);
    assert_eq!(job.attempts, 0);
    let mock = MockLlm::new("m").otherwise(Step::reply("done"));
    let w = start(&jobs, boxed(mock));
    let done = wait_done(&jobs, &tenant(), s.job.id).await;
    assert_eq!(done.status, JobStatus::Succeeded);
    assert_eq!(done.attempts, 1);
    stop(w).await;
}

async fn dead_worker_job_is_taken_over(store: Store) {
    let jobs = Jobs::new(store.clone());
    let s = jobs
        .submit_chat(&tenant(), req("hi"), fast())
        .await
        .unwrap();
    // A "worker" claims the job with a short lease and dies without a word.
    let kinds = vec!["chat".to_owned()];
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    let (_, dead) = store
        .claim(&kinds, "dead", now, 200)
        .await
        .unwrap()
        .unwrap();
    let mock = MockLlm::new("m").otherwise(Step::reply("rescued"));
    let w = start(&jobs, boxed(mock.clone()));
    let done = wait_done(&jobs, &tenant(), s.job.id).await;
    assert_eq!(done.status, JobStatus::Succeeded);
    assert_eq!(done.attempts, 2);
    assert_eq!(mock.calls(), 1);
    let r = store
        .finish(dead, Finish::Succeeded(json!("zombie")), now + 10_000, 1000)
        .await;
    assert!(matches!(r, Err(JobError::LeaseLost)));
    stop(w).await;
}

async fn panicking_handler_fails_the_job(store: Store) {
    let jobs = Jobs::new(store);
    jobs.register("boom", |_ctx, input| async move {
        if input.is_null() {
            panic!("handler bug");
        }
        Ok(input)
    });
    let w = start(&jobs, boxed(MockLlm::new("m")));
    let s = jobs
        .submit(&tenant(), "boom", json!(null), fast())
        .await
        .unwrap();
    let done = wait_done(&jobs, &tenant(), s.job.id).await;
    assert_eq!(done.status, JobStatus::Failed);
    assert_eq!(done.attempts, 1);
    assert_eq!(done.error.unwrap().kind, "internal");
    // The worker survives and runs the next job.
    let ok = jobs
        .submit(&tenant(), "boom", json!(7), fast())
        .await
        .unwrap();
    assert_eq!(
        wait_done(&jobs, &tenant(), ok.job.id).await.result,
        Some(json!(7))
    );
    stop(w).await;
}

/// A step whose attempt ends after the upstream answered (here: the attempt times out in
/// the step, after the call) reuses the recorded answer on the next attempt: the upstream
/// is called once, and the request carried the attempt-independent call key.
async fn step_answer_is_reused_after_a_lost_attempt(store: Store) {
    let jobs = Jobs::new(store);
    jobs.register("ask", |ctx, _input| async move {
        ctx.step("ask", || async {
            let text = ctx.chat(req("question")).await?.text();
            if ctx.attempt() == 1 {
                // The attempt dies here: after the answer, before the step's output.
                std::future::pending::<()>().await;
            }
            Ok(text)
        })
        .await
    });
    let mock = MockLlm::new("m").then(Step::reply("the answer"));
    let w = start(&jobs, boxed(mock.clone()));
    let s = jobs
        .submit(
            &tenant(),
            "ask",
            json!({}),
            fast().timeout(Duration::from_millis(300)),
        )
        .await
        .unwrap();
    let done = wait_done(&jobs, &tenant(), s.job.id).await;
    assert_eq!(done.status, JobStatus::Succeeded, "{done:?}");
    assert_eq!(done.attempts, 2);
    assert_eq!(done.result.unwrap(), json!("the answer"));
    assert_eq!(mock.calls(), 1);
    let key = mock
        .last_request()
        .unwrap()
        .idempotency_key()
        .cloned()
        .unwrap();
    let calls = jobs.store().calls(s.job.id).await.unwrap();
    assert_eq!(calls.len(), 1, "{calls:?}");
    assert!(calls[0].key.starts_with("ask/0/"), "{calls:?}");
    assert_eq!(calls[0].starts, 1);
    assert_eq!(key.as_str(), format!("{}:{}", s.job.id, calls[0].key));
    assert!(calls[0].response.is_some());
    let stats = stop(w).await;
    assert_eq!(
        (
            stats.llm_calls,
            stats.llm_calls_replayed,
            stats.llm_calls_repeated
        ),
        (1, 1, 0)
    );
}

/// A step that failed asks the upstream afresh on its retry: the answers it rejected
/// are forgotten.
async fn failed_step_asks_the_upstream_afresh(store: Store) {
    let jobs = Jobs::new(store);
    jobs.register("ask", |ctx, _input| async move {
        ctx.step("ask", || async {
            let text = ctx.chat(req("question")).await?.text();
            if ctx.attempt() == 1 {
                return Err(LlmError::unavailable("the answer did not parse"));
            }
            Ok(text)
        })
        .await
    });
    let mock = MockLlm::new("m")
        .then(Step::reply("first"))
        .then(Step::reply("second"));
    let w = start(&jobs, boxed(mock.clone()));
    let s = jobs
        .submit(&tenant(), "ask", json!({}), fast())
        .await
        .unwrap();
    let done = wait_done(&jobs, &tenant(), s.job.id).await;
    assert_eq!(done.status, JobStatus::Succeeded, "{done:?}");
    assert_eq!(done.result.unwrap(), json!("second"));
    assert_eq!(mock.calls(), 2);
    let calls = jobs.store().calls(s.job.id).await.unwrap();
    assert_eq!(calls.len(), 1, "{calls:?}");
    assert_eq!(
        calls[0].starts, 1,
        "the failed attempt's start was forgotten"
    );
    let stats = stop(w).await;
    assert_eq!(
        (
            stats.llm_calls,
            stats.llm_calls_replayed,
            stats.llm_calls_repeated
        ),
        (2, 0, 0)
    );
}

/// A chat job's call carries an attempt-independent idempotency key; its answer is the
/// job's result, not a separate call record.
async fn chat_job_call_carries_its_key(store: Store) {
    let jobs = Jobs::new(store);
    let mock = MockLlm::new("m").then(Step::reply("Paris"));
    let w = start(&jobs, boxed(mock.clone()));
    let s = jobs
        .submit_chat(&tenant(), req("capital?"), fast())
        .await
        .unwrap();
    let done = wait_done(&jobs, &tenant(), s.job.id).await;
    assert_eq!(done.status, JobStatus::Succeeded, "{done:?}");
    let key = mock
        .last_request()
        .unwrap()
        .idempotency_key()
        .cloned()
        .unwrap();
    assert_eq!(key.as_str(), format!("{}:chat", s.job.id));
    assert!(jobs.store().calls(s.job.id).await.unwrap().is_empty());
    stop(w).await;
}

/// Calls within a step are keyed by their place and their request: a different request
/// at the same place on a later attempt is a different call, never answered with the
/// recorded answer of another request.
async fn a_changed_request_is_not_answered_from_the_record(store: Store) {
    let jobs = Jobs::new(store);
    jobs.register("ask", |ctx, _input| async move {
        ctx.step("ask", || async {
            let a = ctx.chat(req("same")).await?.text();
            let b = ctx
                .chat(req(&format!("attempt {}", ctx.attempt())))
                .await?
                .text();
            if ctx.attempt() == 1 {
                std::future::pending::<()>().await;
            }
            Ok(format!("{a} {b}"))
        })
        .await
    });
    let mock = MockLlm::new("m")
        .then(Step::reply("one"))
        .then(Step::reply("two"))
        .then(Step::reply("three"));
    let w = start(&jobs, boxed(mock.clone()));
    let s = jobs
        .submit(
            &tenant(),
            "ask",
            json!({}),
            fast().timeout(Duration::from_millis(300)),
        )
        .await
        .unwrap();
    let done = wait_done(&jobs, &tenant(), s.job.id).await;
    assert_eq!(done.status, JobStatus::Succeeded, "{done:?}");
    assert_eq!(done.result.unwrap(), json!("one three"));
    assert_eq!(mock.calls(), 3);
    let calls = jobs.store().calls(s.job.id).await.unwrap();
    assert_eq!(calls.len(), 3, "{calls:?}");
    assert!(calls.iter().all(|c| c.key.starts_with("ask/")));
    let stats = stop(w).await;
    assert_eq!(
        (
            stats.llm_calls,
            stats.llm_calls_replayed,
            stats.llm_calls_repeated
        ),
        (3, 1, 0)
    );
}

/// Steps run concurrently in one task (`join!`) key their calls apart.
async fn concurrent_steps_keep_their_calls_apart(store: Store) {
    let jobs = Jobs::new(store);
    jobs.register("both", |ctx, _input| async move {
        let step = |name: &'static str| {
            let ctx = ctx.clone();
            async move {
                ctx.step(name, || async {
                    let text = ctx.chat(req(name)).await?.text();
                    if ctx.attempt() == 1 {
                        std::future::pending::<()>().await;
                    }
                    Ok(text)
                })
                .await
            }
        };
        let (a, b) = tokio::join!(step("a"), step("b"));
        Ok(format!("{} {}", a?, b?))
    });
    let mock = MockLlm::new("m").otherwise(Step::respond(|req: &ChatRequest| {
        Ok(LlmResponse::complete(ChatResponse::from_text(
            "m",
            format!("re {}", req.messages[0].text()),
        )))
    }));
    let w = start(&jobs, boxed(mock.clone()));
    let s = jobs
        .submit(
            &tenant(),
            "both",
            json!({}),
            fast().timeout(Duration::from_millis(300)),
        )
        .await
        .unwrap();
    let done = wait_done(&jobs, &tenant(), s.job.id).await;
    assert_eq!(done.status, JobStatus::Succeeded, "{done:?}");
    assert_eq!(done.result.unwrap(), json!("re a re b"));
    assert_eq!(mock.calls(), 2);
    let calls = jobs.store().calls(s.job.id).await.unwrap();
    let keys: Vec<&str> = calls.iter().map(|c| c.key.as_str()).collect();
    assert_eq!(keys.len(), 2, "{keys:?}");
    assert!(
        keys[0].starts_with("a/0/") && keys[1].starts_with("b/0/"),
        "{keys:?}"
    );
    let stats = stop(w).await;
    assert_eq!((stats.llm_calls, stats.llm_calls_replayed), (2, 2));
}

macro_rules! suite {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let db = crate::common::TempDb::new();
                    super::$name(db.store().await).await;
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                #[ignore = "needs DATABASE_URL (run with -- --include-ignored; .ci/run sets it)"]
                async fn $name() {
                    let schema = crate::common::unique("jobs_test");
                    super::$name(crate::common::postgres_in(&schema).await).await;
                    crate::common::drop_schema(&schema).await;
                }
            )*
        }
    };
}

suite!(
    chat_job_succeeds,
    transient_errors_are_retried,
    bad_request_is_not_retried,
    attempts_are_capped,
    attempt_timeout_fails_the_job,
    invalid_chat_request_is_refused,
    idempotency_key_replays_and_conflicts,
    cancel_while_running_drops_the_call,
    cancelled_queued_job_never_runs,
    tenants_are_isolated,
    lease_expiry_and_fencing,
    priority_and_kinds_decide_the_claim,
    retention_expires_finished_jobs,
    retention_through_jobs,
    recorded_steps_are_replayed_on_retry,
    repeated_step_names_are_kept_apart,
    shutdown_releases_running_jobs,
    dead_worker_job_is_taken_over,
    panicking_handler_fails_the_job,
    step_answer_is_reused_after_a_lost_attempt,
    failed_step_asks_the_upstream_afresh,
    chat_job_call_carries_its_key,
    a_changed_request_is_not_answered_from_the_record,
    concurrent_steps_keep_their_calls_apart,
);
