//! `ProviderConfig`: either provider's settings, tagged, for configuration files.

use llm_tower_core::{BoxLlmService, LlmError, boxed};
use serde::Deserialize;

use crate::{AnthropicConfig, AnthropicProvider, HttpClient, OpenAiConfig, OpenAiProvider};

/// One provider's settings, tagged by `kind` (`"openai"` or `"anthropic"`).
///
/// ```
/// use llm_tower_providers::{HttpClient, ProviderConfig};
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// let cfg: ProviderConfig = serde_json::from_str(
///     r#"{"kind": "anthropic", "api_key": "sk-ant-x", "prompt_caching": true}"#,
/// ).unwrap();
/// assert_eq!(cfg.name(), "anthropic");
/// let client = HttpClient::with_defaults().unwrap();
/// let svc = cfg.build(&client).unwrap();
/// # let _ = svc;
/// assert!(serde_json::from_str::<ProviderConfig>(r#"{"kind": "openai", "typo": 1}"#).is_err());
/// # }
/// ```
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum ProviderConfig {
    /// An OpenAI-compatible provider.
    #[serde(rename = "openai", alias = "openai_compatible")]
    OpenAi(OpenAiConfig),
    /// The Anthropic Messages API.
    Anthropic(AnthropicConfig),
}

impl ProviderConfig {
    /// The provider name it will report.
    pub fn name(&self) -> &str {
        match self {
            ProviderConfig::OpenAi(c) => &c.name,
            ProviderConfig::Anthropic(c) => &c.name,
        }
    }

    /// Builds the provider on the shared `client`, boxed.
    pub fn build(self, client: &HttpClient) -> Result<BoxLlmService, LlmError> {
        Ok(match self {
            ProviderConfig::OpenAi(c) => boxed(OpenAiProvider::new(c, client)?),
            ProviderConfig::Anthropic(c) => boxed(AnthropicProvider::new(c, client)?),
        })
    }
}
