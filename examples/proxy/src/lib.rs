#![doc = include_str!("../README.md")]

pub mod config;
pub mod gateway;
pub mod reload;
mod status;
pub mod telemetry;
pub mod usage;

pub use gateway::{BuildError, Gateway, app, build};
