//! Serving a router: connection limits, header and idle timeouts, graceful shutdown with a
//! deadline.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::pin::{Pin, pin};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::body::{Body, HttpBody};
use bytes::Bytes;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, watch};
use tower::ServiceExt;

use crate::metrics::{ConnectionHandles, Metrics};

/// How [`serve`] ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShutdownOutcome {
    /// Every in-flight request and stream finished before the deadline.
    Graceful,
    /// The deadline passed first; the remaining connections were closed.
    DeadlineExceeded,
}

/// Default of [`Server::header_read_timeout`]: 10 s.
pub const DEFAULT_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Default of [`Server::idle_timeout`]: 60 s.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Default of [`Server::body_read_timeout`]: 30 s.
pub const DEFAULT_BODY_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// Default of [`Server::max_connections`]: 4 096.
pub const DEFAULT_MAX_CONNECTIONS: usize = 4096;

/// Counters of a [`Server`]'s connections (cheap to clone; read them while it runs).
#[derive(Debug, Clone, Default)]
pub struct ConnectionStats(Arc<StatsInner>);

#[derive(Debug, Default)]
struct StatsInner {
    open: AtomicUsize,
    accepted: AtomicU64,
    refused: AtomicU64,
    idle_closed: AtomicU64,
}

impl ConnectionStats {
    /// Connections open now.
    pub fn open(&self) -> usize {
        self.0.open.load(Ordering::Relaxed)
    }
    /// Connections accepted and served so far.
    pub fn accepted(&self) -> u64 {
        self.0.accepted.load(Ordering::Relaxed)
    }
    /// Connections closed at once because [`Server::max_connections`] were open.
    pub fn refused(&self) -> u64 {
        self.0.refused.load(Ordering::Relaxed)
    }
    /// Connections closed by the idle timeout.
    pub fn idle_closed(&self) -> u64 {
        self.0.idle_closed.load(Ordering::Relaxed)
    }
}

/// An HTTP/1.1 and HTTP/2 (prior knowledge) server for a [`Router`] that sheds slow and
/// idle clients:
///
/// - [`header_read_timeout`](Self::header_read_timeout): an HTTP/1 request's header must
///   arrive whole within this time, counted from when the connection is ready for it (its
///   opening, or the end of the previous response); otherwise the connection is closed
///   (hyper's `header_read_timeout`). So it is also how long an idle HTTP/1.1 keep-alive
///   connection is kept.
/// - [`idle_timeout`](Self::idle_timeout): a connection (either protocol) with no request
///   in flight (a streamed answer counts until its last byte) for this long is shut down,
///   gracefully: a connection that never sends a byte is closed too.
/// - [`body_read_timeout`](Self::body_read_timeout): a request body must arrive whole
///   within this time from its header; after it, reading the body fails (the chat
///   endpoint answers 408).
/// - [`max_connections`](Self::max_connections): connections beyond it are closed as soon
///   as they are accepted, and counted ([`ConnectionStats::refused`], and
///   `llm_connections_refused_total` on `/metrics` when [`metrics`](Self::metrics) is set).
///
/// On shutdown it stops accepting, lets in-flight requests and streams finish, and gives up
/// on them after [`grace`](Self::grace). Sockets get `TCP_NODELAY`. Connection upgrades
/// (WebSocket) are not served; use `axum::serve` for a router that needs them.
///
/// ```no_run
/// # #[tokio::main] async fn main() -> std::io::Result<()> {
/// use std::time::Duration;
/// use llm_tower_axum::{Metrics, OpenAiRouter, Server};
/// # let llm = llm_tower_core::boxed(tower::service_fn(|r: llm_tower_core::ChatRequest| async move {
/// #     Ok::<_, llm_tower_core::LlmError>(llm_tower_core::LlmResponse::complete(llm_tower_core::ChatResponse::from_text(r.model, "hi")))
/// # }));
/// let metrics = Metrics::prometheus();
/// let router = OpenAiRouter::new(llm).metrics(metrics.clone());
/// let listener = tokio::net::TcpListener::bind("127.0.0.1:8080").await?;
/// let server = Server::new()
///     .header_read_timeout(Duration::from_secs(5))
///     .idle_timeout(Duration::from_secs(30))
///     .max_connections(1024)
///     .metrics(&metrics);
/// let shutdown = async { /* tokio::signal::ctrl_c().await */ };
/// server.serve(listener, router.into_router(), shutdown).await?;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct Server {
    header_read_timeout: Duration,
    body_read_timeout: Duration,
    idle_timeout: Duration,
    max_connections: usize,
    grace: Duration,
    stats: ConnectionStats,
    handles: Option<ConnectionHandles>,
}

