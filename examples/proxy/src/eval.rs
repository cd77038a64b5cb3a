//! `llm-tower-proxy eval`: runs a dataset of chat requests through candidate chains (or
//! provider/model pairs) with a task's validator, and reports per candidate what choosing
//! it would mean: validation pass rate, match with the expected answer, agreement with a
//! reference candidate, latency, tokens, cost and errors.
//!
//! # Dataset
//!
//! JSON lines; each line is a chat request (`messages`, `response_format`, …; `model` may be
//! left out) with optional extra fields, removed before the request is sent:
//!
//! - `id`: the item's name in the results file (default: `line-N`);
//! - `expected` (or `reference`): the expected answer, a string or any JSON value.
//!
//! A line may also be `{"id": …, "request": {…}, "expected": …}`.
//!
//! # Results file, resume, spend cap
//!
//! Every finished call appends one JSON line (item, candidate, outcome, tokens, cost, text)
//! to the results file. Run again with the same file and the finished (item, candidate)
//! pairs are skipped; the report covers old and new lines. The spend cap counts this run's
//! cost: once reached, no new call starts and the run ends with [`EvalReport::stopped`]
//! set (calls already in flight finish, so it is exceeded by at most `concurrency` calls).
//!
//! # Cache
//!
//! Candidates are the chains (or providers) themselves, below the gateway's cache, rate
//! limits and budgets: every item is a real call unless the cache is asked for
//! ([`EvalOptions::use_cache`], applied by [`candidates_from_config`]).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use llm_tower::cost::PriceTable;
use llm_tower::validate::Rule;
use llm_tower::{BoxLlmService, ChatRequest, LlmError, NanoUsd};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tower::ServiceExt;

use crate::compare::compare;

/// The longest answer text kept in a results line.
pub const MAX_KEPT_TEXT: usize = 64 * 1024;
/// The largest dataset line read.
pub const MAX_LINE_BYTES: usize = 4 * 1024 * 1024;
/// The most dataset items read.
pub const MAX_ITEMS: usize = 1_000_000;

/// Why an evaluation could not run.
#[derive(Debug)]
pub struct EvalError(pub String);

impl std::fmt::Display for EvalError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for EvalError {}

fn err(s: impl Into<String>) -> EvalError {
    EvalError(s.into())
}

/// One dataset item.
#[derive(Debug, Clone)]
pub struct EvalItem {
    /// Its name in the results file.
    pub id: String,
    /// The request (the task type is set by the run).
    pub request: ChatRequest,
    /// The expected answer, if given.
    pub expected: Option<Value>,
}

/// Reads a JSONL dataset (see the [module docs](self)); blank lines and lines starting
/// with `//` are skipped.
pub fn read_dataset(path: &Path) -> Result<Vec<EvalItem>, EvalError> {
    let f = std::fs::File::open(path)
        .map_err(|e| err(format!("cannot open the dataset {}: {e}", path.display())))?;
    parse_dataset(std::io::BufReader::new(f))
        .map_err(|e| err(format!("{}: {}", path.display(), e.0)))
}

