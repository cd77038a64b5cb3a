//! Race a second attempt against a first one that is slower than usual, within a budget.
//!
//! LLM latency has a long tail: the same call takes 2 s most of the time and 40 s now and
//! then. [`HedgeLayer`] sends a second copy of a request that has not answered after the
//! observed p95 latency (or a fixed delay), takes whichever answers first and cancels the
//! other.
//!
//! # Rules
//!
//! - **What is hedged**: complete (non-streamed) requests until their answer, and streams
//!   until their **first chunk**: the race reads each stream's first chunk itself, and the
//!   winner's stream is returned with that chunk replayed first. After the first chunk
//!   nothing is raced.
//! - **When**: [`HedgeDelay::Observed`] (the default): after the 95th percentile of the
//!   latencies of first attempts this layer observed (time to answer, or to a stream's
//!   first chunk; answers only, not errors; a first attempt cancelled because the second
//!   won counts the time until then) over a sliding window ([`HedgeLayer::period`], 60 s), once 20 were
//!   observed; requests are not hedged before. The histogram counts microseconds in
//!   buckets under 1 % wide, and the delay is the upper edge of the percentile's bucket,
//!   so at most 5 % of first attempts run past a p95 delay, however tight the latencies
//!   are. [`HedgeDelay::Fixed`]: after a fixed delay.
//! - **Budget**: at most [`HedgeLayer::budget`] (5 %) extra calls, counted by tower's
//!   `TpsBudget` (each request deposits, each hedge withdraws, over a 10 s window); when it
//!   is spent, slow requests wait for their first attempt ([`HedgeStats::denied`]).
//! - **Where the second attempt goes**: to the same inner service, with a
//!   [`TakenTargets`](crate::TakenTargets) shared by both copies, so that a
//!   [`Balance`](crate::balance) group below sends it to another member than the first.
//! - **First answer wins, the other is cancelled**: the losing attempt's future is dropped
//!   at once, which closes its upstream connection (a provider client aborts the request).
//! - **Failures**: an attempt that fails while the other still runs is ignored until the
//!   other ends; if both fail, the first attempt's error is returned. A first attempt that
//!   fails before the second was sent fails the request (moving on after errors is the
//!   fallback chain's job, not this layer's).
//! - **Cost**: a cancelled loser reported no usage, but its prompt was sent and may be
//!   billed: the winner's [`ResponseMeta::paid_attempts`](crate::ResponseMeta) gets a
//!   [`PaidAttempt`](crate::PaidAttempt) of the request's estimated prompt tokens (a
//!   quarter of its text bytes, plus 4 per message and 3; a stream's reported usage when it
//!   had arrived) and no output, so a cost layer above prices both attempts, and budgets and
//!   token limits count both. The winner's meta carries [`Hedged`] in its extensions.
//!
//! # Why not `tower::hedge`
//!
//! `tower::hedge::Hedge` has the right shape (a latency histogram, a delay at a
//! percentile, a policy that clones the request) and this layer keeps its histogram
//! (hdrhistogram, two rotating windows), but it does not fit as is: it takes the first
//! attempt to *complete*, so a second attempt failing fast (its target cooling down) would
//! fail a request whose first attempt was about to answer; it races until the response
//! future resolves (a stream's headers, not its first chunk); it has no fixed delay and no
//! budget (its policy would have to count one); its errors are `BoxError`; and it cannot
//! tell which attempt lost, so the loser could not be priced. The budget is tower's
//! `retry::budget::TpsBudget`.
//!
//! # Readiness
//!
//! `poll_ready` delegates to the inner service; the instance polled ready serves the first
//! attempt. The second attempt runs on a clone of the inner service, whose readiness is
//! driven inside the response future.
//!
//! # Example
//!
//! ```
//! # #[tokio::main(flavor = "current_thread", start_paused = true)] async fn main() -> Result<(), llm_tower::LlmError> {
//! use std::sync::Arc;
//! use std::sync::atomic::{AtomicUsize, Ordering};
//! use std::time::Duration;
//! use llm_tower::hedge::{HedgeDelay, HedgeLayer, Hedged};
//! use llm_tower::{ChatRequest, ChatResponse, LlmError, LlmResponse, LlmServiceBuilderExt, Message};
//! use tower::{Service, ServiceBuilder, ServiceExt};
//!
//! // The first call takes 10 s, every later one 100 ms.
//! let calls = Arc::new(AtomicUsize::new(0));
//! let upstream = tower::service_fn(move |req: ChatRequest| {
//!     let n = calls.fetch_add(1, Ordering::Relaxed);
//!     async move {
//!         let ms = if n == 0 { 10_000 } else { 100 };
//!         tokio::time::sleep(Duration::from_millis(ms)).await;
//!         Ok::<_, LlmError>(LlmResponse::complete(ChatResponse::from_text(req.model, "hi")))
//!     }
//! });
//! let hedge = HedgeLayer::new()
//!     .delay(HedgeDelay::Fixed(Duration::from_secs(1)))
//!     .budget(1.0); // every request may be hedged (the default allows 5 %)
//! let stats = hedge.stats();
//! let mut svc = ServiceBuilder::new().hedge(hedge).service(upstream);
//!
//! let started = tokio::time::Instant::now();
//! let resp = svc.ready().await?.call(ChatRequest::new("m", vec![Message::user("hi")])).await?;
//! assert_eq!(started.elapsed(), Duration::from_millis(1100)); // hedged at 1 s, answered 100 ms later
//! assert_eq!(resp.meta.extensions.get::<Hedged>(), Some(&Hedged { second_won: true }));
//! assert_eq!(resp.meta.paid_attempts.len(), 1); // the cancelled first attempt
//! assert_eq!(stats.hedged(), 1);
//! # Ok(()) }
//! ```

mod future;
mod layer;

pub use future::{Hedged, ResponseFuture};
pub use layer::{DEFAULT_BUDGET, DEFAULT_PERIOD, Hedge, HedgeDelay, HedgeLayer, HedgeStats};
