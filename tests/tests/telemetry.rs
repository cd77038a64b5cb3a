//! `[telemetry]` end to end: the gateway exports OTLP to an in-process receiver (HTTP/protobuf
//! decoded with opentelemetry-proto, and gRPC served with tonic), and the test decodes what
//! arrives: the GenAI attribute names, the span tree (request span → two attempt spans on a
//! fallback), the cache-hit event, the metrics, and the `traceparent` the mock upstreams got.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use llm_tower_e2e::{ACME_KEY, Client, base_config, chat, test_env};
use llm_tower_proxy::config::Config;
use llm_tower_test::upstream::{MockUpstream, Scenario};
use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
    trace_service_server::{TraceService, TraceServiceServer},
};
use opentelemetry_proto::tonic::common::v1::{AnyValue, any_value};
use opentelemetry_proto::tonic::trace::v1::Span;
use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
use prost::Message;

/// What the receiver got.
#[derive(Default)]
struct Received {
    spans: Mutex<Vec<Span>>,
    metrics: Mutex<Vec<String>>,
    content_types: Mutex<Vec<String>>,
}

impl Received {
    fn take_trace(&self, req: ExportTraceServiceRequest) {
        let mut spans = self.spans.lock().unwrap();
        for rs in req.resource_spans {
            for ss in rs.scope_spans {
                spans.extend(ss.spans);
            }
        }
    }
    fn spans(&self) -> Vec<Span> {
        self.spans.lock().unwrap().clone()
    }
}

/// An OTLP/HTTP receiver on 127.0.0.1:<random>: `/v1/traces` and `/v1/metrics`.
async fn http_receiver() -> (SocketAddr, Arc<Received>) {
    use axum::routing::post;
    let got = Arc::new(Received::default());
    let g1 = got.clone();
    let g2 = got.clone();
    let app = axum::Router::new()
        .route(
            "/v1/traces",
            post(move |headers: http::HeaderMap, body: Bytes| {
                let got = g1.clone();
                async move {
                    if let Some(ct) = headers.get("content-type").and_then(|v| v.to_str().ok()) {
                        got.content_types.lock().unwrap().push(ct.to_owned());
                    }
                    let req = ExportTraceServiceRequest::decode(body).expect("OTLP trace body");
                    got.take_trace(req);
                    ExportTraceServiceResponse::default().encode_to_vec()
                }
            }),
        )
        .route(
            "/v1/metrics",
            post(move |body: Bytes| {
                let got = g2.clone();
                async move {
                    let req = ExportMetricsServiceRequest::decode(body).expect("OTLP metrics body");
                    let mut names = got.metrics.lock().unwrap();
                    for rm in req.resource_metrics {
                        for sm in rm.scope_metrics {
                            names.extend(sm.metrics.into_iter().map(|m| m.name));
                        }
                    }
                    Vec::<u8>::new()
                }
            }),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (addr, got)
}

struct GrpcTraces(Arc<Received>);

#[tonic::async_trait]
impl TraceService for GrpcTraces {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        self.0.take_trace(request.into_inner());
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

/// An OTLP/gRPC trace receiver on 127.0.0.1:<random>.
async fn grpc_receiver() -> (SocketAddr, Arc<Received>) {
    let got = Arc::new(Received::default());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let svc = TraceServiceServer::new(GrpcTraces(got.clone()));
    tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(svc)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
            .await
    });
    (addr, got)
}

/// The gateway in-process, with its telemetry handle (to flush it).
struct Gw {
    addr: SocketAddr,
    telemetry: llm_tower_proxy::telemetry::Telemetry,
    _shutdown: tokio::sync::oneshot::Sender<()>,
}

impl Gw {
    async fn start(toml: &str) -> Self {
        let config = Config::parse(toml, Path::new(".")).unwrap_or_else(|e| panic!("{e}"));
        let gw = llm_tower_proxy::build(&config, &test_env)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let telemetry = gw.telemetry.clone().expect("telemetry is on");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(llm_tower_axum::serve(
            listener,
            gw.router,
            async move {
                let _ = rx.await;
            },
            gw.grace,
        ));
        Self {
            addr,
            telemetry,
            _shutdown: tx,
        }
    }

    fn url(&self) -> String {
        format!("http://{}/v1/chat/completions", self.addr)
    }

