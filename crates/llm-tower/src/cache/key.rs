//! Cache keys: a blake3 hash of the request fields that change the answer, scoped by tenant.

use std::fmt;

use llm_tower_core::{
    ChatRequest, Content, ContentPart, EmbeddingInput, EmbeddingsRequest, Extra, FunctionCall,
    FunctionDef, ImageUrl, InputAudio, JsonSchemaFormat, Message, ResponseFormat, Role, Tool,
    ToolCall,
};
use serde_json::{Map, Number, Value};

/// Top-level request fields that never change the answer, so they are left out of the key:
///
/// | field | why it is ignored |
/// |---|---|
/// | `user` | end-user id for abuse monitoring |
/// | `stream` | a stored answer is replayed as a stream or assembled into one response |
/// | `stream_options` | only asks for a usage chunk |
/// | `metadata` | tags for the provider's dashboards |
/// | `store` | whether the provider keeps the completion |
/// | `service_tier` | latency/price tier, not the answer |
/// | `safety_identifier` | successor of `user` |
/// | `prompt_cache_key`, `prompt_cache_retention` | provider prompt-cache routing hints |
///
/// Every other field — typed (`model`, `messages`, `tools`, `tool_choice`,
/// `response_format`, `temperature`, `top_p`, `seed`, `max_tokens`,
/// `max_completion_tokens`, `n`) or not (`stop`, `logprobs`, `top_logprobs`,
/// `presence_penalty`, `frequency_penalty`, `logit_bias`, `parallel_tool_calls`,
/// `reasoning_effort`, `modalities`, `prediction`, any future field …) — is part of the key.
pub const IGNORED_FIELDS: &[&str] = &[
    "user",
    "stream",
    "stream_options",
    "metadata",
    "store",
    "service_tier",
    "safety_identifier",
    "prompt_cache_key",
    "prompt_cache_retention",
];

/// Bumped whenever the key encoding changes, so old entries are simply never found again.
const KEY_VERSION: &[u8] = b"llm-tower-cache-key-v2";

/// A cache key: the 32-byte blake3 hash of a request's answer-changing fields, its
/// [`Tenant`](llm_tower_core::Tenant) and its [`TaskType`](llm_tower_core::TaskType).
///
/// What goes in, in order: a version tag; the tenant (absent ≠ empty); the task type (a
/// route layer may pick a different model per task, so two tasks never share an entry);
/// the dialect of a request that carries a
/// [`NativeRequest`](llm_tower_core::NativeRequest) of another dialect than chat; then every request field except those in [`IGNORED_FIELDS`]. The encoding is
/// canonical: every value is tagged and length-prefixed (no two different requests encode
/// the same), the typed fields are numbered (their order is fixed), JSON object keys are hashed in sorted order (so `{"a":1,"b":2}` and
/// `{"b":2,"a":1}` agree) and integral numbers hash the same whatever their spelling
/// (`0`, `0.0`). Nothing is serialized into an intermediate buffer: the fields stream into
/// the hasher through a small stack buffer.
///
/// ```
/// use llm_tower::cache::CacheKey;
/// use llm_tower::{ChatRequest, Message};
///
/// let mut a = ChatRequest::new("gpt-4o-mini", vec![Message::user("Hi")]);
/// a.temperature = Some(0.into());
/// let mut b = a.clone();
/// b.user = Some("alice".into()); // does not change the answer
/// assert_eq!(CacheKey::for_request(&a), CacheKey::for_request(&b));
/// b.temperature = Some(1.into()); // does
/// assert_ne!(CacheKey::for_request(&a), CacheKey::for_request(&b));
/// let c = a.clone().with_tenant("acme"); // tenants never share
/// assert_ne!(CacheKey::for_request(&a), CacheKey::for_request(&c));
/// assert_eq!(CacheKey::for_request(&a).to_hex().len(), 64);
/// ```
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CacheKey([u8; 32]);

