//! The binaries: `llm-tower-mock` serves the default scenario and stops gracefully on
//! ctrl-c; `llm-tower-bare-proxy` forwards bytes both ways and answers 502 without upstream.

use std::io::{BufRead, BufReader};
use std::process::{Child, ChildStderr, Command, Stdio};

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use llm_tower_test::{MockUpstream, Scenario};
use serde_json::Value;

/// Kills the child if the test fails before it exits. Holds the child's stderr open: a
/// binary that logs to a closed pipe fails.
struct Guard {
    child: Option<Child>,
    _stderr: BufReader<ChildStderr>,
}

impl Drop for Guard {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Starts `bin` with `args`; returns the guard and the base URL it announces on stderr.
fn spawn(bin: &str, args: &[&str]) -> (Guard, String) {
    let mut child = Command::new(bin)
        .args(args)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = BufReader::new(child.stderr.take().unwrap());
    let mut line = String::new();
    stderr.read_line(&mut line).unwrap();
    let guard = Guard {
        child: Some(child),
        _stderr: stderr,
    };
    let base = line
        .trim()
        .rsplit(' ')
        .next()
        .filter(|u| u.starts_with("http://"))
        .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
        .to_owned();
    (guard, base)
}

const CHAT: &str = r#"{"model":"m","messages":[{"role":"user","content":"hi"}]}"#;

/// POSTs [`CHAT`] to `{base}/v1/chat/completions`: the status and the body.
async fn chat(base: &str) -> (http::StatusCode, Bytes) {
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let req = Request::post(format!("{base}/v1/chat/completions"))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from_static(CHAT.as_bytes())))
        .unwrap();
    let resp = client.request(req).await.unwrap();
    let status = resp.status();
    (status, resp.into_body().collect().await.unwrap().to_bytes())
}

#[tokio::test]
async fn binary_serves_the_default_scenario_and_stops_on_sigint() {
    let (mut guard, base) = spawn(
        env!("CARGO_BIN_EXE_llm-tower-mock"),
        &["--addr", "127.0.0.1:0", "--text", "from the binary"],
    );
    let pid = guard.child.as_ref().unwrap().id();

    let (status, body) = chat(&base).await;
    assert_eq!(status, 200);
    let v: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["choices"][0]["message"]["content"], "from the binary");

    let status = Command::new("kill")
        .args(["-INT", &pid.to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let mut child = guard.child.take().unwrap();
    let exit = tokio::task::spawn_blocking(move || child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(exit.success(), "{exit:?}");
}

#[test]
fn binary_rejects_a_bad_scenario() {
    let out = Command::new(env!("CARGO_BIN_EXE_llm-tower-mock"))
        .args(["--addr", "127.0.0.1:0", "--scenario", r#"{"bogus":1}"#])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("invalid --scenario"));
}

#[tokio::test]
async fn bare_proxy_forwards_the_bytes_and_answers_502_without_upstream() {
    let mock = MockUpstream::start().await;
    mock.set_default(Scenario::ok().text("through the bare proxy"));
    let upstream = mock.addr().to_string();
    let (_guard, base) = spawn(
        env!("CARGO_BIN_EXE_llm-tower-bare-proxy"),
        &["--addr", "127.0.0.1:0", "--upstream", &upstream],
    );

    let (status, body) = chat(&base).await;
    assert_eq!(status, 200);
    let v: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(
        v["choices"][0]["message"]["content"],
        "through the bare proxy"
    );
    // The request reached the mock unchanged.
    let seen = mock.requests();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].body, CHAT.as_bytes());

    mock.shutdown().await;
    let (status, body) = chat(&base).await;
    assert_eq!(status, 502);
    assert!(body.is_empty());
}
