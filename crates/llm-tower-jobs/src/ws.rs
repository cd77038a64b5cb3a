//! `GET /v1/jobs/ws`: job updates pushed over a WebSocket, for many jobs on one connection.
//!
//! # Protocol
//!
//! Text frames of JSON. The client sends
//!
//! - `{"type": "subscribe", "ids": ["<job id>", …]}` and
//! - `{"type": "unsubscribe", "ids": [...]}`.
//!
//! The server answers each subscribed id with `{"type": "subscribed", "id"}` and then sends
//! `{"type": "job", "job": {…}}` for the job's current state and for every change of
//! status, attempts or step progress ([`Job::to_json`](crate::Job::to_json)), and ends with
//! `{"type": "final", "job": {…}}`, the finished job with its `result` or `error`; the
//! subscription then ends by itself (a finished job gives its final message at once).
//! Problems are `{"type": "error", "id"?, "error": {"message", "type", "code"}}` in the
//! OpenAI error shape: an unknown, malformed or other tenant's id is `not_found` (the same
//! answer, so ids of other tenants cannot be probed), a frame that is not a valid message
//! is `invalid_message`, a subscription past the per-socket cap is
//! `too_many_subscriptions`.
//!
//! # Bounds
//!
//! [`JobsWsLimits`]: open sockets (1 024; more are refused with 503), subscriptions per
//! socket (64), the size of a client frame (64 KiB;
//! bigger closes the socket), an idle timeout (a socket with no subscription and no
//! client frame for 60 s is closed), a write timeout (a client that does not take a
//! frame within 10 s is too slow and is disconnected) and the largest update sent (4 MiB;
//! a bigger final state is sent without its `result`, with `"result_omitted": true`, to
//! be read with `GET /v1/jobs/{id}`). Updates are not queued per socket: each
//! subscription reads the job's latest state when the socket is ready for it, so a slow
//! reader skips intermediate states instead of growing a buffer. Every drop and close is
//! counted in [`JobsWsStats`].

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::Extension;
use axum::extract::State;
use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket, WebSocketUpgrade};
use axum::response::Response;
use futures_util::StreamExt;
use futures_util::stream::BoxStream;
use llm_tower_core::Tenant;
use serde::Deserialize;
use serde_json::{Value, json};
use tokio_stream::StreamMap;

use crate::Job;
use crate::jobs::Jobs;
use crate::types::JobId;

/// Limits of the jobs WebSocket (see the [module docs](self)).
///
/// ```
/// use std::time::Duration;
/// use llm_tower_jobs::JobsWsLimits;
/// let ws = JobsWsLimits::default()
///     .max_subscriptions(16)
///     .idle_timeout(Duration::from_secs(30));
/// assert_eq!(ws.subscriptions(), 16);
/// ```
#[derive(Debug, Clone)]
pub struct JobsWsLimits {
    max_sockets: usize,
    max_subscriptions: usize,
    max_client_message_bytes: usize,
    max_update_bytes: usize,
    idle_timeout: Duration,
    write_timeout: Duration,
    ping_interval: Duration,
    stats: Arc<JobsWsStats>,
}

impl Default for JobsWsLimits {
    /// 1 024 sockets, 64 subscriptions each, 64 KiB client frames, 4 MiB updates, 60 s idle, 10 s write
    /// timeout, a ping every 20 s.
    fn default() -> Self {
        Self {
            max_sockets: 1024,
            max_subscriptions: 64,
            max_client_message_bytes: 64 * 1024,
            max_update_bytes: 4 * 1024 * 1024,
            idle_timeout: Duration::from_secs(60),
            write_timeout: Duration::from_secs(10),
            ping_interval: Duration::from_secs(20),
            stats: Arc::default(),
        }
    }
}

