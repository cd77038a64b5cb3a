//! A Redis [`RateLimitStore`]: replicas share one set of buckets.
//!
//! # Atomicity
//!
//! Every request runs **one** Lua script (`EVALSHA` through [`redis::Script`], loaded on
//! first use) over all of its buckets: it refills each bucket with Redis's own clock
//! (`TIME`, so replicas' clocks do not matter), refuses if any bucket lacks room (charging
//! nothing), else charges them all. Settlements run the same script in "settle" mode.
//! The buckets are the same token buckets as the in-memory store.
//!
//! # Keys
//!
//! `<RedisOptions::key_prefix>rl:v1:<bucket key>`, a hash `{l: level, t: ms}`, with a TTL of
//! the time it takes to refill plus one second (a full bucket is the same as none). The
//! `v1` is the script/key version: a replica running a future `v2` layout uses other keys
//! instead of misreading these. All keys of one request are touched by one script, so with
//! Redis Cluster they must share a slot: put a hash tag in the rule names (`{limits}`).
//!
//! # Failure
//!
//! Every call goes through [`RedisConn`] (hard timeout, circuit breaker). When Redis does
//! not answer, the store **fails open by default**: the request is allowed (with unknown
//! remaining) and the failure counted in [`RedisRateLimitStore::store_errors`]. With
//! [`fail_closed`](RedisRateLimitStore::fail_closed) the request is refused with
//! [`ErrorKind::Unavailable`](llm_tower::ErrorKind) instead, promptly (within the
//! operation timeout, or at once while the breaker is open).
//!
//! # Background settlements
//!
//! [`RateLimitStore::settle`] runs in a completion hook, which cannot wait, so the
//! settlement script is sent from a task spawned on the current tokio runtime
//! (`tokio::spawn`). At most 1024 settlements are in flight; beyond that (Redis slow or
//! down) they are dropped and counted in [`RedisRateLimitStore::settles_dropped`] — a
//! dropped settlement keeps the reservation as it was (no refund, no extra charge).
//!
//! # Example
//!
//! ```no_run
//! # async fn f() -> Result<(), Box<dyn std::error::Error>> {
//! use llm_tower::rate_limit::{RateLimitLayer, Rule};
//! use llm_tower_redis::rate_limit::RedisRateLimitStore;
//! use llm_tower_redis::{RedisConn, RedisOptions};
//! use std::sync::Arc;
//! use std::time::Duration;
//!
//! let conn = RedisConn::connect("redis://127.0.0.1:6379", RedisOptions::default()).await?;
//! let layer = RateLimitLayer::new()
//!     .store(Arc::new(RedisRateLimitStore::new(conn)))
//!     .rule(Rule::requests(100, Duration::from_secs(60)).per_tenant());
//! # let _ = layer; Ok(()) }
//! ```

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use llm_tower::LlmError;
use llm_tower::rate_limit::{Acquire, AcquireFuture, BucketCheck, BucketSettle, RateLimitStore};
use redis::Script;

use crate::settle::Settler;
use crate::{RedisConn, RedisStoreError};

/// The key namespace, versioned with the script.
pub const KEY_NAMESPACE: &str = "rl:v1:";

// ARGV[1] = mode (0: acquire, 1: settle); then, per key: limit, window (ms), amount (acquire)
// or delta (settle; negative gives back). Returns {1, remaining...} or {0, index, retry_ms}.
const SCRIPT: &str = r"-- llm-tower rate limit v1
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local mode = tonumber(ARGV[1])
local levels = {}
for i = 1, #KEYS do
  local limit = tonumber(ARGV[3 * i - 1])
  local window = tonumber(ARGV[3 * i])
  local amount = tonumber(ARGV[3 * i + 1])
  local v = redis.call('HMGET', KEYS[i], 'l', 't')
  local level = tonumber(v[1])
  local ts = tonumber(v[2])
  if level == nil or ts == nil then
    level = limit
    ts = now
  end
  if ts > now then ts = now end
  level = math.min(limit, level + (now - ts) * limit / window)
  if mode == 0 and level < amount then
    return {0, i - 1, math.ceil((amount - level) * window / limit)}
  end
  levels[i] = level
end
local out = {1}
for i = 1, #KEYS do
  local limit = tonumber(ARGV[3 * i - 1])
  local window = tonumber(ARGV[3 * i])
  local amount = tonumber(ARGV[3 * i + 1])
  local level = math.min(limit, levels[i] - amount)
  redis.call('HSET', KEYS[i], 'l', tostring(level), 't', tostring(now))
  redis.call('PEXPIRE', KEYS[i], math.ceil((limit - level) * window / limit) + 1000)
  out[#out + 1] = math.max(0, math.floor(level))
end
return out
";

/// A [`RateLimitStore`] in Redis. See the [module docs](self).
#[derive(Clone)]
pub struct RedisRateLimitStore {
    conn: RedisConn,
    script: Arc<Script>,
    fail_open: bool,
    settler: Settler,
}

impl fmt::Debug for RedisRateLimitStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisRateLimitStore")
            .field("conn", &self.conn)
            .field("fail_open", &self.fail_open)
            .field("store_errors", &self.store_errors())
            .field("settles_dropped", &self.settles_dropped())
            .finish()
    }
}

