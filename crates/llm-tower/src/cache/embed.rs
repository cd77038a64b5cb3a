//! Embeddings through the cache: each input is an entry of its own, so a batch that is
//! partly cached asks the upstream only for the rest and is put back together in order.

use std::sync::Arc;
use std::time::Duration;

use futures_util::future::join_all;
use llm_tower_core::{
    CacheStatus, ChatRequest, EmbeddingInput, EmbeddingsResponse, LlmError, LlmResponse, Usage,
};
use tower_service::Service;

use super::shared::Shared;
use super::{CacheKey, CachedBody, CachedEntry};

/// One input's cached vector and its share of the original usage.
struct Found {
    vector: Vec<f32>,
    tokens: u64,
    provider: Option<String>,
    model: Option<String>,
}

/// Serves an embeddings envelope: looks every input up (when `read`), asks `inner` (the
/// instance polled ready) for the inputs not found, stores their vectors for `ttl`, and
/// answers in input order.
pub(crate) async fn run<S>(
    shared: Arc<Shared>,
    mut inner: S,
    req: ChatRequest,
    ttl: Duration,
    read: bool,
) -> Result<LlmResponse, LlmError>
where
    S: Service<ChatRequest, Response = LlmResponse, Error = LlmError>,
{
    let Some(emb) = req.as_embeddings() else {
        return Err(LlmError::internal("cache: not an embeddings request"));
    };
    let keys: Vec<CacheKey> = emb
        .input
        .iter()
        .map(|x| CacheKey::for_embedding(&req, emb, x))
        .collect();
    let mut found: Vec<Option<Found>> = if read {
        join_all(keys.iter().map(|k| lookup(&shared, *k))).await
    } else {
        keys.iter().map(|_| None).collect()
    };
    let missing: Vec<usize> = (0..found.len()).filter(|&i| found[i].is_none()).collect();
    // Each input counts as one lookup (a `no-cache` request was counted as a bypass).
    if read {
        for _ in 0..found.len() - missing.len() {
            shared.stats.hit();
        }
        for _ in &missing {
            shared.stats.miss();
        }
    }
    let format_model = req.model.clone();

    if missing.is_empty() {
        // Every input was cached: no upstream call, reported as a hit with the original
        // usage (a cost layer above prices it at 0 and counts the saving).
        let first = found.first().and_then(Option::as_ref);
        let provider = first.and_then(|f| f.provider.clone());
        let model = first.and_then(|f| f.model.clone()).unwrap_or(format_model);
        let tokens = found
            .iter()
            .flatten()
            .fold(0u64, |n, f| n.saturating_add(f.tokens));
        let data = found.into_iter().flatten().map(|f| f.vector).collect();
        let mut resp = LlmResponse::embeddings(EmbeddingsResponse {
            model,
            data,
            usage: Usage::new(tokens, 0),
        });
        resp.meta.provider = provider.map(Arc::from);
        resp.meta.cache = CacheStatus::Hit;
        return Ok(resp);
    }

    // Ask only for what is missing (the request as sent when nothing was found).
    let upstream_req = if missing.len() == emb.input.len() {
        req.clone()
    } else {
        let part: Vec<EmbeddingInput> = missing.iter().map(|&i| emb.input[i].clone()).collect();
        let mut part_req = req.clone();
        part_req.set_embeddings(emb.with_inputs(part));
        part_req
    };
    let sizes: Vec<usize> = missing.iter().map(|&i| emb.input[i].len_bytes()).collect();
    let resp = inner.call(upstream_req).await?;
    let mut meta = resp.meta;
    let fresh = match resp.body {
        llm_tower_core::ResponseBody::Embeddings(r) => *r,
        _ => return Err(LlmError::internal("a chat answer to an embeddings request")),
    };
    if fresh.data.len() != missing.len() {
        return Err(LlmError::transport(format!(
            "the upstream answered {} embeddings for {} inputs",
            fresh.data.len(),
            missing.len()
        )));
    }
    let paid = meta.usage.clone().unwrap_or_else(|| fresh.usage.clone());
    let shares = apportion(paid.prompt_tokens, &sizes);

    // Store each fresh vector, all at once, each bounded by the store timeout.
    let writes = fresh
        .data
        .iter()
        .zip(&shares)
        .zip(&missing)
        .filter_map(|((v, &tokens), &i)| {
            let entry = CachedEntry::embedding(v.clone(), Usage::new(tokens, 0), &meta);
            if entry.approx_size() > shared.config.max_entry_bytes || v.is_empty() {
                shared.stats.skip_write();
                return None;
            }
            Some(store(&shared, keys[i], Arc::new(entry), ttl))
        });
    join_all(writes).await;

    let cached_tokens = found
        .iter()
        .flatten()
        .fold(0u64, |n, f| n.saturating_add(f.tokens));
    let mut fresh_vectors = fresh.data.into_iter();
    let data = found
        .iter_mut()
        .map(|slot| match slot.take() {
            Some(f) => f.vector,
            // As many fresh vectors as missing slots (checked above).
            None => fresh_vectors.next().unwrap_or_default(),
        })
        .collect();
    let prompt = paid.prompt_tokens.saturating_add(cached_tokens);
    let body = EmbeddingsResponse {
        model: fresh.model,
        data,
        // The client sees the tokens of every input; the meta keeps what was paid for.
        usage: Usage::new(prompt, 0),
    };
    meta.usage = Some(paid);
    meta.cache = if read {
        CacheStatus::Miss
    } else {
        CacheStatus::Bypass
    };
    Ok(LlmResponse {
        body: llm_tower_core::ResponseBody::Embeddings(Box::new(body)),
        meta,
    })
}

