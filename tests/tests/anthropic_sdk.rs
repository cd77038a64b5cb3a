//! The official Anthropic Python SDK (Messages API) against the gateway running the demo config.
//!
//! Ignored by default (needs Python and `pip install anthropic==2.16.0`):
//!
//! ```text
//! cargo test -p llm-tower-e2e --test anthropic_sdk -- --include-ignored
//! ```
//!
//! `PYTHON` selects the interpreter (default `python3`).

use std::path::Path;

use llm_tower_e2e::TestGateway;
use llm_tower_proxy::config::Config;

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs python3 with `pip install anthropic==2.16.0` (run with -- --include-ignored)"]
async fn official_anthropic_python_sdk_works_against_the_demo_gateway() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("repo root");
    let config =
        Config::from_file(root.join("examples/proxy/demo.toml")).unwrap_or_else(|e| panic!("{e}"));
    let gw = TestGateway::start_config(&config).await;
    let python = std::env::var("PYTHON").unwrap_or_else(|_| "python3".to_owned());
    let script = root.join("tests/sdk/anthropic_sdk_check.py");
    let base = gw.url("");
    let out = tokio::process::Command::new(&python)
        .arg(&script)
        .arg(&base)
        .output()
        .await
        .unwrap_or_else(|e| panic!("cannot run {python}: {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "SDK check failed\n--- stdout\n{stdout}\n--- stderr\n{stderr}"
    );
    assert!(
        stdout.contains("all Anthropic SDK checks passed"),
        "{stdout}"
    );
}
