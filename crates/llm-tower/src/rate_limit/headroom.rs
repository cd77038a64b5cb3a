//! The provider headroom tracker.

use std::fmt;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use llm_tower_core::RateLimitHeadroom;
use tokio::time::Instant;

/// Tracks a provider's rate-limit headroom (`x-ratelimit-remaining-*` and reset, read by
/// the provider client into [`ResponseMeta::headroom`](llm_tower_core::ResponseMeta)) so
/// that a target reports itself as limited **before** the provider answers 429.
///
/// After each response the tracker records what the provider says is left and when it
/// resets. Between responses it counts down locally: each admitted request takes one
/// request and its token estimate, so concurrent requests cannot all pass on a stale count.
/// A request is refused (until the reset) when, at admission:
///
/// - remaining requests `<` `min_remaining_requests`, or
/// - remaining tokens `<` `min_remaining_tokens` + the request's token estimate.
///
/// Once the reset time passes, the counts are forgotten until the next response. When the
/// provider sends a remaining count without a reset time, `default_reset` (1 s) is assumed.
///
/// Cheap to clone; clones share the state.
///
/// # Sharing between processes
///
/// A tracker learns only from the responses its own process sees. To share what replicas
/// learn, install an observer with [`on_observe`](Self::on_observe) that publishes each
/// observation (it runs on the response path: it must not block), and feed what the other
/// replicas published back with [`merge`](Self::merge). `llm-tower-redis`'s `headroom`
/// module does both through Redis.
///
/// ```
/// # #[tokio::main(flavor = "current_thread", start_paused = true)] async fn main() {
/// use llm_tower::rate_limit::HeadroomTracker;
/// use llm_tower::RateLimitHeadroom;
/// use std::time::Duration;
///
/// let tracker = HeadroomTracker::new(2, 0);
/// tracker.observe(&RateLimitHeadroom {
///     remaining_requests: Some(1),
///     reset_requests: Some(Duration::from_secs(3)),
///     ..Default::default()
/// });
/// assert_eq!(tracker.check(10), Err(Duration::from_secs(3)));
/// tokio::time::advance(Duration::from_secs(3)).await;
/// assert_eq!(tracker.check(10), Ok(()));
/// # }
/// ```
#[derive(Clone)]
pub struct HeadroomTracker {
    state: Arc<Mutex<State>>,
    min_requests: u64,
    min_tokens: u64,
    default_reset: Duration,
    observer: Option<Observer>,
}

type Observer = Arc<dyn Fn(&RateLimitHeadroom) + Send + Sync>;

impl fmt::Debug for HeadroomTracker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HeadroomTracker")
            .field("state", &self.state)
            .field("min_requests", &self.min_requests)
            .field("min_tokens", &self.min_tokens)
            .field("default_reset", &self.default_reset)
            .field("observer", &self.observer.is_some())
            .finish()
    }
}

/// A [`HeadroomTracker`] that does not keep its state alive: for a background task that
/// must stop when the tracker's last clone is dropped. See [`HeadroomTracker::downgrade`].
#[derive(Clone)]
pub struct WeakHeadroomTracker {
    state: Weak<Mutex<State>>,
    min_requests: u64,
    min_tokens: u64,
    default_reset: Duration,
    observer: Option<Observer>,
}

impl fmt::Debug for WeakHeadroomTracker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WeakHeadroomTracker")
            .finish_non_exhaustive()
    }
}

impl WeakHeadroomTracker {
    /// The tracker, if a clone of it is still alive.
    pub fn upgrade(&self) -> Option<HeadroomTracker> {
        Some(HeadroomTracker {
            state: self.state.upgrade()?,
            min_requests: self.min_requests,
            min_tokens: self.min_tokens,
            default_reset: self.default_reset,
            observer: self.observer.clone(),
        })
    }
}

#[derive(Debug, Default)]
struct State {
    requests: Option<(u64, Instant)>,
    tokens: Option<(u64, Instant)>,
}

impl HeadroomTracker {
    /// A tracker that refuses when fewer than `min_remaining_requests` requests, or fewer
    /// than `min_remaining_tokens` tokens beyond the request's estimate, are left.
    pub fn new(min_remaining_requests: u64, min_remaining_tokens: u64) -> Self {
        Self {
            state: Arc::default(),
            min_requests: min_remaining_requests,
            min_tokens: min_remaining_tokens,
            default_reset: Duration::from_secs(1),
            observer: None,
        }
    }

    /// Calls `f` with every observation [`observe`](Self::observe) records, after it is
    /// recorded, with each reset filled in (the default reset where the provider gave none)
    /// and capped. `f` runs on the response path: it must return at once (queue, never
    /// wait). Replaces an earlier observer.
    #[must_use]
    pub fn on_observe<F>(mut self, f: F) -> Self
    where
        F: Fn(&RateLimitHeadroom) + Send + Sync + 'static,
    {
        self.observer = Some(Arc::new(f));
        self
    }

    /// A handle that does not keep the state alive (see [`WeakHeadroomTracker`]).
    pub fn downgrade(&self) -> WeakHeadroomTracker {
        WeakHeadroomTracker {
            state: Arc::downgrade(&self.state),
            min_requests: self.min_requests,
            min_tokens: self.min_tokens,
            default_reset: self.default_reset,
            observer: self.observer.clone(),
        }
    }

