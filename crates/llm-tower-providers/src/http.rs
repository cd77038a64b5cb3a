//! The shared HTTP transport: one pooled hyper client with rustls, built once.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use llm_tower_core::LlmError;
use serde::Deserialize;

/// Settings of the shared [`HttpClient`]. Every field has a default, so an empty TOML
/// table (or `HttpClientConfig::default()`) gives a production-ready client.
///
/// ```
/// use llm_tower_providers::HttpClientConfig;
/// let cfg: HttpClientConfig = serde_json::from_str(r#"{"connect_timeout_ms": 2000}"#).unwrap();
/// assert_eq!(cfg.connect_timeout_ms, 2000);
/// assert_eq!(cfg.pool_max_idle_per_host, HttpClientConfig::default().pool_max_idle_per_host);
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HttpClientConfig {
    /// TCP connect timeout, in milliseconds (TLS handshake not included). Default 10 000.
    pub connect_timeout_ms: u64,
    /// How long an idle pooled connection is kept, in milliseconds. Default 90 000.
    pub pool_idle_timeout_ms: u64,
    /// At most this many idle connections are kept per host. Default 64.
    pub pool_max_idle_per_host: usize,
    /// TCP keep-alive interval, in milliseconds (`0` = off). Default 30 000.
    pub tcp_keepalive_ms: u64,
    /// HTTP/2 PING interval on idle connections, in milliseconds (`0` = off). Default 30 000.
    pub http2_keepalive_ms: u64,
    /// Which root certificates to trust. Default [`TlsRoots::Webpki`].
    pub tls_roots: TlsRoots,
    /// Speak only HTTP/2 (also over plain `http://`, "prior knowledge"). Default `false`:
    /// HTTP/2 is negotiated by ALPN over TLS, HTTP/1.1 otherwise.
    pub http2_only: bool,
    /// Most response headers read (HTTP/1.1); an answer with more fails as a `Transport`
    /// error (code `upstream_head_too_large`). Default 100 (hyper's; any other value makes
    /// hyper allocate the header slots on the heap, per response).
    pub max_response_headers: usize,
    /// Most bytes of response head read (HTTP/1.1 read buffer, at least 8 KiB; HTTP/2
    /// header list). Default 65 536.
    pub max_response_header_bytes: usize,
    /// Most bytes of non-streamed answers being read at once, over every provider that
    /// shares this client: [`ResponseLimits::max_body_bytes`](crate::ResponseLimits)
    /// bounds one answer, this bounds them all together, so many concurrent huge or endless
    /// bodies cannot take the process's memory. A body that would pass it fails as a
    /// `Transport` error (code `upstream_buffers_full`, counted in
    /// [`HttpClient::buffer_refusals`]). Default 256 MiB.
    pub max_buffered_bytes: usize,
}

/// HTTP/2 flow-control window of each stream (how much of an answer may wait unread).
const H2_STREAM_WINDOW: u32 = 256 * 1024;
/// HTTP/2 flow-control window of a connection (all its streams together).
const H2_CONNECTION_WINDOW: u32 = 32 * 1024 * 1024;

impl Default for HttpClientConfig {
    fn default() -> Self {
        Self {
            connect_timeout_ms: 10_000,
            pool_idle_timeout_ms: 90_000,
            pool_max_idle_per_host: 64,
            tcp_keepalive_ms: 30_000,
            http2_keepalive_ms: 30_000,
            http2_only: false,
            tls_roots: TlsRoots::Webpki,
            max_response_headers: DEFAULT_MAX_HEADERS,
            max_response_header_bytes: 64 * 1024,
            max_buffered_bytes: 256 * 1024 * 1024,
        }
    }
}

/// The root certificates an [`HttpClient`] trusts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TlsRoots {
    /// The Mozilla roots built into the binary (`webpki-roots`): the same everywhere, no
    /// system files read.
    #[default]
    Webpki,
    /// The operating system's certificate store (for corporate TLS proxies); needs the
    /// `native-roots` cargo feature, else [`HttpClient::new`] fails with a clear error.
    Native,
}

