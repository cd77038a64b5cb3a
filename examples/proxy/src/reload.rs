//! Reloading the configuration without a restart.
//!
//! [`Live`] holds the router being served behind an atomic pointer ([`arc_swap`]). A
//! reload reads the file again, validates it fully (the same checks and line-numbered
//! errors as at start), builds a new stack and swaps it in with one pointer store. A
//! request picks the router when it arrives and keeps it to its end: requests and
//! streams in flight finish on the old stack, which is dropped when the last of them
//! ends. A file that does not validate, or a stack that cannot be built (a Redis that
//! does not answer…), is refused and the old stack keeps serving.
//!
//! State survives a reload where the new configuration keeps it ([`Carry`]): providers
//! whose settings (and secrets) are unchanged are reused as they are (their HTTP pool,
//! limit buckets and headroom), so are chains whose steps are unchanged (their breakers),
//! the client rate limits, the cost layer and the cache when their sections are
//! unchanged; the in-memory cache store is kept while its size is, and the in-memory
//! budget store always (a budget with the same scope and window keeps its spend; a new
//! limit applies to it). Metrics, the status page's record and the jobs store and worker
//! live for the whole process.
//!
//! Listener-level settings are read once at start; a reload that changes them logs a
//! warning and `/status` lists them under `config.restart_needed` ([`RESTART_KEYS`]).

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::task::{Context, Poll};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use arc_swap::{ArcSwap, ArcSwapOption};
use axum::Router;
use axum::body::Body;
use axum::response::Response;
use futures_util::future::BoxFuture;
use llm_tower::cache::{CacheLayer, MemoryStore};
use llm_tower::cost::{CostLayer, InMemoryBudgetStore};
use llm_tower::rate_limit::RateLimitLayer;
use llm_tower::{BoxLlmService, ChatRequest, LlmError, LlmResponse};
use llm_tower_axum::{Activity, Metrics};
use llm_tower_jobs::Jobs;
use llm_tower_providers::HttpClient;
use llm_tower_redis::RedisConn;
use tower::{Service, ServiceExt};

use crate::config::{Config, ConfigError};
use crate::gateway::{BuildError, Gateway, build_with, init_telemetry};
use crate::status::{Parts, ProviderPart};

/// The settings a reload does not apply (they need a restart).
pub const RESTART_KEYS: &[&str] = &[
    "server.listen",
    "server.metrics",
    "server.metrics_listen",
    "server.header_read_timeout_secs",
    "server.body_read_timeout_secs",
    "server.idle_timeout_secs",
    "server.max_connections",
    "server.shutdown_grace_secs",
    "jobs.enabled",
    "jobs.store",
    "jobs.path",
    "jobs.workers",
    "telemetry",
];

/// A fingerprint of a configuration part: BLAKE3 of its `Debug` text without source
/// spans (so moving a section in the file changes nothing), plus secret digests.
pub(crate) type Fp = [u8; 32];

/// Fingerprints `parts` (each printed with `Debug`; spans removed).
pub(crate) fn fp(parts: &[&dyn fmt::Debug]) -> Fp {
    let mut h = blake3::Hasher::new();
    for p in parts {
        h.update(strip_spans(&format!("{p:?}")).as_bytes());
        h.update(b"\x00");
    }
    *h.finalize().as_bytes()
}

/// The digest of a secret, to put in a fingerprint (never the secret itself).
pub(crate) fn secret_fp(s: Option<&str>) -> String {
    s.map_or_else(String::new, |s| {
        blake3::hash(s.as_bytes()).to_hex().to_string()
    })
}

/// Removes `span: 12..40, ` (toml's `Spanned` prints its byte range).
fn strip_spans(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find("span: ") {
        out.push_str(&rest[..i]);
        let after = &rest[i + "span: ".len()..];
        let end = after
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(after.len());
        let tail = &after[end..];
        if end > 0 && after[..end].contains("..") {
            rest = tail.strip_prefix(", ").unwrap_or(tail);
        } else {
            out.push_str("span: ");
            rest = after;
        }
    }
    out.push_str(rest);
    out
}

