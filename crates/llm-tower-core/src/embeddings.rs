//! Embeddings (`POST /v1/embeddings`): the request, the answer, and how an embeddings
//! request travels through the same layers as chat.
//!
//! # One stack
//!
//! Every layer is a `Service<ChatRequest>`. An embeddings call travels as a [`ChatRequest`]
//! *envelope* ([`ChatRequest::embeddings`]): the envelope carries what layers act on (the
//! model, which routes and fallbacks rewrite; the task, tenant, deadline and cache policy
//! extensions; a token estimate through [`ChatRequest::prompt_text_len`]; no output, so
//! `max_completion_tokens` is 0), and the [`EmbeddingsRequest`] itself rides in its
//! extensions, where a provider reads it ([`ChatRequest::as_embeddings`]) and sends it with
//! the envelope's model. The answer is [`ResponseBody::Embeddings`](crate::ResponseBody)
//! with its usage in the meta, so cost, budgets and token limits settle it like a chat
//! answer. Routes, fallback chains and providers are built once and serve both kinds.
//!
//! ```
//! use llm_tower_core::{ChatRequest, EmbeddingsRequest};
//!
//! let emb = EmbeddingsRequest::from_slice(
//!     br#"{"model":"text-embedding-3-small","input":["a","bc"],"dimensions":256}"#,
//! ).unwrap();
//! assert_eq!(emb.input.len(), 2);
//! let env = ChatRequest::embeddings(emb);
//! assert_eq!(env.model, "text-embedding-3-small");
//! assert_eq!(env.prompt_text_len(), 3);
//! assert_eq!(env.as_embeddings().unwrap().dimensions, Some(256));
//! ```

use std::sync::Arc;

use base64::Engine as _;
use serde::de::{Deserializer, Error as _};
use serde::ser::{SerializeMap, SerializeSeq, Serializer};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::request::Extra;
use crate::{ChatRequest, LlmError, MAX_REQUEST_BYTES, Usage};

/// Most inputs in one embeddings request (OpenAI's limit).
pub const MAX_EMBEDDING_INPUTS: usize = 2048;
/// Most dimensions of one embedding, asked for or answered.
pub const MAX_EMBEDDING_DIMENSIONS: usize = 65_536;

/// One input to embed: text, or token ids.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum EmbeddingInput {
    /// Text.
    Text(String),
    /// Token ids.
    Tokens(Vec<u32>),
}

impl EmbeddingInput {
    /// Size for token estimates: bytes of text, or four bytes per token id (one token).
    pub fn len_bytes(&self) -> usize {
        match self {
            EmbeddingInput::Text(s) => s.len(),
            EmbeddingInput::Tokens(t) => t.len().saturating_mul(4),
        }
    }
}

/// `encoding_format`: how the vectors are written in the answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Hash)]
pub enum EncodingFormat {
    /// JSON arrays of numbers (the default).
    #[default]
    Float,
    /// Base64 of the little-endian `f32` bytes.
    Base64,
}

impl EncodingFormat {
    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            EncodingFormat::Float => "float",
            EncodingFormat::Base64 => "base64",
        }
    }
}

/// An OpenAI embeddings request. `input` is kept as a list; [`single`](Self::single)
/// remembers that the client sent one string (or one token array) rather than an array,
/// so it is forwarded as sent. Fields not typed here (`user`, provider extensions) are
/// kept in [`extra`](Self::extra) and forwarded unchanged.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct EmbeddingsRequest {
    /// Model name or alias.
    pub model: String,
    /// The inputs, in order.
    pub input: Vec<EmbeddingInput>,
    /// Whether the client sent one input rather than an array of them.
    pub single: bool,
    /// Requested output dimensions.
    pub dimensions: Option<u64>,
    /// Requested encoding of the vectors.
    pub encoding_format: Option<EncodingFormat>,
    /// Every other field, kept as sent.
    pub extra: Extra,
}

impl EmbeddingsRequest {
    /// A request embedding `input` texts with `model`.
    pub fn new<I, T>(model: impl Into<String>, input: I) -> Self
    where
        I: IntoIterator<Item = T>,
        T: Into<String>,
    {
        Self {
            model: model.into(),
            input: input
                .into_iter()
                .map(|t| EmbeddingInput::Text(t.into()))
                .collect(),
            ..Self::default()
        }
    }