/// The bytes of answer bodies being read, over all providers sharing a client.
#[derive(Debug)]
pub(crate) struct BufferBudget {
    used: AtomicUsize,
    max: usize,
    refused: AtomicU64,
}

impl BufferBudget {
    fn new(max: usize) -> Self {
        Self {
            used: AtomicUsize::new(0),
            max,
            refused: AtomicU64::new(0),
        }
    }

    /// A holder of nothing yet; what it takes is given back when it drops.
    pub(crate) fn holder(&self) -> BufferHold<'_> {
        BufferHold { budget: self, n: 0 }
    }
}

/// Bytes taken from a [`BufferBudget`] by one body being read.
pub(crate) struct BufferHold<'a> {
    budget: &'a BufferBudget,
    n: usize,
}

impl BufferHold<'_> {
    /// Takes `n` more bytes; `false` (counted, nothing taken) when the budget is spent.
    pub(crate) fn take(&mut self, n: usize) -> bool {
        let b = self.budget;
        let prev = b.used.fetch_add(n, Ordering::Relaxed);
        if prev.saturating_add(n) > b.max {
            b.used.fetch_sub(n, Ordering::Relaxed);
            b.refused.fetch_add(1, Ordering::Relaxed);
            return false;
        }
        self.n += n;
        true
    }
}

impl Drop for BufferHold<'_> {
    fn drop(&mut self) {
        self.budget.used.fetch_sub(self.n, Ordering::Relaxed);
    }
}

/// hyper's own default: kept on the stack below this.
const DEFAULT_MAX_HEADERS: usize = 100;
/// hyper refuses (panics on) a smaller HTTP/1.1 read buffer.
const MIN_HEAD_BYTES: usize = 8192;

type HyperClient = Client<HttpsConnector<HttpConnector>, Full<Bytes>>;

/// The HTTP transport shared by every provider: a hyper 1 pooled client (hyper-util's
/// `client::legacy::Client`) over rustls with the `ring` crypto provider and the Mozilla
/// (webpki) root certificates (or the system's, see [`TlsRoots`]), HTTP/1.1 and HTTP/2 (ALPN), keep-alive, a connect timeout
/// and a bounded idle pool.
///
/// Build it **once** and hand the same value (it is a cheap `Clone`, an `Arc`) to every
/// provider: connections are pooled per scheme + host + port, so providers that point at
/// the same host share connections, and no request ever sets up TLS configuration or a
/// client of its own.
///
/// The client is always ready: it has no request limit of its own (put
/// `tower::limit::ConcurrencyLimit` above a provider to bound in-flight requests).
///
/// The crypto provider is passed explicitly, so no process-wide rustls `CryptoProvider`
/// needs installing.
///
/// ```
/// use llm_tower_providers::{HttpClient, HttpClientConfig};
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// let client = HttpClient::new(HttpClientConfig::default()).unwrap();
/// let same_pool = client.clone();
/// # let _ = same_pool;
/// # }
/// ```
#[derive(Clone)]
pub struct HttpClient {
    inner: Arc<HyperClient>,
    config: Arc<HttpClientConfig>,
    buffers: Arc<BufferBudget>,
}

