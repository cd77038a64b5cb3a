//! `LlmResponse`, its streamed body and the stream completion hook.

use std::fmt;
use std::pin::Pin;
use std::task::{Context, Poll};

use futures_core::Stream;
use futures_util::StreamExt;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::{
    ChatChunk, ChatResponse, EmbeddingsResponse, EncodedChunk, EncodedResponse, LlmError,
    NativeEvent, ResponseMeta, Usage,
};

/// A boxed stream of typed chunks.
pub type BoxChunkStream = Pin<Box<dyn Stream<Item = Result<ChatChunk, LlmError>> + Send>>;

/// A boxed stream of events, as providers and layers produce it.
pub type BoxEventStream = Pin<Box<dyn Stream<Item = Result<StreamEvent, LlmError>> + Send>>;

/// One event of a streamed chat response: a typed [`ChatChunk`], or an [`EncodedChunk`]
/// still in the JSON its upstream sent.
///
/// Providers whose wire format is the client's (an OpenAI-compatible upstream behind an
/// OpenAI-compatible surface) produce encoded events, which an HTTP surface forwards as
/// they came; layers read what they need from either kind without decoding
/// ([`usage`](Self::usage), [`has_finish`](Self::has_finish),
/// [`choice_count`](Self::choice_count)), and [`into_chunk`](Self::into_chunk) gives the
/// typed view to those that need the content.
///
/// It serializes as the chunk's JSON (an encoded event as the document it holds), so a
/// stored list of events reads back as the same list of chunks.
///
/// ```
/// use llm_tower_core::{ChatChunk, EncodedChunk, StreamEvent};
///
/// let typed = StreamEvent::from(ChatChunk::text("id", "m", "hi"));
/// let json = br#"{"id":"id","model":"m","choices":[{"index":0,"delta":{"content":"hi"},"finish_reason":"stop"}]}"#;
/// let encoded = StreamEvent::from(EncodedChunk::from_json(json.as_slice().into()).unwrap());
/// assert!(encoded.has_finish() && !typed.has_finish());
/// assert_eq!(encoded.into_chunk().unwrap().choices[0].delta.text(), Some("hi"));
/// ```
#[derive(Debug, Clone)]
pub enum StreamEvent {
    /// A typed chunk (boxed: events move through every layer's stream).
    Chunk(Box<ChatChunk>),
    /// A chunk in its upstream's JSON.
    Encoded(EncodedChunk),
    /// An event in the client's own dialect (Messages, Responses), as its upstream sent it.
    Native(NativeEvent),
}

impl StreamEvent {
    /// The usage the event carries, if any.
    pub fn usage(&self) -> Option<&Usage> {
        match self {
            StreamEvent::Chunk(c) => c.usage(),
            StreamEvent::Encoded(c) => c.usage(),
            StreamEvent::Native(e) => e.usage(),
        }
    }

    /// How many choices the event has (0 on a usage-only chunk).
    pub fn choice_count(&self) -> usize {
        match self {
            StreamEvent::Chunk(c) => c.choices.len(),
            StreamEvent::Encoded(c) => c.choice_count(),
            StreamEvent::Native(e) => e.choice_count(),
        }
    }

    /// Whether a choice of the event has a finish reason.
    pub fn has_finish(&self) -> bool {
        match self {
            StreamEvent::Chunk(c) => c.choices.iter().any(|c| c.finish_reason().is_some()),
            StreamEvent::Encoded(c) => c.has_finish(),
            StreamEvent::Native(e) => e.has_finish(),
        }
    }

    /// The choice indices in the event and those that finished in it, as bit sets (bit `i`
    /// for index `i`); `None` when an index is 64 or more (see
    /// [`EncodedChunk::choice_indices`]).
    pub fn choice_indices(&self) -> Option<(u64, u64)> {
        match self {
            StreamEvent::Chunk(c) => c.choices.iter().try_fold((0, 0), |(seen, fin), ch| {
                let bit = 1u64.checked_shl(ch.index)?;
                let f = if ch.finish_reason().is_some() { bit } else { 0 };
                Some((seen | bit, fin | f))
            }),
            StreamEvent::Encoded(c) => c.choice_indices(),
            StreamEvent::Native(e) => Some(e.choice_indices()),
        }
    }

