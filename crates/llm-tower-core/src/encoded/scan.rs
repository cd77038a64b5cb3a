//! The shape check of a chat completion, by hand: one pass over the bytes that validates
//! the JSON and reads the model, the usage and the number of choices.
//!
//! Why: through serde the check costs ~21 instructions per byte of an upstream's answer,
//! mostly the generic visitor machinery's per-key overhead; this pass costs ~15 (the core
//! serde bench's `encoded` case: 12 450 → 9 080 instructions for the mock's answer).
//!
//! Contract: [`check`] never accepts what the serde check ([`super::Shape`]) refuses, and
//! reads the same values. Where it is unsure (escaped keys, escaped strings in typed fields,
//! numbers serde reads in other ways, unknown usage fields, deep nesting, duplicate fields,
//! any error) it returns `None` and the serde check decides, errors and their messages
//! included. A differential test in the parent module holds it to this.

use std::ops::Range;

use crate::{CompletionTokensDetails, PromptTokensDetails, Usage};

/// What the check reads.
pub(super) struct Found {
    pub(super) model: Range<usize>,
    pub(super) usage: Option<Usage>,
    pub(super) choices: usize,
}

/// `json` must be valid UTF-8 (checked by the caller).
pub(super) fn check(json: &[u8]) -> Option<Found> {
    let mut s = Scanner::new(json, false);
    let found = s.top()?;
    s.ws();
    (s.i == json.len()).then_some(found)
}

/// What the check of a Responses API answer reads.
pub(super) struct ResponsesFound {
    pub(super) model: Range<usize>,
    pub(super) usage: Option<Usage>,
}

/// The shape check of a Responses API answer, by hand (the serde check is
/// `dialect::responses::check_response`, under the same contract as [`check`]): `id` and
/// `model` strings, `object` exactly `response`, `output` an array, `usage` absent, `null`
/// or its counts. `json` must be valid UTF-8 (checked by the caller).
pub(super) fn check_responses(json: &[u8]) -> Option<ResponsesFound> {
    let mut s = Scanner::new(json, false);
    let found = s.responses_top()?;
    s.ws();
    (s.i == json.len()).then_some(found)
}

// Below serde_json's own recursion limit (128), so that anything deeper is serde's call.
const MAX_DEPTH: u32 = 100;

struct Scanner<'a> {
    b: &'a [u8],
    i: usize,
    depth: u32,
    /// Refuse `\u` escapes that do not spell a character (lone surrogates), as serde does
    /// where it decodes a string (the chunk check: its strings are decoded, not skipped).
    strict: bool,
}

/// What the chunk check reads.
pub(super) struct ChunkFound {
    // Boxed: only the last chunk of a stream carries it, and every chunk's result is
    // moved a few times.
    pub(super) usage: Option<Box<Usage>>,
    pub(super) choices: usize,
    pub(super) finish: bool,
    /// Bit `i`: a choice of index `i` (< 64) is in the chunk / has a finish reason.
    pub(super) indices: u64,
    pub(super) finished: u64,
    /// A choice has an index of 64 or more (not in the bit sets).
    pub(super) wide: bool,
}

/// The shape check of one `chat.completion.chunk` event's JSON: validates the JSON and the
/// types of every field [`ChatChunk`](crate::ChatChunk) types, reads the usage, the number
/// of choices and whether one of them finished. `None` where it is unsure (tool-call
/// deltas, escaped keys, duplicate fields, an `error` field, deep nesting, any error): the
/// caller then decodes the event with serde.
pub(super) fn check_chunk(json: &[u8]) -> Option<ChunkFound> {
    let mut s = Scanner::new(json, true);
    let found = s.chunk()?;
    s.ws();
    (s.i == json.len()).then_some(found)
}

/// What the check of a Messages API answer reads: its model, and its usage's
/// `input_tokens`, `output_tokens`, `cache_creation_input_tokens` and
/// `cache_read_input_tokens` (each `null` or a `u64`).
pub(crate) struct MessagesFound {
    pub(crate) model: Range<usize>,
    pub(crate) usage: Option<[Option<u64>; 4]>,
}

