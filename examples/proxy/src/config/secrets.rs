//! Secrets: their resolution from the environment into [`Secret`]s.

use std::collections::BTreeMap;

use toml::Spanned;

use super::{Config, ConfigError};

/// A secret value read from the environment: the providers' [`Secret`], whose `Debug` and
/// `Display` are redacted.
pub use llm_tower_providers::Secret;

impl Config {
    /// Reads every secret named by the file from the environment, through `env` (use
    /// `|k| std::env::var(k).ok()`). Fails naming the first missing variable.
    pub fn resolve_secrets(
        &self,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Secrets, ConfigError> {
        let get = |var: &str, needed_by: String| {
            env(var)
                .filter(|v| !v.is_empty())
                .map(Secret::new)
                .ok_or_else(|| ConfigError::MissingEnv {
                    var: var.to_owned(),
                    needed_by,
                })
        };
        let mut provider_keys = BTreeMap::new();
        let mut provider_headers = BTreeMap::new();
        for (name, p) in &self.providers {
            if let Some(var) = &p.get_ref().api_key_env {
                provider_keys.insert(
                    name.clone(),
                    get(var.get_ref(), format!("provider {name:?}"))?,
                );
            }
            let mut headers = BTreeMap::new();
            for (h, var) in &p.get_ref().headers_env {
                headers.insert(
                    h.clone(),
                    get(var, format!("header {h:?} of provider {name:?}"))?,
                );
            }
            if !headers.is_empty() {
                provider_headers.insert(name.clone(), headers);
            }
        }
        let metrics_token = match &self.server.metrics_token_env {
            Some(var) if self.server.metrics => {
                Some(get(var.get_ref(), "server.metrics_token_env".into())?)
            }
            _ => None,
        };
        let redis = |what: &str, e: &Option<Spanned<String>>| {
            e.as_ref()
                .map(|v| get(v.get_ref(), what.to_owned()))
                .transpose()
        };
        let cache_redis_url = if self.cache.enabled {
            redis("cache", &self.cache.redis_url_env)?
        } else {
            None
        };
        let rate_limit_redis_url = if self.rate_limits.rules.is_empty()
            && !self
                .providers
                .values()
                .any(|p| p.get_ref().rate_limit.is_some())
        {
            None
        } else {
            redis("rate_limits", &self.rate_limits.redis_url_env)?
        };
        let budget_redis_url = if self.budgets.limits.is_empty() {
            None
        } else {
            redis("budgets", &self.budgets.redis_url_env)?
        };
        let jobs_database_url = if self.jobs.enabled {
            redis("jobs", &self.jobs.url_env)?
        } else {
            None
        };
        let mut client_keys = Vec::new();
        for k in &self.auth.keys {
            let v = k.get_ref();
            let hash = match (&v.key_env, &v.key_blake3) {
                (Some(var), _) => {
                    blake3_hex(get(var, format!("auth key of tenant {:?}", v.tenant))?.expose())
                }
                (None, Some(h)) => h.to_ascii_lowercase(),
                (None, None) => continue, // rejected by validation
            };
            client_keys.push(ClientKey {
                tenant: v.tenant.clone(),
                blake3: hash,
            });
        }
        Ok(Secrets {
            provider_keys,
            provider_headers,
            metrics_token,
            cache_redis_url,
            rate_limit_redis_url,
            budget_redis_url,
            jobs_database_url,
            client_keys,
        })
    }
}

/// A client key as the gateway keeps it: only its BLAKE3, never the key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientKey {
    /// The tenant.
    pub tenant: String,
    /// Lowercase hex BLAKE3 of the key.
    pub blake3: String,
}

/// Secrets read from the environment. `Debug` prints only redacted values.
#[derive(Debug, Clone, Default)]
pub struct Secrets {
    /// Provider name → API key.
    pub provider_keys: BTreeMap<String, Secret>,
    /// Provider name → header name → value (`headers_env`).
    pub provider_headers: BTreeMap<String, BTreeMap<String, Secret>>,
    /// The bearer token `/metrics` requires (`server.metrics_token_env`).
    pub metrics_token: Option<Secret>,
    /// Redis URL of the cache store.
    pub cache_redis_url: Option<Secret>,
    /// Redis URL of the rate-limit store.
    pub rate_limit_redis_url: Option<Secret>,
    /// Redis URL of the budget store.
    pub budget_redis_url: Option<Secret>,
    /// PostgreSQL URL of the jobs store.
    pub jobs_database_url: Option<Secret>,
    /// Client keys (hashed) and their tenants.
    pub client_keys: Vec<ClientKey>,
}

/// Lowercase hex BLAKE3 digest of `s` (what `key_blake3` holds).
pub fn blake3_hex(s: &str) -> String {
    blake3::hash(s.as_bytes()).to_hex().to_string()
}

/// Parses a 64-digit hex digest.
pub fn parse_digest(hex: &str) -> Option<[u8; 32]> {
    blake3::Hash::from_hex(hex).ok().map(|h| *h.as_bytes())
}
