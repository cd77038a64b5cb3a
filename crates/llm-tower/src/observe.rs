//! Observing upstream attempts: [`ObserveLayer`] reports each call to the service it wraps
//! (a provider) to the request's [`Observer`], so a tracer sees one attempt per upstream
//! call, a fallback as two.
//!
//! # Rules
//!
//! - Without an [`Observer`] in the request's extensions the layer only forwards: no
//!   allocation, no wrapping.
//! - The attempt starts when the request is handed to the inner service (the observer may
//!   add a [`TraceParent`](crate::TraceParent) for the provider to send) and ends when the
//!   answer is complete: at once for a complete response, when a stream ends, fails or is
//!   dropped for a stream, with the model, usage and finish reasons the upstream reported.
//! - With this feature on, the cache, validate and rate-limit layers also report their
//!   events ([`ObserveEvent`](crate::ObserveEvent)) to the request's observer.
//!
//! Put it right over each provider, below any per-provider rate limit (a provider skipped
//! for its limit was not called, so it is no attempt).
//!
//! # Example
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), llm_tower::LlmError> {
//! use llm_tower::observe::ObserveLayer;
//! use llm_tower::{
//!     AttemptEnd, AttemptObserver, ChatRequest, Message, ObserveEvent, Observer, RequestObserver,
//! };
//! use llm_tower_test::MockLlm;
//! use std::sync::{Arc, Mutex};
//! use tower::{ServiceBuilder, ServiceExt};
//!
//! #[derive(Default)]
//! struct Seen(Arc<Mutex<Vec<String>>>);
//! struct Attempt(Arc<Mutex<Vec<String>>>);
//! impl AttemptObserver for Attempt {
//!     fn finish(self: Box<Self>, end: AttemptEnd<'_>) {
//!         if let AttemptEnd::Answered { model, .. } = end {
//!             self.0.lock().unwrap().push(format!("answered by {}", model.unwrap_or("?")));
//!         }
//!     }
//! }
//! impl RequestObserver for Seen {
//!     fn event(&self, _: ObserveEvent<'_>) {}
//!     fn attempt(&self, provider: &str, _: &mut ChatRequest) -> Box<dyn AttemptObserver> {
//!         self.0.lock().unwrap().push(format!("attempt {provider}"));
//!         Box::new(Attempt(self.0.clone()))
//!     }
//! }
//!
//! let seen = Seen::default();
//! let log = seen.0.clone();
//! let llm = ServiceBuilder::new().layer(ObserveLayer::new("openai")).service(MockLlm::new("openai"));
//! let mut req = ChatRequest::new("gpt-4o-mini", vec![Message::user("hi")]);
//! req.extensions.insert(Observer::new(Arc::new(seen)));
//! llm.oneshot(req).await?;
//! assert_eq!(*log.lock().unwrap(), ["attempt openai", "answered by gpt-4o-mini"]);
//! # Ok(()) }
//! ```

use llm_tower_core::LlmService;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures_core::Stream;
use llm_tower_core::{
    AttemptEnd, AttemptObserver, BoxChunkStream, ChatChunk, ChatRequest, LlmError, LlmResponse,
    Observer, ResponseBody,
};
use pin_project_lite::pin_project;
use tower_layer::Layer;
use tower_service::Service;

/// Reports every call to the wrapped service as an upstream attempt of `provider` (see
/// the [module docs](self)).
#[derive(Debug, Clone)]
pub struct ObserveLayer {
    provider: Arc<str>,
}

impl ObserveLayer {
    /// Attempts are reported as made to `provider` (the name the config gives it).
    pub fn new(provider: impl Into<Arc<str>>) -> Self {
        Self {
            provider: provider.into(),
        }
    }
}

impl<S> Layer<S> for ObserveLayer {
    type Service = Observe<S>;

    fn layer(&self, inner: S) -> Observe<S> {
        Observe {
            inner,
            provider: self.provider.clone(),
        }
    }
}

/// The service of [`ObserveLayer`].
#[derive(Debug, Clone)]
pub struct Observe<S> {
    inner: S,
    provider: Arc<str>,
}

impl<S> Observe<S> {
    /// Wraps `inner`, reporting its calls as attempts of `provider`.
    pub fn new(inner: S, provider: impl Into<Arc<str>>) -> Self {
        Self {
            inner,
            provider: provider.into(),
        }
    }
    inner_service_accessors!();
}

impl<S> Service<ChatRequest> for Observe<S>
where
    S: LlmService,
{
    type Response = LlmResponse;
    type Error = LlmError;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), LlmError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: ChatRequest) -> Self::Future {
        let attempt = match req.extensions.get::<Observer>() {
            Some(o) => {
                let o = o.clone();
                Some(o.attempt(&self.provider, &mut req))
            }
            None => None,
        };
        ResponseFuture {
            inner: self.inner.call(req),
            attempt,
        }
    }
}

