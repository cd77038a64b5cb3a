//! Validation of a parsed configuration: one function per table, each naming the line
//! of the offending value.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::ops::Range;

use llm_tower::validate::Rule as ValidateRule;
use toml::Spanned;

use super::{
    BudgetScope, ChainStep, Config, ConfigError, GroupMember, HedgeConfig, JobsStoreKind, Lines,
    OtlpProtocol, ProviderKind, StoreKind, ValidatorKind,
};

impl Config {
    /// A step that is a balanced group: members, each a defined provider, named once.
    fn check_group(
        &self,
        lines: &Lines<'_>,
        chain: &str,
        step: &Spanned<ChainStep>,
    ) -> Result<(), ConfigError> {
        let bad =
            |msg: String| self.invalid(lines.line(&step.span()), format!("chain {chain:?}: {msg}"));
        let s = step.get_ref();
        if !s.provider.is_empty() {
            return Err(bad("a step names a provider or a group, not both".into()));
        }
        if s.group.len() < 2 {
            return Err(bad("a group needs at least two members".into()));
        }
        for (i, m) in s.group.iter().enumerate() {
            if !self.providers.contains_key(m.provider()) {
                return Err(bad(format!(
                    "group member {:?} is not a defined provider (defined: {})",
                    m.provider(),
                    self.providers
                        .keys()
                        .cloned()
                        .collect::<Vec<_>>()
                        .join(", ")
                )));
            }
            let same = |o: &GroupMember| {
                o.provider() == m.provider()
                    && o.model().or(s.model.as_deref()) == m.model().or(s.model.as_deref())
            };
            if s.group[..i].iter().any(same) {
                return Err(bad(format!(
                    "group member {:?} is named twice with the same model",
                    m.provider()
                )));
            }
        }
        Ok(())
    }

    /// `[chains.<name>.hedge]`: values in range.
    fn check_hedge(
        &self,
        lines: &Lines<'_>,
        chain: &str,
        h: &Spanned<HedgeConfig>,
    ) -> Result<(), ConfigError> {
        let bad = |msg: &str| {
            self.invalid(
                lines.line(&h.span()),
                format!("chain {chain:?}: hedge.{msg}"),
            )
        };
        let c = h.get_ref();
        if c.delay_ms == Some(0) {
            return Err(bad("delay_ms must be > 0"));
        }
        if c.delay_ms.is_some() && (c.percentile.is_some() || c.min_samples.is_some()) {
            return Err(bad(
                "delay_ms is a fixed delay: percentile and min_samples do not apply",
            ));
        }
        if c.percentile.is_some_and(|p| !(p > 0.0 && p <= 100.0)) {
            return Err(bad("percentile must be within (0, 100]"));
        }
        if c.min_samples == Some(0) {
            return Err(bad("min_samples must be > 0"));
        }
        if c.budget_percent.is_some_and(|p| !(p > 0.0 && p <= 100.0)) {
            return Err(bad("budget_percent must be within (0, 100]"));
        }
        Ok(())
    }

    /// Checks every table, in file order; the first error wins.
    pub(super) fn validate(&mut self, lines: &Lines<'_>) -> Result<(), ConfigError> {
        self.check_server(lines)?;
        self.check_upstream()?;
        self.check_providers(lines)?;
        self.check_chains(lines)?;
        self.check_routing(lines)?;
        self.check_cache(lines)?;
        self.check_rate_limits(lines)?;
        self.check_prices(lines)?;
        self.check_budgets(lines)?;
        let rules = self.check_validators(lines)?;
        self.check_auth(lines)?;
        self.check_jobs(lines)?;
        self.check_responses()?;
        self.check_telemetry(lines)?;
        self.check_shadow(lines)?;
        self.validator_rules = rules;
        Ok(())
    }

