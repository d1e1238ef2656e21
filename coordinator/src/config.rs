//! The coordinator's configuration: flags, each also an environment variable.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use decree_runtime::backoff::{Backoff, Jitter};

#[derive(Debug, Clone, clap::Args, serde::Serialize)]
pub struct Config {
    /// Address to serve gRPC on (Coordinator and Registry services).
    #[arg(long, env = "DECREE_LISTEN", default_value = "127.0.0.1:7000")]
    pub listen: SocketAddr,
    /// Serve the operator's console (a web page) at http://ADDR/ (off unless given; plaintext
    /// clusters only: under mutual TLS run `decree console` with an operator's or observer's
    /// certificate).
    #[arg(long, env = "DECREE_CONSOLE_LISTEN")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub console_listen: Option<SocketAddr>,
    /// Directory of the coordinator's durable log (created if missing).
    #[arg(long, env = "DECREE_DATA_DIR")]
    pub data_dir: PathBuf,
    /// Prepare deadline: votes not in by then abort the transaction.
    #[arg(long, env = "DECREE_PREPARE_TIMEOUT_MS", default_value_t = 2_000)]
    pub prepare_timeout_ms: u64,
    /// Deadline of a Commit (its RPC, or the message of the commit stream that
    /// carried it) before it counts as failed and is redelivered.
    #[arg(long, env = "DECREE_COMMIT_TIMEOUT_MS", default_value_t = 2_000)]
    pub commit_timeout_ms: u64,
    /// An interactive transaction not committed within this idle time aborts.
    #[arg(long, env = "DECREE_IDLE_TIMEOUT_MS", default_value_t = 30_000)]
    pub idle_timeout_ms: u64,
    /// First redelivery delay of a failed Commit; doubles per attempt.
    #[arg(long, env = "DECREE_REDELIVERY_BASE_MS", default_value_t = 50)]
    pub redelivery_base_ms: u64,
    /// Longest redelivery delay.
    #[arg(long, env = "DECREE_REDELIVERY_CAP_MS", default_value_t = 2_000)]
    pub redelivery_cap_ms: u64,
    /// Randomness of each redelivery delay d: none (exactly d), half (in
    /// [d/2, d]) or full (in [0, d]).
    #[arg(long, env = "DECREE_REDELIVERY_JITTER", value_enum, default_value_t = Jitter::Half)]
    pub redelivery_jitter: Jitter,
    /// Retry budget: most redeliveries per second to one participant (after a
    /// burst of as many), however many transactions owe it; the rest wait.
    #[arg(long, env = "DECREE_RETRY_BUDGET_PER_S", default_value_t = 500)]
    pub retry_budget_per_s: u32,
    /// Transactions in memory at once; beyond it new ones get RESOURCE_EXHAUSTED.
    #[arg(long, env = "DECREE_MAX_IN_FLIGHT", default_value_t = 10_000)]
    pub max_in_flight: usize,
    /// Largest gRPC message accepted, in bytes (and so the largest transaction).
    #[arg(long, env = "DECREE_MAX_MESSAGE_BYTES", default_value_t = decree_proto::MAX_MESSAGE_BYTES)]
    pub max_message_bytes: usize,
    /// On SIGTERM/SIGINT: how long to keep finishing transactions in flight
    /// (deciding them, delivering phase two) before exiting anyway.
    #[arg(long, env = "DECREE_SHUTDOWN_GRACE_MS", default_value_t = 10_000)]
    pub shutdown_grace_ms: u64,
    /// A participant not heard from within this window is listed as "down".
    #[arg(long, env = "DECREE_LIVENESS_MS", default_value_t = 3_000)]
    pub liveness_ms: u64,
    /// Ended outcomes kept for GetOutcome: at most about this many of the
    /// newest (older ones answer FORGOTTEN). Unfinished decisions are always kept.
    #[arg(long, env = "DECREE_RETAIN_ENDED", default_value_t = 1_000_000)]
    pub retain_ended: u64,
    /// And none older than this.
    #[arg(long, env = "DECREE_RETAIN_ENDED_MS", default_value_t = 3_600_000)]
    pub retain_ended_ms: u64,
    /// How often the window of ended outcomes is pruned.
    #[arg(long, env = "DECREE_PRUNE_INTERVAL_MS", default_value_t = 1_000)]
    pub prune_interval_ms: u64,
    /// Most keys one migration batch moves (one transaction over the members).
    #[arg(long, env = "DECREE_MIGRATION_BATCH_KEYS", default_value_t = 64)]
    pub migration_batch_keys: u32,
    /// This coordinator's id in its group (1, 2, ...): with --replicas, it
    /// runs as one replica of a coordinator group.
    #[arg(long, env = "DECREE_REPLICA_ID")]
    pub replica_id: Option<u64>,
    /// The group's replicas as ID=HOST:PORT (this one included), each the
    /// address its coordinator serves on, for clients and replicas alike.
    /// Used to bootstrap the group; afterwards the group's own membership
    /// (`decree coordinators add|remove`) is what counts.
    #[arg(long, env = "DECREE_REPLICAS", value_delimiter = ',')]
    pub replicas: Vec<String>,
    /// Make --replicas one new group. Done once, on one replica; refused on
    /// a replica that already belongs to a group.
    #[arg(long, env = "DECREE_BOOTSTRAP")]
    pub bootstrap: bool,
    /// A group's leader heartbeat interval.
    #[arg(long, env = "DECREE_HEARTBEAT_MS", default_value_t = 50)]
    pub heartbeat_ms: u64,
    /// A follower that hears no leader for a random time between this and
    /// twice this starts an election.
    #[arg(long, env = "DECREE_ELECTION_TIMEOUT_MS", default_value_t = 150)]
    pub election_timeout_ms: u64,
    #[command(flatten)]
    #[serde(flatten)]
    pub process: decree_runtime::serve::ProcessOptions,
}