/// The shape check of a Messages API answer, by hand (the serde check is
/// `dialect::messages::check_response`, under the same contract as [`check`]): `id` and
/// `model` strings, `type` exactly `message`, `content` an array, `usage` absent, `null`
/// or an object whose counts are read (its other members skipped). `json` must be valid
/// UTF-8 (checked by the caller).
pub(crate) fn check_messages(json: &[u8]) -> Option<MessagesFound> {
    const COUNTS: [&[u8]; 4] = [
        b"input_tokens",
        b"output_tokens",
        b"cache_creation_input_tokens",
        b"cache_read_input_tokens",
    ];
    let mut s = Scanner::new(json, false);
    let mut seen = [false; 6];
    let (mut model, mut usage) = (None, None);
    s.object(|s, key| {
        match key {
            b"id" => {
                once(&mut seen[0])?;
                s.plain_string()?;
            }
            b"type" => {
                once(&mut seen[1])?;
                let r = s.plain_string()?;
                (&s.b[r] == b"message").then_some(())?;
            }
            b"role" => {
                once(&mut seen[2])?;
                s.value()?;
            }
            b"model" => {
                once(&mut seen[3])?;
                model = Some(s.plain_string()?);
            }
            b"content" => {
                once(&mut seen[4])?;
                s.array(Scanner::value)?;
            }
            b"usage" => {
                once(&mut seen[5])?;
                let mut counts = [None; 4];
                usage = s
                    .opt_object(COUNTS, |s, i| {
                        counts[i] = s.opt_u64()?;
                        Some(())
                    })?
                    .map(|()| counts);
            }
            _ => s.value()?,
        }
        Some(())
    })?;
    s.ws();
    (s.i == json.len() && seen[0] && seen[1] && seen[4]).then_some(MessagesFound {
        model: model?,
        usage,
    })
}

/// What the scan of a Responses stream's last event reads: the range of its `response`
/// object, and that object's `id` and `status` (`None` when absent or `null`).
pub(crate) struct FinalFound {
    pub(crate) response: Range<usize>,
    pub(crate) id: Option<Range<usize>>,
    pub(crate) status: Option<Range<usize>>,
}

/// The scan of a Responses stream's last event: an object whose `response` member is an
/// object, with `id` and `status` strings without escapes, or `null`. `None` for anything
/// else or anything unusual (escapes in those, duplicates, deep nesting, any error): the
/// caller then reads it with serde. `json` must be valid UTF-8 (checked by the caller).
pub(crate) fn final_response(json: &[u8]) -> Option<FinalFound> {
    let mut s = Scanner::new(json, false);
    let mut found = None;
    s.object(|s, key| {
        if key != b"response" {
            return s.value();
        }
        if found.is_some() {
            return None;
        }
        s.ws();
        let start = s.i;
        let mut read = [None, None];
        // A `null` response is left to serde too (the second `?`).
        s.opt_object([b"id", b"status"], |s, i| {
            if !s.null() {
                read[i] = Some(s.plain_string()?);
            }
            Some(())
        })??;
        let [id, status] = read;
        found = Some(FinalFound {
            response: start..s.i,
            id,
            status,
        });
        Some(())
    })?;
    s.ws();
    (s.i == json.len()).then_some(found?)
}

/// What the check of a streamed Messages event reads: its `type`, its block `index`, and
/// its `delta`'s `type` and `text` (the range between the quotes, and whether it holds
/// escapes).
pub(crate) struct MessagesEventFound {
    pub(crate) kind: Range<usize>,
    pub(crate) index: Option<u64>,
    /// The delta's `type`, and its `text`.
    pub(crate) delta: Option<(Range<usize>, Option<StringFound>)>,
}

/// A string's range between the quotes, and whether it holds escapes.
pub(crate) type StringFound = (Range<usize>, bool);

/// The shape check of the common streamed Messages events (text deltas, pings, a block's
/// end, the message's end): an object of `type`, `index` and a `delta` of `type` and
/// `text`, nothing else. `None` for any other event or anything unusual (another field,
/// escaped keys or type, duplicates, deep nesting, lone surrogates, any error): the
/// caller then reads it with serde. `json` must be valid UTF-8 (checked by the caller).
pub(crate) fn check_messages_event(json: &[u8]) -> Option<MessagesEventFound> {
    let mut s = Scanner::new(json, true);
    let (mut seen_kind, mut seen_index, mut seen_delta) = (false, false, false);
    let (mut kind, mut index, mut delta) = (None, None, None);
    s.object(|s, key| match key {
        b"type" => {
            once(&mut seen_kind)?;
            kind = Some(s.plain_string()?);
            Some(())
        }
        b"index" => {
            once(&mut seen_index)?;
            index = Some(s.u64()?);
            Some(())
        }
        b"delta" => {
            once(&mut seen_delta)?;
            let (mut seen_type, mut seen_text) = (false, false);
            let (mut dkind, mut text) = (None, None);
            s.object(|s, key| match key {
                b"type" => {
                    once(&mut seen_type)?;
                    dkind = Some(s.plain_string()?);
                    Some(())
                }
                b"text" => {
                    once(&mut seen_text)?;
                    text = Some(s.string()?);
                    Some(())
                }
                _ => None,
            })?;
            delta = Some((dkind?, text));
            Some(())
        }
        _ => None,
    })?;
    s.ws();
    (s.i == json.len()).then_some(MessagesEventFound {
        kind: kind?,
        index,
        delta,
    })
}

