//! [`EncodedResponse`]: a complete response kept as the JSON an upstream sent.

use std::fmt;

use bytes::Bytes;
use serde::de::{self, Deserializer, IgnoredAny, SeqAccess, Visitor};
use serde::{Deserialize, Serialize, Serializer};

use crate::{ChatResponse, Dialect, LlmError, Usage};

mod chunk;
mod native;
pub(crate) mod scan;

pub use chunk::EncodedChunk;
pub use native::{NativeEvent, StreamHead};

/// A complete chat-completions response kept in the JSON encoding its upstream sent, so
/// that an OpenAI-compatible gateway forwards it as it came instead of decoding it into a
/// [`ChatResponse`] and encoding it again (on a short answer, a fifth of a gateway's own
/// work per request).
///
/// [`from_json`](Self::from_json) checks the document's shape (an object with a string
/// `id` and `model`, a `choices` array whose items carry a `message` object with a string
/// `role`, and the types of `object`, `created`, `finish_reason`, `index` and `usage`)
/// without building it, and reads the usage and model. Layers that need the content call
/// [`decode`](Self::decode).
///
/// ```
/// use llm_tower_core::EncodedResponse;
///
/// let json = br#"{"id":"c1","model":"m","choices":[{"index":0,"message":{"role":"assistant","content":"hi"},"finish_reason":"stop"}],"usage":{"prompt_tokens":3,"completion_tokens":1,"total_tokens":4}}"#;
/// let resp = EncodedResponse::from_json(json.as_slice().into()).unwrap();
/// assert_eq!(resp.model(), "m");
/// assert_eq!(resp.usage().unwrap().total_tokens, 4);
/// assert_eq!(resp.json().as_ref(), json); // forwarded byte for byte
/// assert_eq!(resp.decode().unwrap().text(), "hi");
///
/// // Not a chat completion: refused at once.
/// assert!(EncodedResponse::from_json(br#"{"id":"c1","model":"m"}"#.as_slice().into()).is_err());
/// assert!(EncodedResponse::from_json(br#"{"id":"c1","model":"m","choices":[{}]}"#.as_slice().into()).is_err());
/// ```
#[derive(Clone, PartialEq)]
pub struct EncodedResponse {
    json: Bytes,
    model: String,
    // Boxed: this is a variant of `ResponseBody`, which moves through every layer's future.
    usage: Option<Box<Usage>>,
    choices: usize,
    dialect: Dialect,
}

impl EncodedResponse {
    /// Checks that `json` is a chat completion (see the type's documentation) and keeps it.
    pub fn from_json(json: Bytes) -> serde_json::Result<Self> {
        // The hand-written pass reads the common case; serde decides the rest, and words
        // every error.
        if let Ok(text) = std::str::from_utf8(&json)
            && let Some(found) = scan::check(text.as_bytes())
        {
            return Ok(Self {
                model: text[found.model].to_owned(),
                usage: found.usage.map(Box::new),
                choices: found.choices,
                json,
                dialect: Dialect::Chat,
            });
        }
        let shape: Shape = crate::json::from_slice(&json)?;
        Ok(Self {
            json,
            model: shape.model,
            usage: shape.usage.map(Box::new),
            choices: shape.choices.0,
            dialect: Dialect::Chat,
        })
    }

    /// Checks that `json` is an Anthropic Messages API answer (an object with a string
    /// `id` and `model`, `"type": "message"`, a `content` array and, if present, a `usage`
    /// object of token counts) and keeps it: a gateway forwards it as it came to a client
    /// that speaks Messages, and [`decode`](Self::decode) translates it for the others.
    ///
    /// ```
    /// use llm_tower_core::{Dialect, EncodedResponse};
    /// let json = br#"{"id":"msg_1","type":"message","role":"assistant","model":"claude","content":[{"type":"text","text":"hi"}],"stop_reason":"end_turn","usage":{"input_tokens":3,"output_tokens":1}}"#;
    /// let r = EncodedResponse::from_messages_json(json.as_slice().into()).unwrap();
    /// assert_eq!(r.dialect(), Dialect::Messages);
    /// assert_eq!(r.usage().unwrap().total_tokens, 4);
    /// assert_eq!(r.decode().unwrap().text(), "hi");
    /// ```
    pub fn from_messages_json(json: Bytes) -> serde_json::Result<Self> {
        let (model, usage) = crate::dialect::messages::check_response(&json)?;
        Ok(Self {
            json,
            model,
            usage: usage.map(Box::new),
            choices: 1,
            dialect: Dialect::Messages,
        })
    }

