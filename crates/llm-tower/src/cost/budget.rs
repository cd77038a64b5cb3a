//! Budgets: rules, windows, the store trait and the in-memory store.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use llm_tower_core::{ChatRequest, LlmError, NanoUsd};
use tokio::time::Instant;

use crate::ledger::{Closed, Hold, HoldTable};

/// The period a budget covers, in UTC. A new period starts from zero.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BudgetWindow {
    /// Never resets.
    Total,
    /// Each UTC calendar day.
    Daily,
    /// Each UTC calendar month.
    Monthly,
    /// Fixed periods of this length, aligned to the Unix epoch (e.g. every hour on the hour).
    Every(Duration),
}

impl BudgetWindow {
    /// The current period at `now`: its id (part of the store key) and the time left until
    /// it ends (`None` for [`Total`](Self::Total)).
    ///
    /// ```
    /// use llm_tower::cost::BudgetWindow;
    /// use std::time::{Duration, UNIX_EPOCH};
    /// // 2024-02-29T12:00:00Z
    /// let t = UNIX_EPOCH + Duration::from_secs(1_709_208_000);
    /// assert_eq!(BudgetWindow::Monthly.current(t), ("m2024-02".to_string(), Some(Duration::from_secs(12 * 3600))));
    /// assert_eq!(BudgetWindow::Daily.current(t).1, Some(Duration::from_secs(12 * 3600)));
    /// ```
    pub fn current(&self, now: SystemTime) -> (String, Option<Duration>) {
        let since = now.duration_since(UNIX_EPOCH).unwrap_or_default();
        let secs = since.as_secs();
        match *self {
            BudgetWindow::Total => ("total".to_owned(), None),
            BudgetWindow::Daily => {
                let day = secs / 86_400;
                let end = Duration::from_secs((day + 1) * 86_400);
                (format!("d{day}"), Some(end.saturating_sub(since)))
            }
            BudgetWindow::Monthly => {
                let (y, m, _) = civil_from_days((secs / 86_400) as i64);
                let (ny, nm) = if m == 12 { (y + 1, 1) } else { (y, m + 1) };
                let end_days = days_from_civil(ny, nm, 1).max(0) as u64;
                let end = Duration::from_secs(end_days * 86_400);
                (format!("m{y:04}-{m:02}"), Some(end.saturating_sub(since)))
            }
            BudgetWindow::Every(len) => {
                let len_ms = len.as_millis().max(1);
                let n = since.as_millis() / len_ms;
                let end =
                    Duration::from_millis(u64::try_from((n + 1) * len_ms).unwrap_or(u64::MAX));
                (format!("e{len_ms}:{n}"), Some(end.saturating_sub(since)))
            }
        }
    }
}

/// Days since 1970-01-01 → (year, month, day) in the proleptic Gregorian calendar
/// (H. Hinnant's `civil_from_days`).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = if z >= 0 { z } else { z - 146_096 } / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

/// (year, month, day) → days since 1970-01-01.
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = if y >= 0 { y } else { y - 399 } / 400;
    let yoe = y - era * 400;
    let m = i64::from(m);
    let mp = if m > 2 { m - 3 } else { m + 9 };
    let doy = (153 * mp + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// Who a budget is for.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum BudgetScope {
    /// Every request, together.
    Global,
    /// Each tenant separately (requests without a tenant share the `""` tenant).
    PerTenant,
    /// Each task type separately (untyped requests share `""`).
    PerTask,
    /// One named tenant only.
    Tenant(Arc<str>),
    /// One named task type only.
    Task(Arc<str>),
}

/// A spending cap: `limit` nano-dollars per [`BudgetWindow`] for a [`BudgetScope`].
///
/// ```
/// use llm_tower::cost::{usd_to_nano, Budget, BudgetWindow};
/// // $5 a day per tenant, $100 a month for the "summarize" task.
/// let a = Budget::per_tenant(usd_to_nano(5.0).unwrap(), BudgetWindow::Daily);
/// let b = Budget::task("summarize", usd_to_nano(100.0).unwrap(), BudgetWindow::Monthly);
/// # let _ = (a, b);
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Budget {
    pub(crate) name: Option<Arc<str>>,
    pub(crate) scope: BudgetScope,
    pub(crate) limit: NanoUsd,
    pub(crate) window: BudgetWindow,
}

