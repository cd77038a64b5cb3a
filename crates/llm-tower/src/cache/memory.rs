//! The in-memory store: a quick_cache cache bounded by bytes, with per-entry TTLs.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use super::{CacheKey, CacheStore, CachedEntry, StoreFuture};

/// The table's own memory per entry: quick_cache keeps key, value and 21 bytes of
/// bookkeeping per entry, plus room for ghost keys (×1.5 by default) in tables that grow
/// by doubling (up to ×2 more).
const ENTRY_OVERHEAD: usize = (size_of::<CacheKey>() + size_of::<Slot>() + 21) * 3;

/// Longest TTL kept; longer ones are shortened to it (10 years).
const MAX_TTL: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

/// Typical entry weight, to size the table up front (an estimate; nothing breaks if wrong).
const TYPICAL_ENTRY_BYTES: u64 = 2048;

#[derive(Clone)]
struct Slot {
    entry: Arc<CachedEntry>,
    // Checked on every read against tokio's clock (which paused-time tests control).
    expires_at: Instant,
    weight: u32,
}

#[derive(Clone, Copy)]
struct SlotWeight;

impl quick_cache::Weighter<CacheKey, Slot> for SlotWeight {
    fn weight(&self, _key: &CacheKey, slot: &Slot) -> u64 {
        u64::from(slot.weight)
    }
}

/// The default store: in process, bounded by the memory its entries occupy, each entry
/// expiring after its own TTL.
///
/// # What the bound covers
///
/// An entry weighs what it really holds in this process
/// ([`CachedEntry::memory_size`]: the `Arc` block, the answer's strings, vectors and maps
/// or its JSON document, the usage and names, each allocation rounded up as allocators
/// do) plus the table's own per-entry memory (key, expiry, quick_cache's bookkeeping and
/// ghost keys). An encoded answer is stored as an exactly sized copy of its JSON, never as
/// a slice pinning the upstream's read buffer. So `max_bytes` bounds the memory the cached
/// answers take, within allocator rounding: after the store has filled, the process's
/// resident memory stays within about 1.25 × `max_bytes` above what it used without it
/// (checked with the system allocator and with mimalloc by `tests/cache_memory*.rs`). Not covered: the table's fixed part sized at
/// creation (~100 bytes × `max_bytes` / 2 KiB) and the answers in flight to clients. Built on [`quick_cache::sync::Cache`] (sharded, S3-FIFO eviction: a burst of
/// one-off answers does not push out the ones asked for again); cheap to clone (clones
/// share the entries).
///
/// Expiry is checked on every read against [`tokio::time::Instant`], so TTLs follow
/// tokio's paused clock in tests; an expired entry is removed when it is read, and
/// otherwise evicted like any cold entry when room is needed: the byte bound always
/// holds. The capacity is split over up to 4 × CPUs shards (fewer for small stores, so
/// that each holds ~32 typical entries); an entry larger than one shard's share is never
/// kept (64 MiB on 2 CPUs: 8 MiB, far above the layer's 1 MiB entry limit).
///
/// Why not moka: its per-entry expiry wheel and write log cost a few µs per insert,
/// paid on every cache miss; quick_cache inserts in a fraction of that, and the TTL
/// check on read makes moka's timers unnecessary.
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
    cache: Arc<quick_cache::sync::Cache<CacheKey, Slot, SlotWeight>>,
    max_bytes: u64,
}

impl fmt::Debug for MemoryStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryStore")
            .field("max_bytes", &self.max_bytes)
            .field("entries", &self.cache.len())
            .field("weighted_bytes", &self.cache.weight())
            .finish()
    }
}

impl MemoryStore {
    /// A store holding at most `max_bytes` of entries.
    pub fn new(max_bytes: u64) -> Self {
        let items = usize::try_from(max_bytes / TYPICAL_ENTRY_BYTES)
            .unwrap_or(usize::MAX)
            .max(1);
        let cache = quick_cache::sync::Cache::with_weighter(items, max_bytes, SlotWeight);
        Self {
            cache: Arc::new(cache),
            max_bytes,
        }
    }

    /// The capacity in bytes.
    pub fn max_bytes(&self) -> u64 {
        self.max_bytes
    }

    /// Number of entries.
    pub fn entry_count(&self) -> u64 {
        self.cache.len() as u64
    }

    /// Total weight of the entries in bytes.
    pub fn weighted_size(&self) -> u64 {
        self.cache.weight()
    }

    fn lookup(&self, key: &CacheKey) -> Option<Arc<CachedEntry>> {
        let slot = self.cache.get(key)?;
        if Instant::now() < slot.expires_at {
            return Some(slot.entry);
        }
        // Expired: free its room now rather than when eviction reaches it.
        self.cache
            .remove_if(key, |s| Arc::ptr_eq(&s.entry, &slot.entry));
        None
    }
}

impl CacheStore for MemoryStore {
    fn get(&self, key: CacheKey) -> StoreFuture<Option<Arc<CachedEntry>>> {
        let found = self.lookup(&key);
        Box::pin(std::future::ready(Ok(found)))
    }

    fn put(&self, key: CacheKey, entry: Arc<CachedEntry>, ttl: Duration) -> StoreFuture<()> {
        // Keep an encoded answer in an allocation of its own size, not the read buffer
        // it may be a slice of (which would stay alive whole, unweighed).
        let entry = entry.compacted().map_or(entry, Arc::new);
        let weight =
            u32::try_from(entry.memory_size().saturating_add(ENTRY_OVERHEAD)).unwrap_or(u32::MAX);
        // Bounded so that `Instant` arithmetic cannot overflow.
        let ttl = ttl.min(MAX_TTL);
        self.cache.insert(
            key,
            Slot {
                entry,
                expires_at: Instant::now() + ttl,
                weight,
            },
        );
        Box::pin(std::future::ready(Ok(())))
    }

    fn get_now(
        &self,
        key: &CacheKey,
    ) -> Option<Result<Option<Arc<CachedEntry>>, super::StoreError>> {
        // Reads never wait: the layer takes this path and skips the boxed future.
        Some(Ok(self.lookup(key)))
    }
}
