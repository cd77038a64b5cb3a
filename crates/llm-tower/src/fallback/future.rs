//! The response future of [`Fallback`](super::Fallback): a state machine over the targets.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use llm_tower_core::{
    Attempt, AttemptError, BoxLlmService, ChatRequest, LlmError, LlmResponse, PaidAttempt,
    ResponseBody,
};
use tokio::time::{Instant, Sleep};
use tower_service::Service;

use super::breaker::{Admit, Breakers, later};
use super::committed::Committed;
use super::{Config, FallbackTarget};

// ===== impl ResponseFuture =====

enum State {
    /// Pick the next target (or give up).
    Next,
    /// Waiting for the target's readiness.
    Ready(BoxLlmService),
    /// Waiting for the target's response.
    Calling(<BoxLlmService as Service<ChatRequest>>::Future),
    /// A stream came back (in `pending`): waiting for its first chunk (the commit point).
    FirstChunk,
    Done,
}

#[derive(Clone, Copy)]
enum Limit {
    Total(Duration),
    FirstChunk(Duration),
    Deadline,
}

/// The response future of [`Fallback`](super::Fallback): a state machine over the targets (tower's retry
/// future shape): next → ready → calling → first chunk → done.
pub struct ResponseFuture {
    targets: Arc<[FallbackTarget]>,
    config: Config,
    breakers: Arc<Breakers>,
    req: Option<ChatRequest>,
    deadline: Option<Instant>,
    is_stream: bool,
    idx: usize,
    /// The probe id when this attempt probes its target.
    probe: Option<u64>,
    /// The model sent on the current attempt.
    cur_model: Option<String>,
    /// The current attempt ended because the request's deadline passed.
    deadline_hit: bool,
    attempts: Vec<Attempt>,
    errors: Vec<LlmError>,
    /// The streamed response waiting for its first chunk (boxed: inline, it would make
    /// every fallback future ~830 bytes bigger, copied on each move, streams or not).
    pending: Option<Box<LlmResponse>>,
    // Boxed once and reset for each attempt.
    timer: Option<Pin<Box<Sleep>>>,
    armed: Option<Limit>,
    state: State,
}

impl fmt::Debug for ResponseFuture {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = match &self.state {
            State::Next => "next",
            State::Ready(_) => "ready",
            State::Calling(_) => "calling",
            State::FirstChunk => "first_chunk",
            State::Done => "done",
        };
        f.debug_struct("ResponseFuture")
            .field("target", &self.targets.get(self.idx).map(|t| &t.name))
            .field("state", &state)
            .field("attempts", &self.attempts)
            .finish_non_exhaustive()
    }
}

impl Drop for ResponseFuture {
    fn drop(&mut self) {
        // A probe dropped mid-flight must not leave its target "probing" for ever.
        if self.probe.is_some() {
            self.breakers.release_probe(self.idx, self.probe);
        }
    }
}

impl ResponseFuture {
    pub(super) fn new(
        targets: Arc<[FallbackTarget]>,
        config: Config,
        breakers: Arc<Breakers>,
        req: ChatRequest,
    ) -> Self {
        let deadline = req.deadline().map(|d| d.0);
        let is_stream = req.is_stream();
        Self {
            targets,
            config,
            breakers,
            req: Some(req),
            deadline,
            is_stream,
            idx: 0,
            probe: None,
            cur_model: None,
            deadline_hit: false,
            attempts: Vec::new(),
            errors: Vec::new(),
            pending: None,
            timer: None,
            armed: None,
            state: State::Next,
        }
    }

    fn target(&self) -> &FallbackTarget {
        &self.targets[self.idx]
    }

    fn attempt_model(&mut self) -> Option<String> {
        if let Some(m) = self.cur_model.take() {
            return Some(m);
        }
        let t = self.target();
        t.model
            .clone()
            .or_else(|| self.req.as_ref().map(|r| r.model.clone()))
    }

    /// Records a target skipped without a call and moves on.
    fn skip(&mut self, error: LlmError) {
        let error = error.with_provider(self.target().name.to_string());
        let model = self.attempt_model();
        self.attempts.push(Attempt {
            target: self.target().name.clone(),
            model,
            error: Some(AttemptError {
                kind: error.kind(),
                message: error.message().to_owned(),
                skipped: true,
            }),
        });
        self.errors.push(error);
        self.idx += 1;
        self.state = State::Next;
    }

    /// Usage the failed attempts reported: they were paid for.
    fn paid(&self) -> Vec<PaidAttempt> {
        self.errors
            .iter()
            .flat_map(|e| e.paid_attempts().iter().cloned())
            .collect()
    }

