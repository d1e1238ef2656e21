//! Logging and spans. Every span that belongs to a transaction carries its
//! `txid` (so one grep of the logs finds a transaction in every process).
//! With the `otel` feature and `--otlp-endpoint`, spans are also exported over
//! OTLP, and the coordinator's RPCs carry W3C trace context (`traceparent`) in
//! their metadata, so a participant's spans join the coordinator's trace: one
//! trace shows a whole transaction.

use tonic::metadata::MetadataMap;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::Layer;

use crate::serve::LogFormat;

/// Whether this build can export spans (the `otel` feature).
pub const EXPORT_BUILT: bool = cfg!(feature = "otel");

/// Installs the process's subscriber: log lines to stderr in `format`, filtered
/// by `RUST_LOG` (default `info`), and, given an `otlp_endpoint`, span export
/// under the service name `service`. Call [`shutdown`] before exiting.
pub fn init(format: LogFormat, otlp_endpoint: Option<&str>, service: &str) -> Result<(), String> {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr).with_target(false);
    let fmt = match format {
        LogFormat::Text => fmt.with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr())).boxed(),
        LogFormat::Json => fmt.json().with_ansi(false).boxed(),
    };
    let export = match otlp_endpoint {
        Some(endpoint) => Some(export::layer(endpoint, service)?),
        None => None,
    };
    // Already installed (a test running several servers in one process): keep it.
    let _ = tracing_subscriber::registry().with(filter).with(fmt).with(export).try_init();
    Ok(())
}

/// Exports the spans not yet sent. A no-op without export.
pub fn shutdown() {
    #[cfg(feature = "otel")]
    export::shutdown();
}

/// Adds `span`'s trace context to an outgoing request's metadata.
pub fn inject(span: &tracing::Span, metadata: &mut MetadataMap) {
    #[cfg(feature = "otel")]
    export::inject(span, &mut export::Metadata(metadata));
    #[cfg(not(feature = "otel"))]
    let _ = (span, metadata);
}

/// Makes `span` a child of the trace context an incoming request carries, if any.
pub fn adopt(span: &tracing::Span, metadata: &MetadataMap) {
    #[cfg(feature = "otel")]
    export::adopt(span, &export::Incoming(metadata));
    #[cfg(not(feature = "otel"))]
    let _ = (span, metadata);
}

/// `span`'s trace context as text entries (for a message that carries
/// several transactions, each with its own context); empty without export.
pub fn context_of(span: &tracing::Span) -> std::collections::HashMap<String, String> {
    #[cfg(feature = "otel")]
    {
        let mut context = std::collections::HashMap::new();
        export::inject(span, &mut context);
        context
    }
    #[cfg(not(feature = "otel"))]
    {
        let _ = span;
        std::collections::HashMap::new()
    }
}

/// Makes `span` a child of a trace context given as text entries, if any.
pub fn adopt_context(span: &tracing::Span, context: &std::collections::HashMap<String, String>) {
    #[cfg(feature = "otel")]
    export::adopt(span, context);
    #[cfg(not(feature = "otel"))]
    let _ = (span, context);
}

#[cfg(not(feature = "otel"))]
mod export {
    pub fn layer(_endpoint: &str, _service: &str) -> Result<tracing_subscriber::layer::Identity, String> {
        Err("--otlp-endpoint needs decree built with the `otel` feature".into())
    }
}

#[cfg(feature = "otel")]
mod export {
    use std::sync::OnceLock;

    use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
    use opentelemetry::trace::TracerProvider as _;
    use opentelemetry_otlp::WithExportConfig;
    use opentelemetry_sdk::propagation::TraceContextPropagator;
    use opentelemetry_sdk::trace::SdkTracerProvider;
    use opentelemetry_sdk::Resource;
    use tonic::metadata::{MetadataKey, MetadataMap, MetadataValue};
    use tracing_opentelemetry::OpenTelemetrySpanExt;

    static PROVIDER: OnceLock<SdkTracerProvider> = OnceLock::new();

    pub fn layer<S>(endpoint: &str, service: &str) -> Result<impl tracing_subscriber::Layer<S>, String>
    where
        S: tracing::Subscriber + for<'span> tracing_subscriber::registry::LookupSpan<'span>,
    {
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_endpoint(endpoint)
            .build()
            .map_err(|e| format!("--otlp-endpoint {endpoint}: {e}"))?;
        let provider = SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_resource(Resource::builder().with_service_name(service.to_owned()).build())
            .build();
        let tracer = provider.tracer("decree");
        let _ = PROVIDER.set(provider);
        Ok(tracing_opentelemetry::layer().with_tracer(tracer))
    }

    pub fn shutdown() {
        let Some(provider) = PROVIDER.get() else { return };
        // Waits for the last export, which runs on this runtime's tasks: let them run.
        let flush = || {
            if let Err(err) = provider.shutdown() {
                eprintln!("span export: {err}");
            }
        };
        match tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor()) {
            Ok(tokio::runtime::RuntimeFlavor::MultiThread) => tokio::task::block_in_place(flush),
            _ => flush(),
        }
    }

    pub struct Metadata<'a>(pub &'a mut MetadataMap);

    impl Injector for Metadata<'_> {
        fn set(&mut self, key: &str, value: String) {
            if let (Ok(key), Ok(value)) =
                (MetadataKey::from_bytes(key.as_bytes()), MetadataValue::try_from(value.as_str()))
            {
                self.0.insert(key, value);
            }
        }
    }

    pub struct Incoming<'a>(pub &'a MetadataMap);

    impl Extractor for Incoming<'_> {
        fn get(&self, key: &str) -> Option<&str> {
            self.0.get(key).and_then(|v| v.to_str().ok())
        }

        fn keys(&self) -> Vec<&str> {
            self.0
                .keys()
                .filter_map(|k| match k {
                    tonic::metadata::KeyRef::Ascii(k) => Some(k.as_str()),
                    tonic::metadata::KeyRef::Binary(_) => None,
                })
                .collect()
        }
    }

    pub fn inject(span: &tracing::Span, carrier: &mut dyn Injector) {
        if PROVIDER.get().is_some() {
            TraceContextPropagator::new().inject_context(&span.context(), carrier);
        }
    }

    pub fn adopt(span: &tracing::Span, carrier: &dyn Extractor) {
        if PROVIDER.get().is_some() {
            let parent = TraceContextPropagator::new().extract(carrier);
            let _ = span.set_parent(parent);
        }
    }
}
