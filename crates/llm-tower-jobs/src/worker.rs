//! The [`Worker`]: claims jobs under a lease, runs them, records the outcome.

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::FutureExt;
use llm_tower_core::{
    BoxLlmService, ChatRequest, ChatResponse, Deadline, LlmError, TaskType, Tenant,
};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, watch};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tower::ServiceExt;

use crate::jobs::{CHAT_KIND, Jobs};
use crate::types::{Finish, Job, JobError, JobErrorInfo, JobId, Lease, Progress, dur_ms, now_ms};

/// Configures a [`Worker`]; from [`Jobs::worker`].
#[derive(Debug)]
pub struct WorkerBuilder {
    jobs: Jobs,
    service: BoxLlmService,
    concurrency: usize,
    lease: Duration,
    poll_interval: Duration,
    shutdown_grace: Duration,
    max_backoff: Duration,
    purge_interval: Duration,
    worker_id: String,
    fault: Option<FaultHook>,
}

impl WorkerBuilder {
    pub(crate) fn new(jobs: Jobs, service: BoxLlmService) -> Self {
        Self {
            jobs,
            service,
            concurrency: 8,
            lease: Duration::from_secs(30),
            poll_interval: Duration::from_secs(1),
            shutdown_grace: Duration::from_secs(10),
            max_backoff: Duration::from_secs(300),
            purge_interval: Duration::from_secs(600),
            worker_id: format!("worker-{}", uuid::Uuid::new_v4()),
            fault: None,
        }
    }

    /// Jobs run at once (default 8). The worker claims a job only when a slot is free, so
    /// it never holds a lease on work it has not started.
    #[must_use]
    pub fn concurrency(mut self, n: usize) -> Self {
        self.concurrency = n.max(1);
        self
    }

    /// The lease length (default 30 s): renewed every third of it; a job whose worker
    /// stopped renewing is claimed by another worker once it expires.
    #[must_use]
    pub fn lease(mut self, lease: Duration) -> Self {
        self.lease = lease.max(Duration::from_millis(30));
        self
    }

    /// How often an idle worker looks at the queue without being woken (default 1 s).
    /// Submits in this process wake it at once (and NOTIFY on PostgreSQL); the poll finds
    /// retries whose back-off ended and jobs of dead workers.
    #[must_use]
    pub fn poll_interval(mut self, every: Duration) -> Self {
        self.poll_interval = every.max(Duration::from_millis(1));
        self
    }

    /// On shutdown, how long running jobs may finish before they are dropped and their
    /// leases released (default 10 s).
    #[must_use]
    pub fn shutdown_grace(mut self, grace: Duration) -> Self {
        self.shutdown_grace = grace;
        self
    }

    /// The cap of the retry back-off (default 5 min).
    #[must_use]
    pub fn max_backoff(mut self, max: Duration) -> Self {
        self.max_backoff = max;
        self
    }

    /// How often the worker deletes expired finished jobs (default 10 min).
    #[must_use]
    pub fn purge_interval(mut self, every: Duration) -> Self {
        self.purge_interval = every.max(Duration::from_millis(1));
        self
    }

    /// The name recorded as the lease owner (default a random `worker-<uuid>`).
    #[must_use]
    pub fn worker_id(mut self, id: impl Into<String>) -> Self {
        self.worker_id = id.into();
        self
    }

    /// Test support, not a stable API: calls `hook` at each [`FaultPoint`] of an LLM call
    /// made in a durable step, with the job and the call's key
    /// ([`LlmCall::key`](crate::LlmCall::key)). The crash tests use it to stop a worker
    /// process at exactly that point.
    #[doc(hidden)]
    #[must_use]
    pub fn fault_hook(
        mut self,
        hook: impl Fn(FaultPoint, JobId, &str) + Send + Sync + 'static,
    ) -> Self {
        self.fault = Some(FaultHook(Arc::new(hook)));
        self
    }

