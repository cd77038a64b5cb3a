use llm_tower_core::ErrorKind;
use llm_tower_providers::{AnthropicConfig, ApiKey, OpenAiConfig, ProviderConfig};
use llm_tower_test::Scenario;
use tower::ServiceExt;

use crate::{
    ANTHROPIC_KEY, OPENAI_KEY, anthropic, anthropic_config, openai, openai_config, request,
    upstream,
};

fn assert_clean(text: &str) {
    assert!(!text.contains(OPENAI_KEY), "key leaked: {text}");
    assert!(!text.contains(ANTHROPIC_KEY), "key leaked: {text}");
    assert!(!text.contains("do-not-print"), "key leaked: {text}");
}

#[tokio::test]
async fn keys_never_appear_in_debug_errors_or_meta() {
    let (up, client) = upstream().await;
    let o = openai(&up, &client);
    let a = anthropic(&up, &client);
    assert_clean(&format!(
        "{o:?} {a:?} {:?} {:?}",
        openai_config(&up),
        anthropic_config(&up)
    ));
    assert_clean(&format!(
        "{:?} {}",
        ApiKey::new(OPENAI_KEY),
        ApiKey::new(OPENAI_KEY)
    ));
    let cfg: ProviderConfig =
        serde_json::from_value(serde_json::json!({"kind": "openai", "api_key": OPENAI_KEY}))
            .unwrap();
    assert_clean(&format!("{cfg:?}"));

    for (scenario, stream) in [
        (Scenario::unauthorized(), false),
        (Scenario::rate_limited(1), true),
        (Scenario::ok().malformed_json(), false),
        (Scenario::ok().malformed_sse(), true),
    ] {
        up.push(scenario.clone());
        let e = match o.clone().oneshot(request(stream)).await {
            Err(e) => e,
            Ok(r) => crate::drain(r).await.1.unwrap(),
        };
        assert_clean(&format!("{e:?} {e} {}", e.to_openai_json()));
        up.push(scenario);
        let e = match a.clone().oneshot(request(stream)).await {
            Err(e) => e,
            Ok(r) => crate::drain(r).await.1.unwrap(),
        };
        assert_clean(&format!("{e:?} {e} {}", e.to_openai_json()));
    }
    let ok = o.clone().oneshot(request(false)).await.unwrap();
    assert_clean(&format!("{ok:?}"));
}

#[tokio::test]
async fn echoed_key_is_redacted() {
    // A server that puts the key it got into its error message.
    let body: &'static str = Box::leak(
        format!(r#"{{"error":{{"message":"Incorrect API key provided: {OPENAI_KEY}.","code":"invalid_api_key"}}}}"#)
            .into_boxed_str(),
    );
    let base = serve_status(401, body).await;
    let client = llm_tower_providers::HttpClient::with_defaults().unwrap();
    let cfg = OpenAiConfig::new(format!("{base}/v1")).api_key(ApiKey::new(OPENAI_KEY));
    let p = llm_tower_providers::OpenAiProvider::new(cfg, &client).unwrap();
    let e = p.oneshot(request(false)).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Auth);
    assert!(e.message().contains("<redacted>"), "{e}");
    assert_clean(&format!("{e:?} {e}"));
}

#[test]
fn key_from_env() {
    // A name no environment sets.
    let var = "LLM_TOWER_PROVIDERS_TEST_KEY_FROM_ENV";
    assert_eq!(ApiKey::from_env(var).unwrap_err().kind(), ErrorKind::Auth);
    // Edition 2024 makes `set_var` unsafe and the workspace forbids unsafe code, so only
    // the missing-variable path and a config without key are checked here.
    let cfg = AnthropicConfig::default().api_key_env(Some(var.into()));
    let client = llm_tower_providers::HttpClient::with_defaults().unwrap();
    let p = llm_tower_providers::AnthropicProvider::new(cfg, &client).unwrap();
    assert!(!p.has_api_key());
    let e = ApiKey::from_env(var).unwrap_err();
    assert!(e.message().contains(var));
}

async fn serve_status(status: u16, body: &'static str) -> String {
    use std::convert::Infallible;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |_req| async move {
                    let mut resp = http::Response::new(http_body_util::Full::new(
                        bytes::Bytes::from_static(body.as_bytes()),
                    ));
                    *resp.status_mut() = http::StatusCode::from_u16(status).unwrap();
                    Ok::<_, Infallible>(resp)
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(tcp), svc)
                    .await;
            });
        }
    });
    format!("http://{addr}")
}

#[test]
fn vendor_key_is_never_sent_to_another_host() {
    // Whatever OPENAI_API_KEY holds, a provider pointed elsewhere without `api_key_env`
    // does not pick it up.
    let client = llm_tower_providers::HttpClient::with_defaults().unwrap();
    let p = llm_tower_providers::OpenAiProvider::new(
        OpenAiConfig::new("https://openrouter.ai/api/v1"),
        &client,
    )
    .unwrap();
    assert!(!p.has_api_key());
}
