//! Helpers shared by the Redis-backed tests.
#![allow(dead_code)] // each test file uses a part

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use llm_tower_redis::{RedisConn, RedisOptions};

/// `REDIS_URL`; the tests that call this are `#[ignore]`d without it and fail loudly when
/// run anyway, rather than passing without Redis.
fn redis_url() -> String {
    std::env::var("REDIS_URL")
        .expect("REDIS_URL must be set for this test (e.g. redis://127.0.0.1:6379)")
}

/// A key prefix no other test (or earlier run) uses.
pub(crate) fn unique_prefix(test: &str) -> String {
    let n = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!("llm-tower-test:{test}:{n}:")
}

/// A connection to `REDIS_URL` whose keys start with `prefix`.
pub(crate) async fn conn(prefix: &str) -> RedisConn {
    let opts = RedisOptions {
        key_prefix: prefix.to_owned(),
        op_timeout: Duration::from_millis(500),
        ..RedisOptions::default()
    };
    RedisConn::connect(&redis_url(), opts)
        .await
        .expect("connect to REDIS_URL")
}

pub(crate) mod server;