impl HttpClient {
    /// Builds the client. Fails only if the TLS configuration cannot be built.
    ///
    /// Needs no runtime to build, but requests must run on a Tokio runtime.
    pub fn new(config: HttpClientConfig) -> Result<Self, LlmError> {
        let provider = rustls::crypto::ring::default_provider();
        let mut http = HttpConnector::new();
        // The HTTPS connector wraps this one; it handles `https://` itself.
        http.enforce_http(false);
        http.set_nodelay(true);
        http.set_connect_timeout(non_zero(config.connect_timeout_ms));
        http.set_keepalive(non_zero(config.tcp_keepalive_ms));
        let tls_error = |e: &dyn std::fmt::Display| {
            LlmError::internal(format!("cannot build the TLS configuration: {e}"))
        };
        let builder = hyper_rustls::HttpsConnectorBuilder::new();
        let builder = match config.tls_roots {
            TlsRoots::Webpki => builder
                .with_provider_and_webpki_roots(provider)
                .map_err(|e| tls_error(&e))?,
            #[cfg(feature = "native-roots")]
            TlsRoots::Native => builder
                .with_provider_and_native_roots(provider)
                .map_err(|e| tls_error(&e))?,
            #[cfg(not(feature = "native-roots"))]
            TlsRoots::Native => {
                return Err(tls_error(
                    &"`tls_roots = \"native\"` needs llm-tower-providers' `native-roots` feature",
                ));
            }
        };
        let https = builder
            .https_or_http()
            .enable_all_versions()
            .wrap_connector(http);
        let mut builder = Client::builder(TokioExecutor::new());
        builder
            .pool_timer(TokioTimer::new())
            .timer(TokioTimer::new())
            .pool_idle_timeout(non_zero(config.pool_idle_timeout_ms))
            .pool_max_idle_per_host(config.pool_max_idle_per_host)
            .http2_only(config.http2_only)
            // Fixed windows, not the adaptive ones (which start at 64 KiB): h2 refuses
            // to buffer unread DATA frames under 256 bytes past a budget of half the
            // connection window, and answers GOAWAY (ENHANCE_YOUR_CALM), failing every
            // stream of the connection. SSE events are such frames: with a 64 KiB window,
            // one client reading slowly could end the streams of all the others. 32 MiB
            // lets ~100 streams fill their 256 KiB window with small events first.
            .http2_initial_stream_window_size(H2_STREAM_WINDOW)
            .http2_initial_connection_window_size(H2_CONNECTION_WINDOW)
            .http1_max_buf_size(config.max_response_header_bytes.max(MIN_HEAD_BYTES))
            .http2_max_header_list_size(
                u32::try_from(config.max_response_header_bytes).unwrap_or(u32::MAX),
            );
        if config.max_response_headers != DEFAULT_MAX_HEADERS {
            builder.http1_max_headers(config.max_response_headers);
        }
        if let Some(interval) = non_zero(config.http2_keepalive_ms) {
            builder
                .http2_keep_alive_interval(interval)
                .http2_keep_alive_timeout(Duration::from_secs(20))
                .http2_keep_alive_while_idle(false);
        }
        let client = builder.build(https);
        Ok(Self {
            inner: Arc::new(client),
            buffers: Arc::new(BufferBudget::new(config.max_buffered_bytes)),
            config: Arc::new(config),
        })
    }

    /// A client with [`HttpClientConfig::default`].
    pub fn with_defaults() -> Result<Self, LlmError> {
        Self::new(HttpClientConfig::default())
    }

    /// The settings it was built with.
    pub fn config(&self) -> &HttpClientConfig {
        &self.config
    }

    /// Bytes of non-streamed answers being read now (see
    /// [`HttpClientConfig::max_buffered_bytes`]).
    pub fn buffered_bytes(&self) -> usize {
        self.buffers.used.load(Ordering::Relaxed)
    }

    /// Answers refused because [`HttpClientConfig::max_buffered_bytes`] was reached.
    pub fn buffer_refusals(&self) -> u64 {
        self.buffers.refused.load(Ordering::Relaxed)
    }

    pub(crate) fn buffers(&self) -> &BufferBudget {
        &self.buffers
    }

    /// Whether `other` shares this client's connection pool.
    pub fn shares_pool_with(&self, other: &HttpClient) -> bool {
        Arc::ptr_eq(&self.inner, &other.inner)
    }

    /// Sends one request through the pool.
    pub(crate) fn send(
        &self,
        req: http::Request<Full<Bytes>>,
    ) -> hyper_util::client::legacy::ResponseFuture {
        self.inner.request(req)
    }
}

impl fmt::Debug for HttpClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HttpClient")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

fn non_zero(ms: u64) -> Option<Duration> {
    (ms > 0).then(|| Duration::from_millis(ms))
}

/// The response type of the transport.
pub(crate) type HttpResponse = http::Response<Incoming>;
