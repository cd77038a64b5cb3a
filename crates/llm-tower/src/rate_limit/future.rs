//! The response future of [`super::RateLimit`].

use super::*;
use llm_tower_core::LlmService;
use std::future::Future;
use std::pin::Pin;

use pin_project_lite::pin_project;
use tokio::time::{Instant, Sleep};

pin_project! {
    #[project = StateProj]
    enum State<F> {
        Check,
        Acquiring { fut: AcquireFuture },
        Waiting { #[pin] sleep: Sleep },
        Calling { #[pin] fut: F },
        Done,
    }
}

pin_project! {
    /// The response future of [`RateLimit`](super::RateLimit): takes from the buckets
    /// (waiting if the policy says so), then calls the inner service and arranges the
    /// settlement of the token reservation.
    pub struct ResponseFuture<S>
    where
        S: Service<ChatRequest>,
    {
        #[pin]
        state: State<S::Future>,
        ctx: Option<Ctx<S>>,
        // Only an error: a response held here would make every future of this layer
        // ~830 bytes bigger, copied on each move and boxing.
        failed: Option<LlmError>,
    }
}

struct Ctx<S> {
    layer: RateLimitLayer,
    inner: S,
    req: Option<ChatRequest>,
    plan: Plan,
    wait_until: Option<Instant>,
    waited: bool,
    // The headroom tracker counted this request (given back if a bucket refuses).
    headroom_admitted: bool,
    reservation: Option<Reservation>,
    hold: Hold,
    // An acquisition was sent and its answer is not known: if dropped so, the token
    // holds are settled at zero, so that the acquisition is a no-op if it lands late.
    in_flight: bool,
}

impl<S> Drop for Ctx<S> {
    fn drop(&mut self) {
        if !self.in_flight {
            return;
        }
        let held: Vec<BucketCheck> = self
            .plan
            .checks
            .iter()
            .filter(|c| c.held)
            .cloned()
            .collect();
        if !held.is_empty() {
            self.layer.store.settle(self.hold, &held, 0);
        }
    }
}

impl<S> fmt::Debug for ResponseFuture<S>
where
    S: Service<ChatRequest>,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}

impl<S> ResponseFuture<S>
where
    S: LlmService,
{
    pub(super) fn failed(e: LlmError) -> Self {
        Self {
            state: State::Done,
            ctx: None,
            failed: Some(e),
        }
    }

    pub(super) fn new(
        layer: RateLimitLayer,
        inner: S,
        req: ChatRequest,
        plan: Plan,
        wait_until: Option<Instant>,
    ) -> Self {
        let hold = if plan.checks.is_empty() {
            Hold {
                id: HoldId::from_u128(0),
                expires_at: Instant::now(),
            }
        } else {
            Hold::new(layer.config.hold_ttl)
        };
        Self {
            state: State::Check,
            ctx: Some(Ctx {
                layer,
                inner,
                req: Some(req),
                plan,
                wait_until,
                waited: false,
                headroom_admitted: false,
                reservation: None,
                hold,
                in_flight: false,
            }),
            failed: None,
        }
    }
}

/// What to do after a refusal: wait `d`, or fail.
fn on_refusal<S>(ctx: &mut Ctx<S>, retry_after: Duration) -> Option<Duration> {
    let until = ctx.wait_until?;
    let now = Instant::now();
    // Waking exactly at retry-after must find room; never wait past the deadline.
    let wake = now + retry_after.max(Duration::from_millis(1));
    (wake <= until).then(|| {
        if !ctx.waited {
            ctx.waited = true;
            ctx.layer.counters.waited.fetch_add(1, Ordering::Relaxed);
        }
        let wait = wake - now;
        if let Some(req) = &ctx.req {
            crate::emit(req, crate::ObserveEvent::RateLimitWait { wait });
        }
        wait
    })
}

impl<S> Future for ResponseFuture<S>
where
    S: LlmService,
{
    type Output = Result<LlmResponse, LlmError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        loop {
            let Some(ctx) = this.ctx.as_mut() else {
                return Poll::Ready(Err(this.failed.take().unwrap_or_else(|| {
                    LlmError::internal("rate limit future polled after completion")
                })));
            };
            let acquired = match this.state.as_mut().project() {
                StateProj::Check => {
                    // Provider headroom first: it costs nothing to ask.
                    if let Some(tracker) = &ctx.layer.config.headroom
                        && let Err(retry_after) = tracker.admit(ctx.plan.estimate)
                    {
                        if let Some(d) = on_refusal(ctx, retry_after) {
                            this.state.set(State::Waiting {
                                sleep: tokio::time::sleep(d),
                            });
                            continue;
                        }
                        let c = &ctx.layer.counters;
                        c.limited.fetch_add(1, Ordering::Relaxed);
                        c.headroom_limited.fetch_add(1, Ordering::Relaxed);
                        let e = ctx.layer.error(
                            format!(
                                "provider rate-limit headroom exhausted; retry in {retry_after:?}"
                            ),
                            Some(retry_after),
                        );
                        *this.ctx = None;
                        this.state.set(State::Done);
                        return Poll::Ready(Err(e));
                    }
                    ctx.headroom_admitted = ctx.layer.config.headroom.is_some();
                    if ctx.plan.checks.is_empty() {
                        Ok(Acquire::Allowed {
                            remaining: Vec::new(),
                        })
                    } else if let Some(r) = ctx.layer.store.acquire_now(ctx.hold, &ctx.plan.checks)
                    {
                        r
                    } else {
                        let fut = ctx.layer.store.acquire(ctx.hold, &ctx.plan.checks);
                        ctx.in_flight = true;
                        this.state.set(State::Acquiring { fut });
                        continue;
                    }
                }
                StateProj::Acquiring { fut } => match fut.as_mut().poll(cx) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(r) => {
                        // Failed (closed): it may still land; otherwise it is answered.
                        ctx.in_flight = r.is_err();
                        r
                    }
                },
                StateProj::Waiting { sleep } => match sleep.poll(cx) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(()) => {
                        this.state.set(State::Check);
                        continue;
                    }
                },
                StateProj::Calling { fut } => {
                    let result = match fut.poll(cx) {
                        Poll::Pending => return Poll::Pending,
                        Poll::Ready(r) => r,
                    };
                    let Some(ctx) = this.ctx.take() else {
                        return Poll::Ready(result);
                    };
                    this.state.set(State::Done);
                    return Poll::Ready(finish(ctx, result));
                }
                StateProj::Done => {
                    return Poll::Ready(Err(LlmError::internal(
                        "rate limit future polled after completion",
                    )));
                }
            };
            if !matches!(acquired, Ok(Acquire::Allowed { .. }))
                && std::mem::take(&mut ctx.headroom_admitted)
                && let Some(tracker) = &ctx.layer.config.headroom
            {
                tracker.release(ctx.plan.estimate);
            }
            match acquired {
                Err(e) => {
                    // A store failing closed.
                    *this.ctx = None;
                    this.state.set(State::Done);
                    return Poll::Ready(Err(e));
                }
                Ok(Acquire::Limited { index, retry_after }) => {
                    if let Some(d) = on_refusal(ctx, retry_after) {
                        this.state.set(State::Waiting {
                            sleep: tokio::time::sleep(d),
                        });
                        continue;
                    }
                    ctx.layer.counters.limited.fetch_add(1, Ordering::Relaxed);
                    let e = ctx.layer.limited_error(&ctx.plan, index, retry_after);
                    *this.ctx = None;
                    this.state.set(State::Done);
                    return Poll::Ready(Err(e));
                }
                Ok(Acquire::Allowed { remaining }) => {
                    ctx.layer.counters.allowed.fetch_add(1, Ordering::Relaxed);
                    let plan = &mut ctx.plan;
                    let buckets: Vec<BucketCheck> = plan
                        .checks
                        .drain(..)
                        .zip(plan.is_tokens.iter().copied())
                        .zip(remaining.iter().copied().chain(std::iter::repeat(None)))
                        .filter_map(|((c, tok), rem)| {
                            plan.remaining.push((tok, rem));
                            tok.then_some(c)
                        })
                        .collect();
                    if !buckets.is_empty() {
                        ctx.reservation = Some(Reservation {
                            store: ctx.layer.store.clone(),
                            hold: ctx.hold,
                            buckets,
                        });
                    }
                    let Some(req) = ctx.req.take() else {
                        return Poll::Ready(Err(LlmError::internal(
                            "rate limit: request taken twice",
                        )));
                    };
                    let fut = ctx.inner.call(req);
                    this.state.set(State::Calling { fut });
                }
            }
        }
    }
}

