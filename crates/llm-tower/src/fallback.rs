//! The `fallback` layer (being built).
