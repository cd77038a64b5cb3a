//! [`OpenAiRouter`]: the consuming builder of the OpenAI-compatible axum `Router`.

use std::any::Any;
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::response::Response;
use axum::routing::{get, post};
use bytes::Bytes;
use http::{HeaderValue, Method, StatusCode, Uri, header};
use http_body_util::BodyExt;
use llm_tower_core::{
    BoxableLlmService, CacheStatus, ChatRequest, ChatResponse, Dialect, LlmError, LlmResponse,
    ResponseBody, ResponseMeta, Tenant, Usage,
};
use serde::Serialize;
use tower::{ServiceBuilder, ServiceExt};
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::request_id::{
    MakeRequestId, PropagateRequestIdLayer, RequestId, SetRequestIdLayer,
};
use tracing::Instrument;

use crate::activity::Activity;
use crate::auth::{AuthLayer, ClientKeys};
use crate::error::{error_response, status_response};
use crate::headers::{self, X_REQUEST_ID};
use crate::metrics::{FailedAttempt, Labels, Metrics, Observation};
use crate::sse::SseStream;

mod embeddings;
mod errors;

/// Default request body limit: 4 MiB.
pub const DEFAULT_BODY_LIMIT: usize = 4 * 1024 * 1024;

/// One entry of `GET /v1/models`: a model, or an alias standing for one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ModelEntry {
    /// The name clients send as `model`.
    pub id: String,
    /// The `owned_by` field (`"llm-tower"` unless set).
    pub owned_by: String,
    /// For an alias: the model it stands for (a non-standard `alias_for` field).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub alias_for: Option<String>,
}

impl ModelEntry {
    /// A model named `id`.
    pub fn new(id: impl Into<String>) -> Self {
        Self {
            id: id.into(),
            owned_by: "llm-tower".into(),
            alias_for: None,
        }
    }

    /// An alias `id` for `target`.
    pub fn alias(id: impl Into<String>, target: impl Into<String>) -> Self {
        Self {
            alias_for: Some(target.into()),
            ..Self::new(id)
        }
    }

    /// Sets `owned_by` (the provider, say).
    #[must_use]
    pub fn owned_by(mut self, owner: impl Into<String>) -> Self {
        self.owned_by = owner.into();
        self
    }
}

impl<T: Into<String>> From<T> for ModelEntry {
    fn from(id: T) -> Self {
        Self::new(id)
    }
}

/// Makes `x-request-id` values: time-ordered UUID v7s.
#[derive(Debug, Clone, Copy, Default)]
pub struct MakeRequestUuidV7;

impl MakeRequestId for MakeRequestUuidV7 {
    fn make_request_id<B>(&mut self, _request: &http::Request<B>) -> Option<RequestId> {
        // Encoded on the stack: no `fmt` machinery and no `String` per request.
        let mut buf = [0u8; uuid::fmt::Hyphenated::LENGTH];
        let id = uuid::Uuid::now_v7().hyphenated().encode_lower(&mut buf);
        HeaderValue::from_str(id).ok().map(RequestId::new)
    }
}

/// The consuming builder of the OpenAI-compatible `Router` over the LLM service `S`.
///
/// Routes of [`into_router`](Self::into_router):
///
/// | route | auth | answer |
/// |---|---|---|
/// | `POST /v1/chat/completions` | yes | JSON, or SSE when `"stream": true` |
/// | `POST /v1/embeddings` | yes | through the same service, as a [`ChatRequest::embeddings`] envelope |
/// | `POST /v1/messages` | yes | Anthropic Messages: JSON, or Anthropic's SSE events; Anthropic-format errors |
/// | `POST /v1/messages/count_tokens` | yes | `{"input_tokens": n}` (see [`count_tokens`](Self::count_tokens)) |
/// | `POST /v1/responses` | yes | OpenAI Responses: JSON, or its typed SSE events; `store` / `previous_response_id` (see [`response_store`](Self::response_store)) |
/// | `GET`, `DELETE /v1/responses/{id}` | yes | a stored response of the caller's tenant |
/// | `GET /v1/responses/{id}/input_items` | yes | its input items, paged (`limit`, `order`, `after`) |
/// | `GET /v1/models` | yes | the configured [`models`](Self::models) |
/// | `GET /healthz` | no | `{"status":"ok"}` |
/// | `GET /metrics` | see [`metrics_access`](Self::metrics_access) | Prometheus text ([`Metrics::render`]); 404 when disabled |
/// | anything else | — | 404 (405 for a wrong method), OpenAI error JSON |
///
/// Every response carries `x-request-id` (the client's, or a new UUID v7). Every error,
/// including from routers added with [`merge`](Self::merge), has an OpenAI error body;
/// a panicking handler gives a 500 with one.
///
/// Readiness: each request drives a clone of `S` to readiness inside its own future
/// (axum's model), so a service that is not ready delays requests, never the router.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// use llm_tower_axum::{ClientKeys, ModelEntry, OpenAiRouter};
/// use llm_tower_core::{ChatRequest, ChatResponse, LlmError, LlmResponse};
/// use tower::ServiceExt;
///
/// let llm = tower::service_fn(|req: ChatRequest| async move {
///     Ok::<_, LlmError>(LlmResponse::complete(ChatResponse::from_text(req.model, "Hello!")))
/// });
/// let app = OpenAiRouter::new(llm)
///     .models([ModelEntry::new("gpt-4o-mini"), ModelEntry::alias("fast", "gpt-4o-mini")])
///     .client_keys(ClientKeys::new().with_key("sk-1", "team-a"))
///     .body_limit(1 << 20)
///     .into_router();
///
/// let req = http::Request::post("/v1/chat/completions")
///     .header("authorization", "Bearer sk-1")
///     .header("content-type", "application/json")
///     .body(axum::body::Body::from(r#"{"model":"fast","messages":[{"role":"user","content":"Hi"}]}"#))
///     .unwrap();
/// let resp = app.oneshot(req).await.unwrap();
/// assert_eq!(resp.status(), 200);
/// assert!(resp.headers().contains_key("x-request-id"));
/// # }
/// ```
pub struct OpenAiRouter<S> {
    service: S,
    models: Vec<ModelEntry>,
    auth: AuthLayer,
    body_limit: usize,
    metrics: Metrics,
    metrics_access: MetricsAccess,
    known_tasks: Option<Arc<Names>>,
    known_models: Option<Arc<Names>>,
    activity: Option<Activity>,
    protected: Vec<Router>,
    public: Vec<Router>,
    #[cfg(feature = "otel")]
    otel: Option<crate::otel::OtelTracing>,
    count_tokens: Option<crate::messages::CountTokens>,
    responses: Option<crate::responses::ResponseStorage>,
}

