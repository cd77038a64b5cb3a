//! The layer that gives every error response an OpenAI JSON body: empty ones (405, bare
//! status codes) and plain-text ones (axum extractor rejections in merged routers) alike.
//!
//! A layer of its own rather than `axum::middleware::map_response`: that one boxes an
//! async block per request and clones the inner service, on every answer, while only a
//! plain-text error body needs to be awaited. Here the response future is the inner one
//! until a plain-text error shows up.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use axum::extract::Request;
use axum::response::Response;
use http::header;
use http_body_util::BodyExt;
use tower::{Layer, Service};

use super::keep_headers;
use crate::error::status_response;

/// Largest plain-text error body rewritten into JSON (axum rejections are short).
const MAX_REWRITTEN_ERROR: usize = 16 * 1024;

/// Applies [`JsonErrors`].
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct JsonErrorsLayer;

impl<S> Layer<S> for JsonErrorsLayer {
    type Service = JsonErrors<S>;

    fn layer(&self, inner: S) -> Self::Service {
        JsonErrors { inner }
    }
}

/// Rewrites error responses that are empty or plain text into OpenAI error JSON; any other
/// response passes as it is.
#[derive(Debug, Clone)]
pub(crate) struct JsonErrors<S> {
    inner: S,
}

impl<S> Service<Request> for JsonErrors<S>
where
    S: Service<Request, Response = Response, Error = Infallible>,
{
    type Response = Response;
    type Error = Infallible;
    type Future = JsonErrorsFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request) -> Self::Future {
        JsonErrorsFuture {
            state: State::Inner {
                future: self.inner.call(req),
            },
        }
    }
}

type BoxResponseFuture = Pin<Box<dyn Future<Output = Response> + Send + 'static>>;

pin_project_lite::pin_project! {
    /// The response future of [`JsonErrors`].
    pub(crate) struct JsonErrorsFuture<F> {
        #[pin]
        state: State<F>,
    }
}

pin_project_lite::pin_project! {
    #[project = StateProj]
    enum State<F> {
        Inner { #[pin] future: F },
        // Reading a plain-text error body to put it into JSON.
        Text { future: BoxResponseFuture },
    }
}

impl<F> Future for JsonErrorsFuture<F>
where
    F: Future<Output = Result<Response, Infallible>>,
{
    type Output = Result<Response, Infallible>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        loop {
            match self.as_mut().project().state.project() {
                StateProj::Inner { future } => {
                    let resp = match ready!(future.poll(cx)) {
                        Ok(resp) => resp,
                        Err(never) => match never {},
                    };
                    match rewrite_now(resp) {
                        Rewrite::Done(resp) => return Poll::Ready(Ok(resp)),
                        Rewrite::Text(text) => {
                            let future: BoxResponseFuture = Box::pin(rewrite_text(text));
                            self.as_mut().project().state.set(State::Text { future });
                        }
                    }
                }
                StateProj::Text { future } => return future.as_mut().poll(cx).map(Ok),
            }
        }
    }
}

enum Rewrite {
    /// The response itself, or its JSON rewrite when that needs no body.
    Done(Response),
    /// An error with a plain-text body, to be read by [`rewrite_text`].
    Text(Response),
}

fn rewrite_now(resp: Response) -> Rewrite {
    let status = resp.status();
    if !(status.is_client_error() || status.is_server_error()) {
        return Rewrite::Done(resp);
    }
    let Some(ct) = resp.headers().get(header::CONTENT_TYPE) else {
        let (parts, _) = resp.into_parts();
        let mut out = status_response(status, status.canonical_reason().unwrap_or("error"));
        keep_headers(&parts.headers, &mut out);
        return Rewrite::Done(out);
    };
    let is_text = ct
        .to_str()
        .is_ok_and(|ct| ct.to_ascii_lowercase().starts_with("text/plain"));
    if is_text {
        Rewrite::Text(resp)
    } else {
        Rewrite::Done(resp)
    }
}

/// An error with a plain-text body, with that text (up to [`MAX_REWRITTEN_ERROR`] bytes) as
/// its JSON error message.
async fn rewrite_text(resp: Response) -> Response {
    let status = resp.status();
    let (parts, body) = resp.into_parts();
    let text = match http_body_util::Limited::new(body, MAX_REWRITTEN_ERROR)
        .collect()
        .await
    {
        Ok(c) => String::from_utf8_lossy(&c.to_bytes()).trim().to_owned(),
        Err(_) => String::new(),
    };
    let mut out = status_response(
        status,
        if text.is_empty() {
            status.canonical_reason().unwrap_or("error").to_owned()
        } else {
            text
        },
    );
    keep_headers(&parts.headers, &mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;
    use http::{HeaderValue, StatusCode};
    use tower::ServiceExt;

    async fn through(resp: fn() -> Response) -> (StatusCode, http::HeaderMap, String) {
        let svc = JsonErrorsLayer.layer(tower::service_fn(move |_req: Request| async move {
            Ok::<_, Infallible>(resp())
        }));
        let out = svc.oneshot(Request::new(Body::empty())).await.unwrap();
        let (parts, body) = out.into_parts();
        let body = body.collect().await.unwrap().to_bytes();
        (
            parts.status,
            parts.headers,
            String::from_utf8(body.to_vec()).unwrap(),
        )
    }

    fn with(status: StatusCode, ct: Option<&'static str>, body: &'static str) -> Response {
        let mut r = Response::new(Body::from(body));
        *r.status_mut() = status;
        if let Some(ct) = ct {
            r.headers_mut()
                .insert(header::CONTENT_TYPE, HeaderValue::from_static(ct));
        }
        r.headers_mut()
            .insert("x-kept", HeaderValue::from_static("yes"));
        r
    }

    #[tokio::test]
    async fn success_and_json_errors_pass_as_they_are() {
        let (status, _, body) = through(|| with(StatusCode::OK, Some("text/plain"), "fine")).await;
        assert_eq!((status, body.as_str()), (StatusCode::OK, "fine"));
        let (status, _, body) = through(|| {
            with(
                StatusCode::BAD_REQUEST,
                Some("application/json"),
                r#"{"error":{}}"#,
            )
        })
        .await;
        assert_eq!(
            (status, body.as_str()),
            (StatusCode::BAD_REQUEST, r#"{"error":{}}"#)
        );
    }

    #[tokio::test]
    async fn an_empty_error_gets_its_reason_as_json() {
        let (status, headers, body) =
            through(|| with(StatusCode::METHOD_NOT_ALLOWED, None, "")).await;
        assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(headers["content-type"], "application/json");
        assert_eq!(headers["x-kept"], "yes");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["error"]["message"], "Method Not Allowed");
    }

    #[tokio::test]
    async fn a_plain_text_error_becomes_its_message() {
        let (status, headers, body) = through(|| {
            with(
                StatusCode::UNPROCESSABLE_ENTITY,
                Some("Text/Plain; charset=utf-8"),
                " missing field `x` \n",
            )
        })
        .await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
        assert_eq!(headers["content-type"], "application/json");
        assert_eq!(headers["x-kept"], "yes");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["error"]["message"], "missing field `x`");
    }
}