impl CacheKey {
    /// Computes the key of `req`.
    pub fn for_request(req: &ChatRequest) -> Self {
        let mut h = KeyHasher::new();
        h.raw(KEY_VERSION);
        h.opt(req.tenant().map(|t| t.as_str()), KeyHasher::str);
        h.opt(req.task_type().map(|t| t.as_str()), KeyHasher::str);
        // A request of another dialect is answered in it (its provider's own bytes), so it
        // never shares an entry with a chat request of the same view. Chat keys are as
        // they were.
        if let Some(native) = req.extensions.get::<llm_tower_core::NativeRequest>()
            && native.dialect() != llm_tower_core::Dialect::Chat
        {
            h.slot(S_DIALECT);
            h.str(native.dialect().as_str());
        }
        h.request(req);
        Self(h.finish())
    }

    /// The key of one input of an embeddings request: the tenant, the task, the model,
    /// `dimensions`, every untyped field but those in [`IGNORED_FIELDS`], and that one
    /// input, so each input of a batch is cached on its own and a later batch that shares
    /// inputs finds them. `encoding_format` is not part of it: the vector is stored once
    /// and written in whichever format a request asks for. Chat and embedding keys never
    /// collide (each starts with its own tag).
    ///
    /// ```
    /// use llm_tower::cache::CacheKey;
    /// use llm_tower::{ChatRequest, EmbeddingsRequest, EncodingFormat};
    ///
    /// let mut emb = EmbeddingsRequest::new("text-embedding-3-small", ["a", "b"]);
    /// let req = ChatRequest::embeddings(emb.clone());
    /// let a = CacheKey::for_embedding(&req, &emb, &emb.input[0]);
    /// assert_ne!(a, CacheKey::for_embedding(&req, &emb, &emb.input[1]));
    /// emb.encoding_format = Some(EncodingFormat::Base64);
    /// assert_eq!(a, CacheKey::for_embedding(&req, &emb, &emb.input[0]));
    /// emb.dimensions = Some(64);
    /// assert_ne!(a, CacheKey::for_embedding(&req, &emb, &emb.input[0]));
    /// ```
    pub fn for_embedding(
        req: &ChatRequest,
        emb: &EmbeddingsRequest,
        input: &EmbeddingInput,
    ) -> Self {
        let mut h = KeyHasher::new();
        h.raw(KEY_VERSION);
        h.raw(b"embedding");
        h.opt(req.tenant().map(|t| t.as_str()), KeyHasher::str);
        h.opt(req.task_type().map(|t| t.as_str()), KeyHasher::str);
        h.slot(S_MODEL);
        h.str(&req.model);
        h.slot(S_DIMENSIONS);
        h.opt(emb.dimensions, KeyHasher::u64);
        h.slot(S_EXTRA);
        h.object(&emb.extra, IGNORED_FIELDS);
        h.slot(S_INPUT);
        match input {
            EmbeddingInput::Text(t) => h.str(t),
            EmbeddingInput::Tokens(t) => h.vec(t, |h, id| h.u64(u64::from(*id))),
        }
        Self(h.finish())
    }

    /// Builds a key from raw bytes (e.g. read back from a store).
    pub const fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    /// The raw bytes.
    pub const fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// Lower-case hex (64 characters), e.g. for a Redis key.
    pub fn to_hex(&self) -> String {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let mut s = String::with_capacity(64);
        for b in self.0 {
            s.push(HEX[usize::from(b >> 4)] as char);
            s.push(HEX[usize::from(b & 0xf)] as char);
        }
        s
    }
}

impl fmt::Debug for CacheKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The first 8 bytes identify an entry well enough in logs.
        write!(f, "CacheKey({}…)", &self.to_hex()[..16])
    }
}

impl fmt::Display for CacheKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

// Type tags of the encoding. Each value starts with one, so the encoding is prefix-free.
const T_NONE: u8 = 0;
const T_SOME: u8 = 1;
const T_STR: u8 = 2;
const T_NULL: u8 = 3;
const T_FALSE: u8 = 4;
const T_TRUE: u8 = 5;
const T_INT: u8 = 6;
const T_UINT: u8 = 7;
const T_FLOAT: u8 = 8;
const T_ARRAY: u8 = 9;
const T_OBJECT: u8 = 10;
const T_FIELD: u8 = 11;
const T_SLOT: u8 = 12;