impl<S> fmt::Debug for OpenAiRouter<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OpenAiRouter")
            .field("models", &self.models)
            .field("auth", &self.auth)
            .field("body_limit", &self.body_limit)
            .field("metrics", &self.metrics)
            .field("metrics_access", &self.metrics_access)
            .field("known_tasks", &self.known_tasks.as_ref().map(|n| n.len()))
            .field("known_models", &self.known_models.as_ref().map(|n| n.len()))
            .field("merged", &(self.protected.len() + self.public.len()))
            .finish_non_exhaustive()
    }
}

impl<S> OpenAiRouter<S>
where
    S: BoxableLlmService,
{
    /// A router over `service` with no models listed, authentication off (tenant
    /// `"anonymous"`), a 4 MiB body limit and a private Prometheus recorder.
    pub fn new(service: S) -> Self {
        Self {
            service,
            models: Vec::new(),
            auth: AuthLayer::new(ClientKeys::new()),
            body_limit: DEFAULT_BODY_LIMIT,
            metrics: Metrics::prometheus(),
            metrics_access: MetricsAccess::default(),
            known_tasks: None,
            known_models: None,
            activity: None,
            protected: Vec::new(),
            public: Vec::new(),
            #[cfg(feature = "otel")]
            otel: None,
            count_tokens: None,
            responses: None,
        }
    }

    /// Where `POST /v1/responses` keeps the responses it answers with `store` (the
    /// default), for `previous_response_id`, `GET` and `DELETE /v1/responses/{id}`;
    /// each is kept for `retention`. Without a store, `store` is ignored and a
    /// `previous_response_id` is not found.
    #[must_use]
    pub fn response_store(
        mut self,
        store: Arc<dyn llm_tower_core::dialect::responses::ResponseStore>,
        retention: std::time::Duration,
    ) -> Self {
        self.responses = Some(crate::responses::ResponseStorage::new(store, retention));
        self
    }

    /// OpenTelemetry GenAI spans and metrics for every chat and Messages request (feature `otel`; see
    /// [`crate::otel`]).
    #[cfg(feature = "otel")]
    #[cfg_attr(docsrs, doc(cfg(feature = "otel")))]
    #[must_use]
    pub fn otel(mut self, otel: crate::otel::OtelTracing) -> Self {
        self.otel = Some(otel);
        self
    }

    /// How `POST /v1/messages/count_tokens` counts: `counter` gets the request's chat
    /// view (its [`NativeRequest`](llm_tower_core::NativeRequest) included) and answers the
    /// input token count. Default: an estimate from the text length
    /// ([`estimate_input_tokens`](llm_tower_core::dialect::messages::estimate_input_tokens)).
    #[must_use]
    pub fn count_tokens(mut self, counter: crate::messages::CountTokens) -> Self {
        self.count_tokens = Some(counter);
        self
    }

    /// The models and aliases `GET /v1/models` lists (replaces earlier ones).
    #[must_use]
    pub fn models<I>(mut self, models: I) -> Self
    where
        I: IntoIterator,
        I::Item: Into<ModelEntry>,
    {
        self.models = models.into_iter().map(Into::into).collect();
        self
    }

    /// The client keys; requests to `/v1/*` without one of them get 401. Empty (the
    /// default): authentication off, tenant `"anonymous"`.
    #[must_use]
    pub fn client_keys(mut self, keys: ClientKeys) -> Self {
        self.auth = AuthLayer::new(keys);
        self
    }

    /// Uses this authentication layer (share one with another router, e.g. jobs).
    #[must_use]
    pub fn auth(mut self, auth: AuthLayer) -> Self {
        self.auth = auth;
        self
    }

    /// The authentication layer in use, to wrap other routers with the same keys.
    pub fn auth_layer(&self) -> AuthLayer {
        self.auth.clone()
    }

    /// Largest accepted chat request body, in bytes (default 4 MiB); bigger gets 413.
    #[must_use]
    pub fn body_limit(mut self, bytes: usize) -> Self {
        self.body_limit = bytes;
        self
    }

    /// Where metrics go and what `/metrics` renders (default [`Metrics::prometheus`]).
    #[must_use]
    pub fn metrics(mut self, metrics: Metrics) -> Self {
        self.metrics = metrics;
        self
    }

    /// Who may read `GET /metrics` on this router (default [`MetricsAccess::public`]).
    /// Serve [`Metrics::router`] on a listener of its own with [`MetricsAccess::off`] here.
    #[must_use]
    pub fn metrics_access(mut self, access: MetricsAccess) -> Self {
        self.metrics_access = access;
        self
    }

    /// The task names the application knows (routes, validators, cache TTLs, budgets,
    /// limits). Any other `x-llm-task` is replaced by [`OTHER`](headers::OTHER) before the
    /// request reaches a handler (merged routers included), so the names clients make up
    /// cannot grow metrics, cost totals, cache scopes, limits or budgets. Without this
    /// (the default) task names pass as sent.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// use llm_tower_axum::OpenAiRouter;
    /// use llm_tower_core::{ChatRequest, ChatResponse, LlmError, LlmResponse};
    /// use tower::ServiceExt;
    ///
    /// let llm = tower::service_fn(|req: ChatRequest| async move {
    ///     let task = req.task_type().map(|t| t.as_str().to_owned()).unwrap_or_default();
    ///     Ok::<_, LlmError>(LlmResponse::complete(ChatResponse::from_text(req.model, task)))
    /// });
    /// let app = OpenAiRouter::new(llm).known_tasks(["classify"]).into_router();
    /// let req = http::Request::post("/v1/chat/completions")
    ///     .header("x-llm-task", "made-up-1234")
    ///     .body(axum::body::Body::from(r#"{"model":"m","messages":[{"role":"user","content":"Hi"}]}"#))
    ///     .unwrap();
    /// let resp = app.oneshot(req).await.unwrap();
    /// let body = axum::body::to_bytes(resp.into_body(), 1 << 16).await.unwrap();
    /// assert!(String::from_utf8_lossy(&body).contains(r#""content":"other""#));
    /// # }
    /// ```
    #[must_use]
    pub fn known_tasks<I>(mut self, tasks: I) -> Self
    where
        I: IntoIterator,
        I::Item: AsRef<str>,
    {
        self.known_tasks = Some(Arc::new(names(tasks)));
        self
    }

    /// The model names the application knows (aliases, routed models, priced models). The
    /// `model` label of the metrics is one of them or [`OTHER`](headers::OTHER): clients
    /// choose the requested model, and some upstreams echo it. The served model labels the
    /// request when it is known, else the requested model's label stays. The request itself
    /// is not changed. Without this (the default) model labels are recorded as sent (up to the
    /// registry's cap of label sets).
    #[must_use]
    pub fn known_models<I>(mut self, models: I) -> Self
    where
        I: IntoIterator,
        I::Item: AsRef<str>,
    {
        self.known_models = Some(Arc::new(names(models)));
        self
    }

    /// Also records every finished request into `activity` (windowed sums for `/status`).
    #[must_use]
    pub fn activity(mut self, activity: Activity) -> Self {
        self.activity = Some(activity);
        self
    }

    /// Adds routes **behind the authentication layer** (the jobs router): its handlers
    /// read `Extension<Tenant>`. They also get the request id, panic protection and
    /// OpenAI-format errors. The router must not set its own fallback.
    #[must_use]
    pub fn merge_authenticated(mut self, router: Router) -> Self {
        self.protected.push(router);
        self
    }

    /// Adds routes without authentication (they still get the request id, panic
    /// protection and OpenAI-format errors). The router must not set its own fallback.
    #[must_use]
    pub fn merge(mut self, router: Router) -> Self {
        self.public.push(router);
        self
    }

    /// Builds the `Router`.
    pub fn into_router(self) -> Router {
        let created = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let models = models_json(&self.models, created);
        let metrics_route = self.metrics.router(self.metrics_access);
        #[cfg(feature = "otel")]
        let otel = self.otel.map(|cfg| {
            let known = self.known_models.clone();
            Arc::new(crate::otel::Otel {
                cfg,
                model_label: Box::new(move |m: &str| match &known {
                    None => m.into(),
                    Some(k) => k.get(m).unwrap_or(&OTHER_LABEL).clone(),
                }),
            })
        });
        let state = Arc::new(AppState {
            service: self.service,
            body_limit: self.body_limit,
            metrics: self.metrics,
            models,
            known_models: self.known_models,
            #[cfg(feature = "otel")]
            otel,
            activity: self.activity,
            count_tokens: self.count_tokens,
            responses: self.responses,
        });

        let mut protected: Router = Router::new()
            .route("/v1/chat/completions", post(chat::<S>))
            .route("/v1/embeddings", post(embeddings::embeddings::<S>))
            .route("/v1/models", get(list_models::<S>))
            .route("/v1/messages", post(crate::messages::messages::<S>))
            .route(
                "/v1/messages/count_tokens",
                post(crate::messages::count_tokens::<S>),
            )
            .route("/v1/responses", post(crate::responses::create::<S>))
            .route(
                "/v1/responses/{id}",
                get(crate::responses::retrieve::<S>).delete(crate::responses::delete::<S>),
            )
            .route(
                "/v1/responses/{id}/input_items",
                get(crate::responses::input_items::<S>),
            )
            .with_state(state);
        for r in self.protected {
            protected = protected.merge(r);
        }
        let mut app = protected
            .route_layer(self.auth)
            .merge(Router::new().route("/healthz", get(healthz)))
            .merge(metrics_route);
        for r in self.public {
            app = app.merge(r);
        }
        let known_tasks = self.known_tasks;
        app.fallback(not_found)
            .method_not_allowed_fallback(method_not_allowed)
            .layer(
                ServiceBuilder::new()
                    .layer(SetRequestIdLayer::x_request_id(MakeRequestUuidV7))
                    .layer(PropagateRequestIdLayer::x_request_id())
                    .layer(CatchPanicLayer::custom(panic_response))
                    .layer(errors::JsonErrorsLayer)
                    .option_layer(known_tasks.map(|known| {
                        tower::util::MapRequestLayer::new(move |mut req: Request| {
                            normalize_task(req.headers_mut(), &known);
                            req
                        })
                    })),
            )
    }
}

