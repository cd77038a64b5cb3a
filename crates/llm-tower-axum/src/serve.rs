//! Serving a router with graceful shutdown and a deadline.

use std::future::{Future, IntoFuture};
use std::io;
use std::time::Duration;

use axum::Router;
use tokio::net::TcpListener;

/// How [`serve`] ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShutdownOutcome {
    /// Every in-flight request and stream finished before the deadline.
    Graceful,
    /// The deadline passed first; the remaining connections were closed.
    DeadlineExceeded,
}

/// Serves `router` on `listener` until `shutdown` completes, then stops accepting new
/// connections, lets in-flight requests and streams finish, and gives up on them after
/// `grace`: it then returns [`ShutdownOutcome::DeadlineExceeded`] at once. The connection
/// tasks `axum::serve` spawned may still be running at that point; they end when the
/// runtime shuts down, so return from `main` (or drop the runtime) after this returns.
///
/// No task is spawned beyond what `axum::serve` spawns per connection.
///
/// ```no_run
/// # #[tokio::main] async fn main() -> std::io::Result<()> {
/// use std::time::Duration;
/// use llm_tower_axum::{serve, OpenAiRouter};
/// # let llm = llm_tower_core::boxed(tower::service_fn(|r: llm_tower_core::ChatRequest| async move {
/// #     Ok::<_, llm_tower_core::LlmError>(llm_tower_core::LlmResponse::complete(llm_tower_core::ChatResponse::from_text(r.model, "hi")))
/// # }));
/// let app = OpenAiRouter::new(llm).into_router();
/// let listener = tokio::net::TcpListener::bind("127.0.0.1:8080").await?;
/// // In a binary: `async { let _ = tokio::signal::ctrl_c().await; }` (tokio's `signal` feature).
/// let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
/// # drop(stop);
/// let shutdown = async move { let _ = stopped.await; };
/// serve(listener, app, shutdown, Duration::from_secs(30)).await?;
/// # Ok(()) }
/// ```
///
/// # Errors
///
/// What `axum::serve` returns (it retries accept errors itself, so in practice none).
pub async fn serve<F>(
    listener: TcpListener,
    router: Router,
    shutdown: F,
    grace: Duration,
) -> io::Result<ShutdownOutcome>
where
    F: Future<Output = ()> + Send + 'static,
{
    let (started_tx, started_rx) = tokio::sync::oneshot::channel::<()>();
    let signal = async move {
        shutdown.await;
        tracing::info!("shutdown requested: draining in-flight requests");
        let _ = started_tx.send(());
    };
    // TCP_NODELAY: SSE chunks are small writes; with Nagle on, each waits for the
    // previous one's (delayed) ACK, adding up to ~40 ms per chunk.
    let listener = axum::serve::ListenerExt::tap_io(listener, |tcp: &mut tokio::net::TcpStream| {
        let _ = tcp.set_nodelay(true);
    });
    let server = axum::serve(listener, router)
        .with_graceful_shutdown(signal)
        .into_future();
    let deadline = async move {
        if started_rx.await.is_ok() {
            tokio::time::sleep(grace).await;
        } else {
            // The signal future was dropped without firing: only the server can end.
            std::future::pending::<()>().await;
        }
    };
    tokio::select! {
        res = server => res.map(|()| ShutdownOutcome::Graceful),
        () = deadline => {
            tracing::warn!(?grace, "shutdown deadline passed with requests still in flight");
            Ok(ShutdownOutcome::DeadlineExceeded)
        }
    }
}
