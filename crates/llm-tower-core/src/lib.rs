#![doc = include_str!("../README.md")]
#![cfg_attr(docsrs, feature(doc_cfg))]

mod aggregate;
mod body;
mod build;
pub mod dialect;
pub mod embeddings;
mod encoded;
mod error;
mod ext;
mod json;
mod meta;
mod nullable;
mod observe;
mod request;
mod response;
mod service;

pub use aggregate::StreamAccumulator;
pub use body::{
    BoxChunkStream, BoxEventStream, ChunkStream, LlmResponse, Outcome, ResponseBody, StreamEvent,
};
pub use build::Answer;
pub use dialect::{Dialect, NativeRequest};
pub use embeddings::{
    EmbeddingInput, EmbeddingsRequest, EmbeddingsResponse, EncodingFormat,
    MAX_EMBEDDING_DIMENSIONS, MAX_EMBEDDING_INPUTS,
};
pub use encoded::{EncodedChunk, EncodedResponse, NativeEvent, StreamHead};
pub use error::{ErrorKind, LlmError, MAX_RETRY_AFTER};
pub use ext::{CachePolicy, Deadline, IdempotencyKey, TakenTargets, TaskType, Tenant};
pub use meta::{
    Attempt, AttemptError, CacheStatus, Cost, LocalLimits, NanoUsd, PaidAttempt, RateLimitHeadroom,
    ResponseMeta,
};
pub use observe::{
    AttemptEnd, AttemptObserver, ObserveEvent, Observer, RequestObserver, TraceParent,
};
pub use request::{
    ChatRequest, Content, ContentPart, Extra, FunctionCall, FunctionDef, ImageUrl, InputAudio,
    JsonSchemaFormat, MAX_REQUEST_BYTES, Message, ResponseFormat, Role, StreamOptions, Tool,
    ToolCall,
};
pub use response::{
    ChatChunk, ChatResponse, Choice, ChunkChoice, CompletionTokensDetails, Delta,
    FunctionCallDelta, PromptTokensDetails, ToolCallDelta, Usage,
};
pub use service::{BoxLlmService, BoxableLlmService, LlmService, boxed};
