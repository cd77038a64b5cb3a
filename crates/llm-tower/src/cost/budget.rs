//! Budgets: rules, windows, the store trait and the in-memory store.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use llm_tower_core::{ChatRequest, LlmError, NanoUsd};
use tokio::time::Instant;

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

    /// The store key for `req` now, or `None` if the budget does not apply to it.
    pub(crate) fn key_for(&self, name: &str, req: &ChatRequest, window_id: &str) -> Option<String> {
        let tenant = req.tenant().map_or("", |t| t.as_str());
        let task = req.task_type().map_or("", |t| t.as_str());
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

/// A correction once the actual cost is known.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BudgetSettle {
    /// The budget key.
    pub key: String,
    /// Positive: spent more than reserved; negative: give back (never below zero).
    pub delta: i64,
    /// As in [`BudgetCharge::ttl`].
    pub ttl: Option<Duration>,
}

/// The answer of [`BudgetStore::reserve`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reserve {
    /// Every budget had room; each was charged. `spent[i]` is what budget `i` has spent
    /// now, reservations included (`None` when unknown, e.g. a store failing open).
    Reserved {
        /// Spent per budget, in the order of the charges.
        spent: Vec<Option<NanoUsd>>,
    },
    /// Budget `index` is exhausted; **nothing** was charged.
    Exceeded {
        /// The budget that refused.
        index: usize,
        /// What it has spent.
        spent: NanoUsd,
    },
}

/// The future of [`BudgetStore::reserve`].
pub type ReserveFuture = Pin<Box<dyn Future<Output = Result<Reserve, LlmError>> + Send>>;

/// Where budgets are kept. [`reserve`](Self::reserve) is atomic over all the charges of
/// one request and all or nothing: a charge passes when `spent < limit` and
/// `spent + amount <= limit`; if one fails none is made. So concurrent first requests
/// cannot slip past a cap.
pub trait BudgetStore: Send + Sync + fmt::Debug + 'static {
    /// Reserves every charge at once. A store that cannot answer fails open
    /// (`Reserved` with unknown spent) or closed (`Err`), as it documents.
    fn reserve(&self, charges: &[BudgetCharge]) -> ReserveFuture;

    /// A synchronous answer, for stores without I/O. Default: `None`.
    fn reserve_now(&self, charges: &[BudgetCharge]) -> Option<Result<Reserve, LlmError>> {
        let _ = charges;
        None
    }

    /// Applies corrections once the actual cost is known. Runs from a completion hook, so
    /// it must not block; a networked store sends it in the background (and documents it).
    fn settle(&self, settles: &[BudgetSettle]);
}

/// Budgets in an in-process map (one machine). Keys of past windows expire at their
/// window's end and are dropped by a sweep every 1024 operations.
#[derive(Default)]
pub struct InMemoryBudgetStore {
    map: Mutex<crate::FastMap<String, (NanoUsd, Option<Instant>)>>,
    ops: AtomicU64,
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

    /// What budget `key` has spent (reservations included).
    pub fn spent(&self, key: &str) -> NanoUsd {
        let now = Instant::now();
        self.lock()
            .get(key)
            .filter(|(_, exp)| exp.is_none_or(|e| now < e))
            .map_or(0, |(s, _)| *s)
    }

    /// Every key and what it has spent.
    pub fn entries(&self) -> Vec<(String, NanoUsd)> {
        let now = Instant::now();
        self.lock()
            .iter()
            .filter(|(_, (_, exp))| exp.is_none_or(|e| now < e))
            .map(|(k, (s, _))| (k.clone(), *s))
            .collect()
    }

    fn lock(
        &self,
    ) -> std::sync::MutexGuard<'_, crate::FastMap<String, (NanoUsd, Option<Instant>)>> {
        self.map
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The synchronous, atomic, all-or-nothing reservation.
    pub fn try_reserve(&self, charges: &[BudgetCharge]) -> Reserve {
        let now = Instant::now();
        let mut map = self.lock();
        if self.ops.fetch_add(1, Ordering::Relaxed) % 1024 == 1023 {
            map.retain(|_, (_, exp)| exp.is_none_or(|e| now < e));
        }
        let current = |map: &crate::FastMap<String, (NanoUsd, Option<Instant>)>, k: &str| {
            map.get(k)
                .filter(|(_, exp)| exp.is_none_or(|e| now < e))
                .map_or(0, |(s, _)| *s)
        };
        for (i, c) in charges.iter().enumerate() {
            let spent = current(&map, &c.key);
            if spent >= c.limit || spent.saturating_add(c.amount) > c.limit {
                return Reserve::Exceeded { index: i, spent };
            }
        }
        let mut out = Vec::with_capacity(charges.len());
        for c in charges {
            let spent = current(&map, &c.key).saturating_add(c.amount);
            map.insert(c.key.clone(), (spent, c.ttl.map(|t| now + t)));
            out.push(Some(spent));
        }
        Reserve::Reserved { spent: out }
    }
}

impl BudgetStore for InMemoryBudgetStore {
    fn reserve(&self, charges: &[BudgetCharge]) -> ReserveFuture {
        let r = self.try_reserve(charges);
        Box::pin(std::future::ready(Ok(r)))
    }

    fn reserve_now(&self, charges: &[BudgetCharge]) -> Option<Result<Reserve, LlmError>> {
        Some(Ok(self.try_reserve(charges)))
    }

    fn settle(&self, settles: &[BudgetSettle]) {
        let now = Instant::now();
        let mut map = self.lock();
        for s in settles {
            let e = map
                .entry(s.key.clone())
                .or_insert((0, s.ttl.map(|t| now + t)));
            if e.1.is_some_and(|exp| now >= exp) {
                // The window ended since the reservation: the correction belongs to a
                // period that is over.
                continue;
            }
            e.0 = if s.delta >= 0 {
                e.0.saturating_add(s.delta.unsigned_abs())
            } else {
                e.0.saturating_sub(s.delta.unsigned_abs())
            };
        }
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
