//! `CacheLayer`, the `Cache` service and its configuration.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use llm_tower_core::{ChatRequest, LlmError, LlmResponse};
use tower_layer::Layer;
use tower_service::Service;

use super::future::{ResponseFuture, Slow};
use super::shared::{Config, Decision, Shared};
use super::{CacheKey, CacheStats, CacheStore, MemoryStore};

/// Default capacity of [`CacheLayer::default`]'s in-memory store: 128 MiB.
pub const DEFAULT_MEMORY_BYTES: u64 = 128 * 1024 * 1024;

/// Default [`CacheLayer::coalesce_timeout`]: 30 s.
pub const DEFAULT_COALESCE_TIMEOUT: Duration = Duration::from_secs(30);

/// Default [`CacheLayer::max_stream_bytes`] (and the validation layer's): 8 MiB.
pub const DEFAULT_MAX_STREAM_BYTES: usize = 8 * 1024 * 1024;

/// Applies the [`Cache`] middleware. See the [module docs](crate::cache) for the rules and
/// an example.
///
/// # Clone
///
/// Cloning the layer shares its store, its [`CacheStats`] and its in-flight table: every
/// service made by any clone coalesces with the others and counts into the same stats.
#[derive(Clone)]
pub struct CacheLayer {
    shared: Arc<Shared>,
}

impl fmt::Debug for CacheLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CacheLayer")
            .field("config", &self.shared.config)
            .field("stats", &self.shared.stats.snapshot())
            .finish_non_exhaustive()
    }
}

impl Default for CacheLayer {
    /// An in-memory cache of [`DEFAULT_MEMORY_BYTES`] with the default rules.
    fn default() -> Self {
        Self::in_memory(DEFAULT_MEMORY_BYTES)
    }
}

impl CacheLayer {
    /// A cache over `store`, with the defaults: TTL 1 h, only deterministic requests,
    /// entries up to 1 MiB, store calls bounded by 250 ms, concurrent misses coalesced
    /// (waiting up to 30 s), streams buffered up to 8 MiB of memory.
    pub fn new<St: CacheStore>(store: St) -> Self {
        Self::from_arc(Arc::new(store))
    }

    /// A cache over a shared, type-erased store.
    pub fn from_arc(store: Arc<dyn CacheStore>) -> Self {
        Self {
            shared: Arc::new(Shared {
                store,
                config: Config {
                    default_ttl: Duration::from_secs(3600),
                    task_ttls: HashMap::new(),
                    cacheable_tasks: HashSet::new(),
                    cacheable_when: None,
                    max_entry_bytes: 1024 * 1024,
                    store_timeout: Duration::from_millis(250),
                    coalesce: true,
                    coalesce_timeout: DEFAULT_COALESCE_TIMEOUT,
                    max_stream_bytes: DEFAULT_MAX_STREAM_BYTES,
                },
                stats: Arc::default(),
                flights: Arc::default(),
            }),
        }
    }

    /// A cache over a [`MemoryStore`] of `max_bytes`.
    pub fn in_memory(max_bytes: u64) -> Self {
        Self::new(MemoryStore::new(max_bytes))
    }

    fn config_mut(&mut self) -> &mut Config {
        // Builder methods run before any service exists, so this is the only handle; if
        // not (a clone was taken), fork the state rather than mutate what others share.
        if Arc::get_mut(&mut self.shared).is_none() {
            self.shared = Arc::new(Shared {
                store: self.shared.store.clone(),
                config: self.shared.config.clone(),
                stats: self.shared.stats.clone(),
                flights: self.shared.flights.clone(),
            });
        }
        let shared = Arc::get_mut(&mut self.shared).expect("unique after the fork above");
        &mut shared.config
    }

    /// TTL of requests whose task type has no TTL of its own. Default 1 hour.
    /// `Duration::ZERO` disables caching for them.
    #[must_use]
    pub fn default_ttl(mut self, ttl: Duration) -> Self {
        self.config_mut().default_ttl = ttl;
        self
    }

    /// TTL for requests of task type `task` (the [`TaskType`](llm_tower_core::TaskType)
    /// extension), e.g. explanations 24 h, recommendations 10 min. `Duration::ZERO` means
    /// never cache this task (personalised answers), even with [`CachePolicy::Force`](crate::CachePolicy::Force).
    #[must_use]
    pub fn task_ttl(mut self, task: impl Into<Arc<str>>, ttl: Duration) -> Self {
        self.config_mut().task_ttls.insert(task.into(), ttl);
        self
    }

    /// Caches requests of task type `task` even when they are not deterministic (the
    /// application accepts one sampled answer for everyone).
    #[must_use]
    pub fn cacheable_task(mut self, task: impl Into<Arc<str>>) -> Self {
        self.config_mut().cacheable_tasks.insert(task.into());
        self
    }

    /// Replaces the default "deterministic" rule (temperature 0, or a seed, or a
    /// [`cacheable_task`](Self::cacheable_task)) by `f`. Per-request policies and zero TTLs
    /// still apply.
    #[must_use]
    pub fn cacheable_when<F>(mut self, f: F) -> Self
    where
        F: Fn(&ChatRequest) -> bool + Send + Sync + 'static,
    {
        self.config_mut().cacheable_when = Some(Arc::new(f));
        self
    }

    /// Largest answer stored, in bytes of compact JSON. Default 1 MiB. A stream longer
    /// than this is still served, just not stored.
    #[must_use]
    pub fn max_entry_bytes(mut self, bytes: usize) -> Self {
        self.config_mut().max_entry_bytes = bytes;
        self
    }

