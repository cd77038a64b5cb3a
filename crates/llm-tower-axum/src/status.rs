//! `GET /status`: the application's state as JSON, and a status page for a browser.
//!
//! The JSON comes from a [`StatusSource`] (the application decides what it holds: the
//! gateway puts breakers, cache, budgets, stores and [`Activity`](crate::Activity) in it).
//! The page is one HTML file with a small script, compiled into the binary: no build step,
//! no external request; it polls `/status` and draws what it finds.
//!
//! | route | answer |
//! |---|---|
//! | `GET /status` | JSON, or the page when the `Accept` header prefers `text/html` (a browser) |
//! | `GET /status.html` | the page |
//!
//! Access is the same as `/metrics` ([`MetricsAccess`]). The page itself holds no data,
//! so it loads without a token; its requests for the JSON carry the token given in the
//! page's address fragment (`/status.html#token=…`; a fragment is never sent to the
//! server, so it stays out of access logs).
//!
//! `?window=N` (minutes, 1–60, default 60) is passed to the source as
//! [`StatusQuery::window_minutes`].
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! use llm_tower_axum::{MetricsAccess, StatusSource, status_router};
//! use tower::ServiceExt;
//!
//! let source = StatusSource::new(|q| async move {
//!     serde_json::json!({ "window_minutes": q.window_minutes })
//! });
//! let app = status_router(MetricsAccess::public(), source);
//! let req = http::Request::get("/status?window=5").body(axum::body::Body::empty()).unwrap();
//! let resp = app.oneshot(req).await.unwrap();
//! assert_eq!(resp.status(), 200);
//! let body = axum::body::to_bytes(resp.into_body(), 1 << 16).await.unwrap();
//! assert_eq!(&body[..], br#"{"window_minutes":5}"#);
//! # }
//! ```

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::extract::State;
use axum::response::Response;
use axum::routing::get;
use http::{HeaderValue, StatusCode, header};

use crate::activity::MINUTES;
use crate::router::MetricsAccess;

/// The status page (HTML, CSS and script in one file).
pub const STATUS_PAGE: &str = include_str!("status.html");

/// What a request for the JSON asks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct StatusQuery {
    /// The window for sums, in minutes (1 to 60).
    pub window_minutes: u32,
}

type SourceFn =
    dyn Fn(StatusQuery) -> Pin<Box<dyn Future<Output = serde_json::Value> + Send>> + Send + Sync;

/// Produces the `/status` JSON. Cheap to clone.
#[derive(Clone)]
pub struct StatusSource(Arc<SourceFn>);

impl fmt::Debug for StatusSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("StatusSource")
    }
}

impl StatusSource {
    /// A source calling `f` for every request of the JSON.
    pub fn new<F, Fut>(f: F) -> Self
    where
        F: Fn(StatusQuery) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = serde_json::Value> + Send + 'static,
    {
        Self(Arc::new(move |q| Box::pin(f(q))))
    }

    /// The JSON for `query`.
    pub async fn get(&self, query: StatusQuery) -> serde_json::Value {
        (self.0)(query).await
    }
}

/// `?window=…&format=…` (other parameters are ignored).
#[derive(Debug, Default)]
struct Params<'a> {
    window: Option<&'a str>,
    format: Option<&'a str>,
}

impl<'a> Params<'a> {
    fn parse(query: Option<&'a str>) -> Self {
        let mut p = Self::default();
        for kv in query.unwrap_or("").split('&') {
            match kv.split_once('=') {
                Some(("window", v)) => p.window = Some(v),
                Some(("format", v)) => p.format = Some(v),
                _ => {}
            }
        }
        p
    }
}

#[derive(Clone)]
struct StatusState {
    access: MetricsAccess,
    source: StatusSource,
}

/// `GET /status` and `GET /status.html`; no routes when
/// `access` is [`MetricsAccess::off`]. Merge it into an [`OpenAiRouter`](crate::OpenAiRouter)
/// with `merge`, or serve it beside [`Metrics::router`](crate::Metrics::router).
pub fn status_router(access: MetricsAccess, source: StatusSource) -> Router {
    if access.is_off() {
        return Router::new();
    }
    Router::new()
        .route("/status", get(status))
        .route("/status.html", get(page))
        .with_state(StatusState { access, source })
}

