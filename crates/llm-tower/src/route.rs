//! The `route` layer (being built).
