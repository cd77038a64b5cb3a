//! Test support for llm-tower.
//!
//! - [`MockLlm`]: a scriptable in-process LLM service (responses, errors, latency, streams
//!   that fail after N chunks), recording the requests it saw.
//! - (the mock HTTP upstream, speaking the OpenAI and Anthropic APIs, lives in `upstream`
//!   and is also the `llm-tower-mock` binary.)
#![cfg_attr(docsrs, feature(doc_cfg))]

mod mock;

pub use mock::{MockFuture, MockLlm, Step};
