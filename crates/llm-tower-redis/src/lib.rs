#![doc = include_str!("../README.md")]
#![cfg_attr(docsrs, feature(doc_cfg))]

mod conn;
mod settle;
pub use conn::{RedisConn, RedisOptions, RedisStoreError};

pub mod budget;
pub mod cache;
pub mod headroom;
pub mod rate_limit;
