//! Rate-limit stores: the trait and the in-memory store.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use llm_tower_core::LlmError;
use tokio::time::Instant;

use crate::ledger::{Closed, Hold, HoldTable};

/// One bucket a request must take from: its key, its limit per window, and the amount
/// (1 for a request bucket, the token estimate for a token bucket).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BucketCheck {
    /// The bucket's key (rule name plus the request's tenant/model/task, as the rule says).
    pub key: String,
    /// Capacity: units allowed per window.
    pub limit: u64,
    /// The window over which `limit` refills.
    pub window: Duration,
    /// Units this request takes.
    pub amount: u64,
    /// Whether the take is a hold, settled later by id with the actual amount (token
    /// buckets), or final (request buckets: the store only remembers the id for a short
    /// while, so a repeated acquisition is a no-op).
    pub held: bool,
}

/// The answer of a store to [`RateLimitStore::acquire`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Acquire {
    /// Every bucket had room; each was charged. `remaining[i]` is what is left in bucket `i`
    /// (`None` when unknown, e.g. a Redis store failing open).
    Allowed {
        /// Units left per bucket, in the order of the checks.
        remaining: Vec<Option<u64>>,
    },
    /// Bucket `index` had no room; **nothing** was charged.
    Limited {
        /// The bucket that refused.
        index: usize,
        /// When that bucket will have room for this request.
        retry_after: Duration,
    },
}

/// The future of [`RateLimitStore::acquire`].
pub type AcquireFuture = Pin<Box<dyn Future<Output = Result<Acquire, LlmError>> + Send>>;

/// Where the buckets live. All buckets of one request are checked and charged **atomically,
/// all or nothing**: if one refuses, none is charged.
///
/// Buckets are token buckets (equivalent to GCRA): a bucket holds up to `limit` units and
/// refills continuously at `limit / window`; an absent bucket is full. Settling may push a
/// bucket below zero (debt), which later requests wait out.
///
/// # Holds
///
/// Every acquisition carries a [`Hold`] (see [`ledger`](crate::ledger)). An acquisition
/// whose id the bucket already knows is a no-op (`Allowed`), so a retry after a timeout
/// never takes twice. A held take ([`BucketCheck::held`]) is settled by id: the bucket
/// takes `actual − held` once (giving back when negative, never above capacity); a settle
/// without a hold takes `actual` (never gives back) and leaves a tombstone. A hold never
/// settled is forgotten at its expiry without a refund: its units refill with the bucket
/// like any other take.
///
/// Implementations: [`InMemoryRateLimitStore`] here, and a Redis store in `llm-tower-redis`.
pub trait RateLimitStore: Send + Sync + fmt::Debug + 'static {
    /// Checks and charges every bucket at once under `hold`. A store that cannot answer
    /// either fails open (`Allowed` with unknown remaining) or closed (`Err`), as it
    /// documents.
    fn acquire(&self, hold: Hold, checks: &[BucketCheck]) -> AcquireFuture;

    /// A synchronous answer, for stores that can give one without I/O (the layer then
    /// skips the boxed future). The default is `None`: use [`acquire`](Self::acquire).
    fn acquire_now(&self, hold: Hold, checks: &[BucketCheck]) -> Option<Result<Acquire, LlmError>> {
        let _ = (hold, checks);
        None
    }

    /// Settles the hold `hold.id` in each of `checks`' buckets with `actual` units
    /// (idempotent). Runs from a completion hook, so it must not block; a networked store
    /// sends it in the background (and documents it).
    fn settle(&self, hold: Hold, checks: &[BucketCheck], actual: u64);
}

#[derive(Debug)]
struct Bucket {
    level: f64,
    at: Instant,
    limit: u64,
    window: Duration,
    holds: HoldTable,
}

impl Bucket {
    fn full(limit: u64, window: Duration, now: Instant) -> Self {
        Self {
            level: limit as f64,
            at: now,
            limit,
            window,
            holds: HoldTable::default(),
        }
    }

    /// Whether the bucket is the same as an absent one: full, and no id to remember.
    fn is_idle(&mut self, now: Instant) -> bool {
        self.holds.sweep(now);
        self.is_full_at(now) && self.holds.is_empty()
    }

    /// The level at `now`, refilled at `limit / window`, capped at `limit`.
    fn level_at(&self, now: Instant) -> f64 {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        let rate = self.limit as f64 / self.window.as_secs_f64().max(1e-9);
        (self.level + elapsed * rate).min(self.limit as f64)
    }

