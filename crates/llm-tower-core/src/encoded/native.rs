//! [`NativeEvent`]: one streamed event kept as its upstream sent it, in the client's own
//! dialect (Messages, Responses).

use std::fmt;
use std::ops::Range;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use serde::{Serialize, Serializer};

use crate::dialect::{self, Dialect};
use crate::{ChatChunk, LlmError, Usage};

/// What every event of one stream shares in its chat view: the answer's id, model and
/// creation time (one allocation per stream, shared by its events).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct StreamHead {
    /// The answer's id (the chunks' `id`).
    pub id: String,
    /// The model that answered.
    pub model: String,
    /// Creation time, in seconds since the Unix epoch.
    pub created: u64,
}

/// A server-sent event of a stream in the dialect the client spoke (an Anthropic upstream
/// behind the Messages front door, a Responses upstream behind the Responses one), kept
/// as its upstream sent it: the event's name and data are slices of the read buffer, and
/// the HTTP surface writes them as they are instead of decoding the event into a
/// [`ChatChunk`] and encoding it again.
///
/// The provider that read the event sets what layers need from a stream: the usage (on
/// the event that ends the answer), whether the event has chat content (one choice) and
/// whether it finishes the answer. [`decode`](Self::decode) gives the chat view of the
/// event (the chunk the provider would have made for a chat client), carrying its frame
/// under [`NATIVE_EVENT`](crate::dialect::NATIVE_EVENT), so a layer that works on typed
/// chunks still hands the edge the event as it came.
///
/// ```
/// use std::sync::Arc;
/// use llm_tower_core::{NativeEvent, StreamHead};
/// use llm_tower_core::dialect::Dialect;
///
/// let head = Arc::new(StreamHead { id: "msg_1".into(), model: "claude".into(), created: 7 });
/// let data = br#"{"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"hi"}}"#;
/// let ev = NativeEvent::new(Dialect::Messages, "content_block_delta".into(), data.as_slice().into(), head)
///     .unwrap()
///     .with_choice(false);
/// let mut out = Vec::new();
/// ev.write_frame(&mut out);
/// assert!(out.starts_with(b"event: content_block_delta\ndata: {\"type\""));
/// assert_eq!((ev.choice_count(), ev.has_finish()), (1, false));
/// let chunk = ev.decode().unwrap();
/// assert_eq!((chunk.id.as_str(), chunk.choices[0].delta.text()), ("msg_1", Some("hi")));
/// ```
#[derive(Clone, PartialEq)]
pub struct NativeEvent {
    dialect: Dialect,
    name: Name,
    data: Bytes,
    head: Arc<StreamHead>,
    // Boxed: only the event that ends a stream carries them.
    usage: Option<Box<Usage>>,
    answer: Option<Box<Answer>>,
    choice: bool,
    finish: bool,
    tool: Option<u32>,
}

impl NativeEvent {
    /// The event `name` with its `data` (written as they are; [`decode`](Self::decode)
    /// refuses data that is not the JSON of an event), of a stream in `dialect` whose
    /// events share `head`; no content, no usage. `None` unless the name is UTF-8.
    pub fn new(dialect: Dialect, name: Bytes, data: Bytes, head: Arc<StreamHead>) -> Option<Self> {
        Some(Self {
            dialect,
            name: Name::new(name)?,
            data,
            head,
            usage: None,
            answer: None,
            choice: false,
            finish: false,
            tool: None,
        })
    }

    /// The event has chat content (its view has one choice); `finish`: it ends the answer.
    #[must_use]
    pub fn with_choice(mut self, finish: bool) -> Self {
        self.choice = true;
        self.finish = finish;
        self
    }

    /// The usage the event carries (set on the event that ends the answer).
    #[must_use]
    pub fn with_usage(mut self, usage: Usage) -> Self {
        self.usage = Some(Box::new(usage));
        self
    }

    /// Marks the event as carrying the whole answer (a Responses stream's last event
    /// carries the response object): its `range` in the data, and the `store_id` a
    /// response store keeps it under. An out-of-range `range` is ignored.
    ///
    /// ```
    /// use std::sync::Arc;
    /// use llm_tower_core::NativeEvent;
    /// use llm_tower_core::dialect::Dialect;
    ///
    /// let data = br#"{"type":"response.completed","response":{"id":"resp_1"}}"#;
    /// let ev = NativeEvent::new(Dialect::Responses, "response.completed".into(), data.as_slice().into(), Arc::default())
    ///     .unwrap()
    ///     .with_answer(40..55, Some("resp_1".into()));
    /// assert_eq!(ev.answer(), Some((br#"{"id":"resp_1"}"#.as_slice(), Some("resp_1"))));
    /// ```
    #[must_use]
    pub fn with_answer(mut self, range: Range<usize>, store_id: Option<String>) -> Self {
        if self.data.get(range.clone()).is_some() {
            self.answer = Some(Box::new(Answer { range, store_id }));
        }
        self
    }

