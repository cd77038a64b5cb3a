//! Embedding llm-tower in a tonic gRPC service.
//!
//! The gRPC handlers ([`AssistantService`]) own an LLM service, the stack built by
//! [`llm_stack`] with `tower::ServiceBuilder` from llm-tower's layers, and call it like any
//! other tower service: clone it (clones share the layers' state), wait for readiness,
//! call. The proto is compiled at build time by `build.rs` with the pure-Rust `protox`
//! compiler, so building needs no system `protoc`.
//!
//! ```no_run
//! # #[tokio::main] async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use example_tonic_app::{AssistantService, demo_llm, llm_stack, pb::assistant_server::AssistantServer};
//!
//! let svc = AssistantService::new(llm_stack(demo_llm()));
//! tonic::transport::Server::builder()
//!     .add_service(AssistantServer::new(svc))
//!     .serve("127.0.0.1:50051".parse()?)
//!     .await?;
//! # Ok(()) }
//! ```

use std::pin::Pin;

use futures_util::{Stream, StreamExt};
use llm_tower_core::{BoxableLlmService, ChatRequest, ErrorKind, LlmError, Message};
use tonic::{Request, Response, Status};
use tower::ServiceExt;

/// The code generated from `proto/assistant.proto`.
#[allow(missing_docs, unreachable_pub, clippy::all, clippy::pedantic)]
pub mod pb {
    tonic::include_proto!("assistant.v1");
}

mod stack;
pub use stack::{demo_llm, llm_stack};

use pb::{ExplainChunk, ExplainReply, ExplainRequest};

/// The system prompt of every explanation: stable, so providers can cache it.
const SYSTEM: &str = "You explain technical topics to engineers in three short sentences.";

/// The gRPC `Assistant` service, generic over the LLM stack it calls.
#[derive(Debug, Clone)]
pub struct AssistantService<S> {
    llm: S,
    model: String,
}

impl<S> AssistantService<S> {
    /// Serves the API with `llm` (asking it for the model `"explain-model"`).
    pub fn new(llm: S) -> Self {
        Self {
            llm,
            model: "explain-model".to_owned(),
        }
    }

    /// Asks the stack for `model` instead.
    #[must_use]
    pub fn with_model(mut self, model: impl Into<String>) -> Self {
        self.model = model.into();
        self
    }

    fn chat_request(&self, req: &ExplainRequest, stream: bool) -> Result<ChatRequest, Status> {
        let topic = req.topic.trim();
        if topic.is_empty() {
            return Err(Status::invalid_argument("topic must not be empty"));
        }
        if topic.len() > 2000 {
            return Err(Status::invalid_argument("topic is longer than 2000 bytes"));
        }
        let mut chat = ChatRequest::new(
            self.model.clone(),
            vec![
                Message::system(SYSTEM),
                Message::user(format!("Explain: {topic}")),
            ],
        )
        .with_task_type("explain");
        // Temperature 0 makes the request deterministic, so the cache layer may answer it.
        chat.temperature = Some(serde_json::Number::from(0));
        if stream {
            chat.stream = Some(true);
        }
        if !req.tenant.is_empty() {
            chat.set_tenant(req.tenant.as_str());
        }
        Ok(chat)
    }
}

/// Maps an [`LlmError`] to the gRPC status a client expects.
pub fn status_from(err: &LlmError) -> Status {
    let msg = err.message().to_owned();
    match err.kind() {
        ErrorKind::RateLimited | ErrorKind::BudgetExceeded => Status::resource_exhausted(msg),
        ErrorKind::Timeout => Status::deadline_exceeded(msg),
        ErrorKind::Unavailable | ErrorKind::Overloaded | ErrorKind::Transport => {
            Status::unavailable(msg)
        }
        ErrorKind::BadRequest | ErrorKind::ContextLengthExceeded | ErrorKind::ContentFiltered => {
            Status::invalid_argument(msg)
        }
        ErrorKind::Auth => Status::unauthenticated(msg),
        ErrorKind::NotFound => Status::not_found(msg),
        ErrorKind::Cancelled => Status::cancelled(msg),
        ErrorKind::InvalidOutput | ErrorKind::Internal => Status::internal(msg),
        _ => Status::unknown(msg),
    }
}

type ChunkStream = Pin<Box<dyn Stream<Item = Result<ExplainChunk, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl<S> pb::assistant_server::Assistant for AssistantService<S>
where
    S: BoxableLlmService,
{
    async fn explain(
        &self,
        request: Request<ExplainRequest>,
    ) -> Result<Response<ExplainReply>, Status> {
        let chat = self.chat_request(request.get_ref(), false)?;
        // Clones share the layers' state (cache, limits, budgets); `oneshot` waits for
        // readiness then calls, the tower contract.
        let resp = self
            .llm
            .clone()
            .oneshot(chat)
            .await
            .map_err(|e| status_from(&e))?;
        let meta = resp.meta.clone();
        let body = resp.into_complete().await.map_err(|e| status_from(&e))?;
        let total_tokens = body
            .usage
            .as_ref()
            .or(meta.usage.as_ref())
            .map_or(0, |u| u.total_tokens);
        Ok(Response::new(ExplainReply {
            text: body.text(),
            model: meta.model.unwrap_or(body.model),
            cache: meta.cache.as_str().to_owned(),
            total_tokens,
        }))
    }

    type ExplainStreamStream = ChunkStream;

    async fn explain_stream(
        &self,
        request: Request<ExplainRequest>,
    ) -> Result<Response<Self::ExplainStreamStream>, Status> {
        let chat = self.chat_request(request.get_ref(), true)?;
        let resp = self
            .llm
            .clone()
            .oneshot(chat)
            .await
            .map_err(|e| status_from(&e))?;
        // An upstream failure mid-stream reaches the client as an error status, never as a
        // clean-looking end of stream.
        let stream = resp.into_stream().filter_map(|item| async move {
            match item {
                Ok(chunk) => {
                    let text: String = chunk
                        .choices
                        .iter()
                        .filter_map(|c| c.delta.text())
                        .collect();
                    (!text.is_empty()).then_some(Ok(ExplainChunk { text }))
                }
                Err(e) => Some(Err(status_from(&e))),
            }
        });
        Ok(Response::new(Box::pin(stream)))
    }
}
