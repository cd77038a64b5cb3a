//! What a member's load is made of: a peak EWMA of its latency and its provider's headroom.

use std::time::Duration;

use llm_tower_core::{MAX_RETRY_AFTER, RateLimitHeadroom};
use tokio::time::Instant;

fn nanos(d: Duration) -> f64 {
    // Seconds and nanoseconds kept apart: `as_nanos` is a u128.
    d.as_secs() as f64 * 1e9 + f64::from(d.subsec_nanos())
}

/// Finagle's peak EWMA, as `tower::load::PeakEwma` computes it (see the module docs for
/// why that type is not used as is): a sample above the estimate replaces it at once (the
/// peak), a lower one is averaged in with a weight that grows with the time since the last
/// update, and every read decays the estimate towards zero, so an idle member is tried
/// again.
#[derive(Debug, Clone, Copy)]
pub(super) struct PeakEwma {
    rtt_ns: f64,
    update_at: Instant,
}

impl PeakEwma {
    pub(super) fn new(default_rtt: Duration, now: Instant) -> Self {
        Self {
            rtt_ns: nanos(default_rtt),
            update_at: now,
        }
    }

    fn update(&mut self, now: Instant, rtt_ns: f64, decay_ns: f64) -> f64 {
        if self.rtt_ns < rtt_ns {
            self.rtt_ns = rtt_ns;
        } else {
            let elapsed = nanos(now.saturating_duration_since(self.update_at));
            let decay = (-elapsed / decay_ns).exp();
            self.rtt_ns = self.rtt_ns * decay + rtt_ns * (1.0 - decay);
        }
        self.update_at = self.update_at.max(now);
        self.rtt_ns
    }

    /// Records a latency sample.
    pub(super) fn observe(&mut self, rtt: Duration, now: Instant, decay_ns: f64) {
        self.update(now, nanos(rtt), decay_ns);
    }

    /// A call that was given up after `at_least`: it would have taken at least that long.
    /// Raises the estimate to it if it is higher (as a peak does); a lower bound below the
    /// estimate says nothing.
    pub(super) fn at_least(&mut self, at_least: Duration, now: Instant, decay_ns: f64) {
        let rtt_ns = nanos(at_least);
        if self.estimate(now, decay_ns) < rtt_ns {
            self.rtt_ns = rtt_ns;
        }
    }

    /// The estimate now, in nanoseconds (decayed since the last update).
    pub(super) fn estimate(&mut self, now: Instant, decay_ns: f64) -> f64 {
        self.update(now, 0.0, decay_ns)
    }
}

/// One window of the provider's limits: what is left, of what, until when.
#[derive(Debug, Clone, Copy)]
struct Window {
    remaining: u64,
    limit: Option<u64>,
    until: Instant,
}

/// What a member's provider said is left ([`RateLimitHeadroom`] on its responses), counted
/// down locally by each pick until the next response says otherwise.
#[derive(Debug, Default, Clone, Copy)]
pub(super) struct Headroom {
    requests: Option<Window>,
    tokens: Option<Window>,
}

/// How the headroom weighs on a member.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) enum Weight {
    /// A factor ≥ 1 on its load (1: far from its limits).
    Factor(f64),
    /// At its limit for this much longer: not picked.
    Blocked(Duration),
}

/// Below this share of its limit left, a member's load is multiplied by `HALF / share`.
const HALF: f64 = 0.5;
/// The largest headroom factor (at 0.5 % left or less).
const MAX_FACTOR: f64 = 100.0;

impl Headroom {
    /// Records what a response reported. Resets are capped like every retry-after.
    pub(super) fn observe(&mut self, h: &RateLimitHeadroom, now: Instant, default_reset: Duration) {
        let at =
            |reset: Option<Duration>| now + reset.unwrap_or(default_reset).min(MAX_RETRY_AFTER);
        if let Some(r) = h.remaining_requests {
            self.requests = Some(Window {
                remaining: r,
                limit: h.limit_requests,
                until: at(h.reset_requests),
            });
        }
        if let Some(t) = h.remaining_tokens {
            self.tokens = Some(Window {
                remaining: t,
                limit: h.limit_tokens,
                until: at(h.reset_tokens),
            });
        }
    }

