//! Single-flight: concurrent identical misses share one upstream call.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use llm_tower_core::LlmError;
use tokio::sync::watch;

use super::{CacheKey, CachedEntry};

/// What the leader of a flight hands its waiters.
#[derive(Debug, Clone)]
pub(crate) enum Landing {
    /// The answer (also when it could not be stored).
    Entry(Arc<CachedEntry>),
    /// The upstream error the leader got.
    Error(LlmError),
    /// The answer cannot be shared (incomplete or too large): each waiter calls upstream.
    Direct,
}

/// What a waiter ends up with.
#[derive(Debug)]
pub(crate) enum Waited {
    Landed(Landing),
    /// The leader went away (dropped, cancelled, timed out on its own deadline) without an
    /// answer: look up and join again, so one waiter becomes the next leader.
    Abandoned,
}

type Slot = (u64, watch::Receiver<Option<Landing>>);

#[derive(Debug, Default)]
pub(crate) struct Flights {
    map: Mutex<crate::FastMap<CacheKey, Slot>>,
    next_id: AtomicU64,
}

pub(crate) enum Join {
    Leader(FlightGuard),
    Waiter(watch::Receiver<Option<Landing>>),
}

impl Flights {
    pub(crate) fn join(self: &Arc<Self>, key: CacheKey) -> Join {
        let mut map = self.map.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some((_, rx)) = map.get(&key) {
            // A receiver left in the map after its sender is gone means the leader's guard
            // is being dropped right now; take over instead of waiting on a dead flight.
            if rx.has_changed().is_ok() {
                return Join::Waiter(rx.clone());
            }
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = watch::channel(None);
        map.insert(key, (id, rx));
        Join::Leader(FlightGuard {
            flights: self.clone(),
            key,
            id,
            tx,
        })
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.map
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }
}

/// Held by the leader. Landing it wakes the waiters with the result; dropping it without
/// landing (the leader's future or stream was dropped) wakes them with `Abandoned`, so a
/// waiter never hangs.
#[derive(Debug)]
pub(crate) struct FlightGuard {
    flights: Arc<Flights>,
    key: CacheKey,
    id: u64,
    tx: watch::Sender<Option<Landing>>,
}

impl FlightGuard {
    pub(crate) fn land(self, landing: Landing) {
        self.tx.send_replace(Some(landing));
        // Drop removes the flight; later requests look up the store instead.
    }
}

impl Drop for FlightGuard {
    fn drop(&mut self) {
        let mut map = self
            .flights
            .map
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if map.get(&self.key).is_some_and(|(id, _)| *id == self.id) {
            map.remove(&self.key);
        }
        // The sender drops after this: waiters still waiting see the channel closed.
    }
}

pub(crate) async fn wait(mut rx: watch::Receiver<Option<Landing>>) -> Waited {
    match rx.wait_for(Option::is_some).await {
        Ok(v) => match v.clone() {
            Some(landing) => Waited::Landed(landing),
            None => Waited::Abandoned,
        },
        Err(_) => Waited::Abandoned,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(n: u8) -> CacheKey {
        CacheKey::from_bytes([n; 32])
    }

    #[tokio::test]
    async fn dropped_leader_wakes_waiters_and_frees_the_slot() {
        let flights = Arc::new(Flights::default());
        let Join::Leader(guard) = flights.join(key(1)) else {
            panic!("first join must lead");
        };
        let Join::Waiter(rx) = flights.join(key(1)) else {
            panic!("second join must wait");
        };
        assert_eq!(flights.len(), 1);
        drop(guard);
        assert_eq!(flights.len(), 0);
        assert!(matches!(wait(rx).await, Waited::Abandoned));
        // The next join leads again.
        assert!(matches!(flights.join(key(1)), Join::Leader(_)));
    }

    #[tokio::test]
    async fn landing_reaches_waiters_that_joined_before_it() {
        let flights = Arc::new(Flights::default());
        let Join::Leader(guard) = flights.join(key(2)) else {
            panic!("first join must lead");
        };
        let Join::Waiter(rx) = flights.join(key(2)) else {
            panic!("second join must wait");
        };
        guard.land(Landing::Direct);
        assert!(matches!(wait(rx).await, Waited::Landed(Landing::Direct)));
        assert_eq!(flights.len(), 0);
    }
}
