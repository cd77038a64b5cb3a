//! The HTTP endpoints: submit, poll, SSE from submit to the final state, cancel, 404,
//! idempotency, tenant isolation.

#![cfg(feature = "http")]

mod common;

use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::http::{Method, Request, StatusCode};
use common::within;
use http_body_util::BodyExt;
use llm_tower_core::{LlmError, Tenant, boxed};
use llm_tower_jobs::{Jobs, JobsApiLimits, WorkerHandle, jobs_router_with};
use llm_tower_test::{MockLlm, Step};
use serde_json::{Value, json};
use tower::ServiceExt;

struct App {
    _db: common::TempDb,
    router: Router,
    mock: MockLlm,
    handle: WorkerHandle,
}

async fn app(mock: MockLlm) -> App {
    app_with(mock, JobsApiLimits::default()).await
}

async fn app_with(mock: MockLlm, limits: JobsApiLimits) -> App {
    let db = common::TempDb::new();
    let jobs = Jobs::builder(db.store().await)
        .event_poll_interval(Duration::from_millis(50))
        .build();
    let (worker, handle) = jobs
        .worker(boxed(mock.clone()))
        .poll_interval(Duration::from_millis(20))
        .build();
    tokio::spawn(worker.run());
    App {
        _db: db,
        router: jobs_router_with(jobs, limits),
        mock,
        handle,
    }
}

fn request(method: Method, uri: &str, tenant: Option<&str>, body: Option<Value>) -> Request<Body> {
    let mut req = Request::builder().method(method).uri(uri);
    if body.is_some() {
        req = req.header("content-type", "application/json");
    }
    let mut req = req
        .body(body.map_or_else(Body::empty, |b| Body::from(b.to_string())))
        .unwrap();
    if let Some(t) = tenant {
        // What the auth middleware does.
        req.extensions_mut().insert(Tenant::from(t));
    }
    req
}

async fn send(app: &App, req: Request<Body>) -> (StatusCode, axum::http::HeaderMap, Vec<u8>) {
    let resp = within("response", app.router.clone().oneshot(req))
        .await
        .unwrap();
    let status = resp.status();
    let headers = resp.headers().clone();
    let body = within("body", resp.into_body().collect())
        .await
        .unwrap()
        .to_bytes();
    (status, headers, body.to_vec())
}

fn json_of(body: &[u8]) -> Value {
    serde_json::from_slice(body).unwrap_or_else(|e| panic!("not JSON ({e}): {body:?}"))
}

fn chat(text: &str) -> Value {
    json!({"model": "mock", "messages": [{"role": "user", "content": text}]})
}

async fn submit(app: &App, tenant: Option<&str>, body: Value) -> String {
    let (status, headers, body) =
        send(app, request(Method::POST, "/v1/jobs", tenant, Some(body))).await;
    assert_eq!(
        status,
        StatusCode::ACCEPTED,
        "{}",
        String::from_utf8_lossy(&body)
    );
    let v = json_of(&body);
    let id = v["id"].as_str().unwrap().to_owned();
    assert_eq!(v["status"], "queued");
    assert_eq!(headers["location"], format!("/v1/jobs/{id}"));
    id
}