    /// Checks that `json` is an OpenAI Responses API answer (`"object": "response"`, a
    /// string `id` and `model`, an `output` array, an optional `usage` object) and keeps
    /// it, as [`from_messages_json`](Self::from_messages_json) does for Messages.
    ///
    /// ```
    /// use llm_tower_core::{Dialect, EncodedResponse};
    /// let json = br#"{"id":"resp_1","object":"response","model":"gpt-4o","status":"completed","output":[{"type":"message","role":"assistant","content":[{"type":"output_text","text":"hi"}]}],"usage":{"input_tokens":3,"output_tokens":1,"total_tokens":4}}"#;
    /// let r = EncodedResponse::from_responses_json(json.as_slice().into()).unwrap();
    /// assert_eq!(r.dialect(), Dialect::Responses);
    /// assert_eq!(r.usage().unwrap().total_tokens, 4);
    /// assert_eq!(r.decode().unwrap().text(), "hi");
    /// ```
    pub fn from_responses_json(json: Bytes) -> serde_json::Result<Self> {
        // As `from_json`: the hand-written pass reads the common case, serde the rest.
        if let Ok(text) = std::str::from_utf8(&json)
            && let Some(found) = scan::check_responses(text.as_bytes())
        {
            return Ok(Self {
                model: text[found.model].to_owned(),
                usage: found.usage.map(Box::new),
                choices: 1,
                json,
                dialect: Dialect::Responses,
            });
        }
        let (model, usage) = crate::dialect::responses::check_response(&json)?;
        Ok(Self {
            json,
            model,
            usage: usage.map(Box::new),
            choices: 1,
            dialect: Dialect::Responses,
        })
    }

    /// The same answer with its JSON in an allocation of its own size (an upstream's body
    /// is often a slice of a larger read buffer, which the slice keeps alive whole): what a
    /// store that keeps answers in memory keeps. Nothing is parsed again.
    ///
    /// ```
    /// use llm_tower_core::{Dialect, EncodedResponse};
    /// let json = br#"{"id":"msg_1","type":"message","role":"assistant","model":"claude","content":[{"type":"text","text":"hi"}],"usage":{"input_tokens":3,"output_tokens":1}}"#;
    /// let r = EncodedResponse::from_messages_json(json.as_slice().into()).unwrap();
    /// let c = r.compacted();
    /// assert_eq!((c.json(), c.dialect(), c.usage()), (r.json(), Dialect::Messages, r.usage()));
    /// ```
    pub fn compacted(&self) -> Self {
        Self {
            json: Bytes::copy_from_slice(&self.json),
            ..self.clone()
        }
    }

    /// The dialect of the document: [`Dialect::Chat`] unless built by
    /// [`from_messages_json`](Self::from_messages_json) or
    /// [`from_responses_json`](Self::from_responses_json).
    pub fn dialect(&self) -> Dialect {
        self.dialect
    }

    /// The JSON document, as received.
    pub fn json(&self) -> &Bytes {
        &self.json
    }

    /// The JSON document, as received.
    pub fn into_json(self) -> Bytes {
        self.json
    }

    /// The `model` field.
    pub fn model(&self) -> &str {
        &self.model
    }

    /// How many items `choices` has.
    pub fn choice_count(&self) -> usize {
        self.choices
    }

    /// The `usage` field, if present and not `null`.
    pub fn usage(&self) -> Option<&Usage> {
        self.usage.as_deref()
    }

