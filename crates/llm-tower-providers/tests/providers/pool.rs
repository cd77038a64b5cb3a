use std::convert::Infallible;

use bytes::Bytes;
use futures_util::future::join_all;
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use llm_tower_providers::{HttpClient, OpenAiProvider};
use llm_tower_test::Scenario;
use tower::ServiceExt;

use crate::{anthropic, drain, openai, openai_config, request, upstream};

/// A tiny local HTTP/1.1 server answering every request with `body`; returns its base URL.
pub(crate) async fn serve_fixed(content_type: &'static str, body: &'static str) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let svc = service_fn(move |_req| async move {
                    let mut resp =
                        http::Response::new(Full::new(Bytes::from_static(body.as_bytes())));
                    resp.headers_mut().insert(
                        http::header::CONTENT_TYPE,
                        http::HeaderValue::from_static(content_type),
                    );
                    Ok::<_, Infallible>(resp)
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tcp), svc)
                    .await;
            });
        }
    });
    format!("http://{addr}")
}

#[tokio::test]
async fn sequential_requests_reuse_one_connection() {
    let (up, client) = upstream().await;
    let p = openai(&up, &client);
    for _ in 0..10 {
        p.clone().oneshot(request(false)).await.unwrap();
    }
    assert_eq!(up.connection_count(), 1);
    // Streams read to their end give their connection back too.
    for _ in 0..10 {
        let (_, err) = drain(p.clone().oneshot(request(true)).await.unwrap()).await;
        assert!(err.is_none());
    }
    assert!(
        up.connection_count() <= 2,
        "{} connections",
        up.connection_count()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_share_the_pool_across_providers() {
    let (up, client) = upstream().await;
    up.set_default(Scenario::ok().latency(std::time::Duration::from_millis(20)));
    // Two providers on the same host and one shared client: one pool.
    let a = openai(&up, &client);
    let b = OpenAiProvider::new(openai_config(&up).name("second"), &client).unwrap();
    let c = anthropic(&up, &client);
    const N: usize = 24;
    let wave = || {
        join_all((0..N).map(|i| {
            let (a, b, c) = (a.clone(), b.clone(), c.clone());
            async move {
                let r = match i % 3 {
                    0 => a.oneshot(request(false)).await,
                    1 => b.oneshot(request(false)).await,
                    _ => c.oneshot(request(false)).await,
                };
                r.unwrap().into_complete().await.unwrap();
            }
        }))
    };
    wave().await;
    let first = up.connection_count();
    assert!(first <= N, "{first}");
    for _ in 0..3 {
        wave().await;
    }
    let total = up.connection_count();
    assert_eq!(up.request_count(), 4 * N);
    // Later waves run on the pooled connections of the first.
    assert!(
        total <= first + N / 4,
        "{total} connections for {} requests (first wave {first})",
        4 * N
    );
}

#[tokio::test]
async fn clients_are_shared_not_rebuilt() {
    let client = HttpClient::with_defaults().unwrap();
    let clone = client.clone();
    assert!(client.shares_pool_with(&clone));
    assert!(!client.shares_pool_with(&HttpClient::with_defaults().unwrap()));
}

#[tokio::test]
async fn http2_prior_knowledge_works() {
    let (up, _) = upstream().await;
    let client = HttpClient::new(llm_tower_providers::HttpClientConfig {
        http2_only: true,
        ..Default::default()
    })
    .unwrap();
    let p = openai(&up, &client);
    let reqs = (0..8).map(|_| p.clone().oneshot(request(false)));
    for r in join_all(reqs).await {
        r.unwrap();
    }
    let (chunks, err) = drain(p.clone().oneshot(request(true)).await.unwrap()).await;
    assert!(err.is_none() && !chunks.is_empty());
    assert_eq!(
        up.connection_count(),
        1,
        "HTTP/2 multiplexes on one connection"
    );
}

#[test]
fn native_roots_need_the_feature() {
    let r = HttpClient::new(llm_tower_providers::HttpClientConfig {
        tls_roots: llm_tower_providers::TlsRoots::Native,
        ..Default::default()
    });
    if cfg!(feature = "native-roots") {
        // Succeeds when the system has a certificate store; either way, no panic.
        if let Err(e) = r {
            assert!(e.message().contains("TLS"), "{e}");
        }
    } else {
        let e = r.unwrap_err();
        assert!(e.message().contains("native-roots"), "{e}");
    }
}
