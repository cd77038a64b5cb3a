//! [`BalanceLayer`], [`Balance`], the members and the shared load state.

use std::fmt;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use llm_tower_core::{
    BoxableLlmService, ChatRequest, LlmError, LlmResponse, RateLimitHeadroom, TakenTargets,
};
use tokio::time::Instant;
use tower::util::rng::{HasherRng, Rng};
use tower_layer::Layer;
use tower_service::Service;

use super::future::{Guard, ResponseFuture};
use super::load::{Headroom, PeakEwma, Weight};
use crate::fallback::{self, Admit, Breakers, Cooldown, FallbackTarget};

// ===== members =====

/// One member of a balanced group: a named LLM service and, optionally, the model to ask
/// it for (the same model at another provider, region or key). The same type as a
/// fallback chain's step, so a step and a member are built alike.
pub type BalanceTarget = FallbackTarget;

/// How a member is chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Pick {
    /// Power of two choices: two members drawn at random, the one with the lower load
    /// serves (the default).
    #[default]
    PowerOfTwo,
    /// Each member in turn, whatever its load (breakers and headroom still exclude a
    /// member): a baseline to compare with, and for members whose load cannot be measured.
    RoundRobin,
}

#[derive(Debug, Clone, Copy)]
pub(super) struct Config {
    pub(super) pick: Pick,
    pub(super) default_rtt: Duration,
    pub(super) decay_ns: f64,
    pub(super) min_remaining_requests: u64,
    pub(super) min_remaining_tokens: u64,
    pub(super) default_reset: Duration,
    /// The breaker settings, in the fallback layer's form (its breaker is reused).
    pub(super) breaker: fallback::Config,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            pick: Pick::PowerOfTwo,
            default_rtt: DEFAULT_RTT,
            decay_ns: DEFAULT_DECAY.as_secs_f64() * 1e9,
            min_remaining_requests: 1,
            min_remaining_tokens: 0,
            default_reset: Duration::from_secs(1),
            breaker: fallback::Config::default(),
        }
    }
}

/// The latency a member is assumed to have before it has answered (1 s).
pub const DEFAULT_RTT: Duration = Duration::from_secs(1);
/// The time over which a latency sample's weight in the peak EWMA decays (10 s).
pub const DEFAULT_DECAY: Duration = Duration::from_secs(10);

// ===== shared state =====

#[derive(Debug)]
struct MemberLoad {
    ewma: PeakEwma,
    headroom: Headroom,
}

#[derive(Debug)]
pub(super) struct Member {
    pub(super) name: Arc<str>,
    load: Mutex<MemberLoad>,
    in_flight: AtomicUsize,
    picked: AtomicU64,
}

pub(super) struct Shared {
    pub(super) members: Box<[Member]>,
    breakers: Arc<Breakers>,
    pub(super) config: Config,
    rr: AtomicUsize,
    rng: Mutex<HasherRng>,
}