    /// Merges what another process observed (remaining counts, resets from now): a count
    /// replaces the local one when it is **lower**, or when the local one is unknown or
    /// past its reset. A higher count never raises the local one before its reset: each
    /// process counts its own admissions down locally, and the lower of two views of the
    /// same window is the one that has seen more of the traffic. Not passed to the
    /// observer.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread", start_paused = true)] async fn main() {
    /// use llm_tower::rate_limit::HeadroomTracker;
    /// use llm_tower::RateLimitHeadroom;
    /// use std::time::Duration;
    ///
    /// let tracker = HeadroomTracker::new(5, 0);
    /// // Another replica saw 3 requests left for the next 2 s.
    /// tracker.merge(&RateLimitHeadroom {
    ///     remaining_requests: Some(3),
    ///     reset_requests: Some(Duration::from_secs(2)),
    ///     ..Default::default()
    /// });
    /// assert_eq!(tracker.check(0), Err(Duration::from_secs(2)));
    /// # }
    /// ```
    pub fn merge(&self, h: &RateLimitHeadroom) {
        let now = Instant::now();
        let mut st = self.lock();
        let at = |reset: Option<Duration>| now + self.reset_of(reset);
        let merge_one = |slot: &mut Option<(u64, Instant)>, rem: Option<u64>, reset| {
            let Some(r) = rem else { return };
            let replace = match *slot {
                None => true,
                Some((local, until)) => now >= until || r < local,
            };
            if replace {
                *slot = Some((r, at(reset)));
            }
        };
        merge_one(&mut st.requests, h.remaining_requests, h.reset_requests);
        merge_one(&mut st.tokens, h.remaining_tokens, h.reset_tokens);
    }

    fn reset_of(&self, reset: Option<Duration>) -> Duration {
        // A reset is the provider's word: capped, so that it cannot overflow the clock.
        reset
            .unwrap_or(self.default_reset)
            .min(llm_tower_core::MAX_RETRY_AFTER)
    }

    /// The reset assumed when the provider gives a remaining count without a reset time.
    #[must_use]
    pub fn default_reset(mut self, reset: Duration) -> Self {
        self.default_reset = reset;
        self
    }

    /// Records the headroom a response reported.
    pub fn observe(&self, h: &RateLimitHeadroom) {
        let now = Instant::now();
        {
            let mut st = self.lock();
            let at = |reset: Option<Duration>| now + self.reset_of(reset);
            if let Some(r) = h.remaining_requests {
                st.requests = Some((r, at(h.reset_requests)));
            }
            if let Some(t) = h.remaining_tokens {
                st.tokens = Some((t, at(h.reset_tokens)));
            }
        }
        if let Some(f) = &self.observer
            && (h.remaining_requests.is_some() || h.remaining_tokens.is_some())
        {
            f(&RateLimitHeadroom {
                remaining_requests: h.remaining_requests,
                remaining_tokens: h.remaining_tokens,
                reset_requests: h
                    .remaining_requests
                    .map(|_| self.reset_of(h.reset_requests)),
                reset_tokens: h.remaining_tokens.map(|_| self.reset_of(h.reset_tokens)),
                ..RateLimitHeadroom::default()
            });
        }
    }

    /// Whether a request of about `tokens` tokens may go now; `Err(retry_after)` (the time
    /// to the provider's reset) if not. Does not count the request: see
    /// [`admit`](Self::admit).
    pub fn check(&self, tokens: u64) -> Result<(), Duration> {
        let now = Instant::now();
        let mut st = self.lock();
        self.check_locked(&mut st, now, tokens)
    }

    /// [`check`](Self::check), and on success counts the request (one request and `tokens`
    /// tokens) against the remaining headroom until the next observation.
    pub fn admit(&self, tokens: u64) -> Result<(), Duration> {
        let now = Instant::now();
        let mut st = self.lock();
        self.check_locked(&mut st, now, tokens)?;
        if let Some((r, _)) = &mut st.requests {
            *r = r.saturating_sub(1);
        }
        if let Some((t, _)) = &mut st.tokens {
            *t = t.saturating_sub(tokens);
        }
        Ok(())
    }

    /// Gives back what [`admit`](Self::admit) counted, for a request that was then not
    /// sent (a local bucket refused it).
    pub fn release(&self, tokens: u64) {
        let mut st = self.lock();
        if let Some((r, _)) = &mut st.requests {
            *r = r.saturating_add(1);
        }
        if let Some((t, _)) = &mut st.tokens {
            *t = t.saturating_add(tokens);
        }
    }

    /// What the tracker believes is left now: (requests, tokens).
    pub fn remaining(&self) -> (Option<u64>, Option<u64>) {
        let now = Instant::now();
        let st = self.lock();
        let live = |v: Option<(u64, Instant)>| v.filter(|(_, reset)| now < *reset).map(|(n, _)| n);
        (live(st.requests), live(st.tokens))
    }

    fn check_locked(&self, st: &mut State, now: Instant, tokens: u64) -> Result<(), Duration> {
        if st.requests.is_some_and(|(_, reset)| now >= reset) {
            st.requests = None;
        }
        if st.tokens.is_some_and(|(_, reset)| now >= reset) {
            st.tokens = None;
        }
        let mut wait: Option<Duration> = None;
        if let Some((r, reset)) = st.requests
            && r < self.min_requests
        {
            wait = Some(reset - now);
        }
        if let Some((t, reset)) = st.tokens
            && t < self.min_tokens.saturating_add(tokens)
        {
            let w = reset - now;
            wait = Some(wait.map_or(w, |x| x.max(w)));
        }
        match wait {
            Some(w) => Err(w),
            None => Ok(()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}