impl Default for Server {
    fn default() -> Self {
        Self::new()
    }
}

impl Server {
    /// A server with the defaults: header read timeout 10 s, body read timeout 30 s, idle
    /// timeout 60 s, 4 096 connections, 30 s of grace.
    pub fn new() -> Self {
        Self {
            header_read_timeout: DEFAULT_HEADER_READ_TIMEOUT,
            body_read_timeout: DEFAULT_BODY_READ_TIMEOUT,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            grace: Duration::from_secs(30),
            stats: ConnectionStats::default(),
            handles: None,
        }
    }

    /// Time for a whole HTTP/1 request header (default 10 s; zero is taken as 1 ms).
    #[must_use]
    pub fn header_read_timeout(mut self, timeout: Duration) -> Self {
        self.header_read_timeout = timeout.max(Duration::from_millis(1));
        self
    }

    /// Time for a whole request body, from its header (default 30 s; zero is taken as
    /// 1 ms).
    #[must_use]
    pub fn body_read_timeout(mut self, timeout: Duration) -> Self {
        self.body_read_timeout = timeout.max(Duration::from_millis(1));
        self
    }

    /// Time a connection may stay with no request in flight (default 60 s; zero is taken
    /// as 1 ms).
    #[must_use]
    pub fn idle_timeout(mut self, timeout: Duration) -> Self {
        self.idle_timeout = timeout.max(Duration::from_millis(1));
        self
    }

    /// Most connections open at once (default 4 096; at least 1).
    #[must_use]
    pub fn max_connections(mut self, n: usize) -> Self {
        self.max_connections = n.max(1);
        self
    }

    /// How long in-flight requests may run after the shutdown signal (default 30 s).
    #[must_use]
    pub fn grace(mut self, grace: Duration) -> Self {
        self.grace = grace;
        self
    }

    /// Also records the connection counters into `metrics` (`llm_connections_open`,
    /// `llm_connections_refused_total`, `llm_connections_idle_closed_total`).
    #[must_use]
    pub fn metrics(mut self, metrics: &Metrics) -> Self {
        self.handles = Some(metrics.connection_handles());
        self
    }

    /// The counters of this server's connections.
    pub fn stats(&self) -> ConnectionStats {
        self.stats.clone()
    }

