//! The decree participant library: make a service a participant in decree
//! transactions by implementing one trait, [`Resource`].
//!
//! The library owns the protocol: the lock table (keys stay locked from
//! prepare until the decision, across crashes), the durable prepared record
//! (synced before YES), idempotent Commit and Abort, tombstones (a late
//! Prepare after an Abort votes NO; an Abort for an unknown txid is answered
//! without effect), recovery of branches in doubt (asking the coordinator),
//! enrollment and heartbeats, and the named crash points. [`Builder`] serves
//! a resource with all of it.
//!
//! A complete service: counters that may not go below zero.
//!
//! ```no_run
//! use decree_participant::{Builder, Config, Log, Resource, Validated, Write};
//! use decree_proto::TxId;
//!
//! /// A branch's payload: "<counter> <delta>".
//! struct Counters { log: Log }
//!
//! fn parse(payload: &[u8]) -> Result<(String, i64), String> {
//!     let text = std::str::from_utf8(payload).map_err(|e| e.to_string())?;
//!     let (name, delta) = text.split_once(' ').ok_or("expected \"<counter> <delta>\"")?;
//!     Ok((name.to_owned(), delta.trim().parse().map_err(|_| "bad delta")?))
//! }
//!
//! #[async_trait::async_trait]
//! impl Resource for Counters {
//!     fn keys(&self, payload: &[u8]) -> Result<Vec<String>, String> {
//!         Ok(vec![parse(payload)?.0])
//!     }
//!
//!     async fn prepare(&self, _txid: TxId, payload: &[u8]) -> Validated {
//!         // The key is locked: its value cannot change until this branch is decided.
//!         let (name, delta) = match parse(payload) {
//!             Ok(parsed) => parsed,
//!             Err(reason) => return Validated::Refused { reason },
//!         };
//!         let current = match self.log.get(name.as_bytes()) {
//!             Ok(v) => v.map_or(0, |b| String::from_utf8_lossy(&b).parse().unwrap_or(0)),
//!             Err(err) => return Validated::Refused { reason: err.to_string() },
//!         };
//!         if current + delta < 0 {
//!             return Validated::Refused { reason: format!("{name} would go below zero") };
//!         }
//!         // The redo is kept in the synced prepared record and handed to commit.
//!         Validated::Ready { redo: format!("{name} {}", current + delta).into_bytes() }
//!     }
//!
//!     async fn commit(&self, _txid: TxId, redo: &[u8]) -> Result<Vec<Write>, String> {
//!         // Written in the same synced batch as the commit record: applied exactly once.
//!         let (name, value) = parse(redo)?;
//!         Ok(vec![Write::put(name, value.to_string())])
//!     }
//! }
//!
//! #[tokio::main]
//! async fn main() -> Result<(), Box<dyn std::error::Error>> {
//!     let config = Config::new("/var/lib/counters".into(), "http://127.0.0.1:7000".into(), "counters".into());
//!     let listener = tokio::net::TcpListener::bind("127.0.0.1:7101").await?;
//!     Builder::new(config)
//!         .serve(|log| Counters { log: log.clone() }, listener, async { let _ = tokio::signal::ctrl_c().await; })
//!         .await?;
//!     Ok(())
//! }
//! ```
//!
//! A fuller one, with its own integration test: `participant/examples/inventory.rs`.
//! Services in other languages speak the gRPC protocol (`proto/decree/v1/participant.proto`).
//!
//! Inside:
//! - [`engine`]: branch states, locks, waits and tombstones as a sans-IO state machine;
//! - [`store`]: prepared records and tombstones, and their correctness contract;
//! - [`resource`]: what a service plugs in; [`kv`] (the reference KV store) and
//!   [`postgres`] (PostgreSQL prepared transactions) are resources;
//! - `runtime`: the actor, the in-doubt resolver, enrollment and heartbeats;
//! - [`wire`]: votes, acks and outcomes to and from the `decree.v1` messages;
//! - `service`: the thin gRPC handlers.
//!
//! The protocol: docs/protocol.md. Recovery: docs/recovery.md.

pub mod cache;
pub mod config;
pub mod engine;
pub mod kv;
pub mod membership;
pub mod migration;
pub mod postgres;
pub mod resource;
mod runtime;
mod service;
pub mod store;
pub mod wire;

use std::future::Future;
use std::sync::Arc;
use std::time::Instant;

