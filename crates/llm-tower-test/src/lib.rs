//! Test support for llm-tower.
//!
//! - [`MockLlm`]: a scriptable in-process LLM service (responses, errors, latency, streams
//!   that fail after N chunks), recording the requests it saw.
//! - [`MockUpstream`]: a real mock HTTP upstream speaking the OpenAI and Anthropic APIs
//!   (JSON and SSE, error statuses with the providers' bodies and headers, latency, dropped
//!   and malformed streams), scripted with [`Scenario`]s; also the `llm-tower-mock` binary.
//! - [`SimulatedLlm`]: an in-process simulated provider for demos (no network, no key):
//!   plausible deterministic answers, streaming word by word, usage, scripted failures;
//!   re-exported from `llm-tower-providers` (feature `simulated`).
#![cfg_attr(docsrs, feature(doc_cfg))]

mod mock;
pub mod upstream;

pub use mock::{MockFuture, MockLlm, Step};
// The simulated provider lives in llm-tower-providers (feature `simulated`) so the gateway
// ships it without this test-support crate; re-exported so tests keep one import.
pub use llm_tower_providers::simulated::{
    SIMULATED_DIMENSIONS, SimulatedFuture, SimulatedLlm, SimulatedLlmBuilder,
};
pub use upstream::{MockUpstream, MockUpstreamBuilder, RecordedRequest, SCENARIO_HEADER, Scenario};