impl Budget {
    /// A budget for `scope`.
    pub fn new(scope: BudgetScope, limit: NanoUsd, window: BudgetWindow) -> Self {
        Self {
            name: None,
            scope,
            limit,
            window,
        }
    }
    /// One budget for all requests.
    pub fn global(limit: NanoUsd, window: BudgetWindow) -> Self {
        Self::new(BudgetScope::Global, limit, window)
    }
    /// One budget per tenant.
    pub fn per_tenant(limit: NanoUsd, window: BudgetWindow) -> Self {
        Self::new(BudgetScope::PerTenant, limit, window)
    }
    /// One budget per task type.
    pub fn per_task(limit: NanoUsd, window: BudgetWindow) -> Self {
        Self::new(BudgetScope::PerTask, limit, window)
    }
    /// A budget for one tenant.
    pub fn tenant(tenant: impl Into<Arc<str>>, limit: NanoUsd, window: BudgetWindow) -> Self {
        Self::new(BudgetScope::Tenant(tenant.into()), limit, window)
    }
    /// A budget for one task type.
    pub fn task(task: impl Into<Arc<str>>, limit: NanoUsd, window: BudgetWindow) -> Self {
        Self::new(BudgetScope::Task(task.into()), limit, window)
    }
    /// Names the budget (it prefixes the store key and appears in errors). The default
    /// name is derived from the scope, so replicas with the same configuration share it.
    #[must_use]
    pub fn named(mut self, name: impl Into<Arc<str>>) -> Self {
        self.name = Some(name.into());
        self
    }
    /// The cap, in nano-dollars.
    pub fn limit(&self) -> NanoUsd {
        self.limit
    }
    /// The window.
    pub fn window(&self) -> BudgetWindow {
        self.window
    }
    /// The scope.
    pub fn scope(&self) -> &BudgetScope {
        &self.scope
    }

    pub(crate) fn default_name(&self) -> String {
        match &self.scope {
            BudgetScope::Global => "global".to_owned(),
            BudgetScope::PerTenant => "tenant".to_owned(),
            BudgetScope::PerTask => "task".to_owned(),
            BudgetScope::Tenant(t) => format!("tenant={}", escape(t)),
            BudgetScope::Task(t) => format!("task={}", escape(t)),
        }
    }

    /// The store key of this budget for a request of `tenant` and `task` (`""`: none) at
    /// `now`, or `None` if the budget does not apply to such a request: to read what it has
    /// spent from a store (`InMemoryBudgetStore::spent`, or Redis).
    ///
    /// ```
    /// use llm_tower::cost::{Budget, BudgetWindow};
    /// let b = Budget::per_tenant(1_000, BudgetWindow::Total);
    /// assert_eq!(b.key_at("acme", "", std::time::SystemTime::now()).unwrap(), "tenant|t=acme|total");
    /// assert!(Budget::tenant("acme", 1, BudgetWindow::Total).key_at("other", "", std::time::SystemTime::now()).is_none());
    /// ```
    pub fn key_at(&self, tenant: &str, task: &str, now: SystemTime) -> Option<String> {
        let name = match &self.name {
            Some(n) => n.to_string(),
            None => self.default_name(),
        };
        self.key_parts(&name, tenant, task, &self.window.current(now).0)
    }

    /// The store key for `req` now, or `None` if the budget does not apply to it.
    pub(crate) fn key_for(&self, name: &str, req: &ChatRequest, window_id: &str) -> Option<String> {
        let tenant = req.tenant().map_or("", |t| t.as_str());
        let task = req.task_type().map_or("", |t| t.as_str());
        self.key_parts(name, tenant, task, window_id)
    }