/// [`read_dataset`] from any reader.
///
/// ```
/// let items = llm_tower_proxy::eval::parse_dataset(
///     &br#"{"id": "a", "messages": [{"role": "user", "content": "hi"}], "expected": "hello"}"#[..],
/// ).unwrap();
/// assert_eq!(items[0].id, "a");
/// assert_eq!(items[0].expected, Some(serde_json::json!("hello")));
/// ```
pub fn parse_dataset(r: impl BufRead) -> Result<Vec<EvalItem>, EvalError> {
    let mut items = Vec::new();
    let mut ids = BTreeSet::new();
    for (n, line) in r.split(b'\n').enumerate() {
        let n = n + 1;
        let line = line.map_err(|e| err(format!("line {n}: {e}")))?;
        if line.len() > MAX_LINE_BYTES {
            return Err(err(format!("line {n}: longer than {MAX_LINE_BYTES} bytes")));
        }
        let text = String::from_utf8_lossy(&line);
        let t = text.trim();
        if t.is_empty() || t.starts_with("//") {
            continue;
        }
        if items.len() >= MAX_ITEMS {
            return Err(err(format!("more than {MAX_ITEMS} items")));
        }
        let mut v: serde_json::Map<String, Value> = serde_json::from_str(t)
            .map_err(|e| err(format!("line {n}: not a JSON object ({e})")))?;
        let id = match v.remove("id") {
            Some(Value::String(s)) => s,
            Some(Value::Number(x)) => x.to_string(),
            None => format!("line-{n}"),
            Some(_) => return Err(err(format!("line {n}: `id` must be a string or number"))),
        };
        if !ids.insert(id.clone()) {
            return Err(err(format!("line {n}: the id {id:?} is used twice")));
        }
        let expected = v.remove("expected").or_else(|| v.remove("reference"));
        let mut body = match v.remove("request") {
            Some(Value::Object(r)) => r,
            Some(_) => return Err(err(format!("line {n}: `request` must be an object"))),
            None => v,
        };
        body.entry("model").or_insert_with(|| json!("eval"));
        let bytes = serde_json::to_vec(&body).unwrap_or_default();
        let request = ChatRequest::from_slice(&bytes)
            .map_err(|e| err(format!("line {n}: {}", e.message())))?;
        items.push(EvalItem {
            id,
            request,
            expected,
        });
    }
    Ok(items)
}

/// A candidate: a name and the service answering for it.
#[derive(Clone)]
pub struct Candidate {
    /// Its name in reports (a chain name or `provider/model`).
    pub name: String,
    /// The service (a chain, or a provider).
    pub service: BoxLlmService,
    /// The model every request asks for (a provider/model pair's model).
    pub model: Option<String>,
}

impl std::fmt::Debug for Candidate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Candidate")
            .field("name", &self.name)
            .field("model", &self.model)
            .finish_non_exhaustive()
    }
}

/// How to run.
#[derive(Debug, Clone)]
pub struct EvalOptions {
    /// The task type: its validator applies and requests carry it.
    pub task: String,
    /// Calls in flight at once (at least 1).
    pub concurrency: usize,
    /// Stop starting calls once this run has cost this much (nano-dollars).
    pub spend_cap: Option<NanoUsd>,
    /// The candidate whose answers the others are compared with.
    pub reference: Option<String>,
    /// Go through the gateway's cache (see [`candidates_from_config`]).
    pub use_cache: bool,
    /// Where results are appended and read back from (resume).
    pub results: Option<PathBuf>,
    /// Longest a call may take.
    pub timeout: Duration,
}

impl EvalOptions {
    /// Defaults for `task`: 4 at once, no cap, no reference, no cache, no results file,
    /// 120 s per call.
    pub fn new(task: impl Into<String>) -> Self {
        Self {
            task: task.into(),
            concurrency: 4,
            spend_cap: None,
            reference: None,
            use_cache: false,
            results: None,
            timeout: Duration::from_secs(120),
        }
    }
}

/// One finished call: a line of the results file.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ItemResult {
    /// The dataset item.
    pub item: String,
    /// The candidate.
    pub candidate: String,
    /// The error kind (`rate_limited`, `timeout`, …) when the call failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The answer text (cut at [`MAX_KEPT_TEXT`]).
    #[serde(default)]
    pub text: String,
    /// Whether the answer passed the task's validator (none: no validator, or an error).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub valid: Option<bool>,
    /// Milliseconds from the call to the complete answer.
    pub latency_ms: u64,
    /// Input tokens.
    #[serde(default)]
    pub prompt_tokens: u64,
    /// Output tokens.
    #[serde(default)]
    pub completion_tokens: u64,
    /// Cost in nano-dollars (0 when the model has no price).
    #[serde(default)]
    pub cost_nano: NanoUsd,
    /// Whether the model had a price.
    #[serde(default)]
    pub priced: bool,
}