/// A set of names, each with its shared label string.
type Names = std::collections::HashMap<Box<str>, Arc<str>, foldhash::fast::RandomState>;

fn names<I>(items: I) -> Names
where
    I: IntoIterator,
    I::Item: AsRef<str>,
{
    items
        .into_iter()
        .map(|n| {
            let n = n.as_ref();
            (n.into(), n.into())
        })
        .collect()
}

static OTHER_LABEL: std::sync::LazyLock<Arc<str>> =
    std::sync::LazyLock::new(|| headers::OTHER.into());

/// Replaces an `x-llm-task` the application does not know by [`headers::OTHER`]. A value
/// that is not visible ASCII is left for [`headers::request_metadata`] to refuse (400).
fn normalize_task(h: &mut http::HeaderMap, known: &Names) {
    let Some(task) = h.get(&headers::X_LLM_TASK).and_then(|v| v.to_str().ok()) else {
        return;
    };
    if !known.contains_key(task.trim()) {
        h.insert(
            headers::X_LLM_TASK,
            HeaderValue::from_static(headers::OTHER),
        );
    }
}

/// Who may read `GET /metrics`: anyone (the default), only with a bearer token, or
/// nobody on this router (metrics served on a listener of their own).
///
/// ```
/// use llm_tower_axum::MetricsAccess;
///
/// let access = MetricsAccess::bearer("scrape-token");
/// assert!(!format!("{access:?}").contains("scrape-token"));
/// ```
#[derive(Clone, Default)]
pub struct MetricsAccess(Access);

