//! Settlements sent in the background, bounded and counted.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use crate::RedisStoreError;

/// At most this many settlements in flight per store; past it they are dropped and counted.
const MAX_INFLIGHT_SETTLES: usize = 1024;

/// Sends settlements from the completion hook, which cannot await, on spawned tasks: at
/// most [`MAX_INFLIGHT_SETTLES`] at once, so a slow Redis cannot pile up tasks. Also keeps
/// the store's error count (reservations and settlements alike).
#[derive(Debug, Clone, Default)]
pub(crate) struct Settler {
    inflight: Arc<AtomicUsize>,
    errors: Arc<AtomicU64>,
    dropped: Arc<AtomicU64>,
}

impl Settler {
    /// Operations that failed (timeout, error, open breaker).
    pub(crate) fn errors(&self) -> u64 {
        self.errors.load(Ordering::Relaxed)
    }

    /// Settlements dropped: too many in flight, or no tokio runtime to run them on.
    pub(crate) fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Counts one failed operation.
    pub(crate) fn error(&self) {
        self.errors.fetch_add(1, Ordering::Relaxed);
    }

    /// Runs `settle` on the current runtime unless too many are already in flight.
    pub(crate) fn spawn<F>(&self, what: &'static str, settle: F)
    where
        F: Future<Output = Result<(), RedisStoreError>> + Send + 'static,
    {
        let Ok(handle) = tokio::runtime::Handle::try_current() else {
            self.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        };
        if self.inflight.fetch_add(1, Ordering::AcqRel) >= MAX_INFLIGHT_SETTLES {
            self.inflight.fetch_sub(1, Ordering::AcqRel);
            self.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let this = self.clone();
        handle.spawn(async move {
            if let Err(e) = settle.await {
                this.error();
                tracing::warn!(error = %e, "{what} settlement lost");
            }
            this.inflight.fetch_sub(1, Ordering::AcqRel);
        });
    }
}
