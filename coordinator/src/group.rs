//! A coordinator as one replica of a coordinator group.
//!
//! Every replica runs the group's Raft node (`decree-replica`) over its data
//! directory and serves, on its one address, the other replicas
//! (`decree.v1.Replica`), the group's view (`decree.v1.Group`) and the
//! coordinator's own services. Only the leader coordinates: when this
//! replica becomes leader it confirms its leadership with a majority and
//! applies everything committed before (read index), then opens the
//! decision log over the replicated store (which bumps the incarnation
//! through the group, so its txids are new) and starts a coordinator on it,
//! exactly as a restarted single coordinator does: the unfinished decisions
//! are redriven, the one-phase questions asked again. That coordinator (its
//! *term*) ties every task it starts, and every request it serves, to the
//! term (`tasks`), so that when the leadership goes (another leader, or a
//! replicated write that failed) everything it started stops with it: the
//! transactions it was deciding are answered "unknown, ask the leader", and
//! nothing it does afterwards can be written.
//!
//! A request to a replica without a term is answered UNAVAILABLE with
//! `REASON_NOT_LEADER` and the leader's URL (`decree-leader`), having done
//! nothing. Health reports every service SERVING on every replica that runs;
//! [`LEADER_HEALTH`] is SERVING on the leader only.

use std::convert::Infallible;
use std::marker::PhantomData;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use decree_proto::v1;
use decree_proto::v1::coordinator_server::CoordinatorServer;
use decree_proto::v1::group_server::{Group as GroupRpc, GroupServer};
use decree_proto::v1::registry_server::RegistryServer;
use decree_replica::{Replica, ReplicaError};
use decree_runtime::Log;
use tokio::net::TcpListener;
use tonic::body::Body;
use tonic::server::NamedService;
use tonic::service::Routes;
use tonic::{Request, Response, Status};
use tracing::{info, warn};

use crate::config::{Config, GroupConfig};
use crate::runtime::Failure;
use crate::service::Service;
use crate::store::DecisionLog;
use crate::tasks;
use crate::{CoordinatorError, Running, SERVICES};

/// The health-check name that is SERVING on the group's leader only.
pub const LEADER_HEALTH: &str = "decree.v1.Coordinator.leader";

/// Leader changes this replica has seen (`decree_group_leader_changes_total`).
pub const LEADER_CHANGES: &str = "decree_group_leader_changes_total";
/// This replica's current term (`decree_group_term`).
pub const TERM: &str = "decree_group_term";
/// 1 while this replica leads (`decree_group_leader`).
pub const LEADING: &str = "decree_group_leader";
/// Entries in this replica's log not yet applied, and (on the leader) the
/// entries each follower lacks (`decree_group_lag_entries{replica}`).
pub const LAG: &str = "decree_group_lag_entries";

/// Serves as replica `group.id` until `shutdown`.
pub(crate) async fn serve(
    config: Config,
    listener: TcpListener,
    disk: Arc<decree_runtime::disk::DiskGuard>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), CoordinatorError> {
    let group = config.group().expect("validated: a group");
    let log = Log::open(&config.data_dir).map_err(crate::store::StoreError::from)?;
    let joined = decree_replica::log_store::holds_replica(&log).map_err(crate::store::StoreError::from)?;
    let dir = config.data_dir.display();
    if !joined && crate::store::holds_decisions(&log)? {
        return Err(CoordinatorError::Config(format!(
            "--data-dir {dir} holds a single coordinator's log, not a replica's: a group starts on empty data \
             directories (run the single coordinator without --replicas)"
        )));
    }
    if group.bootstrap && joined {
        return Err(CoordinatorError::Config(format!(
            "--bootstrap refused: --data-dir {dir} holds replica {}'s log already (a group is bootstrapped \
             once; start it again without --bootstrap)",
            group.id
        )));
    }
    let replica = Arc::new(Replica::open(group.id, log, &group.timing).await.map_err(config_error)?);
    if group.bootstrap {
        if let Err(err) = replica.bootstrap(group.replicas.clone()).await {
            let _ = replica.raft.shutdown().await;
            return Err(config_error(err));
        }
        info!(replica = group.id, members = ?group.replicas, "group bootstrapped");
    } else if !joined {
        info!(
            replica = group.id,
            "not part of a group yet: waiting to be bootstrapped or added (decree coordinators add)"
        );
    }
    let config = Arc::new(config);
    let front = Front { term: Arc::default(), replica: replica.clone() };
    let changes = Arc::new(AtomicU64::new(0));
    let routes = Routes::new(replica.service())
        .add_service(Named::<CoordinatorServer<Service>>::new(front.clone()))
        .add_service(Named::<RegistryServer<Service>>::new(front.clone()))
        .add_service(GroupServer::new(GroupService { replica: replica.clone(), changes: changes.clone() }));
    let names: Vec<&str> = SERVICES.iter().copied().chain(["decree.v1.Group", "decree.v1.Replica"]).collect();
    let (routes, health) =
        decree_runtime::serve::with_discovery(routes, &names).await.map_err(CoordinatorError::Config)?;
    health.set_service_status(LEADER_HEALTH, tonic_health::ServingStatus::NotServing).await;
    info!(
        replica = group.id,
        address = %listener.local_addr().map(|a| a.to_string()).unwrap_or_default(),
        "coordinator replica starting"
    );
    let leading =
        crate::tasks::spawn(lead(config.clone(), group, replica.clone(), front, disk, health, changes));
    let graceful = async move {
        shutdown.await;
        info!("shutting down: this replica leaves its term, if it leads");
        leading.abort();
        let _ = leading.await;
    };
    crate::serve_routes(&config, routes, listener, graceful).await?;
    let _ = replica.raft.shutdown().await;
    Ok(())
}

