//! A Redis [`BudgetStore`]: replicas share one set of budgets.
//!
//! # Atomicity
//!
//! A reservation is **one** Lua script (`EVALSHA` through [`redis::Script`]) over every
//! budget of the request: it checks that each has room (`spent < limit` and
//! `spent + amount <= limit`), and only then adds the amount to all of them (`INCRBY`).
//! Concurrent requests on any number of replicas therefore cannot slip past a cap.
//! Settlements run the same script in "settle" mode (`INCRBY` of the difference, never
//! below zero).
//!
//! # Keys
//!
//! `<RedisOptions::key_prefix>budget:v1:<budget key>` (the budget key ends with the window
//! id, e.g. `tenant|t=acme|d19700`), an integer of nano-dollars, expiring one hour after its
//! window ends (never for total budgets). `v1` versions the script and key layout.
//!
//! # Failure
//!
//! Every call goes through [`RedisConn`] (hard timeout, circuit breaker). When Redis does
//! not answer, the store **fails open by default**: the request goes ahead unreserved (a
//! Redis outage then lets spend pass the cap by at most what is spent during the outage),
//! and the failure is counted in [`RedisBudgetStore::store_errors`]. With
//! [`fail_closed`](RedisBudgetStore::fail_closed), requests under a budget are refused
//! with [`ErrorKind::Unavailable`](llm_tower::ErrorKind) while Redis is unreachable.
//!
//! # Background settlements
//!
//! As for the rate-limit store: settlements are sent from a task spawned on the current
//! tokio runtime, at most 1024 in flight; beyond that they are dropped (the reservation
//! stands) and counted in [`RedisBudgetStore::settles_dropped`].
//!
//! # Example
//!
//! ```no_run
//! # async fn f() -> Result<(), Box<dyn std::error::Error>> {
//! use llm_tower::cost::{Budget, BudgetWindow, CostLayer, PriceTable};
//! use llm_tower_redis::budget::RedisBudgetStore;
//! use llm_tower_redis::{RedisConn, RedisOptions};
//! use std::sync::Arc;
//!
//! let conn = RedisConn::connect("redis://127.0.0.1:6379", RedisOptions::default()).await?;
//! let layer = CostLayer::new(PriceTable::new())
//!     .store(Arc::new(RedisBudgetStore::new(conn)))
//!     .budget(Budget::per_tenant(5_000_000_000, BudgetWindow::Daily)); // $5 a day
//! # let _ = layer; Ok(()) }
//! ```

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use llm_tower::cost::{BudgetCharge, BudgetSettle, BudgetStore, Reserve, ReserveFuture};
use llm_tower::{LlmError, NanoUsd};
use redis::Script;

use crate::settle::Settler;
use crate::{RedisConn, RedisStoreError};

/// The key namespace, versioned with the script.
pub const KEY_NAMESPACE: &str = "budget:v1:";

/// Keys outlive their window by this much, so late settlements still land.
const TTL_MARGIN: Duration = Duration::from_secs(3600);

// ARGV[1] = mode (0: reserve, 1: settle); then, per key: limit, amount (or delta), ttl ms
// (0: none). Returns {1, spent...} or {0, index, spent}.
const SCRIPT: &str = r"-- llm-tower budget v1
local mode = tonumber(ARGV[1])
if mode == 0 then
  for i = 1, #KEYS do
    local limit = tonumber(ARGV[3 * i - 1])
    local amount = tonumber(ARGV[3 * i])
    local spent = tonumber(redis.call('GET', KEYS[i]) or '0')
    if spent >= limit or spent + amount > limit then
      return {0, i - 1, spent}
    end
  end
end
local out = {1}
for i = 1, #KEYS do
  local amount = tonumber(ARGV[3 * i])
  local ttl = tonumber(ARGV[3 * i + 1])
  local spent = redis.call('INCRBY', KEYS[i], amount)
  if spent < 0 then
    redis.call('SET', KEYS[i], 0, 'KEEPTTL')
    spent = 0
  end
  if ttl > 0 and redis.call('PTTL', KEYS[i]) < 0 then
    redis.call('PEXPIRE', KEYS[i], ttl)
  end
  out[#out + 1] = spent
end
return out
";

/// A [`BudgetStore`] in Redis. See the [module docs](self).
#[derive(Clone)]
pub struct RedisBudgetStore {
    conn: RedisConn,
    script: Arc<Script>,
    fail_open: bool,
    settler: Settler,
}

impl fmt::Debug for RedisBudgetStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisBudgetStore")
            .field("conn", &self.conn)
            .field("fail_open", &self.fail_open)
            .field("store_errors", &self.store_errors())
            .field("settles_dropped", &self.settles_dropped())
            .finish()
    }
}