/// A replica of a coordinator group, as configured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupConfig {
    pub id: u64,
    /// Every replica's id and HOST:PORT, this one's included.
    pub replicas: std::collections::BTreeMap<u64, String>,
    pub bootstrap: bool,
    pub timing: decree_replica::Timing,
}

impl Config {
    pub fn shutdown_grace(&self) -> std::time::Duration {
        std::time::Duration::from_millis(self.shutdown_grace_ms)
    }

    /// A configuration with defaults, for tests and embedding.
    pub fn new(data_dir: PathBuf) -> Self {
        Config {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            console_listen: None,
            data_dir,
            prepare_timeout_ms: 2_000,
            commit_timeout_ms: 2_000,
            idle_timeout_ms: 30_000,
            redelivery_base_ms: 50,
            redelivery_cap_ms: 2_000,
            redelivery_jitter: Jitter::Half,
            retry_budget_per_s: 500,
            max_in_flight: 10_000,
            max_message_bytes: decree_proto::MAX_MESSAGE_BYTES,
            liveness_ms: 3_000,
            shutdown_grace_ms: 10_000,
            retain_ended: 1_000_000,
            retain_ended_ms: 3_600_000,
            prune_interval_ms: 1_000,
            migration_batch_keys: 64,
            replica_id: None,
            replicas: Vec::new(),
            bootstrap: false,
            heartbeat_ms: 50,
            election_timeout_ms: 150,
            process: decree_runtime::serve::ProcessOptions::default(),
        }
    }

    /// Checks every value; the message names the option.
    pub fn validate(&self) -> Result<(), String> {
        if !(1..=100_000).contains(&self.migration_batch_keys) {
            return Err("--migration-batch-keys must be between 1 and 100000".into());
        }
        let positive = [
            ("--prepare-timeout-ms", self.prepare_timeout_ms),
            ("--commit-timeout-ms", self.commit_timeout_ms),
            ("--idle-timeout-ms", self.idle_timeout_ms),
            ("--redelivery-base-ms", self.redelivery_base_ms),
            ("--redelivery-cap-ms", self.redelivery_cap_ms),
            ("--retry-budget-per-s", self.retry_budget_per_s as u64),
            ("--liveness-ms", self.liveness_ms),
            ("--shutdown-grace-ms", self.shutdown_grace_ms),
            ("--max-in-flight", self.max_in_flight as u64),
            ("--retain-ended-ms", self.retain_ended_ms),
            ("--prune-interval-ms", self.prune_interval_ms),
        ];
        for (name, value) in positive {
            if value == 0 {
                return Err(format!("{name} must be greater than 0"));
            }
        }
        if self.redelivery_cap_ms < self.redelivery_base_ms {
            return Err("--redelivery-cap-ms must be at least --redelivery-base-ms".into());
        }
        if !(1024..=256 * 1024 * 1024).contains(&self.max_message_bytes) {
            return Err("--max-message-bytes must be between 1024 and 268435456".into());
        }
        self.process.validate()?;
        self.group_config()?;
        Ok(())
    }