#[derive(Clone, Default)]
enum Access {
    #[default]
    Public,
    // BLAKE3 of the token: `blake3::Hash: PartialEq` is constant-time.
    Bearer(blake3::Hash),
    Off,
}

impl fmt::Debug for MetricsAccess {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self.0 {
            Access::Public => "MetricsAccess::Public",
            Access::Bearer(_) => "MetricsAccess::Bearer([redacted])",
            Access::Off => "MetricsAccess::Off",
        })
    }
}

impl MetricsAccess {
    /// Anyone who reaches the listener.
    pub fn public() -> Self {
        Self(Access::Public)
    }
    /// Only requests with `Authorization: Bearer <token>`; others get 401.
    pub fn bearer(token: impl AsRef<[u8]>) -> Self {
        Self(Access::Bearer(blake3::hash(token.as_ref())))
    }
    /// No `/metrics` route.
    pub fn off() -> Self {
        Self(Access::Off)
    }

    pub(crate) fn is_off(&self) -> bool {
        matches!(self.0, Access::Off)
    }

    /// The 401 answer for a request `h` that may not read `path`, or `None` if it may.
    pub(crate) fn refuse(&self, h: &http::HeaderMap, path: &str) -> Option<Response> {
        if self.allows(h) {
            return None;
        }
        let mut resp = error_response(
            &LlmError::auth(format!(
                "`{path}` needs `Authorization: Bearer <metrics token>`."
            ))
            .with_code("invalid_api_key"),
        );
        resp.headers_mut()
            .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        Some(resp)
    }

