//! Redis stores for llm-tower, so that many gateway replicas share one cache, one set of
//! rate limits (with the provider headroom each replica learns) and one budget.
//!
//! Every operation runs through [`RedisConn`]: a hard timeout and a circuit breaker, so a
//! Redis outage never hangs a request; each store documents whether it fails open or closed.
//! Budgets and token limits keep a ledger of holds with ids and expiries
//! ([`llm_tower::ledger`]), so a Redis that stalls, answers late, restarts or loses data
//! never makes a request count twice or spend go down: see [`budget`] and [`rate_limit`].
#![cfg_attr(docsrs, feature(doc_cfg))]

mod conn;
mod settle;
pub use conn::{RedisConn, RedisOptions, RedisStoreError};

pub mod budget;
pub mod cache;
pub mod headroom;
pub mod rate_limit;
