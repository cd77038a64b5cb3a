//! The simulated LLM, with paused time.

use std::time::Duration;

use futures_util::StreamExt;
use llm_tower_core::{ChatRequest, ErrorKind, LlmError, Message, ResponseFormat, boxed};
use llm_tower_test::SimulatedLlm;
use serde_json::{Value, json};
use tokio::time::Instant;
use tower::{Service, ServiceExt};

fn req(text: &str) -> ChatRequest {
    ChatRequest::new(
        "sim-model",
        vec![Message::system("You are helpful."), Message::user(text)],
    )
}

fn streaming(text: &str) -> ChatRequest {
    let mut r = req(text);
    r.stream = Some(true);
    r
}

fn json_format(kind: &str, schema: Option<Value>) -> ResponseFormat {
    serde_json::from_value(json!({
        "type": kind,
        "json_schema": schema.map(|s| json!({"name": "out", "schema": s, "strict": true}))
    }))
    .unwrap()
}

#[tokio::test(start_paused = true)]
async fn complete_answer_is_deterministic_with_meta_and_usage() {
    let mut llm = SimulatedLlm::builder("sim")
        .latency(Duration::from_millis(300))
        .token_delay(Duration::from_millis(10))
        .build();
    let start = Instant::now();
    let resp = llm
        .ready()
        .await
        .unwrap()
        .call(req("Explain rate limiting"))
        .await
        .unwrap();
    assert!(!resp.is_stream());
    assert_eq!(resp.meta.provider.as_deref(), Some("sim"));
    assert_eq!(resp.meta.model.as_deref(), Some("sim-model"));
    let usage = resp.meta.usage.clone().unwrap();
    let upstream_time = resp.meta.upstream_time.unwrap();
    let body = resp.into_complete().await.unwrap();
    let text = body.text();
    assert!(text.contains("Explain rate limiting"), "{text}");
    let words = text.split_inclusive(' ').count() as u32;
    // Latency, then every word after the first.
    assert_eq!(
        upstream_time,
        Duration::from_millis(300) + Duration::from_millis(10) * (words - 1)
    );
    assert_eq!(start.elapsed(), upstream_time);
    // ~4 bytes a token.
    let prompt_bytes = "You are helpful.Explain rate limiting".len() as u64;
    assert_eq!(usage.prompt_tokens, prompt_bytes.div_ceil(4));
    assert_eq!(usage.completion_tokens, (text.len() as u64).div_ceil(4));
    assert_eq!(body.usage.as_ref(), Some(&usage));
    assert_eq!(body.choices[0].finish_reason.as_deref(), Some("stop"));
    // Same prompt, same answer; another prompt, another answer.
    let again = llm
        .ready()
        .await
        .unwrap()
        .call(req("Explain rate limiting"))
        .await
        .unwrap();
    assert_eq!(again.into_complete().await.unwrap().text(), text);
    let other = llm
        .ready()
        .await
        .unwrap()
        .call(req("What is a cache?"))
        .await
        .unwrap();
    assert_ne!(other.into_complete().await.unwrap().text(), text);
}

#[tokio::test(start_paused = true)]
async fn stream_is_word_by_word_after_the_latency() {
    let llm = SimulatedLlm::builder("sim")
        .model("served-model")
        .latency(Duration::from_millis(250))
        .token_delay(Duration::from_millis(20))
        .build();
    let expected = llm.answer_text(&req("How do streams work?"));
    let start = Instant::now();
    let resp = llm
        .clone()
        .oneshot(streaming("How do streams work?"))
        .await
        .unwrap();
    assert!(resp.is_stream());
    assert_eq!(resp.meta.upstream_time, Some(Duration::from_millis(250)));
    assert_eq!(resp.meta.model.as_deref(), Some("served-model"));
    let mut stream = resp.into_stream();
    let mut pieces = Vec::new();
    let mut arrivals = Vec::new();
    let mut usage = None;
    let mut finish = None;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.unwrap();
        assert_eq!(chunk.model, "served-model");
        if let Some(u) = chunk.usage() {
            usage = Some(u.clone());
        }
        for c in &chunk.choices {
            if let Some(t) = c.delta.text() {
                pieces.push(t.to_owned());
                arrivals.push(start.elapsed());
            }
            if let Some(f) = c.finish_reason() {
                finish = Some(f.to_owned());
            }
        }
    }
    assert!(pieces.len() > 3);
    assert!(
        pieces.iter().all(|p| p.trim().split(' ').count() == 1),
        "{pieces:?}"
    );
    assert_eq!(pieces.concat(), expected);
    assert_eq!(arrivals[0], Duration::from_millis(250));
    assert_eq!(arrivals[1], Duration::from_millis(270));
    assert_eq!(finish.as_deref(), Some("stop"));
    assert_eq!(
        usage.unwrap().completion_tokens,
        (expected.len() as u64).div_ceil(4)
    );
}

