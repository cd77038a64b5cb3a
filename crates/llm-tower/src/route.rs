//! Route each request to a named target, and the real model, by model alias or task type.
//!
//! A [`RoutePolicy`] holds named targets — LLM services of any type (boxed), or plain async
//! functions for answers that need no LLM at all (a database lookup) — and the rules that pick
//! one:
//!
//! 1. **Model alias**: when the request's `model` names an alias, the alias's target serves it
//!    and the request's model is rewritten to the alias's real model.
//! 2. **Task type**: else, when the request carries a [`TaskType`](crate::TaskType) extension
//!    with a rule, that target serves it (with the rule's model, if it sets one).
//! 3. **Default**: else the default target, with the request's model unchanged — for any
//!    model, or, with [`RoutePolicy::default_for_models`], only for the models listed.
//!
//! When nothing matches, the request fails at once with a not-found [`LlmError`] (404,
//! code `model_not_found`, as OpenAI and Anthropic answer an unknown model) naming the
//! model, and the task type if it had one.
//! The chosen target's name is recorded in [`ResponseMeta::route`](crate::ResponseMeta),
//! and in [`ResponseMeta::provider`](crate::ResponseMeta) when the target left it empty.
//!
//! # Readiness
//!
//! The target depends on the request, so it cannot be known in `poll_ready`. [`Route`]
//! reports ready at once and drives the **chosen target's** readiness inside the response
//! future (axum's strategy), on a clone of that target taken from the shared table. The
//! alternative — ready only when every target is ready (tower's `Steer`) — would let one slow
//! or saturated target block requests meant for all the others (head-of-line blocking), which
//! defeats the point of routing away from it.
//!
//! # Example
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), llm_tower::LlmError> {
//! use llm_tower::route::{RouteLayer, RoutePolicy};
//! use llm_tower::{ChatRequest, ChatResponse, LlmError, LlmResponse, LlmServiceBuilderExt, Message};
//! use tower::{Service, ServiceBuilder, ServiceExt};
//!
//! let cheap = tower::service_fn(|req: ChatRequest| async move {
//!     Ok::<_, LlmError>(LlmResponse::complete(ChatResponse::from_text(req.model, "cheap answer")))
//! });
//! let policy = RoutePolicy::new()
//!     .target("cheap", cheap)
//!     // "no LLM needed, pure DB": a plain async function serves this task type.
//!     .function("lookup", |req: ChatRequest| async move {
//!         Ok(LlmResponse::complete(ChatResponse::from_text("db", format!("row for {}", req.messages[0].text()))))
//!     })
//!     .alias("fast", "cheap", "gpt-4o-mini")
//!     .task("lookup", "lookup")
//!     .default_target("primary"); // the layer's inner service, named below
//!
//! let primary = tower::service_fn(|req: ChatRequest| async move {
//!     Ok::<_, LlmError>(LlmResponse::complete(ChatResponse::from_text(req.model, "primary answer")))
//! });
//! let mut svc = ServiceBuilder::new()
//!     .route(RouteLayer::new(policy, "primary"))
//!     .service(primary);
//!
//! let req = ChatRequest::new("fast", vec![Message::user("hi")]);
//! let resp = svc.ready().await?.call(req).await?;
//! assert_eq!(resp.meta.route.as_deref(), Some("cheap"));
//! assert_eq!(resp.into_complete().await?.model, "gpt-4o-mini"); // the alias's real model
//!
//! let req = ChatRequest::new("any", vec![Message::user("42")]).with_task_type("lookup");
//! let resp = svc.ready().await?.call(req).await?;
//! assert_eq!(resp.into_complete().await?.text(), "row for 42");
//! # Ok(()) }
//! ```

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use llm_tower_core::{BoxLlmService, BoxableLlmService, ChatRequest, LlmError, LlmResponse, boxed};
use tower_layer::Layer;
use tower_service::Service;

/// Where a rule sends a request: a target and, optionally, the model to ask it for.
#[derive(Debug, Clone)]
struct Dest {
    target: usize,
    model: Option<Arc<str>>,
}

/// The routing table: named targets plus alias, task-type and default rules.
///
/// Build it with the consuming methods below; rules may name targets added later (names are
/// resolved when the [`Route`] is built, which panics on a rule naming no target — a
/// configuration bug, caught once, not per request).
///
/// See the [module docs](crate::route) for an example.
#[derive(Clone, Default)]
pub struct RoutePolicy {
    targets: Vec<(Arc<str>, BoxLlmService)>,
    aliases: Vec<(String, Arc<str>, Arc<str>)>,
    tasks: Vec<TaskRule>,
    default: Option<(Arc<str>, Option<Arc<str>>)>,
    default_models: Option<Vec<String>>,
}

impl fmt::Debug for RoutePolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RoutePolicy")
            .field(
                "targets",
                &self.targets.iter().map(|(n, _)| n).collect::<Vec<_>>(),
            )
            .field("aliases", &self.aliases)
            .field("tasks", &self.tasks)
            .field("default", &self.default)
            .field(
                "default_models",
                &self.default_models.as_ref().map(Vec::len),
            )
            .finish()
    }
}

