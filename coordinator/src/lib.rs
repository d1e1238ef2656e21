//! The decree coordinator: presumed-abort two-phase commit over gRPC.
//!
//! - [`engine`]: the protocol as a sans-IO state machine (no tokio, tonic or RocksDB);
//! - [`store`]: the durable decision log and its correctness contract;
//! - [`migration`]: the ring changes and migration batches, decided free of I/O;
//! - [`retention`]: which ended outcomes to forget, and when (pure policy);
//! - `runtime`: the actor that executes the engine's commands;
//! - [`wire`]: participants' answers to engine events, and outcomes to the `decree.v1` enum;
//! - `service`: the thin gRPC handlers;
//! - [`Config`]: every knob, with units in the names.
//!
//! The protocol and why it is atomic: docs/protocol.md. Recovery: docs/recovery.md.

pub mod config;
pub mod engine;
mod group;
pub mod lease;
mod membership;
pub mod migration;
mod phase_one;
mod phase_two;
mod registry;
pub mod retention;
mod runtime;
mod service;
pub mod stats;
pub mod store;
mod tasks;
mod timers;
pub mod wire;

use std::future::Future;

use decree_proto::v1::coordinator_server::CoordinatorServer;
use decree_proto::v1::registry_server::RegistryServer;
use decree_proto::{InvalidInput, TxId};
use tokio::net::TcpListener;
use tonic::service::Routes;

pub use config::Config;
use engine::EngineError;
pub use group::LEADER_CHANGES;
pub use registry::Role;
use store::{DecisionLog, StoreError};

