//! The response future of [`super::Cost`].

use super::*;
use llm_tower_core::LlmService;
use std::future::Future;
use std::pin::Pin;

use pin_project_lite::pin_project;

pin_project! {
    #[project = StateProj]
    enum State<S, F> {
        Reserving { fut: ReserveFuture, inner: Option<S>, req: Option<ChatRequest> },
        Calling { #[pin] fut: F },
        Ready { result: Option<Result<LlmResponse, LlmError>> },
    }
}

pin_project! {
    /// The response future of [`Cost`](super::Cost): reserves the
    /// budgets (if the store is asynchronous), calls the inner service, prices the
    /// response and arranges the settlement.
    pub struct ResponseFuture<S>
    where
        S: Service<ChatRequest>,
    {
        #[pin]
        state: State<S, S::Future>,
        // Dropped unsettled (the caller went away): the ticket settles itself on drop.
        ticket: Option<Ticket>,
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
    S: Service<ChatRequest>,
{
    pub(super) fn ready(result: Result<LlmResponse, LlmError>) -> Self {
        Self {
            state: State::Ready {
                result: Some(result),
            },
            ticket: None,
        }
    }
    pub(super) fn calling(fut: S::Future, ticket: Ticket) -> Self {
        Self {
            state: State::Calling { fut },
            ticket: Some(ticket),
        }
    }
    pub(super) fn reserving(
        fut: ReserveFuture,
        inner: S,
        req: ChatRequest,
        ticket: Ticket,
    ) -> Self {
        Self {
            state: State::Reserving {
                fut,
                inner: Some(inner),
                req: Some(req),
            },
            ticket: Some(ticket),
        }
    }
}

impl<S> Future for ResponseFuture<S>
where
    S: LlmService,
{
    type Output = Result<LlmResponse, LlmError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        loop {
            match this.state.as_mut().project() {
                StateProj::Ready { result } => {
                    return Poll::Ready(result.take().unwrap_or_else(|| {
                        Err(LlmError::internal("cost future polled after completion"))
                    }));
                }
                StateProj::Reserving { fut, inner, req } => {
                    let r = match fut.as_mut().poll(cx) {
                        Poll::Pending => return Poll::Pending,
                        Poll::Ready(r) => r,
                    };
                    match r {
                        Ok(Reserve::Reserved { .. }) => {
                            let (Some(mut inner), Some(req)) = (inner.take(), req.take()) else {
                                return Poll::Ready(Err(LlmError::internal(
                                    "cost future state lost",
                                )));
                            };
                            if let Some(t) = this.ticket.as_mut() {
                                t.called = true;
                            }
                            let fut = inner.call(req);
                            this.state.set(State::Calling { fut });
                        }
                        Ok(Reserve::Exceeded { index, spent }) => {
                            let result = match this.ticket.take() {
                                Some(mut t) => {
                                    let e = t.layer.exceeded(&t.charges, index, spent);
                                    t.disarm();
                                    Err(e)
                                }
                                None => Err(LlmError::budget_exceeded("budget exhausted")),
                            };
                            this.state.set(State::Ready {
                                result: Some(result),
                            });
                        }
                        Err(e) => {
                            // A store failing closed: the ticket settles at zero on
                            // drop, in case the reservation still lands.
                            *this.ticket = None;
                            this.state.set(State::Ready {
                                result: Some(Err(e)),
                            });
                        }
                    }
                }
                StateProj::Calling { fut } => {
                    let result = match fut.poll(cx) {
                        Poll::Pending => return Poll::Pending,
                        Poll::Ready(r) => r,
                    };
                    let result = match (this.ticket.take(), result) {
                        (Some(t), Ok(resp)) => Ok(t.on_response(resp)),
                        (Some(t), Err(e)) => {
                            t.on_error(&e);
                            Err(e)
                        }
                        (None, r) => r,
                    };
                    this.state.set(State::Ready { result: None });
                    return Poll::Ready(result);
                }
            }
        }
    }
}
