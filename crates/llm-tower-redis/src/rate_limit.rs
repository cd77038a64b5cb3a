//! A Redis [`RateLimitStore`]: replicas share one set of buckets, with holds.
//!
//! # Atomicity
//!
//! Every request runs **one** Lua script (`EVALSHA` through [`redis::Script`], loaded on
//! first use) over all of its buckets: it refills each bucket with Redis's own clock
//! (`TIME`, so replicas' clocks do not matter for refills), refuses if any bucket lacks
//! room (charging nothing), else charges them all. Settlements are one script call too.
//! The buckets are the same token buckets as the in-memory store.
//!
//! # Holds
//!
//! Each acquisition carries a [`Hold`] (see [`llm_tower::ledger`] and
//! [`RateLimitStore`]): a token bucket's take is recorded under the hold id and settled by
//! id once (`actual − held`); a request bucket's take is final and its id remembered
//! briefly. An acquisition whose id is known, or that Redis runs after its sender stopped
//! waiting (the operation timeout plus 1 s of clock skew), is a no-op, so a reservation
//! queued behind a stall never takes twice; a settlement without a hold takes `actual`
//! (never gives back) and leaves a tombstone. A hold never settled is forgotten at its
//! expiry without a refund (its tokens refill with the bucket).
//!
//! # Keys
//!
//! `<RedisOptions::key_prefix>rl:v2:<bucket key>`, a hash `{l: level, t: ms, <hold id>:
//! amount or tombstone}`, and `…:x`, a sorted set of hold ids by expiry. Both expire when
//! the bucket has refilled and its last hold or tombstone has expired (a full bucket is the
//! same as none); each call sweeps at most 100 expired entries per bucket. The `v2` is the
//! script/key version: a replica running another layout uses other keys instead of
//! misreading these. All keys of one request are touched by one script, so with Redis
//! Cluster they must share a slot: put a hash tag in the rule names (`{limits}`).
//!
//! # Failure
//!
//! Every call goes through [`RedisConn`] (hard timeout, circuit breaker). When Redis does
//! not answer, the store **fails open by default**: the request is allowed (with unknown
//! remaining), its token settlement takes the actual usage when Redis answers again, and
//! the failure is counted in [`RedisRateLimitStore::store_errors`]. With
//! [`fail_closed`](RedisRateLimitStore::fail_closed) the request is refused with
//! [`ErrorKind::Unavailable`](llm_tower::ErrorKind) instead, promptly (within the
//! operation timeout, or at once while the breaker is open).
//!
//! # Background settlements
//!
//! [`RateLimitStore::settle`] runs in a completion hook, which cannot wait, so the
//! settlement script is sent from a task spawned on the current tokio runtime
//! (`tokio::spawn`). At most 1024 settlements are in flight; beyond that they are dropped
//! and counted in [`RedisRateLimitStore::settles_dropped`] (the take stays as reserved). A
//! failed settlement is sent again (it is idempotent) for up to 30 s by default
//! ([`settle_retry`](RedisRateLimitStore::settle_retry)), then counted in
//! [`RedisRateLimitStore::settles_lost`].
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

use std::sync::Arc;
use std::time::Duration;

use llm_tower::ledger::Hold;
use llm_tower::rate_limit::{Acquire, AcquireFuture, BucketCheck, RateLimitStore};
use redis::Script;

use crate::settle::{Settler, Stamp, ledger_store, run_script, unavailable};
use crate::{RedisConn, RedisStoreError};

/// The key namespace, versioned with the script.
pub const KEY_NAMESPACE: &str = "rl:v2:";

// KEYS, per bucket: the bucket (hash), its expiries (zset).
// ARGV[1] = mode (0: acquire, 1: settle, 2: read); [2] = hold id; [3] = hold expiry (ms);
// [4] = acquisition deadline (ms); [5] = tombstone lifetime (ms); [6] = lifetime of a final
// take's id (ms); then, per bucket: limit, window (ms), amount (acquire) or actual (settle),
// held (1: a hold, 0: final).
// Replies: {1, remaining...}; {0, index, retry_ms}; {2} too late (no-op); {3, remaining...}
// id already known (no-op); mode 2: {level * 1000, open holds} per bucket.
const SCRIPT: &str = r"-- llm-tower rate limit v2
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local mode = tonumber(ARGV[1])
local id = ARGV[2]
local hold_exp = tonumber(ARGV[3])
local deadline = tonumber(ARGV[4])
local tomb_exp = now + tonumber(ARGV[5])
local final_exp = now + tonumber(ARGV[6])
local n = #KEYS / 2
local function extend(k, ttl)
  local p = redis.call('PTTL', k)
  if p == -1 or (p >= 0 and p < ttl) then redis.call('PEXPIRE', k, ttl) end
