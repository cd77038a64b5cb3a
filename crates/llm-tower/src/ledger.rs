//! Holds: the reservation shape shared by budgets ([`cost`](crate::cost)) and rate limits
//! ([`rate_limit`](crate::rate_limit)), in the manner of two-phase transfers with timeouts
//! and payment-API idempotency keys.
//!
//! A request reserves with a [`Hold`]: an id ([`HoldId`], one per request) and an expiry.
//! Stores follow the same rules, in memory and in Redis:
//!
//! - **reserve(hold, amount)** records the hold under its id. Reserving again with an id the
//!   store already knows (an open hold, or a settled one) is a no-op, so a reservation that
//!   timed out can be sent again without counting twice; a reservation that arrives after
//!   its hold has expired is a no-op too.
//! - **settle(hold, actual)** replaces the hold with `actual`, **once**: a repeated settle is
//!   a no-op. A settle whose hold does not exist (the reservation failed open, was lost or
//!   expired) records `actual` — never a negative correction — and leaves a short-lived
//!   tombstone, so that a reservation arriving late with that id is a no-op.
//! - A hold never settled (the replica died, the answer was lost) is released at its expiry.
//!
//! So a budget's spend is *settled + open holds*, and never less than what was settled.

use std::cmp::Reverse;
use std::collections::hash_map::Entry;
use std::collections::{BinaryHeap, VecDeque};
use std::fmt;
use std::hash::{BuildHasher, Hasher};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::time::Instant;

/// The id of one reservation: unique per request, across replicas (a per-process random
/// half and a counter). Displayed as 32 hex digits.
///
/// ```
/// use llm_tower::ledger::HoldId;
/// let (a, b) = (HoldId::next(), HoldId::next());
/// assert_ne!(a, b);
/// assert_eq!(a.to_string().len(), 32);
/// ```
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct HoldId(u128);

impl HoldId {
    /// A new id, never returned before by this process (and, with overwhelming probability,
    /// by any other).
    pub fn next() -> Self {
        static SEED: OnceLock<u64> = OnceLock::new();
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let seed = *SEED.get_or_init(|| {
            // std's RandomState is seeded from the OS per process: no extra dependency.
            let mut h = std::hash::RandomState::new().build_hasher();
            h.write_u32(std::process::id());
            if let Ok(d) = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH) {
                h.write_u128(d.as_nanos());
            }
            h.finish()
        });
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        Self((u128::from(seed) << 64) | u128::from(n))
    }

    /// An id from its 128 bits (e.g. derived from a request id).
    pub const fn from_u128(v: u128) -> Self {
        Self(v)
    }

    /// The 128 bits.
    pub const fn as_u128(self) -> u128 {
        self.0
    }
}

impl fmt::Display for HoldId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:032x}", self.0)
    }
}

impl fmt::Debug for HoldId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "HoldId({self})")
    }
}

/// One reservation: its id and when it is released if never settled.
///
/// ```
/// use llm_tower::ledger::Hold;
/// use std::time::Duration;
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// let hold = Hold::new(Duration::from_secs(300));
/// assert!(hold.expires_at > tokio::time::Instant::now());
/// # }
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hold {
    /// The id: settle with the same id.
    pub id: HoldId,
    /// When an unsettled hold is released (on tokio's clock; networked stores convert it
    /// to wall-clock time when they send it).
    pub expires_at: Instant,
}

impl Hold {
    /// A hold with a new id, expiring `ttl` from now.
    pub fn new(ttl: Duration) -> Self {
        Self {
            id: HoldId::next(),
            expires_at: Instant::now() + ttl,
        }
    }
}

/// How long a hold lives by default: longer than any LLM call should take, so only holds
/// of requests that never finished (a dead replica, a lost answer) reach it.
pub const DEFAULT_HOLD_TTL: Duration = Duration::from_secs(600);

/// The shortest hold the layers make.
pub const MIN_HOLD_TTL: Duration = Duration::from_secs(1);

/// What [`HoldTable::close`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Closed {
    /// An open hold of this amount, now closed.
    Held(u64),
    /// No hold: a tombstone was left.
    Missing,
    /// Already settled: nothing done.
    Already,
}