/// What one build hands to the next: parts reused when their configuration is unchanged.
#[derive(Clone, Default)]
pub(crate) struct CarryState {
    /// Redis connections by URL (the URL may hold a password: never printed).
    pub(crate) redis: BTreeMap<String, RedisConn>,
    pub(crate) http: Option<(Fp, HttpClient)>,
    pub(crate) providers: BTreeMap<String, (Fp, BoxLlmService, ProviderPart)>,
    pub(crate) chains: BTreeMap<String, (Fp, crate::gateway::BuiltChain)>,
    pub(crate) client_limits: Option<(Fp, RateLimitLayer)>,
    pub(crate) cost: Option<(Fp, CostLayer)>,
    pub(crate) cache: Option<(Fp, CacheLayer)>,
    pub(crate) cache_mem: Option<(u64, Arc<MemoryStore>)>,
}

/// How the configuration was loaded, for `/status`.
#[derive(Debug, Clone, Default)]
pub(crate) struct ReloadInfo {
    pub(crate) path: Option<PathBuf>,
    pub(crate) loaded_at_unix: u64,
    pub(crate) reloads: u64,
    pub(crate) failed_reloads: u64,
    pub(crate) last_error: Option<String>,
    pub(crate) restart_needed: Vec<&'static str>,
}

/// State kept across builds of the gateway (see the [module docs](self)).
pub struct Carry {
    pub(crate) state: Mutex<CarryState>,
    pub(crate) metrics: OnceLock<Metrics>,
    pub(crate) activity: Activity,
    pub(crate) budget_mem: Arc<InMemoryBudgetStore>,
    /// OpenTelemetry, set up by the first build (`None` inside: off); a reload keeps it.
    pub(crate) telemetry: OnceLock<Option<crate::telemetry::Telemetry>>,
    /// The jobs API, decided by the first build (`None` inside: jobs off).
    pub(crate) jobs: OnceLock<Option<Jobs>>,
    /// The stack the jobs worker calls: the current one.
    pub(crate) llm: Arc<ArcSwapOption<BoxLlmService>>,
    /// What `/status` reads: the current build's parts.
    pub(crate) parts: Arc<ArcSwap<Parts>>,
    pub(crate) info: Arc<Mutex<ReloadInfo>>,
    pub(crate) started: Instant,
    /// The last error of the jobs store's health probe.
    pub(crate) jobs_error: Arc<Mutex<Option<String>>>,
}

impl fmt::Debug for Carry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Carry").finish_non_exhaustive()
    }
}

impl Default for Carry {
    fn default() -> Self {
        Self {
            state: Mutex::default(),
            metrics: OnceLock::new(),
            activity: Activity::new(),
            budget_mem: Arc::new(InMemoryBudgetStore::new()),
            telemetry: OnceLock::new(),
            jobs: OnceLock::new(),
            llm: Arc::default(),
            parts: Arc::new(ArcSwap::from_pointee(Parts::default())),
            info: Arc::default(),
            started: Instant::now(),
            jobs_error: Arc::default(),
        }
    }
}

impl Carry {
    pub(crate) fn previous(&self) -> CarryState {
        self.state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Makes a successful build the current one.
    pub(crate) fn commit(&self, next: CarryState, llm: &BoxLlmService, parts: Parts) {
        *self.state.lock().unwrap_or_else(PoisonError::into_inner) = next;
        self.llm.store(Some(Arc::new(llm.clone())));
        self.parts.store(Arc::new(parts));
        self.info
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .loaded_at_unix = unix_now();
    }
}

pub(crate) fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The LLM stack in force now (what the jobs worker calls): each call goes to the stack
/// current when it starts.
#[derive(Clone)]
pub(crate) struct CurrentLlm(pub(crate) Arc<ArcSwapOption<BoxLlmService>>);

impl Service<ChatRequest> for CurrentLlm {
    type Response = LlmResponse;
    type Error = LlmError;
    type Future = BoxFuture<'static, Result<LlmResponse, LlmError>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), LlmError>> {
        // Which stack serves is decided per call; its readiness is driven in the call.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: ChatRequest) -> Self::Future {
        let svc = self.0.load_full();
        Box::pin(async move {
            match svc {
                Some(svc) => (*svc).clone().oneshot(req).await,
                None => Err(LlmError::unavailable("the gateway is starting")),
            }
        })
    }
}