end
local function arg(i, j) return tonumber(ARGV[6 + 4 * (i - 1) + j]) end
local levels = {}
local known = false
for i = 1, n do
  local b, x = KEYS[2 * i - 1], KEYS[2 * i]
  -- Expired holds and tombstones are forgotten: at most 100 per bucket and call.
  local ids = redis.call('ZRANGEBYSCORE', x, '-inf', now, 'LIMIT', 0, 100)
  if #ids > 0 then
    redis.call('HDEL', b, unpack(ids))
    redis.call('ZREM', x, unpack(ids))
  end
  if redis.call('HEXISTS', b, id) == 1 then known = true end
  local limit, window = arg(i, 1), arg(i, 2)
  local v = redis.call('HMGET', b, 'l', 't')
  local level = tonumber(v[1])
  local ts = tonumber(v[2])
  if level == nil or ts == nil then
    level = limit
    ts = now
  end
  if ts > now then ts = now end
  levels[i] = math.min(limit, level + (now - ts) * limit / window)
end
local function remaining()
  local out = {}
  for i = 1, n do out[#out + 1] = math.max(0, math.floor(levels[i])) end
  return out
end
if mode == 2 then
  local out = {}
  for i = 1, n do
    local b = KEYS[2 * i - 1]
    local open = 0
    for _, f in ipairs(redis.call('HKEYS', b)) do
      if f ~= 'l' and f ~= 't' and redis.call('HGET', b, f) ~= 't' then open = open + 1 end
    end
    out[#out + 1] = math.floor(levels[i] * 1000)
    out[#out + 1] = open
  end
  return out
end
local function save(i, level, entry_exp)
  local b, x = KEYS[2 * i - 1], KEYS[2 * i]
  local limit, window = arg(i, 1), arg(i, 2)
  redis.call('HSET', b, 'l', tostring(level), 't', tostring(now))
  local ttl = math.ceil((limit - level) * window / limit) + 1000
  ttl = math.max(ttl, entry_exp - now + 1000)
  extend(b, ttl)
  extend(x, ttl)
end
if mode == 0 then
  if now > deadline or now >= hold_exp then return {2} end
  if known then
    local out = remaining()
    table.insert(out, 1, 3)
    return out
  end
  for i = 1, n do
    local limit, window, amount = arg(i, 1), arg(i, 2), arg(i, 3)
    if levels[i] < amount then
      return {0, i - 1, math.ceil((amount - levels[i]) * window / limit)}
    end
  end
  for i = 1, n do
    local b, x = KEYS[2 * i - 1], KEYS[2 * i]
    local limit, amount, held = arg(i, 1), arg(i, 3), arg(i, 4)
    levels[i] = math.min(limit, levels[i] - amount)
    local exp = final_exp
    if held == 1 then
      exp = hold_exp
      redis.call('HSET', b, id, amount)
    else
      redis.call('HSET', b, id, 't')
    end
    redis.call('ZADD', x, exp, id)
    save(i, levels[i], exp)
  end
  local out = remaining()
  table.insert(out, 1, 1)
  return out
end
for i = 1, n do
  local b, x = KEYS[2 * i - 1], KEYS[2 * i]
  local limit, actual = arg(i, 1), arg(i, 3)
  local v = redis.call('HGET', b, id)
  if v ~= 't' then
    -- A missing hold takes the actual usage and never gives back.
    local take = actual
    if v then take = actual - tonumber(v) end
    levels[i] = math.min(limit, levels[i] - take)
    redis.call('HSET', b, id, 't')
    redis.call('ZADD', x, tomb_exp, id)
    save(i, levels[i], tomb_exp)
  end
end
local out = remaining()
table.insert(out, 1, 1)
return out
";

/// A bucket as Redis holds it now.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BucketState {
    /// Units in the bucket now (negative: debt).
    pub level: f64,
    /// Open holds.
    pub open_holds: u64,
}

/// A [`RateLimitStore`] in Redis. See the [module docs](self).
#[derive(Clone)]
pub struct RedisRateLimitStore {
    conn: RedisConn,
    script: Arc<Script>,
    fail_open: bool,
    settler: Settler,
}

ledger_store!(
    RedisRateLimitStore,
    script: SCRIPT,
    fail_open: " Whether to allow requests when Redis does not answer (default `true`).",
    fail_closed: " Refuse requests (`Unavailable`) when Redis does not answer.",
    settle_retry: [
        " How long a settlement is sent again while Redis does not answer (default 30 s).",
    ],
    store_errors:
        " Acquisitions and settlement attempts that failed (timeout, error, open breaker).",
);

impl RedisRateLimitStore {
    /// Bucket `key` (as in [`BucketCheck::key`]) now, refilled to now, for a bucket of
    /// `limit` per `window`.
    pub async fn bucket(
        &self,
        key: &str,
        limit: u64,
        window: Duration,
    ) -> Result<BucketState, RedisStoreError> {
        let check = BucketCheck {
            key: key.to_owned(),
            limit,
            window,
            amount: 0,
            held: false,
        };
        let zero = Stamp {
            hold_expires: 0,
            deadline: 0,
            tombstone_ms: 0,
            final_ms: 0,
        };
        let (keys, args) = self.keys_and_args(2, "", &zero, std::iter::once((&check, 0)));
        let reply = run_script(self.conn.clone(), self.script.clone(), keys, args).await?;
        match reply[..] {
            [level, open] => Ok(BucketState {
                level: level as f64 / 1000.0,
                open_holds: u64::try_from(open).unwrap_or(0),
            }),
            _ => Err(RedisStoreError::Redis(format!(
                "unexpected rate-limit script reply {reply:?}"
            ))),
        }
    }

    fn keys_and_args<'a>(
        &self,
        mode: i64,
        id: &str,
        stamp: &Stamp,
        items: impl Iterator<Item = (&'a BucketCheck, u64)>,
    ) -> (Vec<String>, Vec<String>) {
        let mut keys = Vec::new();
        let mut args = vec![
            mode.to_string(),
            id.to_owned(),
            stamp.hold_expires.to_string(),
            stamp.deadline.to_string(),
            stamp.tombstone_ms.to_string(),
            stamp.final_ms.to_string(),
        ];
        for (c, amount) in items {
            let base = self.conn.key(&format!("{KEY_NAMESPACE}{}", c.key));
            let expiries = format!("{base}:x");
            keys.push(base);
            keys.push(expiries);
            args.push(c.limit.min(i64::MAX as u64).to_string());
            args.push(c.window.as_millis().clamp(1, i64::MAX as u128).to_string());
            args.push(amount.min(i64::MAX as u64).to_string());
            args.push(if c.held { "1" } else { "0" }.to_owned());
        }
        (keys, args)
    }
}

fn decode(reply: &[i64], n: usize) -> Result<Acquire, RedisStoreError> {
    match reply {
        [1 | 3, rest @ ..] if rest.len() == n => Ok(Acquire::Allowed {
            remaining: rest
                .iter()
                .map(|r| Some(u64::try_from(*r).unwrap_or(0)))
                .collect(),
        }),
        [0, index, retry_ms] => Ok(Acquire::Limited {
            index: usize::try_from(*index).unwrap_or(0),
            retry_after: Duration::from_millis(u64::try_from(*retry_ms).unwrap_or(0)),
        }),
        [2] => Err(RedisStoreError::Timeout),
        _ => Err(RedisStoreError::Redis(format!(
            "unexpected rate-limit script reply {reply:?}"
        ))),
    }
}

impl RateLimitStore for RedisRateLimitStore {
    fn acquire(&self, hold: Hold, checks: &[BucketCheck]) -> AcquireFuture {
        let n = checks.len();
        let stamp = self.settler.stamp(&self.conn, &hold);
        let (keys, args) = self.keys_and_args(
            0,
            &hold.id.to_string(),
            &stamp,
            checks.iter().map(|c| (c, c.amount)),
        );
        let conn = self.conn.clone();
        let script = self.script.clone();
        let settler = self.settler.clone();
        let fail_open = self.fail_open;
        Box::pin(async move {
            let result = run_script(conn, script, keys, args)
                .await
                .and_then(|reply| decode(&reply, n));
            match result {
                Ok(a) => Ok(a),
                Err(e) => unavailable(&settler, fail_open, "rate-limit", e, || Acquire::Allowed {
                    remaining: vec![None; n],
                }),
            }
        })
    }

    fn settle(&self, hold: Hold, checks: &[BucketCheck], actual: u64) {
        if checks.is_empty() {
            return;
        }
        let stamp = self.settler.stamp(&self.conn, &hold);
        let (keys, args) = self.keys_and_args(
            1,
            &hold.id.to_string(),
            &stamp,
            checks.iter().map(|c| (c, actual)),
        );
        self.settler.spawn_script(
            "rate-limit",
            self.conn.clone(),
            self.script.clone(),
            keys,
            args,
        );
    }
}
