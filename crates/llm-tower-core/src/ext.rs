//! Typed request metadata carried in [`ChatRequest::extensions`](crate::ChatRequest).
//!
//! Layers never depend on each other; they talk through these extensions (on the way in)
//! and through [`ResponseMeta`](crate::ResponseMeta) (on the way out).

use std::sync::Arc;
use std::time::Duration;

/// The task type of a request (`"explain"`, `"classify"`, …): drives routing, cache TTLs,
/// validators, limits and cost reports. The HTTP surface fills it from `x-llm-task`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TaskType(pub Arc<str>);

/// The tenant a request is made for: scopes cache entries, limits, budgets and jobs.
/// The HTTP surface derives it from the client's key, never from a header.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Tenant(pub Arc<str>);

/// A client-supplied idempotency key (`Idempotency-Key` header).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct IdempotencyKey(pub Arc<str>);

/// The instant by which the caller needs an answer. Layers that wait (rate limit, fallback
/// back-off) never wait past it. Uses tokio's clock so paused-time tests control it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Deadline(pub tokio::time::Instant);

impl Deadline {
    /// A deadline `after` from now. A duration past what the clock can represent (a
    /// client's `u64::MAX` milliseconds) gives a deadline about a century away instead of
    /// overflowing.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// use llm_tower_core::Deadline;
    /// use std::time::Duration;
    /// let d = Deadline::after(Duration::from_secs(5));
    /// assert!(d.remaining() <= Duration::from_secs(5));
    /// let far = Deadline::after(Duration::MAX);
    /// assert!(far.remaining() > Duration::from_secs(365 * 86_400));
    /// # }
    /// ```
    pub fn after(after: Duration) -> Self {
        const FAR: Duration = Duration::from_secs(100 * 365 * 86_400);
        let now = tokio::time::Instant::now();
        Self(
            now.checked_add(after.min(FAR))
                .or_else(|| now.checked_add(Duration::from_secs(86_400)))
                .unwrap_or(now),
        )
    }

    /// Time left before the deadline (zero once passed).
    pub fn remaining(&self) -> Duration {
        self.0
            .saturating_duration_since(tokio::time::Instant::now())
    }
}

/// Per-request cache policy. The HTTP surface maps `Cache-Control: no-cache` to
/// [`CachePolicy::NoCache`] and `no-store` to [`CachePolicy::NoStore`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CachePolicy {
    /// The cache layer's own rules decide.
    #[default]
    Default,
    /// Do not answer from the cache, but store the fresh answer.
    NoCache,
    /// Neither read from nor write to the cache.
    NoStore,
    /// Cache this request even if it is not deterministic (the caller vouches for it).
    Force,
}

macro_rules! string_ext {
    ($ty:ident) => {
        impl $ty {
            /// The value as a string slice.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }
        impl From<&str> for $ty {
            fn from(s: &str) -> Self {
                Self(Arc::from(s))
            }
        }
        impl From<String> for $ty {
            fn from(s: String) -> Self {
                Self(Arc::from(s))
            }
        }
        impl std::fmt::Display for $ty {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(&self.0)
            }
        }
    };
}
string_ext!(TaskType);
string_ext!(Tenant);
string_ext!(IdempotencyKey);

/// The targets already serving another copy of this request. The Hedge layer puts one
/// shared value in both copies of a hedged request; a balancer records the target it picks
/// with [`take`](Self::take) and avoids the targets another copy took, so that the second
/// attempt goes to another target when there is one. Holds at most
/// [`TakenTargets::MAX`] names (a request has few attempts; more are not recorded).
///
/// ```
/// use llm_tower_core::TakenTargets;
/// let taken = TakenTargets::default();
/// let copy = taken.clone(); // shared
/// taken.take("east");
/// assert!(copy.contains("east"));
/// assert!(!copy.contains("west"));
/// ```
#[derive(Debug, Clone, Default)]
pub struct TakenTargets(Arc<std::sync::Mutex<Vec<Arc<str>>>>);

impl TakenTargets {
    /// Most names recorded.
    pub const MAX: usize = 16;

    /// Records that `target` serves a copy of the request.
    pub fn take(&self, target: impl Into<Arc<str>>) {
        let mut v = self.lock();
        if v.len() < Self::MAX {
            v.push(target.into());
        }
    }

    /// Whether `target` serves a copy of the request already.
    pub fn contains(&self, target: &str) -> bool {
        self.lock().iter().any(|t| &**t == target)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Arc<str>>> {
        // Plain names: a panic elsewhere leaves them usable.
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}
