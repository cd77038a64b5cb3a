#![doc = include_str!("../README.md")]
#![cfg_attr(docsrs, feature(doc_cfg))]

pub use llm_tower_core::*;

/// The hash maps on the request path (rate-limit buckets, budgets, cost totals, prices,
/// routes, cache flights): foldhash instead of std's SipHash, which was ~4 % of the
/// gateway's instructions per request. Seeded per map, like std's.
#[allow(dead_code)] // not every feature set has such a map
pub(crate) type FastMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;
#[allow(dead_code)] // used by some features only
pub(crate) type FastSet<K> = std::collections::HashSet<K, foldhash::fast::RandomState>;

/// `get_ref`, `get_mut` and `into_inner` for a middleware service whose wrapped service is
/// its `inner` field (the same three methods on every layer's service).
#[allow(unused_macros)] // not every feature set has a layer
macro_rules! inner_service_accessors {
    () => {
        /// The inner service.
        pub fn get_ref(&self) -> &S {
            &self.inner
        }

        /// The inner service, mutably.
        pub fn get_mut(&mut self) -> &mut S {
            &mut self.inner
        }

        /// Consumes `self`, returning the inner service.
        pub fn into_inner(self) -> S {
            self.inner
        }
    };
}

mod builder;

/// Reports `event` to the request's [`Observer`], if it has one (feature `observe`;
/// without it, nothing).
#[allow(dead_code, unused_variables)] // not every feature set reports an event
#[inline]
pub(crate) fn emit(req: &ChatRequest, event: ObserveEvent<'_>) {
    #[cfg(feature = "observe")]
    if let Some(o) = req.extensions.get::<Observer>() {
        o.event(event);
    }
}

#[cfg(feature = "observe")]
#[cfg_attr(docsrs, doc(cfg(feature = "observe")))]
pub mod observe;

#[cfg(any(feature = "cache", feature = "validate"))]
mod mem;
pub use builder::LlmServiceBuilderExt;

#[cfg(feature = "route")]
#[cfg_attr(docsrs, doc(cfg(feature = "route")))]
pub mod route;

#[cfg(feature = "fallback")]
#[cfg_attr(docsrs, doc(cfg(feature = "fallback")))]
pub mod fallback;

#[cfg(feature = "validate")]
#[cfg_attr(docsrs, doc(cfg(feature = "validate")))]
pub mod validate;

#[cfg(feature = "cache")]
#[cfg_attr(docsrs, doc(cfg(feature = "cache")))]
pub mod cache;

#[cfg(any(feature = "rate-limit", feature = "cost"))]
#[cfg_attr(docsrs, doc(cfg(any(feature = "rate-limit", feature = "cost"))))]
pub mod ledger;

#[cfg(feature = "rate-limit")]
#[cfg_attr(docsrs, doc(cfg(feature = "rate-limit")))]
pub mod rate_limit;

#[cfg(feature = "cost")]
#[cfg_attr(docsrs, doc(cfg(feature = "cost")))]
pub mod cost;

#[cfg(feature = "balance")]
#[cfg_attr(docsrs, doc(cfg(feature = "balance")))]
pub mod balance;

#[cfg(feature = "hedge")]
#[cfg_attr(docsrs, doc(cfg(feature = "hedge")))]
pub mod hedge;
