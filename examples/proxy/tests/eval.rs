//! `eval` over simulated candidates with known quality: rates, costs, resume, spend cap.

use std::path::PathBuf;

use llm_tower::cost::{ModelPrice, PriceTable};
use llm_tower::validate::Rule;
use llm_tower::{ChatRequest, Message, boxed};
use llm_tower_providers::SimulatedLlm;
use llm_tower_proxy::eval::{self, Candidate, EvalItem, EvalOptions, parse_dataset};
use serde_json::json;

const ANSWER: &str = r#"{"label":"positive"}"#;

fn items(n: usize) -> Vec<EvalItem> {
    (0..n)
        .map(|i| {
            let mut request = ChatRequest::new("m", vec![Message::user(format!("item {i:02}"))]);
            request.response_format =
                Some(serde_json::from_value(json!({"type": "json_object"})).unwrap());
            EvalItem {
                id: format!("i{i:02}"),
                request,
                expected: Some(json!({"label": "positive"})),
            }
        })
        .collect()
}

fn sim(name: &str, invalid: f64) -> SimulatedLlm {
    SimulatedLlm::builder(name)
        .model(name)
        .answer_with(|_| ANSWER.to_owned())
        .invalid_json_rate(invalid)
        .quality_seed(3)
        .build()
}

fn prices() -> PriceTable {
    // $1 / Mtok in, $2 / Mtok out: 1 000 and 2 000 nano-dollars a token.
    PriceTable::new()
        .with("good", ModelPrice::per_mtok_usd(1.0, 2.0, None).unwrap())
        .with("bad", ModelPrice::per_mtok_usd(1.0, 2.0, None).unwrap())
}

fn cands(good: &SimulatedLlm, bad: &SimulatedLlm) -> Vec<Candidate> {
    vec![
        eval::candidate("good", boxed(good.clone())),
        eval::candidate("bad", boxed(bad.clone())),
    ]
}

