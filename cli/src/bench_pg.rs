//! The peer `decree bench --baseline postgres` runs beside decree: the same
//! workload as client-side two-phase commit over N PostgreSQL 15 servers it
//! starts itself. Account i lives on server i mod N. A transfer runs
//! `BEGIN; UPDATE ...; PREPARE TRANSACTION` on each server it touches (in
//! parallel), then `COMMIT PREPARED` on each; a transfer whose accounts are
//! both on one server is a plain `BEGIN; UPDATE ...; COMMIT` there, as decree
//! commits a one-participant transfer in one phase. Row-lock waits are bounded (`lock_timeout`
//! 100 ms, like decree's lock wait) since PostgreSQL cannot see a deadlock
//! across servers; a transfer that times out is rolled back and counts as
//! aborted. fsyncs are PostgreSQL's WAL syncs (`pg_stat_wal.wal_sync`);
//! "RPCs" are the statements sent. Unlike decree, the client keeps no
//! durable decision: a client crash between the prepares and the commits
//! leaves prepared transactions behind.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use decree_cluster::postgres::PgServer;
use indicatif::ProgressBar;
use rand::SeedableRng;
use tokio_postgres::{Client, NoTls};

use crate::bench::{drive, peak_rss_mib, BenchArgs, Done, Picker, Run, Workload};

pub struct Peer {
    servers: Vec<PgServer>,
    /// One connection per worker per server: `clients[worker][server]`.
    clients: Arc<Vec<Vec<Client>>>,
    statements: Arc<AtomicU64>,
}

async fn connect(url: &str) -> Result<Client, String> {
    let (client, connection) =
        tokio_postgres::connect(url, NoTls).await.map_err(|e| format!("postgres: {e}"))?;
    tokio::spawn(connection);
    Ok(client)
}

async fn wal_syncs(servers: &[PgServer]) -> Result<f64, String> {
    let mut total = 0.0;
    for server in servers {
        let client = connect(&server.url()).await?;
        let row =
            client.query_one("SELECT wal_sync FROM pg_stat_wal", &[]).await.map_err(|e| e.to_string())?;
        total += row.get::<_, i64>(0) as f64;
    }
    Ok(total)
}

impl Peer {
    pub async fn start(args: &BenchArgs) -> Result<Peer, String> {
        let workers = if args.rate.is_some() { 1024 } else { args.concurrency };
        let mut servers = Vec::new();
        for _ in 0..args.participants {
            let server = tokio::task::spawn_blocking(move || PgServer::start_with(workers + 20))
                .await
                .map_err(|e| e.to_string())?
                .map_err(|e| e.to_string())?;
            servers.push(server);
        }
        let n = servers.len();
        for (i, server) in servers.iter().enumerate() {
            let client = connect(&server.url()).await?;
            client
                .batch_execute("CREATE TABLE accounts (id int PRIMARY KEY, balance bigint NOT NULL)")
                .await
                .map_err(|e| e.to_string())?;
            let ids: Vec<i32> =
                (0..args.accounts.max(workers)).filter(|a| a % n == i).map(|a| a as i32).collect();
            client
                .execute("INSERT INTO accounts SELECT unnest($1::int[]), 0", &[&ids])
                .await
                .map_err(|e| e.to_string())?;
        }
        let mut clients = Vec::new();
        for _ in 0..workers {
            let mut row = Vec::new();
            for server in &servers {
                let client = connect(&server.url()).await?;
                client.batch_execute("SET lock_timeout = '100ms'").await.map_err(|e| e.to_string())?;
                row.push(client);
            }
            clients.push(row);
        }
        Ok(Peer { servers, clients: Arc::new(clients), statements: Arc::new(AtomicU64::new(0)) })
    }

    /// One measured round, with a second of warm-up first.
    pub async fn round(&mut self, args: &BenchArgs, bar: &ProgressBar) -> Result<Run, String> {
        let picker = Picker::new(args.accounts, args.zipf)?;
        let one = transfer(self.clients.clone(), self.statements.clone(), args.workload, picker);
        let one = Arc::new(one);
        let warm = one.clone();
        drive(args, std::time::Duration::from_secs(1), &ProgressBar::hidden(), move |w, s| warm(w, s)).await;
        let (syncs, statements) = (wal_syncs(&self.servers).await?, self.statements.load(Ordering::Relaxed));
        let measured = one.clone();
        let mut run = drive(args, args.duration, bar, move |w, s| measured(w, s)).await;
        run.fsyncs = Some(wal_syncs(&self.servers).await? - syncs);
        run.rpcs = Some((self.statements.load(Ordering::Relaxed) - statements) as f64);
        for (i, server) in self.servers.iter().enumerate() {
            if let Some(mib) = server.pid().and_then(peak_rss_mib) {
                run.rss_mib.insert(format!("postgres{}", i + 1), mib);
            }
        }
        let sum = self.sum().await?;
        if sum != 0 {
            return Err(format!("PostgreSQL baseline: the sum of balances is {sum}, not 0"));
        }
        Ok(run)
    }