/// A candidate's figures.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct CandidateReport {
    /// The candidate.
    pub name: String,
    /// Items run (answers and errors).
    pub runs: u64,
    /// Answers received.
    pub answers: u64,
    /// Errors by kind.
    pub errors: BTreeMap<String, u64>,
    /// Answers checked by the validator, and those that passed.
    pub validated: u64,
    /// Answers that passed the validator.
    pub valid: u64,
    /// `valid / validated` (none without a validator).
    pub pass_rate: Option<f64>,
    /// Answers with an expected answer.
    pub with_expected: u64,
    /// Answers byte-equal to the expected one.
    pub exact: u64,
    /// Answers equal to the expected one after normalising.
    pub normalised: u64,
    /// `normalised / with_expected`.
    pub match_rate: Option<f64>,
    /// Items both this candidate and the reference answered.
    pub compared: u64,
    /// Of those, answers equal to the reference's after normalising.
    pub agree: u64,
    /// `agree / compared`.
    pub agreement: Option<f64>,
    /// JSON fields equal to the reference's, and JSON fields compared.
    pub fields_agree: u64,
    /// JSON fields compared with the reference's.
    pub fields_total: u64,
    /// Median latency of answers, in milliseconds.
    pub latency_p50_ms: Option<u64>,
    /// 95th percentile latency of answers, in milliseconds.
    pub latency_p95_ms: Option<u64>,
    /// Input tokens over all answers.
    pub prompt_tokens: u64,
    /// Output tokens over all answers.
    pub completion_tokens: u64,
    /// Cost over all answers (nano-dollars).
    pub cost_nano: NanoUsd,
    /// Cost per request (over answers), in dollars.
    pub cost_per_request_usd: Option<f64>,
    /// Cost per 1000 requests, in dollars.
    pub cost_per_1000_usd: Option<f64>,
    /// Answers whose model had no price (their cost counts as 0).
    pub unpriced: u64,
}

/// The report of a run.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct EvalReport {
    /// The task type.
    pub task: String,
    /// Dataset items.
    pub items: u64,
    /// The reference candidate, if any.
    pub reference: Option<String>,
    /// Results read back from the results file (skipped this run).
    pub resumed: u64,
    /// Calls made by this run.
    pub calls: u64,
    /// What this run cost (nano-dollars).
    pub run_cost_nano: NanoUsd,
    /// Why the run stopped early (the spend cap), if it did.
    pub stopped: Option<String>,
    /// Per candidate, in the order given.
    pub candidates: Vec<CandidateReport>,
}