/// The router in force now: each request is handed to the router current when it
/// arrives, and stays on it to its end.
#[derive(Clone)]
struct CurrentRouter(Arc<ArcSwap<Router>>);

impl Service<axum::http::Request<Body>> for CurrentRouter {
    type Response = Response;
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<Response, Infallible>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: axum::http::Request<Body>) -> Self::Future {
        let router = Router::clone(&self.0.load());
        Box::pin(router.oneshot(req))
    }
}

/// Why a reload was refused (the old configuration keeps serving).
#[derive(Debug)]
pub enum ReloadError {
    /// The file does not validate (line-numbered, as at start).
    Config(ConfigError),
    /// The new stack could not be built.
    Build(BuildError),
}

impl fmt::Display for ReloadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ReloadError::Config(e) => e.fmt(f),
            ReloadError::Build(e) => e.fmt(f),
        }
    }
}

impl std::error::Error for ReloadError {}

/// What a successful reload did.
#[derive(Debug, Clone, Default)]
pub struct ReloadReport {
    /// Settings that changed but need a restart (from [`RESTART_KEYS`]).
    pub restart_needed: Vec<&'static str>,
}

type Env = Arc<dyn Fn(&str) -> Option<String> + Send + Sync>;

/// A gateway whose configuration can be reloaded (see the [module docs](self)).
///
/// ```no_run
/// # #[tokio::main] async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// use llm_tower_proxy::reload::Live;
///
/// let (live, mut gateway) = Live::start("examples/proxy/demo.toml", |k: &str| std::env::var(k).ok()).await?;
/// let _worker = gateway.spawn_worker();
/// let listener = tokio::net::TcpListener::bind(live.listen_addr()).await?;
/// let server = gateway.server.clone();
/// tokio::spawn(server.serve(listener, live.router(), std::future::pending()));
/// // Later (on SIGHUP):
/// match live.reload().await {
///     Ok(report) => println!("reloaded; needs a restart: {:?}", report.restart_needed),
///     Err(e) => eprintln!("reload refused, old configuration kept: {e}"),
/// }
/// # Ok(()) }
/// ```
pub struct Live {
    path: PathBuf,
    env: Env,
    carry: Arc<Carry>,
    current: Arc<ArcSwap<Router>>,
    /// The configuration the process started with (for listener-level settings).
    first: Config,
    /// One reload at a time.
    gate: tokio::sync::Mutex<()>,
}

impl fmt::Debug for Live {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Live")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl Live {
    /// Loads `path`, builds the gateway and returns the reload handle with it.
    ///
    /// # Errors
    ///
    /// The file does not validate, or the stack cannot be built.
    pub async fn start(
        path: impl AsRef<Path>,
        env: impl Fn(&str) -> Option<String> + Send + Sync + 'static,
    ) -> Result<(Self, Gateway), ReloadError> {
        let path = path.as_ref().to_path_buf();
        let config = Config::from_file(&path).map_err(ReloadError::Config)?;
        let env: Env = Arc::new(env);
        let carry = Arc::new(Carry::default());
        carry
            .info
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .path = Some(path.clone());
        let secrets = config
            .resolve_secrets(|k: &str| env(k))
            .map_err(ReloadError::Config)?;
        init_telemetry(&config, &|k: &str| env(k), &carry).map_err(ReloadError::Build)?;
        let (gateway, next, parts) = build_with(&config, secrets, &carry)
            .await
            .map_err(ReloadError::Build)?;
        carry.commit(next, &gateway.llm, parts);
        let live = Self {
            path,
            env,
            carry,
            current: Arc::new(ArcSwap::from_pointee(gateway.router.clone())),
            first: config,
            gate: tokio::sync::Mutex::new(()),
        };
        Ok((live, gateway))
    }

