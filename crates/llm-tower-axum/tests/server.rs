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

/// A server with short timeouts, its stats, and a way to stop it.
async fn start_shedding(
    mock: &MockLlm,
    max_connections: usize,
) -> (
    SocketAddr,
    llm_tower_axum::ConnectionStats,
    oneshot::Sender<()>,
    tokio::task::JoinHandle<std::io::Result<ShutdownOutcome>>,
) {
    let app = OpenAiRouter::new(mock.clone())
        .client_keys(ClientKeys::new().with_key("sk-1", "t1"))
        .into_router();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = llm_tower_axum::Server::new()
        .header_read_timeout(Duration::from_millis(300))
        .idle_timeout(Duration::from_millis(600))
        .body_read_timeout(Duration::from_millis(300))
        .max_connections(max_connections)
        .grace(Duration::from_secs(5));
    let stats = server.stats();
    let (tx, rx) = oneshot::channel::<()>();
    let task = tokio::spawn(server.serve(listener, app, async move {
        let _ = rx.await;
    }));
    (addr, stats, tx, task)
}

/// Reads until the server closes the connection (EOF or reset); what it sent, if anything.
async fn until_closed(mut s: tokio::net::TcpStream) -> Vec<u8> {
    use tokio::io::AsyncReadExt;
    let mut out = Vec::new();
    let mut buf = [0u8; 1024];
    loop {
        match s.read(&mut buf).await {
            Ok(0) | Err(_) => return out,
            Ok(n) => out.extend_from_slice(&buf[..n]),
        }
    }
}

/// Generous: only "closed eventually" is asserted, never how fast.
const BOUND: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_connections_are_closed_while_requests_are_served() {
    use tokio::io::AsyncWriteExt;
    let mock = MockLlm::new("mock").otherwise(Step::reply("still here"));
    let (addr, stats, stop, server) = start_shedding(&mock, 10_000).await;

    // 300 clients each send half a request header, then nothing (and one sends nothing).
    let mut slow = Vec::new();
    for _ in 0..300 {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-ty")
            .await
            .unwrap();
        slow.push(tokio::spawn(until_closed(s)));
    }
    slow.push(tokio::spawn(until_closed(
        tokio::net::TcpStream::connect(addr).await.unwrap(),
    )));

    // Meanwhile ordinary requests are answered, on fresh and on reused connections.
    let client = client();
    let body = r#"{"model":"m","messages":[{"role":"user","content":"hi"}]}"#;
    let serving = async {
        for _ in 0..20 {
            let resp = client.request(chat(addr, body)).await.unwrap();
            assert_eq!(resp.status(), 200);
            resp.into_body().collect().await.unwrap();
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    let closed = async {
        for s in slow {
            let sent = tokio::time::timeout(BOUND, s)
                .await
                .expect("a slow connection is closed")
                .unwrap();
            // Closed without an answer, or with hyper's 408-less close: never a 200.
            assert!(!String::from_utf8_lossy(&sent).contains(" 200 "));
        }
    };
    tokio::join!(serving, closed);
    assert!(stats.accepted() >= 301, "{}", stats.accepted());

    // Every slow connection is gone; a new one is still served.
    let resp = client.request(chat(addr, body)).await.unwrap();
    assert_eq!(resp.status(), 200);
    resp.into_body().collect().await.unwrap();
    stop.send(()).unwrap();
    drop(client);
    assert_eq!(server.await.unwrap().unwrap(), ShutdownOutcome::Graceful);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_keep_alive_connections_are_closed() {
    use tokio::io::AsyncWriteExt;
    let mock = MockLlm::new("mock").otherwise(Step::reply("ok"));
    let (addr, stats, stop, server) = start_shedding(&mock, 100).await;
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let body = r#"{"model":"m","messages":[{"role":"user","content":"hi"}]}"#;
    let req = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nauthorization: Bearer sk-1\r\n\
         content-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await.unwrap();
    // The answer comes, then the kept-alive connection is closed once idle.
    let sent = tokio::time::timeout(BOUND, until_closed(s))
        .await
        .expect("an idle connection is closed");
    let sent = String::from_utf8_lossy(&sent);
    assert!(sent.starts_with("HTTP/1.1 200"), "{sent}");
    assert!(sent.contains("still") || sent.contains("ok"), "{sent}");
    let _ = stats;
    stop.send(()).unwrap();
    assert_eq!(server.await.unwrap().unwrap(), ShutdownOutcome::Graceful);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_over_the_cap_are_refused_and_counted() {
    let mock = MockLlm::new("mock").otherwise(Step::reply("ok"));
    let (addr, stats, stop, server) = start_shedding(&mock, 5).await;
    let mut held = Vec::new();
    for _ in 0..5 {
        held.push(tokio::net::TcpStream::connect(addr).await.unwrap());
    }
    // Accepted one at a time: wait until the server counts all five open.
    tokio::time::timeout(BOUND, async {
        while stats.open() < 5 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("five connections open");
    let extra = tokio::net::TcpStream::connect(addr).await.unwrap();
    let sent = tokio::time::timeout(BOUND, until_closed(extra))
        .await
        .expect("the connection over the cap is closed");
    assert!(sent.is_empty());
    assert!(stats.refused() >= 1);

    // Once the held ones are shed (idle), new clients are served again.
    tokio::time::timeout(BOUND, async {
        while stats.open() > 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("idle connections are shed");
    assert!(stats.idle_closed() >= 1 || stats.open() == 0);
    let client = client();
    let body = r#"{"model":"m","messages":[{"role":"user","content":"hi"}]}"#;
    let resp = client.request(chat(addr, body)).await.unwrap();
    assert_eq!(resp.status(), 200);
    drop(held);
    stop.send(()).unwrap();
    drop(client);
    server.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_that_does_not_arrive_in_time_is_a_408() {
    use tokio::io::AsyncWriteExt;
    let mock = MockLlm::new("mock").otherwise(Step::reply("ok"));
    let (addr, _stats, stop, server) = start_shedding(&mock, 100).await;
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    // The header, then 10 of the 100 bytes announced, then nothing.
    s.write_all(
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nauthorization: Bearer sk-1\r\n\
          content-type: application/json\r\ncontent-length: 100\r\n\r\n{\"model\":",
    )
    .await
    .unwrap();
    let sent = tokio::time::timeout(BOUND, until_closed(s))
        .await
        .expect("the connection is answered and closed");
    let sent = String::from_utf8_lossy(&sent);
    assert!(sent.starts_with("HTTP/1.1 408"), "{sent}");
    assert!(sent.contains("request_timeout"), "{sent}");
    assert_eq!(mock.calls(), 0);
    stop.send(()).unwrap();
    server.await.unwrap().unwrap();
}
