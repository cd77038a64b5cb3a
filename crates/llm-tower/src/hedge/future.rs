//! The response future of [`Hedge`](super::Hedge): a measured call, or a race of two.

use llm_tower_core::LlmService;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures_core::Stream;
use llm_tower_core::{
    BoxChunkStream, ChatChunk, ChatRequest, LlmError, LlmResponse, PaidAttempt, ResponseBody, Usage,
};
use pin_project_lite::pin_project;
use tokio::time::{Instant, Sleep};
use tower_service::Service;

use super::layer::Shared;

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

/// Which attempt served a hedged request: in the response's
/// [`ResponseMeta::extensions`](crate::ResponseMeta).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hedged {
    /// Whether the second attempt answered first (the first was cancelled); `false`: the
    /// first answered first and the second was cancelled.
    pub second_won: bool,
}

pin_project! {
    /// Response future of [`Hedge`](super::Hedge).
    ///
    /// A request that is not hedged (too few latency samples yet) polls the inner future
    /// directly and records its latency; a hedged one runs as one boxed race.
    pub struct ResponseFuture<F> {
        #[pin]
        kind: Kind<F>,
    }
}

pin_project! {
    #[project = KindProj]
    enum Kind<F> {
        Measured { #[pin] future: F, shared: Arc<Shared>, start: Instant },
        Race { future: BoxFuture<Result<LlmResponse, LlmError>> },
    }
}

impl<F> fmt::Debug for ResponseFuture<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match &self.kind {
            Kind::Measured { .. } => "measured",
            Kind::Race { .. } => "race",
        };
        f.debug_struct("ResponseFuture")
            .field("kind", &kind)
            .finish()
    }
}

impl<F> ResponseFuture<F> {
    pub(super) fn measured(future: F, shared: Arc<Shared>) -> Self {
        Self {
            kind: Kind::Measured {
                future,
                shared,
                start: Instant::now(),
            },
        }
    }

    pub(super) fn race<S>(race: Race<S>) -> Self
    where
        S: LlmService + Send + 'static,
        S::Future: Send + 'static,
    {
        Self {
            kind: Kind::Race {
                future: Box::pin(race),
            },
        }
    }
}

impl<F> Future for ResponseFuture<F>
where
    F: Future<Output = Result<LlmResponse, LlmError>>,
{
    type Output = Result<LlmResponse, LlmError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().kind.project() {
            KindProj::Measured {
                future,
                shared,
                start,
            } => {
                let mut resp = match future.poll(cx) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                    Poll::Ready(Ok(r)) => r,
                };
                match &mut resp.body {
                    ResponseBody::Stream(s) => {
                        let (shared, start) = (shared.clone(), *start);
                        s.wrap(move |inner| Measure {
                            inner,
                            at: Some((shared, start)),
                        });
                    }
                    _ => shared.record(start.elapsed()),
                }
                Poll::Ready(Ok(resp))
            }
            KindProj::Race { future } => future.as_mut().poll(cx),
        }
    }
}

/// Records a stream's time to first chunk.
struct Measure {
    inner: BoxChunkStream,
    at: Option<(Arc<Shared>, Instant)>,
}

impl Stream for Measure {
    type Item = Result<ChatChunk, LlmError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let item = std::task::ready!(self.inner.as_mut().poll_next(cx));
        if let Some((shared, start)) = self.at.take()
            && matches!(item, Some(Ok(_)))
        {
            shared.record(start.elapsed());
        }
        Poll::Ready(item)
    }
}

/// A stream whose first chunk was read to decide the race, replayed first.
struct Replay {
    first: Option<ChatChunk>,
    inner: BoxChunkStream,
}

impl Stream for Replay {
    type Item = Result<ChatChunk, LlmError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if let Some(c) = self.first.take() {
            return Poll::Ready(Some(Ok(c)));
        }
        self.inner.as_mut().poll_next(cx)
    }
}

// ===== the race =====