    /// An attempt failed: move on (`None`) or give this error to the caller now.
    fn fail(&mut self, error: LlmError) -> Option<LlmError> {
        self.armed = None;
        let name = self.target().name.clone();
        let mut error = if error.provider().is_none() {
            error.with_provider(name.to_string())
        } else {
            error
        };
        // A streamed attempt that failed before its commit point may have reported its
        // usage: it was paid for.
        if let Some(pending) = self.pending.take()
            && let ResponseBody::Stream(s) = &pending.body
            && let Some(u) = s.usage()
            && error.usage().is_none()
        {
            error = error.with_usage(pending.meta.model.clone(), u.clone());
        }
        // Usage without a model is the attempt's: price it with the model this target served.
        if let Some(u) = error.usage()
            && error
                .paid_attempts()
                .last()
                .is_some_and(|a| a.model.is_none())
        {
            let (u, model) = (
                u.clone(),
                self.cur_model
                    .clone()
                    .or_else(|| self.target().model.clone()),
            );
            error = error.with_usage(model, u);
        }
        let probe = self.probe.take();
        if !error.should_fall_back() {
            // The target answered; the request itself is at fault.
            self.breakers.success(self.idx, probe, &self.config);
            self.state = State::Done;
            return Some(error.with_paid_attempts(self.paid()));
        }
        if std::mem::take(&mut self.deadline_hit) {
            // The caller's deadline, not the target, ran out: no mark against it.
            self.breakers.release_probe(self.idx, probe);
        } else {
            self.breakers
                .failure(self.idx, probe, error.retry_after(), &self.config);
        }
        tracing::debug!(target: "llm_tower::fallback", target_name = %name, error = %error, "attempt failed, falling back");
        let model = self.attempt_model();
        self.attempts.push(Attempt {
            target: name,
            model,
            error: Some(AttemptError {
                kind: error.kind(),
                message: error.message().to_owned(),
                skipped: false,
            }),
        });
        self.errors.push(error);
        self.idx += 1;
        self.state = State::Next;
        None
    }

    fn succeed(&mut self, mut resp: LlmResponse) -> LlmResponse {
        self.armed = None;
        let probe = self.probe.take();
        self.breakers.success(self.idx, probe, &self.config);
        let name = self.target().name.clone();
        let model = self.attempt_model();
        if resp.meta.model.is_none() {
            resp.meta.model.clone_from(&model);
        }
        self.attempts.push(Attempt {
            target: name.clone(),
            model,
            error: None,
        });
        let inner = std::mem::take(&mut resp.meta.attempts);
        resp.meta.attempts = std::mem::take(&mut self.attempts);
        resp.meta.attempts.extend(inner);
        if !self.errors.is_empty() {
            let mut paid = self.paid();
            if !paid.is_empty() {
                paid.append(&mut resp.meta.paid_attempts);
                resp.meta.paid_attempts = paid;
            }
        }
        resp.meta.provider.get_or_insert(name);
        self.state = State::Done;
        resp
    }

    fn arm(&mut self, now: Instant) {
        let mut best: Option<(Instant, Limit)> = None;
        let mut consider = |at: Instant, why: Limit| {
            if best.is_none_or(|(b, _)| at < b) {
                best = Some((at, why));
            }
        };
        if let Some(t) = self.config.total {
            consider(later(now, t), Limit::Total(t));
        }
        if self.is_stream
            && let Some(t) = self.config.first_chunk
        {
            consider(later(now, t), Limit::FirstChunk(t));
        }
        if let Some(d) = self.deadline {
            consider(d, Limit::Deadline);
        }
        self.armed = best.map(|(_, why)| why);
        if let Some((at, _)) = best {
            match &mut self.timer {
                Some(t) => t.as_mut().reset(at),
                None => self.timer = Some(Box::pin(tokio::time::sleep_until(at))),
            }
        }
    }

    /// The timeout arm of every waiting state: `Ready` with a timeout error once the armed
    /// limit has passed, else `Pending` (the timer's waker is registered).
    fn poll_timeout(&mut self, cx: &mut Context<'_>) -> Poll<LlmError> {
        let (Some(why), Some(timer)) = (self.armed, self.timer.as_mut()) else {
            return Poll::Pending;
        };
        ready!(timer.as_mut().poll(cx));
        let name = &self.targets[self.idx].name;
        self.deadline_hit = matches!(why, Limit::Deadline);
        Poll::Ready(LlmError::timeout(match why {
            Limit::Total(d) => format!("{name} did not answer within {d:?}"),
            Limit::FirstChunk(d) => format!("{name} sent no first chunk within {d:?}"),
            Limit::Deadline => format!("the request's deadline passed while waiting for {name}"),
        }))
    }
}