use decree_proto::v1::coordinator_client::CoordinatorClient;
use decree_proto::v1::kv_server::KvServer;
use decree_proto::v1::participant_server::ParticipantServer;
use decree_proto::v1::registry_client::RegistryClient;
use tokio::net::TcpListener;
use tonic::service::Routes;

pub use config::{Backend, Config};
pub use decree_runtime::{Log, Write};
use engine::Engine;
pub use engine::Validated;
pub use resource::Resource;
use store::{BranchLog, StoreError};

/// Every error of the participant crate.
#[derive(Debug, thiserror::Error)]
pub enum ParticipantError {
    /// Fatal: the process stops rather than retry.
    #[error("storage: {0}")]
    Storage(#[from] StoreError),
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error("resource: {0}")]
    Resource(String),
    #[error("transport: {0}")]
    Transport(#[from] tonic::transport::Error),
    /// Another live participant holds this name at the coordinator, or the
    /// coordinator's policy does not let this identity enroll as it (exit 2).
    #[error("enrollment refused: {0}")]
    Refused(String),
}

impl decree_runtime::serve::Exit for ParticipantError {
    fn exit_code(&self) -> i32 {
        match self {
            ParticipantError::Refused(_) => 2,
            _ => 1,
        }
    }
}

/// Serves a [`Resource`] as a decree participant: the builder the KV and
/// PostgreSQL participants and any embedding service go through.
pub struct Builder {
    config: Config,
}

impl Builder {
    pub fn new(config: Config) -> Builder {
        Builder { config }
    }

