//! The `cost` layer (being built).