impl Future for ResponseFuture {
    type Output = Result<LlmResponse, LlmError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        // Every field is Unpin (the timer and the inner futures are boxed).
        let this = self.get_mut();
        loop {
            // Each state either returns, moves on (`continue`), or yields the attempt's error.
            let error = match &mut this.state {
                State::Next => {
                    if this.idx >= this.targets.len() {
                        this.state = State::Done;
                        let errors = std::mem::take(&mut this.errors);
                        return Poll::Ready(Err(LlmError::all_failed(errors)));
                    }
                    let now = Instant::now();
                    if this.deadline.is_some_and(|d| d <= now) {
                        this.skip(LlmError::timeout("the request's deadline has passed"));
                        continue;
                    }
                    match this.breakers.admit(this.idx, now, &this.config) {
                        Admit::Skip(remaining) if remaining.is_zero() => {
                            this.skip(LlmError::unavailable(
                                "skipped: another request is probing it after recent failures",
                            ));
                            continue;
                        }
                        Admit::Skip(remaining) => {
                            this.skip(
                                LlmError::unavailable(format!(
                                    "skipped: cooling down for {remaining:?} after recent failures"
                                ))
                                .with_retry_after(remaining),
                            );
                            continue;
                        }
                        Admit::Probe(id) => this.probe = Some(id),
                        Admit::Yes => this.probe = None,
                    }
                    this.arm(now);
                    this.state = State::Ready(this.targets[this.idx].service.clone());
                    continue;
                }
                State::Ready(svc) => match svc.poll_ready(cx) {
                    Poll::Ready(Ok(())) => {
                        let Some(req) = next_request(&mut this.req, &this.targets, this.idx) else {
                            this.state = State::Done;
                            return Poll::Ready(Err(LlmError::internal(
                                "fallback future polled after completion",
                            )));
                        };
                        this.cur_model = Some(req.model.clone());
                        let fut = svc.call(req);
                        this.state = State::Calling(fut);
                        continue;
                    }
                    Poll::Ready(Err(e)) => e,
                    Poll::Pending => ready!(this.poll_timeout(cx)),
                },
                State::Calling(fut) => match fut.as_mut().poll(cx) {
                    Poll::Ready(Ok(resp)) => {
                        if resp.is_stream() {
                            this.pending = Some(Box::new(resp));
                            this.state = State::FirstChunk;
                            continue;
                        }
                        return Poll::Ready(Ok(this.succeed(resp)));
                    }
                    Poll::Ready(Err(e)) => e,
                    Poll::Pending => ready!(this.poll_timeout(cx)),
                },
                State::FirstChunk => {
                    let slot = &mut this.pending;
                    let Some(ResponseBody::Stream(stream)) = slot.as_mut().map(|r| &mut r.body)
                    else {
                        this.state = State::Done;
                        return Poll::Ready(Err(LlmError::internal(
                            "fallback future polled after completion",
                        )));
                    };
                    match stream.poll_next_event(cx) {
                        Poll::Ready(Some(Ok(chunk))) => {
                            let Some(mut resp) = slot.take() else {
                                continue;
                            };
                            if let ResponseBody::Stream(s) = &mut resp.body {
                                let committed = Committed::new(
                                    chunk,
                                    this.config,
                                    this.targets[this.idx].name.clone(),
                                );
                                s.wrap_events(move |inner| committed.with_inner(inner));
                            }
                            return Poll::Ready(Ok(this.succeed(*resp)));
                        }
                        Poll::Ready(Some(Err(e))) => e,
                        Poll::Ready(None) => {
                            LlmError::transport("the stream ended before its first chunk")
                        }
                        Poll::Pending => ready!(this.poll_timeout(cx)),
                    }
                }
                State::Done => {
                    return Poll::Ready(Err(LlmError::internal(
                        "fallback future polled after completion",
                    )));
                }
            };
            // The failure arm of every state: move on to the next target, or hand the error
            // to the caller now.
            if let Some(e) = this.fail(error) {
                return Poll::Ready(Err(e));
            }
        }
    }
}

/// The request for attempt `idx`: the original for the last target, else a copy.
fn next_request(
    req: &mut Option<ChatRequest>,
    targets: &[FallbackTarget],
    idx: usize,
) -> Option<ChatRequest> {
    let mut r = if idx + 1 >= targets.len() {
        req.take()?
    } else {
        req.clone()?
    };
    if let Some(m) = &targets[idx].model {
        r.model.clone_from(m);
    }
    Some(r)
}
