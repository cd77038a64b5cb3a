//! The [`Jobs`] handle: submit, get, cancel, subscribe to events, register handlers.

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use futures_util::future::BoxFuture;
use futures_util::stream::BoxStream;
use llm_tower_core::{BoxLlmService, ChatRequest, LlmError, Tenant};
use serde::Serialize;
use serde_json::{Value, json};
use tokio::sync::{Notify, broadcast};

use crate::store::JobStore;
use crate::types::{Job, JobError, JobId, JobOptions, NewJob, Submitted, dur_ms, now_ms};
use crate::worker::{JobContext, WorkerBuilder};

/// The kind of a job that runs one chat request through the worker's LLM service.
pub const CHAT_KIND: &str = "chat";

/// The tenant used when a request carries no [`Tenant`] (no auth middleware in front).
pub const DEFAULT_TENANT: &str = "anonymous";

pub(crate) type Handler =
    Arc<dyn Fn(JobContext, Value) -> BoxFuture<'static, Result<Value, LlmError>> + Send + Sync>;

/// In-process signals shared by a [`Jobs`] handle and the workers built from it.
pub(crate) struct Hub {
    /// Wakes idle workers (a submit, a release, or a NOTIFY from another replica).
    pub(crate) work: Arc<Notify>,
    /// "This job changed" for event subscribers.
    pub(crate) events: broadcast::Sender<JobId>,
    /// Jobs running in this process, to drop their work at once on cancel.
    pub(crate) running: Mutex<HashMap<JobId, Arc<Notify>>>,
}

impl Hub {
    pub(crate) fn changed(&self, id: JobId) {
        // No subscriber is fine: events are also found by polling the store.
        let _ = self.events.send(id);
    }
}

pub(crate) struct Inner {
    pub(crate) store: Arc<dyn JobStore>,
    pub(crate) hub: Hub,
    pub(crate) handlers: RwLock<HashMap<String, Handler>>,
    pub(crate) retention: Duration,
    pub(crate) event_poll: Duration,
}

/// The handle to the job system: submit jobs, read them, cancel them, follow their events,
/// register multi-step handlers, and build [`Worker`](crate::Worker)s. Cheap to clone.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// use llm_tower_core::{boxed, ChatRequest, ChatResponse, LlmError, LlmResponse, Message, Tenant};
/// use llm_tower_jobs::{JobOptions, JobStatus, Jobs, SqliteStore};
///
/// let jobs = Jobs::new(SqliteStore::connect("sqlite::memory:").await?);
/// let llm = boxed(tower::service_fn(|req: ChatRequest| async move {
///     Ok::<_, LlmError>(LlmResponse::complete(ChatResponse::from_text(req.model, "Paris")))
/// }));
/// let (worker, handle) = jobs.worker(llm).build();
/// let running = tokio::spawn(worker.run());
///
/// let tenant = Tenant::from("acme");
/// let req = ChatRequest::new("gpt-4o-mini", vec![Message::user("Capital of France?")]);
/// let submitted = jobs.submit_chat(&tenant, req, JobOptions::default()).await?;
/// let done = jobs.wait(&tenant, submitted.job.id).await?.expect("job exists");
/// assert_eq!(done.status, JobStatus::Succeeded);
/// assert_eq!(done.result.unwrap()["choices"][0]["message"]["content"], "Paris");
///
/// handle.shutdown();
/// running.await?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct Jobs {
    pub(crate) inner: Arc<Inner>,
}

impl fmt::Debug for Jobs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let handlers: Vec<String> = self
            .inner
            .handlers
            .read()
            .map(|h| h.keys().cloned().collect())
            .unwrap_or_default();
        f.debug_struct("Jobs")
            .field("store", &self.inner.store)
            .field("handlers", &handlers)
            .field("retention", &self.inner.retention)
            .finish_non_exhaustive()
    }
}

/// Builds a [`Jobs`] handle with non-default settings.
#[derive(Debug)]
pub struct JobsBuilder {
    store: Arc<dyn JobStore>,
    retention: Duration,
    event_poll: Duration,
}

