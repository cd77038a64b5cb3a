//! The shared breaker state: one sliding window per target, read by every clone.

use std::collections::VecDeque;
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tokio::time::Instant;

use super::{Config, Cooldown, WINDOW_BUCKETS};

// ===== health (the shared breaker state) =====

/// `at + d`, or far in the future when that would overflow (`Instant + Duration` panics).
pub(crate) fn later(at: Instant, d: Duration) -> Instant {
    at.checked_add(d)
        .or_else(|| at.checked_add(Duration::from_secs(86_400 * 365 * 30)))
        .unwrap_or(at)
}

/// One bucket of the sliding window: its index (time since the breaker's epoch divided by
/// the bucket length) and the outcomes counted in it.
#[derive(Debug, Clone, Copy)]
struct Bucket {
    slot: u64,
    ok: u32,
    failed: u32,
}

#[derive(Debug, Default)]
struct Breaker {
    /// The sliding window's buckets, oldest first (at most `WINDOW_BUCKETS` + 1).
    window: VecDeque<Bucket>,
    open_until: Option<Instant>,
    /// The probe in flight: its id and when it started.
    probe: Option<(u64, Instant)>,
    next_probe: u64,
    failures: u64,
    successes: u64,
    skipped: u64,
    opened: u64,
}

impl Breaker {
    /// The window's (calls, failures), as of the last [`record`](Self::record).
    fn tally(&self) -> (u64, u64) {
        self.window.iter().fold((0, 0), |(n, f), b| {
            (
                n + u64::from(b.ok) + u64::from(b.failed),
                f + u64::from(b.failed),
            )
        })
    }

    /// Counts an outcome at `now`, first dropping the buckets that have left the window.
    fn record(&mut self, epoch: Instant, now: Instant, c: &Cooldown, failed: bool) {
        let (slot, span) = slot_of(epoch, now, c);
        while self
            .window
            .front()
            .is_some_and(|b| b.slot.saturating_add(span) <= slot)
        {
            self.window.pop_front();
        }
        let bucket = match self.window.back_mut() {
            Some(b) if b.slot >= slot => b,
            _ => {
                self.window.push_back(Bucket {
                    slot,
                    ok: 0,
                    failed: 0,
                });
                while self.window.len() > WINDOW_BUCKETS as usize + 1 {
                    self.window.pop_front();
                }
                self.window.back_mut().expect("just pushed")
            }
        };
        if failed {
            bucket.failed = bucket.failed.saturating_add(1);
        } else {
            bucket.ok = bucket.ok.saturating_add(1);
        }
    }

    /// Opens (or extends) the breaker until `until`, capped at `now + max`.
    fn open(&mut self, now: Instant, until: Instant, max: Duration) {
        let until = until.min(later(now, max));
        self.window.clear();
        self.opened += 1;
        // A longer opening still in force (e.g. a retry-after) is kept, within the cap.
        self.open_until = Some(self.open_until.map_or(until, |x| x.max(until)));
    }
}

/// The bucket index of `now` and the window's length in buckets.
fn slot_of(epoch: Instant, now: Instant, c: &Cooldown) -> (u64, u64) {
    // In whole microseconds and u64 (on every attempt; u128 division is slow): 584 000
    // years of uptime before it saturates.
    let micros = |d: Duration| u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
    let bucket = micros(c.window / WINDOW_BUCKETS).max(1000);
    let slot = micros(now.saturating_duration_since(epoch)) / bucket;
    (slot, u64::from(WINDOW_BUCKETS))
}

pub(crate) enum Admit {
    Yes,
    /// This request probes the target (with this probe id).
    Probe(u64),
    Skip(Duration),
}

pub(crate) struct Breakers {
    names: Vec<Arc<str>>,
    cells: Vec<Mutex<Breaker>>,
    /// Where bucket indexes count from.
    epoch: Instant,
}

impl Breakers {
    pub(crate) fn new(names: Vec<Arc<str>>) -> Arc<Self> {
        let cells = names.iter().map(|_| Mutex::default()).collect();
        Arc::new(Self {
            names,
            cells,
            epoch: Instant::now(),
        })
    }

    fn lock(&self, i: usize) -> MutexGuard<'_, Breaker> {
        // A panic elsewhere must not take the chain down; the counters stay usable.
        self.cells[i].lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(crate) fn admit(&self, i: usize, now: Instant, cfg: &Config) -> Admit {
        let mut b = self.lock(i);
        let Some(until) = b.open_until else {
            return Admit::Yes;
        };
        // A probe that has run for a whole cooldown (and its attempt's time limit: hung on
        // readiness, say) no longer blocks the next one; its late answer then counts as a
        // plain attempt.
        let stale = cfg
            .cooldown
            .map_or(cfg.max_cooldown, |c| c.duration)
            .max(cfg.total.unwrap_or_default());
        if now < until {
            b.skipped += 1;
            Admit::Skip(until - now)
        } else if b.probe.is_some_and(|(_, at)| now < later(at, stale)) {
            // One probe at a time; the others keep skipping until it answers.
            b.skipped += 1;
            Admit::Skip(Duration::ZERO)
        } else {
            let id = b.next_probe;
            b.next_probe += 1;
            b.probe = Some((id, now));
            Admit::Probe(id)
        }
    }

