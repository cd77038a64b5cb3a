#![doc = include_str!("../README.md")]
#![cfg_attr(docsrs, feature(doc_cfg))]

mod activity;
mod auth;
mod error;
pub mod headers;
mod messages;
mod metrics;
mod native;
#[cfg(feature = "otel")]
#[cfg_attr(docsrs, doc(cfg(feature = "otel")))]
pub mod otel;
mod panics;
mod responses;
mod router;
mod serve;
mod sse;
mod status;

pub use activity::{
    Activity, ActivitySnapshot, FallbackCount, Latency, MAX_SETS_PER_MINUTE, MINUTES,
    ProviderActivity, SinceStart, TimelinePoint, Totals,
};
pub use auth::{ANONYMOUS_TENANT, Auth, AuthFuture, AuthLayer, ClientKey, ClientKeys};
pub use error::{OpenAiError, error_response};
pub use messages::CountTokens;
pub use metrics::Metrics;
pub use panics::{install_panic_counter, panic_count};
pub use router::{DEFAULT_BODY_LIMIT, MakeRequestUuidV7, MetricsAccess, ModelEntry, OpenAiRouter};
pub use serve::{
    ConnectionStats, DEFAULT_BODY_READ_TIMEOUT, DEFAULT_HEADER_READ_TIMEOUT, DEFAULT_IDLE_TIMEOUT,
    DEFAULT_MAX_CONNECTIONS, Server, ShutdownOutcome, serve,
};
pub use sse::sse_body;
pub use status::{STATUS_PAGE, StatusQuery, StatusSource, status_router};
