//! Logging and spans. Every log line about a transaction names its `txid`
//! (so one grep of the logs finds a transaction in every process), and so
//! does every span that belongs to one.
//!
//! Each transaction's work runs in spans of the target [`TXN`] (the
//! coordinator's `transaction`; a participant's `prepare`, `commit`, `abort`,
//! `execute`). They are made only when wanted: with the `otel` feature and
//! `--otlp-endpoint` they are exported over OTLP, and the coordinator's RPCs
//! carry W3C trace context (`traceparent`) in their metadata, so a
//! participant's spans join the coordinator's trace: one trace shows a whole
//! transaction. Otherwise they are off unless `RUST_LOG` names [`TXN`]
//! (`RUST_LOG=info,decree::txn=info` puts each transaction's span on the
//! lines logged inside it): a few spans per transaction in every process cost
//! about 7 % of a busy cluster's CPU (docs/performance.md), for log lines that
//! carry their txid anyway.

use tonic::metadata::MetadataMap;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::Layer;

use crate::serve::LogFormat;

/// Whether this build can export spans (the `otel` feature).
pub const EXPORT_BUILT: bool = cfg!(feature = "otel");

/// The target of the spans a transaction's work runs in (see the module's text).
pub const TXN: &str = "decree::txn";

/// Installs the process's subscriber: log lines to stderr in `format`, filtered
/// by `RUST_LOG` (default `info`), and, given an `otlp_endpoint`, span export
/// under the service name `service`. Call [`shutdown`] before exiting.
pub fn init(format: LogFormat, otlp_endpoint: Option<&str>, service: &str) -> Result<(), String> {
    let filter = filter(std::env::var("RUST_LOG").ok().as_deref(), otlp_endpoint.is_some());
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

/// What `RUST_LOG` asks for (`info` if unset or unreadable), with the
/// transactions' spans ([`TXN`]) on when `exporting` and off otherwise,
/// unless `RUST_LOG` names them.
fn filter(rust_log: Option<&str>, exporting: bool) -> tracing_subscriber::EnvFilter {
    let asked = rust_log.and_then(|directives| tracing_subscriber::EnvFilter::try_new(directives).ok());
    let names_txn = asked.is_some() && rust_log.is_some_and(|directives| directives.contains(TXN));
    let filter = asked.unwrap_or_else(|| tracing_subscriber::EnvFilter::new("info"));
    if names_txn {
        return filter;
    }
    let level = if exporting { "info" } else { "off" };
    match format!("{TXN}={level}").parse() {
        Ok(directive) => filter.add_directive(directive),
        Err(_) => filter,
    }
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

#[cfg(test)]
mod tests {
    use tracing_subscriber::layer::SubscriberExt;

    use super::*;

    /// Whether a transaction's span, and another info span, are made under `filter`.
    fn made(filter: tracing_subscriber::EnvFilter) -> (bool, bool) {
        tracing::subscriber::with_default(tracing_subscriber::registry().with(filter), || {
            let txn = tracing::info_span!(target: TXN, "transaction", txid = "c0ffee00-1-1");
            let other = tracing::info_span!("migration_batch");
            (!txn.is_disabled(), !other.is_disabled())
        })
    }

    #[test]
    fn transaction_spans_are_made_only_when_exported_or_asked_for() {
        assert_eq!(made(filter(None, false)), (false, true), "by default: off, other info spans on");
        assert_eq!(made(filter(Some("info"), false)), (false, true), "RUST_LOG=info does not name them");
        assert_eq!(made(filter(Some("debug"), false)), (false, true));
        assert_eq!(made(filter(None, true)), (true, true), "exported");
        assert_eq!(made(filter(Some("warn"), true)), (true, false), "exported, whatever the log level");
        assert_eq!(made(filter(Some("info,decree::txn=info"), false)), (true, true), "asked for");
        assert_eq!(made(filter(Some("warn,decree::txn=info"), false)), (true, false));
        assert_eq!(
            made(filter(Some("info,decree::txn=off"), true)),
            (false, true),
            "RUST_LOG has the last word"
        );
        assert_eq!(made(filter(Some("=)(not a filter"), false)), (false, true), "unreadable: info");
    }
}