/// What the check of a streamed Responses event reads: its `type`, `output_index` and
/// `delta` (the range between the quotes, and whether it holds escapes), and what is read
/// of its `item` and `response`, when it has them.
pub(crate) struct ResponsesEventFound {
    pub(crate) kind: Range<usize>,
    pub(crate) output_index: Option<u64>,
    pub(crate) delta: Option<StringFound>,
    // Boxed: few events carry them, and every event's result is moved a few times.
    pub(crate) item: Option<Box<ItemFound>>,
    pub(crate) response: Option<Box<ResponseFound>>,
}

/// An event's `item`: its `type`, `call_id`, `name` and `arguments`, each where it is a
/// string (a member of another type reads as absent, as `Value::as_str` reads it).
#[derive(Default)]
pub(crate) struct ItemFound {
    pub(crate) kind: Option<StringFound>,
    pub(crate) call_id: Option<StringFound>,
    pub(crate) name: Option<StringFound>,
    pub(crate) arguments: Option<StringFound>,
}

/// An event's `response`: where the object is, its `id`, `model` and `status` where
/// they are strings (`odd` when `id` or `status` is there and neither a string nor
/// `null`), `created_at` where it is a `u64`, and its usage (`None` when absent, `null` or
/// not an object).
#[derive(Default)]
pub(crate) struct ResponseFound {
    pub(crate) range: Range<usize>,
    pub(crate) id: Option<StringFound>,
    pub(crate) model: Option<StringFound>,
    pub(crate) status: Option<StringFound>,
    pub(crate) odd: bool,
    pub(crate) created_at: Option<u64>,
    pub(crate) usage: Option<Usage>,
}

/// The shape check of a streamed Responses event: an object whose `type` is a string,
/// `output_index` a `u64`, `delta` a string, `item` and `response` `null` or objects
/// (read for [`ItemFound`] and [`ResponseFound`]), any other member skipped. `None` for
/// anything unusual (escaped keys or type, duplicates, deep nesting, lone surrogates, a
/// usage with fields it does not know, any error): the caller then reads it with serde.
/// `json` must be valid UTF-8 (checked by the caller).
pub(crate) fn check_responses_event(json: &[u8]) -> Option<ResponsesEventFound> {
    let mut s = Scanner::new(json, true);
    let mut seen = [false; 5];
    let (mut kind, mut output_index, mut delta) = (None, None, None);
    let (mut item, mut response) = (None, None);
    s.object(|s, key| match key {
        b"type" => {
            once(&mut seen[0])?;
            kind = Some(s.plain_string()?);
            Some(())
        }
        b"output_index" => {
            once(&mut seen[1])?;
            output_index = Some(s.u64()?);
            Some(())
        }
        b"delta" => {
            once(&mut seen[2])?;
            delta = Some(s.string()?);
            Some(())
        }
        b"item" => {
            once(&mut seen[3])?;
            item = s.event_item()?;
            Some(())
        }
        b"response" => {
            once(&mut seen[4])?;
            response = s.event_response()?;
            Some(())
        }
        _ => s.value(),
    })?;
    s.ws();
    (s.i == json.len()).then_some(ResponsesEventFound {
        kind: kind?,
        output_index,
        delta,
        item,
        response,
    })
}

/// The choice indices of a chunk, as bit sets.
#[derive(Default)]
struct ChoiceSets {
    finish: bool,
    indices: u64,
    finished: u64,
    wide: bool,
}

impl ChoiceSets {
    fn add(&mut self, index: u32, finish: bool) {
        self.finish |= finish;
        match 1u64.checked_shl(index) {
            Some(bit) => {
                self.indices |= bit;
                if finish {
                    self.finished |= bit;
                }
            }
            None => self.wide = true,
        }
    }
}

fn hex4(b: &[u8], i: usize) -> Option<u16> {
    let hex = b.get(i..i + 4)?;
    let text = std::str::from_utf8(hex).ok()?;
    if !hex.iter().all(u8::is_ascii_hexdigit) {
        return None;
    }
    u16::from_str_radix(text, 16).ok()
}

/// Records that a field was seen; `None` (give up) when it was already.
fn once(seen: &mut bool) -> Option<()> {
    (!std::mem::replace(seen, true)).then_some(())
}