    fn allows(&self, h: &http::HeaderMap) -> bool {
        match &self.0 {
            Access::Public => true,
            Access::Off => false,
            Access::Bearer(want) => h
                .get(header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix("Bearer "))
                .is_some_and(|t| blake3::hash(t.trim().as_bytes()) == *want),
        }
    }
}

impl Metrics {
    /// A router with only `GET /metrics` (per `access`), e.g. for a listener of its own;
    /// other paths are 404 (OpenAI error JSON).
    ///
    /// ```
    /// use llm_tower_axum::{Metrics, MetricsAccess};
    /// let metrics = Metrics::prometheus();
    /// let admin: axum::Router = metrics.router(MetricsAccess::public());
    /// # let _ = admin;
    /// ```
    pub fn router(&self, access: MetricsAccess) -> Router {
        if matches!(access.0, Access::Off) {
            return Router::new();
        }
        let metrics = self.clone();
        Router::new().route(
            "/metrics",
            get(move |h: http::HeaderMap| {
                let metrics = metrics.clone();
                let access = access.clone();
                async move { render_metrics(&metrics, &access, &h) }
            }),
        )
    }

    /// [`router`](Self::router) with OpenAI-format 404/405 errors, to serve alone.
    pub fn standalone_router(&self, access: MetricsAccess) -> Router {
        self.standalone_router_with(access, Router::new())
    }

    /// [`standalone_router`](Self::standalone_router) with `extra` routes (such as
    /// [`status_router`](crate::status_router) under the same access) merged in.
    pub fn standalone_router_with(&self, access: MetricsAccess, extra: Router) -> Router {
        self.router(access)
            .merge(extra)
            .fallback(not_found)
            .method_not_allowed_fallback(method_not_allowed)
            .layer(errors::JsonErrorsLayer)
    }
}

pub(crate) struct AppState<S> {
    pub(crate) service: S,
    pub(crate) body_limit: usize,
    pub(crate) metrics: Metrics,
    models: Bytes,
    known_models: Option<Arc<Names>>,
    #[cfg(feature = "otel")]
    pub(crate) otel: Option<Arc<crate::otel::Otel>>,
    activity: Option<Activity>,
    pub(crate) count_tokens: Option<crate::messages::CountTokens>,
    pub(crate) responses: Option<crate::responses::ResponseStorage>,
}

impl<S> AppState<S> {
    /// Whether requests are traced (OpenTelemetry, feature `otel`).
    pub(crate) fn traces(&self) -> bool {
        #[cfg(feature = "otel")]
        return self.otel.is_some();
        #[cfg(not(feature = "otel"))]
        false
    }

    /// The `model` label for `model`: itself, or `other` when models are known and it is
    /// not one of them.
    pub(crate) fn model_label(&self, model: &str) -> Arc<str> {
        match &self.known_models {
            None => model.into(),
            Some(known) => known.get(model).unwrap_or(&OTHER_LABEL).clone(),
        }
    }
}

fn models_json(models: &[ModelEntry], created: u64) -> Bytes {
    #[derive(Serialize)]
    struct Item<'a> {
        id: &'a str,
        object: &'static str,
        created: u64,
        owned_by: &'a str,
        #[serde(skip_serializing_if = "Option::is_none")]
        alias_for: Option<&'a str>,
    }
    #[derive(Serialize)]
    struct List<'a> {
        object: &'static str,
        data: Vec<Item<'a>>,
    }
    let list = List {
        object: "list",
        data: models
            .iter()
            .map(|m| Item {
                id: &m.id,
                object: "model",
                created,
                owned_by: &m.owned_by,
                alias_for: m.alias_for.as_deref(),
            })
            .collect(),
    };
    serde_json::to_vec(&list).map_or_else(
        |_| Bytes::from_static(br#"{"object":"list","data":[]}"#),
        Bytes::from,
    )
}

pub(crate) fn json_response(status: StatusCode, body: impl Into<Body>) -> Response {
    let mut resp = Response::new(body.into());
    *resp.status_mut() = status;
    // Room for the `x-llm-*` headers and `x-request-id`: allocated once, not grown.
    *resp.headers_mut() = http::HeaderMap::with_capacity(16);
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}

async fn list_models<S>(State(st): State<Arc<AppState<S>>>) -> Response {
    json_response(StatusCode::OK, st.models.clone())
}

