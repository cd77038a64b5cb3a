//! `LlmResponse`, its streamed body and the stream completion hook.

use std::fmt;
use std::pin::Pin;
use std::task::{Context, Poll};

use futures_core::Stream;

use crate::{
    ChatChunk, ChatResponse, EmbeddingsResponse, EncodedResponse, LlmError, ResponseMeta, Usage,
};

/// A boxed stream of chunks, as providers and layers produce it.
pub type BoxChunkStream = Pin<Box<dyn Stream<Item = Result<ChatChunk, LlmError>> + Send>>;

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
    inner: BoxChunkStream,
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
        Self::from_boxed(Box::pin(stream))
    }

    /// Wraps an already boxed stream.
    pub fn from_boxed(inner: BoxChunkStream) -> Self {
        Self {
            inner,
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
    pub fn wrap<F, S>(&mut self, f: F)
    where
        F: FnOnce(BoxChunkStream) -> S,
        S: Stream<Item = Result<ChatChunk, LlmError>> + Send + 'static,
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
}

impl Stream for ChunkStream {
    type Item = Result<ChatChunk, LlmError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if self.finished {
            return Poll::Ready(None);
        }
        match self.inner.as_mut().poll_next(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Some(Ok(chunk))) => {
                if let Some(u) = chunk.usage() {
                    self.usage = Some(Box::new(u.clone()));
                }
                Poll::Ready(Some(Ok(chunk)))
            }
            Poll::Ready(Some(Err(error))) => {
                // A provider that knew the usage when it failed says so on the error.
                let usage = self.usage.as_deref().or_else(|| error.usage()).cloned();
                self.finish(Outcome::Failed {
                    error: error.clone(),
                    usage,
                });
                Poll::Ready(Some(Err(error)))
            }
            Poll::Ready(None) => {
                let usage = self.usage.as_deref().cloned();
                self.finish(Outcome::Completed { usage });
                Poll::Ready(None)
            }
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
                use futures_util::StreamExt;
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