impl<'a> Scanner<'a> {
    fn new(b: &'a [u8], strict: bool) -> Self {
        Self {
            b,
            i: 0,
            depth: 0,
            strict,
        }
    }

    fn ws(&mut self) {
        while let Some(b' ' | b'\n' | b'\r' | b'\t') = self.b.get(self.i) {
            self.i += 1;
        }
    }

    fn peek(&mut self) -> Option<u8> {
        self.ws();
        self.b.get(self.i).copied()
    }

    fn eat(&mut self, c: u8) -> Option<()> {
        (self.peek()? == c).then(|| self.i += 1)
    }

    /// A string; returns the range between the quotes and whether it holds escapes.
    fn string(&mut self) -> Option<(Range<usize>, bool)> {
        self.eat(b'"')?;
        let start = self.i;
        let mut escaped = false;
        loop {
            self.i = skip_plain(self.b, self.i);
            match *self.b.get(self.i)? {
                b'"' => {
                    self.i += 1;
                    return Some((start..self.i - 1, escaped));
                }
                b'\\' => {
                    escaped = true;
                    match *self.b.get(self.i + 1)? {
                        b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't' => self.i += 2,
                        b'u' => {
                            let code = hex4(self.b, self.i + 2)?;
                            self.i += 6;
                            if self.strict {
                                match code {
                                    0xD800..=0xDBFF => {
                                        // A leading surrogate: its trailing half must follow.
                                        if self.b.get(self.i..self.i + 2)? != b"\\u" {
                                            return None;
                                        }
                                        let low = hex4(self.b, self.i + 2)?;
                                        if !(0xDC00..=0xDFFF).contains(&low) {
                                            return None;
                                        }
                                        self.i += 6;
                                    }
                                    0xDC00..=0xDFFF => return None,
                                    _ => {}
                                }
                            }
                        }
                        _ => return None,
                    }
                }
                // A control character: it must be escaped.
                _ => return None,
            }
        }
    }

    /// A string serde reads as a `str`: without escapes (serde also checks what `\u`
    /// escapes decode to; such strings are left to it).
    fn plain_string(&mut self) -> Option<Range<usize>> {
        match self.string()? {
            (r, false) => Some(r),
            (_, true) => None,
        }
    }

    fn literal(&mut self, word: &[u8]) -> Option<()> {
        self.ws();
        let end = self.i + word.len();
        (self.b.get(self.i..end)? == word).then(|| self.i = end)
    }

    /// `null`, if that is what comes next.
    fn null(&mut self) -> bool {
        self.literal(b"null").is_some()
    }

    /// An unsigned integer as serde reads a `u64`: digits only, no leading zero, no
    /// overflow (`-0`, fractions and exponents are left to serde).
    fn u64(&mut self) -> Option<u64> {
        self.ws();
        let start = self.i;
        let mut n: u64 = 0;
        while let Some(&c @ b'0'..=b'9') = self.b.get(self.i) {
            n = n.checked_mul(10)?.checked_add(u64::from(c - b'0'))?;
            self.i += 1;
        }
        let len = self.i - start;
        if len == 0 || (len > 1 && self.b[start] == b'0') {
            return None;
        }
        match self.b.get(self.i) {
            Some(b'.' | b'e' | b'E') => None,
            _ => Some(n),
        }
    }

    /// `null` or a `u64`.
    fn opt_u64(&mut self) -> Option<Option<u64>> {
        if self.null() {
            Some(None)
        } else {
            self.u64().map(Some)
        }
    }

    /// Any number, by the JSON grammar.
    fn number(&mut self) -> Option<()> {
        self.ws();
        let digits = |s: &mut Self| {
            let start = s.i;
            while let Some(b'0'..=b'9') = s.b.get(s.i) {
                s.i += 1;
            }
            s.i > start
        };
        if self.b.get(self.i) == Some(&b'-') {
            self.i += 1;
        }
        match self.b.get(self.i)? {
            b'0' => self.i += 1,
            b'1'..=b'9' => {
                digits(self);
            }
            _ => return None,
        }
        if self.b.get(self.i) == Some(&b'.') {
            self.i += 1;
            digits(self).then_some(())?;
        }
        if let Some(b'e' | b'E') = self.b.get(self.i) {
            self.i += 1;
            if let Some(b'+' | b'-') = self.b.get(self.i) {
                self.i += 1;
            }
            digits(self).then_some(())?;
        }
        Some(())
    }

