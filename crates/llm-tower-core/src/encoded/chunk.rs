//! [`EncodedChunk`]: one stream chunk kept as the JSON its upstream sent.

use std::fmt;

use bytes::Bytes;
use serde::{Serialize, Serializer};

use super::scan;
use crate::{ChatChunk, LlmError, Usage};

/// A `chat.completion.chunk` kept in the JSON encoding its upstream sent, so that an
/// OpenAI-compatible gateway forwards each event of a stream as it came instead of
/// decoding it into a [`ChatChunk`] and encoding it again (on a stream of short chunks, most
/// of a gateway's own work per request).
///
/// [`from_json`](Self::from_json) checks, in one pass over the bytes without building
/// anything, that the document is JSON and that the fields `ChatChunk` types have their
/// types, and reads what layers need from a stream: the usage, the number of choices and
/// whether a choice finished. Layers and library users that need the content call
/// [`decode`](Self::decode).
///
/// ```
/// use llm_tower_core::EncodedChunk;
///
/// let json = br#"{"id":"c1","object":"chat.completion.chunk","model":"m","choices":[{"index":0,"delta":{"content":"hi"},"finish_reason":null}]}"#;
/// let chunk = EncodedChunk::from_json(json.as_slice().into()).unwrap();
/// assert_eq!(chunk.json().as_ref(), json); // forwarded byte for byte
/// assert_eq!((chunk.choice_count(), chunk.has_finish()), (1, false));
/// assert_eq!(chunk.decode().unwrap().choices[0].delta.text(), Some("hi"));
///
/// let last = br#"{"id":"c1","model":"m","choices":[],"usage":{"prompt_tokens":3,"completion_tokens":1,"total_tokens":4}}"#;
/// let last = EncodedChunk::from_json(last.as_slice().into()).unwrap();
/// assert_eq!(last.usage().unwrap().total_tokens, 4);
///
/// // Not in the common shape (here: an error event): left to a full decode.
/// assert!(EncodedChunk::from_json(br#"{"error":{"message":"boom"}}"#.as_slice().into()).is_none());
/// ```
#[derive(Clone, PartialEq)]
pub struct EncodedChunk {
    json: Bytes,
    // Boxed: only the last chunk of a stream carries it.
    usage: Option<Box<Usage>>,
    choices: u32,
    finish: bool,
    // Bit `i`: choice `i` (< 64) is in the chunk / finished in it; `wide`: an index >= 64.
    indices: u64,
    finished: u64,
    wide: bool,
}

impl EncodedChunk {
    /// Checks `json` (see the type's documentation) and keeps it. `None` when the document
    /// is not in the shape the check reads (it is not JSON, a typed field has another type,
    /// or it holds what the check leaves to serde: tool-call deltas, escaped keys, an
    /// `error` field, duplicate fields): decode such an event with
    /// [`ChatChunk::from_slice`], which accepts or refuses it with the reason.
    pub fn from_json(json: Bytes) -> Option<Self> {
        std::str::from_utf8(&json).ok()?;
        let found = scan::check_chunk(&json)?;
        Some(Self {
            usage: found.usage,
            choices: u32::try_from(found.choices).ok()?,
            finish: found.finish,
            indices: found.indices,
            finished: found.finished,
            wide: found.wide,
            json,
        })
    }

    /// The JSON document, as received.
    pub fn json(&self) -> &Bytes {
        &self.json
    }

    /// The `usage` field, if present and not `null`.
    pub fn usage(&self) -> Option<&Usage> {
        self.usage.as_deref()
    }

    /// How many items `choices` has (0 on the usage-only chunk that ends a stream).
    pub fn choice_count(&self) -> usize {
        self.choices as usize
    }

    /// Whether a choice of this chunk has a finish reason.
    pub fn has_finish(&self) -> bool {
        self.finish
    }

    /// The choice indices in the chunk and those that finished in it, as bit sets (bit `i`
    /// for index `i`); `None` when an index is 64 or more. What a layer checking that every
    /// choice of a stream finished needs, without decoding.
    pub fn choice_indices(&self) -> Option<(u64, u64)> {
        (!self.wide).then_some((self.indices, self.finished))
    }

    /// The typed chunk. Where the document's deeper parts do not have the types
    /// [`ChatChunk`] requires (the check leaves a few to serde: numbers beyond `f64`'s range
    /// in untyped fields), a [`Transport`](crate::ErrorKind::Transport) error, as for any
    /// malformed upstream event.
    pub fn decode(&self) -> Result<ChatChunk, LlmError> {
        ChatChunk::from_slice(&self.json)
            .map_err(|e| LlmError::transport(format!("malformed JSON in a stream event: {e}")))
    }

    /// The same chunk with its JSON in an allocation of its own size: an event's JSON is
    /// a slice of the read buffer, which the slice keeps alive whole. What a store that
    /// keeps chunks in memory keeps.
    pub fn compacted(&self) -> Self {
        self.with_json(Bytes::copy_from_slice(&self.json))
    }

    /// The same chunk read from `json`, a copy of its document.
    pub(crate) fn with_json(&self, json: Bytes) -> Self {
        debug_assert_eq!(json, self.json);
        Self {
            json,
            ..self.clone()
        }
    }
}

impl fmt::Debug for EncodedChunk {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EncodedChunk")
            .field("json", &String::from_utf8_lossy(&self.json))
            .field("usage", &self.usage)
            .field("choices", &self.choices)
            .field("finish", &self.finish)
            .finish()
    }
}