    /// `[server]`: addresses, limits and timeouts.
    fn check_server(&self, lines: &Lines<'_>) -> Result<(), ConfigError> {
        let err = |span: &Range<usize>, msg: String| self.invalid(lines.line(span), msg);
        let listen = &self.server.listen;
        if listen.get_ref().parse::<SocketAddr>().is_err() {
            return Err(err(
                &listen.span(),
                format!(
                    "server.listen = {:?} is not an address like 127.0.0.1:8080",
                    listen.get_ref()
                ),
            ));
        }
        let limit = &self.server.body_limit_bytes;
        if *limit.get_ref() == 0 {
            return Err(err(
                &limit.span(),
                "server.body_limit_bytes must be > 0".into(),
            ));
        }

        let g = &self.server;
        if [
            g.header_read_timeout_secs,
            g.body_read_timeout_secs,
            g.idle_timeout_secs,
        ]
        .contains(&0)
            || g.max_connections == 0
        {
            return Err(self.invalid(
                None,
                "server: header_read_timeout_secs, body_read_timeout_secs, idle_timeout_secs \
                 and max_connections must be > 0",
            ));
        }
        if let Some(m) = &g.metrics_listen
            && m.get_ref().parse::<SocketAddr>().is_err()
        {
            return Err(err(
                &m.span(),
                format!(
                    "server.metrics_listen = {:?} is not an address",
                    m.get_ref()
                ),
            ));
        }
        if let Some(e) = &g.metrics_token_env {
            check_env_name(e.get_ref())
                .map_err(|m| err(&e.span(), format!("server.metrics_token_env {m}")))?;
        }
        Ok(())
    }

    /// `[upstream]`: every bound > 0.
    fn check_upstream(&self) -> Result<(), ConfigError> {
        let u = &self.upstream;
        for (key, v) in [
            ("max_body_bytes", u.max_body_bytes),
            ("max_sse_event_bytes", u.max_sse_event_bytes),
            ("max_response_headers", u.max_response_headers),
            ("max_response_header_bytes", u.max_response_header_bytes),
            ("max_buffered_bytes", u.max_buffered_bytes),
        ] {
            if v == 0 {
                return Err(self.invalid(None, format!("upstream.{key} must be > 0")));
            }
        }
        Ok(())
    }

    /// `[providers]`: at least one; the keys that apply to each kind; env var names.
    fn check_providers(&self, lines: &Lines<'_>) -> Result<(), ConfigError> {
        let err = |span: &Range<usize>, msg: String| self.invalid(lines.line(span), msg);
        if self.providers.is_empty() {
            return Err(self.invalid(None, "at least one [providers.<name>] is required"));
        }
        for (name, p) in &self.providers {
            let span = p.span();
            let p = p.get_ref();
            match p.kind {
                ProviderKind::Simulated => {
                    if p.base_url.is_some()
                        || p.api_key_env.is_some()
                        || !p.headers.is_empty()
                        || !p.headers_env.is_empty()
                    {
                        return Err(err(
                            &span,
                            format!(
                                "provider {name:?} is simulated: base_url, api_key_env and headers do not apply"
                            ),
                        ));
                    }
                }
                ProviderKind::Openai | ProviderKind::Anthropic => {
                    if p.simulated.is_some() {
                        return Err(err(
                            &span,
                            format!(
                                "provider {name:?}: [simulated] applies only to kind = \"simulated\""
                            ),
                        ));
                    }
                    if let Some(url) = &p.base_url {
                        let u = url.get_ref();
                        if !(u.starts_with("http://") || u.starts_with("https://")) {
                            return Err(err(
                                &url.span(),
                                format!(
                                    "provider {name:?}: base_url {u:?} must start with http:// or https://"
                                ),
                            ));
                        }
                    }
                }
            }
            if let Some(env) = &p.api_key_env {
                check_env_name(env.get_ref())
                    .map_err(|m| err(&env.span(), format!("provider {name:?}: api_key_env {m}")))?;
            }
            for (h, env) in &p.headers_env {
                check_env_name(env)
                    .map_err(|m| err(&span, format!("provider {name:?}: headers_env.{h:?} {m}")))?;
                if p.headers.keys().any(|k| k.eq_ignore_ascii_case(h)) {
                    return Err(err(
                        &span,
                        format!(
                            "provider {name:?}: header {h:?} is in both headers and headers_env"
                        ),
                    ));
                }
            }
            if let Some(rl) = &p.rate_limit {
                let r = rl.get_ref();
                if r.requests_per_minute == Some(0) || r.tokens_per_minute == Some(0) {
                    return Err(err(
                        &rl.span(),
                        format!("provider {name:?}: rate limits must be > 0"),
                    ));
                }
            }
            if p.responses.is_some() && p.kind != ProviderKind::Openai {
                return Err(err(
                    &span,
                    format!("provider {name:?}: responses applies only to kind = \"openai\""),
                ));
            }
            if let Some(sim) = &p.simulated {
                let c = sim.get_ref();
                for (key, rate) in [
                    ("invalid_json_rate", c.invalid_json_rate),
                    ("wrong_answer_rate", c.wrong_answer_rate),
                ] {
                    if !(0.0..=1.0).contains(&rate) {
                        return Err(err(
                            &sim.span(),
                            format!("provider {name:?}: simulated.{key} must be within [0, 1]"),
                        ));
                    }
                }
            }
            if p.prompt_caching && p.kind != ProviderKind::Anthropic {
                return Err(err(
                    &span,
                    format!(
                        "provider {name:?}: prompt_caching applies only to kind = \"anthropic\""
                    ),
                ));
            }
        }
        Ok(())
    }

