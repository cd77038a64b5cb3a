//! OpenAI's server-sent-events framing of a chunk stream.
//!
//! Each chunk is `data: {json}\n\n`; a stream that completes ends with `data: [DONE]\n\n`;
//! a stream that fails after it started ends with `data: {"error": {...}}\n\n` (the
//! OpenAI error JSON) and **no** `[DONE]`, so a client can never take a failure for a
//! complete answer.

use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll};

use axum::body::Body;
use bytes::Bytes;
use futures_core::Stream;
use futures_util::StreamExt;
use llm_tower_core::{ChatChunk, ChunkStream, LlmError};

/// The SSE body for `stream`, in OpenAI's framing.
///
/// Each chunk is `data: {json}\n\n`; a stream that completes ends with `data: [DONE]\n\n`;
/// a stream that fails after it started ends with `data: {"error": {...}}\n\n` (the
/// OpenAI error JSON) and **no** `[DONE]`, so a client can never take a failure for a
/// complete answer.
///
/// `include_usage` follows the client's `stream_options.include_usage`: when false, the
/// usage-only chunk a provider sends at the end is not forwarded (the stream's hooks still
/// see it, so accounting is unaffected).
///
/// ```
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// use http_body_util::BodyExt;
/// use llm_tower_axum::sse_body;
/// use llm_tower_core::{ChatChunk, ChunkStream};
///
/// let chunks = vec![Ok(ChatChunk::text("id", "m", "hi"))];
/// let body = sse_body(ChunkStream::new(futures_util::stream::iter(chunks)), false);
/// let text = body.collect().await.unwrap().to_bytes();
/// let text = std::str::from_utf8(&text).unwrap();
/// assert!(text.starts_with("data: {"));
/// assert!(text.ends_with("\n\ndata: [DONE]\n\n"));
/// # }
/// ```
pub fn sse_body(stream: ChunkStream, include_usage: bool) -> Body {
    Body::from_stream(SseStream::new(None, stream, include_usage))
}

/// The stream of SSE frames; the first chunk may already have been taken from the inner
/// stream (the handler waits for it before sending headers).
pub(crate) struct SseStream {
    first: Option<ChatChunk>,
    inner: ChunkStream,
    include_usage: bool,
    done: bool,
}

impl SseStream {
    pub(crate) fn new(first: Option<ChatChunk>, inner: ChunkStream, include_usage: bool) -> Self {
        Self {
            first,
            inner,
            include_usage,
            done: false,
        }
    }

    /// The frame for `chunk`, or `None` if it is not forwarded.
    fn frame(&self, mut chunk: ChatChunk) -> Result<Option<Bytes>, LlmError> {
        if !self.include_usage {
            if chunk.choices.is_empty() && chunk.usage().is_some() {
                return Ok(None);
            }
            chunk.usage = None;
        }
        let json = serde_json::to_vec(&chunk)
            .map_err(|e| LlmError::internal(format!("cannot encode a stream chunk: {e}")))?;
        Ok(Some(data_frame(&json)))
    }
}

fn data_frame(json: &[u8]) -> Bytes {
    let mut buf = Vec::with_capacity(json.len() + 8);
    buf.extend_from_slice(b"data: ");
    buf.extend_from_slice(json);
    buf.extend_from_slice(b"\n\n");
    Bytes::from(buf)
}

/// The frame reporting `error` in-stream.
pub(crate) fn error_frame(error: &LlmError) -> Bytes {
    let json = serde_json::to_vec(&error.to_openai_json()).unwrap_or_else(|_| {
        br#"{"error":{"message":"stream failed","type":"server_error","param":null,"code":null}}"#
            .to_vec()
    });
    data_frame(&json)
}

const DONE: &[u8] = b"data: [DONE]\n\n";

impl Stream for SseStream {
    type Item = Result<Bytes, Infallible>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if self.done {
            return Poll::Ready(None);
        }
        loop {
            let next = match self.first.take() {
                Some(first) => Some(Ok(first)),
                None => match self.inner.poll_next_unpin(cx) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(item) => item,
                },
            };
            match next {
                Some(Ok(chunk)) => match self.frame(chunk) {
                    Ok(Some(frame)) => return Poll::Ready(Some(Ok(frame))),
                    Ok(None) => {}
                    Err(e) => {
                        self.done = true;
                        return Poll::Ready(Some(Ok(error_frame(&e))));
                    }
                },
                Some(Err(e)) => {
                    self.done = true;
                    tracing::warn!(error = %e, "stream failed after it started");
                    return Poll::Ready(Some(Ok(error_frame(&e))));
                }
                None => {
                    self.done = true;
                    return Poll::Ready(Some(Ok(Bytes::from_static(DONE))));
                }
            }
        }
    }
}
