//! PostgreSQL as a participant: a [`Resource`] whose branches are PostgreSQL
//! prepared transactions.
//!
//! # Table layout
//!
//! Branch payloads are the KV participant's ([`v1::KvBatch`]: put, delete, add,
//! expect), applied to one table, created at start if missing:
//!
//! ```sql
//! CREATE TABLE IF NOT EXISTS decree_kv (key text PRIMARY KEY, value bytea NOT NULL);
//! ```
//!
//! (`--pg-table` names another.) The table belongs to decree: the participant's
//! locks keep two branches off one key, and nothing else should write it.
//!
//! # Protocol
//!
//! - Prepare: `BEGIN`; read the branch's rows `FOR UPDATE`; apply the ops;
//!   write the changed rows; `PREPARE TRANSACTION 'decree:<participant>:<txid>'`.
//!   Only then is the branch `Ready`, and only after the library's prepared
//!   record is synced does it vote YES. An expect that fails, or any error,
//!   rolls the PostgreSQL transaction back and votes NO.
//! - Commit: `COMMIT PREPARED`; Abort: `ROLLBACK PREPARED`. A gid that no
//!   longer exists means the step was done before a crash: success.
//! - Recovery: prepared transactions of this participant in `pg_prepared_xacts`
//!   that have no prepared record in the library's log never voted YES (the
//!   crash came between `PREPARE TRANSACTION` and the synced record): they are
//!   rolled back. The others are in doubt and wait for the coordinator.

use std::collections::{HashMap, HashSet};

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use decree_proto::{v1, TxId};
use decree_runtime::Write;
use tokio_postgres::error::SqlState;
use tokio_postgres::NoTls;
use tracing::{info, warn};

use crate::engine::Validated;
use crate::kv::{self, Overlay};
use crate::resource::Resource;

/// Most connections to PostgreSQL (each branch holds one while it prepares).
const POOL_SIZE: usize = 32;

/// Default table of the PostgreSQL participant.
pub const DEFAULT_TABLE: &str = "decree_kv";

/// A branch store in one PostgreSQL table.
#[derive(Clone)]
pub struct Postgres {
    pool: Pool,
    table: String,
    /// `decree:<participant>:`; a branch's gid is this and its txid.
    gid_prefix: String,
}

fn pg_error(err: impl std::fmt::Display) -> String {
    format!("postgres: {err}")
}

/// Checks a table name: a plain lower-case SQL identifier.
pub fn check_table(name: &str) -> Result<(), String> {
    let mut chars = name.chars();
    let first_ok = chars.next().is_some_and(|c| c.is_ascii_lowercase() || c == '_');
    if first_ok && name.len() <= 63 && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
    {
        Ok(())
    } else {
        Err(format!("{name:?} is not a table name (1-63 of [a-z0-9_], not starting with a digit)"))
    }
}

impl Postgres {
    /// Connects, checks that prepared transactions are enabled, and creates the
    /// table if it is missing. `participant` is the name this participant enrolls under.
    pub async fn connect(url: &str, table: &str, participant: &str) -> Result<Postgres, String> {
        check_table(table)?;
        let config: tokio_postgres::Config = url.parse().map_err(|e| format!("--pg-url: {e}"))?;
        let manager =
            Manager::from_config(config, NoTls, ManagerConfig { recycling_method: RecyclingMethod::Fast });
        let pool = Pool::builder(manager).max_size(POOL_SIZE).build().map_err(pg_error)?;
        let pg = Postgres { pool, table: table.to_owned(), gid_prefix: format!("decree:{participant}:") };
        let client = pg.pool.get().await.map_err(pg_error)?;
        let row = client.query_one("SHOW max_prepared_transactions", &[]).await.map_err(pg_error)?;
        let max: String = row.get(0);
        if max.trim() == "0" {
            return Err("postgres: max_prepared_transactions is 0; set it above 0 to take part in 2PC".into());
        }
        let create =
            format!("CREATE TABLE IF NOT EXISTS {table} (key text PRIMARY KEY, value bytea NOT NULL)");
        client.batch_execute(&create).await.map_err(pg_error)?;
        Ok(pg)
    }

    fn gid(&self, txid: TxId) -> String {
        format!("{}{txid}", self.gid_prefix)
    }

    /// The committed values of `keys` (absent keys are `None`), in request order.
    pub async fn get(&self, keys: &[String]) -> Result<Vec<v1::KeyValue>, String> {
        let client = self.pool.get().await.map_err(pg_error)?;
        let query = format!("SELECT key, value FROM {} WHERE key = ANY($1)", self.table);
        let rows = client.query(&query, &[&keys]).await.map_err(pg_error)?;
        let mut found: HashMap<String, Vec<u8>> = rows.into_iter().map(|r| (r.get(0), r.get(1))).collect();
        Ok(keys.iter().map(|k| v1::KeyValue { key: k.clone(), value: found.remove(k) }).collect())
    }