    fn is_full_at(&self, now: Instant) -> bool {
        self.level_at(now) >= self.limit as f64
    }
}

/// How long until a bucket at `level` holds `amount` units.
pub(crate) fn time_to_refill(level: f64, amount: u64, limit: u64, window: Duration) -> Duration {
    let missing = amount as f64 - level;
    if missing <= 0.0 {
        return Duration::ZERO;
    }
    let secs = missing * window.as_secs_f64() / (limit.max(1) as f64);
    // Round up to the millisecond so that waking up at retry-after finds room.
    Duration::from_millis((secs * 1000.0).ceil() as u64)
}

/// Buckets in a bounded in-process map, on tokio's clock (so paused-time tests control it).
///
/// # Why not `governor`
///
/// `governor`'s keyed limiter can take `n` cells (`check_key_n`) but cannot give them back
/// or take more afterwards, so a token reservation cannot be settled with the actual usage,
/// and a multi-bucket request cannot be all-or-nothing. This store implements the same
/// algorithm (a token bucket, equivalent to GCRA) with reserve, settle and debt.
///
/// # Memory
///
/// A bucket that has refilled to its capacity is the same as an absent one, so it is
/// removed. [`retain_recent`](Self::retain_recent) does that; the store also runs it every
/// 4096 operations and whenever the map exceeds `max_keys` (default 100 000). If the map is
/// still over `max_keys` after that, the least recently used buckets are evicted (their
/// keys then start again from a full bucket), so memory stays bounded whatever the keys.
///
/// Cheap to share: put it in an `Arc`; [`RateLimitLayer`](super::RateLimitLayer) does.
pub struct InMemoryRateLimitStore {
    buckets: Mutex<crate::FastMap<String, Bucket>>,
    ops: AtomicU64,
    max_keys: usize,
    tombstone_ttl: Duration,
}

impl fmt::Debug for InMemoryRateLimitStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("InMemoryRateLimitStore")
            .field("keys", &self.len())
            .field("max_keys", &self.max_keys)
            .finish()
    }
}

impl Default for InMemoryRateLimitStore {
    fn default() -> Self {
        Self::new()
    }
}

const GC_EVERY: u64 = 4096;

impl InMemoryRateLimitStore {
    /// An empty store holding at most 100 000 buckets.
    pub fn new() -> Self {
        Self::with_max_keys(100_000)
    }

    /// An empty store holding at most `max_keys` buckets (at least 1).
    pub fn with_max_keys(max_keys: usize) -> Self {
        Self {
            buckets: Mutex::default(),
            ops: AtomicU64::new(0),
            max_keys: max_keys.max(1),
            tombstone_ttl: Duration::from_millis(200),
        }
    }

    /// Remembers settled and final ids for `ttl` (default 200 ms; memory grows with the request rate times it): a repeated settle or
    /// acquisition with such an id within it is a no-op.
    #[must_use]
    pub fn tombstone_ttl(mut self, ttl: Duration) -> Self {
        self.tombstone_ttl = ttl;
        self
    }

    /// Number of buckets held now.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether no bucket is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Units left in bucket `key` now (`None` if the bucket is absent, i.e. full).
    pub fn remaining(&self, key: &str) -> Option<u64> {
        let now = Instant::now();
        self.lock()
            .get(key)
            .map(|b| b.level_at(now).max(0.0).floor() as u64)
    }

    /// The open holds of bucket `key` now.
    pub fn open_holds(&self, key: &str) -> usize {
        let now = Instant::now();
        self.lock().get_mut(key).map_or(0, |b| {
            b.holds.sweep(now);
            b.holds.open_holds()
        })
    }

    /// Removes every bucket that has refilled to its capacity (it is the same as absent).
    /// Runs by itself every 4096 operations; call it from a maintenance task if you want
    /// memory back sooner.
    pub fn retain_recent(&self) {
        let now = Instant::now();
        let mut map = self.lock();
        map.retain(|_, b| !b.is_idle(now));
        Self::enforce_cap(&mut map, self.max_keys);
    }