    /// The worker and the handle that stops it (like tower's `Buffer::pair`: the caller
    /// decides where the worker runs).
    pub fn build(self) -> (Worker, WorkerHandle) {
        let (shutdown_tx, shutdown_rx) = watch::channel(false);
        let shutdown_tx = Arc::new(shutdown_tx);
        let (release_tx, release_rx) = watch::channel(false);
        let shared = Arc::new(Shared {
            jobs: self.jobs,
            service: self.service,
            lease: self.lease,
            max_backoff: self.max_backoff,
            worker_id: self.worker_id,
            stats: Counters::default(),
            release: release_rx,
            fault: self.fault,
        });
        let worker = Worker {
            shared: shared.clone(),
            concurrency: self.concurrency,
            poll_interval: self.poll_interval,
            shutdown_grace: self.shutdown_grace,
            purge_interval: self.purge_interval,
            shutdown: shutdown_rx,
            shutdown_tx: shutdown_tx.clone(),
            release_tx,
        };
        let handle = WorkerHandle {
            shutdown: shutdown_tx,
            shared,
        };
        (worker, handle)
    }
}

struct Shared {
    jobs: Jobs,
    service: BoxLlmService,
    lease: Duration,
    max_backoff: Duration,
    worker_id: String,
    stats: Counters,
    release: watch::Receiver<bool>,
    fault: Option<FaultHook>,
}

type FaultFn = dyn Fn(FaultPoint, JobId, &str) + Send + Sync;

#[derive(Clone)]
struct FaultHook(Arc<FaultFn>);

impl fmt::Debug for FaultHook {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("FaultHook")
    }
}

/// Test support, not a stable API: the points of a recorded LLM call where
/// [`WorkerBuilder::fault_hook`] is called.
#[doc(hidden)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum FaultPoint {
    /// The upstream answered; the answer is not recorded yet (the window that remains:
    /// a crash here makes the re-run call the upstream again).
    LlmAnswered,
    /// The answer is recorded; the step's output is not (a crash here makes the re-run
    /// reuse the recorded answer).
    CallRecorded,
}

#[derive(Default)]
struct Counters {
    claimed: AtomicU64,
    succeeded: AtomicU64,
    failed: AtomicU64,
    retried: AtomicU64,
    cancelled: AtomicU64,
    lease_lost: AtomicU64,
    released: AtomicU64,
    llm_calls: AtomicU64,
    llm_calls_replayed: AtomicU64,
    llm_calls_repeated: AtomicU64,
    llm_call_records_failed: AtomicU64,
}

impl Counters {
    fn snapshot(&self) -> WorkerStats {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        WorkerStats {
            claimed: g(&self.claimed),
            succeeded: g(&self.succeeded),
            failed: g(&self.failed),
            retried: g(&self.retried),
            cancelled: g(&self.cancelled),
            lease_lost: g(&self.lease_lost),
            released: g(&self.released),
            llm_calls: g(&self.llm_calls),
            llm_calls_replayed: g(&self.llm_calls_replayed),
            llm_calls_repeated: g(&self.llm_calls_repeated),
            llm_call_records_failed: g(&self.llm_call_records_failed),
        }
    }
}

/// What a worker did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct WorkerStats {
    /// Jobs claimed.
    pub claimed: u64,
    /// Jobs finished with a result.
    pub succeeded: u64,
    /// Jobs finished with an error.
    pub failed: u64,
    /// Attempts that failed with a retryable error and were queued again.
    pub retried: u64,
    /// Jobs dropped because they were cancelled.
    pub cancelled: u64,
    /// Jobs dropped because the lease was lost (another worker owns them now).
    pub lease_lost: u64,
    /// Jobs released on shutdown.
    pub released: u64,
    /// Recorded LLM calls ([`JobContext::chat`] within a step) sent to the upstream.
    pub llm_calls: u64,
    /// Recorded LLM calls answered from the record of an earlier attempt, without calling
    /// the upstream.
    pub llm_calls_replayed: u64,
    /// Recorded LLM calls sent again after an earlier attempt had started them and
    /// recorded no answer: that call failed, or its worker died while waiting for the
    /// answer or before recording it (then the upstream may be paid twice).
    pub llm_calls_repeated: u64,
    /// Answers that could not be recorded (store error): the step went on with the
    /// answer, but a crash before its output is recorded would call the upstream again.
    pub llm_call_records_failed: u64,
}