    /// The whole answer the event carries and the id to store it under, when its reader
    /// marked it ([`with_answer`](Self::with_answer)).
    pub fn answer(&self) -> Option<(&[u8], Option<&str>)> {
        let a = self.answer.as_deref()?;
        Some((self.data.get(a.range.clone())?, a.store_id.as_deref()))
    }

    /// The chat tool-call index the event speaks of (a tool block's start or arguments),
    /// or, on the event that ends a Responses stream, how many calls the answer made.
    #[must_use]
    pub fn with_tool(mut self, tool: u32) -> Self {
        self.tool = Some(tool);
        self
    }

    /// The dialect of the stream.
    pub fn dialect(&self) -> Dialect {
        self.dialect
    }

    /// The event's name (`event:` line).
    pub fn name(&self) -> &str {
        match &self.name {
            Name::Known(n) => n,
            // Checked in `new`.
            Name::Other(b) => std::str::from_utf8(b).unwrap_or_default(),
        }
    }

    /// The event's data, as received.
    pub fn data(&self) -> &Bytes {
        &self.data
    }

    /// What the stream's events share.
    pub fn head(&self) -> &StreamHead {
        &self.head
    }

    /// The tool index set by [`with_tool`](Self::with_tool).
    pub fn tool(&self) -> Option<u32> {
        self.tool
    }

    /// The usage, on the event that ends the answer.
    pub fn usage(&self) -> Option<&Usage> {
        self.usage.as_deref()
    }

    /// 1 when the event has chat content, else 0 (framing events: pings, a block's end).
    pub fn choice_count(&self) -> usize {
        usize::from(self.choice)
    }

    /// Whether the event ends the answer with a finish reason.
    pub fn has_finish(&self) -> bool {
        self.finish
    }

    /// The choice indices in the event and those that finished in it, as bit sets (see
    /// [`EncodedChunk::choice_indices`](crate::EncodedChunk::choice_indices)): these
    /// dialects have one choice, index 0.
    pub fn choice_indices(&self) -> (u64, u64) {
        (u64::from(self.choice), u64::from(self.finish))
    }

    /// Bytes [`write_frame`](Self::write_frame) writes (for a single-line data).
    pub fn frame_len(&self) -> usize {
        self.name().len() + self.data.len() + 16
    }

    /// Appends the event's frame: `event: {name}\ndata: {data}\n\n` (a multi-line data
    /// one `data:` line each, as it arrived).
    pub fn write_frame(&self, out: &mut Vec<u8>) {
        dialect::messages::write_frame_bytes(out, self.name().as_bytes(), &self.data);
    }

    /// The event's frame as [`NATIVE_EVENT`](crate::dialect::NATIVE_EVENT) holds it.
    pub fn frame(&self) -> String {
        let mut out = Vec::with_capacity(self.frame_len());
        self.write_frame(&mut out);
        String::from_utf8(out)
            .unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned())
    }

    /// The chat view of the event (see the type's documentation); a
    /// [`Transport`](crate::ErrorKind::Transport) error when its data is not the event
    /// it was read as.
    pub fn decode(&self) -> Result<ChatChunk, LlmError> {
        let mut chunk = match self.dialect {
            Dialect::Messages => dialect::messages::native_view(self),
            Dialect::Responses => dialect::responses::native_view(self),
            Dialect::Chat => Err(LlmError::internal("a chat event kept as a native one")),
        }?;
        dialect::messages::attach_native(&mut chunk, self.frame().into());
        Ok(chunk)
    }

    /// The same event with its name and data in one allocation of their own size (see
    /// [`EncodedChunk::compacted`](crate::EncodedChunk::compacted)).
    pub fn compacted(&self) -> Self {
        let mut all = BytesMut::with_capacity(self.copied_len());
        self.copy_into(&mut all);
        self.with_parts(&mut all.freeze())
    }

    /// What [`copy_into`](Self::copy_into) appends: the data, and the name unless it is
    /// one of the dialects' own.
    pub(crate) fn copied_len(&self) -> usize {
        let name = match &self.name {
            Name::Known(_) => 0,
            Name::Other(b) => b.len(),
        };
        name + self.data.len()
    }

    /// Appends the name (unless it is one of the dialects' own) and the data to `buf`
    /// (see [`with_parts`](Self::with_parts)).
    pub(crate) fn copy_into(&self, buf: &mut BytesMut) {
        if let Name::Other(b) = &self.name {
            buf.extend_from_slice(b);
        }
        buf.extend_from_slice(&self.data);
    }

    /// The same event with its name and data taken from the front of `buf`, a copy made
    /// by [`copy_into`](Self::copy_into).
    pub(crate) fn with_parts(&self, buf: &mut Bytes) -> Self {
        let name = match &self.name {
            Name::Known(n) => Name::Known(n),
            Name::Other(b) => Name::Other(buf.split_to(b.len().min(buf.len()))),
        };
        let data = buf.split_to(self.data.len().min(buf.len()));
        debug_assert!(name == self.name && data == self.data);
        Self {
            name,
            data,
            ..self.clone()
        }
    }
}

/// Where the answer an event carries is in its data (see [`NativeEvent::with_answer`]).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Answer {
    range: Range<usize>,
    store_id: Option<String>,
}

