//! `LlmServiceBuilderExt`: one `ServiceBuilder` method per layer.

use tower::ServiceBuilder;
#[allow(unused_imports)] // only the feature-gated methods name it
use tower_layer::Stack;

mod sealed {
    pub trait Sealed<L> {}
    impl<L> Sealed<L> for tower::ServiceBuilder<L> {}
}

/// Extension methods on [`tower::ServiceBuilder`] for llm-tower's layers, one per layer,
/// each behind that layer's feature. Sealed: implemented only for `ServiceBuilder`.
pub trait LlmServiceBuilderExt<L>: sealed::Sealed<L> + Sized {
    /// Adds a [`RouteLayer`](crate::route::RouteLayer): picks a target and model per request
    /// by model alias or task type. See [`crate::route`].
    #[cfg(feature = "route")]
    #[cfg_attr(docsrs, doc(cfg(feature = "route")))]
    fn route(
        self,
        layer: crate::route::RouteLayer,
    ) -> ServiceBuilder<Stack<crate::route::RouteLayer, L>>;
    /// Adds a [`FallbackLayer`](crate::fallback::FallbackLayer): the inner service becomes the
    /// primary of a fallback chain. See [`crate::fallback`].
    #[cfg(feature = "fallback")]
    #[cfg_attr(docsrs, doc(cfg(feature = "fallback")))]
    fn fallback(
        self,
        layer: crate::fallback::FallbackLayer,
    ) -> ServiceBuilder<Stack<crate::fallback::FallbackLayer, L>>;
    /// Adds a [`ValidateLayer`](crate::validate::ValidateLayer): checks outputs and retries
    /// once with a format reminder. See [`crate::validate`].
    #[cfg(feature = "validate")]
    #[cfg_attr(docsrs, doc(cfg(feature = "validate")))]
    fn validate(
        self,
        layer: crate::validate::ValidateLayer,
    ) -> ServiceBuilder<Stack<crate::validate::ValidateLayer, L>>;
    /// Answers identical deterministic requests from a cache. See [`crate::cache`].
    #[cfg(feature = "cache")]
    #[cfg_attr(docsrs, doc(cfg(feature = "cache")))]
    fn cache(
        self,
        layer: crate::cache::CacheLayer,
    ) -> ServiceBuilder<Stack<crate::cache::CacheLayer, L>>;
    /// Adds a [`RateLimitLayer`](crate::rate_limit::RateLimitLayer): requests and tokens per window.
    ///
    /// See [`crate::rate_limit`]. (Not `rate_limit`: tower's own `ServiceBuilder::rate_limit`
    /// would shadow it.)
    #[cfg(feature = "rate-limit")]
    #[cfg_attr(docsrs, doc(cfg(feature = "rate-limit")))]
    fn llm_rate_limit(
        self,
        layer: crate::rate_limit::RateLimitLayer,
    ) -> ServiceBuilder<Stack<crate::rate_limit::RateLimitLayer, L>>;
    /// Adds a [`CostLayer`](crate::cost::CostLayer): prices responses, totals them, enforces budgets.
    ///
    /// See [`crate::cost`].
    #[cfg(feature = "cost")]
    #[cfg_attr(docsrs, doc(cfg(feature = "cost")))]
    fn cost(
        self,
        layer: crate::cost::CostLayer,
    ) -> ServiceBuilder<Stack<crate::cost::CostLayer, L>>;
    /// Adds a [`BalanceLayer`](crate::balance::BalanceLayer): the inner service becomes the
    /// first member of a balanced group. See [`crate::balance`].
    #[cfg(feature = "balance")]
    #[cfg_attr(docsrs, doc(cfg(feature = "balance")))]
    fn balance(
        self,
        layer: crate::balance::BalanceLayer,
    ) -> ServiceBuilder<Stack<crate::balance::BalanceLayer, L>>;
    /// Adds a [`HedgeLayer`](crate::hedge::HedgeLayer): races a second attempt against a slow
    /// first one. See [`crate::hedge`].
    #[cfg(feature = "hedge")]
    #[cfg_attr(docsrs, doc(cfg(feature = "hedge")))]
    fn hedge(
        self,
        layer: crate::hedge::HedgeLayer,
    ) -> ServiceBuilder<Stack<crate::hedge::HedgeLayer, L>>;
}

impl<L> LlmServiceBuilderExt<L> for ServiceBuilder<L> {
    #[cfg(feature = "balance")]
    fn balance(
        self,
        layer: crate::balance::BalanceLayer,
    ) -> ServiceBuilder<Stack<crate::balance::BalanceLayer, L>> {
        self.layer(layer)
    }
    #[cfg(feature = "hedge")]
    fn hedge(
        self,
        layer: crate::hedge::HedgeLayer,
    ) -> ServiceBuilder<Stack<crate::hedge::HedgeLayer, L>> {
        self.layer(layer)
    }
    #[cfg(feature = "route")]
    fn route(
        self,
        layer: crate::route::RouteLayer,
    ) -> ServiceBuilder<Stack<crate::route::RouteLayer, L>> {
        self.layer(layer)
    }
    #[cfg(feature = "fallback")]
    fn fallback(
        self,
        layer: crate::fallback::FallbackLayer,
    ) -> ServiceBuilder<Stack<crate::fallback::FallbackLayer, L>> {
        self.layer(layer)
    }
    #[cfg(feature = "validate")]
    fn validate(
        self,
        layer: crate::validate::ValidateLayer,
    ) -> ServiceBuilder<Stack<crate::validate::ValidateLayer, L>> {
        self.layer(layer)
    }
    #[cfg(feature = "cache")]
    fn cache(
        self,
        layer: crate::cache::CacheLayer,
    ) -> ServiceBuilder<Stack<crate::cache::CacheLayer, L>> {
        self.layer(layer)
    }
    #[cfg(feature = "rate-limit")]
    fn llm_rate_limit(
        self,
        layer: crate::rate_limit::RateLimitLayer,
    ) -> ServiceBuilder<Stack<crate::rate_limit::RateLimitLayer, L>> {
        self.layer(layer)
    }
    #[cfg(feature = "cost")]
    fn cost(
        self,
        layer: crate::cost::CostLayer,
    ) -> ServiceBuilder<Stack<crate::cost::CostLayer, L>> {
        self.layer(layer)
    }
}
