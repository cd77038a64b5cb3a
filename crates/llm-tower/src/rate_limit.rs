//! The `rate_limit` layer (being built).