#[tokio::test(start_paused = true)]
async fn fail_every_fails_the_nth_calls_across_clones() {
    let llm = SimulatedLlm::builder("flaky")
        .latency(Duration::from_millis(100))
        .fail_every(3, ErrorKind::RateLimited)
        .retry_after(Duration::from_secs(2))
        .build();
    let mut results = Vec::new();
    for i in 0..6 {
        // Alternate clones: the count is shared.
        let svc = if i % 2 == 0 {
            llm.clone()
        } else {
            llm.clone().clone()
        };
        results.push(svc.oneshot(req("hi")).await);
    }
    let failed: Vec<usize> = results
        .iter()
        .enumerate()
        .filter(|(_, r)| r.is_err())
        .map(|(i, _)| i + 1)
        .collect();
    assert_eq!(failed, [3, 6]);
    let err = results.swap_remove(2).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::RateLimited);
    assert_eq!(err.retry_after(), Some(Duration::from_secs(2)));
    assert_eq!(err.provider(), Some("flaky"));
    assert_eq!(err.upstream_status(), Some(429));
    assert!(err.should_fall_back());
    assert_eq!(llm.calls(), 6);

    let down = SimulatedLlm::builder("down")
        .latency(Duration::ZERO)
        .fail_every(1, ErrorKind::Unavailable)
        .build();
    let err = down.oneshot(streaming("hi")).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Unavailable);
    assert_eq!(err.upstream_status(), Some(503));
}

#[tokio::test(start_paused = true)]
async fn json_object_answers_valid_json() {
    let llm = SimulatedLlm::new("sim");
    let mut r = req("List three colors");
    r.response_format = Some(json_format("json_object", None));
    let text = llm
        .oneshot(r)
        .await
        .unwrap()
        .into_complete()
        .await
        .unwrap()
        .text();
    let v: Value = serde_json::from_str(&text).unwrap();
    assert!(v["answer"].as_str().unwrap().contains("List three colors"));
}

#[tokio::test(start_paused = true)]
async fn json_schema_answers_a_conforming_value() {
    let schema = json!({
        "type": "object",
        "properties": {
            "label": {"type": "string", "enum": ["spam", "ham"]},
            "confidence": {"type": "number", "minimum": 0},
            "tags": {"type": "array", "items": {"type": "string", "maxLength": 5}, "minItems": 2},
            "ok": {"type": "boolean"},
            "count": {"type": "integer", "minimum": 3},
            "kind": {"const": "x"},
            "nested": {"$ref": "#/$defs/inner"},
            "maybe": {"type": ["null", "string"]}
        },
        "required": ["label", "confidence", "tags", "ok", "count", "kind", "nested", "maybe"],
        "additionalProperties": false,
        "$defs": {"inner": {"type": "object", "properties": {"n": {"type": "integer"}}}}
    });
    let mut r = req("Classify this email");
    r.response_format = Some(json_format("json_schema", Some(schema)));
    // Also works streamed: the concatenated chunks are the JSON.
    r.stream = Some(true);
    let text = SimulatedLlm::new("sim")
        .oneshot(r)
        .await
        .unwrap()
        .into_complete()
        .await
        .unwrap()
        .text();
    let v: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["label"], "spam");
    assert_eq!(v["confidence"], 0.0);
    let tags = v["tags"].as_array().unwrap();
    assert_eq!(tags.len(), 2);
    assert!(
        tags.iter()
            .all(|t| t.as_str().unwrap().chars().count() <= 5)
    );
    assert_eq!(v["ok"], true);
    assert_eq!(v["count"], 3);
    assert_eq!(v["kind"], "x");
    assert_eq!(v["nested"]["n"], 1);
    assert!(v["maybe"].is_string());
    assert_eq!(v.as_object().unwrap().len(), 8);
}