    /// Bound on each store call (`get`, `put`); past it the call counts as an error and the
    /// request is served from upstream. Default 250 ms.
    #[must_use]
    pub fn store_timeout(mut self, timeout: Duration) -> Self {
        self.config_mut().store_timeout = timeout;
        self
    }

    /// Whether concurrent identical misses share one upstream call. Default `true`.
    #[must_use]
    pub fn coalesce(mut self, enabled: bool) -> Self {
        self.config_mut().coalesce = enabled;
        self
    }

    /// The longest a request waits for an identical in-flight request (the leader) before
    /// calling upstream itself. The leader's flight lands when its answer is complete —
    /// for a stream, when the leader's caller has read it to the end — so a slow-reading
    /// client or a slow upstream never holds its waiters longer than this. Default
    /// [`DEFAULT_COALESCE_TIMEOUT`] (30 s); counted in
    /// [`CacheStats::coalesce_timeouts`].
    #[must_use]
    pub fn coalesce_timeout(mut self, timeout: Duration) -> Self {
        self.config_mut().coalesce_timeout = timeout;
        self
    }

    /// The most memory a stream's copied chunks may take while the cache buffers them to
    /// store the answer (weighed as they sit in memory, not as JSON). Past it the copy is
    /// dropped, the stream is still served in full, nothing is stored, and
    /// [`CacheStats::stream_overflows`] counts it. Default [`DEFAULT_MAX_STREAM_BYTES`]
    /// (8 MiB). [`max_entry_bytes`](Self::max_entry_bytes) applies as well.
    #[must_use]
    pub fn max_stream_bytes(mut self, bytes: usize) -> Self {
        self.config_mut().max_stream_bytes = bytes;
        self
    }

    /// The counters, shared by every service of this layer.
    pub fn stats(&self) -> Arc<CacheStats> {
        self.shared.stats.clone()
    }

    /// The store.
    pub fn store(&self) -> &Arc<dyn CacheStore> {
        &self.shared.store
    }

    /// The TTL this layer would give `req` (before policy and determinism checks).
    pub fn ttl_for(&self, req: &ChatRequest) -> Duration {
        self.shared.ttl_for(req)
    }
}

impl<S> Layer<S> for CacheLayer {
    type Service = Cache<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Cache {
            inner,
            shared: self.shared.clone(),
        }
    }
}

/// Answers identical deterministic requests from a [`CacheStore`]. See the
/// [module docs](crate::cache) for the rules and an example.
///
/// Readiness: `poll_ready` delegates to the inner service. A hit drops that readiness
/// unused; a miss calls the very instance that was polled ready (moved into the future,
/// a clone left behind). A request that waits for an identical in-flight request releases
/// it while waiting and, if it must call upstream after all, drives readiness of a clone.
pub struct Cache<S> {
    inner: S,
    shared: Arc<Shared>,
}

impl<S: Clone> Clone for Cache<S> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            shared: self.shared.clone(),
        }
    }
}

impl<S: fmt::Debug> fmt::Debug for Cache<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Cache")
            .field("inner", &self.inner)
            .field("shared", &self.shared)
            .finish()
    }
}

impl<S> Cache<S> {
    /// Wraps `inner` with `layer`'s cache.
    pub fn new(inner: S, layer: &CacheLayer) -> Self {
        layer.layer(inner)
    }

    /// The counters.
    pub fn stats(&self) -> Arc<CacheStats> {
        self.shared.stats.clone()
    }

    inner_service_accessors!();
}

impl<S> Service<ChatRequest> for Cache<S>
where
    S: Service<ChatRequest, Response = LlmResponse, Error = LlmError> + Clone + Send + 'static,
    S::Future: Send + 'static,
{
    type Response = LlmResponse;
    type Error = LlmError;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), LlmError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: ChatRequest) -> Self::Future {
        let shared = &self.shared;
        let (ttl, read) = match shared.decide(&req) {
            Decision::Bypass => {
                shared.stats.bypass();
                return ResponseFuture::bypass(self.inner.call(req));
            }
            Decision::WriteOnly(ttl) => {
                shared.stats.bypass();
                (ttl, false)
            }
            Decision::Cache(ttl) => (ttl, true),
        };
        if req.as_embeddings().is_some() {
            // Per input, not per request: see `embed`.
            let fresh = self.inner.clone();
            let ready = std::mem::replace(&mut self.inner, fresh);
            return ResponseFuture::boxed(Box::pin(super::embed::run(
                shared.clone(),
                ready,
                req,
                ttl,
                read,
            )));
        }
        let key = CacheKey::for_request(&req);
        let mut lookup = read;
        if read {
            match shared.store.get_now(&key) {
                Some(Ok(Some(entry))) => {
                    shared.stats.hit();
                    crate::emit(&req, crate::ObserveEvent::CacheHit);
                    // The early return: no inner call, no boxed future.
                    return ResponseFuture::ready(Ok(entry.to_response(req.is_stream())));
                }
                Some(Ok(None)) => lookup = false,
                Some(Err(e)) => {
                    shared.stats.error();
                    tracing::debug!(error = %e, "cache lookup failed; serving from upstream");
                    lookup = false;
                }
                None => {}
            }
        }
        // Move the instance that was polled ready into the future; keep a fresh clone.
        let fresh = self.inner.clone();
        let ready = std::mem::replace(&mut self.inner, fresh);
        ResponseFuture::slow(Slow {
            shared: shared.clone(),
            inner: ready,
            req,
            key,
            ttl,
            lookup,
            participate: read,
        })
    }
}