fn config_error(err: ReplicaError) -> CoordinatorError {
    CoordinatorError::Config(err.to_string())
}

/// Follows this replica's role: starts a term whenever it becomes leader,
/// ends it when it stops leading. Exits the process when the Raft node
/// stops on its own (a storage error in its log: never trusted again).
async fn lead(
    config: Arc<Config>,
    group: GroupConfig,
    replica: Arc<Replica<Log>>,
    front: Front,
    disk: Arc<decree_runtime::disk::DiskGuard>,
    health: tonic_health::server::HealthReporter,
    changes: Arc<AtomicU64>,
) {
    let mut metrics = replica.raft.metrics();
    let mut leader = None;
    loop {
        let term = {
            let now = metrics.borrow_and_update().clone();
            if let Err(err) = &now.running_state {
                fatal_raft(err);
            }
            observe(&now, &mut leader, &changes);
            (now.current_leader == Some(group.id) && now.state == openraft::ServerState::Leader)
                .then_some(now.current_term)
        };
        let Some(term) = term else {
            if metrics.changed().await.is_err() {
                fatal_raft("the Raft node stopped");
            }
            continue;
        };
        let confirmed = match replica.ensure_linearizable().await {
            Ok(()) => replica.apply_own_log(group.timing.election_max).await,
            Err(err) => Err(err),
        };
        let started = match confirmed {
            Ok(()) => Term::start(config.clone(), replica.clone(), disk.clone()).await,
            Err(err) => Err(CoordinatorError::Config(err.to_string())),
        };
        let mut running = match started {
            Ok(running) => running,
            Err(err) => {
                warn!(term, error = %err, "could not start coordinating as leader; trying again");
                tokio::time::sleep(group.timing.election_min).await;
                continue;
            }
        };
        info!(term, incarnation = running.handle.incarnation, "leading the group: coordinating");
        front.set(Some((running.routes.clone(), running.tasks.scope())));
        health.set_service_status(LEADER_HEALTH, tonic_health::ServingStatus::Serving).await;
        metrics::gauge!(LEADING).set(1.0);
        let mut lease = Lease::new(group.timing.election_max * 2);
        let mut tick = tokio::time::interval(group.timing.heartbeat);
        let why = loop {
            tokio::select! {
                changed = metrics.changed() => {
                    if changed.is_err() {
                        break "the Raft node stopped".to_owned();
                    }
                    let now = metrics.borrow_and_update().clone();
                    observe(&now, &mut leader, &changes);
                    if now.current_term != term || now.state != openraft::ServerState::Leader {
                        break format!("term {} leader {:?}", now.current_term, now.current_leader);
                    }
                    lease.observe(now.millis_since_quorum_ack);
                }
                _ = tick.tick() => {
                    if let Some(silent) = lease.lapsed() {
                        break format!(
                            "no majority has acknowledged this leader for {} ms: cut off from the others?",
                            silent.as_millis()
                        );
                    }
                }
                Some(why) = running.ended.recv() => break why,
            }
        };
        front.set(None);
        health.set_service_status(LEADER_HEALTH, tonic_health::ServingStatus::NotServing).await;
        metrics::gauge!(LEADING).set(0.0);
        info!(term, %why, "no longer leading: this term's coordinator stops");
        running.stop().await;
    }
}