    /// The typed chunk, decoded if the event is encoded (see [`EncodedChunk::decode`]).
    pub fn into_chunk(self) -> Result<ChatChunk, LlmError> {
        match self {
            StreamEvent::Chunk(c) => Ok(*c),
            StreamEvent::Encoded(c) => c.decode(),
            StreamEvent::Native(e) => e.decode(),
        }
    }

    /// The events with the encoded chunks' JSON (and native events' name and data) copied into one allocation of their total
    /// size: each is otherwise a slice of a read buffer, which it keeps alive whole. What a
    /// store keeping events in memory keeps.
    pub fn compacted(events: &[StreamEvent]) -> Vec<StreamEvent> {
        let total = events
            .iter()
            .map(|e| match e {
                StreamEvent::Encoded(c) => c.json().len(),
                StreamEvent::Native(e) => e.copied_len(),
                StreamEvent::Chunk(_) => 0,
            })
            .sum();
        let mut all = bytes::BytesMut::with_capacity(total);
        for e in events {
            match e {
                StreamEvent::Encoded(c) => all.extend_from_slice(c.json()),
                StreamEvent::Native(e) => e.copy_into(&mut all),
                StreamEvent::Chunk(_) => {}
            }
        }
        let mut all = all.freeze();
        events
            .iter()
            .map(|e| match e {
                StreamEvent::Chunk(c) => StreamEvent::Chunk(c.clone()),
                StreamEvent::Encoded(c) => {
                    StreamEvent::Encoded(c.with_json(all.split_to(c.json().len())))
                }
                StreamEvent::Native(e) => StreamEvent::Native(e.with_parts(&mut all)),
            })
            .collect()
    }
}

/// Two events are equal when they hold the same document (two encoded ones, two native
/// ones) or the same chunk (otherwise, each decoded).
impl PartialEq for StreamEvent {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (StreamEvent::Chunk(a), StreamEvent::Chunk(b)) => a == b,
            (StreamEvent::Encoded(a), StreamEvent::Encoded(b)) => a == b,
            (StreamEvent::Native(a), StreamEvent::Native(b)) => a == b,
            (a, b) => match (a.clone().into_chunk(), b.clone().into_chunk()) {
                (Ok(a), Ok(b)) => a == b,
                _ => false,
            },
        }
    }
}

impl From<ChatChunk> for StreamEvent {
    fn from(chunk: ChatChunk) -> Self {
        StreamEvent::Chunk(Box::new(chunk))
    }
}

impl From<EncodedChunk> for StreamEvent {
    fn from(chunk: EncodedChunk) -> Self {
        StreamEvent::Encoded(chunk)
    }
}

impl From<NativeEvent> for StreamEvent {
    fn from(event: NativeEvent) -> Self {
        StreamEvent::Native(event)
    }
}

/// Serializes as the chunk's JSON.
impl Serialize for StreamEvent {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            StreamEvent::Chunk(c) => c.serialize(s),
            StreamEvent::Encoded(c) => c.serialize(s),
            StreamEvent::Native(e) => e.serialize(s),
        }
    }
}

/// Deserializes a chunk: kept encoded when [`EncodedChunk::from_json`] reads it, else typed.
impl<'de> Deserialize<'de> for StreamEvent {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let raw = Box::<serde_json::value::RawValue>::deserialize(d)?;
        let json = bytes::Bytes::from(String::from(raw.get()).into_bytes());
        if let Some(c) = EncodedChunk::from_json(json.clone()) {
            return Ok(StreamEvent::Encoded(c));
        }
        ChatChunk::from_slice(&json)
            .map(StreamEvent::from)
            .map_err(serde::de::Error::custom)
    }
}

/// How a response finished, as seen by the caller.
#[derive(Debug, Clone)]
pub enum Outcome {
    /// Delivered to the end. `usage` is the final usage if the provider sent it.
    Completed {
        /// Final usage, if known.
        usage: Option<Usage>,
    },
    /// Ended with an error item (after zero or more chunks).
    Failed {
        /// The error the caller saw.
        error: LlmError,
        /// Usage seen before the failure, if any.
        usage: Option<Usage>,
    },
    /// The caller dropped the stream before its end.
    Dropped {
        /// Usage seen before the drop, if any.
        usage: Option<Usage>,
    },
}

