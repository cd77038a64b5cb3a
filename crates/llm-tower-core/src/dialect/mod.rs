//! Dialects: the wire formats clients speak, and the original body a request keeps.
//!
//! Every layer acts on one canonical view, the [`ChatRequest`]. A request that arrives in
//! another dialect (the Anthropic Messages API, [`messages`]; the OpenAI Responses API,
//! [`responses`]) is parsed into that view **and** keeps its original
//! body in the view's extensions as a [`NativeRequest`]:
//!
//! - a provider that speaks the request's dialect sends the original body (only `model`
//!   rewritten, plus any messages a layer appended to the view), so every field the client
//!   sent reaches it, including those no layer knows;
//! - a provider that speaks another dialect sends the view, after
//!   [`NativeRequest::check_translatable`] (a clear 400 naming the first field the view
//!   cannot carry);
//! - the HTTP edge renders whatever answer comes back in the client's dialect: the
//!   provider's own bytes when they are already in it, a translation otherwise.
//!
//! A provider answering in the request's dialect keeps its bytes: a complete answer as an
//! [`EncodedResponse`](crate::EncodedResponse) of that [`Dialect`], a stream as chunks
//! that carry their original event under [`NATIVE_EVENT`] (see [`native_event`]).

pub mod messages;
pub mod responses;

use bytes::Bytes;
use http::{HeaderName, HeaderValue};
use serde_json::value::RawValue;

use crate::{ChatChunk, ChatRequest, LlmError};

/// A wire format of LLM requests and answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[non_exhaustive]
pub enum Dialect {
    /// OpenAI chat completions (`POST /v1/chat/completions`), the canonical view.
    #[default]
    Chat,
    /// Anthropic Messages (`POST /v1/messages`).
    Messages,
    /// OpenAI Responses (`POST /v1/responses`).
    Responses,
}

impl Dialect {
    /// `chat`, `messages` or `responses` (log fields, cache-key tags).
    pub fn as_str(self) -> &'static str {
        match self {
            Dialect::Chat => "chat",
            Dialect::Messages => "messages",
            Dialect::Responses => "responses",
        }
    }
}

/// The key of a [`ChatChunk::extra`] entry holding the chunk's original server-sent event,
/// already framed (`event: …\ndata: …\n\n`), when a provider streamed in the request's own
/// dialect. Such chunks exist only on streams answering a [`NativeRequest`], whose edge
/// writes the frame as it is; a chunk with no chat content (a `ping`, a block's end)
/// carries only the frame, with no choices.
pub const NATIVE_EVENT: &str = "x_llm_native_event";

/// The original event frame a chunk carries (see [`NATIVE_EVENT`]).
///
/// ```
/// use llm_tower_core::ChatChunk;
/// use llm_tower_core::dialect::{NATIVE_EVENT, native_event};
///
/// let mut c = ChatChunk::default();
/// assert_eq!(native_event(&c), None);
/// c.extra.insert(NATIVE_EVENT.into(), "event: ping\ndata: {\"type\":\"ping\"}\n\n".into());
/// assert!(native_event(&c).unwrap().starts_with("event: ping"));
/// ```
pub fn native_event(chunk: &ChatChunk) -> Option<&str> {
    chunk.extra.get(NATIVE_EVENT).and_then(|v| v.as_str())
}

/// The client's request as it was sent, in a dialect other than chat completions: rides
/// in the extensions of the [`ChatRequest`] view built from it (see the
/// [module docs](self)).
///
/// ```
/// use llm_tower_core::dialect::{Dialect, NativeRequest, messages};
///
/// let body = br#"{"model":"claude","max_tokens":64,"messages":[{"role":"user","content":"Hi"}],"x_future":1}"#;
/// let view = messages::request_from_slice(body).unwrap();
/// assert_eq!(view.model, "claude");
/// let native = view.extensions.get::<NativeRequest>().unwrap();
/// assert_eq!(native.dialect(), Dialect::Messages);
/// // Sent to an Anthropic upstream as it came, with the routed model.
/// let sent: serde_json::Value = serde_json::from_slice(&native.body_for(&view, "claude-x", &[]).unwrap()).unwrap();
/// assert_eq!(sent["model"], "claude-x");
/// assert_eq!(sent["x_future"], 1);
/// // An unknown field has no chat equivalent: a chat provider refuses it, naming it.
/// assert!(native.check_translatable().unwrap_err().message().contains("x_future"));
/// ```
#[derive(Debug, Clone)]
pub struct NativeRequest {
    dialect: Dialect,
    body: Bytes,
    view_messages: usize,
    untranslatable: Option<LlmError>,
    headers: Vec<(HeaderName, HeaderValue)>,
    /// Where the value of the body's one top-level `model` stands, when the parser saw
    /// exactly one: [`body_for`](Self::body_for) then writes the routed model there.
    model_at: Option<std::ops::Range<usize>>,
}

