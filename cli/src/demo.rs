//! `decree demo`: a local cluster of real processes, a bank workload, and a verdict.
//!
//! Starts a coordinator and participants (this same binary, with its
//! `coordinator` and `participant` subcommands) in a temporary directory,
//! seeds accounts, runs concurrent transfers (`add a=-x, add b=+x`), then
//! checks that the sum of balances is unchanged and that nothing is left in
//! doubt. With `--chaos`, processes are killed (SIGKILL, and once at the crash
//! point `coordinator.decision.after_log`) and restarted while it runs. With
//! `--elastic`, the ring grows from 3 to 5 members and shrinks back to 3 while
//! it runs, with the coordinator SIGKILLed during one of the migrations.
//! With `--ha`, the coordinator is a group of three replicas and its leader
//! is SIGKILLed twice while the transfers run; each failover is printed.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use decree_client::{KvOp, Outcome};
use decree_cluster::{Cluster, NodeId, Options};
use hdrhistogram::Histogram;
use indicatif::{ProgressBar, ProgressStyle};
use rand::Rng;
use tokio::sync::Mutex;

#[derive(clap::Args)]
pub struct DemoArgs {
    /// Participants to start.
    #[arg(long, default_value_t = 3)]
    participants: usize,
    /// Bank accounts.
    #[arg(long, default_value_t = 1_000)]
    accounts: usize,
    /// Starting balance of each account.
    #[arg(long, default_value_t = 1_000)]
    balance: i64,
    /// Transfers to run.
    #[arg(long, default_value_t = 3_000)]
    transfers: usize,
    /// Concurrent clients.
    #[arg(long, default_value_t = 16)]
    concurrency: usize,
    /// Kill and restart processes while the transfers run.
    #[arg(long, conflicts_with = "elastic")]
    chaos: bool,
    /// Grow the ring from 3 to 5 members and shrink it back while the transfers run,
    /// with the coordinator killed during a migration; every balance is read after each step.
    #[arg(long)]
    elastic: bool,
    /// Run the coordinator as a group of three replicas and SIGKILL its leader twice while
    /// the transfers run: each failover's time to a new leader, branches in doubt, all decided.
    #[arg(long, conflicts_with_all = ["chaos", "elastic"])]
    ha: bool,
    /// Seed of the chaos schedule (default: random; printed).
    #[arg(long, env = "DECREE_SEED")]
    seed: Option<u64>,
    /// Keep the cluster's directory (data and logs) afterwards.
    #[arg(long)]
    keep: bool,
    /// Mutual TLS on every connection, each process with a certificate of its own from a fresh
    /// development CA, and every RPC checked against a role policy.
    #[arg(long)]
    tls: bool,
    /// Where the operator's console is served while the demo runs (port 0: any free port).
    #[arg(long, default_value = "127.0.0.1:7080")]
    console_listen: std::net::SocketAddr,
    /// After the verdict, keep the cluster and its console running until Ctrl-C.
    #[arg(long)]
    keep_running: bool,
}

fn account(i: usize) -> String {
    format!("acct-{i:05}")
}

#[derive(Default)]
struct Tally {
    committed: u64,
    aborted: BTreeMap<String, u64>,
    unknown: u64,
}

pub async fn run(args: DemoArgs) -> i32 {
    match demo(args).await {
        Ok(true) => 0,
        Ok(false) => 1,
        Err(err) => {
            eprintln!("decree demo: {err}");
            2
        }
    }
}

/// Worker threads for each of the demo's processes: its share of the
/// machine's cores, which the local cluster and this process share (as
/// `decree bench` sizes its cluster); `None` when `DECREE_WORKER_THREADS`
/// says otherwise or each gets every core anyway.
pub(crate) fn share_of_cores(args: &DemoArgs) -> Option<u16> {
    if std::env::var_os("DECREE_WORKER_THREADS").is_some() {
        return None;
    }
    let participants = if args.elastic { ELASTIC_MEMBERS } else { args.participants };
    let coordinators = if args.ha { 3 } else { 1 };
    decree_runtime::args::share_of_cores(participants + coordinators + 1)
}