impl Outcome {
    /// The usage known at the end, whatever the outcome.
    pub fn usage(&self) -> Option<&Usage> {
        match self {
            Outcome::Completed { usage }
            | Outcome::Failed { usage, .. }
            | Outcome::Dropped { usage } => usage.as_ref(),
        }
    }
    /// Whether the response was delivered completely.
    pub fn is_completed(&self) -> bool {
        matches!(self, Outcome::Completed { .. })
    }
}

type Hook = Box<dyn FnOnce(&Outcome) + Send>;

/// A streamed response body: the chunks plus the completion hooks registered on it.
///
/// Every hook runs **exactly once**, when the stream yields its end (`Completed`), yields
/// an error (`Failed`; the stream ends there), or is dropped before either (`Dropped`).
/// Hooks run in the order they were added: inner layers first.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// use futures_util::StreamExt;
/// use llm_tower_core::{ChatChunk, ChunkStream, Outcome};
/// use std::sync::{Arc, Mutex};
///
/// let chunks = vec![Ok(ChatChunk::text("id", "m", "Hel")), Ok(ChatChunk::text("id", "m", "lo"))];
/// let mut stream = ChunkStream::new(futures_util::stream::iter(chunks));
/// let seen = Arc::new(Mutex::new(None));
/// let seen2 = seen.clone();
/// stream.on_finish(move |outcome: &Outcome| *seen2.lock().unwrap() = Some(outcome.is_completed()));
/// while let Some(_chunk) = stream.next().await {}
/// assert_eq!(*seen.lock().unwrap(), Some(true));
/// # }
/// ```
pub struct ChunkStream {
    inner: BoxEventStream,
    hooks: Vec<Hook>,
    // Boxed: this is a variant of `ResponseBody`, which moves through every layer's future.
    usage: Option<Box<Usage>>,
    finished: bool,
}

impl ChunkStream {
    /// Wraps a stream of chunks.
    pub fn new<S>(stream: S) -> Self
    where
        S: Stream<Item = Result<ChatChunk, LlmError>> + Send + 'static,
    {
        Self::from_events(stream.map(|item| item.map(StreamEvent::from)))
    }

    /// Wraps an already boxed stream.
    pub fn from_boxed(inner: BoxChunkStream) -> Self {
        Self::new(inner)
    }

    /// Wraps a stream of events (typed or encoded chunks).
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// use futures_util::StreamExt;
    /// use llm_tower_core::{ChunkStream, EncodedChunk, StreamEvent};
    ///
    /// let json = br#"{"id":"c","model":"m","choices":[{"index":0,"delta":{"content":"hi"},"finish_reason":"stop"}]}"#;
    /// let event = StreamEvent::from(EncodedChunk::from_json(json.as_slice().into()).unwrap());
    /// let mut s = ChunkStream::from_events(futures_util::stream::iter([Ok(event.clone())]));
    /// // The event level: as it came, nothing decoded.
    /// assert_eq!(s.next_event().await.unwrap().unwrap(), event);
    /// // The typed level decodes it.
    /// let mut s = ChunkStream::from_events(futures_util::stream::iter([Ok(event)]));
    /// assert_eq!(s.next().await.unwrap().unwrap().choices[0].delta.text(), Some("hi"));
    /// # }
    /// ```
    pub fn from_events<S>(stream: S) -> Self
    where
        S: Stream<Item = Result<StreamEvent, LlmError>> + Send + 'static,
    {
        Self {
            inner: Box::pin(stream),
            hooks: Vec::new(),
            usage: None,
            finished: false,
        }
    }

    /// Registers a hook that runs exactly once when the stream finishes.
    /// If the stream has already finished, the hook is dropped without running.
    pub fn on_finish<F>(&mut self, hook: F)
    where
        F: FnOnce(&Outcome) + Send + 'static,
    {
        if !self.finished {
            self.hooks.push(Box::new(hook));
        }
    }

