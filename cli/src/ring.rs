//! `decree ring`: the ring and its migration; `decree ring add|remove|weight`
//! change it, and follow the migration with a progress bar until it is done.

use std::time::{Duration, Instant};

use decree_client::{v1, Client, RingChange, Routing};
use serde_json::json;

use crate::{Failure, Target};

#[derive(clap::Args)]
pub(crate) struct RingArgs {
    #[command(subcommand)]
    action: Option<RingAction>,
    #[command(flatten)]
    target: Target,
}

impl RingArgs {
    pub fn tls(&self) -> &decree_tls::TlsArgs {
        &self.target.tls
    }
}

#[derive(clap::Subcommand)]
enum RingAction {
    /// Add an enrolled member participant to the ring; its share of the keys moves to it.
    Add {
        name: String,
        /// Its share relative to the others (1-64).
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=64))]
        weight: u32,
        #[command(flatten)]
        wait: Wait,
    },
    /// Drain a member: its keys move to the others, then it leaves the ring (and may be stopped).
    Remove {
        name: String,
        #[command(flatten)]
        wait: Wait,
    },
    /// Change a member's weight (its share of the keys).
    Weight {
        name: String,
        weight: u32,
        #[command(flatten)]
        wait: Wait,
    },
}

#[derive(clap::Args)]
struct Wait {
    /// Return once the change is recorded, without following its migration.
    #[arg(long)]
    no_wait: bool,
}

pub(crate) async fn run(args: RingArgs) -> Result<(), Failure> {
    let client = Client::connect(&args.target.coordinator).await?;
    let (change, wait) = match args.action {
        None => return show(&client, args.target.json).await,
        Some(RingAction::Add { name, weight, wait }) => (RingChange::Add { name, weight }, wait),
        Some(RingAction::Remove { name, wait }) => (RingChange::Remove { name }, wait),
        Some(RingAction::Weight { name, weight, wait }) => (RingChange::Weight { name, weight }, wait),
    };
    let routing = client.change_ring(change).await.map_err(refused)?;
    if !args.target.json {
        println!(
            "ring epoch {}: migration to {} started",
            routing.epoch,
            routing.settled().names().join(", ")
        );
    }
    if !wait.no_wait {
        follow(&client, args.target.json).await?;
    }
    if args.target.json {
        return show(&client, true).await;
    }
    Ok(())
}

/// A refused change's message, as the coordinator gave it (it names the reason).
fn refused(err: decree_client::ClientError) -> Failure {
    match err {
        decree_client::ClientError::Status(status) => Failure(format!("refused: {}", status.message())),
        other => Failure(other.to_string()),
    }
}

/// Follows the migration until it ends: a progress bar of keys moved.
async fn follow(client: &Client, quiet: bool) -> Result<(), Failure> {
    let bar = if quiet { indicatif::ProgressBar::hidden() } else { indicatif::ProgressBar::new(0) };
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} keys  {msg}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let started = Instant::now();
    let mut last = None;
    loop {
        let ring = client.ring_status().await?;
        match &ring.migration {
            None => {
                bar.finish_and_clear();
                break;
            }
            Some(m) => {
                bar.set_length(m.moved_keys + m.remaining_keys);
                bar.set_position(m.moved_keys);
                let rate = m.moved_keys as f64 / started.elapsed().as_secs_f64().max(0.001);
                let error = if m.last_error.is_empty() {
                    String::new()
                } else {
                    format!("  (retrying: {})", m.last_error)
                };
                bar.set_message(format!(
                    "{} bytes, {} batches, {rate:.0} keys/s{error}",
                    m.moved_bytes, m.batches
                ));
                last = Some(m.clone());
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let ring = client.ring_status().await?;
    let routing = ring.routing.as_ref().map(Routing::from_wire).unwrap_or_default();
    let done = ring.last.or(last).unwrap_or_default();
    if !quiet {
        let seconds = done.finished_unix_ms.saturating_sub(done.started_unix_ms) as f64 / 1000.0;
        println!(
            "ring epoch {}: {} ({} keys, {} bytes moved in {} batches, {seconds:.1} s)",
            routing.epoch,
            routing.current.names().join(", "),
            done.moved_keys,
            done.moved_bytes,
            done.batches
        );
    }
    Ok(())
}

async fn show(client: &Client, as_json: bool) -> Result<(), Failure> {
    let ring = client.ring_status().await?;
    let routing = ring.routing.as_ref().map(Routing::from_wire).unwrap_or_default();
    let max_over_mean = routing.current.max_over_mean();
    if as_json {
        let members: Vec<_> = ring
            .members
            .iter()
            .map(|m| json!({ "name": m.name, "weight": m.weight, "share": m.share, "target_share": m.target_share }))
            .collect();
        let migration = ring.migration.as_ref().map(migration_json);
        let last = ring.last.as_ref().map(migration_json);
        println!(
            "{}",
            json!({ "epoch": routing.epoch, "members": members, "max_over_mean": max_over_mean,
                    "vnodes": routing.current.vnodes(), "migration": migration, "queued": ring.queued,
                    "last_migration": last })
        );
        return Ok(());
    }
    println!(
        "epoch {}  {} members  max/mean share {:.3}  ({} points per unit of weight)",
        routing.epoch,
        routing.current.names().len(),
        max_over_mean,
        routing.current.vnodes()
    );
    for m in &ring.members {
        let target = if ring.migration.is_some() {
            format!("  -> {:.1}%", m.target_share * 100.0)
        } else {
            String::new()
        };
        println!("  {}\tweight {}\t{:.1}%{target}", m.name, m.weight, m.share * 100.0);
    }
    match &ring.migration {
        None => println!("no migration in progress"),
        Some(m) => {
            let elapsed = now_ms().saturating_sub(m.started_unix_ms) as f64 / 1000.0;
            println!(
                "migration: {}: {} keys ({} bytes) moved in {} batches, about {} to go, {elapsed:.1} s{}",
                m.change,
                m.moved_keys,
                m.moved_bytes,
                m.batches,
                m.remaining_keys,
                if m.last_error.is_empty() {
                    String::new()
                } else {
                    format!("; last batch failed: {}", m.last_error)
                }
            );
        }
    }
    if !ring.queued.is_empty() {
        println!("queued to join: {}", ring.queued.join(", "));
    }
    Ok(())
}

fn migration_json(m: &v1::Migration) -> serde_json::Value {
    json!({ "change": m.change, "moved_keys": m.moved_keys, "moved_bytes": m.moved_bytes,
            "batches": m.batches, "remaining_keys": m.remaining_keys, "started_unix_ms": m.started_unix_ms,
            "finished_unix_ms": m.finished_unix_ms, "last_error": m.last_error })
}

fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}
