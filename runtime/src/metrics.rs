//! Prometheus metrics: the exporter both servers install when given
//! `--metrics-listen`, the metric names they share, and a tower layer that
//! counts the gRPC requests a server receives.
//!
//! Metrics are recorded through the `metrics` facade everywhere; without an
//! installed exporter recording costs next to nothing.

use std::net::SocketAddr;
use std::task::{Context, Poll};

/// Synced write batches of a process's log: one fsync each.
pub const LOG_FSYNCS: &str = "decree_log_fsyncs_total";
/// Write batches of a process's log, synced or not.
pub const LOG_BATCHES: &str = "decree_log_batches_total";
/// Write requests of a process's log (a batch groups many).
pub const LOG_WRITES: &str = "decree_log_writes_total";
/// Requests per write batch (the group-commit batch size).
pub const LOG_BATCH_SIZE: &str = "decree_log_batch_requests";
/// How long each write batch of the log took, its sync included
/// (`synced="true"`) or not: the disk's share of a transaction's latency.
pub const LOG_WRITE_SECONDS: &str = "decree_log_write_seconds";
/// Synced write batches that waited for company to share their fsync
/// (group commit under load, docs/architecture.md).
pub const LOG_COMPANY_WAITS: &str = "decree_log_company_waits_total";
/// gRPC requests this process received (a stream counts once).
pub const GRPC_REQUESTS: &str = "decree_grpc_requests_total";
/// Messages this process received on its streams (TransactStream, PrepareStream).
pub const STREAM_MESSAGES: &str = "decree_grpc_stream_messages_total";

/// Serves Prometheus text on `http://<listen>/metrics` from now on. Called
/// once per process; a second call (an embedding that serves two) is refused.
pub fn install(listen: SocketAddr) -> Result<(), String> {
    metrics_exporter_prometheus::PrometheusBuilder::new()
        .with_http_listener(listen)
        .set_buckets(&[0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 4.0])
        .and_then(|builder| builder.install())
        .map_err(|e| format!("--metrics-listen {listen}: {e}"))?;
    metrics::describe_counter!(LOG_FSYNCS, "synced write batches of the log (one fsync each)");
    metrics::describe_counter!(LOG_BATCHES, "write batches of the log");
    metrics::describe_counter!(LOG_WRITES, "write requests of the log");
    metrics::describe_histogram!(LOG_BATCH_SIZE, "write requests per batch (group commit)");
    metrics::describe_counter!(
        LOG_COMPANY_WAITS,
        "synced write batches that waited for company (group commit)"
    );
    // Shown from the start, 0 until a group waits.
    metrics::counter!(LOG_COMPANY_WAITS).increment(0);
    metrics::describe_histogram!(
        LOG_WRITE_SECONDS,
        metrics::Unit::Seconds,
        "how long each write batch of the log took, its sync included if synced"
    );
    metrics::describe_counter!(GRPC_REQUESTS, "gRPC requests received (a stream counts once)");
    metrics::describe_counter!(STREAM_MESSAGES, "messages received on gRPC streams");
    Ok(())
}

/// A tower layer that counts each request a server receives ([`GRPC_REQUESTS`]).
#[derive(Debug, Clone, Copy, Default)]
pub struct CountRequests;

impl<S> tower::Layer<S> for CountRequests {
    type Service = Counted<S>;

    fn layer(&self, inner: S) -> Counted<S> {
        Counted(inner)
    }
}

#[derive(Debug, Clone)]
pub struct Counted<S>(S);

impl<S, B> tower::Service<http::Request<B>> for Counted<S>
where
    S: tower::Service<http::Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        metrics::counter!(GRPC_REQUESTS).increment(1);
        self.0.call(request)
    }
}