async fn poll_until_done(app: &App, tenant: Option<&str>, id: &str) -> Value {
    within("job to finish", async {
        loop {
            let (status, _, body) = send(
                app,
                request(Method::GET, &format!("/v1/jobs/{id}"), tenant, None),
            )
            .await;
            assert_eq!(status, StatusCode::OK);
            let v = json_of(&body);
            if ["succeeded", "failed", "cancelled"].contains(&v["status"].as_str().unwrap()) {
                return v;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
}

/// Parses an SSE body into (event, data) pairs.
fn sse(body: &[u8]) -> Vec<(String, Value)> {
    let text = String::from_utf8_lossy(body);
    text.split("\n\n")
        .filter_map(|block| {
            let mut event = None;
            let mut data = String::new();
            for line in block.lines() {
                if let Some(e) = line.strip_prefix("event:") {
                    event = Some(e.trim().to_owned());
                } else if let Some(d) = line.strip_prefix("data:") {
                    data.push_str(d.trim_start());
                }
            }
            Some((event?, serde_json::from_str(&data).ok()?))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn submit_then_poll() {
    let app = app(MockLlm::new("m").then(Step::reply("Hello there"))).await;
    let id = submit(&app, Some("acme"), chat("hi")).await;
    let done = poll_until_done(&app, Some("acme"), &id).await;
    assert_eq!(done["status"], "succeeded");
    assert_eq!(done["object"], "job");
    assert_eq!(done["attempts"], 1);
    assert_eq!(
        done["result"]["choices"][0]["message"]["content"],
        "Hello there"
    );
    assert!(done["created_at_ms"].as_i64().unwrap() > 0);
    assert!(done["finished_at_ms"].as_i64().unwrap() >= done["created_at_ms"].as_i64().unwrap());
    assert!(done["error"].is_null());
    assert_eq!(app.mock.calls(), 1);
    app.handle.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_job_reports_the_classified_error() {
    let app = app(MockLlm::new("m").otherwise(Step::error(LlmError::auth("bad key")))).await;
    let id = submit(&app, None, chat("hi")).await;
    let done = poll_until_done(&app, None, &id).await;
    assert_eq!(done["status"], "failed");
    assert_eq!(done["error"]["kind"], "auth");
    assert_eq!(done["error"]["type"], "authentication_error");
    assert_eq!(done["error"]["status"], 401);
    app.handle.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_stream_from_submit_to_final_state() {
    let app =
        app(MockLlm::new("m").then(Step::reply("done").with_latency(Duration::from_millis(200))))
            .await;
    let id = submit(&app, Some("acme"), chat("hi")).await;
    let (status, headers, body) = send(
        &app,
        request(
            Method::GET,
            &format!("/v1/jobs/{id}/events"),
            Some("acme"),
            None,
        ),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert!(
        headers["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream")
    );
    let events = sse(&body);
    let names: Vec<&str> = events.iter().map(|(e, _)| e.as_str()).collect();
    assert!(names.contains(&"running"), "{names:?}");
    assert_eq!(*names.last().unwrap(), "succeeded", "{names:?}");
    let (_, last) = events.last().unwrap();
    assert_eq!(last["id"], id.as_str());
    assert_eq!(last["result"]["choices"][0]["message"]["content"], "done");

    // Connecting after completion gives the final state at once, and the stream ends.
    let (_, _, body) = send(
        &app,
        request(
            Method::GET,
            &format!("/v1/jobs/{id}/events"),
            Some("acme"),
            None,
        ),
    )
    .await;
    let events = sse(&body);
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].0, "succeeded");
    app.handle.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_a_running_job() {
    let app = app(MockLlm::new("m").otherwise(Step::hang())).await;
    let id = submit(&app, Some("acme"), chat("hi")).await;
    within("running", async {
        loop {
            let (_, _, body) = send(
                &app,
                request(Method::GET, &format!("/v1/jobs/{id}"), Some("acme"), None),
            )
            .await;
            if json_of(&body)["status"] == "running" {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    let (status, _, body) = send(
        &app,
        request(
            Method::DELETE,
            &format!("/v1/jobs/{id}"),
            Some("acme"),
            None,
        ),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(json_of(&body)["status"], "cancelled");
    let done = poll_until_done(&app, Some("acme"), &id).await;
    assert_eq!(done["status"], "cancelled");
    app.handle.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_and_foreign_jobs_are_404() {
    let app = app(MockLlm::new("m").otherwise(Step::hang())).await;
    let id = submit(&app, Some("acme"), chat("hi")).await;
    for (method, uri) in [
        (Method::GET, format!("/v1/jobs/{id}")),
        (Method::GET, format!("/v1/jobs/{id}/events")),
        (Method::DELETE, format!("/v1/jobs/{id}")),
    ] {
        // Another tenant, and the anonymous tenant, cannot see it.
        for tenant in [Some("globex"), None] {
            let (status, _, body) = send(&app, request(method.clone(), &uri, tenant, None)).await;
            assert_eq!(
                status,
                StatusCode::NOT_FOUND,
                "{method} {uri} as {tenant:?}"
            );
            assert_eq!(json_of(&body)["error"]["type"], "not_found_error");
        }
    }
    let unknown = llm_tower_jobs::JobId::new();
    let (status, _, _) = send(
        &app,
        request(
            Method::GET,
            &format!("/v1/jobs/{unknown}"),
            Some("acme"),
            None,
        ),
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _, _) = send(
        &app,
        request(Method::GET, "/v1/jobs/not-a-uuid", Some("acme"), None),
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    // The owner still sees it, queued or running.
    let (status, _, _) = send(
        &app,
        request(Method::GET, &format!("/v1/jobs/{id}"), Some("acme"), None),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    app.handle.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotency_key_over_http() {
    let app = app(MockLlm::new("m").otherwise(Step::reply("once"))).await;
    let keyed = |body: Value| {
        let mut r = request(Method::POST, "/v1/jobs", Some("acme"), Some(body));
        r.headers_mut()
            .insert("idempotency-key", "abc-123".parse().unwrap());
        r
    };
    let (status, _, body) = send(&app, keyed(chat("hi"))).await;
    assert_eq!(status, StatusCode::ACCEPTED);
    let id = json_of(&body)["id"].as_str().unwrap().to_owned();
    poll_until_done(&app, Some("acme"), &id).await;

    let (status, headers, body) = send(&app, keyed(chat("hi"))).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(headers["idempotent-replayed"], "true");
    let v = json_of(&body);
    assert_eq!(v["id"], id.as_str());
    assert_eq!(v["result"]["choices"][0]["message"]["content"], "once");

    let (status, _, body) = send(&app, keyed(chat("different"))).await;
    assert_eq!(status, StatusCode::CONFLICT);
    assert_eq!(json_of(&body)["error"]["type"], "conflict_error");
    assert_eq!(app.mock.calls(), 1);
    app.handle.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_are_400() {
    let app = app(MockLlm::new("m")).await;
    for body in [
        json!({"model": "m", "messages": []}),
        json!({"messages": [{"role": "user", "content": "x"}]}),
        json!({"model": "m", "messages": [{"role": "user", "content": "x"}], "job": {"priority": "high"}}),
        json!({"model": "m", "messages": [{"role": "user", "content": "x"}], "job": {"nope": 1}}),
        json!({"model": "m", "messages": [{"role": "user", "content": "x"}], "job": {"max_attempts": 0}}),
    ] {
        let (status, _, resp) = send(
            &app,
            request(Method::POST, "/v1/jobs", None, Some(body.clone())),
        )
        .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
        assert_eq!(json_of(&resp)["error"]["type"], "invalid_request_error");
    }
    let mut req = request(Method::POST, "/v1/jobs", None, Some(chat("x")));
    req.headers_mut()
        .insert("x-llm-task", "t".repeat(257).parse().unwrap());
    let (status, _, resp) = send(&app, req).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(json_of(&resp)["error"]["param"], "x-llm-task");
    let req = Request::builder()
        .method(Method::POST)
        .uri("/v1/jobs")
        .body(Body::from("{not json"))
        .unwrap();
    let (status, _, _) = send(&app, req).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    app.handle.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn job_options_in_the_body() {
    let app = app_with(
        MockLlm::new("m").otherwise(Step::error(LlmError::unavailable("down"))),
        JobsApiLimits::default().max_priority(5),
    )
    .await;
    let mut body = chat("hi");
    body["job"] = json!({"max_attempts": 2, "backoff_ms": 1, "priority": 5, "timeout_ms": 10000});
    let id = submit(&app, None, body).await;
    let done = poll_until_done(&app, None, &id).await;
    assert_eq!(done["status"], "failed");
    assert_eq!(done["attempts"], 2);
    assert_eq!(done["max_attempts"], 2);
    assert_eq!(done["priority"], 5);
    // The options are not forwarded to the LLM.
    assert!(app.mock.last_request().unwrap().extra.get("job").is_none());
    app.handle.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn job_options_are_bounded_by_the_limits() {
    let limits = JobsApiLimits::default()
        .body_limit(4096)
        .max_priority(1)
        .tenant_max_priority("vip", 50)
        .max_attempts(4)
        .max_backoff(Duration::from_secs(10));
    let app = app_with(MockLlm::new("m").otherwise(Step::reply("ok")), limits).await;
    let with = |job: Value| {
        let mut b = chat("x");
        b["job"] = job;
        b
    };
    for (tenant, job, param) in [
        (None, json!({"priority": 2}), "job.priority"),
        (Some("acme"), json!({"priority": 50}), "job.priority"),
        (None, json!({"max_attempts": 5}), "job.max_attempts"),
        (None, json!({"backoff_ms": 10_001}), "job.backoff_ms"),
    ] {
        let (status, _, resp) = send(
            &app,
            request(Method::POST, "/v1/jobs", tenant, Some(with(job.clone()))),
        )
        .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{job}");
        let v = json_of(&resp);
        assert_eq!(v["error"]["type"], "invalid_request_error", "{v}");
        assert_eq!(v["error"]["param"], param, "{v}");
    }
    // Within the limits (and a key allowed more) is accepted.
    submit(
        &app,
        None,
        with(json!({"priority": 1, "max_attempts": 4, "backoff_ms": 10_000})),
    )
    .await;
    let id = submit(&app, Some("vip"), with(json!({"priority": 50}))).await;
    let done = poll_until_done(&app, Some("vip"), &id).await;
    assert_eq!(done["priority"], 50);
    // A timeout past what the clock can hold is a deadline far away, not a panic.
    let id = submit(&app, None, with(json!({"timeout_ms": u64::MAX}))).await;
    let done = poll_until_done(&app, None, &id).await;
    assert_eq!(done["status"], "succeeded", "{done}");

    // The body limit is the configured one, not 32 MiB.
    let big = chat(&"x".repeat(5000));
    let (status, _, _) = send(&app, request(Method::POST, "/v1/jobs", None, Some(big))).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    app.handle.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_tenant_has_a_cap_on_queued_jobs() {
    // No worker: submitted jobs stay queued.
    let db = common::TempDb::new();
    let jobs = Jobs::new(db.store().await);
    let router = jobs_router_with(jobs, JobsApiLimits::default().max_queued_per_tenant(2));
    let post = |tenant: &str, key: &str| {
        let mut req = request(Method::POST, "/v1/jobs", Some(tenant), Some(chat("x")));
        req.headers_mut()
            .insert("idempotency-key", key.parse().unwrap());
        req
    };
    for key in ["a", "b"] {
        let resp = router.clone().oneshot(post("acme", key)).await.unwrap();
        assert_eq!(resp.status(), StatusCode::ACCEPTED);
    }
    let resp = router.clone().oneshot(post("acme", "c")).await.unwrap();
    assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(resp.headers()["retry-after"], "1");
    let v = json_of(&resp.into_body().collect().await.unwrap().to_bytes());
    assert_eq!(v["error"]["type"], "rate_limit_error", "{v}");
    assert_eq!(v["error"]["code"], "too_many_queued_jobs", "{v}");
    // Another tenant has its own cap.
    let resp = router.clone().oneshot(post("globex", "a")).await.unwrap();
    assert_eq!(resp.status(), StatusCode::ACCEPTED);
}
