//! Embeddings through the same layers as chat: the per-input cache split, fallback, cost
//! and the token estimate, with a scripted inner service on paused time.
#![cfg(all(
    feature = "cache",
    feature = "fallback",
    feature = "cost",
    feature = "rate-limit"
))]

use llm_tower::LlmService;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use llm_tower::cache::{CacheKey, CacheLayer, CacheStore, CachedEntry, StoreFuture};
use llm_tower::cost::{CostLayer, ModelPrice, PriceTable};
use llm_tower::fallback::{FallbackLayer, FallbackTarget};
use llm_tower::rate_limit::TokenEstimator;
use llm_tower::{
    CachePolicy, CacheStatus, ChatRequest, EmbeddingInput, EmbeddingsRequest, EmbeddingsResponse,
    EncodingFormat, ErrorKind, LlmError, LlmResponse, Usage,
};
use tower::{Layer, Service, ServiceExt, service_fn};

/// What the scripted upstream does with the next call.
#[derive(Clone)]
enum Script {
    /// Answer: the vector of an input is `[len, first byte]`; 2 tokens per input.
    Answer,
    /// Fail with this error.
    Fail(LlmError),
    /// Answer one vector too few.
    Short,
    /// Never answer.
    Hang,
}

#[derive(Clone, Default)]
struct Upstream {
    seen: Arc<Mutex<Vec<Vec<String>>>>,
    script: Arc<Mutex<Vec<Script>>>,
}

fn text(x: &EmbeddingInput) -> String {
    match x {
        EmbeddingInput::Text(t) => t.clone(),
        EmbeddingInput::Tokens(t) => format!("{t:?}"),
    }
}

fn vector(x: &str) -> Vec<f32> {
    vec![x.len() as f32, f32::from(x.as_bytes()[0])]
}

impl Upstream {
    fn then(self, s: Script) -> Self {
        self.script.lock().unwrap().push(s);
        self
    }
    fn calls(&self) -> Vec<Vec<String>> {
        self.seen.lock().unwrap().clone()
    }
    fn service(
        &self,
        name: &'static str,
    ) -> impl Service<ChatRequest, Response = LlmResponse, Error = LlmError, Future: Send>
    + Clone
    + Send
    + 'static {
        let me = self.clone();
        service_fn(move |req: ChatRequest| {
            let me = me.clone();
            async move {
                let emb = req.as_embeddings().expect("an embeddings envelope").clone();
                let inputs: Vec<String> = emb.input.iter().map(text).collect();
                me.seen.lock().unwrap().push(inputs.clone());
                let step = {
                    let mut s = me.script.lock().unwrap();
                    if s.is_empty() {
                        Script::Answer
                    } else {
                        s.remove(0)
                    }
                };
                let n = inputs.len();
                let data: Vec<Vec<f32>> = match step {
                    Script::Fail(e) => return Err(e),
                    Script::Hang => std::future::pending().await,
                    Script::Short => inputs[1..].iter().map(|x| vector(x)).collect(),
                    Script::Answer => inputs.iter().map(|x| vector(x)).collect(),
                };
                let mut resp = LlmResponse::embeddings(EmbeddingsResponse {
                    model: req.model.clone(),
                    data,
                    usage: Usage::new(2 * n as u64, 0),
                });
                resp.meta.provider = Some(name.into());
                Ok(resp)
            }
        })
    }
}

fn emb_req(inputs: &[&str]) -> ChatRequest {
    ChatRequest::embeddings(EmbeddingsRequest::new(
        "text-embedding-3-small",
        inputs.iter().copied(),
    ))
    .with_tenant("acme")
}

async fn call<S>(svc: &mut S, req: ChatRequest) -> Result<LlmResponse, LlmError>
where
    S: LlmService,
{
    svc.ready().await?.call(req).await
}

fn vectors(r: &EmbeddingsResponse) -> Vec<Vec<f32>> {
    r.data.clone()
}