/// One attempt.
enum Leg<S: Service<ChatRequest>> {
    /// Waiting for the (cloned) service to be ready (boxed: a request is large).
    Ready(S, Option<Box<ChatRequest>>),
    Calling(Pin<Box<S::Future>>),
    /// A stream whose first chunk has not arrived.
    First(Box<LlmResponse>),
    Failed,
}

enum Step {
    Pending,
    // Boxed: a response is large and most polls are `Pending`.
    Won(Box<LlmResponse>),
    Failed(LlmError),
}

impl<S> Leg<S>
where
    S: LlmService,
{
    fn poll(&mut self, cx: &mut Context<'_>) -> Step {
        loop {
            match self {
                Leg::Ready(svc, req) => match svc.poll_ready(cx) {
                    Poll::Pending => return Step::Pending,
                    Poll::Ready(Err(e)) => return self.fail(e),
                    Poll::Ready(Ok(())) => {
                        let Some(req) = req.take() else {
                            return self.fail(LlmError::internal("hedge leg called twice"));
                        };
                        *self = Leg::Calling(Box::pin(svc.call(*req)));
                    }
                },
                Leg::Calling(fut) => match fut.as_mut().poll(cx) {
                    Poll::Pending => return Step::Pending,
                    Poll::Ready(Err(e)) => return self.fail(e),
                    Poll::Ready(Ok(resp)) if resp.is_stream() => *self = Leg::First(Box::new(resp)),
                    Poll::Ready(Ok(resp)) => {
                        *self = Leg::Failed;
                        return Step::Won(Box::new(resp));
                    }
                },
                Leg::First(resp) => {
                    let ResponseBody::Stream(s) = &mut resp.body else {
                        return self.fail(LlmError::internal("hedge leg lost its stream"));
                    };
                    match Pin::new(s).poll_next(cx) {
                        Poll::Pending => return Step::Pending,
                        Poll::Ready(Some(Ok(chunk))) => {
                            let Leg::First(mut resp) = std::mem::replace(self, Leg::Failed) else {
                                unreachable!("matched above");
                            };
                            if let ResponseBody::Stream(s) = &mut resp.body {
                                s.wrap(move |inner| Replay {
                                    first: Some(chunk),
                                    inner,
                                });
                            }
                            return Step::Won(resp);
                        }
                        Poll::Ready(Some(Err(e))) => return self.fail(e),
                        Poll::Ready(None) => {
                            return self.fail(LlmError::transport(
                                "the stream ended before its first chunk",
                            ));
                        }
                    }
                }
                Leg::Failed => return Step::Pending,
            }
        }
    }

    fn fail(&mut self, e: LlmError) -> Step {
        *self = Leg::Failed;
        Step::Failed(e)
    }

    fn running(&self) -> bool {
        !matches!(self, Leg::Failed)
    }

    /// What the attempt is known to have used (a stream's usage so far).
    fn usage(&self) -> Option<Usage> {
        match self {
            Leg::First(r) => match &r.body {
                ResponseBody::Stream(s) => s.usage().cloned(),
                _ => None,
            },
            _ => None,
        }
    }
}

/// The race of a hedged request: the first attempt, and after the delay (if the budget
/// allows) a second; the first answer wins and the other attempt is dropped.
pub(super) struct Race<S: Service<ChatRequest>> {
    shared: Arc<Shared>,
    first: Leg<S>,
    second: Option<Leg<S>>,
    /// The service and request of the second attempt, until it is sent.
    spare: Option<(S, Box<ChatRequest>)>,
    timer: Pin<Box<Sleep>>,
    start: Instant,
    first_error: Option<LlmError>,
    prompt_tokens: u64,
    model: String,
}

// No field is structurally pinned: the futures and the timer are boxed, and a service is
// only ever used through `&mut`.
impl<S: Service<ChatRequest>> Unpin for Race<S> {}