    /// Replaces the inner stream by `f(inner)`, keeping the hooks outside it, so that hooks
    /// see what the caller sees (for example a stall timeout inserted by `f`).
    ///
    /// `f` sees typed chunks: every encoded event is decoded for it (a chunk that does not
    /// decode is an error item). A layer that needs no content uses
    /// [`wrap_events`](Self::wrap_events) instead.
    pub fn wrap<F, S>(&mut self, f: F)
    where
        F: FnOnce(BoxChunkStream) -> S,
        S: Stream<Item = Result<ChatChunk, LlmError>> + Send + 'static,
    {
        self.wrap_events(|inner| {
            let typed: BoxChunkStream =
                Box::pin(inner.map(|item| item.and_then(StreamEvent::into_chunk)));
            f(typed).map(|item| item.map(StreamEvent::from))
        });
    }

    /// Replaces the inner stream of events by `f(inner)`, keeping the hooks outside it;
    /// events pass as they are (encoded ones stay encoded).
    pub fn wrap_events<F, S>(&mut self, f: F)
    where
        F: FnOnce(BoxEventStream) -> S,
        S: Stream<Item = Result<StreamEvent, LlmError>> + Send + 'static,
    {
        let inner = std::mem::replace(&mut self.inner, Box::pin(futures_util::stream::empty()));
        self.inner = Box::pin(f(inner));
    }

    /// Usage seen so far (the final usage once the stream completed).
    pub fn usage(&self) -> Option<&Usage> {
        self.usage.as_deref()
    }

    fn finish(&mut self, outcome: Outcome) {
        self.finished = true;
        for hook in self.hooks.drain(..) {
            hook(&outcome);
        }
    }

    fn fail(&mut self, error: LlmError) -> LlmError {
        // A provider that knew the usage when it failed says so on the error.
        let usage = self.usage.as_deref().or_else(|| error.usage()).cloned();
        self.finish(Outcome::Failed {
            error: error.clone(),
            usage,
        });
        error
    }

    /// The next event as it came (an encoded chunk stays encoded); the hooks run as for
    /// [`poll_next`](Stream::poll_next).
    pub fn poll_next_event(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<StreamEvent, LlmError>>> {
        if self.finished {
            return Poll::Ready(None);
        }
        match self.inner.as_mut().poll_next(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Some(Ok(event))) => {
                if let Some(u) = event.usage() {
                    self.usage = Some(Box::new(u.clone()));
                }
                Poll::Ready(Some(Ok(event)))
            }
            Poll::Ready(Some(Err(error))) => Poll::Ready(Some(Err(self.fail(error)))),
            Poll::Ready(None) => {
                let usage = self.usage.as_deref().cloned();
                self.finish(Outcome::Completed { usage });
                Poll::Ready(None)
            }
        }
    }

    /// The next event for a writer of the client's dialect: a [`NativeEvent`] as it came,
    /// any other decoded into a typed chunk ([`StreamEvent::Chunk`]); one that does not
    /// decode ends the stream with its error, as for [`poll_next`](Stream::poll_next).
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// use llm_tower_core::{ChunkStream, EncodedChunk, StreamEvent};
    ///
    /// let json = br#"{"id":"c","model":"m","choices":[{"index":0,"delta":{"content":"hi"}}]}"#;
    /// let event = StreamEvent::from(EncodedChunk::from_json(json.as_slice().into()).unwrap());
    /// let mut s = ChunkStream::from_events(futures_util::stream::iter([Ok(event)]));
    /// let next = std::future::poll_fn(|cx| s.poll_next_native(cx)).await;
    /// assert!(matches!(next, Some(Ok(StreamEvent::Chunk(_)))));
    /// # }
    /// ```
    pub fn poll_next_native(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<StreamEvent, LlmError>>> {
        match self.poll_next_event(cx) {
            Poll::Ready(Some(Ok(event @ (StreamEvent::Native(_) | StreamEvent::Chunk(_))))) => {
                Poll::Ready(Some(Ok(event)))
            }
            Poll::Ready(Some(Ok(event))) => match event.into_chunk() {
                Ok(chunk) => Poll::Ready(Some(Ok(chunk.into()))),
                Err(e) => Poll::Ready(Some(Err(self.fail(e)))),
            },
            other => other,
        }
    }

    /// The next event as it came; see [`poll_next_event`](Self::poll_next_event).
    pub async fn next_event(&mut self) -> Option<Result<StreamEvent, LlmError>> {
        std::future::poll_fn(|cx| self.poll_next_event(cx)).await
    }
}

/// The typed view: encoded events are decoded as they are taken; one that does not decode
/// ends the stream with its error (the hooks see `Failed`).
impl Stream for ChunkStream {
    type Item = Result<ChatChunk, LlmError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        match self.poll_next_event(cx) {
            Poll::Ready(Some(Ok(event))) => match event.into_chunk() {
                Ok(chunk) => Poll::Ready(Some(Ok(chunk))),
                Err(e) => Poll::Ready(Some(Err(self.fail(e)))),
            },
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(e))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl Drop for ChunkStream {
    fn drop(&mut self) {
        if !self.finished && !self.hooks.is_empty() {
            let usage = self.usage.take().map(|u| *u);
            self.finish(Outcome::Dropped { usage });
        }
    }
}

impl fmt::Debug for ChunkStream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ChunkStream")
            .field("hooks", &self.hooks.len())
            .field("finished", &self.finished)
            .finish_non_exhaustive()
    }
}

