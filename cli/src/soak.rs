//! `decree bench --soak DURATION`: the load for a long time on a local
//! cluster, reported per period (throughput, p99, RSS and data size of every
//! process), then the restart time of the coordinator and of p1 after kill -9.
//! This is how bounded state is measured: what a day of uptime costs a restart.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use decree_client::Client;
use decree_cluster::NodeId;
use serde_json::{json, Value};

use crate::bench::{decree_txn, drive, progress, round, seed_accounts, BenchArgs, Local, Picker};

/// Bytes a directory takes on disk (allocated blocks, as `du` counts them).
fn disk_bytes(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let Ok(entries) = std::fs::read_dir(path) else { return 0 };
    entries
        .filter_map(Result::ok)
        .map(|entry| match entry.metadata() {
            Ok(meta) if meta.is_dir() => disk_bytes(&entry.path()),
            Ok(meta) => meta.blocks() * 512,
            Err(_) => 0,
        })
        .sum()
}

/// The resident set of a process now, in MiB (VmRSS).
fn rss_mib(pid: u32) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

/// Time from a kill -9 and restart of `node` until it answers gRPC again.
async fn restart_seconds(local: &mut Local, node: NodeId) -> Result<f64, String> {
    local.cluster.kill(node);
    let started = Instant::now();
    local.cluster.restart(node).map_err(|e| e.to_string())?;
    local.cluster.wait_serving(node, Duration::from_secs(600)).await.map_err(|e| e.to_string())?;
    Ok(started.elapsed().as_secs_f64())
}

pub(crate) async fn soak(args: &BenchArgs, total: Duration) -> Result<(), String> {
    if args.coordinator.is_some() {
        return Err("--soak runs its own local cluster (it kills and restarts it): drop --coordinator".into());
    }
    if args.soak_report.is_zero() || args.soak_report > total {
        return Err("--soak-report must be greater than 0 and at most --soak".into());
    }
    let say = |text: String| {
        if !args.json {
            println!("{text}");
        }
    };
    say(format!(
        "decree bench --soak: a coordinator and {} participants for {total:?} ...",
        args.participants
    ));
    let mut local = Local::start(args).await?;
    let client = Client::connect(&local.cluster.coordinator_url()).await.map_err(|e| e.to_string())?;
    seed_accounts(&client, args.accounts).await?;
    let participants: Vec<String> = local.cluster.participant_names();
    let txn = Arc::new(decree_txn(
        client.clone(),
        args.workload,
        participants,
        Picker::new(args.accounts, args.zipf)?,
    ));
    let names: Vec<(String, NodeId)> = local.metrics.iter().map(|(n, id, _)| (n.clone(), *id)).collect();
    say(format!(
        "{:>6} {:>9} {:>8} {:>12}  {}",
        "minute", "tx/s", "p99 ms", "transactions", "per process: RSS MiB / data MiB"
    ));
    let (started, mut transactions, mut offset, mut periods) = (Instant::now(), 0u64, 0u64, Vec::new());
    while started.elapsed() < total {
        let period = args.soak_report.min(total - started.elapsed());
        let (txn, base) = (txn.clone(), offset);
        let bar = progress(args, "soak");
        let run = drive(args, period, &bar, move |w, s| txn(w, s + base)).await;
        bar.finish_and_clear();
        offset += 1 << 32;
        transactions += run.committed + run.aborted;
        let mut processes = serde_json::Map::new();
        let mut line = Vec::new();
        for (name, id) in &names {
            let rss = local.cluster.pid(*id).and_then(rss_mib).unwrap_or(0.0);
            let data = disk_bytes(&local.cluster.dir().join(name)) as f64 / (1024.0 * 1024.0);
            line.push(format!("{name} {rss:.0}/{data:.1}"));
            processes.insert(name.clone(), json!({ "rss_mib": round(rss), "data_mib": round(data) }));
        }
        let p99 = run.latency.as_ref().map_or(0.0, |h| h.value_at_quantile(0.99) as f64 / 1000.0);
        let tx_per_s = run.committed as f64 / run.elapsed.as_secs_f64().max(1e-9);
        let minute = started.elapsed().as_secs_f64() / 60.0;
        say(format!("{minute:>6.1} {tx_per_s:>9.0} {p99:>8.1} {transactions:>12}  {}", line.join(", ")));
        periods.push(json!({
            "minute": round(minute),
            "tx_per_s": round(tx_per_s),
            "p99_ms": round(p99),
            "transactions": transactions,
            "errors": run.errors,
            "processes": Value::Object(processes),
        }));
    }
    say("kill -9 the coordinator, restart it on its data directory ...".into());
    let coordinator_s = restart_seconds(&mut local, NodeId::Coordinator).await?;
    local.cluster.wait_enrolled(Duration::from_secs(60)).await.map_err(|e| e.to_string())?;
    say(format!("  serving again after {coordinator_s:.3} s"));
    say("kill -9 p1, restart it on its data directory ...".into());
    let participant_s = restart_seconds(&mut local, NodeId::Participant(0)).await?;
    say(format!("  answering again after {participant_s:.3} s"));
    let out = json!({
        "transactions": transactions,
        "periods": periods,
        "restart": { "coordinator_s": round(coordinator_s), "participant_s": round(participant_s) },
    });
    if args.json {
        println!("{out}");
    }
    Ok(())
}
