//! Real HTTP clients that are LLM services: an OpenAI-compatible provider and an Anthropic
//! Messages provider, on one shared, pooled hyper client with rustls.
//!
//! # Overview
//!
//! - [`HttpClient`]: the transport, built **once** and shared by every provider (hyper 1 +
//!   hyper-util's pooled client, rustls with the `ring` provider and webpki roots,
//!   HTTP/1.1 and HTTP/2, keep-alive, connect timeout, bounded idle pool).
//! - [`OpenAiProvider`] ([`OpenAiConfig`]): OpenAI, OpenRouter, Groq, Together, vLLM,
//!   Ollama, LM Studio, anything speaking `/v1/chat/completions`.
//! - [`AnthropicProvider`] ([`AnthropicConfig`]): the Messages API, translated to and from
//!   the chat-completions shapes, with prompt caching.
//! - [`ProviderConfig`]: either config, tagged by `kind`, for configuration files;
//!   [`ProviderConfig::build`] gives a [`BoxLlmService`](llm_tower_core::BoxLlmService).
//! - [`ApiKey`]: a key that never shows in `Debug`, errors or logs.
//! - `SimulatedLlm` (feature `simulated`): an in-process simulated provider for demos and
//!   evaluations: no network, no key, deterministic answers, scripted failures and quality
//!   knobs.
//! - [`sse::SseParser`]: the incremental server-sent events parser both providers use.
//!
//! Errors are classified from the status, headers and body (rate limited with
//! retry-after, unavailable, overloaded, context length, content filtered, auth,
//! transport, malformed upstream data); rate-limit headroom (`x-ratelimit-*`,
//! `anthropic-ratelimit-*`) lands in [`ResponseMeta::headroom`](llm_tower_core::ResponseMeta).
//!
//! # Example
//!
//! ```no_run
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), llm_tower_core::LlmError> {
//! use llm_tower_core::{ChatRequest, Message};
//! use llm_tower_providers::{HttpClient, OpenAiConfig, OpenAiProvider};
//! use tower::ServiceExt;
//!
//! let client = HttpClient::with_defaults()?;
//! let openai = OpenAiProvider::new(OpenAiConfig::default(), &client)?; // key from OPENAI_API_KEY
//! let req = ChatRequest::new("gpt-4o-mini", vec![Message::user("Hi")]);
//! let resp = openai.oneshot(req).await?;
//! println!("{} via {:?}", resp.meta.model.clone().unwrap_or_default(), resp.meta.provider);
//! # Ok(()) }
//! ```
#![cfg_attr(docsrs, feature(doc_cfg))]

pub mod anthropic;
mod classify;
mod common;
mod config;
mod http;
mod limits;
mod openai;
mod quick;
mod secret;
#[cfg(feature = "simulated")]
#[cfg_attr(docsrs, doc(cfg(feature = "simulated")))]
pub mod simulated;
pub mod sse;
#[cfg(test)]
mod stream_tests;

pub use anthropic::{AnthropicConfig, AnthropicProvider};
pub use classify::MAX_UPSTREAM_DELAY;
pub use common::ResponseFuture;
pub use config::ProviderConfig;
pub use http::{HttpClient, HttpClientConfig, TlsRoots};
pub use limits::ResponseLimits;
pub use openai::{OpenAiConfig, OpenAiProvider};
pub use secret::{ApiKey, Secret};
#[cfg(feature = "simulated")]
#[cfg_attr(docsrs, doc(cfg(feature = "simulated")))]
pub use simulated::{SIMULATED_DIMENSIONS, SimulatedFuture, SimulatedLlm, SimulatedLlmBuilder};
