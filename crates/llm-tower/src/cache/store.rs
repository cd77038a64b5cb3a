//! The store trait and what it stores.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use futures_util::StreamExt;
use llm_tower_core::{
    CacheStatus, ChatChunk, ChatResponse, ChunkStream, EncodedResponse, LlmError, LlmResponse,
    ResponseBody, ResponseMeta, StreamAccumulator, StreamEvent, Usage,
};
use serde::{Deserialize, Serialize};

use super::CacheKey;

/// A boxed, `Send` future, as [`CacheStore`] methods return it (the trait stays
/// object-safe, so a layer can hold any store as `Arc<dyn CacheStore>`).
pub type StoreFuture<T> = Pin<Box<dyn Future<Output = Result<T, StoreError>> + Send + 'static>>;

/// Why a store operation failed. The cache fails open: the layer treats it as a miss,
/// serves from upstream and counts it in [`CacheStats::errors`](super::CacheStats::errors).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreError {
    message: String,
}

impl StoreError {
    /// An error with this message. Never put secrets (URLs with passwords) in it.
    pub fn new(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
        }
    }

    /// The message.
    pub fn message(&self) -> &str {
        &self.message
    }
}

impl fmt::Display for StoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "cache store error: {}", self.message)
    }
}

impl std::error::Error for StoreError {}

/// Where cached answers live. Implemented by [`MemoryStore`](super::MemoryStore) here and
/// by `llm_tower_redis::cache::RedisCacheStore`.
///
/// Contract: `get` returns `Ok(None)` for a missing or expired entry; `put` stores `entry`
/// under `key` for `ttl` (always > 0), replacing any previous entry. Both may fail; the
/// layer then serves from upstream (fails open). The layer bounds each call with its own
/// timeout ([`CacheLayer::store_timeout`](super::CacheLayer::store_timeout)), so a store
/// need not, but a network store should still bound its own I/O.
///
/// ```
/// use std::sync::{Arc, Mutex};
/// use std::collections::HashMap;
/// use std::time::Duration;
/// use llm_tower::cache::{CacheKey, CacheStore, CachedEntry, StoreFuture};
///
/// /// A toy store without expiry or bounds.
/// #[derive(Debug, Default)]
/// struct MapStore(Arc<Mutex<HashMap<CacheKey, Arc<CachedEntry>>>>);
///
/// impl CacheStore for MapStore {
///     fn get(&self, key: CacheKey) -> StoreFuture<Option<Arc<CachedEntry>>> {
///         let hit = self.0.lock().unwrap().get(&key).cloned();
///         Box::pin(async move { Ok(hit) })
///     }
///     fn put(&self, key: CacheKey, entry: Arc<CachedEntry>, _ttl: Duration) -> StoreFuture<()> {
///         self.0.lock().unwrap().insert(key, entry);
///         Box::pin(async { Ok(()) })
///     }
/// }
/// let _layer = llm_tower::cache::CacheLayer::new(MapStore::default());
/// ```
pub trait CacheStore: Send + Sync + 'static {
    /// Reads the entry stored under `key`.
    fn get(&self, key: CacheKey) -> StoreFuture<Option<Arc<CachedEntry>>>;

    /// Stores `entry` under `key` for `ttl`.
    fn put(&self, key: CacheKey, entry: Arc<CachedEntry>, ttl: Duration) -> StoreFuture<()>;

    /// A synchronous lookup for stores that can answer without I/O: `Some(result)` if the
    /// store answered now, `None` to fall back to [`get`](Self::get). The layer uses it
    /// to answer a hit from `call` without allocating a future. Default: `None`.
    fn get_now(&self, key: &CacheKey) -> Option<Result<Option<Arc<CachedEntry>>, StoreError>> {
        let _ = key;
        None
    }
}

impl<T: CacheStore + ?Sized> CacheStore for Arc<T> {
    fn get(&self, key: CacheKey) -> StoreFuture<Option<Arc<CachedEntry>>> {
        (**self).get(key)
    }
    fn put(&self, key: CacheKey, entry: Arc<CachedEntry>, ttl: Duration) -> StoreFuture<()> {
        (**self).put(key, entry, ttl)
    }
    fn get_now(&self, key: &CacheKey) -> Option<Result<Option<Arc<CachedEntry>>, StoreError>> {
        (**self).get_now(key)
    }
}

/// Typical JSON size of a usage object with its details (the size estimate of entries).
const USAGE_JSON_ESTIMATE: usize = 260;
/// JSON size of an entry's keys and punctuation around the body (the size estimate).
const ENVELOPE_JSON: usize = 32;