    /// The provider answered "rate limited": nothing is left for `retry_after`.
    pub(super) fn exhaust(&mut self, now: Instant, retry_after: Duration) {
        let until = now + retry_after.min(MAX_RETRY_AFTER);
        let limit = self.requests.and_then(|w| w.limit);
        self.requests = Some(Window {
            remaining: 0,
            limit,
            until: self.requests.map_or(until, |w| w.until.max(until)),
        });
    }

    /// Counts one request (and `tokens`) against what is left.
    pub(super) fn count(&mut self, tokens: u64) {
        if let Some(w) = &mut self.requests {
            w.remaining = w.remaining.saturating_sub(1);
        }
        if let Some(w) = &mut self.tokens {
            w.remaining = w.remaining.saturating_sub(tokens);
        }
    }

    /// The weight of what is left at `now`: blocked below `min_requests` requests or
    /// `min_tokens` tokens left, else a factor that grows as the share left shrinks below
    /// half of the limit.
    pub(super) fn weigh(&mut self, now: Instant, min_requests: u64, min_tokens: u64) -> Weight {
        for w in [&mut self.requests, &mut self.tokens] {
            if w.is_some_and(|x| now >= x.until) {
                *w = None;
            }
        }
        let mut blocked: Option<Duration> = None;
        let mut share = 1.0f64;
        for (w, min) in [(self.requests, min_requests), (self.tokens, min_tokens)] {
            let Some(w) = w else { continue };
            if w.remaining < min.max(1) {
                let left = w.until - now;
                blocked = Some(blocked.map_or(left, |b| b.max(left)));
            }
            if let Some(limit) = w.limit.filter(|l| *l > 0) {
                share = share.min(w.remaining as f64 / limit as f64);
            }
        }
        match blocked {
            Some(d) => Weight::Blocked(d),
            None if share >= HALF => Weight::Factor(1.0),
            None => Weight::Factor((HALF / share.max(HALF / MAX_FACTOR)).min(MAX_FACTOR)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn peak_then_decay() {
        let decay = nanos(Duration::from_secs(10));
        let now = Instant::now();
        let mut e = PeakEwma::new(Duration::from_millis(100), now);
        e.observe(Duration::from_secs(2), now, decay);
        assert_eq!(e.estimate(now, decay), 2e9); // a peak replaces the estimate
        let later = now + Duration::from_secs(10);
        let v = e.estimate(later, decay);
        assert!(v < 2e9 * 0.4 && v > 0.0, "{v}"); // e^-1 of it after one decay period
    }

    #[tokio::test(start_paused = true)]
    async fn headroom_weighs_and_blocks() {
        let now = Instant::now();
        let mut h = Headroom::default();
        assert_eq!(h.weigh(now, 1, 0), Weight::Factor(1.0));
        h.observe(
            &RateLimitHeadroom {
                remaining_requests: Some(10),
                limit_requests: Some(100),
                reset_requests: Some(Duration::from_secs(5)),
                ..Default::default()
            },
            now,
            Duration::from_secs(1),
        );
        assert_eq!(h.weigh(now, 1, 0), Weight::Factor(5.0)); // 10 % left
        for _ in 0..10 {
            h.count(0);
        }
        assert_eq!(h.weigh(now, 1, 0), Weight::Blocked(Duration::from_secs(5)));
        let after = now + Duration::from_secs(5);
        assert_eq!(h.weigh(after, 1, 0), Weight::Factor(1.0)); // reset passed
        h.exhaust(after, Duration::from_secs(2));
        assert_eq!(
            h.weigh(after, 1, 0),
            Weight::Blocked(Duration::from_secs(2))
        );
        // A hostile reset is capped.
        h.exhaust(after, Duration::MAX);
        assert_eq!(h.weigh(after, 1, 0), Weight::Blocked(MAX_RETRY_AFTER));
    }
}
