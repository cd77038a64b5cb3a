//! `[telemetry]`: the OpenTelemetry SDK, exporting over OTLP (HTTP/protobuf or gRPC), and
//! the [`OtelTracing`] the router and the providers' [`ObserveLayer`]s report to.
//!
//! Settings come from the `[telemetry]` table first, then from the standard `OTEL_*`
//! environment variables (`OTEL_EXPORTER_OTLP_PROTOCOL`, `OTEL_EXPORTER_OTLP_ENDPOINT` and
//! the per-signal `…_TRACES_…` / `…_METRICS_…` variants, `OTEL_EXPORTER_OTLP_HEADERS`,
//! `OTEL_EXPORTER_OTLP_TIMEOUT`, `OTEL_SERVICE_NAME`, `OTEL_RESOURCE_ATTRIBUTES`,
//! `OTEL_TRACES_SAMPLER[_ARG]`, `OTEL_BSP_*`), then defaults. `OTEL_SDK_DISABLED=true`
//! turns it off whatever the file says.
//!
//! Exports run on a thread of their own (the SDK's Tokio current-thread runtime), so a
//! slow collector never holds a request: spans wait in a bounded queue
//! (`OTEL_BSP_MAX_QUEUE_SIZE`, default 2048) and what does not fit is dropped (the SDK
//! counts and logs it).
//!
//! [`ObserveLayer`]: llm_tower::observe::ObserveLayer

use std::fmt;
use std::time::Duration;

use llm_tower_axum::otel::OtelTracing;
use opentelemetry::InstrumentationScope;
use opentelemetry::global::{BoxedTracer, ObjectSafeTracerProvider};
use opentelemetry::metrics::MeterProvider as _;
use opentelemetry_otlp::{WithExportConfig, WithHttpConfig, WithTonicConfig};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::metrics::SdkMeterProvider;
use opentelemetry_sdk::runtime::TokioCurrentThread;
use opentelemetry_sdk::trace::{Sampler, SdkTracerProvider};

use crate::config::{Config, OtlpProtocol, ProviderKind};

/// The SDK providers behind the gateway's telemetry: flush and shut them down on exit.
#[derive(Clone)]
pub struct Telemetry {
    tracer_provider: Option<SdkTracerProvider>,
    meter_provider: Option<SdkMeterProvider>,
    /// What the router and the providers' layers report to.
    pub tracing: OtelTracing,
}

impl fmt::Debug for Telemetry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Telemetry")
            .field("traces", &self.tracer_provider.is_some())
            .field("metrics", &self.meter_provider.is_some())
            .finish_non_exhaustive()
    }
}

impl Telemetry {
    /// Exports what is buffered now (blocks until the exporters answer or time out; call
    /// it off the async runtime, e.g. in `spawn_blocking`).
    pub fn force_flush(&self) {
        if let Some(p) = &self.tracer_provider
            && let Err(e) = p.force_flush()
        {
            tracing::warn!(error = %e, "telemetry: flushing traces failed");
        }
        if let Some(p) = &self.meter_provider
            && let Err(e) = p.force_flush()
        {
            tracing::warn!(error = %e, "telemetry: flushing metrics failed");
        }
    }

    /// Flushes and stops the exporters (blocking, as [`force_flush`](Self::force_flush)).
    pub fn shutdown(&self) {
        if let Some(p) = &self.tracer_provider
            && let Err(e) = p.shutdown()
        {
            tracing::warn!(error = %e, "telemetry: stopping the trace exporter failed");
        }
        if let Some(p) = &self.meter_provider
            && let Err(e) = p.shutdown()
        {
            tracing::warn!(error = %e, "telemetry: stopping the metric exporter failed");
        }
    }
}