impl NativeRequest {
    /// The original `body` of a `dialect` request whose view had `view_messages` messages
    /// when it was built.
    pub fn new(dialect: Dialect, body: Bytes, view_messages: usize) -> Self {
        Self {
            dialect,
            body,
            view_messages,
            untranslatable: None,
            headers: Vec::new(),
            model_at: None,
        }
    }

    /// Records that the body's only top-level `model` value is `raw`, a slice of the body
    /// (anything else is ignored).
    pub(crate) fn set_model_value(&mut self, raw: &str) {
        let start = (raw.as_ptr() as usize).wrapping_sub(self.body.as_ptr() as usize);
        let at = start..start.saturating_add(raw.len());
        if self.body.get(at.clone()) == Some(raw.as_bytes()) {
            self.model_at = Some(at);
        }
    }

    /// The dialect the client spoke.
    pub fn dialect(&self) -> Dialect {
        self.dialect
    }

    /// The body as the client sent it.
    pub fn body(&self) -> &Bytes {
        &self.body
    }

    /// How many messages the view had when it was built; a layer that appends messages to
    /// the view (a validation retry's reminder) leaves the ones past this count for the
    /// provider to add to the original body ([`body_for`](Self::body_for)).
    pub fn view_messages(&self) -> usize {
        self.view_messages
    }

    /// Records the first part of the request the view cannot carry to a provider of another
    /// dialect (kept: the first one found is the one reported).
    pub fn set_untranslatable(&mut self, error: LlmError) {
        if self.untranslatable.is_none() {
            self.untranslatable = Some(error);
        }
    }

    /// `Ok` when the view says everything the client asked; else the bad request naming the
    /// field a provider of another dialect would have to drop.
    pub fn check_translatable(&self) -> Result<(), LlmError> {
        match &self.untranslatable {
            None => Ok(()),
            Some(e) => Err(e.clone()),
        }
    }

    /// Adds a request header meant for a provider of this dialect (`anthropic-version`,
    /// `anthropic-beta`).
    pub fn push_header(&mut self, name: HeaderName, value: HeaderValue) {
        self.headers.push((name, value));
    }

    /// The headers for a provider of this dialect.
    pub fn headers(&self) -> &[(HeaderName, HeaderValue)] {
        &self.headers
    }

    /// The messages a layer appended to `view` since it was built (see
    /// [`view_messages`](Self::view_messages)).
    pub fn appended<'a>(&self, view: &'a ChatRequest) -> &'a [crate::Message] {
        view.messages.get(self.view_messages..).unwrap_or_default()
    }

    /// The body to send to a provider of this dialect: the original one with its top-level
    /// `model` set to `model` and the (already translated) `append`ed items added to its
    /// `messages` array (`input` for Responses, a string `input` becoming one user item).
    /// Every other field stays as the client sent it. With nothing to append, the new
    /// model is written in place of the old one's value and every other byte is the
    /// client's; otherwise the top level is re-assembled, so only its whitespace and key
    /// order may differ.
    ///
    /// `view` is unused today; it is taken so that later dialects can read what layers
    /// changed in it.
    pub fn body_for(
        &self,
        view: &ChatRequest,
        model: &str,
        append: &[serde_json::Value],
    ) -> Result<Vec<u8>, LlmError> {
        let _ = view;
        let bad =
            |e: serde_json::Error| LlmError::bad_request(format!("invalid request body: {e}"));
        if append.is_empty()
            && let Some(at) = self.model_at.clone().or_else(|| model_value(&self.body))
            && let (Some(head), Some(tail)) = (self.body.get(..at.start), self.body.get(at.end..))
        {
            // The common case, spliced: no re-assembly of the top level.
            let mut out = Vec::with_capacity(self.body.len() + model.len() + 8);
            out.extend_from_slice(head);
            serde_json::to_writer(&mut out, model).map_err(bad)?;
            out.extend_from_slice(tail);
            return Ok(out);
        }
        let top: Vec<(crate::json::Key<'_>, &RawValue)> =
            crate::json::from_slice::<TopLevel<'_>>(&self.body)
                .map_err(bad)?
                .0;
        let mut out = Vec::with_capacity(self.body.len() + model.len() + 64);
        out.push(b'{');
        let list = match self.dialect {
            Dialect::Responses => "input",
            _ => "messages",
        };
        for (key, value) in &top {
            let key = key.as_str();
            if key == "model" {
                continue;
            }
            if key == list && !append.is_empty() {
                let mut items: Vec<Box<RawValue>> = match serde_json::from_str::<&str>(value.get())
                {
                    Ok(text) => vec![
                        serde_json::value::to_raw_value(
                            &serde_json::json!({"role": "user", "content": text}),
                        )
                        .map_err(bad)?,
                    ],
                    Err(_) => serde_json::from_str::<Vec<&RawValue>>(value.get())
                        .map_err(bad)?
                        .into_iter()
                        .map(|v| v.to_owned())
                        .collect(),
                };
                let extra: Vec<Box<RawValue>> = append
                    .iter()
                    .map(|v| serde_json::value::to_raw_value(v).map_err(bad))
                    .collect::<Result<_, _>>()?;
                items.extend(extra);
                serde_json::to_writer(&mut out, key).map_err(bad)?;
                out.push(b':');
                serde_json::to_writer(&mut out, &items).map_err(bad)?;
                out.push(b',');
                continue;
            }
            serde_json::to_writer(&mut out, key).map_err(bad)?;
            out.push(b':');
            out.extend_from_slice(value.get().as_bytes());
            out.push(b',');
        }
        out.extend_from_slice(b"\"model\":");
        serde_json::to_writer(&mut out, model).map_err(bad)?;
        out.push(b'}');
        Ok(out)
    }
}