/// An event's name. The dialects' own names (nearly every event) are kept as the static
/// strings they equal: no slice of the read buffer to count, and no UTF-8 check each
/// time the name is read.
#[derive(Clone, PartialEq, Eq)]
enum Name {
    Known(&'static str),
    /// Any other name, checked as UTF-8 when made.
    Other(Bytes),
}

impl Name {
    fn new(name: Bytes) -> Option<Self> {
        if let Some(known) = known_name(&name) {
            return Some(Self::Known(known));
        }
        std::str::from_utf8(&name).ok()?;
        Some(Self::Other(name))
    }
}

/// The Messages and Responses APIs' event names.
fn known_name(name: &[u8]) -> Option<&'static str> {
    Some(match name {
        b"message_start" => "message_start",
        b"message_delta" => "message_delta",
        b"message_stop" => "message_stop",
        b"content_block_start" => "content_block_start",
        b"content_block_delta" => "content_block_delta",
        b"content_block_stop" => "content_block_stop",
        b"ping" => "ping",
        b"error" => "error",
        b"response.created" => "response.created",
        b"response.in_progress" => "response.in_progress",
        b"response.queued" => "response.queued",
        b"response.completed" => "response.completed",
        b"response.incomplete" => "response.incomplete",
        b"response.failed" => "response.failed",
        b"response.output_item.added" => "response.output_item.added",
        b"response.output_item.done" => "response.output_item.done",
        b"response.content_part.added" => "response.content_part.added",
        b"response.content_part.done" => "response.content_part.done",
        b"response.output_text.delta" => "response.output_text.delta",
        b"response.output_text.done" => "response.output_text.done",
        b"response.output_text.annotation.added" => "response.output_text.annotation.added",
        b"response.refusal.delta" => "response.refusal.delta",
        b"response.refusal.done" => "response.refusal.done",
        b"response.function_call_arguments.delta" => "response.function_call_arguments.delta",
        b"response.function_call_arguments.done" => "response.function_call_arguments.done",
        b"response.reasoning_summary_part.added" => "response.reasoning_summary_part.added",
        b"response.reasoning_summary_part.done" => "response.reasoning_summary_part.done",
        b"response.reasoning_summary_text.delta" => "response.reasoning_summary_text.delta",
        b"response.reasoning_summary_text.done" => "response.reasoning_summary_text.done",
        _ => return None,
    })
}

impl fmt::Debug for NativeEvent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NativeEvent")
            .field("dialect", &self.dialect)
            .field("name", &self.name())
            .field("data", &String::from_utf8_lossy(&self.data))
            .field("usage", &self.usage)
            .field("answer", &self.answer)
            .field("choice", &self.choice)
            .field("finish", &self.finish)
            .field("tool", &self.tool)
            .finish()
    }
}

/// Serializes as its chat view ([`decode`](NativeEvent::decode)), which carries the frame:
/// what a stored stream of such events reads back as, and what a writer of the dialect
/// writes as it came.
impl Serialize for NativeEvent {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.decode()
            .map_err(serde::ser::Error::custom)?
            .serialize(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::StreamEvent;

    fn event(name: &[u8]) -> Option<NativeEvent> {
        let data = Bytes::from_static(br#"{"type":"x"}"#);
        NativeEvent::new(
            Dialect::Responses,
            Bytes::copy_from_slice(name),
            data,
            Arc::default(),
        )
    }

    #[test]
    fn names_of_the_dialects_and_others_read_and_frame_alike() {
        for name in [
            "response.output_text.delta",
            "message_stop",
            "a.name.of.its.own",
        ] {
            let ev = event(name.as_bytes()).unwrap();
            assert_eq!(ev.name(), name);
            let mut out = Vec::new();
            ev.write_frame(&mut out);
            assert_eq!(
                out,
                format!("event: {name}\ndata: {{\"type\":\"x\"}}\n\n").as_bytes()
            );
            assert_eq!(ev.frame_len(), name.len() + 12 + 16);
        }
        assert!(matches!(event(b"ping").unwrap().name, Name::Known(_)));
        assert!(matches!(event(b"pong").unwrap().name, Name::Other(_)));
        assert!(event(b"\xff\xfe").is_none(), "a name that is not UTF-8");
    }

    #[test]
    fn compaction_keeps_every_name_and_copies_only_the_unknown_ones() {
        let events: Vec<StreamEvent> = ["response.created", "vendor.extra", "response.completed"]
            .into_iter()
            .map(|n| event(n.as_bytes()).unwrap().into())
            .collect();
        let compacted = StreamEvent::compacted(&events);
        assert_eq!(compacted, events);
        let copied: usize = events
            .iter()
            .map(|e| match e {
                StreamEvent::Native(n) => n.copied_len(),
                _ => 0,
            })
            .sum();
        assert_eq!(copied, "vendor.extra".len() + 3 * r#"{"type":"x"}"#.len());
        if let StreamEvent::Native(e) = &events[1] {
            assert_eq!(e.compacted(), *e);
        }
    }
}