impl fmt::Debug for Shared {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Shared")
            .field("members", &self.members)
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Plain numbers: a panic elsewhere leaves them usable.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Estimated prompt tokens (the rate-limit layer's formula), counted against a member's
/// token headroom when it is picked.
pub(super) fn prompt_tokens(req: &ChatRequest) -> u64 {
    (req.prompt_text_len() as u64).div_ceil(4) + req.messages.len() as u64 * 4 + 3
}

impl Shared {
    fn new(names: Vec<Arc<str>>, config: Config) -> Arc<Self> {
        let now = Instant::now();
        Arc::new(Self {
            members: names
                .iter()
                .map(|name| Member {
                    name: name.clone(),
                    load: Mutex::new(MemberLoad {
                        ewma: PeakEwma::new(config.default_rtt, now),
                        headroom: Headroom::default(),
                    }),
                    in_flight: AtomicUsize::new(0),
                    picked: AtomicU64::new(0),
                })
                .collect(),
            breakers: Breakers::new(names),
            config,
            rr: AtomicUsize::new(0),
            rng: Mutex::new(HasherRng::new()),
        })
    }

    /// The load of member `i` at `now`, or why it cannot be picked.
    fn load(&self, i: usize, now: Instant) -> Result<f64, Weight> {
        let m = &self.members[i];
        let mut l = lock(&m.load);
        let c = &self.config;
        match l
            .headroom
            .weigh(now, c.min_remaining_requests, c.min_remaining_tokens)
        {
            Weight::Factor(f) => {
                let pending = m.in_flight.load(Ordering::Relaxed) as f64;
                Ok(l.ewma.estimate(now, c.decay_ns).max(1.0) * (pending + 1.0) * f)
            }
            blocked @ Weight::Blocked(_) => Err(blocked),
        }
    }

    /// Picks a member for `req` and admits it (breaker, headroom, in-flight count).
    pub(super) fn pick(self: &Arc<Self>, req: &ChatRequest) -> Result<Guard, LlmError> {
        let now = Instant::now();
        let taken = req.extensions.get::<TakenTargets>();
        let cfg = &self.config.breaker;
        let mut open: Option<Duration> = None;
        let mut blocked: Option<Duration> = None;
        let mut cands: Vec<(usize, f64)> = Vec::with_capacity(self.members.len());
        // Members another copy of this request took: used only when no other is left.
        let mut taken_cands: Vec<(usize, f64)> = Vec::new();
        for (i, m) in self.members.iter().enumerate() {
            if let Some(left) = self.breakers.open_for(i, now, cfg) {
                open = Some(open.map_or(left, |o| o.min(left)));
                continue;
            }
            let was_taken = taken.is_some_and(|t| t.contains(&m.name));
            match self.load(i, now) {
                Ok(load) if was_taken => taken_cands.push((i, load)),
                Ok(load) => cands.push((i, load)),
                Err(Weight::Blocked(left)) => blocked = Some(blocked.map_or(left, |b| b.min(left))),
                Err(Weight::Factor(_)) => {}
            }
        }
        if cands.is_empty() {
            cands = taken_cands;
        }
        while !cands.is_empty() {
            let at = self.choose(&cands);
            let i = cands[at].0;
            let probe = match self.breakers.admit(i, now, cfg) {
                Admit::Yes => None,
                Admit::Probe(id) => Some(id),
                Admit::Skip(_) => {
                    // Another request took the probe slot meanwhile.
                    cands.swap_remove(at);
                    continue;
                }
            };
            let m = &self.members[i];
            lock(&m.load).headroom.count(prompt_tokens(req));
            m.in_flight.fetch_add(1, Ordering::Relaxed);
            m.picked.fetch_add(1, Ordering::Relaxed);
            if let Some(t) = taken {
                t.take(m.name.clone());
            }
            return Ok(Guard::new(self.clone(), i, probe, now));
        }
        Err(if let Some(left) = blocked {
            LlmError::rate_limited(
                "every member of the balanced group is at its provider's rate limit",
            )
            .with_retry_after(left)
        } else if let Some(left) = open {
            let e = LlmError::unavailable(
                "every member of the balanced group is cooling down after recent failures",
            );
            if left.is_zero() {
                e
            } else {
                e.with_retry_after(left)
            }
        } else {
            LlmError::unavailable("the balanced group has no members")
        })
    }

    /// The index in `cands` (not empty) of the member to try.
    fn choose(&self, cands: &[(usize, f64)]) -> usize {
        let n = cands.len();
        if n == 1 {
            return 0;
        }
        match self.config.pick {
            Pick::RoundRobin => self.rr.fetch_add(1, Ordering::Relaxed) % n,
            Pick::PowerOfTwo => {
                let (a, b) = {
                    let mut rng = lock(&self.rng);
                    let a = rng.next_range(0..n as u64) as usize;
                    let b = rng.next_range(0..(n - 1) as u64) as usize;
                    (a, if b >= a { b + 1 } else { b })
                };
                if cands[b].1 < cands[a].1 { b } else { a }
            }
        }
    }

    // --- outcomes, reported by the guard ---

    pub(super) fn answered(&self, i: usize, probe: Option<u64>, latency: Duration) {
        let now = Instant::now();
        lock(&self.members[i].load)
            .ewma
            .observe(latency, now, self.config.decay_ns);
        self.breakers.success(i, probe, &self.config.breaker);
    }

    pub(super) fn failed(&self, i: usize, probe: Option<u64>, latency: Duration, e: &LlmError) {
        if !e.should_fall_back() {
            // The member answered; the request itself is at fault.
            self.answered(i, probe, latency);
            return;
        }
        if e.kind() == llm_tower_core::ErrorKind::RateLimited {
            let ra = e.retry_after().unwrap_or(self.config.default_reset);
            lock(&self.members[i].load)
                .headroom
                .exhaust(Instant::now(), ra);
        }
        // A failure is not a latency sample: a member failing fast must not look fast.
        self.breakers
            .failure(i, probe, e.retry_after(), &self.config.breaker);
    }

    pub(super) fn observe_headroom(&self, i: usize, h: &RateLimitHeadroom) {
        lock(&self.members[i].load)
            .headroom
            .observe(h, Instant::now(), self.config.default_reset);
    }

    /// A call given up before its answer (the caller dropped it: a hedge's loser, a
    /// client gone, a timeout above): no verdict for the breaker, but the member took at
    /// least `elapsed`, which raises its latency estimate if higher. Without this, a
    /// member whose slow calls are always cancelled by a hedge would never look slow.
    pub(super) fn given_up(&self, i: usize, probe: Option<u64>, elapsed: Duration) {
        lock(&self.members[i].load)
            .ewma
            .at_least(elapsed, Instant::now(), self.config.decay_ns);
        self.breakers.release_probe(i, probe);
    }

    pub(super) fn done(&self, i: usize) {
        self.members[i].in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

// ===== stats =====

/// One member's state, as [`BalanceStats::snapshot`] reports it.
#[derive(Debug, Clone, PartialEq)]
pub struct MemberStats {
    /// The member's name.
    pub name: Arc<str>,
    /// Requests sent to it, since start.
    pub picked: u64,
    /// Requests in flight (a stream counts until it ends).
    pub in_flight: usize,
    /// Its peak-EWMA latency estimate (time to answer, or to a stream's first chunk).
    pub latency: Duration,
    /// Whether its breaker or its provider's headroom keeps it out of picks now.
    pub excluded: bool,
}

/// A handle on a group's shared state (cheap to clone), for metrics and tests.
#[derive(Clone)]
pub struct BalanceStats(Arc<Shared>);

impl fmt::Debug for BalanceStats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.snapshot()).finish()
    }
}

impl BalanceStats {
    /// Every member's state, in order.
    pub fn snapshot(&self) -> Vec<MemberStats> {
        let s = &self.0;
        let now = Instant::now();
        (0..s.members.len())
            .map(|i| {
                let m = &s.members[i];
                let excluded = s.breakers.open_for(i, now, &s.config.breaker).is_some()
                    || s.load(i, now).is_err();
                let ns = lock(&m.load).ewma.estimate(now, s.config.decay_ns);
                MemberStats {
                    name: m.name.clone(),
                    picked: m.picked.load(Ordering::Relaxed),
                    in_flight: m.in_flight.load(Ordering::Relaxed),
                    latency: Duration::from_nanos(ns.min(u64::MAX as f64) as u64),
                    excluded,
                }
            })
            .collect()
    }