pin_project! {
    /// The response future of [`Observe`].
    pub struct ResponseFuture<F> {
        #[pin]
        inner: F,
        attempt: Option<Box<dyn AttemptObserver>>,
    }
}

impl<F> fmt::Debug for ResponseFuture<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture")
            .field("observed", &self.attempt.is_some())
            .finish_non_exhaustive()
    }
}

impl<F> Future for ResponseFuture<F>
where
    F: Future<Output = Result<LlmResponse, LlmError>>,
{
    type Output = Result<LlmResponse, LlmError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let result = std::task::ready!(this.inner.poll(cx));
        let Some(attempt) = this.attempt.take() else {
            return Poll::Ready(result);
        };
        match result {
            Ok(mut resp) => {
                report(attempt, &mut resp);
                Poll::Ready(Ok(resp))
            }
            Err(error) => {
                attempt.finish(AttemptEnd::Failed {
                    error: &error,
                    usage: error.usage(),
                });
                Poll::Ready(Err(error))
            }
        }
    }
}

/// Ends the attempt now (complete answers) or hands it to the stream.
fn report(attempt: Box<dyn AttemptObserver>, resp: &mut LlmResponse) {
    let meta_model = resp.meta.model.clone();
    match &mut resp.body {
        ResponseBody::Complete(r) => {
            let reasons: Vec<String> = r
                .choices
                .iter()
                .filter_map(|c| c.finish_reason.clone())
                .collect();
            attempt.finish(AttemptEnd::Answered {
                model: meta_model.as_deref().or(Some(r.model.as_str())),
                usage: r.usage.as_ref().or(resp.meta.usage.as_ref()),
                finish_reasons: &reasons,
            });
        }
        ResponseBody::Encoded(r) => {
            let reasons = encoded_finish_reasons(r.json());
            attempt.finish(AttemptEnd::Answered {
                model: meta_model.as_deref().or(Some(r.model())),
                usage: r.usage().or(resp.meta.usage.as_ref()),
                finish_reasons: &reasons,
            });
        }
        ResponseBody::Embeddings(r) => attempt.finish(AttemptEnd::Answered {
            model: meta_model.as_deref().or(Some(r.model.as_str())),
            usage: Some(&r.usage),
            finish_reasons: &[],
        }),
        ResponseBody::Stream(s) => s.wrap(move |inner| ObservedStream {
            inner,
            attempt: Some(attempt),
            first: false,
            model: meta_model,
            usage: None,
            reasons: Vec::new(),
        }),
    }
}

/// The finish reasons of an upstream's JSON answer (only read while tracing).
fn encoded_finish_reasons(json: &[u8]) -> Vec<String> {
    #[derive(serde::Deserialize)]
    struct Choice {
        #[serde(default)]
        finish_reason: Option<String>,
    }
    #[derive(serde::Deserialize)]
    struct Body {
        #[serde(default)]
        choices: Vec<Choice>,
    }
    serde_json::from_slice::<Body>(json).map_or_else(
        |_| Vec::new(),
        |b| {
            b.choices
                .into_iter()
                .filter_map(|c| c.finish_reason)
                .collect()
        },
    )
}

/// At most this many finish reasons are kept per attempt (one per choice; `n` is the
/// client's choice).
const MAX_REASONS: usize = 16;

/// A stream that reports its first chunk and its end to the attempt's observer.
struct ObservedStream {
    inner: BoxChunkStream,
    attempt: Option<Box<dyn AttemptObserver>>,
    first: bool,
    model: Option<String>,
    usage: Option<llm_tower_core::Usage>,
    reasons: Vec<String>,
}

