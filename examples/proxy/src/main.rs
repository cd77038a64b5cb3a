//! `llm-tower-proxy`: the OpenAI-compatible gateway, configured by one TOML file.
//!
//! ```text
//! llm-tower-proxy [--config FILE]      serve (default: examples/proxy/demo.toml of this crate)
//! llm-tower-proxy --config FILE --check  validate the file and the secrets it names, then exit
//! llm-tower-proxy hash-key < key.txt     print the BLAKE3 digest of a client key (for key_blake3)
//! llm-tower-proxy usage [--window 60] [--json]  cost and tokens of the running gateway
//! llm-tower-proxy eval --task T --dataset F --candidate A --candidate B …  compare candidates
//! ```
//!
//! Stops on ctrl-c or SIGTERM: stops accepting, lets in-flight requests and streams finish
//! for `server.shutdown_grace_secs`, stops the jobs worker, then exits. On SIGHUP it reads
//! the file again and swaps the new stack in (a file that does not validate is refused and
//! the old one keeps serving; see docs/operations.md).

use std::io::Read;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use llm_tower_axum::{Server, ShutdownOutcome};
use llm_tower_proxy::config::{Config, blake3_hex};
use llm_tower_proxy::reload::Live;
use tracing_subscriber::EnvFilter;

#[derive(Debug, Parser)]
#[command(
    name = "llm-tower-proxy",
    version,
    about = "OpenAI-compatible LLM gateway built from llm-tower layers"
)]
struct Cli {
    /// The TOML configuration file (relative paths in it resolve against its directory).
    #[arg(long, short, env = "LLM_TOWER_CONFIG", default_value_os_t = default_config())]
    config: PathBuf,
    /// Only validate the configuration (and that the secrets it names are set), then exit.
    #[arg(long)]
    check: bool,
    /// Log as JSON lines instead of text.
    #[arg(long)]
    json_logs: bool,
    /// Threads serving requests (default: the CPUs this process may run on). With 1, the
    /// runtime is single-threaded: no work-stealing bookkeeping on every wake-up, the
    /// better choice for a gateway pinned to one core or run as a sidecar.
    #[arg(long, env = "LLM_TOWER_WORKER_THREADS")]
    worker_threads: Option<std::num::NonZeroUsize>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Read a client key from stdin and print its BLAKE3 digest, for `key_blake3`.
    HashKey,
    /// Print cost and tokens per task type, tenant and model over a window, read from the
    /// running gateway's `/status` (the address and metrics token come from the config).
    Usage {
        /// The window, in minutes (1 to 60).
        #[arg(long, default_value_t = 60)]
        window: u32,
        /// Print the JSON (the `activity` part of `/status`) instead of tables.
        #[arg(long)]
        json: bool,
        /// The gateway's base URL (plain `http://`; default: `server.listen`, or
        /// `server.metrics_listen` when `/status` is served there).
        #[arg(long)]
        url: Option<String>,
    },
    /// Run a dataset (JSONL of chat requests) through candidate chains or provider/model
    /// pairs with a task's validator; print pass rate, match, agreement, latency, tokens
    /// and cost per candidate (see docs/eval-and-shadow.md).
    Eval(EvalCli),
}

#[derive(Debug, clap::Args)]
struct EvalCli {
    /// The task type (its validator applies; requests carry it).
    #[arg(long)]
    task: String,
    /// The dataset: one chat request per line, optional `id` and `expected`.
    #[arg(long)]
    dataset: PathBuf,
    /// A candidate: a chain of the configuration, or provider/model (repeat).
    #[arg(long = "candidate", required = true)]
    candidates: Vec<String>,
    /// The candidate the others are compared with.
    #[arg(long)]
    reference: Option<String>,
    /// Calls in flight at once.
    #[arg(long, default_value_t = 4)]
    concurrency: usize,
    /// Stop starting calls once this run has cost this much (USD).
    #[arg(long)]
    max_spend_usd: Option<f64>,
    /// Go through the configured cache (bypassed by default).
    #[arg(long)]
    use_cache: bool,
    /// Where results are kept and resumed from (default: DATASET.results.jsonl).
    #[arg(long)]
    results: Option<PathBuf>,
    /// Start over: forget the results file's earlier results.
    #[arg(long)]
    fresh: bool,
    /// Longest a call may take, in seconds.
    #[arg(long, default_value_t = 120)]
    timeout_secs: u64,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

fn default_config() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/demo.toml"))
}