    /// How many requests member `name` served, since start (0 for an unknown name).
    pub fn picked(&self, name: &str) -> u64 {
        self.0
            .members
            .iter()
            .find(|m| &*m.name == name)
            .map_or(0, |m| m.picked.load(Ordering::Relaxed))
    }
}

// ===== impl BalanceLayer =====

macro_rules! config_methods {
    () => {
        /// How members are chosen (default [`Pick::PowerOfTwo`]).
        #[must_use]
        pub fn pick(mut self, pick: Pick) -> Self {
            self.config.pick = pick;
            self.rebuild();
            self
        }
        /// The latency assumed for a member that has not answered yet (default
        /// [`DEFAULT_RTT`], 1 s).
        #[must_use]
        pub fn default_rtt(mut self, rtt: Duration) -> Self {
            self.config.default_rtt = rtt;
            self.rebuild();
            self
        }
        /// The decay period of the peak EWMA (default [`DEFAULT_DECAY`], 10 s; at least 1 ms).
        #[must_use]
        pub fn decay(mut self, decay: Duration) -> Self {
            self.config.decay_ns = decay.max(Duration::from_millis(1)).as_secs_f64() * 1e9;
            self.rebuild();
            self
        }
        /// A member whose provider reports fewer requests (default 1) or tokens (default 0)
        /// left than these is not picked until the provider's reset.
        #[must_use]
        pub fn min_remaining(mut self, requests: u64, tokens: u64) -> Self {
            self.config.min_remaining_requests = requests;
            self.config.min_remaining_tokens = tokens;
            self.rebuild();
            self
        }
        /// Each member's breaker (default: the fallback layer's [`Cooldown::default`]).
        #[must_use]
        pub fn cooldown(mut self, cooldown: Cooldown) -> Self {
            self.config.breaker.cooldown = Some(cooldown);
            self.rebuild();
            self
        }
        /// No breaker: a failing member stays in the picks (its headroom still counts).
        #[must_use]
        pub fn no_cooldown(mut self) -> Self {
            self.config.breaker.cooldown = None;
            self.rebuild();
            self
        }
        /// The longest a member is kept out, whatever its cooldown or an upstream's
        /// retry-after asks (default 5 minutes).
        #[must_use]
        pub fn max_cooldown(mut self, max: Duration) -> Self {
            self.config.breaker.max_cooldown = max;
            self.rebuild();
            self
        }
        /// The shared state of this group, for metrics and tests.
        pub fn stats(&self) -> BalanceStats {
            BalanceStats(self.shared.clone())
        }
    };
}

/// Wraps a service as the first member (named `"primary"`) of a [`Balance`] group with
/// `others`.
///
/// # Clone
///
/// The load and breaker state is created with the layer: every service built from it (and
/// from its clones) shares it. Call the builder methods before taking
/// [`stats`](Self::stats): each starts a fresh state.
#[derive(Clone)]
pub struct BalanceLayer {
    others: Vec<BalanceTarget>,
    first_name: Arc<str>,
    config: Config,
    shared: Arc<Shared>,
}

impl fmt::Debug for BalanceLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BalanceLayer")
            .field("first", &self.first_name)
            .field("others", &self.others)
            .field("config", &self.config)
            .finish()
    }
}

