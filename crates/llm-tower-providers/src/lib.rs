#![doc = include_str!("../README.md")]
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