// The typed fields, by number: the sequence is fixed, so a number tells them apart as well
// as a name would, in 2 bytes instead of ~20 (a short request then hashes in a few blake3
// blocks instead of eight).
const S_MODEL: u8 = 1;
const S_MESSAGES: u8 = 2;
const S_TEMPERATURE: u8 = 3;
const S_TOP_P: u8 = 4;
const S_MAX_TOKENS: u8 = 5;
const S_MAX_COMPLETION_TOKENS: u8 = 6;
const S_N: u8 = 7;
const S_SEED: u8 = 8;
const S_RESPONSE_FORMAT: u8 = 9;
const S_TOOLS: u8 = 10;
const S_TOOL_CHOICE: u8 = 11;
const S_EXTRA: u8 = 12;
const S_DIALECT: u8 = 13;
const S_DIMENSIONS: u8 = 14;
const S_INPUT: u8 = 15;

const BUF: usize = 4096;
/// Encodings longer than this (more than one blake3 chunk) are zero-padded to `BUF`.
const PAD_ABOVE: usize = 1024;

/// A blake3 hasher fed through a buffer: many small writes become few large updates,
/// which lets blake3 use its SIMD paths on multi-kilobyte requests. The buffer is a
/// `Vec` with reserved capacity, not an array: a zeroed 4 KiB array cost more than
/// hashing a small request.
struct KeyHasher {
    hasher: blake3::Hasher,
    buf: Vec<u8>,
    flushed: bool,
}

impl KeyHasher {
    #[inline]
    fn new() -> Self {
        Self {
            hasher: blake3::Hasher::new(),
            buf: Vec::with_capacity(BUF),
            flushed: false,
        }
    }

    fn raw(&mut self, bytes: &[u8]) {
        if self.buf.len() + bytes.len() > BUF {
            self.flush();
            if bytes.len() > BUF / 2 {
                self.hasher.update(bytes);
                return;
            }
        }
        self.buf.extend_from_slice(bytes);
    }

    fn flush(&mut self) {
        self.hasher.update(&self.buf);
        self.buf.clear();
        self.flushed = true;
    }

    // By reference: the hasher is ~2 KB, and a move into the call was a copy of it.
    fn finish(&mut self) -> [u8; 32] {
        if !self.flushed && self.buf.len() > PAD_ABOVE {
            // blake3 compresses the 1 KiB chunks of an input in parallel (SIMD) only when
            // it sees several at once; a 1–4 KiB input is otherwise hashed one chunk after
            // the other. Hashing the whole zero-filled buffer instead is faster for every
            // typical request size. Still injective: the encoding is prefix-free (a fixed
            // field sequence of tagged, length-prefixed values), so no encoding is another
            // one plus zeros.
            self.buf.resize(BUF, 0);
            self.hasher.update(&self.buf);
            return *self.hasher.finalize().as_bytes();
        }
        self.flush();
        *self.hasher.finalize().as_bytes()
    }

    fn tag(&mut self, t: u8) {
        self.raw(&[t]);
    }

    /// A length or count, LEB128 (prefix-free: one byte below 128).
    fn len_prefix(&mut self, n: usize) {
        self.varint(n as u64);
    }

    fn varint(&mut self, mut n: u64) {
        let mut out = [0u8; 10];
        let mut i = 0;
        while n >= 0x80 {
            out[i] = (n as u8) | 0x80;
            n >>= 7;
            i += 1;
        }
        out[i] = n as u8;
        self.raw(&out[..=i]);
    }

    fn str(&mut self, s: &str) {
        self.tag(T_STR);
        self.len_prefix(s.len());
        self.raw(s.as_bytes());
    }

    /// A typed field, by its number (see `S_MODEL`).
    fn slot(&mut self, id: u8) {
        self.raw(&[T_SLOT, id]);
    }

    /// A named field: the name keeps `{"a": x}` apart from `{"b": x}`.
    fn field(&mut self, name: &str) {
        self.tag(T_FIELD);
        self.len_prefix(name.len());
        self.raw(name.as_bytes());
    }

