//! A Redis [`CacheStore`] for the cache layer, so replicas share one cache.
//!
//! Each entry is one Redis string: key `{conn prefix}{store prefix}{hex of the CacheKey}`
//! (e.g. `llm-tower:cache:3b93…`), value the entry's compact JSON, written with
//! `SET key value PX ttl` so Redis expires it. Every call runs through [`RedisConn`]:
//! a hard timeout and a circuit breaker. The cache **fails open**: an error, a timeout or
//! an open breaker is a miss for the layer (the request is served from upstream) and
//! counts in its [`CacheStats::errors`](llm_tower::cache::CacheStats::errors).
//!
//! ```no_run
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use std::time::Duration;
//! use llm_tower::cache::CacheLayer;
//! use llm_tower_redis::cache::RedisCacheStore;
//! use llm_tower_redis::{RedisConn, RedisOptions};
//!
//! let conn = RedisConn::connect("redis://127.0.0.1:6379", RedisOptions::default()).await?;
//! let cache = CacheLayer::new(RedisCacheStore::new(conn))
//!     .task_ttl("explain", Duration::from_secs(24 * 3600));
//! # let _ = cache;
//! # Ok(()) }
//! ```

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use llm_tower::cache::{CacheKey, CacheStore, CachedEntry, StoreError, StoreFuture};

use crate::{RedisConn, RedisStoreError};

/// Default store prefix, after the connection's own prefix.
pub const DEFAULT_CACHE_PREFIX: &str = "cache:";

/// A [`CacheStore`] in Redis. Cheap to clone; clones share the connection and breaker.
#[derive(Clone)]
pub struct RedisCacheStore {
    conn: RedisConn,
    prefix: Arc<str>,
}

impl fmt::Debug for RedisCacheStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisCacheStore")
            .field("conn", &self.conn)
            .field("prefix", &self.prefix)
            .finish()
    }
}

impl RedisCacheStore {
    /// A store on `conn`, with keys under [`DEFAULT_CACHE_PREFIX`].
    pub fn new(conn: RedisConn) -> Self {
        Self {
            conn,
            prefix: Arc::from(DEFAULT_CACHE_PREFIX),
        }
    }

    /// Puts this store's keys under `prefix` (after the connection's prefix), e.g. to keep
    /// two caches apart in one Redis.
    #[must_use]
    pub fn with_prefix(mut self, prefix: impl Into<Arc<str>>) -> Self {
        self.prefix = prefix.into();
        self
    }

    /// The Redis key of `key`.
    pub fn redis_key(&self, key: &CacheKey) -> String {
        let hex = key.to_hex();
        let mut k = String::with_capacity(self.prefix.len() + hex.len());
        k.push_str(&self.prefix);
        k.push_str(&hex);
        self.conn.key(&k)
    }

    /// The connection (its breaker state and failure count).
    pub fn conn(&self) -> &RedisConn {
        &self.conn
    }
}

fn store_error(e: RedisStoreError) -> StoreError {
    StoreError::new(e.to_string())
}

impl CacheStore for RedisCacheStore {
    fn get(&self, key: CacheKey) -> StoreFuture<Option<Arc<CachedEntry>>> {
        let conn = self.conn.clone();
        let rkey = self.redis_key(&key);
        Box::pin(async move {
            let raw: Option<Vec<u8>> = conn
                .run(|mut c| async move { redis::cmd("GET").arg(&rkey).query_async(&mut c).await })
                .await
                .map_err(store_error)?;
            match raw {
                None => Ok(None),
                Some(bytes) => serde_json::from_slice::<CachedEntry>(&bytes)
                    .map(|e| Some(Arc::new(e)))
                    // A value this version cannot read (written by another version, or
                    // not by us): an error, so it shows up in the stats, and a miss.
                    .map_err(|e| StoreError::new(format!("undecodable cache entry: {e}"))),
            }
        })
    }

    fn put(&self, key: CacheKey, entry: Arc<CachedEntry>, ttl: Duration) -> StoreFuture<()> {
        let conn = self.conn.clone();
        let rkey = self.redis_key(&key);
        Box::pin(async move {
            let value = serde_json::to_vec(&*entry)
                .map_err(|e| StoreError::new(format!("cannot encode cache entry: {e}")))?;
            // PX takes milliseconds; a sub-millisecond TTL still lives 1 ms.
            let ttl_ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1);
            conn.run(|mut c| async move {
                redis::cmd("SET")
                    .arg(&rkey)
                    .arg(value)
                    .arg("PX")
                    .arg(ttl_ms)
                    .query_async::<()>(&mut c)
                    .await
            })
            .await
            .map_err(store_error)
        })
    }
}
