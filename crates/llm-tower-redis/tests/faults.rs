//! Budgets and token limits stay exact when a real Redis stalls, restarts empty or loses
//! answers, and the breaker recovers. Each test starts its own `redis-server` on a free
//! port (see `common::server`), so faults never touch a shared Redis.
//!
//! After every fault the ledger must say: settled = the sum of the actual costs of the
//! requests that ran (each counted once, never an estimate that was not settled, never a
//! negative correction), no hold left open, and the breaker closed again.

mod common;
use common::server::RedisServer;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use llm_tower::cost::{
    Budget, BudgetCharge, BudgetStore, BudgetWindow, CostLayer, Hold, ModelPrice, PriceTable,
};
use llm_tower::rate_limit::{BucketCheck, RateLimitLayer, RateLimitStore, Rule};
use llm_tower::{ChatRequest, ErrorKind, LlmError, LlmResponse, Message, Usage};
use llm_tower_redis::budget::RedisBudgetStore;
use llm_tower_redis::rate_limit::RedisRateLimitStore;
use llm_tower_redis::{RedisConn, RedisOptions};
use llm_tower_test::{MockLlm, Step};
use tokio::time::Instant;
use tower::util::BoxCloneService;
use tower::{Layer, ServiceExt};

/// Estimated: 100 tokens (8 of prompt + 92 of output); used: 30.
const ESTIMATE: u64 = 100;
const USED: u64 = 30;
/// Budget prices: 1000 nano-dollars a token.
const NANO_PER_TOKEN: u64 = 1000;
/// Token bucket: room for everything, refilling ~0.001 token/s (nothing during a test).
const BUCKET_LIMIT: u64 = 1_000_000;
const BUCKET_WINDOW: Duration = Duration::from_secs(1_000_000_000);
/// A request that has not finished after this is hung (far above any timeout in play).
const HANG: Duration = Duration::from_secs(10);

const OP_TIMEOUT: Duration = Duration::from_millis(100);
const COOLDOWN: Duration = Duration::from_millis(500);
const UPSTREAM: Duration = Duration::from_millis(300);

#[derive(Clone, Copy, Debug, PartialEq)]
enum Kind {
    Budget,
    Tokens,
}

type Svc = BoxCloneService<ChatRequest, LlmResponse, LlmError>;

struct Harness {
    server: RedisServer,
    conn: RedisConn,
    kind: Kind,
    budget: RedisBudgetStore,
    limit: RedisRateLimitStore,
    svc: Svc,
}

fn opts() -> RedisOptions {
    RedisOptions {
        op_timeout: OP_TIMEOUT,
        failure_threshold: 3,
        cooldown: COOLDOWN,
        key_prefix: "t:".to_owned(),
    }
}

fn req() -> ChatRequest {
    let mut r = ChatRequest::new("m", vec![Message::user("Hi")]).with_tenant("acme");
    r.max_tokens = Some(92);
    r
}

impl Harness {
    async fn new(kind: Kind, fail_open: bool) -> Self {
        Self::with_upstream(kind, fail_open, UPSTREAM).await
    }

    async fn with_upstream(kind: Kind, fail_open: bool, upstream: Duration) -> Self {
        let server = RedisServer::start().await;
        let conn = RedisConn::connect(&server.url(), opts()).await.unwrap();
        let budget = RedisBudgetStore::new(conn.clone()).fail_open(fail_open);
        let limit = RedisRateLimitStore::new(conn.clone()).fail_open(fail_open);
        let mock = MockLlm::new("m").otherwise(
            Step::reply("x")
                .with_usage(Usage::new(8, 22))
                .with_latency(upstream),
        );
        let svc = match kind {
            Kind::Budget => BoxCloneService::new(
                CostLayer::new(PriceTable::new().with(
                    "m",
                    ModelPrice::per_token_nano(NANO_PER_TOKEN, NANO_PER_TOKEN, NANO_PER_TOKEN),
                ))
                .store(Arc::new(budget.clone()))
                .budget(Budget::global(u64::MAX / 4, BudgetWindow::Total).named("b"))
                .layer(mock),
            ),
            Kind::Tokens => BoxCloneService::new(
                RateLimitLayer::new()
                    .store(Arc::new(limit.clone()))
                    .rule(Rule::tokens(BUCKET_LIMIT, BUCKET_WINDOW).named("tok"))
                    .layer(mock),
            ),
        };
        Self {
            server,
            conn,
            kind,
            budget,
            limit,
            svc,
        }
    }