async fn healthz() -> Response {
    json_response(StatusCode::OK, r#"{"status":"ok"}"#)
}

fn render_metrics(metrics: &Metrics, access: &MetricsAccess, h: &http::HeaderMap) -> Response {
    if !access.allows(h) {
        let mut resp = error_response(
            &LlmError::auth("`/metrics` needs `Authorization: Bearer <metrics token>`.")
                .with_code("invalid_api_key"),
        );
        resp.headers_mut()
            .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        return resp;
    }
    match metrics.render() {
        Some(text) => {
            let mut resp = Response::new(Body::from(text));
            resp.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
            resp
        }
        None => status_response(StatusCode::NOT_FOUND, "metrics are disabled"),
    }
}

async fn not_found(method: Method, uri: Uri) -> Response {
    if crate::messages::is_messages_path(uri.path()) {
        let mut r = crate::messages::error_response(&LlmError::not_found(format!(
            "Invalid URL ({method} {})",
            uri.path()
        )));
        *r.status_mut() = StatusCode::NOT_FOUND;
        return r;
    }
    status_response(
        StatusCode::NOT_FOUND,
        format!("Invalid URL ({method} {})", uri.path()),
    )
}

async fn method_not_allowed(method: Method, uri: Uri) -> Response {
    if crate::messages::is_messages_path(uri.path()) {
        let mut r = crate::messages::error_response(&LlmError::not_found(format!(
            "Method {method} is not allowed for {}",
            uri.path()
        )));
        *r.status_mut() = StatusCode::METHOD_NOT_ALLOWED;
        return r;
    }
    status_response(
        StatusCode::METHOD_NOT_ALLOWED,
        format!("Method {method} is not allowed for {}", uri.path()),
    )
}

fn panic_response(panic: Box<dyn Any + Send + 'static>) -> Response {
    let detail = panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_default();
    tracing::error!(panic = %detail, "handler panicked");
    status_response(StatusCode::INTERNAL_SERVER_ERROR, "internal server error")
}

pub(crate) fn keep_headers(from: &http::HeaderMap, to: &mut Response) {
    for (name, value) in from {
        if name != header::CONTENT_TYPE && name != header::CONTENT_LENGTH {
            to.headers_mut().append(name, value.clone());
        }
    }
}

/// What is recorded when a request ends (at once, or when its stream finishes).
pub(crate) struct Finish {
    metrics: Metrics,
    activity: Option<Activity>,
    pub(crate) labels: Labels,
    start: Instant,
    upstream: Option<Duration>,
    cost_nano_usd: Option<u64>,
    cache: CacheStatus,
    fallbacks: Vec<FailedAttempt>,
    #[cfg(feature = "otel")]
    pub(crate) trace: Option<crate::otel::RequestTrace>,
}

impl Finish {
    pub(crate) fn new(metrics: Metrics, labels: Labels, start: Instant) -> Self {
        Self {
            metrics,
            activity: None,
            labels,
            start,
            upstream: None,
            cost_nano_usd: None,
            cache: CacheStatus::None,
            fallbacks: Vec::new(),
            #[cfg(feature = "otel")]
            trace: None,
        }
    }

    pub(crate) fn record(&mut self, status: &str, usage: Option<&Usage>) {
        #[cfg(feature = "otel")]
        if let Some(t) = self.trace.take() {
            t.end(status, usage, &self.labels);
        }
        let total = self.start.elapsed();
        let o = Observation {
            labels: &self.labels,
            status,
            total,
            upstream: self.upstream,
            usage,
            cost_nano_usd: self.cost_nano_usd,
            cache: self.cache,
            fallbacks: &self.fallbacks,
        };
        self.metrics.observe(&o);
        if let Some(a) = &self.activity {
            a.observe(&o);
        }
        tracing::info!(
            status,
            duration_ms = total.as_secs_f64() * 1000.0,
            prompt_tokens = usage.map(|u| u.prompt_tokens),
            completion_tokens = usage.map(|u| u.completion_tokens),
            "request finished"
        );
    }

    /// Records a request refused with `err` and answers it.
    fn reject(self, err: &LlmError) -> Response {
        self.reject_with(err, error_response)
    }

    /// [`reject`](Self::reject) with the error body of the client's dialect.
    pub(crate) fn reject_with(
        mut self,
        err: &LlmError,
        body: fn(&LlmError) -> Response,
    ) -> Response {
        self.fallbacks = FailedAttempt::from_error(err);
        self.record(err.kind().as_str(), None);
        let mut resp = body(err);
        headers::write_error_headers(resp.headers_mut(), err, self.start.elapsed());
        resp
    }

    /// What the response's meta says about the request: provider, served model (its label
    /// when known), upstream time, cost, cache status, failed attempts.
    pub(crate) fn observe_meta<S>(&mut self, st: &AppState<S>, meta: &ResponseMeta) {
        if let Some(p) = &meta.provider {
            self.labels.provider = p.clone();
        }
        // The served model, when known; else the requested model's label stays (an
        // upstream may answer with a dated name of a known model).
        if let Some(m) = &meta.model {
            match &st.known_models {
                None => self.labels.model = m.as_str().into(),
                Some(known) => {
                    if let Some(label) = known.get(m.as_str()) {
                        self.labels.model = label.clone();
                    }
                }
            }
        }
        self.upstream = meta.upstream_time;
        self.cost_nano_usd = meta.cost.map(|c| c.nano_usd);
        self.cache = meta.cache;
        self.fallbacks = FailedAttempt::from_meta(&meta.attempts);
    }
}

/// Holds the [`Finish`] of a request while the handler waits, and records it as
/// `client_closed` if the client goes away meanwhile (axum drops the handler future), so
/// no accepted request goes unrecorded. Streams already sent are covered by the stream's
/// own completion hook (`dropped`).
pub(crate) struct CancelGuard(pub(crate) Option<Finish>);

impl CancelGuard {
    /// Gives the [`Finish`] back: the wait is over.
    pub(crate) fn disarm(mut self) -> Finish {
        self.0.take().expect("a guard is disarmed once")
    }
}

impl Drop for CancelGuard {
    fn drop(&mut self) {
        if let Some(mut finish) = self.0.take() {
            finish.record("client_closed", None);
        }
    }
}

async fn chat<S>(State(st): State<Arc<AppState<S>>>, req: Request) -> Response
where
    S: BoxableLlmService,
{
    let start = Instant::now();
    let tenant = crate::native::tenant_of(&req);
    let span = crate::native::request_span(Dialect::Chat, &tenant, &req);
    chat_inner(st, req, start, tenant).instrument(span).await
}

async fn chat_inner<S>(
    st: Arc<AppState<S>>,
    req: Request,
    start: Instant,
    tenant: Tenant,
) -> Response
where
    S: BoxableLlmService,
{
    let mut finish = Finish::new(
        st.metrics.clone(),
        Labels {
            tenant: tenant.0.clone(),
            ..Labels::default()
        },
        start,
    );
    finish.activity.clone_from(&st.activity);
    let (parts, body) = req.into_parts();

    let bytes = match read_body(body, &parts.headers, st.body_limit).await {
        Ok(b) => b,
        Err((status, err)) => {
            let mut resp = finish.reject(&err);
            *resp.status_mut() = status;
            return resp;
        }
    };
    let mut chat_req = match ChatRequest::from_slice(&bytes) {
        Ok(r) => r,
        Err(e) => return finish.reject(&e),
    };
    drop(bytes);
    if let Err(e) = headers::request_metadata(&parts.headers, &mut chat_req) {
        return finish.reject(&e);
    }
    chat_req.extensions.insert(tenant);
    // Providers may forward it upstream; layers may log it.
    if let Some(id) = parts.extensions.get::<RequestId>() {
        chat_req.extensions.insert(id.clone());
    }
    if let Some(task) = chat_req.task_type() {
        finish.labels.task = task.0.clone();
    }
    finish.labels.model = st.model_label(chat_req.model.as_str());
    let span = tracing::Span::current();
    span.record("task", &*finish.labels.task);
    span.record("model", &*finish.labels.model);
    let wants_stream = chat_req.is_stream();
    span.record("stream", wants_stream);
    #[cfg(feature = "otel")]
    if let Some(otel) = &st.otel {
        let id = parts
            .headers
            .get(&X_REQUEST_ID)
            .and_then(|v| v.to_str().ok());
        finish.trace = Some(otel.start(&parts.headers, &mut chat_req, &finish.labels, id));
    }
    let include_usage = chat_req
        .stream_options
        .as_ref()
        .and_then(|o| o.include_usage)
        .unwrap_or(false);

    let guard = CancelGuard(Some(finish));
    let called = st.service.clone().oneshot(chat_req).await;
    let mut finish = guard.disarm();
    let mut resp = match called {
        Ok(r) => r,
        Err(e) => return finish.reject(&e),
    };
    let meta = std::mem::take(&mut resp.meta);
    #[cfg(feature = "otel")]
    if let Some(t) = &finish.trace {
        t.meta(&meta);
    }
    finish.observe_meta(&st, &meta);

    if !wants_stream {
        let json = match resp.body {
            // Forwarded as the upstream sent it: no decoding and encoding again.
            ResponseBody::Encoded(r) if r.dialect() == llm_tower_core::Dialect::Chat => {
                #[cfg(feature = "otel")]
                if let Some(t) = &finish.trace {
                    t.encoded(r.json());
                }
                finish.record("ok", r.usage().or(meta.usage.as_ref()));
                Ok(r.into_json())
            }
            body => {
                let guard = CancelGuard(Some(finish));
                let resp = LlmResponse {
                    body,
                    meta: ResponseMeta::default(),
                };
                let complete = resp.into_complete().await;
                let mut finish = guard.disarm();
                match complete {
                    Ok(r) => {
                        #[cfg(feature = "otel")]
                        if let Some(t) = &finish.trace {
                            t.complete(&r);
                        }
                        finish.record("ok", r.usage.as_ref().or(meta.usage.as_ref()));
                        encode(&r, meta.body_bytes)
                    }
                    Err(e) => {
                        finish.record(e.kind().as_str(), None);
                        Err(e)
                    }
                }
            }
        };
        let mut out = match json {
            Ok(json) => json_response(StatusCode::OK, json),
            Err(e) => error_response(&e),
        };
        headers::write_meta_headers(out.headers_mut(), &meta, start.elapsed());
        return out;
    }

    let mut stream = crate::native::watched_stream(finish, resp);
    // Headers go out with the first chunk: an upstream that fails before it still gets a
    // proper HTTP error status (the commit point), and the timing is time-to-headers.
    let first = match stream.next_event().await {
        Some(Ok(event)) => Some(event),
        Some(Err(e)) => {
            let mut out = error_response(&e);
            headers::write_meta_headers(out.headers_mut(), &meta, start.elapsed());
            return out;
        }
        None => None,
    };
    crate::native::sse_response(
        Body::from_stream(SseStream::new(first, stream, include_usage)),
        &meta,
        start,
    )
}

/// A complete response as JSON, in a buffer about the upstream body's size (`hint`): no
/// step-by-step growth from 8 bytes.
fn encode(r: &ChatResponse, hint: Option<usize>) -> Result<Bytes, LlmError> {
    let mut json = Vec::with_capacity(hint.unwrap_or(0).max(512));
    serde_json::to_writer(&mut json, r)
        .map(|()| json.into())
        .map_err(|e| LlmError::internal(format!("cannot encode the response: {e}")))
}

/// Reads the body up to `limit` bytes; too big is 413, a broken body is 400.
pub(crate) async fn read_body(
    body: Body,
    headers: &http::HeaderMap,
    limit: usize,
) -> Result<Bytes, (StatusCode, LlmError)> {
    let too_big = || {
        (
            StatusCode::PAYLOAD_TOO_LARGE,
            LlmError::bad_request(format!("request body exceeds the limit of {limit} bytes"))
                .with_code("request_too_large"),
        )
    };
    // Refuse at once when the client announces a body over the limit.
    let announced = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|s| s.parse::<u64>().ok());
    if announced.is_some_and(|n| n > limit as u64) {
        return Err(too_big());
    }
    match collect_limited(body, limit, announced).await {
        Ok(b) => Ok(b),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(too_big()),
        Err(e) if is_body_timeout(&*e) => Err((
            StatusCode::REQUEST_TIMEOUT,
            LlmError::bad_request("the request body did not arrive in time")
                .with_code("request_timeout"),
        )),
        Err(e) => Err((
            StatusCode::BAD_REQUEST,
            LlmError::bad_request(format!("cannot read the request body: {e}")),
        )),
    }
}

