//! A Redis connection with a hard timeout on every operation and a circuit breaker.

use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use tokio::time::Instant;

/// Settings of a [`RedisConn`].
#[derive(Debug, Clone)]
pub struct RedisOptions {
    /// Hard limit on each operation (connect, command, script). Default 50 ms: a store
    /// slower than that costs more than it saves.
    pub op_timeout: Duration,
    /// Consecutive failures that open the breaker. Default 5.
    pub failure_threshold: u32,
    /// How long the breaker stays open before one probe is let through. Default 5 s.
    pub cooldown: Duration,
    /// Prefix of every key this crate writes. Default `llm-tower:`.
    pub key_prefix: String,
}

impl Default for RedisOptions {
    fn default() -> Self {
        Self {
            op_timeout: Duration::from_millis(50),
            failure_threshold: 5,
            cooldown: Duration::from_secs(5),
            key_prefix: "llm-tower:".to_owned(),
        }
    }
}

/// Why a Redis operation did not give a result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RedisStoreError {
    /// The breaker is open: Redis failed repeatedly and is not tried until the cooldown ends.
    CircuitOpen,
    /// The operation did not finish within the timeout.
    Timeout,
    /// Redis answered with an error, or the connection failed.
    Redis(String),
}

impl fmt::Display for RedisStoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RedisStoreError::CircuitOpen => f.write_str("redis circuit breaker is open"),
            RedisStoreError::Timeout => f.write_str("redis operation timed out"),
            RedisStoreError::Redis(e) => write!(f, "redis error: {e}"),
        }
    }
}

impl std::error::Error for RedisStoreError {}

#[derive(Debug, Default)]
struct BreakerState {
    consecutive_failures: u32,
    open_until: Option<Instant>,
    probing: bool,
}

/// A shared Redis connection: a `ConnectionManager` (reconnects by itself) behind a hard
/// per-operation timeout and a circuit breaker. Cheap to clone; clones share the breaker.
#[derive(Clone)]
pub struct RedisConn {
    manager: ConnectionManager,
    opts: Arc<RedisOptions>,
    breaker: Arc<Mutex<BreakerState>>,
    failures: Arc<AtomicU64>,
    last_error: Arc<Mutex<Option<String>>>,
}

impl fmt::Debug for RedisConn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The URL may hold a password: never print it.
        f.debug_struct("RedisConn")
            .field("opts", &self.opts)
            .field("failures", &self.failures.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl RedisConn {
    /// Connects to `url` (`redis://host:port/db`). Fails if the first connection cannot be
    /// made within the timeout; later outages are handled by the breaker.
    pub async fn connect(url: &str, opts: RedisOptions) -> Result<Self, RedisStoreError> {
        let client = redis::Client::open(url).map_err(|e| RedisStoreError::Redis(e.to_string()))?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(opts.op_timeout.max(Duration::from_millis(200))))
            .set_response_timeout(Some(opts.op_timeout))
            .set_number_of_retries(1);
        let manager = tokio::time::timeout(
            opts.op_timeout.max(Duration::from_secs(1)),
            ConnectionManager::new_with_config(client, config),
        )
        .await
        .map_err(|_| RedisStoreError::Timeout)?
        .map_err(|e| RedisStoreError::Redis(e.to_string()))?;
        Ok(Self {
            manager,
            opts: Arc::new(opts),
            breaker: Arc::default(),
            failures: Arc::default(),
            last_error: Arc::default(),
        })
    }

    /// Like [`connect`](Self::connect) but does not connect now: the first operation does.
    /// Use it when the process must start even while Redis is down (the stores then fail
    /// open or closed, per their policy, until Redis answers). Fails only on a malformed URL.
    /// Must be called inside a tokio runtime.
    pub fn connect_lazy(url: &str, opts: RedisOptions) -> Result<Self, RedisStoreError> {
        let client = redis::Client::open(url).map_err(|e| RedisStoreError::Redis(e.to_string()))?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(opts.op_timeout.max(Duration::from_millis(200))))
            .set_response_timeout(Some(opts.op_timeout))
            .set_number_of_retries(1);
        let manager = ConnectionManager::new_lazy_with_config(client, config)
            .map_err(|e| RedisStoreError::Redis(e.to_string()))?;
        Ok(Self {
            manager,
            opts: Arc::new(opts),
            breaker: Arc::default(),
            failures: Arc::default(),
            last_error: Arc::default(),
        })
    }

    /// The options in force.
    pub fn options(&self) -> &RedisOptions {
        &self.opts
    }

    /// `prefix + key`.
    pub fn key(&self, key: &str) -> String {
        let mut k = String::with_capacity(self.opts.key_prefix.len() + key.len());
        k.push_str(&self.opts.key_prefix);
        k.push_str(key);
        k
    }

    /// Failed operations so far (timeouts, errors, rejections by the open breaker).
    pub fn failure_count(&self) -> u64 {
        self.failures.load(Ordering::Relaxed)
    }

    /// The last failed operation's error (timeout, Redis error, open breaker), if any;
    /// kept after later successes (see [`is_closed`](Self::is_closed) for health now).
    pub fn last_error(&self) -> Option<String> {
        self.last_error
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Whether the breaker is open now.
    pub fn is_open(&self) -> bool {
        let st = self
            .breaker
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        st.open_until.is_some_and(|t| Instant::now() < t)
    }

    /// Runs `op` on a connection under the timeout and the breaker.
    pub async fn run<T, F, Fut>(&self, op: F) -> Result<T, RedisStoreError>
    where
        F: FnOnce(ConnectionManager) -> Fut,
        Fut: Future<Output = redis::RedisResult<T>>,
    {
        let probe = self.admit()?;
        // If this future is dropped mid-operation (the caller was cancelled), the guard
        // gives the half-open probe slot back; otherwise the breaker would stay open.
        let mut guard = ProbeGuard {
            conn: self,
            armed: probe,
        };
        let result =
            match tokio::time::timeout(self.opts.op_timeout, op(self.manager.clone())).await {
                Err(_) => Err(RedisStoreError::Timeout),
                Ok(Err(e)) => Err(RedisStoreError::Redis(e.to_string())),
                Ok(Ok(v)) => Ok(v),
            };
        guard.armed = false;
        if let Err(e) = &result {
            *self
                .last_error
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(e.to_string());
        }
        self.record(result.is_ok(), probe);
        result
    }

    /// Whether the breaker is closed (not open, and not waiting for a probe's verdict).
    pub fn is_closed(&self) -> bool {
        self.breaker
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .open_until
            .is_none()
    }

    /// Whether a half-open probe is in flight now (for tests and diagnostics).
    pub fn is_probing(&self) -> bool {
        self.breaker
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .probing
    }

    /// Lets one operation through when the breaker is closed, or as the probe when its
    /// cooldown is over; `Ok(true)` for the probe.
    fn admit(&self) -> Result<bool, RedisStoreError> {
        let mut st = self
            .breaker
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match st.open_until {
            Some(until) if Instant::now() < until => {
                drop(st);
                self.failures.fetch_add(1, Ordering::Relaxed);
                Err(RedisStoreError::CircuitOpen)
            }
            Some(_) if st.probing => {
                // Half-open: one probe is in flight; the rest wait for its verdict.
                drop(st);
                self.failures.fetch_add(1, Ordering::Relaxed);
                Err(RedisStoreError::CircuitOpen)
            }
            Some(_) => {
                st.probing = true;
                Ok(true)
            }
            None => Ok(false),
        }
    }

    fn record(&self, ok: bool, probe: bool) {
        let mut st = self
            .breaker
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        // Only the probe frees the probe slot: a call admitted before the breaker opened
        // and finishing now must not let a second probe through.
        if probe {
            st.probing = false;
        }
        if ok {
            st.consecutive_failures = 0;
            st.open_until = None;
        } else {
            self.failures.fetch_add(1, Ordering::Relaxed);
            st.consecutive_failures += 1;
            if st.consecutive_failures >= self.opts.failure_threshold || st.open_until.is_some() {
                st.open_until = Some(Instant::now() + self.opts.cooldown);
            }
        }
    }
}