    /// The typed response. Where the document's deeper parts (message content, tool calls,
    /// usage details) do not have the types [`ChatResponse`] requires, a
    /// [`Transport`](crate::ErrorKind::Transport) error, as for any malformed upstream answer.
    pub fn decode(&self) -> Result<ChatResponse, LlmError> {
        if self.dialect == Dialect::Messages {
            let v: serde_json::Value = crate::json::from_slice(&self.json)
                .map_err(|e| LlmError::transport(format!("malformed JSON in the response: {e}")))?;
            return crate::dialect::messages::response_from_json(&v)
                .map_err(|e| LlmError::transport(format!("malformed Messages API response: {e}")));
        }
        if self.dialect == Dialect::Responses {
            let v: serde_json::Value = crate::json::from_slice(&self.json)
                .map_err(|e| LlmError::transport(format!("malformed JSON in the response: {e}")))?;
            return crate::dialect::responses::response_from_json(&v).map_err(|e| {
                LlmError::transport(format!("malformed Responses API response: {e}"))
            });
        }
        ChatResponse::from_slice(&self.json)
            .map_err(|e| LlmError::transport(format!("malformed JSON in the response: {e}")))
    }
}

impl fmt::Debug for EncodedResponse {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EncodedResponse")
            .field("bytes", &self.json.len())
            .field("model", &self.model)
            .field("usage", &self.usage)
            .field("choices", &self.choices)
            .field("dialect", &self.dialect)
            .finish()
    }
}

/// Serializes as the JSON document itself (with `serde_json`; other formats get it as a
/// string).
impl Serialize for EncodedResponse {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let raw: &serde_json::value::RawValue =
            serde_json::from_slice(&self.json).map_err(serde::ser::Error::custom)?;
        raw.serialize(s)
    }
}

/// Deserializes a chat completion document, checked as [`from_json`](Self::from_json) does,
/// or else a Messages API answer ([`from_messages_json`](Self::from_messages_json)).
impl<'de> Deserialize<'de> for EncodedResponse {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let raw = Box::<serde_json::value::RawValue>::deserialize(d)?;
        let json = Bytes::from(String::from(raw.get()).into_bytes());
        Self::from_json(json.clone())
            .or_else(|e| Self::from_messages_json(json).map_err(|_| e))
            .map_err(de::Error::custom)
    }
}

// The shape check: field names and types as `ChatResponse` has them; strings and values
// that need no keeping are checked without being allocated.

#[derive(Deserialize)]
struct Shape {
    #[serde(rename = "id")]
    _id: Str,
    #[serde(rename = "object", default)]
    _object: Str,
    #[serde(rename = "created", default)]
    _created: u64,
    model: String,
    choices: Choices,
    #[serde(default)]
    usage: Option<Usage>,
}

#[derive(Deserialize)]
struct ChoiceShape {
    #[serde(rename = "index", default)]
    _index: u32,
    #[serde(rename = "message")]
    _message: MessageShape,
    #[serde(rename = "finish_reason", default)]
    _finish_reason: Option<Str>,
}

#[derive(Deserialize)]
struct MessageShape {
    #[serde(rename = "role")]
    _role: Str,
    #[serde(rename = "content", default)]
    _content: Option<IgnoredAny>,
}

/// A string, checked and dropped.
#[derive(Default)]
struct Str;

impl<'de> Deserialize<'de> for Str {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Str;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string")
            }
            fn visit_str<E: de::Error>(self, _: &str) -> Result<Str, E> {
                Ok(Str)
            }
        }
        d.deserialize_str(V)
    }
}

/// The `choices` array, each item checked, only their number kept.
struct Choices(usize);