/// Stops a [`Worker`] gracefully. Cheap to clone.
#[derive(Clone)]
pub struct WorkerHandle {
    shutdown: Arc<watch::Sender<bool>>,
    shared: Arc<Shared>,
}

impl fmt::Debug for WorkerHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WorkerHandle")
            .field("worker_id", &self.shared.worker_id)
            .finish_non_exhaustive()
    }
}

impl WorkerHandle {
    /// Stops claiming; running jobs get the shutdown grace to finish, then they are dropped
    /// and their leases released so another worker resumes them at once. [`Worker::run`]
    /// returns when that is done.
    pub fn shutdown(&self) {
        let _ = self.shutdown.send(true);
    }

    /// The counters so far.
    pub fn stats(&self) -> WorkerStats {
        self.shared.stats.snapshot()
    }
}

/// Runs jobs: claims runnable jobs of the kinds it knows (chat, plus the handlers registered
/// on its [`Jobs`] when it starts), holds each under a renewed lease, and records the
/// outcome. Build with [`Jobs::worker`], drive with [`run`](Self::run).
///
/// Each running job is a tokio task in a `JoinSet` owned by the `run` future (so dropping
/// that future aborts them; their leases then expire and other workers take over).
pub struct Worker {
    shared: Arc<Shared>,
    concurrency: usize,
    poll_interval: Duration,
    shutdown_grace: Duration,
    purge_interval: Duration,
    shutdown: watch::Receiver<bool>,
    shutdown_tx: Arc<watch::Sender<bool>>,
    release_tx: watch::Sender<bool>,
}

impl fmt::Debug for Worker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Worker")
            .field("worker_id", &self.shared.worker_id)
            .field("concurrency", &self.concurrency)
            .field("lease", &self.shared.lease)
            .finish_non_exhaustive()
    }
}

impl Worker {
    /// Runs until [`WorkerHandle::shutdown`]; returns the counters.
    pub async fn run(mut self) -> WorkerStats {
        let shared = self.shared.clone();
        let kinds = shared.jobs.kinds();
        let store = shared.jobs.inner.store.clone();
        let wake = shared.jobs.inner.hub.work.clone();
        let slots = Arc::new(Semaphore::new(self.concurrency));
        let mut tasks = JoinSet::new();
        let listen = store.listen(wake.clone());
        tokio::pin!(listen);
        let mut next_purge = Instant::now();

        loop {
            if *self.shutdown.borrow() {
                break;
            }
            while tasks.try_join_next().is_some() {}
            let permit = tokio::select! {
                p = slots.clone().acquire_owned() => match p {
                    Ok(p) => p,
                    Err(_) => break,
                },
                _ = self.shutdown.changed() => break,
                () = &mut listen => continue,
            };
            if Instant::now() >= next_purge {
                next_purge = Instant::now() + self.purge_interval;
                if let Err(e) = store.purge_expired(now_ms()).await {
                    tracing::warn!(error = %e, "purging expired jobs failed");
                }
            }
            // Register for wake-ups before looking, so a submit in between is not missed.
            let notified = wake.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let lease_ms = dur_ms(shared.lease);
            match store
                .claim(&kinds, &shared.worker_id, now_ms(), lease_ms)
                .await
            {
                Ok(Some((job, lease))) => {
                    shared.stats.claimed.fetch_add(1, Ordering::Relaxed);
                    tasks.spawn(run_job(shared.clone(), job, lease, permit));
                    continue;
                }
                Ok(None) => drop(permit),
                Err(e) => {
                    drop(permit);
                    tracing::warn!(error = %e, "claiming a job failed");
                }
            }
            tokio::select! {
                () = &mut notified => {}
                () = tokio::time::sleep(self.poll_interval) => {}
                _ = self.shutdown.changed() => break,
                () = &mut listen => {}
            }
        }

        // Graceful shutdown: let running jobs finish within the grace, then release them.
        let drain = async { while tasks.join_next().await.is_some() {} };
        if tokio::time::timeout(self.shutdown_grace, drain)
            .await
            .is_err()
        {
            let _ = self.release_tx.send(true);
            while tasks.join_next().await.is_some() {}
        }
        shared.stats.snapshot()
    }

