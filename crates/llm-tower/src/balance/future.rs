//! The response future of [`Balance`](super::Balance) and the guard that reports a member's
//! outcome and keeps its in-flight count.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures_core::Stream;
use llm_tower_core::{
    BoxChunkStream, BoxLlmService, ChatChunk, ChatRequest, LlmError, LlmResponse, ResponseBody,
};
use pin_project_lite::pin_project;
use tokio::time::Instant;
use tower_service::Service;

use super::layer::Shared;

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

/// One pick of a member: reports its outcome once (a latency sample and the breaker's
/// verdict) and counts it in flight until dropped.
pub(super) struct Guard {
    shared: Arc<Shared>,
    pub(super) idx: usize,
    probe: Option<u64>,
    start: Instant,
    reported: bool,
}

impl fmt::Debug for Guard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Guard")
            .field("member", &self.idx)
            .field("reported", &self.reported)
            .finish_non_exhaustive()
    }
}

impl Guard {
    pub(super) fn new(shared: Arc<Shared>, idx: usize, probe: Option<u64>, start: Instant) -> Self {
        Self {
            shared,
            idx,
            probe,
            start,
            reported: false,
        }
    }

    fn answered(&mut self) {
        if !std::mem::replace(&mut self.reported, true) {
            self.shared
                .answered(self.idx, self.probe, self.start.elapsed());
        }
    }

    fn failed(&mut self, e: &LlmError) {
        if !std::mem::replace(&mut self.reported, true) {
            self.shared
                .failed(self.idx, self.probe, self.start.elapsed(), e);
        }
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        if !self.reported {
            // Dropped without an answer (the caller gave up): no verdict on the member,
            // but a lower bound of its latency.
            self.shared
                .given_up(self.idx, self.probe, self.start.elapsed());
        }
        self.shared.done(self.idx);
    }
}

pin_project! {
    /// Response future of [`Balance`](super::Balance).
    ///
    /// Fails at once when no member can be picked; otherwise drives the picked member's
    /// readiness (on a clone of it) and its call.
    pub struct ResponseFuture {
        #[pin]
        kind: Kind,
    }
}

pin_project! {
    #[project = KindProj]
    enum Kind {
        Failed { error: Option<LlmError> },
        Ready { svc: BoxLlmService, call: Option<Box<Call>> },
        Calling { future: BoxFuture<Result<LlmResponse, LlmError>>, call: Option<Box<Call>> },
    }
}

/// What a call needs besides the service: kept boxed so that the future stays small.
struct Call {
    req: Option<ChatRequest>,
    guard: Guard,
    name: Arc<str>,
    model: Option<String>,
}

impl fmt::Debug for ResponseFuture {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match &self.kind {
            Kind::Failed { .. } => "failed",
            Kind::Ready { .. } => "ready",
            Kind::Calling { .. } => "calling",
        };
        f.debug_struct("ResponseFuture")
            .field("kind", &kind)
            .finish()
    }
}

impl ResponseFuture {
    pub(super) fn failed(error: LlmError) -> Self {
        Self {
            kind: Kind::Failed { error: Some(error) },
        }
    }

    pub(super) fn new(
        svc: BoxLlmService,
        req: ChatRequest,
        guard: Guard,
        name: Arc<str>,
        model: Option<String>,
    ) -> Self {
        Self {
            kind: Kind::Ready {
                svc,
                call: Some(Box::new(Call {
                    req: Some(req),
                    guard,
                    name,
                    model,
                })),
            },
        }
    }
}

fn polled_after_completion() -> LlmError {
    LlmError::internal("balance future polled after completion")
}

impl Future for ResponseFuture {
    type Output = Result<LlmResponse, LlmError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        loop {
            let next = match self.as_mut().project().kind.project() {
                KindProj::Failed { error } => {
                    return Poll::Ready(Err(error.take().unwrap_or_else(polled_after_completion)));
                }
                KindProj::Ready { svc, call } => match svc.poll_ready(cx) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(Err(e)) => {
                        let Some(mut c) = call.take() else {
                            return Poll::Ready(Err(polled_after_completion()));
                        };
                        c.guard.failed(&e);
                        return Poll::Ready(Err(with_provider(e, &c.name)));
                    }
                    Poll::Ready(Ok(())) => {
                        let Some(mut c) = call.take() else {
                            return Poll::Ready(Err(polled_after_completion()));
                        };
                        let Some(req) = c.req.take() else {
                            return Poll::Ready(Err(polled_after_completion()));
                        };
                        Kind::Calling {
                            future: svc.call(req),
                            call: Some(c),
                        }
                    }
                },
                KindProj::Calling { future, call } => {
                    let result = match future.as_mut().poll(cx) {
                        Poll::Pending => return Poll::Pending,
                        Poll::Ready(r) => r,
                    };
                    let Some(c) = call.take() else {
                        return Poll::Ready(Err(polled_after_completion()));
                    };
                    return Poll::Ready(finish(*c, result));
                }
            };
            self.as_mut().project().kind.set(next);
        }
    }
}

fn with_provider(e: LlmError, name: &str) -> LlmError {
    if e.provider().is_none() {
        e.with_provider(name)
    } else {
        e
    }
}

/// Reports the member's outcome and labels the response. A stream is measured to its first
/// chunk: the guard moves into it.
fn finish(c: Call, result: Result<LlmResponse, LlmError>) -> Result<LlmResponse, LlmError> {
    let Call {
        mut guard,
        name,
        model,
        ..
    } = c;
    match result {
        Err(e) => {
            guard.failed(&e);
            Err(with_provider(e, &name))
        }
        Ok(mut resp) => {
            if let Some(h) = &resp.meta.headroom {
                guard.shared.observe_headroom(guard.idx, h);
            }
            if resp.meta.model.is_none() {
                resp.meta.model = model;
            }
            resp.meta.provider.get_or_insert(name);
            match &mut resp.body {
                ResponseBody::Stream(s) => {
                    s.wrap(move |inner| FirstChunk {
                        inner,
                        guard: Some(guard),
                    });
                }
                _ => guard.answered(),
            }
            Ok(resp)
        }
    }
}

/// A member's stream: its first item reports the member's outcome (time to first chunk);
/// its end or drop ends the member's in-flight count.
struct FirstChunk {
    inner: BoxChunkStream,
    guard: Option<Guard>,
}

impl Stream for FirstChunk {
    type Item = Result<ChatChunk, LlmError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let item = match self.inner.as_mut().poll_next(cx) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(item) => item,
        };
        match &item {
            Some(Ok(_)) => {
                if let Some(g) = &mut self.guard {
                    g.answered();
                }
            }
            Some(Err(e)) => {
                if let Some(mut g) = self.guard.take() {
                    g.failed(e);
                }
            }
            None => {
                if let Some(mut g) = self.guard.take() {
                    g.failed(&LlmError::transport(
                        "the stream ended before its first chunk",
                    ));
                }
            }
        }
        Poll::Ready(item)
    }
}
