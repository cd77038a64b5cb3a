//! A Redis [`BudgetStore`]: replicas share one set of budgets, kept as a ledger of holds.
//!
//! # The ledger
//!
//! Each request reserves under a [`Hold`] (see [`llm_tower::ledger`]): an id and an
//! expiry. A reservation is **one** Lua script call (`EVALSHA` through [`redis::Script`])
//! over every budget of the request: it checks that each has room (`spent < limit` and
//! `spent + amount <= limit`, where spent = settled + open holds) and only then records the
//! hold in all of them. Concurrent requests on any number of replicas cannot slip past a
//! cap. A settlement is one script call too: it replaces the hold of its id with the actual
//! cost, once. Everything follows the ledger rules:
//!
//! - a reservation whose id is already known (held or settled) is a no-op, and so is one
//!   that Redis runs after its sender stopped waiting for it (after the operation timeout
//!   plus 1 s of clock skew): a reservation queued behind a stall never lands late;
//! - a settlement whose hold is missing (the reservation failed open, or the hold expired)
//!   records the actual cost — never a negative correction — and leaves a tombstone, so a
//!   late reservation or a repeated settlement with that id is a no-op;
//! - a hold never settled (a replica died, an answer was lost) is released at its expiry
//!   ([`CostLayer::hold_ttl`](llm_tower::cost::CostLayer::hold_ttl)), swept by the scripts.
//!
//! Spend is settled + open holds and never goes below what was settled. Times are compared
//! on Redis's clock (`TIME`) against the replica's wall clock: replicas' clocks must be
//! within about a second of Redis's.
//!
//! # Keys
//!
//! Per budget key (`<RedisOptions::key_prefix>budget:v2:<budget key>`, the budget key ends
//! with the window id, e.g. `tenant|t=acme|d19700`): the settled amount (an integer of
//! nano-dollars, expiring one hour after its window ends, never for total budgets), `…:h`
//! (a hash: hold id → amount or tombstone, and the sum of open holds) and `…:x` (a sorted
//! set: hold id → expiry). The last two expire with their last entry, and each script call
//! sweeps at most 100 expired entries per key, so their size stays about (requests in
//! flight + requests settled in the last [`settle_retry`](RedisBudgetStore::settle_retry)
//! period) whatever the window, `total` included. `v2` versions the script and key layout;
//! `v1` keys (before holds) are not read, so on upgrade the current windows start from zero.
//! All keys of one request are touched by one script, so with Redis Cluster they must share
//! a slot: put a hash tag in the budget names (`{budgets}`).
//!
//! # Failure
//!
//! Every call goes through [`RedisConn`] (hard timeout, circuit breaker). When Redis does
//! not answer a reservation, the store **fails open by default**: the request goes ahead
//! unreserved and its settlement records the actual cost when Redis answers again (a
//! Redis outage then lets spend pass the cap by at most what is spent during the outage,
//! but nothing is lost or counted twice); the failure is counted in
//! [`RedisBudgetStore::store_errors`]. With [`fail_closed`](RedisBudgetStore::fail_closed),
//! requests under a budget are refused with [`ErrorKind::Unavailable`](llm_tower::ErrorKind)
//! while Redis is unreachable (and their reservations settled at zero, in case they land).
//! After a restart without data, spend starts again from the settlements that follow.
//!
//! # Background settlements
//!
//! Settlements are sent from a task spawned on the current tokio runtime, at most 1024 in
//! flight; beyond that they are dropped and counted in
//! [`RedisBudgetStore::settles_dropped`] (the hold is then released at its expiry). A
//! settlement that fails is sent again (it is idempotent) with a growing pause of up to
//! 1 s, for up to 30 s by default ([`settle_retry`](RedisBudgetStore::settle_retry));
//! then it is counted in [`RedisBudgetStore::settles_lost`].
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

use std::sync::Arc;
use std::time::Duration;

use llm_tower::NanoUsd;
use llm_tower::cost::{BudgetCharge, BudgetStore, Reserve, ReserveFuture};
use llm_tower::ledger::Hold;
use redis::Script;

use crate::settle::{Settler, Stamp, ledger_store, run_script, unavailable};
use crate::{RedisConn, RedisStoreError};

/// The key namespace, versioned with the script.
pub const KEY_NAMESPACE: &str = "budget:v2:";

/// Keys outlive their window by this much, so late settlements still land.
const TTL_MARGIN: Duration = Duration::from_secs(3600);

