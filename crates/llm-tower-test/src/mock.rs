//! A scriptable in-process mock LLM service.

use std::collections::VecDeque;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::StreamExt;
use llm_tower_core::{ChatChunk, ChatRequest, ChatResponse, LlmError, LlmResponse, Usage};
use tower_service::Service;

/// What the mock does for one call.
///
/// ```
/// use llm_tower_test::Step;
/// use llm_tower_core::LlmError;
/// use std::time::Duration;
///
/// let _ok = Step::reply("hello").with_latency(Duration::from_millis(300));
/// let _err = Step::error(LlmError::unavailable("503"));
/// let _stream = Step::stream(["Hel", "lo"])
///     .first_chunk_delay(Duration::from_millis(100))
///     .chunk_delay(Duration::from_millis(10))
///     .fail_after(1, LlmError::transport("connection reset"));
/// ```
#[derive(Clone)]
pub struct Step {
    latency: Duration,
    action: Action,
}

type RespondFn = Arc<dyn Fn(&ChatRequest) -> Result<LlmResponse, LlmError> + Send + Sync>;

#[derive(Clone)]
enum Action {
    Reply {
        text: String,
        usage: Option<Usage>,
    },
    Error(LlmError),
    Stream {
        chunks: Vec<String>,
        first_delay: Duration,
        delay: Duration,
        fail_after: Option<(usize, LlmError)>,
        usage: Option<Usage>,
        finish: bool,
    },
    Hang,
    Respond(RespondFn),
}

impl Step {
    /// Answer with `text` (a complete response, or its chunks if the request streams).
    pub fn reply(text: impl Into<String>) -> Self {
        Self::from_action(Action::Reply {
            text: text.into(),
            usage: None,
        })
    }
    /// Fail with `error`.
    pub fn error(error: LlmError) -> Self {
        Self::from_action(Action::Error(error))
    }
    /// Answer with a stream of these text chunks (then a finish chunk and a usage chunk).
    pub fn stream<I, T>(chunks: I) -> Self
    where
        I: IntoIterator<Item = T>,
        T: Into<String>,
    {
        Self::from_action(Action::Stream {
            chunks: chunks.into_iter().map(Into::into).collect(),
            first_delay: Duration::ZERO,
            delay: Duration::ZERO,
            fail_after: None,
            usage: None,
            finish: true,
        })
    }
    /// Never answer (for timeout tests).
    pub fn hang() -> Self {
        Self::from_action(Action::Hang)
    }
    /// Answer with whatever `f` builds from the request.
    pub fn respond<F>(f: F) -> Self
    where
        F: Fn(&ChatRequest) -> Result<LlmResponse, LlmError> + Send + Sync + 'static,
    {
        Self::from_action(Action::Respond(Arc::new(f)))
    }

    fn from_action(action: Action) -> Self {
        Self {
            latency: Duration::ZERO,
            action,
        }
    }

    /// Wait this long before answering (before the first chunk for streams).
    #[must_use]
    pub fn with_latency(mut self, latency: Duration) -> Self {
        self.latency = latency;
        self
    }
    /// Report this usage instead of the estimated one.
    #[must_use]
    pub fn with_usage(mut self, u: Usage) -> Self {
        match &mut self.action {
            Action::Reply { usage, .. } | Action::Stream { usage, .. } => *usage = Some(u),
            _ => {}
        }
        self
    }
    /// Streams: delay before the first chunk (after the response itself was returned).
    #[must_use]
    pub fn first_chunk_delay(mut self, d: Duration) -> Self {
        if let Action::Stream { first_delay, .. } = &mut self.action {
            *first_delay = d;
        }
        self
    }
    /// Streams: delay between chunks.
    #[must_use]
    pub fn chunk_delay(mut self, d: Duration) -> Self {
        if let Action::Stream { delay, .. } = &mut self.action {
            *delay = d;
        }
        self
    }
    /// Streams: yield `n` chunks, then `error`.
    #[must_use]
    pub fn fail_after(mut self, n: usize, error: LlmError) -> Self {
        if let Action::Stream { fail_after, .. } = &mut self.action {
            *fail_after = Some((n, error));
        }
        self
    }
    /// Streams: end after the text chunks, without finish reason or usage chunk.
    #[must_use]
    pub fn without_finish(mut self) -> Self {
        if let Action::Stream { finish, .. } = &mut self.action {
            *finish = false;
        }
        self
    }
}

