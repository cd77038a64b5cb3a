//! The price table.

use std::collections::HashMap;
use std::fmt;

use llm_tower_core::{NanoUsd, Usage};
use serde::{Deserialize, Deserializer};

/// Money in pico-dollars (1e-12 USD): the unit of per-token prices, fine enough that
/// real price lists ($0.0375 per million tokens) are exact.
pub type PicoUsd = u64;

/// The price of one model, in integer pico-dollars (1e-12 USD) **per token**.
///
/// Converted once, at load time, from the usual dollars per million tokens:
/// `pico per token = round(usd_per_mtok × 1e6)`, so prices are exact to $0.000001 per
/// million tokens. A response's cost is the integer sum over its tokens, rounded once to
/// nano-dollars ([`NanoUsd`]), the unit of every total.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ModelPrice {
    /// Input (prompt) tokens billed at the full price.
    pub input: PicoUsd,
    /// Output (completion, reasoning included) tokens.
    pub output: PicoUsd,
    /// Input tokens read from the provider's prompt cache.
    pub cached_input: PicoUsd,
    /// Input tokens written to the provider's prompt cache (Anthropic
    /// `cache_creation_input_tokens`, in
    /// [`PromptTokensDetails::cache_write_tokens`](llm_tower_core::PromptTokensDetails)).
    /// Defaults to the input price (OpenAI has no write price).
    pub cache_write_input: PicoUsd,
}

/// A price that is negative, not a number, or absurdly large.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvalidPrice(String);

impl fmt::Display for InvalidPrice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for InvalidPrice {}

/// Converts dollars per million tokens to pico-dollars per token (rounded).
fn per_mtok_to_pico(usd: f64, what: &str) -> Result<PicoUsd, InvalidPrice> {
    // $1M per million tokens is far beyond any real price: a typo, most likely.
    if !usd.is_finite() || !(0.0..=1_000_000.0).contains(&usd) {
        return Err(InvalidPrice(format!(
            "{what}: {usd} USD per million tokens is not a valid price"
        )));
    }
    Ok((usd * 1e6).round() as PicoUsd)
}

/// Converts dollars to nano-dollars (rounded), for budget limits read from configuration.
/// `None` for negative, non-finite or overflowing amounts.
///
/// ```
/// assert_eq!(llm_tower::cost::usd_to_nano(1.5), Some(1_500_000_000));
/// assert_eq!(llm_tower::cost::usd_to_nano(-1.0), None);
/// ```
pub fn usd_to_nano(usd: f64) -> Option<NanoUsd> {
    let nano = usd * 1e9;
    (usd.is_finite() && usd >= 0.0 && nano < u64::MAX as f64).then(|| nano.round() as NanoUsd)
}

impl ModelPrice {
    /// A price in nano-dollars per token.
    pub const fn per_token_nano(input: NanoUsd, output: NanoUsd, cached_input: NanoUsd) -> Self {
        Self::per_token_pico(
            input.saturating_mul(1000),
            output.saturating_mul(1000),
            cached_input.saturating_mul(1000),
        )
    }

    /// A price in pico-dollars per token.
    pub const fn per_token_pico(input: PicoUsd, output: PicoUsd, cached_input: PicoUsd) -> Self {
        Self {
            input,
            output,
            cached_input,
            cache_write_input: input,
        }
    }

    /// Sets the cache-write price, in pico-dollars per token.
    #[must_use]
    pub const fn with_cache_write_pico(mut self, cache_write_input: PicoUsd) -> Self {
        self.cache_write_input = cache_write_input;
        self
    }

    /// Sets the cache-write price in dollars per million tokens (Anthropic: 1.25 × the
    /// input price for the 5-minute cache).
    ///
    /// ```
    /// use llm_tower::cost::ModelPrice;
    /// use llm_tower::Usage;
    /// let p = ModelPrice::per_mtok_usd(3.0, 15.0, Some(0.3)).unwrap()
    ///     .with_cache_write_per_mtok_usd(3.75).unwrap();
    /// // 1000 input tokens: 100 plain, 200 read from the cache, 700 written to it.
    /// let mut u = Usage::new(1000, 0).with_cached_tokens(200);
    /// u.prompt_tokens_details.as_mut().unwrap().cache_write_tokens = Some(700);
    /// assert_eq!(p.cost(&u), 100 * 3_000 + 200 * 300 + 700 * 3_750);
    /// ```
    pub fn with_cache_write_per_mtok_usd(mut self, usd: f64) -> Result<Self, InvalidPrice> {
        self.cache_write_input = per_mtok_to_pico(usd, "cache_write_input_per_mtok_usd")?;
        Ok(self)
    }

