//! What decree's coordinator and participant processes share at run time:
//!
//! - [`log`]: the RocksDB log with group commit, the only place that syncs;
//! - [`storage`]: the contract durable state is written against, with RocksDB and
//!   in-memory (crashable) implementations and their conformance suite;
//! - [`record`]: the checksummed envelope every durable record is stored in;
//! - [`crash`]: named crash points for crash tests;
//! - [`disk`]: free disk space against a reserve: new work refused, not a crash;
//! - [`backoff`]: capped exponential backoff with jitter;
//! - [`config_file`]: `--config FILE` (TOML) for the servers;
//! - [`args`]: durations as typed (`15s`, `500ms`) and bad values named with their option;
//! - [`serve`]: configuration, health and shutdown signals for the binaries;
//! - [`trace`]: logging, spans keyed by txid, and OTLP export (feature `otel`);
//! - [`metrics`]: the Prometheus exporter and the metric names both servers share.
//!
//! The protocol engines never import this crate's I/O: their runtimes do.

pub mod args;
pub mod backoff;
pub mod config_file;
pub mod crash;
pub mod disk;
pub mod log;
pub mod metrics;
pub mod record;
pub mod serve;
pub mod storage;
pub mod trace;

pub use log::{Durability, Log, LogError, Write};
pub use record::RecordError;
pub use storage::{MemLog, Storage};