impl fmt::Debug for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match &self.action {
            Action::Reply { .. } => "reply",
            Action::Error(_) => "error",
            Action::Stream { .. } => "stream",
            Action::Hang => "hang",
            Action::Respond(_) => "respond",
        };
        f.debug_struct("Step")
            .field("latency", &self.latency)
            .field("action", &kind)
            .finish()
    }
}

#[derive(Default)]
struct State {
    script: VecDeque<Step>,
    fallback: Option<Step>,
    requests: Vec<ChatRequest>,
    calls: usize,
}

/// A scriptable mock LLM service: each call takes the next scripted [`Step`] (or the
/// default step once the script is empty), records the request and counts the call.
/// Clones share the script and the records. Time uses tokio's clock, so
/// `tokio::time::pause()` controls latencies.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// use llm_tower_core::{ChatRequest, LlmError, Message};
/// use llm_tower_test::{MockLlm, Step};
/// use tower::{Service, ServiceExt};
///
/// let mock = MockLlm::new("mock")
///     .then(Step::error(LlmError::unavailable("down")))
///     .then(Step::reply("hi"));
/// let mut svc = mock.clone();
/// let req = ChatRequest::new("m", vec![Message::user("x")]);
/// assert!(svc.ready().await.unwrap().call(req.clone()).await.is_err());
/// let resp = svc.ready().await.unwrap().call(req).await.unwrap();
/// assert_eq!(resp.into_complete().await.unwrap().text(), "hi");
/// assert_eq!(mock.calls(), 2);
/// # }
/// ```
#[derive(Clone)]
pub struct MockLlm {
    name: Arc<str>,
    state: Arc<Mutex<State>>,
}

impl fmt::Debug for MockLlm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MockLlm")
            .field("name", &self.name)
            .field("calls", &self.calls())
            .finish()
    }
}

impl MockLlm {
    /// A mock named `name` (reported as the provider) that answers `"ok"` by default.
    pub fn new(name: impl Into<Arc<str>>) -> Self {
        let state = State {
            fallback: Some(Step::reply("ok")),
            ..State::default()
        };
        Self {
            name: name.into(),
            state: Arc::new(Mutex::new(state)),
        }
    }

    /// Appends a step to the script.
    #[must_use]
    pub fn then(self, step: Step) -> Self {
        self.push(step);
        self
    }

    /// Appends a step to the script (through a shared handle).
    pub fn push(&self, step: Step) {
        self.lock().script.push_back(step);
    }

    /// The step used once the script is empty.
    #[must_use]
    pub fn otherwise(self, step: Step) -> Self {
        self.lock().fallback = Some(step);
        self
    }

    /// Number of calls so far.
    pub fn calls(&self) -> usize {
        self.lock().calls
    }

    /// Requests seen so far, in order.
    pub fn requests(&self) -> Vec<ChatRequest> {
        self.lock().requests.clone()
    }

    /// The last request seen.
    pub fn last_request(&self) -> Option<ChatRequest> {
        self.lock().requests.last().cloned()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panicking test thread must not hide the records from the others.
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// The future of [`MockLlm`].
pub struct MockFuture(Pin<Box<dyn Future<Output = Result<LlmResponse, LlmError>> + Send>>);

impl fmt::Debug for MockFuture {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("MockFuture")
    }
}

impl Future for MockFuture {
    type Output = Result<LlmResponse, LlmError>;
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        self.0.as_mut().poll(cx)
    }
}

