//! Observing a request from inside the stack: the hook tracing uses.
//!
//! The HTTP surface (or an application) puts an [`Observer`] in a request's extensions;
//! layers that do something worth a point on the request's trace call
//! [`RequestObserver::event`] (a cache hit, a validation retry, a rate-limit wait), and
//! each upstream attempt reports its start and end through
//! [`RequestObserver::attempt`]. Nothing here depends on a tracing library: an
//! implementation maps the calls to OpenTelemetry spans (llm-tower-axum's `otel` feature)
//! or to anything else. Without an [`Observer`] in the request, none of it runs.
//!
//! An attempt's observer may put a [`TraceParent`] into the attempt's request: the
//! providers send it upstream as the W3C `traceparent` header.
//!
//! ```
//! use llm_tower_core::{
//!     AttemptEnd, AttemptObserver, ChatRequest, Message, ObserveEvent, Observer, RequestObserver,
//! };
//! use std::sync::{Arc, Mutex};
//!
//! #[derive(Default)]
//! struct Log(Mutex<Vec<String>>);
//! struct Attempt;
//! impl AttemptObserver for Attempt {
//!     fn finish(self: Box<Self>, _end: AttemptEnd<'_>) {}
//! }
//! impl RequestObserver for Log {
//!     fn event(&self, event: ObserveEvent<'_>) {
//!         self.0.lock().unwrap().push(format!("{event:?}"));
//!     }
//!     fn attempt(&self, provider: &str, _req: &mut ChatRequest) -> Box<dyn AttemptObserver> {
//!         self.0.lock().unwrap().push(format!("attempt {provider}"));
//!         Box::new(Attempt)
//!     }
//! }
//!
//! let log = Arc::new(Log::default());
//! let mut req = ChatRequest::new("m", vec![Message::user("hi")]);
//! req.extensions.insert(Observer::new(log.clone()));
//! if let Some(o) = req.extensions.get::<Observer>() {
//!     o.event(ObserveEvent::CacheHit);
//! }
//! assert_eq!(log.0.lock().unwrap()[0], "CacheHit");
//! ```

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use crate::{ChatRequest, LlmError, Usage};

/// Something a layer did that is worth a point in time on the request's trace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ObserveEvent<'a> {
    /// The answer came from the cache.
    CacheHit,
    /// The answer came from an identical request in flight at the same time.
    CacheCoalesced,
    /// The answer failed validation and the request is sent again with a format reminder.
    ValidationRetry {
        /// The retry's number (1 for the first retry).
        attempt: u32,
        /// The validation rule's label (the task type, or `"default"`).
        rule: &'a str,
    },
    /// A rate limit made the request wait before going on.
    RateLimitWait {
        /// How long it waits.
        wait: Duration,
    },
}

/// How an upstream attempt ended.
#[derive(Debug, Clone, Copy)]
#[non_exhaustive]
pub enum AttemptEnd<'a> {
    /// The attempt answered (a complete response, or a stream that ended cleanly).
    Answered {
        /// The model that served, as the upstream named it.
        model: Option<&'a str>,
        /// The usage the upstream reported.
        usage: Option<&'a Usage>,
        /// Each choice's finish reason, in order (`stop`, `length`, `tool_calls`…).
        finish_reasons: &'a [String],
    },
    /// The attempt failed (before an answer, or a stream that ended with an error).
    Failed {
        /// The error.
        error: &'a LlmError,
        /// The usage seen before the failure, if any.
        usage: Option<&'a Usage>,
    },
    /// The caller dropped the attempt (or its stream) before it ended.
    Dropped,
}

/// One upstream attempt being observed. Dropped without [`finish`](Self::finish), it was
/// abandoned (an implementation may record that on drop).
pub trait AttemptObserver: Send + 'static {
    /// The first chunk of a streamed answer arrived.
    fn first_chunk(&mut self) {}
    /// The attempt ended.
    fn finish(self: Box<Self>, end: AttemptEnd<'_>);
}

/// Receives what the stack does while serving one request (installed through an
/// [`Observer`]). Implementations must be cheap: they run on the request path.
pub trait RequestObserver: Send + Sync + 'static {
    /// A layer did something worth a point on the trace.
    fn event(&self, event: ObserveEvent<'_>);
    /// An upstream attempt to `provider` is about to be sent with `request`; the observer
    /// may add extensions to it (a [`TraceParent`]).
    fn attempt(&self, provider: &str, request: &mut ChatRequest) -> Box<dyn AttemptObserver>;
}

/// The request extension carrying a [`RequestObserver`] (cheap to clone).
#[derive(Clone)]
pub struct Observer(Arc<dyn RequestObserver>);

impl Observer {
    /// Wraps an observer.
    pub fn new(observer: Arc<dyn RequestObserver>) -> Self {
        Self(observer)
    }

    /// Reports `event`.
    pub fn event(&self, event: ObserveEvent<'_>) {
        self.0.event(event);
    }

    /// Starts observing an attempt (see [`RequestObserver::attempt`]).
    pub fn attempt(&self, provider: &str, request: &mut ChatRequest) -> Box<dyn AttemptObserver> {
        self.0.attempt(provider, request)
    }
}

impl fmt::Debug for Observer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Observer")
    }
}

/// The W3C trace context of an upstream attempt: providers send it as the `traceparent`
/// (and `tracestate`, when set) header of their HTTP request.
///
/// ```
/// use llm_tower_core::TraceParent;
/// let t = TraceParent::new(http::HeaderValue::from_static(
///     "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
/// ));
/// assert!(t.tracestate.is_none());
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraceParent {
    /// The `traceparent` header value.
    pub traceparent: http::HeaderValue,
    /// The `tracestate` header value, if any.
    pub tracestate: Option<http::HeaderValue>,
}

impl TraceParent {
    /// A trace context with no `tracestate`.
    pub fn new(traceparent: http::HeaderValue) -> Self {
        Self {
            traceparent,
            tracestate: None,
        }
    }

    /// Writes the headers into `headers`.
    pub fn write(&self, headers: &mut http::HeaderMap) {
        headers.insert(
            http::HeaderName::from_static("traceparent"),
            self.traceparent.clone(),
        );
        if let Some(s) = &self.tracestate {
            headers.insert(http::HeaderName::from_static("tracestate"), s.clone());
        }
    }
}