impl JobsWsLimits {
    /// Most sockets open at once (over every router built with these limits); past it an
    /// upgrade is refused with 503 before it happens. An upgraded socket leaves the
    /// server's own connection count, so this is its bound.
    #[must_use]
    pub fn max_sockets(mut self, n: usize) -> Self {
        self.max_sockets = n.max(1);
        self
    }
    /// Most jobs one socket follows at once (at least 1).
    #[must_use]
    pub fn max_subscriptions(mut self, n: usize) -> Self {
        self.max_subscriptions = n.max(1);
        self
    }
    /// The cap of [`max_subscriptions`](Self::max_subscriptions).
    pub fn subscriptions(&self) -> usize {
        self.max_subscriptions
    }
    /// Largest client frame or message, in bytes; a bigger one closes the socket.
    #[must_use]
    pub fn max_client_message_bytes(mut self, n: usize) -> Self {
        self.max_client_message_bytes = n.max(256);
        self
    }
    /// Largest update sent; a bigger final state goes without its `result`.
    #[must_use]
    pub fn max_update_bytes(mut self, n: usize) -> Self {
        self.max_update_bytes = n.max(1024);
        self
    }
    /// How long a socket may stay with no subscription and no client frame.
    #[must_use]
    pub fn idle_timeout(mut self, d: Duration) -> Self {
        self.idle_timeout = d;
        self
    }
    /// How long a frame may take to be written before the client counts as too slow.
    #[must_use]
    pub fn write_timeout(mut self, d: Duration) -> Self {
        self.write_timeout = d;
        self
    }
    /// How often the server pings (keeps proxies from closing a quiet socket).
    #[must_use]
    pub fn ping_interval(mut self, d: Duration) -> Self {
        self.ping_interval = d.max(Duration::from_millis(10));
        self
    }
    /// The counters of sockets served with these limits (shared by clones).
    pub fn stats(&self) -> Arc<JobsWsStats> {
        self.stats.clone()
    }
}

/// Counters of the jobs WebSocket ([`JobsWsLimits::stats`]).
#[derive(Debug, Default)]
pub struct JobsWsStats {
    open: AtomicU64,
    refused_sockets: AtomicU64,
    connections: AtomicU64,
    subscriptions: AtomicU64,
    updates: AtomicU64,
    refused_subscriptions: AtomicU64,
    invalid_messages: AtomicU64,
    idle_closes: AtomicU64,
    slow_closes: AtomicU64,
    oversized_closes: AtomicU64,
    results_omitted: AtomicU64,
}

macro_rules! ws_counters {
    ($($name:ident: $doc:literal;)*) => {
        impl JobsWsStats {
            $(
                #[doc = $doc]
                pub fn $name(&self) -> u64 {
                    self.$name.load(Ordering::Relaxed)
                }
            )*
        }
    };
}

ws_counters! {
    open: "Sockets open now.";
    refused_sockets: "Upgrades refused: over the socket cap.";
    connections: "Sockets opened.";
    subscriptions: "Subscriptions accepted.";
    updates: "Job updates sent (`job` and `final` messages).";
    refused_subscriptions: "Subscriptions refused: over the per-socket cap.";
    invalid_messages: "Client frames that were not a valid message (answered with an error).";
    idle_closes: "Sockets closed by the idle timeout.";
    slow_closes: "Sockets closed because the client did not take a frame within the write timeout.";
    oversized_closes: "Sockets closed on a client frame over the size limit.";
    results_omitted: "Final states sent without their result (over the update size limit).";
}

fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

#[derive(Clone)]
pub(crate) struct WsState {
    pub(crate) jobs: Jobs,
    pub(crate) limits: Arc<JobsWsLimits>,
}

pub(crate) async fn upgrade(
    State(st): State<WsState>,
    tenant: Option<Extension<Tenant>>,
    ws: WebSocketUpgrade,
) -> Response {
    let tenant = crate::http::tenant_of(tenant);
    let stats = st.limits.stats.clone();
    // Taken before the upgrade, given back when the socket ends (or the upgrade fails).
    let open = stats.open.fetch_add(1, Ordering::AcqRel);
    let slot = OpenSlot(stats.clone());
    if open >= st.limits.max_sockets as u64 {
        drop(slot);
        bump(&stats.refused_sockets);
        return crate::http::llm_error(
            &llm_tower_core::LlmError::overloaded("too many job sockets open; retry later")
                .with_retry_after(Duration::from_secs(1)),
        );
    }
    let max = st.limits.max_client_message_bytes;
    ws.max_message_size(max)
        .max_frame_size(max)
        // Bounded: a write that would grow the buffer past this fails (and closes).
        .max_write_buffer_size(st.limits.max_update_bytes.saturating_mul(2))
        .on_upgrade(move |socket| async move {
            serve(socket, st, tenant).await;
            drop(slot);
        })
}