// KEYS, per budget: settled (string), holds (hash: id -> amount or 't', '_held' -> sum of
// open holds), expiries (zset: id -> unix ms).
// ARGV[1] = mode (0: reserve, 1: settle, 2: read); [2] = hold id; [3] = hold expiry (ms);
// [4] = reservation deadline (ms); [5] = tombstone lifetime (ms); then, per budget: limit,
// amount (reserve) or actual (settle), window ttl (ms, 0: none).
// Replies: {1, spent...} reserved/settled; {0, index, spent} exceeded; {2} too late (no-op);
// {3, spent...} id already known (no-op); mode 2: {settled, held} per budget.
const SCRIPT: &str = r"-- llm-tower budget v2
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local mode = tonumber(ARGV[1])
local id = ARGV[2]
local hold_exp = tonumber(ARGV[3])
local deadline = tonumber(ARGV[4])
local tomb_exp = now + tonumber(ARGV[5])
local n = #KEYS / 3
local function extend(k, at)
  local ttl = at - now + 1000
  local p = redis.call('PTTL', k)
  if p == -1 or (p >= 0 and p < ttl) then redis.call('PEXPIRE', k, ttl) end
end
local function held_add(h, d)
  local v = redis.call('HINCRBY', h, '_held', d)
  if v < 0 then redis.call('HSET', h, '_held', 0) end
end
-- Expired holds are released, expired tombstones forgotten: at most 100 per key and call.
local function sweep(h, x)
  local ids = redis.call('ZRANGEBYSCORE', x, '-inf', now, 'LIMIT', 0, 100)
  if #ids == 0 then return end
  local release = 0
  for _, e in ipairs(ids) do
    local v = redis.call('HGET', h, e)
    if v and v ~= 't' then release = release + tonumber(v) end
  end
  redis.call('HDEL', h, unpack(ids))
  redis.call('ZREM', x, unpack(ids))
  if release > 0 then held_add(h, -release) end
end
local spent = {}
local known = false
for i = 1, n do
  local k, h, x = KEYS[3 * i - 2], KEYS[3 * i - 1], KEYS[3 * i]
  sweep(h, x)
  if redis.call('HEXISTS', h, id) == 1 then known = true end
  local s = tonumber(redis.call('GET', k) or '0')
  local held = tonumber(redis.call('HGET', h, '_held') or '0')
  if mode == 2 then
    spent[2 * i - 1] = s
    spent[2 * i] = held
  else
    spent[i] = s + held
  end
