//! Client-key authentication (see [`AuthLayer`]).

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use axum::response::Response;
use http::{Request, header};
use llm_tower_core::{LlmError, Tenant};
use serde::Deserialize;
use tower::{Layer, Service};

use crate::error_response;

/// The header Anthropic's clients send their key in.
const X_API_KEY: http::HeaderName = http::HeaderName::from_static("x-api-key");

/// The tenant given to every request when no client keys are configured.
pub const ANONYMOUS_TENANT: &str = "anonymous";

/// One configured client key and the tenant it stands for (a config-file entry:
/// `{ key = "...", tenant = "..." }`). Its `Debug` output redacts the key.
#[derive(Clone, Deserialize)]
pub struct ClientKey {
    /// The secret the client sends as `Authorization: Bearer <key>`.
    pub key: String,
    /// The tenant requests with this key are made for.
    pub tenant: String,
}

impl ClientKey {
    /// A key for `tenant`.
    pub fn new(key: impl Into<String>, tenant: impl Into<String>) -> Self {
        Self {
            key: key.into(),
            tenant: tenant.into(),
        }
    }
}

impl fmt::Debug for ClientKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientKey")
            .field("key", &"<redacted>")
            .field("tenant", &self.tenant)
            .finish()
    }
}

/// The set of accepted client keys, each mapped to a [`Tenant`]. Only digests are kept.
/// Empty means authentication is off.
#[derive(Clone, Default)]
pub struct ClientKeys {
    // BLAKE3 digest of the key → tenant. `blake3::Hash: PartialEq` is constant-time, and
    // the map's bucket choice depends only on the digest, which reveals nothing usable
    // about any key.
    keys: HashMap<blake3::Hash, Tenant>,
}

impl ClientKeys {
    /// No keys: authentication off.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `key` for `tenant` (a later duplicate key replaces the earlier tenant).
    #[must_use]
    pub fn with_key(mut self, key: impl AsRef<[u8]>, tenant: impl Into<Tenant>) -> Self {
        self.insert(key, tenant);
        self
    }

    /// Adds `key` for `tenant`.
    pub fn insert(&mut self, key: impl AsRef<[u8]>, tenant: impl Into<Tenant>) {
        self.keys.insert(blake3::hash(key.as_ref()), tenant.into());
    }

    /// Adds a key known only by its BLAKE3 digest (32 bytes), so a config file never has
    /// to hold the key itself (used by the gateway's `key_blake3`).
    pub fn insert_digest(&mut self, digest: [u8; 32], tenant: impl Into<Tenant>) {
        self.keys
            .insert(blake3::Hash::from_bytes(digest), tenant.into());
    }

    /// Number of configured keys.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// Whether no key is configured (authentication off).
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// The tenant of `presented`, if it is a configured key.
    pub fn tenant_for(&self, presented: &[u8]) -> Option<&Tenant> {
        self.keys.get(&blake3::hash(presented))
    }
}

impl FromIterator<ClientKey> for ClientKeys {
    fn from_iter<I: IntoIterator<Item = ClientKey>>(iter: I) -> Self {
        let mut keys = Self::new();
        for k in iter {
            keys.insert(k.key.as_bytes(), k.tenant);
        }
        keys
    }
}

impl<K: AsRef<[u8]>, T: Into<Tenant>> FromIterator<(K, T)> for ClientKeys {
    fn from_iter<I: IntoIterator<Item = (K, T)>>(iter: I) -> Self {
        let mut keys = Self::new();
        for (k, t) in iter {
            keys.insert(k, t);
        }
        keys
    }
}

impl fmt::Debug for ClientKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientKeys")
            .field("keys", &self.keys.len())
            .finish_non_exhaustive()
    }
}

