//! Plumbing the binaries share: logging set-up and shutdown signals.

/// Resolves at the first SIGINT or SIGTERM: the server then shuts down
/// gracefully. A second signal exits the process at once (status 130).
pub async fn shutdown_signal() {
    signal().await;
    tokio::spawn(async {
        signal().await;
        eprintln!("second signal: exiting now");
        std::process::exit(130);
    });
}

async fn signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(term) => term,
            Err(_) => {
                let _ = ctrl_c.await;
                return;
            }
        };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}

/// How a server writes its log lines.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line (timestamp, level, fields such as `txid`, message), for log pipelines.
    Json,
}

/// Logs to stderr, filtered by `RUST_LOG` (default `info`), in `format`.
pub fn init_tracing_as(format: LogFormat) {
    let _ = crate::trace::init(format, None, "decree");
}

/// Logs to stderr as text, filtered by `RUST_LOG` (default `info`).
pub fn init_tracing() {
    init_tracing_as(LogFormat::Text)
}

/// Prints `config` as TOML (what `--print-config` shows: the options in
/// effect after flags, environment and `--config` file).
pub fn print_config(config: &impl serde::Serialize) -> i32 {
    match toml::to_string(config) {
        Ok(text) => {
            print!("{text}");
            0
        }
        Err(err) => {
            eprintln!("cannot print the configuration: {err}");
            2
        }
    }
}

/// The connections a server accepts on `listener`: mutual TLS once the
/// process has its TLS material, plaintext otherwise; `TCP_NODELAY` set on
/// each (see [`decree_tls::incoming`]).
pub fn incoming(
    listener: tokio::net::TcpListener,
) -> impl tokio_stream::Stream<Item = std::io::Result<decree_tls::Conn>> {
    decree_tls::incoming(listener)
}

/// The options every decree server process takes (flattened into each
/// server's configuration).
#[derive(Debug, Clone, clap::Args, serde::Serialize)]
pub struct ProcessOptions {
    /// Serve Prometheus metrics at http://ADDR/metrics (e.g. 127.0.0.1:9100).
    #[arg(long, env = "DECREE_METRICS_LISTEN")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// Crash points to arm, comma-separated (also DECREE_CRASH_AT).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub crash_at: Option<String>,
    /// Log lines as text or json (one object per line).
    #[arg(long, env = "DECREE_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// Most concurrent gRPC requests (HTTP/2 streams) per connection.
    #[arg(long, env = "DECREE_MAX_CONCURRENT_STREAMS", default_value_t = 1024)]
    pub max_concurrent_streams: u32,
    /// Most requests queued for the protocol engine; beyond it callers wait
    /// (the coordinator's --max-in-flight refuses new transactions earlier).
    #[arg(long, env = "DECREE_REQUEST_QUEUE", default_value_t = 4096)]
    pub request_queue: usize,
    /// Export spans over OTLP/gRPC to this collector (e.g. http://127.0.0.1:4317);
    /// needs a build with the `otel` feature (the `decree` binary has it).
    #[arg(long, env = "DECREE_OTLP_ENDPOINT")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub otlp_endpoint: Option<String>,
    /// A TOML file of options, named like the flags (`prepare-timeout-ms = 1500`); flags and
    /// environment variables take precedence over it (also DECREE_CONFIG).
    #[arg(long, value_name = "FILE")]
    #[serde(skip)]
    pub config: Option<std::path::PathBuf>,
    /// Free space (MiB) kept on the data directory's file system: below it new
    /// work is refused (not a crash) while what was admitted finishes in it.
    #[arg(long, env = "DECREE_DISK_RESERVE_MB", default_value_t = 64)]
    pub disk_reserve_mb: u64,
    /// Print the options in effect (flags, environment, --config file, defaults) as TOML and exit.
    #[arg(long)]
    #[serde(skip)]
    pub print_config: bool,
    #[command(flatten)]
    #[serde(flatten)]
    pub tls: decree_tls::TlsArgs,
    /// A policy file (TOML) giving each identity its roles; every RPC is checked against it
    /// (needs --tls-cert, --tls-key and --tls-ca). Reloaded on SIGHUP or change.
    #[arg(long, env = "DECREE_POLICY", value_name = "FILE")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub policy: Option<std::path::PathBuf>,
}

impl Default for ProcessOptions {
    fn default() -> Self {
        ProcessOptions {
            metrics_listen: None,
            crash_at: None,
            log_format: LogFormat::Text,
            max_concurrent_streams: 1024,
            request_queue: 4096,
            otlp_endpoint: None,
            disk_reserve_mb: 64,
            config: None,
            print_config: false,
            tls: decree_tls::TlsArgs::default(),
            policy: None,
        }
    }
}

