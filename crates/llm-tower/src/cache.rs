//! The `cache` layer (being built).