/// After the inner call: limits into the meta, headroom observed, settlement arranged.
fn finish<S>(
    mut ctx: Ctx<S>,
    result: Result<LlmResponse, LlmError>,
) -> Result<LlmResponse, LlmError> {
    match result {
        Ok(mut resp) => {
            if let (Some(tracker), Some(h)) = (&ctx.layer.config.headroom, &resp.meta.headroom) {
                tracker.observe(h);
            }
            let mut limits = LocalLimits::default();
            for (tok, rem) in &ctx.plan.remaining {
                let slot = if *tok {
                    &mut limits.remaining_tokens
                } else {
                    &mut limits.remaining_requests
                };
                if let Some(r) = rem {
                    *slot = Some(slot.map_or(*r, |s: u64| s.min(*r)));
                }
            }
            if !ctx.plan.remaining.is_empty() {
                resp.meta.limits = Some(limits);
            }
            if let Some(res) = ctx.reservation.take() {
                let paid = paid_tokens(&resp.meta.paid_attempts);
                resp.on_finish(move |o: &Outcome| {
                    res.settle(o.usage().map(used_tokens), paid);
                });
            }
            Ok(resp)
        }
        Err(e) => {
            if let Some(res) = ctx.reservation.take() {
                // The failing attempt's own usage, if it reported one, is among the
                // paid attempts.
                let own = e.usage().is_some() || rejected_before_generation(e.kind());
                res.settle(own.then_some(0), paid_tokens(e.paid_attempts()));
            }
            Err(e)
        }
    }
}
