//! Serde helper that keeps "absent" and "explicit `null`" apart.
//!
//! OpenAI documents several fields that are sent as an explicit `null` (a chunk's
//! `finish_reason`, an assistant message's `content` next to `tool_calls`, a chunk's
//! `usage`). A plain `Option<T>` would drop the key on the way back; `Option<Option<T>>`
//! with this module keeps it: `None` = absent, `Some(None)` = `null`, `Some(Some(v))` = value.

use serde::{Deserialize, Deserializer, Serialize, Serializer};

pub(crate) fn serialize<T: Serialize, S: Serializer>(
    value: &Option<Option<T>>,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    match value {
        // `skip_serializing_if = "Option::is_none"` keeps the outer `None` from reaching us.
        None | Some(None) => serializer.serialize_none(),
        Some(Some(v)) => v.serialize(serializer),
    }
}

pub(crate) fn deserialize<'de, T: Deserialize<'de>, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<Option<T>>, D::Error> {
    // Only called when the key is present; `#[serde(default)]` covers absence.
    Option::<T>::deserialize(deserializer).map(Some)
}
