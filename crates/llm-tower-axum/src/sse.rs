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
use llm_tower_core::{ChunkStream, LlmError, StreamEvent};

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

/// Most bytes one write carries: events ready together leave in one write up to this, so
/// a burst of events is never held in one growing buffer.
const MAX_WRITE_BYTES: usize = 64 * 1024;

/// How many times in a row one write is held back to gather more events (see
/// [`SseStream`]); bounds the delay a steady trickle of events can add to a write.
const MAX_GATHER_ROUNDS: u8 = 32;

/// The stream of SSE writes; the first event may already have been taken from the inner
/// stream (the handler waits for it before sending headers).
///
/// An encoded chunk (see [`llm_tower_core::EncodedChunk`]) is forwarded as the JSON its
/// upstream sent, framed `data: …\n\n`; a typed one is encoded. Every event ready at one
/// poll goes into the same write (hyper then writes and flushes once for all of them).
///
/// Events that arrive together leave together, also across the upstream connection: an
/// HTTP/1 client body hands its frames over one at a time, each after the connection's
/// task runs again, so a burst the upstream sent in one packet would otherwise leave as
/// one write (one syscall, one packet) per event. After the first write (time to first
/// byte is never delayed), a poll that took events and then found the stream pending
/// gives the scheduler one turn before writing: when the upstream connection had more,
/// they join the same write; when two turns bring nothing, what was gathered leaves. Each
/// event waits at most two scheduler turns; a write at most [`MAX_GATHER_ROUNDS`] turns.
pub(crate) struct SseStream {
    first: Option<StreamEvent>,
    inner: ChunkStream,
    include_usage: bool,
    done: bool,
    gather: Gather,
}

/// Holds a write back for a scheduler turn while events keep arriving (see [`SseStream`];
/// every SSE writer of the crate uses it).
#[derive(Debug, Default)]
pub(crate) struct Gather {
    /// Whether a write went out already.
    wrote: bool,
    /// Events gathered for the next write, and the turns they have waited.
    held: Vec<u8>,
    rounds: u8,
    /// Polls in a row since the last event that found nothing new.
    idle: u8,
}

impl Gather {
    /// What was held back at the last poll: the start of this poll's write.
    pub(crate) fn take(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.held)
    }

    /// The inner stream is pending with `out` gathered (`took`: this poll took events):
    /// whether to hold it for a turn. When it does, it keeps `out` and wakes the task.
    pub(crate) fn hold(&mut self, out: &mut Vec<u8>, took: bool, cx: &Context<'_>) -> bool {
        if !self.wrote || out.is_empty() || self.rounds >= MAX_GATHER_ROUNDS {
            return false;
        }
        // Nothing new twice in a row: the upstream connection had its turn and nothing
        // more (hyper polls a body again at once when it returns pending, so one empty
        // poll proves nothing).
        self.idle = if took { 0 } else { self.idle + 1 };
        if self.idle >= 2 {
            return false;
        }
        self.rounds += 1;
        self.held = std::mem::take(out);
        // Give the upstream connection its turn; the inner stream's waker is registered too.
        cx.waker().wake_by_ref();
        true
    }

    /// A write is going out.
    pub(crate) fn wrote(&mut self) {
        self.wrote = true;
        self.rounds = 0;
        self.idle = 0;
    }

    /// The poll of an SSE writer: what `next` has ready, each item written into the batch
    /// by `take` (which answers whether the stream has ended, setting `done`), up to
    /// [`MAX_WRITE_BYTES`] a write. `Ready(Some(write))`, `Ready(None)` once ended with
    /// nothing left, `Pending` while nothing is ready or a burst is held back a turn
    /// ([`hold`](Self::hold)).
    pub(crate) fn poll_write<T>(
        &mut self,
        cx: &mut Context<'_>,
        done: &mut bool,
        mut next: impl FnMut(&mut Context<'_>) -> Poll<Option<T>>,
        mut take: impl FnMut(Option<T>, &mut Vec<u8>) -> bool,
    ) -> Poll<Option<Bytes>> {
        let mut out = self.take();
        let mut took = false;
        while !*done && out.len() < MAX_WRITE_BYTES {
            match next(cx) {
                // What is ready is written together, and what keeps arriving too.
                Poll::Pending if self.hold(&mut out, took, cx) => return Poll::Pending,
                // Nothing ready (the inner stream registered the waker).
                Poll::Pending if out.is_empty() => return Poll::Pending,
                Poll::Pending => break,
                Poll::Ready(item) => {
                    took = true;
                    *done = take(item, &mut out);
                }
            }
        }
        if out.is_empty() {
            return Poll::Ready(None);
        }
        self.wrote();
        Poll::Ready(Some(Bytes::from(out)))
    }
}

