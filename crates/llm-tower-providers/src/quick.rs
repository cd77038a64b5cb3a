//! One-line constructors for the common providers, reading the environment variables the
//! official SDKs read and sharing one process-wide client. The explicit forms
//! (`OpenAiProvider::new(config, &client)`) stay for everything else.

use std::sync::OnceLock;

use llm_tower_core::LlmError;

use crate::{AnthropicConfig, AnthropicProvider, ApiKey, HttpClient, OpenAiConfig, OpenAiProvider};

impl HttpClient {
    /// The process-wide client with [`HttpClientConfig::default`](crate::HttpClientConfig)
    /// settings, built on first use; every clone shares its connection pool. The one-line
    /// provider constructors use it, so providers built with them share connections.
    ///
    /// ```
    /// use llm_tower_providers::HttpClient;
    /// let a = HttpClient::shared().unwrap();
    /// let b = HttpClient::shared().unwrap();
    /// assert!(a.shares_pool_with(&b));
    /// ```
    pub fn shared() -> Result<HttpClient, LlmError> {
        static SHARED: OnceLock<HttpClient> = OnceLock::new();
        if let Some(client) = SHARED.get() {
            return Ok(client.clone());
        }
        // Two first callers may both build one; the loser's is dropped, nothing leaks.
        let client = HttpClient::with_defaults()?;
        Ok(SHARED.get_or_init(|| client).clone())
    }
}

/// `var`, trimmed, when it is set and not empty.
fn env(var: &str) -> Option<String> {
    std::env::var(var)
        .ok()
        .map(|v| v.trim().to_owned())
        .filter(|v| !v.is_empty())
}

impl OpenAiProvider {
    /// OpenAI from the environment, as the official SDKs read it: the key from
    /// `OPENAI_API_KEY` (required), the base URL from `OPENAI_BASE_URL` (default
    /// `https://api.openai.com/v1`), on [`HttpClient::shared`].
    ///
    /// Fails with an auth error naming the variable (never a value) when the key is missing.
    ///
    /// ```no_run
    /// # fn main() -> Result<(), llm_tower_core::LlmError> {
    /// let openai = llm_tower_providers::OpenAiProvider::from_env()?;
    /// # Ok(()) }
    /// ```
    pub fn from_env() -> Result<Self, LlmError> {
        let mut config = OpenAiConfig::default().api_key(ApiKey::from_env("OPENAI_API_KEY")?);
        if let Some(url) = env("OPENAI_BASE_URL") {
            config.base_url = url;
        }
        Self::new(config, &HttpClient::shared()?)
    }

    /// Any OpenAI-compatible server (OpenRouter, Groq, Together, vLLM, Ollama, …) named
    /// `name` at `base_url` (up to and including the version path), with its key read from
    /// `key_env` when given (required then; `None` for local servers without a key), on
    /// [`HttpClient::shared`].
    ///
    /// ```
    /// # fn main() -> Result<(), llm_tower_core::LlmError> {
    /// use llm_tower_providers::OpenAiProvider;
    /// let ollama = OpenAiProvider::compatible("ollama", "http://localhost:11434/v1", None)?;
    /// assert_eq!(ollama.name(), "ollama");
    /// assert!(!ollama.has_api_key());
    /// // A named key variable that is not set is an error, not a keyless provider.
    /// assert!(OpenAiProvider::compatible("groq", "https://api.groq.com/openai/v1",
    ///     Some("LLM_TOWER_DOC_UNSET_KEY")).is_err());
    /// # Ok(()) }
    /// ```
    pub fn compatible(
        name: impl Into<String>,
        base_url: impl Into<String>,
        key_env: Option<&str>,
    ) -> Result<Self, LlmError> {
        let mut config = OpenAiConfig::new(base_url).name(name);
        if let Some(var) = key_env {
            config = config.api_key(ApiKey::from_env(var)?);
        }
        Self::new(config, &HttpClient::shared()?)
    }
}

impl AnthropicProvider {
    /// Anthropic from the environment, as the official SDKs read it: the key from
    /// `ANTHROPIC_API_KEY` (required), the base URL from `ANTHROPIC_BASE_URL` (default
    /// `https://api.anthropic.com`), on [`HttpClient::shared`].
    ///
    /// ```no_run
    /// # fn main() -> Result<(), llm_tower_core::LlmError> {
    /// let claude = llm_tower_providers::AnthropicProvider::from_env()?;
    /// # Ok(()) }
    /// ```
    pub fn from_env() -> Result<Self, LlmError> {
        let mut config = AnthropicConfig::default().api_key(ApiKey::from_env("ANTHROPIC_API_KEY")?);
        if let Some(url) = env("ANTHROPIC_BASE_URL") {
            config.base_url = url;
        }
        Self::new(config, &HttpClient::shared()?)
    }
}