    fn enforce_cap(map: &mut crate::FastMap<String, Bucket>, max_keys: usize) {
        if map.len() <= max_keys {
            return;
        }
        // Evict the least recently touched buckets down to 90% of the cap, so that this
        // O(n) pass does not run on every insert.
        let target = max_keys - max_keys / 10;
        let mut ages: Vec<Instant> = map.values().map(|b| b.at).collect();
        let cut_idx = map.len() - target;
        let (_, cut, _) = ages.select_nth_unstable(cut_idx.saturating_sub(1));
        let cut = *cut;
        map.retain(|_, b| b.at > cut);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, crate::FastMap<String, Bucket>> {
        self.buckets
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn maybe_gc(&self, map: &mut crate::FastMap<String, Bucket>, now: Instant) {
        let n = self.ops.fetch_add(1, Ordering::Relaxed);
        if map.len() > self.max_keys || (n % GC_EVERY == GC_EVERY - 1) {
            map.retain(|_, b| !b.is_idle(now));
            Self::enforce_cap(map, self.max_keys);
        }
    }

    /// The synchronous all-or-nothing check and charge.
    pub fn try_acquire(&self, hold: Hold, checks: &[BucketCheck]) -> Acquire {
        let now = Instant::now();
        let mut map = self.lock();
        // First pass: look only, so that a refusal charges nothing. The answer's vector
        // holds the levels meanwhile (one allocation per request).
        let mut known = hold.expires_at <= now;
        let mut levels: Vec<f64> = Vec::with_capacity(checks.len());
        for c in checks {
            let level = match map.get_mut(&c.key) {
                Some(b) => {
                    b.holds.sweep(now);
                    known |= b.holds.contains(hold.id);
                    // A changed limit or window (new config) takes effect at once.
                    if b.limit == c.limit && b.window == c.window {
                        b.level_at(now)
                    } else {
                        b.level_at(now).min(c.limit as f64)
                    }
                }
                None => c.limit as f64,
            };
            levels.push(level);
        }
        let floor = |l: f64| Some(l.max(0.0).floor() as u64);
        if known {
            // Already taken (or too late to matter): a no-op.
            return Acquire::Allowed {
                remaining: levels.into_iter().map(floor).collect(),
            };
        }
        for (i, (c, level)) in checks.iter().zip(&levels).enumerate() {
            if *level < c.amount as f64 {
                return Acquire::Limited {
                    index: i,
                    retry_after: time_to_refill(*level, c.amount, c.limit, c.window),
                };
            }
        }
        let tomb_until = now + self.tombstone_ttl;
        let mut remaining = Vec::with_capacity(checks.len());
        for (c, before) in checks.iter().zip(levels) {
            let level = before - c.amount as f64;
            remaining.push(floor(level));
            let bucket = match map.get_mut(&c.key) {
                Some(b) => b,
                None => {
                    map.insert(c.key.clone(), Bucket::full(c.limit, c.window, now));
                    let Some(b) = map.get_mut(&c.key) else {
                        continue;
                    };
                    b
                }
            };
            bucket.level = level;
            bucket.at = now;
            bucket.limit = c.limit;
            bucket.window = c.window;
            if c.held {
                bucket.holds.hold(hold.id, c.amount, hold.expires_at);
            } else {
                bucket.holds.close(hold.id, tomb_until);
            }
        }
        self.maybe_gc(&mut map, now);
        Acquire::Allowed { remaining }
    }

    /// The synchronous settlement (see [`RateLimitStore::settle`]).
    pub fn settle_now(&self, hold: Hold, checks: &[BucketCheck], actual: u64) {
        let now = Instant::now();
        let tomb_until = now + self.tombstone_ttl;
        let mut map = self.lock();
        for c in checks {
            if !map.contains_key(&c.key) {
                map.insert(c.key.clone(), Bucket::full(c.limit, c.window, now));
            }
            let Some(b) = map.get_mut(&c.key) else {
                continue;
            };
            b.holds.sweep(now);
            // A missing hold takes `actual` and never gives back.
            let take = match b.holds.close(hold.id, tomb_until) {
                Closed::Held(held) => actual as f64 - held as f64,
                Closed::Missing => actual as f64,
                Closed::Already => continue,
            };
            b.level = (b.level_at(now) - take).min(c.limit as f64);
            b.at = now;
            b.limit = c.limit;
            b.window = c.window;
        }
    }
}

impl RateLimitStore for InMemoryRateLimitStore {
    fn acquire(&self, hold: Hold, checks: &[BucketCheck]) -> AcquireFuture {
        let r = self.try_acquire(hold, checks);
        Box::pin(std::future::ready(Ok(r)))
    }

    fn acquire_now(&self, hold: Hold, checks: &[BucketCheck]) -> Option<Result<Acquire, LlmError>> {
        Some(Ok(self.try_acquire(hold, checks)))
    }

    fn settle(&self, hold: Hold, checks: &[BucketCheck], actual: u64) {
        self.settle_now(hold, checks, actual);
    }
}
