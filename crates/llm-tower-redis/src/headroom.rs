//! A provider's rate-limit headroom shared by replicas through Redis.
//!
//! A [`HeadroomTracker`] learns what a provider has left (`x-ratelimit-remaining-*` and
//! reset) from the responses its own process sees. [`share`] makes every replica see what
//! any of them learned, **without a Redis call on the request path**:
//!
//! - each observation is kept in memory (the lowest count per window since the last
//!   flush, so the queue is one slot and never grows);
//! - a background task, once per `refresh` interval, runs **one** script that writes the
//!   pending observation (if any) and reads back the shared one, which it
//!   [`merge`](HeadroomTracker::merge)s into the local tracker.
//!
//! In Redis a count is kept until the reset the provider gave with it (the key's TTL), and
//! only lowered before then: two replicas' views of one window meet at the lower count.
//!
//! # Staleness
//!
//! What one replica observes reaches the others within **2 × `refresh`** plus two Redis
//! round trips (its flush, then their read). In between, each replica counts its own
//! admissions down locally (as without sharing), so a burst across replicas can pass the
//! shared count by what the others admit in that time. Pair the tracker with shared
//! request/token buckets ([`crate::rate_limit`]) for a hard cap.
//!
//! # Failure
//!
//! Every call goes through [`RedisConn`] (hard timeout, circuit breaker) from the
//! background task only: a Redis stall or outage never delays a request. The tracker then
//! works from what its own process sees (and what it merged before), the pending
//! observation is retried at the next tick, and failures are counted in
//! [`SharedHeadroom::errors`].
//!
//! # Keys
//!
//! `<RedisOptions::key_prefix>hr:v1:{<name>}:r` (requests) and `…:t` (tokens): a decimal
//! count with a TTL of the provider's reset. The braces keep both in one Redis Cluster slot.
//!
//! # Example
//!
//! ```no_run
//! # async fn f() -> Result<(), Box<dyn std::error::Error>> {
//! use llm_tower::rate_limit::{HeadroomTracker, RateLimitLayer};
//! use llm_tower_redis::{RedisConn, RedisOptions, headroom};
//! use std::time::Duration;
//!
//! let conn = RedisConn::connect("redis://127.0.0.1:6379", RedisOptions::default()).await?;
//! let shared = headroom::share(
//!     conn,
//!     "openai",
//!     HeadroomTracker::new(10, 5_000),
//!     Duration::from_millis(100),
//! );
//! let layer = RateLimitLayer::new().headroom(shared.tracker().clone());
//! # let _ = layer; Ok(()) }
//! ```

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use llm_tower::RateLimitHeadroom;
use llm_tower::rate_limit::{HeadroomTracker, WeakHeadroomTracker};
use redis::Script;
use tokio::time::Instant;

use crate::RedisConn;

/// The key namespace, versioned with the script.
pub const KEY_NAMESPACE: &str = "hr:v1:";

/// Counts above this are stored as this (Lua numbers are doubles).
const MAX_COUNT: u64 = 1 << 53;