/// A leader's check that a majority still hears it (Raft's CheckQuorum,
/// which openraft 0.9 leaves to the application). A leader cut off from the
/// others keeps believing it leads until it hears of a newer term, and its
/// decisions wait forever for a majority; so once no majority has
/// acknowledged it for `lapse` (twice the longest election timeout: the
/// others have elected a leader by then), it stops coordinating: its
/// clients' transactions end as "outcome unknown" and are resolved by the
/// new leader, and they find that leader, rather than waiting on a replica
/// that can decide nothing. Safety never depends on this: a decision needs
/// a majority either way.
struct Lease {
    lapse: Duration,
    /// When the last acknowledgement was, as of the last observation.
    acked: Instant,
}

impl Lease {
    /// A term just confirmed by a majority (its start reads linearizably).
    fn new(lapse: Duration) -> Lease {
        Lease { lapse, acked: Instant::now() }
    }

    /// openraft's `millis_since_quorum_ack` as just reported.
    fn observe(&mut self, millis_since_quorum_ack: Option<u64>) {
        if let Some(ms) = millis_since_quorum_ack {
            let now = Instant::now();
            self.acked = now.checked_sub(Duration::from_millis(ms)).unwrap_or(now - self.lapse * 2);
        }
    }

    /// How long no majority has acknowledged, once that is longer than the lapse.
    fn lapsed(&self) -> Option<Duration> {
        let silent = self.acked.elapsed();
        (silent > self.lapse).then_some(silent)
    }
}

/// Counts leader changes and exports the term and lag.
fn observe(
    now: &openraft::RaftMetrics<decree_replica::NodeId, decree_replica::Member>,
    leader: &mut Option<decree_replica::NodeId>,
    changes: &AtomicU64,
) {
    if now.current_leader.is_some() && now.current_leader != *leader {
        changes.fetch_add(1, Ordering::Relaxed);
        metrics::counter!(LEADER_CHANGES).increment(1);
        info!(term = now.current_term, leader = ?now.current_leader, "leader");
    }
    *leader = now.current_leader;
    metrics::gauge!(TERM).set(now.current_term as f64);
    let last = now.last_log_index.unwrap_or(0);
    let applied = now.last_applied.map(|l| l.index).unwrap_or(0);
    metrics::gauge!(LAG, "replica" => "self").set(last.saturating_sub(applied) as f64);
    for (id, matched) in now.replication.iter().flatten() {
        let matched = matched.map(|l| l.index).unwrap_or(0);
        metrics::gauge!(LAG, "replica" => id.to_string()).set(last.saturating_sub(matched) as f64);
    }
}

fn fatal_raft(err: impl std::fmt::Display) -> ! {
    tracing::error!(error = %err, "the replica's Raft node stopped; stopping");
    eprintln!("decree-coordinator: the replica's Raft node stopped: {err}");
    std::process::exit(70)
}

/// One term as leader: a coordinator over the replicated log, its tasks
/// tied to the term ([`tasks::Term`]), so that they all stop when it ends.
struct Term {
    tasks: tasks::Term,
    handle: crate::runtime::Handle,
    routes: Routes,
    stopping: tokio::sync::watch::Sender<bool>,
    /// A replicated write failed: why.
    ended: tokio::sync::mpsc::Receiver<String>,
}

impl Term {
    async fn start(
        config: Arc<Config>,
        replica: Arc<Replica<Log>>,
        disk: Arc<decree_runtime::disk::DiskGuard>,
    ) -> Result<Term, CoordinatorError> {
        let tasks = tasks::Term::new();
        // The first failed write ends the term; later ones need not queue.
        let (failed, ended) = tokio::sync::mpsc::channel(1);
        // A task of the term's, so that a panic in the start is an error
        // here; on any failure `tasks` is dropped, and whatever the start
        // began stops.
        let opened = tasks.scope().spawn({
            let config = config.clone();
            async move {
                let store = decree_replica::Store::Replicated(replica.storage());
                let (store, recovered) = DecisionLog::open_on(store).await?;
                crate::start(config, store, recovered, disk, Failure::Term(failed), None).await
            }
        });
        let running = match opened.await {
            Ok(Some(started)) => started?,
            Ok(None) => return Err(CoordinatorError::Config("the term ended while it started".into())),
            Err(err) => return Err(CoordinatorError::Config(format!("the term's start: {err}"))),
        };
        let Running { handle, service, stopping } = running;
        let routes = crate::routes(service, &config);
        Ok(Term { tasks, handle, routes, stopping, ended })
    }

    /// Answers what is in flight "unknown, ask the leader", ends the open
    /// transaction streams and stops everything the term started.
    async fn stop(self) {
        self.handle.depose(std::time::Duration::from_secs(2)).await;
        let _ = self.stopping.send(true);
        // Give the answers a moment to go out on their streams.
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        self.tasks.end();
    }
}

/// The coordinator's services as this replica serves them: the term's while
/// it leads, else a refusal naming the leader.
#[derive(Clone)]
struct Front {
    term: Arc<RwLock<Option<(Routes, tasks::Scope)>>>,
    replica: Arc<Replica<Log>>,
}

