//! The participant's configuration: flags, each also an environment variable.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// What a participant stores its data in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// The reference KV store, in the participant's own RocksDB log.
    Kv,
    /// A table in PostgreSQL; branches are PostgreSQL prepared transactions.
    Postgres,
}

/// What a participant enrolls as.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// A member of the keyspace: holds the keys the ring gives it once it is
    /// in the ring (`decree ring add`, or --join).
    Member,
    /// A named service: gets only the branches addressed to it by name, never routed keys.
    Service,
}

/// Largest --kv-cache-mib: 1 TiB.
const MAX_KV_CACHE_MIB: u64 = 1 << 20;

#[derive(Debug, Clone, clap::Args, serde::Serialize)]
pub struct Config {
    /// Address to serve gRPC on (Participant and Kv services).
    #[arg(long, env = "DECREE_LISTEN", default_value = "127.0.0.1:7001")]
    pub listen: SocketAddr,
    /// Directory of the participant's durable log and data (created if missing).
    #[arg(long, env = "DECREE_DATA_DIR")]
    pub data_dir: PathBuf,
    /// The coordinator's URL, e.g. http://127.0.0.1:7000; for a coordinator
    /// group, every replica's, separated by commas (requests follow the leader).
    #[arg(long, env = "DECREE_COORDINATOR")]
    pub coordinator: String,
    /// The name this participant enrolls under: 1-64 of [A-Za-z0-9_.-].
    #[arg(long, env = "DECREE_NAME")]
    pub name: String,
    /// The URL the coordinator and clients reach this participant at
    /// (default: http://<listen>).
    #[arg(long, env = "DECREE_ADVERTISE_URL")]
    pub advertise_url: Option<String>,
    /// Interval of heartbeats to the coordinator.
    #[arg(long, env = "DECREE_HEARTBEAT_MS", default_value_t = 500)]
    pub heartbeat_ms: u64,
    /// A prepared branch undecided for this long asks the coordinator for its outcome.
    #[arg(long, env = "DECREE_IN_DOUBT_AFTER_MS", default_value_t = 1_000)]
    pub in_doubt_after_ms: u64,
    /// How often in-doubt branches are checked.
    #[arg(long, env = "DECREE_RESOLVE_INTERVAL_MS", default_value_t = 250)]
    pub resolve_interval_ms: u64,
    /// How long a lock request (a Prepare, or interactive work) may wait for
    /// keys another transaction holds. Who may wait follows a rule under which
    /// no deadlock can form (wait-die among interactive work); a request that
    /// may not wait, or waited this long, is refused ("lock conflict"). 0: never wait.
    #[arg(long, env = "DECREE_LOCK_WAIT_MS", default_value_t = 100)]
    pub lock_wait_ms: u64,
    /// How long a read of a locked key waits for the lock to go (so a client
    /// reads its own committed writes); after that it reads what is committed here.
    #[arg(long, env = "DECREE_READ_WAIT_MS", default_value_t = 1_000)]
    pub read_wait_ms: u64,
    /// An interactive transaction's branch with no work for this long (before
    /// its Prepare) is aborted here, its locks released: its client is gone.
    #[arg(long, env = "DECREE_IDLE_TIMEOUT_MS", default_value_t = 60_000)]
    pub idle_timeout_ms: u64,
    /// Decided txids remembered (tombstones: a late Prepare after an abort votes
    /// NO, a repeated one-phase question hears "committed"): at most this many...
    #[arg(long, env = "DECREE_TOMBSTONES", default_value_t = crate::engine::TOMBSTONES)]
    pub tombstones: usize,
    /// ...and none older than this. Below what was forgotten, a message for a
    /// txid this participant does not know is refused as stale.
    #[arg(long, env = "DECREE_TOMBSTONE_AGE_MS", default_value_t = 3_600_000)]
    pub tombstone_age_ms: u64,
    /// Largest gRPC message accepted, in bytes.
    #[arg(long, env = "DECREE_MAX_MESSAGE_BYTES", default_value_t = decree_proto::MAX_MESSAGE_BYTES)]
    pub max_message_bytes: usize,
    /// member (of the keyspace, routed keys) or service (branches by name
    /// only). Default: member for --backend kv, service for --backend postgres.
    #[arg(long, env = "DECREE_ROLE", value_enum)]
    pub role: Option<Role>,
    /// Join the ring once enrolled (a member only): the coordinator adds it,
    /// after the migration in progress if there is one, and moves its keys to it.
    #[arg(long, env = "DECREE_JOIN")]
    pub join: bool,
    /// Where the participant keeps its data: kv (its own RocksDB) or postgres (--pg-url).
    #[arg(long, env = "DECREE_BACKEND", value_enum, default_value_t = Backend::Kv)]
    pub backend: Backend,
    /// PostgreSQL connection URL for --backend postgres, e.g.
    /// postgres://user@127.0.0.1:5432/db (the server needs max_prepared_transactions > 0).
    #[arg(long, env = "DECREE_PG_URL")]
    pub pg_url: Option<String>,
    /// MiB of committed values the KV store keeps in memory in front of its
    /// log, least recently used out first (--backend kv); 0: none, every read
    /// goes to the log.
    #[arg(long, env = "DECREE_KV_CACHE_MIB", default_value_t = (crate::kv::CACHE_BYTES >> 20) as u64)]
    pub kv_cache_mib: u64,
    /// The table of --backend postgres (created if missing).
    #[arg(long, env = "DECREE_PG_TABLE", default_value = crate::postgres::DEFAULT_TABLE)]
    pub pg_table: String,
    #[command(flatten)]
    #[serde(flatten)]
    pub process: decree_runtime::serve::ProcessOptions,
}