impl<S> Race<S>
where
    S: LlmService,
{
    pub(super) fn new(
        shared: Arc<Shared>,
        mut ready: S,
        spare: S,
        req: ChatRequest,
        copy: ChatRequest,
        delay: Duration,
    ) -> Self {
        let start = Instant::now();
        let prompt_tokens =
            (req.prompt_text_len() as u64).div_ceil(4) + req.messages.len() as u64 * 4 + 3;
        let model = req.model.clone();
        // The first attempt's service was polled ready by the caller: call it now.
        let first = Leg::Calling(Box::pin(ready.call(req)));
        Self {
            shared,
            first,
            second: None,
            spare: Some((spare, Box::new(copy))),
            // A delay past the clock's range (a huge fixed delay) means: never hedge.
            timer: Box::pin(tokio::time::sleep_until(
                start
                    .checked_add(delay)
                    .or_else(|| start.checked_add(Duration::from_secs(86_400 * 365 * 30)))
                    .unwrap_or(start),
            )),
            start,
            first_error: None,
            prompt_tokens,
            model,
        }
    }

    /// The winner's response, with the loser (dropped: its connection closes) counted as a
    /// paid attempt.
    fn win(&mut self, mut resp: LlmResponse, second_won: bool) -> LlmResponse {
        // The histogram estimates how long a first attempt takes: when the second won, the
        // first took at least this long (a lower bound, above the delay), so the share of
        // samples above the delay stays what it is for first attempts. The second attempt's
        // own latency is not a first attempt's, and would pull the percentile down.
        self.shared.record(self.start.elapsed());
        let hedged = self.second.is_some();
        if hedged {
            let loser = if second_won {
                &self.first
            } else {
                self.second.as_ref().unwrap_or(&Leg::Failed)
            };
            if loser.running() {
                // A cancelled call reported no usage; its prompt was sent and may be
                // billed: count the estimate of it (a stream's usage if it had arrived).
                let usage = loser
                    .usage()
                    .unwrap_or_else(|| Usage::new(self.prompt_tokens, 0));
                resp.meta
                    .paid_attempts
                    .push(PaidAttempt::new(Some(self.model.clone()), usage));
            }
            if second_won {
                self.shared.second_won();
            }
            resp.meta.extensions.insert(Hedged { second_won });
        }
        // Dropping the legs cancels the loser now, not when the caller drops this future.
        self.first = Leg::Failed;
        self.second = None;
        self.spare = None;
        resp
    }
}

impl<S> Future for Race<S>
where
    S: LlmService,
{
    type Output = Result<LlmResponse, LlmError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        // Every field is Unpin (the futures and the timer are boxed).
        let this = self.get_mut();
        loop {
            match this.first.poll(cx) {
                Step::Won(resp) => return Poll::Ready(Ok(this.win(*resp, false))),
                Step::Failed(e) => {
                    if this.second.as_ref().is_some_and(Leg::running) {
                        // The second attempt may still answer.
                        this.first_error = Some(e);
                    } else {
                        // Not hedged (yet): failures are for a fallback chain to handle.
                        this.spare = None;
                        return Poll::Ready(Err(e));
                    }
                }
                Step::Pending => {}
            }
            if this.spare.is_some() && this.timer.as_mut().poll(cx).is_ready() {
                let (svc, copy) = this.spare.take().expect("checked above");
                if this.first.running() && this.shared.withdraw() {
                    this.second = Some(Leg::Ready(svc, Some(copy)));
                }
            }
            let Some(second) = &mut this.second else {
                return Poll::Pending;
            };
            match second.poll(cx) {
                Step::Won(resp) => return Poll::Ready(Ok(this.win(*resp, true))),
                Step::Failed(e) => {
                    if let Some(first) = this.first_error.take() {
                        return Poll::Ready(Err(first));
                    }
                    if !this.first.running() {
                        return Poll::Ready(Err(e));
                    }
                    // The first attempt is still running: it may answer. Loop once more so
                    // that it is polled with this waker.
                    tracing::debug!(target: "llm_tower::hedge", error = %e, "second attempt failed; waiting for the first");
                    continue;
                }
                Step::Pending => {
                    if !this.first.running() && !second.running() {
                        let e = this
                            .first_error
                            .take()
                            .unwrap_or_else(|| LlmError::internal("hedge: both attempts ended"));
                        return Poll::Ready(Err(e));
                    }
                    return Poll::Pending;
                }
            }
        }
    }
}