impl Front {
    fn set(&self, term: Option<(Routes, tasks::Scope)>) {
        *self.term.write().unwrap_or_else(|p| p.into_inner()) = term;
    }
}

/// The refusal of a replica that does not lead: nothing was done.
fn not_leader(replica: &Replica<Log>) -> Status {
    // A leader whose majority went silent is not coordinating: it names no
    // leader (not itself), and clients try the other replicas.
    let leading = replica.raft.metrics().borrow().current_leader == Some(replica.id);
    let url = replica.leader_url().filter(|_| !leading);
    let message = match &url {
        Some(url) => format!("replica {} is not the group's leader; the leader is at {url}", replica.id),
        None => format!("replica {} is not the group's leader, and no leader is known yet", replica.id),
    };
    let mut status = decree_proto::Reason::NotLeader.on_status(Status::unavailable(message));
    if let Some(value) = url.and_then(|u| u.parse().ok()) {
        status.metadata_mut().insert(decree_proto::LEADER_METADATA, value);
    }
    status
}

/// [`Front`] under the name of service `N`.
struct Named<N> {
    front: Front,
    name: PhantomData<fn() -> N>,
}

impl<N> Named<N> {
    fn new(front: Front) -> Self {
        Named { front, name: PhantomData }
    }
}

impl<N> Clone for Named<N> {
    fn clone(&self) -> Self {
        Named::new(self.front.clone())
    }
}

impl<N: NamedService> NamedService for Named<N> {
    const NAME: &'static str = N::NAME;
}

impl<N> tower::Service<http::Request<Body>> for Named<N> {
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = tonic::codegen::BoxFuture<Self::Response, Infallible>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        let term = self.front.term.read().unwrap_or_else(|p| p.into_inner()).clone();
        match term {
            // Within the term: what the handler spawns stops with it.
            Some((mut routes, scope)) => Box::pin(scope.within(async move {
                std::future::poll_fn(|cx| tower::Service::<http::Request<Body>>::poll_ready(&mut routes, cx))
                    .await?;
                tower::Service::call(&mut routes, request).await
            })),
            None => {
                let status = not_leader(&self.front.replica);
                Box::pin(std::future::ready(Ok(status.into_http())))
            }
        }
    }
}

/// `decree.v1.Group`: this replica's view, and membership changes (leader only).
struct GroupService {
    replica: Arc<Replica<Log>>,
    changes: Arc<AtomicU64>,
}

impl GroupService {
    fn status(&self) -> v1::GroupStatus {
        v1::GroupStatus { leader_changes: self.changes.load(Ordering::Relaxed), ..self.replica.status() }
    }
}

fn refused(err: ReplicaError) -> Status {
    match err {
        ReplicaError::NotLeader { leader_url, .. } => {
            let mut status = decree_proto::Reason::NotLeader.on_status(Status::unavailable(format!(
                "this replica is not the group's leader{}",
                leader_url.as_deref().map(|u| format!("; the leader is at {u}")).unwrap_or_default()
            )));
            if let Some(value) = leader_url.and_then(|u| u.parse().ok()) {
                status.metadata_mut().insert(decree_proto::LEADER_METADATA, value);
            }
            status
        }
        ReplicaError::Invalid(why) => Status::failed_precondition(why),
        other => Status::unavailable(other.to_string()),
    }
}

#[tonic::async_trait]
impl GroupRpc for GroupService {
    async fn get_group(
        &self,
        _request: Request<v1::GetGroupRequest>,
    ) -> Result<Response<v1::GroupStatus>, Status> {
        Ok(Response::new(self.status()))
    }

    async fn add_replica(
        &self,
        request: Request<v1::AddReplicaRequest>,
    ) -> Result<Response<v1::GroupStatus>, Status> {
        let v1::AddReplicaRequest { id, address } = request.into_inner();
        if id == 0 {
            return Err(Status::invalid_argument("id: replica ids start at 1"));
        }
        let valid = address.rsplit_once(':').is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok());
        if !valid {
            return Err(Status::invalid_argument(format!("address {address:?}: expected HOST:PORT")));
        }
        info!(id, %address, "adding a replica to the group");
        self.replica.add(id, address).await.map_err(refused)?;
        Ok(Response::new(self.status()))
    }

    async fn remove_replica(
        &self,
        request: Request<v1::RemoveReplicaRequest>,
    ) -> Result<Response<v1::GroupStatus>, Status> {
        let id = request.into_inner().id;
        info!(id, "removing a replica from the group");
        self.replica.remove(id).await.map_err(refused)?;
        Ok(Response::new(self.status()))
    }
}