    /// Any JSON value, checked and skipped.
    fn value(&mut self) -> Option<()> {
        match self.peek()? {
            b'"' => self.string().map(drop),
            b'{' => self.object(|s, _| s.value()),
            b'[' => self.array(Self::value).map(drop),
            b't' => self.literal(b"true"),
            b'f' => self.literal(b"false"),
            b'n' => self.literal(b"null"),
            _ => self.number(),
        }
    }

    /// An object; `field` reads each value, given the key (keys with escapes are left to
    /// serde: they may spell a known field).
    fn object(&mut self, mut field: impl FnMut(&mut Self, &[u8]) -> Option<()>) -> Option<()> {
        self.items(b'{', b'}', |s| {
            let key = s.plain_string()?;
            s.eat(b':')?;
            let b = s.b;
            field(s, &b[key])
        })
        .map(drop)
    }

    /// An array; `item` reads each item. Returns the number of items.
    fn array(&mut self, item: impl FnMut(&mut Self) -> Option<()>) -> Option<usize> {
        self.items(b'[', b']', item)
    }

    /// The comma-separated items between `open` and `close`; returns how many.
    fn items(
        &mut self,
        open: u8,
        close: u8,
        mut item: impl FnMut(&mut Self) -> Option<()>,
    ) -> Option<usize> {
        self.eat(open)?;
        self.depth += 1;
        if self.depth > MAX_DEPTH {
            return None;
        }
        let mut n = 0;
        if self.peek()? == close {
            self.i += 1;
        } else {
            loop {
                item(self)?;
                n += 1;
                match self.peek()? {
                    b',' => self.i += 1,
                    c if c == close => {
                        self.i += 1;
                        break;
                    }
                    _ => return None,
                }
            }
        }
        self.depth -= 1;
        Some(n)
    }

    fn top(&mut self) -> Option<Found> {
        let (mut id, mut object, mut created) = (false, false, false);
        let (mut model, mut choices, mut usage) = (None, None, None);
        self.object(|s, key| {
            match key {
                b"id" => {
                    once(&mut id)?;
                    s.plain_string()?;
                }
                b"object" => {
                    once(&mut object)?;
                    s.plain_string()?;
                }
                b"created" => {
                    once(&mut created)?;
                    s.u64()?;
                }
                b"model" if model.is_none() => model = Some(s.plain_string()?),
                b"choices" if choices.is_none() => choices = Some(s.array(Self::choice)?),
                b"usage" if usage.is_none() => usage = Some(s.usage()?),
                b"model" | b"choices" | b"usage" => return None,
                _ => s.value()?,
            }
            Some(())
        })?;
        id.then_some(())?;
        Some(Found {
            model: model?,
            usage: usage.flatten(),
            choices: choices?,
        })
    }

    /// A chunk: `id`, `object`, `model` strings, `created` a `u64`, `choices` the chunk
    /// choices, `usage` null or a usage; an `error` field is left to the caller's decoder.
    fn chunk(&mut self) -> Option<ChunkFound> {
        let mut seen = [false; 6];
        let (mut choices, mut usage) = (0, None);
        let mut sets = ChoiceSets::default();
        self.object(|s, key| {
            match key {
                b"id" | b"object" | b"model" => {
                    let i = match key {
                        b"id" => 0,
                        b"object" => 1,
                        _ => 2,
                    };
                    once(&mut seen[i])?;
                    s.string()?;
                }
                b"created" => {
                    once(&mut seen[3])?;
                    s.u64()?;
                }
                b"choices" => {
                    once(&mut seen[4])?;
                    choices = s.array(|s| s.chunk_choice(&mut sets))?;
                }
                b"usage" => {
                    once(&mut seen[5])?;
                    usage = s.usage()?.map(Box::new);
                }
                b"error" => return None,
                _ => s.value()?,
            }
            Some(())
        })?;
        Some(ChunkFound {
            usage,
            choices,
            finish: sets.finish,
            indices: sets.indices,
            finished: sets.finished,
            wide: sets.wide,
        })
    }

    fn chunk_choice(&mut self, sets: &mut ChoiceSets) -> Option<()> {
        let mut seen = [false; 3];
        let (mut index, mut finish) = (0, false);
        self.object(|s, key| {
            match key {
                b"index" => {
                    once(&mut seen[0])?;
                    index = u32::try_from(s.u64()?).ok()?;
                }
                b"delta" => {
                    once(&mut seen[1])?;
                    s.delta()?;
                }
                b"finish_reason" => {
                    once(&mut seen[2])?;
                    if !s.null() {
                        s.string()?;
                        finish = true;
                    }
                }
                _ => s.value()?,
            }
            Some(())
        })?;
        sets.add(index, finish);
        Some(())
    }