impl Service<ChatRequest> for MockLlm {
    type Response = LlmResponse;
    type Error = LlmError;
    type Future = MockFuture;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), LlmError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: ChatRequest) -> MockFuture {
        let step = {
            let mut st = self.lock();
            st.calls += 1;
            st.requests.push(req.clone());
            st.script.pop_front().or_else(|| st.fallback.clone())
        };
        let name = self.name.clone();
        MockFuture(Box::pin(async move {
            let Some(step) = step else {
                return Err(LlmError::internal("mock script exhausted"));
            };
            if !step.latency.is_zero() {
                tokio::time::sleep(step.latency).await;
            }
            let mut resp = run(step.action, &req)?;
            resp.meta.provider.get_or_insert(name);
            resp.meta.model.get_or_insert_with(|| req.model.clone());
            resp.meta.upstream_time.get_or_insert(step.latency);
            Ok(resp)
        }))
    }
}

/// Rough usage estimate for scripted answers: 4 bytes a token.
fn estimate(req: &ChatRequest, text_len: usize) -> Usage {
    Usage::new(
        (req.prompt_text_len() / 4 + 1) as u64,
        (text_len / 4 + 1) as u64,
    )
}

fn run(action: Action, req: &ChatRequest) -> Result<LlmResponse, LlmError> {
    match action {
        Action::Error(e) => Err(e),
        Action::Respond(f) => f(req),
        Action::Hang => Ok(LlmResponse::stream(futures_util::stream::pending())),
        Action::Reply { text, usage } => {
            let mut resp = ChatResponse::from_text(req.model.clone(), text.clone());
            resp.usage = Some(usage.unwrap_or_else(|| estimate(req, text.len())));
            let complete = LlmResponse::complete(resp);
            if req.is_stream() {
                let meta = complete.meta.clone();
                let mut streamed = LlmResponse {
                    body: llm_tower_core::ResponseBody::Stream(complete.into_stream()),
                    meta,
                };
                streamed.meta.usage = None;
                Ok(streamed)
            } else {
                Ok(complete)
            }
        }
        Action::Stream {
            chunks,
            first_delay,
            delay,
            fail_after,
            usage,
            finish,
        } => {
            let total: usize = chunks.iter().map(String::len).sum();
            let usage = usage.unwrap_or_else(|| estimate(req, total));
            let model = req.model.clone();
            let id = format!("chatcmpl-mock-{}", uuid_like());
            let mut items: Vec<(Duration, Result<ChatChunk, LlmError>)> = Vec::new();
            // `fail_after(n)` yields min(n, len) chunks, then the error.
            let keep = fail_after
                .as_ref()
                .map_or(chunks.len(), |(n, _)| (*n).min(chunks.len()));
            for (i, text) in chunks.iter().take(keep).enumerate() {
                let d = if i == 0 { first_delay } else { delay };
                items.push((
                    d,
                    Ok(ChatChunk::text(id.clone(), model.clone(), text.clone())),
                ));
            }
            let failed = fail_after.is_some();
            if let Some((_, err)) = fail_after {
                let d = if keep == 0 { first_delay } else { delay };
                items.push((d, Err(err)));
            }
            if finish && !failed {
                let mut last = ChatChunk::text(id.clone(), model.clone(), "");
                last.choices[0].delta.content = None;
                last.choices[0].finish_reason = Some(Some("stop".into()));
                items.push((Duration::ZERO, Ok(last)));
                let mut u = ChatChunk::text(id, model, "");
                u.choices.clear();
                u.usage = Some(Some(usage));
                items.push((Duration::ZERO, Ok(u)));
            }
            let stream = futures_util::stream::iter(items).then(|(d, item)| async move {
                if !d.is_zero() {
                    tokio::time::sleep(d).await;
                }
                item
            });
            Ok(LlmResponse::stream(stream))
        }
    }
}

fn uuid_like() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(1);
    format!("{:08x}", N.fetch_add(1, Ordering::Relaxed))
}