async fn demo(args: DemoArgs) -> Result<bool, String> {
    if args.participants == 0 || args.accounts < 2 || args.concurrency == 0 {
        return Err("need --participants >= 1, --accounts >= 2 and --concurrency >= 1".into());
    }
    let binary = std::env::current_exe().map_err(|e| e.to_string())?;
    let participants = if args.elastic { ELASTIC_MEMBERS } else { args.participants };
    let mut options = Options::new(participants);
    options.binary = Some(binary);
    if args.ha {
        options.coordinators = 3;
    }
    options.keep_dir = args.keep;
    let pki = match args.tls {
        true => {
            let dir =
                tempfile::Builder::new().prefix("decree-demo-certs-").tempdir().map_err(|e| e.to_string())?;
            options.tls = Some(dir.path().to_owned());
            Some(dir)
        }
        false => None,
    };
    // Short deadlines keep the demo moving when chaos takes a process away.
    options.coordinator_args =
        vec!["--prepare-timeout-ms".into(), "1000".into(), "--commit-timeout-ms".into(), "500".into()];
    if args.elastic {
        // Three members to start with; p4 and p5 wait outside the ring. Small
        // batches make each migration long enough to kill the coordinator in one.
        options.join_first = Some(3);
        options.coordinator_args.extend(["--migration-batch-keys".into(), "32".into()]);
    }
    if let Some(n) = share_of_cores(&args) {
        let flag = ["--worker-threads".to_owned(), n.to_string()];
        options.coordinator_args.extend(flag.clone());
        options.participant_args.extend(flag);
    }
    let policy = decree_runtime::log::writer_policy().flag();
    options.coordinator_args.extend(policy.clone());
    options.participant_args.extend(policy);
    match args.ha {
        true => {
            println!("decree demo: starting a group of 3 coordinators and {participants} participants ...")
        }
        false => println!("decree demo: starting a coordinator and {participants} participants ..."),
    }
    let cluster = Cluster::start(options).await.map_err(|e| e.to_string())?;
    println!("  directory {}", cluster.dir().display());
    if let Some(pki) = &pki {
        println!(
            "  mutual TLS: each process has its own certificate; CA and role policy in {} \
             (this demo speaks as `harness`: client, operator, observer)",
            pki.path().display()
        );
        println!("  a plaintext client: {}", plaintext_refused(&cluster).await);
    }
    let client = cluster.client().await.map_err(|e| e.to_string())?;
    for p in client.participants().await.map_err(|e| e.to_string())? {
        println!("  participant {} at {} ({})", p.name, p.address, p.state);
    }
    console(&cluster, args.console_listen, args.keep_running).await;

    println!("seeding {} accounts with {} each ...", args.accounts, args.balance);
    for chunk in (0..args.accounts).collect::<Vec<_>>().chunks(50) {
        let ops = chunk
            .iter()
            .map(|i| KvOp::Put { key: account(*i), value: args.balance.to_string().into_bytes() })
            .collect();
        let result = client.transact(ops).await.map_err(|e| e.to_string())?;
        if result.outcome != Outcome::Committed {
            return Err(format!("seeding aborted: {}", result.reason));
        }
    }
    let expected = args.balance * args.accounts as i64;

    let cluster = Arc::new(Mutex::new(cluster));
    let chaos_log = Arc::new(std::sync::Mutex::new(ChaosLog::default()));
    // With --chaos (or --elastic) the transfers go on until the schedule is over.
    let chaos_over = Arc::new(std::sync::atomic::AtomicBool::new(!args.chaos && !args.elastic && !args.ha));
    let accounts: Vec<String> = (0..args.accounts).map(account).collect();
    let elastic = args.elastic.then(|| {
        let schedule = elastic_schedule(cluster.clone(), accounts.clone(), bar_for_schedule());
        let over = chaos_over.clone();
        tokio::spawn(async move {
            let report = schedule.await;
            over.store(true, std::sync::atomic::Ordering::Relaxed);
            report
        })
    });

    let ha = args.ha.then(|| {
        let schedule = crate::failover::demo_schedule(cluster.clone(), bar_for_schedule());
        let over = chaos_over.clone();
        tokio::spawn(async move {
            let report = schedule.await;
            over.store(true, std::sync::atomic::Ordering::Relaxed);
            report
        })
    });
    if args.chaos || args.elastic || args.ha {
        println!(
            "running transfers with {} concurrent clients until the chaos is over ...",
            args.concurrency
        );
    } else {
        println!("running {} transfers with {} concurrent clients ...", args.transfers, args.concurrency);
    }
    let bar = ProgressBar::new(args.transfers as u64);
    bar.set_style(
        ProgressStyle::with_template("  [{bar:40}] {pos}/{len} {per_sec} {msg}")
            .map_err(|e| e.to_string())?
            .progress_chars("=> "),
    );
    let chaos = args.chaos.then(|| {
        let seed = args.seed.unwrap_or_else(rand::random);
        say(&bar, format!("chaos: seed {seed} (replay with --seed {seed})"));
        let schedule = chaos_schedule(cluster.clone(), seed, chaos_log.clone(), bar.clone());
        let over = chaos_over.clone();
        tokio::spawn(async move {
            schedule.await;
            over.store(true, std::sync::atomic::Ordering::Relaxed);
        })
    });
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let started = Instant::now();
    let mut workers = Vec::new();
    for _ in 0..args.concurrency {
        let (client, next, bar, over) = (client.clone(), next.clone(), bar.clone(), chaos_over.clone());
        let (transfers, accounts) = (args.transfers, args.accounts);
        workers.push(tokio::spawn(async move {
            let mut tally = Tally::default();
            let mut latency = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("valid bounds");
            loop {
                let n = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if n >= transfers && over.load(std::sync::atomic::Ordering::Relaxed) {
                    break;
                }
                let (from, to, amount) = {
                    let mut rng = rand::rng();
                    let from = rng.random_range(0..accounts);
                    let to = (from + rng.random_range(1..accounts)) % accounts;
                    (from, to, rng.random_range(1..=100i64))
                };
                let ops = vec![
                    KvOp::Add { key: account(from), delta: -amount },
                    KvOp::Add { key: account(to), delta: amount },
                ];
                let begun = Instant::now();
                match client.transact(ops).await {
                    Ok(result) if result.outcome == Outcome::Committed => {
                        tally.committed += 1;
                        let _ = latency.record(begun.elapsed().as_micros() as u64);
                    }
                    Ok(result) => {
                        *tally.aborted.entry(result.code.label().replace('_', " ")).or_default() += 1
                    }
                    Err(_) => {
                        tally.unknown += 1;
                        // The coordinator is away: do not spin.
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
                if n >= transfers {
                    bar.set_length(n as u64 + 1);
                }
                bar.inc(1);
            }
            (tally, latency)
        }));
    }
    let mut tally = Tally::default();
    let mut latency = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("valid bounds");
    for worker in workers {
        let (t, h) = worker.await.map_err(|e| e.to_string())?;
        tally.committed += t.committed;
        tally.unknown += t.unknown;
        for (reason, n) in t.aborted {
            *tally.aborted.entry(reason).or_default() += n;
        }
        latency.add(h).map_err(|e| e.to_string())?;
    }
    let elapsed = started.elapsed();
    bar.finish_and_clear();

    let chaos_report = match chaos {
        Some(task) => {
            task.await.map_err(|e| e.to_string())?;
            Some(restore(&cluster, &chaos_log).await?)
        }
        None => None,
    };
    let elastic_report = match elastic {
        Some(task) => Some(task.await.map_err(|e| e.to_string())??),
        None => None,
    };
    let ha_report = match ha {
        Some(task) => Some(task.await.map_err(|e| e.to_string())??),
        None => None,
    };

    let cluster = cluster.lock().await;
    let settle_started = Instant::now();
    let settled = cluster.wait_settled(Duration::from_secs(30)).await;
    let settle_ms = settle_started.elapsed().as_millis();
    let client = cluster.client().await.map_err(|e| e.to_string())?;
    let keys: Vec<String> = (0..args.accounts).map(account).collect();
    let values = client.get(&keys).await.map_err(|e| e.to_string())?;
    let mut sum = 0i64;
    let mut unreadable = 0;
    for value in values.values() {
        match value.as_deref().map(String::from_utf8_lossy).and_then(|v| v.parse::<i64>().ok()) {
            Some(n) => sum += n,
            None => unreadable += 1,
        }
    }

    let aborted: u64 = tally.aborted.values().sum();
    println!();
    println!("summary");
    println!("  transfers      {}", tally.committed + aborted + tally.unknown);
    println!("  committed      {}", tally.committed);
    println!("  aborted        {aborted}");
    for (reason, n) in &tally.aborted {
        println!("    {n:>6}  {reason}");
    }
    if tally.unknown > 0 {
        println!(
            "  unknown        {} (the client lost its connection; the outcome is still atomic)",
            tally.unknown
        );
    }
    println!("  elapsed        {:.2} s", elapsed.as_secs_f64());
    println!("  throughput     {:.0} committed tx/s", tally.committed as f64 / elapsed.as_secs_f64());
    if !latency.is_empty() {
        let ms = |q: f64| latency.value_at_quantile(q) as f64 / 1000.0;
        println!(
            "  latency        p50 {:.2} ms  p90 {:.2} ms  p99 {:.2} ms  max {:.2} ms",
            ms(0.5),
            ms(0.9),
            ms(0.99),
            latency.max() as f64 / 1000.0
        );
    }
    if let Some(report) = &chaos_report {
        println!("  chaos          {report}");
    }
    if let Some(report) = &ha_report {
        println!("  failovers      {report}");
    }
    if let Some(report) = &elastic_report {
        println!("  ring           {}", report.summary);
        println!(
            "  reads          every balance read after each of {} steps: {}",
            report.steps,
            if report.missing == 0 {
                "all present".to_owned()
            } else {
                format!("{} missing", report.missing)
            }
        );
    }
    println!("  balances       sum {sum}, expected {expected}");
    let in_doubt_ok = settled.is_ok();
    println!(
        "  in doubt       {}",
        if in_doubt_ok {
            format!("none (settled in {settle_ms} ms)")
        } else {
            "branches still in doubt after 30 s".into()
        }
    );
    let reads_ok = elastic_report.as_ref().is_none_or(|r| r.missing == 0);
    let ok = sum == expected && unreadable == 0 && in_doubt_ok && reads_ok;
    println!();
    if ok {
        let reads = if elastic_report.is_some() {
            "; every committed value was readable at every step"
        } else if ha_report.is_some() {
            "; the group decided every transaction across both failovers"
        } else {
            ""
        };
        println!("verdict: OK — every transfer was all-or-nothing; the sum of balances is unchanged{reads}");
    } else {
        println!("verdict: FAILED — sum {sum} (expected {expected}), {unreadable} unreadable balances, in doubt: {}", !in_doubt_ok);
    }
    if args.keep_running {
        println!("the cluster and its console keep running: Ctrl-C to stop");
        decree_runtime::serve::shutdown_signal().await;
    }
    if args.keep {
        println!("kept {}", cluster.dir().display());
        if let Some(pki) = pki {
            println!("kept {}", pki.keep().display());
        }
    }
    Ok(ok)
}

/// What a client without TLS hears from the cluster's coordinator.
async fn plaintext_refused(cluster: &Cluster) -> String {
    use decree_client::v1::registry_client::RegistryClient;
    let url =
        cluster.coordinator_url().split(',').next().unwrap_or_default().replacen("https://", "http://", 1);
    let Ok(endpoint) = tonic::transport::Endpoint::from_shared(url) else { return "no URL".into() };
    let asked = async {
        let mut registry = RegistryClient::new(endpoint.connect().await.map_err(|e| e.to_string())?);
        let asked = registry.list_participants(decree_client::v1::ListParticipantsRequest {}).await;
        asked.map_err(|status| status.message().to_owned())
    };
    match tokio::time::timeout(std::time::Duration::from_secs(5), asked).await {
        Ok(Ok(_)) => "answered (it should not have been)".into(),
        Ok(Err(err)) => format!("refused ({err}: the server speaks TLS only)"),
        Err(_) => "refused (no answer)".into(),
    }
}

/// What the chaos schedule did.
#[derive(Default)]
struct ChaosLog {
    kills: u32,
    crash_points: u32,
    in_doubt_resolved: usize,
    longest_recovery_ms: u128,
}

type SharedLog = Arc<std::sync::Mutex<ChaosLog>>;

fn lock(log: &SharedLog) -> std::sync::MutexGuard<'_, ChaosLog> {
    log.lock().unwrap_or_else(|p| p.into_inner())
}

/// SIGKILLs after the crash point, each followed by a measured recovery.
const CHAOS_KILLS: u32 = 6;

/// The chaos schedule: first the coordinator dies at the crash point
/// `coordinator.decision.after_log` (so participants are left in doubt), then
/// [`CHAOS_KILLS`] SIGKILLs of random processes at random instants. Each
/// victim is restarted and its recovery measured.
async fn chaos_schedule(cluster: Arc<Mutex<Cluster>>, seed: u64, log: SharedLog, bar: ProgressBar) {
    use rand::SeedableRng;
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    tokio::time::sleep(Duration::from_millis(300)).await;
    say(&bar, "chaos: restarting the coordinator armed with coordinator.decision.after_log");
    // No waiting for it to serve: under load it dies at once.
    let armed =
        cluster.lock().await.restart_with(NodeId::Coordinator, Some("coordinator.decision.after_log"));
    if let Err(err) = armed {
        say(&bar, format!("chaos: could not restart the coordinator: {err}"));
    }
    // It dies at its first decision after the restart.
    let died = cluster.lock().await.wait_exit(NodeId::Coordinator, Duration::from_secs(20)).await.is_ok();
    if died {
        lock(&log).crash_points += 1;
        say(&bar, "chaos: the coordinator crashed right after a decision became durable");
        recover(&cluster, NodeId::Coordinator, "coordinator", &log, &bar).await;
    }
    for _ in 0..CHAOS_KILLS {
        tokio::time::sleep(Duration::from_millis(rng.random_range(300..900))).await;
        let count = cluster.lock().await.participant_count();
        let (victim, name) = match rng.random_range(0..=count) {
            0 => (NodeId::Coordinator, "coordinator".to_string()),
            i => (NodeId::Participant(i - 1), format!("p{i}")),
        };
        cluster.lock().await.kill(victim);
        lock(&log).kills += 1;
        say(&bar, format!("chaos: SIGKILL {name}"));
        tokio::time::sleep(Duration::from_millis(rng.random_range(100..500))).await;
        recover(&cluster, victim, &name, &log, &bar).await;
    }
}

/// Prints above the progress bar, or plainly when there is no terminal to draw on.
pub(crate) fn say(bar: &ProgressBar, message: impl Into<String>) {
    let message = message.into();
    if bar.is_hidden() {
        println!("{message}");
    } else {
        bar.println(message);
    }
}

/// Restarts `victim` and measures its recovery: the branches in doubt when it
/// comes back (at the participants while the coordinator was away, or at the
/// restarted participant), and how long until every one of them is decided.
async fn recover(
    cluster: &Arc<Mutex<Cluster>>,
    victim: NodeId,
    name: &str,
    log: &SharedLog,
    bar: &ProgressBar,
) {
    let urls: Vec<String> = {
        let c = cluster.lock().await;
        (0..c.participant_count()).map(|i| c.url_of(NodeId::Participant(i))).collect()
    };
    let in_doubt = |urls: Vec<String>| async move {
        let (branches, unreachable) = decree_client::in_doubt_at_urls(&urls).await.ok()?;
        let set: std::collections::BTreeSet<(String, String)> =
            branches.into_iter().map(|b| (b.participant, b.txid)).collect();
        Some((set, unreachable.is_empty()))
    };
    // While the coordinator is away, its participants' doubt is visible now.
    let mut doubted = match victim {
        NodeId::Coordinator | NodeId::Replica(_) => {
            in_doubt(urls.clone()).await.map(|(set, _)| set).unwrap_or_default()
        }
        NodeId::Participant(_) => Default::default(),
    };
    let restarted = cluster.lock().await.restart(victim);
    let started = Instant::now();
    if let Err(err) = restarted {
        say(bar, format!("chaos: restarting {name} failed: {err}"));
        return;
    }
    if let NodeId::Participant(i) = victim {
        // A restarted participant shows what it recovered once it serves.
        let url = vec![urls[i].clone()];
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some((set, true)) = in_doubt(url.clone()).await {
                doubted = set;
                break;
            }
            if Instant::now() > deadline {
                say(bar, format!("chaos: {name} did not come back within 30 s"));
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some((now, true)) = in_doubt(urls.clone()).await {
            if doubted.iter().all(|branch| !now.contains(branch)) {
                break;
            }
        }
        if Instant::now() > deadline {
            say(bar, format!("chaos: {name} back, but branches are still in doubt after 30 s"));
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let ms = started.elapsed().as_millis();
    let mut log = lock(log);
    log.in_doubt_resolved += doubted.len();
    log.longest_recovery_ms = log.longest_recovery_ms.max(ms);
    say(
        bar,
        format!(
            "chaos: {name} restarted; {} branch(es) were in doubt, all decided {ms} ms after the restart",
            doubted.len()
        ),
    );
}

/// Brings every process back after the chaos stops.
async fn restore(cluster: &Arc<Mutex<Cluster>>, log: &SharedLog) -> Result<String, String> {
    let mut c = cluster.lock().await;
    let ids: Vec<NodeId> = std::iter::once(NodeId::Coordinator)
        .chain((0..c.participant_count()).map(NodeId::Participant))
        .collect();
    for id in ids {
        if !c.is_running(id) {
            c.restart(id).map_err(|e| e.to_string())?;
        }
    }
    c.wait_enrolled(Duration::from_secs(30)).await.map_err(|e| e.to_string())?;
    let log = lock(log);
    Ok(format!(
        "{} SIGKILLs, {} crash point(s), {} branch(es) in doubt at a restart, all decided; longest recovery {} ms",
        log.kills, log.crash_points, log.in_doubt_resolved, log.longest_recovery_ms
    ))
}

/// Participants of `--elastic`: three in the ring, two to add and remove.
const ELASTIC_MEMBERS: usize = 5;

/// The progress bar is the workers'; the schedule prints plainly above it.
fn bar_for_schedule() -> ProgressBar {
    ProgressBar::hidden()
}

/// What the elastic schedule did.
struct ElasticReport {
    summary: String,
    steps: usize,
    missing: usize,
}

/// 3 -> 4 -> 5 -> 4 -> 3 members, the coordinator SIGKILLed while p5's keys
/// move in; after each step every balance is read back.
async fn elastic_schedule(
    cluster: Arc<Mutex<Cluster>>,
    accounts: Vec<String>,
    bar: ProgressBar,
) -> Result<ElasticReport, String> {
    use decree_client::RingChange;
    let steps: [(RingChange, bool); 4] = [
        (RingChange::Add { name: "p4".into(), weight: 1 }, false),
        (RingChange::Add { name: "p5".into(), weight: 1 }, true),
        (RingChange::Remove { name: "p5".into() }, false),
        (RingChange::Remove { name: "p4".into() }, false),
    ];
    let (mut missing, mut moved, started) = (0, 0u64, Instant::now());
    tokio::time::sleep(Duration::from_millis(500)).await;
    for (change, kill) in &steps {
        let url = cluster.lock().await.coordinator_url();
        let client = decree_client::Client::connect(&url).await.map_err(|e| e.to_string())?;
        let what = match change {
            RingChange::Add { name, .. } => format!("add {name}"),
            RingChange::Remove { name } => format!("remove {name}"),
            RingChange::Weight { name, weight } => format!("weight {name} {weight}"),
        };
        let step_started = Instant::now();
        let routing = client.change_ring(change.clone()).await.map_err(|e| format!("ring {what}: {e}"))?;
        say(&bar, format!("elastic: ring {what}: epoch {}, migration started", routing.epoch));
        if *kill {
            // Once keys are moving, the coordinator dies (SIGKILL) and comes back.
            let _ = decree_cluster::poll(Duration::from_secs(30), "keys moving", || async {
                let ring = client.ring_status().await.ok()?;
                ring.migration.filter(|m| m.moved_keys > 0).map(|_| ())
            })
            .await;
            let mut c = cluster.lock().await;
            c.kill(NodeId::Coordinator);
            say(&bar, "elastic: SIGKILL coordinator during the migration");
            c.restart(NodeId::Coordinator).map_err(|e| e.to_string())?;
            c.wait_back(NodeId::Coordinator).await.map_err(|e| e.to_string())?;
            say(&bar, "elastic: coordinator restarted; the migration resumes from its cursor");
        }
        let settled = decree_cluster::poll(Duration::from_secs(120), "the migration to end", || async {
            let client = decree_client::Client::connect(&url).await.ok()?;
            let ring = client.ring_status().await.ok()?;
            ring.migration.is_none().then_some(ring.last?)
        })
        .await
        .map_err(|e| e.to_string())?;
        moved += settled.moved_keys;
        let client = decree_client::Client::connect(&url).await.map_err(|e| e.to_string())?;
        let values = client.get(&accounts).await.map_err(|e| e.to_string())?;
        let absent = values.values().filter(|v| v.is_none()).count();
        missing += absent;
        let members = client.ring().names().join(", ");
        say(
            &bar,
            format!(
                "elastic: ring {what} done in {:.1} s: {} keys moved in {} batches; members {members}; \
                 {} of {} balances read back",
                step_started.elapsed().as_secs_f64(),
                settled.moved_keys,
                settled.batches,
                accounts.len() - absent,
                accounts.len()
            ),
        );
    }
    Ok(ElasticReport {
        summary: format!(
            "3 -> 4 -> 5 -> 4 -> 3 members, {moved} keys moved, one coordinator SIGKILL mid-migration, {:.1} s",
            started.elapsed().as_secs_f64()
        ),
        steps: steps.len(),
        missing,
    })
}

/// Serves the operator's console over the demo's cluster from this process
/// (so it outlives the coordinator's restarts), and prints its URL. A busy
/// port is said, and the demo goes on without it.
async fn console(cluster: &Cluster, listen: std::net::SocketAddr, keep_running: bool) {
    let listener = match tokio::net::TcpListener::bind(listen).await {
        Ok(listener) => listener,
        Err(err) => {
            println!("  console        not started: {listen}: {err} (choose another with --console-listen)");
            return;
        }
    };
    let at = listener.local_addr().map_or(listen, |a| a);
    let later = if keep_running { "" } else { " while the demo runs (--keep-running keeps it up after)" };
    println!("  console        http://{at}/{later}");
    let url = cluster.coordinator_url();
    tokio::spawn(async move {
        let _ = decree_console::serve(listener, &url, std::future::pending()).await;
    });
}