fn tmp(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("llm-tower-eval-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join(name);
    let _ = std::fs::remove_file(&p);
    p
}

#[tokio::test(start_paused = true)]
async fn reports_known_invalid_rates_and_costs_exactly() {
    let (good, bad) = (sim("good", 0.0), sim("bad", 0.25));
    let mut opts = EvalOptions::new("classify");
    opts.reference = Some("good".into());
    opts.concurrency = 3;
    let mut progress = Vec::new();
    let r = eval::run(
        &cands(&good, &bad),
        &items(20),
        Some(&Rule::json()),
        &prices(),
        &opts,
        |done, total| progress.push((done, total)),
    )
    .await
    .unwrap();
    assert_eq!(progress.last(), Some(&(40, 40)));
    assert_eq!(r.calls, 40);
    let (g, b) = (&r.candidates[0], &r.candidates[1]);
    assert_eq!((g.validated, g.valid, g.pass_rate), (20, 20, Some(1.0)));
    assert_eq!((b.validated, b.valid, b.pass_rate), (20, 15, Some(0.75)));
    assert_eq!(g.match_rate, Some(1.0));
    assert_eq!(b.match_rate, Some(0.75));
    assert_eq!((b.compared, b.agree, b.agreement), (20, 15, Some(0.75)));
    assert_eq!(
        g.agreement, None,
        "the reference is not compared with itself"
    );
    // "item NN" is 7 bytes: 2 tokens in; the answer 20 bytes (19 when cut): 5 out.
    assert_eq!((g.prompt_tokens, g.completion_tokens), (40, 100));
    assert_eq!((b.prompt_tokens, b.completion_tokens), (40, 100));
    // 2 × 1 000 + 5 × 2 000 = 12 000 nano-dollars a request.
    assert_eq!(g.cost_nano, 240_000);
    assert_eq!(b.cost_nano, 240_000);
    assert_eq!(g.cost_per_request_usd, Some(0.000_012));
    assert!((g.cost_per_1000_usd.unwrap() - 0.012).abs() < 1e-12);
    assert_eq!(r.run_cost_nano, 480_000);
    // Simulated: 200 ms to the first token, one word.
    assert_eq!((g.latency_p50_ms, g.latency_p95_ms), (Some(200), Some(200)));
    assert!(g.errors.is_empty());
    let table = eval::table(&r);
    assert!(table.contains("75.0%"), "{table}");
}

#[tokio::test(start_paused = true)]
async fn errors_are_counted_by_kind() {
    let flaky = SimulatedLlm::builder("flaky")
        .answer_with(|_| ANSWER.to_owned())
        .fail_every(4, llm_tower::ErrorKind::RateLimited)
        .build();
    let mut opts = EvalOptions::new("classify");
    opts.concurrency = 1;
    let r = eval::run(
        &[eval::candidate("flaky", boxed(flaky))],
        &items(8),
        Some(&Rule::json()),
        &PriceTable::new(),
        &opts,
        |_, _| {},
    )
    .await
    .unwrap();
    let c = &r.candidates[0];
    assert_eq!(c.errors.get("rate_limited"), Some(&2));
    assert_eq!((c.runs, c.answers, c.unpriced), (8, 6, 6));
}

#[tokio::test(start_paused = true)]
async fn resume_skips_finished_items() {
    let path = tmp("resume.jsonl");
    let (good, bad) = (sim("good", 0.0), sim("bad", 0.25));
    let mut opts = EvalOptions::new("classify");
    opts.results = Some(path.clone());
    let first = eval::run(
        &cands(&good, &bad),
        &items(10),
        Some(&Rule::json()),
        &prices(),
        &opts,
        |_, _| {},
    )
    .await
    .unwrap();
    assert_eq!(first.calls, 20);
    assert_eq!(good.calls() + bad.calls(), 20);

    // Everything is done: nothing is called again, and the report is the same.
    let again = eval::run(
        &cands(&good, &bad),
        &items(10),
        Some(&Rule::json()),
        &prices(),
        &opts,
        |_, _| {},
    )
    .await
    .unwrap();
    assert_eq!((again.calls, again.resumed), (0, 20));
    assert_eq!(good.calls() + bad.calls(), 20);
    assert_eq!(again.candidates, first.candidates);

    // A run stopped half-way (and a torn last line): only the missing pairs run.
    let text = std::fs::read_to_string(&path).unwrap();
    let kept: Vec<&str> = text.lines().take(12).collect();
    std::fs::write(&path, format!("{}\n{{\"item\":\"i0", kept.join("\n"))).unwrap();
    let resumed = eval::run(
        &cands(&good, &bad),
        &items(10),
        Some(&Rule::json()),
        &prices(),
        &opts,
        |_, _| {},
    )
    .await
    .unwrap();
    assert_eq!((resumed.calls, resumed.resumed), (8, 12));
    assert_eq!(good.calls() + bad.calls(), 28);
    assert_eq!(resumed.candidates[0].runs, 10);
    assert_eq!(resumed.candidates[1].runs, 10);
}

#[tokio::test(start_paused = true)]
async fn the_spend_cap_stops_the_run_with_a_clear_message() {
    let path = tmp("cap.jsonl");
    let good = sim("good", 0.0);
    let mut opts = EvalOptions::new("classify");
    opts.concurrency = 1;
    opts.results = Some(path.clone());
    // 12 000 a call: after 4 calls 48 000 < 50 000, so a 5th starts; then it stops.
    opts.spend_cap = Some(50_000);
    let r = eval::run(
        &[eval::candidate("good", boxed(good.clone()))],
        &items(20),
        None,
        &prices(),
        &opts,
        |_, _| {},
    )
    .await
    .unwrap();
    assert_eq!(r.calls, 5);
    assert_eq!(good.calls(), 5);
    assert_eq!(r.run_cost_nano, 60_000);
    let msg = r.stopped.as_deref().unwrap();
    assert!(
        msg.contains("spend cap of $0.000050 reached after 5 calls"),
        "{msg}"
    );
    assert!(msg.contains("run again"), "{msg}");
    assert!(eval::table(&r).contains("stopped: spend cap"));
    assert_eq!(eval::read_results(&path).unwrap().len(), 5);
}

#[test]
fn dataset_lines_name_their_faults() {
    let e = parse_dataset(&b"{\"messages\": []}\n"[..]).unwrap_err();
    assert!(
        e.0.starts_with("line 1:") && e.0.contains("messages"),
        "{e}"
    );
    let e = parse_dataset(
        &b"{\"messages\": [{\"role\": \"user\", \"content\": \"a\"}]}\nnot json\n"[..],
    )
    .unwrap_err();
    assert!(e.0.starts_with("line 2: not a JSON object"), "{e}");
    let e = parse_dataset(&b"{\"id\": 1, \"messages\": [{\"role\": \"user\", \"content\": \"a\"}]}\n{\"id\": \"1\", \"messages\": [{\"role\": \"user\", \"content\": \"a\"}]}\n"[..]).unwrap_err();
    assert!(e.0.contains("used twice"), "{e}");
    let ok = parse_dataset(
        &b"// comment\n\n{\"request\": {\"messages\": [{\"role\": \"user\", \"content\": \"a\"}]}, \"reference\": {\"x\": 1}}\n"[..],
    )
    .unwrap();
    assert_eq!(ok[0].id, "line-3");
    assert_eq!(ok[0].expected, Some(json!({"x": 1})));
    assert_eq!(ok[0].request.model, "eval");
}

#[tokio::test(start_paused = true)]
async fn candidates_come_from_the_configuration() {
    let path = std::path::Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/demo.toml"));
    let config = llm_tower_proxy::config::Config::from_file(path).unwrap();
    let env = |_: &str| None;
    let names = ["cheap".to_owned(), "sim-tiny/sim-tiny".to_owned()];
    let cands = eval::candidates_from_config(&config, &env, &names, false)
        .await
        .unwrap();
    assert_eq!(cands[0].model, None);
    assert_eq!(cands[1].model.as_deref(), Some("sim-tiny"));
    let items = eval::read_dataset(&path.with_file_name("eval/classify.jsonl")).unwrap();
    assert_eq!(items.len(), 24);
    let rule = eval::validator_for(&config, "classify").unwrap();
    let mut opts = EvalOptions::new("classify");
    opts.reference = Some("cheap".into());
    let r = eval::run(
        &cands,
        &items,
        rule.as_ref(),
        &eval::prices_of(&config).unwrap(),
        &opts,
        |_, _| {},
    )
    .await
    .unwrap();
    // The demo's expected labels are the simulated models' own: the cheap chain matches all.
    assert_eq!(r.candidates[0].match_rate, Some(1.0));
    // sim-tiny breaks 1 JSON answer in 8: exactly 3 of 24.
    assert_eq!(r.candidates[1].validated - r.candidates[1].valid, 3);
    assert!(r.candidates[1].cost_nano < r.candidates[0].cost_nano);

    for (bad, needle) in [
        ("nope", "not a chain"),
        ("ghost/m", "no provider \"ghost\""),
    ] {
        let e = eval::candidates_from_config(&config, &env, &[bad.to_owned()], false)
            .await
            .unwrap_err();
        assert!(e.0.contains(needle), "{e}");
    }
}