    /// Runs the branch inside a PostgreSQL transaction on `client` and
    /// prepares it. On an error the caller rolls back.
    async fn run_branch(
        &self,
        client: &tokio_postgres::Client,
        txid: TxId,
        payload: &[u8],
    ) -> Result<Validated, String> {
        let ops = kv::ops(payload)?;
        client.batch_execute("BEGIN; SET LOCAL lock_timeout = '5s'").await.map_err(pg_error)?;
        let select = format!("SELECT key, value FROM {} WHERE key = ANY($1) FOR UPDATE", self.table);
        let rows = client.query(&select, &[&kv::keys(&ops)]).await.map_err(pg_error)?;
        let committed: HashMap<String, Vec<u8>> = rows.into_iter().map(|r| (r.get(0), r.get(1))).collect();
        let mut overlay = Overlay::default();
        if let Err(reason) = overlay.apply(&ops, |key| Ok(committed.get(key).cloned())) {
            client.batch_execute("ROLLBACK").await.map_err(pg_error)?;
            return Ok(Validated::Refused { reason });
        }
        let writes = overlay.writes();
        if writes.is_empty() {
            client.batch_execute("ROLLBACK").await.map_err(pg_error)?;
            return Ok(Validated::ReadOnly);
        }
        let upsert = format!(
            "INSERT INTO {} (key, value) VALUES ($1, $2) ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value",
            self.table
        );
        let delete = format!("DELETE FROM {} WHERE key = $1", self.table);
        for (key, value) in &writes {
            match value {
                Some(value) => client.execute(&upsert, &[key, value]).await,
                None => client.execute(&delete, &[key]).await,
            }
            .map_err(pg_error)?;
        }
        // The gid is the participant name and the txid: both are checked to be
        // free of quotes before they get here.
        client.batch_execute(&format!("PREPARE TRANSACTION '{}'", self.gid(txid))).await.map_err(pg_error)?;
        Ok(Validated::Ready { redo: Vec::new() })
    }

    /// Runs `COMMIT PREPARED` or `ROLLBACK PREPARED` for `txid`; a gid that is
    /// gone was finished before.
    async fn finish(&self, verb: &str, txid: TxId) -> Result<(), String> {
        let client = self.pool.get().await.map_err(pg_error)?;
        match client.batch_execute(&format!("{verb} PREPARED '{}'", self.gid(txid))).await {
            Ok(()) => Ok(()),
            Err(err) if err.code() == Some(&SqlState::UNDEFINED_OBJECT) => Ok(()),
            Err(err) => Err(pg_error(err)),
        }
    }
}

#[async_trait::async_trait]
impl Resource for Postgres {
    fn keys(&self, payload: &[u8]) -> Result<Vec<String>, String> {
        Ok(kv::keys(&kv::ops(payload)?))
    }

    async fn prepare(&self, txid: TxId, payload: &[u8]) -> Validated {
        let client = match self.pool.get().await {
            Ok(client) => client,
            Err(err) => return Validated::Refused { reason: pg_error(err) },
        };
        match self.run_branch(&client, txid, payload).await {
            Ok(validated) => validated,
            Err(reason) => {
                // Whatever state the session is in, leave no transaction open.
                if client.batch_execute("ROLLBACK").await.is_err() {
                    let _ = deadpool_postgres::Object::take(client);
                }
                Validated::Refused { reason }
            }
        }
    }

    async fn commit(&self, txid: TxId, _redo: &[u8]) -> Result<Vec<Write>, String> {
        self.finish("COMMIT", txid).await?;
        Ok(Vec::new())
    }

    async fn abort(&self, txid: TxId) -> Result<(), String> {
        self.finish("ROLLBACK", txid).await
    }

    async fn recover(&self, prepared: &[TxId]) -> Result<(), String> {
        let keep: HashSet<String> = prepared.iter().map(|t| self.gid(*t)).collect();
        let client = self.pool.get().await.map_err(pg_error)?;
        let rows = client
            .query(
                "SELECT gid FROM pg_prepared_xacts WHERE database = current_database() AND starts_with(gid, $1)",
                &[&self.gid_prefix],
            )
            .await
            .map_err(pg_error)?;
        for row in rows {
            let gid: String = row.get(0);
            if keep.contains(&gid) {
                info!(%gid, "recovery: PostgreSQL branch prepared, in doubt");
                continue;
            }
            // Prepared in PostgreSQL but never voted YES: nobody can have decided commit.
            warn!(%gid, "recovery: rolling back a PostgreSQL branch that never voted YES");
            client.batch_execute(&format!("ROLLBACK PREPARED '{gid}'")).await.map_err(pg_error)?;
        }
        Ok(())
    }
}
