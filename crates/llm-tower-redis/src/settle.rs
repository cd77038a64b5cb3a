//! Settlements sent in the background, retried, bounded and counted; and the time stamps
//! every ledger script call carries.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use llm_tower::ledger::Hold;
use tokio::time::Instant;

use crate::{RedisConn, RedisStoreError};

/// At most this many settlements in flight per store; past it they are dropped and counted.
const MAX_INFLIGHT_SETTLES: usize = 1024;

/// How long a settlement is retried by default while Redis does not answer.
pub(crate) const DEFAULT_SETTLE_RETRY: Duration = Duration::from_secs(30);

/// The longest pause between two attempts of one settlement.
const MAX_RETRY_DELAY: Duration = Duration::from_secs(1);

/// Clocks of replicas and Redis may differ by this much: a reservation is still accepted
/// this long after its sender stopped waiting, and tombstones cover it twice over.
pub(crate) const CLOCK_SKEW: Duration = Duration::from_secs(1);

/// Sends settlements from the completion hook, which cannot await, on spawned tasks: at
/// most [`MAX_INFLIGHT_SETTLES`] at once, so a slow Redis cannot pile up tasks. A failed
/// settlement is sent again (settlements are idempotent by hold id) with a growing pause,
/// for up to its retry period. Also keeps the store's error count.
#[derive(Debug, Clone)]
pub(crate) struct Settler {
    inflight: Arc<AtomicUsize>,
    errors: Arc<AtomicU64>,
    dropped: Arc<AtomicU64>,
    lost: Arc<AtomicU64>,
    retry_for: Duration,
}

impl Default for Settler {
    fn default() -> Self {
        Self {
            inflight: Arc::default(),
            errors: Arc::default(),
            dropped: Arc::default(),
            lost: Arc::default(),
            retry_for: DEFAULT_SETTLE_RETRY,
        }
    }
}

impl Settler {
    /// Retries each settlement for up to `d`.
    pub(crate) fn set_retry_for(&mut self, d: Duration) {
        self.retry_for = d;
    }

    /// The stamps of a call for `hold` now.
    pub(crate) fn stamp(&self, conn: &RedisConn, hold: &Hold) -> Stamp {
        Stamp::new(conn, hold, self.retry_for)
    }

    /// Operations that failed (timeout, error, open breaker), each attempt counted.
    pub(crate) fn errors(&self) -> u64 {
        self.errors.load(Ordering::Relaxed)
    }

    /// Settlements dropped: too many in flight, or no tokio runtime to run them on.
    pub(crate) fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Settlements given up after their retry period.
    pub(crate) fn lost(&self) -> u64 {
        self.lost.load(Ordering::Relaxed)
    }

    /// Settlements in flight now (being sent or waiting to be sent again).
    pub(crate) fn inflight(&self) -> usize {
        self.inflight.load(Ordering::Relaxed)
    }

    /// Counts one failed operation.
    pub(crate) fn error(&self) {
        self.errors.fetch_add(1, Ordering::Relaxed);
    }

    /// Sends a settlement that is one ledger script call (see [`spawn`](Self::spawn)).
    pub(crate) fn spawn_script(
        &self,
        what: &'static str,
        conn: RedisConn,
        script: Arc<redis::Script>,
        keys: Vec<String>,
        args: Vec<String>,
    ) {
        self.spawn(what, move || {
            let settle = run_script(conn.clone(), script.clone(), keys.clone(), args.clone());
            async move { settle.await.map(drop) }
        });
    }

    /// Runs `settle()` on the current runtime unless too many are already in flight,
    /// again after a failure, until it succeeds or its retry period is over.
    pub(crate) fn spawn<M, F>(&self, what: &'static str, settle: M)
    where
        M: Fn() -> F + Send + 'static,
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
            let give_up = Instant::now() + this.retry_for;
            let mut delay = Duration::from_millis(25);
            loop {
                match settle().await {
                    Ok(()) => break,
                    Err(e) => {
                        this.error();
                        if Instant::now() + delay > give_up {
                            this.lost.fetch_add(1, Ordering::Relaxed);
                            tracing::warn!(error = %e, "{what} settlement lost");
                            break;
                        }
                        tracing::debug!(error = %e, "{what} settlement failed; retrying");
                        tokio::time::sleep(delay).await;
                        delay = (delay * 2).min(MAX_RETRY_DELAY);
                    }
                }
            }
            this.inflight.fetch_sub(1, Ordering::AcqRel);
        });
    }
}