    /// Runs until `signal` completes (or [`WorkerHandle::shutdown`]), then shuts down
    /// gracefully.
    pub async fn run_until(self, signal: impl Future<Output = ()>) -> WorkerStats {
        let stop = self.shutdown_tx.clone();
        let run = self.run();
        tokio::pin!(run);
        tokio::select! {
            stats = &mut run => return stats,
            () = signal => { let _ = stop.send(true); }
        }
        run.await
    }
}

enum Ended {
    Done(Result<Value, LlmError>),
    Cancelled,
    LeaseLost,
    Release,
}

async fn run_job(shared: Arc<Shared>, job: Job, lease: Lease, _permit: OwnedSemaphorePermit) {
    let jobs = &shared.jobs;
    let store = jobs.inner.store.clone();
    let hub = &jobs.inner.hub;
    let retention = dur_ms(jobs.inner.retention);
    hub.changed(job.id);

    if job.attempts > job.max_attempts {
        // Earlier workers died holding it until no attempt was left.
        let err = LlmError::internal(format!(
            "the job was abandoned by its worker {} times; no attempt is left",
            job.attempts - 1
        ));
        let _ = store
            .finish(lease, Finish::Failed((&err).into()), now_ms(), retention)
            .await;
        shared.stats.failed.fetch_add(1, Ordering::Relaxed);
        hub.changed(job.id);
        return;
    }

    let cancel = Arc::new(Notify::new());
    let _registered = Registered::new(jobs, job.id, cancel.clone());

    let work = prepare(&shared, &job, lease).await;
    let timeout = job.timeout_ms.map(Duration::from_millis);
    let work = async move {
        // A panicking handler fails its job (not retried) instead of leaving it running
        // until the lease expires, again and again.
        let work = std::panic::AssertUnwindSafe(work?)
            .catch_unwind()
            .map(|r| r.unwrap_or_else(|_| Err(LlmError::internal("the job handler panicked"))));
        match timeout {
            Some(t) => tokio::time::timeout(t, work).await.unwrap_or_else(|_| {
                Err(LlmError::timeout(format!(
                    "the job attempt timed out after {} ms",
                    t.as_millis()
                )))
            }),
            None => work.await,
        }
    };
    // Boxed (not stack-pinned) so it can be dropped before the outcome is written.
    let mut work = Box::pin(work);

    let renew_every = shared.lease / 3;
    let mut renew = tokio::time::interval_at(Instant::now() + renew_every, renew_every);
    renew.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut valid_until = Instant::now() + shared.lease;
    let mut release = shared.release.clone();

    let ended = loop {
        tokio::select! {
            r = &mut work => break Ended::Done(r),
            () = cancel.notified() => break Ended::Cancelled,
            r = release.changed() => {
                // A dropped sender means the worker is gone: give the job back too.
                if r.is_err() || *release.borrow() {
                    break Ended::Release;
                }
            }
            _ = renew.tick() => {
                let before = Instant::now();
                match store.renew(lease, now_ms(), dur_ms(shared.lease)).await {
                    Ok(true) => valid_until = before + shared.lease,
                    Ok(false) => break Ended::LeaseLost,
                    Err(e) => {
                        tracing::warn!(job = %job.id, error = %e, "lease renewal failed");
                        if Instant::now() + renew_every >= valid_until {
                            // Another worker may take it soon: stop before that.
                            break Ended::LeaseLost;
                        }
                    }
                }
            }
        }
    };
    // Drop the work now: an LLM call in flight is abandoned here.
    drop(work);

    let now = now_ms();
    let finish = match ended {
        Ended::Done(Ok(v)) => Some((Finish::Succeeded(v), &shared.stats.succeeded)),
        Ended::Done(Err(e)) => {
            if e.is_retryable() && job.attempts < job.max_attempts {
                let delay = backoff(
                    Duration::from_millis(job.backoff_ms),
                    job.attempts,
                    shared.max_backoff,
                    e.retry_after(),
                );
                let run_at = now.saturating_add(dur_ms(delay));
                let error = JobErrorInfo::from(&e);
                Some((Finish::Retry { error, run_at }, &shared.stats.retried))
            } else {
                Some((Finish::Failed((&e).into()), &shared.stats.failed))
            }
        }
        Ended::Release => Some((Finish::Release, &shared.stats.released)),
        Ended::Cancelled => {
            shared.stats.cancelled.fetch_add(1, Ordering::Relaxed);
            None
        }
        Ended::LeaseLost => {
            shared.stats.lease_lost.fetch_add(1, Ordering::Relaxed);
            None
        }
    };
    if let Some((finish, counter)) = finish {
        let wake = matches!(finish, Finish::Release);
        match store.finish(lease, finish, now, retention).await {
            Ok(()) => {
                counter.fetch_add(1, Ordering::Relaxed);
                if wake {
                    hub.work.notify_waiters();
                }
            }
            Err(JobError::LeaseLost) => {
                // Cancelled or taken over meanwhile: the current owner's state stands.
                shared.stats.lease_lost.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => tracing::warn!(job = %job.id, error = %e, "recording the outcome failed"),
        }
    }
    hub.changed(job.id);
}

/// Removes the job from the in-process cancel registry when the attempt ends.
struct Registered<'a> {
    jobs: &'a Jobs,
    id: JobId,
}