impl BalanceLayer {
    /// The wrapped service and `others` make one group.
    pub fn new(others: Vec<BalanceTarget>) -> Self {
        let mut layer = Self {
            others,
            first_name: Arc::from("primary"),
            config: Config::default(),
            shared: Shared::new(Vec::new(), Config::default()),
        };
        layer.rebuild();
        layer
    }

    /// Names the wrapped service in stats and `meta.provider` (default `"primary"`).
    #[must_use]
    pub fn first_name(mut self, name: impl Into<Arc<str>>) -> Self {
        self.first_name = name.into();
        self.rebuild();
        self
    }

    fn rebuild(&mut self) {
        let names = std::iter::once(self.first_name.clone())
            .chain(self.others.iter().map(|t| t.name.clone()))
            .collect();
        self.shared = Shared::new(names, self.config);
    }

    config_methods!();
}

impl<S> Layer<S> for BalanceLayer
where
    S: BoxableLlmService,
{
    type Service = Balance;

    fn layer(&self, inner: S) -> Balance {
        let first = BalanceTarget::new(self.first_name.clone(), inner);
        Balance {
            targets: std::iter::once(first)
                .chain(self.others.iter().cloned())
                .collect(),
            config: self.config,
            shared: self.shared.clone(),
        }
    }
}

// ===== impl Balance =====

/// The balanced group service (see the [module docs](crate::balance)).
///
/// # Clone
///
/// Clones share the members and their load and breaker state (`Arc`s).
#[derive(Clone)]
pub struct Balance {
    pub(super) targets: Arc<[BalanceTarget]>,
    config: Config,
    pub(super) shared: Arc<Shared>,
}

impl fmt::Debug for Balance {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Balance")
            .field("targets", &self.targets)
            .field("config", &self.config)
            .finish()
    }
}

impl Balance {
    /// A group over `members` (an empty group fails every request with
    /// [`ErrorKind::Unavailable`](crate::ErrorKind::Unavailable)).
    pub fn new(members: Vec<BalanceTarget>) -> Self {
        let names = members.iter().map(|t| t.name.clone()).collect();
        Self {
            targets: members.into(),
            config: Config::default(),
            shared: Shared::new(names, Config::default()),
        }
    }

    /// A [`BalanceLayer`] (see [`BalanceLayer::new`]).
    pub fn layer(others: Vec<BalanceTarget>) -> BalanceLayer {
        BalanceLayer::new(others)
    }

    fn rebuild(&mut self) {
        let names = self.targets.iter().map(|t| t.name.clone()).collect();
        self.shared = Shared::new(names, self.config);
    }

    config_methods!();

    /// The members, in order.
    pub fn targets(&self) -> &[BalanceTarget] {
        &self.targets
    }
}

impl Service<ChatRequest> for Balance {
    type Response = LlmResponse;
    type Error = LlmError;
    type Future = ResponseFuture;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), LlmError>> {
        // Readiness is driven on a clone of the picked member, inside the future (see
        // the module docs).
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut req: ChatRequest) -> ResponseFuture {
        match self.shared.pick(&req) {
            Err(e) => ResponseFuture::failed(e),
            Ok(guard) => {
                let t = &self.targets[guard.idx];
                if let Some(m) = &t.model {
                    req.model.clone_from(m);
                }
                ResponseFuture::new(
                    t.service.clone(),
                    req,
                    guard,
                    t.name.clone(),
                    t.model.clone(),
                )
            }
        }
    }
}
