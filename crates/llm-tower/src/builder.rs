//! `LlmServiceBuilderExt`: one `ServiceBuilder` method per layer.

#[allow(unused_imports)] // each feature's methods use a subset
use tower::ServiceBuilder;
#[allow(unused_imports)]
use tower_layer::Stack;

mod sealed {
    pub trait Sealed<L> {}
    impl<L> Sealed<L> for tower::ServiceBuilder<L> {}
}

/// Extension methods on [`tower::ServiceBuilder`] for llm-tower's layers, one per layer,
/// each behind that layer's feature. Sealed: implemented only for `ServiceBuilder`.
pub trait LlmServiceBuilderExt<L>: sealed::Sealed<L> + Sized {
    // Each layer's helper adds its methods in its own feature-gated block below.
    // ===== route =====
    // ===== fallback =====
    // ===== validate =====
    // ===== cache =====
    // ===== rate-limit =====
    // ===== cost =====
}

impl<L> LlmServiceBuilderExt<L> for ServiceBuilder<L> {
    // ===== route impl =====
    // ===== fallback impl =====
    // ===== validate impl =====
    // ===== cache impl =====
    // ===== rate-limit impl =====
    // ===== cost impl =====
}
