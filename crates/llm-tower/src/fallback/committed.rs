//! A stream past its commit point: the stall limit and the explicit error item.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures_core::Stream;
use llm_tower_core::{BoxEventStream, LlmError, StreamEvent};
use tokio::time::{Instant, Sleep};

use super::Config;
use super::breaker::later;

// ===== the committed stream =====

/// The stall limit of a committed stream: the time of the last event, and a timer that
/// fires at the earliest moment the limit could be over.
struct Stall {
    limit: Duration,
    last: Instant,
    timer: Pin<Box<Sleep>>,
}

impl Stall {
    /// Whether `limit` passed since the last event; if not, the timer is re-armed for
    /// the moment it would, and its waker registered.
    fn expired(&mut self, cx: &mut Context<'_>) -> bool {
        loop {
            if self.timer.as_mut().poll(cx).is_pending() {
                return false;
            }
            let due = later(self.last, self.limit);
            if due <= self.timer.deadline() {
                return true;
            }
            self.timer.as_mut().reset(due);
        }
    }
}

/// A stream past its commit point: replays the first chunk, then the upstream's, with the
/// stall limit; any failure ends it with an explicit error item.
pub(super) struct Committed {
    first: Option<StreamEvent>,
    inner: Option<BoxEventStream>,
    stall: Option<Stall>,
    require_finish: bool,
    saw_finish: bool,
    done: bool,
    name: Arc<str>,
}

impl Committed {
    pub(super) fn new(first: StreamEvent, config: Config, name: Arc<str>) -> Self {
        Self {
            first: Some(first),
            inner: None,
            stall: config.stall.map(|limit| {
                let now = Instant::now();
                Stall {
                    limit,
                    last: now,
                    timer: Box::pin(tokio::time::sleep_until(later(now, limit))),
                }
            }),
            require_finish: config.require_finish,
            saw_finish: false,
            done: false,
            name,
        }
    }

    pub(super) fn with_inner(mut self, inner: BoxEventStream) -> Self {
        self.inner = Some(inner);
        self
    }

    fn yielded(&mut self, chunk: &StreamEvent) {
        if chunk.has_finish() {
            self.saw_finish = true;
        }
        if let Some(stall) = &mut self.stall {
            // Only the arrival time: the timer is moved when it fires, not per event.
            stall.last = Instant::now();
        }
    }

    fn end_with(&mut self, error: LlmError) -> Poll<Option<Result<StreamEvent, LlmError>>> {
        self.done = true;
        let error = if error.provider().is_none() {
            error.with_provider(self.name.to_string())
        } else {
            error
        };
        Poll::Ready(Some(Err(error)))
    }
}

impl Stream for Committed {
    type Item = Result<StreamEvent, LlmError>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        if this.done {
            return Poll::Ready(None);
        }
        if let Some(chunk) = this.first.take() {
            this.yielded(&chunk);
            return Poll::Ready(Some(Ok(chunk)));
        }
        let Some(inner) = this.inner.as_mut() else {
            this.done = true;
            return Poll::Ready(None);
        };
        match inner.as_mut().poll_next(cx) {
            Poll::Ready(Some(Ok(chunk))) => {
                this.yielded(&chunk);
                Poll::Ready(Some(Ok(chunk)))
            }
            Poll::Ready(Some(Err(e))) => this.end_with(e),
            Poll::Ready(None) => {
                if this.require_finish && !this.saw_finish {
                    return this.end_with(LlmError::transport(
                        "the upstream stream ended before a finish reason (response incomplete)",
                    ));
                }
                this.done = true;
                Poll::Ready(None)
            }
            Poll::Pending => {
                if let Some(stall) = &mut this.stall
                    && stall.expired(cx)
                {
                    let d = stall.limit;
                    return this.end_with(LlmError::timeout(format!(
                        "the stream stalled: no chunk for {d:?}"
                    )));
                }
                Poll::Pending
            }
        }
    }
}