    /// Serves `router` on `listener` until `shutdown` completes, then drains (see the type's
    /// docs). Returns [`ShutdownOutcome::DeadlineExceeded`] at once when the grace runs out;
    /// the connection tasks still running end when the runtime shuts down.
    ///
    /// # Errors
    ///
    /// None in practice: accept errors are logged and retried.
    pub async fn serve<F>(
        self,
        listener: TcpListener,
        router: Router,
        shutdown: F,
    ) -> io::Result<ShutdownOutcome>
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let mut builder = auto::Builder::new(TokioExecutor::new());
        builder
            .http1()
            .timer(TokioTimer::new())
            .header_read_timeout(self.header_read_timeout);
        let builder = Arc::new(builder);
        // Connections subscribe to `signal_tx` (told to shut down) and hold `close_rx`
        // (their count: `close_tx.closed()` is ready once every one has ended).
        let (signal_tx, _) = watch::channel(());
        let (close_tx, close_rx) = watch::channel(());
        let mut shutdown = pin!(shutdown);
        loop {
            let (tcp, _) = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok(c) => c,
                    Err(e) => {
                        if !is_connection_error(&e) {
                            // EMFILE and the like: back off instead of spinning.
                            tracing::error!(error = %e, "accept failed");
                            tokio::time::sleep(Duration::from_secs(1)).await;
                        }
                        continue;
                    }
                },
                () = &mut shutdown => break,
            };
            if self.stats.0.open.load(Ordering::Relaxed) >= self.max_connections {
                self.stats.0.refused.fetch_add(1, Ordering::Relaxed);
                if let Some(h) = &self.handles {
                    h.refused.increment(1);
                }
                drop(tcp);
                continue;
            }
            // TCP_NODELAY: SSE chunks are small writes; with Nagle on, each waits for the
            // previous one's (delayed) ACK, adding up to ~40 ms per chunk.
            let _ = tcp.set_nodelay(true);
            let open = OpenGuard::new(&self.stats, self.handles.clone());
            let conn = ConnTask {
                builder: builder.clone(),
                router: router.clone(),
                signal: signal_tx.subscribe(),
                idle_timeout: self.idle_timeout,
                header_read_timeout: self.header_read_timeout,
                body_read_timeout: self.body_read_timeout,
                stats: self.stats.clone(),
                handles: self.handles.clone(),
            };
            let close_rx = close_rx.clone();
            tokio::spawn(async move {
                conn.run(tcp).await;
                drop(open);
                drop(close_rx);
            });
        }
        tracing::info!("shutdown requested: draining in-flight requests");
        drop(listener);
        drop(close_rx);
        let _ = signal_tx.send(());
        tokio::select! {
            () = close_tx.closed() => Ok(ShutdownOutcome::Graceful),
            () = tokio::time::sleep(self.grace) => {
                tracing::warn!(grace = ?self.grace, "shutdown deadline passed with requests still in flight");
                Ok(ShutdownOutcome::DeadlineExceeded)
            }
        }
    }
}

/// Serves `router` on `listener` with the [`Server`] defaults and `grace`: see
/// [`Server::serve`].
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
/// None in practice: accept errors are logged and retried.
pub async fn serve<F>(
    listener: TcpListener,
    router: Router,
    shutdown: F,
    grace: Duration,
) -> io::Result<ShutdownOutcome>
where
    F: Future<Output = ()> + Send + 'static,
{
    Server::new()
        .grace(grace)
        .serve(listener, router, shutdown)
        .await
}

fn is_connection_error(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
    )
}

/// Counts a connection as open while it lives.
struct OpenGuard {
    stats: ConnectionStats,
    handles: Option<ConnectionHandles>,
}

impl OpenGuard {
    fn new(stats: &ConnectionStats, handles: Option<ConnectionHandles>) -> Self {
        stats.0.open.fetch_add(1, Ordering::Relaxed);
        stats.0.accepted.fetch_add(1, Ordering::Relaxed);
        if let Some(h) = &handles {
            h.open.increment(1.0);
        }
        Self {
            stats: stats.clone(),
            handles,
        }
    }
}

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.stats.0.open.fetch_sub(1, Ordering::Relaxed);
        if let Some(h) = &self.handles {
            h.open.decrement(1.0);
        }
    }
}

struct ConnTask {
    builder: Arc<auto::Builder<TokioExecutor>>,
    router: Router,
    signal: watch::Receiver<()>,
    idle_timeout: Duration,
    header_read_timeout: Duration,
    body_read_timeout: Duration,
    stats: ConnectionStats,
    handles: Option<ConnectionHandles>,
}