/// The body's data up to `limit` bytes. A body of one data frame (the usual request) is
/// returned as that frame, without the frame list and copy of `collect`; more frames are
/// joined in one buffer sized by `announced` (the content length) when known.
async fn collect_limited(
    body: Body,
    limit: usize,
    announced: Option<u64>,
) -> Result<Bytes, axum::BoxError> {
    let mut body = http_body_util::Limited::new(body, limit);
    let mut first: Option<Bytes> = None;
    let mut joined: Option<Vec<u8>> = None;
    while let Some(frame) = body.frame().await {
        let Ok(data) = frame?.into_data() else {
            // Trailers carry no body bytes.
            continue;
        };
        if let Some(buf) = joined.as_mut() {
            buf.extend_from_slice(&data);
        } else if let Some(head) = first.take() {
            // Bounded: `Limited` has refused more than `limit` bytes already.
            let hint = announced.map_or(0, |n| usize::try_from(n).unwrap_or(limit).min(limit));
            let mut buf = Vec::with_capacity(hint.max(head.len() + data.len()));
            buf.extend_from_slice(&head);
            buf.extend_from_slice(&data);
            joined = Some(buf);
        } else {
            first = Some(data);
        }
    }
    Ok(joined.map_or_else(|| first.unwrap_or_default(), Bytes::from))
}

