//! The official OpenAI Python SDK against the gateway running the demo config.
//!
//! Ignored by default (needs Python and `pip install openai==3.57.0`):
//!
//! ```text
//! cargo test -p llm-tower-e2e --test openai_sdk -- --include-ignored
//! ```
//!
//! `PYTHON` selects the interpreter (default `python3`).

use llm_tower_e2e::run_sdk_check;

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs python3 with `pip install openai==3.57.0` (run with -- --include-ignored)"]
async fn official_openai_python_sdk_works_against_the_demo_gateway() {
    let stdout = run_sdk_check("openai_sdk_check.py").await;
    assert!(stdout.contains("all OpenAI SDK checks passed"), "{stdout}");
}