impl SseStream {
    pub(crate) fn new(first: Option<StreamEvent>, inner: ChunkStream, include_usage: bool) -> Self {
        Self {
            first,
            inner,
            include_usage,
            done: false,
            gather: Gather::default(),
        }
    }

    /// Appends the frame for `event` to `out` (nothing if it is not forwarded).
    fn frame(include_usage: bool, event: StreamEvent, out: &mut Vec<u8>) -> Result<(), LlmError> {
        if let StreamEvent::Encoded(c) = &event {
            if include_usage || c.usage().is_none() {
                push_frame(out, c.json());
                return Ok(());
            }
            // The usage-only chunk the gateway asked for and the client did not: dropped
            // without decoding it.
            if c.choice_count() == 0 {
                return Ok(());
            }
        }
        // The usage must come off, or the chunk is typed: through the typed encoder.
        let mut chunk = event.into_chunk()?;
        if !include_usage {
            if chunk.choices.is_empty() && chunk.usage().is_some() {
                return Ok(());
            }
            chunk.usage = None;
        }
        let start = out.len();
        out.extend_from_slice(b"data: ");
        if let Err(e) = serde_json::to_writer(&mut *out, &chunk) {
            out.truncate(start);
            return Err(LlmError::internal(format!(
                "cannot encode a stream chunk: {e}"
            )));
        }
        out.extend_from_slice(b"\n\n");
        Ok(())
    }
}

fn push_frame(out: &mut Vec<u8>, json: &[u8]) {
    out.reserve(json.len() + 8);
    out.extend_from_slice(b"data: ");
    out.extend_from_slice(json);
    out.extend_from_slice(b"\n\n");
}