    /// The router to serve: it hands each request to the configuration in force.
    pub fn router(&self) -> Router {
        Router::new().fallback_service(CurrentRouter(self.current.clone()))
    }

    /// The listen address the process started with (a reload does not move it).
    pub fn listen_addr(&self) -> std::net::SocketAddr {
        self.first.listen_addr()
    }

    /// The configuration file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Reads the file again and, if it validates and builds, swaps the new stack in.
    ///
    /// # Errors
    ///
    /// The file does not validate or the stack cannot be built; the old one keeps serving.
    pub async fn reload(&self) -> Result<ReloadReport, ReloadError> {
        let _one = self.gate.lock().await;
        let result = self.try_reload().await;
        let mut info = self
            .carry
            .info
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        match &result {
            Ok(report) => {
                info.reloads += 1;
                info.last_error = None;
                info.restart_needed.clone_from(&report.restart_needed);
            }
            Err(e) => {
                info.failed_reloads += 1;
                info.last_error = Some(e.to_string());
            }
        }
        result
    }

    async fn try_reload(&self) -> Result<ReloadReport, ReloadError> {
        let config = Config::from_file(&self.path).map_err(ReloadError::Config)?;
        let secrets = config
            .resolve_secrets(|k: &str| (self.env)(k))
            .map_err(ReloadError::Config)?;
        let (gateway, next, parts) = build_with(&config, secrets, &self.carry)
            .await
            .map_err(ReloadError::Build)?;
        self.carry.commit(next, &gateway.llm, parts);
        // The swap: requests arriving from now on get the new router.
        self.current.store(Arc::new(gateway.router));
        Ok(ReloadReport {
            restart_needed: restart_needed(&self.first, &config),
        })
    }
}

/// The listener-level settings that differ between `old` and `new`.
fn restart_needed(old: &Config, new: &Config) -> Vec<&'static str> {
    let (a, b) = (&old.server, &new.server);
    let (ja, jb) = (&old.jobs, &new.jobs);
    let changed = [
        fp(&[&a.listen]) != fp(&[&b.listen]),
        a.metrics != b.metrics,
        fp(&[&a.metrics_listen]) != fp(&[&b.metrics_listen]),
        a.header_read_timeout_secs != b.header_read_timeout_secs,
        a.body_read_timeout_secs != b.body_read_timeout_secs,
        a.idle_timeout_secs != b.idle_timeout_secs,
        a.max_connections != b.max_connections,
        a.shutdown_grace_secs != b.shutdown_grace_secs,
        ja.enabled != jb.enabled,
        fp(&[&ja.store]) != fp(&[&jb.store]),
        ja.path != jb.path,
        ja.workers != jb.workers,
        fp(&[&old.telemetry]) != fp(&[&new.telemetry]),
    ];
    RESTART_KEYS
        .iter()
        .zip(changed)
        .filter_map(|(k, c)| c.then_some(*k))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spans_do_not_change_a_fingerprint() {
        assert_eq!(
            strip_spans("Spanned { span: 10..42, value: Foo { a: 1 } }"),
            "Spanned { value: Foo { a: 1 } }"
        );
        assert_eq!(strip_spans("x span: y"), "x span: y");
        let a = Config::parse(
            "[providers.p]\nkind = \"simulated\"\n[chains.c]\nsteps = [{ provider = \"p\" }]\n[routing]\ndefault_chain = \"c\"\n",
            Path::new("."),
        )
        .unwrap();
        let b = Config::parse(
            "\n\n# moved\n[routing]\ndefault_chain = \"c\"\n[chains.c]\nsteps = [{ provider = \"p\" }]\n[providers.p]\nkind = \"simulated\"\n",
            Path::new("."),
        )
        .unwrap();
        assert_eq!(fp(&[&a.providers]), fp(&[&b.providers]));
        assert_eq!(fp(&[&a.chains]), fp(&[&b.chains]));
        assert!(restart_needed(&a, &b).is_empty());
    }
}
