#![doc = include_str!("../README.md")]

pub mod compare;
pub mod config;
pub mod eval;
pub mod gateway;
pub mod reload;
pub mod shadow;
mod status;
pub mod telemetry;
pub mod usage;

pub use gateway::{BuildError, Gateway, app, build};