#[tokio::test(start_paused = true)]
async fn a_half_cached_batch_asks_only_for_the_rest_and_comes_back_in_order() {
    let up = Upstream::default();
    let cache = CacheLayer::in_memory(1 << 20);
    let stats = cache.stats();
    let mut svc = cache.layer(up.service("p"));

    let first = call(&mut svc, emb_req(&["alpha", "bb"])).await.unwrap();
    assert_eq!(first.meta.cache, CacheStatus::Miss);
    assert_eq!(
        first.into_embeddings().unwrap().data,
        vec![vector("alpha"), vector("bb")]
    );

    let second = call(&mut svc, emb_req(&["bb", "cccc", "alpha"]))
        .await
        .unwrap();
    // Only the new input went upstream.
    assert_eq!(
        up.calls(),
        vec![vec!["alpha".to_owned(), "bb".into()], vec!["cccc".into()]]
    );
    assert_eq!(second.meta.cache, CacheStatus::Miss);
    // The meta has what was paid for (one input); the body every input's tokens: the
    // first call's 4 tokens were split 5:2 by size into 3 and 1.
    assert_eq!(second.meta.usage.as_ref().unwrap().prompt_tokens, 2);
    let body = second.into_embeddings().unwrap();
    assert_eq!(
        vectors(&body),
        vec![vector("bb"), vector("cccc"), vector("alpha")]
    );
    assert_eq!(body.usage.prompt_tokens, 2 + 1 + 3);

    let third = call(&mut svc, emb_req(&["cccc", "alpha"])).await.unwrap();
    assert_eq!(up.calls().len(), 2, "all cached: no upstream call");
    assert_eq!(third.meta.cache, CacheStatus::Hit);
    assert_eq!(third.meta.usage.as_ref().unwrap().prompt_tokens, 2 + 3);
    assert_eq!(third.meta.provider.as_deref(), Some("p"));
    assert_eq!(
        third.into_embeddings().unwrap().data,
        vec![vector("cccc"), vector("alpha")]
    );
    let s = stats.snapshot();
    // Per input: misses alpha, bb, cccc; hits bb, alpha, cccc, alpha.
    assert_eq!((s.misses, s.hits, s.writes), (3, 4, 3));
}

#[tokio::test(start_paused = true)]
async fn the_cache_is_scoped_and_keyed_on_what_changes_the_vector() {
    let up = Upstream::default();
    let mut svc = CacheLayer::in_memory(1 << 20).layer(up.service("p"));
    call(&mut svc, emb_req(&["x"])).await.unwrap();

    // Another encoding of the same vector: served from the cache.
    let mut b64 = EmbeddingsRequest::new("text-embedding-3-small", ["x"]);
    b64.encoding_format = Some(EncodingFormat::Base64);
    let r = call(&mut svc, ChatRequest::embeddings(b64).with_tenant("acme"))
        .await
        .unwrap();
    assert_eq!(r.meta.cache, CacheStatus::Hit);

    // Another tenant, other dimensions, another model: each asks upstream.
    call(&mut svc, emb_req(&["x"]).with_tenant("globex"))
        .await
        .unwrap();
    let mut dims = EmbeddingsRequest::new("text-embedding-3-small", ["x"]);
    dims.dimensions = Some(2);
    call(&mut svc, ChatRequest::embeddings(dims).with_tenant("acme"))
        .await
        .unwrap();
    let other =
        ChatRequest::embeddings(EmbeddingsRequest::new("other-model", ["x"])).with_tenant("acme");
    call(&mut svc, other).await.unwrap();
    assert_eq!(up.calls().len(), 4);

    // `no-store`: neither read nor written.
    let mut req = emb_req(&["x"]);
    req.set_cache_policy(CachePolicy::NoStore);
    let r = call(&mut svc, req).await.unwrap();
    assert_eq!(r.meta.cache, CacheStatus::Bypass);
    assert_eq!(up.calls().len(), 5);
}

#[tokio::test(start_paused = true)]
async fn errors_and_short_answers_are_not_cached() {
    let up = Upstream::default()
        .then(Script::Fail(LlmError::unavailable("down")))
        .then(Script::Short);
    let mut svc = CacheLayer::in_memory(1 << 20).layer(up.service("p"));
    let e = call(&mut svc, emb_req(&["a", "b"])).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Unavailable);
    let e = call(&mut svc, emb_req(&["a", "b"])).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Transport, "{e}");
    let ok = call(&mut svc, emb_req(&["a", "b"])).await.unwrap();
    assert_eq!(ok.meta.cache, CacheStatus::Miss);
    assert_eq!(up.calls().len(), 3);
}

/// A store whose calls never finish.
#[derive(Debug)]
struct Stuck;

impl CacheStore for Stuck {
    fn get(&self, _key: CacheKey) -> StoreFuture<Option<Arc<CachedEntry>>> {
        Box::pin(std::future::pending())
    }
    fn put(&self, _key: CacheKey, _e: Arc<CachedEntry>, _ttl: Duration) -> StoreFuture<()> {
        Box::pin(std::future::pending())
    }
}

