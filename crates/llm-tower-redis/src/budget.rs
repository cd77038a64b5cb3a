//! Redis `budget` store (being built).
