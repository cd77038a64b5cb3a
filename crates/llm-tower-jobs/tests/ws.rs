//! `GET /v1/jobs/ws` with a real WebSocket client (tokio-tungstenite) over TCP: step
//! progress pushed as it happens, the final message with the result, many jobs on one
//! socket, tenant scoping, the subscription cap, bad messages, the frame size limit and
//! the idle timeout.

#![cfg(feature = "http")]

mod common;

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::Request;
use axum::middleware::Next;
use common::within;
use futures_util::{SinkExt, StreamExt};
use llm_tower_core::{ChatRequest, Message as ChatMessage, Tenant, boxed};
use llm_tower_jobs::{
    JobOptions, Jobs, JobsApiLimits, JobsWsLimits, JobsWsStats, jobs_router_with,
};
use llm_tower_test::{MockLlm, Step};
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio::sync::Notify;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

struct Server {
    url: String,
    jobs: Jobs,
    stats: Arc<JobsWsStats>,
    gate: Arc<Notify>,
    _db: common::TempDb,
}

/// The jobs router behind a stand-in for the auth middleware (`x-tenant` → [`Tenant`]),
/// served on a real port, with a worker and a three-step job kind whose second step waits
/// for `gate`.
async fn server(ws: JobsWsLimits) -> Server {
    let db = common::TempDb::new();
    let jobs = Jobs::builder(db.store().await)
        .event_poll_interval(Duration::from_millis(50))
        .build();
    let gate = Arc::new(Notify::new());
    let g = gate.clone();
    jobs.register("steps", move |ctx, _input| {
        let gate = g.clone();
        async move {
            ctx.set_total_steps(3);
            let a: u32 = ctx.step("one", || async { Ok(1) }).await?;
            let b: u32 = ctx
                .step("two", || async {
                    gate.notified().await;
                    Ok(2)
                })
                .await?;
            let c: u32 = ctx.step("three", || async { Ok(3) }).await?;
            Ok(json!({"sum": a + b + c}))
        }
    });
    // A job with a 2 MB result, for the slow-reader test.
    jobs.register("big", |_ctx, _input| async move {
        Ok(json!({"blob": "x".repeat(2_000_000)}))
    });
    let mock = MockLlm::new("m").otherwise(Step::reply("hello from the job"));
    let (worker, _handle) = jobs
        .worker(boxed(mock))
        .poll_interval(Duration::from_millis(20))
        .build();
    tokio::spawn(worker.run());
    let stats = ws.stats();
    let app: Router = jobs_router_with(jobs.clone(), JobsApiLimits::default().websocket(ws)).layer(
        axum::middleware::from_fn(|mut req: Request, next: Next| async move {
            if let Some(t) = req.headers().get("x-tenant").and_then(|v| v.to_str().ok()) {
                let t = Tenant::from(t);
                req.extensions_mut().insert(t);
            }
            next.run(req).await
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    Server {
        url: format!("ws://{addr}/v1/jobs/ws"),
        jobs,
        stats,
        gate,
        _db: db,
    }
}

async fn connect(s: &Server, tenant: &str) -> Ws {
    let mut req = s.url.as_str().into_client_request().unwrap();
    req.headers_mut()
        .insert("x-tenant", tenant.parse().unwrap());
    let (ws, resp) = within("connect", tokio_tungstenite::connect_async(req))
        .await
        .unwrap();
    assert_eq!(resp.status(), 101);
    ws
}

async fn send(ws: &mut Ws, v: Value) {
    ws.send(Message::text(v.to_string())).await.unwrap();
}

/// The next JSON text message (pings skipped).
async fn next(ws: &mut Ws) -> Value {
    within("a message", async {
        loop {
            match ws.next().await {
                Some(Ok(Message::Text(t))) => return serde_json::from_str(t.as_str()).unwrap(),
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
                other => panic!("expected a text message, got {other:?}"),
            }
        }
    })
    .await
}

async fn submit_steps(s: &Server, tenant: &str) -> String {
    let sub = s
        .jobs
        .submit(
            &Tenant::from(tenant),
            "steps",
            json!({}),
            JobOptions::default(),
        )
        .await
        .unwrap();
    sub.job.id.to_string()
}

async fn submit_chat(s: &Server, tenant: &str) -> String {
    let req = ChatRequest::new("m", vec![ChatMessage::user("hi")]);
    let sub = s
        .jobs
        .submit_chat(&Tenant::from(tenant), req, JobOptions::default())
        .await
        .unwrap();
    sub.job.id.to_string()
}

#[tokio::test(flavor = "multi_thread")]
async fn step_progress_is_pushed_and_the_final_message_carries_the_result() {
    let s = server(JobsWsLimits::default()).await;
    let id = submit_steps(&s, "acme").await;
    let mut ws = connect(&s, "acme").await;
    send(&mut ws, json!({"type": "subscribe", "ids": [id]})).await;
    assert_eq!(next(&mut ws).await, json!({"type": "subscribed", "id": id}));

    // Step two waits for the gate: the socket must show step two running before it opens.
    let mut seen_steps = Vec::new();
    // Updates received: each was counted before it was sent. How many there are depends
    // on how far the job got before the subscription (a state is sent, not every step).
    let mut received = 0;
    loop {
        let m = next(&mut ws).await;
        received += 1;
        assert_eq!(m["type"], "job", "{m}");
        assert_eq!(m["job"]["id"], id);
        if let Some(step) = m["job"]["progress"]["step"].as_str() {
            seen_steps.push(step.to_owned());
            if step == "two" {
                break;
            }
        }
    }
    assert!(seen_steps.contains(&"two".to_owned()), "{seen_steps:?}");
    s.gate.notify_one();
    let fin = loop {
        let m = next(&mut ws).await;
        received += 1;
        if m["type"] == "final" {
            break m;
        }
        assert_eq!(m["type"], "job", "{m}");
    };
    assert_eq!(fin["job"]["status"], "succeeded");
    assert_eq!(fin["job"]["result"], json!({"sum": 6}));
    assert!(received >= 2);
    assert!(s.stats.updates() >= received, "{received}");
}

#[tokio::test(flavor = "multi_thread")]
async fn one_socket_follows_many_jobs_and_other_tenants_jobs_are_not_found() {
    let s = server(JobsWsLimits::default()).await;
    let a = submit_chat(&s, "acme").await;
    let b = submit_chat(&s, "acme").await;
    let theirs = submit_chat(&s, "globex").await;
    let mut ws = connect(&s, "acme").await;
    send(
        &mut ws,
        json!({"type": "subscribe", "ids": [a, b, theirs, "not-a-uuid"]}),
    )
    .await;
    let mut finals = std::collections::HashMap::new();
    let mut errors = Vec::new();
    while finals.len() < 2 || errors.len() < 2 {
        let m = next(&mut ws).await;
        match m["type"].as_str().unwrap() {
            "final" => {
                let id = m["job"]["id"].as_str().unwrap().to_owned();
                finals.insert(id, m["job"].clone());
            }
            "error" => errors.push(m),
            "subscribed" | "job" => {}
            other => panic!("unexpected {other}: {m}"),
        }
    }
    for id in [&a, &b] {
        let job = &finals[id.as_str()];
        assert_eq!(job["status"], "succeeded");
        assert_eq!(
            job["result"]["choices"][0]["message"]["content"],
            "hello from the job"
        );
    }
    // Another tenant's job and a malformed id get the same answer.
    let ids: Vec<&str> = errors.iter().map(|e| e["id"].as_str().unwrap()).collect();
    assert_eq!(ids, vec![theirs.as_str(), "not-a-uuid"]);
    for e in &errors {
        assert_eq!(e["error"]["code"], "not_found");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_subscription_cap_and_bad_messages_are_answered_and_counted() {
    let s = server(JobsWsLimits::default().max_subscriptions(1)).await;
    let a = submit_steps(&s, "acme").await;
    let b = submit_steps(&s, "acme").await;
    let mut ws = connect(&s, "acme").await;
    send(&mut ws, json!({"type": "subscribe", "ids": [a, b]})).await;
    let mut refused = None;
    while refused.is_none() {
        let m = next(&mut ws).await;
        if m["type"] == "error" {
            refused = Some(m);
        }
    }
    let refused = refused.unwrap();
    assert_eq!(refused["id"], b.as_str());
    assert_eq!(refused["error"]["code"], "too_many_subscriptions");
    assert_eq!(s.stats.refused_subscriptions(), 1);

    ws.send(Message::text("{\"type\": \"frobnicate\"}"))
        .await
        .unwrap();
    let m = loop {
        let m = next(&mut ws).await;
        if m["type"] == "error" {
            break m;
        }
    };
    assert_eq!(m["error"]["code"], "invalid_message");
    assert_eq!(s.stats.invalid_messages(), 1);

    // Unsubscribing frees the slot.
    send(&mut ws, json!({"type": "unsubscribe", "ids": [a]})).await;
    send(&mut ws, json!({"type": "subscribe", "ids": [b]})).await;
    loop {
        let m = next(&mut ws).await;
        if m["type"] == "subscribed" {
            assert_eq!(m["id"], b.as_str());
            break;
        }
        assert_ne!(m["type"], "error", "{m}");
    }
    s.gate.notify_waiters();
}

#[tokio::test(flavor = "multi_thread")]
async fn an_oversized_frame_closes_the_socket() {
    let s = server(JobsWsLimits::default().max_client_message_bytes(1024)).await;
    let mut ws = connect(&s, "acme").await;
    let big = format!(
        "{{\"type\":\"subscribe\",\"ids\":[\"{}\"]}}",
        "x".repeat(4096)
    );
    ws.send(Message::text(big)).await.unwrap();
    let closed = within("close", async {
        loop {
            match ws.next().await {
                Some(Ok(Message::Close(frame))) => return frame.map(|f| u16::from(f.code)),
                Some(Ok(_)) => {}
                Some(Err(_)) | None => return None,
            }
        }
    })
    .await;
    assert_eq!(closed, Some(1009));
    assert_eq!(s.stats.oversized_closes(), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_socket_without_subscriptions_is_closed_when_idle() {
    let s = server(JobsWsLimits::default().idle_timeout(Duration::from_millis(200))).await;
    let mut ws = connect(&s, "acme").await;
    let closed = within("idle close", async {
        loop {
            match ws.next().await {
                Some(Ok(Message::Close(frame))) => return frame.map(|f| u16::from(f.code)),
                Some(Ok(_)) => {}
                Some(Err(_)) | None => return None,
            }
        }
    })
    .await;
    assert_eq!(closed, Some(1000));
    assert_eq!(s.stats.idle_closes(), 1);
    assert_eq!(s.stats.connections(), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn sockets_past_the_cap_are_refused_before_the_upgrade() {
    let s = server(JobsWsLimits::default().max_sockets(1)).await;
    let mut first = connect(&s, "acme").await;
    let mut req = s.url.as_str().into_client_request().unwrap();
    req.headers_mut()
        .insert("x-tenant", "acme".parse().unwrap());
    match tokio_tungstenite::connect_async(req).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
            assert_eq!(resp.status(), 503);
        }
        other => panic!("expected a 503, got {:?}", other.map(|_| ())),
    }
    assert_eq!(s.stats.refused_sockets(), 1);
    // Closing the first frees the slot.
    first.close(None).await.unwrap();
    within("the slot to free", async {
        while s.stats.open() > 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    let _second = connect(&s, "acme").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_client_that_does_not_read_is_disconnected_and_counted() {
    let s = server(JobsWsLimits::default().write_timeout(Duration::from_millis(200))).await;
    let tenant = Tenant::from("acme");
    let mut ids = Vec::new();
    for _ in 0..16 {
        let sub = s
            .jobs
            .submit(&tenant, "big", json!({}), JobOptions::default())
            .await
            .unwrap();
        ids.push(sub.job.id);
    }
    for id in &ids {
        common::wait_done(&s.jobs, &tenant, *id).await;
    }
    let mut ws = connect(&s, "acme").await;
    let ids: Vec<String> = ids.iter().map(ToString::to_string).collect();
    send(&mut ws, json!({"type": "subscribe", "ids": ids})).await;
    // 32 MB of final states queue up behind a client that reads nothing.
    within("the slow client to be dropped", async {
        while s.stats.slow_closes() == 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert_eq!(s.stats.slow_closes(), 1);
    drop(ws);
}