impl<'a> Registered<'a> {
    fn new(jobs: &'a Jobs, id: JobId, signal: Arc<Notify>) -> Self {
        match jobs.inner.hub.running.lock() {
            Ok(mut r) => r.insert(id, signal),
            Err(p) => p.into_inner().insert(id, signal),
        };
        Self { jobs, id }
    }
}

impl Drop for Registered<'_> {
    fn drop(&mut self) {
        match self.jobs.inner.hub.running.lock() {
            Ok(mut r) => r.remove(&self.id),
            Err(p) => p.into_inner().remove(&self.id),
        };
    }
}

type Work = std::pin::Pin<Box<dyn Future<Output = Result<Value, LlmError>> + Send>>;

async fn prepare(shared: &Arc<Shared>, job: &Job, lease: Lease) -> Result<Work, LlmError> {
    let tenant = Tenant::from(job.tenant.as_str());
    if job.kind == CHAT_KIND {
        let mut req: ChatRequest =
            serde_json::from_value(job.input["request"].clone()).map_err(|e| {
                LlmError::bad_request(format!("the job's chat request is invalid: {e}"))
            })?;
        req.set_tenant(tenant);
        if let Some(task) = job.input["task_type"].as_str() {
            req.set_task_type(TaskType::from(task));
        }
        if let Some(ms) = job.timeout_ms {
            req.set_deadline(Deadline::after(Duration::from_millis(ms)));
        }
        if req.idempotency_key().is_none() {
            // The same on every attempt. The answer is not recorded apart from the result:
            // the result's write is the one write after the answer either way.
            req.set_idempotency_key(format!("{}:chat", job.id));
        }
        let service = shared.service.clone();
        return Ok(Box::pin(async move {
            let resp = service.oneshot(req).await?.into_complete().await?;
            serde_json::to_value(resp)
                .map_err(|e| LlmError::internal(format!("the response cannot be stored: {e}")))
        }));
    }
    let Some(handler) = shared.jobs.handler(&job.kind) else {
        return Err(LlmError::bad_request(format!(
            "no handler is registered for job kind `{}`",
            job.kind
        )));
    };
    let recorded: HashMap<String, Value> = shared
        .jobs
        .inner
        .store
        .steps(job.id)
        .await
        .map_err(LlmError::from)?
        .into_iter()
        .collect();
    let ctx = JobContext {
        inner: Arc::new(CtxInner {
            shared: shared.clone(),
            id: job.id,
            tenant,
            attempt: job.attempts,
            lease,
            recorded,
            state: Mutex::new(StepState::default()),
            lost: AtomicBool::new(false),
        }),
    };
    Ok(handler(ctx, job.input.clone()))
}

/// The longest upstream idempotency key set on a recorded call's request.
const MAX_UPSTREAM_KEY: usize = 255;

