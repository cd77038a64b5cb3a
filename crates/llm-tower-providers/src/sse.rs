//! An incremental server-sent events parser (the WHATWG `text/event-stream` format).
//!
//! Feed it bytes as they arrive, in any split, and take complete events out. It handles
//! `\n`, `\r\n` and lone `\r` line ends (also when a `\r\n` pair is split between two
//! reads), comments and keep-alive lines (`: ping`), multi-line `data:` fields and
//! `event:` names. A single-line `data` field (the case of every LLM API) is returned as a
//! slice of the receive buffer, without copying.
//!
//! ```
//! use llm_tower_providers::sse::SseParser;
//!
//! let mut p = SseParser::new();
//! p.push(b": keep-alive\r\nevent: message_start\r\ndata: {\"a\":");
//! assert!(p.next_event().unwrap().is_none()); // not complete yet
//! p.push(b"1}\r\n\r\ndata: [DONE]\n\n");
//! let ev = p.next_event().unwrap().unwrap();
//! assert_eq!(ev.event(), Some("message_start"));
//! assert_eq!(ev.data(), br#"{"a":1}"#);
//! assert_eq!(p.next_event().unwrap().unwrap().data(), b"[DONE]");
//! assert!(p.next_event().unwrap().is_none());
//! ```

use std::fmt;

use bytes::{Buf, Bytes, BytesMut};

/// Default limit on the size of one event (and of the unparsed buffer): 16 MiB.
pub const DEFAULT_MAX_EVENT_BYTES: usize = 16 * 1024 * 1024;

/// One dispatched event.
#[derive(Clone, PartialEq, Eq)]
pub struct SseEvent {
    event: Option<Bytes>,
    data: Bytes,
    id: Option<Bytes>,
}

impl SseEvent {
    /// The `event:` name, if the event had one (and it is UTF-8).
    pub fn event(&self) -> Option<&str> {
        self.event
            .as_deref()
            .and_then(|b| std::str::from_utf8(b).ok())
    }
    /// The `event:` name as shared bytes, if the event had one.
    pub fn event_bytes(&self) -> Option<&Bytes> {
        self.event.as_ref()
    }
    /// The data: the `data:` lines joined with `\n`.
    pub fn data(&self) -> &[u8] {
        &self.data
    }
    /// The data as shared bytes.
    pub fn data_bytes(&self) -> &Bytes {
        &self.data
    }
    /// The `id:` field, if present.
    pub fn id(&self) -> Option<&[u8]> {
        self.id.as_deref()
    }
}

impl fmt::Debug for SseEvent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SseEvent")
            .field("event", &self.event())
            .field("data", &String::from_utf8_lossy(&self.data))
            .finish()
    }
}

/// A framing error: an event grew past the size limit without ending.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SseError {
    limit: usize,
}

impl fmt::Display for SseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "server-sent event larger than {} bytes without an end",
            self.limit
        )
    }
}

impl SseError {
    /// The limit that was exceeded, in bytes.
    pub fn limit(&self) -> usize {
        self.limit
    }
}

impl std::error::Error for SseError {}

/// The incremental parser. See the [module docs](self).
#[derive(Debug)]
pub struct SseParser {
    buf: BytesMut,
    /// Start of the first line not yet parsed (relative to `buf`).
    pos: usize,
    /// The previous line ended in `\r`: a `\n` at `pos` belongs to it.
    skip_lf: bool,
    /// `data` value ranges of the event being read.
    data: Vec<(usize, usize)>,
    event: Option<(usize, usize)>,
    id: Option<(usize, usize)>,
    max_event_bytes: usize,
}

impl Default for SseParser {
    fn default() -> Self {
        Self::new()
    }
}

impl SseParser {
    /// A parser with the [default size limit](DEFAULT_MAX_EVENT_BYTES).
    pub fn new() -> Self {
        Self::with_max_event_bytes(DEFAULT_MAX_EVENT_BYTES)
    }

    /// A parser that fails once one event exceeds `max` bytes.
    pub fn with_max_event_bytes(max: usize) -> Self {
        Self {
            buf: BytesMut::new(),
            pos: 0,
            skip_lf: false,
            data: Vec::new(),
            event: None,
            id: None,
            max_event_bytes: max,
        }
    }

    /// Appends received bytes.
    pub fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// Bytes received but not yet returned as events.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// The next complete event, `Ok(None)` if more bytes are needed.
    pub fn next_event(&mut self) -> Result<Option<SseEvent>, SseError> {
        loop {
            if self.skip_lf {
                if self.pos >= self.buf.len() {
                    return Ok(None);
                }
                if self.buf[self.pos] == b'\n' {
                    self.pos += 1;
                }
                self.skip_lf = false;
            }
            let Some(i) = memchr::memchr2(b'\n', b'\r', &self.buf[self.pos..]) else {
                if self.buf.len() > self.max_event_bytes {
                    return Err(SseError {
                        limit: self.max_event_bytes,
                    });
                }
                return Ok(None);
            };
            let start = self.pos;
            let end = start + i;
            self.skip_lf = self.buf[end] == b'\r';
            self.pos = end + 1;
            if start == end {
                if let Some(ev) = self.dispatch() {
                    return Ok(Some(ev));
                }
            } else {
                self.field(start, end);
                if self.pos > self.max_event_bytes {
                    return Err(SseError {
                        limit: self.max_event_bytes,
                    });
                }
            }
        }
    }