/// Every error of the coordinator crate. [`tonic::Status`] is made from it in
/// exactly one place (`From<CoordinatorError> for Status`).
#[derive(Debug, thiserror::Error)]
pub enum CoordinatorError {
    #[error(transparent)]
    Invalid(#[from] InvalidInput),
    #[error("too many transactions in flight (limit {limit})")]
    Overloaded { limit: usize },
    #[error(transparent)]
    DiskShort(#[from] decree_runtime::disk::DiskShort),
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error("txid {txid} was not issued by this coordinator ({coordinator_id:08x})")]
    ForeignTxid { txid: TxId, coordinator_id: u32 },
    #[error("txid {txid} refused, the transaction did not start: {why}")]
    TxidRefused { txid: TxId, why: String },
    #[error("the coordinator is shutting down")]
    ShuttingDown,
    /// The actor stopped after it took the request, without answering.
    #[error("the coordinator stopped before answering{}; the outcome is not known: ask GetOutcome", txid.map(|t| format!(" {t}")).unwrap_or_default())]
    Abandoned { txid: Option<TxId> },
    /// Fatal: the process stops rather than retry.
    #[error("storage: {0}")]
    Storage(#[from] StoreError),
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error("transport: {0}")]
    Transport(#[from] tonic::transport::Error),
}

impl decree_runtime::serve::Exit for CoordinatorError {}

impl From<CoordinatorError> for tonic::Status {
    fn from(err: CoordinatorError) -> Self {
        use tonic::Status;
        let message = err.to_string();
        match err {
            CoordinatorError::Invalid(_) => Status::invalid_argument(message),
            CoordinatorError::Overloaded { .. } => Status::resource_exhausted(message),
            CoordinatorError::DiskShort(_) => {
                decree_proto::Reason::DiskFull.on_status(Status::resource_exhausted(message))
            }
            CoordinatorError::Engine(_) | CoordinatorError::ForeignTxid { .. } => {
                Status::failed_precondition(message)
            }
            CoordinatorError::TxidRefused { .. } => {
                decree_proto::Reason::TxidRefused.on_status(Status::failed_precondition(message))
            }
            CoordinatorError::ShuttingDown => {
                decree_proto::Reason::ShuttingDown.on_status(Status::unavailable(message))
            }
            CoordinatorError::Abandoned { txid } => {
                let mut status = Status::unknown(message);
                if let Some(value) = txid.and_then(|t| t.to_string().parse().ok()) {
                    status.metadata_mut().insert(decree_proto::TXID_METADATA, value);
                }
                status
            }
            CoordinatorError::Storage(_) | CoordinatorError::Config(_) | CoordinatorError::Transport(_) => {
                Status::internal(message)
            }
        }
    }
}

/// Serves the operator's console at `listen`, over this coordinator (a
/// group's replicas, when it is one); it runs until the process ends.
async fn start_console(
    config: &Config,
    listen: std::net::SocketAddr,
    serving: Option<std::net::SocketAddr>,
) -> Result<(), CoordinatorError> {
    if config.process.tls.tls_cert.is_some() {
        return Err(CoordinatorError::Config(
            "--console-listen is for plaintext clusters: under mutual TLS, run `decree console` with an \
             operator's or an observer's certificate (the console acts as that identity)"
                .into(),
        ));
    }
    let url = match config.group() {
        Some(group) => group.replicas.values().map(|a| format!("http://{a}")).collect::<Vec<_>>().join(","),
        None => format!("http://{}", serving.unwrap_or(config.listen)),
    };
    let listener = TcpListener::bind(listen)
        .await
        .map_err(|e| CoordinatorError::Config(format!("--console-listen {listen}: {e}")))?;
    tracing::info!(url = %format!("http://{}/", listener.local_addr().unwrap_or(listen)), "console");
    crate::tasks::spawn(async move {
        if let Err(err) = decree_console::serve(listener, &url, std::future::pending()).await {
            tracing::error!(error = %err, "the console stopped");
        }
    });
    Ok(())
}

/// Recovers from the data directory, then serves on `listener` until `shutdown`.
pub async fn serve(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), CoordinatorError> {
    config.validate().map_err(CoordinatorError::Config)?;
    if let Some(listen) = config.process.metrics_listen {
        decree_runtime::metrics::install(listen).map_err(CoordinatorError::Config)?;
    }
    if let Some(listen) = config.console_listen {
        start_console(&config, listen, listener.local_addr().ok()).await?;
    }
    std::fs::create_dir_all(&config.data_dir)
        .map_err(|e| CoordinatorError::Config(format!("--data-dir {}: {e}", config.data_dir.display())))?;
    let disk = decree_runtime::disk::DiskGuard::new(&config.data_dir, config.process.disk_reserve_mb)
        .map_err(|e| CoordinatorError::Config(format!("--data-dir {}: {e}", config.data_dir.display())))?;
    disk.watch();
    if config.group().is_some() {
        return group::serve(config, listener, disk, shutdown).await;
    }
    let log = decree_runtime::Log::open(&config.data_dir).map_err(store::StoreError::from)?;
    if decree_replica::log_store::holds_replica(&log).map_err(store::StoreError::from)? {
        return Err(CoordinatorError::Config(format!(
            "--data-dir {} holds a replica of a coordinator group: start it with its --replica-id and --replicas",
            config.data_dir.display()
        )));
    }
    let (store, recovered) = DecisionLog::open_on(decree_replica::Store::Local(log)).await?;
    let config = std::sync::Arc::new(config);
    let running =
        start(config.clone(), store, recovered, disk, runtime::Failure::Process, listener.local_addr().ok())
            .await?;
    let Running { handle, service, stopping } = running;
    let (routes, health) = decree_runtime::serve::with_discovery(routes(service, &config), SERVICES)
        .await
        .map_err(CoordinatorError::Config)?;
    let grace = config.shutdown_grace();
    let graceful = async move {
        shutdown.await;
        tracing::info!(
            grace_ms = grace.as_millis() as u64,
            "shutting down: no new transactions; finishing those in flight"
        );
        decree_runtime::serve::not_serving(&health, SERVICES).await;
        let _ = stopping.send(true);
        match tokio::time::timeout(grace, handle.drain()).await {
            Ok(()) => tracing::info!("every transaction in flight is decided and acknowledged"),
            Err(_) => {
                tracing::warn!("grace period over; unacknowledged commits are redelivered after the restart")
            }
        }
    };
    serve_routes(&config, routes, listener, graceful).await
}

/// Serves `routes` on `listener` until `graceful` is done.
async fn serve_routes(
    config: &Config,
    routes: Routes,
    listener: TcpListener,
    graceful: impl Future<Output = ()> + Send + 'static,
) -> Result<(), CoordinatorError> {
    tonic::transport::Server::builder()
        .layer(decree_runtime::metrics::CountRequests)
        .layer(decree_tls::policy::Authorize)
        .max_concurrent_streams(config.process.max_concurrent_streams)
        .tcp_nodelay(true)
        .add_routes(routes)
        .serve_with_incoming_shutdown(decree_runtime::serve::incoming(listener), graceful)
        .await?;
    Ok(())
}

/// The Coordinator and Registry services of `service`.
fn routes(service: service::Service, config: &Config) -> Routes {
    let limit = config.max_message_bytes * 2;
    Routes::new(CoordinatorServer::new(service.clone()).max_decoding_message_size(limit))
        .add_service(RegistryServer::new(service).max_decoding_message_size(limit))
}

/// A coordinator recovered and running: its actor, handlers, and what ends
/// the streams they serve.
struct Running {
    handle: runtime::Handle,
    service: service::Service,
    stopping: tokio::sync::watch::Sender<bool>,
}

/// Starts the coordinator over the log `store` just opened: the registry and
/// ring from it, the actor redriving what was unfinished, the ring's
/// migration task, the pruner of ended outcomes, and the handlers.
async fn start(
    config: std::sync::Arc<Config>,
    store: DecisionLog,
    mut recovered: store::Recovered,
    disk: std::sync::Arc<decree_runtime::disk::DiskGuard>,
    failure: runtime::Failure,
    address: Option<std::net::SocketAddr>,
) -> Result<Running, CoordinatorError> {
    tracing::info!(
        coordinator = format_args!("{:08x}", recovered.coordinator_id),
        incarnation = recovered.incarnation,
        unfinished = recovered.unfinished.len(),
        records_read = recovered.records_read,
        horizon = %recovered.horizon.map(|h| h.to_string()).unwrap_or_else(|| "none".into()),
        address = %address.map(|a| a.to_string()).unwrap_or_default(),
        "coordinator starting"
    );
    let registry = std::sync::Arc::new(registry::Registry::new(
        std::time::Duration::from_millis(config.liveness_ms),
        config.max_message_bytes,
    ));
    for (name, address, role) in std::mem::take(&mut recovered.participants) {
        if let Err(err) = registry.enroll(name.clone(), &address, registry::Role::from_wire(role), false) {
            tracing::warn!(participant = %name, error = %err, "ignoring a stored participant");
        }
    }
    let ring = recovered.ring.take();
    let members_before: Vec<_> =
        registry.list().into_iter().filter(|p| p.role == registry::Role::Member).map(|p| p.name).collect();
    let handle = runtime::start(config.clone(), store, registry, disk, recovered, failure);
    let membership = membership::Membership::start(handle.clone(), ring, members_before).await?;
    let (stopping, stop_streams) = tokio::sync::watch::channel(false);
    crate::tasks::spawn(runtime::prune_ended(handle.clone(), stop_streams.clone()));
    let service = service::Service::new(handle.clone(), membership, stop_streams);
    Ok(Running { handle, service, stopping })
}

/// The gRPC services the coordinator serves, as health checks name them.
pub const SERVICES: &[&str] = &["decree.v1.Coordinator", "decree.v1.Registry"];

/// Runs the coordinator as a process: arms crash points, binds, serves until
/// SIGINT or SIGTERM. Returns the process exit code.
pub async fn run(config: Config) -> i32 {
    let (valid, listen) = (config.validate(), config.listen);
    let process = config.process.clone();
    decree_runtime::serve::run_process(
        "decree coordinator",
        &config.clone(),
        valid,
        &process,
        listen,
        |listener| serve(config, listener, decree_runtime::serve::shutdown_signal()),
    )
    .await
}