impl JobsBuilder {
    /// How long finished jobs (and their results) are kept (default 24 h). Expired jobs
    /// are invisible at once and deleted by [`Jobs::purge_expired`] (workers call it
    /// periodically).
    #[must_use]
    pub fn retention(mut self, retention: Duration) -> Self {
        self.retention = retention;
        self
    }

    /// How often an event subscriber re-reads the store when no in-process change
    /// arrived (default 500 ms): this is what carries changes made by other replicas.
    #[must_use]
    pub fn event_poll_interval(mut self, every: Duration) -> Self {
        self.event_poll = every.max(Duration::from_millis(1));
        self
    }

    /// The handle.
    pub fn build(self) -> Jobs {
        let (events, _) = broadcast::channel(1024);
        Jobs {
            inner: Arc::new(Inner {
                store: self.store,
                hub: Hub {
                    work: Arc::new(Notify::new()),
                    events,
                    running: Mutex::new(HashMap::new()),
                },
                handlers: RwLock::new(HashMap::new()),
                retention: self.retention,
                event_poll: self.event_poll,
            }),
        }
    }
}

impl Jobs {
    /// A handle over `store` with default settings.
    pub fn new(store: impl JobStore) -> Self {
        Self::builder(store).build()
    }

    /// A handle over the store named by `url`, with default settings:
    /// `postgres://…` / `postgresql://…` → [`PostgresStore`](crate::PostgresStore),
    /// `sqlite:…` → [`SqliteStore::connect`](crate::SqliteStore::connect), anything else
    /// is a file path for [`SqliteStore::open`](crate::SqliteStore::open). Migrations run.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), llm_tower_jobs::JobError> {
    /// let jobs = llm_tower_jobs::Jobs::connect("sqlite::memory:").await?;
    /// # drop(jobs); Ok(()) }
    /// ```
    pub async fn connect(url: &str) -> Result<Self, JobError> {
        Ok(Self::builder_for(url).await?.build())
    }

    /// Like [`connect`](Self::connect), returning the builder for more settings.
    pub async fn builder_for(url: &str) -> Result<JobsBuilder, JobError> {
        Ok(
            if url.starts_with("postgres://") || url.starts_with("postgresql://") {
                Self::builder(crate::PostgresStore::connect(url).await?)
            } else if url.starts_with("sqlite:") {
                Self::builder(crate::SqliteStore::connect(url).await?)
            } else {
                Self::builder(crate::SqliteStore::open(url).await?)
            },
        )
    }

    /// A builder over `store`.
    pub fn builder(store: impl JobStore) -> JobsBuilder {
        JobsBuilder {
            store: Arc::new(store),
            retention: Duration::from_secs(24 * 3600),
            event_poll: Duration::from_millis(500),
        }
    }

    /// The store.
    pub fn store(&self) -> &Arc<dyn JobStore> {
        &self.inner.store
    }

    /// The retention of finished jobs.
    pub fn retention(&self) -> Duration {
        self.inner.retention
    }

    /// Registers a multi-step handler under `name`. Workers built from this handle run the
    /// jobs submitted with that kind (register before building workers; a worker claims only
    /// the kinds it knows). The output is serialized as the job's result.
    ///
    /// ```
    /// # async fn demo(jobs: llm_tower_jobs::Jobs) {
    /// use llm_tower_core::{ChatRequest, Message};
    /// jobs.register("video_pipeline", |ctx, input| async move {
    ///     ctx.set_total_steps(2);
    ///     let topic = input["topic"].as_str().unwrap_or("rust").to_owned();
    ///     let script: String = ctx
    ///         .step("generate_script", || async {
    ///             let req = ChatRequest::new("gpt-4o", vec![Message::user(format!("Script about {topic}"))]);
    ///             Ok(ctx.chat(req).await?.text())
    ///         })
    ///         .await?;
    ///     let scenes: Vec<String> = ctx
    ///         .step("generate_scenes", || async {
    ///             Ok(script.lines().map(str::to_owned).collect())
    ///         })
    ///         .await?;
    ///     Ok(serde_json::json!({ "script": script, "scenes": scenes }))
    /// });
    /// # }
    /// ```
    ///
    /// # Panics
    ///
    /// If `name` is [`CHAT_KIND`] (reserved for chat jobs).
    pub fn register<F, Fut, O>(&self, name: impl Into<String>, handler: F)
    where
        F: Fn(JobContext, Value) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<O, LlmError>> + Send + 'static,
        O: Serialize,
    {
        let name = name.into();
        assert!(name != CHAT_KIND, "the job kind `{CHAT_KIND}` is reserved");
        let handler: Handler = Arc::new(move |ctx, input| {
            let fut = handler(ctx, input);
            Box::pin(async move {
                let out = fut.await?;
                serde_json::to_value(out).map_err(|e| {
                    LlmError::internal(format!("the job's output cannot be serialized: {e}"))
                })
            })
        });
        match self.inner.handlers.write() {
            Ok(mut h) => {
                h.insert(name, handler);
            }
            Err(poisoned) => {
                poisoned.into_inner().insert(name, handler);
            }
        }
    }