/// One counted open socket.
struct OpenSlot(Arc<JobsWsStats>);

impl Drop for OpenSlot {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::AcqRel);
    }
}

#[derive(Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
enum ClientMessage {
    Subscribe { ids: Vec<String> },
    Unsubscribe { ids: Vec<String> },
}

/// Why the socket loop stopped writing.
enum Stop {
    /// The client left or the socket failed.
    Gone,
    /// The write timed out.
    Slow,
}

struct Conn {
    socket: WebSocket,
    limits: Arc<JobsWsLimits>,
}

impl Conn {
    /// Writes one frame within the write timeout.
    async fn send(&mut self, msg: Message) -> Result<(), Stop> {
        match tokio::time::timeout(self.limits.write_timeout, self.socket.send(msg)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => Err(Stop::Gone),
            Err(_) => Err(Stop::Slow),
        }
    }

    async fn send_json(&mut self, v: &Value) -> Result<(), Stop> {
        self.send(Message::Text(Utf8Bytes::from(v.to_string())))
            .await
    }

    async fn error(
        &mut self,
        id: Option<&str>,
        code: &str,
        kind: &str,
        message: String,
    ) -> Result<(), Stop> {
        let mut v = json!({
            "type": "error",
            "error": {"message": message, "type": kind, "code": code, "param": null},
        });
        if let Some(id) = id {
            v["id"] = Value::from(id);
        }
        self.send_json(&v).await
    }

    async fn close(mut self, code: u16, reason: &'static str) {
        let frame = CloseFrame {
            code,
            reason: Utf8Bytes::from_static(reason),
        };
        let _ = tokio::time::timeout(
            self.limits.write_timeout,
            self.socket.send(Message::Close(Some(frame))),
        )
        .await;
    }
}

async fn serve(socket: WebSocket, st: WsState, tenant: Tenant) {
    let limits = st.limits.clone();
    let stats = limits.stats.clone();
    bump(&stats.connections);
    let mut conn = Conn {
        socket,
        limits: limits.clone(),
    };
    let mut subs: StreamMap<JobId, BoxStream<'static, Job>> = StreamMap::new();
    let mut ping = tokio::time::interval(limits.ping_interval);
    ping.tick().await;
    let idle = tokio::time::sleep(limits.idle_timeout);
    tokio::pin!(idle);

    let stop = loop {
        tokio::select! {
            frame = conn.socket.recv() => {
                let text = match frame {
                    None => break Stop::Gone,
                    Some(Err(e)) => {
                        // tungstenite refuses frames over the configured size with a
                        // capacity error; everything else is the client going away.
                        if is_capacity(&e) {
                            bump(&stats.oversized_closes);
                            conn.close(1009, "message too big").await;
                            return;
                        }
                        break Stop::Gone;
                    }
                    Some(Ok(Message::Close(_))) => break Stop::Gone,
                    Some(Ok(Message::Text(t))) => t,
                    Some(Ok(Message::Binary(_))) => {
                        bump(&stats.invalid_messages);
                        if let Err(s) = conn.error(None, "invalid_message", "invalid_request_error",
                            "binary frames are not accepted; send JSON text".into()).await {
                            break s;
                        }
                        continue;
                    }
                    // Pings are answered by the socket itself; pongs just count as activity.
                    Some(Ok(_)) => {
                        idle.as_mut().reset(tokio::time::Instant::now() + limits.idle_timeout);
                        continue;
                    }
                };
                idle.as_mut().reset(tokio::time::Instant::now() + limits.idle_timeout);
                if let Err(s) = handle(&mut conn, &st, &tenant, &mut subs, text.as_str()).await {
                    break s;
                }
            }
            Some((id, job)) = subs.next(), if !subs.is_empty() => {
                let last = job.status.is_terminal();
                if let Err(s) = send_update(&mut conn, &stats, &job, last).await {
                    break s;
                }
                if last {
                    subs.remove(&id);
                    idle.as_mut().reset(tokio::time::Instant::now() + limits.idle_timeout);
                }
            }
            _ = ping.tick() => {
                if let Err(s) = conn.send(Message::Ping(Default::default())).await {
                    break s;
                }
            }
            () = &mut idle, if subs.is_empty() => {
                bump(&stats.idle_closes);
                conn.close(1000, "idle").await;
                return;
            }
        }
    };
    if let Stop::Slow = stop {
        bump(&stats.slow_closes);
        tracing::debug!("jobs websocket: client too slow; closing");
        // The close frame may not get through either; dropping the socket ends it.
        conn.close(1008, "too slow").await;
    }
}