impl RedisRateLimitStore {
    /// A store on `conn`, failing open.
    pub fn new(conn: RedisConn) -> Self {
        Self {
            conn,
            script: Arc::new(Script::new(SCRIPT)),
            fail_open: true,
            settler: Settler::default(),
        }
    }

    /// Whether to allow requests when Redis does not answer (default `true`).
    #[must_use]
    pub fn fail_open(mut self, open: bool) -> Self {
        self.fail_open = open;
        self
    }

    /// Refuse requests (`Unavailable`) when Redis does not answer.
    #[must_use]
    pub fn fail_closed(self) -> Self {
        self.fail_open(false)
    }

    /// Acquisitions and settlements that failed (timeout, error, open breaker).
    pub fn store_errors(&self) -> u64 {
        self.settler.errors()
    }

    /// Settlements dropped because too many were in flight.
    pub fn settles_dropped(&self) -> u64 {
        self.settler.dropped()
    }

    /// The connection.
    pub fn conn(&self) -> &RedisConn {
        &self.conn
    }

    fn keys_and_args<'a>(
        &self,
        mode: i64,
        items: impl Iterator<Item = (&'a str, u64, Duration, i64)>,
    ) -> (Vec<String>, Vec<i64>) {
        let mut keys = Vec::new();
        let mut args = vec![mode];
        for (key, limit, window, amount) in items {
            keys.push(self.conn.key(&format!("{KEY_NAMESPACE}{key}")));
            args.push(i64::try_from(limit).unwrap_or(i64::MAX));
            args.push(i64::try_from(window.as_millis().max(1)).unwrap_or(i64::MAX));
            args.push(amount);
        }
        (keys, args)
    }

    /// Runs the script; the raw reply.
    async fn run(
        conn: RedisConn,
        script: Arc<Script>,
        keys: Vec<String>,
        args: Vec<i64>,
    ) -> Result<Vec<i64>, RedisStoreError> {
        conn.run(move |mut c| async move {
            let mut inv = script.prepare_invoke();
            for k in &keys {
                inv.key(k);
            }
            for a in &args {
                inv.arg(*a);
            }
            inv.invoke_async::<Vec<i64>>(&mut c).await
        })
        .await
    }
}

fn decode(reply: &[i64], n: usize) -> Result<Acquire, RedisStoreError> {
    match reply {
        [1, rest @ ..] if rest.len() == n => Ok(Acquire::Allowed {
            remaining: rest
                .iter()
                .map(|r| Some(u64::try_from(*r).unwrap_or(0)))
                .collect(),
        }),
        [0, index, retry_ms] => Ok(Acquire::Limited {
            index: usize::try_from(*index).unwrap_or(0),
            retry_after: Duration::from_millis(u64::try_from(*retry_ms).unwrap_or(0)),
        }),
        _ => Err(RedisStoreError::Redis(format!(
            "unexpected rate-limit script reply {reply:?}"
        ))),
    }
}

impl RateLimitStore for RedisRateLimitStore {
    fn acquire(&self, checks: &[BucketCheck]) -> AcquireFuture {
        let n = checks.len();
        let (keys, args) = self.keys_and_args(
            0,
            checks.iter().map(|c| {
                let amount = i64::try_from(c.amount).unwrap_or(i64::MAX);
                (c.key.as_str(), c.limit, c.window, amount)
            }),
        );
        let conn = self.conn.clone();
        let script = self.script.clone();
        let settler = self.settler.clone();
        let fail_open = self.fail_open;
        Box::pin(async move {
            let result = Self::run(conn, script, keys, args)
                .await
                .and_then(|reply| decode(&reply, n));
            match result {
                Ok(a) => Ok(a),
                Err(e) => {
                    settler.error();
                    if fail_open {
                        tracing::warn!(error = %e, "rate-limit store unavailable; failing open");
                        Ok(Acquire::Allowed {
                            remaining: vec![None; n],
                        })
                    } else {
                        tracing::warn!(error = %e, "rate-limit store unavailable; failing closed");
                        Err(
                            LlmError::unavailable(format!("rate-limit store unavailable: {e}"))
                                .with_source(e),
                        )
                    }
                }
            }
        })
    }

    fn settle(&self, settles: &[BucketSettle]) {
        if settles.is_empty() {
            return;
        }
        let (keys, args) = self.keys_and_args(
            1,
            settles
                .iter()
                .map(|s| (s.key.as_str(), s.limit, s.window, s.delta)),
        );
        let settle = Self::run(self.conn.clone(), self.script.clone(), keys, args);
        self.settler
            .spawn("rate-limit", async move { settle.await.map(drop) });
    }
}