    /// A price in dollars per million tokens (the providers' price lists); `cached_input`
    /// defaults to the input price.
    ///
    /// ```
    /// use llm_tower::cost::ModelPrice;
    /// let p = ModelPrice::per_mtok_usd(0.15, 0.6, Some(0.075)).unwrap();
    /// assert_eq!((p.input, p.output, p.cached_input), (150_000, 600_000, 75_000));
    /// // Prices below a nano-dollar per token stay exact.
    /// let flash = ModelPrice::per_mtok_usd(0.0375, 0.15, Some(0.01875)).unwrap();
    /// assert_eq!(flash.cached_input, 18_750);
    /// ```
    pub fn per_mtok_usd(
        input: f64,
        output: f64,
        cached_input: Option<f64>,
    ) -> Result<Self, InvalidPrice> {
        let input = per_mtok_to_pico(input, "input_per_mtok_usd")?;
        Ok(Self {
            input,
            output: per_mtok_to_pico(output, "output_per_mtok_usd")?,
            cached_input: match cached_input {
                Some(c) => per_mtok_to_pico(c, "cached_input_per_mtok_usd")?,
                None => input,
            },
            cache_write_input: input,
        })
    }

    /// The cost of `usage`: input read from the prompt cache at the cached price, input
    /// written to it at the cache-write price, the rest of the input at the input price,
    /// output at the output price (saturating, never wrapping; the counts are the
    /// upstream's, so cached + written are capped at the prompt tokens).
    pub fn cost(&self, usage: &Usage) -> NanoUsd {
        let cached = usage.cached_tokens().min(usage.prompt_tokens);
        let written = usage
            .prompt_tokens_details
            .as_ref()
            .and_then(|d| d.cache_write_tokens)
            .unwrap_or(0)
            .min(usage.prompt_tokens.saturating_sub(cached));
        let plain = usage.prompt_tokens.saturating_sub(cached + written);
        pico_to_nano(
            mul(plain, self.input)
                + mul(cached, self.cached_input)
                + mul(written, self.cache_write_input)
                + mul(usage.completion_tokens, self.output),
        )
    }

    /// The cost of `prompt_tokens` uncached input and `output_tokens` output.
    pub fn estimate(&self, prompt_tokens: u64, output_tokens: u64) -> NanoUsd {
        pico_to_nano(mul(prompt_tokens, self.input) + mul(output_tokens, self.output))
    }
}

/// Tokens × price in u128: four such products cannot overflow it.
fn mul(tokens: u64, price: PicoUsd) -> u128 {
    u128::from(tokens) * u128::from(price)
}

/// Rounds a pico-dollar amount to nano-dollars (half up), once per response, saturating
/// at `u64::MAX` rather than wrapping.
fn pico_to_nano(pico: u128) -> NanoUsd {
    NanoUsd::try_from((pico + 500) / 1000).unwrap_or(NanoUsd::MAX)
}

/// One entry of a price table as configuration writes it (dollars per million tokens).
///
/// ```toml
/// [prices."gpt-4o-mini"]
/// input_per_mtok_usd = 0.15
/// output_per_mtok_usd = 0.6
/// cached_input_per_mtok_usd = 0.075   # optional; defaults to the input price
/// cache_write_input_per_mtok_usd = 0.15   # optional; defaults to the input price
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PriceConfig {
    /// Input price, USD per million tokens.
    pub input_per_mtok_usd: f64,
    /// Output price, USD per million tokens.
    pub output_per_mtok_usd: f64,
    /// Cached-input price, USD per million tokens (default: the input price).
    #[serde(default)]
    pub cached_input_per_mtok_usd: Option<f64>,
    /// Cache-write price (Anthropic `cache_creation_input_tokens`), USD per million tokens
    /// (default: the input price).
    #[serde(default)]
    pub cache_write_input_per_mtok_usd: Option<f64>,
}

impl TryFrom<PriceConfig> for ModelPrice {
    type Error = InvalidPrice;
    fn try_from(c: PriceConfig) -> Result<Self, InvalidPrice> {
        let p = ModelPrice::per_mtok_usd(
            c.input_per_mtok_usd,
            c.output_per_mtok_usd,
            c.cached_input_per_mtok_usd,
        )?;
        match c.cache_write_input_per_mtok_usd {
            Some(w) => p.with_cache_write_per_mtok_usd(w),
            None => Ok(p),
        }
    }
}

