//! A private `redis-server` for fault tests: started on a free port, killed on drop, and
//! restartable (without data) on the same port.
#![allow(dead_code)] // each test file uses a part

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::Duration;

/// A `redis-server --port N --save '' --appendonly no` child process.
pub(crate) struct RedisServer {
    port: u16,
    child: Mutex<Option<Child>>,
}

impl RedisServer {
    /// Starts a server on a free port and waits until it answers `PING`. Panics (the test
    /// fails) when `redis-server` is not on PATH: such tests are `#[ignore]`d by default.
    pub(crate) async fn start() -> Self {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let s = Self {
            port,
            child: Mutex::new(None),
        };
        s.spawn().await;
        s
    }

    /// `redis://127.0.0.1:PORT`.
    pub(crate) fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Starts the server again on the same port (after [`kill`](Self::kill)), empty.
    pub(crate) async fn spawn(&self) {
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string()])
            .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .args(["--enable-debug-command", "local"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start redis-server (is it on PATH?): {e}"));
        *self.child.lock().unwrap() = Some(child);
        for _ in 0..500 {
            if self.ping().await {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("redis-server on port {} did not answer PING", self.port);
    }

    /// Whether the server answers `PING` (within 10 s: a paused server answers late).
    async fn ping(&self) -> bool {
        let Ok(client) = redis::Client::open(self.url()) else {
            return false;
        };
        let Ok(Ok(mut c)) = tokio::time::timeout(
            Duration::from_millis(500),
            client.get_multiplexed_async_connection(),
        )
        .await
        else {
            return false;
        };
        matches!(
            tokio::time::timeout(
                Duration::from_secs(10),
                redis::cmd("PING").query_async::<String>(&mut c),
            )
            .await,
            Ok(Ok(p)) if p == "PONG"
        )
    }

    /// Waits until the server answers `PING` (e.g. the end of a pause).
    pub(crate) async fn wait_answering(&self) {
        for _ in 0..1000 {
            if self.ping().await {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("redis-server on port {} does not answer", self.port);
    }

    /// Kills the server (its data is gone: it never saves).
    pub(crate) fn kill(&self) {
        let child = self.child.lock().unwrap().take();
        if let Some(mut child) = child {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Kills the server and starts an empty one on the same port.
    pub(crate) async fn restart(&self) {
        self.kill();
        self.spawn().await;
    }

    /// Sends one command on a fresh connection, without waiting for its answer (e.g.
    /// `DEBUG SLEEP`, which blocks the server), from a background task.
    pub(crate) fn send(&self, args: &[&str]) {
        let url = self.url();
        let args: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
        tokio::spawn(async move {
            let client = redis::Client::open(url).expect("url");
            let mut c = client
                .get_multiplexed_async_connection()
                .await
                .expect("connect to the test redis-server");
            let mut cmd = redis::cmd(&args[0]);
            for a in &args[1..] {
                cmd.arg(a);
            }
            let _ = cmd.query_async::<redis::Value>(&mut c).await;
        });
    }

    /// Runs one command and waits for its answer (e.g. `CLIENT PAUSE ms ALL`).
    pub(crate) async fn run(&self, args: &[&str]) {
        let client = redis::Client::open(self.url()).expect("url");
        let mut c = client
            .get_multiplexed_async_connection()
            .await
            .expect("connect to the test redis-server");
        let mut cmd = redis::cmd(args[0]);
        for a in &args[1..] {
            cmd.arg(*a);
        }
        cmd.query_async::<redis::Value>(&mut c)
            .await
            .unwrap_or_else(|e| panic!("{args:?}: {e}"));
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}