impl<'de> Deserialize<'de> for Choices {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Choices;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an array of choices")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Choices, A::Error> {
                let mut n = 0;
                while seq.next_element::<ChoiceShape>()?.is_some() {
                    n += 1;
                }
                Ok(Choices(n))
            }
        }
        d.deserialize_seq(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"{"id":"chatcmpl-1","object":"chat.completion","created":1,"model":"gpt-4o-mini","choices":[{"index":0,"message":{"role":"assistant","content":"hi \"there\"","refusal":null},"logprobs":null,"finish_reason":"stop"}],"usage":{"prompt_tokens":7,"completion_tokens":2,"total_tokens":9,"prompt_tokens_details":{"cached_tokens":3}},"system_fingerprint":"fp"}"#;

    fn enc(s: &str) -> serde_json::Result<EncodedResponse> {
        EncodedResponse::from_json(Bytes::copy_from_slice(s.as_bytes()))
    }

    #[test]
    fn keeps_the_bytes_and_reads_model_and_usage() {
        let e = enc(GOOD).unwrap();
        assert_eq!(e.json().as_ref(), GOOD.as_bytes());
        assert_eq!(e.model(), "gpt-4o-mini");
        assert_eq!(e.choice_count(), 1);
        let u = e.usage().unwrap();
        assert_eq!(
            (u.prompt_tokens, u.completion_tokens, u.cached_tokens()),
            (7, 2, 3)
        );
        assert_eq!(
            e.decode().unwrap(),
            ChatResponse::from_slice(GOOD.as_bytes()).unwrap()
        );
    }

    #[test]
    fn upstream_token_counts_are_read_saturating() {
        let with = |usage: &str| {
            GOOD.replace(
            r#""usage":{"prompt_tokens":7,"completion_tokens":2,"total_tokens":9,"prompt_tokens_details":{"cached_tokens":3}}"#,
            &format!(r#""usage":{usage}"#),
        )
        };
        let cases = [
            (
                r#"{"prompt_tokens":-5,"completion_tokens":2.9,"total_tokens":null}"#,
                (0, 2, 0),
            ),
            (
                r#"{"prompt_tokens":99999999999999999999999,"completion_tokens":1e300,"total_tokens":18446744073709551615}"#,
                (u64::MAX, u64::MAX, u64::MAX),
            ),
        ];
        for (usage, want) in cases {
            let json = with(usage);
            let e = enc(&json).unwrap_or_else(|err| panic!("{usage}: {err}"));
            let u = e.usage().unwrap();
            assert_eq!(
                (u.prompt_tokens, u.completion_tokens, u.total_tokens),
                want,
                "{usage}"
            );
            // The bytes are forwarded as sent.
            assert_eq!(e.json().as_ref(), json.as_bytes());
        }
        let json = with(
            r#"{"prompt_tokens":1,"prompt_tokens_details":{"cached_tokens":-1,"audio_tokens":null}}"#,
        );
        let u = enc(&json).unwrap().usage().unwrap().clone();
        assert_eq!(u.prompt_tokens_details.unwrap().cached_tokens, Some(0));
        // Not a number: still refused.
        assert!(enc(&with(r#"{"prompt_tokens":"7"}"#)).is_err());
    }

    #[test]
    fn accepts_what_chat_response_accepts() {
        for ok in [
            r#"{"id":"c","model":"m","choices":[]}"#,
            r#"{"id":"c","model":"m","choices":[{"message":{"role":"tool"}}],"usage":null}"#,
            r#"{"id":"c","model":"m","choices":[{"message":{"role":"assistant","content":null,"tool_calls":[{"id":"t","type":"function","function":{"name":"f","arguments":"{}"}}]},"finish_reason":null}]}"#,
            r#"{"extra":[1,{"a":null}],"id":"c\u00e9","model":"m","choices":[{"message":{"role":"x"}}]}"#,
        ] {
            assert!(enc(ok).is_ok(), "{ok}");
            assert!(ChatResponse::from_slice(ok.as_bytes()).is_ok(), "{ok}");
        }
    }

    #[test]
    fn refuses_what_is_not_a_chat_completion() {
        for bad in [
            "",
            "not json",
            "[]",
            r#"{"error":{"message":"boom"}}"#,
            r#"{"model":"m","choices":[]}"#,
            r#"{"id":"c","choices":[]}"#,
            r#"{"id":"c","model":"m"}"#,
            r#"{"id":1,"model":"m","choices":[]}"#,
            r#"{"id":"c","model":"m","choices":{}}"#,
            r#"{"id":"c","model":"m","choices":[{}]}"#,
            r#"{"id":"c","model":"m","choices":[{"message":{}}]}"#,
            r#"{"id":"c","model":"m","choices":[{"message":{"role":3}}]}"#,
            r#"{"id":"c","model":"m","choices":[{"message":{"role":"a"},"finish_reason":1}]}"#,
            r#"{"id":"c","model":"m","choices":[{"index":-1,"message":{"role":"a"}}]}"#,
            r#"{"id":"c","object":null,"model":"m","choices":[]}"#,
            r#"{"id":"c","created":"now","model":"m","choices":[]}"#,
            r#"{"id":"c","model":"m","choices":[],"usage":{"prompt_tokens":"7"}}"#,
            r#"{"id":"c","model":"m","choices":[]"#,
            r#"{"id":"c","model":"m","choices":[]} trailing"#,
        ] {
            assert!(enc(bad).is_err(), "{bad}");
            assert!(ChatResponse::from_slice(bad.as_bytes()).is_err(), "{bad}");
        }
        assert!(EncodedResponse::from_json(Bytes::from_static(b"{\"id\":\"\xff\"}")).is_err());
    }

    /// What the serde check reads, for comparison with the hand-written pass.
    fn by_serde(json: &[u8]) -> Option<(String, Option<Usage>, usize)> {
        let shape: Shape = crate::json::from_slice(json).ok()?;
        Some((shape.model, shape.usage, shape.choices.0))
    }

    const SEEDS: [&str; 5] = [
        GOOD,
        r#"{"id":"chatcmpl-mock000000000001","object":"chat.completion","created":1795749268,"model":"bench","choices":[{"index":0,"message":{"role":"assistant","content":"mock answer","refusal":null,"annotations":[]},"logprobs":null,"finish_reason":"stop"}],"usage":{"prompt_tokens":7,"completion_tokens":11,"total_tokens":18,"prompt_tokens_details":{"cached_tokens":0,"audio_tokens":0},"completion_tokens_details":{"reasoning_tokens":0,"audio_tokens":0,"accepted_prediction_tokens":0,"rejected_prediction_tokens":0}},"service_tier":"default","system_fingerprint":"fp_mock"}"#,
        r#" { "id" : "c" , "model" : "m" , "choices" : [ { "message" : { "role" : "assistant" , "content" : null , "tool_calls" : [ { "id" : "t" , "function" : { "arguments" : "{\"a\": [1, 2.5e-3, -0, true, false]}" } } ] } , "finish_reason" : null } ] , "usage" : null } "#,
        r#"{"id":"c","model":"m","choices":[{"index":1,"message":{"role":"a","content":"line\nnext \u00e9\ud83d\ude00"}},{"message":{"role":"b"}}],"usage":{"prompt_tokens":1,"cost":0.5,"prompt_tokens_details":null}}"#,
        r#"{"x":{"y":[[{}],[]],"z":-12.5E+3},"id":"c","model":"m","choices":[],"usage":{"completion_tokens_details":{"reasoning_tokens":null}}}"#,
    ];

    #[test]
    fn the_hand_written_pass_reads_the_common_documents() {
        for seed in SEEDS {
            let found = scan::check(seed.as_bytes()).expect(seed);
            let (model, usage, choices) = by_serde(seed.as_bytes()).expect(seed);
            assert_eq!(&seed[found.model], model);
            assert_eq!((found.usage, found.choices), (usage, choices));
        }
    }

    /// The hand-written pass must never accept what serde refuses, nor read other values:
    /// checked on every document one byte away from the seeds (deleted, replaced or
    /// inserted, with the bytes that matter to JSON).
    #[test]
    fn the_hand_written_pass_is_never_more_lenient_than_serde() {
        let (mut variants, mut accepted) = (0, 0);
        for seed in SEEDS {
            crate::json::one_byte_away(seed, |doc| {
                variants += 1;
                if std::str::from_utf8(doc).is_err() {
                    return;
                }
                let Some(found) = scan::check(doc) else {
                    return;
                };
                accepted += 1;
                let text = String::from_utf8_lossy(doc);
                let (model, usage, choices) = by_serde(doc)
                    .unwrap_or_else(|| panic!("serde refuses what the scan accepted: {text}"));
                assert_eq!(String::from_utf8_lossy(&doc[found.model]), model, "{text}");
                assert_eq!((found.usage, found.choices), (usage, choices), "{text}");
            });
        }
        // Not vacuous: many variants stay valid (in strings, digits, spaces).
        assert!(
            variants > 30_000 && accepted > 3_000,
            "{variants} {accepted}"
        );
    }

    #[test]
    fn serializes_as_the_document_itself() {
        let e = enc(GOOD).unwrap();
        let text = serde_json::to_string(&e).unwrap();
        assert_eq!(text, GOOD);
        let back: EncodedResponse = serde_json::from_str(&text).unwrap();
        assert_eq!(back, e);
        assert!(serde_json::from_str::<EncodedResponse>(r#"{"id":"c"}"#).is_err());
    }
}
