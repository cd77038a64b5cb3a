#![doc = include_str!("../README.md")]
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