impl Config {
    /// A configuration with defaults, for tests and embedding.
    pub fn new(data_dir: PathBuf, coordinator: String, name: String) -> Self {
        Config {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            data_dir,
            coordinator,
            name,
            advertise_url: None,
            heartbeat_ms: 500,
            in_doubt_after_ms: 1_000,
            resolve_interval_ms: 250,
            lock_wait_ms: 100,
            read_wait_ms: 1_000,
            idle_timeout_ms: 60_000,
            tombstones: crate::engine::TOMBSTONES,
            tombstone_age_ms: 3_600_000,
            max_message_bytes: decree_proto::MAX_MESSAGE_BYTES,
            role: None,
            join: false,
            backend: Backend::Kv,
            pg_url: None,
            kv_cache_mib: (crate::kv::CACHE_BYTES >> 20) as u64,
            pg_table: crate::postgres::DEFAULT_TABLE.to_owned(),
            process: decree_runtime::serve::ProcessOptions::default(),
        }
    }

    /// Checks every value; the message names the option.
    pub fn validate(&self) -> Result<(), String> {
        self.name.parse::<decree_proto::ParticipantName>().map_err(|e| format!("--name: {e}"))?;
        let each_url = self
            .coordinator
            .split(',')
            .map(str::trim)
            .all(|u| u.starts_with("http://") || u.starts_with("https://"));
        if !each_url {
            return Err(format!(
                "--coordinator {:?}: expected a URL like http://127.0.0.1:7000 (or several, comma-separated)",
                self.coordinator
            ));
        }
        if let Some(url) = &self.advertise_url {
            if !(url.starts_with("http://") || url.starts_with("https://")) {
                return Err(format!("--advertise-url {url:?}: expected a URL like http://127.0.0.1:7001"));
            }
        }
        for (name, value) in [
            ("--heartbeat-ms", self.heartbeat_ms),
            ("--in-doubt-after-ms", self.in_doubt_after_ms),
            ("--resolve-interval-ms", self.resolve_interval_ms),
            ("--idle-timeout-ms", self.idle_timeout_ms),
            ("--tombstones", self.tombstones as u64),
            ("--tombstone-age-ms", self.tombstone_age_ms),
        ] {
            if value == 0 {
                return Err(format!("{name} must be greater than 0"));
            }
        }
        if self.lock_wait_ms > 60_000 {
            return Err("--lock-wait-ms must be at most 60000".into());
        }
        if self.read_wait_ms > 60_000 {
            return Err("--read-wait-ms must be at most 60000".into());
        }
        if self.kv_cache_mib > MAX_KV_CACHE_MIB {
            return Err(format!("--kv-cache-mib must be at most {MAX_KV_CACHE_MIB}"));
        }
        if !(1024..=256 * 1024 * 1024).contains(&self.max_message_bytes) {
            return Err("--max-message-bytes must be between 1024 and 268435456".into());
        }
        match (self.backend, &self.pg_url) {
            (Backend::Postgres, None) => return Err("--pg-url is required with --backend postgres".into()),
            (Backend::Postgres, Some(url)) => {
                url.parse::<tokio_postgres::Config>().map_err(|e| format!("--pg-url {url:?}: {e}"))?;
            }
            (Backend::Kv, Some(_)) => return Err("--pg-url is only for --backend postgres".into()),
            (Backend::Kv, None) => {}
        }
        crate::postgres::check_table(&self.pg_table).map_err(|e| format!("--pg-table: {e}"))?;
        if self.join && self.role() == Role::Service {
            return Err("--join is for members of the ring; this participant's --role is service".into());
        }
        if self.backend == Backend::Postgres && self.role() == Role::Member {
            return Err("--role member needs --backend kv (keys move between members)".into());
        }
        self.process.validate()?;
        Ok(())
    }

    /// The role it enrolls with (see --role).
    pub fn role(&self) -> Role {
        self.role.unwrap_or(match self.backend {
            Backend::Kv => Role::Member,
            Backend::Postgres => Role::Service,
        })
    }

    pub fn kv_cache_bytes(&self) -> usize {
        (self.kv_cache_mib.min(MAX_KV_CACHE_MIB) as usize) << 20
    }

    pub fn heartbeat(&self) -> Duration {
        Duration::from_millis(self.heartbeat_ms)
    }

    pub fn in_doubt_after(&self) -> Duration {
        Duration::from_millis(self.in_doubt_after_ms)
    }

    pub fn lock_wait(&self) -> Duration {
        Duration::from_millis(self.lock_wait_ms)
    }

    pub fn read_wait(&self) -> Duration {
        Duration::from_millis(self.read_wait_ms)
    }

    pub fn idle_timeout(&self) -> Duration {
        Duration::from_millis(self.idle_timeout_ms)
    }

    pub fn resolve_interval(&self) -> Duration {
        Duration::from_millis(self.resolve_interval_ms)
    }

    pub fn tombstone_retention(&self) -> crate::engine::TombstoneRetention {
        crate::engine::TombstoneRetention {
            max: self.tombstones,
            max_age: Duration::from_millis(self.tombstone_age_ms),
        }
    }
}