    /// At the end of the body: the event left without its closing blank line, if any
    /// (a final unterminated line counts as a line). Some servers omit the last blank line
    /// after `data: [DONE]`; accepting it here keeps that answer.
    pub fn finish(&mut self) -> Option<SseEvent> {
        // Complete lines first (the caller may not have drained them).
        if let Ok(Some(ev)) = self.next_event() {
            return Some(ev);
        }
        if self.skip_lf && self.buf.get(self.pos) == Some(&b'\n') {
            self.pos += 1;
        }
        self.skip_lf = false;
        if self.pos < self.buf.len() {
            let (start, end) = (self.pos, self.buf.len());
            self.pos = end;
            self.field(start, end);
        }
        self.dispatch()
    }

    fn field(&mut self, start: usize, end: usize) {
        let line = &self.buf[start..end];
        if line[0] == b':' {
            return; // a comment or keep-alive
        }
        let (name, value_start) = match memchr::memchr(b':', line) {
            Some(c) => {
                let mut v = start + c + 1;
                if v < end && self.buf[v] == b' ' {
                    v += 1;
                }
                (&line[..c], v)
            }
            None => (line, end),
        };
        match name {
            b"data" => self.data.push((value_start, end)),
            b"event" => self.event = Some((value_start, end)),
            b"id" => self.id = Some((value_start, end)),
            _ => {} // `retry` and unknown fields are ignored, as the spec says
        }
    }

    /// Ends the current event at a blank line; drops it if it had no `data`.
    fn dispatch(&mut self) -> Option<SseEvent> {
        if self.data.is_empty() {
            self.buf.advance(self.pos);
            self.pos = 0;
            self.event = None;
            self.id = None;
            return None;
        }
        let region = self.buf.split_to(self.pos).freeze();
        self.pos = 0;
        let data = if let [(s, e)] = self.data[..] {
            region.slice(s..e)
        } else {
            let len = self.data.iter().map(|(s, e)| e - s + 1).sum::<usize>() - 1;
            let mut joined = BytesMut::with_capacity(len);
            for (i, &(s, e)) in self.data.iter().enumerate() {
                if i > 0 {
                    joined.extend_from_slice(b"\n");
                }
                joined.extend_from_slice(&region[s..e]);
            }
            joined.freeze()
        };
        self.data.clear();
        let event = self.event.take().map(|(s, e)| region.slice(s..e));
        let id = self.id.take().map(|(s, e)| region.slice(s..e));
        Some(SseEvent { event, data, id })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all(p: &mut SseParser) -> Vec<(Option<String>, String)> {
        let mut out = Vec::new();
        while let Some(ev) = p.next_event().unwrap() {
            out.push((
                ev.event().map(str::to_owned),
                String::from_utf8(ev.data().to_vec()).unwrap(),
            ));
        }
        out
    }

    #[test]
    fn line_endings_comments_multiline() {
        let mut p = SseParser::new();
        p.push(b":hi\n\nevent: a\ndata: x\ndata:y\r\ndata\r\r\nid: 7\ndata: z\r\r");
        let evs = all(&mut p);
        assert_eq!(
            evs,
            vec![(Some("a".into()), "x\ny\n".into()), (None, "z".into())]
        );
        assert!(p.finish().is_none());
    }

    #[test]
    fn event_without_data_is_dropped() {
        let mut p = SseParser::new();
        p.push(b"event: ping\n\ndata: 1\n\n");
        assert_eq!(all(&mut p), vec![(None, "1".into())]);
    }

    #[test]
    fn finish_keeps_unterminated_last_event() {
        let mut p = SseParser::new();
        p.push(b"data: [DONE]");
        assert!(p.next_event().unwrap().is_none());
        assert_eq!(p.finish().unwrap().data(), b"[DONE]");
        let mut p = SseParser::new();
        p.push(b"data: [DONE]\r");
        assert!(p.next_event().unwrap().is_none());
        assert_eq!(p.finish().unwrap().data(), b"[DONE]");
    }

    #[test]
    fn oversized_event_is_an_error() {
        let mut p = SseParser::with_max_event_bytes(8);
        p.push(b"data: 0123456789");
        assert!(p.next_event().is_err());
        let mut p = SseParser::with_max_event_bytes(8);
        p.push(b"data: 1\ndata: 2\ndata: 3\n");
        assert!(p.next_event().is_err());
    }

    #[test]
    fn split_crlf_across_pushes() {
        let mut p = SseParser::new();
        p.push(b"data: a\r");
        assert!(p.next_event().unwrap().is_none());
        p.push(b"\n\r");
        assert_eq!(p.next_event().unwrap().unwrap().data(), b"a");
        p.push(b"\ndata: b\n\n");
        assert_eq!(p.next_event().unwrap().unwrap().data(), b"b");
    }
}
