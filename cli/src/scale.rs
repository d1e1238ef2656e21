//! `decree bench --scale-at SECONDS:add=NAME` (repeatable; also `remove=NAME`):
//! the ring changes mid-run, and throughput and p99 are reported before,
//! during and after each migration.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use decree_client::{Client, RingChange};
use serde_json::{json, Value};

use crate::bench::{decree_txn, drive, histogram, BenchArgs, Done, Picker};

/// One ring change at a time into the run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ScaleAt {
    pub(crate) at: Duration,
    pub(crate) change: RingChange,
}

/// Parses `5s:add=p4`, `12:remove=p2`.
pub(crate) fn parse(text: &str) -> Result<ScaleAt, String> {
    let bad = || format!("{text:?}: expected SECONDS:add=NAME or SECONDS:remove=NAME, e.g. 5s:add=p4");
    let (at, change) = text.split_once(':').ok_or_else(bad)?;
    let at = decree_runtime::args::parse_duration(at).map_err(|e| format!("{text:?}: {e}"))?;
    let (op, name) = change.split_once('=').ok_or_else(bad)?;
    let name = name.to_owned();
    let change = match op {
        "add" => RingChange::Add { name, weight: 1 },
        "remove" => RingChange::Remove { name },
        _ => return Err(bad()),
    };
    Ok(ScaleAt { at, change })
}

/// Members to add that the local cluster must start outside the ring.
pub(crate) fn extra_members(args: &BenchArgs) -> usize {
    let mut names: Vec<&str> = args
        .scale_at
        .iter()
        .filter_map(|s| match &s.change {
            RingChange::Add { name, .. } => Some(name.as_str()),
            _ => None,
        })
        .collect();
    names.sort();
    names.dedup();
    names.len()
}

/// A transaction's end: when, how long it took, whether it committed.
type Sample = (Instant, u64, bool);

/// When each change's migration ran.
struct Window {
    what: String,
    started: Instant,
    ended: Option<Instant>,
    moved_keys: u64,
}

/// Runs the measured window with the ring changes of `--scale-at`, and
/// returns the report (throughput and p99 before, during and after each).
pub(crate) async fn run(args: &BenchArgs, client: &Client, say: &dyn Fn(String)) -> Result<Value, String> {
    let participants: Vec<String> = client.ring().names().to_vec();
    let picker = Picker::new(args.accounts, args.zipf)?;
    let txn = Arc::new(decree_txn(client.clone(), args.workload, participants, picker));
    let warm = txn.clone();
    drive(args, Duration::from_secs(1), &indicatif::ProgressBar::hidden(), move |w, s| warm(w, s)).await;
    let samples: Arc<Mutex<Vec<Sample>>> = Arc::new(Mutex::new(Vec::new()));
    let recorded = samples.clone();
    let measured = txn.clone();
    let one = move |worker: usize, seq: u64| {
        let (measured, recorded) = (measured.clone(), recorded.clone());
        async move {
            let begun = Instant::now();
            let done = measured(worker, seq).await;
            let sample = (Instant::now(), begun.elapsed().as_micros() as u64, done == Done::Committed);
            recorded.lock().unwrap_or_else(|p| p.into_inner()).push(sample);
            done
        }
    };
    let start = Instant::now();
    let schedule = {
        let (changes, client) = (args.scale_at.clone(), client.clone());
        tokio::spawn(async move {
            let mut windows = Vec::new();
            for scale in changes {
                tokio::time::sleep_until((start + scale.at).into()).await;
                let what = match &scale.change {
                    RingChange::Add { name, .. } => format!("add {name}"),
                    RingChange::Remove { name } => format!("remove {name}"),
                    RingChange::Weight { name, weight } => format!("weight {name} {weight}"),
                };
                let started = Instant::now();
                if let Err(err) = client.change_ring(scale.change.clone()).await {
                    return Err(format!("--scale-at {what}: {err}"));
                }
                let mut window = Window { what, started, ended: None, moved_keys: 0 };
                loop {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    let Ok(ring) = client.ring_status().await else { continue };
                    if ring.migration.is_none() {
                        window.ended = Some(Instant::now());
                        window.moved_keys = ring.last.map_or(0, |m| m.moved_keys);
                        break;
                    }
                }
                windows.push(window);
            }
            Ok(windows)
        })
    };
    drive(args, args.duration, &indicatif::ProgressBar::hidden(), one).await;
    let windows = schedule.await.map_err(|e| e.to_string())??;
    let samples = std::mem::take(&mut *samples.lock().unwrap_or_else(|p| p.into_inner()));
    let end = start + args.duration;
    let mut phases = Vec::new();
    let mut from = start;
    for window in &windows {
        let ended = window.ended.unwrap_or(end).min(end);
        phases.push(phase(&format!("before {}", window.what), &samples, from, window.started));
        let mut during = phase(&format!("during {}", window.what), &samples, window.started, ended);
        during["moved_keys"] = json!(window.moved_keys);
        during["migration_s"] = json!((ended - window.started).as_secs_f64());
        phases.push(during);
        from = ended;
    }
    phases.push(phase("after", &samples, from, end));
    for p in &phases {
        say(format!(
            "  {:<22} {:>8} tx/s  p99 {:>7} ms{}",
            p["phase"].as_str().unwrap_or(""),
            p["tx_per_s"],
            p["p99_ms"],
            p.get("moved_keys").map_or(String::new(), |k| format!(
                "  ({k} keys moved in {:.1} s)",
                p["migration_s"].as_f64().unwrap_or(0.0)
            ))
        ));
    }
    Ok(json!(phases))
}

/// Throughput and p99 of the transactions that ended in `[from, to)`.
fn phase(name: &str, samples: &[Sample], from: Instant, to: Instant) -> Value {
    let mut latency = histogram();
    let mut committed = 0u64;
    for (at, us, ok) in samples {
        if *at >= from && *at < to && *ok {
            committed += 1;
            let _ = latency.record((*us).max(1));
        }
    }
    let seconds = to.saturating_duration_since(from).as_secs_f64().max(1e-3);
    let p99 = if latency.is_empty() { 0.0 } else { latency.value_at_quantile(0.99) as f64 / 1000.0 };
    json!({ "phase": name, "seconds": (seconds * 100.0).round() / 100.0,
            "tx_per_s": (committed as f64 / seconds).round(), "p99_ms": (p99 * 100.0).round() / 100.0 })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scale_at_takes_seconds_and_a_change() {
        assert_eq!(
            parse("5s:add=p4").unwrap(),
            ScaleAt { at: Duration::from_secs(5), change: RingChange::Add { name: "p4".into(), weight: 1 } }
        );
        assert_eq!(parse("2:remove=p1").unwrap().change, RingChange::Remove { name: "p1".into() });
        for bad in ["5s", "x:add=p4", "5s:grow=p4", "5s:add"] {
            assert!(parse(bad).is_err(), "{bad}");
        }
    }
}