    /// `[chains]`: at least one; each step names a defined provider or a valid group.
    fn check_chains(&self, lines: &Lines<'_>) -> Result<(), ConfigError> {
        let err = |span: &Range<usize>, msg: String| self.invalid(lines.line(span), msg);
        if self.chains.is_empty() {
            return Err(self.invalid(None, "at least one [chains.<name>] is required"));
        }
        for (name, c) in &self.chains {
            let span = c.span();
            let c = c.get_ref();
            if c.steps.is_empty() {
                return Err(err(&span, format!("chain {name:?} has no steps")));
            }
            for step in &c.steps {
                let s = step.get_ref();
                if !s.group.is_empty() || s.pick.is_some() {
                    self.check_group(lines, name, step)?;
                    continue;
                }
                if !self.providers.contains_key(&s.provider) {
                    return Err(err(
                        &step.span(),
                        format!(
                            "chain {name:?} names provider {:?}, which is not defined (defined: {})",
                            s.provider,
                            self.providers
                                .keys()
                                .cloned()
                                .collect::<Vec<_>>()
                                .join(", ")
                        ),
                    ));
                }
            }
            for (field, v) in [
                ("attempt_timeout_ms", c.attempt_timeout_ms),
                ("first_chunk_timeout_ms", c.first_chunk_timeout_ms),
                ("stall_timeout_ms", c.stall_timeout_ms),
            ] {
                if v == Some(0) {
                    return Err(err(&span, format!("chain {name:?}: {field} must be > 0")));
                }
            }
            if let Some(h) = &c.hedge {
                self.check_hedge(lines, name, h)?;
            }
            if c.breaker_failure_ratio
                .is_some_and(|r| !(0.0..=1.0).contains(&r))
            {
                return Err(err(
                    &span,
                    format!("chain {name:?}: breaker_failure_ratio must be within 0..=1"),
                ));
            }
        }
        Ok(())
    }

    /// `[routing]`: every route names a defined chain.
    fn check_routing(&self, lines: &Lines<'_>) -> Result<(), ConfigError> {
        let err = |span: &Range<usize>, msg: String| self.invalid(lines.line(span), msg);
        let chain_ref = |what: String, r: &Spanned<String>| {
            if self.chains.contains_key(r.get_ref()) {
                Ok(())
            } else {
                Err(err(
                    &r.span(),
                    format!(
                        "{what} names chain {:?}, which is not defined (defined: {})",
                        r.get_ref(),
                        self.chains.keys().cloned().collect::<Vec<_>>().join(", ")
                    ),
                ))
            }
        };
        chain_ref("routing.default_chain".into(), &self.routing.default_chain)?;
        for (model, c) in &self.routing.models {
            chain_ref(format!("routing.models.{model:?}"), c)?;
        }
        for (task, c) in &self.routing.tasks {
            chain_ref(format!("routing.tasks.{task:?}"), c)?;
        }
        Ok(())
    }

    /// A `store` / `redis_url_env` pair (`[cache]`, `[rate_limits]`, `[budgets]`): Redis needs
    /// the URL's env var name, memory takes none.
    fn check_store(
        &self,
        lines: &Lines<'_>,
        what: &str,
        kind: &Spanned<StoreKind>,
        env: &Option<Spanned<String>>,
    ) -> Result<(), ConfigError> {
        let err = |span: &Range<usize>, msg: String| self.invalid(lines.line(span), msg);
        match (kind.get_ref(), env) {
            (StoreKind::Redis, None) => Err(err(
                &kind.span(),
                format!("{what}: store = \"redis\" needs redis_url_env"),
            )),
            (StoreKind::Redis, Some(e)) => check_env_name(e.get_ref())
                .map_err(|m| err(&e.span(), format!("{what}: redis_url_env {m}"))),
            (StoreKind::Memory, Some(e)) => Err(err(
                &e.span(),
                format!("{what}: redis_url_env applies only to store = \"redis\""),
            )),
            (StoreKind::Memory, None) => Ok(()),
        }
    }