    /// Clears the probe slot if `probe` is the probe in flight; true if it was.
    fn end_probe(b: &mut Breaker, probe: Option<u64>) -> bool {
        match (probe, b.probe) {
            (Some(id), Some((cur, _))) if id == cur => {
                b.probe = None;
                true
            }
            _ => false,
        }
    }

    /// The target answered (a response, or an error that is not its fault).
    pub(crate) fn success(&self, i: usize, probe: Option<u64>, cfg: &Config) {
        let now = Instant::now();
        let mut b = self.lock(i);
        b.successes += 1;
        let probe = Self::end_probe(&mut b, probe);
        if probe || b.open_until.is_some_and(|u| u <= now) {
            // Closed: a probe still out (now stale) reports as a plain attempt.
            b.open_until = None;
            b.probe = None;
        }
        if let Some(c) = &cfg.cooldown
            && b.open_until.is_none()
        {
            b.record(self.epoch, now, c, false);
        }
    }

    pub(crate) fn failure(
        &self,
        i: usize,
        probe: Option<u64>,
        retry_after: Option<Duration>,
        cfg: &Config,
    ) {
        let now = Instant::now();
        let mut b = self.lock(i);
        b.failures += 1;
        let probe = Self::end_probe(&mut b, probe);
        let mut open_until = None;
        if let Some(c) = cfg.cooldown {
            if probe {
                open_until = Some(later(now, c.duration));
            } else if b.open_until.is_none() {
                b.record(self.epoch, now, &c, true);
                let (calls, failed) = b.tally();
                // failed / calls >= ratio, in integers.
                if calls >= u64::from(c.min_calls)
                    && u128::from(failed) * 1_000_000 >= u128::from(calls) * u128::from(c.ratio_ppm)
                {
                    open_until = Some(later(now, c.duration));
                }
            }
        }
        if cfg.honor_retry_after
            && let Some(ra) = retry_after
        {
            open_until = open_until.max(Some(later(now, ra)));
        }
        match open_until {
            Some(u) => b.open(now, u, cfg.max_cooldown),
            // A failed probe with no breaker and no retry-after: back to plain trying.
            None if probe => b.open_until = None,
            None => {}
        }
    }

    /// The probe ended without an answer (the caller dropped the request or its deadline
    /// ran out): free the slot so that the next request probes.
    pub(crate) fn release_probe(&self, i: usize, probe: Option<u64>) {
        Self::end_probe(&mut self.lock(i), probe);
    }

    /// Time left while target `i` is open (`Some(ZERO)`: half-open with a probe in
    /// flight), without counting a skip or taking the probe slot; `None` if it may be tried.
    #[cfg(feature = "balance")]
    pub(crate) fn open_for(&self, i: usize, now: Instant, cfg: &Config) -> Option<Duration> {
        let b = self.lock(i);
        let until = b.open_until?;
        let stale = cfg
            .cooldown
            .map_or(cfg.max_cooldown, |c| c.duration)
            .max(cfg.total.unwrap_or_default());
        if now < until {
            Some(until - now)
        } else if b.probe.is_some_and(|(_, at)| now < later(at, stale)) {
            Some(Duration::ZERO)
        } else {
            None
        }
    }
}

/// A target's breaker state, as [`FallbackHealth::snapshot`] reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CircuitState {
    /// Requests go to the target.
    Closed,
    /// The target is skipped for `remaining` more.
    Open {
        /// Time left before the target is probed.
        remaining: Duration,
    },
    /// The cooldown is over: the next request probes the target (`probing`: one is now).
    HalfOpen {
        /// Whether a probe is in flight.
        probing: bool,
    },
}

/// One target's health, for metrics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TargetHealth {
    /// The target's name.
    pub name: Arc<str>,
    /// The breaker state.
    pub state: CircuitState,
    /// Failures in the sliding window (as of the target's last attempt).
    pub recent_failures: u64,
    /// Attempts in the sliding window (as of the target's last attempt).
    pub recent_calls: u64,
    /// Attempts that failed in a way that moves on, since start.
    pub failures: u64,
    /// Attempts the target answered, since start.
    pub successes: u64,
    /// Requests that skipped the target while it was cooling down, since start.
    pub skipped: u64,
    /// Times the breaker opened, since start.
    pub opened: u64,
}

/// A handle on a chain's shared breaker state (cheap to clone), for metrics.
#[derive(Clone)]
pub struct FallbackHealth(pub(crate) Arc<Breakers>);

impl fmt::Debug for FallbackHealth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.snapshot()).finish()
    }
}

impl FallbackHealth {
    /// Every target's health, in chain order.
    pub fn snapshot(&self) -> Vec<TargetHealth> {
        let now = Instant::now();
        (0..self.0.names.len())
            .map(|i| {
                let b = self.0.lock(i);
                let state = match b.open_until {
                    None => CircuitState::Closed,
                    Some(u) if u > now => CircuitState::Open { remaining: u - now },
                    Some(_) => CircuitState::HalfOpen {
                        probing: b.probe.is_some(),
                    },
                };
                TargetHealth {
                    name: self.0.names[i].clone(),
                    state,
                    recent_failures: b.tally().1,
                    recent_calls: b.tally().0,
                    failures: b.failures,
                    successes: b.successes,
                    skipped: b.skipped,
                    opened: b.opened,
                }
            })
            .collect()
    }
}