impl RedisBudgetStore {
    /// A store on `conn`, failing open.
    pub fn new(conn: RedisConn) -> Self {
        Self {
            conn,
            script: Arc::new(Script::new(SCRIPT)),
            fail_open: true,
            settler: Settler::default(),
        }
    }

    /// Whether requests go ahead (unreserved) when Redis does not answer (default `true`).
    #[must_use]
    pub fn fail_open(mut self, open: bool) -> Self {
        self.fail_open = open;
        self
    }

    /// Refuse requests under a budget (`Unavailable`) when Redis does not answer.
    #[must_use]
    pub fn fail_closed(self) -> Self {
        self.fail_open(false)
    }

    /// Reservations and settlements that failed (timeout, error, open breaker).
    pub fn store_errors(&self) -> u64 {
        self.settler.errors()
    }

    /// Settlements dropped because too many were in flight.
    pub fn settles_dropped(&self) -> u64 {
        self.settler.dropped()
    }

    /// What budget `key` (as in [`BudgetCharge::key`]) has spent, reservations included.
    pub async fn spent(&self, key: &str) -> Result<NanoUsd, RedisStoreError> {
        let k = self.conn.key(&format!("{KEY_NAMESPACE}{key}"));
        let v: Option<i64> = self
            .conn
            .run(move |mut c| async move { redis::cmd("GET").arg(&k).query_async(&mut c).await })
            .await?;
        Ok(v.map_or(0, |v| u64::try_from(v).unwrap_or(0)))
    }

    fn keys_and_args<'a>(
        &self,
        mode: i64,
        items: impl Iterator<Item = (&'a str, NanoUsd, i64, Option<Duration>)>,
    ) -> (Vec<String>, Vec<i64>) {
        let mut keys = Vec::new();
        let mut args = vec![mode];
        for (key, limit, amount, ttl) in items {
            keys.push(self.conn.key(&format!("{KEY_NAMESPACE}{key}")));
            args.push(i64::try_from(limit).unwrap_or(i64::MAX));
            args.push(amount);
            let ttl_ms = ttl.map_or(0, |t| (t + TTL_MARGIN).as_millis());
            args.push(i64::try_from(ttl_ms).unwrap_or(i64::MAX));
        }
        (keys, args)
    }

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

fn decode(reply: &[i64], n: usize) -> Result<Reserve, RedisStoreError> {
    let nano = |v: i64| u64::try_from(v).unwrap_or(0);
    match reply {
        [1, rest @ ..] if rest.len() == n => Ok(Reserve::Reserved {
            spent: rest.iter().map(|s| Some(nano(*s))).collect(),
        }),
        [0, index, spent] => Ok(Reserve::Exceeded {
            index: usize::try_from(*index).unwrap_or(0),
            spent: nano(*spent),
        }),
        _ => Err(RedisStoreError::Redis(format!(
            "unexpected budget script reply {reply:?}"
        ))),
    }
}

impl BudgetStore for RedisBudgetStore {
    fn reserve(&self, charges: &[BudgetCharge]) -> ReserveFuture {
        let n = charges.len();
        let (keys, args) = self.keys_and_args(
            0,
            charges.iter().map(|c| {
                let amount = i64::try_from(c.amount).unwrap_or(i64::MAX);
                (c.key.as_str(), c.limit, amount, c.ttl)
            }),
        );
        let conn = self.conn.clone();
        let script = self.script.clone();
        let settler = self.settler.clone();
        let fail_open = self.fail_open;
        Box::pin(async move {
            match Self::run(conn, script, keys, args)
                .await
                .and_then(|reply| decode(&reply, n))
            {
                Ok(r) => Ok(r),
                Err(e) => {
                    settler.error();
                    if fail_open {
                        tracing::warn!(error = %e, "budget store unavailable; failing open");
                        Ok(Reserve::Reserved {
                            spent: vec![None; n],
                        })
                    } else {
                        tracing::warn!(error = %e, "budget store unavailable; failing closed");
                        Err(
                            LlmError::unavailable(format!("budget store unavailable: {e}"))
                                .with_source(e),
                        )
                    }
                }
            }
        })
    }

    fn settle(&self, settles: &[BudgetSettle]) {
        if settles.is_empty() {
            return;
        }
        let (keys, args) = self.keys_and_args(
            1,
            settles.iter().map(|s| (s.key.as_str(), 0, s.delta, s.ttl)),
        );
        let settle = Self::run(self.conn.clone(), self.script.clone(), keys, args);
        self.settler
            .spawn("budget", async move { settle.await.map(drop) });
    }
}
