//! Wire tests: the providers against the mock upstream over real HTTP connections on
//! 127.0.0.1, plus the SSE parser's property tests.

mod anthropic;
mod embeddings;
mod hostile;
mod openai;
mod pool;
mod secrets;
mod sse;

use futures_util::StreamExt;
use llm_tower_core::{ChatChunk, ChatRequest, LlmError, LlmResponse, Message, ResponseBody};
use llm_tower_providers::{
    AnthropicConfig, AnthropicProvider, ApiKey, HttpClient, OpenAiConfig, OpenAiProvider,
};
use llm_tower_test::MockUpstream;

pub(crate) const OPENAI_KEY: &str = "sk-test-OPENAI-do-not-print-1234";
pub(crate) const ANTHROPIC_KEY: &str = "sk-ant-test-ANTHROPIC-do-not-print-5678";

pub(crate) async fn upstream() -> (MockUpstream, HttpClient) {
    let up = MockUpstream::start().await;
    let client = HttpClient::with_defaults().expect("client");
    (up, client)
}

pub(crate) fn openai_config(up: &MockUpstream) -> OpenAiConfig {
    OpenAiConfig::new(format!("{}/v1", up.base_url()))
        .api_key(ApiKey::new(OPENAI_KEY))
        .api_key_env(None)
}

pub(crate) fn openai(up: &MockUpstream, client: &HttpClient) -> OpenAiProvider {
    OpenAiProvider::new(openai_config(up), client).expect("provider")
}

pub(crate) fn anthropic_config(up: &MockUpstream) -> AnthropicConfig {
    AnthropicConfig::new(up.base_url())
        .api_key(ApiKey::new(ANTHROPIC_KEY))
        .api_key_env(None)
}

pub(crate) fn anthropic(up: &MockUpstream, client: &HttpClient) -> AnthropicProvider {
    AnthropicProvider::new(anthropic_config(up), client).expect("provider")
}

pub(crate) fn request(stream: bool) -> ChatRequest {
    let mut req = ChatRequest::new(
        "test-model",
        vec![
            Message::system("You are terse."),
            Message::user("Say hello"),
        ],
    );
    if stream {
        req.stream = Some(true);
    }
    req
}

/// Every chunk of a streamed response, and the error that ended it, if any.
pub(crate) async fn drain(resp: LlmResponse) -> (Vec<ChatChunk>, Option<LlmError>) {
    let ResponseBody::Stream(mut s) = resp.body else {
        panic!("expected a stream");
    };
    let mut chunks = Vec::new();
    while let Some(item) = s.next().await {
        match item {
            Ok(c) => chunks.push(c),
            Err(e) => {
                assert!(s.next().await.is_none(), "a stream ends after its error");
                return (chunks, Some(e));
            }
        }
    }
    (chunks, None)
}

pub(crate) fn text_of(chunks: &[ChatChunk]) -> String {
    chunks
        .iter()
        .flat_map(|c| c.choices.iter())
        .filter_map(|c| c.delta.text())
        .collect()
}