    /// Sends `n` requests at once; every one finishes before [`HANG`]. Returns the results.
    async fn burst(&self, n: usize) -> Vec<Result<LlmResponse, LlmError>> {
        let futs = (0..n).map(|_| {
            let svc = self.svc.clone();
            async move {
                tokio::time::timeout(HANG, svc.oneshot(req()))
                    .await
                    .expect("a request hung past its timeout")
            }
        });
        futures_util::future::join_all(futs).await
    }

    /// Sends `n` requests, all expected to succeed (fail open); returns `n`.
    async fn run_ok(&self, n: usize) -> u64 {
        for r in self.burst(n).await {
            r.expect("fail-open requests go ahead");
        }
        n as u64
    }

    /// Waits until no settlement is in flight (each is retried until it lands).
    async fn drain(&self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let n = match self.kind {
                Kind::Budget => self.budget.settles_in_flight(),
                Kind::Tokens => self.limit.settles_in_flight(),
            };
            if n == 0 {
                return;
            }
            assert!(Instant::now() < deadline, "{n} settlements still in flight");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// (settled, open holds) in units of tokens: the budget in nano-dollars / price, the
    /// bucket as what it lacks to be full.
    async fn ledger(&self) -> (u64, u64) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match read_ledger(self.kind, &self.budget, &self.limit).await {
                Ok(v) => return v,
                // The breaker may still be open from the fault: wait for it.
                Err(e) => {
                    assert!(Instant::now() < deadline, "ledger unreadable: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }

    /// After a fault: settlements land, and then the ledger holds exactly the actual usage
    /// of the `ran` requests, with no hold open.
    async fn assert_exact(&self, ran: u64) {
        self.drain().await;
        assert_eq!(
            self.ledger().await,
            (ran * USED, 0),
            "{:?}: {ran} requests",
            self.kind
        );
    }

    /// Once Redis answers, the breaker is closed within one cooldown (plus the operation
    /// timeout of a call that failed just before Redis answered, and of the probe).
    async fn assert_breaker_recovers(&self) {
        self.server.wait_answering().await;
        let deadline = Instant::now() + COOLDOWN + OP_TIMEOUT * 2 + Duration::from_millis(200);
        loop {
            // A call is needed for the probe.
            let _ = self.ledger_once().await;
            if self.conn.is_closed() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "breaker still open one cooldown after Redis answers again"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn ledger_once(&self) -> bool {
        match self.kind {
            Kind::Budget => self.budget.ledger("b|total").await.is_ok(),
            Kind::Tokens => self
                .limit
                .bucket("tok", BUCKET_LIMIT, BUCKET_WINDOW)
                .await
                .is_ok(),
        }
    }

    /// Samples the ledger every 20 ms from another connection until stopped: what is
    /// settled must never go down.
    async fn monitor(&self) -> Monitor {
        let opts = RedisOptions {
            op_timeout: Duration::from_secs(5),
            failure_threshold: 1000,
            ..opts()
        };
        let conn = RedisConn::connect(&self.server.url(), opts).await.unwrap();
        let (budget, limit) = (
            RedisBudgetStore::new(conn.clone()).fail_closed(),
            RedisRateLimitStore::new(conn).fail_closed(),
        );
        let stop = Arc::new(AtomicBool::new(false));
        let kind = self.kind;
        let flag = stop.clone();
        let task = tokio::spawn(async move {
            let mut seen = Vec::new();
            while !flag.load(Ordering::SeqCst) {
                if let Ok((settled, _)) = read_ledger(kind, &budget, &limit).await {
                    seen.push(settled);
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            seen
        });
        Monitor { stop, task }
    }

    fn store_errors(&self) -> u64 {
        match self.kind {
            Kind::Budget => self.budget.store_errors(),
            Kind::Tokens => self.limit.store_errors(),
        }
    }

    /// Sends a command that stops Redis for a while, waiting for it to be accepted.
    async fn pause(&self, ms: u64) {
        self.server
            .run(&["CLIENT", "PAUSE", &ms.to_string(), "ALL"])
            .await;
    }
}

struct Monitor {
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<Vec<u64>>,
}

impl Monitor {
    async fn assert_never_decreased(self) {
        self.stop.store(true, Ordering::SeqCst);
        let seen = self.task.await.unwrap();
        assert!(seen.len() > 10, "{} samples", seen.len());
        for w in seen.windows(2) {
            assert!(w[0] <= w[1], "settled went down: {} -> {}", w[0], w[1]);
        }
    }
}

/// (settled, open holds), in tokens and holds.
async fn read_ledger(
    kind: Kind,
    budget: &RedisBudgetStore,
    limit: &RedisRateLimitStore,
) -> Result<(u64, u64), llm_tower_redis::RedisStoreError> {
    match kind {
        Kind::Budget => budget.ledger("b|total").await.map(|l| {
            assert_eq!(l.settled % NANO_PER_TOKEN, 0);
            (
                l.settled / NANO_PER_TOKEN,
                l.held / NANO_PER_TOKEN / ESTIMATE,
            )
        }),
        Kind::Tokens => limit
            .bucket("tok", BUCKET_LIMIT, BUCKET_WINDOW)
            .await
            .map(|b| {
                let taken = (BUCKET_LIMIT as f64 - b.level).round() as u64;
                (taken.saturating_sub(b.open_holds * ESTIMATE), b.open_holds)
            }),
    }
}

async fn stall_during_reserve(kind: Kind, pause_ms: u64) {
    let h = Harness::new(kind, true).await;
    let monitor = h.monitor().await;
    let mut ran = h.run_ok(8).await;
    h.assert_exact(ran).await;
    // Redis stops; the reservations sent now time out, the requests go ahead, and Redis
    // runs the queued scripts when it resumes.
    h.pause(pause_ms).await;
    ran += h.run_ok(8).await;
    assert!(h.store_errors() >= 8, "the reservations failed");
    // While the breaker is open (or just after), more requests: unreserved, but recorded.
    ran += h.run_ok(8).await;
    h.assert_breaker_recovers().await;
    h.assert_exact(ran).await;
    // Quiet: nothing moves by itself.
    tokio::time::sleep(Duration::from_millis(500)).await;
    ran += h.run_ok(8).await;
    h.assert_exact(ran).await;
    monitor.assert_never_decreased().await;
}

#[tokio::test]
#[ignore = "needs redis-server on PATH (run with -- --include-ignored; .ci/run does)"]
async fn budget_stall_during_reserve_long() {
    // Longer than the reservation deadline: the queued reservations are no-ops.
    stall_during_reserve(Kind::Budget, 2000).await;
}

#[tokio::test]
#[ignore = "needs redis-server on PATH (run with -- --include-ignored; .ci/run does)"]
async fn budget_stall_during_reserve_short() {
    // Shorter: the queued reservations land late, and their settlements replace them.
    stall_during_reserve(Kind::Budget, 600).await;
}

#[tokio::test]
#[ignore = "needs redis-server on PATH (run with -- --include-ignored; .ci/run does)"]
async fn tokens_stall_during_reserve_long() {
    stall_during_reserve(Kind::Tokens, 2000).await;
}

#[tokio::test]
#[ignore = "needs redis-server on PATH (run with -- --include-ignored; .ci/run does)"]
async fn tokens_stall_during_reserve_short() {
    stall_during_reserve(Kind::Tokens, 600).await;
}

async fn stall_during_settle(kind: Kind) {
    let h = Harness::new(kind, true).await;
    let monitor = h.monitor().await;
    // The reservations land; Redis sleeps while the upstream answers, so the settlements
    // time out (maybe after landing) and are sent again.
    let burst = h.burst(8);
    let sleeper = async {
        tokio::time::sleep(UPSTREAM / 2).await;
        h.server.send(&["DEBUG", "SLEEP", "1.5"]);
    };
    let (results, ()) = tokio::join!(burst, sleeper);
    for r in results {
        r.unwrap();
    }
    h.assert_breaker_recovers().await;
    h.assert_exact(8).await;
    assert!(
        h.store_errors() > 0,
        "settlements failed and were sent again"
    );
    monitor.assert_never_decreased().await;
}

#[tokio::test]
#[ignore = "needs redis-server on PATH (run with -- --include-ignored; .ci/run does)"]
async fn budget_stall_during_settle() {
    stall_during_settle(Kind::Budget).await;
}

#[tokio::test]
#[ignore = "needs redis-server on PATH (run with -- --include-ignored; .ci/run does)"]
async fn tokens_stall_during_settle() {
    stall_during_settle(Kind::Tokens).await;
}

async fn restart_without_data(kind: Kind) {
    let h = Harness::new(kind, true).await;
    let before = h.run_ok(8).await;
    h.assert_exact(before).await;
    // Requests in flight while Redis restarts empty: reserved before, settled after.
    let burst = h.burst(8);
    let restart = async {
        tokio::time::sleep(UPSTREAM / 2).await;
        h.server.kill();
    };
    let (results, ()) = tokio::join!(burst, restart);
    for r in results {
        r.unwrap();
    }
    // Requests while it is down: unreserved, settled when it is back.
    let during = h.run_ok(8).await;
    h.server.spawn().await;
    h.assert_breaker_recovers().await;
    // What was settled before the restart is gone with the data; everything after is
    // there, once, with no hold invented.
    h.assert_exact(8 + during).await;
}

#[tokio::test]
#[ignore = "needs redis-server on PATH (run with -- --include-ignored; .ci/run does)"]
async fn budget_restart_without_data() {
    restart_without_data(Kind::Budget).await;
}

#[tokio::test]
#[ignore = "needs redis-server on PATH (run with -- --include-ignored; .ci/run does)"]
async fn tokens_restart_without_data() {
    restart_without_data(Kind::Tokens).await;
}

async fn concurrent_across_fault(kind: Kind) {
    let h = Harness::new(kind, true).await;
    let monitor = h.monitor().await;
    // 64 requests, started over 640 ms; Redis pauses for 1.5 s from the 200th ms.
    let starts = (0..64u64).map(|i| {
        let svc = h.svc.clone();
        async move {
            tokio::time::sleep(Duration::from_millis(10 * i)).await;
            tokio::time::timeout(HANG, svc.oneshot(req()))
                .await
                .expect("a request hung past its timeout")
        }
    });
    let pause = async {
        tokio::time::sleep(Duration::from_millis(200)).await;
        h.pause(1500).await;
    };
    let (results, ()) = tokio::join!(futures_util::future::join_all(starts), pause);
    assert_eq!(results.iter().filter(|r| r.is_ok()).count(), 64);
    assert!(h.store_errors() > 0, "the stall was felt");
    h.assert_breaker_recovers().await;
    h.assert_exact(64).await;
    monitor.assert_never_decreased().await;
}

#[tokio::test]
#[ignore = "needs redis-server on PATH (run with -- --include-ignored; .ci/run does)"]
async fn budget_64_concurrent_across_a_stall() {
    concurrent_across_fault(Kind::Budget).await;
}

#[tokio::test]
#[ignore = "needs redis-server on PATH (run with -- --include-ignored; .ci/run does)"]
async fn tokens_64_concurrent_across_a_stall() {
    concurrent_across_fault(Kind::Tokens).await;
}

/// Opens the breaker (Redis paused), waits out the cooldown, then starts a probe and
/// cancels it: the probe slot must be free again, and the breaker closes once Redis answers.
async fn probe_cancelled(kind: Kind) {
    let h = Harness::new(kind, true).await;
    h.pause(1500).await;
    while !h.conn.is_open() {
        h.ledger_once().await;
    }
    tokio::time::sleep(COOLDOWN).await;
    assert!(
        !h.conn.is_open(),
        "cooldown over: the next call is the probe"
    );
    // The probe: Redis is still paused, so it waits; the caller gives up first.
    let probe = async {
        match kind {
            Kind::Budget => {
                let c = [BudgetCharge {
                    key: "b|total".into(),
                    limit: u64::MAX / 4,
                    amount: 1,
                    ttl: None,
                }];
                drop(
                    h.budget
                        .reserve(Hold::new(Duration::from_secs(60)), &c)
                        .await,
                );
            }
            Kind::Tokens => {
                let c = [BucketCheck {
                    key: "tok".into(),
                    limit: BUCKET_LIMIT,
                    window: BUCKET_WINDOW,
                    amount: 1,
                    held: true,
                }];
                drop(
                    h.limit
                        .acquire(Hold::new(Duration::from_secs(60)), &c)
                        .await,
                );
            }
        }
    };
    let probing = AtomicBool::new(false);
    let cancelled = tokio::time::timeout(Duration::from_millis(20), async {
        let p = probe;
        tokio::pin!(p);
        futures_util::future::poll_fn(|cx| {
            let r = p.as_mut().poll(cx);
            probing.store(h.conn.is_probing(), Ordering::SeqCst);
            r
        })
        .await;
    })
    .await;
    assert!(cancelled.is_err(), "the probe was still waiting");
    assert!(probing.load(Ordering::SeqCst), "it was the probe");
    assert!(!h.conn.is_probing(), "a cancelled probe frees the slot");
    // Redis answers again after the pause: the breaker closes within one cooldown.
    h.assert_breaker_recovers().await;
    h.assert_exact(0).await;
}

#[tokio::test]
#[ignore = "needs redis-server on PATH (run with -- --include-ignored; .ci/run does)"]
async fn budget_breaker_probe_cancelled() {
    probe_cancelled(Kind::Budget).await;
}

#[tokio::test]
#[ignore = "needs redis-server on PATH (run with -- --include-ignored; .ci/run does)"]
async fn tokens_breaker_probe_cancelled() {
    probe_cancelled(Kind::Tokens).await;
}

/// A replica that dies after reserving never settles: its holds are released at their
/// expiry (budget) or forgotten without refund (bucket), and a late settlement with the
/// id records the actual usage once.
#[tokio::test]
#[ignore = "needs redis-server on PATH (run with -- --include-ignored; .ci/run does)"]
async fn unsettled_holds_expire() {
    let h = Harness::new(Kind::Budget, false).await;
    let c = [BudgetCharge {
        key: "b|total".into(),
        limit: 10 * ESTIMATE * NANO_PER_TOKEN,
        amount: ESTIMATE * NANO_PER_TOKEN,
        ttl: None,
    }];
    let hold = Hold::new(Duration::from_millis(800));
    h.budget.reserve(hold, &c).await.unwrap();
    // Again (a retry after a lost answer): counted once.
    h.budget.reserve(hold, &c).await.unwrap();
    assert_eq!(h.ledger().await, (0, 1));
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert_eq!(h.ledger().await, (0, 0), "released at expiry");
    h.budget.settle(hold, &c, USED * NANO_PER_TOKEN);
    h.budget.settle(hold, &c, USED * NANO_PER_TOKEN);
    h.assert_exact(1).await;

    let h = Harness::new(Kind::Tokens, false).await;
    let c = [BucketCheck {
        key: "tok".into(),
        limit: BUCKET_LIMIT,
        window: BUCKET_WINDOW,
        amount: ESTIMATE,
        held: true,
    }];
    let hold = Hold::new(Duration::from_millis(800));
    h.limit.acquire(hold, &c).await.unwrap();
    h.limit.acquire(hold, &c).await.unwrap();
    let b = h
        .limit
        .bucket("tok", BUCKET_LIMIT, BUCKET_WINDOW)
        .await
        .unwrap();
    assert_eq!(
        (b.open_holds, (BUCKET_LIMIT as f64 - b.level).round() as u64),
        (1, ESTIMATE)
    );
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let b = h
        .limit
        .bucket("tok", BUCKET_LIMIT, BUCKET_WINDOW)
        .await
        .unwrap();
    assert_eq!(
        b.open_holds, 0,
        "forgotten at expiry (the take stays, and refills)"
    );
}

/// Failing closed: requests during a stall are refused promptly; a reservation that lands
/// after its request was refused is cancelled, so the ledger holds only what ran.
#[tokio::test]
#[ignore = "needs redis-server on PATH (run with -- --include-ignored; .ci/run does)"]
async fn budget_fail_closed_stall() {
    let h = Harness::new(Kind::Budget, false).await;
    let mut ran = h.run_ok(4).await;
    h.pause(600).await;
    let refused = h.burst(8).await;
    for r in &refused {
        let e = r.as_ref().expect_err("refused while Redis does not answer");
        assert_eq!(e.kind(), ErrorKind::Unavailable);
    }
    h.assert_breaker_recovers().await;
    ran += h.run_ok(4).await;
    h.assert_exact(ran).await;
}

/// A reservation that reaches Redis after its settlement (another connection, a retry) is
/// a no-op, and so is one that arrives after its hold expired.
#[tokio::test]
#[ignore = "needs redis-server on PATH (run with -- --include-ignored; .ci/run does)"]
async fn late_reservations_are_no_ops() {
    let h = Harness::new(Kind::Budget, false).await;
    let c = [BudgetCharge {
        key: "b|total".into(),
        limit: u64::MAX / 4,
        amount: ESTIMATE * NANO_PER_TOKEN,
        ttl: None,
    }];
    let hold = Hold::new(Duration::from_secs(60));
    h.budget.settle(hold, &c, USED * NANO_PER_TOKEN);
    h.drain().await;
    h.budget.reserve(hold, &c).await.unwrap();
    h.assert_exact(1).await;
    let expired = Hold {
        expires_at: Instant::now(),
        ..Hold::new(Duration::ZERO)
    };
    let late = h.budget.reserve(expired, &c).await;
    assert_eq!(late.unwrap_err().kind(), ErrorKind::Unavailable);
    h.assert_exact(1).await;

    let h = Harness::new(Kind::Tokens, false).await;
    let c = [BucketCheck {
        key: "tok".into(),
        limit: BUCKET_LIMIT,
        window: BUCKET_WINDOW,
        amount: ESTIMATE,
        held: true,
    }];
    let hold = Hold::new(Duration::from_secs(60));
    h.limit.settle(hold, &c, USED);
    h.drain().await;
    h.limit.acquire(hold, &c).await.unwrap();
    h.assert_exact(1).await;
    let expired = Hold {
        expires_at: Instant::now(),
        ..Hold::new(Duration::ZERO)
    };
    assert!(h.limit.acquire(expired, &c).await.is_err());
    h.assert_exact(1).await;
}
