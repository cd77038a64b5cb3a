//! Rate-limit rules (what is counted, per which key) and the token estimator.

use std::collections::BTreeSet;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use llm_tower_core::{ChatRequest, ErrorKind, PaidAttempt, Usage};

// ===== rules =====

/// What a rule counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LimitUnit {
    /// One unit per request.
    Requests,
    /// Prompt plus completion tokens (reserved from an estimate, settled with the usage).
    Tokens,
}

/// Which request attributes key a rule's buckets (none: one global bucket).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct KeyBy {
    /// One bucket per [`Tenant`](crate::Tenant) (requests without one share the `""` tenant).
    pub tenant: bool,
    /// One bucket per requested model.
    pub model: bool,
    /// One bucket per [`TaskType`](crate::TaskType) (untyped requests share `""`).
    pub task: bool,
}

/// One limit: `limit` requests or tokens per `window`, keyed as [`KeyBy`] says.
///
/// ```
/// use llm_tower::rate_limit::Rule;
/// use std::time::Duration;
///
/// // 100 requests a minute per tenant and model; 1M tokens an hour for tenant "free" only.
/// let a = Rule::requests(100, Duration::from_secs(60)).per_tenant().per_model();
/// let b = Rule::tokens(1_000_000, Duration::from_secs(3600)).for_tenant("free");
/// # let _ = (a, b);
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    pub(super) name: Option<Arc<str>>,
    pub(super) unit: LimitUnit,
    pub(super) limit: u64,
    pub(super) window: Duration,
    pub(super) key_by: KeyBy,
    pub(super) only_tenant: Option<Arc<str>>,
    pub(super) only_model: Option<Arc<str>>,
    pub(super) only_task: Option<Arc<str>>,
    pub(super) known_models: Option<Arc<BTreeSet<Box<str>>>>,
}

/// A rule that cannot work (zero limit or zero window).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvalidRule(String);

impl fmt::Display for InvalidRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for InvalidRule {}

impl Rule {
    /// A rule of `limit` units of `unit` per `window`, or an error if either is zero.
    pub fn try_new(unit: LimitUnit, limit: u64, window: Duration) -> Result<Self, InvalidRule> {
        if limit == 0 {
            return Err(InvalidRule(
                "rate limit rule: limit must be at least 1".into(),
            ));
        }
        if window.is_zero() {
            return Err(InvalidRule(
                "rate limit rule: window must be non-zero".into(),
            ));
        }
        Ok(Self {
            name: None,
            unit,
            limit,
            window,
            key_by: KeyBy::default(),
            only_tenant: None,
            only_model: None,
            only_task: None,
            known_models: None,
        })
    }

    /// `limit` requests per `window`.
    ///
    /// # Panics
    ///
    /// If `limit` or `window` is zero (use [`try_new`](Self::try_new) for config input).
    pub fn requests(limit: u64, window: Duration) -> Self {
        Self::try_new(LimitUnit::Requests, limit, window).unwrap_or_else(|e| panic!("{e}"))
    }

