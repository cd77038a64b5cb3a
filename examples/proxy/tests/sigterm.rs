//! The real binary: SIGTERM while a stream is in flight lets the stream finish, then the
//! process exits cleanly.

#![cfg(unix)]

use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

fn config(port: u16) -> String {
    format!(
        r#"
[server]
listen = "127.0.0.1:{port}"
shutdown_grace_secs = 20

[providers.sim]
kind = "simulated"
simulated = {{ latency_ms = 50, token_delay_ms = 25 }}

[chains.main]
steps = [{{ provider = "sim", model = "sim-small" }}]

[routing]
default_chain = "main"

[jobs]
enabled = false
"#
    )
}

async fn request(port: u16, raw: &str) -> TcpStream {
    let mut s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    s.write_all(raw.as_bytes()).await.unwrap();
    s
}

#[tokio::test]
async fn sigterm_drains_an_in_flight_stream_then_exits() {
    let port = free_port();
    let dir = std::env::temp_dir().join(format!("llm-tower-sigterm-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("gateway.toml");
    std::fs::write(&path, config(port)).unwrap();

    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_llm-tower-proxy"))
        .arg("--config")
        .arg(&path)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();

    // Wait (bounded) until it answers.
    let mut up = false;
    for _ in 0..300 {
        if TcpStream::connect(("127.0.0.1", port)).await.is_ok() {
            up = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(up, "the gateway did not start");

    let body = r#"{"model":"sim-small","stream":true,"messages":[{"role":"user","content":"Tell me a long story about graceful shutdowns"}]}"#;
    let raw = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    let mut stream = request(port, &raw).await;
    let mut first = [0u8; 512];
    let n = stream.read(&mut first).await.unwrap();
    assert!(String::from_utf8_lossy(&first[..n]).starts_with("HTTP/1.1 200"));

    // SIGTERM while the answer is still streaming.
    let pid = child.id().unwrap().to_string();
    let status = tokio::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .await
        .unwrap();
    assert!(status.success());

    let mut rest = Vec::new();
    stream.read_to_end(&mut rest).await.unwrap();
    let text = String::from_utf8_lossy(&rest);
    assert!(text.contains("data: [DONE]"), "the stream was cut: {text}");

    let exit = child.wait().await.unwrap();
    assert!(exit.success(), "{exit:?}");
    let _ = std::fs::remove_dir_all(&dir);
}