impl ObservedStream {
    fn seen(&mut self, chunk: &ChatChunk) {
        if !self.first {
            self.first = true;
            if let Some(a) = self.attempt.as_mut() {
                a.first_chunk();
            }
        }
        if self.model.is_none() && !chunk.model.is_empty() {
            self.model = Some(chunk.model.clone());
        }
        if let Some(u) = chunk.usage() {
            self.usage = Some(u.clone());
        }
        for c in &chunk.choices {
            if let Some(r) = c.finish_reason()
                && self.reasons.len() < MAX_REASONS
            {
                self.reasons.push(r.to_owned());
            }
        }
    }
}

impl Stream for ObservedStream {
    type Item = Result<ChatChunk, LlmError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let item = std::task::ready!(self.inner.as_mut().poll_next(cx));
        match &item {
            Some(Ok(chunk)) => self.seen(chunk),
            Some(Err(error)) => {
                if let Some(a) = self.attempt.take() {
                    let usage = self.usage.as_ref().or_else(|| error.usage());
                    a.finish(AttemptEnd::Failed { error, usage });
                }
            }
            None => {
                if let Some(a) = self.attempt.take() {
                    a.finish(AttemptEnd::Answered {
                        model: self.model.as_deref(),
                        usage: self.usage.as_ref(),
                        finish_reasons: &self.reasons,
                    });
                }
            }
        }
        Poll::Ready(item)
    }
}

