//! `llm-tower-mock`: the mock OpenAI / Anthropic upstream as a standalone server.
//!
//! ```text
//! llm-tower-mock --addr 127.0.0.1:9000 [--latency-ms N] [--first-chunk-delay-ms N]
//!                [--chunk-delay-ms N] [--text ...] [--record] [--threads N]
//!                [--tail-share 0.05 --tail-factor 20]
//! ```
//!
//! Serves `POST /v1/chat/completions`, `POST /v1/messages` and `GET /v1/models` with one
//! default scenario; a request can override it with the `x-mock-scenario` header (the
//! scenario as JSON). Stops gracefully on ctrl-c or SIGTERM (in-flight responses finish).
//! The hostile modes (`{"absurd_headers":true}`, `{"huge_body_bytes":50000000}`,
//! `{"endless_body":true}`, `{"header_drip_ms":50}`, …; see `Scenario`) work both ways.
//!
//! Built for load tests: no per-request logging, no request recording unless `--record`.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use llm_tower_test::{MockUpstream, Scenario};

/// Mock OpenAI / Anthropic HTTP upstream for tests, demos and load tests.
#[derive(Debug, Parser)]
#[command(name = "llm-tower-mock", version, about)]
struct Args {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:9000", env = "LLM_TOWER_MOCK_ADDR")]
    addr: SocketAddr,
    /// Delay before the response headers, in milliseconds.
    #[arg(long, default_value_t = 0)]
    latency_ms: u64,
    /// Streams: delay after the headers before the first event, in milliseconds.
    #[arg(long, default_value_t = 0)]
    first_chunk_delay_ms: u64,
    /// Streams: delay between events, in milliseconds.
    #[arg(long, default_value_t = 0)]
    chunk_delay_ms: u64,
    /// Answer text (default: "mock answer to: " and the last user text).
    #[arg(long)]
    text: Option<String>,
    /// Default scenario as JSON (the `x-mock-scenario` form); the flags above refine it.
    #[arg(long)]
    scenario: Option<String>,
    /// Record requests in memory (off by default: memory would grow under load).
    #[arg(long)]
    record: bool,
    /// A share (0–1) of requests that are `--tail-factor` times slower (latency and first
    /// chunk delay), e.g. `--tail-share 0.05 --tail-factor 20`.
    #[arg(long, default_value_t = 0.0)]
    tail_share: f64,
    /// How many times slower a request in the tail is.
    #[arg(long, default_value_t = 20)]
    tail_factor: u32,
    /// Runtime worker threads (default: the CPUs this process may run on).
    #[arg(long)]
    threads: Option<usize>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let mut rt = tokio::runtime::Builder::new_multi_thread();
    rt.enable_all();
    if let Some(n) = args.threads {
        rt.worker_threads(n.max(1));
    }
    let rt = match rt.build() {
        Ok(rt) => rt,
        Err(e) => return fail(&format!("cannot start the runtime: {e}")),
    };
    rt.block_on(run(args))
}

#[allow(clippy::print_stderr)] // a CLI reports on stderr
fn fail(msg: &str) -> ExitCode {
    eprintln!("llm-tower-mock: {msg}");
    ExitCode::FAILURE
}

#[allow(clippy::print_stderr)]
async fn run(args: Args) -> ExitCode {
    let mut scenario = match &args.scenario {
        Some(json) => match Scenario::from_json(json) {
            Ok(s) => s,
            Err(e) => return fail(&format!("invalid --scenario: {e}")),
        },
        None => Scenario::ok(),
    };
    if args.latency_ms > 0 {
        scenario = scenario.latency(Duration::from_millis(args.latency_ms));
    }
    if args.first_chunk_delay_ms > 0 {
        scenario = scenario.first_chunk_delay(Duration::from_millis(args.first_chunk_delay_ms));
    }
    if args.chunk_delay_ms > 0 {
        scenario = scenario.chunk_delay(Duration::from_millis(args.chunk_delay_ms));
    }
    if let Some(t) = args.text {
        scenario = scenario.text(t);
    }
    let upstream = match MockUpstream::builder()
        .addr(args.addr)
        .default_scenario(scenario)
        .record_requests(args.record)
        .latency_tail(args.tail_share, args.tail_factor)
        .start()
        .await
    {
        Ok(u) => u,
        Err(e) => return fail(&format!("cannot listen on {}: {e}", args.addr)),
    };
    // Register the handlers before announcing the address, so a signal sent right after
    // the announcement is never missed.
    let stop = match shutdown_signal() {
        Ok(stop) => stop,
        Err(e) => return fail(&format!("cannot install signal handlers: {e}")),
    };
    eprintln!("llm-tower-mock listening on {}", upstream.base_url());
    stop.await;
    eprintln!("llm-tower-mock: shutting down");
    upstream.shutdown().await;
    ExitCode::SUCCESS
}

/// Resolves on SIGINT (ctrl-c) or SIGTERM; the handlers are installed when this returns.
#[cfg(unix)]
fn shutdown_signal() -> std::io::Result<impl Future<Output = ()>> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut int = signal(SignalKind::interrupt())?;
    let mut term = signal(SignalKind::terminate())?;
    Ok(async move {
        tokio::select! {
            _ = int.recv() => {}
            _ = term.recv() => {}
        }
    })
}

/// Resolves on ctrl-c.
#[cfg(not(unix))]
fn shutdown_signal() -> std::io::Result<impl Future<Output = ()>> {
    Ok(async {
        let _ = tokio::signal::ctrl_c().await;
    })
}