/// An open hold: its amount and when it is released if never settled.
#[derive(Debug, Clone, Copy)]
struct Open {
    amount: u64,
    expires: Instant,
}

/// The holds and tombstones of one account (a budget key, a bucket), with their expiry
/// order. Empty tables do not allocate; a busy table reuses its capacity, so a request
/// costs map and queue operations but no allocation in the steady state.
///
/// Its size is the open holds (the requests in flight) plus the tombstones (the request
/// rate times the tombstone lifetime): open holds and tombstones are kept apart, so that
/// the expiry heap holds only what open holds made and a tombstone costs an id and an
/// instant twice (its map entry and its place in the queue).
#[derive(Debug, Default)]
pub(crate) struct HoldTable {
    open: crate::FastMap<HoldId, Open>,
    /// Open holds by expiry (items of holds closed since are stale and skipped).
    by_expiry: BinaryHeap<Reverse<(Instant, HoldId)>>,
    /// Tombstones: closed ids and until when they are remembered.
    closed: crate::FastMap<HoldId, Instant>,
    /// Tombstones in the order they were made: a store gives them all one lifetime, so
    /// they also expire in this order and leave from the front, without a heap's cache
    /// misses on every request.
    tombs: VecDeque<(Instant, HoldId)>,
}

impl HoldTable {
    /// Drops every expired entry; returns the amount of the open holds released.
    pub(crate) fn sweep(&mut self, now: Instant) -> u64 {
        let mut released = 0u64;
        while let Some(Reverse((at, id))) = self.by_expiry.peek().copied() {
            if at > now {
                break;
            }
            self.by_expiry.pop();
            // Only a hold still open at this expiry is released (a closed one has left
            // `open`; one opened again since has another expiry).
            if let Entry::Occupied(h) = self.open.entry(id)
                && h.get().expires == at
            {
                released = released.saturating_add(h.remove().amount);
            }
        }
        while let Some(&(at, id)) = self.tombs.front() {
            if at > now {
                break;
            }
            self.tombs.pop_front();
            // Only the tombstone this item was made for (the id may have been held and
            // closed again since, with a later expiry).
            if let Entry::Occupied(t) = self.closed.entry(id)
                && *t.get() == at
            {
                t.remove();
            }
        }
        released
    }

    /// Whether `id` is known (an open hold or a tombstone).
    pub(crate) fn contains(&self, id: HoldId) -> bool {
        self.open.contains_key(&id) || self.closed.contains_key(&id)
    }

    /// Records an open hold (the caller checked it is new; the same id twice in one
    /// reservation, e.g. two charges on one key, adds up).
    pub(crate) fn hold(&mut self, id: HoldId, amount: u64, expires: Instant) {
        if let Some(h) = self.open.get_mut(&id) {
            h.amount = h.amount.saturating_add(amount);
            return;
        }
        self.closed.remove(&id);
        self.open.insert(id, Open { amount, expires });
        self.by_expiry.push(Reverse((expires, id)));
    }

    /// Closes `id`: an open hold becomes a tombstone until `tomb_until`; a missing one
    /// leaves a tombstone; a tombstone stays as it is.
    pub(crate) fn close(&mut self, id: HoldId, tomb_until: Instant) -> Closed {
        let found = match self.open.remove(&id) {
            Some(h) => Closed::Held(h.amount),
            None => Closed::Missing,
        };
        // An id is never open and a tombstone at once (`hold` drops the tombstone), so an
        // existing tombstone means the id was not open: one lookup checks and inserts.
        match self.closed.entry(id) {
            Entry::Occupied(_) => return Closed::Already,
            Entry::Vacant(t) => {
                t.insert(tomb_until);
            }
        }
        self.tombs.push_back((tomb_until, id));
        // A closed hold's heap item (due at the hold's expiry, minutes away) is now stale.
        // Left alone, such items would pile up by the request rate times the hold
        // lifetime; rebuilding from the open holds once the heap outgrows them keeps it
        // within twice the requests in flight, at O(1) amortized per close.
        if self.by_expiry.len() > 2 * self.open.len() + 64 {
            // In place: the heap keeps its capacity, so a busy table does not free and
            // fault in its pages again on every rebuild.
            let open = &self.open;
            self.by_expiry
                .retain(|Reverse((at, id))| open.get(id).is_some_and(|h| h.expires == *at));
        }
        found
    }