fn wants_html(h: &http::HeaderMap) -> bool {
    // A browser's navigation lists text/html first; `fetch` and curl send `*/*` or JSON.
    h.get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|a| a.trim_start().starts_with("text/html"))
}

async fn page() -> Response {
    let mut resp = Response::new(Body::from(STATUS_PAGE));
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    // The page makes no request but to this origin; say so to the browser too.
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; \
             connect-src 'self'; img-src 'self' data:",
        ),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

async fn status(State(st): State<StatusState>, uri: http::Uri, h: http::HeaderMap) -> Response {
    let p = Params::parse(uri.query());
    if p.format != Some("json") && wants_html(&h) {
        return page().await;
    }
    if let Some(resp) = st.access.refuse(&h, "/status") {
        return resp;
    }
    let window_minutes = p
        .window
        .and_then(|w| w.trim_end_matches('m').parse::<u32>().ok())
        .unwrap_or(MINUTES)
        .clamp(1, MINUTES);
    let json = st.source.get(StatusQuery { window_minutes }).await;
    let body = serde_json::to_vec(&json).unwrap_or_else(|_| b"{}".to_vec());
    let mut resp = Response::new(Body::from(body));
    *resp.status_mut() = StatusCode::OK;
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

#[cfg(test)]
mod tests {
    use tower::ServiceExt;

    use super::*;

    fn source() -> StatusSource {
        StatusSource::new(|q| async move { serde_json::json!({ "w": q.window_minutes }) })
    }

    async fn get(app: &Router, uri: &str, headers: &[(&str, &str)]) -> (StatusCode, String) {
        let mut req = http::Request::get(uri);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let resp = app
            .clone()
            .oneshot(req.body(Body::empty()).unwrap())
            .await
            .unwrap();
        let status = resp.status();
        let body = axum::body::to_bytes(resp.into_body(), 1 << 20)
            .await
            .unwrap();
        (status, String::from_utf8_lossy(&body).into_owned())
    }

    #[tokio::test]
    async fn json_needs_the_metrics_token_and_the_page_does_not() {
        let app = status_router(MetricsAccess::bearer("tok"), source());
        let (s, _) = get(&app, "/status", &[]).await;
        assert_eq!(s, StatusCode::UNAUTHORIZED);
        let (s, body) = get(&app, "/status", &[("authorization", "Bearer tok")]).await;
        assert_eq!(s, StatusCode::OK);
        assert_eq!(body, r#"{"w":60}"#);
        let (s, body) = get(
            &app,
            "/status?window=5m",
            &[("authorization", "Bearer tok")],
        )
        .await;
        assert_eq!((s, body.as_str()), (StatusCode::OK, r#"{"w":5}"#));
        let (s, body) = get(
            &app,
            "/status?window=999",
            &[("authorization", "Bearer tok")],
        )
        .await;
        assert_eq!((s, body.as_str()), (StatusCode::OK, r#"{"w":60}"#));
        // A browser gets the page (no data in it) by content negotiation, or by name.
        let (s, body) = get(&app, "/status", &[("accept", "text/html,*/*")]).await;
        assert_eq!(s, StatusCode::OK);
        assert!(body.contains("<html"), "{body}");
        let (s, body) = get(&app, "/status.html", &[]).await;
        assert_eq!(s, StatusCode::OK);
        assert!(body.contains("<script>"));
        // format=json wins over Accept.
        let (s, _) = get(&app, "/status?format=json", &[("accept", "text/html")]).await;
        assert_eq!(s, StatusCode::UNAUTHORIZED);
    }

    #[tokio::test]
    async fn off_means_no_route() {
        let app = status_router(MetricsAccess::off(), source());
        let (s, _) = get(&app, "/status", &[]).await;
        assert_eq!(s, StatusCode::NOT_FOUND);
    }

    #[test]
    fn the_page_makes_no_external_request() {
        for needle in ["http://", "https://", "//cdn", "src=\"http"] {
            assert!(!STATUS_PAGE.contains(needle), "{needle}");
        }
    }
}
