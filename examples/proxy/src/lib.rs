#![doc = include_str!("../README.md")]

pub mod config;
pub mod gateway;
pub mod telemetry;

pub use gateway::{BuildError, Gateway, app, build};