    pub(crate) fn handler(&self, kind: &str) -> Option<Handler> {
        match self.inner.handlers.read() {
            Ok(h) => h.get(kind).cloned(),
            Err(p) => p.into_inner().get(kind).cloned(),
        }
    }

    pub(crate) fn kinds(&self) -> Vec<String> {
        let mut kinds: Vec<String> = match self.inner.handlers.read() {
            Ok(h) => h.keys().cloned().collect(),
            Err(p) => p.into_inner().keys().cloned().collect(),
        };
        kinds.push(CHAT_KIND.to_owned());
        kinds
    }

    /// Submits a chat request as a job of kind [`CHAT_KIND`]; returns at once. The request
    /// is validated first (a bad request is [`JobError::BadRequest`]); streaming is turned
    /// off (the result is stored complete). The task type extension is kept.
    pub async fn submit_chat(
        &self,
        tenant: &Tenant,
        mut request: ChatRequest,
        options: JobOptions,
    ) -> Result<Submitted, JobError> {
        request
            .validate()
            .map_err(|e| JobError::BadRequest(e.message().to_owned()))?;
        request.stream = None;
        request.stream_options = None;
        let task = request.task_type().map(|t| t.as_str().to_owned());
        let body =
            serde_json::to_value(&request).map_err(|e| JobError::BadRequest(e.to_string()))?;
        self.submit(
            tenant,
            CHAT_KIND,
            json!({ "request": body, "task_type": task }),
            options,
        )
        .await
    }

    /// Submits a job of `kind` (a registered handler's name) with `input`; returns at once.
    /// With an idempotency key, a repeat returns the first job (`created == false`), and a
    /// different kind or input under the key is [`JobError::Conflict`].
    pub async fn submit(
        &self,
        tenant: &Tenant,
        kind: &str,
        input: impl Serialize,
        options: JobOptions,
    ) -> Result<Submitted, JobError> {
        if kind.is_empty() {
            return Err(JobError::BadRequest(
                "the job kind must not be empty".into(),
            ));
        }
        if let Some(key) = &options.idempotency_key
            && (key.is_empty() || key.len() > 255)
        {
            return Err(JobError::BadRequest(
                "the idempotency key must be 1 to 255 characters".into(),
            ));
        }
        let input = serde_json::to_value(input).map_err(|e| JobError::BadRequest(e.to_string()))?;
        let job = NewJob::new(tenant.as_str(), kind, input).with_options(options);
        let submitted = self.inner.store.submit(job, now_ms()).await?;
        if submitted.created {
            self.inner.hub.work.notify_waiters();
            self.inner.hub.changed(submitted.job.id);
        }
        Ok(submitted)
    }

    /// The tenant's job; `None` if unknown, another tenant's, or expired.
    pub async fn get(&self, tenant: &Tenant, id: JobId) -> Result<Option<Job>, JobError> {
        self.inner.store.get(tenant.as_str(), id, now_ms()).await
    }