/// Why a request was refused (kept apart from the response so the message never echoes
/// what the client sent).
fn check(keys: &ClientKeys, headers: &http::HeaderMap) -> Result<Tenant, LlmError> {
    if keys.is_empty() {
        return Ok(Tenant::from(ANONYMOUS_TENANT));
    }
    let Some(value) = headers.get(header::AUTHORIZATION) else {
        // Anthropic's clients send the key as `x-api-key`.
        if let Some(key) = headers.get(&X_API_KEY) {
            return keys
                .tenant_for(key.as_bytes().trim_ascii())
                .cloned()
                .ok_or_else(|| LlmError::auth("Incorrect API key provided."));
        }
        return Err(LlmError::auth(
            "Missing API key: send it as `Authorization: Bearer <key>` or `x-api-key: <key>`.",
        ));
    };
    let bytes = value.as_bytes();
    let token = match bytes.get(..7) {
        Some(scheme) if scheme.eq_ignore_ascii_case(b"bearer ") => bytes[7..].trim_ascii(),
        _ => {
            return Err(LlmError::auth(
                "Malformed Authorization header: expected `Bearer <key>`.",
            ));
        }
    };
    keys.tenant_for(token)
        .cloned()
        .ok_or_else(|| LlmError::auth("Incorrect API key provided."))
}

/// Client-key authentication: `Authorization: Bearer <key>` (or `x-api-key: <key>`, as
/// Anthropic's clients send it) → [`Tenant`].
///
/// `AuthLayer` is an ordinary tower layer over axum services: it looks the presented key
/// up among the configured [`ClientKeys`], answers `401` with an OpenAI error body when it
/// is missing or wrong, and otherwise inserts the key's [`Tenant`] into the request
/// extensions, where handlers read it with `Extension<Tenant>`. The chat route copies it
/// into the [`ChatRequest`](llm_tower_core::ChatRequest) extensions; a jobs router wrapped
/// in the same layer gets the same tenant.
///
/// The tenant always comes from the key, never from a header: any client-sent value is
/// ignored. With **no keys configured, authentication is off**: every request passes and
/// gets the tenant [`ANONYMOUS_TENANT`] (`"anonymous"`).
///
/// Keys are stored only as BLAKE3 digests and compared through `blake3::Hash`'s
/// constant-time equality; they never appear in `Debug` output, logs or errors.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// use axum::{Extension, Router, routing::get};
/// use llm_tower_axum::{AuthLayer, ClientKeys};
/// use llm_tower_core::Tenant;
/// use tower::ServiceExt;
///
/// let keys = ClientKeys::new().with_key("sk-team-a", "team-a");
/// let app = Router::new()
///     .route("/whoami", get(|Extension(t): Extension<Tenant>| async move { t.to_string() }))
///     .layer(AuthLayer::new(keys));
///
/// let req = http::Request::get("/whoami")
///     .header("authorization", "Bearer sk-team-a")
///     .body(axum::body::Body::empty())
///     .unwrap();
/// let resp = app.clone().oneshot(req).await.unwrap();
/// assert_eq!(resp.status(), 200);
///
/// let req = http::Request::get("/whoami").body(axum::body::Body::empty()).unwrap();
/// assert_eq!(app.oneshot(req).await.unwrap().status(), 401);
/// # }
/// ```
///
/// # Clone
///
/// Cheap: the keys are shared behind an `Arc`, so one `AuthLayer` can wrap several
/// routers (chat, jobs) with the same keys.
#[derive(Clone)]
pub struct AuthLayer {
    keys: Arc<ClientKeys>,
}

impl AuthLayer {
    /// A layer accepting `keys` (empty: authentication off, tenant `"anonymous"`).
    pub fn new(keys: ClientKeys) -> Self {
        Self {
            keys: Arc::new(keys),
        }
    }

    /// Whether this layer checks keys (false when none are configured).
    pub fn is_enabled(&self) -> bool {
        !self.keys.is_empty()
    }
}

impl fmt::Debug for AuthLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AuthLayer")
            .field("keys", &self.keys)
            .finish()
    }
}

impl<S> Layer<S> for AuthLayer {
    type Service = Auth<S>;

    fn layer(&self, inner: S) -> Auth<S> {
        Auth {
            inner,
            keys: self.keys.clone(),
        }
    }
}

/// The authentication service made by [`AuthLayer`].
///
/// See [`AuthLayer`]. Readiness: delegates `poll_ready` to the inner service; a refused request never
/// reaches it.
#[derive(Clone)]
pub struct Auth<S> {
    inner: S,
    keys: Arc<ClientKeys>,
}

impl<S> fmt::Debug for Auth<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Auth")
            .field("keys", &self.keys)
            .finish_non_exhaustive()
    }
}

