//! The in-memory store: a moka cache bounded by bytes, with per-entry TTLs.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use futures_util::FutureExt;
use moka::Expiry;
use tokio::time::Instant;

use super::{CacheKey, CacheStore, CachedEntry, StoreError, StoreFuture};

/// Per-entry overhead added to the JSON size: key, expiry, `Arc` and moka bookkeeping.
const ENTRY_OVERHEAD: usize = 128;

/// Longest TTL kept; longer ones are shortened to it (10 years).
const MAX_TTL: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

#[derive(Clone)]
struct Slot {
    entry: Arc<CachedEntry>,
    ttl: Duration,
    // Checked on every read against tokio's clock (which paused-time tests control);
    // moka's own expiry follows the real clock and only reclaims the memory.
    expires_at: Instant,
    weight: u32,
}

struct SlotExpiry;

impl Expiry<CacheKey, Slot> for SlotExpiry {
    fn expire_after_create(
        &self,
        _key: &CacheKey,
        value: &Slot,
        _created_at: std::time::Instant,
    ) -> Option<Duration> {
        Some(value.ttl)
    }

    fn expire_after_update(
        &self,
        _key: &CacheKey,
        value: &Slot,
        _updated_at: std::time::Instant,
        _duration_until_expiry: Option<Duration>,
    ) -> Option<Duration> {
        Some(value.ttl)
    }
}

/// The default store: in process, bounded by the total size of its entries in bytes (an
/// entry weighs its compact JSON size plus a small overhead), each entry expiring after its
/// own TTL. Built on [`moka::future::Cache`]; cheap to clone (clones share the entries).
///
/// Expiry is checked on every read against [`tokio::time::Instant`], so TTLs follow
/// tokio's paused clock in tests; moka's own per-entry expiry (real time) frees the
/// memory. An entry larger than the whole capacity is never kept.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// use std::sync::Arc;
/// use std::time::Duration;
/// use llm_tower::cache::{CacheKey, CacheStore, CachedEntry, MemoryStore};
/// use llm_tower::{ChatRequest, ChatResponse, Message, ResponseMeta};
///
/// let store = MemoryStore::new(64 * 1024 * 1024); // 64 MiB
/// let key = CacheKey::for_request(&ChatRequest::new("m", vec![Message::user("hi")]));
/// let entry = CachedEntry::complete(ChatResponse::from_text("m", "hello"), &ResponseMeta::default());
/// store.put(key, Arc::new(entry), Duration::from_secs(60)).await.unwrap();
/// let hit = store.get(key).await.unwrap().unwrap();
/// assert_eq!(hit.to_response(false).into_complete().await.unwrap().text(), "hello");
/// # }
/// ```
#[derive(Clone)]
pub struct MemoryStore {
    cache: moka::future::Cache<CacheKey, Slot>,
    max_bytes: u64,
}

impl fmt::Debug for MemoryStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryStore")
            .field("max_bytes", &self.max_bytes)
            .field("entries", &self.cache.entry_count())
            .field("weighted_bytes", &self.cache.weighted_size())
            .finish()
    }
}

impl MemoryStore {
    /// A store holding at most `max_bytes` of entries.
    pub fn new(max_bytes: u64) -> Self {
        let cache = moka::future::Cache::builder()
            .max_capacity(max_bytes)
            .weigher(|_k: &CacheKey, v: &Slot| v.weight)
            .expire_after(SlotExpiry)
            .build();
        Self { cache, max_bytes }
    }

    /// The capacity in bytes.
    pub fn max_bytes(&self) -> u64 {
        self.max_bytes
    }

    /// Number of entries (approximate: moka applies writes in batches).
    pub fn entry_count(&self) -> u64 {
        self.cache.entry_count()
    }

    /// Total weight of the entries in bytes (approximate, as [`entry_count`](Self::entry_count)).
    pub fn weighted_size(&self) -> u64 {
        self.cache.weighted_size()
    }

    /// Applies pending writes and evictions now (moka batches them); useful in tests.
    pub async fn run_pending_tasks(&self) {
        self.cache.run_pending_tasks().await;
    }

    fn live(slot: Option<Slot>) -> Option<Arc<CachedEntry>> {
        slot.filter(|s| Instant::now() < s.expires_at)
            .map(|s| s.entry)
    }
}

impl CacheStore for MemoryStore {
    fn get(&self, key: CacheKey) -> StoreFuture<Option<Arc<CachedEntry>>> {
        let cache = self.cache.clone();
        Box::pin(async move { Ok(Self::live(cache.get(&key).await)) })
    }

    fn put(&self, key: CacheKey, entry: Arc<CachedEntry>, ttl: Duration) -> StoreFuture<()> {
        let cache = self.cache.clone();
        let weight = u32::try_from(entry.approx_size() + ENTRY_OVERHEAD).unwrap_or(u32::MAX);
        // Bounded so that neither `Instant` arithmetic nor moka's timer wheel overflows.
        let ttl = ttl.min(MAX_TTL);
        let slot = Slot {
            entry,
            ttl,
            expires_at: Instant::now() + ttl,
            weight,
        };
        Box::pin(async move {
            cache.insert(key, slot).await;
            Ok(())
        })
    }

    fn get_now(&self, key: &CacheKey) -> Option<Result<Option<Arc<CachedEntry>>, StoreError>> {
        // moka's read completes in one poll unless its housekeeping lock is contended;
        // then the layer falls back to the async `get`.
        self.cache
            .get(key)
            .now_or_never()
            .map(|slot| Ok(Self::live(slot)))
    }
}