    /// A delta without tool calls (those are left to serde).
    fn delta(&mut self) -> Option<()> {
        let mut seen = [false; 2];
        self.object(|s, key| match key {
            b"role" => {
                once(&mut seen[0])?;
                s.string().map(drop)
            }
            b"content" => {
                once(&mut seen[1])?;
                if s.null() {
                    Some(())
                } else {
                    s.string().map(drop)
                }
            }
            b"tool_calls" | b"function_call" => None,
            _ => s.value(),
        })
    }

    fn choice(&mut self) -> Option<()> {
        let (mut index, mut message, mut finish) = (false, false, false);
        self.object(|s, key| {
            match key {
                b"index" => {
                    once(&mut index)?;
                    u32::try_from(s.u64()?).ok()?;
                }
                b"message" => {
                    once(&mut message)?;
                    s.message()?;
                }
                b"finish_reason" => {
                    once(&mut finish)?;
                    if !s.null() {
                        s.plain_string()?;
                    }
                }
                _ => s.value()?,
            }
            Some(())
        })?;
        message.then_some(())
    }

    fn message(&mut self) -> Option<()> {
        let (mut role, mut content) = (false, false);
        self.object(|s, key| match key {
            b"role" => {
                once(&mut role)?;
                s.plain_string().map(drop)
            }
            b"content" => {
                once(&mut content)?;
                s.value()
            }
            _ => s.value(),
        })?;
        role.then_some(())
    }

    /// `null`, or the usage object: read here when it holds only the fields `Usage` types,
    /// else checked and handed to serde (its other fields go to `extra`).
    fn usage(&mut self) -> Option<Option<Usage>> {
        if self.null() {
            return Some(None);
        }
        self.ws();
        let start = self.i;
        let depth = self.depth;
        if let Some(u) = self.typed_usage() {
            return Some(Some(u));
        }
        self.i = start;
        self.depth = depth;
        self.value()?;
        serde_json::from_slice(&self.b[start..self.i])
            .ok()
            .map(Some)
    }

    fn typed_usage(&mut self) -> Option<Usage> {
        let mut u = Usage::default();
        let mut seen = [false; 5];
        self.object(|s, key| {
            match key {
                b"prompt_tokens" => {
                    once(&mut seen[0])?;
                    u.prompt_tokens = s.u64()?;
                }
                b"completion_tokens" => {
                    once(&mut seen[1])?;
                    u.completion_tokens = s.u64()?;
                }
                b"total_tokens" => {
                    once(&mut seen[2])?;
                    u.total_tokens = s.u64()?;
                }
                b"prompt_tokens_details" => {
                    once(&mut seen[3])?;
                    const NAMES: [&[u8]; 3] =
                        [b"cached_tokens", b"cache_write_tokens", b"audio_tokens"];
                    u.prompt_tokens_details =
                        s.counts(NAMES)?
                            .map(|[cached, write, audio]| PromptTokensDetails {
                                cached_tokens: cached,
                                cache_write_tokens: write,
                                audio_tokens: audio,
                                ..PromptTokensDetails::default()
                            });
                }
                b"completion_tokens_details" => {
                    once(&mut seen[4])?;
                    const NAMES: [&[u8]; 4] = [
                        b"reasoning_tokens",
                        b"audio_tokens",
                        b"accepted_prediction_tokens",
                        b"rejected_prediction_tokens",
                    ];
                    u.completion_tokens_details =
                        s.counts(NAMES)?
                            .map(|[reasoning, audio, accepted, rejected]| {
                                CompletionTokensDetails {
                                    reasoning_tokens: reasoning,
                                    audio_tokens: audio,
                                    accepted_prediction_tokens: accepted,
                                    rejected_prediction_tokens: rejected,
                                    ..CompletionTokensDetails::default()
                                }
                            });
                }
                _ => return None,
            }
            Some(())
        })?;
        Some(u)
    }

    /// `null` (`Some(None)`), or an object whose members of the given names are read
    /// by `field` at most once each (a repeated one gives up, as serde refuses it) and the
    /// rest skipped.
    fn opt_object<const N: usize>(
        &mut self,
        names: [&[u8]; N],
        mut field: impl FnMut(&mut Self, usize) -> Option<()>,
    ) -> Option<Option<()>> {
        if self.null() {
            return Some(None);
        }
        if self.peek()? != b'{' {
            return None;
        }
        let mut seen = [false; N];
        self.object(|s, key| match names.iter().position(|&n| n == key) {
            Some(i) => {
                once(&mut seen[i])?;
                field(s, i)
            }
            None => s.value(),
        })?;
        Some(Some(()))
    }