    /// `[cache]`: store and sizes.
    fn check_cache(&self, lines: &Lines<'_>) -> Result<(), ConfigError> {
        self.check_store(lines, "cache", &self.cache.store, &self.cache.redis_url_env)?;
        if self.cache.enabled && (self.cache.ttl_secs == 0 || self.cache.max_memory_mb == 0) {
            return Err(self.invalid(None, "cache: ttl_secs and max_memory_mb must be > 0"));
        }
        Ok(())
    }

    /// `[rate_limits]`: store, refresh interval and rules.
    fn check_rate_limits(&self, lines: &Lines<'_>) -> Result<(), ConfigError> {
        let err = |span: &Range<usize>, msg: String| self.invalid(lines.line(span), msg);
        self.check_store(
            lines,
            "rate_limits",
            &self.rate_limits.store,
            &self.rate_limits.redis_url_env,
        )?;
        if !(10..=60_000).contains(&self.rate_limits.headroom_refresh_ms) {
            return Err(self.invalid(
                None,
                "rate_limits: headroom_refresh_ms must be between 10 and 60000",
            ));
        }
        for rule in &self.rate_limits.rules {
            let r = rule.get_ref();
            if r.requests_per_minute.is_none() && r.tokens_per_minute.is_none() {
                return Err(err(
                    &rule.span(),
                    "rate limit rule needs requests_per_minute or tokens_per_minute".into(),
                ));
            }
            if r.requests_per_minute == Some(0) || r.tokens_per_minute == Some(0) {
                return Err(err(&rule.span(), "rate limits must be > 0".into()));
            }
        }
        Ok(())
    }

    /// `[prices]`: finite, in range, and accepted by the cost layer.
    fn check_prices(&self, lines: &Lines<'_>) -> Result<(), ConfigError> {
        let err = |span: &Range<usize>, msg: String| self.invalid(lines.line(span), msg);
        for (model, p) in &self.prices {
            let v = p.get_ref();
            let all = [
                Some(v.input_per_mtok),
                Some(v.output_per_mtok),
                v.cached_input_per_mtok,
                v.cache_write_input_per_mtok,
            ];
            if all
                .into_iter()
                .flatten()
                .any(|x| !x.is_finite() || !(0.0..=1e6).contains(&x))
            {
                return Err(err(
                    &p.span(),
                    format!("prices.{model:?}: prices must be finite, >= 0 and <= 1e6 USD"),
                ));
            }
        }

        for (model, p) in &self.prices {
            let v = p.get_ref();
            // The cost layer's own conversion, so what it would refuse fails here, with a line.
            if let Err(e) = v.model_price() {
                return Err(err(&p.span(), format!("prices.{model:?}: {e}")));
            }
        }
        Ok(())
    }

    /// `[budgets]`: store and limits.
    fn check_budgets(&self, lines: &Lines<'_>) -> Result<(), ConfigError> {
        let err = |span: &Range<usize>, msg: String| self.invalid(lines.line(span), msg);
        self.check_store(
            lines,
            "budgets",
            &self.budgets.store,
            &self.budgets.redis_url_env,
        )?;
        for b in &self.budgets.limits {
            let v = b.get_ref();
            if !v.usd.is_finite() || v.usd <= 0.0 {
                return Err(err(&b.span(), "budget usd must be > 0".into()));
            }
            if v.scope == BudgetScope::Global && v.only.is_some() {
                return Err(err(&b.span(), "a global budget takes no `only`".into()));
            }
            if llm_tower::cost::usd_to_nano(v.usd).is_none() {
                return Err(err(&b.span(), "budget usd is out of range".into()));
            }
        }
        Ok(())
    }