    /// Opens the participant's log, builds the resource over it with `make`
    /// (a resource that keeps its data there is applied in the same synced
    /// batch as each commit record), recovers prepared branches (locking their
    /// keys again), then serves the Participant service on `listener` until
    /// `shutdown`, enrolled with the coordinator.
    pub async fn serve<R: Resource>(
        self,
        make: impl FnOnce(&Log) -> R,
        listener: TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), ParticipantError> {
        // A resource of its own is a named service: only the KV store's keys move between members.
        let mut config = self.config;
        match config.role {
            Some(config::Role::Member) => return Err(ParticipantError::Config(
                "--role member: only the KV store holds ring keys; a service of its own is --role service"
                    .into(),
            )),
            _ => config.role = Some(config::Role::Service),
        }
        serve_with(config, |log| Ok((Arc::new(make(log)) as Arc<dyn Resource>, None)), listener, shutdown)
            .await
    }
}

/// What a participant serves: its resource, and the Kv service's reads if it
/// has them.
type Parts = (Arc<dyn Resource>, Option<service::Reads>);

async fn serve_with(
    config: Config,
    make: impl FnOnce(&Log) -> Result<Parts, ParticipantError>,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ParticipantError> {
    config.validate().map_err(ParticipantError::Config)?;
    if let Some(listen) = config.process.metrics_listen {
        decree_runtime::metrics::install(listen).map_err(ParticipantError::Config)?;
    }
    std::fs::create_dir_all(&config.data_dir)
        .map_err(|e| ParticipantError::Config(format!("--data-dir {}: {e}", config.data_dir.display())))?;
    let local = listener.local_addr().map_err(|e| ParticipantError::Config(e.to_string()))?;
    let scheme = if decree_tls::installed().is_some() { "https" } else { "http" };
    let address = config.advertise_url.clone().unwrap_or_else(|| format!("{scheme}://{local}"));
    // The coordinator, or every replica of its group: requests follow the leader.
    let coordinator_channel = decree_client::Coordinators::new(&config.coordinator)
        .map_err(|e| ParticipantError::Config(format!("--coordinator: {e}")))?;

    let disk = decree_runtime::disk::DiskGuard::new(&config.data_dir, config.process.disk_reserve_mb)
        .map_err(|e| ParticipantError::Config(format!("--data-dir {}: {e}", config.data_dir.display())))?;
    disk.watch();
    let store = BranchLog::open(&config.data_dir, &config.coordinator)?;
    let log_closed = store.log().closed();
    let (resource, kv) = make(store.log())?;
    let loaded = store.load().await?;
    let prepared: Vec<_> = loaded.prepared.iter().map(|b| b.txid).collect();
    resource.recover(&prepared).await.map_err(ParticipantError::Resource)?;
    for branch in &loaded.prepared {
        resource.in_doubt(branch.txid, &branch.redo);
    }
    let mut engine = Engine::with_waits(config.lock_wait(), config.read_wait())
        .with_tombstones(config.tombstone_retention());
    let recovered = loaded.prepared.len();
    for branch in &loaded.prepared {
        tracing::info!(txid = %branch.txid, keys = ?branch.keys, "recovery: prepared branch in doubt, keys locked");
    }
    let records_read = loaded.records_read;
    loaded.replay_into(&mut engine, Instant::now());
    tracing::info!(
        name = %config.name,
        %address,
        in_doubt = recovered,
        tombstones = engine.tombstone_count(),
        records_read,
        "participant starting"
    );

    let handle = runtime::start(
        engine,
        resource.clone(),
        store,
        config.idle_timeout(),
        config.process.request_queue,
        config.tombstone_retention(),
        disk,
    );
    let (incarnation, learned_incarnation) = tokio::sync::watch::channel(0);
    // Set when the coordinator refuses this name for good: the server stops.
    let (taken, mut name_taken) = tokio::sync::watch::channel(None::<String>);
    let refusal = taken.subscribe();
    // Background work lives as long as the server: when this function returns,
    // dropping the set aborts it, and with it the last handles to the actor,
    // which then ends and closes the log. Nothing is left running.
    let mut background = tokio::task::JoinSet::new();
    background.spawn(runtime::resolve_in_doubt(
        handle.clone(),
        CoordinatorClient::new(coordinator_channel.clone()),
        recovered,
        config.in_doubt_after(),
        config.resolve_interval(),
        learned_incarnation,
    ));
    background.spawn(runtime::stay_enrolled(
        handle.clone(),
        RegistryClient::new(coordinator_channel.clone()),
        config.name.clone(),
        address,
        (config.role(), config.join),
        config.heartbeat(),
        (incarnation, taken),
    ));
    if let Some(service::Reads::Rocks(store)) = &kv {
        background.spawn(report_cache(store.clone()));
    }
    let limit = config.max_message_bytes * 2;
    let (stopping, stop_streams) = tokio::sync::watch::channel(false);
    let participant = service::ParticipantService::new(
        handle.clone(),
        resource,
        config.name.clone(),
        stop_streams,
        config.process.max_concurrent_streams as usize,
        CoordinatorClient::new(coordinator_channel.clone()),
    );
    let mut routes = Routes::new(ParticipantServer::new(participant).max_decoding_message_size(limit));
    let has_kv = kv.is_some();
    if let Some(kv) = kv {
        routes = routes.add_service(
            KvServer::new(service::KvService::new(
                kv,
                handle,
                CoordinatorClient::new(coordinator_channel.clone()),
                config.name.clone(),
            ))
            .max_decoding_message_size(limit),
        );
    }
    let services: &'static [&'static str] = if has_kv { &SERVICES[..2] } else { &SERVICES[..1] };
    let (routes, health) =
        decree_runtime::serve::with_discovery(routes, services).await.map_err(ParticipantError::Config)?;
    let graceful = async move {
        tokio::select! {
            () = shutdown => {}
            _ = name_taken.wait_for(Option::is_some) => {}
        }
        tracing::info!("shutting down: finishing requests in flight");
        let _ = stopping.send(true);
        decree_runtime::serve::not_serving(&health, services).await;
    };
    tonic::transport::Server::builder()
        .layer(decree_runtime::metrics::CountRequests)
        .layer(decree_tls::policy::Authorize)
        .max_concurrent_streams(config.process.max_concurrent_streams)
        .tcp_nodelay(true)
        .add_routes(routes)
        .serve_with_incoming_shutdown(decree_runtime::serve::incoming(listener), graceful)
        .await?;
    background.shutdown().await;
    // The last handles to the log go with the actor: wait for RocksDB to
    // close, so that a process that exits next never tears down under it.
    if tokio::time::timeout(LOG_CLOSE_WAIT, log_closed).await.is_err() {
        tracing::warn!("the log is still open after {LOG_CLOSE_WAIT:?}: something keeps a handle to it");
    }
    if let Some(refused) = refusal.borrow().clone() {
        return Err(ParticipantError::Refused(refused));
    }
    Ok(())
}

/// Reads answered from the KV store's cache of committed values, as a counter.
pub const KV_CACHE_HITS: &str = "decree_kv_cache_hits_total";
/// Reads the cache did not hold (read from the log).
pub const KV_CACHE_MISSES: &str = "decree_kv_cache_misses_total";
/// Bytes the cache holds (keys, values and per-entry overhead).
pub const KV_CACHE_BYTES: &str = "decree_kv_cache_bytes";

/// Publishes the KV cache's figures every second (counting each read as it
/// happens would cost every read a metrics lookup).
async fn report_cache(store: KvStore) {
    let mut every = tokio::time::interval(std::time::Duration::from_secs(1));
    loop {
        every.tick().await;
        let stats = store.cache_stats();
        metrics::counter!(KV_CACHE_HITS).absolute(stats.hits);
        metrics::counter!(KV_CACHE_MISSES).absolute(stats.misses);
        metrics::gauge!(KV_CACHE_BYTES).set(stats.bytes as f64);
    }
}

/// How long a returning server waits for its log to close.
const LOG_CLOSE_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// The gRPC services a participant serves, as health checks name them (Kv
/// only for the KV and PostgreSQL participants).
pub const SERVICES: [&str; 2] = ["decree.v1.Participant", "decree.v1.Kv"];

/// Serves the participant `config.backend` names (the KV store, or
/// PostgreSQL), with its Kv service for reads.
pub async fn serve(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ParticipantError> {
    match config.backend {
        Backend::Kv => {
            let (name, cache_bytes) = (config.name.clone(), config.kv_cache_bytes());
            let make = |log: &Log| {
                let kv = KvStore::member(log.clone(), &name)
                    .map_err(ParticipantError::Resource)?
                    .with_cache(cache_bytes);
                Ok((Arc::new(kv.clone()) as Arc<dyn Resource>, Some(service::Reads::Rocks(kv))))
            };
            serve_with(config, make, listener, shutdown).await
        }
        Backend::Postgres => {
            config.validate().map_err(ParticipantError::Config)?;
            let url = config.pg_url.clone().unwrap_or_default();
            let pg = postgres::Postgres::connect(&url, &config.pg_table, &config.name)
                .await
                .map_err(ParticipantError::Resource)?;
            let make =
                |_: &Log| Ok((Arc::new(pg.clone()) as Arc<dyn Resource>, Some(service::Reads::Postgres(pg))));
            serve_with(config, make, listener, shutdown).await
        }
    }
}

pub use kv::KvStore;

/// Runs the participant `config.backend` names as a process: arms crash points, binds, serves until
/// SIGINT or SIGTERM. Returns the process exit code.
pub async fn run(config: Config) -> i32 {
    let (valid, listen) = (config.validate(), config.listen);
    let process = config.process.clone();
    decree_runtime::serve::run_process(
        "decree participant",
        &config.clone(),
        valid,
        &process,
        listen,
        |listener| serve(config, listener, decree_runtime::serve::shutdown_signal()),
    )
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A participant whose `serve` returned leaves nothing running: its
    /// enrollment loop, resolver and actor are gone, and its log is closed
    /// by then (a process exiting next must not tear down under RocksDB), so
    /// the data directory opens again at once.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_server_that_returns_leaves_nothing_running() {
        let dir = tempfile::tempdir().unwrap();
        // No coordinator listens there: the enrollment loop keeps retrying while the server runs.
        let config = Config::new(dir.path().to_owned(), "http://127.0.0.1:9".into(), "p1".into());
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(serve(config, listener, async {
            let _ = stopped.await;
        }));
        // Serving once it answers (its log is open by then).
        let url = format!("http://{address}");
        let deadline = Instant::now() + std::time::Duration::from_secs(10);
        loop {
            let answered = match decree_proto::v1::participant_client::ParticipantClient::connect(url.clone())
                .await
            {
                Ok(mut client) => client.list_in_doubt(decree_proto::v1::ListInDoubtRequest {}).await.is_ok(),
                Err(_) => false,
            };
            if answered {
                break;
            }
            assert!(Instant::now() < deadline, "the participant never served");
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        assert!(Log::open(dir.path()).is_err(), "the serving participant holds its log");
        stop.send(()).unwrap();
        server.await.unwrap().unwrap();
        // Closed by the time serve returns, not some time after.
        if let Err(err) = Log::open(dir.path()) {
            panic!("the log is still held after serve returned: {err}");
        }
    }
}