fn is_capacity(e: &axum::Error) -> bool {
    use std::error::Error as _;
    let mut cur: Option<&(dyn std::error::Error + 'static)> = e.source();
    while let Some(err) = cur {
        if let Some(t) = err.downcast_ref::<tokio_tungstenite::tungstenite::Error>() {
            return matches!(t, tokio_tungstenite::tungstenite::Error::Capacity(_));
        }
        cur = err.source();
    }
    false
}

async fn send_update(
    conn: &mut Conn,
    stats: &JobsWsStats,
    job: &Job,
    last: bool,
) -> Result<(), Stop> {
    let kind = if last { "final" } else { "job" };
    let mut v = json!({"type": kind, "job": job.to_json()});
    let mut text = v.to_string();
    if text.len() > conn.limits.max_update_bytes {
        bump(&stats.results_omitted);
        v["job"]["result"] = Value::Null;
        v["result_omitted"] = Value::Bool(true);
        text = v.to_string();
    }
    bump(&stats.updates);
    conn.send(Message::Text(Utf8Bytes::from(text))).await
}

async fn handle(
    conn: &mut Conn,
    st: &WsState,
    tenant: &Tenant,
    subs: &mut StreamMap<JobId, BoxStream<'static, Job>>,
    text: &str,
) -> Result<(), Stop> {
    let stats = &st.limits.stats;
    let msg: ClientMessage = match serde_json::from_str(text) {
        Ok(m) => m,
        Err(e) => {
            bump(&stats.invalid_messages);
            return conn
                .error(
                    None,
                    "invalid_message",
                    "invalid_request_error",
                    format!(
                        "expected {{\"type\": \"subscribe\" | \"unsubscribe\", \"ids\": [...]}}: {e}"
                    ),
                )
                .await;
        }
    };
    match msg {
        ClientMessage::Unsubscribe { ids } => {
            let mut gone = HashSet::new();
            for id in ids.iter().filter_map(|s| s.parse::<JobId>().ok()) {
                subs.remove(&id);
                gone.insert(id.to_string());
            }
            for id in gone {
                conn.send_json(&json!({"type": "unsubscribed", "id": id}))
                    .await?;
            }
            Ok(())
        }
        ClientMessage::Subscribe { ids } => {
            for raw in ids {
                let not_found = |raw: &str| format!("no job with id {raw:?}");
                let Ok(id) = raw.parse::<JobId>() else {
                    conn.error(Some(&raw), "not_found", "not_found_error", not_found(&raw))
                        .await?;
                    continue;
                };
                if subs.contains_key(&id) {
                    continue;
                }
                if subs.len() >= st.limits.max_subscriptions {
                    bump(&stats.refused_subscriptions);
                    let max = st.limits.max_subscriptions;
                    conn.error(
                        Some(&raw),
                        "too_many_subscriptions",
                        "invalid_request_error",
                        format!("at most {max} subscriptions per socket; unsubscribe first"),
                    )
                    .await?;
                    continue;
                }
                match st.jobs.events(tenant, id).await {
                    Ok(Some(stream)) => {
                        bump(&stats.subscriptions);
                        conn.send_json(&json!({"type": "subscribed", "id": raw}))
                            .await?;
                        subs.insert(id, stream);
                    }
                    Ok(None) => {
                        conn.error(Some(&raw), "not_found", "not_found_error", not_found(&raw))
                            .await?;
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "job store failed");
                        conn.error(
                            Some(&raw),
                            "store_error",
                            "server_error",
                            "the job store did not answer; try again".into(),
                        )
                        .await?;
                    }
                }
            }
            Ok(())
        }
    }
}
