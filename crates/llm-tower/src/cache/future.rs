//! The response future of [`Cache`](super::Cache) and the stream tee that stores streams.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use futures_core::Stream;
use llm_tower_core::{
    BoxEventStream, CacheStatus, ChatChunk, ChatRequest, ErrorKind, LlmError, LlmResponse,
    ResponseBody, ResponseMeta, StreamEvent,
};
use pin_project_lite::pin_project;
use tower::ServiceExt;
use tower_service::Service;

use super::flight::{FlightGuard, Join, Landing, Waited, wait};
use super::shared::Shared;
use super::{CacheKey, CachedEntry};

pub(crate) type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

pin_project! {
    /// Response future of [`Cache`](super::Cache).
    ///
    /// A hit the store answers synchronously is returned at once (no inner call; one
    /// allocation, so that this future, which the layers outside hold inline, stays small
    /// on every path); a bypass polls the inner future directly; lookups that need I/O,
    /// coalesced waits and misses that are stored run as one boxed state machine.
    pub struct ResponseFuture<F> {
        #[pin]
        kind: Kind<F>,
    }
}

pin_project! {
    #[project = KindProj]
    enum Kind<F> {
        Ready { response: Option<Box<Result<LlmResponse, LlmError>>> },
        Bypass { #[pin] future: F },
        Slow { future: BoxFuture<Result<LlmResponse, LlmError>> },
    }
}

impl<F> fmt::Debug for ResponseFuture<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match &self.kind {
            Kind::Ready { .. } => "ready",
            Kind::Bypass { .. } => "bypass",
            Kind::Slow { .. } => "slow",
        };
        f.debug_struct("ResponseFuture")
            .field("kind", &kind)
            .finish()
    }
}

impl<F> ResponseFuture<F> {
    pub(crate) fn ready(response: Result<LlmResponse, LlmError>) -> Self {
        Self {
            kind: Kind::Ready {
                response: Some(Box::new(response)),
            },
        }
    }

    pub(crate) fn bypass(future: F) -> Self {
        Self {
            kind: Kind::Bypass { future },
        }
    }

    pub(crate) fn boxed(future: BoxFuture<Result<LlmResponse, LlmError>>) -> Self {
        Self {
            kind: Kind::Slow { future },
        }
    }