    /// Cancels the job: a queued job never runs; a running job's work is dropped (at once
    /// when it runs in this process, at the worker's next lease renewal otherwise) and its
    /// late writes are rejected. A finished job is returned unchanged. `None` if unknown.
    pub async fn cancel(&self, tenant: &Tenant, id: JobId) -> Result<Option<Job>, JobError> {
        let job = self
            .inner
            .store
            .cancel(tenant.as_str(), id, now_ms(), dur_ms(self.inner.retention))
            .await?;
        if job.is_some() {
            let local = match self.inner.hub.running.lock() {
                Ok(r) => r.get(&id).cloned(),
                Err(p) => p.into_inner().get(&id).cloned(),
            };
            if let Some(signal) = local {
                signal.notify_one();
            }
            self.inner.hub.changed(id);
        }
        Ok(job)
    }

    /// The job's states from now on: the current state at once, then every change of
    /// status, attempts or progress, ending with the final state (at once for a finished
    /// job). `None` if unknown. Changes made in this process arrive immediately; changes
    /// made by other replicas within [`JobsBuilder::event_poll_interval`].
    pub async fn events(
        &self,
        tenant: &Tenant,
        id: JobId,
    ) -> Result<Option<BoxStream<'static, Job>>, JobError> {
        // Subscribe before the first read so no change falls between them.
        let rx = self.inner.hub.events.subscribe();
        let Some(first) = self.get(tenant, id).await? else {
            return Ok(None);
        };
        let state = EventState {
            jobs: self.clone(),
            tenant: tenant.clone(),
            id,
            rx,
            last: None,
            pending: Some(first),
            done: false,
        };
        Ok(Some(Box::pin(futures_util::stream::unfold(
            state,
            EventState::next,
        ))))
    }

    /// Waits until the job finishes; returns its final state (`None` if unknown).
    pub async fn wait(&self, tenant: &Tenant, id: JobId) -> Result<Option<Job>, JobError> {
        use futures_util::StreamExt;
        let Some(mut events) = self.events(tenant, id).await? else {
            return Ok(None);
        };
        let mut last = None;
        while let Some(job) = events.next().await {
            last = Some(job);
        }
        Ok(last)
    }

    /// Deletes finished jobs whose retention ended; returns how many.
    pub async fn purge_expired(&self) -> Result<u64, JobError> {
        self.inner.store.purge_expired(now_ms()).await
    }

    /// Starts building a worker that runs jobs through `service` (chat jobs call it
    /// directly; multi-step handlers reach it through [`JobContext::chat`]).
    pub fn worker(&self, service: BoxLlmService) -> WorkerBuilder {
        WorkerBuilder::new(self.clone(), service)
    }
}

struct EventState {
    jobs: Jobs,
    tenant: Tenant,
    id: JobId,
    rx: broadcast::Receiver<JobId>,
    last: Option<Job>,
    pending: Option<Job>,
    done: bool,
}

fn differs(a: &Job, b: &Job) -> bool {
    a.status != b.status
        || a.attempts != b.attempts
        || a.progress != b.progress
        || a.error != b.error
}

impl EventState {
    async fn next(mut self) -> Option<(Job, Self)> {
        if self.done {
            return None;
        }
        loop {
            let job = match self.pending.take() {
                Some(j) => j,
                None => {
                    self.wait_for_change().await;
                    // A read error or a vanished (expired) job ends the stream.
                    self.jobs.get(&self.tenant, self.id).await.ok()??
                }
            };
            if self.last.as_ref().is_none_or(|l| differs(l, &job)) {
                self.done = job.status.is_terminal();
                self.last = Some(job.clone());
                return Some((job, self));
            }
        }
    }

    async fn wait_for_change(&mut self) {
        let poll = tokio::time::sleep(self.jobs.inner.event_poll);
        tokio::pin!(poll);
        loop {
            tokio::select! {
                r = self.rx.recv() => match r {
                    Ok(id) if id != self.id => continue,
                    Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => return,
                    Err(broadcast::error::RecvError::Closed) => {
                        (&mut poll).await;
                        return;
                    }
                },
                () = &mut poll => return,
            }
        }
    }
}
