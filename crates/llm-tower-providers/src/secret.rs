//! `Secret` (and its provider-facing name `ApiKey`): a value that never shows in `Debug`,
//! `Display`, errors or logs.

use std::fmt;
use std::sync::Arc;

use llm_tower_core::LlmError;
use serde::{Deserialize, Deserializer};

/// A secret: an API key, a header value, a URL with a password. `Debug` prints
/// `Secret(<redacted>)` and `Display` prints `<redacted>`; the only way to read it is
/// [`expose`](Self::expose), which the providers call once, when they build the
/// `authorization` header (marked sensitive, so hyper and tracing never print it either).
///
/// ```
/// use llm_tower_providers::ApiKey;
///
/// let key = ApiKey::new("sk-secret-123");
/// assert_eq!(format!("{key:?}"), "Secret(<redacted>)");
/// assert!(!format!("{key}").contains("secret"));
/// assert_eq!(key.expose(), "sk-secret-123");
/// ```
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(Arc<str>);

/// A provider's API key: a [`Secret`].
pub type ApiKey = Secret;

impl Secret {
    /// A key from its value.
    pub fn new(key: impl Into<String>) -> Self {
        Self(Arc::from(key.into()))
    }

    /// Reads the key from the environment variable `var`.
    ///
    /// Fails with an [`ErrorKind::Auth`](llm_tower_core::ErrorKind::Auth) error naming the
    /// variable (never its value) when it is unset, empty or not UTF-8.
    pub fn from_env(var: &str) -> Result<Self, LlmError> {
        match std::env::var(var) {
            Ok(v) if !v.trim().is_empty() => Ok(Self::new(v.trim())),
            Ok(_) => Err(LlmError::auth(format!(
                "environment variable `{var}` holding the API key is empty"
            ))),
            Err(std::env::VarError::NotPresent) => Err(LlmError::auth(format!(
                "environment variable `{var}` holding the API key is not set"
            ))),
            Err(std::env::VarError::NotUnicode(_)) => Err(LlmError::auth(format!(
                "environment variable `{var}` holding the API key is not valid UTF-8"
            ))),
        }
    }

    /// The secret value. Call it only to put the key on the wire.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

impl<'de> Deserialize<'de> for Secret {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Ok(Self::new(s))
    }
}

/// Replaces every occurrence of `key` in `text` (upstreams sometimes echo the key they
/// rejected) so that error messages never carry it.
pub(crate) fn scrub(text: &str, key: Option<&ApiKey>) -> String {
    match key {
        Some(k) if k.expose().len() >= 4 && text.contains(k.expose()) => {
            text.replace(k.expose(), "<redacted>")
        }
        _ => text.to_owned(),
    }
}