    /// Parses and checks a request body; a bad-request [`LlmError`] naming the field on
    /// malformed input.
    ///
    /// ```
    /// use llm_tower_core::{EmbeddingsRequest, ErrorKind};
    /// let err = EmbeddingsRequest::from_slice(br#"{"model":"m","input":[]}"#).unwrap_err();
    /// assert_eq!(err.kind(), ErrorKind::BadRequest);
    /// assert_eq!(err.param(), Some("input"));
    /// ```
    pub fn from_slice(body: &[u8]) -> Result<Self, LlmError> {
        if body.len() > MAX_REQUEST_BYTES {
            return Err(LlmError::bad_request(format!(
                "request body of {} bytes exceeds the limit of {MAX_REQUEST_BYTES} bytes",
                body.len()
            )));
        }
        let req: Self = serde_json::from_slice(body)
            .map_err(|e| LlmError::bad_request(format!("invalid request body: {e}")))?;
        req.validate()?;
        Ok(req)
    }

    /// Checks what serde cannot: a model, 1 to [`MAX_EMBEDDING_INPUTS`] inputs, none empty,
    /// `dimensions` from 1 to [`MAX_EMBEDDING_DIMENSIONS`].
    pub fn validate(&self) -> Result<(), LlmError> {
        if self.model.trim().is_empty() {
            return Err(LlmError::bad_request("`model` must not be empty").with_param("model"));
        }
        if self.input.is_empty() || self.input.len() > MAX_EMBEDDING_INPUTS {
            return Err(LlmError::bad_request(format!(
                "`input` must hold 1 to {MAX_EMBEDDING_INPUTS} items"
            ))
            .with_param("input"));
        }
        if let Some(i) = self.input.iter().position(|x| x.len_bytes() == 0) {
            return Err(
                LlmError::bad_request(format!("`input[{i}]` must not be empty"))
                    .with_param("input"),
            );
        }
        if let Some(d) = self.dimensions
            && !(1..=MAX_EMBEDDING_DIMENSIONS as u64).contains(&d)
        {
            return Err(LlmError::bad_request(format!(
                "`dimensions` must be from 1 to {MAX_EMBEDDING_DIMENSIONS}"
            ))
            .with_param("dimensions"));
        }
        Ok(())
    }

    /// Total size of the inputs for token estimates (see [`EmbeddingInput::len_bytes`]).
    pub fn input_len(&self) -> usize {
        self.input
            .iter()
            .fold(0usize, |n, x| n.saturating_add(x.len_bytes()))
    }

    /// The same request for a subset of the inputs (always sent as an array unless it is
    /// the client's single input).
    #[must_use]
    pub fn with_inputs(&self, input: Vec<EmbeddingInput>) -> Self {
        Self {
            model: self.model.clone(),
            single: self.single && input.len() == 1,
            input,
            dimensions: self.dimensions,
            encoding_format: self.encoding_format,
            extra: self.extra.clone(),
        }
    }

    /// The format the client asked for ([`EncodingFormat::Float`] when unset).
    pub fn format(&self) -> EncodingFormat {
        self.encoding_format.unwrap_or_default()
    }
}

struct Inputs<'a>(&'a [EmbeddingInput], bool);

impl Serialize for Inputs<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        fn one<S: Serializer>(x: &EmbeddingInput, s: S) -> Result<S::Ok, S::Error> {
            match x {
                EmbeddingInput::Text(t) => s.serialize_str(t),
                EmbeddingInput::Tokens(t) => t.serialize(s),
            }
        }
        match self.0 {
            [x] if self.1 => one(x, s),
            items => {
                let mut seq = s.serialize_seq(Some(items.len()))?;
                for x in items {
                    match x {
                        EmbeddingInput::Text(t) => seq.serialize_element(t)?,
                        EmbeddingInput::Tokens(t) => seq.serialize_element(t)?,
                    }
                }
                seq.end()
            }
        }
    }
}

impl Serialize for EmbeddingsRequest {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut map = s.serialize_map(None)?;
        map.serialize_entry("model", &self.model)?;
        map.serialize_entry("input", &Inputs(&self.input, self.single))?;
        if let Some(d) = self.dimensions {
            map.serialize_entry("dimensions", &d)?;
        }
        if let Some(f) = self.encoding_format {
            map.serialize_entry("encoding_format", f.as_str())?;
        }
        for (k, v) in &self.extra {
            map.serialize_entry(k, v)?;
        }
        map.end()
    }
}

#[derive(Deserialize)]
#[serde(untagged)]
enum RawInput {
    One(String),
    Texts(Vec<String>),
    Tokens(Vec<u32>),
    TokenBatches(Vec<Vec<u32>>),
}