    fn opt<T>(&mut self, v: Option<T>, f: impl FnOnce(&mut Self, T)) {
        match v {
            None => self.tag(T_NONE),
            Some(v) => {
                self.tag(T_SOME);
                f(self, v);
            }
        }
    }

    fn bool(&mut self, b: bool) {
        self.tag(if b { T_TRUE } else { T_FALSE });
    }

    fn u64(&mut self, n: u64) {
        self.tag(T_UINT);
        self.varint(n);
    }

    fn i64(&mut self, n: i64) {
        if let Ok(u) = u64::try_from(n) {
            self.u64(u);
        } else {
            self.tag(T_INT);
            self.raw(&n.to_le_bytes());
        }
    }

    fn number(&mut self, n: &Number) {
        if let Some(u) = n.as_u64() {
            self.u64(u);
        } else if let Some(i) = n.as_i64() {
            self.i64(i);
        } else if let Some(f) = n.as_f64() {
            // `1.0` and `1` mean the same to a provider: hash integral floats as integers.
            if f.fract() == 0.0 && f.abs() < 9.0e15 {
                self.i64(f as i64);
            } else {
                self.tag(T_FLOAT);
                self.raw(&f.to_bits().to_le_bytes());
            }
        } else {
            // Only reachable with serde_json's arbitrary_precision: hash the spelling.
            self.tag(T_FLOAT);
            self.str(&n.to_string());
        }
    }

    fn value(&mut self, v: &Value) {
        match v {
            Value::Null => self.tag(T_NULL),
            Value::Bool(b) => self.bool(*b),
            Value::Number(n) => self.number(n),
            Value::String(s) => self.str(s),
            Value::Array(a) => {
                self.tag(T_ARRAY);
                self.len_prefix(a.len());
                for x in a {
                    self.value(x);
                }
            }
            Value::Object(m) => self.object(m, &[]),
        }
    }

    /// A JSON object in sorted key order, leaving out `skip`ped keys.
    fn object(&mut self, m: &Map<String, Value>, skip: &[&str]) {
        self.tag(T_OBJECT);
        let emit = |h: &mut Self, k: &String, v: &Value| {
            if !skip.contains(&k.as_str()) {
                h.field(k);
                h.value(v);
            }
        };
        // serde_json's default map is already sorted; with `preserve_order` it is not,
        // and only then do we pay for sorting.
        if m.keys().is_sorted() {
            for (k, v) in m {
                emit(self, k, v);
            }
        } else {
            let mut entries: Vec<(&String, &Value)> = m.iter().collect();
            entries.sort_unstable_by(|a, b| a.0.cmp(b.0));
            for (k, v) in entries {
                emit(self, k, v);
            }
        }
        // Terminates the object, so nested objects cannot run into the next field.
        self.tag(T_NONE);
    }

    fn extra(&mut self, extra: &Extra) {
        self.slot(S_EXTRA);
        self.object(extra, &[]);
    }

    fn vec<T>(&mut self, v: &[T], f: impl Fn(&mut Self, &T)) {
        self.tag(T_ARRAY);
        self.len_prefix(v.len());
        for x in v {
            f(self, x);
        }
    }

    // Every typed struct below is destructured without `..`: a field added to the core
    // types fails to compile here instead of being silently left out of the key.