/// The stored body: a complete response, or the chunks of a streamed one.
// Entries live behind an `Arc`, so the size of the enum itself does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum CachedBody {
    /// A complete response.
    #[serde(rename = "r")]
    Complete(ChatResponse),
    /// A complete response as its upstream's JSON document.
    #[serde(rename = "e")]
    Encoded(EncodedResponse),
    /// Every chunk of a stream that completed, in order; chunks an upstream sent in the
    /// client's format stay in its JSON (they serialize as the same chunks either way).
    #[serde(rename = "c")]
    Chunks(Vec<StreamEvent>),
    /// The vector of one embeddings input ([`CacheKey::for_embedding`]).
    #[serde(rename = "v")]
    Embedding(Vec<f32>),
}

/// A cached answer: the body plus what a hit reports in [`ResponseMeta`] (the original
/// usage, so cost layers can count the tokens saved, and who served it first).
/// Serializes to compact JSON with one-letter field names.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CachedEntry {
    /// The answer.
    #[serde(rename = "b")]
    pub body: CachedBody,
    /// The usage of the original call.
    #[serde(rename = "u", default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
    /// The provider that served the original call.
    #[serde(rename = "p", default, skip_serializing_if = "Option::is_none")]
    pub provider: Option<String>,
    /// The model that served the original call.
    #[serde(rename = "m", default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// [`approx_size`](Self::approx_size), computed once: the layer checks it against the
    /// entry limit on every miss.
    #[serde(skip)]
    size: OnceLock<usize>,
}

/// Equality of what is stored; the memoized size is not part of it.
impl PartialEq for CachedEntry {
    fn eq(&self, other: &Self) -> bool {
        self.body == other.body
            && self.usage == other.usage
            && self.provider == other.provider
            && self.model == other.model
    }
}

impl CachedEntry {
    /// An entry for a complete response and the meta it was served with. When the meta
    /// has the upstream body's size ([`ResponseMeta::body_bytes`]), the entry's
    /// [`approx_size`](Self::approx_size) is derived from it instead of serializing.
    pub fn complete(response: ChatResponse, meta: &ResponseMeta) -> Self {
        let usage = meta.usage.clone().or_else(|| response.usage.clone());
        Self::sized(CachedBody::Complete(response), usage, meta, meta.body_bytes)
    }

    /// An entry for a complete response kept as its upstream's JSON (stored as it is,
    /// weighed by its length) and the meta it was served with.
    pub fn encoded(response: EncodedResponse, meta: &ResponseMeta) -> Self {
        let usage = meta.usage.clone().or_else(|| response.usage().cloned());
        let len = response.json().len();
        Self::sized(CachedBody::Encoded(response), usage, meta, Some(len))
    }

    fn sized(
        body: CachedBody,
        usage: Option<Usage>,
        meta: &ResponseMeta,
        json: Option<usize>,
    ) -> Self {
        let entry = Self {
            body,
            usage,
            provider: meta.provider.as_deref().map(str::to_owned),
            model: meta.model.clone(),
            size: OnceLock::new(),
        };
        if let Some(body) = json {
            // The body once more for the usage, plus the names and the envelope.
            let usage = entry.usage.as_ref().map_or(0, |_| USAGE_JSON_ESTIMATE);
            let names = entry.provider.as_ref().map_or(0, String::len)
                + entry.model.as_ref().map_or(0, String::len);
            let _ = entry.size.set(body + usage + names + ENVELOPE_JSON);
        }
        entry
    }

    /// An entry for the chunks of a completed stream.
    pub fn chunks(chunks: Vec<ChatChunk>, usage: Option<Usage>, meta: &ResponseMeta) -> Self {
        Self::events(
            chunks.into_iter().map(StreamEvent::from).collect(),
            usage,
            meta,
        )
    }

    /// An entry for the events of a completed stream, typed or in their upstream's JSON
    /// (stored as they are).
    pub fn events(chunks: Vec<StreamEvent>, usage: Option<Usage>, meta: &ResponseMeta) -> Self {
        let usage = usage.or_else(|| chunks.iter().rev().find_map(|c| c.usage().cloned()));
        Self {
            body: CachedBody::Chunks(chunks),
            usage,
            provider: meta.provider.as_deref().map(str::to_owned),
            model: meta.model.clone(),
            size: OnceLock::new(),
        }
    }

