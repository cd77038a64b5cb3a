//! The LLM service alias and its boxed, cloneable form.

use tower::util::BoxCloneSyncService;
use tower_service::Service;

use crate::{ChatRequest, LlmError, LlmResponse};

/// Any `Service<ChatRequest, Response = LlmResponse, Error = LlmError>`; implemented for
/// every such service, so it can be used as a bound (`S: LlmService`).
pub trait LlmService: Service<ChatRequest, Response = LlmResponse, Error = LlmError> {}

impl<S> LlmService for S where S: Service<ChatRequest, Response = LlmResponse, Error = LlmError> {}

/// An [`LlmService`] that can be boxed into a [`BoxLlmService`] or moved into a spawned
/// task: `Clone + Send + Sync + 'static`, with a `Send + 'static` future. Implemented for
/// every such service, so it is the one bound to write (`S: BoxableLlmService`) where a
/// layer stores services of different types or hands its inner service to another task.
///
/// ```
/// use llm_tower_core::{BoxableLlmService, ChatRequest, ChatResponse, LlmError, LlmResponse};
///
/// fn assert_boxable<S: BoxableLlmService>(_: &S) {}
///
/// let svc = tower::service_fn(|req: ChatRequest| async move {
///     Ok::<_, LlmError>(LlmResponse::complete(ChatResponse::from_text(req.model, "hi")))
/// });
/// assert_boxable(&svc);
/// ```
pub trait BoxableLlmService:
    Service<ChatRequest, Response = LlmResponse, Error = LlmError, Future: Send + 'static>
    + Clone
    + Send
    + Sync
    + 'static
{
}

impl<S> BoxableLlmService for S where
    S: Service<ChatRequest, Response = LlmResponse, Error = LlmError, Future: Send + 'static>
        + Clone
        + Send
        + Sync
        + 'static
{
}

/// A type-erased, cloneable, `Send + Sync` LLM service, for heterogeneous sets
/// (fallback chains, route targets).
pub type BoxLlmService = BoxCloneSyncService<ChatRequest, LlmResponse, LlmError>;

/// Boxes an LLM service into a [`BoxLlmService`].
///
/// ```
/// use llm_tower_core::{boxed, BoxLlmService, ChatRequest, ChatResponse, LlmError, LlmResponse};
///
/// let svc: BoxLlmService = boxed(tower::service_fn(|req: ChatRequest| async move {
///     Ok::<_, LlmError>(LlmResponse::complete(ChatResponse::from_text(req.model, "hi")))
/// }));
/// # let _ = svc;
/// ```
pub fn boxed<S>(service: S) -> BoxLlmService
where
    S: BoxableLlmService,
{
    BoxCloneSyncService::new(service)
}