    /// `[validators]`: a schema exactly where the kind needs one, and a valid one.
    /// Returns each task's rule, its schema compiled here once (the gateway uses these).
    fn check_validators(
        &self,
        lines: &Lines<'_>,
    ) -> Result<BTreeMap<String, ValidateRule>, ConfigError> {
        let err = |span: &Range<usize>, msg: String| self.invalid(lines.line(span), msg);
        let mut rules = BTreeMap::new();
        for (task, v) in &self.validators {
            let span = v.span();
            let vc = v.get_ref();
            let rule = match (vc.kind, vc.schema.is_some(), vc.schema_file.is_some()) {
                (ValidatorKind::Json, false, false) => ValidateRule::json(),
                (ValidatorKind::Json, _, _) => {
                    return Err(err(
                        &span,
                        format!("validators.{task:?}: kind = \"json\" takes no schema"),
                    ));
                }
                (ValidatorKind::JsonSchema, true, true)
                | (ValidatorKind::JsonSchema, false, false) => {
                    return Err(err(
                        &span,
                        format!(
                            "validators.{task:?}: kind = \"json_schema\" needs exactly one of schema, schema_file"
                        ),
                    ));
                }
                (ValidatorKind::JsonSchema, _, _) => {
                    let schema = self.validator_schema(vc).map_err(|e| match e {
                        ConfigError::Invalid { message, .. } => {
                            err(&span, format!("validators.{task:?}: {message}"))
                        }
                        other => other,
                    })?;
                    let Some(schema) = schema else {
                        return Err(err(&span, format!("validators.{task:?}: no schema")));
                    };
                    // Compiled once, here; the gateway's validate layer takes this rule.
                    ValidateRule::json_schema(&schema)
                        .map_err(|e| err(&span, format!("validators.{task:?}: {}", e.message())))?
                }
            };
            rules.insert(task.clone(), rule);
        }
        Ok(rules)
    }

    /// `[shadow]`: each names a defined chain, with values in range.
    fn check_shadow(&self, lines: &Lines<'_>) -> Result<(), ConfigError> {
        for (task, s) in &self.shadow {
            let bad = |msg: String| {
                self.invalid(lines.line(&s.span()), format!("shadow.{task:?}: {msg}"))
            };
            let c = s.get_ref();
            if !self.chains.contains_key(c.chain.get_ref()) {
                return Err(self.invalid(
                    lines.line(&c.chain.span()),
                    format!(
                        "shadow.{task:?}: chain {:?} is not a defined chain (defined: {})",
                        c.chain.get_ref(),
                        self.chains.keys().cloned().collect::<Vec<_>>().join(", ")
                    ),
                ));
            }
            if !(0.0..=1.0).contains(&c.sample_rate) {
                return Err(bad("sample_rate must be within [0, 1]".into()));
            }
            if c.budget_usd
                .is_some_and(|b| llm_tower::cost::usd_to_nano(b).is_none())
            {
                return Err(bad("budget_usd must be a non-negative amount".into()));
            }
            if !(1..=1024).contains(&c.max_in_flight) {
                return Err(bad("max_in_flight must be within 1 to 1024".into()));
            }
            if c.timeout_ms == 0 {
                return Err(bad("timeout_ms must be > 0".into()));
            }
        }
        Ok(())
    }

    /// `[auth]`: each key given once, by env var name or BLAKE3 hash.
    fn check_auth(&self, lines: &Lines<'_>) -> Result<(), ConfigError> {
        let err = |span: &Range<usize>, msg: String| self.invalid(lines.line(span), msg);
        let mut tenants_by_hash = std::collections::BTreeSet::new();
        for k in &self.auth.keys {
            let v = k.get_ref();
            if v.tenant.trim().is_empty() {
                return Err(err(&k.span(), "auth key: tenant must not be empty".into()));
            }
            match (&v.key_env, &v.key_blake3) {
                (Some(env), None) => check_env_name(env)
                    .map_err(|m| err(&k.span(), format!("auth key: key_env {m}")))?,
                (None, Some(h)) => {
                    if h.len() != 64 || !h.bytes().all(|b| b.is_ascii_hexdigit()) {
                        return Err(err(
                            &k.span(),
                            "auth key: key_blake3 must be 64 hex digits".into(),
                        ));
                    }
                    if !tenants_by_hash.insert(h.to_ascii_lowercase()) {
                        return Err(err(
                            &k.span(),
                            "auth key: the same key_blake3 appears twice".into(),
                        ));
                    }
                }
                _ => {
                    return Err(err(
                        &k.span(),
                        "auth key: give exactly one of key_env, key_blake3".into(),
                    ));
                }
            }
        }
        Ok(())
    }

