//! The llm-tower gateway as a library, so tests (and other binaries) build it in-process.
//!
//! - [`config`]: the TOML file, parsed strictly and validated at start.
//! - [`gateway`]: the stack built from the config with llm-tower's public layers, the
//!   OpenAI-compatible router and the jobs worker; [`app`] for the one-call version.
//!
//! ```no_run
//! # #[tokio::main] async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use llm_tower_proxy::{build, config::Config};
//!
//! let config = Config::from_file("examples/proxy/demo.toml")?;
//! let mut gateway = build(&config, &|k: &str| std::env::var(k).ok()).await?;
//! let _worker = gateway.spawn_worker();
//! let listener = tokio::net::TcpListener::bind(config.listen_addr()).await?;
//! // `[server]`'s timeouts and connection cap come with `gateway.server`.
//! let shutdown = async { let _ = tokio::signal::ctrl_c().await; };
//! gateway.server.clone().serve(listener, gateway.router.clone(), shutdown).await?;
//! # Ok(()) }
//! ```

pub mod config;
pub mod gateway;
pub mod reload;
mod status;
pub mod usage;

pub use gateway::{BuildError, Gateway, app, build};
