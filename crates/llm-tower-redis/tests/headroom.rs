//! Provider headroom shared through Redis: what one replica learns, the others see; a
//! Redis stall never blocks the tracker, and what it missed is written once Redis answers.

mod common;
use common::server::RedisServer;
use common::{conn, unique_prefix};

use std::time::Duration;

use llm_tower::RateLimitHeadroom;
use llm_tower::rate_limit::HeadroomTracker;
use llm_tower_redis::headroom::{SharedHeadroom, share};
use llm_tower_redis::{RedisConn, RedisOptions};

const REFRESH: Duration = Duration::from_millis(20);

fn requests_left(n: u64, reset: Duration) -> RateLimitHeadroom {
    RateLimitHeadroom {
        remaining_requests: Some(n),
        reset_requests: Some(reset),
        ..RateLimitHeadroom::default()
    }
}

/// Polls `f` every 10 ms until it holds, for at most 10 s (a bound for a loaded machine,
/// not a speed assertion).
async fn eventually(what: &str, f: impl Fn() -> bool) {
    for _ in 0..1000 {
        if f() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("never happened: {what}");
}

async fn replica(prefix: &str, min_requests: u64) -> SharedHeadroom {
    share(
        conn(prefix).await,
        "prov",
        HeadroomTracker::new(min_requests, 0),
        REFRESH,
    )
}

#[tokio::test]
#[ignore = "needs REDIS_URL (run with -- --include-ignored; .ci/run sets it)"]
async fn what_one_replica_observes_the_other_refuses_on() {
    let prefix = unique_prefix("headroom-shared");
    let a = replica(&prefix, 5).await;
    let b = replica(&prefix, 5).await;
    assert_eq!(b.tracker().check(0), Ok(()));

    a.tracker()
        .observe(&requests_left(3, Duration::from_secs(30)));
    eventually("B refuses on A's observation", || {
        b.tracker().check(0).is_err()
    })
    .await;
    let (req, _) = b.tracker().remaining();
    assert_eq!(req, Some(3));
    let retry = b.tracker().check(0).unwrap_err();
    assert!(retry <= Duration::from_secs(30), "{retry:?}");

    // A higher count from B in the same window does not raise the shared one.
    b.tracker()
        .observe(&requests_left(40, Duration::from_secs(30)));
    let n = b.refreshes();
    eventually("B flushed and read back", || b.refreshes() >= n + 2).await;
    assert_eq!(b.tracker().remaining().0, Some(3));
    let mut c = redis::Client::open(std::env::var("REDIS_URL").unwrap())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let stored: Option<u64> = redis::cmd("GET")
        .arg(format!("{prefix}hr:v1:{{prov}}:r"))
        .query_async(&mut c)
        .await
        .unwrap();
    assert_eq!(stored, Some(3));
    assert_eq!(a.errors() + b.errors(), 0);

    // A lower count from B reaches A.
    b.tracker()
        .observe(&requests_left(1, Duration::from_secs(30)));
    eventually("A sees B's lower count", || {
        a.tracker().remaining().0 == Some(1)
    })
    .await;
}

#[tokio::test]
#[ignore = "needs REDIS_URL (run with -- --include-ignored; .ci/run sets it)"]
async fn shared_count_expires_with_the_providers_reset() {
    let prefix = unique_prefix("headroom-reset");
    let a = replica(&prefix, 5).await;
    let b = replica(&prefix, 5).await;
    a.tracker()
        .observe(&requests_left(0, Duration::from_millis(300)));
    eventually("B refuses", || b.tracker().check(0).is_err()).await;
    // After the reset, nothing stale comes back from Redis.
    eventually("B admits again after the reset", || {
        b.tracker().check(0).is_ok()
    })
    .await;
    let n = b.refreshes();
    eventually("B read Redis again", || b.refreshes() >= n + 2).await;
    assert_eq!(b.tracker().check(0), Ok(()));
}

#[tokio::test]
#[ignore = "needs REDIS_URL (run with -- --include-ignored; .ci/run sets it)"]
async fn task_stops_with_the_tracker() {
    let prefix = unique_prefix("headroom-stop");
    let a = replica(&prefix, 1).await;
    let weak = a.tracker().downgrade();
    let probe = a.clone();
    eventually("A refreshes", || probe.refreshes() >= 1).await;
    drop(a);
    drop(probe);
    // The task held no strong reference: the tracker is gone.
    assert!(weak.upgrade().is_none());
}

#[tokio::test]
#[ignore = "needs redis-server on PATH (run with -- --include-ignored; .ci/run does)"]
async fn a_paused_redis_never_blocks_and_the_observation_lands_after() {
    let server = RedisServer::start().await;
    let opts = RedisOptions {
        op_timeout: Duration::from_millis(100),
        failure_threshold: 3,
        cooldown: Duration::from_millis(300),
        key_prefix: "t:".to_owned(),
    };
    let conn_a = RedisConn::connect(&server.url(), opts.clone())
        .await
        .unwrap();
    let conn_b = RedisConn::connect(&server.url(), opts).await.unwrap();
    let a = share(conn_a, "prov", HeadroomTracker::new(5, 0), REFRESH);
    let b = share(conn_b, "prov", HeadroomTracker::new(5, 0), REFRESH);
    eventually("both refresh", || a.refreshes() >= 1 && b.refreshes() >= 1).await;

    // Every client paused (the real stall): the trackers answer from the local view.
    server.run(&["CLIENT", "PAUSE", "1500", "ALL"]).await;
    a.tracker()
        .observe(&requests_left(2, Duration::from_secs(30)));
    assert!(
        a.tracker().check(0).is_err(),
        "A's own view applies at once"
    );
    assert_eq!(b.tracker().check(0), Ok(()), "B has not heard yet");
    eventually("A's calls time out", || a.errors() >= 1).await;
    assert!(b.tracker().admit(0).is_ok(), "no request waits on Redis");

    // Redis answers again: A's kept observation is written, and B refuses on it.
    eventually("B refuses once Redis answers", || {
        b.tracker().check(0).is_err()
    })
    .await;
    assert_eq!(b.tracker().remaining().0, Some(2));
}