impl RoutePolicy {
    /// An empty policy: no targets, no rules.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds (or replaces) the target `name`, served by an LLM service of any type.
    #[must_use]
    pub fn target<S>(mut self, name: impl Into<Arc<str>>, service: S) -> Self
    where
        S: BoxableLlmService,
    {
        self.insert(name.into(), boxed(service));
        self
    }

    /// Adds (or replaces) the target `name`, served by an already boxed service (no second box).
    #[must_use]
    pub fn boxed_target(mut self, name: impl Into<Arc<str>>, service: BoxLlmService) -> Self {
        self.insert(name.into(), service);
        self
    }

    /// Adds (or replaces) the target `name`, served by a plain async function — the
    /// "no LLM needed" case (a database lookup, a canned answer).
    #[must_use]
    pub fn function<F, Fut>(self, name: impl Into<Arc<str>>, f: F) -> Self
    where
        F: Fn(ChatRequest) -> Fut + Clone + Send + Sync + 'static,
        Fut: Future<Output = Result<LlmResponse, LlmError>> + Send + 'static,
    {
        self.target(name, tower::service_fn(f))
    }

    /// Requests whose `model` is `alias` go to `target`, asking it for `model`.
    #[must_use]
    pub fn alias(
        mut self,
        alias: impl Into<String>,
        target: impl Into<Arc<str>>,
        model: impl Into<Arc<str>>,
    ) -> Self {
        let alias = alias.into();
        self.aliases.retain(|(a, _, _)| *a != alias);
        self.aliases.push((alias, target.into(), model.into()));
        self
    }

    /// Requests of task type `task` go to `target` (the request's model unchanged).
    #[must_use]
    pub fn task(self, task: impl Into<Arc<str>>, target: impl Into<Arc<str>>) -> Self {
        self.task_rule(task.into(), target.into(), None)
    }

    /// Requests of task type `task` go to `target`, asking it for `model`.
    #[must_use]
    pub fn task_model(
        self,
        task: impl Into<Arc<str>>,
        target: impl Into<Arc<str>>,
        model: impl Into<Arc<str>>,
    ) -> Self {
        self.task_rule(task.into(), target.into(), Some(model.into()))
    }

    /// Requests no rule matches go to `target` (the request's model unchanged).
    #[must_use]
    pub fn default_target(mut self, target: impl Into<Arc<str>>) -> Self {
        self.default = Some((target.into(), None));
        self
    }

    /// Requests no rule matches go to `target`, asking it for `model`.
    #[must_use]
    pub fn default_model(
        mut self,
        target: impl Into<Arc<str>>,
        model: impl Into<Arc<str>>,
    ) -> Self {
        self.default = Some((target.into(), Some(model.into())));
        self
    }