end
if mode == 2 then return spent end
if mode == 0 then
  if now > deadline or now >= hold_exp then return {2} end
  if known then
    local out = {3}
    for i = 1, n do out[#out + 1] = spent[i] end
    return out
  end
  for i = 1, n do
    local limit = tonumber(ARGV[3 * i + 3])
    local amount = tonumber(ARGV[3 * i + 4])
    if spent[i] >= limit or spent[i] + amount > limit then
      return {0, i - 1, spent[i]}
    end
  end
  local out = {1}
  for i = 1, n do
    local h, x = KEYS[3 * i - 1], KEYS[3 * i]
    local amount = tonumber(ARGV[3 * i + 4])
    redis.call('HSET', h, id, amount)
    held_add(h, amount)
    redis.call('ZADD', x, hold_exp, id)
    extend(h, hold_exp)
    extend(x, hold_exp)
    out[#out + 1] = spent[i] + amount
  end
  return out
end
local out = {1}
for i = 1, n do
  local k, h, x = KEYS[3 * i - 2], KEYS[3 * i - 1], KEYS[3 * i]
  local actual = tonumber(ARGV[3 * i + 4])
  local wttl = tonumber(ARGV[3 * i + 5])
  local v = redis.call('HGET', h, id)
  if v ~= 't' then
    if v then held_add(h, -tonumber(v)) end
    redis.call('INCRBY', k, actual)
    if wttl > 0 and redis.call('PTTL', k) < 0 then redis.call('PEXPIRE', k, wttl) end
    redis.call('HSET', h, id, 't')
    redis.call('ZADD', x, tomb_exp, id)
    extend(h, tomb_exp)
    extend(x, tomb_exp)
  end
  local s = tonumber(redis.call('GET', k) or '0')
  out[#out + 1] = s + tonumber(redis.call('HGET', h, '_held') or '0')
end
return out
";

/// What one budget holds in Redis: settled amounts and open holds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BudgetLedger {
    /// Settled, in nano-dollars.
    pub settled: NanoUsd,
    /// Held by open reservations, in nano-dollars.
    pub held: NanoUsd,
}

impl BudgetLedger {
    /// Spend: settled + open holds.
    pub fn spent(&self) -> NanoUsd {
        self.settled.saturating_add(self.held)
    }
}

/// A [`BudgetStore`] in Redis. See the [module docs](self).
#[derive(Clone)]
pub struct RedisBudgetStore {
    conn: RedisConn,
    script: Arc<Script>,
    fail_open: bool,
    settler: Settler,
}

ledger_store!(
    RedisBudgetStore,
    script: SCRIPT,
    fail_open:
        " Whether requests go ahead (unreserved) when Redis does not answer (default `true`).",
    fail_closed: " Refuse requests under a budget (`Unavailable`) when Redis does not answer.",
    settle_retry: [
        " How long a settlement is sent again while Redis does not answer (default 30 s).",
        " Settled ids are remembered a little longer than this, so the Redis memory of a",
        " budget is about (open holds + settlements of this period) × ~150 bytes.",
    ],
    store_errors:
        " Reservations and settlement attempts that failed (timeout, error, open breaker).",
);

impl RedisBudgetStore {
    /// What budget `key` (as in [`BudgetCharge::key`]) has settled and holds (expired
    /// holds released first).
    pub async fn ledger(&self, key: &str) -> Result<BudgetLedger, RedisStoreError> {
        let keys = self.budget_keys(key).to_vec();
        let args = ["2", "", "0", "0", "0", "0", "0", "0"]
            .map(str::to_owned)
            .to_vec();
        let reply = run_script(self.conn.clone(), self.script.clone(), keys, args).await?;
        let nano = |v: i64| u64::try_from(v).unwrap_or(0);
        match reply[..] {
            [settled, held] => Ok(BudgetLedger {
                settled: nano(settled),
                held: nano(held),
            }),
            _ => Err(RedisStoreError::Redis(format!(
                "unexpected budget script reply {reply:?}"
            ))),
        }
    }

    /// What budget `key` has spent: settled + open holds.
    pub async fn spent(&self, key: &str) -> Result<NanoUsd, RedisStoreError> {
        self.ledger(key).await.map(|l| l.spent())
    }

    /// The three keys of budget `key`: settled, holds, expiries.
    fn budget_keys(&self, key: &str) -> [String; 3] {
        let base = self.conn.key(&format!("{KEY_NAMESPACE}{key}"));
        let holds = format!("{base}:h");
        let expiries = format!("{base}:x");
        [base, holds, expiries]
    }

    fn keys_and_args<'a>(
        &self,
        mode: i64,
        id: &str,
        stamp: &Stamp,
        items: impl Iterator<Item = (&'a str, NanoUsd, NanoUsd, Option<Duration>)>,
    ) -> (Vec<String>, Vec<String>) {
        let mut keys = Vec::new();
        let mut args = vec![
            mode.to_string(),
            id.to_owned(),
            stamp.hold_expires.to_string(),
            stamp.deadline.to_string(),
            stamp.tombstone_ms.to_string(),
        ];
        for (key, limit, amount, ttl) in items {
            keys.extend(self.budget_keys(key));
            args.push(limit.min(i64::MAX as u64).to_string());
            args.push(amount.min(i64::MAX as u64).to_string());
            let ttl_ms = ttl.map_or(0, |t| (t + TTL_MARGIN).as_millis());
            args.push(ttl_ms.min(i64::MAX as u128).to_string());
        }
        (keys, args)
    }
}

fn decode(reply: &[i64], n: usize) -> Result<Reserve, RedisStoreError> {
    let nano = |v: i64| u64::try_from(v).unwrap_or(0);
    match reply {
        [1 | 3, rest @ ..] if rest.len() == n => Ok(Reserve::Reserved {
            spent: rest.iter().map(|s| Some(nano(*s))).collect(),
        }),
        [0, index, spent] => Ok(Reserve::Exceeded {
            index: usize::try_from(*index).unwrap_or(0),
            spent: nano(*spent),
        }),
        [2] => Err(RedisStoreError::Timeout),
        _ => Err(RedisStoreError::Redis(format!(
            "unexpected budget script reply {reply:?}"
        ))),
    }
}

impl BudgetStore for RedisBudgetStore {
    fn reserve(&self, hold: Hold, charges: &[BudgetCharge]) -> ReserveFuture {
        let n = charges.len();
        let stamp = self.settler.stamp(&self.conn, &hold);
        let (keys, args) = self.keys_and_args(
            0,
            &hold.id.to_string(),
            &stamp,
            charges
                .iter()
                .map(|c| (c.key.as_str(), c.limit, c.amount, c.ttl)),
        );
        let conn = self.conn.clone();
        let script = self.script.clone();
        let settler = self.settler.clone();
        let fail_open = self.fail_open;
        Box::pin(async move {
            match run_script(conn, script, keys, args)
                .await
                .and_then(|reply| decode(&reply, n))
            {
                Ok(r) => Ok(r),
                Err(e) => unavailable(&settler, fail_open, "budget", e, || Reserve::Reserved {
                    spent: vec![None; n],
                }),
            }
        })
    }

    fn settle(&self, hold: Hold, charges: &[BudgetCharge], actual: NanoUsd) {
        if charges.is_empty() {
            return;
        }
        let stamp = self.settler.stamp(&self.conn, &hold);
        let (keys, args) = self.keys_and_args(
            1,
            &hold.id.to_string(),
            &stamp,
            charges
                .iter()
                .map(|c| (c.key.as_str(), c.limit, actual, c.ttl)),
        );
        self.settler
            .spawn_script("budget", self.conn.clone(), self.script.clone(), keys, args);
    }
}