async fn lookup(shared: &Shared, key: CacheKey) -> Option<Found> {
    let got = match shared.store.get_now(&key) {
        Some(now) => now,
        None => {
            match tokio::time::timeout(shared.config.store_timeout, shared.store.get(key)).await {
                Ok(got) => got,
                Err(_) => {
                    shared.stats.error();
                    tracing::debug!("cache lookup timed out; serving from upstream");
                    return None;
                }
            }
        }
    };
    let entry = match got {
        Ok(Some(entry)) => entry,
        Ok(None) => return None,
        Err(e) => {
            shared.stats.error();
            tracing::debug!(error = %e, "cache lookup failed; serving from upstream");
            return None;
        }
    };
    let CachedBody::Embedding(v) = &entry.body else {
        return None;
    };
    Some(Found {
        vector: v.clone(),
        tokens: entry.usage.as_ref().map_or(0, |u| u.prompt_tokens),
        provider: entry.provider.clone(),
        model: entry.model.clone(),
    })
}

async fn store(shared: &Shared, key: CacheKey, entry: Arc<CachedEntry>, ttl: Duration) {
    let put = shared.store.put(key, entry, ttl);
    match tokio::time::timeout(shared.config.store_timeout, put).await {
        Ok(Ok(())) => shared.stats.write(),
        Ok(Err(e)) => {
            shared.stats.error();
            tracing::debug!(error = %e, "cache write failed");
        }
        Err(_) => {
            shared.stats.error();
            tracing::debug!("cache write timed out");
        }
    }
}

/// Splits `total` tokens over inputs in proportion to their sizes (largest remainder), so
/// the shares add up to `total` exactly: an upstream reports one count per batch.
fn apportion(total: u64, sizes: &[usize]) -> Vec<u64> {
    let sum: u128 = sizes.iter().map(|&s| s as u128).sum();
    if sizes.is_empty() {
        return Vec::new();
    }
    if sum == 0 {
        let mut out = vec![total / sizes.len() as u64; sizes.len()];
        out[0] += total % sizes.len() as u64;
        return out;
    }
    let exact: Vec<(u64, u128)> = sizes
        .iter()
        .map(|&s| {
            let x = u128::from(total) * s as u128;
            ((x / sum) as u64, x % sum)
        })
        .collect();
    let mut out: Vec<u64> = exact.iter().map(|e| e.0).collect();
    let mut left = total - out.iter().sum::<u64>();
    let mut order: Vec<usize> = (0..sizes.len()).collect();
    order.sort_by(|&a, &b| exact[b].1.cmp(&exact[a].1));
    for i in order {
        if left == 0 {
            break;
        }
        out[i] += 1;
        left -= 1;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::apportion;

    #[test]
    fn shares_add_up() {
        assert_eq!(apportion(10, &[1, 1, 2]), vec![3, 2, 5]);
        assert_eq!(apportion(7, &[3, 3, 3]).iter().sum::<u64>(), 7);
        assert_eq!(apportion(5, &[0, 0]), vec![3, 2]);
        assert_eq!(
            apportion(u64::MAX, &[usize::MAX, 1]).iter().sum::<u64>(),
            u64::MAX
        );
        assert!(apportion(3, &[]).is_empty());
    }
}