#[tokio::test(start_paused = true)]
async fn a_stuck_store_is_a_miss_bounded_by_the_store_timeout() {
    let up = Upstream::default();
    let cache = CacheLayer::new(Stuck).store_timeout(Duration::from_millis(50));
    let stats = cache.stats();
    let mut svc = cache.layer(up.service("p"));
    let r = call(&mut svc, emb_req(&["a", "b"])).await.unwrap();
    assert_eq!(r.meta.cache, CacheStatus::Miss);
    assert_eq!(r.into_embeddings().unwrap().data.len(), 2);
    // Two lookups and two writes timed out.
    assert_eq!(stats.errors(), 4);
}

#[tokio::test(start_paused = true)]
async fn a_failing_step_falls_back_and_a_bad_request_does_not() {
    let primary = Upstream::default().then(Script::Fail(LlmError::unavailable("down")));
    let backup = Upstream::default();
    let layer = FallbackLayer::new(vec![
        FallbackTarget::new("backup", backup.service("b")).with_model("backup-embed"),
    ])
    .primary_name("primary")
    .no_cooldown();
    let mut svc = layer.layer(primary.service("p"));
    let r = call(&mut svc, emb_req(&["a", "bb"])).await.unwrap();
    assert_eq!(r.meta.attempts.len(), 2);
    assert_eq!(r.meta.provider.as_deref(), Some("b"));
    let body = r.into_embeddings().unwrap();
    assert_eq!(
        body.model, "backup-embed",
        "the step's model reaches the provider"
    );
    assert_eq!(body.data, vec![vector("a"), vector("bb")]);
    assert_eq!(backup.calls(), vec![vec!["a".to_owned(), "bb".into()]]);

    // A stuck primary is cut by the attempt timeout, then the backup answers.
    let primary = Upstream::default().then(Script::Hang);
    let backup = Upstream::default();
    let layer = FallbackLayer::new(vec![FallbackTarget::new("backup", backup.service("b"))])
        .primary_name("primary")
        .timeout(Duration::from_secs(2))
        .no_cooldown();
    let mut svc = layer.layer(primary.service("p"));
    let r = call(&mut svc, emb_req(&["a"])).await.unwrap();
    assert_eq!(r.meta.provider.as_deref(), Some("b"));

    let primary = Upstream::default().then(Script::Fail(LlmError::bad_request("no")));
    let backup = Upstream::default();
    let layer = FallbackLayer::new(vec![FallbackTarget::new("backup", backup.service("b"))])
        .primary_name("primary")
        .no_cooldown();
    let mut svc = layer.layer(primary.service("p"));
    let e = call(&mut svc, emb_req(&["a"])).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::BadRequest);
    assert!(backup.calls().is_empty());
}

#[tokio::test(start_paused = true)]
async fn cost_prices_prompt_tokens_and_only_what_the_upstream_was_paid_for() {
    let up = Upstream::default();
    // 1000 nano-dollars per input token, output unused.
    let prices = PriceTable::new().with(
        "text-embedding-3-small",
        ModelPrice::per_token_nano(1000, 0, 0),
    );
    let cost = CostLayer::new(prices);
    let mut svc = cost
        .clone()
        .layer(CacheLayer::in_memory(1 << 20).layer(up.service("p")));
    let r = call(&mut svc, emb_req(&["aaaa", "bbbb"])).await.unwrap();
    assert_eq!(r.meta.cost.unwrap().nano_usd, 4 * 1000);
    // Half cached: only the fresh input's 2 tokens are paid.
    let r = call(&mut svc, emb_req(&["aaaa", "cccc"])).await.unwrap();
    assert_eq!(r.meta.cost.unwrap().nano_usd, 2 * 1000);
    // All cached: free, and the saving is counted.
    let r = call(&mut svc, emb_req(&["cccc", "bbbb"])).await.unwrap();
    let c = r.meta.cost.unwrap();
    assert_eq!((c.nano_usd, c.saved_nano_usd), (0, 4 * 1000));
    let totals = cost.totals();
    assert_eq!(totals.total.nano_usd, 6 * 1000);
    assert_eq!(totals.total.prompt_tokens, 4 + 2 + 4);
    assert_eq!(totals.total.completion_tokens, 0);
}

#[test]
fn the_token_estimate_counts_the_inputs_and_no_output() {
    let est = TokenEstimator::default();
    let req = emb_req(&["12345678", "1234"]);
    // 12 bytes at 4 a token, no messages, the fixed 3; no output.
    assert_eq!(est.output_tokens(&req), 0);
    assert_eq!(est.estimate(&req), 3 + 3);
}
