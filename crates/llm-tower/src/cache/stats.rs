//! Counters of the cache layer.

use std::sync::atomic::{AtomicU64, Ordering};

/// Counters of a [`CacheLayer`](super::CacheLayer), shared by all its services
/// ([`CacheLayer::stats`](super::CacheLayer::stats)). Each request counts once in exactly
/// one of hits, misses and bypasses; errors, coalesced waits and writes count on the side.
#[derive(Debug, Default)]
pub struct CacheStats {
    hits: AtomicU64,
    misses: AtomicU64,
    bypasses: AtomicU64,
    errors: AtomicU64,
    coalesced: AtomicU64,
    writes: AtomicU64,
    skipped_writes: AtomicU64,
    coalesce_timeouts: AtomicU64,
    stream_overflows: AtomicU64,
}

/// A copy of the [`CacheStats`] counters at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CacheStatsSnapshot {
    /// Requests answered from the cache (including coalesced waiters).
    pub hits: u64,
    /// Requests looked up, not found, and sent upstream.
    pub misses: u64,
    /// Requests that skipped the lookup (policy, non-deterministic, zero TTL).
    pub bypasses: u64,
    /// Store failures and timeouts (each served from upstream: the cache fails open).
    pub errors: u64,
    /// Requests that waited for an identical in-flight request instead of calling upstream.
    pub coalesced: u64,
    /// Answers written to the store.
    pub writes: u64,
    /// Answers not stored: incomplete, empty or larger than the entry limit.
    pub skipped_writes: u64,
    /// Waiters that stopped waiting for an identical in-flight request after
    /// [`CacheLayer::coalesce_timeout`](super::CacheLayer::coalesce_timeout) and called
    /// upstream themselves (also counted as misses).
    pub coalesce_timeouts: u64,
    /// Streams whose copy outgrew
    /// [`CacheLayer::max_stream_bytes`](super::CacheLayer::max_stream_bytes) and was dropped
    /// (also counted in `skipped_writes`).
    pub stream_overflows: u64,
}

macro_rules! counter {
    ($($name:ident, $inc:ident;)*) => {
        impl CacheStats {
            $(
                #[doc = concat!("The `", stringify!($name), "` counter (see [`CacheStatsSnapshot`]).")]
                pub fn $name(&self) -> u64 {
                    self.$name.load(Ordering::Relaxed)
                }
                pub(crate) fn $inc(&self) {
                    self.$name.fetch_add(1, Ordering::Relaxed);
                }
            )*
        }
    };
}

counter! {
    hits, hit;
    misses, miss;
    bypasses, bypass;
    errors, error;
    coalesced, coalesce;
    writes, write;
    skipped_writes, skip_write;
    coalesce_timeouts, coalesce_timeout;
    stream_overflows, stream_overflow;
}

impl CacheStats {
    /// All counters at once.
    pub fn snapshot(&self) -> CacheStatsSnapshot {
        CacheStatsSnapshot {
            hits: self.hits(),
            misses: self.misses(),
            bypasses: self.bypasses(),
            errors: self.errors(),
            coalesced: self.coalesced(),
            writes: self.writes(),
            skipped_writes: self.skipped_writes(),
            coalesce_timeouts: self.coalesce_timeouts(),
            stream_overflows: self.stream_overflows(),
        }
    }

    /// Hits over lookups (hits + misses), 0 when nothing was looked up.
    pub fn hit_ratio(&self) -> f64 {
        let hits = self.hits() as f64;
        let total = hits + self.misses() as f64;
        if total == 0.0 { 0.0 } else { hits / total }
    }
}