/// Runs every item through every candidate; `progress(done, total)` is called after each
/// call. See the [module docs](self).
pub async fn run(
    candidates: &[Candidate],
    items: &[EvalItem],
    validator: Option<&Rule>,
    prices: &PriceTable,
    opts: &EvalOptions,
    mut progress: impl FnMut(u64, u64),
) -> Result<EvalReport, EvalError> {
    if candidates.is_empty() {
        return Err(err("no candidates"));
    }
    let names: BTreeSet<&str> = candidates.iter().map(|c| c.name.as_str()).collect();
    if names.len() != candidates.len() {
        return Err(err("a candidate is named twice"));
    }
    if let Some(r) = &opts.reference
        && !names.contains(r.as_str())
    {
        return Err(err(format!(
            "the reference {r:?} is not one of the candidates"
        )));
    }
    let item_ids: BTreeSet<&str> = items.iter().map(|i| i.id.as_str()).collect();
    // Earlier results: kept when they are about this dataset and these candidates.
    let mut results: BTreeMap<(String, String), ItemResult> = BTreeMap::new();
    if let Some(path) = &opts.results {
        for r in read_results(path)? {
            if item_ids.contains(r.item.as_str()) && names.contains(r.candidate.as_str()) {
                results.insert((r.item.clone(), r.candidate.clone()), r);
            }
        }
    }
    let resumed = results.len() as u64;
    let mut out = match &opts.results {
        Some(path) => Some(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map_err(|e| err(format!("cannot write {}: {e}", path.display())))?,
        ),
        None => None,
    };
    let todo: Vec<(&EvalItem, &Candidate)> = items
        .iter()
        .flat_map(|i| candidates.iter().map(move |c| (i, c)))
        .filter(|(i, c)| !results.contains_key(&(i.id.clone(), c.name.clone())))
        .collect();
    let total = todo.len() as u64;
    let mut done = 0u64;
    let mut spent: NanoUsd = 0;
    let mut stopped = None;
    let mut calls = 0u64;
    let mut pending = todo.into_iter();
    let mut running = FuturesUnordered::new();
    let concurrency = opts.concurrency.max(1);
    loop {
        while running.len() < concurrency && stopped.is_none() {
            if let Some(cap) = opts.spend_cap
                && spent >= cap
            {
                stopped = Some(format!(
                    "spend cap of ${:.6} reached after {calls} calls (this run cost ${:.6}); \
                     the results so far are kept{}; run again to go on",
                    cap as f64 / 1e9,
                    spent as f64 / 1e9,
                    opts.results
                        .as_ref()
                        .map(|p| format!(" in {}", p.display()))
                        .unwrap_or_default(),
                ));
                break;
            }
            let Some((item, cand)) = pending.next() else {
                break;
            };
            calls += 1;
            running.push(call_one(item, cand, validator, prices, opts));
        }
        let Some(r) = running.next().await else {
            break;
        };
        spent = spent.saturating_add(r.cost_nano);
        done += 1;
        progress(done, total);
        if let Some(f) = out.as_mut() {
            let mut line = serde_json::to_vec(&r).unwrap_or_default();
            line.push(b'\n');
            f.write_all(&line)
                .and_then(|()| f.flush())
                .map_err(|e| err(format!("cannot write the results file: {e}")))?;
        }
        results.insert((r.item.clone(), r.candidate.clone()), r);
    }
    let mut report = summarise(candidates, items, &results, opts);
    report.resumed = resumed;
    report.calls = calls;
    report.run_cost_nano = spent;
    report.stopped = stopped;
    Ok(report)
}

async fn call_one(
    item: &EvalItem,
    cand: &Candidate,
    validator: Option<&Rule>,
    prices: &PriceTable,
    opts: &EvalOptions,
) -> ItemResult {
    let mut req = item.request.clone();
    req.set_task_type(opts.task.as_str());
    if let Some(m) = &cand.model {
        req.model = m.clone();
    }
    let requested = req.model.clone();
    let started = tokio::time::Instant::now();
    let call = async {
        let resp = cand.service.clone().oneshot(req).await?;
        let meta = resp.meta.clone();
        let answer = resp.into_complete().await?;
        Ok::<_, LlmError>((meta, answer))
    };
    let res = match tokio::time::timeout(opts.timeout, call).await {
        Ok(r) => r,
        Err(_) => Err(LlmError::new(
            llm_tower::ErrorKind::Timeout,
            "eval call timed out",
        )),
    };
    let latency_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
    let mut r = ItemResult {
        item: item.id.clone(),
        candidate: cand.name.clone(),
        error: None,
        text: String::new(),
        valid: None,
        latency_ms,
        prompt_tokens: 0,
        completion_tokens: 0,
        cost_nano: 0,
        priced: false,
    };
    match res {
        Err(e) => r.error = Some(e.kind().as_str().to_owned()),
        Ok((meta, answer)) => {
            let text = answer.text();
            r.valid = validator.map(|v| v.check(&text).is_ok());
            if let Some(u) = meta.usage.as_ref().or(answer.usage.as_ref()) {
                r.prompt_tokens = u.prompt_tokens;
                r.completion_tokens = u.completion_tokens;
                let model = meta.model.as_deref().unwrap_or(&requested);
                if let Some((_, price)) = prices.get(model).or_else(|| prices.get(&requested)) {
                    r.cost_nano = price.cost(u);
                    r.priced = true;
                }
            }
            r.text = cut(text, MAX_KEPT_TEXT);
        }
    }
    r
}

fn cut(mut s: String, max: usize) -> String {
    if s.len() > max {
        let mut end = max;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
    }
    s
}