impl<'de> Deserialize<'de> for EmbeddingsRequest {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let mut obj = Extra::deserialize(d)?;
        let model = match obj.remove("model") {
            Some(Value::String(m)) => m,
            Some(_) => return Err(D::Error::custom("`model` must be a string")),
            None => return Err(D::Error::missing_field("model")),
        };
        let input = obj
            .remove("input")
            .ok_or_else(|| D::Error::missing_field("input"))?;
        let (input, single) = match RawInput::deserialize(input) {
            Ok(RawInput::One(s)) => (vec![EmbeddingInput::Text(s)], true),
            Ok(RawInput::Texts(v)) => (v.into_iter().map(EmbeddingInput::Text).collect(), false),
            Ok(RawInput::Tokens(t)) => (vec![EmbeddingInput::Tokens(t)], true),
            Ok(RawInput::TokenBatches(v)) => {
                (v.into_iter().map(EmbeddingInput::Tokens).collect(), false)
            }
            Err(_) => {
                return Err(D::Error::custom(
                    "`input` must be a string, an array of strings, an array of token ids \
                     or an array of token-id arrays",
                ));
            }
        };
        let dimensions = match obj.remove("dimensions") {
            None | Some(Value::Null) => None,
            Some(Value::Number(n)) => Some(
                n.as_u64()
                    .ok_or_else(|| D::Error::custom("`dimensions` must be a positive integer"))?,
            ),
            Some(_) => return Err(D::Error::custom("`dimensions` must be a positive integer")),
        };
        let encoding_format = match obj.remove("encoding_format") {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) if s == "float" => Some(EncodingFormat::Float),
            Some(Value::String(s)) if s == "base64" => Some(EncodingFormat::Base64),
            Some(_) => {
                return Err(D::Error::custom(
                    "`encoding_format` must be \"float\" or \"base64\"",
                ));
            }
        };
        Ok(Self {
            model,
            input,
            single,
            dimensions,
            encoding_format,
            extra: obj,
        })
    }
}

/// The embeddings answer: one vector per input, in input order, and the usage.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct EmbeddingsResponse {
    /// The model that answered.
    pub model: String,
    /// The vectors, `data[i]` for `input[i]`.
    pub data: Vec<Vec<f32>>,
    /// Token usage (`prompt_tokens`, `total_tokens`).
    pub usage: Usage,
}

#[derive(Deserialize)]
struct RawItem {
    #[serde(default)]
    index: Option<usize>,
    embedding: RawVector,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum RawVector {
    Floats(Vec<f32>),
    Base64(String),
}

#[derive(Deserialize)]
struct RawResponse {
    #[serde(default)]
    model: String,
    data: Vec<RawItem>,
    #[serde(default)]
    usage: Option<Usage>,
}

impl EmbeddingsResponse {
    /// Parses an upstream answer to a request of `expected` inputs. Vectors may be floats
    /// or base64; items are put in `index` order. A document that is not an embeddings
    /// list, has another number of items, repeats or skips an index, or has a vector of
    /// more than [`MAX_EMBEDDING_DIMENSIONS`] is a [`Transport`](crate::ErrorKind::Transport)
    /// error, like any malformed upstream answer.
    ///
    /// ```
    /// use llm_tower_core::EmbeddingsResponse;
    /// let json = br#"{"object":"list","model":"m","data":[
    ///   {"object":"embedding","index":1,"embedding":"AACAPw=="},
    ///   {"object":"embedding","index":0,"embedding":[0.5,-2]}],
    ///   "usage":{"prompt_tokens":3,"total_tokens":3}}"#;
    /// let r = EmbeddingsResponse::from_slice(json, 2).unwrap();
    /// assert_eq!(r.data, vec![vec![0.5, -2.0], vec![1.0]]);
    /// assert_eq!(r.usage.prompt_tokens, 3);
    /// assert!(EmbeddingsResponse::from_slice(json, 3).is_err());
    /// ```
    pub fn from_slice(body: &[u8], expected: usize) -> Result<Self, LlmError> {
        let bad = |why: String| LlmError::transport(format!("malformed embeddings answer: {why}"));
        let raw: RawResponse = serde_json::from_slice(body).map_err(|e| bad(e.to_string()))?;
        if raw.data.len() != expected {
            return Err(bad(format!(
                "{} embeddings for {expected} inputs",
                raw.data.len()
            )));
        }
        let mut data: Vec<Option<Vec<f32>>> = vec![None; expected];
        for (pos, item) in raw.data.into_iter().enumerate() {
            let i = item.index.unwrap_or(pos);
            let vector = match item.embedding {
                RawVector::Floats(v) => v,
                RawVector::Base64(s) => decode_base64(&s).map_err(bad)?,
            };
            if vector.len() > MAX_EMBEDDING_DIMENSIONS {
                return Err(bad(format!("a vector of {} dimensions", vector.len())));
            }
            match data.get_mut(i) {
                Some(slot @ None) => *slot = Some(vector),
                _ => return Err(bad(format!("index {i} out of range or repeated"))),
            }
        }
        let mut usage = raw.usage.unwrap_or_default();
        usage.total_tokens = usage.total_tokens.max(usage.prompt_tokens);
        Ok(Self {
            model: raw.model,
            // Every slot is filled: as many items as slots, none repeated.
            data: data.into_iter().map(Option::unwrap_or_default).collect(),
            usage,
        })
    }

