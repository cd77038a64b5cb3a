//! The OpenAI-compatible HTTP surface of llm-tower, as an axum [`Router`](axum::Router)
//! over any LLM service: `Service<ChatRequest, Response = LlmResponse, Error = LlmError>`.
//!
//! # Overview
//!
//! - [`OpenAiRouter`]: the consuming builder: `POST /v1/chat/completions` (JSON and SSE),
//!   `POST /v1/embeddings` (through the same service: see `llm_tower_core::embeddings`),
//!   `POST /v1/messages` and `/v1/messages/count_tokens` (the Anthropic Messages API on
//!   the same service, Anthropic-format errors), `POST /v1/responses` with
//!   `GET` / `DELETE /v1/responses/{id}` (the OpenAI Responses API, stored responses in a
//!   `ResponseStore`), `GET /v1/models`, `GET /healthz`,
//!   `GET /metrics`; OpenAI-format errors for everything else, including 404/405/413 and
//!   panics.
//! - [`AuthLayer`] / [`ClientKeys`]: `Authorization: Bearer <key>` (or `x-api-key`) → [`Tenant`](llm_tower_core::Tenant)
//!   in the request extensions; reusable on other routers (jobs).
//! - [`error_response`] / [`OpenAiError`]: an [`LlmError`](llm_tower_core::LlmError) as
//!   an HTTP response (status, OpenAI JSON, `retry-after`).
//! - [`Metrics`]: Prometheus metrics (private recorder by default, or installed globally).
//! - [`Activity`]: per-minute sums of the last hour (by task, tenant, model, provider) for
//!   humans; [`status_router`]: `GET /status` as JSON from a [`StatusSource`], or the
//!   embedded status page for a browser, with the access of `/metrics`.
//! - [`headers`]: the header names and the header ↔ extension / meta mapping.
//! - [`sse_body`]: OpenAI's SSE framing of a chunk stream.
//! - [`Server`] / [`serve`]: serving with header and idle timeouts, a connection cap,
//!   graceful shutdown and a deadline.
//!
//! # Behaviour
//!
//! - **Streams.** With `"stream": true` the answer is `text/event-stream`: one
//!   `data: {chunk}\n\n` per chunk, then `data: [DONE]\n\n`. Headers are sent when the
//!   first chunk is ready, so a failure before it is an ordinary HTTP error; a failure
//!   after it is sent as `data: {"error": {...}}\n\n` and the stream ends **without**
//!   `[DONE]`. A complete answer to a stream request is converted to chunks; a stream
//!   answer to a non-stream request is aggregated.
//! - **Response headers**: `x-request-id`, `x-llm-provider`, `x-llm-model`,
//!   `x-llm-cache`, `x-llm-attempts`, `x-llm-cost-usd`, `x-ratelimit-remaining-requests`
//!   / `-tokens` (when a local limit applies) and `server-timing: gateway;dur=…,
//!   upstream;dur=…` (milliseconds; gateway = time to headers − upstream time).
//! - **Request headers**: `x-llm-task` → `TaskType`, `idempotency-key` →
//!   `IdempotencyKey`, `cache-control: no-cache` / `no-store` → `CachePolicy`. The tenant
//!   only ever comes from the client key. The request id is also put into the
//!   `ChatRequest` extensions as a `tower_http::request_id::RequestId`.
//! - **Authentication** is off when no key is configured (tenant `"anonymous"`).
//!   `/healthz` never requires a key; `/metrics` is public unless
//!   [`OpenAiRouter::metrics_access`] says otherwise (a bearer token, or off here and
//!   served on a listener of its own with [`Metrics::router`]).
//!
//! # Example
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! use http_body_util::BodyExt;
//! use llm_tower_axum::OpenAiRouter;
//! use llm_tower_core::{ChatRequest, ChatResponse, LlmError, LlmResponse};
//! use tower::ServiceExt;
//!
//! let llm = tower::service_fn(|req: ChatRequest| async move {
//!     Ok::<_, LlmError>(LlmResponse::complete(ChatResponse::from_text(req.model, "Hello!")))
//! });
//! let app = OpenAiRouter::new(llm).models(["gpt-4o-mini"]).into_router();
//!
//! let req = http::Request::post("/v1/chat/completions")
//!     .body(axum::body::Body::from(
//!         r#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"Hi"}],"stream":true}"#,
//!     ))
//!     .unwrap();
//! let resp = app.oneshot(req).await.unwrap();
//! assert_eq!(resp.headers()["content-type"], "text/event-stream");
//! let body = resp.into_body().collect().await.unwrap().to_bytes();
//! assert!(body.ends_with(b"data: [DONE]\n\n"));
//! # }
//! ```
//!
//! # Supported Rust versions
//!
//! The workspace's `rust-version` (1.94) is the minimum supported.
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