impl Drop for ObservedStream {
    fn drop(&mut self) {
        if let Some(a) = self.attempt.take() {
            a.finish(AttemptEnd::Dropped);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::StreamExt;
    use llm_tower_core::{Message, ObserveEvent, RequestObserver, Usage};
    use llm_tower_test::{MockLlm, Step};
    use std::sync::Mutex;
    use tower::ServiceExt;

    #[derive(Default, Clone)]
    struct Log(Arc<Mutex<Vec<String>>>);

    struct A(Log);
    impl AttemptObserver for A {
        fn first_chunk(&mut self) {
            self.0.push("first".into());
        }
        fn finish(self: Box<Self>, end: AttemptEnd<'_>) {
            let s = match end {
                AttemptEnd::Answered {
                    model,
                    usage,
                    finish_reasons,
                } => format!(
                    "answered {} {:?} {finish_reasons:?}",
                    model.unwrap_or("-"),
                    usage.map(|u| u.total_tokens)
                ),
                AttemptEnd::Failed { error, .. } => format!("failed {}", error.kind().as_str()),
                AttemptEnd::Dropped => "dropped".into(),
                _ => "other".into(),
            };
            self.0.push(s);
        }
    }
    impl Log {
        fn push(&self, s: String) {
            self.0.lock().unwrap().push(s);
        }
        fn take(&self) -> Vec<String> {
            std::mem::take(&mut *self.0.lock().unwrap())
        }
    }
    impl RequestObserver for Log {
        fn event(&self, e: ObserveEvent<'_>) {
            self.push(format!("{e:?}"));
        }
        fn attempt(&self, provider: &str, req: &mut ChatRequest) -> Box<dyn AttemptObserver> {
            req.extensions.insert(llm_tower_core::TraceParent::new(
                http::HeaderValue::from_static(
                    "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
                ),
            ));
            self.push(format!("attempt {provider}"));
            Box::new(A(self.clone()))
        }
    }

    fn request(log: &Log, stream: bool) -> ChatRequest {
        let mut req = ChatRequest::new("m", vec![Message::user("hi")]);
        req.stream = Some(stream);
        req.extensions.insert(Observer::new(Arc::new(log.clone())));
        req
    }

    #[tokio::test(start_paused = true)]
    async fn complete_answer_ends_the_attempt_with_usage_and_reasons() {
        let log = Log::default();
        let svc = ObserveLayer::new("p").layer(MockLlm::new("p"));
        let resp = svc.oneshot(request(&log, false)).await.unwrap();
        assert!(!resp.is_stream());
        let seen = log.take();
        assert_eq!(seen[0], "attempt p");
        assert!(seen[1].starts_with("answered m Some("), "{seen:?}");
        assert!(seen[1].ends_with("[\"stop\"]"), "{seen:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn error_fails_the_attempt() {
        let log = Log::default();
        let mock = MockLlm::new("p").then(Step::error(LlmError::unavailable("503")));
        let svc = ObserveLayer::new("p").layer(mock);
        assert!(svc.oneshot(request(&log, false)).await.is_err());
        assert_eq!(log.take(), ["attempt p", "failed unavailable"]);
    }

    #[tokio::test(start_paused = true)]
    async fn stream_reports_first_chunk_and_end() {
        let log = Log::default();
        let svc = ObserveLayer::new("p").layer(MockLlm::new("p"));
        let resp = svc.oneshot(request(&log, true)).await.unwrap();
        assert_eq!(log.take(), ["attempt p"]);
        let mut s = resp.into_stream();
        while let Some(item) = s.next().await {
            item.unwrap();
        }
        let seen = log.take();
        assert_eq!(seen[0], "first");
        assert!(seen[1].starts_with("answered m"), "{seen:?}");
        assert!(seen[1].contains("stop"), "{seen:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn dropped_stream_reports_dropped() {
        let log = Log::default();
        let svc = ObserveLayer::new("p").layer(MockLlm::new("p"));
        let resp = svc.oneshot(request(&log, true)).await.unwrap();
        drop(resp);
        assert_eq!(log.take(), ["attempt p", "dropped"]);
    }

    #[tokio::test(start_paused = true)]
    async fn no_observer_no_report() {
        let svc = ObserveLayer::new("p").layer(MockLlm::new("p"));
        let req = ChatRequest::new("m", vec![Message::user("hi")]);
        let resp = svc.oneshot(req).await.unwrap();
        assert_eq!(
            resp.meta.usage.map(|u: Usage| u.total_tokens > 0),
            Some(true)
        );
    }

    #[cfg(feature = "cache")]
    #[tokio::test(start_paused = true)]
    async fn cache_hit_is_an_event_and_no_attempt() {
        use crate::cache::CacheLayer;
        let log = Log::default();
        let mock = MockLlm::new("p");
        let svc = CacheLayer::in_memory(1 << 20).layer(ObserveLayer::new("p").layer(mock.clone()));
        let det = |log: &Log| {
            let mut r = request(log, false);
            r.temperature = Some(0.into());
            r
        };
        svc.clone().oneshot(det(&log)).await.unwrap();
        assert_eq!(log.take()[0], "attempt p");
        svc.oneshot(det(&log)).await.unwrap();
        assert_eq!(log.take(), ["CacheHit"]);
        assert_eq!(mock.calls(), 1);
    }

    #[cfg(feature = "validate")]
    #[tokio::test(start_paused = true)]
    async fn validation_retry_is_an_event_between_two_attempts() {
        use crate::validate::{Rule, ValidateLayer};
        let log = Log::default();
        let mock = MockLlm::new("p")
            .then(Step::reply("not json"))
            .then(Step::reply("{\"ok\":true}"));
        let svc = ValidateLayer::new()
            .task("extract", Rule::json())
            .layer(ObserveLayer::new("p").layer(mock));
        let req = request(&log, false).with_task_type("extract");
        svc.oneshot(req).await.unwrap();
        let seen = log.take();
        assert_eq!(seen.len(), 5, "{seen:?}");
        assert_eq!(seen[0], "attempt p");
        assert!(
            seen[2].starts_with("ValidationRetry { attempt: 1"),
            "{seen:?}"
        );
        assert_eq!(seen[3], "attempt p");
    }

    #[cfg(feature = "rate-limit")]
    #[tokio::test(start_paused = true)]
    async fn rate_limit_wait_is_an_event() {
        use crate::rate_limit::{OnLimit, RateLimitLayer, Rule};
        use std::time::Duration;
        let log = Log::default();
        let layer = RateLimitLayer::new()
            .rule(Rule::requests(1, Duration::from_secs(2)))
            .on_limit(OnLimit::Wait {
                max_wait: Duration::from_secs(5),
            });
        let svc = layer.layer(MockLlm::new("p"));
        svc.clone().oneshot(request(&log, false)).await.unwrap();
        assert!(log.take().is_empty());
        svc.oneshot(request(&log, false)).await.unwrap();
        assert_eq!(log.take(), ["RateLimitWait { wait: 2s }"]);
    }

    #[test]
    fn finish_reasons_of_garbage_are_empty() {
        assert!(encoded_finish_reasons(b"not json").is_empty());
        assert_eq!(
            encoded_finish_reasons(br#"{"choices":[{"finish_reason":"length"},{}]}"#),
            ["length"]
        );
    }
}
