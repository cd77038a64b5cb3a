//! Async and durable, idempotent LLM jobs for llm-tower.
//!
//! - **Async first**: submitting a chat request returns a job id at once; workers run it
//!   through the LLM stack; clients poll (`GET /v1/jobs/{id}`) or are pushed changes
//!   (`GET /v1/jobs/{id}/events`, server-sent events; `GET /v1/jobs/ws`, a WebSocket for many
//!   jobs: [`ws`]).
//! - **Durable multi-step jobs**: a handler is ordinary async Rust made of named steps,
//!   `ctx.step("generate_script", || async { … }).await?`. Each completed step's output is
//!   recorded (fenced by the lease) before the next runs; after a crash another worker
//!   resumes the job and recorded steps return their recorded output without running.
//!   Within a step, each LLM call's answer ([`JobContext::chat`]) is recorded as soon as
//!   it arrives, so a re-run of the step does not pay for it again; a call is sent twice
//!   only when its worker died (or its attempt was dropped) between sending it and
//!   recording the answer (see [`JobContext::chat`]).
//! - **Idempotency keys**: the same key (per tenant) returns the same job and its result,
//!   never a second LLM call; a different request under a used key is a conflict (409).
//! - **Leases and fencing**: a worker holds a job under a lease it renews; a dead worker's
//!   job is claimed again once the lease expires; every claim increments the job's epoch
//!   and every write names it, so a stale worker's late writes are rejected.
//! - **Stores** behind [`JobStore`]: [`SqliteStore`] (embedded, one file, default) and
//!   [`PostgresStore`] (replicas share one queue; `FOR UPDATE SKIP LOCKED`,
//!   `LISTEN/NOTIFY`). Results expire after a configurable retention.
//!
//! # Public API
//!
//! - [`Jobs`] (from [`Jobs::new`] / [`Jobs::builder`]): [`submit_chat`](Jobs::submit_chat),
//!   [`submit`](Jobs::submit) (named handler), [`get`](Jobs::get),
//!   [`cancel`](Jobs::cancel), [`events`](Jobs::events), [`wait`](Jobs::wait),
//!   [`register`](Jobs::register), [`purge_expired`](Jobs::purge_expired),
//!   [`worker`](Jobs::worker).
//! - [`Worker`] + [`WorkerHandle`] from [`WorkerBuilder::build`]; run
//!   [`Worker::run`] (or [`Worker::run_until`]) where you like, stop with
//!   [`WorkerHandle::shutdown`].
//! - [`JobContext`] for handlers: [`step`](JobContext::step),
//!   [`set_total_steps`](JobContext::set_total_steps), [`chat`](JobContext::chat).
//! - [`jobs_router`] / [`jobs_router_with`] ([`JobsApiLimits`]): the HTTP endpoints as
//!   an axum `Router` (feature `http`, on by default).
//!
//! # Clocks
//!
//! Database timestamps (`run_at`, lease expiry, retention) are wall-clock Unix
//! milliseconds, so several processes agree on them; in-process timers (lease renewal,
//! polling, per-attempt timeouts) use tokio's clock.
//!
//! # Example: a durable two-step job
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use llm_tower_core::{boxed, ChatRequest, ChatResponse, LlmError, LlmResponse, Message, Tenant};
//! use llm_tower_jobs::{JobOptions, JobStatus, Jobs, SqliteStore};
//!
//! let jobs = Jobs::new(SqliteStore::connect("sqlite::memory:").await?);
//! jobs.register("explain", |ctx, input| async move {
//!     ctx.set_total_steps(2);
//!     let topic = input["topic"].as_str().unwrap_or_default().to_owned();
//!     let outline: String = ctx
//!         .step("outline", || async {
//!             let req = ChatRequest::new("m", vec![Message::user(format!("Outline {topic}"))]);
//!             Ok(ctx.chat(req).await?.text())
//!         })
//!         .await?;
//!     let words = ctx.step("count", || async { Ok(outline.split_whitespace().count()) }).await?;
//!     Ok(serde_json::json!({ "outline": outline, "words": words }))
//! });
//!
//! let llm = boxed(tower::service_fn(|req: ChatRequest| async move {
//!     Ok::<_, LlmError>(LlmResponse::complete(ChatResponse::from_text(req.model, "one two three")))
//! }));
//! let (worker, handle) = jobs.worker(llm).build();
//! let running = tokio::spawn(worker.run());
//!
//! let tenant = Tenant::from("acme");
//! let job = jobs.submit(&tenant, "explain", serde_json::json!({"topic": "tides"}), JobOptions::default()).await?;
//! let done = jobs.wait(&tenant, job.job.id).await?.expect("job exists");
//! assert_eq!(done.status, JobStatus::Succeeded);
//! assert_eq!(done.result.unwrap()["words"], 3);
//!
//! handle.shutdown();
//! running.await?;
//! # Ok(()) }
//! ```

#![cfg_attr(docsrs, feature(doc_cfg))]

#[cfg(feature = "http")]
mod http;
mod jobs;
mod store;
mod types;
mod worker;
#[cfg(feature = "http")]
#[cfg_attr(docsrs, doc(cfg(feature = "http")))]
pub mod ws;

#[cfg(feature = "http")]
#[cfg_attr(docsrs, doc(cfg(feature = "http")))]
pub use http::{DEFAULT_JOBS_BODY_LIMIT, JobsApiLimits, jobs_router, jobs_router_with};
pub use jobs::{CHAT_KIND, DEFAULT_TENANT, Jobs, JobsBuilder};
pub use store::{JobStore, PostgresStore, SqliteStore, StoreFuture};
pub use types::{
    Finish, Job, JobError, JobErrorInfo, JobId, JobOptions, JobStatus, Lease, LlmCall, NewJob,
    Progress, Submitted,
};
pub use worker::{FaultPoint, JobContext, Worker, WorkerBuilder, WorkerHandle, WorkerStats};
#[cfg(feature = "http")]
#[cfg_attr(docsrs, doc(cfg(feature = "http")))]
pub use ws::{JobsWsLimits, JobsWsStats};