/// Where the value of the one top-level `model` of `body` (a JSON object) stands; `None`
/// when the body is not an object or has no `model`, or more than one. Values are skipped,
/// not read.
fn model_value(body: &[u8]) -> Option<std::ops::Range<usize>> {
    struct V;
    impl<'de> serde::de::Visitor<'de> for V {
        type Value = Option<&'de RawValue>;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("a JSON object")
        }
        fn visit_map<A: serde::de::MapAccess<'de>>(
            self,
            mut map: A,
        ) -> Result<Option<&'de RawValue>, A::Error> {
            let (mut found, mut n) = (None, 0u32);
            while let Some(k) = map.next_key::<crate::json::Key<'de>>()? {
                if k.as_str() == "model" {
                    found = Some(map.next_value::<&'de RawValue>()?);
                    n += 1;
                } else {
                    map.next_value::<serde::de::IgnoredAny>()?;
                }
            }
            Ok(found.filter(|_| n == 1))
        }
    }
    struct Model<'a>(Option<&'a RawValue>);
    impl<'de> serde::Deserialize<'de> for Model<'de> {
        fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            d.deserialize_map(V).map(Model)
        }
    }
    let raw = crate::json::from_slice::<Model<'_>>(body).ok()?.0?.get();
    let start = (raw.as_ptr() as usize).checked_sub(body.as_ptr() as usize)?;
    Some(start..start.checked_add(raw.len())?)
}

/// A JSON object's members, values left as their text, in order.
struct TopLevel<'a>(Vec<(crate::json::Key<'a>, &'a RawValue)>);

impl<'de> serde::Deserialize<'de> for TopLevel<'de> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = TopLevel<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<TopLevel<'de>, A::Error> {
                let mut out = Vec::with_capacity(map.size_hint().unwrap_or(8));
                while let Some(k) = map.next_key::<crate::json::Key<'de>>()? {
                    let v: &'de RawValue = map.next_value()?;
                    out.push((k, v));
                }
                Ok(TopLevel(out))
            }
        }
        d.deserialize_map(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Value, json};

    #[test]
    fn body_for_rewrites_the_model_and_appends() {
        let body = br#"{"model":"a","messages":[{"role":"user","content":"x"}],"z":{"deep":[1,2.50,"\u00e9"]},"max_tokens":5}"#;
        let n = NativeRequest::new(Dialect::Messages, Bytes::from_static(body), 1);
        let view = ChatRequest::default();
        let out = n.body_for(&view, "b\"c", &[]).unwrap();
        let v: Value = serde_json::from_slice(&out).unwrap();
        let mut want: Value = serde_json::from_slice(body).unwrap();
        want["model"] = "b\"c".into();
        assert_eq!(v, want);
        // Every byte but the model's is the client's.
        let want = String::from_utf8_lossy(body).replace(r#""a""#, r#""b\"c""#);
        assert_eq!(String::from_utf8(out).unwrap(), want);
        let add = [json!({"role":"user","content":"again"})];
        let v: Value = serde_json::from_slice(&n.body_for(&view, "m", &add).unwrap()).unwrap();
        assert_eq!(v["messages"][1]["content"], "again");
        assert_eq!(v["messages"].as_array().unwrap().len(), 2);
    }

    #[test]
    fn body_for_refuses_what_is_not_an_object() {
        for bad in [&b"[]"[..], b"", b"{\"model\":", b"nope"] {
            let n = NativeRequest::new(Dialect::Messages, Bytes::copy_from_slice(bad), 0);
            assert!(n.body_for(&ChatRequest::default(), "m", &[]).is_err());
        }
    }
}
