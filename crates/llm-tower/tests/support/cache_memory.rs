//! The cache memory check shared by `cache_memory.rs` (the system allocator) and
//! `cache_memory_mimalloc.rs` (the gateway's allocator).
//!
//! Each case runs in a child process of its own (the test binary, re-run with the case's
//! name), so that resident memory is measured without the other cases' leftovers: the child
//! fills a `MemoryStore` well past its bound and reports how much its resident memory grew;
//! the parent checks that growth stays within 1.25 × the bound plus a small fixed slack.

use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use futures_util::FutureExt;
use llm_tower::cache::{CacheKey, CacheStore, CachedEntry, MemoryStore};
use llm_tower::{
    ChatChunk, ChatResponse, ChunkChoice, Delta, EncodedResponse, ResponseMeta, Usage,
};

/// The store's bound in each case.
const BOUND: u64 = 24 * 1024 * 1024;
/// What may come on top of 1.25 × the bound: the table's part sized at creation, the
/// allocator's own structures, the last entries being built.
const SLACK: u64 = 4 * 1024 * 1024;
const CASES: [&str; 4] = [
    "small_complete",
    "small_encoded",
    "streams",
    "large_encoded",
];

fn rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in /proc/self/status");
    kb * 1024
}

fn meta() -> ResponseMeta {
    ResponseMeta {
        provider: Some("simulated".into()),
        model: Some("gpt-4o-mini".into()),
        usage: Some(Usage {
            prompt_tokens: 12,
            completion_tokens: 9,
            total_tokens: 21,
            ..Usage::default()
        }),
        ..ResponseMeta::default()
    }
}

fn key(i: u64) -> CacheKey {
    let mut b = [0u8; 32];
    b[..8].copy_from_slice(&i.to_le_bytes());
    b[8] = 0xa5;
    CacheKey::from_bytes(b)
}

fn encoded(i: u64, text_len: usize, buffer: usize) -> EncodedResponse {
    let json = format!(
        r#"{{"id":"chatcmpl-{i}","object":"chat.completion","created":1700000000,"model":"gpt-4o-mini","choices":[{{"index":0,"message":{{"role":"assistant","content":"{}"}},"finish_reason":"stop"}}],"usage":{{"prompt_tokens":12,"completion_tokens":9,"total_tokens":21}}}}"#,
        "x".repeat(text_len)
    );
    // As an HTTP client hands it over: a slice of a bigger read buffer, kept alive whole.
    let mut v = Vec::with_capacity(buffer.max(json.len()));
    v.extend_from_slice(json.as_bytes());
    EncodedResponse::from_json(v.into()).expect("a chat completion")
}

fn entry(case: &str, i: u64) -> CachedEntry {
    match case {
        "small_complete" => CachedEntry::complete(
            ChatResponse::from_text("gpt-4o-mini", format!("The answer to question {i} is 42.")),
            &meta(),
        ),
        "small_encoded" => CachedEntry::encoded(encoded(i, 40, 8192), &meta()),
        "streams" => {
            // 300 one-token chunks, as providers stream them.
            let chunks = (0..300)
                .map(|n| ChatChunk {
                    id: format!("chatcmpl-{i}"),
                    object: "chat.completion.chunk".into(),
                    created: 1_700_000_000,
                    model: "gpt-4o-mini".into(),
                    choices: vec![ChunkChoice {
                        index: 0,
                        delta: Delta {
                            content: Some(Some(format!(" tok{n}"))),
                            ..Delta::default()
                        },
                        finish_reason: (n == 299).then(|| Some("stop".to_owned())),
                        ..ChunkChoice::default()
                    }],
                    ..ChatChunk::default()
                })
                .collect();
            CachedEntry::chunks(chunks, None, &meta())
        }
        "large_encoded" => CachedEntry::encoded(encoded(i, 200 * 1024, 0), &meta()),
        other => panic!("unknown case {other}"),
    }
}

/// Fills a store with entries of `case` until three bounds' worth went in; prints the
/// growth of resident memory and the store's weight.
fn child(case: &str) {
    // Warm up what the case touches once (formatting, the clock) before the baseline.
    drop(entry(case, u64::MAX));
    let before = rss_bytes();
    let store = MemoryStore::new(BOUND);
    let mut inserted = 0u64;
    let mut i = 0u64;
    while inserted < 3 * BOUND {
        let e = entry(case, i);
        inserted += e.memory_size() as u64;
        store
            .put(key(i), Arc::new(e), Duration::from_secs(3600))
            .now_or_never()
            .expect("the memory store answers at once")
            .expect("put");
        i += 1;
    }
    let after = rss_bytes();
    println!(
        "{case} entries={} weight={} inserted={i} growth={}",
        store.entry_count(),
        store.weighted_size(),
        after.saturating_sub(before)
    );
    drop(store);
}

/// Runs the cases (or, in a child, one case).
pub(crate) fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let Some(pos) = args.iter().position(|a| a == "--child") {
        child(&args[pos + 1]);
        return;
    }
    // Under `cargo test -- --list`, say what is here; under a filter that does not name
    // this check, do nothing.
    if args.iter().any(|a| a == "--list") {
        println!("cache_memory: test");
        return;
    }
    if args
        .iter()
        .skip(1)
        .any(|a| !a.starts_with('-') && !"cache_memory".contains(a.as_str()))
    {
        return;
    }
    let exe = std::env::current_exe().expect("the test binary");
    for case in CASES {
        let out = Command::new(&exe)
            .args(["--child", case])
            .output()
            .expect("run the child");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{case}: {stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let field = |name: &str| -> u64 {
            stdout
                .split_whitespace()
                .find_map(|w| w.strip_prefix(&format!("{name}=")))
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("{case}: no {name} in {stdout:?}"))
        };
        let (weight, growth) = (field("weight"), field("growth"));
        println!("{}", stdout.trim());
        // The store filled up (else the case proves nothing) and stayed within its bound.
        assert!(
            weight > BOUND * 8 / 10 && weight <= BOUND,
            "{case}: {stdout}"
        );
        let limit = BOUND + BOUND / 4 + SLACK;
        assert!(
            growth <= limit,
            "{case}: resident memory grew by {growth} bytes, over {limit} (bound {BOUND}): {stdout}"
        );
    }
    println!("cache_memory: ok");
}