    /// A member read as `Value::as_str` reads it: a string, or any other value (checked
    /// and skipped) as absent.
    fn lenient_string(&mut self) -> Option<Option<StringFound>> {
        if self.peek()? == b'"' {
            self.string().map(Some)
        } else {
            self.value().map(|()| None)
        }
    }

    /// A streamed event's `item` (see [`ItemFound`]).
    fn event_item(&mut self) -> Option<Option<Box<ItemFound>>> {
        let mut item = Box::<ItemFound>::default();
        let read = self.opt_object([b"type", b"call_id", b"name", b"arguments"], |s, i| {
            let v = s.lenient_string()?;
            match i {
                0 => item.kind = v,
                1 => item.call_id = v,
                2 => item.name = v,
                _ => item.arguments = v,
            }
            Some(())
        })?;
        Some(read.map(|()| item))
    }

    /// A streamed event's `response` (see [`ResponseFound`]).
    fn event_response(&mut self) -> Option<Option<Box<ResponseFound>>> {
        let mut r = Box::<ResponseFound>::default();
        self.ws();
        let start = self.i;
        let names = [
            b"id".as_slice(),
            b"model",
            b"status",
            b"created_at",
            b"usage",
        ];
        let read = self.opt_object(names, |s, i| {
            match i {
                0 | 2 => {
                    let null = s.peek()? == b'n';
                    let v = s.lenient_string()?;
                    r.odd |= v.is_none() && !null;
                    if i == 0 { r.id = v } else { r.status = v }
                }
                1 => r.model = s.lenient_string()?,
                3 => {
                    r.created_at = match s.peek()? {
                        b'0'..=b'9' => Some(s.u64()?),
                        _ => s.value().map(|()| None)?,
                    }
                }
                _ => {
                    r.usage = match s.peek()? {
                        b'{' | b'n' => s.responses_usage()?,
                        _ => s.value().map(|()| None)?,
                    }
                }
            }
            Some(())
        })?;
        r.range = start..self.i;
        Some(read.map(|()| r))
    }

    fn responses_top(&mut self) -> Option<ResponsesFound> {
        let (mut id, mut object, mut output) = (false, false, false);
        let (mut model, mut usage) = (None, None);
        self.object(|s, key| {
            match key {
                b"id" => {
                    once(&mut id)?;
                    s.plain_string()?;
                }
                b"object" => {
                    once(&mut object)?;
                    let r = s.plain_string()?;
                    (&s.b[r] == b"response").then_some(())?;
                }
                b"output" => {
                    once(&mut output)?;
                    s.array(Self::value)?;
                }
                b"model" if model.is_none() => model = Some(s.plain_string()?),
                b"usage" if usage.is_none() => usage = Some(s.responses_usage()?),
                b"model" | b"usage" => return None,
                _ => s.value()?,
            }
            Some(())
        })?;
        (id && object && output).then_some(())?;
        Some(ResponsesFound {
            model: model?,
            usage: usage.flatten(),
        })
    }

    /// `null`, or a Responses usage object of `u64` counts: `input_tokens`,
    /// `output_tokens`, `total_tokens`, and the details' `cached_tokens` /
    /// `reasoning_tokens` (each `null` or a `u64`); anything else is left to serde.
    fn responses_usage(&mut self) -> Option<Option<Usage>> {
        if self.null() {
            return Some(None);
        }
        let mut seen = [false; 5];
        let (mut input, mut output) = (0, 0);
        let (mut cached, mut reasoning) = (None, None);
        self.object(|s, key| {
            match key {
                b"input_tokens" => {
                    once(&mut seen[0])?;
                    input = s.u64()?;
                }
                b"output_tokens" => {
                    once(&mut seen[1])?;
                    output = s.u64()?;
                }
                b"total_tokens" => {
                    once(&mut seen[2])?;
                    s.u64()?;
                }
                b"input_tokens_details" => {
                    once(&mut seen[3])?;
                    cached = s.counts([b"cached_tokens"])?.and_then(|[c]| c);
                }
                b"output_tokens_details" => {
                    once(&mut seen[4])?;
                    reasoning = s.counts([b"reasoning_tokens"])?.and_then(|[r]| r);
                }
                _ => return None,
            }
            Some(())
        })?;
        let mut u = Usage::new(input, output);
        if cached.is_some() {
            u.prompt_tokens_details = Some(PromptTokensDetails {
                cached_tokens: cached,
                ..PromptTokensDetails::default()
            });
        }
        if reasoning.is_some() {
            u.completion_tokens_details = Some(CompletionTokensDetails {
                reasoning_tokens: reasoning,
                ..CompletionTokensDetails::default()
            });
        }
        Some(Some(u))
    }