impl ConnTask {
    async fn run(mut self, tcp: TcpStream) {
        let activity = Arc::new(Activity::default());
        let service = {
            let activity = activity.clone();
            let router = self.router.clone();
            let body_timeout = self.body_read_timeout;
            hyper::service::service_fn(move |req: http::Request<Incoming>| {
                let guard = InFlight::enter(activity.clone());
                let deadline = tokio::time::Instant::now() + body_timeout;
                let call = router.clone().oneshot(req.map(|body| {
                    Body::new(DeadlineBody {
                        body,
                        deadline,
                        sleep: None,
                    })
                }));
                async move {
                    let resp = call.await?;
                    Ok::<_, Infallible>(resp.map(|body| TrackedBody {
                        body,
                        _guard: guard,
                    }))
                }
            })
        };
        // With upgrades: a WebSocket (`GET /v1/jobs/ws`) takes the connection over after
        // its 101 answer; the connection then ends here and the socket lives on its own.
        let conn = self
            .builder
            .serve_connection_with_upgrades(TokioIo::new(tcp), service);
        let mut conn = pin!(conn);
        let mut idle = pin!(idle_watch(&activity, self.idle_timeout));
        let closing = tokio::select! {
            res = conn.as_mut() => {
                if let Err(e) = res {
                    tracing::debug!(error = %e, "connection ended with an error");
                }
                return;
            }
            () = &mut idle => {
                self.stats.0.idle_closed.fetch_add(1, Ordering::Relaxed);
                if let Some(h) = &self.handles {
                    h.idle_closed.increment(1);
                }
                true
            }
            _ = self.signal.changed() => false,
        };
        conn.as_mut().graceful_shutdown();
        if closing {
            // Idle: nothing is in flight, so whatever remains is a header on its way;
            // give it the header timeout, no more.
            let _ = tokio::time::timeout(self.header_read_timeout, conn).await;
        } else {
            // Shutdown: the server's grace bounds the drain.
            let _ = conn.await;
        }
    }
}

/// A connection's requests in flight, and a change counter for the idle watch.
#[derive(Default)]
struct Activity {
    in_flight: AtomicUsize,
    changes: AtomicU64,
    idle: Notify,
}

/// One request in flight, until its response body has been sent or dropped.
struct InFlight(Arc<Activity>);

impl InFlight {
    fn enter(activity: Arc<Activity>) -> Self {
        activity.in_flight.fetch_add(1, Ordering::AcqRel);
        activity.changes.fetch_add(1, Ordering::Relaxed);
        Self(activity)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.changes.fetch_add(1, Ordering::Relaxed);
        if self.0.in_flight.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

/// Completes once the connection has had no request in flight for a whole `timeout`
/// (so between `timeout` and twice it after going idle).
async fn idle_watch(activity: &Activity, timeout: Duration) {
    loop {
        let idle = activity.idle.notified();
        let mut idle = pin!(idle);
        idle.as_mut().enable();
        if activity.in_flight.load(Ordering::Acquire) > 0 {
            idle.await;
            continue;
        }
        let before = activity.changes.load(Ordering::Relaxed);
        tokio::time::sleep(timeout).await;
        if activity.in_flight.load(Ordering::Acquire) == 0
            && activity.changes.load(Ordering::Relaxed) == before
        {
            return;
        }
    }
}

pin_project_lite::pin_project! {
    /// A response body that keeps its request counted as in flight until it is done.
    struct TrackedBody {
        #[pin]
        body: Body,
        _guard: InFlight,
    }
}

impl HttpBody for TrackedBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, axum::Error>>> {
        self.project().body.poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

/// The error of a request body that did not arrive within [`Server::body_read_timeout`].
#[derive(Debug)]
pub(crate) struct BodyTimeout;

impl std::fmt::Display for BodyTimeout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the request body did not arrive in time")
    }
}

impl std::error::Error for BodyTimeout {}

pin_project_lite::pin_project! {
    /// A request body that fails once its deadline passes. The timer is only set when the
    /// body is not all there at the first read (most bodies arrive with their header).
    struct DeadlineBody {
        #[pin]
        body: Incoming,
        deadline: tokio::time::Instant,
        sleep: Option<Pin<Box<tokio::time::Sleep>>>,
    }
}

impl HttpBody for DeadlineBody {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        let this = self.project();
        match this.body.poll_frame(cx) {
            Poll::Ready(frame) => Poll::Ready(frame.map(|f| f.map_err(Into::into))),
            Poll::Pending => {
                let deadline = *this.deadline;
                let sleep = this
                    .sleep
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
                match sleep.as_mut().poll(cx) {
                    Poll::Ready(()) => Poll::Ready(Some(Err(Box::new(BodyTimeout)))),
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}