    async fn flush(&self) {
        let t = self.telemetry.clone();
        tokio::task::spawn_blocking(move || t.force_flush())
            .await
            .unwrap();
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn attrs(span: &Span) -> BTreeMap<String, AnyValue> {
    span.attributes
        .iter()
        .filter_map(|kv| Some((kv.key.clone(), kv.value.clone()?)))
        .collect()
}

fn s(v: &AnyValue) -> String {
    match &v.value {
        Some(any_value::Value::StringValue(s)) => s.clone(),
        Some(any_value::Value::IntValue(i)) => i.to_string(),
        Some(any_value::Value::DoubleValue(d)) => d.to_string(),
        Some(any_value::Value::BoolValue(b)) => b.to_string(),
        Some(any_value::Value::ArrayValue(a)) => {
            let items: Vec<String> = a.values.iter().map(s).collect();
            format!("[{}]", items.join(","))
        }
        other => format!("{other:?}"),
    }
}

const INCOMING_TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const INCOMING_PARENT: &str = "00f067aa0ba902b7";

async fn mocks() -> (MockUpstream, MockUpstream) {
    let openai = MockUpstream::builder()
        .record_requests(true)
        .start()
        .await
        .unwrap();
    let anthropic = MockUpstream::builder()
        .record_requests(true)
        .start()
        .await
        .unwrap();
    (openai, anthropic)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn otlp_http_spans_follow_genai_conventions_and_the_fallback() {
    let (addr, got) = http_receiver().await;
    let (openai, anthropic) = mocks().await;
    let extra = format!(
        "[telemetry]\nenabled = true\nprotocol = \"http/protobuf\"\nendpoint = \"http://{addr}\"\n"
    );
    let gw = Gw::start(&base_config(
        &openai.base_url(),
        &anthropic.base_url(),
        false,
        &extra,
    ))
    .await;
    let client = Client::with_key(ACME_KEY);
    let traceparent = format!("00-{INCOMING_TRACE}-{INCOMING_PARENT}-01");

    // 1. The primary answers 503: the backup serves (two attempts).
    openai.push(Scenario::unavailable());
    let r = client
        .post(
            &gw.url(),
            &[
                ("traceparent", traceparent.as_str()),
                ("x-llm-task", "summarize"),
            ],
            &chat("gpt-4o-mini", "secret prompt text", false),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("x-llm-attempts"), "2");

    // 2. The same deterministic request again: a cache hit, no attempt.
    let r = client
        .post(
            &gw.url(),
            &[("x-llm-task", "summarize")],
            &chat("gpt-4o-mini", "secret prompt text", false),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("x-llm-cache"), "hit");

    // 3. A stream served by the primary.
    let r = client
        .post(&gw.url(), &[], &chat("solo", "a stream", true))
        .await;
    assert_eq!(r.status, 200, "{}", r.text());

    gw.flush().await;
    let spans = got.spans();
    assert!(
        got.content_types
            .lock()
            .unwrap()
            .iter()
            .all(|c| c == "application/x-protobuf"),
        "OTLP/HTTP sends protobuf"
    );

    // --- the fallback request: a SERVER span, child of the incoming traceparent ---
    let root = spans
        .iter()
        .find(|s| hex(&s.trace_id) == INCOMING_TRACE && s.kind == SpanKind::Server as i32)
        .expect("the request span joins the incoming trace");
    assert_eq!(hex(&root.parent_span_id), INCOMING_PARENT);
    assert_eq!(root.name, "chat gpt-4o-mini");
    let a = attrs(root);
    assert_eq!(s(&a["gen_ai.operation.name"]), "chat");
    assert_eq!(s(&a["gen_ai.request.model"]), "gpt-4o-mini");
    assert_eq!(s(&a["gen_ai.provider.name"]), "anthropic");
    assert_eq!(s(&a["gen_ai.response.model"]), "claude-haiku-4-5");
    assert!(a.contains_key("gen_ai.usage.input_tokens"), "{a:?}");
    assert!(a.contains_key("gen_ai.usage.output_tokens"), "{a:?}");
    assert!(a.contains_key("gen_ai.response.finish_reasons"), "{a:?}");
    // A task name the config does not know is `other`, as in the metrics.
    assert_eq!(s(&a["llm_tower.task"]), "other");
    assert_eq!(s(&a["llm_tower.tenant"]), "acme");
    assert_eq!(s(&a["llm_tower.cache"]), "miss");
    assert_eq!(s(&a["llm_tower.attempts"]), "2");
    assert_eq!(s(&a["llm_tower.provider"]), "backup");
    assert!(a.contains_key("llm_tower.request_id"), "{a:?}");
    // Content is not exported unless the config says so.
    assert!(!a.contains_key("gen_ai.input.messages"));
    assert!(!a.contains_key("gen_ai.output.messages"));
    let dump = format!("{spans:?}");
    assert!(
        !dump.contains("secret prompt text"),
        "prompt content exported"
    );

    // --- its two attempts: CLIENT children, the first failed, the second served ---
    let mut children: Vec<&Span> = spans
        .iter()
        .filter(|s| s.parent_span_id == root.span_id)
        .collect();
    children.sort_by_key(|s| s.start_time_unix_nano);
    assert_eq!(
        children.len(),
        2,
        "one span per upstream attempt: {children:?}"
    );
    assert!(children.iter().all(|c| c.kind == SpanKind::Client as i32));
    assert!(children.iter().all(|c| c.trace_id == root.trace_id));
    let (first, second) = (attrs(children[0]), attrs(children[1]));
    assert_eq!(s(&first["gen_ai.provider.name"]), "openai");
    assert_eq!(s(&first["llm_tower.provider"]), "primary");
    assert_eq!(s(&first["error.type"]), "unavailable");
    assert_eq!(s(&second["gen_ai.provider.name"]), "anthropic");
    assert_eq!(s(&second["gen_ai.request.model"]), "claude-haiku-4-5");
    assert!(!second.contains_key("error.type"));
    assert!(second.contains_key("gen_ai.usage.output_tokens"));

    // --- traceparent propagation: each upstream got its attempt's span as parent ---
    let sent_openai = openai.requests()[0]
        .header("traceparent")
        .expect("traceparent sent to the OpenAI upstream")
        .to_owned();
    let sent_anthropic = anthropic.requests()[0]
        .header("traceparent")
        .expect("traceparent sent to the Anthropic upstream")
        .to_owned();
    assert_eq!(
        sent_openai,
        format!("00-{INCOMING_TRACE}-{}-01", hex(&children[0].span_id))
    );
    assert_eq!(
        sent_anthropic,
        format!("00-{INCOMING_TRACE}-{}-01", hex(&children[1].span_id))
    );

    // --- the cache hit: a request span with the event and no attempt ---
    let hit = spans
        .iter()
        .find(|sp| {
            sp.kind == SpanKind::Server as i32
                && attrs(sp)
                    .get("llm_tower.cache")
                    .is_some_and(|v| s(v) == "hit")
        })
        .expect("the cache hit's request span");
    assert!(
        hit.events.iter().any(|e| e.name == "llm_tower.cache.hit"),
        "{:?}",
        hit.events
    );
    assert!(spans.iter().all(|sp| sp.parent_span_id != hit.span_id));
    assert_ne!(hit.trace_id, root.trace_id, "no traceparent: a new trace");

    // --- the stream: time to first chunk on its attempt ---
    let stream_root = spans
        .iter()
        .find(|sp| {
            sp.kind == SpanKind::Server as i32
                && attrs(sp)
                    .get("gen_ai.request.stream")
                    .is_some_and(|v| s(v) == "true")
        })
        .expect("the stream's request span");
    let attempt = spans
        .iter()
        .find(|sp| sp.parent_span_id == stream_root.span_id)
        .expect("the stream's attempt");
    assert!(attrs(attempt).contains_key("gen_ai.response.time_to_first_chunk"));

    // --- metrics ---
    let names = got.metrics.lock().unwrap().clone();
    for m in [
        "gen_ai.client.operation.duration",
        "gen_ai.client.token.usage",
        "gen_ai.client.operation.time_to_first_chunk",
        "gen_ai.server.request.duration",
        "gen_ai.server.time_to_first_token",
    ] {
        assert!(names.iter().any(|n| n == m), "{m} missing from {names:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn otlp_grpc_exports_spans_and_content_only_when_asked() {
    let (addr, got) = grpc_receiver().await;
    let (openai, anthropic) = mocks().await;
    let extra = format!(
        "[telemetry]\nenabled = true\nprotocol = \"grpc\"\nendpoint = \"http://{addr}\"\n\
         metrics = false\ncapture_content = true\nmax_content_bytes = 64\n"
    );
    let gw = Gw::start(&base_config(
        &openai.base_url(),
        &anthropic.base_url(),
        false,
        &extra,
    ))
    .await;
    let r = Client::with_key(ACME_KEY)
        .post(&gw.url(), &[], &chat("solo", "captured prompt", false))
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    gw.flush().await;

    let spans = got.spans();
    let root = spans
        .iter()
        .find(|sp| sp.kind == SpanKind::Server as i32)
        .expect("request span over gRPC");
    let a = attrs(root);
    assert!(s(&a["gen_ai.input.messages"]).contains("captured prompt"));
    assert!(a.contains_key("gen_ai.output.messages"), "{a:?}");
    assert!(s(&a["gen_ai.output.messages"]).len() < 64 + 200, "bounded");
    assert_eq!(
        spans
            .iter()
            .filter(|sp| sp.parent_span_id == root.span_id)
            .count(),
        1
    );
    // The upstream got no traceparent from the client (none was sent) but the attempt's.
    let tp = openai.requests()[0]
        .header("traceparent")
        .unwrap()
        .to_owned();
    assert!(
        tp.starts_with(&format!("00-{}-", hex(&root.trace_id))),
        "{tp}"
    );
}

#[tokio::test]
async fn telemetry_off_sends_no_traceparent() {
    let (openai, anthropic) = mocks().await;
    let toml = base_config(&openai.base_url(), &anthropic.base_url(), false, "");
    let config = Config::parse(&toml, Path::new(".")).unwrap();
    let gw = llm_tower_proxy::build(&config, &test_env).await.unwrap();
    assert!(gw.telemetry.is_none());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(llm_tower_axum::serve(
        listener,
        gw.router,
        std::future::pending(),
        gw.grace,
    ));
    let r = Client::with_key(ACME_KEY)
        .post(
            &format!("http://{addr}/v1/chat/completions"),
            &[(
                "traceparent",
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            )],
            &chat("solo", "hi", false),
        )
        .await;
    assert_eq!(r.status, 200);
    assert!(openai.requests()[0].header("traceparent").is_none());
}

#[test]
fn telemetry_config_errors_name_the_line() {
    for (bad, needle) in [
        ("protocol = \"http/json\"", "telemetry.protocol"),
        ("endpoint = \"collector:4317\"", "telemetry.endpoint"),
        ("sample_ratio = 1.5", "telemetry.sample_ratio"),
        (
            "metrics_interval_secs = 0",
            "telemetry.metrics_interval_secs",
        ),
        (
            "max_content_bytes = 99999999",
            "telemetry.max_content_bytes",
        ),
    ] {
        let toml = base_config(
            "http://127.0.0.1:1",
            "http://127.0.0.1:1",
            false,
            &format!("[telemetry]\nenabled = true\n{bad}\n"),
        );
        let line = toml.lines().position(|l| l == bad).unwrap() + 1;
        let err = Config::parse(&toml, Path::new("."))
            .unwrap_err()
            .to_string();
        assert!(err.contains(needle), "{err}");
        assert!(err.contains(&format!("line {line}")), "{err}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_messages_request_has_its_request_span_and_attempt() {
    let (addr, got) = http_receiver().await;
    let (openai, anthropic) = mocks().await;
    let extra =
        format!("[telemetry]\nenabled = true\nendpoint = \"http://{addr}\"\nmetrics = false\n");
    let gw = Gw::start(&base_config(
        &openai.base_url(),
        &anthropic.base_url(),
        false,
        &extra,
    ))
    .await;
    let traceparent = format!("00-{INCOMING_TRACE}-{INCOMING_PARENT}-01");
    let body = serde_json::json!({
        "model": "solo",
        "max_tokens": 50,
        "messages": [{"role": "user", "content": "hello over Messages"}],
    });
    let r = Client::with_key(ACME_KEY)
        .post(
            &format!("http://{}/v1/messages", gw.addr),
            &[("traceparent", traceparent.as_str())],
            &body,
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    gw.flush().await;

    let spans = got.spans();
    let root = spans
        .iter()
        .find(|sp| hex(&sp.trace_id) == INCOMING_TRACE && sp.kind == SpanKind::Server as i32)
        .expect("a request span in the client's trace");
    let a = attrs(root);
    assert_eq!(s(&a["gen_ai.operation.name"]), "chat", "{a:?}");
    assert!(a.contains_key("gen_ai.usage.input_tokens"), "{a:?}");
    let attempts: Vec<_> = spans
        .iter()
        .filter(|sp| sp.parent_span_id == root.span_id)
        .collect();
    assert_eq!(attempts.len(), 1, "one upstream attempt");
    assert_eq!(attempts[0].kind, SpanKind::Client as i32);
}