/// The body of an [`LlmResponse`].
#[derive(Debug)]
pub enum ResponseBody {
    /// A complete response (boxed: inline it would make this enum, and so every
    /// [`LlmResponse`], 264 bytes bigger, and a response moves through every layer's future).
    Complete(Box<ChatResponse>),
    /// A complete response still in the JSON its upstream sent: forwarded as it is by an
    /// HTTP surface, decoded by layers that need the content.
    Encoded(EncodedResponse),
    /// A stream of chunks.
    Stream(ChunkStream),
    /// The answer to an embeddings request ([`ChatRequest::embeddings`](crate::ChatRequest::embeddings)).
    Embeddings(Box<EmbeddingsResponse>),
}

/// What every LLM service returns: a complete response or a stream, plus [`ResponseMeta`].
///
/// ```
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// use llm_tower_core::{ChatResponse, LlmResponse, Outcome};
///
/// let mut resp = LlmResponse::complete(ChatResponse::from_text("m", "hi"));
/// // For a complete response the hook runs at once.
/// resp.on_finish(|o: &Outcome| assert!(o.is_completed()));
/// assert_eq!(resp.into_complete().await.unwrap().text(), "hi");
/// # }
/// ```
#[derive(Debug)]
pub struct LlmResponse {
    /// The body.
    pub body: ResponseBody,
    /// What layers learned.
    pub meta: ResponseMeta,
}

impl LlmResponse {
    /// A complete response; its usage is copied into the meta.
    pub fn complete(response: ChatResponse) -> Self {
        let meta = ResponseMeta {
            usage: response.usage.clone(),
            model: Some(response.model.clone()),
            ..ResponseMeta::default()
        };
        Self {
            body: ResponseBody::Complete(Box::new(response)),
            meta,
        }
    }

    /// A complete response kept as its upstream's JSON; its usage and model are copied
    /// into the meta.
    ///
    /// ```
    /// use llm_tower_core::{EncodedResponse, LlmResponse};
    /// let json = br#"{"id":"c1","model":"m","choices":[],"usage":{"prompt_tokens":1,"completion_tokens":2,"total_tokens":3}}"#;
    /// let resp = LlmResponse::encoded(EncodedResponse::from_json(json.as_slice().into()).unwrap());
    /// assert_eq!(resp.meta.usage.unwrap().total_tokens, 3);
    /// assert_eq!(resp.meta.model.as_deref(), Some("m"));
    /// ```
    pub fn encoded(response: EncodedResponse) -> Self {
        let meta = ResponseMeta {
            usage: response.usage().cloned(),
            model: Some(response.model().to_owned()),
            ..ResponseMeta::default()
        };
        Self {
            body: ResponseBody::Encoded(response),
            meta,
        }
    }