    fn key_parts(&self, name: &str, tenant: &str, task: &str, window_id: &str) -> Option<String> {
        let part = match &self.scope {
            BudgetScope::Global => None,
            BudgetScope::PerTenant => Some(("|t=", escape(tenant))),
            BudgetScope::PerTask => Some(("|k=", escape(task))),
            BudgetScope::Tenant(t) if **t == *tenant => None,
            BudgetScope::Task(t) if **t == *task => None,
            BudgetScope::Tenant(_) | BudgetScope::Task(_) => return None,
        };
        // `name[|t=tenant or |k=task]|window`, built in one buffer (every request).
        let part_len = part.as_ref().map_or(0, |(p, v)| p.len() + v.len());
        let mut key = String::with_capacity(name.len() + part_len + 1 + window_id.len());
        key.push_str(name);
        if let Some((prefix, value)) = part {
            key.push_str(prefix);
            key.push_str(&value);
        }
        key.push('|');
        key.push_str(window_id);
        Some(key)
    }
}

fn escape(v: &str) -> std::borrow::Cow<'_, str> {
    // Runs on every request: copy only when there is something to escape.
    if v.contains(['%', '|']) {
        v.replace('%', "%25").replace('|', "%7C").into()
    } else {
        v.into()
    }
}

/// One budget a request reserves from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BudgetCharge {
    /// The budget's key for this request's scope and current window.
    pub key: String,
    /// The cap.
    pub limit: NanoUsd,
    /// The amount reserved (the request's estimated cost).
    pub amount: NanoUsd,
    /// How long the key must live (to the end of the window; `None`: forever).
    pub ttl: Option<Duration>,
}

/// The answer of [`BudgetStore::reserve`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reserve {
    /// Every budget had room; each holds the amount now. `spent[i]` is what budget `i` has
    /// spent now, open holds included (`None` when unknown, e.g. a store failing open). Also
    /// the answer to a reservation whose id the store already knows (a no-op).
    Reserved {
        /// Spent per budget, in the order of the charges.
        spent: Vec<Option<NanoUsd>>,
    },
    /// Budget `index` is exhausted; **nothing** was held.
    Exceeded {
        /// The budget that refused.
        index: usize,
        /// What it has spent (settled + open holds).
        spent: NanoUsd,
    },
}

/// The future of [`BudgetStore::reserve`].
pub type ReserveFuture = Pin<Box<dyn Future<Output = Result<Reserve, LlmError>> + Send>>;

/// Where budgets are kept: a ledger of settled amounts and open [`Hold`]s per budget key
/// (see [`ledger`](crate::ledger) for the rules every store follows).
///
/// [`reserve`](Self::reserve) is atomic over all the charges of one request and all or
/// nothing: a charge passes when `spent < limit` and `spent + amount <= limit`, where
/// `spent` = settled + open holds; if one fails none is held. So concurrent first requests
/// cannot slip past a cap. A reservation whose id the store already knows is a no-op.
///
/// [`settle`](Self::settle) replaces the hold of `hold.id` in every charged budget with
/// `actual`, once (repeats are no-ops); where there is no hold it records `actual` and
/// leaves a tombstone. Holds never settled are released at [`Hold::expires_at`].
pub trait BudgetStore: Send + Sync + fmt::Debug + 'static {
    /// Holds every charge at once under `hold`. A store that cannot answer fails open
    /// (`Reserved` with unknown spent) or closed (`Err`), as it documents.
    fn reserve(&self, hold: Hold, charges: &[BudgetCharge]) -> ReserveFuture;

    /// A synchronous answer, for stores without I/O. Default: `None`.
    fn reserve_now(
        &self,
        hold: Hold,
        charges: &[BudgetCharge],
    ) -> Option<Result<Reserve, LlmError>> {
        let _ = (hold, charges);
        None
    }

    /// Replaces the hold `hold.id` of each charge's budget with `actual` (idempotent).
    /// Runs from a completion hook, so it must not block; a networked store sends it in
    /// the background (and documents it).
    fn settle(&self, hold: Hold, charges: &[BudgetCharge], actual: NanoUsd);
}