    async fn sum(&self) -> Result<i64, String> {
        let mut total = 0;
        for server in &self.servers {
            let client = connect(&server.url()).await?;
            let row = client
                .query_one("SELECT coalesce(sum(balance), 0)::bigint FROM accounts", &[])
                .await
                .map_err(|e| e.to_string())?;
            total += row.get::<_, i64>(0);
        }
        Ok(total)
    }
}

/// One transaction of the workload as client-side 2PC.
fn transfer(
    clients: Arc<Vec<Vec<Client>>>,
    statements: Arc<AtomicU64>,
    workload: Workload,
    picker: Picker,
) -> impl Fn(usize, u64) -> std::pin::Pin<Box<dyn std::future::Future<Output = Done> + Send>> + Send + Sync {
    move |worker, seq| {
        let (clients, statements, picker) = (clients.clone(), statements.clone(), picker.clone());
        Box::pin(async move {
            let row = &clients[worker % clients.len()];
            let n = row.len();
            // (server, [(account, delta)])
            let mut parts: Vec<(usize, Vec<(i32, i64)>)> = Vec::new();
            let mut add = |account: usize, delta: i64| match parts.iter_mut().find(|(s, _)| *s == account % n)
            {
                Some((_, updates)) => updates.push((account as i32, delta)),
                None => parts.push((account % n, vec![(account as i32, delta)])),
            };
            match workload {
                Workload::Bank => {
                    let mut rng = rand::rngs::SmallRng::seed_from_u64(seq ^ ((worker as u64) << 32));
                    let (a, b) = picker.pair(&mut rng);
                    let (first, second) = if a < b { ((a, -1), (b, 1)) } else { ((b, 1), (a, -1)) };
                    add(first.0, first.1);
                    add(second.0, second.1);
                }
                Workload::Empty => {
                    // One row on each server: the worker's own.
                    for server in 0..n {
                        parts.push((server, vec![((worker * n + server) as i32, 0)]));
                    }
                }
            }
            if let [(server, updates)] = parts.as_slice() {
                // One server touched: a plain local transaction, as decree
                // commits a one-participant transfer in one phase.
                let mut sql = updates_sql(updates);
                sql.push_str("COMMIT");
                statements.fetch_add(1, Ordering::Relaxed);
                return match row[*server].batch_execute(&sql).await {
                    Ok(()) => Done::Committed,
                    Err(_) => {
                        statements.fetch_add(1, Ordering::Relaxed);
                        let _ = row[*server].batch_execute("ROLLBACK").await;
                        Done::Aborted
                    }
                };
            }
            let gid = format!("bench-{worker}-{seq}");
            let prepare = |server: usize, updates: Vec<(i32, i64)>| {
                let (client, gid, statements) = (&row[server], gid.clone(), statements.clone());
                async move {
                    let mut sql = updates_sql(&updates);
                    sql.push_str(&format!("PREPARE TRANSACTION '{gid}'"));
                    statements.fetch_add(1, Ordering::Relaxed);
                    match client.batch_execute(&sql).await {
                        Ok(()) => true,
                        Err(_) => {
                            statements.fetch_add(1, Ordering::Relaxed);
                            let _ = client.batch_execute("ROLLBACK").await;
                            false
                        }
                    }
                }
            };
            let servers: Vec<usize> = parts.iter().map(|(s, _)| *s).collect();
            let votes = futures::future::join_all(parts.into_iter().map(|(s, u)| prepare(s, u))).await;
            let all_yes = votes.iter().all(|v| *v);
            let verb = if all_yes { "COMMIT" } else { "ROLLBACK" };
            let sql = format!("{verb} PREPARED '{gid}'");
            let finish = servers.iter().zip(&votes).filter(|(_, prepared)| **prepared).map(|(server, _)| {
                statements.fetch_add(1, Ordering::Relaxed);
                row[*server].batch_execute(&sql)
            });
            let finished = futures::future::join_all(finish).await;
            match (all_yes, finished.iter().all(Result::is_ok)) {
                (true, true) => Done::Committed,
                (false, true) => Done::Aborted,
                (_, false) => Done::Error,
            }
        })
    }
}

/// `BEGIN;` and one UPDATE per account: a transaction left open.
fn updates_sql(updates: &[(i32, i64)]) -> String {
    let mut sql = String::from("BEGIN;");
    for (id, delta) in updates {
        sql.push_str(&format!("UPDATE accounts SET balance = balance + {delta} WHERE id = {id};"));
    }
    sql
}
