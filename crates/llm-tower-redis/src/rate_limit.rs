//! Redis `rate_limit` store (being built).