    /// `limit` tokens (prompt + completion) per `window`.
    ///
    /// # Panics
    ///
    /// If `limit` or `window` is zero (use [`try_new`](Self::try_new) for config input).
    pub fn tokens(limit: u64, window: Duration) -> Self {
        Self::try_new(LimitUnit::Tokens, limit, window).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Names the rule (it prefixes its bucket keys and appears in errors). The default
    /// name is derived from the unit, window, keys and filters, so that replicas with the
    /// same configuration share buckets.
    #[must_use]
    pub fn named(mut self, name: impl Into<Arc<str>>) -> Self {
        self.name = Some(name.into());
        self
    }
    /// One bucket per tenant.
    #[must_use]
    pub fn per_tenant(mut self) -> Self {
        self.key_by.tenant = true;
        self
    }
    /// One bucket per model.
    #[must_use]
    pub fn per_model(mut self) -> Self {
        self.key_by.model = true;
        self
    }
    /// One bucket per task type.
    #[must_use]
    pub fn per_task(mut self) -> Self {
        self.key_by.task = true;
        self
    }
    /// With [`per_model`](Self::per_model): the models that get a bucket of their own;
    /// every other requested model shares one bucket, `other`. The model is the client's
    /// choice, so without this a client could take a fresh bucket per made-up name.
    ///
    /// ```
    /// use llm_tower::rate_limit::Rule;
    /// use std::time::Duration;
    /// let r = Rule::requests(100, Duration::from_secs(60))
    ///     .per_model()
    ///     .known_models(["gpt-4o", "gpt-4o-mini"]);
    /// # let _ = r;
    /// ```
    #[must_use]
    pub fn known_models<I, M>(mut self, models: I) -> Self
    where
        I: IntoIterator<Item = M>,
        M: Into<Box<str>>,
    {
        self.known_models = Some(Arc::new(models.into_iter().map(Into::into).collect()));
        self
    }
    /// Sets all keys at once.
    #[must_use]
    pub fn key_by(mut self, key_by: KeyBy) -> Self {
        self.key_by = key_by;
        self
    }
    /// Applies only to requests of this tenant.
    #[must_use]
    pub fn for_tenant(mut self, tenant: impl Into<Arc<str>>) -> Self {
        self.only_tenant = Some(tenant.into());
        self
    }
    /// Applies only to requests for this model.
    #[must_use]
    pub fn for_model(mut self, model: impl Into<Arc<str>>) -> Self {
        self.only_model = Some(model.into());
        self
    }
    /// Applies only to requests of this task type.
    #[must_use]
    pub fn for_task(mut self, task: impl Into<Arc<str>>) -> Self {
        self.only_task = Some(task.into());
        self
    }

    /// What the rule counts.
    pub fn unit(&self) -> LimitUnit {
        self.unit
    }
    /// Units per window.
    pub fn limit(&self) -> u64 {
        self.limit
    }
    /// The window.
    pub fn window(&self) -> Duration {
        self.window
    }

    pub(super) fn default_name(&self) -> String {
        let mut s = String::from(match self.unit {
            LimitUnit::Requests => "req",
            LimitUnit::Tokens => "tok",
        });
        s.push_str(&format!("/{}ms", self.window.as_millis()));
        if self.key_by.tenant {
            s.push_str("/tenant");
        }
        if self.key_by.model {
            s.push_str("/model");
        }
        if self.key_by.task {
            s.push_str("/task");
        }
        for (tag, v) in [
            ("t=", &self.only_tenant),
            ("m=", &self.only_model),
            ("k=", &self.only_task),
        ] {
            if let Some(v) = v {
                s.push('/');
                s.push_str(tag);
                push_escaped(&mut s, v);
            }
        }
        s
    }

    /// The bucket key for `req`, or `None` if the rule does not apply to it.
    pub(super) fn key_for(&self, name: &str, req: &ChatRequest) -> Option<String> {
        let tenant = req.tenant().map_or("", |t| t.as_str());
        let task = req.task_type().map_or("", |t| t.as_str());
        let model = req.model.as_str();
        if self.only_tenant.as_deref().is_some_and(|t| t != tenant)
            || self.only_model.as_deref().is_some_and(|m| m != model)
            || self.only_task.as_deref().is_some_and(|k| k != task)
        {
            return None;
        }
        let mut key = String::with_capacity(name.len() + 48);
        key.push_str(name);
        if self.key_by.tenant {
            key.push_str("|t=");
            push_escaped(&mut key, tenant);
        }
        if self.key_by.model {
            key.push_str("|m=");
            match &self.known_models {
                Some(known) if !known.contains(model) => key.push_str("other"),
                _ => push_escaped(&mut key, model),
            }
        }
        if self.key_by.task {
            key.push_str("|k=");
            push_escaped(&mut key, task);
        }
        Some(key)
    }
}

/// Keeps keys unambiguous: `|` separates the parts, so it is escaped inside values.
fn push_escaped(out: &mut String, v: &str) {
    if v.contains(['|', '%']) {
        out.push_str(&v.replace('%', "%25").replace('|', "%7C"));
    } else {
        out.push_str(v);
    }
}

// ===== estimator =====

/// The token estimate a reservation is made from (a documented approximation, not a
/// tokenizer): `ceil(prompt text bytes / bytes_per_token) + messages × per_message_tokens
/// + 3`, plus the output limit (`max_completion_tokens`, else `max_tokens`, else
/// `default_output_tokens`) times `n`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TokenEstimator {
    /// Bytes of text per token. Default 4 (English text with OpenAI/Anthropic tokenizers).
    pub bytes_per_token: u32,
    /// Overhead tokens per message (role, separators). Default 4.
    pub per_message_tokens: u32,
    /// Output estimate when the request sets no limit. Default 512.
    pub default_output_tokens: u64,
}

impl Default for TokenEstimator {
    fn default() -> Self {
        Self {
            bytes_per_token: 4,
            per_message_tokens: 4,
            default_output_tokens: 512,
        }
    }
}

impl TokenEstimator {
    /// Estimated prompt tokens of `req`.
    pub fn prompt_tokens(&self, req: &ChatRequest) -> u64 {
        let bytes = req.prompt_text_len() as u64;
        let bpt = u64::from(self.bytes_per_token.max(1));
        bytes.div_ceil(bpt) + req.messages.len() as u64 * u64::from(self.per_message_tokens) + 3
    }
    /// Estimated output tokens of `req`.
    pub fn output_tokens(&self, req: &ChatRequest) -> u64 {
        let per_choice = req.output_limit().unwrap_or(self.default_output_tokens);
        per_choice.saturating_mul(req.n.unwrap_or(1).max(1))
    }
    /// Estimated total tokens of `req`.
    pub fn estimate(&self, req: &ChatRequest) -> u64 {
        self.prompt_tokens(req)
            .saturating_add(self.output_tokens(req))
    }
}

/// Tokens actually used, from a usage report.
pub(super) fn used_tokens(u: &Usage) -> u64 {
    u.total_tokens
        .max(u.prompt_tokens.saturating_add(u.completion_tokens))
}

/// Tokens of the attempts paid for and discarded (see [`PaidAttempt`]).
pub(super) fn paid_tokens(paid: &[PaidAttempt]) -> u64 {
    paid.iter()
        .fold(0u64, |sum, a| sum.saturating_add(used_tokens(&a.usage)))
}

/// Errors that mean the provider refused the request before generating anything, so the
/// usage is known to be zero.
pub(crate) fn rejected_before_generation(kind: ErrorKind) -> bool {
    matches!(
        kind,
        ErrorKind::RateLimited
            | ErrorKind::BadRequest
            | ErrorKind::ContextLengthExceeded
            | ErrorKind::Auth
            | ErrorKind::NotFound
            | ErrorKind::Unavailable
            | ErrorKind::Overloaded
            | ErrorKind::BudgetExceeded
    )
}