impl ProcessOptions {
    pub fn validate(&self) -> Result<(), String> {
        if !(1..=1_000_000).contains(&self.max_concurrent_streams) {
            return Err("--max-concurrent-streams must be between 1 and 1000000".into());
        }
        if !(1..=10_000_000).contains(&self.request_queue) {
            return Err("--request-queue must be between 1 and 10000000".into());
        }
        if let Some(endpoint) = &self.otlp_endpoint {
            if !crate::trace::EXPORT_BUILT {
                return Err("--otlp-endpoint needs decree built with the `otel` feature".into());
            }
            if !(endpoint.starts_with("http://") || endpoint.starts_with("https://")) {
                return Err(format!(
                    "--otlp-endpoint {endpoint:?}: expected a URL like http://127.0.0.1:4317"
                ));
            }
        }
        if let Some(list) = &self.crash_at {
            crate::crash::parse(list).map_err(|e| format!("--crash-at: {e}"))?;
        }
        if self.tls.files()?.is_none() && self.policy.is_some() {
            return Err(
                "--policy needs --tls-cert, --tls-key and --tls-ca: identities come from certificates".into(),
            );
        }
        Ok(())
    }
}

/// Runs a server as a process: checks its configuration (`valid`), prints it
/// and exits for `--print-config`, sets up logging, arms the crash points,
/// binds `listen`, and serves until SIGINT or SIGTERM (`serve` gets the
/// listener). Returns the exit code: 0 after a clean stop, 2 for a bad
/// configuration, 1 for anything else. `what` starts every message.
/// A server's error, and the code its process exits with: 1 unless the
/// error says otherwise (2 for a refusal the operator must act on, as for bad
/// arguments).
pub trait Exit: std::fmt::Display {
    fn exit_code(&self) -> i32 {
        1
    }
}

pub async fn run_process<F, Fut, E>(
    what: &str,
    config: &impl serde::Serialize,
    valid: Result<(), String>,
    process: &ProcessOptions,
    listen: std::net::SocketAddr,
    serve: F,
) -> i32
where
    F: FnOnce(tokio::net::TcpListener) -> Fut,
    Fut: std::future::Future<Output = Result<(), E>>,
    E: Exit,
{
    if let Err(err) = valid {
        eprintln!("{what}: {err}");
        return 2;
    }
    if process.print_config {
        return print_config(config);
    }
    let service = what.replace(' ', "-");
    if let Err(err) = crate::trace::init(process.log_format, process.otlp_endpoint.as_deref(), &service) {
        eprintln!("{what}: {err}");
        return 2;
    }
    if let Err(err) = crate::crash::arm(process.crash_at.as_deref()) {
        eprintln!("{what}: {err}");
        return 2;
    }
    if let Err(err) = decree_tls::setup_server(what, &process.tls, process.policy.as_deref()) {
        eprintln!("{what}: {err}");
        return 2;
    }
    let listener = match tokio::net::TcpListener::bind(listen).await {
        Ok(listener) => listener,
        Err(err) => {
            eprintln!("{what}: cannot listen on {listen}: {err}");
            return 1;
        }
    };
    let code = match serve(listener).await {
        Ok(()) => 0,
        Err(err) => {
            eprintln!("{what}: {err}");
            err.exit_code()
        }
    };
    crate::trace::shutdown();
    code
}

/// Adds the standard gRPC health service and server reflection (so `grpcurl`
/// lists and describes the services) to `routes`. Every name in `services`
/// (and the server as a whole, "") is reported SERVING: call this once
/// recovery is done, just before serving. The reporter turns them
/// NOT_SERVING at shutdown.
///
/// Reflection lists exactly `services` beside health and reflection itself
/// (not every service of decree.v1: a coordinator serves no `Participant`), and
/// answers both `grpc.reflection.v1` and the older `v1alpha` that many tools
/// still ask.
pub async fn with_discovery(
    routes: tonic::service::Routes,
    services: &[&str],
) -> Result<(tonic::service::Routes, tonic_health::server::HealthReporter), String> {
    let (reporter, health) = tonic_health::server::health_reporter();
    for service in services.iter().copied().chain([""]) {
        reporter.set_service_status(service, tonic_health::ServingStatus::Serving).await;
    }
    let reflection = || {
        let mut builder = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(decree_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET);
        for name in services.iter().copied().chain(REFLECTED_ALWAYS.iter().copied()) {
            builder = builder.with_service_name(name);
        }
        builder
    };
    let v1 = reflection().build_v1().map_err(|e| format!("reflection: {e}"))?;
    let v1alpha = reflection().build_v1alpha().map_err(|e| format!("reflection: {e}"))?;
    Ok((routes.add_service(health).add_service(v1).add_service(v1alpha), reporter))
}

/// The services every server lists through reflection, beside its own.
const REFLECTED_ALWAYS: &[&str] = &[
    "grpc.health.v1.Health",
    "grpc.reflection.v1.ServerReflection",
    "grpc.reflection.v1alpha.ServerReflection",
];

/// Marks every service NOT_SERVING (health checks fail from now on).
pub async fn not_serving(reporter: &tonic_health::server::HealthReporter, services: &[&str]) {
    for service in services.iter().copied().chain([""]) {
        reporter.set_service_status(service, tonic_health::ServingStatus::NotServing).await;
    }
}

/// The answers of a stream served by [`serve_stream`].
pub type Answers<T> = std::pin::Pin<Box<dyn tokio_stream::Stream<Item = Result<T, tonic::Status>> + Send>>;