// KEYS: requests, tokens. ARGV: remaining requests, its TTL (ms), remaining tokens, its TTL
// (ms); an empty remaining = nothing to write. A count is written when there is none or it
// is lower than the stored one. Reply: {requests, its PTTL, tokens, its PTTL}, -1 = none.
const SCRIPT: &str = r"-- llm-tower headroom v1
local out = {}
for i = 1, 2 do
  local k = KEYS[i]
  local rem = tonumber(ARGV[2 * i - 1])
  local ttl = tonumber(ARGV[2 * i])
  if rem and ttl and ttl > 0 then
    local cur = tonumber(redis.call('GET', k))
    if cur == nil or rem < cur then
      redis.call('SET', k, tostring(rem), 'PX', ttl)
    end
  end
  local v = tonumber(redis.call('GET', k))
  local p = redis.call('PTTL', k)
  if v == nil or p <= 0 then
    out[#out + 1] = -1
    out[#out + 1] = -1
  else
    out[#out + 1] = v
    out[#out + 1] = p
  end
end
return out
";

/// The pending observation: per dimension the lowest count and the moment its reset falls.
#[derive(Debug, Default)]
struct Pending {
    requests: Option<(u64, Instant)>,
    tokens: Option<(u64, Instant)>,
}

impl Pending {
    fn add(slot: &mut Option<(u64, Instant)>, rem: Option<u64>, reset: Option<Duration>) {
        let (Some(r), Some(d)) = (rem, reset) else {
            return;
        };
        let until = Instant::now() + d;
        // Lowest count wins; a later reset for the same count keeps the later one.
        *slot = match *slot {
            Some((cur, at)) if cur < r => Some((cur, at)),
            Some((cur, at)) if cur == r => Some((cur, at.max(until))),
            _ => Some((r, until)),
        };
    }
}

#[derive(Debug)]
struct Inner {
    pending: Mutex<Pending>,
    errors: AtomicU64,
    refreshes: AtomicU64,
}

/// A [`HeadroomTracker`] shared through Redis, made by [`share`]. Cheap to clone.
#[derive(Debug, Clone)]
pub struct SharedHeadroom {
    tracker: HeadroomTracker,
    inner: Arc<Inner>,
}

impl SharedHeadroom {
    /// The tracker to give the rate-limit layer
    /// ([`RateLimitLayer::headroom`](llm_tower::rate_limit::RateLimitLayer::headroom)).
    pub fn tracker(&self) -> &HeadroomTracker {
        &self.tracker
    }

    /// Background Redis calls that failed (timeouts, errors, an open breaker).
    pub fn errors(&self) -> u64 {
        self.inner.errors.load(Ordering::Relaxed)
    }

    /// Background Redis calls that succeeded (each one flush + read).
    pub fn refreshes(&self) -> u64 {
        self.inner.refreshes.load(Ordering::Relaxed)
    }
}

/// Shares `tracker`'s observations of provider `name` with every replica that shares it
/// under the same name and Redis, refreshing every `refresh` (at least 10 ms).
///
/// Spawns the background task on the current tokio runtime (call it inside one); the task
/// stops when the last clone of the returned tracker is dropped.
pub fn share(
    conn: RedisConn,
    name: &str,
    tracker: HeadroomTracker,
    refresh: Duration,
) -> SharedHeadroom {
    let inner = Arc::new(Inner {
        pending: Mutex::new(Pending::default()),
        errors: AtomicU64::new(0),
        refreshes: AtomicU64::new(0),
    });
    let sink = Arc::downgrade(&inner);
    let tracker = tracker.on_observe(move |h: &RateLimitHeadroom| {
        let Some(inner) = sink.upgrade() else { return };
        let mut p = lock(&inner.pending);
        Pending::add(&mut p.requests, h.remaining_requests, h.reset_requests);
        Pending::add(&mut p.tokens, h.remaining_tokens, h.reset_tokens);
    });
    let keys = [
        conn.key(&format!("{KEY_NAMESPACE}{{{name}}}:r")),
        conn.key(&format!("{KEY_NAMESPACE}{{{name}}}:t")),
    ];
    tokio::spawn(run(
        conn,
        keys,
        tracker.downgrade(),
        inner.clone(),
        refresh.max(Duration::from_millis(10)),
    ));
    SharedHeadroom { tracker, inner }
}

async fn run(
    conn: RedisConn,
    keys: [String; 2],
    tracker: WeakHeadroomTracker,
    inner: Arc<Inner>,
    refresh: Duration,
) {
    let script = Script::new(SCRIPT);
    let mut tick = tokio::time::interval(refresh);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        // Stop with the tracker (checked before each call, without keeping it alive).
        if tracker.upgrade().is_none() {
            return;
        }
        let pending = std::mem::take(&mut *lock(&inner.pending));
        let now = Instant::now();
        let arg = |slot: Option<(u64, Instant)>| match slot {
            Some((r, until)) if until > now => (
                r.min(MAX_COUNT).to_string(),
                (until - now).as_millis().max(1).to_string(),
            ),
            _ => (String::new(), String::new()),
        };
        let (rr, rt) = arg(pending.requests);
        let (tr, tt) = arg(pending.tokens);
        let result = conn
            .run(|mut c| {
                let mut inv = script.prepare_invoke();
                inv.key(&keys[0]).key(&keys[1]);
                inv.arg(&rr).arg(&rt).arg(&tr).arg(&tt);
                async move { inv.invoke_async::<Vec<i64>>(&mut c).await }
            })
            .await;
        let Some(tracker) = tracker.upgrade() else {
            return;
        };
        match result {
            Ok(v) if v.len() == 4 => {
                inner.refreshes.fetch_add(1, Ordering::Relaxed);
                let dim = |n: i64, ttl: i64| match (u64::try_from(n), u64::try_from(ttl)) {
                    (Ok(n), Ok(ms)) if ms > 0 => (Some(n), Some(Duration::from_millis(ms))),
                    _ => (None, None),
                };
                let (remaining_requests, reset_requests) = dim(v[0], v[1]);
                let (remaining_tokens, reset_tokens) = dim(v[2], v[3]);
                tracker.merge(&RateLimitHeadroom {
                    remaining_requests,
                    reset_requests,
                    remaining_tokens,
                    reset_tokens,
                    ..RateLimitHeadroom::default()
                });
            }
            Ok(_) | Err(_) => {
                inner.errors.fetch_add(1, Ordering::Relaxed);
                // Not written: try again at the next tick (merged with what comes in).
                let mut p = lock(&inner.pending);
                let back = |slot: &mut Option<(u64, Instant)>, old: Option<(u64, Instant)>| {
                    if let Some((r, until)) = old.filter(|(_, u)| *u > Instant::now()) {
                        Pending::add(slot, Some(r), Some(until - Instant::now()));
                    }
                };
                back(&mut p.requests, pending.requests);
                back(&mut p.tokens, pending.tokens);
            }
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn pending_keeps_the_lowest_count_per_dimension() {
        let mut p = Pending::default();
        let s = Duration::from_secs;
        Pending::add(&mut p.requests, Some(5), Some(s(2)));
        Pending::add(&mut p.requests, Some(9), Some(s(9)));
        assert_eq!(p.requests, Some((5, Instant::now() + s(2))));
        Pending::add(&mut p.requests, Some(5), Some(s(3)));
        assert_eq!(p.requests, Some((5, Instant::now() + s(3))));
        Pending::add(&mut p.requests, Some(1), Some(s(1)));
        assert_eq!(p.requests, Some((1, Instant::now() + s(1))));
        // A count without a reset is not kept (the tracker fills resets in before).
        Pending::add(&mut p.tokens, Some(1), None);
        assert_eq!(p.tokens, None);
    }
}
