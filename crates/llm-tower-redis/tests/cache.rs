//! The Redis cache store: replicas share entries; a Redis outage fails open.

mod common;
use common::{conn, unique_prefix};

use std::time::Duration;

use futures_util::StreamExt;
use llm_tower::cache::{Cache, CacheKey, CacheLayer, CacheStore};
use llm_tower::{CacheStatus, ChatRequest, LlmError, LlmResponse, Message, ResponseBody, Usage};
use llm_tower_redis::cache::RedisCacheStore;
use llm_tower_redis::{RedisConn, RedisOptions};
use llm_tower_test::{MockLlm, Step};
use tower::{Service, ServiceExt};

async fn store(prefix: &str) -> RedisCacheStore {
    RedisCacheStore::new(conn(prefix).await)
}

fn req(text: &str) -> ChatRequest {
    let mut r = ChatRequest::new("gpt-test", vec![Message::user(text)]).with_tenant("acme");
    r.temperature = Some(0.into());
    r
}

async fn call(svc: &mut Cache<MockLlm>, r: ChatRequest) -> Result<LlmResponse, LlmError> {
    svc.ready().await?.call(r).await
}

#[tokio::test]
#[ignore = "needs REDIS_URL (run with -- --include-ignored; .ci/run sets it)"]
async fn two_layers_sharing_one_redis_share_entries() {
    let prefix = unique_prefix("cache-shared");
    // Two replicas: separate connections, separate layers, separate upstreams.
    let layer_a = CacheLayer::new(store(&prefix).await);
    let layer_b = CacheLayer::new(store(&prefix).await);
    let mock_a = MockLlm::new("a").then(Step::reply("from a").with_usage(Usage::new(40, 8)));
    let mock_b = MockLlm::new("b");
    let mut a = Cache::new(mock_a.clone(), &layer_a);
    let mut b = Cache::new(mock_b.clone(), &layer_b);

    let first = call(&mut a, req("q")).await.unwrap();
    assert_eq!(first.meta.cache, CacheStatus::Miss);
    let hit = call(&mut b, req("q")).await.unwrap();
    assert_eq!(hit.meta.cache, CacheStatus::Hit);
    assert_eq!(hit.meta.usage, Some(Usage::new(40, 8)));
    assert_eq!(hit.meta.provider.as_deref(), Some("a"));
    assert_eq!(hit.into_complete().await.unwrap().text(), "from a");
    assert_eq!((mock_a.calls(), mock_b.calls()), (1, 0));
    assert_eq!(layer_b.stats().hits(), 1);
    assert_eq!(layer_a.stats().writes(), 1);

    // Another tenant does not see it.
    let other = call(&mut b, req("q").with_tenant("globex")).await.unwrap();
    assert_eq!(other.meta.cache, CacheStatus::Miss);
}

#[tokio::test]
#[ignore = "needs REDIS_URL (run with -- --include-ignored; .ci/run sets it)"]
async fn streams_round_trip_through_redis() {
    let prefix = unique_prefix("cache-stream");
    let layer_a = CacheLayer::new(store(&prefix).await);
    let layer_b = CacheLayer::new(store(&prefix).await);
    let mock = MockLlm::new("a").then(Step::stream(["Hel", "lo"]));
    let mut a = Cache::new(mock.clone(), &layer_a);
    let mut b = Cache::new(MockLlm::new("b"), &layer_b);

    let mut r = req("s");
    r.stream = Some(true);
    let resp = call(&mut a, r.clone()).await.unwrap();
    let ResponseBody::Stream(mut s) = resp.body else {
        panic!("stream expected");
    };
    while let Some(item) = s.next().await {
        item.unwrap();
    }
    // The write finished before the stream's end was delivered.
    let hit = call(&mut b, r).await.unwrap();
    assert_eq!(hit.meta.cache, CacheStatus::Hit);
    let ResponseBody::Stream(mut s) = hit.body else {
        panic!("stream expected");
    };
    let mut texts = Vec::new();
    while let Some(item) = s.next().await {
        let c = item.unwrap();
        texts.extend(
            c.choices
                .iter()
                .filter_map(|ch| ch.delta.text().map(str::to_owned)),
        );
    }
    assert_eq!(texts.concat(), "Hello");
    // Served to a non-streaming request, assembled.
    let complete = call(&mut b, req("s")).await.unwrap();
    assert_eq!(complete.into_complete().await.unwrap().text(), "Hello");
    assert_eq!(mock.calls(), 1);
}

#[tokio::test]
#[ignore = "needs REDIS_URL (run with -- --include-ignored; .ci/run sets it)"]
async fn entries_carry_a_redis_ttl_and_bad_values_are_misses() {
    let prefix = unique_prefix("cache-ttl");
    let st = store(&prefix).await;
    let layer = CacheLayer::new(st.clone()).default_ttl(Duration::from_secs(90));
    let mock = MockLlm::new("m");
    let mut svc = Cache::new(mock.clone(), &layer);
    call(&mut svc, req("t")).await.unwrap();

    let key = st.redis_key(&CacheKey::for_request(&req("t")));
    assert!(key.starts_with(&prefix));
    let pttl: i64 = st
        .conn()
        .run(|mut c| {
            let key = key.clone();
            async move { redis::cmd("PTTL").arg(key).query_async(&mut c).await }
        })
        .await
        .unwrap();
    assert!(pttl > 0 && pttl <= 90_000, "PTTL {pttl}");

    // Garbage under the key: an error (counted) and a miss, served from upstream.
    st.conn()
        .run(|mut c| {
            let key = key.clone();
            async move {
                redis::cmd("SET")
                    .arg(key)
                    .arg("not json")
                    .query_async::<()>(&mut c)
                    .await
            }
        })
        .await
        .unwrap();
    assert!(st.get(CacheKey::for_request(&req("t"))).await.is_err());
    let resp = call(&mut svc, req("t")).await.unwrap();
    assert_eq!(resp.meta.cache, CacheStatus::Miss);
    assert_eq!(layer.stats().errors(), 1);
    assert_eq!(mock.calls(), 2);
    // ... and the fresh answer replaced it.
    assert_eq!(
        call(&mut svc, req("t")).await.unwrap().meta.cache,
        CacheStatus::Hit
    );
}

#[tokio::test]
async fn a_redis_outage_fails_open() {
    // Nothing listens on port 1: every Redis call fails, then the breaker opens.
    let opts = RedisOptions {
        op_timeout: Duration::from_millis(100),
        failure_threshold: 3,
        ..RedisOptions::default()
    };
    let conn = RedisConn::connect_lazy("redis://127.0.0.1:1", opts).expect("lazy connect");
    let store = RedisCacheStore::new(conn);
    let layer = CacheLayer::new(store.clone());
    let mock = MockLlm::new("m");
    let mut svc = Cache::new(mock.clone(), &layer);
    for i in 0..5 {
        let resp = call(&mut svc, req("down"))
            .await
            .expect("served from upstream");
        assert_eq!(resp.meta.cache, CacheStatus::Miss, "request {i}");
        assert_eq!(resp.into_complete().await.unwrap().text(), "ok");
    }
    // A stream completes too.
    let mut r = req("down");
    r.stream = Some(true);
    let resp = call(&mut svc, r).await.unwrap();
    let ResponseBody::Stream(mut s) = resp.body else {
        panic!("stream expected");
    };
    while let Some(item) = s.next().await {
        item.unwrap();
    }
    assert_eq!(mock.calls(), 6);
    let errors = layer.stats().errors();
    assert!(errors >= 6, "errors counted: {errors}");
    assert!(store.conn().is_open(), "the breaker opened");
}