    /// The default route serves only requests for these models (a typo in `model` is then
    /// a 404, not a call to the default target); without this it serves any model.
    /// Aliases and task rules are not affected.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// use llm_tower::route::{Route, RoutePolicy};
    /// use llm_tower::{ChatRequest, ChatResponse, ErrorKind, LlmError, LlmResponse, Message};
    /// use tower::ServiceExt;
    ///
    /// let llm = tower::service_fn(|req: ChatRequest| async move {
    ///     Ok::<_, LlmError>(LlmResponse::complete(ChatResponse::from_text(req.model, "hi")))
    /// });
    /// let route = Route::new(
    ///     RoutePolicy::new().target("main", llm).default_target("main").default_for_models(["gpt-4o"]),
    /// );
    /// let ok = ChatRequest::new("gpt-4o", vec![Message::user("Hi")]);
    /// assert!(route.clone().oneshot(ok).await.is_ok());
    /// let typo = ChatRequest::new("gpt-4oo", vec![Message::user("Hi")]);
    /// let err = route.oneshot(typo).await.unwrap_err();
    /// assert_eq!((err.kind(), err.code()), (ErrorKind::NotFound, Some("model_not_found")));
    /// # }
    /// ```
    #[must_use]
    pub fn default_for_models<I>(mut self, models: I) -> Self
    where
        I: IntoIterator,
        I::Item: Into<String>,
    {
        self.default_models = Some(models.into_iter().map(Into::into).collect());
        self
    }

    /// The names of the targets added so far.
    pub fn target_names(&self) -> impl Iterator<Item = &str> {
        self.targets.iter().map(|(n, _)| &**n)
    }

    fn task_rule(mut self, task: Arc<str>, target: Arc<str>, model: Option<Arc<str>>) -> Self {
        self.tasks.retain(|(t, _, _)| *t != task);
        self.tasks.push((task, target, model));
        self
    }

    fn insert(&mut self, name: Arc<str>, service: BoxLlmService) {
        match self.targets.iter_mut().find(|(n, _)| *n == name) {
            Some(slot) => slot.1 = service,
            None => self.targets.push((name, service)),
        }
    }

    /// Resolves names to indexes once.
    ///
    /// # Panics
    ///
    /// When a rule names a target the policy does not have.
    fn compile(self) -> Table {
        let index: HashMap<Arc<str>, usize> = self
            .targets
            .iter()
            .enumerate()
            .map(|(i, (n, _))| (n.clone(), i))
            .collect();
        let find = |rule: &str, name: &Arc<str>| -> usize {
            match index.get(name) {
                Some(i) => *i,
                None => panic!(
                    "route {rule} names the target {name:?}, which the policy does not have \
                     (targets: {:?})",
                    index.keys().collect::<Vec<_>>()
                ),
            }
        };
        let aliases = self
            .aliases
            .iter()
            .map(|(a, t, m)| {
                let dest = Dest {
                    target: find(&format!("alias {a:?}"), t),
                    model: Some(m.clone()),
                };
                (a.clone(), dest)
            })
            .collect();
        let tasks = self
            .tasks
            .iter()
            .map(|(task, t, m)| {
                let dest = Dest {
                    target: find(&format!("for task {task:?}"), t),
                    model: m.clone(),
                };
                (task.clone(), dest)
            })
            .collect();
        let default = self.default.as_ref().map(|(t, m)| Dest {
            target: find("default", t),
            model: m.clone(),
        });
        Table {
            targets: self.targets,
            aliases,
            tasks,
            default,
            default_models: self
                .default_models
                .map(|m| m.into_iter().collect::<crate::FastSet<String>>()),
        }
    }
}

/// (task type, target, model).
type TaskRule = (Arc<str>, Arc<str>, Option<Arc<str>>);

struct Table {
    targets: Vec<(Arc<str>, BoxLlmService)>,
    aliases: crate::FastMap<String, Dest>,
    tasks: crate::FastMap<Arc<str>, Dest>,
    default: Option<Dest>,
    default_models: Option<crate::FastSet<String>>,
}

impl Table {
    fn pick(&self, req: &ChatRequest) -> Result<&Dest, LlmError> {
        if let Some(d) = self.aliases.get(req.model.as_str()) {
            return Ok(d);
        }
        let task = req.task_type();
        if let Some(d) = task.and_then(|t| self.tasks.get(&t.0)) {
            return Ok(d);
        }
        let default = self.default.as_ref().filter(|_| {
            self.default_models
                .as_ref()
                .is_none_or(|m| m.contains(req.model.as_str()))
        });
        default.ok_or_else(|| {
            let msg = match task {
                Some(t) => format!(
                    "The model `{}` does not exist, and no route serves task type {:?}",
                    req.model,
                    t.as_str(),
                ),
                None => format!("The model `{}` does not exist", req.model),
            };
            LlmError::not_found(msg)
                .with_param("model")
                .with_code("model_not_found")
        })
    }
}

