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
    /// Directory of the coordinator's durable log (created if missing).
    #[arg(long, env = "DECREE_DATA_DIR")]
    pub data_dir: PathBuf,
    /// Prepare deadline: votes not in by then abort the transaction.
    #[arg(long, env = "DECREE_PREPARE_TIMEOUT_MS", default_value_t = 2_000)]
    pub prepare_timeout_ms: u64,
    /// Deadline of one Commit RPC before it counts as failed and is redelivered.
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
    #[command(flatten)]
    #[serde(flatten)]
    pub process: decree_runtime::serve::ProcessOptions,
}

impl Config {
    pub fn shutdown_grace(&self) -> std::time::Duration {
        std::time::Duration::from_millis(self.shutdown_grace_ms)
    }

    /// A configuration with defaults, for tests and embedding.
    pub fn new(data_dir: PathBuf) -> Self {
        Config {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
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
        Ok(())
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
