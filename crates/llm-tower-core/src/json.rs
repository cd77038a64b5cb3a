//! JSON parsing of bodies that are usually valid UTF-8.

use serde::Deserialize;

/// `serde_json::from_slice`, with UTF-8 checked once for the whole body instead of string
/// by string (`from_slice` validates every key and value it reads; a whole-body check is a
/// fraction of that). Invalid UTF-8 falls back to `from_slice`, for its error and position.
pub(crate) fn from_slice<'a, T: Deserialize<'a>>(bytes: &'a [u8]) -> serde_json::Result<T> {
    match std::str::from_utf8(bytes) {
        Ok(text) => serde_json::from_str(text),
        Err(_) => serde_json::from_slice(bytes),
    }
}