// See the mimalloc line in Cargo.toml for why.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Some(Command::HashKey) = cli.command {
        return hash_key();
    }
    if let Some(Command::Usage { window, json, url }) = &cli.command {
        let Ok(rt) = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        else {
            return ExitCode::FAILURE;
        };
        return rt.block_on(llm_tower_proxy::usage::run(
            &cli.config,
            url.as_deref(),
            *window,
            *json,
        ));
    }
    if let Some(Command::Eval(e)) = &cli.command {
        let Ok(rt) = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
        else {
            return ExitCode::FAILURE;
        };
        return rt.block_on(eval_main(&cli.config, e));
    }
    let threads = cli
        .worker_threads
        .or_else(|| std::thread::available_parallelism().ok())
        .map_or(1, std::num::NonZeroUsize::get);
    let runtime = if threads == 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .enable_all()
            .build()
    };
    match runtime {
        Ok(rt) => rt.block_on(serve_main(cli)),
        Err(e) => {
            #[allow(clippy::print_stderr)] // logging is not set up yet
            {
                eprintln!("cannot start the async runtime: {e}");
            }
            ExitCode::FAILURE
        }
    }
}

async fn serve_main(cli: Cli) -> ExitCode {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    if cli.json_logs {
        tracing_subscriber::fmt()
            .with_env_filter(filter)
            .json()
            .init();
    } else {
        tracing_subscriber::fmt().with_env_filter(filter).init();
    }
    match run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            ExitCode::FAILURE
        }
    }
}

async fn eval_main(config: &std::path::Path, e: &EvalCli) -> ExitCode {
    use llm_tower_proxy::eval;
    let results = e.results.clone().unwrap_or_else(|| {
        let mut name = e.dataset.clone().into_os_string();
        name.push(".results.jsonl");
        PathBuf::from(name)
    });
    if e.fresh
        && let Err(err) = std::fs::remove_file(&results)
        && err.kind() != std::io::ErrorKind::NotFound
    {
        #[allow(clippy::print_stderr)] // the command's error
        {
            eprintln!(
                "llm-tower-proxy eval: cannot remove {}: {err}",
                results.display()
            );
        }
        return ExitCode::FAILURE;
    }
    let spend_cap = match e.max_spend_usd.map(llm_tower::cost::usd_to_nano) {
        Some(None) => {
            #[allow(clippy::print_stderr)] // the command's error
            {
                eprintln!("llm-tower-proxy eval: --max-spend-usd must be a non-negative amount");
            }
            return ExitCode::FAILURE;
        }
        Some(Some(n)) => Some(n),
        None => None,
    };
    let mut options = eval::EvalOptions::new(e.task.clone());
    options.concurrency = e.concurrency.clamp(1, 1024);
    options.spend_cap = spend_cap;
    options.reference = e.reference.clone();
    options.use_cache = e.use_cache;
    options.results = Some(results);
    options.timeout = std::time::Duration::from_secs(e.timeout_secs.max(1));
    eval::main(eval::EvalArgs {
        config: config.to_path_buf(),
        dataset: e.dataset.clone(),
        candidates: e.candidates.clone(),
        options,
        json: e.json,
    })
    .await
}

fn hash_key() -> ExitCode {
    let mut key = String::new();
    if std::io::stdin().read_to_string(&mut key).is_err() {
        return ExitCode::FAILURE;
    }
    let key = key.trim_end_matches(['\n', '\r']);
    if key.is_empty() {
        return ExitCode::FAILURE;
    }
    #[allow(clippy::print_stdout)] // the command's output
    {
        println!("{}", blake3_hex(key));
    }
    ExitCode::SUCCESS
}