// ===== impl RouteLayer =====

/// Builds a [`Route`] whose policy also has the wrapped (inner) service as a target.
///
/// See the [module docs](crate::route) for an example.
#[derive(Debug, Clone)]
pub struct RouteLayer {
    policy: RoutePolicy,
    inner_name: Arc<str>,
}

impl RouteLayer {
    /// Routes with `policy`; the inner service becomes the target `inner_name` (which the
    /// policy's rules, or its default, may name).
    pub fn new(policy: RoutePolicy, inner_name: impl Into<Arc<str>>) -> Self {
        Self {
            policy,
            inner_name: inner_name.into(),
        }
    }
}

impl<S> Layer<S> for RouteLayer
where
    S: BoxableLlmService,
{
    type Service = Route;

    fn layer(&self, inner: S) -> Route {
        Route::new(self.policy.clone().target(self.inner_name.clone(), inner))
    }
}

// ===== impl Route =====

/// The routing service: picks a target per request (see the [module docs](crate::route)).
///
/// # Clone
///
/// Clones share the (immutable) routing table through an `Arc`.
#[derive(Clone)]
pub struct Route {
    table: Arc<Table>,
}

impl fmt::Debug for Route {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Route")
            .field(
                "targets",
                &self
                    .table
                    .targets
                    .iter()
                    .map(|(n, _)| n)
                    .collect::<Vec<_>>(),
            )
            .finish_non_exhaustive()
    }
}

impl Route {
    /// A routing service over `policy`'s targets.
    ///
    /// # Panics
    ///
    /// When a rule names a target the policy does not have (a configuration bug).
    pub fn new(policy: RoutePolicy) -> Self {
        Self {
            table: Arc::new(policy.compile()),
        }
    }

    /// A [`RouteLayer`] (see [`RouteLayer::new`]).
    pub fn layer(policy: RoutePolicy, inner_name: impl Into<Arc<str>>) -> RouteLayer {
        RouteLayer::new(policy, inner_name)
    }

    /// The name of the target a request would go to, and the model it would ask for.
    pub fn resolve(&self, req: &ChatRequest) -> Result<(&str, String), LlmError> {
        let d = self.table.pick(req)?;
        let model = d.model.as_deref().unwrap_or(&req.model).to_owned();
        Ok((&self.table.targets[d.target].0, model))
    }
}

impl Service<ChatRequest> for Route {
    type Response = LlmResponse;
    type Error = LlmError;
    type Future = ResponseFuture;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), LlmError>> {
        // Readiness is driven per target inside the future (see the module docs).
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut req: ChatRequest) -> ResponseFuture {
        let state = match self.table.pick(&req) {
            Err(e) => State::Failed { error: Some(e) },
            Ok(d) => {
                if let Some(m) = &d.model {
                    req.model.clear();
                    req.model.push_str(m);
                }
                let (name, svc) = &self.table.targets[d.target];
                let state = State::Ready {
                    // A fresh clone from the shared table: it is polled ready, then called.
                    svc: svc.clone(),
                    name: name.clone(),
                };
                return ResponseFuture {
                    state,
                    req: Some(req),
                };
            }
        };
        ResponseFuture { state, req: None }
    }
}

// ===== impl ResponseFuture =====

enum State {
    Ready {
        svc: BoxLlmService,
        name: Arc<str>,
    },
    Calling {
        fut: <BoxLlmService as Service<ChatRequest>>::Future,
        name: Arc<str>,
    },
    Failed {
        error: Option<LlmError>,
    },
}

/// The response future of [`Route`]: waits for the chosen target's readiness, calls it and
/// records the route in the response's meta.
pub struct ResponseFuture {
    state: State,
    req: Option<ChatRequest>,
}

impl fmt::Debug for ResponseFuture {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = match &self.state {
            State::Ready { name, .. } => format!("ready({name})"),
            State::Calling { name, .. } => format!("calling({name})"),
            State::Failed { .. } => "failed".to_owned(),
        };
        f.debug_struct("ResponseFuture").field("state", &s).finish()
    }
}

