//! An existing axum application that adds an LLM endpoint of its own.
//!
//! The app already has its routes (`/healthz`, `/notes`). It adds `POST /explain
//! {"topic": ".."}` answering `{"text", "model", "cache"}`: not the OpenAI surface, just a
//! handler that calls an LLM service. The service is a stack built once with
//! `tower::ServiceBuilder` from llm-tower layers ([`llm_stack`]) and shared through axum's
//! `State`: handlers clone it (clones share the layers' state: the cache, the limits), wait
//! for readiness and call it.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! use example_axum_app::{app, demo_llm, llm_stack};
//!
//! let router: axum::Router = app(llm_stack(demo_llm()));
//! # let _ = router;
//! # }
//! ```

use std::sync::{Arc, RwLock};

use axum::extract::State;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use llm_tower_core::{BoxLlmService, ChatRequest, LlmError, Message};
use serde::{Deserialize, Serialize};
use tower::ServiceExt;

mod stack;
pub use stack::{demo_llm, llm_stack};

/// The application's shared state: its own data plus the LLM stack.
#[derive(Clone, Debug)]
pub struct AppState {
    notes: Arc<RwLock<Vec<Note>>>,
    llm: BoxLlmService,
}

/// A note of the pre-existing part of the app.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Note {
    /// The note's text.
    pub text: String,
}

/// `POST /explain` body.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExplainBody {
    /// What to explain.
    pub topic: String,
}

/// `POST /explain` answer.
#[derive(Debug, Serialize, Deserialize)]
pub struct Explanation {
    /// The explanation.
    pub text: String,
    /// The model that served it.
    pub model: String,
    /// `hit`, `miss`, `bypass` or `none`.
    pub cache: String,
}

/// The application: its own routes plus `POST /explain`, served by `llm`.
pub fn app(llm: BoxLlmService) -> Router {
    let state = AppState {
        notes: Arc::new(RwLock::new(Vec::new())),
        llm,
    };
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/notes", get(list_notes).post(add_note))
        .route("/explain", post(explain))
        .with_state(state)
}

async fn list_notes(State(state): State<AppState>) -> Json<Vec<Note>> {
    let notes = state
        .notes
        .read()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    Json(notes.clone())
}

async fn add_note(State(state): State<AppState>, Json(note): Json<Note>) -> StatusCode {
    state
        .notes
        .write()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .push(note);
    StatusCode::CREATED
}

async fn explain(
    State(state): State<AppState>,
    Json(body): Json<ExplainBody>,
) -> Result<Json<Explanation>, ApiError> {
    let topic = body.topic.trim();
    if topic.is_empty() || topic.len() > 2000 {
        return Err(ApiError(
            LlmError::bad_request("topic must be 1 to 2000 bytes").with_param("topic"),
        ));
    }
    let mut req = ChatRequest::new(
        "explain-model",
        vec![
            Message::system("You explain technical topics to engineers in three short sentences."),
            Message::user(format!("Explain: {topic}")),
        ],
    )
    .with_task_type("explain");
    // Deterministic, so the cache layer may answer a repeated topic.
    req.temperature = Some(serde_json::Number::from(0));
    // `oneshot` = wait for readiness, then call: the tower contract.
    let resp = state.llm.clone().oneshot(req).await.map_err(ApiError)?;
    let meta = resp.meta.clone();
    let done = resp.into_complete().await.map_err(ApiError)?;
    Ok(Json(Explanation {
        text: done.text(),
        model: meta.model.unwrap_or(done.model),
        cache: meta.cache.as_str().to_owned(),
    }))
}

/// An [`LlmError`] as an HTTP answer: its status, `retry-after` when known, and the
/// OpenAI-style error body.
#[derive(Debug)]
pub struct ApiError(pub LlmError);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status =
            StatusCode::from_u16(self.0.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let mut resp = (status, Json(self.0.to_openai_json())).into_response();
        if let Some(after) = self.0.retry_after() {
            let secs = after.as_secs() + u64::from(after.subsec_nanos() > 0);
            if let Ok(v) = HeaderValue::from_str(&secs.to_string()) {
                resp.headers_mut().insert(header::RETRY_AFTER, v);
            }
        }
        resp
    }
}