/// Serves a bidirectional stream of independent requests (`TransactStream`,
/// `PrepareStream`): each message read is handled by `handle` (called in the
/// order the messages are read) and answered as soon as that is done, in
/// whatever order. At most `limit` are handled at once; beyond that the stream
/// is not read, so HTTP/2 flow control holds the sender back, as
/// `--max-concurrent-streams` does for unary calls. Reading stops when
/// `stopping` turns true (shutdown): what was read is answered, then the
/// stream ends, and what was not read was not started. `name` labels
/// [`crate::metrics::STREAM_MESSAGES`]. A handler may send answers ahead of
/// its last one on the [`Early`] it is given.
///
/// The handlers run inside the answer stream itself, polled where the server
/// polls the response: no task is spawned per message and no channel stands
/// between a handler and its answer (each was a wake-up and a hand-off per
/// message, docs/performance.md). A handler therefore only makes progress
/// while its stream is served; one whose stream is dropped (the caller went
/// away) is dropped with it, at an await: handlers hand their work to an
/// actor and await its answer, so work once handed over goes on.
pub fn serve_stream<Req, Ans, F, Fut>(
    name: &'static str,
    incoming: tonic::Streaming<Req>,
    stopping: tokio::sync::watch::Receiver<bool>,
    limit: usize,
    handle: F,
) -> Answers<Ans>
where
    Req: Send + 'static,
    Ans: Send + 'static,
    F: Fn(Req, Early<Ans>) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = Ans> + Send + 'static,
{
    let (early, ahead) = tokio::sync::mpsc::unbounded_channel();
    Box::pin(Served {
        incoming: Some(incoming),
        stopping: Box::pin(async move {
            let mut stopping = stopping;
            stopped(&mut stopping).await
        }),
        limit: limit.max(1),
        handle,
        running: futures::stream::FuturesUnordered::new(),
        early,
        ahead,
        // Looked up once: each `counter!` allocates a handle.
        messages: metrics::counter!(crate::metrics::STREAM_MESSAGES, "stream" => name),
    })
}

/// The answer stream of [`serve_stream`]: reads requests while fewer than
/// `limit` are in progress, runs their handlers, yields answers as they are
/// ready.
struct Served<Req, Ans, F, Fut> {
    /// `None` once reading stopped (the caller closed its side, an error, or shutdown).
    incoming: Option<tonic::Streaming<Req>>,
    stopping: std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>,
    limit: usize,
    handle: F,
    running: futures::stream::FuturesUnordered<Fut>,
    early: tokio::sync::mpsc::UnboundedSender<Ans>,
    ahead: tokio::sync::mpsc::UnboundedReceiver<Ans>,
    messages: metrics::Counter,
}

// Nothing is pinned in place: the futures are in `FuturesUnordered`, which
// pins them itself, and the rest is moved freely.
impl<Req, Ans, F, Fut> Unpin for Served<Req, Ans, F, Fut> {}

impl<Req, Ans, F, Fut> tokio_stream::Stream for Served<Req, Ans, F, Fut>
where
    F: Fn(Req, Early<Ans>) -> Fut,
    Fut: std::future::Future<Output = Ans>,
{
    type Item = Result<Ans, tonic::Status>;

    fn poll_next(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        use futures::StreamExt as _;
        use std::task::Poll;
        let this = self.get_mut();
        if let Poll::Ready(Some(answer)) = this.ahead.poll_recv(cx) {
            return Poll::Ready(Some(Ok(answer)));
        }
        if this.incoming.is_some() && std::future::Future::poll(this.stopping.as_mut(), cx).is_ready() {
            this.incoming = None;
        }
        while let Some(incoming) = this.incoming.as_mut() {
            if this.running.len() >= this.limit {
                break;
            }
            match incoming.poll_next_unpin(cx) {
                Poll::Ready(Some(Ok(message))) => {
                    this.messages.increment(1);
                    this.running.push((this.handle)(message, Early(this.early.clone())));
                }
                // The caller closed its side, or the stream broke: what was read is still answered.
                Poll::Ready(_) => this.incoming = None,
                Poll::Pending => break,
            }
        }
        match this.running.poll_next_unpin(cx) {
            Poll::Ready(Some(answer)) => Poll::Ready(Some(Ok(answer))),
            // Nothing in progress: over once nothing more can be read.
            Poll::Ready(None) if this.incoming.is_none() => Poll::Ready(this.ahead.try_recv().ok().map(Ok)),
            Poll::Ready(None) | Poll::Pending => Poll::Pending,
        }
    }
}

/// Where a stream's handler sends an answer ahead of its last one (a
/// transaction's txid before its outcome).
pub struct Early<Ans>(tokio::sync::mpsc::UnboundedSender<Ans>);

impl<Ans> Early<Ans> {
    pub fn send(&self, answer: Ans) {
        let _ = self.0.send(answer);
    }
}

/// Resolves once `stopping` is true (or its sender is gone).
async fn stopped(stopping: &mut tokio::sync::watch::Receiver<bool>) {
    let _ = stopping.wait_for(|stopping| *stopping).await;
}