    /// No hold and no tombstone.
    #[cfg_attr(not(feature = "rate-limit"), allow(dead_code))]
    pub(crate) fn is_empty(&self) -> bool {
        self.open.is_empty() && self.closed.is_empty()
    }

    /// Open holds.
    pub(crate) fn open_holds(&self) -> usize {
        self.open.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `n` requests, one every 50 µs, each held for ten minutes and settled `in_flight`
    /// requests later (tombstone: 2 s), with the heap's bound checked after each.
    fn settle_in_turn(t: &mut HoldTable, now: Instant, n: u128, in_flight: u128) {
        for i in 0..n {
            let at = now + Duration::from_micros(i as u64 * 50);
            t.sweep(at);
            t.hold(HoldId::from_u128(i), 1, at + Duration::from_secs(600));
            if i >= in_flight {
                let id = HoldId::from_u128(i - in_flight);
                assert_eq!(t.close(id, at + Duration::from_secs(2)), Closed::Held(1));
            }
            // The heap holds what the open holds made, not what the tombstones did.
            let bound = 2 * (in_flight as usize + 1) + 64;
            assert!(t.by_expiry.len() <= bound, "{}", t.by_expiry.len());
        }
    }

    #[tokio::test(start_paused = true)]
    async fn closed_holds_leave_no_stale_heap_items_behind() {
        let now = Instant::now();
        let mut t = HoldTable::default();
        settle_in_turn(&mut t, now, 100_000, 0);
        // Only the tombstones of the last 2 s are alive (40 000 at one request per 50 µs).
        assert!(t.closed.len() <= 40_001, "{}", t.closed.len());
        assert_eq!(t.tombs.len(), t.closed.len());
        assert_eq!(t.open_holds(), 0);
        assert_eq!(t.sweep(now + Duration::from_secs(3600)), 0);
        assert!(t.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn the_heap_follows_the_holds_in_flight() {
        let now = Instant::now();
        let mut t = HoldTable::default();
        settle_in_turn(&mut t, now, 20_000, 500);
        assert_eq!(t.open_holds(), 500);
        // Every open hold is still released at its expiry.
        assert_eq!(t.sweep(now + Duration::from_secs(3600)), 500);
        assert!(t.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn an_id_held_again_keeps_its_new_tombstone() {
        let now = Instant::now();
        let mut t = HoldTable::default();
        let a = HoldId::from_u128(7);
        assert_eq!(t.close(a, now + Duration::from_secs(1)), Closed::Missing);
        // Held again (a caller that did not check), then closed with a later tombstone.
        t.hold(a, 3, now + Duration::from_secs(60));
        assert_eq!(t.close(a, now + Duration::from_secs(5)), Closed::Held(3));
        // The first tombstone's queue item passes without taking the second one along.
        assert_eq!(t.sweep(now + Duration::from_secs(2)), 0);
        assert!(t.contains(a));
        assert_eq!(t.close(a, now + Duration::from_secs(9)), Closed::Already);
        t.sweep(now + Duration::from_secs(5));
        assert!(!t.contains(a));
        assert!(t.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn table_releases_holds_and_forgets_tombstones_at_expiry() {
        let now = Instant::now();
        let mut t = HoldTable::default();
        let (a, b) = (HoldId::from_u128(1), HoldId::from_u128(2));
        t.hold(a, 10, now + Duration::from_secs(10));
        t.hold(b, 5, now + Duration::from_secs(20));
        assert_eq!(t.close(a, now + Duration::from_secs(1)), Closed::Held(10));
        assert_eq!(t.close(a, now + Duration::from_secs(1)), Closed::Already);
        assert_eq!(t.sweep(now + Duration::from_secs(2)), 0);
        assert!(!t.contains(a), "tombstone gone");
        assert_eq!(t.sweep(now + Duration::from_secs(20)), 5, "b released");
        assert!(t.is_empty());
        assert_eq!(t.close(a, now + Duration::from_secs(30)), Closed::Missing);
        assert!(t.contains(a));
    }
}
