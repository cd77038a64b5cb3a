//! The router behind a real socket, with a real HTTP client, and graceful shutdown.

use std::net::SocketAddr;
use std::time::Duration;

use http::Request;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use llm_tower_axum::{ClientKeys, OpenAiRouter, ShutdownOutcome, serve};
use llm_tower_test::{MockLlm, Step};
use tokio::net::TcpListener;
use tokio::sync::oneshot;

type HttpClient = Client<hyper_util::client::legacy::connect::HttpConnector, Full<bytes::Bytes>>;

fn client() -> HttpClient {
    Client::builder(TokioExecutor::new()).build_http()
}

fn chat(addr: SocketAddr, body: &str) -> Request<Full<bytes::Bytes>> {
    Request::post(format!("http://{addr}/v1/chat/completions"))
        .header("content-type", "application/json")
        .header("authorization", "Bearer sk-1")
        .body(Full::new(bytes::Bytes::from(body.to_owned())))
        .unwrap()
}

async fn start(
    mock: &MockLlm,
) -> (
    SocketAddr,
    oneshot::Sender<()>,
    tokio::task::JoinHandle<std::io::Result<ShutdownOutcome>>,
) {
    let app = OpenAiRouter::new(mock.clone())
        .client_keys(ClientKeys::new().with_key("sk-1", "t1"))
        .into_router();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = oneshot::channel::<()>();
    let server = tokio::spawn(serve(
        listener,
        app,
        async move {
            let _ = rx.await;
        },
        Duration::from_secs(30),
    ));
    (addr, tx, server)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_and_sse_over_a_socket() {
    let mock = MockLlm::new("mock")
        .then(Step::reply("over the wire"))
        .then(Step::stream(["a", "b"]));
    let (addr, stop, server) = start(&mock).await;
    let client = client();

    let body = r#"{"model":"m","messages":[{"role":"user","content":"hi"}]}"#;
    let resp = client.request(chat(addr, body)).await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-llm-provider"], "mock");
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    let v: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
    assert_eq!(v["choices"][0]["message"]["content"], "over the wire");
    assert_eq!(
        mock.last_request().unwrap().tenant().unwrap().as_str(),
        "t1"
    );

    let body = r#"{"model":"m","messages":[{"role":"user","content":"hi"}],"stream":true}"#;
    let resp = client.request(chat(addr, body)).await.unwrap();
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    let text = std::str::from_utf8(&bytes).unwrap();
    assert!(text.starts_with("data: {"), "{text}");
    assert!(text.ends_with("\n\ndata: [DONE]\n\n"), "{text}");

    // Without a key: 401 with a JSON body over the wire too.
    let req = Request::get(format!("http://{addr}/v1/models"))
        .body(Full::default())
        .unwrap();
    let resp = client.request(req).await.unwrap();
    assert_eq!(resp.status(), 401);
    assert_eq!(resp.headers()["content-type"], "application/json");

    stop.send(()).unwrap();
    drop(client);
    assert_eq!(server.await.unwrap().unwrap(), ShutdownOutcome::Graceful);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_finishes_an_in_flight_stream() {
    let mock = MockLlm::new("mock")
        .then(Step::stream(["one", "two", "three", "four"]).chunk_delay(Duration::from_millis(50)));
    let (addr, stop, server) = start(&mock).await;
    let client = client();

    let body = r#"{"model":"m","messages":[{"role":"user","content":"hi"}],"stream":true}"#;
    let resp = client.request(chat(addr, body)).await.unwrap();
    assert_eq!(resp.status(), 200);
    // Headers are here, chunks are still coming: ask the server to stop now.
    stop.send(()).unwrap();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    let text = std::str::from_utf8(&bytes).unwrap();
    for word in ["one", "two", "three", "four"] {
        assert!(text.contains(word), "{text}");
    }
    assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
    drop(client);
    assert_eq!(server.await.unwrap().unwrap(), ShutdownOutcome::Graceful);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_deadline_gives_up_on_a_hung_stream() {
    let mock =
        MockLlm::new("mock").then(Step::stream(["a", "b"]).chunk_delay(Duration::from_secs(3600)));
    let app = OpenAiRouter::new(mock.clone()).into_router();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = oneshot::channel::<()>();
    let server = tokio::spawn(serve(
        listener,
        app,
        async move {
            let _ = rx.await;
        },
        Duration::from_millis(100),
    ));
    let client = client();
    let body = r#"{"model":"m","messages":[{"role":"user","content":"hi"}],"stream":true}"#;
    let mut req = chat(addr, body);
    req.headers_mut().remove("authorization");
    let resp = client.request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    tx.send(()).unwrap();
    assert_eq!(
        server.await.unwrap().unwrap(),
        ShutdownOutcome::DeadlineExceeded
    );
    drop(resp);
}