    /// An entry for one embeddings input: its vector and its share of the call's usage.
    pub fn embedding(vector: Vec<f32>, usage: Usage, meta: &ResponseMeta) -> Self {
        Self {
            body: CachedBody::Embedding(vector),
            usage: Some(usage),
            provider: meta.provider.as_deref().map(str::to_owned),
            model: meta.model.clone(),
            size: OnceLock::new(),
        }
    }

    /// Whether the answer is complete enough to be served again: at least one choice,
    /// and (for a stream) every choice ended with a finish reason. A stream cut short
    /// without an error is therefore never stored.
    pub fn is_complete(&self) -> bool {
        match &self.body {
            CachedBody::Complete(r) => !r.choices.is_empty(),
            CachedBody::Encoded(r) => r.choice_count() > 0,
            CachedBody::Embedding(v) => !v.is_empty(),
            CachedBody::Chunks(chunks) => {
                // The choice indices seen and finished, without decoding; a choice index of
                // 64 or more takes the accumulator.
                let sets = chunks.iter().try_fold((0u64, 0u64), |(seen, fin), c| {
                    let (s, f) = c.choice_indices()?;
                    Some((seen | s, fin | f))
                });
                if let Some((seen, finished)) = sets {
                    return seen != 0 && seen & !finished == 0;
                }
                let Ok(r) = accumulate(chunks) else {
                    return false;
                };
                !r.choices.is_empty() && r.choices.iter().all(|c| c.finish_reason.is_some())
            }
        }
    }

    /// Approximate serialized size in bytes (what a network store holds; the in-memory
    /// store weighs [`memory_size`](Self::memory_size) instead): its compact JSON length, or,
    /// for an entry made from a response whose body size was known, an estimate of it
    /// from that size (serializing an answer only to weigh it cost as much as encoding
    /// it for the client).
    pub fn approx_size(&self) -> usize {
        *self.size.get_or_init(|| self.json_len())
    }

    /// Bytes the entry occupies in this process: the `Arc` block holding it and every
    /// allocation its answer, usage and names own (strings, vectors, maps, the JSON
    /// document of an encoded answer), each rounded up as allocators do. The in-memory
    /// store weighs entries by this (plus its own per-entry overhead), so its bound is a
    /// bound on memory, not on JSON bytes.
    pub fn memory_size(&self) -> usize {
        use crate::mem::{Heap, alloc};
        let body = match &self.body {
            CachedBody::Complete(r) => r.heap(),
            CachedBody::Encoded(r) => r.heap(),
            CachedBody::Chunks(c) => c.heap(),
            CachedBody::Embedding(v) => alloc(v.capacity() * size_of::<f32>()),
        };
        // The `Arc`'s two counters and the entry inline.
        alloc(2 * size_of::<usize>() + size_of::<Self>())
            + body
            + self.usage.heap()
            + self.provider.heap()
            + self.model.heap()
    }

    /// The entry with an encoded answer's JSON copied into an allocation of its own size.
    /// An upstream's body is often a slice of a larger read buffer, which the slice keeps
    /// alive whole; a store that keeps entries in memory stores this copy instead.
    /// `None` when there is nothing to compact.
    pub fn compacted(&self) -> Option<Self> {
        let body = match &self.body {
            CachedBody::Encoded(r) => CachedBody::Encoded(r.compacted()),
            CachedBody::Chunks(c)
                if c.iter()
                    .any(|e| matches!(e, StreamEvent::Encoded(_) | StreamEvent::Native(_))) =>
            {
                CachedBody::Chunks(StreamEvent::compacted(c))
            }
            _ => return None,
        };
        Some(Self {
            body,
            usage: self.usage.clone(),
            provider: self.provider.clone(),
            model: self.model.clone(),
            size: self.size.clone(),
        })
    }