fn data_frame(json: &[u8]) -> Bytes {
    let mut buf = Vec::with_capacity(json.len() + 8);
    push_frame(&mut buf, json);
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
        let this = &mut *self;
        let (first, inner, include_usage) = (&mut this.first, &mut this.inner, this.include_usage);
        let next = |cx: &mut Context<'_>| match first.take() {
            Some(first) => Poll::Ready(Some(Ok(first))),
            None => inner.poll_next_event(cx),
        };
        let take = |item: Option<Result<StreamEvent, LlmError>>, out: &mut Vec<u8>| match item {
            Some(Ok(event)) => match Self::frame(include_usage, event, out) {
                Ok(()) => false,
                Err(e) => {
                    out.extend_from_slice(&error_frame(&e));
                    true
                }
            },
            Some(Err(e)) => {
                tracing::warn!(error = %e, "stream failed after it started");
                out.extend_from_slice(&error_frame(&e));
                true
            }
            None => {
                out.extend_from_slice(DONE);
                true
            }
        };
        this.gather
            .poll_write(cx, &mut this.done, next, take)
            .map(|w| w.map(Ok))
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use futures_util::StreamExt;
    use llm_tower_core::{ChatChunk, EncodedChunk};

    const TEXT: &str = r#"{"id":"c","object":"chat.completion.chunk","model":"m","choices":[{"index":0,"delta":{"content":"hi"},"finish_reason":null}],"usage":null}"#;
    const LAST: &str = r#"{"id":"c","model":"m","choices":[{"index":0,"delta":{},"finish_reason":"stop"}],"usage":{"prompt_tokens":1,"completion_tokens":2,"total_tokens":3}}"#;
    const USAGE: &str = r#"{"id":"c","model":"m","choices":[],"usage":{"prompt_tokens":1,"completion_tokens":2,"total_tokens":3}}"#;

    fn enc(json: &str) -> StreamEvent {
        EncodedChunk::from_json(Bytes::copy_from_slice(json.as_bytes()))
            .unwrap()
            .into()
    }

    /// The writes the SSE stream makes, one string each.
    async fn writes(s: SseStream) -> Vec<String> {
        s.map(|w| String::from_utf8(w.unwrap().to_vec()).unwrap())
            .collect()
            .await
    }

    #[tokio::test]
    async fn encoded_events_leave_as_sent_and_together() {
        let events = vec![Ok(enc(TEXT)), Ok(enc(TEXT)), Ok(enc(USAGE))];
        let s = ChunkStream::from_events(futures_util::stream::iter(events));
        let out = writes(SseStream::new(None, s, true)).await;
        // All ready at once: one write, the documents byte for byte.
        assert_eq!(
            out,
            vec![format!(
                "data: {TEXT}\n\ndata: {TEXT}\n\ndata: {USAGE}\n\ndata: [DONE]\n\n"
            )]
        );
    }

    #[tokio::test]
    async fn without_include_usage_the_usage_comes_off() {
        let events = vec![Ok(enc(TEXT)), Ok(enc(LAST)), Ok(enc(USAGE))];
        let s = ChunkStream::from_events(futures_util::stream::iter(events));
        let out = writes(SseStream::new(None, s, false)).await.concat();
        let frames: Vec<&str> = out.split("\n\n").filter(|f| !f.is_empty()).collect();
        assert_eq!(frames.len(), 3, "{out}");
        assert_eq!(frames[0], format!("data: {TEXT}"));
        // The chunk with choices and usage: re-encoded without the usage.
        let last = ChatChunk::from_slice(frames[1].strip_prefix("data: ").unwrap().as_bytes());
        let last = last.unwrap();
        assert!(last.usage.is_none() && last.choices[0].finish_reason() == Some("stop"));
        assert_eq!(frames[2], "data: [DONE]");
    }

    #[tokio::test(start_paused = true)]
    async fn events_apart_leave_apart_and_a_failure_ends_without_done() {
        let (tx, rx) = futures_channel_like();
        let s = ChunkStream::from_events(rx);
        let mut sse = SseStream::new(Some(enc(TEXT)), s, true);
        // The first event is ready, the next is not: the first leaves alone.
        let first = sse.next().await.unwrap().unwrap();
        assert_eq!(first, format!("data: {TEXT}\n\n").as_bytes());
        tx.send(Ok(ChatChunk::text("c", "m", "typed").into()))
            .unwrap();
        tx.send(Err(LlmError::timeout("stalled"))).unwrap();
        drop(tx);
        let rest = String::from_utf8(sse.next().await.unwrap().unwrap().to_vec()).unwrap();
        assert!(
            rest.starts_with("data: {") && rest.contains("\"typed\""),
            "{rest}"
        );
        assert!(
            rest.contains("\"error\"") && !rest.contains("[DONE]"),
            "{rest}"
        );
        assert!(sse.next().await.is_none());
    }

    /// Events as an HTTP/1 client body hands them over: one per turn of the connection's
    /// task (here: pending, with a wake-up, between any two events).
    pub(crate) fn one_per_turn(
        events: Vec<StreamEvent>,
    ) -> impl futures_core::Stream<Item = Result<StreamEvent, LlmError>> + Send + 'static {
        let mut events = events.into_iter();
        let mut ready = false;
        futures_util::stream::poll_fn(move |cx| {
            ready = !ready;
            if ready {
                Poll::Ready(events.next().map(Ok))
            } else {
                cx.waker().wake_by_ref();
                Poll::Pending
            }
        })
    }

    #[tokio::test]
    async fn a_burst_handed_over_one_event_per_turn_leaves_in_one_write_after_the_first() {
        let events = (0..20).map(|_| enc(TEXT)).collect();
        let s = ChunkStream::from_events(one_per_turn(events));
        let out = writes(SseStream::new(None, s, true)).await;
        // The first event leaves at once (time to first byte); the rest together.
        assert_eq!(out.len(), 2, "{out:?}");
        assert_eq!(out[0], format!("data: {TEXT}\n\n"));
        assert_eq!(
            out[1],
            format!("data: {TEXT}\n\n").repeat(19) + "data: [DONE]\n\n"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_lone_event_is_not_held_back() {
        let (tx, rx) = futures_channel_like();
        let s = ChunkStream::from_events(rx);
        let mut sse = SseStream::new(Some(enc(TEXT)), s, true);
        assert_eq!(
            sse.next().await.unwrap().unwrap(),
            format!("data: {TEXT}\n\n")
        );
        tx.send(Ok(enc(TEXT))).unwrap();
        // Nothing follows it (the sender stays open): it leaves after one scheduler turn.
        let second = tokio::time::timeout(std::time::Duration::from_millis(1), sse.next()).await;
        assert_eq!(
            second.expect("held back").unwrap().unwrap(),
            format!("data: {TEXT}\n\n")
        );
        drop(tx);
    }

    #[tokio::test]
    async fn a_steady_trickle_still_leaves_every_few_turns() {
        let events = (0..200).map(|_| enc(TEXT)).collect();
        let s = ChunkStream::from_events(one_per_turn(events));
        let out = writes(SseStream::new(None, s, true)).await;
        // Gathering stops after MAX_GATHER_ROUNDS turns: no write waits for the whole stream.
        let frames_per_write: Vec<usize> =
            out.iter().map(|w| w.matches("data: ").count()).collect();
        assert!(out.len() > 2, "{frames_per_write:?}");
        assert!(
            frames_per_write
                .iter()
                .all(|&n| n <= usize::from(MAX_GATHER_ROUNDS) + 2),
            "{frames_per_write:?}"
        );
        assert_eq!(frames_per_write.iter().sum::<usize>(), 201);
    }

    type Tx = tokio::sync::mpsc::UnboundedSender<Result<StreamEvent, LlmError>>;

    fn futures_channel_like() -> (
        Tx,
        impl futures_core::Stream<Item = Result<StreamEvent, LlmError>> + Send + 'static,
    ) {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        (
            tx,
            futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx)),
        )
    }
}