    /// The answer as OpenAI's JSON document, vectors written in `format`.
    ///
    /// ```
    /// use llm_tower_core::{EmbeddingsResponse, EncodingFormat, Usage};
    /// let r = EmbeddingsResponse { model: "m".into(), data: vec![vec![1.0]], usage: Usage::new(2, 0) };
    /// let json: serde_json::Value = serde_json::from_slice(&r.to_json(EncodingFormat::Base64)).unwrap();
    /// assert_eq!(json["data"][0]["embedding"], "AACAPw==");
    /// assert_eq!(json["usage"]["total_tokens"], 2);
    /// ```
    pub fn to_json(&self, format: EncodingFormat) -> Vec<u8> {
        struct Data<'a>(&'a [Vec<f32>], EncodingFormat);
        impl Serialize for Data<'_> {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                let mut seq = s.serialize_seq(Some(self.0.len()))?;
                for (index, v) in self.0.iter().enumerate() {
                    seq.serialize_element(&Item {
                        index,
                        vector: v,
                        format: self.1,
                    })?;
                }
                seq.end()
            }
        }
        struct Item<'a> {
            index: usize,
            vector: &'a [f32],
            format: EncodingFormat,
        }
        impl Serialize for Item<'_> {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                let mut map = s.serialize_map(Some(3))?;
                map.serialize_entry("object", "embedding")?;
                map.serialize_entry("index", &self.index)?;
                match self.format {
                    EncodingFormat::Float => map.serialize_entry("embedding", self.vector)?,
                    EncodingFormat::Base64 => {
                        map.serialize_entry("embedding", &encode_base64(self.vector))?;
                    }
                }
                map.end()
            }
        }
        #[derive(Serialize)]
        struct Doc<'a> {
            object: &'static str,
            data: Data<'a>,
            model: &'a str,
            usage: UsageOut,
        }
        #[derive(Serialize)]
        struct UsageOut {
            prompt_tokens: u64,
            total_tokens: u64,
        }
        let doc = Doc {
            object: "list",
            data: Data(&self.data, format),
            model: &self.model,
            usage: UsageOut {
                prompt_tokens: self.usage.prompt_tokens,
                total_tokens: self.usage.total_tokens.max(self.usage.prompt_tokens),
            },
        };
        let dims = self.data.first().map_or(0, Vec::len);
        let mut out = Vec::with_capacity(128 + self.data.len() * (48 + dims * 12));
        // Plain data into a Vec: cannot fail.
        let _ = serde_json::to_writer(&mut out, &doc);
        out
    }
}

