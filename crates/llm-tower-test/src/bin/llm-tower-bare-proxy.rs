//! `llm-tower-bare-proxy`: the floor that `scripts/loadtest.sh` and
//! `scripts/streamtest.sh` measure the gateway against. It forwards every request's bytes
//! to one upstream and the answer's bytes back, over the same HTTP stack as the gateway
//! (hyper-util's server and pooled client, one `current_thread` runtime), and does nothing
//! else: no JSON, no layers, no metrics.
//!
//! A JSON answer is read whole and sent in one piece; a server-sent event stream
//! (`text/event-stream`) is forwarded frame by frame as it arrives, as any proxy that
//! serves streamed LLM answers must (one that buffered it would hold every token back
//! until the last).
//!
//! ```text
//! llm-tower-bare-proxy --addr 127.0.0.1:9102 --upstream 127.0.0.1:9100
//! ```
//!
//! Not a product: it exists to show what any proxy built on this stack costs on the
//! machine at hand, so that the gateway's own cost can be told apart from it.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::process::ExitCode;

use bytes::Bytes;
use clap::Parser;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;

/// A byte-forwarding HTTP proxy: the baseline of the load benchmark.
#[derive(Debug, Parser)]
#[command(name = "llm-tower-bare-proxy", version, about)]
struct Args {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:9102")]
    addr: SocketAddr,
    /// The upstream's `host:port` (plain HTTP).
    #[arg(long, default_value = "127.0.0.1:9100")]
    upstream: String,
}

type Upstream = Client<HttpConnector, Full<Bytes>>;

fn main() -> ExitCode {
    let args = Args::parse();
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return fail(&format!("cannot start the runtime: {e}")),
    };
    rt.block_on(run(args))
}

#[allow(clippy::print_stderr)] // a CLI reports on stderr
fn fail(msg: &str) -> ExitCode {
    eprintln!("llm-tower-bare-proxy: {msg}");
    ExitCode::FAILURE
}

#[allow(clippy::print_stderr)]
async fn run(args: Args) -> ExitCode {
    let listener = match TcpListener::bind(args.addr).await {
        Ok(l) => l,
        Err(e) => return fail(&format!("cannot listen on {}: {e}", args.addr)),
    };
    if let Ok(addr) = listener.local_addr() {
        eprintln!("llm-tower-bare-proxy listening on http://{addr}");
    }
    let mut http = HttpConnector::new();
    http.set_nodelay(true);
    let client: Upstream = Client::builder(TokioExecutor::new()).build(http);
    let upstream: std::sync::Arc<str> = args.upstream.into();
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let _ = stream.set_nodelay(true);
        let client = client.clone();
        let upstream = upstream.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| {
                forward(client.clone(), upstream.clone(), req)
            });
            let _ = auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

/// Sends the request's bytes upstream and the answer's bytes back; 502 when that fails.
async fn forward(
    client: Upstream,
    upstream: std::sync::Arc<str>,
    req: Request<Incoming>,
) -> Result<Response<BoxBody<Bytes, hyper::Error>>, Infallible> {
    let full = |b: Bytes| Full::new(b).map_err(|never| match never {}).boxed();
    let bad_gateway = || {
        let mut r = Response::new(full(Bytes::new()));
        *r.status_mut() = StatusCode::BAD_GATEWAY;
        r
    };
    let (mut parts, body) = req.into_parts();
    let Ok(body) = body.collect().await.map(|c| c.to_bytes()) else {
        return Ok(bad_gateway());
    };
    let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    let Ok(uri) = format!("http://{upstream}{path}").parse() else {
        return Ok(bad_gateway());
    };
    parts.uri = uri;
    parts.headers.remove(hyper::header::HOST);
    let Ok(resp) = client
        .request(Request::from_parts(parts, Full::new(body)))
        .await
    else {
        return Ok(bad_gateway());
    };
    let (parts, body) = resp.into_parts();
    let streamed = parts
        .headers
        .get(hyper::header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"text/event-stream"));
    if streamed {
        return Ok(Response::from_parts(parts, body.boxed()));
    }
    let Ok(body) = body.collect().await.map(|c| c.to_bytes()) else {
        return Ok(bad_gateway());
    };
    Ok(Response::from_parts(parts, full(body)))
}