/// Sends `req` as the recorded LLM call `key` of the job under `lease`: answered from the
/// record when an earlier attempt recorded the answer; otherwise sent to the upstream and
/// its answer recorded before anything else happens.
async fn recorded_call(
    shared: &Shared,
    lease: Lease,
    key: String,
    mut req: ChatRequest,
) -> Result<ChatResponse, LlmError> {
    let store = &shared.jobs.inner.store;
    let stats = &shared.stats;
    let call = store
        .begin_call(lease, &key, now_ms())
        .await
        .map_err(|e| match e {
            JobError::LeaseLost => lease_lost(),
            e => LlmError::from(e),
        })?;
    if let Some(recorded) = call.response {
        stats.llm_calls_replayed.fetch_add(1, Ordering::Relaxed);
        return serde_json::from_value(recorded).map_err(|e| {
            LlmError::internal(format!(
                "the recorded answer of call `{key}` is invalid: {e}"
            ))
        });
    }
    if call.starts > 1 {
        stats.llm_calls_repeated.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(
            job = %lease.id,
            call = %key,
            starts = call.starts,
            "an earlier attempt started this LLM call and recorded no answer; calling again"
        );
    }
    if req.idempotency_key().is_none() {
        // The same on every attempt: an upstream that deduplicates by key could answer a
        // repeated call without charging twice.
        let upstream_key = format!("{}:{key}", lease.id);
        if upstream_key.len() <= MAX_UPSTREAM_KEY {
            req.set_idempotency_key(upstream_key);
        }
    }
    stats.llm_calls.fetch_add(1, Ordering::Relaxed);
    let resp = shared
        .service
        .clone()
        .oneshot(req)
        .await?
        .into_complete()
        .await?;
    fault(shared, FaultPoint::LlmAnswered, lease.id, &key);
    match serde_json::to_value(&resp) {
        Ok(value) => {
            if let Err(e) = store.record_call(lease.id, &key, &value, now_ms()).await {
                // Going on with the answer beats failing the step: a retry would pay again.
                stats
                    .llm_call_records_failed
                    .fetch_add(1, Ordering::Relaxed);
                tracing::warn!(job = %lease.id, call = %key, error = %e, "recording an LLM answer failed");
            }
        }
        Err(e) => {
            stats
                .llm_call_records_failed
                .fetch_add(1, Ordering::Relaxed);
            tracing::warn!(job = %lease.id, call = %key, error = %e, "an LLM answer cannot be serialized");
        }
    }
    fault(shared, FaultPoint::CallRecorded, lease.id, &key);
    Ok(resp)
}

fn fault(shared: &Shared, point: FaultPoint, id: JobId, key: &str) {
    if let Some(hook) = &shared.fault {
        (hook.0)(point, id, key);
    }
}

/// The durable step being run in this task: what keys the LLM calls made within it.
struct StepScope {
    job: JobId,
    step: String,
    /// The keys of the calls made so far, in order.
    keys: Mutex<Vec<String>>,
}

impl StepScope {
    fn lock_keys(&self) -> std::sync::MutexGuard<'_, Vec<String>> {
        match self.keys.lock() {
            Ok(k) => k,
            Err(p) => p.into_inner(),
        }
    }

    /// The next call's key: `{step}/{n}/{fingerprint}`, the same on every attempt of a
    /// handler that is deterministic up to the call. The fingerprint (the first 64 bits
    /// of the BLAKE3 hash of the request's JSON) makes a different request at the same
    /// place a different call, never answered with another request's answer.
    fn next_key(&self, request: &ChatRequest) -> String {
        let json = serde_json::to_vec(request).unwrap_or_default();
        let hex = blake3::hash(&json).to_hex();
        let fp = &hex[..16];
        let mut keys = self.lock_keys();
        let key = format!("{}/{}/{fp}", self.step, keys.len());
        keys.push(key.clone());
        key
    }
}

tokio::task_local! {
    static STEP: StepScope;
}

/// The retry delay before attempt `attempt + 1`: `base * 2^(attempt-1)` capped at `max`,
/// minus up to a quarter of jitter (so retries of many jobs spread out), and never less
/// than the error's retry-after.
pub(crate) fn backoff(
    base: Duration,
    attempt: u32,
    max: Duration,
    retry_after: Option<Duration>,
) -> Duration {
    let exp = attempt.saturating_sub(1).min(30);
    let d = base.saturating_mul(1u32 << exp).min(max);
    let r = (uuid::Uuid::new_v4().as_u128() % 1000) as u32;
    let d = d.saturating_sub((d / 4000).saturating_mul(r));
    retry_after.map_or(d, |ra| d.max(ra))
}