    fn request(&mut self, req: &ChatRequest) {
        let ChatRequest {
            model,
            messages,
            stream: _,
            stream_options: _,
            temperature,
            top_p,
            max_tokens,
            max_completion_tokens,
            n,
            seed,
            response_format,
            tools,
            tool_choice,
            user: _,
            extra,
            extensions: _,
        } = req;
        self.slot(S_MODEL);
        self.str(model);
        self.slot(S_MESSAGES);
        self.vec(messages, Self::message);
        self.slot(S_TEMPERATURE);
        self.opt(temperature.as_ref(), Self::number);
        self.slot(S_TOP_P);
        self.opt(top_p.as_ref(), Self::number);
        // `max_tokens` and `max_completion_tokens` mean the same limit to most providers,
        // but they are kept apart: a provider may treat them differently.
        self.slot(S_MAX_TOKENS);
        self.opt(*max_tokens, Self::u64);
        self.slot(S_MAX_COMPLETION_TOKENS);
        self.opt(*max_completion_tokens, Self::u64);
        self.slot(S_N);
        // `n` absent and `n: 1` ask for the same single choice.
        self.u64(n.unwrap_or(1));
        self.slot(S_SEED);
        self.opt(*seed, Self::i64);
        self.slot(S_RESPONSE_FORMAT);
        self.opt(response_format.as_ref(), Self::response_format);
        self.slot(S_TOOLS);
        self.opt(tools.as_deref(), |h, t| h.vec(t, Self::tool));
        self.slot(S_TOOL_CHOICE);
        self.opt(tool_choice.as_ref(), Self::value);
        self.slot(S_EXTRA);
        self.object(extra, IGNORED_FIELDS);
    }

    fn message(&mut self, m: &Message) {
        let Message {
            role,
            content,
            name,
            tool_calls,
            tool_call_id,
            extra,
        } = m;
        self.role(role);
        self.opt(content.as_ref(), |h, c| h.opt(c.as_ref(), Self::content));
        self.opt(name.as_deref(), Self::str);
        self.opt(tool_calls.as_deref(), |h, t| h.vec(t, Self::tool_call));
        self.opt(tool_call_id.as_deref(), Self::str);
        self.extra(extra);
    }

    fn role(&mut self, r: &Role) {
        self.str(r.as_str());
    }

    fn content(&mut self, c: &Content) {
        match c {
            Content::Text(s) => {
                self.tag(0);
                self.str(s);
            }
            Content::Parts(parts) => {
                self.tag(1);
                self.vec(parts, Self::part);
            }
        }
    }

    fn part(&mut self, p: &ContentPart) {
        match p {
            ContentPart::Text { text, extra } => {
                self.str("text");
                self.str(text);
                self.extra(extra);
            }
            ContentPart::ImageUrl { image_url, extra } => {
                let ImageUrl {
                    url,
                    detail,
                    extra: inner,
                } = image_url;
                self.str("image_url");
                self.str(url);
                self.opt(detail.as_deref(), Self::str);
                self.extra(inner);
                self.extra(extra);
            }
            ContentPart::InputAudio { input_audio, extra } => {
                let InputAudio {
                    data,
                    format,
                    extra: inner,
                } = input_audio;
                self.str("input_audio");
                self.str(data);
                self.str(format);
                self.extra(inner);
                self.extra(extra);
            }
            ContentPart::Refusal { refusal, extra } => {
                self.str("refusal");
                self.str(refusal);
                self.extra(extra);
            }
            ContentPart::Other(m) => {
                self.str("other");
                self.object(m, &[]);
            }
        }
    }

    fn tool_call(&mut self, t: &ToolCall) {
        let ToolCall {
            id,
            kind,
            function,
            extra,
        } = t;
        let FunctionCall {
            name,
            arguments,
            extra: fextra,
        } = function;
        self.str(id);
        self.str(kind);
        self.str(name);
        self.str(arguments);
        self.extra(fextra);
        self.extra(extra);
    }

    fn tool(&mut self, t: &Tool) {
        let Tool {
            kind,
            function,
            extra,
        } = t;
        self.str(kind);
        self.opt(function.as_ref(), |h, f| {
            let FunctionDef {
                name,
                description,
                parameters,
                extra,
            } = f;
            h.str(name);
            h.opt(description.as_deref(), Self::str);
            h.opt(parameters.as_ref(), Self::value);
            h.extra(extra);
        });
        self.extra(extra);
    }

    fn response_format(&mut self, r: &ResponseFormat) {
        let ResponseFormat {
            kind,
            json_schema,
            extra,
        } = r;
        self.str(kind);
        self.opt(json_schema.as_ref(), |h, s| {
            let JsonSchemaFormat {
                name,
                schema,
                strict,
                extra,
            } = s;
            h.str(name);
            h.opt(schema.as_ref(), Self::value);
            h.opt(*strict, Self::bool);
            h.extra(extra);
        });
        self.extra(extra);
    }
}