/// Base64 of the little-endian `f32` bytes (OpenAI's `encoding_format: "base64"`).
pub fn encode_base64(v: &[f32]) -> String {
    let bytes: Vec<u8> = v.iter().flat_map(|f| f.to_le_bytes()).collect();
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// The inverse of [`encode_base64`].
pub fn decode_base64(s: &str) -> Result<Vec<f32>, String> {
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(s)
        .map_err(|e| format!("bad base64 vector: {e}"))?;
    if bytes.len() % 4 != 0 {
        return Err("a base64 vector whose length is not a multiple of 4 bytes".to_owned());
    }
    Ok(bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect())
}

/// The [`ChatRequest::extensions`] entry of an embeddings envelope.
#[derive(Debug, Clone)]
pub(crate) struct Embeddings(pub(crate) Arc<EmbeddingsRequest>);

impl ChatRequest {
    /// The envelope that carries `req` through the layers (see the
    /// [module docs](crate::embeddings)): `model` from `req`, no messages, no output
    /// (`max_completion_tokens` 0), `req` in the extensions.
    pub fn embeddings(req: EmbeddingsRequest) -> Self {
        let mut env = ChatRequest::new(req.model.clone(), Vec::new());
        env.max_completion_tokens = Some(0);
        env.extensions.insert(Embeddings(Arc::new(req)));
        env
    }

    /// The embeddings request this envelope carries, if it is one. A provider sends it
    /// with the envelope's [`model`](ChatRequest::model), which routes and fallbacks set.
    pub fn as_embeddings(&self) -> Option<&EmbeddingsRequest> {
        // A chat request always has a message: no lookup on the chat path.
        if !self.messages.is_empty() {
            return None;
        }
        self.extensions.get::<Embeddings>().map(|e| &*e.0)
    }

    /// Replaces the embeddings request this envelope carries (the model stays).
    pub fn set_embeddings(&mut self, req: EmbeddingsRequest) {
        self.extensions.insert(Embeddings(Arc::new(req)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_input_shape_and_writes_it_back() {
        for body in [
            r#"{"model":"m","input":"hi"}"#,
            r#"{"model":"m","input":["a","b"],"user":"u","x":{"y":1}}"#,
            r#"{"model":"m","input":[1,2,3],"encoding_format":"base64"}"#,
            r#"{"model":"m","input":[[1,2],[3]],"dimensions":8}"#,
        ] {
            let req = EmbeddingsRequest::from_slice(body.as_bytes()).unwrap();
            let back = serde_json::to_value(&req).unwrap();
            let orig: Value = serde_json::from_str(body).unwrap();
            assert_eq!(back, orig, "{body}");
        }
    }

    #[test]
    fn refuses_bad_input_with_the_field() {
        for (body, param) in [
            (r#"{"model":"m","input":[""]}"#, Some("input")),
            (r#"{"model":"","input":"x"}"#, Some("model")),
            (
                r#"{"model":"m","input":"x","dimensions":0}"#,
                Some("dimensions"),
            ),
            (r#"{"model":"m","input":[{"a":1}]}"#, None),
            (
                r#"{"model":"m","input":"x","encoding_format":"int8"}"#,
                None,
            ),
            (r#"{"model":"m"}"#, None),
            (r#"[]"#, None),
        ] {
            let err = EmbeddingsRequest::from_slice(body.as_bytes()).unwrap_err();
            assert_eq!(err.kind(), crate::ErrorKind::BadRequest, "{body}");
            if param.is_some() {
                assert_eq!(err.param(), param, "{body}");
            }
        }
    }

    #[test]
    fn base64_round_trips_exactly() {
        let v = vec![0.1f32, -3.5e-7, f32::MAX, 0.0];
        assert_eq!(decode_base64(&encode_base64(&v)).unwrap(), v);
        assert!(decode_base64("AAA=").is_err());
        assert!(decode_base64("!!").is_err());
    }

    #[test]
    fn float_json_round_trips_exactly() {
        let r = EmbeddingsResponse {
            model: "m".into(),
            data: vec![vec![0.1, 1e-30, -7.25]],
            usage: Usage::new(1, 0),
        };
        let back = EmbeddingsResponse::from_slice(&r.to_json(EncodingFormat::Float), 1).unwrap();
        assert_eq!(back.data, r.data);
    }

    #[test]
    fn refuses_malformed_answers() {
        for body in [
            r#"{"data":[{"index":0,"embedding":[1]},{"index":0,"embedding":[2]}]}"#,
            r#"{"data":[{"index":5,"embedding":[1]},{"index":0,"embedding":[2]}]}"#,
            r#"{"data":[{"index":0,"embedding":"%%"},{"index":1,"embedding":[2]}]}"#,
            r#"{"data":{}}"#,
            r#"nope"#,
        ] {
            let err = EmbeddingsResponse::from_slice(body.as_bytes(), 2).unwrap_err();
            assert_eq!(err.kind(), crate::ErrorKind::Transport, "{body}");
        }
    }

    #[test]
    fn envelope_is_invisible_to_chat_requests() {
        let mut chat = ChatRequest::new("m", vec![crate::Message::user("x")]);
        chat.extensions
            .insert(Embeddings(Arc::new(EmbeddingsRequest::new("m", ["a"]))));
        assert!(chat.as_embeddings().is_none());
        let env = ChatRequest::embeddings(EmbeddingsRequest::new("m", ["abc", "de"]));
        assert_eq!(env.prompt_text_len(), 5);
        assert_eq!(env.output_limit(), Some(0));
    }
}
