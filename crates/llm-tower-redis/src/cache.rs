//! Redis `cache` store (being built).