async fn run(cli: Cli) -> Result<(), Box<dyn std::error::Error>> {
    let config = Config::from_file(&cli.config)?;
    if cli.check {
        config.resolve_secrets(|k| std::env::var(k).ok())?;
        tracing::info!(config = %cli.config.display(), "configuration is valid");
        return Ok(());
    }
    let (live, mut gateway) = Live::start(&cli.config, |k: &str| std::env::var(k).ok()).await?;
    let live = std::sync::Arc::new(live);
    let worker = gateway.spawn_worker();
    let addr = live.listen_addr();
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| format!("cannot listen on {addr}: {e}"))?;
    tracing::info!(
        addr = %listener.local_addr()?,
        config = %cli.config.display(),
        providers = config.providers.len(),
        chains = config.chains.len(),
        "llm-tower-proxy listening"
    );
    if let Some((addr, router)) = gateway.metrics_listener.take() {
        let metrics_listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|e| format!("cannot listen on {addr} (server.metrics_listen): {e}"))?;
        tracing::info!(addr = %metrics_listener.local_addr()?, "/metrics listening");
        // Ends with the process: scrapes need no draining.
        tokio::spawn(Server::new().serve(metrics_listener, router, std::future::pending()));
    }
    tokio::spawn(keep_timer_armed());
    #[cfg(unix)]
    tokio::spawn(reload_on_sighup(live.clone()));
    let outcome = gateway
        .server
        .clone()
        .serve(listener, live.router(), shutdown_signal())
        .await?;
    match outcome {
        ShutdownOutcome::Graceful => tracing::info!("all in-flight requests finished"),
        ShutdownOutcome::DeadlineExceeded => {
            tracing::warn!("shutdown deadline passed; remaining requests were cut");
        }
    }
    if let Some((handle, task)) = worker {
        handle.shutdown();
        // The worker has its own grace (the same), then releases unfinished jobs.
        let _ = task.await;
    }
    if let Some(t) = gateway.telemetry.take() {
        // Blocking (it waits for the exporters): off the runtime's threads.
        let _ = tokio::task::spawn_blocking(move || t.shutdown()).await;
    }
    Ok(())
}

/// Reloads the configuration on every SIGHUP (one at a time; see `reload::Live`).
#[cfg(unix)]
async fn reload_on_sighup(live: std::sync::Arc<Live>) {
    let Ok(mut hup) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) else {
        tracing::warn!("cannot listen for SIGHUP: reload is off");
        return;
    };
    while hup.recv().await.is_some() {
        match live.reload().await {
            Ok(report) if report.restart_needed.is_empty() => {
                tracing::info!(config = %live.path().display(), "configuration reloaded");
            }
            Ok(report) => tracing::warn!(
                config = %live.path().display(),
                restart_needed = ?report.restart_needed,
                "configuration reloaded; these settings changed but apply only after a restart"
            ),
            Err(e) => {
                tracing::error!("reload refused, the previous configuration keeps serving: {e}");
            }
        }
    }
}

/// Keeps a timer due within a second, forever.
///
/// Why: tokio's timer driver is woken (a write to its eventfd, then one more `epoll_wait`)
/// whenever a timer is set to fire before the driver's next planned wake-up, and with no
/// timer pending there is none. At low load that is every request: its first timer (the
/// fallback's attempt timeout, seconds away) finds the wheel empty. With this timer always
/// due sooner, requests' timers wake nothing: two system calls fewer per request at
/// concurrency 1 (`perf record -e raw_syscalls:sys_enter`, see docs/design-notes.md), for one
/// wake-up a second.
async fn keep_timer_armed() {
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
    loop {
        tick.tick().await;
    }
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => tracing::info!("ctrl-c received"),
        () = term => tracing::info!("SIGTERM received"),
    }
}
