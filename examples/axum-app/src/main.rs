//! The example app: `cargo run -p example-axum-app [-- 127.0.0.1:3000]`, then
//! `curl -s localhost:3000/explain -H 'content-type: application/json' -d '{"topic":"tower"}'`.

use example_axum_app::{app, demo_llm, llm_stack};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:3000".to_owned());
    let listener = tokio::net::TcpListener::bind(&addr).await?;
    axum::serve(listener, app(llm_stack(demo_llm())))
        .with_graceful_shutdown(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await?;
    Ok(())
}
