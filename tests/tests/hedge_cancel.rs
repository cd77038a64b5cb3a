//! A hedged request over a real provider client: the losing attempt's upstream connection
//! is closed when the other attempt wins, not left open until the slow answer comes.

use std::time::Duration;

use llm_tower::hedge::{HedgeDelay, HedgeLayer, Hedged};
use llm_tower::{ChatRequest, Message};
use llm_tower_providers::{HttpClient, OpenAiConfig, OpenAiProvider};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tower::{Layer, ServiceExt};

const ANSWER: &str = r#"{"id":"chatcmpl-1","object":"chat.completion","created":0,"model":"gpt-4o-mini","choices":[{"index":0,"message":{"role":"assistant","content":"from the second"},"finish_reason":"stop"}],"usage":{"prompt_tokens":5,"completion_tokens":3,"total_tokens":8}}"#;

/// Reads one HTTP/1.1 request (head, then a `content-length` body) from `conn`.
async fn read_request(conn: &mut TcpStream) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let n = conn.read(&mut chunk).await.unwrap();
        assert!(n > 0, "the client closed before sending its request");
        buf.extend_from_slice(&chunk[..n]);
        let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
            continue;
        };
        let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
        let len: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .map_or(0, |v| v.trim().parse().unwrap());
        if buf.len() >= end + 4 + len {
            return;
        }
    }
}

#[tokio::test]
async fn the_losing_attempts_upstream_connection_is_closed() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base_url = format!("http://{}/v1", listener.local_addr().unwrap());
    let (closed_tx, closed_rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        // The first attempt's connection: its request never gets an answer; the task
        // reports when the client closes the connection.
        let (mut first, _) = listener.accept().await.unwrap();
        read_request(&mut first).await;
        tokio::spawn(async move {
            let mut byte = [0u8; 1];
            // 0 bytes: the client closed it (an error counts as closed too).
            while matches!(first.read(&mut byte).await, Ok(n) if n > 0) {}
            let _ = closed_tx.send(());
        });
        // The second attempt's connection (the first one is busy): answers at once.
        let (mut second, _) = listener.accept().await.unwrap();
        read_request(&mut second).await;
        let resp = format!(
            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{ANSWER}",
            ANSWER.len()
        );
        second.write_all(resp.as_bytes()).await.unwrap();
        // Kept open: only the loser's connection is expected to close.
        std::future::pending::<()>().await;
    });

    let client = HttpClient::with_defaults().unwrap();
    let provider = OpenAiProvider::new(OpenAiConfig::new(base_url), &client).unwrap();
    let hedge = HedgeLayer::new()
        .delay(HedgeDelay::Fixed(Duration::from_millis(50)))
        .budget(1.0);
    let stats = hedge.stats();
    let svc = hedge.layer(provider);

    let req = ChatRequest::new("gpt-4o-mini", vec![Message::user("hello")]);
    let resp = svc.oneshot(req).await.unwrap();
    assert_eq!(
        resp.meta.extensions.get::<Hedged>(),
        Some(&Hedged { second_won: true })
    );
    assert_eq!(resp.meta.paid_attempts.len(), 1, "the loser is priced");
    assert_eq!(
        resp.into_complete().await.unwrap().text(),
        "from the second"
    );
    assert_eq!((stats.hedged(), stats.second_won()), (1, 1));
    // The loser's connection closes now; the guard only keeps a broken client from
    // hanging the test.
    tokio::time::timeout(Duration::from_secs(30), closed_rx)
        .await
        .expect("the losing attempt's upstream connection was not closed")
        .unwrap();
}