/// Builds the telemetry `[telemetry]` asks for: `None` when it is off. Needs a Tokio
/// runtime (the gRPC channel is created on it).
pub fn build(
    config: &Config,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Option<Telemetry>, String> {
    let t = &config.telemetry;
    let disabled = env("OTEL_SDK_DISABLED").is_some_and(|v| v.trim().eq_ignore_ascii_case("true"));
    if !t.enabled || disabled {
        return Ok(None);
    }
    let protocol = match &t.protocol {
        Some(p) => OtlpProtocol::parse(p.get_ref()),
        None => match env("OTEL_EXPORTER_OTLP_PROTOCOL") {
            Some(p) => Some(OtlpProtocol::parse(p.trim()).ok_or_else(|| {
                format!("OTEL_EXPORTER_OTLP_PROTOCOL = {p:?}: use \"grpc\" or \"http/protobuf\"")
            })?),
            None => Some(OtlpProtocol::HttpProtobuf),
        },
    }
    .ok_or("telemetry.protocol is invalid")?;
    let service_name = t
        .service_name
        .clone()
        .or_else(|| env("OTEL_SERVICE_NAME"))
        .unwrap_or_else(|| "llm-tower-proxy".to_owned());
    let resource = Resource::builder().with_service_name(service_name).build();
    let endpoint = t
        .endpoint
        .as_ref()
        .map(|e| e.get_ref().trim_end_matches('/').to_owned());

    let tracer_provider = if t.traces {
        let exporter = match protocol {
            OtlpProtocol::Grpc => {
                let mut b = opentelemetry_otlp::SpanExporter::builder().with_tonic();
                if grpc_https(
                    endpoint.as_deref(),
                    env,
                    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
                ) {
                    b = b.with_tls_config(grpc_tls());
                }
                if let Some(e) = &endpoint {
                    b = b.with_endpoint(e.clone());
                }
                b.build()
            }
            OtlpProtocol::HttpProtobuf => {
                let mut b = opentelemetry_otlp::SpanExporter::builder()
                    .with_http()
                    .with_http_client(http_client()?);
                if let Some(e) = &endpoint {
                    b = b.with_endpoint(format!("{e}/v1/traces"));
                }
                b.build()
            }
        }
        .map_err(|e| format!("the OTLP trace exporter: {e}"))?;
        let processor =
            opentelemetry_sdk::trace::span_processor_with_async_runtime::BatchSpanProcessor::builder(
                exporter,
                TokioCurrentThread,
            )
            .build();
        let mut b = SdkTracerProvider::builder()
            .with_span_processor(processor)
            .with_resource(resource.clone());
        if let Some(r) = &t.sample_ratio {
            b = b.with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(
                *r.get_ref(),
            ))));
        }
        Some(b.build())
    } else {
        None
    };

    let meter_provider = if t.metrics {
        let exporter = match protocol {
            OtlpProtocol::Grpc => {
                let mut b = opentelemetry_otlp::MetricExporter::builder().with_tonic();
                if grpc_https(
                    endpoint.as_deref(),
                    env,
                    "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT",
                ) {
                    b = b.with_tls_config(grpc_tls());
                }
                if let Some(e) = &endpoint {
                    b = b.with_endpoint(e.clone());
                }
                b.build()
            }
            OtlpProtocol::HttpProtobuf => {
                let mut b = opentelemetry_otlp::MetricExporter::builder()
                    .with_http()
                    .with_http_client(http_client()?);
                if let Some(e) = &endpoint {
                    b = b.with_endpoint(format!("{e}/v1/metrics"));
                }
                b.build()
            }
        }
        .map_err(|e| format!("the OTLP metric exporter: {e}"))?;
        let reader =
            opentelemetry_sdk::metrics::periodic_reader_with_async_runtime::PeriodicReader::builder(
                exporter,
                TokioCurrentThread,
            )
            .with_interval(Duration::from_secs(*t.metrics_interval_secs.get_ref()))
            .build();
        Some(
            SdkMeterProvider::builder()
                .with_reader(reader)
                .with_resource(resource)
                .build(),
        )
    } else {
        None
    };

    let scope = InstrumentationScope::builder("llm-tower")
        .with_version(env!("CARGO_PKG_VERSION"))
        .build();
    let tracer = match &tracer_provider {
        Some(p) => BoxedTracer::new(p.boxed_tracer(scope.clone())),
        // Metrics only: spans go nowhere (and cost little).
        None => BoxedTracer::new(
            opentelemetry::trace::noop::NoopTracerProvider::new().boxed_tracer(scope.clone()),
        ),
    };
    let meter = match &meter_provider {
        Some(p) => p.meter_with_scope(scope),
        None => opentelemetry::metrics::noop::NoopMeterProvider::new().meter_with_scope(scope),
    };
    let mut tracing = OtelTracing::new(tracer, &meter)
        .capture_content(t.capture_content)
        .max_content_bytes(*t.max_content_bytes.get_ref());
    for (name, p) in &config.providers {
        let gen_ai = match p.get_ref().kind {
            ProviderKind::Openai => "openai",
            ProviderKind::Anthropic => "anthropic",
            ProviderKind::Simulated => "llm_tower.simulated",
        };
        tracing = tracing.provider_name(name, gen_ai);
    }
    Ok(Some(Telemetry {
        tracer_provider,
        meter_provider,
        tracing,
    }))
}

/// OTLP/HTTP over hyper with the providers' rustls (ring) stack: no second HTTP client or
/// TLS provider in the binary.
fn http_client() -> Result<opentelemetry_http::hyper::HyperClient<HttpsConnector>, String> {
    let mut http = hyper_util::client::legacy::connect::HttpConnector::new();
    http.enforce_http(false);
    http.set_connect_timeout(Some(Duration::from_secs(5)));
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_provider_and_webpki_roots(rustls::crypto::ring::default_provider())
        .map_err(|e| format!("the OTLP TLS configuration: {e}"))?
        .https_or_http()
        .enable_http1()
        .wrap_connector(http);
    // The exporter's own timeout (OTEL_EXPORTER_OTLP_TIMEOUT, default 10 s) bounds each
    // export; this one is the client's.
    Ok(opentelemetry_http::hyper::HyperClient::new(
        https,
        Duration::from_secs(10),
        None,
    ))
}

type HttpsConnector =
    hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>;

/// TLS for an `https://` gRPC collector (used only for such endpoints): the Mozilla roots,
/// as the providers use.
fn grpc_tls() -> tonic::transport::ClientTlsConfig {
    tonic::transport::ClientTlsConfig::new().with_webpki_roots()
}

/// Whether the gRPC endpoint in force (the file's, else the signal's or the general
/// `OTEL_*` variable) is `https://`: only then is TLS configured (tonic would refuse a
/// TLS configuration on a plain `http://` channel).
fn grpc_https(endpoint: Option<&str>, env: &dyn Fn(&str) -> Option<String>, var: &str) -> bool {
    let e = endpoint
        .map(str::to_owned)
        .or_else(|| env(var))
        .or_else(|| env("OTEL_EXPORTER_OTLP_ENDPOINT"));
    e.is_some_and(|e| e.trim().starts_with("https://"))
}
