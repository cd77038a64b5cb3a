//! The state a [`CacheLayer`](super::CacheLayer) shares with every service it made: the
//! store, the config, the stats, the in-flight table, and the per-request decision.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use llm_tower_core::{CachePolicy, ChatRequest};

use super::flight::Flights;
use super::{CacheStats, CacheStore};

type Predicate = Arc<dyn Fn(&ChatRequest) -> bool + Send + Sync>;

#[derive(Clone)]
pub(crate) struct Config {
    pub(crate) default_ttl: Duration,
    pub(crate) task_ttls: HashMap<Arc<str>, Duration>,
    pub(crate) cacheable_tasks: HashSet<Arc<str>>,
    pub(crate) cacheable_when: Option<Predicate>,
    pub(crate) max_entry_bytes: usize,
    pub(crate) store_timeout: Duration,
    pub(crate) coalesce: bool,
    pub(crate) coalesce_timeout: Duration,
    pub(crate) max_stream_bytes: usize,
}

impl fmt::Debug for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Config")
            .field("default_ttl", &self.default_ttl)
            .field("task_ttls", &self.task_ttls)
            .field("cacheable_tasks", &self.cacheable_tasks)
            .field(
                "cacheable_when",
                &self.cacheable_when.as_ref().map(|_| "fn"),
            )
            .field("max_entry_bytes", &self.max_entry_bytes)
            .field("store_timeout", &self.store_timeout)
            .field("coalesce", &self.coalesce)
            .field("coalesce_timeout", &self.coalesce_timeout)
            .field("max_stream_bytes", &self.max_stream_bytes)
            .finish()
    }
}

/// State shared by a layer and every service it made.
pub(crate) struct Shared {
    pub(crate) store: Arc<dyn CacheStore>,
    pub(crate) config: Config,
    pub(crate) stats: Arc<CacheStats>,
    pub(crate) flights: Arc<Flights>,
}

impl fmt::Debug for Shared {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Shared")
            .field("config", &self.config)
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

/// What the layer does with one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Decision {
    /// Neither read nor write.
    Bypass,
    /// `no-cache`: do not read, store the fresh answer.
    WriteOnly(Duration),
    /// Read, coalesce, write.
    Cache(Duration),
}

impl Shared {
    pub(crate) fn ttl_for(&self, req: &ChatRequest) -> Duration {
        req.task_type()
            .and_then(|t| self.config.task_ttls.get(t.as_str()).copied())
            .unwrap_or(self.config.default_ttl)
    }

    fn is_cacheable(&self, req: &ChatRequest) -> bool {
        if let Some(f) = &self.config.cacheable_when {
            return f(req);
        }
        req.temperature_f64() == Some(0.0)
            || req.seed.is_some()
            || req.as_embeddings().is_some()
            || req
                .task_type()
                .is_some_and(|t| self.config.cacheable_tasks.contains(t.as_str()))
    }

    pub(crate) fn decide(&self, req: &ChatRequest) -> Decision {
        let policy = req.cache_policy();
        if policy == CachePolicy::NoStore {
            return Decision::Bypass;
        }
        let ttl = self.ttl_for(req);
        if ttl.is_zero() {
            return Decision::Bypass;
        }
        if policy != CachePolicy::Force && !self.is_cacheable(req) {
            return Decision::Bypass;
        }
        if policy == CachePolicy::NoCache {
            Decision::WriteOnly(ttl)
        } else {
            Decision::Cache(ttl)
        }
    }
}