/// Whether reading the body failed on the server's body read timeout.
fn is_body_timeout(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur = Some(e);
    while let Some(err) = cur {
        if err.is::<crate::serve::BodyTimeout>() {
            return true;
        }
        cur = err.source();
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunked(parts: &[&'static str]) -> Body {
        let frames: Vec<Result<Bytes, std::io::Error>> = parts
            .iter()
            .map(|p| Ok(Bytes::from_static(p.as_bytes())))
            .collect();
        Body::from_stream(futures_util::stream::iter(frames))
    }

    #[tokio::test]
    async fn a_body_is_read_whole_in_one_frame_or_many() {
        let h = http::HeaderMap::new();
        let one = read_body(Body::from("{\"a\":1}"), &h, 64).await.unwrap();
        assert_eq!(one, "{\"a\":1}");
        let many = read_body(chunked(&["{\"a\"", ":", "1}"]), &h, 64)
            .await
            .unwrap();
        assert_eq!(many, "{\"a\":1}");
        let empty = read_body(Body::empty(), &h, 64).await.unwrap();
        assert!(empty.is_empty());
    }

    #[tokio::test]
    async fn a_body_over_the_limit_is_413_announced_or_not() {
        let h = http::HeaderMap::new();
        let Err((status, _)) = read_body(chunked(&["0123456789", "0123456789"]), &h, 15).await
        else {
            panic!("read past the limit");
        };
        assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
        let mut announced = http::HeaderMap::new();
        announced.insert(header::CONTENT_LENGTH, HeaderValue::from_static("20"));
        let Err((status, _)) = read_body(Body::from("x"), &announced, 15).await else {
            panic!("an announced body over the limit was read");
        };
        assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    }
}
