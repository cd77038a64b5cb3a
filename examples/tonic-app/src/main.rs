//! The example gRPC server: `cargo run -p example-tonic-app [-- 127.0.0.1:50051]`.
//!
//! Serves `assistant.v1.Assistant` with handlers that call an llm-tower stack over a local
//! demo provider (no key, no network). Stops on ctrl-c / SIGTERM after in-flight calls end.

use example_tonic_app::pb::assistant_server::AssistantServer;
use example_tonic_app::{AssistantService, demo_llm, llm_stack};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:50051".to_owned())
        .parse()?;
    let svc = AssistantService::new(llm_stack(demo_llm()));
    tonic::transport::Server::builder()
        .add_service(AssistantServer::new(svc))
        .serve_with_shutdown(addr, shutdown_signal())
        .await?;
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
}
