//! The `validate` layer (being built).