/// Releases the probe slot of a [`RedisConn::run`] dropped before it recorded its verdict.
struct ProbeGuard<'a> {
    conn: &'a RedisConn,
    armed: bool,
}

impl Drop for ProbeGuard<'_> {
    fn drop(&mut self) {
        if self.armed {
            self.conn
                .breaker
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .probing = false;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An operation that never touches Redis: it waits `d` (paused time), then answers.
    fn op(d: Duration, ok: bool) -> impl FnOnce(ConnectionManager) -> BoxedOp {
        move |_| {
            Box::pin(async move {
                tokio::time::sleep(d).await;
                if ok {
                    Ok(())
                } else {
                    Err(redis::RedisError::from((redis::ErrorKind::Io, "scripted")))
                }
            })
        }
    }
    type BoxedOp = std::pin::Pin<Box<dyn Future<Output = redis::RedisResult<()>> + Send>>;

    #[tokio::test(start_paused = true)]
    async fn a_late_ordinary_call_does_not_free_the_probe_slot() {
        let opts = RedisOptions {
            op_timeout: Duration::from_secs(10),
            failure_threshold: 1,
            cooldown: Duration::from_millis(100),
            ..RedisOptions::default()
        };
        // Never dials: every operation below ignores its connection.
        let conn = RedisConn::connect_lazy("redis://127.0.0.1:1", opts).unwrap();
        // A slow ordinary call, admitted while the breaker is closed.
        let slow = tokio::spawn({
            let c = conn.clone();
            async move { c.run(op(Duration::from_secs(2), false)).await }
        });
        // A fast failure opens the breaker.
        assert!(conn.run(op(Duration::ZERO, false)).await.is_err());
        assert!(conn.is_open());
        tokio::time::sleep(Duration::from_millis(150)).await;
        // Cooldown over: one probe goes through and hangs.
        let probe = tokio::spawn({
            let c = conn.clone();
            async move { c.run(op(Duration::from_secs(5), true)).await }
        });
        tokio::task::yield_now().await;
        assert!(conn.is_probing());
        // The slow ordinary call finishes while the probe is in flight...
        assert!(slow.await.unwrap().is_err());
        // ...and the probe slot stays taken: no second probe.
        assert!(conn.is_probing());
        assert_eq!(
            conn.run(op(Duration::ZERO, true)).await,
            Err(RedisStoreError::CircuitOpen)
        );
        // The probe's success closes the breaker.
        assert!(probe.await.unwrap().is_ok());
        assert!(conn.is_closed() && !conn.is_probing());
    }
}