    /// `[jobs]`: store and bounds.
    fn check_jobs(&self, lines: &Lines<'_>) -> Result<(), ConfigError> {
        let err = |span: &Range<usize>, msg: String| self.invalid(lines.line(span), msg);
        let j = &self.jobs;
        match (j.store.get_ref(), &j.url_env) {
            (JobsStoreKind::Postgres, None) => {
                return Err(err(
                    &j.store.span(),
                    "jobs: store = \"postgres\" needs url_env".into(),
                ));
            }
            (JobsStoreKind::Postgres, Some(e)) => {
                check_env_name(e.get_ref())
                    .map_err(|m| err(&e.span(), format!("jobs: url_env {m}")))?;
            }
            (JobsStoreKind::Sqlite, Some(e)) => {
                return Err(err(
                    &e.span(),
                    "jobs: url_env applies only to store = \"postgres\"".into(),
                ));
            }
            (JobsStoreKind::Sqlite, None) => {}
        }
        if j.workers == 0 || j.workers > 1024 {
            return Err(self.invalid(None, "jobs.workers must be within 1..=1024"));
        }
        if j.max_attempts == 0 || j.max_queued_per_tenant == 0 {
            return Err(self.invalid(
                None,
                "jobs.max_attempts and jobs.max_queued_per_tenant must be > 0",
            ));
        }
        Ok(())
    }

    /// `[responses]`: a retention of one minute to ten years, a bounded memory store.
    fn check_responses(&self) -> Result<(), ConfigError> {
        let r = &self.responses;
        if !(60..=10 * 365 * 24 * 3600).contains(&r.retention_secs) {
            return Err(self.invalid(
                None,
                "responses.retention_secs must be within 60..=315360000 (ten years)",
            ));
        }
        if r.memory_capacity == 0 || r.memory_capacity > 1_000_000 {
            return Err(self.invalid(None, "responses.memory_capacity must be within 1..=1000000"));
        }
        Ok(())
    }

    /// `[telemetry]`.
    fn check_telemetry(&self, lines: &Lines<'_>) -> Result<(), ConfigError> {
        let err = |span: &Range<usize>, msg: String| self.invalid(lines.line(span), msg);
        let t = &self.telemetry;
        if let Some(p) = &t.protocol
            && OtlpProtocol::parse(p.get_ref()).is_none()
        {
            return Err(err(
                &p.span(),
                format!(
                    "telemetry.protocol = {:?}: use \"grpc\" or \"http/protobuf\"",
                    p.get_ref()
                ),
            ));
        }
        if let Some(e) = &t.endpoint {
            let ok = e.get_ref().parse::<http::Uri>().ok().is_some_and(|u| {
                matches!(u.scheme_str(), Some("http" | "https")) && u.host().is_some()
            });
            if !ok {
                return Err(err(
                    &e.span(),
                    format!(
                        "telemetry.endpoint = {:?} is not an http:// or https:// URL",
                        e.get_ref()
                    ),
                ));
            }
        }
        if let Some(r) = &t.sample_ratio
            && !(0.0..=1.0).contains(r.get_ref())
        {
            return Err(err(
                &r.span(),
                "telemetry.sample_ratio must be within 0.0..=1.0".into(),
            ));
        }
        let i = &t.metrics_interval_secs;
        if *i.get_ref() == 0 || *i.get_ref() > 86_400 {
            return Err(err(
                &i.span(),
                "telemetry.metrics_interval_secs must be within 1..=86400".into(),
            ));
        }
        let m = &t.max_content_bytes;
        if *m.get_ref() > 1 << 20 {
            return Err(err(
                &m.span(),
                "telemetry.max_content_bytes must be at most 1048576".into(),
            ));
        }
        Ok(())
    }
}

fn check_env_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_')
        && !name.as_bytes()[0].is_ascii_digit();
    if ok {
        Ok(())
    } else {
        // Do not echo the value: someone may have pasted a key here by mistake.
        Err("must be the NAME of an environment variable (A-Z, 0-9, _), not a secret".into())
    }
}