    /// The group this coordinator is a replica of, if any.
    pub fn group(&self) -> Option<GroupConfig> {
        self.group_config().ok().flatten()
    }

    fn group_config(&self) -> Result<Option<GroupConfig>, String> {
        let (id, list) = match (self.replica_id, self.replicas.is_empty()) {
            (None, true) if self.bootstrap => {
                return Err("--bootstrap needs --replica-id and --replicas".into())
            }
            (None, true) => return Ok(None),
            (Some(_), true) => {
                return Err("--replica-id needs --replicas (the group's ID=HOST:PORT list)".into())
            }
            (None, false) => {
                return Err("--replicas needs --replica-id (this replica's id in the list)".into())
            }
            (Some(id), false) => (id, &self.replicas),
        };
        let mut replicas = std::collections::BTreeMap::new();
        for entry in list {
            let Some((rid, address)) = entry.split_once('=') else {
                return Err(format!("--replicas {entry:?}: expected ID=HOST:PORT"));
            };
            let rid: u64 = rid
                .trim()
                .parse()
                .ok()
                .filter(|r| *r >= 1)
                .ok_or_else(|| format!("--replicas {entry:?}: the id must be a number from 1"))?;
            let address = address.trim();
            let port = address.rsplit_once(':').and_then(|(host, port)| {
                (!host.is_empty()).then_some(())?;
                port.parse::<u16>().ok()
            });
            let Some(port) = port else {
                return Err(format!("--replicas {entry:?}: expected ID=HOST:PORT"));
            };
            if replicas.values().any(|a: &String| a == address) {
                return Err(format!("--replicas: {address} is listed twice"));
            }
            if replicas.insert(rid, address.to_owned()).is_some() {
                return Err(format!("--replicas: replica {rid} is listed twice"));
            }
            if rid == id && port != self.listen.port() {
                return Err(format!(
                    "--replicas names {address} for this replica ({id}), but --listen is {}",
                    self.listen
                ));
            }
        }
        if !replicas.contains_key(&id) {
            return Err(format!("--replicas does not list this replica (--replica-id {id})"));
        }
        if self.heartbeat_ms == 0 || self.election_timeout_ms <= self.heartbeat_ms * 2 {
            return Err(
                "--election-timeout-ms must be more than twice --heartbeat-ms (and that above 0)".into()
            );
        }
        let timing = decree_replica::Timing {
            heartbeat: Duration::from_millis(self.heartbeat_ms),
            election_min: Duration::from_millis(self.election_timeout_ms),
            election_max: Duration::from_millis(self.election_timeout_ms * 2),
        };
        Ok(Some(GroupConfig { id, replicas, bootstrap: self.bootstrap, timing }))
    }

    pub fn prepare_timeout(&self) -> Duration {
        Duration::from_millis(self.prepare_timeout_ms)
    }

    pub fn commit_timeout(&self) -> Duration {
        Duration::from_millis(self.commit_timeout_ms)
    }

    pub fn idle_timeout(&self) -> Duration {
        Duration::from_millis(self.idle_timeout_ms)
    }

    /// How much of the history of ended outcomes is kept.
    pub fn retention(&self) -> crate::retention::Retention {
        crate::retention::Retention {
            max_ended: self.retain_ended,
            max_age: Duration::from_millis(self.retain_ended_ms),
        }
    }

    pub fn prune_interval(&self) -> Duration {
        Duration::from_millis(self.prune_interval_ms)
    }

    pub fn redelivery(&self) -> Backoff {
        Backoff {
            base: Duration::from_millis(self.redelivery_base_ms),
            cap: Duration::from_millis(self.redelivery_cap_ms),
            jitter: self.redelivery_jitter,
        }
    }
}
