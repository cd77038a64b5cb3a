//! Embeddings on the OpenAI-compatible provider, against the mock upstream.

use llm_tower_core::{
    ChatRequest, EmbeddingInput, EmbeddingsRequest, EncodingFormat, ErrorKind, ResponseBody,
};
use llm_tower_providers::OpenAiProvider;
use llm_tower_test::Scenario;
use serde_json::{Value, json};
use tower::ServiceExt;

use crate::{anthropic, openai, openai_config, upstream};

fn envelope(format: Option<EncodingFormat>) -> ChatRequest {
    let mut emb = EmbeddingsRequest::from_slice(
        br#"{"model":"alias","input":["one","two words"],"dimensions":4,"user":"u1","x_vendor":{"k":1}}"#,
    )
    .unwrap();
    emb.encoding_format = format;
    ChatRequest::embeddings(emb)
}

#[tokio::test]
async fn posts_to_embeddings_with_the_body_as_sent_and_the_mapped_model() {
    let (up, client) = upstream().await;
    let provider = OpenAiProvider::new(
        openai_config(&up).model("alias", "text-embedding-3-small"),
        &client,
    )
    .unwrap();
    for format in [
        None,
        Some(EncodingFormat::Float),
        Some(EncodingFormat::Base64),
    ] {
        let resp = provider.clone().oneshot(envelope(format)).await.unwrap();
        assert_eq!(resp.meta.provider.as_deref(), Some("openai"));
        assert!(resp.meta.usage.as_ref().unwrap().prompt_tokens > 0);
        assert!(resp.meta.headroom.is_some());
        let ResponseBody::Embeddings(body) = resp.body else {
            panic!("not an embeddings answer");
        };
        assert_eq!(body.data.len(), 2);
        assert!(body.data.iter().all(|v| v.len() == 4));
        assert_ne!(body.data[0], body.data[1]);
        let sent = up.last_request().unwrap();
        assert_eq!(sent.path, "/v1/embeddings");
        let mut want = json!({
            "model": "text-embedding-3-small", "input": ["one", "two words"], "dimensions": 4,
            "user": "u1", "x_vendor": {"k": 1},
        });
        if let Some(f) = format {
            want["encoding_format"] = Value::from(f.as_str());
        }
        assert_eq!(sent.json().unwrap(), want);
    }
    // Both encodings decode to the same vectors.
    let a = provider
        .clone()
        .oneshot(envelope(None))
        .await
        .unwrap()
        .into_embeddings();
    let b = provider
        .clone()
        .oneshot(envelope(Some(EncodingFormat::Base64)))
        .await
        .unwrap()
        .into_embeddings();
    assert_eq!(a.unwrap().data, b.unwrap().data);
}

#[tokio::test]
async fn token_inputs_and_a_single_input_go_as_sent() {
    let (up, client) = upstream().await;
    let mut emb = EmbeddingsRequest::new("m", Vec::<String>::new());
    emb.input = vec![EmbeddingInput::Tokens(vec![1, 2, 3])];
    emb.single = true;
    let resp = openai(&up, &client)
        .oneshot(ChatRequest::embeddings(emb))
        .await
        .unwrap();
    assert_eq!(resp.into_embeddings().unwrap().data.len(), 1);
    assert_eq!(
        up.last_request().unwrap().json().unwrap()["input"],
        json!([1, 2, 3])
    );
}

#[tokio::test]
async fn upstream_failures_are_classified() {
    let (up, client) = upstream().await;
    up.push(Scenario::unavailable());
    let e = openai(&up, &client)
        .oneshot(envelope(None))
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Unavailable);
    assert!(e.should_fall_back());
    up.push(Scenario::ok().malformed_json());
    let e = openai(&up, &client)
        .oneshot(envelope(None))
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Transport, "{e}");
    assert_eq!(e.provider(), Some("openai"));
}

#[tokio::test]
async fn the_anthropic_provider_refuses_embeddings_without_a_call() {
    let (up, client) = upstream().await;
    let e = anthropic(&up, &client)
        .oneshot(envelope(None))
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::BadRequest);
    assert_eq!(up.request_count(), 0);
}