    /// The answer to an embeddings request; its usage and model are copied into the meta.
    pub fn embeddings(response: EmbeddingsResponse) -> Self {
        let meta = ResponseMeta {
            usage: Some(response.usage.clone()),
            model: Some(response.model.clone()),
            ..ResponseMeta::default()
        };
        Self {
            body: ResponseBody::Embeddings(Box::new(response)),
            meta,
        }
    }

    /// The embeddings answer, or an internal error if the body is a chat answer.
    pub fn into_embeddings(self) -> Result<EmbeddingsResponse, LlmError> {
        match self.body {
            ResponseBody::Embeddings(r) => Ok(*r),
            _ => Err(not_embeddings()),
        }
    }

    /// A streamed response.
    pub fn stream<S>(stream: S) -> Self
    where
        S: Stream<Item = Result<ChatChunk, LlmError>> + Send + 'static,
    {
        Self {
            body: ResponseBody::Stream(ChunkStream::new(stream)),
            meta: ResponseMeta::default(),
        }
    }

    /// A streamed response of events (typed or encoded chunks).
    pub fn events<S>(stream: S) -> Self
    where
        S: Stream<Item = Result<StreamEvent, LlmError>> + Send + 'static,
    {
        Self {
            body: ResponseBody::Stream(ChunkStream::from_events(stream)),
            meta: ResponseMeta::default(),
        }
    }

    /// Whether the body is a stream.
    pub fn is_stream(&self) -> bool {
        matches!(self.body, ResponseBody::Stream(_))
    }

    /// Registers the completion hook: it runs exactly once with how the response finished.
    /// For a complete body that is now (with the response's usage); for a stream, when it
    /// ends, fails or is dropped (see [`ChunkStream`]).
    pub fn on_finish<F>(&mut self, hook: F)
    where
        F: FnOnce(&Outcome) + Send + 'static,
    {
        match &mut self.body {
            ResponseBody::Complete(r) => hook(&Outcome::Completed {
                usage: r.usage.clone(),
            }),
            ResponseBody::Encoded(r) => hook(&Outcome::Completed {
                usage: r.usage().cloned(),
            }),
            ResponseBody::Stream(s) => s.on_finish(hook),
            // The meta's usage: a partly cached batch was paid for only in part.
            ResponseBody::Embeddings(r) => hook(&Outcome::Completed {
                usage: Some(self.meta.usage.clone().unwrap_or_else(|| r.usage.clone())),
            }),
        }
    }

    /// Collects the body into a complete response (streams are aggregated chunk by chunk,
    /// encoded bodies decoded). A stream that ends with an error returns that error; an
    /// encoded body that does not decode, a [`Transport`](crate::ErrorKind::Transport)
    /// error, as a malformed upstream answer is.
    pub async fn into_complete(self) -> Result<ChatResponse, LlmError> {
        match self.body {
            ResponseBody::Complete(r) => Ok(*r),
            ResponseBody::Encoded(r) => r.decode(),
            ResponseBody::Stream(mut s) => {
                let mut acc = crate::StreamAccumulator::default();
                while let Some(item) = s.next().await {
                    acc.push(&item?);
                }
                Ok(acc.finish())
            }
            ResponseBody::Embeddings(_) => Err(not_chat()),
        }
    }

    /// The body as a stream; a complete body becomes the equivalent chunks (an encoded
    /// body that does not decode, one error item, as [`into_complete`](Self::into_complete)).
    pub fn into_stream(self) -> ChunkStream {
        let complete = match self.body {
            ResponseBody::Stream(s) => return s,
            ResponseBody::Complete(r) => *r,
            ResponseBody::Encoded(r) => match r.decode() {
                Ok(r) => r,
                Err(e) => return ChunkStream::new(futures_util::stream::iter([Err(e)])),
            },
            ResponseBody::Embeddings(_) => {
                return ChunkStream::new(futures_util::stream::iter([Err(not_chat())]));
            }
        };
        let chunks = complete.to_chunks().into_iter().map(Ok);
        ChunkStream::new(futures_util::stream::iter(chunks))
    }
}

/// A chat view asked of an embeddings answer: a bug in the stack, not the client's fault.
fn not_chat() -> LlmError {
    LlmError::internal("an embeddings answer has no chat form")
}

fn not_embeddings() -> LlmError {
    LlmError::internal("a chat answer to an embeddings request")
}