#[derive(Default)]
struct StepState {
    seen: HashMap<String, u32>,
    n: u32,
    total: Option<u32>,
}

struct CtxInner {
    shared: Arc<Shared>,
    id: JobId,
    tenant: Tenant,
    attempt: u32,
    lease: Lease,
    recorded: HashMap<String, Value>,
    state: Mutex<StepState>,
    lost: AtomicBool,
}

/// What a multi-step handler gets: durable steps, progress, and the worker's LLM service.
/// Cheap to clone.
#[derive(Clone)]
pub struct JobContext {
    inner: Arc<CtxInner>,
}

impl fmt::Debug for JobContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JobContext")
            .field("id", &self.inner.id)
            .field("attempt", &self.inner.attempt)
            .field("recorded_steps", &self.inner.recorded.len())
            .finish_non_exhaustive()
    }
}

impl JobContext {
    /// The job's id.
    pub fn id(&self) -> JobId {
        self.inner.id
    }

    /// The tenant that submitted the job.
    pub fn tenant(&self) -> &Tenant {
        &self.inner.tenant
    }

    /// This attempt's number (1 for the first run).
    pub fn attempt(&self) -> u32 {
        self.inner.attempt
    }

    /// Declares how many steps the job has, so progress reads "n of m".
    pub fn set_total_steps(&self, m: u32) {
        self.lock_state().total = Some(m);
    }

