//! The contract every llm-tower layer and provider speaks:
//! `async fn(ChatRequest) -> Result<LlmResponse, LlmError>`.
//!
//! # Overview
//!
//! - [`ChatRequest`]: the OpenAI chat-completions request, typed where layers act and
//!   lossless for every other field; typed metadata for layers rides in its
//!   [`extensions`](ChatRequest::extensions) ([`TaskType`], [`Tenant`], [`IdempotencyKey`],
//!   [`Deadline`], [`CachePolicy`]).
//! - [`LlmResponse`]: a complete [`ChatResponse`] (or an [`EncodedResponse`], the same kept
//!   as the JSON an upstream sent) or a [`ChunkStream`] of [`ChatChunk`]s,
//!   plus [`ResponseMeta`] (provider, model, attempts, cache status, usage, cost, headroom,
//!   upstream time).
//! - The **stream completion hook** ([`LlmResponse::on_finish`]): accounting layers learn
//!   exactly once whether a response completed (with its usage), failed, or was dropped.
//! - [`LlmError`]: one classified error with [`ErrorKind`], `is_retryable()`,
//!   `should_fall_back()`, the HTTP status and the OpenAI error body.
//! - [`LlmService`] and the boxed [`BoxLlmService`].
//! - [`dialect`]: requests in other wire formats (Anthropic Messages) as the chat view
//!   plus their original body ([`NativeRequest`]), and the translations both ways.
//!
//! # Example
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), llm_tower_core::LlmError> {
//! use llm_tower_core::{ChatRequest, ChatResponse, LlmError, LlmResponse, Message};
//! use tower::{Service, ServiceExt};
//!
//! let mut llm = tower::service_fn(|req: ChatRequest| async move {
//!     Ok::<_, LlmError>(LlmResponse::complete(ChatResponse::from_text(req.model, "Hello!")))
//! });
//! let req = ChatRequest::new("gpt-4o-mini", vec![Message::user("Hi")]).with_task_type("greet");
//! let resp = llm.ready().await?.call(req).await?;
//! assert_eq!(resp.into_complete().await?.text(), "Hello!");
//! # Ok(()) }
//! ```
//!
//! # Supported Rust versions
//!
//! The workspace's `rust-version` (1.94) is the minimum supported.
#![cfg_attr(docsrs, feature(doc_cfg))]

mod aggregate;
mod body;
pub mod dialect;
mod encoded;
mod error;
mod ext;
mod json;
mod meta;
mod nullable;
mod request;
mod response;
mod service;

pub use aggregate::StreamAccumulator;
pub use body::{BoxChunkStream, ChunkStream, LlmResponse, Outcome, ResponseBody};
pub use dialect::{Dialect, NativeRequest};
pub use encoded::EncodedResponse;
pub use error::{ErrorKind, LlmError, MAX_RETRY_AFTER};
pub use ext::{CachePolicy, Deadline, IdempotencyKey, TaskType, Tenant};
pub use meta::{
    Attempt, AttemptError, CacheStatus, Cost, LocalLimits, NanoUsd, PaidAttempt, RateLimitHeadroom,
    ResponseMeta,
};
pub use request::{
    ChatRequest, Content, ContentPart, Extra, FunctionCall, FunctionDef, ImageUrl, InputAudio,
    JsonSchemaFormat, MAX_REQUEST_BYTES, Message, ResponseFormat, Role, StreamOptions, Tool,
    ToolCall,
};
pub use response::{
    ChatChunk, ChatResponse, Choice, ChunkChoice, CompletionTokensDetails, Delta,
    FunctionCallDelta, PromptTokensDetails, ToolCallDelta, Usage,
};
pub use service::{BoxLlmService, LlmService, boxed};