/// One budget key: what is settled, what is held, and the holds.
#[derive(Debug, Default)]
struct Account {
    settled: NanoUsd,
    held: NanoUsd,
    window_end: Option<Instant>,
    holds: HoldTable,
}

impl Account {
    fn spent(&self) -> NanoUsd {
        self.settled.saturating_add(self.held)
    }

    fn sweep(&mut self, now: Instant) {
        let released = self.holds.sweep(now);
        self.held = self.held.saturating_sub(released);
    }

    fn is_live(&self, now: Instant) -> bool {
        self.window_end.is_none_or(|e| now < e)
    }
}

/// How long a settled id is remembered by default in memory (a repeated settle within it is
/// a no-op). Nothing arrives late in memory, so it is short.
const DEFAULT_MEMORY_TOMBSTONE: Duration = Duration::from_millis(200);

/// Budgets in an in-process map (one machine), with holds as in [`BudgetStore`]. Keys of
/// past windows are dropped at their window's end by a sweep every 1024 operations; the
/// holds of a key are swept on each operation on it.
pub struct InMemoryBudgetStore {
    map: Mutex<crate::FastMap<String, Account>>,
    ops: AtomicU64,
    tombstone_ttl: Duration,
}

impl Default for InMemoryBudgetStore {
    fn default() -> Self {
        Self {
            map: Mutex::default(),
            ops: AtomicU64::new(0),
            tombstone_ttl: DEFAULT_MEMORY_TOMBSTONE,
        }
    }
}

impl fmt::Debug for InMemoryBudgetStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("InMemoryBudgetStore")
            .field("keys", &self.lock().len())
            .finish()
    }
}

impl InMemoryBudgetStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// Remembers settled ids for `ttl` (default 200 ms; memory grows with the request rate times it): a repeated settle, or a reservation
    /// with a settled id, within it is a no-op.
    #[must_use]
    pub fn tombstone_ttl(mut self, ttl: Duration) -> Self {
        self.tombstone_ttl = ttl;
        self
    }

    /// What budget `key` has spent: settled plus open holds.
    pub fn spent(&self, key: &str) -> NanoUsd {
        self.read(key, Account::spent)
    }

    /// What budget `key` has settled (open holds excluded).
    pub fn settled(&self, key: &str) -> NanoUsd {
        self.read(key, |a| a.settled)
    }

    /// The open holds of budget `key`: their count and sum.
    pub fn open_holds(&self, key: &str) -> (usize, NanoUsd) {
        self.read_or(key, (0, 0), |a| (a.holds.open_holds(), a.held))
    }

    fn read<T: Default>(&self, key: &str, f: impl FnOnce(&Account) -> T) -> T {
        self.read_or(key, T::default(), f)
    }

    fn read_or<T>(&self, key: &str, default: T, f: impl FnOnce(&Account) -> T) -> T {
        let now = Instant::now();
        let mut map = self.lock();
        match map.get_mut(key) {
            Some(a) if a.is_live(now) => {
                a.sweep(now);
                f(a)
            }
            _ => default,
        }
    }

    /// Every key and what it has spent (settled plus open holds).
    pub fn entries(&self) -> Vec<(String, NanoUsd)> {
        let now = Instant::now();
        let mut map = self.lock();
        map.iter_mut()
            .filter(|(_, a)| a.is_live(now))
            .map(|(k, a)| {
                a.sweep(now);
                (k.clone(), a.spent())
            })
            .collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, crate::FastMap<String, Account>> {
        self.map
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The synchronous, atomic, all-or-nothing reservation.
    pub fn try_reserve(&self, hold: Hold, charges: &[BudgetCharge]) -> Reserve {
        let now = Instant::now();
        let mut map = self.lock();
        if self.ops.fetch_add(1, Ordering::Relaxed) % 1024 == 1023 {
            map.retain(|_, a| a.is_live(now));
        }
        // First pass: sweep, look for the id, check room; nothing is changed yet. The
        // answer's vector doubles as the scratch space (one allocation per request).
        let mut known = hold.expires_at <= now;
        let mut out: Vec<Option<NanoUsd>> = Vec::with_capacity(charges.len());
        for c in charges {
            let spent = match map.get_mut(&c.key) {
                Some(a) if a.is_live(now) => {
                    a.sweep(now);
                    known |= a.holds.contains(hold.id);
                    a.spent()
                }
                _ => 0,
            };
            out.push(Some(spent));
        }
        if known {
            // Already held or settled (or too late to matter): a no-op.
            return Reserve::Reserved { spent: out };
        }
        for (i, (c, s)) in charges.iter().zip(&out).enumerate() {
            let s = s.unwrap_or(0);
            if s >= c.limit || s.saturating_add(c.amount) > c.limit {
                return Reserve::Exceeded { index: i, spent: s };
            }
        }
        for (c, slot) in charges.iter().zip(out.iter_mut()) {
            let Some(account) = account_mut(&mut map, c, now, true) else {
                continue;
            };
            account.held = account.held.saturating_add(c.amount);
            account.holds.hold(hold.id, c.amount, hold.expires_at);
            *slot = Some(account.spent());
        }
        Reserve::Reserved { spent: out }
    }

    /// The synchronous settlement (see [`BudgetStore::settle`]).
    pub fn settle_now(&self, hold: Hold, charges: &[BudgetCharge], actual: NanoUsd) {
        let now = Instant::now();
        let tomb_until = now + self.tombstone_ttl;
        let mut map = self.lock();
        for c in charges {
            // A window that has ended is over: its key is not recreated.
            let Some(account) = account_mut(&mut map, c, now, false) else {
                continue;
            };
            account.sweep(now);
            match account.holds.close(hold.id, tomb_until) {
                Closed::Held(held) => {
                    account.held = account.held.saturating_sub(held);
                    account.settled = account.settled.saturating_add(actual);
                }
                Closed::Missing => account.settled = account.settled.saturating_add(actual),
                Closed::Already => {}
            }
        }
    }
}

/// The live account of `c.key`, created if absent (and, with `replace_ended`, if its
/// window has ended).
fn account_mut<'m>(
    map: &'m mut crate::FastMap<String, Account>,
    c: &BudgetCharge,
    now: Instant,
    replace_ended: bool,
) -> Option<&'m mut Account> {
    match map.get(&c.key).map(|a| a.is_live(now)) {
        Some(true) => {}
        Some(false) if !replace_ended => return None,
        _ => {
            map.insert(
                c.key.clone(),
                Account {
                    window_end: c.ttl.map(|t| now + t),
                    ..Account::default()
                },
            );
        }
    }
    map.get_mut(&c.key)
}