/// Prices per model, with a forgiving lookup ([`get`](Self::get)).
///
/// Deserializes from a map of model name to [`PriceConfig`] (JSON, TOML, …), converting
/// to integer nano-dollars per token at load time:
///
/// ```
/// use llm_tower::cost::PriceTable;
/// let table: PriceTable = serde_json::from_str(r#"{
///     "gpt-4o-mini": {"input_per_mtok_usd": 0.15, "output_per_mtok_usd": 0.6,
///                     "cached_input_per_mtok_usd": 0.075},
///     "claude-3-5-haiku": {"input_per_mtok_usd": 0.8, "output_per_mtok_usd": 4.0}
/// }"#).unwrap();
/// let (name, price) = table.get("gpt-4o-mini-2024-07-18").unwrap();
/// assert_eq!((name, price.input), ("gpt-4o-mini", 150_000));
/// assert_eq!(table.get("claude-3-5-haiku-20241022").unwrap().0, "claude-3-5-haiku");
/// assert!(table.get("unknown-model").is_none());
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PriceTable {
    prices: crate::FastMap<String, ModelPrice>,
}

impl<'de> Deserialize<'de> for PriceTable {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let raw: HashMap<String, PriceConfig> = HashMap::deserialize(d)?;
        let mut prices = crate::FastMap::with_capacity_and_hasher(raw.len(), Default::default());
        for (model, cfg) in raw {
            let price = ModelPrice::try_from(cfg)
                .map_err(|e| serde::de::Error::custom(format!("price of `{model}`: {e}")))?;
            prices.insert(model, price);
        }
        Ok(Self { prices })
    }
}

impl PriceTable {
    /// An empty table.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds (or replaces) the price of `model`.
    #[must_use]
    pub fn with(mut self, model: impl Into<String>, price: ModelPrice) -> Self {
        self.prices.insert(model.into(), price);
        self
    }

    /// Number of models priced.
    pub fn len(&self) -> usize {
        self.prices.len()
    }

    /// Whether the table is empty.
    pub fn is_empty(&self) -> bool {
        self.prices.is_empty()
    }

    /// The price of `model` and the table entry it matched. Lookup order:
    ///
    /// 1. the exact name;
    /// 2. without a provider prefix (`openai/gpt-4o-mini` → `gpt-4o-mini`);
    /// 3. without a date suffix (`-2024-07-18`, `-20241022`, `@20241022`);
    /// 4. the longest entry that is a prefix of the name ending at a `-`, `:` or `@`
    ///    (`gpt-4o-mini-audio` → `gpt-4o-mini`, `llama3:8b` → `llama3`).
    pub fn get(&self, model: &str) -> Option<(&str, ModelPrice)> {
        let found = |m: &str| self.prices.get_key_value(m).map(|(k, p)| (k.as_str(), *p));
        if let Some(hit) = found(model) {
            return Some(hit);
        }
        let base = model.rsplit_once('/').map_or(model, |(_, m)| m);
        if let Some(hit) = found(base) {
            return Some(hit);
        }
        let undated = strip_date(base);
        if undated.len() != base.len()
            && let Some(hit) = found(undated)
        {
            return Some(hit);
        }
        let mut best: Option<(&str, ModelPrice)> = None;
        for (k, p) in &self.prices {
            let boundary = base
                .strip_prefix(k.as_str())
                .is_some_and(|rest| rest.starts_with(['-', ':', '@']));
            if boundary && best.is_none_or(|(b, _)| k.len() > b.len()) {
                best = Some((k.as_str(), *p));
            }
        }
        best
    }

    /// Every entry.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &ModelPrice)> {
        self.prices.iter().map(|(k, v)| (k.as_str(), v))
    }
}

/// `name-2024-07-18` / `name-20241022` / `name@20241022` → `name`.
fn strip_date(m: &str) -> &str {
    let b = m.as_bytes();
    let digits = |s: &[u8]| s.iter().all(u8::is_ascii_digit);
    // -YYYY-MM-DD
    if b.len() > 11 {
        let t = &b[b.len() - 11..];
        if t[0] == b'-'
            && digits(&t[1..5])
            && t[5] == b'-'
            && digits(&t[6..8])
            && t[8] == b'-'
            && digits(&t[9..])
        {
            return &m[..m.len() - 11];
        }
    }
    // -YYYYMMDD or @YYYYMMDD
    if b.len() > 9 {
        let t = &b[b.len() - 9..];
        if (t[0] == b'-' || t[0] == b'@') && digits(&t[1..]) {
            return &m[..m.len() - 9];
        }
    }
    m
}