/// The times a ledger script call carries, in Unix milliseconds on this machine's clock
/// (scripts compare them with Redis's own clock, `TIME`).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Stamp {
    /// When the hold is released if never settled.
    pub(crate) hold_expires: i64,
    /// After this a reservation is a no-op: its sender stopped waiting for the answer.
    pub(crate) deadline: i64,
    /// How long a settled id is remembered: longer than a settlement is retried, so a
    /// retry of a settlement that did land is a no-op.
    pub(crate) tombstone_ms: i64,
    /// How long the id of a final take (a request bucket) is remembered: longer than a
    /// reservation can land late.
    pub(crate) final_ms: i64,
}

fn unix_ms(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

fn ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

impl Stamp {
    fn new(conn: &RedisConn, hold: &Hold, retry_for: Duration) -> Self {
        let wall = SystemTime::now();
        let left = hold.expires_at.saturating_duration_since(Instant::now());
        let op = conn.options().op_timeout;
        Self {
            hold_expires: unix_ms(wall + left),
            deadline: unix_ms(wall + op + CLOCK_SKEW),
            tombstone_ms: ms(retry_for + 2 * op + 2 * CLOCK_SKEW),
            final_ms: ms(op + 2 * CLOCK_SKEW),
        }
    }
}

/// Runs a ledger script with `keys` and `args` (through the connection's timeout and
/// breaker); the raw reply.
pub(crate) async fn run_script(
    conn: RedisConn,
    script: Arc<redis::Script>,
    keys: Vec<String>,
    args: Vec<String>,
) -> Result<Vec<i64>, RedisStoreError> {
    conn.run(move |mut c| async move {
        let mut inv = script.prepare_invoke();
        for k in &keys {
            inv.key(k);
        }
        for a in &args {
            inv.arg(a);
        }
        inv.invoke_async::<Vec<i64>>(&mut c).await
    })
    .await
}

/// What a ledger store answers when Redis did not: the error is counted, then `open()`
/// when the store fails open, an `Unavailable` error (naming `what` store) when it fails
/// closed.
pub(crate) fn unavailable<T>(
    settler: &Settler,
    fail_open: bool,
    what: &str,
    e: RedisStoreError,
    open: impl FnOnce() -> T,
) -> Result<T, llm_tower::LlmError> {
    settler.error();
    if fail_open {
        tracing::warn!(error = %e, "{what} store unavailable; failing open");
        Ok(open())
    } else {
        tracing::warn!(error = %e, "{what} store unavailable; failing closed");
        Err(
            llm_tower::LlmError::unavailable(format!("{what} store unavailable: {e}"))
                .with_source(e),
        )
    }
}

/// The `Debug`, constructor, fail-open options, settle retry and counters of a ledger store
/// (a struct with the fields `conn`, `script`, `fail_open` and `settler`): the same for the
/// budget and rate-limit stores. The doc lines that differ are arguments.
macro_rules! ledger_store {
    (
        $store:ident,
        script: $script:expr,
        fail_open: $open_doc:literal,
        fail_closed: $closed_doc:literal,
        settle_retry: [$($retry_doc:literal),+ $(,)?],
        store_errors: $errors_doc:literal $(,)?
    ) => {
        impl std::fmt::Debug for $store {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.debug_struct(stringify!($store))
                    .field("conn", &self.conn)
                    .field("fail_open", &self.fail_open)
                    .field("store_errors", &self.store_errors())
                    .field("settles_dropped", &self.settles_dropped())
                    .field("settles_lost", &self.settles_lost())
                    .finish()
            }
        }

        impl $store {
            /// A store on `conn`, failing open.
            pub fn new(conn: RedisConn) -> Self {
                Self {
                    conn,
                    script: std::sync::Arc::new(redis::Script::new($script)),
                    fail_open: true,
                    settler: $crate::settle::Settler::default(),
                }
            }

            #[doc = $open_doc]
            #[must_use]
            pub fn fail_open(mut self, open: bool) -> Self {
                self.fail_open = open;
                self
            }

            #[doc = $closed_doc]
            #[must_use]
            pub fn fail_closed(self) -> Self {
                self.fail_open(false)
            }

            $(#[doc = $retry_doc])+
            #[must_use]
            pub fn settle_retry(mut self, d: std::time::Duration) -> Self {
                self.settler.set_retry_for(d);
                self
            }

            #[doc = $errors_doc]
            pub fn store_errors(&self) -> u64 {
                self.settler.errors()
            }

            /// Settlements dropped because too many were in flight.
            pub fn settles_dropped(&self) -> u64 {
                self.settler.dropped()
            }

            /// Settlements given up after their retry period.
            pub fn settles_lost(&self) -> u64 {
                self.settler.lost()
            }

            /// Settlements being sent or waiting to be sent again.
            pub fn settles_in_flight(&self) -> usize {
                self.settler.inflight()
            }

            /// The connection.
            pub fn conn(&self) -> &RedisConn {
                &self.conn
            }
        }
    };
}
pub(crate) use ledger_store;