    /// `null`, or an object of the named counts, each `null` or a `u64` (any other field
    /// is left to serde: it goes to `extra`).
    fn counts<const N: usize>(&mut self, names: [&[u8]; N]) -> Option<Option<[Option<u64>; N]>> {
        if self.null() {
            return Some(None);
        }
        let mut values = [None; N];
        let mut seen = [false; N];
        self.object(|s, key| {
            let i = names.iter().position(|&n| n == key)?;
            once(&mut seen[i])?;
            values[i] = s.opt_u64()?;
            Some(())
        })?;
        Some(Some(values))
    }
}

/// The index of the first `"`, `\\` or control character in `b` from `i` (or `b.len()`).
/// Eight bytes at a time: most of an answer is plain string content.
fn skip_plain(b: &[u8], mut i: usize) -> usize {
    const ONES: u64 = u64::from_ne_bytes([1; 8]);
    const HIGH: u64 = ONES << 7;
    // High bit of each byte that is zero (exact for the lowest such byte, which is all
    // that is used).
    let zero = |w: u64| w.wrapping_sub(ONES) & !w & HIGH;
    while let Some(chunk) = b.get(i..i + 8) {
        let Ok(bytes) = <[u8; 8]>::try_from(chunk) else {
            break;
        };
        let w = u64::from_le_bytes(bytes);
        let special = zero(w ^ (ONES * u64::from(b'"')))
            | zero(w ^ (ONES * u64::from(b'\\')))
            | (w.wrapping_sub(ONES * 0x20) & !w & HIGH);
        if special != 0 {
            return i + special.trailing_zeros() as usize / 8;
        }
        i += 8;
    }
    while let Some(&c) = b.get(i) {
        if c == b'"' || c == b'\\' || c < 0x20 {
            break;
        }
        i += 1;
    }
    i
}

#[cfg(test)]
mod tests {
    use super::{check_responses, skip_plain};
    use crate::dialect::responses::check_response;

    /// The Responses check must never accept what serde refuses, nor read other values:
    /// on every document one byte away from the seeds (deleted, replaced or inserted).
    #[test]
    fn the_responses_pass_is_never_more_lenient_than_serde() {
        let seeds: [&[u8]; 3] = [
            br#"{"id":"resp_1","object":"response","created_at":1,"model":"gpt-4o","output":[{"type":"message","content":[{"type":"output_text","text":"hi"}]}],"usage":{"input_tokens":3,"input_tokens_details":{"cached_tokens":1},"output_tokens":2,"output_tokens_details":{"reasoning_tokens":0},"total_tokens":5},"metadata":{}}"#,
            br#"{"id":"r","object":"response","model":"m","output":[],"usage":null}"#,
            br#"{"object":"response","output":[1],"model":"m","id":"r","usage":{"input_tokens":1,"output_tokens":10}}"#,
        ];
        let mut accepted = 0;
        let mut check = |doc: &[u8]| {
            let Some(text) = std::str::from_utf8(doc).ok() else {
                return;
            };
            let Some(found) = check_responses(text.as_bytes()) else {
                return;
            };
            accepted += 1;
            let (model, usage) = check_response(doc)
                .unwrap_or_else(|e| panic!("serde refuses what the scan accepted ({e}): {text}"));
            assert_eq!(&text[found.model], model, "{text}");
            assert_eq!(found.usage, usage, "{text}");
        };
        for seed in seeds {
            check(seed);
            let seed = std::str::from_utf8(seed).expect("the seeds are UTF-8");
            crate::json::one_byte_away(seed, &mut check);
        }
        assert!(
            accepted > 100,
            "the seeds and many neighbours are read by hand"
        );
    }

    #[test]
    fn skip_plain_stops_at_the_first_special_byte_at_any_offset() {
        for special in [b'"', b'\\', 0x00, 0x1f] {
            for len in 0..20 {
                for at in 0..=len {
                    // Plain bytes around it, non-ASCII and 0x20 / 0x7f included.
                    let mut b: Vec<u8> = (0..len)
                        .map(|i| [b'a', 0x20, 0x7f, 0xc3, 0xa9][i % 5])
                        .collect();
                    if at < len {
                        b[at] = special;
                        // A second one after it must not move the answer.
                        if at + 1 < len {
                            b[at + 1] = b'"';
                        }
                    }
                    assert_eq!(skip_plain(&b, 0), at, "{special:#x} at {at} of {len}");
                }
            }
        }
        assert_eq!(skip_plain(b"abc\"", 3), 3);
        assert_eq!(skip_plain(b"abc", 3), 3);
    }
}