    fn lock_state(&self) -> std::sync::MutexGuard<'_, StepState> {
        match self.inner.state.lock() {
            Ok(s) => s,
            Err(p) => p.into_inner(),
        }
    }

    /// Runs a durable step. If an earlier attempt recorded `name`'s output, that output is
    /// returned and `f` does not run; otherwise `f` runs and its output is recorded (fenced
    /// by the lease) before this returns. A step that fails is not recorded, so a retry
    /// runs it again. An attempt that dies before the output is recorded leaves the step
    /// to run again from its start: its code is at-least-once, but the answers of its
    /// [`chat`](Self::chat) calls that were recorded are reused, not paid again.
    ///
    /// Step outputs are matched by name; a name used again within one job is told apart by
    /// its occurrence (`name`, `name#1`, …), so a loop of same-named steps replays in order
    /// as long as the handler is deterministic up to that point.
    pub async fn step<T, F, Fut>(&self, name: &str, f: F) -> Result<T, LlmError>
    where
        T: Serialize + DeserializeOwned,
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<T, LlmError>>,
    {
        let (key, progress) = {
            let mut st = self.lock_state();
            let k = st.seen.entry(name.to_owned()).or_insert(0);
            let key = if *k == 0 {
                name.to_owned()
            } else {
                format!("{name}#{k}")
            };
            *k += 1;
            st.n += 1;
            let progress = Progress {
                step: name.to_owned(),
                n: st.n,
                m: st.total,
            };
            (key, progress)
        };
        if self.inner.lost.load(Ordering::Relaxed) {
            return Err(lease_lost());
        }
        if let Some(v) = self.inner.recorded.get(&key) {
            return serde_json::from_value(v.clone()).map_err(|e| {
                LlmError::internal(format!(
                    "the recorded output of step `{key}` does not fit its type: {e}"
                ))
            });
        }
        let store = &self.inner.shared.jobs.inner.store;
        self.fenced(
            store
                .set_progress(self.inner.lease, &progress, now_ms())
                .await,
        )?;
        self.inner.shared.jobs.inner.hub.changed(self.inner.id);

        // The step's LLM calls are keyed by this scope (task-local, so steps run
        // concurrently with `join!` each keep their own).
        let scope = StepScope {
            job: self.inner.id,
            step: key.clone(),
            keys: Mutex::new(Vec::new()),
        };
        let (out, keys) = STEP
            .scope(scope, async move {
                let out = f().await;
                (out, STEP.with(|s| s.lock_keys().clone()))
            })
            .await;
        let out = match out {
            Ok(out) => out,
            Err(e) => {
                // A failed step's answers were rejected by the handler (or never came): a
                // retry asks afresh.
                if let Err(fe) = store.forget_calls(self.inner.lease, &keys).await {
                    tracing::debug!(job = %self.inner.id, error = %fe, "forgetting a failed step's calls failed");
                }
                return Err(e);
            }
        };
        let value = serde_json::to_value(&out).map_err(|e| {
            LlmError::internal(format!(
                "the output of step `{key}` cannot be serialized: {e}"
            ))
        })?;
        self.fenced(
            store
                .record_step(self.inner.lease, &key, &value, now_ms())
                .await,
        )?;
        Ok(out)
    }

    fn fenced(&self, r: Result<(), JobError>) -> Result<(), LlmError> {
        match r {
            Ok(()) => Ok(()),
            Err(JobError::LeaseLost) => {
                self.inner.lost.store(true, Ordering::Relaxed);
                Err(lease_lost())
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Sends a chat request through the worker's LLM service (tenant set), collected into
    /// a complete response.
    ///
    /// Within a [`step`](Self::step) (in the step's own task), the call is recorded. Its
    /// key is `"{step}/{n}/{fingerprint}"`: the step's recorded name, the call's index
    /// within the step, and a hash of the request, so it is the same on every attempt of a
    /// handler that is deterministic up to the call. Before sending, the worker notes the
    /// call's start in the store (fenced by the lease); the upstream's answer is written
    /// to the store as soon as it arrives, before this returns. A re-run of the step (the
    /// earlier attempt died or was dropped before the step's output was recorded) finds
    /// the answer under the key and returns it without calling the upstream. The answers
    /// of a step that returned an error are forgotten, so its retry asks afresh.
    ///
    /// The call is sent again only when no answer was recorded: an earlier attempt sent
    /// it and died, or was dropped (timeout, cancel, lost lease, shutdown), before the
    /// answer's record was committed, or that write failed. A paid call and a local
    /// write cannot be made atomic, so that window stays. Each interruption in it costs
    /// one repeat: the re-run sends the call once more and records its answer, and later
    /// re-runs reuse that answer. Repeats are counted in
    /// [`WorkerStats::llm_calls_repeated`].
    ///
    /// The request carries the [`IdempotencyKey`](llm_tower_core::IdempotencyKey)
    /// `"{job id}:{call key}"` (unless it has one, or that is longer than 255 bytes).
    ///
    /// Outside a step the call is not recorded and is sent every time the handler runs.
    pub async fn chat(&self, mut request: ChatRequest) -> Result<ChatResponse, LlmError> {
        if request.tenant().is_none() {
            request.set_tenant(self.inner.tenant.clone());
        }
        request.stream = None;
        let key = STEP
            .try_with(|s| (s.job == self.inner.id).then(|| s.next_key(&request)))
            .ok()
            .flatten();
        match key {
            Some(key) => recorded_call(&self.inner.shared, self.inner.lease, key, request).await,
            None => self.llm().oneshot(request).await?.into_complete().await,
        }
    }

    /// The worker's LLM service. Calls made on it directly are not recorded (see
    /// [`chat`](Self::chat)).
    pub fn llm(&self) -> BoxLlmService {
        self.inner.shared.service.clone()
    }
}

fn lease_lost() -> LlmError {
    LlmError::cancelled("the job's lease was lost (cancelled or taken over by another worker)")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_caps_and_honours_retry_after() {
        let base = Duration::from_millis(100);
        let max = Duration::from_secs(1);
        let d1 = backoff(base, 1, max, None);
        assert!(d1 <= base && d1 >= base * 3 / 4);
        let d3 = backoff(base, 3, max, None);
        assert!(d3 <= base * 4 && d3 >= base * 3);
        let d20 = backoff(base, 20, max, None);
        assert!(d20 <= max && d20 >= max * 3 / 4);
        let ra = backoff(base, 1, max, Some(Duration::from_secs(7)));
        assert_eq!(ra, Duration::from_secs(7));
        // No overflow on absurd attempt counts.
        let big = backoff(
            Duration::from_secs(u64::MAX / 2),
            u32::MAX,
            Duration::MAX,
            None,
        );
        assert!(big > Duration::ZERO);
    }
}
