//! Spread one route's load over equivalent targets — the same model at two providers, in
//! two regions, or under two keys with their own limits — by measured latency and the
//! providers' rate-limit headroom.
//!
//! [`Balance`] is a group of [`BalanceTarget`]s; [`BalanceLayer`] makes the wrapped service
//! the first member of one. Each request goes to one member, chosen by **power of two
//! choices**: two members are drawn at random and the one with the lower load serves (with
//! [`Pick::RoundRobin`], each in turn instead). A group is one step of a fallback chain:
//! put a [`Balance`] in a [`FallbackTarget`](crate::fallback::FallbackTarget).
//!
//! # Rules
//!
//! - **Load** of a member = its latency estimate × (requests in flight + 1) × its headroom
//!   factor.
//!   - The **latency** is a peak EWMA (Finagle's, as in `tower::load::PeakEwma`) of the
//!     time to answer a complete request, or to the **first chunk** of a stream. A slower
//!     sample replaces the estimate at once; faster ones pull it down over
//!     [`decay`](BalanceLayer::decay) (10 s), and an idle member's estimate decays towards
//!     zero, so a member that was slow is tried again and, once fast, keeps its traffic.
//!     Before its first answer a member counts [`DEFAULT_RTT`] (1 s). A call given up
//!     before its answer (dropped: a [`Hedge`](crate::hedge)'s losing attempt, a client
//!     gone, a timeout above) took at least as long as it ran: that raises the estimate
//!     if it is higher, and says nothing otherwise. So a member whose slow calls are
//!     cancelled by a hedge still looks slower than one that answers.
//!   - **In flight** counts a stream until it ends or is dropped.
//!   - **Headroom**: the `x-ratelimit-*` counts a provider reports
//!     ([`ResponseMeta::headroom`](crate::ResponseMeta)), counted down by each pick until
//!     the next response. Below half of its limit left, a member's load is multiplied by
//!     `0.5 / share left` (10 % left: ×5, at most ×100). Below
//!     [`min_remaining`](BalanceLayer::min_remaining) (1 request by default), or after a
//!     429 (until its retry-after, else 1 s), the member is not picked until the reset.
//! - **Breaker**: each member has the fallback layer's breaker
//!   ([`Cooldown`](crate::fallback::Cooldown)): a member whose breaker is open is not
//!   picked; once half-open, one request probes it. A failure that moves on (429, 5xx,
//!   timeouts, transport) counts against the breaker and is **not** a latency sample, so a
//!   member that fails fast does not look fast. An error that is the request's fault (400)
//!   counts as an answer.
//! - **No member left** (all open, or all at their limits): the request fails at once with
//!   `Unavailable` or `RateLimited` and the earliest retry-after, so a fallback chain above
//!   moves to its next step instead of waiting.
//! - **Hedged copies**: a member recorded in the request's
//!   [`TakenTargets`](crate::TakenTargets) (the [`Hedge`](crate::hedge) layer shares one
//!   between the two copies of a hedged request) is not picked while another member can
//!   be, so the second attempt goes to another member; the member picked is recorded
//!   there.
//! - **Response meta**: `meta.provider` is the serving member's name (unless the member set
//!   it), `meta.model` its model; an error carries the member's name as its provider.
//!
//! # Why not `tower::balance::p2c`
//!
//! tower's `p2c::Balance` drives every endpoint's readiness and needs `&mut self` for it: it
//! is neither `Clone` nor `Sync`, so sharing one between the clones of a gateway's stack
//! needs a `Buffer` and a spawned worker; it waits while no endpoint is ready (a chain must
//! move on instead), and its errors are `BoxError`. Its `PeakEwma` load measures until the
//! response future resolves (for a stream: the headers, not the first chunk), and its
//! `Cost` is opaque, so it cannot be combined with headroom. The group here is a plain
//! `Clone + Sync` service over shared state (an `Arc`), with the same peak-EWMA formula,
//! the same two-choice draw (tower's `HasherRng`), the fallback layer's breaker, and the
//! time to first chunk.
//!
//! # Readiness
//!
//! [`Balance`] reports ready at once and drives the picked member's readiness inside the
//! response future, on a clone of that member (as [`Fallback`](crate::fallback::Fallback)
//! does): waiting for every member would stall the group on the one it should avoid.
//!
//! # Example
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), llm_tower::LlmError> {
//! use llm_tower::balance::{Balance, BalanceTarget};
//! use llm_tower::{ChatRequest, ChatResponse, LlmError, LlmResponse, Message};
//! use tower::{Service, ServiceExt};
//!
//! let east = tower::service_fn(|req: ChatRequest| async move {
//!     Ok::<_, LlmError>(LlmResponse::complete(ChatResponse::from_text(req.model, "from east")))
//! });
//! let west = tower::service_fn(|req: ChatRequest| async move {
//!     Ok::<_, LlmError>(LlmResponse::complete(ChatResponse::from_text(req.model, "from west")))
//! });
//! let mut group = Balance::new(vec![
//!     BalanceTarget::new("east", east),
//!     BalanceTarget::new("west", west).with_model("gpt-4o-2024-08-06"),
//! ]);
//! let stats = group.stats();
//!
//! for _ in 0..4 {
//!     let req = ChatRequest::new("gpt-4o", vec![Message::user("hi")]);
//!     let resp = group.ready().await?.call(req).await?;
//!     let served_by = resp.meta.provider.clone().unwrap();
//!     assert!(&*served_by == "east" || &*served_by == "west");
//! }
//! assert_eq!(stats.picked("east") + stats.picked("west"), 4);
//! # Ok(()) }
//! ```

mod future;
mod layer;
mod load;

pub use future::ResponseFuture;
pub use layer::{
    Balance, BalanceLayer, BalanceStats, BalanceTarget, DEFAULT_DECAY, DEFAULT_RTT, MemberStats,
    Pick,
};