    pub(crate) fn slow<S>(slow: Slow<S>) -> Self
    where
        S: Service<ChatRequest, Response = LlmResponse, Error = LlmError> + Clone + Send + 'static,
        S::Future: Send + 'static,
    {
        Self {
            kind: Kind::Slow {
                future: Box::pin(slow.run()),
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
            KindProj::Ready { response } => Poll::Ready(response.take().map_or_else(
                || Err(LlmError::internal("cache future polled after completion")),
                |r| *r,
            )),
            KindProj::Bypass { future } => {
                let mut resp = ready!(future.poll(cx))?;
                resp.meta.cache = CacheStatus::Bypass;
                Poll::Ready(Ok(resp))
            }
            KindProj::Slow { future } => future.as_mut().poll(cx),
        }
    }
}

/// The inner service: the instance polled ready, or a clone whose readiness is driven
/// on demand (after a coalesced wait released the ready one).
enum Svc<S> {
    Ready(S),
    Parked(S),
}

impl<S> Svc<S>
where
    S: Service<ChatRequest, Response = LlmResponse, Error = LlmError> + Clone,
{
    fn park(self) -> Self {
        match self {
            // Dropping the ready instance releases whatever readiness reserved (a
            // concurrency permit, a rate-limit slot) while we wait for someone else.
            Svc::Ready(s) => {
                let spare = s.clone();
                drop(s);
                Svc::Parked(spare)
            }
            parked @ Svc::Parked(_) => parked,
        }
    }

    async fn call(self, req: ChatRequest) -> Result<LlmResponse, LlmError> {
        match self {
            Svc::Ready(mut s) => s.call(req).await,
            Svc::Parked(s) => s.oneshot(req).await,
        }
    }
}

/// Everything a lookup-or-miss needs.
pub(crate) struct Slow<S> {
    pub(crate) shared: Arc<Shared>,
    pub(crate) inner: S,
    pub(crate) req: ChatRequest,
    pub(crate) key: CacheKey,
    pub(crate) ttl: Duration,
    /// Look the key up in the store first (not yet done synchronously).
    pub(crate) lookup: bool,
    /// Read and coalesce (false for `no-cache`: write only).
    pub(crate) participate: bool,
}

impl<S> Slow<S>
where
    S: Service<ChatRequest, Response = LlmResponse, Error = LlmError> + Clone + Send + 'static,
    S::Future: Send + 'static,
{
    async fn run(self) -> Result<LlmResponse, LlmError> {
        let Slow {
            shared,
            inner,
            req,
            key,
            ttl,
            mut lookup,
            participate,
        } = self;
        let stream = req.is_stream();
        let mut svc = Svc::Ready(inner);
        if !participate {
            // `no-cache`: already counted as a bypass; fetch fresh and store.
            return respond(&shared, svc, req, key, ttl, None, CacheStatus::Bypass).await;
        }
        loop {
            if lookup {
                let got = tokio::time::timeout(shared.config.store_timeout, shared.store.get(key));
                match got.await {
                    Ok(Ok(Some(entry))) => {
                        shared.stats.hit();
                        crate::emit(&req, crate::ObserveEvent::CacheHit);
                        return Ok(entry.to_response(stream));
                    }
                    Ok(Ok(None)) => {}
                    Ok(Err(e)) => {
                        shared.stats.error();
                        tracing::debug!(error = %e, "cache lookup failed; serving from upstream");
                    }
                    Err(_) => {
                        shared.stats.error();
                        tracing::debug!("cache lookup timed out; serving from upstream");
                    }
                }
            }
            lookup = true;
            if !shared.config.coalesce {
                shared.stats.miss();
                return respond(&shared, svc, req, key, ttl, None, CacheStatus::Miss).await;
            }
            let rx = match shared.flights.join(key) {
                Join::Leader(guard) => {
                    shared.stats.miss();
                    return respond(&shared, svc, req, key, ttl, Some(guard), CacheStatus::Miss)
                        .await;
                }
                Join::Waiter(rx) => rx,
            };
            svc = svc.park();
            // Never wait past the caller's deadline (see `Deadline`), nor longer than the
            // coalesce timeout: the leader's slow client must not hold its waiters.
            let now = tokio::time::Instant::now();
            let patience = now
                .checked_add(shared.config.coalesce_timeout)
                .unwrap_or_else(|| now + Duration::from_secs(86_400 * 365));
            let deadline = req.deadline().map(|d| d.0);
            let until = deadline.map_or(patience, |d| d.min(patience));
            let waited = match tokio::time::timeout_at(until, wait(rx)).await {
                Ok(waited) => waited,
                Err(_) if deadline.is_some_and(|d| d <= patience) => {
                    shared.stats.miss();
                    return Err(LlmError::timeout(
                        "deadline passed while waiting for an identical in-flight request",
                    ));
                }
                Err(_) => {
                    shared.stats.coalesce_timeout();
                    shared.stats.miss();
                    tracing::debug!(
                        "waited too long for an identical in-flight request; calling upstream"
                    );
                    return respond(&shared, svc, req, key, ttl, None, CacheStatus::Miss).await;
                }
            };
            match waited {
                Waited::Landed(Landing::Entry(entry)) => {
                    shared.stats.hit();
                    shared.stats.coalesce();
                    crate::emit(&req, crate::ObserveEvent::CacheCoalesced);
                    return Ok(entry.to_response(stream));
                }
                Waited::Landed(Landing::Error(e)) => {
                    // Identical request, same upstream, moments ago: the same error.
                    shared.stats.miss();
                    return Err(e);
                }
                Waited::Landed(Landing::Direct) => {
                    shared.stats.miss();
                    return respond(&shared, svc, req, key, ttl, None, CacheStatus::Miss).await;
                }
                // The leader went away: look up again (it may have stored), then join again.
                Waited::Abandoned => {}
            }
        }
    }
}

/// Errors that belong to the leader's own request (its deadline, its caller leaving)
/// rather than to the upstream: waiters retry instead of inheriting them.
fn is_leader_specific(e: &LlmError) -> bool {
    matches!(e.kind(), ErrorKind::Cancelled | ErrorKind::Timeout)
}

/// Calls upstream and stores a complete answer, or tees a stream to store it at its end.
async fn respond<S>(
    shared: &Arc<Shared>,
    svc: Svc<S>,
    req: ChatRequest,
    key: CacheKey,
    ttl: Duration,
    guard: Option<FlightGuard>,
    status: CacheStatus,
) -> Result<LlmResponse, LlmError>
where
    S: Service<ChatRequest, Response = LlmResponse, Error = LlmError> + Clone,
{
    let mut resp = match svc.call(req).await {
        Ok(resp) => resp,
        Err(e) => {
            // Errors are never stored.
            if let Some(guard) = guard
                && !is_leader_specific(&e)
            {
                guard.land(Landing::Error(e.clone()));
            }
            return Err(e);
        }
    };
    resp.meta.cache = status;
    let writer = Writer {
        shared: shared.clone(),
        key,
        ttl,
        guard,
    };
    match &mut resp.body {
        ResponseBody::Complete(r) => {
            let entry = Arc::new(CachedEntry::complete(r.as_ref().clone(), &resp.meta));
            writer.finish(entry).await;
        }
        ResponseBody::Encoded(r) => {
            // A clone of the shared bytes, not of the answer.
            let entry = Arc::new(CachedEntry::encoded(r.clone(), &resp.meta));
            writer.finish(entry).await;
        }
        // Not reached: embeddings take their own path (`embed`).
        ResponseBody::Embeddings(_) => writer.skip(),
        ResponseBody::Stream(s) => {
            let meta = meta_for_entry(&resp.meta);
            let max = shared.config.max_entry_bytes;
            let max_mem = shared.config.max_stream_bytes;
            s.wrap_events(move |inner| Tee {
                inner,
                chunks: Some(Vec::new()),
                bytes: 0,
                max,
                mem: 0,
                max_mem,
                meta,
                writer: Some(writer),
                storing: None,
                done: false,
            });
        }
    }
    Ok(resp)
}

fn meta_for_entry(meta: &ResponseMeta) -> ResponseMeta {
    ResponseMeta {
        provider: meta.provider.clone(),
        model: meta.model.clone(),
        usage: meta.usage.clone(),
        ..ResponseMeta::default()
    }
}

/// Stores an answer and lands the flight.
struct Writer {
    shared: Arc<Shared>,
    key: CacheKey,
    ttl: Duration,
    guard: Option<FlightGuard>,
}

impl Writer {
    /// Stores `entry` if it is complete and small enough, then hands it to the waiters.
    async fn finish(self, entry: Arc<CachedEntry>) {
        let Writer {
            shared,
            key,
            ttl,
            guard,
        } = self;
        if entry.is_complete() && entry.approx_size() <= shared.config.max_entry_bytes {
            let put = shared.store.put(key, entry.clone(), ttl);
            match tokio::time::timeout(shared.config.store_timeout, put).await {
                Ok(Ok(())) => shared.stats.write(),
                Ok(Err(e)) => {
                    shared.stats.error();
                    tracing::debug!(error = %e, "cache write failed");
                }
                Err(_) => {
                    shared.stats.error();
                    tracing::debug!("cache write timed out");
                }
            }
        } else {
            shared.stats.skip_write();
        }
        // Land after the write, so a request arriving in between finds the entry.
        if let Some(guard) = guard {
            guard.land(Landing::Entry(entry));
        }
    }