/// Serializes as the JSON document itself (with `serde_json`; other formats get it as a
/// string).
impl Serialize for EncodedChunk {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let raw: &serde_json::value::RawValue =
            serde_json::from_slice(&self.json).map_err(serde::ser::Error::custom)?;
        raw.serialize(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn enc(s: &str) -> Option<EncodedChunk> {
        EncodedChunk::from_json(Bytes::copy_from_slice(s.as_bytes()))
    }

    const SEEDS: [&str; 6] = [
        r#"{"id":"chatcmpl-1","object":"chat.completion.chunk","created":1795749268,"model":"gpt-4o-mini","service_tier":"default","system_fingerprint":"fp","choices":[{"index":0,"delta":{"role":"assistant","content":"","refusal":null},"logprobs":null,"finish_reason":null}],"usage":null}"#,
        r#"{"id":"chatcmpl-1","object":"chat.completion.chunk","created":1,"model":"m","choices":[{"index":0,"delta":{"content":"mock \"x\"\n \u00e9\ud83d\ude00"},"logprobs":null,"finish_reason":null}],"usage":null}"#,
        r#"{"id":"chatcmpl-1","object":"chat.completion.chunk","created":1,"model":"m","choices":[{"index":0,"delta":{},"logprobs":null,"finish_reason":"stop"}],"usage":null}"#,
        r#"{"id":"chatcmpl-1","object":"chat.completion.chunk","created":1,"model":"m","choices":[],"usage":{"prompt_tokens":7,"completion_tokens":11,"total_tokens":18,"prompt_tokens_details":{"cached_tokens":0,"audio_tokens":0}}}"#,
        r#" { "id" : "c" , "choices" : [ { "delta" : { "content" : null } , "x" : [ 1 , 2.5e-3 , -0 , true , false , { } ] } ] } "#,
        r#"{"model":"m","choices":[{"index":1,"delta":{"content":"a"},"finish_reason":"length"},{"delta":{"role":"tool"}}],"usage":{"prompt_tokens":1,"cost":0.5}}"#,
    ];

    /// What serde reads of a chunk, for comparison with the check.
    fn by_serde(json: &[u8]) -> Option<(Option<Usage>, usize, bool)> {
        let c = ChatChunk::from_slice(json).ok()?;
        let finish = c.choices.iter().any(|c| c.finish_reason().is_some());
        Some((c.usage().cloned(), c.choices.len(), finish))
    }

    /// The choice bit sets, from serde's reading.
    fn bits(json: &[u8]) -> (u64, u64) {
        let c = ChatChunk::from_slice(json).unwrap();
        c.choices.iter().fold((0, 0), |(seen, fin), ch| {
            let bit = 1u64 << ch.index;
            let f = if ch.finish_reason().is_some() { bit } else { 0 };
            (seen | bit, fin | f)
        })
    }

    #[test]
    fn reads_what_serde_reads_on_the_common_chunks() {
        for seed in SEEDS {
            let c = enc(seed).expect(seed);
            assert_eq!(c.json().as_ref(), seed.as_bytes());
            let want = by_serde(seed.as_bytes()).expect(seed);
            assert_eq!(
                (c.usage().cloned(), c.choice_count(), c.has_finish()),
                want,
                "{seed}"
            );
            assert_eq!(c.choice_indices(), Some(bits(seed.as_bytes())), "{seed}");
            assert!(c.decode().is_ok());
        }
    }

    #[test]
    fn leaves_the_rest_to_serde() {
        for other in [
            "",
            "not json",
            "[]",
            r#"{"error":{"message":"boom"}}"#,
            r#"{"id":"c","choices":[{"delta":{"tool_calls":[{"index":0}]}}]}"#,
            r#"{"id":"c","id":"d","choices":[]}"#,
            r#"{"i\u0064":"c","choices":[]}"#,
            r#"{"id":"\ud800","choices":[]}"#,
            r#"{"id":"\udc00x","choices":[]}"#,
            r#"{"id":1,"choices":[]}"#,
            r#"{"choices":[{"delta":null}]}"#,
            r#"{"choices":[{"index":-1}]}"#,
            r#"{"choices":[{"finish_reason":1}]}"#,
            r#"{"choices":{}}"#,
            r#"{"usage":{"prompt_tokens":"7"}}"#,
            r#"{"choices":[]} trailing"#,
        ] {
            assert!(enc(other).is_none(), "{other}");
        }
    }

    /// The check never accepts what serde refuses, nor reads other values: checked on every
    /// document one byte away from the seeds (deleted, replaced or inserted, with the bytes
    /// that matter to JSON).
    #[test]
    fn is_never_more_lenient_than_serde() {
        let (mut variants, mut accepted) = (0, 0);
        for seed in SEEDS {
            crate::json::one_byte_away(seed, |doc| {
                variants += 1;
                let Some(c) = EncodedChunk::from_json(Bytes::copy_from_slice(doc)) else {
                    return;
                };
                accepted += 1;
                let text = String::from_utf8_lossy(doc);
                let want = by_serde(doc)
                    .unwrap_or_else(|| panic!("serde refuses what the check accepted: {text}"));
                assert_eq!(
                    (c.usage().cloned(), c.choice_count(), c.has_finish()),
                    want,
                    "{text}"
                );
                if let Some(got) = c.choice_indices() {
                    assert_eq!(got, bits(doc), "{text}");
                }
            });
        }
        assert!(
            variants > 20_000 && accepted > 2_000,
            "{variants} {accepted}"
        );
    }

    #[test]
    fn serializes_as_the_document_itself() {
        let c = enc(SEEDS[1]).unwrap();
        assert_eq!(serde_json::to_string(&c).unwrap(), SEEDS[1]);
        assert_eq!(c.compacted(), c);
    }
}