    fn json_len(&self) -> usize {
        struct Count(usize);
        impl std::io::Write for Count {
            fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
                self.0 += buf.len();
                Ok(buf.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let mut c = Count(0);
        // Serializing these plain data types cannot fail; fall back to a guess if it did.
        match serde_json::to_writer(&mut c, self) {
            Ok(()) => c.0,
            Err(_) => 4096,
        }
    }

    /// The meta a hit reports: cache status [`CacheStatus::Hit`], the original usage,
    /// provider and model.
    pub fn hit_meta(&self) -> ResponseMeta {
        ResponseMeta {
            provider: self.provider.as_deref().map(Arc::from),
            model: self.model.clone(),
            cache: CacheStatus::Hit,
            usage: self.usage.clone(),
            ..ResponseMeta::default()
        }
    }

    /// The answer as a response for a request that does (`stream`) or does not stream: a
    /// stored stream is replayed chunk by chunk or assembled with [`StreamAccumulator`];
    /// a stored complete response is returned as is or replayed through
    /// [`ChatResponse::to_chunks`]; a stored JSON document likewise (decoded only to be
    /// replayed, or when the usage must be filled in).
    pub fn to_response(&self, stream: bool) -> LlmResponse {
        let meta = self.hit_meta();
        let body = match (&self.body, stream) {
            (CachedBody::Complete(r), false) => {
                ResponseBody::Complete(Box::new(self.with_usage(r.clone())))
            }
            (CachedBody::Complete(r), true) => {
                ResponseBody::Stream(replay(self.with_usage(r.clone()).to_chunks()))
            }
            // Forwarded as stored unless the usage must be filled in.
            (CachedBody::Encoded(r), false) if r.usage().is_some() || self.usage.is_none() => {
                ResponseBody::Encoded(r.clone())
            }
            (CachedBody::Encoded(r), stream) => match r.decode() {
                Ok(r) if stream => ResponseBody::Stream(replay(self.with_usage(r).to_chunks())),
                Ok(r) => ResponseBody::Complete(Box::new(self.with_usage(r))),
                Err(e) => {
                    ResponseBody::Stream(ChunkStream::new(futures_util::stream::iter([Err(e)])))
                }
            },
            (CachedBody::Chunks(c), true) => ResponseBody::Stream(ChunkStream::from_events(
                futures_util::stream::iter(c.clone()).map(Ok),
            )),
            (CachedBody::Chunks(c), false) => match accumulate(c) {
                Ok(r) => ResponseBody::Complete(Box::new(self.with_usage(r))),
                Err(e) => {
                    ResponseBody::Stream(ChunkStream::new(futures_util::stream::iter([Err(e)])))
                }
            },
            // Embedding entries have keys of their own and are read by the embeddings
            // path only; a chat request cannot reach one.
            (CachedBody::Embedding(_), _) => ResponseBody::Stream(ChunkStream::new(
                futures_util::stream::iter([Err(llm_tower_core::LlmError::internal(
                    "a cached embedding served to a chat request",
                ))]),
            )),
        };
        LlmResponse { body, meta }
    }
}

impl CachedEntry {
    /// `r` with the entry's usage filled in if it had none, so the body (or its usage
    /// chunk) reports the original usage like `meta.usage` does.
    fn with_usage(&self, mut r: ChatResponse) -> ChatResponse {
        if r.usage.is_none() {
            r.usage.clone_from(&self.usage);
        }
        r
    }
}

/// The response the events of a stream make up (decoding those still encoded).
fn accumulate(events: &[StreamEvent]) -> Result<ChatResponse, LlmError> {
    let mut acc = StreamAccumulator::default();
    for e in events {
        match e {
            StreamEvent::Chunk(c) => acc.push(c),
            StreamEvent::Encoded(c) => acc.push(&c.decode()?),
            StreamEvent::Native(e) => acc.push(&e.decode()?),
        }
    }
    Ok(acc.finish())
}

fn replay(chunks: Vec<ChatChunk>) -> ChunkStream {
    ChunkStream::new(futures_util::stream::iter(chunks).map(Ok))
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use llm_tower_core::Dialect;

    #[test]
    fn an_encoded_answer_of_any_dialect_is_compacted_as_it_is() {
        let messages = br#"{"id":"msg_1","type":"message","role":"assistant","model":"claude","content":[{"type":"text","text":"hi"}],"usage":{"input_tokens":3,"output_tokens":1}}"#;
        // A slice of a larger read buffer, as an upstream's body is.
        let buffer = Bytes::from([messages.as_slice(), b"<rest of the read buffer>"].concat());
        let body = buffer.slice(..messages.len());
        let r = EncodedResponse::from_messages_json(body).unwrap();
        let entry = CachedEntry::encoded(r, &ResponseMeta::default());
        let compacted = entry.compacted().expect("an encoded answer is compacted");
        let CachedBody::Encoded(c) = &compacted.body else {
            panic!("still encoded");
        };
        assert_eq!(c.dialect(), Dialect::Messages);
        assert_eq!(c.json().as_ref(), messages.as_slice());
        // Its own allocation, not the read buffer's.
        assert_ne!(c.json().as_ptr(), buffer.as_ptr());
        assert_eq!(compacted, entry);
    }
}