impl<S, B> Service<Request<B>> for Auth<S>
where
    S: Service<Request<B>, Response = Response>,
{
    type Response = Response;
    type Error = S::Error;
    type Future = AuthFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        match check(&self.keys, req.headers()) {
            Ok(tenant) => {
                tracing::Span::current().record("tenant", tracing::field::display(&tenant));
                req.extensions_mut().insert(tenant);
                AuthFuture {
                    kind: Kind::Inner {
                        future: self.inner.call(req),
                    },
                }
            }
            Err(e) => {
                tracing::debug!(reason = e.message(), "client key refused");
                let mut resp = if crate::messages::is_messages_path(req.uri().path()) {
                    crate::messages::error_response(&e)
                } else {
                    error_response(&e)
                };
                resp.headers_mut().insert(
                    header::WWW_AUTHENTICATE,
                    http::HeaderValue::from_static("Bearer"),
                );
                AuthFuture {
                    kind: Kind::Refused {
                        response: Some(resp),
                    },
                }
            }
        }
    }
}

pin_project_lite::pin_project! {
    /// The response future of [`Auth`].
    pub struct AuthFuture<F> {
        #[pin]
        kind: Kind<F>,
    }
}

pin_project_lite::pin_project! {
    #[project = KindProj]
    enum Kind<F> {
        Inner { #[pin] future: F },
        Refused { response: Option<Response> },
    }
}

impl<F> fmt::Debug for AuthFuture<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("AuthFuture")
    }
}

impl<F, E> Future for AuthFuture<F>
where
    F: Future<Output = Result<Response, E>>,
{
    type Output = Result<Response, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().kind.project() {
            KindProj::Inner { future } => future.poll(cx),
            KindProj::Refused { response } => match response.take() {
                Some(r) => Poll::Ready(Ok(r)),
                None => Poll::Ready(Ok(crate::error::status_response(
                    http::StatusCode::INTERNAL_SERVER_ERROR,
                    "auth future polled after completion",
                ))),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderMap;

    fn headers(auth: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::AUTHORIZATION, auth.parse().unwrap());
        h
    }

    #[test]
    fn keys_map_to_tenants() {
        let keys = ClientKeys::new().with_key("k1", "a").with_key("k2", "b");
        assert_eq!(check(&keys, &headers("Bearer k1")).unwrap().as_str(), "a");
        assert_eq!(check(&keys, &headers("bearer  k2 ")).unwrap().as_str(), "b");
        assert!(check(&keys, &headers("Bearer k3")).is_err());
        assert!(check(&keys, &headers("Basic k1")).is_err());
        assert!(check(&keys, &headers("Bearer")).is_err());
        assert!(check(&keys, &HeaderMap::new()).is_err());
        let mut h = HeaderMap::new();
        h.insert("x-api-key", "k2".parse().unwrap());
        assert_eq!(check(&keys, &h).unwrap().as_str(), "b");
        h.insert("x-api-key", "k9".parse().unwrap());
        assert!(check(&keys, &h).is_err());
        // `Authorization` wins when both are sent.
        h.insert(header::AUTHORIZATION, "Bearer k1".parse().unwrap());
        assert_eq!(check(&keys, &h).unwrap().as_str(), "a");
    }

    #[test]
    fn digest_only_keys_work() {
        let mut keys = ClientKeys::new();
        keys.insert_digest(*blake3::hash(b"sk-digest").as_bytes(), "d");
        assert_eq!(
            check(&keys, &headers("Bearer sk-digest")).unwrap().as_str(),
            "d"
        );
        assert!(check(&keys, &headers("Bearer sk-other")).is_err());
    }

    #[test]
    fn no_keys_means_anonymous() {
        let keys = ClientKeys::new();
        assert_eq!(
            check(&keys, &HeaderMap::new()).unwrap().as_str(),
            ANONYMOUS_TENANT
        );
    }

    #[test]
    fn debug_never_shows_keys() {
        let k = ClientKey::new("sk-secret-123", "t");
        assert!(!format!("{k:?}").contains("sk-secret"));
        let keys: ClientKeys = [k].into_iter().collect();
        assert!(!format!("{keys:?}").contains("sk-secret"));
        assert!(!format!("{:?}", AuthLayer::new(keys)).contains("sk-secret"));
    }
}
