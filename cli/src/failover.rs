//! `decree bench --coordinators 3 --kill-leader N`: the group's failover
//! under load. The workload runs while the group's leader is killed with
//! SIGKILL every `--kill-every` (and restarted, so the next kill finds three
//! replicas again); each failover's gap is the time from the kill to the
//! first transaction committed after it, as the clients see it. At the end:
//! how many transactions' clients heard neither committed nor aborted.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use decree_client::Client;
use indicatif::ProgressBar;
use serde_json::{json, Value};

use crate::bench::{decree_txn, drive, histogram, round, BenchArgs, Done, Local, Picker};

/// How long a failover may take before the run gives up on it.
const GIVE_UP: Duration = Duration::from_secs(30);

pub(crate) async fn run(
    args: &BenchArgs,
    local: &mut Local,
    client: &Client,
    say: &impl Fn(String),
) -> Result<Value, String> {
    let participants: Vec<String> =
        client.participants().await.map_err(|e| e.to_string())?.into_iter().map(|p| p.name).collect();
    let txn = Arc::new(decree_txn(
        client.clone(),
        args.workload,
        participants,
        Picker::new(args.accounts, args.zipf)?,
    ));
    let started = Instant::now();
    // Each committed transaction's start and end, in microseconds from `started`.
    let commits = Arc::new(Mutex::new(Vec::<(u64, u64)>::new()));
    let load = {
        let (args, txn, commits) = (args.clone(), txn.clone(), commits.clone());
        // Long enough for every kill, each waiting for the group to be whole again.
        let duration = (args.kill_every + Duration::from_secs(2)) * (args.kill_leader as u32 + 1);
        tokio::spawn(async move {
            drive(&args, duration, &ProgressBar::hidden(), move |worker, seq| {
                let (txn, commits) = (txn.clone(), commits.clone());
                async move {
                    let begun = started.elapsed().as_micros() as u64;
                    let done = txn(worker, seq).await;
                    if done == Done::Committed {
                        let end = started.elapsed().as_micros() as u64;
                        commits.lock().unwrap_or_else(|p| p.into_inner()).push((begun, end));
                    }
                    done
                }
            })
            .await
        })
    };
    let (mut gaps, mut elections) = (histogram(), histogram());
    let (mut each, mut each_elected) = (Vec::new(), Vec::new());
    let mut next = started + args.kill_every;
    for kill in 1..=args.kill_leader {
        tokio::time::sleep_until(next.into()).await;
        let leader = local.cluster.leader(GIVE_UP).await.map_err(|e| e.to_string())?;
        let at = started.elapsed().as_micros() as u64;
        local.cluster.kill(leader);
        // Beside the gap, the time until another replica leads and
        // coordinates: the election's share of it, the rest being the
        // clients finding that leader and its first commit.
        let elected = async {
            let next = local.cluster.leader_other_than(Some(leader), GIVE_UP).await;
            next.map(|_| started.elapsed().as_micros() as u64 - at).map_err(|e| e.to_string())
        };
        // The first commit of a transaction that started after the kill.
        let deadline = Instant::now() + GIVE_UP;
        let first = async {
            loop {
                let first = commits
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .iter()
                    .filter(|(b, _)| *b > at)
                    .map(|(_, e)| *e)
                    .min();
                if let Some(end) = first {
                    break Ok(end);
                }
                if Instant::now() > deadline {
                    return Err(format!("no commit within {GIVE_UP:?} of killing the leader ({leader:?})"));
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        };
        let (elected_us, first) = tokio::join!(elected, first);
        let (elected_us, gap_us) = (elected_us?, first? - at);
        let _ = gaps.record(gap_us.max(1));
        let _ = elections.record(elected_us.max(1));
        each.push(round(gap_us as f64 / 1000.0));
        each_elected.push(round(elected_us as f64 / 1000.0));
        say(format!(
            "  kill {kill}/{}: {leader:?} killed; a new leader coordinates after {:.0} ms, next commit after {:.0} ms",
            args.kill_leader,
            elected_us as f64 / 1000.0,
            gap_us as f64 / 1000.0
        ));
        local.cluster.restart(leader).map_err(|e| e.to_string())?;
        local.cluster.wait_serving(leader, GIVE_UP).await.map_err(|e| e.to_string())?;
        // Each kill finds the group whole: three replicas, none behind.
        whole(local).await?;
        next = (started + args.kill_every * (kill as u32 + 1)).max(Instant::now() + Duration::from_secs(1));
    }
    let run = load.await.map_err(|e| e.to_string())?;
    let ms = |h: &hdrhistogram::Histogram<u64>, q: f64| round(h.value_at_quantile(q) as f64 / 1000.0);
    Ok(json!({
        "kills": args.kill_leader,
        "gaps_ms": each,
        "gap_p50_ms": ms(&gaps, 0.5),
        "gap_p99_ms": ms(&gaps, 0.99),
        "gap_max_ms": round(gaps.max() as f64 / 1000.0),
        "elected_ms": each_elected,
        "elected_p50_ms": ms(&elections, 0.5),
        "elected_p99_ms": ms(&elections, 0.99),
        "committed": run.committed,
        "aborted": run.aborted,
        "unknown": run.errors,
    }))
}

/// Waits until the group has three replicas again and none lags its leader.
async fn whole(local: &Local) -> Result<(), String> {
    use decree_client::v1;
    decree_cluster::poll(GIVE_UP, "the group whole again", || async {
        let leader = local.cluster.leader(GIVE_UP).await.ok()?;
        let endpoint = tonic::transport::Endpoint::from_shared(local.cluster.url_of(leader)).ok()?;
        let channel = decree_tls::connect(endpoint).await.ok()?;
        let status =
            v1::group_client::GroupClient::new(channel).get_group(v1::GetGroupRequest {}).await.ok()?;
        let members = &status.get_ref().members;
        let caught_up = members.iter().all(|m| {
            m.voter && if m.replication_known { m.lag <= 100 } else { m.id == status.get_ref().replica_id }
        });
        (members.len() >= 3 && caught_up).then_some(())
    })
    .await
    .map_err(|e| e.to_string())
}

/// `decree demo --ha`: kills the group's leader twice while the demo's
/// transfers run, printing each failover: the time to a new leader that
/// coordinates, the branches in doubt at the participants right after the
/// kill, and the time until none is (every one decided by the new leader).
pub(crate) async fn demo_schedule(
    cluster: Arc<tokio::sync::Mutex<decree_cluster::Cluster>>,
    bar: ProgressBar,
) -> Result<String, String> {
    let urls: Vec<String> = {
        let cluster = cluster.lock().await;
        (0..cluster.participant_count())
            .map(|i| cluster.url_of(decree_cluster::NodeId::Participant(i)))
            .collect()
    };
    let mut worst = Duration::ZERO;
    for kill in 1..=2 {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let mut group = cluster.lock().await;
        let leader = group.leader(GIVE_UP).await.map_err(|e| e.to_string())?;
        let killed = Instant::now();
        group.kill(leader);
        // The branches in doubt now: prepared, their coordinator gone.
        let doubted: std::collections::BTreeSet<(String, String)> =
            match decree_client::in_doubt_at_urls(&urls).await {
                Ok((branches, _)) => branches.into_iter().map(|b| (b.participant, b.txid)).collect(),
                Err(_) => Default::default(),
            };
        let next = group.leader(GIVE_UP).await.map_err(|e| e.to_string())?;
        let elected = killed.elapsed();
        worst = worst.max(elected);
        // Decided: none of them is in doubt any more (new ones come and go under the load).
        let decided = decree_cluster::poll(GIVE_UP, "every branch in doubt decided", || {
            let (urls, doubted) = (urls.clone(), &doubted);
            async move {
                let (branches, unreachable) = decree_client::in_doubt_at_urls(&urls).await.ok()?;
                let left =
                    branches.iter().filter(|b| doubted.contains(&(b.participant.clone(), b.txid.clone())));
                (left.count() == 0 && unreachable.is_empty()).then_some(())
            }
        })
        .await;
        let all = match decided {
            Ok(()) => format!("all decided after {} ms", killed.elapsed().as_millis()),
            Err(_) => "NOT all decided".to_owned(),
        };
        crate::demo::say(
            &bar,
            format!(
                "  failover {kill}: leader {leader:?} killed; {next:?} leads and coordinates after {} ms; \
                 {} branches were in doubt; {all}",
                elected.as_millis(),
                doubted.len()
            ),
        );
        group.restart(leader).map_err(|e| e.to_string())?;
        group.wait_serving(leader, GIVE_UP).await.map_err(|e| e.to_string())?;
        crate::demo::say(&bar, format!("  {leader:?} restarted: it rejoins as a follower"));
    }
    tokio::time::sleep(Duration::from_millis(1000)).await;
    bar.finish_and_clear();
    Ok(format!("2 leader kills; the longest took {} ms to a new leader that coordinates", worst.as_millis()))
}
