//! Answer identical deterministic requests from a cache.
//!
//! [`CacheLayer`] wraps an LLM service in [`Cache`]. A request's [`CacheKey`] is a blake3
//! hash of the fields that change the answer (see [`IGNORED_FIELDS`] for the documented
//! deny-list), scoped by [`Tenant`](crate::Tenant) and [`TaskType`](crate::TaskType), so two
//! tenants never share an entry. Answers live in a [`CacheStore`]: [`MemoryStore`] here
//! (quick_cache, bounded by bytes, per-entry TTL), or `llm_tower_redis::cache::RedisCacheStore`
//! to share one cache between replicas.
//!
//! # Rules
//!
//! - **What is cached.** By default only deterministic requests: `temperature` 0, or a
//!   `seed`, or a task type marked with [`CacheLayer::cacheable_task`] (replace the rule
//!   with [`CacheLayer::cacheable_when`]). Everything else bypasses the cache.
//! - **TTL** per task type ([`CacheLayer::task_ttl`]; e.g. explanations 24–72 h,
//!   recommendations 5–30 min, personalised answers `Duration::ZERO` = never cached),
//!   else [`CacheLayer::default_ttl`] (1 h).
//! - **Per-request policy**, the [`CachePolicy`](crate::CachePolicy) extension (the HTTP
//!   surface maps `Cache-Control` to it): `NoCache` skips the lookup but stores the fresh
//!   answer; `NoStore` neither reads nor writes; `Force` caches a non-deterministic
//!   request (a zero TTL still wins).
//! - **Status.** [`ResponseMeta::cache`](crate::ResponseMeta) is `Hit`, `Miss` or `Bypass`
//!   (`NoCache` and `NoStore` are bypasses). A hit reports the original call's usage in
//!   `meta.usage` (never zeros) with its provider and model, so a cost layer can count
//!   the tokens saved.
//! - **Coalescing.** Concurrent identical misses make one upstream call: the first is the
//!   leader, the others wait for its answer and report `Hit`
//!   ([`CacheStats::coalesced`]). If the leader fails with an upstream error, its waiters
//!   get that same error (an identical request to the same upstream a moment later would
//!   fail alike; sending N more would only add load). If the leader goes away without an
//!   answer (its caller dropped the future or the stream, or it failed with `Cancelled` or
//!   `Timeout`, which belong to its own deadline), the waiters look up again and one of
//!   them becomes the next leader. If the leader's answer cannot be shared (a stream cut
//!   short, or over [`CacheLayer::max_entry_bytes`]), each waiter calls upstream itself.
//!   A waiter never hangs on a dead leader, never waits past its
//!   [`Deadline`](crate::Deadline) (it then fails with `Timeout`), never waits longer than
//!   [`CacheLayer::coalesce_timeout`] (30 s; then it calls upstream itself, so a leader's
//!   slow-reading client or slow upstream holds no one hostage), and dropping a waiter
//!   affects no one. Waiters of
//!   a streamed answer get it when the leader's stream has ended, then replayed.
//!   Coalescing is per layer (its clones included), not across processes.
//! - **Streams.** A miss is forwarded as a stream while its chunks are copied; they are
//!   stored only once the upstream stream has ended cleanly with a finish reason on every
//!   choice (the end is delivered to the caller after the write). A stream that fails,
//!   is dropped by its caller, or ends without a finish reason is never stored, nor one
//!   whose copy outgrows [`CacheLayer::max_stream_bytes`] (8 MiB of memory) or
//!   [`CacheLayer::max_entry_bytes`]: the copy is dropped as soon as it does. A hit on
//!   a streaming request is replayed chunk by chunk (a stored complete answer through
//!   [`ChatResponse::to_chunks`](crate::ChatResponse::to_chunks)); a stored stream served
//!   to a non-streaming request is assembled with
//!   [`StreamAccumulator`](crate::StreamAccumulator). `stream` is not part of the key, so
//!   both kinds of request share entries.
//! - **Embeddings** ([`ChatRequest::embeddings`](crate::ChatRequest::embeddings)) are
//!   deterministic, so the default rule caches them. Each input is an entry of its own
//!   ([`CacheKey::for_embedding`]; `encoding_format` is not part of it): the inputs found
//!   are served from the store, the upstream is asked only for the others (one call, in
//!   their order), and the answer is put back together in input order. Each input counts
//!   once in the hit and miss counters. All found: `Hit`, with the original usage.
//!   Some or none found: `Miss`; `meta.usage` is what the upstream call used (what was
//!   paid for), the body's usage adds the cached inputs' shares. An upstream reports one
//!   token count per call, which is split over its inputs by size. Identical in-flight
//!   embeddings are not coalesced.
//! - **Errors.** Inner-service errors are never cached. The cache fails open: a store error
//!   or a store call slower than [`CacheLayer::store_timeout`] counts as a miss (served
//!   from upstream) and in [`CacheStats::errors`].
//! - A complete answer is written before the response is returned, bounded by the store
//!   timeout (no background task is spawned).
//!
//! # Readiness
//!
//! `poll_ready` delegates to the inner service (see [`Cache`]).
//!
//! # Example
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), llm_tower::LlmError> {
//! use std::time::Duration;
//! use llm_tower::cache::CacheLayer;
//! use llm_tower::{CacheStatus, ChatRequest, ChatResponse, LlmError, LlmResponse, LlmServiceBuilderExt, Message};
//! use tower::{Service, ServiceBuilder, ServiceExt};
//!
//! let cache = CacheLayer::in_memory(64 * 1024 * 1024) // 64 MiB
//!     .task_ttl("explain", Duration::from_secs(48 * 3600))
//!     .task_ttl("recommend", Duration::from_secs(10 * 60))
//!     .task_ttl("personal", Duration::ZERO);
//! let stats = cache.stats();
//! let mut svc = ServiceBuilder::new()
//!     .cache(cache)
//!     .service_fn(|req: ChatRequest| async move {
//!         Ok::<_, LlmError>(LlmResponse::complete(ChatResponse::from_text(req.model, "42")))
//!     });
//!
//! let mut req = ChatRequest::new("gpt-4o-mini", vec![Message::user("6 x 7?")])
//!     .with_task_type("explain")
//!     .with_tenant("acme");
//! req.temperature = Some(0.into());
//!
//! let first = svc.ready().await?.call(req.clone()).await?;
//! assert_eq!(first.meta.cache, CacheStatus::Miss);
//! let second = svc.ready().await?.call(req).await?;
//! assert_eq!(second.meta.cache, CacheStatus::Hit);
//! assert_eq!(second.into_complete().await?.text(), "42");
//! assert_eq!((stats.hits(), stats.misses()), (1, 1));
//! # Ok(()) }
//! ```

mod embed;
mod flight;
mod future;
mod key;
mod layer;
mod memory;
mod shared;
mod stats;
mod store;

pub use future::ResponseFuture;
pub use key::{CacheKey, IGNORED_FIELDS};
pub use layer::{
    Cache, CacheLayer, DEFAULT_COALESCE_TIMEOUT, DEFAULT_MAX_STREAM_BYTES, DEFAULT_MEMORY_BYTES,
};
pub use memory::MemoryStore;
pub use stats::{CacheStats, CacheStatsSnapshot};
pub use store::{CacheStore, CachedBody, CachedEntry, StoreError, StoreFuture};