impl BudgetStore for InMemoryBudgetStore {
    fn reserve(&self, hold: Hold, charges: &[BudgetCharge]) -> ReserveFuture {
        let r = self.try_reserve(hold, charges);
        Box::pin(std::future::ready(Ok(r)))
    }

    fn reserve_now(
        &self,
        hold: Hold,
        charges: &[BudgetCharge],
    ) -> Option<Result<Reserve, LlmError>> {
        Some(Ok(self.try_reserve(hold, charges)))
    }

    fn settle(&self, hold: Hold, charges: &[BudgetCharge], actual: NanoUsd) {
        self.settle_now(hold, charges, actual);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_name_the_scope_and_window_and_escape_separators() {
        let req = ChatRequest::new("m", Vec::new())
            .with_tenant("a|b%")
            .with_task_type("chat");
        let key = |scope| Budget::new(scope, 1, BudgetWindow::Total).key_for("b", &req, "d1");
        assert_eq!(key(BudgetScope::Global).as_deref(), Some("b|d1"));
        assert_eq!(
            key(BudgetScope::PerTenant).as_deref(),
            Some("b|t=a%7Cb%25|d1")
        );
        assert_eq!(key(BudgetScope::PerTask).as_deref(), Some("b|k=chat|d1"));
        assert_eq!(
            key(BudgetScope::Task("chat".into())).as_deref(),
            Some("b|d1")
        );
        assert_eq!(key(BudgetScope::Task("other".into())), None);
        assert_eq!(key(BudgetScope::Tenant("x".into())), None);
    }
}