/// Reads a results file (absent: none). A torn last line (a run killed mid-write) is
/// ignored; any other bad line is an error.
pub fn read_results(path: &Path) -> Result<Vec<ItemResult>, EvalError> {
    let f = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(err(format!("cannot read {}: {e}", path.display()))),
    };
    let lines: Vec<Vec<u8>> = std::io::BufReader::new(f)
        .split(b'\n')
        .collect::<Result<_, _>>()
        .map_err(|e| err(format!("cannot read {}: {e}", path.display())))?;
    let last = lines.len();
    let mut out = Vec::new();
    for (n, line) in lines.into_iter().enumerate() {
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        match serde_json::from_slice::<ItemResult>(&line) {
            Ok(r) => out.push(r),
            Err(_) if n + 1 == last => {}
            Err(e) => {
                return Err(err(format!(
                    "{} line {}: not a results line ({e})",
                    path.display(),
                    n + 1
                )));
            }
        }
    }
    Ok(out)
}

fn percentile(sorted: &[u64], p: f64) -> Option<u64> {
    if sorted.is_empty() {
        return None;
    }
    // Nearest rank.
    let rank = ((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    Some(sorted[rank - 1])
}

fn ratio(n: u64, d: u64) -> Option<f64> {
    (d > 0).then(|| n as f64 / d as f64)
}

fn summarise(
    candidates: &[Candidate],
    items: &[EvalItem],
    results: &BTreeMap<(String, String), ItemResult>,
    opts: &EvalOptions,
) -> EvalReport {
    let mut report = EvalReport {
        task: opts.task.clone(),
        items: items.len() as u64,
        reference: opts.reference.clone(),
        ..EvalReport::default()
    };
    for c in candidates {
        let mut cr = CandidateReport {
            name: c.name.clone(),
            ..CandidateReport::default()
        };
        let mut lat = Vec::new();
        for item in items {
            let Some(r) = results.get(&(item.id.clone(), c.name.clone())) else {
                continue;
            };
            cr.runs += 1;
            if let Some(e) = &r.error {
                *cr.errors.entry(e.clone()).or_default() += 1;
                continue;
            }
            cr.answers += 1;
            lat.push(r.latency_ms);
            if let Some(v) = r.valid {
                cr.validated += 1;
                cr.valid += u64::from(v);
            }
            cr.prompt_tokens += r.prompt_tokens;
            cr.completion_tokens += r.completion_tokens;
            cr.cost_nano = cr.cost_nano.saturating_add(r.cost_nano);
            cr.unpriced += u64::from(!r.priced);
            if let Some(exp) = &item.expected {
                let exp = match exp {
                    Value::String(s) => s.clone(),
                    other => other.to_string(),
                };
                let cmp = compare(&r.text, &exp);
                cr.with_expected += 1;
                cr.exact += u64::from(cmp.exact);
                cr.normalised += u64::from(cmp.normalised);
            }
            if let Some(refname) = &opts.reference
                && *refname != c.name
                && let Some(rr) = results.get(&(item.id.clone(), refname.clone()))
                && rr.error.is_none()
            {
                let cmp = compare(&r.text, &rr.text);
                cr.compared += 1;
                cr.agree += u64::from(cmp.normalised);
                if let Some((a, t)) = cmp.fields {
                    cr.fields_agree += a;
                    cr.fields_total += t;
                }
            }
        }
        lat.sort_unstable();
        cr.latency_p50_ms = percentile(&lat, 0.50);
        cr.latency_p95_ms = percentile(&lat, 0.95);
        cr.pass_rate = ratio(cr.valid, cr.validated);
        cr.match_rate = ratio(cr.normalised, cr.with_expected);
        cr.agreement = ratio(cr.agree, cr.compared);
        if cr.answers > 0 {
            let per = cr.cost_nano as f64 / cr.answers as f64 / 1e9;
            cr.cost_per_request_usd = Some(per);
            cr.cost_per_1000_usd = Some(per * 1000.0);
        }
        report.candidates.push(cr);
    }
    report
}

/// The report as a terminal table.
pub fn table(r: &EvalReport) -> String {
    let pct = |x: Option<f64>| x.map_or("-".to_owned(), |x| format!("{:.1}%", x * 100.0));
    let ms = |x: Option<u64>| x.map_or("-".to_owned(), |x| format!("{x}"));
    let mut out = String::new();
    let _ = writeln!(
        out,
        "task {}: {} items{}{}",
        r.task,
        r.items,
        r.reference
            .as_ref()
            .map(|x| format!(", reference {x}"))
            .unwrap_or_default(),
        if r.resumed > 0 {
            format!(", {} results resumed", r.resumed)
        } else {
            String::new()
        }
    );
    let header = [
        "candidate",
        "runs",
        "valid",
        "match",
        "agree",
        "fields",
        "p50 ms",
        "p95 ms",
        "tok in/req",
        "tok out/req",
        "$/req",
        "$/1000",
        "errors",
    ];
    let mut rows: Vec<Vec<String>> = vec![header.iter().map(|s| (*s).to_owned()).collect()];
    for c in &r.candidates {
        let per = |n: u64| {
            if c.answers == 0 {
                "-".to_owned()
            } else {
                format!("{:.1}", n as f64 / c.answers as f64)
            }
        };
        let errors = if c.errors.is_empty() {
            "-".to_owned()
        } else {
            c.errors
                .iter()
                .map(|(k, n)| format!("{k}:{n}"))
                .collect::<Vec<_>>()
                .join(" ")
        };
        rows.push(vec![
            c.name.clone(),
            c.runs.to_string(),
            pct(c.pass_rate),
            pct(c.match_rate),
            if r.reference.as_deref() == Some(c.name.as_str()) {
                "ref".to_owned()
            } else {
                pct(c.agreement)
            },
            pct(ratio(c.fields_agree, c.fields_total)),
            ms(c.latency_p50_ms),
            ms(c.latency_p95_ms),
            per(c.prompt_tokens),
            per(c.completion_tokens),
            c.cost_per_request_usd
                .map_or("-".to_owned(), |x| format!("{x:.6}")),
            c.cost_per_1000_usd
                .map_or("-".to_owned(), |x| format!("{x:.4}")),
            errors,
        ]);
    }
    let widths: Vec<usize> = (0..header.len())
        .map(|i| rows.iter().map(|r| r[i].chars().count()).max().unwrap_or(0))
        .collect();
    for row in rows {
        let line: Vec<String> = row
            .iter()
            .enumerate()
            .map(|(i, cell)| {
                if i == 0 || i + 1 == widths.len() {
                    format!("{cell:<w$}", w = widths[i])
                } else {
                    format!("{cell:>w$}", w = widths[i])
                }
            })
            .collect();
        let _ = writeln!(out, "{}", line.join("  ").trim_end());
    }
    let _ = writeln!(
        out,
        "this run: {} calls, ${:.6}",
        r.calls,
        r.run_cost_nano as f64 / 1e9
    );
    if let Some(s) = &r.stopped {
        let _ = writeln!(out, "stopped: {s}");
    }
    out
}

/// Shared by the subcommand: the candidates named on the command line, from `config`.
///
/// A name is a chain of the configuration, or `provider/model` (a provider of the
/// configuration, asked for that model). With `use_cache`, each candidate goes through the
/// gateway's cache (its store, TTLs and scope rules).
pub async fn candidates_from_config(
    config: &crate::config::Config,
    env: &dyn Fn(&str) -> Option<String>,
    names: &[String],
    use_cache: bool,
) -> Result<Vec<Candidate>, EvalError> {
    let (chains, providers) = crate::gateway::eval_services(config, env, use_cache)
        .await
        .map_err(|e| err(e.to_string()))?;
    let mut out = Vec::new();
    for n in names {
        if let Some(svc) = chains.get(n) {
            out.push(Candidate {
                name: n.clone(),
                service: svc.clone(),
                model: None,
            });
            continue;
        }
        let Some((p, m)) = n.split_once('/') else {
            return Err(err(format!(
                "unknown candidate {n:?}: not a chain of the configuration, nor provider/model"
            )));
        };
        let svc = providers.get(p).ok_or_else(|| {
            err(format!(
                "unknown candidate {n:?}: no provider {p:?} in the configuration"
            ))
        })?;
        out.push(Candidate {
            name: n.clone(),
            service: svc.clone(),
            model: Some(m.to_owned()),
        });
    }
    Ok(out)
}

/// The subcommand's arguments.
#[derive(Debug, Clone)]
pub struct EvalArgs {
    /// The configuration file.
    pub config: PathBuf,
    /// The dataset (JSONL).
    pub dataset: PathBuf,
    /// Candidate names.
    pub candidates: Vec<String>,
    /// Options.
    pub options: EvalOptions,
    /// Print JSON instead of the table.
    pub json: bool,
}

/// Runs `llm-tower-proxy eval`: prints the report (table or JSON) on stdout and a
/// progress line on stderr (when it is a terminal).
pub async fn main(args: EvalArgs) -> std::process::ExitCode {
    match main_inner(args).await {
        Ok((out, stopped)) => {
            // Not `println!`: a closed pipe (`| head`) must not panic.
            let mut stdout = std::io::stdout().lock();
            let _ = stdout
                .write_all(out.as_bytes())
                .and_then(|()| stdout.write_all(b"\n"))
                .and_then(|()| stdout.flush());
            if stopped {
                std::process::ExitCode::from(2)
            } else {
                std::process::ExitCode::SUCCESS
            }
        }
        Err(e) => {
            #[allow(clippy::print_stderr)] // the command's error
            {
                eprintln!("llm-tower-proxy eval: {e}");
            }
            std::process::ExitCode::FAILURE
        }
    }
}

async fn main_inner(args: EvalArgs) -> Result<(String, bool), EvalError> {
    use std::io::IsTerminal as _;
    let config = crate::config::Config::from_file(&args.config).map_err(|e| err(e.to_string()))?;
    let items = read_dataset(&args.dataset)?;
    let env = |k: &str| std::env::var(k).ok();
    let validator = validator_for(&config, &args.options.task)?;
    let prices = prices_of(&config)?;
    let candidates =
        candidates_from_config(&config, &env, &args.candidates, args.options.use_cache).await?;
    let tty = std::io::stderr().is_terminal();
    let report = run(
        &candidates,
        &items,
        validator.as_ref(),
        &prices,
        &args.options,
        |done, total| {
            if tty {
                let width = 30u64;
                let filled = (done * width).checked_div(total).unwrap_or(width);
                let bar: String = (0..width)
                    .map(|i| if i < filled { '#' } else { '.' })
                    .collect();
                #[allow(clippy::print_stderr)] // the progress bar
                {
                    eprint!("\r[{bar}] {done}/{total}");
                    if done == total {
                        eprintln!();
                    }
                }
            }
        },
    )
    .await?;
    if let Some(s) = &report.stopped {
        #[allow(clippy::print_stderr)] // the reason the run stopped
        {
            eprintln!("\nllm-tower-proxy eval: stopped: {s}");
        }
    }
    let out = if args.json {
        serde_json::to_string_pretty(&report).unwrap_or_default()
    } else {
        table(&report)
    };
    Ok((out, report.stopped.is_some()))
}

/// The validator of `task` in `config`, if it has one.
pub fn validator_for(
    config: &crate::config::Config,
    task: &str,
) -> Result<Option<Rule>, EvalError> {
    Ok(config.validator_rule(task).cloned())
}

/// The configuration's price table.
pub fn prices_of(config: &crate::config::Config) -> Result<PriceTable, EvalError> {
    crate::gateway::price_table(config).map_err(|e| err(e.to_string()))
}

/// A candidate from a service (for library callers and tests).
pub fn candidate(name: impl Into<String>, service: BoxLlmService) -> Candidate {
    Candidate {
        name: name.into(),
        service,
        model: None,
    }
}