impl Future for ResponseFuture {
    type Output = Result<LlmResponse, LlmError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        // Every field is Unpin (boxed futures), so no projection is needed.
        let this = self.get_mut();
        loop {
            match &mut this.state {
                State::Failed { error } => {
                    return Poll::Ready(Err(error.take().unwrap_or_else(|| {
                        LlmError::internal("route future polled after completion")
                    })));
                }
                State::Ready { svc, name } => {
                    if let Err(e) = ready!(svc.poll_ready(cx)) {
                        return Poll::Ready(Err(e));
                    }
                    let Some(req) = this.req.take() else {
                        return Poll::Ready(Err(LlmError::internal(
                            "route future polled after completion",
                        )));
                    };
                    let fut = svc.call(req);
                    let name = name.clone();
                    this.state = State::Calling { fut, name };
                }
                State::Calling { fut, name } => {
                    let mut resp = ready!(fut.as_mut().poll(cx))?;
                    resp.meta.route = Some(name.clone());
                    if resp.meta.provider.is_none() {
                        resp.meta.provider = Some(name.clone());
                    }
                    return Poll::Ready(Ok(resp));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use llm_tower_core::{ChatResponse, ErrorKind, Message};
    use llm_tower_test::{MockLlm, Step};
    use std::time::Duration;
    use tower::ServiceExt;

    fn req(model: &str) -> ChatRequest {
        ChatRequest::new(model, vec![Message::user("hi")])
    }

    fn policy(a: &MockLlm, b: &MockLlm) -> RoutePolicy {
        RoutePolicy::new()
            .target("a", a.clone())
            .target("b", b.clone())
            .function("db", |req: ChatRequest| async move {
                Ok(LlmResponse::complete(ChatResponse::from_text(
                    "none",
                    format!("db:{}", req.messages[0].text()),
                )))
            })
            .alias("smart", "b", "big-model")
            .task("classify", "a")
            .task_model("summarize", "b", "mid-model")
            .task("lookup", "db")
    }

    #[tokio::test(start_paused = true)]
    async fn routes_by_alias_and_rewrites_model() {
        let (a, b) = (MockLlm::new("pa"), MockLlm::new("pb"));
        let svc = Route::new(policy(&a, &b));
        let resp = svc.oneshot(req("smart")).await.unwrap();
        assert_eq!(resp.meta.route.as_deref(), Some("b"));
        assert_eq!(resp.meta.provider.as_deref(), Some("pb"));
        assert_eq!(b.last_request().unwrap().model, "big-model");
        assert_eq!(a.calls(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn routes_by_task_type_with_and_without_model() {
        let (a, b) = (MockLlm::new("pa"), MockLlm::new("pb"));
        let svc = Route::new(policy(&a, &b));
        let r = svc
            .clone()
            .oneshot(req("gpt-x").with_task_type("classify"))
            .await
            .unwrap();
        assert_eq!(r.meta.route.as_deref(), Some("a"));
        assert_eq!(a.last_request().unwrap().model, "gpt-x");
        let r = svc
            .oneshot(req("gpt-x").with_task_type("summarize"))
            .await
            .unwrap();
        assert_eq!(r.meta.route.as_deref(), Some("b"));
        assert_eq!(b.last_request().unwrap().model, "mid-model");
    }

    #[tokio::test(start_paused = true)]
    async fn alias_wins_over_task_type() {
        let (a, b) = (MockLlm::new("pa"), MockLlm::new("pb"));
        let svc = Route::new(policy(&a, &b));
        let r = svc
            .oneshot(req("smart").with_task_type("classify"))
            .await
            .unwrap();
        assert_eq!(r.meta.route.as_deref(), Some("b"));
    }

    #[tokio::test(start_paused = true)]
    async fn function_target_needs_no_llm() {
        let (a, b) = (MockLlm::new("pa"), MockLlm::new("pb"));
        let svc = Route::new(policy(&a, &b));
        let r = svc
            .oneshot(req("x").with_task_type("lookup"))
            .await
            .unwrap();
        assert_eq!(r.meta.route.as_deref(), Some("db"));
        // A function leaves the provider empty; the route names it.
        assert_eq!(r.meta.provider.as_deref(), Some("db"));
        assert_eq!(r.into_complete().await.unwrap().text(), "db:hi");
        assert_eq!(a.calls() + b.calls(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn unknown_model_without_default_is_not_found_naming_it() {
        let (a, b) = (MockLlm::new("pa"), MockLlm::new("pb"));
        let svc = Route::new(policy(&a, &b));
        let err = svc.clone().oneshot(req("mystery")).await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::NotFound);
        assert_eq!(err.code(), Some("model_not_found"));
        assert!(err.message().contains("`mystery`"), "{err}");
        let err = svc
            .oneshot(req("mystery").with_task_type("poetry"))
            .await
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::NotFound);
        assert!(err.message().contains("\"poetry\""), "{err}");
        assert!(err.message().contains("`mystery`"), "{err}");
        assert_eq!(a.calls() + b.calls(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_default_for_some_models_refuses_the_others() {
        let (a, b) = (MockLlm::new("pa"), MockLlm::new("pb"));
        let svc = Route::new(
            policy(&a, &b)
                .default_target("a")
                .default_for_models(["known"]),
        );
        let r = svc.clone().oneshot(req("known")).await.unwrap();
        assert_eq!(r.meta.route.as_deref(), Some("a"));
        let err = svc.clone().oneshot(req("knwon")).await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::NotFound);
        assert_eq!(err.status(), 404);
        assert_eq!(a.calls(), 1);
        // Task rules still route any model.
        let r = svc
            .oneshot(req("knwon").with_task_type("classify"))
            .await
            .unwrap();
        assert_eq!(r.meta.route.as_deref(), Some("a"));
        assert_eq!(a.calls(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn default_target_and_default_model() {
        let (a, b) = (MockLlm::new("pa"), MockLlm::new("pb"));
        let svc = Route::new(policy(&a, &b).default_model("a", "small"));
        let r = svc.oneshot(req("whatever")).await.unwrap();
        assert_eq!(r.meta.route.as_deref(), Some("a"));
        assert_eq!(a.last_request().unwrap().model, "small");
    }

    #[tokio::test(start_paused = true)]
    async fn layer_registers_inner_and_passes_errors_through() {
        let inner = MockLlm::new("inner").then(Step::error(LlmError::unavailable("down")));
        let a = MockLlm::new("pa");
        let layer = RouteLayer::new(
            RoutePolicy::new()
                .target("a", a.clone())
                .default_target("main"),
            "main",
        );
        let svc = layer.layer(inner.clone());
        let err = svc.clone().oneshot(req("m")).await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Unavailable);
        let r = svc.oneshot(req("m")).await.unwrap();
        assert_eq!(r.meta.route.as_deref(), Some("main"));
        assert_eq!(inner.calls(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn slow_target_does_not_block_readiness() {
        let slow = MockLlm::new("slow")
            .otherwise(Step::reply("late").with_latency(Duration::from_secs(30)));
        let fast = MockLlm::new("fast");
        let mut svc = Route::new(
            RoutePolicy::new()
                .target("slow", slow)
                .target("fast", fast)
                .task("slow", "slow")
                .default_target("fast"),
        );
        let pending = svc
            .ready()
            .await
            .unwrap()
            .call(req("m").with_task_type("slow"));
        let r = svc.ready().await.unwrap().call(req("m")).await.unwrap();
        assert_eq!(r.meta.route.as_deref(), Some("fast"));
        let r = pending.await.unwrap();
        assert_eq!(r.meta.route.as_deref(), Some("slow"));
    }

    #[test]
    #[should_panic(expected = "nope")]
    fn rule_naming_missing_target_panics_at_build() {
        let _ = Route::new(RoutePolicy::new().default_target("nope"));
    }

    #[test]
    fn resolve_reports_target_and_model() {
        let (a, b) = (MockLlm::new("pa"), MockLlm::new("pb"));
        let svc = Route::new(policy(&a, &b));
        let (t, m) = svc.resolve(&req("smart")).unwrap();
        assert_eq!((t, m.as_str()), ("b", "big-model"));
    }
}