    /// The stream's answer cannot be stored or shared; waiters call upstream themselves.
    fn skip(self) {
        self.shared.stats.skip_write();
        if let Some(guard) = self.guard {
            guard.land(Landing::Direct);
        }
    }

    fn fail(self, e: &LlmError) {
        if let Some(guard) = self.guard
            && !is_leader_specific(e)
        {
            guard.land(Landing::Error(e.clone()));
        }
    }
}

/// Size of an event in the stored JSON (an encoded one's exactly, a typed one's roughly),
/// to stop copying an oversized stream early.
fn event_size(e: &StreamEvent) -> usize {
    match e {
        StreamEvent::Encoded(c) => c.json().len(),
        // Stored as its chat view carrying its frame: about the frame twice over.
        StreamEvent::Native(e) => 2 * e.frame_len() + 160,
        StreamEvent::Chunk(c) => chunk_size(c),
    }
}

/// Rough size of a chunk in the stored JSON.
fn chunk_size(c: &ChatChunk) -> usize {
    let payload: usize = c
        .choices
        .iter()
        .map(|ch| {
            ch.delta.text().map_or(0, str::len)
                + ch.delta
                    .tool_calls
                    .iter()
                    .flatten()
                    .map(|t| {
                        t.function
                            .as_ref()
                            .map_or(0, |f| f.arguments.as_ref().map_or(0, String::len))
                    })
                    .sum::<usize>()
        })
        .sum();
    payload + 160
}

pin_project! {
    /// Passes chunks through, keeps a copy, and stores them once the upstream stream ends
    /// cleanly. An error item, or the stream being dropped first, stores nothing.
    struct Tee {
        #[pin]
        inner: BoxEventStream,
        chunks: Option<Vec<StreamEvent>>,
        // The copy's JSON estimate, against the entry limit.
        bytes: usize,
        max: usize,
        // The copy's memory, against the stream buffer limit.
        mem: usize,
        max_mem: usize,
        meta: ResponseMeta,
        writer: Option<Writer>,
        storing: Option<BoxFuture<()>>,
        done: bool,
    }
}

impl Stream for Tee {
    type Item = Result<StreamEvent, LlmError>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let mut this = self.project();
        if let Some(storing) = this.storing.as_mut() {
            // The end is delivered only after the write, so that whoever sees the end of
            // the stream (and the waiters) can find the entry.
            ready!(storing.as_mut().poll(cx));
            *this.storing = None;
            *this.done = true;
            return Poll::Ready(None);
        }
        if *this.done {
            return Poll::Ready(None);
        }
        match ready!(this.inner.as_mut().poll_next(cx)) {
            Some(Ok(chunk)) => {
                if let Some(v) = this.chunks.as_mut() {
                    *this.bytes = this.bytes.saturating_add(event_size(&chunk));
                    *this.mem = this.mem.saturating_add(crate::mem::event(&chunk));
                    if *this.mem > *this.max_mem {
                        // Dropped at once: the buffer never holds more than the cap.
                        if let Some(w) = this.writer.as_ref() {
                            w.shared.stats.stream_overflow();
                        }
                        *this.chunks = None;
                    } else if *this.bytes > *this.max {
                        *this.chunks = None;
                    } else {
                        v.push(chunk.clone());
                    }
                }
                Poll::Ready(Some(Ok(chunk)))
            }
            Some(Err(e)) => {
                *this.done = true;
                this.chunks.take();
                if let Some(w) = this.writer.take() {
                    w.fail(&e);
                }
                Poll::Ready(Some(Err(e)))
            }
            None => {
                let Some(writer) = this.writer.take() else {
                    *this.done = true;
                    return Poll::Ready(None);
                };
                let Some(mut chunks) = this.chunks.take() else {
                    writer.skip();
                    *this.done = true;
                    return Poll::Ready(None);
                };
                // The copy grew by doubling; the stored entry keeps only what it holds.
                chunks.shrink_to_fit();
                let entry = CachedEntry::events(chunks, this.meta.usage.take(), this.meta);
                if !entry.is_complete() {
                    // Ended without a finish reason: cut short, never stored.
                    writer.skip();
                    *this.done = true;
                    return Poll::Ready(None);
                }
                let mut fut: BoxFuture<()> = Box::pin(writer.finish(Arc::new(entry)));
                match fut.as_mut().poll(cx) {
                    Poll::Ready(()) => {
                        *this.done = true;
                        Poll::Ready(None)
                    }
                    Poll::Pending => {
                        *this.storing = Some(fut);
                        Poll::Pending
                    }
                }
            }
        }
    }
}
