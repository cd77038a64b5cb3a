#![doc = include_str!("../README.md")]
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