#[tokio::test(start_paused = true)]
async fn max_tokens_cuts_the_answer_with_finish_reason_length() {
    let mut r = req("Tell me everything about distributed systems");
    r.max_tokens = Some(5);
    let body = SimulatedLlm::new("sim")
        .oneshot(r)
        .await
        .unwrap()
        .into_complete()
        .await
        .unwrap();
    assert_eq!(body.choices[0].finish_reason.as_deref(), Some("length"));
    assert!(body.usage.unwrap().completion_tokens <= 5);
}

#[tokio::test(start_paused = true)]
async fn task_hints_shape_the_answer() {
    let llm = SimulatedLlm::new("sim");
    let r = req("I love this product").with_task_type("classify");
    let text = llm
        .clone()
        .oneshot(r)
        .await
        .unwrap()
        .into_complete()
        .await
        .unwrap()
        .text();
    assert!(
        ["positive", "negative", "neutral"].contains(&text.as_str()),
        "{text}"
    );
    let r = req("The quick brown fox jumps over the lazy dog").with_task_type("summarize");
    let text = llm
        .oneshot(r)
        .await
        .unwrap()
        .into_complete()
        .await
        .unwrap()
        .text();
    assert!(text.starts_with("Summary: The quick brown fox"), "{text}");
}

#[tokio::test(start_paused = true)]
async fn custom_answers_and_bad_requests() {
    let llm = SimulatedLlm::builder("sim")
        .answer_with(|r: &ChatRequest| format!("echo {}", r.messages.len()))
        .build();
    let text = llm
        .clone()
        .oneshot(req("x"))
        .await
        .unwrap()
        .into_complete()
        .await
        .unwrap()
        .text();
    assert_eq!(text, "echo 2");
    let err: LlmError = llm
        .oneshot(ChatRequest::new("m", vec![]))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::BadRequest);
}

#[tokio::test(start_paused = true)]
async fn works_as_a_boxed_llm_service() {
    fn assert_traits<T: Clone + Send + Sync + 'static>(_: &T) {}
    let llm = SimulatedLlm::new("sim");
    assert_traits(&llm);
    let boxed = boxed(llm);
    let resp = boxed.oneshot(req("hello")).await.unwrap();
    assert_eq!(resp.meta.provider.as_deref(), Some("sim"));
}

#[tokio::test(start_paused = true)]
async fn quality_knobs_break_json_and_vary_answers_at_exact_rates() {
    let schema = json!({
        "type": "object",
        "properties": {"label": {"enum": ["positive", "negative", "neutral"]}},
        "required": ["label"]
    });
    let llm = SimulatedLlm::builder("sim")
        .invalid_json_rate(0.1)
        .wrong_answer_rate(0.3)
        .quality_seed(11)
        .build();
    let reference = SimulatedLlm::new("ref");
    let (mut invalid, mut wrong) = (0, 0);
    for i in 0..100 {
        let mut r = req(&format!("review {i}"));
        r.response_format = Some(json_format("json_schema", Some(schema.clone())));
        let expected = reference.answer_text(&r);
        let text = llm
            .clone()
            .oneshot(r)
            .await
            .unwrap()
            .into_complete()
            .await
            .unwrap()
            .text();
        match serde_json::from_str::<Value>(&text) {
            Err(_) => invalid += 1,
            Ok(v) => {
                // A wrong answer is still one the schema allows.
                let label = v["label"].as_str().unwrap();
                assert!(
                    ["positive", "negative", "neutral"].contains(&label),
                    "{text}"
                );
                if text != expected {
                    wrong += 1;
                }
            }
        }
    }
    assert_eq!(invalid, 10);
    // 30 wrong answers; those also picked for broken JSON count as invalid above.
    assert!((20..=30).contains(&wrong), "{wrong}");

    // Prose: a classification gets another label.
    let sim = SimulatedLlm::builder("s").wrong_answer_rate(1.0).build();
    let r = req("I love it").with_task_type("classify");
    let right = sim.answer_text(&r);
    let got = sim
        .clone()
        .oneshot(r)
        .await
        .unwrap()
        .into_complete()
        .await
        .unwrap()
        .text();
    assert_ne!(got, right);
    assert!(["positive", "negative", "neutral"].contains(&got.as_str()));
}
